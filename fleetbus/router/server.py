"""The router daemon: ZeroMQ endpoints, liveness table, delivery with verification, status.

One :class:`Router` per tenant. It binds a ROUTER socket (sidecars and clients, protocol v1)
and a PUB socket (events) on ``ipc://`` endpoints inside the tenant's private 0700 runtime dir,
owns the transport, and answers client requests. Local peers are checked by uid and, with the
roster's ``bus.tcp``, remote sidecars reach a second ROUTER socket with CURVE keys from an
allow-list (ZAP, :mod:`fleetbus.router.auth`); a peer's :class:`Addr` names the socket its
replies go out on. Each socket has one reader task that is never cancelled mid-receive; replies
go through one lock. Runs on anyio's asyncio backend (``zmq.asyncio``; pyzmq has no trio support).
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import shlex
import shutil
import socket
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import zmq
import zmq.asyncio
from pydantic import BaseModel

from fleetbus import protocol as P
from fleetbus.adapters import get_adapter, marker
from fleetbus.config import Fleet, Slot
from fleetbus.paths import FleetPaths, fleet_paths
from fleetbus.router import procs, verify
from fleetbus.router.delivery import Delivery, SlotQueue, Unavailable
from fleetbus.router.journal import Journal, MessageRecord
from fleetbus.router.auth import (EVENTS_DOMAIN, LOCAL_DOMAIN, TCP_DOMAIN, PeerAuthenticator, local_authenticator,
                                  protect)
from fleetbus.router.liveness import Addr, LivenessTable
from fleetbus.router.status import Beat, collect_status
from fleetbus.router.supervisor import Supervisor
from fleetbus.transports.base import LaunchSpec, SlotNotFound, Transport, TransportError, resolve_transport

log = logging.getLogger("fleetbus.router")

#: Pane polling interval of the pane-diff fallback (s); a poll is two control-mode commands (~0.2 ms).
POLL_S = 0.005
#: Seconds after typing at which a hook runtime's input line is checked once for a lost submit key.
DRAFT_CHECK_S = 1.0
#: Seconds a pane without a visible prompt is looked at again before ``no-prompt``.
PROMPT_SETTLE_S = 2.0
#: Pane polling interval (s) for a TUI's queue indicator while the slot is busy.
QUEUE_POLL_S = 0.05
#: Scrollback rows captured when looking for a submitted marker.
HISTORY_ROWS = 300
#: Seconds between tries of a message held for a slot that is not available (``when=available``).
AVAILABLE_POLL_S = 0.5
#: Seconds, beyond a slot's liveness period, that recovery waits for its sidecar to re-register.
RECOVERY_GRACE_S = 2.0
#: Seconds after a sidecar's re-registration by which its replayed acks have arrived.
ACK_REPLAY_S = 0.5
#: Seconds between checks, while waiting for an ack, that the slot's sidecar is still the same.
SIDECAR_CHECK_S = 0.25
#: Scrollback rows searched for a recovered message's marker (tmux history-limit is 5000).
RECOVERY_HISTORY_ROWS = 5000


#: Request kinds the router answers with ``bad-request`` when their frame does not validate.
CLIENT_KINDS = ("SEND", "PS", "START", "STOP", "RESTART", "RESET", "INTERRUPT", "HEALTH", "SHUTDOWN")


class RouterAlreadyRunning(RuntimeError):
    """Another router holds this tenant's lock."""


class RouterBindError(RuntimeError):
    """An endpoint cannot be served (``bus.tcp`` port in use, unusable router key)."""


def launch_spec(fleet: Fleet, paths: FleetPaths, slot: Slot) -> LaunchSpec:
    """The argv, cwd and environment that start ``slot``'s runtime.

    ``PATH`` is explicit: the slot's ``env.PATH`` if set, else this interpreter's bin dir
    followed by the router's own ``PATH`` (a detached tmux pane has no login shell PATH).
    Environment precedence: the adapter's, then the roster slot's ``env``, then the variables of
    the adapter's hook wiring (``NODE_OPTIONS`` from both is joined), then fleetbus's own
    ``FLEETBUS_*``.

    Raises:
        TransportError: the program is not found on that PATH.
    """
    adapter = get_adapter(slot.runtime)
    path = slot.env.get("PATH") or os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "/usr/bin:/bin")])
    argv = list(slot.command or adapter.command)
    exe = shutil.which(argv[0], path=path) if not os.path.isabs(argv[0]) else argv[0]
    if not exe or not os.access(exe, os.X_OK):
        raise TransportError(f"slot {slot.name!r}: program {argv[0]!r} not found on PATH={path}")
    argv[0] = exe
    if adapter.hook_setup is not None:
        hooks = adapter.hook_setup(f"{shlex.quote(sys.executable)} -m fleetbus hook")
        slot_dir = paths.slot_dir(slot.name)
        slot_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for name, content in hooks.files.items():
            tmp = slot_dir / f".{name}.tmp"
            tmp.write_text(content)
            os.replace(tmp, slot_dir / name)
        argv += [a.replace("{slot_dir}", str(slot_dir)) for a in hooks.args]
        hook_env = {k: v.replace("{slot_dir}", str(slot_dir)) for k, v in hooks.env.items()}
    else:
        hook_env = {}
    env = {
        "LANG": os.environ.get("LANG") or "C.UTF-8",
        **adapter.env,
        **slot.env,
        **hook_env,  # the hook wiring wins over the roster (opencode's OPENCODE_CONFIG, ...)
        "PATH": path,
        "FLEETBUS_SLOT": slot.name,
        "FLEETBUS_TENANT": fleet.tenant,
        "FLEETBUS_RUNTIME": slot.runtime,
        "FLEETBUS_HOOK_SOCKET": str(paths.hook_socket(slot.name)),
        "FLEETBUS_HOOK_STREAM": str(paths.hook_stream(slot.name)),
    }
    if "NODE_OPTIONS" in hook_env and slot.env.get("NODE_OPTIONS"):
        # a roster's own NODE_OPTIONS must not switch off a hook preload (Gemini CLI's)
        env["NODE_OPTIONS"] = f"{hook_env['NODE_OPTIONS']} {slot.env['NODE_OPTIONS']}"
    if fleet.path:
        env["FLEETBUS_ROSTER"] = str(fleet.path)
    if os.environ.get("FLEETBUS_HOME"):
        env["FLEETBUS_HOME"] = os.environ["FLEETBUS_HOME"]
    return LaunchSpec(slot=slot.name, argv=argv, cwd=slot.workdir, env=env)


def make_transport(fleet: Fleet, paths: FleetPaths, long_lived: bool = False) -> Transport:
    """The roster's transport. ``long_lived`` (the router) keeps a tmux control-mode client."""
    cfg = fleet.roster.transport
    cls = resolve_transport(cfg.kind)
    if cfg.kind == "tmux":
        return cls(paths.tmux_socket, width=cfg.width, height=cfg.height, control=long_lived,
                   scratch_dir=paths.run_dir if long_lived else None)
    return cls()


