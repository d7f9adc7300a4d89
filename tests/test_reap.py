"""fleetbus.reap on plain processes: the process table, the snapshot's roles, and reap's order
(wait, SIGTERM, SIGKILL) that never signals a pid reused by another process."""

from __future__ import annotations

import os
import subprocess

import psutil
from conftest import wait_for

from fleetbus import reap


def _exec_done(proc: subprocess.Popen, argv: list[str]) -> bool:
    try:
        return psutil.Process(proc.pid).cmdline() == argv
    except psutil.Error:
        return False


def test_process_table_reads_ppid_and_session_even_of_an_odd_command_name(tmp_path):
    odd = tmp_path / "we) ird (name"
    odd.symlink_to("/bin/sleep")
    p = subprocess.Popen([str(odd), "30"])
    try:
        wait_for(lambda: psutil.Process(p.pid).name() == odd.name[:15], timeout=10, what="exec")
        table = reap._proc_table()
        assert table[p.pid] == (os.getpid(), os.getsid(0))
        assert table[os.getpid()] == (os.getppid(), os.getsid(0))
    finally:
        p.kill()
        p.wait()


def test_snapshot_records_descendants_and_session_members():
    lead = subprocess.Popen(["sh", "-c", "sleep 631 & exec sleep 632"], start_new_session=True)
    try:
        wait_for(lambda: _exec_done(lead, ["sleep", "632"]) and psutil.Process(lead.pid).children(), timeout=10,
                 what="the child")
        child = psutil.Process(lead.pid).children()[0].pid
        by_pid = {r.pid: r.role for r in reap.snapshot({lead.pid: "lead"})}
        assert by_pid == {lead.pid: "lead", child: "child of lead"}
        # found through the session too (a child whose parent died is no longer a descendant)
        assert {r.pid: r.role for r in reap.snapshot({}, {lead.pid: "pane x"})} == {lead.pid: "child of pane x",
                                                                                  child: "child of pane x"}
        assert os.getpid() not in {r.pid for r in reap.snapshot({os.getpid(): "me"})}, "never the caller"
    finally:
        for p in psutil.Process(lead.pid).children():
            p.kill()
        lead.kill()
        lead.wait()


def test_reap_waits_then_terms_then_kills_and_spares_a_reused_pid():
    quick = subprocess.Popen(["sleep", "0.2"])
    polite = subprocess.Popen(["sleep", "641"])
    stubborn = subprocess.Popen(["sh", "-c", "trap '' TERM; exec sleep 642"])
    bystander = subprocess.Popen(["sleep", "643"])
    try:
        wait_for(lambda: _exec_done(stubborn, ["sleep", "642"]), timeout=10, what="the trap and exec")
        recs = reap.snapshot({quick.pid: "quick", polite.pid: "polite", stubborn.pid: "stubborn"})
        # the bystander holds a pid that an earlier, recorded process had: other start time
        reused = reap.FleetProcess(bystander.pid, psutil.Process(bystander.pid).create_time() - 60, "old", "old")
        assert not reused.alive()
        out = reap.reap([*recs, reused], grace_s=1.5, term_s=1.0)
        assert {(p["role"], p["signal"], p["running"]) for p in out} == {("polite", "SIGTERM", False),
                                                                         ("stubborn", "SIGKILL", False)}, out
        assert bystander.poll() is None, "a reused pid is never signalled"
        assert quick.wait(5) == 0 and polite.wait(5) == -15 and stubborn.wait(5) == -9
        assert reap.reap(recs, grace_s=0) == [], "nothing left: nothing to do"
    finally:
        for p in (quick, polite, stubborn, bystander):
            p.kill()
            p.wait()
