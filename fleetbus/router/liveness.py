"""The router's liveness table: one entry per registered sidecar.

A slot is ``healthy`` while ``now <= last_seen + heartbeat_ms × liveness``, else ``stale``. Any
inbound frame from the sidecar counts as a heartbeat. Time comes from an injectable monotonic
clock (seconds) so tests can simulate freezes without sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import NamedTuple


class Addr(NamedTuple):
    """Where a peer is reached: the router socket it came in on (``via``: ``"ipc"`` for the local
    socket, ``"tcp"`` for remote sidecars) and the ZeroMQ routing id of its DEALER on that socket.
    Replies must go out on the same socket (``Router._send(addr, msg)``)."""

    via: str
    rid: bytes

    def __str__(self) -> str:
        return f"{self.via}:{self.rid[:32]!r}"


@dataclass
class Peer:
    """A registered sidecar.

    Attributes:
        slot: slot name. addr: where it is reached (:class:`Addr` in the router; the table only
        needs a hashable). pid: sidecar pid.
        heartbeat_ms: agreed interval (ms). liveness: intervals of silence before stale.
        last_seen: clock value (s) of the last inbound frame. state: runtime state from hooks.
        stale: True once expired (cleared by the next frame).
        identity: the ZAP User-Id the peer registered with (``key:NAME`` on the tcp socket,
        ``uid:N`` or None on the local one); every later frame must carry the same.
    """

    slot: str
    addr: Hashable
    pid: int
    adapter: str
    heartbeat_ms: int
    liveness: int
    last_seen: float
    registered_at: float
    state: str = "unknown"
    state_at: float | None = None  # Unix s (the sidecar's clock) of the hook event that set ``state``
    session_id: str | None = None
    stale: bool = False
    identity: str | None = None

    @property
    def routing_id(self) -> bytes:
        """The ZeroMQ routing id alone (for logs; send with :attr:`addr`)."""
        return self.addr.rid if isinstance(self.addr, Addr) else self.addr  # type: ignore[return-value]

    @property
    def via(self) -> str:
        """``"ipc"`` or ``"tcp"``: the router socket this peer uses."""
        return self.addr.via if isinstance(self.addr, Addr) else "ipc"

    def expiry(self) -> float:
        return self.last_seen + self.heartbeat_ms * self.liveness / 1000


class LivenessTable:
    """Slot → :class:`Peer`, with expiry sweeps."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.peers: dict[str, Peer] = {}
        self._by_rid: dict[Hashable, str] = {}

    def register(self, slot: str, addr: Hashable, pid: int, adapter: str, heartbeat_ms: int, liveness: int,
                 identity: str | None = None) -> Peer:
        """Add or replace the peer of ``slot`` (a reconnecting sidecar replaces its old entry).
        ``addr``: where the peer is reached (:class:`Addr` in the router); ``identity``: its ZAP
        User-Id."""
        old = self.peers.get(slot)
        if old is not None:
            self._by_rid.pop(old.addr, None)
        other = self._by_rid.pop(addr, None)
        if other is not None and other != slot:
            self.peers.pop(other, None)
        now = self.clock()
        peer = Peer(slot, addr, pid, adapter, heartbeat_ms, liveness, now, now, identity=identity)
        self.peers[slot] = peer
        self._by_rid[addr] = slot
        return peer

    def at(self, addr: Hashable) -> Peer | None:
        """The peer registered at ``addr`` (no heartbeat is recorded), or None."""
        slot = self._by_rid.get(addr)
        return None if slot is None else self.peers.get(slot)

    def seen(self, addr: Hashable) -> Peer | None:
        """Record an inbound frame from ``addr``; None when the peer is unknown."""
        slot = self._by_rid.get(addr)
        if slot is None:
            return None
        peer = self.peers[slot]
        peer.last_seen = self.clock()
        peer.stale = False
        return peer

    def remove(self, addr: Hashable) -> Peer | None:
        slot = self._by_rid.pop(addr, None)
        return self.peers.pop(slot, None) if slot else None

    def sweep(self) -> list[Peer]:
        """Mark expired peers stale; return the ones that became stale in this sweep."""
        now = self.clock()
        newly = []
        for peer in self.peers.values():
            if not peer.stale and now > peer.expiry():
                peer.stale = True
                newly.append(peer)
        return newly

    def next_interval(self, default_ms: int) -> float:
        """Seconds until the next sweep: the shortest heartbeat interval of any peer."""
        ms = min((p.heartbeat_ms for p in self.peers.values()), default=default_ms)
        return min(ms, default_ms) / 1000

    def age(self, slot: str) -> float | None:
        peer = self.peers.get(slot)
        return None if peer is None else max(0.0, self.clock() - peer.last_seen)
