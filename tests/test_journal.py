"""The journal and the router's recovery decisions (memory transport: fast and exact).

The same guarantees are proven end to end with kill -9 on real tmux in test_redelivery.py.
"""

from __future__ import annotations

import sqlite3
import time

import anyio
import pytest

from fleetbus import protocol as P
from fleetbus.config import parse_roster
from fleetbus.paths import fleet_paths
from fleetbus.router.journal import Journal, JournalError, MessageRecord
from fleetbus.router.server import Router
from fleetbus.transports.memory import MemoryPane, MemoryTransport


def test_journal_is_wal_with_full_sync_and_private(tmp_path):
    j = Journal(tmp_path / "s" / "journal.sqlite3", tenant="t", host="h")
    assert j.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert j.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert (tmp_path / "s" / "journal.sqlite3").stat().st_mode & 0o077 == 0
    j.close()


def test_states_history_and_idempotency_keys(tmp_path):
    j = Journal(tmp_path / "j.sqlite3", tenant="t", host="h")
    rec, created = j.add_message(MessageRecord(id="m1", slot="a", sender="ops", body="hi", idempotency_key="k"))
    assert created
    same, created = j.add_message(MessageRecord(id="m2", slot="a", sender="ops", body="hi", idempotency_key="k"))
    assert not created and same.id == "m1", "a key maps to one message"
    j.set_state(rec, "typing", pane_pid=42)
    j.set_state(rec, "accepted", evidence="runtime-ack", result={"result": "accepted"})
    j.slot_event("a", "exited", exit_status=1, last_lines=["boom"])
    assert j.get("m1").state == "accepted" and j.get("m1").result == {"result": "accepted"}
    assert j.get("m2") is None and j.unfinished() == []
    hist = j.history("a")
    assert [(h["kind"], h["state"]) for h in hist] == [("message", "queued"), ("message", "typing"),
                                                       ("message", "accepted"), ("slot", "exited")]
    assert all(h["tenant_id"] == "t" and h["host"] == "h" for h in hist)
    assert j.last_slot_event("a")["data"]["last_lines"] == ["boom"]
    assert [c["state"] for c in j.changes_of("m1")] == ["queued", "typing", "accepted"]
    j.close()
    ro = Journal(tmp_path / "j.sqlite3", readonly=True)
    assert len(ro.history()) == 4
    with pytest.raises(sqlite3.OperationalError):
        ro.db.execute("DELETE FROM changes")
    ro.close()
    with pytest.raises(JournalError):
        Journal(tmp_path / "missing.sqlite3", readonly=True)


# -- recovery decisions on the memory transport ------------------------------------------------


def _router(tmp_path, runtime: str = "stub") -> Router:
    fleet = parse_roster({"version": 1, "tenant": "mem", "transport": {"kind": "memory"},
                          "bus": {"verify_timeout_s": 0.5},
                          "agents": [{"name": "s", "runtime": runtime}]}, base_dir=tmp_path)
    t = MemoryTransport()
    t.panes["s"] = MemoryPane(prompt="stub> " if runtime == "stub" else "$ ", command="python3", pid=777)
    return Router(fleet, fleet_paths("mem", "memj", env={"FLEETBUS_HOME": str(tmp_path)}), transport=t,
                  spawn_sidecars=False)


def _left_by_a_dead_router(router: Router, state: str, body: str = "hello") -> MessageRecord:
    rec, _ = router.journal.add_message(MessageRecord(id="abcdef012345", slot="s", sender="ops", body=body,
                                                      options={"verify": True}))
    if state != "queued":
        router.journal.set_state(rec, "typing", pane_pid=777)
    if state == "injected":
        router.journal.set_state(rec, "injected")
    return rec


def _run_recovery(router: Router, until_final: str, extra=None) -> None:
    async def main():
        async with router.delivering():
            if extra is not None:
                await extra()
            with anyio.fail_after(10):
                while router.journal.get(until_final).state not in ("accepted", "unconfirmed", "draft", "rejected"):
                    await anyio.sleep(0.02)
    anyio.run(main, backend="asyncio")


def test_recovered_queued_message_is_typed(tmp_path):
    router = _router(tmp_path)
    rec = _left_by_a_dead_router(router, "queued")
    _run_recovery(router, rec.id)
    assert router.journal.get(rec.id).state == "accepted"
    assert len(router.transport.delivered) == 1


def test_typing_but_not_in_the_pane_of_a_line_history_runtime_is_typed_once(tmp_path):
    router = _router(tmp_path, "stub")
    rec = _left_by_a_dead_router(router, "typing")
    _run_recovery(router, rec.id)
    assert router.journal.get(rec.id).state == "accepted"
    assert [t for _, t in router.transport.delivered] == ["[fleet#abcdef012345 ops -> s] hello"]
    assert "typing it now" in str(router.journal.changes_of(rec.id))


def test_typing_and_already_in_the_pane_is_never_typed_again(tmp_path):
    router = _router(tmp_path, "stub")
    rec = _left_by_a_dead_router(router, "typing")
    router.transport.panes["s"].rows.append("stub> [fleet#abcdef012345 ops -> s] hello")  # it did arrive
    _run_recovery(router, rec.id)
    assert router.journal.get(rec.id).state == "accepted"
    assert router.transport.delivered == []


