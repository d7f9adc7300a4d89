"""Property tests of the hostile-input boundary: the wire decoder and the message-body check.

Each property runs 10,000 hypothesis cases (``FUZZ_EXAMPLES``) per run:

- :func:`fleetbus.protocol.decode` on arbitrary bytes, on mutated valid frames, and on msgpack
  maps that mix valid kinds and versions with hostile field values (wrong types, huge ints,
  NaN/inf, nested containers, bin where a str belongs, invalid UTF-8 inside a str, ext types,
  absurdly long ids) either returns a valid envelope model or raises ProtocolError, never
  anything else; what it returns satisfies the documented limits and re-encodes to itself.
- :func:`fleetbus.protocol.check_body` on arbitrary text agrees exactly with a character-by-
  character reference of the body rules, and what it returns is free of every forbidden
  character.

The router's own survival of such frames is proven on a real fleet in test_hostile.py.
"""

from __future__ import annotations

import math
import re
import struct

import msgpack
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis.control import currently_in_test_context
from hypothesis import strategies as st
from pydantic import ValidationError

from fleetbus import protocol as P
from fleetbus.protocol import InvalidBody, ProtocolError, check_body, decode, encode

FUZZ_EXAMPLES = 10_000
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

MID = "0123456789ab"
#: one valid example per kind: the seeds that structured fuzzing mutates
VALID: list[P._Env] = [
    P.Hello(slot="a", tenant="t", host="h", pid=42, adapter="stub", caps=["hook"], heartbeat_ms=1000),
    P.Ping(state="busy", runtime_pid=7, pane_alive=True, task="t-1", session_id="s1"),
    P.Ack(id=MID, at=1.5, session_id="s"), P.Bye(), P.Welcome(heartbeat_ms=500, liveness=3), P.Pong(),
    P.Expect(id=MID, marker=f"fleet#{MID}"), P.Disconnect(reason="x"),
    P.SendRequest(req="r", to="a", body="hi", sender="ops", timeout_s=2.0, idempotency_key="k-1",
                  when="available", ttl_s=60.0),
    P.PublishRequest(req="r", to="idle:reviewer", body="review", sender="lead", wait="done", wait_s=5.0,
                     timeout_s=60.0, allow_busy=True, kickstart="Task {task_id}: {body}", idempotency_key="k-2"),
    P.TaskRequest(req="r", id="t0123456789ab", wait="done", timeout_s=1.0),
    P.PsRequest(req="r"), P.SlotRequest(kind="RESET", req="r", slot="a", timeout_s=3.0),
    P.HealthRequest(req="r", probe="p1"), P.ShutdownRequest(req="r", teardown=True), P.KeysRequest(req="r"),
    P.Result(req="r", ok=False, code="unknown-slot", error="no", data={"x": [1, 2.5, None]}),
    P.HookEvent(event="prompt-submit", slot="a", runtime="stub", session_id="s", markers=[MID], prompt_head="hi"),
    P.Event(topic="message", seq=3, slot="a", tenant_id="t", host="h", data={"id": MID}),
]
KINDS = sorted(P._BY_KIND)
VALID_FRAMES = [encode(m) for m in VALID]
VALID_DICTS = [msgpack.unpackb(f, raw=False) for f in VALID_FRAMES]
OWN_FIELDS = {k: sorted(set(m.model_fields) - {"v", "kind"}) for k, m in P._BY_KIND.items()}
FIELDS = sorted({k for d in VALID_DICTS for k in d} | {f for m in P.ENVELOPES for f in m.model_fields})

#: fields that hold free text (bounded by the frame size only) or anything (``data``)
FREE_TEXT = {"body", "reason", "error", "prompt_head", "kickstart"}
ANY_FIELDS = {"data"}
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def test_every_envelope_model_has_a_seed():
    assert {type(m) for m in VALID} == set(P.ENVELOPES)


# --- a msgpack encoder that can also write what msgpack-python refuses to ------------------------


class RawStr(bytes):
    """Bytes packed with a msgpack *str* header: lets a frame carry invalid UTF-8 in a str."""


