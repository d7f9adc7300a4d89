"""Fast tests for tests/mockmodel.py, the mock LLM server used by the agent-CLI integration tests.

Each streaming test sends the request the way the real client does (same route, same query, the
body fields that matter) and parses the SSE stream like a client: events are split on blank lines
and each event's ``event:`` and ``data:`` fields are read.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from typing import Any

import pytest

from mockmodel import GENERATION_KINDS, MockModel, extract_prompt, reply_for


# ---------------------------------------------------------------------------- helpers
def _request(
    m: MockModel, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", m.port, timeout=10)
    try:
        data = json.dumps(body).encode() if body is not None else None
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        raw = resp.read()  # SSE bodies end when the server closes the connection
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, raw
    finally:
        conn.close()


def _post_json(m: MockModel, path: str, body: Any, headers: dict[str, str] | None = None) -> Any:
    status, hdrs, raw = _request(m, "POST", path, body, headers)
    assert status == 200, raw
    assert hdrs["content-type"].startswith("application/json")
    return json.loads(raw)


def parse_sse(raw: bytes) -> list[dict[str, Any]]:
    """Parse an SSE body into [{"event": name or None, "data": str}, ...] (per the SSE spec's field rules)."""
    text = raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    assert text.endswith("\n\n"), f"the stream must end with a complete event: {text[-80:]!r}"
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        event, data = None, []
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                event = value
            elif field == "data":
                data.append(value)
            else:
                raise AssertionError(f"unexpected SSE field {field!r} in {block!r}")
        assert data, f"an SSE event without data: {block!r}"
        events.append({"event": event, "data": "\n".join(data)})
    return events


def _sse(m: MockModel, path: str, body: Any, headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    status, hdrs, raw = _request(m, "POST", path, body, headers)
    assert status == 200, raw
    assert hdrs["content-type"].startswith("text/event-stream")
    assert hdrs["connection"].lower() == "close"
    assert "content-length" not in hdrs
    return parse_sse(raw)


def _timed_post(m: MockModel, path: str, body: Any, out: dict[str, Any], key: str) -> None:
    t0 = time.monotonic()
    try:
        out[key + "_status"] = _request(m, "POST", path, body)[0]
    except Exception as exc:  # noqa: BLE001 (reported to the test through `out`)
        out[key + "_error"] = exc
    out[key] = time.monotonic() - t0


@pytest.fixture
def m():
    with MockModel(slow_s=1.0) as mock:
        yield mock


def _chat_body(prompt: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": "mock-model",
        "messages": [{"role": "system", "content": "You are pi."}, {"role": "user", "content": prompt}],
        "stream": True,
        **extra,
    }


# ---------------------------------------------------------------------------- Anthropic
CLAUDE_HEADERS = {"x-api-key": "sk-ant-mock", "anthropic-version": "2023-06-01", "anthropic-beta": "x"}


def test_anthropic_stream_like_claude_code(m: MockModel) -> None:
    body = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 32000,
        "stream": True,
        "system": [{"type": "text", "text": "You are Claude Code."}],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "<system-reminder>\nAs you answer, use this context.\n</system-reminder>"},
                    {"type": "text", "text": "list the files please"},
                ],
            }
        ],
        "tools": [],
        "metadata": {"user_id": "u"},
    }
    events = _sse(m, "/v1/messages?beta=true", body, CLAUDE_HEADERS)
    names = [e["event"] for e in events]
    datas = [json.loads(e["data"]) for e in events]
    n_delta = names.count("content_block_delta")
    assert n_delta >= 2, names  # really streamed in pieces
    assert names == (
        ["message_start", "content_block_start", "ping"]
        + ["content_block_delta"] * n_delta
        + ["content_block_stop", "message_delta", "message_stop"]
    )
    assert [d["type"] for d in datas] == names  # the event name matches data.type
    start = datas[0]["message"]
    assert start["role"] == "assistant" and start["content"] == [] and start["model"] == "claude-sonnet-4-5"
    assert start["usage"]["input_tokens"] > 0
    assert datas[1]["content_block"] == {"type": "text", "text": ""}
    deltas = [d for d in datas if d["type"] == "content_block_delta"]
    assert all(d["delta"]["type"] == "text_delta" and d["index"] == 0 for d in deltas)
    text = "".join(d["delta"]["text"] for d in deltas)
    assert text == "mock reply to: list the files please"
    msg_delta = datas[-2]
    assert msg_delta["delta"]["stop_reason"] == "end_turn"
    assert msg_delta["usage"]["output_tokens"] > 0
    rec = m.requests[-1]
    assert rec["kind"] == "anthropic.messages" and rec["prompt"] == "list the files please"
    assert rec["path"] == "/v1/messages?beta=true" and rec["query"] == {"beta": "true"}
    assert rec["headers"]["x-api-key"] == "sk-ant-mock"
    assert rec["stream"] is True and rec["body"]["max_tokens"] == 32000


