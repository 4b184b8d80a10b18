"""The sandbox's HTTP face: a raw ASGI app routing ``/bat/`` (the API) and ``/sandbox/`` (admin).

No framework: every request is O(1) and served by uvicorn with httptools and uvloop, so one
process serves thousands of requests per second. The ``/sandbox/`` admin endpoints are
**unauthenticated**: the sandbox is for local use only. The app also speaks the ASGI lifespan
protocol (binding the loop for webhooks at start-up and closing the push client at
shutdown), so any ASGI server can host :func:`create_app`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math

from smsbat_tracker.basic_auth import basic_credentials
from smsbat_tracker.tools.sandbox.asgi import (
    INTERNAL,
    MALFORMED,
    MESSAGE_NOT_FOUND,
    NOT_FOUND,
    OK,
    RATE_LIMITED,
    UNAUTHORIZED,
    dumps,
    method_not_allowed,
    read_body,
    read_json,
    respond,
    respond_truncated,
)
from smsbat_tracker.tools.sandbox.config import SandboxConfig
from smsbat_tracker.tools.sandbox.faults import parse_faults
from smsbat_tracker.tools.sandbox.messages import parse_scripted
from smsbat_tracker.tools.sandbox.state import SandboxState
from smsbat_tracker.tools.serving import Receive, Scope, Send

__all__ = ["SandboxApp", "create_app"]


class SandboxApp:
    """The raw ASGI application of the sandbox; ``.state`` and ``.config`` are public."""

    def __init__(self, config: SandboxConfig, state: SandboxState) -> None:
        self.config = config
        self.state = state
        self._header_key = config.api_key.encode()
        self._username = config.username.encode()
        self._password = config.password.encode()
        self._pushes = config.push_url is not None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one HTTP request or the lifespan protocol (websockets are ignored)."""
        kind = scope["type"]
        if kind != "http":
            if kind == "lifespan":
                await self._lifespan(receive, send)
            return
        if self._pushes:
            # Served by a foreign server without lifespan (e.g. httpx.ASGITransport): bind the
            # running loop on first use so webhooks still go out.
            self.state._bind_running_loop()
        path: str = scope["path"]
        method: str = scope["method"]
        if path.startswith("/bat/"):
            await self._bat(path, method, scope, receive, send)
        elif path.startswith("/sandbox/"):
            self.state._count_admin()
            await self._admin(path, method, receive, send)
        else:
            await respond(send, 404, NOT_FOUND)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        """Bind the loop for webhooks at start-up; close the push client at shutdown."""
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.state._attach_loop(asyncio.get_running_loop())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.state._aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # ------------------------------------------------------------------ /bat/

    def _authenticate(self, scope: Scope) -> str | None:
        """Return the auth method that succeeded ("header", "basic", "basic-key") or None."""
        key: bytes | None = None
        authorization: bytes | None = None
        for name, value in scope["headers"]:
            if name == b"x-authorization-key":
                key = value
            elif name == b"authorization":
                authorization = value
        if key is not None and hmac.compare_digest(key, self._header_key):
            return "header"
        if authorization is None:
            return None
        credentials = basic_credentials(authorization)
        if credentials is None:
            return None
        user, password = credentials
        # Evaluate both comparisons so timing does not reveal which part matched.
        user_ok = hmac.compare_digest(user, self._username)
        password_ok = hmac.compare_digest(password, self._password)
        if user_ok and password_ok:
            return "basic"
        if user == b"@" and hmac.compare_digest(password, self._header_key):
            return "basic-key"
        return None

    async def _bat(
        self, path: str, method: str, scope: Scope, receive: Receive, send: Send
    ) -> None:
        state = self.state
        if path.startswith("/bat/message/"):
            if method != "GET":
                state._count(405, status_route=True)
                await respond(send, 405, method_not_allowed(), allow=b"GET")
                return
            await self._status(path[len("/bat/message/") :], scope, send)
            return
        if path == "/bat/messagelist":
            if method != "POST":
                state._count(405, send_route=True)
                await respond(send, 405, method_not_allowed(), allow=b"POST")
                return
            auth = self._authenticate(scope)
            if auth is None:
                state._count(401, send_route=True)
                await respond(send, 401, UNAUTHORIZED)
                return
            body = await read_body(receive)
            error: str | None = None
            items: object = None
            if body is None:
                error = "request body too large"
            else:
                try:
                    payload = json.loads(body)
                except (ValueError, UnicodeDecodeError):
                    error = "body must be JSON"
                else:
                    items = payload.get("messages") if isinstance(payload, dict) else None
                    if not isinstance(items, list):
                        error = 'body must be an object with a "messages" list'
            if error is not None or not isinstance(items, list):
                state._count(400, send_route=True, auth=auth)
                await respond(send, 400, dumps({"error": error}))
                return
            answer = dumps(state._send(items))
            state._count(200, send_route=True, auth=auth)
            await respond(send, 200, answer)
            return
        state._count(404)
        await respond(send, 404, NOT_FOUND)

    async def _status(self, message_id: str, scope: Scope, send: Send) -> None:
        """``GET /bat/message/{id}``: the state decides, this sends (with the fault's form)."""
        answer = self.state._answer_status(message_id, self._authenticate(scope))
        code, fault = answer.code, answer.fault
        if code == 200:
            if fault == "malformed":
                await respond(send, 200, MALFORMED)
            elif fault == "truncated":
                await respond_truncated(send, answer.body)
            else:
                if fault == "slow":
                    await asyncio.sleep(answer.slow_seconds)
                await respond(send, 200, answer.body)
        elif code == 401:
            await respond(send, 401, UNAUTHORIZED)
        elif code == 404:
            await respond(send, 404, MESSAGE_NOT_FOUND)
        elif code == 500:
            await respond(send, 500, INTERNAL)
        else:
            seconds = str(math.ceil(answer.retry_after)).encode()
            await respond(send, 429, RATE_LIMITED, retry_after=seconds)

    # --------------------------------------------------------------- /sandbox/

    async def _admin(self, path: str, method: str, receive: Receive, send: Send) -> None:
        state = self.state
        if path == "/sandbox/messages":
            if method == "GET":
                truths = state.all_truths()
                await respond(send, 200, dumps({"messages": truths}))
            elif method == "POST":
                payload = await read_json(receive, send)
                if payload is None:
                    return
                items = payload.get("messages")
                try:
                    if not isinstance(items, list):
                        raise ValueError('body must be an object with a "messages" list')
                    specs = [parse_scripted(item) for item in items]
                    ids = state._create_scripted_batch(specs)
                except ValueError as exc:
                    await respond(send, 400, dumps({"error": str(exc)}))
                    return
                await respond(send, 200, dumps({"messageIds": ids}))
            else:
                await respond(send, 405, method_not_allowed(), allow=b"GET, POST")
        elif path.startswith("/sandbox/messages/"):
            if method != "GET":
                await respond(send, 405, method_not_allowed(), allow=b"GET")
                return
            try:
                truth = state.truth(path[len("/sandbox/messages/") :])
            except KeyError:
                await respond(send, 404, MESSAGE_NOT_FOUND)
                return
            await respond(send, 200, dumps(truth))
        elif path == "/sandbox/stats":
            if method != "GET":
                await respond(send, 405, method_not_allowed(), allow=b"GET")
                return
            await respond(send, 200, dumps(state.stats()))
        elif path == "/sandbox/faults":
            if method != "POST":
                await respond(send, 405, method_not_allowed(), allow=b"POST")
                return
            payload = await read_json(receive, send)
            if payload is None:
                return
            try:
                if payload.get("clear"):
                    state.clear_faults()
                state._apply_faults(parse_faults(payload))
            except ValueError as exc:
                await respond(send, 400, dumps({"error": str(exc)}))
                return
            await respond(send, 200, OK)
        elif path == "/sandbox/reset":
            if method != "POST":
                await respond(send, 405, method_not_allowed(), allow=b"POST")
                return
            state.reset()
            await respond(send, 200, OK)
        else:
            await respond(send, 404, NOT_FOUND)


def create_app(config: SandboxConfig, state: SandboxState | None = None) -> SandboxApp:
    """Build the sandbox ASGI application; its state is ``app.state``.

    When ``state`` is given it is reused and its configuration is replaced by ``config``.
    """
    if state is None:
        state = SandboxState(config)
    else:
        state.config = config
    return SandboxApp(config, state)
