"""Integration tests on a real tmux server (private socket per test) with real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import anyio
import psutil
import pytest
from conftest import needs_tmux, wait_for

from fleetbus.router import procs

pytestmark = [needs_tmux, pytest.mark.tmux]


def roster(tenant: str, *agents: str, bus: str = "") -> str:
    """A test roster on socket ``it`` (private per test); each agent is a YAML flow mapping."""
    head = ["version: 1", f"tenant: {tenant}", "transport: {kind: tmux, socket: it}"] + ([f"bus: {bus}"] if bus else [])
    return "\n".join(head + ["agents:"] + [f"  - {a}" for a in agents]) + "\n"

BASIC = roster("t1", "{name: a, runtime: stub, class: reviewer}", "{name: a0, runtime: stub, class: reviewer}",
               "{name: sh0, runtime: shell}", "{name: py0, runtime: python, restart: no}",
               bus="{heartbeat_ms: 200, liveness: 3, verify_timeout_s: 8}")


def send(fe, slot, body, **kw):
    return fe.send(slot, body, **kw)


def screen_text(fe, slot) -> str:
    return fe.tmux_cmd("capture-pane", "-p", "-J", "-S", "-200", "-t", f"={slot}:0.0")


def test_send_verify_every_runtime(make_fleet):
    fe = make_fleet(BASIC)
    fe.up()
    r = send(fe, "a", "review PR 12", verify=True)
    assert (r.result, r.evidence) == ("accepted", "runtime-ack"), r
    assert r.tenant_id == "t1" and r.host and len(r.id) == 12
    wait_for(lambda: "reply #1: got" in screen_text(fe, "a"), what="stub reply")

    r = send(fe, "sh0", "echo fleet-$((40+2))", verify=True)
    assert (r.result, r.evidence) == ("accepted", "pane-diff"), r
    wait_for(lambda: "fleet-42" in screen_text(fe, "sh0"), what="shell ran the command")

    r = send(fe, "py0", "print(6 * 7)", verify=True)
    assert (r.result, r.evidence) == ("accepted", "pane-diff"), r
    wait_for(lambda: "\n42" in screen_text(fe, "py0"), what="python printed 42")

    # multi-line message to the stub arrives as one prompt (bracketed paste)
    r = send(fe, "a", "line one\nline two\nline three", verify=True)
    assert r.result == "accepted", r
    wait_for(lambda: "in 3 line(s)" in screen_text(fe, "a"), what="one 3-line prompt")

    # the CLI prints the same result and exits 0
    p = fe.cli("send", "a", "-m", "from the cli", "--verify", "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["result"] == "accepted" and out["evidence"] == "runtime-ack"
    # stdin as the message source
    p = fe.cli("send", "a0", "--verify", input="piped body\n")
    assert p.returncode == 0 and "accepted (runtime-ack)" in p.stdout, p.stdout + p.stderr


def test_draft_when_program_never_submits(make_fleet):
    fe = make_fleet(roster("t2", "{name: stuck, runtime: stub, command: [python3, -m, fleetbus.agents.stub, --ignore-enter]}"))
    fe.up()
    p = fe.cli("send", "stuck", "-m", "please run", "--verify", "--timeout", "1.5", "--json")
    assert p.returncode == 1, p.stdout + p.stderr
    out = json.loads(p.stdout)
    assert out["result"] == "draft" and out["submit_retries"] == 1, out
    assert "fleet#" + out["id"] in screen_text(fe, "stuck")


def test_busy_input_line_is_refused_and_nothing_typed(make_fleet):
    fe = make_fleet(BASIC)
    fe.up()
    fe.tmux_cmd("send-keys", "-t", "=sh0:0.0", "-l", "half-typed by a human")
    wait_for(lambda: "half-typed by a human" in screen_text(fe, "sh0"), what="human text")
    p = fe.cli("send", "sh0", "-m", "echo hi", "--verify", "--json")
    assert p.returncode == 3, p.stdout + p.stderr
    out = json.loads(p.stdout)
    assert out["result"] == "rejected" and out["code"] == "busy-input"
    assert "fleet#" not in screen_text(fe, "sh0")
    # explicit --on-busy-input=clear empties the line first, then delivers
    p = fe.cli("send", "sh0", "-m", "echo cleared-ok", "--verify", "--on-busy-input", "clear", "--json")
    assert p.returncode == 0, p.stdout + p.stderr
    wait_for(lambda: "\ncleared-ok" in screen_text(fe, "sh0"), what="command ran after clear")
    assert "half-typed by a humanecho" not in screen_text(fe, "sh0")


def test_dead_stale_and_router_restart(make_fleet):
    fe = make_fleet(BASIC)
    fe.up()
    rows = fe.ps()
    assert all(r.heartbeat == "healthy" and not r.flags for r in rows.values()), rows
    pids_before = {s: r.pid for s, r in rows.items()}

    # kill a runtime: DEAD within interval x liveness (0.6 s; generous timeout)
    os.kill(rows["py0"].pid, signal.SIGKILL)
    wait_for(lambda: "DEAD" in fe.ps()["py0"].flags, timeout=5, what="py0 DEAD")
    assert fe.ps()["py0"].pane == "dead"
    p = fe.cli("send", "py0", "-m", "print(1)", "--verify", "--json")
    assert p.returncode == 3 and json.loads(p.stdout)["code"] == "slot-dead"
    # remain-on-exit keeps the last screen (tmux 3.3a only sometimes adds its "Pane is dead" line)
    assert ">>>" in fe.cli("tail", "py0", "-n", "100").stdout

    # a wedged sidecar (stopped: alive, silent): STALE (a dead one is respawned: test_supervision)
    sc = procs.sidecar_pid(fe.paths, "sh0")
    assert sc is not None
    os.kill(sc, signal.SIGSTOP)
    try:
        wait_for(lambda: "STALE" in fe.ps()["sh0"].flags, timeout=5, what="sh0 STALE")
    finally:
        os.kill(sc, signal.SIGCONT)

    # restart the router: sidecars re-register, no slot restarts
    rpid = procs.router_pid(fe.paths)
    os.kill(rpid, signal.SIGKILL)
    procs.wait_gone(rpid, 5)
    offline = fe.ps()  # router down: heartbeat files tell the truth
    assert all(r.source == "files" for r in offline.values())
    assert offline["a"].heartbeat == "healthy"
    fe.up()

    def healthy_again():
        rows = fe.ps()
        return all(rows[s].heartbeat == "healthy" for s in ("a", "a0")) and rows
    rows = wait_for(healthy_again, timeout=15, what="sidecars re-registered")
    assert rows["a"].source == "router"
    for s in ("a", "a0", "sh0"):
        assert rows[s].pid == pids_before[s], f"slot {s} was restarted"
    r = send(fe, "a", "after router restart", verify=True)
    assert (r.result, r.evidence) == ("accepted", "runtime-ack")

    # operator verbs bring the dead slot and the killed sidecar back
    assert fe.cli("start", "py0").returncode == 0
    assert fe.cli("restart", "sh0").returncode == 0
    fe.cli("start", "sh0")  # sidecar of sh0 is started again by `start` when missing
    wait_for(lambda: not fe.ps()["py0"].flags, timeout=10, what="py0 healthy after start")


def test_similar_names_never_cross(make_fleet):
    fe = make_fleet(roster("t4", "{name: a, runtime: stub}", "{name: a0, runtime: stub}",
                            "{name: b.c, runtime: stub}", "{name: b_c, runtime: stub}"))
    fe.up()
    ids = {}
    for slot in ("a", "a0", "b.c", "b_c"):
        r = send(fe, slot, f"only for {slot}", verify=True)
        assert (r.result, r.evidence) == ("accepted", "runtime-ack"), r
        ids[slot] = r.id
    sessions = {"a": "a", "a0": "a0", "b.c": "b,c", "b_c": "b_c"}
    for slot, sess in sessions.items():
        text = screen_text(fe, sess)
        for other, msg_id in ids.items():
            assert (msg_id in text) == (other == slot), f"{other}'s message in {slot}'s pane: {other == slot}"


def test_default_tmux_server_untouched(make_fleet):
    fe = make_fleet(BASIC)
    # a decoy "default" server in this test's private TMUX_TMPDIR
    subprocess.run(["tmux", "-f", "/dev/null", "new-session", "-d", "-s", "a", "cat"], check=True, env=fe.env)
    try:
        fe.up()
        assert send(fe, "a", "for the fleet's a", verify=True).result == "accepted"
        decoy = subprocess.run(["tmux", "list-sessions", "-F", "#{session_name}"], env=fe.env,
                               capture_output=True, text=True).stdout.split()
        assert decoy == ["a"]
        decoy_screen = subprocess.run(["tmux", "capture-pane", "-p", "-t", "=a:0.0"], env=fe.env,
                                      capture_output=True, text=True).stdout
        assert "fleet#" not in decoy_screen and not decoy_screen.strip()
    finally:
        subprocess.run(["tmux", "kill-server"], env=fe.env)


def test_bad_input(make_fleet, tmp_path):
    fe = make_fleet(BASIC)
    fe.up()
    p = fe.cli("send", "nosuch", "-m", "hi")
    assert p.returncode == 3 and "unknown slot 'nosuch'" in p.stderr
    # escape sequences, including a bracketed-paste end marker, are refused; nothing typed
    before = screen_text(fe, "sh0")
    p = fe.cli("send", "sh0", "-m", "echo ok\x1b[201~touch /tmp/pwned", "--json")
    assert p.returncode == 3, p.stdout + p.stderr
    assert json.loads(p.stdout)["code"] == "invalid-body"
    assert screen_text(fe, "sh0") == before
    p = fe.cli("send", "sh0", "-f", "/dev/null")
    assert p.returncode == 3 and "empty" in p.stdout
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\xff\xfe not utf-8")
    p = fe.cli("send", "sh0", "-f", str(bad))
    assert p.returncode == 3 and "not UTF-8" in p.stderr
    # invalid roster: exit 2 naming the file and the path inside it
    broken = tmp_path / "broken.yaml"
    broken.write_text("version: 1\nagents:\n  - {name: ok}\n  - {name: 'Bad:Name'}\n")
    p = subprocess.run([sys.executable, "-m", "fleetbus", "--roster", str(broken), "ps"], env=fe.env,
                       capture_output=True, text=True)
    assert p.returncode == 2 and str(broken) in p.stderr and "agents[1].name" in p.stderr


def test_ps_json_and_router_down(make_fleet):
    fe = make_fleet(BASIC)
    p = fe.cli("ps", "--json")  # nothing started yet: every slot DEAD, no sidecar
    assert p.returncode == 0
    rows = json.loads(p.stdout)
    assert [r["slot"] for r in rows] == ["a", "a0", "sh0", "py0"]
    assert all("DEAD" in r["flags"] and "NO-SIDECAR" in r["flags"] for r in rows)
    fe.up()
    rows = json.loads(fe.cli("ps", "--json").stdout)
    assert all(r["tenant_id"] == "t1" and r["host"] for r in rows)
    assert all(r["pane"] == "alive" and r["heartbeat"] == "healthy" and r["flags"] == [] for r in rows), rows
    a = rows[0]
    assert a["class"] == "reviewer" and psutil.Process(a["pid"]).name().startswith("python")
    assert a["process"]["rss_mb"] > 0
    # tail and a plain-text table
    assert "stub>" in fe.cli("tail", "a", "-n", "5").stdout
    assert "SLOT" in fe.cli("ps").stdout
    # a second router for the same tenant is refused (the first keeps its lock and endpoint)
    p = fe.cli("router", timeout=20)
    assert p.returncode == 1 and "already running" in p.stderr
    assert fe.ps()["a"].source == "router"
    # start on a running slot is refused clearly
    p = fe.cli("start", "a")
    assert p.returncode == 3 and "already running" in p.stderr


def test_drift_and_reset(make_fleet):
    fe = make_fleet(roster("t3", "{name: s, runtime: stub}", '{name: fake, runtime: stub, command: [sleep, "300"]}',
                            '{name: quits, runtime: shell, restart: no, command: [sh, -c, "exit 3"]}'))
    fe.up()
    rows = fe.ps()
    assert rows["fake"].flags == [], "a command override is what the slot should run"
    # tmux 3.3a can mark the pane dead before it reaps the child; the status follows (from tmux,
    # or from the supervisor's look at the zombie) within a supervisor pass
    rows = wait_for(lambda: (r := fe.ps())["quits"].exit_status is not None and r, timeout=20, what="exit status")
    assert (rows["quits"].pane, rows["quits"].exit_status) == ("dead", 3)
    assert "dead(3)" in fe.cli("ps").stdout
    # the stub's pane now runs something else: DRIFT
    fe.tmux_cmd("respawn-pane", "-k", "-t", "=s:0.0", "sleep", "300")
    wait_for(lambda: "DRIFT" in fe.ps()["s"].flags, timeout=5, what="DRIFT")
    fe.cli("restart", "s")
    wait_for(lambda: "DRIFT" not in fe.ps()["s"].flags, timeout=5, what="no DRIFT after restart")
    wait_for(lambda: "stub>" in screen_text(fe, "s"), what="stub prompt")
    p = fe.cli("reset", "s", "--json")
    assert p.returncode == 0, p.stdout + p.stderr
    wait_for(lambda: "(new session)" in screen_text(fe, "s"), what="stub reset")


def test_watch_is_read_only_and_removed_on_detach(make_fleet):
    fe = make_fleet(BASIC)
    fe.up()
    viewer = ["tmux", "-L", "viewer", "-f", "/dev/null"]
    cmd = f"{sys.executable} -m fleetbus --roster {fe.roster} watch a"
    subprocess.run([*viewer, "new-session", "-d", "-x", "60", "-y", "15", "-s", "v", cmd], check=True, env=fe.env)
    try:
        def watch_sessions():
            out = fe.tmux_cmd("list-sessions", "-F", "#{session_name} #{session_attached}")
            return [line for line in out.splitlines() if line.startswith("_watch-a-")]
        wait_for(lambda: [s for s in watch_sessions() if s.endswith(" 1")], what="attached watch session")
        size = fe.tmux_cmd("display-message", "-p", "-t", "=a:0", "#{window_width}x#{window_height}").strip()
        assert size == "200x50", "a 60x15 viewer must not resize the agent's window"
        # typing in the viewer never reaches the agent (read-only client)
        subprocess.run([*viewer, "send-keys", "-t", "=v:0.0", "-l", "typed-in-viewer"], env=fe.env)
        subprocess.run([*viewer, "send-keys", "-t", "=v:0.0", "Enter"], env=fe.env)
        subprocess.run([*viewer, "send-keys", "-t", "=v:0.0", "C-b", "d"], env=fe.env)
        wait_for(lambda: not watch_sessions(), what="watch session removed on detach")
        assert "typed-in-viewer" not in screen_text(fe, "a")
    finally:
        subprocess.run([*viewer, "kill-server"], env=fe.env)


def test_not_at_prompt_refused_and_busy_stub_queues(make_fleet):
    fe = make_fleet(roster("t5", "{name: sh0, runtime: shell}",
                            '{name: slow, runtime: stub, command: [fleet-stub, --think-ms, "1500"]}'))
    fe.up()
    # a program is running in the shell: its input line has no prompt, nothing is typed
    assert send(fe, "sh0", "sleep 6", verify=True).result == "accepted"
    r = send(fe, "sh0", "echo must-not-run", verify=True)
    assert (r.result, r.code) == ("rejected", "no-prompt"), r
    assert "must-not-run" not in screen_text(fe, "sh0")
    # the stub keeps its input line during a turn; a prompt sent then is queued and acked when taken
    first = send(fe, "slow", "first", verify=True)
    assert first.result == "accepted"
    wait_for(lambda: fe.ps()["slow"].state == "busy", timeout=5, what="stub busy")
    second = send(fe, "slow", "second", verify=True, timeout_s=10)
    assert (second.result, second.evidence) == ("queued", "runtime-ack"), second
    assert second.latency_ms < 1000, "queued is answered when the TUI takes the message into its queue"
    third = send(fe, "slow", "third", verify=True, timeout_s=20, wait="accepted")
    assert (third.result, third.evidence) == ("accepted", "runtime-ack"), third
    assert third.queued_ms is not None and third.queued_ms < 1000, third
    assert third.latency_ms > 1500, "acked when the stub took it after two turns, not when typed"
    wait_for(lambda: "reply #3" in screen_text(fe, "slow"), what="third reply")
    # a prompt sent while busy with --wait accepted from the CLI; then interrupt the running turn
    cli = fe.cli("send", "slow", "-m", "fourth", "--verify", "--json")
    assert cli.returncode == 0 and json.loads(cli.stdout)["result"] in ("accepted", "queued"), cli
    wait_for(lambda: fe.ps()["slow"].state == "busy", timeout=5, what="stub busy with the fourth")
    out = fe.cli("interrupt", "slow", "--json")
    data = json.loads(out.stdout)
    assert out.returncode == 0 and data["was_busy"] and data["idle"], out
    assert fe.ps()["slow"].state == "idle"
    out = fe.cli("interrupt", "slow", "--json")
    assert out.returncode == 0 and not json.loads(out.stdout)["was_busy"], "idle: no key sent"
    # reset is confirmed by the stub's session-start event
    out = fe.cli("reset", "slow", "--json")
    data = json.loads(out.stdout)
    assert out.returncode == 0 and data["confirmed"] and data["evidence"] == "session-start", out
    # a shell has no reset command; interrupting its running program confirms the prompt is back
    assert send(fe, "sh0", "sleep 30", verify=True).result == "accepted"
    out = fe.cli("interrupt", "sh0", "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["was_busy"], out
    assert send(fe, "sh0", "echo back", verify=True).result == "accepted"


def test_events_on_pub_socket(make_fleet):
    import time

    import zmq

    from fleetbus import protocol as P

    fe = make_fleet(BASIC)
    fe.up()
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"message")
    sub.connect(fe.paths.events_endpoint)
    try:
        time.sleep(0.3)  # PUB/SUB slow joiner: let the subscription reach the router
        r = send(fe, "a", "watched message", verify=True)
        seen = []
        while sub.poll(2000):
            topic, raw = sub.recv_multipart()
            ev = P.decode(raw)
            assert isinstance(ev, P.Event) and topic == b"message"
            assert ev.tenant_id == "t1" and ev.host
            if ev.data.get("id") == r.id:
                seen.append(ev.data["result"])
            if "accepted" in seen:
                break
        assert seen == ["queued", "injected", "accepted"], seen  # journaled, typed, acknowledged
    finally:
        sub.close()
        ctx.term()


def test_hook_cli_reaches_the_sidecar_and_never_fails(make_fleet):
    fe = make_fleet(BASIC)
    fe.up()
    env = {**fe.env, "FLEETBUS_HOOK_SOCKET": str(fe.paths.hook_socket("sh0")), "FLEETBUS_SLOT": "sh0"}

    def hook(*args: str, payload: str = "") -> int:
        return subprocess.run([sys.executable, "-m", "fleetbus", "hook", *args], input=payload, env=env,
                              capture_output=True, text=True, timeout=30).returncode

    assert hook("turn-start") == 0
    wait_for(lambda: fe.ps()["sh0"].state == "busy", timeout=5, what="busy from a hook")
    payload = json.dumps({"session_id": "s-1", "prompt": "[fleet#0123456789ab ops -> sh0] hi"})
    assert hook("prompt-submit", payload=payload) == 0
    assert hook("turn-end") == 0
    wait_for(lambda: fe.ps()["sh0"].state == "idle", timeout=5, what="idle from a hook")
    # sidecar gone or socket missing: the hook still exits 0 at once (never blocks a runtime)
    env["FLEETBUS_HOOK_SOCKET"] = str(fe.home / "nobody.sock")
    assert hook("prompt-submit", payload="{not json") == 0


def test_stop_start_and_attach(make_fleet):
    fe = make_fleet(BASIC)
    fe.up()
    assert fe.cli("stop", "a0").returncode == 0
    row = fe.ps()["a0"]
    assert row.pane == "absent" and "DEAD" in row.flags and "NO-SIDECAR" in row.flags
    p = fe.cli("send", "a0", "-m", "hi", "--json")
    assert p.returncode == 3 and json.loads(p.stdout)["code"] == "slot-down"
    assert fe.cli("start", "a0").returncode == 0
    wait_for(lambda: not fe.ps()["a0"].flags, timeout=10, what="a0 healthy after start")
    # attach is the explicit takeover: keys typed in the attached client reach the agent
    viewer = ["tmux", "-L", "viewer", "-f", "/dev/null"]
    cmd = f"{sys.executable} -m fleetbus --roster {fe.roster} attach a0"
    subprocess.run([*viewer, "new-session", "-d", "-x", "100", "-y", "30", "-s", "v", cmd], check=True, env=fe.env)
    try:
        wait_for(lambda: "a0 1" in fe.tmux_cmd("list-sessions", "-F", "#{session_name} #{session_attached}"),
                 what="attached")
        subprocess.run([*viewer, "send-keys", "-t", "=v:0.0", "-l", "typed by the operator"], env=fe.env)
        wait_for(lambda: "typed by the operator" in screen_text(fe, "a0"), what="operator keys reach the agent")
    finally:
        subprocess.run([*viewer, "kill-server"], env=fe.env)


def test_duplicate_sidecar_hands_over(make_fleet):
    fe = make_fleet(BASIC)
    fe.up()
    old = procs.sidecar_pid(fe.paths, "a")
    new = procs.spawn_sidecar(fe.fleet, fe.paths, "a")
    wait_for(lambda: procs.sidecar_pid(fe.paths, "a") == new, timeout=10, what="new sidecar owns the slot")
    wait_for(lambda: not psutil.pid_exists(old) or psutil.Process(old).status() == psutil.STATUS_ZOMBIE,
             timeout=10, what="old sidecar exits")
    wait_for(lambda: fe.ps()["a"].sidecar_pid == new and fe.ps()["a"].heartbeat == "healthy", timeout=10,
             what="new sidecar registered")
    r = send(fe, "a", "after handover", verify=True)
    assert (r.result, r.evidence) == ("accepted", "runtime-ack"), r


def test_ps_tmux_calls_do_not_grow_with_slots(make_fleet):
    from fleetbus.router.server import Router

    calls = {}
    for n in (2, 12):
        fe = make_fleet(roster(f"n{n}", *[f"{{name: s{i}, runtime: shell}}" for i in range(n)]), name=f"n{n}")

        async def main():
            router = Router(fe.fleet, fe.paths, spawn_sidecars=False)
            try:
                await router.start_fleet()
                before = router.transport.calls
                rows = await router.handle_ps()
                return router.transport.calls - before, rows
            finally:
                await router.transport.aclose()

        calls[n], rows = anyio.run(main, backend="asyncio")
        assert len(rows) == n and all(r["pane"] == "alive" for r in rows)
    assert calls[2] == calls[12] == 1


def test_demo_runs_the_main_job(make_fleet, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "FLEETBUS_HOME"}
    p = subprocess.run([sys.executable, "-m", "fleetbus", "demo", "--json"], env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    out = json.loads(p.stdout)
    assert [(r["slot"], r["result"], r["evidence"]) for r in out["results"]] == [
        ("stub0", "accepted", "runtime-ack"), ("stub1", "accepted", "runtime-ack"),
        ("sh0", "accepted", "pane-diff"), ("py0", "accepted", "pane-diff")]
    assert all(r["tenant_id"] == "demo" and r["host"] for r in out["ps"])
    sockets = os.listdir(os.path.join(os.environ["TMUX_TMPDIR"], f"tmux-{os.getuid()}"))
    assert not [s for s in sockets if s.startswith("demo-")], "the demo tears its tmux server down"
    from fleetbus.paths import fleet_paths

    assert not os.path.exists(out["home"]), "the demo removes its home"
    assert not fleet_paths("demo", "demo", env={"FLEETBUS_HOME": out["home"]}).run_dir.exists()
    # (and make_fleet's teardown checks that no process of the demo is left)


# -- fleet down leaves no process -------------------------------------------------------------------


def test_down_leaves_no_process_of_the_fleet(make_fleet):
    """``fleet down`` ends the router, sidecars, slots, the tmux server and the ``_holder``
    pane's program by itself: it never has to kill a leftover, and none of them runs after it."""
    from fleetbus import ops, reap

    fe = make_fleet(BASIC)
    fe.up()
    recorded = reap.fleet_processes(fe.fleet, fe.paths)
    roles = {r.role for r in recorded}
    assert {"router", "tmux-server", "pane _holder", "pane a", "pane sh0", "sidecar a", "sidecar py0"} <= roles, roles
    holder = [r for r in recorded if r.role in ("pane _holder", "child of pane _holder")]
    res = ops.down(fe.fleet, fe.paths)
    assert res["leftovers"] == [], res
    assert reap.wait_gone(holder, 10) == [], "the _holder pane's program outlived its tmux server"
    assert reap.wait_gone(recorded, 10) == []
    assert not fe.paths.run_dir.exists()
    p = fe.cli("down", "--json")  # down again: nothing to end
    assert p.returncode == 0 and json.loads(p.stdout)["leftovers"] == [], p.stdout + p.stderr


