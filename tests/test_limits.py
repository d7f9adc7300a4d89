"""Limits (issue 13 item 5): queued messages per slot, send rate per client, open tasks, journal
retention, log size, hook stream connections and lines, events per subscriber, memory after
connection churn, and refused CURVE handshakes in the log.

The refusal decisions run on the memory transport; what depends on real processes (the client
a frame came from, the router's log file, its RSS) runs against real routers (``make_fleet``).
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import anyio
import psutil
import pytest
import zmq
from conftest import needs_tmux, wait_for

from fleetbus import protocol as P
from fleetbus.client import RequestFailed
from fleetbus.config import RosterError, parse_roster
from fleetbus.paths import fleet_paths
from fleetbus.router.journal import Journal, MessageRecord, TaskRecord
from fleetbus.router.server import RequestError, Router
from fleetbus.transports.memory import MemoryPane, MemoryTransport
from fleetbus.router.remote import Keyring


def integration(fn):
    """A test on real routers (real tmux server, ``make_fleet``)."""
    return needs_tmux(pytest.mark.tmux(fn))


def mem_router(tmp_path: Path, **bus) -> Router:
    fleet = parse_roster({"version": 1, "tenant": "lim", "transport": {"kind": "memory"},
                          "bus": {"verify_timeout_s": 0.5, **bus},
                          "agents": [{"name": "sh0", "runtime": "shell"}, {"name": "down", "runtime": "stub"},
                                     {"name": "st", "runtime": "stub"}]}, base_dir=tmp_path)
    t = MemoryTransport()
    t.panes["sh0"] = MemoryPane(prompt="$ ")
    t.panes["st"] = MemoryPane(prompt="stub> ", command="python3")  # "down" has no pane: slot-down
    return Router(fleet, fleet_paths("lim", "limtest", env={"FLEETBUS_HOME": str(tmp_path)}), transport=t,
                  spawn_sidecars=False)


def run(fn, *a):
    return anyio.run(fn, *a, backend="asyncio")


# -- roster settings --------------------------------------------------------------------------------


def test_limit_settings_have_defaults_and_bounds():
    bus = parse_roster({"version": 1}).roster.bus
    assert (bus.max_queued_per_slot, bus.max_open_tasks, bus.send_rate, bus.send_burst, bus.retention_days,
            bus.log_max_bytes, bus.log_backups) == (1000, 1000, 100.0, 1000, 30.0, 10 * 1024 * 1024, 3)
    with pytest.raises(RosterError, match=r"bus.max_queued_per_slot: Input should be greater than or equal to 1"):
        parse_roster({"version": 1, "bus": {"max_queued_per_slot": 0}})
    with pytest.raises(RosterError, match=r"bus.log_max_bytes: Input should be greater than or equal to 4096"):
        parse_roster({"version": 1, "bus": {"log_max_bytes": 100}})


# -- queued messages per slot -----------------------------------------------------------------------


def test_queue_full_refuses_without_journaling_and_a_known_key_is_still_a_duplicate(tmp_path):
    router = mem_router(tmp_path, max_queued_per_slot=3)

    async def main():
        async with router.delivering():
            def req(i: int) -> P.SendRequest:
                return P.SendRequest(req=f"r{i}", to="down", body=f"held {i}", when="available", detach=True,
                                     idempotency_key=f"k{i}")
            held = [await router.send(req(i)) for i in range(3)]
            over = await router.send(req(3))
            again = await router.send(req(0))  # a resend of a journaled message, while the queue is full
            other = await router.send(P.SendRequest(req="o", to="sh0", body="echo other slot"))
            return held, over, again, other

    held, over, again, other = run(main)
    assert [r.result for r in held] == ["queued"] * 3
    assert (over.result, over.code, over.id) == ("rejected", "queue-full", None), over
    assert "bus.max_queued_per_slot 3" in over.detail and "nothing was journaled" in over.detail
    assert again.duplicate and again.result == "queued" and again.id == held[0].id
    assert other.result == "accepted", "another slot's queue is not affected"
    assert router.journal.by_key("k3") is None, "a refused message is not journaled"
    assert router.journal.counts() == {"queued": 3, "accepted": 1}
    assert router.limits.refused["queue-full"] == 1


# -- send rate per client ---------------------------------------------------------------------------


def test_token_bucket_per_client():
    from fleetbus.router.limits import SendLimiter

    now = [100.0]
    lim = SendLimiter(rate=2.0, burst=3, clock=lambda: now[0])
    assert [lim.take("a") for _ in range(3)] == [None] * 3
    assert lim.take("a") == pytest.approx(0.5)  # one token every 0.5 s
    assert lim.take("b") is None, "another client has its own bucket"
    now[0] += 0.5
    assert lim.take("a") is None and lim.take("a") == pytest.approx(0.5)
    assert SendLimiter(rate=0, burst=1).take("a") is None, "send_rate 0: no limit"
    many = SendLimiter(rate=1.0, burst=1, clock=lambda: now[0], max_clients=10)
    for c in range(100):
        many.take(c)
    assert len(many._buckets) <= 10, "the buckets of many clients stay bounded"


def test_rate_limited_send_and_publish_journal_nothing(tmp_path):
    router = mem_router(tmp_path, send_rate=0.01, send_burst=2)
    me, other = ("pid", 1), ("pid", 2)

    async def main():
        async with router.delivering():
            admit = router.limits.admit

            def send(i: int, key: str | None = None) -> P.SendRequest:
                return P.SendRequest(req=f"r{i}", to="sh0", body=f"echo {i}", idempotency_key=key or f"k{i}")
            first = [await admit(send(i), me, router.handle_send) for i in range(2)]
            limited = await admit(send(2), me, router.handle_send)
            resend = await admit(send(0), me, router.handle_send)  # known key: the duplicate's answer
            theirs = await admit(send(3), other, router.handle_send)
            with pytest.raises(RequestError) as e:
                await admit(P.PublishRequest(req="p", to="st", body="task"), me, router.handle_publish)
            return first, limited, resend, theirs, e.value

    first, limited, resend, theirs, err = run(main)
    assert [r["result"] for r in first] == ["accepted", "accepted"]
    assert (limited["result"], limited["code"], limited["id"]) == ("rejected", "rate-limited", None), limited
    assert "retry after" in limited["detail"] and "client pid 1" in limited["detail"]
    assert resend["duplicate"] and resend["id"] == first[0]["id"]
    assert theirs["result"] == "accepted"
    assert err.code == "rate-limited" and "retry after" in str(err)
    assert router.journal.by_key("k2") is None and router.journal.tasks() == []
    assert router.limits.refused["rate-limited"] == 2


# -- open tasks -------------------------------------------------------------------------------------


def test_too_many_open_tasks(tmp_path):
    router = mem_router(tmp_path, max_open_tasks=2)

    async def main():
        async with router.delivering():
            pub = router.tasks.publish
            a = await pub(P.PublishRequest(req="a", to="st", body="one", idempotency_key="t-1"))
            b = await pub(P.PublishRequest(req="b", to="st", body="two"))
            with pytest.raises(RequestError) as e:
                await pub(P.PublishRequest(req="c", to="st", body="three"))
            again = await pub(P.PublishRequest(req="a", to="st", body="one", idempotency_key="t-1"))
            return a, b, e.value, again

    a, b, err, again = run(main)
    assert [a[0].state, b[0].state] == ["published", "published"]
    assert err.code == "too-many-tasks" and "bus.max_open_tasks 2" in str(err)
    assert again[0].duplicate and again[0].id == a[0].id
    assert len(router.journal.tasks()) == 2, "the refused publish journaled nothing"


# -- journal retention ------------------------------------------------------------------------------


def _age(j: Journal, table: str, ident: str, days: float) -> None:
    at = time.time() - days * 86400
    j.db.execute(f"UPDATE {table} SET created=?, updated=? WHERE id=?", (at, at, ident))
    j.db.execute("UPDATE changes SET at=? WHERE ref=?", (at, ident))


def test_prune_removes_what_finished_long_ago_and_keeps_everything_else(tmp_path):
    j = Journal(tmp_path / "journal.sqlite3")
    old_done = MessageRecord(id="a" * 12, slot="s", sender="ops", body="old and accepted")
    old_open = MessageRecord(id="b" * 12, slot="s", sender="ops", body="old and still queued")
    new_done = MessageRecord(id="c" * 12, slot="s", sender="ops", body="recent and accepted")
    task_msg = MessageRecord(id="d" * 12, slot="s", sender="ops", body="the message of an open task")
    for rec in (old_done, old_open, new_done, task_msg):
        j.add_message(rec)
    for rec in (old_done, new_done, task_msg):
        j.set_state(rec, "accepted", evidence="runtime-ack")
    old_task = TaskRecord(id="t" + "1" * 12, selector="s", body="old task")
    open_task = TaskRecord(id="t" + "2" * 12, selector="s", body="open task", slot="s", message_id=task_msg.id)
    j.add_tasks([old_task])
    j.add_tasks([open_task])
    j.set_task(old_task, "done")
    j.set_task(open_task, "accepted")
    j.slot_event("s", "started", pid=1)
    j.slot_event("s", "started", pid=2)
    j.slot_event("s", "stopped", by="operator")
    for table, rec in (("messages", old_done), ("messages", old_open), ("messages", task_msg),
                       ("tasks", old_task), ("tasks", open_task)):
        _age(j, table, rec.id, 40)
    j.db.execute("UPDATE changes SET at=? WHERE kind='slot'", (time.time() - 40 * 86400,))

    report = j.prune(time.time() - 30 * 86400)
    assert (report["messages"], report["tasks"], report["slot_events"]) == (1, 1, 1), report
    assert report["changes"] == 2 + 2, "queued+accepted of the message, published+done of the task"
    assert j.get(old_done.id) is None and j.changes_of(old_done.id) == []
    assert j.get(old_open.id).state == "queued", "an unfinished message is never pruned"
    assert j.get(new_done.id) is not None and j.get(task_msg.id) is not None
    assert j.get_task(old_task.id) is None and j.get_task(open_task.id).state == "accepted"
    events = [(e["state"], e["data"]) for e in j.slot_events("s")]
    assert events == [("started", {"pid": 2}), ("stopped", {"by": "operator"})], "the latest of each kind stays"
    assert j.last_slot_event("s", ("stopped", "started"))["event"] == "stopped"
    j.close()


def test_prune_gives_the_space_back(tmp_path):
    """A new journal uses incremental auto-vacuum: pruning shrinks the file."""
    j = Journal(tmp_path / "journal.sqlite3")
    body = "x" * 8000
    for i in range(1500):
        rec = MessageRecord(id=f"{i:012x}", slot="s", sender="ops", body=body)
        j.add_message(rec)
        j.set_state(rec, "accepted")
    j.db.execute("UPDATE messages SET updated=updated-86400*40")
    before = j.size_bytes()
    report = j.prune(time.time() - 30 * 86400)
    assert report["messages"] == 1500 and report["bytes_before"] == before
    assert report["bytes_after"] < before / 5, report
    assert (tmp_path / "journal.sqlite3").stat().st_size < before / 5
    j.close()


# -- hook stream: connections and lines -------------------------------------------------------------


@pytest.fixture
def sidecar():
    from tests.test_sidecar_hooks import make_sidecar

    yield from make_sidecar("pi")


def _stream(sidecar, body):
    """Run ``body(path)`` (a blocking function, in a thread) against the sidecar's stream socket."""
    async def main():
        async with anyio.create_task_group() as tg:
            tg.start_soon(sidecar.stream_loop)
            path = sidecar.paths.hook_stream("a")
            with anyio.fail_after(5):
                while not path.exists():
                    await anyio.sleep(0.01)
            out = await anyio.to_thread.run_sync(body, str(path))
            tg.cancel_scope.cancel()
        return out
    return run(main)


