"""Shared fixtures: a private fleet per test on its own tmux socket, cleaned up afterwards.

Every fleet test runs with ``FLEETBUS_HOME`` and ``TMUX_TMPDIR`` pointing into the test's own
temporary folder, so its tmux server, sockets and state can never meet a real user's fleet or
tmux server; teardown runs ``fleet down`` and checks that no process or socket is left: every
process of the fleet, recorded by pid and start time before ``fleet down``, and every process
that carries the test's ``TMUX_TMPDIR`` in its environment must be gone, and ``fleet down`` must
not have had to kill any (see :func:`assert_no_processes_left`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

import anyio

from fleetbus import ops, reap
from fleetbus.client import Client
from fleetbus.config import FleetConfig, load_roster
from fleetbus.paths import FleetPaths, fleet_paths
from fleetbus.router import procs
from fleetbus.transports.tmux import TmuxTransport

HAVE_TMUX = shutil.which("tmux") is not None


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # pyzmq's asyncio integration has no trio support


def wait_for(pred: Callable[[], object], timeout: float = 15.0, interval: float = 0.05,
             what: str | Callable[[], str] = "condition"):
    """Poll ``pred`` until it returns a truthy value; fail the test after ``timeout`` s (``what``
    may be a callable, called then, to describe the state it timed out in)."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what() if callable(what) else what}")
        time.sleep(interval)


