"""The WebSocket daemon: protocol v1 over ``websockets.asyncio``, sessions in a manager.

Embed it in an application::

    async with SessionManager("sessions.db") as manager:
        async with serve(manager, handler=my_handler, port=8765) as server:
            await server.wait_closed()          # until server.close() is called

or run it as ``sessionstore serve`` (:func:`run_daemon`). One connection holds one
session; a later ``resume`` of the same session takes it over. See docs/protocol.md.
"""

from __future__ import annotations

import argparse
import asyncio
import http
import json
import logging
import math
import os
import signal
import time
import uuid
from collections.abc import Awaitable, Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from websockets.asyncio.server import Server, ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, NegotiationError
from websockets.http11 import Request as HttpRequest
from websockets.http11 import Response as HttpResponse
from websockets.typing import Origin, Subprotocol

from .. import __version__
from ..config import Settings
from ..errors import (
    DataTooLargeError,
    InvalidDataError,
    ManagerClosedError,
    SessionLimitError,
    SessionNotFoundError,
    StorageError,
    StorageFullError,
    VersionConflictError,
)
from ..manager import SessionManager
from ..session import Session
from ..store import settled
from . import protocol as p

#: Store errors that a request's reply describes (``_dispatch`` maps each to its code),
#: from the daemon's own ops and an application's handler alike.
_ANSWERED = (VersionConflictError, DataTooLargeError, InvalidDataError, StorageError)

__all__ = ["DaemonOptions", "Handler", "SessionServer", "run_daemon", "serve"]

log = logging.getLogger("sessionstore.daemon")

Handler = Callable[[Session, dict[str, Any]], Awaitable[Mapping[str, Any] | None]]
"""An application handler: ``await handler(session, message)`` for ops that are not
built in. ``message`` is the whole request (``op``, ``id`` and the rest); the returned
mapping is sent back with ``re`` set to the request's id and ``op`` defaulting to
``"result"``; ``None`` sends nothing. Raise :class:`~sessionstore.daemon.protocol.
ProtocolError` to answer with an ``error`` of that code."""

_CLOSE_INTERNAL_ERROR = 1011


class _WebsocketsLog(logging.LoggerAdapter[logging.Logger]):
    """websockets' own logging, kept to warnings and errors.

    Its debug output traces every frame, and frames carry resume tokens; its info
    lines repeat per connection what this module already says once.
    """

    def isEnabledFor(self, level: int) -> bool:
        return level >= logging.WARNING and self.logger.isEnabledFor(level)


class _Client:
    """One attached connection: the socket and the session it holds."""

    __slots__ = ("closing", "session_id", "ws")

    def __init__(self, ws: ServerConnection, session_id: str) -> None:
        self.ws = ws
        self.session_id = session_id
        self.closing = False


