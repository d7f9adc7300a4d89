"""The router's limits: queued messages per slot, send rate per client, journal retention, and
the housekeeping that gives memory back.

Each limit is a roster setting (:class:`fleetbus.config.BusConfig`; README "Limits") with a
stable refusal code, and a refusal journals nothing, so the router never answers ``queued`` for
something it did not journal and a flood of refused requests cannot grow the journal:

- ``queue-full``: a SEND for a slot whose router queue already holds ``bus.max_queued_per_slot``
  messages (:meth:`Limits.queue_full`, called by :meth:`MessagePath.send`);
- ``rate-limited``: a SEND or PUBLISH from a client process over ``bus.send_rate`` messages/s
  (token bucket of ``bus.send_burst``; :class:`SendLimiter`); the detail says after how many
  seconds a retry is admitted;
- ``too-many-tasks``: raised by :meth:`fleetbus.router.tasks.Dispatcher.publish`.

A request whose idempotency key is already journaled is never refused by a limit: it is
answered as the duplicate it is (the client resends unanswered SENDs with the same key).

A client is the local peer's process: its pid, from the ``Peer-Address`` metadata libzmq 4.3.5
attaches to every frame of an ``ipc://`` peer (``localhost:<uid>:<gid>:<pid>``, from
``SO_PEERCRED``), so a script cannot escape its bucket by reconnecting; the routing id when the
address carries no credentials.

:meth:`Limits.run` (a task of the router) prunes the journal at start and every
:data:`PRUNE_EVERY_S` s (``bus.retention_days``), writes the refused-handshake summary of
:class:`fleetbus.router.auth.PeerAuthenticator`, and every :data:`HOUSEKEEPING_S` s calls glibc's
``malloc_trim(0)``: libzmq frees what a burst of connections or a subscriber that never read
made it allocate, but glibc keeps freed heap pages (measured: 25,000 connection churns left a
router at 105 MB RSS; one ``malloc_trim`` brought it back to 49 MB).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import anyio

from fleetbus import protocol as P
from fleetbus.logs import LogBudget
from fleetbus.router.auth import peer_cred

if TYPE_CHECKING:
    from fleetbus.router.server import Router

log = logging.getLogger("fleetbus.router")

#: Seconds between housekeeping passes (refusal summary, ``malloc_trim``).
HOUSEKEEPING_S = 10.0
#: Seconds between journal prunes (the first runs when the router starts).
PRUNE_EVERY_S = 86_400.0
#: Most clients whose send bucket is remembered; full buckets are forgotten first.
MAX_CLIENTS = 4096


class SendLimiter:
    """One token bucket per client: ``rate`` tokens/s, at most ``burst``; a request takes one.

    Args:
        rate: tokens per second (messages/s); 0 disables the limit.
        burst: bucket size (messages a client may send at once after a quiet period).
        clock: monotonic time source (s).
    """

    def __init__(self, rate: float, burst: int, clock=time.monotonic, max_clients: int = MAX_CLIENTS):
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.max_clients = max_clients
        self._buckets: dict[Any, tuple[float, float]] = {}  # client -> (tokens, at)

    def take(self, client: Any) -> float | None:
        """Take a token for ``client``: None when admitted, else the seconds until one is there."""
        if self.rate <= 0:
            return None
        now = self.clock()
        tokens, at = self._buckets.get(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens >= 1:
            if client not in self._buckets and len(self._buckets) >= self.max_clients:
                self._forget(now)
            self._buckets[client] = (tokens - 1, now)
            return None
        self._buckets[client] = (tokens, now)
        return (1 - tokens) / self.rate

    def _forget(self, now: float) -> None:
        """Drop the buckets that are full again (the same as no bucket); if none is, the oldest."""
        full_after = self.burst / self.rate
        for c in [c for c, (_, at) in self._buckets.items() if now - at >= full_after]:
            del self._buckets[c]
        while len(self._buckets) >= self.max_clients:
            self._buckets.pop(next(iter(self._buckets)))


def client_of(frame: Any, rid: bytes) -> Any:
    """The client a frame came from: ``("pid", N)`` from its ``Peer-Address`` metadata (a zmq
    Frame received with ``copy=False``), else ``("rid", routing id)``."""
    try:
        cred = peer_cred(frame.get("Peer-Address"))
    except (AttributeError, TypeError, ValueError, OSError):
        cred = None
    return ("pid", cred[2]) if cred is not None else ("rid", rid)


def _describe(client: Any) -> str:
    kind, value = client
    return f"pid {value}" if kind == "pid" else f"connection {value!r}"


_libc: Any = None


def malloc_trim() -> bool:
    """Give the C heap's free pages back to the system (glibc ``malloc_trim(0)``). False when the
    C library has no such call (musl)."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _libc = False
    if not _libc:
        return False
    _libc.malloc_trim(0)
    return True


