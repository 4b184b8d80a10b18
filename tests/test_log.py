"""Tests of smsbat_tracker.log: every rendered line, ours or the stdlib's, is free of secrets."""

from __future__ import annotations

import collections
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from smsbat_tracker import log as log_module
from smsbat_tracker.log import REDACTED, configure_logging, get_logger, redact, redact_text

MESSAGE_ID = "abc123def456"

# (text as it might appear in a message, the secret part that must never be shown)
FREE_TEXT = [
    ("X-Authorization-Key: sk_live_123", "sk_live_123"),
    ("x-authorization-key=sk_live_124", "sk_live_124"),
    ("Authorization: Basic dXNlcjpwYXNz", "dXNlcjpwYXNz"),
    ("sent Basic dXNlcjpwYXN6 to the API", "dXNlcjpwYXN6"),
    ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.e30.sig", "eyJhbGciOiJIUzI1NiJ9"),
    ("https://host/webhook?token=tok_123", "tok_123"),
    ("https://host/webhook?a=1&token=tok_124&b=2", "tok_124"),
    ("https://host/x?api_key=key_456", "key_456"),
    ("redis://:pw_789@host:6379/0", "pw_789"),
    ("redis://default:pw_790@host:6379/0", "pw_790"),
    ("https://user:pw_791@api.example.com/bat", "pw_791"),
    ("headers={'X-Webhook-Token': 'wh_tok_792'}", "wh_tok_792"),
    ('{"authorization": "Basic c2VjcmV0OnZhbHVl"}', "c2VjcmV0OnZhbHVl"),
]

# Keys whose value is secret whatever it looks like.
SECRET_KEYS = [
    "api_key",
    "apiKey",
    "api-key",
    "password",
    "passwd",
    "secret",
    "token",
    "webhook_token",
    "authorization",
    "Authorization",
    "X-Authorization-Key",
    "x-webhook-token",
    "SMSBAT_API_KEY",
    "SMSBAT_PASSWORD",
]


