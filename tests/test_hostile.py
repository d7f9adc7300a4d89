"""Hostile input against a real fleet: fuzzed frames, hostile message bodies, hostile rosters.

Every test runs a real router on a private tmux server (the ``make_fleet`` fixture) with the
stub agent, and checks both sides of the promise: the router stays up and keeps answering, and
nothing that was refused ever reaches a pane.
"""

from __future__ import annotations

import json
import math
import os
import random
import struct
import subprocess
import sys
import time
from pathlib import Path

import anyio
import psutil
import pytest
import yaml
import zmq
from conftest import needs_tmux, wait_for
from test_fuzz import _CONSTANTS, FIELDS, VALID_DICTS, VALID_FRAMES, RawStr, pack

from fleetbus import protocol as P
from fleetbus.client import Client
from fleetbus.config import MAX_NAME, RosterError, load_roster
from fleetbus.router import procs
from fleetbus.transports import tmux as T

pytestmark = [needs_tmux, pytest.mark.tmux]

TENANT = "hx"
ROSTER = f"""version: 1
tenant: {TENANT}
transport: {{kind: tmux, socket: hx}}
bus: {{heartbeat_ms: 200, liveness: 3, verify_timeout_s: 8, max_body_bytes: 4096}}
agents:
  - {{name: a, runtime: stub}}
"""
SLOTS = {"a"}


def screen(fe, slot: str = "a") -> str:
    return fe.tmux_cmd("capture-pane", "-p", "-J", "-S", "-300", "-t", f"={slot}:0.0")


def settled_screen(fe, needle: str, slot: str = "a") -> str:
    """The pane once ``needle`` shows and two captures 0.5 s apart agree."""
    wait_for(lambda: needle in screen(fe, slot), what=repr(needle))
    prev = None
    for _ in range(40):
        cur = screen(fe, slot)
        if cur == prev:
            return cur
        prev = cur
        time.sleep(0.5)
    pytest.fail(f"the pane of {slot} never settled")


def health(fe) -> dict:
    async def main():
        async with Client(fe.fleet, fe.paths) as c:
            return await c.health()
    return anyio.run(main, backend="asyncio")


class Dealer:
    """A raw DEALER socket on the router's endpoint: sends whatever it is given."""

    def __init__(self, fe):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 30_000)  # close() delivers everything queued first
        self.sock.setsockopt(zmq.SNDTIMEO, 30_000)
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        self.sock.connect(fe.paths.router_endpoint)

    def send(self, *parts: bytes) -> None:
        self.sock.send_multipart(list(parts))

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


# --- fuzzed frames ---------------------------------------------------------------------------------

#: what the router does with a frame that decodes: answers it, or drops and counts it
ANSWERED = ("SEND", "PUBLISH", "TASK", "PS", "HEALTH", "START", "STOP", "RESTART", "RESET", "INTERRUPT", "SHUTDOWN", "KEYS", "HELLO",
            "PING", "ACK", "BYE", "HOOK")
COUNTED = ("RESULT", "EVENT", "WELCOME", "PONG", "EXPECT", "DISCONNECT")  # router -> peer kinds


def _random_value(rng: random.Random, depth: int = 0):
    r = rng.random()
    if depth < 2 and r < 0.08:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if depth < 2 and r < 0.16:
        return {rng.choice(FIELDS): _random_value(rng, depth + 1) for _ in range(rng.randrange(4))}
    if r < 0.6:
        return rng.choice(_CONSTANTS)
    if r < 0.7:
        return rng.randrange(-(2**63), 2**64)
    if r < 0.8:
        return struct.unpack(">d", rng.randbytes(8))[0]  # any double: NaN payloads, subnormals, inf
    if r < 0.9:
        return rng.randbytes(rng.randrange(16))
    return "".join(chr(rng.choice((rng.randrange(0, 0x80), rng.randrange(0x80, 0xD800)))) for _ in range(rng.randrange(12)))


