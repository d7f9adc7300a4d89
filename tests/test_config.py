"""Unit tests for fleetbus.config: roster loading, defaults, validation errors, find_roster."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetbus import config
from fleetbus.config import (
    MAX_NAME,
    NAME_RE,
    RosterError,
    default_tenant,
    find_roster,
    load_roster,
    parse_roster,
)

FULL_ROSTER = """\
version: 1
tenant: alice
transport: {kind: tmux, socket: fleet, width: 120, height: 40}
bus: {heartbeat_ms: 500, liveness: 4, max_body_bytes: 4096, verify_timeout_s: 2.5}
defaults:
  workdir: work
  runtime: stub
  class: helper
  env: {A: "1", B: "2"}
agents:
  - {name: coder0, runtime: stub, class: implementer}
  - name: sh0
    runtime: shell
    workdir: /srv/shell-home
    env: {B: override, C: "3"}
    heartbeat_ms: 2000
    liveness: 2
  - name: py.1
    runtime: python
    command: [/usr/bin/python3, -q]
    reset_between_tasks: true
"""

MINIMAL_ROSTER = """\
version: 1
agents:
  - name: a
  - name: b-2
"""


# The two shipped examples (examples/minimal.yaml, examples/software-factory.yaml), inlined so these
# tests do not depend on the files staying unchanged.
EXAMPLE_MINIMAL = """\
version: 1
agents:
  - {name: coder0, runtime: stub}
  - {name: sh0, runtime: shell}
"""

EXAMPLE_FACTORY = """\
version: 1
tenant: factory
transport: {kind: tmux, socket: factory, width: 200, height: 50}
bus: {heartbeat_ms: 1000, liveness: 3, verify_timeout_s: 15}
defaults:
  runtime: stub
  workdir: .            # relative to this file
  env: {FACTORY: "1"}
agents:
  - {name: lead, class: orchestrator}
  - {name: coder0, class: implementer, reset_between_tasks: true}
  - {name: coder1, class: implementer, reset_between_tasks: true}
  - {name: coder2, class: implementer, reset_between_tasks: true}
  - {name: rev0, class: reviewer}
  - {name: rev1, class: reviewer}
  - {name: test0, class: tester, heartbeat_ms: 2000}
  - {name: sh.build, runtime: shell, class: ops, env: {MAKEFLAGS: "-j2"}}
  - {name: py0, runtime: python, class: ops}
