"""Claude Code (pinned 2.1.197) in real tmux against the mock model: runtime acks via its hooks.

Skips unless ``scripts/install-runtimes`` has installed the pinned CLIs.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import anyio
import pytest

from conftest import needs_tmux, wait_for
from fleetbus.client import Client
from mockmodel import MockModel

BIN = Path(__file__).parent / "runtimes" / "node_modules" / ".bin"
KEY = "sk-ant-api03-fleetbus-test-key-000000000000000000000000AAAAAAAAAAAAAAAAAAAA"


def _claude_works() -> bool:
    exe = BIN / "claude"
    if not exe.exists():
        return False
    try:
        out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60,
                             env={"HOME": "/nonexistent", "PATH": "/usr/bin:/bin"})
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "Claude Code" in out.stdout


pytestmark = [needs_tmux, pytest.mark.tmux, pytest.mark.skipif(
    not _claude_works(), reason="Claude Code is not installed: run scripts/install-runtimes")]


@pytest.fixture
def claude_fleet(make_fleet, tmp_path):
    home, proj = tmp_path / "home", tmp_path / "proj"
    (home / ".claude").mkdir(parents=True)
    proj.mkdir()
    # onboarding, API-key approval and folder trust answered ahead (the user's own setup in real use)
    (home / ".claude.json").write_text(json.dumps({
        "hasCompletedOnboarding": True, "lastOnboardingVersion": "2.1.197", "theme": "dark",
        "customApiKeyResponses": {"approved": [KEY[-20:]], "rejected": []},
        "projects": {str(proj): {"hasTrustDialogAccepted": True, "hasCompletedProjectOnboarding": True,
                                 "allowedTools": []}}}))
    user_settings = home / ".claude" / "settings.json"
    user_settings.write_text('{"theme": "dark", "hooks": {}}\n')
    with MockModel(slow_s=6) as model:
        env = {"HOME": str(home), "ANTHROPIC_BASE_URL": model.url, "ANTHROPIC_API_KEY": KEY,
               "ANTHROPIC_MODEL": "claude-sonnet-4-5", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
               "DISABLE_AUTOUPDATER": "1", "DISABLE_TELEMETRY": "1", "DISABLE_ERROR_REPORTING": "1",
               "PATH": f"{BIN}:/usr/local/bin:/usr/bin:/bin"}
        fe = make_fleet(
            "version: 1\ntenant: rt\ntransport: {kind: tmux, socket: it}\n"
            "bus: {heartbeat_ms: 300, liveness: 3, verify_timeout_s: 30}\n"
            f"agents:\n  - {{name: cc, runtime: claude, workdir: '{proj}', env: {json.dumps(env)}}}\n")
        before = user_settings.read_bytes()
        yield fe, model
        assert user_settings.read_bytes() == before, "the user's Claude settings must not change"


def send(fe, slot, body, **kw):
    async def main():
        async with Client(fe.fleet, fe.paths) as c:
            return await c.send(slot, body, **kw)
    return anyio.run(main, backend="asyncio")


def test_claude_accepts_by_runtime_ack(claude_fleet):
    fe, model = claude_fleet
    fe.up()
    row = wait_for(lambda: (r := fe.ps()["cc"]) and r.heartbeat == "healthy" and r, what="claude slot up")
    assert row.command == "claude" and "DRIFT" not in row.flags, row
    wait_for(lambda: "❯" in fe.cli("tail", "cc").stdout, timeout=30, what="claude input line")
    results = []
    for i in range(5):
        r = send(fe, "cc", f"hello claude {i}", verify=True, timeout_s=30)
        results.append((r.result, r.evidence, r.submit_retries))
        wait_for(lambda: any(f"fleet#{r.id}" in p for p in model.prompts), timeout=30, what="prompt at the model")
        wait_for(lambda: fe.ps()["cc"].state == "idle", timeout=30, what="turn end (Stop hook)")
    # Claude 2.1.197 now and then drops the Enter that follows a paste (most often right after start-up):
    # fleetbus sees the draft and sends one extra Enter (counted), never more, and never re-types text
    assert [res[:2] for res in results] == [("accepted", "runtime-ack")] * 5, results
    assert all(res[2] <= 1 for res in results), results
    for i in range(5):
        # main turns only: Claude's title side request quotes the prompt inside <session>...</session>
        turns = [p for p in model.prompts if p.startswith("[fleet#") and p.endswith(f"hello claude {i}")]
        assert len(turns) == 1, f"each prompt reaches the model once: {turns}"
    big = "\n".join(f"line {n}: " + "x" * 60 for n in range(80))  # ~5,700 characters, pasted as one prompt
    r = send(fe, "cc", big, verify=True, timeout_s=30)
    assert (r.result, r.evidence) == ("accepted", "runtime-ack"), r
    wait_for(lambda: any(f"fleet#{r.id}" in p and "line 79:" in p for p in model.prompts), timeout=30,
             what="the whole large prompt at the model")
