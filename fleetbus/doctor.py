"""``fleet doctor``: check the environment and the fleet's invariants, each problem with its fix.

Every check is a :class:`Check` with a status:

- ``fail``: a broken invariant (the ``_holder`` session gone while the server runs, a target that
  is not exact, a restart that disturbs another slot, a slot's program or workdir missing, a
  running hooked slot without its hook wiring, a router that does not answer, a journal that
  cannot be written). ``fleet doctor`` then exits 1.
- ``warn``: works, but something an operator should fix (units not enabled, linger off, stale
  units, a stale socket file, no router).
- ``ok`` and ``skip`` (not applicable here, e.g. no systemd).

Nothing here changes the fleet: the exact-target and restart-isolation checks run on a
throwaway tmux server of their own socket, with ``sleep`` in its panes, which they kill after.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
from dataclasses import asdict, dataclass
from typing import Literal

import anyio

from fleetbus import systemd
from fleetbus.adapters import HOOK_COMMAND, get_adapter
from fleetbus.config import FleetConfig
from fleetbus.paths import FleetPaths
from fleetbus.router import procs
from fleetbus.transports.base import LaunchSpec, SlotNotFound, TransportError
from fleetbus.transports.tmux import HOLDER, TmuxTransport

Status = Literal["ok", "warn", "fail", "skip"]
#: fleetbus is tested on tmux 3.3a; it reads ``pane_dead_signal``/``pane_dead_time``, which
#: tmux 3.3 added
MIN_TMUX = (3, 3)


@dataclass
class Check:
    """One finding: ``name``, ``status``, what was seen (``detail``) and the ``fix`` (or None)."""

    name: str
    status: Status
    detail: str
    fix: str | None = None


def _tmux_version(tmux: str) -> tuple[str, tuple[int, int] | None]:
    out = subprocess.run([tmux, "-V"], capture_output=True, text=True, timeout=10).stdout.strip()
    m = re.search(r"(\d+)\.(\d+)", out)
    return out, (int(m.group(1)), int(m.group(2))) if m else None


def check_tmux() -> Check:
    tmux = shutil.which("tmux")
    if tmux is None:
        return Check("tmux", "fail", "tmux is not on PATH", "install it: apt-get install tmux (scripts/bootstrap does)")
    text, ver = _tmux_version(tmux)
    if ver is None or ver < MIN_TMUX:
        return Check("tmux", "fail", f"{text or 'unknown version'} at {tmux}; fleetbus needs tmux >= 3.3 "
                     "(pane_dead_signal, pane_dead_time)", "install tmux 3.3 or newer")
    note = ("; it sanitises pasted escape sequences itself" if ver >= (3, 7)
            else "; fleetbus neutralises escape sequences in bodies itself (tmux < 3.7 does not)")
    return Check("tmux", "ok", f"{text} at {tmux}{note}")


def _cgroup(pid: int) -> str | None:
    """The cgroup v2 path of ``pid`` (``0::/...`` line), or None when not known."""
    try:
        for line in open(f"/proc/{pid}/cgroup"):
            if line.startswith("0::"):
                return line[3:].strip() or None
    except OSError:
        pass
    return None


async def _server(t: TmuxTransport, paths: FleetPaths, boot: systemd.BootState) -> list[Check]:
    sock = t.socket_path()
    pid = await t.server_pid()
    router = procs.router_pid(paths)
    out: list[Check] = []
    if pid is None:
        if os.path.exists(sock):
            out.append(Check("tmux-server", "warn", f"socket file {sock} exists but no server answers on it "
                             "(a crashed server's leftover)", "fleet down (removes it), then fleet up"))
        elif router is not None:
            out.append(Check("tmux-server", "fail", f"the router (pid {router}) runs but no tmux server answers on "
                             f"{sock}", "fleet up (the router's supervisor restarts slots; see fleet log)"))
        else:
            out.append(Check("tmux-server", "ok", f"no server on {sock}: the fleet is down"))
        out.append(Check("holder", "skip", "no tmux server"))
        return out
    sessions = t.run_sync("list-sessions", "-F", "#{session_name}", check=False).split()
    cg = _cgroup(pid)
    holder_unit = systemd.unit_names(paths)[0]
    detail = f"server pid {pid} answers on {sock} ({len(sessions)} session(s)); cgroup {cg or 'unknown'}"
    if boot.installed and cg not in (None, "/") and holder_unit not in cg:
        out.append(Check("tmux-server", "warn", detail + f"; it was started outside {holder_unit}, so it ends "
                         "with that login session or service", "at a quiet moment: fleet down && fleet up "
                         "(restarts the agents under the holder unit)"))
    else:
        out.append(Check("tmux-server", "ok", detail))
    if HOLDER in sessions:
        out.append(Check("holder", "ok", f"session {HOLDER} holds the server: stopping every slot never ends it"))
    else:
        fix = (f"systemctl --user restart {holder_unit}" if boot.installed else "fleet up") + \
            " (recreates the session; slots keep running)"
        out.append(Check("holder", "fail", f"session {HOLDER} is gone: the tmux server exits when its last slot "
                         "stops, and the router's control-mode client cannot attach (every tmux command forks "
                         "a client)", fix))
    return out


async def _scratch() -> list[Check]:
    """Exact targets and restart isolation, proved on a throwaway server with ``sleep`` panes."""
    t = TmuxTransport(f"fleetbus-doctor-{os.getpid()}-{secrets.token_hex(3)}", width=80, height=24)
    sleep = shutil.which("sleep") or "/bin/sleep"

    def spec(name: str) -> LaunchSpec:
        return LaunchSpec(slot=name, argv=[sleep, "600"], cwd="/", env={"PATH": "/usr/bin:/bin"})

    try:
        for n in ("dr", "dr2"):
            await t.start_slot(spec(n))
        before = await t.probe_all()
        server = await t.server_pid()
        # tmux resolves a bare `-t d` to session "dr" by prefix; `=d` must match nothing
        prefix_hit = (await anyio.run_process([*t.base, "has-session", "-t", "d"], check=False)).returncode == 0
        try:
            await t.stop_slot("d")
            exact = Check("exact-targets", "fail", "`kill-session -t =d` ended a session whose name only starts "
                          "with d", "report this with `tmux -V`: fleetbus relies on exact `=name` targets")
        except SlotNotFound:
            after = await t.probe_all()
            ok = all(after.get(n) and after[n].alive for n in ("dr", "dr2"))
            exact = Check("exact-targets", "ok" if ok else "fail",
                          "`=name` targets are exact: `=d` reached neither dr nor dr2"
                          + (" (a bare `-t d` would have reached dr by prefix)" if prefix_hit else ""),
                          None if ok else "report this with `tmux -V`")
        await t.restart_slot(spec("dr"))
        mid = await t.probe_all()
        await t.stop_slot("dr")
        after = await t.probe_all()
        problems = []
        if await t.server_pid() != server:
            problems.append("the tmux server changed")
        if not await t.server_alive():
            problems.append(f"the {HOLDER} session is gone")
        if mid.get("dr") is None or mid["dr"].pid == before["dr"].pid:
            problems.append("the restarted slot kept its old process")
        if after.get("dr2") is None or after["dr2"].pid != before["dr2"].pid:
            problems.append("the other slot's process changed")
        isolation = Check("restart-isolation", "fail" if problems else "ok",
                          "; ".join(problems) if problems else
                          "restarting then stopping one slot left the tmux server, its holder and the other "
                          "slot's process as they were", "report this with `tmux -V`" if problems else None)
        return [exact, isolation]
    except TransportError as e:
        return [Check("exact-targets", "fail", f"the throwaway tmux server failed: {e}", "fix tmux first"),
                Check("restart-isolation", "skip", "throwaway tmux server failed")]
    finally:
        with anyio.CancelScope(shield=True):
            await t.shutdown()


def _router(fleet: FleetConfig, paths: FleetPaths) -> tuple[Check, dict | None]:
    """The ``router`` check, and the router's HEALTH answer (None when it does not answer)."""
    from fleetbus.client import RouterUnavailable, SyncClient

    pid = procs.router_pid(paths)
    if pid is None:
        return Check("router", "warn", "not running: nothing supervises the slots or delivers messages", "fleet up"), None
    unit = systemd.unit_names(paths)[1]
    by = f"systemd ({unit})" if unit in (_cgroup(pid) or "") else "fleetbus (started by `fleet up` or by hand)"
    try:
        h = SyncClient(fleet, paths, connect_timeout_s=3.0).health()
    except RouterUnavailable as e:
        return Check("router", "fail", f"pid {pid} runs but does not answer: {e}",
                     f"see {paths.router_log}; then restart it: kill {pid} && fleet up (slots keep running)"), None
    return Check("router", "ok", f"pid {pid}, up {h.get('uptime_s', 0):.0f} s, supervised by {by}"), h


