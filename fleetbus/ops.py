"""Operator verbs that combine the client, the router process and the transport.

``up``, ``down`` and ``ps`` work whether or not the router is running: ``ps`` asks the router
when it answers and otherwise reads the transport and the heartbeat files itself.
"""

from __future__ import annotations

import time

import anyio

from fleetbus.client import RouterUnavailable, SyncClient
from fleetbus.config import FleetConfig
from fleetbus.paths import FleetPaths
from fleetbus.protocol import SlotStatus
from fleetbus.router import procs
from fleetbus.router.server import make_transport
from fleetbus.router.status import beats_from_files, collect_status


class OpsError(RuntimeError):
    """An operator verb could not finish (the message says what to look at)."""


def _log_tail(path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def ps(fleet: FleetConfig, paths: FleetPaths) -> list[SlotStatus]:
    """Status of every slot: from the router, or from tmux + heartbeat files when it is down."""
    if procs.router_pid(paths) is not None:
        try:
            return SyncClient(fleet, paths, connect_timeout_s=3.0).ps()
        except RouterUnavailable:
            pass
    transport = make_transport(fleet, paths)
    panes = anyio.run(transport.probe_all, backend="asyncio")
    return collect_status(fleet, panes, beats_from_files(fleet, paths), source="files",
                          supervision=_supervision_from_journal(fleet, paths))


def _supervision_from_journal(fleet: FleetConfig, paths: FleetPaths) -> dict | None:
    """Restart counts, last exits and CRASH-LOOP from the journal (read-only), or None without one."""
    from fleetbus.router.journal import Journal, JournalError
    from fleetbus.router.supervisor import status_from_journal

    try:
        journal = Journal(paths.journal, readonly=True)
    except JournalError:
        return None
    try:
        return status_from_journal(fleet, journal)
    finally:
        journal.close()


def up(fleet: FleetConfig, paths: FleetPaths, timeout_s: float = 20.0) -> tuple[bool, list[SlotStatus]]:
    """Start the router in the background if it is not running; wait for the slots' sidecars.

    Returns ``(router_started, rows)``. Waits up to ``timeout_s`` s for every live slot's
    sidecar to be healthy; slots that are dead or have no sidecar by then show in the rows.

    Raises:
        OpsError: the router did not come up (the message holds the end of its log).
    """
    started = False
    if procs.router_pid(paths) is None:
        procs.spawn_router(fleet, paths)
        started = True
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if procs.router_pid(paths) is not None:
                SyncClient(fleet, paths, connect_timeout_s=1.0).health()
                break
        except RouterUnavailable:
            pass
        if time.monotonic() > deadline:
            raise OpsError(f"the router did not start within {timeout_s:g} s; end of {paths.router_log}:\n"
                           + _log_tail(paths.router_log))
        time.sleep(0.05)
    while True:
        rows = ps(fleet, paths)
        waiting = [r for r in rows if r.pane == "alive" and r.heartbeat != "healthy"]
        if not waiting or time.monotonic() > deadline:
            return started, rows
        time.sleep(0.1)


def down(fleet: FleetConfig, paths: FleetPaths, timeout_s: float = 15.0) -> dict:
    """Stop everything of this tenant: sidecars, slots, the fleet's tmux server, the router.

    Only this fleet's own tmux socket is killed. Returns ``{"via": "router"|"local", ...}``.
    """
    pid = procs.router_pid(paths)
    if pid is not None:
        try:
            SyncClient(fleet, paths, connect_timeout_s=3.0).shutdown(teardown=True)
            if procs.wait_gone(pid, timeout_s):
                return {"via": "router", "router_pid": pid}
        except RouterUnavailable:
            pass
        procs.stop_pid(pid)
    procs.stop_sidecars(paths, list(fleet.slots))
    anyio.run(make_transport(fleet, paths).shutdown, backend="asyncio")
    paths.remove_run_dir()
    return {"via": "local", "router_pid": pid}


def render_ps(rows: list[SlotStatus]) -> str:
    """Plain-text table of ``fleet ps`` rows (tabulate)."""
    from tabulate import tabulate

    def fmt_s(v: float | None) -> str:
        return "-" if v is None else (f"{v:.0f}s" if v >= 10 else f"{v:.1f}s")

    table = []
    for r in rows:
        pane = f"dead({r.exit_status})" if r.pane == "dead" and r.exit_status is not None else r.pane
        table.append([r.slot, r.runtime, r.class_ or "-", pane, r.pid or "-", r.command or "-", fmt_s(r.idle_s),
                      f"{r.heartbeat} {fmt_s(r.heartbeat_age_s)}" if r.heartbeat != "none" else "none",
                      r.state, r.task or "-", ",".join(r.flags) or "ok"])
    head = ["SLOT", "RUNTIME", "CLASS", "PANE", "PID", "CMD", "IDLE", "HEARTBEAT", "STATE", "TASK", "FLAGS"]
    title = f"tenant {rows[0].tenant_id} @ {rows[0].host} (heartbeats from {rows[0].source})\n" if rows else "no slots\n"
    return title + tabulate(table, headers=head, tablefmt="plain")
