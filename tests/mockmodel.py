"""A mock LLM HTTP server for offline integration tests of real agent CLIs.

The server speaks just enough of four provider APIs for the agent TUIs to run a turn against
``127.0.0.1`` with no internet. It always answers with the same deterministic text,
``"mock reply to: <first 60 chars of the prompt>"`` (see :func:`reply_for`).

Which CLI calls which endpoint (the versions in the research notes) and how to point it here:

* Claude Code 2.1.197: ``POST /v1/messages?beta=true`` (Anthropic SSE), once per turn plus small side
  calls (title/quota), and sometimes ``/v1/messages/count_tokens``. It also sends a ``HEAD /`` reachability
  probe, which gets a 404 and is harmless. Set ``ANTHROPIC_BASE_URL=<url>``.
* Codex CLI 0.169.0: only ``POST /v1/responses`` (Responses SSE), including title-generation side calls.
  Set ``base_url = "<url>/v1"`` and ``wire_api = "responses"`` (Codex rejects ``wire_api = "chat"``).
* pi 0.73.1 (``api: "openai-completions"``): ``POST /v1/chat/completions`` (Chat SSE). Set
  ``"baseUrl": "<url>/v1"``.
* opencode 1.18.33 (``@ai-sdk/openai-compatible``): ``POST /v1/chat/completions`` (Chat SSE), including a
  title-generation call. Set ``"baseURL": "<url>/v1"``.
* Gemini CLI 0.61.0: ``POST /v1beta/models/{model}:streamGenerateContent?alt=sse``. Set
  ``GOOGLE_GEMINI_BASE_URL=<url>``.

All five completed a headless turn against this server (``claude -p``, ``codex exec``, ``pi -p``,
``opencode run``, ``gemini -p``), each printing ``mock reply to: ...``.

Routes served:

* ``POST /v1/messages`` (with or without ``?beta=true``): Anthropic Messages. With ``"stream": true`` it sends
  SSE ``event:``/``data:`` pairs: message_start, content_block_start, ping, content_block_delta (text_delta)
  ..., content_block_stop, message_delta (stop_reason ``end_turn`` + usage), message_stop. Otherwise it returns
  a JSON message object.
* ``POST /v1/messages/count_tokens``: ``{"input_tokens": N}``.
* ``POST /v1/responses``: OpenAI Responses. The SSE stream has response.created, response.in_progress,
  response.output_item.added, response.content_part.added, response.output_text.delta ...,
  response.output_text.done, response.content_part.done, response.output_item.done and response.completed
  (with ``response.output`` and ``response.usage``). Every event has ``sequence_number``. Without
  ``"stream": true`` it returns the response object as JSON.
* ``POST /v1/chat/completions``: Chat Completions. The stream is ``data: {chunk}`` lines: the role first, then
  content pieces, then a ``finish_reason: "stop"`` chunk. If ``stream_options.include_usage`` is set, a usage
  chunk with ``choices: []`` follows, as in the real API. The stream ends with ``data: [DONE]``. Without
  streaming it returns a normal ``chat.completion`` JSON.
* ``POST /v1beta/models/{model}:streamGenerateContent?alt=sse``: Gemini ``data: {"candidates": [...]}`` chunks.
  The last chunk carries ``finishReason: "STOP"`` and ``usageMetadata``. Without ``alt=sse`` the chunks come
  back as one JSON array. ``:generateContent`` returns a JSON response and ``:countTokens`` returns
  ``{"totalTokens": N}``.
* ``GET /v1/models``: a one-model list that both OpenAI clients (``object``/``owned_by``) and Anthropic clients
  (``type``/``display_name``/``has_more``) accept.
* Anything else gets a 404 JSON error. Like every other request, it is recorded in :attr:`MockModel.requests`.

SSE responses are sent with ``Connection: close`` and flushed after every event. In fact every response
closes its connection, so no idle keep-alive handler thread can outlive the server.

Slow mode: if the prompt contains the word ``SLOW`` (a whole word, case-sensitive), the server waits
``slow_s`` seconds (default 8) before it answers. If ``m.delay_s`` is above 0, every generation request
waits at least that long. The server is threaded, so a waiting request does not block any other request,
and :meth:`MockModel.stop` wakes a waiting request at once (that request's connection is then dropped
with no answer). Use this to hold a turn busy and test queueing and steering.

Usage::

    from mockmodel import MockModel        # tests/ is on sys.path under pytest

    with MockModel(slow_s=3.0) as m:
        env = {"ANTHROPIC_BASE_URL": m.url, ...}           # or f"{m.url}/v1" for OpenAI-style clients
        ... start the CLI in tmux, type a prompt ...
        rec = m.wait_for(lambda r: r["prompt"] == "hello", timeout=30)
        assert rec["kind"] == "anthropic.messages"
        assert "hello" in m.prompts

Each record in ``m.requests`` is a dict with these keys: ``seq``, ``time``, ``method``, ``path`` (with the
query), ``route`` (the path without the query), ``query``, ``kind`` (for example ``"openai.responses"``;
``"unknown"`` for a 404), ``headers`` (keys in lower case), ``body`` (the parsed JSON or ``None``), ``prompt``
(the text of the last user message, extracted per API format), ``stream`` and ``status``. A request is
recorded when it arrives, before any slow-mode wait.

This module uses only the standard library and reads no files.
"""

