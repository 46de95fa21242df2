"""The sessionstore error tree.

Every error the package raises on purpose derives from :class:`SessionStoreError`.
Errors that stand where the in-memory manager raised a builtin also inherit that
builtin, so ``except RuntimeError`` written against the old manager keeps working.

.. code-block:: text

    SessionStoreError
    ├── ManagerClosedError (RuntimeError)      the manager was closed, or never started
    ├── SessionLimitError (RuntimeError)        max concurrent sessions reached
    ├── SessionNotFoundError (KeyError)         no live session with that id
    ├── VersionConflictError                    compare-and-set lost: data changed meanwhile
    ├── DataTooLargeError (ValueError)          session data over the per-session byte limit
    ├── InvalidDataError (ValueError)           session data is not a JSON object
    └── StorageError                            the database could not be used
        ├── DatabaseCorruptError                not a SQLite file, or a damaged one
        ├── ForeignDatabaseError                a valid database that is not sessionstore's
        ├── UnknownRevisionError                schema revision newer than this code knows
        ├── StorageFullError                    disk or file-size limit reached
        ├── StorageReadOnlyError                file or directory not writable
        └── StorageBusyError                    the write lock was not had in time

Storage errors chain the driver's exception (``raise ... from exc``) and name the
database path in their message.
"""

from __future__ import annotations

__all__ = [
    "DataTooLargeError",
    "DatabaseCorruptError",
    "ForeignDatabaseError",
    "InvalidDataError",
    "ManagerClosedError",
    "SessionLimitError",
    "SessionNotFoundError",
    "SessionStoreError",
    "StorageBusyError",
    "StorageError",
    "StorageFullError",
    "StorageReadOnlyError",
    "UnknownRevisionError",
    "VersionConflictError",
]


class SessionStoreError(Exception):
    """Root of every error raised by sessionstore."""


class ManagerClosedError(SessionStoreError, RuntimeError):
    """The manager is not running: it was closed, or ``start()`` was never awaited."""


class SessionLimitError(SessionStoreError, RuntimeError):
    """Creating a session would exceed ``max_concurrent_sessions``."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"Maximum concurrent sessions ({limit}) exceeded")
        self.limit = limit


class SessionNotFoundError(SessionStoreError, KeyError):
    """No live session has this id (it never existed, was removed, or expired)."""

    def __init__(self, session_id: str) -> None:
        super().__init__(session_id)
        self.session_id = session_id

    def __str__(self) -> str:
        return f"no live session {self.session_id!r}"


class VersionConflictError(SessionStoreError):
    """``if_version`` did not match the session's current data version."""

    def __init__(self, session_id: str, expected: int, actual: int) -> None:
        super().__init__(f"session {session_id!r} is at version {actual}, not {expected}")
        self.session_id = session_id
        self.expected = expected
        self.actual = actual


class DataTooLargeError(SessionStoreError, ValueError):
    """The session's data, encoded as JSON, is larger than the configured limit."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"session data is {size} bytes, over the limit of {limit} bytes")
        self.size = size
        self.limit = limit


class InvalidDataError(SessionStoreError, ValueError):
    """Session data must be a JSON-serialisable object (a ``dict`` with ``str`` keys)."""


class StorageError(SessionStoreError):
    """The database could not be opened, read or written."""


class DatabaseCorruptError(StorageError):
    """The file is not a SQLite database, or its pages are damaged."""


class ForeignDatabaseError(StorageError):
    """A valid database that sessionstore did not create; it is left untouched."""


class UnknownRevisionError(StorageError):
    """The database's schema revision is not one this version of sessionstore knows."""


class StorageFullError(StorageError):
    """The disk (or a file-size limit) is full; earlier data is intact."""


class StorageReadOnlyError(StorageError):
    """The database file or its directory cannot be written."""


class StorageBusyError(StorageError):
    """Another connection held the write lock for longer than ``busy_timeout``."""
