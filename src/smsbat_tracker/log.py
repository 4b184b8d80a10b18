"""Logging: structlog configured once for the package's own worker, CLI and web app.

Nothing is configured at import: a host process (a user's worker or web server after
``init_app``) keeps its own logging, and the package's lines reach it through the
standard library (:class:`PoliteLogger`).

JSON lines when stderr is not a terminal, a readable console otherwise. The standard
library's loggers (Celery, httpx, uvicorn) go through the same processors, so every line,
ours or theirs, passes :func:`redact` and never shows an API key, a password, an
``Authorization`` header or a webhook token.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections.abc import Iterable, MutableMapping
from typing import Any

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

__all__ = [
    "REDACTED",
    "PoliteLogger",
    "configure_logging",
    "get_logger",
    "redact",
    "redact_text",
    "register_secret",
]

REDACTED = "[REDACTED]"

# Keys whose values are secret wherever they appear in an event.
_SECRET_KEYS = re.compile(
    r"(?i)^(api[_-]?key|password|passwd|secret|token|webhook[_-]?token|authorization|"
    r"x-authorization-key|x-webhook-token|smsbat_api_key|smsbat_password|smsbat_webhook_token|"
    r"smsbat_report_password|report_password)$"
)
# Secrets inside free text: header lines, Basic/Bearer credentials, URL tokens, URL passwords.
_SECRET_PATTERNS = (
    re.compile(
        r"(?i)(x-authorization-key|x-webhook-token|authorization)(['\"]?\s*[:=]\s*['\"]?)"
        r"(basic\s+|bearer\s+)?[^\s'\",}]+"
    ),
    re.compile(r"(?i)\b(basic|bearer)\s+[A-Za-z0-9+/=._~-]{6,}"),
    re.compile(r"(?i)([?&](?:token|api_key|key|password)=)[^&\s'\"]+"),
    re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@\s/]+(@)"),
    # key=value / key: value pairs in free text, e.g. an exception message.
    re.compile(
        r"(?i)\b(api[_-]?key|password|passwd|secret|webhook[_ -]?token|token)"
        r"(['\"]?\s*[:=]\s*['\"]?)(?!\[REDACTED\])[^\s'\",}&]+"
    ),
)

# Every pattern above needs one of these (lower-case) in the text to match.
_PATTERN_WORDS = ("authorization", "basic", "bearer", "token", "key", "passw", "secret", "://")

# Containers nested deeper than this are replaced whole rather than inspected.
_MAX_DEPTH = 8

_registered: set[str] = set()
_registered_lock = threading.Lock()


def register_secret(value: str | None) -> None:
    """Redact this exact value from every later log line (settings register theirs)."""
    if value and len(value) >= 4:
        with _registered_lock:
            _registered.add(value)


def redact_text(text: str) -> str:
    """``text`` with every known secret and secret-looking value replaced."""
    return _redact_text(text)


def _redact_text(text: str) -> str:
    for secret in _registered:
        if secret in text:
            text = text.replace(secret, REDACTED)
    lowered = text.lower()
    if not any(word in lowered for word in _PATTERN_WORDS):
        return text  # most lines: five regular-expression passes saved
    text = _SECRET_PATTERNS[0].sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)
    text = _SECRET_PATTERNS[1].sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    text = _SECRET_PATTERNS[2].sub(lambda m: f"{m.group(1)}{REDACTED}", text)
    text = _SECRET_PATTERNS[3].sub(lambda m: f"{m.group(1)}{REDACTED}{m.group(2)}", text)
    return _SECRET_PATTERNS[4].sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)


def _redact_value(key: str | None, value: Any, depth: int = 0) -> Any:
    if key is not None and _SECRET_KEYS.match(key) and value not in (None, ""):
        return REDACTED
    if isinstance(value, str):
        return _redact_text(value)
    if isinstance(value, MutableMapping | list | tuple) and depth > _MAX_DEPTH:
        return REDACTED  # too deep to inspect: fail closed
    if isinstance(value, MutableMapping):
        return {k: _redact_value(str(k), v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        items = [_redact_value(None, v, depth + 1) for v in value]
        if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
            return type(value)(*items)
        return type(value)(items)
    if isinstance(value, bytes | bytearray):
        return _redact_text(bytes(value).decode("utf-8", "replace"))
    # Other objects (log records, exceptions) pass; the rendered line is redacted again.
    return value


def redact(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
    """structlog processor: replace secrets in every key and value of the event."""
    return {
        k: v if k.startswith("_") else _redact_value(k, v)  # "_record" etc. are processor meta
        for k, v in event_dict.items()
    }


class _RedactRendered:
    """Wraps the final renderer: the finished line (tracebacks, reprs) gets one more pass."""

    def __init__(self, renderer: Processor) -> None:
        self._renderer = renderer

    def __call__(self, logger: WrappedLogger, name: str, event_dict: EventDict) -> Any:
        line = self._renderer(logger, name, event_dict)
        return _redact_text(line) if isinstance(line, str) else line


def _drop_color_message(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
    """uvicorn passes a copy of each message with ANSI colour codes as ``color_message``."""
    event_dict.pop("color_message", None)
    return event_dict


def _shared_processors() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact,
    ]


def configure_logging(
    *, json: bool | None = None, level: int | str = "INFO", secrets: Iterable[str | None] = ()
) -> None:
    """Configure structlog and the standard library's root logger (idempotent).

    ``json`` defaults to "stderr is not a terminal". ``secrets`` are exact values to
    redact in addition to the key and pattern rules.
    """
    for secret in secrets:
        register_secret(secret)
    if json is None:
        json = not sys.stderr.isatty()
    renderer: Processor
    if json:
        renderer = structlog.processors.JSONRenderer()
        tail: list[Processor] = [structlog.processors.format_exc_info]
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        tail = []
    shared = _shared_processors()
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: structlog.testing.capture_logs must reach loggers made earlier.
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        # ExtraAdder first: stdlib extra= values must pass the redaction too.
        foreign_pre_chain=[structlog.stdlib.ExtraAdder(), _drop_color_message, *shared],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *tail,
            _RedactRendered(renderer),
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    handler.set_name("smsbat-tracker")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "smsbat-tracker"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # Python's warnings (Celery's deprecation paragraphs, its root-user warning) go through
    # the same handler: one line each, JSON off a terminal.
    logging.captureWarnings(True)
    # httpx logs every request at INFO; keep it for debugging only.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


class PoliteLogger:
    """The package's logger: where its lines go is the host process's choice.

    Where structlog is configured (the package's own worker, CLI and receiver configure
    it with :func:`configure_logging`; a host may too), events go through structlog. In a
    host that never configured it (a user's Celery worker or web process after
    ``init_app``), they go to the standard library's logger of the same name, as one
    redacted line ``event key=value ...``, through the host's handlers and levels:
    structlog's default would print them to stdout.
    """

    __slots__ = ("_std", "_structured")

    def __init__(self, name: str) -> None:
        self._structured = structlog.get_logger(name)
        self._std = logging.getLogger(name)

    def _emit(self, level: int, event: str, fields: dict[str, Any]) -> None:
        if structlog.is_configured():
            self._structured.log(level, event, **fields)
            return
        std = self._std
        if std.isEnabledFor(level):
            exc_info = bool(fields.pop("exc_info", False))
            values = redact(None, "", {**structlog.contextvars.get_contextvars(), **fields})
            text = " ".join(f"{key}={value!r}" for key, value in values.items())
            std.log(level, "%s %s", event, text, exc_info=exc_info)

    def debug(self, event: str, **fields: Any) -> None:
        """Log ``event`` at DEBUG with ``fields``."""
        self._emit(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        """Log ``event`` at INFO with ``fields``."""
        self._emit(logging.INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        """Log ``event`` at WARNING with ``fields``."""
        self._emit(logging.WARNING, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        """Log ``event`` at ERROR with ``fields``."""
        self._emit(logging.ERROR, event, fields)

    def exception(self, event: str, **fields: Any) -> None:
        """Log ``event`` at ERROR with ``fields`` and the exception being handled."""
        self._emit(logging.ERROR, event, {**fields, "exc_info": True})


def get_logger(name: str = "smsbat_tracker") -> PoliteLogger:
    """The package's logger for ``name`` (see :class:`PoliteLogger`); events carry the
    task and message bound in context."""
    return PoliteLogger(name)