def _near_valid(rng: random.Random) -> bytes:
    d = dict(rng.choice(VALID_DICTS))
    for _ in range(rng.randrange(1, 4)):
        d[rng.choice(sorted(d) + FIELDS)] = _random_value(rng)
    if rng.random() < 0.2:
        d.pop(rng.choice(sorted(d)), None)
    if rng.random() < 0.05:
        d["v"] = _random_value(rng)
    if rng.random() < 0.05:
        d["kind"] = rng.choice([_random_value(rng), "SEND", "HELLO", "ACK", "RESULT"])
    return pack(d)


def _mutated(rng: random.Random) -> bytes:
    frame = bytearray(rng.choice(VALID_FRAMES))
    for _ in range(rng.randrange(1, 4)):
        i = rng.randrange(len(frame) + 1)
        op = rng.randrange(4)
        if op == 0 and i < len(frame):
            frame[i] = rng.randrange(256)
        elif op == 1:
            frame[i:i] = rng.randbytes(rng.randrange(1, 5))
        elif op == 2:
            del frame[i:i + rng.randrange(1, 5)]
        else:
            del frame[i:]
    return bytes(frame)


def fuzz_frames(seed: int, n: int) -> list[tuple[bytes, ...]]:
    """``n`` hostile frames (each a tuple of message parts), fixed by ``seed``."""
    rng = random.Random(seed)
    out: list[tuple[bytes, ...]] = []
    for i in range(n):
        k = i % 10
        if k < 3:
            out.append((rng.randbytes(rng.randrange(0, 600)),))
        elif k < 5:
            out.append((_mutated(rng),))
        elif k < 9:
            out.append((_near_valid(rng),))
        elif rng.random() < 0.5:
            out.append(tuple(rng.randbytes(rng.randrange(0, 40)) for _ in range(rng.randrange(2, 5))))  # multi-part
        else:
            out.append((b"",))
    # peers the router does not know, and registrations it must refuse
    unknown = [P.Ack(id="0123456789ab", at=1.0), P.Ping(state="busy"), P.Bye(),
               P.HookEvent(event="prompt-submit", markers=["0123456789ab"])]
    out += [(P.encode(m),) for m in unknown * 10]
    hello = dict(slot="a", tenant=TENANT, host="evil", pid=1, adapter="stub", heartbeat_ms=100)
    out += [(P.encode(P.Hello(**{**hello, "slot": f"nosuch{i}"})),) for i in range(10)]
    out += [(P.encode(P.Hello(**{**hello, "tenant": f"other{i}"})),) for i in range(10)]  # another tenant's "a"
    # a request as large as a frame may be: decoded, answered (unknown slot), never typed
    big = pack({"v": 1, "kind": "SEND", "req": "big", "to": "nosuch", "body": ""})
    out.append((pack({"v": 1, "kind": "SEND", "req": "big", "to": "nosuch",
                      "body": "x" * (P.MAX_FRAME_BYTES - len(big) - 4)}),))
    return out


def classify(parts: tuple[bytes, ...]) -> str:
    """``drop`` (counted in dropped_frames), ``answer``, or ``unsafe`` (would act on the fleet:
    left out of the fuzz so the test can watch the stub's pane)."""
    if len(parts) != 1:
        return "drop"
    try:
        msg = P.decode(parts[0])
    except P.ProtocolError:
        return "drop"
    if msg.kind in COUNTED:
        return "drop"
    assert msg.kind in ANSWERED, msg.kind
    if msg.kind == "SHUTDOWN" or (msg.kind == "HELLO" and msg.slot in SLOTS and msg.tenant == TENANT):
        return "unsafe"
    if msg.kind in ("SEND", "START", "STOP", "RESTART", "RESET", "INTERRUPT") and \
            getattr(msg, "to", getattr(msg, "slot", None)) in SLOTS:
        return "unsafe"
    if msg.kind == "PUBLISH" and (msg.to in SLOTS or msg.to.strip() == "idle" or ":" in msg.to):
        return "unsafe"  # a selector that may match a slot would type a task into it
    return "answer"


