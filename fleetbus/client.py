"""The orchestrator API: talk to a tenant's router over its ROUTER socket, follow its events.

    async with Fleet.connect("fleet.yaml") as fleet:          # a roster file, or the router's ipc:// endpoint
        task = await fleet.publish("idle:reviewer", "review PR 12", wait="done")
        print(task.state, task.slot, task.done_ms)
        async with fleet.events(kinds=["task"]) as events:    # live once entered
            async for ev in events:
                print(ev.seq, ev.topic, ev.slot, ev.data)

    with SyncFleet.connect("fleet.yaml") as fleet:           # the same calls, blocking, for scripts
        print(fleet.send("coder0", "hello", verify=True).result)

Results are the pydantic models of :mod:`fleetbus.protocol` (:class:`SendResult`,
:class:`TaskResult`, :class:`SlotStatus`, :class:`Event`), identical to what the CLI prints with
``--json``. Many requests may be in flight at once on one connection; one reader task matches
answers to requests by ``req`` id. :class:`Client` is the same connection without ``connect``
(the CLI uses it). Runs on anyio's asyncio backend (pyzmq's asyncio sockets).
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, Literal, TypeVar

import anyio
import zmq
import zmq.asyncio

from fleetbus import protocol as P
from fleetbus.config import FleetConfig, load_roster
from fleetbus.paths import FleetPaths, fleet_paths
from fleetbus.safepath import check_ipc_endpoint

T = TypeVar("T")

#: First resend of an unanswered idempotent SEND after this many seconds (doubling).
RESEND_START_S = 2.0
#: Longest gap between resends (s).
RESEND_MAX_S = 10.0
#: Seconds a SEND waits for its answer beyond its own timeout (queueing behind earlier
#: messages for the same slot, a router restart).
SEND_GRACE_S = 60.0


class RouterUnavailable(RuntimeError):
    """The tenant's router is not running or does not answer."""