from __future__ import annotations

import json
import re
import socket
import socketserver
import sys
import threading
import time
import zlib
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

__all__ = ["MockModel", "reply_for", "extract_prompt", "DEFAULT_MODEL", "GENERATION_KINDS"]

DEFAULT_MODEL = "mock-model"
REPLY_PREFIX = "mock reply to: "
GENERATION_KINDS = frozenset(
    {"anthropic.messages", "openai.responses", "openai.chat", "gemini.stream", "gemini.generate"}
)
_SLOW_RE = re.compile(r"\bSLOW\b")
_GEMINI_RE = re.compile(r"^/v1(?:beta|alpha)?/models/([^/:]+):([A-Za-z]+)$")
# Context blocks that the CLIs put next to the text the user typed: Claude Code's <system-reminder>,
# Codex's <environment_context>/<user_instructions>, Gemini CLI's <session_context> (first turn).
_WRAPPER_RE = re.compile(
    r"<(system-reminder|environment_context|user_instructions|session_context)>.*?</\1>", re.DOTALL
)


def reply_for(prompt: str) -> str:
    """Return the deterministic reply text for ``prompt``."""
    return REPLY_PREFIX + (prompt or "")[:60]


def _estimate_tokens(obj: Any) -> int:
    """Estimate a token count deterministically (about 4 characters a token, at least 1)."""
    text = obj if isinstance(obj, str) else json.dumps(obj, sort_keys=True, ensure_ascii=False)
    return max(1, (len(text) + 3) // 4)


def _clean(texts: list[str]) -> str:
    """Join text pieces, dropping CLI context wrappers; keep the raw text if nothing else is left."""
    raw = "\n".join(t for t in texts if t).strip()
    stripped = [_WRAPPER_RE.sub("", t).strip() for t in texts if t]
    cleaned = "\n".join(t for t in stripped if t).strip()
    return cleaned or raw


def _texts_of(content: Any, part_types: tuple[str, ...]) -> list[str]:
    """Return the text pieces of a message ``content``, which is a string or a list of typed parts."""
    if isinstance(content, str):
        return [content]
    out: list[str] = []
    if isinstance(content, list):
        for part in content:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, dict) and part.get("type", "text") in part_types:
                text = part.get("text")
                if isinstance(text, str):
                    out.append(text)
    return out


