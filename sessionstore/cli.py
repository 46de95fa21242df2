"""The ``sessionstore`` command: admin commands and the daemon.

Each command opens the database given by ``--database`` (default
``SESSIONSTORE_DATABASE``, else ``sessions.db``), does one thing and exits. Errors
print one line on stderr and exit 1 (2 for usage errors); no traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.exc import ArgumentError

from . import __version__, migrate
from .config import Settings
from .errors import SessionStoreError, StorageError
from .manager import SessionManager
from .session import Session
from .store import SessionStore

__all__ = ["main"]

log = logging.getLogger("sessionstore.cli")

Command = Callable[[argparse.Namespace], Coroutine[Any, Any, int]]


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _count(text: str) -> int:
    """An argparse type: a whole number, 0 or more."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.from_env(
        database=args.database,
        session_timeout_secs=getattr(args, "session_timeout", None),
        max_concurrent_sessions=getattr(args, "max_sessions", None),
        cleanup_interval_secs=getattr(args, "cleanup_interval", None),
    )


def _require_existing(settings: Settings) -> None:
    """Admin reads must not create a database by accident."""
    if "://" in settings.database:
        return
    if not Path(settings.database).exists():
        raise StorageError(f"{settings.database}: no such database file")


def _manager(args: argparse.Namespace) -> SessionManager:
    settings = _settings(args)
    _require_existing(settings)
    return SessionManager(settings=settings, background_tasks=False)


def _session_dict(session: Session, now: float) -> dict[str, Any]:
    return {
        "session_id": session.session_id,
        "created_at": session.created_at,
        "created_utc": _iso(session.created_at),
        "last_activity": session.last_activity,
        "last_activity_utc": _iso(session.last_activity),
        "idle_secs": round(session.idle_seconds(now), 3),
        "version": session.version,
        "data": session.data,
    }


async def cmd_migrate(args: argparse.Namespace) -> int:
    """Upgrade the schema to head, or print the current revision."""
    store = SessionStore(_settings(args).database)
    if args.action == "current":
        _require_existing(_settings(args))
        state = await store.open(upgrade=False)
        await store.close()
        head = migrate.head_revision()
        mark = " (head)" if state.revision == head else f" (head is {head})"
        print(f"{store.label}: {state.revision or 'empty'}{mark}")
        return 0
    before = await store.open(upgrade=True)
    await store.close()
    head = migrate.head_revision()
    if before.revision == head:
        print(f"{store.label}: already at {head} (head)")
    else:
        print(f"{store.label}: upgraded {before.revision or 'empty'} -> {head} (head)")
    return 0


async def cmd_ls(args: argparse.Namespace) -> int:
    """List live sessions, newest activity first."""
    async with _manager(args) as manager:
        sessions = await manager.list_sessions(limit=args.limit)
        now = manager.now()
    if args.json:
        print(json.dumps([_session_dict(s, now) for s in sessions], indent=2))
        return 0
    print(
        f"{'SESSION_ID':<38} {'CREATED (UTC)':<21} {'LAST ACTIVITY (UTC)':<21} "
        f"{'IDLE_S':>9} {'VER':>4}"
    )
    for s in sessions:
        print(
            f"{s.session_id:<38} {_iso(s.created_at):<21} {_iso(s.last_activity):<21} "
            f"{s.idle_seconds(now):>9.1f} {s.version:>4}"
        )
    return 0


async def cmd_show(args: argparse.Namespace) -> int:
    """Print one live session as JSON."""
    async with _manager(args) as manager:
        session = await manager.get(args.session_id)
        now = manager.now()
    if session is None:
        print(f"sessionstore: no live session {args.session_id!r}", file=sys.stderr)
        return 1
    print(json.dumps(_session_dict(session, now), indent=2))
    return 0


async def cmd_rm(args: argparse.Namespace) -> int:
    """Delete one session now."""
    async with _manager(args) as manager:
        removed = await manager.remove(args.session_id)
    if not removed:
        print(f"sessionstore: no session {args.session_id!r}", file=sys.stderr)
        return 1
    print(f"removed {args.session_id}")
    return 0


async def cmd_cleanup(args: argparse.Namespace) -> int:
    """Delete every expired session, in chunks, with a progress bar on a terminal."""
    from tqdm import tqdm

    async with _manager(args) as manager:
        expired = (await manager.recovered()).expired
        with tqdm(
            total=expired,
            unit="rows",
            desc="cleanup",
            file=sys.stderr,
            disable=not sys.stderr.isatty() or expired < 10_000,
        ) as bar:
            deleted = await manager.cleanup_stale_sessions(progress=bar.update)
    print(f"deleted {deleted} expired sessions")
    return 0


