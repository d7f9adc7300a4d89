"""Starting and stopping fleetbus's own background processes (router, sidecars) by pid.

Processes are started in their own session (``setsid``) so they outlive the command that
started them, with output appended to a log under the state dir (0600 whatever the umask; pid
files too), until the process takes its log over with ``--log-file`` (rotated, standard output
and error included; :mod:`fleetbus.logs`). They are found again through
pid files, checked against the live process table (pid and command line) so a reused pid is
never mistaken for ours, and stopped by pid, never by name.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from fleetbus.config import FleetConfig
from fleetbus.paths import FleetPaths
from fleetbus.safepath import atomic_write, open_private_file


def read_pid(pidfile: Path, *must_contain: str) -> int | None:
    """Pid in ``pidfile`` if that process is alive and its command line holds ``must_contain``."""
    try:
        pid = int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        cmd = " ".join(proc.cmdline())
    except (psutil.Error, OSError):
        return None
    return pid if all(s in cmd for s in must_contain) else None


def write_pidfile(pidfile: Path) -> None:
    """Write this process's pid to ``pidfile`` atomically (0600, see :func:`fleetbus.safepath.atomic_write`)."""
    atomic_write(pidfile, f"{os.getpid()}\n")


def _fleet_argv(fleet: FleetConfig, *args: str) -> list[str]:
    if fleet.path is None:
        raise ValueError("this fleet was not loaded from a roster file; background processes need one")
    return [sys.executable, "-m", "fleetbus", "--roster", str(fleet.path), *args]


def spawn(argv: list[str], log: Path) -> int:
    """Start ``argv`` detached (new session, stdin from /dev/null, output appended to ``log``,
    which is opened without following links and kept 0600)."""
    log.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = open_private_file(log, os.O_WRONLY | os.O_APPEND)
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fd, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True)
    finally:
        os.close(fd)
    return proc.pid


def router_pid(paths: FleetPaths) -> int | None:
    return read_pid(paths.router_pidfile, "fleetbus", "router")


def sidecar_pid(paths: FleetPaths, slot: str) -> int | None:
    return read_pid(paths.sidecar_pidfile(slot), "fleetbus", "sidecar", slot)


def spawn_router(fleet: FleetConfig, paths: FleetPaths) -> int:
    """Start ``fleet router``; it rotates its own log (``--log-file``: ``bus.log_max_bytes``)."""
    return spawn(_fleet_argv(fleet, "router", "--log-file", str(paths.router_log)), paths.router_log)


def spawn_sidecar(fleet: FleetConfig, paths: FleetPaths, slot: str) -> int:
    """Start ``fleet sidecar SLOT``; it rotates its own log like the router."""
    log = paths.sidecar_log(slot)
    return spawn(_fleet_argv(fleet, "sidecar", slot, "--log-file", str(log)), log)


def stop_pid(pid: int, timeout: float = 5.0) -> bool:
    """SIGTERM ``pid``, then SIGKILL after ``timeout`` s. True when it is gone."""
    try:
        proc = psutil.Process(pid)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout)
        return True
    except psutil.NoSuchProcess:
        return True
    except psutil.TimeoutExpired:
        try:
            proc.kill()
            proc.wait(2)
        except psutil.Error:
            pass
        return not psutil.pid_exists(pid)


def stop_sidecars(paths: FleetPaths, slots: list[str], timeout: float = 5.0, also: tuple[int, ...] = ()) -> None:
    """SIGTERM every listed slot's sidecar at once, wait up to ``timeout`` s, SIGKILL the rest.

    ``also``: pids of sidecars just spawned that may not have written their pid file yet (each is
    checked to be a fleetbus sidecar by its command line first)."""
    procs = []
    pids = {sidecar_pid(paths, slot) for slot in slots}
    for pid in also:
        try:
            cmd = psutil.Process(pid).cmdline()
        except (psutil.Error, OSError):
            continue
        if "fleetbus" in " ".join(cmd) and "sidecar" in cmd:
            pids.add(pid)
    for pid in pids:
        if pid is not None:
            try:
                p = psutil.Process(pid)
                p.send_signal(signal.SIGTERM)
                procs.append(p)
            except psutil.Error:
                pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=2)
    for slot in slots:
        paths.sidecar_pidfile(slot).unlink(missing_ok=True)


def stop_sidecar(paths: FleetPaths, slot: str) -> None:
    stop_sidecars(paths, [slot])


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` s for ``pid`` to exit (a zombie counts); True when it did. Polls
    every 5 ms at first, backing off to 50 ms."""
    deadline = time.monotonic() + timeout
    pause = 0.005
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(pause)
        pause = min(pause * 2, 0.05)
    return False
