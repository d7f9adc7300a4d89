"""The five agent CLIs (pinned in tests/runtimes) in real tmux against the mock model server.

One set of tests, run for every runtime that has a ``tests/rt_<runtime>.py`` case and is
installed (``scripts/install-runtimes``; CI installs them, elsewhere the tests skip with the
reason). Every test starts the runtime from a roster in a private fleet, and checks at the end
that the user's own config files for that runtime are byte-identical.

``FLEETBUS_RT_SENDS`` sets the number of back-to-back sends (default 100).
"""

from __future__ import annotations

import json
import os
import re
import signal
from dataclasses import dataclass

import psutil
import pytest

from conftest import FleetEnv, needs_tmux, wait_for
from fleetbus.adapters import get_adapter
from mockmodel import MockModel
from runtime_cases import RuntimeCase, cases

SENDS = int(os.environ.get("FLEETBUS_RT_SENDS", "100"))
SLOW_S = 8.0
SLOT = "ag"

pytestmark = [needs_tmux, pytest.mark.tmux]


def _params():
    return [pytest.param(c, id=c.runtime, marks=pytest.mark.skipif(
        not c.installed(), reason=f"{c.runtime} CLI ({c.bin}) is not installed: run scripts/install-runtimes"))
        for c in cases()]


@dataclass
class Rt:
    fe: FleetEnv
    model: MockModel
    case: RuntimeCase

    def send(self, body: str, **kw):
        return self.fe.send(SLOT, body, **kw)

    def screen(self) -> str:
        return self.fe.tmux_cmd("capture-pane", "-p", "-t", f"={SLOT}:0.0")

    def reached_model(self, msg_id: str, *, also: str = "") -> bool:
        """The message is in a generation request's last user prompt."""
        return any(f"fleet#{msg_id}" in p and also in p for p in self.model.prompts)

    def in_a_request(self, msg_id: str) -> bool:
        """The message is anywhere in a request body (opencode answers two prompts queued in one
        turn with one request; the older one is an earlier user message there)."""
        return any(f"fleet#{msg_id}" in json.dumps(r["body"]) for r in self.model.requests)

    def state(self) -> str:
        return self.fe.ps()[SLOT].state

    def idle(self) -> bool:
        """Idle by the hook state and by the screen (no busy indicator)."""
        adapter = get_adapter(self.case.runtime)
        return self.state() == "idle" and not (adapter.busy and any(adapter.busy.search(row)
                                                                     for row in self.screen().split("\n")))


@pytest.fixture(params=_params())
def rt(request, make_fleet, tmp_path):
    case: RuntimeCase = request.param
    home, proj = tmp_path / "home", tmp_path / "proj"
    home.mkdir()
    proj.mkdir()
    with MockModel(slow_s=SLOW_S) as model:
        env, user_files = case.prepare(home, proj, model.url)
        before = {f: f.read_bytes() for f in user_files}
        fe = make_fleet(
            f"version: 1\ntenant: rt-{case.runtime}\ntransport: {{kind: tmux, socket: rt}}\n"
            "bus: {heartbeat_ms: 300, liveness: 3, verify_timeout_s: 30}\n"
            # restart "no": the last step kills the runtime and checks DEAD (supervision has its own tests)
            f"agents:\n  - {{name: {SLOT}, runtime: {case.runtime}, workdir: '{proj}', restart: 'no', "
            f"env: {json.dumps(env)}}}\n")
        fe.up()
        r = Rt(fe, model, case)
        try:
            wait_for(lambda: re.search(case.ready, r.screen(), re.M), timeout=90, interval=0.2,
                     what=f"{case.runtime} input line ({case.ready!r})")
        except BaseException:
            print(f"--- {case.runtime} screen ---\n{r.screen()}")
            raise
        wait_for(lambda: fe.ps()[SLOT].heartbeat == "healthy", timeout=30, what="sidecar heartbeat")
        yield r
    for f, content in before.items():
        assert f.read_bytes() == content, f"the user's {case.runtime} config {f} must not change"


