"""The :class:`Session` record: what a caller sees of one stored session. No I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Session"]


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
