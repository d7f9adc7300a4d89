"""Wire protocol v1: envelope models, the msgpack codec, and message-body rules.

Every frame body is one msgpack map with ``v`` (protocol version) and ``kind``. On the router's
ROUTER socket a frame is ``[routing-id][msgpack map]``; sidecars and clients speak through DEALER
sockets. :func:`decode` validates into the :data:`Envelope` discriminated union and raises
:class:`ProtocolError` for anything else, so a malformed frame is dropped and counted, never
crashes a reader.

Sidecar → router: ``HELLO``, ``PING``, ``ACK``, ``BYE``, and ``HOOK`` (hook events forwarded).
Router → sidecar: ``WELCOME``, ``PONG``, ``EXPECT``, ``DISCONNECT``.
Client → router: ``SEND``, ``PS``, ``START``, ``STOP``, ``RESTART``, ``RESET``, ``INTERRUPT``, ``HEALTH``,
``SHUTDOWN``; the router answers each with a ``RESULT`` carrying the same ``req``.
Runtime hook → sidecar (local Unix datagram socket; extensions use JSON lines on a stream socket): ``HOOK``.
Router PUB socket: ``EVENT`` frames ``[topic][msgpack map]``.

This module depends on nothing else in fleetbus.
"""

import time
from typing import Annotated, Any, Literal, Union, get_args

import msgpack
from pydantic import BaseModel, ConfigDict, Field, ValidationError

PROTOCOL_VERSION = 1
#: Default seconds a ``SEND`` with ``wait="accepted"`` waits for a queued message to be taken.
QUEUE_TIMEOUT_S = 600.0
#: Largest frame :func:`decode` accepts (bytes); a 64 KiB body plus envelope fits easily.
MAX_FRAME_BYTES = 4 * 1024 * 1024

SlotState = Literal["starting", "idle", "busy", "unknown", "dead"]
Evidence = Literal["runtime-ack", "pane-diff"]
Outcome = Literal["accepted", "queued", "injected", "draft", "unconfirmed", "rejected"]
HookEventName = Literal["prompt-submit", "prompt-queued", "turn-start", "turn-end", "session-start"]


class ProtocolError(ValueError):
    """A frame that is not a valid protocol v1 envelope."""


class _Env(BaseModel):
    # schemas are built on first use, so a short-lived CLI builds only the models it touches
    model_config = ConfigDict(extra="ignore", frozen=True, defer_build=True)
    v: int = PROTOCOL_VERSION


# --- sidecar -> router -------------------------------------------------------------------------


class Hello(_Env):
    """First frame of a sidecar (and after every reconnect). ``heartbeat_ms`` in ms."""

    kind: Literal["HELLO"] = "HELLO"
    slot: str
    tenant: str
    host: str
    pid: int
    adapter: str
    caps: list[str] = Field(default_factory=list)
    heartbeat_ms: int


class Ping(_Env):
    """Sidecar heartbeat carrying the runtime's state as reported by its hooks."""

    kind: Literal["PING"] = "PING"
    state: SlotState = "unknown"
    runtime_pid: int | None = None
    pane_alive: bool | None = None
    task: str | None = None
    session_id: str | None = None


class Ack(_Env):
    """The runtime took message ``id`` (``stage="accepted"``), or its TUI holds it in its own
    queue while a turn runs (``stage="queued"``). ``at`` is a Unix time in seconds; ``session_id``
    is the runtime's session that took it."""

    kind: Literal["ACK"] = "ACK"
    id: str
    stage: Literal["queued", "accepted"] = "accepted"
    evidence: Evidence = "runtime-ack"
    at: float = Field(default_factory=time.time)
    session_id: str | None = None


class Bye(_Env):
    kind: Literal["BYE"] = "BYE"


# --- router -> sidecar -------------------------------------------------------------------------


class Welcome(_Env):
    """Router's answer to HELLO: the agreed heartbeat interval (ms) and liveness (intervals)."""

    kind: Literal["WELCOME"] = "WELCOME"
    heartbeat_ms: int
    liveness: int


class Pong(_Env):
    kind: Literal["PONG"] = "PONG"


class Expect(_Env):
    """Router tells a sidecar that message ``id`` (marker ``marker``) is about to be typed."""

    kind: Literal["EXPECT"] = "EXPECT"
    id: str
    marker: str


class Disconnect(_Env):
    """Sent to a peer the router does not know: it must send HELLO again."""

    kind: Literal["DISCONNECT"] = "DISCONNECT"
    reason: str = ""


# --- client <-> router -------------------------------------------------------------------------


