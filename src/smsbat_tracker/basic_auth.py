"""HTTP Basic credentials read from an ``Authorization`` header value.

Shared by the campaign pages' login (:mod:`smsbat_tracker.webhook.auth`) and the simulated
API (:mod:`smsbat_tracker.tools.sandbox`); comparing them is the caller's (in constant
time).
"""

from __future__ import annotations

import base64
import binascii

__all__ = ["basic_credentials"]


def basic_credentials(authorization: bytes) -> tuple[bytes, bytes] | None:
    """(user, password) of a ``Basic`` header value; None for another scheme, bad base64,
    or credentials without the ``:`` between user and password."""
    scheme, _, encoded = authorization.partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, colon, password = decoded.partition(b":")
    return (user, password) if colon else None
