"""The ``smsbat-tracker`` command: demo, sandbox, status, campaigns, config check."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import redis
from kombu.exceptions import OperationalError

from smsbat_tracker._version import __version__
from smsbat_tracker.errors import AuthenticationError, ConfigError, MessageNotFound, SmsbatError
from smsbat_tracker.provider.models import validate_message_id
from smsbat_tracker.redis_url import safe_redis_url

# The Celery face, the engine and the store load in the commands that use them: `sandbox`,
# `demo` and `--help` start without them.
if TYPE_CHECKING:
    from smsbat_tracker.config import Settings

__all__ = ["main"]


def _status(args: argparse.Namespace) -> int:
    from smsbat_tracker.celery.track import get_status
    from smsbat_tracker.engine.session import iso
    from smsbat_tracker.worker import app

    validate_message_id(args.message_id)
    try:
        # Through the cache: repeated calls are free, and the history comes with it.
        status = get_status(args.message_id, app=app)
        history = app.engine.cache.history(args.message_id)
    except redis.RedisError as exc:
        from smsbat_tracker.provider.client import SmsbatClient

        where = safe_redis_url(app.settings.redis_url)
        print(
            f"smsbat-tracker: cannot reach Redis at {where} ({type(exc).__name__}): "
            "asked the API directly; no cache, no history",
            file=sys.stderr,
        )
        with SmsbatClient.from_settings(app.settings) as api:
            status, history = api.get_status(args.message_id), []
    print(json.dumps(status.to_json_dict(), indent=2))
    for entry in history:
        print(f"  {iso(entry.observed_at)}  {entry.deliverystatus:<16} ({entry.source})")
    return 0


def _read_ids(source: str) -> list[str]:
    stream = sys.stdin if source == "-" else open(source, encoding="utf-8")  # noqa: SIM115
    with stream:
        ids = [line.strip() for line in stream if line.strip() and not line.startswith("#")]
    for message_id in ids:
        validate_message_id(message_id)
    return ids


def print_report(
    report: dict[str, Any], out: TextIO | None = None, *, failed: bool = False
) -> None:
    """A campaign report as a small table; with ``failed``, then the ids that failed and
    timed out, one a line."""
    out = out or sys.stdout
    rows = [(k, str(v)) for k, v in report["outcomes"].items()]
    rows += [
        ("total", str(report["total"])),
        ("pending", str(report["pending"])),
        ("delivery rate", f"{(report['delivery_rate'] or 0) * 100:.1f} %"),
        ("time to final p50", f"{report['time_to_final_p50']} s"),
        ("time to final p95", f"{report['time_to_final_p95']} s"),
        ("viber with fallback data", str(report["fallback"]["extended"])),
        ("sms fallback used", str(report["fallback"]["used"])),
    ]
    rows += [
        ("cost" if currency == "unknown" else f"cost ({currency})", f"{amount:.4f}")
        for currency, amount in report["cost"].items()
    ]
    if "unknown" in report["cost"]:
        rows.append(("cost currency", "not given by the API"))
    width = max(len(k) for k, _ in rows)
    print(f"campaign {report['campaign_id']}", file=out)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}", file=out)
    if failed:
        for title, key in (("failed", "failed_ids"), ("timed out", "timeout_ids")):
            ids = report.get(key) or []
            print(f"{title} ({len(ids)}):", file=out)
            for message_id in ids:
                print(f"  {message_id}", file=out)


def _write_page(campaign_id: str, path: str) -> int:
    """``campaign report ID --html PATH``: the page, written whole or not at all."""
    from smsbat_tracker.engine.campaign.registry import validate_campaign_id
    from smsbat_tracker.errors import MissingExtra
    from smsbat_tracker.report import page_of
    from smsbat_tracker.worker import app

    validate_campaign_id(campaign_id)
    try:
        page = page_of(app.campaigns, campaign_id)
    except MissingExtra as exc:
        print(f"smsbat-tracker: {exc}", file=sys.stderr)
        return 2
    if page is None:
        print(f"smsbat-tracker: no campaign {campaign_id!r}", file=sys.stderr)
        return 1
    target = Path(path)
    # Beside the target, then renamed over it: a reader never sees half a page.
    partial = target.with_name(f".{target.name}.partial")
    try:
        partial.write_text(page, encoding="utf-8")
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    print(f"campaign {campaign_id}: report written to {target} ({len(page) // 1024} KiB)")
    return 0


def _campaign(args: argparse.Namespace) -> int:
    from smsbat_tracker.celery.campaigns import get_campaign_report, track_campaign
    from smsbat_tracker.worker import app

    if args.action == "report":
        if args.html is not None:
            return _write_page(args.campaign_id, args.html)
        report = get_campaign_report(args.campaign_id, app=app)
        if report is None:
            print(f"smsbat-tracker: no campaign {args.campaign_id!r}", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            print_report(report, failed=args.failed)
        return 0
    ids = _read_ids(args.file)
    if not ids:
        print("smsbat-tracker: no message ids given", file=sys.stderr)
        return 2
    runner = app.campaigns
    known = runner.meta(args.campaign_id)
    if known:
        # A campaign id is tracked once: the workers would drop a second start.
        total = int(known.get("total") or 0)
        finished = runner.stored_report(args.campaign_id) is not None
        print(
            f"campaign {args.campaign_id}: started before, with {total} messages "
            f"({'finished' if finished else 'still tracking'}); not started again",
            file=sys.stderr,
        )
        if args.no_wait:
            return 0
    else:
        track_campaign.delay(args.campaign_id, ids, deadline=args.deadline)
        total = len(set(ids))
        print(f"campaign {args.campaign_id}: tracking {total} messages", file=sys.stderr)
        if args.no_wait:
            return 0
    give_up = campaign_give_up(app.settings, runner.meta(args.campaign_id))
    with _Progress(total) as bar:
        report = None
        while report is None:
            bar.show(runner.progress(args.campaign_id))
            report = runner.stored_report(args.campaign_id)
            if report is None:
                if time.time() > give_up:
                    break
                time.sleep(0.5)
        if report is not None:
            bar.show({"done": total})
    if report is None:
        progress = runner.progress(args.campaign_id)
        print(
            f"smsbat-tracker: campaign {args.campaign_id} has no report past its deadline "
            "and the re-drive bound: "
            f"{progress['total'] - progress['done']} of {progress['total']} messages have no "
            "outcome; are the workers running? (`smsbat-tracker campaign report` shows it later)",
            file=sys.stderr,
        )
        return 1
    print_report(report, failed=args.failed)
    return 0


class _Progress:
    """The campaign's progress on stderr: a bar on a terminal, else a line every 10 %."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.tty = sys.stderr.isatty()
        self.bar: Any = None
        self.tenths = 0

    def __enter__(self) -> _Progress:
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, unit="msg", desc="final", file=sys.stderr)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.bar is not None:
            self.bar.close()

    def show(self, progress: dict[str, int]) -> None:
        """Show how many of the messages have an outcome (and how many of each)."""
        done = min(progress.get("done", 0), self.total)
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix({k: v for k, v in progress.items() if k not in ("total", "done")})
            return
        tenths = done * 10 // self.total if self.total else 10
        if tenths > self.tenths:
            self.tenths = tenths
            print(f"final: {done}/{self.total} ({tenths * 10} %)", file=sys.stderr)


