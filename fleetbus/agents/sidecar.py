"""The sidecar of one slot: heartbeats, hook events, acknowledgements.

Loop (Paranoid Pirate style, sidecar speaks first):

1. Connect a DEALER (``linger=0``, ``immediate=1``, routing id ``sc:<slot>`` on the local socket,
   where the router sets ``ROUTER_HANDOVER`` so a restarted sidecar takes over; a remote router's
   tcp socket assigns the id itself) and send ``HELLO``.
2. Every ``heartbeat_ms`` send ``PING{state}`` and rewrite ``<state>/run/<slot>.hb``
   atomically (``ts=``, ``pid=``, ``status=``, ``heartbeat_ms=``, ``liveness=``), so
   ``fleet ps`` tells the truth even when the router is down.
3. Any frame from the router resets the liveness counter; after ``heartbeat_ms × liveness``
   of silence the socket is closed and a new one connects with exponential backoff
   (0.25 s doubling to 8 s). ``DISCONNECT`` (the router does not know us, e.g. after a router
   restart) makes it send ``HELLO`` at once.
4. Hook events arrive on a Unix datagram socket (``$FLEETBUS_HOOK_SOCKET``, from ``fleet hook``)
   and as JSON lines on a Unix stream socket (``$FLEETBUS_HOOK_STREAM``, from in-process
   extensions): ``prompt-submit`` yields an ``ACK`` for every fleet marker in the prompt,
   ``prompt-queued`` an ``ACK{stage: queued}``; ``turn-start``/``turn-end`` set the state to
   ``busy``/``idle`` and are reported with an immediate ``PING``; every event is forwarded to
   the router as ``HOOK``. Accepted acks that cannot be sent (router down) are kept and sent
   after the next ``WELCOME``; acks sent in the last ``ACK_REPLAY_WINDOW_S`` s are sent again
   after every ``WELCOME`` too, because a router killed with ``kill -9`` loses the frames it had
   not read yet (the router ignores repeats); they are also logged to ``<state>/run/<slot>.acks``,
   so a sidecar restarted right after a router restart replays its predecessor's.

Heartbeats come from the same event loop that handles hooks, so a wedged sidecar stops beating.
A file that cannot be written (a full disk, a read-only file system: the heartbeat file, the ack
log, the hook spool it replays) never stops the sidecar: the failure is logged once per streak
(:class:`FileFaults`) and the beat goes on; the router's view (PINGs) stays right, and ``fleet
ps`` uses it while the router runs.

Both hook sockets sit in the private 0700 runtime dir and are 0600; behind that first wall, the
sidecar checks who is talking: every datagram must carry the sender's credentials
(``SO_PASSCRED``/``SCM_CREDENTIALS``, filled in by the kernel) and every stream connection's peer
(``SO_PEERCRED``) must have the sidecar's own uid. Anything else is dropped and counted
(:attr:`Sidecar.refused_hooks`), and logged once per uid and socket, so a mode mistake on the slot's
directory does not turn into a forged ack. The files the sidecar writes (heartbeat, ack log, pid
file) are 0600 whatever the umask.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import socket
import struct
import time
from collections import deque

import anyio
import anyio.abc
import zmq
import zmq.asyncio

from fleetbus import protocol as P
from fleetbus.adapters.base import tag_markers
from fleetbus.agents.hook import EVENTS, payload_fields, spool_path
from fleetbus.config import FleetConfig
from fleetbus.logs import LogBudget
from fleetbus.paths import FleetPaths, fleet_paths
from fleetbus.router.procs import write_pidfile
from fleetbus.safepath import atomic_write, open_private_file

log = logging.getLogger("fleetbus.sidecar")

BACKOFF_START_S = 0.25
BACKOFF_MAX_S = 8.0
#: Seconds of sent acks that are sent again after a (re)registration.
ACK_REPLAY_WINDOW_S = 120.0
#: Most acks kept for replay.
ACK_REPLAY_MAX = 5000
#: Hook stream connections served at once per slot; another one is closed at once (an extension
#: keeps one persistent connection).
MAX_STREAM_CONNS = 16


def stream_line_limit(max_body_bytes: int) -> int:
    """Longest JSON line read on the hook stream socket (bytes): a prompt carries at most one
    message (``bus.max_body_bytes``) that JSON escaping can double (``\n``, ``\"``), plus its tag,
    a kickstart template and the other fields. A longer line is skipped; the connection stays."""
    return 2 * max_body_bytes + 64 * 1024


class FileFaults:
    """Failing file writes of one process, logged once per failure streak of each file kind
    (``heartbeat``, ``ack-log``, ``spool``): the first failure and the first success after it."""

    def __init__(self) -> None:
        self.failing: dict[str, tuple[float, int]] = {}  # kind -> (first failure, Unix s; failures)

    def failed(self, kind: str, path: object, err: OSError) -> None:
        if kind in self.failing:
            since, n = self.failing[kind]
            self.failing[kind] = (since, n + 1)
            return
        self.failing[kind] = (time.time(), 1)
        log.warning("cannot write the %s %s: %s; carrying on (logged once until it works again)", kind, path, err)

    def ok(self, kind: str) -> None:
        if kind in self.failing:
            since, n = self.failing.pop(kind)
            log.info("the %s can be written again (%d write(s) failed over %.1f s)", kind, n, time.time() - since)


#: Largest hook datagram read (bytes; a HOOK frame is well under 2 KiB). Longer ones are dropped.
MAX_DATAGRAM = 65536
#: Most datagrams read per wake-up before yielding to the other tasks (heartbeats go on under a flood).
DATAGRAM_BATCH = 64
#: Distinct refused uids remembered for log-once (then forgotten, so the memory stays bounded).
MAX_REFUSED_UIDS = 256
#: ``struct ucred`` (pid, uid, gid) of ``SO_PEERCRED`` and ``SCM_CREDENTIALS``.
_UCRED = struct.Struct("3i")
_wait_readable = getattr(anyio, "wait_readable", None) or anyio.wait_socket_readable  # anyio < 4.7


class Sidecar:
    """Sidecar of ``slot`` in ``fleet``.

    Args:
        paths: the tenant's paths (default: from the roster).
        router: the router endpoint (default: the tenant's local ``ipc://`` socket); a remote
            router's ``tcp://HOST:PORT`` (its roster's ``bus.tcp``) needs ``curve``.
        curve: ``(public, secret, router_public)`` Z85 CURVE keys: this sidecar's keypair (from
            ``fleet keys create``) and the router's public key; the sidecar connects as a CURVE
            client (see :mod:`fleetbus.keys`).
    """

    def __init__(self, fleet: FleetConfig, slot: str, paths: FleetPaths | None = None, router: str | None = None,
                 curve: tuple[bytes, bytes, bytes] | None = None):
        self.fleet = fleet
        self.slot = fleet.slot(slot)
        self.paths = paths or fleet_paths(fleet.tenant, fleet.roster.transport.socket)
        self.endpoint = router or self.paths.router_endpoint
        self.curve = curve
        self.heartbeat_ms = self.slot.heartbeat_ms
        self.liveness = self.slot.liveness
        self.state = "unknown"
        self.state_at: float | None = None  # Unix s of the hook event that set ``state``
        self.session_id: str | None = None
        self.session_announced = False
        self.side_events = 0
        self.pending_acks: list[P.Ack] = []
        self.recent_acks: deque[tuple[float, P.Ack]] = deque(maxlen=ACK_REPLAY_MAX)  # (unix s, ack)
        self.faults = FileFaults()
        self._load_ack_log()
        self.expected: dict[str, float] = {}
        #: hook datagrams and stream connections refused because they came from another uid
        #: (or carried no credentials)
        self.refused_hooks = 0
        self._refused_uids: set[tuple[str, int | None]] = set()
        self.ctx = zmq.asyncio.Context()
        self.sock: zmq.asyncio.Socket | None = None
        self.welcomed = False
        self.max_stream_line = stream_line_limit(fleet.roster.bus.max_body_bytes)
        self.stream_conns = 0  # hook stream connections being served
        self.stream_refused = 0  # connections closed at once: MAX_STREAM_CONNS were served
        self._stream_log = LogBudget(window_s=60.0, burst=1)
        self._exit = anyio.Event()

    # -- socket --------------------------------------------------------------------------------

    def _connect(self) -> None:
        if self.endpoint == self.paths.router_endpoint:
            self.paths.check_socket("router.sock")  # PathError when planted (missing: the router is down)
        self.sock = self.ctx.socket(zmq.DEALER)
        if self.curve is None:  # a remote router picks our routing id: nobody can take it over there
            self.sock.setsockopt(zmq.ROUTING_ID, f"sc:{self.slot.name}".encode())
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IMMEDIATE, 1)
        self.sock.setsockopt(zmq.SNDHWM, 100)
        if self.curve is not None:
            public, secret, server = self.curve
            self.sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
            self.sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
            self.sock.setsockopt(zmq.CURVE_SERVERKEY, server)
        self.sock.connect(self.endpoint)
        self.welcomed = False

    def _send(self, msg: P.BaseModel) -> bool:
        """Non-blocking send; False when it cannot go out now (no connection, HWM)."""
        if self.sock is None:
            return False
        fut = self.sock.send(P.encode(msg), flags=zmq.DONTWAIT)
        if fut.done():
            return fut.exception() is None
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        return True

    def _hello(self) -> bool:
        return self._send(P.Hello(slot=self.slot.name, tenant=self.fleet.tenant, host=socket.gethostname(),
                                  pid=os.getpid(), adapter=self.slot.runtime, caps=["hook"],
                                  heartbeat_ms=self.heartbeat_ms))

    def _ping(self) -> bool:
        return self._send(P.Ping(state=self.state, state_at=self.state_at, session_id=self.session_id))

    def _flush_acks(self) -> None:
        while self.pending_acks and self.welcomed:
            if not self._send(self.pending_acks[0]):
                return
            self.pending_acks.pop(0)

    def _load_ack_log(self) -> None:
        """Acks a previous sidecar of this slot gave in the last ACK_REPLAY_WINDOW_S s (its ack log,
        ``<state>/run/<slot>.acks``, one JSON line per accepted ack): replayed after WELCOME like
        this process's own, so a router and a sidecar killed one after the other lose no ack. The
        log is rewritten with only those lines."""
        path = self.paths.ack_log(self.slot.name)
        horizon = time.time() - ACK_REPLAY_WINDOW_S
        keep = []
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            lines = []
        for line in lines[-ACK_REPLAY_MAX:]:
            try:
                rec = json.loads(line)
                if float(rec["t"]) >= horizon:
                    self.recent_acks.append((float(rec["t"]), P.Ack(id=str(rec["id"]), session_id=rec.get("s"), at=float(rec["t"]))))
                    keep.append(line)
            except (ValueError, KeyError, TypeError):
                continue
        try:
            atomic_write(path, "".join(x + "\n" for x in keep))
        except OSError as e:
            self.faults.failed("ack log", path, e)

    def _log_ack(self, ack: P.Ack) -> None:
        """Append ``ack`` to the ack log (kept in memory for replay either way)."""
        now = time.time()
        self.recent_acks.append((now, ack))
        path = self.paths.ack_log(self.slot.name)
        try:
            fd = open_private_file(path, os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, (json.dumps({"t": now, "id": ack.id, "s": ack.session_id}) + "\n").encode())
            finally:
                os.close(fd)
        except OSError as e:
            self.faults.failed("ack log", path, e)
        else:
            self.faults.ok("ack log")

    def _replay_acks(self) -> None:
        """After (re)registering, send again the accepted acks of the last ACK_REPLAY_WINDOW_S s:
        a router killed before it read them finds them here (the router ignores repeats)."""
        horizon = time.time() - ACK_REPLAY_WINDOW_S
        for at, ack in list(self.recent_acks):
            if at >= horizon:
                self._send(ack)

    def owns_pidfile(self) -> bool:
        """True while this slot's pid file names this process (an orphaned or duplicate sidecar
        finds it gone or naming another pid, and exits)."""
        try:
            return self.paths.sidecar_pidfile(self.slot.name).read_text().split()[0] == str(os.getpid())
        except (OSError, IndexError):
            return False

    def write_heartbeat(self) -> bool:
        """Rewrite the heartbeat file atomically (0600). False when it cannot be written (a full
        disk): logged once per streak, the partial temporary file removed; the sidecar carries on."""
        path = self.paths.heartbeat_file(self.slot.name)
        try:
            atomic_write(path, f"ts={time.time():.3f}\npid={os.getpid()}\nstatus={self.state}\n"
                               f"heartbeat_ms={self.heartbeat_ms}\nliveness={self.liveness}\n"
                               f"connected={int(self.welcomed)}\n")
        except OSError as e:
            self.faults.failed("heartbeat file", path, e)
            return False
        self.faults.ok("heartbeat file")
        return True

    def _on_frame(self, raw: bytes) -> None:
        try:
            msg = P.decode(raw)
        except P.ProtocolError as e:
            log.warning("dropped malformed frame from router: %s", e)
            return
        if isinstance(msg, P.Welcome):
            self.heartbeat_ms, self.liveness = msg.heartbeat_ms, msg.liveness
            self.welcomed = True
            log.info("registered with router (heartbeat %d ms, liveness %d)", msg.heartbeat_ms, msg.liveness)
            self._ping()
            self._flush_acks()
            self._replay_acks()
        elif isinstance(msg, P.Disconnect):
            log.info("router asked to re-register: %s", msg.reason)
            # re-register at once after a router restart; a refused HELLO (another tenant, a slot
            # not in the roster) is retried only at the next beat, never in a tight loop
            was_welcomed, self.welcomed = self.welcomed, False
            if was_welcomed:
                self._hello()
        elif isinstance(msg, P.Expect):
            now = time.monotonic()
            self.expected[msg.id] = now
            for k, t in list(self.expected.items()):
                if now - t > 3600:
                    del self.expected[k]

    async def _reader(self, sock: zmq.asyncio.Socket) -> None:
        """The one reader of this socket incarnation; cancelled only when the socket is dropped."""
        while True:
            raw = await sock.recv()
            self.last_recv = time.monotonic()
            self._on_frame(raw)

    async def bus_loop(self) -> None:
        backoff = BACKOFF_START_S
        while True:
            self._connect()
            assert self.sock is not None
            self.last_recv = time.monotonic()
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._reader, self.sock)
                self._hello()
                next_beat = time.monotonic()
                while True:
                    now = time.monotonic()
                    if now >= next_beat:
                        if self.welcomed:
                            self._ping()
                        else:
                            self._hello()
                        if not self.owns_pidfile():
                            log.warning("pid file %s is gone or names another sidecar: exiting",
                                        self.paths.sidecar_pidfile(self.slot.name))
                            self._exit.set()
                            return
                        self.write_heartbeat()
                        self._replay_spool_safely()  # a hook that raced the socket's bind
                        next_beat = now + self.heartbeat_ms / 1000
                    silent = now - self.last_recv
                    if silent > self.heartbeat_ms * self.liveness / 1000:
                        log.warning("router silent for %.1f s; reconnecting in %.2f s", silent, backoff)
                        break
                    if self.welcomed:
                        backoff = BACKOFF_START_S
                    await anyio.sleep(max(0.001, next_beat - time.monotonic()))
                tg.cancel_scope.cancel()
            self.sock.close(linger=0)
            self.sock = None
            self.welcomed = False
            self.write_heartbeat()
            await anyio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    # -- hooks ---------------------------------------------------------------------------------

    def replay_spool(self) -> int:
        """Acks from the hook spool (events hooks wrote while this slot's sidecar was down, see
        :mod:`fleetbus.agents.hook`): the file is renamed, read, and each event's markers become
        acks (sent, or kept until the next ``WELCOME``). State and session are not replayed:
        those events are old. Returns how many events were replayed."""
        spool = spool_path(str(self.paths.hook_socket(self.slot.name)))
        work = spool + ".replay"
        try:
            os.replace(spool, work)
        except OSError:
            return 0
        n = 0
        try:
            with open(work, "rb") as f:
                for line in f:
                    try:
                        ev = P.decode(base64.b64decode(line.strip(), validate=True))
                    except (ValueError, P.ProtocolError):
                        continue
                    if isinstance(ev, P.HookEvent) and ev.event in ("prompt-submit", "prompt-queued"):
                        self._ack(ev)
                        n += 1
        finally:
            os.unlink(work)
        if n:
            log.info("replayed %d hook event(s) from the spool", n)
        return n

    def _replay_spool_safely(self) -> None:
        try:
            self.replay_spool()
        except OSError as e:
            self.faults.failed("spool", spool_path(str(self.paths.hook_socket(self.slot.name))), e)
        else:
            self.faults.ok("spool")

    def _ack(self, ev: P.HookEvent) -> None:
        stage = "accepted" if ev.event == "prompt-submit" else "queued"
        for msg_id in ev.markers:
            ack = P.Ack(id=msg_id, stage=stage, at=ev.at, session_id=ev.session_id or self.session_id)
            if not (self.welcomed and self._send(ack)) and stage == "accepted":
                self.pending_acks.append(ack)
            if stage == "accepted":
                self._log_ack(ack)
            if stage == "accepted":
                self.expected.pop(msg_id, None)

    def on_hook(self, ev: P.HookEvent) -> None:
        """Apply one hook event: acks for markers, state, session; then forward it to the router.

        Session correlation: the slot's session is the one announced by the latest
        ``session-start`` (or, when the sidecar started after the runtime, the first one seen).
        A prompt event from any other session (an internal side thread of the runtime) is
        ignored and counted in :attr:`side_events`.
        """
        if ev.event == "session-start":
            if ev.session_id:
                self.session_id, self.session_announced = ev.session_id, True
        elif ev.session_id:
            if self.session_id is None:
                self.session_id = ev.session_id
            elif ev.session_id != self.session_id and self.session_announced:
                self.side_events += 1
                log.info("ignored %s from session %s (slot session is %s)", ev.event, ev.session_id, self.session_id)
                return
        if ev.event in ("prompt-submit", "prompt-queued"):
            self._ack(ev)
        new_state = {"prompt-submit": "busy", "turn-start": "busy", "turn-end": "idle",
                     "session-start": "idle"}.get(ev.event, self.state)
        if self.welcomed:
            self._send(ev)
        if new_state != self.state:
            self.state, self.state_at = new_state, ev.at
            if self.welcomed:
                self._ping()

    def _refuse(self, uid: int | None, pid: int | None, what: str) -> None:
        """Count a hook datagram or connection from another uid (None: no credentials); log the
        first one of each uid (per socket kind)."""
        self.refused_hooks += 1
        if (what, uid) in self._refused_uids:
            return
        if len(self._refused_uids) >= MAX_REFUSED_UIDS:
            self._refused_uids.clear()
        self._refused_uids.add((what, uid))
        who = "a sender without credentials" if uid is None else f"uid {uid} (pid {pid})"
        log.warning("refused hook %s from %s: only uid %d may talk to this sidecar; check the modes of %s "
                    "(must be 0700)", what, who, os.getuid(), self.paths.hook_socket(self.slot.name).parent)

    def _bind_hook_socket(self) -> socket.socket:
        """The non-blocking datagram socket of ``$FLEETBUS_HOOK_SOCKET``, 0600, with
        ``SO_PASSCRED`` so every datagram carries its sender's pid/uid/gid."""
        path = self.paths.hook_socket(self.slot.name)
        path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            old = os.umask(0o077)
            try:
                sock.bind(str(path))
            finally:
                os.umask(old)
            os.chmod(path, 0o600)  # the umask windows of the two loops can overlap (umask is per process)
        except BaseException:
            sock.close()
            raise
        return sock

    def _read_datagrams(self, sock: socket.socket) -> None:
        """Handle up to DATAGRAM_BATCH waiting datagrams: only those whose kernel-given
        credentials carry our uid."""
        me = os.getuid()
        ancsize = socket.CMSG_SPACE(_UCRED.size)
        for _ in range(DATAGRAM_BATCH):
            try:
                data, anc, flags, _ = sock.recvmsg(MAX_DATAGRAM, ancsize)
            except (BlockingIOError, InterruptedError):
                return
            uid = pid = None
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(cdata) >= _UCRED.size:
                    pid, uid, _gid = _UCRED.unpack_from(cdata)
            if uid != me:
                self._refuse(uid, pid, "datagram")
                continue
            if flags & socket.MSG_TRUNC:
                log.warning("dropped hook datagram over %d bytes", MAX_DATAGRAM)
                continue
            try:
                ev = P.decode(data)
            except P.ProtocolError as e:
                log.warning("dropped malformed hook datagram: %s", e)
                continue
            if isinstance(ev, P.HookEvent):
                self.on_hook(ev)

    async def hook_loop(self) -> None:
        sock = self._bind_hook_socket()
        try:
            self._replay_spool_safely()  # after binding: a hook that still failed wrote before this
            while True:
                await _wait_readable(sock)
                self._read_datagrams(sock)
        finally:
            sock.close()

    async def stream_loop(self) -> None:
        """Accept JSON-line hook events from in-process extensions (pi, opencode) on
        ``$FLEETBUS_HOOK_STREAM``: one object per line, ``{"event", "prompt", "session_id", "source"}``."""
        path = self.paths.hook_stream(self.slot.name)
        path.unlink(missing_ok=True)
        old = os.umask(0o077)
        try:
            listener = await anyio.create_unix_listener(path, mode=0o600)
        finally:
            os.umask(old)
        async with listener:
            await listener.serve(self._stream_client)

    async def _stream_client(self, conn: anyio.abc.SocketStream) -> None:
        """Read JSON lines from one connection of this sidecar's own uid (``SO_PEERCRED``; another
        uid's connection is closed and counted). At most MAX_STREAM_CONNS connections are served
        at once (another is closed at once); a line longer than :attr:`max_stream_line` is
        skipped up to its newline. Buffering is linear in the bytes received."""
        async with conn:
            try:
                raw = conn.extra(anyio.abc.SocketAttribute.raw_socket)
                pid, uid, _gid = _UCRED.unpack(raw.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
            except (OSError, struct.error, anyio.TypedAttributeLookupError):
                pid = uid = None
            if uid != os.getuid():
                self._refuse(uid, pid, "stream connection")
                return
            if self.stream_conns >= MAX_STREAM_CONNS:
                self.stream_refused += 1
                if self._stream_log.allow("busy"):
                    log.warning("closed a hook stream connection: %d are served already (%d closed so far)",
                                MAX_STREAM_CONNS, self.stream_refused)
                return
            self.stream_conns += 1
            buf = bytearray()
            skipping = False  # inside a line over the limit: dropped up to its newline
            try:
                while True:
                    chunk = await conn.receive(65536)
                    start = 0
                    while (end := chunk.find(b"\n", start)) >= 0:
                        if not skipping:
                            buf += chunk[start:end]
                            if len(buf) <= self.max_stream_line:
                                self._stream_line(bytes(buf))
                            else:
                                self._long_line()
                        buf.clear()
                        skipping, start = False, end + 1
                    if not skipping:
                        buf += chunk[start:]
                        if len(buf) > self.max_stream_line:
                            self._long_line()
                            buf.clear()
                            skipping = True
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                if buf.strip() and not skipping:
                    self._stream_line(bytes(buf))
            finally:
                self.stream_conns -= 1

    def _long_line(self) -> None:
        if self._stream_log.allow("long"):
            log.warning("skipped a hook stream line over %d bytes", self.max_stream_line)

    def _stream_line(self, line: bytes) -> None:
        import json

        try:
            obj = json.loads(line.decode("utf-8", "replace"))
            if not isinstance(obj, dict) or obj.get("event") not in EVENTS:
                raise ValueError(f"unknown event {obj.get('event') if isinstance(obj, dict) else obj!r}")
            prompt, session, source = payload_fields(obj)
            ev = P.HookEvent(event=obj["event"], slot=self.slot.name, runtime=self.slot.runtime,
                             session_id=session, source=source[:40], markers=tag_markers(prompt),
                             prompt_head=prompt[:200])
        except (ValueError, TypeError) as e:
            log.warning("dropped malformed hook line: %s", e)
            return
        self.on_hook(ev)

    async def run(self) -> None:
        """Run until SIGTERM/SIGINT, or until the slot's pid file stops naming this process."""
        self.paths.ensure()
        write_pidfile(self.paths.sidecar_pidfile(self.slot.name))
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.bus_loop)
                tg.start_soon(self.hook_loop)
                tg.start_soon(self.stream_loop)

                async def on_signal() -> None:
                    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                        async for _ in signals:
                            self._send(P.Bye())
                            self._exit.set()
                            return

                tg.start_soon(on_signal)
                await self._exit.wait()
                tg.cancel_scope.cancel()
        finally:
            if self.sock is not None:
                self.sock.close(linger=0)
            self.ctx.term()
            if self.owns_pidfile():  # a newer sidecar of this slot owns the shared paths otherwise
                self.paths.hook_socket(self.slot.name).unlink(missing_ok=True)
                self.paths.hook_stream(self.slot.name).unlink(missing_ok=True)
                # a sidecar that was stopped leaves no heartbeat; one that was killed leaves a stale one
                self.paths.heartbeat_file(self.slot.name).unlink(missing_ok=True)
                self.paths.sidecar_pidfile(self.slot.name).unlink(missing_ok=True)