class SendRequest(_Env):
    """Deliver ``body`` to slot ``to``. ``timeout_s`` (s) bounds verification.

    ``wait``: with ``queued`` (default) a message the runtime's TUI holds in its queue answers
    ``queued`` at once; with ``accepted`` the router keeps waiting for the runtime's ack (up to
    ``timeout_s``, default :data:`QUEUE_TIMEOUT_S`).
    """

    kind: Literal["SEND"] = "SEND"
    req: str
    to: str
    body: str
    sender: str = "ops"
    verify: bool = True
    timeout_s: float | None = None
    on_busy_input: Literal["fail", "clear"] = "fail"
    wait: Literal["queued", "accepted"] = "queued"


class PsRequest(_Env):
    kind: Literal["PS"] = "PS"
    req: str


class SlotRequest(_Env):
    """An operator verb on one slot."""

    kind: Literal["START", "STOP", "RESTART", "RESET", "INTERRUPT"]
    req: str
    slot: str
    timeout_s: float | None = None


class HealthRequest(_Env):
    kind: Literal["HEALTH"] = "HEALTH"
    req: str


class ShutdownRequest(_Env):
    """Stop the router; with ``teardown`` also stop sidecars and the fleet's tmux server."""

    kind: Literal["SHUTDOWN"] = "SHUTDOWN"
    req: str
    teardown: bool = False


class Result(_Env):
    """Answer to a client request. ``code`` is a stable error code when ``ok`` is False."""

    kind: Literal["RESULT"] = "RESULT"
    req: str
    ok: bool
    code: str | None = None
    error: str | None = None
    data: Any = None


# --- typed results (identical to what ``--json`` prints) ----------------------------------------


class SendResult(BaseModel):
    """Outcome of one SEND.

    Attributes:
        id: message id (12 hex chars; the marker is ``fleet#<id>``).
        result: ``accepted`` (evidence says the runtime took it), ``queued`` (submitted while the
            runtime was busy: its TUI holds the message and will take it when the turn ends;
            evidence ``runtime-ack`` when its extension said so, ``pane-diff`` when the TUI's
            queue indicator showed it), ``injected`` (typed and
            submitted, not verified: ``--verify`` was off), ``draft`` (text sits unsubmitted in
            the input line), ``unconfirmed`` (no evidence either way before the timeout),
            ``rejected`` (nothing was typed; ``code`` says why).
        evidence: ``runtime-ack`` or ``pane-diff`` when accepted.
        code: stable reason code when rejected: ``unknown-slot``, ``slot-down``, ``slot-dead``,
            ``invalid-body``, ``busy-input``, ``no-prompt``.
        latency_ms: ms from the router receiving the SEND to the result.
        submit_retries: extra submit keys sent after a detected draft (never re-typed text).
        session_id: the runtime session that acknowledged it (from the hook payload).
        queued_ms: ms from the router receiving the SEND to the moment it was seen queued.
    """

    tenant_id: str
    host: str
    slot: str
    id: str | None = None
    result: Outcome
    evidence: Evidence | None = None
    code: str | None = None
    detail: str = ""
    latency_ms: float = 0.0
    submit_retries: int = 0
    session_id: str | None = None
    queued_ms: float | None = None


class SlotStatus(BaseModel):
    """One row of ``fleet ps``.

    Attributes:
        pane: ``alive``, ``dead`` (program exited) or ``absent``.
        exit_status: exit status of a dead pane; None when a signal killed it (tmux 3.3a reports
            neither status nor signal then: ``pane_dead_status`` and ``pane_dead_signal`` are empty).
        idle_s: seconds since the slot's window last printed (tmux ``window_activity``).
        heartbeat: ``healthy``, ``stale`` or ``none`` (never heard from a sidecar).
        heartbeat_age_s: seconds since the sidecar was last heard from.
        state: runtime state reported through hooks (``idle``, ``busy``, ``unknown``...).
        process: the runtime process (psutil): ``name``, ``rss_mb``, ``children``.
        flags: ``DEAD``, ``STALE``, ``DRIFT``, ``NO-SIDECAR``.
        source: where heartbeats came from: ``router`` or ``files`` (router down).
    """

    model_config = ConfigDict(populate_by_name=True)

    tenant_id: str
    host: str
    slot: str
    runtime: str
    class_: str | None = Field(None, alias="class")
    pane: Literal["alive", "dead", "absent"]
    pid: int | None = None
    command: str | None = None
    exit_status: int | None = None
    idle_s: float | None = None
    process: dict[str, Any] | None = None
    heartbeat: Literal["healthy", "stale", "none"] = "none"
    heartbeat_age_s: float | None = None
    state: str = "unknown"
    sidecar_pid: int | None = None
    flags: list[str] = Field(default_factory=list)
    source: Literal["router", "files"] = "router"


