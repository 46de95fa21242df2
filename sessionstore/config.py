"""Settings from keyword arguments and the environment.

Environment variables (the in-memory manager's names are kept):

- ``SESSIONSTORE_DATABASE``: path or SQLAlchemy URL (default ``sessions.db``)
- ``SESSION_TIMEOUT_SECS``: idle seconds before a session expires (default 3600)
- ``SESSION_MAX_CONCURRENT``: live sessions allowed at once (default 100; 0 = no limit)
- ``SESSION_CLEANUP_INTERVAL``: seconds between cleanup passes (default 300)
- ``SESSION_FLUSH_INTERVAL``: longest delay before activity reaches disk (default 1.0)
- ``SESSION_MAX_DATA_BYTES``: largest JSON data per session (default 65536)
- ``SESSION_REFRESH_INTERVAL``: seconds between re-reads of cached sessions, which
  bounds how long a session deleted by another process is still served (default 5; 0 off)
- ``SESSIONSTORE_SYNCHRONOUS``: SQLite ``synchronous`` pragma, FULL or NORMAL (default FULL)
- ``SESSIONSTORE_POOL_SIZE``: database connections kept open (default 4; PostgreSQL may
  open as many again under load)
- ``SESSIONSTORE_CHECKPOINT_INTERVAL``: SQLite: seconds after a commit before a
  background task copies the WAL into the database file (default 1; 0 = inside the
  commits, SQLite's default)
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

__all__ = ["DEFAULT_DATABASE", "Settings"]

DEFAULT_DATABASE = "sessions.db"

_ENV: dict[str, tuple[str, type]] = {
    "database": ("SESSIONSTORE_DATABASE", str),
    "session_timeout_secs": ("SESSION_TIMEOUT_SECS", float),
    "max_concurrent_sessions": ("SESSION_MAX_CONCURRENT", int),
    "cleanup_interval_secs": ("SESSION_CLEANUP_INTERVAL", float),
    "flush_interval_secs": ("SESSION_FLUSH_INTERVAL", float),
    "max_data_bytes": ("SESSION_MAX_DATA_BYTES", int),
    "refresh_interval_secs": ("SESSION_REFRESH_INTERVAL", float),
    "synchronous": ("SESSIONSTORE_SYNCHRONOUS", str),
    "pool_size": ("SESSIONSTORE_POOL_SIZE", int),
    "checkpoint_interval_secs": ("SESSIONSTORE_CHECKPOINT_INTERVAL", float),
}


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Every tunable of a :class:`~sessionstore.SessionManager`, validated.

    Build one with keyword arguments, or with :meth:`from_env` to read the
    environment first and let keyword arguments override it.
    """

    database: str = DEFAULT_DATABASE
    session_timeout_secs: float = 3600.0
    max_concurrent_sessions: int = 100
    cleanup_interval_secs: float = 300.0
    flush_interval_secs: float = 1.0
    max_data_bytes: int = 65536
    synchronous: str = "FULL"
    busy_timeout_ms: int = 5000
    cleanup_chunk_rows: int = 500
    cleanup_chunk_secs: float = 0.005
    tombstone_retention_secs: float = 7 * 86400.0
    refresh_interval_secs: float = 5.0
    startup_check_max_bytes: int = 64 * 1024 * 1024
    pool_size: int = 4
    checkpoint_interval_secs: float = 1.0

    def __post_init__(self) -> None:
        positive = (
            "session_timeout_secs",
            "cleanup_interval_secs",
            "flush_interval_secs",
            "max_data_bytes",
            "cleanup_chunk_rows",
            "pool_size",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        for name in (f.name for f in fields(self) if f.name.endswith("_secs")):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)!r}")
        zero_means = {
            "max_concurrent_sessions": "means no limit",
            "startup_check_max_bytes": "disables the check",
            "refresh_interval_secs": "disables it",
            "checkpoint_interval_secs": "means only SQLite's own checkpoints inside commits",
            "cleanup_chunk_secs": "keeps every chunk at cleanup_chunk_rows",
            "busy_timeout_ms": "means no waiting",
        }
        for name, meaning in zero_means.items():
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 {meaning})")
        sync = self.synchronous.upper()
        if sync not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError(f"synchronous must be FULL, NORMAL or EXTRA, got {self.synchronous!r}")
        object.__setattr__(self, "synchronous", sync)
        if not self.database:
            raise ValueError("database must not be empty")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from the environment, then ``overrides`` (``None`` values ignored).

        Raises:
            ValueError: a variable does not parse as its type, or is out of range.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, (var, kind) in _ENV.items():
            raw = env.get(var)
            if raw is None or raw.strip() == "":
                continue
            try:
                values[name] = kind(raw.strip())
            except ValueError:
                raise ValueError(f"{var}={raw!r} is not a valid {kind.__name__}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def with_(self, **changes: Any) -> Settings:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """Names of every setting, for callers that forward keyword arguments."""
        return tuple(f.name for f in fields(cls))
