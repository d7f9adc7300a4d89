"""Runtime hook → sidecar: one Unix datagram per event, never blocking the runtime.

Used in-process by the stub agent (as pi's and opencode's extensions do) and by ``fleet hook``
for runtimes whose hooks run a command (Claude Code, Codex, Gemini CLI). The socket path comes
from ``$FLEETBUS_HOOK_SOCKET``, which the transport sets in every slot's environment.

A datagram to a socket nobody is bound to fails at once (``ENOENT``/``ECONNREFUSED``), and a full
receive queue fails at once with ``EAGAIN``: either way the event is dropped, the hook returns
False, and the runtime carries on. This module avoids pydantic so ``fleet hook`` starts fast;
the frame matches :class:`fleetbus.protocol.HookEvent` (the sidecar validates it).
"""

from __future__ import annotations

import os
import socket
import time

import msgpack

from fleetbus.adapters.base import find_markers

EVENTS = ("prompt-submit", "prompt-queued", "turn-start", "turn-end", "session-start")


def hook_frame(event: str, *, prompt: str = "", session_id: str | None = None, source: str = "", slot: str = "",
               runtime: str = "") -> bytes:
    """Encode a HOOK frame. Markers are taken from ``prompt``; ``prompt_head`` keeps 200 chars."""
    frame = {
        "v": 1, "kind": "HOOK", "event": event, "slot": slot, "runtime": runtime, "source": source[:40],
        "markers": find_markers(prompt), "prompt_head": prompt[:200], "at": time.time(),
    }
    if session_id:
        frame["session_id"] = session_id[:200]
    return msgpack.packb(frame, use_bin_type=True)


def send_hook(event: str, *, prompt: str = "", session_id: str | None = None, source: str = "",
              path: str | None = None) -> bool:
    """Send one hook event to the slot's sidecar. Returns False (never raises) when it is down.

    ``path`` defaults to ``$FLEETBUS_HOOK_SOCKET``; ``source`` is the runtime's reason
    (``startup``, ``clear``...).
    """
    path = path or os.environ.get("FLEETBUS_HOOK_SOCKET")
    if not path:
        return False
    try:
        data = hook_frame(event, prompt=prompt.encode("utf-8", "replace").decode("utf-8"), session_id=session_id,
                          source=source, slot=os.environ.get("FLEETBUS_SLOT", ""),
                          runtime=os.environ.get("FLEETBUS_RUNTIME", ""))
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.setblocking(False)
            s.sendto(data, path)
        return True
    except (OSError, ValueError):
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
