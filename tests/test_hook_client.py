"""Unit tests for fleetbus.agents.hook: the HOOK frame and the non-blocking datagram sender."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time

import msgpack
import pytest

from fleetbus.agents import hook
from fleetbus.agents.hook import hook_frame, send_hook
from fleetbus.protocol import HookEvent, decode

MID1 = "0123456789ab"
MID2 = "ffffffffffff"


@pytest.fixture
def short_dir():
    d = tempfile.mkdtemp(dir="/tmp", prefix="fbh")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def receiver(short_dir):
    path = os.path.join(short_dir, "h.sock")
    assert len(path.encode()) < 107
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(2.0)
    yield path, s
    s.close()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for k in ("FLEETBUS_HOOK_SOCKET", "FLEETBUS_SLOT", "FLEETBUS_RUNTIME"):
        monkeypatch.delenv(k, raising=False)


# --- hook_frame ------------------------------------------------------------------------------


def test_hook_frame_decodes_as_hook_event():
    prompt = f"[fleet#{MID1} ops -> a] do this, see also fleet#{MID2} and fleet#0123 and fleet#{MID1}x"
    t0 = time.time()
    ev = decode(hook_frame("prompt-submit", prompt=prompt, session_id="sess-1", slot="a", runtime="stub"))
    assert isinstance(ev, HookEvent)
    assert ev.kind == "HOOK" and ev.v == 1
    assert ev.event == "prompt-submit"
    assert ev.slot == "a" and ev.runtime == "stub"
    assert ev.session_id == "sess-1"
    assert ev.markers == [MID1]  # only the tag in tag position acknowledges; mentions do not
    assert ev.prompt_head == prompt
    assert t0 - 1 <= ev.at <= time.time() + 1


@pytest.mark.parametrize("event", hook.EVENTS)
def test_hook_frame_every_event(event):
    ev = decode(hook_frame(event))
    assert isinstance(ev, HookEvent)
    assert ev.event == event
    assert ev.markers == [] and ev.prompt_head == "" and ev.session_id is None


def test_hook_frame_prompt_head_capped_at_200_chars():
    prompt = "é" * 150 + "x" * 150 + f"\n[fleet#{MID1} ops -> a] second prompt"
    ev = decode(hook_frame("prompt-submit", prompt=prompt))
    assert ev.prompt_head == prompt[:200]
    assert len(ev.prompt_head) == 200
    assert ev.markers == [MID1]  # tags come from the whole prompt, not only the head


def test_hook_frame_without_session_omits_key():
    raw = msgpack.unpackb(hook_frame("turn-end"), raw=False)
    assert "session_id" not in raw
    assert raw["v"] == 1 and raw["kind"] == "HOOK"


def test_hook_frame_takes_tags_in_tag_position_only():
    from fleetbus.adapters import tag_markers

    text = f"[fleet#{MID1} ops -> a] b fleet#{MID2}\n[fleet#{MID2} ops -> a] c fleet#{MID2}"
    markers = msgpack.unpackb(hook.hook_frame("prompt-submit", prompt=text))["markers"]
    assert markers == tag_markers(text) == [MID1, MID2]
    assert msgpack.unpackb(hook.hook_frame("prompt-submit", prompt=f"a fleet#{MID1} b"))["markers"] == []


# --- send_hook -------------------------------------------------------------------------------


def test_send_hook_delivers_frame(receiver, monkeypatch):
    path, s = receiver
    monkeypatch.setenv("FLEETBUS_SLOT", "coder0")
    monkeypatch.setenv("FLEETBUS_RUNTIME", "stub")
    assert send_hook("prompt-submit", prompt=f"[fleet#{MID1} ops -> coder0] hi", session_id="s9", path=path) is True
    data = s.recv(65536)
    ev = decode(data)
    assert isinstance(ev, HookEvent)
    assert ev.event == "prompt-submit"
    assert ev.markers == [MID1]
    assert ev.slot == "coder0" and ev.runtime == "stub" and ev.session_id == "s9"


def test_send_hook_uses_env_socket(receiver, monkeypatch):
    path, s = receiver
    monkeypatch.setenv("FLEETBUS_HOOK_SOCKET", path)
    assert send_hook("turn-start") is True
    assert decode(s.recv(65536)).event == "turn-start"


def test_send_hook_explicit_path_wins_over_env(receiver, monkeypatch, short_dir):
    path, s = receiver
    monkeypatch.setenv("FLEETBUS_HOOK_SOCKET", os.path.join(short_dir, "other.sock"))
    assert send_hook("turn-end", path=path) is True
    assert decode(s.recv(65536)).event == "turn-end"


def _fast_false(**kw) -> None:
    t0 = time.monotonic()
    assert send_hook("turn-end", **kw) is False
    assert time.monotonic() - t0 < 0.5


def test_send_hook_no_path_no_env():
    _fast_false()


def test_send_hook_empty_env(monkeypatch):
    monkeypatch.setenv("FLEETBUS_HOOK_SOCKET", "")
    _fast_false()


def test_send_hook_nothing_at_path(short_dir):
    _fast_false(path=os.path.join(short_dir, "nobody.sock"))


def test_send_hook_missing_directory():
    _fast_false(path="/tmp/fleetbus-test-no-such-dir-xyz/h.sock")


def test_send_hook_stale_socket_file(short_dir):
    # the sidecar died: its socket file remains but nobody is bound (ECONNREFUSED)
    path = os.path.join(short_dir, "dead.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.close()
    assert os.path.exists(path)
    _fast_false(path=path)


def test_send_hook_env_points_nowhere(monkeypatch, short_dir):
    monkeypatch.setenv("FLEETBUS_HOOK_SOCKET", os.path.join(short_dir, "gone.sock"))
    _fast_false()


def test_send_hook_path_too_long():
    _fast_false(path="/tmp/" + "x" * 200 + ".sock")


def test_send_hook_never_blocks_on_full_queue(receiver):
    path, _s = receiver  # bound but never read
    t0 = time.monotonic()
    results = [send_hook("turn-end", path=path) for _ in range(2000)]
    elapsed = time.monotonic() - t0
    assert results[0] is True
    assert False in results  # the receive queue filled up and further events were dropped
    assert elapsed < 5.0


def test_send_hook_never_raises_on_odd_prompt(short_dir):
    assert send_hook("prompt-submit", prompt="bad \ud800 text", path=os.path.join(short_dir, "nobody.sock")) is False


@pytest.mark.parametrize("raw,expected", [
    ('{"prompt": "hi fleet#0123456789ab", "session_id": "s1", "source": "startup"}',
     ("hi fleet#0123456789ab", "s1", "startup")),
    ('{"hook_event_name": "SessionEnd", "reason": "clear", "session_id": "s2"}', ("", "s2", "clear")),
    ('{"text": "pi text", "sessionID": "ses_x"}', ("pi text", "ses_x", "")),
    ("plain text, not JSON", ("plain text, not JSON", None, "")),
    ('["a", "list"]', ('["a", "list"]', None, "")),
    ("", ("", None, "")),
])
def test_parse_payload_of_each_runtime_shape(raw, expected):
    from fleetbus.agents.hook import parse_payload
    assert parse_payload(raw) == expected


def test_hook_frame_carries_source():
    ev = decode(hook_frame("session-start", session_id="abc", source="clear"))
    assert (ev.event, ev.session_id, ev.source) == ("session-start", "abc", "clear")
