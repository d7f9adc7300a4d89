"""``codex``: the OpenAI Codex CLI (``@openai/codex``), acknowledged by its own command hooks.

Facts (Codex CLI 0.169.0, npm package on Node 20, in tmux 3.3a, checked here against the mock
model server):

- hooks are installed per process with ``-c`` config overrides carrying inline ``hooks`` tables
  (``-c 'hooks.UserPromptSubmit=[{hooks=[{type="command",command="...",timeout=10}]}]'``). They
  form Codex's "session flags" config layer: nothing is written to ``$CODEX_HOME`` and the
  user's own ``config.toml``/``hooks.json`` layers (provider, model, their own hooks) still load
  and run beside ours. ``--dangerously-bypass-hook-trust`` is needed because unmanaged hooks
  otherwise run only once trusted (a hash persisted in the user's config); it also lets any
  untrusted hook of the user run, and adds a startup warning (``⚠ N warnings · f2 to view``).
  ``--no-daemon`` keeps Codex from starting or attaching to its shared background app-server;
- each hook runs ``fleet hook`` through the shell with a JSON payload on stdin (``session_id``,
  ``turn_id``, ``prompt``, ``source``...); the slot's environment reaches it.
  ``UserPromptSubmit`` → ``prompt-submit`` (the full prompt, markers intact, also for a collapsed
  5,700-char paste), ``Stop`` → ``turn-end``, ``Interrupt`` (Esc during a turn; ``Stop`` does not
  fire then; its timeout is capped at 3 s) → ``turn-end``, ``SessionStart`` → ``session-start``.
  Codex waits for a hook before going on, except for ``async=true`` hooks: with a synchronous
  ``Stop`` hook the turn stays open until the hook exits, and a prompt entered in that window
  becomes a steer into the ending turn (seen about once in 20-100 back-to-back sends), so the
  two turn-end hooks run async: Codex closes the turn while ``fleet hook`` starts up.
  ``SessionStart`` is lazy: it fires right before the first ``UserPromptSubmit`` of a session
  (``source: startup``; after ``/clear``: ``source: clear`` with a new session id), not at launch
  nor at ``/clear``. ``SessionEnd`` fires only when Codex exits;
- the TUI runs on the alternate screen; the composer row starts with ``›`` + space, the cursor
  sits on it idle and busy (on the last row of a multi-line or word-wrapped draft: continuation
  rows are indented by two spaces and word-wrapped short of the pane width). Placeholder:
  ``Ask Codex to do anything``. Rows of earlier user messages also start with ``› ``;
- ``pane_current_command`` is ``node`` idle and busy (the npm wrapper ``codex.js`` spawns the
  native binary on Node < 22.15; on newer Node it execs the binary: ``codex``);
- busy: ``• Working (3s • esc to interrupt)`` above the composer;
- Enter while busy is a "steer": the message leaves the composer for
  ``• Messages to be submitted after next tool call (press esc to interrupt and send
  immediately)`` / ``  ↳ <text>``; its ``UserPromptSubmit`` fires only when it is injected at the
  next sampling point, with the running turn's ``turn_id`` (one ``Stop`` for both). Tab queues a
  follow-up instead (``• Queued follow-up inputs``);
- a bracketed paste followed at once by Enter (one tmux call) submits, multi-line text intact,
  even as soon as the placeholder is drawn after start-up. Keys typed without bracketed paste
  and Enter within ~50 ms are taken as a paste burst: the Enter becomes a newline;
- a paste over ~1,000 chars collapses to ``[Pasted Content 5744 chars]`` in the composer;
- a draft ending in ``$<name>`` (skill) or ``@<name>`` (file search) opens a completion popup
  above the composer (its selected row also starts with ``› ``) and Enter inserts the
  completion (``see @read`` became ``see readme.md``) instead of submitting;
  a trailing space closes it and is trimmed from the prompt (see :meth:`CodexAdapter.frame`);
- ``/clear`` clears the screen to the start-up view (header, the Codex logo in braille art when
  animations are on and the pane is large enough, e.g. 160x45 or 200x50, not 80x24) with no
  modal; ``/new`` may open a worktree chooser in a git repo;
- Esc interrupts a turn within ~0.2 s (``■ Conversation interrupted - use /feedback if something
  went wrong``); with a steer pending, Esc sends it at once as a new turn. Idle, Esc only shows
  ``esc again to edit previous message`` (a second Esc opens the backtrack view);
- Ctrl+C clears a non-empty composer but **quits Codex at once when the composer is empty and
  no turn runs**, so it is neither the clear key nor the interrupt key. Ctrl+U deletes to the
  start of the line, and at a line start the newline before it (harmless on an empty composer);
- Codex writes into the user's ``config.toml`` by itself unless it is already there:
  ``[tui] screen_reader_detection_done = true`` (first run) and
  ``[tui.model_availability_nux] "gpt-6.1-sol" = N`` (counts launches up to 4).
"""