def _line(mid: str, pad: int = 0) -> bytes:
    return json.dumps({"event": "prompt-submit", "prompt": f"[fleet#{mid} ops -> a] hi" + "y" * pad,
                       "session_id": "s"}).encode() + b"\n"


def test_hook_stream_serves_at_most_16_connections(sidecar):
    from fleetbus.agents.sidecar import MAX_STREAM_CONNS

    def body(path: str):
        held = []
        for _ in range(MAX_STREAM_CONNS):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            held.append(s)
        deadline = time.monotonic() + 10
        while sidecar.stream_conns < MAX_STREAM_CONNS and time.monotonic() < deadline:
            time.sleep(0.01)
        extra = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        extra.connect(path)
        extra.settimeout(10)
        closed_at_once = extra.recv(1) == b""  # end of stream: the sidecar closed it
        extra.close()
        held[0].sendall(_line("0123456789ab"))  # the served ones still work
        deadline = time.monotonic() + 10
        while not sidecar.pending_acks and time.monotonic() < deadline:
            time.sleep(0.01)
        for s in held:
            s.close()
        deadline = time.monotonic() + 10
        while sidecar.stream_conns and time.monotonic() < deadline:
            time.sleep(0.01)
        again = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # room again once they closed
        again.connect(path)
        again.sendall(_line("ba9876543210"))
        while len(sidecar.pending_acks) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        again.close()
        return closed_at_once

    assert _stream(sidecar, body) is True
    assert sidecar.stream_refused == 1
    assert [a.id for a in sidecar.pending_acks] == ["0123456789ab", "ba9876543210"]


