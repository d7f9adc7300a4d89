"""Slot supervision: restart policy, exponential backoff, crash-loop limit, exit diagnostics.

The router runs one :class:`Supervisor` task. About every :data:`POLL_S` seconds it asks the
transport for every pane in one call (``probe_all``; tmux: one ``list-panes -a``) and the
process table for every sidecar (in a worker thread), then acts:

- **dead pane** (tmux ``remain-on-exit`` keeps it) or a slot session that vanished without an
  operator ``stop``: the exit diagnostics (status, signal, duration since the last ``started``
  event, last :data:`LAST_LINES` non-blank lines of the dead pane) are journaled as ``exited``
  (when tmux 3.3a reports neither status nor signal, the unreaped child's wait status is read
  from ``/proc``: :func:`zombie_exit`) and handed to :attr:`Supervisor.exit_listeners`.
  The slot's ``restart`` policy decides (:func:`wants_restart`); a restart waits its backoff
  (``restarting``, flag ``BACKOFF``) and is journaled as ``started`` (``by: router``). More than
  ``crash_loop_restarts`` restarts within ``crash_loop_window_s`` -> ``crash-loop`` (flag
  ``CRASH-LOOP``): no more restarts until an operator ``fleet start``/``restart``.
- **tmux server gone** (no pane and ``server_alive()`` False): ``server-lost`` for every slot,
  the holder is recreated (``ensure_server``; the first time at once, then with backoff) and
  every slot whose policy restarts it is started again (``started``, then ``server-restored``
  with ``restarted: true|false``). Operator-stopped slots and ``restart: no`` stay down.
- **sidecar gone**: respawned (``sidecar-restarted``): the first time at once, the n-th time
  within a minute after ``min(0.5 s × 2^(n-2), 30 s)``, so a sidecar that cannot start never spins.

Every event is journaled (``Journal.slot_event``), published (topic ``slot``) and handed to
:attr:`Supervisor.event_listeners`.

Units: names ending in ``_s`` are seconds, in ``_ms`` milliseconds. Backoff and the crash-loop
window run on a monotonic clock (injectable for tests); every journaled or shown time (``at``) is
Unix time in seconds.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import psutil

from fleetbus.config import BusConfig, FleetConfig, Slot
from fleetbus.router import procs
from fleetbus.router.journal_guard import RateLimitedLog
from fleetbus.transports.base import PaneInfo, SlotNotFound, TransportError

log = logging.getLogger("fleetbus.supervisor")

#: Seconds between two looks at the fleet.
POLL_S = 1.0
#: Non-blank lines of a dead pane's screen kept in its exit diagnostics.
LAST_LINES = 20
#: Rows of scrollback read from a dead pane to find them.
SCROLLBACK = 200
#: Looks (0.1 s apart) at a dead pane whose exit status, signal and time are not known yet.
STATUS_WAIT_TRIES = 10
#: Slot lifecycle events that start or end one life of a slot's program (journal ``changes``).
LIFECYCLE = ("started", "exited", "restarting", "crash-loop", "stopped", "server-lost", "restart-failed")
#: tmux's own remain-on-exit line ("Pane is dead (status 3, <date>)"): not the program's output.
_TMUX_DEAD_LINE = re.compile(r"^Pane is dead( \(.*\))?$")


@dataclass(frozen=True)
class Rules:
    """Backoff and crash-loop limit of one kind of restart.

    Attributes:
        backoff_ms: delay of the first restart within the window (ms).
        backoff_max_ms: the longest delay (ms).
        crash_loop_restarts: restarts allowed within the window; None: never stop.
        window_s: the crash-loop window (s).
    """

    backoff_ms: int = 1000
    backoff_max_ms: int = 60_000
    crash_loop_restarts: int | None = 5
    window_s: float = 300.0

    @classmethod
    def from_bus(cls, bus: BusConfig) -> Rules:
        return cls(bus.restart_backoff_ms, bus.restart_backoff_max_ms, bus.crash_loop_restarts,
                   bus.crash_loop_window_s)

    def delay_s(self, n: int) -> float:
        """Delay (s) of the ``n``-th restart (1-based) within the window:
        ``min(backoff_ms × 2^(n-1), backoff_max_ms) / 1000``."""
        return min(self.backoff_ms * 2 ** max(0, n - 1), self.backoff_max_ms) / 1000


#: Sidecar respawns (the first at once): 0.5 s doubling to 30 s within a minute, never given up.
SIDECAR_RULES = Rules(backoff_ms=500, backoff_max_ms=30_000, crash_loop_restarts=None, window_s=60.0)


def wants_restart(policy: str, status: int | None) -> bool:
    """Whether ``policy`` restarts a program that exited with ``status``.

    ``always``: yes. ``no``: never. ``on-failure``: unless it exited with status 0; a ``None``
    status (killed by a signal, or a session that vanished) is a failure.
    """
    if policy == "always":
        return True
    if policy == "no":
        return False
    return status != 0


class Restarts:
    """Restart history of one slot (or sidecar, or the tmux server) on a monotonic clock.

    Args:
        rules: backoff and crash-loop limit.
        clock: monotonic seconds (``time.monotonic``; tests inject their own).
        immediate_first: the first restart within the window waits 0 s; the n-th (n ≥ 2) waits
            ``rules.delay_s(n - 1)`` (used for the tmux server).
    """

    def __init__(self, rules: Rules, clock: Callable[[], float] = time.monotonic, immediate_first: bool = False):
        self.rules = rules
        self.clock = clock
        self.immediate_first = immediate_first
        self.times: list[float] = []  # clock times of the restarts within the window
        self.due: float | None = None  # clock time at which the planned restart is due
        self.crash_loop = False

    def count(self) -> int:
        """Restarts within the window (older ones are forgotten)."""
        horizon = self.clock() - self.rules.window_s
        self.times = [t for t in self.times if t > horizon]
        return len(self.times)

    def plan(self) -> float | None:
        """Plan the next restart. Returns its delay (s), or None when it would be more than
        ``crash_loop_restarts`` within the window (``crash_loop`` is set then, nothing planned)."""
        n = self.count() + 1
        limit = self.rules.crash_loop_restarts
        if limit is not None and n > limit:
            self.crash_loop, self.due = True, None
            return None
        delay = 0.0 if self.immediate_first and n == 1 else self.rules.delay_s(n - 1 if self.immediate_first else n)
        self.due = self.clock() + delay
        return delay

    def is_due(self) -> bool:
        return self.due is not None and self.clock() >= self.due

    def done(self) -> int:
        """Record a restart now; returns the number within the window."""
        self.due = None
        self.times.append(self.clock())
        return self.count()

    def clear(self) -> None:
        """Forget the history and the crash-loop (an operator started the slot)."""
        self.times, self.due, self.crash_loop = [], None, False


def last_lines(rows: list[str], n: int = LAST_LINES) -> list[str]:
    """The last ``n`` non-blank rows (trailing spaces stripped), without tmux's "Pane is dead" line."""
    out = [r.rstrip() for r in rows if r.strip() and not _TMUX_DEAD_LINE.match(r.strip())]
    return out[-n:]


