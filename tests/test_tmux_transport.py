"""TmuxTransport on a real private tmux server: control mode, exact delivery, fallback."""

from __future__ import annotations

import os
import shutil
import tempfile

import anyio
import pytest
from conftest import needs_tmux, wait_for

from fleetbus.adapters.base import SubmitProfile
from fleetbus.transports.base import LaunchSpec, SlotNotFound
from fleetbus.transports.tmux import TmuxTransport

pytestmark = [needs_tmux, pytest.mark.tmux]


@pytest.fixture
def scratch(monkeypatch):
    d = tempfile.mkdtemp(prefix="fbt-", dir="/tmp")
    os.makedirs(f"{d}/tmux")
    monkeypatch.setenv("TMUX_TMPDIR", f"{d}/tmux")
    yield d
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
