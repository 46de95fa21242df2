"""``sessionstore backup`` copies a database consistently while it is being written."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import textwrap
from pathlib import Path

from sessionstore import SessionManager
from tests.helpers import run_cli, start_python

_WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from sessionstore import SessionManager

    async def main():
        async with SessionManager(sys.argv[1], max_concurrent_sessions=0) as m:
            print("ready", flush=True)
            i = 0
            while True:  # until killed: creates and data changes, all committed
                s = await m.ensure(f"s{i}", data={"i": i})
                await m.set_data(s.session_id, {"done": True})
                i += 1

    asyncio.run(main())
    """
)


def test_backup_while_writing_is_consistent_and_resumable(db_path: Path, tmp_path: Path) -> None:
    writer = start_python(_WRITER, str(db_path))
    copy = tmp_path / "copy.db"
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "ready"
        result = run_cli("backup", str(copy), "--database", str(db_path))
        assert writer.poll() is None, "the writer must still be writing during the backup"
    finally:
        writer.kill()
        writer.communicate()
    assert result.returncode == 0, result.stderr
    assert "integrity ok" in result.stdout
    assert (copy.stat().st_mode & 0o777) == 0o600
    with sqlite3.connect(copy) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = conn.execute("SELECT session_id, data, version FROM sessions").fetchall()
    conn.close()
    assert rows, "the copy holds the sessions written before it"
    # A snapshot: every session is whole (created then changed, or just created).
    for sid, data, version in rows:
        expected = {"i": int(sid[1:])} | ({"done": True} if version == 2 else {})
        assert json.loads(data) == expected

    async def reopen() -> None:
        async with SessionManager(str(copy)) as m:
            assert len(await m.list_ids()) == len(rows)

    asyncio.run(reopen())


def test_backup_refuses_to_overwrite(db_path: Path, tmp_path: Path) -> None:
    run_cli("migrate", "-d", str(db_path))
    dest = tmp_path / "precious.txt"
    dest.write_text("keep me")
    result = run_cli("backup", str(dest), "-d", str(db_path))
    assert result.returncode == 1
    assert "refusing to overwrite" in result.stderr
    assert dest.read_text() == "keep me"
