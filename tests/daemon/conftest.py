"""Fixtures for the daemon tests: an in-process server on a manual clock, real clients,
and real ``sessionstore serve`` subprocesses."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection

from sessionstore import SessionManager
from sessionstore.daemon.server import SessionServer, serve
from tests.daemon import wsclient
from tests.daemon.process import Daemon
from tests.helpers import ManualClock

StartServer = Callable[..., Awaitable[SessionServer]]
SpawnDaemon = Callable[..., Daemon]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def manager(tmp_path: Path, clock: ManualClock) -> AsyncIterator[SessionManager]:
    """A started manager on a temporary file: 60 s timeout, the manual clock."""
    async with SessionManager(
        str(tmp_path / "daemon.db"),
        clock=clock,
        session_timeout_secs=60,
        refresh_interval_secs=0,
        flush_interval_secs=0.05,
    ) as m:
        yield m


@pytest.fixture
async def start_server(manager: SessionManager) -> AsyncIterator[StartServer]:
    """Start in-process servers on port 0 (default: on ``manager``); closed at teardown."""
    servers: list[SessionServer] = []

    async def factory(on: SessionManager | None = None, **kwargs: Any) -> SessionServer:
        kwargs.setdefault("port", 0)
        kwargs.setdefault("check_interval", 0.05)
        kwargs.setdefault("close_timeout", 2.0)
        server = await serve(on or manager, **kwargs)
        servers.append(server)
        return server

    yield factory
    for server in servers:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def server(start_server: StartServer) -> SessionServer:
    """One in-process server with default options."""
    return await start_server()


@pytest.fixture
def url(server: SessionServer) -> str:
    return f"ws://127.0.0.1:{server.port}"


class Clients:
    """Opens real websockets client connections and closes them all at teardown."""

    def __init__(self) -> None:
        self.opened: list[ClientConnection] = []

    async def open(self, url: str, **kwargs: Any) -> ClientConnection:
        ws = await wsclient.open_ws(url, **kwargs)
        self.opened.append(ws)
        return ws

    async def hello(self, url: str, **kwargs: Any) -> tuple[ClientConnection, dict[str, Any]]:
        ws = await self.open(url, **kwargs)
        welcome = await wsclient.request(ws, {"op": "hello", "v": 1, "id": "h"})
        assert welcome["op"] == "welcome", welcome
        return ws, welcome

    async def resume(
        self, url: str, token: str, **kwargs: Any
    ) -> tuple[ClientConnection, dict[str, Any]]:
        ws = await self.open(url, **kwargs)
        welcome = await wsclient.request(ws, {"op": "resume", "v": 1, "id": "r", "token": token})
        assert welcome["op"] == "welcome", welcome
        return ws, welcome

    async def aclose(self) -> None:
        for ws in self.opened:
            await ws.close()


@pytest.fixture
async def clients() -> AsyncIterator[Clients]:
    c = Clients()
    yield c
    await c.aclose()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[SpawnDaemon]:
    """Build subprocess daemons on ``tmp_path/sessions.db`` (or ``database=``: another
    file; or ``database_url=``: a database URL); killed at teardown."""
    made: list[Daemon] = []

    def factory(
        *args: str,
        env: dict[str, str] | None = None,
        database: Path | None = None,
        **kwargs: Any,
    ) -> Daemon:
        daemon = Daemon(
            database or tmp_path / "sessions.db",
            tmp_path / f"daemon{len(made)}.log",
            *args,
            env=env,
            **kwargs,
        )
        made.append(daemon)
        return daemon

    yield factory
    for daemon in made:
        daemon.kill()
