"""Task routing on a real tmux server with stub agents: selectors, lifecycle, events, death.

Each test starts its own fleet (private tmux socket and FLEETBUS_HOME) through ``make_fleet``.
The stub agent (``fleet-stub``) reports ``prompt-submit``/``turn-start``/``turn-end`` through the
hook path after ``--think-ms`` ms, so a task's ``done`` is the stub's real turn-complete.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict

import anyio
import pytest
from conftest import needs_tmux, wait_for

from fleetbus import protocol as P
from fleetbus.client import Fleet, RequestFailed, SyncFleet
from fleetbus.router.journal import Journal

pytestmark = [needs_tmux, pytest.mark.tmux]


def roster(*agents: str, bus: str = "{heartbeat_ms: 200, liveness: 3, verify_timeout_s: 8}") -> str:
    return "\n".join(["version: 1", "tenant: tk", "transport: {kind: tmux, socket: it}", f"bus: {bus}", "agents:"]
                     + [f"  - {a}" for a in agents]) + "\n"


def stub(name: str, cls: str, think_ms: int = 400, extra: str = "", record: str | None = None) -> str:
    rec = f', --record, "{record}"' if record else ""
    return (f'{{name: {name}, runtime: stub, class: {cls}, '
            f'command: [fleet-stub, --think-ms, "{think_ms}"{rec}]{extra}}}')


def run(fn):
    return anyio.run(fn, backend="asyncio")


def test_ten_tasks_to_three_idle_reviewers(make_fleet, tmp_path):
    """Ten tasks to ``idle:reviewer``: never two at once on a slot, all done, events in order."""
    records = {n: tmp_path / f"{n}.jsonl" for n in ("r0", "r1", "r2")}
    fe = make_fleet(roster(*(stub(n, "reviewer", 600, record=str(p)) for n, p in records.items()),
                           stub("w0", "writer")))
    fe.up()

    async def main():
        async with Fleet.connect(fe.fleet) as fleet:
            async with fleet.events(kinds=["task"]) as events:
                seen: list[P.Event] = []

                async def collect():
                    async for ev in events:
                        seen.append(ev)

                async with anyio.create_task_group() as tg:
                    tg.start_soon(collect)
                    published = [await fleet.publish("idle:reviewer", f"review change {i}") for i in range(10)]
                    done = [await fleet.task(t.id, wait="done", timeout_s=120) for t in published]
                    await anyio.sleep(0.3)  # the last events are on their way
                    tg.cancel_scope.cancel()
                return published, done, seen

    published, done, seen = run(main)
    assert [t.state for t in published] == ["published"] * 10
    assert all(t.state == "done" for t in done), [(t.id, t.state, t.code, t.detail) for t in done]
    assert {t.slot for t in done} <= {"r0", "r1", "r2"}
    assert len({t.slot for t in done}) == 3, "every idle reviewer took work"
    # each task's events: published, assigned, accepted, done, in that order and nothing else
    by_task = defaultdict(list)
    for ev in seen:
        by_task[ev.data["id"]].append(ev.data["state"])
    for t in done:
        assert by_task[t.id] == ["published", "assigned", "accepted", "done"], (t.id, by_task[t.id])
    seqs = [ev.seq for ev in seen]
    assert seqs == sorted(seqs)
    # never two tasks at once on one slot: intervals [assigned, done] per slot do not overlap
    spans = defaultdict(list)
    for t in done:
        spans[t.slot].append((t.assigned_at, t.finished_at))
    for slot, s in spans.items():
        s.sort()
        for (a0, f0), (a1, _f1) in zip(s, s[1:]):
            assert a1 >= f0, f"{slot} held two tasks at once: {s}"
    # and the stubs themselves took exactly these prompts, once each
    taken = [json.loads(line)["prompt"] for p in records.values() for line in p.read_text().splitlines()]
    assert sorted(taken) == sorted(f"[fleet#{t.message_id} ops -> {t.slot}] review change {i}"
                                   for i, t in enumerate(done)), taken
    # the writer never got a reviewer's task
    assert "w0" not in {t.slot for t in done}
    # the journal holds every task done, with its history
    j = Journal(fe.paths.journal, readonly=True)
    assert j.task_counts() == {"done": 10}
    assert [c["state"] for c in j.changes_of(done[0].id)] == ["published", "assigned", "accepted", "done"]


def test_selector_that_matches_nothing(make_fleet):
    """No slot of the class, no such slot, a bad selector: clear failures at once; a class whose
    only slot is busy: a bounded wait, then ``timed-out`` / ``no-slot``."""
    fe = make_fleet(roster(stub("r0", "reviewer", 4000), "{name: sh0, runtime: shell, class: shells}"))
    fe.up()

    async def main():
        async with Fleet.connect(fe.fleet) as fleet:
            t0 = time.monotonic()
            nomatch = await fleet.publish("idle:tester", "x", wait="done")
            noname = await fleet.publish("nobody", "x", wait="done")
            hookless = await fleet.publish("class:shells", "x", wait="done")
            quick = time.monotonic() - t0
            with pytest.raises(RequestFailed) as bad:
                await fleet.publish("role:reviewer", "x")
            with pytest.raises(RequestFailed) as ctl:
                await fleet.publish("r0", "bad \x1b[31m body")
            first = await fleet.publish("r0", "a long one", wait="accepted")
            t1 = time.monotonic()
            waited = await fleet.publish("idle:reviewer", "second", wait_s=1.0, wait="done")
            return nomatch, noname, hookless, quick, bad.value, ctl.value, first, waited, time.monotonic() - t1

    nomatch, noname, hookless, quick, bad, ctl, first, waited, waited_s = run(main)
    assert (nomatch.state, nomatch.code) == ("failed", "no-match")
    assert "no slot of class 'tester'" in nomatch.detail and "reviewer" in nomatch.detail
    assert (noname.state, noname.code) == ("failed", "no-match") and "no slot named 'nobody'" in noname.detail
    assert (hookless.state, hookless.code) == ("failed", "no-match") and "has no hooks" in hookless.detail
    assert quick < 3
    assert bad.code == "bad-selector" and "unknown selector prefix 'role'" in str(bad)
    assert ctl.code == "invalid-body"
    assert first.state == "accepted" and first.slot == "r0"
    assert (waited.state, waited.code) == ("timed-out", "no-slot")
    assert "r0: holds task" in waited.detail
    assert 0.9 <= waited_s < 5


def test_slot_dying_mid_task_fails_it_with_the_reason(make_fleet):
    fe = make_fleet(roster(stub("r0", "reviewer", 30_000, extra=", restart: 'no'")))
    fe.up()

    async def main():
        async with Fleet.connect(fe.fleet) as fleet:
            async with fleet.events(kinds=["task", "slot"], slot="r0") as events:
                t = await fleet.publish("class:reviewer", "a task that never ends", wait="accepted")
                assert t.state == "accepted"
                pid = next(r.pid for r in await fleet.ps() if r.slot == "r0")
                assert next(r.task for r in await fleet.ps() if r.slot == "r0") == t.id
                os.kill(pid, signal.SIGKILL)
                end = await fleet.task(t.id, wait="done", timeout_s=30)
                got = []
                with anyio.move_on_after(5):
                    async for ev in events:
                        got.append(ev)
                        if ev.topic == "task" and ev.data["state"] == "failed":
                            break
                return t, end, got

    t, end, got = run(main)
    assert (end.state, end.code) == ("failed", "slot-died"), end
    assert "its runtime exited" in end.detail and "signal 9" in end.detail
    failed = [e for e in got if e.topic == "task" and e.data["state"] == "failed"]
    assert failed and failed[0].data["code"] == "slot-died" and "signal 9" in failed[0].data["detail"]
    exited = [e for e in got if e.topic == "slot" and e.data.get("event") == "exited"]
    assert exited and exited[0].seq < failed[0].seq, "the slot event comes first, then the task's failure"


def test_cli_publish_events_and_broadcast(make_fleet):
    """``fleet publish --wait done --json``, ``all:<class>``, exit codes, and ``fleet events --json``."""
    fe = make_fleet(roster(stub("r0", "reviewer", 200), stub("r1", "reviewer", 200)))
    fe.up()
    ev_proc = subprocess.Popen([sys.executable, "-m", "fleetbus", "--roster", str(fe.roster), "events", "--json",
                                "--kind", "task"], env=fe.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(2.0)  # `fleet events` starts and confirms its subscription with a probe
        r = fe.cli("publish", "-m", "look at this", "--to", "idle:reviewer", "--wait", "done", "--json")
        assert r.returncode == 0, r.stderr
        task = json.loads(r.stdout)
        assert task["state"] == "done" and task["slot"] in ("r0", "r1")
        b = fe.cli("publish", "-m", "everyone", "--to", "all:reviewer", "--wait", "done", "--json")
        assert b.returncode == 0, b.stderr
        group = json.loads(b.stdout)
        assert sorted(t["slot"] for t in group) == ["r0", "r1"] and {t["state"] for t in group} == {"done"}
        assert len({t["group"] for t in group}) == 1
        nm = fe.cli("publish", "-m", "x", "--to", "class:nobody")
        assert nm.returncode == 3 and "no-match" in nm.stdout + nm.stderr
        bad = fe.cli("publish", "-m", "x", "--to", "what:ever")
        assert bad.returncode == 2 and "bad-selector" in bad.stderr
        to = fe.cli("publish", "-m", "x", "--to", "r0", "--wait-s", "0", "--allow-busy", "--wait", "accepted")
        assert to.returncode == 0, to.stdout + to.stderr
        human = fe.cli("publish", "-m", "y", "--to", "class:reviewer")
        assert human.returncode == 0 and "published" in human.stdout
        time.sleep(1.0)
    finally:
        ev_proc.send_signal(signal.SIGINT)
        out, err = ev_proc.communicate(timeout=10)
    assert ev_proc.returncode == 0, err
    lines = [json.loads(x) for x in out.splitlines()]
    assert lines and all(e["topic"] == "task" for e in lines)
    states = [e["data"]["state"] for e in lines if e["data"]["id"] == task["id"]]
    assert states == ["published", "assigned", "accepted", "done"]
    tl = fe.cli("tasks", "--json")
    assert tl.returncode == 0
    assert {t["id"] for t in json.loads(tl.stdout)} >= {task["id"], *(t["id"] for t in group)}


def test_sync_facade_and_reset_between_tasks(make_fleet):
    fe = make_fleet(roster(stub("r0", "reviewer", 200, extra=", reset_between_tasks: true, "
                                "kickstart: 'Task {task_id} from {sender}: {body}'")))
    fe.up()
    with SyncFleet.connect(str(fe.roster)) as fleet:
        with fleet.events(kinds=["slot"], slot="r0") as events:
            t1 = fleet.publish("r0", "first", wait="done")
            t2 = fleet.publish("r0", "second", wait="done", sender="lead")
            resets = []
            for ev in events:
                if ev.data.get("event") == "reset":
                    resets.append(ev)
                    if len(resets) == 2:
                        break
    assert t1.state == t2.state == "done"
    assert all(e.data["confirmed"] for e in resets)
    text = fe.tmux_cmd("capture-pane", "-p", "-J", "-S", "-200", "-t", "=r0:0.0")
    assert f"Task {t2.id} from lead: second" in text
    assert text.count("(new session)") >= 2
    # the endpoint form of connect: the tenant and defaults come from the router
    with SyncFleet.connect(fe.paths.router_endpoint) as fleet:
        assert fleet.fleet.tenant == "tk"
        assert fleet.task(t1.id).state == "done"


def test_router_restart_resumes_tasks(make_fleet, tmp_path):
    """kill -9 of the router while tasks run and wait: after a restart every task is done, and
    each stub took each task exactly once."""
    recs = {n: tmp_path / f"{n}.jsonl" for n in ("r0", "r1")}
    fe = make_fleet(roster(*(stub(n, "reviewer", 1500, record=str(p)) for n, p in recs.items())))
    fe.up()

    async def publish_all():
        async with Fleet.connect(fe.fleet) as fleet:
            ts = [await fleet.publish("idle:reviewer", f"job {i}") for i in range(5)]
            await fleet.task(ts[0].id, wait="accepted", timeout_s=30)
            return ts

    ts = run(publish_all)
    from fleetbus import ops
    from fleetbus.router import procs
    os.kill(procs.router_pid(fe.paths), signal.SIGKILL)
    wait_for(lambda: procs.router_pid(fe.paths) is None, what="router gone")
    states = {t.id: t.state for t in Journal(fe.paths.journal, readonly=True).tasks()}
    assert "published" in states.values(), states  # some were still waiting when the router died
    ops.up(fe.fleet, fe.paths, timeout_s=30)

    async def follow():
        async with Fleet.connect(fe.fleet) as fleet:
            return [await fleet.task(t.id, wait="done", timeout_s=90) for t in ts]

    done = run(follow)
    assert [t.state for t in done] == ["done"] * 5, [(t.id, t.state, t.code, t.detail) for t in done]
    taken = [json.loads(line)["prompt"] for p in recs.values() for line in p.read_text().splitlines()]
    for i in range(5):
        assert sum(p.endswith(f"] job {i}") for p in taken) == 1, (i, taken)


def test_task_whose_ack_is_replayed_after_the_idle_report_ends_done(make_fleet, tmp_path):
    """Issue 14, item 3: the router dies while a task's message waits in the runtime's own queue;
    the runtime takes it and ends that turn while no router runs. The restarted router hears the
    re-registered sidecar report ``idle`` first and the replayed ack after it: the task must end
    ``done`` (it stayed ``accepted`` until its timeout before), and the stub took it once."""
    rec = tmp_path / "r0.jsonl"
    fe = make_fleet(roster(stub("r0", "reviewer", 2000, record=str(rec))))
    fe.up()
    from fleetbus import ops
    from fleetbus.router import procs
    from fleetbus.transports.tmux import TmuxTransport, target

    tmux = TmuxTransport(fe.paths.tmux_socket)
    wait_for(lambda: "stub>" in tmux.run_sync("capture-pane", "-p", "-t", target("r0")), timeout=30,
             what="the stub's prompt")
    tmux.run_sync("send-keys", "-t", target("r0"), "-l", "warm-up typed by hand")
    tmux.run_sync("send-keys", "-t", target("r0"), "Enter")
    wait_for(lambda: rec.exists() and "warm-up" in rec.read_text(), timeout=30,
             what=f"the stub busy with a turn ({tmux.run_sync('capture-pane', '-p', '-t', target('r0'))!r})")
    with SyncFleet.connect(fe.fleet) as fleet:
        task = fleet.publish("r0", "queued job", allow_busy=True, timeout_s=120, wait="assigned")

    def message_state():
        j = Journal(fe.paths.journal, readonly=True)
        try:
            return {m.body.split("] ", 1)[-1]: m.state for m in j.messages(limit=100)}.get("queued job")
        finally:
            j.close()

    wait_for(lambda: message_state() == "runtime-queued", what="the task's message in the stub's queue")
    router = procs.router_pid(fe.paths)
    os.kill(router, signal.SIGSTOP)  # it reads nothing more: the ack and the turn-end wait in its socket
    try:
        wait_for(lambda: "queued job" in rec.read_text(), timeout=30, what="the stub took the task's message")
        wait_for(lambda: "reply #2" in tmux.run_sync("capture-pane", "-p", "-t", target("r0")), timeout=30,
                 what="the task's turn ended")
    finally:
        os.kill(router, signal.SIGKILL)
        os.kill(router, signal.SIGCONT)
    wait_for(lambda: procs.router_pid(fe.paths) is None, what="router gone")
    ops.up(fe.fleet, fe.paths, timeout_s=30)
    with SyncFleet.connect(fe.fleet) as fleet:
        end = fleet.task(task.id, wait="done", timeout_s=30)
    assert end.state == "done", (end.state, end.code, end.detail)
    assert sum("queued job" in line for line in rec.read_text().splitlines()) == 1


def test_example_orchestrator_runs_against_the_demo_fleet(tmp_path):
    """examples/orchestrator.py starts the demo fleet in its own FLEETBUS_HOME, runs its tasks
    and tears the fleet down: exit 0, every task done, both reviewers used, no overlap."""
    env = dict(os.environ, TMUX_TMPDIR=str(tmp_path))
    env.pop("TMUX", None)
    env.pop("FLEETBUS_HOME", None)
    example = os.path.join(os.path.dirname(__file__), "..", "examples", "orchestrator.py")
    r = subprocess.run([sys.executable, example], env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "spread: stub0=" in r.stdout and "stub1=" in r.stdout
    assert "a reviewer held two at once: no" in r.stdout
    assert r.stdout.count(" done ") >= 8 and "demo fleet torn down" in r.stdout
    assert not list(tmp_path.iterdir()) or not any(p.is_socket() for p in tmp_path.rglob("*"))


def test_sidecar_killed_mid_task_still_done(make_fleet):
    """kill -9 of the slot's sidecar during the task's turn: the respawned sidecar forwards the
    turn-end, and the task ends done (not failed, not timed out)."""
    fe = make_fleet(roster(stub("r0", "reviewer", 4000)))
    fe.up()
    from fleetbus.router import procs

    async def main():
        async with Fleet.connect(fe.fleet) as fleet:
            t = await fleet.publish("r0", "slow work", wait="accepted")
            os.kill(procs.sidecar_pid(fe.paths, "r0"), signal.SIGKILL)
            return t, await fleet.task(t.id, wait="done", timeout_s=60)

    t, end = run(main)
    assert t.state == "accepted"
    assert end.state == "done", end
    assert end.done_ms >= 3500
