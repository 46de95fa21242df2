"""A tiny application on the sessionstore daemon: one custom op, ``echo``.

``echo`` answers with the text it was sent and counts, in the session's own data, how
many echoes this session has asked for, so the count survives reconnects and restarts.

Run it, then talk to it by hand::

    python examples/echo_app.py --port 8765 --database echo.db
    python -m websockets ws://127.0.0.1:8765
    > {"op":"hello"}
    > {"op":"echo","text":"hi"}
    < {"op":"echo","text":"hi","count":1,"re":null}

Stop it with Ctrl-C; reconnect with ``{"op":"resume","token":"..."}`` and the count
carries on.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import Mapping
from typing import Any

from sessionstore import Session, SessionManager
from sessionstore.daemon.protocol import ProtocolError
from sessionstore.daemon.server import Handler, serve

log = logging.getLogger("echo_app")


def make_handler(manager: SessionManager) -> Handler:
    """The application's handler: built-in ops never reach it, everything else does."""

    async def handle(session: Session, message: dict[str, Any]) -> Mapping[str, Any] | None:
        if message["op"] != "echo":
            raise ProtocolError("unknown_op", f"this app knows echo, not {message['op']!r}")
        text = message.get("text")
        if not isinstance(text, str):
            raise ProtocolError("bad_type", "text must be a string")
        count = int(session.data.get("echoes", 0)) + 1
        # Durable before the reply, like the built-in set.
        await manager.set_data(session.session_id, {"echoes": count})
        return {"op": "echo", "text": text, "count": count}

    return handle


async def main(port: int, database: str) -> None:
    """Serve the echo app until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with (
        SessionManager(database) as manager,
        serve(manager, port=port, handler=make_handler(manager)) as server,
    ):
        log.info("echo app on ws://127.0.0.1:%d (database %s)", server.port, database)
        await stop.wait()
        server.close(1012, "service restart")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--database", default="echo.db")
    options = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    asyncio.run(main(options.port, options.database))