import json
import re
from dataclasses import dataclass

from fleetbus.adapters.base import Adapter, HookSetup, SubmitProfile

#: Codex hook event -> (fleetbus event, timeout in s (Codex caps Interrupt hooks at 3 s), async).
#: The turn-end hooks run async: Codex finishes the turn without waiting for them, so the
#: sidecar hears ``turn-end`` only once the TUI takes a new prompt as a new turn (a synchronous
#: Stop hook reports idle while Codex still holds the turn open, and a send in that window
#: became a steer into the ending turn, answered ``queued``).
_EVENTS = {
    "SessionStart": ("session-start", 10, False),
    "UserPromptSubmit": ("prompt-submit", 10, False),
    "Stop": ("turn-end", 10, True),
    "Interrupt": ("turn-end", 3, True),
}


def _toml_string(text: str) -> str:
    """A TOML basic string (JSON's escapes are valid TOML; non-ASCII stays literal)."""
    return json.dumps(text, ensure_ascii=False)


def _hooks(hook_cmd: str) -> HookSetup:
    args = ["--no-daemon", "--dangerously-bypass-hook-trust"]
    for event, (ours, timeout, run_async) in _EVENTS.items():
        cmd = _toml_string(f"{hook_cmd} {ours}")
        extra = ",async=true" if run_async else ""
        args += ["-c", f'hooks.{event}=[{{hooks=[{{type="command",command={cmd},timeout={timeout}{extra}}}]}}]']
    return HookSetup(args=tuple(args))


@dataclass(frozen=True)
class CodexAdapter(Adapter):
    """Codex needs one thing the generic framing lacks: a trailing space."""

    def frame(self, body: str, msg_id: str, sender: str, slot: str) -> str:
        """The generic prefix framing plus one trailing space.

        A message ending in ``$<name>`` (or ``@<path>``) leaves Codex's completion popup open
        after the paste, and the submit key would then insert the completion instead of sending;
        a trailing space closes the popup, and Codex trims it from the prompt.

        >>> CODEX.frame("use $skill", "0123456789ab", "ops", "cx")
        '[fleet#0123456789ab ops -> cx] use $skill '
        """
        return super().frame(body, msg_id, sender, slot) + " "


CODEX = CodexAdapter(
    name="codex",
    command=("codex",),
    submit=SubmitProfile(key="Enter", delay_ms=0),
    has_hook=True,
    pane_commands=("node", "codex", "codex-*"),
    prompt=re.compile(r"^›(?: |$)"),
    # Ctrl+C would quit Codex on an empty composer: Ctrl+U line by line (each line's text, then
    # the newline before it), enough for 20 lines; extra ones do nothing
    clear_keys=("C-e",) + ("C-u",) * 40,
    reset_command="/clear",
    interrupt_key="Escape",
    marker_style="prefix",
    placeholders=("Ask Codex to do anything", "Ask a follow-up question"),
    hook_setup=_hooks,
    queued=re.compile(r"Messages to be submitted (?:after next tool call|at end of turn)|Queued follow-up inputs"),
    queue_shows_text=True,
    busy=re.compile(r"esc to interrupt\)"),
    paste_placeholder=re.compile(r"\[Pasted Content \d+ chars\]"),
    reset_event="screen",
    # SessionStart is lazy, so /clear is confirmed by the start-up view: the logo's full rows
    reset_screen=re.compile(r"⣿⣿⣿"),
    # a multi-line draft continues on rows indented by two spaces (blank lines kept)
    continuation=re.compile(r"^(?:  \S|$)"),
)
