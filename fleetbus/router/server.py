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
#: Seconds a pane without a visible prompt is looked at again before ``no-prompt``.
PROMPT_SETTLE_S = 2.0
#: Pane polling interval (s) for a TUI's queue indicator while the slot is busy.
QUEUE_POLL_S = 0.05
#: Scrollback rows captured when looking for a submitted marker.
HISTORY_ROWS = 300


class RouterAlreadyRunning(RuntimeError):
    """Another router holds this tenant's lock."""


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
        self.session_waiters: dict[str, list[anyio.Event]] = {}
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
        elif isinstance(msg, (P.Ping, P.Ack, P.Bye, P.HookEvent)):
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
            elif isinstance(msg, P.HookEvent):
                self._on_hook_event(peer, msg)
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
        w = self.waiters.get(ack.id)
        if w is None or w.slot != slot:
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
            if msg.kind == "INTERRUPT":
                return await self.interrupt(slot, msg.timeout_s or self.fleet.roster.bus.verify_timeout_s)
            return await self.reset(slot, msg.timeout_s or self.fleet.roster.bus.verify_timeout_s)
        except SlotNotFound:
            raise RequestError("slot-down", f"slot {name!r} is not running (run `fleet start {name}`)") from None
        except TransportError as e:
            raise RequestError("transport", str(e)) from None

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
        if typed != "":
            screen, typed = await self._settle_prompt(slot, adapter)
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
        was_busy = (peer is not None and peer.state == "busy") or verify.is_busy(adapter, screen)
        w = _Waiter(slot.name, msg_id, t0)
        self.waiters[msg_id] = w
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
            timeout = req.timeout_s or (P.QUEUE_TIMEOUT_S if req.wait == "accepted"
                                        else self.fleet.roster.bus.verify_timeout_s)
            deadline = t0 + timeout
            if use_ack:
                r = await self._verify_by_ack(slot, adapter, mk, w, req, deadline, was_busy, result)
            else:
                r = await self._verify_by_pane(slot, adapter, mk, w, req, deadline, result)
            return r or await self._final_verdict(slot, adapter, mk, w, use_ack, result)
        finally:
            self.waiters.pop(msg_id, None)

    async def _verify_by_ack(self, slot: Slot, adapter: Any, mk: str, w: _Waiter, req: P.SendRequest,
                             deadline: float, was_busy: bool, result: Any) -> P.SendResult | None:
        """Wait for the runtime's ack. One look at the pane after DRAFT_CHECK_S: a message still in
        the input line lost its submit key (seen with Claude Code 2.1.197 right after start-up) and
        gets the one extra key; a busy runtime's queue indicator makes the message ``queued``.
        While the slot was busy at send time the pane is watched for the queue indicator every
        QUEUE_POLL_S. Returns None when the deadline passed without an answer."""
        check_at = time.monotonic() + DRAFT_CHECK_S
        draft_checked = False
        watch = was_busy  # poll the pane for the queue indicator
        while not w.accepted.is_set():
            now = time.monotonic()
            if now >= deadline or (w.queued_at is not None and req.wait == "queued"):
                break
            if w.queued_at is not None:
                until = deadline
            elif watch:
                until = min(deadline, now + QUEUE_POLL_S, check_at if not draft_checked else deadline)
            elif not draft_checked:
                until = min(deadline, check_at)
            else:
                until = deadline
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
        while time.monotonic() < deadline:
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

    def queued_ms(self) -> float | None:
        return None if self.queued_at is None else round((self.queued_at - self.started) * 1000, 3)


class RequestError(Exception):
    """A client request that fails with a stable ``code``."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
