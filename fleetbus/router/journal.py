"""The tenant's journal: every message and task, their state changes and slot lifecycle events, in SQLite.

One database per tenant at :attr:`FleetPaths.journal` (``<state_dir>/journal.sqlite3``), in WAL
mode with ``synchronous=FULL``: a message is committed (and fsynced, ~0.5 ms on this project's
test machine) before the router answers ``queued``, so neither a ``kill -9`` of the router nor a
power cut after that answer loses it. The router is the only writer; ``fleet log`` opens the
file read-only and works while the router is down.

Tables:

- ``messages``: one row per message: ``id``, ``slot``, ``sender``, ``body``, ``idempotency_key``
  (unique when set), ``options`` (JSON of the SEND options), ``state``, ``held_by``, ``created``,
  ``updated`` and ``expires`` (Unix s), ``result`` (JSON of the final :class:`SendResult`).
- ``tasks``: one row per task: ``id``, ``grp`` (broadcast group), ``selector``, ``body``,
  ``sender``, ``idempotency_key`` (unique when set), ``options`` (JSON: ``wait_s``, ``timeout_s``,
  ``allow_busy``, ``kickstart``), ``state``, ``slot``, ``message_id``, ``created``, ``updated``,
  ``deadline`` (Unix s: the end of its wait for a slot), ``result`` (JSON of the :class:`TaskResult`).
- ``changes``: an append-only history. ``kind`` is ``message`` (``ref`` = message id, ``state`` =
  its new state), ``task`` (``ref`` = task id), ``slot`` (``state`` = the slot event: ``started``, ``exited``, ``restarting``,
  ``crash-loop``, ``stopped``...) or ``journal`` (``state`` ``resumed``, slot ``""``: the journal
  could not be written from ``data.since`` until this change), with a JSON ``data`` object
  (evidence, code, detail, exit status...).

Message states: ``queued`` (held by fleetbus: waiting for its turn or for the slot), ``typing``
(written just before the router types it: a router that dies now finds out on restart whether
the text reached the pane), ``injected`` (typed and submitted), ``runtime-queued`` (the runtime's
TUI holds it), and the final ``accepted``, ``draft``, ``unconfirmed``, ``rejected`` and
``dead-letter`` (its TTL ran out before the slot was available). A late ack can still turn
``draft``/``unconfirmed`` into ``accepted``.

When the journal cannot be written (disk full, I/O error, read-only file system, locked beyond
the 5 s busy timeout), the failed transaction is rolled back and the journal is *unavailable*
(:attr:`Journal.writable` False, :meth:`Journal.health`) until a write succeeds again. Writes
that create something (:meth:`Journal.add_message`, :meth:`Journal.add_tasks`) and the
write-ahead ``typing`` state raise :class:`JournalUnavailable` then: the router refuses the
SEND/PUBLISH (code ``journal-unavailable``) or does not type. Every other write may be
*deferred* (``defer=True``): it is kept in memory, in order (at most :data:`MAX_DEFERRED`), and
written before anything else once the journal can be written again, together with a
``journal`` change (state ``resumed``) that records the outage. A router that stops before then
loses the deferred writes; its successor recovers those messages from their last journaled state.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetbus.fsinfo import free_bytes, human_bytes, mount_point

#: States of a message that the router still has to finish.
OPEN_STATES = ("queued", "typing", "injected", "runtime-queued")
#: Final states. ``draft``/``unconfirmed`` may still become ``accepted`` through a late ack.
FINAL_STATES = ("accepted", "draft", "unconfirmed", "rejected", "dead-letter")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages(
    id TEXT PRIMARY KEY,
    slot TEXT NOT NULL,
    sender TEXT NOT NULL,
    body TEXT NOT NULL,
    idempotency_key TEXT UNIQUE,
    options TEXT NOT NULL,
    state TEXT NOT NULL,
    held_by TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    expires REAL,
    result TEXT
);
CREATE INDEX IF NOT EXISTS messages_state ON messages(state);
CREATE TABLE IF NOT EXISTS changes(
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    slot TEXT NOT NULL,
    kind TEXT NOT NULL,
    ref TEXT,
    state TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS changes_slot ON changes(slot, seq);
CREATE INDEX IF NOT EXISTS changes_ref ON changes(ref);
CREATE TABLE IF NOT EXISTS tasks(
    id TEXT PRIMARY KEY,
    grp TEXT,
    selector TEXT NOT NULL,
    body TEXT NOT NULL,
    sender TEXT NOT NULL,
    idempotency_key TEXT UNIQUE,
    options TEXT NOT NULL,
    state TEXT NOT NULL,
    slot TEXT,
    message_id TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    deadline REAL,
    result TEXT
);
CREATE INDEX IF NOT EXISTS tasks_state ON tasks(state);
CREATE INDEX IF NOT EXISTS tasks_grp ON tasks(grp);
"""
#: Task states the router still has to finish.
TASK_OPEN_STATES = ("published", "assigned", "accepted")
#: Most deferred writes kept in memory while the journal cannot be written; beyond it a write is
#: dropped (counted in ``health()["lost_writes"]``; the record keeps its last journaled state).
MAX_DEFERRED = 10_000

