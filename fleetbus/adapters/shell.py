"""``shell``: an interactive bash with no hook, verified by pane diff.

Launched as ``bash --noprofile --norc -i`` with ``PS1='$ '`` so the prompt is known and the
input line can be read exactly (bash 5.2 honours an exported PS1 when no rc file runs; checked
with bash 5.2.15 on Debian 12). Bodies are typed unchanged with the marker as a trailing
comment, so ``echo hi`` runs as ``echo hi  # [fleet#id ops -> sh0]``.
"""

import re

from fleetbus.adapters.base import Adapter, SubmitProfile

SHELL = Adapter(
    name="shell",
    command=("bash", "--noprofile", "--norc", "-i"),
    submit=SubmitProfile(key="Enter", delay_ms=0),
    has_hook=False,
    pane_commands=("bash",),
    prompt=re.compile(r"^\$ ?"),
    clear_keys=("C-e", "C-u"),
    reset_command="clear",
    interrupt_key="C-c",
    marker_style="comment",
    env={"PS1": "$ ", "PROMPT_COMMAND": ""},
)