def test_hook_stream_skips_an_overlong_line_and_keeps_the_connection(sidecar):
    limit = sidecar.max_stream_line
    assert limit == 2 * 65536 + 65536, "twice bus.max_body_bytes plus 64 KiB"

    def body(path: str):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(path)
            s.sendall(_line("aaaaaaaaaaaa", pad=limit))  # valid JSON, but over the limit: skipped
            s.sendall(b"z" * (5 * 1024 * 1024) + b"\n")  # 5 MiB without a newline: skipped as well
            s.sendall(_line("0123456789ab", pad=limit - 200))  # just under: taken
            deadline = time.monotonic() + 20
            while not sidecar.pending_acks and time.monotonic() < deadline:
                time.sleep(0.01)

    _stream(sidecar, body)
    assert [a.id for a in sidecar.pending_acks] == ["0123456789ab"]
    assert sidecar.stream_conns == 0


# -- log files: rotation, tracebacks ----------------------------------------------------------------


def test_rotated_log_gets_tracebacks_and_native_writes(tmp_path):
    """What bypasses logging (an uncaught exception, a C library writing to fd 2) still lands in
    the current, rotated log file."""
    log = tmp_path / "logs" / "d.log"
    code = f"""
import logging, os, sys
from fleetbus.logs import setup_logging
setup_logging("info", "%(message)s", {str(log)!r}, max_bytes=4096, backups=2)
for i in range(400):
    logging.getLogger("x").info("line %04d %s", i, "y" * 40)
print("printed after the rotations", flush=True)
os.write(2, b"native write to fd 2\\n")
raise RuntimeError("boom after rotation")
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and p.stderr == "", p.stderr
    files = sorted(x.name for x in log.parent.iterdir())
    assert files == ["d.log", "d.log.1", "d.log.2"], files
    for f in log.parent.iterdir():
        assert f.stat().st_size <= 4096 + 200, (f, f.stat().st_size)
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    text = log.read_text()
    assert "line 0399" in text and "printed after the rotations" in text and "native write to fd 2" in text
    assert "Traceback" in text and "RuntimeError: boom after rotation" in text


def _roster(tenant: str, bus: str, *agents: str) -> str:
    return "\n".join([f"version: 1", f"tenant: {tenant}", "transport: {kind: tmux, socket: lim}", f"bus: {bus}",
                      "agents:"] + ([f"  - {a}" for a in agents] or ["  []"])) + "\n"


def _dealer(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    return s


def _health(fe) -> dict:
    from fleetbus.client import SyncClient

    return SyncClient(fe.fleet, fe.paths, connect_timeout_s=10.0).health()


@integration
def test_router_log_is_rotated(make_fleet):
    fe = make_fleet(_roster("lg", "{heartbeat_ms: 200, log_max_bytes: 4096, log_backups: 2}",
                            "{name: a, runtime: stub}"))
    fe.up()
    ctx = zmq.Context()
    s = _dealer(ctx, fe.paths.router_endpoint)
    for i in range(300):  # each is logged: "dropped malformed frame ..."
        s.send(b"\xc1not msgpack %d" % i)
    s.close(linger=10_000)  # all of them go out before the context ends
    ctx.term()
    wait_for(lambda: _health(fe)["dropped_frames"] >= 300, 60, what="300 malformed frames read")
    logs = fe.paths.router_log.parent
    wait_for(lambda: (logs / "router.log.2").exists(), 30, what="two rotations")
    assert not (logs / "router.log.3").exists()
    for name in ("router.log", "router.log.1", "router.log.2"):
        size = (logs / name).stat().st_size
        assert size <= 4096 + 300, (name, size)
        assert stat.S_IMODE((logs / name).stat().st_mode) == 0o600
    sidecar = psutil.Process(int(fe.paths.sidecar_pidfile("a").read_text().split()[0]))
    assert "--log-file" in sidecar.cmdline() and str(fe.paths.sidecar_log("a")) in sidecar.cmdline()


# -- send rate: a client is a process ---------------------------------------------------------------


@integration
def test_send_rate_is_per_client_process(make_fleet):
    """Two connections of one process share a bucket; another process has its own."""
    fe = make_fleet(_roster("rt", "{heartbeat_ms: 200, send_rate: 0.01, send_burst: 2}", "{name: a, runtime: stub}"))
    fe.up()
    first = [fe.send("nope", f"m{i}") for i in range(2)]  # a new connection each time
    assert [r.code for r in first] == ["unknown-slot", "unknown-slot"], "admitted (and rejected for the slot)"
    limited = fe.send("nope", "m2")
    assert (limited.result, limited.code) == ("rejected", "rate-limited"), limited
    assert f"client pid {os.getpid()}" in limited.detail and "retry after" in limited.detail
    p = fe.cli("send", "a", "-m", "from another process", "--no-wait", "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["result"] == "queued", p.stdout + p.stderr
    p = fe.cli("publish", "-m", "task", "--to", "nope")
    assert p.returncode == 3 and "[no-match]" in p.stdout, p.stdout + p.stderr  # admitted: its own bucket

    async def publish():
        from fleetbus.client import Client

        async with Client(fe.fleet, fe.paths) as c:
            await c.publish("a", "a task from the limited process")

    with pytest.raises(RequestFailed) as e:
        run(publish)
    assert e.value.code == "rate-limited" and "retry after" in str(e.value)
    assert _health(fe)["refused"] == {"rate-limited": 2}


# -- events: a subscriber that never reads ----------------------------------------------------------

SUBSCRIBERS = """
import sys, time, zmq
ctx = zmq.Context()
subs = []
for _ in range(20):
    s = ctx.socket(zmq.SUB)
    s.setsockopt(zmq.RCVHWM, 1)
    s.setsockopt(zmq.RCVBUF, 4096)
    s.setsockopt(zmq.SUBSCRIBE, b"")
    s.connect(sys.argv[1])
    subs.append(s)