def test_anthropic_non_streaming_side_request(m: MockModel) -> None:
    body = {
        "model": "claude-haiku-4-5",
        "max_tokens": 512,
        "messages": [{"role": "user", "content": "Generate a title for: fix the bug"}],
    }
    msg = _post_json(m, "/v1/messages?beta=true", body, CLAUDE_HEADERS)
    assert msg["type"] == "message" and msg["role"] == "assistant"
    assert msg["content"] == [{"type": "text", "text": "mock reply to: Generate a title for: fix the bug"}]
    assert msg["stop_reason"] == "end_turn"
    assert msg["usage"]["input_tokens"] > 0 and msg["usage"]["output_tokens"] > 0


def test_anthropic_count_tokens(m: MockModel) -> None:
    small = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    big = {"model": "m", "messages": [{"role": "user", "content": "hi " * 400}]}
    a = _post_json(m, "/v1/messages/count_tokens?beta=true", small, CLAUDE_HEADERS)
    b = _post_json(m, "/v1/messages/count_tokens", big, CLAUDE_HEADERS)
    assert set(a) == {"input_tokens"} and isinstance(a["input_tokens"], int) and a["input_tokens"] > 0
    assert b["input_tokens"] > a["input_tokens"]
    assert [r["kind"] for r in m.requests] == ["anthropic.count_tokens"] * 2
    assert m.prompts == []  # count_tokens is not a generation request