# Past the deadline and the re-drive bound, a report is owed: the last checks and the
# report's own writing get this much more.
_WAIT_SLACK = 15.0


def campaign_give_up(settings: Settings, meta: dict[str, str]) -> float:
    """When ``campaign start`` stops waiting: the deadline plus the re-drive bound."""
    from smsbat_tracker.celery import redrive

    deadline_at = float(meta.get("deadline_at") or time.time() + settings.deadline)
    return (
        deadline_at
        + settings.deadline_grace
        + settings.max_delay
        + settings.min_interval
        + settings.redrive_after
        + redrive.HEARTBEAT
        + _WAIT_SLACK
    )


def _check_config(args: argparse.Namespace) -> int:
    from smsbat_tracker.config import env_name, load_settings

    # Code that only enqueues needs no credentials; a worker does (--worker).
    settings = load_settings(credentials=args.worker)
    # By the variable that sets each. SecretStr fields render as '**********'; REDIS_URL is
    # shown without its password.
    for name, value in settings.model_dump().items():
        print(f"{env_name(name)} = {safe_redis_url(value) if name == 'redis_url' else value}")
    if not settings.has_credentials:
        print(
            "note: no API credentials: enough to enqueue and to receive pushes; a worker "
            "needs SMSBAT_API_KEY (or SMSBAT_USERNAME and SMSBAT_PASSWORD)",
            file=sys.stderr,
        )
    return _ping(settings) if args.ping else 0


