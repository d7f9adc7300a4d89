"""Benchmark: task routing (publish -> accepted -> done) against plain sends, and dispatch throughput.

Runs on throwaway fleets of ``stub`` agents (fresh ``$FLEETBUS_HOME`` under /tmp, own tmux socket
via ``TMUX_TMPDIR`` inside it, router and sidecars started by ``ops.up``; bus heartbeat 200 ms):

1. Latency, one reviewer ``r0`` (``fleet-stub --think-ms 0``), sequential, after warm-up. Each
   round publishes one task to ``idle:reviewer`` with ``await fleet.publish(..., wait="done")``
   and sends one plain message with ``await fleet.send("r0", ..., verify=True)`` (interleaved, so
   both see the same machine load; 50 ms untimed pause between operations so every one finds the
   stub idle). Reports, p50/p99 in ms:

   - ``TaskResult.accepted_ms`` / ``done_ms``: router-side, from the task's journaled times
     (``created`` -> ``accepted_at`` / ``finished_at``);
   - client wall time of ``await fleet.publish(..., wait="done")``;
   - baseline: ``SendResult.latency_ms`` (router-side, SEND received -> accepted) and the client
     wall time of ``await fleet.send(..., verify=True)``;
   - the ratios task publish->accepted / send accepted (router-side and wall).

2. Dispatch throughput: N tasks published at once (concurrent ``publish(wait="published")`` on one
   connection) to ``idle:reviewer`` with K reviewers (``--think-ms`` each), then every task
   followed to its end with ``fleet.task(id, wait="done")``. Reports tasks/s from the first
   publish to the last ``done`` (client wall and router-side journal times), the spread over the
   reviewers, whether any reviewer held two tasks at once, and the per-slot turnaround gap (one
   task's ``finished_at`` to the same slot's next ``assigned_at``). Any task not ``done`` is
   printed and makes the bench exit 1.

Everything started is torn down in ``finally`` blocks (``ops.down`` kills only the fleet's own
tmux server); the default tmux server is never touched and no process is killed by name.

Run: ``.venv/bin/python bench/tasks.py [--quick]`` (quick: under a minute; default: a few minutes
on 2 cores).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import anyio

import common  # bench/common.py (this folder is on sys.path)
from common import pct, teardown
from fleetbus import ops
from fleetbus import protocol as P
from fleetbus.client import Fleet

ROSTER = """\
version: 1
tenant: {tenant}
transport: {{kind: tmux, socket: {tenant}}}
bus: {{heartbeat_ms: 200, liveness: 3, verify_timeout_s: 10}}
agents:
{agents}
"""
PAUSE_S = 0.05  # untimed pause between sequential operations (the stub reports idle first)


def reviewer(name: str, think_ms: int) -> str:
    return f'{{name: {name}, runtime: stub, class: reviewer, command: [fleet-stub, --think-ms, "{think_ms}"]}}'


def line(label: str, xs: list[float], extra: str = "") -> str:
    if not xs:
        return f"  {label:50} n=0"
    p50, p99 = pct(xs)
    return f"  {label:50} n={len(xs):<4} p50 {p50:8.1f} ms  p99 {p99:8.1f} ms{extra}"


def write_roster(home: Path, tenant: str, agents: list[str]):
    _, fleet, paths = common.write_roster(home, tenant, ROSTER.format(tenant=tenant,
                                                                      agents="\n".join(f"  - {a}" for a in agents)))
    return fleet, paths


def start(fleet, paths) -> str:
    t0 = time.perf_counter()
    rows = ops.up(fleet, paths, timeout_s=30).rows
    bad = [r for r in rows if r.pane != "alive" or r.heartbeat != "healthy"]
    if bad:
        raise RuntimeError("fleet did not come up: " + ", ".join(f"{r.slot}={r.pane}/{r.heartbeat}" for r in bad))
    return (f"fleet up ({len(rows)} stub slot(s) + router + sidecars): {time.perf_counter() - t0:.2f} s; "
            + ", ".join(f"{r.slot}={r.pane}/{r.heartbeat}/{r.state}" for r in rows))


# -- 1. latency -----------------------------------------------------------------------------------


def bench_latency(home: Path, n: int, warmup: int, think_ms: int) -> tuple[list[str], int]:
    fleet, paths = write_roster(home, "tl", [reviewer("r0", think_ms)])
    out = [f"1. latency: 1 reviewer r0 (--think-ms {think_ms}), sequential, {warmup} warm-up rounds, then {n} rounds"
           f" of [task to idle:reviewer wait=done, send r0 verify] ({PAUSE_S * 1000:g} ms untimed pause between)"]
    try:
        out.append("  " + start(fleet, paths))

        async def main():
            acc, done, wall_t, send_r, wall_s = [], [], [], [], []
            bad_t, bad_s = [], []
            async with Fleet.connect(fleet) as f:
                for i in range(warmup + n):
                    await anyio.sleep(PAUSE_S)
                    t = time.perf_counter()
                    task = await f.publish("idle:reviewer", f"bench task {i}", wait="done", timeout_s=30)
                    wt = (time.perf_counter() - t) * 1000
                    await anyio.sleep(PAUSE_S)
                    t = time.perf_counter()
                    r = await f.send("r0", f"bench send {i}", verify=True, timeout_s=10)
                    ws = (time.perf_counter() - t) * 1000
                    if i < warmup:
                        continue
                    if task.state == "done" and task.slot == "r0":
                        acc.append(task.accepted_ms)
                        done.append(task.done_ms)
                        wall_t.append(wt)
                    else:
                        bad_t.append(f"{task.id} {task.state} {task.code} {task.detail[:120]}")
                    if r.result == "accepted":
                        send_r.append(r.latency_ms)
                        wall_s.append(ws)
                    else:
                        bad_s.append(f"{r.id} {r.result} {r.code} {r.detail[:120]}")
            return acc, done, wall_t, send_r, wall_s, bad_t, bad_s

        acc, done, wall_t, send_r, wall_s, bad_t, bad_s = anyio.run(main, backend="asyncio")
        out.append(f"  tasks done {len(done)}/{n}; sends accepted {len(send_r)}/{n}")
        out.extend(f"  NOT DONE task {b}" for b in bad_t)
        out.extend(f"  NOT ACCEPTED send {b}" for b in bad_s)
        out.append(line("task publish->accepted (TaskResult.accepted_ms)", acc))
        out.append(line("task publish->done (TaskResult.done_ms)", done))
        out.append(line("task client wall `publish(wait=\"done\")`", wall_t))
        out.append(line("baseline send accepted (SendResult.latency_ms)", send_r))
        out.append(line("baseline client wall `send(verify=True)`", wall_s))
        if acc and send_r:
            out.append(f"  task publish->accepted / send accepted = {pct(acc)[0] / pct(send_r)[0]:.2f}x (p50, router-side), "
                       f"{pct(acc)[1] / pct(send_r)[1]:.2f}x (p99)")
            out.append(f"  task wall (wait=done) / send wall (verify) = {pct(wall_t)[0] / pct(wall_s)[0]:.2f}x (p50), "
                       f"{pct(wall_t)[1] / pct(wall_s)[1]:.2f}x (p99)")
            out.append(f"  task accepted->done (p50 done_ms - p50 accepted_ms) ~ {pct(done)[0] - pct(acc)[0]:.1f} ms "
                       f"(stub think {think_ms} ms + turn-end hook -> sidecar -> router)")
        return out, len(bad_t) + len(bad_s)
    finally:
        teardown(fleet, paths)


# -- 2. throughput --------------------------------------------------------------------------------


def bench_throughput(home: Path, n: int, k: int, think_ms: int) -> tuple[list[str], int]:
    names = [f"r{i}" for i in range(k)]
    fleet, paths = write_roster(home, "tt", [reviewer(x, think_ms) for x in names])
    out = [f"2. throughput: {n} tasks published at once to idle:reviewer, {k} reviewers (--think-ms {think_ms}); "
           f"ideal {k * 1000 / think_ms if think_ms else float('inf'):.0f} tasks/s at zero overhead"]
    try:
        out.append("  " + start(fleet, paths))

        async def main():
            async with Fleet.connect(fleet) as f:
                # warm-up: one task per reviewer, not counted
                await f.publish("all:reviewer", "warm-up", wait="done", timeout_s=30)
                published: list[P.TaskResult | None] = [None] * n
                t0 = time.perf_counter()

                async def pub(i: int):
                    published[i] = await f.publish("idle:reviewer", f"burst task {i}", wait="published")

                async with anyio.create_task_group() as tg:
                    for i in range(n):
                        tg.start_soon(pub, i)
                t_pub = time.perf_counter() - t0
                final: list[P.TaskResult | None] = [None] * n

                async def follow(i: int):
                    final[i] = await f.task(published[i].id, wait="done", timeout_s=300)

                async with anyio.create_task_group() as tg:
                    for i in range(n):
                        tg.start_soon(follow, i)
                return published, final, t_pub, time.perf_counter() - t0

        published, final, t_pub, wall = anyio.run(main, backend="asyncio")
        dup = sum(p.duplicate for p in published)
        not_done = [t for t in final if t.state != "done"]
        done = [t for t in final if t.state == "done"]
        out.append(f"  published {n} in {t_pub * 1000:.0f} ms (client wall, concurrent; {dup} duplicate answer(s) "
                   f"from resends)")
        out.append(f"  done {len(done)}/{n}; not done: {len(not_done)}")
        for t in not_done[:20]:
            out.append(f"    NOT DONE {t.id} {t.state} slot={t.slot} code={t.code} {t.detail[:120]}")
        out.append(f"  throughput, client wall first publish -> last done: {n / wall:7.1f} tasks/s ({wall:.2f} s)")
        if done:
            span = max(t.finished_at for t in done) - min(t.created for t in final)
            out.append(f"  throughput, router times first created -> last finished_at: {len(done) / span:7.1f} tasks/s "
                       f"({span:.2f} s)")
            per_slot = Counter(t.slot for t in done)
            out.append("  spread: " + ", ".join(f"{s}={per_slot.get(s, 0)}" for s in names))
            spans, overlaps, gaps = defaultdict(list), 0, []
            for t in done:
                spans[t.slot].append((t.assigned_at, t.finished_at))
            for s in spans.values():
                s.sort()
                for (_a0, f0), (a1, _f1) in zip(s, s[1:]):
                    overlaps += a1 < f0
                    gaps.append((a1 - f0) * 1000)
            out.append(f"  reviewer holding two tasks at once: {overlaps} time(s)")
            out.append(line("slot turnaround (finished_at -> next assigned_at)", gaps))
            out.append(line("publish->accepted (accepted_ms, includes queueing)", [t.accepted_ms for t in done]))
            out.append(line("assigned->done per task (router times)",
                            [(t.finished_at - t.assigned_at) * 1000 for t in done]))
        return out, len(not_done)
    finally:
        teardown(fleet, paths)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small counts for a smoke run (under a minute)")
    ap.add_argument("--rounds", type=int, help="latency rounds (default 200, quick 30)")
    ap.add_argument("--tasks", type=int, help="throughput tasks (default 200, quick 40)")
    ap.add_argument("--reviewers", type=int, default=4, help="throughput reviewers (default 4)")
    ap.add_argument("--think-ms", type=int, default=20, help="throughput stub turn time in ms (default 20)")
    args = ap.parse_args()
    q = args.quick
    rounds = args.rounds or (30 if q else 200)
    warmup = 5 if q else 10
    n_tasks = args.tasks or (40 if q else 200)
    for sig in (signal.SIGTERM, signal.SIGINT):  # exit through the finally blocks
        signal.signal(sig, lambda n, _: sys.exit(128 + n))

    exe = sys.executable
    if exe.startswith(os.getcwd() + os.sep):
        exe = os.path.relpath(exe)
    print(f"command: {shlex.join([exe, *sys.argv])}")
    tmux_v = subprocess.run(["tmux", "-V"], capture_output=True, text=True).stdout.strip()
    print(f"date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M:%S %z}  nproc: {len(os.sched_getaffinity(0))}"
          f"  loadavg: {' '.join(f'{x:.2f}' for x in os.getloadavg())}  {tmux_v}  python {sys.version.split()[0]}")
    home = Path(tempfile.mkdtemp(prefix="fb-bench-", dir="/tmp"))  # short: socket paths <= 107 bytes
    os.environ["FLEETBUS_HOME"] = str(home)  # private state + sockets; inherited by every child
    os.environ["TMUX_TMPDIR"] = str(home)  # the fleets' tmux servers live in here, never the default one
    os.environ.pop("TMUX", None)
    print(f"FLEETBUS_HOME={home}", flush=True)
    failures = 0
    t_start = time.perf_counter()
    try:
        lines, bad = bench_latency(home, rounds, warmup, think_ms=0)
        failures += bad
        print("\n".join(lines), flush=True)
        lines, bad = bench_throughput(home, n_tasks, args.reviewers, args.think_ms)
        failures += bad
        print("\n".join(lines), flush=True)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    print(f"total {time.perf_counter() - t_start:.1f} s; {'OK' if not failures else f'{failures} FAILURE(S)'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
