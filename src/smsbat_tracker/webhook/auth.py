"""Who may push: the webhook's shared secret, where a request carries it, and its check.

The provider only takes a URL, so the token comes in the query parameter ``token``; the
header ``X-Webhook-Token`` is the alternative. A wrong token in either place is refused,
whatever the other holds.
"""

from __future__ import annotations

import hmac
from typing import Final

from starlette.requests import Request

from smsbat_tracker.config import Settings
from smsbat_tracker.errors import ConfigError
from smsbat_tracker.log import register_secret

__all__ = ["TOKEN_HEADER", "TOKEN_QUERY", "carries_token", "webhook_token"]

TOKEN_HEADER: Final = "X-Webhook-Token"  # noqa: S105 - a header name, not a secret
TOKEN_QUERY: Final = "token"  # noqa: S105 - a parameter name


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
