"""Isolation and auth: private runtime dir and sockets, uid check by ZAP on the local sockets,
CURVE with an allow-list on the tcp endpoint (``fleet keys``), and tenants that never meet.

Real router processes on a real tmux server (``make_fleet``); the other-uid client is a forked
child of the test that drops to uid/gid 65534 (``nobody``) before it creates its ZeroMQ context.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest
import zmq
import zmq.auth
from zmq.utils import z85
from conftest import needs_tmux, wait_for

from fleetbus import keys
from fleetbus import protocol as P
from fleetbus.client import Client, SyncClient
from fleetbus.paths import PathError, fleet_paths
from fleetbus.router import procs
from fleetbus.router.auth import EVENTS_DOMAIN, LOCAL_DOMAIN, TCP_DOMAIN, PeerAuthenticator, peer_cred, protect
from fleetbus.router.liveness import Addr, LivenessTable
from fleetbus.router.remote import Keyring

def integration(fn):
    """Mark a test that runs real routers on a real tmux server (the unit tests here need neither)."""
    return needs_tmux(pytest.mark.tmux(fn))

NOBODY = 65534


def roster(tenant: str, *agents: str, bus: str = "{heartbeat_ms: 200, liveness: 3, verify_timeout_s: 8}") -> str:
    head = ["version: 1", f"tenant: {tenant}", "transport: {kind: tmux, socket: au}", f"bus: {bus}"]
    return "\n".join(head + ["agents:"] + [f"  - {a}" for a in agents]) + "\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(fe) -> dict:
    return SyncClient(fe.fleet, fe.paths, connect_timeout_s=5.0).health()


def router_log(fe) -> str:
    return fe.paths.router_log.read_text(errors="replace")


def mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def hello(slot: str, tenant: str) -> bytes:
    return P.encode(P.Hello(slot=slot, tenant=tenant, host="test", pid=os.getpid(), adapter="stub", caps=[],
                            heartbeat_ms=200))


def exchange(endpoint: str, frame: bytes, curve: tuple[bytes, bytes, bytes] | None = None,
             wait_s: float = 3.0) -> object | None:
    """Send one frame from a fresh DEALER; the decoded answer, or None when none came."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        s.curve_publickey, s.curve_secretkey, s.curve_serverkey = curve
    s.connect(endpoint)
    try:
        s.send(frame)
        return P.decode(s.recv()) if s.poll(int(wait_s * 1000)) else None
    finally:
        s.close()
        ctx.term()


# -- runtime dir and socket modes ------------------------------------------------------------------


@integration
def test_runtime_dir_and_sockets_are_private(make_fleet):
    bus = f"{{heartbeat_ms: 200, tcp: 'tcp://127.0.0.1:{free_port()}'}}"
    fe = make_fleet(roster("m1", "{name: a, runtime: stub}", bus=bus))
    fe.up()
    run = fe.paths.run_dir
    for d in (run.parent, run, run / "h", fe.paths.state_dir, fe.paths.keys_dir):
        assert mode(d) == 0o700, f"{d}: {mode(d):o}"
        assert os.stat(d).st_uid == os.getuid()
    # with bus.tcp the router made its own keypair; the secret is for its owner only
    assert mode(fe.paths.keys_dir / "router.key_secret") == 0o600
    socks = [run / "router.sock", run / "events.sock", fe.paths.hook_socket("a"), fe.paths.hook_stream("a")]
    for s in socks:
        st = os.stat(s)
        assert stat.S_ISSOCK(st.st_mode) and st.st_mode & 0o077 == 0, f"{s}: {stat.S_IMODE(st.st_mode):o}"
    # a runtime dir others could only read is made private again by the next command (nothing can
    # have been planted in it); one they could write to is refused with the path and the fix, never
    # chmodded. (The shared parent /tmp/fleetbus-<uid> is never loosened here: every fleet on the
    # machine uses it; tests/test_paths_hardening.py plants a parent of its own.)
    os.chmod(run, 0o755)
    assert fe.cli("ps").returncode == 0
    assert mode(run) == 0o700
    os.chmod(run, 0o770)
    try:
        p = fe.cli("ps")
        assert p.returncode == 2 and f"refusing {run}: mode 0770" in p.stderr and "rm -rf" in p.stderr, p.stderr
        assert mode(run) == 0o770
    finally:
        os.chmod(run, 0o700)
    if os.geteuid() == 0:  # a runtime dir owned by someone else is refused, never used
        os.chown(run / "h", NOBODY, NOBODY)
        try:
            with pytest.raises(PathError, match="owned by uid 65534"):
                fe.paths.ensure()
            p = fe.cli("ps")
            assert p.returncode == 2 and "owned by uid 65534" in p.stderr
        finally:
            os.chown(run / "h", os.getuid(), os.getgid())


