"""Client API: talk to a tenant's router over its ROUTER socket.

    async with Client(load_roster("fleet.yaml")) as c:
        r = await c.send("coder0", "review PR 12", verify=True)
        print(r.result, r.evidence, r.latency_ms)

Results are the pydantic models of :mod:`fleetbus.protocol` (:class:`SendResult`,
:class:`SlotStatus`), identical to what the CLI prints with ``--json``. Many requests may be in
flight at once on one client; one reader task matches answers to requests by ``req`` id.
:class:`SyncClient` wraps the same calls for scripts. Runs on anyio's asyncio backend.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import anyio
import zmq
import zmq.asyncio

from fleetbus import protocol as P
from fleetbus.config import Fleet
from fleetbus.paths import FleetPaths, fleet_paths

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
        fleet: the loaded roster (gives the tenant and its endpoint).
        paths: override the tenant's paths.
        connect_timeout_s: seconds to wait for the router to answer the first request.

    Raises (on enter):
        RouterUnavailable: no live router process for this tenant.
    """

    def __init__(self, fleet: Fleet, paths: FleetPaths | None = None, connect_timeout_s: float = 5.0):
        self.fleet = fleet
        self.paths = paths or fleet_paths(fleet.tenant, fleet.roster.transport.socket)
        self.connect_timeout_s = connect_timeout_s
        self._futures: dict[str, tuple[anyio.Event, list[P.Result]]] = {}

    async def __aenter__(self) -> Client:
        if not self.paths.router_running():
            raise RouterUnavailable(f"the router of tenant {self.fleet.tenant!r} is not running (start it with `fleet up`)")
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(self.paths.router_endpoint)
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._reader)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._tg.cancel_scope.cancel()
        await self._tg.__aexit__(None, None, None)
        self.sock.close(linger=0)
        self.ctx.term()

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
            raise RouterUnavailable(f"the router of tenant {self.fleet.tenant!r} did not answer within {timeout_s:g} s")
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
        t = timeout_s or (P.QUEUE_TIMEOUT_S if wait == "accepted" else self.fleet.roster.bus.verify_timeout_s)
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

    async def health(self) -> dict[str, Any]:
        return await self.request(lambda req: P.HealthRequest(req=req), self.connect_timeout_s)

    async def slot_op(self, kind: Literal["START", "STOP", "RESTART", "RESET", "INTERRUPT"], slot: str,
                      timeout_s: float | None = None) -> dict[str, Any]:
        """An operator verb on one slot. RESET and INTERRUPT confirm their effect within
        ``timeout_s`` s (default: roster ``bus.verify_timeout_s``).

        Raises:
            RequestFailed: with codes ``unknown-slot``, ``slot-down``, ``slot-dead``, ``no-reset``,
                ``no-prompt``, ``busy``, ``still-busy``, ``already-running``, ``transport``.
        """
        t = (timeout_s or self.fleet.roster.bus.verify_timeout_s) + 30.0
        return await self.request(lambda req: P.SlotRequest(kind=kind, req=req, slot=slot, timeout_s=timeout_s), t)

    async def shutdown(self, teardown: bool = False) -> dict[str, Any]:
        return await self.request(lambda req: P.ShutdownRequest(req=req, teardown=teardown), self.connect_timeout_s)


class SyncClient:
    """Blocking facade over :class:`Client` for scripts: each call opens, asks and closes.

    Raises:
        RouterUnavailable: as :class:`Client` does. RequestFailed: the router refused.
    """

    def __init__(self, fleet: Fleet, paths: FleetPaths | None = None, connect_timeout_s: float = 5.0):
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