@dataclass
class FleetEnv:
    """A started (or startable) fleet for one test."""

    home: Path
    roster: Path
    fleet: FleetConfig
    paths: FleetPaths
    env: dict[str, str]

    @property
    def tmux(self) -> TmuxTransport:
        return TmuxTransport(self.paths.tmux_socket)

    def cli(self, *args: str, input: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run ``fleet --roster <roster> ARGS`` in this fleet's environment."""
        return subprocess.run([sys.executable, "-m", "fleetbus", "--roster", str(self.roster), *args],
                              env=self.env, input=input, capture_output=True, text=True, timeout=timeout)

    def up(self) -> list:
        rows = ops.up(self.fleet, self.paths, timeout_s=30).rows
        return rows

    def ps(self) -> dict:
        return {r.slot: r for r in ops.ps(self.fleet, self.paths)}

    def send(self, slot: str, body: str, **kw):
        """``Client.send`` through this fleet's router, from synchronous test code."""
        async def main():
            async with Client(self.fleet, self.paths) as c:
                return await c.send(slot, body, **kw)
        return anyio.run(main, backend="asyncio")

    def tmux_cmd(self, *args: str) -> str:
        return self.tmux.run_sync(*args)


@pytest.fixture
def make_fleet(monkeypatch) -> Callable[[str], FleetEnv]:
    """Factory: write a roster, point FLEETBUS_HOME/TMUX_TMPDIR at a private dir, load it."""
    made: list[FleetEnv] = []
    # short base dir: tmux and ZeroMQ socket paths must stay under 107 bytes
    base = Path(tempfile.mkdtemp(prefix="fb-", dir="/tmp"))
    tmux_tmp = base / "tmux"
    tmux_tmp.mkdir()
    monkeypatch.setenv("TMUX_TMPDIR", str(tmux_tmp))
    monkeypatch.delenv("TMUX", raising=False)
    # systemd user units are looked up (and by install-systemd tests written) here, never in ~/.config
    monkeypatch.setenv("XDG_CONFIG_HOME", str(base / "config"))

    def factory(roster_text: str, name: str = "f") -> FleetEnv:
        home = base / name
        home.mkdir()
        monkeypatch.setenv("FLEETBUS_HOME", str(home))
        roster = home / "fleet.yaml"
        roster.write_text(roster_text)
        fleet = load_roster(roster)
        paths = fleet_paths(fleet.tenant, fleet.roster.transport.socket)
        paths.ensure()
        fe = FleetEnv(home, roster, fleet, paths, dict(os.environ))
        made.append(fe)
        return fe

    yield factory

    recorded: list[reap.FleetProcess] = []
    signalled: list[dict] = []
    problems: list[str] = []
    try:
        for fe in made:  # every fleet is taken down, whatever an earlier one left
            monkeypatch.setenv("FLEETBUS_HOME", str(fe.home))
            recorded += reap.fleet_processes(fe.fleet, fe.paths)
            try:
                signalled += ops.down(fe.fleet, fe.paths, grace_s=TEARDOWN_GRACE_S)["leftovers"]
            except Exception as e:  # reported below, after the process check
                problems.append(f"fleet down failed: {e!r}")
            if procs.router_pid(fe.paths) is not None:
                problems.append("router still running after teardown")
            problems += [f"sidecar {slot} still running after teardown" for slot in fe.fleet.slots
                         if procs.sidecar_pid(fe.paths, slot) is not None]
            if Path(fe.tmux.socket_path()).exists():
                problems.append("tmux socket left behind")
            if fe.paths.run_dir.exists():
                problems.append("runtime dir (sockets, lock) left behind")
        # every process this test started carries its TMUX_TMPDIR (fleets it took down itself,
        # `fleet doctor`'s throwaway server, the demo, decoy tmux servers) or was recorded above
        assert_no_processes_left(f"TMUX_TMPDIR={tmux_tmp}", recorded)
        assert not problems, "\n".join(problems)
        assert not signalled, ("`fleet down` had to end these processes of the fleet (they outlived the "
                               "teardown):\n" + "\n".join(f"  pid {p['pid']} ({p['role']}) {p['signal']}: "
                                                          f"{p['cmdline']}" for p in signalled))
    finally:
        shutil.rmtree(base, ignore_errors=True)


#: How long (s) teardown waits for a test's processes to end after ``fleet down`` before it
#: fails the test (on a busy 2-core machine a runtime can take a while to exit).
TEARDOWN_GRACE_S = 10.0


def marker_processes(entry: str) -> list[psutil.Process]:
    """Live processes (zombies and this one excluded) whose environment holds the exact
    ``entry`` (``KEY=value``), read from ``/proc/<pid>/environ``."""
    want = entry.encode()
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            with open(f"/proc/{proc.pid}/environ", "rb") as f:
                if want not in f.read().split(b"\0"):
                    continue
            if proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (OSError, psutil.Error):
            continue
    return found


def assert_no_processes_left(entry: str, recorded=(), timeout: float = TEARDOWN_GRACE_S,
                             after: str = "the test's teardown") -> None:
    """Fail the test when, ``timeout`` s after its teardown, a process it started still runs:
    one of ``recorded`` (:class:`fleetbus.reap.FleetProcess`: same pid and start time) or any
    process whose environment holds ``entry`` (the test's private ``TMUX_TMPDIR=...``).
    Whatever is left is listed (pid, parent, command line), then killed by pid, so nothing
    outlives the test run."""
    def left() -> list[psutil.Process]:
        found = {p.pid: p for p in marker_processes(entry)}
        for rec in recorded:
            p = rec.process()
            if p is not None:
                found.setdefault(p.pid, p)
        return list(found.values())

    deadline = time.monotonic() + timeout
    found = left()
    while found and time.monotonic() < deadline:
        time.sleep(0.1)
        found = left()
    lines = []
    for p in found:
        try:
            lines.append(f"  pid {p.pid} (parent {p.ppid()}): {' '.join(p.cmdline())[:200]}")
            p.kill()
        except psutil.Error:
            continue
    psutil.wait_procs(found, timeout=5)
    if lines:
        pytest.fail(f"{len(lines)} process(es) outlived {after} by {timeout:g} s (killed now):\n"
                    + "\n".join(lines), pytrace=False)


@pytest.fixture(autouse=True)
def _no_stray_run_dirs(monkeypatch):
    """Remove the ``/tmp/fleetbus-<uid>/<hash>`` runtime dirs this test created in-process
    (``FleetPaths.ensure``) that are still there: a router stopped without ``fleet down`` (the
    memory-transport router tests) keeps its dir on purpose. ``make_fleet`` checks first that
    ``fleet down`` removed its fleets' dirs."""
    made: list[Path] = []
    real = FleetPaths.ensure

    def ensure(self, *args, **kwargs):
        if self.run_dir.parent == Path(f"/tmp/fleetbus-{os.getuid()}") and self.instance != self.tenant:
            made.append(self.run_dir)  # a $FLEETBUS_HOME fleet: the hashed dir is this test's own
        return real(self, *args, **kwargs)

    monkeypatch.setattr(FleetPaths, "ensure", ensure)
    yield
    for d in set(made):
        shutil.rmtree(d, ignore_errors=True)


needs_tmux = pytest.mark.skipif(not HAVE_TMUX, reason="tmux is not installed (scripts/bootstrap installs it)")
