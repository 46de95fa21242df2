"""End to end: ``python -m sessionstore serve`` as a real subprocess on a free port and a
temporary database, driven by a real websockets client."""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.exceptions import InvalidStatus

from sessionstore.daemon import protocol as p
from tests.daemon.conftest import Clients, SpawnDaemon
from tests.daemon.process import Daemon
from tests.daemon.wsclient import closed, http_get, request, send
from tests.helpers import run_cli


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon for the tests that do not restart it."""
    tmp = tmp_path_factory.mktemp("shared")
    daemon = Daemon(
        tmp / "sessions.db",
        tmp / "daemon.log",
        "--max-size",
        "4096",
        "--max-data-bytes",
        "1024",
        "--handshake-timeout",
        "0.5",
        "--origin",
        "https://app.example",
    ).start()
    yield daemon
    try:
        assert daemon.stop(signal.SIGTERM) == 0
    finally:
        daemon.kill()


async def test_new_session_then_resume_after_reconnect(shared: Daemon, clients: Clients) -> None:
    ws, welcome = await clients.hello(shared.url)
    assert ws.subprotocol == p.SUBPROTOCOL
    assert (welcome["recovered"], welcome["reason"], welcome["version"]) == (False, "new", 1)
    assert (await request(ws, {"op": "set", "id": 1, "data": {"cart": ["a"]}}))["version"] == 2
    await ws.close()

    _, again = await clients.resume(shared.url, welcome["token"])
    assert again["recovered"] is True
    assert again["session_id"] == welcome["session_id"]
    assert again["data"] == {"cart": ["a"]}
    assert again["token"] != welcome["token"]
    assert again["boot_id"] == welcome["boot_id"]


async def test_takeover_closes_the_first_connection_4003(shared: Daemon, clients: Clients) -> None:
    first, welcome = await clients.hello(shared.url)
    second, again = await clients.resume(shared.url, welcome["token"])
    assert again["recovered"] is True
    code, _, frames = await closed(first)
    assert code == p.CLOSE_SUPERSEDED
    assert frames == [{"op": "superseded"}]
    assert (await request(second, {"op": "ping"}))["op"] == "pong"


async def test_close_then_logout(shared: Daemon, clients: Clients) -> None:
    ws, welcome = await clients.hello(shared.url)
    assert await request(ws, {"op": "close", "id": 1}) == {"op": "bye", "re": 1}
    assert (await closed(ws))[0] == p.CLOSE_NORMAL
    ws, again = await clients.resume(shared.url, welcome["token"])
    assert again["recovered"] is True
    assert await request(ws, {"op": "logout", "id": 2}) == {"op": "bye", "re": 2}
    assert (await closed(ws))[0] == p.CLOSE_NORMAL
    _, gone = await clients.resume(shared.url, again["token"])
    assert (gone["recovered"], gone["reason"]) == (False, "revoked")


async def test_get_set_with_if_version_and_health(shared: Daemon, clients: Clients) -> None:
    ws, _ = await clients.hello(shared.url)
    assert (await request(ws, {"op": "set", "data": {"a": 1}, "if_version": 1}))["version"] == 2
    conflict = await request(ws, {"op": "set", "id": "x", "data": {"a": 9}, "if_version": 1})
    assert (conflict["code"], conflict["re"], conflict["version"]) == ("version_conflict", "x", 2)
    assert await request(ws, {"op": "get", "id": "g"}) == {
        "op": "result",
        "re": "g",
        "data": {"a": 1},
        "version": 2,
    }
    health = await request(ws, {"op": "health"})
    assert (health["op"], health["status"], health["db"]) == ("health", "ok", "ok")
    assert health["sessions"]["connected"] >= 1


async def test_http_healthz_and_metrics(shared: Daemon, clients: Clients) -> None:
    await clients.hello(shared.url)
    status, headers, body = await http_get(shared.port, "/healthz")
    assert status == 200
    assert headers["content-type"] == "application/json"
    health = json.loads(body)
    assert health["status"] == "ok"
    assert health["sessions"]["live"] >= 1
    assert health["uptime_s"] > 0
    status, headers, body = await http_get(shared.port, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=")
    assert "# TYPE sessionstore_sessions_live gauge" in body
    assert "sessionstore_sessions_created_total" in body


BAD_FRAMES: list[tuple[str | bytes, str]] = [
    ("{oops", "bad_json"),
    ("42", "not_object"),
    ('{"id":1}', "missing_op"),
    ('{"op":"frobnicate"}', "unknown_op"),
    ('{"op":"set","data":"x"}', "bad_type"),
    ('{"op":"set","if_version":-3}', "bad_value"),
    (b"\x89PNG", "binary_frame"),
    ('{"op":"set","data":{"blob":"' + "z" * 2000 + '"}}', "too_large"),
]


async def test_bad_input_leaves_connection_daemon_and_data_alone(
    shared: Daemon, clients: Clients
) -> None:
    ws, welcome = await clients.hello(shared.url)
    bystander, _ = await clients.hello(shared.url)
    assert (await request(ws, {"op": "set", "data": {"keep": True}}))["version"] == 2
    for frame, code in BAD_FRAMES:
        reply = await request(ws, frame)
        assert (reply["op"], reply["code"]) == ("error", code), frame
    assert await request(ws, {"op": "get"}) == {
        "op": "result",
        "re": None,
        "data": {"keep": True},
        "version": 2,
    }

    # Over --max-size: websockets closes with 1009; the daemon carries on.
    await send(ws, {"op": "set", "data": {"x": "y" * 5000}})
    assert (await closed(ws))[0] == p.CLOSE_TOO_BIG
    assert (await request(bystander, {"op": "ping"}))["op"] == "pong"
    _, again = await clients.resume(shared.url, welcome["token"])
    assert again["data"] == {"keep": True}


async def test_bad_first_frame_closes_4004(shared: Daemon, clients: Clients) -> None:
    for frame in ('{"op":"ping"}', "nonsense", b"\x00"):
        ws = await clients.open(shared.url)
        await send(ws, frame)
        code, reason, frames = await closed(ws)
        assert code == p.CLOSE_PROTOCOL_ERROR, frame
        assert reason
        assert frames == []


async def test_handshake_timeout_closes_4005(shared: Daemon, clients: Clients) -> None:
    ws = await clients.open(shared.url)
    code, _, _ = await closed(ws, timeout=3)
    assert code == p.CLOSE_HANDSHAKE_TIMEOUT


async def test_origin_not_allowed_gets_403(shared: Daemon, clients: Clients) -> None:
    with pytest.raises(InvalidStatus) as info:
        await clients.open(shared.url, origin="https://evil.example")
    assert info.value.response.status_code == 403
    ok = await clients.open(shared.url, origin="https://app.example")
    assert (await request(ok, {"op": "hello"}))["op"] == "welcome"


# ----- restarts -----


def last_activity(database: Path, session_id: str) -> float:
    with sqlite3.connect(database) as db:
        row = db.execute(
            "SELECT last_activity FROM sessions WHERE session_id = ?", (session_id,)
        ).fetchone()
    db.close()
    return float(row[0])


async def test_resume_after_sigterm_restart(spawn: SpawnDaemon, clients: Clients) -> None:
    daemon = spawn(env={"SESSION_FLUSH_INTERVAL": "30"}).start()
    ws, welcome = await clients.hello(daemon.url)
    assert (await request(ws, {"op": "set", "data": {"step": 3}}))["version"] == 2
    await asyncio.sleep(0.05)
    before_ping = time.time()
    assert (await request(ws, {"op": "ping"}))["op"] == "pong"  # activity, not yet on disk

    signalled = time.monotonic()
    exit_code = await asyncio.to_thread(daemon.stop, signal.SIGTERM)
    assert exit_code == 0
    assert time.monotonic() - signalled < 5
    code, reason, _ = await closed(ws)
    assert (code, reason) == (p.CLOSE_SERVICE_RESTART, "service restart")
    # The pending activity was flushed on the way out.
    assert last_activity(daemon.database, welcome["session_id"]) >= before_ping

    daemon.start()
    assert "sessions_restored=1 expired_while_down=0" in daemon.new_log()
    _, again = await clients.resume(daemon.url, welcome["token"])
    assert again["recovered"] is True
    assert again["session_id"] == welcome["session_id"]
    assert (again["data"], again["version"]) == ({"step": 3}, 2)
    assert again["boot_id"] != welcome["boot_id"]


async def test_resume_after_sigkill_restart_has_data_as_last_acknowledged(
    spawn: SpawnDaemon, clients: Clients
) -> None:
    daemon = spawn().start()
    ws, welcome = await clients.hello(daemon.url)
    for n in range(1, 6):
        assert (await request(ws, {"op": "set", "data": {"n": n}}))["version"] == n + 1
    daemon.stop(signal.SIGKILL)
    assert (await closed(ws))[0] != p.CLOSE_NORMAL

    daemon.start()
    assert "sessions_restored=1 " in daemon.new_log()
    _, again = await clients.resume(daemon.url, welcome["token"])
    assert again["recovered"] is True
    assert again["session_id"] == welcome["session_id"]
    assert (again["data"], again["version"]) == ({"n": 5}, 6)


async def test_session_idle_across_a_restart_is_expired(
    spawn: SpawnDaemon, clients: Clients
) -> None:
    daemon = spawn(env={"SESSION_TIMEOUT_SECS": "1"}).start()
    ws, welcome = await clients.hello(daemon.url)
    assert welcome["idle_timeout_s"] == 1
    assert (await request(ws, {"op": "close"}))["op"] == "bye"
    assert (await closed(ws))[0] == p.CLOSE_NORMAL
    idle_since = time.monotonic()
    assert daemon.stop(signal.SIGTERM) == 0
    await asyncio.sleep(max(0.0, 1.2 - (time.monotonic() - idle_since)))

    daemon.start()
    assert "sessions_restored=0 expired_while_down=1" in daemon.new_log()
    _, again = await clients.resume(daemon.url, welcome["token"])
    assert (again["recovered"], again["reason"]) == (False, "expired")
    assert again["session_id"] != welcome["session_id"]


async def test_session_limit_and_rm_from_another_process(
    spawn: SpawnDaemon, clients: Clients
) -> None:
    daemon = spawn("--max-sessions", "1").start()
    ws, welcome = await clients.hello(daemon.url)

    refused = await clients.open(daemon.url)
    await send(refused, {"op": "hello"})
    code, reason, frames = await closed(refused)
    assert code == p.CLOSE_TRY_AGAIN_LATER
    assert "limit" in reason
    assert frames == []

    result = await asyncio.to_thread(
        run_cli, "rm", welcome["session_id"], "--database", str(daemon.database)
    )
    assert result.returncode == 0, result.stderr
    code, reason, _ = await closed(ws, timeout=5)
    assert code == p.CLOSE_SESSION_GONE
    assert "removed" in reason

    _, fresh = await clients.hello(daemon.url)  # the slot is free again
    assert fresh["session_id"] != welcome["session_id"]


async def test_raw_token_is_in_no_database_file_and_no_log(
    spawn: SpawnDaemon, clients: Clients
) -> None:
    daemon = spawn(log_level="DEBUG").start()
    tokens: list[str] = []
    ws, welcome = await clients.hello(daemon.url)
    tokens.append(welcome["token"])
    await request(ws, {"op": "set", "data": {"note": "secret-free"}})
    for _ in range(3):
        ws, welcome = await clients.resume(daemon.url, welcome["token"])
        tokens.append(welcome["token"])
    await request(ws, {"op": "resume", "token": "x" * 43})  # a failed guess, logged or not
    daemon.stop(signal.SIGKILL)  # leaves the -wal and -shm files behind

    files = [daemon.database, Path(f"{daemon.database}-wal"), Path(f"{daemon.database}-shm")]
    contents = b"".join(f.read_bytes() for f in files if f.exists())
    assert Path(f"{daemon.database}-wal").exists()
    log = daemon.log()
    assert "serving ws://" in log
    assert "DEBUG" in log
    for token in tokens:
        assert token.encode() not in contents
        assert token not in log
    # Control: what is stored is the hash, so the search looked at the right bytes.
    assert hashlib.sha256(tokens[-1].encode()).hexdigest().encode() in contents