print("subscribed", flush=True)
sys.stdin.read()  # never reads a single event; ends when the test closes stdin
"""


def _router_rss(fe) -> float:
    from fleetbus.router import procs

    return psutil.Process(procs.router_pid(fe.paths)).memory_info().rss / 1e6


def _probes(endpoint: str, n: int) -> None:
    """``n`` HEALTH requests with a probe (each publishes one event), 200 in flight at a time."""
    import secrets

    ctx = zmq.Context()
    s = _dealer(ctx, endpoint)
    try:
        sent = 0
        while sent < n:
            batch = min(200, n - sent)
            for _ in range(batch):
                s.send(P.encode(P.HealthRequest(req="h" + secrets.token_hex(4), probe=secrets.token_hex(8))))
            for _ in range(batch):
                assert s.poll(30_000), "the router stopped answering"
                s.recv()
            sent += batch
    finally:
        s.close()
        ctx.term()


@integration
def test_subscribers_that_never_read_cost_a_bounded_amount_of_memory(make_fleet):
    fe = make_fleet(_roster("ev", "{heartbeat_ms: 200}"))
    fe.up()
    subs = subprocess.Popen([sys.executable, "-c", SUBSCRIBERS, fe.paths.events_endpoint], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert subs.stdout.readline().strip() == "subscribed"
        _probes(fe.paths.router_endpoint, 300)  # the subscriptions reached the router; warm up
        base = _router_rss(fe)
        _probes(fe.paths.router_endpoint, 50_000)  # 20 x 50,000 events queued at 100,000 per subscriber
        grown = _router_rss(fe) - base
    finally:
        subs.stdin.close()
        subs.wait(30)
    assert grown < 40, f"the router grew by {grown:.0f} MB for 20 subscribers that never read"


# -- connection churn: freed memory goes back ---------------------------------------------------------

CHURN = """
import sys, zmq
sys.path.insert(0, sys.argv[3])
from fleetbus import protocol as P
ctx = zmq.Context()
ctx.set(zmq.MAX_SOCKETS, 10_000)
frame = P.encode(P.HealthRequest(req="churn"))
for i in range(int(sys.argv[2])):
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 200)
    s.connect(sys.argv[1])
    s.send(frame)
    s.close()  # leaves before the answer
    if i % 200 == 199:
        import time; time.sleep(0.05)