class _Metrics:
    """Prometheus figures for one server, in its own registry."""

    def __init__(self, server: SessionServer) -> None:
        self.registry = CollectorRegistry()
        self.resumes = Counter(
            "sessionstore_resumes",
            "Resume attempts by result: ok, or the failure reason.",
            ["result"],
            registry=self.registry,
        )
        for result in ("ok", "unknown", "expired", "revoked"):
            self.resumes.labels(result=result)
        self.protocol_errors = Counter(
            "sessionstore_protocol_errors",
            "Client frames answered with an error, by code.",
            ["code"],
            registry=self.registry,
        )
        self.takeovers = Counter(
            "sessionstore_takeovers",
            "Connections superseded by a later resume of their session (close 4003).",
            registry=self.registry,
        )
        self.kicks = Counter(
            "sessionstore_sessions_gone_while_connected",
            "Connections closed with 4002 because their session expired or was removed.",
            registry=self.registry,
        )
        self._server = server
        self.snapshot: dict[str, Any] = {}
        self.registry.register(self)

    def collect(self) -> Generator[Any, None, None]:
        """Yield the manager's figures as of the last :meth:`SessionServer.metrics_text`."""
        snap = self.snapshot
        gauges = (
            ("sessionstore_sessions_live", "Live (unexpired) sessions.", "active_sessions"),
            (
                "sessionstore_sessions_stored",
                "Session rows stored, including expired ones not yet cleaned up.",
                "total_sessions",
            ),
            (
                "sessionstore_sessions_limit",
                "Live sessions allowed at once (0: no limit).",
                "max_concurrent_sessions",
            ),
            (
                "sessionstore_pending_activity",
                "Sessions whose latest activity is not yet flushed to the database.",
                "pending_activity",
            ),
            (
                "sessionstore_flush_lag_seconds",
                "Duration of the last write transaction (how stale a commit can be).",
                "flush_lag_seconds",
            ),
        )
        for name, doc, key in gauges:
            if key in snap:
                yield GaugeMetricFamily(name, doc, value=snap[key])
        counters = (
            ("sessionstore_sessions_created", "Sessions created.", "sessions_created_total"),
            ("sessionstore_sessions_expired", "Sessions expired.", "sessions_expired_total"),
            ("sessionstore_sessions_removed", "Sessions removed.", "sessions_removed_total"),
            ("sessionstore_cleanup_runs", "Cleanup passes.", "sessions_cleanup_runs_total"),
        )
        for name, doc, key in counters:
            if key in snap:
                yield CounterMetricFamily(name, doc, value=snap[key])
        yield GaugeMetricFamily(
            "sessionstore_cleanup_duration_seconds",
            "Duration of the last cleanup pass.",
            value=self._server.manager.last_cleanup_seconds,
        )
        yield GaugeMetricFamily(
            "sessionstore_connections_open",
            "WebSocket connections holding a session.",
            value=self._server.connected,
        )
        yield GaugeMetricFamily(
            "sessionstore_uptime_seconds",
            "Seconds since the server started.",
            value=self._server.uptime,
        )
        yield GaugeMetricFamily(
            "sessionstore_draining",
            "1 while the server is shutting down.",
            value=1 if self._server.draining else 0,
        )
        yield GaugeMetricFamily(
            "sessionstore_database_up",
            "1 if the last look at the database worked.",
            value=1 if snap else 0,
        )


