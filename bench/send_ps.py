"""Benchmark: send -> accepted latency (API and CLI) and `fleet ps` cost at 50 and 200 slots.

Measures, on a throwaway fleet in a fresh ``$FLEETBUS_HOME`` (own tmux socket, own state dir):

1. API send: client-side wall time of ``await Client.send(slot, body, verify=True)`` for a
   ``stub`` slot (runtime-ack) and a ``shell`` slot (pane-diff, body ``true``), sequential, after
   10 warm-up sends each; fleet started with ``ops.up`` (router + sidecars in the background).
2. CLI send: wall time of ``fleet --roster R send s0 -m ... --verify --json`` in a subprocess,
   against baselines ``python -c pass`` and ``fleet --help`` timed in the same process.
3. ps: N ``shell`` slots started by an in-process ``Router(spawn_sidecars=False)`` (no sidecars:
   they would be N Python processes); times ``router.handle_ps()`` and counts tmux client calls
   per call, then times ``fleet --roster R ps --json`` with no router (tmux + heartbeat files).

Prints p50 and p99 (``statistics.quantiles``, inclusive) in ms next to the targets.
Everything started is torn down in ``finally`` blocks (``ops.down`` kills the private tmux server).

Run: ``.venv/bin/python bench/send_ps.py [--quick]``
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio

import common  # bench/common.py (this folder is on sys.path)
from common import pct, teardown
from fleetbus import ops
from fleetbus.client import Client
from fleetbus.router.server import Router

PY = sys.executable
FLEET = str(Path(PY).parent / "fleet")
ROSTER = """\
version: 1
tenant: {tenant}
transport: {{kind: tmux, socket: {socket}}}
bus: {{heartbeat_ms: 1000, liveness: 3}}
agents:
{agents}
"""


def line(label: str, xs: list[float], target: float | None = None, extra: str = "") -> str:
    p50, p99 = pct(xs)
    tgt = f"  target p50 < {target:g} ms: {'PASS' if p50 < target else 'FAIL'}" if target else ""
    return f"  {label:42} n={len(xs):<4} p50 {p50:8.1f} ms  p99 {p99:8.1f} ms{tgt}{extra}"


def timed_run(argv: list[str], n: int, check: bool = True) -> tuple[list[float], list[subprocess.CompletedProcess]]:
    times, procs = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        p = subprocess.run(argv, capture_output=True, text=True)
        times.append((time.perf_counter() - t0) * 1000)
        if check and p.returncode != 0:
            raise RuntimeError(f"{argv[:5]} exited {p.returncode}: {p.stderr.strip()[-400:]}")
        procs.append(p)
    return times, procs


def write_roster(home: Path, tenant: str, agents: list[str]):
    return common.write_roster(home, tenant, ROSTER.format(tenant=tenant, socket=tenant,
                                                           agents="\n".join(f"  - {a}" for a in agents)))


def bench_send(home: Path, n_stub: int, n_shell: int, n_cli: int) -> list[str]:
    path, fleet, paths = write_roster(home, "bench", ["{name: s0, runtime: stub}",
                                                        "{name: s1, runtime: stub, command: [fleet-stub, --think-ms, '0']}",
                                                        "{name: sh0, runtime: shell}"])
    out = []
    try:
        t0 = time.perf_counter()
        rows = ops.up(fleet, paths, timeout_s=30).rows
        out.append(f"fleet up (router + 3 sidecars): {time.perf_counter() - t0:.2f} s; "
                   + ", ".join(f"{r.slot}={r.pane}/{r.heartbeat}" for r in rows))

        async def run_health(n: int):
            wall = []
            async with Client(fleet, paths) as c:
                for _ in range(n):
                    t = time.perf_counter()
                    await c.health()
                    wall.append((time.perf_counter() - t) * 1000)
            return wall

        async def run_api(slot: str, body: str, n: int, pause: float):
            wall, router_ms, results = [], [], {}
            async with Client(fleet, paths) as c:
                for _ in range(10):
                    await anyio.sleep(pause)
                    await c.send(slot, body, verify=True, timeout_s=10)
                for i in range(n):
                    await anyio.sleep(pause)  # untimed
                    t = time.perf_counter()
                    r = await c.send(slot, body.format(i=i), verify=True, timeout_s=10)
                    wall.append((time.perf_counter() - t) * 1000)
                    router_ms.append(r.latency_ms)
                    key = f"{r.result}/{r.evidence or r.code or '-'}"
                    results[key] = results.get(key, 0) + 1
            return wall, router_ms, results

        out.append("1. API send -> accepted (client wall time around `await c.send(...)`, sequential):\n"
                   "   s1 is a stub whose turns take 0 ms (back-to-back sends); s0 is a default stub (100 ms\n"
                   "   turns), paced 0.15 s untimed between sends so each finds it idle. Baseline: a HEALTH\n"
                   "   request round trip to the same router (bus only, no tmux, no agent).")
        health = anyio.run(run_health, max(n_stub, 100), backend="asyncio")
        out.append(line("baseline HEALTH round trip", health))
        for label, slot, body, n, want, pause in (
                ("s1 stub back-to-back", "s1", "bench message {i}", n_stub, "runtime-ack", 0.0),
                ("s0 stub paced", "s0", "bench message {i}", n_stub, "runtime-ack", 0.15),
                ("sh0 shell `true` back-to-back", "sh0", "true", n_shell, "pane-diff", 0.0)):
            wall, router_ms, results = anyio.run(run_api, slot, body, n, pause, backend="asyncio")
            ok = results.get(f"accepted/{want}", 0)
            out.append(line(f"{label} ({want})", wall, 10 if ok == n else None,
                            f"  accepted {ok}/{n}" + ("" if ok == n else f"  (target not judged) outcomes {results}")))
            out.append(line("  router-side r.latency_ms", router_ms))
            out.append(f"  ratio p50 send/HEALTH = {pct(wall)[0] / pct(health)[0]:.1f}x")

        out.append("2. CLI send -> accepted (subprocess wall time; `fleet send s0 --verify --json`):")
        base_py, _ = timed_run([PY, "-c", "pass"], n_cli)
        base_help, _ = timed_run([FLEET, "--help"], n_cli)
        cli, procs = timed_run([FLEET, "--roster", str(path), "send", "s0", "-m", "cli bench", "--verify", "--json"],
                               n_cli, check=False)
        ok = sum(p.returncode == 0 and json.loads(p.stdout).get("result") == "accepted" for p in procs)
        out.append(line("baseline `python -c pass`", base_py))
        out.append(line("baseline `fleet --help`", base_help))
        out.append(line("fleet send --verify --json", cli, 300, f"  accepted {ok}/{n_cli}"))
        c50 = pct(cli)[0]
        out.append(f"  ratio p50: send/python -c pass = {c50 / pct(base_py)[0]:.1f}x, "
                   f"send/fleet --help = {c50 / pct(base_help)[0]:.1f}x")
    finally:
        teardown(fleet, paths)
    return out


def bench_ps(home: Path, n_slots: int, n_inproc: int, n_cli: int) -> tuple[list[str], int]:
    tenant = f"ps{n_slots}"
    path, fleet, paths = write_roster(home, tenant, [f"{{name: sh{i}, runtime: shell}}" for i in range(n_slots)])
    out = []
    try:
        async def run_inproc():
            router = Router(fleet, paths, spawn_sidecars=False)
            try:
                t0 = time.perf_counter()
                await router.transport.ensure_server()
                await router.start_fleet()
                started = time.perf_counter() - t0
                before = router.transport.calls
                rows = await router.handle_ps()
                per_call = router.transport.calls - before
                times = []
                for _ in range(n_inproc):
                    t = time.perf_counter()
                    await router.handle_ps()
                    times.append((time.perf_counter() - t) * 1000)
                return started, rows, per_call, times
            finally:
                await router.transport.aclose()  # its tmux control client belongs to this event loop

        started, rows, per_call, times = anyio.run(run_inproc, backend="asyncio")
        alive = sum(r["pane"] == "alive" for r in rows)
        out.append(f"  N={n_slots}: started {n_slots} shell slots in {started:.2f} s ({alive} alive), no sidecars")
        tgt = 500 if n_slots == 200 else None
        out.append(line("in-process router.handle_ps()", times, tgt, f"  tmux calls/ps = {per_call}"))
        cli, procs = timed_run([FLEET, "--roster", str(path), "ps", "--json"], n_cli)
        n_rows = len(json.loads(procs[-1].stdout))
        out.append(line("CLI `fleet ps --json` (no router)", cli, tgt, f"  rows = {n_rows}"))
    finally:
        teardown(fleet, paths)
    return out, per_call


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small N for a smoke run")
    args = ap.parse_args()
    q = args.quick
    n_stub, n_shell, n_cli, n_ps_in, n_ps_cli = (20, 10, 5, 5, 3) if q else (200, 100, 30, 20, 10)
    for sig in (signal.SIGTERM, signal.SIGINT):  # exit through the finally blocks (asyncio's own
        signal.signal(sig, lambda n, _: sys.exit(128 + n))  # SIGINT handling may swallow a Ctrl-C)

    tmux_v = subprocess.run(["tmux", "-V"], capture_output=True, text=True).stdout.strip()
    print(f"command: .venv/bin/python bench/send_ps.py{' --quick' if q else ''}")
    print(f"date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M:%S %z}  nproc: {len(os.sched_getaffinity(0))}"
          f"  {tmux_v}  python {sys.version.split()[0]}")
    home = Path(tempfile.mkdtemp(prefix="fleetbus-bench-"))
    os.environ["FLEETBUS_HOME"] = str(home)  # private state + tmux socket; inherited by every child
    print(f"FLEETBUS_HOME={home}")
    try:
        for s in bench_send(home, n_stub, n_shell, n_cli):
            print(s, flush=True)
        print("3. ps cost (slots started by an in-process Router(spawn_sidecars=False): sidecars would be\n"
              "   one Python process per slot; ps then reports NO-SIDECAR for every slot):")
        calls = []
        for n in (50, 200):
            lines, per_call = bench_ps(home, n, n_ps_in, n_ps_cli)
            calls.append(per_call)
            for s in lines:
                print(s, flush=True)
        print(f"  tmux calls per ps: {calls[0]} at 50 slots, {calls[1]} at 200 slots -> "
              f"{'constant' if calls[0] == calls[1] else 'NOT constant'}")
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
