"""examples/echo_app.py: its handler, served by the real daemon code."""

from __future__ import annotations

import importlib.util
from types import ModuleType

from sessionstore import SessionManager
from tests.daemon.conftest import Clients, StartServer
from tests.daemon.wsclient import request
from tests.helpers import REPO


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("echo_app", REPO / "examples" / "echo_app.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_echo_app_counts_echoes_across_reconnects(
    manager: SessionManager, start_server: StartServer, clients: Clients
) -> None:
    echo_app = load_example()
    server = await start_server(handler=echo_app.make_handler(manager))
    url = f"ws://127.0.0.1:{server.port}"
    ws, welcome = await clients.hello(url)
    assert await request(ws, {"op": "echo", "id": 1, "text": "hi"}) == {
        "op": "echo",
        "text": "hi",
        "count": 1,
        "re": 1,
    }
    assert (await request(ws, {"op": "echo", "text": 5}))["code"] == "bad_type"
    assert (await request(ws, {"op": "shout"}))["code"] == "unknown_op"
    await ws.close()

    ws, again = await clients.resume(url, welcome["token"])
    assert again["data"] == {"echoes": 1}
    assert (await request(ws, {"op": "echo", "text": "again"}))["count"] == 2
