"""``opencode``: opencode (``opencode-ai``), acknowledged by a fleetbus plugin.

Facts (opencode 1.18.33, a Bun-compiled binary with Bun 1.3.14, in tmux 3.3a, checked here
against the mock model server):

- the plugin is loaded per process: ``OPENCODE_CONFIG={slot_dir}/opencode-fleetbus.json`` names
  an *additional* config file (loaded after ``~/.config/opencode/opencode.json``, before the
  project's), whose ``"plugin": ["./fleetbus-opencode.js"]`` is resolved against that file's
  folder. The user's provider/model settings still apply (the plugin lists merge) and the user's
  ``opencode.json`` is never written (opencode itself only adds a missing ``$schema`` to the
  config files it reads, and installs ``@opencode-ai/plugin`` into ``~/.config/opencode/``).
  ``OPENCODE_CONFIG_DIR`` (``plugins/*.js``) works too, but opencode then runs an npm install of
  ``@opencode-ai/plugin`` into that folder;
- ``node:net`` works inside the Bun binary; the plugin writes JSON lines to
  ``$FLEETBUS_HOOK_STREAM`` over one persistent connection (events keep their order); without
  the socket lines wait at most 10 s and are dropped, opencode never sees an error;
- ``chat.message`` fires at Enter, also while a turn runs (the message is then stored at once,
  the pane shows it with a `` QUEUED `` badge); the plugin reports it as ``prompt-submit`` when
  the session is idle and as ``prompt-queued`` while busy. A queued message is taken into a turn
  when opencode creates the assistant message answering it (``message.updated``, role
  ``assistant``, ``parentID`` = that user message, a few ms before the model request): then
  ``prompt-submit``. Several messages queued during one turn are answered by ONE turn (its
  ``parentID`` is the newest; the older ones reach the model as earlier user messages in the
  same request), so every queued message up to that ``parentID`` is reported then. After an
  interrupt, queued messages stay in the session unanswered and are reported with the next turn;
- ``session.created`` fires lazily with the first prompt of a session (before its
  ``chat.message``) → ``session-start``; a prompt in another session (``-c``, session list)
  sends ``session-start`` first; subagent sessions (``parentID``) are ignored;
  ``session.status`` busy/idle (busy repeats per step) → ``turn-start``/``turn-end``;
- ``/new`` (typed or pasted, then Enter) is handled by the TUI alone: no bus event; the screen
  goes back to the home logo with ``Ask anything… "<example>"`` (shown only for a new session),
  so resets are confirmed by the screen;
- alternate screen; ``pane_current_command`` is ``opencode`` (one process, idle and busy);
- the input box: rows ``┃  <text>`` (``┃`` U+2503, two spaces) between an empty ``┃`` row and
  the ``┃  Build · <model>`` row, closed by ``╹▀▀▀``. Home screen: centred (column 43 at 160
  columns), session screen: column 2. The cursor sits on the box's text row, idle and busy
  (after the typed text); a draft wrapped or spread over several rows grows the box upward,
  the cursor on its last row. Conversation messages are drawn with the same ``┃  `` gutter, so
  the input region is: the cursor row, up across ``┃  <text>`` rows (``continuation``) to the
  box's empty ``┃`` top row (``prompt``; an empty input row looks the same);
- busy: ``esc interrupt`` on the status row under the box (``esc again to interrupt`` after one
  Esc). Interrupt needs TWO separate Esc presses within 5 s (0.05-0.3 s apart worked; sent in one
  ``send-keys`` they do nothing); opencode answers with ``session.error`` (MessageAbortedError) +
  ``session.status idle`` and marks the message ``interrupted``;
- tmux 3.3a ignores synchronized output, so a capture can catch opencode mid-frame with the
  cursor elsewhere (a conversation row while the sidebar redraws, the status row) for up to
  ~30 ms, mostly within 0.3 s of a turn's end; after the first prompt of a session the screen is
  blank with the cursor hidden in the bottom-right corner for 0.3-6 s (the first turn of a
  process waits ~6 s before the model request). A single capture can thus read as not at the
  prompt or as holding text;
- a bracketed paste of 3+ lines or over 150 chars collapses to ``[Pasted ~N lines]``
  (``[Pasted ~1 lines]`` for a long single line) and is expanded on submit; Enter after the
  paste submits it (also a 5,700-char, 68-line paste), with one trailing space added. The TUI
  inserts a paste only after an ``await`` (it first checks whether the text is a file path), so
  an Enter sent at once can be handled before the text lands: ``/new`` + Enter at once left
  ``/new`` in the input (autocomplete popup open, no reset) in 4 of 50 tries, 0 of 25 with
  100 ms between paste and Enter; hence ``delay_ms=150``;
- Ctrl+U deletes to the start of the line (also removes a paste placeholder); ``End C-u BSpace
  C-u`` cleared a 3-row wrapped draft. Ctrl+C clears the whole input when it holds text, but on
  an EMPTY input it quits opencode at once, so it is not a clear key here;
- the session sidebar (title, Context, LSP) is drawn right of the session screen's box on wide
  panes; :meth:`_OpencodeAdapter.typed_text` drops what follows a 4+ space gap on the input row.
"""

