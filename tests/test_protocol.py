"""Unit tests for fleetbus.protocol: codec round trips, decode robustness, check_body."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from fleetbus import protocol as P
from fleetbus.protocol import InvalidBody, ProtocolError, check_body, decode, encode

MID = "0123456789ab"

ENVELOPES = [
    P.Hello(slot="a", tenant="alice", host="h1", pid=42, adapter="stub", caps=["hook", "x"], heartbeat_ms=1000),
    P.Ping(),
    P.Ping(state="busy", runtime_pid=7, pane_alive=True, task="t-1", session_id="s1"),
    P.Ack(id=MID, at=1234.5, session_id="s1"),
    P.Ack(id=MID, evidence="pane-diff", at=1.0),
    P.Bye(),
    P.Welcome(heartbeat_ms=500, liveness=4),
    P.Pong(),
    P.Expect(id=MID, marker=f"fleet#{MID}"),
    P.Disconnect(reason="unknown peer"),
    P.Disconnect(),
    P.SendRequest(req="r1", to="a", body="hello\nworld\tü ✓"),
    P.SendRequest(req="r2", to="a", body="x", sender="bob", verify=False, timeout_s=2.5, on_busy_input="clear"),
    P.PsRequest(req="r3"),
    P.SlotRequest(kind="START", req="r4", slot="a"),
    P.SlotRequest(kind="STOP", req="r5", slot="a"),
    P.SlotRequest(kind="RESTART", req="r6", slot="a"),
    P.SlotRequest(kind="RESET", req="r7", slot="a"),
    P.HealthRequest(req="r8"),
    P.ShutdownRequest(req="r9"),
    P.ShutdownRequest(req="r9", teardown=True),
    P.Result(req="r1", ok=True, data={"rows": [{"slot": "a", "n": 1, "x": None}], "f": 1.5}),
    P.Result(req="r1", ok=False, code="unknown-slot", error="no such slot"),
    P.HookEvent(event="prompt-submit", slot="a", runtime="stub", session_id="s", markers=[MID],
                prompt_head="hi", at=5.0),
    P.HookEvent(event="turn-end"),
    P.Event(topic="message", slot="a", tenant_id="alice", host="h1", at=9.0, data={"id": MID, "ok": True}),
    P.Event(topic="router", tenant_id="alice", host="h1"),
]

ALL_KINDS = {"HELLO", "PING", "ACK", "BYE", "WELCOME", "PONG", "EXPECT", "DISCONNECT", "SEND", "PS", "START",
             "STOP", "RESTART", "RESET", "HEALTH", "SHUTDOWN", "RESULT", "HOOK", "EVENT"}


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def test_every_kind_is_covered():
    assert {m.kind for m in ENVELOPES} == ALL_KINDS


@pytest.mark.parametrize("msg", ENVELOPES, ids=lambda m: m.kind)
def test_round_trip(msg):
    frame = encode(msg)
    assert isinstance(frame, bytes)
    raw = msgpack.unpackb(frame, raw=False)
    assert isinstance(raw, dict)
    assert raw["v"] == P.PROTOCOL_VERSION and raw["kind"] == msg.kind
    assert None not in raw.values()  # exclude_none
    back = decode(frame)
    assert type(back) is type(msg)
    assert back == msg


def test_decode_ignores_extra_fields():
    msg = decode(pack({"v": 1, "kind": "PONG", "future_field": [1, 2]}))
    assert isinstance(msg, P.Pong)


def test_decode_fills_defaults():
    msg = decode(pack({"v": 1, "kind": "SEND", "req": "r", "to": "a", "body": "b"}))
    assert isinstance(msg, P.SendRequest)
    assert (msg.sender, msg.verify, msg.timeout_s, msg.on_busy_input) == ("ops", True, None, "fail")


# --- decode failures -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "frame",
    [b"", b"\xc1", b"\x81", b"\xdc\xff", b"not msgpack at all", b"\x80\x00", b"\xd9\x05ab"],
    ids=["empty", "reserved-byte", "truncated-map", "truncated-array", "text", "trailing-data", "truncated-str"],
)
def test_decode_non_msgpack(frame):
    with pytest.raises(ProtocolError):
        decode(frame)


@pytest.mark.parametrize("obj", [[1, 2], "PONG", 1, None, True, 1.5, b"bytes", [{"v": 1, "kind": "PONG"}]])
def test_decode_not_a_map(obj):
    with pytest.raises(ProtocolError, match="expected a map"):
        decode(pack(obj))


def test_decode_non_string_map_keys():
    with pytest.raises(ProtocolError):
        decode(pack({1: 1, "v": 1, "kind": "PONG"}))


@pytest.mark.parametrize("v", [0, 2, -1, "1", None, [1], 1.5])
def test_decode_wrong_version(v):
    with pytest.raises(ProtocolError, match="version"):
        decode(pack({"v": v, "kind": "PONG"}))


def test_decode_missing_version():
    with pytest.raises(ProtocolError, match="version"):
        decode(pack({"kind": "PONG"}))


@pytest.mark.parametrize("v", [True, 1.0])
def test_decode_non_integer_version_rejected(v):
    with pytest.raises(ProtocolError):
        decode(pack({"v": v, "kind": "PONG"}))


@pytest.mark.parametrize("kind", ["NOPE", "hello", "", None, 5, ["PONG"], {"a": 1}])
def test_decode_unknown_kind(kind):
    with pytest.raises(ProtocolError):
        decode(pack({"v": 1, "kind": kind}))


def test_decode_missing_kind():
    with pytest.raises(ProtocolError):
        decode(pack({"v": 1}))


@pytest.mark.parametrize(
    "obj",
    [
        {"v": 1, "kind": "HELLO"},
        {"v": 1, "kind": "HELLO", "slot": "a", "tenant": "t", "host": "h", "pid": 1, "adapter": "stub"},
        {"v": 1, "kind": "SEND", "req": "r", "to": "a"},
        {"v": 1, "kind": "ACK"},
        {"v": 1, "kind": "EXPECT", "id": MID},
        {"v": 1, "kind": "START", "req": "r"},
        {"v": 1, "kind": "RESULT", "req": "r"},
        {"v": 1, "kind": "HOOK"},
        {"v": 1, "kind": "EVENT", "topic": "t", "tenant_id": "x"},
    ],
)
def test_decode_missing_fields(obj):
    with pytest.raises(ProtocolError):
        decode(pack(obj))


@pytest.mark.parametrize(
    "obj",
    [
        {"v": 1, "kind": "PING", "state": "sleeping"},
        {"v": 1, "kind": "WELCOME", "heartbeat_ms": "fast", "liveness": 3},
        {"v": 1, "kind": "SEND", "req": "r", "to": "a", "body": "b", "on_busy_input": "ignore"},
        {"v": 1, "kind": "HOOK", "event": "nope"},
        {"v": 1, "kind": "EVENT", "topic": "t", "tenant_id": "x", "host": "h", "data": [1]},
    ],
)
def test_decode_invalid_field_values(obj):
    with pytest.raises(ProtocolError):
        decode(pack(obj))


def test_decode_oversized_frame():
    body = "x" * P.MAX_FRAME_BYTES
    frame = pack({"v": 1, "kind": "SEND", "req": "r", "to": "a", "body": body})
    assert len(frame) > P.MAX_FRAME_BYTES
    with pytest.raises(ProtocolError, match="exceeds"):
        decode(frame)


def test_decode_frame_at_limit_is_accepted():
    overhead = len(pack({"v": 1, "kind": "SEND", "req": "r", "to": "a", "body": "x" * 70_000})) - 70_000
    body = "x" * (P.MAX_FRAME_BYTES - overhead)
    frame = pack({"v": 1, "kind": "SEND", "req": "r", "to": "a", "body": body})
    assert len(frame) == P.MAX_FRAME_BYTES
    assert decode(frame).body == body


def test_protocol_error_is_value_error():
    assert issubclass(ProtocolError, ValueError)


# --- hypothesis: decode never raises anything but ProtocolError -----------------------------


def _decode_or_protocol_error(frame: bytes) -> None:
    try:
        msg = decode(frame)
    except ProtocolError:
        return
    assert isinstance(msg, BaseModel)
    assert msg.kind in ALL_KINDS
    assert msg.v == P.PROTOCOL_VERSION


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=256))
def test_decode_arbitrary_bytes(frame):
    _decode_or_protocol_error(frame)


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=10),
    st.binary(max_size=10),
)
_keys = st.one_of(
    st.sampled_from(["v", "kind", "slot", "req", "to", "body", "id", "event", "data", "markers", "state"]),
    st.text(max_size=8),
)
_values = st.recursive(
    _scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(st.one_of(_keys, st.integers(min_value=0, max_value=3)), children, max_size=3),
    ),
    max_leaves=6,
)
_kinds = st.one_of(st.sampled_from(sorted(ALL_KINDS)), _scalars)
_versions = st.one_of(st.just(1), _scalars)


@st.composite
def _envelope_like(draw):
    d = draw(st.dictionaries(_keys, _values, max_size=8))
    if draw(st.booleans()):
        d["v"] = draw(_versions)
    if draw(st.booleans()):
        d["kind"] = draw(_kinds)
    return d


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(_envelope_like(), _values))
def test_decode_arbitrary_msgpack(obj):
    _decode_or_protocol_error(pack(obj))


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=64))
def test_decode_valid_frame_with_garbage_appended(extra):
    with pytest.raises(ProtocolError):
        decode(encode(P.Pong()) + extra)


# --- check_body ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    ["hi", "line one\nline two", "col1\tcol2", "unicode: ü ✓ 日本語 😀", "  leading and trailing  ", "a\n\n\nb\n",
     "\ttabbed", "non-breaking\u00a0space"],
)
def test_check_body_accepts_text(body):
    assert check_body(body, 1024) == body


def test_check_body_converts_crlf():
    assert check_body("a\r\nb\r\n", 100) == "a\nb\n"


@pytest.mark.parametrize(
    "body",
    [
        "\x1b[201~ rm -rf",
        "\x1b]0;title\x07",
        "hello \x1bP1$q\x1b\\",
        "\x1b",
        "\x9b201~",
        "x\x80y",
        "x\x9fy",
        "a\rb",
        "trailing cr\r",
        "nul\x00byte",
        "del\x7f",
        "bell\x07",
        "back\x08space",
        "vertical\x0btab",
        "form\x0cfeed",
        "file\x1csep",
        "next-line\x85",
        "a\r\r\nb",
    ],
)
def test_check_body_refuses_controls(body):
    with pytest.raises(InvalidBody):
        check_body(body, 1024)


def test_check_body_names_offset_and_char():
    with pytest.raises(InvalidBody, match=r"ESC character U\+001B at offset 3"):
        check_body("abc\x1b[201~", 1024)
    with pytest.raises(InvalidBody, match=r"CSI character U\+009B"):
        check_body("\x9b", 1024)
    with pytest.raises(InvalidBody, match=r"CR character U\+000D at offset 1"):
        check_body("a\rb", 1024)


def test_check_body_refuses_lone_surrogate():
    with pytest.raises(InvalidBody):
        check_body("a\ud800b", 1024)


@pytest.mark.parametrize("body", ["", " ", "\n\n", "\t \n", "\r\n", "   \r\n  "])
def test_check_body_refuses_empty(body):
    with pytest.raises(InvalidBody, match="empty"):
        check_body(body, 1024)


def test_check_body_size_limit_in_utf8_bytes():
    assert check_body("a" * 64, 64) == "a" * 64
    with pytest.raises(InvalidBody, match="65 bytes"):
        check_body("a" * 65, 64)
    # 32 two-byte characters = 64 bytes: fits; 33 = 66 bytes: too large though only 33 characters
    assert check_body("é" * 32, 64) == "é" * 32
    with pytest.raises(InvalidBody, match="66 bytes"):
        check_body("é" * 33, 64)
    # 4-byte emoji: 16 fit in 64 bytes, 17 do not
    assert check_body("😀" * 16, 64)
    with pytest.raises(InvalidBody):
        check_body("😀" * 17, 64)


def test_check_body_size_counted_after_crlf_conversion():
    body = "a\r\n" * 32  # 96 bytes with CRLF, 64 bytes with LF
    assert check_body(body, 64) == "a\n" * 32


_interesting = st.sampled_from(["\n", "\t", "\r", "\r\n", "\x1b", "\x00", "\x7f", "\x85", "\x9b", " ", "a", "é", "😀"])


@settings(max_examples=1000, deadline=None)
@given(st.one_of(st.text(), st.lists(st.one_of(_interesting, st.characters())).map("".join)),
       st.integers(min_value=1, max_value=200))
def test_check_body_property(body, max_bytes):
    try:
        out = check_body(body, max_bytes)
    except InvalidBody:
        return
    for ch in out:
        o = ord(ch)
        assert not (o < 0x20 and ch not in "\n\t"), repr(out)
        assert not (0x7F <= o <= 0x9F), repr(out)
    assert "\r" not in out
    assert out == body.replace("\r\n", "\n")
    assert out.strip()
    assert len(out.encode("utf-8")) <= max_bytes
