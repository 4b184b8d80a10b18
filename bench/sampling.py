"""Resource sampling: CPU and RSS of process trees from /proc, Redis ``used_memory``.

A background thread samples every ``interval`` seconds (0.5 s by default). CPU time is
cumulative, so sampling only matters for it to catch children before they are reaped; RSS
and Redis memory are instantaneous, so their peaks are only as good as the sampling rate.
Linux only (reads ``/proc``).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

import redis

__all__ = ["ProcReading", "Sampler", "proc_reading"]

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = 1024  # VmRSS is reported in kB


@dataclass(frozen=True, slots=True)
class ProcReading:
    """CPU seconds (user + system, reaped children included) and RSS bytes of a tree."""

    cpu: float
    rss: int
    processes: int


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, own CPU seconds incl. reaped children) of one process, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: split after its last ")".
    fields = raw[raw.rfind(b")") + 2 :].split()
    ppid = int(fields[1])
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return ppid, (utime + stime + cutime + cstime) / _CLK_TCK


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * _PAGE
    except OSError:
        pass
    return 0


def _tree(root: int) -> list[int]:
    """``root`` and every live descendant (one scan of /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        stat = _stat(int(entry.name))
        if stat is not None:
            children.setdefault(stat[0], []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def proc_reading(root: int) -> ProcReading:
    """CPU and RSS of ``root`` and its live descendants, now."""
    cpu, rss, count = 0.0, 0, 0
    for pid in _tree(root):
        stat = _stat(pid)
        if stat is None:
            continue
        cpu += stat[1]
        rss += _rss(pid)
        count += 1
    return ProcReading(cpu=cpu, rss=rss, processes=count)


@dataclass
class _Watched:
    pids: tuple[int, ...]
    cpu_start: float = 0.0
    cpu_last: float = 0.0
    rss_peak: int = 0


@dataclass
class _RedisWatch:
    client: redis.Redis
    start: int = 0
    peak: int = 0
    last: int = 0


@dataclass
class _Series:
    points: list[dict[str, Any]] = field(default_factory=list)


class Sampler:
    """Samples watched process trees and (optionally) Redis on a daemon thread.

    ``watch(label, pid)`` adds a tree; ``begin()`` starts the measured window (CPU baseline,
    peaks reset); ``end()`` takes a last sample and freezes the figures returned by
    :meth:`summary`.
    """

    def __init__(self, *, interval: float = 0.5, redis_url: str | None = None) -> None:
        self.interval = interval
        self._watched: dict[str, _Watched] = {}
        self._redis = (
            _RedisWatch(redis.Redis.from_url(redis_url, socket_timeout=5)) if redis_url else None
        )
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = time.time()
        self._series = _Series()
        self._window = False
        self._ended: dict[str, Any] | None = None
        if self._redis is not None and redis_url is not None:
            pid = _local_redis_pid(self._redis.client, redis_url)
            if pid is not None:
                self.watch("redis_server", pid)  # its CPU is part of what tracking costs

    def watch(self, label: str, *pids: int) -> None:
        """Sample ``pids`` and their descendants, summed, under ``label`` from now on."""
        with self._lock:
            self._watched[label] = _Watched(pids)
        self.sample()

    def sample(self) -> None:
        """Take one sample of every watched tree and of Redis."""
        with self._lock:
            point: dict[str, Any] = {"t": round(time.time() - self._t0, 3)}
            for label, w in self._watched.items():
                readings = [proc_reading(pid) for pid in w.pids]
                rss = sum(r.rss for r in readings)
                if all(r.processes for r in readings):  # a tree gone keeps its last CPU
                    w.cpu_last = sum(r.cpu for r in readings)
                if self._window:
                    w.rss_peak = max(w.rss_peak, rss)
                point[label] = {"cpu": round(w.cpu_last, 3), "rss_mib": _mib(rss)}
            if self._redis is not None:
                with contextlib.suppress(redis.RedisError):
                    used = int(self._redis.client.info("memory")["used_memory"])
                    self._redis.last = used
                    if self._window:
                        self._redis.peak = max(self._redis.peak, used)
                    point["redis_mib"] = _mib(used)
            if self._window:
                self._series.points.append(point)

    def begin(self) -> None:
        """Start the measured window: CPU counts from here, peaks restart."""
        self.sample()
        with self._lock:
            self._t0 = time.time()
            for w in self._watched.values():
                w.cpu_start = w.cpu_last
                w.rss_peak = 0
            if self._redis is not None:
                self._redis.start = self._redis.last
                self._redis.peak = self._redis.last
            self._series = _Series()
            self._window = True
        self.sample()

    def end(self) -> dict[str, Any]:
        """Close the window with a last sample; return :meth:`summary`."""
        if self._ended is None:
            self.sample()
            with self._lock:
                self._window = False
                self._ended = self._summary()
        return self._ended

    def summary(self) -> dict[str, Any]:
        """Per label ``cpu_s`` and ``rss_peak_mib``; ``redis`` start/peak MiB; the series."""
        if self._ended is not None:
            return self._ended
        with self._lock:
            return self._summary()

    def _summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            label: {"cpu_s": round(w.cpu_last - w.cpu_start, 3), "rss_peak_mib": _mib(w.rss_peak)}
            for label, w in self._watched.items()
        }
        if self._redis is not None:
            out["redis"] = {
                "start_mib": _mib(self._redis.start),
                "peak_mib": _mib(self._redis.peak),
                "growth_mib": _mib(self._redis.peak - self._redis.start),
            }
        out["series"] = list(self._series.points)
        return out

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):  # a sampling hiccup must not end the run
                self.sample()

    def start(self) -> None:
        """Start the sampling thread."""
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the sampling thread and close the Redis connection."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._redis is not None:
            self._redis.client.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _local_redis_pid(client: redis.Redis, url: str) -> int | None:
    """The Redis server's pid when it runs on this machine (its /proc entry is ours to read)."""
    parts = urlsplit(url)
    if parts.scheme != "unix" and parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        return None
    try:
        pid = int(client.info("server")["process_id"])
    except (redis.RedisError, KeyError, ValueError):
        return None
    return pid if os.path.exists(f"/proc/{pid}") else None


def _mib(n: int) -> float:
    return round(n / (1024 * 1024), 2)
