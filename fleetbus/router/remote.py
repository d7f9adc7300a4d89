"""Remote peers of the router's ``tcp://`` endpoint: CURVE keys bound to slots.

A client key is created for named slots (``fleet keys create NAME --slots a,b``; the binding is
the ``slots`` metadata line of its certificate in the allow-list folder, :mod:`fleetbus.keys`).
The ZAP handler (:mod:`fleetbus.router.auth`) accepts a known key and names it in the
connection's ZAP User-Id as ``key:NAME``; libzmq then attaches that User-Id to every frame that
connection delivers, and the router reads it from each frame (``zmq.Frame.get("User-Id")``).
With it, :class:`RemotePeers` decides:

- a HELLO for a slot the key is not bound to is refused (``DISCONNECT`` with the reason);
- a HELLO never replaces a live (not stale) local sidecar of the slot, nor a live remote one
  that registered with another key;
- every later frame (PING, ACK, HOOK, BYE) must carry the User-Id its peer registered with,
  and that key must still be allowed for the slot, else the frame is refused;
- a revoked key (``fleet keys revoke``: its certificate leaves the allow-list) loses its live
  connections at once: the router removes its peers and drops every tcp connection by binding
  a fresh tcp socket (other remote sidecars reconnect and register again; their acks of the last
  two minutes are replayed, see :mod:`fleetbus.agents.sidecar`).

Refusals are counted and logged once per (key, slot, reason).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import anyio
import zmq
import zmq.asyncio

from fleetbus.keys import Binding, allowed_bindings
from fleetbus.router.auth import TCP_DOMAIN, protect

log = logging.getLogger("fleetbus.router")

#: Seconds after which the allow-list is read again even when its folder's mtime did not change.
RELOAD_S = 2.0
#: Seconds a fresh tcp socket keeps trying to bind the endpoint the dropped one held.
TCP_REBIND_S = 5.0
#: Distinct refusals remembered for log-once; beyond this the memory is cleared.
MAX_REMEMBERED = 1024


def key_name(identity: str | None) -> str | None:
    """The key name in a ZAP User-Id ``key:NAME`` (None for any other identity)."""
    return identity[4:] if identity and identity.startswith("key:") else None


class Keyring:
    """The allow-list folder's bindings (Z85 public key → :class:`fleetbus.keys.Binding`), read
    again when the folder changes (its mtime in ns or inode) or RELOAD_S s have passed.

    Args:
        folder: the allow-list folder, or None (no tcp endpoint: nothing is allowed).
    """

    def __init__(self, folder: Path | None):
        self.folder = folder
        self._stamp: tuple[int, int] | None = None
        self._loaded_at = 0.0
        self.by_key: dict[bytes, Binding] = {}
        self.by_name: dict[str, Binding] = {}

    def refresh(self) -> bool:
        """Re-read the folder if it changed; True when the bindings changed."""
        if self.folder is None:
            return False
        try:
            st = os.stat(self.folder)
            stamp = (st.st_mtime_ns, st.st_ino)
        except OSError:
            stamp = (0, 0)
        now = time.monotonic()
        if stamp == self._stamp and now - self._loaded_at < RELOAD_S:
            return False
        self._stamp, self._loaded_at = stamp, now
        by_key = allowed_bindings(self.folder)
        changed = by_key != self.by_key
        self.by_key = by_key
        self.by_name = {b.name: b for b in by_key.values()}
        return changed

    def binding(self, z85_public: bytes) -> Binding | None:
        """The binding of an allowed key (read fresh: called once per CURVE handshake)."""
        self.refresh()
        return self.by_key.get(z85_public)


class RemotePeers:
    """The router's rules for peers of its tcp socket (see the module docstring).

    Args:
        keyring: the allow-list (shared with the ZAP handler).
    """

    def __init__(self, keyring: Keyring):
        self.keyring = keyring
        self.refused = 0
        self._logged: set[tuple[str, str, str]] = set()

    def _refuse(self, key: str | None, slot: str, why: str) -> str:
        self.refused += 1
        mark = (key or "?", slot, why)
        if mark not in self._logged:
            if len(self._logged) >= MAX_REMEMBERED:
                self._logged.clear()
            self._logged.add(mark)
            log.warning("refused tcp peer with key %r for slot %r: %s", key, slot, why)
        return why

    def hello_refusal(self, identity: str | None, slot: str, current: Any) -> str | None:
        """Why a tcp HELLO for ``slot`` from ``identity`` (ZAP User-Id) is refused, or None.

        ``current``: the slot's registered peer (a :class:`fleetbus.router.liveness.Peer`) or None."""
        self.keyring.refresh()
        name = key_name(identity)
        b = self.keyring.by_name.get(name) if name else None
        if b is None:
            return self._refuse(name, slot, "the key is not on the allow-list (revoked?)")
        if slot not in b.slots:
            bound = ", ".join(sorted(b.slots)) or "no slot"
            return self._refuse(name, slot, f"key {name!r} may serve {bound} only, not slot {slot!r}")
        if current is not None and not current.stale:
            if current.via != "tcp":
                return self._refuse(name, slot, f"slot {slot!r} is served by a live local sidecar (pid {current.pid})")
            if current.identity != identity:
                return self._refuse(name, slot, f"slot {slot!r} is served by a live remote sidecar with key "
                                                f"{key_name(current.identity)!r}")
        return None

    def frame_refusal(self, identity: str | None, peer: Any) -> str | None:
        """Why a frame from the registered tcp ``peer`` carrying ``identity`` is refused, or None
        (a frame from an unknown peer is the caller's to answer)."""
        if peer is None:
            return None
        if identity != peer.identity:
            return self._refuse(key_name(identity), peer.slot, f"the frame's key {key_name(identity)!r} is not the "
                                                               f"key {key_name(peer.identity)!r} the sidecar registered with")
        return self.unbound(peer)

    def unbound(self, peer: Any) -> str | None:
        """Why ``peer``'s key may no longer serve its slot (revoked or rebound), or None."""
        self.keyring.refresh()
        name = key_name(peer.identity)
        b = self.keyring.by_name.get(name) if name else None
        if b is None:
            return self._refuse(name, peer.slot, f"key {name!r} was revoked")
        if peer.slot not in b.slots:
            return self._refuse(name, peer.slot, f"key {name!r} is no longer bound to slot {peer.slot!r}")
        return None

    def revoked_peers(self, peers: Iterable[Any]) -> list[Any]:
        """The tcp peers among ``peers`` whose key may no longer serve their slot."""
        return [p for p in peers if p.via == "tcp" and self.unbound(p) is not None]


