"""The modes: a registry keyed by mode letter: a (doc loop), b (poll), c (push), d (campaign).

Each mode gets its own sandbox with the same seed (so the same message mix), creates its
messages right before it starts tracking them, and returns a :class:`ModeRun`: the ground
truth of every message, what the mode concluded about each one and when, and the resources
its processes used. :mod:`bench.metrics` turns that into figures.

Adding a mode is one function::

    @register("e", "...")
    def run_campaign(ctx: BenchContext) -> ModeRun:
        ...  # create messages, track them, return ModeRun(...)

and nothing else: the CLI, the metrics and the report pick it up by letter.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import httpx
import redis

from bench.metrics import Observation
from bench.sampling import Sampler, proc_reading
from bench.workload import SandboxProcess, create_messages, terminate, workload_config
from smsbat_tracker.config import Settings, load_settings
from smsbat_tracker.tools.workers import PACKAGE_APP, worker_process

if TYPE_CHECKING:
    from smsbat_tracker.worker import TrackerApp

__all__ = [
    "MODES",
    "PLANNED",
    "BenchContext",
    "ModeRun",
    "ModeSpec",
    "register",
    "unavailable_reason",
]

DOC_INTERVAL = 5.0  # the documentation's loop: check every 5 s ...
DOC_GIVE_UP = 60.0  # ... and give up after 60 s
# Modes b, c and d (unless --shared-worker): tracking's queue, the callbacks' worker threads.
TRACK_QUEUE = "smsbat-bench"
CALLBACK_THREADS = 4
_BENCH_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class BenchContext:
    """What every mode is given."""

    messages: int
    seed: int
    deadline: float  # smsbat-tracker's deadline (modes b, c, d)
    concurrency: int  # worker threads or processes (modes b and c)
    pool: str  # Celery pool of modes b and c: threads or prefork
    shared_worker: bool  # modes b, c, d: callbacks on the tracking worker, not their own
    processes: int  # worker processes (mode d's children; b and c's threads workers)
    redis_url: str
    redis_owned: bool  # a private server: flushed before each mode
    log_dir: Path
    rate_limit: float | None  # None: the settings' default
    out: IO[str]
    # Modes b and c: this share of status answers comes only after the read timeout.
    slow_rate: float = 0.0
    # Modes b and c: what the workers' ``celery -A`` loads (a user's app after init_app).
    worker_app: str = PACKAGE_APP

    def say(self, text: str) -> None:
        """One progress line (stderr-like; the table goes to the same stream at the end)."""
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=self.out, flush=True)

    @property
    def margin(self) -> float:
        """How long after its deadline a mode may still finish before the bench stops it."""
        return 30.0 + self.messages / 100.0


@dataclass
class ModeRun:
    """The raw result of one mode; see the module docstring."""

    letter: str
    title: str
    deadline: float
    truths: list[dict[str, Any]]
    observations: dict[str, Observation]
    resources: dict[str, Any]
    cpu_s: float  # the tracking processes' CPU over the run (worker, or the doc loop)
    rss_peak_mib: float
    wall_s: float
    last_check_before: float | None = None  # mode a: its blind window, see metrics.evaluate
    duplicates: int = 0  # callbacks fired more than once for one message
    extra: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


ModeRunner = Callable[[BenchContext], ModeRun]


@dataclass(frozen=True)
class ModeSpec:
    """A registered mode: its letter, title, the module it needs and its runner."""

    letter: str
    title: str
    runner: ModeRunner
    requires: str | None = None


MODES: dict[str, ModeSpec] = {}
"""Registered modes by letter, in registration order (the order they run in)."""

PLANNED: dict[str, str] = {}
"""Letters reserved for modes not written yet, with what they will be."""


def register(
    letter: str, title: str, *, requires: str | None = None
) -> Callable[[ModeRunner], ModeRunner]:
    """Register ``runner`` as mode ``letter``; ``requires`` names a module it needs."""

    def decorate(runner: ModeRunner) -> ModeRunner:
        if letter in MODES:
            raise ValueError(f"mode {letter} is registered twice")
        MODES[letter] = ModeSpec(letter, title, runner, requires)
        PLANNED.pop(letter, None)
        return runner

    return decorate


def unavailable_reason(spec: ModeSpec) -> str | None:
    """Why the mode cannot run here, or None when it can."""
    if spec.requires and importlib.util.find_spec(spec.requires) is None:
        return f"needs {spec.requires}, which is not there yet"
    return None


# ------------------------------------------------------------------ helpers


def _python_module(
    module: str, log_path: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """Start ``python -m module`` from the repository root, stdin/stdout piped."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", module],
            cwd=_BENCH_ROOT,
            env={**os.environ, **(env or {})},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            # Its own session: a Ctrl-C reaches only the bench, which stops it in order.
            start_new_session=True,
        )


