"""The sandbox's memory: its messages, fault settings and request counters, behind one lock.

:class:`SandboxState` is shared between the server's event-loop thread and the caller's
thread (tests use it in-process), so every read and write of it happens under one
``threading.Lock``, never held across an ``await``.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import threading
import time
from typing import Any, NamedTuple

from smsbat_tracker.tools.sandbox.asgi import dumps
from smsbat_tracker.tools.sandbox.config import SandboxConfig
from smsbat_tracker.tools.sandbox.faults import Faults, parse_faults
from smsbat_tracker.tools.sandbox.messages import Message, parse_scripted
from smsbat_tracker.tools.sandbox.push import Pusher
from smsbat_tracker.tools.sandbox.sending import Planner, parts, rejection

__all__ = ["SandboxState", "StatusAnswer"]

_FIRST_LIST_ID = 100_000


class StatusAnswer(NamedTuple):
    """What ``GET /bat/message/{id}`` answers, decided under the lock."""

    code: int
    fault: str | None
    body: bytes  # the status body when code is 200 and the fault leaves it whole
    retry_after: float
    slow_seconds: float


class SandboxState:
    """Messages, fault settings and counters of one sandbox; thread-safe.

    All methods may be called from any thread. Webhook pushes need the server's event loop,
    which :class:`SandboxServer` (or :func:`main`) attaches; pushes of messages created before
    that are scheduled once the loop is attached.
    """

    def __init__(self, config: SandboxConfig | None = None) -> None:
        self._lock = threading.Lock()
        self._pusher = Pusher(self._lock, lambda: self._config)
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
            self._planner = Planner(config)
            seed = config.seed
            # Faults draw from their own generator so they never shift the outcome sequence.
            self._fault_rng = random.Random(None if seed is None else seed + 1)

    def _init_data(self) -> None:
        # Caller holds the lock (or the object is not shared yet).
        self._messages: dict[str, Message] = {}
        self._next_list_id = _FIRST_LIST_ID
        self._requests = 0
        self._status_requests = 0
        self._send_requests = 0
        self._admin_requests = 0
        self._auth: dict[str, int] = {"header": 0, "basic": 0, "basic-key": 0}
        self._responses: dict[int, int] = {}
        self._faults = Faults()

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
        spec = parse_scripted(
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
            self._pusher.forget()
            self._init_data()

    def clear_faults(self) -> None:
        """Turn every fault off and empty the per-message fault queues."""
        with self._lock:
            self._faults.clear()

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
        settings = parse_faults(
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

    # ------------------------------------------- internals, for the app and the server

    def _apply_faults(self, settings: dict[str, Any]) -> None:
        with self._lock:
            self._faults.apply(settings)

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
        """Store messages checked by :func:`parse_scripted`, in one list; their ids."""
        now = time.time()
        created: list[Message] = []
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
                message = Message(
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
        self._pusher.after_create(created)
        return [message.message_id for message in created]

    def _send(self, items: list[object]) -> dict[str, object]:
        """Handle a ``POST /bat/messagelist`` body's messages; returns the answer."""
        now = time.time()
        results: list[dict[str, object]] = []
        created: list[Message] = []
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
                reason = rejection(to, kind, text)
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
                count = parts(text or "")
                timeline, cost, fallback = self._planner.plan(kind, count)
                extended: dict[str, object] | None = {} if kind.startswith("viber_") else None
                message = Message(
                    self._new_message_id(), list_id, now, timeline, cost, count, extended, fallback
                )
                self._messages[message.message_id] = message
                created.append(message)
                result["messageId"] = message.message_id
                result["status"] = "accepted"
                result["parts"] = count
                results.append(result)
        self._pusher.after_create(created)
        return {"messagelistId": list_id, "messages": results}

    def _answer_status(self, message_id: str, auth: str | None) -> StatusAnswer:
        """``GET /bat/message/{id}``: one locked section for lookup, fault and counting."""
        now = time.time()
        fault: str | None = None
        body = b""
        with self._lock:
            self._requests += 1
            self._status_requests += 1
            message = self._messages.get(message_id) if auth is not None else None
            if auth is None:
                code = 401
            else:
                self._auth[auth] += 1
                if message is None:
                    code = 404
                else:
                    message.poll_times.append(now)
                    fault = self._faults.next(message_id, self._fault_rng)
                    if fault == "500":
                        code = 500
                    elif fault == "429":
                        code = 429
                    elif fault == "401":
                        code = 401
                    else:
                        code = 200
                        if fault != "malformed":
                            body = dumps(message.body(now))
            self._responses[code] = self._responses.get(code, 0) + 1
            faults = self._faults
            return StatusAnswer(code, fault, body, faults.retry_after, faults.slow_seconds)

    def _count(
        self,
        code: int,
        *,
        status_route: bool = False,
        send_route: bool = False,
        auth: str | None = None,
    ) -> None:
        """Count one ``/bat/`` request answered ``code``."""
        with self._lock:
            self._requests += 1
            if status_route:
                self._status_requests += 1
            if send_route:
                self._send_requests += 1
            if auth is not None:
                self._auth[auth] += 1
            self._responses[code] = self._responses.get(code, 0) + 1

    def _count_admin(self) -> None:
        with self._lock:
            self._admin_requests += 1

    # ------------------------------------------------------------ webhook pushes

    def _attach_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Bind the event loop that sends webhooks; called on that loop's thread."""
        self._pusher.attach_loop(loop)

    def _bind_running_loop(self) -> None:
        """Bind the running loop unless one is bound (a foreign server without lifespan)."""
        loop = self._pusher.loop
        if loop is None or loop.is_closed():
            self._pusher.attach_loop(asyncio.get_running_loop())

    async def _aclose(self) -> None:
        """Cancel in-flight pushes and close the push client; run on the loop at shutdown."""
        await self._pusher.aclose()
