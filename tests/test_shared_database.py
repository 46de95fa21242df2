"""Two managers on one database (two daemons, or a daemon and the admin CLI)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import pytest
from sqlalchemy.engine import make_url

import sessionstore.manager as manager_module
from sessionstore import (
    ManagerClosedError,
    Session,
    SessionLimitError,
    SessionManager,
    StorageBusyError,
    VersionConflictError,
)
from sessionstore.store import SessionRow
from tests.conftest import ManagerFactory
from tests.helpers import ManualClock, wait_until

pytestmark = pytest.mark.contract

T = TypeVar("T")


async def _data_and_version(m: SessionManager, session_id: str) -> tuple[Any, int]:
    """The data and version that ``m`` serves for a session it must hold."""
    got = await m.get(session_id)
    assert got is not None, session_id
    return got.data, got.version


async def test_a_session_created_by_one_is_served_by_the_other(
    make_manager: ManagerFactory,
) -> None:
    async with make_manager() as a, make_manager() as b:
        created = await a.ensure(data={"cart": ["apple"]})
        token = await a.issue_token(created.session_id)
        resumed = await b.resume(token)
        assert resumed.session is not None
        assert resumed.session.session_id == created.session_id
        assert resumed.session.data == {"cart": ["apple"]}


async def test_the_limit_holds_across_both(make_manager: ManagerFactory) -> None:
    async with (
        make_manager(max_concurrent_sessions=15) as a,
        make_manager(max_concurrent_sessions=15) as b,
    ):
        results = await asyncio.gather(
            *(m.ensure() for m in (a, b) for _ in range(20)), return_exceptions=True
        )
    assert sum(isinstance(r, Session) for r in results) == 15
    assert sum(isinstance(r, SessionLimitError) for r in results) == 25


async def test_cleanup_by_both_at_once_deletes_each_row_once(
    make_manager: ManagerFactory, clock: ManualClock
) -> None:
    async with (
        make_manager(max_concurrent_sessions=0, cleanup_chunk_rows=50) as a,
        make_manager(max_concurrent_sessions=0, cleanup_chunk_rows=50) as b,
    ):
        await asyncio.gather(*(a.ensure() for _ in range(400)))
        clock.advance(3602)  # past the timeout and cleanup's grace (a flush interval)
        counts = await asyncio.gather(a.cleanup_stale_sessions(), b.cleanup_stale_sessions())
        assert sum(counts) == 400
        assert (await a.get_session_metrics())["total_sessions"] == 0


async def test_activity_not_yet_written_by_one_protects_from_the_others_cleanup(
    make_manager: ManagerFactory, clock: ManualClock
) -> None:
    # A writes a touch up to a flush interval late. Meanwhile B sees the stored time
    # and the session as expired (documented), but its cleanup must not delete it.
    async with (
        make_manager(session_timeout_secs=60) as a,
        make_manager(session_timeout_secs=60) as b,
    ):
        await a.ensure("in-use-on-a")
        clock.advance(59.5)
        assert await a.update_activity("in-use-on-a")  # in A's memory only, for now
        clock.advance(0.7)  # 60.2 s after the stored activity, 0.7 s after the real one
        assert await b.get("in-use-on-a") is None
        assert await b.cleanup_stale_sessions() == 0
        await a.list_ids()  # writes A's pending activity (as its flush timer would)
        assert await b.get("in-use-on-a") is not None
        assert (await a.set_data("in-use-on-a", {"kept": True})).data == {"kept": True}


async def test_another_process_s_newer_stamps_are_no_clock_jump(
    make_manager: ManagerFactory, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    # B read its clock a little after A did (or holds a lock A waits for): its stamps
    # are ahead of A's cleanup. That is not the clock jumping back.
    later = ManualClock(clock.now + 2)
    async with make_manager() as a, make_manager(clock=later) as b:
        await b.ensure("newer")
        assert await a.cleanup_stale_sessions() == 0
        row = await a.store.fetch("newer")
        assert row is not None
        assert row.last_activity == later.now  # not pulled back to A's clock
    assert "clock moved backwards" not in caplog.text


async def test_activity_flushed_by_one_protects_from_the_others_cleanup(
    make_manager: ManagerFactory, clock: ManualClock
) -> None:
    async with (
        make_manager(session_timeout_secs=60) as a,
        make_manager(session_timeout_secs=60) as b,
    ):
        await a.ensure("active-on-a")
        clock.advance(50)
        await a.update_activity("active-on-a")
        await a.list_ids()  # flushes A's pending activity (as its flush timer would)
        clock.advance(50)  # 100 s since creation, 50 s since the last activity
        assert await b.cleanup_stale_sessions() == 0
        assert await b.get("active-on-a") is not None


async def test_cached_session_removed_elsewhere_is_dropped_within_the_refresh_interval(
    make_manager: ManagerFactory,
) -> None:
    heard: list[tuple[str, str]] = []
    async with make_manager(refresh_interval_secs=0.05) as a, make_manager() as b:
        a.add_removal_listener(lambda sid, why: heard.append((sid, why)))
        await a.ensure("shared")
        assert await a.get("shared") is not None  # now cached by A
        assert await b.remove("shared")

        async def dropped() -> bool:
            return heard == [("shared", "removed")]

        await wait_until(dropped, timeout=2)
        assert await a.get("shared") is None


async def test_refresh_picks_up_data_changed_elsewhere(make_manager: ManagerFactory) -> None:
    async with make_manager() as a, make_manager() as b:
        await a.ensure("s", data={"v": 1})
        await b.set_data("s", {"v": 2})
        assert await a.refresh() == []
        assert await _data_and_version(a, "s") == ({"v": 2}, 2)
        # Compare-and-set is decided by the database, not by a stale cache.
        await b.set_data("s", {"v": 3})
        with pytest.raises(VersionConflictError):
            await a.set_data("s", {"v": 99}, if_version=2)


async def test_refresh_reads_the_data_only_of_sessions_changed_elsewhere(
    make_manager: ManagerFactory, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with make_manager() as a, make_manager() as b:
        for sid in ("same", "touched", "changed", "reborn"):
            await a.ensure(sid, data={"v": 1})
        clock.advance(10)
        assert await b.update_activity("touched")
        await b.list_ids()  # B's activity written
        await b.set_data("changed", {"v": 2})
        assert await b.remove("reborn")
        await b.ensure("reborn", data={"v": 3})  # another session of the same id
        data_reads: list[list[str]] = []
        real_fetch = a.store.fetch_many

        async def recorded(session_ids: list[str]) -> list[SessionRow]:
            data_reads.append(sorted(session_ids))
            return await real_fetch(session_ids)

        monkeypatch.setattr(a.store, "fetch_many", recorded)
        assert await a.refresh() == []
        assert data_reads == [["changed", "reborn"]]  # activity alone needs no data
        touched = await a.get("touched")
        assert touched is not None
        assert touched.last_activity == clock.now
        changed = await a.get("changed")
        assert changed is not None
        assert (changed.data, changed.version) == ({"v": 2}, 2)
        reborn = await a.get("reborn")
        assert reborn is not None
        assert (reborn.data, reborn.created_at) == ({"v": 3}, clock.now)
        assert data_reads == [["changed", "reborn"]]  # served from the cache since


@pytest.mark.parametrize("ours", ["set_data", "remove", "create again"])
async def test_a_write_of_ours_during_the_data_read_is_not_rolled_back(
    make_manager: ManagerFactory,
    clock: ManualClock,
    monkeypatch: pytest.MonkeyPatch,
    ours: str,
) -> None:
    # B changed s, so A's refresh reads its data; a write of A's own commits while
    # that read is under way: the cache keeps A's write, which is the newer.
    async with make_manager() as a, make_manager() as b:
        await a.ensure("s", data={"n": 0})
        await b.set_data("s", {"n": 1})
        # The refresh's data read of the sessions whose heads showed a change.
        read_done, go_on = _hold_next_read(a, monkeypatch, reads=("fetch_many",))
        refreshing = asyncio.create_task(a.refresh(["s"]))
        await read_done.wait()
        if ours == "set_data":
            assert (await a.set_data("s", {"n": 2})).version == 3
        else:
            assert await a.remove("s")
            if ours == "create again":
                clock.advance(1)
                await a.ensure("s", data={"n": 9})
        go_on.set()
        assert await refreshing == []
        got = await a.get("s")
        if ours == "set_data":
            assert got is not None
            assert (got.data, got.version) == ({"n": 2}, 3)
        elif ours == "remove":
            assert got is None
        else:
            assert got is not None
            assert (got.data, got.created_at) == ({"n": 9}, clock.now)


async def test_overlapping_refreshes_leave_the_latest_version_cached(
    make_manager: ManagerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Refresh R1 reads version 2's data; B writes version 3; refresh R2 reads that; R1
    # applies version 2, then R2 must still apply version 3 (and may vouch for it).
    async with make_manager() as a, make_manager() as b:
        await a.ensure("s", data={"n": 0})
        await b.set_data("s", {"n": 1})  # version 2
        real_fetch = a.store.fetch_many
        held = [(asyncio.Event(), asyncio.Event()), (asyncio.Event(), asyncio.Event())]
        calls = [0]

        async def data_read_held(session_ids: list[str]) -> list[SessionRow]:
            call = calls[0]
            calls[0] += 1
            rows = await real_fetch(session_ids)
            if call < len(held):
                read_done, go_on = held[call]
                read_done.set()
                await go_on.wait()
            return rows

        monkeypatch.setattr(a.store, "fetch_many", data_read_held)
        first = asyncio.create_task(a.refresh())
        await held[0][0].wait()
        await b.set_data("s", {"n": 2})  # version 3
        second = asyncio.create_task(a.refresh())
        await held[1][0].wait()
        held[0][1].set()
        assert await first == []
        held[1][1].set()
        assert await second == []
        await a.refresh()
        assert await _data_and_version(a, "s") == ({"n": 2}, 3)


async def test_a_newer_write_elsewhere_after_ours_during_the_data_read_is_taken(
    make_manager: ManagerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with make_manager() as a, make_manager() as b:
        await a.ensure("s", data={"n": 0})
        await b.set_data("s", {"n": 1})  # version 2: A's refresh reads its data
        real_fetch = a.store.fetch_many
        reading, go_on = asyncio.Event(), asyncio.Event()

        async def read_after_both_writes(session_ids: list[str]) -> list[SessionRow]:
            reading.set()
            await go_on.wait()
            return await real_fetch(session_ids)

        monkeypatch.setattr(a.store, "fetch_many", read_after_both_writes)
        refreshing = asyncio.create_task(a.refresh(["s"]))
        await reading.wait()
        assert (await a.set_data("s", {"a": 1})).version == 3
        assert (await b.set_data("s", {"b": 1})).version == 4
        go_on.set()
        assert await refreshing == []
        theirs = await _data_and_version(b, "s")
        assert theirs[1] == 4
        assert await _data_and_version(a, "s") == theirs


async def test_a_session_deleted_between_the_two_reads_is_found_by_the_next_refresh(
    make_manager: ManagerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with make_manager() as a, make_manager() as b:
        await a.ensure("s", data={"n": 0})
        await a.ensure("t", data={"n": 0})
        await b.set_data("s", {"n": 1})
        real_heads = a.store.fetch_heads

        async def heads_then_removed(session_ids: list[str]) -> list[Any]:
            heads = await real_heads(session_ids)
            assert await b.remove("s")  # before the data read
            return heads

        monkeypatch.setattr(a.store, "fetch_heads", heads_then_removed)
        assert await a.refresh() == []
        monkeypatch.setattr(a.store, "fetch_heads", real_heads)
        assert await a.refresh() == ["s"]
        assert await a.get("s") is None


async def test_a_version_conflict_refreshes_the_stale_cache(make_manager: ManagerFactory) -> None:
    async with make_manager() as a, make_manager() as b:
        await a.ensure("s", data={"n": 0})
        assert await a.get("s") is not None  # cached by A at version 1
        await b.set_data("s", {"n": 1}, if_version=1)
        with pytest.raises(VersionConflictError):
            await a.set_data("s", {"n": 1}, if_version=1)
        got = await a.get("s")  # no refresh interval needed: the conflict told A
        assert got is not None
        assert (got.data, got.version) == ({"n": 1}, 2)
        assert (await a.set_data("s", {"n": 2}, if_version=got.version)).version == 3


def _hold_next_read(
    m: SessionManager,
    monkeypatch: pytest.MonkeyPatch,
    reads: tuple[str, ...] = ("fetch_many", "fetch_heads"),
) -> tuple[asyncio.Event, asyncio.Event]:
    """Hold the manager's next read of rows after it has read (a real read): by
    default of whole rows (a cache miss, a refresh's data read) or of their heads (a
    refresh); ``reads`` names the store's methods to hold.

    Returns ``(read_done, go_on)``: the first is set once the read is done, setting
    the second lets its result go on. Later reads are not held.
    """
    read_done, go_on = asyncio.Event(), asyncio.Event()

    def held(real: Callable[[list[str]], Awaitable[T]]) -> Callable[[list[str]], Awaitable[T]]:
        async def first_read_held(session_ids: list[str]) -> T:
            rows = await real(session_ids)
            if not read_done.is_set():
                read_done.set()
                await go_on.wait()
            return rows

        return first_read_held

    for name in reads:
        monkeypatch.setattr(m.store, name, held(getattr(m.store, name)))
    return read_done, go_on


@contextlib.asynccontextmanager
async def _refresh_held_after_its_read(
    m: SessionManager, monkeypatch: pytest.MonkeyPatch, ids: list[str]
) -> AsyncIterator[asyncio.Task[list[str]]]:
    """Start ``m.refresh(ids)``; inside the block its read (a real one) is done and
    its result not yet applied. The refresh finishes after the block."""
    read_done, go_on = _hold_next_read(m, monkeypatch)
    refreshing = asyncio.create_task(m.refresh(ids))
    reading = asyncio.create_task(read_done.wait())
    await asyncio.wait({refreshing, reading}, return_when=asyncio.FIRST_COMPLETED)
    reading.cancel()
    assert read_done.is_set(), "the refresh returned without reading"
    try:
        yield refreshing
    finally:
        go_on.set()


async def test_a_read_that_began_before_a_write_does_not_roll_the_cache_back(
    make_manager: ManagerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A refresh (the daemon runs one for its attached sessions) reads the row, and a
    # set_data commits before that read's result is cached: the older row must not
    # replace the newer version the manager already holds. Found by the daemon fuzz test.
    async with make_manager() as m, make_manager() as other:
        await m.ensure("s", data={"n": 0})
        await other.ensure("elsewhere")  # another process wrote: the refresh reads
        async with _refresh_held_after_its_read(m, monkeypatch, ["s"]) as refreshing:
            assert (await m.set_data("s", {"n": 1})).version == 2  # the read saw version 1
        assert await refreshing == []
        assert await _data_and_version(m, "s") == ({"n": 1}, 2)


async def test_a_session_removed_elsewhere_is_found_gone_despite_activity_during_the_read(
    make_manager: ManagerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A chatty client touches its session while the re-read runs; the session that
    # another process removed must still be found gone (and its client told).
    async with make_manager() as a, make_manager() as b:
        await a.ensure("s")
        assert await b.remove("s")
        async with _refresh_held_after_its_read(a, monkeypatch, ["s"]) as refreshing:
            assert await a.update_activity("s")  # still cached here, so still "live"
        assert await refreshing == ["s"]
        assert await a.get("s") is None


def _count_reads(m: SessionManager, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the manager's re-reads of cached sessions, one a slice (the real read
    still runs); ``[n]``."""
    real_fetch = m.store.fetch_heads
    reads = [0]

    async def counted(session_ids: list[str]) -> list[tuple[str, float, float, int]]:
        reads[0] += 1
        return await real_fetch(session_ids)

    monkeypatch.setattr(m.store, "fetch_heads", counted)
    return reads


