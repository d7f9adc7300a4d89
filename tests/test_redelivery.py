"""Never lose a message: the journal, redelivery after kill -9, idempotency keys, when=available.

Real tmux, real router and sidecar processes, stub agents that record every prompt they take
(``fleet-stub --record``), so deliveries are counted at the agent, not inferred from fleetbus.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import anyio

from fleetbus.client import Client
from fleetbus.router import procs
from fleetbus.router.journal import OPEN_STATES, Journal
from tests.conftest import needs_tmux, wait_for

pytestmark = needs_tmux


def stub_roster(home: Path, slots: list[str], think_ms: int = 0, extra: str = "") -> str:
    (home / "rec").mkdir(exist_ok=True)
    agents = "\n".join(
        f'  - {{name: {s}, runtime: stub, command: [fleet-stub, --think-ms, "{think_ms}", --record, '
        f'"{home}/rec/{s}.jsonl"]}}' for s in slots)
    return f"version: 1\ntenant: t\ntransport: {{kind: tmux, socket: fb}}\n{extra}agents:\n{agents}\n"


def make(make_fleet, tmp_path_factory, slots, **kw):
    # the roster names files under the fleet's home, which make_fleet creates: write it twice
    fe = make_fleet("version: 1\nagents: []\n", name="f")
    fe.roster.write_text(stub_roster(fe.home, slots, **kw))
    from fleetbus.config import load_roster
    from fleetbus.paths import fleet_paths

    fe.fleet = load_roster(fe.roster)
    fe.paths = fleet_paths(fe.fleet.tenant, fe.fleet.roster.transport.socket)
    fe.paths.ensure()
    return fe


def records(fe, slot: str) -> list[str]:
    path = fe.home / "rec" / f"{slot}.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]


def journal(fe) -> Journal:
    return Journal(fe.paths.journal, readonly=True)


def open_count(fe) -> int:
    j = journal(fe)
    try:
        return sum(n for state, n in j.counts().items() if state in OPEN_STATES)
    finally:
        j.close()


def restart_router(fe) -> None:
    procs.spawn_router(fe.fleet, fe.paths)
    wait_for(lambda: procs.router_pid(fe.paths) and fe.paths.router_running(), 15, what="router restarted")


def test_kill9_router_mid_burst_nothing_lost_nothing_twice(make_fleet, tmp_path_factory):
    """1,000 messages to 4 stub agents; the router is killed with SIGKILL after 300 answers and
    started again; the client resends what was not answered, with the same idempotency keys.
    Every message reaches its agent exactly once."""
    slots = ["a0", "a1", "a2", "a3"]
    fe = make(make_fleet, tmp_path_factory, slots)
    fe.up()
    n, kill_at = 1000, 300
    answers: dict[int, str] = {}
    killed = {"at": None, "pid": None}

    async def burst():
        async with Client(fe.fleet, fe.paths) as c:
            sem = anyio.Semaphore(16)  # requests in flight at once

            async def one(i: int):
                async with sem:
                    r = await c.send(slots[i % 4], f"burst {i:04d}", idempotency_key=f"burst-{i}", detach=True)
                    answers[i] = r.result
                    if len(answers) == kill_at and killed["pid"] is None:
                        killed["pid"] = procs.router_pid(fe.paths)
                        os.kill(killed["pid"], signal.SIGKILL)
                        killed["at"] = time.monotonic()

            async with anyio.create_task_group() as tg:
                for i in range(n):
                    tg.start_soon(one, i)
                    if i == kill_at + 50:  # restart the router while the burst goes on
                        while killed["at"] is None:
                            await anyio.sleep(0.01)
                        await anyio.sleep(0.3)
                        await anyio.to_thread.run_sync(restart_router, fe)

    anyio.run(burst, backend="asyncio")
    assert killed["pid"] is not None and procs.router_pid(fe.paths) != killed["pid"]
    assert len(answers) == n and set(answers.values()) <= {"queued", "accepted"}, set(answers.values())
    wait_for(lambda: open_count(fe) == 0, 120, interval=0.5, what="every journaled message finished")

    seen: dict[str, int] = {}
    for s in slots:
        for prompt in records(fe, s):
            body = prompt.split("] ", 1)[1]
            i = int(body.split()[1])
            assert slots[i % 4] == s, f"{body!r} reached {s}"
            seen[body] = seen.get(body, 0) + 1
    lost = [i for i in range(n) if f"burst {i:04d}" not in seen]
    dup = {b: k for b, k in seen.items() if k > 1}
    print(f"sent {n}, delivered {len(seen)}, lost {len(lost)}, duplicated {len(dup)}")
    assert lost == [] and dup == {}, (lost[:20], dup)
    j = journal(fe)
    try:
        counts = j.counts()
    finally:
        j.close()
    assert counts == {"accepted": n}, counts
    # the kill really came mid-delivery: the new router found unfinished messages in the journal
    recovered = [line for line in fe.paths.router_log.read_text().splitlines() if "unfinished message" in line]
    print("\n".join(recovered))
    assert recovered, "the router was killed with nothing in flight: the test proved nothing"


def test_idempotency_key_never_types_twice(make_fleet, tmp_path_factory):
    fe = make(make_fleet, tmp_path_factory, ["a0"])
    fe.up()
    first = fe.send("a0", "only once", verify=True, idempotency_key="k-1")
    again = fe.send("a0", "only once", verify=True, idempotency_key="k-1")
    assert first.result == "accepted" and not first.duplicate
    assert again.duplicate and again.id == first.id and again.result == "accepted"
    other = fe.send("a0", "a different body", verify=True, idempotency_key="k-1")
    assert (other.result, other.code) == ("rejected", "idempotency-conflict")
    wait_for(lambda: records(fe, "a0"), 10, what="record")
    time.sleep(0.5)
    assert [p.split("] ", 1)[1] for p in records(fe, "a0")] == ["only once"]
    # the CLI: same key, same answer, exit 0, and the journal shows one message
    out = fe.cli("send", "a0", "-m", "only once", "--verify", "--key", "k-1", "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["duplicate"] is True, out.stderr


def test_when_available_waits_for_a_stopped_slot_then_dead_letter(make_fleet, tmp_path_factory):
    fe = make(make_fleet, tmp_path_factory, ["a0"], extra="bus: {message_ttl_s: 60}\n")
    fe.up()
    assert fe.cli("stop", "a0").returncode == 0
    now = fe.send("a0", "refused at once")
    assert (now.result, now.code) == ("rejected", "slot-down")
    held = [fe.send("a0", f"held {i}", verify=True, when="available") for i in range(3)]
    assert all(r.result == "queued" and r.held_by == "fleetbus" and r.expires_at for r in held), held
    short = fe.send("a0", "expires", when="available", ttl_s=0.5, detach=True)
    assert short.result == "queued"
    time.sleep(1.0)
    assert fe.cli("start", "a0").returncode == 0
    wait_for(lambda: len(records(fe, "a0")) >= 3, 30, what="held messages delivered")
    wait_for(lambda: open_count(fe) == 0, 30, what="journal settled")
    time.sleep(0.5)
    bodies = [p.split("] ", 1)[1] for p in records(fe, "a0")]
    assert bodies == ["held 0", "held 1", "held 2"], bodies  # in order, once, the expired one never
    log = json.loads(fe.cli("log", "a0", "--json").stdout)
    states = {(r["id"], r["state"]) for r in log if r["kind"] == "message"}
    assert (short.id, "dead-letter") in states and all((r.id, "accepted") in states for r in held)
    assert all(r["tenant_id"] == "t" and r["host"] for r in log)
    text = fe.cli("log", "a0").stdout
    assert "dead-letter" in text and "ttl-expired" in text
    assert json.loads(fe.cli("log", "--id", held[0].id, "--json").stdout)[-1]["state"] == "accepted"


def test_router_restart_recovers_held_messages(make_fleet, tmp_path_factory):
    """Messages held for a stopped slot survive a kill -9 of the router and are delivered once
    the slot is back."""
    fe = make(make_fleet, tmp_path_factory, ["a0"])
    fe.up()
    assert fe.cli("stop", "a0").returncode == 0
    ids = [fe.send("a0", f"survivor {i}", when="available", detach=True).id for i in range(5)]
    os.kill(procs.router_pid(fe.paths), signal.SIGKILL)
    time.sleep(0.2)
    restart_router(fe)
    assert fe.cli("start", "a0").returncode == 0
    wait_for(lambda: len(records(fe, "a0")) >= 5, 30, what="held messages delivered after the restart")
    wait_for(lambda: open_count(fe) == 0, 30, what="journal settled")
    assert [p.split("] ", 1)[1] for p in records(fe, "a0")] == [f"survivor {i}" for i in range(5)]
    j = journal(fe)
    try:
        assert {j.get(i).state for i in ids} == {"accepted"}
    finally:
        j.close()


# --- issue 14: what a dead runtime never took goes back to the queue, counted at the agent ----------


def run_in_thread(fn):
    """Run ``fn`` (no arguments) in a thread; returns (thread, box) where box[0] is its result
    or the exception it raised."""
    import threading

    box: list = []

    def target():
        try:
            box.append(fn())
        except BaseException as e:  # noqa: BLE001 - reported by the test
            box.append(e)

    th = threading.Thread(target=target, daemon=True)
    th.start()
    return th, box


def message(fe, body: str):
    j = journal(fe)
    try:
        return next((m for m in j.messages(limit=1000) if m.body == body), None)
    finally:
        j.close()


def changes(fe, msg_id: str) -> list[dict]:
    j = journal(fe)
    try:
        return j.changes_of(msg_id)
    finally:
        j.close()


def test_tmux_server_kill_while_awaiting_the_ack_requeues_the_message(make_fleet, tmp_path_factory):
    """Item 1: the tmux server is killed while a message waits for its ack (the first runtime
    never submits: ``--ignore-enter``, so verification is polling the pane after its extra Enter).
    The message must go back to the queue and be typed into the restored runtime, which takes it:
    ``accepted``, in the agent's record exactly once (it ended ``unconfirmed``, "vanished during
    verification", on 6 of 7 kills before)."""
    fe = make_fleet("version: 1\nagents: []\n", name="f")
    rec = fe.home / "s0.jsonl"
    flag = fe.home / "ignore-enter"  # runtimes started while it exists never submit
    flag.touch()
    script = (f'if [ -e {flag} ]; then exec fleet-stub --ignore-enter --record {rec}; '
              f'else exec fleet-stub --record {rec}; fi')
    fe.roster.write_text("version: 1\ntenant: t\ntransport: {kind: tmux, socket: fb}\n"
                         "bus: {heartbeat_ms: 200, liveness: 3, restart_backoff_ms: 200}\n"
                         f"agents:\n  - {{name: s0, runtime: stub, restart: always, command: [sh, -c, '{script}']}}\n")
    from fleetbus.config import load_roster
    from fleetbus.paths import fleet_paths

    fe.fleet = load_roster(fe.roster)
    fe.paths = fleet_paths(fe.fleet.tenant, fe.fleet.roster.transport.socket)
    fe.paths.ensure()
    fe.up()
    th, box = run_in_thread(lambda: fe.send("s0", "through the kill", when="available", wait="accepted", timeout_s=90,
                                            idempotency_key="k-through-the-kill"))
    wait_for(lambda: (m := message(fe, "through the kill")) is not None and m.state == "injected", 30,
             what=lambda: f"the message typed and waiting for its ack: {message(fe, 'through the kill')} {box} "
                          f"{fe.tmux_cmd('capture-pane', '-p', '-t', '=s0:0.0')!r}")
    time.sleep(2.0)  # past the draft check (1 s): the extra Enter was sent, the pane is being watched
    flag.unlink()  # the runtime restored after the kill takes it
    server = int(fe.tmux_cmd("display-message", "-p", "#{pid}").strip())
    os.kill(server, signal.SIGKILL)
    th.join(120)
    assert box, "the send never answered"
    r = box[0]
    assert not isinstance(r, BaseException), r
    assert (r.result, r.evidence) == ("accepted", "runtime-ack"), r
    taken = [p for line in rec.read_text().splitlines() if (p := json.loads(line)["prompt"])]
    assert sum(p.endswith("] through the kill") for p in taken) == 1, taken
    assert any(c["state"] == "queued" and c["data"].get("code") == "runtime-died" for c in changes(fe, r.id))


