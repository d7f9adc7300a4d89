"""``fleet doctor`` on a real fleet (a broken invariant gives exit 1 and its fix) and per-slot
checks; ``fleet init`` output loads as a roster and is never written over an existing file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import assert_no_processes_left, needs_tmux
from fleetbus import doctor
from fleetbus.adapters import get_adapter
from fleetbus.config import load_roster
from fleetbus.paths import fleet_paths

ROSTER = """version: 1
tenant: doc
bus: {heartbeat_ms: 200, liveness: 3}
agents:
  - {name: a0, runtime: stub}
  - {name: sh0, runtime: shell}
"""


def _doctor(fe) -> tuple[int, dict]:
    p = fe.cli("doctor", "--json")
    return p.returncode, json.loads(p.stdout)


def _by_name(out: dict) -> dict[str, dict]:
    return {c["name"]: c for c in out["checks"]}


@needs_tmux
def test_doctor_passes_on_a_running_fleet_and_fails_when_the_holder_is_killed(make_fleet):
    fe = make_fleet(ROSTER)
    rc, out = _doctor(fe)  # fleet down: not a broken invariant
    checks = _by_name(out)
    assert rc == 0 and out["ok"], out
    # nothing of its throwaway tmux server is left (its _holder pane's program used to be)
    assert_no_processes_left(f"TMUX_TMPDIR={fe.env['TMUX_TMPDIR']}", after="`fleet doctor`")
    assert checks["tmux-server"]["status"] == "ok" and "fleet is down" in checks["tmux-server"]["detail"]
    assert checks["router"]["status"] == "warn" and checks["router"]["fix"] == "fleet up"

    fe.up()
    rc, out = _doctor(fe)
    checks = _by_name(out)
    assert rc == 0 and out["fails"] == 0, out
    for name in ("tmux", "tmux-server", "holder", "exact-targets", "restart-isolation", "router", "slot a0", "slot sh0"):
        assert checks[name]["status"] == "ok", checks[name]
    assert "hook built in" in checks["slot a0"]["detail"] and "reads the pane" in checks["slot sh0"]["detail"]
    assert {"systemd", "linger"} <= checks.keys()
    # the throwaway server of the exact-target checks is gone; only the fleet's socket remains
    assert os.listdir(Path(fe.env["TMUX_TMPDIR"]) / f"tmux-{os.getuid()}") == [fe.paths.tmux_socket]

    fe.tmux_cmd("kill-session", "-t", "=_holder")  # by hand
    rc, out = _doctor(fe)
    holder = _by_name(out)["holder"]
    assert rc == 1 and not out["ok"] and out["fails"] == 1, out
    assert holder["status"] == "fail" and "_holder is gone" in holder["detail"]
    assert holder["fix"].startswith("fleet up")
    text = fe.cli("doctor")
    assert text.returncode == 1 and "FAIL  holder" in text.stdout and "fix: fleet up" in text.stdout
    assert "1 problem(s)" in text.stdout

    assert fe.cli("up").returncode == 0  # recreates the session; slots keep running
    rc, out = _doctor(fe)
    assert rc == 0 and _by_name(out)["holder"]["status"] == "ok", out


def _fleet(tmp_path, monkeypatch, agents: str):
    monkeypatch.setenv("FLEETBUS_HOME", str(tmp_path / "home"))
    (tmp_path / "fleet.yaml").write_text(f"version: 1\nagents:\n{agents}")
    fleet = load_roster(tmp_path / "fleet.yaml")
    return fleet, fleet_paths(fleet.tenant, "fleet")


def test_slot_check_missing_program_and_workdir(tmp_path, monkeypatch):
    fleet, paths = _fleet(tmp_path, monkeypatch, "  - {name: x, runtime: shell, command: [no-such-program-zz]}\n"
                                                 "  - {name: y, runtime: shell, workdir: /no/such/dir}\n")
    x = doctor._slot(fleet, paths, "x", alive=False)
    assert x.status == "fail" and "'no-such-program-zz' not found" in x.detail and "fleet start x" in x.fix
    y = doctor._slot(fleet, paths, "y", alive=False)
    assert y.status == "fail" and "workdir /no/such/dir does not exist" in y.detail


def test_slot_check_hook_wiring(tmp_path, monkeypatch):
    # Claude Code's wiring is a settings file in the slot's folder; /bin/sleep stands in for claude
    fleet, paths = _fleet(tmp_path, monkeypatch, "  - {name: c, runtime: claude, command: [/bin/sleep, '9']}\n")
    assert doctor._slot(fleet, paths, "c", alive=False).status == "ok"  # written when the slot starts
    down = doctor._slot(fleet, paths, "c", alive=True)
    assert down.status == "fail" and "without its hook wiring" in down.detail and down.fix.startswith("fleet restart c")
    wiring = get_adapter("claude").hook_setup(f"{sys.executable} -m fleetbus hook")
    d = paths.slot_dir("c")
    d.mkdir(parents=True)
    for name, text in wiring.files.items():
        (d / name).write_text(text)
    ok = doctor._slot(fleet, paths, "c", alive=True)
    assert ok.status == "ok" and "hooks installed" in ok.detail, ok
    first = next(iter(wiring.files))
    (d / first).write_text("{}")
    stale = doctor._slot(fleet, paths, "c", alive=True)
    assert stale.status == "warn" and "differs" in stale.detail and "fleet restart c" in stale.fix


def _init(tmp_path, *args: str, path: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": path or os.environ["PATH"]}
    return subprocess.run([sys.executable, "-m", "fleetbus", "init", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("profile", ["minimal", "software-factory"])
def test_init_writes_a_roster_that_loads_and_never_overwrites(tmp_path, profile):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "codex").write_text("#!/bin/sh\n")
    (bin_dir / "codex").chmod(0o755)
    path = f"{bin_dir}:/usr/bin:/bin"
    p = _init(tmp_path, "--profile", profile, path=path)
    assert p.returncode == 0 and f"found    codex     {bin_dir / 'codex'}" in p.stdout
    target = tmp_path / "fleet.yaml"
    p = _init(tmp_path, "--profile", profile, "--write", str(target), path=path)
    assert p.returncode == 0 and f"wrote {target}" in p.stdout, p.stderr
    fleet = load_roster(target)
    runtimes = {s.name: s.runtime for s in fleet.slots.values()}
    if profile == "minimal":
        assert runtimes == {"agent0": "codex", "sh0": "shell"}
    else:
        assert runtimes["coder0"] == runtimes["lead"] == runtimes["rev0"] == "codex"
        assert fleet.slots["coder0"].class_ == "implementer"
    assert f"fleet --roster {target} up" in target.read_text()
    before = target.read_text()
    p = _init(tmp_path, "--write", str(target), path=path)
    assert p.returncode == 3 and "exists; nothing was written" in p.stderr and target.read_text() == before
