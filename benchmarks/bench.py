#!/usr/bin/env python
"""sessionstore vs raw sqlite3 (the physical limit) vs Redis, side by side (issue 4).

Run ``python benchmarks/bench.py [--quick] [--json out.json] [--scenario NAME ...]``.
Every database lives in a temporary directory that is removed at the end; Redis is
used only when a server answers on ``REDIS_URL`` (default redis://127.0.0.1:6379/0),
under a key prefix of its own, and only those keys are ever deleted. sessionstore
also runs on PostgreSQL (issue 6) when a server answers on
``SESSIONSTORE_BENCH_POSTGRES_URL`` (default
postgresql+asyncpg://postgres@127.0.0.1:5432/test), in a database the run creates
with a random name and drops at the end (``--no-postgres`` skips it). The process
exits 0 whether or not a target is met (non-zero only when a scenario crashes).
See benchmarks/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import functools
import gc
import importlib
import json
import logging
import operator
import os
import platform
import pstats
import secrets
import shutil
import signal
import sqlite3
import statistics
import sys
import tempfile
import time
import traceback
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

from sqlalchemy.engine import URL, make_url

import sessionstore
from sessionstore import SessionManager, new_session_id
from sessionstore.config import Settings
from sessionstore.store import dumps

try:
    import redis.asyncio as aioredis
except ImportError:  # the `bench` extra is not installed
    aioredis = None  # type: ignore[assignment]

asyncpg: Any
try:  # imported by name: asyncpg ships no type information
    asyncpg = importlib.import_module("asyncpg")
except ImportError:  # the `postgres` extra is not installed
    asyncpg = None

log = logging.getLogger("bench")

T = TypeVar("T")

#: Fixed epoch for every clock: the benchmark moves time instead of waiting.
BASE = 1_700_000_000.0
#: session_timeout_secs everywhere (30 days: longer than any row range below).
TIMEOUT = 30 * 86400.0
#: The 200-byte JSON object every session carries.
DATA: dict[str, str] = {"v": "x" * 192}
#: Compact JSON for the contenders that serialize per write: sessionstore's own encoder,
#: so that every contender does the same work per row. (``json.dumps`` with
#: ``separators`` builds a new encoder each call: 3 us here against 1 us, a fifth of
#: the raw insert's time per row.)
encode_data = dumps
DATA_TEXT = encode_data(DATA)
assert len(DATA_TEXT) == 200
INSERT_SQL = (
    "INSERT INTO sessions (session_id, created_at, last_activity, data, version) "
    "VALUES (?, ?, ?, ?, 1)"
)
TOUCH_SQL = "UPDATE sessions SET last_activity = ? WHERE session_id = ?"
CHUNK_DELETE_SQL = (
    "DELETE FROM sessions WHERE session_id IN "
    "(SELECT session_id FROM sessions WHERE last_activity < ? LIMIT ?)"
)
COLUMNS = "session_id, created_at, last_activity, data, version"
COLUMN_NAMES = ("session_id", "created_at", "last_activity", "data", "version")
DEFAULT_POSTGRES_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
SCENARIOS = ("create", "touch", "get", "cleanup", "restart", "latency", "memory", "stalls")


@dataclass(frozen=True)
class Sizes:
    """How big each scenario is (full run vs ``--quick``)."""

    duration: float  # seconds of each throughput measurement
    tasks: int  # concurrent tasks for the throughput scenarios
    latency_tasks: int  # concurrent ensure() callers during the big cleanup
    live: int  # live sessions for touch/get
    small: int  # rows of the small restart database
    big: int  # rows of the big database (cleanup, restart, latency)
    memory: int  # sessions for the memory figure
    repeats: int  # restart and cleanup measurements (median)
    cached: int  # sessions a manager holds for the event-loop stall figures


FULL = Sizes(3.0, 256, 16, 10_000, 10_000, 1_000_000, 50_000, 3, 100_000)
QUICK = Sizes(0.4, 256, 16, 2_000, 1_000, 20_000, 5_000, 3, 5_000)


class Clock:
    """A mutable clock injected into the manager: a float the benchmark moves.

    The manager gets :attr:`read`, which is C all the way down, as a daemon's
    ``time.time`` is: a Python ``__call__`` cost every create a frame (900 of its
    62,000 instructions) that no real clock charges.
    """

    def __init__(self, now: float) -> None:
        self._cell = [now]
        self.read = cast(Callable[[], float], functools.partial(operator.getitem, self._cell, 0))

    @property
    def now(self) -> float:
        """The time the manager reads."""
        return self._cell[0]

    @now.setter
    def now(self, value: float) -> None:
        self._cell[0] = value


@dataclass
class Row:
    """One line of the results table."""

    key: str
    label: str
    unit: str  # ops/s (higher is better) or s, ms, B (lower is better)
    ss: float | None
    raw: float | None
    redis: float | None
    note: str = ""
    pg: float | None = None  # sessionstore on PostgreSQL

    @property
    def ss_raw(self) -> float | None:
        """sessionstore's figure divided by raw sqlite3's."""
        return _ratio(self.ss, self.raw)

    @property
    def ss_redis(self) -> float | None:
        """sessionstore's figure divided by Redis's."""
        return _ratio(self.ss, self.redis)

    @property
    def pg_ss(self) -> float | None:
        """sessionstore on PostgreSQL divided by sessionstore on SQLite."""
        return _ratio(self.pg, self.ss)


@dataclass
class Target:
    """One target of issue 4 and whether this run met it."""

    name: str
    value: float | None
    op: str  # ">=" or "<="
    threshold: float
    unit: str  # "x" (a ratio) or "ms", "B"
    detail: str = ""
    #: "sqlite": issue 4's targets; "postgresql": the same bars applied to sessionstore
    #: on PostgreSQL, for information (issue 6 sets no targets of its own).
    backend: str = "sqlite"

    @property
    def status(self) -> str:
        """PASS, MISS, or SKIP (a contender was unavailable)."""
        if self.value is None:
            return "SKIP"
        ok = self.value >= self.threshold if self.op == ">=" else self.value <= self.threshold
        return "PASS" if ok else "MISS"

    @property
    def off_by(self) -> str:
        """How far from the threshold, as a factor."""
        if self.value is None or self.value == 0 or self.threshold == 0:
            return ""
        factor = self.threshold / self.value if self.op == ">=" else self.value / self.threshold
        return f"{factor:.2f}x short" if self.status == "MISS" else f"{1 / factor:.2f}x margin"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def new_id() -> str:
    """A session id made the way the manager makes it (time-ordered, 128 random bits)."""
    return new_session_id()


def fake_ids(n: int, created: Callable[[int], float]) -> list[str]:
    """``n`` ids made the way the manager makes them, row ``i`` created at ``created(i)``.

    The manager's ids sort by creation time, so the rows of a populated table lie in
    the primary-key index in the order their sessions were created, as they would
    in a database the manager had filled itself.
    """
    return [new_session_id(created(i)) for i in range(n)]


def new_rows(count: int) -> list[tuple[str, float, float, str]]:
    """INSERT parameters of ``count`` new sessions, stamped now, each one's data serialized."""
    now = time.time()
    return [(new_id(), now, now, encode_data(DATA)) for _ in range(count)]


@functools.lru_cache(maxsize=2)
def shared_ids(n: int) -> tuple[str, ...]:
    """The ids of the big table (row ``i`` created at BASE+i), made once per run.

    The big SQLite and PostgreSQL tables share them.
    """
    return tuple(fake_ids(n, lambda i: BASE + i))


def clock_for(n: int, expired_fraction: float) -> float:
    """The clock at which the first ``expired_fraction`` of a ``populate``d db expired.

    Row ``i`` has ``last_activity = BASE + i``; it is expired when that is earlier
    than ``now - TIMEOUT``.
    """
    return BASE + round(expired_fraction * n) + TIMEOUT


#: Settings given with ``--set NAME=VALUE``, applied to every manager the run makes.
OVERRIDES: dict[str, Any] = {}


def cleaning_clock_for(n: int, expired_fraction: float) -> float:
    """The clock at which sessionstore's cleanup deletes what :func:`clock_for` expires.

    Its cleanup deletes a row only once it has looked expired for longer than one
    flush interval (another process may hold activity for it not yet written), so
    its clock runs that much later; the raw contenders delete the same rows.
    """
    grace = float(OVERRIDES.get("flush_interval_secs", Settings.flush_interval_secs))
    return clock_for(n, expired_fraction) + grace


def make_manager(database: Path | str, clock: Clock, **options: Any) -> SessionManager:
    """A manager with no session limit and no periodic cleanup during a measurement.

    ``database`` is a SQLite file or a PostgreSQL URL (``synchronous`` is SQLite's
    pragma; the PostgreSQL store ignores it).
    """
    opts: dict[str, Any] = {
        "session_timeout_secs": TIMEOUT,
        "max_concurrent_sessions": 0,
        "cleanup_interval_secs": 3600.0,
        "synchronous": "FULL",
        **OVERRIDES,
    }
    opts.update(options)
    return SessionManager(str(database), clock=clock.read, **opts)


def profile_name(database: Path | str, name: str) -> str:
    """The ``--profile`` name of a sessionstore measurement: ``pg_`` first on PostgreSQL."""
    return name if isinstance(database, Path) else f"pg_{name}"


def parse_setting(text: str) -> tuple[str, Any]:
    """``NAME=VALUE`` from the command line; VALUE as JSON when it parses (numbers)."""
    name, sep, raw = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    return name.strip(), value


def copy_settled(source: Path, dest: Path) -> None:
    """Copy a database file and write the copy out before anything is measured on it.

    Copying the 300 MB database leaves that much dirty in the page cache; written back
    during a measurement, it slowed whichever contender came right after the copy.
    """
    shutil.copyfile(source, dest)
    with dest.open("rb+") as copy:
        os.fsync(copy.fileno())


def collected() -> None:
    """Collect garbage before a one-shot measurement of a few milliseconds.

    A full collection of this process's heap takes 40-60 ms; one that earlier work
    (set-up, another contender) made due would land in whichever short measurement
    happens to allocate next and triple it. Each such measurement, of every contender,
    starts with the collector at rest instead; the collector stays on.
    """
    gc.collect()


def raw_connect(path: Path) -> sqlite3.Connection:
    """A stdlib connection with sessionstore's durability: WAL, synchronous=FULL."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA busy_timeout = 5000")
    return conn


def populate(path: Path, ids: Sequence[str], last_activity: Callable[[int], float]) -> None:
    """Bulk-insert rows into a migrated database (indexes dropped and rebuilt).

    Written without syncing, then synced once at the end: otherwise the kernel writes
    the file back during whatever is measured next.
    """
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = OFF")
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("PRAGMA cache_size = -262144")
        indexes = conn.execute(
            "SELECT name, sql FROM sqlite_master "
            "WHERE type = 'index' AND tbl_name = 'sessions' AND sql IS NOT NULL"
        ).fetchall()
        for name, _sql in indexes:
            conn.execute(f'DROP INDEX "{name}"')
        conn.execute("BEGIN")
        conn.executemany(
            INSERT_SQL,
            ((sid, last_activity(i), last_activity(i), DATA_TEXT) for i, sid in enumerate(ids)),
        )
        conn.execute("COMMIT")
        for _name, sql in indexes:
            conn.execute(sql)
        conn.execute("PRAGMA journal_mode = WAL")
    finally:
        conn.close()
    with path.open("rb+") as written:
        os.fsync(written.fileno())


async def throughput(
    tasks: int, duration: float, op: Callable[[int, int], Awaitable[Any]]
) -> float:
    """Run ``op(task, i)`` from ``tasks`` tasks for ``duration`` seconds; ops/s.

    Each task yields to the event loop at least every 100 ops (a daemon awaits I/O
    between calls), so background work such as the writer's flush keeps running
    even when ``op`` never suspends.
    """
    loop = asyncio.get_running_loop()
    counts = [0] * tasks
    start = time.perf_counter()
    deadline = loop.time() + duration

    async def worker(k: int) -> None:
        i = 0
        while loop.time() < deadline:
            await op(k, i)
            i += 1
            if i % 100 == 0:
                await asyncio.sleep(0)
        counts[k] = i

    await asyncio.gather(*(worker(k) for k in range(tasks)))
    return sum(counts) / (time.perf_counter() - start)


async def fixed_work(
    tasks: int, items: Sequence[Any], op: Callable[[Any], Awaitable[Any]]
) -> float:
    """Run ``op`` once per item, items shared out over ``tasks`` tasks; ops/s."""
    start = time.perf_counter()

    async def worker(k: int) -> None:
        for item in items[k::tasks]:
            await op(item)

    await asyncio.gather(*(worker(k) for k in range(tasks)))
    return len(items) / (time.perf_counter() - start)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0..1) by nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


class RedisSide:
    """The Redis contender: one client, a key prefix of its own, its keys tracked."""

    def __init__(self, client: Any, url: str) -> None:
        self.client = client
        self.url = url
        self.prefix = f"ssb{secrets.token_hex(3)}:"
        self.info: dict[str, Any] = {}

    def key(self, session_id: str) -> str:
        """The Redis key of a session id."""
        return self.prefix + session_id

    async def set_many(self, keys: Sequence[str], ttl: float | None = TIMEOUT) -> None:
        """Store the session value under every key (pipelined, 1,000 at a time)."""
        for start in range(0, len(keys), 1000):
            chunk = keys[start : start + 1000]
            if ttl is None:
                await self.client.mset(dict.fromkeys(chunk, DATA_TEXT))
                continue
            pipe = self.client.pipeline(transaction=False)
            for key in chunk:
                pipe.set(key, DATA_TEXT, ex=int(ttl))
            await pipe.execute()

    async def delete(self, keys: Sequence[str]) -> None:
        """Delete these keys (all ours), 1,000 per DEL."""
        for start in range(0, len(keys), 1000):
            await self.client.delete(*keys[start : start + 1000])

    async def delete_all_ours(self) -> None:
        """Delete every key under our prefix (and nothing else)."""
        batch: list[str] = []
        async for key in self.client.scan_iter(match=self.prefix + "*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                await self.client.delete(*batch)
                batch = []
        if batch:
            await self.client.delete(*batch)

    async def used_memory(self) -> int:
        """The server's ``used_memory``."""
        return int((await self.client.info("memory"))["used_memory"])


