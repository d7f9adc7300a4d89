"""Wire protocol v1: envelope models, the msgpack codec, and message-body rules.

Every frame body is one msgpack map with ``v`` (protocol version) and ``kind``. On the router's
ROUTER socket a frame is ``[routing-id][msgpack map]``; sidecars and clients speak through DEALER
sockets. :func:`decode` validates into the :data:`Envelope` discriminated union and raises
:class:`ProtocolError` for anything else, so a malformed frame is dropped and counted, never
crashes a reader.

Sidecar → router: ``HELLO``, ``PING``, ``ACK``, ``BYE``, and ``HOOK`` (hook events forwarded).
Router → sidecar: ``WELCOME``, ``PONG``, ``EXPECT``, ``DISCONNECT``.
Client → router: ``SEND``, ``PUBLISH`` (a task), ``TASK`` (a task's state), ``PS``, ``START``, ``STOP``,
``RESTART``, ``RESET``, ``INTERRUPT``, ``HEALTH``, ``SHUTDOWN``; the router answers each with a
``RESULT`` carrying the same ``req``.
Runtime hook → sidecar (local Unix datagram socket; extensions use JSON lines on a stream socket): ``HOOK``.
Router PUB socket: ``EVENT`` frames ``[topic][msgpack map]``.

This module depends on nothing else in fleetbus.
"""

import re
import reprlib
import time
from typing import Annotated, Any, Literal, Union, get_args

import msgpack
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationError

PROTOCOL_VERSION = 1
#: Default seconds a ``SEND`` with ``wait="accepted"`` waits for a queued message to be taken.
QUEUE_TIMEOUT_S = 600.0
#: Largest frame :func:`decode` accepts (bytes); a 64 KiB body plus envelope fits easily.
MAX_FRAME_BYTES = 4 * 1024 * 1024
#: Longest identifier on the wire (slot, tenant, host, request and message ids, session ids,
#: codes, topics; characters). Free text (bodies, reasons, errors) is bounded by the frame size.
MAX_ID_CHARS = 256
#: Longest timeout or TTL a request may ask for (s): 30 days.
MAX_WAIT_S = 30 * 86400.0

#: An identifier: at most MAX_ID_CHARS characters and no control character (C0, DEL, C1), so it
#: can never carry an escape sequence into a log line, a message tag or a pane.
Ident = Annotated[str, StringConstraints(max_length=MAX_ID_CHARS, pattern=r"^[^\x00-\x1f\x7f-\x9f]*$")]
#: What a sender name (``--from``) may hold: it is typed into every message tag
#: (``[fleet#<id> <sender> -> <slot>]``), so it may not carry brackets, blanks, ``->`` or a
#: marker (``fleet#...``): letters, digits and ``. _ @ : + / = -``, 1 to 64 characters.
SENDER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:+/=-]{0,63}")


def _sender(value: str) -> str:
    if not SENDER_RE.fullmatch(value):
        raise ValueError(f"sender {value[:70]!r} is not a sender name: 1 to 64 letters, digits or . _ @ : + / = - "
                         "(starting with a letter or digit); it is typed into the message tag")
    return value


#: A sender name (:data:`SENDER_RE`).
Sender = Annotated[str, AfterValidator(_sender)]
#: A duration in seconds: finite (every envelope refuses NaN and infinities), 0 <= s <= MAX_WAIT_S.
Seconds = Annotated[float, Field(ge=0, le=MAX_WAIT_S)]
#: A process id (Linux pids are below 2**22; anything above 2**31 - 1 is refused).
Pid = Annotated[int, Field(ge=0, le=2**31 - 1)]


def _utf8(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"not valid UTF-8: lone surrogate U+{ord(value[e.start]):04X} at offset {e.start}") from None
    return value


#: Text that can go on the wire: a Python str with a lone surrogate (undecodable bytes read with
#: ``surrogateescape``) is refused when the model is built, not by msgpack when it is sent.
Utf8Text = Annotated[str, AfterValidator(_utf8)]

