"""The demo: Redis, the simulated API and a real worker; send, track, print the outcomes.

``smsbat-tracker demo`` (or ``make demo``). With no ``REDIS_URL`` it starts a private
Redis-protocol server; the sandbox API runs in-process; the worker is a real
``celery worker`` subprocess. Nothing is sent to the real SMSBAT API.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import secrets
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from typing import Any

from smsbat_tracker.config import Settings, load_settings
from smsbat_tracker.log import configure_logging
from smsbat_tracker.provider.client import SmsbatClient
from smsbat_tracker.redis_url import safe_redis_url
from smsbat_tracker.store.connections import redis_client
from smsbat_tracker.tools.embedded import redis_url_or_embedded
from smsbat_tracker.tools.sandbox import SandboxConfig, SandboxServer
from smsbat_tracker.tools.serving import BackgroundServer
from smsbat_tracker.tools.workers import worker_process

__all__ = ["main", "run_demo"]

DEMO_RECIPIENTS = [
    ("+380501234501", "sms", "Your order #1001 is confirmed"),
    ("+380501234502", "viber_trans", "Your order #1002 has shipped"),
    ("+380501234503", "sms", "Your code is 481516"),
    ("+380501234504", "viber_otp", "Your code is 234223"),
    ("+380501234505", "sms", "Weekend sale: -20% on everything"),
    ("+380501234506", "viber_promo", "New arrivals are in"),
    ("+380501234507", "sms", "Your parcel is at the pick-up point"),
    ("+380501234508", "sms", "Appointment tomorrow at 10:00"),
]


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


@contextlib.contextmanager
def push_receiver(settings: Settings, sandbox: SandboxServer) -> Iterator[str]:
    """Serve the webhook and make the sandbox push every status change to it."""
    from smsbat_tracker.webhook import create_app

    token = settings.webhook_token.get_secret_value() if settings.webhook_token else ""
    with BackgroundServer(create_app(settings)) as web:
        sandbox.state.config = dataclasses.replace(
            sandbox.state.config, push_url=f"{web.url}/webhook?token={token}"
        )
        yield web.url


def run_demo(
    *, count: int = 6, deadline: float = 15.0, seed: int = 1, push: bool = False, out: Any = None
) -> int:
    """Run the demo; return 0 when every outcome matches the sandbox's truth.

    With ``push`` the sandbox also pushes each status change to the webhook receiver,
    which ends tracking at once (the ``source`` column then says ``push``).
    """
    out = out or sys.stdout
    configure_logging(level="WARNING")  # the table is the output; warnings still show
    count = max(1, min(count, len(DEMO_RECIPIENTS)))
    sandbox_config = SandboxConfig(
        median_final=2.0,
        p95_final=8.0,
        undeliverable_rate=0.2,
        never_final_rate=0.15,
        fallback_rate=0.5,
        seed=seed,
    )
    with redis_url_or_embedded() as redis_url, SandboxServer(sandbox_config) as sandbox:
        settings = load_settings(
            redis_url=redis_url,
            base_url=sandbox.url,
            api_key=sandbox_config.api_key,
            first_delay=1.0,
            max_delay=3.0,
            deadline=deadline,
            key_prefix=f"smsbat-demo-{uuid.uuid4().hex[:6]}",
            webhook_token=secrets.token_urlsafe(16),
        )
        # The Celery app reads the environment when first imported; give it these settings.
        os.environ.update(settings.to_env())
        from smsbat_tracker.worker import app

        app.reconfigure(settings)
        from smsbat_tracker.celery.track import track_message
        from smsbat_tracker.tools.recipes import record_outcome, recorded_key

        log_path = os.path.join(tempfile.gettempdir(), "smsbat-tracker-demo-worker.log")
        where = safe_redis_url(redis_url)  # never its password
        print(f"redis   {where}\nsandbox {sandbox.url}\nworker  log in {log_path}\n", file=out)
        with (
            worker_process(settings, log_path=log_path),
            SmsbatClient.from_settings(settings) as client,
            push_receiver(settings, sandbox) if push else contextlib.nullcontext() as web_url,
        ):
            if web_url:
                print(f"push mode: the sandbox pushes to {web_url}/webhook\n", file=out)
            messages = [
                {"from": "DemoShop", "to": to, "type": kind, "text": text}
                for to, kind, text in DEMO_RECIPIENTS[:count]
            ]
            sent = client.send_messages(messages)
            ids = sent.message_ids
            kinds = {m.messageId: messages[i]["type"] for i, m in enumerate(sent.messages)}
            sent_at = time.time()
            label = "demo"
            for message_id in ids:
                done = record_outcome.s(label=label)
                track_message.delay(message_id, on_delivered=done, on_failed=done, on_timeout=done)
            print(f"sent {len(ids)} messages; tracking them (deadline {deadline:g} s)...", file=out)
            r = redis_client(settings, decode_responses=True)
            key = recorded_key(app, label)
            give_up = time.monotonic() + deadline + 30
            while r.llen(key) < len(ids) and time.monotonic() < give_up:
                time.sleep(0.2)
            results = {e["result"]["message_id"]: e for e in map(json.loads, r.lrange(key, 0, -1))}
            r.close()
            app.close_engine()

        rows, right = [], 0
        for message_id in ids:
            truth = sandbox.state.truth(message_id)
            entry = results.get(message_id)
            result = entry["result"] if entry else {}
            final_at = truth["final_at"]
            in_time = final_at is not None and final_at <= sent_at + deadline
            expected = truth["final_status"] if in_time else "timeout"
            outcome = result.get("outcome", "missing")
            # A status that turned final within a second of the deadline may go either way.
            borderline = final_at is not None and abs(final_at - sent_at - deadline) < 1.0
            right += outcome == expected or (
                borderline and outcome in (truth["final_status"], "timeout")
            )
            body = result.get("status") or {}
            fallback = (
                "sms" if (body.get("extendedStatuses") or {}).get("sms") == "delivered" else ""
            )
            after = f"{entry['recorded_at'] - sent_at:.1f}" if entry else "-"
            rows.append(
                [
                    message_id,
                    str(kinds.get(message_id)),
                    outcome,
                    expected,
                    str(result.get("polls", "-")),
                    str(result.get("source") or "-"),
                    after,
                    fallback,
                ]
            )
        print(
            _table(
                rows,
                ["message", "type", "outcome", "truth", "polls", "source", "after s", "fallback"],
            ),
            file=out,
        )
        print(f"\n{right}/{len(ids)} outcomes match the sandbox's truth", file=out)
        return 0 if right == len(ids) else 1


def main(argv: list[str] | None = None) -> int:
    """``smsbat-tracker demo``."""
    parser = argparse.ArgumentParser(prog="smsbat-tracker demo", description=__doc__)
    parser.add_argument("--count", type=int, default=6, help="messages to send (1-8)")
    parser.add_argument("--deadline", type=float, default=15.0, help="seconds to track each")
    parser.add_argument("--seed", type=int, default=1, help="sandbox outcome seed")
    parser.add_argument(
        "--push", action="store_true", help="also push statuses to the webhook receiver"
    )
    args = parser.parse_args(argv)
    return run_demo(count=args.count, deadline=args.deadline, seed=args.seed, push=args.push)
