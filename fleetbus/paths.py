"""Where a tenant's state and sockets live.

State (heartbeat files, logs, pid files) lives under ``$XDG_STATE_HOME/fleetbus/<tenant>/``
(default ``~/.local/state``); sockets live in a private 0700 runtime directory,
``$XDG_RUNTIME_DIR/fleetbus/<tenant>/`` or ``/tmp/fleetbus-<uid>/<tenant>/`` (the
``fleetbus``/``fleetbus-<uid>`` parent is 0700 too). The tmux socket name is the roster's
``transport.socket`` with ``-<tenant>`` appended, so two tenants never share a tmux server.

``$FLEETBUS_HOME`` redirects everything: state goes to ``$FLEETBUS_HOME/state/<tenant>/``, the
runtime directory becomes ``/tmp/fleetbus-<uid>/<hash>/`` and the tmux socket name gets the same
``-<hash>`` suffix, where ``<hash>`` is derived from ``$FLEETBUS_HOME`` and the tenant. Tests and
``fleet demo`` use this so they never touch a real user's fleet. The hash keeps Unix socket paths
short: Linux allows at most 107 bytes for a socket path.

Nothing here is trusted for being where it should be: the runtime chain (``fleetbus-<uid>`` or
``fleetbus``, the tenant dir, ``h/``) and the state dir (with ``run/`` and ``logs/``) must be real
directories owned by the user with mode 0700, opened without following links, and sockets must
be sockets owned by the user (see :mod:`fleetbus.safepath`); otherwise :class:`PathError`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from fleetbus.safepath import PathError, check_socket, open_private_dir, private_chain

__all__ = ["MAX_SOCKET_PATH", "TMP_BASE", "FleetPaths", "PathError", "fleet_paths"]

#: Longest Unix socket path Linux accepts (``sun_path`` is 108 bytes including the NUL).
MAX_SOCKET_PATH = 107
#: Where the runtime dir ``fleetbus-<uid>`` goes without ``$XDG_RUNTIME_DIR`` (and always under
#: ``$FLEETBUS_HOME``). A module constant so tests can point the fallback elsewhere.
TMP_BASE = "/tmp"


@dataclass(frozen=True)
class FleetPaths:
    """Every filesystem location one tenant's fleet uses.

    Attributes:
        tenant: the tenant id.
        state_dir: heartbeat files (``run/``), logs (``logs/``), pid files.
        run_dir: private (0700) directory holding the ZeroMQ ``ipc://`` and hook sockets.
        tmux_socket: the tmux ``-L`` socket name of this fleet's private tmux server
            (``<transport.socket>-<tenant>``, or ``-<hash>`` under ``$FLEETBUS_HOME``).
        instance: this fleet's name in systemd unit names: the tenant, or ``<tenant>-<hash>``
            under ``$FLEETBUS_HOME`` (so a test or demo fleet never meets a real fleet's units).
        run_hint: a second fix offered when the runtime chain is refused (set for the ``/tmp``
            fallback: "set XDG_RUNTIME_DIR ...").
    """

    tenant: str
    state_dir: Path
    run_dir: Path
    tmux_socket: str
    instance: str = ""
    run_hint: str = ""

    @property
    def router_endpoint(self) -> str:
        """ZeroMQ endpoint of the router's ROUTER socket (``ipc://...``)."""
        return f"ipc://{self.run_dir / 'router.sock'}"

    @property
    def events_endpoint(self) -> str:
        """ZeroMQ endpoint of the router's PUB socket (``ipc://...``)."""
        return f"ipc://{self.run_dir / 'events.sock'}"

    @property
    def router_pidfile(self) -> Path:
        return self.state_dir / "router.pid"

    @property
    def router_lock(self) -> Path:
        return self.run_dir / "router.lock"

    @property
    def router_log(self) -> Path:
        return self.state_dir / "logs" / "router.log"

    def hook_socket(self, slot: str) -> Path:
        """Unix datagram socket on which slot ``slot``'s sidecar receives runtime hook events."""
        return self.run_dir / "h" / f"{slot}.sock"

    def hook_stream(self, slot: str) -> Path:
        """Unix stream socket on which slot ``slot``'s sidecar reads JSON-line hook events from
        in-process extensions (Node has no Unix datagram sockets)."""
        return self.run_dir / "h" / f"{slot}.jsonl"

    def heartbeat_file(self, slot: str) -> Path:
        """``key=value`` heartbeat file the sidecar rewrites atomically on every beat."""
        return self.state_dir / "run" / f"{slot}.hb"

    def ack_log(self, slot: str) -> Path:
        """The sidecar's log of the accepted acks it gave recently (replayed after a restart)."""
        return self.state_dir / "run" / f"{slot}.acks"

    def sidecar_pidfile(self, slot: str) -> Path:
        return self.state_dir / "run" / f"{slot}.sidecar.pid"

    @property
    def keys_dir(self) -> Path:
        """CURVE keys of the ``tcp://`` endpoint (0700; see :mod:`fleetbus.keys` for the layout)."""
        return self.state_dir / "keys"

    @property
    def journal(self) -> Path:
        """The tenant's SQLite journal (messages, their state changes, slot events)."""
        return self.state_dir / "journal.sqlite3"

    def slot_dir(self, slot: str) -> Path:
        """Per-slot folder for files fleetbus generates (e.g. a runtime's hook settings)."""
        return self.state_dir / "slots" / slot

    def sidecar_log(self, slot: str) -> Path:
        return self.state_dir / "logs" / f"sidecar-{slot}.log"

    @property
    def _run_base(self) -> Path:
        """The directory above the runtime chain (``/tmp`` or ``$XDG_RUNTIME_DIR``)."""
        return self.run_dir.parent.parent

    def ensure(self) -> None:
        """Create the directories (state 0700 with ``run/`` and ``logs/``; runtime chain 0700:
        ``fleetbus-<uid>``, the tenant dir, ``h/``), each made and opened without following
        links, and check they are private (see :mod:`fleetbus.safepath`).

        Raises:
            PathError: a directory is a symlink, owned by another user, or (already existing)
                writable by group or world (one others could only read is made 0700); or a
                socket path would exceed :data:`MAX_SOCKET_PATH` bytes. The message names the
                path and the fix.
        """
        longest = len(str(self.run_dir / "h")) + 1 + 64 + len(".jsonl")
        if longest > MAX_SOCKET_PATH:
            raise PathError(
                f"runtime dir {self.run_dir} is too long for Unix sockets "
                f"({longest} > {MAX_SOCKET_PATH} bytes); set XDG_RUNTIME_DIR to a shorter path"
            )
        fd = private_chain(self.state_dir.parent, [self.state_dir.name], create=True)
        try:
            for sub in ("run", "logs"):
                os.close(open_private_dir(self.state_dir / sub, create=True, dir_fd=fd))  # type: ignore[arg-type]
        finally:
            os.close(fd)  # type: ignore[arg-type]
        # the parent (/tmp/fleetbus-<uid> or $XDG_RUNTIME_DIR/fleetbus) too: another user who
        # owned it could rename our runtime dir away and put their own in its place
        os.close(private_chain(self._run_base, [self.run_dir.parent.name, self.run_dir.name, "h"],  # type: ignore[arg-type]
                               create=True, hint=self.run_hint))

    def check(self) -> None:
        """What :meth:`ensure` checks, without creating anything: missing directories are fine.

        Raises:
            PathError: an existing state or runtime directory is planted (see :meth:`ensure`).
        """
        fd = private_chain(self.state_dir.parent, [self.state_dir.name], create=False)
        if fd is not None:
            try:
                for sub in ("run", "logs"):
                    sub_fd = open_private_dir(self.state_dir / sub, create=False, dir_fd=fd)
                    if sub_fd is not None:
                        os.close(sub_fd)
            finally:
                os.close(fd)
        fd = private_chain(self._run_base, [self.run_dir.parent.name, self.run_dir.name, "h"], create=False,
                           hint=self.run_hint)
        if fd is not None:
            os.close(fd)

    def check_socket(self, name: str = "router.sock") -> bool:
        """Check, without creating anything, that the runtime chain is private (as :meth:`ensure`
        requires) and that ``run_dir/name`` is a Unix socket owned by us, not a symlink. Clients
        call this before connecting. A few ``open``/``fstat``/``lstat`` calls.

        Returns:
            False when the runtime dir or the socket does not exist (no router).

        Raises:
            PathError: a directory or the socket is planted (symlink, another owner, group or
                world access); the message names the path and the fix.
        """
        fd = private_chain(self._run_base, [self.run_dir.parent.name, self.run_dir.name], create=False,
                           hint=self.run_hint)
        if fd is None:
            return False
        try:
            return check_socket(self.run_dir / name, self.run_hint, dir_fd=fd)
        finally:
            os.close(fd)

    def router_running(self) -> bool:
        """True while a router holds this tenant's lock file (``flock``; the kernel releases it
        when the router dies, even on SIGKILL). Cheap: no process-table read."""
        import fcntl

        try:
            fd = os.open(self.router_lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def remove_run_dir(self) -> bool:
        """Remove the runtime dir's sockets and lock (after ``fleet down``); ignores leftovers.

        Only our own real directory is removed: the parent and the runtime dir must be
        directories owned by us, opened without following links (a loose mode is accepted: that
        is what removing fixes), and the removal works on fds (``shutil.rmtree`` with
        ``dir_fd``), so a planted symlink never makes it delete anything elsewhere. Returns True
        when the dir is gone (or was not there), False when it was left because it is not ours.
        """
        import shutil

        try:
            fd = private_chain(self._run_base, [self.run_dir.parent.name], create=False, allow_loose=True)
        except (PathError, OSError):
            return False
        if fd is None:
            return True
        try:
            try:
                sub = open_private_dir(self.run_dir, create=False, dir_fd=fd, allow_loose=True)
            except (PathError, OSError):
                return False
            if sub is None:
                return True
            os.close(sub)
            shutil.rmtree(self.run_dir.name, dir_fd=fd, ignore_errors=True)
            return True
        finally:
            os.close(fd)


def _short_hash(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:10]


def fleet_paths(tenant: str, socket_name: str, env: dict[str, str] | None = None) -> FleetPaths:
    """Compute the :class:`FleetPaths` of ``tenant`` (nothing is created; see ``ensure``).

    Args:
        tenant: tenant id (already validated).
        socket_name: the roster's ``transport.socket``.
        env: environment to read (default ``os.environ``).
    """
    env = dict(os.environ) if env is None else env
    uid = os.getuid()
    home = env.get("FLEETBUS_HOME")
    if home:
        base = Path(home).expanduser().resolve()
        h = _short_hash(str(base), tenant)
        return FleetPaths(
            tenant=tenant,
            state_dir=base / "state" / tenant,
            run_dir=Path(TMP_BASE) / f"fleetbus-{uid}" / h,
            tmux_socket=f"{socket_name}-{h}",
            instance=f"{tenant}-{h}",
        )
    state_home = Path(env.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    xdg_run = env.get("XDG_RUNTIME_DIR")
    run_base = Path(xdg_run) / "fleetbus" if xdg_run else Path(TMP_BASE) / f"fleetbus-{uid}"
    return FleetPaths(
        tenant=tenant,
        state_dir=state_home / "fleetbus" / tenant,
        run_dir=run_base / tenant,
        # per tenant: two tenants whose rosters name the same socket must never share a tmux
        # server (one router would see, type into and kill the other tenant's slots)
        tmux_socket=f"{socket_name}-{tenant}",
        instance=tenant,
        run_hint="" if xdg_run else f"set XDG_RUNTIME_DIR to a private directory of yours (e.g. /run/user/{uid})",
    )