SlotState = Literal["starting", "idle", "busy", "unknown", "dead"]
Evidence = Literal["runtime-ack", "pane-diff"]
Outcome = Literal["accepted", "queued", "injected", "draft", "unconfirmed", "rejected", "dead-letter"]
#: A task's lifecycle: ``published`` (journaled, waiting for a matching free slot) → ``assigned``
#: (a slot holds it; its message is being delivered) → ``accepted`` (the runtime took it) → one
#: of the final ``done`` (the runtime's turn-complete signal), ``failed`` (``code`` says why) and
#: ``timed-out`` (no free slot within ``wait_s``, or no turn-complete within ``timeout_s``).
TaskState = Literal["published", "assigned", "accepted", "done", "failed", "timed-out"]
TASK_FINAL = ("done", "failed", "timed-out")
#: Order of the task states, for "has it reached stage X?"
TASK_STAGES = {"published": 0, "assigned": 1, "accepted": 2, "done": 3, "failed": 3, "timed-out": 3}
HookEventName = Literal["prompt-submit", "prompt-queued", "turn-start", "turn-end", "session-start"]


class ProtocolError(ValueError):
    """A frame that is not a valid protocol v1 envelope.

    ``kind`` and ``req`` are set when the frame was a v1 map with a known ``kind`` and a usable
    string ``req`` (a client request that failed validation), so a router can answer the sender
    with an error instead of leaving it to time out; both are None otherwise.
    """

    def __init__(self, message: str, *, kind: str | None = None, req: str | None = None):
        super().__init__(message)
        self.kind = kind
        self.req = req


class _Env(BaseModel):
    # schemas are built on first use, so a short-lived CLI builds only the models it touches;
    # no float field of any envelope takes NaN or an infinity
    model_config = ConfigDict(extra="ignore", frozen=True, defer_build=True, allow_inf_nan=False)
    v: int = PROTOCOL_VERSION


# --- sidecar -> router -------------------------------------------------------------------------


class Hello(_Env):
    """First frame of a sidecar (and after every reconnect). ``heartbeat_ms`` in ms."""

    kind: Literal["HELLO"] = "HELLO"
    slot: Ident
    tenant: Ident
    host: Ident
    pid: Pid
    adapter: Ident
    caps: list[Ident] = Field(default_factory=list)
    heartbeat_ms: int = Field(ge=1, le=3_600_000)


class Ping(_Env):
    """Sidecar heartbeat carrying the runtime's state as reported by its hooks; ``state_at`` is
    the Unix time (s, the sidecar's clock, as :attr:`Ack.at`) of the hook event that set it
    (None before the first), so the router can tell a turn that ended after an ack."""

    kind: Literal["PING"] = "PING"
    state: SlotState = "unknown"
    state_at: float | None = None
    runtime_pid: Pid | None = None
    pane_alive: bool | None = None
    task: Ident | None = None
    session_id: Ident | None = None


class Ack(_Env):
    """The runtime took message ``id`` (``stage="accepted"``), or its TUI holds it in its own
    queue while a turn runs (``stage="queued"``). ``at`` is a Unix time in seconds; ``session_id``
    is the runtime's session that took it."""

    kind: Literal["ACK"] = "ACK"
    id: Ident
    stage: Literal["queued", "accepted"] = "accepted"
    evidence: Evidence = "runtime-ack"
    at: float = Field(default_factory=time.time)
    session_id: Ident | None = None


class Bye(_Env):
    kind: Literal["BYE"] = "BYE"


# --- router -> sidecar -------------------------------------------------------------------------


class Welcome(_Env):
    """Router's answer to HELLO: the agreed heartbeat interval (ms) and liveness (intervals)."""

    kind: Literal["WELCOME"] = "WELCOME"
    heartbeat_ms: int = Field(ge=1, le=3_600_000)
    liveness: int = Field(ge=1, le=1000)


class Pong(_Env):
    kind: Literal["PONG"] = "PONG"


class Expect(_Env):
    """Router tells a sidecar that message ``id`` (marker ``marker``) is about to be typed."""

    kind: Literal["EXPECT"] = "EXPECT"
    id: Ident
    marker: Ident