class RawExt(tuple):
    """``(code, data)`` packed as a msgpack ext of any code, reserved negative ones included
    (-1 is the timestamp type: a wrong length there makes msgpack-python raise)."""


def pack(obj) -> bytes:
    """Minimal msgpack encoder (the spec's smallest encodings, like msgpack-python) that also
    packs :class:`RawStr` and ints beyond 64 bits are never produced by the strategies."""
    if obj is None:
        return b"\xc0"
    if obj is True:
        return b"\xc3"
    if obj is False:
        return b"\xc2"
    if isinstance(obj, int):
        if 0 <= obj < 0x80:
            return bytes([obj])
        if -32 <= obj < 0:
            return struct.pack("b", obj)
        if obj >= 0:
            for tag, fmt, top in ((0xCC, ">B", 1 << 8), (0xCD, ">H", 1 << 16), (0xCE, ">I", 1 << 32), (0xCF, ">Q", 1 << 64)):
                if obj < top:
                    return bytes([tag]) + struct.pack(fmt, obj)
        for tag, fmt, low in ((0xD0, ">b", -(1 << 7)), (0xD1, ">h", -(1 << 15)), (0xD2, ">i", -(1 << 31)), (0xD3, ">q", -(1 << 63))):
            if obj >= low:
                return bytes([tag]) + struct.pack(fmt, obj)
        raise OverflowError(obj)
    if isinstance(obj, float):
        return b"\xcb" + struct.pack(">d", obj)
    if isinstance(obj, RawStr) or isinstance(obj, str):
        data = bytes(obj) if isinstance(obj, RawStr) else obj.encode("utf-8")
        n = len(data)
        head = bytes([0xA0 | n]) if n < 32 else (b"\xd9" + struct.pack(">B", n) if n < 256 else
                                                  b"\xda" + struct.pack(">H", n) if n < 65536 else b"\xdb" + struct.pack(">I", n))
        return head + data
    if isinstance(obj, bytes):
        n = len(obj)
        return (b"\xc4" + struct.pack(">B", n) if n < 256 else b"\xc5" + struct.pack(">H", n) if n < 65536
                else b"\xc6" + struct.pack(">I", n)) + obj
    if isinstance(obj, (msgpack.ExtType, msgpack.Timestamp, RawExt)):
        code, data = ((obj.code, obj.data) if isinstance(obj, msgpack.ExtType) else
                      (-1, obj.to_bytes()) if isinstance(obj, msgpack.Timestamp) else obj)
        n = len(data)
        fix = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}
        head = bytes([fix[n]]) if n in fix else b"\xc7" + struct.pack(">B", n)
        return head + struct.pack(">b", code) + data
    if isinstance(obj, list):
        n = len(obj)
        head = bytes([0x90 | n]) if n < 16 else b"\xdc" + struct.pack(">H", n) if n < 65536 else b"\xdd" + struct.pack(">I", n)
        return head + b"".join(pack(x) for x in obj)
    if isinstance(obj, dict):
        n = len(obj)
        head = bytes([0x80 | n]) if n < 16 else b"\xde" + struct.pack(">H", n) if n < 65536 else b"\xdf" + struct.pack(">I", n)
        return head + b"".join(pack(k) + pack(v) for k, v in obj.items())
    raise TypeError(type(obj))


# --- strategies -----------------------------------------------------------------------------------

