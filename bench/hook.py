"""Benchmark: wall time of ``fleet hook prompt-submit`` (the command a runtime's hook runs on
every prompt), as a subprocess, sending to a live datagram socket.

A socket is bound in a fresh private (0700) directory and drained by this process; each run pipes
a Claude-Code-shaped JSON payload carrying a fleet marker into
``<python> -m fleetbus hook prompt-submit`` with ``$FLEETBUS_HOOK_SOCKET`` set, and times the
whole subprocess. ``--python PY[@SRC]`` picks the interpreter and, with ``@SRC``, a source tree put
first on ``PYTHONPATH`` (e.g. another checkout, for an A/B run on the same machine at the same
time: runs alternate between them). Bytecode caching follows the environment
(``PYTHONDONTWRITEBYTECODE``).

Prints p50 and p99 (``statistics.quantiles``, inclusive) and the mean in ms per interpreter.

Run: ``.venv/bin/python bench/hook.py [--runs 20] [--python PY[@SRC] ...]``
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import pct  # bench/common.py (this folder is on sys.path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--python", action="append", default=None,
                    help="PY[@SRC]: interpreter(s) to time, optionally with a source tree first on PYTHONPATH "
                         "(default: this interpreter)")
    args = ap.parse_args()
    pythons = args.python or [sys.executable]
    with tempfile.TemporaryDirectory(prefix="fbh-", dir="/tmp") as d:
        os.chmod(d, 0o700)
        path = Path(d) / "s.sock"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.setblocking(False)
        payload = json.dumps({"prompt": "[fleet#0123456789ab bench -> s0] hello", "session_id": "bench"})
        env = {**os.environ, "FLEETBUS_HOOK_SOCKET": str(path), "FLEETBUS_SLOT": "s0", "FLEETBUS_RUNTIME": "claude"}
        times: dict[str, list[float]] = {py: [] for py in pythons}
        got = 0
        for i in range(args.runs + 2):
            for py in pythons:
                t0 = time.perf_counter()
                exe, _, src = py.partition("@")
                run_env = {**env, "PYTHONPATH": src} if src else env
                subprocess.run([exe, "-m", "fleetbus", "hook", "prompt-submit"], input=payload, env=run_env,
                               text=True, check=True, capture_output=True)
                dt = (time.perf_counter() - t0) * 1000
                if i >= 2:  # two warm-up runs each
                    times[py].append(dt)
                while True:
                    try:
                        sock.recv(65536)
                        got += 1
                    except BlockingIOError:
                        break
        sock.close()
    print(f"fleet hook prompt-submit, {args.runs} runs each (subprocess wall time), {got} datagrams received")
    for py, xs in times.items():
        p50, p99 = pct(xs)
        print(f"  {py}: p50 {p50:.1f} ms  p99 {p99:.1f} ms  mean {statistics.fmean(xs):.1f} ms")


if __name__ == "__main__":
    main()