# -- local peers: uid checked by ZAP ---------------------------------------------------------------


def test_peer_cred_from_zap_address():
    # libzmq 4.3.5 ipc: getnameinfo's host ("localhost") + ":uid:gid:pid" from SO_PEERCRED
    assert peer_cred("localhost:1000:100:4242") == (1000, 100, 4242)
    assert peer_cred("127.0.0.1") is None and peer_cred("") is None and peer_cred("a:b:c:d") is None


def test_authenticator_rules_and_fail_closed(tmp_path, caplog):
    """The ZAP handler's answers, without sockets: uid on the local domains, allow-list on tcp,
    everything else refused; each refused peer logged once."""
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    ctx = zmq.Context()
    auth = PeerAuthenticator(ctx, [os.getuid()], Keyring(allowed))
    replies: list[tuple[bytes, bytes, str]] = []
    auth._send_zap_reply = lambda rid, code, text, user_id="": replies.append((code, text, user_id))

    def ask(domain: str, address: str, mechanism: bytes = b"NULL", *cred: bytes) -> bytes:
        anyio.run(auth.handle_zap_message, [b"1.0", b"1", domain.encode(), address.encode(), b"", mechanism, *cred])
        return replies[-1][0]

    me = f"localhost:{os.getuid()}:{os.getgid()}:1"
    try:
        assert ask(LOCAL_DOMAIN, me) == b"200" and ask(EVENTS_DOMAIN, me) == b"200"
        with caplog.at_level("WARNING", logger="fleetbus.auth"):
            for _ in range(3):
                assert ask(LOCAL_DOMAIN, "localhost:4321:4321:77") == b"400"
        assert [r.getMessage() for r in caplog.records].count(
            f"refused local peer uid 4321 (gid 4321, pid 77) on {LOCAL_DOMAIN}: uid 4321 is not the router's "
            f"(allowed: {os.getuid()})") == 1
        assert (auth.refused_peers, auth.refused_handshakes) == (1, 3)
        assert ask(LOCAL_DOMAIN, "localhost") == b"400", "no credentials: refused"
        assert ask(LOCAL_DOMAIN, me, b"PLAIN", b"u", b"p") == b"400"
        assert ask("", me) == b"400" and ask("other", me) == b"400", "unknown domain: refused"
        public, secret = keys._create(allowed, "c")
        key = z85.decode(keys.load_public(public))
        assert ask(TCP_DOMAIN, "127.0.0.1", b"CURVE", key) == b"200"
        assert replies[-1][2] == "key:c", "the User-Id names the key: the router checks it on every frame"
        public.unlink()  # revoked: the very next handshake is refused
        assert ask(TCP_DOMAIN, "127.0.0.1", b"CURVE", key) == b"400"
        assert ask(TCP_DOMAIN, "127.0.0.1", b"NULL") == b"400"
    finally:
        ctx.term()


def test_protected_socket_refuses_without_a_handler(tmp_path):
    """libzmq 4.3.5 lets NULL connections through a ZAP domain with no handler bound, unless
    ZAP_ENFORCE_DOMAIN is set, which ``protect`` does."""
    ctx = zmq.Context()
    r, d = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    try:
        protect(r, LOCAL_DOMAIN)
        r.bind(f"ipc://{tmp_path}/r.sock")
        d.connect(f"ipc://{tmp_path}/r.sock")
        d.send(b"x")
        assert not r.poll(500)
    finally:
        r.close(0)
        d.close(0)
        ctx.term()


