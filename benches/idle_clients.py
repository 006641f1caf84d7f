"""Opens keep-alive connections that each serve one small GET, then holds them.

    python3 benches/idle_clients.py HOST PORT PATH COUNT [CONCURRENCY]

Prints "ready <count>" once every connection has had its answer, then keeps
them open, idle, until stdin closes; used by benches/idle_connections.sh to
measure what an idle keep-alive connection costs an ingress.
"""
import asyncio
import sys


async def one(host, port, path, gate, opened):
    async with gate:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if length:
            await reader.readexactly(length)
        if not head.startswith(b"HTTP/1.1 200"):
            raise SystemExit(f"unexpected answer: {head[:60]!r}")
    opened.append(writer)


async def main():
    host, port, path, count = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    concurrency = int(sys.argv[5]) if len(sys.argv) > 5 else 64
    gate = asyncio.Semaphore(concurrency)
    opened = []
    await asyncio.wait_for(
        asyncio.gather(*(one(host, port, path, gate, opened) for _ in range(count))), 120
    )
    print(f"ready {len(opened)}", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    for writer in opened:
        writer.close()


asyncio.run(main())
