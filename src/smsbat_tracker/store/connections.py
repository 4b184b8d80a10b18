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

from typing import TYPE_CHECKING, Any, Final, cast

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from smsbat_tracker.redis_url import is_sentinel_url, parse_sentinel_url

if TYPE_CHECKING:
    from smsbat_tracker.config import Settings

__all__ = [
    "SOCKET_TIMEOUT",
    "SentinelRedis",
    "known_masters",
    "one_try",
    "redis_client",
    "socket_options",
    "unknown_master",
]

# A Redis that stops answering (frozen, or a network that drops packets rather than
# resets) holds a call at most this long, rather than for good: every script and command
# the tracker sends takes milliseconds, and none of them blocks.
SOCKET_TIMEOUT: Final = 5.0


def socket_options() -> dict[str, float]:
    """The socket timeouts every client of the tracker gets unless told otherwise (the
    broker's transport options and the result backend's too: see celery.integration)."""
    return {"socket_timeout": SOCKET_TIMEOUT, "socket_connect_timeout": SOCKET_TIMEOUT}


def one_try() -> Retry:
    """A client's retry policy of one try: redis-py's default retries a refused connection
    for about 4 s, too long for a health check or a worker's start."""
    return Retry(NoBackoff(), 0)


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

    ``kwargs`` are connection options (``decode_responses``, ``socket_timeout``, ...), over
    :func:`socket_options`. The sentinels get its ``socket_*`` options only, and no
    password, as kombu's do.
    """
    kwargs = {**socket_options(), **kwargs}
    url = settings.redis_url
    if not is_sentinel_url(url):
        return redis.Redis.from_url(url, **kwargs)
    target = parse_sentinel_url(url)
    sentinel_kwargs = {k: v for k, v in kwargs.items() if k.startswith("socket_")}
    # redis-py's sentinel module has annotations from 8.2 on only (the ignores cover both).
    manager = Sentinel(  # type: ignore[no-untyped-call,unused-ignore]
        list(target.sentinels), sentinel_kwargs=sentinel_kwargs, **kwargs
    )
    client = cast(
        SentinelRedis,
        manager.master_for(  # type: ignore[no-untyped-call,unused-ignore]
            settings.sentinel_master,
            redis_class=SentinelRedis,
            db=target.db,
            username=target.username,
            password=target.password,
        ),
    )
    client.sentinel_manager = manager
    return client


def known_masters(settings: Settings, timeout: float = 2.0) -> set[str] | None:
    """The master names the sentinels of ``settings.redis_url`` watch; None when no
    sentinel answered (or the URL names no sentinels)."""
    url = settings.redis_url
    if not is_sentinel_url(url):
        return None
    names: set[str] | None = None
    for host, port in parse_sentinel_url(url).sentinels:
        node = redis.Redis(
            host=host,
            port=port,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=one_try(),  # a worker's start waits on it
        )
        try:
            masters = node.sentinel_masters()
        except redis.RedisError:
            continue
        finally:
            node.close()
        names = (names or set()) | {str(name) for name in masters}
    return names


def unknown_master(settings: Settings) -> str | None:
    """One line when the sentinels answer but watch no master by
    ``SMSBAT_SENTINEL_MASTER`` (a typo would otherwise retry quietly for good); None when
    they know it, or cannot be asked."""
    known = known_masters(settings)
    if known is None or settings.sentinel_master in known:
        return None
    return (
        f"SMSBAT_SENTINEL_MASTER={settings.sentinel_master}: the sentinels watch no master "
        f"by that name (they watch: {', '.join(sorted(known)) or 'none'})"
    )