def test_fuzzed_frames_router_stays_up_and_answers(make_fleet, monkeypatch):
    fe = make_fleet(ROSTER)
    monkeypatch.chdir(fe.home)
    fe.up()
    pid = procs.router_pid(fe.paths)
    assert pid is not None
    r = fe.send("a", "before the storm", verify=True)
    assert r.result == "accepted", r
    before = health(fe)["dropped_frames"]
    pane_before = settled_screen(fe, "reply #1")

    frames = [f for f in fuzz_frames(seed=4, n=3000) if classify(f) != "unsafe"]
    kinds = [classify(f) for f in frames]
    expected_drops = kinds.count("drop")
    assert len(frames) >= 2900 and expected_drops >= 1500 and kinds.count("answer") >= 50, \
        (len(frames), expected_drops, kinds.count("answer"))
    oversize = [(os.urandom(P.MAX_FRAME_BYTES + 1),), (b"\x81\xa1v\x01" + b"\xc0" * P.MAX_FRAME_BYTES,)]

    d = Dealer(fe)
    try:
        for parts in frames:
            d.send(*parts)
    finally:
        d.close()
    d = Dealer(fe)  # oversized frames on their own socket (a size cap may disconnect the peer)
    try:
        for parts in oversize:
            d.send(*parts)
    finally:
        d.close()

    # the router read every frame: each bad one dropped and counted, and it still answers
    wait_for(lambda: health(fe)["dropped_frames"] >= before + expected_drops, timeout=120,
             what=f"{expected_drops} dropped frames counted")
    after = health(fe)
    assert before + expected_drops <= after["dropped_frames"] <= before + expected_drops + len(oversize), after
    assert after["pid"] == pid and procs.router_pid(fe.paths) == pid and psutil.pid_exists(pid)
    assert screen(fe) == pane_before, "a fuzzed frame reached the pane"
    r = fe.send("a", "after the storm", verify=True)
    assert (r.result, r.evidence) == ("accepted", "runtime-ack"), r
    wait_for(lambda: "after the storm" in screen(fe), what="the real message on the pane")
    log = fe.paths.router_log.read_text(errors="replace")
    assert "handler failed" not in log and "failed\nTraceback" not in log, "a fuzzed frame broke a handler"


# --- hostile message bodies -------------------------------------------------------------------------

HOSTILE_BODIES = {
    "bracketed-paste end": ("run this\x1b[201~rm -rf ~\n", "ESC character U+001B"),
    "bracketed-paste start": ("\x1b[200~x", "ESC character U+001B at offset 0"),
    "CSI clear screen": ("hi \x1b[2J", "ESC"),
    "OSC title + clipboard": ("\x1b]0;pwned\x07\x1b]52;c;cHduZWQ=\x07", "ESC"),
    "DCS": ("x\x1bP+q544e\x1b\\", "ESC character U+001B at offset 1"),
    "NUL": ("a\x00b", "NUL character U+0000 at offset 1"),
    "BEL": ("ding\x07", "BEL"),
    "BS": ("abc\x08\x08\x08xyz", "BS character U+0008 at offset 3"),
    "bare CR": ("first\rsecond", "CR character U+000D at offset 5"),
    "DEL": ("x\x7f", "DEL"),
    "8-bit CSI": ("\x9b201~", "CSI character U+009B"),
    "8-bit OSC": ("\x9d0;t\x9c", "OSC character U+009D"),
    "8-bit DCS": ("\x90q\x9c", "DCS character U+0090"),
    "NEL": ("a\x85b", "NEL character U+0085"),
    "empty": ("  \n\t ", "empty message body"),
    "oversized": ("é" * 2049, "body is 4098 bytes; the limit is 4096 bytes (bus.max_body_bytes)"),
}