def _last_user_text(messages: Any, part_types: tuple[str, ...], role_key: str = "role") -> str:
    """Return the text of the last user message that has any text (skipping tool-result-only turns)."""
    if not isinstance(messages, list):
        return ""
    for msg in reversed(messages):
        if not isinstance(msg, dict) or msg.get(role_key, "user") != "user":
            continue
        if msg.get("type", "message") != "message":
            continue
        texts = _texts_of(msg.get("content"), part_types)
        if any(t.strip() for t in texts):
            return _clean(texts)
    return ""


def extract_prompt(kind: str, body: Any) -> str:
    """Return the text of the last user message in ``body`` for an API ``kind`` (``""`` if none)."""
    if not isinstance(body, dict):
        return ""
    if kind.startswith("anthropic"):
        return _last_user_text(body.get("messages"), ("text",))
    if kind == "openai.chat":
        return _last_user_text(body.get("messages"), ("text", "input_text"))
    if kind == "openai.responses":
        items = body.get("input")
        if isinstance(items, str):
            return items.strip()
        return _last_user_text(items, ("input_text", "text"))
    if kind.startswith("gemini"):
        contents = body.get("contents")
        if isinstance(contents, dict):
            contents = [contents]
        if not isinstance(contents, list):
            return ""
        for content in reversed(contents):
            if not isinstance(content, dict) or content.get("role", "user") != "user":
                continue
            texts = [
                p["text"]
                for p in content.get("parts") or []
                if isinstance(p, dict) and isinstance(p.get("text"), str) and not p.get("thought")
            ]
            if any(t.strip() for t in texts):
                return _clean(texts)
        return ""
    return ""


def _pieces(text: str) -> list[str]:
    """Split ``text`` into word-sized stream pieces whose concatenation is exactly ``text``."""
    parts = re.findall(r"\s*\S+\s*", text)
    return parts if "".join(parts) == text and parts else [text]


class _Abort(Exception):
    """The server is stopping while a request waits; drop the connection without an answer."""


class _Server(ThreadingHTTPServer):
    """A threading HTTP server that tracks open connections so that ``stop`` can unblock them."""

    daemon_threads = True
    block_on_close = True  # server_close() joins the handler threads
    allow_reuse_address = False

    def __init__(self, addr: tuple[str, int], mock: MockModel) -> None:
        self.mock = mock
        self.conns: set[socket.socket] = set()
        self.conns_lock = threading.Lock()
        super().__init__(addr, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a reverse DNS lookup that can stall offline.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def process_request(self, request, client_address):  # noqa: ANN001 (socketserver signature)
        with self.conns_lock:
            self.conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):  # noqa: ANN001
        with self.conns_lock:
            self.conns.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request, client_address):  # noqa: ANN001
        # Clients that hang up mid-stream, or a forced stop: record the error; print nothing.
        exc = sys.exc_info()[1]
        self.mock._errors.append(repr(exc))


