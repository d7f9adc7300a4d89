"""A stand-in for ``systemctl --user`` and ``loginctl`` where no systemd runs (this machine, CI).

It is a :data:`fleetbus.systemd.Runner` and does, for fleetbus's own units, what systemd does:

- ``is-system-running`` answers ``running``; ``daemon-reload`` rereads nothing (units are read
  at ``start``); ``enable``/``disable [--now]`` create/remove the ``<WantedBy>.wants/`` links.
- ``start U...`` runs each inactive unit's ``ExecStart`` (unquoted as systemd does: ``%%``,
  ``$$``, double quotes with backslash escapes) with the unit's ``Environment=``,
  ``UnsetEnvironment=``, ``EnvironmentFile=`` and ``WorkingDirectory=``, in a new session,
  with ``$NOTIFY_SOCKET`` (and ``$WATCHDOG_USEC`` from ``WatchdogSec=``, or :attr:`watchdog_s`)
  set; a ``Type=notify`` unit counts as started at its ``READY=1`` (else ``start`` fails).
- ``stop U...`` sends SIGTERM to the main pid only (``KillMode=process``, which both units use;
  asserted), SIGKILL after ``TimeoutStopSec``.
- ``show --property=MainPID --value U``; ``loginctl enable-linger USER`` creates the linger file.

Every call is recorded in :attr:`calls`; the notify messages of each unit in :attr:`notes`.
``Restart=`` is not emulated (tests check ``fleet holder``'s exit status instead).
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path


def parse_unit(text: str) -> dict[str, list[str]]:
    """``section.Key -> [values...]`` of a unit file (comments and blank lines skipped)."""
    out: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        k, _, v = line.partition("=")
        out.setdefault(f"{section}.{k}", []).append(v)
    return out


def unquote(value: str, exec_line: bool) -> list[str]:
    """Words of a unit setting, as systemd splits them (for the quoting fleetbus writes)."""
    value = value.replace("%%", "\0pct")
    if exec_line:
        value = value.replace("$$", "\0dollar")
    return [w.replace("\0pct", "%").replace("\0dollar", "$") for w in shlex.split(value)]


class FakeSystemd:
    def __init__(self, unit_dir: Path, linger_dir: Path, base_env: dict[str, str]):
        self.unit_dir = unit_dir
        self.linger_dir = linger_dir
        self.base_env = base_env
        self.calls: list[list[str]] = []
        self.notes: dict[str, list[str]] = {}
        self.main: dict[str, subprocess.Popen] = {}
        self.watchdog_s: float | None = None
        self._dir = Path(tempfile.mkdtemp(prefix="fbsd-", dir="/tmp"))

    # -- the Runner ---------------------------------------------------------------------------

    def __call__(self, argv: list[str]) -> subprocess.CompletedProcess:
        self.calls.append(list(argv))
        rc, out, err = 0, "", ""
        if argv[:1] == ["loginctl"] and argv[1] == "enable-linger":
            self.linger_dir.mkdir(parents=True, exist_ok=True)
            (self.linger_dir / argv[2]).touch()
        elif argv[:2] == ["systemctl", "--user"]:
            verb, args = argv[2], argv[3:]
            if verb == "is-system-running":
                out = "running\n"
            elif verb == "daemon-reload":
                pass
            elif verb in ("enable", "disable"):
                units = [a for a in args if not a.startswith("--")]
                if "--now" in args and verb == "disable":
                    self.stop(units)
                for u in units:
                    for target in parse_unit((self.unit_dir / u).read_text()).get("Install.WantedBy", []):
                        link = self.unit_dir / f"{target}.wants" / u
                        if verb == "enable":
                            link.parent.mkdir(parents=True, exist_ok=True)
                            if not link.is_symlink():
                                link.symlink_to(self.unit_dir / u)
                        else:
                            link.unlink(missing_ok=True)
            elif verb == "start":
                for u in args:
                    ok, err = self.start(u)
                    if not ok:
                        rc = 1
                        break
            elif verb == "stop":
                self.stop(args)
            elif verb == "show":
                unit = args[-1]
                p = self.main.get(unit)
                out = f"{p.pid if p is not None and p.poll() is None else 0}\n"
            else:
                rc, err = 1, f"fake systemctl: verb {verb} not emulated"
        else:
            rc, err = 127, f"fake: {argv[0]} not emulated"
        return subprocess.CompletedProcess(argv, rc, out, err)

    # -- units --------------------------------------------------------------------------------

    def active(self, unit: str) -> bool:
        p = self.main.get(unit)
        return p is not None and p.poll() is None

    def start(self, unit: str, timeout: float = 60.0) -> tuple[bool, str]:
        if self.active(unit):
            return True, ""
        u = parse_unit((self.unit_dir / unit).read_text())
        assert u["Service.KillMode"] == ["process"], f"{unit}: KillMode must be process"
        env = dict(self.base_env)
        for k in " ".join(u.get("Service.UnsetEnvironment", [])).split():
            env.pop(k, None)
        for f in u.get("Service.EnvironmentFile", []):
            path = Path(f.lstrip("-").replace("%%", "%"))
            if path.is_file():
                for line in path.read_text().splitlines():
                    if "=" in line and not line.startswith("#"):
                        k, _, v = line.partition("=")
                        env[k.strip()] = v.strip()
            elif not f.startswith("-"):
                return False, f"{unit}: EnvironmentFile {path} missing"
        for line in u.get("Service.Environment", []):
            for word in unquote(line, False):
                k, _, v = word.partition("=")
                env[k] = v
        argv = unquote(u["Service.ExecStart"][0], True)
        sock_path = self._dir / f"{unit}.notify"
        sock_path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(sock_path))
        sock.settimeout(0.2)
        env["NOTIFY_SOCKET"] = str(sock_path)
        wd = self.watchdog_s or (float(u["Service.WatchdogSec"][0]) if "Service.WatchdogSec" in u else None)
        if wd:
            env["WATCHDOG_USEC"] = str(int(wd * 1e6))
        cwd = u.get("Service.WorkingDirectory", [None])[0]
        log = open(self._dir / f"{unit}.log", "ab")
        p = subprocess.Popen(argv, env=env, cwd=cwd and cwd.replace("%%", "%"), stdin=subprocess.DEVNULL,
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.main[unit] = p
        notes = self.notes.setdefault(unit, [])
        ready = threading.Event()

        def reader():
            while True:
                try:
                    data = sock.recv(4096).decode()
                except socket.timeout:
                    if p.poll() is not None:
                        break
                    continue
                except OSError:
                    break
                for line in data.splitlines():
                    notes.append(line)
                    if line == "READY=1":
                        ready.set()
            sock.close()

        threading.Thread(target=reader, daemon=True).start()
        if u.get("Service.Type", ["simple"])[0] != "notify":
            return True, ""
        deadline = time.monotonic() + timeout
        while not ready.wait(0.05):
            if p.poll() is not None or time.monotonic() > deadline:
                return False, f"{unit}: exited {p.returncode} before READY=1; log: {self.log(unit)[-800:]}"
        return True, ""

    def stop(self, units: list[str]) -> None:
        for unit in units:
            p = self.main.get(unit)
            if p is None or p.poll() is not None:
                continue
            os.kill(p.pid, signal.SIGTERM)  # KillMode=process: the main process only
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)

    def log(self, unit: str) -> str:
        try:
            return (self._dir / f"{unit}.log").read_text(errors="replace")
        except OSError:
            return ""

    def close(self) -> None:
        self.stop(list(self.main))
        import shutil

        shutil.rmtree(self._dir, ignore_errors=True)
