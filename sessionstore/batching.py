"""Read coalescing: concurrent lookups of different keys share one ``IN (...)`` query.

After a restart every session is a cache miss, and thousands of clients come back at
once. One query per lookup costs several round trips to the driver's thread each;
one query per *batch* of lookups costs the same few round trips for hundreds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Mapping
from typing import Generic, TypeVar

from .errors import ManagerClosedError

__all__ = ["BatchLoader"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class _Failure:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class BatchLoader(Generic[K, V]):
    """Load values by key; lookups made while a batch is in flight form the next one.

    Args:
        fetch: Loads many keys at once; keys it does not return are absent (``None``).
        max_batch: Most keys in one call of ``fetch``.
    """

    def __init__(
        self, fetch: Callable[[list[K]], Awaitable[Mapping[K, V]]], *, max_batch: int = 500
    ) -> None:
        self._fetch = fetch
        self._max_batch = max_batch
        # Key -> the futures of its callers: each caller waits on one of its own, so
        # one giving up (cancelled) leaves the others' answer alone, with no shield
        # around every lookup (measured: a tenth of a cold get's event-loop time).
        self._waiting: dict[K, list[asyncio.Future[V | _Failure | None]]] = {}
        self._inflight: dict[K, list[asyncio.Future[V | _Failure | None]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def load(self, key: K) -> V | None:
        """The value for ``key``, or ``None``; raises what ``fetch`` raised."""
        if self._closed:
            raise ManagerClosedError("session manager is closed")
        future: asyncio.Future[V | _Failure | None] = asyncio.get_running_loop().create_future()
        callers = self._waiting.get(key)  # join the next batch, or the one in flight
        if callers is None:
            callers = self._inflight.get(key)
        if callers is None:
            callers = self._waiting[key] = []
            if self._task is None:
                self._task = asyncio.create_task(self._run(), name="sessionstore-loader")
        callers.append(future)
        outcome = await future
        if isinstance(outcome, _Failure):
            raise outcome.exc
        return outcome

    async def _run(self) -> None:
        try:
            await asyncio.sleep(0)  # let the lookups made in this same tick join
            while self._waiting:
                keys = list(self._waiting)[: self._max_batch]
                self._inflight = {k: self._waiting.pop(k) for k in keys}
                try:
                    found = await self._fetch(keys)
                except Exception as exc:
                    self._settle(self._inflight, _Failure(exc))
                else:
                    self._settle(self._inflight, found)
                self._inflight = {}
        finally:
            self._task = None

    @staticmethod
    def _settle(
        futures: dict[K, list[asyncio.Future[V | _Failure | None]]],
        outcome: Mapping[K, V] | _Failure,
    ) -> None:
        for key, callers in futures.items():
            value = outcome if isinstance(outcome, _Failure) else outcome.get(key)
            for future in callers:
                if not future.done():  # a cancelled caller is skipped
                    future.set_result(value)

    async def aclose(self) -> None:
        """Stop; every lookup still waiting fails with ManagerClosedError (idempotent)."""
        self._closed = True
        task = self._task
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        closed = _Failure(ManagerClosedError("session manager is closed"))
        self._settle({**self._waiting, **self._inflight}, closed)
        self._waiting.clear()
        self._inflight = {}