class _Handler(BaseHTTPRequestHandler):
    # Note: no method may be named ``responses``; it would shadow BaseHTTPRequestHandler.responses.
    protocol_version = "HTTP/1.1"
    server_version = "fleetbus-mockmodel/1"
    timeout = 30  # a connected client that never sends a request cannot pin a thread for long
    server: _Server

    # ------------------------------------------------------------------ plumbing
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (signature from stdlib)
        pass  # silence the default per-request stderr logging

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_OPTIONS(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            data = bytearray()
            while True:
                size_line = self.rfile.readline(65537)
                if not size_line:
                    break
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                data += self.rfile.read(size)
                self.rfile.readline(65537)  # CRLF after the chunk
            raw = bytes(data)
        else:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length > 0 else b""
        encoding = self.headers.get("Content-Encoding", "").lower().strip()
        if raw and encoding in ("gzip", "x-gzip"):
            raw = zlib.decompress(raw, 16 + zlib.MAX_WBITS)
        elif raw and encoding == "deflate":
            raw = zlib.decompress(raw)
        elif raw and encoding == "zstd":
            try:
                from compression import zstd  # type: ignore[import-not-found]  # Python >= 3.14
            except ImportError as exc:
                raise ValueError("zstd request bodies need Python >= 3.14") from exc
            raw = zstd.decompress(raw)
        return raw

    def _send_json(self, status: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        if self.command != "HEAD":
            self.wfile.write(data)
            self.wfile.flush()

    def _start_sse(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the body ends when the connection closes
        self.end_headers()
        self.close_connection = True
        self.wfile.flush()

    def _event(self, data: Any, event: str | None = None) -> None:
        payload = data if isinstance(data, str) else json.dumps(data)
        head = f"event: {event}\n" if event else ""
        self.wfile.write(f"{head}data: {payload}\n\n".encode())
        self.wfile.flush()

    @staticmethod
    def _error_body(status: int, etype: str, message: str) -> dict[str, Any]:
        # One shape that Anthropic ("type": "error"), OpenAI and Google style clients can all read.
        return {
            "type": "error",
            "error": {"type": etype, "message": message, "code": status, "status": etype.upper()},
        }

    # ------------------------------------------------------------------ routing
    def _dispatch(self) -> None:
        mock = self.server.mock
        split = urlsplit(self.path)
        route, query = split.path, parse_qs(split.query)
        kind, gemini_model = self._route(self.command, route)
        body: Any = None
        status = 200
        error = ""
        try:
            raw = self._read_body()
            if raw.strip():
                body = json.loads(raw)
        except (ValueError, UnicodeDecodeError, zlib.error) as exc:
            status, error = 400, f"mock: could not read the JSON body: {exc}"
        if kind == "unknown":
            status, error = 404, f"mock: no route for {self.command} {route}"
        prompt = extract_prompt(kind, body)
        stream = bool(isinstance(body, dict) and body.get("stream"))
        if kind == "gemini.stream":
            stream = True
        record = {
            "method": self.command,
            "path": self.path,
            "route": route,
            "query": {k: v[-1] for k, v in query.items()},
            "kind": kind,
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "body": body,
            "prompt": prompt,
            "stream": stream,
            "status": status,
        }
        seq = mock._record(record)
        if status != 200:
            etype = "not_found_error" if status == 404 else "invalid_request_error"
            self._send_json(status, self._error_body(status, etype, error))
            return
        if not isinstance(body, dict):
            body = {}
        try:
            if kind in GENERATION_KINDS:
                mock._wait_if_slow(prompt)
            model = gemini_model or body.get("model") or mock.model
            ctx = _Turn(seq=seq, prompt=prompt, model=str(model), body=body)
            if kind == "anthropic.messages":
                self._anthropic(ctx, stream)
            elif kind == "anthropic.count_tokens":
                self._send_json(200, {"input_tokens": ctx.input_tokens})
            elif kind == "openai.responses":
                self._openai_responses(ctx, stream)
            elif kind == "openai.chat":
                self._chat(ctx, stream, body)
            elif kind == "gemini.stream":
                self._gemini(ctx, sse=query.get("alt", [""])[-1] == "sse")
            elif kind == "gemini.generate":
                self._send_json(200, self._gemini_chunk(ctx, ctx.reply, final=True))
            elif kind == "gemini.count_tokens":
                self._send_json(200, {"totalTokens": ctx.input_tokens})
            elif kind == "models":
                self._send_json(200, self._models(mock.model))
        except _Abort:
            self.close_connection = True

    @staticmethod
    def _route(method: str, route: str) -> tuple[str, str | None]:
        if method == "GET" and route == "/v1/models":
            return "models", None
        if method != "POST":
            return "unknown", None
        if route == "/v1/messages":
            return "anthropic.messages", None
        if route == "/v1/messages/count_tokens":
            return "anthropic.count_tokens", None
        if route == "/v1/responses":
            return "openai.responses", None
        if route == "/v1/chat/completions":
            return "openai.chat", None
        match = _GEMINI_RE.match(route)
        if match:
            kind = {
                "streamGenerateContent": "gemini.stream",
                "generateContent": "gemini.generate",
                "countTokens": "gemini.count_tokens",
            }.get(match.group(2))
            if kind:
                return kind, match.group(1)
        return "unknown", None

    # ------------------------------------------------------------------ Anthropic Messages
    def _anthropic(self, t: _Turn, stream: bool) -> None:
        msg_id = f"msg_mock_{t.seq:06d}"
        if not stream:
            self._send_json(
                200,
                {
                    "id": msg_id,
                    "type": "message",
                    "role": "assistant",
                    "model": t.model,
                    "content": [{"type": "text", "text": t.reply}],
                    "stop_reason": "end_turn",
                    "stop_sequence": None,
                    "usage": {
                        "input_tokens": t.input_tokens,
                        "output_tokens": t.output_tokens,
                        "cache_creation_input_tokens": 0,
                        "cache_read_input_tokens": 0,
                    },
                },
            )
            return
        self._start_sse()
        events: list[dict[str, Any]] = [
            {
                "type": "message_start",
                "message": {
                    "id": msg_id,
                    "type": "message",
                    "role": "assistant",
                    "model": t.model,
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {
                        "input_tokens": t.input_tokens,
                        "output_tokens": 1,
                        "cache_creation_input_tokens": 0,
                        "cache_read_input_tokens": 0,
                    },
                },
            },
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            {"type": "ping"},
        ]
        events += [
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}}
            for piece in _pieces(t.reply)
        ]
        events += [
            {"type": "content_block_stop", "index": 0},
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": t.output_tokens},
            },
            {"type": "message_stop"},
        ]
        for ev in events:
            self._event(ev, ev["type"])

    # ------------------------------------------------------------------ OpenAI Responses
    def _openai_responses(self, t: _Turn, stream: bool) -> None:
        resp_id = f"resp_mock_{t.seq:06d}"
        item_id = f"msg_mock_{t.seq:06d}"
        created = int(time.time())
        usage = {
            "input_tokens": t.input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": t.output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": t.input_tokens + t.output_tokens,
        }
        part_done = {"type": "output_text", "text": t.reply, "annotations": [], "logprobs": []}
        item_done = {
            "id": item_id,
            "type": "message",
            "status": "completed",
            "role": "assistant",
            "content": [part_done],
        }

        def response(status: str, output: list[Any], use: Any) -> dict[str, Any]:
            return {
                "id": resp_id,
                "object": "response",
                "created_at": created,
                "status": status,
                "error": None,
                "incomplete_details": None,
                "model": t.model,
                "output": output,
                "parallel_tool_calls": bool(t.body.get("parallel_tool_calls", False)),
                "store": bool(t.body.get("store", False)),
                "usage": use,
            }

        if not stream:
            self._send_json(200, response("completed", [item_done], usage))
            return
        events: list[dict[str, Any]] = [
            {"type": "response.created", "response": response("in_progress", [], None)},
            {"type": "response.in_progress", "response": response("in_progress", [], None)},
            {
                "type": "response.output_item.added",
                "output_index": 0,
                "item": {"id": item_id, "type": "message", "status": "in_progress", "role": "assistant", "content": []},
            },
            {
                "type": "response.content_part.added",
                "item_id": item_id,
                "output_index": 0,
                "content_index": 0,
                "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []},
            },
        ]
        events += [
            {
                "type": "response.output_text.delta",
                "item_id": item_id,
                "output_index": 0,
                "content_index": 0,
                "delta": piece,
                "logprobs": [],
            }
            for piece in _pieces(t.reply)
        ]
        events += [
            {
                "type": "response.output_text.done",
                "item_id": item_id,
                "output_index": 0,
                "content_index": 0,
                "text": t.reply,
                "logprobs": [],
            },
            {
                "type": "response.content_part.done",
                "item_id": item_id,
                "output_index": 0,
                "content_index": 0,
                "part": part_done,
            },
            {"type": "response.output_item.done", "output_index": 0, "item": item_done},
            {"type": "response.completed", "response": response("completed", [item_done], usage)},
        ]
        self._start_sse()
        for n, ev in enumerate(events):
            ev["sequence_number"] = n
            self._event(ev, ev["type"])

    # ------------------------------------------------------------------ Chat Completions
    def _chat(self, t: _Turn, stream: bool, body: dict[str, Any]) -> None:
        chat_id = f"chatcmpl-mock-{t.seq:06d}"
        created = int(time.time())
        usage = {
            "prompt_tokens": t.input_tokens,
            "completion_tokens": t.output_tokens,
            "total_tokens": t.input_tokens + t.output_tokens,
        }
        if not stream:
            self._send_json(
                200,
                {
                    "id": chat_id,
                    "object": "chat.completion",
                    "created": created,
                    "model": t.model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": t.reply},
                            "finish_reason": "stop",
                            "logprobs": None,
                        }
                    ],
                    "usage": usage,
                },
            )
            return

        def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
            return {
                "id": chat_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": t.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
            }

        chunks = [chunk({"role": "assistant", "content": ""}, None)]
        chunks += [chunk({"content": piece}, None) for piece in _pieces(t.reply)]
        chunks.append(chunk({}, "stop"))
        opts = body.get("stream_options")
        if isinstance(opts, dict) and opts.get("include_usage"):
            chunks.append(
                {
                    "id": chat_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": t.model,
                    "choices": [],
                    "usage": usage,
                }
            )
        self._start_sse()
        for c in chunks:
            self._event(c)
        self._event("[DONE]")

    # ------------------------------------------------------------------ Gemini
    def _gemini_chunk(self, t: _Turn, text: str, final: bool) -> dict[str, Any]:
        cand: dict[str, Any] = {"content": {"role": "model", "parts": [{"text": text}]}, "index": 0}
        out: dict[str, Any] = {"candidates": [cand]}
        if final:
            cand["finishReason"] = "STOP"
            out["usageMetadata"] = {
                "promptTokenCount": t.input_tokens,
                "candidatesTokenCount": t.output_tokens,
                "totalTokenCount": t.input_tokens + t.output_tokens,
            }
        else:
            out["usageMetadata"] = {"promptTokenCount": t.input_tokens, "totalTokenCount": t.input_tokens}
        out["modelVersion"] = t.model
        out["responseId"] = f"mock-{t.seq:06d}"
        return out

    def _gemini(self, t: _Turn, sse: bool) -> None:
        pieces = _pieces(t.reply)
        chunks = [self._gemini_chunk(t, p, final=(i == len(pieces) - 1)) for i, p in enumerate(pieces)]
        if not sse:
            self._send_json(200, chunks)  # the real API streams one JSON array without alt=sse
            return
        self._start_sse()
        for c in chunks:
            self._event(c)

    # ------------------------------------------------------------------ models
    @staticmethod
    def _models(model: str) -> dict[str, Any]:
        entry = {
            "id": model,
            "object": "model",
            "type": "model",
            "created": 0,
            "created_at": "2025-01-01T00:00:00Z",
            "owned_by": "mock",
            "display_name": "Mock Model",
        }
        return {"object": "list", "data": [entry], "has_more": False, "first_id": model, "last_id": model}