def test_same_routing_id_on_two_sockets_are_two_peers():
    table = LivenessTable()
    table.register("a", Addr("tcp", b"sc:a"), 1, "stub", 1000, 3)
    assert table.seen(Addr("ipc", b"sc:a")) is None, "a local peer never answers for the tcp one"
    peer = table.seen(Addr("tcp", b"sc:a"))
    assert peer is not None and (peer.via, peer.routing_id) == ("tcp", b"sc:a")


def _client_as_nobody(run_dir: Path, frame: bytes, out_fd: int) -> None:
    """Forked child: become uid/gid 65534, connect by a path relative to the runtime dir (so only
    that dir's and the socket's modes matter), send ``frame`` to the ROUTER socket, subscribe on
    the PUB socket, and report on ``out_fd`` what it saw. Never returns."""
    code = 1
    try:
        os.chdir(run_dir)
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
        except OSError as e:  # e.g. a container without CAP_SETUID or without uid 65534 mapped
            os.write(out_fd, json.dumps({"cannot_switch_uid": repr(e)}).encode())
            os._exit(0)
        report = {"uid": os.getuid(), "reachable": os.access("router.sock", os.W_OK)
                  and os.access("events.sock", os.W_OK)}
        ctx = zmq.Context()
        dealer, sub = ctx.socket(zmq.DEALER), ctx.socket(zmq.SUB)
        for s in (dealer, sub):
            s.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        dealer.connect("ipc://router.sock")
        sub.connect("ipc://events.sock")
        dealer.send(frame)
        report["answered"] = bool(dealer.poll(4000))
        dealer.close()
        sub.close()
        ctx.term()
        os.write(out_fd, json.dumps(report).encode())
        code = 0
    except BaseException as e:  # report and leave: never return into pytest
        os.write(out_fd, json.dumps({"error": repr(e)}).encode())
    finally:
        os._exit(code)


@pytest.mark.skipif(os.geteuid() != 0, reason="running a client as another uid (65534) needs root")
@integration
def test_peer_of_another_uid_is_refused(make_fleet):
    fe = make_fleet(roster("u1", "{name: a, runtime: stub}"))
    fe.up()
    run = fe.paths.run_dir
    before = health(fe)
    assert before["refused_peers"] == 0
    # open the file modes for the other user, so that ZAP (not the file system) is what refuses it
    saved = {p: mode(p) for p in (run, run / "router.sock", run / "events.sock")}
    os.chmod(run, 0o711)
    os.chmod(run / "router.sock", 0o666)
    os.chmod(run / "events.sock", 0o666)
    try:
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(rfd)
            _client_as_nobody(run, P.encode(P.HealthRequest(req="nobody-1")), wfd)
        os.close(wfd)
        with os.fdopen(rfd) as r:
            report = json.loads(r.read() or "{}")
        _, status = os.waitpid(pid, 0)
    finally:
        for p, m in saved.items():
            os.chmod(p, m)
    if "cannot_switch_uid" in report:
        pytest.skip(f"cannot run a process as uid {NOBODY} here: {report['cannot_switch_uid']}")
    assert os.waitstatus_to_exitcode(status) == 0, report
    assert report == {"uid": NOBODY, "reachable": True, "answered": False}, report
    after = health(fe)  # the router's own uid still gets its answers
    assert after["refused_peers"] >= 2 and after["refused_handshakes"] >= 2, after
    # both sockets refused it (the ROUTER and the PUB with the events), each logged once with the uid
    for domain in ("fleetbus-local", "fleetbus-events"):
        lines = wait_for(lambda: [ln for ln in router_log(fe).splitlines()
                                  if "refused local peer uid 65534" in ln and f"on {domain}:" in ln],
                         what=f"refusal on {domain} logged")
        assert len(lines) == 1, lines
        assert f"uid 65534 is not the router's (allowed: {os.getuid()})" in lines[0], lines
    r = fe.send("a", "own uid still works", verify=True)
    assert (r.result, r.evidence) == ("accepted", "runtime-ack"), r


