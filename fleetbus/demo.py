"""``fleet demo``: a throwaway fleet on its own tmux socket, showing the main job end to end.

It writes a roster with two ``stub`` agents, one ``shell`` and one ``python`` slot into a
temporary ``$FLEETBUS_HOME`` (so nothing touches the user's own fleet or tmux server), runs
``fleet up``, sends one message to each slot with verification, prints each result with its
evidence and latency, prints ``fleet ps``, and tears everything down unless ``keep``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import anyio

from fleetbus import ops
from fleetbus.client import Client
from fleetbus.config import load_roster
from fleetbus.paths import fleet_paths

ROSTER = """\
version: 1
tenant: demo
transport: {kind: tmux, socket: demo}
bus: {heartbeat_ms: 500, liveness: 3, verify_timeout_s: 10}
agents:
  - {name: stub0, runtime: stub, class: reviewer}
  - {name: stub1, runtime: stub, class: reviewer}
  - {name: sh0, runtime: shell}
  - {name: py0, runtime: python}
"""

MESSAGES = {
    "stub0": "review PR 12 and report back",
    "stub1": "summarise the failing tests\n(two lines in one prompt)",
    "sh0": "echo hello from fleetbus",
    "py0": "print(6 * 7)",
}


def run(keep: bool = False, json_out: bool = False) -> int:
    """Run the demo; returns 0 when every message was accepted, else 1."""
    home = Path(tempfile.mkdtemp(prefix="fleetbus-demo-"))
    os.environ["FLEETBUS_HOME"] = str(home)
    roster = home / "fleet.yaml"
    roster.write_text(ROSTER)
    fleet = load_roster(roster)
    paths = fleet_paths(fleet.tenant, fleet.roster.transport.socket)
    paths.ensure()
    say = (lambda *a: None) if json_out else print
    say(f"demo fleet in {home} (tmux socket {paths.tmux_socket})")
    results = []
    try:
        rows = ops.up(fleet, paths, timeout_s=30).rows
        say("fleet up:\n" + ops.render_ps(rows) + "\n")

        async def send_all():
            async with Client(fleet, paths) as c:
                for slot, body in MESSAGES.items():
                    r = await c.send(slot, body, verify=True, timeout_s=10)
                    results.append(r)
                    say(f"send {slot:6} {body.splitlines()[0][:34]!r:38} -> {r.result:10} "
                        f"{r.evidence or '-':12} {r.latency_ms:7.1f} ms  {r.detail}")

        anyio.run(send_all, backend="asyncio")
        rows = ops.ps(fleet, paths)
        say("\nfleet ps:\n" + ops.render_ps(rows))
        if json_out:
            print(json.dumps({"home": str(home), "results": [r.model_dump() for r in results],
                              "ps": [r.model_dump(by_alias=True) for r in rows]}, indent=2))
    finally:
        if keep:
            say(f"\nkept running. Try:\n  FLEETBUS_HOME={home} fleet --roster {roster} ps\n"
                f"  FLEETBUS_HOME={home} fleet --roster {roster} watch stub0\n"
                f"  FLEETBUS_HOME={home} fleet --roster {roster} down")
        else:
            left = ops.down(fleet, paths)["leftovers"]
            shutil.rmtree(home, ignore_errors=True)  # the throwaway home: roster, journal, logs
            say("\ndemo fleet torn down" + "".join(f"\n  (ended pid {p['pid']}, {p['role']}, which outlived it)"
                                                   for p in left))
    ok = len(results) == len(MESSAGES) and all(r.result == "accepted" for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(run())
