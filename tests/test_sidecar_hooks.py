"""Sidecar hook handling without a router: acks, queued acks, session correlation, JSON lines."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

import anyio
import pytest

from fleetbus import protocol as P
from fleetbus.agents.sidecar import Sidecar
from fleetbus.config import parse_roster
from fleetbus.paths import FleetPaths

MID, MID2 = "0123456789ab", "ba9876543210"


def make_sidecar(runtime: str = "stub"):
    """An unstarted :class:`Sidecar` of slot ``a`` (runtime ``runtime``) in a throwaway state and
    runtime dir; a generator for fixtures (yields it, then removes everything)."""
    base = Path(tempfile.mkdtemp(prefix="fb-sc-", dir="/tmp"))
    fleet = parse_roster({"version": 1, "tenant": "t", "agents": [{"name": "a", "runtime": runtime}]})
    paths = FleetPaths(tenant="t", state_dir=base / "state", run_dir=base / "run", tmux_socket="x")
    paths.ensure()
    sc = Sidecar(fleet, "a", paths)
    yield sc
    sc.ctx.term()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def sidecar():
    yield from make_sidecar()


def hook(event, prompt="", session=None, source=""):
    from fleetbus.adapters.base import find_markers
    return P.HookEvent(event=event, markers=find_markers(prompt), session_id=session, source=source)


def test_prompt_submit_acks_every_marker_and_keeps_them_until_sent(sidecar):
    sidecar.on_hook(hook("prompt-submit", f"[fleet#{MID} ops -> a] a\n[fleet#{MID2} ops -> a] b", "s1"))
    assert [(a.id, a.stage, a.session_id) for a in sidecar.pending_acks] == [(MID, "accepted", "s1"), (MID2, "accepted", "s1")]
    assert sidecar.state == "busy"
    sidecar.on_hook(hook("turn-end", session="s1"))
    assert sidecar.state == "idle"


def test_queued_acks_are_not_kept_for_later(sidecar):
    sidecar.on_hook(hook("prompt-queued", f"[fleet#{MID} ops -> a] x", "s1"))
    assert sidecar.pending_acks == [], "a queued ack is only useful while the sender waits"


def test_prompt_from_a_side_session_is_ignored(sidecar):
    sidecar.on_hook(hook("session-start", session="main", source="startup"))
    sidecar.on_hook(hook("prompt-submit", f"title for [fleet#{MID} ops -> a]", "side-thread"))
    assert sidecar.pending_acks == [] and sidecar.side_events == 1 and sidecar.state == "idle"
    sidecar.on_hook(hook("prompt-submit", f"[fleet#{MID} ops -> a] real", "main"))
    assert [a.id for a in sidecar.pending_acks] == [MID]


def test_new_session_after_reset_is_followed(sidecar):
    sidecar.on_hook(hook("session-start", session="one"))
    sidecar.on_hook(hook("session-start", session="two", source="clear"))
    sidecar.on_hook(hook("prompt-submit", f"[fleet#{MID} ops -> a] after clear", "two"))
    assert [a.session_id for a in sidecar.pending_acks] == ["two"] and sidecar.session_id == "two"


def test_without_session_start_the_first_session_seen_is_adopted(sidecar):
    sidecar.on_hook(hook("prompt-submit", f"[fleet#{MID} ops -> a] x", "s9"))
    sidecar.on_hook(hook("prompt-submit", f"[fleet#{MID2} ops -> a] y", "other"))
    assert len(sidecar.pending_acks) == 2, "no session was announced: nothing is treated as a side thread"


def test_json_lines_on_the_stream_socket(sidecar):
    async def main():
        async with anyio.create_task_group() as tg:
            tg.start_soon(sidecar.stream_loop)
            path = sidecar.paths.hook_stream("a")
            with anyio.fail_after(5):
                while not path.exists():
                    await anyio.sleep(0.01)
            lines = [
                {"event": "session-start", "session_id": "ses_1", "source": "startup"},
                "not json at all",
                {"event": "no-such-event"},
                {"event": "prompt-queued", "prompt": f"[fleet#{MID2} ops -> a] queued", "session_id": "ses_1"},
                {"event": "prompt-submit", "prompt": f"[fleet#{MID} ops -> a] hi", "sessionID": "ses_1"},
            ]
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(str(path))
                for obj in lines:
                    s.sendall((obj if isinstance(obj, str) else json.dumps(obj)).encode() + b"\n")
                s.sendall(json.dumps({"event": "turn-start"}).encode())  # last line without newline
            with anyio.fail_after(5):
                while sidecar.state != "busy" or not sidecar.pending_acks:
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
        assert sidecar.session_id == "ses_1"
        assert [(a.id, a.stage) for a in sidecar.pending_acks] == [(MID, "accepted")]

    anyio.run(main, backend="asyncio")


def test_acks_survive_a_sidecar_restart_for_replay(sidecar):
    """A router killed before reading an ack, then the sidecar killed before re-registering: the
    next sidecar of the slot replays the ack from the ack log; old entries are dropped."""
    import json
    import time

    sidecar.on_hook(hook("prompt-submit", f"[fleet#{MID} ops -> a] x", "s1"))
    log = sidecar.paths.ack_log("a")
    old = json.dumps({"t": time.time() - 3600, "id": MID2, "s": "s0"})
    log.write_text(log.read_text() + old + "\n" + "not json\n")
    successor = Sidecar(sidecar.fleet, "a", sidecar.paths)
    try:
        assert [(a.id, a.session_id) for _, a in successor.recent_acks] == [(MID, "s1")]
        assert MID2 not in log.read_text(), "entries older than the replay window are dropped"
    finally:
        successor.ctx.term()


def test_hook_spools_acks_while_the_sidecar_is_down_and_the_sidecar_replays_them(sidecar, tmp_path):
    from fleetbus.agents.hook import send_hook, spool_path

    sock = str(sidecar.paths.hook_socket("a"))  # nobody is bound to it
    assert send_hook("prompt-submit", prompt=f"[fleet#{MID} ops -> a] x", session_id="s1", path=sock) is False
    assert send_hook("turn-end", path=sock) is False  # carries no ack: not spooled
    assert len(open(spool_path(sock)).read().splitlines()) == 1
    assert sidecar.replay_spool() == 1
    assert [a.id for a in sidecar.pending_acks] == [MID]
    assert sidecar.state == "unknown", "old events do not change the state"
    assert sidecar.replay_spool() == 0 and not os.path.exists(spool_path(sock))
