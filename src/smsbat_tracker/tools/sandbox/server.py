"""The sandbox served in-process: uvicorn on a background thread, for tests and the demo."""

from __future__ import annotations

from smsbat_tracker.tools.sandbox.app import create_app
from smsbat_tracker.tools.sandbox.config import SandboxConfig
from smsbat_tracker.tools.sandbox.state import SandboxState
from smsbat_tracker.tools.serving import BackgroundServer

__all__ = ["SandboxServer"]


class SandboxServer(BackgroundServer):
    """The sandbox on 127.0.0.1 (a free port by default) in a background daemon thread.

    ``.url``, ``.state`` (the :class:`SandboxState`, usable from the caller's thread),
    ``.config`` and ``.app``; use it as a context manager or call :meth:`start`/:meth:`stop`.
    """

    def __init__(
        self,
        config: SandboxConfig | None = None,
        *,
        state: SandboxState | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        startup_timeout: float = 10.0,
    ) -> None:
        self.config = config if config is not None else SandboxConfig()
        self.sandbox = create_app(self.config, state)
        self.state = self.sandbox.state
        super().__init__(
            self.sandbox,
            host=host,
            port=port,
            startup_timeout=startup_timeout,
            on_start=self.state._attach_loop,
            on_stop=self.state._aclose,
        )
