"""The daemon's wire protocol, v1: JSON text frames in, typed requests out. No I/O.

Every client frame is one JSON object with an ``"op"``. :func:`parse` turns a frame
into one of the request classes below, or raises :class:`ProtocolError` whose
``code`` is the slug sent back in the ``error`` reply. The ``*_reply`` functions build
the server's replies as plain dicts; :func:`encode` turns one into a text frame.

Limits applied while parsing, so a hostile frame costs little and cannot smuggle
values the store would choke on: nesting at most :data:`MAX_DEPTH` levels, integers
within 64 bits, finite floats only, ``id`` at most :data:`MAX_ID_LENGTH` characters.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, TypeAlias

__all__ = [
    "APP_OP_PATTERN",
    "BUILTIN_OPS",
    "CLOSE_GOING_AWAY",
    "CLOSE_HANDSHAKE_TIMEOUT",
    "CLOSE_NORMAL",
    "CLOSE_PROTOCOL_ERROR",
    "CLOSE_SERVICE_RESTART",
    "CLOSE_SESSION_GONE",
    "CLOSE_SUPERSEDED",
    "CLOSE_TOO_BIG",
    "CLOSE_TRY_AGAIN_LATER",
    "MAX_DEPTH",
    "MAX_ID_LENGTH",
    "PROTOCOL_VERSION",
    "SUBPROTOCOL",
    "AppRequest",
    "Close",
    "Get",
    "Health",
    "Hello",
    "Logout",
    "Ping",
    "ProtocolError",
    "Request",
    "RequestId",
    "Resume",
    "Set",
    "bye_reply",
    "close_reason",
    "encode",
    "error_reply",
    "health_reply",
    "is_wellformed_token",
    "parse",
    "pong_reply",
    "result_reply",
    "superseded_notice",
    "welcome_reply",
]

#: The WebSocket subprotocol a client offers and the server negotiates.
SUBPROTOCOL: Final = "sessionstore.v1"
#: The ``"v"`` of hello/resume.
PROTOCOL_VERSION: Final = 1

CLOSE_NORMAL: Final = 1000
"""After ``bye`` (``close`` or ``logout``)."""
CLOSE_GOING_AWAY: Final = 1001
"""The server is going away (an embedding application stopped it)."""
CLOSE_TOO_BIG: Final = 1009
"""A frame was larger than the server's ``max_size`` (sent by websockets itself)."""
CLOSE_SERVICE_RESTART: Final = 1012
"""The daemon is restarting (SIGTERM): reconnect and resume."""
CLOSE_TRY_AGAIN_LATER: Final = 1013
"""The session limit is reached; the close reason says so."""
CLOSE_SESSION_GONE: Final = 4002
"""The session expired or was removed while the connection was open."""
CLOSE_SUPERSEDED: Final = 4003
"""Another connection resumed this session; do not reconnect automatically."""
CLOSE_PROTOCOL_ERROR: Final = 4004
"""The first frame was not a valid hello or resume."""
CLOSE_HANDSHAKE_TIMEOUT: Final = 4005
"""No hello or resume arrived within the handshake timeout."""

MAX_DEPTH: Final = 32
"""Deepest nesting of arrays and objects accepted in a frame (the frame is depth 1)."""
MAX_ID_LENGTH: Final = 128
"""Longest string ``id`` accepted."""
_INT_MIN: Final = -(2**63)
_INT_MAX: Final = 2**63 - 1
_MAX_CLOSE_REASON_BYTES: Final = 123  # RFC 6455: 125 bytes of payload minus the code

#: Ops the daemon answers itself; any other op goes to the application handler.
BUILTIN_OPS: Final = frozenset(
    {"hello", "resume", "ping", "get", "set", "health", "close", "logout"}
)
#: What an application op name must look like.
APP_OP_PATTERN: Final = re.compile(r"[A-Za-z][A-Za-z0-9_.:-]{0,63}")

# secrets.token_urlsafe(32) gives 43 characters; longer tokens leave room to grow.
_TOKEN_PATTERN: Final = re.compile(r"[A-Za-z0-9_-]{43,128}")

RequestId: TypeAlias = str | int | None
"""The optional ``id`` of a request, echoed as ``re`` in its reply."""