def _stop(proc: subprocess.Popen[str]) -> None:
    """Stop a child we started: close stdin, then SIGTERM, then SIGKILL."""
    with contextlib.suppress(OSError):
        if proc.stdin:
            proc.stdin.close()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        terminate(proc)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _use_settings(settings: Settings) -> TrackerApp:
    """Point this process's Celery app at ``settings`` (as the demo does)."""
    env = settings.to_env()
    for name in [n for n in os.environ if n.startswith("SMSBAT_") and n not in env]:
        del os.environ[name]  # nothing of an earlier mode may leak into the next worker
    # The Celery app reads the environment when first imported.
    os.environ.update(env)
    from smsbat_tracker.worker import app

    app.reconfigure(settings)
    return app


def _wait_worker_ready(
    app: TrackerApp,
    proc: subprocess.Popen[bytes],
    log_path: Path,
    timeout: float = 90.0,
    *,
    others: Sequence[subprocess.Popen[bytes]] = (),
) -> float:
    """Wait until the worker (and ``others``) answer a ping; return how long it took."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        for each in (proc, *others):
            if each.poll() is not None:
                raise RuntimeError(f"a worker exited with {each.returncode}:\n{_tail(log_path)}")
        if len(app.control.ping(timeout=0.5) or ()) > len(others):
            return time.monotonic() - start
    raise RuntimeError(f"the worker did not answer a ping in {timeout:g} s:\n{_tail(log_path)}")


def _idle_cpu_rate(*pids: int, seconds: float = 3.0) -> float:
    """CPU seconds per second of idle process trees, summed: the cost of merely running."""
    before = sum(proc_reading(pid).cpu for pid in pids)
    time.sleep(seconds)
    return (sum(proc_reading(pid).cpu for pid in pids) - before) / seconds


@contextlib.contextmanager
def _webhook_host(settings: Settings, log_path: Path) -> Iterator[tuple[str, int]]:
    """The webhook receiver in a child process; yields (base URL, pid)."""
    proc = _python_module("bench.webhook_host", log_path, settings.to_env())
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the webhook receiver did not start:\n{_tail(log_path)}")
        yield str(json.loads(line)["url"]), proc.pid
    finally:
        _stop(proc)


def _callbacks_worker(
    stack: contextlib.ExitStack,
    ctx: BenchContext,
    settings: Settings,
    letter: str,
    sampler: Sampler,
) -> list[subprocess.Popen[bytes]]:
    """As the README advises, the callbacks on a worker of their own (unless --shared-worker).

    It stands for the application's worker: small, and sampled apart (``callbacks``).
    """
    if ctx.shared_worker:
        return []
    from smsbat_tracker.celery.integration import DEFAULT_QUEUE

    proc = stack.enter_context(
        worker_process(
            settings,
            concurrency=CALLBACK_THREADS,
            queues=(DEFAULT_QUEUE,),
            app=ctx.worker_app,
            log_path=str(ctx.log_dir / f"mode-{letter}-callbacks.log"),
        )
    )
    sampler.watch("callbacks", proc.pid)
    return [proc]


def _callbacks_note(ctx: BenchContext, resources: dict[str, Any], extra: dict[str, Any]) -> str:
    """The figures of the callbacks' worker, and the note that says where they ran."""
    if ctx.shared_worker:
        return "the callbacks ran on the tracking worker (--shared-worker)"
    extra["callbacks_cpu_s"] = resources["callbacks"]["cpu_s"]
    extra["callbacks_rss_peak_mib"] = resources["callbacks"]["rss_peak_mib"]
    return (
        f"tracking ran on queue {TRACK_QUEUE!r}; the callbacks on a worker of their own "
        f"({CALLBACK_THREADS} threads, {resources['callbacks']['cpu_s']:.1f} CPU s), "
        "not counted in CPU and RSS"
    )


