"""A fake SMSBAT API for your own tests: scripted outcomes, injected faults, webhook pushes.

:class:`FakeSmsbat` runs the simulated API (:mod:`smsbat_tracker.tools.sandbox`) on 127.0.0.1,
on a free port, in a background thread. Point the code under test at it (:attr:`FakeSmsbat.env`
holds ``SMSBAT_BASE_URL`` and ``SMSBAT_API_KEY``), then decide what every message does::

    from smsbat_tracker.testing import FakeSmsbat

    with FakeSmsbat() as fake:
        message_id = fake.message("undeliverable", after=0.5)  # a message that fails in 0.5 s
        fake.set_send_outcome("delivered", after=1.0)  # every message sent through the fake
        with fake.faults(error_rate=1.0):  # every status request answers 500 in this block
            ...

With pytest, the plugin :mod:`smsbat_tracker.testing.pytest_plugin` gives the fixtures
``smsbat_api`` (a fake, reset for each test) and ``smsbat_env`` (the environment pointed at
it). Importing this module starts nothing, reads nothing and imports neither pytest nor the
sandbox: the server starts in :meth:`FakeSmsbat.start`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, Self, get_args

if TYPE_CHECKING:
    from smsbat_tracker.config import Settings
    from smsbat_tracker.provider.client import SmsbatClient
    from smsbat_tracker.tools.sandbox import SandboxConfig, SandboxServer

__all__ = [
    "DEFAULT_API_KEY",
    "OUTCOMES",
    "FakeSmsbat",
    "Fault",
    "Outcome",
]

Outcome = Literal["delivered", "undeliverable", "permanenterror", "never"]
"""How a fake message ends: a final status, or ``"never"`` (it stays ``processing``, and a
tracker ends it as ``timeout``)."""

Fault = Literal["500", "429", "401", "slow", "malformed", "truncated", "ok"]
"""One answer of :meth:`FakeSmsbat.fail_next`: HTTP 500, 429 (with ``Retry-After``), 401,
a slow answer, a body that is not JSON, a body cut off mid-way, or a normal answer."""

OUTCOMES: Final[frozenset[str]] = frozenset(get_args(Outcome))
"""Every :data:`Outcome`."""

DEFAULT_API_KEY: Final = "smsbat-test-key"
"""The API key a :class:`FakeSmsbat` accepts unless told another."""

# The sandbox's own defaults, restored when a faults() block ends or reset() runs.
_NO_FAULTS: Final[dict[str, float]] = {
    "error_rate": 0.0,
    "rate_limit_rate": 0.0,
    "retry_after": 1.0,
    "slow_rate": 0.0,
    "slow_seconds": 1.0,
    "malformed_rate": 0.0,
}
# The smallest "after" the sandbox's send plan accepts (its median must be positive).
_INSTANT: Final = 1e-6


def _check_outcome(outcome: str) -> None:
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {sorted(OUTCOMES)}, got {outcome!r}")


def _check_after(after: float) -> float:
    if isinstance(after, bool) or not isinstance(after, int | float) or not 0.0 <= after < 1e9:
        raise ValueError(f"after must be a number of seconds >= 0, got {after!r}")
    return float(after)


def _set_rates(server: SandboxServer, rates: dict[str, float]) -> None:
    """Set every random fault setting of the sandbox to ``rates`` (keys of _NO_FAULTS)."""
    server.state.set_faults(
        error_rate=rates["error_rate"],
        rate_limit_rate=rates["rate_limit_rate"],
        retry_after=rates["retry_after"],
        slow_rate=rates["slow_rate"],
        slow_seconds=rates["slow_seconds"],
        malformed_rate=rates["malformed_rate"],
    )


def _processing_at(after: float) -> float:
    """When a fake message turns ``processing``: at 0.5 s, or halfway to its final status."""
    return min(0.5, after / 2.0)


class FakeSmsbat:
    """A fake SMSBAT API over real HTTP, whose messages end the way a test says.

    It serves ``GET /bat/message/{id}`` and ``POST /bat/messagelist`` with the real API's
    body shapes and error codes, and accepts :attr:`api_key` (header or Basic ``@:<key>``).
    Messages move ``scheduled`` -> ``processing`` -> their final status. Use it as a
    context manager, or call :meth:`start` and :meth:`stop`. Configure it from the test's
    thread; the code under test may call it from any thread or process.
    """

    def __init__(
        self,
        *,
        api_key: str = DEFAULT_API_KEY,
        push_url: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        """Configure a fake; nothing starts before :meth:`start`.

        ``push_url``: POST every status change there, as the provider's webhook does
        (see :meth:`pushes_to`). ``port=0`` picks a free port.
        """
        if not isinstance(api_key, str) or not api_key:
            raise ValueError("api_key must be a non-empty string")
        self.api_key: Final = api_key
        self._host = host
        self._port = port
        self._initial_push_url = push_url
        self._push_url = push_url
        self._send_outcome: Outcome = "delivered"
        self._send_after = 1.0
        self._send_fallback = False
        self._faults = dict(_NO_FAULTS)
        self._server: SandboxServer | None = None
        self._config()  # ValueError on a bad push_url, now rather than at start()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Self:
        """Start serving (returns once connections are accepted); returns the fake."""
        if self._server is not None:
            raise RuntimeError("FakeSmsbat already started")
        from smsbat_tracker.tools.sandbox import SandboxServer

        server = SandboxServer(self._config(), host=self._host, port=self._port)
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        """Stop serving and drop every message; idempotent."""
        server, self._server = self._server, None
        if server is not None:
            server.stop()

    @property
    def running(self) -> bool:
        """Whether the fake is serving."""
        return self._server is not None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def reset(self) -> None:
        """Forget every message, counter and fault; sends end ``delivered`` after 1 s again,
        and pushes go where the constructor said (pending ones are dropped)."""
        server = self._running()
        self._push_url = self._initial_push_url
        self._send_outcome, self._send_after, self._send_fallback = "delivered", 1.0, False
        self._faults = dict(_NO_FAULTS)
        server.state.reset()
        server.state.config = self._config()

    # ------------------------------------------------------------- where it is

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:54321``: give it as ``SMSBAT_BASE_URL``."""
        return self._running().url

    @property
    def env(self) -> dict[str, str]:
        """The environment variables that point smsbat-tracker (and a client built with
        :func:`~smsbat_tracker.config.load_settings`) at this fake."""
        return {"SMSBAT_BASE_URL": self.url, "SMSBAT_API_KEY": self.api_key}

    def settings(self, **overrides: Any) -> Settings:
        """:class:`~smsbat_tracker.config.Settings` for this fake: the environment, with
        the fake's URL and key, and ``overrides`` (field names, e.g. ``redis_url=...``)."""
        from smsbat_tracker.config import load_settings

        values: dict[str, Any] = {"base_url": self.url, "api_key": self.api_key}
        values.update(overrides)
        if values.get("api_key") is not None:
            # A login in the environment would clash with the key.
            values.setdefault("username", None)
            values.setdefault("password", None)
        return load_settings(**values)

    def client(self, **kwargs: Any) -> SmsbatClient:
        """A :class:`~smsbat_tracker.provider.client.SmsbatClient` for this fake (close it, or use
        it in a ``with``); ``kwargs`` go to the client (``read_timeout=``, ...)."""
        from smsbat_tracker.provider.client import SmsbatClient

        return SmsbatClient(self.url, api_key=self.api_key, **kwargs)

    # ---------------------------------------------------------------- messages

    def message(
        self,
        outcome: Outcome = "delivered",
        *,
        after: float = 1.0,
        message_id: str | None = None,
        cost: float = 0.05,
        viber: bool = False,
        fallback: bool = False,
    ) -> str:
        """Create a message that ends ``outcome`` ``after`` seconds from now; its id.

        It is ``scheduled`` at first, ``processing`` from 0.5 s (or halfway to ``after``),
        then final. ``"never"`` stays ``processing``. ``message_id`` picks the id (default:
        a new random one). ``cost`` is served once delivered. ``viber=True`` serves the
        extended (Viber) body; ``fallback=True`` (delivered only) has it delivered by its SMS
        fallback after the Viber leg failed.
        """
        _check_outcome(outcome)
        after = _check_after(after)
        if fallback and outcome != "delivered":
            raise ValueError("fallback=True needs the outcome 'delivered'")
        processing_at = _processing_at(after)
        timeline = [("scheduled", 0.0), ("processing", processing_at)]
        if outcome != "never":
            timeline.append((outcome, after))
        return self.scripted(
            timeline, message_id=message_id, cost=cost, viber=viber or fallback, fallback=fallback
        )

    def scripted(
        self,
        timeline: list[tuple[str, float]],
        *,
        message_id: str | None = None,
        cost: float = 0.05,
        viber: bool = False,
        fallback: bool = False,
    ) -> str:
        """Create a message whose status follows ``timeline`` exactly; its id.

        ``timeline``: ``(status, seconds from now)`` pairs in time order; any status string
        is served as given (e.g. one the tracker does not know). Before the first entry the
        message is ``scheduled``. Other arguments as in :meth:`message`.
        """
        extended: dict[str, object] | None = None
        if viber or fallback:
            extended = {"fallback": True} if fallback else {}
        return self._running().state.create_scripted(
            list(timeline), message_id=message_id, cost=cost, extended=extended
        )

    def set_send_outcome(
        self, outcome: Outcome = "delivered", *, after: float = 1.0, fallback: bool = False
    ) -> None:
        """From now on, every message sent through ``POST /bat/messagelist`` ends
        ``outcome`` ``after`` seconds after it was sent (the default: delivered after 1 s).

        ``fallback=True`` (delivered only): Viber messages are delivered by their SMS
        fallback. Messages sent before keep their plan.
        """
        _check_outcome(outcome)
        after = _check_after(after)
        if fallback and outcome != "delivered":
            raise ValueError("fallback=True needs the outcome 'delivered'")
        server = self._running()
        self._send_outcome, self._send_after, self._send_fallback = outcome, after, fallback
        server.state.config = self._config()

    def truth(self, message_id: str) -> dict[str, Any]:
        """What the fake knows of a message (KeyError if it knows none such).

        Keys include ``status`` (as of now), ``final_status`` (None for ``"never"``),
        ``polls`` (status requests served for it) and ``pushes`` (see :meth:`pushes`).
        """
        return self._running().state.truth(message_id)

    def polls(self, message_id: str) -> int:
        """How many status requests the fake answered for a message, faulted ones included."""
        return int(self.truth(message_id)["polls"])

    def stats(self) -> dict[str, Any]:
        """Counters of the API: ``requests``, ``status_requests``, ``send_requests``,
        ``messages`` and ``responses`` (per HTTP status code, as strings)."""
        return self._running().state.stats()

    # ------------------------------------------------------------------ faults

    @contextmanager
    def faults(
        self,
        *,
        error_rate: float | None = None,
        rate_limit_rate: float | None = None,
        retry_after: float | None = None,
        slow_rate: float | None = None,
        slow_seconds: float | None = None,
        malformed_rate: float | None = None,
    ) -> Iterator[None]:
        """Inject faults into status requests inside a ``with`` block; restored after it.

        Each ``GET /bat/message/{id}`` answers 500 with probability ``error_rate``, 429
        (``Retry-After: ceil(retry_after)``, default 1) with ``rate_limit_rate``, a body that
        is not JSON with ``malformed_rate``, else it is ``slow_seconds`` late (default 1)
        with ``slow_rate``. Rates are in [0, 1]; 1.0 makes every request fail that way.
        Blocks nest; an omitted setting keeps its value.
        """
        server = self._running()
        wanted = {
            "error_rate": error_rate,
            "rate_limit_rate": rate_limit_rate,
            "retry_after": retry_after,
            "slow_rate": slow_rate,
            "slow_seconds": slow_seconds,
            "malformed_rate": malformed_rate,
        }
        before = dict(self._faults)
        inside = {**before, **{k: v for k, v in wanted.items() if v is not None}}
        _set_rates(server, inside)  # ValueError on bad values, before anything changes
        self._faults = inside
        try:
            yield
        finally:
            self._faults = before
            if self._server is server:
                _set_rates(server, before)

    def fail_next(self, message_id: str, *faults: Fault) -> None:
        """The next status requests for ``message_id`` answer these faults, in order
        (``"ok"`` answers normally); later ones answer as usual. Adds to what is queued."""
        if not faults:
            raise ValueError("fail_next needs at least one fault")
        self._running().state.set_faults(message_faults={message_id: list(faults)})

    def clear_faults(self) -> None:
        """Turn every fault off, queued :meth:`fail_next` answers included."""
        server = self._running()
        self._faults = dict(_NO_FAULTS)
        server.state.clear_faults()

    # ------------------------------------------------------------------ pushes

    def pushes_to(self, url: str | None) -> None:
        """POST every later status change to ``url`` (``None``: stop), as the provider's
        webhook does: ``{"messageId", "deliverystatus", "timestamp", "cost"}``.

        Only messages created (or sent) from now on are pushed. A token goes in the URL
        (``.../webhook?token=...``). A failed push is recorded, never retried.
        """
        if url is not None and not (
            isinstance(url, str) and url.startswith(("http://", "https://"))
        ):
            raise ValueError("url must be an http:// or https:// URL")
        server = self._running()
        self._push_url = url
        server.state.config = self._config()

    def pushes(self, message_id: str) -> list[dict[str, Any]]:
        """The pushes made for a message, in order: ``deliverystatus``, ``sent_at`` (epoch),
        ``http_status`` (None when the request failed) and ``error``."""
        return list(self.truth(message_id)["pushes"])

    # --------------------------------------------------------------- internals

    def _running(self) -> SandboxServer:
        server = self._server
        if server is None:
            raise RuntimeError("FakeSmsbat is not running: call start() or use it in a with")
        return server

    def _config(self) -> SandboxConfig:
        """The sandbox configuration that makes every sent message end as scripted."""
        from smsbat_tracker.tools.sandbox import SandboxConfig

        after = max(self._send_after, _INSTANT)
        outcome = self._send_outcome
        return SandboxConfig(
            api_key=self.api_key,
            processing_after=_processing_at(after),
            # A log-normal whose median is its 95th percentile is exactly that value.
            median_final=after,
            p95_final=after,
            undeliverable_rate=1.0 if outcome == "undeliverable" else 0.0,
            permanenterror_rate=1.0 if outcome == "permanenterror" else 0.0,
            never_final_rate=1.0 if outcome == "never" else 0.0,
            fallback_rate=1.0 if self._send_fallback else 0.0,
            push_url=self._push_url,
        )