@dataclass
class SlotWatch:
    """What the supervisor knows about one slot.

    ``phase``: ``up`` (running, or not looked at yet), ``exited`` (exit journaled, no decision
    yet), ``backoff`` (a restart is planned), ``down`` (stays down: policy, clean exit or
    crash-loop), ``stopped`` (operator ``stop``). ``epoch`` grows with every operator action, so
    a probe taken before one is not acted on.
    """

    restarts: Restarts
    sidecar: Restarts
    phase: str = "up"
    epoch: int = 0
    pid: int | None = None
    started_at: float | None = None  # Unix s of the last ``started`` event
    last_exit: dict[str, Any] | None = None
    sidecar_spawned: int | None = None
    lock: anyio.Lock = field(default_factory=anyio.Lock)


def load_watch(journal: Any, slot: str, rules: Rules, clock: Callable[[], float] = time.monotonic) -> SlotWatch:
    """Rebuild a slot's :class:`SlotWatch` from its journaled slot events (router start,
    ``fleet ps`` while the router is down): the last exit, operator stop, crash-loop, and the
    router's restarts within the crash-loop window."""
    w = SlotWatch(Restarts(rules, clock), Restarts(SIDECAR_RULES, clock, immediate_first=True))
    if journal is None:
        return w
    events = journal.slot_events(slot, limit=500)
    now_unix, now = time.time(), clock()
    for ev in events:
        name, data = ev["state"], ev["data"]
        if name == "started" and data.get("by") == "router" and data.get("reason") == "restart" \
                and now_unix - ev["at"] < rules.window_s:
            w.restarts.times.append(now - (now_unix - ev["at"]))
        if name == "started":
            w.started_at = ev["at"]
        if name in ("exited", "server-lost") and "status" in data:
            w.last_exit = {k: data.get(k) for k in ("status", "signal", "at", "duration_s", "last_lines", "reason")}
    last = next((ev for ev in reversed(events) if ev["state"] in LIFECYCLE), None)
    if last is not None:
        name = last["state"]
        if name == "stopped" and last["data"].get("by", "operator") == "operator":
            w.phase = "stopped"
        elif name == "crash-loop":
            w.phase, w.restarts.crash_loop = "down", True
        elif name in ("exited", "restarting", "server-lost", "restart-failed"):
            w.phase = "exited"
    return w