# --- runtime hook -> sidecar -------------------------------------------------------------------


class HookEvent(_Env):
    """A runtime hook event forwarded to the slot's sidecar.

    ``event`` is one of ``prompt-submit`` (the runtime took a prompt into a turn; ``markers``
    holds the fleet message ids found in it), ``prompt-queued`` (the TUI took the prompt into its
    own queue while a turn runs), ``turn-start``, ``turn-end`` and ``session-start``. ``source``
    is the runtime's reason (``startup``, ``clear``, ``new``, ``interrupt``...). ``prompt_head``
    is at most 200 characters of the prompt, for logs. Sidecars forward every event to the router.
    """

    kind: Literal["HOOK"] = "HOOK"
    event: HookEventName
    source: str = ""
    slot: str = ""
    runtime: str = ""
    session_id: str | None = None
    markers: list[str] = Field(default_factory=list)
    prompt_head: str = ""
    at: float = Field(default_factory=time.time)


class Event(_Env):
    """One event on the router's PUB socket; the topic frame is ``topic``."""

    kind: Literal["EVENT"] = "EVENT"
    topic: str
    slot: str | None = None
    tenant_id: str
    host: str
    at: float = Field(default_factory=time.time)
    data: dict[str, Any] = Field(default_factory=dict)


ENVELOPES: tuple[type[_Env], ...] = (
    Hello, Ping, Ack, Bye, Welcome, Pong, Expect, Disconnect,
    SendRequest, PsRequest, SlotRequest, HealthRequest, ShutdownRequest, Result,
    HookEvent, Event,
)
Envelope = Annotated[Union[ENVELOPES], Field(discriminator="kind")]  # noqa: UP007 (a tuple of types)
#: kind -> model: the discriminated union, dispatched by hand so models build lazily
_BY_KIND: dict[str, type[_Env]] = {k: m for m in ENVELOPES for k in get_args(m.model_fields["kind"].annotation)}


def encode(msg: BaseModel) -> bytes:
    """Encode an envelope model as one msgpack map."""
    return msgpack.packb(msg.model_dump(mode="python", exclude_none=True), use_bin_type=True)


def decode(frame: bytes) -> Any:
    """Decode one frame into an envelope model.

    Raises:
        ProtocolError: not msgpack, not a map, too large, wrong version, or unknown/invalid kind.
    """
    if len(frame) > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {len(frame)} bytes exceeds {MAX_FRAME_BYTES}")
    try:
        data = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types on hostile input
        raise ProtocolError(f"not msgpack: {type(e).__name__}") from None
    if not isinstance(data, dict):
        raise ProtocolError(f"expected a map, got {type(data).__name__}")
    if type(data.get("v")) is not int or data["v"] != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {data.get('v')!r}")
    kind = data.get("kind")
    model = _BY_KIND.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise ProtocolError(f"unknown kind {data.get('kind')!r}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        raise ProtocolError(f"invalid {data.get('kind')!r} frame: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None


# --- message bodies ----------------------------------------------------------------------------


class InvalidBody(ValueError):
    """A message body that must not reach a terminal (control characters, too large, empty)."""


_CONTROL_NAMES = {0x1B: "ESC", 0x0D: "CR", 0x07: "BEL", 0x08: "BS", 0x7F: "DEL", 0x9B: "CSI", 0x00: "NUL"}


def check_body(body: str, max_bytes: int) -> str:
    """Validate a message body and return it with CRLF line ends turned into LF.

    Allowed: printable text, newline and tab. Refused: every other C0 control (so every escape
    sequence, including the bracketed-paste end marker ``ESC[201~``, OSC and DCS strings), DEL,
    C1 controls (U+0080–U+009F), lone surrogates, an empty body, and bodies over ``max_bytes``
    UTF-8 bytes. tmux 3.3 passes pasted escape sequences through unchanged, so this check is
    what keeps a body from becoming keystrokes.

    Raises:
        InvalidBody: with the offending character and its offset.
    """
    body = body.replace("\r\n", "\n")
    if not body.strip():
        raise InvalidBody("empty message body")
    for i, ch in enumerate(body):
        o = ord(ch)
        if (o < 0x20 and ch not in "\n\t") or 0x7F <= o <= 0x9F or 0xD800 <= o <= 0xDFFF:
            name = _CONTROL_NAMES.get(o, "control")
            raise InvalidBody(
                f"body contains {name} character U+{o:04X} at offset {i}; control characters and "
                "escape sequences are refused (only newline and tab are allowed)"
            )
    size = len(body.encode("utf-8"))
    if size > max_bytes:
        raise InvalidBody(f"body is {size} bytes; the limit is {max_bytes} bytes (bus.max_body_bytes)")
    return body
