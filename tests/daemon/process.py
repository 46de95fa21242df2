"""``sessionstore serve`` as a real subprocess on a free port, with its log in a file."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import REPO

_LISTENING = re.compile(r"serving ws://127\.0\.0\.1:(\d+) ")
START_TIMEOUT = 15.0


def clean_env(**overrides: str) -> dict[str, str]:
    """The test's environment without any sessionstore settings, plus ``overrides``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SESSIONSTORE_", "SESSION_"))}
    env.update(overrides)
    return env


class Daemon:
    """One ``python -m sessionstore serve --port 0`` process (restartable).

    It serves the SQLite file ``database``, or with ``database_url`` (such as
    ``postgresql+asyncpg://...``) that URL, passed to ``--database`` as is.
    """

    def __init__(
        self,
        database: Path,
        log_path: Path,
        *args: str,
        env: dict[str, str] | None = None,
        log_level: str = "INFO",
        database_url: str | None = None,
    ) -> None:
        self.database = database
        self.database_url = database_url
        self.log_path = log_path
        self.args = args
        self.env = clean_env(**(env or {}))
        self.log_level = log_level
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self._log_offset = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self) -> Daemon:
        """Start it and wait for its start-up line (which names the bound port)."""
        assert self.proc is None, "already running"
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "sessionstore",
                    "--log-level",
                    self.log_level,
                    "serve",
                    "--port",
                    "0",
                    "--database",
                    self.database_url or str(self.database),
                    *self.args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=REPO,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            match = _LISTENING.search(self.new_log())
            if match:
                self.port = int(match.group(1))
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        self.kill()
        raise AssertionError(f"daemon did not start:\n{self.log()}")

    def log(self) -> str:
        """Everything every run of this daemon logged."""
        return self.log_path.read_text("utf-8", "replace") if self.log_path.exists() else ""

    def new_log(self) -> str:
        """What the current run logged."""
        return self.log()[self._log_offset :]

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Send ``sig`` and wait for the exit; returns the exit code."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        return code

    def kill(self) -> None:
        """SIGKILL if running (teardown)."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc = None


def log_problems(log: str) -> list[str]:
    """Lines of a daemon log that must never be there (a traceback, a leak, an error)."""
    bad = (
        "Traceback",
        "ResourceWarning",
        "Exception ignored",
        "never awaited",
        "Task was destroyed",
        " ERROR ",
        " CRITICAL ",
        "locked",
    )
    return [line for line in log.splitlines() if any(b in line for b in bad)]
