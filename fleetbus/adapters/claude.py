"""``claude``: Claude Code, acknowledged by its own ``UserPromptSubmit`` hook.

Facts (Claude Code 2.1.197 in tmux 3.3a, checked here against the mock model server):

- the input line is ``❯`` + U+00A0 between two full-width ``─`` rules, on the main screen
  (``alternate_on=0``), with the cursor on that row; ``pane_current_command`` is ``claude``;
- a bracketed paste followed at once by Enter submits, multi-line text intact;
- hooks come from a settings file given with ``--settings <file>``, so fleetbus never edits the
  user's ``~/.claude/settings.json``; each hook runs ``fleet hook`` with the JSON payload
  (``prompt``, ``session_id``) on stdin: ``UserPromptSubmit`` → ``prompt-submit``, ``Stop`` →
  ``turn-end``, ``SessionStart`` → ``session-start``;
- a prompt typed while Claude works is queued in the UI and its hook fires only when it is
  dequeued; ``/clear`` fires ``SessionStart{source: clear}``, not ``UserPromptSubmit``;
- Esc interrupts the current turn.
"""

import json
import re

from fleetbus.adapters.base import Adapter, HookSetup, SubmitProfile, command_hooks

_EVENTS = {"UserPromptSubmit": "prompt-submit", "Stop": "turn-end", "SessionStart": "session-start"}


def _hooks(hook_cmd: str) -> HookSetup:
    settings = {"hooks": command_hooks(hook_cmd, _EVENTS, timeout=10)}
    return HookSetup(args=("--settings", "{slot_dir}/claude-settings.json"),
                     files={"claude-settings.json": json.dumps(settings, indent=2)})


CLAUDE = Adapter(
    name="claude",
    command=("claude",),
    submit=SubmitProfile(key="Enter", delay_ms=0),
    has_hook=True,
    pane_commands=("claude", "claude.exe"),
    prompt=re.compile(r"^❯[ \u00a0]?"),
    clear_keys=("C-u",),
    reset_command="/clear",
    interrupt_key="Escape",
    marker_style="prefix",
    placeholders=("Press up to edit queued messages", "Try \""),
    hook_setup=_hooks,
    queued=re.compile(r"^\s+❯\s"),
    queue_shows_text=True,
    busy=re.compile(r"esc to interrupt"),
    paste_placeholder=re.compile(r"\[Pasted text #\d+"),
    reset_event="session-start",
)