class PgSide:
    """sessionstore on PostgreSQL: a database of the run's own, and a bulk connection.

    The database gets a random name (``ssbench_<8 hex>``), is created on the server of
    ``SESSIONSTORE_BENCH_POSTGRES_URL`` and dropped by :meth:`drop` (``WITH (FORCE)``)
    at the end, also after a crash or Ctrl-C; no other database is ever dropped. Its
    ``sessions`` table is migrated by sessionstore itself, then emptied and refilled
    with ``COPY`` (``copy_records_to_table``) as each scenario needs.
    """

    def __init__(self, server: URL) -> None:
        self.server = server
        self.name = f"ssbench_{secrets.token_hex(4)}"
        self.url = server.set(drivername="postgresql+asyncpg", database=self.name).render_as_string(
            hide_password=False
        )
        self.conn: Any = None  # asyncpg connection to our database, for bulk work
        self.info: dict[str, Any] = {}
        self.created = False
        #: "big" while the table holds the big table (less rows that cleanup deleted
        #: from its expired end, which :meth:`big` puts back); None otherwise.
        self.state: str | None = None
        self._big_ids: Sequence[str] = ()

    def _connect_args(self, database: str | None) -> dict[str, Any]:
        return {
            "host": self.server.host or "127.0.0.1",
            "port": self.server.port or 5432,
            "user": self.server.username,
            "password": self.server.password,
            "database": database,
            "timeout": 2.0,
        }

    async def admin(self) -> Any:
        """A connection to the server's own database (the one in the URL)."""
        return await asyncpg.connect(**self._connect_args(self.server.database))

    async def create(self) -> None:
        """Create our database, migrate it with sessionstore, open the bulk connection."""
        admin = await self.admin()
        try:
            version = await admin.fetchval("SHOW server_version")
            settings = {
                name: await admin.fetchval(f"SHOW {name}")
                for name in ("fsync", "synchronous_commit", "shared_buffers", "max_connections")
            }
            await admin.execute(f'CREATE DATABASE "{self.name}"')
            self.created = True
        finally:
            await admin.close()
        self.info = {"version": version, "database": self.name, **settings}
        manager = make_manager(self.url, Clock(BASE), background_tasks=False)
        await manager.start()  # migrates the empty database to head
        await manager.aclose()
        self.conn = await asyncpg.connect(**self._connect_args(self.name))

    async def drop(self) -> None:
        """DROP DATABASE ours WITH (FORCE) (idempotent); never any other database."""
        if self.conn is not None:
            conn, self.conn = self.conn, None
            with contextlib.suppress(Exception):
                await conn.close(timeout=2.0)
        if not self.created:
            return
        admin = await self.admin()
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
            self.created = False
        finally:
            await admin.close()

    async def load(
        self, ids: Sequence[str], last_activity: Callable[[int], float], *, bulk: bool = False
    ) -> None:
        """Empty the tables and COPY these rows in; ``bulk`` rebuilds the indexes after.

        Like :func:`populate`: with ``bulk``, the primary key and indexes are dropped
        and re-created in the same transaction as the COPY (4x faster at 1M rows).
        """
        self.state = None
        conn = self.conn
        records = (
            (sid, last_activity(i), last_activity(i), DATA_TEXT, 1) for i, sid in enumerate(ids)
        )
        async with conn.transaction():
            await conn.execute("TRUNCATE sessions, session_tombstones")
            if not bulk:
                await conn.copy_records_to_table("sessions", records=records, columns=COLUMN_NAMES)
            else:
                constraints = await conn.fetch(
                    "SELECT conname, pg_get_constraintdef(oid) AS def FROM pg_constraint "
                    "WHERE conrelid = 'sessions'::regclass AND contype IN ('p', 'u')"
                )
                owned = {r["conname"] for r in constraints}
                indexes = [
                    r
                    for r in await conn.fetch(
                        "SELECT indexname, indexdef FROM pg_indexes "
                        "WHERE schemaname = current_schema() AND tablename = 'sessions'"
                    )
                    if r["indexname"] not in owned
                ]
                for r in constraints:
                    await conn.execute(f'ALTER TABLE sessions DROP CONSTRAINT "{r["conname"]}"')
                for r in indexes:
                    await conn.execute(f'DROP INDEX "{r["indexname"]}"')
                await conn.copy_records_to_table("sessions", records=records, columns=COLUMN_NAMES)
                await conn.execute("SET LOCAL maintenance_work_mem = '256MB'")
                for r in constraints:
                    await conn.execute(
                        f'ALTER TABLE sessions ADD CONSTRAINT "{r["conname"]}" {r["def"]}'
                    )
                for r in indexes:
                    await conn.execute(r["indexdef"])
        await conn.execute("VACUUM ANALYZE sessions")

    async def big(self, n: int) -> Sequence[str]:
        """Make the table hold the big table (``n`` rows, last_activity BASE+i); its ids.

        Built once by COPY; afterwards rows that a cleanup deleted from the expired
        end (the lowest ``i``) are put back, and anything else rebuilds it.
        """
        ids = shared_ids(n)
        if self.state == "big" and len(self._big_ids) == n and await self._restore_prefix():
            return ids
        started = time.perf_counter()
        await self.load(ids, lambda i: BASE + i, bulk=True)
        self.state, self._big_ids = "big", ids
        size = int(await self.conn.fetchval("SELECT pg_total_relation_size('sessions')"))
        print(
            f"   (built the {n:,}-row PostgreSQL table in {time.perf_counter() - started:.1f} s "
            f"by COPY: {size / 1e6:.0f} MB, {size / n:.0f} B/row incl. indexes)",
            flush=True,
        )
        return ids

    async def _restore_prefix(self) -> bool:
        """Put back rows deleted from the low end of the big table; False if it cannot."""
        ids = self._big_ids
        count, low, high = await self.conn.fetchrow(
            "SELECT count(*), min(last_activity), max(last_activity) FROM sessions"
        )
        if count == len(ids):
            return bool(low == BASE and high == BASE + len(ids) - 1)
        if low is None or high != BASE + len(ids) - 1:
            return False
        missing = round(low - BASE)
        if count != len(ids) - missing:
            return False
        await self.conn.copy_records_to_table(
            "sessions",
            records=(
                (sid, BASE + i, BASE + i, DATA_TEXT, 1) for i, sid in enumerate(ids[:missing])
            ),
            columns=COLUMN_NAMES,
        )
        await self.conn.execute("VACUUM ANALYZE sessions")
        return True

    async def raw_create(self, per_txn: int, duration: float) -> float:
        """INSERTs of new sessions, ``per_txn`` a transaction, over asyncpg; rows/s.

        The PostgreSQL counterpart of :func:`raw_create`: one connection, no
        SQLAlchemy, ``executemany`` (pipelined) for a batch.
        """
        conn = self.conn
        sql = f"INSERT INTO sessions ({COLUMNS}) VALUES ($1, $2, $3, $4, 1)"  # noqa: S608
        n = 0
        start = time.perf_counter()
        deadline = start + duration
        while time.perf_counter() < deadline:
            rows = new_rows(per_txn)
            async with conn.transaction():
                if per_txn == 1:
                    await conn.execute(sql, *rows[0])
                else:
                    await conn.executemany(sql, rows)
            n += per_txn
        self.state = None
        return n / (time.perf_counter() - start)

    async def raw_flush(self, ids: Sequence[str], now: float) -> tuple[float, float]:
        """rows/s of the flush's UPDATEs over asyncpg: ``executemany``, and ``unnest``.

        Both in one transaction: one ``executemany`` of an ``UPDATE`` per row (what
        sessionstore sends), and a single ``UPDATE ... FROM unnest($1, $2)``.
        """
        conn = self.conn
        started = time.perf_counter()
        async with conn.transaction():
            await conn.executemany(
                "UPDATE sessions SET last_activity = $1 WHERE session_id = $2",
                [(now, sid) for sid in ids],
            )
        many = time.perf_counter() - started
        started = time.perf_counter()
        async with conn.transaction():
            await conn.execute(
                "UPDATE sessions AS s SET last_activity = v.ts "
                "FROM unnest($1::text[], $2::float8[]) AS v(sid, ts) WHERE s.session_id = v.sid",
                list(ids),
                [now + 1] * len(ids),
            )
        unnest = time.perf_counter() - started
        return len(ids) / many, len(ids) / unnest

    async def count_at(self, last_activity: float) -> int:
        """Rows whose ``last_activity`` is exactly this."""
        sql = "SELECT count(*) FROM sessions WHERE last_activity = $1"
        return int(await self.conn.fetchval(sql, last_activity))

    async def delete_once(self, cutoff: float, *, indexed: bool) -> tuple[float, int]:
        """One ``DELETE ... WHERE last_activity < $1`` and its COMMIT: (seconds, rows).

        Not indexed: index and bitmap scans are switched off for the transaction, so
        the expired rows are found by a sequential scan (the index stays in place).
        """
        conn = self.conn
        transaction = conn.transaction()
        await transaction.start()
        try:
            # As sessionstore's cleanup chunks commit.
            await conn.execute("SET LOCAL synchronous_commit = off")
            if not indexed:
                for knob in ("enable_indexscan", "enable_indexonlyscan", "enable_bitmapscan"):
                    await conn.execute(f"SET LOCAL {knob} = off")
            started = time.perf_counter()
            status = await conn.execute("DELETE FROM sessions WHERE last_activity < $1", cutoff)
            await transaction.commit()
        except BaseException:
            await transaction.rollback()
            raise
        return time.perf_counter() - started, int(status.split()[-1])


