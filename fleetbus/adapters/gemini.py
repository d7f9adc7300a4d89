"""``gemini``: Gemini CLI, acknowledged by its own ``BeforeAgent`` hook.

Facts (``@google/gemini-cli`` 0.61.0 in tmux 3.3a, checked here against the mock model server):

- main screen (``alternate_on=0``); the input row is `` > `` + text (`` * `` in YOLO mode, `` ! `` in
  shell mode, which the prompt regex leaves out on purpose), drawn between a ``────`` rule and the
  ``workspace (/directory) … /model`` footer. Empty it reads `` >   Type your message or
  @path/to/file`` with the cursor at column 3 of that row; typed text reads `` > hello`` with the
  cursor after it; extra lines of a multi-line draft are indented by 3 spaces. The cursor stays
  on the input row while a turn runs, so text typed then is found the same way;
- busy: a status row ``⠏ Thinking... (esc to cancel, 3s)`` (also ``Executing Hooks: … (esc to
  cancel, 0s)`` while hooks run); when idle an ``Executing Hooks: …`` line may linger without the
  ``esc to cancel`` part. Enter while busy queues the message: ``  Queued (press ↑ to edit):``
  above the status row with the text indented below it, and ``BeforeAgent`` fires only when it is
  dequeued (after the running turn's ``AfterAgent``);
- every bracketed paste arms a 40 ms timer (``InputPrompt``: ``recentUnsafePasteTime``, tmux has
  no kitty keyboard protocol), and an Enter inside it inserts a newline instead of submitting.
  The timer starts when node handles the paste, so under load 100 ms still failed now and then;
  300 ms never did mid-session (27 tries of short, multi-line and 5,589-char pastes, then 200
  sends in the runtime tests). Start-up is the exception: node's event loop stalls for 0.1-2.4 s
  until just after the banner and the SessionStart hooks, and an Enter then still becomes a
  newline: the draft is the message plus an empty second input row with the cursor on it, which
  the router's input region (wrapped rows only) does not reach yet. A paste of more than 5 lines
  or 500 chars collapses to ``[Pasted Text: 80 lines]`` (``[Pasted Text: N chars]``) and is
  expanded on submit; a trailing ``\\`` before Enter also becomes a newline;
- ``pane_current_command`` is ``node`` idle and busy (hooks run as its children). By default
  ``gemini.js`` re-spawns itself as a child ``node --max-old-space-size=…`` and the parent ignores
  SIGINT/SIGTERM/SIGHUP, so ``kill-session``/``respawn-pane -k`` leave both running as orphans
  and SIGTERM to the pane's pid does nothing. ``GEMINI_CLI_NO_RELAUNCH=true`` (set below) keeps
  one process: SIGHUP and SIGTERM end it (after its ``SessionEnd`` hook), SIGKILL of course too;
- hooks: events ``SessionStart`` (``source`` startup|resume|clear) → ``session-start``,
  ``BeforeAgent`` (``prompt``, ``session_id``) → ``prompt-submit``, ``AfterAgent`` (also after
  Esc cancels a turn) → ``turn-end``. Command hooks run through ``bash -c`` with the JSON payload
  on stdin; stdout must be empty or JSON (``fleet hook`` prints nothing). Hooks of all settings
  layers and extensions are concatenated, so the user's own hooks keep running;
- ``/clear`` fires ``SessionEnd{reason: clear}`` + ``SessionStart{source: clear}`` at once, with
  a new ``session_id``; Esc cancels a turn (``ℹ Request cancelled.``); Ctrl+C empties a non-empty
  input (even during a turn, which goes on) but cancels a turn / arms "Press Ctrl+C again to
  exit" when the input is empty, so it is only a clear key because fleetbus sends clear keys only
  when it sees typed text. (Esc Esc on an empty input runs ``/rewind``, Ctrl+U clears one line.)

How the hooks are installed per process (the user's ``~/.gemini/settings.json`` is never
written, stays byte-identical and is still the settings file Gemini reads):

- Gemini has no flag for an extra settings file. ``GEMINI_CLI_SYSTEM_SETTINGS_PATH`` /
  ``GEMINI_CLI_SYSTEM_DEFAULTS_PATH`` exist, but those files are skipped ("Security Warning:
  Skipping system defaults file …") unless the file and every parent directory are owned by
  root and not group/other-writable, so they are no use for a user's fleet. Extensions are
  read only from ``$GEMINI_CLI_HOME/.gemini/extensions`` (``GEMINI_CLI_HOME`` defaults to the
  home directory).
- So the slot runs with ``GEMINI_CLI_HOME`` pointing at an overlay home in the slot's folder:
  every entry of the real home is a symlink to the real one, ``.gemini`` is a folder of symlinks
  to the real ``~/.gemini`` entries (``settings.json`` always, even before it exists, so settings
  Gemini saves still land in the user's file), and ``.gemini/extensions`` holds symlinks to the
  user's extensions plus ours, ``fleetbus-ack``, whose ``hooks/hooks.json`` runs ``fleet hook``.
  A small preload (``node --require``, given through ``NODE_OPTIONS``) builds the overlay when
  Gemini starts (the router only writes flat files), points ``GEMINI_CLI_HOME`` at it and drops
  itself from ``NODE_OPTIONS`` so nothing Gemini starts loads it again. If it fails, Gemini runs
  as usual without our hooks, and ``gemini-home.error`` in the slot folder says why.
- Left as is: ``hooksConfig.notifications`` stays the user's (an extension cannot set it), so
  "Executing Hook: fleetbus-ack" shows briefly; files Gemini creates for the first time during
  the run (other than ``settings.json``) and files it replaces by rename (``trustedFolders.json``,
  ``state.json``) stay in the overlay; with the workdir equal to the home directory the user's
  settings would load twice (as user and workspace settings).
"""

