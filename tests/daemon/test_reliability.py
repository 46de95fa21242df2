"""Reliability of the real daemon (issue 5): two daemons on one file, a graceful stop
under load, broken storage, a full disk, and hostile clients.

Everything is real: ``python -m sessionstore serve`` subprocesses on port 0, SQLite files
in a temporary directory checked with ``sqlite3`` afterwards, websockets clients on
127.0.0.1; the fuzzing drives the in-process server (``serve()`` on port 0) so that its
logs and memory can be inspected.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import json
import logging
import random
import resource
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from sessionstore import SessionManager
from sessionstore.daemon import protocol as p
from sessionstore.daemon.server import SessionServer, serve
from sessionstore.store import dumps
from tests.daemon.conftest import Clients, SpawnDaemon
from tests.daemon.process import clean_env
from tests.daemon.process import log_problems as _problems
from tests.daemon.wsclient import receive, request, send
from tests.helpers import REPO, ManualClock, scribble_pages


def _rows(db: Path) -> dict[str, tuple[dict[str, Any], int]]:
    """``session_id -> (data, version)`` as committed, read with plain sqlite3."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows = conn.execute("SELECT session_id, data, version FROM sessions").fetchall()
    return {sid: (json.loads(data), version) for sid, data, version in rows}


def _integrity(db: Path) -> str:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])


# ----- 1. two processes, one file: compare-and-set increments are never lost -----


@dataclass
class _Tally:
    acked: int = 0
    conflicts: int = 0
    stale_reads: int = 0


async def _increment(
    ws: ClientConnection, stop: asyncio.Event, tally: _Tally, rng: random.Random
) -> None:
    """Read-modify-write ``n`` with ``if_version`` until told to stop; retry conflicts."""
    while not stop.is_set():
        got = await request(ws, {"op": "get", "id": "g"})
        assert got["op"] == "result", got
        reply = await request(
            ws,
            {
                "op": "set",
                "id": "s",
                "data": {"n": got["data"]["n"] + 1},
                "if_version": got["version"],
            },
        )
        if reply["op"] == "result":
            assert reply["version"] == got["version"] + 1, reply
            tally.acked += 1
            await asyncio.sleep(rng.uniform(0, 0.02))  # a client's think time
            continue
        # Anything else (storage_error, "database is locked", ...) fails the test.
        assert (reply["op"], reply["code"]) == ("error", "version_conflict"), reply
        assert reply["version"] > got["version"], reply
        tally.conflicts += 1
        # This daemon may serve the session from a cache that does not have the other
        # daemon's write yet (it re-reads attached sessions once a second): poll until
        # a read shows at least the version the conflict reported.
        while (await request(ws, {"op": "get"}))["version"] < reply["version"]:
            tally.stale_reads += 1
            await asyncio.sleep(0.002)


