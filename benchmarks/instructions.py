#!/usr/bin/env python
"""Instructions per create, counted by valgrind's callgrind: figures that load does not move.

On a shared machine the wall-clock rates of ``bench.py`` drift by a third within a
minute, for every contender at once; a change worth 5% cannot be seen in them. The
number of instructions a create costs does not drift (the same count twice, whatever
else the machine does). This counts them for scenario 1b, creates from 256 tasks:
sessionstore's ``ensure()`` through the public API, raw sqlite3's batched
transaction of ``bench.py`` (the limit), and the same tasks awaiting a group commit
that does nothing (what asyncio alone costs), each in a process of its own under
``valgrind --tool=callgrind``, once with the creates and once without (the start-up,
imports and the database's creation cancel out).

Run ``python benchmarks/instructions.py [--creates N] [--tasks T]``. Needs valgrind;
takes about three minutes (callgrind runs Python some fifty times slower).

Instructions are not time: a thread waiting for the GIL, a handoff between threads or
an ``fsync`` costs time and no instructions; SQLite's own C code runs more
instructions a second than the interpreter. So the ratio here is not the ratio of
rates, only what the work costs.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bench

from sessionstore import SessionManager

CONTENDERS = ("sessionstore", "raw", "floor", "asyncio")


async def _sessionstore(path: Path, creates: int, tasks: int) -> None:
    # No timers: under callgrind a run lasts a minute, and a periodic task (the
    # background checkpoint, the refresh) would run a number of times that depends on
    # how long; SQLite's own rule checkpoints in the commits instead, the same work
    # in every run.
    manager = bench.make_manager(
        path, bench.Clock(bench.BASE), background_tasks=False, checkpoint_interval_secs=0
    )
    await manager.start()
    await manager.ensure(data=bench.DATA)  # the first write's one-time costs, in both runs
    if creates:
        await bench.fixed_work(tasks, range(creates), lambda _i: manager.ensure(data=bench.DATA))
    await manager.aclose()


async def _asyncio_alone(creates: int, tasks: int) -> None:
    """What the tasks and the group commit cost in asyncio, without a create in them.

    The same shape as sessionstore's: each call queues a future and awaits it; one
    writer task takes the whole queue, hands it to a thread (which does nothing) and
    resolves the futures. What is left of sessionstore's count after this, the JSON
    and the id is its own.
    """
    loop = asyncio.get_running_loop()
    queue: list[asyncio.Future[bool]] = []
    wakeup = asyncio.Event()

    def submit() -> asyncio.Future[bool]:
        future: asyncio.Future[bool] = loop.create_future()
        queue.append(future)
        wakeup.set()
        return future

    async def writer() -> None:
        with ThreadPoolExecutor(1) as thread:
            while True:
                await wakeup.wait()
                wakeup.clear()
                batch = queue[:]
                queue.clear()
                await loop.run_in_executor(thread, int)
                for future in batch:
                    future.set_result(True)

    async def call() -> bool:
        return await submit()

    task = asyncio.create_task(writer())
    await call()
    if creates:
        await bench.fixed_work(tasks, range(creates), lambda _i: call())
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def _floor(path: Path, creates: int, tasks: int) -> None:
    async with bench.floor_writer(path) as create:
        await create()  # as above
        if creates:
            await bench.fixed_work(tasks, range(creates), lambda _i: create())


def _raw(path: Path, creates: int, tasks: int) -> None:
    step = bench.raw_create_step(path, tasks)
    conn = bench.raw_connect(path)
    try:
        step(conn, 0)  # as above
        for n in range(0, creates, tasks):
            step(conn, n)
    finally:
        conn.close()


def inner(contender: str, creates: int, tasks: int) -> None:
    """The measured process: a new database, then ``creates`` creates (0: none)."""
    with tempfile.TemporaryDirectory(prefix="ssinstr-") as root:
        path = Path(root) / "sessions.db"
        # Made and migrated by sessionstore itself in both contenders' processes.
        manager = bench.make_manager(path, bench.Clock(bench.BASE), background_tasks=False)
        asyncio.run(_start_stop(manager))
        if contender == "sessionstore":
            asyncio.run(_sessionstore(path, creates, tasks))
        elif contender == "raw":
            _raw(path, creates, tasks)
        elif contender == "floor":
            asyncio.run(_floor(path, creates, tasks))
        else:
            asyncio.run(_asyncio_alone(creates, tasks))


async def _start_stop(manager: SessionManager) -> None:
    await manager.start()
    await manager.aclose()


def count(contender: str, creates: int, tasks: int, out: Path) -> list[int]:
    """Run :func:`inner` under callgrind; instructions per thread, the main thread first."""
    prefix = out / f"{contender}-{creates}.cg"
    run = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--separate-threads=yes",
            f"--callgrind-out-file={prefix}",
            sys.executable,
            __file__,
            "--inner",
            contender,
            "--creates",
            str(creates),
            "--tasks",
            str(tasks),
        ],
        check=False,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    if run.returncode:
        tail = "\n".join(run.stderr.splitlines()[-20:])
        raise RuntimeError(f"{contender} under callgrind exited {run.returncode}:\n{tail}")
    totals = []
    for part in sorted(out.glob(f"{prefix.name}-*")):  # one file a thread: -01, -02, ...
        for line in part.read_text(errors="replace").splitlines():
            if line.startswith(("summary:", "totals:")):
                totals.append(int(line.split()[1]))
                break
    if not totals:
        raise RuntimeError(f"callgrind wrote no counts for {contender}")
    return totals


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--creates", type=int, default=20480, help="creates counted (default 20480)"
    )
    parser.add_argument("--tasks", type=int, default=256, help="concurrent tasks (default 256)")
    parser.add_argument("--inner", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.inner and (
        args.tasks < 1 or args.creates < args.tasks or args.creates % args.tasks
    ):
        parser.error("--creates must be a positive multiple of --tasks")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Count, print the table; 2 when valgrind is missing."""
    args = parse_args(argv)
    if args.inner:
        inner(args.inner, args.creates, args.tasks)
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind is not installed: no instruction counts", file=sys.stderr)
        return 2
    per_create: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory(prefix="ssinstr-out-") as root, ThreadPoolExecutor(2) as pool:
        out = Path(root)
        for contender in CONTENDERS:
            # The run without creates as well: with a count of 0, inner() makes none.
            runs = [pool.submit(count, contender, n, args.tasks, out) for n in (0, args.creates)]
            base, full = (r.result() for r in runs)
            main_thread = (full[0] - base[0]) / args.creates
            others = (sum(full[1:]) - sum(base[1:])) / args.creates
            per_create[contender] = (main_thread, others)
    print(f"instructions per create, {args.creates:,} creates from {args.tasks} tasks")
    print(f"{'':14}{'main thread':>14}{'other threads':>16}{'in all':>12}")
    for contender, (main_thread, others) in per_create.items():
        print(f"{contender:14}{main_thread:14,.0f}{others:16,.0f}{main_thread + others:12,.0f}")
    ss, raw = sum(per_create["sessionstore"]), sum(per_create["raw"])
    print(f"raw / sessionstore: {raw / ss:.3f}x (what rates would show if time went by count)")
    print(
        f"floor: {args.tasks} tasks awaiting a writer thread that runs raw's transaction "
        "(bench.floor_writer: no session, no cache, no checks)"
    )
    print(
        f"asyncio: {args.tasks} tasks awaiting a group commit that does nothing (no JSON, id, SQL)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
