"""A real websockets client and a raw HTTP GET, for the daemon tests."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from sessionstore.daemon.protocol import SUBPROTOCOL

TIMEOUT = 5.0


async def open_ws(url: str, **kwargs: Any) -> ClientConnection:
    """Connect offering the sessionstore subprotocol (unless told otherwise)."""
    kwargs.setdefault("subprotocols", [Subprotocol(SUBPROTOCOL)])
    kwargs.setdefault("open_timeout", TIMEOUT)
    kwargs.setdefault("close_timeout", 2)
    return await connect(url, **kwargs)


async def send(ws: ClientConnection, message: dict[str, Any] | str | bytes) -> None:
    """Send a dict as JSON text, or a str/bytes frame as is."""
    await ws.send(json.dumps(message) if isinstance(message, dict) else message)


async def receive(ws: ClientConnection) -> dict[str, Any]:
    """The next frame from the server, parsed."""
    async with asyncio.timeout(TIMEOUT):
        frame = await ws.recv()
    value: dict[str, Any] = json.loads(frame)
    return value


async def request(ws: ClientConnection, message: dict[str, Any] | str | bytes) -> dict[str, Any]:
    """Send one frame and return the server's next frame."""
    await send(ws, message)
    return await receive(ws)


async def hello(url: str, **kwargs: Any) -> tuple[ClientConnection, dict[str, Any]]:
    """Open a connection, say hello, return it with the welcome."""
    ws = await open_ws(url, **kwargs)
    welcome = await request(ws, {"op": "hello", "v": 1, "id": "h"})
    assert welcome["op"] == "welcome", welcome
    return ws, welcome


async def resume(url: str, token: str, **kwargs: Any) -> tuple[ClientConnection, dict[str, Any]]:
    """Open a connection, resume with ``token``, return it with the welcome."""
    ws = await open_ws(url, **kwargs)
    welcome = await request(ws, {"op": "resume", "v": 1, "id": "r", "token": token})
    assert welcome["op"] == "welcome", welcome
    return ws, welcome


async def closed(
    ws: ClientConnection, timeout: float = TIMEOUT
) -> tuple[int | None, str, list[Any]]:
    """Wait for the server to close: ``(code, reason, frames received meanwhile)``."""
    frames: list[Any] = []
    async with asyncio.timeout(timeout):
        try:
            while True:
                frame = await ws.recv()
                frames.append(json.loads(frame) if isinstance(frame, str) else frame)
        except ConnectionClosed:
            pass
        await ws.wait_closed()
    return ws.close_code, ws.close_reason or "", frames


async def http_get(port: int, path: str) -> tuple[int, dict[str, str], str]:
    """A plain HTTP/1.1 GET to 127.0.0.1: ``(status, headers, body)``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        async with asyncio.timeout(TIMEOUT):
            raw = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    return parse_http(raw)


def parse_http(raw: bytes) -> tuple[int, dict[str, str], str]:
    """Split a raw HTTP response into status, headers (lower-case names) and body."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body.decode("utf-8")