# -- tcp endpoint: CURVE with an allow-list --------------------------------------------------------


@integration
def test_curve_sidecar_needs_an_allowed_key(make_fleet, tmp_path):
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    fe = make_fleet(roster("c1", "{name: a, runtime: stub}", "{name: b, runtime: stub}",
                           bus=f"{{heartbeat_ms: 200, liveness: 3, verify_timeout_s: 8, tcp: '{endpoint}'}}"))
    for name, slot in (("good", "a"), ("spare", "b")):
        p = fe.cli("keys", "create", name, "--slots", slot, "--json")
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout)["slots"] == [slot]
    router_pub_file = json.loads(p.stdout)["router_public_file"]
    # the "remote machine": copies of the sidecar's secret and the router's public key
    remote = tmp_path / "remote"
    remote.mkdir(mode=0o700)
    shutil.copy(fe.paths.keys_dir / "clients" / "good.key_secret", remote / "good.key_secret")
    os.chmod(remote / "good.key_secret", 0o600)
    shutil.copy(router_pub_file, remote / "router.key")
    server_key = keys.load_public(remote / "router.key")
    good = (*keys.load_secret(remote / "good.key_secret"), server_key)
    spare = (*keys.load_secret(fe.paths.keys_dir / "clients" / "spare.key_secret"), server_key)
    fe.up()
    assert health(fe)["tcp"] == endpoint

    # a key that is not on the allow-list: no WELCOME, the router logs and counts the refusal
    stranger = (*zmq.curve_keypair(), server_key)
    assert exchange(endpoint, hello("a", "c1"), stranger) is None
    wait_for(lambda: "not on the allow-list" in router_log(fe), what="refusal logged")
    assert f"CURVE key {stranger[0].decode()}" in router_log(fe)
    assert health(fe)["refused_peers"] >= 1
    # no CURVE at all: the handshake fails, nothing reaches the router
    assert exchange(endpoint, hello("a", "c1"), None, wait_s=1.5) is None
    # an allowed key is still a sidecar, never a client: requests over tcp are refused
    res = exchange(endpoint, P.encode(P.HealthRequest(req="r1")), spare)
    assert isinstance(res, P.Result) and (res.ok, res.code) == (False, "forbidden"), res

    # a real sidecar with the allowed key registers over tcp (once the local sidecar it replaces
    # on this machine has gone: a tcp peer never displaces a live local one) and carries acks
    sc = subprocess.Popen([sys.executable, "-m", "fleetbus", "--roster", str(fe.roster), "sidecar", "a",
                           "--router", endpoint, "--key", str(remote / "good.key_secret"),
                           "--router-key", str(remote / "router.key")],
                          env=fe.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: health(fe)["tcp_sidecars"] == ["a"], timeout=20, what="sidecar registered over tcp")
        assert health(fe)["tcp_keys"] == {"a": "good"}
        wait_for(lambda: fe.ps()["a"].sidecar_pid == sc.pid and fe.ps()["a"].heartbeat == "healthy", timeout=15,
                 what="tcp sidecar healthy in ps")
        assert "sidecar a registered" in router_log(fe) and "via tcp" in router_log(fe)
        r = fe.send("a", "over curve", verify=True)
        assert (r.result, r.evidence) == ("accepted", "runtime-ack"), r

        # revoked: the live connection is dropped at once, and new connections are refused
        p = fe.cli("keys", "revoke", "good", "--json")
        assert p.returncode == 0, p.stderr
        # dropped by this request, or already by the router itself (the sidecar's next ping after
        # the allow-list changed, 200 ms here, can come first)
        assert json.loads(p.stdout)["dropped"] in ([], [{"slot": "a", "key": "good"}])
        assert health(fe)["tcp_sidecars"] == []
        assert "dropping every tcp connection: key(s) key:good revoked" in router_log(fe)
        assert exchange(endpoint, hello("a", "c1"), good) is None
        wait_for(lambda: "key of 'good' was revoked" in router_log(fe), what="revoked key named in the log")
        time.sleep(1.0)  # the sidecar, still running with the revoked key, never registers again
        assert health(fe)["tcp_sidecars"] == []
        # the other key's connections come back by themselves: the spare key still works
        assert isinstance(exchange(endpoint, hello("b", "c1"), spare), P.Disconnect), "b has a live local sidecar"
    finally:
        sc.terminate()
        sc.wait(10)