class Router:
    """The router of one tenant.

    Args:
        fleet: the loaded roster. paths: the tenant's paths (default: from the roster).
        transport: override the roster's transport (tests).
        spawn_sidecars: start a sidecar for every slot that has none (False in unit tests).
    """

    def __init__(self, fleet: Fleet, paths: FleetPaths | None = None, transport: Transport | None = None,
                 spawn_sidecars: bool = True):
        self.fleet = fleet
        self.paths = paths or fleet_paths(fleet.tenant, fleet.roster.transport.socket)
        self.transport = transport or make_transport(fleet, self.paths, long_lived=True)
        self.spawn_sidecars = spawn_sidecars
        self.host = socket.gethostname()
        self.table = LivenessTable()
        self.waiters: dict[str, _Waiter] = {}
        self.queues: dict[str, SlotQueue] = {}
        self.inflight: dict[str, Delivery] = {}
        self._journal: Journal | None = None
        self.session_waiters: dict[str, list[anyio.Event]] = {}
        self.dropped_frames = 0
        self.started = time.time()
        self._send_lock = anyio.Lock()
        self._stop = anyio.Event()
        self._teardown = False
        self.ctx: zmq.asyncio.Context | None = None
        self.sock: zmq.asyncio.Socket | None = None
        self.tcp_sock: zmq.asyncio.Socket | None = None  # bus.tcp: remote sidecars (CURVE)
        self.pub: zmq.asyncio.Socket | None = None
        self.auth: PeerAuthenticator | None = None
        self._refused_hellos: set[tuple[str, str]] = set()
        self._lockfd: int | None = None
        #: restart policy, backoff, crash-loop, exit diagnostics, sidecar respawn (a task of serve)
        self.supervisor = Supervisor(self)
        self.supervisor.exit_listeners.append(self._runtime_exited)

    # -- startup / shutdown --------------------------------------------------------------------

    def _acquire_lock(self) -> None:
        fd = os.open(self.paths.router_lock, os.O_RDWR | os.O_CREAT, 0o600)
        # clients probe the lock with a shared flock for microseconds (FleetPaths.router_running):
        # retry briefly so a probe never makes a starting router give up
        deadline = time.monotonic() + 2.0
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    pid = procs.router_pid(self.paths)
                    raise RouterAlreadyRunning(
                        f"a router for tenant {self.fleet.tenant!r} is already running (pid {pid})") from None
                time.sleep(0.01)
        self._lockfd = fd

    def _router_socket(self) -> zmq.asyncio.Socket:
        assert self.ctx is not None
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 10_000)
        sock.setsockopt(zmq.RCVHWM, 10_000)
        sock.setsockopt(zmq.MAXMSGSIZE, P.MAX_FRAME_BYTES)  # libzmq drops the peer beyond this
        return sock

    def _bind(self) -> None:
        """Start the ZAP handler (must run inside the event loop), then bind the local ROUTER and
        PUB sockets (``ipc://``, uid-checked) and, with ``bus.tcp``, the CURVE ROUTER socket
        (router keypair from ``fleet keys``, created on first use; client allow-list re-read on
        every handshake). See :mod:`fleetbus.router.auth`.

        Raises:
            RouterBindError: the tcp endpoint cannot be bound (port in use) or the router's key
                is unusable.
        """
        from fleetbus import keys

        self.ctx = zmq.asyncio.Context()
        tcp = self.fleet.roster.bus.tcp
        self.auth = local_authenticator(self.ctx, keys.allowed_dir(self.paths) if tcp else None,
                                        lambda: keys.revoked_keys(self.paths))
        self.auth.start()  # before any bind: a handshake must never find no handler
        self.sock = self._router_socket()
        protect(self.sock, LOCAL_DOMAIN)
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        protect(self.pub, EVENTS_DOMAIN)
        old = os.umask(0o077)  # socket files 0600 inside the 0700 runtime dir
        try:
            self.sock.bind(self.paths.router_endpoint)
            self.pub.bind(self.paths.events_endpoint)
        finally:
            os.umask(old)
        if tcp:
            self.tcp_sock = self._router_socket()
            try:
                public, secret = keys.router_keypair(self.paths)
                self.tcp_sock.setsockopt(zmq.CURVE_SERVER, 1)
                self.tcp_sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
                self.tcp_sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
                self.tcp_sock.setsockopt(zmq.IPV6, 1 if tcp.startswith("tcp://[") else 0)
                protect(self.tcp_sock, TCP_DOMAIN)
                self.tcp_sock.bind(tcp)
            except (zmq.ZMQError, keys.KeysError) as e:
                log.error("cannot listen on bus.tcp %s: %s", tcp, e)
                raise RouterBindError(f"cannot listen on bus.tcp {tcp}: {e}") from None
            log.info("remote sidecars on %s (CURVE; router key %s, allow-list %s)", tcp,
                     keys.router_files(self.paths)[0], keys.allowed_dir(self.paths))

    async def start_fleet(self) -> None:
        """Start the transport, every slot that is missing, and every missing sidecar.

        Live slots are left alone (a router restart never restarts a slot). A missing slot whose
        last journaled slot event is an operator ``stopped`` stays down (with no sidecar). Dead
        panes are left to the supervisor, which keeps their diagnostics and applies the slot's
        restart policy.
        """
        self.supervisor.load()
        await self.transport.ensure_server()
        panes = await self.transport.probe_all()
        wanted = [name for name in self.fleet.slots if not self.supervisor.is_stopped(name)]
        for name in wanted:
            self.ensure_sidecar(name)
        missing = [self.fleet.slots[name] for name in wanted if name not in panes]
        if self.spawn_sidecars:
            # sidecars first, so a runtime's first hook event (session-start) finds its socket
            with anyio.move_on_after(5.0):
                while not all(self.paths.hook_socket(s.name).exists() for s in missing):
                    await anyio.sleep(0.02)
        for slot in missing:
            try:
                info = await self.transport.start_slot(launch_spec(self.fleet, self.paths, slot))
                self.supervisor.started(slot.name, info.pid, by="router", reason="router-start")
            except TransportError as e:
                log.error("cannot start slot %s: %s", slot.name, e)

    def ensure_sidecar(self, slot: str) -> None:
        """Spawn ``slot``'s sidecar unless one runs (no-op with ``spawn_sidecars=False``)."""
        if self.spawn_sidecars and procs.sidecar_pid(self.paths, slot) is None:
            pid = procs.spawn_sidecar(self.fleet, self.paths, slot)
            self.supervisor.sidecar_spawned(slot, pid)
            log.info("started sidecar for %s (pid %d)", slot, pid)

    async def serve(self, *, start_fleet: bool = True, ready: anyio.Event | None = None) -> None:
        """Bind, optionally start the fleet, and serve until SHUTDOWN or cancellation.

        Raises:
            RouterAlreadyRunning: another router holds the tenant's lock.
        """
        self.paths.ensure()
        self._acquire_lock()
        procs.write_pidfile(self.paths.router_pidfile)
        self._bind()
        log.info("router for tenant %s on %s", self.fleet.tenant, self.paths.router_endpoint)
        try:
            if start_fleet:
                await self.start_fleet()
            self.supervisor.load()  # before the first request (operator verbs take its locks)
            async with self.delivering() as tg:
                tg.start_soon(self._reader)
                tg.start_soon(self._sweeper)
                tg.start_soon(self.supervisor.run)
                if ready is not None:
                    ready.set()
                await self._stop.wait()
                tg.cancel_scope.cancel()
        finally:
            await self._close()

    async def _close(self) -> None:
        if self._teardown:
            spawned = tuple(w.sidecar_spawned for w in self.supervisor.slots.values() if w.sidecar_spawned)
            procs.stop_sidecars(self.paths, list(self.fleet.slots), also=spawned)
            await self.transport.shutdown()
        else:
            await self.transport.aclose()
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        for s in (self.sock, self.tcp_sock, self.pub):
            if s is not None:
                s.close(linger=0)
        if self.auth is not None:
            self.auth.stop()  # its inproc socket would keep ctx.term() waiting
        if self.ctx is not None:
            self.ctx.term()
        try:
            if procs.read_pid(self.paths.router_pidfile) in (None, os.getpid()):
                self.paths.router_pidfile.unlink(missing_ok=True)
        except OSError:
            pass
        if self._lockfd is not None:
            os.close(self._lockfd)
        if self._teardown:
            self.paths.remove_run_dir()

    def stop(self, teardown: bool = False) -> None:
        self._teardown = self._teardown or teardown
        self._stop.set()

    # -- wire ----------------------------------------------------------------------------------

    async def _send(self, dest: Addr | bytes, msg: BaseModel) -> bool:
        """Send ``msg`` to a peer on the socket it came in on; False when it is gone
        (ROUTER_MANDATORY: EHOSTUNREACH) or that socket is closed.

        ``dest`` is a :class:`Addr` (``Peer.addr``, or what ``_dispatch`` passes to handlers); a
        bare routing id (bytes) means a peer of the local ``ipc://`` socket.
        """
        addr = dest if isinstance(dest, Addr) else Addr("ipc", dest)
        sock = self.tcp_sock if addr.via == "tcp" else self.sock
        if sock is None:
            return False
        try:
            async with self._send_lock:
                await sock.send_multipart([addr.rid, P.encode(msg)], flags=zmq.DONTWAIT)
            return True
        except zmq.ZMQError as e:
            log.warning("cannot send %s to %s: %s", type(msg).__name__, addr, e)
            return False

    def publish(self, topic: str, slot: str | None = None, **data: Any) -> None:
        """Publish an event on the PUB socket (never blocks; PUB drops at HWM)."""
        if self.pub is None:
            return
        ev = P.Event(topic=topic, slot=slot, tenant_id=self.fleet.tenant, host=self.host, data=data)
        try:
            self.pub.send_multipart([topic.encode(), P.encode(ev)], flags=zmq.DONTWAIT)
        except zmq.ZMQError:
            pass

    async def _reader(self) -> None:
        """One receive loop per ROUTER socket (``ipc``, and ``tcp`` with ``bus.tcp``)."""
        assert self.sock is not None
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._read_socket, "ipc", self.sock)
            if self.tcp_sock is not None:
                tg.start_soon(self._read_socket, "tcp", self.tcp_sock)

    async def _read_socket(self, via: str, sock: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sock.recv_multipart()
            if len(frames) != 2:
                self.dropped_frames += 1
                log.warning("dropped frame with %d parts (%s)", len(frames), via)
                continue
            addr = Addr(via, frames[0])
            try:
                msg = P.decode(frames[1])
            except P.ProtocolError as e:
                self.dropped_frames += 1
                log.warning("dropped malformed frame from %s: %s", addr, e)
                if e.req is not None and via == "ipc" and e.kind in CLIENT_KINDS:
                    # a request that names itself gets an answer, not a client-side timeout
                    self._tg.start_soon(self._send, addr, P.Result(req=e.req, ok=False, code="bad-request",
                                                                   error=str(e)))
                continue
            try:
                self._dispatch(addr, msg)
            except Exception:  # a handler bug must never take the reader down
                self.dropped_frames += 1
                log.exception("handler failed for %s", type(msg).__name__)

    #: Frames a peer of the tcp socket may send: remote peers are sidecars, never clients.
    SIDECAR_FRAMES = (P.Hello, P.Ping, P.Ack, P.Bye, P.HookEvent)

    def _dispatch(self, addr: Addr, msg: Any) -> None:
        """Handle one decoded frame from ``addr`` (socket + routing id)."""
        tg = self._tg
        if addr.via != "ipc" and not isinstance(msg, self.SIDECAR_FRAMES):
            self.dropped_frames += 1
            log.warning("refused %s frame from %s: only sidecar frames are accepted over tcp", msg.kind, addr)
            if isinstance(getattr(msg, "req", None), str):
                tg.start_soon(self._send, addr, P.Result(req=msg.req, ok=False, code="forbidden",
                                                        error="client requests are accepted on the local socket only"))
            return
        if isinstance(msg, P.Hello):
            tg.start_soon(self._on_hello, addr, msg)
        elif isinstance(msg, (P.Ping, P.Ack, P.Bye, P.HookEvent)):
            peer = self.table.seen(addr)
            if peer is None:
                tg.start_soon(self._send, addr, P.Disconnect(reason="unknown peer; send HELLO"))
                return
            if isinstance(msg, P.Ping):
                if msg.state != peer.state:
                    self.publish("heartbeat", peer.slot, state=msg.state, previous=peer.state)
                peer.state = msg.state
                peer.session_id = msg.session_id or peer.session_id
                tg.start_soon(self._send, addr, P.Pong())
            elif isinstance(msg, P.Ack):
                self._on_ack(peer.slot, msg)
            elif isinstance(msg, P.HookEvent):
                self._on_hook_event(peer, msg)
            else:
                self.table.remove(addr)
                self.publish("heartbeat", peer.slot, state="gone")
        elif isinstance(msg, P.SendRequest):
            tg.start_soon(self._answer, addr, msg.req, self.handle_send(msg))
        elif isinstance(msg, P.PsRequest):
            tg.start_soon(self._answer, addr, msg.req, self.handle_ps())
        elif isinstance(msg, P.SlotRequest):
            tg.start_soon(self._answer, addr, msg.req, self.handle_slot(msg))
        elif isinstance(msg, P.HealthRequest):
            tg.start_soon(self._answer, addr, msg.req, self.handle_health())
        elif isinstance(msg, P.ShutdownRequest):
            tg.start_soon(self._answer, addr, msg.req, self.handle_shutdown(msg))
        else:
            self.dropped_frames += 1
            log.warning("unexpected %s frame from %s", msg.kind, addr)

    async def _answer(self, addr: Addr, req: str, work: Any) -> None:
        try:
            data = await work
            result = P.Result(req=req, ok=True, data=data)
        except RequestError as e:
            result = P.Result(req=req, ok=False, code=e.code, error=str(e))
        except Exception as e:
            log.exception("request %s failed", req)
            result = P.Result(req=req, ok=False, code="internal", error=f"{type(e).__name__}: {e}")
        await self._send(addr, result)

    async def _on_hello(self, addr: Addr, msg: P.Hello) -> None:
        slot = self.fleet.slots.get(msg.slot)
        if slot is None or msg.tenant != self.fleet.tenant:
            if (msg.tenant, msg.slot) not in self._refused_hellos and len(self._refused_hellos) < 1000:
                self._refused_hellos.add((msg.tenant, msg.slot))  # log once per tenant/slot pair
                log.warning("refused HELLO from %s (pid %d, host %s): slot %r of tenant %r is not in this roster "
                            "(tenant %r)", addr, msg.pid, msg.host, msg.slot, msg.tenant, self.fleet.tenant)
            await self._send(addr, P.Disconnect(reason=f"slot {msg.slot!r} of tenant {msg.tenant!r} is not in this roster"))
            return
        self.table.register(msg.slot, addr, msg.pid, msg.adapter, slot.heartbeat_ms, slot.liveness)
        self.publish("heartbeat", msg.slot, state="registered", pid=msg.pid)
        log.info("sidecar %s registered (pid %d, host %s, via %s)", msg.slot, msg.pid, msg.host, addr.via)
        await self._send(addr, P.Welcome(heartbeat_ms=slot.heartbeat_ms, liveness=slot.liveness))

    def _on_ack(self, slot: str, ack: P.Ack) -> None:
        w = self.waiters.get(ack.id)
        if w is None or w.slot != slot:
            if ack.stage == "accepted":
                self._late_ack(slot, ack)
            return
        if ack.stage == "queued":
            if w.queued_at is None:
                w.queued_at = time.monotonic()
            w.queued_ack = True
            w.changed.set()
            return
        w.ack = ack
        w.accepted.set()
        w.changed.set()

    def _late_ack(self, slot: str, ack: P.Ack) -> None:
        """An ack for a message nobody is verifying any more (it arrived after the timeout, or a
        sidecar replayed it after the router restarted): the journal records ``accepted``."""
        d = self.inflight.get(ack.id)
        rec = d.rec if d is not None else self.journal.get(ack.id)
        if rec is None or rec.slot != slot or rec.state in ("accepted", "rejected", "dead-letter"):
            return
        late = d or Delivery(rec, P.SendRequest(req="late", to=rec.slot, body=rec.body), time.monotonic())
        r = self._result(late, "accepted", evidence="runtime-ack", session_id=ack.session_id,
                         detail=f"late ack (the message was {rec.state})")
        if rec.result:
            r = r.model_copy(update={"latency_ms": rec.result.get("latency_ms", r.latency_ms)})
        self._finish(late, r)

    def _on_hook_event(self, peer: Any, ev: P.HookEvent) -> None:
        """A hook event forwarded by a sidecar: publish it; a session-start confirms resets."""
        self.publish("hook", peer.slot, event=ev.event, source=ev.source, session_id=ev.session_id,
                     markers=ev.markers)
        if ev.event == "session-start":
            peer.session_id = ev.session_id or peer.session_id
            for w in self.session_waiters.get(peer.slot, []):
                w.set()

    async def _sweeper(self) -> None:
        while True:
            await anyio.sleep(self.table.next_interval(self.fleet.roster.bus.heartbeat_ms))
            for peer in self.table.sweep():
                log.warning("sidecar %s is stale", peer.slot)
                self.publish("heartbeat", peer.slot, state="stale")

    # -- requests ------------------------------------------------------------------------------

    async def handle_health(self) -> dict[str, Any]:
        return {
            "tenant_id": self.fleet.tenant, "host": self.host, "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 3), "protocol": P.PROTOCOL_VERSION,
            "sidecars": len(self.table.peers), "dropped_frames": self.dropped_frames,
            # fleetbus.router.auth: distinct peers refused by uid or CURVE key, every refused handshake
            "refused_peers": self.auth.refused_peers if self.auth else 0,
            "refused_handshakes": self.auth.refused_handshakes if self.auth else 0,
            "tcp": self.fleet.roster.bus.tcp,
            "tcp_sidecars": sorted(p.slot for p in self.table.peers.values() if p.via == "tcp"),
        }

    async def handle_ps(self) -> list[dict[str, Any]]:
        panes = await self.transport.probe_all()
        beats = {}
        for name, peer in self.table.peers.items():
            age = self.table.age(name) or 0.0
            beats[name] = Beat(age_s=age, limit_s=peer.heartbeat_ms * peer.liveness / 1000, state=peer.state, sidecar_pid=peer.pid)
        supervision = {name: self.supervisor.status(name) for name in self.fleet.slots}
        # the process-table pass runs in a worker thread: the event loop keeps answering
        rows = await anyio.to_thread.run_sync(
            lambda: [r.model_dump(by_alias=True) for r in collect_status(self.fleet, panes, beats, source="router",
                                                                        host=self.host, supervision=supervision)])
        return rows

    async def handle_shutdown(self, msg: P.ShutdownRequest) -> dict[str, Any]:
        self.stop(teardown=msg.teardown)
        return {"stopping": True, "teardown": msg.teardown, "pid": os.getpid()}

    async def handle_slot(self, msg: P.SlotRequest) -> dict[str, Any]:
        try:
            slot = self.fleet.slot(msg.slot)
        except KeyError as e:
            raise RequestError("unknown-slot", e.args[0]) from None
        name = slot.name
        try:
            if msg.kind in ("START", "STOP", "RESTART"):
                # under the slot's supervision lock: the supervisor never acts in between; each
                # is journaled (by="operator"); START and RESTART clear a crash-loop
                async with self.supervisor.lock(name):
                    return await self._slot_lifecycle(msg.kind, slot)
            if msg.kind == "INTERRUPT":
                return await self.interrupt(slot, msg.timeout_s or self.fleet.roster.bus.verify_timeout_s)
            return await self.reset(slot, msg.timeout_s or self.fleet.roster.bus.verify_timeout_s)
        except SlotNotFound:
            raise RequestError("slot-down", f"slot {name!r} is not running (run `fleet start {name}`)") from None
        except TransportError as e:
            raise RequestError("transport", str(e)) from None

    async def _slot_lifecycle(self, kind: str, slot: Slot) -> dict[str, Any]:
        """Operator START / STOP / RESTART of ``slot`` (the caller holds its supervision lock)."""
        name = slot.name
        if kind == "STOP":
            procs.stop_sidecar(self.paths, name)
            try:
                await self.transport.stop_slot(name)
                was_running = True
            except SlotNotFound:  # already gone (e.g. waiting to be restarted): it stays down now
                was_running = False
            self.supervisor.stopped(name)
            return {"slot": name, "stopped": True, "was_running": was_running}
        panes = await self.transport.probe_all()
        if kind == "START" and name in panes and panes[name].alive:
            raise RequestError("already-running", f"slot {name!r} is already running (pid {panes[name].pid})")
        spec = launch_spec(self.fleet, self.paths, slot)
        if name in panes:
            info = await self.transport.restart_slot(spec)
        else:
            await self.transport.ensure_server()
            info = await self.transport.start_slot(spec)
        self.ensure_sidecar(name)
        self.supervisor.started(name, info.pid, by="operator", reason=kind.lower())
        return {"slot": name, "pid": info.pid, "alive": info.alive}

    async def _settle_prompt(self, slot: Slot, adapter: Any) -> tuple[Any, str | None]:
        """Look again, for up to PROMPT_SETTLE_S, at a pane whose input line is not found or not
        empty. tmux 3.3a ignores synchronized output, so a capture can catch a TUI mid-frame with
        the cursor elsewhere (pi 0.73.1 draws a frame, then moves the cursor back to its editor;
        opencode 1.18.33 redraws its sidebar) or blank (opencode right after a first prompt).
        Returns as soon as the input line is empty, or when two readings 0.1 s apart show the
        same text (a human's draft stays), else at the deadline (no prompt: a program runs).
        Returns ``(screen, typed_text)``; typed_text None: no prompt."""
        deadline = time.monotonic() + PROMPT_SETTLE_S
        previous: str | None = None
        while True:
            await anyio.sleep(0.1)
            screen = await self.transport.screen(slot.name)
            typed = None if screen.dead else verify.typed_text(adapter, screen)
            if typed == "" or screen.dead or time.monotonic() >= deadline:
                return screen, typed
            if typed is not None and typed == previous:
                return screen, typed
            previous = typed

    def _is_busy(self, slot: Slot, adapter: Any, screen: Any) -> bool:
        """A turn is running: the sidecar's hook state says so, or the adapter's busy indicator
        shows; for a runtime with neither (a shell), the pane is not at its prompt."""
        peer = self.table.peers.get(slot.name)
        if adapter.busy is not None and verify.is_busy(adapter, screen):
            return True
        if adapter.has_hook and peer is not None and not peer.stale and adapter.busy is None:
            return peer.state == "busy"
        return verify.typed_text(adapter, screen) is None

    async def interrupt(self, slot: Slot, timeout_s: float) -> dict[str, Any]:
        """Stop the current turn with the adapter's interrupt key and confirm the slot is idle.

        No key is sent when the slot is already idle. Idle means: the busy indicator is gone
        and the pane is at its prompt (for a hook runtime without a busy indicator, its hook
        state is no longer ``busy``). Runtimes that report no turn end for an interrupt (Claude
        Code's Stop hook does not fire) get a ``turn-end`` with source ``interrupt`` injected
        into their sidecar so heartbeats say ``idle``.

        Returns ``{"slot", "key", "was_busy", "idle", "waited_ms"}``; raises
        RequestError("still-busy") when the slot is not idle after ``timeout_s`` s.
        """
        from fleetbus.agents.hook import send_hook

        adapter = get_adapter(slot.runtime)
        t0 = time.monotonic()
        screen = await self.transport.screen(slot.name)
        if screen.dead:
            raise RequestError("slot-dead", f"slot {slot.name!r}: its program has exited")
        was_busy = self._is_busy(slot, adapter, screen)
        if was_busy:
            for n in range(adapter.interrupt_presses):
                if n:
                    await anyio.sleep(0.2)
                await self.transport.send_keys(slot.name, adapter.interrupt_key)
        idle = not was_busy
        deadline = t0 + timeout_s
        while not idle and time.monotonic() < deadline:
            await anyio.sleep(0.05)
            idle = not self._is_busy(slot, adapter, await self.transport.screen(slot.name))
        if not idle:
            raise RequestError("still-busy", f"{slot.name!r} is still busy {timeout_s:g} s after {adapter.interrupt_key}")
        peer = self.table.peers.get(slot.name)
        if adapter.has_hook and peer is not None and peer.state == "busy":
            await anyio.to_thread.run_sync(lambda: send_hook("turn-end", source="interrupt",
                                                             path=str(self.paths.hook_socket(slot.name))))
        self.publish("slot", slot.name, event="interrupted", was_busy=was_busy)
        return {"slot": slot.name, "key": adapter.interrupt_key, "was_busy": was_busy, "idle": True,
                "waited_ms": round((time.monotonic() - t0) * 1000, 1)}

    async def reset(self, slot: Slot, timeout_s: float) -> dict[str, Any]:
        """Submit the adapter's reset command and confirm it (see :attr:`Adapter.reset_event`).

        Refused while a turn runs (``busy``: interrupt first) or when the pane is not at its
        prompt. Text left in the input line is cleared first. Returns ``{"slot",
        "reset_command", "confirmed", "evidence", "session_id", "latency_ms"}``; ``evidence`` is
        ``session-start`` (the runtime's own event) or ``screen``; ``confirmed`` is False when
        no evidence came within ``timeout_s`` s.
        """
        adapter = get_adapter(slot.runtime)
        if adapter.reset_command is None:
            raise RequestError("no-reset", f"runtime {slot.runtime!r} has no reset command; use `fleet restart {slot.name}`")
        t0 = time.monotonic()
        screen = await self.transport.screen(slot.name)
        if screen.dead:
            raise RequestError("slot-dead", f"slot {slot.name!r}: its program has exited")
        typed = verify.typed_text(adapter, screen)
        if typed != "":
            screen, typed = await self._settle_prompt(slot, adapter)
        if typed is None:
            raise RequestError("no-prompt", f"{slot.name!r} is not at its prompt; nothing was typed")
        if self._is_busy(slot, adapter, screen):
            raise RequestError("busy", f"{slot.name!r} is in a turn; run `fleet interrupt {slot.name}` first")
        if typed:
            await self.transport.send_keys(slot.name, *adapter.clear_keys)
            await anyio.sleep(0.2)
        peer = self.table.peers.get(slot.name)
        by_event = adapter.reset_event == "session-start" and adapter.has_hook and peer is not None and not peer.stale
        ev = anyio.Event()
        self.session_waiters.setdefault(slot.name, []).append(ev)
        confirmed, evidence = False, None
        try:
            await self.transport.deliver(slot.name, adapter.reset_command, adapter.submit)
            deadline = t0 + timeout_s
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._resubmit_if_draft, slot, adapter, adapter.reset_command)
                with anyio.move_on_after(timeout_s):
                    if by_event:
                        await ev.wait()
                        confirmed, evidence = True, "session-start"
                    else:
                        while time.monotonic() < deadline:
                            scr = await self.transport.screen(slot.name)
                            if adapter.reset_screen is not None and adapter.reset_screen.search("\n".join(scr.lines)):
                                confirmed, evidence = True, "screen"
                                break
                            await anyio.sleep(0.05)
                tg.cancel_scope.cancel()
        finally:
            self.session_waiters[slot.name].remove(ev)
        peer = self.table.peers.get(slot.name)
        self.publish("slot", slot.name, event="reset", command=adapter.reset_command, confirmed=confirmed)
        return {"slot": slot.name, "reset_command": adapter.reset_command, "confirmed": confirmed,
                "evidence": evidence, "session_id": peer.session_id if peer and evidence == "session-start" else None,
                "latency_ms": round((time.monotonic() - t0) * 1000, 1)}

    async def _resubmit_if_draft(self, slot: Slot, adapter: Any, text: str) -> None:
        """After DRAFT_CHECK_S, send the one extra submit key if ``text`` still sits in the input line
        (opencode 1.18.33 can take Enter before it inserts a paste)."""
        await anyio.sleep(DRAFT_CHECK_S)
        try:
            if verify.typed_text(adapter, await self.transport.screen(slot.name)) == text:
                await self.transport.send_keys(slot.name, adapter.submit.key)
        except (SlotNotFound, TransportError):
            pass

    async def handle_send(self, req: P.SendRequest) -> dict[str, Any]:
        return (await self.send(req)).model_dump()

    # -- the message path: journal -> slot queue -> type -> verify --------------------------------

    @property
    def journal(self) -> Journal:
        """The tenant's journal (opened on first use)."""
        if self._journal is None:
            self._journal = Journal(self.paths.journal, tenant=self.fleet.tenant, host=self.host)
        return self._journal

    @asynccontextmanager
    async def delivering(self) -> AsyncIterator[Any]:
        """Run the delivery machinery for the body of the block: the journal's unfinished
        messages are recovered and every slot's queue gets its worker. :meth:`serve` runs inside
        it; unit tests use it around :meth:`send` on the memory transport."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            self._recover()
            try:
                yield tg
            finally:
                tg.cancel_scope.cancel()
                self.queues.clear()  # the workers end with this task group
                self.inflight.clear()

    def _slot_queue(self, slot: str) -> SlotQueue:
        q = self.queues.get(slot)
        if q is None:
            q = self.queues[slot] = SlotQueue()
            self._tg.start_soon(self._slot_worker, slot, q)
        return q

    def _result(self, d: Delivery, outcome: str, **kw: Any) -> P.SendResult:
        kw.pop("id", None)  # always the message's own id
        return P.SendResult(tenant_id=self.fleet.tenant, host=self.host, slot=d.rec.slot, id=d.rec.id, result=outcome,
                            latency_ms=round((time.monotonic() - d.t0) * 1000, 3),
                            idempotency_key=d.rec.idempotency_key, expires_at=d.rec.expires, **kw)

    async def send(self, req: P.SendRequest) -> P.SendResult:
        """Journal one message, queue it for its slot and answer (semantics: :class:`P.SendRequest`
        and DESIGN.md). The message is committed to the journal before any answer; with
        ``detach`` the answer is ``queued`` at once, otherwise the first of: the final result,
        ``queued`` held by the runtime (``wait="queued"``), ``queued`` held by fleetbus (the slot is
        not available and ``when="available"``). Never raises for a refused message."""
        t0 = time.monotonic()
        if req.idempotency_key:
            rec = self.journal.by_key(req.idempotency_key)
            if rec is not None:
                return await self._duplicate(rec, req, t0)
        slot = self.fleet.slots.get(req.to)
        max_bytes = self.fleet.roster.bus.max_body_bytes
        problem: tuple[str, str] | None = None
        body = req.body
        if slot is None:
            problem = ("unknown-slot", f"unknown slot {req.to!r}; roster slots: {', '.join(self.fleet.slots) or '(none)'}")
        else:
            try:
                body = P.check_body(req.body, max_bytes)
            except P.InvalidBody as e:
                problem, body = ("invalid-body", str(e)), ascii(req.body[:200])  # kept for the log, never typed
        options = {"verify": req.verify, "wait": req.wait, "when": req.when, "timeout_s": req.timeout_s,
                   "on_busy_input": req.on_busy_input, "detach": req.detach}
        ttl = req.ttl_s or self.fleet.roster.bus.message_ttl_s
        rec = MessageRecord(id=secrets.token_hex(6), slot=req.to, sender=req.sender, body=body, options=options,
                            idempotency_key=req.idempotency_key,
                            expires=time.time() + ttl if req.when == "available" else None)
        rec, created = self.journal.add_message(rec)
        if not created:  # the same key arrived twice at once
            return await self._duplicate(rec, req, t0)
        d = Delivery(rec, req, t0)
        self.publish("message", req.to, id=rec.id, state="queued", result="queued", held_by="fleetbus")
        if problem is not None:
            self._finish(d, self._result(d, "rejected", code=problem[0], detail=problem[1]))
            return d.answer  # type: ignore[return-value]
        self.inflight[rec.id] = d
        self._slot_queue(req.to).put(d)
        if req.detach:
            return self._result(d, "queued", held_by="fleetbus",
                                detail="journaled; the router delivers it in order (see `fleet log`)")
        await d.answered.wait()
        return d.answer  # type: ignore[return-value]

    async def _duplicate(self, rec: MessageRecord, req: P.SendRequest, t0: float) -> P.SendResult:
        """A SEND whose idempotency key the journal holds: nothing is typed; the answer is that
        message's result (waiting for it when it is still on its way and the SEND waits)."""
        if rec.slot != req.to or (rec.state != "rejected" and rec.body != req.body.replace("\r\n", "\n")):
            return P.SendResult(tenant_id=self.fleet.tenant, host=self.host, slot=req.to, result="rejected",
                                code="idempotency-conflict", idempotency_key=req.idempotency_key,
                                detail=f"idempotency key {req.idempotency_key!r} belongs to message {rec.id} "
                                       f"(slot {rec.slot!r}) with another slot or body; nothing was typed")
        d = self.inflight.get(rec.id)
        if d is not None:
            if not req.detach and d.final is None:
                await d.answered.wait()
            r = d.final or d.answer or self._result(d, "queued", held_by="fleetbus", detail="on its way")
        elif rec.result is not None:
            r = P.SendResult.model_validate(rec.result)
        else:
            r = P.SendResult(tenant_id=self.fleet.tenant, host=self.host, slot=rec.slot, id=rec.id, result="queued",
                             held_by="fleetbus", idempotency_key=rec.idempotency_key, detail=f"journal state {rec.state}")
        return r.model_copy(update={"duplicate": True, "latency_ms": round((time.monotonic() - t0) * 1000, 3)})

    def _finish(self, d: Delivery, r: P.SendResult) -> None:
        """Journal the final result of ``d``, answer its clients and publish the event."""
        if d.final is not None:
            return
        d.final = r
        self.journal.set_state(d.rec, r.result, result=r.model_dump(), evidence=r.evidence, code=r.code,
                               detail=r.detail, retries=r.submit_retries or None)
        d.reply(r)
        self.inflight.pop(d.rec.id, None)
        self.waiters.pop(d.rec.id, None)
        self.publish("message", d.rec.slot, id=d.rec.id, state=r.result, result=r.result, evidence=r.evidence,
                     code=r.code)

    async def _slot_worker(self, name: str, q: SlotQueue) -> None:
        """Type the messages of slot ``name`` one at a time, oldest first. A message whose slot is
        not available is rejected (``when=now``) or waits, polled every AVAILABLE_POLL_S, until
        the slot can take it or its TTL ends (``dead-letter``)."""
        while True:
            await q.wait()
            now = time.time()
            for other in list(q.items):
                if other.final is not None:
                    q.items.remove(other)
                elif other.rec.expires is not None and now >= other.rec.expires and other.rec.state == "queued":
                    q.items.remove(other)
                    self._finish(other, self._result(other, "dead-letter", code="ttl-expired",
                                                     detail=f"slot {name!r} was not available within the TTL; "
                                                            "nothing was typed"))
            if not q.items:
                continue
            d = q.items[0]
            try:
                out = await (self._attempt(d) if d.rec.state == "queued" else self._recover_one(d))
            except Exception as e:  # a bug or a transport failure must never stop the slot's queue
                log.exception("delivery of %s to %s failed", d.rec.id, name)
                if d.rec.state != "queued":
                    self._finish(d, self._result(d, "unconfirmed", detail=f"delivery failed after typing began: {e}"))
                    out = None
                else:
                    out = Unavailable("transport", f"{type(e).__name__}: {e}")
            if out is None:
                if q.items and q.items[0] is d:
                    q.items.popleft()
                continue
            if d.req.when == "now":
                q.items.popleft()
                self._finish(d, self._result(d, "rejected", code=out.code, detail=out.detail))
                continue
            for other in list(q.items):  # the ones behind it cannot be typed either
                if other.rec.state != "queued":
                    continue
                if other.req.when == "now":
                    q.items.remove(other)
                    self._finish(other, self._result(other, "rejected", code=out.code, detail=out.detail))
                elif not other.held:
                    self._hold(other, out)
            await anyio.sleep(AVAILABLE_POLL_S)

    async def _ack_after_death(self, slot: Slot, w: _Waiter) -> bool:
        """Wait one heartbeat interval plus 0.5 s for an ack that is still on its way after the
        runtime died (a hook that found the sidecar busy spooled it; the sidecar replays its spool
        every beat). True when it came: the runtime did take the message."""
        with anyio.move_on_after(slot.heartbeat_ms / 1000 + 0.5):
            await w.accepted.wait()
        return w.accepted.is_set()

    def _sidecar_lost(self, w: _Waiter) -> bool:
        """The sidecar that was registered when ``w``'s message was typed is stale or replaced."""
        peer = self.table.peers.get(w.slot)
        return w.peer is not None and (peer is not w.peer or peer.stale)

    def _runtime_exited(self, slot: str, diag: dict[str, Any]) -> None:
        """Supervisor exit listener: the program of ``slot`` died (or the tmux server did). A
        message typed into it or held in its own queue that it never acknowledged, on a hook
        runtime whose sidecar was connected (so an ack would have come), was taken by no one:
        it goes back into the slot's queue, ahead of newer messages, and is typed into the
        restarted runtime (``when=available``) or rejected ``slot-dead`` (``when=now``). On
        pane-diff runtimes such a message stays as verification decides (a shell may have run
        it)."""
        for d in list(self.inflight.values()):
            w = d.waiter
            if (d.rec.slot != slot or d.final is not None or w is None or w.accepted.is_set() or not w.use_ack
                    or d.rec.state not in ("typing", "injected", "runtime-queued")):
                continue
            w.died = True
            w.changed.set()
            if d.follow_scope is not None:
                d.follow_scope.cancel()

    def _requeue(self, d: Delivery) -> Unavailable:
        """Journal ``d`` back to ``queued`` after its runtime died without acknowledging it."""
        self.waiters.pop(d.rec.id, None)
        d.waiter, d.follow_scope, d.held = None, None, False
        detail = "the runtime died before acknowledging it; it goes to the restarted runtime"
        self.journal.set_state(d.rec, "queued", held_by="fleetbus", code="runtime-died", detail=detail)
        self.publish("message", d.rec.slot, id=d.rec.id, state="queued", result="queued", held_by="fleetbus",
                     code="runtime-died")
        return Unavailable("slot-dead", f"slot {d.rec.slot!r}: its runtime died before taking the message")

    def _hold(self, d: Delivery, out: Unavailable) -> None:
        """``d`` waits in the journal for its slot (``when=available``): tell its clients so."""
        d.held = True
        self.journal.set_state(d.rec, "queued", held_by="fleetbus", code=out.code, detail=out.detail)
        if d.req.wait != "accepted":  # a SEND that waits for acceptance keeps waiting
            d.reply(self._result(d, "queued", held_by="fleetbus", code=out.code,
                                 detail=f"{out.detail}; held until the slot is available"))
        self.publish("message", d.rec.slot, id=d.rec.id, state="queued", result="queued", held_by="fleetbus",
                     code=out.code)

    async def _attempt(self, d: Delivery) -> Unavailable | None:
        """Type ``d`` into its slot and verify it; finishes it (or leaves it ``runtime-queued``
        with a follower task). Returns :class:`Unavailable` when the slot cannot take it now;
        nothing was typed then."""
        req, rec = d.req, d.rec
        slot = self.fleet.slots[rec.slot]
        adapter = get_adapter(slot.runtime)
        try:
            screen = await self.transport.screen(slot.name)
        except SlotNotFound:
            return Unavailable("slot-down", f"slot {slot.name!r} is not running")
        if screen.dead:
            return Unavailable("slot-dead", f"slot {slot.name!r}: its program has exited (see `fleet ps`)")
        typed = verify.typed_text(adapter, screen)
        if typed != "":
            screen, typed = await self._settle_prompt(slot, adapter)
        if typed is None:
            return Unavailable("no-prompt", f"{slot.name!r} is not at its prompt (a program may be running in it, or "
                                            "it is still starting); nothing was typed")
        if typed:
            if req.on_busy_input == "fail":
                return Unavailable("busy-input", f"the input line of {slot.name!r} already holds text ({typed[:60]!r}); "
                                                 "nothing was typed (use --on-busy-input=clear to clear it first)")
            await self.transport.send_keys(slot.name, *adapter.clear_keys)
            with anyio.move_on_after(2.0):  # wait for the program to redraw its empty input line
                while typed:
                    await anyio.sleep(POLL_S)
                    typed = verify.typed_text(adapter, await self.transport.screen(slot.name))
            if typed is None or typed:
                return Unavailable("busy-input", f"could not clear the input line of {slot.name!r} ({(typed or '')[:60]!r})")

        mk = marker(rec.id)
        text = adapter.frame(rec.body, rec.id, rec.sender, slot.name)
        peer = self.table.peers.get(slot.name)
        use_ack = adapter.has_hook and peer is not None and not peer.stale
        was_busy = (peer is not None and peer.state == "busy") or verify.is_busy(adapter, screen)
        w = d.waiter = self.waiters[rec.id] = _Waiter(slot.name, rec.id, d.t0)
        w.use_ack, w.peer = use_ack, peer
        if peer is not None:
            await self._send(peer.addr, P.Expect(id=rec.id, marker=mk))
        self.journal.set_state(rec, "typing", pane_pid=screen.pid)  # write-ahead: see _recover_one
        try:
            await self.transport.deliver(slot.name, text, adapter.submit)
        except SlotNotFound:
            self.journal.set_state(rec, "queued", held_by="fleetbus", detail="the slot vanished before typing")
            self.waiters.pop(rec.id, None)
            return Unavailable("slot-down", f"slot {slot.name!r} vanished before typing")
        self.journal.set_state(rec, "injected")
        self.publish("message", slot.name, id=rec.id, state="injected", result="injected")
        if not req.verify:
            self._finish(d, self._result(d, "injected"))
            return None
        deadline = time.monotonic() + (req.timeout_s or self.fleet.roster.bus.verify_timeout_s)
        if not await self._verify(d, slot, adapter, mk, use_ack, was_busy, deadline):
            return self._requeue(d)
        return None

    async def _verify(self, d: Delivery, slot: Slot, adapter: Any, mk: str, use_ack: bool, was_busy: bool,
                      deadline: float) -> bool:
        """Decide ``d``'s outcome by ack or pane diff until ``deadline`` (monotonic s). A message
        the runtime's TUI holds becomes ``runtime-queued`` and a follower task waits for it to be
        taken, so the slot's next message is not held up by a long turn. Returns False when the
        runtime died before acknowledging it (the caller puts it back: :meth:`_requeue`)."""
        w = d.waiter
        w.use_ack = use_ack
        as_queued = d.req.model_copy(update={"wait": "queued"})

        def result(outcome: str, **kw: Any) -> P.SendResult:
            return self._result(d, outcome, **kw)

        if use_ack:
            r = await self._verify_by_ack(slot, adapter, mk, w, as_queued, deadline, was_busy, result)
            if r is None and not w.died and not w.accepted.is_set() and self._sidecar_lost(w):
                use_ack = w.use_ack = False  # an ack in flight may be gone with it: the pane decides
                r = await self._verify_by_pane(slot, adapter, mk, w, as_queued, deadline, result)
        else:
            r = await self._verify_by_pane(slot, adapter, mk, w, as_queued, deadline, result)
        if w.died and not await self._ack_after_death(slot, w):
            return False
        if r is None and w.accepted.is_set():  # the ack came just as the runtime died
            r = result("accepted", evidence="runtime-ack", submit_retries=w.retries, queued_ms=w.queued_ms(),
                       session_id=w.ack.session_id if w.ack else None)
        r = r or await self._final_verdict(slot, adapter, mk, w, use_ack, result)
        if r.result != "queued":
            self._finish(d, r)
            return True
        r = r.model_copy(update={"held_by": "runtime"})
        self.journal.set_state(d.rec, "runtime-queued", held_by="runtime", evidence=r.evidence, queued_ms=r.queued_ms)
        self.publish("message", slot.name, id=d.rec.id, state="runtime-queued", result="queued", held_by="runtime",
                     evidence=r.evidence)
        if d.req.wait == "queued":
            d.reply(r)
        self._tg.start_soon(self._follow_queued, d, slot, adapter, mk, use_ack, r)
        return True

    async def _follow_queued(self, d: Delivery, slot: Slot, adapter: Any, mk: str, use_ack: bool,
                             queued: P.SendResult) -> None:
        """Wait for a runtime-queued message to be taken: the runtime's ack, or (pane-diff
        runtimes) its marker above the input line; until the SEND's ``timeout_s`` with
        ``wait="accepted"``, else :data:`QUEUE_TIMEOUT_S` s after the SEND. Then ``accepted`` or
        ``unconfirmed``."""
        w = d.waiter
        limit = d.req.timeout_s if d.req.wait == "accepted" and d.req.timeout_s else P.QUEUE_TIMEOUT_S
        deadline = d.t0 + limit
        with anyio.move_on_after(max(0.0, deadline - time.monotonic())) as d.follow_scope:
            while not w.accepted.is_set():
                if use_ack:
                    await w.accepted.wait()
                    break
                await anyio.sleep(0.25)
                try:
                    scr = await self.transport.screen(slot.name, history=HISTORY_ROWS)
                except SlotNotFound:
                    break
                if verify.classify(adapter, scr, mk) == "accepted":
                    self._finish(d, self._result(d, "accepted", evidence="pane-diff", queued_ms=queued.queued_ms,
                                                 submit_retries=w.retries))
                    return
        if w.accepted.is_set():
            self._finish(d, self._result(d, "accepted", evidence="runtime-ack", queued_ms=queued.queued_ms,
                                         submit_retries=w.retries, session_id=w.ack.session_id if w.ack else None))
        elif w.died and d.final is None and await self._ack_after_death(slot, w):
            self._finish(d, self._result(d, "accepted", evidence="runtime-ack", queued_ms=queued.queued_ms,
                                         submit_retries=w.retries, session_id=w.ack.session_id if w.ack else None))
        elif w.died and d.final is None:
            self._requeue(d)
            q = self._slot_queue(d.rec.slot)
            at = next((i for i, o in enumerate(q.items) if o.rec.state == "queued" and o.rec.created > d.rec.created),
                      len(q.items))
            q.items.insert(at, d)
            q.wake()
        elif d.final is None:
            self._finish(d, self._result(d, "unconfirmed", queued_ms=queued.queued_ms, submit_retries=w.retries,
                                         detail=f"held in the runtime's queue and not taken within {limit:g} s"))

    # -- recovery after a router restart --------------------------------------------------------

    def _recover(self) -> None:
        """Queue the journal's unfinished messages again, in their order. Messages that were
        being typed or verified get a waiter at once, so acks the sidecars replay after they
        re-register find them (see :meth:`_recover_one`)."""
        fields = set(P.SendRequest.model_fields)
        n = 0
        for rec in self.journal.unfinished():
            if rec.id in self.inflight:
                continue
            d = Delivery(rec, P.SendRequest(req="recovered", to=rec.slot, body=rec.body, sender=rec.sender,
                                            **{k: v for k, v in rec.options.items() if k in fields}),
                         time.monotonic(), recovered=True)
            if rec.slot not in self.fleet.slots:
                self._finish(d, self._result(d, "rejected", code="unknown-slot",
                                             detail=f"slot {rec.slot!r} is no longer in the roster"))
                continue
            if rec.state != "queued":
                d.waiter = self.waiters[rec.id] = _Waiter(rec.slot, rec.id, d.t0)
            self.inflight[rec.id] = d
            self._slot_queue(rec.slot).put(d)
            n += 1
        if n:
            states = Counter(d.rec.state for d in self.inflight.values())
            log.info("recovered %d unfinished message(s) from the journal (%s)", n,
                     ", ".join(f"{k} {v}" for k, v in sorted(states.items())))

    async def _recover_one(self, d: Delivery) -> Unavailable | None:
        """Finish a message that a previous router left ``typing``, ``injected`` or
        ``runtime-queued``. Never types it twice:

        1. a hook runtime's sidecar re-registers and replays its recent acks (waited for up to
           the slot's liveness period plus RECOVERY_GRACE_S): an ack makes it ``accepted``;
        2. the marker anywhere in the pane (screen and RECOVERY_HISTORY_ROWS of scrollback)
           means it was typed: verification resumes (a draft gets its one submit key);
        3. a message left ``typing`` whose marker is nowhere in the pane of the same process
           (same pane pid) of a :attr:`Adapter.line_history` runtime was never typed: it is
           typed now;
        4. anything else is ``unconfirmed`` (no evidence either way; it is not re-typed).
        """
        rec, w = d.rec, d.waiter
        slot = self.fleet.slots[rec.slot]
        adapter = get_adapter(slot.runtime)
        mk = marker(rec.id)
        if adapter.has_hook and self.spawn_sidecars:
            deadline = time.monotonic() + slot.heartbeat_ms * slot.liveness / 1000 + RECOVERY_GRACE_S
            while not w.accepted.is_set() and time.monotonic() < deadline:
                peer = self.table.peers.get(slot.name)
                if peer is not None and self.table.clock() - peer.registered_at >= ACK_REPLAY_S:
                    break
                w.changed = anyio.Event()
                with anyio.move_on_after(0.1):
                    await w.changed.wait()
        if w.accepted.is_set():
            self._finish(d, self._result(d, "accepted", evidence="runtime-ack", session_id=w.ack.session_id if w.ack else None,
                                         detail="acknowledged after the router restarted"))
            return None
        try:
            screen = await self.transport.screen(slot.name, history=RECOVERY_HISTORY_ROWS)
        except SlotNotFound:
            screen = None
        seen = screen is not None and mk in screen.text
        peer = self.table.peers.get(slot.name)
        use_ack = adapter.has_hook and peer is not None and not peer.stale
        w.peer = peer if use_ack else None
        if seen and screen is not None and not screen.dead:
            deadline = time.monotonic() + (d.req.timeout_s or self.fleet.roster.bus.verify_timeout_s)
            if not await self._verify(d, slot, adapter, mk, use_ack, False, deadline):
                return self._requeue(d)
            return None
        typing_pid = next((c["data"].get("pane_pid") for c in reversed(self.journal.changes_of(rec.id))
                           if c["state"] == "typing"), None)
        if (rec.state == "typing" and not seen and adapter.line_history and screen is not None and not screen.dead
                and typing_pid is not None and screen.pid == typing_pid):
            self.journal.set_state(rec, "queued", held_by="fleetbus",
                                   detail="not in the pane: the router stopped before typing it; typing it now")
            self.waiters.pop(rec.id, None)
            return await self._attempt(d)
        why = ("the router stopped while typing it" if rec.state == "typing"
               else "the router restarted before the runtime acknowledged it")
        self._finish(d, self._result(d, "unconfirmed", detail=f"{why}; no ack and no pane evidence since; "
                                                              "it is not typed again"))
        return None

    async def _verify_by_ack(self, slot: Slot, adapter: Any, mk: str, w: _Waiter, req: P.SendRequest,
                             deadline: float, was_busy: bool, result: Any) -> P.SendResult | None:
        """Wait for the runtime's ack. One look at the pane after DRAFT_CHECK_S: a message still in
        the input line lost its submit key (seen with Claude Code 2.1.197 right after start-up) and
        gets the one extra key; a busy runtime's queue indicator makes the message ``queued``.
        While the slot was busy at send time the pane is watched for the queue indicator every
        QUEUE_POLL_S. Returns None when the deadline passed without an answer, and as soon as the
        slot's sidecar is lost (stale, or re-registered: a sidecar killed with hook datagrams in its
        queue loses them), so the caller can decide from the pane instead."""
        check_at = time.monotonic() + DRAFT_CHECK_S
        draft_checked = False
        watch = was_busy  # poll the pane for the queue indicator
        while not w.accepted.is_set() and not w.died:
            now = time.monotonic()
            if now >= deadline or (w.queued_at is not None and req.wait == "queued") or self._sidecar_lost(w):
                break
            if w.queued_at is not None:
                until = deadline
            elif watch:
                until = min(deadline, now + QUEUE_POLL_S, check_at if not draft_checked else deadline)
            elif not draft_checked:
                until = min(deadline, check_at)
            else:
                until = deadline
            until = min(until, now + SIDECAR_CHECK_S)
            w.changed = anyio.Event()
            with anyio.move_on_after(max(0.0, until - time.monotonic())):
                await w.changed.wait()
            if w.accepted.is_set() or w.queued_at is not None:
                continue
            due = not draft_checked and time.monotonic() >= check_at
            if not (watch or due):
                continue
            try:
                verdict = verify.classify(adapter, await self.transport.screen(slot.name), mk)
            except SlotNotFound:
                return None
            if verdict == "queued":
                w.queued_at = time.monotonic()
            elif due:
                draft_checked = True
                if verdict == "draft":
                    await self.transport.send_keys(slot.name, adapter.submit.key)
                    w.retries = 1
                    watch = True  # the late submit may land in a queue
        if w.accepted.is_set():
            ack = w.ack
            return result("accepted", id=w.msg_id, evidence="runtime-ack", submit_retries=w.retries,
                          session_id=ack.session_id if ack else None, queued_ms=w.queued_ms())
        if w.queued_at is not None:
            return result("queued", id=w.msg_id, evidence="runtime-ack" if w.queued_ack else "pane-diff",
                          submit_retries=w.retries, queued_ms=w.queued_ms(),
                          detail=f"{slot.name!r} is in a turn; its TUI holds the message and takes it when the "
                                 "turn ends" + ("" if req.wait == "queued" else " (not taken before the timeout)"))
        return None

    async def _verify_by_pane(self, slot: Slot, adapter: Any, mk: str, w: _Waiter, req: P.SendRequest,
                              deadline: float, result: Any) -> P.SendResult | None:
        """Pane-diff: poll the screen until the marker shows above the input region. A message
        still in the input line DRAFT_CHECK_S after typing gets the one extra submit key."""
        check_at = time.monotonic() + DRAFT_CHECK_S
        while time.monotonic() < deadline and not w.died:
            try:
                scr = await self.transport.screen(slot.name, history=HISTORY_ROWS)
            except SlotNotFound:
                return None
            verdict = verify.classify(adapter, scr, mk)
            if verdict == "accepted":
                return result("accepted", id=w.msg_id, evidence="pane-diff", queued_ms=w.queued_ms(),
                              submit_retries=w.retries,
                              detail="" if not adapter.has_hook else "sidecar not connected: verified by pane diff")
            if verdict == "draft" and not w.retries and time.monotonic() >= check_at:
                await self.transport.send_keys(slot.name, adapter.submit.key)
                w.retries = 1
            if verdict == "queued" and w.queued_at is None:
                w.queued_at = time.monotonic()
                if req.wait == "queued":
                    return result("queued", id=w.msg_id, evidence="pane-diff", queued_ms=w.queued_ms(),
                                  detail=f"{slot.name!r} is busy; its TUI holds the message")
            await anyio.sleep(POLL_S)
        return None

    async def _final_verdict(self, slot: Slot, adapter: Any, mk: str, w: _Waiter, use_ack: bool,
                             result: Any) -> P.SendResult:
        """After the timeout: a draft gets one extra submit key in all (never re-typed text)."""
        msg_id, retries = w.msg_id, w.retries
        draft_detail = (f"the message sits unsubmitted in the input line of {slot.name!r} "
                        f"(one extra {adapter.submit.key} was sent)")
        try:
            verdict = verify.classify(adapter, await self.transport.screen(slot.name, history=HISTORY_ROWS), mk)
        except SlotNotFound:
            return result("unconfirmed", id=msg_id, detail=f"slot {slot.name!r} vanished during verification")
        if verdict == "queued" or w.queued_at is not None and verdict != "draft":
            return result("queued", id=msg_id, evidence="runtime-ack" if w.queued_ack else "pane-diff",
                          submit_retries=retries, queued_ms=w.queued_ms(),
                          detail="its TUI still holds the message after the timeout")
        if verdict == "draft" and retries:
            return result("draft", id=msg_id, submit_retries=retries, detail=draft_detail)
        if verdict != "draft":
            return result("unconfirmed", id=msg_id, submit_retries=retries,
                          detail="no runtime ack and no pane evidence before the timeout")
        await self.transport.send_keys(slot.name, adapter.submit.key)
        with anyio.move_on_after(1.0 if use_ack else 0.5):
            if use_ack:
                await w.accepted.wait()
            else:
                await anyio.sleep(0.5)
        if w.accepted.is_set():
            return result("accepted", id=msg_id, evidence="runtime-ack", submit_retries=1,
                          session_id=w.ack.session_id if w.ack else None)
        scr = await self.transport.screen(slot.name, history=HISTORY_ROWS)
        verdict = verify.classify(adapter, scr, mk)
        if verdict == "accepted" and not use_ack:
            return result("accepted", id=msg_id, evidence="pane-diff", submit_retries=1)
        if verdict == "draft":
            return result("draft", id=msg_id, submit_retries=1, detail=draft_detail)
        return result("unconfirmed", id=msg_id, submit_retries=1, detail="no evidence after one extra submit key")


class _Waiter:
    """Verification state of one message in flight."""

    def __init__(self, slot: str, msg_id: str, started: float):
        self.slot = slot
        self.msg_id = msg_id
        self.accepted = anyio.Event()
        self.changed = anyio.Event()
        self.ack: P.Ack | None = None
        self.started = started
        self.queued_at: float | None = None
        self.queued_ack = False
        self.retries = 0
        self.use_ack = False  # verified by the runtime's ack (its sidecar was connected)
        self.died = False  # the runtime died before acknowledging it (see Router._runtime_exited)
        self.peer: Any = None  # the sidecar registered when it was typed

    def queued_ms(self) -> float | None:
        return None if self.queued_at is None else round((self.queued_at - self.started) * 1000, 3)


class RequestError(Exception):
    """A client request that fails with a stable ``code``."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