#: hostile constants, one draw each: edge numbers, NaN/inf, long and control-laden strings, bin
#: (valid UTF-8 or not) where a str belongs, invalid UTF-8 inside a str, ext types, containers
_CONSTANTS = [
    None, True, False, 0, 1, -1, 2**31 - 1, 2**31, 2**63 - 1, 2**64 - 1, -(2**63),
    math.nan, math.inf, -math.inf, -0.0, 1e308, -1e-308, 5e-324, 1e12,
    "", "a", "ops", "x" * 257, "x" * 5000, "i" * 70_000, "\x1b[201~", "\x1b]0;pwned\x07", "\x1bP1$q\x1b\\",
    "\x9b201~", "\x00", "\x7f", "\r\n", "a\nb", "\u2028", "é", "😀", f"fleet#{MID}", "-x", "=x:0.0", "../x",
    "$(touch X)", "a;b", "PONG", "SEND", "HELLO", "1",
    b"", b"hi", b"ops", b"a", b"\x1b[201~", b"\xff\xfe",
    RawStr(b"\xff"), RawStr(b"\xfe\xff"), RawStr(b"\xc3"), RawStr(b"\xed\xa0\x80"), RawStr(b"\xf4\x90\x80\x80"),
    RawStr(b"a\x80b"), RawStr(b"\xc0\xaf"), RawStr(b"\xe2\x82"),
    msgpack.ExtType(5, b"x"), msgpack.ExtType(127, b""), msgpack.Timestamp(1, 5), msgpack.Timestamp(2**34 + 1, 0),
    RawExt((-1, b"abc")), RawExt((-1, b"\xff" * 12)), RawExt((-7, b"")), RawExt((-128, b"12345678")),
    [], {}, [1, "a", None], [[[[]]]], {"x": 1}, {b"k": 1}, {"v": 1, "kind": "PONG"}, {"": {"": [math.nan]}},
    [math.inf] * 20, list(range(40)), {f"k{i}": i for i in range(20)},
]
_scalars = st.one_of(
    st.sampled_from(_CONSTANTS),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(),
    st.text(max_size=12),
    st.binary(max_size=12),
)
_values = st.one_of(
    _scalars,
    st.lists(_scalars, max_size=3),
    st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=4)), _scalars, max_size=3),
)


@st.composite
def envelope_maps(draw) -> dict:
    """Mostly a valid envelope's map with some fields replaced or added, some dropped, and now
    and then a hostile or another kind's ``kind`` or a wrong ``v`` (near-valid frames, which get
    as far as field validation); one in eight is any other value."""
    if not draw(_ENVELOPE_OR_VALUE):
        return draw(_values)
    base = dict(draw(st.sampled_from(VALID_DICTS)))
    if base["kind"] in _OVERRIDES:  # the kind's own fields (optional ones too) get hostile values or go missing
        base.update(draw(_OVERRIDES[base["kind"]]))
        for field in draw(_REMOVALS[base["kind"]]):
            base.pop(field, None)
    base.update(draw(_EXTRAS))  # fields of other kinds or unknown ones (ignored)
    tweak = draw(_TWEAKS)  # hypothesis favours early entries: the rare tweaks come last
    if tweak == "kind":
        base["kind"] = draw(_scalars)
    elif tweak == "v":
        base["v"] = draw(_scalars)
    elif tweak == "other-kind":
        base["kind"] = draw(st.sampled_from(KINDS))
    return base


_ENVELOPE_OR_VALUE = st.sampled_from([True] * 7 + [False])  # mostly near-valid maps, some other values
_OVERRIDES = {k: st.dictionaries(st.sampled_from(own), _values, max_size=3) for k, own in OWN_FIELDS.items() if own}
_REMOVALS = {k: st.sets(st.sampled_from(own), max_size=1) for k, own in OWN_FIELDS.items() if own}
_EXTRAS = st.dictionaries(st.sampled_from(FIELDS), _values, max_size=1)
_TWEAKS = st.sampled_from(["keep"] * 16 + ["kind", "v", "other-kind", "other-kind"])


_edits = st.lists(st.tuples(st.integers(0, 4), st.integers(0, 1 << 16), st.binary(min_size=1, max_size=4)),
                  min_size=1, max_size=2)


@st.composite
def mutated_frames(draw) -> bytes:
    """A valid frame with bytes overwritten, inserted, deleted, truncated or appended."""
    frame = bytearray(draw(st.sampled_from(VALID_FRAMES)))
    for op, pos, data in draw(_edits):
        i = pos % (len(frame) + 1)
        if op == 0:
            frame[i:i + len(data)] = data
        elif op == 1:
            frame[i:i] = data
        elif op == 2:
            del frame[i:i + len(data)]
        elif op == 3:
            del frame[i:]
        else:
            frame += data
    return bytes(frame)


# --- the property ---------------------------------------------------------------------------------


def _ident_ok(s: object) -> bool:
    return isinstance(s, str) and len(s) <= P.MAX_ID_CHARS and not CONTROL.search(s)


