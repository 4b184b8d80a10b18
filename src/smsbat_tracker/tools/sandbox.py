"""A simulated SMSBAT HTTP API: a real, fast HTTP server for demos, tests and benchmarks.

The sandbox speaks the two endpoints the tracker uses (``GET /bat/message/{messageId}`` and
``POST /bat/messagelist``) with the same authentication schemes and body shapes as the real
API, plus admin endpoints under ``/sandbox/`` to script message timelines, read the ground
truth of every message, inject faults and read request counters.

Design:

* It is a raw ASGI application (no framework) served by uvicorn with httptools and uvloop,
  so one process serves thousands of requests per second. Every request is O(1): a status
  is computed lazily from the message's timeline when asked, so no timer runs per message.
* The admin endpoints are **unauthenticated**: the sandbox is for local use only. Never
  expose it on a public interface.
* :class:`SandboxState` is shared between the server's event-loop thread and the caller's
  thread (tests use it in-process), so every read and write of it happens under one
  ``threading.Lock``, never held across an ``await``.

Admin endpoints (JSON in and out):

* ``POST /sandbox/messages`` ``{"messages": [{"messageId"?, "timeline": [[status, seconds],
  ...], "cost"?, "partscount"?, "extended"?}]}`` -> ``{"messageIds": [...]}``.
* ``GET /sandbox/messages/{id}`` -> the truth of one message (see
  :meth:`SandboxState.truth`); ``GET /sandbox/messages`` -> ``{"messages": [truth, ...]}``.
* ``GET /sandbox/stats`` -> counters of the ``/bat/`` API (see :meth:`SandboxState.stats`).
* ``POST /sandbox/faults`` -> see :meth:`SandboxState.set_faults` (same keys; ``"clear":
  true`` first turns every fault off).
* ``POST /sandbox/reset`` -> forget messages, faults and counters.

The app also speaks the ASGI lifespan protocol (binding the loop for webhooks at start-up and
closing the webhook client at shutdown), so any ASGI server can host :func:`create_app`;
:class:`SandboxServer` and :func:`main` run uvicorn with lifespan off and do this themselves.

Run it standalone with ``python -m smsbat_tracker.tools.sandbox --port 8080``, or in-process::

    with SandboxServer(SandboxConfig(seed=1)) as server:
        message_id = server.state.create_scripted([("processing", 0), ("delivered", 0.5)])
        httpx.get(f"{server.url}/bat/message/{message_id}",
                  headers={"X-Authorization-Key": server.config.api_key})
"""

import argparse
import asyncio
import base64
import binascii
import bisect
import collections
import contextlib
import hmac
import json
import logging
import math
import random
import re
import secrets
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp

from smsbat_tracker.tools.serving import (
    BackgroundServer,
    ReadyServer,
    Receive,
    Scope,
    Send,
    bind_socket,
    serve_on,
    uvicorn_config,
)

__all__ = [
    "FAULT_KINDS",
    "FINAL_STATUSES",
    "MESSAGE_TYPES",
    "SandboxApp",
    "SandboxConfig",
    "SandboxServer",
    "SandboxState",
    "create_app",
    "main",
]


FINAL_STATUSES: frozenset[str] = frozenset({"delivered", "undeliverable", "permanenterror"})
"""Statuses after which a message never changes again."""

MESSAGE_TYPES: frozenset[str] = frozenset(
    {
        "sms",
        "viber_promo",
        "viber_trans",
        "viber_carousel",
        "viber_survey",
        "viber_otp",
        "rcs",
        "flashcall",
    }
)
"""Message types accepted by ``POST /bat/messagelist``."""

FAULT_KINDS: frozenset[str] = frozenset(
    {"500", "429", "malformed", "truncated", "slow", "401", "ok"}
)
"""Kinds accepted in the per-message fault queues (``message_faults``); ``"ok"`` answers
normally (to script a good answer between faults)."""

# ASCII digits only, and fullmatch() so a trailing newline is not accepted.
_E164 = re.compile(r"\+[1-9][0-9]{6,14}")
# Price per part in USD; a Viber message delivered by its SMS fallback is billed as SMS.
_RATES: dict[str, float] = {"sms": 0.05, "rcs": 0.04, "flashcall": 0.01}
_VIBER_RATE = 0.03
_Z_95 = 1.645  # standard normal quantile of 0.95
_MAX_BODY = 64 * 1024 * 1024  # local tool: refuse absurd request bodies instead of buffering them
_FIRST_LIST_ID = 100_000

_JSON_HEADERS: list[tuple[bytes, bytes]] = [(b"content-type", b"application/json")]
_UNAUTHORIZED = b'{"error":"unauthorized"}'
_NOT_FOUND = b'{"error":"not found"}'
_MESSAGE_NOT_FOUND = b'{"error":"message not found"}'
_INTERNAL = b'{"error":"internal"}'
_RATE_LIMITED = b'{"error":"rate limited"}'
_MALFORMED = b'{"deliverystatus": '
_OK = b'{"ok":true}'

_UVICORN_INCOMPLETE = "ASGI callable returned without completing response."


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _iso_utc(epoch: float) -> str:
    # Second precision with a Z suffix, exactly like the provider's documented example.
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parts(text: str) -> int:
    """Number of SMS parts: 160 characters fit one part, longer texts use 153 per part."""
    length = len(text)
    if length <= 160:
        return 1
    return math.ceil(length / 153)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass
