"""The admin CLI, run as a real subprocess."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest

from sessionstore import SessionManager, migrate
from tests.helpers import run_cli, scribble_pages


@pytest.fixture
async def populated(db_path: Path) -> Path:
    """Three sessions: 'old' idle 2 h, 'mid' idle 10 min, 'new' idle 1 min."""
    now = time.time()
    for name, idle in (("old", 7200), ("mid", 600), ("new", 60)):
        clock = lambda idle=idle: now - idle  # noqa: E731
        async with SessionManager(str(db_path), clock=clock, background_tasks=False) as m:
            await m.ensure(name, data={"name": name})
    return db_path


def _one_line_error(result: object) -> str:
    stderr: str = result.stderr  # type: ignore[attr-defined]
    assert result.returncode == 1, stderr  # type: ignore[attr-defined]
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def test_migrate_upgrade_and_current(db_path: Path) -> None:
    result = run_cli("migrate", "--database", str(db_path))
    assert result.returncode == 0, result.stderr
    assert f"-> {migrate.head_revision()} (head)" in result.stdout
    result = run_cli("migrate", "current", "--database", str(db_path))
    assert result.stdout.strip() == f"{db_path}: {migrate.head_revision()} (head)"
    assert "already at" in run_cli("migrate", "upgrade", "-d", str(db_path)).stdout


def test_ls_lists_live_sessions_newest_activity_first(populated: Path) -> None:
    result = run_cli("ls", "--database", str(populated))
    assert result.returncode == 0, result.stderr
    rows = result.stdout.strip().splitlines()
    assert rows[0].startswith("SESSION_ID")
    assert [r.split()[0] for r in rows[1:]] == ["new", "mid"]  # 'old' is past 3600 s
    listed = json.loads(run_cli("ls", "--json", "-d", str(populated)).stdout)
    assert [s["session_id"] for s in listed] == ["new", "mid"]
    assert listed[0]["last_activity_utc"].endswith("Z")
    longer = run_cli("ls", "--json", "-d", str(populated), "--session-timeout", "10000")
    assert [s["session_id"] for s in json.loads(longer.stdout)] == ["new", "mid", "old"]


def test_show_prints_a_session_as_json(populated: Path) -> None:
    result = run_cli("show", "mid", "--database", str(populated))
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["session_id"] == "mid"
    assert shown["data"] == {"name": "mid"}
    assert 590 < shown["idle_secs"] < 700
    assert "nobody" in _one_line_error(run_cli("show", "nobody", "-d", str(populated)))


def test_rm_deletes_a_session(populated: Path) -> None:
    result = run_cli("rm", "new", "--database", str(populated))
    assert (result.returncode, result.stdout.strip()) == (0, "removed new")
    with sqlite3.connect(populated) as conn:
        ids = {r[0] for r in conn.execute("SELECT session_id FROM sessions")}
    conn.close()
    assert ids == {"old", "mid"}
    assert "new" in _one_line_error(run_cli("rm", "new", "-d", str(populated)))


def test_cleanup_prints_how_many_were_deleted(populated: Path) -> None:
    result = run_cli("cleanup", "--database", str(populated))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "deleted 1 expired sessions"
    result = run_cli("cleanup", "-d", str(populated), env={"SESSION_TIMEOUT_SECS": "300"})
    assert result.stdout.strip() == "deleted 1 expired sessions"  # 'mid' now too
    assert run_cli("cleanup", "-d", str(populated)).stdout.strip() == "deleted 0 expired sessions"


def test_stats_prints_the_metrics(populated: Path) -> None:
    metrics = json.loads(run_cli("stats", "--json", "-d", str(populated)).stdout)
    assert (metrics["total_sessions"], metrics["active_sessions"]) == (3, 2)
    assert 590 < metrics["oldest_session_age"] < 700
    text = run_cli("stats", "-d", str(populated)).stdout
    assert "active_sessions: 2" in text


def test_missing_file_is_one_clear_line(tmp_path: Path) -> None:
    line = _one_line_error(run_cli("ls", "-d", str(tmp_path / "absent.db")))
    assert "absent.db" in line
    assert "no such database file" in line
    assert not (tmp_path / "absent.db").exists()


def test_corrupt_file_is_one_clear_line(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    path.write_text("not a database at all\n")
    for command in ("ls", "stats", "cleanup", "migrate"):
        line = _one_line_error(run_cli(command, "-d", str(path)))
        assert str(path) in line
        assert "not a SQLite database" in line
    assert path.read_text() == "not a database at all\n"


def test_unknown_revision_is_one_clear_line(populated: Path) -> None:
    with sqlite3.connect(populated) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '9999'")
    conn.close()
    line = _one_line_error(run_cli("ls", "-d", str(populated)))
    assert "9999" in line
    assert "does not know" in line


def test_bad_environment_is_a_usage_error(populated: Path) -> None:
    result = run_cli("ls", "-d", str(populated), env={"SESSION_TIMEOUT_SECS": "later"})
    assert result.returncode == 2
    assert "SESSION_TIMEOUT_SECS" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "env", "code", "says"),
    [
        # Found by review: each of these hung, went on, or printed a traceback.
        (("ls", "--limit", "-1"), {}, 2, "--limit: must be 0 or more"),
        (("ls",), {"SESSIONSTORE_POOL_SIZE": "-1"}, 2, "pool_size must be positive"),
        (("serve", "--handshake-timeout", "nan"), {}, 2, "handshake timeout must be positive"),
        (("ls", "-d", "foo://bar"), {}, 2, "foo"),
        (("ls", "-d", "postgresql+asyncpg://x@127.0.0.1:1/test"), {}, 1, "cannot reach"),
    ],
    ids=["negative limit", "pool size", "nan timeout", "no such dialect", "no server"],
)
def test_bad_arguments_are_one_clear_line(
    populated: Path, args: tuple[str, ...], env: dict[str, str], code: int, says: str
) -> None:
    if "-d" not in args:
        args = (*args, "-d", str(populated))
    result = run_cli(*args, env=env, timeout=30)
    assert result.returncode == code, result.stderr
    assert says in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr


def test_python_dash_m_and_help() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("migrate", "ls", "show", "rm", "cleanup", "stats", "serve"):
        assert command in result.stdout


async def test_check_reads_every_page(db_path: Path) -> None:
    async with SessionManager(str(db_path), max_concurrent_sessions=0) as m:
        for _ in range(300):
            await m.ensure(data={"pad": "x" * 300})
    result = run_cli("check", "-d", str(db_path))
    assert (result.returncode, result.stdout.strip()) == (0, f"{db_path}: ok")
    scribble_pages(db_path)
    line = _one_line_error(run_cli("check", "-d", str(db_path)))
    assert str(db_path) in line
    assert "corrupt" in line
