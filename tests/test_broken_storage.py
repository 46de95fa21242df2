"""Read-only files, a full disk and a crash mid-migration: clear errors, nothing lost."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from sqlalchemy.engine import URL, make_url

from sessionstore import SessionManager, StorageError, migrate
from tests.helpers import REPO, run_python


def _revision(path: Path) -> str | None:
    with sqlite3.connect(path) as conn:
        row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    conn.close()
    return row[0] if row else None


_FULL_DISK = textwrap.dedent(
    """
    import asyncio, json, os, resource, signal, sys
    from sessionstore import SessionManager, StorageFullError

    async def main():
        db = sys.argv[1]
        async with SessionManager(db, max_concurrent_sessions=0) as m:
            for i in range(20):
                await m.ensure(f"early{i}", data={"i": i})
            soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            # The disk is "full": files may not grow past 256 KiB from now on.
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, hard))
            error = None
            for i in range(100000):
                try:
                    await m.ensure(data={"pad": "x" * 4000})
                except StorageFullError as exc:
                    error = str(exc)
                    break
            early = [await m.get(f"early{i}") for i in range(20)]
            still_fails = False
            try:
                await m.ensure("while-full", data={"pad": "y" * 4000})
            except StorageFullError:
                still_fails = True
            # Space is back: no restart, writes work again.
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            after = await m.ensure("after-space", data={"ok": True})
            await m.update_activity("early0")
        print(json.dumps({
            "error": error,
            "early_ok": all(s is not None and s.data == {"i": i} for i, s in enumerate(early)),
            "still_fails": still_fails,
            "after": after.session_id,
        }))

    asyncio.run(main())
    """
)


def test_full_disk_is_a_clear_error_and_recovers_without_restart(db_path: Path) -> None:
    result = run_python(_FULL_DISK, str(db_path))
    assert result.returncode == 0, result.stderr
    import json

    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["error"] is not None, "the size limit was never hit"
    assert str(db_path) in outcome["error"]
    assert "full" in outcome["error"].lower()
    assert outcome["early_ok"] is True
    assert outcome["still_fails"] is True
    assert outcome["after"] == "after-space"
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        ids = {r[0] for r in conn.execute("SELECT session_id FROM sessions")}
    conn.close()
    assert {f"early{i}" for i in range(20)} | {"after-space"} <= ids
    assert "while-full" not in ids


def _without_privileges(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI so that file modes bind it: root loses its override capabilities."""
    prefix: list[str] = []
    if os.geteuid() == 0:
        prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner"]
    return subprocess.run(
        [*prefix, sys.executable, "-m", "sessionstore", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.skipif(
    os.geteuid() == 0 and shutil.which("setpriv") is None,
    reason="running as root and setpriv (util-linux) is not installed",
)
def test_read_only_file_and_directory_are_clear_errors(tmp_path: Path) -> None:
    db = tmp_path / "ro.db"
    assert _without_privileges("migrate", "-d", str(db)).returncode == 0
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA journal_mode=DELETE")  # no -wal/-shm lying around
    conn.close()
    before = db.read_bytes()
    db.chmod(0o444)
    tmp_path.chmod(0o555)
    try:
        result = _without_privileges("rm", "anything", "-d", str(db))
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert str(db) in result.stderr
        assert "not writable" in result.stderr or "cannot be opened" in result.stderr
        assert db.read_bytes() == before
        result = _without_privileges("migrate", "-d", str(tmp_path / "new.db"))
        assert result.returncode == 1
        assert "Traceback" not in result.stderr
        assert "new.db" in result.stderr
        assert not (tmp_path / "new.db").exists()
    finally:
        tmp_path.chmod(0o755)


_CRASH_IN_MIGRATION = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    from alembic.operations import Operations
    from sessionstore import SessionManager

    real = Operations.create_index

    def create_index(self, name, *args, **kwargs):
        real(self, name, *args, **kwargs)
        if name == "ix_session_tombstones_removed_at":  # inside 0002, after its table
            os.kill(os.getpid(), signal.SIGKILL)

    Operations.create_index = create_index

    async def main():
        async with SessionManager(sys.argv[1]):
            pass

    asyncio.run(main())
    """
)


def test_crash_in_the_middle_of_a_migration_leaves_a_migratable_database(
    db_path: Path,
) -> None:
    result = run_python(_CRASH_IN_MIGRATION, str(db_path))
    assert result.returncode == -signal.SIGKILL, result.stderr
    with sqlite3.connect(db_path) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    conn.close()
    # The whole upgrade was one transaction: nothing of it stuck.
    assert "session_tombstones" not in tables
    assert "sessions" not in tables
    result = subprocess.run(
        [sys.executable, "-m", "sessionstore", "migrate", "-d", str(db_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert _revision(db_path) == migrate.head_revision()


class _Proxy:
    """A TCP proxy to the PostgreSQL server that can be made to drop everything: its
    connections, and each new one as soon as it is accepted (a server gone away)."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.up = True
        self.accepted = 0
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if not self.up:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def go_down(self) -> None:
        self.up = False
        for writer in self.writers:
            writer.close()

    async def aclose(self) -> None:
        self.go_down()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def test_a_server_gone_away_fails_a_batch_at_once_not_a_connection_each(
    postgres_url: str,
) -> None:
    # A batch that failed was retried one write at a time, each retry a connection
    # attempt of its own (to a host that does not answer, each a connect timeout).
    url = make_url(postgres_url)
    await _reset_schema(url)
    proxy = _Proxy(url.host or "127.0.0.1", url.port or 5432)
    port = await proxy.start()
    try:
        through = url.set(port=port).render_as_string(hide_password=False)
        async with SessionManager(through, refresh_interval_secs=0) as m:
            ids = [(await m.ensure()).session_id for _ in range(10)]
            proxy.go_down()
            before = proxy.accepted
            results = await asyncio.gather(
                *(m.set_data(sid, {"n": 1}) for sid in ids), return_exceptions=True
            )
            assert all(isinstance(r, StorageError) for r in results), results
            assert proxy.accepted - before <= 3, f"{proxy.accepted - before} connection attempts"
            proxy.up = True  # it is back: writes go on
            assert (await m.set_data(ids[0], {"n": 2})).version == 2
    finally:
        await proxy.aclose()


async def _reset_schema(url: URL) -> None:
    import asyncpg

    conn = await asyncpg.connect(
        host=url.host, port=url.port or 5432, user=url.username, database=url.database
    )
    try:
        await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    finally:
        await conn.close()