log = logging.getLogger("fleetbus.journal")

#: Final task states (:data:`fleetbus.protocol.TASK_FINAL`).
TASK_FINAL_STATES = ("done", "failed", "timed-out")
#: Rows deleted per transaction by :meth:`Journal.prune` (keeps the router's writes waiting briefly).
PRUNE_BATCH = 500
#: Largest WAL file kept after a checkpoint (bytes); beyond it the file is truncated.
WAL_LIMIT_BYTES = 64 * 1024 * 1024


class JournalError(RuntimeError):
    """The journal file cannot be opened or is not a fleetbus journal."""


class JournalUnavailable(JournalError):
    """The journal cannot be written now (disk full, I/O error, read-only file system, locked).
    The failed transaction was rolled back: nothing of it is in the file.

    Attributes:
        code: ``journal-unavailable`` (the stable refusal code).
        error: SQLite's message (``database or disk is full``...).
        fs: the mount point of the file system that holds the journal.
    """

    code = "journal-unavailable"

    def __init__(self, message: str, error: str, fs: str):
        super().__init__(message)
        self.error, self.fs = error, fs


def _unwritable(e: sqlite3.DatabaseError) -> bool:
    """``e`` means the file cannot be written now (full, I/O error, read-only, locked, corrupt),
    not a constraint violation or a bug in a statement."""
    return type(e) in (sqlite3.OperationalError, sqlite3.DatabaseError)


@dataclass
class MessageRecord:
    """One ``messages`` row. Times are Unix seconds; ``options`` holds the SEND options
    (``verify``, ``wait``, ``when``, ``timeout_s``, ``on_busy_input``, ``detach``)."""

    id: str
    slot: str
    sender: str
    body: str
    options: dict[str, Any] = field(default_factory=dict)
    idempotency_key: str | None = None
    state: str = "queued"
    held_by: str | None = "fleetbus"
    created: float = field(default_factory=time.time)
    updated: float = 0.0
    expires: float | None = None
    result: dict[str, Any] | None = None

    @classmethod
    def _from_row(cls, row: sqlite3.Row) -> MessageRecord:
        return cls(id=row["id"], slot=row["slot"], sender=row["sender"], body=row["body"],
                   options=json.loads(row["options"]), idempotency_key=row["idempotency_key"],
                   state=row["state"], held_by=row["held_by"], created=row["created"], updated=row["updated"],
                   expires=row["expires"], result=json.loads(row["result"]) if row["result"] else None)


