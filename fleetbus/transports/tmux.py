"""tmux transport: one private tmux server per fleet, one session per slot.

Rules (checked against tmux 3.3a):

- Every call is ``tmux -u -L <socket> -f /dev/null ...``: our own named server, never the
  user's default server or their ``~/.tmux.conf``; ``kill-server`` is only ever sent here.
- A ``_holder`` session owns the server, so stopping every slot never ends the server. Its
  pane runs ``sleep`` alone (:data:`HOLDER_ARGV`), which the server's exit ends (SIGHUP).
- Targets are always exact: ``=<session>:0.0``. tmux turns ``.`` and ``:`` in session names
  into ``_``, so a slot ``a.b`` lives in session ``a,b`` (``,`` is outside the slot alphabet,
  so the mapping is one-to-one and ``a.b`` never meets ``a_b``).
- The pane runs ``sh -c 'exec "$0" "$@"' <argv>`` with an explicit ``PATH``: the runtime
  replaces the shell, so ``pane_current_command`` and ``pane_pid`` are the runtime's own.
- Text goes in through ``load-buffer -`` (stdin) and ``paste-buffer -p`` (bracketed when the
  program asked for it); bodies are never on a command line. Callers must have cleaned the
  text (:func:`fleetbus.protocol.check_body`): tmux 3.3 does not strip pasted escape sequences.
- ``remain-on-exit`` keeps a dead pane's last screen and exit status; ``window-size manual``,
  set on each slot's window (setting it globally makes tmux 3.3a crash on the next
  ``new-session``), keeps every window at the roster's size whoever attaches.
"""

from __future__ import annotations

import os
import secrets
import shlex
import subprocess
import sys
import time
from typing import ClassVar

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream

from fleetbus.adapters.base import SubmitProfile
from fleetbus.transports.base import LaunchSpec, PaneInfo, Screen, SlotDead, SlotNotFound, TransportError

HOLDER = "_holder"
#: The ``_holder`` pane's program: exec'd by tmux directly (two or more arguments: no shell),
#: so it is the pane's session leader and nothing else. When the server exits (``kill-server``)
#: the pane's terminal is hung up and the kernel sends it SIGHUP, which ends it (tmux resets the
#: pane's signal dispositions, so an ignored SIGHUP of whoever started the server is not
#: inherited; checked on tmux 3.3a). A shell that waits for a foreground ``sleep`` would run its
#: SIGHUP trap only when that ``sleep`` ends, and both would outlive the server. 2147483647 s
#: (68 years) rather than ``infinity``: every ``sleep`` (GNU, busybox, BSD) accepts it.
HOLDER_ARGV = ("sleep", "2147483647")
_FIELDS = (
    "#{session_name}\t#{window_index}\t#{pane_index}\t#{pane_pid}\t#{pane_current_command}"
    "\t#{pane_dead}\t#{pane_dead_status}\t#{window_activity}\t#{pane_dead_signal}\t#{pane_dead_time}"
)


