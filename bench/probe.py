"""``python -m bench --probe-throughput``: how many status checks/s the sandbox serves here.

The sandbox runs in its own process (``python -m smsbat_tracker.tools.sandbox``), as a remote API
would, and the project's own async clients hammer ``GET /bat/message/{id}`` from the bench
process: :class:`~smsbat_tracker.provider.aioclient.BatchStatusClient` (aiohttp) when aiohttp is
installed, and :class:`~smsbat_tracker.provider.client.AsyncSmsbatClient` (httpx). Each run is
bounded by a request count and a time cap. On a 2-core machine the client and the server
each get about one core; the figure is a floor for what the campaign path could reach.
"""

from __future__ import annotations

import asyncio
import importlib.util
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from bench.sampling import proc_reading
from bench.workload import SandboxProcess, create_messages, workload_config
from smsbat_tracker.errors import SmsbatError
from smsbat_tracker.provider.client import AsyncSmsbatClient
from smsbat_tracker.provider.models import MessageStatus

__all__ = ["TARGET_RPS", "probe_throughput"]

TARGET_RPS = 2_000  # the later target: status checks per second
_CHUNK = 1_000  # ids per get_statuses call
_WARM_UP = 200


class _StatusClient(Protocol):
    async def get_statuses(
        self, message_ids: Sequence[str], *, concurrency: int = ...
    ) -> dict[str, MessageStatus | SmsbatError]: ...

    async def aclose(self) -> None: ...


def _make_client(kind: str, url: str, api_key: str, concurrency: int) -> _StatusClient:
    if kind == "aiohttp":
        from smsbat_tracker.provider.aioclient import BatchStatusClient

        return BatchStatusClient(url, api_key=api_key, max_connections=concurrency)
    return AsyncSmsbatClient(url, api_key=api_key, max_connections=concurrency)


async def _hammer(
    kind: str,
    url: str,
    api_key: str,
    ids: list[str],
    *,
    concurrency: int,
    requests: int,
    cap_s: float,
    sandbox_pid: int,
) -> dict[str, Any]:
    client = _make_client(kind, url, api_key, concurrency)
    try:
        await client.get_statuses(ids[:_WARM_UP], concurrency=concurrency)
        done = errors = 0
        cpu0, server0 = time.process_time(), proc_reading(sandbox_pid).cpu
        start = time.perf_counter()
        offset = 0
        while done < requests and time.perf_counter() - start < cap_s:
            size = min(_CHUNK, requests - done)
            chunk = [ids[(offset + i) % len(ids)] for i in range(size)]
            offset += size
            answers = await client.get_statuses(chunk, concurrency=concurrency)
            errors += sum(isinstance(a, SmsbatError) for a in answers.values())
            done += size
        seconds = time.perf_counter() - start
        cpu, server = time.process_time() - cpu0, proc_reading(sandbox_pid).cpu - server0
    finally:
        await client.aclose()
    return {
        "library": kind,
        "client": "BatchStatusClient" if kind == "aiohttp" else "AsyncSmsbatClient",
        "concurrency": concurrency,
        "requests": done,
        "errors": errors,
        "seconds": round(seconds, 3),
        "checks_per_s": round(done / seconds, 1) if seconds else None,
        "client_cpu_s": round(cpu, 3),
        "sandbox_cpu_s": round(server, 3),
    }


def probe_throughput(
    *,
    seed: int,
    log_dir: Path,
    requests: int = 20_000,
    concurrencies: Sequence[int] = (10, 64),
    cap_s: float = 10.0,
) -> dict[str, Any]:
    """Run the probe; return its rows, the best one and whether the target is reached."""
    kinds = ["aiohttp"] if importlib.util.find_spec("aiohttp") else []
    kinds.append("httpx")
    config = workload_config(seed)
    rows: list[dict[str, Any]] = []
    with SandboxProcess(config, log_dir / "probe-sandbox.log") as sandbox:
        url = sandbox.url
        ids, _ = create_messages(url, config.api_key, 1_000)
        for kind in kinds:
            for concurrency in concurrencies:
                rows.append(
                    asyncio.run(
                        _hammer(
                            kind,
                            url,
                            config.api_key,
                            ids,
                            concurrency=concurrency,
                            requests=requests,
                            cap_s=cap_s,
                            sandbox_pid=sandbox.pid,
                        )
                    )
                )
    best = max(rows, key=lambda r: r["checks_per_s"] or 0.0)
    return {
        "rows": rows,
        "best": best,
        "target_checks_per_s": TARGET_RPS,
        "target_holds": (best["checks_per_s"] or 0) >= TARGET_RPS,
        "aiohttp_installed": "aiohttp" in kinds,
    }


def render_probe(result: dict[str, Any]) -> str:
    """The probe as a table plus one verdict line."""
    header = ["library", "client", "in flight", "requests", "errors", "s", "checks/s", "CPU c/s"]
    rows = [
        [
            r["library"],
            r["client"],
            str(r["concurrency"]),
            str(r["requests"]),
            str(r["errors"]),
            f"{r['seconds']:.2f}",
            f"{r['checks_per_s']:.0f}",
            f"{r['client_cpu_s']:.1f}/{r['sandbox_cpu_s']:.1f}",
        ]
        for r in result["rows"]
    ]
    widths = [max(len(c) for c in col) for col in zip(header, *rows, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    best = result["best"]
    verdict = "reached" if result["target_holds"] else "NOT reached"
    lines += [
        "",
        f"best: {best['checks_per_s']:.0f} checks/s with {best['library']} "
        f"({best['client']}, {best['concurrency']} in flight); target "
        f">= {TARGET_RPS:,} checks/s {verdict}. CPU c/s: client / sandbox CPU seconds.",
    ]
    if not result["aiohttp_installed"]:
        lines.append("aiohttp is not installed: only httpx was measured.")
    return "\n".join(lines)