class TcpEndpoint:
    """Mixin of :class:`fleetbus.router.server.Router`: its ``bus.tcp`` socket, which it binds,
    reads (``_read_socket``), drops and binds again, and the KEYS request. Uses the router's
    ``fleet``, ``paths``, ``table``, ``remote``, ``tcp_sock``, ``_tcp_scope``, ``publish`` and
    ``_router_socket``."""

    def _tcp_socket(self) -> zmq.asyncio.Socket:
        """A bound CURVE ROUTER socket on ``bus.tcp``. No ``ROUTER_HANDOVER`` here: a peer can never
        take over another connection's routing id (remote sidecars let the router pick theirs).

        Raises:
            zmq.ZMQError: the endpoint cannot be bound. fleetbus.keys.KeysError: bad router key.
        """
        from fleetbus import keys

        tcp = self.fleet.roster.bus.tcp
        sock = self._router_socket()
        try:
            sock.setsockopt(zmq.ROUTER_HANDOVER, 0)
            public, secret = keys.router_keypair(self.paths)
            sock.setsockopt(zmq.CURVE_SERVER, 1)
            sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
            sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
            sock.setsockopt(zmq.IPV6, 1 if tcp.startswith("tcp://[") else 0)
            protect(sock, TCP_DOMAIN)
            sock.bind(tcp)
        except BaseException:
            sock.close(linger=0)
            raise
        return sock

    async def _serve_tcp(self) -> None:
        """The tcp socket's reader. :meth:`drop_tcp` cancels it: the socket is closed, which drops
        every tcp connection, and a fresh one is bound on the same endpoint (remote sidecars
        reconnect and register again)."""
        while True:
            with anyio.CancelScope() as self._tcp_scope:
                await self._read_socket("tcp", self.tcp_sock)
            old, self.tcp_sock = self.tcp_sock, None
            if old is not None:
                old.close(linger=0)
            deadline = time.monotonic() + TCP_REBIND_S
            while self.tcp_sock is None:
                try:
                    self.tcp_sock = self._tcp_socket()
                except zmq.ZMQError as e:  # the old listener may take a moment to let go of the port
                    if time.monotonic() > deadline:
                        log.error("cannot listen on bus.tcp again after dropping its connections: %s", e)
                        return
                    await anyio.sleep(0.05)
            log.info("tcp connections dropped; listening again on %s", self.fleet.roster.bus.tcp)

    def drop_tcp(self, why: str) -> None:
        """Drop every connection of the tcp socket now (see :meth:`_serve_tcp`)."""
        if self._tcp_scope is not None and not self._tcp_scope.cancel_called:
            log.warning("dropping every tcp connection: %s", why)
            self._tcp_scope.cancel()

    def _drop_revoked(self) -> list[dict[str, Any]]:
        """Remove the tcp peers whose key was revoked or unbound from their slot and drop their
        connections. Returns ``[{"slot", "key"}]`` of the peers removed."""
        gone = self.remote.revoked_peers(list(self.table.peers.values()))
        for peer in gone:
            self.table.remove(peer.addr)
            self.publish("heartbeat", peer.slot, state="gone", reason="key revoked")
        if gone:
            self.drop_tcp(f"key(s) {', '.join(sorted({str(p.identity) for p in gone}))} revoked")
        return [{"slot": p.slot, "key": (p.identity or "")[4:]} for p in gone]

    async def handle_keys(self) -> dict[str, Any]:
        """KEYS: read the allow-list again now and drop the live connections of keys that may no
        longer serve their slot (``fleet keys revoke`` asks this). Returns ``{"dropped": [{"slot",
        "key"}], "keys": number of allowed keys}``."""
        self.remote.keyring.refresh()
        return {"dropped": self._drop_revoked(), "keys": len(self.remote.keyring.by_key)}