class ProtocolError(Exception):
    """A frame the protocol rejects.

    Attributes:
        code: The error slug (``bad_json``, ``not_object``, ``missing_op``,
            ``bad_type``, ``bad_value``, ``unsupported_version``, ...).
        message: A human-readable explanation.
        request_id: The frame's ``id`` when it could be read, else ``None``.
    """

    def __init__(self, code: str, message: str, request_id: RequestId = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id


@dataclass(frozen=True, slots=True)
class Hello:
    """``hello``: start a new session."""

    id: RequestId = None


@dataclass(frozen=True, slots=True)
class Resume:
    """``resume``: come back to the session the token belongs to.

    ``token`` is any string; :func:`is_wellformed_token` says whether it could be one
    the server issued (a malformed token is a failed resume, not a protocol error).
    """

    token: str
    id: RequestId = None

    def __repr__(self) -> str:
        return f"Resume(token='<redacted>', id={self.id!r})"


@dataclass(frozen=True, slots=True)
class Ping:
    """``ping``: activity, nothing else."""

    id: RequestId = None


@dataclass(frozen=True, slots=True)
class Get:
    """``get``: read the session's data, all of it or only ``keys``."""

    id: RequestId = None
    keys: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class Set:
    """``set``: shallow-merge ``data``, drop ``delete``; compare-and-set on ``if_version``."""

    id: RequestId = None
    data: dict[str, Any] = field(default_factory=dict)
    delete: tuple[str, ...] = ()
    if_version: int | None = None


@dataclass(frozen=True, slots=True)
class Health:
    """``health``: status and metrics."""

    id: RequestId = None


@dataclass(frozen=True, slots=True)
class Close:
    """``close``: leave; the session stays resumable."""

    id: RequestId = None


@dataclass(frozen=True, slots=True)
class Logout:
    """``logout``: delete the session now."""

    id: RequestId = None


@dataclass(frozen=True, slots=True)
class AppRequest:
    """An op the daemon does not know: for the application handler.

    ``message`` is the whole frame as parsed (``op`` and ``id`` included).
    """

    op: str
    message: dict[str, Any]
    id: RequestId = None


Request: TypeAlias = Hello | Resume | Ping | Get | Set | Health | Close | Logout | AppRequest
"""Any request :func:`parse` returns."""


class _BadNumber(ValueError):
    pass


def _parse_int(text: str) -> int:
    # Checked on the digits before int() so a 4000-digit literal costs nothing.
    if len(text.lstrip("-")) > 19:
        raise _BadNumber(f"integer {text[:24]}... is out of the 64-bit range")
    value = int(text)
    if not _INT_MIN <= value <= _INT_MAX:
        raise _BadNumber(f"integer {text} is out of the 64-bit range")
    return value


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _BadNumber(f"number {text[:24]} is out of range")
    return value


def _parse_constant(text: str) -> float:
    raise _BadNumber(f"{text} is not valid JSON")


_DECODER: Final = json.JSONDecoder(
    parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant
)


def _depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value, without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in item)
    return deepest


def _request_id(frame: Mapping[str, Any]) -> RequestId:
    raw = frame.get("id")
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, str | int):
        raise ProtocolError("bad_type", "id must be a string, an integer or null")
    if isinstance(raw, str) and len(raw) > MAX_ID_LENGTH:
        raise ProtocolError("bad_value", f"id is longer than {MAX_ID_LENGTH} characters")
    return raw


def _string_list(frame: Mapping[str, Any], name: str, rid: RequestId) -> tuple[str, ...] | None:
    raw = frame.get(name)
    if raw is None:
        return None
    if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
        raise ProtocolError("bad_type", f"{name} must be a list of strings", rid)
    return tuple(raw)


def _check_version(frame: Mapping[str, Any], rid: RequestId) -> None:
    version = frame.get("v", PROTOCOL_VERSION)
    if isinstance(version, bool) or not isinstance(version, int):
        raise ProtocolError("bad_type", "v must be an integer", rid)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            "unsupported_version",
            f"protocol version {version} is not supported; this server speaks {PROTOCOL_VERSION}",
            rid,
        )


_LONE_SURROGATE_ESCAPE: Final = re.compile(r"\\u[dD][89abcdefABCDEF]")


