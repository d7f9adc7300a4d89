"""Facts about the file system that holds a path: its mount point and free space (stdlib only).

Used where a full disk must be named with its fix: the journal (:mod:`fleetbus.router.journal`),
``fleet ps`` and ``fleet doctor``.
"""

from __future__ import annotations

import os
from pathlib import Path


def mount_point(path: Path | str) -> str:
    """The mount point of the file system holding ``path`` (or its nearest existing parent)."""
    p = os.path.realpath(path)
    while not os.path.exists(p):
        p = os.path.dirname(p)
    while not os.path.ismount(p):
        p = os.path.dirname(p)
    return p


def free_bytes(path: Path | str) -> int | None:
    """Bytes an unprivileged writer may still use on the file system of ``path`` (or of its
    nearest existing parent; None: unknown)."""
    try:
        st = os.statvfs(mount_point(path) if not os.path.exists(path) else path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def human_bytes(n: int | None) -> str:
    """``n`` bytes as ``512 B``, ``1.5 MiB``... (``?`` for None)."""
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
