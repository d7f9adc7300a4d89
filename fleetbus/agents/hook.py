"""Runtime hook → sidecar: one Unix datagram per event, never blocking the runtime.

Used in-process by the stub agent (as pi's and opencode's extensions do) and by ``fleet hook``
for runtimes whose hooks run a command (Claude Code, Codex, Gemini CLI). The socket path comes
from ``$FLEETBUS_HOOK_SOCKET``, which the transport sets in every slot's environment.

A datagram to a socket nobody is bound to fails at once (``ENOENT``/``ECONNREFUSED``), and a full
receive queue (Linux keeps 10 datagrams: ``net.unix.max_dgram_qlen``) fails at once with
``EAGAIN``: either way the hook returns False and the runtime carries on. An event that acknowledges fleet messages (``prompt-submit``/``prompt-queued`` with a
marker) is then appended to the slot's spool file (:func:`spool_path`, one base64 line per frame,
0600 in the private runtime dir); the sidecar replays the spool when it (re)starts, so an ack
is not lost while the sidecar is down. This module avoids pydantic so ``fleet hook`` starts fast;
the frame matches :class:`fleetbus.protocol.HookEvent` (the sidecar validates it).

Before sending (or spooling), the socket and its directories are checked with a few ``lstat``
calls (:func:`fleetbus.safepath.hook_socket_problem`): a socket that is a symlink or owned by
another uid, or a directory on the way that is a symlink, another user's, or writable by group or
world, gets nothing (the prompt text would go to whoever planted it); the hook returns False and
reports why through ``on_refused``.
"""

from __future__ import annotations

import base64
import errno
import os
import socket
import time
from collections.abc import Callable

import msgpack

from fleetbus.adapters.base import tag_markers
from fleetbus.safepath import hook_socket_problem

EVENTS = ("prompt-submit", "prompt-queued", "turn-start", "turn-end", "session-start")
#: Largest spool file (bytes) a hook appends to; beyond it events are dropped as before.
MAX_SPOOL_BYTES = 16 * 1024 * 1024


def spool_path(hook_socket: str) -> str:
    """Spool file of the slot whose hook socket is ``hook_socket`` (``h/<slot>.sock`` ->
    ``h/<slot>.spool``)."""
    return hook_socket.rsplit(".", 1)[0] + ".spool"


def _spool(path: str, data: bytes) -> bool:
    try:
        spool = spool_path(path)
        if os.path.exists(spool) and os.path.getsize(spool) > MAX_SPOOL_BYTES:
            return False
        fd = os.open(spool, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, base64.b64encode(data) + b"\n")  # one write: appends never interleave
        finally:
            os.close(fd)
        return True
    except OSError:
        return False


def hook_frame(event: str, *, prompt: str = "", session_id: str | None = None, source: str = "", slot: str = "",
               runtime: str = "") -> bytes:
    """Encode a HOOK frame. Markers are taken from ``prompt``; ``prompt_head`` keeps 200 chars."""
    frame = {
        "v": 1, "kind": "HOOK", "event": event, "slot": slot, "runtime": runtime, "source": source[:40],
        "markers": tag_markers(prompt), "prompt_head": prompt[:200], "at": time.time(),
    }
    if session_id:
        frame["session_id"] = session_id[:200]
    return msgpack.packb(frame, use_bin_type=True)


def send_hook(event: str, *, prompt: str = "", session_id: str | None = None, source: str = "",
              path: str | None = None, on_refused: Callable[[str], object] | None = None) -> bool:
    """Send one hook event to the slot's sidecar. Returns False (never raises) when it is down,
    or when the socket or a directory on its way is not safely ours (see the module docstring):
    then nothing is sent or spooled and ``on_refused`` gets the reason (naming the path).

    ``path`` defaults to ``$FLEETBUS_HOOK_SOCKET``; ``source`` is the runtime's reason
    (``startup``, ``clear``...).
    """
    path = path or os.environ.get("FLEETBUS_HOOK_SOCKET")
    if not path:
        return False
    problem = hook_socket_problem(path)
    if problem is not None:
        if on_refused is not None:
            on_refused(problem)
        return False
    try:
        data = hook_frame(event, prompt=prompt.encode("utf-8", "replace").decode("utf-8"), session_id=session_id,
                          source=source, slot=os.environ.get("FLEETBUS_SLOT", ""),
                          runtime=os.environ.get("FLEETBUS_RUNTIME", ""))
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.setblocking(False)
            s.sendto(data, path)
        return True
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN) \
                and event in ("prompt-submit", "prompt-queued") and tag_markers(prompt):
            _spool(path, data)  # the sidecar is down or behind: it replays this at its next beat
        return False
    except ValueError:
        return False


def parse_payload(raw: str) -> tuple[str, str | None, str]:
    """Read ``(prompt, session_id, source)`` from a runtime's hook payload.

    Accepts the JSON objects of Claude Code (``prompt``, ``session_id``, ``source``/``reason``),
    Codex (same names) and Gemini CLI (``prompt``, ``session_id``, ``source``/``reason``), and
    the fleetbus extension lines (``text``, ``sessionID``). Anything that is not a JSON object
    counts as the prompt text itself.
    """
    import json

    try:
        payload = json.loads(raw) if raw.strip() else {}
    except ValueError:
        return raw, None, ""
    if not isinstance(payload, dict):
        return raw, None, ""
    return payload_fields(payload)


def payload_fields(payload: dict) -> tuple[str, str | None, str]:
    """``(prompt, session_id, source)`` of an already decoded hook payload (see :func:`parse_payload`)."""
    prompt = payload.get("prompt") or payload.get("text") or ""
    session = payload.get("session_id") or payload.get("sessionID")
    source = payload.get("source") or payload.get("reason") or ""
    return (str(prompt), str(session) if session else None, str(source))