#: Run between fork and exec of a control-mode client (``python -I -S -c CODE PARENT ARGV...``):
#: have the kernel SIGKILL it when the process that started it dies (``PR_SET_PDEATHSIG``,
#: Linux), then exec tmux. A control client whose owner was killed (a router on SIGKILL or the
#: OOM killer) while tmux still had output for it otherwise stays attached for ever, and the
#: tmux 3.3a server then never exits, even on ``kill-server``: it waits for every client.
#: (anyio's ``open_process`` has no ``preexec_fn``.) Exits 1 if the owner died before the
#: request took effect.
_DIE_WITH_OWNER = (
    "import os, sys\n"
    "try:\n"
    "    import ctypes, signal\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)\n"
    "except (ImportError, OSError, AttributeError):\n"
    "    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    os._exit(1)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def _control_argv(base: list[str]) -> list[str]:
    """argv of a control-mode client on ``_holder`` that dies with the calling process."""
    return [sys.executable or "python3", "-I", "-S", "-c", _DIE_WITH_OWNER, str(os.getpid()),
            *base, "-C", "attach-session", "-t", f"={HOLDER}"]


class ControlDown(Exception):
    """The control-mode client is not available; the caller falls back to a forked client."""


def _quote(arg: str) -> str:
    """Quote one argument for tmux's command parser (single quotes; no escapes inside)."""
    if "'" in arg or "\n" in arg or "\r" in arg:
        raise ControlDown("argument cannot be single-quoted")
    return f"'{arg}'"


class _Value(str):
    """An argument carrying a caller's value (roster env, argv, workdir), never tmux syntax.

    A forked client hands tmux its argv, and tmux ends a command at *any* argument whose last
    character is ``;`` (``cmd_parse_from_arguments``, tmux 3.3a): ``x;`` would become ``x``
    followed by a new tmux command made of the next arguments. :func:`_argv` escapes a value's
    final ``;`` as ``\\;``, which tmux turns back into ``;``. The control client single-quotes
    every argument (:func:`_quote`), so there a value passes unchanged.
    """


def _argv(args: tuple[str, ...] | list[str]) -> list[str]:
    """Arguments for a forked tmux client: a :class:`_Value` ending in ``;`` gets it escaped."""
    return [a[:-1] + "\\;" if isinstance(a, _Value) and a.endswith(";") else a for a in args]


def _no_formats(value: str) -> str:
    """``value`` with every ``#`` doubled. tmux expands formats in some arguments whatever their
    quoting (``-c`` start directories, ``load-buffer`` paths; checked on 3.3a), and a format
    can run a shell command (``#(cmd)``); ``##`` is a literal ``#``."""
    return value.replace("#", "##")


class ControlClient:
    """A persistent ``tmux -C attach-session -t =_holder`` client, killed by the kernel when the
    process that opened it dies (see :data:`_DIE_WITH_OWNER`).

    Each command is written as one line and answered by one ``%begin … %end`` (or ``%error``)
    block; notifications between blocks are skipped. Commands are serialised by a lock, so
    answers arrive in order. About 0.05 ms per command instead of ~2.5 ms for a forked client
    (tmux 3.3a, this project's research bench). Any failure closes it and raises
    :class:`ControlDown`.
    """

    def __init__(self, base: list[str]):
        self.base = base
        self.proc: anyio.abc.Process | None = None
        self.lock = anyio.Lock()
        self._rx: BufferedByteReceiveStream | None = None

    async def open(self) -> None:
        self.proc = await anyio.open_process(_control_argv(self.base), stderr=subprocess.DEVNULL, env=_client_env())
        assert self.proc.stdout is not None
        self._rx = BufferedByteReceiveStream(self.proc.stdout)
        await self._block(timeout=5.0)  # the attach command's own block

    async def _line(self) -> str:
        assert self._rx is not None
        return (await self._rx.receive_until(b"\n", 16 * 1024 * 1024)).decode("utf-8", "replace")

    async def _block(self, timeout: float = 10.0) -> tuple[bool, list[str]]:
        with anyio.fail_after(timeout):
            while True:
                line = await self._line()
                if line.startswith("%begin "):
                    break
                if line.startswith("%exit"):
                    raise ControlDown("control client exited")
            out: list[str] = []
            while True:
                line = await self._line()
                if line.startswith(("%end ", "%error ")):
                    return line.startswith("%end "), out
                out.append(line)

    async def run(self, args: tuple[str, ...]) -> str:
        """Run one tmux command; return its output. Raises the mapped error or :class:`ControlDown`."""
        cmd = " ".join(_quote(a) for a in args) + "\n"
        async with self.lock:
            if self.proc is None or self.proc.returncode is not None:
                await self.aclose()
                raise ControlDown("not running")
            try:
                assert self.proc.stdin is not None
                await self.proc.stdin.send(cmd.encode("utf-8"))
                ok, out = await self._block()
            except ControlDown:
                await self.aclose()
                raise
            except Exception as e:  # EOF, broken pipe, timeout: drop the client
                await self.aclose()
                raise ControlDown(str(e) or type(e).__name__) from None
        if not ok:
            raise _map_error("\n".join(out), args)
        return "".join(line + "\n" for line in out)

    async def aclose(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            with anyio.move_on_after(2, shield=True):
                if proc.returncode is None:
                    proc.terminate()
                await proc.wait()
            await proc.aclose()


def session_name(slot: str) -> str:
    """tmux session name of ``slot`` (``.`` becomes ``,``)."""
    return slot.replace(".", ",")


def slot_name(session: str) -> str | None:
    """Slot of tmux session ``session``, or None for our own helper sessions (``_holder``...)."""
    if session.startswith("_"):
        return None
    return session.replace(",", ".")


def target(slot: str) -> str:
    """Exact tmux target of a slot's pane."""
    return f"={session_name(slot)}:0.0"


class TmuxTransport:
    """Transport on a private tmux server ``tmux -L <socket>``.

    Args:
        socket: the ``-L`` socket name.
        width, height: window size of every slot (cells).
        tmux: the tmux binary.
        control: keep a control-mode client for frequent commands (the router does; one-shot
            CLI commands fork a client per call).
        scratch_dir: private directory for paste files when ``control`` is on (control mode
            cannot read a buffer from stdin); None delivers through a forked client.
    """

    kind: ClassVar[str] = "tmux"

    def __init__(self, socket: str, width: int = 200, height: int = 50, tmux: str = "tmux",
                 control: bool = False, scratch_dir: str | os.PathLike[str] | None = None):
        self.socket = socket
        self.width = width
        self.height = height
        self.base = [tmux, "-u", "-L", socket, "-f", "/dev/null"]
        #: tmux commands run (forked clients plus control-mode commands), for bench/ and tests
        self.calls = 0
        #: forked tmux client processes started
        self.forks = 0
        self.control = control
        self.scratch_dir = scratch_dir
        self._ctl: ControlClient | None = None
        self._ctl_retry_at = 0.0

    # -- plumbing ------------------------------------------------------------------------------

    async def _control(self) -> ControlClient | None:
        """The control client, opened on first use; None while it cannot be had (retry after 1 s)."""
        if not self.control:
            return None
        if self._ctl is not None:
            if self._ctl.proc is not None and self._ctl.proc.returncode is None:
                return self._ctl
            await self.aclose()  # it died (server restart, killed): reopen below
        if time.monotonic() < self._ctl_retry_at:
            return None
        ctl = ControlClient(self.base)
        try:
            await ctl.open()
        except Exception:
            await ctl.aclose()
            self._ctl_retry_at = time.monotonic() + 1.0
            return None
        self._ctl = ctl
        return ctl

    async def _run(self, *args: str, stdin: bytes | None = None, check: bool = True) -> str:
        """Run one tmux command: through the control client when it can (single commands without
        stdin), else a forked client. ``;`` separates chained commands (forked path only)."""
        if stdin is None and ";" not in args:
            ctl = await self._control()
            if ctl is not None:
                try:
                    self.calls += 1
                    return await ctl.run(args)
                except ControlDown:
                    self.calls -= 1
                except TransportError:
                    if check:
                        raise
                    return ""
        self.calls += 1
        self.forks += 1
        proc = await anyio.run_process([*self.base, *_argv(args)], input=stdin, check=False, env=_client_env())
        out = proc.stdout.decode("utf-8", "replace")
        if check and proc.returncode != 0:
            err = proc.stderr.decode("utf-8", "replace").strip()
            raise _map_error(err, args)
        return out

    def run_sync(self, *args: str, check: bool = True) -> str:
        """Run one tmux command synchronously (for CLI helpers). Raises :class:`TransportError`."""
        self.calls += 1
        self.forks += 1
        proc = subprocess.run([*self.base, *_argv(args)], capture_output=True, env=_client_env())
        if check and proc.returncode != 0:
            raise _map_error(proc.stderr.decode("utf-8", "replace").strip(), args)
        return proc.stdout.decode("utf-8", "replace")

    # -- lifecycle -----------------------------------------------------------------------------

    async def server_alive(self) -> bool:
        proc = await anyio.run_process([*self.base, "has-session", "-t", f"={HOLDER}"], check=False, env=_client_env())
        self.calls += 1
        self.forks += 1
        return proc.returncode == 0

    async def ensure_server(self) -> None:
        """Start the private server with its ``_holder`` session, and set server options.

        Creates only the ``_holder`` session when the server runs without one (killed by hand):
        the slots keep running. Safe to race with another process doing the same (the holder
        unit and the router): a ``duplicate session`` answer means the other one won.

        Raises:
            TransportError: tmux could not start the server or the session.
        """
        if await self.server_alive():
            return
        try:
            await self._run(
                "new-session", "-d", "-s", HOLDER, "-x", "80", "-y", "24", "--", *HOLDER_ARGV,
                ";", "set-option", "-g", "remain-on-exit", "on",
                ";", "set-option", "-g", "history-limit", "5000",
                ";", "set-option", "-g", "default-size", f"{self.width}x{self.height}",
                ";", "set-option", "-g", "status", "off",
                ";", "set-option", "-g", "escape-time", "10",
            )
        except TransportError as e:
            if "duplicate session" not in str(e) or not await self.server_alive():
                raise

    async def processes(self) -> dict[int, str]:
        """This fleet's tmux server, its clients and every pane's program: ``{pid: role}`` with
        roles ``tmux-server``, ``tmux-client`` (control-mode clients, viewers), ``pane <session>``
        (e.g. ``pane _holder``, ``pane a,b``) and, for a pane whose program exited
        (``remain-on-exit``), ``dead pane <session>`` (that pid may already be reused; it still
        names the pane's session, see :mod:`fleetbus.reap`). One forked tmux client
        (``list-panes -a`` and ``list-clients``); ``{}`` when no server answers. Each pane
        program leads its own session (tmux calls ``setsid``)."""
        out = await self._run("list-panes", "-a", "-F", "P\t#{pid}\t#{pane_pid}\t#{pane_dead}\t#{session_name}",
                              ";", "list-clients", "-F", "C\t#{client_pid}", check=False)
        found: dict[int, str] = {}
        for line in out.splitlines():
            kind, server, pane, dead, session = (line.split("\t", 4) + ["", "", "", ""])[:5]
            if kind == "C" and server.isdigit():
                found.setdefault(int(server), "tmux-client")
            elif kind == "P" and server.isdigit():
                found.setdefault(int(server), "tmux-server")
                if pane.isdigit():
                    found.setdefault(int(pane), f"{'dead pane' if dead == '1' else 'pane'} {session}")
        return found

    async def server_pid(self) -> int | None:
        """Pid of this fleet's tmux server, or None when none answers on the socket."""
        out = await self._run("display-message", "-p", "#{pid}", check=False)
        return int(out.strip()) if out.strip().isdigit() else None

    async def hold(self, on_ready=None) -> str:
        """Run as the server's holder: ensure the server and its ``_holder`` session, then stay
        attached to ``_holder`` as a control-mode client until that session or the server ends.

        This is the main process of the systemd holder unit (``fleet holder``): the tmux server
        it starts lives in the unit's cgroup, and the unit is active exactly while ``_holder``
        exists. Ending this process (SIGTERM) leaves the server and every slot running.

        Args:
            on_ready: called once the session exists (``sd_notify`` READY).
        Returns:
            why holding ended (``"holder session ended"`` or ``"tmux server ended"``).
        Raises:
            TransportError: the server could not be started.
        """
        await self.ensure_server()
        proc = await anyio.open_process(_control_argv(self.base), stderr=subprocess.DEVNULL, env=_client_env())
        try:
            if on_ready is not None:
                on_ready()
            assert proc.stdout is not None
            async for _ in proc.stdout:  # notifications until the session ends (%exit, then EOF)
                pass
            await proc.wait()
        finally:
            with anyio.CancelScope(shield=True):
                if proc.returncode is None:
                    proc.terminate()
                    await proc.wait()
        return "holder session ended" if await self.server_pid() is not None else "tmux server ended"

    def _launch_args(self, spec: LaunchSpec) -> list[str]:
        """``-c DIR -e K=V ... -- sh -c 'exec "$0" "$@"' ARGV``: every value reaches the runtime
        literally (no shell parses it; ``-c`` escaped against format expansion)."""
        env_args: list[str] = ["-c", _Value(_no_formats(spec.cwd))]
        for k, v in spec.env.items():
            env_args += ["-e", _Value(f"{k}={v}")]
        return [*env_args, "--", "sh", "-c", 'exec "$0" "$@"', *map(_Value, spec.argv)]

    async def start_slot(self, spec: LaunchSpec) -> PaneInfo:
        if not os.path.isdir(spec.cwd):
            raise TransportError(f"workdir of slot {spec.slot!r} does not exist: {spec.cwd}")
        await self.ensure_server()
        await self._run(
            "new-session", "-d", "-s", session_name(spec.slot), "-x", str(self.width), "-y", str(self.height),
            *self._launch_args(spec),
            ";", "set-option", "-w", "-t", f"={session_name(spec.slot)}:0", "window-size", "manual",
        )
        return (await self.probe_all()).get(spec.slot) or PaneInfo(slot=spec.slot, alive=False)

    async def restart_slot(self, spec: LaunchSpec) -> PaneInfo:
        """``respawn-pane -k``: kills the old program, keeps the session (and any watcher)."""
        env_args = self._launch_args(spec)
        await self._run("respawn-pane", "-k", "-t", target(spec.slot), *env_args)
        return (await self.probe_all()).get(spec.slot) or PaneInfo(slot=spec.slot, alive=False)

    async def stop_slot(self, slot: str) -> None:
        await self._run("kill-session", "-t", f"={session_name(slot)}")

    async def shutdown(self) -> None:
        """``kill-server`` on this fleet's own socket (never any other); removes its socket file."""
        await self.aclose()
        await self._run("kill-server", check=False)
        path = self.socket_path()
        if os.path.exists(path) and not await self.server_alive():
            os.unlink(path)  # a crashed server leaves its socket file behind

    async def aclose(self) -> None:
        """Close the control-mode client (the tmux server and its slots keep running)."""
        ctl, self._ctl = self._ctl, None
        if ctl is not None:
            await ctl.aclose()

    def socket_path(self) -> str:
        """Filesystem path of the ``-L`` socket (``$TMUX_TMPDIR`` or /tmp, then ``tmux-<uid>``)."""
        base = os.environ.get("TMUX_TMPDIR") or "/tmp"
        return os.path.join(base, f"tmux-{os.getuid()}", self.socket)

    # -- input ---------------------------------------------------------------------------------

    async def deliver(self, slot: str, text: str, submit: SubmitProfile | None) -> None:
        """Paste ``text`` as one bracketed paste, then press ``submit.key`` after ``submit.delay_ms``.

        One tmux call when the delay is 0, two otherwise.
        """
        buf = f"fleet-{secrets.token_hex(4)}"
        tgt = target(slot)
        if self.scratch_dir is not None and await self._control() is not None:
            path = os.path.join(self.scratch_dir, buf)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(text.encode("utf-8"))
                await self._run("load-buffer", "-b", buf, _no_formats(path))
            finally:
                os.unlink(path)
            await self._run("paste-buffer", "-p", "-d", "-b", buf, "-t", tgt)
            if submit is not None and submit.delay_ms <= 0:
                await self._run("send-keys", "-t", tgt, submit.key)
        else:
            args = ["load-buffer", "-b", buf, "-", ";", "paste-buffer", "-p", "-d", "-b", buf, "-t", tgt]
            if submit is not None and submit.delay_ms <= 0:
                args += [";", "send-keys", "-t", tgt, submit.key]
            await self._run(*args, stdin=text.encode("utf-8"))
        if submit is not None and submit.delay_ms > 0:
            await anyio.sleep(submit.delay_ms / 1000)
            await self._run("send-keys", "-t", tgt, submit.key)

    async def send_keys(self, slot: str, *keys: str) -> None:
        await self._run("send-keys", "-t", target(slot), *keys)

    # -- reading -------------------------------------------------------------------------------

    async def screen(self, slot: str, *, history: int = 0) -> Screen:
        """One tmux call: cursor, size and state, then the capture."""
        tgt = target(slot)
        fmt = "#{cursor_x} #{cursor_y} #{pane_width} #{pane_height} #{pane_dead} #{history_size} #{pane_pid}"
        start = str(-history) if history else "0"
        if await self._control() is not None:
            out = await self._run("display-message", "-p", "-t", tgt, fmt)
            out += await self._run("capture-pane", "-p", "-t", tgt, "-S", start)
        else:
            out = await self._run("display-message", "-p", "-t", tgt, fmt, ";", "capture-pane", "-p", "-t", tgt,
                                  "-S", start)
        head, _, body = out.partition("\n")
        cx, cy, w, h, dead, hist, pid = (int(x or 0) for x in head.split(" "))
        rows = body.split("\n")
        if rows and rows[-1] == "":
            rows.pop()
        n_hist = min(history, hist)
        visible = rows[n_hist:n_hist + h]
        visible += [""] * (h - len(visible))
        return Screen(lines=visible, history=rows[:n_hist], cursor_x=cx, cursor_y=cy, width=w, height=h, dead=dead == 1,
                      pid=pid or None)

    async def capture(self, slot: str, *, lines: int | None = None) -> str:
        """The last ``lines`` rows of the pane (history included), trailing blank rows dropped."""
        scr = await self.screen(slot, history=max(0, (lines or 0) - self.height))
        rows = scr.history + scr.lines
        while rows and not rows[-1].strip():
            rows.pop()
        return "\n".join(rows[-lines:] if lines else rows)

    async def probe_all(self) -> dict[str, PaneInfo]:
        """Every slot pane, from one ``list-panes -a`` call; {} when the server is not running."""
        try:
            out = await self._run("list-panes", "-a", "-F", _FIELDS)
        except TransportError:
            return {}
        return parse_panes(out, time.time())

    # -- viewers -------------------------------------------------------------------------------

    def watch(self, slot: str) -> int:
        """Attach read-only to a throwaway session grouped with the slot's; removed on detach.

        The slot's window keeps its size (``window-size manual``). Returns tmux's exit code.
        """
        name = f"_watch-{session_name(slot)}-{os.getpid()}"
        self.run_sync("new-session", "-d", "-t", f"={session_name(slot)}", "-s", name)
        # tmux 3.3a: an exact "=name" target does not find a just-grouped session, and
        # destroy-unattached set before attaching destroys it at once; so set it from the
        # attached client itself (the name is unique: our pid).
        try:
            return subprocess.call([*self.base, "attach-session", "-r", "-t", name, ";",
                                    "set-option", "-t", name, "destroy-unattached", "on"], env=_client_env())
        finally:
            self.run_sync("kill-session", "-t", name, check=False)

    def attach(self, slot: str) -> int:
        """Attach read-write to the slot's own session (explicit takeover)."""
        self.run_sync("has-session", "-t", f"={session_name(slot)}")
        return subprocess.call([*self.base, "attach-session", "-t", f"={session_name(slot)}"], env=_client_env())


def parse_panes(text: str, now: float) -> dict[str, PaneInfo]:
    """Parse ``list-panes -a -F`` output (see ``_FIELDS``) into slot → :class:`PaneInfo`.

    tmux 3.3a leaves ``pane_dead_status`` empty for a program killed by a signal and gives the
    signal in ``pane_dead_signal``; ``pane_dead_time`` is the exit time (Unix s). Lines of the
    older 8-field format (without those two) are accepted too.
    """
    panes: dict[str, PaneInfo] = {}
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) == 8:
            parts += ["", ""]
        if len(parts) != 10:
            continue
        sess, win, pane, pid, cmd, dead, status, activity, sig, dead_time = parts
        slot = slot_name(sess)
        if slot is None or win != "0" or pane != "0":
            continue
        is_dead = dead == "1"
        panes[slot] = PaneInfo(
            slot=slot,
            alive=not is_dead,
            pid=int(pid) if pid.isdigit() and not is_dead else None,
            command=None if is_dead else (cmd or None),
            exit_status=int(status) if is_dead and status.lstrip("-").isdigit() else None,
            idle_s=max(0.0, now - int(activity)) if activity.isdigit() else None,
            exit_signal=int(sig) if is_dead and sig.isdigit() else None,
            dead_at=float(dead_time) if is_dead and dead_time.isdigit() else None,
        )
    return panes


def _client_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TMUX", None)  # never let an enclosing tmux session redirect our client
    return env


def _map_error(err: str, args: tuple[str, ...]) -> TransportError:
    low = err.lower()
    if "can't find" in low or "no server running" in low or "error connecting" in low:
        return SlotNotFound(err or "no such session")
    if "pane is dead" in low:
        return SlotDead(err)
    return TransportError(f"tmux {shlex.join(args[:1])} failed: {err}")
