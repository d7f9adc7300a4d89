"""Task routing: selectors, the dispatcher, and each task's lifecycle.

A task is work for one slot, chosen by a selector when a slot is free (:func:`parse_selector`):

- ``<name>``: that slot;
- ``class:<class>``: any free slot of the class;
- ``idle`` / ``idle:<class>``: the least recently used idle slot (of the class), from heartbeat
  state: the slot whose sidecar last reported ``idle`` the longest ago;
- ``all:<class>``: broadcast: one task per slot of the class (a ``group``).

Lifecycle (:data:`fleetbus.protocol.TaskState`): ``published`` (journaled, waiting for a free
matching slot, at most ``wait_s``) → ``assigned`` (the slot holds it; its message goes through
the message path with ``wait=accepted``) → ``accepted`` (the runtime's ack) → ``done`` (the
runtime's turn-complete hook: the first ``turn-end`` the slot reports after the ack) |
``failed`` | ``timed-out``. A task whose message was refused before anything was typed
(``busy-input``, ``no-prompt``, the slot went down) goes back to ``published``, keeps its place,
and the slot is skipped for :data:`COOLDOWN_S` s.

Free means: the slot's sidecar is registered and not stale, it holds no task, it is not being
reset, and its runtime reports ``idle`` (``idle`` selectors) or ``idle``/``unknown`` (names,
``class:``, ``all:``; a runtime that has not reported a state yet, e.g. Codex 0.169 before its
first prompt). ``allow_busy`` drops the "holds no task" and state conditions. Only slots whose
runtime has hooks (``Adapter.has_hook``) take tasks: without a turn-complete signal ``done`` could
never be known.

Every state change is journaled (``tasks`` table and a ``task`` change) and published (topic
``task``). A router restart resumes open tasks: ``published`` ones wait again; ``assigned`` ones
follow their message (its idempotency key is ``task-<id>-<attempt>``); ``accepted`` ones are
``done`` as soon as the slot's re-registered sidecar reports ``idle`` (the turn ended while the
router was away), or at the next ``turn-end``. The same holds for a live task whose sidecar
restarted mid-turn (a turn-end sent while it was down is lost), with a pane check for runtimes
that show a busy indicator (:meth:`Dispatcher._await_turn_end`).

The runtime dying, the slot being stopped or restarted, or its tmux server dying while it holds
a task makes the task ``failed`` (code ``slot-died``, with the exit diagnostics in ``detail``);
the dispatcher hears these from the supervisor's slot events (``Supervisor.event_listeners``).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import anyio

from fleetbus import protocol as P
from fleetbus.adapters import get_adapter
from fleetbus.config import check_kickstart, render_kickstart
from fleetbus.router import verify
from fleetbus.router.journal import JournalUnavailable, TaskRecord
from fleetbus.router.journal_guard import RateLimitedLog

if TYPE_CHECKING:
    from fleetbus.router.server import Router

log = logging.getLogger("fleetbus.tasks")

#: Seconds between dispatch passes when nothing wakes the dispatcher (deadlines, resets).
TICK_S = 0.5
#: Seconds a slot is skipped after it refused a task's message before anything was typed.
COOLDOWN_S = 2.0
#: Seconds between retries of a ``reset_between_tasks`` reset that failed.
RESET_RETRY_S = 5.0
#: Slot events after which the slot's runtime no longer holds its task.
DEATH_EVENTS = ("exited", "stopped", "server-lost")


class SelectorError(ValueError):
    """A selector that is not one of the documented forms."""


@dataclass(frozen=True)
class Selector:
    """A parsed selector: ``kind`` is ``name``, ``class``, ``idle`` or ``all``; ``value`` the slot
    name or class (None for a bare ``idle``)."""

    kind: Literal["name", "class", "idle", "all"]
    value: str | None
    text: str


def parse_selector(text: str) -> Selector:
    """Parse ``<name>``, ``class:<c>``, ``idle``, ``idle:<c>`` or ``all:<c>``.

    Raises:
        SelectorError: an unknown prefix, or a prefix without a value.
    """
    text = text.strip()
    if not text:
        raise SelectorError("empty selector; use a slot name, class:<class>, idle, idle:<class> or all:<class>")
    if text == "idle":
        return Selector("idle", None, text)
    if ":" in text:
        prefix, _, value = text.partition(":")
        if prefix not in ("class", "idle", "all"):
            raise SelectorError(f"unknown selector prefix {prefix!r} in {text!r}; "
                                "use a slot name, class:<class>, idle, idle:<class> or all:<class>")
        if not value:
            raise SelectorError(f"selector {text!r} names no class")
        return Selector(prefix, value, text)  # type: ignore[arg-type]
    return Selector("name", text, text)


@dataclass
class _Task:
    rec: TaskRecord
    names: list[str] = field(default_factory=list)  # the roster slots it may go to, roster order
    idle_only: bool = False  # an ``idle`` selector: only slots reporting ``idle``
    changed: anyio.Event = field(default_factory=anyio.Event)
    turn_end: anyio.Event = field(default_factory=anyio.Event)
    acked: bool = False
    acked_at: float | None = None  # Ack.at (Unix s, the sidecar's clock) of its message's ack
    scope: anyio.CancelScope | None = None
    journaled: bool = True  # its latest state is in the journal (False: kept in memory until it can be written)

    @property
    def id(self) -> str:
        return self.rec.id

    @property
    def final(self) -> bool:
        return self.rec.state in P.TASK_FINAL

    @property
    def key(self) -> str:
        """Idempotency key of the message of the current attempt."""
        return f"task-{self.id}-{self.rec.options.get('attempt', 0)}"


class Dispatcher:
    """The router's task dispatcher (one per router; :meth:`run` is a task of ``serve``).

    Args:
        router: the :class:`Router` (its ``fleet``, ``table``, ``journal``, ``send``, ``reset``,
            ``publish`` and task group).
    """

    def __init__(self, router: Router):
        self.router = router
        self.tasks: dict[str, _Task] = {}  # open tasks (and finished ones until their waiters left)
        self.pending: list[_Task] = []  # published, oldest first
        self.holding: dict[str, list[str]] = defaultdict(list)  # slot -> ids of the tasks it holds
        self.idle_since: dict[str, float] = {}  # slot -> when it last became idle (monotonic)
        self.cooldown: dict[str, float] = {}  # slot -> monotonic time until it is skipped
        self.resetting: set[str] = set()
        self.needs_reset: dict[str, float] = {}  # slot -> monotonic time of the last failed reset
        self._wake = anyio.Event()
        self.started = time.monotonic()
        self.failures = RateLimitedLog(log)
        # the roster is fixed for the router's life
        self.hooked = {n for n, s in router.fleet.slots.items() if get_adapter(s.runtime).has_hook}
        self.order = {n: i for i, n in enumerate(router.fleet.slots)}

    # -- helpers ---------------------------------------------------------------------------------

    @property
    def fleet(self) -> Any:
        return self.router.fleet

    def wake(self) -> None:
        self._wake.set()

    def result(self, t: _Task, **kw: Any) -> P.TaskResult:
        r = t.rec.result or {}
        created = t.rec.created
        acc, fin = r.get("accepted_at"), r.get("finished_at")
        return P.TaskResult(
            tenant_id=self.fleet.tenant, host=self.router.host, id=t.id, group=t.rec.group, selector=t.rec.selector,
            state=t.rec.state, slot=t.rec.slot, message_id=t.rec.message_id, sender=t.rec.sender,
            code=r.get("code"), detail=r.get("detail", ""), created=created, assigned_at=r.get("assigned_at"),
            accepted_at=acc, finished_at=fin,
            accepted_ms=round((acc - created) * 1000, 3) if acc else None,
            done_ms=round((fin - created) * 1000, 3) if fin else None,
            idempotency_key=t.rec.idempotency_key, journaled=t.journaled, **kw)

    def _set(self, t: _Task, state: str, *, code: str | None = None, detail: str = "", **times: float) -> None:
        """Journal and publish a state change of ``t``; wake its waiters and the dispatcher. When
        the journal cannot be written the change is kept in memory until it can (``journaled``
        false meanwhile)."""
        r = dict(t.rec.result or {})
        r.update(times)
        r["code"], r["detail"] = code, detail
        t.rec.result = r
        t.rec.state = state
        t.journaled = True
        res = self.result(t)
        t.journaled = self.router.journal.set_task(t.rec, state, result=res.model_dump(), code=code, detail=detail,
                                                   defer=True)
        if not t.journaled:
            res = res.model_copy(update={"journaled": False})
        self._announce(t, res)
        t.changed.set()
        t.changed = anyio.Event()
        self.wake()

    def _announce(self, t: _Task, res: P.TaskResult | None = None) -> None:
        """Publish ``t``'s state (topic ``task``; the slot is the event's own field)."""
        res = res or self.result(t)
        self.router.publish("task", t.rec.slot, **res.model_dump(exclude={"tenant_id", "host", "slot"}))

    def matching(self, sel: Selector) -> tuple[list[str], str]:
        """Roster slots ``sel`` can ever match (roster order), and why there are none."""
        slots = self.fleet.slots
        if sel.kind == "name":
            if sel.value not in slots:
                return [], f"no slot named {sel.value!r}; roster slots: {', '.join(slots) or '(none)'}"
            names = [sel.value]
        elif sel.kind == "idle" and sel.value is None:
            names = list(slots)
        else:
            names = [n for n, s in slots.items() if s.class_ == sel.value]
            if not names:
                classes = sorted({s.class_ for s in slots.values() if s.class_})
                return [], f"no slot of class {sel.value!r}; roster classes: {', '.join(classes) or '(none)'}"
        ok = [n for n in names if n in self.hooked]
        if not ok:
            return [], "; ".join(f"{n}: runtime {slots[n].runtime!r} has no hooks, so fleetbus cannot see its turn "
                                 "complete" for n in names)
        return ok, ""

    def _why_not(self, t: _Task, name: str, now: float) -> str | None:
        """None when slot ``name`` may take ``t`` now, else the reason."""
        if name in self.resetting:
            return "being reset"
        if name in self.needs_reset:
            return "its reset between tasks failed (retried every 5 s)"
        if self.cooldown.get(name, 0.0) > now:
            return "refused a message just now"
        peer = self.router.table.peers.get(name)
        if peer is None:
            return "no sidecar registered"
        if peer.stale:
            return "heartbeat stale"
        allow_busy = t.rec.options.get("allow_busy", False)
        if self.holding.get(name) and not allow_busy:
            return f"holds task {self.holding[name][0]}"
        if allow_busy:
            return None
        if peer.state == "idle" or (peer.state == "unknown" and not t.idle_only):
            return None
        return f"runtime {peer.state}"

    def _candidates(self, t: _Task, now: float) -> tuple[list[str], dict[str, str]]:
        """Free slots for ``t``, best first (least recently used), and why the others are not."""
        free, why = [], {}
        for n in t.names:
            reason = self._why_not(t, n, now)
            if reason is None:
                free.append(n)
            else:
                why[n] = reason
        free.sort(key=lambda n: (len(self.holding.get(n, ())), self.idle_since.get(n, self.started), self.order[n]))
        return free, why

    # -- publish ---------------------------------------------------------------------------------

    async def publish(self, req: P.PublishRequest) -> list[P.TaskResult]:
        """Create the task(s) of ``req``, journal them, and answer once each reached ``req.wait``
        (or ended). One result per task: several for ``all:<class>``.

        Raises:
            RequestError: ``bad-selector``, ``invalid-body``, ``invalid-kickstart``,
                ``journal-unavailable`` (the journal cannot be written), ``too-many-tasks``
                (``bus.max_open_tasks`` tasks are open) (nothing is journaled then).
        """
        from fleetbus.router.server import RequestError

        try:
            sel = parse_selector(req.to)
        except SelectorError as e:
            raise RequestError("bad-selector", str(e)) from None
        try:
            body = P.check_body(req.body, self.fleet.roster.bus.max_body_bytes)
        except P.InvalidBody as e:
            raise RequestError("invalid-body", str(e)) from None
        if req.kickstart is not None:
            try:
                check_kickstart(req.kickstart)
            except ValueError as e:
                raise RequestError("invalid-kickstart", f"kickstart: {e}") from None
        bus = self.fleet.roster.bus
        wait_s = bus.task_wait_s if req.wait_s is None else req.wait_s
        options = {"wait_s": wait_s, "timeout_s": req.timeout_s or bus.task_timeout_s,
                   "allow_busy": req.allow_busy, "kickstart": req.kickstart, "attempt": 0}
        names, why = self.matching(sel)
        full = self.router.limits.too_many_tasks(req, len(self.tasks), len(names) if sel.kind == "all" and names else 1)
        if full is not None:
            raise RequestError("too-many-tasks", full)
        now = time.time()
        common = dict(selector=sel.text, body=body, sender=req.sender, created=now, deadline=now + wait_s)
        if sel.kind == "all" and names:
            group = "g" + secrets.token_hex(6)
            recs = [TaskRecord(id="t" + secrets.token_hex(6), group=group, options={**options, "target": n},
                               idempotency_key=f"{req.idempotency_key}#{n}" if req.idempotency_key else None,
                               **common) for n in names]
            if req.idempotency_key:  # the first row carries the publish's own key
                recs[0].idempotency_key = req.idempotency_key
        else:
            target = names[0] if sel.kind == "name" and names else None
            recs = [TaskRecord(id="t" + secrets.token_hex(6), options={**options, "target": target},
                               idempotency_key=req.idempotency_key, **common)]
        try:
            recs, created = self.router.journal.add_tasks(recs)
        except JournalUnavailable as e:
            known = self.router.journal.task_by_key(req.idempotency_key) if req.idempotency_key else None
            if known is None:
                raise RequestError(e.code, f"{e}: no task was created; free disk space on {e.fs}") from None
            recs, created = ([known] if known.group is None else self.router.journal.tasks_of_group(known.group)), False
        if not created:
            return await self._duplicates(recs, req)
        tasks = [self._adopt(r) for r in recs]
        for t in tasks:
            self._announce(t)
            if not names:
                self._finish(t, "failed", code="no-match", detail=why)
            else:
                self.pending.append(t)
        self.wake()
        return [await self.wait(t, req.wait) for t in tasks]

    def _adopt(self, rec: TaskRecord) -> _Task:
        """Track journaled task ``rec``: the slots it may go to are resolved once (a named or
        broadcast task has its ``target``)."""
        target = rec.options.get("target")
        sel = parse_selector(rec.selector)
        names = [target] if target else self.matching(sel)[0]
        t = self.tasks[rec.id] = _Task(rec, names=names, idle_only=sel.kind == "idle")
        if rec.result is None:
            rec.result = {}
        return t

    async def _duplicates(self, recs: list[TaskRecord], req: P.PublishRequest) -> list[P.TaskResult]:
        out = []
        for rec in recs:
            t = self.tasks.get(rec.id)
            if t is not None:
                r = await self.wait(t, req.wait)
            else:
                r = self.result(_Task(rec))
            out.append(r.model_copy(update={"duplicate": True}))
        return out

    async def wait(self, t: _Task, stage: str | None, timeout_s: float | None = None) -> P.TaskResult:
        """``t``'s result once it reached ``stage`` (``published``..``done``) or ended, or after
        ``timeout_s`` s (None: no limit; tasks end by their own deadlines)."""
        with anyio.move_on_after(timeout_s if timeout_s is not None else float("inf")):
            while stage is not None and not t.final and P.TASK_STAGES[t.rec.state] < P.TASK_STAGES[stage]:
                await t.changed.wait()
        return self.result(t)

    async def query(self, req: P.TaskRequest) -> list[P.TaskResult]:
        """The task ``req.id`` (a task id or a broadcast group id), waiting as asked.

        Raises:
            RequestError: ``unknown-task``.
        """
        from fleetbus.router.server import RequestError

        j = self.router.journal
        recs = j.tasks_of_group(req.id) if req.id.startswith("g") else []
        if not recs:
            rec = j.get_task(req.id)
            recs = [rec] if rec else []
        if not recs:
            raise RequestError("unknown-task", f"no task or group {req.id!r} in the journal")
        out = []
        for rec in recs:
            t = self.tasks.get(rec.id) or _Task(rec)
            out.append(await self.wait(t, req.wait, req.timeout_s))
        return out

    def held_by(self, slot: str) -> str | None:
        """The oldest task ``slot`` holds, or None (``fleet ps``)."""
        held = self.holding.get(slot)
        return held[0] if held else None

    # -- the dispatcher --------------------------------------------------------------------------

    async def run(self) -> None:
        """Resume the journal's open tasks, then assign published tasks as slots become free."""
        self._recover()
        while True:
            with anyio.move_on_after(TICK_S):
                await self._wake.wait()
            self._wake = anyio.Event()
            try:
                self._pass()
            except Exception as e:  # a bug must never stop dispatching
                self.failures.exception(f"pass:{type(e).__name__}", "dispatch pass failed")

    def _pass(self) -> None:
        now_m, now = time.monotonic(), time.time()
        for name, failed_at in list(self.needs_reset.items()):
            peer = self.router.table.peers.get(name)
            if (now_m - failed_at >= RESET_RETRY_S and name not in self.resetting and not self.holding.get(name)
                    and peer is not None and peer.state == "idle"):
                self.resetting.add(name)
                self.router._tg.start_soon(self._reset, name)
        for t in list(self.pending):
            if t.rec.state != "published":
                self.pending.remove(t)
                continue
            free, why = self._candidates(t, now_m)
            if free and not self.router.journal.writable:  # its message could not be journaled: it waits
                why.update({n: "the journal cannot be written" for n in free})
                free = []
            if free:
                self._assign(t, free[0])
            elif t.rec.deadline is not None and now >= t.rec.deadline:
                self.pending.remove(t)
                reasons = "; ".join(f"{n}: {w}" for n, w in why.items()) or "no slot"
                self._finish(t, "timed-out", code="no-slot",
                             detail=f"no matching slot was free within {t.rec.options.get('wait_s', 0):g} s ({reasons})")

    def _assign(self, t: _Task, slot: str) -> None:
        self.pending.remove(t)
        self.holding[slot].append(t.id)
        self.idle_since[slot] = time.monotonic()  # used now: the least recently used goes first
        t.rec.slot = slot
        t.rec.options["attempt"] = t.rec.options.get("attempt", 0) + 1
        t.acked, t.acked_at = False, None
        t.turn_end = anyio.Event()
        self._set(t, "assigned", assigned_at=time.time())
        self.router._tg.start_soon(self._run, t)

    def _release(self, t: _Task) -> None:
        slot = t.rec.slot
        if slot is not None and t.id in self.holding.get(slot, ()):
            self.holding[slot].remove(t.id)

    def _finish(self, t: _Task, state: str, *, code: str | None = None, detail: str = "") -> None:
        """End ``t`` (``done``, ``failed``, ``timed-out``); release its slot (after a reset when
        the slot has ``reset_between_tasks`` and its runtime still runs)."""
        if t.final:
            return
        if t.scope is not None:
            t.scope.cancel()
        if t in self.pending:
            self.pending.remove(t)
        self._release(t)
        slot = t.rec.slot
        self._set(t, state, code=code, detail=detail, finished_at=time.time())
        self.tasks.pop(t.id, None)
        if (slot is not None and code != "slot-died" and self.fleet.slots[slot].reset_between_tasks
                and t.rec.options.get("attempt")):
            self.resetting.add(slot)
            self.router._tg.start_soon(self._reset, slot)

    async def _reset(self, slot: str) -> None:
        """``reset_between_tasks``: reset ``slot``'s session; on failure keep it out of dispatch
        and retry every RESET_RETRY_S s while it is idle."""
        try:
            await self.router.reset(self.fleet.slots[slot], self.fleet.roster.bus.verify_timeout_s)
            self.needs_reset.pop(slot, None)
        except Exception as e:
            log.warning("reset between tasks of %s failed: %s", slot, e)
            self.needs_reset[slot] = time.monotonic()
            self.router.publish("slot", slot, event="reset-failed", error=str(e), by="reset_between_tasks")
        finally:
            self.resetting.discard(slot)
            self.wake()

    # -- one task ----------------------------------------------------------------------------------

    async def _run(self, t: _Task, resume: bool = False) -> None:
        """Deliver ``t`` to its slot and follow it to ``accepted`` and ``done``; with ``resume``,
        pick up a task a previous router left ``assigned`` or ``accepted``."""
        with anyio.CancelScope() as scope:
            t.scope = scope
            try:
                if not resume:
                    await self._deliver(t)
                elif t.rec.state == "accepted":
                    t.acked = True
                    await self._await_turn_end(t, since=self.started_clock())
                elif self.router.journal.by_key(t.key) is None:  # assigned, and its message never journaled
                    self._republish(t, detail="resumed after a router restart (nothing was typed)")
                else:  # assigned: the message path resumes its message; a SEND with its key follows it
                    await self._deliver(t)
            except Exception as e:
                self.failures.exception(f"task:{type(e).__name__}", "task %s failed in the router", t.id)
                self._finish(t, "failed", code="internal", detail=f"{type(e).__name__}: {e}")
            finally:
                t.scope = None

    def _republish(self, t: _Task, code: str | None = None, detail: str = "") -> None:
        """Back to ``published``, in its place by creation time: nothing of it was typed."""
        self._release(t)
        t.rec.slot = None
        self._set(t, "published", code=code, detail=detail)
        self.pending.append(t)
        self.pending.sort(key=lambda x: x.rec.created)

    def _deadline(self, t: _Task) -> float:
        """Unix time by which ``t`` must be done (its assignment plus ``timeout_s``)."""
        r = t.rec.result or {}
        return (r.get("assigned_at") or time.time()) + t.rec.options.get("timeout_s", self.fleet.roster.bus.task_timeout_s)

    async def _deliver(self, t: _Task) -> None:
        slot = self.fleet.slots[t.rec.slot]
        try:
            text = render_kickstart(t.rec.options.get("kickstart") or slot.kickstart, body=t.rec.body, task_id=t.id,
                                    slot=slot.name, sender=t.rec.sender, selector=t.rec.selector)
        except ValueError as e:
            self._finish(t, "failed", code="invalid-kickstart", detail=str(e))
            return
        remaining = max(1.0, self._deadline(t) - time.time())
        req = P.SendRequest(req=f"task-{t.id}", to=slot.name, body=text, sender=t.rec.sender, wait="accepted",
                            when="now", timeout_s=min(remaining, P.MAX_WAIT_S), idempotency_key=t.key)
        r = await self.router.send(req)
        if t.final:
            return
        t.rec.message_id = r.id
        if r.result == "rejected" and r.code != "invalid-body" and not r.duplicate:
            # nothing was typed: the task goes back to waiting, in its place, and the slot rests
            self.cooldown[slot.name] = time.monotonic() + COOLDOWN_S
            self._republish(t, code=r.code, detail=f"slot {slot.name} could not take it: {r.detail}")
            return
        if r.result != "accepted":
            self._finish(t, "failed", code="delivery",
                         detail=f"message {r.id} ended {r.result}{f' ({r.code})' if r.code else ''}: {r.detail}")
            return
        t.acked = True
        self._set(t, "accepted", accepted_at=time.time())
        await self._await_turn_end(t)

    async def _await_turn_end(self, t: _Task, since: float | None = None) -> None:
        """``done`` at the slot's next turn-complete; ``timed-out`` at the task's deadline.

        ``since``: the liveness-table time from which the slot's sidecar is trusted to have
        seen the turn (default: now, the moment of acceptance; after a router restart: the
        router's start). A sidecar that registered after it (restarted, or re-registered with a
        new router) may have missed the turn-end, so then the task is also ``done`` when that
        sidecar reports ``idle``, or, for runtimes with a busy indicator (``Adapter.busy``),
        when the pane shows the prompt and no busy indicator at two checks TICK_S apart. Any
        sidecar that reports ``idle`` since a time (``Ping.state_at``) after the ack's
        (``Ack.at``, both the sidecar's clock) completes it too: that turn has ended (an ack
        replayed after a router restart arrives after the sidecar's re-registration)."""
        since = self.router.table.clock() if since is None else since
        quiet = 0
        with anyio.move_on_after(max(0.0, self._deadline(t) - time.time())):
            while True:
                with anyio.move_on_after(TICK_S):
                    await t.turn_end.wait()
                if t.turn_end.is_set():
                    self._finish(t, "done", detail="the runtime reported its turn complete")
                    return
                peer = self.router.table.peers.get(t.rec.slot or "")
                if (peer is not None and peer.state == "idle" and t.acked_at is not None
                        and peer.state_at is not None and peer.state_at > t.acked_at):
                    self._finish(t, "done", detail="the slot reported idle since a time after it took the "
                                                   "task's message: its turn ended")
                    return
                if peer is None or peer.registered_at < since:
                    quiet = 0
                    continue  # the sidecar that saw the prompt taken will report its turn-end
                if peer.state == "idle":
                    self._finish(t, "done", detail="the slot's sidecar re-registered reporting idle: the turn "
                                                   "ended while it or the router was away")
                    return
                quiet = quiet + 1 if await self._pane_idle(t.rec.slot or "") else 0
                if quiet >= 2:
                    self._finish(t, "done", detail="pane fallback: the slot's sidecar restarted during the turn; "
                                                   "its pane shows the prompt and no busy indicator")
                    return
        self._finish(t, "timed-out", code="turn-timeout",
                     detail=f"no turn-complete from {t.rec.slot} within {t.rec.options.get('timeout_s'):g} s "
                            "of its assignment (the runtime may still be working on it)")

    async def _pane_idle(self, name: str) -> bool:
        """The pane of ``name`` shows its prompt and no busy indicator (False for runtimes
        without a busy indicator: their screen cannot tell)."""
        adapter = get_adapter(self.fleet.slots[name].runtime)
        if adapter.busy is None:
            return False
        try:
            screen = await self.router.transport.screen(name)
        except Exception:
            return False
        return not screen.dead and not verify.is_busy(adapter, screen) and verify.typed_text(adapter, screen) is not None

    def started_clock(self) -> float:
        """The router's start on the liveness table's clock (a sidecar registered since then
        reports a state observed by this router)."""
        return self.router.table.clock() - (time.monotonic() - self.started)

    # -- what the router hears -------------------------------------------------------------------

    def on_state(self, slot: str, state: str) -> None:
        """A slot's heartbeat state changed (``PING``): idle slots are ranked by when they
        became idle."""
        if state == "idle":
            self.idle_since[slot] = time.monotonic()
        self.wake()

    def on_ack(self, slot: str, ack: P.Ack) -> None:
        """An ack from ``slot``'s sidecar (before the message path handles it; also one replayed
        after a router restart): marks the task whose message it acknowledges, so the slot's next
        ``turn-end``, or its report of ``idle`` since a time after the ack's, completes it."""
        if ack.stage != "accepted":
            return
        d = self.router.inflight.get(ack.id)
        rec = d.rec if d is not None else None
        if rec is None and self.holding.get(slot):
            rec = self.router.journal.get(ack.id)
        key = rec.idempotency_key if rec is not None else None
        for tid in self.holding.get(slot, ()):
            t = self.tasks.get(tid)
            if t is not None and key is not None and key == t.key:
                t.acked = True
                t.acked_at = ack.at

    def on_turn_end(self, slot: str) -> None:
        """``slot`` reported a turn complete: the oldest acknowledged task it holds is done."""
        for tid in self.holding.get(slot, ()):
            t = self.tasks.get(tid)
            if t is not None and t.acked and not t.turn_end.is_set():
                t.turn_end.set()
                return

    def on_slot_event(self, slot: str, event: str, data: dict[str, Any]) -> None:
        """A supervisor slot event (``Supervisor.event_listeners``): when the runtime exited, was
        stopped or restarted, or its tmux server died, every task the slot holds fails with the
        reason. A (re)started slot needs no reset."""
        if event == "started":
            self.needs_reset.pop(slot, None)
        if event in DEATH_EVENTS or (event == "started" and data.get("by") == "operator"):
            why = {"exited": "its runtime exited", "stopped": "the slot was stopped",
                   "server-lost": "the slot's tmux server died", "started": "the slot was restarted"}[event]
            parts = []
            if data.get("signal") is not None:
                parts.append(f"killed by signal {data['signal']}")
            elif data.get("status") is not None:
                parts.append(f"exit status {data['status']}")
            lines = data.get("last_lines") or []
            if lines:
                parts.append(f"last line: {lines[-1][:200]!r}")
            detail = why + (f" ({'; '.join(parts)})" if parts else "") + " while it held the task"
            for tid in list(self.holding.get(slot, ())):
                t = self.tasks.get(tid)
                if t is not None:
                    self._finish(t, "failed", code="slot-died", detail=detail)
        self.wake()

    # -- recovery ----------------------------------------------------------------------------------

    def _recover(self) -> None:
        """Resume the journal's open tasks (see the module docstring)."""
        recs = self.router.journal.open_tasks()
        for rec in recs:
            t = self._adopt(rec)
            if rec.state == "published":
                self.pending.append(t)
            elif rec.slot not in self.fleet.slots:  # the slot left the roster
                self._republish(t, detail="resumed after a router restart")
            else:
                self.holding[rec.slot].append(t.id)
                self.router._tg.start_soon(self._run, t, True)
        if recs:
            log.info("resumed %d open task(s)", len(recs))
        self.wake()