ctx.term()
"""


@integration
def test_memory_of_a_connection_churn_is_given_back(make_fleet):
    """24,000 clients connect, ask and leave at once, 8 processes at a time: libzmq frees what
    they cost, and the router's housekeeping gives the freed heap back (glibc keeps it)."""
    fe = make_fleet(_roster("ch", "{heartbeat_ms: 200}"))
    fe.up()
    _probes(fe.paths.router_endpoint, 300)
    base = _router_rss(fe)
    src = str(Path(__file__).resolve().parent.parent)
    churn = [subprocess.Popen([sys.executable, "-c", CHURN, fe.paths.router_endpoint, "3000", src]) for _ in range(8)]
    peak = base
    while any(c.poll() is None for c in churn):
        peak = max(peak, _router_rss(fe))
        time.sleep(0.1)
    assert all(c.returncode == 0 for c in churn)
    _health(fe)  # still answers
    settled = wait_for(lambda: (rss := _router_rss(fe)) < base + 15 and rss, 90, interval=1.0,
                       what=f"router RSS back near {base:.0f} MB (peak {peak:.0f} MB)")
    assert settled < base + 15


# -- refused CURVE handshakes: a bounded number of log lines -----------------------------------------

HANDSHAKES = """
import sys, zmq
ctx = zmq.Context()
server = sys.argv[2].encode()
for _ in range(int(sys.argv[3])):
    public, secret = zmq.curve_keypair()  # a fresh key each time: never on the allow-list
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.curve_publickey, s.curve_secretkey, s.curve_serverkey = public, secret, server
    s.connect(sys.argv[1])
    s.send(b"x")
    s.poll(100)
    s.close()
ctx.term()
"""


