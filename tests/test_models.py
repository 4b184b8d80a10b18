"""Unit tests of smsbat_tracker.provider.models: the message-id rule, statuses and wire models."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from smsbat_tracker.errors import InvalidMessageId, SmsbatError
from smsbat_tracker.provider.models import (
    FAILED_STATUSES,
    FINAL_STATUSES,
    MAX_MESSAGE_ID_LENGTH,
    MessageStatus,
    OutgoingMessage,
    SendResult,
    SentMessage,
    is_delivered,
    is_final,
    validate_message_id,
)

# --------------------------------------------------------------- validate_message_id


@pytest.mark.parametrize(
    "message_id",
    [
        "abc123def456",
        "A-b_c.d~e",
        "0",
        "Z",
        "9.9",
        "a..b",
        "a" * MAX_MESSAGE_ID_LENGTH,
        "5f2b8c1e-7d4a-4b6e-9a3c-2d1e0f9b8a7c",
    ],
)
def test_valid_ids_are_returned_unchanged(message_id: str) -> None:
    """Ids made of unreserved URL characters, starting alphanumeric, pass as they are."""
    assert validate_message_id(message_id) == message_id


def test_length_limit_is_128() -> None:
    """128 characters pass, 129 are refused with a message giving both lengths."""
    validate_message_id("x" * 128)
    with pytest.raises(InvalidMessageId, match=r"129 characters long; at most 128"):
        validate_message_id("x" * 129)


@pytest.mark.parametrize(
    ("value", "type_name"),
    [(None, "NoneType"), (123, "int"), (b"abc", "bytes"), (["abc"], "list"), (True, "bool")],
)
def test_non_strings_are_refused_by_type(value: object, type_name: str) -> None:
    """A non-str id is refused naming its type, never coerced (b"abc" is not "abc")."""
    with pytest.raises(InvalidMessageId, match=f"must be a string, not {type_name}"):
        validate_message_id(value)


def test_empty_id_is_refused() -> None:
    """The empty string is refused with its own message."""
    with pytest.raises(InvalidMessageId, match="must not be empty"):
        validate_message_id("")


@pytest.mark.parametrize(
    "message_id",
    [".", "..", ".abc", "-abc", "_abc", "~abc", "@abc", " abc"],
)
def test_id_must_start_with_letter_or_digit(message_id: str) -> None:
    """A leading non-alphanumeric character is refused, so "." and ".." can never pass."""
    with pytest.raises(InvalidMessageId, match="must start with a letter or digit"):
        validate_message_id(message_id)


@pytest.mark.parametrize(
    "message_id",
    ["a/b", "a?b", "a#b", "a%2fb", "a b", "a\nb", "abc\n", "a\x00b", "\u00e9t\u00e9", "a\u202eb"],
)
def test_id_outside_the_unreserved_set_is_refused(message_id: str) -> None:
    """Any character outside A-Z a-z 0-9 . _ ~ - (ASCII only) is refused, trailing \\n too."""
    with pytest.raises(InvalidMessageId, match=r"may contain only letters, digits"):
        validate_message_id(message_id)


def test_refusal_echoes_only_a_short_escaped_prefix() -> None:
    """The error quotes at most 40 characters of the id, escaped to printable ASCII."""
    hostile = "a\x1b[31m\u202e" + "z" * 100 + "\n"
    with pytest.raises(InvalidMessageId) as info:
        validate_message_id(hostile)
    text = str(info.value)
    assert text.isascii()
    assert text.isprintable()
    assert "z" * 41 not in text
    assert "\\x1b" in text  # escaped, not raw


def test_invalid_message_id_is_a_value_error_and_smsbat_error() -> None:
    """InvalidMessageId can be caught as ValueError or as SmsbatError."""
    assert issubclass(InvalidMessageId, ValueError)
    assert issubclass(InvalidMessageId, SmsbatError)


# ------------------------------------------------------------------- statuses


@pytest.mark.parametrize(
    ("status", "final", "delivered"),
    [
        ("delivered", True, True),
        ("undeliverable", True, False),
        ("permanenterror", True, False),
        ("scheduled", False, False),
        ("processing", False, False),
        ("expired", False, False),  # unknown: never final
        ("Delivered", False, False),  # case-sensitive
        ("", False, False),
        (None, False, False),
    ],
)
def test_is_final_and_is_delivered(status: str | None, final: bool, delivered: bool) -> None:
    """Only the three documented final states are final; only "delivered" is delivered."""
    assert is_final(status) is final
    assert is_delivered(status) is delivered


def test_status_sets() -> None:
    """FINAL_STATUSES is delivered plus the two failure states."""
    assert frozenset({"undeliverable", "permanenterror"}) == FAILED_STATUSES
    assert frozenset({"delivered", "undeliverable", "permanenterror"}) == FINAL_STATUSES


def test_message_status_properties_follow_deliverystatus() -> None:
    """MessageStatus.is_final/is_delivered agree with the module functions."""
    assert MessageStatus(deliverystatus="delivered").is_delivered
    failed = MessageStatus(deliverystatus="undeliverable")
    assert failed.is_final
    assert not failed.is_delivered
    unknown = MessageStatus(deliverystatus="queued_at_carrier")
    assert not unknown.is_final


@pytest.mark.parametrize(
    ("fallbacks", "used"),
    [
        (None, False),
        ([], False),
        ([{"type": "sms", "status": "not_used"}], False),
        ([{"type": "sms"}], False),
        ([{"type": "sms", "status": None}], False),
        ([{"type": "sms", "status": ""}], False),
        ([{"type": "sms", "status": "delivered"}], True),
        ([{"type": "rcs", "status": "not_used"}, {"type": "sms", "status": "delivered"}], True),
    ],
)
def test_used_fallback(fallbacks: list[dict[str, Any]] | None, used: bool) -> None:
    """used_fallback is True only when some fallback step has a status other than not_used."""
    body: dict[str, Any] = {"deliverystatus": "delivered"}
    if fallbacks is not None:
        body["fallbacks"] = fallbacks
    assert MessageStatus.model_validate(body).used_fallback is used


def test_to_json_dict_returns_only_what_was_sent() -> None:
    """An early body round-trips without invented fields; extras of the API are kept."""
    early = {"deliverystatus": "scheduled", "partscount": 1}
    assert MessageStatus.model_validate(early).to_json_dict() == early
    with_extra = {"deliverystatus": "processing", "carrier": {"mcc": "255", "mnc": "01"}}
    assert MessageStatus.model_validate(with_extra).to_json_dict() == with_extra


def test_message_status_is_frozen_and_needs_a_status() -> None:
    """A status cannot be mutated, and an empty deliverystatus is invalid."""
    status = MessageStatus(deliverystatus="processing")
    with pytest.raises(ValidationError):
        status.deliverystatus = "delivered"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        MessageStatus(deliverystatus="")
    with pytest.raises(ValidationError):
        MessageStatus.model_validate({"partscount": 1})


# -------------------------------------------------------------- outgoing messages


def test_outgoing_message_reads_and_writes_the_from_alias() -> None:
    """The wire name "from" maps to .sender both ways; the field name is accepted too."""
    message = OutgoingMessage.model_validate({"from": "SMSBAT", "to": "+380501234567", "text": "x"})
    assert message.sender == "SMSBAT"
    assert OutgoingMessage(sender="SMSBAT", to="+380501234567", text="x") == message
    dumped = message.model_dump(by_alias=True, exclude_none=True)
    assert dumped == {"from": "SMSBAT", "to": "+380501234567", "type": "sms", "text": "x"}
    assert "sender" not in dumped


@pytest.mark.parametrize(
    "changes",
    [
        {"to": "380501234567"},
        {"to": "+0501234567"},
        {"to": "+12345"},
        {"to": "+1234567890123456"},
        {"to": "+380 50 123 45 67"},
        {"to": "+380501234567\n"},
        {"from": ""},
        {"text": ""},
        {"ttl": 0},
        {"unexpected": 1},
    ],
)
def test_outgoing_message_validation(changes: dict[str, Any]) -> None:
    """Bad numbers (not E.164), empty sender/text, ttl <= 0 and unknown fields are refused."""
    body = {"from": "SMSBAT", "to": "+380501234567", "text": "hello", **changes}
    with pytest.raises(ValidationError):
        OutgoingMessage.model_validate(body)


# ------------------------------------------------------------------ send result


def test_send_result_message_ids_lists_accepted_ones_in_order() -> None:
    """message_ids keeps the send order and skips rejected, failed and id-less entries."""
    result = SendResult.model_validate(
        {
            "messagelistId": 100001,
            "messages": [
                {"messageId": "m2", "status": "accepted", "parts": 1},
                {"messageId": None, "status": "rejected", "reason": "bad number"},
                {"messageId": "m1", "status": "accepted", "parts": 2},
                {"messageId": "m3", "status": "failed"},
                {"messageId": "", "status": "accepted"},
            ],
        }
    )
    assert result.message_ids == ["m2", "m1"]
    assert [m.accepted for m in result.messages] == [True, False, True, False, False]
    assert result.messages[1].model_extra == {"reason": "bad number"}


def test_sent_message_accepted_needs_an_id() -> None:
    """An accepted entry without an id is not counted as accepted."""
    assert SentMessage(status="accepted", messageId="m").accepted
    assert not SentMessage(status="accepted").accepted
