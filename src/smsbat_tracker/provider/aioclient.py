"""Checking many statuses at once: :class:`BatchStatusClient`, on aiohttp.

The campaign path checks thousands of messages a second; aiohttp's connection pool does
that on one core where httpx's async pool does not. Answers are decoded by the same code
as :class:`~smsbat_tracker.provider.client.SmsbatClient`, so errors are the same classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NoReturn, Self

import aiohttp

from smsbat_tracker import metrics
from smsbat_tracker.config import DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT, Settings
from smsbat_tracker.errors import (
    ConnectionFailed,
    MalformedResponse,
    RequestTimeout,
    SmsbatError,
)
from smsbat_tracker.provider.client import (
    auth_headers,
    gather_statuses,
    options_from_settings,
    parse_status,
    status_path,
)
from smsbat_tracker.provider.models import MessageStatus

__all__ = ["BatchStatusClient"]


class BatchStatusClient:
    """Async client for status checks only, built for many concurrent requests.

    Create it inside the event loop that uses it (aiohttp sessions belong to one loop).
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        auth: str = "header",
        username: str | None = None,
        password: str | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        max_connections: int = 64,
    ) -> None:
        headers = auth_headers(api_key=api_key, auth=auth, username=username, password=password)
        self._session = aiohttp.ClientSession(
            base_url=base_url.rstrip("/") + "/",
            headers=headers,
            timeout=aiohttp.ClientTimeout(sock_connect=connect_timeout, sock_read=read_timeout),
            connector=aiohttp.TCPConnector(limit=max_connections),
            raise_for_status=False,
        )

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> Self:
        """A client configured from the settings."""
        return cls(settings.base_url, **options_from_settings(settings), **kwargs)

    async def get_status(self, message_id: str) -> MessageStatus:
        """One message's status; raises the errors of :mod:`smsbat_tracker.errors`."""
        path = status_path(message_id).lstrip("/")
        try:
            async with self._session.get(path) as response:
                content = await response.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            metrics.get().api_network_error()
            _raise_network(exc)
        return parse_status(response.status, response.headers.get("Retry-After"), content)

    async def get_statuses(
        self, message_ids: Sequence[str], *, concurrency: int = 64
    ) -> dict[str, MessageStatus | SmsbatError]:
        """Statuses of many messages, at most ``concurrency`` in flight; errors as values."""
        return await gather_statuses(self.get_status, message_ids, concurrency)

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._session.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def _raise_network(exc: BaseException) -> NoReturn:
    """Raise the :mod:`~smsbat_tracker.errors` exception for a request that got no answer."""
    if isinstance(exc, TimeoutError):
        raise RequestTimeout("SMSBAT API did not answer in time") from None
    if isinstance(exc, aiohttp.ClientPayloadError):
        raise MalformedResponse("SMSBAT API answer was cut off") from None
    reason = type(exc).__name__  # only the class: aiohttp texts may quote URLs
    raise ConnectionFailed(f"could not reach the SMSBAT API ({reason})") from None