async def test_two_daemons_on_one_file_lose_no_compare_and_set_increment(
    spawn: SpawnDaemon, clients: Clients
) -> None:
    # Both daemons write the same sessions: each session is created on A and resumed
    # (with A's token) on B, so it has one connection on each daemon at once.
    a = spawn().start()
    b = spawn().start()
    assert a.database == b.database
    pairs: list[tuple[str, ClientConnection, ClientConnection]] = []
    for _ in range(2):
        on_a, welcome = await clients.hello(a.url)
        assert (await request(on_a, {"op": "set", "data": {"n": 0}}))["version"] == 2
        on_b, again = await clients.resume(b.url, welcome["token"])
        assert (again["recovered"], again["session_id"]) == (True, welcome["session_id"])
        assert (again["data"], again["version"]) == ({"n": 0}, 2)
        pairs.append((welcome["session_id"], on_a, on_b))

    tallies = {(sid, side): _Tally() for sid, _, _ in pairs for side in "ab"}
    rng = random.Random(5)
    stop = asyncio.Event()
    started = time.monotonic()
    async with asyncio.TaskGroup() as group:
        for sid, on_a, on_b in pairs:
            group.create_task(_increment(on_a, stop, tallies[sid, "a"], rng))
            group.create_task(_increment(on_b, stop, tallies[sid, "b"], rng))
        # Run until every connection, on both daemons, has had increments acknowledged.
        async with asyncio.timeout(30):
            while time.monotonic() - started < 1.0 or min(t.acked for t in tallies.values()) < 3:
                await asyncio.sleep(0.05)
        stop.set()

    for _, on_a, on_b in pairs:
        await on_a.close()
        await on_b.close()
    assert await asyncio.to_thread(a.stop) == 0
    assert await asyncio.to_thread(b.stop) == 0

    # The compare-and-set really raced: there were conflicts, and every retry was fine.
    assert sum(t.conflicts for t in tallies.values()) > 0, tallies
    rows = _rows(a.database)
    for sid, _, _ in pairs:
        acked = tallies[sid, "a"].acked + tallies[sid, "b"].acked
        data, version = rows[sid]
        assert data == {"n": acked}, (sid, data, tallies)  # no increment lost or doubled
        assert version == 2 + acked  # and nothing committed that was not acknowledged
    assert _integrity(a.database) == "ok"
    for daemon in (a, b):
        assert _problems(daemon.log()) == []
        assert " WARNING " not in daemon.log()


_CAS_CHILD = textwrap.dedent(
    """
    import asyncio, json, os, sys, time
    from sessionstore import SessionManager, VersionConflictError

    async def main():
        db, go, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
        tally = {"acked": 0, "conflicts": 0, "other": []}
        async with SessionManager(db, max_concurrent_sessions=0) as m:
            await m.ensure("shared", data={"n": 0})  # get-or-create, racing the other process
            print("ready", flush=True)
            while not os.path.exists(go):
                await asyncio.sleep(0.005)
            deadline = time.monotonic() + seconds

            async def worker():
                while time.monotonic() < deadline:
                    s = await m.get("shared")
                    try:
                        await m.set_data("shared", {"n": s.data["n"] + 1}, if_version=s.version)
                    except VersionConflictError:
                        tally["conflicts"] += 1
                        await m.refresh(["shared"])  # the cache is stale: re-read
                    except Exception as exc:
                        tally["other"].append(repr(exc))
                        return
                    else:
                        tally["acked"] += 1

            await asyncio.gather(*(worker() for _ in range(8)))
        print(json.dumps(tally), flush=True)

    asyncio.run(main())
    """
)


def test_two_manager_processes_lose_no_compare_and_set_increment(tmp_path: Path) -> None:
    db, go = tmp_path / "cas.db", tmp_path / "go"
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _CAS_CHILD, str(db), str(go), "1.5"],
            cwd=REPO,
            env=clean_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outcomes = []
    try:
        for child in children:
            assert child.stdout is not None
            line = child.stdout.readline().strip()
            assert line == "ready", (line, child.stderr.read() if child.stderr else "")
        go.touch()
        for child in children:
            out, err = child.communicate(timeout=60)
            assert child.returncode == 0, err
            assert "Traceback" not in err, err
            outcomes.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.communicate()
    assert [o["other"] for o in outcomes] == [[], []]  # no "database is locked", nothing
    assert all(o["acked"] > 0 for o in outcomes), outcomes  # both processes wrote
    assert sum(o["conflicts"] for o in outcomes) > 0, outcomes  # and they really raced
    acked = sum(o["acked"] for o in outcomes)
    assert _rows(db) == {"shared": ({"n": acked}, 1 + acked)}
    assert _integrity(db) == "ok"


# ----- 2. graceful stop: SIGTERM under load from 50 writing clients -----

_GRACEFUL_CLIENTS = 50
_WINDOW = 4  # sets in flight per client, so that writes are queued when SIGTERM lands


@dataclass
class _Writer:
    session_id: str
    ws: ClientConnection
    acked: int = 0
    close_code: int | None = None
    close_reason: str = ""


