"""Redis URLs: kombu's ``sentinel://`` list form, parsed and checked, and URLs made safe to show.

``REDIS_URL`` is either a ``redis://``, ``rediss://`` or ``unix://`` URL, or kombu's
Sentinel form, one ``sentinel://`` part per sentinel separated by ``;``. As in kombu and
Celery, the URL's user and password are the Redis master's, never sent to the sentinels, and
the path is the database number. kombu moves on to the next part after a connection error
and then reads that part's own password and database, so every part must carry the same ones
(:func:`parse_sentinel_url` refuses anything else).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final
from urllib.parse import unquote, urlsplit

__all__ = [
    "SENTINEL_SCHEME",
    "SentinelURL",
    "is_sentinel_url",
    "parse_sentinel_url",
    "safe_redis_url",
]

SENTINEL_SCHEME: Final = "sentinel"
# What separates the sentinels in the URL (kombu's and Celery's separator).
_SEPARATOR: Final = ";"


@dataclass(frozen=True, slots=True)
class SentinelURL:
    """A parsed ``sentinel://`` URL: the sentinels and how to reach the master."""

    sentinels: tuple[tuple[str, int], ...]
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)


def is_sentinel_url(url: str) -> bool:
    """Whether ``url`` is kombu's Sentinel form (``sentinel://...``)."""
    return url.startswith(f"{SENTINEL_SCHEME}://")


def _parse_part(part: str) -> tuple[str, int, int, str | None, str | None]:
    """(host, port, db, username, password) of one ``sentinel://`` part; ValueError if bad.

    The messages never quote the part: it may carry a password.
    """
    if not is_sentinel_url(part):
        raise ValueError("every ';'-separated part must start with sentinel://")
    parts = urlsplit(part)
    if not parts.hostname:
        raise ValueError("every sentinel:// part must name a host")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("has an invalid sentinel port") from None
    if port is None:
        # kombu's default is 26379 and Celery's result backend's 6379: say it.
        raise ValueError("every sentinel:// part must name its port (host:26379)")
    if parts.query or parts.fragment:
        raise ValueError("a sentinel:// part must not have a query or fragment")
    path = parts.path.strip("/")
    if path and not (path.isascii() and path.isdigit()):
        raise ValueError("the database (the path) must be a number")
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    return parts.hostname, port, int(path or 0), username, password


def parse_sentinel_url(url: str) -> SentinelURL:
    """Parse kombu's Sentinel form; ValueError (never quoting the URL) if it is not valid.

    Every ``;``-separated part names one sentinel (host and port). Parts must agree on the
    user, the password and the database: kombu reads each part's own after a failover
    switch, Celery's result backend the first's.
    """
    chunks = url.split(_SEPARATOR)
    if not all(chunks):
        raise ValueError("has an empty ';'-separated part")
    parsed = [_parse_part(chunk) for chunk in chunks]
    first = parsed[0]
    if any(p[2:] != first[2:] for p in parsed[1:]):
        raise ValueError(
            "every sentinel:// part must carry the same user, password and database "
            "(kombu reads the part it switched to)"
        )
    return SentinelURL(
        sentinels=tuple((host, port) for host, port, *_ in parsed),
        db=first[2],
        username=first[3],
        password=first[4],
    )


def safe_redis_url(url: str) -> str:
    """A Redis URL without its user and password, to name it in a message.

    Each ``;``-separated part of a ``sentinel://`` list loses its own.
    """
    if is_sentinel_url(url):
        return ";".join(_safe_url_part(part) for part in url.split(";"))
    return _safe_url_part(url)


def _safe_url_part(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = f"{host}:{port}" if port else host
    return parts._replace(netloc=netloc).geturl()
