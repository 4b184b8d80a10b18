"""A simulated SMSBAT HTTP API: a real, fast HTTP server for demos, tests and benchmarks.

The sandbox speaks the two endpoints the tracker uses (``GET /bat/message/{messageId}`` and
``POST /bat/messagelist``) with the same authentication schemes and body shapes as the real
API, plus admin endpoints under ``/sandbox/`` to script message timelines, read the ground
truth of every message, inject faults and read request counters. The admin endpoints are
**unauthenticated**: the sandbox is for local use only. Never expose it on a public interface.

Admin endpoints (JSON in and out):

* ``POST /sandbox/messages`` ``{"messages": [{"messageId"?, "timeline": [[status, seconds],
  ...], "cost"?, "partscount"?, "extended"?}]}`` -> ``{"messageIds": [...]}``.
* ``GET /sandbox/messages/{id}`` -> the truth of one message (see
  :meth:`SandboxState.truth`); ``GET /sandbox/messages`` -> ``{"messages": [truth, ...]}``.
* ``GET /sandbox/stats`` -> counters of the ``/bat/`` API (see :meth:`SandboxState.stats`).
* ``POST /sandbox/faults`` -> see :meth:`SandboxState.set_faults` (same keys; ``"clear":
  true`` first turns every fault off).
* ``POST /sandbox/reset`` -> forget messages, faults and counters.

Run it standalone with ``smsbat-tracker sandbox --port 8080`` (or ``python -m
smsbat_tracker.tools.sandbox``), or in-process::

    with SandboxServer(SandboxConfig(seed=1)) as server:
        message_id = server.state.create_scripted([("processing", 0), ("delivered", 0.5)])
        httpx.get(f"{server.url}/bat/message/{message_id}",
                  headers={"X-Authorization-Key": server.config.api_key})

Its modules: ``config`` (:class:`SandboxConfig`), ``messages`` (one message and its
timeline), ``faults`` and ``sending`` (what the status and send routes do beyond the
ordinary), ``push`` (webhooks), ``state`` (:class:`SandboxState`, all of it behind one lock),
``asgi`` (JSON answers and body reads) and ``app`` (the routes), ``server``
(:class:`SandboxServer`, in-process) and ``command`` (:func:`main`, in the foreground).
"""

from smsbat_tracker.tools.sandbox.app import SandboxApp, create_app
from smsbat_tracker.tools.sandbox.command import main
from smsbat_tracker.tools.sandbox.config import SandboxConfig
from smsbat_tracker.tools.sandbox.faults import FAULT_KINDS
from smsbat_tracker.tools.sandbox.messages import FINAL_STATUSES
from smsbat_tracker.tools.sandbox.sending import MESSAGE_TYPES
from smsbat_tracker.tools.sandbox.server import SandboxServer
from smsbat_tracker.tools.sandbox.state import SandboxState

__all__ = [
    "FAULT_KINDS",
    "FINAL_STATUSES",
    "MESSAGE_TYPES",
    "SandboxApp",
    "SandboxConfig",
    "SandboxServer",
    "SandboxState",
    "create_app",
    "main",
]
