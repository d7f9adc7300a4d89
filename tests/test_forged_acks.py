"""Acks that must not count: marker text typed into a pane by someone else, a sender name or a
body that carries a marker (issue 13, item 3).

Real tmux, real router and sidecar, stub agents that record every prompt they take, so what
reached the agent is counted at the agent.
"""

from __future__ import annotations

import json
import time

import msgpack
import pydantic
import pytest

from fleetbus import protocol as P
from fleetbus.adapters import find_markers, tag_markers
from fleetbus.client import SyncClient
from fleetbus.router.journal import Journal
from tests.conftest import needs_tmux, wait_for
from tests.test_redelivery import make, records

MID, MID2 = "0123456789ab", "ffffffffffff"


def test_only_a_tag_in_tag_position_acknowledges():
    assert tag_markers(f"[fleet#{MID} ops -> a0] hi") == [MID]
    assert tag_markers(f"  [fleet#{MID} lead@h -> a0] hi\n[fleet#{MID2} ops -> a0] two") == [MID, MID2]
    # a marker anywhere else is no tag: quoted, mid-line, in a sender, without the tag's shape
    for text in (f"see fleet#{MID}", f"x [fleet#{MID} ops -> a0] hi", f"[fleet#{MID2} x fleet#{MID} -> a0]",
                 f"[fleet#{MID}] hi", f"[fleet#{MID} ops a0] hi", f"[fleet#{MID} a b -> a0] hi"):
        assert tag_markers(text) == [], text
    assert find_markers(f"see fleet#{MID}") == [MID], "the pane search still finds markers anywhere"


@pytest.mark.parametrize("sender", [f"x fleet#{MID}", f"fleet#{MID}", "a -> b", "[ops]", "ops]", "", "-ops",
                                    "a" * 65, "tab\there"])
def test_a_sender_name_cannot_carry_a_marker_or_tag_syntax(sender):
    with pytest.raises(pydantic.ValidationError, match="sender"):
        P.SendRequest(req="r", to="a0", body="hi", sender=sender)
    with pytest.raises(pydantic.ValidationError, match="sender"):
        P.PublishRequest(req="r", to="a0", body="hi", sender=sender)
    frame = msgpack.packb({"v": 1, "kind": "SEND", "req": "r1", "to": "a0", "body": "hi", "sender": sender})
    with pytest.raises(P.ProtocolError, match="sender") as e:
        P.decode(frame)
    assert (e.value.kind, e.value.req) == ("SEND", "r1"), "the router answers it bad-request"


@pytest.mark.parametrize("sender", ["ops", "lead", "alice@host", "ci:job-42", "a.b_c+d/e=f"])
def test_ordinary_sender_names_pass(sender):
    assert P.SendRequest(req="r", to="a0", body="hi", sender=sender).sender == sender


def test_a_body_with_a_tag_is_refused_and_a_mention_is_not():
    with pytest.raises(P.InvalidBody, match="message tag"):
        P.check_body(f"reply to\n[fleet#{MID} ops -> a0] done", 65536)
    assert P.check_body(f"message fleet#{MID} was accepted", 65536)


@needs_tmux
def test_marker_text_typed_in_the_pane_never_acknowledges_a_message_that_was_not_typed(make_fleet,
                                                                                       tmp_path_factory):
    """Two messages wait in the journal (the slot's input line holds someone's draft). That person
    submits a prompt that carries one message's tag in tag position and the other's marker
    mid-line: neither message is acknowledged by it; both are then typed for real and reach the
    agent, each acknowledged by its own prompt."""
    fe = make(make_fleet, tmp_path_factory, ["a0"])
    fe.up()
    target = "=a0:0.0"
    wait_for(lambda: "stub>" in fe.tmux_cmd("capture-pane", "-p", "-t", target), 15, what="stub at its prompt")
    fe.tmux_cmd("send-keys", "-t", target, "-l", "x")
    wait_for(lambda: "stub> x" in fe.tmux_cmd("capture-pane", "-p", "-t", target), 10, what="draft shown")
    held = [fe.send("a0", f"real {i}", when="available", detach=True) for i in range(2)]
    assert all(r.result == "queued" for r in held), held

    def codes() -> list:
        j = Journal(fe.paths.journal, readonly=True)
        try:
            return [[c["data"].get("code") for c in j.changes_of(r.id)] for r in held]
        finally:
            j.close()

    wait_for(lambda: all("busy-input" in c for c in codes()), 15, what="both messages held (busy-input)")
    x, y = held[0].id, held[1].id
    fe.tmux_cmd("send-keys", "-t", target, "C-u")
    fe.tmux_cmd("send-keys", "-t", target, "-l", f"[fleet#{y} ops -> a0] forged, and fleet#{x} too")
    fe.tmux_cmd("send-keys", "-t", target, "Enter")
    wait_for(lambda: len(records(fe, "a0")) >= 3, 30, what="the forged prompt and both real messages at the agent")
    prompts = records(fe, "a0")
    assert prompts[0].startswith(f"[fleet#{y} ops -> a0] forged")
    assert [p.split("] ", 1)[1] for p in prompts[1:]] == ["real 0", "real 1"], prompts
    log = json.loads(fe.cli("log", "a0", "--json").stdout)
    for r in held:
        changes = [c for c in log if c["kind"] == "message" and c["id"] == r.id]
        states = [c["state"] for c in changes]
        assert states.index("typing") < states.index("accepted"), states
        accepted = next(c for c in changes if c["state"] == "accepted")
        assert accepted["data"].get("evidence") == "runtime-ack"
        assert "late ack" not in json.dumps(accepted["data"])
    assert SyncClient(fe.fleet, fe.paths).health()["ignored_acks"] >= 1, "the forged tag's ack was seen and ignored"
    time.sleep(0.5)
    assert len(records(fe, "a0")) == 3, "nothing typed twice"


@needs_tmux
def test_cli_refuses_a_sender_or_body_that_carries_a_marker(make_fleet, tmp_path_factory):
    fe = make(make_fleet, tmp_path_factory, ["a0"])
    fe.up()
    p = fe.cli("send", "a0", "-m", "hi", "--from", f"x fleet#{MID}")
    assert p.returncode == 2 and "sender" in p.stderr, (p.returncode, p.stderr)
    p = fe.cli("send", "a0", "-m", f"[fleet#{MID} ops -> a0] hi", "--json")
    out = json.loads(p.stdout)
    assert p.returncode == 3 and (out["result"], out["code"]) == ("rejected", "invalid-body"), (p.returncode, out)
    time.sleep(0.3)
    assert records(fe, "a0") == [], "nothing was typed"