def test_prompt_only_queued_in_the_tui_goes_back_when_the_runtime_dies(make_fleet, tmp_path_factory):
    """Item 2: the sidecar is stopped (SIGSTOP), so verification falls back to the pane; a
    message sent during a turn waits in the stub's own queue. Pane-diff must say so (not
    ``accepted``), and when the runtime is then killed the message must go back to the queue
    and reach the restarted runtime: in the agent's record exactly once."""
    fe = make(make_fleet, tmp_path_factory, ["q0"], think_ms=4000,
              extra="bus: {heartbeat_ms: 200, liveness: 3, restart_backoff_ms: 200}\n")
    fe.up()
    assert fe.send("q0", "first, a long turn", timeout_s=30).result == "accepted"
    sidecar = procs.sidecar_pid(fe.paths, "q0")
    os.kill(sidecar, signal.SIGSTOP)
    try:
        wait_for(lambda: fe.ps()["q0"].heartbeat == "stale", 30, what="the sidecar seen stale")
        th, box = run_in_thread(lambda: fe.send("q0", "second, sent during the turn", when="available",
                                                wait="accepted", timeout_s=90, idempotency_key="k-second"))
        wait_for(lambda: (m := message(fe, "second, sent during the turn")) is not None
                 and m.state in ("runtime-queued", "accepted"), 30, what="pane-diff's verdict")
        m = message(fe, "second, sent during the turn")
        assert m.state == "runtime-queued", (m.state, m.result)
        assert not any(p.endswith("] second, sent during the turn") for p in records(fe, "q0"))
        runtime = fe.ps()["q0"].pid
        os.kill(runtime, signal.SIGKILL)
        th.join(120)
    finally:
        os.kill(sidecar, signal.SIGCONT)
    assert box, "the send never answered"
    r = box[0]
    assert not isinstance(r, BaseException), r
    assert r.result == "accepted", r
    taken = records(fe, "q0")
    assert sum(p.endswith("] second, sent during the turn") for p in taken) == 1, taken
    assert any(c["state"] == "queued" and c["data"].get("code") == "runtime-died" for c in changes(fe, r.id))
