"""Roster (``fleet.yaml``) models and loading with precise errors.

A roster declares the transport, the bus settings, defaults and the agent slots::

    version: 1
    tenant: alice            # optional; defaults to the OS user
    transport: {kind: tmux, socket: fleet}
    bus: {heartbeat_ms: 1000, liveness: 3}
    defaults: {workdir: ~/src, runtime: stub}
    agents:
      - {name: coder0, runtime: stub, class: implementer}

Errors name the file, the path inside it and what was expected, for example
``fleet.yaml: agents[1].name: slot names match [a-z0-9][a-z0-9._-]* (got 'Bad')``.
"""

import getpass
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BeforeValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from fleetbus.adapters import get_adapter
from fleetbus.adapters import names as runtime_names

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]*")
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: Longest slot or tenant name; keeps socket paths under the 107-byte Unix limit.
MAX_NAME = 40


class RosterError(ValueError):
    """An invalid or unreadable roster. ``str()`` names the file and the path inside it."""

    def __init__(self, file: str | Path, problems: list[str]):
        self.file = str(file)
        self.problems = problems
        super().__init__("\n".join(f"{self.file}: {p}" for p in problems))


def _check_name(value: str) -> str:
    if not NAME_RE.fullmatch(value) or len(value) > MAX_NAME:
        raise ValueError(
            f"names match [a-z0-9][a-z0-9._-]* and are at most {MAX_NAME} characters "
            f"(got {value!r})"
        )
    return value


Name = Annotated[str, AfterValidator(_check_name)]


def _check_env(value: dict[str, str]) -> dict[str, str]:
    for k, v in value.items():
        if not ENV_NAME_RE.fullmatch(k):
            raise ValueError(f"environment variable names match [A-Za-z_][A-Za-z0-9_]* (got {k!r})")
        if "\0" in v:
            raise ValueError(f"the value of {k} contains a NUL character, which no environment can hold")
    return value


#: ``env:`` of a slot or of ``defaults``. Values reach the runtime literally (tmux ``-e``, no
#: shell): ``$(...)``, backticks, quotes, ``;`` and newlines stay text. NUL is refused.
Env = Annotated[dict[str, str], AfterValidator(_check_env)]


def _check_arg(value: str) -> str:
    if "\0" in value:
        raise ValueError(f"contains a NUL character, which no program argument or path can hold (got {value!r})")
    return value


#: A ``command`` argument or a ``workdir``: passed literally (an argv element, never a shell
#: line; a workdir's ``#`` is escaped from tmux formats), so any text but NUL.
Arg = Annotated[str, AfterValidator(_check_arg)]


def _check_runtime(value: str) -> str:
    if value not in runtime_names():
        raise ValueError(f"unknown runtime {value!r}; expected one of: {', '.join(runtime_names())}")
    return value


Runtime = Annotated[str, AfterValidator(_check_runtime)]


def _restart_policy(value: Any) -> Any:
    # YAML 1.1 reads an unquoted `restart: no` as the boolean False
    return "no" if value is False else value