class Context:
    """Settings, the temporary root, the contenders and the collected results."""

    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        self.quick: bool = args.quick
        self.sizes = QUICK if args.quick else FULL
        self.root = root
        self.profile_dir: Path | None = args.profile
        self.redis: RedisSide | None = None
        self.redis_note = ""
        self.pg: PgSide | None = None
        self.pg_note = ""
        self.rows: list[Row] = []
        self.targets: list[Target] = []
        self.extra: dict[str, Any] = {}
        #: Scenarios whose PostgreSQL part crashed (its figures show ``-``).
        self.pg_failed: list[str] = []
        self._template: Path | None = None
        self._big: tuple[Path, Sequence[str]] | None = None
        self._counter = 0

    def path(self, name: str) -> Path:
        """A fresh file name under the temporary root."""
        self._counter += 1
        return self.root / f"{self._counter:02d}-{name}"

    async def fresh_db(self, name: str) -> Path:
        """A new database file migrated by sessionstore itself (copied from a template)."""
        if self._template is None:
            self._template = self.root / "template.db"
            manager = make_manager(self._template, Clock(BASE), background_tasks=False)
            await manager.start()
            await manager.aclose()
        path = self.path(name)
        shutil.copyfile(self._template, path)
        return path

    async def on_fresh_db(self, name: str, run: Callable[[Path], Awaitable[T]]) -> T:
        """``run(path)`` on a fresh database, deleted after (:meth:`discard`)."""
        path = await self.fresh_db(name)
        try:
            return await run(path)
        finally:
            self.discard(path)

    def discard(self, path: Path) -> None:
        """Delete a database that was written to, then write back what else is dirty.

        The create scenario's runs each write 100-200 MB that the kernel writes back
        later, during whichever run comes next: measured, the same contender ran
        ~40% slower in the fifth of six back-to-back runs than in the second
        (188,726 -> 111,121 creates/s), and sessionstore's second run 85k/s against its
        first's 139k/s. A deleted file's dirty pages are dropped, not written.
        """
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        os.sync()

    async def live_db(self, name: str) -> tuple[Path, list[str]]:
        """A fresh database of ``sizes.live`` sessions, all last active at BASE; their ids."""
        ids = fake_ids(self.sizes.live, lambda _i: BASE)
        path = await self.fresh_db(name)
        populate(path, ids, lambda _i: BASE)
        return path, ids

    async def big(self) -> tuple[Path, Sequence[str]]:
        """The big database (``sizes.big`` rows, last_activity BASE+i), built once."""
        if self._big is None:
            n = self.sizes.big
            started = time.perf_counter()
            path = await self.fresh_db("big-template.db")
            ids = shared_ids(n)
            populate(path, ids, lambda i: BASE + i)
            self._big = (path, ids)
            # Age the million-id tuple now: while it is young, the first garbage
            # collection of whatever runs next walks all of it (measured: 10 ms
            # inside a 20 ms cleanup), a cost of this benchmark, not of any contender.
            gc.collect()
            size = path.stat().st_size
            print(
                f"   (built the {n:,}-row database in {time.perf_counter() - started:.1f} s: "
                f"{size / 1e6:.0f} MB, {size / n:.0f} B/row)",
                flush=True,
            )
        return self._big

    async def big_copy(self, name: str) -> tuple[Path, Sequence[str]]:
        """A private copy of the big database (scenarios that change it)."""
        template, ids = await self.big()
        path = self.path(name)
        copy_settled(template, path)
        return path, ids

    def add(self, row: Row) -> None:
        """Record and print one result row."""
        self.rows.append(row)
        print(format_row(row), flush=True)
        if row.note:
            print(f"{'':4}{row.note}", flush=True)

    def target(self, target: Target) -> None:
        """Record one target."""
        self.targets.append(target)

    async def on_pg(self, name: str, work: Callable[[PgSide], Awaitable[T]]) -> T | None:
        """Run the PostgreSQL part of a scenario; ``None`` when skipped or it crashed.

        A crash is printed and recorded (the run exits 1) without losing the SQLite
        and Redis figures of the same scenario.
        """
        if self.pg is None:
            return None
        try:
            return await work(self.pg)
        except Exception:
            self.pg_failed.append(name)
            self.pg.state = None
            print(f"!!! the PostgreSQL part of scenario {name} failed:", file=sys.stderr)
            traceback.print_exc()
            return None

    @contextlib.contextmanager
    def profiled(self, name: str) -> Iterator[None]:
        """cProfile the block when ``--profile DIR`` was given (main thread only)."""
        if self.profile_dir is None:
            yield
            return
        profiler = cProfile.Profile()
        profiler.enable()
        try:
            yield
        finally:
            profiler.disable()
            self.profile_dir.mkdir(parents=True, exist_ok=True)
            out = self.profile_dir / f"{name}.prof"
            profiler.dump_stats(out)
            print(f"   --- profile {name} ({out}), top 25 by cumulative time ---")
            stats = pstats.Stats(profiler, stream=sys.stdout)
            stats.sort_stats("cumulative").print_stats(25)


# ----- output -----

_UNIT_HELP = {"ops/s": "higher is better", "s": "lower", "ms": "lower", "B": "lower"}


def fmt(value: float | None, unit: str) -> str:
    """A figure for the table."""
    if value is None:
        return "-"
    if unit == "ops/s" or unit == "B":
        return f"{value:,.0f}"
    if unit == "ms":
        return f"{value:,.2f}"
    return f"{value:,.4f}" if value < 1 else f"{value:,.2f}"


def fmt_ratio(value: float | None) -> str:
    """A ratio for the table."""
    return "-" if value is None else f"{value:.2f}"


LABEL = 54  # width of the scenario column
HEADER = (
    f"{'#':<4}{'scenario':<{LABEL}}{'unit':>6}{'sessionstore':>14}{'raw sqlite3':>14}"
    f"{'redis':>12}{'ss on PG':>12}{'ss/raw':>8}{'ss/redis':>9}{'PG/ss':>7}"
)


def format_row(row: Row) -> str:
    """One table line."""
    return (
        f"{row.key:<4}{row.label:<{LABEL}}{row.unit:>6}{fmt(row.ss, row.unit):>14}"
        f"{fmt(row.raw, row.unit):>14}{fmt(row.redis, row.unit):>12}"
        f"{fmt(row.pg, row.unit):>12}{fmt_ratio(row.ss_raw):>8}{fmt_ratio(row.ss_redis):>9}"
        f"{fmt_ratio(row.pg_ss):>7}"
    )


def print_summary(ctx: Context, wall: float) -> None:
    """The full table, then the targets."""
    print()
    print("=" * len(HEADER))
    print(HEADER)
    print("-" * len(HEADER))
    for row in ctx.rows:
        print(format_row(row))
    print("-" * len(HEADER))
    print(
        "ops/s: higher is better; s, ms, B: lower is better. ss/x = sessionstore / x; "
        "ss on PG = sessionstore on PostgreSQL; PG/ss = ss on PG / sessionstore (SQLite)."
    )
    if ctx.redis is None:
        print(f"Redis: skipped ({ctx.redis_note}).")
    else:
        print(f"Redis: {ctx.redis_note}")
    print(f"PostgreSQL: {ctx.pg_note}" if ctx.pg else f"PostgreSQL: skipped ({ctx.pg_note}).")
    groups = (
        ("sqlite", "target (issue 4)"),
        ("postgresql", "the same bars for sessionstore on PostgreSQL (information)"),
    )
    for backend, title in groups:
        targets = [t for t in ctx.targets if t.backend == backend]
        if not targets:
            continue
        print()
        print(f"{title:<64}{'measured':>12}{'target':>10}  status")
        for t in targets:
            digits = 3 if t.unit == "x" else 1
            value = "-" if t.value is None else f"{t.value:,.{digits}f}{t.unit}"
            threshold = f"{t.op} {t.threshold:g}{t.unit}"
            print(f"{t.name:<64}{value:>12}{threshold:>10}  {t.status:<5} {t.off_by}")
            if t.detail:
                print(f"{'':4}{t.detail}")
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"\nwall time {wall:.1f} s ({'quick' if ctx.quick else 'full'} run); "
        f"load average at the end {load} (at the start {ctx.extra.get('load_start', '?')})"
    )


# ----- 1. create -----


async def scenario_create(ctx: Context) -> None:
    """ensure() of new sessions, durable on return: 1 task and 256 tasks."""
    s = ctx.sizes
    figures: dict[int, tuple[float, float, float | None, float | None, float | None]] = {}
    local: dict[int, tuple[float, float, float | None, int, str]] = {}
    for tasks in (1, s.tasks):
        # sessionstore, raw, raw, sessionstore (each on a fresh database), and the mean
        # of each pair: whatever the machine is doing (the page cache, other tenants)
        # drifts over the seconds of the scenario, and the order ABBA charges that
        # drift to both contenders alike.
        # At 256 tasks the floor too, inside the pair: sessionstore, floor, raw, raw,
        # floor, sessionstore. Each on a fresh database, deleted after its run.
        floors: list[float] = []
        ss_run = functools.partial(ss_create, ctx, tasks=tasks)
        raw_run = functools.partial(raw_create_run, per_txn=tasks, duration=s.duration)
        floor_run = functools.partial(floor_create, tasks=tasks, duration=s.duration)
        first, transactions = await ctx.on_fresh_db(f"create-ss-{tasks}.db", ss_run)
        if tasks > 1:
            floors.append(await ctx.on_fresh_db("floor.db", floor_run))
        raws = [await ctx.on_fresh_db(f"create-raw-{tasks}.db", raw_run) for _ in range(2)]
        if tasks > 1:
            floors.append(await ctx.on_fresh_db("floor.db", floor_run))
        second, _ = await ctx.on_fresh_db(f"create-ss-{tasks}.db", ss_run)
        rd = await redis_set_throughput(ctx, tasks, s.duration) if ctx.redis else None
        abba = (
            f"ABBA means of {first:,.0f} and {second:,.0f}/s, "
            f"raw {raws[0]:,.0f} and {raws[1]:,.0f}/s"
        )
        if floors:
            floor = statistics.mean(floors)
            ctx.extra["create_floor"] = floor
            abba += (
                f"; asyncio floor (the same tasks, a writer thread running raw sqlite3's "
                f"batch, no bookkeeping) {floors[0]:,.0f} and {floors[1]:,.0f}/s: "
                f"{floor / statistics.mean(raws):.2f}x raw, sessionstore "
                f"{(first + second) / 2 / floor:.2f}x of it"
            )
        local[tasks] = ((first + second) / 2, statistics.mean(raws), rd, transactions, abba)
    # PostgreSQL after every SQLite and Redis figure: its server goes on working after
    # a run of inserts (autovacuum, the checkpointer) on the same two cores. Measured:
    # sessionstore's first 256-task run 63k-81k/s right after PostgreSQL's 1-task run,
    # 96k-104k/s with PostgreSQL moved here.
    for tasks in (1, s.tasks):
        ss, raw, rd, transactions, abba = local[tasks]
        on_pg = await ctx.on_pg("create", functools.partial(pg_create, ctx, tasks))
        pg, pg_transactions, pg_raw = on_pg or (None, 0, None)
        figures[tasks] = (ss, raw, rd, pg, pg_raw)
        per_txn = "one transaction per create" if tasks == 1 else f"{tasks} creates a transaction"
        how = "" if tasks == 1 else " in one statement"
        ctx.add(
            Row(
                f"1{'a' if tasks == 1 else 'b'}",
                f"create, {tasks} task{'s' if tasks > 1 else ''} (durable on return)",
                "ops/s",
                ss,
                raw,
                rd,
                f"raw: INSERT, {per_txn}{how}, WAL+FULL; redis: SET EX (not durable: "
                f"appendonly={ctx.redis.info.get('appendonly', '?') if ctx.redis else '-'}); "
                f"sessionstore used {transactions} transactions; {abba}"
                + (
                    f"; on PostgreSQL {pg_transactions}, and raw asyncpg INSERTs ({per_txn}) "
                    f"{pg_raw:,.0f}/s"
                    if pg is not None and pg_raw is not None
                    else ""
                ),
                pg=pg,
            )
        )
    ss, raw, rd, pg, pg_raw = figures[s.tasks]
    ctx.target(
        Target(
            f"create@{s.tasks}: sessionstore / Redis SET EX",
            _ratio(ss, rd),
            ">=",
            3,
            "x",
        )
    )
    floor_rate: float | None = ctx.extra.get("create_floor")
    ctx.target(
        Target(
            f"create@{s.tasks}: sessionstore / raw batched limit",
            _ratio(ss, raw),
            ">=",
            0.5,
            "x",
            f"asyncio floor / raw {_ratio(floor_rate, raw):.3f}x; sessionstore / floor "
            f"{_ratio(ss, floor_rate):.3f}x (row 1b)"
            if floor_rate
            else "",
        )
    )
    if ctx.pg is not None:
        ctx.target(
            Target(
                f"create@{s.tasks}: sessionstore on PG / Redis SET EX",
                _ratio(pg, rd),
                ">=",
                3,
                "x",
                backend="postgresql",
            )
        )
        ctx.target(
            Target(
                f"create@{s.tasks}: ss on PG / raw asyncpg batched limit",
                _ratio(pg, pg_raw),
                ">=",
                0.5,
                "x",
                backend="postgresql",
            )
        )


