"""Who may talk to the router: local peers by uid, remote sidecars by CURVE key (ZAP).

One ZAP handler (pyzmq's :class:`~zmq.auth.asyncio.AsyncioAuthenticator`, on the router's own
event loop) serves every socket of the router's context; the socket's ZAP domain says which rule
applies:

- :data:`LOCAL_DOMAIN` and :data:`EVENTS_DOMAIN` (the ``ipc://`` ROUTER and PUB sockets, NULL
  mechanism; two names only so the log says which socket was tried): for an ``ipc://``
  connection libzmq 4.3.5 puts the peer's ``SO_PEERCRED`` in the ZAP request's address frame as
  ``<host>:<uid>:<gid>:<pid>`` (``localhost:1000:1000:4242``; see libzmq's
  ``stream_engine_base.cpp`` ``get_peer_address``). Only the router's own uid is accepted. This
  is a second wall behind the 0700 runtime directory and 0600 socket files.
- :data:`TCP_DOMAIN` (the ``bus.tcp`` ROUTER socket, CURVE mechanism): the client's public key
  must be in the allow-list folder (:class:`fleetbus.router.remote.Keyring`, re-read when the
  folder changes, so ``fleet keys revoke`` takes effect for the next connection). The reply's
  User-Id is ``key:NAME``; libzmq attaches it to every frame of that connection, and the router
  checks it against the slots the key is bound to (:mod:`fleetbus.router.remote`).

Anything else (another mechanism, an unknown domain, an address without credentials) is
refused: the handler fails closed. Sockets set ``ZAP_ENFORCE_DOMAIN`` so that a missing handler
also refuses (libzmq 4.3.5 lets NULL connections through when no handler is bound, otherwise).

Refusals are counted (:attr:`PeerAuthenticator.refused_peers`: distinct peers;
:attr:`refused_handshakes`: every refused handshake) and logged once per peer (uid and pid, or
public key), so a peer that reconnects every 100 ms does not flood the log; and at most
:data:`LOG_BURST` refused peers of one kind (one ``reason``: a foreign uid, an unknown or
revoked key, another mechanism) are logged per :data:`LOG_WINDOW_S` s, so a flood of fresh random
keys does not either: the rest are summed up by :meth:`PeerAuthenticator.summary` ("refused K
handshakes from M peers in the last 60 s"), which the router calls every few seconds.

pyzmq's base class answers malformed requests; the NULL/uid and CURVE/key rules are a small
override of ``handle_zap_message``: pyzmq's address allow-list matches whole address strings
(libzmq's ipc address carries the peer's pid), and its CURVE rule names no key in the User-Id.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import zmq
from zmq.auth.asyncio import AsyncioAuthenticator
from zmq.auth.base import VERSION
from zmq.utils import z85

from fleetbus.logs import LogBudget

log = logging.getLogger("fleetbus.auth")

#: ZAP domain of the local (``ipc://``) ROUTER socket: peers are checked by uid.
LOCAL_DOMAIN = "fleetbus-local"
#: ZAP domain of the local (``ipc://``) PUB socket (events): peers are checked by uid.
EVENTS_DOMAIN = "fleetbus-events"
#: ZAP domain of the ``tcp://`` socket: peers are checked by CURVE public key.
TCP_DOMAIN = "fleetbus-tcp"
#: Distinct refused peers remembered for log-once; beyond this the memory is cleared (and a peer
#: may be logged again) so a flood of new peers cannot grow it without bound.
MAX_REMEMBERED = 4096
#: Refused peers of one kind logged one by one per LOG_WINDOW_S seconds; the rest go in a summary.
LOG_BURST = 5
LOG_WINDOW_S = 60.0


def peer_cred(address: str) -> tuple[int, int, int] | None:
    """``(uid, gid, pid)`` from a ZAP address of an ``ipc://`` peer (``host:uid:gid:pid``), or
    None when the address carries no credentials (not a Unix socket, or no ``SO_PEERCRED``)."""
    parts = address.rsplit(":", 3)
    if len(parts) != 4:
        return None
    try:
        return int(parts[1]), int(parts[2]), int(parts[3])
    except ValueError:
        return None


def protect(sock: zmq.Socket, domain: str) -> None:
    """Route ``sock``'s handshakes through ZAP ``domain`` and refuse them when no handler answers."""
    sock.setsockopt(zmq.ZAP_DOMAIN, domain.encode())
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)