# ---------------------------------------------------------------------------- OpenAI Responses
def test_responses_stream_like_codex(m: MockModel) -> None:
    body = {
        "model": "mock-model",
        "instructions": "You are Codex.",
        "input": [
            {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "perms"}]},
            {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "<environment_context>\n  <cwd>/w</cwd>\n</environment_context>"}],
            },
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "explain SLOWLY this repo"}]},
        ],
        "tools": [],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "reasoning": None,
        "store": False,
        "stream": True,
        "include": [],
        "prompt_cache_key": "abc",
    }
    t0 = time.monotonic()
    events = _sse(m, "/v1/responses", body, {"Authorization": "Bearer x"})
    assert time.monotonic() - t0 < 0.8  # "SLOWLY" is not the word SLOW
    names = [e["event"] for e in events]
    datas = [json.loads(e["data"]) for e in events]
    n_delta = names.count("response.output_text.delta")
    assert n_delta >= 2
    assert names == (
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
        ]
        + ["response.output_text.delta"] * n_delta
        + [
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ]
    )
    assert [d["type"] for d in datas] == names
    assert [d["sequence_number"] for d in datas] == list(range(len(datas)))
    resp_id = datas[0]["response"]["id"]
    assert resp_id and datas[0]["response"]["status"] == "in_progress"
    item = datas[2]["item"]
    assert item["type"] == "message" and item["role"] == "assistant" and item["id"]
    for d in datas[3:-2]:
        assert d["item_id"] == item["id"] and d["output_index"] == 0
    expected = "mock reply to: explain SLOWLY this repo"
    assert "".join(d["delta"] for d in datas if d["type"] == "response.output_text.delta") == expected
    assert datas[-4]["text"] == expected
    assert datas[-3]["part"]["text"] == expected
    assert datas[-2]["item"]["status"] == "completed"
    done = datas[-1]["response"]
    assert done["id"] == resp_id and done["status"] == "completed"
    assert done["output"] == [datas[-2]["item"]]
    assert done["output"][0]["content"][0] == {
        "type": "output_text",
        "text": expected,
        "annotations": [],
        "logprobs": [],
    }
    usage = done["usage"]
    assert usage["input_tokens"] > 0 and usage["output_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert m.requests[-1]["prompt"] == "explain SLOWLY this repo"
    assert m.requests[-1]["headers"]["authorization"] == "Bearer x"


def test_responses_string_input_non_streaming(m: MockModel) -> None:
    resp = _post_json(m, "/v1/responses", {"model": "x", "input": "hello there"})
    assert resp["object"] == "response" and resp["status"] == "completed"
    assert resp["output"][0]["content"][0]["text"] == "mock reply to: hello there"
    assert resp["usage"]["total_tokens"] == resp["usage"]["input_tokens"] + resp["usage"]["output_tokens"]


# ---------------------------------------------------------------------------- Chat Completions
def test_chat_stream_like_pi_with_usage(m: MockModel) -> None:
    body = _chat_body("write a haiku about tmux", stream_options={"include_usage": True})
    events = _sse(m, "/v1/chat/completions", body, {"Authorization": "Bearer mock-key"})
    assert all(e["event"] is None for e in events)  # chat streams are data-only
    assert events[-1]["data"] == "[DONE]"
    chunks = [json.loads(e["data"]) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    u = usage_chunk["usage"]
    assert u["prompt_tokens"] > 0 and u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    final = chunks[-2]["choices"][0]
    assert final["finish_reason"] == "stop" and final["delta"] == {}
    body_chunks = chunks[:-2]
    assert all(c["choices"][0]["finish_reason"] is None for c in body_chunks)
    assert len(body_chunks) >= 3
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in body_chunks)
    assert text == "mock reply to: write a haiku about tmux"
    assert m.requests[-1]["kind"] == "openai.chat"


def test_chat_stream_like_opencode_without_usage(m: MockModel) -> None:
    body = _chat_body("")
    body["messages"][-1]["content"] = [{"type": "text", "text": "part one"}, {"type": "text", "text": "part two"}]
    events = _sse(m, "/v1/chat/completions", body)
    assert events[-1]["data"] == "[DONE]"
    chunks = [json.loads(e["data"]) for e in events[:-1]]
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == "mock reply to: part one\npart two"


def test_chat_non_streaming(m: MockModel) -> None:
    body = _chat_body("x" * 100, stream=False)
    resp = _post_json(m, "/v1/chat/completions", body)
    assert resp["object"] == "chat.completion"
    choice = resp["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "mock reply to: " + "x" * 60}
    assert choice["finish_reason"] == "stop"
    assert resp["usage"]["completion_tokens"] > 0


# ---------------------------------------------------------------------------- Gemini
def _gemini_body(prompt: str) -> dict[str, Any]:
    return {
        "contents": [
            {"role": "user", "parts": [{"text": "earlier question"}]},
            {"role": "model", "parts": [{"text": "earlier answer"}]},
            {"role": "user", "parts": [{"text": prompt}]},
        ],
        "systemInstruction": {"role": "user", "parts": [{"text": "You are Gemini CLI."}]},
        "generationConfig": {"temperature": 0},
        "tools": [{"functionDeclarations": []}],
    }


def test_gemini_stream_like_gemini_cli(m: MockModel) -> None:
    body = _gemini_body("what is fleetbus")
    # Gemini CLI sends its first prompt next to a <session_context> part in the same user content
    ctx = "<session_context>\nThis is the Gemini CLI.\n- **Workspace Directories:**\n  - /w\n</session_context>"
    body["contents"][-1]["parts"].insert(0, {"text": ctx})
    events = _sse(
        m,
        "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
        body,
        {"x-goog-api-key": "x"},
    )
    chunks = [json.loads(e["data"]) for e in events]
    assert len(chunks) >= 2 and all(e["event"] is None for e in events)
    for c in chunks:
        cand = c["candidates"][0]
        assert cand["content"]["role"] == "model" and cand["index"] == 0
        assert isinstance(cand["content"]["parts"][0]["text"], str)
    assert all("finishReason" not in c["candidates"][0] for c in chunks[:-1])
    last = chunks[-1]
    assert last["candidates"][0]["finishReason"] == "STOP"
    um = last["usageMetadata"]
    assert um["totalTokenCount"] == um["promptTokenCount"] + um["candidatesTokenCount"]
    text = "".join(p["text"] for c in chunks for p in c["candidates"][0]["content"]["parts"])
    assert text == "mock reply to: what is fleetbus"
    rec = m.requests[-1]
    assert rec["kind"] == "gemini.stream" and rec["prompt"] == "what is fleetbus"
    assert rec["route"] == "/v1beta/models/gemini-2.5-flash:streamGenerateContent"


def test_gemini_generate_and_count_tokens(m: MockModel) -> None:
    resp = _post_json(m, "/v1beta/models/gemini-2.5-flash:generateContent", _gemini_body("json please"))
    cand = resp["candidates"][0]
    assert cand["content"]["parts"][0]["text"] == "mock reply to: json please"
    assert cand["finishReason"] == "STOP" and resp["usageMetadata"]["totalTokenCount"] > 0
    count = _post_json(m, "/v1beta/models/gemini-2.5-flash:countTokens", {"contents": _gemini_body("a")["contents"]})
    assert set(count) == {"totalTokens"} and count["totalTokens"] > 0
    # without alt=sse the stream endpoint answers one JSON array of chunks
    arr = _post_json(m, "/v1beta/models/gemini-2.5-flash:streamGenerateContent", _gemini_body("arr"))
    assert isinstance(arr, list) and arr[-1]["candidates"][0]["finishReason"] == "STOP"
    assert [r["kind"] for r in m.requests] == ["gemini.generate", "gemini.count_tokens", "gemini.stream"]


# ---------------------------------------------------------------------------- misc routes
def test_models_list(m: MockModel) -> None:
    status, _, raw = _request(m, "GET", "/v1/models")
    assert status == 200
    data = json.loads(raw)
    assert data["object"] == "list" and [e["id"] for e in data["data"]] == ["mock-model"]
    assert data["has_more"] is False


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/embeddings"),
        ("GET", "/v1/messages"),
        ("POST", "/chat/completions"),
        ("POST", "/v1beta/models/gemini-2.5-flash:embedContent"),
        ("DELETE", "/v1/models"),
    ],
)
def test_unknown_route_is_404_and_logged(m: MockModel, method: str, path: str) -> None:
    status, hdrs, raw = _request(m, method, path, {"messages": [{"role": "user", "content": "hi"}]})
    assert status == 404
    assert hdrs["content-type"].startswith("application/json")
    err = json.loads(raw)["error"]
    assert err["type"] == "not_found_error" and path.split("?")[0] in err["message"]
    rec = m.requests[-1]
    assert (rec["method"], rec["path"], rec["kind"], rec["status"]) == (method, path, "unknown", 404)


