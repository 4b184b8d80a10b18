"""Every exception smsbat-tracker raises, rooted at :class:`SmsbatError`.

Errors from the SMSBAT API are split in two families, because the tracker reacts to
them differently: a :class:`TransientError` is retried on the polling schedule, a
:class:`PermanentError` ends tracking with the outcome ``error``.

No message in this module ever contains a credential: exceptions are logged and may
be stored by Celery, so they carry status codes and field names, never secrets.
"""

from __future__ import annotations

__all__ = [
    "AnswerLate",
    "AuthenticationError",
    "ClientError",
    "ConfigError",
    "ConnectionFailed",
    "InvalidMessageId",
    "MalformedResponse",
    "MessageNotFound",
    "MissingExtra",
    "NotInitialised",
    "PermanentError",
    "RateLimited",
    "RequestTimeout",
    "ServerError",
    "SmsbatError",
    "TransientError",
    "UnsupportedVersion",
]


class SmsbatError(Exception):
    """Raised when anything in smsbat-tracker fails; the base of every error it raises."""


class ConfigError(SmsbatError, ValueError):
    """Raised when settings are missing or invalid at start-up.

    The message names each offending environment variable, e.g. ``SMSBAT_BASE_URL``.
    """


class UnsupportedVersion(ConfigError):
    """Raised when a patched library (Celery, kombu, billiard) is at a version the tracker's
    patch of it was not made for: at worker start, or before a tracker task's first retry
    outside a worker. Names the package, its version and the range the patch knows."""

    def __init__(self, package: str, version: str, supported: str) -> None:
        super().__init__(
            f"{package} {version} is not supported by smsbat-tracker's patch of it"
            f" (known: {supported}); install a {package} in that range"
        )
        self.package = package
        self.version = version
        self.supported = supported


class MissingExtra(SmsbatError, ImportError):
    """Raised when a feature needs an optional dependency that is not installed; the
    message names the extra to install (``pip install 'smsbat-tracker[report]'``)."""


class NotInitialised(ConfigError):
    """Raised when a tracker task is used through a Celery app that never called
    ``smsbat_tracker.init_app(app)``; the message names the app."""


class InvalidMessageId(SmsbatError, ValueError):
    """Raised when a message id is empty, too long or not safe in one URL path segment.

    Raised before any request is sent, so a hostile id never reaches the network.
    """


class TransientError(SmsbatError):
    """Raised when a call failed in a way that may succeed if retried later."""


class ConnectionFailed(TransientError):
    """Raised when the SMSBAT API could not be reached (DNS, refused, reset)."""


class RequestTimeout(TransientError):
    """Raised when connecting to or reading from the SMSBAT API took too long."""


class AnswerLate(RequestTimeout):
    """Raised when a check's answer did not come within its wait (at most
    ``SMSBAT_ANSWER_WAIT``): the run retries in 1 s, and the answer, should it come, is
    cached meanwhile. ``wait``: the seconds it was given."""

    def __init__(self, message: str, wait: float = 0.0) -> None:
        super().__init__(message)
        self.wait = wait


class ServerError(TransientError):
    """Raised when the SMSBAT API answered with a 5xx status."""

    def __init__(self, status_code: int, message: str | None = None) -> None:
        self.status_code = status_code
        super().__init__(message or f"SMSBAT API answered HTTP {status_code}")


class RateLimited(TransientError):
    """Raised when the SMSBAT API answered 429 (or the global rate limit is spent).

    ``retry_after`` is the seconds to wait (the answer's Retry-After), if known.
    """

    def __init__(self, retry_after: float | None, message: str | None = None) -> None:
        self.status_code = 429
        self.retry_after = retry_after
        hint = f", retry after {retry_after:g} s" if retry_after is not None else ""
        super().__init__(f"{message or 'SMSBAT API answered HTTP 429 (rate limited)'}{hint}")


class MalformedResponse(TransientError):
    """Raised when a 2xx answer is not the JSON object the API documents (truncated, invalid)."""


class PermanentError(SmsbatError):
    """Raised when a call failed in a way that retrying will not fix."""

    def __init__(self, status_code: int, message: str | None = None) -> None:
        self.status_code = status_code
        super().__init__(message or f"SMSBAT API answered HTTP {status_code}")


class AuthenticationError(PermanentError):
    """Raised when the SMSBAT API refused the credentials (HTTP 401 or 403)."""


class MessageNotFound(PermanentError):
    """Raised when the SMSBAT API does not know the message id (HTTP 404)."""


class ClientError(PermanentError):
    """Raised when the SMSBAT API rejected the request with another 4xx status."""
