"""Pane-diff verification: pure functions over a :class:`~fleetbus.transports.base.Screen`.

The input region is the adapter's input line: the cursor row and the rows above it that wrapped
into it, up to the row that starts with the adapter's prompt, joined without separators so a
marker split by line wrapping is still found. A spinner or clock that
changes elsewhere on the screen never counts as acceptance.
"""

from __future__ import annotations

import unicodedata
from typing import Literal

from fleetbus.adapters.base import Adapter
from fleetbus.transports.base import Screen

MAX_INPUT_ROWS = 60

PaneVerdict = Literal["accepted", "draft", "pending"]


def cell_width(text: str) -> int:
    """Terminal cells ``text`` occupies (East Asian wide and fullwidth characters count 2)."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def input_region(adapter: Adapter, screen: Screen) -> tuple[int, str, bool]:
    """Return ``(first_row, text, at_prompt)`` of the input region.

    The region starts at the cursor row and grows upward only across rows that wrapped into the
    next one (rows filling the pane width, allowing one trimmed trailing space), stopping at the
    first row that starts with the adapter's prompt. ``at_prompt`` says whether it found one.
    A submitted command whose program is still running (cursor on a fresh row below it) is
    therefore not part of the input region.
    """
    lines = screen.lines
    if not lines:
        return 0, "", False
    cy = min(max(screen.cursor_y, 0), len(lines) - 1)
    start = cy
    at_prompt = False
    for _ in range(MAX_INPUT_ROWS):
        m = adapter.prompt.match(lines[start])
        if m and m.end() > 0:
            at_prompt = True
            break
        if start == 0 or cell_width(lines[start - 1]) < screen.width - 1:
            break
        start -= 1
    return start, "".join(lines[start:cy + 1]), at_prompt


def typed_text(adapter: Adapter, screen: Screen) -> str | None:
    """Text already typed after the prompt ('' when empty); None when the input line has no
    prompt (a program is running in the pane, or the screen is unknown): nothing may be typed."""
    _, region, at_prompt = input_region(adapter, screen)
    if not at_prompt and adapter.prompt.pattern not in ("", "^"):
        return None
    return adapter.typed_text(region)


def classify(adapter: Adapter, screen: Screen, marker: str) -> PaneVerdict:
    """Decide from one capture whether the message with ``marker`` was taken.

    - ``draft``: the marker sits in the input region (typed, not submitted);
    - ``accepted``: the marker is on screen or in the captured history, outside the input region;
    - ``pending``: neither (blank capture, not drawn yet, or scrolled away): never acceptance.
    """
    if screen.is_blank() and not any(h.strip() for h in screen.history):
        return "pending"
    start, region, _ = input_region(adapter, screen)
    if marker in region:
        return "draft"
    above = "".join(screen.history) + "".join(screen.lines[:start])
    if marker in above:
        return "accepted"
    return "pending"