def test_bad_json_is_400(m: MockModel) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", m.port, timeout=5)
    conn.request("POST", "/v1/chat/completions", body=b"{not json", headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 400 and "JSON" in json.loads(resp.read())["error"]["message"]
    conn.close()
    assert m.requests[-1]["status"] == 400 and m.requests[-1]["body"] is None


# ---------------------------------------------------------------------------- request log
def test_requests_record_prompts_in_order(m: MockModel) -> None:
    _sse(m, "/v1/chat/completions", _chat_body("first"))
    _sse(m, "/v1/messages", {"model": "c", "max_tokens": 5, "stream": True, "messages": [{"role": "user", "content": "second"}]})
    _sse(m, "/v1/responses", {"model": "x", "stream": True, "input": [{"role": "user", "content": "third"}]})
    _post_json(m, "/v1/messages/count_tokens", {"model": "c", "messages": [{"role": "user", "content": "uncounted"}]})
    assert m.prompts == ["first", "second", "third"]
    recs = m.requests
    assert [r["seq"] for r in recs] == [1, 2, 3, 4]
    assert all(r["method"] == "POST" and isinstance(r["body"], dict) for r in recs)
    assert recs[0]["body"]["messages"][-1]["content"] == "first"
    assert recs[3]["prompt"] == "uncounted"  # recorded, though not a generation request
    assert m.wait_for(lambda r: r["prompt"] == "second", timeout=1)["kind"] == "anthropic.messages"
    with pytest.raises(TimeoutError):
        m.wait_for(lambda r: r["prompt"] == "never", timeout=0.1)
    snapshot = m.requests
    snapshot.clear()  # a snapshot: clearing it does not touch the log
    assert len(m.requests) == 4
    m.clear()
    assert m.requests == []


def test_extract_prompt_and_reply_helpers() -> None:
    assert reply_for("a" * 80) == "mock reply to: " + "a" * 60
    assert reply_for("") == "mock reply to: "
    # tool-result-only user turns are skipped; the last user message with text wins
    body = {
        "messages": [
            {"role": "user", "content": "do it"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "x", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "ok"}]},
        ]
    }
    assert extract_prompt("anthropic.messages", body) == "do it"
    # a message that is only a system reminder keeps its raw text rather than becoming empty
    only = {"messages": [{"role": "user", "content": "<system-reminder>x</system-reminder>"}]}
    assert extract_prompt("anthropic.messages", only) == "<system-reminder>x</system-reminder>"
    assert extract_prompt("openai.chat", {"messages": "nope"}) == ""
    assert extract_prompt("unknown", {"messages": [{"role": "user", "content": "x"}]}) == ""
    assert "gemini.stream" in GENERATION_KINDS and "anthropic.count_tokens" not in GENERATION_KINDS


