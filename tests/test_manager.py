"""The in-memory manager's behaviour, kept by the persistent one."""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import json
import logging
import re
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from sessionstore import (
    DataTooLargeError,
    InvalidDataError,
    ManagerClosedError,
    Session,
    SessionLimitError,
    SessionManager,
    SessionNotFoundError,
    SessionStoreError,
    StorageBusyError,
    VersionConflictError,
    new_session_id,
)
from tests.conftest import ManagerFactory
from tests.helpers import ManualClock, threads_left, wait_until

pytestmark = pytest.mark.contract

# --- creation ---


async def test_ensure_with_id_creates_session(manager: SessionManager, clock: ManualClock) -> None:
    session = await manager.ensure("client-1")
    assert session.session_id == "client-1"
    assert session.created_at == session.last_activity == clock.now
    assert session.data == {}
    assert session.closed is False


async def test_ensure_without_id_generates_unique_ids(manager: SessionManager) -> None:
    ids = {(await manager.ensure()).session_id for _ in range(20)}
    assert len(ids) == 20
    assert all(len(i) == 24 for i in ids)  # a 48-bit time and 96 random bits


def test_new_ids_sort_by_creation_time() -> None:
    times = [0.0, 0.001, 1.0, 1_700_000_000.0, 1_700_000_000.001, 1_800_000_000.5, 2e11]
    ids = [new_session_id(t) for t in times]
    assert ids == sorted(ids)  # bytewise, as SQLite's BINARY collation compares them
    # URL-safe, shell-safe, and never read as a command-line option.
    assert all(re.fullmatch(r"[0-9A-Za-z_~]{24}", i) for i in ids), ids
    assert new_session_id(-5.0) < ids[1]  # out-of-range times are clamped, not an error
    assert new_session_id(1e300) > ids[-1]
    # Within one millisecond the random part keeps them apart, across the blocks of
    # random bytes read ahead (341 ids each).
    same_ms = {new_session_id(1_700_000_000.0) for _ in range(10_000)}
    assert len(same_ms) == 10_000
    assert all(re.fullmatch(r"[0-9A-Za-z_~]{24}", i) for i in same_ms)
    assert len({i[:8] for i in same_ms}) == 1


def test_first_id_of_a_process_is_whole_whatever_its_time() -> None:
    """The per-millisecond prefix cache starts empty, not at some millisecond."""
    code = "from sessionstore import new_session_id; print(new_session_id(-0.001))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    made = done.stdout.strip()
    assert len(made) == 24, made
    assert made.startswith("00000000"), made  # clamped to 0


_FORK_IDS = """
import json, os
from sessionstore import new_session_id
now = 1_700_000_000.0
new_session_id(now)  # the parent now holds random bytes read ahead
read_end, write_end = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(read_end)
    os.write(write_end, json.dumps([new_session_id(now) for _ in range(50)]).encode())
    os._exit(0)
os.close(write_end)
with os.fdopen(read_end) as pipe:
    child = json.loads(pipe.read())
_, status = os.waitpid(pid, 0)
mine = [new_session_id(now) for _ in range(50)]
print(json.dumps({"status": status, "shared": len(set(mine) & set(child)), "n": len(child)}))
"""