async def ss_create(ctx: Context, database: Path | str, tasks: int) -> tuple[float, int]:
    """ensure() of new sessions from ``tasks`` tasks: (ops/s, write transactions used).

    ``database`` is an empty migrated SQLite file or the PostgreSQL URL.
    """
    manager = make_manager(database, Clock(BASE))
    await manager.start()
    await manager.ensure(data=DATA)

    async def op(_k: int, _i: int) -> None:
        await manager.ensure(data=DATA)

    with ctx.profiled(profile_name(database, f"create_{tasks}")):
        rate = await throughput(tasks, ctx.sizes.duration, op)
    transactions = getattr(getattr(manager, "_writer", None), "transactions", 0)
    await manager.aclose()
    return rate, int(transactions)


async def pg_create(ctx: Context, tasks: int, pg: PgSide) -> tuple[float, int, float]:
    """:func:`ss_create` on PostgreSQL, then the raw asyncpg INSERTs.

    Returns (ops/s, transactions, raw asyncpg INSERTs/s with ``tasks`` a transaction).
    """
    await pg.load([], lambda _i: BASE)
    rate, transactions = await ss_create(ctx, pg.url, tasks)
    raw = await pg.raw_create(tasks, ctx.sizes.duration)
    return rate, transactions, raw


def raw_rate(
    path: Path, per_step: int, duration: float, step: Callable[[sqlite3.Connection, int], None]
) -> float:
    """``step(conn, n)`` again and again for ``duration`` seconds on one stdlib connection.

    Each step handles ``per_step`` rows, ``n`` having been handled before it; rows/s.
    """
    conn = raw_connect(path)
    try:
        n = 0
        start = time.perf_counter()
        deadline = start + duration
        while time.perf_counter() < deadline:
            step(conn, n)
            n += per_step
        return n / (time.perf_counter() - start)
    finally:
        conn.close()


def raw_write_rate(
    path: Path,
    sql: str,
    batch: Callable[[int], Sequence[tuple[Any, ...]]],
    per_txn: int,
    duration: float,
) -> float:
    """``executemany(sql, batch(n))`` + COMMIT for ``duration`` seconds; rows/s.

    ``batch(n)`` gives the ``per_txn`` rows of the next transaction, ``n`` rows having
    been written so far.
    """

    def write(conn: sqlite3.Connection, n: int) -> None:
        rows = batch(n)
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(sql, rows)
        conn.execute("COMMIT")

    return raw_rate(path, per_txn, duration, write)


def raw_create(path: Path, per_txn: int, duration: float) -> float:
    """INSERTs of new sessions, ``per_txn`` rows a transaction, one statement each; rows/s."""
    return raw_rate(path, per_txn, duration, raw_create_step(path, per_txn))


async def raw_create_run(path: Path, per_txn: int, duration: float) -> float:
    """:func:`raw_create`, awaitable like the other contenders' runs."""
    return raw_create(path, per_txn, duration)


def raw_create_step(path: Path, per_txn: int) -> Callable[[sqlite3.Connection, int], None]:
    """One transaction of :func:`raw_create`: ``per_txn`` new sessions, made and committed."""
    insert = multi_row_insert(path)

    def write(conn: sqlite3.Connection, _n: int) -> None:
        rows = new_rows(per_txn)
        conn.execute("BEGIN IMMEDIATE")
        insert(conn, rows)
        conn.execute("COMMIT")

    return write


def multi_row_insert(path: Path) -> Callable[[sqlite3.Connection, Sequence[Sequence[Any]]], None]:
    """``insert(conn, rows)``: INSERTs ``rows`` with as few statements as SQLite allows.

    One multi-row ``INSERT ... VALUES (...), (...)`` per transaction: 8-20% more rows/s
    here than ``executemany`` of the one-row INSERT (three runs side by side), so that
    is the limit.
    """
    head, values, one = INSERT_SQL.partition(" VALUES ")
    width = one.count("?")
    with contextlib.closing(sqlite3.connect(path)) as probe:
        # Where a statement may bind fewer parameters (999 before SQLite 3.32), two.
        per_statement = probe.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // width
    texts: dict[int, str] = {}

    def insert(conn: sqlite3.Connection, rows: Sequence[Sequence[Any]]) -> None:
        params = [value for row in rows for value in row]
        for start in range(0, len(rows), per_statement):
            count = min(per_statement, len(rows) - start)
            text = texts.get(count)
            if text is None:
                text = texts[count] = head + values + ", ".join([one] * count)
            conn.execute(text, params[start * width : (start + count) * width])

    return insert


async def floor_create(path: Path, tasks: int, duration: float) -> float:
    """Creates/s of :func:`floor_writer` from ``tasks`` tasks."""
    async with floor_writer(path) as create:
        return await throughput(tasks, duration, lambda _k, _i: create())


@contextlib.asynccontextmanager
async def floor_writer(path: Path) -> AsyncIterator[Callable[[], Awaitable[None]]]:
    """The floor of any asyncio group commit: ``create()`` with no bookkeeping at all.

    Each ``create()`` makes a row as raw sqlite3 does (the id and the JSON), queues it
    with a future and awaits that; one writer task takes the whole queue, has a thread
    of its own run raw sqlite3's transaction of :func:`raw_create` on it, and resolves
    the futures. No returned session, no cache, no checks: what is left between this
    and raw sqlite3 is what asyncio and the thread cost, and between sessionstore and
    this, what sessionstore itself does.
    """
    loop = asyncio.get_running_loop()
    insert = multi_row_insert(path)
    queue: list[tuple[tuple[str, float, float, str], asyncio.Future[None]]] = []
    wakeup = asyncio.Event()
    conn = raw_connect(path)

    def commit(rows: list[tuple[str, float, float, str]]) -> None:
        conn.execute("BEGIN IMMEDIATE")
        insert(conn, rows)
        conn.execute("COMMIT")

    async def writer() -> None:
        while True:
            await wakeup.wait()
            wakeup.clear()
            batch = queue[:]
            queue.clear()
            await loop.run_in_executor(thread, commit, [row for row, _future in batch])
            for _row, future in batch:
                future.set_result(None)

    async def create() -> None:
        now = time.time()
        future: asyncio.Future[None] = loop.create_future()
        queue.append(((new_id(), now, now, encode_data(DATA)), future))
        wakeup.set()
        await future

    with ThreadPoolExecutor(1, thread_name_prefix="floor") as thread:
        task = asyncio.create_task(writer())
        try:
            yield create
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await loop.run_in_executor(thread, conn.close)


async def redis_set_throughput(ctx: Context, tasks: int, duration: float) -> float:
    """SET EX of new keys from ``tasks`` tasks; ops/s (the keys are deleted after)."""
    assert ctx.redis is not None
    client = ctx.redis.client
    keys: list[str] = []

    async def op(_k: int, _i: int) -> None:
        key = ctx.redis.key(new_id())  # type: ignore[union-attr]
        keys.append(key)
        await client.set(key, encode_data(DATA), ex=int(TIMEOUT))

    rate = await throughput(tasks, duration, op)
    await ctx.redis.delete(keys)
    return rate


# ----- 2. update_activity -----


async def scenario_touch(ctx: Context) -> None:
    """update_activity on live sessions from 256 tasks, and the flush's write rate."""
    s = ctx.sizes
    n = s.live
    path, ids = await ctx.live_db("touch.db")
    touched = await ss_touch(ctx, path, ids, load_tasks=1)
    ss, flush_seconds = touched.rate, touched.flush_seconds
    ss_flush = n / flush_seconds
    check = sqlite3.connect(path)
    persisted = check.execute(
        "SELECT count(*) FROM sessions WHERE last_activity = ?", (touched.flushed_at,)
    ).fetchone()[0]
    check.close()

    raw_touch = raw_touch_rate(path, ids, s.tasks, s.duration)
    raw_flush = raw_flush_rate(path, ids, touched.flushed_at + 1)
    on_pg = await ctx.on_pg("touch", functools.partial(pg_touch, ctx, ids))
    pg, pg_flush, pg_raw_flush, pg_note = on_pg or (None, None, None, "")
    rd = None
    if ctx.redis is not None:
        keys = [ctx.redis.key(sid) for sid in ids]
        await ctx.redis.set_many(keys)
        client = ctx.redis.client

        async def rop(k: int, i: int) -> None:
            await client.expire(keys[(i * s.tasks + k) % n], int(TIMEOUT))

        rd = await throughput(s.tasks, s.duration, rop)
        await ctx.redis.delete(keys)
    ctx.add(
        Row(
            "2a",
            f"update_activity, {n:,} live sessions, {s.tasks} tasks",
            "ops/s",
            ss,
            raw_touch,
            rd,
            f"raw: UPDATE, {s.tasks} a transaction (every touch written); redis: EXPIRE",
            pg=pg,
        )
    )
    ctx.add(
        Row(
            "2b",
            f"flush of {n:,} pending touches (rows/s)",
            "ops/s",
            ss_flush,
            raw_flush,
            None,
            f"sessionstore: ensure() with {n:,} touches pending took {flush_seconds * 1e3:.1f} ms "
            f"({persisted:,}/{n:,} persisted; aclose() after "
            f"{touched.close_seconds * 1e3:.0f} ms); "
            f"raw: one executemany of {n:,} UPDATEs + COMMIT" + pg_note,
            pg=pg_flush,
        )
    )
    ctx.target(
        Target("update_activity: sessionstore / Redis EXPIRE", _ratio(ss, rd), ">=", 20, "x")
    )
    ctx.target(
        Target(
            "flush persistence rate: sessionstore / raw executemany",
            _ratio(ss_flush, raw_flush),
            ">=",
            0.5,
            "x",
        )
    )
    if ctx.pg is not None:
        ctx.target(
            Target(
                "update_activity: sessionstore on PG / Redis EXPIRE",
                _ratio(pg, rd),
                ">=",
                20,
                "x",
                backend="postgresql",
            )
        )
        ctx.target(
            Target(
                "flush rate: sessionstore on PG / raw asyncpg executemany",
                _ratio(pg_flush, pg_raw_flush),
                ">=",
                0.5,
                "x",
                backend="postgresql",
            )
        )


@dataclass
class Touched:
    """What :func:`ss_touch` measured."""

    rate: float  # update_activity() calls/s on held sessions
    flush_seconds: float  # the ensure() whose transaction carried every pending touch
    close_seconds: float  # aclose() right after it
    flushed_at: float  # the last_activity those flushed touches wrote


async def ss_touch(
    ctx: Context, database: Path | str, ids: Sequence[str], *, load_tasks: int
) -> Touched:
    """update_activity on live sessions from 256 tasks, then the flush of one per session.

    ``database`` (a SQLite file or the PostgreSQL URL) holds ``ids`` with
    last_activity BASE; each manager first gets them all (untimed) from ``load_tasks``
    tasks, as a daemon holds its live sessions.
    """
    s = ctx.sizes
    n = len(ids)
    clock = Clock(BASE + 1)
    manager = make_manager(database, clock)
    await manager.start()
    await fixed_work(load_tasks, ids, manager.get)

    async def op(k: int, i: int) -> None:
        await manager.update_activity(ids[(i * s.tasks + k) % n])

    with ctx.profiled(profile_name(database, "touch")):
        rate = await throughput(s.tasks, s.duration, op)
    await manager.aclose()

    # The flush: a restarted manager that never flushes on its own holds N pending
    # touches; the next write transaction carries them all (one executemany), so an
    # ensure() of a new session returns once they are committed. aclose() is timed too.
    manager = make_manager(database, clock, flush_interval_secs=3600.0)
    await manager.start()
    await fixed_work(load_tasks, ids, manager.get)
    await manager.ensure(data=DATA)  # warm the insert path
    clock.now += 1
    for sid in ids:
        await manager.update_activity(sid)
    collected()
    with ctx.profiled(profile_name(database, "flush")):
        started = time.perf_counter()
        await manager.ensure(data=DATA)
        flush_seconds = time.perf_counter() - started
    started = time.perf_counter()
    await manager.aclose()
    return Touched(rate, flush_seconds, time.perf_counter() - started, clock.now)