_REASONS = [("frame of", "too large"), ("not msgpack", "not msgpack"), ("a str in the frame", "invalid UTF-8"),
            ("expected a map", "not a map"), ("unsupported protocol", "version"), ("unknown kind", "kind"),
            ("invalid ", "field")]


def _event(label: str) -> None:
    if currently_in_test_context():  # hypothesis statistics (--hypothesis-show-statistics)
        event(label)


def check_decode(frame: bytes) -> None:
    """decode() returns a valid envelope or raises ProtocolError, never anything else."""
    try:
        msg = decode(frame)
    except ProtocolError as e:
        text = str(e)
        _event("refused: " + next((label for prefix, label in _REASONS if text.startswith(prefix)), text[:20]))
        assert text and len(text) < 500, "errors are short enough to log"
        assert not CONTROL.search(text), f"raw control character in an error message: {text!r}"
        if e.req is not None:
            assert _ident_ok(e.req) and e.kind in P._BY_KIND
        return
    assert isinstance(msg, P._Env) and msg.kind in P._BY_KIND and msg.v == P.PROTOCOL_VERSION
    _event("decoded")
    for name, value in msg:
        if name in ANY_FIELDS or name in ("v", "kind"):
            continue
        if isinstance(value, float):
            assert math.isfinite(value), (name, value)
            if name.endswith("_s"):
                assert 0 <= value <= P.MAX_WAIT_S, (name, value)
        elif isinstance(value, bool) or value is None:
            pass
        elif isinstance(value, int):
            assert 0 <= value <= 2**31 - 1 if "pid" in name else value >= 1, (name, value)
        elif isinstance(value, str):
            if name not in FREE_TEXT:
                assert _ident_ok(value), (name, value[:80])
        elif isinstance(value, list):
            assert all(_ident_ok(x) for x in value), (name, value[:5])
        elif isinstance(value, dict):
            assert all(isinstance(k, str) for k in value), name
        else:
            raise AssertionError(f"{name}: unexpected {type(value).__name__}")
    again = encode(msg)
    assert encode(decode(again)) == again, "a decoded envelope re-encodes to a frame that decodes to itself"


@FUZZ
@given(st.binary(max_size=512))
def test_decode_arbitrary_bytes(frame):
    check_decode(frame)


@settings(FUZZ, max_examples=FUZZ_EXAMPLES // 4)
@given(mutated_frames())
def test_decode_mutated_valid_frames(frame):
    check_decode(frame)


@FUZZ
@given(envelope_maps())
def test_decode_structured_hostile_maps(obj):
    check_decode(pack(obj))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_values.filter(lambda v: not _has_raw(v)))
def test_fuzz_encoder_matches_msgpack(obj):
    """The fuzzing encoder writes the same bytes as msgpack-python wherever both can encode."""
    assert pack(obj) == msgpack.packb(obj, use_bin_type=True)


def test_fuzz_encoder_large_containers_match_msgpack():
    for obj in ({f"k{i}": i for i in range(20)}, list(range(40)), "s" * 70_000, b"b" * 70_000, VALID_DICTS[8]):
        assert pack(obj) == msgpack.packb(obj, use_bin_type=True)


def _has_raw(v) -> bool:
    if isinstance(v, (RawStr, RawExt)):
        return True
    if isinstance(v, list):
        return any(_has_raw(x) for x in v)
    if isinstance(v, dict):
        return any(_has_raw(k) or _has_raw(x) for k, x in v.items())
    return False


# --- specific findings, pinned --------------------------------------------------------------------


def frame_of(**fields) -> bytes:
    return pack({"v": 1, "kind": "SEND", "req": "r1", "to": "a", "body": "hi", **fields})


