"""Tests of smsbat_tracker.provider.client: units on httpx.MockTransport, wire on the sandbox."""

from __future__ import annotations

import asyncio
import base64
import email.utils
import json
import socket
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from urllib3 import exceptions as urllib3_errors

from smsbat_tracker.config import Settings
from smsbat_tracker.errors import (
    AuthenticationError,
    ClientError,
    ConnectionFailed,
    InvalidMessageId,
    MalformedResponse,
    MessageNotFound,
    PermanentError,
    RateLimited,
    RequestTimeout,
    ServerError,
    SmsbatError,
    TransientError,
)
from smsbat_tracker.provider.client import (
    USER_AGENT,
    AsyncSmsbatClient,
    SmsbatClient,
    _urllib3_error,
    parse_retry_after,
)
from smsbat_tracker.provider.models import MessageStatus, OutgoingMessage
from smsbat_tracker.tools.sandbox import SandboxServer

BASE = "https://restapi.test"
KEY = "sk_live_TESTKEY_0042"
PASSWORD = "pw_TESTPASSWORD_0042"

Handler = Callable[[httpx.Request], httpx.Response]

BASIC_BODY = {
    "messagelistId": 123456,
    "messageId": "abc123def456",
    "deliverystatus": "delivered",
    "partscount": 1,
    "cost": 0.05,
}
EARLY_BODY = {"deliverystatus": "scheduled", "partscount": 1}
EXTENDED_BODY = {
    **BASIC_BODY,
    "fallbacks": [{"type": "sms", "status": "delivered", "attempt": 1}],
    "extendedStatuses": {"viber": "undeliverable", "sms": "delivered"},
    "rate": 0.05,
    "rateAmount": 0.05,
    "rateCurrency": "USD",
    "billAmount": 0.05,
    "billCurrency": "USD",
    "carrier": {"mcc": "255", "mnc": "01"},
    "deliveredAt": "2025-01-23T10:30:00Z",
}

# Ids that must never reach the network: path tricks, separators, whitespace and control
# characters, non-ASCII look-alikes, bidi overrides, bad lengths and non-strings.
HOSTILE_IDS: list[object] = [
    "../x",
    "..",
    ".",
    "./x",
    "a/b",
    "/abc",
    "a?b",
    "a#b",
    "a&b=c",
    "%2e%2e",
    "a%2fb",
    "a%00",
    "a;b",
    "a\\b",
    "x:y",
    "a,b",
    "a+b",
    "a'b",
    'a"b',
    "a<b>",
    "a|b",
    "a*b",
    "a@b",
    "@x",
    "~x",
    "-x",
    "_x",
    ".hidden",
    " ",
    "a b",
    " abc",
    "abc ",
    "a\tb",
    "a\nb",
    "abc\n",
    "abc\r\nX-Injected: 1",
    "a\x00b",
    "\x00",
    "a\x1bb",
    "a\x7fb",
    "a\x85b",
    "\u00e9",
    "caf\u00e9",
    "\uff41\uff42\uff43",  # fullwidth "abc"
    "\u0430bc",  # Cyrillic a + "bc"
    "abc\uff0fdef",  # fullwidth solidus
    "abc\u2215def",  # division slash
    "abc\u202e",
    "\u202eabc",
    "\u200babc",  # zero-width space
    "\ufeffabc",  # byte order mark
    "a\u2028b",  # line separator
    "\u0661\u0662\u0663",  # Arabic-Indic digits
    "",
    "a" * 129,
    "a" * 10_000,
    None,
    123,
    12.5,
    True,
    b"abc",
    bytearray(b"abc"),
    ["abc"],
]
VALID_IDS = ["abc123def456", "A-b_c.d~e", "0", "a" * 128, "a..b"]


def _id(value: object) -> str:
    return ascii(value)[:24]


def recording(
    handler: Handler | None = None,
) -> tuple[httpx.MockTransport, list[httpx.Request]]:
    """A MockTransport that records every request and answers with ``handler`` (or 200)."""
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if handler is None:
            return httpx.Response(200, json=BASIC_BODY)
        return handler(request)

    return httpx.MockTransport(record), seen


