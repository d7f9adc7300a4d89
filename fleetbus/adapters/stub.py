"""``stub``: fleetbus's own reference agent (:mod:`fleetbus.agents.stub`).

It enables bracketed paste, holds pasted text as a draft until Enter, then reports the prompt
through the hook path (``prompt-submit``, ``turn-start``, ``turn-end``) exactly as a runtime hook
would, so verification is a ``runtime-ack``. Prompts submitted during a turn wait in its queue
area (``(queued) <first line>`` rows above its input line) until the turn ends, so pane-diff
tells a queued prompt from a taken one as it does for the agent TUIs.
"""

import re
import sys

from fleetbus.adapters.base import Adapter, SubmitProfile

STUB = Adapter(
    name="stub",
    command=(sys.executable, "-m", "fleetbus.agents.stub"),
    submit=SubmitProfile(key="Enter", delay_ms=0),
    has_hook=True,
    pane_commands=("python", "python3*", "fleet-stub"),
    prompt=re.compile(r"^stub> ?"),
    clear_keys=("C-u",),
    reset_command="/clear",
    interrupt_key="C-c",
    marker_style="prefix",
    queued=re.compile(r"^\(queued\) "),  # its queue area: one row per waiting prompt, above the input line
    queue_shows_text=True,
    line_history=True,  # it only appends lines: a message typed into it stays in the scrollback
)
