"""Per-slot delivery queues and the state of one message in flight.

The router gives every slot one :class:`SlotQueue` and one worker task that types its messages
one at a time, in the order they were journaled: two messages are never typed into one pane at
once, and a message never overtakes an earlier one for the same slot. A :class:`Delivery` is one
journaled message on its way; every client waiting for it (the SEND, and any resend with the
same idempotency key) waits on the same object.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import anyio

from fleetbus import protocol as P
from fleetbus.router.journal import MessageRecord


@dataclass(frozen=True)
class Unavailable:
    """The slot cannot take a message now; nothing was typed. ``code`` is a stable reject code
    (``slot-down``, ``slot-dead``, ``no-prompt``, ``busy-input``)."""

    code: str
    detail: str


class Delivery:
    """One journaled message on its way to its slot.

    Attributes:
        rec: the journal row (kept in step with the journal by the router).
        req: the SEND that created it (rebuilt from the journal after a router restart).
        t0: ``time.monotonic()`` when the router received the SEND (or recovered it).
        answer: the first result a waiting client gets (``answered`` is set then): the final
            result, or ``queued`` when the message is held (by fleetbus for ``when=available``,
            by the runtime with ``wait=queued``).
        final: the final result, once there is one.
        held: the message waits in the journal for its slot (``when=available``).
        recovered: it was unfinished when a previous router stopped.
        waiter: the router's verification state while it is typed and verified.
    """

    def __init__(self, rec: MessageRecord, req: P.SendRequest, t0: float, recovered: bool = False):
        self.rec = rec
        self.req = req
        self.t0 = t0
        self.answered = anyio.Event()
        self.answer: P.SendResult | None = None
        self.final: P.SendResult | None = None
        self.held = False
        self.recovered = recovered
        self.waiter: Any = None
        self.follow_scope: anyio.CancelScope | None = None  # the runtime-queued follower's

    def reply(self, result: P.SendResult) -> None:
        """Give waiting clients ``result`` (only the first call counts)."""
        if self.answer is None:
            self.answer = result
            self.answered.set()


class SlotQueue:
    """The messages waiting for one slot, oldest first."""

    def __init__(self) -> None:
        self.items: deque[Delivery] = deque()
        self._wake = anyio.Event()

    def put(self, d: Delivery) -> None:
        self.items.append(d)
        self._wake.set()

    def wake(self) -> None:
        """Wake the worker after items were inserted directly."""
        self._wake.set()

    async def wait(self) -> None:
        """Return when a message is queued (at once if one is)."""
        while not self.items:
            self._wake = anyio.Event()
            await self._wake.wait()