def answering(*args: Any, **kwargs: Any) -> Handler:
    """A handler that always answers ``httpx.Response(*args, **kwargs)``."""
    return lambda _request: httpx.Response(*args, **kwargs)


def raising(exc_type: type[httpx.TransportError], text: str = "failed") -> Handler:
    """A handler that raises a transport error of ``exc_type``."""

    def handler(request: httpx.Request) -> httpx.Response:
        raise exc_type(text, request=request)

    return handler


def mock_client(handler: Handler, **kwargs: Any) -> SmsbatClient:
    """A SmsbatClient on a MockTransport (header auth unless told otherwise)."""
    if not {"api_key", "username"} & kwargs.keys():
        kwargs["api_key"] = KEY
    return SmsbatClient(BASE, transport=httpx.MockTransport(handler), **kwargs)


def status_via(handler: Handler, message_id: str = "abc123def456") -> MessageStatus:
    """get_status through a MockTransport answering with ``handler``."""
    with mock_client(handler) as client:
        return client.get_status(message_id)


def closed_port() -> int:
    """A local TCP port that nothing listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
def wire(sandbox: SandboxServer) -> Iterator[SandboxServer]:
    """The sandbox with its faults cleared before and after the test."""
    sandbox.state.clear_faults()
    yield sandbox
    sandbox.state.clear_faults()


def sandbox_client(sandbox: SandboxServer, **kwargs: Any) -> SmsbatClient:
    """A client for the sandbox with its API key in the header unless told otherwise."""
    if not {"api_key", "username"} & kwargs.keys():
        kwargs["api_key"] = sandbox.config.api_key
    return SmsbatClient(sandbox.url, **kwargs)


def delivered_message(sandbox: SandboxServer, **kwargs: Any) -> str:
    """A sandbox message that is delivered already."""
    return sandbox.state.create_scripted([("processing", 0.0), ("delivered", 0.0)], **kwargs)


# ------------------------------------------------------------------- authentication


@pytest.mark.parametrize(
    ("method", "credentials"),
    [
        ("header", lambda c: {"api_key": c.api_key}),
        ("basic", lambda c: {"username": c.username, "password": c.password}),
        ("basic-key", lambda c: {"api_key": c.api_key, "auth": "basic-key"}),
    ],
)
def test_each_auth_method_is_accepted_on_the_wire(
    wire: SandboxServer, method: str, credentials: Callable[[Any], dict[str, Any]]
) -> None:
    """Each of the three documented auth methods succeeds and the sandbox counts that one."""
    message_id = delivered_message(wire)
    before = wire.state.stats()["auth"]
    with sandbox_client(wire, **credentials(wire.config)) as client:
        status = client.get_status(message_id)
    after = wire.state.stats()["auth"]
    assert status.deliverystatus == "delivered"
    assert status.messageId == message_id
    assert {name: after[name] - before[name] for name in after} == {
        name: int(name == method) for name in after
    }


@pytest.mark.parametrize(
    "credentials",
    [
        {"api_key": "wrong-key"},
        {"api_key": "wrong-key", "auth": "basic-key"},
        {"username": "sandbox", "password": "wrong-password"},
        {"username": "nobody", "password": "sandbox-password"},
    ],
)
def test_wrong_credentials_raise_authentication_error(
    wire: SandboxServer, credentials: dict[str, Any]
) -> None:
    """Refused credentials raise AuthenticationError (401), for status and for send."""
    message_id = delivered_message(wire)
    with sandbox_client(wire, **credentials) as client:
        with pytest.raises(AuthenticationError) as info:
            client.get_status(message_id)
        assert info.value.status_code == 401
        with pytest.raises(AuthenticationError):
            client.send_messages([{"from": "X", "to": "+380501234567", "text": "hi"}])


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"api_key": KEY}, {"x-authorization-key": KEY}),
        (
            {"api_key": KEY, "auth": "basic-key"},
            {"authorization": "Basic " + base64.b64encode(f"@:{KEY}".encode()).decode()},
        ),
        (
            {"username": "user", "password": PASSWORD},
            {"authorization": "Basic " + base64.b64encode(f"user:{PASSWORD}".encode()).decode()},
        ),
    ],
)
def test_request_shape(kwargs: dict[str, Any], expected: dict[str, str]) -> None:
    """A status GET goes to /bat/message/{id} with exactly one credential header."""
    transport, seen = recording()
    with SmsbatClient(BASE + "/", transport=transport, **kwargs) as client:
        client.get_status("abc123def456")
    (request,) = seen
    assert request.method == "GET"
    assert str(request.url) == f"{BASE}/bat/message/abc123def456"
    assert request.headers["accept"] == "application/json"
    assert request.headers["user-agent"] == USER_AGENT
    credential_headers = {
        name: value
        for name, value in request.headers.items()
        if name in ("authorization", "x-authorization-key")
    }
    assert credential_headers == expected


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "credentials are missing"),
        ({"username": "user"}, "credentials are missing"),
        ({"api_key": ""}, "credentials are missing"),
        ({"api_key": KEY, "username": "u", "password": "p"}, "not both"),
        ({"api_key": KEY, "auth": "bogus"}, "auth must be"),
    ],
)
def test_bad_client_options_are_refused(kwargs: dict[str, Any], match: str) -> None:
    """Missing, doubled or unknown credentials are refused when the client is built."""
    with pytest.raises(ValueError, match=match) as info:
        SmsbatClient(BASE, **kwargs)
    assert KEY not in str(info.value)


def test_from_settings_talks_to_the_sandbox(wire: SandboxServer, settings: Settings) -> None:
    """SmsbatClient.from_settings uses the settings' base URL and credentials."""
    message_id = delivered_message(wire)
    with SmsbatClient.from_settings(settings) as client:
        assert client.get_status(message_id).is_delivered