async def _blast(writer: _Writer) -> None:
    """Send ``set {"n": k}`` for k = 1, 2, ... with a window of replies outstanding."""
    ws, sent = writer.ws, 0
    try:
        for _ in range(_WINDOW):
            sent += 1
            await send(ws, {"op": "set", "data": {"n": sent}})
        while True:
            reply = json.loads(await ws.recv())
            # Replies come in request order: the k-th acknowledges n = k, version k + 1.
            assert reply == {"op": "result", "re": None, "version": writer.acked + 2}, reply
            writer.acked += 1
            sent += 1
            await send(ws, {"op": "set", "data": {"n": sent}})
    except ConnectionClosed:
        pass
    await ws.wait_closed()
    writer.close_code, writer.close_reason = ws.close_code, ws.close_reason or ""


async def test_sigterm_under_load_closes_1012_and_keeps_every_acknowledged_set(
    spawn: SpawnDaemon, clients: Clients
) -> None:
    # Dev mode and ResourceWarning as an error: a leaked socket, connection or task
    # would print to the log, which is checked below.
    daemon = spawn(
        "--max-sessions",
        "0",
        env={"PYTHONDEVMODE": "1", "PYTHONWARNINGS": "error::ResourceWarning"},
    ).start()
    hellos = await asyncio.gather(*(clients.hello(daemon.url) for _ in range(_GRACEFUL_CLIENTS)))
    writers = [_Writer(welcome["session_id"], ws) for ws, welcome in hellos]
    async with asyncio.timeout(30):
        tasks = [asyncio.create_task(_blast(w)) for w in writers]
        while sum(w.acked for w in writers) < 5 * _GRACEFUL_CLIENTS:
            await asyncio.sleep(0.01)
        signalled = time.monotonic()
        exit_code = await asyncio.to_thread(daemon.stop, signal.SIGTERM, 15.0)
        stopped_in = time.monotonic() - signalled
        await asyncio.gather(*tasks)

    assert exit_code == 0
    assert stopped_in < 5.0, stopped_in  # docs: "within a few seconds"
    assert {(w.close_code, w.close_reason) for w in writers} == {(1012, "service restart")}
    rows = _rows(daemon.database)
    for w in writers:
        data, version = rows[w.session_id]
        # Every acknowledged set is on disk; beyond it, only sets the client did send.
        assert w.acked <= data["n"] <= w.acked + _WINDOW, (w, data)
        assert version == data["n"] + 1  # and each committed set is whole, in order
    assert _integrity(daemon.database) == "ok"
    log = daemon.log()
    assert " is serving" in log  # asyncio's debug mode (dev mode) was really on
    assert "stopped in" in log
    assert _problems(log) == []
    # Every connection was closed properly: the last close removes the -wal file.
    assert not Path(f"{daemon.database}-wal").exists()


# ----- 3. broken storage: the daemon refuses it with one clear line -----


def _text_file(path: Path) -> str:
    path.write_text("these are my notes, not a database\n" * 20)
    return "not a SQLite database"


def _foreign(path: Path) -> str:
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
        conn.execute("INSERT INTO invoices VALUES (1, 9.5)")
    return "invoices"


async def _ours(path: Path, sessions: int = 1) -> None:
    async with SessionManager(str(path), max_concurrent_sessions=0) as m:
        for _ in range(sessions):
            await m.ensure(data={"pad": "x" * 300})


def _corrupt(path: Path) -> str:
    asyncio.run(_ours(path, 300))
    scribble_pages(path)
    return "corrupt"


def _unknown_revision(path: Path) -> str:
    asyncio.run(_ours(path))
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("UPDATE alembic_version SET version_num = '9999abcdef'")
    return "9999abcdef"


