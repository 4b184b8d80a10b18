"""Figures, ratios against mode a, the targets, the printed tables and the JSON file."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.metrics import PHASE_S, evaluate, per_message, push_latency
from bench.modes import ModeRun

__all__ = [
    "RESULTS_DIR",
    "figures",
    "machine",
    "ratios",
    "render",
    "targets",
    "write_json",
]

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# The targets.
POLL_CALLS_RATIO = 0.7  # (b, d) calls/message at most this times (a)'s
POLL_P95_S = 10.0  # (b, d) p95 detection delay
PUSH_CALLS = 1.0  # (c) API calls per message
PUSH_P99_S = 0.250  # (c) p99 webhook-to-callback
CAMPAIGN_SCALE = 100_000  # (d) messages in flight for the memory targets
CAMPAIGN_RSS_MB = 300.0  # (d) peak worker RSS, in MB (10^6 bytes)
CAMPAIGN_REDIS_BYTES = 1_000.0  # (d) Redis growth per message
CHECKS_PER_S = 2_000  # (d) peak status checks per second, when the rate limit allows
CHECKS_SCALE = 10_000  # (d) messages for the throughput target to be reachable
RATE_SLACK = 0.05  # (d) the busiest second may exceed the rate limit by this much


def figures(run: ModeRun) -> dict[str, Any]:
    """Every figure of one mode, JSON-ready."""
    ev = evaluate(
        run.truths,
        run.observations,
        deadline=run.deadline,
        last_check_before=run.last_check_before,
    )
    n = max(ev["messages"], 1)
    fig: dict[str, Any] = {
        "letter": run.letter,
        "title": run.title,
        "deadline_s": run.deadline,
        **ev,
        "duplicates": run.duplicates,
        "cpu_s": round(run.cpu_s, 3),
        "cpu_s_per_1k": round(run.cpu_s / n * 1000, 3),
        "rss_peak_mib": run.rss_peak_mib,
        "redis": run.resources.get("redis"),
        "wall_s": round(run.wall_s, 2),
        "extra": run.extra,
        "notes": run.notes,
    }
    redis_cpu = (run.resources.get("redis_server") or {}).get("cpu_s")
    if redis_cpu is not None:
        fig["redis_cpu_s_per_1k"] = round(redis_cpu / n * 1000, 3)
    if "receiver_cpu_s" in run.extra:
        total = run.cpu_s + float(run.extra["receiver_cpu_s"])
        fig["cpu_total_s_per_1k"] = round(total / n * 1000, 3)
    if any(t["pushes"] for t in run.truths):
        fig["push_latency_s"] = push_latency(run.truths, run.observations)
    fig["series"] = run.resources.get("series", [])
    fig["per_message"] = per_message(run.truths, run.observations)
    return fig


def _ratio(x: float | None, base: float | None) -> float | None:
    if x is None or base is None or base == 0:
        return None
    return round(x / base, 3)


def ratios(figs: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Calls/message, p95 detection delay and CPU of each mode as multiples of mode a's."""
    base = figs.get("a")
    if base is None:
        return {}
    out: dict[str, dict[str, float | None]] = {}
    for letter, fig in figs.items():
        out[letter] = {
            "calls_per_message": _ratio(fig["calls_per_message"], base["calls_per_message"]),
            "p95_delay": _ratio(fig["detection_delay_s"]["p95"], base["detection_delay_s"]["p95"]),
            "cpu": _ratio(fig.get("cpu_total_s_per_1k", fig["cpu_s_per_1k"]), base["cpu_s_per_1k"]),
        }
    return out


def _target(
    name: str, value: float | None, limit: float, shown: str, *, at_least: bool = False
) -> dict[str, Any]:
    """One target; ``holds`` is None when this run cannot judge it."""
    holds = None if value is None else (value >= limit if at_least else value <= limit)
    return {"target": name, "value": value, "limit": limit, "shown": shown, "holds": holds}


def _all_right(name: str, fig: dict[str, Any]) -> dict[str, Any]:
    """The target "every outcome right": no wrong, missing or duplicate outcome."""
    bad = fig["wrong"] + fig["missing"] + fig["duplicates"]
    shown = (
        f"{fig['right']}/{fig['messages']} right, {fig['wrong']} wrong, "
        f"{fig['missing']} missing, {fig['duplicates']} duplicate"
    )
    return _target(name, float(bad), 0.0, shown)


