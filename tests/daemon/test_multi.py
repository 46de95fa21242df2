"""Several real daemons, end to end: two on one PostgreSQL database (issue 6 point 3),
a daemon on a backup taken while the first was writing (issue 5 point 11), and clients
that vanish in the middle of a ``set`` (issue 5 point 4).

Everything is real: ``python -m sessionstore serve`` subprocesses on port 0, websockets
clients on 127.0.0.1, SQLite files checked with ``sqlite3`` afterwards, and the local
PostgreSQL server (``postgres_url``: a database of this test session's own; its schema is
reset before each test).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode

from tests.conftest import _pg_admin
from tests.daemon.conftest import Clients, SpawnDaemon
from tests.daemon.process import Daemon
from tests.daemon.process import log_problems as _problems
from tests.daemon.wsclient import closed, http_get, receive, request, send
from tests.helpers import REPO


async def _stop_cleanly(*daemons: Daemon) -> None:
    """SIGTERM each daemon: exit 0, and nothing alarming in its log."""
    for daemon in daemons:
        assert await asyncio.to_thread(daemon.stop) == 0, daemon.log()
        assert _problems(daemon.log()) == [], daemon.log()


async def _hello_outcome(clients: Clients, url: str) -> tuple[int | None, str, Any]:
    """Say hello: ``(close code, reason, None)`` if refused, else ``(None, "", frame)``."""
    ws = await clients.open(url)
    await send(ws, {"op": "hello", "v": 1, "id": "h"})
    try:
        frame = await receive(ws)
    except ConnectionClosed:
        await ws.wait_closed()
        return ws.close_code, ws.close_reason or "", None
    return None, "", frame


# ----- 1. two daemons on one PostgreSQL database (issue 6 point 3) -----

PgPair = Callable[..., tuple[Daemon, Daemon]]


@pytest.fixture
async def pg_database(postgres_url: str) -> str:
    """This test session's PostgreSQL database, with an empty schema (as ``database``)."""
    await _pg_admin(make_url(postgres_url), "DROP SCHEMA public CASCADE", "CREATE SCHEMA public")
    return postgres_url


@pytest.fixture
def pg_pair(spawn: SpawnDaemon, pg_database: str) -> PgPair:
    """Start daemons A and B on the PostgreSQL database, with the given serve options."""

    def start(*args: str) -> tuple[Daemon, Daemon]:
        a = spawn(*args, database_url=pg_database).start()
        b = spawn(*args, database_url=pg_database).start()
        return a, b

    return start


async def test_postgresql_session_from_daemon_a_resumes_on_daemon_b(
    pg_pair: PgPair, clients: Clients
) -> None:
    a, b = pg_pair()
    for daemon in (a, b):
        assert "database=postgresql+asyncpg://" in daemon.new_log()
    on_a, welcome = await clients.hello(a.url)
    assert (welcome["recovered"], welcome["reason"], welcome["version"]) == (False, "new", 1)
    cart = {"cart": ["apple", "pear"], "user": {"name": "Zoë", "n": 7}}
    assert await request(on_a, {"op": "set", "id": 1, "data": cart}) == {
        "op": "result",
        "re": 1,
        "version": 2,
    }
    assert (await request(on_a, {"op": "close"}))["op"] == "bye"
    assert (await closed(on_a))[0] == 1000

    # The client comes back to the other daemon, which has never seen this session.
    on_b, again = await clients.resume(b.url, welcome["token"])
    assert again["boot_id"] != welcome["boot_id"]  # really another daemon
    assert (again["recovered"], again["reason"]) == (True, None)
    assert again["session_id"] == welcome["session_id"]
    assert (again["data"], again["version"]) == (cart, 2)
    assert again["token"] != welcome["token"]
    got = await request(on_b, {"op": "get"})
    assert (got["data"], got["version"]) == (cart, 2)

    # And back again: daemon A, which cached the session at version 2, must serve the
    # version B wrote, not its own stale copy.
    assert (await request(on_b, {"op": "set", "data": {"paid": True}}))["version"] == 3
    assert (await request(on_b, {"op": "close"}))["op"] == "bye"
    on_a2, third = await clients.resume(a.url, again["token"])
    assert (third["recovered"], third["session_id"]) == (True, welcome["session_id"])
    assert (third["data"], third["version"]) == ({**cart, "paid": True}, 3)
    got = await request(on_a2, {"op": "get"})
    assert (got["data"], got["version"]) == ({**cart, "paid": True}, 3)
    # The first token was rotated out by B's welcome: it resumes nothing, on either.
    for daemon in (a, b):
        _, stale = await clients.resume(daemon.url, welcome["token"])
        assert (stale["recovered"], stale["reason"]) == (False, "revoked")
        assert stale["session_id"] != welcome["session_id"]

    await clients.aclose()
    await _stop_cleanly(a, b)