class SessionServer:
    """A running (or ready to run) sessionstore WebSocket server; made by :func:`serve`.

    Await it, or use it as ``async with``, to start listening. ``close()`` stops it
    (connections get ``code``), ``wait_closed()`` waits for that. The manager is the
    caller's: the server never closes it.
    """

    def __init__(
        self,
        manager: SessionManager,
        *,
        host: str,
        port: int,
        handler: Handler | None,
        max_size: int,
        handshake_timeout: float,
        origins: Sequence[str] | None,
        ping_interval: float | None,
        ping_timeout: float | None,
        close_timeout: float,
        check_interval: float,
    ) -> None:
        self.manager = manager
        self.boot_id = uuid.uuid4().hex
        self._host = host
        self._port = port
        self._handler = handler
        self._max_size = max_size
        self._handshake_timeout = handshake_timeout
        self._origins = list(origins) if origins is not None else None
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._close_timeout = close_timeout
        self._check_interval = check_interval
        self._ws: Server | None = None
        self._clients: dict[str, _Client] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._figures_task: asyncio.Task[dict[str, Any]] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._close_task: asyncio.Task[None] | None = None
        self._closed: asyncio.Event | None = None
        self._started = 0.0
        self._draining = False
        self.metrics = _Metrics(self)

    # ----- lifecycle -----

    async def start(self) -> Self:
        """Start listening (idempotent).

        Raises:
            OSError: the address cannot be bound.
            ManagerClosedError: the manager is closed.
        """
        if self._ws is not None:
            return self
        if self.manager.closed:
            raise ManagerClosedError("session manager is closed")
        origins: list[Origin | None] | None = None
        if self._origins is not None:
            # Browsers always send Origin; clients without one are not browsers, and
            # the allow-list exists to stop cross-site pages, not them.
            origins = [*(Origin(o) for o in self._origins), None]
        server = ws_serve(
            self._connection,
            self._host,
            self._port,
            origins=origins,
            subprotocols=[Subprotocol(p.SUBPROTOCOL)],
            select_subprotocol=self._select_subprotocol,
            compression=None,
            process_request=self._process_request,
            open_timeout=self._handshake_timeout,
            ping_interval=self._ping_interval,
            ping_timeout=self._ping_timeout,
            close_timeout=self._close_timeout,
            max_size=self._max_size,
            logger=_WebsocketsLog(log, {}),
        )
        await server
        self._ws = server
        self._closed = asyncio.Event()
        self._started = time.monotonic()
        self.manager.add_removal_listener(self._on_removed)
        self._watcher = asyncio.create_task(self._watch_sessions(), name="sessionstore-watch")
        log.debug("listening on %s:%d", self.host, self.port)
        return self

    def __await__(self) -> Generator[Any, None, Self]:
        return self.start().__await__()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
        await self.wait_closed()

    def close(self, code: int = p.CLOSE_GOING_AWAY, reason: str = "going away") -> None:
        """Stop accepting connections and close every open one with ``code`` (idempotent).

        ``/healthz`` answers 503 from now on. Use ``code=1012`` for a restart.
        """
        if self._close_task is None and self._ws is not None:
            self._draining = True
            self._close_task = asyncio.create_task(self._close(code, reason))

    async def wait_closed(self) -> None:
        """Wait until :meth:`close` has finished: every connection handler returned."""
        if self._closed is None:
            raise RuntimeError("server is not started")
        await self._closed.wait()
        if self._close_task is not None:
            await asyncio.shield(self._close_task)

    async def serve_forever(self) -> None:
        """Serve until cancelled (then close) or until :meth:`close` is called."""
        await self.start()
        try:
            await self.wait_closed()
        except asyncio.CancelledError:
            self.close()
            await self.wait_closed()
            raise

    async def _close(self, code: int, reason: str) -> None:
        assert self._ws is not None
        assert self._closed is not None
        log.info("closing %d connection(s) with code %d (%s)", len(self._clients), code, reason)
        try:
            if self._watcher is not None:
                self._watcher.cancel()
                await asyncio.gather(self._watcher, return_exceptions=True)
            self._ws.close(close_connections=True, code=code, reason=reason)
            try:
                async with asyncio.timeout(self._close_timeout + 1.0):
                    await self._ws.wait_closed()
            except TimeoutError:
                stuck = list(self._ws.handler_tasks)
                log.warning("cancelling %d connection handler(s) that did not finish", len(stuck))
                for task in stuck:
                    task.cancel()
                await self._ws.wait_closed()
            for task in list(self._background):
                task.cancel()
            await asyncio.gather(*self._background, return_exceptions=True)
        finally:
            self.manager.remove_removal_listener(self._on_removed)
            self._closed.set()

    # ----- state -----

    @property
    def port(self) -> int:
        """The bound TCP port (useful after ``port=0``)."""
        return int(self.sockets[0].getsockname()[1])

    @property
    def host(self) -> str:
        """The bound address."""
        return str(self.sockets[0].getsockname()[0])

    @property
    def sockets(self) -> tuple[Any, ...]:
        """The listening sockets."""
        if self._ws is None:
            raise RuntimeError("server is not started")
        return tuple(self._ws.sockets)

    @property
    def draining(self) -> bool:
        """True once :meth:`close` was called."""
        return self._draining

    @property
    def connected(self) -> int:
        """Connections that hold a session right now."""
        return len(self._clients)

    @property
    def uptime(self) -> float:
        """Seconds since the server started listening."""
        return time.monotonic() - self._started if self._started else 0.0

    async def health(self) -> dict[str, Any]:
        """Status, uptime and session counts: the ``health`` op and ``GET /healthz``."""
        sessions: dict[str, Any] = {"connected": self.connected}
        db = "ok"
        try:
            figures = await self._session_figures()
        except Exception as exc:
            log.warning("health check cannot read the database: %s", exc)
            db = "error"
            self.metrics.snapshot = {}
        else:
            self.metrics.snapshot = figures
            sessions.update(
                live=figures["active_sessions"],
                stored=figures["total_sessions"],
                limit=figures["max_concurrent_sessions"],
            )
        status = "draining" if self._draining else ("ok" if db == "ok" else "degraded")
        return {
            "status": status,
            "version": __version__,
            "boot_id": self.boot_id,
            "uptime_s": round(self.uptime, 3),
            "idle_timeout_s": self.manager.session_timeout_secs,
            "sessions": sessions,
            "db": db,
        }

    async def _session_figures(self) -> dict[str, Any]:
        """The manager's metrics; callers share reads of them, one read at a time.

        ``/healthz`` and ``/metrics`` answer anyone who connects, and each read is a
        flush and counts over the live sessions: a flood of requests costs one read at
        a time, not one each. A caller that comes while a read runs waits for it and
        shares the next one, which begins after it came: the figures never predate a
        write that returned before the call. The read is not cancelled by
        :meth:`close` (a health check during shutdown gets its answer).
        """
        running = self._figures_task
        if running is not None and not running.done():
            await asyncio.wait({running})
        task = self._figures_task
        if task is None or task.done():
            task = self._figures_task = asyncio.ensure_future(self.manager.get_session_metrics())
            task.add_done_callback(settled)  # its failure is seen even if every caller left
        return await asyncio.shield(task)

    async def metrics_text(self) -> str:
        """The Prometheus text exposition of this server's metrics."""
        await self.health()
        text: bytes = generate_latest(self.metrics.registry)
        return text.decode("utf-8")

    # ----- HTTP on the same port -----

    @staticmethod
    def _select_subprotocol(
        _connection: ServerConnection, offered: Sequence[Subprotocol]
    ) -> Subprotocol | None:
        if p.SUBPROTOCOL in offered:
            return Subprotocol(p.SUBPROTOCOL)
        if not offered:
            return None  # plain clients such as `python -m websockets` offer nothing
        raise NegotiationError(f"unsupported subprotocol; this server speaks {p.SUBPROTOCOL}")

    async def _process_request(
        self, connection: ServerConnection, request: HttpRequest
    ) -> HttpResponse | None:
        path = request.path.split("?", 1)[0]
        if path == "/healthz":
            status = await self.health()
            ok = status["status"] == "ok"
            code = http.HTTPStatus.OK if ok else http.HTTPStatus.SERVICE_UNAVAILABLE
            return _respond(connection, code, json.dumps(status) + "\n", "application/json")
        if path == "/metrics":
            body = await self.metrics_text()
            return _respond(connection, http.HTTPStatus.OK, body, CONTENT_TYPE_LATEST)
        if self._draining:
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "shutting down\n")
        return None

    # ----- one connection -----

    async def _connection(self, ws: ServerConnection) -> None:
        client: _Client | None = None
        try:
            client = await self._open(ws)
            if client is not None:
                await self._serve_client(client)
        except ConnectionClosed:
            pass
        except ManagerClosedError:
            await ws.close(p.CLOSE_SERVICE_RESTART, "service restart")
        except StorageError as exc:
            log.error("database error, closing connection: %s", exc)
            await ws.close(_CLOSE_INTERNAL_ERROR, "database unavailable")
        finally:
            if client is not None:
                self._detach(client)

    async def _open(self, ws: ServerConnection) -> _Client | None:
        """Run the handshake: the first frame must be hello or resume; send welcome."""
        try:
            async with asyncio.timeout(self._handshake_timeout):
                frame = await ws.recv()
        except TimeoutError:
            log.debug("no hello from %s within %.1fs", ws.remote_address, self._handshake_timeout)
            await ws.close(p.CLOSE_HANDSHAKE_TIMEOUT, "handshake timeout: send hello or resume")
            return None
        if isinstance(frame, bytes):
            await self._refuse(ws, "binary_frame", "the first frame must be a text frame")
            return None
        try:
            request = p.parse(frame)
        except p.ProtocolError as exc:
            await self._refuse(ws, exc.code, exc.message)
            return None
        if not isinstance(request, p.Hello | p.Resume):
            await self._refuse(ws, "handshake_required", "the first frame must be hello or resume")
            return None

        session: Session | None = None
        reason: str | None = "new"
        if isinstance(request, p.Resume):
            session, reason = await self._resume(request.token)
        try:
            if session is None:
                session = await self.manager.ensure()
            try:
                # Resumed: only while the token is still the session's, so that of two
                # clients resuming with one token at once, one gets the session.
                replacing = (
                    request.token if isinstance(request, p.Resume) and reason is None else None
                )
                token = await self.manager.issue_token(session.session_id, replacing=replacing)
            except SessionNotFoundError:  # removed (or resumed by another) since
                session, reason = await self.manager.ensure(), reason or "revoked"
                token = await self.manager.issue_token(session.session_id)
        except SessionLimitError as exc:
            log.info("session limit (%d) reached; refusing %s", exc.limit, ws.remote_address)
            reason_text = f"session limit reached ({exc.limit}); try again later"
            await ws.close(p.CLOSE_TRY_AGAIN_LATER, p.close_reason(reason_text))
            return None

        client = _Client(ws, session.session_id)
        previous = self._clients.get(session.session_id)
        self._clients[session.session_id] = client
        if previous is not None and previous is not client:
            log.info("session %s taken over by a new connection", session.session_id)
            self.metrics.takeovers.inc()
            self._kick(
                previous,
                p.CLOSE_SUPERSEDED,
                "superseded by a newer connection",
                notice=p.superseded_notice(),
            )
        try:
            await self._welcome(client, request.id, session, token, reason)
        except BaseException:
            self._detach(client)
            raise
        return client

    async def _welcome(
        self,
        client: _Client,
        request_id: p.RequestId,
        session: Session,
        token: str,
        reason: str | None,
    ) -> None:
        await self.manager.update_activity(session.session_id)
        recovered = reason is None
        log.debug(
            "session %s welcomed (%s)",
            session.session_id,
            "recovered" if recovered else "new" if reason == "new" else f"resume failed: {reason}",
        )
        welcome = p.welcome_reply(
            request_id,
            session_id=session.session_id,
            token=token,
            recovered=recovered,
            reason=reason,
            idle_timeout_s=self.manager.session_timeout_secs,
            boot_id=self.boot_id,
            server_time=self.manager.now(),
            data=session.data,
            version=session.version,
        )
        await client.ws.send(p.encode(welcome))

    async def _resume(self, token: str) -> tuple[Session | None, str | None]:
        if not p.is_wellformed_token(token):
            outcome: tuple[Session | None, str | None] = (None, "unknown")
        else:
            result = await self.manager.resume(token)
            outcome = (result.session, result.reason)
        self.metrics.resumes.labels(result=outcome[1] or "ok").inc()
        return outcome

    async def _refuse(self, ws: ServerConnection, code: str, message: str) -> None:
        """Close a connection whose first frame is not a valid hello/resume (4004)."""
        self.metrics.protocol_errors.labels(code=code).inc()
        await ws.close(p.CLOSE_PROTOCOL_ERROR, p.close_reason(f"{code}: {message}"))

    async def _serve_client(self, client: _Client) -> None:
        ws, sid = client.ws, client.session_id
        while True:
            frame = await ws.recv()
            if client.closing:
                continue  # a close is under way; recv() raises once it completes
            if not await self.manager.update_activity(sid):
                self._gone(client, "expired or removed")
                continue
            if isinstance(frame, bytes):
                await self._send_error(client, None, "binary_frame", "send JSON as text frames")
                continue
            try:
                request = p.parse(frame)
            except p.ProtocolError as exc:
                await self._send_error(client, exc.request_id, exc.code, exc.message)
                continue
            if isinstance(request, p.Close | p.Logout):
                if isinstance(request, p.Logout):
                    self._detach(client)  # our own delete must not close us with 4002
                    try:
                        await self.manager.remove(sid)
                    except StorageError as exc:  # not logged out: the session stays
                        if self._clients.setdefault(sid, client) is not client:
                            # Resumed on another connection meanwhile: the session is its.
                            self._kick(
                                client,
                                p.CLOSE_SUPERSEDED,
                                "superseded by a newer connection",
                                notice=p.superseded_notice(),
                            )
                            continue
                        await ws.send(p.encode(self._storage_error(request.id, sid, exc)))
                        continue
                    log.debug("session %s logged out", sid)
                await ws.send(p.encode(p.bye_reply(request.id)))
                await ws.close(p.CLOSE_NORMAL, "bye")
                return
            reply = await self._dispatch(client, request)
            if reply is not None:
                await ws.send(p.encode(reply))

    async def _dispatch(self, client: _Client, request: p.Request) -> dict[str, Any] | None:
        sid = client.session_id
        rid = request.id
        try:
            if isinstance(request, p.Ping):
                return p.pong_reply(rid)
            if isinstance(request, p.Get):
                session = await self.manager.get(sid)
                if session is None:
                    raise SessionNotFoundError(sid)
                data = session.data
                if request.keys is not None:
                    data = {k: data[k] for k in request.keys if k in data}
                return p.result_reply(rid, data=data, version=session.version)
            if isinstance(request, p.Set):
                updated = await self.manager.set_data(
                    sid, request.data, delete=request.delete, if_version=request.if_version
                )
                return p.result_reply(rid, version=updated.version)
            if isinstance(request, p.Health):
                return p.health_reply(rid, await self.health())
            if isinstance(request, p.Hello | p.Resume):
                return self._error(
                    rid,
                    "unexpected_op",
                    f"{type(request).__name__.lower()} is only valid as the first frame",
                )
            if isinstance(request, p.AppRequest):
                return await self._application(client, request)
        except VersionConflictError as exc:
            return self._error(rid, "version_conflict", str(exc), version=exc.actual)
        except DataTooLargeError as exc:
            return self._error(rid, "too_large", str(exc), limit=exc.limit)
        except InvalidDataError as exc:
            return self._error(rid, "invalid_data", str(exc))
        except SessionNotFoundError:
            self._gone(client, "expired or removed")
            return None
        except StorageError as exc:
            return self._storage_error(rid, sid, exc)
        return self._error(rid, "unknown_op", "unhandled request")  # pragma: no cover

    def _storage_error(self, rid: p.RequestId, sid: str, exc: StorageError) -> dict[str, Any]:
        """The reply to a request the database failed: the client may retry it."""
        log.warning("request on session %s failed: %s", sid, exc)
        if isinstance(exc, StorageFullError):
            return self._error(rid, "storage_full", "the server's storage is full; retry later")
        return self._error(rid, "storage_error", "the database could not be used; retry")

    async def _application(self, client: _Client, request: p.AppRequest) -> dict[str, Any] | None:
        rid = request.id
        if self._handler is None:
            return self._error(rid, "unknown_op", f"unknown op {request.op!r}")
        session = await self.manager.get(client.session_id)
        if session is None:
            raise SessionNotFoundError(client.session_id)
        try:
            reply = await self._handler(session, request.message)
        except p.ProtocolError as exc:
            return self._error(rid, exc.code, exc.message)
        except (*_ANSWERED, asyncio.CancelledError):
            raise  # what _dispatch answers for the store's own requests, it answers here too
        except Exception as exc:  # SessionLimitError, ManagerClosedError and the rest
            if isinstance(exc, SessionNotFoundError) and exc.session_id == client.session_id:
                raise  # the caller's own session is gone: 4002 (another's is the handler's)
            log.exception("application handler failed on op %r", request.op)
            return self._error(rid, "internal_error", "the application failed on this request")
        if reply is None:
            return None
        if not isinstance(reply, Mapping):
            log.error("application handler returned %s for op %r", type(reply).__name__, request.op)
            return self._error(rid, "internal_error", "the application gave no valid reply")
        out = {"op": "result", **reply, "re": rid}
        try:
            p.encode(out)
        except (TypeError, ValueError) as exc:
            log.error("application reply to op %r is not JSON: %s", request.op, exc)
            return self._error(rid, "internal_error", "the application gave no valid reply")
        return out

    def _error(self, rid: p.RequestId, code: str, message: str, **fields: Any) -> dict[str, Any]:
        self.metrics.protocol_errors.labels(code=code).inc()
        return p.error_reply(rid, code, message, **fields)

    async def _send_error(self, client: _Client, rid: p.RequestId, code: str, msg: str) -> None:
        await client.ws.send(p.encode(self._error(rid, code, msg)))

    # ----- sessions that go away under a connection -----

    def _detach(self, client: _Client) -> None:
        if self._clients.get(client.session_id) is client:
            del self._clients[client.session_id]

    def _kick(
        self,
        client: _Client,
        code: int,
        reason: str,
        *,
        notice: Mapping[str, Any] | None = None,
    ) -> None:
        """Close a client from outside its own handler (takeover, session gone)."""
        if client.closing:
            return
        client.closing = True
        self._detach(client)
        task = asyncio.create_task(self._close_client(client, code, reason, notice))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _close_client(
        self, client: _Client, code: int, reason: str, notice: Mapping[str, Any] | None
    ) -> None:
        try:
            if notice is not None:
                async with asyncio.timeout(self._close_timeout):
                    await client.ws.send(p.encode(notice))
        except (ConnectionClosed, TimeoutError):
            pass
        await client.ws.close(code, reason)

    def _gone(self, client: _Client, why: str) -> None:
        log.info("session %s %s while connected; closing with 4002", client.session_id, why)
        self.metrics.kicks.inc()
        self._kick(client, p.CLOSE_SESSION_GONE, f"session {why}")

    def _on_removed(self, session_id: str, reason: str) -> None:
        client = self._clients.get(session_id)
        if client is not None:
            self._gone(client, reason)

    async def _watch_sessions(self) -> None:
        """Close connections whose session expired, or was deleted by another process."""
        while True:
            await asyncio.sleep(self._check_interval)
            ids = list(self._clients)
            if not ids:
                continue
            try:
                await self.manager.refresh(ids)  # removal listeners close deleted ones
                for sid in ids:
                    client = self._clients.get(sid)
                    if client is not None and await self.manager.get(sid) is None:
                        self._gone(client, "expired")
            except ManagerClosedError:
                return
            except Exception:
                log.exception("checking attached sessions failed")


