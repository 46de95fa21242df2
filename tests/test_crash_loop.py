"""Kill a busy manager process with SIGKILL again and again: nothing acknowledged is lost.

The child runs many concurrent writers and prints a line for every write *after* the
call returned; the parent kills it at a random moment, then checks that every printed
(acknowledged) write is in the database, that the file passes ``integrity_check``, and
that the next start needs no manual step. ``SESSIONSTORE_CRASH_LOOPS`` sets the number
of kills (default 30).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import textwrap
import threading
import time
from pathlib import Path

from tests.helpers import start_python

_CHILD = textwrap.dedent(
    """
    import asyncio, json, sys
    from sessionstore import SessionManager

    async def writer(m, w):
        s = await m.ensure(data={"n": 0, "w": w})
        print(json.dumps([s.session_id, 1, 0]), flush=True)
        n = 0
        while True:
            n += 1
            s = await m.set_data(s.session_id, {"n": n})
            print(json.dumps([s.session_id, s.version, n]), flush=True)
            await m.update_activity(s.session_id)

    async def main():
        async with SessionManager(sys.argv[1], max_concurrent_sessions=0,
                                  flush_interval_secs=0.05) as m:
            print("ready", flush=True)
            await asyncio.gather(*(writer(m, w) for w in range(32)))

    asyncio.run(main())
    """
)


def _run_once(db: Path, rng: random.Random) -> dict[str, tuple[int, int]]:
    child = start_python(_CHILD, str(db))
    acked: dict[str, tuple[int, int]] = {}
    assert child.stdout is not None
    ready = child.stdout.readline().strip()
    if ready != "ready":
        child.kill()
        _, err = child.communicate()
        raise AssertionError(f"child did not start: {ready!r} {err}")
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(child.stdout or []), daemon=True)
    reader.start()
    time.sleep(rng.uniform(0.02, 0.4))  # let it write, then kill it mid-flight
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=10)
    reader.join(timeout=10)
    for stream in (child.stdout, child.stderr):
        if stream is not None:
            stream.close()
    for line in lines:
        if not line.endswith("\n"):
            continue  # torn by the kill: never acknowledged
        sid, version, n = json.loads(line)
        acked[sid] = max(acked.get(sid, (0, 0)), (version, n))
    return acked


def test_sigkill_loop_loses_no_acknowledged_write(tmp_path: Path) -> None:
    db = tmp_path / "crash.db"
    rng = random.Random(int(os.environ.get("SESSIONSTORE_CRASH_SEED", "7")))
    loops = int(os.environ.get("SESSIONSTORE_CRASH_LOOPS", "30"))
    total_acked = 0
    for _ in range(loops):
        acked = _run_once(db, rng)
        total_acked += sum(v for v, _ in acked.values())
        with sqlite3.connect(db) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            stored = {
                sid: (version, json.loads(data)["n"])
                for sid, version, data in conn.execute(
                    "SELECT session_id, version, data FROM sessions"
                )
            }
        conn.close()
        for sid, (version, n) in acked.items():
            assert sid in stored, f"acknowledged session {sid} lost"
            got_version, got_n = stored[sid]
            assert got_version >= version, (sid, version, got_version)
            assert got_n >= n, (sid, n, got_n)
            if got_version == version:
                assert got_n == n
    assert total_acked > loops * 10, "the child barely wrote anything; the test proves little"
