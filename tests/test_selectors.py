"""Task selectors and the dispatcher's notion of a free slot, without tmux (fake router parts)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from fleetbus.config import parse_roster
from fleetbus.router.journal import TaskRecord
from fleetbus.router.tasks import Dispatcher, SelectorError, parse_selector

ROSTER = {"version": 1, "agents": [
    {"name": "idle0", "runtime": "stub", "class": "rev"},
    {"name": "r1", "runtime": "stub", "class": "rev"},
    {"name": "sh0", "runtime": "shell", "class": "sh"},
]}


@pytest.mark.parametrize("text,kind,value", [
    ("r1", "name", "r1"), ("idle0", "name", "idle0"), ("idle", "idle", None), ("idle:rev", "idle", "rev"),
    ("class:rev", "class", "rev"), ("all:rev", "all", "rev"), ("  r1 ", "name", "r1"),
])
def test_parse_selector(text, kind, value):
    sel = parse_selector(text)
    assert (sel.kind, sel.value) == (kind, value)


@pytest.mark.parametrize("text,msg", [("", "empty selector"), ("role:rev", "unknown selector prefix 'role'"),
                                      ("class:", "names no class"), ("all:", "names no class")])
def test_parse_selector_errors(text, msg):
    with pytest.raises(SelectorError, match=msg):
        parse_selector(text)


def dispatcher(states: dict[str, str]) -> Dispatcher:
    fleet = parse_roster(ROSTER)
    peers = {n: SimpleNamespace(stale=False, state=s) for n, s in states.items()}
    return Dispatcher(SimpleNamespace(fleet=fleet, table=SimpleNamespace(peers=peers)))


def task(d: Dispatcher, selector: str, target: str | None = None):
    return d._adopt(TaskRecord(id="t0", selector=selector, body="x", options={"target": target}))


def test_matching_names_classes_and_hookless_slots():
    d = dispatcher({})
    assert d.matching(parse_selector("class:rev")) == (["idle0", "r1"], "")
    assert d.matching(parse_selector("idle")) == (["idle0", "r1"], "")
    names, why = d.matching(parse_selector("class:sh"))
    assert names == [] and "sh0: runtime 'shell' has no hooks" in why
    names, why = d.matching(parse_selector("nobody"))
    assert names == [] and "no slot named 'nobody'" in why
    names, why = d.matching(parse_selector("idle:qa"))
    assert names == [] and "roster classes: rev, sh" in why


def test_only_idle_selectors_require_an_idle_report():
    """A runtime that has not reported a state yet may take a named or class task, not an idle
    one; a slot whose name starts with "idle" is a name, not an idle selector."""
    d = dispatcher({"idle0": "unknown", "r1": "busy"})
    named = task(d, "idle0", target="idle0")
    assert d._why_not(named, "idle0", 0.0) is None
    assert d._why_not(task(d, "class:rev"), "idle0", 0.0) is None
    assert d._why_not(task(d, "idle:rev"), "idle0", 0.0) == "runtime unknown"
    assert d._why_not(task(d, "class:rev"), "r1", 0.0) == "runtime busy"
    d.holding["idle0"].append("t9")
    assert d._why_not(named, "idle0", 0.0) == "holds task t9"