async def pg_touch(ctx: Context, ids: Sequence[str], pg: PgSide) -> tuple[float, float, float, str]:
    """:func:`ss_touch` on PostgreSQL, then the raw asyncpg flush.

    Returns (touches/s, flushed rows/s, raw asyncpg executemany rows/s, note).
    """
    n = len(ids)
    await pg.load(ids, lambda _i: BASE)
    touched = await ss_touch(ctx, pg.url, ids, load_tasks=ctx.sizes.tasks)
    persisted = await pg.count_at(touched.flushed_at)
    many, unnest = await pg.raw_flush(ids, touched.flushed_at + 1)
    note = (
        f"; on PostgreSQL the ensure() took {touched.flush_seconds * 1e3:.1f} ms "
        f"({persisted:,}/{n:,} persisted; aclose() after "
        f"{touched.close_seconds * 1e3:.0f} ms), raw asyncpg: executemany {many:,.0f} rows/s, "
        f"one UPDATE ... FROM unnest {unnest:,.0f} rows/s"
    )
    return touched.rate, n / touched.flush_seconds, many, note


def raw_touch_rate(path: Path, ids: Sequence[str], per_txn: int, duration: float) -> float:
    """UPDATE last_activity, ``per_txn`` touches a transaction; touches/s."""

    def touches(n: int) -> list[tuple[float, str]]:
        now = time.time()
        return [(now, ids[(n + j) % len(ids)]) for j in range(per_txn)]

    return raw_write_rate(path, TOUCH_SQL, touches, per_txn, duration)


def raw_flush_rate(path: Path, ids: Sequence[str], now: float) -> float:
    """One executemany of every touch in one transaction; rows/s."""
    conn = raw_connect(path)
    try:
        collected()
        started = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(TOUCH_SQL, [(now, sid) for sid in ids])
        conn.execute("COMMIT")
        return len(ids) / (time.perf_counter() - started)
    finally:
        conn.close()


# ----- 3. get -----


async def scenario_get(ctx: Context) -> None:
    """get() of live sessions from 256 tasks: first get after a restart, then cached."""
    s = ctx.sizes
    n = s.live
    path, ids = await ctx.live_db("get.db")
    ss_cold, ss, missing = await ss_get(ctx, path, ids)
    raw = raw_get_rate(path, ids, s.tasks, s.duration)
    on_pg = await ctx.on_pg("get", functools.partial(pg_get, ctx, ids))
    pg_cold, pg, pg_missing = on_pg or (None, None, 0)
    rd = rd_cold = None
    if ctx.redis is not None:
        keys = [ctx.redis.key(sid) for sid in ids]
        await ctx.redis.set_many(keys)
        client = ctx.redis.client

        async def rget(key: str) -> None:
            json.loads(await client.get(key))

        rd_cold = await fixed_work(s.tasks, keys, rget)

        async def rop(k: int, i: int) -> None:
            json.loads(await client.get(keys[(i * s.tasks + k) % n]))

        rd = await throughput(s.tasks, s.duration, rop)
        await ctx.redis.delete(keys)
    note = f"raw: SELECT ... IN ({s.tasks} ids) + json.loads; redis: GET + json.loads"
    ctx.add(
        Row(
            "3a",
            f"get, first after restart ({n:,} sessions), {s.tasks} tasks",
            "ops/s",
            ss_cold,
            raw,
            rd_cold,
            note
            + (f"; {missing} sessions not found!" if missing else "")
            + (f"; {pg_missing} not found on PostgreSQL!" if pg_missing else ""),
            pg=pg_cold,
        )
    )
    ctx.add(
        Row("3b", f"get, live sessions held, {s.tasks} tasks", "ops/s", ss, raw, rd, note, pg=pg)
    )
    ctx.target(Target("get: sessionstore / Redis GET", _ratio(ss, rd), ">=", 20, "x"))
    if ctx.pg is not None:
        ctx.target(
            Target(
                "get: sessionstore on PG / Redis GET",
                _ratio(pg, rd),
                ">=",
                20,
                "x",
                backend="postgresql",
            )
        )


async def ss_get(
    ctx: Context, database: Path | str, ids: Sequence[str]
) -> tuple[float, float, int]:
    """get() from 256 tasks: (first gets/s, held gets/s, sessions not found).

    ``database`` (a SQLite file or the PostgreSQL URL) holds ``ids`` with
    last_activity BASE.
    """
    s = ctx.sizes
    n = len(ids)
    manager = make_manager(database, Clock(BASE + 1))
    await manager.start()
    missing = 0

    async def cold(sid: str) -> None:
        nonlocal missing
        if await manager.get(sid) is None:
            missing += 1

    with ctx.profiled(profile_name(database, "get_cold")):
        first = await fixed_work(s.tasks, ids, cold)

    async def op(k: int, i: int) -> None:
        await manager.get(ids[(i * s.tasks + k) % n])

    with ctx.profiled(profile_name(database, "get_cached")):
        held = await throughput(s.tasks, s.duration, op)
    await manager.aclose()
    return first, held, missing


async def pg_get(ctx: Context, ids: Sequence[str], pg: PgSide) -> tuple[float, float, int]:
    """:func:`ss_get` on PostgreSQL."""
    await pg.load(ids, lambda _i: BASE)
    return await ss_get(ctx, pg.url, ids)


def raw_get_rate(path: Path, ids: Sequence[str], batch: int, duration: float) -> float:
    """SELECT by id, ``batch`` ids an IN-list (the batched limit); gets/s."""
    marks = ",".join("?" * batch)  # placeholders only: no value is formatted into SQL
    sql = f"SELECT {COLUMNS} FROM sessions WHERE session_id IN ({marks})"  # noqa: S608

    def select(conn: sqlite3.Connection, n: int) -> None:
        chunk = [ids[(n + j) % len(ids)] for j in range(batch)]
        for row in conn.execute(sql, chunk):
            json.loads(row[3])

    return raw_rate(path, batch, duration, select)


# ----- 4. cleanup -----


async def scenario_cleanup(ctx: Context) -> None:
    """Delete 1% expired of the big database: sessionstore, indexed and unindexed DELETE.

    Then, on the same three copies, the next 0.1% (the size of the issue's own
    figure), and the search alone (``SELECT count(*)`` with and without the index).
    """
    n = ctx.sizes.big
    expired, more = n // 100, n // 1000
    now, later = clock_for(n, 0.01), clock_for(n, 0.011)

    # Every contender deletes from fresh copies, ``repeats`` times; medians are
    # reported (one run of a 20 ms measurement varies by a fifth on this machine).
    ss_runs: list[Cleaned] = []
    raw_runs: list[tuple[float, int, float]] = []
    unindexed_runs: list[tuple[float, float]] = []
    finds: list[tuple[float, float]] = []
    for _ in range(ctx.sizes.repeats):
        path, _ids = await ctx.big_copy("cleanup-ss.db")
        ss_runs.append(await ss_cleanup(ctx, path))
        path.unlink()

        path, _ids = await ctx.big_copy("cleanup-raw.db")
        find = raw_count_expired(path, now - TIMEOUT, indexed=True)
        raw_once, raw_deleted = raw_delete_once(path, now - TIMEOUT)
        raw_more_once, _ = raw_delete_once(path, later - TIMEOUT)
        raw_runs.append((raw_once, raw_deleted, raw_more_once))
        path.unlink()

        path, _ids = await ctx.big_copy("cleanup-noindex.db")
        find_scan = raw_count_expired(path, now - TIMEOUT, indexed=False)
        finds.append((find, find_scan))
        conn = sqlite3.connect(path, isolation_level=None)
        (name,) = conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'sessions' "
            "AND sql LIKE '%last_activity%'"
        ).fetchone()
        conn.execute(f'DROP INDEX "{name}"')
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()
        unindexed_once, _ = raw_delete_once(path, now - TIMEOUT)
        unindexed_more_once, _ = raw_delete_once(path, later - TIMEOUT)
        unindexed_runs.append((unindexed_once, unindexed_more_once))
        path.unlink()

    def median(values: Iterable[float]) -> float:
        return statistics.median(list(values))

    cleaned = ss_runs[0]
    ss, ss_more = median(c.seconds for c in ss_runs), median(c.seconds_more for c in ss_runs)
    raw, raw_more = median(r[0] for r in raw_runs), median(r[2] for r in raw_runs)
    raw_deleted = raw_runs[0][1]
    unindexed = median(u[0] for u in unindexed_runs)
    unindexed_more = median(u[1] for u in unindexed_runs)
    find, find_scan = median(f[0] for f in finds), median(f[1] for f in finds)
    spread = (
        f"; median of {len(ss_runs)}: sessionstore "
        + ", ".join(f"{c.seconds * 1e3:.1f}" for c in ss_runs)
        + " ms, unindexed "
        + ", ".join(f"{u[0] * 1e3:.1f}" for u in unindexed_runs)
        + " ms"
        if len(ss_runs) > 1
        else ""
    )

    pg = await ctx.on_pg("cleanup", functools.partial(pg_cleanup, ctx))
    pg_note = ""
    if pg is not None:
        pg_note = (
            f"; on PostgreSQL: deleted {pg.ss.deleted:,}; one DELETE + COMMIT "
            f"{pg.raw * 1e3:.1f} ms by the index, {pg.scan * 1e3:.1f} ms by a sequential scan"
        )

    ctx.add(
        Row(
            "4a",
            f"cleanup {expired:,} expired of {n:,}, indexed",
            "ms",
            ss * 1e3,
            raw * 1e3,
            None,
            f"sessionstore: cleanup_stale_sessions() deleted {cleaned.deleted:,} in chunks "
            f"from {cleaned.chunk:,} rows, sized by time; "
            f"raw: one DELETE ({raw_deleted:,} rows) + COMMIT; "
            "every contender commits without a sync, as sessionstore's cleanup does; "
            "redis: n/a (expires keys itself)" + pg_note,
            pg=None if pg is None else pg.ss.seconds * 1e3,
        )
    )
    ctx.add(
        Row(
            "4b",
            "the same DELETE without the last_activity index",
            "ms",
            None,
            unindexed * 1e3,
            None,
            f"raw indexed / unindexed = {raw / unindexed:.2f}: deleting dominates, not finding",
        )
    )
    ctx.add(
        Row(
            "4c",
            f"then the next {more:,} (0.1%), indexed",
            "ms",
            ss_more * 1e3,
            raw_more * 1e3,
            None,
            f"sessionstore deleted {cleaned.deleted_more:,}; "
            f"unindexed: {unindexed_more * 1e3:.1f} ms "
            f"(sessionstore / unindexed = {ss_more / unindexed_more:.2f}, "
            f"raw indexed / unindexed = {raw_more / unindexed_more:.2f})"
            + ("" if pg is None else f"; on PostgreSQL deleted {pg.ss.deleted_more:,}"),
            pg=None if pg is None else pg.ss.seconds_more * 1e3,
        )
    )
    ctx.add(
        Row(
            "4d",
            f"finding the {expired:,} (SELECT count), index vs scan",
            "ms",
            None,
            find * 1e3,
            None,
            f"NOT INDEXED: {find_scan * 1e3:.1f} ms (index / scan = {find / find_scan:.3f})",
        )
    )
    ctx.target(
        Target(
            "cleanup of 1%: sessionstore (indexed) / unindexed DELETE",
            ss / unindexed,
            "<=",
            0.25,
            "x",
            f"{ss * 1e3:.1f} ms vs {unindexed * 1e3:.1f} ms; the raw limit itself is "
            f"{raw / unindexed:.2f}x{spread}",
        )
    )
    if ctx.pg is not None:
        ctx.target(
            Target(
                "cleanup of 1%: ss on PG / PG DELETE by a sequential scan",
                None if pg is None else pg.ss.seconds / pg.scan,
                "<=",
                0.25,
                "x",
                ""
                if pg is None
                else f"{pg.ss.seconds * 1e3:.1f} ms vs {pg.scan * 1e3:.1f} ms; one DELETE by the "
                f"index is {pg.raw / pg.scan:.2f}x",
                backend="postgresql",
            )
        )


