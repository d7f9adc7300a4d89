"""Every process of a fleet, recorded before ``fleet down`` and ended by pid if it outlives it.

``fleet down`` asks each part to stop: the router, the sidecars, the tmux server. The server's
exit hangs up every pane's terminal, and the kernel sends SIGHUP to each pane's session leader
(the runtime, or the ``_holder`` pane's ``sleep``), which ends it. A process that outlives this
(a runtime that ignores SIGHUP, a child it started in the background, a process that hung)
would be left running with nobody to stop it. So :func:`fleet_processes` records, before the
teardown, every process of the fleet: the router, each sidecar, the systemd units' main
processes, the tmux server, every pane's program, each of their descendants and every member of
a pane's session. :func:`reap` then waits for them to end and ends the rest by pid (SIGTERM,
then SIGKILL) and says which.

A recorded process is identified by its pid *and* its start time (``psutil`` ``create_time``):
a pid reused by another process is never signalled. A zombie counts as ended.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import psutil

#: Default wait (s) for recorded processes to end on their own before :func:`reap` signals them.
GRACE_S = 5.0
#: Wait (s) after SIGTERM before SIGKILL, and after SIGKILL before a process counts as unkillable.
TERM_S = 2.0


@dataclass(frozen=True)
class FleetProcess:
    """One recorded process.

    Attributes:
        pid: its pid. create_time: its start (Unix s, as ``psutil`` reports it; tells a reused
            pid apart). role: what it is to the fleet (``router``, ``sidecar a0``,
            ``tmux-server``, ``pane _holder``, ``pane a0``, ``holder-unit``, ``router-unit``;
            ``child of <role>`` for a descendant or session member). cmdline: its command line
            (at most 200 characters).
    """

    pid: int
    create_time: float
    role: str
    cmdline: str

    def process(self) -> psutil.Process | None:
        """The live process, or None when it ended (exited, a zombie, or the pid was reused)."""
        try:
            p = psutil.Process(self.pid)
            if abs(p.create_time() - self.create_time) > 0.01 or p.status() == psutil.STATUS_ZOMBIE:
                return None
            return p
        except (psutil.Error, OSError):
            return None

    def alive(self) -> bool:
        return self.process() is not None


def _gone_or_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except (psutil.Error, OSError):
        return True


def _record(proc: psutil.Process, role: str) -> FleetProcess | None:
    try:
        with proc.oneshot():
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return FleetProcess(proc.pid, proc.create_time(), role, " ".join(proc.cmdline())[:200])
    except (psutil.Error, OSError):
        return None


def _proc_table() -> dict[int, tuple[int, int]]:
    """``{pid: (ppid, session id)}`` of every process, from one read of each ``/proc/<pid>/stat``
    (Linux; about 15 µs a process, a fifth of what ``psutil.process_iter`` takes: 12 ms for 800
    processes), else psutil and ``os.getsid``."""
    table: dict[int, tuple[int, int]] = {}
    if os.path.exists("/proc/self/stat"):
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                fd = os.open(f"/proc/{name}/stat", os.O_RDONLY)
                try:
                    data = os.read(fd, 512)
                finally:
                    os.close(fd)
                # "pid (comm) state ppid pgrp session ...": comm (at most 64 bytes) may hold
                # spaces and parentheses, so split after its last ")"
                fields = data[data.rindex(b")") + 2:].split(b" ", 5)
                table[int(name)] = (int(fields[1]), int(fields[3]))
            except (OSError, ValueError, IndexError):
                continue
        return table
    for p in psutil.process_iter(["ppid"]):
        try:
            table[p.pid] = (p.info["ppid"], os.getsid(p.pid))
        except OSError:
            continue
    return table


def snapshot(roots: Mapping[int, str], sessions: Mapping[int, str] | None = None) -> list[FleetProcess]:
    """Record ``roots`` (pid -> role), all their descendants and every process whose session id
    is a key of ``sessions`` (session id -> role of its leader, e.g. a pane's program).

    One pass over the process table. Pids that do not exist (or are zombies) are skipped; the
    calling process is never recorded. Returns one :class:`FleetProcess` per pid, roots first.
    """
    sessions = dict(sessions or {})
    children: dict[int, list[int]] = {}
    members: dict[int, int] = {}
    for pid, (ppid, sid) in _proc_table().items():
        children.setdefault(ppid, []).append(pid)
        if sid in sessions:
            members[pid] = sid
    roles: dict[int, str] = dict(roots)
    todo = list(roles.items())
    while todo:
        pid, role = todo.pop()
        for c in children.get(pid, ()):
            if c not in roles:
                roles[c] = role if role.startswith("child of ") else f"child of {role}"
                todo.append((c, roles[c]))
    for pid, sid in members.items():
        roles.setdefault(pid, f"child of {sessions[sid]}")
    out = []
    for pid, role in roles.items():
        if pid == os.getpid():
            continue
        try:
            rec = _record(psutil.Process(pid), role)
        except (psutil.Error, OSError):
            rec = None
        if rec is not None:
            out.append(rec)
    return out


def alive(procs: Iterable[FleetProcess]) -> list[FleetProcess]:
    """The recorded processes still running (same pid and start time, not a zombie)."""
    return [p for p in procs if p.alive()]


def wait_gone(procs: Iterable[FleetProcess], timeout_s: float) -> list[FleetProcess]:
    """Wait up to ``timeout_s`` s for the recorded processes to end; returns those still running."""
    left = alive(procs)
    deadline = time.monotonic() + timeout_s
    pause = 0.005
    while left and time.monotonic() < deadline:
        time.sleep(pause)
        pause = min(pause * 2, 0.05)
        left = alive(left)
    return left


def _signal(procs: list[FleetProcess], sig: int) -> list[FleetProcess]:
    sent = []
    for rec in procs:
        p = rec.process()
        if p is None:
            continue
        try:
            p.send_signal(sig)  # psutil refuses a reused pid (NoSuchProcess)
            sent.append(rec)
        except (psutil.Error, OSError):
            continue
    return sent


def reap(procs: Iterable[FleetProcess], grace_s: float = GRACE_S, term_s: float = TERM_S) -> list[dict]:
    """End, by pid, whichever recorded process outlives the teardown.

    Waits up to ``grace_s`` s for all of them to end on their own (returns at once when they
    have), sends SIGTERM to those left, waits up to ``term_s`` s, sends SIGKILL to those still
    left and waits up to ``term_s`` s again.

    Returns:
        one dict per process still running after ``grace_s``, in the ``fleet down --json`` shape
        ``{"pid": int, "role": str, "cmdline": str, "signal": "SIGTERM"|"SIGKILL"|None,
        "running": bool}``: ``signal`` is the last signal it was sent (None: it could not be
        signalled, e.g. another user's), ``running`` that it still ran at the end (stuck in the
        kernel, or not ours to signal); ``[]`` when everything ended by itself.
    """
    outlived = wait_gone(list(procs), grace_s)
    if not outlived:
        return []
    sent = {p.pid: "SIGTERM" for p in _signal(outlived, signal.SIGTERM)}
    left = wait_gone(outlived, term_s)
    sent.update((p.pid, "SIGKILL") for p in _signal(left, signal.SIGKILL))
    running = {p.pid for p in wait_gone(left, term_s)}
    return [{"pid": p.pid, "role": p.role, "cmdline": p.cmdline, "signal": sent.get(p.pid),
             "running": p.pid in running} for p in outlived]


def fleet_processes(fleet, paths, runner=None) -> list[FleetProcess]:
    """Every process of this fleet now (see the module doc): router, sidecars, the systemd
    units' main processes (when ``runner`` is given and the units are installed), the
    transport's server and pane programs, and their descendants and session members.

    Args:
        fleet: the :class:`~fleetbus.config.FleetConfig`. paths: its
            :class:`~fleetbus.paths.FleetPaths`. runner: a :data:`fleetbus.systemd.Runner` to
            ask systemd for the units' main pids (pass it only when the units are installed and
            the manager answers), or None to not ask.
    """
    import anyio

    from fleetbus import systemd
    from fleetbus.router import procs
    from fleetbus.router.server import make_transport

    roots: dict[int, str] = {}
    sessions: dict[int, str] = {}
    transport = make_transport(fleet, paths)
    for pid, role in anyio.run(transport.processes, backend="asyncio").items():
        if role.startswith("dead pane "):
            # its program exited, but what it left in the background may still run in its
            # session. Linux never hands out a pid still in use as a session id, so while no
            # live process has this pid (gone, or the unreaped zombie of the pane's program),
            # every process in session <pid> is from that pane
            if _gone_or_zombie(pid):
                sessions[pid] = role
            continue
        roots[pid] = role
        if role.startswith("pane "):
            sessions[pid] = role
    if runner is not None:
        for unit, role in zip(systemd.unit_names(paths), ("holder-unit", "router-unit")):
            pid = systemd.main_pid(unit, runner)
            if pid is not None:
                roots.setdefault(pid, role)
    pid = procs.router_pid(paths)
    if pid is not None:
        roots.setdefault(pid, "router")
    for slot in fleet.slots:
        pid = procs.sidecar_pid(paths, slot)
        if pid is not None:
            roots.setdefault(pid, f"sidecar {slot}")
    return snapshot(roots, sessions)
