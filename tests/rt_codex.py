"""OpenAI Codex CLI (pinned 0.169.0) for the generic runtime tests: the user's own setup.

Codex reads its provider and model from ``$CODEX_HOME/config.toml`` (``~/.codex`` by default): a
``responses`` provider pointed at the mock model, its key taken from ``MOCK_API_KEY``, the
project folder trusted. fleetbus adds its hooks with ``-c`` overrides and must leave that file
byte-identical. Two ``[tui]`` entries are pre-seeded as after a few earlier runs: without them
Codex writes them into config.toml itself (``screen_reader_detection_done`` on a first start,
``model_availability_nux`` counting launches up to 4). The user's own ``hooks.json`` (empty) must
not change either.
"""

from __future__ import annotations

from pathlib import Path

from runtime_cases import RuntimeCase, home_env

VERSION = "0.169.0"


def prepare(home: Path, proj: Path, model_url: str) -> tuple[dict[str, str], list[Path]]:
    codex_home = home / ".codex"
    codex_home.mkdir(parents=True, exist_ok=True)
    proj.mkdir(parents=True, exist_ok=True)
    config = codex_home / "config.toml"
    config.write_text(f"""\
model = "mock-model"
model_provider = "mock"
approval_policy = "never"
sandbox_mode = "read-only"
check_for_update_on_startup = false

[model_providers.mock]
name = "Mock"
base_url = "{model_url}/v1"
wire_api = "responses"
env_key = "MOCK_API_KEY"

[projects."{proj}"]
trust_level = "trusted"

[analytics]
enabled = false

[tui]
screen_reader_detection_done = true

[tui.model_availability_nux]
"gpt-6.1-sol" = 4
""")
    hooks = codex_home / "hooks.json"
    hooks.write_text('{"hooks": {}}\n')
    env = {
        **home_env(home),
        "MOCK_API_KEY": "mock-key",
    }
    return env, [config, hooks]


CASE = RuntimeCase(runtime="codex", bin="codex", version_args=("--version",), version_expect=VERSION,
                   prepare=prepare, ready=r"^› Ask Codex to do anything")
