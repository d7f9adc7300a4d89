"""The stub agent: fleetbus's reference runtime, a line-oriented program for tests and demos.

It behaves like an agent TUI where it matters for delivery:

- it enables bracketed paste (DECSET 2004), so a pasted message, newlines included, becomes one
  draft; Enter outside a paste submits the draft;
- it shows its input line as ``stub> <draft>`` (newlines drawn as ``⏎``), so pane-diff can read
  it like any input box;
- on submit it reports ``prompt-submit`` (with the prompt) and ``turn-start`` through the hook
  path, prints a reply after ``--think-ms``, then reports ``turn-end``; ``/clear`` starts a new
  session and reports ``session-start``;
- ``--ignore-enter`` models a program that never submits on Enter (the text stays a draft).

Run: ``python -m fleetbus.agents.stub [--think-ms MS] [--ignore-enter]`` (``fleet-stub``).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import termios
import time
import tty
import uuid

from fleetbus.agents.hook import send_hook

PASTE_START = b"\x1b[200~"
PASTE_END = b"\x1b[201~"
PROMPT = "stub> "


class Stub:
    def __init__(self, think_ms: int, ignore_enter: bool, out=None):
        self.think_ms = think_ms
        self.ignore_enter = ignore_enter
        self.out = out or sys.stdout
        self.draft: list[str] = []
        self.in_paste = False
        self.pending = b""
        self.session_id = uuid.uuid4().hex
        self.turns = 0

    def write(self, s: str) -> None:
        self.out.write(s)
        self.out.flush()

    def prompt(self) -> None:
        self.write(PROMPT)

    def add_text(self, text: str) -> None:
        self.draft.append(text)
        self.write(text.replace("\n", " ⏎ "))

    def submit(self) -> None:
        text = "".join(self.draft)
        self.draft = []
        self.write("\r\n")
        if not text.strip():
            self.prompt()
            return
        if text.strip() == "/clear":
            self.session_id = uuid.uuid4().hex
            send_hook("session-start", session_id=self.session_id)
            self.write("(new session)\r\n")
            self.prompt()
            return
        send_hook("prompt-submit", prompt=text, session_id=self.session_id)
        send_hook("turn-start", session_id=self.session_id)
        self.turns += 1
        if self.think_ms:
            time.sleep(self.think_ms / 1000)
        lines = text.count("\n") + 1
        first = text.split("\n", 1)[0]
        self.write(f"reply #{self.turns}: got {len(text)} chars in {lines} line(s): {first[:80]}\r\n")
        send_hook("turn-end", session_id=self.session_id)
        self.prompt()

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
                self.draft = []
                self.write("\r\x1b[K" + PROMPT)
            elif ch >= " " or ch == "\t":
                self.add_text(ch)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fleet-stub", description=__doc__.split("\n\n")[0])
    ap.add_argument("--think-ms", type=int, default=100, help="time a turn takes, in ms (default 100)")
    ap.add_argument("--ignore-enter", action="store_true", help="never submit on Enter (a stuck draft)")
    args = ap.parse_args(argv)
    stub = Stub(args.think_ms, args.ignore_enter)
    fd = sys.stdin.fileno()
    old = termios.tcgetattr(fd) if os.isatty(fd) else None
    if old is not None:
        tty.setcbreak(fd)

    def on_sigint(*_):  # C-c drops the draft, like a TUI's interrupt
        stub.draft = []
        stub.write("^C\r\n" + PROMPT)

    signal.signal(signal.SIGINT, on_sigint)
    stub.write("\x1b[?2004h")
    stub.write(f"fleetbus stub agent (slot {os.environ.get('FLEETBUS_SLOT', '?')}, session {stub.session_id[:8]})\r\n")
    send_hook("session-start", session_id=stub.session_id)
    stub.prompt()
    try:
        while True:
            try:
                data = os.read(fd, 65536)
            except InterruptedError:
                continue
            if not data:
                return 0
            stub.feed(data)
    finally:
        if old is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, old)
        stub.write("\x1b[?2004l")


if __name__ == "__main__":
    sys.exit(main())
