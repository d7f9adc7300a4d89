"""Pane-diff verification: pure functions over a :class:`~fleetbus.transports.base.Screen`.

The input region is the adapter's input line: the cursor row and the rows above it that wrapped
into it, up to the row that starts with the adapter's prompt, joined without separators so a
marker split by line wrapping is still found. A spinner or clock that
changes elsewhere on the screen never counts as acceptance.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Literal

from fleetbus.adapters.base import Adapter
from fleetbus.transports.base import Screen

MAX_INPUT_ROWS = 60

PaneVerdict = Literal["accepted", "queued", "draft", "pending"]


def cell_width(text: str) -> int:
    """Terminal cells ``text`` occupies (East Asian wide and fullwidth characters count 2)."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def input_region(adapter: Adapter, screen: Screen) -> tuple[int, str, bool]:
    """Return ``(first_row, text, at_prompt)`` of the input region.

    The region starts at the cursor row and grows upward only across rows that wrapped into the
    next one (rows filling the pane width, allowing one trimmed trailing space), stopping at the
    first row that starts with the adapter's prompt. ``at_prompt`` says whether it found one.
    A submitted command whose program is still running (cursor on a fresh row below it) is
    therefore not part of the input region. When that walk finds no prompt and the adapter
    declares ``continuation`` rows (a multi-line draft), the walk may also cross those; it is
    used only if it reaches the prompt row.
    """
    lines = screen.lines
    if not lines:
        return 0, "", False
    cy = min(max(screen.cursor_y, 0), len(lines) - 1)
    start, at_prompt = _walk(adapter, screen, cy, None)
    if not at_prompt and adapter.continuation is not None:
        cont_start, cont_at_prompt = _walk(adapter, screen, cy, adapter.continuation)
        if cont_at_prompt:
            start, at_prompt = cont_start, True
    return start, "".join(lines[start:cy + 1]), at_prompt


def _walk(adapter: Adapter, screen: Screen, cy: int, continuation: re.Pattern[str] | None) -> tuple[int, bool]:
    lines = screen.lines
    start = cy
    for _ in range(MAX_INPUT_ROWS):
        m = adapter.prompt.match(lines[start])
        if m and m.end() > 0:
            return start, True
        if start == 0:
            break
        above = lines[start - 1]
        crossable = cell_width(above) >= screen.width - 1 or (
            continuation is not None and (continuation.search(above) is not None or adapter.prompt.match(above)))
        if not crossable:
            break
        start -= 1
    return start, False


def typed_text(adapter: Adapter, screen: Screen) -> str | None:
    """Text already typed after the prompt ('' when empty); None when the input line has no
    prompt (a program is running in the pane, or the screen is unknown): nothing may be typed."""
    _, region, at_prompt = input_region(adapter, screen)
    if not at_prompt and adapter.prompt.pattern not in ("", "^"):
        return None
    return adapter.typed_text(region)


def classify(adapter: Adapter, screen: Screen, marker: str) -> PaneVerdict:
    """Decide from one capture whether the message with ``marker`` was taken.

    - ``draft``: the marker sits in the input region (typed, not submitted), or the region shows
      the adapter's collapsed-paste placeholder;
    - ``queued``: the adapter's queue indicator is on screen outside the input region (the TUI
      holds a submitted message until its turn ends); for an adapter whose queue area shows the
      messages' text (``queue_shows_text``), only while the marker is in that area (or nowhere
      else above the input line), so a message taken while others wait is ``accepted``;
    - ``accepted``: the marker is on screen or in the captured history, outside the input region;
    - ``pending``: none of these (blank capture, not drawn yet, or scrolled away): never acceptance.
    """
    if screen.is_blank() and not any(h.strip() for h in screen.history):
        return "pending"
    start, region, at_prompt = input_region(adapter, screen)
    if marker in region or (adapter.paste_placeholder is not None and adapter.paste_placeholder.search(region)):
        return "draft"
    above = "".join(screen.history) + "".join(screen.lines[:start])
    queue = queue_area(adapter, screen, start)
    if queue is not None and (not adapter.queue_shows_text or mk_in(marker, queue) or marker not in above):
        return "queued"
    if not at_prompt and adapter.marker_style == "prefix" and adapter.prompt.pattern not in ("", "^"):
        # an agent TUI whose input line cannot be found (a multi-line draft it draws in a way the
        # walk cannot follow, or a redraw in progress): the marker above proves nothing
        return "pending"
    if marker in above:
        return "accepted"
    return "pending"


def mk_in(marker: str, rows: list[str]) -> bool:
    """``marker`` on one of ``rows``, or split across two of them by line wrapping."""
    return marker in "".join(rows)


def queue_area(adapter: Adapter, screen: Screen, start: int) -> list[str] | None:
    """The rows of the TUI's queue area outside the input region (``start`` is its first row):
    every visible row matching ``adapter.queued`` and the non-blank rows below it up to the next
    blank row or the input region. None when no such row shows (nothing is queued)."""
    if adapter.queued is None:
        return None
    cy = min(max(screen.cursor_y, 0), len(screen.lines) - 1) if screen.lines else 0
    out: list[str] = []
    for lo, hi in ((0, start), (cy + 1, len(screen.lines))):
        i = lo
        while i < hi:
            if adapter.queued.search(screen.lines[i]):
                while i < hi and screen.lines[i].strip():
                    out.append(screen.lines[i])
                    i += 1
            i += 1
    return out or None


def is_queued(adapter: Adapter, screen: Screen) -> bool:
    """True when the adapter's queue indicator shows on a visible row outside the input region."""
    return adapter.queued is not None and _queued_outside(adapter, screen, input_region(adapter, screen)[0])


def _queued_outside(adapter: Adapter, screen: Screen, start: int) -> bool:
    """The queue indicator on a visible row above ``start`` or below the cursor row."""
    if adapter.queued is None:
        return False
    cy = min(max(screen.cursor_y, 0), len(screen.lines) - 1) if screen.lines else 0
    rows = screen.lines[:start] + screen.lines[cy + 1:]
    return any(adapter.queued.search(row) for row in rows)


def is_busy(adapter: Adapter, screen: Screen) -> bool:
    """True when the adapter's busy indicator (a turn is running) shows on a visible row."""
    return adapter.busy is not None and any(adapter.busy.search(row) for row in screen.lines)