class SandboxConfig:
    """Credentials and the statistical behaviour of the simulated API.

    Times are seconds after the send. The time to the final status is log-normal with
    median ``median_final`` and 95th percentile ``p95_final``. Each accepted message ends
    ``undeliverable``, ``permanenterror``, never final (stuck in ``processing``) or
    ``delivered`` with the given rates (delivered takes the rest). ``fallback_rate`` is the
    share of viber-type messages delivered by their SMS fallback after the Viber leg failed.
    When ``push_url`` is set, every status change is POSTed there as a webhook.
    """

    api_key: str = "sandbox-key"
    username: str = "sandbox"
    password: str = "sandbox-password"  # noqa: S105 - public sandbox default, not a secret
    processing_after: float = 0.5
    median_final: float = 4.0
    p95_final: float = 40.0
    undeliverable_rate: float = 0.05
    permanenterror_rate: float = 0.0
    never_final_rate: float = 0.02
    fallback_rate: float = 0.1
    seed: int | None = None
    push_url: str | None = None
    push_timeout: float = 5.0

    def __post_init__(self) -> None:
        for name in ("api_key", "username", "password"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string")
        rate_names = ("undeliverable_rate", "permanenterror_rate", "never_final_rate")
        for name in (*rate_names, "fallback_rate"):
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
        total = sum(getattr(self, name) for name in rate_names)
        if total > 1.0 + 1e-9:
            raise ValueError(
                "undeliverable_rate + permanenterror_rate + never_final_rate must be <= 1, "
                f"got {total:g}"
            )
        # 0 is allowed for processing_after: "processing as soon as accepted".
        if not _is_number(self.processing_after) or not 0.0 <= self.processing_after < math.inf:
            raise ValueError(f"processing_after must be >= 0, got {self.processing_after!r}")
        for name in ("median_final", "p95_final", "push_timeout"):
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 < value < math.inf:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if self.p95_final < self.median_final:
            raise ValueError(
                f"p95_final must be >= median_final, got {self.p95_final!r} < {self.median_final!r}"
            )
        if self.seed is not None and (
            not isinstance(self.seed, int) or isinstance(self.seed, bool)
        ):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if self.push_url is not None and not (
            isinstance(self.push_url, str) and self.push_url.startswith(("http://", "https://"))
        ):
            raise ValueError("push_url must be an http:// or https:// URL")

    @property
    def sigma(self) -> float:
        """Log-normal shape parameter derived from the median and the 95th percentile."""
        return math.log(self.p95_final / self.median_final) / _Z_95


class _Message:
    """One message: its planned timeline (absolute epochs) and what happened to it."""

    __slots__ = (
        "cost",
        "created_at",
        "extended",
        "fallback",
        "final_at",
        "final_status",
        "list_id",
        "message_id",
        "partscount",
        "poll_times",
        "pushes",
        "statuses",
        "times",
    )

    def __init__(
        self,
        message_id: str,
        list_id: int,
        created_at: float,
        timeline: list[tuple[str, float]],
        cost: float,
        partscount: int,
        extended: dict[str, object] | None,
        fallback: bool,
    ) -> None:
        self.message_id = message_id
        self.list_id = list_id
        self.created_at = created_at
        self.statuses = [status for status, _ in timeline]
        self.times = [created_at + offset for _, offset in timeline]
        self.cost = cost
        self.partscount = partscount
        self.extended = extended
        self.fallback = fallback
        last = self.statuses[-1]
        self.final_status: str | None = last if last in FINAL_STATUSES else None
        self.final_at: float | None = self.times[-1] if self.final_status is not None else None
        self.poll_times: list[float] = []
        self.pushes: list[dict[str, object]] = []

    def status_at(self, now: float) -> str:
        """The status as of ``now``: the last timeline entry already reached."""
        index = bisect.bisect_right(self.times, now) - 1
        # Before the first entry is reached the message is simply queued.
        return self.statuses[index] if index >= 0 else "scheduled"

    def changes(self) -> list[tuple[str, float]]:
        """Status changes after creation, as (status, epoch): what the webhook reports."""
        result: list[tuple[str, float]] = []
        previous = self.status_at(self.created_at)
        for status, at in zip(self.statuses, self.times, strict=True):
            if at > self.created_at and status != previous:
                result.append((status, at))
            if at > self.created_at:
                previous = status
        return result

    def body(self, now: float) -> dict[str, object]:
        """The ``GET /bat/message/{id}`` answer as of ``now``."""
        status = self.status_at(now)
        if status == "scheduled":
            # Early states omit fields, as the real API does.
            return {"deliverystatus": "scheduled", "partscount": self.partscount}
        delivered = status == "delivered"
        cost = self.cost if delivered else 0.0
        body: dict[str, object] = {
            "messagelistId": self.list_id,
            "messageId": self.message_id,
            "deliverystatus": status,
            "partscount": self.partscount,
            "cost": cost,
        }
        if self.extended is not None:
            if self.fallback and delivered:
                viber, sms = "undeliverable", "delivered"
            else:
                viber, sms = status, "not_used"
            rate = round(self.cost / self.partscount, 6)
            body["fallbacks"] = [{"type": "sms", "status": sms}]
            body["extendedStatuses"] = {"viber": viber, "sms": sms}
            body["rate"] = rate
            body["rateAmount"] = rate
            body["rateCurrency"] = "USD"
            body["billAmount"] = cost
            body["billCurrency"] = "USD"
            body.update(self.extended)
        return body

    def truth(self, now: float) -> dict[str, Any]:
        """Ground truth of the message, for tests and benchmarks."""
        return {
            "messageId": self.message_id,
            "messagelistId": self.list_id,
            "created_at": self.created_at,
            "final_status": self.final_status,
            "final_at": self.final_at,
            "status": self.status_at(now),
            "fallback": self.fallback,
            "timeline": [[s, t] for s, t in zip(self.statuses, self.times, strict=True)],
            "polls": len(self.poll_times),
            "poll_times": list(self.poll_times),
            "pushes": [dict(push) for push in self.pushes],
        }


class _TruncationLogFilter(logging.Filter):
    """Drops uvicorn's error line for responses the sandbox truncates on purpose.

    A "truncated" fault returns from the app mid-body so uvicorn closes the connection; uvicorn
    then logs an error. Only as many lines as truncations were made are dropped, so a genuine
    occurrence elsewhere in the process still shows.
    """

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._pending = 0

    def expect(self) -> None:
        with self._lock:
            self._pending += 1

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == _UVICORN_INCOMPLETE:
            with self._lock:
                if self._pending > 0:
                    self._pending -= 1
                    return False
        return True


_truncation_filter = _TruncationLogFilter()
logging.getLogger("uvicorn.error").addFilter(_truncation_filter)


class SandboxState:
    """Messages, fault settings and counters of one sandbox; thread-safe.

    All methods may be called from any thread. Webhook pushes need the server's event loop,
    which :class:`SandboxServer` (or :func:`main`) attaches; pushes of messages created before
    that are scheduled once the loop is attached.
    """

    def __init__(self, config: SandboxConfig | None = None) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._push_client: aiohttp.ClientSession | None = None
        self._push_tasks: set[asyncio.Task[None]] = set()
        self._pending_pushes: list[tuple[_Message, int]] = []
        self._generation = 0
        self.config = config if config is not None else SandboxConfig()
        self._init_data()

    @property
    def config(self) -> SandboxConfig:
        """The configuration used to plan sent messages and to push webhooks."""
        return self._config

    @config.setter
    def config(self, config: SandboxConfig) -> None:
        with self._lock:
            self._config = config
            self._sigma = config.sigma
            self._mu = math.log(config.median_final)
            seed = config.seed
            self._rng = random.Random(seed)
            # Faults draw from their own generator so they never shift the outcome sequence.
            self._fault_rng = random.Random(None if seed is None else seed + 1)

    def _init_data(self) -> None:
        # Caller holds the lock (or the object is not shared yet).
        self._messages: dict[str, _Message] = {}
        self._next_list_id = _FIRST_LIST_ID
        self._requests = 0
        self._status_requests = 0
        self._send_requests = 0
        self._admin_requests = 0
        self._auth: dict[str, int] = {"header": 0, "basic": 0, "basic-key": 0}
        self._responses: dict[int, int] = {}
        self._clear_faults()

    def _clear_faults(self) -> None:
        self._error_rate = 0.0
        self._rate_limit_rate = 0.0
        self._malformed_rate = 0.0
        self._slow_rate = 0.0
        self._retry_after = 1.0
        self._slow_seconds = 1.0
        self._random_faults = False
        self._message_faults: dict[str, collections.deque[str]] = {}

    # ----------------------------------------------------------------- public API

    def create_scripted(
        self,
        timeline: list[tuple[str, float]],
        *,
        message_id: str | None = None,
        cost: float = 0.05,
        partscount: int = 1,
        extended: dict[str, object] | None = None,
    ) -> str:
        """Create a message that follows ``timeline`` and return its id.

        ``timeline`` is a list of ``(status, seconds from now)`` pairs in time order; any
        status string is served as-is. Before the first entry is reached the message is
        ``scheduled``. The last status is final only if it is delivered, undeliverable or
        permanenterror. ``cost`` is served once delivered. ``extended`` makes the status body
        the extended (fallback-chain) shape: its key ``"fallback"`` (bool) selects the SMS
        fallback outcome, every other key is merged verbatim into the body.

        Raises ValueError on an invalid timeline, a duplicate id or bad values.
        """
        spec = _parse_scripted(
            {
                "timeline": timeline,
                "messageId": message_id,
                "cost": cost,
                "partscount": partscount,
                "extended": extended,
            }
        )
        return self._create_scripted_batch([spec])[0]

    def truth(self, message_id: str) -> dict[str, Any]:
        """Ground truth of one message; KeyError if unknown.

        Keys: ``messageId``, ``messagelistId``, ``created_at`` (epoch), ``final_status`` (None
        if never final), ``final_at`` (epoch or None), ``status`` (as of now), ``fallback``,
        ``timeline`` (``[[status, epoch], ...]``), ``polls`` (authenticated status GETs,
        faulted ones included), ``poll_times`` (their arrival epochs) and ``pushes``
        (``{"deliverystatus", "sent_at", "http_status", "error"}``, http_status None when the
        push failed).
        """
        now = time.time()
        with self._lock:
            return self._messages[message_id].truth(now)

    def all_truths(self) -> list[dict[str, Any]]:
        """Ground truth of every message, in creation order."""
        now = time.time()
        with self._lock:
            return [message.truth(now) for message in self._messages.values()]

    def stats(self) -> dict[str, Any]:
        """Request counters of the ``/bat/`` API; ``/sandbox/`` calls only in admin_requests.

        Keys: ``requests``, ``status_requests``, ``send_requests``, ``admin_requests``,
        ``messages`` (currently stored), ``auth`` (per method) and ``responses`` (per HTTP
        status code, as strings).
        """
        with self._lock:
            return {
                "requests": self._requests,
                "status_requests": self._status_requests,
                "send_requests": self._send_requests,
                "admin_requests": self._admin_requests,
                "messages": len(self._messages),
                "auth": dict(self._auth),
                "responses": {str(code): n for code, n in sorted(self._responses.items())},
            }

    def reset(self) -> None:
        """Forget every message, fault and counter. Pending webhook pushes are dropped."""
        with self._lock:
            self._generation += 1
            self._pending_pushes.clear()
            self._init_data()

    def clear_faults(self) -> None:
        """Turn every fault off and empty the per-message fault queues."""
        with self._lock:
            self._clear_faults()

    def set_faults(
        self,
        *,
        error_rate: float | None = None,
        rate_limit_rate: float | None = None,
        retry_after: float | None = None,
        slow_rate: float | None = None,
        slow_seconds: float | None = None,
        malformed_rate: float | None = None,
        message_faults: dict[str, list[str]] | None = None,
    ) -> None:
        """Change fault injection for ``GET /bat/message/{id}``; omitted settings are kept.

        Random faults: each status GET answers 500 with ``error_rate``, 429 (with
        ``Retry-After: ceil(retry_after)``) with ``rate_limit_rate``, invalid JSON with
        ``malformed_rate``, otherwise it is delayed by ``slow_seconds`` with ``slow_rate``.
        ``message_faults`` maps a message id to fault kinds (see :data:`FAULT_KINDS`) appended
        to that message's queue; its next GETs consume the queue in order, before any random
        fault. Raises ValueError on bad values.
        """
        settings = _parse_faults(
            {
                "error_rate": error_rate,
                "rate_limit_rate": rate_limit_rate,
                "retry_after": retry_after,
                "slow_rate": slow_rate,
                "slow_seconds": slow_seconds,
                "malformed_rate": malformed_rate,
                "message_faults": message_faults,
            }
        )
        self._apply_faults(settings)

    # ----------------------------------------------------------------- internals

    def _apply_faults(self, settings: dict[str, Any]) -> None:
        with self._lock:
            error = settings.get("error_rate", self._error_rate)
            limited = settings.get("rate_limit_rate", self._rate_limit_rate)
            malformed = settings.get("malformed_rate", self._malformed_rate)
            if error + limited + malformed > 1.0 + 1e-9:
                raise ValueError("error_rate + rate_limit_rate + malformed_rate must be <= 1")
            self._error_rate = error
            self._rate_limit_rate = limited
            self._malformed_rate = malformed
            self._slow_rate = settings.get("slow_rate", self._slow_rate)
            self._retry_after = settings.get("retry_after", self._retry_after)
            self._slow_seconds = settings.get("slow_seconds", self._slow_seconds)
            self._random_faults = (error + limited + malformed + self._slow_rate) > 0.0
            for message_id, kinds in settings.get("message_faults", {}).items():
                self._message_faults.setdefault(message_id, collections.deque()).extend(kinds)

    def _new_list_id(self) -> int:
        # Caller holds the lock.
        list_id = self._next_list_id
        self._next_list_id += 1
        return list_id

    def _new_message_id(self) -> str:
        # Caller holds the lock. A clash of 96 random bits is practically impossible; the loop
        # only makes the uniqueness explicit.
        while True:
            message_id = secrets.token_hex(12)
            if message_id not in self._messages:
                return message_id

    def _create_scripted_batch(self, specs: list[dict[str, Any]]) -> list[str]:
        now = time.time()
        created: list[_Message] = []
        with self._lock:
            wanted = [spec["messageId"] for spec in specs if spec["messageId"] is not None]
            if len(set(wanted)) != len(wanted):
                raise ValueError("messageId values must be unique")
            for message_id in wanted:
                if message_id in self._messages:
                    raise ValueError(f"messageId {message_id!r} already exists")
            list_id = self._new_list_id()
            for spec in specs:
                extended = spec["extended"]
                fallback = False
                if extended is not None:
                    extended = dict(extended)
                    fallback = bool(extended.pop("fallback", False))
                message = _Message(
                    spec["messageId"] or self._new_message_id(),
                    list_id,
                    now,
                    spec["timeline"],
                    spec["cost"],
                    spec["partscount"],
                    extended,
                    fallback,
                )
                self._messages[message.message_id] = message
                created.append(message)
        self._after_create(created)
        return [message.message_id for message in created]

    def _plan(self, kind: str, parts: int) -> tuple[list[tuple[str, float]], float, bool]:
        """Draw the timeline, delivered cost and fallback flag of a sent message (lock held)."""
        config = self._config
        rng = self._rng
        final_after = rng.lognormvariate(self._mu, self._sigma)
        draw = rng.random()
        final: str | None
        if draw < config.undeliverable_rate:
            final = "undeliverable"
        elif draw < config.undeliverable_rate + config.permanenterror_rate:
            final = "permanenterror"
        elif (
            draw < config.undeliverable_rate + config.permanenterror_rate + config.never_final_rate
        ):
            final = None
        else:
            final = "delivered"
        fallback = False
        if kind.startswith("viber_") and final == "delivered":
            # Drawn among delivered messages, scaled so the share of all viber-type messages
            # delivered by fallback equals fallback_rate (when that many are delivered at all).
            delivered_rate = 1.0 - (
                config.undeliverable_rate + config.permanenterror_rate + config.never_final_rate
            )
            if delivered_rate > 0.0:
                fallback = rng.random() < min(1.0, config.fallback_rate / delivered_rate)
        rate = _RATES["sms"] if fallback else _RATES.get(kind, _VIBER_RATE)
        cost = round(rate * parts, 6)
        if final is None:
            return [("scheduled", 0.0), ("processing", config.processing_after)], cost, fallback
        # Processing starts after processing_after but always before the final status.
        processing_at = min(config.processing_after, final_after / 2.0)
        timeline = [("scheduled", 0.0), ("processing", processing_at), (final, final_after)]
        return timeline, cost, fallback

    def _send(self, items: list[object]) -> bytes:
        """Handle a ``POST /bat/messagelist`` body's messages; returns the JSON answer."""
        now = time.time()
        results: list[dict[str, object]] = []
        created: list[_Message] = []
        with self._lock:
            list_id = self._new_list_id()
            for item in items:
                if not isinstance(item, dict):
                    results.append(
                        {
                            "messageId": None,
                            "status": "rejected",
                            "parts": 0,
                            "customerMessageId": None,
                            "to": None,
                            "reason": "message must be an object",
                        }
                    )
                    continue
                to = item.get("to")
                kind = item.get("type")
                text = item.get("text")
                reason = None
                if not isinstance(to, str) or not _E164.fullmatch(to):
                    reason = "to must be an E.164 number"
                elif kind not in MESSAGE_TYPES:
                    reason = "unknown type"
                elif text is not None and not isinstance(text, str):
                    reason = "text must be a string"
                result: dict[str, object] = {
                    "messageId": None,
                    "status": "rejected",
                    "parts": 0,
                    "customerMessageId": item.get("customerMessageId"),
                    "to": to,
                }
                if reason is not None:
                    result["reason"] = reason
                    results.append(result)
                    continue
                assert isinstance(kind, str)
                parts = _parts(text or "")
                timeline, cost, fallback = self._plan(kind, parts)
                extended: dict[str, object] | None = {} if kind.startswith("viber_") else None
                message = _Message(
                    self._new_message_id(),
                    list_id,
                    now,
                    timeline,
                    cost,
                    parts,
                    extended,
                    fallback,
                )
                self._messages[message.message_id] = message
                created.append(message)
                result["messageId"] = message.message_id
                result["status"] = "accepted"
                result["parts"] = parts
                results.append(result)
        self._after_create(created)
        return _dumps({"messagelistId": list_id, "messages": results})

    # ------------------------------------------------------------ webhook pushes

    def _attach_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Bind the event loop that sends webhooks; called on that loop's thread."""
        with self._lock:
            if self._loop is not loop:
                # A client session cannot move between loops; the next push creates a new one.
                self._push_client = None
            self._loop = loop
            self._loop_thread = threading.get_ident()
            pending = self._pending_pushes
            self._pending_pushes = []
        for message, generation in pending:
            self._schedule_pushes(message, generation)

    def _after_create(self, messages: list[_Message]) -> None:
        if self._config.push_url is None or not messages:
            return
        with self._lock:
            generation = self._generation
            loop = self._loop
            if loop is None or loop.is_closed():
                self._pending_pushes.extend((message, generation) for message in messages)
                return
            on_loop = self._loop_thread == threading.get_ident()
        if on_loop:
            for message in messages:
                self._schedule_pushes(message, generation)
            return
        # RuntimeError: the loop closed in between, the server is gone and nothing is pushed.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._schedule_many, messages, generation)

    def _schedule_many(self, messages: list[_Message], generation: int) -> None:
        for message in messages:
            self._schedule_pushes(message, generation)

    def _schedule_pushes(self, message: _Message, generation: int) -> None:
        # Runs on the loop thread.
        loop = self._loop
        if loop is None:
            return
        now = time.time()
        for status, at in message.changes():
            loop.call_later(max(0.0, at - now), self._fire_push, message, status, at, generation)

    def _fire_push(self, message: _Message, status: str, at: float, generation: int) -> None:
        if generation != self._generation or self._loop is None:
            return  # reset() since scheduling: the message is forgotten
        task = self._loop.create_task(self._push(message, status, at))
        self._push_tasks.add(task)
        task.add_done_callback(self._push_tasks.discard)

    async def _push(self, message: _Message, status: str, at: float) -> None:
        url = self._config.push_url
        if url is None:
            return
        if self._push_client is None:
            # One pooled client for all pushes, on aiohttp: a tenth of httpx's CPU per request,
            # which counts when the sandbox shares a machine with what it serves. The timeout
            # covers the request, not the wait for a connection: a burst of status changes
            # may queue far more pushes than there are connections.
            self._push_client = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=100),
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    sock_connect=self._config.push_timeout,
                    sock_read=self._config.push_timeout,
                ),
            )
        payload = {
            "messageId": message.message_id,
            "deliverystatus": status,
            "timestamp": _iso_utc(at),
            "cost": message.cost if status == "delivered" else 0.0,
        }
        sent_at = time.time()
        record: dict[str, object] = {"deliverystatus": status, "sent_at": sent_at}
        try:
            async with self._push_client.post(url, json=payload) as response:
                await response.read()
            record["http_status"] = response.status
            record["error"] = None
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a failed push must never disturb the sandbox
            record["http_status"] = None
            record["error"] = type(exc).__name__
        with self._lock:
            message.pushes.append(record)

    async def _aclose(self) -> None:
        """Cancel in-flight pushes and close the push client; run on the loop at shutdown."""
        tasks = list(self._push_tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._push_client is not None:
            client, self._push_client = self._push_client, None
            await client.close()
        with self._lock:
            self._loop = None
            self._loop_thread = None


# --------------------------------------------------------------------- validation


def _parse_timeline(value: object) -> list[tuple[str, float]]:
    if not isinstance(value, list | tuple) or not value:
        raise ValueError("timeline must be a non-empty list of [status, seconds] pairs")
    timeline: list[tuple[str, float]] = []
    previous = 0.0
    for entry in value:
        if not isinstance(entry, list | tuple) or len(entry) != 2:
            raise ValueError("timeline entries must be [status, seconds] pairs")
        status, offset = entry
        if not isinstance(status, str) or not status:
            raise ValueError("timeline status must be a non-empty string")
        if not _is_number(offset) or not 0.0 <= offset < math.inf:
            raise ValueError("timeline seconds must be finite numbers >= 0")
        if offset < previous:
            raise ValueError("timeline seconds must not decrease")
        previous = float(offset)
        timeline.append((status, previous))
    return timeline


def _parse_scripted(item: object) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise ValueError("each scripted message must be an object")
    message_id = item.get("messageId")
    if message_id is not None and (not isinstance(message_id, str) or not message_id):
        raise ValueError("messageId must be a non-empty string")
    cost = item.get("cost", 0.05)
    if cost is None:
        cost = 0.05
    if not _is_number(cost) or not 0.0 <= cost < math.inf:
        raise ValueError("cost must be a number >= 0")
    partscount = item.get("partscount", 1)
    if partscount is None:
        partscount = 1
    if not isinstance(partscount, int) or isinstance(partscount, bool) or partscount < 1:
        raise ValueError("partscount must be an integer >= 1")
    extended = item.get("extended")
    if extended is not None:
        if not isinstance(extended, dict):
            raise ValueError("extended must be an object")
        try:
            json.dumps(extended)
        except (TypeError, ValueError) as exc:
            raise ValueError("extended must be JSON-serialisable") from exc
    return {
        "timeline": _parse_timeline(item.get("timeline")),
        "messageId": message_id,
        "cost": float(cost),
        "partscount": partscount,
        "extended": extended,
    }


def _parse_faults(body: dict[str, Any]) -> dict[str, Any]:
    """Validate fault settings; keys whose value is None are left out (unchanged)."""
    settings: dict[str, Any] = {}
    for name in ("error_rate", "rate_limit_rate", "slow_rate", "malformed_rate"):
        value = body.get(name)
        if value is None:
            continue
        if not _is_number(value) or not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be a number in [0, 1]")
        settings[name] = float(value)
    for name in ("retry_after", "slow_seconds"):
        value = body.get(name)
        if value is None:
            continue
        if not _is_number(value) or not 0.0 <= value < math.inf:
            raise ValueError(f"{name} must be a number >= 0")
        settings[name] = float(value)
    message_faults = body.get("message_faults")
    if message_faults is not None:
        if not isinstance(message_faults, dict):
            raise ValueError("message_faults must be an object of id -> list of fault kinds")
        parsed: dict[str, list[str]] = {}
        for message_id, kinds in message_faults.items():
            if not isinstance(kinds, list | tuple) or not all(k in FAULT_KINDS for k in kinds):
                raise ValueError(f"message_faults kinds must be among {sorted(FAULT_KINDS)}")
            parsed[str(message_id)] = [str(kind) for kind in kinds]
        settings["message_faults"] = parsed
    return settings


# --------------------------------------------------------------------- ASGI app


class SandboxApp:
    """The raw ASGI application of the sandbox; ``.state`` and ``.config`` are public."""

    def __init__(self, config: SandboxConfig, state: SandboxState) -> None:
        self.config = config
        self.state = state
        self._header_key = config.api_key.encode()
        self._username = config.username.encode()
        self._password = config.password.encode()
        self._pushes = config.push_url is not None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one HTTP request or the lifespan protocol (websockets are ignored)."""
        kind = scope["type"]
        if kind != "http":
            if kind == "lifespan":
                await self._lifespan(receive, send)
            return
        if self._pushes:
            # Served by a foreign server without lifespan (e.g. httpx.ASGITransport): bind the
            # running loop on first use so webhooks still go out.
            loop = self.state._loop
            if loop is None or loop.is_closed():
                self.state._attach_loop(asyncio.get_running_loop())
        path: str = scope["path"]
        method: str = scope["method"]
        if path.startswith("/bat/"):
            await self._bat(path, method, scope, receive, send)
        elif path.startswith("/sandbox/"):
            with self.state._lock:
                self.state._admin_requests += 1
            await self._admin(path, method, receive, send)
        else:
            await _respond(send, 404, _NOT_FOUND)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        """Bind the loop for webhooks at start-up; close the push client at shutdown."""
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.state._attach_loop(asyncio.get_running_loop())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.state._aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # ------------------------------------------------------------------ /bat/

    def _authenticate(self, scope: Scope) -> str | None:
        """Return the auth method that succeeded ("header", "basic", "basic-key") or None."""
        key: bytes | None = None
        authorization: bytes | None = None
        for name, value in scope["headers"]:
            if name == b"x-authorization-key":
                key = value
            elif name == b"authorization":
                authorization = value
        if key is not None and hmac.compare_digest(key, self._header_key):
            return "header"
        if authorization is None:
            return None
        scheme, _, token = authorization.partition(b" ")
        if scheme.lower() != b"basic":
            return None
        try:
            decoded = base64.b64decode(token.strip(), validate=True)
        except (binascii.Error, ValueError):
            return None
        user, colon, password = decoded.partition(b":")
        if not colon:
            return None
        # Evaluate both comparisons so timing does not reveal which part matched.
        user_ok = hmac.compare_digest(user, self._username)
        password_ok = hmac.compare_digest(password, self._password)
        if user_ok and password_ok:
            return "basic"
        if user == b"@" and hmac.compare_digest(password, self._header_key):
            return "basic-key"
        return None

    async def _bat(
        self, path: str, method: str, scope: Scope, receive: Receive, send: Send
    ) -> None:
        state = self.state
        if path.startswith("/bat/message/"):
            if method != "GET":
                self._count(405, status_route=True)
                await _respond(send, 405, _method_not_allowed(), allow=b"GET")
                return
            await self._status(path[len("/bat/message/") :], scope, send)
            return
        if path == "/bat/messagelist":
            if method != "POST":
                self._count(405, send_route=True)
                await _respond(send, 405, _method_not_allowed(), allow=b"POST")
                return
            auth = self._authenticate(scope)
            if auth is None:
                self._count(401, send_route=True)
                await _respond(send, 401, _UNAUTHORIZED)
                return
            body = await _read_body(receive)
            error: str | None = None
            items: object = None
            if body is None:
                error = "request body too large"
            else:
                try:
                    payload = json.loads(body)
                except (ValueError, UnicodeDecodeError):
                    error = "body must be JSON"
                else:
                    items = payload.get("messages") if isinstance(payload, dict) else None
                    if not isinstance(items, list):
                        error = 'body must be an object with a "messages" list'
            if error is not None or not isinstance(items, list):
                self._count(400, send_route=True, auth=auth)
                await _respond(send, 400, _dumps({"error": error}))
                return
            answer = state._send(items)
            self._count(200, send_route=True, auth=auth)
            await _respond(send, 200, answer)
            return
        self._count(404)
        await _respond(send, 404, _NOT_FOUND)

    def _count(
        self,
        code: int,
        *,
        status_route: bool = False,
        send_route: bool = False,
        auth: str | None = None,
    ) -> None:
        state = self.state
        with state._lock:
            state._requests += 1
            if status_route:
                state._status_requests += 1
            if send_route:
                state._send_requests += 1
            if auth is not None:
                state._auth[auth] += 1
            state._responses[code] = state._responses.get(code, 0) + 1

    async def _status(self, message_id: str, scope: Scope, send: Send) -> None:
        """``GET /bat/message/{id}``: one locked section for lookup, fault and counting."""
        state = self.state
        auth = self._authenticate(scope)
        now = time.time()
        fault: str | None = None
        body = b""
        with state._lock:
            state._requests += 1
            state._status_requests += 1
            message = state._messages.get(message_id) if auth is not None else None
            if auth is None:
                code = 401
            else:
                state._auth[auth] += 1
                if message is None:
                    code = 404
                else:
                    message.poll_times.append(now)
                    queue = state._message_faults.get(message_id)
                    if queue:
                        fault = queue.popleft()
                        if not queue:
                            del state._message_faults[message_id]
                    elif state._random_faults:
                        fault = self._draw_fault()
                    if fault == "500":
                        code = 500
                    elif fault == "429":
                        code = 429
                    elif fault == "401":
                        code = 401
                    else:
                        code = 200
                        if fault != "malformed":
                            body = _dumps(message.body(now))
            state._responses[code] = state._responses.get(code, 0) + 1
            retry_after = state._retry_after
            slow_seconds = state._slow_seconds
        if code == 200:
            if fault == "malformed":
                await _respond(send, 200, _MALFORMED)
            elif fault == "truncated":
                await self._truncated(send, body)
            else:
                if fault == "slow":
                    await asyncio.sleep(slow_seconds)
                await _respond(send, 200, body)
        elif code == 401:
            await _respond(send, 401, _UNAUTHORIZED)
        elif code == 404:
            await _respond(send, 404, _MESSAGE_NOT_FOUND)
        elif code == 500:
            await _respond(send, 500, _INTERNAL)
        else:
            seconds = str(math.ceil(retry_after)).encode()
            await _respond(send, 429, _RATE_LIMITED, retry_after=seconds)

    def _draw_fault(self) -> str | None:
        # Lock held by the caller.
        state = self.state
        draw = state._fault_rng.random()
        if draw < state._error_rate:
            return "500"
        draw -= state._error_rate
        if draw < state._rate_limit_rate:
            return "429"
        draw -= state._rate_limit_rate
        if draw < state._malformed_rate:
            return "malformed"
        if state._slow_rate > 0.0 and state._fault_rng.random() < state._slow_rate:
            return "slow"
        return None

    @staticmethod
    async def _truncated(send: Send, body: bytes) -> None:
        """Announce the full length, send half of the body, then let uvicorn drop the socket."""
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [*_JSON_HEADERS, (b"content-length", str(len(body)).encode())],
            }
        )
        await send(
            {"type": "http.response.body", "body": body[: len(body) // 2], "more_body": True}
        )
        # Returning now makes uvicorn close the connection (the client sees a short body).
        _truncation_filter.expect()

    # --------------------------------------------------------------- /sandbox/

    async def _admin(self, path: str, method: str, receive: Receive, send: Send) -> None:
        state = self.state
        if path == "/sandbox/messages":
            if method == "GET":
                truths = state.all_truths()
                await _respond(send, 200, _dumps({"messages": truths}))
            elif method == "POST":
                payload = await _read_json(receive, send)
                if payload is None:
                    return
                items = payload.get("messages")
                try:
                    if not isinstance(items, list):
                        raise ValueError('body must be an object with a "messages" list')
                    specs = [_parse_scripted(item) for item in items]
                    ids = state._create_scripted_batch(specs)
                except ValueError as exc:
                    await _respond(send, 400, _dumps({"error": str(exc)}))
                    return
                await _respond(send, 200, _dumps({"messageIds": ids}))
            else:
                await _respond(send, 405, _method_not_allowed(), allow=b"GET, POST")
        elif path.startswith("/sandbox/messages/"):
            if method != "GET":
                await _respond(send, 405, _method_not_allowed(), allow=b"GET")
                return
            try:
                truth = state.truth(path[len("/sandbox/messages/") :])
            except KeyError:
                await _respond(send, 404, _MESSAGE_NOT_FOUND)
                return
            await _respond(send, 200, _dumps(truth))
        elif path == "/sandbox/stats":
            if method != "GET":
                await _respond(send, 405, _method_not_allowed(), allow=b"GET")
                return
            await _respond(send, 200, _dumps(state.stats()))
        elif path == "/sandbox/faults":
            if method != "POST":
                await _respond(send, 405, _method_not_allowed(), allow=b"POST")
                return
            payload = await _read_json(receive, send)
            if payload is None:
                return
            try:
                if payload.get("clear"):
                    state.clear_faults()
                state._apply_faults(_parse_faults(payload))
            except ValueError as exc:
                await _respond(send, 400, _dumps({"error": str(exc)}))
                return
            await _respond(send, 200, _OK)
        elif path == "/sandbox/reset":
            if method != "POST":
                await _respond(send, 405, _method_not_allowed(), allow=b"POST")
                return
            state.reset()
            await _respond(send, 200, _OK)
        else:
            await _respond(send, 404, _NOT_FOUND)


def _method_not_allowed() -> bytes:
    return b'{"error":"method not allowed"}'


async def _respond(
    send: Send,
    status: int,
    body: bytes,
    *,
    allow: bytes | None = None,
    retry_after: bytes | None = None,
) -> None:
    headers = [*_JSON_HEADERS, (b"content-length", str(len(body)).encode())]
    if allow is not None:
        headers.append((b"allow", allow))
    if retry_after is not None:
        headers.append((b"retry-after", retry_after))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None when it exceeds the size limit."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > _MAX_BODY:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def _read_json(receive: Receive, send: Send) -> dict[str, Any] | None:
    """Read a JSON object body; on failure answer 400 and return None."""
    body = await _read_body(receive)
    if body is None:
        await _respond(send, 400, b'{"error":"request body too large"}')
        return None
    try:
        payload = json.loads(body) if body.strip() else {}
    except (ValueError, UnicodeDecodeError):
        payload = None
    if not isinstance(payload, dict):
        await _respond(send, 400, b'{"error":"body must be a JSON object"}')
        return None
    return payload


def create_app(config: SandboxConfig, state: SandboxState | None = None) -> SandboxApp:
    """Build the sandbox ASGI application; its state is ``app.state``.

    When ``state`` is given it is reused and its configuration is replaced by ``config``.
    """
    if state is None:
        state = SandboxState(config)
    else:
        state.config = config
    return SandboxApp(config, state)


# --------------------------------------------------------------------- serving


class SandboxServer(BackgroundServer):
    """The sandbox on 127.0.0.1 (a free port by default) in a background daemon thread.

    ``.url``, ``.state`` (the :class:`SandboxState`, usable from the caller's thread),
    ``.config`` and ``.app``; use it as a context manager or call :meth:`start`/:meth:`stop`.
    """

    def __init__(
        self,
        config: SandboxConfig | None = None,
        *,
        state: SandboxState | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        startup_timeout: float = 10.0,
    ) -> None:
        self.config = config if config is not None else SandboxConfig()
        self.sandbox = create_app(self.config, state)
        self.state = self.sandbox.state
        super().__init__(
            self.sandbox,
            host=host,
            port=port,
            startup_timeout=startup_timeout,
            on_start=self.state._attach_loop,
            on_stop=self.state._aclose,
        )


# --------------------------------------------------------------------- CLI


def _build_parser() -> argparse.ArgumentParser:
    defaults = SandboxConfig()
    parser = argparse.ArgumentParser(
        prog="python -m smsbat_tracker.tools.sandbox",
        description=(
            "Simulated SMSBAT API (GET /bat/message/{id}, POST /bat/messagelist) with "
            "unauthenticated /sandbox/ admin endpoints: for local use only."
        ),
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8080, help="port (default: %(default)s)")
    parser.add_argument("--api-key", default=defaults.api_key, help="API key to accept")
    parser.add_argument("--username", default=defaults.username, help="Basic auth user name")
    parser.add_argument("--password", default=defaults.password, help="Basic auth password")
    parser.add_argument(
        "--processing-after",
        type=float,
        default=defaults.processing_after,
        help="seconds until processing (default: %(default)s)",
    )
    parser.add_argument(
        "--median",
        type=float,
        default=defaults.median_final,
        help="median seconds until the final status (default: %(default)s)",
    )
    parser.add_argument(
        "--p95",
        type=float,
        default=defaults.p95_final,
        help="95th percentile seconds until the final status (default: %(default)s)",
    )
    parser.add_argument("--undeliverable", type=float, default=defaults.undeliverable_rate)
    parser.add_argument("--permanenterror", type=float, default=defaults.permanenterror_rate)
    parser.add_argument("--never-final", type=float, default=defaults.never_final_rate)
    parser.add_argument("--fallback", type=float, default=defaults.fallback_rate)
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible outcomes")
    parser.add_argument("--push-url", default=None, help="POST every status change here")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the sandbox in the foreground until interrupted; returns the exit code."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help or a usage error: hand back argparse's exit code
        return exc.code if isinstance(exc.code, int) else 2
    try:
        config = SandboxConfig(
            api_key=args.api_key,
            username=args.username,
            password=args.password,
            processing_after=args.processing_after,
            median_final=args.median,
            p95_final=args.p95,
            undeliverable_rate=args.undeliverable,
            permanenterror_rate=args.permanenterror,
            never_final_rate=args.never_final,
            fallback_rate=args.fallback,
            seed=args.seed,
            push_url=args.push_url,
        )
        sock = bind_socket(args.host, args.port)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    app = create_app(config)
    uv_config = uvicorn_config(app, log_config=True)
    server = ReadyServer(uv_config)
    host = f"[{args.host}]" if ":" in args.host else args.host
    port = sock.getsockname()[1]
    # The credentials are deliberately not printed: terminals and CI logs are kept.
    print(f"SMSBAT sandbox listening on http://{host}:{port} (local use only)", flush=True)
    try:
        with asyncio.Runner(loop_factory=uv_config.get_loop_factory()) as runner:
            runner.run(serve_on(server, sock, app.state._attach_loop, app.state._aclose))
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
