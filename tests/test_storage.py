"""Files that are not ours, or not databases, are refused and left untouched."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection

import sessionstore.store as store_module
from sessionstore import (
    DatabaseCorruptError,
    ForeignDatabaseError,
    SessionManager,
    StorageError,
)
from sessionstore.session import new_session_id
from sessionstore.store import SessionStore
from tests.conftest import ManagerFactory
from tests.helpers import ManualClock, scribble_pages, wait_until


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def _refused_untouched(db_path: Path, error: type[Exception], match: str) -> str:
    """Start a manager on the file: it must raise ``error`` naming the path, and write nothing."""
    before = _sha(db_path)
    with pytest.raises(error, match=match) as info:
        await SessionManager(str(db_path)).start()
    assert str(db_path) in str(info.value)
    assert _sha(db_path) == before
    return str(info.value)


async def test_text_file_is_refused_untouched(db_path: Path) -> None:
    db_path.write_text("these are my notes, not a database\n" * 20)
    message = await _refused_untouched(db_path, DatabaseCorruptError, "not a SQLite database")
    assert "\n" not in message
    assert sorted(p.name for p in db_path.parent.iterdir()) == [db_path.name]


async def test_foreign_sqlite_database_is_refused_not_stamped(db_path: Path) -> None:
    with sqlite3.connect(db_path) as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
        conn.execute("INSERT INTO invoices VALUES (1, 9.5)")
    conn.close()
    await _refused_untouched(db_path, ForeignDatabaseError, "invoices")


async def test_corrupted_page_is_refused_untouched(
    make_manager: ManagerFactory, db_path: Path
) -> None:
    async with make_manager(max_concurrent_sessions=0) as m:
        for _ in range(300):
            await m.ensure(data={"pad": "x" * 300})
    scribble_pages(db_path)
    await _refused_untouched(db_path, DatabaseCorruptError, "corrupt")


async def test_zero_length_file_is_a_new_empty_database(
    make_manager: ManagerFactory, db_path: Path
) -> None:
    db_path.touch()
    async with make_manager() as m:
        await m.ensure("first")
        assert await m.list_ids() == ["first"]


async def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    target = tmp_path / "no" / "such" / "dir" / "s.db"
    with pytest.raises(StorageError, match="does not exist"):
        await SessionManager(str(target)).start()
    assert not (tmp_path / "no").exists()


async def test_database_files_are_private(make_manager: ManagerFactory, db_path: Path) -> None:
    async with make_manager() as m:
        await m.ensure()
        files = sorted(db_path.parent.glob(db_path.name + "*"))
        assert {f.name for f in files} >= {"sessions.db", "sessions.db-wal", "sessions.db-shm"}
        for f in files:
            assert (f.stat().st_mode & 0o777) == 0o600, f


async def test_pragmas_are_in_force(manager: SessionManager) -> None:
    async with manager.store.reader.connect() as conn:

        async def pragma(name: str) -> object:
            return (await conn.exec_driver_sql(f"PRAGMA {name}")).scalar_one()

        assert await pragma("journal_mode") == "wal"
        assert await pragma("synchronous") == 2  # FULL
        assert await pragma("busy_timeout") == 5000
        assert await pragma("foreign_keys") == 1


async def test_new_rows_land_whole_in_statements_the_connection_allows(
    manager: SessionManager, db_path: Path
) -> None:
    # New sessions go in as multi-row INSERTs of up to 256 rows (1,280 parameters);
    # a connection that allows fewer (SQLite before 3.32 allowed 999) gets smaller ones.
    def insert(max_params: int, rows: list[tuple[str, float, float, str, int]]) -> Any:
        def work(conn: Connection) -> int:
            dbapi = conn.connection.driver_connection
            assert isinstance(dbapi, sqlite3.Connection)
            before = dbapi.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, max_params)
            try:
                return SessionStore.insert_new(conn, rows, cutoff=0.0, limit=0)
            finally:
                dbapi.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, before)

        return work

    expected: list[tuple[str, float, float, str, int]] = []
    now = manager.now()  # live rows: the manager's own cleanup leaves them alone
    for max_params in (5, 12, 999, 32766):  # rising: the driver caches what it prepared
        for count in (1, 3, 255, 256, 300, 2000):
            rows = [
                (new_session_id(), now - 0.002 * i, now - 0.001 * i, f'{{"n":{i}}}', 1)
                for i in range(count)
            ]
            assert await manager.store.write(insert(max_params, rows)) == count
            expected += rows
    # A statement that fails (here a repeated id in its last row) takes the whole
    # transaction with it: none of the rows before it, in its statement or earlier
    # ones, stays.
    clash = [(new_session_id(), now, now, "{}", 1) for _ in range(299)]
    clash.append(clash[0])
    with pytest.raises(StorageError):
        await manager.store.write(insert(32766, clash))
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        stored = conn.execute(
            "SELECT session_id, created_at, last_activity, data, version FROM sessions"
        ).fetchall()
    assert sorted(stored) == sorted(expected)


async def test_synchronous_normal_is_an_option(make_manager: ManagerFactory) -> None:
    async with make_manager(synchronous="normal") as m, m.store.reader.connect() as conn:
        assert (await conn.exec_driver_sql("PRAGMA synchronous")).scalar_one() == 1


async def test_readable_view_shows_iso_times_and_idle(
    manager: SessionManager, db_path: Path
) -> None:
    await manager.ensure("v")
    with sqlite3.connect(db_path) as conn:
        row = conn.execute(
            "SELECT session_id, created_utc, last_activity_utc, idle_secs, version "
            "FROM sessions_readable"
        ).fetchone()
    conn.close()
    assert row[0] == "v"
    assert row[1] == "2025-06-15T15:06:40.000Z"  # the manual clock's start
    assert row[2] == row[1]
    assert row[3] > 0
    assert row[4] == 1


async def _autocheckpoint_pages(m: SessionManager) -> int:
    async with m.store.engine.connect() as conn:
        return int((await conn.exec_driver_sql("PRAGMA wal_autocheckpoint")).scalar_one())


async def test_light_writes_are_checkpointed_in_the_background_not_inside_commits(
    make_manager: ManagerFactory, db_path: Path
) -> None:
    # Its first run comes 2 s after the migration's commit at open: the 300 creates
    # below take milliseconds.
    async with make_manager(db_path, max_concurrent_sessions=0, checkpoint_interval_secs=2) as m:
        empty = db_path.stat().st_size
        # About 150 pages, below the 1,000 at which a commit checkpoints the WAL itself.
        await asyncio.gather(*(m.ensure(data={"pad": "x" * 1000}) for _ in range(300)))
        assert db_path.stat().st_size == empty  # in the WAL, not yet in the file

        async def copied_into_the_file() -> bool:
            return db_path.stat().st_size > empty + 300_000

        await wait_until(copied_into_the_file)  # the background checkpoint did it
        in_wal, copied = await m.store.checkpoint()
        assert copied == in_wal  # nothing was left behind
    assert not Path(f"{db_path}-wal").exists()


@pytest.mark.parametrize("interval", [0, 3600])
async def test_heavy_writes_are_checkpointed_by_the_commit_that_passes_1000_pages(
    make_manager: ManagerFactory, db_path: Path, interval: float
) -> None:
    # Whether or not the background checkpoint runs (it does not here: an hour), the
    # WAL stays near 1,000 pages (4 MB): each stall the writer pays is that small.
    wal = Path(f"{db_path}-wal")
    async with make_manager(
        db_path, max_concurrent_sessions=0, checkpoint_interval_secs=interval
    ) as m:
        assert await _autocheckpoint_pages(m) == 1000
        empty, largest = db_path.stat().st_size, 0
        for _ in range(15):  # about 12 MB of sessions, 3,000 pages
            await asyncio.gather(*(m.ensure(data={"pad": "x" * 4000}) for _ in range(200)))
            largest = max(largest, wal.stat().st_size)
        assert db_path.stat().st_size > empty + 8_000_000  # copied by the commits
    assert largest < 8_000_000, f"the WAL reached {largest / 1e6:.1f} MB"


def _synchronous(conn: Connection) -> int:
    return int(conn.exec_driver_sql("PRAGMA synchronous").scalar_one())


async def test_a_non_durable_write_leaves_the_connection_durable_even_when_it_fails(
    manager: SessionManager,
) -> None:
    store = manager.store

    def fails(conn: Connection) -> None:
        assert _synchronous(conn) == 1  # NORMAL inside
        conn.exec_driver_sql(
            "INSERT INTO sessions (session_id, created_at, last_activity) VALUES ('half', 1, 1)"
        )
        raise ValueError("the work failed")

    with pytest.raises(ValueError, match="the work failed"):
        await store.write(fails, durable=False)
    assert await store.write(_synchronous) == 2  # FULL again on the same connection
    assert await store.write(_synchronous, durable=False) == 1
    assert await store.write(_synchronous) == 2
    assert await store.fetch("half") is None  # rolled back


async def test_a_connection_that_cannot_be_made_durable_again_is_replaced(
    manager: SessionManager,
) -> None:
    store = manager.store
    before: list[object] = []

    def refuses_the_restore(conn: Connection) -> None:
        dbapi = conn.connection.dbapi_connection
        assert dbapi is not None
        before.append(dbapi)

        def authorizer(action: int, arg1: str | None, arg2: str | None, *_: object) -> int:
            if action == sqlite3.SQLITE_PRAGMA and arg1 == "synchronous" and arg2:
                return sqlite3.SQLITE_DENY if arg2.upper() != "NORMAL" else sqlite3.SQLITE_OK
            return sqlite3.SQLITE_OK

        dbapi.set_authorizer(authorizer)  # the restore after the commit will be refused
        conn.exec_driver_sql(
            "INSERT INTO sessions (session_id, created_at, last_activity) "
            "VALUES ('kept', 1e12, 1e12)"  # in the future: no cleanup deletes it
        )

    await store.write(refuses_the_restore, durable=False)  # committed all the same
    row = await store.fetch("kept")
    assert row is not None

    def which(conn: Connection) -> tuple[object, int]:
        return conn.connection.dbapi_connection, _synchronous(conn)

    connection, synchronous = await store.write(which)
    assert synchronous == 2  # FULL: the connection left at NORMAL was dropped
    assert connection is not before[0]


async def test_a_commit_that_fails_leaves_no_transaction_open(
    manager: SessionManager, db_path: Path
) -> None:
    # A COMMIT that SQLite refuses (here a deferred foreign key) leaves the transaction
    # open on the connection; the writer's next transaction must not find it there.
    def refused_at_commit(conn: Connection) -> None:
        conn.exec_driver_sql("CREATE TEMP TABLE parent (id INTEGER PRIMARY KEY)")
        conn.exec_driver_sql(
            "CREATE TEMP TABLE child (p INTEGER REFERENCES parent (id) "
            "DEFERRABLE INITIALLY DEFERRED)"
        )
        conn.exec_driver_sql("INSERT INTO child VALUES (1)")
        conn.exec_driver_sql(
            "INSERT INTO sessions (session_id, created_at, last_activity) "
            "VALUES ('lost', 1e12, 1e12)"
        )

    with pytest.raises(StorageError, match="FOREIGN KEY"):
        await manager.store.write(refused_at_commit)
    kept = await manager.ensure("kept")  # the next transaction begins and commits
    assert kept.session_id == "kept"
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        ids = {sid for (sid,) in conn.execute("SELECT session_id FROM sessions")}
    assert "kept" in ids
    assert "lost" not in ids


async def test_a_write_refused_by_another_writer_s_lock_does_not_break_the_next(
    make_manager: ManagerFactory, db_path: Path
) -> None:
    async with make_manager(busy_timeout_ms=50) as m:
        blocker = sqlite3.connect(db_path, isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
            with pytest.raises(StorageError, match="locked"):
                await m.ensure("refused")
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert (await m.ensure("after")).session_id == "after"
        assert await m.get("refused") is None


async def test_a_write_handed_to_the_thread_before_close_still_commits(
    make_manager: ManagerFactory, db_path: Path
) -> None:
    # A cancelled caller does not stop its write (the row ends old or new, never half);
    # closing the store right then must not make that write fail for want of an engine.
    async with make_manager() as m:
        store = m.store
        started, release = threading.Event(), threading.Event()

        def held(conn: Connection) -> None:
            started.set()
            release.wait(10)

        def late(conn: Connection) -> None:
            conn.exec_driver_sql(
                "INSERT INTO sessions (session_id, created_at, last_activity) "
                "VALUES ('late', 1e12, 1e12)"
            )

        async def holding() -> bool:
            return started.is_set()

        async def tearing_down() -> bool:  # past the point where it waits for nothing
            return store._write_thread is None

        first = asyncio.create_task(store.write(held))
        await wait_until(holding)
        second = asyncio.create_task(store.write(late))
        await asyncio.sleep(0)  # its first step hands the work to the thread
        second.cancel()
        closing = asyncio.create_task(store.close())
        await wait_until(tearing_down)
        release.set()
        await first
        await closing
        with pytest.raises(asyncio.CancelledError):
            await second
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        assert conn.execute(
            "SELECT count(*) FROM sessions WHERE session_id = 'late'"
        ).fetchone() == (1,)


async def test_a_new_file_another_process_is_writing_to_still_opens(
    make_manager: ManagerFactory, db_path: Path
) -> None:
    # Two processes creating the same new database: while one holds the write lock of
    # the file (not yet in WAL mode), SQLite refuses the other's switch to WAL at once,
    # without waiting busy_timeout. Seen as "database is locked" at start-up.
    blocker = sqlite3.connect(db_path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # the other process, mid-transaction
        loop = asyncio.get_running_loop()
        loop.call_later(0.2, blocker.execute, "ROLLBACK")  # ... which then finishes
        async with make_manager() as m:
            assert (await m.ensure("s")).session_id == "s"
            async with m.store.reader.connect() as conn:
                mode = (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar_one()
            assert mode == "wal"
    finally:
        blocker.close()


async def test_a_driver_error_without_a_known_name_is_still_a_storage_error(
    manager: SessionManager, db_path: Path, clock: ManualClock
) -> None:
    # The cleanup statements run on the driver's own cursor, outside SQLAlchemy's
    # error wrapping: their errors must still arrive as the package's own.
    await manager.ensure("x")
    with sqlite3.connect(db_path) as other:
        other.execute("DROP VIEW sessions_readable")
        other.execute("DROP TABLE sessions")
    clock.advance(61)
    with pytest.raises(StorageError, match="no such table"):
        await manager.cleanup_stale_sessions()


async def test_a_closed_store_refuses_statements(make_manager: ManagerFactory) -> None:
    m = make_manager()
    async with m:
        await m.ensure("a")
    with pytest.raises(StorageError, match="closed"):
        await m.store.fetch("a")
    with pytest.raises(StorageError, match="already open"):
        await m.store.open()


async def test_a_cancelled_close_still_finishes_and_later_closes_wait_for_it(
    make_manager: ManagerFactory, tmp_path: Path
) -> None:
    for steps in range(0, 40, 3):  # the cancel lands at a different point each time
        db = tmp_path / f"s{steps}.db"
        async with make_manager(db) as m:
            await m.ensure("a")
            first = asyncio.ensure_future(m.store.close())
            for _ in range(steps):
                await asyncio.sleep(0)
            first.cancel()
            await m.store.close()  # returns only once the teardown is complete
            assert not Path(f"{db}-wal").exists(), f"a connection is still open ({steps=})"


async def test_the_wal_starts_over_under_writes_that_never_pause(
    make_manager: ManagerFactory, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A PASSIVE checkpoint on another connection never finishes while commits keep
    # landing; the commits' own checkpoints (SQLite's 1,000-page rule) keep the WAL
    # from growing with everything written. (RESTART, tried here too past 250 pages,
    # is for a WAL that a reader pinned: the next test.)
    monkeypatch.setattr(store_module, "_RESTART_PAGES", 250)
    wal = Path(f"{db_path}-wal")
    largest = 0
    async with make_manager(db_path, max_concurrent_sessions=0, checkpoint_interval_secs=0.01) as m:
        for _ in range(30):  # about 25 MB of sessions, written back to back
            await asyncio.gather(*(m.ensure(data={"pad": "x" * 3000}) for _ in range(200)))
            largest = max(largest, wal.stat().st_size)
    assert largest < 8_000_000, f"the WAL reached {largest / 1e6:.1f} MB"


async def test_a_long_reader_does_not_stall_writes_behind_a_restart_checkpoint(
    make_manager: ManagerFactory,
    db_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # An operator's long read (the sqlite3 CLI, a backup) pins the WAL. A RESTART
    # checkpoint holds the write lock while it waits for readers: it must give up soon
    # rather than hold every write for the whole busy timeout.
    caplog.set_level(logging.INFO, logger=store_module.log.name)
    monkeypatch.setattr(store_module, "_RESTART_PAGES", 250)
    # With the reader pinning its snapshot, PASSIVE checkpoints fall ever further
    # behind; let RESTART be tried anyway, which is what could stall the writes.
    monkeypatch.setattr(store_module, "_RESTART_LEFT_PAGES", 10**9)
    async with make_manager(db_path, max_concurrent_sessions=0, checkpoint_interval_secs=0.01) as m:
        await asyncio.gather(*(m.ensure(data={"pad": "x" * 3000}) for _ in range(200)))
        reader = sqlite3.connect(db_path, isolation_level=None)
        try:
            reader.execute("BEGIN")
            reader.execute("SELECT count(*) FROM sessions").fetchone()  # holds its snapshot
            slowest = 0.0
            for _ in range(15):
                started = time.perf_counter()
                await asyncio.gather(*(m.ensure(data={"pad": "x" * 3000}) for _ in range(100)))
                slowest = max(slowest, time.perf_counter() - started)
        finally:
            reader.execute("ROLLBACK")
            reader.close()
    assert slowest < 2.0, f"a batch of writes took {slowest:.1f} s"
    assert "a reader keeps the WAL from starting over" in caplog.text  # it did try


async def test_a_restart_checkpoint_does_not_give_up_because_of_our_own_writes(
    make_manager: ManagerFactory, db_path: Path
) -> None:
    # Under writes that never pause, a RESTART that waited on this store's own writer
    # for the write lock gave up, and the next try came 10 s later while the WAL grew
    # (seen once in CI). It runs between this store's transactions instead, so only a
    # reader or another process can make it give up.
    async with make_manager(db_path, max_concurrent_sessions=0, checkpoint_interval_secs=0) as m:
        await asyncio.gather(*(m.ensure(data={"pad": "x" * 3000}) for _ in range(100)))
        inside, release = threading.Event(), threading.Event()

        def holds_the_write_lock(conn: Connection) -> None:
            conn.exec_driver_sql(
                "INSERT INTO sessions (session_id, created_at, last_activity) "
                "VALUES ('slow', 1e12, 1e12)"
            )
            inside.set()
            release.wait(0.2)  # ten times the RESTART's wait for the lock

        write = asyncio.ensure_future(m.store.write(holds_the_write_lock))
        await asyncio.to_thread(inside.wait, 5)
        restart = asyncio.ensure_future(m.store._checkpoint("RESTART"))
        await write
        release.set()
        busy, in_wal, copied = await restart
        assert not busy
        assert copied == in_wal  # everything copied: the next commit starts the WAL over
