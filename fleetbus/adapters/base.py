"""What fleetbus knows about one runtime: the :class:`Adapter` description.

Adapters describe and never act: the router and the sidecar read them to launch a runtime, type
into it, tell its prompt from typed text, and decide whether a pane's command is drift.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

#: the command a runtime's hooks run: this interpreter's ``fleet hook``, so no venv activation is needed
HOOK_COMMAND = f"{shlex.quote(sys.executable)} -m fleetbus hook"

#: The marker fleetbus puts in every framed message; ``<id>`` is the message id (12 hex chars).
MARKER_PREFIX = "fleet#"
MARKER_RE = re.compile(r"fleet#([0-9a-f]{12})\b")


def marker(msg_id: str) -> str:
    """Return the marker for message ``msg_id`` (``fleet#<id>``)."""
    return f"{MARKER_PREFIX}{msg_id}"


#: A message tag in tag position: at the start of a line (leading blanks allowed), the whole
#: ``[fleet#<id> <sender> -> <slot>]`` shape, with a sender of :data:`fleetbus.protocol.SENDER_RE`'s
#: characters and a slot name. A prompt that starts with a framed message (``prefix`` style) has
#: one at its start; runtimes that join queued prompts (one per line) have one per line.
TAG_RE = re.compile(r"^[ \t]*\[fleet#([0-9a-f]{12}) [A-Za-z0-9._@:+/=-]{1,64} -> [a-z0-9][a-z0-9._-]{0,39}\]",
                    re.MULTILINE)


def find_markers(text: str) -> list[str]:
    """Return the message ids of every marker in ``text``, in order of appearance (anywhere: for
    looking at a pane; acknowledgements use :func:`tag_markers`)."""
    return MARKER_RE.findall(text)


def tag_markers(prompt: str) -> list[str]:
    """Return the message ids of the message tags in tag position in ``prompt`` (a runtime's
    submitted prompt, from its hook), in order: only these may acknowledge a message. A marker
    elsewhere (quoted in a body, in a sender name, typed mid-line by a person) is not a tag.

    >>> tag_markers("[fleet#0123456789ab ops -> a] see fleet#ffffffffffff")
    ['0123456789ab']
    >>> tag_markers("please look at [fleet#0123456789ab ops -> a]")
    []
    """
    return TAG_RE.findall(prompt)


@dataclass(frozen=True)
class SubmitProfile:
    """How a message is submitted after it is pasted.

    Attributes:
        key: tmux key name sent after the paste (``Enter`` = carriage return).
        delay_ms: milliseconds to wait between the end of the paste and the key, for TUIs that
            debounce pastes.
    """

    key: str = "Enter"
    delay_ms: int = 0


@dataclass(frozen=True)
class HookSetup:
    """How a slot's runtime is wired to ``fleet hook``, per process and non-destructively.

    Attributes:
        args: extra launch arguments (e.g. ``--settings <file>``).
        env: extra environment for the runtime.
        files: file name -> content, written by the router into the slot's own folder under the
            fleet's state dir (never into the user's runtime config); ``{slot_dir}`` in args and
            env values is replaced by that folder.
    """

    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)


def command_hooks(hook_cmd: str, events: dict[str, str], **fields: object) -> dict[str, list]:
    """The ``hooks`` mapping of a runtime whose settings use Claude Code's shape (Claude Code,
    Gemini CLI): runtime event -> one matcher group running ``<hook_cmd> <fleetbus event>``.
    ``fields`` are added to each hook (``timeout`` is in s for Claude Code, ms for Gemini CLI)."""
    return {event: [{"hooks": [{**fields, "type": "command", "command": f"{hook_cmd} {ours}"}]}]
            for event, ours in events.items()}


