"""A runtime dir nobody can plant, hook sockets with two walls, files 0600 (issue 13, items 2 and 6).

Planting tests never touch the machine's shared ``/tmp/fleetbus-<uid>`` (every fleet here uses
it): they unset ``FLEETBUS_HOME`` and point ``XDG_RUNTIME_DIR``/``XDG_STATE_HOME`` into their own
temporary folder, then plant ``$XDG_RUNTIME_DIR/fleetbus`` (the same code path as the ``/tmp``
fallback, which a unit test covers with :data:`fleetbus.paths.TMP_BASE` pointed elsewhere).
Tests that act as another user (uid 65534) need root and are skipped otherwise.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
import pytest
import zmq

from fleetbus import ops
from fleetbus import paths as paths_mod
from fleetbus.agents.hook import hook_frame, send_hook
from fleetbus.client import Client
from fleetbus.config import load_roster
from fleetbus.paths import PathError, fleet_paths
from fleetbus.router import procs
from fleetbus.router.journal import Journal
from fleetbus.safepath import atomic_write, hook_socket_problem, open_private_file
from fleetbus.transports.tmux import TmuxTransport

from conftest import needs_tmux, wait_for

NOBODY = 65534
ROOT = os.geteuid() == 0
root_only = pytest.mark.skipif(not ROOT, reason="acting as another uid (65534) needs root")
#: symlink: to the attacker's own dir; symlink-ours: to a dir of the victim's (which a pre-fix
#: ``fleet up`` chmodded and used); foreign: a dir owned by uid 65534; open: a 0777 dir of ours
#: holding the attacker's files
KINDS = ["symlink-ours", "symlink", "foreign", "open"]
SECRET = "secret-body-7f3a"


def mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def _chown_tree(root: Path, uid: int) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            os.lchown(os.path.join(dirpath, name), uid, uid)
    os.lchown(root, uid, uid)


class Plant:
    """A fleet whose runtime parent ``$XDG_RUNTIME_DIR/fleetbus`` was made first by an attacker
    (``kind``, see :data:`KINDS`). In it, a fake router (ROUTER socket + the lock held) and a
    fake hook socket record whatever reaches them."""

    def __init__(self, base: Path, kind: str):
        self.base, self.kind = base, kind
        self.roster = base / "fleet.yaml"
        self.fleet = load_roster(self.roster)
        self.paths = fleet_paths(self.fleet.tenant, self.fleet.roster.transport.socket)
        parent = self.paths.run_dir.parent  # $XDG_RUNTIME_DIR/fleetbus
        self.parent = parent
        attacker_uid = NOBODY if ROOT else os.getuid()
        if kind.startswith("symlink"):
            self.target = base / f"target-{kind}"
            self.target.mkdir(mode=0o755)
            os.chmod(self.target, 0o755)
            os.symlink(self.target, parent)
            where = self.target
        elif kind == "foreign":
            parent.mkdir(mode=0o755)
            os.chmod(parent, 0o755)
            self.target = where = parent
        else:
            parent.mkdir()
            os.chmod(parent, 0o777)
            self.target = where = parent
        run = where / self.paths.run_dir.name
        (run / "h").mkdir(parents=True)
        os.chmod(run, 0o777)
        os.chmod(run / "h", 0o777)
        self.lockfd = os.open(run / "router.lock", os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.lockfd, fcntl.LOCK_EX)  # "a router is running"
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.bind(f"ipc://{run / 'router.sock'}")
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.bind(f"ipc://{run / 'events.sock'}")
        self.hook = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.hook.bind(str(run / "h" / "a.sock"))
        self.hook.setblocking(False)
        if kind == "symlink":
            _chown_tree(self.target, attacker_uid)
        elif kind == "symlink-ours":
            _chown_tree(run, attacker_uid)  # the attacker's files in a dir of the victim's
        elif kind == "foreign":
            _chown_tree(parent, attacker_uid)
        else:
            _chown_tree(run, attacker_uid)  # the attacker's files inside our open dir
        self.target_mode = mode(self.target)
        self.closed = False

    def frames(self) -> list[bytes]:
        """Everything the fake router has received so far."""
        out: list[bytes] = []
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and self.router.poll(200):
            out.extend(self.router.recv_multipart())
        return out

    def datagrams(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.hook.recv(65536))
            except BlockingIOError:
                return out

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.router.close(0)
        self.pub.close(0)
        self.ctx.term()
        self.hook.close()
        os.close(self.lockfd)
        if self.kind.startswith("symlink"):
            os.unlink(self.parent)
            shutil.rmtree(self.target, ignore_errors=True)
        else:
            shutil.rmtree(self.parent, ignore_errors=True)

    def assert_untouched(self) -> None:
        assert mode(self.target) == self.target_mode, f"{self.target} was chmodded through the plant"
        if self.kind.startswith("symlink"):
            assert os.path.islink(self.parent), "the planted link was replaced"


@pytest.fixture
def planted(monkeypatch):
    """Factory: ``planted(kind)`` -> :class:`Plant` in a private XDG environment (no
    ``FLEETBUS_HOME``); at teardown anything a (pre-fix) fleetbus started there is stopped."""
    base = Path(tempfile.mkdtemp(prefix="fbp-", dir="/tmp"))
    for sub in ("run", "state", "tmux", "config"):
        (base / sub).mkdir(mode=0o700)
    monkeypatch.delenv("FLEETBUS_HOME", raising=False)
    monkeypatch.delenv("TMUX", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(base / "run"))
    monkeypatch.setenv("XDG_STATE_HOME", str(base / "state"))
    monkeypatch.setenv("TMUX_TMPDIR", str(base / "tmux"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(base / "config"))
    (base / "fleet.yaml").write_text("version: 1\ntenant: pt\ntransport: {kind: tmux, socket: pt}\n"
                                     "bus: {heartbeat_ms: 200, liveness: 3}\nagents:\n  - {name: a, runtime: stub}\n")
    made: list[Plant] = []

    def factory(kind: str) -> Plant:
        if kind == "foreign" and not ROOT:
            pytest.skip("planting a directory owned by uid 65534 needs root")
        p = Plant(base, kind)
        made.append(p)
        return p

    yield factory

    for p in made:
        p.close()
    paths = fleet_paths("pt", "pt")
    for pid in [procs.router_pid(paths), procs.sidecar_pid(paths, "a")]:  # only a pre-fix fleetbus starts them
        if pid is not None:
            procs.stop_pid(pid)
    tmux = TmuxTransport(paths.tmux_socket)
    if Path(tmux.socket_path()).exists():
        subprocess.run(["tmux", "-L", paths.tmux_socket, "kill-server"], capture_output=True)
    shutil.rmtree(base, ignore_errors=True)


def fleet_cli(*args: str, input: str | None = None, env: dict | None = None, timeout: float = 30,
              roster: Path | None = None) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "fleetbus", *(["--roster", str(roster)] if roster else []), *args]
    try:
        return subprocess.run(argv, input=input, env=env or dict(os.environ), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:  # subprocess.run killed it
        pytest.fail(f"`fleet {' '.join(args)}` did not refuse: still running after {timeout:g} s "
                    f"(stderr: {e.stderr!r})")


def assert_refused(p: subprocess.CompletedProcess, plant: Plant) -> None:
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert f"refusing {plant.parent}" in p.stderr, p.stderr


# -- every process refuses a planted runtime parent --------------------------------------------------


def test_fleet_up_refuses_a_planted_runtime_dir_and_chmods_nothing(planted):
    for kind in KINDS:
        if kind == "foreign" and not ROOT:
            continue
        plant = planted(kind)
        p = fleet_cli("up", "--timeout", "10", roster=plant.roster)
        plant.assert_untouched()
        assert_refused(p, plant)
        assert {"symlink": "symbolic link", "symlink-ours": "symbolic link", "foreign": f"owned by uid {NOBODY}",
                "open": "mode 0777 lets others write"}[kind] in p.stderr, p.stderr
        assert "rm" in p.stderr, "the message gives the fix"
        plant.assert_untouched()
        assert procs.router_pid(plant.paths) is None, "no router was started"
        with pytest.raises(PathError, match="refusing"):
            ops.up(plant.fleet, plant.paths, timeout_s=5)
        plant.assert_untouched()
        plant.close()


def test_router_and_sidecar_refuse_a_planted_runtime_dir(planted):
    for kind in KINDS:
        if kind == "foreign" and not ROOT:
            continue
        plant = planted(kind)
        for args in (["router"], ["sidecar", "a"]):
            p = fleet_cli(*args, roster=plant.roster, timeout=30)
            plant.assert_untouched()
            assert_refused(p, plant)
        assert plant.frames() == [], "nothing reached the fake router"
        plant.close()


def test_send_and_ps_refuse_a_planted_runtime_dir_and_the_fake_router_gets_nothing(planted):
    for kind in KINDS:
        if kind == "foreign" and not ROOT:
            continue
        plant = planted(kind)
        p = fleet_cli("send", "a", "-m", SECRET, "--timeout", "3", roster=plant.roster, timeout=30)
        assert_refused(p, plant)
        p = fleet_cli("ps", roster=plant.roster)
        assert_refused(p, plant)
        with pytest.raises(PathError, match="refusing"):
            ops.ps(plant.fleet, plant.paths)
        frames = plant.frames()
        assert not any(SECRET.encode() in f for f in frames) and frames == [], frames
        plant.assert_untouched()
        plant.close()


def test_client_refuses_a_planted_runtime_dir(planted):
    for kind in KINDS:
        if kind == "foreign" and not ROOT:
            continue
        plant = planted(kind)

        async def main():
            with anyio.move_on_after(5):
                async with Client(plant.fleet, plant.paths, connect_timeout_s=2) as c:
                    await c.send("a", SECRET, verify=False, timeout_s=2)

        with pytest.raises(PathError, match=f"refusing {plant.parent}"):
            anyio.run(main, backend="asyncio")
        # by endpoint too (no roster): the socket's own directory is checked
        sock = plant.target / plant.paths.run_dir.name / "router.sock"

        async def by_endpoint():
            with anyio.move_on_after(5):
                async with Client(endpoint=f"ipc://{sock}", connect_timeout_s=2) as c:
                    await c.send("a", SECRET, verify=False, timeout_s=2)

        with pytest.raises(PathError, match="refusing"):
            anyio.run(by_endpoint, backend="asyncio")
        assert plant.frames() == []
        plant.close()


def test_fleet_hook_refuses_a_planted_hook_socket(planted):
    for kind in KINDS:
        if kind == "foreign" and not ROOT:
            continue
        plant = planted(kind)
        env = {**os.environ, "FLEETBUS_HOOK_SOCKET": str(plant.paths.hook_socket("a")), "FLEETBUS_SLOT": "a"}
        payload = json.dumps({"prompt": f"[fleet#0123456789ab ops -> a] {SECRET}", "session_id": "s"})
        p = fleet_cli("hook", "prompt-submit", input=payload, env=env)
        assert p.returncode == 0 and p.stdout == "", p  # a hook never fails its runtime
        assert "refusing hook socket" in p.stderr and str(plant.parent) in p.stderr, p.stderr
        assert plant.datagrams() == [], "the prompt reached the planted socket"
        spool = plant.target / plant.paths.run_dir.name / "h" / "a.spool"
        assert not spool.exists(), "nothing is spooled into a planted dir"
        plant.close()


@pytest.fixture
def short_tmp():
    d = Path(tempfile.mkdtemp(prefix="f", dir="/tmp"))  # socket paths must stay under 107 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_tmp_fallback_is_checked_like_xdg_runtime_dir(short_tmp, monkeypatch):
    """The ``/tmp/fleetbus-<uid>`` fallback (no XDG_RUNTIME_DIR, and always under FLEETBUS_HOME),
    with its base pointed away from the real /tmp."""
    tmp_path = tmp = short_tmp
    os.chmod(tmp, 0o1777)  # like /tmp: world-writable and sticky
    monkeypatch.setattr(paths_mod, "TMP_BASE", str(tmp))
    env = {"XDG_STATE_HOME": str(tmp_path / "state")}
    paths = fleet_paths("t", "fleet", env)
    parent = tmp / f"fleetbus-{os.getuid()}"
    assert paths.run_dir == parent / "t" and "XDG_RUNTIME_DIR" in paths.run_hint
    home = fleet_paths("t", "fleet", {"FLEETBUS_HOME": str(tmp_path / "home")})
    assert home.run_dir.parent == parent
    # a symlink to someone's directory: refused, the target keeps its mode, nothing is removed
    target = tmp_path / "theirs"
    (target / "t").mkdir(parents=True)
    os.chmod(target, 0o755)
    os.symlink(target, parent)
    for fn in (paths.ensure, paths.check, paths.check_socket, home.check):
        with pytest.raises(PathError, match=f"refusing {parent}: a symbolic link.*set XDG_RUNTIME_DIR|"
                                             f"refusing {parent}: a symbolic link"):
            fn()
    assert paths.remove_run_dir() is False and (target / "t").is_dir()
    assert mode(target) == 0o755
    os.unlink(parent)
    # a directory others may write to: refused, not chmodded
    parent.mkdir()
    os.chmod(parent, 0o777)
    with pytest.raises(PathError, match="mode 0777 lets others write.*set XDG_RUNTIME_DIR"):
        paths.ensure()
    assert mode(parent) == 0o777
    if ROOT:  # another user's
        os.chmod(parent, 0o700)
        os.chown(parent, NOBODY, NOBODY)
        with pytest.raises(PathError, match=f"owned by uid {NOBODY}"):
            paths.ensure()
        assert paths.remove_run_dir() is False
        os.chown(parent, os.getuid(), os.getgid())
    os.rmdir(parent)
    # a clean start makes the chain 0700 (whatever the umask), and a readable-only one is repaired
    old = os.umask(0)
    try:
        paths.ensure()
    finally:
        os.umask(old)
    for d in (parent, paths.run_dir, paths.run_dir / "h", paths.state_dir, paths.state_dir / "run"):
        assert mode(d) == 0o700, d
    os.chmod(paths.run_dir, 0o755)
    paths.ensure()
    assert mode(paths.run_dir) == 0o700
    assert paths.check_socket() is False  # no router: not an error
    assert paths.remove_run_dir() is True and not paths.run_dir.exists()


# -- safepath units ---------------------------------------------------------------------------------


def test_hook_socket_problem_and_file_helpers(tmp_path):
    d = tmp_path / "h"
    d.mkdir(mode=0o700)
    path = str(d / "a.sock")
    assert hook_socket_problem(path) is None  # missing: the send fails on its own
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    try:
        assert hook_socket_problem(path) is None
        os.chmod(d, 0o777)
        assert "others may write" in hook_socket_problem(path)
        assert send_hook("turn-end", path=path) is False
        os.chmod(d, 0o700)
        link = str(d / "l.sock")
        os.symlink(path, link)
        assert "symlink" in hook_socket_problem(link)
        got: list[str] = []
        assert send_hook("turn-end", path=link, on_refused=got.append) is False and "symlink" in got[0]
    finally:
        s.close()
    # files: 0600 whatever the umask, never through a link
    old = os.umask(0)
    try:
        atomic_write(tmp_path / "f.hb", "x")
        fd = open_private_file(tmp_path / "f.log", os.O_WRONLY | os.O_APPEND)
        os.close(fd)
    finally:
        os.umask(old)
    assert mode(tmp_path / "f.hb") == 0o600 and mode(tmp_path / "f.log") == 0o600
    os.symlink(tmp_path / "f.hb", tmp_path / "l.log")
    with pytest.raises(OSError):
        open_private_file(tmp_path / "l.log", os.O_WRONLY | os.O_APPEND)
    assert not list(tmp_path.glob(".*.tmp")), "no temporary file left"


# -- hook sockets: the second wall (peer uid) -------------------------------------------------------

def _forge_as_nobody(run_dir: Path, frame: bytes, line: bytes) -> dict:
    """Fork a child that becomes uid/gid 65534, sends ``frame`` to the slot's hook datagram socket
    and ``line`` on its hook stream socket (by paths relative to the runtime dir, so only that
    dir's and h/'s modes matter), and reports what happened."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        out: dict = {}
        try:
            os.close(rfd)
            os.chdir(run_dir)
            try:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            except OSError as e:
                out["cannot_switch_uid"] = repr(e)
                raise SystemExit
            out["uid"] = os.getuid()
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                    s.sendto(frame, "h/a.sock")
                out["datagram"] = "sent"
            except OSError as e:
                out["datagram"] = repr(e)
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.settimeout(10)
                    s.connect("h/a.jsonl")
                    out["stream"] = "connected"
                    try:
                        s.sendall(line)
                        out["closed_by_sidecar"] = s.recv(1) == b""
                    except (ConnectionResetError, BrokenPipeError):  # closed before or after our line
                        out["closed_by_sidecar"] = True
                    except OSError:
                        out["closed_by_sidecar"] = False
            except OSError as e:
                out.setdefault("stream", repr(e))
        except BaseException as e:  # noqa: BLE001 - report and leave
            out.setdefault("error", repr(e))
        finally:
            os.write(wfd, json.dumps(out).encode())
            os._exit(0)
    os.close(wfd)
    with os.fdopen(rfd) as r:
        report = json.loads(r.read() or "{}")
    os.waitpid(pid, 0)
    return report


