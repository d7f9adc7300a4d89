"""The stub agent: fleetbus's reference runtime, a line-oriented program for tests and demos.

It behaves like an agent TUI where it matters for delivery:

- it enables bracketed paste (DECSET 2004), so a pasted message, newlines included, becomes one
  draft; Enter outside a paste submits the draft;
- it shows its input line as ``stub> <draft>`` (newlines drawn as ``⏎``), so pane-diff can read
  it like any input box;
- on submit it reports ``prompt-submit`` (with the prompt) and ``turn-start`` through the hook
  path, prints a reply above its input line after ``--think-ms``, then reports ``turn-end``;
  its input line stays open during a turn, and prompts submitted then are queued (reported as
  ``prompt-queued``) and taken (``prompt-submit``) when the turn ends, as agent TUIs do. Like
  them it shows its queue: one ``(queued) <first line>`` row per waiting prompt, drawn right
  above its input line (its queue area) and removed, in the same screen update that prints the
  turn's reply, once the prompt is taken; C-c ends the turn (``turn-end``) and drops the queue;
  ``/clear`` starts a new session and reports ``session-start``;
- ``--ignore-enter`` models a program that never submits on Enter (the text stays a draft);
- ``--record FILE`` (or ``$FLEETBUS_STUB_RECORD``) appends one JSON line ``{"at": <unix s>,
  "session": <id>, "prompt": <text>}`` for every prompt it takes into a turn, written and fsynced
  before its ``prompt-submit`` hook: tests count deliveries from it (exactly once, none lost).

Run: ``python -m fleetbus.agents.stub [--think-ms MS] [--ignore-enter] [--record FILE]`` (``fleet-stub``).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import sys
import termios
import time
import tty
import unicodedata
import uuid

from fleetbus.agents.hook import send_hook

PASTE_START = b"\x1b[200~"
PASTE_END = b"\x1b[201~"
PROMPT = "stub> "
#: The start of each row of the stub's queue area (``Adapter.queued`` of the stub adapter).
QUEUED_ROW = "(queued) "


def cells(text: str) -> int:
    """Terminal cells ``text`` occupies (East Asian wide and fullwidth characters count 2)."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def clip(text: str, width: int) -> str:
    """``text`` cut to at most ``width`` cells."""
    out, n = [], 0
    for ch in text:
        n += cells(ch)
        if n > width:
            break
        out.append(ch)
    return "".join(out)