def _ping(settings: Settings) -> int:
    """Reach Redis and the API with these settings: one line each; 1 when either fails."""
    from smsbat_tracker.store.connections import redis_client

    failed = 0
    where = safe_redis_url(settings.redis_url)
    try:
        client = redis_client(settings, socket_connect_timeout=3)
        client.ping()
        client.close()
        print(f"redis: ok ({where})")
    except redis.RedisError as exc:
        from smsbat_tracker.store.connections import unknown_master

        reason = unknown_master(settings) or type(exc).__name__
        print(f"redis: cannot reach {where}: {reason}", file=sys.stderr)
        failed = 1
    from smsbat_tracker.provider.client import SmsbatClient

    if not settings.has_credentials:
        print("api: not asked (no credentials)")
        return failed
    try:
        with SmsbatClient.from_settings(settings) as api:
            # An id nobody sent: a 404 means the API took the credentials.
            api.get_status("smsbat-tracker-ping")
        print(f"api: ok ({settings.base_url})")
    except MessageNotFound:
        print(f"api: ok, credentials accepted ({settings.base_url})")
    except AuthenticationError:
        print(f"api: credentials refused by {settings.base_url}", file=sys.stderr)
        failed = 1
    except SmsbatError as exc:
        print(f"api: {settings.base_url}: {exc}", file=sys.stderr)
        failed = 1
    return failed