@dataclass
class Cleaned:
    """What :func:`ss_cleanup` measured."""

    seconds: float  # cleanup_stale_sessions() of the first 1%
    deleted: int
    seconds_more: float  # then of the next 0.1%
    deleted_more: int
    chunk: int  # the manager's cleanup_chunk_rows


async def ss_cleanup(ctx: Context, database: Path | str) -> Cleaned:
    """cleanup_stale_sessions() of 1%, then 0.1%, of the big table.

    ``database`` is a copy of the big SQLite database or the PostgreSQL URL with the
    big table loaded.
    """
    n = ctx.sizes.big
    clock = Clock(cleaning_clock_for(n, 0.01))
    manager = make_manager(database, clock, background_tasks=False)
    await manager.start()
    await manager.recovered()  # start-up counts run after ready: not part of the cleanup
    collected()
    with ctx.profiled(profile_name(database, "cleanup_1pct")):
        started = time.perf_counter()
        deleted = await manager.cleanup_stale_sessions()
        seconds = time.perf_counter() - started
    clock.now = cleaning_clock_for(n, 0.011)
    collected()
    started = time.perf_counter()
    deleted_more = await manager.cleanup_stale_sessions()
    seconds_more = time.perf_counter() - started
    chunk = manager.settings.cleanup_chunk_rows
    await manager.aclose()
    return Cleaned(seconds, deleted, seconds_more, deleted_more, chunk)


@dataclass
class PgCleanup:
    """The cleanup figures on PostgreSQL (seconds)."""

    ss: Cleaned
    raw: float  # one DELETE ... WHERE last_activity < $1 by the index, + COMMIT
    scan: float  # the same DELETE with index scans switched off


async def pg_cleanup(ctx: Context, pg: PgSide) -> PgCleanup:
    """:func:`ss_cleanup` on PostgreSQL.

    Then the raw limit on the same server: one ``DELETE`` of the same 1%, by the index
    and by a sequential scan (the deleted rows are put back before each).
    """
    n = ctx.sizes.big
    cutoff = clock_for(n, 0.01) - TIMEOUT
    await pg.big(n)
    cleaned = await ss_cleanup(ctx, pg.url)
    await pg.big(n)
    raw, _ = await pg.delete_once(cutoff, indexed=True)
    await pg.big(n)
    scan, _ = await pg.delete_once(cutoff, indexed=False)
    await pg.big(n)
    return PgCleanup(cleaned, raw, scan)


def raw_count_expired(path: Path, cutoff: float, *, indexed: bool) -> float:
    """Seconds to count the expired rows, by the index or by a full scan."""
    sql = (
        "SELECT count(*) FROM sessions WHERE last_activity < ?"
        if indexed
        else "SELECT count(*) FROM sessions NOT INDEXED WHERE last_activity < ?"
    )
    conn = raw_connect(path)
    try:
        started = time.perf_counter()
        conn.execute(sql, (cutoff,)).fetchone()
        return time.perf_counter() - started
    finally:
        conn.close()


def raw_delete_once(path: Path, cutoff: float) -> tuple[float, int]:
    """One ``DELETE ... WHERE last_activity < ?`` and its COMMIT: (seconds, rows).

    With ``synchronous=NORMAL``, as sessionstore's cleanup chunks commit (measured:
    the unindexed DELETE 77-79 ms this way, 80-97 ms with FULL's fsync).
    """
    conn = raw_connect(path)
    try:
        conn.execute("PRAGMA synchronous = NORMAL")
        collected()
        started = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        rows = conn.execute("DELETE FROM sessions WHERE last_activity < ?", (cutoff,)).rowcount
        conn.execute("COMMIT")
        return time.perf_counter() - started, rows
    finally:
        conn.close()


# ----- 5. restart -----


async def scenario_restart(ctx: Context) -> None:
    """Time from SessionManager(...) to start() done and a first get answered.

    Every measurement opens a fresh copy of the database: a restart's background
    cleanup starts deleting the expired half, which would change the next one.
    """
    s = ctx.sizes
    small_ids = fake_ids(s.small, lambda i: BASE + i)
    small = await ctx.fresh_db("restart-small.db")
    populate(small, small_ids, lambda i: BASE + i)
    big, big_ids = await ctx.big()
    # Warm up the process once (imports, alembic script directory, compiled SQL).
    warm = ctx.path("restart-warm.db")
    shutil.copyfile(small, warm)
    await restart_once(warm, Clock(clock_for(s.small, 0.5)), small_ids[-1])
    warm.unlink()

    results: dict[int, tuple[float, float]] = {}
    rows: list[Row] = []

    async def copy(template: Path, n: int, rep: int) -> Path:
        path = ctx.path(f"restart-{n}-{rep}.db")
        copy_settled(template, path)
        return path

    for n, template, ids in ((s.small, small, small_ids), (s.big, big, big_ids)):
        prepare = functools.partial(copy, template, n)
        times, closes, recovery = await restart_series(ctx, n, prepare, ids[-1])
        cutoff = clock_for(n, 0.5) - TIMEOUT
        raw = statistics.median(raw_restart(template, cutoff, ids[-1]) for _ in range(s.repeats))
        rd = None
        if ctx.redis is not None:
            rd = statistics.median([await redis_restart(ctx) for _ in range(s.repeats)])
        ss = statistics.median(times)
        results[n] = (ss, raw)
        rows.append(
            Row(
                "5",
                f"restart-to-ready, {n:,} stored, half expired",
                "ms",
                ss * 1e3,
                raw * 1e3,
                None if rd is None else rd * 1e3,
                f"median of {s.repeats}: {', '.join(f'{t * 1e3:.1f}' for t in times)} ms; "
                f"{recovery}; aclose() right after: {max(closes) * 1e3:.0f} ms max",
            )
        )
    small.unlink()
    pg = await ctx.on_pg("restart", functools.partial(pg_restart, ctx, small_ids))
    for row, n in zip(rows, (s.small, s.big), strict=True):
        if pg is not None and n in pg:
            median, note = pg[n]
            row.pg = median * 1e3
            row.note += f"; on PostgreSQL {note}"
        ctx.add(row)
    ss_small, raw_small = results[s.small]
    ss_big, raw_big = results[s.big]
    ctx.extra["restart_note"] = (
        "raw: connect + pragmas + first SELECT; redis: new client + first GET (the "
        "server's own restart, which reloads its RDB/AOF, is not measured)"
    )
    print(f"{'':4}{ctx.extra['restart_note']}; raw big/small = {raw_big / raw_small:.2f}")
    ctx.target(
        Target(
            f"restart-to-ready: {s.big:,} / {s.small:,} stored",
            ss_big / ss_small,
            "<=",
            2,
            "x",
            f"{ss_big * 1e3:.1f} ms vs {ss_small * 1e3:.1f} ms",
        )
    )
    if ctx.pg is not None:
        pg_small = pg[s.small][0] if pg and s.small in pg else None
        pg_big = pg[s.big][0] if pg and s.big in pg else None
        ctx.target(
            Target(
                f"restart-to-ready on PG: {s.big:,} / {s.small:,} stored",
                _ratio(pg_big, pg_small),
                "<=",
                2,
                "x",
                ""
                if pg_big is None or pg_small is None
                else f"{pg_big * 1e3:.1f} ms vs {pg_small * 1e3:.1f} ms",
                backend="postgresql",
            )
        )


async def pg_restart(
    ctx: Context, small_ids: Sequence[str], pg: PgSide
) -> dict[int, tuple[float, str]]:
    """Restart-to-ready on PostgreSQL, small then big table: {rows: (median s, note)}.

    Each small measurement refills the table; between big ones, the rows the
    restart's background cleanup deleted (it starts right after ready and is
    cancelled by aclose) are put back.
    """
    s = ctx.sizes
    small_clock = Clock(clock_for(s.small, 0.5))
    await pg.load(small_ids, lambda i: BASE + i)
    await restart_once(pg.url, small_clock, small_ids[-1])  # warm up the PG code paths

    async def load_small(_rep: int) -> str:
        await pg.load(small_ids, lambda i: BASE + i)
        return pg.url

    async def restore_big(_rep: int) -> str:
        await pg.big(s.big)
        return pg.url

    big_ids = shared_ids(s.big)  # what pg.big() loads
    out: dict[int, tuple[float, str]] = {}
    for n, prepare, live_id in (
        (s.small, load_small, small_ids[-1]),
        (s.big, restore_big, big_ids[-1]),
    ):
        times, _closes, recovery = await restart_series(ctx, n, prepare, live_id)
        out[n] = (
            statistics.median(times),
            f"{', '.join(f'{t * 1e3:.1f}' for t in times)} ms ({recovery})",
        )
    await pg.big(s.big)  # put back what the last restart's cleanup deleted
    return out


async def restart_series(
    ctx: Context, n: int, prepare: Callable[[int], Awaitable[Path | str]], live_id: str
) -> tuple[list[float], list[float], str]:
    """``sizes.repeats`` restarts of a database of ``n`` rows, half expired.

    ``prepare(rep)`` makes the database for measurement ``rep`` ready (a copy of a
    SQLite file, deleted after the measurement, or the PostgreSQL URL with the table
    refilled). Returns (seconds to ready, seconds to aclose after, the first recovery).
    """
    clock = Clock(clock_for(n, 0.5))
    times: list[float] = []
    closes: list[float] = []
    recovery = ""
    for rep in range(ctx.sizes.repeats):
        database = await prepare(rep)
        name = profile_name(database, f"restart_{n}")
        with ctx.profiled(name) if rep == 0 else contextlib.nullcontext():
            seconds, close_seconds, report = await restart_once(database, clock, live_id)
        if isinstance(database, Path):
            database.unlink()
        times.append(seconds)
        closes.append(close_seconds)
        recovery = recovery or report
    return times, closes, recovery


async def restart_once(
    database: Path | str, clock: Clock, live_id: str
) -> tuple[float, float, str]:
    """One restart: (seconds to ready, seconds to aclose after, recovery summary)."""
    started = time.perf_counter()
    manager = make_manager(database, clock)
    await manager.start()
    session = await manager.get(live_id)
    ready = time.perf_counter() - started
    if session is None:
        raise RuntimeError(f"live session {live_id} not found after restart")
    report = await manager.recovered()  # counted in the background, after ready
    summary = f"restored {report.restored:,}, expired {report.expired:,}"
    started = time.perf_counter()
    await manager.aclose()
    return ready, time.perf_counter() - started, summary


def raw_restart(path: Path, cutoff: float, live_id: str) -> float:
    """Connect with the same pragmas and answer a first live get; seconds."""
    started = time.perf_counter()
    conn = raw_connect(path)
    row = conn.execute(
        "SELECT session_id, created_at, last_activity, data, version FROM sessions "
        "WHERE session_id = ? AND last_activity >= ?",
        (live_id, cutoff),
    ).fetchone()
    json.loads(row[3])
    seconds = time.perf_counter() - started
    conn.close()
    return seconds


async def redis_restart(ctx: Context) -> float:
    """A new client connecting and answering a first GET; seconds."""
    assert ctx.redis is not None
    key = ctx.redis.key("restart-probe")
    await ctx.redis.client.set(key, DATA_TEXT, ex=60)
    started = time.perf_counter()
    client: Any = aioredis.Redis.from_url(ctx.redis.url)
    json.loads(await client.get(key))
    seconds = time.perf_counter() - started
    await client.aclose()
    await ctx.redis.client.delete(key)
    return seconds


# ----- 6. ensure latency during a big cleanup -----


