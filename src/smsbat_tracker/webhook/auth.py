"""Who may push, and who may read a campaign's page.

Pushes: the webhook's shared secret. The provider only takes a URL, so the token comes in
the query parameter ``token``; the header ``X-Webhook-Token`` is the alternative. A wrong
token in either place is refused, whatever the other holds.

Campaign pages: people, with HTTP Basic (``SMSBAT_REPORT_USER``, ``SMSBAT_REPORT_PASSWORD``):
a browser asks for the login, and it never travels in a URL that gets shared.
"""

from __future__ import annotations

import hmac
from typing import Final

from starlette.requests import Request

from smsbat_tracker.basic_auth import basic_credentials
from smsbat_tracker.config import Settings
from smsbat_tracker.errors import ConfigError
from smsbat_tracker.log import register_secret

__all__ = [
    "REPORT_REALM",
    "TOKEN_HEADER",
    "TOKEN_QUERY",
    "carries_login",
    "carries_token",
    "report_login",
    "webhook_token",
]

TOKEN_HEADER: Final = "X-Webhook-Token"  # noqa: S105 - a header name, not a secret
TOKEN_QUERY: Final = "token"  # noqa: S105 - a parameter name
# What a browser shows when it asks for the campaign pages' login.
REPORT_REALM: Final = "smsbat-tracker campaign reports"


def webhook_token(settings: Settings) -> bytes | None:
    """The token pushes must carry, registered for redaction; None when the webhook is
    open (``SMSBAT_WEBHOOK_OPEN`` and no token).

    Raises :class:`ConfigError` naming ``SMSBAT_WEBHOOK_TOKEN`` when no token is set and
    the webhook is not open.
    """
    token = settings.webhook_token.get_secret_value() if settings.webhook_token else ""
    if not token and not settings.webhook_open:
        raise ConfigError(
            "invalid settings: SMSBAT_WEBHOOK_TOKEN: required by the webhook (set "
            "SMSBAT_WEBHOOK_OPEN=true to run it without authentication, for local tests only)"
        )
    register_secret(token)  # whatever logging is configured later redacts it too
    return token.encode() if token else None


def carries_token(request: Request, token: bytes) -> bool:
    """Whether the request carries ``token``, and no other: every header and query value
    given must be the token (a wrong one beside a right one is refused)."""
    header_name = TOKEN_HEADER.lower().encode()
    # Raw header bytes: no decoding to get wrong.
    headers = request.scope.get("headers", ())
    candidates = [value for name, value in headers if name == header_name]
    candidates += [
        query.encode("utf-8", "replace") for query in request.query_params.getlist(TOKEN_QUERY)
    ]
    matched = bool(candidates)
    for candidate in candidates:
        # Constant-time for each candidate; no early exit on the first mismatch either.
        matched &= hmac.compare_digest(candidate, token)
    return matched


def report_login(settings: Settings) -> tuple[bytes, bytes] | None:
    """The login campaign pages ask for (user, password), the password registered for
    redaction; None when no ``SMSBAT_REPORT_PASSWORD`` is set (the pages are off)."""
    password = settings.report_password.get_secret_value() if settings.report_password else ""
    if not password:
        return None
    register_secret(password)
    return settings.report_user.encode(), password.encode()


def carries_login(request: Request, login: tuple[bytes, bytes]) -> bool:
    """Whether the request's ``Authorization: Basic`` header carries ``login``; one header
    only, compared in constant time, user and password both."""
    headers = [
        value for name, value in request.scope.get("headers", ()) if name == b"authorization"
    ]
    if len(headers) != 1:
        return False
    credentials = basic_credentials(headers[0])
    if credentials is None:
        return False
    # Both compared whatever the first gave: no early exit tells which one was wrong.
    matched = hmac.compare_digest(credentials[0], login[0])
    matched &= hmac.compare_digest(credentials[1], login[1])
    return matched