#: ``restart:`` of a slot: ``always``, ``on-failure`` (exit status != 0 or killed by a signal), ``no``.
RestartPolicy = Annotated[Literal["always", "on-failure", "no"], BeforeValidator(_restart_policy)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class TransportConfig(_Model):
    """``transport:`` which transport carries text to slots.

    ``socket`` is the tmux ``-L`` socket name of the fleet's private tmux server; ``width`` and
    ``height`` (cells) size every slot's window, which never follows a viewer's terminal.
    """

    kind: Literal["tmux", "memory"] = "tmux"
    socket: Name = "fleet"
    width: int = Field(200, ge=40, le=1000)
    height: int = Field(50, ge=10, le=500)


TCP_RE = re.compile(r"tcp://(\*|[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]):([0-9]{1,5})")


#: Fields a kickstart template may use: the task's ``body``, ``task_id``, ``slot``, ``sender``
#: and ``selector``.
KICKSTART_FIELDS = ("body", "task_id", "slot", "sender", "selector")


def check_kickstart(value: str) -> str:
    """Validate a kickstart template: ``str.format`` syntax with only :data:`KICKSTART_FIELDS`
    as plain names (no attribute or index access, no conversions or format specs), ``{body}``
    exactly once, no control characters but newline and tab. ``{{``/``}}`` are literal braces.

    Raises:
        ValueError: what is wrong, naming the field.
    """
    import string

    if any((c < " " and c not in "\n\t") or "\x7f" <= c <= "\x9f" for c in value):
        raise ValueError("contains a control character (only newline and tab are allowed)")
    try:
        parts = list(string.Formatter().parse(value))
    except ValueError as e:
        raise ValueError(f"not a valid template: {e} (write {{{{ and }}}} for literal braces)") from None
    bodies = 0
    for _, name, spec, conv in parts:
        if name is None:
            continue
        if name not in KICKSTART_FIELDS:
            raise ValueError(f"unknown field {{{name}}}; a kickstart may use {', '.join('{%s}' % f for f in KICKSTART_FIELDS)}")
        if spec or conv:
            raise ValueError(f"field {{{name}}} takes no format spec or conversion")
        bodies += name == "body"
    if bodies != 1:
        raise ValueError(f"must contain {{body}} exactly once (found {bodies})")
    return value


def render_kickstart(template: str | None, *, body: str, task_id: str, slot: str, sender: str, selector: str) -> str:
    """The text delivered for a task: ``template`` with its fields filled in, or ``body`` when
    ``template`` is None. Field values are inserted literally (never parsed as templates).

    Raises:
        ValueError: ``template`` fails :func:`check_kickstart`.
    """
    if template is None:
        return body
    check_kickstart(template)
    return template.format(body=body, task_id=task_id, slot=slot, sender=sender, selector=selector)


#: ``kickstart:`` of a slot or of ``defaults``: a template wrapping each task's body.
Kickstart = Annotated[str, AfterValidator(check_kickstart)]


def _check_tcp(value: str) -> str:
    m = TCP_RE.fullmatch(value)
    if not m or not 1 <= int(m.group(2)) <= 65535:
        raise ValueError(f"expected tcp://HOST:PORT with an IP address, host name or * and a port 1-65535 (got {value!r})")
    return value


#: ``bus.tcp``: the router's CURVE-secured endpoint for remote sidecars, ``tcp://HOST:PORT``.
TcpEndpoint = Annotated[str, AfterValidator(_check_tcp)]


class BusConfig(_Model):
    """``bus:`` heartbeat and message settings.

    ``heartbeat_ms`` (ms) is the sidecar ping interval; a slot is ``stale`` after
    ``heartbeat_ms × liveness`` ms of silence. ``max_body_bytes`` bounds a message body (UTF-8
    bytes). ``verify_timeout_s`` (s) is the default ``send --verify`` timeout. ``message_ttl_s`` (s)
    is how long a ``send --when available`` message waits for its slot before ``dead-letter``.
    ``tcp`` (``tcp://HOST:PORT``, optional) is where remote sidecars connect with CURVE keys.
    ``task_wait_s`` (s) is how long a published task waits for a matching free slot before it is
    ``timed-out`` (code ``no-slot``); ``task_timeout_s`` (s) is how long an assigned task may take
    to reach ``done`` (the runtime's turn-complete signal) before it is ``timed-out``.

    Limits (README "Limits"; each refusal has a stable code and journals nothing):

    - ``max_queued_per_slot`` (messages, default 1000): messages waiting in the router's queue of
      one slot (journaled, not yet typed or verified); a SEND beyond it is ``rejected`` with code
      ``queue-full`` (CLI exit 3).
    - ``max_open_tasks`` (tasks, default 1000): tasks not yet ``done``/``failed``/``timed-out``; a
      PUBLISH that would exceed it fails with code ``too-many-tasks`` (CLI exit 3).
    - ``send_rate`` (messages/s, default 100; 0: no limit) and ``send_burst`` (messages, default
      1000): a token bucket per client process (the pid of the local peer, from its socket
      credentials) for SEND and PUBLISH; beyond it a SEND is ``rejected`` with code
      ``rate-limited`` and a PUBLISH fails with that code, the retry-after (s) in the detail.
      A request whose idempotency key is already journaled is never refused by a limit.
    - ``retention_days`` (days, default 30; 0: keep everything): finished messages and tasks
      (and their state changes, and slot events but the latest of each kind per slot) last
      changed longer ago are pruned from the journal when the router starts and then daily
      (``fleet log --prune`` on demand). Unfinished ones are never pruned.
    - ``log_max_bytes`` (bytes, default 10 MiB) and ``log_backups`` (files, default 3): the
      router's and each sidecar's log file is rotated at that size, keeping that many older files.
    """

    heartbeat_ms: int = Field(1000, ge=50, le=60_000)
    liveness: int = Field(3, ge=1, le=100)
    max_body_bytes: int = Field(65_536, ge=64, le=1_048_576)
    verify_timeout_s: float = Field(10.0, gt=0, le=3600)
    message_ttl_s: float = Field(3600.0, gt=0, le=30 * 86400)  # when=available: held this long (s)
    task_wait_s: float = Field(3600.0, ge=0, le=30 * 86400)
    task_timeout_s: float = Field(3600.0, gt=0, le=30 * 86400)
    # supervision (fleetbus.router.supervisor): the n-th restart of a slot within crash_loop_window_s (s)
    # waits min(restart_backoff_ms × 2^(n-1), restart_backoff_max_ms) ms; more than crash_loop_restarts
    # restarts within the window stop restarting (CRASH-LOOP until an operator start/restart)
    restart_backoff_ms: int = Field(1000, ge=10, le=3_600_000)
    restart_backoff_max_ms: int = Field(60_000, ge=10, le=86_400_000)
    crash_loop_restarts: int = Field(5, ge=1, le=10_000)
    crash_loop_window_s: float = Field(300.0, gt=0, le=86_400)
    # remote sidecars (fleetbus.router.auth): a second ROUTER socket with CURVE and an allow-list of
    # client keys (`fleet keys`); absent: no tcp listener
    tcp: TcpEndpoint | None = None
    # limits (fleetbus.router.limits; README "Limits")
    max_queued_per_slot: int = Field(1000, ge=1, le=1_000_000)
    max_open_tasks: int = Field(1000, ge=1, le=1_000_000)
    send_rate: float = Field(100.0, ge=0, le=1_000_000)  # messages/s per client process; 0: no limit
    send_burst: int = Field(1000, ge=1, le=1_000_000)
    retention_days: float = Field(30.0, ge=0, le=36_500)  # 0: never prune
    log_max_bytes: int = Field(10 * 1024 * 1024, ge=4096, le=1024 ** 3)
    log_backups: int = Field(3, ge=1, le=100)

    @model_validator(mode="after")
    def _backoff_order(self) -> "BusConfig":
        if self.restart_backoff_max_ms < self.restart_backoff_ms:
            raise ValueError(f"restart_backoff_max_ms ({self.restart_backoff_max_ms}) must be at least "
                             f"restart_backoff_ms ({self.restart_backoff_ms})")
        return self


class Defaults(_Model):
    """``defaults:`` values every agent inherits unless it sets its own."""

    runtime: Runtime = "stub"
    workdir: Arg | None = None
    env: Env = Field(default_factory=dict)
    class_: str | None = Field(None, alias="class")
    restart: RestartPolicy = "on-failure"
    kickstart: Kickstart | None = None


class AgentConfig(_Model):
    """One entry of ``agents:``: a slot."""

    name: Name
    runtime: Runtime | None = None
    class_: str | None = Field(None, alias="class")
    workdir: Arg | None = None
    env: Env = Field(default_factory=dict)
    command: list[Arg] | None = Field(None, min_length=1)
    heartbeat_ms: int | None = Field(None, ge=50, le=60_000)
    liveness: int | None = Field(None, ge=1, le=100)
    reset_between_tasks: bool = False
    restart: RestartPolicy | None = None
    kickstart: Kickstart | None = None


class Roster(_Model):
    """The whole roster file."""

    version: Literal[1]

    @field_validator("version", mode="before")
    @classmethod
    def _int_version(cls, v: Any) -> Any:
        if type(v) is not int:
            raise ValueError(f"expected the integer 1 (got {v!r})")
        return v
    tenant: Name | None = None
    transport: TransportConfig = TransportConfig()
    bus: BusConfig = BusConfig()
    defaults: Defaults = Defaults()
    agents: list[AgentConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_names(self) -> "Roster":
        seen: dict[str, int] = {}
        for i, a in enumerate(self.agents):
            if a.name in seen:
                raise ValueError(f"agents[{i}].name: duplicate slot {a.name!r} (also agents[{seen[a.name]}])")
            seen[a.name] = i
        return self


class Slot(BaseModel):
    """A slot resolved from the roster: defaults applied, paths expanded.

    Attributes:
        name: slot name.
        runtime: adapter name.
        class_: the slot's class (role), or None.
        workdir: absolute working directory (the roster's, expanded; default: the roster's folder).
        env: environment merged from defaults and the agent.
        command: launch argv override, or None for the adapter's default.
        heartbeat_ms: ping interval (ms). liveness: missed intervals before ``stale``.
        restart: what the router does when the slot's program exits: ``always``, ``on-failure``
            (exit status != 0 or killed by a signal) or ``no``.
        reset_between_tasks: the router resets the runtime's session (``/clear``...) after each
            task it ran, before the slot takes another.
        kickstart: template that wraps a task's body when it is delivered to this slot
            (:func:`render_kickstart`), or None (the body alone).
    """

    model_config = ConfigDict(frozen=True)

    name: str
    runtime: str
    class_: str | None = None
    workdir: str
    env: dict[str, str]
    command: list[str] | None
    heartbeat_ms: int
    liveness: int
    reset_between_tasks: bool = False
    restart: str = "on-failure"
    kickstart: str | None = None

    def program(self, base_path: str | None = None) -> tuple[str, str, str | None]:
        """Where this slot's program is: ``(argv0, PATH searched, absolute executable or None)``.

        The PATH is the slot's ``env.PATH`` if set, else ``base_path``, else this interpreter's
        bin dir followed by this process's ``PATH`` (what the router gives the pane). An absolute
        ``argv0`` is taken as it is; the executable is None when missing or not executable.
        """
        path = self.env.get("PATH") or base_path or os.pathsep.join(
            [os.path.dirname(sys.executable), os.environ.get("PATH", "/usr/bin:/bin")])
        argv0 = (self.command or get_adapter(self.runtime).command)[0]
        exe = argv0 if os.path.isabs(argv0) else shutil.which(argv0, path=path)
        return argv0, path, exe if exe and os.access(exe, os.X_OK) else None


class FleetConfig(BaseModel):
    """A loaded roster: the file it came from, the tenant, and resolved slots."""

    model_config = ConfigDict(frozen=True)

    path: Path | None
    tenant: str
    roster: Roster
    slots: dict[str, Slot]

    def slot(self, name: str) -> Slot:
        """Return slot ``name``. Raises ``KeyError`` with the known slot names."""
        try:
            return self.slots[name]
        except KeyError:
            known = ", ".join(self.slots) or "(none)"
            raise KeyError(f"unknown slot {name!r}; roster slots: {known}") from None


def default_tenant() -> str:
    """The OS user name, lower-cased and reduced to the slot-name alphabet."""
    user = re.sub(r"[^a-z0-9._-]", "-", getpass.getuser().lower()).lstrip("._-") or "user"
    return user[:MAX_NAME]


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _format_errors(err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))
        msg = e["msg"].removeprefix("Value error, ")
        if msg.startswith("agents[") and not loc:
            problems.append(msg)
            continue
        got = ""
        if e["type"] not in ("value_error", "missing") and "input" in e:
            got = f" (got {e['input']!r})"
        problems.append(f"{_loc(loc)}: {msg}{got}")
    return problems


def parse_roster(data: Any, file: str | Path = "<roster>", base_dir: Path | None = None) -> FleetConfig:
    """Validate already-parsed YAML ``data`` and resolve its slots.

    Raises:
        RosterError: the data is not a valid roster; every problem is listed with its path.
    """
    if not isinstance(data, dict):
        raise RosterError(file, [f"(top level): expected a mapping, got {type(data).__name__}"])
    try:
        roster = Roster.model_validate(data)
    except ValidationError as e:
        raise RosterError(file, _format_errors(e)) from None
    base = base_dir or Path.cwd()
    tenant = roster.tenant or default_tenant()
    slots: dict[str, Slot] = {}
    d = roster.defaults
    for a in roster.agents:
        workdir = a.workdir or d.workdir or str(base)
        wd = Path(os.path.expandvars(workdir)).expanduser()
        if not wd.is_absolute():
            wd = base / wd
        slots[a.name] = Slot(
            name=a.name,
            runtime=a.runtime or d.runtime,
            class_=a.class_ or d.class_,
            workdir=str(wd),
            env={**d.env, **a.env},
            command=a.command,
            heartbeat_ms=a.heartbeat_ms or roster.bus.heartbeat_ms,
            liveness=a.liveness or roster.bus.liveness,
            reset_between_tasks=a.reset_between_tasks,
            restart=a.restart or d.restart,
            kickstart=a.kickstart if a.kickstart is not None else d.kickstart,
        )
    return FleetConfig(path=Path(file).resolve() if file != "<roster>" else None, tenant=tenant, roster=roster, slots=slots)


def load_roster(path: str | Path) -> FleetConfig:
    """Read and validate the roster file at ``path``.

    Relative workdirs resolve against the roster's folder.

    Raises:
        RosterError: the file is missing, is not YAML, or is not a valid roster.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise RosterError(p, [f"cannot read roster: {e.strerror or e}"]) from None
    except UnicodeDecodeError:
        raise RosterError(p, ["roster is not UTF-8 text"]) from None
    try:
        # libyaml's C loader when PyYAML was built with it (its wheels are): ~10x faster
        data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise RosterError(p, [f"{where}invalid YAML: {problem}"]) from None
    return parse_roster(data, p, base_dir=p.resolve().parent)


def find_roster(explicit: str | None = None, env: dict[str, str] | None = None) -> Path:
    """Locate the roster: ``explicit`` (``--roster``), then ``$FLEETBUS_ROSTER``, then ``./fleet.yaml``.

    Raises:
        RosterError: none of them names an existing file.
    """
    env = dict(os.environ) if env is None else env
    for candidate, source in ((explicit, "--roster"), (env.get("FLEETBUS_ROSTER"), "$FLEETBUS_ROSTER")):
        if candidate:
            p = Path(candidate).expanduser()
            if not p.is_file():
                raise RosterError(p, [f"roster not found (from {source})"])
            return p
    p = Path("fleet.yaml")
    if p.is_file():
        return p
    raise RosterError(
        p.resolve(), ["no roster: pass --roster PATH, set $FLEETBUS_ROSTER, or create ./fleet.yaml (see examples/)"]
    )