def _respond(
    connection: ServerConnection, status: http.HTTPStatus, body: str, content_type: str
) -> HttpResponse:
    response = connection.respond(status, body)
    headers: Headers = response.headers
    del headers["Content-Type"]
    headers["Content-Type"] = content_type
    headers["Cache-Control"] = "no-store"
    return response


def serve(
    manager: SessionManager,
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    handler: Handler | None = None,
    max_size: int = 65536,
    handshake_timeout: float = 10.0,
    origins: Sequence[str] | None = None,
    ping_interval: float | None = 20.0,
    ping_timeout: float | None = 20.0,
    close_timeout: float = 5.0,
    check_interval: float = 1.0,
) -> SessionServer:
    """A sessionstore WebSocket server on ``manager``; await it or ``async with`` it.

    Like websockets' own ``serve``, this is a plain function whose result is both
    awaitable and an async context manager::

        async with serve(manager, port=0) as server:
            print(server.port)

    Args:
        manager: A started :class:`~sessionstore.SessionManager` (the caller closes it).
        host: Address to bind; loopback by default.
        port: TCP port; 0 picks a free one (read it from ``server.port``).
        handler: Application handler for ops that are not built in (see
            :data:`Handler`); without one they are answered ``unknown_op``.
        max_size: Largest client frame in bytes; a larger one closes with 1009.
        handshake_timeout: Seconds for the HTTP upgrade, and again for the first
            frame (hello/resume); then close 4005.
        origins: Allowed ``Origin`` header values; others get HTTP 403. Clients that
            send no Origin (non-browsers) are allowed. ``None``: no check.
        ping_interval: Seconds between keepalive pings (``None``: off). Pings keep the
            connection, never the session, alive.
        ping_timeout: Seconds to wait for a pong before dropping the connection.
        close_timeout: Seconds to wait for a client to complete a close.
        check_interval: Seconds between checks that attached sessions still exist
            (another process may delete one).
    """
    return SessionServer(
        manager,
        host=host,
        port=port,
        handler=handler,
        max_size=max_size,
        handshake_timeout=handshake_timeout,
        origins=origins,
        ping_interval=ping_interval,
        ping_timeout=ping_timeout,
        close_timeout=close_timeout,
        check_interval=check_interval,
    )


