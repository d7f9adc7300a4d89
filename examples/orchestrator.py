"""An orchestrator: hand review tasks to idle reviewers and watch them move, on the demo fleet.

Usage: ``.venv/bin/python examples/orchestrator.py [ROSTER]``

Without ROSTER it starts the demo fleet (``fleetbus.demo.ROSTER``: reviewers stub0 and stub1,
plus sh0 and py0) in a throwaway ``$FLEETBUS_HOME`` on its own tmux socket, and tears it down
at the end. With ROSTER it connects to that running fleet, e.g. one left by ``fleet demo --keep``,
which prints ``demo fleet in /tmp/fleetbus-demo-XXXX``. Its paths derive from ``$FLEETBUS_HOME``,
so pass the same one:

    .venv/bin/fleet demo --keep
    export FLEETBUS_HOME=/tmp/fleetbus-demo-XXXX
    .venv/bin/python examples/orchestrator.py $FLEETBUS_HOME/fleet.yaml
    .venv/bin/fleet --roster $FLEETBUS_HOME/fleet.yaml down

Exits 0 when every task ended ``done``.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import anyio

from fleetbus.client import Fleet, RouterUnavailable


async def orchestrate(target) -> bool:
    async with Fleet.connect(target) as fleet:
        finished: set[str] = set()  # ids of the tasks whose final event we have seen

        async def watch(events) -> None:
            # every state change of every task, as the router publishes it
            async for ev in events:
                d = ev.data
                print(f"  event #{ev.seq:<4} task {d['id']} {d['state']:9} slot={ev.slot or '-'}")
                if d["state"] in ("done", "failed", "timed-out"):
                    finished.add(d["id"])

        # subscribe first: the stream is live once entered, so no transition is missed
        async with fleet.events(kinds=["task"]) as events, anyio.create_task_group() as tg:
            tg.start_soon(watch, events)

            # 1. six reviews to whichever reviewer is idle; publish returns at once ("published")
            print("publishing 6 review tasks to idle:reviewer")
            ids = [(await fleet.publish("idle:reviewer", f"review PR {100 + i}")).id for i in range(6)]
            tasks = [await fleet.task(i, wait="done", timeout_s=60) for i in ids]

            # each slot's tasks, in order: a task is assigned only after the previous one ended
            spans = defaultdict(list)
            for t in tasks:
                if t.state == "done":
                    spans[t.slot].append((t.assigned_at, t.finished_at))
            overlap = any(b[0] < a[1] for s in spans.values() for a, b in zip(sorted(s), sorted(s)[1:]))
            print("spread:", ", ".join(f"{slot}={len(s)}" for slot, s in sorted(spans.items())),
                  "| a reviewer held two at once:", "YES" if overlap else "no")

            # 2. one broadcast: one task per slot of the class, followed to the end together
            print("broadcasting to all:reviewer")
            group = await fleet.publish("all:reviewer", "post your review summary", wait="done", timeout_s=60)
            tasks += group

            # let the watcher print the last transitions before we stop it
            with anyio.move_on_after(2):
                while not {t.id for t in tasks} <= finished:
                    await anyio.sleep(0.05)
            tg.cancel_scope.cancel()

    print(f"\n{'task':14} {'slot':6} {'state':9} done in")
    for t in tasks:
        done_in = f"{t.done_ms / 1000:.2f} s" if t.done_ms is not None else "-"
        print(f"{t.id:14} {t.slot or '-':6} {t.state:9} {done_in}")
    return all(t.state == "done" for t in tasks) and not overlap


def main() -> int:
    if len(sys.argv) > 1:  # a fleet that is already running
        try:
            return 0 if anyio.run(orchestrate, sys.argv[1], backend="asyncio") else 1
        except RouterUnavailable as e:
            print(f"{e}\n(is FLEETBUS_HOME the one the fleet was started with? see the docstring)", file=sys.stderr)
            return 4

    # our own demo fleet: FLEETBUS_HOME must be set before any path is computed
    home = Path(tempfile.mkdtemp(prefix="fleetbus-orch-"))
    os.environ["FLEETBUS_HOME"] = str(home)
    from fleetbus import demo, ops
    from fleetbus.config import load_roster
    from fleetbus.paths import fleet_paths

    roster = home / "fleet.yaml"
    roster.write_text(demo.ROSTER)
    fleet = load_roster(roster)
    paths = fleet_paths(fleet.tenant, fleet.roster.transport.socket)
    paths.ensure()
    try:
        ops.up(fleet, paths, timeout_s=30)
        print(f"demo fleet up in {home}")
        ok = anyio.run(orchestrate, fleet, backend="asyncio")
    finally:
        ops.down(fleet, paths)
        shutil.rmtree(home, ignore_errors=True)
        print("demo fleet torn down")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