@pytest.mark.parametrize(
    "make", [_text_file, _corrupt, _foreign, _unknown_revision], ids=lambda f: f.__name__[1:]
)
def test_serve_refuses_broken_storage_with_one_line_and_leaves_it_untouched(
    tmp_path: Path, make: Callable[[Path], str]
) -> None:
    db = tmp_path / "sessions.db"
    what = make(db)
    assert not Path(f"{db}-wal").exists()
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    listing = sorted(f.name for f in tmp_path.iterdir())

    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "sessionstore", "serve", "--port", "0", "--database", str(db)],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    took = time.monotonic() - started

    assert result.returncode == 1, result
    assert took < 10, took
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[0].startswith("sessionstore: error: "), lines
    assert result.stderr.count("sessionstore: error:") == 1, result.stderr
    assert len(lines) == 1, result.stderr
    assert str(db) in lines[0]
    assert what in lines[0]
    assert "serving" not in result.stdout + result.stderr
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    assert sorted(f.name for f in tmp_path.iterdir()) == listing  # no -wal/-shm left


# ----- 4. full disk, as a client sees it -----


def _ignores_sigxfsz(pid: int) -> bool:
    """Whether the process ignores SIGXFSZ (CPython does so at start-up)."""
    status = Path(f"/proc/{pid}/status").read_text()
    (mask,) = (line.split()[1] for line in status.splitlines() if line.startswith("SigIgn:"))
    return bool(int(mask, 16) & (1 << (signal.SIGXFSZ - 1)))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prlimit and /proc are Linux")
async def test_full_disk_is_an_error_reply_others_carry_on_and_writes_resume(
    spawn: SpawnDaemon, clients: Clients
) -> None:
    daemon = spawn("--max-data-bytes", "400000", "--max-size", "500000").start()
    assert daemon.proc is not None
    pid = daemon.proc.pid
    # Over the limit a write then fails with EFBIG instead of killing the process.
    assert _ignores_sigxfsz(pid)
    writer, first = await clients.hello(daemon.url)
    other, _ = await clients.hello(daemon.url)
    sid = first["session_id"]
    assert (await request(writer, {"op": "set", "data": {"early": "e" * 1000}}))["version"] == 2
    assert (await request(other, {"op": "set", "data": {"b": 1}}))["version"] == 2

    # The "disk" gets full: from now on no file of the daemon may grow more than
    # 96 KiB past what the database and its WAL hold. The limit is set from outside,
    # on the running daemon, so that start-up (schema, sessions) is already done.
    db, wal = daemon.database, Path(f"{daemon.database}-wal")
    soft, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    limit = max(db.stat().st_size, wal.stat().st_size) + 96 * 1024
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, hard))
    try:
        big = {"op": "set", "id": "big", "data": {"big": "y" * 300_000}}
        refused = await request(writer, big)
        assert refused["op"] == "error", refused
        assert refused["re"] == "big"
        assert refused["code"] == "storage_full", refused
        # Nothing of it reached the database; the earlier data is intact.
        assert _rows(db)[sid] == ({"early": "e" * 1000}, 2)

        # Everyone else is still served, and a small write that fits still works.
        assert (await request(other, {"op": "ping", "id": 1})) == {"op": "pong", "re": 1}
        assert (await request(other, {"op": "get"}))["data"] == {"b": 1}
        assert (await request(other, {"op": "set", "data": {"b": 2}}))["version"] == 3
        assert (await request(writer, {"op": "get", "keys": ["early", "big"]}))["data"] == {
            "early": "e" * 1000
        }
        assert (await request(writer, {"op": "set", "data": {"small": 1}}))["version"] == 3
        assert wal.stat().st_size <= limit
    finally:
        # Space is back: same process, no restart.
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (soft, hard))

    big["data"] = {"big": "z" * 300_000}
    assert await request(writer, big) == {"op": "result", "re": "big", "version": 4}
    health = await request(other, {"op": "health"})
    assert (health["status"], health["db"], health["boot_id"]) == ("ok", "ok", first["boot_id"])
    assert daemon.proc.pid == pid

    assert await asyncio.to_thread(daemon.stop) == 0
    rows = _rows(db)
    assert rows[sid] == ({"early": "e" * 1000, "small": 1, "big": "z" * 300_000}, 4)
    assert rows[_other_sid(rows, sid)] == ({"b": 2}, 3)
    assert _integrity(db) == "ok"
    log = daemon.log()
    # The operator's side: one warning naming the database and the cause.
    warnings = [line for line in log.splitlines() if " WARNING " in line]
    assert len(warnings) == 1, log
    assert str(db) in warnings[0]
    assert "file size limit" in warnings[0] or "full" in warnings[0]
    assert _problems(log) == []


