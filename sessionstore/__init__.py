"""sessionstore: persistent sessions for long-running asyncio daemons.

Sessions and their last-activity times live in SQLite (or PostgreSQL) through an async
repository, so a restarted daemon reloads its live sessions and drops the expired ones.

.. code-block:: python

    async with SessionManager("sessions.db", session_timeout_secs=3600) as manager:
        session = await manager.ensure()          # durable when it returns
        await manager.update_activity(session.session_id)
"""

from importlib.metadata import PackageNotFoundError, version

from .config import Settings
from .errors import (
    DatabaseCorruptError,
    DataTooLargeError,
    ForeignDatabaseError,
    InvalidDataError,
    ManagerClosedError,
    SessionLimitError,
    SessionNotFoundError,
    SessionStoreError,
    StorageBusyError,
    StorageError,
    StorageFullError,
    StorageReadOnlyError,
    UnknownRevisionError,
    VersionConflictError,
)
from .manager import RecoveryReport, ResumeResult, SessionManager
from .session import Session, new_session_id

try:
    __version__ = version("sessionstore")
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0.0.0"

__all__ = [
    "DataTooLargeError",
    "DatabaseCorruptError",
    "ForeignDatabaseError",
    "InvalidDataError",
    "ManagerClosedError",
    "RecoveryReport",
    "ResumeResult",
    "Session",
    "SessionLimitError",
    "SessionManager",
    "SessionNotFoundError",
    "SessionStoreError",
    "Settings",
    "StorageBusyError",
    "StorageError",
    "StorageFullError",
    "StorageReadOnlyError",
    "UnknownRevisionError",
    "VersionConflictError",
    "__version__",
    "new_session_id",
]
