"""The :class:`Session` record: what a caller sees of one stored session. No I/O."""

from __future__ import annotations

import binascii
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Final

__all__ = ["Session", "new_session_id"]

# Base64 over 64 URL-unreserved characters in ASCII order, so that ids of equal length
# compare (bytewise, as SQLite's BINARY collation does) like their bytes. Not "-": an
# id starting with it would read as an option on a command line.
_ORDERED_BASE64: Final = bytes.maketrans(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/",
    b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz~",
)
_MAX_MS: Final = 2**48 - 1


def new_session_id(now: float | None = None) -> str:
    """A new unique session id: 24 URL-safe characters that sort by creation time.

    The first 8 characters carry ``now`` (default: the wall clock) in milliseconds,
    the other 16 carry 96 random bits from ``os.urandom``, the source :mod:`secrets`
    uses (UUIDv7 has 74, ULID 80; a collision needs billions of ids in one millisecond).

    Ids made later sort after earlier ones (the idea of UUIDv7, RFC 9562), so a new
    row lands at the end of the primary-key index, and a batch of creates rewrites a
    few index pages instead of one page per row; sessions that expire together lie
    together, so cleanup rewrites few pages too. The creation time can be read from
    the id: ids are public (safe to log); resume tokens are the secret.
    """
    ms = int((time.time() if now is None else now) * 1000)
    prefix = _prefix
    if prefix[0] != ms:
        prefix = _prefix_of(ms)
    try:
        return prefix[1] + _RANDOM_PIECES.popleft()
    except IndexError:
        return prefix[1] + _random16()


def _encode(raw: bytes) -> str:
    return binascii.b2a_base64(raw, newline=False).translate(_ORDERED_BASE64).decode()


def _prefix_of(ms: int) -> tuple[int, str]:
    """The 8 characters of millisecond ``ms``, kept for the next id of the same one."""
    global _prefix
    clamped = 0 if ms < 0 else min(ms, _MAX_MS)
    prefix = (ms, _encode(clamped.to_bytes(6, "big")))
    _prefix = prefix  # one tuple: replaced whole
    return prefix  # not the global: another thread may have replaced it already


_prefix: tuple[int | None, str] = (None, "")  # no millisecond matches None

# Random parts are read from os.urandom 4 KiB at a time (one system call per 341 ids
# instead of one per id), encoded at once (12 bytes are 16 characters, so the encoding
# of the block is the encodings of its pieces end to end) and handed out 16 characters
# at a time. deque.popleft is atomic, so no two callers, in any threads, get the same
# piece; a forked child drops what it inherited, or parent and child would make the
# same ids.
_RANDOM_PIECES: deque[str] = deque()
os.register_at_fork(after_in_child=_RANDOM_PIECES.clear)


def _random16() -> str:
    text = _encode(os.urandom(12 * 341))
    _RANDOM_PIECES.extend(text[i : i + 16] for i in range(16, len(text), 16))
    return text[:16]


@dataclass(slots=True)
class Session:
    """A snapshot of one session: changing it changes nothing stored.

    Attributes:
        session_id: Public identifier (safe to log).
        created_at: Unix epoch seconds when the session was created.
        last_activity: Unix epoch seconds of the last recorded activity.
        data: The session's JSON object. A copy: change it with
            ``SessionManager.set_data``, not in place.
        version: Increases by one with every data change (for compare-and-set).
        closed: True when the snapshot describes a session that has been removed.
    """

    session_id: str
    created_at: float
    last_activity: float
    data: dict[str, Any] = field(default_factory=dict)
    version: int = 1
    closed: bool = False

    def idle_seconds(self, now: float) -> float:
        """Seconds since the last activity at ``now``; never negative."""
        return max(0.0, now - self.last_activity)