def test_forked_processes_make_different_ids() -> None:
    """Random bytes are read ahead: a forked child must not reuse the parent's.

    Forked in a process of its own, which has no other threads.
    """
    done = subprocess.run(
        [sys.executable, "-c", _FORK_IDS], capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(done.stdout) == {"status": 0, "shared": 0, "n": 50}


async def test_ensure_existing_id_returns_it_without_overwriting(
    manager: SessionManager, clock: ManualClock
) -> None:
    first = await manager.ensure("same", data={"n": 1})
    clock.advance(5)
    again = await manager.ensure("same", data={"n": 2})
    assert again.created_at == first.created_at
    assert again.data == {"n": 1}


async def test_get_existing_and_missing(manager: SessionManager) -> None:
    created = await manager.ensure("here")
    got = await manager.get("here")
    assert got is not None
    assert got.session_id == created.session_id
    assert await manager.get("nobody") is None


async def test_concurrent_ensure_of_one_id_creates_once(manager: SessionManager) -> None:
    results = await asyncio.gather(*(manager.ensure("dup") for _ in range(30)))
    assert {r.created_at for r in results} == {results[0].created_at}
    assert await manager.list_ids() == ["dup"]
    assert manager.counters["created"] == 1


# --- timeout and activity ---


async def test_session_not_timed_out_while_active(
    manager: SessionManager, clock: ManualClock
) -> None:
    session = await manager.ensure()
    clock.advance(59)
    assert not manager.is_session_timed_out(session)


async def test_session_timed_out_after_inactivity(
    manager: SessionManager, clock: ManualClock
) -> None:
    session = await manager.ensure()
    clock.advance(61)
    assert manager.is_session_timed_out(session)
    assert await manager.get(session.session_id) is None


async def test_update_activity_prevents_timeout(
    manager: SessionManager, clock: ManualClock
) -> None:
    session = await manager.ensure()
    clock.advance(50)
    assert await manager.update_activity(session.session_id) is True
    clock.advance(50)
    assert not manager.is_session_timed_out(session)
    got = await manager.get(session.session_id)
    assert got is not None
    assert got.last_activity == clock.now - 50


async def test_update_activity_of_missing_or_expired_session_is_false(
    manager: SessionManager, clock: ManualClock
) -> None:
    assert await manager.update_activity("ghost") is False
    session = await manager.ensure()
    clock.advance(61)
    assert await manager.update_activity(session.session_id) is False
    assert await manager.get(session.session_id) is None  # not revived


async def test_last_activity_set_on_creation_and_update(
    manager: SessionManager, clock: ManualClock
) -> None:
    session = await manager.ensure()
    assert session.last_activity == clock.now
    clock.advance(12.5)
    await manager.update_activity(session.session_id)
    got = await manager.get(session.session_id)
    assert got is not None
    assert got.last_activity == clock.now
    assert got.idle_seconds(clock.now + 3) == 3


async def test_closed_session_counts_as_timed_out(manager: SessionManager) -> None:
    session = await manager.ensure()
    assert manager.is_session_timed_out(dataclasses.replace(session, closed=True))


# --- cleanup ---


async def test_cleanup_stale_sessions_removes_only_expired(
    manager: SessionManager, clock: ManualClock
) -> None:
    old = await manager.ensure("old")
    clock.advance(40)
    fresh = await manager.ensure("fresh")
    clock.advance(30)  # old idle 70 s (> 60), fresh idle 30 s
    assert await manager.cleanup_stale_sessions() == 1
    assert await manager.get(old.session_id) is None
    assert await manager.get(fresh.session_id) is not None
    assert await manager.cleanup_stale_sessions() == 0


async def test_cleanup_keeps_session_touched_but_not_yet_flushed(
    make_manager: ManagerFactory, clock: ManualClock
) -> None:
    async with make_manager(session_timeout_secs=60, flush_interval_secs=3600) as m:
        session = await m.ensure()
        clock.advance(50)
        await m.update_activity(session.session_id)  # only in memory so far
        clock.advance(50)
        assert await m.cleanup_stale_sessions() == 0
        assert await m.get(session.session_id) is not None


def _fixed_chunks(make_manager: ManagerFactory, rows: int, **settings: Any) -> SessionManager:
    """A manager (60 s timeout, no session limit) whose cleanup deletes ``rows`` rows a
    chunk, not sized by time."""
    settings.setdefault("max_concurrent_sessions", 0)
    return make_manager(
        session_timeout_secs=60, cleanup_chunk_rows=rows, cleanup_chunk_secs=0, **settings
    )


async def test_cleanup_in_chunks_deletes_everything(
    make_manager: ManagerFactory, clock: ManualClock
) -> None:
    async with _fixed_chunks(make_manager, 7) as m:
        await asyncio.gather(*(m.ensure() for _ in range(50)))
        clock.advance(62)  # past the timeout and cleanup's grace (a flush interval)
        chunks: list[int] = []
        assert await m.cleanup_stale_sessions(progress=chunks.append) == 50
        assert chunks == [7, 7, 7, 7, 7, 7, 7, 1]
        assert (await m.get_session_metrics())["total_sessions"] == 0


async def test_cleanup_reports_exactly_the_rows_it_deleted(
    make_manager: ManagerFactory, clock: ManualClock
) -> None:
    # Expired sessions share timestamps across chunk boundaries and live ones sit
    # among them: listeners must hear every deleted id once, and nothing else.
    async with _fixed_chunks(make_manager, 4) as m:
        expired: set[str] = set()
        live: set[str] = set()
        for group in range(5):
            ids = [f"g{group}-{i}" for i in range(3)]
            await asyncio.gather(*(m.ensure(sid) for sid in ids))  # one timestamp each
            expired.update(ids)
            clock.advance(1)
        tokens = {sid: await m.issue_token(sid) for sid in ("g0-0", "g4-2")}
        clock.advance(55)
        for sid in ("live-a", "live-b"):
            await m.ensure(sid)
            live.add(sid)
        await m.update_activity("g2-1")  # expired by its creation time, not any more
        expired.discard("g2-1")
        live.add("g2-1")
        clock.advance(10)  # groups idle 61-65 s, live ones 10 s
        heard: list[str] = []
        m.add_removal_listener(lambda sid, _why: heard.append(sid))
        chunks: list[int] = []
        assert await m.cleanup_stale_sessions(progress=chunks.append) == len(expired)
        assert chunks == [4, 4, 4, 2]
        assert sorted(heard) == sorted(expired)
        assert set(await m.list_ids()) == live
        assert (await m.get_session_metrics())["total_sessions"] == len(live)  # none left
        for token in tokens.values():
            assert (await m.resume(token)).reason == "expired"  # tombstoned with the row


@pytest.mark.parametrize("touches_due", [False, True])
async def test_cleanup_does_not_wait_for_the_disk_other_writes_do(
    make_manager: ManagerFactory,
    clock: ManualClock,
    backend: str,
    monkeypatch: pytest.MonkeyPatch,
    touches_due: bool,
) -> None:
    # A cleanup chunk is as good redone as lost, so its commit skips the sync. Every
    # other write still waits for it: a create right after on the same connection, and
    # activity touches, which never ride in a chunk: those pending when cleanup starts
    # commit first, those made meanwhile wait for the next durable write or, once due
    # (a flush interval of ~0 here), commit on their own before the next chunk.
    from sqlalchemy import Connection

    from sessionstore.store import SessionStore

    query = "PRAGMA synchronous" if backend == "sqlite" else "SHOW synchronous_commit"
    durable, relaxed = (2, 1) if backend == "sqlite" else ("on", "off")
    seen: list[tuple[str, Any]] = []

    def watching(kind: str, method: Any) -> Any:
        def watched(conn: Connection, *args: Any, **kwargs: Any) -> Any:
            seen.append((kind, conn.exec_driver_sql(query).scalar()))
            return method(conn, *args, **kwargs)

        return watched

    for kind, name in [
        ("cleanup", "delete_expired_chunk"),
        ("create", "create_many"),
        ("touch", "touch_many"),
    ]:
        monkeypatch.setattr(SessionStore, name, watching(kind, getattr(SessionStore, name)))
    flush_interval = 1e-9 if touches_due else 3600
    async with _fixed_chunks(make_manager, 2, flush_interval_secs=flush_interval) as m:
        await asyncio.gather(*(m.ensure() for _ in range(5)))
        clock.advance(61 + flush_interval)  # past the timeout and cleanup's grace
        kept = await m.ensure("kept")
        clock.advance(1)
        assert await m.update_activity(kept.session_id)  # pending when cleanup starts
        seen.clear()

        touches: list[asyncio.Task[bool]] = []

        def touch_between_chunks(_rows: int) -> None:  # runs before the next chunk starts
            touches.append(asyncio.create_task(m.update_activity(kept.session_id)))

        assert await m.cleanup_stale_sessions(progress=touch_between_chunks) == 5
        assert await asyncio.gather(*touches) == [True, True, True]
        await m.ensure("after")
    touch, chunk, create = ("touch", durable), ("cleanup", relaxed), ("create", durable)
    if touches_due:
        assert seen == [touch, chunk, touch, chunk, touch, chunk, touch, create]
    else:  # the touches made meanwhile wait for the create
        assert seen == [touch, chunk, chunk, chunk, touch, create]


@pytest.mark.parametrize(
    ("chunk_secs", "expected"),
    [
        (60.0, [7, 14, 28, 1]),  # every chunk far quicker than its aim: each one doubles
        (1e-9, [7, 7, 7, 7, 7, 7, 7, 1]),  # every chunk too slow: held at the first size
    ],
)
async def test_cleanup_chunks_are_sized_by_time(
    make_manager: ManagerFactory, clock: ManualClock, chunk_secs: float, expected: list[int]
) -> None:
    async with make_manager(
        session_timeout_secs=60,
        max_concurrent_sessions=0,
        cleanup_chunk_rows=7,
        cleanup_chunk_secs=chunk_secs,
    ) as m:
        await asyncio.gather(*(m.ensure() for _ in range(50)))
        clock.advance(62)  # past the timeout and cleanup's grace (a flush interval)
        chunks: list[int] = []
        assert await m.cleanup_stale_sessions(progress=chunks.append) == 50
        assert chunks == expected


async def test_cleanup_chunks_are_longer_only_while_no_other_write_waits(
    make_manager: ManagerFactory, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sessionstore.manager as manager_module

    targets: list[float] = []

    def recorded(rows: int, took: float, target: float, first: int) -> int:
        targets.append(target)
        return rows  # chunks of cleanup_chunk_rows throughout

    monkeypatch.setattr(manager_module, "_next_chunk_rows", recorded)
    async with make_manager(
        session_timeout_secs=60,
        max_concurrent_sessions=0,
        cleanup_chunk_rows=10,
        cleanup_chunk_secs=0.005,
    ) as m:
        await asyncio.gather(*(m.ensure() for _ in range(200)))
        clock.advance(62)  # past the timeout and cleanup's grace (a flush interval)
        assert await m.cleanup_stale_sessions() == 200
        assert set(targets) == {0.020}  # alone: four times the setting (and chunks ran)
        await asyncio.gather(*(m.ensure() for _ in range(200)))
        clock.advance(62)
        targets.clear()
        cleanup = asyncio.create_task(m.cleanup_stale_sessions())

        async def creating() -> None:
            while not cleanup.done():
                await m.ensure()

        await asyncio.gather(cleanup, *(creating() for _ in range(4)))
        assert cleanup.result() >= 200
    # Creates queued behind each chunk: the next one aims at the setting itself.
    assert targets.count(0.005) > len(targets) / 2, targets


def test_next_chunk_size_aims_at_the_target_time() -> None:
    from sessionstore.manager import _next_chunk_rows as next_rows

    assert next_rows(1000, took=0.010, target=0.020, first=500) == 2000  # on pace: double
    assert next_rows(1000, took=0.001, target=0.020, first=500) == 2000  # never more
    assert next_rows(1000, took=0.040, target=0.020, first=500) == 500  # too slow: halve
    assert next_rows(1000, took=0.030, target=0.020, first=500) == 666
    assert next_rows(1000, took=5.0, target=0.020, first=500) == 500  # never below the first
    assert next_rows(80_000, took=0.001, target=0.020, first=500) == 100_000  # the ceiling
    assert next_rows(1000, took=0.001, target=0, first=500) == 1000  # 0: fixed


async def test_periodic_cleanup_task_runs_every_interval(
    make_manager: ManagerFactory, clock: ManualClock
) -> None:
    async with make_manager(session_timeout_secs=60, cleanup_interval_secs=0.01) as m:
        session = await m.ensure()
        clock.advance(62)  # past the timeout and cleanup's grace (a flush interval)
        # The task runs on the event loop's own timer; the clock decides expiry.

        async def deleted() -> bool:
            return await m.store.fetch(session.session_id) is None

        await wait_until(deleted)
        assert m.counters["expired"] == 1
        assert m.counters["cleanup_runs"] >= 1


async def test_removal_listener_hears_cleanup_and_remove(
    manager: SessionManager, clock: ManualClock
) -> None:
    heard: list[tuple[str, str]] = []
    manager.add_removal_listener(lambda sid, why: heard.append((sid, why)))
    await manager.ensure("a")
    await manager.ensure("b")
    await manager.remove("a")
    clock.advance(62)  # past the timeout and cleanup's grace (a flush interval)
    await manager.cleanup_stale_sessions()
    assert heard == [("a", "removed"), ("b", "expired")]


async def test_a_failing_listener_neither_fails_the_removal_nor_stops_the_writer(
    manager: SessionManager, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    heard: list[str] = []

    def raises_value_error(sid: str, _why: str) -> None:
        raise ValueError(sid)

    def raises_cancelled(_sid: str, _why: str) -> None:
        raise asyncio.CancelledError  # a BaseException, as a careless listener might

    manager.add_removal_listener(raises_value_error)
    manager.add_removal_listener(raises_cancelled)
    manager.add_removal_listener(lambda sid, _why: heard.append(sid))
    await manager.ensure("a")
    await manager.ensure("b")
    assert await manager.remove("a") is True
    clock.advance(62)  # past the timeout and cleanup's grace (a flush interval)
    assert await manager.cleanup_stale_sessions() == 1
    assert heard == ["a", "b"]  # the listeners after the failing ones still heard
    assert (await manager.ensure("c")).session_id == "c"  # the writer goes on
    assert caplog.text.count("removal listener failed") == 4


# --- limits ---


async def test_session_limit_not_exceeded(make_manager: ManagerFactory) -> None:
    async with make_manager(max_concurrent_sessions=3) as m:
        for _ in range(3):
            await m.ensure()
        assert len(await m.list_ids()) == 3


async def test_session_limit_exceeded_raises_runtime_error_naming_limit(
    make_manager: ManagerFactory,
) -> None:
    async with make_manager(max_concurrent_sessions=2) as m:
        await m.ensure()
        await m.ensure()
        with pytest.raises(SessionLimitError, match=r"\(2\)") as info:
            await m.ensure()
        assert isinstance(info.value, RuntimeError)
        assert isinstance(info.value, SessionStoreError)
        assert len(await m.list_ids()) == 2


async def test_limit_holds_under_concurrent_creates(make_manager: ManagerFactory) -> None:
    async with make_manager(max_concurrent_sessions=10) as m:
        results = await asyncio.gather(*(m.ensure() for _ in range(40)), return_exceptions=True)
        ok = [r for r in results if isinstance(r, Session)]
        refused = [r for r in results if isinstance(r, SessionLimitError)]
        assert (len(ok), len(refused)) == (10, 30)


async def test_limit_holds_for_generated_and_explicit_ids_in_one_transaction(
    make_manager: ManagerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Generated and explicit ids are inserted by two handlers, each counting live rows."""
    from sqlalchemy import Connection

    from sessionstore.store import SessionStore

    handlers: list[list[str]] = []  # the handlers that ran, per transaction

    def recording(name: str) -> Any:
        method = getattr(SessionStore, name)

        def recorded(conn: Connection, *args: Any, **kwargs: Any) -> Any:
            handlers[-1].append(name)
            return method(conn, *args, **kwargs)

        return recorded

    for name in ("insert_new", "create_many"):
        monkeypatch.setattr(SessionStore, name, recording(name))
    async with make_manager(max_concurrent_sessions=10) as m:
        writer_free = asyncio.Event()
        write = m.store.write

        async def held(work: Any, **kwargs: Any) -> Any:
            handlers.append([])
            await writer_free.wait()  # everything below queues up behind this one
            return await write(work, **kwargs)

        monkeypatch.setattr(m.store, "write", held)
        first = asyncio.create_task(m.ensure())
        while not handlers:
            await asyncio.sleep(0)
        calls = [m.ensure() if i % 2 else m.ensure(f"explicit-{i}") for i in range(40)]
        results = asyncio.gather(*calls, return_exceptions=True)
        # The explicit ids look for an existing row first: wait until all 40 are queued.
        while len(m._writer._queue) < 40:  # type: ignore[union-attr]
            await asyncio.sleep(0.001)
        writer_free.set()
        await first
        ok = {r.session_id for r in await results if isinstance(r, Session)}
        refused = [r for r in await results if isinstance(r, SessionLimitError)]
        assert (len(ok), len(refused)) == (9, 31)
        assert set(await m.list_ids()) == ok | {(await first).session_id}
        assert m.counters["created"] == 10
    assert ["insert_new", "create_many"] in handlers  # both in one transaction


async def test_writes_queued_together_share_a_transaction_and_exclusive_ones_stand_alone(
    manager: SessionManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer's batching: what is queued shares one transaction, up to ``max_batch``;
    an exclusive kind (a cleanup chunk) gets one to itself; a request whose caller gave
    up first is skipped."""
    from sqlalchemy import Connection

    from sessionstore.writer import GroupCommitWriter

    transactions: list[list[str]] = []

    def record(_conn: Connection, args: list[Any], _now: float) -> list[Any]:
        transactions[-1].extend(args)
        return list(args)

    store = manager.store
    write, passing = store.write, asyncio.Event()

    async def held(work: Any, **kwargs: Any) -> Any:
        transactions.append([])
        await passing.wait()
        return await write(work, **kwargs)

    monkeypatch.setattr(store, "write", held)
    writer = GroupCommitWriter(
        store, {"plain": record, "chunk": record}, exclusive=["chunk"], max_batch=3
    )
    writer.start()

    async def behind_a_held_write(*requests: tuple[str, str], cancel: str = "") -> list[str]:
        """Queue ``requests`` while a first write waits; their results, and theirs only."""
        transactions.clear()
        passing.clear()
        first = writer.submit("plain", "first")
        while not transactions:
            await asyncio.sleep(0)
        futures = [writer.submit(kind, arg) for kind, arg in requests]
        for future, (_kind, arg) in zip(futures, requests, strict=True):
            if arg == cancel:
                future.cancel()
        passing.set()
        await first
        return [await f for f in futures if not f.cancelled()]

    requests = [("plain", "p1"), ("chunk", "c1"), ("chunk", "c2"), ("plain", "p2")]
    assert await behind_a_held_write(*requests) == ["p1", "c1", "c2", "p2"]
    assert transactions == [["first"], ["p1"], ["c1"], ["c2"], ["p2"]]
    requests = [("chunk", "gone"), *(("plain", f"q{i}") for i in range(4))]
    assert await behind_a_held_write(*requests, cancel="gone") == ["q0", "q1", "q2", "q3"]
    assert transactions == [["first"], ["q0", "q1", "q2"], ["q3"]]
    requests = [("plain", "r0"), ("plain", "lost"), ("plain", "r1")]  # no exclusive kind
    assert await behind_a_held_write(*requests, cancel="lost") == ["r0", "r1"]
    assert transactions == [["first"], ["r0", "r1"]]
    await writer.aclose()


async def test_on_commit_applies_each_run_of_a_kind_and_its_failure_reaches_that_run_only(
    manager: SessionManager, caplog: pytest.LogCaptureFixture
) -> None:
    """``on_commit`` gets each committed run of its kind whole, once, and its answer is
    the callers'; when it raises (or answers the wrong number), that run's callers get
    the error, the other runs of the transaction their results, and the writer goes on.
    Made with ``each_write``, a failure of one write's callback reaches that caller
    only, and the writes after it are still applied."""
    from sqlalchemy import Connection

    from sessionstore.writer import GroupCommitWriter, each_write

    def echo(_conn: Connection, args: list[Any], _now: float) -> list[Any]:
        return list(args)

    applied: list[list[str]] = []

    def shout(args: list[str], results: list[str]) -> list[Any]:
        applied.append(list(args))
        if "boom" in args:
            raise ValueError("boom")
        if "short" in args:
            return results[1:]
        return [r.upper() for r in results]

    one_by_one: list[str] = []

    def apply_one(arg: str, result: str) -> str:
        if arg == "bad":
            raise KeyError(arg)
        one_by_one.append(arg)
        return result + "!"

    writer = GroupCommitWriter(
        manager.store,
        {"a": echo, "b": echo, "c": echo},
        on_commit={"a": shout, "c": each_write(apply_one)},
    )
    writer.start()
    try:

        async def one_transaction(*requests: tuple[str, str]) -> list[Any]:
            # Queued before the writer runs: all of them share one transaction.
            before = writer.transactions
            futures = [writer.submit(kind, arg) for kind, arg in requests]
            results = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 10)
            assert writer.transactions == before + 1
            return results

        ok = await one_transaction(("a", "x"), ("a", "y"), ("b", "z"), ("a", "w"))
        assert ok == ["X", "Y", "z", "W"]
        assert applied == [["x", "y"], ["w"]]
        with caplog.at_level(logging.ERROR, logger="sessionstore.writer"):
            failed = await one_transaction(
                ("a", "fine"),
                ("b", "u"),
                ("a", "boom"),
                ("a", "v"),
                ("b", "t"),
                ("a", "short"),
                ("c", "c1"),
                ("c", "bad"),
                ("c", "c2"),
            )
        assert failed[:2] == ["FINE", "u"]
        assert [type(r) for r in failed[2:4]] == [ValueError, ValueError]
        assert failed[4] == "t"
        assert isinstance(failed[5], RuntimeError)
        assert failed[6] == "c1!"
        assert isinstance(failed[7], KeyError)
        assert failed[8] == "c2!"
        assert applied[2:] == [["fine"], ["boom", "v"], ["short"]]
        assert one_by_one == ["c1", "c2"]
        assert caplog.text.count("applying committed a writes failed") == 2
        assert caplog.text.count("applying a committed write failed") == 1
        assert await asyncio.wait_for(writer.submit("a", "after"), 10) == "AFTER"
    finally:
        await writer.aclose()


async def test_can_create_after_cleanup_frees_room(
    make_manager: ManagerFactory, clock: ManualClock
) -> None:
    async with make_manager(max_concurrent_sessions=1, session_timeout_secs=60) as m:
        await m.ensure()
        with pytest.raises(SessionLimitError):
            await m.ensure()
        clock.advance(62)  # past the timeout and cleanup's grace (a flush interval)
        # Expired sessions no longer count, even before cleanup deletes them.
        await m.ensure()
        assert await m.cleanup_stale_sessions() == 1


async def test_existing_id_is_returned_even_at_the_limit(make_manager: ManagerFactory) -> None:
    async with make_manager(max_concurrent_sessions=1) as m:
        await m.ensure("only")
        assert (await m.ensure("only")).session_id == "only"


# --- metrics ---


async def test_metrics_report_counts_and_ages(manager: SessionManager, clock: ManualClock) -> None:
    await manager.ensure("a")
    clock.advance(10)
    await manager.ensure("b")
    clock.advance(10)
    metrics = await manager.get_session_metrics()
    assert metrics["total_sessions"] == 2
    assert metrics["active_sessions"] == 2
    assert metrics["oldest_session_age"] == pytest.approx(20)
    assert metrics["newest_session_age"] == pytest.approx(10)
    assert metrics["avg_session_age"] == pytest.approx(15)


async def test_metrics_after_expiry_and_cleanup(
    manager: SessionManager, clock: ManualClock
) -> None:
    await manager.ensure("a")
    clock.advance(50)
    await manager.ensure("b")
    clock.advance(20)  # a expired, b live
    metrics = await manager.get_session_metrics()
    assert (metrics["total_sessions"], metrics["active_sessions"]) == (2, 1)
    await manager.cleanup_stale_sessions()
    metrics = await manager.get_session_metrics()
    assert (metrics["total_sessions"], metrics["active_sessions"]) == (1, 1)
    assert metrics["oldest_session_age"] == pytest.approx(20)


async def test_metrics_with_no_sessions(manager: SessionManager) -> None:
    metrics = await manager.get_session_metrics()
    assert metrics["total_sessions"] == metrics["active_sessions"] == 0
    assert metrics["avg_session_age"] == 0.0


# --- removal and listing ---


async def test_remove_session(manager: SessionManager) -> None:
    await manager.ensure("gone")
    assert await manager.remove("gone") is True
    assert await manager.get("gone") is None
    assert "gone" not in await manager.list_ids()


async def test_remove_nonexistent_session(manager: SessionManager) -> None:
    assert await manager.remove("never") is False


async def test_list_ids_newest_activity_first_and_live_only(
    manager: SessionManager, clock: ManualClock
) -> None:
    for name in ("a", "b", "c"):
        await manager.ensure(name)
        clock.advance(1)
    await manager.update_activity("a")
    assert await manager.list_ids() == ["a", "c", "b"]
    clock.advance(59.5)  # b and c are past 60 s idle; a is not
    assert await manager.list_ids() == ["a"]


async def test_two_managers_on_two_files_are_independent(
    make_manager: ManagerFactory, tmp_path: Path
) -> None:
    async with make_manager(tmp_path / "one.db") as one, make_manager(tmp_path / "two.db") as two:
        await one.ensure("x")
        assert await two.get("x") is None
        await two.ensure("y")
        assert await one.list_ids() == ["x"]
        assert await two.list_ids() == ["y"]


# --- data ---


async def test_set_data_merges_deletes_and_bumps_version(manager: SessionManager) -> None:
    await manager.ensure("d", data={"a": 1, "b": 2})
    updated = await manager.set_data("d", {"c": 3}, delete=["a"])
    assert updated.data == {"b": 2, "c": 3}
    assert updated.version == 2
    replaced = await manager.set_data("d", {"z": 0}, replace=True)
    assert replaced.data == {"z": 0}
    got = await manager.get("d")
    assert got is not None
    assert (got.data, got.version) == ({"z": 0}, 3)


async def test_set_data_compare_and_set(manager: SessionManager) -> None:
    await manager.ensure("cas")
    await manager.set_data("cas", {"n": 1}, if_version=1)
    with pytest.raises(VersionConflictError) as info:
        await manager.set_data("cas", {"n": 99}, if_version=1)
    assert (info.value.expected, info.value.actual) == (1, 2)
    got = await manager.get("cas")
    assert got is not None
    assert got.data == {"n": 1}


async def test_set_data_stores_the_data_as_it_was_when_called(manager: SessionManager) -> None:
    await manager.ensure("cart")
    cart = ["apple"]
    pending = asyncio.ensure_future(manager.set_data("cart", {"cart": cart}))
    await asyncio.sleep(0)  # set_data has queued its write; the commit has not run yet
    cart.append("pear")  # the caller goes on changing its own list
    assert (await pending).data == {"cart": ["apple"]}
    row = await manager.store.fetch("cart")
    assert row is not None
    assert json.loads(row.data) == {"cart": ["apple"]}


async def test_set_data_counts_as_activity(manager: SessionManager, clock: ManualClock) -> None:
    await manager.ensure("busy")
    clock.advance(50)
    await manager.set_data("busy", {"k": "v"})
    clock.advance(50)
    assert await manager.get("busy") is not None


async def test_data_limit_counts_utf8_bytes_not_characters(make_manager: ManagerFactory) -> None:
    async with make_manager(max_data_bytes=100) as m:
        # {"k":"..."} is 8 bytes of JSON around the value.
        fits_ascii, fits_utf8 = {"k": "x" * 92}, {"k": "é" * 46}  # 100 bytes each
        over_utf8 = {"k": "é" * 47}  # 49 characters in all, but 102 bytes
        assert (await m.ensure(data=fits_ascii)).data == fits_ascii
        assert (await m.ensure(data=fits_utf8)).data == fits_utf8
        with pytest.raises(DataTooLargeError, match="102"):
            await m.ensure(data=over_utf8)
        with pytest.raises(DataTooLargeError, match="101"):
            await m.ensure(data={"k": "x" * 93})
        assert len(await m.list_ids()) == 2


async def test_set_data_rejects_missing_oversized_and_unencodable(
    make_manager: ManagerFactory,
) -> None:
    async with make_manager(max_data_bytes=100) as m:
        with pytest.raises(SessionNotFoundError):
            await m.set_data("nobody", {"a": 1})
        await m.ensure("s")
        with pytest.raises(DataTooLargeError, match="100"):
            await m.set_data("s", {"big": "x" * 200})
        with pytest.raises(InvalidDataError):
            await m.set_data("s", {"bad": object()})
        with pytest.raises(InvalidDataError):
            await m.set_data("s", {"nan": float("nan")})
        loop: dict[str, object] = {}
        loop["self"] = [loop]
        with pytest.raises(InvalidDataError):
            await m.set_data("s", loop)
        with pytest.raises(InvalidDataError):
            await m.ensure("t", data=loop)
        got = await m.get("s")
        assert got is not None
        assert (got.data, got.version) == ({}, 1)


async def test_ensure_returns_the_data_as_given_not_as_changed_while_in_flight(
    manager: SessionManager,
) -> None:
    class Key(enum.StrEnum):
        A = "a"

    data: dict[Any, Any] = {Key.A: 1}
    creating = asyncio.create_task(manager.ensure(data=data))
    await asyncio.sleep(0)  # encoded and queued; the write is in flight
    data[Key.A] = 2
    data[5] = "an int key"
    session = await creating
    assert session.data == {"a": 1}
    assert [type(k) for k in session.data] == [str]  # as it reads back, not an enum
    again = await manager.get(session.session_id)
    assert again is not None
    assert again.data == {"a": 1}


async def test_created_session_data_is_a_private_copy_in_json_form(
    manager: SessionManager,
) -> None:
    flat = {"name": "Zoë", "n": 1, "ok": True, "none": None, "x": 0.5}
    nested = {"pair": (1, 2), "inner": {"k": "v"}}
    for data in (flat, nested):
        session = await manager.ensure(data=data)
        stored = await manager.list_sessions()
        assert session.data == json.loads(json.dumps(data))  # tuples read back as lists
        assert session.data == next(s.data for s in stored if s.session_id == session.session_id)
        session.data["added"] = 1
        assert "added" not in data
        again = await manager.get(session.session_id)
        assert again is not None
        assert "added" not in again.data


async def test_data_is_stored_as_plain_json_text(manager: SessionManager) -> None:
    await manager.ensure("j", data={"name": "Zoë", "n": [1, 2]})
    async with manager.store.reader.connect() as conn:
        raw = (await conn.exec_driver_sql("SELECT data FROM sessions")).scalar_one()
    assert json.loads(raw) == {"name": "Zoë", "n": [1, 2]}


async def test_snapshot_is_a_copy(manager: SessionManager) -> None:
    session = await manager.ensure("copy", data={"a": 1})
    session.data["a"] = 2
    got = await manager.get("copy")
    assert got is not None
    assert got.data == {"a": 1}


# --- lifecycle ---


async def test_use_before_start_and_after_close_is_a_clear_error(
    make_manager: ManagerFactory,
) -> None:
    m = make_manager()
    with pytest.raises(ManagerClosedError, match="not started"):
        await m.ensure()
    await m.start()
    await m.start()  # idempotent
    await m.aclose()
    await m.aclose()  # idempotent
    with pytest.raises(ManagerClosedError, match="closed"):
        await m.get("x")
    with pytest.raises(ManagerClosedError, match="create a new one"):
        await m.start()


async def test_aclose_flushes_pending_activity(
    make_manager: ManagerFactory, clock: ManualClock, db_path: Path
) -> None:
    async with make_manager(flush_interval_secs=3600) as m:
        await m.ensure("t")
        clock.advance(30)
        await m.update_activity("t")
        row = await m.store.fetch("t")
        assert row is not None
        assert row.last_activity == clock.now - 30  # not written yet
    async with make_manager() as again:
        row = await again.store.fetch("t")
        assert row is not None
        assert row.last_activity == clock.now


async def test_activity_is_flushed_within_the_flush_interval(
    make_manager: ManagerFactory, clock: ManualClock
) -> None:
    async with make_manager(flush_interval_secs=0.05) as m:
        await m.ensure("t")
        clock.advance(30)
        await m.update_activity("t")

        async def flushed() -> bool:
            row = await m.store.fetch("t")
            return row is not None and row.last_activity == clock.now

        await wait_until(flushed)


async def test_no_task_or_thread_outlives_aclose(make_manager: ManagerFactory) -> None:
    tasks_before = set(asyncio.all_tasks())
    threads_before = set(threading.enumerate())
    async with make_manager(refresh_interval_secs=0.01) as m:
        await asyncio.gather(*(m.ensure() for _ in range(10)), m.list_ids(), m.get("x"))
        if m.store.dialect == "sqlite":
            assert set(threading.enumerate()) - threads_before  # aiosqlite's threads ran
    leftover = {t for t in asyncio.all_tasks() - tasks_before if not t.done()}
    assert leftover == set()
    assert await threads_left(threads_before) == set()


def test_from_env_reads_the_session_variables(
    monkeypatch: pytest.MonkeyPatch, db_path: Path
) -> None:
    monkeypatch.setenv("SESSION_TIMEOUT_SECS", "120")
    monkeypatch.setenv("SESSION_MAX_CONCURRENT", "7")
    monkeypatch.setenv("SESSION_CLEANUP_INTERVAL", "30")
    monkeypatch.setenv("SESSIONSTORE_DATABASE", str(db_path))
    m = SessionManager.from_env()
    assert (m.session_timeout_secs, m.max_concurrent_sessions, m.cleanup_interval_secs) == (
        120,
        7,
        30,
    )
    assert m.database == str(db_path)
    assert SessionManager.from_env(session_timeout_secs=5).session_timeout_secs == 5


def test_database_defaults(monkeypatch: pytest.MonkeyPatch, db_path: Path) -> None:
    monkeypatch.delenv("SESSIONSTORE_DATABASE", raising=False)
    assert SessionManager().database.endswith("sessions.db")
    monkeypatch.setenv("SESSIONSTORE_DATABASE", str(db_path))
    assert SessionManager().database == str(db_path)
    # The constructor's own defaults are the seed's, whatever SESSION_* says.
    monkeypatch.setenv("SESSION_TIMEOUT_SECS", "5")
    assert SessionManager().session_timeout_secs == 3600


def test_bad_settings_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SESSION_TIMEOUT_SECS", "soon")
    with pytest.raises(ValueError, match="SESSION_TIMEOUT_SECS"):
        SessionManager.from_env()
    with pytest.raises(ValueError, match="session_timeout_secs"):
        SessionManager(session_timeout_secs=-1)
    monkeypatch.setenv("SESSION_TIMEOUT_SECS", "inf")  # float() takes it; no timeout is not
    with pytest.raises(ValueError, match="session_timeout_secs must be a finite number"):
        SessionManager.from_env()
    with pytest.raises(ValueError, match="checkpoint_interval_secs"):
        SessionManager(checkpoint_interval_secs=float("nan"))
    with pytest.raises(TypeError, match="unknown option"):
        SessionManager(colour="blue")


async def test_unpaired_surrogates_are_refused_without_harming_other_writes(
    manager: SessionManager,
) -> None:
    await manager.ensure("a")
    await manager.ensure("b")
    bad, good = await asyncio.gather(
        manager.set_data("a", {"k": "\ud800"}),
        manager.set_data("b", {"ok": 1}),
        return_exceptions=True,
    )
    assert isinstance(bad, InvalidDataError)
    assert isinstance(good, Session)
    assert good.data == {"ok": 1}
    with pytest.raises(InvalidDataError):
        await manager.ensure(data={"\udfff": 1})
    with pytest.raises(ValueError, match="printable"):
        await manager.ensure("\ud800")
    assert await manager.get("\ud800") is None
    assert await manager.remove("\ud800") is False


async def test_list_ids_waits_for_touches_being_written(
    db_path: Path, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found by review: flush() looked only at touches not yet taken, so a touch that a
    # transaction was writing at that moment was missed: list_ids() read the row
    # without it and left out a session that get() served.
    async with SessionManager(
        str(db_path), clock=clock, session_timeout_secs=60, flush_interval_secs=3600
    ) as m:
        sid = (await m.ensure()).session_id
        clock.advance(59)
        assert await m.update_activity(sid)  # held in memory; the row says t+0
        clock.advance(2)  # live by memory, expired by the row
        writer = m._writer
        assert writer is not None
        listing: list[asyncio.Future[list[str]]] = []
        real_write = m.store.write

        async def write_when_listed(work: Any, *, durable: bool = True) -> Any:
            # The transaction carrying the touch waits (a real one, only later) until
            # list_ids() has read, or queued a barrier behind it.
            listing.append(asyncio.ensure_future(m.list_ids()))
            while not listing[0].done() and not any(r[0] == "barrier" for r in writer._queue):
                await asyncio.sleep(0)
            monkeypatch.setattr(m.store, "write", real_write)
            return await real_write(work, durable=durable)

        monkeypatch.setattr(m.store, "write", write_when_listed)
        await m.ensure()  # its transaction takes the touch
        assert await m.get(sid) is not None
        assert sid in await listing[0]


async def test_a_locked_database_fails_each_caller_after_one_busy_timeout(
    db_path: Path, clock: ManualClock
) -> None:
    # Found by review: a failed batch was retried one request at a time, and with
    # another connection holding the write lock each retry waited the whole busy
    # timeout again: the last of 40 callers heard after 40 of them.
    async with SessionManager(
        str(db_path), clock=clock, busy_timeout_ms=100, refresh_interval_secs=0
    ) as m:
        ids = [(await m.ensure()).session_id for _ in range(40)]
        other = sqlite3.connect(db_path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            started = time.perf_counter()
            results = await asyncio.gather(
                *(m.set_data(sid, {"k": 1}) for sid in ids), return_exceptions=True
            )
            waited = time.perf_counter() - started
        finally:
            other.rollback()
            other.close()
        assert all(isinstance(r, StorageBusyError) for r in results)
        assert waited < 1.5, f"the callers heard after {waited:.1f} s"
        assert (await m.set_data(ids[0], {"k": 2})).version == 2  # the writer goes on
