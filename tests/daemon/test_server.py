"""The daemon in-process: serve() on port 0, a manager on a temp file, a manual clock,
and real websockets clients."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import InvalidStatus
from websockets.typing import Subprotocol

from sessionstore import Session, SessionManager, Settings
from sessionstore.cli import build_parser
from sessionstore.daemon import protocol as p
from sessionstore.daemon.server import DaemonOptions, SessionServer, run_daemon, serve
from tests.daemon.conftest import Clients, StartServer
from tests.daemon.wsclient import closed, http_get, parse_http, receive, request, send
from tests.helpers import ManualClock, wait_until

# ----- handshake and welcome -----


@contextlib.asynccontextmanager
async def _served(
    start_server: StartServer, path: Path, clock: ManualClock, **settings: Any
) -> AsyncIterator[tuple[SessionManager, SessionServer, str]]:
    """A manager of its own on ``path`` (these settings, the manual clock), an
    in-process server on it, and its URL."""
    async with SessionManager(
        str(path), clock=clock, refresh_interval_secs=0, **settings
    ) as manager:
        server = await start_server(manager)
        yield manager, server, f"ws://127.0.0.1:{server.port}"


async def test_hello_gets_a_new_session_and_a_strong_token(
    url: str, clients: Clients, server: SessionServer, manager: SessionManager, clock: ManualClock
) -> None:
    ws, welcome = await clients.hello(url)
    assert ws.subprotocol == p.SUBPROTOCOL
    assert welcome["re"] == "h"
    assert welcome["recovered"] is False
    assert welcome["reason"] == "new"
    assert welcome["idle_timeout_s"] == 60
    assert welcome["boot_id"] == server.boot_id
    assert welcome["server_time"] == clock.now
    assert welcome["data"] == {}
    assert welcome["version"] == 1
    assert p.is_wellformed_token(welcome["token"])
    assert len(welcome["token"]) >= 43  # 256 bits of URL-safe base64
    assert await manager.get(welcome["session_id"]) is not None


async def test_resume_after_reconnect_keeps_session_and_data_and_rotates_the_token(
    url: str, clients: Clients
) -> None:
    ws, first = await clients.hello(url)
    assert (await request(ws, {"op": "set", "id": 1, "data": {"n": 1}}))["version"] == 2
    await ws.close()

    ws2, again = await clients.resume(url, first["token"])
    assert again["recovered"] is True
    assert again["reason"] is None
    assert again["session_id"] == first["session_id"]
    assert again["data"] == {"n": 1}
    assert again["version"] == 2
    assert again["token"] != first["token"]
    await ws2.close()

    # The rotated-out token is dead: a new session, never the old one.
    _, stale = await clients.resume(url, first["token"])
    assert stale["recovered"] is False
    assert stale["reason"] == "revoked"
    assert stale["session_id"] != first["session_id"]


@pytest.mark.parametrize("token", ["", "short", "x" * 500, "A" * 43, "ü" * 43, "a b" * 20])
async def test_failed_resume_gets_a_brand_new_session(
    url: str, clients: Clients, token: str
) -> None:
    _, welcome = await clients.resume(url, token)
    assert welcome["recovered"] is False
    assert welcome["reason"] == "unknown"
    assert welcome["version"] == 1
    assert welcome["data"] == {}


async def test_resume_of_an_expired_session_says_expired(
    url: str, clients: Clients, clock: ManualClock
) -> None:
    ws, first = await clients.hello(url)
    await ws.close()
    clock.advance(61)
    _, again = await clients.resume(url, first["token"])
    assert again["recovered"] is False
    assert again["reason"] == "expired"
    assert again["session_id"] != first["session_id"]


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ('{"op":"ping"}', "handshake_required"),
        ('{"op":"set","data":{}}', "handshake_required"),
        ("garbage", "bad_json"),
        ("[]", "not_object"),
        ('{"op":"hello","v":9}', "unsupported_version"),
        ('{"op":"resume","token":7}', "bad_type"),
        (b"\x00\x01", "binary_frame"),
    ],
)
async def test_a_first_frame_that_is_not_hello_or_resume_closes_4004(
    url: str, clients: Clients, manager: SessionManager, frame: str | bytes, code: str
) -> None:
    ws = await clients.open(url)
    await send(ws, frame)
    close_code, reason, frames = await closed(ws)
    assert close_code == p.CLOSE_PROTOCOL_ERROR
    assert reason.startswith(code)
    assert frames == []  # welcome is always the first server frame; nothing else came
    assert await manager.list_ids() == []


async def test_no_first_frame_within_the_handshake_timeout_closes_4005(
    start_server: StartServer, clients: Clients
) -> None:
    server = await start_server(handshake_timeout=0.2)
    ws = await clients.open(f"ws://127.0.0.1:{server.port}")
    close_code, reason, _ = await closed(ws, timeout=3)
    assert close_code == p.CLOSE_HANDSHAKE_TIMEOUT
    assert "handshake" in reason


async def test_session_limit_closes_1013_with_a_reason(
    make_limited: SessionManager, start_server: StartServer, clients: Clients
) -> None:
    server = await start_server(make_limited)
    url = f"ws://127.0.0.1:{server.port}"
    await clients.hello(url)
    ws = await clients.open(url)
    await send(ws, {"op": "hello"})
    close_code, reason, frames = await closed(ws)
    assert close_code == p.CLOSE_TRY_AGAIN_LATER
    assert "limit" in reason
    assert frames == []


@pytest.fixture
async def make_limited(tmp_path: Path, clock: ManualClock) -> AsyncIterator[SessionManager]:
    async with SessionManager(
        str(tmp_path / "limited.db"),
        clock=clock,
        max_concurrent_sessions=1,
        refresh_interval_secs=0,
    ) as m:
        yield m


async def test_subprotocol_is_negotiated_but_optional(url: str, clients: Clients) -> None:
    plain = await clients.open(url, subprotocols=None)
    assert plain.subprotocol is None
    assert (await request(plain, {"op": "hello"}))["op"] == "welcome"
    with pytest.raises(InvalidStatus) as info:
        await clients.open(url, subprotocols=[Subprotocol("chat.v2")])
    assert info.value.response.status_code == 400


async def test_origin_allow_list(start_server: StartServer, clients: Clients) -> None:
    server = await start_server(origins=["https://app.example"])
    url = f"ws://127.0.0.1:{server.port}"
    with pytest.raises(InvalidStatus) as info:
        await clients.open(url, origin="https://evil.example")
    assert info.value.response.status_code == 403
    allowed = await clients.open(url, origin="https://app.example")
    assert (await request(allowed, {"op": "hello"}))["op"] == "welcome"
    no_origin = await clients.open(url)  # not a browser
    assert (await request(no_origin, {"op": "hello"}))["op"] == "welcome"


# ----- steady state -----


async def test_ping_get_set_and_compare_and_set(
    url: str, clients: Clients, manager: SessionManager
) -> None:
    ws, welcome = await clients.hello(url)
    sid = welcome["session_id"]
    assert await request(ws, {"op": "ping", "id": "p"}) == {"op": "pong", "re": "p"}
    assert await request(ws, {"op": "set", "id": 1, "data": {"a": 1, "b": [1, 2]}}) == {
        "op": "result",
        "re": 1,
        "version": 2,
    }
    assert (await request(ws, {"op": "set", "data": {"c": 3}, "delete": ["a"]}))["version"] == 3
    assert await request(ws, {"op": "get", "id": 2}) == {
        "op": "result",
        "re": 2,
        "data": {"b": [1, 2], "c": 3},
        "version": 3,
    }
    got = await request(ws, {"op": "get", "keys": ["c", "zz"]})
    assert got["data"] == {"c": 3}
    conflict = await request(ws, {"op": "set", "id": 3, "data": {"c": 4}, "if_version": 2})
    assert conflict["op"] == "error"
    assert conflict["code"] == "version_conflict"
    assert conflict["re"] == 3
    assert conflict["version"] == 3
    ok = await request(ws, {"op": "set", "data": {"c": 4}, "if_version": 3})
    assert ok["version"] == 4
    session = await manager.get(sid)
    assert session is not None
    assert session.data == {"b": [1, 2], "c": 4}


async def test_data_over_the_byte_limit_is_refused_and_nothing_is_written(
    tmp_path: Path, clock: ManualClock, start_server: StartServer, clients: Clients
) -> None:
    async with SessionManager(
        str(tmp_path / "small.db"), clock=clock, max_data_bytes=100, refresh_interval_secs=0
    ) as small:
        server = await start_server(small)
        ws, _ = await clients.hello(f"ws://127.0.0.1:{server.port}")
        assert (await request(ws, {"op": "set", "data": {"k": "v"}}))["version"] == 2
        reply = await request(ws, {"op": "set", "id": "big", "data": {"x": "y" * 200}})
        assert reply["code"] == "too_large"
        assert reply["limit"] == 100
        assert await request(ws, {"op": "get"}) == {
            "op": "result",
            "re": None,
            "data": {"k": "v"},
            "version": 2,
        }
        server.close()
        await server.wait_closed()


BAD_FRAMES: list[tuple[str | bytes, str]] = [
    ("{not json", "bad_json"),
    ('"just a string"', "not_object"),
    ("[1,2]", "not_object"),
    ('{"id":"x"}', "missing_op"),
    ('{"op":"no_such_op"}', "unknown_op"),
    ('{"op":5}', "bad_type"),
    ('{"op":"set","data":[1]}', "bad_type"),
    ('{"op":"set","data":{"a":1},"if_version":"1"}', "bad_type"),
    ('{"op":"get","keys":{"a":1}}', "bad_type"),
    ('{"op":"set","data":{"a":1e999}}', "bad_json"),
    ('{"op":"set","data":' + '{"a":' * 40 + "1" + "}" * 41, "bad_json"),
    ('{"op":"hello"}', "unexpected_op"),
    ('{"op":"hello","v":2}', "unsupported_version"),  # malformed first, as documented
    ('{"op":"resume"}', "bad_type"),
    (b'{"op":"ping"}', "binary_frame"),
]


@pytest.mark.parametrize(("frame", "code"), BAD_FRAMES)
async def test_bad_input_gets_an_error_and_changes_nothing(
    url: str, clients: Clients, manager: SessionManager, frame: str | bytes, code: str
) -> None:
    ws, welcome = await clients.hello(url)
    other, _ = await clients.hello(url)
    reply = await request(ws, frame)
    assert reply["op"] == "error"
    assert reply["code"] == code
    assert reply["message"]
    # The connection, the other client and the data are untouched.
    assert (await request(ws, {"op": "ping"}))["op"] == "pong"
    assert (await request(other, {"op": "ping"}))["op"] == "pong"
    session = await manager.get(welcome["session_id"])
    assert session is not None
    assert (session.data, session.version) == ({}, 1)


async def test_error_reply_echoes_the_id(url: str, clients: Clients) -> None:
    ws, _ = await clients.hello(url)
    reply = await request(ws, {"op": "set", "id": "q", "delete": "a"})
    assert (reply["op"], reply["re"], reply["code"]) == ("error", "q", "bad_type")


async def test_frame_over_max_size_closes_1009_and_others_carry_on(
    start_server: StartServer, clients: Clients
) -> None:
    server = await start_server(max_size=1024)
    url = f"ws://127.0.0.1:{server.port}"
    ws, _ = await clients.hello(url)
    other, _ = await clients.hello(url)
    await send(ws, {"op": "set", "data": {"x": "y" * 2000}})
    close_code, _, _ = await closed(ws)
    assert close_code == p.CLOSE_TOO_BIG
    assert (await request(other, {"op": "ping"}))["op"] == "pong"
    again, _ = await clients.hello(url)
    assert (await request(again, {"op": "ping"}))["op"] == "pong"


async def test_health_op_and_http_healthz_report_the_same_figures(
    url: str, server: SessionServer, clients: Clients
) -> None:
    ws, _ = await clients.hello(url)
    health = await request(ws, {"op": "health", "id": 1})
    assert health["op"] == "health"
    assert health["re"] == 1
    assert health["status"] == "ok"
    assert health["db"] == "ok"
    assert health["sessions"] == {"connected": 1, "live": 1, "stored": 1, "limit": 100}
    status, headers, body = await http_get(server.port, "/healthz")
    assert status == 200
    assert headers["content-type"] == "application/json"
    http_health = json.loads(body)
    assert http_health["sessions"] == health["sessions"]
    assert set(http_health) == set(health) - {"op", "re"}
    assert http_health["uptime_s"] >= 0


async def test_metrics_endpoint_is_prometheus_text(
    url: str, server: SessionServer, clients: Clients
) -> None:
    ws, welcome = await clients.hello(url)
    await ws.close()
    await clients.resume(url, welcome["token"])
    await clients.resume(url, "bogus-token")
    status, headers, body = await http_get(server.port, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in body.splitlines()
        if line and not line.startswith("#")
    }
    assert samples["sessionstore_sessions_live"] == 2
    assert samples["sessionstore_sessions_created_total"] == 2
    assert samples['sessionstore_resumes_total{result="ok"}'] == 1
    assert samples['sessionstore_resumes_total{result="unknown"}'] == 1
    assert samples["sessionstore_connections_open"] == 2
    assert samples["sessionstore_draining"] == 0
    assert "sessionstore_cleanup_duration_seconds" in samples
    assert "sessionstore_pending_activity" in samples
    assert samples["sessionstore_flush_lag_seconds"] > 0  # the creates above committed


async def test_two_servers_keep_separate_metrics(
    start_server: StartServer, clients: Clients
) -> None:
    one = await start_server()
    two = await start_server()
    await clients.resume(f"ws://127.0.0.1:{one.port}", "nope")
    assert 'sessionstore_resumes_total{result="unknown"} 1.0' in await one.metrics_text()
    assert 'sessionstore_resumes_total{result="unknown"} 0.0' in await two.metrics_text()


# ----- activity -----


async def test_every_client_frame_is_activity_but_keepalive_pings_are_not(
    start_server: StartServer, clients: Clients, manager: SessionManager, clock: ManualClock
) -> None:
    server = await start_server(ping_interval=0.02, ping_timeout=1)
    ws, welcome = await clients.hello(f"ws://127.0.0.1:{server.port}")
    sid = welcome["session_id"]

    async def last_activity() -> float:
        session = await manager.get(sid)
        assert session is not None
        return session.last_activity

    start = await last_activity()
    clock.advance(10)
    await asyncio.sleep(0.1)  # several server keepalive pings, answered by the client
    latency = await ws.ping()  # and one from the client
    await latency
    assert await last_activity() == start

    assert (await request(ws, "not json"))["code"] == "bad_json"  # malformed still counts
    assert await last_activity() == clock.now
    clock.advance(10)
    await request(ws, {"op": "ping"})
    assert await last_activity() == clock.now


# ----- one connection per session -----


async def test_second_resume_takes_over_and_the_first_gets_superseded_4003(
    url: str, clients: Clients, server: SessionServer
) -> None:
    first, welcome = await clients.hello(url)
    await request(first, {"op": "set", "data": {"a": 1}})
    second, again = await clients.resume(url, welcome["token"])
    assert again["recovered"] is True
    code, _, frames = await closed(first)
    assert code == p.CLOSE_SUPERSEDED
    assert frames == [{"op": "superseded"}]
    assert (await request(second, {"op": "get"}))["data"] == {"a": 1}
    assert server.connected == 1


async def test_close_leaves_the_session_resumable(url: str, clients: Clients) -> None:
    ws, welcome = await clients.hello(url)
    assert await request(ws, {"op": "close", "id": "c"}) == {"op": "bye", "re": "c"}
    code, _, _ = await closed(ws)
    assert code == p.CLOSE_NORMAL
    _, again = await clients.resume(url, welcome["token"])
    assert again["recovered"] is True


async def test_logout_deletes_the_session(
    url: str, clients: Clients, manager: SessionManager
) -> None:
    ws, welcome = await clients.hello(url)
    assert await request(ws, {"op": "logout", "id": "o"}) == {"op": "bye", "re": "o"}
    code, _, _ = await closed(ws)
    assert code == p.CLOSE_NORMAL
    assert await manager.get(welcome["session_id"]) is None
    _, again = await clients.resume(url, welcome["token"])
    assert again["recovered"] is False
    assert again["reason"] == "revoked"


# ----- sessions that go away under a connection: 4002 -----


async def test_session_idle_past_the_timeout_is_closed_4002(
    url: str, clients: Clients, clock: ManualClock
) -> None:
    ws, _ = await clients.hello(url)
    clock.advance(61)
    code, reason, _ = await closed(ws, timeout=3)
    assert code == p.CLOSE_SESSION_GONE
    assert "expired" in reason


async def test_session_deleted_by_cleanup_is_closed_4002(
    start_server: StartServer, clients: Clients, manager: SessionManager, clock: ManualClock
) -> None:
    server = await start_server(check_interval=60)  # only the removal listener can act
    ws, _ = await clients.hello(f"ws://127.0.0.1:{server.port}")
    clock.advance(61)
    assert await manager.cleanup_stale_sessions() == 1
    code, reason, _ = await closed(ws, timeout=3)
    assert code == p.CLOSE_SESSION_GONE
    assert "expired" in reason


async def test_session_removed_by_another_manager_is_closed_4002(
    url: str, clients: Clients, manager: SessionManager, clock: ManualClock
) -> None:
    ws, welcome = await clients.hello(url)
    bystander, _ = await clients.hello(url)
    async with SessionManager(
        manager.database, clock=clock, background_tasks=False, refresh_interval_secs=0
    ) as admin:
        assert await admin.remove(welcome["session_id"])
    code, reason, _ = await closed(ws, timeout=3)
    assert code == p.CLOSE_SESSION_GONE
    assert "removed" in reason
    assert (await request(bystander, {"op": "ping"}))["op"] == "pong"


# ----- the application handler -----


async def test_application_handler_gets_session_and_message(
    start_server: StartServer, clients: Clients
) -> None:
    seen: list[tuple[str, dict[str, Any]]] = []

    async def handler(session: Session, message: dict[str, Any]) -> dict[str, Any] | None:
        seen.append((session.session_id, message))
        if message["op"] == "shout":
            return {"op": "shouted", "text": str(message.get("text", "")).upper()}
        if message["op"] == "quiet":
            return None
        if message["op"] == "refuse":
            raise p.ProtocolError("forbidden", "not for you")
        if message["op"] == "nan":
            return {"x": float("nan")}
        raise RuntimeError("boom")

    server = await start_server(handler=handler)
    ws, welcome = await clients.hello(f"ws://127.0.0.1:{server.port}")
    assert await request(ws, {"op": "shout", "id": 5, "text": "hi"}) == {
        "op": "shouted",
        "text": "HI",
        "re": 5,
    }
    assert seen == [(welcome["session_id"], {"op": "shout", "id": 5, "text": "hi"})]
    await send(ws, {"op": "quiet"})  # no reply: the next frame answers the ping
    assert (await request(ws, {"op": "ping"}))["op"] == "pong"
    refused = await request(ws, {"op": "refuse", "id": "r"})
    assert (refused["code"], refused["re"]) == ("forbidden", "r")
    assert (await request(ws, {"op": "nan"}))["code"] == "internal_error"
    assert (await request(ws, {"op": "crash"}))["code"] == "internal_error"
    # built-in ops stay built in
    assert (await request(ws, {"op": "get"}))["op"] == "result"
    assert len(seen) == 5


# ----- stopping -----


async def test_close_with_1012_and_healthz_503_while_draining(
    start_server: StartServer, clients: Clients
) -> None:
    server = await start_server()
    url = f"ws://127.0.0.1:{server.port}"
    ws, _ = await clients.hello(url)
    # An HTTP client that connected before the drain and asks during it.
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        server.close(p.CLOSE_SERVICE_RESTART, "service restart")
        assert server.draining
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        async with asyncio.timeout(5):
            raw = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    status, _, body = parse_http(raw)
    assert status == 503
    assert json.loads(body)["status"] == "draining"
    code, reason, _ = await closed(ws)
    assert (code, reason) == (p.CLOSE_SERVICE_RESTART, "service restart")
    await server.wait_closed()


async def test_serve_is_an_async_context_manager_closing_with_1001(
    manager: SessionManager, clients: Clients
) -> None:
    async with serve(manager, port=0) as server:
        ws, _ = await clients.hello(f"ws://127.0.0.1:{server.port}")
    code, _, _ = await closed(ws)
    assert code == p.CLOSE_GOING_AWAY


async def test_received_frames_after_welcome_order(url: str, clients: Clients) -> None:
    """Replies come back in request order, each echoing its id."""
    ws, _ = await clients.hello(url)
    for i in range(20):
        await send(ws, {"op": "ping", "id": i})
    assert [(await receive(ws))["re"] for _ in range(20)] == list(range(20))


# ----- the `sessionstore serve` command's options -----


def test_daemon_options_from_arguments_then_environment() -> None:
    args = build_parser().parse_args(
        ["serve", "--port", "0", "--origin", "https://a.example", "--origin", "https://b.example"]
    )
    env = {
        "SESSIONSTORE_HOST": "::1",
        "SESSIONSTORE_PORT": "9999",
        "SESSIONSTORE_MAX_SIZE": "2048",
        "SESSIONSTORE_HANDSHAKE_TIMEOUT": "0.5",
        "SESSIONSTORE_ORIGINS": "https://ignored.example",
    }
    options = DaemonOptions.from_args(args, env)
    assert options == DaemonOptions(
        host="::1",
        port=0,
        max_size=2048,
        handshake_timeout=0.5,
        origins=("https://a.example", "https://b.example"),
    )
    plain = DaemonOptions.from_args(build_parser().parse_args(["serve"]), {})
    assert plain == DaemonOptions()
    assert (plain.host, plain.port, plain.max_size, plain.origins) == (
        "127.0.0.1",
        8765,
        65536,
        None,
    )
    from_env = DaemonOptions.from_args(
        build_parser().parse_args(["serve"]), {"SESSIONSTORE_ORIGINS": "https://x, https://y"}
    )
    assert from_env.origins == ("https://x", "https://y")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SESSIONSTORE_PORT": "http"}, "SESSIONSTORE_PORT"),
        ({"SESSIONSTORE_PORT": "70000"}, "port"),
        ({"SESSIONSTORE_MAX_SIZE": "0"}, "max size"),
        ({"SESSIONSTORE_HANDSHAKE_TIMEOUT": "-1"}, "handshake timeout"),
    ],
)
def test_daemon_options_reject_bad_values(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DaemonOptions.from_args(build_parser().parse_args(["serve"]), env)


async def test_run_daemon_exits_1_when_the_port_is_taken(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = build_parser().parse_args(["serve", "--port", str(port)])
        settings = Settings(database=str(tmp_path / "taken.db"))
        assert await run_daemon(args, settings) == 1
    assert f"cannot listen on 127.0.0.1 port {port}" in caplog.text


async def test_one_token_resumed_twice_at_once_recovers_the_session_once(
    url: str, clients: Clients
) -> None:
    # Found by review: both resumes found the session by the token, and both rotated
    # it: two clients held the session from one token.
    ws, welcome = await clients.hello(url)
    await ws.close()
    a, b = await clients.open(url), await clients.open(url)
    replies = await asyncio.gather(
        request(a, {"op": "resume", "token": welcome["token"]}),
        request(b, {"op": "resume", "token": welcome["token"]}),
    )
    assert sorted(r["recovered"] for r in replies) == [False, True]
    lost = next(r for r in replies if not r["recovered"])
    assert lost["reason"] == "revoked"
    assert lost["session_id"] != welcome["session_id"]


async def test_a_handler_failing_on_another_session_gets_an_error_reply(
    start_server: StartServer, manager: SessionManager, clients: Clients
) -> None:
    # Found by review: a handler's SessionNotFoundError for another session closed the
    # caller with 4002, and a SessionLimitError escaped the connection (1011).
    async def handler(_session: Session, message: dict[str, Any]) -> dict[str, Any]:
        if message["op"] == "send":
            await manager.set_data(message["to"], {"msg": "hi"})
        else:
            await manager.ensure()  # at the limit
        return {"done": True}

    server = await start_server(handler=handler)
    ws, welcome = await clients.hello(f"ws://127.0.0.1:{server.port}")
    sent = await request(ws, {"op": "send", "id": 1, "to": "no-such-session"})
    assert (sent["op"], sent["code"], sent["re"]) == ("error", "internal_error", 1)
    real_limit = manager.settings
    manager.settings = real_limit.with_(max_concurrent_sessions=1)
    try:
        spawned = await request(ws, {"op": "spawn", "id": 2})
    finally:
        manager.settings = real_limit
    assert (spawned["op"], spawned["code"]) == ("error", "internal_error")
    assert (await request(ws, {"op": "ping", "id": 3}))["op"] == "pong"  # still served
    assert await manager.get(welcome["session_id"]) is not None


async def test_a_logout_the_database_refuses_gets_an_error_and_keeps_the_session(
    start_server: StartServer, tmp_path: Path, clients: Clients, clock: ManualClock
) -> None:
    # Found by review: the failed remove() escaped and the connection closed with 1011.
    async with _served(start_server, tmp_path / "busy.db", clock, busy_timeout_ms=50) as (
        m,
        _server,
        url,
    ):
        ws, welcome = await clients.hello(url)
        other = sqlite3.connect(tmp_path / "busy.db", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        try:
            refused = await request(ws, {"op": "logout", "id": 7})
        finally:
            other.rollback()
            other.close()
        assert (refused["op"], refused["code"], refused["re"]) == ("error", "storage_error", 7)
        assert await m.get(welcome["session_id"]) is not None
        assert (await request(ws, {"op": "logout", "id": 8}))["op"] == "bye"
        assert await m.get(welcome["session_id"]) is None


async def test_a_text_frame_that_is_not_utf8_closes_1007_as_documented(
    url: str, clients: Clients
) -> None:
    ws, _ = await clients.hello(url)
    await ws.send(b'{"op":"ping","x":"\xff"}', text=True)
    code, _, _ = await closed(ws)
    assert code == 1007


async def test_a_logout_that_fails_while_a_resume_takes_over_supersedes_the_old_connection(
    start_server: StartServer, tmp_path: Path, clients: Clients, clock: ManualClock
) -> None:
    # Found by review: the failed logout put the old connection back only if no one
    # else held the session, and served it all the same when another connection had
    # resumed it meanwhile: two connections on one session.
    db = tmp_path / "d.db"
    async with _served(start_server, db, clock) as (m, _server, url):
        old, welcome = await clients.hello(url)
        writer = m._writer
        assert writer is not None
        other = sqlite3.connect(db, isolation_level=None)
        # The database refuses this delete (a real trigger, as a full disk would).
        other.execute(
            "CREATE TRIGGER refuse BEFORE DELETE ON sessions "
            "BEGIN SELECT RAISE(ABORT, 'disk is full'); END"
        )
        other.execute("BEGIN IMMEDIATE")  # another process writes for a moment
        try:
            new = await clients.open(url)
            await send(new, {"op": "resume", "v": 1, "id": "r", "token": welcome["token"]})
            await wait_until(lambda: _true(writer.busy))  # the token's write waits for the lock
            await send(old, {"op": "logout", "id": 7})
            await wait_until(lambda: _true(any(r[0] == "delete" for r in writer._queue)))
        finally:
            other.rollback()
            other.close()
        resumed = await receive(new)
        assert (resumed["op"], resumed["recovered"]) == ("welcome", True)
        code, _, frames = await closed(old)
        assert code == p.CLOSE_SUPERSEDED
        assert frames == [{"op": "superseded"}]
        assert (await request(new, {"op": "set", "id": 8, "data": {"by": "new"}}))["op"] == "result"


async def _true(value: bool) -> bool:
    return value


async def test_a_flood_of_health_requests_shares_one_read_of_the_figures(
    server: SessionServer, manager: SessionManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    # /healthz answers anyone, and each read of the figures is a flush and counts over
    # every live session: twenty requests at once read them twice (the one in flight
    # when the others came, then one for all of those), not twenty times.
    await manager.ensure()
    asked, reads = [0], [0]
    real_health, real_figures = server.health, manager.get_session_metrics

    async def health() -> dict[str, Any]:
        asked[0] += 1
        return await real_health()

    async def figures() -> dict[str, Any]:
        reads[0] += 1
        await wait_until(lambda: _true(asked[0] == 20))  # every request is in
        return await real_figures()

    monkeypatch.setattr(server, "health", health)
    monkeypatch.setattr(manager, "get_session_metrics", figures)
    answers = await asyncio.gather(*(http_get(server.port, "/healthz") for _ in range(20)))
    assert {status for status, _, _ in answers} == {200}
    assert {json.loads(body)["sessions"]["live"] for _, _, body in answers} == {1}
    assert reads == [2]


async def test_health_asked_while_the_server_closes_gets_its_answer(
    start_server: StartServer, tmp_path: Path, clock: ManualClock
) -> None:
    # Found by review: close() cancelled the shared read of the figures, and a health
    # check waiting on it got CancelledError instead of an answer.
    db = tmp_path / "h.db"
    async with _served(start_server, db, clock, flush_interval_secs=3600) as (m, server, _url):
        sid = (await m.ensure()).session_id
        clock.advance(1)
        assert await m.update_activity(sid)  # pending: the figures' flush writes it
        writer = m._writer
        assert writer is not None
        other = sqlite3.connect(db, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process writes for a moment
        try:
            asking = asyncio.ensure_future(server.health())
            await wait_until(lambda: _true(writer.busy))
            server.close()
            await server.wait_closed()
        finally:
            other.rollback()
            other.close()
        assert (await asyncio.wait_for(asking, 10))["status"] == "draining"


async def test_health_asked_after_a_write_returned_counts_it(
    server: SessionServer, manager: SessionManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found by review: a health check asked after a write returned joined a read that
    # had begun before it, and did not count the write.
    real = manager.store.aggregates
    read_done, release = asyncio.Event(), asyncio.Event()

    async def aggregates(cutoff: float) -> dict[str, Any]:  # the real read, handed back late
        figures = await real(cutoff)
        read_done.set()
        await release.wait()
        return figures

    monkeypatch.setattr(manager.store, "aggregates", aggregates)
    first = asyncio.ensure_future(server.health())
    await read_done.wait()
    await manager.ensure("s")  # durable on return
    second = asyncio.ensure_future(server.health())
    for _ in range(5):
        await asyncio.sleep(0)  # it is waiting for the read in flight
    release.set()
    assert (await first)["sessions"]["live"] == 0
    assert (await second)["sessions"]["live"] == 1