def _encodable(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse(frame: str | bytes) -> Request:
    """Parse one client text frame.

    Args:
        frame: The frame's text (``bytes`` are decoded as UTF-8).

    Returns:
        The typed request.

    Raises:
        ProtocolError: the frame is not a valid request; ``code`` says why.
    """
    try:
        text = frame.decode("utf-8") if isinstance(frame, bytes) else frame
        value = _DECODER.decode(text)
    except _BadNumber as exc:
        raise ProtocolError("bad_json", str(exc)) from None
    except RecursionError:
        # The same answer as the depth check below gives: whether the decoder runs out
        # of stack first depends on how deep the caller's own stack is.
        raise ProtocolError("bad_json", f"nested deeper than {MAX_DEPTH} levels") from None
    except UnicodeDecodeError:
        raise ProtocolError("bad_json", "frame is not valid UTF-8") from None
    except ValueError as exc:  # json.JSONDecodeError, and int() digit limits
        raise ProtocolError("bad_json", f"invalid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ProtocolError("not_object", "a frame must be a JSON object")
    # Depth first: the surrogate check encodes the value, which recurses as deep as it
    # is nested (and could run out of stack where the decoder did not).
    if _depth(value) > MAX_DEPTH:
        raise ProtocolError("bad_json", f"nested deeper than {MAX_DEPTH} levels")
    if _LONE_SURROGATE_ESCAPE.search(text) and not _encodable(value):
        # JSON may escape half of a surrogate pair; such a string is not Unicode text,
        # cannot be stored, and cannot even be echoed back (so no request id either).
        raise ProtocolError("bad_json", "a string holds an unpaired surrogate (not Unicode)")
    rid = _request_id(value)
    if "op" not in value:
        raise ProtocolError("missing_op", 'a frame must have an "op"', rid)
    op = value["op"]
    if not isinstance(op, str):
        raise ProtocolError("bad_type", "op must be a string", rid)
    return _build(op, value, rid)


def _build(op: str, frame: dict[str, Any], rid: RequestId) -> Request:
    if op == "hello":
        _check_version(frame, rid)
        return Hello(rid)
    if op == "resume":
        _check_version(frame, rid)
        token = frame.get("token")
        if not isinstance(token, str):
            raise ProtocolError("bad_type", "token must be a string", rid)
        return Resume(token, rid)
    if op == "ping":
        return Ping(rid)
    if op == "get":
        return Get(rid, _string_list(frame, "keys", rid))
    if op == "set":
        return _build_set(frame, rid)
    if op == "health":
        return Health(rid)
    if op == "close":
        return Close(rid)
    if op == "logout":
        return Logout(rid)
    if not APP_OP_PATTERN.fullmatch(op):
        raise ProtocolError(
            "bad_value", "op must be a letter then up to 63 of [A-Za-z0-9_.:-]", rid
        )
    return AppRequest(op, frame, rid)


def _build_set(frame: dict[str, Any], rid: RequestId) -> Set:
    data = frame.get("data")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ProtocolError("bad_type", "data must be an object", rid)
    delete = _string_list(frame, "delete", rid) or ()
    if_version = frame.get("if_version")
    if if_version is not None:
        if isinstance(if_version, bool) or not isinstance(if_version, int):
            raise ProtocolError("bad_type", "if_version must be an integer or null", rid)
        if if_version < 0:
            raise ProtocolError("bad_value", "if_version must not be negative", rid)
    return Set(rid, data, delete, if_version)


def is_wellformed_token(token: str) -> bool:
    """True if ``token`` has the shape of a token this server issues (URL-safe base64)."""
    return _TOKEN_PATTERN.fullmatch(token) is not None


# ----- replies -----


def welcome_reply(
    request_id: RequestId,
    *,
    session_id: str,
    token: str,
    recovered: bool,
    reason: str | None,
    idle_timeout_s: float,
    boot_id: str,
    server_time: float,
    data: Mapping[str, Any],
    version: int,
) -> dict[str, Any]:
    """The ``welcome`` that answers hello and resume (always the server's first frame)."""
    return {
        "op": "welcome",
        "re": request_id,
        "session_id": session_id,
        "token": token,
        "recovered": recovered,
        "reason": reason,
        "idle_timeout_s": idle_timeout_s,
        "boot_id": boot_id,
        "server_time": server_time,
        "data": dict(data),
        "version": version,
    }


def pong_reply(request_id: RequestId) -> dict[str, Any]:
    """The answer to ``ping``."""
    return {"op": "pong", "re": request_id}


def result_reply(request_id: RequestId, **fields: Any) -> dict[str, Any]:
    """A ``result`` (the answer to ``get`` and ``set``)."""
    return {"op": "result", "re": request_id, **fields}


def health_reply(request_id: RequestId, status: Mapping[str, Any]) -> dict[str, Any]:
    """The answer to ``health``: the same figures as ``GET /healthz``."""
    return {"op": "health", "re": request_id, **status}


def bye_reply(request_id: RequestId) -> dict[str, Any]:
    """The answer to ``close`` and ``logout``, sent just before close code 1000."""
    return {"op": "bye", "re": request_id}


def error_reply(request_id: RequestId, code: str, message: str, **fields: Any) -> dict[str, Any]:
    """An ``error``; ``fields`` add details (``version`` on a version conflict)."""
    return {"op": "error", "re": request_id, "code": code, "message": message, **fields}


def superseded_notice() -> dict[str, Any]:
    """Sent to a connection whose session another connection resumed (then 4003)."""
    return {"op": "superseded"}


def encode(message: Mapping[str, Any]) -> str:
    """A reply as a compact JSON text frame.

    Raises:
        ValueError, TypeError: the message is not JSON (NaN, a non-str key, an object).
    """
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def close_reason(text: str) -> str:
    """``text`` cut to fit a WebSocket close reason (123 bytes of UTF-8)."""
    raw = text.encode("utf-8")
    if len(raw) <= _MAX_CLOSE_REASON_BYTES:
        return text
    return raw[:_MAX_CLOSE_REASON_BYTES].decode("utf-8", "ignore")
