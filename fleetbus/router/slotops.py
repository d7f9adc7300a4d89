"""Operator verbs on one slot's screen: INTERRUPT and RESET, and the input-line reading they share
with the message path.

:class:`SlotOps` is mixed into :class:`fleetbus.router.server.Router`, which owns the state it uses
(``transport``, ``table``, ``paths``, ``session_waiters``, ``publish``).
"""

from __future__ import annotations

import time
from typing import Any

import anyio

from fleetbus.adapters import get_adapter
from fleetbus.config import Slot
from fleetbus.router import verify
from fleetbus.router.messages import DRAFT_CHECK_S
from fleetbus.transports.base import SlotNotFound, TransportError

#: Seconds a pane without a visible prompt is looked at again before ``no-prompt``.
PROMPT_SETTLE_S = 2.0


class RequestError(Exception):
    """A client request that fails with a stable ``code``."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class SlotOps:
    """Mixin: interrupt, reset and input-line reading of :class:`fleetbus.router.server.Router`."""

    async def _read_input(self, slot: Slot, adapter: Any, screen: Any) -> tuple[Any, str | None]:
        """What is typed in the input line of ``screen`` (a capture of ``slot``'s live pane),
        looking again, for up to PROMPT_SETTLE_S, when the input line is not found or not
        empty. tmux 3.3a ignores synchronized output, so a capture can catch a TUI mid-frame with
        the cursor elsewhere (pi 0.73.1 draws a frame, then moves the cursor back to its editor;
        opencode 1.18.33 redraws its sidebar) or blank (opencode right after a first prompt).
        Returns as soon as the input line is empty, or when two readings 0.1 s apart show the
        same text (a human's draft stays), else at the deadline (no prompt: a program runs).
        Returns ``(screen, typed_text)``; typed_text None: no prompt."""
        typed = verify.typed_text(adapter, screen)
        if typed == "":
            return screen, typed
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
        screen, typed = await self._read_input(slot, adapter, screen)
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
