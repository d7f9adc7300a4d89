"""Helpers shared by the bench scripts (run as ``python bench/<name>.py``, so this folder is on
``sys.path``): percentiles, a throwaway roster, and teardown."""

from __future__ import annotations

import shutil
import statistics
import sys
from pathlib import Path

from fleetbus import ops
from fleetbus.config import load_roster
from fleetbus.paths import fleet_paths


def pct(xs: list[float]) -> tuple[float, float]:
    """(p50, p99) of ``xs`` (``statistics.quantiles``, inclusive); NaNs for no samples."""
    if not xs:
        return float("nan"), float("nan")
    if len(xs) < 2:
        return xs[0], xs[0]
    return statistics.median(xs), statistics.quantiles(xs, n=100, method="inclusive")[98]


def write_roster(home: Path, tenant: str, text: str):
    """Write roster ``text`` to ``home/<tenant>.yaml`` and load it. Returns ``(path, fleet, paths)``
    (paths created; call with ``$FLEETBUS_HOME`` already pointing at ``home``)."""
    path = home / f"{tenant}.yaml"
    path.write_text(text)
    fleet = load_roster(path)
    paths = fleet_paths(fleet.tenant, fleet.roster.transport.socket)
    paths.ensure()
    return path, fleet, paths


def teardown(fleet, paths) -> None:
    """``fleet down`` (the fleet's own tmux server only), then remove its runtime dir. Says on
    stderr which processes of the fleet ``down`` had to end (they outlived the teardown)."""
    try:
        report_leftovers(ops.down(fleet, paths))
    finally:
        shutil.rmtree(paths.run_dir, ignore_errors=True)


def report_leftovers(summary: dict) -> None:
    """Print ``ops.down``'s ``leftovers`` (processes it ended by pid) on stderr, if any."""
    for p in summary.get("leftovers", []):
        print(f"fleet down ended pid {p['pid']} ({p['role']}, {p['signal']}): {p['cmdline'][:100]}", file=sys.stderr)
