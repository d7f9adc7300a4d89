"""Unit tests for fleetbus.router.status: collect_status flags and heartbeat files."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from fleetbus.config import parse_roster
from fleetbus.paths import FleetPaths
from fleetbus.router.status import Beat, beats_from_files, collect_status, expected_commands_ok, read_heartbeat_file
from fleetbus.transports.base import PaneInfo

ROSTER = {
    "version": 1,
    "tenant": "alice",
    "bus": {"heartbeat_ms": 1000, "liveness": 3},
    "agents": [
        {"name": "ok", "runtime": "stub", "class": "implementer"},
        {"name": "gone", "runtime": "stub"},
        {"name": "exited", "runtime": "stub"},
        {"name": "stale", "runtime": "stub"},
        {"name": "lonely", "runtime": "stub"},
        {"name": "drift", "runtime": "stub"},
        {"name": "custom", "runtime": "stub", "command": ["/opt/agents/bin/my-agent", "--flag"]},
        {"name": "sh0", "runtime": "shell"},
    ],
}

HEALTHY = Beat(age_s=0.5, limit_s=3.0, state="idle", sidecar_pid=4242)


@pytest.fixture
def fleet(tmp_path):
    return parse_roster(ROSTER, "fleet.yaml", base_dir=tmp_path)


@pytest.fixture
def rows(fleet):
    panes = {
        "ok": PaneInfo("ok", alive=True, pid=None, command="python3.11", idle_s=12.345),
        "exited": PaneInfo("exited", alive=False, pid=None, command="python3", exit_status=3),
        "stale": PaneInfo("stale", alive=True, command="python3"),
        "lonely": PaneInfo("lonely", alive=True, command="python3"),
        "drift": PaneInfo("drift", alive=True, command="bash"),
        "custom": PaneInfo("custom", alive=True, command="my-agent"),
        "sh0": PaneInfo("sh0", alive=True, command="bash"),
        "not-in-roster": PaneInfo("not-in-roster", alive=True, command="bash"),
    }
    beats = {
        "ok": Beat(age_s=0.5, limit_s=3.0, state="busy", sidecar_pid=4242),
        "gone": HEALTHY,
        "exited": HEALTHY,
        "stale": Beat(age_s=3.5, limit_s=3.0, state="idle", sidecar_pid=7),
        "drift": HEALTHY,
        "custom": HEALTHY,
        "sh0": HEALTHY,
    }
    return {r.slot: r for r in collect_status(fleet, panes, beats, host="host-1")}


def test_one_row_per_roster_slot_in_order(fleet):
    out = collect_status(fleet, {}, {}, host="h")
    assert [r.slot for r in out] == list(fleet.slots)
    assert "not-in-roster" not in [r.slot for r in out]


def test_every_row_has_tenant_and_host(rows):
    for r in rows.values():
        assert r.tenant_id == "alice"
        assert r.host == "host-1"
        assert r.source == "router"


def test_default_host_is_hostname(fleet):
    out = collect_status(fleet, {}, {})
    assert {r.host for r in out} == {socket.gethostname()}


def test_source_passed_through(fleet):
    assert {r.source for r in collect_status(fleet, {}, {}, source="files", host="h")} == {"files"}


def test_healthy_row(rows):
    r = rows["ok"]
    assert r.flags == []
    assert r.pane == "alive"
    assert r.heartbeat == "healthy"
    assert r.heartbeat_age_s == 0.5
    assert r.state == "busy"
    assert r.sidecar_pid == 4242
    assert r.runtime == "stub"
    assert r.class_ == "implementer"
    assert r.command == "python3.11"
    assert r.idle_s == 12.3


def test_absent_pane_is_dead(rows):
    r = rows["gone"]
    assert "DEAD" in r.flags
    assert r.pane == "absent"
    assert r.state == "dead"
    assert r.pid is None and r.command is None and r.exit_status is None
    assert "DRIFT" not in r.flags


def test_exited_pane_is_dead_with_exit_status(rows):
    r = rows["exited"]
    assert "DEAD" in r.flags
    assert r.pane == "dead"
    assert r.exit_status == 3
    assert r.state == "dead"
    assert r.process is None


def test_stale_heartbeat(rows):
    r = rows["stale"]
    assert r.flags == ["STALE"]
    assert r.heartbeat == "stale"
    assert r.heartbeat_age_s == 3.5


def test_age_equal_to_limit_is_healthy(fleet):
    beats = {"ok": Beat(age_s=3.0, limit_s=3.0, state="idle", sidecar_pid=1)}
    panes = {"ok": PaneInfo("ok", alive=True, command="python3")}
    r = collect_status(fleet, panes, beats, host="h")[0]
    assert r.heartbeat == "healthy"
    assert "STALE" not in r.flags


def test_no_sidecar(rows):
    r = rows["lonely"]
    assert r.flags == ["NO-SIDECAR"]
    assert r.heartbeat == "none"
    assert r.heartbeat_age_s is None
    assert r.sidecar_pid is None
    assert r.state == "unknown"


def test_drift_stub_running_bash(rows):
    r = rows["drift"]
    assert r.flags == ["DRIFT"]
    assert r.command == "bash"


def test_command_override_basename_is_not_drift(rows, fleet):
    assert rows["custom"].flags == []
    assert expected_commands_ok(fleet, "custom", "my-agent")
    assert not expected_commands_ok(fleet, "custom", "other-agent")
    assert not expected_commands_ok(fleet, "custom", "/opt/agents/bin/my-agent")
    assert expected_commands_ok(fleet, "custom", "python3")  # adapter patterns still apply


def test_shell_slot_running_bash_is_not_drift(rows, fleet):
    assert rows["sh0"].flags == []
    assert not expected_commands_ok(fleet, "sh0", "zsh")
    assert not expected_commands_ok(fleet, "ok", None)


def test_unknown_pane_command_is_drift(fleet):
    panes = {"ok": PaneInfo("ok", alive=True, command=None)}
    r = collect_status(fleet, panes, {"ok": HEALTHY}, host="h")[0]
    assert r.flags == ["DRIFT"]


def test_flags_combine(fleet):
    panes = {"ok": PaneInfo("ok", alive=True, command="node")}
    out = collect_status(fleet, panes, {}, host="h")
    assert out[0].flags == ["DRIFT", "NO-SIDECAR"]
    assert out[1].flags == ["DEAD", "NO-SIDECAR"]  # "gone": absent and never heard from
    beats = {"ok": Beat(age_s=99, limit_s=3, state="busy", sidecar_pid=None)}
    assert collect_status(fleet, panes, beats, host="h")[0].flags == ["DRIFT", "STALE"]


def test_process_info_for_alive_pane(fleet):
    panes = {"ok": PaneInfo("ok", alive=True, pid=os.getpid(), command="python3")}
    r = collect_status(fleet, panes, {"ok": HEALTHY}, host="h")[0]
    assert r.pid == os.getpid()
    assert r.process is not None
    assert set(r.process) == {"name", "rss_mb", "children"}
    assert r.process["rss_mb"] > 0


def test_rows_serialise_with_class_alias(rows):
    d = rows["ok"].model_dump(by_alias=True)
    assert d["class"] == "implementer"
    assert d["tenant_id"] == "alice" and d["host"] == "host-1"


# --- heartbeat files -------------------------------------------------------------------------


def write_hb(tmp_path: Path, text: str | bytes, name="a.hb") -> Path:
    p = tmp_path / name
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text)
    return p


def test_read_heartbeat_file(tmp_path):
    p = write_hb(tmp_path, "ts=1000.5\npid=1234\nstatus=busy\nheartbeat_ms=500\nliveness=4\n")
    beat = read_heartbeat_file(p, now=1002.0)
    assert beat == Beat(age_s=1.5, limit_s=2.0, state="busy", sidecar_pid=1234)


def test_read_heartbeat_file_defaults(tmp_path):
    p = write_hb(tmp_path, "ts=100\n")
    beat = read_heartbeat_file(p, now=110.0)
    assert beat == Beat(age_s=10.0, limit_s=3.0, state="unknown", sidecar_pid=None)


def test_read_heartbeat_file_ts_in_future_is_age_zero(tmp_path):
    p = write_hb(tmp_path, "ts=200\npid=1\n")
    assert read_heartbeat_file(p, now=100.0).age_s == 0.0


def test_read_heartbeat_file_value_with_equals_and_noise(tmp_path):
    p = write_hb(tmp_path, "# comment line\nts=10\nstatus=a=b\n\nrandom text\npid=x\n")
    beat = read_heartbeat_file(p, now=11.0)
    assert beat.state == "a=b"
    assert beat.sidecar_pid is None
    assert beat.age_s == 1.0


def test_read_heartbeat_file_uses_wall_clock_by_default(tmp_path):
    import time

    p = write_hb(tmp_path, f"ts={time.time() - 2}\n")
    beat = read_heartbeat_file(p)
    assert 1.5 < beat.age_s < 10


@pytest.mark.parametrize(
    "text",
    ["", "garbage", "hello world\nfoo bar", "pid=12\nstatus=idle\n", "ts=\n", "ts=yesterday\n",
     "ts=10\nheartbeat_ms=fast\n", "ts=10\nliveness=1.5\n"],
)
def test_read_heartbeat_file_garbage_is_none(tmp_path, text):
    assert read_heartbeat_file(write_hb(tmp_path, text), now=20.0) is None


def test_read_heartbeat_file_missing_is_none(tmp_path):
    assert read_heartbeat_file(tmp_path / "nope.hb") is None
    assert read_heartbeat_file(tmp_path) is None  # a directory


def test_read_heartbeat_file_binary_garbage_is_none(tmp_path):
    p = write_hb(tmp_path, b"\xff\xfe\x00ts=\x80\x81garbage")
    assert read_heartbeat_file(p, now=20.0) is None


def test_beats_from_files(tmp_path, fleet):
    paths = FleetPaths(tenant="alice", state_dir=tmp_path / "state", run_dir=tmp_path / "run", tmux_socket="fleet")
    (tmp_path / "state" / "run").mkdir(parents=True)
    import time

    paths.heartbeat_file("ok").write_text(f"ts={time.time()}\npid=5\nstatus=idle\n")
    paths.heartbeat_file("stale").write_text("garbage\n")
    beats = beats_from_files(fleet, paths)
    assert set(beats) == {"ok"}
    assert beats["ok"].sidecar_pid == 5 and beats["ok"].state == "idle"