def _other_sid(rows: dict[str, Any], sid: str) -> str:
    (other,) = set(rows) - {sid}
    return other


# ----- 5. hostile clients against the live in-process daemon -----

_MAX_SIZE = 4096
_MAX_DATA = 1024

_json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
_json_values = st.recursive(
    _json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)
_ids = st.none() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=8)
_wrong = (
    st.booleans()
    | st.floats(allow_nan=False)
    | st.lists(st.integers(), max_size=2)
    | st.dictionaries(st.text(max_size=2), st.integers(), max_size=2)
    | st.integers()
    | st.text(max_size=4)
)


@st.composite
def _valid_looking(draw: st.DrawFn) -> str:
    """Well-formed requests: these are allowed to write (a set, a logout)."""
    op = draw(
        st.sampled_from(["ping", "get", "set", "health", "hello", "resume", "close", "logout"])
    )
    frame: dict[str, Any] = {"op": op}
    if draw(st.booleans()):
        frame["id"] = draw(_ids)
    if op == "get" and draw(st.booleans()):
        frame["keys"] = draw(st.lists(st.sampled_from(["a", "b", "c", "pad"]), max_size=3))
    if op == "set":
        keys = st.sampled_from(["a", "b", "c", "pad"]) | st.text(max_size=4)
        frame["data"] = draw(st.dictionaries(keys, _json_values, max_size=3))
        if draw(st.booleans()):
            frame["delete"] = draw(st.lists(keys, max_size=2))
        if draw(st.booleans()):
            frame["if_version"] = draw(st.integers(0, 30))
    if op == "resume":
        frame["token"] = draw(st.text(max_size=50))
    return json.dumps(frame)


def _wrong_types(draw: st.DrawFn) -> str:
    field_name, ops = draw(
        st.sampled_from(
            [
                ("op", ["x"]),
                ("id", ["ping", "get", "set", "nosuchop"]),
                ("data", ["set"]),
                ("keys", ["get"]),
                ("delete", ["set"]),
                ("if_version", ["set"]),
                ("v", ["hello", "resume"]),
                ("token", ["resume"]),
            ]
        )
    )
    frame: dict[str, Any] = {"op": draw(st.sampled_from(ops))}
    frame[field_name] = draw(_wrong)
    return json.dumps(frame)