def test_the_httpx_client_is_built_only_for_a_request_that_needs_it(
    wire: SandboxServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Status checks go through urllib3 and build no httpx client (its TLS context costs
    ~0.1 s of CPU in every worker process); a send builds one, once, and close() closes it."""
    built: list[httpx.Client] = []
    real_init = httpx.Client.__init__

    def counting_init(self: httpx.Client, *args: Any, **kwargs: Any) -> None:
        built.append(self)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(httpx.Client, "__init__", counting_init)
    client = sandbox_client(wire)
    assert client.get_status(delivered_message(wire)).is_delivered
    assert built == []
    message = OutgoingMessage(sender="SMSBAT", to="+380501234567", text="hello")
    client.send_messages([message])
    client.send_messages([message])
    assert len(built) == 1
    client.close()
    assert built[0].is_closed


# ---------------------------------------------------------------------- body parsing


def test_basic_body_parses() -> None:
    """The documented basic body parses into MessageStatus with every field typed."""
    status = status_via(answering(200, json=BASIC_BODY))
    assert status.messagelistId == 123456
    assert status.messageId == "abc123def456"
    assert status.deliverystatus == "delivered"
    assert status.partscount == 1
    assert status.cost == 0.05
    assert status.is_final
    assert status.is_delivered
    assert not status.used_fallback
    assert status.to_json_dict() == BASIC_BODY


def test_early_scheduled_body_parses() -> None:
    """An early body with only deliverystatus and partscount parses; nothing is invented."""
    status = status_via(answering(200, json=EARLY_BODY))
    assert status.deliverystatus == "scheduled"
    assert status.messageId is None
    assert status.cost is None
    assert not status.is_final
    assert status.to_json_dict() == EARLY_BODY


def test_extended_body_parses_and_keeps_unknown_fields() -> None:
    """The extended body parses; unknown fields (top level and nested) survive to_json_dict."""
    status = status_via(answering(200, json=EXTENDED_BODY))
    assert status.used_fallback
    assert status.extendedStatuses == {"viber": "undeliverable", "sms": "delivered"}
    assert status.rateCurrency == "USD"
    assert status.billAmount == 0.05
    assert status.fallbacks is not None
    assert status.fallbacks[0].type == "sms"
    assert status.to_json_dict() == EXTENDED_BODY


def test_unknown_deliverystatus_is_kept_and_not_final() -> None:
    """A status value the docs do not list is kept verbatim and is not final."""
    status = status_via(answering(200, json={"deliverystatus": "expired_at_carrier"}))
    assert status.deliverystatus == "expired_at_carrier"
    assert not status.is_final
    assert not status.is_delivered


def test_bodies_on_the_wire(wire: SandboxServer) -> None:
    """Early, extended and unknown-status bodies served by the sandbox parse as documented."""
    early = wire.state.create_scripted([("processing", 3600.0)])
    extended = delivered_message(wire, extended={"fallback": True, "carrierRef": "X1"})
    unknown = wire.state.create_scripted([("expired", 0.0)])
    with sandbox_client(wire) as client:
        assert client.get_status(early).to_json_dict() == {
            "deliverystatus": "scheduled",
            "partscount": 1,
        }
        ext = client.get_status(extended)
        assert ext.used_fallback
        assert ext.extendedStatuses == {"viber": "undeliverable", "sms": "delivered"}
        assert ext.to_json_dict()["carrierRef"] == "X1"
        odd = client.get_status(unknown)
        assert odd.deliverystatus == "expired"
        assert not odd.is_final


# -------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("error", "family"),
    [
        (ConnectionFailed, TransientError),
        (RequestTimeout, TransientError),
        (ServerError, TransientError),
        (RateLimited, TransientError),
        (MalformedResponse, TransientError),
        (AuthenticationError, PermanentError),
        (MessageNotFound, PermanentError),
        (ClientError, PermanentError),
    ],
)
def test_error_families(error: type[SmsbatError], family: type[SmsbatError]) -> None:
    """Each client error is transient (retried) or permanent (ends tracking) as documented."""
    other = PermanentError if family is TransientError else TransientError
    assert issubclass(error, family)
    assert not issubclass(error, other)


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (400, ClientError),
        (401, AuthenticationError),
        (403, AuthenticationError),
        (404, MessageNotFound),
        (405, ClientError),
        (409, ClientError),
        (422, ClientError),
        (302, ClientError),
        (500, ServerError),
        (502, ServerError),
        (503, ServerError),
        (504, ServerError),
    ],
)
def test_status_codes_map_to_errors(code: int, error: type[SmsbatError]) -> None:
    """Every non-2xx answer raises its error class carrying the HTTP status code."""
    handler = answering(code, json={"error": "x"}, headers={"Location": f"{BASE}/elsewhere"})
    with pytest.raises(error) as info:
        status_via(handler)
    assert type(info.value) is error
    assert info.value.status_code == code  # type: ignore[attr-defined]


def test_rate_limited_with_retry_after_seconds() -> None:
    """429 with Retry-After: 7 raises RateLimited(retry_after=7.0)."""
    with pytest.raises(RateLimited) as info:
        status_via(answering(429, headers={"Retry-After": "7"}))
    assert info.value.retry_after == 7.0
    assert info.value.status_code == 429
    assert "retry after 7 s" in str(info.value)


def test_rate_limited_with_retry_after_http_date() -> None:
    """429 with an HTTP-date Retry-After yields the seconds until that date."""
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    with pytest.raises(RateLimited) as info:
        status_via(answering(429, headers={"Retry-After": when}))
    assert info.value.retry_after is not None
    assert 25.0 <= info.value.retry_after <= 30.0


def test_rate_limited_without_retry_after() -> None:
    """429 without Retry-After raises RateLimited(retry_after=None)."""
    with pytest.raises(RateLimited) as info:
        status_via(answering(429))
    assert info.value.retry_after is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("soon", None),
        ("nan", None),
        ("120", 120.0),
        (" 7 ", 7.0),
        ("0", 0.0),
        ("1.5", 1.5),
        ("-5", 0.0),
        ("1e9", 3600.0),
        ("Wed, 21 Oct 2015 07:28:30 GMT", 30.0),
        ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    """Delta-seconds and HTTP-dates parse; junk is None; results are clamped to [0, 3600]."""
    now = email.utils.parsedate_to_datetime("Wed, 21 Oct 2015 07:28:00 GMT").timestamp()
    assert parse_retry_after(value, now=now) == expected


@pytest.mark.parametrize(
    "handler",
    [
        pytest.param(answering(200, content=b"<html>oops</html>"), id="invalid-json"),
        pytest.param(answering(200, content=b""), id="empty"),
        pytest.param(answering(200, content=b'{"deliverystatus": "deliv'), id="truncated-json"),
        pytest.param(answering(200, content=b"\xff\xfe\x00"), id="not-utf8"),
        pytest.param(answering(200, json=["delivered"]), id="json-list"),
        pytest.param(answering(200, json="delivered"), id="json-string"),
        pytest.param(answering(200, json=None), id="json-null"),
        pytest.param(answering(200, json={"partscount": 1}), id="no-deliverystatus"),
        pytest.param(answering(200, json={"deliverystatus": None}), id="null-deliverystatus"),
        pytest.param(answering(200, json={"deliverystatus": 3}), id="int-deliverystatus"),
        pytest.param(
            answering(200, json={"deliverystatus": "delivered", "cost": "free"}), id="bad-cost"
        ),
        pytest.param(raising(httpx.RemoteProtocolError), id="cut-off"),
        pytest.param(raising(httpx.ReadError), id="read-error"),
        pytest.param(
            answering(200, content=b"[" * 100_000),
            id="deeply-nested",
        ),
    ],
)
def test_malformed_answers(handler: Handler) -> None:
    """A 2xx that is not a JSON object with a deliverystatus raises MalformedResponse."""
    with pytest.raises(MalformedResponse):
        status_via(handler)


@pytest.mark.parametrize(
    ("exc_type", "error"),
    [
        (httpx.ReadTimeout, RequestTimeout),
        (httpx.ConnectTimeout, RequestTimeout),
        (httpx.WriteTimeout, RequestTimeout),
        (httpx.PoolTimeout, RequestTimeout),
        (httpx.ConnectError, ConnectionFailed),
        (httpx.NetworkError, ConnectionFailed),
    ],
)
def test_transport_errors_map_to_transient_errors(
    exc_type: type[httpx.TransportError], error: type[SmsbatError]
) -> None:
    """httpx timeouts become RequestTimeout, connection failures ConnectionFailed."""
    with pytest.raises(error) as info:
        status_via(raising(exc_type))
    assert info.value.__cause__ is None
    assert exc_type.__name__ in str(info.value)


def test_connection_refused_on_a_closed_port() -> None:
    """A real connection to a closed port raises ConnectionFailed."""
    with (
        SmsbatClient(f"http://127.0.0.1:{closed_port()}", api_key=KEY) as client,
        pytest.raises(ConnectionFailed),
    ):
        client.get_status("abc123def456")


def test_slow_answer_raises_request_timeout(wire: SandboxServer) -> None:
    """The sandbox "slow" fault with a short read timeout raises RequestTimeout."""
    message_id = delivered_message(wire)
    wire.state.set_faults(message_faults={message_id: ["slow"]})
    with (
        sandbox_client(wire, read_timeout=0.1) as client,
        pytest.raises(RequestTimeout),
    ):
        client.get_status(message_id)


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        ("500", ServerError),
        ("429", RateLimited),
        ("401", AuthenticationError),
        ("malformed", MalformedResponse),
        ("truncated", MalformedResponse),
    ],
)
def test_sandbox_faults_on_the_wire(
    wire: SandboxServer, fault: str, error: type[SmsbatError]
) -> None:
    """Faults served over real HTTP raise their error; the next call succeeds again."""
    message_id = delivered_message(wire)
    wire.state.set_faults(message_faults={message_id: [fault]})
    with sandbox_client(wire) as client:
        with pytest.raises(error) as info:
            client.get_status(message_id)
        if fault == "429":
            assert info.value.retry_after == 1.0  # type: ignore[attr-defined]
        assert client.get_status(message_id).is_delivered
    assert wire.state.truth(message_id)["polls"] == 2


def test_unknown_message_on_the_wire(wire: SandboxServer) -> None:
    """An id the sandbox does not know raises MessageNotFound (404)."""
    with sandbox_client(wire) as client, pytest.raises(MessageNotFound) as info:
        client.get_status("doesnotexist0001")
    assert info.value.status_code == 404


# ---------------------------------------------------------------- secrets in errors


def _leaky(text: str) -> list[Handler]:
    """Failure handlers whose bodies, headers or messages quote ``text``."""
    body = {"error": f"credential {text} refused"}
    return [
        answering(401, json=body),
        answering(403, json=body),
        answering(404, json=body),
        answering(400, json=body),
        answering(500, json=body),
        answering(429, json=body, headers={"Retry-After": "3"}),
        answering(200, content=f"not json {text}".encode()),
        answering(200, json=[text]),
        answering(200, json={"deliverystatus": {"k": text}}),
        raising(httpx.ConnectError, f"could not connect with {text}"),
        raising(httpx.ReadTimeout, f"timed out; key {text}"),
        raising(httpx.RemoteProtocolError, f"peer closed {text}"),
    ]


@pytest.mark.parametrize(
    "credentials",
    [
        {"api_key": KEY},
        {"api_key": KEY, "auth": "basic-key"},
        {"username": "user", "password": PASSWORD},
    ],
)
def test_no_secret_in_any_raised_error(credentials: dict[str, Any]) -> None:
    """str(), repr() and the printed traceback of every error kind hold no credential."""
    secret = credentials.get("api_key") or credentials["password"]
    forbidden = [
        secret,
        base64.b64encode(f"@:{KEY}".encode()).decode(),
        base64.b64encode(f"user:{PASSWORD}".encode()).decode(),
    ]
    kinds = set()
    for handler in _leaky(secret):
        with (
            SmsbatClient(BASE, transport=httpx.MockTransport(handler), **credentials) as client,
            pytest.raises(SmsbatError) as info,
        ):
            client.get_status("abc123def456")
        kinds.add(type(info.value))
        printed = "".join(traceback.format_exception(info.value))
        for text in (str(info.value), repr(info.value), printed):
            for value in forbidden:
                assert value not in text
    assert len(kinds) >= 8


# -------------------------------------------------------------------- hostile ids


def test_at_least_25_hostile_ids() -> None:
    """The hostile-id corpus is large (the acceptance criterion asks for 25 or more)."""
    assert len(HOSTILE_IDS) >= 25


@pytest.mark.parametrize("message_id", HOSTILE_IDS, ids=_id)
def test_hostile_id_is_refused_before_any_request(message_id: Any) -> None:
    """SmsbatClient.get_status refuses a hostile id with InvalidMessageId and sends nothing."""
    transport, seen = recording()
    with SmsbatClient(BASE, api_key=KEY, transport=transport) as client:
        with pytest.raises(InvalidMessageId):
            client.get_status(message_id)
        assert seen == []


@pytest.mark.parametrize("message_id", HOSTILE_IDS, ids=_id)
def test_hostile_id_is_refused_before_any_request_async(message_id: Any) -> None:
    """AsyncSmsbatClient refuses a hostile id in get_status and get_statuses, sending nothing."""
    transport, seen = recording()

    async def main() -> None:
        async with AsyncSmsbatClient(BASE, api_key=KEY, transport=transport) as client:
            with pytest.raises(InvalidMessageId):
                await client.get_status(message_id)
            with pytest.raises(InvalidMessageId):
                await client.get_statuses(["abc123def456", message_id, "def456"])

    asyncio.run(main())
    assert seen == []


@pytest.mark.parametrize("message_id", VALID_IDS, ids=_id)
def test_valid_ids_are_requested_verbatim(message_id: str) -> None:
    """Valid ids are sent as one path segment, unchanged (no encoding needed)."""
    transport, seen = recording()
    with SmsbatClient(BASE, api_key=KEY, transport=transport) as client:
        client.get_status(message_id)
    (request,) = seen
    assert request.url.raw_path == f"/bat/message/{message_id}".encode()


# ------------------------------------------------------------------------ sending

GOOD = {"from": "SMSBAT", "to": "+380501234567", "text": "Your code is 1234"}


def test_send_messages_on_the_wire(wire: SandboxServer) -> None:
    """send_messages returns the accepted ids and a rejected entry the provider refused."""
    # The provider may refuse a number the local check accepts; a constructed (unvalidated)
    # message lets a bad number reach the sandbox to exercise its rejection path.
    refused = OutgoingMessage.model_construct(sender="SMSBAT", to="+1", text="x", type="sms")
    before = wire.state.stats()["send_requests"]
    with sandbox_client(wire) as client:
        result = client.send_messages(
            [
                OutgoingMessage(sender="SMSBAT", to="+380501234567", text="hello"),
                {**GOOD, "type": "viber_trans", "customerMessageId": "order-17"},
                refused,
            ]
        )
    assert wire.state.stats()["send_requests"] == before + 1
    assert isinstance(result.messagelistId, int)
    assert [m.status for m in result.messages] == ["accepted", "accepted", "rejected"]
    assert result.message_ids == [result.messages[0].messageId, result.messages[1].messageId]
    assert result.messages[1].customerMessageId == "order-17"
    rejected = result.messages[2]
    assert not rejected.accepted
    assert rejected.to == "+1"
    assert rejected.model_extra == {"reason": "to must be an E.164 number"}
    for message_id in result.message_ids:
        assert wire.state.truth(message_id)["messageId"] == message_id


def test_send_body_on_the_wire_format() -> None:
    """The POST body uses the wire names ("from") and omits unset optional fields."""
    answer = {
        "messagelistId": 7,
        "messages": [{"messageId": "m1", "status": "accepted", "parts": 1, "to": GOOD["to"]}],
    }
    transport, seen = recording(answering(200, json=answer))
    with SmsbatClient(BASE, api_key=KEY, transport=transport) as client:
        result = client.send_messages([{**GOOD, "ttl": 60}])
    (request,) = seen
    assert request.method == "POST"
    assert request.url.path == "/bat/messagelist"
    assert json.loads(request.content) == {"messages": [{**GOOD, "type": "sms", "ttl": 60}]}
    assert result.message_ids == ["m1"]


@pytest.mark.parametrize(
    "to",
    [
        "0501234567",
        "380501234567",
        "+0501234567",
        "+12",
        "+1234567890123456",
        "+380 50 123 45 67",
        "+380501234567\n",
        "",
        pytest.param(
            "+380\u0665\u0660\u0661\u0662\u0663\u0664\u0665\u0666\u0667",
            id="arabic-indic-digits",
        ),
        pytest.param(
            "+38050\uff11\uff12\uff13\uff14\uff15\uff16\uff17",
            id="fullwidth-digits",
        ),
    ],
)
def test_non_e164_number_is_refused_before_any_request(to: str) -> None:
    """A number that is not E.164 (ASCII digits) is refused locally; nothing is sent."""
    transport, seen = recording()
    with SmsbatClient(BASE, api_key=KEY, transport=transport) as client:
        with pytest.raises(ValueError, match="to"):
            client.send_messages([{**GOOD, "to": to}])
        with pytest.raises(ValueError, match="at least one message"):
            client.send_messages([])
    assert seen == []


def test_malformed_send_answer() -> None:
    """A send answer without a messages list raises MalformedResponse."""
    with mock_client(answering(200, json={"ok": True})) as client, pytest.raises(MalformedResponse):
        client.send_messages([GOOD])


# -------------------------------------------------------------------- async client


def test_async_client_on_the_wire(wire: SandboxServer) -> None:
    """AsyncSmsbatClient gets statuses and sends over real HTTP."""
    delivered = delivered_message(wire)
    pending = wire.state.create_scripted([("processing", 3600.0)])

    async def main() -> None:
        async with AsyncSmsbatClient(wire.url, api_key=wire.config.api_key) as client:
            assert (await client.get_status(delivered)).is_delivered
            results = await client.get_statuses([delivered, pending, "doesnotexist0002"])
            sent = await client.send_messages([GOOD])
        assert list(results) == [delivered, pending, "doesnotexist0002"]
        assert isinstance(results[delivered], MessageStatus)
        assert results[delivered].is_delivered  # type: ignore[union-attr]
        assert results[pending].deliverystatus == "scheduled"  # type: ignore[union-attr]
        assert isinstance(results["doesnotexist0002"], MessageNotFound)
        assert len(sent.message_ids) == 1

    asyncio.run(main())


def test_get_statuses_limits_concurrency() -> None:
    """get_statuses keeps at most ``concurrency`` requests in flight, and maps each id."""
    in_flight = 0
    peak = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        for _ in range(5):  # yield to the loop so other requests can start
            await asyncio.sleep(0)
        in_flight -= 1
        message_id = request.url.path.rsplit("/", 1)[-1]
        if message_id.startswith("gone"):
            return httpx.Response(404)
        return httpx.Response(200, json={"deliverystatus": "delivered", "messageId": message_id})

    ids = [f"m{i}" for i in range(12)] + ["gone1"]

    async def main() -> dict[str, Any]:
        transport = httpx.MockTransport(handler)
        async with AsyncSmsbatClient(BASE, api_key=KEY, transport=transport) as client:
            return await client.get_statuses(ids, concurrency=3)

    results = asyncio.run(main())
    assert peak == 3
    assert list(results) == ids
    assert all(results[i].messageId == i for i in ids[:-1])
    assert isinstance(results["gone1"], MessageNotFound)


def test_get_statuses_refuses_zero_concurrency() -> None:
    """concurrency < 1 is refused instead of waiting forever on an empty semaphore."""
    transport, _ = recording()

    async def main() -> None:
        async with AsyncSmsbatClient(BASE, api_key=KEY, transport=transport) as client:
            with pytest.raises(ValueError, match="concurrency"):
                await asyncio.wait_for(client.get_statuses(["abc"], concurrency=0), 0.2)

    asyncio.run(main())


def test_get_statuses_refuses_a_bare_string() -> None:
    """A single id passed as a str (not a list) is refused, not split into characters."""
    transport, seen = recording()

    async def main() -> None:
        async with AsyncSmsbatClient(BASE, api_key=KEY, transport=transport) as client:
            with pytest.raises((TypeError, InvalidMessageId)):
                await client.get_statuses("abc123def456")

    asyncio.run(main())
    assert seen == []


@pytest.mark.parametrize(
    ("exc", "error"),
    [
        (urllib3_errors.NewConnectionError(None, "refused"), ConnectionFailed),  # type: ignore[arg-type]
        (urllib3_errors.EmptyPoolError(None, "busy"), ConnectionFailed),  # type: ignore[arg-type]
        (urllib3_errors.ConnectTimeoutError("slow"), RequestTimeout),
        (urllib3_errors.ReadTimeoutError(None, "/bat", "slow"), RequestTimeout),  # type: ignore[arg-type]
        (urllib3_errors.ProtocolError("Connection broken: IncompleteRead"), MalformedResponse),
        (urllib3_errors.SSLError("bad certificate"), ConnectionFailed),
    ],
)
def test_urllib3_errors_map_to_the_same_families(
    exc: urllib3_errors.HTTPError, error: type[SmsbatError]
) -> None:
    """The status GET's urllib3 errors fall in the families httpx's fall in: a refused
    connection is no timeout though urllib3 derives it from one; only the class is named."""
    mapped = _urllib3_error(exc)
    assert type(mapped) is error
    assert str(mapped).endswith(f"({type(exc).__name__})")


def test_status_gets_take_urllib3_unless_a_transport_is_given(wire: SandboxServer) -> None:
    """Without a transport, status GETs go through the lean urllib3 path (and still
    authenticate and parse); with one, everything goes through httpx and that transport."""
    message_id = delivered_message(wire)
    with sandbox_client(wire) as client:
        assert client._status is not None
        assert client.get_status(message_id).deliverystatus == "delivered"
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        return httpx.Response(200, json={"messageId": message_id, "deliverystatus": "delivered"})

    with SmsbatClient(BASE, api_key=KEY, transport=httpx.MockTransport(handler)) as client:
        assert client._status is None
        client.get_status(message_id)
    assert seen == [f"/bat/message/{message_id}"]