def test_typing_draft_in_the_input_line_gets_only_a_submit_key(tmp_path):
    router = _router(tmp_path, "stub")
    rec = _left_by_a_dead_router(router, "typing")
    router.transport.panes["s"].typed = "[fleet#abcdef012345 ops -> s] hello"  # pasted, Enter never sent
    _run_recovery(router, rec.id)
    assert router.journal.get(rec.id).state == "accepted"
    assert router.transport.delivered == [] and ("s", ("Enter",)) in router.transport.keys


def test_typing_into_a_pane_that_was_restarted_is_unconfirmed_not_retyped(tmp_path):
    router = _router(tmp_path, "stub")
    rec = _left_by_a_dead_router(router, "typing")
    router.transport.panes["s"].pid = 778  # another process: its scrollback proves nothing
    _run_recovery(router, rec.id)
    assert router.journal.get(rec.id).state == "unconfirmed"
    assert router.transport.delivered == []


def test_typing_on_a_redrawing_runtime_without_evidence_is_unconfirmed(tmp_path):
    router = _router(tmp_path, "claude")
    router.transport.panes["s"].prompt = "❯ "
    rec = _left_by_a_dead_router(router, "typing")
    _run_recovery(router, rec.id)
    r = router.journal.get(rec.id)
    assert r.state == "unconfirmed" and "not typed again" in r.result["detail"]
    assert router.transport.delivered == []


def test_injected_then_a_replayed_ack_is_accepted(tmp_path):
    router = _router(tmp_path, "claude")
    router.transport.panes["s"].prompt = "❯ "
    rec = _left_by_a_dead_router(router, "injected")
    router.journal.set_state(rec, "unconfirmed")  # a previous router gave up on it

    async def ack():
        router._on_ack("s", P.Ack(id=rec.id, session_id="sess-1"))

    _run_recovery(router, rec.id, extra=ack)
    r = router.journal.get(rec.id)
    assert r.state == "accepted" and r.result["evidence"] == "runtime-ack" and "late ack" in r.result["detail"]


def test_ttl_ends_in_dead_letter_and_nothing_is_typed(tmp_path):
    router = _router(tmp_path)
    del router.transport.panes["s"]

    async def main():
        async with router.delivering():
            r = await router.send(P.SendRequest(req="r", to="s", body="later", when="available", ttl_s=0.3))
            assert (r.result, r.held_by, r.code) == ("queued", "fleetbus", "slot-down")
            with anyio.fail_after(5):
                while router.journal.get(r.id).state != "dead-letter":
                    await anyio.sleep(0.05)
            return r

    r = anyio.run(main, backend="asyncio")
    assert router.journal.get(r.id).result["code"] == "ttl-expired"
    assert router.transport.delivered == []


def test_duplicate_key_answers_the_first_result(tmp_path):
    router = _router(tmp_path, "stub")

    async def main():
        async with router.delivering():
            a = await router.send(P.SendRequest(req="1", to="s", body="x", idempotency_key="key-1"))
            b = await router.send(P.SendRequest(req="2", to="s", body="x", idempotency_key="key-1"))
            c = await router.send(P.SendRequest(req="3", to="s", body="y", idempotency_key="key-1"))
            return a, b, c

    a, b, c = anyio.run(main, backend="asyncio")
    assert a.result == "accepted" and b.duplicate and b.id == a.id and b.result == "accepted"
    assert (c.result, c.code) == ("rejected", "idempotency-conflict")
    assert len(router.transport.delivered) == 1


def test_messages_for_one_slot_are_typed_in_order_one_at_a_time(tmp_path):
    router = _router(tmp_path, "stub")
    typing_now = []
    orig = router.transport.deliver

    async def deliver(slot, text, submit):
        typing_now.append(text)
        assert len(typing_now) == 1, "two messages typed into one pane at once"
        await anyio.sleep(0.01)
        await orig(slot, text, submit)
        typing_now.pop()

    router.transport.deliver = deliver

    async def main():
        async with router.delivering():
            async with anyio.create_task_group() as tg:
                for i in range(20):
                    tg.start_soon(router.send, P.SendRequest(req=str(i), to="s", body=f"m{i:02d}"))
                    await anyio.sleep(0)

    t0 = time.monotonic()
    anyio.run(main, backend="asyncio")
    assert [t.rsplit(" ", 1)[1] for _, t in router.transport.delivered] == [f"m{i:02d}" for i in range(20)]
    assert time.monotonic() - t0 < 10


def test_tasks_table_keeps_state_options_and_keys(tmp_path):
    """A task's state, slot, message and options (its delivery attempt, which names its
    message's idempotency key after a router restart) survive reopening the journal."""
    from fleetbus.router.journal import TaskRecord

    j = Journal(tmp_path / "j.sqlite3")
    rec = TaskRecord(id="t000000000001", selector="idle:reviewer", body="review", idempotency_key="k1",
                     options={"attempt": 0, "wait_s": 5.0})
    recs, created = j.add_tasks([rec])
    assert created
    again, created = j.add_tasks([TaskRecord(id="t000000000002", selector="x", body="y", idempotency_key="k1")])
    assert not created and again[0].id == rec.id
    rec.slot, rec.message_id, rec.options["attempt"] = "r0", "m1", 1
    j.set_task(rec, "assigned", result={"assigned_at": 1.0})
    j.close()
    j = Journal(tmp_path / "j.sqlite3")
    got = j.open_tasks()
    assert [(t.id, t.state, t.slot, t.message_id, t.options["attempt"]) for t in got] == \
        [("t000000000001", "assigned", "r0", "m1", 1)]
    assert [c["state"] for c in j.changes_of(rec.id)] == ["published", "assigned"]
    assert j.task_counts() == {"assigned": 1}
