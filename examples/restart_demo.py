"""Sessions that survive a restart, in twenty lines: run this twice.

    python examples/restart_demo.py      # creates a session in demo-sessions.db
    python examples/restart_demo.py      # finds it again, with its data

Each run is a new process: the second one recovers what the first one wrote.
"""

import asyncio
import logging

from sessionstore import SessionManager


async def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    async with SessionManager("demo-sessions.db", session_timeout_secs=600) as manager:
        for session in await manager.list_sessions():
            visits = session.data.get("visits", 0) + 1
            await manager.set_data(session.session_id, {"visits": visits})
            print(
                f"recovered {session.session_id}: visit {visits}, "
                f"created {session.created_at:.0f}, idle {session.idle_seconds(manager.now()):.1f}s"
            )
        session = await manager.ensure(data={"visits": 1})
        print(f"created   {session.session_id} (durable now; run me again)")


if __name__ == "__main__":
    asyncio.run(main())