async def scenario_latency(ctx: Context) -> None:
    """p99/max of ensure() from 16 tasks while cleanup deletes half the big database."""
    s = ctx.sizes
    n = s.big
    half = n // 2
    now = clock_for(n, 0.5)
    path, _ids = await ctx.big_copy("latency-ss.db")
    ss = await ss_latency(ctx, path)
    base_lat, lat, chunk = ss.baseline, ss.latencies, ss.chunk
    path.unlink()

    path, _ids = await ctx.big_copy("latency-raw.db")
    raw_lat, raw_seconds = raw_cleanup_latencies(path, now - TIMEOUT, chunk, s.latency_tasks)
    path.unlink()

    rd_lat: list[float] | None = None
    rd_seconds = None
    if ctx.redis is not None:
        rd_lat, rd_seconds = await redis_cleanup_latencies(ctx, half, chunk, s.latency_tasks)
    pg = await ctx.on_pg("latency", functools.partial(pg_latency, ctx))
    pg_lat = None if pg is None else pg.latencies

    def ms(values: Sequence[float] | None, q: float) -> float | None:
        return None if not values else percentile(values, q) * 1e3

    pg_note = ""
    if pg is not None:
        pg_note = (
            f"; on PostgreSQL: {len(pg.latencies):,} ensures ({pg.rate:,.0f}/s), "
            f"p50 {ms(pg.latencies, 0.5):.2f} ms; without cleanup p99 "
            f"{ms(pg.baseline, 0.99):.2f} ms, max {ms(pg.baseline, 1.0):.2f} ms"
        )

    ctx.add(
        Row(
            "6a",
            f"ensure p99 while cleanup deletes {half:,} of {n:,}",
            "ms",
            ms(lat, 0.99),
            ms(raw_lat, 0.99),
            ms(rd_lat, 0.99),
            f"{s.latency_tasks} tasks; sessionstore: {len(lat):,} ensures ({ss.rate:,.0f}/s), "
            f"p50 {ms(lat, 0.5):.2f} ms; without cleanup p99 {ms(base_lat, 0.99):.2f} ms, "
            f"max {ms(base_lat, 1.0):.2f} ms" + pg_note,
            pg=ms(pg_lat, 0.99),
        )
    )
    ctx.add(
        Row(
            "6b",
            "ensure max latency during that cleanup",
            "ms",
            ms(lat, 1.0),
            ms(raw_lat, 1.0),
            ms(rd_lat, 1.0),
            f"raw: one writer alternating {chunk:,}-row DELETE chunks and "
            f"{s.latency_tasks}-row INSERT transactions; redis: DEL {chunk:,} keys at a time "
            f"vs SET EX",
            pg=ms(pg_lat, 1.0),
        )
    )
    ctx.add(
        Row(
            "6c",
            f"that cleanup of {half:,} rows, total",
            "s",
            ss.seconds,
            raw_seconds,
            rd_seconds,
            f"sessionstore deleted {ss.deleted:,} (chunks from {chunk:,} rows, sized by time) "
            "while serving ensure()" + ("" if pg is None else f"; on PostgreSQL {pg.deleted:,}"),
            pg=None if pg is None else pg.seconds,
        )
    )
    ctx.target(
        Target(
            f"max ensure latency during the cleanup of {half:,}",
            ms(lat, 1.0),
            "<=",
            100,
            "ms",
            f"p99 {ms(lat, 0.99):.1f} ms",
        )
    )
    if ctx.pg is not None:
        ctx.target(
            Target(
                f"max ensure latency on PG during the cleanup of {half:,}",
                ms(pg_lat, 1.0),
                "<=",
                100,
                "ms",
                "" if pg_lat is None else f"p99 {ms(pg_lat, 0.99):.1f} ms",
                backend="postgresql",
            )
        )


@dataclass
class Latency:
    """ensure() latencies with and without the big cleanup running."""

    baseline: list[float]  # seconds, before the cleanup
    latencies: list[float]  # seconds, while it runs
    rate: float  # ensure()s/s while it runs
    deleted: int
    seconds: float  # the whole cleanup
    chunk: int  # the manager's cleanup_chunk_rows


async def ss_latency(ctx: Context, database: Path | str) -> Latency:
    """ensure() from 16 tasks, then again while cleanup deletes half the big table.

    ``database`` is a copy of the big SQLite database or the PostgreSQL URL with the
    big table loaded.
    """
    s = ctx.sizes
    manager = make_manager(database, Clock(cleaning_clock_for(s.big, 0.5)), background_tasks=False)
    await manager.start()
    await manager.recovered()  # start-up counts run after ready: not in the baseline
    chunk = manager.settings.cleanup_chunk_rows

    baseline, _ = await ensure_latencies(manager, s.latency_tasks, until=s.duration / 2)
    with ctx.profiled(profile_name(database, "latency_cleanup")):
        cleanup = asyncio.create_task(manager.cleanup_stale_sessions())
        started = time.perf_counter()
        latencies, rate = await ensure_latencies(manager, s.latency_tasks, until=cleanup)
        deleted = await cleanup
        seconds = time.perf_counter() - started
    await manager.aclose()
    return Latency(baseline, latencies, rate, deleted, seconds, chunk)


async def pg_latency(ctx: Context, pg: PgSide) -> Latency:
    """:func:`ss_latency` on PostgreSQL."""
    await pg.big(ctx.sizes.big)
    pg.state = None  # the ensure()s add rows
    return await ss_latency(ctx, pg.url)


async def ensure_latencies(
    manager: SessionManager, tasks: int, *, until: float | asyncio.Task[Any]
) -> tuple[list[float], float]:
    """ensure() latencies from ``tasks`` tasks for ``until`` seconds or until a task ends."""
    latencies: list[float] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + until if isinstance(until, float) else None

    def running() -> bool:
        if deadline is not None:
            return loop.time() < deadline
        assert isinstance(until, asyncio.Task)
        return not until.done()

    async def worker() -> None:
        while running():
            started = time.perf_counter()
            await manager.ensure(data=DATA)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(tasks)))
    return latencies, len(latencies) / (time.perf_counter() - started)


def raw_cleanup_latencies(
    path: Path, cutoff: float, chunk: int, batch: int
) -> tuple[list[float], float]:
    """One writer: a DELETE chunk, then ``batch`` INSERTs, until nothing is left.

    The DELETE chunks commit without a sync and the INSERTs with one, as
    sessionstore's cleanup chunks and creates do.

    Each INSERT's latency runs from the start of the chunk it waited behind to its
    own COMMIT: ``batch`` callers that re-submit at once, as in group commit.
    """
    conn = raw_connect(path)
    latencies: list[float] = []
    started = time.perf_counter()
    try:
        while True:
            t0 = time.perf_counter()
            conn.execute("PRAGMA synchronous = NORMAL")  # as sessionstore's cleanup chunks
            conn.execute("BEGIN IMMEDIATE")
            deleted = conn.execute(CHUNK_DELETE_SQL, (cutoff, chunk)).rowcount
            conn.execute("COMMIT")
            conn.execute("PRAGMA synchronous = FULL")
            now = time.time()
            rows = [(new_id(), now, now, DATA_TEXT) for _ in range(batch)]
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(INSERT_SQL, rows)
            conn.execute("COMMIT")
            latencies.extend([time.perf_counter() - t0] * batch)
            if deleted < chunk:
                break
        return latencies, time.perf_counter() - started
    finally:
        conn.close()


async def redis_cleanup_latencies(
    ctx: Context, n: int, chunk: int, tasks: int
) -> tuple[list[float], float]:
    """SET EX latencies from ``tasks`` tasks while ``n`` keys are DELeted in chunks."""
    assert ctx.redis is not None
    client = ctx.redis.client
    old = [ctx.redis.key(f"old-{i}") for i in range(n)]
    await ctx.redis.set_many(old, ttl=None)
    new: list[str] = []
    latencies: list[float] = []
    done = asyncio.Event()

    async def cleaner() -> float:
        started = time.perf_counter()
        for start in range(0, len(old), chunk):
            await client.delete(*old[start : start + chunk])
        done.set()
        return time.perf_counter() - started

    async def worker() -> None:
        while not done.is_set():
            key = ctx.redis.key(new_id())  # type: ignore[union-attr]
            new.append(key)
            started = time.perf_counter()
            await client.set(key, DATA_TEXT, ex=int(TIMEOUT))
            latencies.append(time.perf_counter() - started)

    cleaning = asyncio.create_task(cleaner())
    await asyncio.gather(*(worker() for _ in range(tasks)))
    await ctx.redis.delete(new)
    return latencies, await cleaning


# ----- 7. memory -----


async def scenario_memory(ctx: Context) -> None:
    """Bytes per live session held by the manager (tracemalloc) vs Redis used_memory."""
    s = ctx.sizes
    n = s.memory
    path = await ctx.fresh_db("memory.db")
    # No refresh/cleanup tasks: their rows in flight would count as held memory.
    manager = make_manager(path, Clock(BASE), background_tasks=False)
    await manager.start()
    warm = [None] * 2048

    async def create(_item: Any) -> None:
        await manager.ensure(data=DATA)

    await fixed_work(s.tasks, warm, create)  # warm every cache before measuring
    gc.collect()
    tracemalloc.start(25)
    await fixed_work(s.tasks, [None] * n, create)
    await asyncio.sleep(0.05)  # let finished tasks and callbacks go
    gc.collect()
    held, _peak = tracemalloc.get_traced_memory()
    snapshot = tracemalloc.take_snapshot()
    tracemalloc.stop()
    await manager.aclose()
    ss = held / n
    package = f"*{os.sep}sessionstore{os.sep}*"
    ours = snapshot.filter_traces([tracemalloc.Filter(True, package, all_frames=True)])
    attributed = sum(stat.size for stat in ours.statistics("filename")) / n
    disk = path.stat().st_size / (n + len(warm))
    if ctx.profile_dir is not None:
        print("   --- tracemalloc: top allocation sites still held (first frame) ---")
        for stat in snapshot.statistics("lineno")[:10]:
            print(f"   {stat.size / n:8.1f} B/session  {stat.count:>8}  {stat.traceback[0]}")

    rd = None
    if ctx.redis is not None:
        check = sqlite3.connect(path)
        made = [r[0] for r in check.execute("SELECT session_id FROM sessions LIMIT ?", (n,))]
        check.close()
        rd = await redis_memory(ctx, made)
    ctx.add(
        Row(
            "7",
            f"memory per live session ({n:,}, 200-byte data)",
            "B",
            ss,
            0.0,
            rd,
            f"sessionstore: Python heap held after gc (tracemalloc; {attributed:,.0f} B of it "
            "allocated under sessionstore frames); raw holds nothing in memory "
            f"(on disk: {disk:,.0f} B/session incl. indexes); redis: used_memory delta, "
            "SET EX"
            + (
                "; PostgreSQL: not measured (the cache is the same Python code whatever the "
                "database)"
                if ctx.pg is not None
                else ""
            ),
        )
    )
    ctx.target(
        Target(
            "memory per live session: sessionstore / Redis",
            _ratio(ss, rd),
            "<=",
            1,
            "x",
            f"{ss:,.0f} B vs {'-' if rd is None else f'{rd:,.0f}'} B",
        )
    )


async def redis_memory(ctx: Context, session_ids: Sequence[str]) -> float:
    """Redis ``used_memory`` growth per session: SET EX of these ids (prefixed).

    The pool's connections are closed first (their buffers shrinking would count as
    negative memory) and ``used_memory`` is read once it has settled.
    """
    assert ctx.redis is not None
    await ctx.redis.client.connection_pool.disconnect()

    async def settled() -> int:
        last = await ctx.redis.used_memory()  # type: ignore[union-attr]
        for _ in range(20):
            await asyncio.sleep(0.05)
            now = await ctx.redis.used_memory()  # type: ignore[union-attr]
            if now == last:
                break
            last = now
        return last

    keys = [ctx.redis.key(sid) for sid in session_ids]
    before = await settled()
    await ctx.redis.set_many(keys)
    after = await settled()
    await ctx.redis.delete(keys)
    return (after - before) / len(keys)


# ----- 8. event-loop stalls with a large cache (information) -----


async def longest_stall(work: Awaitable[T]) -> tuple[float, float, T]:
    """Run ``work`` beside a task that wakes every millisecond: (the longest time that
    task waited beyond its millisecond, the seconds ``work`` took, its result).

    What any other connection of a daemon would wait for at worst meanwhile. The
    ticker sleeps rather than spins: a task that never lets the loop idle would keep
    the GIL from the database driver's thread and slow ``work`` itself.
    """
    stalls: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            stalls.append(now - last - 0.001)
            last = now

    ticking = asyncio.create_task(ticker())
    await asyncio.sleep(0.005)
    started = time.perf_counter()
    try:
        result = await work
    finally:
        seconds = time.perf_counter() - started
        done.set()
        await ticking
    return max(stalls, default=0.0), seconds, result


@dataclass
class Stalls:
    """Longest event-loop stalls (s) and durations (s) with ``cached`` sessions held."""

    cached: int
    cleanup_stall: float
    cleanup_seconds: float
    refresh_stall: float
    refresh_seconds: float


