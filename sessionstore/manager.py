"""SessionManager: the in-memory manager's API, persisted.

Policy lives here (what is expired, the limit, when to clean up, what to cache);
SQL lives in :mod:`sessionstore.store`; every write goes through the
:class:`~sessionstore.writer.GroupCommitWriter`.

Durability: ``ensure`` (when it creates), ``remove``, ``set_data`` and token changes
return only after their transaction has committed. ``update_activity`` changes memory
at once and reaches the database within ``flush_interval_secs`` (and on ``aclose``):
a crash can lose at most that much activity time, never a session.

Expiry is a predicate, not a deletion: a session whose ``last_activity`` is more than
``session_timeout_secs`` ago is absent from the first moment, whether or not cleanup
has deleted its row yet.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
import struct
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import Connection

from .batching import BatchLoader
from .config import DEFAULT_DATABASE, Settings
from .errors import (
    DataTooLargeError,
    InvalidDataError,
    ManagerClosedError,
    SessionLimitError,
    SessionNotFoundError,
    StorageError,
    VersionConflictError,
)
from .session import Session, new_session_id
from .store import CreateResult, NewRow, NewSession, SessionRow, SessionStore, dumps, loads
from .writer import GroupCommitWriter, each_write

__all__ = ["RecoveryReport", "RemovalListener", "ResumeResult", "SessionManager"]

log = logging.getLogger("sessionstore.manager")

#: Called with ``(session_id, reason)`` after a session is gone; reason is
#: ``"removed"`` or ``"expired"``.
RemovalListener = Callable[[str, str], None]

ResumeReason = Literal["unknown", "expired", "revoked"]


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    """What start-up found: sessions restored, and sessions that expired while down."""

    restored: int
    expired: int
    seconds: float


@dataclass(frozen=True, slots=True)
class ResumeResult:
    """The outcome of :meth:`SessionManager.resume`: a session, or why there is none."""

    session: Session | None
    reason: ResumeReason | None


@dataclass(frozen=True, slots=True)
class _DataChange:
    session_id: str
    update: Mapping[str, Any]
    delete: tuple[str, ...]
    replace: bool
    if_version: int | None


@dataclass(frozen=True, slots=True)
class _Conflict:
    """A data change refused by ``if_version``, with the row that is there instead.

    Handlers run in the writer's thread on SQLite, so the row is cached by the caller
    on the event loop rather than by the handler.
    """

    error: VersionConflictError
    row: SessionRow


# A cached session is one bytes object: created_at and last_activity (float64),
# version (int64), then the data's JSON text in UTF-8. One object instead of a record
# with four attributes keeps memory per cached session at about what Redis needs.
_Entry = bytes
_HEAD = struct.Struct("<ddq")
_TIME = struct.Struct("<d")


def _pack(created_at: float, last_activity: float, version: int, data: str) -> _Entry:
    return _HEAD.pack(created_at, last_activity, version) + data.encode()


def _created(entry: _Entry | None) -> float | None:
    return None if entry is None else float(_TIME.unpack_from(entry, 0)[0])


def _last(entry: _Entry) -> float:
    return float(_TIME.unpack_from(entry, 8)[0])


def _copy_of(entry: _Entry) -> tuple[float, int]:
    """Which copy of a session an entry holds: its ``(created_at, version)``."""
    created_at, _last, version = _HEAD.unpack_from(entry)
    return created_at, version


def _touched(entry: _Entry, last_activity: float) -> _Entry:
    return entry[:8] + _TIME.pack(last_activity) + entry[16:]


_SCALARS = frozenset({str, int, float, bool, type(None)})


def _flat(data: Mapping[str, Any]) -> bool:
    """True for a dict of plain ``str`` keys and plain scalar values.

    Such a dict is its own JSON form: a copy of it is what parsing its JSON text would
    give, at a fifth of the cost.
    """
    if type(data) is not dict:
        return False
    for k, v in data.items():  # noqa: SIM110 - a loop, not all(<generator>): half the cost
        if type(k) is not str or type(v) not in _SCALARS:
            return False
    return True


def _valid_id(session_id: object) -> bool:
    """Ids are non-empty printable text (so they can be stored, logged and compared)."""
    return isinstance(session_id, str) and session_id != "" and session_id.isprintable()


#: Activity stamps further ahead of a cleanup's clock than this (plus the lock wait)
#: are taken for a clock that jumped back, and pulled back to it.
_CLOCK_JUMP_SECS = 60.0

#: The largest adaptive cleanup chunk (rows).
_CHUNK_ROWS_MAX = 100_000

#: Cached sessions re-read by one step of :meth:`SessionManager.refresh` (four ``IN``
#: reads of their rows' heads, then their data where those differ; the event loop runs
#: other tasks between steps).
_REFRESH_SLICE = 2048

#: Cached sessions checked between two yields to the event loop by cleanup's eviction
#: (about 1 ms of the loop's time each).
_EVICT_SLICE = 10_000

#: How much longer a cleanup chunk may take while no other write waits for the writer.
_IDLE_CHUNK_FACTOR = 4


def _next_chunk_rows(rows: int, took: float, target: float, first: int) -> int:
    """The size of the cleanup chunk after one of ``rows`` that took ``took`` seconds.

    Aimed at ``target`` seconds, at most double the last, never below ``first`` (the
    configured size: where every commit is slow, such as on a slow disk, chunks stay
    what they would be without adapting); ``target`` 0 keeps ``rows``. The idea of
    pt-archiver's and pt-online-schema-change's ``--chunk-time``.
    """
    if target <= 0:
        return rows
    aimed = int(rows * target / max(took, 1e-9))
    return max(first, min(aimed, 2 * rows, _CHUNK_ROWS_MAX))


class _Fills:
    """Counts reads whose rows go into the cache: ``with fills.reading() as since:``
    around each.

    And remembers which sessions this manager deleted while such reads ran, so that a
    read that began before a delete cannot cache the deleted row: a row of a session
    deleted after its read began (a higher ``epoch`` than the read's ``since``) is
    treated as absent (:meth:`overtaken`). A mark is kept only while a read that
    began before it runs.
    """

    __slots__ = ("_marks", "_reads", "_starts", "epoch", "gone", "running", "started")

    def __init__(self) -> None:
        self.started = 0
        self.running = 0
        self.epoch = 0
        self.gone: dict[str, tuple[int, str]] = {}  # id -> (epoch, grave)
        # Epochs only grow, so both of these are oldest first, pruned from the front:
        self._reads: dict[int, int] = {}  # the running reads' start epochs -> how many
        self._starts: deque[int] = deque()  # those epochs (ended ones until pruned)
        self._marks: deque[tuple[int, str]] = deque()  # (epoch, id) of each mark

    def reading(self) -> _Reading:
        """A read for the cache: entered, it gives the epoch the read began at."""
        return _Reading(self)

    def begin(self) -> int:
        """A read begins: the epoch it began at."""
        since = self.epoch
        self.started += 1
        self.running += 1
        count = self._reads.get(since, 0)
        self._reads[since] = count + 1
        if not count and (not self._starts or self._starts[-1] != since):
            self._starts.append(since)
        return since

    def end(self, since: int) -> None:
        """The read that began at ``since`` is over; drop the marks no running read
        predates (each mark and start is dropped once: no scan per read)."""
        self.running -= 1
        count = self._reads[since] - 1
        if count:
            self._reads[since] = count
            return
        del self._reads[since]
        starts, reads = self._starts, self._reads
        while starts and starts[0] not in reads:
            starts.popleft()
        marks, gone = self._marks, self.gone
        while marks and (not starts or marks[0][0] <= starts[0]):
            epoch, sid = marks.popleft()
            mark = gone.get(sid)
            if mark is not None and mark[0] == epoch:  # not marked again since
                del gone[sid]

    def deleted(self, session_ids: Collection[str], grave: str) -> None:
        """These sessions were deleted; ``grave``: what their tombstones say."""
        if self.running:
            self.epoch += 1
            mark = (self.epoch, grave)
            for sid in session_ids:
                self.gone[sid] = mark
                self._marks.append((self.epoch, sid))

    def overtaken(self, session_id: str, since: int) -> str | None:
        """The grave of ``session_id`` if it was deleted after epoch ``since``, else None."""
        mark = self.gone.get(session_id)
        return mark[1] if mark is not None and mark[0] > since else None


class _Reading:
    """One read of :class:`_Fills` (a context manager giving its ``since``)."""

    __slots__ = ("_fills", "_since")

    def __init__(self, fills: _Fills) -> None:
        self._fills = fills
        self._since = 0

    def __enter__(self) -> int:
        self._since = self._fills.begin()
        return self._since

    def __exit__(self, *_exc: object) -> None:
        self._fills.end(self._since)


def hash_token(token: str) -> str:
    """SHA-256 hex digest of a resume token: the only form a token is stored in."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


class SessionManager:
    """Persistent sessions with the in-memory SessionManager's API.

    Args:
        database: A SQLite path or a SQLAlchemy URL; default ``SESSIONSTORE_DATABASE``,
            else ``sessions.db`` in the working directory.
        session_timeout_secs: Idle seconds after which a session expires.
        max_concurrent_sessions: Live sessions allowed at once (0 means no limit).
        cleanup_interval_secs: Seconds between periodic cleanup passes.
        clock: Zero-argument callable returning Unix epoch seconds; every judgement
            of time uses it (always from the event loop's thread).
        settings: A :class:`~sessionstore.config.Settings`; keyword arguments given
            here override it.
        background_tasks: Run the periodic cleanup and refresh tasks (admin tools that
            open the database for one command turn them off).
        log_recovery: Log the start-up line with the recovery counts (a daemon that
            logs its own start-up line, with the same counts, turns it off).
        **options: Any other :class:`~sessionstore.config.Settings` field
            (``flush_interval_secs``, ``max_data_bytes``, ``synchronous``, ...).

    Use it as ``async with SessionManager(...) as manager:``, or call ``await
    start()`` and ``await aclose()``.
    """

    def __init__(
        self,
        database: str | None = None,
        *,
        session_timeout_secs: float | None = None,
        max_concurrent_sessions: int | None = None,
        cleanup_interval_secs: float | None = None,
        clock: Callable[[], float] = time.time,
        settings: Settings | None = None,
        background_tasks: bool = True,
        log_recovery: bool = True,
        **options: Any,
    ) -> None:
        unknown = set(options) - set(Settings.field_names())
        if unknown:
            raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))}")
        if settings is None:
            settings = Settings(
                database=os.environ.get("SESSIONSTORE_DATABASE") or DEFAULT_DATABASE
            )
        overrides = {
            "database": database,
            "session_timeout_secs": session_timeout_secs,
            "max_concurrent_sessions": max_concurrent_sessions,
            "cleanup_interval_secs": cleanup_interval_secs,
            **options,
        }
        self.settings = settings.with_(**{k: v for k, v in overrides.items() if v is not None})
        self._clock = clock
        self._background = background_tasks
        self._log_recovery = log_recovery
        self._store = SessionStore(
            self.settings.database,
            synchronous=self.settings.synchronous,
            busy_timeout_ms=self.settings.busy_timeout_ms,
            pool_size=self.settings.pool_size,
            checkpoint_interval_secs=self.settings.checkpoint_interval_secs,
        )
        self._cache: dict[str, _Entry] = {}
        #: The store's change marker when every cached session was last known current.
        self._fresh_as_of: object | None = None
        # Reads that will put a row into the cache (see refresh()).
        self._fills = _Fills()
        # Counts the times such a read may have been overtaken by a write of ours.
        self._stale_fill_marks = 0
        # Cache misses and resumes made at the same time share one query.
        self._row_loader: BatchLoader[str, SessionRow] = BatchLoader(self._fetch_rows)
        self._token_loader: BatchLoader[str, tuple[SessionRow | None, str | None]] = BatchLoader(
            self._fetch_tokens
        )
        self._listeners: list[RemovalListener] = []
        self._writer: GroupCommitWriter | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._state: Literal["new", "running", "closed"] = "new"
        self._start_lock = asyncio.Lock()
        self._teardown: asyncio.Future[None] | None = None
        #: Start-up counts, once :meth:`recovered` has them (``None`` until then).
        self.recovery: RecoveryReport | None = None
        self._recovery_done = asyncio.Event()
        self.counters = {"created": 0, "removed": 0, "expired": 0, "cleanup_runs": 0}
        self.last_cleanup_seconds = 0.0

    @classmethod
    def from_env(cls, **overrides: Any) -> SessionManager:
        """A manager configured from ``SESSION_*`` / ``SESSIONSTORE_*`` variables.

        Keyword arguments (``None`` ignored) override the environment; ``clock`` is
        passed through.
        """
        clock = overrides.pop("clock", time.time)
        return cls(settings=Settings.from_env(**overrides), clock=clock)

    # ----- properties kept from the in-memory manager -----

    @property
    def session_timeout_secs(self) -> float:
        """Idle seconds after which a session expires."""
        return self.settings.session_timeout_secs

    @property
    def max_concurrent_sessions(self) -> int:
        """Live sessions allowed at once (0: no limit)."""
        return self.settings.max_concurrent_sessions

    @property
    def cleanup_interval_secs(self) -> float:
        """Seconds between periodic cleanup passes."""
        return self.settings.cleanup_interval_secs

    @property
    def database(self) -> str:
        """The database path or URL (password hidden)."""
        return self._store.label

    @property
    def store(self) -> SessionStore:
        """The repository underneath (for admin tools and tests)."""
        return self._store

    def now(self) -> float:
        """The injected clock's current time."""
        return self._clock()

    # ----- lifecycle -----

    async def __aenter__(self) -> SessionManager:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Open the database, migrate, recover, start the writer and cleanup tasks.

        Recovery counts live and expired rows (index range counts), logs one line,
        and deletes the expired rows in the background in chunks; expired rows are
        already invisible, so start-up does not wait for that delete.

        Raises:
            ManagerClosedError: the manager was closed; make a new one.
            StorageError: the database cannot be used (its subclass says why).
        """
        async with self._start_lock:
            if self._state == "running":
                return
            if self._state == "closed":
                raise ManagerClosedError("session manager is closed; create a new one")
            started = time.perf_counter()
            check_limit = self.settings.startup_check_max_bytes
            await self._store.open(check_max_bytes=check_limit)
            try:
                # The cache is empty: whatever it holds later is read after this marker.
                self._fresh_as_of = await self._store.change_marker()
            except BaseException:
                await self._store.close()
                raise
            self._writer = GroupCommitWriter(
                self._store,
                {
                    "create": self._apply_new,
                    "ensure": self._apply_creates,
                    "delete": self._apply_deletes,
                    "data": self._apply_data_changes,
                    "token": self._apply_tokens,
                    "cleanup": self._apply_cleanup_chunk,
                },
                # Bound here, once, not per write: a bound method made per create
                # made the young collections run 4-5 times as often and set off full
                # ones of 40-55 ms (measured).
                on_commit={
                    "create": self._on_new,
                    "ensure": each_write(self._on_created),
                    "delete": each_write(self._on_removed),
                    "data": each_write(self._on_data_changed),
                    "cleanup": each_write(self._on_expired),
                },
                exclusive=("cleanup",),
                # Deleting expired rows is as good redone as lost: a chunk that a power
                # loss undoes leaves rows the predicate already treats as absent.
                relaxed=("cleanup",),
                flush_interval=self.settings.flush_interval_secs,
                clock=self._clock,
            )
            self._writer.start()
            self._state = "running"
            # Counting rows is O(rows): it runs after start() returns, so that a
            # database of a million sessions is ready as fast as one of a thousand.
            self._tasks.append(
                asyncio.create_task(self._recover(started), name="sessionstore-recovery")
            )
            if not self._background:
                return
            if self.settings.refresh_interval_secs:
                self._tasks.append(
                    asyncio.create_task(self._refresh_loop(), name="sessionstore-refresh")
                )

    async def recovered(self) -> RecoveryReport:
        """Wait for the start-up counts: sessions restored, and expired while down.

        Raises:
            ManagerClosedError: the manager is not running.
            StorageError: counting failed (the error is also logged).
        """
        self._running_writer()
        await self._recovery_done.wait()
        if self.recovery is None:
            raise StorageError(f"{self._store.label}: start-up recovery failed; see the log")
        return self.recovery

    async def _recover(self, started: float) -> None:
        try:
            restored, expired = await self._store.count_split(self._cutoff())
        except StorageError:
            log.exception("start-up recovery of %s failed", self._store.label)
            return
        finally:
            self._recovery_done.set()
        self.recovery = RecoveryReport(restored, expired, time.perf_counter() - started)
        log.log(
            logging.INFO if self._log_recovery else logging.DEBUG,
            "opened %s: %d live sessions restored, %d expired while down",
            self._store.label,
            restored,
            expired,
        )
        if self._background:
            await self._cleanup_loop(initial=expired > 0)

    async def aclose(self) -> None:
        """Stop the cleanup task, flush pending writes, close the database (idempotent).

        Concurrent and repeated calls share one teardown, which a cancelled caller does
        not cut short: the pending activity is written and the writer stopped all
        the same.
        """
        async with self._start_lock:
            if self._teardown is None:
                self._state = "closed"
                self._teardown = asyncio.ensure_future(self._tear_down())
        await asyncio.shield(self._teardown)

    async def _tear_down(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._row_loader.aclose()
        await self._token_loader.aclose()
        try:
            if self._writer is not None:
                await self._writer.aclose()
        finally:
            self._cache.clear()
            self._fresh_as_of = None
            await self._store.close()

    @property
    def closed(self) -> bool:
        """True once ``aclose()`` has run."""
        return self._state == "closed"

    def _running_writer(self) -> GroupCommitWriter:
        if self._state != "running" or self._writer is None:
            if self._state == "new":
                raise ManagerClosedError(
                    "session manager is not started: use 'async with' or await start()"
                )
            raise ManagerClosedError("session manager is closed")
        return self._writer

    # ----- time policy -----

    def _cutoff(self, now: float | None = None) -> float:
        return (self._clock() if now is None else now) - self.settings.session_timeout_secs

    def _expired(self, last_activity: float, now: float) -> bool:
        return last_activity < now - self.settings.session_timeout_secs

    # ----- the API -----

    async def ensure(
        self, session_id: str | None = None, *, data: Mapping[str, Any] | None = None
    ) -> Session:
        """Get the live session ``session_id``, or create it (durable on return).

        Args:
            session_id: The id to get or create; a new unique id when ``None``.
            data: Initial data for a session that is created (ignored for one that
                exists).

        Raises:
            SessionLimitError: creating it would exceed ``max_concurrent_sessions``.
            DataTooLargeError, InvalidDataError: ``data`` is unusable.
            StorageError: the write failed; nothing was created.
        """
        writer = self._writer
        if writer is None or self._state != "running":
            writer = self._running_writer()  # raises
        now = self._clock()
        if session_id is not None:
            if not _valid_id(session_id):
                raise ValueError("session_id must be a non-empty string of printable characters")
            live = await self._live_entry(session_id)
            if live is not None:
                return self._snapshot(session_id, live)
        if not data:
            text, returned = "{}", {}
        elif _flat(data):
            # Copied now: the caller may change ``data`` while the write is in flight.
            text, returned = self._encode(data, True), dict(data)
        else:
            text = self._encode(data)
            returned = loads(text)
        if session_id is None:
            # A generated id is new: no row to look for, the row itself is the request.
            new_id = new_session_id()
            if await writer.submit("create", (new_id, now, now, text, 1)):
                return Session(new_id, now, now, returned, 1)
            raise SessionLimitError(self.settings.max_concurrent_sessions)
        new = NewSession(session_id, now, text, True)
        outcome: _Entry | bool = await writer.submit("ensure", new)
        if outcome is True:
            return Session(session_id, now, now, returned, 1)
        if outcome is False:
            raise SessionLimitError(self.settings.max_concurrent_sessions)
        return self._snapshot(session_id, outcome)  # it existed: get-or-create

    async def get(self, session_id: str) -> Session | None:
        """The live session with this id, or ``None`` when absent or expired."""
        entry = self._cache.get(session_id)
        if (
            entry is not None
            and self._state == "running"
            and not self._expired(_last(entry), self._clock())
        ):
            return self._snapshot(session_id, entry)  # the hot path: no database, no await
        entry = await self._live_entry(session_id)
        return self._snapshot(session_id, entry) if entry is not None else None

    async def remove(self, session_id: str) -> bool:
        """Delete the session (durable on return); True if there was one to delete.

        A resume with the session's token afterwards fails with reason ``revoked``.
        """
        writer = self._running_writer()
        if not _valid_id(session_id):
            return False
        existed: bool = await writer.submit("delete", session_id)
        return existed

    async def list_ids(self) -> list[str]:
        """Ids of every live session, most recently active first."""
        await self._running_writer().flush()
        return await self._store.live_ids(self._cutoff())

    async def list_sessions(self, limit: int | None = None) -> list[Session]:
        """Live sessions, most recently active first (at most ``limit``)."""
        await self._running_writer().flush()
        rows = await self._store.live_rows(self._cutoff(), limit)
        return [self._row_snapshot(row) for row in rows]

    async def update_activity(self, session_id: str) -> bool:
        """Mark the session active now. False when there is no live session to mark.

        Memory changes at once; the database within ``flush_interval_secs``.
        """
        writer = self._running_writer()
        entry = await self._live_entry(session_id)
        if entry is None:
            return False
        now = self._clock()
        self._cache[session_id] = _touched(entry, now)
        writer.touch(session_id, now)
        return True

    def is_session_timed_out(self, session: Session) -> bool:
        """True when the session is closed or idle longer than the timeout.

        Judged on this manager's latest view of the session's activity (newer than the
        snapshot when ``update_activity`` ran since). Idle time is never negative.
        """
        if session.closed:
            return True
        entry = self._cache.get(session.session_id)
        last = _last(entry) if entry is not None else session.last_activity
        return self._expired(last, self._clock())

    async def cleanup_stale_sessions(self, *, progress: Callable[[int], None] | None = None) -> int:
        """Delete every expired session (in chunks); returns how many were deleted.

        A row is deleted once it has looked expired for longer than
        ``flush_interval_secs``: another process on the database may hold activity
        for it that it has not written yet. (It is absent from the first moment all
        the same.)

        Each chunk is its own short transaction, so the write lock is never held for
        long. The first chunk has ``cleanup_chunk_rows`` rows; later ones are sized
        from the rows per second of the one before to take about
        ``cleanup_chunk_secs`` (rows that lie together in the file delete many times
        faster than rows spread over it), or four times that while no other write is
        waiting for the writer. ``progress`` hears each chunk's count.
        """
        writer = self._running_writer()
        started = time.perf_counter()
        now = self._clock()
        # Activity this manager holds in memory goes to the database first, so the
        # chunks judge expiry on it (they carry no touches themselves). A touch made
        # after this point is of a session live at ``now``: its stored activity is
        # already at or after the cutoff, so no chunk deletes it either way.
        await writer.flush()
        await self._evict_not_live(now)
        total, rows, first = 0, self.settings.cleanup_chunk_rows, True
        while True:
            chunk_started = time.perf_counter()
            deleted: list[str] = await writer.submit("cleanup", (now, first, rows))
            took, first = time.perf_counter() - chunk_started, False
            total += len(deleted)
            if progress is not None:
                progress(len(deleted))
            if len(deleted) < rows:
                break
            target = self.settings.cleanup_chunk_secs
            if not writer.busy:
                # Nobody to keep waiting: fewer, longer transactions (each costs ~1 ms
                # of its own). The next write that comes waits for at most this chunk,
                # and the one after is short again.
                target *= _IDLE_CHUNK_FACTOR
            rows = _next_chunk_rows(rows, took, target, self.settings.cleanup_chunk_rows)
        self.counters["cleanup_runs"] += 1
        self.last_cleanup_seconds = time.perf_counter() - started
        if total:
            log.info(
                "cleanup deleted %d expired sessions in %.3fs", total, self.last_cleanup_seconds
            )
        return total

    async def _evict_not_live(self, now: float) -> None:
        """Drop the cached sessions expired at ``now``, and those stamped later than the
        clock (it jumped back: cleanup's first chunk clamps their rows, reload them).

        In slices of :data:`_EVICT_SLICE`, yielding to the event loop between them: in
        one pass, and a second one after the chunks, 100,000 cached sessions held the
        loop for 14-21 ms (benchmark row 8a and probes), a million for ten times that.
        """
        cache, stamp = self._cache, _TIME.unpack_from  # _last() inlined: once a session
        oldest = now - self.settings.session_timeout_secs
        keys = list(cache)
        for start in range(0, len(keys), _EVICT_SLICE):
            if start:
                await asyncio.sleep(0)
            latest = self._clock()  # sessions touched while this one yielded are not ahead
            for sid in keys[start : start + _EVICT_SLICE]:
                entry = cache.get(sid)
                if entry is not None and not oldest <= stamp(entry, 8)[0] <= latest:
                    del cache[sid]

    async def get_session_metrics(self) -> dict[str, Any]:
        """Session counts and ages (seconds), as the in-memory manager reported them.

        Keys: ``total_sessions`` (rows stored, including expired ones cleanup has not
        deleted yet), ``active_sessions`` (live), ``oldest_session_age``,
        ``newest_session_age``, ``avg_session_age`` (over live sessions; 0 when none),
        plus ``max_concurrent_sessions``, ``session_timeout_secs``, ``cached_sessions``,
        ``pending_activity``, ``flush_lag_seconds`` (how long the last write
        transaction took) and the lifetime counters.
        """
        writer = self._running_writer()
        await writer.flush()
        now = self._clock()
        agg = await self._store.aggregates(self._cutoff(now))

        def age(created: float | None) -> float:
            return max(0.0, now - created) if created is not None else 0.0

        return {
            "total_sessions": agg["total"],
            "active_sessions": agg["live"],
            "oldest_session_age": age(agg["min_created"]),
            "newest_session_age": age(agg["max_created"]),
            "avg_session_age": age(agg["avg_created"]),
            "max_concurrent_sessions": self.settings.max_concurrent_sessions,
            "session_timeout_secs": self.settings.session_timeout_secs,
            "cached_sessions": len(self._cache),
            "pending_activity": writer.pending_touches,
            "flush_lag_seconds": writer.last_flush_lag,
            **{f"sessions_{k}_total": v for k, v in self.counters.items()},
        }

    async def set_data(
        self,
        session_id: str,
        data: Mapping[str, Any] | None = None,
        *,
        delete: Iterable[str] = (),
        replace: bool = False,
        if_version: int | None = None,
    ) -> Session:
        """Change the session's data (durable on return) and return the new snapshot.

        Args:
            session_id: A live session.
            data: Keys to set (a shallow merge), or the whole new data with ``replace``.
            delete: Keys to remove.
            replace: Replace the data instead of merging into it.
            if_version: Compare-and-set: apply only if the current version is this.

        Raises:
            SessionNotFoundError: no live session with that id.
            VersionConflictError: ``if_version`` did not match; nothing changed.
            DataTooLargeError, InvalidDataError: the result would be unusable.
        """
        writer = self._running_writer()
        if not _valid_id(session_id):
            raise SessionNotFoundError(session_id)
        # Encoded and parsed back here, on the event loop: the check fails early, and
        # the writer (a thread of its own on SQLite) gets a private deep copy rather
        # than objects the caller may still be changing.
        update = loads(self._encode(dict(data or {})))
        change = _DataChange(session_id, update, tuple(delete), replace, if_version)
        result: _Entry | _Conflict = await writer.submit("data", change)
        if isinstance(result, _Conflict):
            raise result.error
        return self._snapshot(session_id, result)

    # ----- resume tokens (the daemon's bearer credential) -----

    async def issue_token(self, session_id: str, *, replacing: str | None = None) -> str:
        """Give the session a fresh resume token; the previous one stops working.

        Only the token's SHA-256 is stored. Returns the raw token (>= 256 bits).

        Args:
            session_id: The session.
            replacing: The token the caller resumed with: the new one is issued only
                if that is still the session's token, so that two clients resuming
                with one token at once cannot both get the session.

        Raises:
            SessionNotFoundError: no live session with that id (or ``replacing`` is
                no longer its token).
        """
        if not _valid_id(session_id):
            raise SessionNotFoundError(session_id)
        token = secrets.token_urlsafe(32)
        expected = None if replacing is None else hash_token(replacing)
        request = (session_id, hash_token(token), expected)
        ok: bool = await self._running_writer().submit("token", request)
        if not ok:
            raise SessionNotFoundError(session_id)
        return token

    async def resume(self, token: str) -> ResumeResult:
        """The live session that ``token`` belongs to, or the reason there is none.

        Reasons: ``expired`` (idle past the timeout, deleted or not yet), ``revoked``
        (removed, logged out, or a token that has since been rotated), ``unknown``
        (anything else). Every token costs the same two indexed lookups by its hash,
        whatever its shape, so the reason does not leak through timing; concurrent
        resumes (a restart's reconnect storm) share those lookups.
        """
        self._running_writer()
        fills = self._fills
        with fills.reading() as since:
            row, grave = await self._token_loader.load(hash_token(token)) or (None, None)
            if row is not None and (gone := fills.overtaken(row.session_id, since)):
                row, grave = None, gone  # deleted here since this call began
            if row is None:
                reason: ResumeReason = "expired" if grave == "expired" else "revoked"
                return ResumeResult(None, reason if grave else "unknown")
            entry = self._remember(row)
        if self._expired(_last(entry), self._clock()):
            self._cache.pop(row.session_id, None)
            return ResumeResult(None, "expired")
        return ResumeResult(self._snapshot(row.session_id, entry), None)

    async def refresh(self, session_ids: Iterable[str] | None = None) -> list[str]:
        """Re-read cached sessions; forget those another process deleted.

        Another process on the same database (the admin CLI, a second daemon) may
        delete or change a session this manager holds in memory. The manager runs this
        every ``refresh_interval_secs`` for every cached session, which bounds how long
        it can serve such a stale session; call it directly to look now.

        Args:
            session_ids: Which cached sessions to check (default: all of them).

        On SQLite the re-read is skipped while no other connection has committed
        since every cached session was last read (``PRAGMA data_version``): a daemon
        alone on its database pays nothing for this, however many sessions it holds.

        Returns:
            The ids found deleted; removal listeners hear of them (reason ``removed``).
        """
        self._running_writer()
        fills_started, fills_running = self._fills.started, self._fills.running
        stale_fill_marks = self._stale_fill_marks
        marker = await self._store.change_marker()
        if marker is not None and marker == self._fresh_as_of:
            return []  # no other connection has committed since the cache was last read
        # A row read before ``marker`` and cached after ``ids`` is taken below may be
        # older than a commit the marker counts: then the marker vouches for nothing.
        vouches = (
            session_ids is None and fills_running == 0 and self._fills.started == fills_started
        )
        ids = list(self._cache if session_ids is None else session_ids)
        gone: list[str] = []
        # A slice at a time, the event loop free between them: in one piece, 100,000
        # cached sessions held it for 213-221 ms (benchmark row 8b).
        for start in range(0, len(ids), _REFRESH_SLICE):
            if start:
                self._running_writer()  # closed meanwhile: say so, not "store is closed"
            part = ids[start : start + _REFRESH_SLICE]
            seen = {sid: _created(self._cache.get(sid)) for sid in part}
            found, changed = await self._refresh_heads(part)
            # Gone only if the cached session is the one the read was about: one
            # created here (again) while the read ran is not judged by it. Activity
            # and data changes meanwhile do not make it another session.
            deleted = [
                sid
                for sid in part
                if sid not in found
                and seen[sid] is not None
                and _created(self._cache.get(sid)) == seen[sid]
            ]
            if changed:
                # Their data, in a second read: one deleted in between is found by the
                # next refresh (the change marker moved after ``marker``). A row goes
                # onto the same session's copy (``_remember`` keeps the later version),
                # or onto the copy its head was compared with; not onto a session that
                # a write of ours removed, or created again, while it was read.
                for row in await self._store.fetch_many(list(changed)):
                    entry = self._cache.get(row.session_id)
                    if entry is not None and (
                        _created(entry) == row.created_at
                        or _copy_of(entry) == changed[row.session_id]
                    ):
                        self._remember(row)
            self._gone(deleted, "removed")
            gone += deleted
        if vouches and self._stale_fill_marks == stale_fill_marks:
            # Every cached session has now been read, or cached, after ``marker``, and
            # no read that cached one was overtaken by a write of ours meanwhile.
            self._fresh_as_of = marker
        return gone

    async def _refresh_heads(
        self, session_ids: list[str]
    ) -> tuple[set[str], dict[str, tuple[float, int]]]:
        """Read the heads of these sessions' rows; bring cached copies up to date.

        A copy with the row's ``created_at`` (the same session, not one created again
        under its id) at the row's version or later is current but for activity,
        which is taken when the row's is later: no data read, nothing made but the new
        stamp. (A session removed and created again elsewhere at the very same clock
        reading, and at the same version, passes for the one cached: only a clock
        coarser than the time between the two can do that.) Returns the ids found, and
        the cached copies, as ``(created_at, version)``, whose rows differ from them
        (their data is read next).
        """
        cache, head = self._cache, _HEAD.unpack_from
        found: set[str] = set()
        changed: dict[str, tuple[float, int]] = {}
        for sid, created_at, last_activity, version in await self._store.fetch_heads(session_ids):
            found.add(sid)
            entry = cache.get(sid)
            if entry is None:
                continue
            cached_at, cached_last, cached_version = head(entry)
            if cached_at != created_at or cached_version < version:
                changed[sid] = (cached_at, cached_version)
            elif last_activity > cached_last:
                cache[sid] = _touched(entry, last_activity)
        return found, changed

    # ----- removal notifications -----

    def add_removal_listener(self, listener: RemovalListener) -> None:
        """Call ``listener(session_id, reason)`` whenever this manager deletes a session."""
        self._listeners.append(listener)

    def remove_removal_listener(self, listener: RemovalListener) -> None:
        """Stop calling ``listener``."""
        self._listeners.remove(listener)

    def _gone(self, session_ids: Collection[str], reason: str) -> None:
        if not session_ids:
            return
        cache, writer, listeners = self._cache, self._writer, list(self._listeners)
        for sid in session_ids:
            cache.pop(sid, None)
        self._fills.deleted(session_ids, "expired" if reason == "expired" else "revoked")
        self._stale_fills_possible()
        if writer is not None:
            writer.forget(session_ids)
        self.counters["removed" if reason == "removed" else "expired"] += len(session_ids)
        for listener in listeners:
            for sid in session_ids:
                try:
                    listener(sid, reason)
                except (KeyboardInterrupt, SystemExit):
                    raise
                except BaseException:  # even CancelledError: the removal stands
                    log.exception("removal listener failed for session %s", sid)

    # ----- cache -----

    async def _live_entry(self, session_id: str) -> _Entry | None:
        self._running_writer()
        now = self._clock()
        entry = self._cache.get(session_id)
        if entry is None:
            if not _valid_id(session_id):
                return None
            fills = self._fills
            with fills.reading() as since:
                row = await self._row_loader.load(session_id)
                entry = self._cache.get(session_id)  # created while the read ran, say
                if entry is None:
                    if row is None or fills.overtaken(session_id, since) is not None:
                        return None
                    entry = self._remember(row)
        if self._expired(_last(entry), now):
            self._cache.pop(session_id, None)
            return None
        return entry

    def _stale_fills_possible(self) -> None:
        """A write of ours landed while a read for the cache ran: that read may cache
        the row as it was (a session deleted here, an earlier incarnation). Our own
        commits do not move the change marker, so let the next refresh look again."""
        if self._fills.running:
            self._fresh_as_of = None
            self._stale_fill_marks += 1  # and a refresh running now must not vouch either

    async def _fetch_rows(self, session_ids: list[str]) -> dict[str, SessionRow]:
        # Counted as a whole too: a caller may join this read while it runs. A row
        # this manager deleted while the read ran is absent: the caller may have
        # joined after the delete returned.
        fills = self._fills
        with fills.reading() as since:
            rows = await self._store.fetch_many(session_ids)
            return {
                row.session_id: row
                for row in rows
                if fills.overtaken(row.session_id, since) is None
            }

    async def _fetch_tokens(
        self, token_hashes: list[str]
    ) -> Mapping[str, tuple[SessionRow | None, str | None]]:
        fills = self._fills
        with fills.reading() as since:
            found = await self._store.resume_lookup(token_hashes)
            for digest, (row, _grave) in found.items():
                grave = None if row is None else fills.overtaken(row.session_id, since)
                if grave is not None:  # deleted here while the read ran
                    found[digest] = (None, grave)
            return found

    def _remember(self, row: SessionRow) -> _Entry:
        """Cache the row; activity this manager saw later than the row's is kept.

        A row older than the cached entry (a read that began before this manager's
        own write committed) changes nothing but the activity time.
        """
        cached = self._cache.get(row.session_id)
        if cached is None:
            last = row.last_activity
        else:
            created_at, last, version = _HEAD.unpack_from(cached)
            if created_at == row.created_at and version > row.version:
                if row.last_activity > last:
                    cached = self._cache[row.session_id] = _touched(cached, row.last_activity)
                return cached
            last = max(last, row.last_activity)
        entry = self._cache[row.session_id] = _pack(row.created_at, last, row.version, row.data)
        return entry

    @staticmethod
    def _snapshot(session_id: str, entry: _Entry) -> Session:
        created_at, last_activity, version = _HEAD.unpack_from(entry)
        data = loads(entry[_HEAD.size :].decode())  # str parses faster than bytes
        return Session(session_id, created_at, last_activity, data, version)

    @staticmethod
    def _row_snapshot(row: SessionRow) -> Session:
        return Session(
            row.session_id, row.created_at, row.last_activity, loads(row.data), row.version
        )

    def _encode(self, data: Mapping[str, Any], keys_checked: bool = False) -> str:
        """The data's JSON text, checked; ``keys_checked``: a dict with str keys.

        (Positional on the create path: a keyword argument makes the call dearer.)
        """
        if not keys_checked and (
            not isinstance(data, Mapping) or not all(isinstance(k, str) for k in data)
        ):
            raise InvalidDataError("session data must be a JSON object with string keys")
        try:
            text = dumps(data if type(data) is dict else dict(data))
        except (TypeError, ValueError, RecursionError) as exc:
            raise InvalidDataError(f"session data is not JSON-serialisable: {exc}") from exc
        try:
            size = len(text) if text.isascii() else len(text.encode("utf-8"))
        except UnicodeEncodeError as exc:
            raise InvalidDataError("session data has a string that is not valid Unicode") from exc
        if size > self.settings.max_data_bytes:
            raise DataTooLargeError(size, self.settings.max_data_bytes)
        return text

    # ----- commit callbacks: the writer runs them on the loop as each run of writes commits -----

    def _on_created(self, new: NewSession, result: CreateResult) -> _Entry | bool:
        """True: created; False: refused by the limit; else the live session's entry."""
        if result.created:
            if result.replaced:  # an expired session of the same id is gone
                self._gone([new.session_id], "expired")
            self._cache[new.session_id] = _pack(new.now, new.now, 1, new.data)
            self.counters["created"] += 1
            if new.explicit:
                self._stale_fills_possible()  # it may replace an expired row being read
            return True
        if result.row is None:
            return False
        return self._remember(result.row)

    def _on_new(self, rows: list[NewRow], created: list[bool]) -> list[bool]:
        """Sessions with generated ids: True when created, False when refused."""
        cache, head, made = self._cache, _HEAD.pack, 0
        for row, ok in zip(rows, created, strict=True):
            if ok is True:  # _pack, written out: this runs once for every create
                cache[row[0]] = head(row[1], row[1], 1) + row[3].encode()
                made += 1
        self.counters["created"] += made
        return created

    def _on_removed(self, session_id: str, outcome: bool | str) -> bool:
        if outcome:
            self._gone([session_id], "removed" if outcome is True else "expired")
        self._cache.pop(session_id, None)
        return outcome is True

    def _on_expired(self, _chunk: object, deleted: list[str]) -> list[str]:
        self._gone(deleted, "expired")
        return deleted

    def _on_data_changed(
        self, change: _DataChange, result: SessionRow | _Conflict
    ) -> _Entry | _Conflict:
        if isinstance(result, _Conflict):
            # The row is newer than what the caller saw (another process wrote it):
            # cache it, so that the caller's next read is not stale again.
            if change.session_id in self._cache:
                self._remember(result.row)
            return result
        return self._remember(result)

    # ----- writer handlers: run inside the writer's transaction -----

    def _counted_from(self, now: float) -> float:
        """The session limit counts rows active since this: those live, and those that
        have looked expired for less than ``flush_interval_secs``, whose activity
        another process on the database may hold and not have written yet."""
        return self._cutoff(now) - self.settings.flush_interval_secs

    def _apply_new(self, conn: Connection, rows: list[NewRow], now: float) -> list[Any]:
        made = SessionStore.insert_new(
            conn, rows, cutoff=self._counted_from(now), limit=self.settings.max_concurrent_sessions
        )
        return [True] * made + [False] * (len(rows) - made)

    def _apply_creates(self, conn: Connection, new: list[NewSession], now: float) -> list[Any]:
        return list(
            SessionStore.create_many(
                conn,
                new,
                cutoff=self._cutoff(now),
                limit=self.settings.max_concurrent_sessions,
                counted_from=self._counted_from(now),
                now=now,
            )
        )

    def _apply_deletes(self, conn: Connection, ids: list[str], now: float) -> list[Any]:
        # True: a live session was removed; "expired": the row of an expired one (absent
        # already, so remove() says False) was deleted; False: there was no row. Live
        # as the session limit counts: another process may hold activity unwritten.
        live, expired = SessionStore.delete_ids(
            conn,
            list(dict.fromkeys(ids)),
            reason="revoked",
            now=now,
            live_from=self._counted_from(now),
        )
        outcome: dict[str, bool | str] = {sid: "expired" for sid in expired}
        outcome.update(dict.fromkeys(live, True))
        # A second remove of the same id in one batch: False.
        return [outcome.pop(sid, False) for sid in ids]

    def _apply_data_changes(
        self, conn: Connection, changes: list[_DataChange], now: float
    ) -> list[Any]:
        results: list[Any] = []
        for change in changes:
            row = SessionStore.fetch_for_update(conn, change.session_id)
            if row is None or self._expired(row.last_activity, now):
                results.append(SessionNotFoundError(change.session_id))
                continue
            if change.if_version is not None and change.if_version != row.version:
                conflict = VersionConflictError(change.session_id, change.if_version, row.version)
                results.append(_Conflict(conflict, row))
                continue
            current: dict[str, Any] = {} if change.replace else loads(row.data)
            current.update(change.update)
            for key in change.delete:
                current.pop(key, None)
            try:
                text = self._encode(current)
            except (DataTooLargeError, InvalidDataError) as exc:
                results.append(exc)
                continue
            last = max(now, row.last_activity)
            SessionStore.store_data(conn, change.session_id, text, row.version + 1, last)
            results.append(row._replace(data=text, version=row.version + 1, last_activity=last))
        return results

    def _apply_tokens(
        self, conn: Connection, items: list[tuple[str, str, str | None]], now: float
    ) -> list[Any]:
        results: list[Any] = []
        for session_id, token_hash, expected in items:
            row = SessionStore.fetch_for_update(conn, session_id)
            if row is None or self._expired(row.last_activity, now):
                results.append(False)
                continue
            results.append(
                SessionStore.store_token(conn, session_id, token_hash, now=now, expected=expected)
            )
        return results

    def _apply_cleanup_chunk(
        self, conn: Connection, args: list[tuple[float, bool, int]], _now: float
    ) -> list[Any]:
        # The time cleanup_stale_sessions() was called, whether this is its first
        # chunk, and the chunk's size.
        now, first, rows = args[0]
        settings = self.settings
        if first:
            # Stamps up to a minute (and a lock wait) ahead are other processes' commits
            # made since ``now`` was read, not a clock that jumped back.
            ahead = _CLOCK_JUMP_SECS + settings.busy_timeout_ms / 1000
            clamped = SessionStore.clamp_future(conn, now, beyond=ahead)
            if clamped:
                log.warning(
                    "clock moved backwards: %d sessions had activity in the future", len(clamped)
                )
        # Another process sharing the database writes its sessions' activity up to one
        # flush interval late: a row that has looked expired for less than that may
        # belong to a session in use there. It is absent all the same (the predicate
        # decides); only its deletion waits for a later pass.
        cutoff = self._cutoff(now) - settings.flush_interval_secs
        deleted = SessionStore.delete_expired_chunk(conn, cutoff, rows, now=now)
        if len(deleted) < rows:
            SessionStore.purge_tombstones(conn, now - settings.tombstone_retention_secs)
        return [deleted]

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.refresh_interval_secs)
            try:
                await self.refresh()
            except ManagerClosedError:
                return
            except Exception:
                log.exception("refreshing cached sessions failed")

    async def _cleanup_loop(self, *, initial: bool) -> None:
        if initial:
            await self._cleanup_logged()
        while True:
            await asyncio.sleep(self.settings.cleanup_interval_secs)
            await self._cleanup_logged()

    async def _cleanup_logged(self) -> None:
        try:
            await self.cleanup_stale_sessions()
        except ManagerClosedError:
            raise asyncio.CancelledError from None
        except Exception:
            log.exception(
                "periodic cleanup failed; will retry in %.0fs", self.settings.cleanup_interval_secs
            )