# ----- the `sessionstore serve` command -----


@dataclass(frozen=True, kw_only=True)
class DaemonOptions:
    """Network options of ``sessionstore serve``: arguments, else environment, else defaults.

    Environment: ``SESSIONSTORE_HOST``, ``SESSIONSTORE_PORT``, ``SESSIONSTORE_MAX_SIZE``,
    ``SESSIONSTORE_HANDSHAKE_TIMEOUT``, ``SESSIONSTORE_ORIGINS`` (comma-separated).
    """

    host: str = "127.0.0.1"
    port: int = 8765
    max_size: int = 65536
    handshake_timeout: float = 10.0
    origins: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0..65535, got {self.port}")
        if self.max_size <= 0:
            raise ValueError(f"max size must be positive, got {self.max_size}")
        if not (math.isfinite(self.handshake_timeout) and self.handshake_timeout > 0):
            raise ValueError(f"handshake timeout must be positive, got {self.handshake_timeout}")

    @classmethod
    def from_args(
        cls, args: argparse.Namespace, environ: Mapping[str, str] | None = None
    ) -> DaemonOptions:
        """Options from parsed ``serve`` arguments, falling back to the environment.

        Raises:
            ValueError: a variable does not parse, or a value is out of range.
        """
        env = os.environ if environ is None else environ

        def pick(attr: str, var: str, kind: type[Any]) -> Any:
            value = getattr(args, attr, None)
            if value is not None:
                return value
            raw = env.get(var, "").strip()
            if not raw:
                return None
            try:
                return kind(raw)
            except ValueError:
                raise ValueError(f"{var}={raw!r} is not a valid {kind.__name__}") from None

        values: dict[str, Any] = {
            "host": pick("host", "SESSIONSTORE_HOST", str),
            "port": pick("port", "SESSIONSTORE_PORT", int),
            "max_size": pick("max_size", "SESSIONSTORE_MAX_SIZE", int),
            "handshake_timeout": pick("handshake_timeout", "SESSIONSTORE_HANDSHAKE_TIMEOUT", float),
        }
        origins = getattr(args, "origin", None)
        if not origins:
            raw_origins = env.get("SESSIONSTORE_ORIGINS", "")
            origins = [o.strip() for o in raw_origins.split(",") if o.strip()] or None
        values["origins"] = tuple(origins) if origins else None
        return cls(**{k: v for k, v in values.items() if v is not None})