import json
import re

from fleetbus.adapters.base import Adapter, HookSetup, SubmitProfile
from fleetbus.adapters.hookstream import STREAM_CLIENT_JS

PLUGIN_FILE = "fleetbus-opencode.js"
CONFIG_FILE = "opencode-fleetbus.json"

#: The opencode plugin: forwards chat and session events to the slot's sidecar.
PLUGIN = (r"""// fleetbus: reports opencode's prompt, turn and session events to this slot's fleetbus
// sidecar (written by fleetbus into the slot's folder and loaded through $OPENCODE_CONFIG).
// One JSON object per line on the Unix stream socket named by $FLEETBUS_HOOK_STREAM, over one
// persistent connection, so events keep their order. Never blocks opencode and never throws
// into it: without the variable it does nothing; while the socket is missing, lines wait at
// most 10 s for it and are then dropped.
import * as net from "node:net";

const MAX_PENDING = 200;
@@STREAM_CLIENT@@
export const FleetbusPlugin = async () => {
  const { send } = fleetbusStream(process.env.FLEETBUS_HOOK_STREAM || "");

  const children = new Set();   // subagent sessions: not the slot's conversation
  let current = null;           // the session last announced with session-start
  const busy = new Map();       // session -> a turn runs (or is about to start)
  const reported = new Map();   // session -> last turn event sent ("busy" | "idle")
  const pending = new Map();    // session -> [{id, text}] stored while busy, not yet in a turn

  const announce = (sid, source) => {
    if (!sid || sid === current) return;
    current = sid;
    send({ event: "session-start", session_id: sid, source });
  };
  const textOf = (parts) => {
    const all = (Array.isArray(parts) ? parts : [])
      .filter((p) => p && p.type === "text" && typeof p.text === "string");
    const own = all.filter((p) => !p.synthetic);
    return (own.length ? own : all).map((p) => p.text).join("\n");
  };
  const turn = (sid, state) => {
    busy.set(sid, state === "busy");
    if (reported.get(sid) === state) return;
    reported.set(sid, state);
    send({ event: state === "busy" ? "turn-start" : "turn-end", session_id: sid, source: "session.status" });
  };
  // the assistant message answering user message `parentID` was created: every message stored
  // while busy up to that one is now part of the model request
  const taken = (sid, parentID) => {
    const q = pending.get(sid);
    if (!q || q.length === 0) return;
    const due = q.filter((m) => !m.id || m.id <= parentID);
    if (due.length === 0) return;
    pending.set(sid, q.filter((m) => m.id && m.id > parentID));
    for (const m of due) send({ event: "prompt-submit", prompt: m.text, session_id: sid, source: "dequeued" });
  };

  return {
    "chat.message": async (input, output) => {
      try {
        const sid = (input && input.sessionID) || (output && output.message && output.message.sessionID);
        if (!sid || children.has(sid)) return;
        announce(sid, "resume");
        const text = textOf(output && output.parts);
        const id = (output && output.message && output.message.id) || (input && input.messageID) || "";
        if (busy.get(sid)) {
          const q = pending.get(sid) || [];
          q.push({ id, text });
          pending.set(sid, q.slice(-MAX_PENDING));
          send({ event: "prompt-queued", prompt: text, session_id: sid, source: "busy" });
        } else {
          busy.set(sid, true);
          send({ event: "prompt-submit", prompt: text, session_id: sid, source: "idle" });
        }
      } catch {}
    },
    event: async ({ event }) => {
      try {
        const type = event && event.type;
        const p = (event && event.properties) || {};
        if (type === "session.created") {
          const info = p.info || {};
          const sid = info.id || p.sessionID;
          if (!sid) return;
          if (info.parentID) { children.add(sid); return; }
          announce(sid, "new");
        } else if (type === "session.status") {
          const sid = p.sessionID;
          const st = p.status && p.status.type;
          if (!sid || !st || children.has(sid)) return;
          turn(sid, st === "idle" ? "idle" : "busy");
        } else if (type === "session.idle") {
          if (p.sessionID && !children.has(p.sessionID)) turn(p.sessionID, "idle");
        } else if (type === "message.updated") {
          const info = p.info || {};
          if (info.role === "assistant" && info.parentID && info.sessionID && !children.has(info.sessionID)) {
            taken(info.sessionID, info.parentID);
          }
        } else if (type === "session.deleted") {
          const sid = (p.info && p.info.id) || p.sessionID;
          if (sid) { busy.delete(sid); reported.delete(sid); pending.delete(sid); children.delete(sid); }
        }
      } catch {}
    },
  };
};
""").replace("@@STREAM_CLIENT@@\n", STREAM_CLIENT_JS)