class _Turn:
    """What one generation request needs: its sequence number, prompt, reply and token counts."""

    def __init__(self, seq: int, prompt: str, model: str, body: dict[str, Any]) -> None:
        self.seq = seq
        self.prompt = prompt
        self.model = model
        self.body = body
        self.reply = reply_for(prompt)
        relevant = {
            k: body.get(k)
            for k in ("system", "messages", "instructions", "input", "contents", "systemInstruction", "tools")
            if body.get(k) is not None
        }
        if not relevant and isinstance(body.get("generateContentRequest"), dict):
            relevant = body["generateContentRequest"]  # countTokens may wrap a whole request
        self.input_tokens = _estimate_tokens(relevant) if relevant else 1
        self.output_tokens = _estimate_tokens(self.reply)


class MockModel:
    """A mock LLM server on 127.0.0.1 for the duration of a ``with`` block (see the module docstring).

    ``slow_s``: how long a prompt containing the word ``SLOW`` waits before the answer (default 8 s).
    ``delay_s``: a wait for every generation request (default 0; can be changed while running).
    ``model``: the model id reported by ``GET /v1/models`` and used when a request names none.
    ``port``: 0 (the default) lets the OS pick a free port.
    """

    def __init__(
        self,
        slow_s: float = 8.0,
        delay_s: float = 0.0,
        model: str = DEFAULT_MODEL,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.slow_s = float(slow_s)
        self.delay_s = float(delay_s)
        self.model = model
        self.host = host
        self._want_port = port
        self._lock = threading.Condition()
        self._requests: list[dict[str, Any]] = []
        self._seq = 0
        self._errors: list[str] = []
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.port: int = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> MockModel:
        if self._server is not None:
            raise RuntimeError("MockModel is already running")
        self._stopping.clear()
        self._server = _Server((self.host, self._want_port), self)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"mockmodel-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        self._stopping.set()  # wakes requests that wait in slow mode
        server.shutdown()  # stop accepting; returns once serve_forever has left its loop
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:  # a short grace for responses being written
            with server.conns_lock:
                if not server.conns:
                    break
            time.sleep(0.01)
        with server.conns_lock:
            stuck = list(server.conns)
        for conn in stuck:  # unblock handlers still reading from a silent client
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        server.server_close()  # closes the listening socket and joins the handler threads
        if thread is not None:
            thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> MockModel:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def url(self) -> str:
        """The base URL, ``http://127.0.0.1:<port>`` (OpenAI-style clients want ``url + "/v1"``)."""
        return f"http://{self.host}:{self.port}"

    # ------------------------------------------------------------------ the request log
    @property
    def requests(self) -> list[dict[str, Any]]:
        """A snapshot (a new list, taken under a lock) of every request recorded so far, oldest first."""
        with self._lock:
            return list(self._requests)

    @property
    def prompts(self) -> list[str]:
        """The prompts of the generation requests so far (count_tokens, models and 404s left out)."""
        return [r["prompt"] for r in self.requests if r["kind"] in GENERATION_KINDS]

    @property
    def errors(self) -> list[str]:
        """Exceptions raised while handling requests (for example a client hung up mid-stream)."""
        return list(self._errors)

    def clear(self) -> None:
        """Forget the recorded requests."""
        with self._lock:
            self._requests.clear()

    def wait_for(
        self, pred: Callable[[dict[str, Any]], object], timeout: float = 30.0
    ) -> dict[str, Any]:
        """Block until a recorded request satisfies ``pred`` and return it; ``TimeoutError`` if none does in time."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                for rec in self._requests:
                    if pred(rec):
                        return rec
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no matching request to the mock model within {timeout:g} s")
                self._lock.wait(left)

    # ------------------------------------------------------------------ used by the handler
    def _record(self, record: dict[str, Any]) -> int:
        with self._lock:
            self._seq += 1
            seq = record["seq"] = self._seq
            record["time"] = time.time()
            self._requests.append(record)
            self._lock.notify_all()
            return seq

    def _wait_if_slow(self, prompt: str) -> None:
        delay = max(self.delay_s, self.slow_s if _SLOW_RE.search(prompt or "") else 0.0)
        if delay > 0 and self._stopping.wait(delay):
            raise _Abort()