def test_sends_accepted_by_runtime_ack(rt):
    """ps is healthy without DRIFT; N sends in a row are accepted by the runtime's own hook;
    multi-line and ~5,700-character messages are accepted as one prompt, never a draft."""
    row = rt.fe.ps()[SLOT]
    assert row.pane == "alive" and row.heartbeat == "healthy" and row.flags == [], row
    counts: dict[tuple, int] = {}
    bad = []
    for i in range(SENDS):
        r = rt.send(f"hello {rt.case.runtime} {i}", verify=True, timeout_s=30)
        key = (r.result, r.evidence)
        counts[key] = counts.get(key, 0) + 1
        if key != ("accepted", "runtime-ack"):
            bad.append((i, r))
            continue
        wait_for(lambda: rt.reached_model(r.id), timeout=30, what=f"send {i} at the model")
        wait_for(rt.idle, timeout=30, what=f"turn {i} end")
    print(f"{rt.case.runtime}: {SENDS} sends -> {counts}")
    assert counts == {("accepted", "runtime-ack"): SENDS}, ([b[1].detail for b in bad[:3]], bad[:3], rt.screen())
    assert "DRIFT" not in rt.fe.ps()[SLOT].flags
    multi = "first line of three\nsecond line\nthird line"
    r = rt.send(multi, verify=True, timeout_s=30)
    assert (r.result, r.evidence) == ("accepted", "runtime-ack"), (r, rt.screen())
    wait_for(lambda: rt.reached_model(r.id, also="third line"), timeout=30, what="multi-line prompt at the model")
    wait_for(lambda: rt.state() == "idle", timeout=30, what="multi-line turn end")
    big = "\n".join(f"line {n}: " + "x" * 60 for n in range(80))  # ~5,700 characters
    r = rt.send(big, verify=True, timeout_s=30)
    assert (r.result, r.evidence) == ("accepted", "runtime-ack"), (r, rt.screen())
    wait_for(lambda: rt.reached_model(r.id, also="line 79: "), timeout=30, what="the whole large prompt at the model")


def test_busy_queued_interrupt_reset_kill(rt):
    """A message typed during a turn is ``queued``, then accepted when the turn ends; interrupt
    stops a turn and the slot is idle; reset is confirmed; killing the runtime shows DEAD."""
    first = rt.send("SLOW first turn", verify=True, timeout_s=30)
    assert (first.result, first.evidence) == ("accepted", "runtime-ack"), first
    wait_for(lambda: rt.state() == "busy", timeout=10, what="busy state from the turn-start hook")
    # a prompt typed before the running turn's model request is merged into it (opencode)
    wait_for(lambda: rt.reached_model(first.id), timeout=30, what="the slow turn's request at the model")
    second = rt.send("typed while busy", verify=True, timeout_s=30)
    assert second.result == "queued", second
    third = rt.send("also typed while busy", verify=True, timeout_s=60, wait="accepted")
    assert (third.result, third.evidence) == ("accepted", "runtime-ack"), third
    assert third.latency_ms > 1000, "taken when the slow turn ended, not when typed"
    wait_for(lambda: rt.in_a_request(second.id) and rt.in_a_request(third.id), timeout=60,
             what="both queued messages at the model")
    wait_for(lambda: rt.state() == "idle", timeout=60, what="idle after the queued turns")

    slow = rt.send("SLOW turn to interrupt", verify=True, timeout_s=30)
    assert slow.result == "accepted", slow
    wait_for(lambda: rt.state() == "busy", timeout=10, what="busy")
    out = rt.fe.cli("interrupt", SLOT, "--json", "--timeout", "20")
    data = json.loads(out.stdout or "{}")
    assert out.returncode == 0 and data.get("was_busy") and data.get("idle"), out
    assert data["waited_ms"] < SLOW_S * 1000 / 2, f"the interrupt stopped the turn, it did not end by itself: {data}"
    wait_for(lambda: rt.state() == "idle", timeout=10, what="idle heartbeat after interrupt")

    out = rt.fe.cli("reset", SLOT, "--json", "--timeout", "30")
    data = json.loads(out.stdout or "{}")
    assert out.returncode == 0 and data.get("confirmed"), out
    after = rt.send("after the reset", verify=True, timeout_s=30)
    assert (after.result, after.evidence) == ("accepted", "runtime-ack"), after
    wait_for(lambda: rt.state() == "idle", timeout=30, what="turn end after reset")

    pid = rt.fe.ps()[SLOT].pid
    proc = psutil.Process(pid)
    for p in [*proc.children(recursive=True), proc]:  # the runtime's whole process tree
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    row = wait_for(lambda: (r := rt.fe.ps()[SLOT]) and "DEAD" in r.flags and r, timeout=20, what="DEAD flag")
    assert row.pane == "dead", row
    r = rt.send("to a dead runtime", verify=True)
    assert (r.result, r.code) == ("rejected", "slot-dead"), r