async def test_postgresql_session_limit_holds_across_two_daemons(
    pg_pair: PgPair, clients: Clients
) -> None:
    a, b = pg_pair("--max-sessions", "2")
    on_a, first = await clients.hello(a.url)
    on_b, second = await clients.hello(b.url)
    assert first["session_id"] != second["session_id"]
    for url in (a.url, b.url):
        code, reason, frame = await _hello_outcome(clients, url)
        assert (code, frame) == (1013, None), (code, reason, frame)  # closed, no welcome
        assert "session limit reached (2)" in reason

    # A slot freed on one daemon can be taken on the other.
    assert (await request(on_a, {"op": "logout"}))["op"] == "bye"
    await clients.hello(b.url)
    assert (await _hello_outcome(clients, a.url))[0] == 1013

    # A burst of hellos on both daemons at once, with one slot free: exactly one wins.
    assert (await request(on_b, {"op": "logout"}))["op"] == "bye"

    outcomes = await asyncio.gather(*(_hello_outcome(clients, url) for url in [a.url, b.url] * 5))
    codes = sorted(str(code or frame["op"]) for code, _, frame in outcomes)
    assert codes == ["1013"] * 9 + ["welcome"], outcomes

    await clients.aclose()
    await _stop_cleanly(a, b)


async def test_postgresql_logout_on_daemon_b_closes_the_client_on_daemon_a_with_4002(
    pg_pair: PgPair, clients: Clients
) -> None:
    a, b = pg_pair()
    on_a, welcome = await clients.hello(a.url)
    assert (await request(on_a, {"op": "set", "data": {"k": 1}}))["version"] == 2
    # The same client's session, resumed on B while its connection on A stays open
    # (one connection per session is enforced per daemon only; docs/postgresql.md).
    on_b, again = await clients.resume(b.url, welcome["token"])
    assert (again["recovered"], again["session_id"]) == (True, welcome["session_id"])
    assert (await request(on_a, {"op": "ping", "id": "p"}))["op"] == "pong"  # still attached

    assert (await request(on_b, {"op": "logout", "id": "x"})) == {"op": "bye", "re": "x"}
    assert (await closed(on_b))[0] == 1000
    logged_out = time.monotonic()
    # Daemon A re-reads its attached sessions about every second; wait for it.
    code, reason, frames = await closed(on_a, timeout=10)
    noticed_in = time.monotonic() - logged_out
    assert (code, frames) == (4002, []), (code, reason, frames)
    assert "removed" in reason
    assert noticed_in < 3.0, noticed_in  # about one check interval, not the 5 s refresh

    # The session is gone for good, on both daemons.
    for daemon in (a, b):
        _, fresh = await clients.resume(daemon.url, again["token"])
        assert (fresh["recovered"], fresh["reason"]) == (False, "revoked")
        assert fresh["session_id"] != welcome["session_id"]
    assert "closing with 4002" in a.log()

    await clients.aclose()
    await _stop_cleanly(a, b)


# ----- 2. a backup taken while a daemon writes; a daemon on the copy resumes -----


@dataclass
class _Counter:
    """One writing client: ``set {"n": k}`` for k = 1, 2, ...; what was sent and acked."""

    ws: ClientConnection
    session_id: str
    token: str
    sent: int = 0
    acked: int = 0


async def _count(counter: _Counter, stop: asyncio.Event) -> None:
    while not stop.is_set():
        counter.sent += 1
        reply = await request(counter.ws, {"op": "set", "data": {"n": counter.sent}})
        assert reply == {"op": "result", "re": None, "version": counter.sent + 2}, reply
        counter.acked = counter.sent
        await asyncio.sleep(0.001)