def targets(
    figs: dict[str, dict[str, Any]], rat: dict[str, dict[str, float | None]]
) -> list[dict[str, Any]]:
    """The issue's targets that this run can judge."""
    out: list[dict[str, Any]] = []
    # The polling targets hold for both polling paths: per-message tasks and campaigns.
    for letter in ("b", "d"):
        fig = figs.get(letter)
        if fig is None:
            continue
        r = rat.get(letter, {}).get("calls_per_message")
        out.append(
            _target(
                f"({letter}) calls/message <= {POLL_CALLS_RATIO}x (a)",
                r,
                POLL_CALLS_RATIO,
                "-" if r is None else f"{r:.2f}x",
            )
        )
        p95 = fig["detection_delay_s"]["p95"]
        out.append(
            _target(
                f"({letter}) p95 detection <= {POLL_P95_S:g} s",
                p95,
                POLL_P95_S,
                "-" if p95 is None else f"{p95:.2f} s",
            )
        )
        if letter == "b":
            out.append(_all_right("(b) every outcome right", fig))
    c = figs.get("c")
    if c is not None:
        out.append(
            _target(
                f"(c) calls/message <= {PUSH_CALLS:g}",
                c["calls_per_message"],
                PUSH_CALLS,
                f"{c['calls_per_message']:.2f}",
            )
        )
        p99 = (c.get("push_latency_s") or {}).get("p99")
        out.append(
            _target(
                f"(c) p99 webhook->callback <= {PUSH_P99_S * 1000:g} ms",
                p99,
                PUSH_P99_S,
                "-" if p99 is None else f"{p99 * 1000:.0f} ms",
            )
        )
        out.append(_all_right("(c) every outcome right", c))
    d = figs.get("d")
    if d is not None:
        # Memory targets are for a campaign at scale: below it, fixed costs dominate (and
        # the bench's own per-message callback records sit in Redis).
        at_scale = d["messages"] >= CAMPAIGN_SCALE
        unjudged = "" if at_scale else f" (judged from {CAMPAIGN_SCALE:,} msgs)"
        mb = d["rss_peak_mib"] * 1.048576
        out.append(
            _target(
                f"(d) peak worker RSS <= {CAMPAIGN_RSS_MB:g} MB",
                mb if at_scale else None,
                CAMPAIGN_RSS_MB,
                f"{mb:.0f} MB at {d['messages']:,} msgs{unjudged}",
            )
        )
        per_msg = d["extra"].get("redis_bytes_per_message")
        out.append(
            _target(
                f"(d) Redis <= {CAMPAIGN_REDIS_BYTES:,.0f} B per message",
                per_msg if at_scale else None,
                CAMPAIGN_REDIS_BYTES,
                ("-" if per_msg is None else f"{per_msg:,} B") + unjudged,
            )
        )
        out.append(_all_right("(d) every outcome right, none lost or doubled", d))
        peak = d["peak_checks_per_s"]
        limit = float(d["extra"].get("rate_limit") or 0)
        limited = limit > 0
        if limited:
            out.append(
                _target(
                    f"(d) rate limit {limit:g}/s held within {RATE_SLACK:.0%} "
                    f"({d['extra'].get('worker_pool')})",
                    float(peak),
                    limit * (1 + RATE_SLACK),
                    f"peak {peak:,} in one second ({peak / limit - 1:+.1%})",
                )
            )
        # Judged only when the rate limit is off (with it on, the limit is the ceiling) and
        # at a size where that many checks can fall due within one second.
        big = d["messages"] >= CHECKS_SCALE
        why = (
            " (rate limited: not judged)"
            if limited
            else ("" if big else f" (judged from {CHECKS_SCALE:,} msgs)")
        )
        out.append(
            _target(
                f"(d) peak checks/s >= {CHECKS_PER_S:,} (rate limit off)",
                float(peak) if big and not limited else None,
                CHECKS_PER_S,
                f"{peak:,}{why}",
                at_least=True,
            )
        )
    return out


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += [
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    ]
    return "\n".join(lines)


def _f(x: float | None, fmt: str = ".2f", suffix: str = "") -> str:
    return "-" if x is None else f"{x:{fmt}}{suffix}"


