"""Shared fixtures: a private fleet per test on its own tmux socket, cleaned up afterwards.

Every fleet test runs with ``FLEETBUS_HOME`` and ``TMUX_TMPDIR`` pointing into the test's own
temporary folder, so its tmux server, sockets and state can never meet a real user's fleet or
tmux server; teardown runs ``fleet down`` and checks that no process or socket is left.
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

import pytest

import anyio

from fleetbus import ops
from fleetbus.client import Client
from fleetbus.config import FleetConfig, load_roster
from fleetbus.paths import FleetPaths, fleet_paths
from fleetbus.router import procs
from fleetbus.transports.tmux import TmuxTransport

HAVE_TMUX = shutil.which("tmux") is not None


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # pyzmq's asyncio integration has no trio support


def wait_for(pred: Callable[[], object], timeout: float = 15.0, interval: float = 0.05, what: str = "condition"):
    """Poll ``pred`` until it returns a truthy value; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
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

    for fe in made:
        monkeypatch.setenv("FLEETBUS_HOME", str(fe.home))
        ops.down(fe.fleet, fe.paths)
        assert procs.router_pid(fe.paths) is None, "router still running after teardown"
        for slot in fe.fleet.slots:
            assert procs.sidecar_pid(fe.paths, slot) is None, f"sidecar {slot} still running after teardown"
        assert not Path(fe.tmux.socket_path()).exists(), "tmux socket left behind"
        _reap_leaked_tmux(fe.paths.tmux_socket)
        assert not fe.paths.run_dir.exists(), "runtime dir (sockets, lock) left behind"
    shutil.rmtree(base, ignore_errors=True)


def _reap_leaked_tmux(socket: str) -> None:
    """Stop (by pid) a tmux server of this test's own socket that outlived ``fleet down``.

    The socket-file check above cannot see it when its socket file was removed. Seen three
    times in about ten loaded runs of test_supervision.py (cause not found yet, see the issue 4
    note); reported as a warning so the leak is visible without leaving processes behind."""
    import warnings

    import psutil

    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        cmd = proc.info["cmdline"] or []
        if proc.info["name"] == "tmux" or (cmd and os.path.basename(cmd[0]) == "tmux"):
            if "-L" in cmd and cmd[cmd.index("-L") + 1:cmd.index("-L") + 2] == [socket]:
                try:
                    proc.kill()
                except psutil.Error:
                    continue
                warnings.warn(f"tmux server or client of socket {socket} outlived `fleet down` (pid {proc.pid}: {' '.join(cmd)[:120]}); killed")


needs_tmux = pytest.mark.skipif(not HAVE_TMUX, reason="tmux is not installed (scripts/bootstrap installs it)")