@pytest.mark.parametrize(("fields", "needle"), [
    ({"body": b"hello"}, "body: Input should be a valid string (got msgpack bin)"),  # lax mode took bin for str
    ({"body": RawStr(b"ok \xff\xfe")}, "not valid UTF-8"),
    ({"to": RawStr(b"\xed\xa0\x80")}, "not valid UTF-8"),  # an encoded surrogate is not UTF-8
    ({"timeout_s": math.nan}, "timeout_s: Input should be a finite number"),
    ({"timeout_s": math.inf}, "timeout_s: Input should be a finite number"),
    ({"timeout_s": -1.0}, "timeout_s: Input should be greater than or equal to 0"),
    ({"timeout_s": 1e12}, "timeout_s: Input should be less than or equal to"),
    ({"timeout_s": "5"}, "timeout_s"),  # lax mode turned "5" into 5.0
    ({"ttl_s": -5}, "ttl_s"),
    ({"verify": 1}, "verify: Input should be a valid boolean (got msgpack int)"),  # lax mode took 1 for True
    ({"verify": "yes"}, "verify"),
    ({"to": "x" * (P.MAX_ID_CHARS + 1)}, "to: String should have at most 256 characters"),
    ({"sender": "ops\x1b[201~\nrm -rf ~"}, "sender"),  # the sender is typed into the message tag
    ({"sender": "a\nb"}, "sender"),
    ({"idempotency_key": "k" * 10_000}, "idempotency_key"),
])
def test_decode_refuses_with_a_clear_reason_and_names_the_request(fields, needle):
    with pytest.raises(ProtocolError) as ei:
        decode(frame_of(**fields))
    assert needle in str(ei.value)
    if "UTF-8" not in needle:  # a frame that is not even msgpack names no request
        assert (ei.value.kind, ei.value.req) == ("SEND", "r1")


@pytest.mark.parametrize(("obj", "needle"), [
    ({"v": 1, "kind": "HELLO", "slot": "a", "tenant": "t", "host": "h", "pid": 2**63, "adapter": "x",
      "heartbeat_ms": 100}, "pid"),
    ({"v": 1, "kind": "HELLO", "slot": "a", "tenant": "t", "host": "h", "pid": 1, "adapter": "x",
      "heartbeat_ms": -5}, "heartbeat_ms"),
    ({"v": 1, "kind": "HELLO", "slot": "a", "tenant": "t", "host": "h", "pid": "12", "adapter": "x",
      "heartbeat_ms": 100}, "pid"),
    ({"v": 1, "kind": "ACK", "id": MID, "at": math.nan}, "at"),
    ({"v": 1, "kind": "PING", "runtime_pid": -1}, "runtime_pid"),
    ({"v": 1, "kind": "WELCOME", "heartbeat_ms": 0, "liveness": 3}, "heartbeat_ms"),
    ({"v": 1, "kind": "START", "req": "r", "slot": "a", "timeout_s": math.inf}, "timeout_s"),
    ({"v": 1, "kind": "HOOK", "event": "turn-end", "markers": ["x" * 300]}, "markers"),
])
def test_decode_refuses_other_hostile_fields(obj, needle):
    with pytest.raises(ProtocolError, match=needle):
        decode(pack(obj))


def test_error_messages_cut_hostile_values():
    with pytest.raises(ProtocolError) as ei:
        decode(pack({"v": 1, "kind": "K" * 1_000_000}))
    assert len(str(ei.value)) < 200
    with pytest.raises(ProtocolError) as ei:
        decode(pack({"v": ["\x1b[2J"] * 100_000, "kind": "PONG"}))
    assert len(str(ei.value)) < 200 and "\x1b" not in str(ei.value)


def test_models_refuse_the_same_values_when_built_in_python():
    """A client cannot build (so never sends) what the router would refuse."""
    for bad in ({"timeout_s": -1}, {"timeout_s": math.nan}, {"sender": "x\x1by"}, {"to": "y" * 300},
                {"body": "caf\udce9"}, {"ttl_s": math.inf}):
        with pytest.raises(ValidationError):
            P.SendRequest(**{"req": "r", "to": "a", "body": "b", **bad})


def test_deeply_nested_frame_is_refused_not_a_crash():
    frame = b"\x91" * 100_000 + b"\xc0"  # 100k nested one-element arrays
    with pytest.raises(ProtocolError):
        decode(frame)
    frame = b"\x82\xa1v\x01\xa4kind" + b"\x81\xa1x" * 50_000 + b"\xc0"  # {"v": 1, "kind": {"x": {"x": ...}}}
    check_decode(frame)


