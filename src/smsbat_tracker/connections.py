"""Redis clients for the one ``REDIS_URL``: a server named directly, or a master through Sentinel.

``REDIS_URL`` is either a ``redis://``, ``rediss://`` or ``unix://`` URL, or kombu's
Sentinel form, one ``sentinel://`` part per sentinel separated by ``;``::

    sentinel://:password@10.0.0.1:26379/0;sentinel://:password@10.0.0.2:26379/0

The sentinels watch the master named by ``SMSBAT_SENTINEL_MASTER``. The broker (kombu's
``SentinelChannel``), the result backend (Celery's ``SentinelBackend``) and the clients
built here (status cache, rate limit, re-driver, webhook, CLI) all ask the sentinels for
the current master, and follow it to the replica they promote.

As in kombu and Celery, the URL's user and password are the Redis master's, never sent to
the sentinels, and the path is the database number. kombu moves on to the next part after a
connection error and then reads that part's own password and database, so every part must
carry the same ones (:func:`parse_sentinel_url` refuses anything else).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, cast
from urllib.parse import unquote, urlsplit

import redis
from redis.sentinel import Sentinel

if TYPE_CHECKING:
    from smsbat_tracker.config import Settings

__all__ = [
    "SENTINEL_SCHEME",
    "SentinelRedis",
    "SentinelURL",
    "is_sentinel_url",
    "parse_sentinel_url",
    "redis_client",
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


class SentinelRedis(redis.Redis):
    """A client of the master a set of sentinels names; :meth:`close` closes those too."""

    sentinel_manager: Sentinel | None = None

    def close(self) -> None:
        """Close the master's connections and the ones to the sentinels."""
        try:
            super().close()
        finally:
            manager, self.sentinel_manager = self.sentinel_manager, None
            for node in manager.sentinels if manager is not None else ():
                node.close()


def redis_client(settings: Settings, **kwargs: Any) -> redis.Redis:
    """A client of ``settings.redis_url``'s Redis (through its sentinels for ``sentinel://``).

    ``kwargs`` are connection options (``decode_responses``, ``socket_timeout``, ...). The
    sentinels get its ``socket_*`` options only, and no password, as kombu's do.
    """
    url = settings.redis_url
    if not is_sentinel_url(url):
        return redis.Redis.from_url(url, **kwargs)
    target = parse_sentinel_url(url)
    sentinel_kwargs = {k: v for k, v in kwargs.items() if k.startswith("socket_")}
    # redis-py's sentinel module has no annotations.
    manager = Sentinel(  # type: ignore[no-untyped-call]
        list(target.sentinels), sentinel_kwargs=sentinel_kwargs, **kwargs
    )
    client = cast(
        SentinelRedis,
        manager.master_for(  # type: ignore[no-untyped-call]
            settings.sentinel_master,
            redis_class=SentinelRedis,
            db=target.db,
            username=target.username,
            password=target.password,
        ),
    )
    client.sentinel_manager = manager
    return client


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
