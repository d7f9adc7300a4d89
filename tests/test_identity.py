"""Identities bound to slots (issue 13, item 1): a CURVE key acts for the slots it was created
for and no other; a tcp peer never displaces a live local sidecar; every frame carries the
identity its peer registered with.

The attack test runs a real router with ``bus.tcp`` and real stub slots; the attacker is a
DEALER with an allowed key (bound to another slot) that tries to register for the target slot,
collect its EXPECTs and forge the ACK. The unit tests drive :class:`RemotePeers` directly.
"""

from __future__ import annotations

import json
import threading
import time

import zmq

from fleetbus import keys
from fleetbus import protocol as P
from fleetbus.router.liveness import Addr, LivenessTable
from fleetbus.router.remote import Keyring, RemotePeers
from tests.conftest import needs_tmux, wait_for
from tests.test_auth import free_port, health, hello, roster, router_log


def _binding_folder(tmp_path, **bound: str):
    folder = tmp_path / "allowed"
    folder.mkdir()
    for name, slots in bound.items():
        public, _ = keys._create(folder, name, {"slots": f'"{slots}"'})
    return folder


def test_a_key_may_register_for_its_own_slots_only(tmp_path):
    remote = RemotePeers(Keyring(_binding_folder(tmp_path, ka="a", kab="a,b")))
    assert remote.hello_refusal("key:ka", "a", None) is None
    assert "may serve a only, not slot 'b'" in remote.hello_refusal("key:ka", "b", None)
    assert remote.hello_refusal("key:kab", "b", None) is None
    assert "not on the allow-list" in remote.hello_refusal("key:nobody", "a", None)
    assert "not on the allow-list" in remote.hello_refusal(None, "a", None)
    assert "not on the allow-list" in remote.hello_refusal("uid:0", "a", None)


def test_a_tcp_peer_never_displaces_a_live_local_sidecar_or_another_keys_sidecar(tmp_path):
    remote = RemotePeers(Keyring(_binding_folder(tmp_path, ka="a", kb="a")))
    table = LivenessTable(clock=lambda: now)
    now = 100.0
    local = table.register("a", Addr("ipc", b"sc:a"), 41, "stub", 1000, 3)
    assert "live local sidecar (pid 41)" in remote.hello_refusal("key:ka", "a", local)
    now += 10  # the local sidecar went silent: a remote one may take the slot
    table.sweep()
    assert remote.hello_refusal("key:ka", "a", local) is None
    theirs = table.register("a", Addr("tcp", b"\0r1"), 42, "stub", 1000, 3, identity="key:kb")
    assert "live remote sidecar with key 'kb'" in remote.hello_refusal("key:ka", "a", theirs)
    assert remote.hello_refusal("key:kb", "a", theirs) is None, "the same key may reconnect"
    assert remote.refused >= 2


def test_every_frame_must_carry_the_identity_its_peer_registered_with(tmp_path):
    folder = _binding_folder(tmp_path, ka="a", kb="b")
    remote = RemotePeers(Keyring(folder))
    table = LivenessTable()
    peer = table.register("a", Addr("tcp", b"\0r1"), 42, "stub", 1000, 3, identity="key:ka")
    assert remote.frame_refusal("key:ka", peer) is None
    assert "is not the key 'ka'" in remote.frame_refusal("key:kb", peer)
    assert remote.frame_refusal(None, peer) is not None
    assert remote.frame_refusal("key:kb", None) is None, "an unknown peer is answered DISCONNECT by the router"
    (folder / "ka.key").unlink()  # revoked
    assert "'ka' was revoked" in remote.frame_refusal("key:ka", peer)
    assert remote.revoked_peers([peer]) == [peer]


class Attacker(threading.Thread):
    """A DEALER with an allowed key that keeps saying HELLO for ``slot``, answers every EXPECT it
    gets with an accepted ACK, and records what the router sent it."""

    def __init__(self, endpoint: str, curve: tuple[bytes, bytes, bytes], slot: str, tenant: str):
        super().__init__(daemon=True)
        self.endpoint, self.curve, self.slot, self.tenant = endpoint, curve, slot, tenant
        self.got: list[object] = []
        self.stop = threading.Event()

    def run(self) -> None:
        ctx = zmq.Context()
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.curve_publickey, s.curve_secretkey, s.curve_serverkey = self.curve
        s.connect(self.endpoint)
        try:
            next_hello = 0.0
            while not self.stop.is_set():
                if time.monotonic() >= next_hello:
                    s.send(hello(self.slot, self.tenant))
                    next_hello = time.monotonic() + 0.1
                if s.poll(20):
                    msg = P.decode(s.recv())
                    self.got.append(msg)
                    if isinstance(msg, P.Expect):
                        s.send(P.encode(P.Ack(id=msg.id, stage="accepted", at=time.time())))
                        s.send(P.encode(P.HookEvent(event="turn-end", slot=self.slot, runtime="stub")))
        finally:
            s.close(0)
            ctx.term()


@needs_tmux
def test_a_key_bound_to_another_slot_cannot_pose_as_the_slot_or_forge_its_ack(make_fleet):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    fe = make_fleet(roster("id1", "{name: stuck, runtime: stub, command: [fleet-stub, --ignore-enter]}",
                           "{name: b, runtime: stub}",
                           bus=f"{{heartbeat_ms: 200, liveness: 3, verify_timeout_s: 3, tcp: '{endpoint}'}}"))
    p = fe.cli("keys", "create", "bkey", "--slots", "b", "--json")
    assert p.returncode == 0, p.stderr
    server = keys.load_public(json.loads(p.stdout)["router_public_file"])
    attacker_keys = (*keys.load_secret(fe.paths.keys_dir / "clients" / "bkey.key_secret"), server)
    fe.up()
    wait_for(lambda: fe.ps()["stuck"].heartbeat == "healthy", 15, what="stuck's local sidecar healthy")
    attacker = Attacker(endpoint, attacker_keys, "stuck", "id1")
    attacker.start()
    try:
        wait_for(lambda: any(isinstance(m, P.Disconnect) for m in attacker.got), 15, what="the HELLO refused")
        # the runtime never submits (--ignore-enter): no ack can be true; the attacker answers
        # every EXPECT it might get
        r = fe.send("stuck", "only the runtime may acknowledge this", verify=True, timeout_s=3)
    finally:
        attacker.stop.set()
        attacker.join(10)
    assert r.result != "accepted", r
    assert not any(isinstance(m, (P.Welcome, P.Expect)) for m in attacker.got), attacker.got
    refusals = [m.reason for m in attacker.got if isinstance(m, P.Disconnect)]
    assert any("may serve b only, not slot 'stuck'" in why for why in refusals), refusals
    assert health(fe)["tcp_sidecars"] == [] and health(fe)["refused_remote"] >= 1
    assert "refused tcp peer with key 'bkey' for slot 'stuck'" in router_log(fe)
    assert fe.ps()["stuck"].heartbeat == "healthy", "the local sidecar was never displaced"