class RequestFailed(RuntimeError):
    """The router refused a request. ``code`` is stable (``unknown-slot``, ``slot-down``...)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class Client:
    """Async client of one tenant's router.

    Args:
        fleet: the loaded roster (gives the tenant, its endpoints and timeouts); or None with
            ``endpoint``.
        paths: override the tenant's paths.
        connect_timeout_s: seconds to wait for the router to answer the first request.
        endpoint: the router's ``ipc://`` endpoint instead of a roster; the tenant, the events
            endpoint and the default timeouts then come from the router's HEALTH answer.
            Client requests are accepted on the local socket only (never ``tcp://``).

    Raises (on enter):
        RouterUnavailable: no live router process for this tenant (or none answers at
            ``endpoint`` within ``connect_timeout_s``).
        PathError: the runtime dir or the router's socket is not safely ours (a symlink,
            another user's, writable by group or world): nothing is sent to a router someone else
            may have planted. See :mod:`fleetbus.safepath`.
    """

    def __init__(self, fleet: FleetConfig | None = None, paths: FleetPaths | None = None,
                 connect_timeout_s: float = 5.0, endpoint: str | None = None):
        if fleet is None and endpoint is None:
            raise ValueError("Client needs a roster (fleet) or a router endpoint")
        self.fleet = fleet
        self.paths = paths or (fleet_paths(fleet.tenant, fleet.roster.transport.socket) if fleet else None)
        self.endpoint = endpoint or self.paths.router_endpoint  # type: ignore[union-attr]
        self.events_endpoint = self.paths.events_endpoint if self.paths else None
        self.tenant = fleet.tenant if fleet else endpoint
        bus = fleet.roster.bus if fleet else None
        self.verify_timeout_s = bus.verify_timeout_s if bus else 10.0
        self.task_wait_s = bus.task_wait_s if bus else 3600.0
        self.task_timeout_s = bus.task_timeout_s if bus else 3600.0
        self.connect_timeout_s = connect_timeout_s
        self._futures: dict[str, tuple[anyio.Event, list[P.Result]]] = {}

    async def __aenter__(self) -> Client:
        if self.paths is not None and self.endpoint == self.paths.router_endpoint:
            self.paths.check_socket("router.sock")  # PathError when planted; a missing one is no router
        else:
            check_ipc_endpoint(self.endpoint)
        if self.paths is not None and not self.paths.router_running():
            raise RouterUnavailable(f"the router of tenant {self.tenant!r} is not running (start it with `fleet up`)")
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(self.endpoint)
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._reader)
        if self.fleet is None:
            try:
                h = await self.health()
            except BaseException:
                await self.__aexit__(None, None, None)
                raise
            self.tenant = h["tenant_id"]
            self.events_endpoint = h.get("events_endpoint")
            self.verify_timeout_s = h.get("verify_timeout_s", self.verify_timeout_s)
            self.task_wait_s = h.get("task_wait_s", self.task_wait_s)
            self.task_timeout_s = h.get("task_timeout_s", self.task_timeout_s)
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            self._tg.cancel_scope.cancel()
            await self._tg.__aexit__(None, None, None)
        finally:  # also when an outer cancel scope interrupts the wait: a leaked context hangs at exit
            self.sock.close(linger=0)
            self.ctx.destroy(linger=0)  # closes any socket left open too (an interrupted EventStream's)

    async def _reader(self) -> None:
        while True:
            raw = await self.sock.recv()
            try:
                msg = P.decode(raw)
            except P.ProtocolError:
                continue
            if isinstance(msg, P.Result) and msg.req in self._futures:
                ev, box = self._futures[msg.req]
                box.append(msg)
                ev.set()

    async def request(self, make: Callable[[str], Any], timeout_s: float, resend_s: float | None = None) -> Any:
        """Send ``make(req_id)`` and return the RESULT's data.

        ``resend_s``: for idempotent requests only (a SEND with an idempotency key): send the
        same request again when no answer came within ``resend_s`` s, doubling up to
        RESEND_MAX_S, until ``timeout_s``; a router that was restarted meanwhile answers the
        resend (the DEALER reconnects by itself and queues frames while the router is away).

        Raises:
            RouterUnavailable: no answer within ``timeout_s`` seconds.
            RequestFailed: the router answered with an error.
        """
        req = secrets.token_hex(8)
        ev: anyio.Event = anyio.Event()
        box: list[P.Result] = []
        self._futures[req] = (ev, box)
        frame = P.encode(make(req))
        if len(frame) > P.MAX_FRAME_BYTES:
            raise RequestFailed("too-large", f"request of {len(frame)} bytes exceeds the protocol limit of "
                                             f"{P.MAX_FRAME_BYTES} bytes; nothing was sent")
        try:
            deadline = anyio.current_time() + timeout_s
            gap = resend_s
            await self.sock.send(frame)
            while not ev.is_set() and anyio.current_time() < deadline:
                wait = deadline - anyio.current_time() if gap is None else min(gap, deadline - anyio.current_time())
                with anyio.move_on_after(max(0.0, wait)):
                    await ev.wait()
                if not ev.is_set() and gap is not None and anyio.current_time() < deadline:
                    await self.sock.send(frame)
                    gap = min(gap * 2, RESEND_MAX_S)
        finally:
            self._futures.pop(req, None)
        if not box:
            raise RouterUnavailable(f"the router of tenant {self.tenant!r} did not answer within {timeout_s:g} s")
        res = box[0]
        if not res.ok:
            raise RequestFailed(res.code or "error", res.error or "request failed")
        return res.data

    async def send(self, to: str, body: str, *, verify: bool = True, timeout_s: float | None = None,
                   sender: str = "ops", on_busy_input: Literal["fail", "clear"] = "fail",
                   wait: Literal["queued", "accepted"] = "queued", idempotency_key: str | None = None,
                   when: Literal["now", "available"] = "now", ttl_s: float | None = None,
                   detach: bool = False) -> P.SendResult:
        """Deliver ``body`` to slot ``to``; with ``verify`` wait up to ``timeout_s`` s for evidence
        (counted from when the router starts typing it). Options as :class:`P.SendRequest`.

        ``wait="queued"`` answers ``queued`` as soon as the runtime's TUI is seen holding the
        message (the slot was busy); ``wait="accepted"`` waits on for the runtime's ack (default
        timeout :data:`fleetbus.protocol.QUEUE_TIMEOUT_S`). ``detach`` answers ``queued`` once
        the router has journaled the message.

        Every SEND carries an idempotency key (``idempotency_key``, or a random one), so the
        client resends it when the router does not answer (e.g. it was restarted) without any
        risk of typing it twice. Never raises for a rejected message: the result says
        ``rejected`` with a ``code``.

        Raises:
            RouterUnavailable: no answer before the timeout (plus SEND_GRACE_S).
            RequestFailed: the request cannot be sent (``too-large``: over the 4 MiB frame
                limit) or the router could not read it (``bad-request``).
            pydantic.ValidationError: an option or the body breaks the protocol's rules (a lone
                surrogate, a sender with control characters, a negative timeout); nothing was sent.
        """
        key = idempotency_key or f"c-{secrets.token_hex(12)}"
        t = timeout_s or (P.QUEUE_TIMEOUT_S if wait == "accepted" else self.verify_timeout_s)
        data = await self.request(
            lambda req: P.SendRequest(req=req, to=to, body=body, sender=sender, verify=verify,
                                      timeout_s=timeout_s, on_busy_input=on_busy_input, wait=wait,
                                      idempotency_key=key, when=when, ttl_s=ttl_s, detach=detach),
            (self.connect_timeout_s if detach else t) + SEND_GRACE_S, resend_s=RESEND_START_S,
        )
        return P.SendResult.model_validate(data)

    async def ps(self) -> list[P.SlotStatus]:
        """One :class:`SlotStatus` per roster slot."""
        data = await self.request(lambda req: P.PsRequest(req=req), self.connect_timeout_s + 10)
        return [P.SlotStatus.model_validate(d) for d in data]

    async def health(self, probe: str | None = None) -> dict[str, Any]:
        """The router's health: ``tenant_id``, ``pid``, ``uptime_s``, ``sidecars``, counters,
        ``events_endpoint``, default timeouts (s), open and waiting ``tasks``. With ``probe`` the
        router also publishes a ``probe`` event carrying it."""
        return await self.request(lambda req: P.HealthRequest(req=req, probe=probe), self.connect_timeout_s)

    async def publish(self, to: str, body: str, *, wait: Literal["published", "assigned", "accepted", "done"] = "published",
                      wait_s: float | None = None, timeout_s: float | None = None, allow_busy: bool = False,
                      kickstart: str | None = None, sender: str = "ops",
                      idempotency_key: str | None = None) -> P.TaskResult | list[P.TaskResult]:
        """Publish a task to the slot(s) selector ``to`` picks (``<slot>``, ``class:<c>``, ``idle``,
        ``idle:<c>``, ``all:<c>``; see :mod:`fleetbus.router.tasks`) and return its
        :class:`TaskResult` once it reached ``wait`` (or ended): one result, or a list (one per
        slot of the class) for ``all:<c>``.

        ``wait_s`` (s): how long the task may wait for a free matching slot (default roster
        ``bus.task_wait_s``; 0 = fail at once), then ``timed-out`` / ``no-slot``. ``timeout_s``
        (s): how long it may take to reach ``done`` once assigned (default ``bus.task_timeout_s``).
        ``allow_busy``: a slot holding another task, or whose runtime is busy, may get it.
        ``kickstart``: a template for this task instead of the slot's roster ``kickstart``.
        A selector that matches no roster slot gives a ``failed`` task with code ``no-match``
        at once. Every PUBLISH carries an idempotency key (random unless given) and is resent
        safely across a router restart.

        Raises:
            RequestFailed: ``bad-selector``, ``invalid-body``, ``invalid-kickstart`` (nothing
                was created), ``too-large``.
            RouterUnavailable: no answer in time.
            pydantic.ValidationError: an argument breaks the protocol's rules; nothing was sent.
        """
        key = idempotency_key or f"c-{secrets.token_hex(12)}"
        limit = self.connect_timeout_s + SEND_GRACE_S
        if wait != "published":
            limit += (self.task_wait_s if wait_s is None else wait_s)
            if wait in ("accepted", "done"):
                limit += timeout_s or self.task_timeout_s
        data = await self.request(
            lambda req: P.PublishRequest(req=req, to=to, body=body, sender=sender, wait=wait, wait_s=wait_s,
                                         timeout_s=timeout_s, allow_busy=allow_busy, kickstart=kickstart,
                                         idempotency_key=key),
            limit, resend_s=RESEND_START_S)
        results = [P.TaskResult.model_validate(d) for d in data]
        return results if to.strip().startswith("all:") else results[0]

    async def task(self, task_id: str, wait: Literal["assigned", "accepted", "done"] | None = None,
                   timeout_s: float | None = None) -> P.TaskResult | list[P.TaskResult]:
        """The state of task ``task_id`` (a list for a broadcast group id ``g...``), once it reached
        ``wait`` or ended, or after ``timeout_s`` s (then its state at that moment).

        Raises:
            RequestFailed: ``unknown-task``.
        """
        limit = (timeout_s if timeout_s is not None else P.MAX_WAIT_S) + self.connect_timeout_s + 10
        data = await self.request(lambda req: P.TaskRequest(req=req, id=task_id, wait=wait, timeout_s=timeout_s), limit)
        results = [P.TaskResult.model_validate(d) for d in data]
        return results if task_id.startswith("g") else results[0]

    async def reset(self, slot: str, timeout_s: float | None = None) -> dict[str, Any]:
        """Reset ``slot``'s runtime session (``/clear``...) and confirm it by its session-start
        event within ``timeout_s`` s. Returns ``{"slot", "confirmed", ...}``.

        Raises:
            RequestFailed: ``unknown-slot``, ``no-reset``, ``busy``, ``no-prompt``, ``slot-dead``...
        """
        return await self.slot_op("RESET", slot, timeout_s)

    async def reload_keys(self) -> dict[str, Any]:
        """Ask the router to read the tcp allow-list again and drop the live connections of keys
        that may no longer serve their slot. Returns ``{"dropped": [{"slot", "key"}], "keys": int}``.

        Raises:
            RouterUnavailable: no router answered within ``connect_timeout_s``.
        """
        return await self.request(lambda req: P.KeysRequest(req=req), self.connect_timeout_s)

    def events(self, kinds: Iterable[str] | None = None, slot: str | None = None) -> EventStream:
        """The router's events (:class:`P.Event`), filtered by topic (``kinds``: ``heartbeat``,
        ``message``, ``task``, ``slot``, ``hook``) and ``slot``. Use as ``async with
        fleet.events(...) as ev: async for e in ev`` (live once entered: nothing published after
        ``__aenter__`` returns is missed unless the subscriber falls 100,000 events behind (its
        own socket's queue; a process that stops reading altogether also loses what exceeds the
        router's 1,000 per subscriber), which ``Event.seq`` gaps show), or iterate it directly
        (subscribes on first use)."""
        return EventStream(self, kinds, slot)

    async def slot_op(self, kind: Literal["START", "STOP", "RESTART", "RESET", "INTERRUPT"], slot: str,
                      timeout_s: float | None = None) -> dict[str, Any]:
        """An operator verb on one slot. RESET and INTERRUPT confirm their effect within
        ``timeout_s`` s (default: roster ``bus.verify_timeout_s``).

        Raises:
            RequestFailed: with codes ``unknown-slot``, ``slot-down``, ``slot-dead``, ``no-reset``,
                ``no-prompt``, ``busy``, ``still-busy``, ``already-running``, ``transport``.
        """
        t = (timeout_s or self.verify_timeout_s) + 30.0
        return await self.request(lambda req: P.SlotRequest(kind=kind, req=req, slot=slot, timeout_s=timeout_s), t)

    async def shutdown(self, teardown: bool = False) -> dict[str, Any]:
        return await self.request(lambda req: P.ShutdownRequest(req=req, teardown=teardown), self.connect_timeout_s)


class EventStream:
    """A subscription to the router's PUB socket (see :meth:`Client.events`).

    Entering it connects a SUB socket and confirms the subscription is live by a probe: a
    HEALTH request that makes the router publish a ``probe`` event, repeated every 0.2 s until
    the event arrives (PUB/SUB drops what is published before a subscription reaches the
    publisher).

    Raises (on enter):
        RouterUnavailable: the probe did not come back within the client's connect timeout.
        PathError: the events socket is not safely ours (see :class:`Client`).
    """

    def __init__(self, client: Client, kinds: Iterable[str] | None, slot: str | None):
        self.client = client
        self.kinds = set(kinds) if kinds else None
        self.slot = slot
        self.sock: zmq.asyncio.Socket | None = None
        self._early: list[P.Event] = []

    async def __aenter__(self) -> EventStream:
        c = self.client
        if not c.events_endpoint:
            raise RouterUnavailable("the router did not say where its events are published")
        if c.paths is not None and c.events_endpoint == c.paths.events_endpoint:
            c.paths.check_socket("events.sock")
        else:
            check_ipc_endpoint(c.events_endpoint)
        self.sock = c.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, 100_000)
        for topic in sorted(self.kinds) if self.kinds else [""]:
            self.sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self.sock.setsockopt(zmq.SUBSCRIBE, b"probe")
        self.sock.connect(c.events_endpoint)
        token = secrets.token_hex(8)
        with anyio.move_on_after(c.connect_timeout_s):
            while True:
                await c.health(probe=token)
                with anyio.move_on_after(0.2):
                    while True:
                        ev = await self._recv()
                        if ev is None:
                            continue
                        if ev.topic == "probe" and ev.data.get("probe") == token:
                            return self
                        if self._wanted(ev):
                            self._early.append(ev)
        await self.aclose()  # only a timeout leaves the loop
        raise RouterUnavailable(f"no events from the router of tenant {c.tenant!r} within {c.connect_timeout_s:g} s")

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None

    async def _recv(self) -> P.Event | None:
        assert self.sock is not None
        frames = await self.sock.recv_multipart()
        try:
            ev = P.decode(frames[-1])
        except P.ProtocolError:
            return None
        return ev if isinstance(ev, P.Event) else None

    def _wanted(self, ev: P.Event) -> bool:
        if ev.topic == "probe":
            return bool(self.kinds and "probe" in self.kinds)
        if self.kinds is not None and ev.topic not in self.kinds:
            return False
        return self.slot is None or ev.slot == self.slot

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> P.Event:
        if self.sock is None:
            await self.__aenter__()
        if self._early:
            return self._early.pop(0)
        while True:
            ev = await self._recv()
            if ev is not None and self._wanted(ev):
                return ev


class Fleet(Client):
    """The orchestrator API: one connection to a tenant's router. Open it with
    :meth:`connect`; every call of :class:`Client` (``send``, ``publish``, ``task``, ``ps``,
    ``reset``, ``events``, ``slot_op``, ``health``) is available."""

    @classmethod
    @asynccontextmanager
    async def connect(cls, target: str | Path | FleetConfig, *, connect_timeout_s: float = 5.0) -> AsyncIterator[Fleet]:
        """``async with Fleet.connect(target) as fleet``: ``target`` is a roster file (str or
        Path), a loaded roster (:class:`FleetConfig`), or the router's ``ipc://`` endpoint.

        Raises:
            RouterUnavailable: the router is not running or does not answer.
            fleetbus.config.RosterError: the roster file is invalid (file and path inside it).
        """
        if isinstance(target, FleetConfig):
            fleet = cls(target, connect_timeout_s=connect_timeout_s)
        elif isinstance(target, str) and target.startswith(("ipc://", "tcp://")):
            fleet = cls(None, endpoint=target, connect_timeout_s=connect_timeout_s)
        else:
            fleet = cls(load_roster(target), connect_timeout_s=connect_timeout_s)
        async with fleet:
            yield fleet


class SyncFleet:
    """Blocking facade over :class:`Fleet` for scripts: one connection, run by an anyio
    blocking portal (an event loop in a background thread).

        with SyncFleet.connect("fleet.yaml") as fleet:
            t = fleet.publish("idle:reviewer", "review PR 12", wait="done")
            for ev in fleet.events(kinds=["task"]): ...

    Methods take the same arguments and return the same models as :class:`Fleet`'s.
    """

    def __init__(self, portal: Any, fleet: Fleet):
        self._portal = portal
        self.fleet = fleet

    @classmethod
    @contextmanager
    def connect(cls, target: str | Path | FleetConfig, *, connect_timeout_s: float = 5.0) -> Iterator[SyncFleet]:
        """As :meth:`Fleet.connect`, blocking. Raises the same errors."""
        from anyio.from_thread import start_blocking_portal

        with start_blocking_portal(backend="asyncio") as portal:
            # entered and left in one task of the portal (the connection's task group needs that)
            with portal.wrap_async_context_manager(Fleet.connect(target, connect_timeout_s=connect_timeout_s)) as fleet:
                yield cls(portal, fleet)

    def _call(self, fn: Callable[..., Any], *a: Any, **kw: Any) -> Any:
        return self._portal.call(lambda: fn(*a, **kw))

    def send(self, to: str, body: str, **kw: Any) -> P.SendResult:
        return self._call(self.fleet.send, to, body, **kw)

    def publish(self, to: str, body: str, **kw: Any) -> P.TaskResult | list[P.TaskResult]:
        return self._call(self.fleet.publish, to, body, **kw)

    def task(self, task_id: str, **kw: Any) -> P.TaskResult | list[P.TaskResult]:
        return self._call(self.fleet.task, task_id, **kw)

    def ps(self) -> list[P.SlotStatus]:
        return self._call(self.fleet.ps)

    def reset(self, slot: str, timeout_s: float | None = None) -> dict[str, Any]:
        return self._call(self.fleet.reset, slot, timeout_s)

    def health(self) -> dict[str, Any]:
        return self._call(self.fleet.health)

    @contextmanager
    def events(self, kinds: Iterable[str] | None = None, slot: str | None = None) -> Iterator[Iterator[P.Event]]:
        """``with fleet.events(kinds=["task"]) as events: for ev in events: ...`` (live once
        entered; iteration blocks for the next event)."""
        stream = self.fleet.events(kinds, slot)
        self._portal.call(stream.__aenter__)

        def gen() -> Iterator[P.Event]:
            while True:
                yield self._portal.call(stream.__anext__)

        try:
            yield gen()
        finally:
            self._portal.call(stream.aclose)


class SyncClient:
    """Blocking facade over :class:`Client` for scripts: each call opens, asks and closes.

    Raises:
        RouterUnavailable: as :class:`Client` does. RequestFailed: the router refused.
    """

    def __init__(self, fleet: FleetConfig, paths: FleetPaths | None = None, connect_timeout_s: float = 5.0):
        self.fleet = fleet
        self.paths = paths
        self.connect_timeout_s = connect_timeout_s

    def call(self, fn: Callable[[Client], Any]) -> Any:
        """Run ``await fn(client)`` on a fresh connection and return its result."""
        async def main() -> Any:
            async with Client(self.fleet, self.paths, self.connect_timeout_s) as c:
                return await fn(c)

        return anyio.run(main, backend="asyncio")

    def send(self, to: str, body: str, **kw: Any) -> P.SendResult:
        return self.call(lambda c: c.send(to, body, **kw))

    def ps(self) -> list[P.SlotStatus]:
        return self.call(lambda c: c.ps())

    def health(self) -> dict[str, Any]:
        return self.call(lambda c: c.health())

    def shutdown(self, teardown: bool = False) -> dict[str, Any]:
        return self.call(lambda c: c.shutdown(teardown))