def sidecar_log(fe) -> str:
    try:
        return fe.paths.sidecar_log("a").read_text(errors="replace")
    except OSError:
        return ""


@root_only
@needs_tmux
def test_mode_mistake_on_the_slot_dir_is_not_a_forged_ack(make_fleet):
    fe = make_fleet("version: 1\ntenant: mm\ntransport: {kind: tmux, socket: mm}\n"
                    "bus: {heartbeat_ms: 200, liveness: 3, verify_timeout_s: 8}\nagents:\n"
                    '  - {name: a, runtime: stub, command: [fleet-stub, --think-ms, "120000"]}\n')
    fe.up()
    assert fe.send("a", "first", verify=True).result == "accepted"
    wait_for(lambda: fe.ps()["a"].state == "busy", what="stub busy")
    # typed while the stub is busy: it sits in the stub's queue (runtime-ack "queued") for 2 min
    second = fe.send("a", "second", verify=True, timeout_s=10)
    assert (second.result, second.evidence) == ("queued", "runtime-ack"), second
    prompt = f"[fleet#{second.id} ops -> a] second"
    frame = hook_frame("prompt-submit", prompt=prompt, slot="a", runtime="stub")
    line = json.dumps({"event": "prompt-submit", "prompt": prompt}) + "\n"

    def state() -> str:
        j = Journal(fe.paths.journal, readonly=True)
        try:
            return j.get(second.id).state
        finally:
            j.close()

    run, h = fe.paths.run_dir, fe.paths.run_dir / "h"
    socks = (fe.paths.hook_socket("a"), fe.paths.hook_stream("a"))
    # the mode mistake: every file-system wall is down (the dirs, and the 0600 sockets themselves)
    for p in (run, h, *socks):
        os.chmod(p, 0o777)
    try:
        report = _forge_as_nobody(run, frame, line.encode())
        if "cannot_switch_uid" in report:
            pytest.skip(f"cannot run a process as uid {NOBODY} here: {report['cannot_switch_uid']}")
        assert report["datagram"] == "sent" and report["stream"] == "connected", report  # the wall was down
        assert report["closed_by_sidecar"], report
        for what in ("datagram", "stream connection"):
            wait_for(lambda: f"refused hook {what} from uid {NOBODY}" in sidecar_log(fe),
                     what=f"the sidecar's refusal of the forged {what}")
        time.sleep(1.0)  # a (wrong) ack would have reached the router by now
        assert state() != "accepted", "a forged hook from another uid acknowledged the message"
        # our own `fleet hook` refuses to write into the loosened dir, and says why
        env = {**fe.env, "FLEETBUS_HOOK_SOCKET": str(fe.paths.hook_socket("a"))}
        p = subprocess.run([sys.executable, "-m", "fleetbus", "hook", "prompt-submit"], input=json.dumps(
            {"prompt": prompt}), env=env, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0 and "others may write" in p.stderr and str(h) in p.stderr, p
        assert state() != "accepted"
        # the second wall filters by uid: the same datagram from our own uid is taken
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(frame, str(fe.paths.hook_socket("a")))
        wait_for(lambda: state() == "accepted", what="our own uid's hook accepted")
    finally:
        for p in socks:
            os.chmod(p, 0o600)
        os.chmod(h, 0o700)
        os.chmod(run, 0o700)
    log = sidecar_log(fe)
    assert log.count(f"refused hook datagram from uid {NOBODY}") == 1, "logged once per uid"


# -- files 0600 whatever the umask ------------------------------------------------------------------


@needs_tmux
def test_files_are_0600_with_umask_000(make_fleet):
    fe = make_fleet("version: 1\ntenant: um\ntransport: {kind: tmux, socket: um}\n"
                    "bus: {heartbeat_ms: 200, liveness: 3, verify_timeout_s: 8}\nagents:\n  - {name: a, runtime: stub}\n")
    p = subprocess.run([sys.executable, "-m", "fleetbus", "--roster", str(fe.roster), "up", "--timeout", "30"],
                       env=fe.env, capture_output=True, text=True, timeout=90, umask=0)
    assert p.returncode == 0, p
    assert fe.send("a", "hello", verify=True).result == "accepted"
    paths = fe.paths
    files = [paths.router_log, paths.sidecar_log("a"), paths.ack_log("a"), paths.router_pidfile,
             paths.sidecar_pidfile("a"), paths.heartbeat_file("a"), paths.router_lock]
    wait_for(lambda: all(f.exists() for f in files), what="router and sidecar files")
    bad = {str(f): oct(mode(f)) for f in files if mode(f) != 0o600}
    assert not bad, bad
    for d in (paths.state_dir, paths.state_dir / "run", paths.state_dir / "logs", paths.run_dir,
              paths.run_dir / "h"):
        assert mode(d) == 0o700, d
    for s in (paths.hook_socket("a"), paths.hook_stream("a")):
        assert mode(s) & 0o077 == 0, s
    assert not [f.name for f in (paths.state_dir / "run").iterdir() if f.name.endswith(".tmp")]


# -- a Client cancelled while it waits leaks nothing -------------------------------------------------

def test_client_cancelled_while_entering_closes_its_socket_and_context(short_tmp):
    # found while testing fake routers: an outer cancel scope interrupting a Client's wait skipped
    # closing its socket and context, and the process could then hang in Context.__del__ (term)
    os.chmod(short_tmp, 0o700)
    sock = short_tmp / "router.sock"
    ctx = zmq.Context()
    fake = ctx.socket(zmq.ROUTER)  # a router that never answers
    fake.setsockopt(zmq.LINGER, 0)
    fake.bind(f"ipc://{sock}")
    client = Client(endpoint=f"ipc://{sock}", connect_timeout_s=30)

    async def main():
        with anyio.move_on_after(0.5):
            async with client:
                pass

    try:
        anyio.run(main, backend="asyncio")
        assert client.sock.closed and client.ctx.closed
    finally:
        if not client.sock.closed:
            client.sock.close(0)
            client.ctx.term()
        fake.close(0)
        ctx.term()
