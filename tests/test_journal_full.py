"""A journal that cannot be written (issue 13, item 4): on a REAL full file system.

The state dir (journal, heartbeat files, ack logs, logs) is put on a small tmpfs mounted for the
test and filled with a file until the kernel answers ENOSPC, so SQLite fails with its own
SQLITE_FULL and the sidecar's writes with ENOSPC; deleting the file gives the space back. Mounting
needs root (CAP_SYS_ADMIN): without it these tests skip and say why. The journal-level rules
(rollback, deferred writes in order) are also checked without a mount, on a read-only connection
(``PRAGMA query_only``: SQLITE_READONLY, another "cannot be written" error).

Before the fix: a full disk during a delivery raised inside the slot worker's failure handler and
ended the router (its task group), a new SEND failed with ``internal``, and the sidecar died on its
heartbeat write.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import anyio
import psutil
import pytest

from fleetbus import protocol as P
from fleetbus.config import parse_roster
from fleetbus.paths import fleet_paths
from fleetbus.router import procs
from fleetbus.router import journal as J
from fleetbus.router.journal import Journal, MessageRecord
from fleetbus.router.server import RequestError, Router
from fleetbus.transports.memory import MemoryPane, MemoryTransport
from tests.conftest import needs_tmux, wait_for


class SmallFs:
    """A mounted tmpfs that a test fills up and frees again."""

    def __init__(self, path: Path):
        self.path = path
        self.filler = path / "filler"

    def fill(self) -> int:
        """Write ``filler`` until the file system is full (ENOSPC). Returns its size."""
        n = 0
        with open(self.filler, "ab", buffering=0) as f:
            for chunk in (1 << 16, 4096, 512, 1):
                while True:
                    try:
                        n += f.write(b"\0" * chunk)
                    except OSError as e:
                        assert e.errno == errno.ENOSPC, e
                        break
        return n

    def free(self) -> None:
        self.filler.unlink()


@pytest.fixture
def small_fs():
    """``mount(path, size)``: a real tmpfs of ``size`` at ``path``. Request it before
    ``make_fleet`` so it is unmounted after the fleet is down."""
    if os.geteuid() != 0:
        pytest.skip("a full file system is made with a small tmpfs, which needs root to mount")
    mounted: list[Path] = []

    def mount(path: Path, size: str = "8m") -> SmallFs:
        path.mkdir(parents=True, exist_ok=True)
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                           capture_output=True, text=True)
        if p.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({p.stderr.strip()}): no real full file system to test on")
        mounted.append(path)
        return SmallFs(path)

    yield mount
    for path in reversed(mounted):
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)  # a test failed with files open
        shutil.rmtree(path, ignore_errors=True)
        try:
            os.removedirs(path.parent)  # the fleet's base dir, emptied by make_fleet's teardown
        except OSError:
            pass


# -- the journal alone --------------------------------------------------------------------------


def test_journal_on_a_full_disk_rolls_back_and_writes_again_when_space_returns(small_fs, tmp_path):
    fs = small_fs(tmp_path / "fs", "2m")
    j = Journal(fs.path / "journal.sqlite3")
    rec, _ = j.add_message(MessageRecord(id="m1", slot="a", sender="ops", body="before"))
    fs.fill()
    with pytest.raises(J.JournalUnavailable) as e:
        for i in range(50):  # the WAL's last page may still have room for a small write
            j.add_message(MessageRecord(id=f"x{i}", slot="a", sender="ops", body="y" * 3000))
    assert e.value.code == "journal-unavailable" and e.value.fs == str(fs.path)
    assert "full" in e.value.error
    assert not j.db.in_transaction, "the failed transaction was left open"
    assert not j.writable and j.health()["ok"] is False and j.health()["fs"] == str(fs.path)
    assert j.set_state(rec, "accepted", result={"result": "accepted"}, defer=True) is False
    assert rec.state == "accepted" and j.health()["deferred"] == 1
    fs.free()
    assert j.probe() and j.writable
    assert j.get("m1").state == "accepted" and j.get("m1").result == {"result": "accepted"}
    rec2, created = j.add_message(MessageRecord(id="m2", slot="a", sender="ops", body="after"))
    assert created and j.get("m2").state == "queued"
    resumed = [h for h in j.history() if h["kind"] == "journal"]
    assert [h["state"] for h in resumed] == ["resumed"] and "full" in resumed[0]["data"]["error"]
    j.close()


def test_deferred_writes_keep_their_order_and_strict_writes_raise(tmp_path):
    """No mount needed: a read-only connection fails every write (SQLITE_READONLY)."""
    j = Journal(tmp_path / "j.sqlite3")
    rec, _ = j.add_message(MessageRecord(id="m1", slot="a", sender="ops", body="x"))
    j.db.execute("PRAGMA query_only=1")
    with pytest.raises(J.JournalUnavailable):
        j.set_state(rec, "typing")
    assert rec.state == "queued", "a write that raised must leave the record as it was"
    assert j.set_state(rec, "draft", defer=True) is False
    assert j.set_state(rec, "accepted", defer=True) is False
    assert j.slot_event("a", "exited", defer=True, status=1) is False
    assert not j.probe()
    j.db.execute("PRAGMA query_only=0")
    assert j.probe()
    assert [c["state"] for c in j.changes_of("m1")] == ["queued", "draft", "accepted"]
    assert j.get("m1").state == "accepted" and j.last_slot_event("a")["event"] == "exited"
    h = j.health()
    assert h["ok"] and h["deferred"] == 0 and h["outages"] == 1
    j.close()


# -- the router on the memory transport, its state dir on a full tmpfs --------------------------


def _router(home: Path) -> Router:
    fleet = parse_roster({"version": 1, "tenant": "mem", "transport": {"kind": "memory"},
                          "bus": {"verify_timeout_s": 2},
                          "agents": [{"name": "s", "runtime": "stub"}]}, base_dir=home)
    t = MemoryTransport()
    t.panes["s"] = MemoryPane(prompt="stub> ", command="python3", pid=777)
    return Router(fleet, fleet_paths("mem", "memfull", env={"FLEETBUS_HOME": str(home)}), transport=t,
                  spawn_sidecars=False)


def _typed(router: Router) -> list[str]:
    return [t.rsplit("] ", 1)[1] for _, t in router.transport.delivered]


async def _until(pred, what: str, timeout: float = 15.0) -> None:
    with anyio.fail_after(timeout):
        while not pred():
            await anyio.sleep(0.02)


def test_full_disk_refuses_new_sends_types_nothing_and_resumes(small_fs, tmp_path):
    fs = small_fs(tmp_path / "home")
    router = _router(fs.path)

    async def main():
        async with router.delivering():
            r = await router.send(P.SendRequest(req="1", to="s", body="before"))
            assert r.result == "accepted" and r.journaled, r
            fs.fill()
            r = await router.send(P.SendRequest(req="2", to="s", body="refused"))
            assert (r.result, r.code, r.journaled, r.id) == ("rejected", "journal-unavailable", False, None), r
            assert f"free disk space on {fs.path}" in r.detail
            r = await router.send(P.SendRequest(req="3", to="nope", body="x"))
            assert (r.result, r.code, r.journaled) == ("rejected", "unknown-slot", False), r
            with pytest.raises(RequestError) as e:
                await router.tasks.publish(P.PublishRequest(req="4", to="s", body="a task"))
            assert e.value.code == "journal-unavailable"
            health = (await router.handle_health())["journal"]
            assert health["ok"] is False and health["fs"] == str(fs.path) and "full" in health["error"]
            rows = await router.handle_ps()
            assert rows[0]["journal"]["ok"] is False
            fs.free()
            await _until(lambda: router.journal.writable, "the journal resumes by itself")
            r = await router.send(P.SendRequest(req="5", to="s", body="after"))
            assert r.result == "accepted" and r.journaled, r
            return r

    r = anyio.run(main, backend="asyncio")
    assert _typed(router) == ["before", "after"], "a refused SEND was typed"
    assert router.journal.get(r.id).state == "accepted"
    assert [h["state"] for h in router.journal.history() if h["kind"] == "journal"] == ["resumed"]
    router.journal.close()


def test_disk_full_while_verifying_keeps_the_result_and_writes_it_later(small_fs, tmp_path):
    fs = small_fs(tmp_path / "home")
    router = _router(fs.path)
    router.transport.panes["s"].on_submit = lambda line: fs.fill()  # the disk fills while it is typed

    async def main():
        async with router.delivering():
            r = await router.send(P.SendRequest(req="1", to="s", body="during"))
            assert (r.result, r.evidence, r.journaled) == ("accepted", "pane-diff", False), r
            assert router.journal.get(r.id).state == "typing", "only the write-ahead state is on disk"
            router.transport.panes["s"].on_submit = None
            nope = await router.send(P.SendRequest(req="2", to="s", body="refused"))
            assert nope.code == "journal-unavailable"
            fs.free()
            await _until(lambda: router.journal.get(r.id).state == "accepted", "the kept result is written")
            return r

    r = anyio.run(main, backend="asyncio")
    assert _typed(router) == ["during"]
    assert [c["state"] for c in router.journal.changes_of(r.id)] == ["queued", "typing", "injected", "accepted"]
    assert router.journal.get(r.id).result["journaled"] is True, "the journal holds the result as written"
    router.journal.close()


def test_a_queued_message_is_not_typed_until_its_typing_state_can_be_journaled(small_fs, tmp_path):
    fs = small_fs(tmp_path / "home")
    router = _router(fs.path)
    pane = router.transport.panes.pop("s")  # the slot is down: the message is held in the journal

    async def main():
        async with router.delivering():
            r = await router.send(P.SendRequest(req="1", to="s", body="held", when="available"))
            assert (r.result, r.held_by, r.code) == ("queued", "fleetbus", "slot-down"), r
            fs.fill()
            router.transport.panes["s"] = pane  # the slot is back, the journal is not
            await _until(lambda: not router.journal.writable, "the worker tried to journal typing")
            await anyio.sleep(1.5)  # three more tries of the worker
            assert _typed(router) == [], "typed without its write-ahead state"
            assert router.journal.get(r.id).state == "queued"
            fs.free()
            await _until(lambda: router.journal.get(r.id).state == "accepted", "typed once the journal is back")

    anyio.run(main, backend="asyncio")
    assert _typed(router) == ["held"]
    router.journal.close()


# -- a real fleet: router, sidecar, stub agent, CLI ----------------------------------------------


def _roster(home: Path) -> str:
    (home / "rec").mkdir(exist_ok=True)
    return ("version: 1\ntenant: t\ntransport: {kind: tmux, socket: jf}\n"
            "bus: {heartbeat_ms: 200, liveness: 5, verify_timeout_s: 10}\n"
            "agents:\n"
            f'  - {{name: a, runtime: stub, command: [fleet-stub, --record, "{home}/rec/a.jsonl"]}}\n')


def _records(fe) -> list[str]:
    path = fe.home / "rec" / "a.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["prompt"].split("] ", 1)[1] for line in path.read_text().splitlines() if line.strip()]


def _alive(pid: int) -> bool:
    """Running (the router is this test's child: once dead it stays a zombie until reaped)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _screen(fe) -> str:
    return fe.tmux_cmd("capture-pane", "-p", "-J", "-S", "-200", "-t", "=a:0.0")


def _cli_json(fe, *args):
    p = fe.cli(*args, "--json")
    return p.returncode, json.loads(p.stdout) if p.stdout.strip() else None, p


@needs_tmux
def test_fleet_on_a_full_disk_stays_up_refuses_sends_and_resumes(small_fs, make_fleet):
    from fleetbus.config import load_roster

    fe = make_fleet("version: 1\nagents: []\n", name="f")
    fe.roster.write_text(_roster(fe.home))
    fe.fleet = load_roster(fe.roster)
    fe.paths = fleet_paths(fe.fleet.tenant, fe.fleet.roster.transport.socket)
    fs = small_fs(fe.home / "state")  # the whole state dir: journal, heartbeats, ack logs, logs
    fe.paths.ensure()
    fe.up()
    rc, out, p = _cli_json(fe, "send", "a", "-m", "before", "--verify")
    assert rc == 0 and out["result"] == "accepted", p.stdout + p.stderr
    router, sidecar = procs.router_pid(fe.paths), procs.sidecar_pid(fe.paths, "a")
    assert router and sidecar
    # a message journaled before the disk fills, held because a human's text sits in the input line
    fe.tmux_cmd("send-keys", "-t", "=a:0.0", "-l", "half typed by a human")
    wait_for(lambda: "half typed by a human" in _screen(fe), what="the human's text")
    rc, held, p = _cli_json(fe, "send", "a", "-m", "held for the slot", "--verify", "--when", "available")
    assert rc == 0 and (held["result"], held["code"]) == ("queued", "busy-input"), p.stdout + p.stderr

    fs.fill()
    rc, out, p = _cli_json(fe, "send", "a", "-m", "refused while full", "--verify")
    assert rc == 3, p.stdout + p.stderr
    assert (out["result"], out["code"], out["journaled"]) == ("rejected", "journal-unavailable", False)
    p = fe.cli("publish", "--to", "a", "-m", "a task while full")
    assert p.returncode == 3 and "journal-unavailable" in p.stderr, p.stdout + p.stderr
    fe.tmux_cmd("send-keys", "-t", "=a:0.0", "C-u")  # the input line is free: the held message is due
    hb = fe.paths.heartbeat_file("a")
    stamp = hb.read_text()
    time.sleep(2.0)  # ten heartbeats of 200 ms (each a failed heartbeat-file write), four tries to type it
    assert hb.read_text() == stamp, "the heartbeat file was still written: the disk is not full"
    assert _alive(router) and procs.router_pid(fe.paths) == router, "the router died"
    assert _alive(sidecar) and procs.sidecar_pid(fe.paths, "a") == sidecar, "the sidecar died"

    text = fe.cli("ps").stdout
    assert "JOURNAL UNAVAILABLE" in text and f"free disk space on {fs.path}" in text, text
    rc, rows, p = _cli_json(fe, "ps")
    assert rc == 0 and rows[0]["journal"]["ok"] is False and rows[0]["journal"]["fs"] == str(fs.path), rows
    assert rows[0]["heartbeat"] == "healthy", "ps falls back to the router's view of the sidecar"
    rc, doc, p = _cli_json(fe, "doctor")
    check = {c["name"]: c for c in doc["checks"]}["journal"]
    assert rc == 1 and check["status"] == "fail" and check["fix"].startswith(f"free disk space on {fs.path}"), doc
    assert "refused while full" not in _screen(fe) and "held for the slot" not in _screen(fe)
    assert _records(fe) == ["before"], "something was typed while the journal could not be written"

    fs.free()
    wait_for(lambda: fe.ps()["a"].journal["ok"], timeout=15, what="the router resumes by itself")
    # the held message goes first; a send during its turn would be queued by the runtime
    wait_for(lambda: _records(fe) == ["before", "held for the slot"], timeout=15, what="the held message delivered")
    wait_for(lambda: fe.ps()["a"].state == "idle", timeout=15, what="its turn ended")
    rc, out, p = _cli_json(fe, "send", "a", "-m", "after", "--verify")
    assert rc == 0 and out["result"] == "accepted" and out["journaled"], p.stdout + p.stderr
    rc, log, p = _cli_json(fe, "log")
    assert any(r["id"] == out["id"] and r["state"] == "accepted" for r in log), log
    assert any(r["id"] == held["id"] and r["state"] == "accepted" for r in log), log
    assert any(r["kind"] == "journal" and r["state"] == "resumed" for r in log), log
    assert _records(fe) == ["before", "held for the slot", "after"]
    rc, doc, p = _cli_json(fe, "doctor")
    assert {c["name"]: c for c in doc["checks"]}["journal"]["status"] == "ok", doc
    wait_for(lambda: hb.read_text() != stamp, timeout=10, what="the sidecar writes its heartbeat file again")
    assert procs.router_pid(fe.paths) == router and procs.sidecar_pid(fe.paths, "a") == sidecar