class Disconnect(_Env):
    """Sent to a peer the router does not know: it must send HELLO again."""

    kind: Literal["DISCONNECT"] = "DISCONNECT"
    reason: str = ""


# --- client <-> router -------------------------------------------------------------------------


class SendRequest(_Env):
    """Deliver ``body`` to slot ``to``. ``timeout_s`` (s) bounds verification, counted from the
    moment the router starts typing (a message may first wait its turn in the slot's queue).

    ``wait``: with ``queued`` (default) a message the runtime's TUI holds in its queue answers
    ``queued`` at once; with ``accepted`` the router keeps waiting for the runtime's ack (up to
    ``timeout_s``, default :data:`QUEUE_TIMEOUT_S`).

    ``idempotency_key``: a SEND whose key the journal already holds never types again; the
    answer is that message's result (``duplicate`` true). Clients set one on every SEND so
    they can resend safely after a router restart.

    ``when``: ``now`` rejects a slot that is down, dead, not at its prompt or holding someone's
    input; ``available`` keeps the message in the router's journal until the slot can take it,
    for at most ``ttl_s`` s (default: roster ``bus.message_ttl_s``), then ``dead-letter``; the
    answer is ``queued`` (held by fleetbus) at once, unless ``wait="accepted"``, which waits on.

    ``detach``: answer ``queued`` (held by fleetbus) as soon as the message is journaled;
    delivery and verification go on in the router (follow them with ``fleet log``/events).
    """

    kind: Literal["SEND"] = "SEND"
    req: Ident
    to: Ident
    body: Utf8Text
    sender: Sender = "ops"  # typed into the pane's message tag (SENDER_RE)
    verify: bool = True
    timeout_s: Seconds | None = None
    on_busy_input: Literal["fail", "clear"] = "fail"
    wait: Literal["queued", "accepted"] = "queued"
    idempotency_key: str | None = Field(None, min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$")
    when: Literal["now", "available"] = "now"
    ttl_s: Seconds | None = None
    detach: bool = False


class PublishRequest(_Env):
    """Create a task for the slot(s) ``to`` selects (see :func:`fleetbus.router.tasks.parse_selector`):
    a slot name, ``class:<class>``, ``idle``, ``idle:<class>`` or ``all:<class>`` (one task per
    slot of the class).

    ``wait``: answer once the task reaches this stage (``published`` answers as soon as it is
    journaled) or ends. ``wait_s`` (s): how long the task may wait for a matching free slot
    (default roster ``bus.task_wait_s``; 0: give up at once, ``timed-out``, when none is free). ``timeout_s`` (s):
    how long an assigned task may take to reach ``done`` (default ``bus.task_timeout_s``).
    ``allow_busy``: a slot that holds another task or whose runtime is busy may get this one (its
    TUI queues it). ``kickstart``: a template for this task (:func:`fleetbus.config.check_kickstart`)
    instead of the slot's roster ``kickstart``. ``idempotency_key``: as for SEND; a known key
    answers with that task's state and creates nothing.
    """

    kind: Literal["PUBLISH"] = "PUBLISH"
    req: Ident
    to: Ident
    body: Utf8Text
    sender: Sender = "ops"
    wait: Literal["published", "assigned", "accepted", "done"] = "published"
    wait_s: Seconds | None = None
    timeout_s: Seconds | None = None
    allow_busy: bool = False
    kickstart: Utf8Text | None = None
    idempotency_key: str | None = Field(None, min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$")


class TaskRequest(_Env):
    """The state of task ``id`` (or of every task of a broadcast ``group``), answered when it
    reaches ``wait`` (or ends) or after ``timeout_s`` s with its state then; ``wait`` None
    answers at once."""

    kind: Literal["TASK"] = "TASK"
    req: Ident
    id: Ident
    wait: Literal["assigned", "accepted", "done"] | None = None
    timeout_s: Seconds | None = None


class PsRequest(_Env):
    kind: Literal["PS"] = "PS"
    req: Ident


class SlotRequest(_Env):
    """An operator verb on one slot."""

    kind: Literal["START", "STOP", "RESTART", "RESET", "INTERRUPT"]
    req: Ident
    slot: Ident
    timeout_s: Seconds | None = None


class KeysRequest(_Env):
    """Read the tcp allow-list again now and drop the live connections of client keys that may no
    longer serve their slot (sent by ``fleet keys revoke``). Answer: ``{"dropped": [{"slot",
    "key"}], "keys": int}``."""

    kind: Literal["KEYS"] = "KEYS"
    req: Ident


class HealthRequest(_Env):
    """Router health. With ``probe`` the router also publishes an event with topic ``probe`` and
    ``data.probe`` = this token, so a subscriber knows its subscription is live."""

    kind: Literal["HEALTH"] = "HEALTH"
    req: Ident
    probe: Ident | None = None


class ShutdownRequest(_Env):
    """Stop the router; with ``teardown`` also stop sidecars and the fleet's tmux server."""

    kind: Literal["SHUTDOWN"] = "SHUTDOWN"
    req: Ident
    teardown: bool = False


class Result(_Env):
    """Answer to a client request. ``code`` is a stable error code when ``ok`` is False."""

    kind: Literal["RESULT"] = "RESULT"
    req: Ident
    ok: bool
    code: Ident | None = None
    error: str | None = None
    data: Any = None


# --- typed results (identical to what ``--json`` prints) ----------------------------------------


class SendResult(BaseModel):
    """Outcome of one SEND.

    Attributes:
        id: message id (12 hex chars; the marker is ``fleet#<id>``).
        result: ``accepted`` (evidence says the runtime took it), ``queued`` (held, not yet taken:
            ``held_by`` ``fleetbus`` when the message is in the router's journal waiting for its
            turn or for the slot (``detach``, ``when=available``); ``held_by`` ``runtime`` when it
            was submitted while the runtime was busy and its TUI holds it until the turn ends,
            evidence ``runtime-ack`` when its extension said so, ``pane-diff`` when the TUI's
            queue indicator showed it), ``dead-letter`` (``when=available`` and the slot did not
            become available within the TTL; nothing was typed), ``injected`` (typed and
            submitted, not verified: ``--verify`` was off), ``draft`` (text sits unsubmitted in
            the input line), ``unconfirmed`` (no evidence either way before the timeout),
            ``rejected`` (nothing was typed; ``code`` says why).
        evidence: ``runtime-ack`` or ``pane-diff`` when accepted.
        code: stable reason code when rejected: ``unknown-slot``, ``slot-down``, ``slot-dead``,
            ``invalid-body``, ``busy-input``, ``no-prompt``, ``journal-unavailable`` (the journal
            cannot be written, e.g. a full disk: nothing was journaled or typed; with ``queued``:
            journaled before, and not typed until the journal can be written again).
        latency_ms: ms from the router receiving the SEND to the result.
        submit_retries: extra submit keys sent after a detected draft (never re-typed text).
        session_id: the runtime session that acknowledged it (from the hook payload).
        queued_ms: ms from the router receiving the SEND to the moment it was seen queued.
        held_by: for ``queued``: ``fleetbus`` (the journal) or ``runtime`` (the TUI's queue).
        idempotency_key: the SEND's key. duplicate: this SEND repeated a key the journal held,
            and nothing was typed for it (the result is the first message's).
        expires_at: Unix time (s) at which a message held for ``when=available`` goes to
            ``dead-letter``.
        journaled: False when this result is not in the journal: a SEND refused because the
            journal cannot be written (nothing was typed), or a final result the journal could
            not record when it was reached (the router keeps it in memory and writes it as
            soon as it can; a router stopped before then recovers the message from its last
            journaled state and never types it twice).
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
    held_by: Literal["fleetbus", "runtime"] | None = None
    idempotency_key: str | None = None
    duplicate: bool = False
    expires_at: float | None = None
    journaled: bool = True


class SlotStatus(BaseModel):
    """One row of ``fleet ps``.

    Attributes:
        pane: ``alive``, ``dead`` (program exited) or ``absent``.
        exit_status: exit status of a dead pane; None when a signal killed it (tmux 3.3a leaves
            ``pane_dead_status`` empty then; the signal is in ``last_exit.signal``).
        idle_s: seconds since the slot's window last printed (tmux ``window_activity``).
        heartbeat: ``healthy``, ``stale`` or ``none`` (never heard from a sidecar).
        heartbeat_age_s: seconds since the sidecar was last heard from.
        state: runtime state reported through hooks (``idle``, ``busy``, ``unknown``...).
        process: the runtime process (psutil): ``name``, ``rss_mb``, ``children``.
        flags: ``DEAD``, ``STALE``, ``DRIFT``, ``NO-SIDECAR``, and from supervision
            ``CRASH-LOOP`` (restarts stopped until an operator starts the slot) and ``BACKOFF``
            (waiting to restart).
        source: where heartbeats came from: ``router`` or ``files`` (router down).
        restart: the slot's restart policy (``always``, ``on-failure``, ``no``).
        restarts: restarts by the router within the crash-loop window.
        last_exit: the latest exit of the slot's program, from the journal: ``{"status": int|None,
            "signal": int|None, "at": Unix s, "duration_s": s|None (since it was started),
            "last_lines": [the last non-blank lines of its screen], "reason": str}``, or None.
        task: the id of the task the slot holds (``fleet publish``), or None; None too when
            the router is down (``source`` ``files``).
        journal: the router's journal (the same on every row):
            :meth:`fleetbus.router.journal.Journal.health`, ``{"ok": bool, "fs", "free_bytes",
            "since", "error", "deferred", ...}``; ``ok`` false while it cannot be written (new
            SENDs and PUBLISHes are refused ``journal-unavailable``). None when the router is
            down (``source`` ``files``).
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
    restart: Literal["always", "on-failure", "no"] = "on-failure"
    restarts: int = 0
    last_exit: dict[str, Any] | None = None
    task: str | None = None
    journal: dict[str, Any] | None = None


class TaskResult(BaseModel):
    """One task, as ``fleet publish --json`` prints it and ``Fleet.publish`` returns it.

    Attributes:
        id: task id (``t`` + 12 hex chars). group: the broadcast id shared by the tasks of one
            ``all:<class>`` publish, else None.
        selector: what the task was published to. state: see :data:`TaskState`.
        slot: the slot that holds or held it (None while ``published``). message_id: the
            message that delivered it (``fleet log --id``).
        code: why it ``failed`` or ``timed-out``: ``no-match`` (the selector names no slot of the
            roster), ``no-slot`` (no matching slot was free within ``wait_s``), ``slot-died`` (its
            runtime exited or was stopped or restarted while it held the task), ``delivery``
            (the message was not accepted: ``detail`` has its result), ``turn-timeout`` (no
            turn-complete within ``timeout_s``), ``invalid-kickstart`` (the roster's template
            could not be filled). A selector naming only slots whose runtime has no hooks (no
            turn-complete signal, so ``done`` could never be known) is ``no-match`` too.
        detail: human-readable reason.
        created, assigned_at, accepted_at, finished_at: Unix s.
        accepted_ms, done_ms: ms from publish to ``accepted`` and to the final state.
        duplicate: this PUBLISH repeated an idempotency key; nothing new was created.
        journaled: False when the journal could not be written when the task reached this
            state: the router keeps the change in memory and writes it when it can.
    """

    tenant_id: str
    host: str
    id: str
    group: str | None = None
    selector: str
    state: TaskState
    slot: str | None = None
    message_id: str | None = None
    sender: str = "ops"
    code: str | None = None
    detail: str = ""
    created: float
    assigned_at: float | None = None
    accepted_at: float | None = None
    finished_at: float | None = None
    accepted_ms: float | None = None
    done_ms: float | None = None
    idempotency_key: str | None = None
    duplicate: bool = False
    journaled: bool = True


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
    source: Ident = ""
    slot: Ident = ""
    runtime: Ident = ""
    session_id: Ident | None = None
    markers: list[Ident] = Field(default_factory=list)
    prompt_head: str = ""
    at: float = Field(default_factory=time.time)


class Event(_Env):
    """One event on the router's PUB socket; the topic frame is ``topic``.

    Topics: ``heartbeat`` (``data.state``: ``registered``, ``idle``, ``busy``, ``stale``,
    ``gone``...), ``message`` (a message's state change), ``task`` (a task's state change; data
    as :class:`TaskResult`), ``slot`` (``data.event``: ``started``, ``exited``, ``stopped``,
    ``restarting``, ``crash-loop``, ``reset``...), ``hook`` (a runtime hook event), ``probe``.
    ``seq`` counts the router's events from 1 (per router process): a gap means the subscriber
    missed events (PUB drops when a subscriber falls 100,000 events behind).
    """

    kind: Literal["EVENT"] = "EVENT"
    topic: Ident
    seq: int | None = Field(None, ge=1)
    slot: Ident | None = None
    tenant_id: Ident
    host: Ident
    at: float = Field(default_factory=time.time)
    data: dict[str, Any] = Field(default_factory=dict)


ENVELOPES: tuple[type[_Env], ...] = (
    Hello, Ping, Ack, Bye, Welcome, Pong, Expect, Disconnect,
    SendRequest, PublishRequest, TaskRequest, PsRequest, SlotRequest, HealthRequest, ShutdownRequest, KeysRequest, Result,
    HookEvent, Event,
)
Envelope = Annotated[Union[ENVELOPES], Field(discriminator="kind")]  # noqa: UP007 (a tuple of types)
#: kind -> model: the discriminated union, dispatched by hand so models build lazily
_BY_KIND: dict[str, type[_Env]] = {k: m for m in ENVELOPES for k in get_args(m.model_fields["kind"].annotation)}


def encode(msg: BaseModel) -> bytes:
    """Encode an envelope model as one msgpack map."""
    return msgpack.packb(msg.model_dump(mode="python", exclude_none=True), use_bin_type=True)


_IDENT_RE = re.compile(r"[^\x00-\x1f\x7f-\x9f]{1,%d}" % MAX_ID_CHARS)
_BRIEF = reprlib.Repr()
_BRIEF.maxstring = _BRIEF.maxother = _BRIEF.maxlong = 60
_MSGPACK_TYPES = {bytes: "bin", str: "str", int: "int", float: "float", bool: "bool", type(None): "nil",
                  list: "array", dict: "map"}


def decode(frame: bytes) -> Any:
    """Decode one frame into an envelope model.

    Validation is strict: every field must arrive as its declared msgpack type (a ``bin`` is
    never taken for a str, an int for a bool, a str for a number); a str must be valid UTF-8;
    floats must be finite; identifiers (:data:`Ident`) are at most :data:`MAX_ID_CHARS`
    characters without control characters; timeouts and TTLs (:data:`Seconds`) lie in
    0..:data:`MAX_WAIT_S` s. Unknown extra fields are ignored (forward compatibility). Error
    messages quote hostile values cut to 60 characters, so they are safe to log.

    Raises:
        ProtocolError: too large, not msgpack, invalid UTF-8, not a map, wrong version, unknown
            kind, or a field that does not validate (then ``kind``/``req`` say which request).
    """
    if len(frame) > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {len(frame)} bytes exceeds {MAX_FRAME_BYTES}")
    try:
        data = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except UnicodeDecodeError as e:
        raise ProtocolError(f"a str in the frame is not valid UTF-8 ({e.reason} at byte {e.start} of it)") from None
    except Exception as e:  # msgpack raises several unrelated types on hostile input
        raise ProtocolError(f"not msgpack: {type(e).__name__}") from None
    if not isinstance(data, dict):
        raise ProtocolError(f"expected a map, got {type(data).__name__}")
    v = data.get("v")
    if type(v) is not int or v != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {_BRIEF.repr(v)}")
    kind = data.get("kind")
    model = _BY_KIND.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise ProtocolError(f"unknown kind {_BRIEF.repr(kind)}")
    try:
        return model.model_validate(data, strict=True)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        where = ".".join(map(str, first["loc"])) or "(frame)"
        got = ""
        if first["type"].endswith("_type"):  # wrong msgpack type: say which one came
            got = f" (got msgpack {_MSGPACK_TYPES.get(type(first.get('input')), 'ext')})"
        req = data.get("req")
        req = req if isinstance(req, str) and _IDENT_RE.fullmatch(req) else None
        raise ProtocolError(f"invalid {kind} frame: {_BRIEF.repr(where)[1:-1]}: {first['msg']}{got}",
                            kind=kind, req=req) from None


# --- message bodies ----------------------------------------------------------------------------


class InvalidBody(ValueError):
    """A message body that must not reach a terminal (control characters, too large, empty)."""


_CONTROL_NAMES = {0x1B: "ESC", 0x0D: "CR", 0x07: "BEL", 0x08: "BS", 0x7F: "DEL", 0x9B: "CSI", 0x00: "NUL",
                  0x9D: "OSC", 0x90: "DCS", 0x9C: "ST", 0x85: "NEL"}
#: The start of a fleet message tag (``[fleet#`` + a 12-hex message id): refused in bodies.
TAG_START = re.compile(r"\[fleet#[0-9a-f]{12}")
#: Every character check_body refuses: C0 but LF and TAB, DEL, C1, and lone surrogates.
_FORBIDDEN = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")


def check_body(body: str, max_bytes: int) -> str:
    """Validate a message body and return it with CRLF line ends turned into LF.

    Allowed: printable text (any Unicode outside the ranges below), newline (LF) and tab.
    Checked in this order, the first failure wins:

    1. CRLF becomes LF (a Windows file is fine); a body that is then only whitespace is refused
       (``empty message body``).
    2. Size: more than ``max_bytes`` UTF-8 bytes is refused, naming the size and the limit
       (roster ``bus.max_body_bytes``, default 65536, at most 1 MiB).
    3. Not UTF-8: a lone surrogate (what Python makes of undecodable bytes, e.g. in ``argv``) is
       refused, naming the byte when it came from ``surrogateescape``.
    4. Controls: every C0 control but LF and TAB (NUL, BEL, BS, a bare CR, ESC: so every
       escape sequence, CSI, OSC, DCS, APC, and the bracketed-paste markers ``ESC[200~`` and
       ``ESC[201~``), DEL, and every C1 control U+0080–U+009F (8-bit CSI, OSC, DCS, ST, NEL).
    5. A message tag (``[fleet#`` and 12 hex digits, see :data:`TAG_START`): typed into a
       pane it could be taken for another message's tag; fleetbus puts the only tag itself.

    Nothing is stripped or rewritten but line ends: a body is delivered exactly or refused.
    tmux 3.3 passes pasted escape sequences through unchanged, so this check is what keeps a
    body from becoming keystrokes. Cost is linear and runs in C (one regex scan).

    Raises:
        InvalidBody: with the reason; for a character, its name, code point and offset.
    """
    body = body.replace("\r\n", "\n")
    if not body.strip():
        raise InvalidBody("empty message body")
    size = len(body.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise InvalidBody(f"body is {size} bytes; the limit is {max_bytes} bytes (bus.max_body_bytes)")
    m = _FORBIDDEN.search(body)
    if m is not None:
        i, o = m.start(), ord(m.group())
        if 0xD800 <= o <= 0xDFFF:
            byte = f" (undecodable byte 0x{o - 0xDC00:02X})" if 0xDC80 <= o <= 0xDCFF else ""
            raise InvalidBody(f"body is not valid UTF-8: lone surrogate U+{o:04X} at offset {i}{byte}")
        name = _CONTROL_NAMES.get(o, "C1 control" if o >= 0x80 else "control")
        raise InvalidBody(
            f"body contains {name} character U+{o:04X} at offset {i}; control characters and "
            "escape sequences are refused (only newline and tab are allowed)"
        )
    m = TAG_START.search(body)
    if m is not None:
        raise InvalidBody(f"body contains a fleet message tag {m.group()!r} at offset {m.start()}; it could be taken "
                          "for another message's acknowledgement (write it without the '[')")
    return body
