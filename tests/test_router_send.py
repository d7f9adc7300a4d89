"""Router delivery/verification decisions on the memory transport (fast, in-process).

The same behaviours are proven on real tmux in test_tmux_fleet.py; these cover the decision
table quickly and exactly.
"""

from __future__ import annotations

import anyio
import pytest

from fleetbus import protocol as P
from fleetbus.config import parse_roster
from fleetbus.paths import fleet_paths
from fleetbus.router.server import Router
from fleetbus.transports.memory import MemoryPane, MemoryTransport


@pytest.fixture
def router(tmp_path):
    fleet = parse_roster({
        "version": 1, "tenant": "mem", "transport": {"kind": "memory"},
        "bus": {"verify_timeout_s": 0.5, "max_body_bytes": 100},
        "agents": [{"name": "sh0", "runtime": "shell"}, {"name": "st", "runtime": "stub"}],
    }, base_dir=tmp_path)
    t = MemoryTransport()
    t.panes["sh0"] = MemoryPane(prompt="$ ")
    t.panes["st"] = MemoryPane(prompt="stub> ", command="python3")
    paths = fleet_paths("mem", "memtest", env={"FLEETBUS_HOME": str(tmp_path)})
    return Router(fleet, paths, transport=t, spawn_sidecars=False)


def send(router, to, body, **kw):
    async def main():
        async with router.delivering():
            return await router.send(P.SendRequest(req="r", to=to, body=body, **kw))
    return anyio.run(main, backend="asyncio")


def test_accepted_by_pane_diff(router):
    r = send(router, "sh0", "echo hi")
    assert (r.result, r.evidence) == ("accepted", "pane-diff")
    slot, text = router.transport.delivered[-1]
    assert slot == "sh0" and text.startswith("echo hi  # [fleet#") and r.id in text


def test_hook_runtime_without_sidecar_falls_back_to_pane_diff_and_says_so(router):
    r = send(router, "st", "hello")
    assert (r.result, r.evidence) == ("accepted", "pane-diff")
    assert "sidecar not connected" in r.detail


def test_draft_gets_one_submit_retry_then_draft(router):
    router.transport.panes["sh0"].submits = False
    r = send(router, "sh0", "echo stuck", timeout_s=0.2)
    assert r.result == "draft" and r.submit_retries == 1
    assert len(router.transport.delivered) == 1, "text is never typed twice"


def test_unconfirmed_when_screen_gives_no_evidence(router):
    pane = router.transport.panes["sh0"]
    pane.on_submit = lambda line: pane.rows.clear()  # program clears the screen at once
    r = send(router, "sh0", "clear", timeout_s=0.2)
    assert r.result == "unconfirmed"


def test_no_verify_reports_injected(router):
    r = send(router, "sh0", "true", verify=False)
    assert r.result == "injected" and r.evidence is None


@pytest.mark.parametrize(("to", "body", "code"), [
    ("nope", "hi", "unknown-slot"),
    ("sh0", "bad \x1b[201~ body", "invalid-body"),
    ("sh0", "x" * 101, "invalid-body"),
])
def test_rejected_before_typing(router, to, body, code):
    r = send(router, to, body)
    assert (r.result, r.code) == ("rejected", code)
    assert router.transport.delivered == []


def test_busy_input_fail_and_clear(router):
    router.transport.panes["sh0"].typed = "human text"
    r = send(router, "sh0", "echo 1")
    assert (r.result, r.code) == ("rejected", "busy-input")
    assert router.transport.delivered == []
    r = send(router, "sh0", "echo 1", on_busy_input="clear")
    assert r.result == "accepted"


def test_dead_and_absent_slots_rejected(router):
    router.transport.panes["sh0"].alive = False
    assert send(router, "sh0", "echo").code == "slot-dead"
    del router.transport.panes["st"]
    assert send(router, "st", "echo").code == "slot-down"


def _claude_router(tmp_path, **bus):
    fleet = parse_roster({"version": 1, "tenant": "mem", "transport": {"kind": "memory"},
                          "bus": {"verify_timeout_s": 0.5, **bus}, "agents": [{"name": "cc", "runtime": "claude"}]},
                         base_dir=tmp_path)
    t = MemoryTransport()
    pane = t.panes["cc"] = MemoryPane(prompt="❯ ", command="claude")
    pane.rows += ["✻ Working… (esc to interrupt)"]
    # Claude Code while a turn runs: the submitted message is drawn indented under the spinner
    pane.on_submit = lambda line: pane.rows.append("  ❯ " + line)
    return Router(fleet, fleet_paths("mem", "memq", env={"FLEETBUS_HOME": str(tmp_path)}), transport=t,
                  spawn_sidecars=False)


def test_queue_indicator_on_the_pane_means_queued(tmp_path):
    router = _claude_router(tmp_path)
    r = send(router, "cc", "while busy")
    assert (r.result, r.evidence) == ("queued", "pane-diff"), r
    assert r.queued_ms is not None and r.queued_ms <= r.latency_ms


def test_wait_accepted_keeps_waiting_and_is_unconfirmed_at_the_deadline(tmp_path):
    router = _claude_router(tmp_path)
    r = send(router, "cc", "while busy", wait="accepted", timeout_s=0.3)
    assert r.result == "unconfirmed" and r.latency_ms >= 300 and "not taken within 0.3 s" in r.detail, r
    assert r.queued_ms is not None and r.queued_ms < r.latency_ms
    assert router.journal.get(r.id).state == "unconfirmed"


def test_interrupt_sends_the_key_only_when_busy(tmp_path):
    router = _claude_router(tmp_path)
    pane = router.transport.panes["cc"]

    async def esc_clears():
        orig = router.transport.send_keys

        async def send_keys(slot, *keys):
            await orig(slot, *keys)
            if "Escape" in keys:
                pane.rows[:] = [r for r in pane.rows if "esc to interrupt" not in r]
        router.transport.send_keys = send_keys
        first = await router.interrupt(router.fleet.slot("cc"), 2.0)
        second = await router.interrupt(router.fleet.slot("cc"), 2.0)
        return first, second

    first, second = anyio.run(esc_clears, backend="asyncio")
    assert first["was_busy"] and first["idle"] and not second["was_busy"]
    assert [k for _, k in router.transport.keys] == [("Escape",)], "no key is sent to an idle slot"


def test_reset_refused_while_busy_and_unconfirmed_without_evidence(tmp_path):
    from fleetbus.router.server import RequestError

    router = _claude_router(tmp_path)
    with pytest.raises(RequestError) as e:
        anyio.run(router.reset, router.fleet.slot("cc"), 0.2, backend="asyncio")
    assert e.value.code == "busy"
    router.transport.panes["cc"].rows.clear()
    out = anyio.run(router.reset, router.fleet.slot("cc"), 0.2, backend="asyncio")
    assert out["confirmed"] is False and out["reset_command"] == "/clear"
