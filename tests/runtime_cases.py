"""What the generic runtime tests (``tests/test_runtimes.py``) need to know about one agent CLI.

Each ``tests/rt_<runtime>.py`` defines ``CASE = RuntimeCase(...)``: how to seed the user's own
config for that CLI in an isolated HOME (provider pointed at the mock model, onboarding and trust
answered ahead, as a real user's setup would be) and which of those files must stay
byte-identical. The CLIs come from ``tests/runtimes`` (``scripts/install-runtimes``).
"""

from __future__ import annotations

import functools
import importlib
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

BIN = Path(__file__).parent / "runtimes" / "node_modules" / ".bin"

Prepare = Callable[[Path, Path, str], tuple[dict[str, str], list[Path]]]


@dataclass(frozen=True)
class RuntimeCase:
    """One agent CLI under test.

    Attributes:
        runtime: the fleetbus adapter name (roster ``runtime:``).
        bin: executable name in ``tests/runtimes/node_modules/.bin``.
        version_args / version_expect: ``<bin> <args>`` must print ``version_expect``.
        prepare: ``(home, proj, model_url) -> (slot env, user config files)``; writes the user's
            own config into ``home`` and returns the slot's environment (HOME, XDG dirs, PATH
            starting with :data:`BIN`, provider variables) and the files that must not change.
        ready: regex searched in the slot's screen once the runtime's input line is drawn.
    """

    runtime: str
    bin: str
    version_args: tuple[str, ...]
    version_expect: str
    prepare: Prepare
    ready: str

    @functools.cache  # noqa: B019 (one per case, for the whole session)
    def installed(self) -> bool:
        exe = BIN / self.bin
        if not exe.exists():
            return False
        with tempfile.TemporaryDirectory(prefix="fb-ver-") as home:
            try:
                out = subprocess.run([str(exe), *self.version_args], capture_output=True, text=True, timeout=90,
                                     stdin=subprocess.DEVNULL,
                                     env={"HOME": home, "PATH": f"{BIN}:/usr/local/bin:/usr/bin:/bin"})
            except (OSError, subprocess.TimeoutExpired):
                return False
        return out.returncode == 0 and self.version_expect in out.stdout + out.stderr


RUNTIMES = ("claude", "codex", "pi", "opencode", "gemini")


def cases() -> list[RuntimeCase]:
    """The CASE of every ``rt_<runtime>.py`` present, in :data:`RUNTIMES` order."""
    found = []
    for name in RUNTIMES:
        if (Path(__file__).parent / f"rt_{name}.py").exists():
            found.append(importlib.import_module(f"rt_{name}").CASE)
    return found


def home_env(home: Path) -> dict[str, str]:
    """HOME and the XDG base dirs inside the isolated ``home``, and a PATH starting with :data:`BIN`."""
    return {
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_DATA_HOME": str(home / ".local" / "share"),
        "XDG_STATE_HOME": str(home / ".local" / "state"),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "PATH": f"{BIN}:/usr/local/bin:/usr/bin:/bin",
    }
