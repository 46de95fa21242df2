"""Group commit: one task performs every write, so concurrent writes share a transaction.

Callers submit a request and await its future; the writer takes everything queued,
runs it in one write transaction and releases each caller only after that commit.
Because the transaction runs in the writer's own task, cancelling a caller can never
strand a half-done transaction or leave the write lock held: a request cancelled
before its batch starts is skipped (the row stays old), one cancelled later is
committed (the row is new) unless that transaction fails (the row stays old: it is not
retried for a caller who has gone), and nothing in between exists.

Activity touches are not requests: they sit in a dict (last value wins) and are
written by the next transaction, or after ``flush_interval`` at the latest.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import operator
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from sqlalchemy import Connection

from .errors import DatabaseCorruptError, ManagerClosedError, StorageBusyError, StorageReadOnlyError
from .store import SessionStore

__all__ = ["BatchHandler", "GroupCommitWriter", "OnCommit", "each_write"]

log = logging.getLogger("sessionstore.writer")

#: Applies a run of same-kind requests inside the open transaction and returns one
#: result per argument; a result that is an exception is raised to that caller only.
#: Runs a run of same-kind requests inside the transaction: synchronous SQLAlchemy Core
#: (in the SQLite writer thread, or through ``run_sync`` on PostgreSQL); one result each.
#: ``now`` is the batch's time, read from the clock on the event loop. ``args`` is the
#: list the kind's ``on_commit`` gets afterwards: a handler must not change it.
BatchHandler = Callable[[Connection, list[Any], float], list[Any]]


#: Called on the event loop as ``on_commit(args, results)`` for each run of same-kind
#: requests once the transaction holding them has committed, before their callers
#: wake, and also for callers that have been cancelled: it applies the writes in
#: memory and returns what the callers get, one each. A result that is an exception
#: is the handler's answer to that caller alone; ``on_commit`` passes it on as it is.
OnCommit = Callable[[list[Any], list[Any]], list[Any]]


#: One queued write: (kind, arg, the caller's future). A plain tuple: one is made per
#: create, and a named one costs ten times as much to make.
_Request = tuple[str, Any, "asyncio.Future[Any]"]
_KIND = operator.itemgetter(0)

#: Failures of the database as a whole, not of one write in a batch.
_WHOLE_DATABASE = (StorageBusyError, StorageReadOnlyError, DatabaseCorruptError)


def _whole_database(exc: BaseException) -> bool:
    """Whether ``exc`` failed the database as a whole (retrying each write alone would
    only fail each again, after as long): busy, read-only, corrupt, or not reached
    (a connection refused or lost)."""
    if isinstance(exc, _WHOLE_DATABASE):
        return True
    cause = exc.__cause__
    return isinstance(cause, OSError) or bool(getattr(cause, "connection_invalidated", False))


class GroupCommitWriter:
    """The single writer of one manager.

    Args:
        store: The open store whose ``write`` runs each transaction.
        handlers: Request kind -> batch handler.
        on_commit: Request kind -> what applies its committed runs in memory (the
            manager's cache and listeners); kinds without one give callers the
            handler's results.
        exclusive: Kinds that get a transaction to themselves (cleanup chunks, so a
            long delete never delays the creates queued behind it by more than one chunk).
        relaxed: Exclusive kinds whose transactions need not reach the disk before
            their callers wake (``durable=False``). They carry no activity touches; a
            caller that needs touches applied first calls :meth:`flush` (cleanup does).
        flush_interval: Longest time a touch waits before it is written (seconds).
        max_batch: Most requests in one transaction.
        clock: Gives each batch its ``now`` (read on the event loop, so handlers
            running in a thread never call it).
    """

    def __init__(
        self,
        store: SessionStore,
        handlers: dict[str, BatchHandler],
        *,
        on_commit: dict[str, OnCommit] | None = None,
        exclusive: Sequence[str] = (),
        relaxed: Sequence[str] = (),
        flush_interval: float = 1.0,
        max_batch: int = 2000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._clock = clock
        self._handlers = dict(handlers)
        self._handlers.setdefault("barrier", _barrier)
        self._on_commit = dict(on_commit or {})
        self._exclusive = frozenset(exclusive)
        self._relaxed = frozenset(relaxed)
        if not self._relaxed <= self._exclusive:
            raise ValueError("relaxed kinds must be exclusive too")
        self._flush_interval = flush_interval
        self._max_batch = max_batch
        self._queue: deque[_Request] = deque()
        self._pending: dict[str, float] = {}
        self._deadline: float | None = None
        self._wakeup = asyncio.Event()
        self._woken = False  # mirrors the event, read by submit() without a call
        self._exclusive_queued = 0  # how many queued requests are of exclusive kinds
        self._committing = False
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._new_future: Callable[[], asyncio.Future[Any]] | None = None
        self.last_flush_lag = 0.0
        self.transactions = 0

    def start(self) -> None:
        """Start the writer task."""
        if self._task is None:
            loop = asyncio.get_running_loop()
            self._new_future = loop.create_future
            if type(loop).create_future is asyncio.BaseEventLoop.create_future:
                # The same future, made without a Python frame in between (one per write).
                self._new_future = functools.partial(asyncio.Future, loop=loop)
            self._task = loop.create_task(self._run(), name="sessionstore-writer")

    @property
    def busy(self) -> bool:
        """Whether writes are queued or a transaction is committing.

        Asked by a caller just woken by its own commit, it tells whether others share
        the writer with it (cleanup makes its chunks short then).
        """
        return bool(self._queue) or self._committing

    @property
    def pending_touches(self) -> int:
        """Touches not yet written."""
        return len(self._pending)

    def touch(self, session_id: str, ts: float) -> None:
        """Record activity; written by the next transaction, within ``flush_interval``."""
        if self._closing:
            raise ManagerClosedError("session manager is closed")
        self._pending[session_id] = ts
        if self._deadline is None:
            self._deadline = asyncio.get_running_loop().time() + self._flush_interval
            self._wakeup.set()

    def forget(self, session_ids: Iterable[str]) -> None:
        """Drop the pending touches of these sessions (they are gone)."""
        pending = self._pending
        if pending:
            for sid in session_ids:
                pending.pop(sid, None)

    def submit(self, kind: str, arg: Any = None) -> asyncio.Future[Any]:
        """Queue one write; await the result to wait until its transaction has committed.

        The kind's ``on_commit`` applies the write's effects in memory at the commit
        itself: a caller cancelled while its write committed can no longer leave memory
        disagreeing with the database. A future rather than a coroutine: one object
        less to make, and to keep alive, for every create.
        """
        new_future = self._new_future
        if self._closing or new_future is None:
            raise ManagerClosedError("session manager is closed")
        future = new_future()
        self._queue.append((kind, arg, future))
        if kind in self._exclusive:
            self._exclusive_queued += 1
        if not self._woken:
            self._woken = True
            self._wakeup.set()
        return future

    async def flush(self) -> None:
        """Write every pending touch now (and wait for those being written)."""
        if self._pending or self._committing:
            await self.submit("barrier")

    async def aclose(self) -> None:
        """Finish everything queued and every pending touch, then stop (idempotent)."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            # Shielded: a caller cancelled during shutdown must not cut the final commit.
            await asyncio.shield(self._task)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closing and not self._pending:
                    return
                timeout = None
                if self._deadline is not None and not self._closing:
                    timeout = max(0.0, self._deadline - loop.time())
                if not self._closing:
                    self._wakeup.clear()
                    self._woken = False
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wakeup.wait(), timeout)
            batch = self._take()
            due = self._deadline is not None and (self._closing or loop.time() >= self._deadline)
            if batch or (due and self._pending):
                self._committing = True
                try:
                    await self._commit(batch)
                finally:
                    self._committing = False
            elif self._closing and not self._queue and not self._pending:
                return

    def _take(self) -> list[_Request]:
        queue, exclusive = self._queue, self._exclusive
        if not self._exclusive_queued and len(queue) <= self._max_batch:
            # The usual case, all of the queue in one transaction: one pass, in C.
            # A request whose caller gave up before it started is skipped (the row
            # stays old).
            batch = [request for request in queue if not request[2].cancelled()]
            queue.clear()
            return batch
        batch = []
        while queue and len(batch) < self._max_batch:
            request = queue.popleft()
            is_exclusive = request[0] in exclusive
            self._exclusive_queued -= is_exclusive
            if request[2].cancelled():
                continue
            if is_exclusive:
                if batch:
                    queue.appendleft(request)  # it gets the next transaction to itself
                    self._exclusive_queued += 1
                else:
                    batch.append(request)
                break
            batch.append(request)
        return batch

    async def _commit(self, batch: list[_Request]) -> None:
        relaxed = bool(batch) and batch[0][0] in self._relaxed
        touches: dict[str, float] = {}
        if not relaxed:
            touches, self._pending, self._deadline = self._pending, {}, None
        elif (
            self._pending
            and self._deadline is not None
            and asyncio.get_running_loop().time() >= self._deadline
        ):
            # Touches are promised to the disk within the flush interval, so they never
            # ride in a transaction that skips the sync: they wait for the next durable
            # one, or, once due, commit first in one of their own.
            await self._commit([])
        started = asyncio.get_running_loop().time()
        now = self._clock()

        # Runs of same-kind requests, in queue order: one handler call each.
        runs = [(kind, list(run)) for kind, run in itertools.groupby(batch, key=_KIND)]
        args_of = [[r[1] for r in run] for _kind, run in runs]

        def work(conn: Connection) -> list[list[Any]]:
            if touches:
                SessionStore.touch_many(conn, touches.items())
            out = []
            for (kind, _run), args in zip(runs, args_of, strict=True):
                results = self._handlers[kind](conn, args, now)
                if len(results) != len(args):
                    raise RuntimeError(f"handler {kind!r} returned {len(results)} results")
                out.append(results)
            return out

        try:
            results_of = await self._store.write(work, durable=not relaxed)
        except Exception as exc:
            self._restore(touches)
            live = [r for r in batch if not r[2].done()]
            if len(live) > 1 and not _whole_database(exc):
                # Nothing committed, and one request may have doomed the rest (a write
                # that does not fit on a full disk): retry each alone, so only it fails.
                # Not where the database as a whole refused: each retry would wait out
                # the busy timeout again, the last caller hearing after hundreds.
                for request in live:
                    if not request[2].done():
                        await self._commit([request])
                return
            if not batch:
                log.warning("activity flush failed, will retry: %s", exc)
            for _kind, _arg, future in live:
                future.set_exception(exc)
            if self._closing and not batch:
                # Shutting down and the disk refuses: do not spin; report and drop.
                log.error("dropping %d unflushed activity touches: %s", len(self._pending), exc)
                self._pending.clear()
            return
        self.transactions += 1
        self.last_flush_lag = asyncio.get_running_loop().time() - started
        for (kind, run), args, results in zip(runs, args_of, results_of, strict=True):
            on_commit = self._on_commit.get(kind)
            if on_commit is not None:
                try:
                    results = on_commit(args, results)
                    if len(results) != len(run):
                        raise RuntimeError(f"on_commit of {kind!r} returned {len(results)} results")
                except (KeyboardInterrupt, SystemExit):
                    raise
                except BaseException as exc:  # its callers' error; the writer goes on
                    log.exception("applying committed %s writes failed", kind)
                    results = [exc] * len(run)
            for (_kind, _arg, future), result in zip(run, results, strict=True):
                if future.done():
                    continue  # cancelled: the write stands, and on_commit has applied it
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    def _restore(self, touches: dict[str, float]) -> None:
        """Put back touches a failed transaction did not write (newer ones win)."""
        for sid, ts in touches.items():
            self._pending.setdefault(sid, ts)
        if self._pending and self._deadline is None:
            self._deadline = asyncio.get_running_loop().time() + self._flush_interval


def each_write(apply: Callable[[Any, Any], Any]) -> OnCommit:
    """An ``on_commit`` made of ``apply(arg, result)`` for each write in turn.

    Results that are exceptions reach their callers as they are, without ``apply``.
    If ``apply`` raises for one write, that write's caller gets the exception and the
    writes after it are still applied.
    """

    def on_commit(args: list[Any], results: list[Any]) -> list[Any]:
        out: list[Any] = []
        for arg, result in zip(args, results, strict=True):
            if not isinstance(result, BaseException):
                try:
                    result = apply(arg, result)
                except (KeyboardInterrupt, SystemExit):
                    raise
                except BaseException as exc:  # its caller's error; the others still apply
                    log.exception("applying a committed write failed")
                    result = exc
            out.append(result)
        return out

    return on_commit


def _barrier(_conn: Connection, args: list[Any], _now: float) -> list[Any]:
    return [None] * len(args)
