"""Benchmark: what ``fleet doctor`` costs on a running fleet, against ``fleet ps`` as baseline.

On a throwaway fleet in a fresh ``$FLEETBUS_HOME`` (own tmux socket, own state dir; ``N`` stub
slots with sidecars, started by ``ops.up``), times whole commands in subprocesses, interleaved:
``fleet --roster R ps --json`` (baseline) and ``fleet --roster R doctor --json`` (which also
starts and kills a throwaway tmux server for its exact-target and restart-isolation checks).
Also times ``fleet install-systemd --dry-run --json`` (render only). Prints p50 and p99 in ms
and doctor/ps as a ratio. Everything is torn down in ``finally`` (the fleet's own tmux only).

Run: ``.venv/bin/python bench/doctor.py [--slots N] [--runs K]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common  # bench/common.py (this folder is on sys.path)
from common import pct, teardown
from fleetbus import ops


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="fb-bench-doc-", dir="/tmp"))
    os.environ["FLEETBUS_HOME"] = str(home)
    os.environ["TMUX_TMPDIR"] = str(home)
    os.environ["XDG_CONFIG_HOME"] = str(home / "config")  # never the real user unit dir
    agents = "\n".join(f"  - {{name: s{i}, runtime: stub}}" for i in range(args.slots))
    roster, fleet, paths = common.write_roster(home, "doc", f"version: 1\ntenant: doc\nagents:\n{agents}\n")
    base = [sys.executable, "-m", "fleetbus", "--roster", str(roster)]
    times: dict[str, list[float]] = {"ps": [], "doctor": [], "install-systemd --dry-run": []}
    try:
        ops.up(fleet, paths, timeout_s=60)
        for _ in range(args.runs):
            for name, cmd in (("ps", ["ps", "--json"]), ("doctor", ["doctor", "--json"]),
                              ("install-systemd --dry-run", ["install-systemd", "--dry-run", "--json"])):
                t0 = time.perf_counter()
                p = subprocess.run([*base, *cmd], capture_output=True, text=True, timeout=120)
                times[name].append((time.perf_counter() - t0) * 1000)
                if name == "doctor":
                    out = json.loads(p.stdout)
                    assert p.returncode == 0 and out["ok"], p.stdout
    finally:
        teardown(fleet, paths)
        shutil.rmtree(home, ignore_errors=True)
    print(f"fleet doctor vs fleet ps, {args.slots} stub slots, {args.runs} runs each (subprocess wall time, ms)")
    base50 = pct(times["ps"])[0]
    for name, xs in times.items():
        p50, p99 = pct(xs)
        print(f"  {name:<28} p50 {p50:7.1f}  p99 {p99:7.1f}  ({p50 / base50:.2f}x ps)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
