"""What the webhook accepts: the push's wire model, its limits, and reading one from a request.

:class:`PushBody` is the one source of the receiver's checks and of the request body in
the OpenAPI document; :class:`Accepted`, :class:`Rejection`, :class:`Unauthorized` and
:class:`Health` shape the answers. :func:`read_push` turns a request into a :class:`Push`
or raises :class:`PushRejected` (400, 413, 415 or 422).
"""

from __future__ import annotations

import json
from contextlib import aclosing
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

from smsbat_tracker.provider.models import MAX_MESSAGE_ID_LENGTH, MESSAGE_ID_PATTERN, MessageStatus

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_STATUS_LENGTH",
    "MAX_TIMESTAMP_LENGTH",
    "Accepted",
    "Health",
    "Push",
    "PushBody",
    "PushRejected",
    "Rejection",
    "Unauthorized",
    "parse_push",
    "read_push",
]

MAX_BODY_BYTES: Final = 64 * 1024
MAX_STATUS_LENGTH: Final = 64
MAX_TIMESTAMP_LENGTH: Final = 64

_JSON_CHARSETS: Final = frozenset({"utf-8", "utf8"})


class PushRejected(Exception):
    """A request the webhook refuses: the HTTP status, a message and the offending field."""

    def __init__(self, status_code: int, error: str, field: str | None = None) -> None:
        super().__init__(error)
        self.status_code = status_code
        self.error = error
        self.field = field

    def response(self) -> JSONResponse:
        """The JSON answer for this rejection."""
        return JSONResponse({"error": self.error, "field": self.field}, self.status_code)


@dataclass(frozen=True, slots=True)
class Push:
    """One validated push: the status to cache and the provider's timestamp (epoch s)."""

    message_id: str
    status: MessageStatus
    ts: float


def _reject_constant(name: str) -> Any:
    # json.loads accepts NaN and Infinity by default; JSON itself does not.
    raise ValueError(f"{name} is not valid JSON")


def _timestamp_epoch(value: str) -> float:
    """Epoch seconds of an ISO-8601 date and time with a timezone; ValueError otherwise."""
    text = value[:-1] + "+00:00" if value[-1:] in ("Z", "z") else value
    try:
        when = datetime.fromisoformat(text)
    except (ValueError, TypeError, OverflowError):
        raise ValueError("not an ISO-8601 date and time") from None
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError("must carry a timezone (e.g. Z or +02:00)")
    try:
        return when.timestamp()
    except (ValueError, OverflowError):  # pragma: no cover - aware datetimes always convert
        raise ValueError("out of range") from None


class PushBody(BaseModel):
    """A status push as the provider sends it: the one source of the receiver's checks and
    of the request body in its OpenAPI document. Fields added later are ignored."""

    model_config = ConfigDict(
        strict=True,
        extra="ignore",
        json_schema_extra={
            "example": {
                "messageId": "abc123def456",
                "deliverystatus": "delivered",
                "timestamp": "2025-01-23T10:30:00Z",
                "cost": 0.05,
            }
        },
    )

    messageId: Annotated[
        str,
        Field(min_length=1, max_length=MAX_MESSAGE_ID_LENGTH, pattern=MESSAGE_ID_PATTERN),
    ]
    # Visible ASCII only: a pushed status ends up in the cache, in log lines and in callback
    # results, where whitespace and control characters (line breaks) only do harm.
    deliverystatus: Annotated[
        str,
        Field(
            min_length=1,
            max_length=MAX_STATUS_LENGTH,
            pattern=r"^[!-~]+$",
            description="scheduled, processing, delivered, undeliverable, permanenterror; "
            "unknown values are kept and treated as not final",
        ),
    ]
    timestamp: Annotated[
        str,
        Field(
            min_length=1,
            max_length=MAX_TIMESTAMP_LENGTH,
            json_schema_extra={"format": "date-time"},
            description="ISO-8601 with a timezone; orders late and duplicate pushes",
        ),
    ]
    cost: Annotated[float | None, Field(allow_inf_nan=False)] = None

    @field_validator("timestamp")
    @classmethod
    def _aware_timestamp(cls, value: str) -> str:
        _timestamp_epoch(value)
        return value


class Accepted(BaseModel):
    """200: the push was stored, or ignored as a duplicate or stale one."""

    status: Literal["stored", "ignored"]
    final: bool = Field(description="whether the pushed status is final")


class Rejection(BaseModel):
    """400, 404, 413, 415, 422, 501 and 503: what was wrong."""

    error: str
    field: str | None = Field(
        description="the offending body field, null when the body as a whole is bad"
    )


class Unauthorized(BaseModel):
    """401: a missing or wrong token (a push) or login (a campaign page)."""

    error: Literal["unauthorized"]


class Health(BaseModel):
    """``GET /healthz``."""

    status: Literal["ok", "unavailable"]


def parse_push(body: bytes) -> Push:
    """Validate a push body; raise :class:`PushRejected` (400 or 422) when it is unusable.

    400 for anything that is not one UTF-8 JSON object; 422 naming the first bad field
    (:class:`PushBody` holds the rules).
    """
    try:
        data = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except Exception:  # decode errors, bad JSON, too deep, too-long integers: all 400
        raise PushRejected(400, "body is not valid UTF-8 JSON") from None
    if not isinstance(data, dict):
        raise PushRejected(400, "body must be a JSON object")
    try:
        push = PushBody.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_context=False, include_input=False)[0]
        name = str(first["loc"][0]) if first["loc"] else None
        message = str(first["msg"]).removeprefix("Value error, ")
        raise PushRejected(422, f"{name}: {message}" if name else message, name) from None
    fields: dict[str, Any] = {"deliverystatus": push.deliverystatus, "messageId": push.messageId}
    if "cost" in push.model_fields_set:  # absent stays unset: the cache shows what was sent
        fields["cost"] = push.cost
    status = MessageStatus(**fields)
    return Push(message_id=push.messageId, status=status, ts=_timestamp_epoch(push.timestamp))


def _is_json_media_type(value: str | None) -> bool:
    """``application/json``, optionally with ``charset=utf-8``; nothing else."""
    if value is None:
        return False
    media, _, params = value.partition(";")
    if media.strip().lower() != "application/json":
        return False
    params = params.strip()
    if not params:
        return True
    name, sep, charset = params.partition("=")
    return (
        bool(sep)
        and name.strip().lower() == "charset"
        and charset.strip().strip('"').lower() in _JSON_CHARSETS
    )


async def read_push(request: Request) -> Push:
    """Check the media type and size, read the body while streaming, and parse it."""
    if not _is_json_media_type(request.headers.get("content-type")):
        raise PushRejected(415, "Content-Type must be application/json")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise PushRejected(400, "invalid Content-Length")
        if int(declared) > MAX_BODY_BYTES:
            raise PushRejected(413, f"body larger than {MAX_BODY_BYTES} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async with aclosing(request.stream()) as stream:
            async for chunk in stream:
                size += len(chunk)
                if size > MAX_BODY_BYTES:  # chunked or lying Content-Length: stop reading
                    raise PushRejected(413, f"body larger than {MAX_BODY_BYTES} bytes")
                chunks.append(chunk)
    except ClientDisconnect:
        raise PushRejected(400, "client disconnected before the body ended") from None
    return parse_push(b"".join(chunks))
