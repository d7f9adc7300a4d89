"""``python``: the Python REPL, verified by pane diff.

Python 3.11's REPL (GNU readline) runs each pasted line as it arrives, so a multi-line body is
submitted line by line; the marker is a trailing comment on the last line.
"""

import re
import sys

from fleetbus.adapters.base import Adapter, SubmitProfile

PYTHON = Adapter(
    name="python",
    command=(sys.executable, "-q", "-i"),
    submit=SubmitProfile(key="Enter", delay_ms=0),
    has_hook=False,
    pane_commands=("python", "python3*"),
    prompt=re.compile(r"^(>>>|\.\.\.) ?"),
    clear_keys=("C-e", "C-u"),
    reset_command=None,
    interrupt_key="C-c",
    marker_style="comment",
)
