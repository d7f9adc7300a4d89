"""Evidence that a runtime took a typed message: its ack, or its pane (mixed into the router).

:class:`Evidence` holds the waiting half of :class:`fleetbus.router.messages.MessagePath`: after
a message is typed, :meth:`Evidence._verify_by_ack` waits for the runtime's ack (hook runtimes
whose sidecar is connected), :meth:`Evidence._verify_by_pane` reads the pane (pane-diff
fallback), and :meth:`Evidence._final_verdict` decides at the timeout, with at most one extra
submit key (never re-typed text). :class:`_Waiter` is the verification state of one message in
flight. Semantics: DESIGN.md "Verify semantics".
"""

from __future__ import annotations

import time
from typing import Any

import anyio

from fleetbus import protocol as P
from fleetbus.config import Slot
from fleetbus.router import verify
from fleetbus.transports.base import SlotNotFound

#: Pane polling interval of the pane-diff fallback (s); a poll is two control-mode commands (~0.2 ms).
POLL_S = 0.005
#: Seconds after typing at which a hook runtime's input line is checked once for a lost submit key.
DRAFT_CHECK_S = 1.0
#: Pane polling interval (s) for a TUI's queue indicator while the slot is busy.
QUEUE_POLL_S = 0.05
#: Scrollback rows captured when looking for a submitted marker.
HISTORY_ROWS = 300
#: Seconds between checks, while waiting for an ack, that the slot's sidecar is still the same.
SIDECAR_CHECK_S = 0.25


class Evidence:
    """Mixin of :class:`fleetbus.router.messages.MessagePath`: see the module docstring."""

    async def _ack_after_death(self, slot: Slot, w: _Waiter) -> bool:
        """Wait one heartbeat interval plus 0.5 s for an ack that is still on its way after the
        runtime died (a hook that found the sidecar busy spooled it; the sidecar replays its spool
        every beat). True when it came: the runtime did take the message."""
        with anyio.move_on_after(slot.heartbeat_ms / 1000 + 0.5):
            await w.accepted.wait()
        return w.accepted.is_set()

    async def _look(self, slot: Slot, adapter: Any, mk: str, w: _Waiter, history: int = 0) -> str | None:
        """One capture of ``slot``'s pane, classified for marker ``mk``
        (:func:`fleetbus.router.verify.classify`) and kept in ``w.verdict``. None when the
        runtime the message was typed into is gone: the pane vanished (its tmux server died, or
        the slot was killed), its program exited, or another process runs in it (``w.pane_pid``);
        ``w.died`` is set then, and a dead pane's last screen is classified into ``w.dead_verdict``."""
        try:
            scr = await self.transport.screen(slot.name, history=history)
        except SlotNotFound:
            w.died = True
            return None
        verdict = verify.classify(adapter, scr, mk)
        if scr.dead or (w.pane_pid is not None and scr.pid is not None and scr.pid != w.pane_pid):
            w.died = True
            if scr.dead:
                w.dead_verdict = verdict
            return None
        w.verdict = verdict
        return verdict

    async def _death_verdict(self, slot: Slot, adapter: Any, mk: str, w: _Waiter) -> str:
        """What became of ``w``'s message after its runtime died: ``"ack"`` (its ack came, now or
        within one heartbeat plus 0.5 s: a hook runtime may have spooled it), ``"pane"`` (the pane
        last showed it taken), ``"requeue"`` (surely not taken: the slot's sidecar was connected
        and no ack came, or the pane last showed it held in the TUI's queue or its input line), or
        ``"unknown"`` (no evidence either way: a shell may have run it)."""
        if w.accepted.is_set():
            return "ack"
        if w.use_ack or adapter.has_hook:
            if await self._ack_after_death(slot, w):
                return "ack"
            if w.use_ack:
                return "requeue"
        seen = w.dead_verdict if w.dead_verdict not in (None, "pending") else w.verdict
        if seen == "accepted":
            return "pane"
        if seen in ("queued", "draft"):
            return "requeue"
        return "unknown"

    def _sidecar_lost(self, w: _Waiter) -> bool:
        """The sidecar that was registered when ``w``'s message was typed is stale or replaced."""
        peer = self.table.peers.get(w.slot)
        return w.peer is not None and (peer is not w.peer or peer.stale)
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
            verdict = await self._look(slot, adapter, mk, w)
            if verdict is None:  # the pane is gone or dead: so is its runtime
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
            verdict = await self._look(slot, adapter, mk, w, history=HISTORY_ROWS)
            if verdict is None:  # the pane is gone or dead: so is its runtime
                return None
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
                             result: Any) -> P.SendResult | None:
        """After the timeout: a draft gets one extra submit key in all (never re-typed text).
        None when the pane turned out gone or dead (``w.died`` is set then)."""
        msg_id, retries = w.msg_id, w.retries
        draft_detail = (f"the message sits unsubmitted in the input line of {slot.name!r} "
                        f"(one extra {adapter.submit.key} was sent)")
        verdict = await self._look(slot, adapter, mk, w, history=HISTORY_ROWS)
        if verdict is None:  # the runtime died: the caller decides (see MessagePath._verify)
            return None
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
        verdict = await self._look(slot, adapter, mk, w, history=HISTORY_ROWS)
        if verdict is None:
            return None
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
        self.pane_pid: int | None = None  # the pane's process when it was typed
        self.verdict: str | None = None  # the latest pane verdict (verify.classify) of a live pane
        self.dead_verdict: str | None = None  # the verdict of the dead pane's last screen

    def queued_ms(self) -> float | None:
        return None if self.queued_at is None else round((self.queued_at - self.started) * 1000, 3)