def test_refusals_of_one_kind_are_logged_five_a_minute_then_summed_up(tmp_path, caplog):
    from fleetbus.router import auth as A

    allowed = tmp_path / "allowed"
    allowed.mkdir()
    ctx = zmq.Context()
    az = A.PeerAuthenticator(ctx, [os.getuid()], Keyring(allowed))
    az._send_zap_reply = lambda *a, **kw: None
    try:
        with caplog.at_level("WARNING", logger="fleetbus.auth"):
            for _ in range(40):
                public, _secret = zmq.curve_keypair()
                run(az.handle_zap_message, [b"1.0", b"1", A.TCP_DOMAIN.encode(), b"127.0.0.1", b"", b"CURVE",
                                            zmq.utils.z85.decode(public)])
            run(az.handle_zap_message, [b"1.0", b"2", A.LOCAL_DOMAIN.encode(), b"localhost:4321:4321:7", b"", b"NULL"])
            az.summary()  # the window has not ended: nothing yet
            logged = [r.getMessage() for r in caplog.records]
            az._window_start -= A.LOG_WINDOW_S
            az.summary()
            summary = [r.getMessage() for r in caplog.records][len(logged):]
    finally:
        ctx.term()
    assert sum("not on the allow-list" in m for m in logged) == A.LOG_BURST, logged
    assert sum("uid 4321" in m for m in logged) == 1, "another kind has its own budget"
    assert len(summary) == 1 and summary[0].startswith("refused 41 handshake(s) from 41 peer(s) in the last "), summary
    assert "35 peer(s) not logged one by one" in summary[0]
    assert (az.refused_handshakes, az.refused_peers) == (41, 41)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@integration
