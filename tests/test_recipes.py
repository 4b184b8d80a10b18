"""The README's recipes, end to end against the sandbox, a real worker and Redis."""

from __future__ import annotations

import time
from typing import Any

import redis

from smsbat_tracker.celery.track import track_message
from smsbat_tracker.tools.recipes import (
    mark_order_notified,
    record_outcome,
    schedule_retry,
    send_email_otp,
    send_message,
)
from smsbat_tracker.tools.sandbox import SandboxServer
from tests.conftest import recorded, wait_for


def test_order_confirmation_delivered_marks_the_order(
    worker: Any, sandbox: SandboxServer, redis_client: redis.Redis
) -> None:
    """Delivered: the order is marked notified, and no retry is scheduled."""
    mid = sandbox.state.create_scripted([("processing", 0), ("delivered", 0.3)])
    track_message.delay(
        mid,
        on_delivered=mark_order_notified.s("order-1"),
        on_failed=schedule_retry.s("order-1"),
        on_timeout=schedule_retry.s("order-1"),
    )
    [entry] = wait_for(lambda: recorded(redis_client, "orders"))
    assert (entry["order_id"], entry["action"]) == ("order-1", "notified")
    assert entry["result"]["outcome"] == "delivered"


def test_order_confirmation_failed_schedules_a_retry(
    worker: Any, sandbox: SandboxServer, redis_client: redis.Redis
) -> None:
    """Undeliverable: a retry is scheduled for the order, it is not marked notified."""
    mid = sandbox.state.create_scripted([("processing", 0), ("undeliverable", 0.3)])
    track_message.delay(
        mid,
        on_delivered=mark_order_notified.s("order-2"),
        on_failed=schedule_retry.s("order-2"),
    )
    [entry] = wait_for(lambda: recorded(redis_client, "orders"))
    assert (entry["order_id"], entry["action"]) == ("order-2", "retry")
    assert entry["result"]["outcome"] == "undeliverable"


def test_two_factor_code_falls_back_to_email_at_the_deadline(
    worker: Any, sandbox: SandboxServer, redis_client: redis.Redis
) -> None:
    """An OTP still in flight at its (short) deadline is sent by e-mail instead."""
    mid = sandbox.state.create_scripted([("scheduled", 0), ("processing", 0.5)])
    track_message.delay(
        mid,
        deadline=2.5,
        on_failed=send_email_otp.s("user@example.com"),
        on_timeout=send_email_otp.s("user@example.com"),
    )
    [entry] = wait_for(lambda: recorded(redis_client, "otp"), timeout=10)
    assert entry["email"] == "user@example.com"
    assert entry["result"]["outcome"] == "timeout"


def test_two_factor_code_undeliverable_goes_to_email_at_once(
    worker: Any, sandbox: SandboxServer, redis_client: redis.Redis
) -> None:
    """An OTP that fails well before its 30 s deadline goes to e-mail without waiting."""
    mid = sandbox.state.create_scripted([("processing", 0), ("undeliverable", 0.2)])
    sent_at = time.time()
    track_message.delay(
        mid,
        deadline=30,
        on_failed=send_email_otp.s("user@example.com"),
        on_timeout=send_email_otp.s("user@example.com"),
    )
    [entry] = wait_for(lambda: recorded(redis_client, "otp"), timeout=10)
    assert entry["result"]["outcome"] == "undeliverable"
    assert entry["recorded_at"] - sent_at < 10  # long before the 30 s deadline


def test_send_and_track_in_one_chain(
    worker: Any, sandbox: SandboxServer, redis_client: redis.Redis
) -> None:
    """send_message | track_message: the new id is tracked and its outcome matches the truth."""
    done = record_outcome.s(label="chain")
    (
        send_message.s("+380501234567", "Your order has shipped", "MyShop")
        | track_message.s(deadline=6, on_delivered=done, on_failed=done, on_timeout=done)
    ).delay()
    [entry] = wait_for(lambda: recorded(redis_client, "chain"), timeout=15)
    result = entry["result"]
    truth = sandbox.state.truth(result["message_id"])
    assert sandbox.state.stats()["send_requests"] == 1
    if truth["final_status"] and truth["final_at"] <= entry["recorded_at"] - 0.05:
        assert result["outcome"] == truth["final_status"]
    else:
        assert result["outcome"] == "timeout"
