"""pi coding agent (pinned 0.73.1) for the generic runtime tests: the user's own setup.

pi reads its provider from ``~/.pi/agent/models.json`` (an ``openai-completions`` provider pointed
at the mock model) and the default model from ``~/.pi/agent/settings.json``. fleetbus adds its
extension with ``-e`` and must leave both files byte-identical. ``lastChangelogVersion`` is
pre-seeded as after a first run: without it pi writes it into settings.json at start-up.
"""

from __future__ import annotations

import json
from pathlib import Path

from runtime_cases import RuntimeCase, home_env

VERSION = "0.73.1"


def prepare(home: Path, proj: Path, model_url: str) -> tuple[dict[str, str], list[Path]]:
    agent = home / ".pi" / "agent"
    agent.mkdir(parents=True, exist_ok=True)
    proj.mkdir(parents=True, exist_ok=True)
    models = agent / "models.json"
    models.write_text(json.dumps({"providers": {"mock": {
        "baseUrl": f"{model_url}/v1", "api": "openai-completions", "apiKey": "mock-key",
        "compat": {"supportsDeveloperRole": False, "supportsReasoningEffort": False},
        "models": [{"id": "mock-model", "name": "Mock", "reasoning": False, "input": ["text"],
                    "contextWindow": 128000, "maxTokens": 8000,
                    "cost": {"input": 0, "output": 0, "cacheRead": 0, "cacheWrite": 0}}]}}}, indent=2) + "\n")
    settings = agent / "settings.json"
    settings.write_text(json.dumps({"defaultProvider": "mock", "defaultModel": "mock-model",
                                    "lastChangelogVersion": VERSION, "enableInstallTelemetry": False,
                                    "quietStartup": False}, indent=2) + "\n")
    env = {
        **home_env(home),
        "PI_CODING_AGENT_DIR": str(agent),
        "PI_OFFLINE": "1",  # no fd/ripgrep download, no version check, no install telemetry
        "PI_SKIP_VERSION_CHECK": "1",
        "PI_TELEMETRY": "0",
    }
    return env, [models, settings]


CASE = RuntimeCase(runtime="pi", bin="pi", version_args=("--version",), version_expect=VERSION, prepare=prepare,
                   ready=r"%/128k \(auto\)")