class PeerAuthenticator(AsyncioAuthenticator):
    """The router's ZAP handler (see the module docstring).

    Args:
        context: the router's context (the handler binds ``inproc://zeromq.zap.01`` in it).
        allow_uids: uids accepted on :data:`LOCAL_DOMAIN` (the router's own).
        keyring: the allow-list of client keys for :data:`TCP_DOMAIN`
            (:class:`fleetbus.router.remote.Keyring`), or None when there is no tcp endpoint.
        key_names: returns ``{z85 public key: name}`` of revoked keys, to name them in the log.

    Start with :meth:`start` inside the running event loop, before binding any protected socket;
    :meth:`stop` before terminating the context.
    """

    def __init__(self, context: zmq.Context, allow_uids: Iterable[int], keyring: Any = None,
                 key_names: Callable[[], dict[bytes, str]] | None = None):
        super().__init__(context, log=logging.getLogger("fleetbus.auth.zap"))
        # pyzmq's own per-handshake lines (a missing allow-list folder is logged at every handshake)
        self.log.addFilter(_BudgetFilter(LogBudget(LOG_WINDOW_S, LOG_BURST)))
        self.allow_uids = frozenset(allow_uids)
        self.keyring = keyring
        self.key_names = key_names
        self.refused_handshakes = 0
        self._refused: set[str] = set()
        self._refused_total = 0
        self._log_budget = LogBudget(LOG_WINDOW_S, LOG_BURST)
        self._window_start = time.monotonic()
        self._window_handshakes = 0
        self._window_peers: set[str] = set()
        self._window_unlogged = 0

    @property
    def refused_peers(self) -> int:
        """Distinct peers refused since start (a uid+pid, or a CURVE key)."""
        return self._refused_total

    def _refuse(self, request_id: bytes, peer: str, why: str, reason: bytes) -> None:
        self.refused_handshakes += 1
        self._window_handshakes += 1
        if len(self._window_peers) < MAX_REMEMBERED:
            self._window_peers.add(peer)
        if peer not in self._refused:
            if len(self._refused) >= MAX_REMEMBERED:
                self._refused.clear()
            self._refused.add(peer)
            self._refused_total += 1
            if self._log_budget.allow(reason):  # at most LOG_BURST peers of this kind a window
                log.warning("refused %s: %s", peer, why)
            else:
                self._window_unlogged += 1
        self._send_zap_reply(request_id, b"400", reason)
        if time.monotonic() - self._window_start >= LOG_WINDOW_S:
            self.summary()

    def summary(self) -> None:
        """When the current window (LOG_WINDOW_S s) has ended: log one line summing up its
        refusals if some refused peers were not logged one by one, and start a new window."""
        now = time.monotonic()
        if now - self._window_start < LOG_WINDOW_S:
            return
        if self._window_unlogged:
            peers = len(self._window_peers)
            log.warning("refused %d handshake(s) from %s peer(s) in the last %.0f s (%d peer(s) not logged one "
                        "by one; the HEALTH answer's refused_handshakes counts them all)", self._window_handshakes,
                        f"{peers}+" if peers >= MAX_REMEMBERED else peers, now - self._window_start,
                        self._window_unlogged)
        self._window_start, self._window_handshakes, self._window_unlogged = now, 0, 0
        self._window_peers = set()

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        """Answer one ZAP request: ``[version, request_id, domain, address, identity, mechanism,
        *credentials]``. Never raises (an exception would stop pyzmq's handler loop and leave
        every later handshake unanswered)."""
        try:
            await self._handle(msg)
        except Exception:
            log.exception("ZAP handler failed; refusing the handshake")
            if len(msg) >= 2:
                self.refused_handshakes += 1
                self._send_zap_reply(msg[1], b"500", b"internal error")

    async def _handle(self, msg: list[bytes]) -> None:
        if len(msg) < 6 or msg[0] != VERSION:
            await super().handle_zap_message(msg)  # pyzmq answers malformed requests with 400
            return
        request_id, domain, address, mechanism = msg[1], msg[2].decode("utf-8", "replace"), \
            msg[3].decode("utf-8", "replace"), msg[5]
        if domain in (LOCAL_DOMAIN, EVENTS_DOMAIN):
            cred = peer_cred(address)
            if mechanism != b"NULL" or cred is None:
                self._refuse(request_id, f"local peer {address!r} on {domain}",
                             f"no peer credentials or mechanism {mechanism.decode(errors='replace')}", b"NO ACCESS")
            elif cred[0] not in self.allow_uids:
                self._refuse(request_id, f"local peer uid {cred[0]} (gid {cred[1]}, pid {cred[2]}) on {domain}",
                             f"uid {cred[0]} is not the router's (allowed: "
                             f"{', '.join(map(str, sorted(self.allow_uids)))})", b"uid not allowed")
            else:
                self._send_zap_reply(request_id, b"200", b"OK", f"uid:{cred[0]}")
            return
        if domain == TCP_DOMAIN and mechanism == b"CURVE" and self.keyring is not None and len(msg) == 7:
            # the allow-list as it is now (re-read when its folder changed): a revoked key is refused
            key = msg[6]
            binding = self.keyring.binding(z85.encode(key)) if len(key) == 32 else None
            if binding is None:
                self._refuse_key(request_id, address, key)
                return
            self._send_zap_reply(request_id, b"200", b"OK", f"key:{binding.name}")
            return
        self._refuse(request_id, f"peer {address!r} on domain {domain!r}",
                     f"mechanism {mechanism.decode(errors='replace')} is not accepted there", b"NO ACCESS")

    def _refuse_key(self, request_id: bytes, address: str, key: bytes) -> None:
        z = z85.encode(key)
        name = (self.key_names() if self.key_names else {}).get(z)
        why = f"key of {name!r} was revoked" if name else "key is not on the allow-list (`fleet keys list`)"
        self._refuse(request_id, f"tcp peer {address} with CURVE key {z.decode()}", why, b"Unknown key")


def local_authenticator(context: zmq.Context, keyring: Any = None,
                        key_names: Callable[[], dict[bytes, str]] | None = None) -> PeerAuthenticator:
    """A :class:`PeerAuthenticator` that accepts this process's own uid on the local sockets and
    the keys of ``keyring`` (:class:`fleetbus.router.remote.Keyring`) on the tcp socket."""
    return PeerAuthenticator(context, [os.getuid()], keyring, key_names)


class _BudgetFilter(logging.Filter):
    """Lets through at most the budget's lines per log call site (logger and message template)."""

    def __init__(self, budget: LogBudget):
        super().__init__()
        self.budget = budget

    def filter(self, record: logging.LogRecord) -> bool:
        return self.budget.allow((record.name, record.msg))
