"""A fixed-rate load generator with microsecond resolution (hey's is 0.1 ms).

Sends `GET URL` at a steady RATE for SECONDS over keep-alive connections, each request when
its moment comes (open loop), and prints the latency of each as JSON percentiles: from
writing the request to reading the end of its answer. The answer must carry a
Content-Length, as the benchmark's small JSON answer does.

    python bench/rate.py URL RATE SECONDS [CONNECTIONS]
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from urllib.parse import urlsplit

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def exchange(connection: Connection, request: bytes) -> int:
    """Send `request` on `connection` and read its whole answer; the status."""
    reader, writer = connection
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            await reader.readexactly(int(value))
            break
    else:
        raise ValueError("an answer without Content-Length")
    return int(head[9:12])


async def load(url: str, rate: float, seconds: float, connections: int) -> dict[str, float]:
    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    request = f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n".encode()
    idle: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(connections):
        idle.put_nowait(await asyncio.open_connection(parts.hostname, parts.port))

    latencies: list[float] = []
    failed = 0

    async def one() -> None:
        nonlocal failed
        connection = await idle.get()
        began = time.perf_counter_ns()
        status = await exchange(connection, request)
        latencies.append((time.perf_counter_ns() - began) / 1000)
        failed += status != 200
        idle.put_nowait(connection)

    started = time.perf_counter()
    pending = set()
    for number in range(int(rate * seconds)):
        delay = started + number / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one())
        pending.add(task)
        task.add_done_callback(pending.discard)
    await asyncio.gather(*pending)
    while not idle.empty():
        idle.get_nowait()[1].close()

    latencies.sort()
    return {
        "requests": len(latencies),
        "failed": failed,
        "p50_us": latencies[len(latencies) // 2],
        "p99_us": latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))],
    }


def main() -> None:
    url, rate, seconds = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    connections = int(sys.argv[4]) if len(sys.argv) > 4 else 16
    print(json.dumps(asyncio.run(load(url, rate, seconds, connections))))


if __name__ == "__main__":
    main()
