"""Memory transport: simulated panes for fast unit tests of routing and verification.

Each slot is a list of screen rows whose last row is the input line (``prompt + typed text``).
:meth:`deliver` appends the text to the input line; the submit key moves it up into the
history and calls the slot's ``on_submit`` callback (a fake runtime). Never the only proof that
something works: the tmux transport is tested on a real tmux server.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from fleetbus.adapters.base import SubmitProfile
from fleetbus.transports.base import LaunchSpec, PaneInfo, Screen, SlotDead, SlotNotFound


@dataclass
class MemoryPane:
    """A simulated pane. ``submits`` False models a program that ignores the submit key."""

    prompt: str = "$ "
    rows: list[str] = field(default_factory=list)
    typed: str = ""
    alive: bool = True
    submits: bool = True
    on_submit: Callable[[str], None] | None = None
    pid: int = 0
    command: str = "bash"
    exit_status: int | None = 1  # reported while not alive
    exit_signal: int | None = None


class MemoryTransport:
    """In-memory :class:`~fleetbus.transports.base.Transport` (kind ``memory``)."""

    kind: ClassVar[str] = "memory"

    def __init__(self) -> None:
        self.panes: dict[str, MemoryPane] = {}
        self.delivered: list[tuple[str, str]] = []
        self.keys: list[tuple[str, tuple[str, ...]]] = []

    def _pane(self, slot: str) -> MemoryPane:
        try:
            return self.panes[slot]
        except KeyError:
            raise SlotNotFound(f"no pane for slot {slot!r}") from None

    async def ensure_server(self) -> None:
        return None

    async def start_slot(self, spec: LaunchSpec) -> PaneInfo:
        self.panes.setdefault(spec.slot, MemoryPane(pid=len(self.panes) + 1000, command=spec.argv[0]))
        return (await self.probe_all())[spec.slot]

    async def restart_slot(self, spec: LaunchSpec) -> PaneInfo:
        self.panes.pop(spec.slot, None)
        return await self.start_slot(spec)

    async def stop_slot(self, slot: str) -> None:
        self._pane(slot)
        del self.panes[slot]

    async def deliver(self, slot: str, text: str, submit: SubmitProfile | None) -> None:
        pane = self._pane(slot)
        if not pane.alive:
            raise SlotDead(f"slot {slot!r} is dead")
        self.delivered.append((slot, text))
        pane.typed += text
        if submit is not None:
            await self.send_keys(slot, submit.key)

    async def send_keys(self, slot: str, *keys: str) -> None:
        pane = self._pane(slot)
        self.keys.append((slot, keys))
        for key in keys:
            if key == "Enter" and pane.submits:
                line, pane.typed = pane.typed, ""
                pane.rows.append(pane.prompt + line)
                if pane.on_submit:
                    pane.on_submit(line)
            elif key in ("C-u", "C-c"):
                pane.typed = ""

    async def screen(self, slot: str, *, history: int = 0) -> Screen:
        pane = self._pane(slot)
        lines = pane.rows[-23:] + [pane.prompt + pane.typed]
        older = pane.rows[:-23][-history:] if history else []
        return Screen(lines=lines, history=older, cursor_y=len(lines) - 1, width=200, height=len(lines),
                      dead=not pane.alive, pid=pane.pid)

    async def probe_all(self) -> dict[str, PaneInfo]:
        return {s: PaneInfo(slot=s, alive=p.alive, pid=p.pid if p.alive else None,
                            command=p.command if p.alive else None,
                            exit_status=None if p.alive else p.exit_status,
                            exit_signal=None if p.alive else p.exit_signal)
                for s, p in self.panes.items()}

    async def processes(self) -> dict[int, str]:
        """No processes: the panes are simulated (their ``pid`` is made up)."""
        return {}

    async def shutdown(self) -> None:
        self.panes.clear()

    async def aclose(self) -> None:
        return None
