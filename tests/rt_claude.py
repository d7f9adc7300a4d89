"""Claude Code (pinned 2.1.197): the user's own setup for the generic runtime tests."""

from __future__ import annotations

import json
from pathlib import Path

from runtime_cases import RuntimeCase, home_env

KEY = "sk-ant-api03-fleetbus-test-key-000000000000000000000000AAAAAAAAAAAAAAAAAAAA"


def prepare(home: Path, proj: Path, model_url: str) -> tuple[dict[str, str], list[Path]]:
    (home / ".claude").mkdir(parents=True)
    # onboarding, API-key approval and folder trust answered ahead (the user's own setup in real use)
    state = home / ".claude.json"
    state.write_text(json.dumps({
        "hasCompletedOnboarding": True, "lastOnboardingVersion": "2.1.197", "theme": "dark",
        "customApiKeyResponses": {"approved": [KEY[-20:]], "rejected": []},
        "projects": {str(proj): {"hasTrustDialogAccepted": True, "hasCompletedProjectOnboarding": True,
                                 "allowedTools": []}}}))
    settings = home / ".claude" / "settings.json"
    settings.write_text('{"theme": "dark", "hooks": {}}\n')
    env = {**home_env(home), "ANTHROPIC_BASE_URL": model_url, "ANTHROPIC_API_KEY": KEY,
           "ANTHROPIC_MODEL": "claude-sonnet-4-5", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
           "DISABLE_AUTOUPDATER": "1", "DISABLE_TELEMETRY": "1", "DISABLE_ERROR_REPORTING": "1"}
    # ~/.claude.json is Claude's own state file (it rewrites it while running); settings.json is the user's
    return env, [settings]


CASE = RuntimeCase(runtime="claude", bin="claude", version_args=("--version",), version_expect="Claude Code",
                   prepare=prepare, ready=r"^❯")