# ---------------------------------------------------------------------------- slow mode
def test_slow_prompt_does_not_block_other_requests(m: MockModel) -> None:
    out: dict[str, Any] = {}
    slow = threading.Thread(
        target=_timed_post, args=(m, "/v1/chat/completions", _chat_body("please be SLOW now"), out, "slow")
    )
    slow.start()
    rec = m.wait_for(lambda r: "SLOW" in r["prompt"], timeout=2)  # recorded on arrival, before the wait
    assert rec["kind"] == "openai.chat"
    t0 = time.monotonic()
    events = _sse(m, "/v1/chat/completions", _chat_body("quick"))
    fast = time.monotonic() - t0
    assert events[-1]["data"] == "[DONE]"
    assert fast < 0.5, f"a normal request took {fast:.2f} s while a SLOW one was waiting"
    assert slow.is_alive(), "the SLOW request finished before the fast one"
    slow.join(timeout=5)
    assert "slow_error" not in out and out["slow_status"] == 200
    assert out["slow"] >= 1.0
    assert m.prompts == ["please be SLOW now", "quick"]


def test_delay_s_applies_to_every_generation_request() -> None:
    with MockModel(slow_s=5.0, delay_s=0.3) as m:
        t0 = time.monotonic()
        _post_json(m, "/v1/messages", {"model": "c", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]})
        assert time.monotonic() - t0 >= 0.3
        t0 = time.monotonic()
        _post_json(m, "/v1/messages/count_tokens", {"messages": [{"role": "user", "content": "x"}]})
        assert time.monotonic() - t0 < 0.25  # count_tokens is never delayed
        m.delay_s = 0
        t0 = time.monotonic()
        _post_json(m, "/v1/chat/completions", _chat_body("y", stream=False))
        assert time.monotonic() - t0 < 0.25


# ---------------------------------------------------------------------------- shutdown
def _mock_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("mockmodel-")]


def test_server_is_shut_down_after_the_with_block() -> None:
    before = set(threading.enumerate())
    with MockModel() as m:
        port, url = m.port, m.url
        assert port > 0 and url == f"http://127.0.0.1:{port}"
        assert [t.name for t in _mock_threads()] == [f"mockmodel-{port}"]
        assert _mock_threads()[0].daemon
        _sse(m, "/v1/chat/completions", _chat_body("hi"))
    assert not m.running
    assert _mock_threads() == []
    assert set(threading.enumerate()) <= before  # no handler thread left either
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_exit_wakes_a_waiting_slow_request() -> None:
    out: dict[str, Any] = {}
    with MockModel(slow_s=30.0) as m:
        th = threading.Thread(target=_timed_post, args=(m, "/v1/responses", {"input": "SLOW"}, out, "slow"))
        th.start()
        m.wait_for(lambda r: r["prompt"] == "SLOW", timeout=2)
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 3, "stop() waited for the slow request"
    th.join(timeout=5)
    assert not th.is_alive()
    assert "slow_error" in out  # the connection was dropped without an answer
    assert _mock_threads() == []


def test_exit_unblocks_a_silent_client() -> None:
    with MockModel() as m:
        sock = socket.create_connection(("127.0.0.1", m.port), timeout=5)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        time.sleep(0.1)
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 3
    assert sock.recv(100) == b""  # the server closed it
    sock.close()


def test_start_twice_fails_and_stop_is_idempotent() -> None:
    m = MockModel()
    m.start()
    try:
        with pytest.raises(RuntimeError):
            m.start()
    finally:
        m.stop()
    m.stop()
    assert _mock_threads() == []