"""


def write(tmp_path: Path, text: str, name: str = "fleet.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def roster_error(tmp_path: Path, text: str, name: str = "fleet.yaml") -> tuple[Path, RosterError]:
    p = write(tmp_path, text, name)
    with pytest.raises(RosterError) as ei:
        load_roster(p)
    return p, ei.value


# --- valid rosters ---------------------------------------------------------------------------


def test_example_minimal(tmp_path, monkeypatch):
    monkeypatch.setattr(config.getpass, "getuser", lambda: "carol")
    fleet = load_roster(write(tmp_path, EXAMPLE_MINIMAL))
    assert fleet.tenant == "carol"
    assert {n: s.runtime for n, s in fleet.slots.items()} == {"coder0": "stub", "sh0": "shell"}
    assert all(s.workdir == str(tmp_path.resolve()) for s in fleet.slots.values())
    assert fleet.roster.transport.socket == "fleet"


def test_example_software_factory(tmp_path, monkeypatch):
    sub = tmp_path / "rosters"
    sub.mkdir()
    monkeypatch.chdir(tmp_path)
    fleet = load_roster(write(sub, EXAMPLE_FACTORY))
    assert fleet.tenant == "factory"
    assert list(fleet.slots) == ["lead", "coder0", "coder1", "coder2", "rev0", "rev1", "test0", "sh.build", "py0"]
    assert fleet.roster.transport.socket == "factory"
    assert fleet.roster.bus.verify_timeout_s == 15
    for s in fleet.slots.values():
        assert s.workdir == str(sub.resolve())  # "." is the roster's folder, not the cwd
    assert fleet.slot("lead").runtime == "stub" and fleet.slot("lead").class_ == "orchestrator"
    assert fleet.slot("sh.build").runtime == "shell"
    assert fleet.slot("py0").runtime == "python"
    assert fleet.slot("sh.build").env == {"FACTORY": "1", "MAKEFLAGS": "-j2"}
    assert fleet.slot("rev0").env == {"FACTORY": "1"}
    assert (fleet.slot("test0").heartbeat_ms, fleet.slot("test0").liveness) == (2000, 3)
    assert (fleet.slot("lead").heartbeat_ms, fleet.slot("lead").liveness) == (1000, 3)
    assert [n for n, s in fleet.slots.items() if s.reset_between_tasks] == ["coder0", "coder1", "coder2"]



def test_full_roster_loads_with_explicit_values(tmp_path):
    p = write(tmp_path, FULL_ROSTER)
    fleet = load_roster(p)
    assert fleet.path == p.resolve()
    assert fleet.tenant == "alice"
    assert list(fleet.slots) == ["coder0", "sh0", "py.1"]
    r = fleet.roster
    assert (r.transport.kind, r.transport.socket, r.transport.width, r.transport.height) == ("tmux", "fleet", 120, 40)
    assert (r.bus.heartbeat_ms, r.bus.liveness, r.bus.max_body_bytes, r.bus.verify_timeout_s) == (500, 4, 4096, 2.5)

    coder = fleet.slot("coder0")
    assert coder.runtime == "stub"
    assert coder.class_ == "implementer"
    assert coder.command is None
    assert coder.reset_between_tasks is False

    sh = fleet.slot("sh0")
    assert sh.runtime == "shell"
    assert sh.class_ == "helper"  # inherited from defaults
    assert sh.workdir == "/srv/shell-home"
    assert sh.heartbeat_ms == 2000 and sh.liveness == 2

    py = fleet.slot("py.1")
    assert py.runtime == "python"
    assert py.command == ["/usr/bin/python3", "-q"]
    assert py.reset_between_tasks is True


def test_env_merges_defaults_and_agent(tmp_path):
    fleet = load_roster(write(tmp_path, FULL_ROSTER))
    assert fleet.slot("coder0").env == {"A": "1", "B": "2"}
    assert fleet.slot("sh0").env == {"A": "1", "B": "override", "C": "3"}


def test_heartbeat_and_liveness_default_from_bus(tmp_path):
    fleet = load_roster(write(tmp_path, FULL_ROSTER))
    coder = fleet.slot("coder0")
    assert (coder.heartbeat_ms, coder.liveness) == (500, 4)
    assert (fleet.slot("py.1").heartbeat_ms, fleet.slot("py.1").liveness) == (500, 4)


def test_relative_default_workdir_resolves_against_roster_folder(tmp_path, monkeypatch):
    sub = tmp_path / "conf"
    sub.mkdir()
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)  # cwd must not matter for load_roster
    fleet = load_roster(write(sub, FULL_ROSTER))
    assert fleet.slot("coder0").workdir == str(sub.resolve() / "work")
    assert Path(fleet.slot("coder0").workdir).is_absolute()


def test_minimal_roster_defaults(tmp_path, monkeypatch):
    other = tmp_path / "cwd"
    other.mkdir()
    monkeypatch.chdir(other)
    p = write(tmp_path, MINIMAL_ROSTER)
    fleet = load_roster(p)
    r = fleet.roster
    assert r.transport.kind == "tmux" and r.transport.socket == "fleet"
    assert (r.transport.width, r.transport.height) == (200, 50)
    assert (r.bus.heartbeat_ms, r.bus.liveness, r.bus.max_body_bytes) == (1000, 3, 65_536)
    for name in ("a", "b-2"):
        s = fleet.slot(name)
        assert s.runtime == "stub"  # defaults.runtime default
        assert s.workdir == str(tmp_path.resolve())  # the roster's folder, not the cwd
        assert s.env == {}
        assert s.class_ is None
        assert (s.heartbeat_ms, s.liveness) == (1000, 3)


def test_workdir_expands_user_and_vars(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("FLEET_TEST_DIR", "/data/x")
    text = "version: 1\ndefaults: {workdir: ~/src}\nagents:\n  - {name: a}\n  - {name: b, workdir: $FLEET_TEST_DIR/y}\n"
    fleet = load_roster(write(tmp_path, text))
    assert fleet.slot("a").workdir == str(home / "src")
    assert fleet.slot("b").workdir == "/data/x/y"


def test_agent_workdir_overrides_default(tmp_path):
    text = "version: 1\ndefaults: {workdir: /base}\nagents:\n  - {name: a, workdir: rel}\n  - {name: b}\n"
    fleet = load_roster(write(tmp_path, text))
    assert fleet.slot("a").workdir == str(tmp_path.resolve() / "rel")
    assert fleet.slot("b").workdir == "/base"


def test_tenant_defaults_to_os_user(tmp_path, monkeypatch):
    monkeypatch.setattr(config.getpass, "getuser", lambda: "Alice Smith")
    fleet = load_roster(write(tmp_path, MINIMAL_ROSTER))
    assert fleet.tenant == "alice-smith"


def test_default_tenant_is_a_valid_name(monkeypatch):
    for user, expected in [("bob", "bob"), ("Bob.O'Neil", "bob.o-neil"), ("_svc", "svc"), ("___", "user"),
                           ("x" * 80, "x" * MAX_NAME)]:
        monkeypatch.setattr(config.getpass, "getuser", lambda u=user: u)
        got = default_tenant()
        assert got == expected
        assert NAME_RE.match(got) and len(got) <= MAX_NAME


def test_explicit_tenant_wins_over_os_user(tmp_path, monkeypatch):
    monkeypatch.setattr(config.getpass, "getuser", lambda: "someoneelse")
    assert load_roster(write(tmp_path, FULL_ROSTER)).tenant == "alice"


def test_fleet_slot_unknown_lists_known():
    fleet = parse_roster({"version": 1, "agents": [{"name": "a"}, {"name": "b"}]})
    with pytest.raises(KeyError) as ei:
        fleet.slot("zz")
    assert "'zz'" in str(ei.value) and "a, b" in str(ei.value)
    assert fleet.path is None


def test_empty_agent_list_is_valid(tmp_path):
    fleet = load_roster(write(tmp_path, "version: 1\n"))
    assert fleet.slots == {}


# --- slot name validation --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "0", "coder0", "a.b", "a_b", "a-b", "9lives", "x" * MAX_NAME])
def test_valid_slot_names(tmp_path, name):
    fleet = load_roster(write(tmp_path, f"version: 1\nagents:\n  - {{name: z}}\n  - name: '{name}'\n"))
    assert name in fleet.slots


@pytest.mark.parametrize(
    "name",
    ["Bad", "aB", "a:b", "-a", ".a", "_a", "a b", "a/b", "x" * (MAX_NAME + 1), "", "é"],
)
def test_invalid_slot_names_report_file_and_path(tmp_path, name):
    p, err = roster_error(tmp_path, f"version: 1\nagents:\n  - name: ok\n  - name: '{name}'\n", "my-roster.yaml")
    s = str(err)
    assert s.startswith(f"{p}: agents[1].name: ")
    assert "[a-z0-9][a-z0-9._-]*" in s
    assert repr(name) in s
    assert err.file == str(p)
    assert len(err.problems) == 1


@pytest.mark.parametrize("field", ["agent", "tenant"])
def test_name_with_trailing_newline_rejected(field):
    data = {"version": 1, "agents": [{"name": "a"}]}
    if field == "agent":
        data["agents"].append({"name": "b\n"})
    else:
        data["tenant"] = "alice\n"
    with pytest.raises(RosterError):
        parse_roster(data, "f.yaml")


def test_env_name_with_trailing_newline_rejected():
    with pytest.raises(RosterError):
        parse_roster({"version": 1, "agents": [{"name": "a", "env": {"X\n": "1"}}]}, "f.yaml")


def test_invalid_env_name_in_agent_rejected():
    with pytest.raises(RosterError) as ei:
        parse_roster({"version": 1, "agents": [{"name": "a", "env": {"1X": "y"}}]}, "f.yaml")
    assert str(ei.value).startswith("f.yaml: agents[0].env: ")
    assert "'1X'" in str(ei.value)


def test_invalid_env_name_in_defaults_rejected():
    with pytest.raises(RosterError):
        parse_roster({"version": 1, "defaults": {"env": {"1X": "y"}}, "agents": [{"name": "a"}]}, "f.yaml")


def test_invalid_tenant_name(tmp_path):
    p, err = roster_error(tmp_path, "version: 1\ntenant: Alice\n")
    assert str(err).startswith(f"{p}: tenant: ")
    assert "'Alice'" in str(err)


def test_invalid_transport_socket_name(tmp_path):
    p, err = roster_error(tmp_path, "version: 1\ntransport: {socket: 'My:Sock'}\n")
    assert str(err).startswith(f"{p}: transport.socket: ")


def test_duplicate_slot_names_name_both_indexes(tmp_path):
    p, err = roster_error(tmp_path, "version: 1\nagents:\n  - {name: a}\n  - {name: b}\n  - {name: a}\n")
    s = str(err)
    assert s.startswith(f"{p}: ")
    assert "agents[2]" in s and "agents[0]" in s
    assert "duplicate" in s and "'a'" in s


# --- runtime validation ----------------------------------------------------------------------


def test_unknown_agent_runtime_lists_known(tmp_path):
    p, err = roster_error(tmp_path, "version: 1\nagents:\n  - {name: a}\n  - {name: b, runtime: emacs}\n")
    s = str(err)
    assert s.startswith(f"{p}: agents[1].runtime: ")
    assert "'emacs'" in s
    for known in ("claude", "python", "shell", "stub"):
        assert known in s


def test_unknown_default_runtime_lists_known(tmp_path):
    p, err = roster_error(tmp_path, "version: 1\ndefaults: {runtime: nope}\n")
    s = str(err)
    assert s.startswith(f"{p}: defaults.runtime: ")
    assert "python, shell, stub" in s


# --- unknown keys and other schema errors ----------------------------------------------------


def test_unknown_top_level_key(tmp_path):
    p, err = roster_error(tmp_path, "version: 1\nbogus: 1\n")
    assert str(err).startswith(f"{p}: bogus: ")
    assert "not permitted" in str(err)


def test_unknown_agent_key_has_path(tmp_path):
    p, err = roster_error(tmp_path, "version: 1\nagents:\n  - {name: a}\n  - {name: b, colour: red}\n")
    assert str(err).startswith(f"{p}: agents[1].colour: ")
    assert "'red'" in str(err)


@pytest.mark.parametrize("section", ["transport", "bus", "defaults"])
def test_unknown_nested_key_has_path(tmp_path, section):
    p, err = roster_error(tmp_path, f"version: 1\n{section}: {{nope: 1}}\n")
    assert str(err).startswith(f"{p}: {section}.nope: ")


def test_multiple_problems_are_all_listed(tmp_path):
    p, err = roster_error(tmp_path, "version: 1\nbogus: 1\nagents:\n  - {name: Bad}\n")
    assert len(err.problems) == 2
    lines = str(err).splitlines()
    assert len(lines) == 2
    assert all(line.startswith(f"{p}: ") for line in lines)
    assert any("agents[0].name" in line for line in lines)
    assert any("bogus" in line for line in lines)


def test_wrong_version(tmp_path):
    p, err = roster_error(tmp_path, "version: 2\n")
    assert str(err).startswith(f"{p}: version: ")
    assert "(got 2)" in str(err)


def test_missing_version(tmp_path):
    p, err = roster_error(tmp_path, "agents: []\n")
    assert str(err).startswith(f"{p}: version: ")


def test_out_of_range_bus_value(tmp_path):
    p, err = roster_error(tmp_path, "version: 1\nbus: {heartbeat_ms: 10}\n")
    assert str(err).startswith(f"{p}: bus.heartbeat_ms: ")


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", ""])
def test_top_level_not_a_mapping(tmp_path, text):
    p, err = roster_error(tmp_path, text)
    assert str(err).startswith(f"{p}: (top level): expected a mapping")


# --- file level errors -----------------------------------------------------------------------


def test_invalid_yaml_reports_line_and_column(tmp_path):
    p, err = roster_error(tmp_path, "version: 1\nagents:\n\t- name: a\n")
    s = str(err)
    assert s.startswith(f"{p}: line 3, column 1: invalid YAML")


def test_invalid_yaml_mapping_position(tmp_path):
    p, err = roster_error(tmp_path, "version: 1\n  bad: x\n")
    assert str(err).startswith(f"{p}: line 2, column 6: invalid YAML")


def test_missing_file(tmp_path):
    p = tmp_path / "nope.yaml"
    with pytest.raises(RosterError) as ei:
        load_roster(p)
    assert str(ei.value).startswith(f"{p}: ")
    assert "cannot read roster" in str(ei.value)


def test_not_utf8(tmp_path):
    p = tmp_path / "fleet.yaml"
    p.write_bytes(b"version: 1\ntenant: \xff\xfe\n")
    with pytest.raises(RosterError) as ei:
        load_roster(p)
    assert str(ei.value).startswith(f"{p}: ")
    assert "UTF-8" in str(ei.value)


def test_roster_error_is_value_error():
    err = RosterError("some/file.yaml", ["a: x", "b: y"])
    assert isinstance(err, ValueError)
    assert str(err) == "some/file.yaml: a: x\nsome/file.yaml: b: y"


# --- find_roster -----------------------------------------------------------------------------


@pytest.fixture
def three_rosters(tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "fleet.yaml").write_text(MINIMAL_ROSTER)
    explicit = write(tmp_path, MINIMAL_ROSTER, "explicit.yaml")
    from_env = write(tmp_path, MINIMAL_ROSTER, "env.yaml")
    monkeypatch.chdir(cwd)
    return explicit, from_env, cwd


def test_find_roster_explicit_wins(three_rosters):
    explicit, from_env, _ = three_rosters
    assert find_roster(str(explicit), env={"FLEETBUS_ROSTER": str(from_env)}) == explicit


def test_find_roster_env_before_cwd(three_rosters):
    _, from_env, _ = three_rosters
    assert find_roster(None, env={"FLEETBUS_ROSTER": str(from_env)}) == from_env


def test_find_roster_cwd_last(three_rosters):
    _, _, cwd = three_rosters
    found = find_roster(None, env={})
    assert found.resolve() == (cwd / "fleet.yaml").resolve()


def test_find_roster_empty_env_value_falls_through(three_rosters):
    _, _, cwd = three_rosters
    assert find_roster(None, env={"FLEETBUS_ROSTER": ""}).resolve() == (cwd / "fleet.yaml").resolve()


def test_find_roster_explicit_missing_is_an_error(three_rosters, tmp_path):
    _, from_env, _ = three_rosters
    missing = tmp_path / "missing.yaml"
    with pytest.raises(RosterError) as ei:
        find_roster(str(missing), env={"FLEETBUS_ROSTER": str(from_env)})
    assert str(ei.value).startswith(f"{missing}: ")
    assert "--roster" in str(ei.value)


def test_find_roster_env_missing_is_an_error(three_rosters, tmp_path):
    missing = tmp_path / "missing-env.yaml"
    with pytest.raises(RosterError) as ei:
        find_roster(None, env={"FLEETBUS_ROSTER": str(missing)})
    assert str(ei.value).startswith(f"{missing}: ")
    assert "$FLEETBUS_ROSTER" in str(ei.value)


def test_find_roster_explicit_directory_is_not_a_roster(three_rosters, tmp_path):
    with pytest.raises(RosterError):
        find_roster(str(tmp_path), env={})


def test_find_roster_nothing_found(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    with pytest.raises(RosterError) as ei:
        find_roster(None, env={})
    s = str(ei.value)
    assert s.startswith(f"{(empty / 'fleet.yaml').resolve()}: ")
    assert "--roster" in s and "FLEETBUS_ROSTER" in s


def test_find_roster_uses_os_environ_by_default(three_rosters, monkeypatch):
    _, from_env, _ = three_rosters
    monkeypatch.setenv("FLEETBUS_ROSTER", str(from_env))
    assert find_roster() == from_env


def test_kickstart_inherits_and_is_checked(tmp_path):
    fleet = load_roster(write(tmp_path, "version: 1\ndefaults: {kickstart: 'Task {task_id}: {body}'}\n"
                                        "agents:\n  - {name: a}\n  - {name: b, kickstart: '{body} (from {sender})'}\n"))
    assert fleet.slots["a"].kickstart == "Task {task_id}: {body}"
    assert fleet.slots["b"].kickstart == "{body} (from {sender})"
    assert config.render_kickstart(fleet.slots["a"].kickstart, body="x {slot}", task_id="t1", slot="a",
                                   sender="o", selector="a") == "Task t1: x {slot}"
    p, err = roster_error(tmp_path, "version: 1\nagents:\n  - {name: a, kickstart: 'do {body.upper} now'}\n")
    assert "agents[0].kickstart" in str(err) and "unknown field {body.upper}" in str(err) and str(p) in str(err)
    _, err = roster_error(tmp_path, "version: 1\ndefaults: {kickstart: 'no body here'}\nagents: []\n", "b.yaml")
    assert "defaults.kickstart" in str(err) and "{body} exactly once" in str(err)