@dataclass
class TaskRecord:
    """One ``tasks`` row. Times are Unix seconds; ``result`` is the latest :class:`TaskResult`
    as a dict (every state change rewrites it)."""

    id: str
    selector: str
    body: str
    sender: str = "ops"
    group: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    idempotency_key: str | None = None
    state: str = "published"
    slot: str | None = None
    message_id: str | None = None
    created: float = field(default_factory=time.time)
    updated: float = 0.0
    deadline: float | None = None
    result: dict[str, Any] | None = None

    @classmethod
    def _from_row(cls, row: sqlite3.Row) -> TaskRecord:
        return cls(id=row["id"], group=row["grp"], selector=row["selector"], body=row["body"], sender=row["sender"],
                   options=json.loads(row["options"]), idempotency_key=row["idempotency_key"], state=row["state"],
                   slot=row["slot"], message_id=row["message_id"], created=row["created"], updated=row["updated"],
                   deadline=row["deadline"], result=json.loads(row["result"]) if row["result"] else None)


class Journal:
    """The tenant's journal.

    Args:
        path: the database file (created with its folder when missing, unless ``readonly``).
        readonly: open for reading only (``fleet log``); never creates or changes the file.
        tenant, host: stamped on every record :meth:`history` returns.

    Raises:
        JournalError: the file cannot be opened (readonly and missing, or not a database).

    Writes come from the router's event loop; a lock makes them safe from worker threads too.
    A write that fails with a SQLite error other than a constraint violation makes the journal
    unavailable (see the module docstring): it raises :class:`JournalUnavailable` or, with
    ``defer=True``, is kept in memory and returns False.
    """

    def __init__(self, path: Path, readonly: bool = False, tenant: str = "", host: str = ""):
        self.path = Path(path)
        self.tenant, self.host = tenant, host
        self._lock = threading.Lock()
        #: while unavailable: ``{"since": Unix s, "error": str, "fs": mount point}``
        self.failure: dict[str, Any] | None = None
        self._deferred: deque[list[tuple[str, tuple[Any, ...]]]] = deque()
        self.refused_writes = 0  # writes that raised JournalUnavailable (this outage)
        self.deferred_writes = 0  # writes deferred (this outage)
        self.lost_writes = 0  # deferred writes dropped beyond MAX_DEFERRED (since the journal was opened)
        self.outages = 0
        self._fs: str | None = None  # mount point of its file system (looked up once)
        try:
            if readonly:
                if not self.path.exists():
                    raise JournalError(f"no journal at {self.path} (the router has not run for this tenant)")
                self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False,
                                          isolation_level=None)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
                self.path.chmod(0o600)
                # a new journal frees the pages of pruned rows back to the file system (no effect on an
                # existing one: it reuses them; see prune)
                self.db.execute("PRAGMA auto_vacuum=INCREMENTAL")
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT_BYTES}")
                self.db.execute("PRAGMA synchronous=FULL")
                self.db.executescript(_SCHEMA)
            self.db.execute("PRAGMA busy_timeout=5000")
            self.db.row_factory = sqlite3.Row
            self.db.execute("SELECT 1 FROM changes LIMIT 1")
        except sqlite3.Error as e:
            raise JournalError(f"cannot open journal {self.path}: {e}") from None

    def close(self) -> None:
        with self._lock:
            self.db.close()

    # -- writing, and what happens when it fails -------------------------------------------------

    @property
    def writable(self) -> bool:
        """False from a failed write until the next write (or :meth:`probe`) succeeds."""
        return self.failure is None

    def health(self) -> dict[str, Any]:
        """``{"ok": bool, "path", "fs" (mount point), "free_bytes" (None: unknown), "since" (Unix s of
        the first failure, or None), "error" (SQLite's message, or None), "deferred" (writes kept in
        memory), "refused" (writes refused during this outage), "lost_writes", "outages"}``."""
        f = self.failure or {}
        return {"ok": self.failure is None, "path": str(self.path), "fs": f.get("fs") or self.fs,
                "free_bytes": free_bytes(self.fs), "since": f.get("since"), "error": f.get("error"),
                "deferred": len(self._deferred), "refused": self.refused_writes, "lost_writes": self.lost_writes,
                "outages": self.outages}

    @property
    def fs(self) -> str:
        """The mount point of the file system that holds the journal."""
        if self._fs is None:
            self._fs = mount_point(self.path)
        return self._fs

    def _tx(self, statements: list[tuple[str, tuple[Any, ...]]]) -> None:
        """One transaction. Whatever fails (a statement, or COMMIT itself: a full disk shows up
        there in WAL mode), it is rolled back, so the connection is never left inside it."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
            for sql, args in statements:
                self.db.execute(sql, args)
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:
                try:
                    self.db.execute("ROLLBACK")
                except sqlite3.Error:  # SQLite may have rolled it back itself (SQLITE_FULL, SQLITE_IOERR)
                    pass
            raise

    def _write(self, statements: list[tuple[str, tuple[Any, ...]]], defer: bool = False) -> bool:
        """Write ``statements`` in one transaction, after any deferred writes. Returns True when
        written; with ``defer``, False when the journal cannot be written and they were kept
        in memory instead.

        Raises:
            JournalUnavailable: the journal cannot be written (and not ``defer``).
            sqlite3.IntegrityError: a constraint failed (nothing was written).
        """
        with self._lock:
            try:
                if self.failure is not None or self._deferred:
                    self._tx([st for w in self._deferred for st in w] + [self._resumed_change()])
                    self._resumed()
                self._tx(statements)
                return True
            except sqlite3.DatabaseError as e:
                if not _unwritable(e):
                    raise
                err = self._failed(e)
                if defer:
                    if len(self._deferred) >= MAX_DEFERRED:
                        self.lost_writes += 1
                        if self.lost_writes == 1:
                            log.error("journal: more than %d writes waiting; dropping writes (their records keep "
                                      "their last journaled state)", MAX_DEFERRED)
                    else:
                        self._deferred.append(statements)
                        self.deferred_writes += 1
                    return False
                self.refused_writes += 1
                raise err from None

    def _failed(self, e: sqlite3.Error) -> JournalUnavailable:
        if self.failure is None:
            fs = self.fs
            self.failure = {"since": time.time(), "error": str(e), "fs": fs}
            self.outages += 1
            self.refused_writes = self.deferred_writes = 0
            log.error("journal %s cannot be written: %s (file system %s, %s free); new SENDs and PUBLISHes are "
                      "refused (journal-unavailable) and other writes are kept in memory until it can be written",
                      self.path, e, fs, human_bytes(free_bytes(fs)))
        f = self.failure
        return JournalUnavailable(f"the journal {self.path} cannot be written: {f['error']} (file system {f['fs']})",
                                  f["error"], f["fs"])

    def _resumed_change(self) -> tuple[str, tuple[Any, ...]]:
        f = self.failure or {"since": time.time(), "error": "", "fs": self.fs}
        return self._change("", "journal", None, "resumed",
                            {"since": f["since"], "error": f["error"], "fs": f["fs"],
                             "deferred": len(self._deferred), "refused": self.refused_writes,
                             "detail": f"the journal could not be written for {time.time() - f['since']:.1f} s "
                                       f"({f['error']}): {self.refused_writes} write(s) refused, "
                                       f"{len(self._deferred)} written late"}, time.time())

    def _resumed(self) -> None:
        f = self.failure
        if f is not None:
            log.warning("journal %s can be written again after %.1f s: %d deferred write(s) written, %d refused",
                        self.path, time.time() - f["since"], len(self._deferred), self.refused_writes)
        self._deferred.clear()
        self.failure = None

    def probe(self) -> bool:
        """While the journal is unavailable, try to write its deferred writes and the ``journal``
        change that records the outage. Returns :attr:`writable`."""
        with self._lock:
            if self.failure is None and not self._deferred:
                return True
            try:
                self._tx([st for w in self._deferred for st in w] + [self._resumed_change()])
            except sqlite3.DatabaseError as e:
                if not _unwritable(e):
                    raise
                self._failed(e)
                return False
            self._resumed()
            return True

    @staticmethod
    def _change(slot: str, kind: str, ref: str | None, state: str, data: dict[str, Any], at: float):
        return ("INSERT INTO changes(at, slot, kind, ref, state, data) VALUES(?,?,?,?,?,?)",
                (at, slot, kind, ref, state, json.dumps(data, default=str)))

    # -- messages ------------------------------------------------------------------------------

    def add_message(self, rec: MessageRecord) -> tuple[MessageRecord, bool]:
        """Insert ``rec`` (state ``queued``). Returns ``(record, True)``, or ``(existing, False)``
        when a message with the same ``idempotency_key`` exists (nothing is written then).

        Raises:
            JournalUnavailable: the journal cannot be written (nothing was written)."""
        rec.updated = rec.created
        try:
            self._write([
                ("INSERT INTO messages(id, slot, sender, body, idempotency_key, options, state, held_by, created,"
                 " updated, expires) VALUES(?,?,?,?,?,?,?,?,?,?,?)",
                 (rec.id, rec.slot, rec.sender, rec.body, rec.idempotency_key, json.dumps(rec.options),
                  rec.state, rec.held_by, rec.created, rec.updated, rec.expires)),
                self._change(rec.slot, "message", rec.id, rec.state,
                             {"held_by": rec.held_by, "sender": rec.sender, "key": rec.idempotency_key,
                              "expires": rec.expires, "bytes": len(rec.body.encode())}, rec.created),
            ])
        except sqlite3.IntegrityError:
            existing = self.by_key(rec.idempotency_key) if rec.idempotency_key else None
            if existing is None:
                raise
            return existing, False
        return rec, True

    def set_state(self, rec: MessageRecord, state: str, *, held_by: str | None = None,
                  result: dict[str, Any] | None = None, defer: bool = False, **data: Any) -> bool:
        """Move ``rec`` to ``state`` (updating the object too) and append the change with ``data``
        (``evidence``, ``code``, ``detail``...). ``result`` is the final SendResult as a dict.

        Returns True when written; with ``defer``, False when the journal cannot be written now
        and the change waits in memory (the object is updated either way).

        Raises:
            JournalUnavailable: the journal cannot be written and not ``defer`` (the object is
                left as it was)."""
        now = time.time()
        data = {k: v for k, v in data.items() if v not in (None, "")}
        written = self._write([
            ("UPDATE messages SET state=?, held_by=?, updated=?, result=COALESCE(?, result) WHERE id=?",
             (state, held_by, now, json.dumps(result, default=str) if result is not None else None, rec.id)),
            self._change(rec.slot, "message", rec.id, state, data, now),
        ], defer=defer)
        rec.state, rec.updated = state, now
        rec.held_by = held_by
        if result is not None:
            rec.result = result
        return written

    def get(self, msg_id: str) -> MessageRecord | None:
        with self._lock:
            row = self.db.execute("SELECT * FROM messages WHERE id=?", (msg_id,)).fetchone()
        return MessageRecord._from_row(row) if row else None

    def by_key(self, key: str) -> MessageRecord | None:
        with self._lock:
            row = self.db.execute("SELECT * FROM messages WHERE idempotency_key=?", (key,)).fetchone()
        return MessageRecord._from_row(row) if row else None

    def changes_of(self, msg_id: str) -> list[dict[str, Any]]:
        """Every recorded change of message ``msg_id``, oldest first (records as :meth:`history`)."""
        with self._lock:
            rows = self.db.execute("SELECT * FROM changes WHERE ref=? ORDER BY seq", (msg_id,)).fetchall()
        return [self._record(r) for r in rows]

    def _record(self, r: sqlite3.Row) -> dict[str, Any]:
        return {"seq": r["seq"], "at": r["at"], "tenant_id": self.tenant, "host": self.host, "slot": r["slot"],
                "kind": r["kind"], "id": r["ref"], "state": r["state"], "data": json.loads(r["data"])}

    def unfinished(self) -> list[MessageRecord]:
        """Messages in an open state (:data:`OPEN_STATES`), oldest first."""
        marks = ",".join("?" * len(OPEN_STATES))
        with self._lock:
            rows = self.db.execute(f"SELECT * FROM messages WHERE state IN ({marks}) ORDER BY rowid",
                                   OPEN_STATES).fetchall()
        return [MessageRecord._from_row(r) for r in rows]

    def messages(self, slot: str | None = None, limit: int = 200) -> list[MessageRecord]:
        """The latest ``limit`` messages (of ``slot``), oldest first."""
        sql, args = "SELECT * FROM messages", ()
        if slot is not None:
            sql, args = sql + " WHERE slot=?", (slot,)
        with self._lock:
            rows = self.db.execute(sql + " ORDER BY rowid DESC LIMIT ?", (*args, limit)).fetchall()
        return [MessageRecord._from_row(r) for r in reversed(rows)]

    def counts(self) -> dict[str, int]:
        """Number of messages per state."""
        with self._lock:
            return dict(self.db.execute("SELECT state, COUNT(*) FROM messages GROUP BY state").fetchall())

    # -- tasks ---------------------------------------------------------------------------------

    def add_tasks(self, recs: list[TaskRecord]) -> tuple[list[TaskRecord], bool]:
        """Insert ``recs`` (one task, or the tasks of one broadcast) in one transaction.
        Returns ``(recs, True)``, or ``(existing, False)`` when the first one's
        ``idempotency_key`` is already journaled (then nothing is written; ``existing`` is that
        task, or every task of its group).

        Raises:
            JournalUnavailable: the journal cannot be written (nothing was written)."""
        rows = []
        for r in recs:
            r.updated = r.created
            rows.append(("INSERT INTO tasks(id, grp, selector, body, sender, idempotency_key, options, state, slot,"
                         " message_id, created, updated, deadline, result) VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                         (r.id, r.group, r.selector, r.body, r.sender, r.idempotency_key, json.dumps(r.options),
                          r.state, r.slot, r.message_id, r.created, r.updated, r.deadline,
                          json.dumps(r.result, default=str) if r.result else None)))
            rows.append(self._change(r.slot or "", "task", r.id, r.state,
                                     {"selector": r.selector, "group": r.group, "sender": r.sender,
                                      "key": r.idempotency_key, "bytes": len(r.body.encode())}, r.created))
        try:
            self._write(rows)
        except sqlite3.IntegrityError:
            key = recs[0].idempotency_key if recs else None
            existing = self.task_by_key(key) if key else None
            if existing is None:
                raise
            return (self.tasks_of_group(existing.group) if existing.group else [existing]), False
        return recs, True

    def set_task(self, rec: TaskRecord, state: str, *, result: dict[str, Any] | None = None, defer: bool = False,
                 **data: Any) -> bool:
        """Move task ``rec`` to ``state`` (its ``slot``, ``message_id`` and ``options`` as set on the object) and
        append the change with ``data`` (``code``, ``detail``...). Returns and raises as :meth:`set_state`."""
        now = time.time()
        rec.state, rec.updated = state, now
        if result is not None:
            rec.result = result
        data = {k: v for k, v in data.items() if v not in (None, "")}
        return self._write([
            ("UPDATE tasks SET state=?, slot=?, message_id=?, options=?, updated=?, result=COALESCE(?, result)"
             " WHERE id=?",
             (state, rec.slot, rec.message_id, json.dumps(rec.options), now,
              json.dumps(result, default=str) if result is not None else None, rec.id)),
            self._change(rec.slot or "", "task", rec.id, state, data, now),
        ], defer=defer)

    def _tasks(self, where: str, args: tuple[Any, ...]) -> list[TaskRecord]:
        with self._lock:
            rows = self.db.execute(f"SELECT * FROM tasks {where}", args).fetchall()
        return [TaskRecord._from_row(r) for r in rows]

    def get_task(self, task_id: str) -> TaskRecord | None:
        found = self._tasks("WHERE id=?", (task_id,))
        return found[0] if found else None

    def task_by_key(self, key: str) -> TaskRecord | None:
        found = self._tasks("WHERE idempotency_key=?", (key,))
        return found[0] if found else None

    def tasks_of_group(self, group: str) -> list[TaskRecord]:
        """The tasks of broadcast ``group``, in the order they were created."""
        return self._tasks("WHERE grp=? ORDER BY rowid", (group,))

    def open_tasks(self) -> list[TaskRecord]:
        """Tasks in an open state (:data:`TASK_OPEN_STATES`), oldest first."""
        marks = ",".join("?" * len(TASK_OPEN_STATES))
        return self._tasks(f"WHERE state IN ({marks}) ORDER BY rowid", TASK_OPEN_STATES)

    def tasks(self, state: str | None = None, limit: int = 200) -> list[TaskRecord]:
        """The latest ``limit`` tasks (in ``state``), oldest first."""
        where, args = ("WHERE state=?", (state,)) if state else ("", ())
        return list(reversed(self._tasks(f"{where} ORDER BY rowid DESC LIMIT ?", (*args, limit))))

    def task_counts(self) -> dict[str, int]:
        """Number of tasks per state."""
        with self._lock:
            return dict(self.db.execute("SELECT state, COUNT(*) FROM tasks GROUP BY state").fetchall())

    # -- slots ---------------------------------------------------------------------------------

    def slot_event(self, slot: str, event: str, *, defer: bool = False, **data: Any) -> bool:
        """Append a slot lifecycle event (``started``, ``exited``, ``restarting``, ``crash-loop``,
        ``stopped``, ``sidecar-restarted``, ``server-lost``...). ``data`` must be JSON-serialisable.
        Returns and raises as :meth:`set_state`."""
        return self._write([self._change(slot, "slot", None, event, data, time.time())], defer=defer)

    def last_slot_event(self, slot: str, events: tuple[str, ...] | None = None) -> dict[str, Any] | None:
        """The latest slot event of ``slot`` (one of ``events`` when given):
        ``{"slot", "event", "at", "data"}``, or None."""
        sql, args = "SELECT * FROM changes WHERE slot=? AND kind='slot'", [slot]
        if events:
            sql += f" AND state IN ({','.join('?' * len(events))})"
            args += list(events)
        with self._lock:
            row = self.db.execute(sql + " ORDER BY seq DESC LIMIT 1", args).fetchone()
        return None if row is None else {"slot": row["slot"], "event": row["state"], "at": row["at"],
                                         "data": json.loads(row["data"])}

    def slot_events(self, slot: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
        """The latest ``limit`` slot events (of ``slot``), oldest first."""
        return self.history(slot, limit, kinds=("slot",))

    def history(self, slot: str | None = None, limit: int = 200,
                kinds: tuple[str, ...] = ("message", "task", "slot", "journal")) -> list[dict[str, Any]]:
        """The latest ``limit`` changes (of ``slot``), oldest first (``journal`` changes, which
        record an outage of the journal, have the slot ``""``). Each record:
        ``{"seq", "at" (Unix s), "tenant_id", "host", "slot", "kind", "id" (message or task id, or None),
        "state", "data"}``."""
        sql = f"SELECT * FROM changes WHERE kind IN ({','.join('?' * len(kinds))})"
        args: list[Any] = list(kinds)
        if slot is not None:
            sql += " AND slot=?"
            args.append(slot)
        with self._lock:
            rows = self.db.execute(sql + " ORDER BY seq DESC LIMIT ?", (*args, limit)).fetchall()
        return [self._record(r) for r in reversed(rows)]

    # -- retention -------------------------------------------------------------------------------

    def prune(self, before: float, batch: int = PRUNE_BATCH) -> dict[str, Any]:
        """Delete what finished before ``before`` (Unix s): messages in a final state
        (:data:`FINAL_STATES`) and tasks in a final state (:data:`TASK_FINAL_STATES`) last
        changed before it, with all their state changes, and slot events older than it except
        the latest of each event per slot (the supervisor reads them: an operator ``stopped``
        stays stopped). Unfinished messages and tasks, and a message an unfinished task refers
        to, are never deleted. Works in transactions of ``batch`` rows, so a router writing at
        the same time waits at most one batch. A journal created with incremental auto-vacuum
        (every journal created by this version) gives the freed pages back to the file system;
        an older one keeps them for new rows (its file stops growing but does not shrink).

        Returns ``{"before", "messages", "tasks", "changes", "slot_events", "bytes_before",
        "bytes_after"}`` (counts of deleted rows; ``changes`` counts the messages' and tasks'
        state changes; sizes of the database file plus its WAL).

        Raises:
            sqlite3.Error: the journal cannot be written (read-only, disk full); what was already
                deleted stays deleted (every batch is a complete transaction).
        """
        out: dict[str, Any] = {"before": before, "messages": 0, "tasks": 0, "changes": 0, "slot_events": 0,
                               "bytes_before": self.size_bytes()}
        final = ",".join("?" * len(FINAL_STATES))
        task_final = ",".join("?" * len(TASK_FINAL_STATES))
        task_open = ",".join("?" * len(TASK_OPEN_STATES))
        pick_messages = (f"SELECT id FROM messages WHERE state IN ({final}) AND updated < ? AND id NOT IN "
                         f"(SELECT message_id FROM tasks WHERE state IN ({task_open}) AND message_id IS NOT NULL) "
                         "LIMIT ?", (*FINAL_STATES, before, *TASK_OPEN_STATES))
        pick_tasks = (f"SELECT id FROM tasks WHERE state IN ({task_final}) AND updated < ? LIMIT ?",
                      (*TASK_FINAL_STATES, before))
        for table, kind, (sql, args) in (("messages", "message", pick_messages), ("tasks", "task", pick_tasks)):
            while True:
                with self._lock:
                    self.db.execute("BEGIN IMMEDIATE")
                    try:
                        ids = [r[0] for r in self.db.execute(sql, (*args, batch)).fetchall()]
                        if ids:
                            marks = ",".join("?" * len(ids))
                            out["changes"] += self.db.execute(
                                f"DELETE FROM changes WHERE ref IN ({marks}) AND kind=?", (*ids, kind)).rowcount
                            out[table] += self.db.execute(f"DELETE FROM {table} WHERE id IN ({marks})", ids).rowcount
                    except BaseException:
                        self.db.execute("ROLLBACK")
                        raise
                    self.db.execute("COMMIT")
                if len(ids) < batch:
                    break
        with self._lock:  # a read: WAL readers never wait for the router
            old_events = [r[0] for r in self.db.execute(
                "SELECT seq FROM changes WHERE kind='slot' AND at < ? AND seq NOT IN "
                "(SELECT MAX(seq) FROM changes WHERE kind='slot' GROUP BY slot, state)", (before,)).fetchall()]
        for i in range(0, len(old_events), batch):
            chunk = old_events[i:i + batch]
            self._write([(f"DELETE FROM changes WHERE seq IN ({','.join('?' * len(chunk))})", tuple(chunk))])
            out["slot_events"] += len(chunk)
        self._give_back_pages()
        out["bytes_after"] = self.size_bytes()
        return out

    def _give_back_pages(self, pages: int = 500) -> None:
        """Return free pages to the file system (incremental auto-vacuum only; ``pages`` per
        transaction), then checkpoint the WAL so the database file really shrinks."""
        with self._lock:
            incremental = self.db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
        while incremental:
            with self._lock:
                free = self.db.execute("PRAGMA freelist_count").fetchone()[0]
                if not free:
                    break
                # through sqlite3_exec: the sqlite3 module's execute() steps this pragma once (one page)
                self.db.executescript(f"PRAGMA incremental_vacuum({min(free, pages)});")
            if free <= pages:
                break
        with self._lock:
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    def size_bytes(self) -> int:
        """Bytes on disk of the journal: the database file and its WAL."""
        total = 0
        for p in (self.path, self.path.with_name(self.path.name + "-wal")):
            try:
                total += p.stat().st_size
            except OSError:
                pass
        return total