def test_hostile_bodies_are_refused_and_nothing_reaches_the_pane(make_fleet, tmp_path, monkeypatch):
    fe = make_fleet(ROSTER)
    monkeypatch.chdir(fe.home)
    fe.up()
    r = fe.send("a", "warm up", verify=True)
    assert r.result == "accepted", r
    pane = settled_screen(fe, "reply #1")

    # through the Client API: a `rejected` result naming the character and where it is
    for name, (body, needle) in HOSTILE_BODIES.items():
        r = fe.send("a", body, verify=True)
        assert (r.result, r.code) == ("rejected", "invalid-body"), (name, r)
        assert needle in r.detail, (name, r.detail)

    # through the CLI: -m, -f and stdin; exit 3 and the router's reason
    for name, (body, needle) in HOSTILE_BODIES.items():
        if "\x00" not in body:  # argv cannot carry NUL
            p = fe.cli("send", "a", "-m", body, "--json")
            assert p.returncode == 3, (name, p.stdout, p.stderr)
            out = json.loads(p.stdout)
            assert out["code"] == "invalid-body" and needle in out["detail"], (name, out)
        f = tmp_path / "body.txt"
        f.write_bytes(body.encode())
        p = fe.cli("send", "a", "-f", str(f))
        assert p.returncode == 3 and "rejected [invalid-body]" in p.stdout and needle in p.stdout, (name, p.stdout)
        p = subprocess.run([sys.executable, "-m", "fleetbus", "--roster", str(fe.roster), "send", "a"],
                           input=body.encode(), env=fe.env, capture_output=True, timeout=60)
        assert p.returncode == 3 and needle.encode() in p.stdout, (name, p.stdout, p.stderr)

    # not UTF-8: refused by the CLI before anything is sent, naming the byte
    bad = b"caf\xe9 \xff\xfe"
    p = subprocess.run([sys.executable, "-m", "fleetbus", "--roster", str(fe.roster), "send", "a", "-m", bad],
                       env=fe.env, capture_output=True, timeout=60)
    assert p.returncode == 3 and b"not UTF-8 (byte 0xE9 at offset 3" in p.stderr, p.stderr
    f = tmp_path / "latin1.txt"
    f.write_bytes(bad)
    p = fe.cli("send", "a", "-f", str(f))
    assert p.returncode == 3 and "not UTF-8" in p.stderr and "nothing was sent" in p.stderr, p.stderr
    p = subprocess.run([sys.executable, "-m", "fleetbus", "--roster", str(fe.roster), "send", "a"],
                       input=bad, env=fe.env, capture_output=True, timeout=60)
    assert p.returncode == 3 and b"not UTF-8" in p.stderr, p.stderr
    # input larger than any roster allows: refused without reading it all
    p = subprocess.run([sys.executable, "-m", "fleetbus", "--roster", str(fe.roster), "send", "a"],
                       input=b"x" * (3 * 1024 * 1024), env=fe.env, capture_output=True, timeout=60)
    assert p.returncode == 3 and b"over 2097152 bytes" in p.stderr, p.stderr
    # unreadable input is a usage error (exit 2)
    p = fe.cli("send", "a", "-f", str(tmp_path / "missing.txt"))
    assert p.returncode == 2 and "cannot read message" in p.stderr, p.stderr
    p = fe.cli("send", "a", "-f", str(tmp_path))
    assert p.returncode == 2 and "cannot read message" in p.stderr, p.stderr
    # the sender is typed into the message tag: control characters there are refused too
    p = fe.cli("send", "a", "-m", "hello", "--from", "ops\x1b[201~\x1b]0;x\x07")
    assert p.returncode == 2 and "--from" in p.stderr and "nothing was sent" in p.stderr, p.stderr
    for bad_timeout in ("-1", "nan", "inf", "1e12"):
        p = fe.cli("send", "a", "-m", "hello", "--verify", "--timeout", bad_timeout)
        assert p.returncode == 2 and "--timeout" in p.stderr, (bad_timeout, p.stderr)

    # raw frames the Client would never build: bin body, invalid UTF-8, NaN timeout, sender
    # with escapes. Each is dropped (and counted) before it gets near the pane.
    before = health(fe)["dropped_frames"]
    raw = [{"body": b"bin is not a str"}, {"body": RawStr(b"caf\xe9")}, {"timeout_s": math.nan},
           {"sender": "x\x1b[201~y"}, {"to": RawStr(b"a\xff")}, {"body": "ok", "verify": 1}]
    d = Dealer(fe)
    try:
        for i, fields in enumerate(raw):
            d.send(pack({"v": 1, "kind": "SEND", "req": f"raw{i}", "to": "a", "body": "hello", **fields}))
    finally:
        d.close()
    wait_for(lambda: health(fe)["dropped_frames"] >= before + len(raw), what="raw SEND frames dropped")

    assert screen(fe) == pane, "a refused body reached the pane"
    # the pane comparison can fail: a valid message does change it
    r = fe.send("a", "still listening", verify=True)
    assert r.result == "accepted", r
    wait_for(lambda: screen(fe) != pane and "still listening" in screen(fe), what="the valid message")