def _hooks(hook_cmd: str) -> HookSetup:
    """The plugin file and the extra config that loads it (``hook_cmd`` is unused: the plugin
    talks to the sidecar over ``$FLEETBUS_HOOK_STREAM``)."""
    config = {"$schema": "https://opencode.ai/config.json", "plugin": [f"./{PLUGIN_FILE}"]}
    return HookSetup(env={"OPENCODE_CONFIG": f"{{slot_dir}}/{CONFIG_FILE}"},
                     files={CONFIG_FILE: json.dumps(config, indent=2) + "\n", PLUGIN_FILE: PLUGIN})


#: The sidebar of the session screen sits this far right of anything typed in the input box.
_SIDEBAR_GAP = re.compile(r" {8,}")


class _OpencodeAdapter(Adapter):
    """opencode's input is a box: its region (from the cursor row up to the box's empty top row,
    see ``prompt`` and ``continuation``) arrives as rows joined without separators, each
    starting with the ``┃`` gutter. The typed text is what follows the gutters (two spaces of
    padding dropped), without the session sidebar drawn right of the box on wide panes."""

    def typed_text(self, input_line: str) -> str:
        rows = input_line.split("┃")[1:] or [input_line]
        texts = []
        for row in rows:
            row = row[2:] if row.startswith("  ") else row.lstrip(" ")
            text = _SIDEBAR_GAP.split(row, maxsplit=1)[0].strip()
            if text:
                texts.append(text)
        rest = " ".join(texts)
        if any(rest.startswith(p) for p in self.placeholders):
            return ""
        return rest


OPENCODE = _OpencodeAdapter(
    name="opencode",
    command=("opencode",),
    submit=SubmitProfile(key="Enter", delay_ms=150),
    has_hook=True,
    pane_commands=("opencode", "opencode.exe"),
    # the box's empty top row (only the sidebar, far right, may share it); an empty input row
    # looks the same and is its own region
    prompt=re.compile(r"^ *┃(?= *$| {8,}\S)"),
    clear_keys=("End", "C-u", "BSpace", "C-u"),
    reset_command="/new",
    interrupt_key="Escape",
    interrupt_presses=2,
    marker_style="prefix",
    placeholders=("Ask anything…", "Run a command…"),
    hook_setup=_hooks,
    queued=re.compile(r"^ *┃ +QUEUED\b"),
    busy=re.compile(r"\besc (?:again to )?interrupt\b"),
    paste_placeholder=re.compile(r"\[Pasted ~\d+ lines?\]"),
    reset_event="screen",
    reset_screen=re.compile(r"^ *┃ +Ask anything… ", re.M),
    # the box's text rows above the cursor row: a draft wrapped or spread over several rows
    continuation=re.compile(r"^ *┃  \S"),
)
