"""The router while its journal cannot be written (disk full, I/O error, read-only file system).

fleetbus answers ``queued`` or ``accepted`` only for what its journal holds, so a journal that
cannot be written changes what the router does (:class:`JournalGuard`, mixed into
:class:`fleetbus.router.messages.MessagePath`; the journal side is
:class:`fleetbus.router.journal.Journal`):

- a new SEND is answered ``rejected``, code ``journal-unavailable``, ``journaled: false``, and
  nothing is typed (a PUBLISH fails with the same code); an invalid SEND keeps its own code;
- a message journaled ``queued`` before the failure is not typed while its write-ahead
  ``typing`` state cannot be written: it stays ``queued`` (its client is told so once, code
  ``journal-unavailable``, unless it waits for acceptance) and is typed in its turn afterwards;
- a message being typed or verified when the journal failed is finished as usual: its client
  gets the true result with ``journaled: false``, and the result is kept in memory and written
  as soon as the journal can be written (a router stopped before then recovers the message from
  its last journaled state, as after a crash, and never types it twice);
- every :data:`PROBE_S` s the router tries to write what it kept (and a ``journal`` change
  recording the outage): the first write that succeeds ends the outage; ``fleet ps`` and
  ``fleet doctor`` show it meanwhile, and an event (topic ``journal``) marks each change.

The task dispatcher, the supervisor and the reader never end on a failed write: what they journal
is deferred the same way, and a failure that repeats is logged once per :data:`LOG_EVERY_S` s
(:class:`RateLimitedLog`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import anyio

from fleetbus import protocol as P
from fleetbus.router.delivery import SlotQueue
from fleetbus.router.journal import JournalUnavailable

log = logging.getLogger("fleetbus.router")

#: Seconds between tries to write to a journal that could not be written.
PROBE_S = 1.0
#: Seconds during which a repeated failure (same key) is counted instead of logged again.
LOG_EVERY_S = 60.0


class RateLimitedLog:
    """Log a failure that may repeat (every frame, every pass) at most once per ``every_s`` s
    per key; the next line says how many were not logged in between."""

    def __init__(self, logger: logging.Logger, every_s: float = LOG_EVERY_S, clock=time.monotonic):
        self.logger, self.every_s, self.clock = logger, every_s, clock
        self._last: dict[str, tuple[float, int]] = {}  # key -> (logged at, repeats since)

    def exception(self, key: str, msg: str, *args: Any) -> bool:
        """``logger.exception(msg, *args)`` unless ``key`` was logged less than ``every_s`` s ago
        (then counted). Call it from an ``except`` block. Returns True when it logged."""
        now = self.clock()
        at, skipped = self._last.get(key, (None, 0))
        if at is not None and now - at < self.every_s:
            self._last[key] = (at, skipped + 1)
            return False
        if len(self._last) > 1000:  # bounded: forget the oldest keys
            for k in sorted(self._last, key=lambda k: self._last[k][0])[:500]:
                del self._last[k]
        self._last[key] = (now, 0)
        suffix = f" ({skipped} more like it in the last {now - at:.0f} s were not logged)" if skipped else ""
        self.logger.exception(msg + suffix, *args)
        return True


class JournalGuard:
    """Mixin of :class:`fleetbus.router.messages.MessagePath`: see the module docstring. Uses the
    router's ``journal``, ``queues``, ``tasks``, ``publish``, ``fleet`` and ``host``."""

    _failures: RateLimitedLog | None = None

    @property
    def failures(self) -> RateLimitedLog:
        """Rate-limited log of failures in handlers and workers (one per key per minute)."""
        if self._failures is None:
            self._failures = RateLimitedLog(log)
        return self._failures

    def journal_health(self) -> dict[str, Any]:
        """:meth:`fleetbus.router.journal.Journal.health` of the router's journal."""
        return self.journal.health()

    async def _journal_watch(self) -> None:
        """While the journal cannot be written, try every PROBE_S s (:meth:`Journal.probe`);
        publish each change (topic ``journal``) and wake the slot queues and the dispatcher
        when it can be written again."""
        was_ok = True
        while True:
            await anyio.sleep(PROBE_S)
            j = self.journal
            ok = j.writable or j.probe()
            if ok != was_ok:
                self.publish("journal", None, **j.health())
                if ok:
                    for q in list(self.queues.values()):
                        q.wake()
                    tasks = getattr(self, "tasks", None)
                    if tasks is not None:
                        tasks.wake()
            was_ok = ok

    def _not_journaled(self, req: P.SendRequest, t0: float, problem: tuple[str, str] | None,
                       err: JournalUnavailable) -> P.SendResult:
        """The answer to a SEND whose message could not be journaled: ``rejected``, nothing typed,
        ``journaled: false``; the code is the SEND's own problem when it had one, else
        ``journal-unavailable``."""
        code, detail = problem or (err.code, f"{err}: nothing was journaled or typed; free disk space on {err.fs}, "
                                             "then send it again (`fleet ps` shows when the journal is back)")
        return P.SendResult(tenant_id=self.fleet.tenant, host=self.host, slot=req.to, result="rejected", code=code,
                            detail=detail, idempotency_key=req.idempotency_key, journaled=False,
                            latency_ms=round((time.monotonic() - t0) * 1000, 3))

    def _held_for_journal(self, q: SlotQueue) -> None:
        """The journal cannot be written, so nothing in ``q`` is typed now: tell the clients of its
        ``queued`` messages once (those waiting for acceptance keep waiting)."""
        f = self.journal.failure or {}
        for d in q.items:
            if d.rec.state == "queued" and d.answer is None and d.req.wait != "accepted":
                d.reply(self._result(d, "queued", held_by="fleetbus", code=JournalUnavailable.code,
                                     detail=f"journaled; the journal cannot be written now ({f.get('error')}, file "
                                            f"system {f.get('fs')}), so nothing is typed until it can; then it "
                                            "is typed in its turn"))