async def test_backup_while_writing_then_a_daemon_on_the_copy_resumes_the_sessions(
    spawn: SpawnDaemon, clients: Clients, tmp_path: Path
) -> None:
    original = spawn("--max-sessions", "0").start()
    counters = []
    for _ in range(8):
        ws, welcome = await clients.hello(original.url)
        assert (await request(ws, {"op": "set", "data": {"n": 0}}))["version"] == 2
        counters.append(_Counter(ws, welcome["session_id"], welcome["token"]))

    copy = tmp_path / "copy.db"
    stop = asyncio.Event()
    async with asyncio.timeout(30), asyncio.TaskGroup() as group:
        for counter in counters:
            group.create_task(_count(counter, stop))
        while min(c.acked for c in counters) < 3:
            await asyncio.sleep(0.005)
        before = [c.acked for c in counters]  # on disk before the backup started
        backup = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sessionstore",
            "backup",
            str(copy),
            "-d",
            str(original.database),
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await backup.communicate()
        after = [c.sent for c in counters]  # nothing sent later can be in the copy
        acked_after = [c.acked for c in counters]
        stop.set()
    assert backup.returncode == 0, err.decode()
    assert "integrity ok" in out.decode()
    # The clients really were writing while the backup ran.
    assert sum(acked_after) > sum(before), (before, acked_after)
    with contextlib.closing(sqlite3.connect(copy)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

    # A second daemon on the copy (the first one is still up, writing its own file).
    restored = spawn("--max-sessions", "0", database=copy).start()
    assert "sessions_restored=8 " in restored.new_log()
    for counter, low, high in zip(counters, before, after, strict=True):
        ws, welcome = await clients.resume(restored.url, counter.token)
        assert (welcome["recovered"], welcome["reason"]) == (True, None)
        assert welcome["session_id"] == counter.session_id
        n = welcome["data"]["n"]
        assert welcome["data"] == {"n": n}
        assert low <= n <= high, (low, n, high)  # as of the backup, no later
        assert welcome["version"] == n + 2  # and whole: data and version agree
        assert (await request(ws, {"op": "set", "data": {"more": 1}}))["version"] == n + 3

    # The original is untouched by all that: its sessions carry on where they were.
    for counter in counters:
        got = await request(counter.ws, {"op": "get"})
        assert got["data"] == {"n": counter.acked}
    await clients.aclose()
    await _stop_cleanly(original, restored)


# ----- 3. clients that vanish in the middle of a set -----

_ROUNDS = 3
_PER_ROUND = 32
_PAYLOAD = 120_000  # bytes of session data per set


def _new_data(i: int) -> dict[str, Any]:
    return {"blob": f"{i:06d}" + "x" * (_PAYLOAD - 6), "i": i}


async def _set_and_vanish(ws: ClientConnection, data: dict[str, Any], how: str) -> None:
    """Send ``set data`` and leave without waiting for the reply, in one of four ways."""
    frame = json.dumps({"op": "set", "id": "s", "data": data})
    if how == "half":
        # The frame is cut in two: the socket drops after the first fragment.
        async def fragments() -> AsyncIterator[str]:
            yield frame[: len(frame) // 2]
            ws.transport.abort()
            yield frame[len(frame) // 2 :]

        with contextlib.suppress(ConnectionClosed):
            await ws.send(fragments())
    elif how == "torn":
        # One frame, torn: its header announces the whole payload, half of it arrives.
        raw = Frame(Opcode.TEXT, frame.encode()).serialize(mask=True)
        ws.transport.write(raw[: len(raw) // 2])
        ws.transport.abort()
    elif how == "abort":
        # The whole frame is written, then the socket is dropped (no close handshake),
        # usually while the server is still writing.
        await ws.send(frame)
        ws.transport.abort()
    else:
        # The whole frame, then a close frame at once: the reply is never read.
        await ws.send(frame)
        await ws.close()
    await ws.wait_closed()


async def test_clients_that_disconnect_mid_set_leave_old_or_new_and_no_lock(
    spawn: SpawnDaemon, clients: Clients
) -> None:
    limit = str(4 * _PAYLOAD)
    daemon = spawn("--max-sessions", "0", "--max-size", limit, "--max-data-bytes", limit).start()
    ways = ("half", "torn", "abort", "close")
    expected: dict[str, tuple[str, dict[str, Any]]] = {}  # session -> (way, new data)
    for round_ in range(_ROUNDS):
        hellos = await asyncio.gather(*(clients.hello(daemon.url) for _ in range(_PER_ROUND)))
        jobs = []
        for k, (ws, welcome) in enumerate(hellos):
            i = round_ * _PER_ROUND + k
            how = ways[i % len(ways)]
            expected[welcome["session_id"]] = (how, _new_data(i))
            jobs.append(_set_and_vanish(ws, _new_data(i), how))
        async with asyncio.timeout(15):
            await asyncio.gather(*jobs)

    # Wait (polling) until the daemon has finished with every one of those connections;
    # /healthz also flushes pending activity, so the daemon is idle afterwards.
    async with asyncio.timeout(10):
        while True:
            status, _, body = await http_get(daemon.port, "/healthz")
            assert status == 200, body
            if json.loads(body)["sessions"]["connected"] == 0:
                break
            await asyncio.sleep(0.02)

    db = daemon.database
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows = {
            sid: (json.loads(data), version)
            for sid, data, version in conn.execute("SELECT session_id, data, version FROM sessions")
        }
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert set(rows) == set(expected)
    outcomes: dict[str, list[str]] = {way: [] for way in ways}
    for sid, (how, new) in expected.items():
        data, version = rows[sid]
        assert (data, version) in (({}, 1), (new, 2)), (sid, how, version, str(data)[:60])
        outcomes[how].append("new" if version == 2 else "old")
    # A cut frame never lands; a frame followed by a clean close always does.
    assert set(outcomes["half"]) == set(outcomes["torn"]) == {"old"}, outcomes
    assert set(outcomes["close"]) == {"new"}, outcomes

    # Another process can take the write lock at once: no transaction was left open.
    writer = sqlite3.connect(db, timeout=0, isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("ROLLBACK")
    finally:
        writer.close()

    # And the daemon serves a fresh client as if nothing happened.
    ws, welcome = await clients.hello(daemon.url)
    assert (await request(ws, {"op": "set", "data": _new_data(999)}))["version"] == 2
    got = await request(ws, {"op": "get", "keys": ["i"]})
    assert got == {"op": "result", "re": None, "data": {"i": 999}, "version": 2}
    await clients.aclose()
    await _stop_cleanly(daemon)