# --- check_body -----------------------------------------------------------------------------------


def reference_check(body: str, max_bytes: int) -> str | None:
    """The body rules written out character by character (the oracle); None: refused."""
    body = body.replace("\r\n", "\n")
    if not body.strip():
        return None
    if len(body.encode("utf-8", "surrogatepass")) > max_bytes:
        return None
    for ch in body:
        o = ord(ch)
        if (o < 0x20 and ch not in "\n\t") or 0x7F <= o <= 0x9F or 0xD800 <= o <= 0xDFFF:
            return None
    return body


#: fragments a body is built from: hostile sequences (7-bit and 8-bit forms), the allowed
#: controls, whitespace-only pieces, and ordinary text in several scripts
_FRAGMENTS = [
    "\n", "\t", "\r", "\r\n", " ", "  ", "\x1b", "\x1b[201~", "\x1b[200~", "\x1b]52;c;cHduZWQ=\x07", "\x1bP+q\x1b\\",
    "\x1b_apc\x1b\\", "\x1b[2J", "\x9b201~", "\x9d0;t\x9c", "\x90q\x9c", "\x85", "\x80", "\x9f", "\x00", "\x07",
    "\x08", "\x7f", "\x0b", "\x0c", "\x1c", "\x1f", "\udcff", "\udc80", "\ud800", "\udfff", "\u00a0", "\u2028",
    "\ufeff", "\uffff", "é", "😀", "日本", "hello", "echo hi", "rm -rf /", "$(touch X)", "é" * 31, "é" * 33, "x" * 63,
    "x" * 64, "x" * 65, "a" * 200,
]
_bodies = st.one_of(
    st.text(st.characters(codec=None, exclude_categories=()), max_size=16),  # any code point, surrogates too
    st.lists(st.sampled_from(_FRAGMENTS), max_size=10).map("".join),
    st.lists(st.one_of(st.sampled_from(_FRAGMENTS), st.text(max_size=5)), max_size=6).map("".join),
)


@settings(FUZZ, max_examples=FUZZ_EXAMPLES // 2)
@given(_bodies,
       st.one_of(st.integers(min_value=1, max_value=400), st.sampled_from([65_536, 1_048_576])))
def test_check_body_arbitrary_text(body, max_bytes):
    expected = reference_check(body, max_bytes)
    try:
        out = check_body(body, max_bytes)
    except InvalidBody as e:
        assert expected is None, f"refused a valid body: {e}"
        assert str(e) and not CONTROL.search(str(e)) and len(str(e)) < 300
        return
    assert expected is not None, f"accepted a forbidden body {body[:80]!r}"
    assert out == expected
    assert not CONTROL.search(out.replace("\n", "").replace("\t", "")), repr(out[:80])
    assert not re.search(r"[\ud800-\udfff]", out)
    assert "\x1b" not in out and "\r" not in out
    assert len(out.encode("utf-8")) <= max_bytes
    assert out.strip()


@pytest.mark.parametrize(("body", "needle"), [
    ("a\udcffb", "not valid UTF-8: lone surrogate U+DCFF at offset 1 (undecodable byte 0xFF)"),
    ("x\x1b[201~y", "ESC character U+001B at offset 1"),
    ("\x9d0;t\x9c", "OSC character U+009D at offset 0"),
    ("ok\x90q", "DCS character U+0090 at offset 2"),
    ("a\x86", "C1 control character U+0086"),
    ("é" * 40, "body is 80 bytes; the limit is 64 bytes (bus.max_body_bytes)"),
])
def test_check_body_reasons(body, needle):
    with pytest.raises(InvalidBody) as ei:
        check_body(body, 64)
    assert needle in str(ei.value)


def test_check_body_at_the_largest_limit():
    """A 1 MiB body (the largest bus.max_body_bytes) is checked whole: the one bad character
    at its very end is found and named."""
    body = "x" * (1_048_576 - 1) + "\x1b"
    with pytest.raises(InvalidBody, match="offset 1048575"):
        check_body(body, 1_048_576)
    assert check_body(body[:-1] + "y", 1_048_576) == body[:-1] + "y"