def test_down_ends_by_pid_what_outlives_the_teardown(make_fleet):
    """A runtime that ignores SIGHUP and SIGTERM, its background child, and a process a dead pane
    left in its session outlive ``kill-server``: ``fleet down`` ends each by pid (SIGTERM, then
    SIGKILL) and lists it."""
    from fleetbus import ops, reap

    fe = make_fleet(roster("t9", "{name: a, runtime: stub}",
                           """{name: deaf, runtime: shell, command: [sh, -c, "trap '' HUP TERM; sleep 611 & exec sleep 612"]}""",
                           """{name: gone, runtime: shell, restart: no, command: [sh, -c, "trap '' HUP; sleep 613 & exit 3"]}""",
                           bus="{heartbeat_ms: 200, liveness: 3}"))
    fe.up()
    wait_for(lambda: fe.ps()["gone"].pane == "dead", what="the gone slot's program exited")
    wait_for(lambda: {"sleep 611", "sleep 612", "sleep 613"} <= {r.cmdline for r in reap.fleet_processes(
        fe.fleet, fe.paths)}, what="every sleep started")
    res = ops.down(fe.fleet, fe.paths, grace_s=1.0)
    left = {p["cmdline"]: p for p in res["leftovers"]}
    assert set(left) == {"sleep 611", "sleep 612", "sleep 613"}, res["leftovers"]
    assert (left["sleep 612"]["role"], left["sleep 612"]["signal"]) == ("pane deaf", "SIGKILL")
    assert (left["sleep 611"]["role"], left["sleep 611"]["signal"]) == ("child of pane deaf", "SIGKILL")
    assert (left["sleep 613"]["role"], left["sleep 613"]["signal"]) == ("child of dead pane gone", "SIGTERM")
    assert not any(p["running"] for p in res["leftovers"])
    for p in res["leftovers"]:
        assert not psutil.pid_exists(p["pid"]) or psutil.Process(p["pid"]).status() == psutil.STATUS_ZOMBIE
    assert not fe.paths.run_dir.exists()