#: Free bytes under which ``journal`` fails while the router is down (a SEND journals ~1 KiB
#: plus its body; SQLite's WAL grows in 4 KiB pages).
MIN_FREE_BYTES = 1024 * 1024


def _journal(paths: FleetPaths, health: dict | None) -> Check:
    """``journal``: the router's own view when it answers (``Journal.health``), else the free
    space on the journal's file system."""
    from fleetbus.fsinfo import free_bytes, human_bytes, mount_point

    j = (health or {}).get("journal")
    if j is not None:
        fs, free = j.get("fs"), human_bytes(j.get("free_bytes"))
        if not j.get("ok", True):
            kept = f"; {j['deferred']} change(s) kept in memory until it can" if j.get("deferred") else ""
            return Check("journal", "fail", f"{j.get('path')} cannot be written: {j.get('error')} (file system {fs}, "
                         f"{free} free); new sends and publishes are refused (journal-unavailable){kept}",
                         f"free disk space on {fs} (the router resumes by itself within a second)")
        return Check("journal", "ok", f"{j.get('path')} is written by the router; {free} free on {fs}")
    fs, free = mount_point(paths.journal), free_bytes(paths.journal)
    if free is not None and free < MIN_FREE_BYTES:
        return Check("journal", "fail", f"{human_bytes(free)} free on {fs}, which holds {paths.journal}: the router "
                     "could not journal messages (sends would be refused journal-unavailable)",
                     f"free disk space on {fs}")
    return Check("journal", "ok", f"{paths.journal}: {human_bytes(free)} free on {fs} (the router is not running)")


