"""Two processes on one SQLite file: the limit is enforced in the database."""

from __future__ import annotations

import json
import sqlite3
import textwrap
from pathlib import Path

from sessionstore import SessionManager
from tests.helpers import start_python

_RACER = textwrap.dedent(
    """
    import asyncio, json, os, sys, time
    from sessionstore import Session, SessionLimitError, SessionManager

    async def main() -> None:
        db, go, attempts = sys.argv[1], sys.argv[2], int(sys.argv[3])
        async with SessionManager(db, max_concurrent_sessions=25) as manager:
            print("ready", flush=True)
            while not os.path.exists(go):
                await asyncio.sleep(0.005)
            results = []
            for _ in range(attempts // 10):  # waves of 10 concurrent creates
                results += await asyncio.gather(
                    *(manager.ensure() for _ in range(10)), return_exceptions=True
                )
        ok = sum(isinstance(r, Session) for r in results)
        refused = sum(isinstance(r, SessionLimitError) for r in results)
        other = [repr(r) for r in results if isinstance(r, BaseException)
                 and not isinstance(r, SessionLimitError)]
        print(json.dumps({"ok": ok, "refused": refused, "other": other}), flush=True)

    asyncio.run(main())
    """
)


def test_two_processes_cannot_together_exceed_the_limit(db_path: Path, tmp_path: Path) -> None:
    import asyncio

    async def prepare() -> None:  # migrate once so both racers start on the same footing
        async with SessionManager(str(db_path)):
            pass

    asyncio.run(prepare())
    go = tmp_path / "go"
    racers = [start_python(_RACER, str(db_path), str(go), "40") for _ in range(2)]
    try:
        for racer in racers:
            assert racer.stdout is not None
            assert racer.stdout.readline().strip() == "ready"
        go.touch()
        outcomes = []
        for racer in racers:
            out, err = racer.communicate(timeout=60)
            assert racer.returncode == 0, err
            outcomes.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for racer in racers:
            if racer.poll() is None:
                racer.kill()
                racer.communicate()
    assert [o["other"] for o in outcomes] == [[], []]  # no "database is locked" etc.
    assert sum(o["ok"] for o in outcomes) == 25
    assert sum(o["refused"] for o in outcomes) == 80 - 25
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT count(*) FROM sessions").fetchone()[0] == 25
    conn.close()
