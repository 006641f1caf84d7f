"""PutObject then GetObject with boto3 over HTTPS, retries off.

Over HTTPS boto3 sends PutObject as `Content-Encoding: aws-chunked` with
`Transfer-Encoding: chunked`, `x-amz-content-sha256:
STREAMING-UNSIGNED-PAYLOAD-TRAILER`, no Content-Length and a CRC32 trailer.
Prints the request headers that matter as JSON and exits non-zero if the
object does not read back byte for byte.
"""
import argparse
import hashlib
import io
import json
import sys

import boto3
from botocore.config import Config


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--size", type=int, default=1 << 20)
    parser.add_argument("--access-key", required=True)
    parser.add_argument("--secret-key", required=True)
    args = parser.parse_args()

    s3 = boto3.client(
        "s3",
        endpoint_url=args.endpoint,
        verify=args.ca,
        aws_access_key_id=args.access_key,
        aws_secret_access_key=args.secret_key,
        region_name="us-east-1",
        config=Config(
            retries={"max_attempts": 1, "mode": "standard"},
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_supported",
            connect_timeout=10,
            read_timeout=60,
        ),
    )
    sent = []
    s3.meta.events.register("before-send.s3.PutObject", lambda request, **_: sent.append(dict(request.headers)))

    body = hashlib.sha256(args.key.encode()).digest() * (args.size // 32)
    s3.put_object(Bucket=args.bucket, Key=args.key, Body=io.BytesIO(body))
    got = s3.get_object(Bucket=args.bucket, Key=args.key)["Body"].read()

    wanted = ("Content-Encoding", "Transfer-Encoding", "Content-Length", "X-Amz-Content-SHA256", "X-Amz-Trailer")
    headers = {name: _text(sent[0].get(name)) for name in wanted}
    print(json.dumps({"headers": headers, "intact": got == body, "size": len(got)}))
    return 0 if got == body else 1


def _text(value):
    if isinstance(value, bytes):
        return value.decode()
    return value


if __name__ == "__main__":
    sys.exit(main())
