"""``fleet ps``: join the transport, the process table, heartbeats and the roster.

The transport is asked once for every pane (:meth:`probe_all`), so the number of tmux calls does
not grow with the number of slots. Heartbeats come from the router's liveness table, or, when
the router is down, from the sidecars' heartbeat files.
"""

from __future__ import annotations

import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from fleetbus.adapters import get_adapter
from fleetbus.config import FleetConfig
from fleetbus.paths import FleetPaths
from fleetbus.protocol import SlotStatus
from fleetbus.transports.base import PaneInfo


@dataclass(frozen=True)
class Beat:
    """Heartbeat facts for one slot. ``age_s`` in seconds; ``limit_s`` = interval × liveness."""

    age_s: float
    limit_s: float
    state: str
    sidecar_pid: int | None


def read_heartbeat_file(path: Path, now: float | None = None) -> Beat | None:
    """Parse a sidecar heartbeat file (``ts=``, ``pid=``, ``status=``, ``heartbeat_ms=``, ``liveness=``)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    kv = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    try:
        ts = float(kv["ts"])
        limit = int(kv.get("heartbeat_ms", "1000")) * int(kv.get("liveness", "3")) / 1000
        pid = int(kv["pid"]) if kv.get("pid", "").isdigit() else None
    except (KeyError, ValueError):
        return None
    if not math.isfinite(ts):
        return None
    now = time.time() if now is None else now
    return Beat(age_s=max(0.0, now - ts), limit_s=limit, state=kv.get("status", "unknown"), sidecar_pid=pid)


def beats_from_files(fleet: FleetConfig, paths: FleetPaths) -> dict[str, Beat]:
    """Heartbeats of every slot from the heartbeat files (used when the router is down)."""
    now = time.time()
    out = {}
    for name in fleet.slots:
        beat = read_heartbeat_file(paths.heartbeat_file(name), now)
        if beat is not None:
            out[name] = beat
    return out


class ProcessTable:
    """One snapshot of the process table (a single psutil pass), so ``ps`` reads ``/proc`` once
    whatever the number of slots."""

    def __init__(self) -> None:
        self.procs: dict[int, dict] = {}
        self.children: dict[int, list[int]] = {}
        for p in psutil.process_iter(["pid", "ppid", "name", "memory_info"]):
            info = p.info
            self.procs[info["pid"]] = info
            self.children.setdefault(info["ppid"], []).append(info["pid"])

    def describe(self, pid: int) -> dict | None:
        """``{"name", "rss_mb", "children"}`` of ``pid`` (children counted recursively)."""
        info = self.procs.get(pid)
        if info is None:
            return None
        count, stack = 0, list(self.children.get(pid, ()))
        while stack:
            child = stack.pop()
            count += 1
            stack.extend(self.children.get(child, ()))
        mem = info.get("memory_info")
        return {"name": info.get("name"), "rss_mb": round(mem.rss / 1048576, 1) if mem else None, "children": count}


def expected_commands_ok(fleet: FleetConfig, slot: str, command: str | None) -> bool:
    """True when ``command`` is what the slot should run (adapter patterns or the override's program)."""
    s = fleet.slots[slot]
    if get_adapter(s.runtime).is_expected_command(command):
        return True
    return bool(s.command) and command == os.path.basename(s.command[0])


def collect_status(
    fleet: FleetConfig,
    panes: dict[str, PaneInfo],
    beats: dict[str, Beat],
    *,
    source: str = "router",
    host: str | None = None,
    supervision: dict[str, dict] | None = None,
) -> list[SlotStatus]:
    """Build one :class:`SlotStatus` per roster slot, in roster order.

    Flags: ``DEAD`` (pane absent or its program exited), ``STALE`` (last heartbeat older than
    interval × liveness), ``NO-SIDECAR`` (no sidecar was ever heard from, or its process is gone
    and left no heartbeat), ``DRIFT`` (pane command is not one the adapter expects), and the
    supervision flags ``CRASH-LOOP`` and ``BACKOFF``.

    ``supervision``: slot -> ``{"restart", "restarts", "last_exit", "flags"}``
    (:func:`fleetbus.router.supervisor.watch_status`); without it ``restart`` comes from the
    roster and ``restarts``/``last_exit`` are empty.
    """
    host = host or socket.gethostname()
    table = ProcessTable()
    rows = []
    for name, s in fleet.slots.items():
        pane = panes.get(name)
        beat = beats.get(name)
        flags = []
        if pane is None or not pane.alive:
            flags.append("DEAD")
        elif not expected_commands_ok(fleet, name, pane.command):
            flags.append("DRIFT")
        if beat is None:
            flags.append("NO-SIDECAR")
            hb = "none"
        elif beat.age_s > beat.limit_s:
            flags.append("STALE")
            hb = "stale"
        else:
            hb = "healthy"
        sup = (supervision or {}).get(name) or {"restart": s.restart, "restarts": 0, "last_exit": None, "flags": []}
        flags += sup["flags"]
        exit_status = pane.exit_status if pane else None
        if pane is not None and not pane.alive and exit_status is None and sup["last_exit"]:
            exit_status = sup["last_exit"].get("status")  # tmux did not report it (see supervisor.zombie_exit)
        rows.append(
            SlotStatus(
                tenant_id=fleet.tenant,
                host=host,
                slot=name,
                runtime=s.runtime,
                class_=s.class_,
                pane="absent" if pane is None else ("alive" if pane.alive else "dead"),
                pid=pane.pid if pane else None,
                command=pane.command if pane else None,
                exit_status=exit_status,
                idle_s=round(pane.idle_s, 1) if pane and pane.idle_s is not None else None,
                process=table.describe(pane.pid) if pane and pane.alive and pane.pid else None,
                heartbeat=hb,
                heartbeat_age_s=round(beat.age_s, 2) if beat else None,
                state="dead" if "DEAD" in flags else (beat.state if beat else "unknown"),
                sidecar_pid=beat.sidecar_pid if beat else None,
                flags=flags,
                source=source,
                restart=sup["restart"],
                restarts=sup["restarts"],
                last_exit=sup["last_exit"],
            )
        )
    return rows