class Supervisor:
    """The router's supervision task (see the module docstring).

    Args:
        router: the :class:`~fleetbus.router.server.Router` (its fleet, paths, transport,
            ``journal``, ``publish`` and ``spawn_sidecars``).
        journal: the journal to use instead of ``router.journal`` (tests).
        clock: monotonic seconds for backoff and the window (tests inject their own).
        poll_s: seconds between two looks at the fleet.
    """

    def __init__(self, router: Any, *, journal: Any = None, clock: Callable[[], float] = time.monotonic,
                 poll_s: float = POLL_S):
        self.router = router
        self._journal = journal
        self.clock = clock
        self.poll_s = poll_s
        self.rules = Rules.from_bus(router.fleet.roster.bus)
        # the tmux server is never given up on: the whole fleet needs it
        self.server = Restarts(Rules(self.rules.backoff_ms, self.rules.backoff_max_ms, None, self.rules.window_s),
                               clock, immediate_first=True)
        self.server_down = False
        self.slots: dict[str, SlotWatch] = {name: load_watch(None, name, self.rules, clock)
                                            for name in router.fleet.slots}
        self.loaded = False
        self.failures = RateLimitedLog(log)  # a failure that repeats every pass is logged once a minute
        #: called as ``listener(slot, diagnostics)`` when a slot's program is found gone (after its
        #: ``exited`` or ``server-lost`` event is journaled, before any restart): the message path
        #: uses it for messages the dead program held but never took
        self.exit_listeners: list[Callable[[str, dict[str, Any]], None]] = []
        #: called as ``listener(slot, event, data)`` after every slot event is journaled and
        #: published: the task dispatcher fails the task a dead, stopped or restarted slot held
        self.event_listeners: list[Callable[[str, str, dict[str, Any]], None]] = []

    @property
    def journal(self) -> Any:
        return self._journal if self._journal is not None else getattr(self.router, "journal", None)

    @property
    def fleet(self) -> FleetConfig:
        return self.router.fleet

    def load(self) -> None:
        """Read every slot's state from the journal (once, when the router starts the fleet or
        the supervisor first runs; later calls do nothing)."""
        if not self.loaded:
            self.slots = {name: load_watch(self.journal, name, self.rules, self.clock) for name in self.fleet.slots}
            self.loaded = True

    # -- events ------------------------------------------------------------------------------------

    def _event(self, slot: str, event: str, **data: Any) -> None:
        """Journal a slot event and publish it (topic ``slot``)."""
        if self.journal is not None:
            try:  # a journal that cannot be written keeps it in memory until it can
                self.journal.slot_event(slot, event, defer=True, **data)
            except Exception as e:  # never stops supervision
                self.failures.exception(f"journal:{type(e).__name__}", "cannot journal %s of %s", event, slot)
        self.router.publish("slot", slot, event=event, **data)
        log.info("slot %s: %s %s", slot, event, {k: v for k, v in data.items() if k != "last_lines"})
        for listener in self.event_listeners:
            try:
                listener(slot, event, data)
            except Exception:
                log.exception("slot event listener failed for %s %s", event, slot)

    def _exited(self, slot: str, diag: dict[str, Any]) -> None:
        for listener in self.exit_listeners:
            try:
                listener(slot, diag)
            except Exception:
                log.exception("exit listener failed for %s", slot)

    # -- operator and router hooks (called under ``lock(slot)``) -----------------------------------

    def lock(self, slot: str) -> anyio.Lock:
        """The lock an operator action on ``slot`` holds, so the supervisor never acts between."""
        return self.slots[slot].lock

    def is_stopped(self, slot: str) -> bool:
        """The operator stopped ``slot`` (and has not started it since)."""
        return self.slots[slot].phase == "stopped"

    def started(self, slot: str, pid: int | None, *, by: str, reason: str, **data: Any) -> None:
        """Record that ``slot``'s program was (re)started; an operator start clears the crash-loop."""
        w = self.slots[slot]
        if by == "operator":
            w.restarts.clear()
            w.epoch += 1
        w.phase, w.pid, w.started_at = "up", pid, time.time()
        self._event(slot, "started", pid=pid, by=by, reason=reason, **data)

    def stopped(self, slot: str) -> None:
        """Record an operator stop: the slot stays down (also across router restarts)."""
        w = self.slots[slot]
        w.epoch += 1
        w.phase, w.pid, w.restarts.due = "stopped", None, None
        self._event(slot, "stopped", by="operator")

    def sidecar_spawned(self, slot: str, pid: int) -> None:
        """A sidecar was just spawned for ``slot`` (it may take a moment to write its pid file)."""
        self.slots[slot].sidecar_spawned = pid

    # -- status ------------------------------------------------------------------------------------

    def status(self, slot: str) -> dict[str, Any]:
        """``{"restart", "restarts", "last_exit", "flags"}`` of ``slot`` for ``fleet ps``:
        ``restarts`` = router restarts within the crash-loop window; ``last_exit`` = ``{status,
        signal, at (Unix s), duration_s, last_lines, reason}`` or None; flags ``CRASH-LOOP``,
        ``BACKOFF``."""
        return watch_status(self.fleet.slots[slot], self.slots[slot])

    # -- the loop ----------------------------------------------------------------------------------

    async def run(self) -> None:
        """Look at the fleet every ``poll_s`` s until cancelled; a failed look is logged, never fatal."""
        self.load()
        while True:
            try:
                await self.tick()
            except Exception as e:
                self.failures.exception(f"pass:{type(e).__name__}", "supervisor pass failed")
            await anyio.sleep(self._next_sleep_s())

    def _next_sleep_s(self) -> float:
        """``poll_s``, or less when a planned restart is due sooner (so a 0.2 s backoff is 0.2 s)."""
        dues = [r.due for w in self.slots.values() for r in (w.restarts, w.sidecar) if r.due is not None]
        if self.server.due is not None:
            dues.append(self.server.due)
        if not dues:
            return self.poll_s
        return min(self.poll_s, max(0.01, min(dues) - self.clock()))

    async def tick(self) -> None:
        """One look at the fleet and the actions it calls for."""
        epochs = {name: w.epoch for name, w in self.slots.items()}
        panes = await self.router.transport.probe_all()
        if not panes and not await self._server_alive():
            await self._server_lost()
            return
        if self.server_down:
            await self._server_restored(panes)
            return
        for name, slot in self.fleet.slots.items():
            w = self.slots[name]
            async with w.lock:
                if w.epoch == epochs[name]:
                    await self._check_slot(slot, w, panes.get(name))
        await self._check_sidecars()

    async def _server_alive(self) -> bool:
        alive = getattr(self.router.transport, "server_alive", None)
        return True if alive is None else await alive()

    async def _check_slot(self, slot: Slot, w: SlotWatch, pane: PaneInfo | None) -> None:
        if pane is not None and pane.alive:
            if w.phase != "up":  # started by someone else (an operator outside the router)
                w.restarts.due = None
            w.phase, w.pid = "up", pane.pid
            return
        if w.phase in ("stopped", "down"):
            return
        if w.phase == "up":
            diag = await self._diagnose(slot.name, pane, w)
            if diag is None:
                return
            w.last_exit, w.phase = diag, "exited"
            self._event(slot.name, "exited", pid=w.pid, policy=slot.restart, **diag)
            w.pid = None
            self._exited(slot.name, diag)
        if w.phase == "exited":
            self._decide(slot, w)
        if w.phase == "backoff" and w.restarts.is_due():
            await self._restart(slot, w, pane)

    def _decide(self, slot: Slot, w: SlotWatch) -> None:
        """After an exit: plan a restart, or stay down (policy, clean exit, crash-loop)."""
        status = (w.last_exit or {}).get("status")
        if w.restarts.crash_loop:
            w.phase = "down"
            return
        if not wants_restart(slot.restart, status):
            w.phase = "down"
            return
        n = w.restarts.count() + 1
        delay = w.restarts.plan()
        if delay is None:
            w.phase = "down"
            self._event(slot.name, "crash-loop", restarts=n - 1, window_s=self.rules.window_s,
                        limit=self.rules.crash_loop_restarts)
            return
        w.phase = "backoff"
        self._event(slot.name, "restarting", backoff_s=delay, restarts=n, policy=slot.restart)

    async def _restart(self, slot: Slot, w: SlotWatch, pane: PaneInfo | None) -> None:
        from fleetbus.router.server import launch_spec

        n = w.restarts.done()
        try:
            spec = launch_spec(self.fleet, self.router.paths, slot)
            tr = self.router.transport
            info = await (tr.restart_slot(spec) if pane is not None else tr.start_slot(spec))
        except (SlotNotFound, TransportError) as e:
            w.phase = "exited"
            self._event(slot.name, "restart-failed", error=str(e), restarts=n)
            return
        self.started(slot.name, info.pid, by="router", reason="restart", restarts=n)

    async def _diagnose(self, slot: str, pane: PaneInfo | None, w: SlotWatch) -> dict[str, Any] | None:
        """Exit diagnostics of a dead (or vanished) pane: ``{status, signal, at, duration_s,
        last_lines, reason}``; ``at`` (Unix s) is the latest exit time consistent with tmux's
        ``pane_dead_time`` (whole seconds) and the time of detection.
        None when the pane turns out to be alive again."""
        now = time.time()
        if pane is None:
            return {"status": None, "signal": None, "at": now, "reason": "session-gone", "last_lines": [],
                    "duration_s": round(now - w.started_at, 3) if w.started_at else None}
        # tmux marks a pane dead when its pty closes, before it has reaped the child: status,
        # signal and time are empty then, for a moment or (tmux 3.3a, about one kill -9 in three
        # in this project's tests) for good, the child left a zombie; its wait status is then
        # read from /proc. Otherwise look again, 0.1 s apart.
        status, sig = pane.exit_status, pane.exit_signal
        for _ in range(STATUS_WAIT_TRIES):
            if pane.alive or (pane.exit_status, pane.exit_signal, pane.dead_at) != (None, None, None):
                status, sig = pane.exit_status, pane.exit_signal
                break
            zombie = zombie_exit(w.pid)
            if zombie is not None:
                status, sig = zombie
                break
            await anyio.sleep(0.1)
            pane = (await self.router.transport.probe_all()).get(slot) or pane
        if pane.alive:  # restarted by someone else meanwhile
            return None
        now = time.time()
        rows: list[str] = []
        try:
            scr = await self.router.transport.screen(slot, history=SCROLLBACK)
            rows = scr.history + scr.lines
        except TransportError:
            pass
        # tmux gives whole seconds: the exit was in [dead_at, dead_at + 1) and before now
        at = min(now, pane.dead_at + 1) if pane.dead_at else now
        return {"status": status, "signal": sig, "at": at,
                "duration_s": round(at - w.started_at, 3) if w.started_at else None,
                "last_lines": last_lines(rows),
                "reason": f"signal {sig}" if sig else f"exit status {status}" if status is not None
                else "exit not reported"}

    # -- tmux server -------------------------------------------------------------------------------

    async def _server_lost(self) -> None:
        if not self.server_down:
            self.server_down = True
            now = time.time()
            for name, w in self.slots.items():
                if w.phase == "stopped":
                    continue
                diag = {"status": None, "signal": None, "at": now, "last_lines": [], "reason": "tmux server gone",
                        "duration_s": round(now - w.started_at, 3) if w.started_at and w.phase == "up" else None}
                was_up = w.phase == "up"
                if was_up:
                    w.last_exit = diag
                self._event(name, "server-lost", pid=w.pid, **diag)
                w.pid = None
                if was_up:
                    self._exited(name, diag)
            self.server.plan()
        if self.server.is_due():
            self.server.done()
            try:
                await self.router.transport.ensure_server()
            except TransportError as e:
                log.error("cannot recreate the tmux server: %s", e)
                self.server.plan()
                return
            await self._server_restored({})

    async def _server_restored(self, panes: dict[str, PaneInfo]) -> None:
        """Start every slot whose policy restarts it (the others stay down)."""
        from fleetbus.router.server import launch_spec

        self.server_down = False
        for name, slot in self.fleet.slots.items():
            w = self.slots[name]
            async with w.lock:
                if w.phase == "stopped" or name in panes:
                    continue
                # a slot that was staying down (policy, clean exit, crash-loop) stays down
                restart = slot.restart != "no" and w.phase != "down"
                pid = None
                if restart:
                    try:
                        info = await self.router.transport.start_slot(launch_spec(self.fleet, self.router.paths, slot))
                        pid = info.pid
                        self.started(name, pid, by="router", reason="server-restored")
                    except TransportError as e:
                        w.phase = "exited"
                        self._event(name, "restart-failed", error=str(e))
                        continue
                else:
                    w.phase = "down"
                self._event(name, "server-restored", restarted=restart, pid=pid)

    # -- sidecars ----------------------------------------------------------------------------------

    async def _check_sidecars(self) -> None:
        if not self.router.spawn_sidecars:
            return
        names = [n for n, w in self.slots.items() if w.phase != "stopped"]
        paths = self.router.paths
        pids = await anyio.to_thread.run_sync(
            lambda: {n: procs.sidecar_pid(paths, n) or _running(self.slots[n].sidecar_spawned) for n in names})
        for n in names:
            w = self.slots[n]
            if pids[n]:
                if pids[n] != w.sidecar_spawned:
                    w.sidecar_spawned = None
                continue
            if w.sidecar.due is None:
                w.sidecar.plan()
            if w.sidecar.is_due():
                restarts = w.sidecar.done()
                pid = procs.spawn_sidecar(self.fleet, paths, n)
                w.sidecar_spawned = pid
                self._event(n, "sidecar-restarted", pid=pid, restarts=restarts)


