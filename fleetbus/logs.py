"""Logging for fleetbus's daemons: size-bounded log files, and log lines bounded per cause.

:func:`setup_logging` gives a daemon (router, sidecar) a rotated log file: stdlib
:class:`logging.handlers.RotatingFileHandler`, ``max_bytes`` per file and ``backups`` older files
(``router.log``, ``router.log.1`` ... ``router.log.<backups>``), created 0600 whatever the umask.
Standard output and standard error (file descriptors 1 and 2) are pointed at the current log
file, again after every rotation, so what bypasses :mod:`logging` still lands in the rotated
log: an uncaught exception's traceback, ``faulthandler`` dumps, a C library's assertion message.
Without a file the daemon logs to standard error (systemd's journal rotates it).

:class:`LogBudget` bounds how many lines one cause may write: at most ``burst`` lines per key
per ``window_s`` seconds, the rest counted (a flood of refused handshakes, or of clients that
left before their answer, writes a few lines and a summary, not one line each).
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
import time
from pathlib import Path

#: Default size of one log file (bytes) and number of older files kept (roster ``bus.log_max_bytes``,
#: ``bus.log_backups``).
LOG_MAX_BYTES = 10 * 1024 * 1024
LOG_BACKUPS = 3


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A :class:`~logging.handlers.RotatingFileHandler` whose files are 0600 and which points the
    process's standard output and error at the current file (after every rotation too)."""

    def __init__(self, filename: str | os.PathLike[str], max_bytes: int, backups: int, redirect_std: bool = True):
        self.redirect_std = redirect_std
        super().__init__(filename, maxBytes=max_bytes, backupCount=backups, encoding="utf-8", delay=False)
        self._point_std()

    def _open(self):  # noqa: ANN202 (stdlib signature)
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o600)  # an older file may have been created with looser bits
        except OSError:
            pass
        return open(fd, "a", encoding=self.encoding, errors=self.errors)

    def doRollover(self) -> None:  # noqa: N802 (stdlib name)
        super().doRollover()
        self._point_std()

    def _point_std(self) -> None:
        if not self.redirect_std or self.stream is None:
            return
        for std in (sys.stdout, sys.stderr):
            try:
                std.flush()
            except (OSError, ValueError, AttributeError):
                pass
        fd = self.stream.fileno()
        for target in (1, 2):
            try:
                os.dup2(fd, target, inheritable=True)
            except OSError:
                pass


def setup_logging(level: str, fmt: str, log_file: str | os.PathLike[str] | None = None,
                  max_bytes: int = LOG_MAX_BYTES, backups: int = LOG_BACKUPS) -> logging.Handler:
    """Configure the root logger of a daemon: ``level`` (``info``...), line format ``fmt``; with
    ``log_file``, a :class:`PrivateRotatingFileHandler` of ``max_bytes`` bytes × ``backups``
    older files that also receives file descriptors 1 and 2; else standard error. Python
    warnings are logged too. Returns the handler.

    Raises:
        OSError: the log file cannot be opened (a symlink, a missing folder).
    """
    handler: logging.Handler
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        handler = PrivateRotatingFileHandler(log_file, max_bytes, backups)
    else:
        handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.captureWarnings(True)
    return handler


class LogBudget:
    """At most ``burst`` log lines per key per ``window_s`` seconds (a sliding count, reset when
    the key's window ends); :meth:`allow` says whether a line may be written now and counts the
    ones that may not. Holds at most ``max_keys`` keys (the oldest window is dropped beyond).

    Example::

        budget = LogBudget(window_s=60, burst=5)
        if budget.allow("refused-key"):
            log.warning("refused ...")
    """

    def __init__(self, window_s: float = 60.0, burst: int = 5, max_keys: int = 256,
                 clock=time.monotonic):
        self.window_s = window_s
        self.burst = burst
        self.max_keys = max_keys
        self.clock = clock
        self._windows: dict[object, list[float]] = {}  # key -> [window start, lines written in it]
        self.suppressed = 0  # lines not written since start

    def allow(self, key: object) -> bool:
        """True when a line for ``key`` may be written now (and count it)."""
        now = self.clock()
        w = self._windows.get(key)
        if w is None or now - w[0] >= self.window_s:
            if w is None and len(self._windows) >= self.max_keys:
                self._windows.pop(next(iter(self._windows)))
            w = self._windows[key] = [now, 0]
        if w[1] < self.burst:
            w[1] += 1
            return True
        self.suppressed += 1
        return False
