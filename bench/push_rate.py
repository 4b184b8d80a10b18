"""Pushes per second through the served webhook receiver.

``python -m bench.push_rate [N]`` serves the receiver (uvicorn, one process) on an embedded
Redis and posts ``N`` (default 4,000) non-final pushes, 16 at a time, after 200 to warm up,
from an httpx client on the same machine. Prints ``{"pushes_per_s": ...}``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time

import httpx

from bench.workload import free_port
from smsbat_tracker.config import load_settings
from smsbat_tracker.tools.embedded import PersistentRedis
from smsbat_tracker.tools.serving import BackgroundServer
from smsbat_tracker.webhook import create_app

TOKEN = "bench-token"  # a throwaway token for a local receiver
IN_FLIGHT = 16
WARM_UP = 200


async def _blast(url: str, count: int) -> float:
    gate = asyncio.Semaphore(IN_FLIGHT)
    async with httpx.AsyncClient(timeout=30) as client:

        async def one(i: int) -> None:
            body = {
                "messageId": f"m{i:06d}",
                "deliverystatus": "processing",
                "timestamp": "2025-01-23T10:30:00Z",
                "cost": 0.0,
            }
            async with gate:
                answer = await client.post(f"{url}/webhook", params={"token": TOKEN}, json=body)
                answer.raise_for_status()

        await asyncio.gather(*(one(i) for i in range(WARM_UP)))
        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(count)))
        return count / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    count = int(args[0]) if args else 4_000
    with tempfile.TemporaryDirectory() as data, PersistentRedis(free_port(), data) as redis:
        settings = load_settings(credentials=False, redis_url=redis.url, webhook_token=TOKEN)
        with BackgroundServer(create_app(settings)) as server:
            rate = asyncio.run(_blast(server.url, count))
    print(json.dumps({"pushes_per_s": round(rate, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