def test_refused_handshakes_from_random_keys_write_a_bounded_number_of_log_lines(make_fleet):
    from fleetbus import keys
    from fleetbus.router.auth import LOG_BURST

    port = _free_port()
    fe = make_fleet(_roster("hs", f"{{heartbeat_ms: 200, tcp: 'tcp://127.0.0.1:{port}'}}"))
    keys.create_client(fe.paths, "box", ["a"])
    fe.up()
    router_key = keys.load_public(keys.router_files(fe.paths)[0]).decode()
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", HANDSHAKES, f"tcp://127.0.0.1:{port}", router_key, "200"],
                       timeout=300)
    assert p.returncode == 0
    wait_for(lambda: _health(fe)["refused_handshakes"] >= 200, 60, what="200 refused handshakes")
    windows = 1 + int((time.monotonic() - t0) // 60)  # a loaded machine may take more than a minute
    lines = [ln for ln in fe.paths.router_log.read_text(errors="replace").splitlines()
             if "refused" in ln or "CURVE" in ln]  # the refusals, and the "remote sidecars on tcp" line
    assert len(lines) <= windows * (LOG_BURST + 1) + 1, "\n".join(lines)
    assert LOG_BURST <= sum("not on the allow-list" in ln for ln in lines) <= windows * LOG_BURST, lines


def test_fleet_log_prune_prints_what_it_removed(make_fleet):
    fe = make_fleet(_roster("pr", "{heartbeat_ms: 200, retention_days: 0}", "{name: a, runtime: stub}"))
    j = Journal(fe.paths.journal, tenant="pr")
    done = MessageRecord(id="a" * 12, slot="a", sender="ops", body="finished")
    waiting = MessageRecord(id="b" * 12, slot="a", sender="ops", body="still queued")
    j.add_message(done)
    j.add_message(waiting)
    j.set_state(done, "accepted", evidence="runtime-ack")
    _age(j, "messages", done.id, 3)
    j.close()
    p = fe.cli("log", "--prune")
    assert p.returncode == 2 and "pass --older-than DAYS" in p.stderr, "retention_days 0 keeps everything"
    p = fe.cli("log", "--prune", "--older-than", "5", "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["messages"] == 0, p.stdout + p.stderr
    p = fe.cli("log", "--prune", "--older-than", "1", "--json")
    report = json.loads(p.stdout)
    assert p.returncode == 0 and (report["messages"], report["changes"]) == (1, 2), p.stdout + p.stderr
    assert report["tenant_id"] == "pr" and report["older_than_days"] == 1
    p = fe.cli("log", "--prune", "--older-than", "0")
    assert p.returncode == 0 and "0 messages" in p.stdout, p.stdout
    left = json.loads(fe.cli("log", "--json").stdout)
    assert {r["id"] for r in left} == {waiting.id}, "the unfinished message and its history stay"
    assert fe.cli("log", "a", "--prune").returncode == 2
