"""Sessions survive a restart: clean close, SIGKILL, and time passing while down."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import textwrap
from pathlib import Path

import pytest

from sessionstore import SessionManager
from tests.conftest import ManagerFactory
from tests.helpers import ManualClock, start_python, wait_until

pytestmark = pytest.mark.contract


async def test_reopen_after_clean_close_restores_everything(
    make_manager: ManagerFactory, clock: ManualClock
) -> None:
    async with make_manager(session_timeout_secs=60) as m:
        created = await m.ensure("keep", data={"cart": [1, 2]})
        clock.advance(10)
        await m.update_activity("keep")
        await m.set_data("keep", {"step": 3})
        clock.advance(5)
        await m.update_activity("keep")
    async with make_manager(session_timeout_secs=60) as m:
        got = await m.get("keep")
        assert got is not None
        assert got.created_at == created.created_at
        assert got.last_activity == clock.now
        assert got.data == {"cart": [1, 2], "step": 3}
        assert got.version == 2
        report = await m.recovered()
        assert (report.restored, report.expired) == (1, 0)


async def test_restart_drops_sessions_idle_past_timeout(
    make_manager: ManagerFactory, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    async with make_manager(session_timeout_secs=60) as m:
        await m.ensure("stale")
        clock.advance(30)
        await m.ensure("live")
    clock.advance(40)  # down for 40 s: "stale" is now 70 s idle, "live" 40 s
    caplog.set_level(logging.INFO, logger="sessionstore.manager")
    async with make_manager(session_timeout_secs=60) as m:
        assert await m.get("stale") is None
        assert await m.get("live") is not None
        assert await m.list_ids() == ["live"]
        report = await m.recovered()
        assert (report.restored, report.expired) == (1, 1)
        lines = [r.getMessage() for r in caplog.records if "restored" in r.getMessage()]
        assert len(lines) == 1
        assert "1 live sessions restored, 1 expired while down" in lines[0]
        # The expired row is deleted by the start-up cleanup, in the background.
        await m.cleanup_stale_sessions()
        assert await m.store.fetch("stale") is None


async def test_startup_deletes_expired_rows_in_background(
    make_manager: ManagerFactory, clock: ManualClock
) -> None:
    async with make_manager(session_timeout_secs=60, max_concurrent_sessions=0) as m:
        for _ in range(30):
            await m.ensure()
    clock.advance(62)  # past the timeout and cleanup's grace (a flush interval)
    async with make_manager(session_timeout_secs=60, cleanup_chunk_rows=4) as m:
        assert (await m.recovered()).expired == 30
        # Nothing expired is visible, whether or not its row is gone yet.
        assert await m.list_ids() == []

        async def emptied() -> bool:
            return bool((await m.get_session_metrics())["total_sessions"] == 0)

        await wait_until(emptied)
        assert m.counters["expired"] == 30


_CHILD = textwrap.dedent(
    """
    import asyncio, json, sys
    from sessionstore import SessionManager

    async def main() -> None:
        manager = SessionManager(sys.argv[1], flush_interval_secs=3600)
        await manager.start()
        session = await manager.ensure(data={"acked": True})
        await manager.set_data(session.session_id, {"n": 1})
        print(json.dumps({"id": session.session_id}), flush=True)
        await asyncio.sleep(3600)  # killed here, without aclose()

    asyncio.run(main())
    """
)


def test_session_survives_sigkill_right_after_ensure(db_path: Path) -> None:
    child = start_python(_CHILD, str(db_path))
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line, child.stderr.read() if child.stderr else ""
        session_id = json.loads(line)["id"]
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        for stream in (child.stdout, child.stderr):
            if stream is not None:
                stream.close()
    assert child.returncode == -signal.SIGKILL

    async def reopen() -> None:
        async with SessionManager(str(db_path)) as manager:
            got = await manager.get(session_id)
            assert got is not None
            assert got.data == {"acked": True, "n": 1}
            assert got.version == 2

    asyncio.run(reopen())