async def cmd_stats(args: argparse.Namespace) -> int:
    """Print the session metrics."""
    async with _manager(args) as manager:
        metrics = await manager.get_session_metrics()
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        for key, value in metrics.items():
            shown = f"{value:.1f}" if isinstance(value, float) else value
            print(f"{key}: {shown}")
    return 0


async def cmd_backup(args: argparse.Namespace) -> int:
    """Copy the database consistently while it is in use."""
    settings = _settings(args)
    _require_existing(settings)
    store = SessionStore(settings.database)
    await store.open(upgrade=False)
    try:
        await store.backup(Path(args.dest))
    finally:
        await store.close()
    await _check_every_page(args.dest)
    print(f"backed up {store.label} to {args.dest} (integrity ok)")
    return 0


async def _check_every_page(database: str) -> str:
    """Open without migrating, reading every page; raises on damage. The label."""
    store = SessionStore(database)
    await store.open(upgrade=False, check_max_bytes=None)
    await store.close()
    return store.label


async def cmd_check(args: argparse.Namespace) -> int:
    """Read every page of the database (``PRAGMA quick_check``), whatever its size."""
    settings = _settings(args)
    _require_existing(settings)
    print(f"{await _check_every_page(settings.database)}: ok")
    return 0


async def cmd_serve(args: argparse.Namespace) -> int:
    """Run the WebSocket daemon until SIGTERM or SIGINT."""
    from .daemon.server import run_daemon

    status: int = await run_daemon(args, _settings(args))
    return status


def _database_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--database",
        "-d",
        metavar="PATH_OR_URL",
        help="SQLite path or SQLAlchemy URL (default: $SESSIONSTORE_DATABASE or sessions.db)",
    )
    parser.add_argument(
        "--session-timeout",
        type=float,
        metavar="SECS",
        help="idle seconds before a session expires (default: $SESSION_TIMEOUT_SECS or 3600)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every command."""
    parser = argparse.ArgumentParser(prog="sessionstore", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--log-level",
        default=None,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="default: INFO for serve, WARNING for the admin commands",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Command, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        _database_arg(p)
        p.set_defaults(func=func)
        return p

    p = add("migrate", cmd_migrate, "upgrade the schema to head, or show the current revision")
    p.add_argument("action", nargs="?", choices=["upgrade", "current"], default="upgrade")
    p = add("ls", cmd_ls, "list live sessions, newest activity first")
    p.add_argument("--limit", type=_count, default=None, help="show at most this many")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = add("show", cmd_show, "show one live session as JSON")
    p.add_argument("session_id")
    p = add("rm", cmd_rm, "delete a session now")
    p.add_argument("session_id")
    add("cleanup", cmd_cleanup, "delete every expired session and print how many")
    p = add("stats", cmd_stats, "print session metrics")
    p.add_argument("--json", action="store_true", help="print JSON")
    add("check", cmd_check, "check every page of the database for damage (SQLite)")
    p = add("backup", cmd_backup, "write a consistent copy of the database (SQLite)")
    p.add_argument("dest", help="path of the copy; must not exist")
    p = add("serve", cmd_serve, "run the WebSocket daemon")
    p.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default 8765; 0 picks one)")
    p.add_argument(
        "--max-sessions",
        type=int,
        default=None,
        help="live sessions allowed at once (default $SESSION_MAX_CONCURRENT or 100)",
    )
    p.add_argument(
        "--cleanup-interval",
        type=float,
        default=None,
        metavar="SECS",
        help="seconds between cleanup passes (default $SESSION_CLEANUP_INTERVAL)",
    )
    p.add_argument(
        "--max-size",
        type=int,
        default=None,
        metavar="BYTES",
        help="largest client frame; larger closes with 1009 (default $SESSIONSTORE_MAX_SIZE "
        "or 65536)",
    )
    p.add_argument(
        "--max-data-bytes",
        type=int,
        default=None,
        metavar="BYTES",
        help="largest JSON data per session (default $SESSION_MAX_DATA_BYTES or 65536)",
    )
    p.add_argument(
        "--handshake-timeout",
        type=float,
        default=None,
        metavar="SECS",
        help="seconds to wait for hello/resume before close 4005 (default "
        "$SESSIONSTORE_HANDSHAKE_TIMEOUT or 10)",
    )
    p.add_argument(
        "--origin",
        action="append",
        default=None,
        metavar="ORIGIN",
        help="allowed Origin header, repeatable; others get HTTP 403 (default "
        "$SESSIONSTORE_ORIGINS, comma-separated; unset: no check)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sessionstore`` console script."""
    args = build_parser().parse_args(argv)
    level = args.log_level or ("INFO" if args.command == "serve" else "WARNING")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        command: Command = args.func
        return asyncio.run(command(args))
    except SessionStoreError as exc:
        print(f"sessionstore: error: {exc}", file=sys.stderr)
        return 1
    except (ValueError, ArgumentError) as exc:  # bad settings, a database URL of no dialect
        print(f"sessionstore: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