def _tracking_queues(ctx: BenchContext) -> tuple[str, ...]:
    """The tracking worker's ``-Q``: every queue with --shared-worker, else tracking's own."""
    return () if ctx.shared_worker else (TRACK_QUEUE,)


def _settings(ctx: BenchContext, base_url: str, api_key: str, prefix: str, **more: Any) -> Settings:
    """The tracker's settings for a mode: defaults, but for the bench's own choices."""
    if ctx.rate_limit is not None:
        more["rate_limit"] = ctx.rate_limit
    if not ctx.shared_worker:
        more["queue"] = TRACK_QUEUE
    return load_settings(
        redis_url=ctx.redis_url,
        base_url=base_url,
        api_key=api_key,
        deadline=ctx.deadline,
        key_prefix=prefix,
        **more,
    )


def _clean_redis(ctx: BenchContext, prefix: str | None = None) -> None:
    """Before a mode: empty a private Redis; after one: drop its keys from a shared Redis."""
    client = redis.Redis.from_url(ctx.redis_url)
    try:
        if ctx.redis_owned and prefix is None:
            client.flushall()
        elif not ctx.redis_owned and prefix is not None:
            for key in client.scan_iter(match=f"{prefix}:*", count=1000):
                client.delete(key)
    finally:
        client.close()


# ------------------------------------------------------------------ mode a


@register("a", f"doc loop ({DOC_INTERVAL:g} s fixed, gives up at {DOC_GIVE_UP:g} s)")
def run_doc_loop(ctx: BenchContext) -> ModeRun:
    """The documentation's blocking loop, one thread per message, in a child process."""
    log_path = ctx.log_dir / "mode-a-doc-loop.log"
    config = workload_config(ctx.seed)
    with (
        SandboxProcess(config, ctx.log_dir / "mode-a-sandbox.log") as sandbox,
        Sampler() as sampler,
    ):
        proc = _python_module("bench.doc_loop", log_path)
        try:
            assert proc.stdout is not None
            if not proc.stdout.readline():
                raise RuntimeError(f"the doc loop did not start:\n{_tail(log_path)}")
            sampler.watch("process", proc.pid)
            sampler.begin()
            ids, _ = create_messages(sandbox.url, config.api_key, ctx.messages)
            ctx.say(f"a: {len(ids)} messages sent; one thread each, until {DOC_GIVE_UP:g} s")
            started = time.time()
            job = {
                "base_url": sandbox.url,
                "api_key": config.api_key,
                "ids": ids,
                "interval": DOC_INTERVAL,
                "give_up": DOC_GIVE_UP,
            }
            try:
                out, _ = proc.communicate(
                    json.dumps(job) + "\n", timeout=DOC_GIVE_UP + ctx.margin + 60
                )
            except subprocess.TimeoutExpired:
                raise RuntimeError(
                    f"the doc loop did not finish in time:\n{_tail(log_path)}"
                ) from None
            wall = time.time() - started
            resources = sampler.end()
        finally:
            _stop(proc)
        truths = sandbox.truths()
    lines = out.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"the doc loop failed ({proc.returncode}):\n{_tail(log_path)}")
    report = json.loads(lines[-1])
    results: dict[str, dict[str, Any]] = report["results"]
    observations = {
        m: Observation(
            outcome=str(r["outcome"]),
            started_at=float(r["started_at"]),
            known_at=float(r["known_at"]),
            polls=int(r["checks"]),
        )
        for m, r in results.items()
    }
    cpu = report.get("cpu") or {}
    # The child's own clock is exact; the sampler's last look at a process that has since
    # exited may be up to one sampling interval old.
    cpu_s = float(cpu["end"] - cpu["ready"]) if cpu else resources["process"]["cpu_s"]
    return ModeRun(
        letter="a",
        title=MODES["a"].title,
        deadline=DOC_GIVE_UP,
        truths=truths,
        observations=observations,
        resources=resources,
        cpu_s=cpu_s,
        rss_peak_mib=resources["process"]["rss_peak_mib"],
        wall_s=wall,
        last_check_before=DOC_INTERVAL,
        extra={"errors": sum(int(r["errors"]) for r in results.values())},
        notes=["CPU and RSS: the child process running the loops (the sandbox is elsewhere)"],
    )


