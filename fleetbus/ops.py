"""Operator verbs that combine the client, the router process and the transport.

``up``, ``down`` and ``ps`` work whether or not the router is running: ``ps`` asks the router
when it answers and otherwise reads the transport and the heartbeat files itself. ``up`` and
``down`` go through systemd when this fleet's user units are installed and a user manager
answers (:mod:`fleetbus.systemd`), and otherwise start and stop the router themselves.

All three first check the fleet's state and runtime directories (:meth:`FleetPaths.ensure` for
``up``, :meth:`FleetPaths.check` otherwise) and raise :class:`fleetbus.paths.PathError` when one is
planted (a symlink, another user's, writable by group or world): nothing is started, asked or
removed there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import anyio

from fleetbus import reap, systemd
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
    """Status of every slot: from the router, or from tmux + heartbeat files when it is down.

    Every row gets the flag ``BOOT-ENABLE`` when this fleet's systemd units are installed but
    would not bring it back after a reboot (a unit not enabled, or linger off); see
    :func:`boot_problems`.

    Raises:
        PathError: a state or runtime directory, or the router's socket, is not safely ours.
    """
    paths.check()
    rows = None
    if procs.router_pid(paths) is not None:
        try:
            rows = SyncClient(fleet, paths, connect_timeout_s=3.0).ps()
        except RouterUnavailable:
            pass
    if rows is None:
        transport = make_transport(fleet, paths)
        panes = anyio.run(transport.probe_all, backend="asyncio")
        rows = collect_status(fleet, panes, beats_from_files(fleet, paths), source="files",
                              supervision=_supervision_from_journal(fleet, paths))
    if boot_problems(fleet, paths):
        for r in rows:
            r.flags.append("BOOT-ENABLE")
    return rows


def boot_problems(fleet: FleetConfig, paths: FleetPaths) -> list[str]:
    """Why installed units would not bring the fleet back after a reboot (see
    :attr:`fleetbus.systemd.BootState.problems`); empty without units."""
    return systemd.boot_state(fleet, paths).problems


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


@dataclass
class UpResult:
    """What ``up`` did.

    Attributes:
        started: this call started the router. rows: ``ps`` rows once sidecars answered.
        via: ``"systemd"`` (the units were started) or ``"fleetbus"`` (the router was spawned
            in the background by this process). detail: which units, or why not systemd.
        handed_over: pid of a router started outside systemd that was stopped so its unit
            could take over (slots and sidecars kept running), else None.
    """

    started: bool
    rows: list[SlotStatus]
    via: str
    detail: str
    handed_over: int | None = None


def up(fleet: FleetConfig, paths: FleetPaths, timeout_s: float = 20.0,
       runner: systemd.Runner = systemd.run) -> UpResult:
    """Start the router if it is not running; wait for the slots' sidecars.

    With this fleet's systemd units installed and a user manager answering, ``systemctl --user
    start`` starts the holder and router units (a router running outside systemd is stopped
    first: its slots and sidecars keep running and re-register). Otherwise the router is spawned
    in the background, and a missing ``_holder`` session of a running server is recreated.
    Waits up to ``timeout_s`` s for every live slot's sidecar to be healthy; slots that are dead
    or have no sidecar by then show in the rows.

    Raises:
        OpsError: the router did not come up, or systemd could not start the units (the message
            holds the end of the router's log or systemctl's answer).
        PathError: a state or runtime directory is not safely ours (nothing is started).
    """
    paths.ensure()
    boot = systemd.boot_state(fleet, paths)
    via, detail, handed_over = "fleetbus", "no fleetbus systemd units (`fleet install-systemd` adds them)", None
    if boot.installed:
        reachable, why = systemd.manager_reachable(runner)
        if reachable:
            via = "systemd"
        else:
            detail = f"units installed, but {why}"
    pid = procs.router_pid(paths)
    if via == "systemd":
        holder, router = systemd.unit_names(paths)
        detail = f"{holder}, {router}"
        if pid is not None and pid != systemd.main_pid(router, runner):
            procs.stop_pid(pid, timeout=15.0)  # a router started outside systemd: hand over to the unit
            handed_over, pid = pid, None
        p = runner(["systemctl", "--user", "start", holder, router])
        if p.returncode != 0:
            raise OpsError(f"systemctl --user start {holder} {router} failed (exit {p.returncode}): "
                           f"{(p.stderr or p.stdout or '').strip()}\nsee: journalctl --user -u {router}\n"
                           f"end of {paths.router_log}:\n" + _log_tail(paths.router_log))
    elif pid is None:
        procs.spawn_router(fleet, paths)
    else:
        transport = make_transport(fleet, paths)
        if hasattr(transport, "ensure_server"):  # a _holder session killed by hand comes back
            anyio.run(transport.ensure_server, backend="asyncio")
    started = pid is None
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
            return UpResult(started, rows, via, detail, handed_over)
        time.sleep(0.1)


def down(fleet: FleetConfig, paths: FleetPaths, timeout_s: float = 15.0,
         runner: systemd.Runner = systemd.run, grace_s: float = reap.GRACE_S) -> dict:
    """Stop everything of this tenant: sidecars, slots, the fleet's tmux server, the router.

    With installed units and a user manager, ``systemctl --user stop`` stops the router and
    holder units first, so systemd restarts neither. Only this fleet's own tmux socket is
    killed. Every process of the fleet is recorded first (:func:`fleetbus.reap.fleet_processes`:
    router, sidecars, units, tmux server, pane programs and their children); any that still runs
    ``grace_s`` s after the teardown is ended by pid (SIGTERM, SIGKILL after 2 s) and listed.
    The runtime dir is removed last.

    Returns:
        ``{"via": "router"|"local"|"systemd", "router_pid": int|None, "leftovers": [...]}``;
        ``leftovers`` has one ``{"pid", "role", "cmdline", "signal", "running"}`` dict per
        process that outlived the teardown (see :func:`fleetbus.reap.reap`), ``[]`` normally.

    Raises:
        PathError: a state or runtime directory is not safely ours (nothing is stopped).
    """
    paths.check()
    via_systemd = False
    if systemd.boot_state(fleet, paths).installed and systemd.manager_reachable(runner)[0]:
        via_systemd = True
    before = reap.fleet_processes(fleet, paths, runner if via_systemd else None)
    if via_systemd:
        holder, router = systemd.unit_names(paths)
        runner(["systemctl", "--user", "stop", router, holder])
    pid = procs.router_pid(paths)
    via = "systemd" if via_systemd else "local"
    done = False
    if pid is not None:
        try:
            SyncClient(fleet, paths, connect_timeout_s=3.0).shutdown(teardown=True)
            if procs.wait_gone(pid, timeout_s):
                via, done = "systemd" if via_systemd else "router", True
        except RouterUnavailable:
            pass
        if not done:
            procs.stop_pid(pid)
    if not done:
        procs.stop_sidecars(paths, list(fleet.slots))
        anyio.run(make_transport(fleet, paths).shutdown, backend="asyncio")
    leftovers = reap.reap(before, grace_s)
    paths.remove_run_dir()
    return {"via": via, "router_pid": pid, "leftovers": leftovers}


def journal_line(journal: dict) -> str:
    """The ``fleet ps`` lines for a journal that cannot be written (``SlotStatus.journal``), with the fix."""
    import datetime

    from fleetbus.fsinfo import human_bytes

    since = datetime.datetime.fromtimestamp(journal["since"]).strftime("%H:%M:%S") if journal.get("since") else "?"
    kept = f"; {journal['deferred']} change(s) kept in memory until it can" if journal.get("deferred") else ""
    return (f"JOURNAL UNAVAILABLE since {since}: {journal.get('error')} (file system {journal.get('fs')}, "
            f"{human_bytes(journal.get('free_bytes'))} free): new sends and publishes are refused "
            f"(journal-unavailable) and nothing is typed{kept}.\n"
            f"  fix: free disk space on {journal.get('fs')} (the router resumes by itself within a second)")


def render_ps(rows: list[SlotStatus], boot: list[str] | None = None) -> str:
    """Plain-text table of ``fleet ps`` rows (tabulate); ``boot``: :func:`boot_problems`, shown
    under the table with the fix when not empty; a journal that cannot be written
    (``SlotStatus.journal``) likewise."""
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
    text = title + tabulate(table, headers=head, tablefmt="plain")
    journal = rows[0].journal if rows else None
    if journal is not None and not journal.get("ok", True):
        text += "\n" + journal_line(journal)
    if boot:
        text += ("\nBOOT-ENABLE: this fleet would not come back after a reboot: " + "; ".join(boot)
                 + ".\n  fix: fleet install-systemd (enables the units and linger; `fleet doctor` explains)")
    return text
