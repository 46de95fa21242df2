"""Concurrent lookups share queries: after a restart, every session is a cache miss."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import event

from sessionstore import ManagerClosedError
from sessionstore.batching import BatchLoader
from tests.conftest import ManagerFactory


class _Source:
    """A fetch function that records its calls and can be held or made to fail."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail: Exception | None = None

    async def __call__(self, keys: list[int]) -> dict[int, str]:
        self.calls.append(keys)
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return {k: f"v{k}" for k in keys if k % 2 == 0}


async def test_lookups_made_together_share_one_fetch() -> None:
    source = _Source()
    loader: BatchLoader[int, str] = BatchLoader(source, max_batch=50)
    results = await asyncio.gather(*(loader.load(k) for k in range(120)))
    assert results == [f"v{k}" if k % 2 == 0 else None for k in range(120)]
    assert [len(c) for c in source.calls] == [50, 50, 20]
    await loader.aclose()


async def test_lookups_during_a_fetch_form_the_next_batch() -> None:
    source = _Source()
    source.gate.clear()
    loader: BatchLoader[int, str] = BatchLoader(source)
    first = asyncio.ensure_future(loader.load(0))
    await asyncio.sleep(0.01)  # the first fetch is now in flight, held at the gate
    later = [asyncio.ensure_future(loader.load(k)) for k in (2, 4, 0)]
    await asyncio.sleep(0.01)
    source.gate.set()
    assert await first == "v0"
    assert [await f for f in later] == ["v2", "v4", "v0"]
    assert source.calls == [[0], [2, 4]]  # key 0 joined the fetch already in flight
    await loader.aclose()


async def test_a_cancelled_caller_does_not_cancel_the_others() -> None:
    source = _Source()
    source.gate.clear()
    loader: BatchLoader[int, str] = BatchLoader(source)
    quitter = asyncio.ensure_future(loader.load(2))
    stayer = asyncio.ensure_future(loader.load(2))
    await asyncio.sleep(0.01)
    quitter.cancel()
    source.gate.set()
    assert await stayer == "v2"
    with pytest.raises(asyncio.CancelledError):
        await quitter
    await loader.aclose()


async def test_a_lookup_after_a_cancelled_one_of_its_key_gets_its_answer() -> None:
    source = _Source()
    source.gate.clear()
    loader: BatchLoader[int, str] = BatchLoader(source)
    quitter = asyncio.ensure_future(loader.load(2))
    await asyncio.sleep(0.01)  # its fetch is in flight, held at the gate
    quitter.cancel()
    await asyncio.sleep(0)
    late = asyncio.ensure_future(loader.load(2))  # joins the same fetch
    source.gate.set()
    assert await late == "v2"
    assert source.calls == [[2]]
    assert quitter.cancelled()
    await loader.aclose()


async def test_a_failed_fetch_fails_its_batch_only() -> None:
    source = _Source()
    loader: BatchLoader[int, str] = BatchLoader(source)
    source.fail = RuntimeError("disk on fire")
    outcomes = await asyncio.gather(loader.load(2), loader.load(4), return_exceptions=True)
    assert [str(o) for o in outcomes] == ["disk on fire", "disk on fire"]
    source.fail = None
    assert await loader.load(2) == "v2"
    await loader.aclose()


async def test_aclose_fails_waiting_lookups_and_leaves_no_task() -> None:
    source = _Source()
    source.gate.clear()
    loader: BatchLoader[int, str] = BatchLoader(source)
    waiting = asyncio.ensure_future(loader.load(2))
    await asyncio.sleep(0.01)
    await loader.aclose()
    with pytest.raises(ManagerClosedError):
        await waiting
    with pytest.raises(ManagerClosedError):
        await loader.load(4)
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "sessionstore-loader"]


@pytest.mark.contract
async def test_a_reconnect_storm_after_restart_shares_queries(
    make_manager: ManagerFactory,
) -> None:
    async with make_manager(max_concurrent_sessions=0) as m:
        sessions = await asyncio.gather(*(m.ensure(data={"i": i}) for i in range(300)))
        tokens = [await m.issue_token(s.session_id) for s in sessions[:100]]
    statements: list[str] = []
    async with make_manager() as m:

        def count(_conn: Any, _cursor: Any, sql: str, *_args: Any) -> None:
            statements.append(sql)

        event.listen(m.store.engine.sync_engine, "before_cursor_execute", count)
        got = await asyncio.gather(*(m.get(s.session_id) for s in sessions))
        assert [g.data if g else None for g in got] == [{"i": i} for i in range(300)]
        resumed = await asyncio.gather(*(m.resume(t) for t in tokens))
        assert [r.session.session_id if r.session else None for r in resumed] == [
            s.session_id for s in sessions[:100]
        ]
        event.remove(m.store.engine.sync_engine, "before_cursor_execute", count)
    reads = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    # 300 gets and 100 resumes (two lookups each) would be 500 queries one by one.
    assert len(reads) <= 12, reads