import json
import re

from fleetbus.adapters.base import Adapter, HookSetup, SubmitProfile, command_hooks

_EVENTS = {"SessionStart": "session-start", "BeforeAgent": "prompt-submit", "AfterAgent": "turn-end"}
EXTENSION = "fleetbus-ack"
PRELOAD = "gemini-overlay.cjs"
HOOKS = "gemini-hooks.json"

#: Files linked into the overlay's ``.gemini`` even when they do not exist yet, so that Gemini
#: creates them in the user's ``~/.gemini`` (where it would have without fleetbus).
_ALWAYS_LINKED = ("settings.json",)

_PRELOAD_JS = r"""// fleetbus: per-process Gemini CLI home overlay that adds the fleetbus-ack extension.
// Written by the router into the slot's folder; see fleetbus/adapters/gemini.py.
"use strict";
(() => {
  const fs = require("fs");
  const os = require("os");
  const path = require("path");
  const me = __filename;
  const opts = (process.env.NODE_OPTIONS || "")
    .replace(/--require[= ]("[^"]*"|'[^']*'|\S+)/g, (m, p) => (p.replace(/^["']|["']$/g, "") === me ? "" : m))
    .trim();
  if (opts) process.env.NODE_OPTIONS = opts;
  else delete process.env.NODE_OPTIONS;
  const dir = __dirname;
  const overlay = path.join(dir, "gemini-home");
  const real = process.env.GEMINI_CLI_HOME || os.homedir();
  if (!real || path.resolve(real) === overlay) return;
  const entries = (d) => { try { return fs.readdirSync(d); } catch { return []; } };
  const link = (target, at) => { try { fs.symlinkSync(target, at); } catch (e) { if (e.code !== "EEXIST") throw e; } };
  const mirror = (src, dst, skip) => {
    fs.mkdirSync(dst, { recursive: true, mode: 0o700 });
    for (const n of entries(src)) if (!skip.includes(n)) link(path.join(src, n), path.join(dst, n));
  };
  try {
    fs.rmSync(overlay, { recursive: true, force: true });
    fs.rmSync(path.join(dir, "gemini-home.error"), { force: true });
    const realGem = path.join(real, ".gemini");
    const gem = path.join(overlay, ".gemini");
    mirror(real, overlay, [".gemini"]);
    mirror(realGem, gem, ["extensions"]);
    if (fs.existsSync(realGem)) for (const f of ALWAYS) link(path.join(realGem, f), path.join(gem, f));
    const ext = path.join(gem, "extensions");
    mirror(path.join(realGem, "extensions"), ext, [NAME]);
    const ours = path.join(ext, NAME);
    fs.mkdirSync(path.join(ours, "hooks"), { recursive: true, mode: 0o700 });
    fs.writeFileSync(path.join(ours, "gemini-extension.json"), JSON.stringify(
      { name: NAME, version: "1.0.0", description: "fleetbus: reports accepted prompts to the slot's sidecar" }));
    fs.copyFileSync(path.join(dir, HOOKS), path.join(ours, "hooks", "hooks.json"));
    process.env.GEMINI_CLI_HOME = overlay;
  } catch (e) {
    try { fs.writeFileSync(path.join(dir, "gemini-home.error"), String((e && e.stack) || e) + "\n"); } catch {}
  }
})();
"""


def _preload() -> str:
    consts = (f"const NAME = {json.dumps(EXTENSION)};\n  const HOOKS = {json.dumps(HOOKS)};\n"
              f"  const ALWAYS = {json.dumps(list(_ALWAYS_LINKED))};\n  ")
    return _PRELOAD_JS.replace('const fs = require("fs");', consts + 'const fs = require("fs");', 1)


def _hooks(hook_cmd: str) -> HookSetup:
    hooks = {"hooks": command_hooks(hook_cmd, _EVENTS, name=EXTENSION, timeout=10000)}
    return HookSetup(env={"NODE_OPTIONS": f'--require "{{slot_dir}}/{PRELOAD}"'},
                     files={PRELOAD: _preload(), HOOKS: json.dumps(hooks, indent=2)})


GEMINI = Adapter(
    name="gemini",
    command=("gemini",),
    submit=SubmitProfile(key="Enter", delay_ms=300),
    has_hook=True,
    pane_commands=("node", "gemini"),
    prompt=re.compile(r"^ [>*] "),
    clear_keys=("C-c",),
    reset_command="/clear",
    interrupt_key="Escape",
    marker_style="prefix",
    # one process (SIGTERM ends it); CI=false: with CI set (inherited from a CI job that started the
    # fleet) Gemini CLI 0.61.0 runs non-interactively and exits 42 ("No input provided via stdin")
    env={"GEMINI_CLI_NO_RELAUNCH": "true", "CI": "false"},
    placeholders=("Type your message or", "Press 'Esc' for NORMAL mode.",
                  "Press 'i' for INSERT mode."),
    hook_setup=_hooks,
    queued=re.compile(r"^\s*Queued \(press \S+ to edit\):"),
    queue_shows_text=True,
    busy=re.compile(r"\(esc to cancel\b"),
    paste_placeholder=re.compile(r"\[Pasted Text: \d+ (?:lines|chars)(?: #\d+)?\]"),
    reset_event="session-start",
    # extra rows of a multi-line draft are indented by three spaces (blank rows kept)
    continuation=re.compile(r"^(?:   |$)"),
)
