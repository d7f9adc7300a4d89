"""The router daemon: ZeroMQ endpoints, liveness table, delivery with verification, status.

One :class:`Router` per tenant. It binds a ROUTER socket (sidecars and clients, protocol v1)
and a PUB socket (events) on ``ipc://`` endpoints inside the tenant's private 0700 runtime dir,
owns the transport, and answers client requests. Each socket has one reader task that is never
cancelled mid-receive; replies go through one lock. Runs on anyio's asyncio backend
(``zmq.asyncio``; pyzmq has no trio support).
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
from fleetbus.router.liveness import LivenessTable
from fleetbus.router.status import Beat, collect_status
from fleetbus.transports.base import LaunchSpec, SlotNotFound, Transport, TransportError, resolve_transport

log = logging.getLogger("fleetbus.router")

#: Pane polling interval of the pane-diff fallback (s); a poll is two control-mode commands (~0.2 ms).
POLL_S = 0.005
#: Seconds after typing at which a hook runtime's input line is checked once for a lost submit key.
DRAFT_CHECK_S = 1.0
#: Scrollback rows captured when looking for a submitted marker.
HISTORY_ROWS = 300


class RouterAlreadyRunning(RuntimeError):
    """Another router holds this tenant's lock."""


def launch_spec(fleet: Fleet, paths: FleetPaths, slot: Slot) -> LaunchSpec:
    """The argv, cwd and environment that start ``slot``'s runtime.

    ``PATH`` is explicit: the slot's ``env.PATH`` if set, else this interpreter's bin dir
    followed by the router's own ``PATH`` (a detached tmux pane has no login shell PATH).

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
        hook_env = hooks.env
    else:
        hook_env = {}
    env = {
        "LANG": os.environ.get("LANG") or "C.UTF-8",
        **adapter.env,
        **hook_env,
        **slot.env,
        "PATH": path,
        "FLEETBUS_SLOT": slot.name,
        "FLEETBUS_TENANT": fleet.tenant,
        "FLEETBUS_RUNTIME": slot.runtime,
        "FLEETBUS_HOOK_SOCKET": str(paths.hook_socket(slot.name)),
    }
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
        self.waiters: dict[str, anyio.Event] = {}
        self.acks: dict[str, P.Ack] = {}
        self.dropped_frames = 0
        self.started = time.time()
        self._send_lock = anyio.Lock()
        self._stop = anyio.Event()
        self._teardown = False
        self.ctx: zmq.asyncio.Context | None = None
        self.sock: zmq.asyncio.Socket | None = None
        self.pub: zmq.asyncio.Socket | None = None
        self._lockfd: int | None = None

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

    def _bind(self) -> None:
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 10_000)
        self.sock.setsockopt(zmq.RCVHWM, 10_000)
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        old = os.umask(0o077)  # socket files 0600 inside the 0700 runtime dir
        try:
            self.sock.bind(self.paths.router_endpoint)
            self.pub.bind(self.paths.events_endpoint)
        finally:
            os.umask(old)

    async def start_fleet(self) -> None:
        """Start the transport, every slot that is missing, and every missing sidecar.

        Live slots are left alone (a router restart never restarts a slot); dead panes are kept
        for their diagnostics until an operator restarts them.
        """
        await self.transport.ensure_server()
        panes = await self.transport.probe_all()
        for name in self.fleet.slots:
            self.ensure_sidecar(name)
        missing = [s for name, s in self.fleet.slots.items() if name not in panes]
        if self.spawn_sidecars:
            # sidecars first, so a runtime's first hook event (session-start) finds its socket
            with anyio.move_on_after(5.0):
                while not all(self.paths.hook_socket(s.name).exists() for s in missing):
                    await anyio.sleep(0.02)
        for slot in missing:
            try:
                await self.transport.start_slot(launch_spec(self.fleet, self.paths, slot))
                self.publish("slot", slot.name, event="started")
            except TransportError as e:
                log.error("cannot start slot %s: %s", slot.name, e)

    def ensure_sidecar(self, slot: str) -> None:
        if self.spawn_sidecars and procs.sidecar_pid(self.paths, slot) is None:
            pid = procs.spawn_sidecar(self.fleet, self.paths, slot)
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
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._reader)
                tg.start_soon(self._sweeper)
                if ready is not None:
                    ready.set()
                await self._stop.wait()
                tg.cancel_scope.cancel()
        finally:
            await self._close()

    async def _close(self) -> None:
        if self._teardown:
            procs.stop_sidecars(self.paths, list(self.fleet.slots))
            await self.transport.shutdown()
        else:
            await self.transport.aclose()
        for s in (self.sock, self.pub):
            if s is not None:
                s.close(linger=0)
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

    async def _send(self, rid: bytes, msg: BaseModel) -> bool:
        """Send to a peer; False when it is gone (ROUTER_MANDATORY: EHOSTUNREACH)."""
        assert self.sock is not None
        try:
            async with self._send_lock:
                await self.sock.send_multipart([rid, P.encode(msg)], flags=zmq.DONTWAIT)
            return True
        except zmq.ZMQError as e:
            log.warning("cannot send %s to %r: %s", type(msg).__name__, rid, e)
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
        assert self.sock is not None
        while True:
            frames = await self.sock.recv_multipart()
            if len(frames) != 2:
                self.dropped_frames += 1
                log.warning("dropped frame with %d parts", len(frames))
                continue
            rid, raw = frames
            try:
                msg = P.decode(raw)
            except P.ProtocolError as e:
                self.dropped_frames += 1
                log.warning("dropped malformed frame from %r: %s", rid[:32], e)
                continue
            try:
                self._dispatch(rid, msg)
            except Exception:  # a handler bug must never take the reader down
                self.dropped_frames += 1
                log.exception("handler failed for %s", type(msg).__name__)

    def _dispatch(self, rid: bytes, msg: Any) -> None:
        tg = self._tg
        if isinstance(msg, P.Hello):
            tg.start_soon(self._on_hello, rid, msg)
        elif isinstance(msg, (P.Ping, P.Ack, P.Bye)):
            peer = self.table.seen(rid)
            if peer is None:
                tg.start_soon(self._send, rid, P.Disconnect(reason="unknown peer; send HELLO"))
                return
            if isinstance(msg, P.Ping):
                if msg.state != peer.state:
                    self.publish("heartbeat", peer.slot, state=msg.state, previous=peer.state)
                peer.state = msg.state
                peer.session_id = msg.session_id or peer.session_id
                tg.start_soon(self._send, rid, P.Pong())
            elif isinstance(msg, P.Ack):
                self._on_ack(peer.slot, msg)
            else:
                self.table.remove(rid)
                self.publish("heartbeat", peer.slot, state="gone")
        elif isinstance(msg, P.SendRequest):
            tg.start_soon(self._answer, rid, msg.req, self.handle_send(msg))
        elif isinstance(msg, P.PsRequest):
            tg.start_soon(self._answer, rid, msg.req, self.handle_ps())
        elif isinstance(msg, P.SlotRequest):
            tg.start_soon(self._answer, rid, msg.req, self.handle_slot(msg))
        elif isinstance(msg, P.HealthRequest):
            tg.start_soon(self._answer, rid, msg.req, self.handle_health())
        elif isinstance(msg, P.ShutdownRequest):
            tg.start_soon(self._answer, rid, msg.req, self.handle_shutdown(msg))
        else:
            self.dropped_frames += 1
            log.warning("unexpected %s frame from %r", msg.kind, rid[:32])

    async def _answer(self, rid: bytes, req: str, work: Any) -> None:
        try:
            data = await work
            result = P.Result(req=req, ok=True, data=data)
        except RequestError as e:
            result = P.Result(req=req, ok=False, code=e.code, error=str(e))
        except Exception as e:
            log.exception("request %s failed", req)
            result = P.Result(req=req, ok=False, code="internal", error=f"{type(e).__name__}: {e}")
        await self._send(rid, result)

    async def _on_hello(self, rid: bytes, msg: P.Hello) -> None:
        slot = self.fleet.slots.get(msg.slot)
        if slot is None or msg.tenant != self.fleet.tenant:
            await self._send(rid, P.Disconnect(reason=f"slot {msg.slot!r} of tenant {msg.tenant!r} is not in this roster"))
            return
        self.table.register(msg.slot, rid, msg.pid, msg.adapter, slot.heartbeat_ms, slot.liveness)
        self.publish("heartbeat", msg.slot, state="registered", pid=msg.pid)
        log.info("sidecar %s registered (pid %d)", msg.slot, msg.pid)
        await self._send(rid, P.Welcome(heartbeat_ms=slot.heartbeat_ms, liveness=slot.liveness))

    def _on_ack(self, slot: str, ack: P.Ack) -> None:
        ev = self.waiters.get(ack.id)
        if ev is None:
            return
        self.acks[ack.id] = ack
        ev.set()

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
        }

    async def handle_ps(self) -> list[dict[str, Any]]:
        panes = await self.transport.probe_all()
        beats = {}
        for name, peer in self.table.peers.items():
            age = self.table.age(name) or 0.0
            beats[name] = Beat(age_s=age, limit_s=peer.heartbeat_ms * peer.liveness / 1000, state=peer.state, sidecar_pid=peer.pid)
        # the process-table pass runs in a worker thread: the event loop keeps answering
        rows = await anyio.to_thread.run_sync(
            lambda: [r.model_dump(by_alias=True) for r in collect_status(self.fleet, panes, beats, source="router",
                                                                        host=self.host)])
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
            if msg.kind == "START":
                panes = await self.transport.probe_all()
                if name in panes and panes[name].alive:
                    raise RequestError("already-running", f"slot {name!r} is already running (pid {panes[name].pid})")
                if name in panes:
                    info = await self.transport.restart_slot(launch_spec(self.fleet, self.paths, slot))
                else:
                    info = await self.transport.start_slot(launch_spec(self.fleet, self.paths, slot))
                self.ensure_sidecar(name)
                self.publish("slot", name, event="started", pid=info.pid)
                return {"slot": name, "pid": info.pid, "alive": info.alive}
            if msg.kind == "STOP":
                procs.stop_sidecar(self.paths, name)
                await self.transport.stop_slot(name)
                self.publish("slot", name, event="stopped")
                return {"slot": name, "stopped": True}
            if msg.kind == "RESTART":
                info = await self.transport.restart_slot(launch_spec(self.fleet, self.paths, slot))
                self.ensure_sidecar(name)
                self.publish("slot", name, event="restarted", pid=info.pid)
                return {"slot": name, "pid": info.pid, "alive": info.alive}
            # RESET
            adapter = get_adapter(slot.runtime)
            if adapter.reset_command is None:
                raise RequestError("no-reset", f"runtime {slot.runtime!r} has no reset command; use `fleet restart {name}`")
            await self.transport.deliver(name, adapter.reset_command, adapter.submit)
            self.publish("slot", name, event="reset", command=adapter.reset_command)
            return {"slot": name, "reset_command": adapter.reset_command}
        except SlotNotFound:
            raise RequestError("slot-down", f"slot {name!r} is not running (run `fleet start {name}`)") from None
        except TransportError as e:
            raise RequestError("transport", str(e)) from None

    async def handle_send(self, req: P.SendRequest) -> dict[str, Any]:
        return (await self.send(req)).model_dump()

    async def send(self, req: P.SendRequest) -> P.SendResult:
        """Deliver one message and, with ``req.verify``, decide its outcome (see DESIGN.md)."""
        t0 = time.monotonic()

        def result(outcome: str, **kw: Any) -> P.SendResult:
            r = P.SendResult(tenant_id=self.fleet.tenant, host=self.host, slot=req.to, result=outcome,
                             latency_ms=round((time.monotonic() - t0) * 1000, 3), **kw)
            self.publish("message", req.to, id=r.id, result=r.result, evidence=r.evidence, code=r.code)
            return r

        slot = self.fleet.slots.get(req.to)
        if slot is None:
            return result("rejected", code="unknown-slot",
                          detail=f"unknown slot {req.to!r}; roster slots: {', '.join(self.fleet.slots) or '(none)'}")
        try:
            body = P.check_body(req.body, self.fleet.roster.bus.max_body_bytes)
        except P.InvalidBody as e:
            return result("rejected", code="invalid-body", detail=str(e))
        adapter = get_adapter(slot.runtime)
        try:
            screen = await self.transport.screen(slot.name)
        except SlotNotFound:
            return result("rejected", code="slot-down", detail=f"slot {slot.name!r} is not running")
        if screen.dead:
            return result("rejected", code="slot-dead", detail=f"slot {slot.name!r}: its program has exited (see `fleet ps`)")
        typed = verify.typed_text(adapter, screen)
        if typed is None:
            return result("rejected", code="no-prompt",
                          detail=f"{slot.name!r} is not at its prompt (a program may be running in it, or it "
                                 "is still starting); nothing was typed")
        if typed:
            if req.on_busy_input == "fail":
                return result("rejected", code="busy-input",
                              detail=f"the input line of {slot.name!r} already holds text ({typed[:60]!r}); "
                                     "nothing was typed (use --on-busy-input=clear to clear it first)")
            await self.transport.send_keys(slot.name, *adapter.clear_keys)
            with anyio.move_on_after(2.0):  # wait for the program to redraw its empty input line
                while typed:
                    await anyio.sleep(POLL_S)
                    typed = verify.typed_text(adapter, await self.transport.screen(slot.name))
            if typed is None or typed:
                return result("rejected", code="busy-input", detail=f"could not clear the input line of {slot.name!r} ({typed[:60]!r})")

        msg_id = secrets.token_hex(6)
        mk = marker(msg_id)
        text = adapter.frame(body, msg_id, req.sender, slot.name)
        peer = self.table.peers.get(slot.name)
        use_ack = adapter.has_hook and peer is not None and not peer.stale
        ev = anyio.Event()
        self.waiters[msg_id] = ev
        try:
            if peer is not None:
                await self._send(peer.routing_id, P.Expect(id=msg_id, marker=mk))
            try:
                await self.transport.deliver(slot.name, text, adapter.submit)
            except SlotNotFound:
                return result("rejected", id=msg_id, code="slot-down", detail=f"slot {slot.name!r} vanished before typing")
            self.publish("message", slot.name, id=msg_id, result="injected")
            if not req.verify:
                return result("injected", id=msg_id)
            timeout = req.timeout_s or self.fleet.roster.bus.verify_timeout_s
            deadline = t0 + timeout
            retries = 0
            if use_ack:
                # one look at the pane after DRAFT_CHECK_S: a message still sitting in the input line
                # lost its submit key (seen with Claude Code 2.1.197 right after start-up), so send
                # the one extra submit key now instead of at the deadline
                async def wait_ack(until: float) -> None:
                    with anyio.move_on_after(max(0.0, until - time.monotonic())):
                        await ev.wait()

                await wait_ack(min(deadline, time.monotonic() + DRAFT_CHECK_S))
                if not ev.is_set() and time.monotonic() < deadline:
                    if verify.classify(adapter, await self.transport.screen(slot.name), mk) == "draft":
                        await self.transport.send_keys(slot.name, adapter.submit.key)
                        retries = 1
                    await wait_ack(deadline)
                if ev.is_set():
                    return result("accepted", id=msg_id, evidence="runtime-ack", submit_retries=retries)
            else:
                while time.monotonic() < deadline:
                    scr = await self.transport.screen(slot.name, history=HISTORY_ROWS)
                    if verify.classify(adapter, scr, mk) == "accepted":
                        return result("accepted", id=msg_id, evidence="pane-diff", detail="" if not adapter.has_hook
                                      else "sidecar not connected: verified by pane diff")
                    await anyio.sleep(POLL_S)
            return await self._final_verdict(slot, adapter, mk, msg_id, ev, use_ack, result, retries)
        finally:
            self.waiters.pop(msg_id, None)
            self.acks.pop(msg_id, None)

    async def _final_verdict(self, slot: Slot, adapter: Any, mk: str, msg_id: str, ev: anyio.Event, use_ack: bool,
                             result: Any, retries: int = 0) -> P.SendResult:
        """After the timeout: a draft gets one extra submit key in all (never re-typed text)."""
        try:
            verdict = verify.classify(adapter, await self.transport.screen(slot.name, history=HISTORY_ROWS), mk)
        except SlotNotFound:
            return result("unconfirmed", id=msg_id, detail=f"slot {slot.name!r} vanished during verification")
        if verdict == "draft" and retries:
            return result("draft", id=msg_id, submit_retries=retries,
                          detail=f"the message sits unsubmitted in the input line of {slot.name!r} "
                                 f"(one extra {adapter.submit.key} was sent)")
        if verdict != "draft":
            return result("unconfirmed", id=msg_id, submit_retries=retries,
                          detail="no runtime ack and no pane evidence before the timeout")
        await self.transport.send_keys(slot.name, adapter.submit.key)
        with anyio.move_on_after(1.0 if use_ack else 0.5):
            if use_ack:
                await ev.wait()
            else:
                await anyio.sleep(0.5)
        if ev.is_set():
            return result("accepted", id=msg_id, evidence="runtime-ack", submit_retries=1)
        scr = await self.transport.screen(slot.name, history=HISTORY_ROWS)
        verdict = verify.classify(adapter, scr, mk)
        if verdict == "accepted" and not use_ack:
            return result("accepted", id=msg_id, evidence="pane-diff", submit_retries=1)
        if verdict == "draft":
            return result("draft", id=msg_id, submit_retries=1,
                          detail=f"the message sits unsubmitted in the input line of {slot.name!r} "
                                 f"(one extra {adapter.submit.key} was sent)")
        return result("unconfirmed", id=msg_id, submit_retries=1, detail="no evidence after one extra submit key")


class RequestError(Exception):
    """A client request that fails with a stable ``code``."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