class Limits:
    """The limits of one router (see the module docstring). ``refused`` counts refusals per
    code (shown in HEALTH as ``refused``); ``last_prune`` is the latest prune's report."""

    def __init__(self, router: Router):
        self.router = router
        bus = router.fleet.roster.bus
        self.sends = SendLimiter(bus.send_rate, bus.send_burst)
        self.refused: Counter[str] = Counter()
        self.last_prune: dict[str, Any] | None = None
        self._log = LogBudget(window_s=60.0, burst=5)

    # -- refusals --------------------------------------------------------------------------------

    def _note(self, code: str, message: str, *args: Any) -> None:
        self.refused[code] += 1
        if self._log.allow(code):
            log.warning(message + " (%d refused with %s so far; at most 5 such lines a minute)",
                        *args, self.refused[code], code)

    def _refusal(self, req: P.SendRequest, code: str, detail: str, t0: float) -> P.SendResult:
        r = self.router
        return P.SendResult(tenant_id=r.fleet.tenant, host=r.host, slot=req.to, result="rejected", code=code,
                            detail=detail, idempotency_key=req.idempotency_key,
                            latency_ms=round((time.monotonic() - t0) * 1000, 3))

    def _journaled(self, msg: P.SendRequest | P.PublishRequest) -> bool:
        key = msg.idempotency_key
        if not key:
            return False
        j = self.router.journal
        return (j.by_key(key) if isinstance(msg, P.SendRequest) else j.task_by_key(key)) is not None

    def queue_full(self, req: P.SendRequest, t0: float) -> P.SendResult | None:
        """The ``queue-full`` refusal of ``req`` when its slot's queue holds
        ``bus.max_queued_per_slot`` messages (and its key is not journaled), else None."""
        q = self.router.queues.get(req.to)
        limit = self.router.fleet.roster.bus.max_queued_per_slot
        if q is None or len(q.items) < limit or self._journaled(req):
            return None
        self._note("queue-full", "refused a SEND to %s: %d messages wait in its queue (bus.max_queued_per_slot %d)",
                   req.to, len(q.items), limit)
        return self._refusal(req, "queue-full",
                             f"{len(q.items)} messages already wait for slot {req.to!r} (bus.max_queued_per_slot "
                             f"{limit}); nothing was journaled or typed: send it again later", t0)

    def too_many_tasks(self, req: P.PublishRequest, open_now: int, adding: int) -> str | None:
        """Why PUBLISH ``req`` (creating ``adding`` tasks while ``open_now`` are open) is refused
        with ``too-many-tasks`` (``bus.max_open_tasks``), or None (also when its key is journaled)."""
        limit = self.router.fleet.roster.bus.max_open_tasks
        if open_now + adding <= limit or self._journaled(req):
            return None
        self._note("too-many-tasks", "refused a PUBLISH to %s: %d tasks are open (bus.max_open_tasks %d)",
                   req.to, open_now, limit)
        return (f"{open_now} tasks are open and this publish adds {adding} (bus.max_open_tasks {limit}); "
                "nothing was journaled: publish again when some are done")

    async def admit(self, msg: P.SendRequest | P.PublishRequest, client: Any, handler: Any) -> Any:
        """Run ``handler(msg)`` (the router's SEND or PUBLISH handler) unless ``client`` is over
        its send rate: then a SEND is answered ``rejected``/``rate-limited`` and a PUBLISH fails
        with ``RequestError("rate-limited")``; nothing is journaled."""
        retry = self.sends.take(client)
        if retry is None or self._journaled(msg):
            return await handler(msg)
        bus = self.router.fleet.roster.bus
        detail = (f"client {_describe(client)} sends faster than bus.send_rate ({bus.send_rate:g}/s, burst "
                  f"{bus.send_burst}); retry after {retry:.3f} s; nothing was journaled")
        self._note("rate-limited", "refused a %s from client %s: over bus.send_rate", msg.kind, _describe(client))
        if isinstance(msg, P.PublishRequest):
            from fleetbus.router.server import RequestError

            raise RequestError("rate-limited", detail)
        return self._refusal(msg, "rate-limited", detail, time.monotonic()).model_dump()

    # -- housekeeping ----------------------------------------------------------------------------

    def prune(self, older_than_days: float) -> dict[str, Any]:
        """Prune the journal of what finished more than ``older_than_days`` days ago
        (:meth:`fleetbus.router.journal.Journal.prune`); logs and returns its report."""
        report = self.router.journal.prune(time.time() - older_than_days * 86400)
        self.last_prune = report
        if report["messages"] or report["tasks"] or report["slot_events"]:
            log.info("journal pruned (finished more than %g days ago): %d messages, %d tasks, %d slot events; "
                     "%d -> %d bytes", older_than_days, report["messages"], report["tasks"], report["slot_events"],
                     report["bytes_before"], report["bytes_after"])
        return report

    async def run(self) -> None:
        """The router's housekeeping task (see the module docstring). Never raises."""
        days = self.router.fleet.roster.bus.retention_days
        next_prune = time.monotonic()
        while True:
            if days > 0 and time.monotonic() >= next_prune:
                next_prune = time.monotonic() + PRUNE_EVERY_S
                try:
                    await anyio.to_thread.run_sync(self.prune, days)
                except Exception:
                    log.exception("journal prune failed; next try in %g s", PRUNE_EVERY_S)
            auth = self.router.auth
            if auth is not None:
                auth.summary()
            await anyio.to_thread.run_sync(malloc_trim)
            await anyio.sleep(HOUSEKEEPING_S)
