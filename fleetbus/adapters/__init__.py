"""Adapter registry: one module per runtime, looked up by the roster's ``runtime`` name."""

from __future__ import annotations

from fleetbus.adapters.base import HOOK_COMMAND, Adapter, HookSetup, SubmitProfile, find_markers, marker, tag_markers
from fleetbus.adapters.claude import CLAUDE
from fleetbus.adapters.codex import CODEX
from fleetbus.adapters.gemini import GEMINI
from fleetbus.adapters.opencode import OPENCODE
from fleetbus.adapters.pi import PI
from fleetbus.adapters.python import PYTHON
from fleetbus.adapters.shell import SHELL
from fleetbus.adapters.stub import STUB

ADAPTERS: dict[str, Adapter] = {a.name: a for a in (STUB, SHELL, PYTHON, CLAUDE, CODEX, PI, OPENCODE, GEMINI)}

__all__ = ["ADAPTERS", "HOOK_COMMAND", "Adapter", "HookSetup", "SubmitProfile", "find_markers", "get_adapter", "marker", "names", "tag_markers"]


def names() -> list[str]:
    """Registered runtime names, sorted."""
    return sorted(ADAPTERS)


def get_adapter(name: str) -> Adapter:
    """Return the adapter registered as ``name``.

    Raises:
        KeyError: no such runtime; the message lists the known ones.
    """
    try:
        return ADAPTERS[name]
    except KeyError:
        raise KeyError(f"unknown runtime {name!r}; known runtimes: {', '.join(names())}") from None
