"""Gemini CLI (pinned 0.61.0) for the generic runtime tests: the user's own setup.

Gemini talks to the mock model through ``GOOGLE_GEMINI_BASE_URL`` with an API key from the
environment. ``~/.gemini/settings.json`` must choose the API-key auth (without
``security.auth.selectedType`` the "How would you like to authenticate" dialog appears even with
``GEMINI_API_KEY`` set), turn off update checks, usage statistics, the IDE nudge and folder
trust. fleetbus adds its hooks through a per-process overlay home (see
:mod:`fleetbus.adapters.gemini`) and must leave this file byte-identical; the user's own hook
here must keep working beside fleetbus's.
"""

from __future__ import annotations

import json
from pathlib import Path

from runtime_cases import RuntimeCase, home_env

VERSION = "0.61.0"


def prepare(home: Path, proj: Path, model_url: str) -> tuple[dict[str, str], list[Path]]:
    gem = home / ".gemini"
    gem.mkdir(parents=True, exist_ok=True)
    proj.mkdir(parents=True, exist_ok=True)
    settings = gem / "settings.json"
    own_hook = f"echo \"$GEMINI_SESSION_ID\" >> {home / 'user-hook.log'}"  # prints nothing
    settings.write_text(json.dumps({
        "general": {"enableAutoUpdate": False, "enableAutoUpdateNotification": False},
        "privacy": {"usageStatisticsEnabled": False},
        "ide": {"enabled": False, "hasSeenNudge": True},
        "security": {"folderTrust": {"enabled": False}, "auth": {"selectedType": "gemini-api-key"}},
        "hooks": {"SessionStart": [{"hooks": [{"name": "user-own", "type": "command", "command": own_hook}]}]},
    }, indent=2) + "\n")
    env = {
        **home_env(home),
        "GEMINI_API_KEY": "fleetbus-test-key",
        "GOOGLE_GEMINI_BASE_URL": model_url,
        "GEMINI_MODEL": "gemini-2.5-flash",
        "GEMINI_CLI_TRUST_WORKSPACE": "true",
        "GEMINI_TELEMETRY_ENABLED": "false",
    }
    return env, [settings]


# Start-up is over when the banner ("Gemini CLI v0.61.0", drawn with the SessionStart hooks) is
# on screen and the "Executing Hook(s): ..." line of those hooks has gone again (~3 s after they
# finish). Before that node's event loop stalls now and then for up to ~2 s, which turns the
# submit key after a paste into a newline (see fleetbus/adapters/gemini.py).
CASE = RuntimeCase(runtime="gemini", bin="gemini", version_args=("--version",), version_expect=VERSION,
                   prepare=prepare,
                   ready=r"(?s)\A(?!.*Executing Hook).*Gemini CLI v\d.*>   Type your message or @path/to/file")