def _slot(fleet: FleetConfig, paths: FleetPaths, name: str, alive: bool) -> Check:
    slot = fleet.slots[name]
    adapter = get_adapter(slot.runtime)
    argv0, _, exe = slot.program(systemd.service_path())
    fails, warns, seen = [], [], []
    if exe is None:
        fails.append(f"{argv0!r} not found on the router's PATH")
    else:
        seen.append(f"{slot.runtime} at {exe}")
    if not os.path.isdir(slot.workdir):
        fails.append(f"workdir {slot.workdir} does not exist")
    fix = None
    if not adapter.has_hook:
        seen.append("no runtime hook (send --verify reads the pane)")
    elif adapter.hook_setup is None:
        seen.append("hook built in")
    else:
        wiring = adapter.hook_setup(HOOK_COMMAND)
        d = paths.slot_dir(name)
        missing = [f for f in wiring.files if not (d / f).is_file()]
        stale = [f for f in wiring.files if f not in missing and (d / f).read_text() != wiring.files[f]]
        if not wiring.files:
            seen.append("hooks passed on its command line")
        elif missing and alive:
            fails.append(f"it runs without its hook wiring ({', '.join(missing)} missing in {d})")
            fix = f"fleet restart {name} (writes the wiring and starts the runtime with it)"
        elif missing:
            seen.append("hook wiring is written when the slot starts")
        elif stale:
            warns.append(f"hook wiring {', '.join(stale)} differs from this fleetbus's (another interpreter "
                         "or version wrote it)")
            fix = f"fleet restart {name} (rewrites it)"
        else:
            seen.append(f"hooks installed ({', '.join(wiring.files)} in {d})")
    if fails and fix is None:
        fix = "install the runtime or fix the roster (command, env.PATH, workdir), then fleet start " + name
    status: Status = "fail" if fails else "warn" if warns else "ok"
    return Check(f"slot {name}", status, "; ".join(fails + warns + seen), fix)


