"""The raw ASGI plumbing the sandbox's routes share: JSON answers, bounded body reads, and
the deliberately truncated answer (with the quieting of uvicorn's error line about it)."""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from smsbat_tracker.tools.serving import Receive, Send

__all__ = [
    "INTERNAL",
    "MALFORMED",
    "MESSAGE_NOT_FOUND",
    "NOT_FOUND",
    "OK",
    "RATE_LIMITED",
    "UNAUTHORIZED",
    "dumps",
    "method_not_allowed",
    "read_body",
    "read_json",
    "respond",
    "respond_truncated",
]

UNAUTHORIZED = b'{"error":"unauthorized"}'
NOT_FOUND = b'{"error":"not found"}'
MESSAGE_NOT_FOUND = b'{"error":"message not found"}'
INTERNAL = b'{"error":"internal"}'
RATE_LIMITED = b'{"error":"rate limited"}'
MALFORMED = b'{"deliverystatus": '
OK = b'{"ok":true}'

_JSON_HEADERS: list[tuple[bytes, bytes]] = [(b"content-type", b"application/json")]
_MAX_BODY = 64 * 1024 * 1024  # local tool: refuse absurd request bodies instead of buffering them
_UVICORN_INCOMPLETE = "ASGI callable returned without completing response."


def dumps(obj: object) -> bytes:
    """Compact JSON bytes, as the API answers."""
    return json.dumps(obj, separators=(",", ":")).encode()


def method_not_allowed() -> bytes:
    return b'{"error":"method not allowed"}'


async def respond(
    send: Send,
    status: int,
    body: bytes,
    *,
    allow: bytes | None = None,
    retry_after: bytes | None = None,
) -> None:
    """Send a whole JSON answer (with ``Allow`` or ``Retry-After`` when given)."""
    headers = [*_JSON_HEADERS, (b"content-length", str(len(body)).encode())]
    if allow is not None:
        headers.append((b"allow", allow))
    if retry_after is not None:
        headers.append((b"retry-after", retry_after))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def read_body(receive: Receive) -> bytes | None:
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


async def read_json(receive: Receive, send: Send) -> dict[str, Any] | None:
    """Read a JSON object body; on failure answer 400 and return None."""
    body = await read_body(receive)
    if body is None:
        await respond(send, 400, b'{"error":"request body too large"}')
        return None
    try:
        payload = json.loads(body) if body.strip() else {}
    except (ValueError, UnicodeDecodeError):
        payload = None
    if not isinstance(payload, dict):
        await respond(send, 400, b'{"error":"body must be a JSON object"}')
        return None
    return payload


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


async def respond_truncated(send: Send, body: bytes) -> None:
    """Announce the full length, send half of the body, then let uvicorn drop the socket."""
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [*_JSON_HEADERS, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body[: len(body) // 2], "more_body": True})
    # Returning now makes uvicorn close the connection (the client sees a short body).
    _truncation_filter.expect()
