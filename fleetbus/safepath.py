"""Trust checks for the directories, sockets and files a fleet keeps on disk.

A fleet's sockets live under a runtime directory that, without ``$XDG_RUNTIME_DIR``, sits in the
world-writable ``/tmp``, where another local user can create ``/tmp/fleetbus-<uid>`` first (a
directory they own, or a symlink to one) and impersonate the router. So every process (router,
sidecar, CLI, client, hook) trusts a directory only when it is

- a real directory, opened with ``O_NOFOLLOW`` relative to its already-checked parent (no symlink
  at any step, no race between the check and the use),
- owned by the current uid (checked with ``fstat`` on the opened fd), and
- private: no group or world bits (``mode & 0o077 == 0``).

A directory that is ours but has group or world bits is handled by what those bits allowed:

- *writable* by group or world (``mode & 0o022``): refused, never chmodded. While it was open,
  others could have planted entries in it (a fake ``router.sock``, a lock file, a symlinked log),
  and tightening its mode would not remove them. The error says how to fix it (remove it).
- only *readable/searchable* (e.g. 0755, a umask or an operator's ``chmod``): nobody else could
  create, rename or remove anything in it, so it is made 0700 again with ``fchmod`` on the fd
  just checked (ours, not a link), as is a directory this process just created.

The directory *above* the chain (``/tmp``, ``$XDG_RUNTIME_DIR``, the state home) is not ours to
create; it is trusted when it is owned by us or by root and not writable by others unless it is
sticky (``/tmp`` is 1777).

Every check is a handful of ``open``/``fstat``/``lstat`` calls (microseconds). This module uses the
standard library only, so ``fleet hook`` can use it without loading pydantic.

Files fleetbus writes (logs, pid files, heartbeat and ack files, hook settings) are created 0600
whatever the umask: :func:`open_private_file` and :func:`atomic_write`.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from pathlib import Path

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class PathError(RuntimeError):
    """A state or runtime directory, or a socket in it, cannot be trusted: a symlink, owned by
    another user, writable by group or world, or a path too long for a Unix socket. The message
    names the path and the fix. The CLI exits 2 on it."""


def _uid() -> int:
    return os.getuid()


def _refusal(path: Path | str, what: str, fix: str, hint: str = "") -> PathError:
    msg = f"refusing {path}: {what}; {fix}"
    if hint:
        msg += f", or {hint}"
    return PathError(msg)


def check_base(base: Path | str, hint: str = "") -> None:
    """Check the directory *above* a private chain (``/tmp``, ``$XDG_RUNTIME_DIR``, the state home).

    It may be a symlink (an operator's choice) and owned by us or root; if others can write to
    it (world, or a group other than our own primary group: a umask of 002 with per-user groups
    is fine), it must be sticky (as ``/tmp`` is), so nobody else can rename our entries in it.

    Raises:
        PathError: owned by another user, or writable by others without the sticky bit.
        FileNotFoundError: it does not exist.
    """
    st = os.stat(base)
    if not stat.S_ISDIR(st.st_mode):
        raise _refusal(base, "not a directory", "point it at a directory", hint)
    if st.st_uid not in (_uid(), 0):
        raise _refusal(base, f"owned by uid {st.st_uid}, neither you (uid {_uid()}) nor root",
                       "use a directory of your own", hint)
    others_write = st.st_mode & 0o002 or (st.st_mode & 0o020 and st.st_gid != os.getgid())
    if others_write and not st.st_mode & stat.S_ISVTX:
        raise _refusal(base, f"writable by others (mode {stat.S_IMODE(st.st_mode):04o}) and not sticky",
                       f"chmod go-w {base}", hint)


def open_private_dir(path: Path | str, *, create: bool, dir_fd: int | None = None, hint: str = "",
                     allow_loose: bool = False) -> int | None:
    """Open (and with ``create``, first make) the private directory ``path`` without following
    a symlink, and check it. Returns its fd (the caller closes it), or None when it does not
    exist and ``create`` is false.

    With ``dir_fd`` (an fd of ``path``'s already-checked parent) only ``path``'s last component
    is resolved, relative to ``dir_fd``; ``path`` is then used in messages only.
    ``allow_loose`` accepts group/world bits (for removing the directory, never for using it).

    Raises:
        PathError: a symlink or not a directory, owned by another uid, or (when it already
            existed) writable by group or world. ``hint`` is appended to the fix. A directory of
            ours that others could only read or search is made 0700 (``fchmod`` on the fd).
        OSError: it cannot be created or opened for another reason (permission...).
    """
    name = os.path.basename(path) if dir_fd is not None else os.fspath(path)
    created = False
    try:
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        except FileNotFoundError:
            if not create:
                return None
            try:
                os.mkdir(name, 0o700, dir_fd=dir_fd)
                created = True
            except FileExistsError:  # made by another process meanwhile: checked like any other
                pass
            fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        try:
            st = os.lstat(name, dir_fd=dir_fd)
        except OSError:
            raise e from None
        if stat.S_ISLNK(st.st_mode):
            try:
                target = os.readlink(name, dir_fd=dir_fd)
            except OSError:
                target = "?"
            raise _refusal(path, f"a symbolic link (to {target}, made by uid {st.st_uid}) where a private "
                                 "directory belongs: someone may be redirecting this fleet's sockets",
                           f"remove it (`rm {path}`{'' if st.st_uid == _uid() else ' as root'})", hint) from None
        raise _refusal(path, "not a directory", f"remove it (`rm {path}`)", hint) from None
    try:
        st = os.fstat(fd)
        if st.st_uid != _uid():
            raise _refusal(path, f"owned by uid {st.st_uid}, not by you (uid {_uid()}): another user may be "
                                 "impersonating this fleet", f"have it removed (`rm -rf {path}` as root)", hint)
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077 and not allow_loose:
            if mode & 0o022 and not created:
                raise _refusal(path, f"mode {mode:04o} lets others write in it (it must be 0700): files may have "
                                     "been planted in it", f"check it and remove it (`rm -rf {path}`; fleetbus "
                                     "makes it again, 0700)", hint)
            os.fchmod(fd, 0o700)  # ours, opened without following links, nothing planted: private again
    except BaseException:
        os.close(fd)
        raise
    return fd


def private_chain(base: Path | str, names: Iterable[str], *, create: bool, hint: str = "",
                  allow_loose: bool = False) -> int | None:
    """Check ``base`` (:func:`check_base`), then open ``base/names[0]/names[1]/...`` one step at a
    time, each relative to its parent's fd (:func:`open_private_dir`). Returns the fd of the
    last directory (the caller closes it), or None when one is missing and ``create`` is false.

    Raises:
        PathError: see :func:`check_base` and :func:`open_private_dir`.
    """
    base = Path(base)
    try:
        check_base(base, hint)
    except FileNotFoundError:
        if not create:
            return None
        os.makedirs(base, 0o700, exist_ok=True)
        check_base(base, hint)
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    path = base
    try:
        for name in names:
            path = path / name
            nxt = open_private_dir(path, create=create, dir_fd=fd, hint=hint, allow_loose=allow_loose)
            os.close(fd)
            fd = nxt  # type: ignore[assignment]
            if fd is None:
                return None
    except BaseException:
        if fd is not None:
            os.close(fd)
        raise
    return fd


def check_socket(path: Path | str, hint: str = "", dir_fd: int | None = None) -> bool:
    """True when ``path`` is a Unix socket owned by us (not a symlink); False when it does not
    exist. With ``dir_fd``, only the last component is resolved, relative to it.

    Raises:
        PathError: it is a symlink, not a socket, or owned by another uid.
    """
    try:
        st = os.lstat(os.path.basename(path) if dir_fd is not None else path, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(st.st_mode):
        raise _refusal(path, f"a symbolic link (made by uid {st.st_uid}) where a socket belongs",
                       f"remove it (`rm {path}`)", hint)
    if not stat.S_ISSOCK(st.st_mode):
        raise _refusal(path, "not a socket", f"remove it (`rm {path}`)", hint)
    if st.st_uid != _uid():
        raise _refusal(path, f"a socket owned by uid {st.st_uid}, not by you (uid {_uid()}): another user may be "
                             "impersonating this fleet", f"have it removed (`rm {path}` as root)", hint)
    return True


def check_ipc_endpoint(endpoint: str | None) -> bool:
    """For an ``ipc://PATH`` ZeroMQ endpoint: True when ``PATH`` is a socket of ours in a private
    directory of ours (neither a symlink), False when either is missing. Other endpoints
    (``tcp://``, None) are not checked here: True.

    Raises:
        PathError: the directory or the socket is planted (see :func:`open_private_dir`,
            :func:`check_socket`).
    """
    if not endpoint or not endpoint.startswith("ipc://"):
        return True
    path = endpoint[len("ipc://"):]
    fd = open_private_dir(os.path.dirname(path) or ".", create=False)
    if fd is None:
        return False
    try:
        return check_socket(path, dir_fd=fd)
    finally:
        os.close(fd)


def hook_socket_problem(path: str, levels: int = 3) -> str | None:
    """Why the hook socket ``path`` (and the spool next to it) must not be written to, or None
    when it may. For ``fleet hook`` and the in-process hooks: a few ``lstat`` calls, nothing
    raised. A missing socket or directory is no problem here (the send then fails on its own).

    ``path``, when it exists, must be a socket owned by us, not a symlink. Its enclosing
    directories, up to ``levels`` of them (``h/``, the tenant runtime dir, ``fleetbus-<uid>``),
    must be real directories owned by us that nobody else can write to (``mode & 0o022 == 0``;
    ``fleet up`` and the sidecar make them 0700), so nobody else can swap the socket between this
    check and the send; the walk stops early at a trusted base above a private directory (owned
    by root, and sticky or not writable by others, as ``/tmp``).
    """
    uid = _uid()
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        return f"cannot check hook socket {path}: {e.strerror}"
    else:
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != uid:
            kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) \
                else "not a socket"
            return f"refusing hook socket {path}: {kind} owned by uid {st.st_uid} (you are uid {uid})"
    d = path
    for level in range(levels):
        d = os.path.dirname(d)
        if not d or d == "/":
            break
        try:
            st = os.lstat(d)
        except FileNotFoundError:
            return None
        except OSError as e:
            return f"cannot check {d}: {e.strerror}"
        if not stat.S_ISDIR(st.st_mode):
            return f"refusing hook socket {path}: {d} is {'a symlink' if stat.S_ISLNK(st.st_mode) else 'not a directory'}"
        others_write = st.st_mode & 0o022
        if st.st_uid == uid and not others_write:
            continue
        if level > 0 and st.st_uid == 0 and (not others_write or st.st_mode & stat.S_ISVTX):
            break  # a trusted base (/tmp, /run/user) above a private directory
        if st.st_uid != uid:
            return f"refusing hook socket {path}: {d} is owned by uid {st.st_uid} (you are uid {uid})"
        return (f"refusing hook socket {path}: {d} has mode {stat.S_IMODE(st.st_mode):04o}, others may write "
                "in it (must be 0700); `fleet up` tells how to fix it")
    return None


def open_private_file(path: Path | str, flags: int) -> int:
    """``os.open`` a file fleetbus owns (log, ack log, lock) with ``O_CREAT | O_NOFOLLOW``, mode
    0600 whatever the umask (an existing file of ours with a looser mode is ``fchmod``-ed; the fd
    is checked, so no link is ever followed). Returns the fd.

    Raises:
        PathError: the file is owned by another uid.
        OSError: it cannot be opened (``ELOOP``: it is a symlink).
    """
    fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        st = os.fstat(fd)
        if st.st_uid != _uid():
            raise PathError(f"refusing {path}: owned by uid {st.st_uid}, not by you (uid {_uid()})")
        if stat.S_IMODE(st.st_mode) != 0o600 and stat.S_ISREG(st.st_mode):
            os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


def atomic_write(path: Path | str, data: bytes | str) -> None:
    """Replace ``path`` with ``data`` atomically: a temporary file next to it (this process's own
    name, created ``O_EXCL | O_NOFOLLOW``, 0600 whatever the umask), then ``os.replace``.

    Raises:
        OSError: the temporary file cannot be written or renamed (it is removed).
    """
    path = os.fspath(path)
    head, tail = os.path.split(path)
    tmp = os.path.join(head, f".{tail}.{os.getpid()}.tmp")
    if isinstance(data, str):
        data = data.encode("utf-8")
    try:
        os.unlink(tmp)  # a leftover of a crashed process with our pid
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            if os.fstat(fd).st_mode & 0o777 != 0o600:  # umask took the owner's bits
                os.fchmod(fd, 0o600)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