def render(
    figs: dict[str, dict[str, Any]],
    rat: dict[str, dict[str, float | None]],
    tgts: list[dict[str, Any]],
    skipped: dict[str, str],
) -> str:
    """The printed report: two tables, push latency, notes and the targets."""
    rows1, rows2 = [], []
    for letter, fig in figs.items():
        d = fig["detection_delay_s"]
        r = rat.get(letter, {})
        rows1.append(
            [
                f"{letter}  {fig['title']}",
                str(fig["messages"]),
                _f(fig["calls_per_message"]),
                _f(r.get("calls_per_message"), ".2f", "x"),
                _f(d["p50"]),
                _f(d["p95"]),
                _f(d["max"]),
                _f(r.get("p95_delay"), ".2f", "x"),
                str(fig["right"]),
                str(fig["wrong"]),
                str(fig["missing"]),
            ]
        )
        redis_fig = fig.get("redis")
        cpu = fig.get("cpu_total_s_per_1k", fig["cpu_s_per_1k"])
        rows2.append(
            [
                letter,
                _f(cpu) + ("*" if "cpu_total_s_per_1k" in fig else ""),
                _f(r.get("cpu"), ".2f", "x"),
                _f(fig["rss_peak_mib"], ".1f"),
                "-"
                if not redis_fig
                else f"{redis_fig['peak_mib']:.1f} (+{redis_fig['growth_mib']:.1f})",
                _f(fig.get("redis_cpu_s_per_1k")),
                str(fig["peak_checks_per_s"]),
                _f(fig["wall_s"], ".0f"),
            ]
        )
    parts = [
        _table(
            [
                "mode",
                "msgs",
                "calls/msg",
                "vs a",
                "delay p50 s",
                "p95 s",
                "max s",
                "p95 vs a",
                "right",
                "wrong",
                "missing",
            ],
            rows1,
        ),
        "",
        _table(
            [
                "mode",
                "CPU s/1k msgs",
                "vs a",
                "peak RSS MiB",
                "Redis peak MiB (+growth)",
                "Redis CPU s/1k",
                "peak checks/s",
                "wall s",
            ],
            rows2,
        ),
    ]
    notes: list[str] = []
    for letter, fig in figs.items():
        if "cpu_total_s_per_1k" in fig:
            notes.append(
                f"* {letter}: worker {fig['cpu_s_per_1k']:.2f} + webhook receiver "
                f"{fig['extra']['receiver_cpu_s'] / max(fig['messages'], 1) * 1000:.2f} "
                f"CPU s/1k msgs (receiver peak RSS "
                f"{fig['extra']['receiver_rss_peak_mib']:.1f} MiB)"
            )
        lat = fig.get("push_latency_s")
        if lat and lat["count"]:
            notes.append(
                f"{letter}: webhook->callback p50 {_ms(lat['p50'])}, p95 {_ms(lat['p95'])}, "
                f"p99 {_ms(lat['p99'])}, max {_ms(lat['max'])} over {lat['count']} finals "
                f"pushed while tracked; {lat['before_tracking']} more pushed before their "
                f"tracker was enqueued (all: p99 {_ms(lat['all']['p99'])}); "
                f"{lat['final_by_poll']} finals seen by a poll first; "
                f"{lat['failed_pushes']} of {lat['pushes']} pushes failed"
                + _failures(lat.get("push_failures") or {})
            )
            early, later = lat[f"first_{PHASE_S:g}s"], lat[f"after_{PHASE_S:g}s"]
            notes.append(
                f"{letter}: webhook->callback p99 {_ms(early['p99'])} for the "
                f"{early['count']} pushed in the first {PHASE_S:g} s of tracking, "
                f"{_ms(later['p99'])} for the {later['count']} pushed later"
            )
        if fig["wrong_in_blind_window"]:
            notes.append(
                f"{letter}: {fig['wrong_in_blind_window']} of {fig['wrong']} wrong outcomes "
                "turned final after the loop's last check and before it gave up"
            )
        if fig["duplicates"]:
            notes.append(f"{letter}: {fig['duplicates']} callbacks fired twice")
        if fig["borderline"]:
            notes.append(f"{letter}: {fig['borderline']} borderline (final within 1 s of deadline)")
        idle = fig["extra"].get("worker_idle_cpu_per_s")
        if idle is not None:
            notes.append(
                f"{letter}: the idle worker(s) burn {idle:.3f} CPU s/s, "
                f"{idle * fig['wall_s']:.1f} s of its {fig['cpu_s']:.1f} s over this run"
            )
        errors = fig["extra"].get("errors")
        if errors:
            notes.append(f"{letter}: {errors} failed status requests")
        notes.extend(f"{letter}: {note}" for note in fig["notes"])
    notes.extend(f"{letter}: skipped, {why}" for letter, why in skipped.items())
    if notes:
        parts += ["", *notes]
    if tgts:
        rows = [
            [
                t["target"],
                t["shown"],
                "n/a" if t["holds"] is None else ("yes" if t["holds"] else "NO"),
            ]
            for t in tgts
        ]
        parts += ["", _table(["target", "measured", "holds"], rows)]
    parts += [
        "",
        "delay: true final_at to the moment the mode knew, over messages final before its "
        "deadline; ratios are what count on this shared machine.",
    ]
    return "\n".join(parts)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def machine() -> dict[str, Any]:
    """Where the run happened."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg": list(os.getloadavg()),
    }


def write_json(data: dict[str, Any], *, prefix: str = "") -> Path:
    """Write ``results/<prefix><timestamp>.json`` and ``results/<prefix>latest.json``."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    text = json.dumps(data, indent=1, sort_keys=False) + "\n"
    path = RESULTS_DIR / f"{prefix}{stamp}.json"
    path.write_text(text)
    (RESULTS_DIR / f"{prefix}latest.json").write_text(text)
    return path


def now_iso() -> str:
    """The current time, ISO-8601 UTC."""
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _failures(kinds: Mapping[str, int]) -> str:
    return f" ({', '.join(f'{kind} x{n}' for kind, n in kinds.items())})" if kinds else ""
