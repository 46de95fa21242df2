"""Shared fixtures: a manual clock, a database path, and a manager factory."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from sessionstore import SessionManager
from tests.helpers import ManualClock


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "sessions.db"


ManagerFactory = Callable[..., SessionManager]


@pytest.fixture
async def make_manager(db_path: Path, clock: ManualClock) -> AsyncIterator[ManagerFactory]:
    """Build started-on-enter managers that are closed at the end of the test."""
    made: list[SessionManager] = []

    def factory(database: str | Path | None = None, **kwargs: Any) -> SessionManager:
        kwargs.setdefault("clock", clock)
        kwargs.setdefault("refresh_interval_secs", 0)
        manager = SessionManager(str(database or db_path), **kwargs)
        made.append(manager)
        return manager

    yield factory
    for manager in made:
        await manager.aclose()


@pytest.fixture
async def manager(make_manager: ManagerFactory) -> AsyncIterator[SessionManager]:
    async with make_manager(session_timeout_secs=60) as m:
        yield m