# ------------------------------------------------------------------ modes b and c


@register("b", "track_message, polling (real worker)")
def run_polling(ctx: BenchContext) -> ModeRun:
    """``track_message`` on a real worker subprocess (threads pool)."""
    return _run_tracker(ctx, "b", push=False)


@register("c", "track_message + webhook push (real worker)", requires="smsbat_tracker.webhook")
def run_push(ctx: BenchContext) -> ModeRun:
    """As b, and the sandbox pushes every status change to the webhook receiver."""
    return _run_tracker(ctx, "c", push=True)


def _slow_answers(sandbox_url: str, rate: float, read_timeout: float) -> None:
    """Make the sandbox answer ``rate`` of the status requests only past the read timeout
    (the tracker gives up on those and asks again)."""
    answer = httpx.post(
        f"{sandbox_url}/sandbox/faults",
        json={"slow_rate": rate, "slow_seconds": read_timeout + 2.0},
        timeout=10,
    )
    answer.raise_for_status()


def _run_tracker(ctx: BenchContext, letter: str, *, push: bool) -> ModeRun:
    config = workload_config(ctx.seed)
    # The settings name the sandbox, which (in push mode) must know the receiver first.
    sandbox_log = ctx.log_dir / f"mode-{letter}-sandbox.log"
    sandbox = SandboxProcess(config, sandbox_log)
    token = secrets.token_urlsafe(24) if push else None
    prefix = f"bench-{letter}-{uuid.uuid4().hex[:8]}"
    settings = _settings(ctx, sandbox.url, config.api_key, prefix, webhook_token=token)
    app = _use_settings(settings)
    from smsbat_tracker.celery.track import track_message
    from smsbat_tracker.tools.recipes import record_outcome, recorded_key

    _clean_redis(ctx)
    worker_log = ctx.log_dir / f"mode-{letter}-worker.log"
    rdb = redis.Redis.from_url(ctx.redis_url, decode_responses=True)
    label = f"bench-{letter}"
    key = recorded_key(app, label)
    extra: dict[str, Any] = {
        "worker_concurrency": ctx.concurrency,
        "worker_pool": ctx.pool,
        "callbacks": "tracking worker" if ctx.shared_worker else "own worker",
    }
    notes = ["CPU and RSS: the celery worker process and its children"]
    with contextlib.ExitStack() as stack:
        stack.callback(rdb.close)
        sampler = stack.enter_context(Sampler(redis_url=ctx.redis_url))
        push_url = None
        if push:
            url, pid = stack.enter_context(
                _webhook_host(settings, ctx.log_dir / f"mode-{letter}-webhook.log")
            )
            sampler.watch("receiver", pid)
            push_url = f"{url}/webhook?token={token}"
        sandbox = stack.enter_context(
            SandboxProcess(
                workload_config(ctx.seed, push_url=push_url), sandbox_log, port=sandbox.port
            )
        )
        if ctx.slow_rate:
            _slow_answers(sandbox.url, ctx.slow_rate, settings.read_timeout)
            extra["slow_rate"] = ctx.slow_rate
        # One threads worker per core, as the README advises; a prefork worker forks its own.
        count = ctx.processes if ctx.pool == "threads" else 1
        workers = [
            stack.enter_context(
                worker_process(
                    settings,
                    concurrency=ctx.concurrency,
                    pool=ctx.pool,
                    queues=_tracking_queues(ctx),
                    log_path=str(worker_log),
                    app=ctx.worker_app,
                )
            )
            for _ in range(count)
        ]
        worker, others = workers[0], workers[1:]
        sampler.watch("worker", *(w.pid for w in workers))
        extra["worker_processes"] = count
        others += _callbacks_worker(stack, ctx, settings, letter, sampler)
        extra["worker_start_s"] = round(
            _wait_worker_ready(app, worker, worker_log, others=others), 2
        )
        extra["worker_idle_cpu_per_s"] = round(_idle_cpu_rate(*(w.pid for w in workers)), 4)
        sampler.begin()
        ids, _ = create_messages(sandbox.url, config.api_key, ctx.messages)
        started: dict[str, float] = {}
        done = record_outcome.s(label=label)
        begin = time.time()
        for message_id in ids:
            started[message_id] = time.time()
            track_message.delay(
                message_id,
                deadline=ctx.deadline,
                on_delivered=done,
                on_failed=done,
                on_timeout=done,
            )
        extra["enqueue_s"] = round(time.time() - begin, 3)
        ctx.say(
            f"{letter}: {len(ids)} messages sent and tracked in {extra['enqueue_s']:.1f} s; "
            f"waiting up to {ctx.deadline:g} s + {ctx.margin:g} s"
        )
        give_up = time.time() + ctx.deadline + ctx.margin
        while rdb.llen(key) < len(ids) and time.time() < give_up:
            gone = [w.returncode for w in workers if w.poll() is not None]
            if gone:
                notes.append(f"a worker exited early with {gone[0]}")
                break
            time.sleep(0.5)
        # Pending callbacks after the first full count would be duplicates: look once more.
        time.sleep(1.0)
        wall = time.time() - begin
        resources = sampler.end()
        entries = [json.loads(e) for e in rdb.lrange(key, 0, -1)]
        truths = sandbox.truths()
    _clean_redis(ctx, prefix)
    app.close_engine()

    observations: dict[str, Observation] = {}
    duplicates = 0
    for entry in entries:
        result = entry["result"]
        message_id = str(result["message_id"])
        if message_id in observations:
            duplicates += 1
            continue
        observations[message_id] = Observation(
            outcome=str(result["outcome"]),
            started_at=started.get(message_id, begin),
            known_at=float(entry["recorded_at"]),
            source=result.get("source"),
            polls=result.get("polls"),
        )
    cpu_s = float(resources["worker"]["cpu_s"])
    notes.append(_callbacks_note(ctx, resources, extra))
    if push:
        extra["receiver_cpu_s"] = resources["receiver"]["cpu_s"]
        extra["receiver_rss_peak_mib"] = resources["receiver"]["rss_peak_mib"]
        notes.append("the webhook receiver ran in its own process: its CPU is shown apart")
    return ModeRun(
        letter=letter,
        title=MODES[letter].title,
        deadline=ctx.deadline,
        truths=truths,
        observations=observations,
        resources=resources,
        cpu_s=cpu_s,
        rss_peak_mib=resources["worker"]["rss_peak_mib"],
        wall_s=wall,
        duplicates=duplicates,
        extra=extra,
        notes=notes,
    )