async def ss_stalls(ctx: Context, database: Path | str) -> Stalls:
    """A manager holding ``sizes.cached`` sessions: an idle cleanup pass, and a refresh
    after another connection (a second manager) committed.

    ``database`` is an empty migrated SQLite file or the PostgreSQL URL.
    """
    n = ctx.sizes.cached
    manager = make_manager(database, Clock(BASE), background_tasks=False)
    other = make_manager(database, Clock(BASE), background_tasks=False)
    try:
        await manager.start()
        await other.start()

        async def create(_item: Any) -> None:
            await manager.ensure(data=DATA)

        await fixed_work(ctx.sizes.tasks, [None] * n, create)
        collected()
        cleanup_stall, cleanup_seconds, _ = await longest_stall(manager.cleanup_stale_sessions())
        await other.ensure(data=DATA)  # on SQLite, what makes the refresh read at all
        collected()
        refresh_stall, refresh_seconds, gone = await longest_stall(manager.refresh())
        if gone:
            raise RuntimeError(f"refresh found {len(gone)} sessions gone, expected none")
        cached = (await manager.get_session_metrics())["cached_sessions"]
    finally:
        await other.aclose()
        await manager.aclose()
    return Stalls(cached, cleanup_stall, cleanup_seconds, refresh_stall, refresh_seconds)


async def pg_stalls(ctx: Context, pg: PgSide) -> Stalls:
    """:func:`ss_stalls` on PostgreSQL (an emptied table)."""
    await pg.load([], lambda _i: BASE)
    stalls = await ss_stalls(ctx, pg.url)
    pg.state = None
    return stalls


async def scenario_stalls(ctx: Context) -> None:
    """The longest the event loop is held by work on every cached session (information).

    Cleanup evicts the cached sessions that are not live, and a refresh re-reads the
    cached sessions once another connection has committed (on PostgreSQL, always):
    both in slices, the loop free between them. Not a target of issue 4.
    """
    local = await ss_stalls(ctx, await ctx.fresh_db("stalls.db"))
    on_pg = await ctx.on_pg("stalls", functools.partial(pg_stalls, ctx))
    n = local.cached

    def took(ss: float, pg: float | None) -> str:
        return f"{ss * 1e3:.1f} ms" + (f" (on PostgreSQL {pg * 1e3:.1f} ms)" if pg else "")

    ctx.add(
        Row(
            "8a",
            f"longest loop stall, idle cleanup, {n:,} cached",
            "ms",
            local.cleanup_stall * 1e3,
            None,
            None,
            "how much longer than its millisecond a task beside it waited at worst; the "
            "cleanup pass (nothing to delete) took "
            + took(local.cleanup_seconds, on_pg.cleanup_seconds if on_pg else None),
            pg=on_pg.cleanup_stall * 1e3 if on_pg is not None else None,
        )
    )
    ctx.add(
        Row(
            "8b",
            f"longest loop stall, refresh, {n:,} cached",
            "ms",
            local.refresh_stall * 1e3,
            None,
            None,
            "after another connection committed (none of the sessions changed); the "
            "refresh took " + took(local.refresh_seconds, on_pg.refresh_seconds if on_pg else None),
            pg=on_pg.refresh_stall * 1e3 if on_pg is not None else None,
        )
    )


# ----- main -----

RUNNERS: dict[str, Callable[[Context], Awaitable[None]]] = {
    "create": scenario_create,
    "touch": scenario_touch,
    "get": scenario_get,
    "cleanup": scenario_cleanup,
    "restart": scenario_restart,
    "latency": scenario_latency,
    "memory": scenario_memory,
    "stalls": scenario_stalls,
}


async def connect_redis(ctx: Context) -> None:
    """Use Redis if a server answers on REDIS_URL; otherwise note why not."""
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    if aioredis is None:
        ctx.redis_note = "redis-py is not installed (pip install -e '.[bench]')"
        return
    client = aioredis.Redis.from_url(url, max_connections=1024, socket_connect_timeout=1.0)
    try:
        async with asyncio.timeout(2.0):
            await client.ping()
            server = await client.info("server")
            config = await client.config_get("appendonly")
            fsync = await client.config_get("appendfsync")
    except Exception as exc:
        await client.aclose()
        ctx.redis_note = f"no Redis server answers on {url}: {type(exc).__name__}: {exc}"
        return
    ctx.redis = RedisSide(client, url)
    ctx.redis.info = {
        "version": server.get("redis_version"),
        "appendonly": config.get("appendonly"),
        "appendfsync": fsync.get("appendfsync"),
    }
    # Open the connections the 256-task scenarios use before any timing.
    await asyncio.gather(*(client.ping() for _ in range(ctx.sizes.tasks)))
    ctx.redis_note = (
        f"Redis {ctx.redis.info['version']} on {url} via redis-py {_redis_version()} "
        f"asyncio, keys under {ctx.redis.prefix!r} (deleted after); appendonly="
        f"{ctx.redis.info['appendonly']}, so its writes are not durable on return"
    )


async def connect_pg(ctx: Context, pg: PgSide) -> None:
    """Create the run's PostgreSQL database if a server answers; otherwise note why not.

    ``ctx.pg`` is set only once the database exists and is migrated; ``pg`` is kept by
    the caller either way, so that a database created before a failure is dropped.
    """
    where = pg.server.render_as_string(hide_password=True)
    try:
        async with asyncio.timeout(10.0):
            await pg.create()
    except (OSError, TimeoutError) as exc:
        ctx.pg_note = f"no PostgreSQL server answers on {where}: {type(exc).__name__}: {exc}"
        return
    except Exception as exc:
        ctx.pg_note = f"cannot use PostgreSQL on {where}: {type(exc).__name__}: {exc}"
        return
    ctx.pg = pg
    durable = pg.info["fsync"] == "on" and pg.info["synchronous_commit"] in ("on", "remote_apply")
    ctx.pg_note = (
        f"PostgreSQL {pg.info['version']} on {pg.server.host}:{pg.server.port or 5432} via "
        f"asyncpg {asyncpg.__version__}, database {pg.name} (created for this run, dropped "
        f"after); fsync={pg.info['fsync']}, synchronous_commit={pg.info['synchronous_commit']}"
        + (", so commits are durable on return" if durable else ", so commits are NOT durable")
        + f"; shared_buffers={pg.info['shared_buffers']}; the server is shared (other "
        "processes' tests may be running on it)"
    )


def pg_side(args: argparse.Namespace) -> tuple[PgSide | None, str]:
    """The PostgreSQL contender to try, or why there is none."""
    if args.no_postgres:
        return None, "--no-postgres"
    if asyncpg is None:
        return None, "asyncpg is not installed (pip install -e '.[postgres]')"
    text = os.environ.get("SESSIONSTORE_BENCH_POSTGRES_URL") or DEFAULT_POSTGRES_URL
    try:
        server = make_url(text)
    except Exception as exc:
        return None, f"SESSIONSTORE_BENCH_POSTGRES_URL does not parse: {exc}"
    if server.get_backend_name() != "postgresql":
        return (
            None,
            f"SESSIONSTORE_BENCH_POSTGRES_URL is not a PostgreSQL URL ({server.drivername})",
        )
    return PgSide(server), ""


def _redis_version() -> str:
    import redis

    return str(redis.__version__)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (CI smoke test)")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    parser.add_argument(
        "--scenario",
        nargs="+",
        action="extend",
        choices=SCENARIOS,
        metavar="NAME",
        help=f"run only these ({', '.join(SCENARIOS)})",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="cProfile the sessionstore measurements; .prof files go to DIR",
    )
    parser.add_argument(
        "--set",
        type=parse_setting,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a SessionManager setting for every manager (e.g. cleanup_chunk_rows=500)",
    )
    parser.add_argument(
        "--no-postgres",
        action="store_true",
        help="skip the sessionstore-on-PostgreSQL column (SESSIONSTORE_BENCH_POSTGRES_URL)",
    )
    return parser.parse_args(argv)


async def run(args: argparse.Namespace, pg: PgSide | None) -> int:
    """Run the chosen scenarios; 0 unless one crashed.

    ``pg`` (when not ``None``) is where the run's PostgreSQL database is created; it is
    dropped here on the way out, and again by :func:`main` should this not finish.
    """
    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="sessionstore-bench-"))
    OVERRIDES.update(args.set)
    ctx = Context(args, root)
    ctx.extra["load_start"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    failed: list[str] = []
    try:
        await connect_redis(ctx)
        if pg is not None:
            await connect_pg(ctx, pg)
        else:
            ctx.pg_note = args.pg_skip
        print(
            f"sessionstore {sessionstore.__version__}, Python {platform.python_version()}, "
            f"SQLite {sqlite3.sqlite_version}, {os.cpu_count()} CPUs, load average "
            f"{ctx.extra['load_start']}; {'quick' if ctx.quick else 'full'} run; "
            f"databases in {root}" + (f"; settings {OVERRIDES}" if OVERRIDES else "")
        )
        print(f"Redis: {ctx.redis_note}" if ctx.redis else f"Redis: skipped - {ctx.redis_note}")
        print(f"PostgreSQL: {ctx.pg_note}" if ctx.pg else f"PostgreSQL: skipped - {ctx.pg_note}")
        print(HEADER)
        for name in args.scenario or SCENARIOS:
            try:
                await RUNNERS[name](ctx)
            except Exception:
                failed.append(name)
                print(f"!!! scenario {name} failed:", file=sys.stderr)
                traceback.print_exc()
        failed += [f"{name} (PostgreSQL part)" for name in ctx.pg_failed]
        wall = time.perf_counter() - started
        print_summary(ctx, wall)
        if failed:
            print(f"FAILED scenarios: {', '.join(failed)}")
        if args.json is not None:
            write_json(args.json, ctx, wall, failed)
    finally:
        if ctx.redis is not None:
            with contextlib.suppress(Exception):
                await ctx.redis.delete_all_ours()
            await ctx.redis.client.aclose()
        if pg is not None and pg.created:
            try:
                await pg.drop()
            except Exception as exc:  # main() tries again on a fresh event loop
                print(f"dropping PostgreSQL database {pg.name} failed: {exc}", file=sys.stderr)
        shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


def write_json(path: Path, ctx: Context, wall: float, failed: list[str]) -> None:
    """Every row and target, with the environment."""
    doc = {
        "meta": {
            "sessionstore": sessionstore.__version__,
            "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version,
            "cpus": os.cpu_count(),
            "quick": ctx.quick,
            "sizes": asdict(ctx.sizes),
            "redis": ctx.redis.info if ctx.redis else None,
            "redis_note": ctx.redis_note,
            "postgres": ctx.pg.info if ctx.pg else None,
            "postgres_note": ctx.pg_note,
            "load_start": ctx.extra.get("load_start"),
            "load_end": " / ".join(f"{x:.2f}" for x in os.getloadavg()),
            "settings": OVERRIDES,
            "wall_seconds": wall,
            "failed": failed,
        },
        "rows": [
            {**asdict(r), "ss_raw": r.ss_raw, "ss_redis": r.ss_redis, "pg_ss": r.pg_ss}
            for r in ctx.rows
        ],
        "targets": [{**asdict(t), "status": t.status} for t in ctx.targets],
        "extra": ctx.extra,
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")


def _terminate(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run, and make sure the run's PostgreSQL database is dropped."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    pg, args.pg_skip = pg_side(args)
    previous = signal.signal(signal.SIGTERM, _terminate)  # SIGTERM cleans up like Ctrl-C
    try:
        return asyncio.run(run(args, pg))
    except KeyboardInterrupt as exc:
        print(f"\ninterrupted ({exc or 'Ctrl-C'}): no results", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        if pg is not None and pg.created:  # run() was interrupted before it dropped it
            pg.conn = None  # belonged to the finished event loop; the server closes it
            try:
                asyncio.run(pg.drop())
                print(f"dropped PostgreSQL database {pg.name}", file=sys.stderr)
            except Exception as exc:
                print(
                    f"could not drop PostgreSQL database {pg.name} ({exc}); drop it with: "
                    f'DROP DATABASE "{pg.name}" WITH (FORCE)',
                    file=sys.stderr,
                )


if __name__ == "__main__":
    sys.exit(main())