# --- roster values never meet a shell or a tmux parser -----------------------------------------------

RECORD = ("import json, os, sys, time\n"
          "json.dump({'argv': sys.argv[1:], 'cwd': os.getcwd(),\n"
          "           'env': {k: v for k, v in os.environ.items() if k.startswith('X_')}},\n"
          "          open(os.environ['OUT'] + '.tmp', 'w'))\n"
          "os.replace(os.environ['OUT'] + '.tmp', os.environ['OUT'])\n"
          "time.sleep(3600)\n")
#: shell and tmux syntax that must stay text: command substitution, backticks, separators, quotes,
#: tmux formats (``#(cmd)`` runs a shell command), a trailing ``;`` (ends a tmux command)
NASTY = ["$(touch PWN_dollar)", "`touch PWN_tick`", "x; touch PWN_semi", "x;", ";", "\\;", "#(touch PWN_fmt)",
         "#{session_name}", "-e", "--", "${HOME}", "*", "~", "a&&touch PWN_and", "|touch PWN_pipe", ">PWN_redir"]
QUOTES = ["it's", 'say "hi"', "two\nlines", "tab\there"]  # these force the forked tmux client


def _roster_text(agents: list[dict]) -> str:
    return yaml.safe_dump({"version": 1, "tenant": "qx", "transport": {"kind": "tmux", "socket": "qx"},
                           "bus": {"heartbeat_ms": 200, "liveness": 3}, "agents": agents})


def test_roster_values_reach_the_runtime_literally(make_fleet, tmp_path, monkeypatch):
    work = Path(tmp_path) / "w"
    work.mkdir()
    wd_plain = work / "wd #(touch PWN_wd) $(touch PWN_wd2) `touch PWN_wd3` #{pane_id};"
    wd_quote = work / "it's a dir;"
    for d in (wd_plain, wd_quote):
        d.mkdir()
    out = work / "out"
    env_plain = {f"X_{i}": v for i, v in enumerate(NASTY)}
    env_quote = {**env_plain, **{f"X_Q{i}": v for i, v in enumerate(QUOTES)}}
    agents = [
        # no quote or newline anywhere: a restart goes through the control-mode client
        {"name": "q", "runtime": "shell", "workdir": str(wd_plain), "env": {**env_plain, "OUT": f"{out}-q"},
         "command": [sys.executable, "-c", RECORD, *NASTY]},
        # quotes and newlines: the forked client carries them
        {"name": "q.2", "runtime": "shell", "workdir": str(wd_quote), "env": {**env_quote, "OUT": f"{out}-q2"},
         "command": [sys.executable, "-c", RECORD, *NASTY, *QUOTES]},
    ]
    fe = make_fleet(_roster_text(agents))
    monkeypatch.chdir(work)  # where a leaked `touch` would land (the router's and tmux's cwd)
    fe.up()

    def check(slot: str, path: Path, wd: Path, env: dict, argv: list[str]) -> None:
        wait_for(path.exists, timeout=30, what=f"{slot} recorded its argv")
        got = json.loads(path.read_text())
        assert got["argv"] == argv, got["argv"]
        assert got["env"] == env, got["env"]
        assert got["cwd"] == str(wd), got["cwd"]

    check("q", Path(f"{out}-q"), wd_plain, env_plain, NASTY)
    check("q.2", Path(f"{out}-q2"), wd_quote, env_quote, NASTY + QUOTES)
    # restart (respawn-pane): the same values again, through both tmux carriers
    for slot, suffix in (("q", "-q"), ("q.2", "-q2")):
        Path(f"{out}{suffix}").unlink()
        p = fe.cli("restart", slot)
        assert p.returncode == 0, p.stdout + p.stderr
    check("q", Path(f"{out}-q"), wd_plain, env_plain, NASTY)
    check("q.2", Path(f"{out}-q2"), wd_quote, env_quote, NASTY + QUOTES)

    leaked = [str(p) for base in (work, fe.home) for p in base.rglob("PWN*")]
    leaked += [str(p) for p in Path("/tmp").glob("PWN*")]
    assert leaked == [], f"a roster value was run as a command: {leaked}"


