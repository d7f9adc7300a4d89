"""The router daemon: ZeroMQ endpoints, liveness table, delivery with verification, status.

One :class:`Router` per tenant. It binds a ROUTER socket (sidecars and clients, protocol v1)
and a PUB socket (events) on ``ipc://`` endpoints inside the tenant's private 0700 runtime dir,
owns the transport, and answers client requests. Local peers are checked by uid and, with the
roster's ``bus.tcp``, remote sidecars reach a second ROUTER socket with CURVE keys from an
allow-list (ZAP, :mod:`fleetbus.router.auth`); a peer's :class:`Addr` names the socket its
replies go out on. Each socket has one reader task that is never cancelled mid-receive; replies
go through one lock. Runs on anyio's asyncio backend (``zmq.asyncio``; pyzmq has no trio support).

The message path (journal, per-slot queues, typing, verification, recovery) lives in
:mod:`fleetbus.router.messages`; restart policies and exit diagnostics in
:mod:`fleetbus.router.supervisor`.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
from typing import Any

import anyio
import zmq
import zmq.asyncio
from pydantic import BaseModel

from fleetbus import protocol as P
from fleetbus.adapters import HOOK_COMMAND, get_adapter
from fleetbus.config import FleetConfig, Slot
from fleetbus.logs import LogBudget
from fleetbus.paths import FleetPaths, fleet_paths
from fleetbus.router import procs
from fleetbus.router.auth import (EVENTS_DOMAIN, LOCAL_DOMAIN, PeerAuthenticator, local_authenticator,
                                  protect)
from fleetbus.router.delivery import Delivery, SlotQueue
from fleetbus.router.journal import Journal
from fleetbus.router.limits import Limits, client_of
from fleetbus.router.liveness import Addr, LivenessTable
from fleetbus.router.messages import MessagePath, _Waiter
from fleetbus.router.remote import Keyring, RemotePeers, TcpEndpoint
from fleetbus.router.slotops import RequestError, SlotOps  # RequestError: tasks and tests import it from here
from fleetbus.router.status import Beat, collect_status
from fleetbus.router.supervisor import Supervisor
from fleetbus.router.tasks import Dispatcher
from fleetbus.safepath import atomic_write, open_private_file
from fleetbus.transports.base import LaunchSpec, SlotNotFound, Transport, TransportError, resolve_transport

log = logging.getLogger("fleetbus.router")

#: Events the PUB socket queues per subscriber before it drops that subscriber's events (SNDHWM);
#: ``Event.seq`` shows the gaps. A fleetbus client's own SUB socket drains the router's queue into
#: its process (RCVHWM 100,000), so only a subscriber that stopped reading altogether reaches this:
#: 20 such subscribers and 100,000 events grew a router by 272 MB at 100,000 (never given back),
#: 50,000 events by 1.6 MB at 1,000.
EVENTS_HWM = 1000

#: Request kinds the router answers with ``bad-request`` when their frame does not validate.
CLIENT_KINDS = ("SEND", "PUBLISH", "TASK", "PS", "START", "STOP", "RESTART", "RESET", "INTERRUPT", "HEALTH", "SHUTDOWN",
                "KEYS")



class RouterAlreadyRunning(RuntimeError):
    """Another router holds this tenant's lock."""


class RouterBindError(RuntimeError):
    """An endpoint cannot be served (``bus.tcp`` port in use, unusable router key)."""


def launch_spec(fleet: FleetConfig, paths: FleetPaths, slot: Slot) -> LaunchSpec:
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
    argv0, path, exe = slot.program()
    if exe is None:
        raise TransportError(f"slot {slot.name!r}: program {argv0!r} not found on PATH={path}")
    argv = [exe, *(slot.command or adapter.command)[1:]]
    if adapter.hook_setup is not None:
        hooks = adapter.hook_setup(HOOK_COMMAND)
        slot_dir = paths.slot_dir(slot.name)
        slot_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for name, content in hooks.files.items():
            atomic_write(slot_dir / name, content)  # 0600, never through a link
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


def make_transport(fleet: FleetConfig, paths: FleetPaths, long_lived: bool = False) -> Transport:
    """The roster's transport. ``long_lived`` (the router) keeps a tmux control-mode client."""
    cfg = fleet.roster.transport
    cls = resolve_transport(cfg.kind)
    if cfg.kind == "tmux":
        return cls(paths.tmux_socket, width=cfg.width, height=cfg.height, control=long_lived,
                   scratch_dir=paths.run_dir if long_lived else None)
    return cls()


