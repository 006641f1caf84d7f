#!/usr/bin/env bash
# The demo, in one command on a fresh machine with the Rust toolchain:
# builds the S3 backend (s3s-fs, once, into ~/.cache/s3fp), then runs the
# outage experiment locally: PutObject every 100 ms while the backend is
# SIGKILLed and restarted every few seconds, first through s3-failover-proxy,
# then straight against the backend. Prints progress and a summary, and writes
# charts to target/demo/. Extra arguments go to the demo (see --help).
set -euo pipefail
cd "$(dirname "$0")"
tools=$HOME/.cache/s3fp/tools
if [ ! -x "$tools/bin/s3s-fs" ]; then
  echo "building the demo S3 backend (s3s-fs 0.14.1; a few minutes, once)..."
  CARGO_TARGET_DIR=$HOME/.cache/s3fp/install-target \
    cargo install s3s-fs@0.14.1 --features binary --locked --root "$tools"
fi
export S3S_FS_BIN=$tools/bin/s3s-fs
exec cargo run --release --quiet -p s3-outage-experiment -- demo "$@"