# ------------------------------------------------------------------ mode d

# Per-message callbacks cost one task each; past this size the campaign runs without them
# and the outcomes come from the campaign's own records (which cannot hold two per message).
CAMPAIGN_CALLBACKS_UP_TO = 20_000


@register("d", "track_campaign, batched checks (real worker)")
def run_campaign(ctx: BenchContext) -> ModeRun:
    """``track_campaign`` on a real prefork worker (``--processes``, one per core by default)."""
    config = workload_config(ctx.seed)
    prefix = f"bench-d-{uuid.uuid4().hex[:8]}"
    processes = ctx.processes
    extra: dict[str, Any] = {"worker_pool": f"prefork x{processes}"}
    notes = ["CPU and RSS: the celery worker process and its children"]
    _clean_redis(ctx)
    rdb = redis.Redis.from_url(ctx.redis_url, decode_responses=True)
    with contextlib.ExitStack() as stack:
        stack.callback(rdb.close)
        sandbox = stack.enter_context(SandboxProcess(config, ctx.log_dir / "mode-d-sandbox.log"))
        settings = _settings(ctx, sandbox.url, config.api_key, prefix)
        extra["rate_limit"] = settings.rate_limit
        app = _use_settings(settings)
        stack.callback(app.close_engine)
        from smsbat_tracker.celery.campaigns import track_campaign
        from smsbat_tracker.tools.recipes import record_outcome, recorded_key

        sampler = stack.enter_context(Sampler(redis_url=ctx.redis_url))
        worker_log = ctx.log_dir / "mode-d-worker.log"
        worker = stack.enter_context(
            worker_process(
                settings,
                concurrency=processes,
                pool="prefork",
                queues=_tracking_queues(ctx),
                log_path=str(worker_log),
            )
        )
        sampler.watch("worker", worker.pid)
        others = _callbacks_worker(stack, ctx, settings, "d", sampler)
        extra["worker_start_s"] = round(
            _wait_worker_ready(app, worker, worker_log, others=others), 2
        )
        sampler.begin()
        ids, _ = create_messages(sandbox.url, config.api_key, ctx.messages)
        campaign_id = f"bench-{uuid.uuid4().hex[:8]}"
        per_message = len(ids) <= CAMPAIGN_CALLBACKS_UP_TO
        done = record_outcome.s(label="bench-d")
        callbacks = (
            {"on_delivered": done, "on_failed": done, "on_timeout": done} if per_message else {}
        )
        begin = time.time()
        track_campaign.delay(
            campaign_id,
            ids,
            deadline=ctx.deadline,
            on_report=record_outcome.s(label="bench-d-report"),
            **callbacks,
        )
        ctx.say(
            f"d: {len(ids)} messages sent and tracked as one campaign; "
            f"waiting up to {ctx.deadline:g} s + {ctx.margin:g} s"
        )
        report_key = recorded_key(app, "bench-d-report")
        callback_key = recorded_key(app, "bench-d")
        give_up = time.time() + ctx.deadline + ctx.margin
        while not rdb.llen(report_key) and time.time() < give_up:
            if worker.poll() is not None:
                notes.append(f"the worker exited early with {worker.returncode}")
                break
            time.sleep(0.5)
        if per_message:  # the last callbacks may still be on their way
            deadline = time.time() + 10
            while rdb.llen(callback_key) < len(ids) and time.time() < deadline:
                time.sleep(0.2)
            time.sleep(1.0)  # and anything after the full count would be a duplicate
        wall = time.time() - begin
        resources = sampler.end()
        keys = app.engine.keys
        meta = rdb.hgetall(keys.campaign(campaign_id))
        records = rdb.hgetall(keys.campaign_outcomes(campaign_id))
        reports = [json.loads(e)["result"] for e in rdb.lrange(report_key, 0, -1)]
        callbacks_seen = [json.loads(e)["result"] for e in rdb.lrange(callback_key, 0, -1)]
        truths = sandbox.truths()
    _clean_redis(ctx, prefix)

    started_at = float(meta.get("started_at", begin))
    observations = {
        str(m): Observation(
            outcome=str(rec["o"]),
            started_at=started_at,
            known_at=started_at + float(rec["t"]),
        )
        for m, rec in ((m, json.loads(raw)) for m, raw in records.items())
    }
    duplicates = len(callbacks_seen) - len({r["message_id"] for r in callbacks_seen})
    if per_message:
        extra["callbacks"] = len(callbacks_seen)
        missing = len(ids) - len({r["message_id"] for r in callbacks_seen})
        if missing:
            notes.append(f"{missing} per-message callbacks never arrived")
    else:
        notes.append(
            f"no per-message callbacks above {CAMPAIGN_CALLBACKS_UP_TO:,} messages: the "
            "outcomes come from the campaign's records, one per message by construction"
        )
    extra["reports"] = len(reports)
    if reports:
        report = reports[0]
        extra["report"] = {
            k: report.get(k)
            for k in ("outcomes", "delivery_rate", "time_to_final_p50", "time_to_final_p95")
        }
    redis_fig = resources.get("redis") or {}
    if redis_fig:
        extra["redis_bytes_per_message"] = round(
            redis_fig["growth_mib"] * 1024 * 1024 / max(len(ids), 1)
        )
    notes.append(_callbacks_note(ctx, resources, extra))
    notes.append("detection: when the campaign recorded the outcome (its callback follows)")
    return ModeRun(
        letter="d",
        title=MODES["d"].title,
        deadline=ctx.deadline,
        truths=truths,
        observations=observations,
        resources=resources,
        cpu_s=float(resources["worker"]["cpu_s"]),
        rss_peak_mib=resources["worker"]["rss_peak_mib"],
        wall_s=wall,
        duplicates=duplicates + max(len(reports) - 1, 0),
        extra=extra,
        notes=notes,
    )
