"""TmuxTransport on a real private tmux server: control mode, exact delivery, fallback."""

from __future__ import annotations

import os
import shutil
import tempfile

import anyio
import pytest
import psutil
from conftest import assert_no_processes_left, needs_tmux, wait_for

from fleetbus import reap

from fleetbus.adapters.base import SubmitProfile
from fleetbus.transports.base import LaunchSpec, SlotNotFound
from fleetbus.transports.tmux import TmuxTransport

pytestmark = [needs_tmux, pytest.mark.tmux]


@pytest.fixture
def scratch(monkeypatch):
    d = tempfile.mkdtemp(prefix="fbt-", dir="/tmp")
    os.makedirs(f"{d}/tmux")
    monkeypatch.setenv("TMUX_TMPDIR", f"{d}/tmux")
    try:
        yield d
        assert_no_processes_left(f"TMUX_TMPDIR={d}/tmux")  # every tmux server and pane of the test
    finally:
        shutil.rmtree(d, ignore_errors=True)


def run(fn, *a):
    return anyio.run(fn, *a, backend="asyncio")


def test_control_mode_delivers_exact_text_without_forking(scratch):
    t = TmuxTransport("tt", control=True, scratch_dir=scratch)
    out = f"{scratch}/got.txt"
    text = "line 'one' with \"quotes\" $HOME `x`\nline two\ttab ünïcode"

    async def main():
        try:
            await t.ensure_server()
            await t.start_slot(LaunchSpec("c", ["/bin/sh", "-c", f"stty -echo; cat > {out}"], scratch, {}))
            await anyio.sleep(0.3)
            forks = t.forks
            panes = await t.probe_all()
            assert panes["c"].alive
            await t.deliver("c", text, SubmitProfile(key="Enter"))
            await t.screen("c", history=10)
            assert t.forks == forks, "hot-path commands must go through the control client"
            await t.send_keys("c", "C-d")
            with pytest.raises(SlotNotFound):
                await t.screen("nosuch")
            wait_for(lambda: os.path.exists(out) and open(out).read() == text + "\n", timeout=5, what="exact text")
        finally:
            await t.shutdown()

    run(main)
    assert os.listdir(scratch) == ["tmux", "got.txt"] or sorted(os.listdir(scratch)) == ["got.txt", "tmux"]


def test_control_client_replaced_or_bypassed_when_it_cannot_serve(scratch):
    t = TmuxTransport("tf", control=True, scratch_dir=scratch)

    async def main():
        try:
            await t.ensure_server()
            await t.start_slot(LaunchSpec("s", ["/bin/sleep", "60"], scratch, {}))
            assert "s" in await t.probe_all()
            old = t._ctl.proc.pid
            t._ctl.proc.kill()  # the control client dies: the next call opens a new one
            await t._ctl.proc.wait()
            forks = t.forks
            assert "s" in await t.probe_all()
            assert t._ctl.proc.pid != old and t.forks == forks
            # the holder is gone, so control mode cannot attach: forked clients answer instead
            await t._run("kill-session", "-t", "=_holder")
            await t.aclose()
            forks = t.forks
            assert "s" in await t.probe_all()
            assert t.forks > forks
        finally:
            await t.shutdown()

    run(main)


def test_holder_and_slot_programs_end_with_their_server(scratch):
    """``kill-server`` hangs up every pane: the ``_holder`` pane's program, each slot's program
    and their children end with the server. (The holder used to be ``sh -c "trap 'exit 0' TERM
    HUP; while :; do sleep 3600; done"``: the shell runs its trap only once its foreground
    ``sleep`` ends, so both outlived every ``fleet down`` by up to an hour.)"""
    t = TmuxTransport("th")

    async def main():
        try:
            await t.ensure_server()
            await t.start_slot(LaunchSpec("s", ["/bin/sh", "-c", "sleep 600 & exec sleep 601"], scratch, {}))
            found = await t.processes()
            roles = sorted(found.values())
            assert roles == ["pane _holder", "pane s", "tmux-server"], found
            holder = next(pid for pid, role in found.items() if role == "pane _holder")
            assert os.getsid(holder) == holder, "the holder's program leads its pane's session"
            recorded = wait_for(lambda: (lambda r: r if "child of pane s" in {x.role for x in r} else None)(
                reap.snapshot(found)), timeout=10, what="the slot's background child")
            assert {"child of pane s", "pane _holder", "pane s", "tmux-server"} <= {r.role for r in recorded}
        finally:
            await t.shutdown()
        return recorded

    recorded = run(main)
    left = reap.wait_gone(recorded, 10)
    assert left == [], f"outlived kill-server: {left}"


_KILLED_OWNER = """
import sys, anyio
from fleetbus.transports.tmux import TmuxTransport

async def main():
    t = TmuxTransport(sys.argv[1], control=True)
    await t.ensure_server()
    await t.probe_all()  # through the control client
    # ~5 MB of answers this process never reads: the pipe fills and tmux keeps the rest
    with anyio.move_on_after(10):
        await t._ctl.proc.stdin.send(b"display-message -p '#{l:" + b"x" * 1000 + b"}'\\n" * 5000)
    print(t._ctl.proc.pid, flush=True)
    await anyio.sleep(600)

anyio.run(main, backend="asyncio")
"""


def test_control_client_dies_with_its_owner(scratch):
    """A control-mode client whose owner (the router, ``fleet holder``) is killed with output
    unread used to stay attached for ever, and tmux 3.3a's server then never exits, even on
    ``kill-server`` (it waits for every client; this was the rare tmux server that outlived
    ``fleet down`` in test_supervision.py). The client now dies with its owner."""
    import signal
    import subprocess
    import sys

    owner = subprocess.Popen([sys.executable, "-c", _KILLED_OWNER, "tk"], stdout=subprocess.PIPE, text=True)
    try:
        client = int(owner.stdout.readline())
        t = TmuxTransport("tk")
        server = run(t.server_pid)
        assert server is not None and psutil.pid_exists(client)
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(10)
        wait_for(lambda: not psutil.pid_exists(client) or psutil.Process(client).status() == psutil.STATUS_ZOMBIE,
                 timeout=10, what="the control client to end with its owner")
        run(t.shutdown)
        wait_for(lambda: not psutil.pid_exists(server), timeout=10, what="the tmux server to exit on kill-server")
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
