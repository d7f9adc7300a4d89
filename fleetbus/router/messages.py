"""The router's message path: journal -> the slot's queue -> type -> verify; and recovery.

:class:`MessagePath` is mixed into :class:`fleetbus.router.server.Router`, which owns the state it
uses (``fleet``, ``transport``, ``table``, ``waiters``, ``queues``, ``inflight``, the journal,
``publish``, ``_send``, ``_read_input``, the task group). In order:

- :meth:`MessagePath.send` journals a SEND (idempotency keys, ``when``, ``detach``) and queues it;
- one worker per slot (:meth:`MessagePath._slot_worker`) types its messages one at a time, in
  order (:meth:`MessagePath._attempt`), and verifies each by the runtime's ack or the pane
  (:meth:`MessagePath._verify`, waiting in :mod:`fleetbus.router.evidence`); a message the
  runtime's TUI holds gets a follower task;
- :meth:`MessagePath._recover` finishes what a previous router left unfinished without typing
  anything twice; :meth:`MessagePath._runtime_exited` puts back what a dead runtime never took;
- acks that arrive late (or replayed after a restart) are journaled (:meth:`MessagePath._late_ack`).

Semantics: DESIGN.md "Verify semantics" and the README section "Never lose a message".
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio

from fleetbus import protocol as P
from fleetbus.adapters import get_adapter, marker
from fleetbus.config import Slot
from fleetbus.router import verify
from fleetbus.router.delivery import Delivery, SlotQueue, Unavailable
from fleetbus.router.evidence import DRAFT_CHECK_S, HISTORY_ROWS, POLL_S, Evidence, _Waiter
from fleetbus.router.journal import Journal, JournalUnavailable, MessageRecord
from fleetbus.router.journal_guard import JournalGuard
from fleetbus.transports.base import SlotNotFound

log = logging.getLogger("fleetbus.router")

#: Seconds between tries of a message held for a slot that is not available (``when=available``).
AVAILABLE_POLL_S = 0.5
#: Seconds, beyond a slot's liveness period, that recovery waits for its sidecar to re-register.
RECOVERY_GRACE_S = 2.0
#: Seconds after a sidecar's re-registration by which its replayed acks have arrived.
ACK_REPLAY_S = 0.5
#: Scrollback rows searched for a recovered message's marker (tmux history-limit is 5000).
RECOVERY_HISTORY_ROWS = 5000


__all__ = ["DRAFT_CHECK_S", "MessagePath", "_Waiter"]


class MessagePath(Evidence, JournalGuard):
    """Mixin: the message path of :class:`fleetbus.router.server.Router` (see the module docstring).
    Waiting for evidence is :class:`fleetbus.router.evidence.Evidence`; what changes while the
    journal cannot be written is :class:`fleetbus.router.journal_guard.JournalGuard`."""

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
        if rec.state == "queued" and not any(c["state"] == "typing" for c in self.journal.changes_of(rec.id)):
            # never typed: the marker came from text someone else put in the pane
            self.ignored_acks += 1
            log.warning("ignored an ack for message %s of %s: it was never typed (a marker typed by someone else?)",
                        rec.id, slot)
            return
        late = d or Delivery(rec, P.SendRequest(req="late", to=rec.slot, body=rec.body), time.monotonic())
        r = self._result(late, "accepted", evidence="runtime-ack", session_id=ack.session_id,
                         detail=f"late ack (the message was {rec.state})")
        if rec.result:
            r = r.model_copy(update={"latency_ms": rec.result.get("latency_ms", r.latency_ms)})
        self._finish(late, r)

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
            tg.start_soon(self._journal_watch)
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
        not available and ``when="available"``). Never raises for a refused message; one that
        cannot be journaled is ``rejected`` (``journal-unavailable``, ``journaled`` false), and a
        SEND over ``bus.max_queued_per_slot`` is ``rejected``/``queue-full`` and is not journaled."""
        t0 = time.monotonic()
        slot = self.fleet.slots.get(req.to)
        max_bytes = self.fleet.roster.bus.max_body_bytes
        problem: tuple[str, str] | None = None
        body = req.body
        if slot is None:
            problem = ("unknown-slot", f"unknown slot {req.to!r}; roster slots: {', '.join(self.fleet.slots) or '(none)'}")
        elif (full := self.limits.queue_full(req, t0)) is not None:  # bus.max_queued_per_slot; not journaled
            return full
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
        try:
            rec, created = self.journal.add_message(rec)
        except JournalUnavailable as e:  # nothing journaled, nothing typed (a known key needs no write)
            known = self.journal.by_key(req.idempotency_key) if req.idempotency_key else None
            if known is None:
                return self._not_journaled(req, t0, problem, e)
            rec, created = known, False
        if not created:  # its idempotency key is already journaled: the insert returned that message
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
        """Journal the final result of ``d``, answer its clients and publish the event. When the
        journal cannot be written the result is kept in memory until it can, and the clients get
        it with ``journaled`` false."""
        if d.final is not None:
            return
        d.final = r
        if not self.journal.set_state(d.rec, r.result, result=r.model_dump(), evidence=r.evidence, code=r.code,
                                      detail=r.detail, retries=r.submit_retries or None, defer=True):
            d.final = r = r.model_copy(update={"journaled": False})
        d.reply(r)
        self.inflight.pop(d.rec.id, None)
        self.waiters.pop(d.rec.id, None)
        self.publish("message", d.rec.slot, id=d.rec.id, state=r.result, result=r.result, evidence=r.evidence,
                     code=r.code)

    async def _slot_worker(self, name: str, q: SlotQueue) -> None:
        """Type the messages of slot ``name`` one at a time, oldest first. A message whose slot is
        not available is rejected (``when=now``) or waits, polled every AVAILABLE_POLL_S, until
        the slot can take it or its TTL ends (``dead-letter``). While the journal cannot be
        written nothing is typed, rejected or expired: the queue waits."""
        swept = 0.0
        while True:
            await q.wait()
            if not self.journal.writable:  # nothing is typed, rejected or expired that cannot be journaled
                self._held_for_journal(q)
                await anyio.sleep(AVAILABLE_POLL_S)
                continue
            now = time.time()
            if now >= swept + AVAILABLE_POLL_S:  # one pass over the queue at most this often, not per message
                swept = now
                for other in list(q.items):
                    if other.final is not None or self._expire(other, now):
                        q.items.remove(other)
                if not q.items:
                    continue
            d = q.items[0]
            if d.final is not None or self._expire(d, now):  # finished by a late ack, or too late to type
                q.items.popleft()
                continue
            try:
                out = await (self._attempt(d) if d.rec.state == "queued" else self._recover_one(d))
            except Exception as e:  # a bug or a transport failure must never stop the slot's queue
                self.failures.exception(f"deliver:{name}:{type(e).__name__}", "delivery of %s to %s failed",
                                        d.rec.id, name)
                if d.rec.state != "queued":
                    self._finish(d, self._result(d, "unconfirmed", detail=f"delivery failed after typing began: {e}"))
                    out = None
                else:
                    out = Unavailable("transport", f"{type(e).__name__}: {e}")
            if out is None:
                if q.items and q.items[0] is d:
                    q.items.popleft()
                continue
            if out.code == JournalUnavailable.code:  # still queued in the journal: typed when it can be written
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

    def _expire(self, d: Delivery, now: float) -> bool:
        """``dead-letter`` for a message still held in the journal past its TTL (True then)."""
        if d.rec.expires is None or now < d.rec.expires or d.rec.state != "queued":
            return False
        self._finish(d, self._result(d, "dead-letter", code="ttl-expired",
                                     detail=f"slot {d.rec.slot!r} was not available within the TTL; nothing was typed"))
        return True


    def _runtime_exited(self, slot: str, diag: dict[str, Any]) -> None:
        """Supervisor exit listener: the program of ``slot`` died (or the tmux server did).
        Verification of every message typed into it that it never acknowledged ends now
        (verification also sees a vanished or dead pane itself, whichever comes first). One that
        was surely not taken goes back into the slot's queue, ahead of newer messages, and is
        typed into the restarted runtime (``when=available``) or rejected ``slot-dead``
        (``when=now``): on a hook runtime whose sidecar was connected (an ack would have come),
        or when the pane last showed it held (in the TUI's queue or its input line), whatever the
        evidence was. Otherwise it is ``unconfirmed`` (a shell may have run it): see
        :meth:`Evidence._death_verdict`."""
        for d in list(self.inflight.values()):
            w = d.waiter
            if (d.rec.slot != slot or d.final is not None or w is None or w.accepted.is_set()
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
        self.journal.set_state(d.rec, "queued", held_by="fleetbus", code="runtime-died", detail=detail, defer=True)
        self.publish("message", d.rec.slot, id=d.rec.id, state="queued", result="queued", held_by="fleetbus",
                     code="runtime-died")
        return Unavailable("slot-dead", f"slot {d.rec.slot!r}: its runtime died before taking the message")

    def _hold(self, d: Delivery, out: Unavailable) -> None:
        """``d`` waits in the journal for its slot (``when=available``): tell its clients so."""
        d.held = True
        self.journal.set_state(d.rec, "queued", held_by="fleetbus", code=out.code, detail=out.detail, defer=True)
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
        screen, typed = await self._read_input(slot, adapter, screen)
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
        w.use_ack, w.peer, w.pane_pid = use_ack, peer, screen.pid
        try:
            self.journal.set_state(rec, "typing", pane_pid=screen.pid)  # write-ahead: see _recover_one
        except JournalUnavailable as e:  # never typed without it: the message stays queued
            self.waiters.pop(rec.id, None)
            d.waiter = None
            return Unavailable(e.code, str(e))
        if peer is not None:
            await self._send(peer.addr, P.Expect(id=rec.id, marker=mk))
        try:
            await self.transport.deliver(slot.name, text, adapter.submit)
        except SlotNotFound:
            self.journal.set_state(rec, "queued", held_by="fleetbus", detail="the slot vanished before typing",
                                   defer=True)
            self.waiters.pop(rec.id, None)
            return Unavailable("slot-down", f"slot {slot.name!r} vanished before typing")
        self.journal.set_state(rec, "injected", defer=True)
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
        if r is None and w.accepted.is_set():  # the ack came just as the runtime died
            r = result("accepted", evidence="runtime-ack", submit_retries=w.retries, queued_ms=w.queued_ms(),
                       session_id=w.ack.session_id if w.ack else None)
        if r is None and not w.died:
            r = await self._final_verdict(slot, adapter, mk, w, use_ack, result)
        if r is None:  # the runtime died (or its pane vanished) before it took the message
            r = await self._after_death(d, slot, adapter, mk, w)
            if r is None:
                return False
        if r.result != "queued":
            self._finish(d, r)
            return True
        r = r.model_copy(update={"held_by": "runtime"})
        self.journal.set_state(d.rec, "runtime-queued", held_by="runtime", evidence=r.evidence, queued_ms=r.queued_ms,
                               defer=True)
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
            while not w.accepted.is_set() and not w.died:
                if use_ack:
                    await w.accepted.wait()
                    break
                await anyio.sleep(0.25)
                if await self._look(slot, adapter, mk, w, history=HISTORY_ROWS) == "accepted":
                    self._finish(d, self._result(d, "accepted", evidence="pane-diff", queued_ms=queued.queued_ms,
                                                 submit_retries=w.retries))
                    return
        if d.final is not None:
            return
        if w.accepted.is_set():
            self._finish(d, self._result(d, "accepted", evidence="runtime-ack", queued_ms=queued.queued_ms,
                                         submit_retries=w.retries, session_id=w.ack.session_id if w.ack else None))
        elif w.died:
            r = await self._after_death(d, slot, adapter, mk, w, queued_ms=queued.queued_ms)
            if r is not None:
                self._finish(d, r)
                return
            self._requeue(d)
            q = self._slot_queue(d.rec.slot)
            at = next((i for i, o in enumerate(q.items) if o.rec.state == "queued" and o.rec.created > d.rec.created),
                      len(q.items))
            q.items.insert(at, d)
            q.wake()
        else:
            self._finish(d, self._result(d, "unconfirmed", queued_ms=queued.queued_ms, submit_retries=w.retries,
                                         detail=f"held in the runtime's queue and not taken within {limit:g} s"))

    async def _after_death(self, d: Delivery, slot: Slot, adapter: Any, mk: str, w: _Waiter,
                           queued_ms: float | None = None) -> P.SendResult | None:
        """The final result of ``d`` after the runtime it was typed into died
        (:meth:`Evidence._death_verdict`), or None when it was surely not taken: the caller puts
        it back in the slot's queue (:meth:`_requeue`)."""
        outcome = await self._death_verdict(slot, adapter, mk, w)
        qms = queued_ms if queued_ms is not None else w.queued_ms()
        if outcome == "ack":
            return self._result(d, "accepted", evidence="runtime-ack", submit_retries=w.retries, queued_ms=qms,
                                session_id=w.ack.session_id if w.ack else None)
        if outcome == "pane":
            return self._result(d, "accepted", evidence="pane-diff", submit_retries=w.retries, queued_ms=qms,
                                detail="the pane showed it taken before the runtime died")
        if outcome == "requeue":
            return None
        return self._result(d, "unconfirmed", submit_retries=w.retries, queued_ms=qms,
                            detail=f"the runtime of {slot.name!r} died (or its pane vanished) before an ack or the "
                                   "pane showed it taken or held; it may have taken it, so it is not typed again")

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
        2. the runtime it was typed into is gone (pane vanished, dead, or another pane pid) and
           either the slot's sidecar is registered (its acks replayed: none was for it) or the
           message was ``runtime-queued`` (held in the dead runtime's own queue): it goes back to
           the slot's queue (:meth:`_requeue`) and is typed into the new runtime;
        3. the marker anywhere in the pane (screen and RECOVERY_HISTORY_ROWS of scrollback)
           means it was typed: verification resumes (a draft gets its one submit key);
        4. a message left ``typing`` whose marker is nowhere in the pane of the same process
           (same pane pid) of a :attr:`Adapter.line_history` runtime was never typed: it is
           typed now;
        5. anything else is ``unconfirmed`` (no evidence either way; it is not re-typed).
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
        typing_pid = next((c["data"].get("pane_pid") for c in reversed(self.journal.changes_of(rec.id))
                           if c["state"] == "typing"), None)
        w.pane_pid = typing_pid
        gone = screen is None or screen.dead or (typing_pid is not None and screen.pid != typing_pid)
        if gone and (use_ack or rec.state == "runtime-queued"):
            # the runtime it was typed into is gone, and the sidecar (registered, its acks replayed)
            # has no ack for it, or the runtime's own queue held it: nobody took it
            return self._requeue(d)
        if seen and screen is not None and not screen.dead:
            deadline = time.monotonic() + (d.req.timeout_s or self.fleet.roster.bus.verify_timeout_s)
            if not await self._verify(d, slot, adapter, mk, use_ack, False, deadline):
                return self._requeue(d)
            return None
        if (rec.state == "typing" and not seen and adapter.line_history and screen is not None and not screen.dead
                and typing_pid is not None and screen.pid == typing_pid):
            self.journal.set_state(rec, "queued", held_by="fleetbus", defer=True,
                                   detail="not in the pane: the router stopped before typing it; typing it now")
            self.waiters.pop(rec.id, None)
            return await self._attempt(d)
        why = ("the router stopped while typing it" if rec.state == "typing"
               else "the router restarted before the runtime acknowledged it")
        self._finish(d, self._result(d, "unconfirmed", detail=f"{why}; no ack and no pane evidence since; "
                                                              "it is not typed again"))
        return None