@integration
def test_tcp_port_in_use_is_a_clear_error(make_fleet):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        endpoint = f"tcp://127.0.0.1:{busy.getsockname()[1]}"
        fe = make_fleet(roster("p1", "{name: a, runtime: stub}", bus=f"{{tcp: '{endpoint}'}}"))
        p = fe.cli("router", timeout=30)
    assert p.returncode == 1 and f"cannot listen on bus.tcp {endpoint}" in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr


# -- keys CLI --------------------------------------------------------------------------------------


@integration
def test_keys_cli(make_fleet):
    fe = make_fleet(roster("k1", "{name: a, runtime: stub}", bus="{tcp: 'tcp://127.0.0.1:9'}"))
    empty = json.loads(fe.cli("keys", "list", "--json").stdout)
    assert empty["router"] is None and empty["clients"] == [] and empty["tcp"] == "tcp://127.0.0.1:9"

    p = fe.cli("keys", "init", "--json")
    assert p.returncode == 0, p.stderr
    init = json.loads(p.stdout)
    assert init["created"] and len(init["public_key"]) == 40
    again = json.loads(fe.cli("keys", "init", "--json").stdout)
    assert not again["created"] and again["public_key"] == init["public_key"], "init never replaces the key"

    assert fe.cli("keys", "create", "laptop").returncode == 2, "a key serves named slots only"
    assert fe.cli("keys", "create", "laptop", "--slots", "nope").returncode == 2, "roster slots only"
    p = fe.cli("keys", "create", "laptop", "--slots", "a")
    assert p.returncode == 0, p.stderr
    secret = fe.paths.keys_dir / "clients" / "laptop.key_secret"
    assert str(secret) in p.stdout and "--router tcp://127.0.0.1:9" in p.stdout
    for d in (fe.paths.keys_dir, fe.paths.keys_dir / "clients", fe.paths.keys_dir / "allowed"):
        assert mode(d) == 0o700
    for f in (secret, fe.paths.keys_dir / "router.key_secret"):
        assert mode(f) == 0o600
    pub, sec = zmq.auth.load_certificate(secret)
    assert sec and zmq.curve_public(sec) == pub, "a real keypair"

    assert fe.cli("keys", "create", "laptop", "--slots", "a").returncode == 3, "name taken"
    assert fe.cli("keys", "create", "Bad/Name", "--slots", "a").returncode == 2
    assert fe.cli("keys", "create", "router", "--slots", "a").returncode == 2
    assert fe.cli("keys", "revoke", "nope").returncode == 3
    assert fe.cli("keys", "create", "ci", "--slots", "a").returncode == 0

    listed = json.loads(fe.cli("keys", "list", "--json").stdout)
    assert listed["router"]["public_key"] == init["public_key"]
    assert [(c["name"], c["status"]) for c in listed["clients"]] == [("ci", "allowed"), ("laptop", "allowed")]
    assert next(c for c in listed["clients"] if c["name"] == "laptop")["public_key"] == pub.decode()

    p = fe.cli("keys", "revoke", "laptop", "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["changed"]
    assert not secret.exists(), "a revoked key's secret is deleted"
    assert not (fe.paths.keys_dir / "allowed" / "laptop.key").exists()
    assert json.loads(fe.cli("keys", "revoke", "laptop", "--json").stdout)["changed"] is False
    listed = json.loads(fe.cli("keys", "list", "--json").stdout)
    assert [(c["name"], c["status"], c["secret_file"]) for c in listed["clients"]] == [
        ("ci", "allowed", str(fe.paths.keys_dir / "clients" / "ci.key_secret")), ("laptop", "revoked", None)]
    assert "laptop  revoked" in fe.cli("keys", "list").stdout
    assert [c["slots"] for c in listed["clients"]] == [["a"], ["a"]]
    assert fe.cli("keys", "create", "laptop", "--slots", "a").returncode == 3, "a revoked name is not reused"

    # the sidecar refuses incomplete or unsafe tcp settings (usage error, exit 2)
    p = fe.cli("sidecar", "a", "--router", "tcp://127.0.0.1:9")
    assert p.returncode == 2 and "--key" in p.stderr
    ci_secret = fe.paths.keys_dir / "clients" / "ci.key_secret"
    os.chmod(ci_secret, 0o644)
    p = fe.cli("sidecar", "a", "--router", "tcp://127.0.0.1:9", "--key", str(ci_secret),
               "--router-key", str(fe.paths.keys_dir / "router.key"))
    assert p.returncode == 2 and "readable by other users" in p.stderr
    p = fe.cli("sidecar", "a", "--router", "tcp://127.0.0.1:9", "--key", str(fe.paths.keys_dir / "router.key"),
               "--router-key", str(fe.paths.keys_dir / "router.key"))
    assert p.returncode == 2 and "no secret key" in p.stderr


# -- tenants side by side --------------------------------------------------------------------------


def test_paths_differ_per_tenant_without_fleetbus_home(tmp_path):
    env = {"XDG_RUNTIME_DIR": str(tmp_path / "run"), "XDG_STATE_HOME": str(tmp_path / "state")}
    a, b = fleet_paths("alice", "fleet", env=env), fleet_paths("bob", "fleet", env=env)
    assert a.run_dir != b.run_dir and a.state_dir != b.state_dir and a.router_endpoint != b.router_endpoint
    assert a.tmux_socket != b.tmux_socket, "two tenants naming the same socket must not share a tmux server"


@integration
def test_tenants_side_by_side_never_meet(make_fleet, monkeypatch):
    fa = make_fleet(roster("ta", "{name: a, runtime: stub}"), name="fa")
    fb = make_fleet(roster("tb", "{name: b, runtime: stub}"), name="fb")
    for fe in (fa, fb):
        monkeypatch.setenv("FLEETBUS_HOME", str(fe.home))
        fe.up()
    pa, pb = fa.paths, fb.paths
    assert len({pa.run_dir, pb.run_dir}) == 2 and len({pa.state_dir, pb.state_dir}) == 2
    assert pa.tmux_socket != pb.tmux_socket and pa.router_endpoint != pb.router_endpoint
    assert procs.router_pid(pa) != procs.router_pid(pb)

    async def send_via(fe, slot: str):
        async with Client(fe.fleet, fe.paths) as c:
            return await c.send(slot, f"to {slot}", verify=True)

    # tenant a's router does not know tenant b's slot, even asked directly (not through the CLI)
    r = anyio.run(send_via, fa, "b", backend="asyncio")
    assert (r.result, r.code, r.tenant_id) == ("rejected", "unknown-slot", "ta"), r
    # a sidecar of tenant a cannot register with tenant b's router, not even for b's slot name
    for slot in ("a", "b"):
        ans = exchange(pb.router_endpoint, hello(slot, "ta"))
        assert isinstance(ans, P.Disconnect) and "not in this roster" in ans.reason, ans
    wait_for(lambda: "refused HELLO" in fb.paths.router_log.read_text(), what="refused HELLO logged")
    # each router delivers to its own slot only, on its own tmux server
    for fe, slot in ((fa, "a"), (fb, "b")):
        r = anyio.run(send_via, fe, slot, backend="asyncio")
        assert (r.result, r.evidence, r.tenant_id) == ("accepted", "runtime-ack", fe.fleet.tenant), r
    sessions = {fe.fleet.tenant: fe.tmux_cmd("list-sessions", "-F", "#{session_name}").split() for fe in (fa, fb)}
    assert "a" in sessions["ta"] and "b" not in sessions["ta"], sessions
    assert "b" in sessions["tb"] and "a" not in sessions["tb"], sessions
    assert health(fa)["sidecars"] == 1 and health(fb)["sidecars"] == 1
    assert "sidecar b registered" not in pa.router_log.read_text()
    assert "sidecar a registered" not in pb.router_log.read_text()
