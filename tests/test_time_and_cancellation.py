"""Clock jumps and cancelled callers: nothing immortal, nothing half-written."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import threading
from pathlib import Path

import pytest

import sessionstore.manager as manager_module
from sessionstore import SessionManager
from tests.conftest import ManagerFactory
from tests.helpers import ManualClock, threads_left, wait_until


@pytest.mark.contract
async def test_jump_forward_expires_what_is_idle_and_nothing_else(
    manager: SessionManager, clock: ManualClock
) -> None:
    await manager.ensure("idle")
    clock.advance(50)
    await manager.ensure("busy")
    clock.advance(40)  # the jump: idle is 90 s idle, busy 40 s
    assert await manager.list_ids() == ["busy"]
    assert await manager.cleanup_stale_sessions() == 1
    assert await manager.get("busy") is not None


@pytest.mark.contract
async def test_jump_backward_does_not_make_sessions_immortal(
    manager: SessionManager, clock: ManualClock
) -> None:
    await manager.ensure("s")
    clock.advance(-86_400)  # a day back: the session's activity is now "in the future"
    got = await manager.get("s")
    assert got is not None
    assert got.idle_seconds(clock.now) == 0  # never negative
    assert await manager.cleanup_stale_sessions() == 0  # ...and its stamp is clamped to now
    row = await manager.store.fetch("s")
    assert row is not None
    assert row.last_activity == clock.now
    clock.advance(62)  # a timeout (and cleanup's grace) later, not a day later
    assert await manager.get("s") is None
    assert await manager.cleanup_stale_sessions() == 1


async def test_cleanup_evicts_cached_sessions_a_slice_at_a_time(
    make_manager: ManagerFactory, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Eviction yields to the event loop between slices (10 here), so a daemon with a
    # large cache keeps serving while it runs; what other tasks do meanwhile counts.
    monkeypatch.setattr(manager_module, "_EVICT_SLICE", 10)
    async with make_manager(session_timeout_secs=60, max_concurrent_sessions=0) as m:
        await m.recovered()
        for i in range(20):
            await m.ensure(f"old{i:02}")
        clock.advance(40)
        for i in range(20):
            await m.ensure(f"new{i:02}")
        clock.advance(86_400)
        await m.ensure("ahead")
        clock.advance(-86_360)  # back a day: old 80 s idle, new 40 s, ahead in the future
        cleaned_at = clock.now
        sizes: list[int] = []

        async def beside() -> None:
            while True:
                sizes.append(len(m._cache))
                clock.advance(0.001)  # later than the cleanup's own clock
                assert await m.update_activity("new19")  # in the last slice
                await asyncio.sleep(0)

        task = asyncio.create_task(beside())
        try:
            assert await m.cleanup_stale_sessions() == 20
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # Seen part-way: slices of old sessions gone, new ones still there.
        assert any(21 < size < 41 for size in sizes), sizes
        assert sorted(m._cache) == [f"new{i:02}" for i in range(20)]
        # Touched after the cleanup read its clock, and kept: its unwritten activity
        # is the latest (a reload from the database would have lost it).
        got = await m.get("new19")
        assert got is not None
        assert got.last_activity == clock.now
        ahead = await m.get("ahead")  # reloaded: the first chunk pulled its stamp back
        assert ahead is not None
        assert ahead.last_activity == cleaned_at


async def test_cancelled_writes_leave_rows_old_or_new_and_the_lock_free(
    make_manager: ManagerFactory, db_path: Path
) -> None:
    async with make_manager(max_concurrent_sessions=0) as m:
        await m.ensure("c", data={"n": 0})
        outcomes = {"done": 0, "cancelled": 0}
        for i in range(1, 200):
            try:
                # A timeout of 0 cancels the caller at its first await, mid-flight.
                await asyncio.wait_for(m.set_data("c", {"n": i}), timeout=0 if i % 2 else 0.05)
                outcomes["done"] += 1
            except TimeoutError:
                outcomes["cancelled"] += 1
        assert outcomes["cancelled"] > 0
        assert outcomes["done"] > 0
        # A pending touch makes list_ids() a real barrier: it commits after every
        # write queued before it, so no transaction is still running.
        assert await m.update_activity("c")
        await m.list_ids()
        # Another connection can take the write lock at once: nothing is stranded.
        other = sqlite3.connect(db_path, timeout=0, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            data, version = other.execute(
                "SELECT data, version FROM sessions WHERE session_id = 'c'"
            ).fetchone()
            other.execute("ROLLBACK")
        finally:
            other.close()
    # Every committed change bumped the version by one and wrote its whole value.
    n = json.loads(data)["n"]
    assert version - 1 >= outcomes["done"]
    assert 1 <= n <= 199
    async with make_manager() as again:
        got = await again.get("c")
        assert got is not None
        assert (got.data, got.version) == ({"n": n}, version)


@pytest.mark.contract
async def test_cancelled_ensure_is_either_created_or_absent(
    make_manager: ManagerFactory,
) -> None:
    async with make_manager(max_concurrent_sessions=0) as m:
        for i in range(50):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(m.ensure(f"id{i}"), timeout=0)
        await m.list_ids()
        for i in range(50):
            got = await m.get(f"id{i}")
            assert got is None or got.session_id == f"id{i}"
        # The lock is free: a fresh create goes through.
        assert (await m.ensure("after")).session_id == "after"


async def test_cancelled_reads_and_a_quick_aclose_leave_no_connection_open(
    db_path: Path, clock: ManualClock
) -> None:
    """A cancel that lands while a connection is opening or mid-statement leaks nothing.

    SQLite removes the -wal file when the last connection to a database closes, so a
    -wal left after ``aclose()`` means a connection (and its aiosqlite thread) leaked.
    The steps walk the cancel across connect, execute and close; closing right after
    start cancels the start-up count task at whatever point it has reached.
    """
    threads_before = set(threading.enumerate())
    for steps in range(0, 24, 3):
        async with SessionManager(str(db_path), clock=clock, max_concurrent_sessions=0) as m:
            await m.ensure(f"s{steps}")
            reads = [  # more than the pool holds: some must connect
                asyncio.ensure_future(read)
                for _ in range(3)
                for read in (m.store.fetch("s0"), m.store.live_ids(0), m.store.count_split(0))
            ]
            for _ in range(steps):
                await asyncio.sleep(0)
            for task in reads:
                task.cancel()
            await asyncio.gather(*reads, return_exceptions=True)
        assert not Path(f"{db_path}-wal").exists(), f"a connection outlived aclose ({steps=})"
    assert await threads_left(threads_before) == set()


async def test_a_write_whose_caller_is_cancelled_while_it_commits_still_reaches_the_cache(
    make_manager: ManagerFactory, db_path: Path
) -> None:
    # A client disconnects (its handler is cancelled) while its write waits for the
    # lock and then commits: the manager's memory must agree with the row it wrote.
    heard: list[tuple[str, str]] = []
    async with make_manager() as m:
        m.add_removal_listener(lambda sid, reason: heard.append((sid, reason)))
        await m.ensure("s", data={"n": 0})
        await m.ensure("r")
        writer = m._writer
        assert writer is not None
        blocker = sqlite3.connect(db_path, isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
            created = m.counters["created"]
            writes = [
                asyncio.create_task(m.set_data("s", {"n": 1})),
                asyncio.create_task(m.remove("r")),
                asyncio.create_task(m.ensure(data={"new": True})),  # a generated id
            ]
            await asyncio.sleep(0)  # both are queued

            async def taken() -> bool:  # the writer's transaction waits for the lock
                return not writer._queue

            await wait_until(taken)
            for task in writes:
                task.cancel()
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        for task in writes:
            with pytest.raises(asyncio.CancelledError):
                await task
        await m.ensure("after")  # queued behind them: their transaction has committed
        got = await m.get("s")
        assert got is not None
        assert (got.data, got.version) == ({"n": 1}, 2)
        assert await m.get("r") is None
        assert heard == [("r", "removed")]
        # The create whose caller left is in the database and in memory, counted.
        assert m.counters["created"] == created + 2  # it and "after"
        (new_id,) = set(await m.list_ids()) - {"s", "after"}
        assert new_id in m._cache
        got_new = await m.get(new_id)
        assert got_new is not None
        assert got_new.data == {"new": True}


async def test_a_cancelled_aclose_still_writes_the_activity_and_stops_the_writer(
    db_path: Path, clock: ManualClock
) -> None:
    # Found by review: aclose() marked the manager closed before its first await, so
    # a caller cancelled while it waited (a shutdown timeout) left the writer running
    # and the activity unwritten, and a second aclose() returned at once.
    before = set(threading.enumerate())
    m = SessionManager(str(db_path), clock=clock, flush_interval_secs=3600)
    await m.start()
    sid = (await m.ensure()).session_id
    clock.advance(30)
    assert await m.update_activity(sid)
    closing = asyncio.ensure_future(m.aclose())
    await asyncio.sleep(0)  # it is waiting for the background tasks to stop
    closing.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await closing
    await m.aclose()  # the retry a shutdown path makes
    assert m.closed
    assert not await threads_left(before)
    async with SessionManager(str(db_path), clock=clock) as again:
        row = await again.store.fetch(sid)
    assert row is not None
    assert row.last_activity == clock.now