def _health(args: argparse.Namespace) -> int:
    """A worker's health, one line per check; 1 when any fails (within 5 s)."""
    import httpx

    from smsbat_tracker.celery.health import PING_TIMEOUT, STALE_AFTER, ping_options
    from smsbat_tracker.config import load_settings
    from smsbat_tracker.store.connections import redis_client, unknown_master
    from smsbat_tracker.store.keys import Keys

    settings = load_settings(credentials=False)
    where = safe_redis_url(settings.redis_url)
    client = redis_client(settings, **ping_options())
    try:
        client.ping()
        print(f"redis: ok ({where})")
        beats = client.zrevrange(Keys(settings.key_prefix).holders(), 0, 0, withscores=True)
    except redis.RedisError as exc:
        wrong = unknown_master(settings)
        reason = wrong or f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        print(f"redis: cannot reach {where}: {reason}", file=sys.stderr)
        return 1
    finally:
        client.close()
    port = args.port or settings.metrics_port
    if port:
        url = f"http://127.0.0.1:{port}/healthz"
        try:
            answer = httpx.get(url, timeout=2 * PING_TIMEOUT)
            problems = answer.json().get("problems", []) if answer.status_code != 200 else []
        except (httpx.HTTPError, ValueError) as exc:
            problems = [f"{url}: {type(exc).__name__}"]
        for problem in problems:
            print(f"worker: {problem}", file=sys.stderr)
        if problems:
            return 1
        print(f"worker: ok ({url})")
        return 0
    # No metrics port to ask: some worker's re-driver beats.
    age = time.time() - float(beats[0][1]) if beats else None
    if age is None or age > STALE_AFTER:
        since = "ever" if age is None else f"{age:.1f} s"
        print(f"worker: no re-driver has beaten for {since}", file=sys.stderr)
        return 1
    print(f"worker: a re-driver beat {age:.1f} s ago")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``smsbat-tracker`` command."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="smsbat-tracker", description="Track SMSBAT message delivery with Celery."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "demo", help="run the demo (embedded Redis, sandbox API, a worker)", add_help=False
    )
    sub.add_parser("sandbox", help="serve the simulated SMSBAT API", add_help=False)
    sub.add_parser("webhook", help="serve the webhook receiver", add_help=False)
    status = sub.add_parser(
        "status",
        help="print one message's status and history (cached, else from the API; from the "
        "API alone when Redis is out of reach)",
    )
    status.add_argument("message_id")
    check = sub.add_parser(
        "check-config", help="validate the settings and print them (secrets hidden)"
    )
    check.add_argument(
        "--ping", action="store_true", help="also reach Redis and the API with the credentials"
    )
    check.add_argument(
        "--worker",
        action="store_true",
        help="check what a worker needs too: API credentials (enqueuing needs none)",
    )
    health = sub.add_parser(
        "health",
        help="exit 0 when Redis answers and a worker beats (its /healthz, given a metrics "
        "port), else 1; within 5 s",
    )
    health.add_argument(
        "--port",
        type=int,
        default=0,
        help="the worker's metrics port on this host (default: SMSBAT_METRICS_PORT; none: "
        "any worker's beat in Redis)",
    )
    campaign = sub.add_parser("campaign", help="track a campaign, or show its report")
    actions = campaign.add_subparsers(dest="action", required=True)
    start = actions.add_parser("start", help="track message ids from a file (or - for stdin)")
    start.add_argument("campaign_id")
    start.add_argument("file", help="one message id per line; - reads stdin")
    start.add_argument("--deadline", type=float, default=None, help="seconds (default: settings)")
    start.add_argument("--no-wait", action="store_true", help="enqueue and exit")
    start.add_argument(
        "--failed", action="store_true", help="list the ids that failed and timed out"
    )
    report = actions.add_parser("report", help="print a campaign's report")
    report.add_argument("campaign_id")
    report.add_argument("--json", action="store_true", help="print JSON")
    report.add_argument(
        "--html",
        metavar="PATH",
        help="write the report as one self-contained HTML page with charts (needs the "
        "'report' extra: pip install 'smsbat-tracker[report]')",
    )
    report.add_argument(
        "--failed", action="store_true", help="list the ids that failed and timed out"
    )

    args, rest = parser.parse_known_args(argv)
    try:
        if args.command == "demo":
            from smsbat_tracker.tools.demo import main as demo_main

            return demo_main(rest)
        if args.command == "sandbox":
            from smsbat_tracker.tools.sandbox import main as sandbox_main

            return sandbox_main(rest, prog="smsbat-tracker sandbox")
        if args.command == "webhook":
            from smsbat_tracker.webhook.serve import main as webhook_main

            return webhook_main(rest)
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        if args.command == "status":
            return _status(args)
        if args.command == "campaign":
            return _campaign(args)
        if args.command == "health":
            return _health(args)
        return _check_config(args)
    except ConfigError as exc:
        print(f"smsbat-tracker: {exc}", file=sys.stderr)
        return 2
    except (redis.RedisError, OperationalError) as exc:
        from smsbat_tracker.config import load_settings

        where = safe_redis_url(load_settings(credentials=False).redis_url)
        reason = str(exc).split("\n")[0][:200]
        print(f"smsbat-tracker: cannot reach Redis at {where}: {reason}", file=sys.stderr)
        return 1
    except (SmsbatError, OSError) as exc:
        print(f"smsbat-tracker: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
