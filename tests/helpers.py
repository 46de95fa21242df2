"""Helpers for tests: a manual clock and real subprocesses."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
START = 1_750_000_000.0


class ManualClock:
    """An injected clock: time moves only when a test says so."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _run(
    argv: list[str], env: dict[str, str] | None, timeout: float
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=REPO,
        check=False,
    )


def start_python(code: str, *args: str) -> subprocess.Popen[str]:
    """Start a Python snippet as a real second process, its output piped as text."""
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_python(
    code: str, *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run a Python snippet in a fresh interpreter (a real second process)."""
    return _run([sys.executable, "-c", code, *args], env, timeout)


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m sessionstore ARGS`` in a real subprocess."""
    return _run([sys.executable, "-m", "sessionstore", *args], env, timeout)


def run_alembic(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m alembic ARGS`` from the repository root (where alembic.ini is)."""
    return _run([sys.executable, "-m", "alembic", *args], env, timeout)


async def wait_until(condition: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    """Poll ``condition`` until it holds: for background work, never for a timeout."""
    async with asyncio.timeout(timeout):
        while not await condition():
            await asyncio.sleep(0.01)


async def threads_left(before: set[threading.Thread]) -> set[threading.Thread]:
    """Threads started since ``before`` that are still alive once they had time to exit.

    A closed aiosqlite thread exits right after its last reply, so allow it a moment.
    """

    def alive() -> set[threading.Thread]:
        return {t for t in set(threading.enumerate()) - before if t.is_alive()}

    for _ in range(100):
        if not alive():
            break
        await asyncio.sleep(0.01)
    return alive()


def scribble_pages(path: Path) -> None:
    """Damage a checkpointed SQLite file: overwrite the header of every other page."""
    import contextlib
    import sqlite3

    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
    assert pages > 10, "too small to damage in the middle"
    raw = bytearray(path.read_bytes())
    for page in range(3, pages, 2):
        start = (page - 1) * page_size
        raw[start : start + 64] = b"\xa5" * 64
    path.write_bytes(bytes(raw))
