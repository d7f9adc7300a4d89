"""Tell systemd how a ``Type=notify`` service is doing (``sd_notify(3)``), via systemd-watchdog.

systemd starts a ``Type=notify`` unit with ``$NOTIFY_SOCKET`` set and counts it as started only
when the process sends ``READY=1``; with ``WatchdogSec=`` it also sets ``$WATCHDOG_USEC`` (and
``$WATCHDOG_PID``) and restarts the service when no ``WATCHDOG=1`` arrives within that interval.
Outside systemd (no ``$NOTIFY_SOCKET``) every call here does nothing.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

import anyio

#: variables systemd hands to the service itself; they are removed from the environment so the
#: processes the service starts (sidecars, the tmux server, agents) never inherit them
NOTIFY_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class ServiceNotifier:
    """``READY=1``, ``STATUS=...`` and ``WATCHDOG=1`` for the current process.

    Args:
        env: the environment to read and clean (default ``os.environ``).
    """

    def __init__(self, env: MutableMapping[str, str] | None = None):
        env = os.environ if env is None else env
        self._wd = None
        self.watchdog_s: float | None = None
        """Watchdog interval in s (``$WATCHDOG_USEC`` when it names this process), else None."""
        if env.get("NOTIFY_SOCKET"):
            from systemd_watchdog import WatchDog

            self._wd = WatchDog(addr=env["NOTIFY_SOCKET"])
            usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID")
            if usec.isdigit() and int(usec) > 0 and pid in (None, str(os.getpid())):
                self.watchdog_s = int(usec) / 1e6
        for k in NOTIFY_VARS:
            env.pop(k, None)

    @property
    def active(self) -> bool:
        """True when run by systemd as a notify service."""
        return self._wd is not None

    def ready(self, status: str = "") -> None:
        """Send ``READY=1`` (and ``STATUS=status``): the service is up."""
        if self._wd is not None:
            if status:
                self._wd.status(status)
            self._wd.ready()

    def status(self, text: str) -> None:
        """Send ``STATUS=text`` (shown by ``systemctl status``)."""
        if self._wd is not None:
            self._wd.status(text)

    async def keepalive(self) -> None:
        """Send ``WATCHDOG=1`` every third of the watchdog interval, from the caller's event loop
        (a wedged loop stops the pings and systemd restarts the service). Returns at once when
        no watchdog is set."""
        if self._wd is None or self.watchdog_s is None:
            return
        while True:
            self._wd.notify()
            await anyio.sleep(self.watchdog_s / 3)
