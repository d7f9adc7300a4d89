"""opencode (pinned 1.18.33) for the generic runtime tests: the user's own setup.

opencode reads its provider from ``$XDG_CONFIG_HOME/opencode/opencode.json`` (an
``@ai-sdk/openai-compatible`` provider pointed at the mock model; that package is bundled in the
binary, nothing is fetched). fleetbus adds its plugin through ``OPENCODE_CONFIG`` (an extra config
file in the slot's folder) and must leave the user's ``opencode.json`` byte-identical. The file
carries ``$schema``: opencode writes it into any config file it reads that lacks it.
"""

from __future__ import annotations

import json
from pathlib import Path

from runtime_cases import RuntimeCase, home_env

VERSION = "1.18.33"


def prepare(home: Path, proj: Path, model_url: str) -> tuple[dict[str, str], list[Path]]:
    config_dir = home / ".config" / "opencode"
    config_dir.mkdir(parents=True, exist_ok=True)
    proj.mkdir(parents=True, exist_ok=True)
    user_config = config_dir / "opencode.json"
    user_config.write_text(json.dumps({
        "$schema": "https://opencode.ai/config.json",
        "model": "mock/mock-model",
        "small_model": "mock/mock-model",
        "autoupdate": False,
        "share": "disabled",
        "provider": {"mock": {
            "npm": "@ai-sdk/openai-compatible",
            "name": "Mock",
            "options": {"baseURL": f"{model_url}/v1", "apiKey": "mock-key"},
            "models": {"mock-model": {"name": "Mock Model"}}}},
    }, indent=2) + "\n")
    env = {
        **home_env(home),
        "OPENCODE_DISABLE_AUTOUPDATE": "1",
        "OPENCODE_DISABLE_MODELS_FETCH": "1",
        "OPENCODE_DISABLE_LSP_DOWNLOAD": "1",
        "OPENCODE_DISABLE_SHARE": "1",
        "OPENCODE_DISABLE_DEFAULT_PLUGINS": "1",
    }
    return env, [user_config]


CASE = RuntimeCase(runtime="opencode", bin="opencode", version_args=("--version",), version_expect=VERSION,
                   prepare=prepare, ready=r"┃\s+Ask anything… ")
