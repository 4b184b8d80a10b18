"""Typed models of what the SMSBAT API sends and answers, and the message-id rule."""

from __future__ import annotations

import re
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field

from smsbat_tracker.errors import InvalidMessageId

__all__ = [
    "DELIVERED",
    "FAILED_STATUSES",
    "FINAL_STATUSES",
    "IN_FLIGHT",
    "MAX_MESSAGE_ID_LENGTH",
    "MESSAGE_ID_PATTERN",
    "Fallback",
    "MessageStatus",
    "OutgoingMessage",
    "SendResult",
    "SentMessage",
    "is_delivered",
    "is_final",
    "validate_message_id",
]

SCHEDULED: Final = "scheduled"
PROCESSING: Final = "processing"
DELIVERED: Final = "delivered"
UNDELIVERABLE: Final = "undeliverable"
PERMANENTERROR: Final = "permanenterror"
FAILED_STATUSES: Final = frozenset({UNDELIVERABLE, PERMANENTERROR})
FINAL_STATUSES: Final = frozenset({DELIVERED, *FAILED_STATUSES})
# The documented statuses before a final one; any other status is unknown (logged once).
IN_FLIGHT: Final = frozenset({SCHEDULED, PROCESSING})

MAX_MESSAGE_ID_LENGTH: Final = 128
# Unreserved URL characters only, starting with a letter or digit: such an id is always
# exactly one path segment, never "." or "..", and needs no percent-encoding.
MESSAGE_ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._~-]*$"
_MESSAGE_ID_RE: Final = re.compile(MESSAGE_ID_PATTERN)


def validate_message_id(message_id: object) -> str:
    """Return ``message_id`` if it is safe to put in ``/bat/message/{id}``.

    Raises :class:`InvalidMessageId` otherwise, naming the problem but echoing at most a
    short, escaped prefix of the value (ids come from outside and may be hostile).
    """
    if not isinstance(message_id, str):
        raise InvalidMessageId(f"message id must be a string, not {type(message_id).__name__}")
    if not message_id:
        raise InvalidMessageId("message id must not be empty")
    if len(message_id) > MAX_MESSAGE_ID_LENGTH:
        raise InvalidMessageId(
            f"message id is {len(message_id)} characters long; at most "
            f"{MAX_MESSAGE_ID_LENGTH} are allowed"
        )
    if not _MESSAGE_ID_RE.fullmatch(message_id):
        shown = ascii(message_id[:40])
        raise InvalidMessageId(
            f"message id {shown} may contain only letters, digits and . _ ~ - "
            "and must start with a letter or digit"
        )
    return message_id


def is_final(deliverystatus: str | None) -> bool:
    """Whether a delivery status is final; unknown and missing statuses are not."""
    return deliverystatus in FINAL_STATUSES


def is_delivered(deliverystatus: str | None) -> bool:
    """Whether a delivery status means the message reached its recipient."""
    return deliverystatus == DELIVERED


class Fallback(BaseModel):
    """One step of a fallback chain, e.g. ``{"type": "sms", "status": "not_used"}``."""

    model_config = ConfigDict(extra="allow")

    type: str
    status: str | None = None


class MessageStatus(BaseModel):
    """The body of ``GET /bat/message/{messageId}``, basic or extended.

    Early states may omit every field but ``deliverystatus``; fields the API adds later
    are kept (``extra="allow"``) and round-trip through :meth:`to_json_dict`.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    deliverystatus: str = Field(min_length=1)
    messagelistId: int | None = None
    messageId: str | None = None
    partscount: int | None = None
    cost: float | None = None
    fallbacks: list[Fallback] | None = None
    extendedStatuses: dict[str, str | None] | None = None
    rate: float | None = None
    rateAmount: float | None = None
    rateCurrency: str | None = None
    billAmount: float | None = None
    billCurrency: str | None = None

    @property
    def is_final(self) -> bool:
        """True for delivered, undeliverable and permanenterror."""
        return is_final(self.deliverystatus)

    @property
    def is_delivered(self) -> bool:
        """True when the message reached its recipient."""
        return is_delivered(self.deliverystatus)

    @property
    def used_fallback(self) -> bool:
        """True when a fallback channel (e.g. SMS after Viber) carried the message."""
        return any(f.status not in (None, "", "not_used") for f in self.fallbacks or ())

    def to_json_dict(self) -> dict[str, Any]:
        """The body as the API sent it: set fields and unknown extras, nothing invented."""
        return self.model_dump(mode="json", exclude_unset=True)


class OutgoingMessage(BaseModel):
    """One message for ``POST /bat/messagelist``."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid")

    sender: str = Field(alias="from", min_length=1)
    # [0-9], not \d: \d also matches fullwidth and other non-ASCII digits.
    to: str = Field(pattern=r"^\+[1-9][0-9]{6,14}$")
    type: str = "sms"
    text: str = Field(min_length=1)
    customerMessageId: str | None = None
    ttl: int | None = Field(default=None, gt=0)
    messageData: dict[str, Any] | None = None


class SentMessage(BaseModel):
    """One entry of the send answer's ``messages`` list."""

    model_config = ConfigDict(extra="allow")

    messageId: str | None = None
    status: str
    parts: int | None = None
    customerMessageId: str | None = None
    to: str | None = None

    @property
    def accepted(self) -> bool:
        """True when the provider accepted the message and gave it an id."""
        return self.status == "accepted" and bool(self.messageId)


class SendResult(BaseModel):
    """The answer of ``POST /bat/messagelist``."""

    model_config = ConfigDict(extra="allow")

    messagelistId: int | None = None
    messages: list[SentMessage]

    @property
    def message_ids(self) -> list[str]:
        """Ids of the accepted messages, in the order they were sent."""
        return [m.messageId for m in self.messages if m.accepted and m.messageId]
