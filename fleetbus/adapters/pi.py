"""``pi``: the pi coding agent (``@mariozechner/pi-coding-agent``), acknowledged by a fleetbus extension.

Facts (pi 0.73.1 in tmux 3.3a, checked here against the mock model server):

- the extension is loaded per process with ``-e {slot_dir}/fleetbus-pi.ts`` (a ``.js`` file loads
  too); the user's auto-discovered extensions still load and fleetbus writes nothing into the
  agent dir (``models.json``/``settings.json`` stay byte-identical; pi itself only adds
  ``lastChangelogVersion`` to settings.json on a first start when it is missing);
- the extension writes JSON lines to ``$FLEETBUS_HOOK_STREAM`` over one persistent ``node:net``
  connection per session (order kept): ``session_start`` → ``session-start`` (session id, reason
  ``startup``/``new``/...), ``input`` while ``!ctx.isIdle()`` → ``prompt-queued`` (pi holds it as
  a steering message, pane shows `` Steering: <text>``), ``message_start`` with role ``user`` →
  ``prompt-submit`` with the message text (markers intact; a steering message fires it when it
  is delivered), ``agent_start``/``agent_end`` → ``turn-start``/``turn-end``. An idle ``input``
  is not reported: its ``message_start`` follows within milliseconds and is the truthful signal.
  Without the socket the events wait up to 10 s and are then dropped; pi never sees an error;
- ``/new`` fires ``session_shutdown`` then ``session_start{reason: new}`` with a new session id
  (pi re-imports the extension for the new session); the screen shows ``✓ New session started``;
- the input editor has no prompt glyph and no indentation: it sits between two full-width ``─``
  rules on the main screen, the cursor on the editor row (idle and busy); an empty editor row
  captures as ``""``. So ``prompt`` matches the top rule (``─── ↑ N more ───`` when scrolled),
  which the input region reaches as the full-width row right above the cursor row. A draft
  spread over several word-wrapped or multi-line rows hides the rule from that walk (the pane
  then reads as not at its prompt);
- pi-tui writes each frame and then, in a second write, moves the hardware cursor back to the
  editor: a capture in between shows the cursor at the end of the last redrawn row, i.e. not at
  the prompt (0.4 % of captures while the spinner runs; up to ~0.4 s right after start-up on a
  loaded machine, when the footer is already drawn);
- ``pane_current_command`` is ``node`` for ~2 s after start, then ``pi`` (``process.title``);
- busy: the loader row `` ⠧ Working...`` above the editor from agent_start to agent_end;
- a bracketed paste of more than 10 lines or 1000 chars collapses to ``[paste #1 +80 lines]``;
  Enter right after any paste submits it whole;
- Esc interrupts the turn (``agent_end`` fires) and puts queued steering messages back into the
  editor; Ctrl+U deletes to the line start (Ctrl+C would clear all, but twice in 500 ms quits pi).
"""

import re

from fleetbus.adapters.base import Adapter, HookSetup, SubmitProfile
from fleetbus.adapters.hookstream import STREAM_CLIENT_JS

EXTENSION_FILE = "fleetbus-pi.ts"

#: The extension pi loads with ``-e``: forwards its events to the slot's sidecar.
EXTENSION = r"""// fleetbus: reports pi's prompt and turn events to this slot's fleetbus sidecar.
// One JSON object per line on the Unix stream socket named by $FLEETBUS_HOOK_STREAM (one
// persistent connection per session, so events keep their order). Never blocks pi and never
// throws into it: without the variable it does nothing, and while the socket is missing events
// wait at most 10 s for it, then are dropped.
import * as net from "node:net";

@@STREAM_CLIENT@@
export default function fleetbus(pi: any) {
  const path = process.env.FLEETBUS_HOOK_STREAM;
  if (!path) return;
  const { send, close } = fleetbusStream(path);
  const sessionId = (ctx: any) => {
    try { return ctx.sessionManager.getSessionId(); } catch { return undefined; }
  };
  const idle = (ctx: any) => {
    try { return ctx.isIdle(); } catch { return true; }
  };
  const textOf = (content: any): string => {
    if (typeof content === "string") return content;
    if (!Array.isArray(content)) return "";
    return content.filter((p: any) => p && p.type === "text" && typeof p.text === "string")
      .map((p: any) => p.text).join("\n");
  };

  pi.on("session_start", (event: any, ctx: any) => {
    send({ event: "session-start", session_id: sessionId(ctx), source: String(event?.reason ?? "") });
  });
  // typed while a turn runs: pi holds it as a steering/follow-up message (prompt-queued);
  // typed while idle: nothing yet, the user message_start follows within milliseconds
  pi.on("input", (event: any, ctx: any) => {
    if (!idle(ctx)) {
      send({ event: "prompt-queued", prompt: String(event?.text ?? ""), session_id: sessionId(ctx),
             source: String(event?.source ?? "") });
    }
    return { action: "continue" };
  });
  // the prompt is delivered to the model turn (also a steering/follow-up message taken from the queue)
  pi.on("message_start", (event: any, ctx: any) => {
    const m = event?.message;
    if (!m || m.role !== "user") return;
    send({ event: "prompt-submit", prompt: textOf(m.content), session_id: sessionId(ctx) });
  });
  pi.on("agent_start", (_event: any, ctx: any) => { send({ event: "turn-start", session_id: sessionId(ctx) }); });
  pi.on("agent_end", (_event: any, ctx: any) => { send({ event: "turn-end", session_id: sessionId(ctx) }); });
  // /new, /resume, /fork and quit tear this instance down (the next session loads a fresh one)
  pi.on("session_shutdown", () => close());
}
""".replace("@@STREAM_CLIENT@@\n", STREAM_CLIENT_JS)


def _hooks(_hook_cmd: str) -> HookSetup:
    """In-process: the extension talks to ``$FLEETBUS_HOOK_STREAM`` itself; ``fleet hook`` is unused."""
    return HookSetup(args=("-e", f"{{slot_dir}}/{EXTENSION_FILE}"), files={EXTENSION_FILE: EXTENSION})


PI = Adapter(
    name="pi",
    command=("pi",),
    submit=SubmitProfile(key="Enter", delay_ms=0),
    has_hook=True,
    pane_commands=("pi", "node"),
    prompt=re.compile(r"^─{3}(?: ↑ \d+ more )?─*"),
    clear_keys=("C-e", "C-u"),
    reset_command="/new",
    interrupt_key="Escape",
    marker_style="prefix",
    hook_setup=_hooks,
    queued=re.compile(r"(?m)^ (?:Steering|Follow-up): "),
    queue_shows_text=True,
    busy=re.compile(r"(?m)^ [⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏] (?:Working\.\.\.|Compacting context\.\.\.|Retrying \()"),
    paste_placeholder=re.compile(r"\[paste #\d+(?: \+\d+ lines| \d+ chars)?\]"),
    reset_event="session-start",
    reset_screen=re.compile(r"✓ New session started"),
)
