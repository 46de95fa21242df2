"""Shared fixtures: a manual clock, a database (SQLite, or PostgreSQL for the contract
suite), and a manager factory.

Modules marked ``pytest.mark.contract`` run every test against each backend. The
PostgreSQL run uses ``SESSIONSTORE_TEST_POSTGRES_URL`` (default: the local server's
``test`` database); each test session creates a database of its own there and drops
it at the end, so runs cannot collide. Without a server those tests skip with the
reason.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import secrets
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import URL
from sqlalchemy.engine import make_url

from sessionstore import SessionManager
from tests.helpers import ManualClock

DEFAULT_POSTGRES_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        contract = metafunc.definition.get_closest_marker("contract") is not None
        backends = ["sqlite", "postgresql"] if contract else ["sqlite"]
        metafunc.parametrize("backend", backends, indirect=True)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _postgres_server_url() -> URL:
    return make_url(os.environ.get("SESSIONSTORE_TEST_POSTGRES_URL") or DEFAULT_POSTGRES_URL)


def _pg_admin_sync(url: URL, *statements: str) -> None:
    """Run admin statements from a thread of its own (an event loop may be running here)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, _pg_admin(url, *statements)).result()


async def _pg_admin(url: URL, *statements: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(
        host=url.host,
        port=url.port or 5432,
        user=url.username,
        password=url.password,
        database=url.database,
    )
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session (dropped afterwards)."""
    server = _postgres_server_url()
    try:
        socket.create_connection((server.host or "127.0.0.1", server.port or 5432), 2).close()
    except OSError as exc:
        pytest.skip(
            f"no PostgreSQL server at {server.host}:{server.port or 5432} ({exc}); "
            "set SESSIONSTORE_TEST_POSTGRES_URL to run the PostgreSQL suite"
        )
    name = f"sessionstore_test_{os.getpid()}_{secrets.token_hex(4)}"
    _pg_admin_sync(server, f'CREATE DATABASE "{name}"')
    try:
        yield server.set(drivername="postgresql+asyncpg", database=name).render_as_string(
            hide_password=False
        )
    finally:
        _pg_admin_sync(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "sessions.db"


@pytest.fixture
async def database(backend: str, db_path: Path, request: pytest.FixtureRequest) -> str:
    """The database the test's managers use: a SQLite file, or an empty PostgreSQL one."""
    if backend == "sqlite":
        return str(db_path)
    url: str = request.getfixturevalue("postgres_url")
    await _pg_admin(make_url(url), "DROP SCHEMA public CASCADE", "CREATE SCHEMA public")
    return url


ManagerFactory = Callable[..., SessionManager]


@pytest.fixture
async def make_manager(database: str, clock: ManualClock) -> AsyncIterator[ManagerFactory]:
    """Build managers (start them with ``async with``); all closed at the end of the test."""
    made: list[SessionManager] = []

    def factory(db: str | Path | None = None, **kwargs: Any) -> SessionManager:
        kwargs.setdefault("clock", clock)
        kwargs.setdefault("refresh_interval_secs", 0)
        manager = SessionManager(str(db or database), **kwargs)
        made.append(manager)
        return manager

    yield factory
    for manager in made:
        await manager.aclose()


@pytest.fixture
async def manager(make_manager: ManagerFactory) -> AsyncIterator[SessionManager]:
    async with make_manager(session_timeout_secs=60) as m:
        yield m
