"""systemd user units: generation (checked by systemd-analyze), install/uninstall, the units'
commands run for real (through tests/fakesystemd.py, which runs them as systemd would), ``up`` and
``down`` through systemd, the ``BOOT-ENABLE`` flag, sd_notify READY/WATCHDOG, ``fleet holder``."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from conftest import needs_tmux, wait_for
from fakesystemd import FakeSystemd, parse_unit, unquote
from fleetbus import ops, systemd
from fleetbus.config import load_roster
from fleetbus.paths import fleet_paths
from fleetbus.router import procs
from fleetbus.transports.base import TransportError

ROSTER = """version: 1
tenant: boot
bus: {heartbeat_ms: 200, liveness: 3, verify_timeout_s: 8}
agents:
  - {name: a0, runtime: stub}
  - {name: a1, runtime: stub}
"""


@pytest.fixture
def plain(tmp_path, monkeypatch):
    """A roster and paths without tmux: FLEETBUS_HOME and XDG_CONFIG_HOME in tmp_path."""
    monkeypatch.setenv("FLEETBUS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    roster = tmp_path / "fleet.yaml"
    roster.write_text(ROSTER)
    fleet = load_roster(roster)
    paths = fleet_paths(fleet.tenant, fleet.roster.transport.socket)
    yield fleet, paths, tmp_path
    shutil.rmtree(paths.run_dir, ignore_errors=True)  # made by the CLI commands the test ran


def recorder(reachable: bool = True, fail: tuple[str, ...] = ()):
    calls: list[list[str]] = []

    def run(argv):
        calls.append(list(argv))
        if argv[2:3] == ["is-system-running"]:
            return subprocess.CompletedProcess(argv, 0 if reachable else 1, "running\n" if reachable else "offline\n", "")
        rc = 1 if any(f in argv for f in fail) else 0
        return subprocess.CompletedProcess(argv, rc, "", "denied" if rc else "")

    return run, calls


# -- generation -----------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing (scripts/bootstrap --test installs systemd)")
@pytest.mark.parametrize("folder", ["plain", "with space %and$dollar"])
def test_units_pass_systemd_analyze_verify(tmp_path, monkeypatch, folder):
    monkeypatch.setenv("FLEETBUS_HOME", str(tmp_path / "home"))
    d = tmp_path / folder
    d.mkdir()
    (d / "fleet.yaml").write_text(ROSTER)
    fleet = load_roster(d / "fleet.yaml")
    paths = fleet_paths(fleet.tenant, "fleet")
    units = tmp_path / "units"
    units.mkdir()
    for u in systemd.render_units(fleet, paths):
        (units / u.name).write_text(u.text)
        parsed = parse_unit(u.text)
        # absolute paths, explicit PATH, the settings the issue asks for
        argv = unquote(parsed["Service.ExecStart"][0], True)
        assert argv[:3] == [sys.executable, "-m", "fleetbus"] and argv[4] == str(d / "fleet.yaml")
        assert os.path.isabs(argv[0]) and argv[-1] in ("holder", "router")
        env = dict(w.partition("=")[::2] for line in parsed["Service.Environment"] for w in unquote(line, False))
        assert env["PATH"].split(":")[0] == os.path.dirname(sys.executable)
        assert all(os.path.isabs(p) for p in env["PATH"].split(":"))
        assert env["FLEETBUS_HOME"] == str((tmp_path / "home").resolve())
        assert parsed["Service.Type"] == ["notify"] and parsed["Service.KillMode"] == ["process"]
        assert parsed["Install.WantedBy"] == ["default.target"]
    run = tmp_path / "xdg"
    run.mkdir(mode=0o700)
    p = subprocess.run(["systemd-analyze", "verify", "--user", *sorted(str(f) for f in units.iterdir())],
                       env={**os.environ, "XDG_RUNTIME_DIR": str(run)}, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "" and p.stderr.strip() == "", p


def test_router_unit_orders_after_holder_and_keeps_agents(plain):
    fleet, paths, _ = plain
    holder, router = systemd.render_units(fleet, paths)
    r = parse_unit(router.text)
    assert r["Unit.Wants"] == [holder.name] and r["Unit.After"] == [holder.name]
    assert "Unit.Requires" not in r and "Unit.BindsTo" not in r  # a holder restart must not restart the router
    assert r["Service.WatchdogSec"] == [str(systemd.WATCHDOG_S)] and r["Service.Restart"] == ["on-failure"]
    h = parse_unit(holder.text)
    assert h["Service.Restart"] == ["on-failure"] and "Service.WatchdogSec" not in h
    assert holder.name == f"fleetbus-{paths.instance}-holder.service" and paths.instance.startswith("boot-")


# -- install / uninstall --------------------------------------------------------------------------


def test_install_enables_units_and_linger_and_uninstall_leaves_nothing(plain):
    fleet, paths, tmp = plain
    run, calls = recorder()
    linger = tmp / "linger"
    rep = systemd.install(fleet, paths, runner=run, linger_dir=linger)
    h, r = systemd.unit_names(paths)
    user = systemd.user_name()
    assert calls == [["systemctl", "--user", "is-system-running"], ["systemctl", "--user", "daemon-reload"],
                     ["systemctl", "--user", "enable", h, r], ["loginctl", "enable-linger", user]]
    assert rep.complete and not rep.todo
    d = tmp / "config" / "systemd" / "user"
    assert sorted(p.name for p in d.iterdir()) == sorted([h, r])
    assert all((d / n).read_text().startswith(systemd.MARK) for n in (h, r))
    # again: unchanged files, the same calls
    calls.clear()
    rep = systemd.install(fleet, paths, runner=run, linger_dir=linger)
    assert [p.name for p in rep.unchanged] == [h, r] and not rep.written
    # linger already on: no loginctl call; --no-enable: no enable and no linger
    (linger).mkdir()
    (linger / user).touch()
    calls.clear()
    systemd.install(fleet, paths, runner=run, linger_dir=linger)
    assert ["loginctl", "enable-linger", user] not in calls
    calls.clear()
    systemd.install(fleet, paths, enable=False, runner=run, linger_dir=tmp / "nolinger")
    assert calls == [["systemctl", "--user", "is-system-running"], ["systemctl", "--user", "daemon-reload"]]

    # enable links as systemctl makes them, then uninstall removes everything it made
    wants = d / "default.target.wants"
    wants.mkdir()
    for n in (h, r):
        (wants / n).symlink_to(d / n)
    calls.clear()
    rep = systemd.uninstall(fleet, paths, runner=run)
    assert calls == [["systemctl", "--user", "is-system-running"], ["systemctl", "--user", "disable", "--now", h, r],
                     ["systemctl", "--user", "daemon-reload"]]
    assert not (tmp / "config" / "systemd").exists(), list((tmp / "config").rglob("*"))


def test_install_without_a_manager_lists_the_exact_commands(plain):
    fleet, paths, tmp = plain
    run, calls = recorder(reachable=False, fail=("enable-linger",))
    rep = systemd.install(fleet, paths, runner=run, linger_dir=tmp / "linger")
    h, r = systemd.unit_names(paths)
    user = systemd.user_name()
    sudo = "" if os.getuid() == 0 else "sudo "
    assert rep.todo == ["systemctl --user daemon-reload", f"systemctl --user enable {h} {r}",
                        f"{sudo}loginctl enable-linger {user}"]
    assert not rep.complete and any("no systemd user manager" in n for n in rep.notes)
    assert len(rep.written) == 2


def test_install_refuses_a_unit_file_it_did_not_write(plain):
    fleet, paths, tmp = plain
    d = tmp / "config" / "systemd" / "user"
    d.mkdir(parents=True)
    h, _ = systemd.unit_names(paths)
    (d / h).write_text("[Service]\nExecStart=/bin/true\n")
    run, calls = recorder()
    with pytest.raises(systemd.ForeignUnit, match="not written by fleetbus"):
        systemd.install(fleet, paths, runner=run)
    with pytest.raises(systemd.ForeignUnit):
        systemd.uninstall(fleet, paths, runner=run)
    assert (d / h).read_text() == "[Service]\nExecStart=/bin/true\n" and sorted(os.listdir(d)) == [h]
    assert calls == [["systemctl", "--user", "is-system-running"]] or calls == []
    # the CLI: exit 3, nothing changed
    p = subprocess.run([sys.executable, "-m", "fleetbus", "--roster", str(tmp / "fleet.yaml"), "install-systemd"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 3 and "not written by fleetbus" in p.stderr


def test_cli_install_dry_run_and_uninstall_on_a_machine_without_systemd(plain):
    fleet, paths, tmp = plain
    fleet_cmd = [sys.executable, "-m", "fleetbus", "--roster", str(tmp / "fleet.yaml")]
    d = tmp / "config" / "systemd" / "user"
    p = subprocess.run([*fleet_cmd, "install-systemd", "--dry-run"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    h, r = systemd.unit_names(paths)
    assert f"# ---- {d / h}" in p.stdout and "KillMode=process" in p.stdout and "Type=notify" in p.stdout
    assert not d.exists(), "dry run wrote something"
    p = subprocess.run([*fleet_cmd, "install-systemd", "--json"], capture_output=True, text=True, timeout=60)
    import json

    out = json.loads(p.stdout)
    if systemd.manager_reachable()[0]:
        pytest.skip("a systemd user manager runs here: this test covers machines without one")
    assert p.returncode == 1 and not out["complete"]  # files written, the systemctl steps left to do
    assert sorted(Path(f).name for f in out["written"]) == sorted([h, r])
    assert f"systemctl --user enable {h} {r}" in out["todo"]
    p = subprocess.run([*fleet_cmd, "uninstall-systemd"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and f"removed {d / h}" in p.stdout, p
    assert not (tmp / "config" / "systemd").exists()


# -- units run for real -----------------------------------------------------------------------------


@pytest.fixture
def fake_systemd(tmp_path):
    made = []

    def factory(fe) -> FakeSystemd:
        sd = FakeSystemd(systemd.unit_dir(), tmp_path / "linger", dict(os.environ))
        made.append(sd)
        return sd

    yield factory
    for sd in made:
        sd.close()


def _has_holder(fe) -> bool:
    try:
        fe.tmux.run_sync("has-session", "-t", "=_holder")
        return True
    except TransportError:
        return False


def _pane_pids(fe) -> dict[str, int]:
    return {s: r.pid for s, r in fe.ps().items()}


@needs_tmux
def test_units_bring_up_a_fleet_and_stopping_them_never_kills_agents(make_fleet, fake_systemd, monkeypatch):
    fe = make_fleet(ROSTER)
    sd = fake_systemd(fe)
    sd.watchdog_s = 0.6  # WatchdogSec=30 would ping every 10 s
    systemd.install(fe.fleet, fe.paths, runner=sd, linger_dir=sd.linger_dir)
    h, r = systemd.unit_names(fe.paths)
    assert (systemd.unit_dir() / "default.target.wants" / r).is_symlink()

    res = ops.up(fe.fleet, fe.paths, timeout_s=30, runner=sd)
    assert (res.via, res.started, res.handed_over) == ("systemd", True, None), res
    assert ["systemctl", "--user", "start", h, r] in sd.calls
    assert all(row.heartbeat == "healthy" for row in res.rows), res.rows
    # READY=1 came from the router once it served; then watchdog pings
    assert "READY=1" in sd.notes[h] and "READY=1" in sd.notes[r]
    wait_for(lambda: sd.notes[r].count("WATCHDOG=1") >= 3, 10, what="watchdog pings")
    assert procs.router_pid(fe.paths) == sd.main[r].pid
    # the notify variables are not passed on to sidecars or agents
    side = procs.sidecar_pid(fe.paths, "a0")
    assert "NOTIFY_SOCKET" not in open(f"/proc/{side}/environ", "rb").read().decode(errors="replace")
    assert fe.send("a0", "hello from systemd", verify=True).result == "accepted"
    monkeypatch.setattr(systemd, "LINGER_DIR", sd.linger_dir)  # where the fake loginctl recorded linger
    assert all(row.flags == [] for row in fe.ps().values())  # enabled and linger on: no BOOT-ENABLE

    server = fe.tmux.run_sync("display-message", "-p", "#{pid}").strip()
    pids = _pane_pids(fe)
    # stopping the router unit ends only the router
    sd.stop([r])
    assert procs.router_pid(fe.paths) is None
    assert _pane_pids(fe) == pids and fe.tmux.run_sync("display-message", "-p", "#{pid}").strip() == server
    assert procs.sidecar_pid(fe.paths, "a0") == side
    # stopping and starting the holder unit leaves the tmux server and agents alone
    sd.stop([h])
    assert sd.main[h].returncode == 0
    assert _pane_pids(fe) == pids and fe.tmux.run_sync("display-message", "-p", "#{pid}").strip() == server
    assert sd.start(h)[0] and sd.start(r)[0]
    wait_for(lambda: all(x.heartbeat == "healthy" for x in fe.ps().values()), 20, what="sidecars re-registered")
    assert _pane_pids(fe) == pids and fe.send("a1", "after restart", verify=True).result == "accepted"

    # the holder ends (exit 1, so Restart=on-failure brings it back) when its session is killed
    fe.tmux.run_sync("kill-session", "-t", "=_holder")
    wait_for(lambda: sd.main[h].poll() is not None, 10, what="holder exit")
    assert sd.main[h].returncode == 1 and "holder session ended" in sd.log(h)
    assert sd.start(h)[0]  # systemd's restart: the session is back, agents untouched
    wait_for(lambda: _has_holder(fe), 5, what="holder back")
    assert _pane_pids(fe) == pids

    holder_main = sd.main[h].pid
    down = ops.down(fe.fleet, fe.paths, runner=sd)
    assert down["via"] == "systemd" and ["systemctl", "--user", "stop", r, h] in sd.calls
    assert down["leftovers"] == [], down  # nothing of the units, the server or the agents outlived it
    assert not psutil.pid_exists(holder_main) or psutil.Process(holder_main).status() == psutil.STATUS_ZOMBIE
    assert not sd.active(h) and not sd.active(r)


@needs_tmux
def test_up_hands_a_router_started_outside_systemd_over_to_its_unit(make_fleet, fake_systemd):
    fe = make_fleet(ROSTER)
    sd = fake_systemd(fe)
    res = ops.up(fe.fleet, fe.paths, timeout_s=30, runner=sd)
    assert res.via == "fleetbus" and "install-systemd" in res.detail
    assert not any(c[2:3] == ["start"] for c in sd.calls)
    old = procs.router_pid(fe.paths)
    pids = _pane_pids(fe)
    systemd.install(fe.fleet, fe.paths, runner=sd, linger_dir=sd.linger_dir)
    res = ops.up(fe.fleet, fe.paths, timeout_s=30, runner=sd)
    _, r = systemd.unit_names(fe.paths)
    assert (res.via, res.handed_over, res.started) == ("systemd", old, True)
    assert procs.router_pid(fe.paths) == sd.main[r].pid != old
    assert _pane_pids(fe) == pids  # the agents kept running
    # up again: already running under its unit, nothing stopped
    res = ops.up(fe.fleet, fe.paths, timeout_s=30, runner=sd)
    assert (res.via, res.handed_over, res.started) == ("systemd", None, False)
    ops.down(fe.fleet, fe.paths, runner=sd)


@needs_tmux
def test_ps_shows_boot_enable_for_disabled_units_and_linger_off(make_fleet, monkeypatch, tmp_path):
    fe = make_fleet(ROSTER)
    fe.up()
    assert all(r.flags == [] for r in fe.ps().values())
    run, _ = recorder()
    systemd.install(fe.fleet, fe.paths, enable=False, runner=run)
    monkeypatch.setattr(systemd, "LINGER_DIR", tmp_path / "linger")
    rows = fe.ps()
    assert all("BOOT-ENABLE" in r.flags for r in rows.values()), rows
    problems = ops.boot_problems(fe.fleet, fe.paths)
    h, r = systemd.unit_names(fe.paths)
    assert f"{h} is disabled" in problems and f"{r} is disabled" in problems
    assert any(p.startswith("linger is off") for p in problems)
    # the CLI (real linger dir: off on this machine unless logind has it)
    p = fe.cli("ps")
    assert p.returncode == 0 and "BOOT-ENABLE" in p.stdout and "fix: fleet install-systemd" in p.stdout
    import json

    assert all("BOOT-ENABLE" in row["flags"] for row in json.loads(fe.cli("ps", "--json").stdout))
    # enabled, linger still off: still flagged; linger on: clean
    wants = systemd.unit_dir() / "default.target.wants"
    wants.mkdir()
    for n in (h, r):
        (wants / n).symlink_to(systemd.unit_dir() / n)
    assert ops.boot_problems(fe.fleet, fe.paths) == [f"linger is off for {systemd.user_name()} (user units stop "
                                                     "at logout and do not start at boot)"]
    (tmp_path / "linger").mkdir()
    (tmp_path / "linger" / systemd.user_name()).touch()
    assert all(r.flags == [] for r in fe.ps().values())


@needs_tmux
def test_fleet_holder_exits_0_on_sigterm_and_leaves_the_server(make_fleet):
    fe = make_fleet(ROSTER)
    p = subprocess.Popen([sys.executable, "-m", "fleetbus", "--roster", str(fe.roster), "holder"], env=fe.env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: _has_holder(fe) and fe.tmux.run_sync("list-clients", check=False).strip(), 15,
                 what="holder attached")
        p.send_signal(signal.SIGTERM)
        assert p.wait(15) == 0
        assert _has_holder(fe)  # the server and its session remain
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