class Router(MessagePath, SlotOps, TcpEndpoint):
    """The router of one tenant.

    Args:
        fleet: the loaded roster. paths: the tenant's paths (default: from the roster).
        transport: override the roster's transport (tests).
        spawn_sidecars: start a sidecar for every slot that has none (False in unit tests).
    """

    def __init__(self, fleet: FleetConfig, paths: FleetPaths | None = None, transport: Transport | None = None,
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
        self.ignored_acks = 0  # acks for messages that were never typed (MessagePath._late_ack)
        self.started = time.time()
        self._send_lock = anyio.Lock()
        self._stop = anyio.Event()
        self._teardown = False
        self.ctx: zmq.asyncio.Context | None = None
        self.sock: zmq.asyncio.Socket | None = None
        self.tcp_sock: zmq.asyncio.Socket | None = None  # bus.tcp: remote sidecars (CURVE)
        self.pub: zmq.asyncio.Socket | None = None
        self.auth: PeerAuthenticator | None = None
        #: remote peers: CURVE keys bound to slots (fleetbus.router.remote); the folder is set by _bind
        self.remote = RemotePeers(Keyring(None))
        self._tcp_scope: anyio.CancelScope | None = None
        self._refused_hellos: set[tuple[str, str]] = set()
        self._lockfd: int | None = None
        #: restart policy, backoff, crash-loop, exit diagnostics, sidecar respawn (a task of serve)
        self.supervisor = Supervisor(self)
        self.supervisor.exit_listeners.append(self._runtime_exited)
        #: task routing (selectors, lifecycle, recovery; a task of serve)
        self.tasks = Dispatcher(self)
        # after the slot event is published: subscribers see the cause before the task's end
        self.supervisor.event_listeners.append(self.tasks.on_slot_event)
        self.event_seq = 0
        #: queue-full and rate-limited refusals, journal retention, housekeeping (a task of serve)
        self.limits = Limits(self)
        self._unreachable_log = LogBudget(window_s=60.0, burst=5)

    # -- startup / shutdown --------------------------------------------------------------------

    def _acquire_lock(self) -> None:
        fd = open_private_file(self.paths.router_lock, os.O_RDWR)
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
        if tcp:
            self.remote.keyring.folder = keys.allowed_dir(self.paths)
        self.auth = local_authenticator(self.ctx, self.remote.keyring if tcp else None,
                                        lambda: keys.revoked_keys(self.paths))
        self.auth.start()  # before any bind: a handshake must never find no handler
        self.sock = self._router_socket()
        protect(self.sock, LOCAL_DOMAIN)
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.setsockopt(zmq.SNDHWM, EVENTS_HWM)
        protect(self.pub, EVENTS_DOMAIN)
        old = os.umask(0o077)  # socket files 0600 inside the 0700 runtime dir
        try:
            self.sock.bind(self.paths.router_endpoint)
            self.pub.bind(self.paths.events_endpoint)
        finally:
            os.umask(old)
        if tcp:
            try:
                self.tcp_sock = self._tcp_socket()
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
                tg.start_soon(self.tasks.run)
                tg.start_soon(self.limits.run)
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
            # a client that left before its answer: at most 5 lines a minute per kind of failure
            if self._unreachable_log.allow((type(msg).__name__, e.errno)):
                log.warning("cannot send %s to %s: %s", type(msg).__name__, addr, e)
            return False

    def publish(self, topic: str, slot: str | None = None, **data: Any) -> None:
        """Publish an event on the PUB socket (never blocks; PUB drops a subscriber's events
        beyond EVENTS_HWM). Events are numbered (``seq``) so a subscriber sees gaps."""
        if self.pub is None:
            return
        self.event_seq += 1
        ev = P.Event(topic=topic, seq=self.event_seq, slot=slot, tenant_id=self.fleet.tenant, host=self.host, data=data)
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
                tg.start_soon(self._serve_tcp)

    async def _read_socket(self, via: str, sock: zmq.asyncio.Socket) -> None:
        tcp = via == "tcp"
        while True:
            frames = await sock.recv_multipart(copy=False)  # Frames: their metadata names the peer (pid, key)
            if len(frames) != 2:
                self.dropped_frames += 1
                log.warning("dropped frame with %d parts (%s)", len(frames), via)
                continue
            addr = Addr(via, frames[0].bytes)
            try:
                msg = P.decode(frames[1].bytes)
            except P.ProtocolError as e:
                self.dropped_frames += 1
                log.warning("dropped malformed frame from %s: %s", addr, e)
                if e.req is not None and via == "ipc" and e.kind in CLIENT_KINDS:
                    # a request that names itself gets an answer, not a client-side timeout
                    self._tg.start_soon(self._send, addr, P.Result(req=e.req, ok=False, code="bad-request",
                                                                   error=str(e)))
                continue
            try:
                # tcp: the ZAP User-Id (key:NAME) of the connection the frame came on
                self._dispatch(addr, msg, frames[1], frames[1].get("User-Id") if tcp else None)
            except Exception as e:  # a handler bug must never take the reader down (logged once a minute)
                self.dropped_frames += 1
                self.failures.exception(f"handler:{type(msg).__name__}:{type(e).__name__}", "handler failed for %s",
                                        type(msg).__name__)

    #: Frames a peer of the tcp socket may send: remote peers are sidecars, never clients.
    SIDECAR_FRAMES = (P.Hello, P.Ping, P.Ack, P.Bye, P.HookEvent)

    def _dispatch(self, addr: Addr, msg: Any, frame: Any = None, identity: str | None = None) -> None:
        """Handle one decoded frame from ``addr`` (socket + routing id); ``frame`` is the received
        zmq Frame (its metadata names the client for the send rate limit); ``identity``: the ZAP
        User-Id of a tcp frame (``key:NAME``)."""
        tg = self._tg
        if addr.via != "ipc":
            if not isinstance(msg, self.SIDECAR_FRAMES):
                self.dropped_frames += 1
                log.warning("refused %s frame from %s: only sidecar frames are accepted over tcp", msg.kind, addr)
                if isinstance(getattr(msg, "req", None), str):
                    tg.start_soon(self._send, addr, P.Result(req=msg.req, ok=False, code="forbidden",
                                                            error="client requests are accepted on the local socket only"))
                return
            why = None if isinstance(msg, P.Hello) else self.remote.frame_refusal(identity, self.table.at(addr))
            if why is not None:  # another key's frame, or its key was revoked: the peer is gone
                self.dropped_frames += 1
                if self._drop_revoked() == []:
                    tg.start_soon(self._send, addr, P.Disconnect(reason=why))
                return
        if isinstance(msg, P.Hello):
            tg.start_soon(self._on_hello, addr, msg, identity)
        elif isinstance(msg, (P.Ping, P.Ack, P.Bye, P.HookEvent)):
            peer = self.table.seen(addr)
            if peer is None:
                tg.start_soon(self._send, addr, P.Disconnect(reason="unknown peer; send HELLO"))
                return
            if isinstance(msg, P.Ping):
                if msg.state != peer.state:
                    self.publish("heartbeat", peer.slot, state=msg.state, previous=peer.state)
                    peer.state = msg.state
                    self.tasks.on_state(peer.slot, msg.state)
                peer.state_at = msg.state_at
                peer.session_id = msg.session_id or peer.session_id
                tg.start_soon(self._send, addr, P.Pong())
            elif isinstance(msg, P.Ack):
                self.tasks.on_ack(peer.slot, msg)
                self._on_ack(peer.slot, msg)
            elif isinstance(msg, P.HookEvent):
                self._on_hook_event(peer, msg)
            else:
                self.table.remove(addr)
                self.publish("heartbeat", peer.slot, state="gone")
        elif isinstance(msg, P.SendRequest):
            tg.start_soon(self._answer, addr, msg.req,
                          self.limits.admit(msg, client_of(frame, addr.rid), self.handle_send))
        elif isinstance(msg, P.PublishRequest):
            tg.start_soon(self._answer, addr, msg.req,
                          self.limits.admit(msg, client_of(frame, addr.rid), self.handle_publish))
        elif isinstance(msg, P.TaskRequest):
            tg.start_soon(self._answer, addr, msg.req, self.handle_task(msg))
        elif isinstance(msg, P.PsRequest):
            tg.start_soon(self._answer, addr, msg.req, self.handle_ps())
        elif isinstance(msg, P.SlotRequest):
            tg.start_soon(self._answer, addr, msg.req, self.handle_slot(msg))
        elif isinstance(msg, P.HealthRequest):
            tg.start_soon(self._answer, addr, msg.req, self.handle_health(msg.probe))
        elif isinstance(msg, P.ShutdownRequest):
            tg.start_soon(self._answer, addr, msg.req, self.handle_shutdown(msg))
        elif isinstance(msg, P.KeysRequest):
            tg.start_soon(self._answer, addr, msg.req, self.handle_keys())
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

    async def _on_hello(self, addr: Addr, msg: P.Hello, identity: str | None = None) -> None:
        slot = self.fleet.slots.get(msg.slot)
        if slot is None or msg.tenant != self.fleet.tenant:
            if (msg.tenant, msg.slot) not in self._refused_hellos and len(self._refused_hellos) < 1000:
                self._refused_hellos.add((msg.tenant, msg.slot))  # log once per tenant/slot pair
                log.warning("refused HELLO from %s (pid %d, host %s): slot %r of tenant %r is not in this roster "
                            "(tenant %r)", addr, msg.pid, msg.host, msg.slot, msg.tenant, self.fleet.tenant)
            await self._send(addr, P.Disconnect(reason=f"slot {msg.slot!r} of tenant {msg.tenant!r} is not in this roster"))
            return
        if addr.via == "tcp":
            why = self.remote.hello_refusal(identity, msg.slot, self.table.peers.get(msg.slot))
            if why is not None:
                await self._send(addr, P.Disconnect(reason=why))
                return
        self.table.register(msg.slot, addr, msg.pid, msg.adapter, slot.heartbeat_ms, slot.liveness, identity)
        self.publish("heartbeat", msg.slot, state="registered", pid=msg.pid)
        self.tasks.wake()
        log.info("sidecar %s registered (pid %d, host %s, via %s)", msg.slot, msg.pid, msg.host, addr.via)
        await self._send(addr, P.Welcome(heartbeat_ms=slot.heartbeat_ms, liveness=slot.liveness))

    def _on_hook_event(self, peer: Any, ev: P.HookEvent) -> None:
        """A hook event forwarded by a sidecar: publish it; a session-start confirms resets."""
        self.publish("hook", peer.slot, event=ev.event, source=ev.source, session_id=ev.session_id,
                     markers=ev.markers)
        if ev.event == "turn-end":
            self.tasks.on_turn_end(peer.slot)
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
            if self.tcp_sock is not None:
                self._drop_revoked()  # a key revoked while its sidecar is silent

    # -- requests ------------------------------------------------------------------------------

    async def handle_publish(self, msg: P.PublishRequest) -> list[dict[str, Any]]:
        return [r.model_dump() for r in await self.tasks.publish(msg)]

    async def handle_task(self, msg: P.TaskRequest) -> list[dict[str, Any]]:
        return [r.model_dump() for r in await self.tasks.query(msg)]

    async def handle_health(self, probe: str | None = None) -> dict[str, Any]:
        if probe is not None:
            self.publish("probe", None, probe=probe)
        bus = self.fleet.roster.bus
        return {
            "tenant_id": self.fleet.tenant, "host": self.host, "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 3), "protocol": P.PROTOCOL_VERSION,
            "sidecars": len(self.table.peers), "dropped_frames": self.dropped_frames,
            "ignored_acks": self.ignored_acks,
            # fleetbus.router.auth: distinct peers refused by uid or CURVE key, every refused handshake
            "refused_peers": self.auth.refused_peers if self.auth else 0,
            "refused_handshakes": self.auth.refused_handshakes if self.auth else 0,
            "tcp": self.fleet.roster.bus.tcp,
            "tcp_sidecars": sorted(p.slot for p in self.table.peers.values() if p.via == "tcp"),
            "tcp_keys": {p.slot: (p.identity or "")[4:] for p in self.table.peers.values() if p.via == "tcp"},
            "refused_remote": self.remote.refused,
            "events_endpoint": self.paths.events_endpoint, "verify_timeout_s": bus.verify_timeout_s,
            "task_wait_s": bus.task_wait_s, "task_timeout_s": bus.task_timeout_s,
            "tasks": {"open": len(self.tasks.tasks), "waiting": len(self.tasks.pending)},
            "journal": self.journal_health(),
            # fleetbus.router.limits: refusals per code (queue-full, rate-limited, too-many-tasks)
            "refused": dict(self.limits.refused),
            "queued": {name: len(q.items) for name, q in self.queues.items() if q.items},
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
        journal = self.journal_health()
        for row in rows:
            row["task"] = self.tasks.held_by(row["slot"])
            row["journal"] = journal
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
