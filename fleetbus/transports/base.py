"""The transport interface, its data types, errors and the registry.

A transport carries text to a slot's input and reads its screen. It knows nothing of routing,
messages or verification: the router decides, the transport types and reads.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import ClassVar, Protocol, runtime_checkable

from fleetbus.adapters.base import SubmitProfile


class TransportError(RuntimeError):
    """A transport operation failed."""


class SlotNotFound(TransportError):
    """The slot has no pane/room on the transport."""


class SlotDead(TransportError):
    """The slot's pane exists but its program has exited."""


@dataclass(frozen=True)
class PaneInfo:
    """What the transport knows about one slot.

    Attributes:
        slot: slot name.
        alive: the pane exists and its program is running.
        pid: pid of the pane's program (the runtime, since it is exec'd), or None.
        command: the pane's current command (tmux ``pane_current_command``), or None.
        exit_status: exit status of a dead pane, or None (killed by a signal, or not known).
        idle_s: seconds since the slot's window last saw output, or None.
        exit_signal: number of the signal that killed a dead pane's program, or None.
        dead_at: when a dead pane's program exited (Unix s, whole seconds on tmux), or None.
    """

    slot: str
    alive: bool
    pid: int | None = None
    command: str | None = None
    exit_status: int | None = None
    idle_s: float | None = None
    exit_signal: int | None = None
    dead_at: float | None = None


@dataclass(frozen=True)
class Screen:
    """One capture of a slot's pane.

    Attributes:
        lines: the visible rows, top to bottom (``height`` strings, trailing blanks trimmed).
        history: rows above the visible area that were captured (oldest first).
        cursor_x, cursor_y: cursor cell (0-based) within the visible rows.
        width, height: pane size in cells.
        dead: the pane's program has exited.
        pid: pid of the pane's program (tmux ``pane_pid``; it stays set on a dead pane), or None.
    """

    lines: list[str]
    history: list[str] = field(default_factory=list)
    cursor_x: int = 0
    cursor_y: int = 0
    width: int = 80
    height: int = 24
    dead: bool = False
    pid: int | None = None

    @property
    def cursor_line(self) -> str:
        return self.lines[self.cursor_y] if 0 <= self.cursor_y < len(self.lines) else ""

    @property
    def text(self) -> str:
        """History and visible rows joined with newlines."""
        return "\n".join(self.history + self.lines)

    def is_blank(self) -> bool:
        return not any(line.strip() for line in self.lines)


@dataclass(frozen=True)
class LaunchSpec:
    """How to start a slot's runtime.

    Attributes:
        slot: slot name. argv: absolute program path and arguments. cwd: working directory.
        env: the runtime's environment additions (including an explicit ``PATH``).
    """

    slot: str
    argv: list[str]
    cwd: str
    env: dict[str, str]


@runtime_checkable
class Transport(Protocol):
    """The required surface of every transport (tmux, memory; matrix next)."""

    kind: ClassVar[str]

    async def ensure_server(self) -> None:
        """Make the transport ready (tmux: the private server and its holder session)."""

    async def start_slot(self, spec: LaunchSpec) -> PaneInfo:
        """Start a slot. Raises :class:`TransportError` if it already exists or cannot start."""

    async def restart_slot(self, spec: LaunchSpec) -> PaneInfo:
        """Replace a slot's program with a fresh one, keeping the slot's session."""

    async def stop_slot(self, slot: str) -> None:
        """Stop a slot and remove it. Raises :class:`SlotNotFound`."""

    async def deliver(self, slot: str, text: str, submit: SubmitProfile | None) -> None:
        """Type ``text`` into the slot's input as one paste, then the submit key (if given)."""

    async def send_keys(self, slot: str, *keys: str) -> None:
        """Send named keys (``Enter``, ``C-u``, ``Escape``) to the slot."""

    async def screen(self, slot: str, *, history: int = 0) -> Screen:
        """Capture the slot's screen with up to ``history`` rows of scrollback.

        Raises:
            SlotNotFound: the slot has no pane.
        """

    async def probe_all(self) -> dict[str, PaneInfo]:
        """Every slot the transport holds, in one round trip (tmux: one ``list-panes -a``)."""

    async def processes(self) -> dict[int, str]:
        """The processes this transport runs, ``{pid: role}`` (tmux: the server and each live
        pane's program, role ``pane <session>``); ``{}`` when it runs none. ``fleet down``
        records them (with their descendants) and ends any that outlive :meth:`shutdown`."""

    async def shutdown(self) -> None:
        """Tear down everything this transport created (tmux: ``kill-server`` on our socket)."""

    async def aclose(self) -> None:
        """Release this object's resources; slots keep running."""


#: kind -> "module:Class" (kombu-style alias table).
TRANSPORTS: dict[str, str] = {
    "tmux": "fleetbus.transports.tmux:TmuxTransport",
    "memory": "fleetbus.transports.memory:MemoryTransport",
}


def resolve_transport(kind: str) -> type:
    """Return the transport class registered for ``kind``.

    Raises:
        KeyError: unknown kind.
    """
    try:
        target = TRANSPORTS[kind]
    except KeyError:
        raise KeyError(f"unknown transport {kind!r}; known: {', '.join(sorted(TRANSPORTS))}") from None
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)