def zombie_exit(pid: int | None) -> tuple[int | None, int | None] | None:
    """``(exit_status, signal)`` of ``pid`` if it is a zombie (exited, not yet reaped by its
    parent), from the ``exit_code`` field of ``/proc/<pid>/stat`` (Linux ≥ 3.5); else None."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if not fields or fields[0] != b"Z" or len(fields) < 50 or not fields[-1].isdigit():
        return None
    code = int(fields[-1])  # a wait status: signal in the low 7 bits, else exit status << 8
    return (None, code & 0x7F) if code & 0x7F else (code >> 8, None)


def _running(pid: int | None) -> int | None:
    """``pid`` if that process runs (not a zombie), else None."""
    if pid is None:
        return None
    try:
        return pid if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE else None
    except psutil.Error:
        return None


def watch_status(slot: Slot, w: SlotWatch | None) -> dict[str, Any]:
    """The ``fleet ps`` supervision fields of one slot (see :meth:`Supervisor.status`)."""
    if w is None:
        return {"restart": slot.restart, "restarts": 0, "last_exit": None, "flags": []}
    flags = []
    if w.restarts.crash_loop:
        flags.append("CRASH-LOOP")
    if w.phase == "backoff":
        flags.append("BACKOFF")
    return {"restart": slot.restart, "restarts": w.restarts.count(), "last_exit": w.last_exit, "flags": flags}


def status_from_journal(fleet: FleetConfig, journal: Any) -> dict[str, dict[str, Any]]:
    """Supervision fields of every slot from the journal alone (``fleet ps`` with the router down;
    ``BACKOFF`` is then never shown: nobody is waiting to restart)."""
    rules = Rules.from_bus(fleet.roster.bus)
    out = {}
    for name, slot in fleet.slots.items():
        w = load_watch(journal, name, rules)
        if w.phase == "backoff":
            w.phase = "exited"
        out[name] = watch_status(slot, w)
    return out