@pytest.fixture(autouse=True)
def restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Undo configure_logging: its handler, structlog's config, levels and registered secrets."""
    monkeypatch.setattr(log_module, "_registered", set())
    names = ("", "httpx", "httpcore")
    levels = {name: logging.getLogger(name).level for name in names}
    yield
    root = logging.getLogger()
    for handler in [h for h in root.handlers if h.get_name() == "smsbat-tracker"]:
        root.removeHandler(handler)
    structlog.reset_defaults()
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def json_lines(capsys: pytest.CaptureFixture[str]) -> tuple[str, list[dict[str, Any]]]:
    """What was written to stderr, and each line parsed as JSON (fails if one is not)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    return err, [json.loads(line) for line in lines]


def test_no_secret_reaches_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    """Secrets in values, keys, free text, nested dicts, stdlib records and exceptions are
    redacted in every JSON line, while non-secret context survives."""
    configure_logging(json=True, secrets=["reg_SECRET_value_77"])
    log = get_logger("smsbat_tracker.test")
    stdlib = logging.getLogger("celery.x")
    secrets = [secret for _, secret in FREE_TEXT] + [
        "sk_kw_1",
        "pw_kw_2",
        "auth_kw_3",
        "nested_pw_4",
        "nested_key_5",
        "reg_SECRET_value_77",
        "sk_exc_6",
        "pw_exc_7",
        "sk_std_8",
    ]

    log.info(
        "poll.start",
        message_id=MESSAGE_ID,
        api_key="sk_kw_1",
        password="pw_kw_2",
        authorization="auth_kw_3",
    )
    for text, _ in FREE_TEXT:
        log.info(text, message_id=MESSAGE_ID, detail=f"context: {text}")
        stdlib.info("celery says %s", text)
    log.info(
        "request",
        message_id=MESSAGE_ID,
        request={"auth": {"password": "nested_pw_4"}, "headers": [{"x-request-id": "ok"}]},
        headers={"X-Authorization-Key": "nested_key_5", "Accept": "application/json"},
        note="value reg_SECRET_value_77 inside",
        raw=b"X-Authorization-Key: sk_live_123",
    )
    stdlib.warning("connecting with key %s", "X-Authorization-Key: sk_std_8")
    try:
        raise RuntimeError("API refused X-Authorization-Key: sk_exc_6 (Basic cHdfZXhjXzc=)")
    except RuntimeError:
        log.exception("poll.failed", message_id=MESSAGE_ID)
        stdlib.exception("task failed for %s", MESSAGE_ID)
    try:
        raise ValueError("redis://:pw_exc_7@broker:6379/0 unreachable")
    except ValueError:
        log.exception("broker.down", message_id=MESSAGE_ID)

    err, events = json_lines(capsys)
    for secret in secrets:
        assert secret not in err, secret
    assert "cHdfZXhjXzc=" not in err
    assert len(events) == 2 * len(FREE_TEXT) + 6
    ours = [e for e in events if e["logger"] == "smsbat_tracker.test"]
    assert all(e["message_id"] == MESSAGE_ID for e in ours)
    assert ours[0]["api_key"] == ours[0]["password"] == ours[0]["authorization"] == REDACTED
    nested = next(e for e in ours if e["event"] == "request")
    assert nested["request"] == {
        "auth": {"password": REDACTED},
        "headers": [{"x-request-id": "ok"}],
    }
    assert nested["headers"]["Accept"] == "application/json"
    assert nested["note"] == f"value {REDACTED} inside"
    failures = [e for e in events if "exception" in e]
    assert len(failures) == 3
    assert "RuntimeError: API refused" in failures[0]["exception"]
    assert any(e["logger"] == "celery.x" and MESSAGE_ID in e["event"] for e in failures)
    assert {e["level"] for e in events} == {"info", "warning", "error"}


@pytest.mark.parametrize(("text", "secret"), FREE_TEXT)
@pytest.mark.parametrize("via", ["structlog-event", "structlog-value", "stdlib-arg"])
def test_free_text_secret_is_redacted(
    capsys: pytest.CaptureFixture[str], text: str, secret: str, via: str
) -> None:
    """A secret inside free text is replaced by [REDACTED], whichever way it is logged."""
    configure_logging(json=True)
    if via == "structlog-event":
        get_logger().info(text)
    elif via == "structlog-value":
        get_logger().info("event", detail=text)
    else:
        logging.getLogger("uvicorn.error").info("got %s", text)
    err, events = json_lines(capsys)
    assert len(events) == 1
    assert secret not in err
    assert REDACTED in err


@pytest.mark.parametrize("key", SECRET_KEYS)
def test_secret_keys_are_redacted(capsys: pytest.CaptureFixture[str], key: str) -> None:
    """A value under a secret-named key is redacted whatever it is; other keys are not."""
    configure_logging(json=True)
    get_logger().info("event", **{key: "plain_value_99", "other": "plain_value_98"})
    (event,) = json_lines(capsys)[1]
    assert event[key] == REDACTED
    assert event["other"] == "plain_value_98"


def test_registered_secret_is_redacted_everywhere(capsys: pytest.CaptureFixture[str]) -> None:
    """A value given to configure_logging(secrets=...) is redacted in any key or text."""
    configure_logging(json=True, secrets=["k3y_ab", None, "ab"])
    get_logger().info("using k3y_ab now", harmless="xk3y_abx", items=["k3y_ab"])
    logging.getLogger("celery.worker").info("k3y_ab")
    err, events = json_lines(capsys)
    assert "k3y_ab" not in err
    assert len(events) == 2
    # Too short to be registered safely: "ab" is left alone.
    assert events[0]["event"] == f"using {REDACTED} now"


def test_console_renderer_redacts_too(capsys: pytest.CaptureFixture[str]) -> None:
    """The human-readable renderer (json=False) gets the same redaction."""
    configure_logging(json=False)
    get_logger().info("event", api_key="sk_console_1", url="https://h/w?token=tok_console_2")
    logging.getLogger("celery.x").info("X-Authorization-Key: sk_console_3")
    err = capsys.readouterr().err
    assert "event" in err
    for secret in ("sk_console_1", "tok_console_2", "sk_console_3"):
        assert secret not in err


def test_configure_logging_is_idempotent(capsys: pytest.CaptureFixture[str]) -> None:
    """Configuring twice leaves one handler, so each event is written once."""
    configure_logging(json=True)
    configure_logging(json=True)
    root = logging.getLogger()
    assert [h.get_name() for h in root.handlers].count("smsbat-tracker") == 1
    get_logger().info("once")
    assert [e["event"] for e in json_lines(capsys)[1]] == ["once"]


def test_httpx_request_lines_are_quiet(capsys: pytest.CaptureFixture[str]) -> None:
    """httpx and httpcore INFO lines (full URLs of every request) are not written."""
    configure_logging(json=True, level="DEBUG")
    logging.getLogger("httpx").info("HTTP Request: GET https://h/bat/message/x")
    logging.getLogger("httpcore").info("connect_tcp.started")
    logging.getLogger("httpx").warning("retrying")
    assert [e["event"] for e in json_lines(capsys)[1]] == ["retrying"]


def test_redact_processor_unit() -> None:
    """redact() maps secret keys and texts, keeps processor meta keys (leading _) intact."""
    meta = object()
    event = redact(
        None,
        "info",
        {
            "event": "Authorization: Basic dXNlcjpwYXNz",
            "_record": meta,
            "password": "",
            "token": None,
            "count": 3,
            "ids": ("a", "redis://:pw@h/0"),
        },
    )
    assert event == {
        "event": f"Authorization: {REDACTED}",
        "_record": meta,
        "password": "",
        "token": None,
        "count": 3,
        "ids": ("a", f"redis://:{REDACTED}@h/0"),
    }


# --------------------------------------------------------------- leaks once found


def test_json_lines_carry_no_ansi_colour_codes(capsys: pytest.CaptureFixture[str]) -> None:
    """uvicorn adds a coloured copy of each message (``color_message``); JSON lines drop
    it, so no ANSI escape reaches a log file."""
    configure_logging(json=True)
    logging.getLogger("uvicorn.error").info(
        "Started server process [%d]",
        42,
        extra={"color_message": "Started server process [\x1b[36m%d\x1b[0m]"},
    )
    err, events = json_lines(capsys)
    assert events[0]["event"] == "Started server process [42]"
    assert "color_message" not in events[0]
    assert "\x1b" not in err
    assert "\\u001b" not in err


def test_stdlib_extra_secret_is_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    """A secret passed to a stdlib logger in extra= under a secret key is redacted."""
    configure_logging(json=True)
    logging.getLogger("celery.x").info(
        "login", extra={"api_key": "sk_extra_1", "message_id": MESSAGE_ID}
    )
    err, events = json_lines(capsys)
    assert events[0]["message_id"] == MESSAGE_ID
    assert "sk_extra_1" not in err


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("login failed: password=hunter2pw", "hunter2pw"),
        ("retrying with api_key=sk_free_1", "sk_free_1"),
        ("webhook token: tok_free_2", "tok_free_2"),
    ],
)
def test_free_text_key_value_secret_is_redacted(
    capsys: pytest.CaptureFixture[str], text: str, secret: str
) -> None:
    """password=..., api_key=... and token: ... in free text (an exception message) are hidden."""
    configure_logging(json=True)
    try:
        raise RuntimeError(text)
    except RuntimeError:
        get_logger().exception("failed")
    assert secret not in capsys.readouterr().err


def test_deeply_nested_secret_is_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    """A secret key nested eight dicts deep is still redacted."""
    configure_logging(json=True)
    deep: dict[str, Any] = {"password": "deep_pw_1"}
    for level in range(8):
        deep = {f"l{level}": deep}
    get_logger().info("event", payload=deep)
    err, events = json_lines(capsys)
    assert len(events) == 1
    assert "deep_pw_1" not in err


def test_namedtuple_value_does_not_break_logging(capsys: pytest.CaptureFixture[str]) -> None:
    """Logging a namedtuple value works and redacts its string fields."""
    configure_logging(json=True)
    point = collections.namedtuple("point", "name url")
    get_logger().info("event", where=point("a", "https://h/w?token=tok_nt_1"))
    err, events = json_lines(capsys)
    assert len(events) == 1
    assert "tok_nt_1" not in err


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("AUTHORIZATION: BEARER eyJhbGciOiJIUzI1NiJ9", "eyJhbGciOiJIUzI1NiJ9"),
        ("failed with PASSWD=hunter2x", "hunter2x"),
        ("Secret: s3cr3t_value", "s3cr3t_value"),
        ("WEBHOOK TOKEN = wh_999", "wh_999"),
        ("REDIS://:PW_793@HOST:6379/0", "PW_793"),
        ("?Api_Key=key_794", "key_794"),
    ],
)
def test_redaction_ignores_case(text: str, secret: str) -> None:
    """The quick "could this hold a secret" check is case-blind, like the patterns behind it."""
    assert secret not in redact_text(text)


def test_text_without_a_secret_word_comes_back_unchanged() -> None:
    """A line naming no credential is returned as it came (the common, fast case)."""
    line = "Task smsbat_tracker.track_message[abc] received: {'deadline': 120.0}"
    assert redact_text(line) is line