@dataclass(frozen=True)
class Adapter:
    """Description of one runtime.

    Attributes:
        name: registry name used in rosters (``runtime: stub``).
        command: default launch argv (a roster ``command`` overrides it per slot).
        submit: the :class:`SubmitProfile`.
        has_hook: True when the runtime reports accepted prompts itself (``fleet hook`` or an
            in-process extension), so ``send --verify`` waits for a ``runtime-ack``; False means
            the pane-diff fallback decides.
        pane_commands: ``fnmatch`` patterns of ``pane_current_command`` values that are this
            runtime (anything else is ``DRIFT``).
        prompt: regex matching the prompt at the start of the input line; the text after it is
            what the user (or an earlier message) typed.
        clear_keys: tmux keys that empty the input line (``--on-busy-input=clear``).
        reset_command: text submitted by ``fleet reset`` (None: the runtime has none).
        interrupt_key: tmux key that stops the current turn or program.
        interrupt_presses: how many separate presses of ``interrupt_key`` (0.2 s apart) stop a
            turn (opencode 1.18.33 wants Esc twice, in two separate key events).
        marker_style: ``prefix`` puts ``[fleet#id from -> slot]`` before the body (agent TUIs);
            ``comment`` appends ``  # [fleet#id from -> slot]`` to the last line, so a shell or
            REPL runs the body unchanged.
        env: extra environment for the runtime process.
        placeholders: hint texts a TUI draws in its empty input line (not typed text).
        hook_setup: given the ``fleet hook`` command prefix (a shell-quoted string), returns the
            :class:`HookSetup` that wires this runtime's hooks to the slot's sidecar; None for
            runtimes without hooks, or whose hook is built in (the stub).
        queued: regex searched in the visible rows outside the input region: the TUI holds a
            submitted message in its own queue while a turn runs (``send`` answers ``queued``).
        queue_shows_text: the TUI shows each queued message's text (so its tag) on a ``queued``
            row or on the rows below it, up to the next blank row (its queue area): a message is
            then ``queued`` only while its marker is in that area, and taken once its marker shows
            elsewhere above the input line, whatever else is queued (:func:`fleetbus.router.verify.classify`).
        busy: regex searched in the visible rows: a turn is running (``fleet interrupt`` waits
            until it is gone).
        paste_placeholder: regex searched in the input region: a collapsed large paste sits
            there unsubmitted (a draft whose marker is hidden).
        reset_event: how ``fleet reset`` is confirmed: ``session-start`` (the runtime's own
            session-start hook event arrives after the reset command) or ``screen``
            (``reset_screen`` appears; for runtimes that start the new session lazily).
        reset_screen: regex searched in the visible screen (rows joined by newlines) confirming a
            reset (``screen`` mode).
        continuation: regex of the rows a multi-line draft continues on (e.g. Codex indents them
            by two spaces); the input region may grow upward across them to the prompt row.
        line_history: the pane's scrollback keeps everything typed into it (a line-oriented
            program that never redraws, clears or uses the alternate screen). A router that died
            while typing may then read "marker nowhere in the pane" as "never typed" and type
            the message after its restart; for every other runtime that case is ``unconfirmed``.
    """

    name: str
    command: tuple[str, ...]
    submit: SubmitProfile = SubmitProfile()
    has_hook: bool = False
    pane_commands: tuple[str, ...] = ()
    prompt: re.Pattern[str] = re.compile(r"^")
    clear_keys: tuple[str, ...] = ("C-e", "C-u")
    reset_command: str | None = None
    interrupt_key: str = "C-c"
    interrupt_presses: int = 1
    marker_style: Literal["prefix", "comment"] = "prefix"
    env: dict[str, str] = field(default_factory=dict)
    placeholders: tuple[str, ...] = ()
    hook_setup: Callable[[str], HookSetup] | None = None
    queued: re.Pattern[str] | None = None
    queue_shows_text: bool = False
    busy: re.Pattern[str] | None = None
    paste_placeholder: re.Pattern[str] | None = None
    reset_event: Literal["session-start", "screen"] = "session-start"
    reset_screen: re.Pattern[str] | None = None
    continuation: re.Pattern[str] | None = None
    line_history: bool = False

    def frame(self, body: str, msg_id: str, sender: str, slot: str) -> str:
        """Return the text typed into the slot for ``body``, carrying the message marker.

        >>> from fleetbus.adapters import get_adapter
        >>> get_adapter("stub").frame("hi", "0123456789ab", "ops", "a")
        '[fleet#0123456789ab ops -> a] hi'
        >>> get_adapter("shell").frame("echo hi", "0123456789ab", "ops", "sh0")
        'echo hi  # [fleet#0123456789ab ops -> sh0]'
        """
        tag = f"[{marker(msg_id)} {sender} -> {slot}]"
        if self.marker_style == "comment":
            return f"{body.rstrip(chr(10))}  # {tag}"
        return f"{tag} {body}"

    def typed_text(self, input_line: str) -> str:
        """Return what is typed on ``input_line`` after the prompt (stripped).

        When the prompt is not recognised the whole line counts as typed text (callers decide
        first, with :func:`fleetbus.router.verify.typed_text`, whether the pane is at its prompt).
        """
        m = self.prompt.match(input_line)
        rest = (input_line[m.end():] if m else input_line).strip()
        if any(rest.startswith(p) for p in self.placeholders):
            return ""
        return rest

    def is_expected_command(self, command: str | None) -> bool:
        """True when ``command`` (tmux ``pane_current_command``) is this runtime, not drift."""
        if not command:
            return False
        return any(fnmatch.fnmatchcase(command, pat) for pat in self.pane_commands)