_hostile_text = st.one_of(
    # not JSON at all, or JSON that is not an object
    st.text(max_size=60),
    st.builds(json.dumps, _json_values),
    # wrong types in known fields
    st.composite(_wrong_types)(),
    # numbers out of range, and non-finite ones
    st.builds(
        lambda where, num: where.replace("#", num),
        st.sampled_from(
            ['{"op":"set","data":{"x":#}}', '{"op":"set","if_version":#}', '{"op":"ping","id":#}']
        ),
        st.sampled_from(["1e999", "-1e999", "NaN", "Infinity", "-Infinity", str(2**63)])
        | st.integers(20, 5000).map(lambda n: "9" * n),
    ),
    # deep nesting (deeper than 32 levels is bad_json; shallower is a valid set)
    st.integers(1, 2000).map(lambda n: '{"op":"set","data":{"x":' + "[" * n + "]" * n + "}}"),
    # unknown ops, well-named or not
    st.builds(lambda op: json.dumps({"op": op}), st.from_regex(p.APP_OP_PATTERN, fullmatch=True)),
    st.builds(lambda op: json.dumps({"op": op}), st.text(max_size=70)),
    # data over the per-session limit, and frames over max_size
    st.integers(_MAX_DATA - 100, _MAX_SIZE - 100).map(
        lambda n: json.dumps({"op": "set", "data": {"pad": "p" * n}})
    ),
    st.integers(_MAX_SIZE + 1, 3 * _MAX_SIZE).map(
        lambda n: json.dumps({"op": "ping", "pad": "o" * n})
    ),
    _valid_looking(),
)
# Lone surrogates: JSON escapes for half a surrogate pair, in data, keys and ids
# (st.text() never makes them).
_surrogates = st.sampled_from(
    [
        '{"op":"set","data":{"k":"\\ud800"}}',
        '{"op":"set","data":{"\\udfff":1}}',
        '{"op":"ping","id":"\\ud800"}',
        '{"op":"nosuchop","id":"\\udc00"}',
        '{"op":"set","data":{"ok":"\\ud83d\\ude00"}}',  # a whole pair: valid
    ]
)
_hostile = _hostile_text | st.binary(max_size=200) | _surrogates


@dataclass
class _Model:
    """What the fuzzed session must hold, as far as the client can tell."""

    session_id: str = ""
    token: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    version: int = 1


@dataclass
class _Rig:
    server: SessionServer
    manager: SessionManager
    db: Path
    url: str
    clients: Clients
    bystander: ClientConnection
    caplog: pytest.LogCaptureFixture
    model: _Model = field(default_factory=_Model)
    ws: ClientConnection | None = None
    frames: int = 0
    log_seen: int = 0

    async def connection(self) -> ClientConnection:
        """The fuzzing connection; a new session after a close, logout or 1009."""
        if self.ws is None:
            self.ws, welcome = await self.clients.hello(self.url)
            self.model = _Model(welcome["session_id"], welcome["token"])
        return self.ws

    def stored(self) -> tuple[dict[str, Any], int] | None:
        return _rows(self.db).get(self.model.session_id)