def test_forked_client_arguments_keep_trailing_semicolons():
    """tmux ends a command at any argv element ending in ``;``; a value is escaped so tmux
    gives it back unchanged (the trailing-``;`` rule of cmd_parse_from_arguments)."""
    vals = ["x;", ";", "\\;", "a\\\\;", "plain", "semi;colon", ";lead"]
    esc = T._argv([T._Value(v) for v in vals] + [";", "x;"])
    assert esc[-2:] == [";", "x;"], "tmux syntax (not a _Value) passes unchanged"

    def tmux_unescape(arg: str) -> str:  # cmd_parse_from_arguments, for one argument
        if arg.endswith(";"):
            arg = arg[:-1]
            assert arg.endswith("\\"), "would end the command"
            return arg[:-1] + ";"
        return arg

    assert [tmux_unescape(a) for a in esc[:-2]] == vals
    assert T._no_formats("a#(b)#{c}##") == "a##(b)##{c}####"


# --- names that are not allowed ----------------------------------------------------------------------

BAD_NAMES = ["a;b", "=x", "../x", "-x", "a:b", "x:0.0", "a/b", "$(touch x)", "`x`", "a b", "a'b", "A", "a\nb",
             "_holder", ".x", "x" * (MAX_NAME + 1), "", "#{pane_id}", "é", "a\x1b[2J"]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_bad_slot_names_give_a_roster_error_with_file_and_path(tmp_path, name):
    f = tmp_path / "fleet.yaml"
    f.write_text(yaml.safe_dump({"version": 1, "agents": [{"name": "ok"}, {"name": name}]}))
    with pytest.raises(RosterError) as ei:
        load_roster(f)
    msg = str(ei.value)
    assert msg.startswith(f"{f}: agents[1].name: names match [a-z0-9][a-z0-9._-]*"), msg
    assert repr(name)[:40] in msg and "\x1b" not in msg


@pytest.mark.parametrize("field", ["tenant", "socket"])
@pytest.mark.parametrize("name", ["a;b", "-x", "../x", "x:1"])
def test_bad_tenant_and_socket_names(tmp_path, field, name):
    data = {"version": 1, "agents": [{"name": "ok"}]}
    if field == "tenant":
        data["tenant"] = name
    else:
        data["transport"] = {"kind": "tmux", "socket": name}
    f = tmp_path / "fleet.yaml"
    f.write_text(yaml.safe_dump(data))
    with pytest.raises(RosterError, match=rf"{f}: (tenant|transport\.socket): names match"):
        load_roster(f)


@pytest.mark.parametrize(("agent", "where"), [
    ({"name": "a", "env": {"X": "a\x00b"}}, "agents[0].env: the value of X contains a NUL"),
    ({"name": "a", "command": ["python3", "-c", "x\x00"]}, "agents[0].command[2]: contains a NUL"),
    ({"name": "a", "workdir": "/tmp/\x00"}, "agents[0].workdir: contains a NUL"),
    ({"name": "a", "env": {"BAD-NAME": "1"}}, "agents[0].env: environment variable names"),
    ({"name": "a", "env": {"X; touch y": "1"}}, "agents[0].env: environment variable names"),
])
def test_values_no_process_can_take_are_roster_errors(tmp_path, agent, where):
    f = tmp_path / "fleet.yaml"
    f.write_text(yaml.safe_dump({"version": 1, "agents": [agent]}))
    with pytest.raises(RosterError) as ei:
        load_roster(f)
    assert str(ei.value).startswith(f"{f}: {where}"), str(ei.value)


def test_dotted_slot_names_map_to_distinct_tmux_sessions():
    assert T.session_name("a.b") == "a,b" and T.target("a.b") == "=a,b:0.0"
    assert T.slot_name("a,b") == "a.b" and T.slot_name("_holder") is None
    assert T.session_name("a_b") != T.session_name("a.b")
