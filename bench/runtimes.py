"""Benchmark: send -> accepted per agent runtime, runtime-ack path vs pane-diff path.

For every pinned agent CLI that is installed (``scripts/install-runtimes``), on a throwaway fleet
(own ``$FLEETBUS_HOME``, own tmux socket) with the mock model server of the test suite:

1. runtime-ack: N sequential ``Client.send(verify=True)`` with the slot's sidecar connected; the
   result must be ``accepted`` with evidence ``runtime-ack``. Between sends the bench waits until
   the hook state is ``idle`` and the adapter's busy indicator is gone (not timed).
2. pane-diff: the slot's sidecar is stopped (by PID) so the router falls back to the pane diff;
   N more sends, each after the previous prompt reached the mock model and the screen is quiet
   (at the prompt, no busy indicator), plus 1 s.

Latency is client wall time, from the call to the result (p50 and p99, ``statistics.quantiles``
inclusive), plus the acceptance rate. The user config of each runtime lives in a temporary HOME
seeded by ``tests/rt_<runtime>.py``.

Run: ``.venv/bin/python bench/runtimes.py [--sends N] [--only claude,codex]``
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from mockmodel import MockModel  # noqa: E402
from runtime_cases import RuntimeCase, cases  # noqa: E402

from common import pct, report_leftovers  # noqa: E402 (bench/common.py; this folder is on sys.path)
from fleetbus import ops  # noqa: E402
from fleetbus.adapters import get_adapter  # noqa: E402
from fleetbus.client import Client  # noqa: E402
from fleetbus.config import load_roster  # noqa: E402
from fleetbus.paths import fleet_paths  # noqa: E402
from fleetbus.router import procs, verify  # noqa: E402
from fleetbus.transports.tmux import TmuxTransport  # noqa: E402

SLOT = "ag"


def wait(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


def run_case(case: RuntimeCase, n: int) -> dict:
    base = Path(tempfile.mkdtemp(prefix="fb-bench-rt-", dir="/tmp"))
    old_env = {k: os.environ.get(k) for k in ("FLEETBUS_HOME", "TMUX_TMPDIR")}
    (base / "tmux").mkdir()
    os.environ["FLEETBUS_HOME"] = str(base / "fb")
    os.environ["TMUX_TMPDIR"] = str(base / "tmux")
    home, proj = base / "home", base / "proj"
    home.mkdir()
    proj.mkdir()
    adapter = get_adapter(case.runtime)
    fleet = paths = None
    try:
        with MockModel(slow_s=8) as model:
            env, _ = case.prepare(home, proj, model.url)
            (base / "fb").mkdir()
            roster = base / "fb" / "fleet.yaml"
            roster.write_text(
                f"version: 1\ntenant: bench-{case.runtime}\ntransport: {{kind: tmux, socket: bench}}\n"
                "bus: {heartbeat_ms: 300, liveness: 3, verify_timeout_s: 30}\n"
                f"agents:\n  - {{name: {SLOT}, runtime: {case.runtime}, workdir: '{proj}', env: {json.dumps(env)}}}\n")
            fleet = load_roster(roster)
            paths = fleet_paths(fleet.tenant, fleet.roster.transport.socket)
            ops.up(fleet, paths, timeout_s=60)
            tmux = TmuxTransport(paths.tmux_socket)

            def screen():
                return anyio.run(lambda: tmux.screen(SLOT), backend="asyncio")

            def at_rest() -> bool:
                s = screen()
                return verify.typed_text(adapter, s) == "" and not verify.is_busy(adapter, s)

            def state() -> str:
                return {r.slot: r for r in ops.ps(fleet, paths)}[SLOT].state

            async def send_many(evidence: str, paced) -> tuple[list[float], int]:
                lat, ok = [], 0
                other: dict[tuple, int] = {}
                async with Client(fleet, paths) as c:
                    for i in range(n + 3):
                        t0 = time.perf_counter()
                        r = await c.send(SLOT, f"bench {evidence} {i}", verify=True, timeout_s=30)
                        ms = (time.perf_counter() - t0) * 1000
                        good = (r.result, r.evidence) == ("accepted", evidence)
                        if i >= 3:  # three warm-up sends
                            lat.append(ms)
                            ok += good
                            if not good:
                                key = (r.result, r.evidence or r.code, r.detail[:60])
                                other[key] = other.get(key, 0) + 1
                        await anyio.to_thread.run_sync(paced, r.id)
                if other:
                    print(f"  {case.runtime} {evidence}: not accepted by {evidence}: {other}", flush=True)
                return lat, ok

            # Codex and opencode start their session lazily: no hook state before the first prompt
            wait(lambda: at_rest() and state() in ("idle", "unknown"), 120, f"{case.runtime} ready")
            ack_lat, ack_ok = anyio.run(send_many, "runtime-ack",
                                        lambda _: wait(lambda: state() == "idle" and at_rest(), 60, "idle"),
                                        backend="asyncio")

            def pane_paced(msg_id: str | None) -> None:
                # no hook state now: wait for the prompt at the model and a quiet screen, then 1 s
                # more, since a short turn never shows its busy indicator (Codex takes a message
                # typed before its turn closes as a steer, answered ``queued``)
                wait(lambda: any(f"fleet#{msg_id}" in p for p in model.prompts), 60, "prompt at the model")
                wait(at_rest, 60, "at rest")
                time.sleep(1.0)

            procs.stop_sidecar(paths, SLOT)
            wait(lambda: {r.slot: r for r in ops.ps(fleet, paths)}[SLOT].heartbeat != "healthy", 10, "sidecar gone")
            pane_lat, pane_ok = anyio.run(send_many, "pane-diff", pane_paced, backend="asyncio")
    finally:
        if fleet is not None and paths is not None:
            report_leftovers(ops.down(fleet, paths))
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(base, ignore_errors=True)
    return {"runtime": case.runtime, "n": n, "ack": (pct(ack_lat), ack_ok), "pane": (pct(pane_lat), pane_ok)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sends", type=int, default=100, help="timed sends per path and runtime (default 100)")
    ap.add_argument("--only", default="", help="comma-separated runtimes (default: all installed)")
    args = ap.parse_args()
    only = {x for x in args.only.split(",") if x}
    print(f"# bench/runtimes.py  {datetime.datetime.now():%Y-%m-%d %H:%M}  {os.cpu_count()} cores, "
          f"{args.sends} sends per path")
    print(f"{'runtime':10} {'runtime-ack p50 / p99 (ms)':>28} {'accepted':>10}   {'pane-diff p50 / p99 (ms)':>26} "
          f"{'accepted':>10}")
    for case in cases():
        if only and case.runtime not in only:
            continue
        if not case.installed():
            print(f"{case.runtime:10} not installed (scripts/install-runtimes)")
            continue
        try:
            r = run_case(case, args.sends)
        except Exception as e:  # one runtime failing must not hide the others' figures
            print(f"{case.runtime:10} FAILED: {type(e).__name__}: {e}")
            continue
        (a50, a99), aok = r["ack"]
        (p50, p99), pok = r["pane"]
        print(f"{case.runtime:10} {a50:12.1f} / {a99:8.1f}   {aok:>5}/{args.sends:<4}   {p50:11.1f} / {p99:8.1f}   "
              f"{pok:>5}/{args.sends:<4}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