@pytest.fixture
async def rig(
    tmp_path: Path, clock: ManualClock, clients: Clients, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[_Rig]:
    caplog.set_level(logging.WARNING)
    manager = SessionManager(
        str(tmp_path / "fuzz.db"),
        clock=clock,
        session_timeout_secs=60,
        max_concurrent_sessions=0,
        max_data_bytes=_MAX_DATA,
        refresh_interval_secs=0,
        flush_interval_secs=0.05,
    )
    async with (
        manager,
        serve(
            manager, port=0, max_size=_MAX_SIZE, check_interval=0.05, close_timeout=2.0
        ) as server,
    ):
        url = f"ws://127.0.0.1:{server.port}"
        bystander, _ = await clients.hello(url)
        yield _Rig(server, manager, tmp_path / "fuzz.db", url, clients, bystander, caplog)
        await clients.aclose()


def _expect_set(model: _Model, request: p.Set) -> tuple[str, dict[str, Any] | None]:
    """``(outcome, new data)`` that a set must have on the model's session.

    In the manager's order: the update alone is measured first, then the version is
    compared, then the merged data is measured.
    """
    if len(dumps(request.data).encode("utf-8")) > _MAX_DATA:
        return "too_large", None
    if request.if_version is not None and request.if_version != model.version:
        return "version_conflict", None
    merged = {**model.data, **request.data}
    for key in request.delete:
        merged.pop(key, None)
    if len(dumps(merged).encode("utf-8")) > _MAX_DATA:
        return "too_large", None
    return "result", merged


async def _check_one(rig: _Rig, frame: str | bytes) -> str:
    """Send one frame on the fuzzing connection and check the daemon's answer against
    the protocol (``p.parse`` decides what the frame is) and the session model; returns
    what happened, for Hypothesis' statistics."""
    ws = await rig.connection()
    model = rig.model
    before = rig.stored()
    assert before == (model.data, model.version)
    await send(ws, frame)
    rig.frames += 1

    if isinstance(frame, str) and len(frame.encode()) > _MAX_SIZE:
        with pytest.raises(ConnectionClosed):
            await receive(ws)
        assert ws.close_code == p.CLOSE_TOO_BIG
        rig.ws = None
        assert rig.stored() == before
        return "close 1009"
    reply = await receive(ws)
    if isinstance(frame, bytes):
        assert (reply["op"], reply["code"]) == ("error", "binary_frame"), reply
        assert rig.stored() == before
        return "error binary_frame"
    refused: p.ProtocolError | None = None
    try:
        parsed = p.parse(frame)
    except p.ProtocolError as exc:
        refused = exc
    if refused is not None:
        assert reply == p.error_reply(refused.request_id, refused.code, refused.message)
        assert rig.stored() == before  # an invalid frame writes nothing
        return f"error {refused.code}"
    rid = parsed.id
    written: tuple[dict[str, Any], int] | None = before
    what = type(parsed).__name__
    if isinstance(parsed, p.Ping):
        assert reply == {"op": "pong", "re": rid}
    elif isinstance(parsed, p.Health):
        assert (reply["op"], reply["re"], reply["status"]) == ("health", rid, "ok")
    elif isinstance(parsed, p.Get):
        keys = parsed.keys
        data = model.data if keys is None else {k: model.data[k] for k in keys if k in model.data}
        assert reply == {"op": "result", "re": rid, "data": data, "version": model.version}
    elif isinstance(parsed, p.Hello | p.Resume):
        assert (reply["op"], reply["re"], reply["code"]) == ("error", rid, "unexpected_op")
    elif isinstance(parsed, p.AppRequest):
        assert (reply["op"], reply["re"], reply["code"]) == ("error", rid, "unknown_op")
    elif isinstance(parsed, p.Close | p.Logout):
        assert reply == {"op": "bye", "re": rid}
        with pytest.raises(ConnectionClosed):
            await receive(ws)
        assert ws.close_code == p.CLOSE_NORMAL
        rig.ws = None
        if isinstance(parsed, p.Logout):
            written = None  # deleted
    elif isinstance(parsed, p.Set):
        outcome, merged = _expect_set(model, parsed)
        what = f"Set {outcome}"
        if outcome == "result":
            assert reply == {"op": "result", "re": rid, "version": model.version + 1}
            assert merged is not None
            model.data, model.version = merged, model.version + 1
            written = (merged, model.version)
        elif outcome == "version_conflict":
            assert (reply["op"], reply["re"], reply["code"], reply["version"]) == (
                "error",
                rid,
                outcome,
                model.version,
            )
        else:
            assert (reply["op"], reply["re"], reply["code"], reply["limit"]) == (
                "error",
                rid,
                outcome,
                _MAX_DATA,
            )
    else:  # pragma: no cover
        raise AssertionError(f"unexpected request {parsed!r}")
    assert rig.stored() == written
    return what


def _assert_no_error_logs(rig: _Rig) -> None:
    records = rig.caplog.records[rig.log_seen :]
    rig.log_seen = len(rig.caplog.records)
    bad = [r for r in records if r.levelno >= logging.ERROR or r.exc_info]
    assert bad == [], [f"{r.name}: {r.getMessage()}" for r in bad]


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(frames=st.lists(_hostile, min_size=1, max_size=8))
async def test_live_daemon_survives_hostile_frames(rig: _Rig, frames: list[str | bytes]) -> None:
    for frame in frames:
        event(await _check_one(rig, frame))
        _assert_no_error_logs(rig)
        # A second client, connected throughout, is served as if nothing happened.
        assert await request(rig.bystander, {"op": "ping", "id": rig.frames}) == {
            "op": "pong",
            "re": rig.frames,
        }


_MALFORMED: list[str | bytes] = [
    "{oops",
    "[1,2,3]",
    '{"id":1}',
    '{"op":42}',
    '{"op":"set","data":"x"}',
    '{"op":"set","if_version":-3}',
    '{"op":"get","keys":[1]}',
    '{"op":"set","data":{"x":1e999}}',
    '{"op":"set","data":{"x":' + "9" * 400 + "}}",
    '{"op":"set","data":{"x":' + "[" * 200 + "]" * 200 + "}}",
    '{"op":"frobnicate","junk":"' + "j" * 500 + '"}',
    '{"op":"not an op!"}',
    '{"op":"hello"}',
    '{"op":"set","data":{"pad":"' + "p" * 2000 + '"}}',
    b"\x89PNG\r\n\x1a\n" + b"\x00" * 100,
]


async def test_memory_is_steady_under_a_stream_of_malformed_frames(
    rig: _Rig, clients: Clients
) -> None:
    ws = await rig.connection()
    before = rig.stored()

    async def burst(count: int) -> None:
        for start in range(0, count, 50):  # 50 frames in flight, then their 50 replies
            batch = [_MALFORMED[(start + i) % len(_MALFORMED)] for i in range(50)]
            for frame in batch:
                await send(ws, frame)
            for _ in batch:
                assert (await receive(ws))["op"] == "error"

    tracemalloc.start()
    growths: list[int] = []
    try:
        await burst(1000)  # warm up under tracing: caches, metric labels, buffers
        # Three rounds, judged by the smallest: a leak grows in every round, while
        # the traced total also steps for reasons of its own (a hash table that
        # outgrows its slots, timers cancelled but not yet collected).
        for _ in range(3):
            gc.collect()
            baseline = tracemalloc.get_traced_memory()[0]
            await burst(2000)
            gc.collect()
            growths.append(tracemalloc.get_traced_memory()[0] - baseline)
        assert await request(rig.bystander, {"op": "ping"}) == {"op": "pong", "re": None}
    finally:
        tracemalloc.stop()
    assert min(growths) < 64 * 1024, f"bytes more after each 2,000 malformed frames: {growths}"
    assert rig.stored() == before
    _assert_no_error_logs(rig)
    assert rig.server.connected == 2
    counted = rig.server.metrics.protocol_errors.collect()
    total = sum(s.value for m in counted for s in m.samples if s.name.endswith("_total"))
    assert total >= 5800  # every malformed frame was seen and answered as an error


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prlimit is Linux")
async def test_full_disk_fails_only_the_write_that_does_not_fit(
    spawn: SpawnDaemon, clients: Clients
) -> None:
    daemon = spawn("--max-data-bytes", "400000", "--max-size", "500000").start()
    assert daemon.proc is not None
    big_writer, _ = await clients.hello(daemon.url)
    others = [(await clients.hello(daemon.url))[0] for _ in range(5)]
    db, wal = daemon.database, Path(f"{daemon.database}-wal")
    soft, hard = resource.prlimit(daemon.proc.pid, resource.RLIMIT_FSIZE)
    limit = max(db.stat().st_size, wal.stat().st_size) + 96 * 1024
    resource.prlimit(daemon.proc.pid, resource.RLIMIT_FSIZE, (limit, hard))
    try:
        # All six land in the daemon's writer together; only the big one cannot fit.
        await send(big_writer, {"op": "set", "data": {"big": "y" * 300_000}})
        for ws in others:
            await send(ws, {"op": "set", "data": {"small": 1}})
        refused = await receive(big_writer)
        small = [await receive(ws) for ws in others]
    finally:
        resource.prlimit(daemon.proc.pid, resource.RLIMIT_FSIZE, (soft, hard))
    assert (refused["op"], refused["code"]) == ("error", "storage_full"), refused
    assert [r["op"] for r in small] == ["result"] * 5, small
    assert await asyncio.to_thread(daemon.stop) == 0