def _systemd(fleet: FleetConfig, paths: FleetPaths, boot: systemd.BootState, runner: systemd.Runner) -> list[Check]:
    reachable, why = systemd.manager_reachable(runner)
    holder, router = systemd.unit_names(paths)
    if not boot.installed:
        if reachable:
            c = Check("systemd", "warn", f"{why}, but this fleet has no units: it will not come back after a "
                      "reboot", "fleet install-systemd")
        else:
            c = Check("systemd", "skip", f"{why}: fleetbus supervises slots itself; to survive a reboot run "
                      "`fleet up` from your init (a container's restart policy, an @reboot cron job)")
    else:
        states = ", ".join(f"{u} {s}" for u, s in boot.units.items())
        problems = [f"{u} is {s}" for u, s in boot.units.items() if s != "enabled"]
        if boot.stale:
            problems.append(f"{', '.join(boot.stale)} differ from what install-systemd writes now (another "
                            "interpreter, roster path or environment: the units and this shell may not find the "
                            "same router)")
        if not reachable:
            problems.append(why)
        c = Check("systemd", "warn" if problems else "ok", "; ".join(problems) if problems else states,
                  "fleet install-systemd (rewrites and enables the units)" if problems else None)
    if not boot.installed and not reachable:
        linger = Check("linger", "skip", "no systemd units")
    elif boot.linger:
        linger = Check("linger", "ok", f"on for {boot.user}: user units start at boot and outlive logouts")
    else:
        linger = Check("linger", "warn", f"off for {boot.user}: user units stop at logout and do not start at boot",
                       ("" if os.getuid() == 0 else "sudo ") + f"loginctl enable-linger {boot.user}")
    return [c, linger]


def run_checks(fleet: FleetConfig, paths: FleetPaths, runner: systemd.Runner = systemd.run) -> list[Check]:
    """Every check, in a fixed order: tmux, tmux-server, holder, exact-targets,
    restart-isolation, router, journal, one ``slot <name>`` per slot, systemd, linger."""
    checks = [check_tmux()]
    boot = systemd.boot_state(fleet, paths)
    if checks[0].status == "fail":
        checks += [Check(n, "skip", "no usable tmux") for n in ("tmux-server", "holder", "exact-targets",
                                                              "restart-isolation")]
        panes: dict = {}
    else:
        async def both():
            t = TmuxTransport(paths.tmux_socket)
            return await _server(t, paths, boot), await _scratch(), await t.probe_all()

        server, scratch, panes = anyio.run(both, backend="asyncio")
        checks += server + scratch
    router, health = _router(fleet, paths)
    checks += [router, _journal(paths, health)]
    for name in fleet.slots:
        checks.append(_slot(fleet, paths, name, bool(panes.get(name) and panes[name].alive)))
    checks += _systemd(fleet, paths, boot, runner)
    return checks


def report(checks: list[Check]) -> dict:
    """``--json`` shape: ``{"ok": bool, "fails": int, "warnings": int, "checks": [Check...]}``."""
    fails = sum(c.status == "fail" for c in checks)
    return {"ok": fails == 0, "fails": fails, "warnings": sum(c.status == "warn" for c in checks),
            "checks": [asdict(c) for c in checks]}


def render(checks: list[Check]) -> str:
    """Human text: one line per check, its fix indented under it, a summary line."""
    lines = []
    width = max(len(c.name) for c in checks)
    for c in checks:
        lines.append(f"{c.status.upper() if c.status == 'fail' else c.status:<5} {c.name:<{width}}  {c.detail}")
        if c.fix:
            lines.append(f"{'':<5} {'':<{width}}  fix: {c.fix}")
    r = report(checks)
    lines.append(f"{r['fails']} problem(s), {r['warnings']} warning(s)")
    return "\n".join(lines)