async def test_refresh_rereads_only_after_another_connection_commits(
    make_manager: ManagerFactory, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    async with make_manager() as a, make_manager() as b:
        for sid in ("s1", "s2", "s3"):
            await a.ensure(sid, data={"n": 0})
        reads = _count_reads(a, monkeypatch)
        # Its own writes, flushes and checkpoints are no reason to look again.
        await a.set_data("s1", {"n": 1})
        assert await a.remove("s3")
        assert await a.update_activity("s2")
        await a.list_ids()  # flushes the touch
        await a.store.checkpoint()
        assert await a.refresh() == []
        # PostgreSQL has no commit counter: every refresh reads.
        assert reads[0] == (0 if backend == "sqlite" else 1)
        assert await b.remove("s2")
        assert await a.refresh() == ["s2"]
        assert await a.refresh() == []
        assert reads[0] == (1 if backend == "sqlite" else 3)
        assert await _data_and_version(a, "s1") == ({"n": 1}, 2)


async def test_refresh_reads_a_slice_at_a_time_and_reports_every_deletion(
    make_manager: ManagerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Slices of 4 here (2,048 by default): other tasks run between them, so a daemon
    # holding many sessions keeps serving while it looks.
    monkeypatch.setattr(manager_module, "_REFRESH_SLICE", 4)
    async with make_manager(max_concurrent_sessions=0) as a, make_manager() as b:
        heard: list[str] = []
        a.add_removal_listener(lambda sid, _why: heard.append(sid))
        ids = [f"s{i:02}" for i in range(10)]
        for sid in ids:
            await a.ensure(sid, data={"n": 1})
        for sid in ("s01", "s04", "s07"):  # one in each slice
            assert await b.remove(sid)
        await b.set_data("s09", {"n": 2})
        reads = _count_reads(a, monkeypatch)
        heard_meanwhile: list[int] = []

        async def beside() -> None:
            while True:
                heard_meanwhile.append(len(heard))
                await asyncio.sleep(0)

        task = asyncio.create_task(beside())
        try:
            assert await a.refresh() == ["s01", "s04", "s07"]
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert reads[0] == 3
        assert heard == ["s01", "s04", "s07"]
        assert any(0 < n < 3 for n in heard_meanwhile), heard_meanwhile
        for sid in ids:
            got = await a.get(sid)
            assert (got is None) == (sid in heard)
        got = await a.get("s09")
        assert got is not None
        assert got.data == {"n": 2}


async def test_a_write_of_ours_during_a_refresh_cannot_hide_a_stale_fill_from_the_next(
    make_manager: ManagerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A refresh is part-way through its slices; a cache miss reads X; our own remove
    # of X commits before that read lands in the cache. The read caches nothing (a
    # row deleted here since the read began is absent), and the refresh still does
    # not vouch for the cache: our commits do not move the change marker, and a write
    # of ours during a fill is what could leave a stale copy behind.
    monkeypatch.setattr(manager_module, "_REFRESH_SLICE", 1)
    async with make_manager(max_concurrent_sessions=0) as a, make_manager() as b:
        for i in range(3):
            await a.ensure(f"c{i}")
        await b.ensure("X")  # another connection commits: the refresh reads
        real_fetch, real_heads = a.store.fetch_many, a.store.fetch_heads
        in_slices, slices_go_on = asyncio.Event(), asyncio.Event()
        fill_read, fill_go_on = asyncio.Event(), asyncio.Event()

        async def fill_held(session_ids: list[str]) -> list[SessionRow]:
            rows = await real_fetch(session_ids)
            fill_read.set()
            await fill_go_on.wait()
            return rows

        async def slice_held(session_ids: list[str]) -> list[tuple[str, float, float, int]]:
            heads = await real_heads(session_ids)
            in_slices.set()
            await slices_go_on.wait()
            return heads

        monkeypatch.setattr(a.store, "fetch_many", fill_held)
        monkeypatch.setattr(a.store, "fetch_heads", slice_held)
        refreshing = asyncio.create_task(a.refresh())
        await in_slices.wait()
        getting = asyncio.create_task(a.get("X"))
        await fill_read.wait()
        assert await a.remove("X")
        fill_go_on.set()
        assert await getting is None  # read before the remove, and not cached
        slices_go_on.set()
        assert await refreshing == []
        monkeypatch.setattr(a.store, "fetch_heads", real_heads)
        reads = _count_reads(a, monkeypatch)
        assert await a.refresh() == []
        assert reads[0] > 0  # looked again: the refresh during the remove vouched for nothing
        assert await a.get("X") is None


@pytest.mark.parametrize("cut", ["cancelled", "aclose"])
async def test_a_refresh_cut_short_vouches_for_nothing_and_says_why(
    make_manager: ManagerFactory, monkeypatch: pytest.MonkeyPatch, cut: str
) -> None:
    monkeypatch.setattr(manager_module, "_REFRESH_SLICE", 2)
    async with make_manager(max_concurrent_sessions=0) as a, make_manager() as b:
        for sid in ("s0", "s1", "s2", "s3"):
            await a.ensure(sid)
        assert await b.remove("s3")  # in the second slice
        read_done, go_on = _hold_next_read(a, monkeypatch)
        refreshing = asyncio.create_task(a.refresh())
        await read_done.wait()  # the first slice has read
        if cut == "cancelled":
            refreshing.cancel()
            with pytest.raises(asyncio.CancelledError):
                await refreshing
            assert await a.refresh() == ["s3"]  # it vouched for nothing
            assert await a.get("s3") is None
        else:
            await a.aclose()
            go_on.set()
            with pytest.raises(ManagerClosedError):
                await refreshing


async def test_refreshing_some_sessions_does_not_vouch_for_the_others(
    make_manager: ManagerFactory,
) -> None:
    # The daemon re-reads its attached sessions often and every cached one seldom: a
    # change elsewhere seen by the first must still reach the second.
    async with make_manager() as a, make_manager() as b:
        await a.ensure("attached")
        await a.ensure("idle")
        assert await b.remove("idle")
        assert await a.refresh(["attached"]) == []
        assert await a.refresh() == ["idle"]
        assert await a.get("idle") is None


async def test_a_read_begun_before_a_refresh_cannot_hide_a_change_from_the_next(
    make_manager: ManagerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A cache miss reads the old row; another process changes it; a full refresh runs
    # before the old row lands in the cache. The next refresh must still look.
    async with make_manager() as a, make_manager() as b:
        await b.ensure("x", data={"v": 1})
        read_done, go_on = _hold_next_read(a, monkeypatch)
        getting = asyncio.create_task(a.get("x"))
        await read_done.wait()
        await b.set_data("x", {"v": 2})
        assert await a.refresh() == []  # x is not cached yet
        go_on.set()
        stale = await getting
        assert stale is not None
        assert stale.data == {"v": 1}  # its read began before the change
        assert await a.refresh() == []
        assert await _data_and_version(a, "x") == ({"v": 2}, 2)


async def test_a_read_joined_while_it_runs_cannot_hide_a_change_from_the_next_refresh(
    make_manager: ManagerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One caller's cache miss starts a read and gives up; another process changes the
    # row; a refresh takes its marker; a second caller joins the same read and caches
    # the old row. A read in flight is counted as such, whoever waits for it.
    async with make_manager() as a, make_manager() as b:
        await b.ensure("x", data={"v": 1})
        assert await a.refresh() == []  # a's marker is current
        read_done, go_on = _hold_next_read(a, monkeypatch)
        first = asyncio.create_task(a.get("x"))
        await read_done.wait()
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        await b.set_data("x", {"v": 2})
        real_marker = a.store.change_marker
        marked = asyncio.Event()

        async def marker_then_signal() -> object | None:
            marker = await real_marker()
            marked.set()  # the refresh goes on at once: judges its marker, takes its ids
            return marker

        monkeypatch.setattr(a.store, "change_marker", marker_then_signal)
        refreshing = asyncio.create_task(a.refresh())
        await marked.wait()
        joined = asyncio.create_task(a.get("x"))  # joins the read still in flight
        assert await refreshing == []
        monkeypatch.setattr(a.store, "change_marker", real_marker)
        go_on.set()
        stale = await joined
        assert stale is not None
        assert stale.data == {"v": 1}
        assert await a.refresh() == []
        got = await a.get("x")
        assert got is not None
        assert got.data == {"v": 2}


async def test_get_or_create_does_not_resurrect_a_session_removed_in_the_same_batch(
    make_manager: ManagerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # [ensure x, ensure x, remove x] commit together: the second ensure's caller wakes
    # after the remove has been applied and must not cache x again.
    async with make_manager() as m:
        writer = m._writer
        assert writer is not None
        real_write = m.store.write
        gate = asyncio.Event()
        first = [True]

        async def first_write_held(work: Any, **options: Any) -> Any:
            if first[0]:
                first[0] = False
                await gate.wait()
            return await real_write(work, **options)

        monkeypatch.setattr(m.store, "write", first_write_held)
        busy = asyncio.create_task(m.ensure("y"))

        async def held() -> bool:  # the writer's first transaction waits at the gate
            return not first[0]

        async def queued(n: int) -> bool:
            return len(writer._queue) >= n

        await wait_until(held)
        creates = [asyncio.create_task(m.ensure("x")) for _ in range(2)]
        await wait_until(lambda: queued(2))
        removing = asyncio.create_task(m.remove("x"))
        await wait_until(lambda: queued(3))
        gate.set()
        made, again = await asyncio.gather(*creates)
        assert await removing is True
        await busy
        assert made.session_id == again.session_id == "x"
        assert await m.get("x") is None


async def _read_held_while(
    m: SessionManager,
    monkeypatch: pytest.MonkeyPatch,
    read: Awaitable[T],
    meanwhile: Callable[[], Awaitable[None]],
    reads: tuple[str, ...] = ("fetch_many",),
) -> T:
    """Run ``read`` (a cache miss), and ``meanwhile()`` once its database read is done
    and before its result goes on; what ``read`` returned."""
    read_done, go_on = _hold_next_read(m, monkeypatch, reads=reads)
    reading = asyncio.ensure_future(read)
    await read_done.wait()
    try:
        await meanwhile()
    finally:
        go_on.set()
    return await reading


@pytest.mark.parametrize("joined", [False, True], ids=["the read", "a get joining it"])
async def test_a_cache_miss_overtaken_by_our_remove_does_not_cache_the_session(
    make_manager: ManagerFactory, monkeypatch: pytest.MonkeyPatch, joined: bool
) -> None:
    # Found by review: the read of a cold get() saw the row, remove() committed and
    # returned True, and the read's row went into the cache: get() served the removed
    # session until the next refresh (for ever without one). A get() made after the
    # remove returned joins the read in flight, which began before it.
    async with make_manager(session_timeout_secs=60) as m:
        await m.ensure("s")
    async with make_manager(session_timeout_secs=60) as m:  # a cold cache
        late: list[asyncio.Future[Session | None]] = []

        async def remove() -> None:
            assert await m.remove("s") is True
            if joined:
                late.append(asyncio.ensure_future(m.get("s")))
                await asyncio.sleep(0)  # it joins the read in flight

        await _read_held_while(m, monkeypatch, m.get("s"), remove)
        if joined:
            assert await late[0] is None
        assert await m.get("s") is None
        assert await m.ensure("s", data={"new": True}) is not None  # a new one, not the old
        assert (await m.get("s")).data == {"new": True}  # type: ignore[union-attr]


async def test_a_cache_miss_overtaken_by_our_remove_and_create_never_serves_the_old_one(
    make_manager: ManagerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with make_manager(session_timeout_secs=60) as m:
        await m.ensure("s", data={"n": "old"})
    async with make_manager(session_timeout_secs=60) as m:
        created: list[asyncio.Future[Session]] = []

        async def replace() -> None:
            assert await m.remove("s") is True
            # Its own look-up joins the held read: it creates once that is done.
            created.append(asyncio.ensure_future(m.ensure("s", data={"n": "new"})))
            await asyncio.sleep(0)

        got = await _read_held_while(m, monkeypatch, m.get("s"), replace)
        assert got is None or got.data == {"n": "new"}
        assert (await created[0]).data == {"n": "new"}
        assert (await m.get("s")).data == {"n": "new"}  # type: ignore[union-attr]


async def test_a_resume_overtaken_by_our_remove_says_revoked_and_caches_nothing(
    make_manager: ManagerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with make_manager(session_timeout_secs=60) as m:
        await m.ensure("s")
        token = await m.issue_token("s")
    async with make_manager(session_timeout_secs=60) as m:

        async def remove() -> None:
            assert await m.remove("s") is True

        result = await _read_held_while(
            m, monkeypatch, m.resume(token), remove, reads=("resume_lookup",)
        )
        assert (result.session, result.reason) == (None, "revoked")
        assert await m.get("s") is None


async def test_the_session_limit_counts_activity_another_manager_has_not_written(
    make_manager: ManagerFactory, clock: ManualClock
) -> None:
    # Found by review: the limit counted rows by their stored activity only, and b's
    # sessions, live by b's activity held in memory, looked expired in the rows: a
    # created two more, four sessions live under a limit of two.
    options: dict[str, Any] = {
        "session_timeout_secs": 60,
        "max_concurrent_sessions": 2,
        "flush_interval_secs": 1,
    }
    async with make_manager(**options) as b, make_manager(**options) as a:
        kept = [(await b.ensure()).session_id for _ in range(2)]
        clock.advance(59.5)
        for sid in kept:
            assert await b.update_activity(sid)  # written within the flush interval
        clock.advance(0.6)  # live by b's memory, expired by the rows
        with pytest.raises(SessionLimitError):
            await a.ensure()
        with pytest.raises(SessionLimitError):
            await a.ensure("named")
        await b.list_ids()  # b writes its activity
        assert (await a.get_session_metrics())["active_sessions"] == 2
        clock.advance(60.0)  # idle 60.6 s: expired, and within the grace still counted
        with pytest.raises(SessionLimitError):
            await a.ensure()
        clock.advance(1.0)  # past the grace as well: they no longer count
        assert (await a.ensure()).session_id


@contextlib.asynccontextmanager
async def _writers_lock_held(database: str, backend: str) -> AsyncIterator[None]:
    """Another connection holds what every writer of the database waits for: SQLite's
    write lock, PostgreSQL's writers' advisory lock."""
    if backend == "sqlite":
        other = sqlite3.connect(database, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            other.rollback()
            other.close()
        return
    import asyncpg

    url = make_url(database)
    conn = await asyncpg.connect(
        host=url.host, port=url.port or 5432, user=url.username, database=url.database
    )
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(24149)")  # 0x5E55, the store's
            yield
    finally:
        await conn.close()


async def test_a_write_waits_busy_timeout_for_a_lock_held_elsewhere_then_fails(
    make_manager: ManagerFactory, database: str, backend: str
) -> None:
    # Found by review: on PostgreSQL a write waited for ever for the advisory lock.
    async with make_manager(busy_timeout_ms=200) as m:
        await m.ensure("s")
        async with _writers_lock_held(database, backend):
            started = time.perf_counter()
            with pytest.raises(StorageBusyError):
                await asyncio.wait_for(m.set_data("s", {"n": 1}), 30)
            assert time.perf_counter() - started < 5
        assert (await m.set_data("s", {"n": 2})).version == 2  # and writes go on after


def test_delete_marks_live_only_while_a_read_that_predates_them_runs() -> None:
    # Found by review: the marks were dropped only once no read at all ran, so under
    # overlapping cache misses (a busy daemon) every id ever deleted stayed marked.
    fills = manager_module._Fills()
    first = fills.reading()
    before = first.__enter__()
    fills.deleted(["a", "b"], "revoked")
    second = fills.reading()
    after = second.__enter__()
    assert fills.overtaken("a", before) == "revoked"
    assert fills.overtaken("a", after) is None
    first.__exit__(None, None, None)  # the only read older than the marks is over
    assert fills.gone == {}
    fills.deleted(["c"], "expired")
    third = fills.reading()
    third.__enter__()
    second.__exit__(None, None, None)  # "c" was deleted after the second began...
    assert fills.gone == {}  # ...and the third, still running, began after "c"
    fills.deleted(["d"], "revoked")
    assert fills.overtaken("d", after) == "revoked"
    third.__exit__(None, None, None)
    assert (fills.running, fills.gone) == (0, {})


async def test_remove_of_a_session_another_manager_holds_live_says_true(
    make_manager: ManagerFactory, clock: ManualClock
) -> None:
    # Found by review: a's activity for s is unwritten (within its flush interval), so
    # the row looks expired; b's remove() deleted it all the same, said False and
    # tombstoned it "expired". Live as the session limit counts it: True, "revoked".
    options: dict[str, Any] = {"session_timeout_secs": 60, "flush_interval_secs": 30}
    async with make_manager(**options) as a, make_manager(**options) as b:
        sid = (await a.ensure()).session_id
        token = await a.issue_token(sid)
        clock.advance(50)
        assert await a.update_activity(sid)  # in a's memory only
        clock.advance(15)  # the row looks expired for 5 s; the session is live in a
        assert await b.remove(sid) is True
        assert (await b.resume(token)).reason == "revoked"


async def test_a_busy_timeout_beyond_what_postgresql_takes_still_works(
    make_manager: ManagerFactory,
) -> None:
    # Found by review: lock_timeout takes at most 2**31 - 1 ms, and every connection failed.
    async with make_manager(busy_timeout_ms=2**31) as m:
        assert (await m.ensure("s")).session_id == "s"


def test_delete_marks_agree_with_marks_never_dropped() -> None:
    # Reads begin and end in any order, with deletes (and ids deleted again) between:
    # for every read still running, the pruned marks answer as marks kept for ever.
    rng = random.Random(20261125)
    for _ in range(300):
        fills = manager_module._Fills()
        kept: dict[str, tuple[int, str]] = {}
        running: list[tuple[Any, int]] = []
        for _step in range(40):
            roll = rng.random()
            if roll < 0.35:
                reading = fills.reading()
                running.append((reading, reading.__enter__()))
            elif roll < 0.7 and running:
                reading, _since = running.pop(rng.randrange(len(running)))
                reading.__exit__(None, None, None)
            else:
                ids = rng.sample("abcdef", rng.randint(1, 3))
                grave = rng.choice(["revoked", "expired"])
                fills.deleted(ids, grave)
                if fills.running:
                    kept.update((sid, (fills.epoch, grave)) for sid in ids)
            for _reading, since in running:
                for sid in "abcdef":
                    mark = kept.get(sid)
                    expected = mark[1] if mark is not None and mark[0] > since else None
                    assert fills.overtaken(sid, since) == expected
        assert len(fills.gone) <= 6


def test_ending_many_overlapping_reads_takes_time_in_proportion() -> None:
    # Found by review: each end scanned every running read and rebuilt the marks;
    # 16,000 overlapping reads with a delete between their starts took 7 s to end.
    fills = manager_module._Fills()
    readings = []
    for i in range(16_000):
        reading = fills.reading()
        reading.__enter__()
        readings.append(reading)
        fills.deleted([f"s{i}"], "revoked")
    started = time.perf_counter()
    for reading in readings:
        reading.__exit__(None, None, None)
    assert time.perf_counter() - started < 1.0
    assert (fills.running, fills.gone) == (0, {})