async def run_daemon(args: argparse.Namespace, settings: Settings) -> int:
    """Run ``sessionstore serve`` until SIGTERM or SIGINT, then drain; the exit status.

    Logs one start-up line (address, database, sessions restored and expired while
    down). On a signal: clients get close 1012, pending activity is flushed, the
    database is closed, and the status is 0.
    """
    options = DaemonOptions.from_args(args)
    max_data = getattr(args, "max_data_bytes", None)
    if max_data is not None:
        settings = settings.with_(max_data_bytes=max_data)
    # The start-up line below reports recovery; the manager's own line would repeat it.
    manager = SessionManager(settings=settings, log_recovery=False)
    await manager.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals: list[signal.Signals] = []
    try:
        server = serve(
            manager,
            host=options.host,
            port=options.port,
            max_size=options.max_size,
            handshake_timeout=options.handshake_timeout,
            origins=options.origins,
            close_timeout=2.0,  # bounds how long one unresponsive client delays the exit
        )
        try:
            await server.start()
        except OSError as exc:
            log.error("cannot listen on %s port %d: %s", options.host, options.port, exc)
            return 1
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, stop.set)
                signals.append(sig)
            except (NotImplementedError, RuntimeError):  # not the main thread, or Windows
                pass
        recovery = await manager.recovered()
        host = f"[{server.host}]" if ":" in server.host else server.host
        log.info(
            "sessionstore %s serving ws://%s:%d database=%s sessions_restored=%d "
            "expired_while_down=%d",
            __version__,
            host,
            server.port,
            manager.database,
            recovery.restored,
            recovery.expired,
        )
        await stop.wait()
        started = time.monotonic()
        log.info("stopping: draining connections (close 1012)")
        server.close(p.CLOSE_SERVICE_RESTART, "service restart")
        await server.wait_closed()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await manager.aclose()
    log.info("stopped in %.2fs", time.monotonic() - started)
    return 0
