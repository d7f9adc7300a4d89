"""Benchmark: crash cycles under load. Nothing lost, nothing twice, and how fast it recovers.

A throwaway fleet (fresh ``$FLEETBUS_HOME``, own tmux socket) of 4 stub agents whose turns take
0 ms and that record every prompt they take (``fleet-stub --record``). A load task sends
messages without pause from 8 workers, each waiting for its message's answer before the next
(``verify``, ``when="available"``, an idempotency key each)
while, every cycle, one process is killed with SIGKILL, in turn:

- ``router``: the bench starts a new router 0.2 s later (as systemd's ``Restart=`` would);
- ``sidecar`` of one slot, ``runtime`` (the stub process in one pane), ``tmux`` (the fleet's
  own tmux server): the router's supervisor must notice and restore them. The roster sets
  ``restart: always``, backoff 0.2 s doubling to 2 s and a crash-loop limit of 1,000, so that
  repeated kills measure recovery, not the crash-loop policy (tested on its own).

Time to recover: from the kill until a probe message to the affected slot (``verify``,
``when="available"``, ``wait="accepted"``) is accepted, i.e. delivery works again end to end.
At the end, the journal must have no open message; every stub's record is counted:

- delivered: distinct messages the agents took; duplicated: taken more than once;
- lost: answered ``queued``/``accepted`` by fleetbus and neither taken by an agent nor
  reported ``unconfirmed`` by the journal (a message typed into a runtime that was killed before
  it read it is ``unconfirmed``: fleetbus says so, it is not silent loss).

Run: ``.venv/bin/python bench/crash.py [--cycles N] [--victims router,sidecar,runtime,tmux]``
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import anyio

from common import pct, report_leftovers  # bench/common.py (this folder is on sys.path)
from fleetbus import ops
from fleetbus.client import Client
from fleetbus.config import load_roster
from fleetbus.paths import fleet_paths
from fleetbus.router import procs
from fleetbus.router.journal import OPEN_STATES, Journal
from fleetbus.transports.tmux import TmuxTransport

SLOTS = ["c0", "c1", "c2", "c3"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cycles", type=int, default=20)
    ap.add_argument("--victims", default="router,sidecar,runtime,tmux")
    args = ap.parse_args()
    victims = args.victims.split(",")
    home = Path(tempfile.mkdtemp(prefix="fb-crash-", dir="/tmp"))
    os.environ["FLEETBUS_HOME"] = str(home)
    os.environ["TMUX_TMPDIR"] = str(home)
    os.environ.pop("TMUX", None)
    (home / "rec").mkdir()
    agents = "\n".join(f'  - {{name: {s}, runtime: stub, restart: always, command: [fleet-stub, --think-ms, "0", '
                       f'--record, "{home}/rec/{s}.jsonl"]}}' for s in SLOTS)
    roster = home / "fleet.yaml"
    roster.write_text(f"version: 1\ntenant: crash\ntransport: {{kind: tmux, socket: crash}}\n"
                      f"bus: {{heartbeat_ms: 500, liveness: 3, restart_backoff_ms: 200, restart_backoff_max_ms: 2000, "
                      f"crash_loop_restarts: 1000, send_rate: 0}}\nagents:\n{agents}\n")  # one client sends ~200/s
    fleet = load_roster(roster)
    paths = fleet_paths(fleet.tenant, fleet.roster.transport.socket)
    paths.ensure()
    sent: dict[str, str] = {}  # key -> body
    answered: dict[str, str] = {}
    recover_s: dict[str, list[float]] = {v: [] for v in victims}
    failed = False
    print(f"# bench/crash.py, {datetime.date.today()}, {os.cpu_count()} cores; {args.cycles} cycles, victims {victims}")
    try:
        ops.up(fleet, paths, timeout_s=30)

        async def run() -> None:
            stop = anyio.Event()
            async with Client(fleet, paths, connect_timeout_s=30) as c:
                async def load(worker: int) -> None:
                    i = 0
                    while not stop.is_set():
                        key = f"w{worker}-{i}"
                        body = f"load {key}"
                        slot = SLOTS[(worker + i) % len(SLOTS)]
                        sent[key] = body
                        r = await c.send(slot, body, idempotency_key=key, verify=True, when="available",
                                         timeout_s=30)
                        answered[key] = r.result
                        i += 1

                async def probe(slot: str, n: int) -> None:
                    r = await c.send(slot, f"probe {n}", idempotency_key=f"probe-{n}", verify=True,
                                     when="available", wait="accepted", timeout_s=120)
                    sent[f"probe-{n}"] = f"probe {n}"
                    answered[f"probe-{n}"] = r.result
                    if r.result != "accepted":
                        raise RuntimeError(f"probe {n} to {slot}: {r.result} {r.code} {r.detail}")

                async with anyio.create_task_group() as tg:
                    for w in range(8):
                        tg.start_soon(load, w)
                    for n in range(args.cycles):
                        await anyio.sleep(0.5)
                        victim = victims[n % len(victims)]
                        slot = SLOTS[(n + n // len(victims)) % len(SLOTS)]  # every victim hits every slot
                        t0 = time.monotonic()
                        if victim == "router":
                            os.kill(procs.router_pid(paths), signal.SIGKILL)
                            await anyio.sleep(0.2)
                            procs.spawn_router(fleet, paths)
                        elif victim == "sidecar":
                            os.kill(procs.sidecar_pid(paths, slot), signal.SIGKILL)
                        elif victim == "runtime":
                            pid = (await TmuxTransport(paths.tmux_socket).probe_all())[slot].pid
                            os.kill(pid, signal.SIGKILL)
                        elif victim == "tmux":
                            t = TmuxTransport(paths.tmux_socket)
                            os.kill(int(t.run_sync("display-message", "-p", "#{pid}").strip()), signal.SIGKILL)
                        await probe(slot, n)
                        recover_s[victim].append(time.monotonic() - t0)
                        print(f"  cycle {n + 1:3}: kill -9 {victim:8} -> {slot} delivering again after "
                              f"{time.monotonic() - t0:6.2f} s; {len(answered)} answered so far", flush=True)
                    stop.set()

        anyio.run(run, backend="asyncio")
        deadline = time.monotonic() + 180
        while True:
            j = Journal(paths.journal, readonly=True)
            counts = j.counts()
            open_n = sum(n for s, n in counts.items() if s in OPEN_STATES)
            if open_n == 0 or time.monotonic() > deadline:
                break
            j.close()
            time.sleep(0.5)
        all_msgs = j.messages(limit=10**7)
        unconfirmed_bodies = {m.body for m in all_msgs if m.state == "unconfirmed"}
        taken: dict[str, int] = {}
        for s in SLOTS:
            p = home / "rec" / f"{s}.jsonl"
            for line_ in p.read_text().splitlines() if p.exists() else []:
                body = json.loads(line_)["prompt"].split("] ", 1)[1]
                taken[body] = taken.get(body, 0) + 1
        ok = {k for k, r in answered.items() if r in ("queued", "accepted")}
        lost = [k for k in ok if sent[k] not in taken and sent[k] not in unconfirmed_bodies]
        dup = [b for b, n in taken.items() if n > 1]
        for m in all_msgs:  # how a duplicate came about, for the record
            if m.body in dup:
                print(f"  DUPLICATE {m.body!r}: " + "; ".join(f"{c['state']} {c['data']}" for c in j.changes_of(m.id)))
        j.close()
        print(f"\n  messages sent {len(sent)}, answered queued/accepted {len(ok)}, delivered {len(taken)}, "
              f"unconfirmed (reported) {len(unconfirmed_bodies)}, lost {len(lost)}, duplicated {len(dup)}")
        print(f"  journal: {dict(sorted(counts.items()))}")
        for v, xs in recover_s.items():
            if xs:
                p50, p99 = pct(xs)
                print(f"  time to recover after kill -9 {v:8} n={len(xs):<3} p50 {p50:6.2f} s  p99 {p99:6.2f} s  "
                      f"max {max(xs):6.2f} s")
        return 0 if not lost and not dup and open_n == 0 else 1
    except BaseException:
        failed = True
        print("router log tail:\n" + "\n".join(paths.router_log.read_text().splitlines()[-30:]))
        print(f"kept {home} for inspection")
        raise
    finally:
        try:
            report_leftovers(ops.down(fleet, paths))
        finally:
            shutil.rmtree(paths.run_dir, ignore_errors=True)
            if not failed:
                shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
