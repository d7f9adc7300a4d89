"""Pane-diff verification: pure functions over a :class:`~fleetbus.transports.base.Screen`.

The input region is the adapter's input line: from the nearest row above the cursor that starts
with the adapter's prompt (at most ``MAX_INPUT_ROWS`` rows up) down to the cursor row, joined
without separators so a marker split by line wrapping is still found. A spinner or clock that
changes elsewhere on the screen never counts as acceptance.
"""

from __future__ import annotations

from typing import Literal

from fleetbus.adapters.base import Adapter
from fleetbus.transports.base import Screen

MAX_INPUT_ROWS = 60

PaneVerdict = Literal["accepted", "draft", "pending"]


def input_region(adapter: Adapter, screen: Screen) -> tuple[int, str]:
    """Return ``(first_row, text)`` of the input region: prompt row through cursor row."""
    cy = min(max(screen.cursor_y, 0), len(screen.lines) - 1) if screen.lines else 0
    start = cy
    for row in range(cy, max(-1, cy - MAX_INPUT_ROWS), -1):
        line = screen.lines[row] if row < len(screen.lines) else ""
        m = adapter.prompt.match(line)
        if m and m.end() > 0:
            start = row
            break
    return start, "".join(screen.lines[start:cy + 1])


def typed_text(adapter: Adapter, screen: Screen) -> str:
    """Text already sitting in the input region after the prompt ('' when the line is empty)."""
    _, region = input_region(adapter, screen)
    return adapter.typed_text(region)


def classify(adapter: Adapter, screen: Screen, marker: str) -> PaneVerdict:
    """Decide from one capture whether the message with ``marker`` was taken.

    - ``draft``: the marker sits in the input region (typed, not submitted);
    - ``accepted``: the marker is on screen or in the captured history, outside the input region;
    - ``pending``: neither (blank capture, not drawn yet, or scrolled away): never acceptance.
    """
    if screen.is_blank() and not any(h.strip() for h in screen.history):
        return "pending"
    start, region = input_region(adapter, screen)
    if marker in region:
        return "draft"
    above = "".join(screen.history) + "".join(screen.lines[:start])
    if marker in above:
        return "accepted"
    return "pending"