class Stub:
    """The stub's state machine; ``feed`` takes terminal input, ``tick`` ends due turns."""

    def __init__(self, think_ms: int, ignore_enter: bool, out=None, clock=time.monotonic, record=None):
        self.think_ms = think_ms
        self.record = record  # a text file (append mode) or None
        self.ignore_enter = ignore_enter
        self.out = out or sys.stdout
        self.clock = clock
        self.draft: list[str] = []
        self.in_paste = False
        self.pending = b""
        self.session_id = uuid.uuid4().hex
        self.turns = 0
        self.queue: list[str] = []
        self.current: str | None = None
        self.turn_end = 0.0
        self.shown = 0  # rows of the queue area drawn above the input line

    def width(self) -> int:
        """The terminal's width in cells (80 when the output is no terminal)."""
        try:
            return max(20, os.get_terminal_size(self.out.fileno()).columns)
        except (AttributeError, OSError, ValueError):
            return 80

    def home(self) -> str:
        """Escape sequence that moves the cursor from the end of the input line to the first row
        of the queue area (or of the input line) and clears from there to the end of the screen."""
        n = cells(self.render_input())
        up = (n - 1) // self.width() + self.shown if n else self.shown
        return (f"\x1b[{up}A" if up else "") + "\r\x1b[J"

    def block(self) -> str:
        """The queue area (one row per waiting prompt) and the input line, from a cleared row."""
        w = self.width()
        rows = [clip(QUEUED_ROW + q.split("\n", 1)[0], w - 1) for q in self.queue]
        self.shown = len(rows)
        return "".join(r + "\r\n" for r in rows) + self.render_input()

    def write(self, s: str) -> None:
        self.out.write(s)
        self.out.flush()

    def render_input(self) -> str:
        return PROMPT + "".join(self.draft).replace("\n", " ⏎ ")

    def add_text(self, text: str) -> None:
        self.draft.append(text)
        self.write(text.replace("\n", " ⏎ "))

    def submit(self) -> None:
        text = "".join(self.draft)
        out = self.home() + self.render_input() + "\r\n"  # the submitted line, above the queue area
        self.draft = []
        if text.strip() == "/clear" and self.current is None:
            self.session_id = uuid.uuid4().hex
            self.queue.clear()
            send_hook("session-start", session_id=self.session_id)
            out += "(new session)\r\n"
        elif text.strip():
            if self.current is None:
                self.start_turn(text)
            else:  # busy: hold it, as agent TUIs queue prompts typed during a turn
                self.queue.append(text)
                send_hook("prompt-queued", prompt=text, session_id=self.session_id)
        self.write(out + self.block())  # one update: a queued prompt never shows without its queue row

    def start_turn(self, text: str) -> None:
        # taking a prompt and reporting it is one step: a SIGHUP (its tmux server died) or SIGTERM
        # waits until both are done (SIGKILL cannot be held off: that window stays, microseconds)
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP, signal.SIGTERM})
        try:
            if self.record is not None:
                self.record.write(json.dumps({"at": time.time(), "session": self.session_id, "prompt": text}) + "\n")
                self.record.flush()
                os.fsync(self.record.fileno())
            send_hook("prompt-submit", prompt=text, session_id=self.session_id)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        send_hook("turn-start", session_id=self.session_id)
        self.current = text
        self.turn_end = self.clock() + self.think_ms / 1000

    def tick(self) -> None:
        """Finish the current turn if its time has come: print the reply above the input line."""
        while self.current is not None and self.clock() >= self.turn_end:
            text, self.current = self.current, None
            self.turns += 1
            first = text.split("\n", 1)[0]
            out = self.home() + (f"reply #{self.turns}: got {len(text)} chars in {text.count(chr(10)) + 1} line(s): "
                                 f"{first[:80]}\r\n")
            send_hook("turn-end", session_id=self.session_id)
            if self.queue:
                self.start_turn(self.queue.pop(0))
            self.write(out + self.block())

    def interrupt(self) -> None:
        """C-c: drop the draft, the queue and the current turn (reported as ``turn-end``)."""
        out = self.home()
        self.draft = []
        self.queue.clear()
        if self.current is not None:
            self.current = None
            send_hook("turn-end", session_id=self.session_id, source="interrupt")
        self.write(out + "^C\r\n" + self.block())

    def timeout(self) -> float | None:
        """Seconds until the current turn ends (None when idle)."""
        return None if self.current is None else max(0.0, self.turn_end - self.clock())

    def feed(self, data: bytes) -> None:
        """Consume raw terminal input (handles paste markers split across reads)."""
        buf = self.pending + data
        self.pending = b""
        while buf:
            marker = PASTE_END if self.in_paste else PASTE_START
            idx = buf.find(marker)
            if idx < 0:
                # keep a possible partial marker for the next read
                keep = 0
                for k in range(min(len(marker) - 1, len(buf)), 0, -1):
                    if marker.startswith(buf[-k:]):
                        keep = k
                        break
                chunk, self.pending = buf[: len(buf) - keep], buf[len(buf) - keep:]
                buf = b""
            else:
                chunk, buf = buf[:idx], buf[idx + len(marker):]
            self._chunk(chunk.decode("utf-8", "replace"))
            if idx >= 0:
                self.in_paste = not self.in_paste

    def _chunk(self, text: str) -> None:
        if self.in_paste:
            self.add_text(text.replace("\r\n", "\n").replace("\r", "\n"))
            return
        for ch in text:
            if ch in "\r\n":
                if not self.ignore_enter:
                    self.submit()
            elif ch in "\x7f\x08":
                if self.draft and self.draft[-1]:
                    self.draft[-1] = self.draft[-1][:-1]
                    self.write("\b \b")
            elif ch == "\x15":  # C-u: clear the line
                out = self.home()
                self.draft = []
                self.write(out + self.block())
            elif ch >= " " or ch == "\t":
                self.add_text(ch)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fleet-stub", description=__doc__.split("\n\n")[0])
    ap.add_argument("--think-ms", type=int, default=100, help="time a turn takes, in ms (default 100)")
    ap.add_argument("--ignore-enter", action="store_true", help="never submit on Enter (a stuck draft)")
    ap.add_argument("--record", default=os.environ.get("FLEETBUS_STUB_RECORD"),
                    help="append a JSON line per prompt taken to FILE (default $FLEETBUS_STUB_RECORD)")
    args = ap.parse_args(argv)
    record = open(args.record, "a", encoding="utf-8") if args.record else None
    stub = Stub(args.think_ms, args.ignore_enter, record=record)
    fd = sys.stdin.fileno()
    old = termios.tcgetattr(fd) if os.isatty(fd) else None
    if old is not None:
        tty.setcbreak(fd)

    signal.signal(signal.SIGINT, lambda *_: stub.interrupt())
    stub.write("\x1b[?2004h")
    stub.write(f"fleetbus stub agent (slot {os.environ.get('FLEETBUS_SLOT', '?')}, session {stub.session_id[:8]})\r\n")
    send_hook("session-start", session_id=stub.session_id)
    stub.write(PROMPT)
    try:
        while True:
            ready, _, _ = select.select([fd], [], [], stub.timeout())
            if ready:
                data = os.read(fd, 65536)
                if not data:
                    return 0
                stub.feed(data)
            stub.tick()
    finally:
        if old is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, old)
        stub.write("\x1b[?2004l")


if __name__ == "__main__":
    sys.exit(main())
