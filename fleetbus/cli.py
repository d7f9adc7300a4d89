"""The ``fleet`` command: a thin shell over the client, router and agents APIs.

Exit codes (stable):

====  =====================================================================================
0     success; ``send``: ``accepted``, ``queued`` (held by the busy runtime's TUI, use ``--wait
      accepted`` to wait until the runtime takes it; or held by fleetbus's journal: ``--no-wait``,
      or ``--when available`` while the slot is down), or ``injected`` without ``--verify``
1     ``send``: ``draft`` or ``unconfirmed``; ``reset`` not confirmed; ``interrupt``: still busy;
      ``publish``: a task ``timed-out`` (no free slot within ``--wait-s``, or not done within
      ``--timeout``); another command could not finish its work
2     usage or configuration error (bad arguments, invalid roster, unreadable input); an
      unsafe state or runtime directory or socket (a symlink, owned by another user, or
      writable by group/world, e.g. a planted ``/tmp/fleetbus-<uid>``): every command (and the router
      and sidecar daemons) refuses it, and the message names the path and the fix
3     rejected: unknown slot, slot not running or dead, invalid message, busy input line,
      not at its prompt, ``reset`` during a turn, idempotency key reused for another message, a
      limit (``queue-full``, ``rate-limited``; nothing journaled), the journal cannot be written
      (``journal-unavailable``: a full disk; nothing was journaled or typed; ``fleet ps`` and
      ``fleet doctor`` say so; send again once it is fixed); ``send``: ``dead-letter`` (its TTL
      ended before the slot was available); ``publish``: a task ``failed`` (``no-match``: the
      selector names no slot; ``slot-died``; ``delivery``), or an invalid body,
      ``journal-unavailable``, ``too-many-tasks`` or ``rate-limited`` (nothing was created); a
      bad selector is a usage error (2)
4     the router is not running or does not answer
====  =====================================================================================

``doctor``: 1 when a check fails (a broken invariant; warnings alone exit 0). ``init``: 3 when
``--write`` names an existing file. ``install-systemd``: 1 when a step is left for the operator
(no systemd user manager, linger needs root; the commands are printed), 3 when a unit file of
that name was not written by fleetbus (nothing changed); ``uninstall-systemd`` likewise 3.

``keys``: 2 for an invalid key name, ``create`` without ``--slots`` or with a slot not in the
roster, or an unreadable or unsafe key file; 3 when ``revoke`` names
no key or ``create`` a name already used (nothing is changed). ``sidecar``: 2 when a ``tcp://``
router lacks ``--key``/``--router-key`` or a key file is unreadable.

``hook`` always exits 0 (an exit code would disturb the runtime's prompt); when its socket is
refused as unsafe it sends nothing and says why on stderr.

Imports are deferred into each command so ``fleet hook`` (run by runtime hooks on every prompt)
starts without loading pydantic or ZeroMQ.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_REJECTED, EXIT_NO_ROUTER = 0, 1, 2, 3, 4


class CliError(Exception):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def _emit_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _fleet(args: argparse.Namespace):
    from fleetbus.config import RosterError, find_roster, load_roster

    try:
        return load_roster(find_roster(args.roster))
    except RosterError as e:
        raise CliError(str(e), EXIT_USAGE) from None


def _paths(fleet):
    from fleetbus.paths import PathError, fleet_paths

    p = fleet_paths(fleet.tenant, fleet.roster.transport.socket)
    try:
        p.ensure()
    except PathError as e:
        raise CliError(str(e), EXIT_USAGE) from None
    return p


def _run(coro_fn, *a):
    import anyio

    from fleetbus.client import RouterUnavailable

    try:
        return anyio.run(coro_fn, *a, backend="asyncio")
    except RouterUnavailable as e:
        raise CliError(str(e), EXIT_NO_ROUTER) from None


#: request field -> the option that sets it, for errors about a request built from bad options
_OPTION_OF = {"timeout_s": "--timeout", "ttl_s": "--ttl", "sender": "--from", "idempotency_key": "--key",
              "to": "SLOT", "slot": "SLOT"}


def _client_call(fleet, fn):
    from pydantic import ValidationError

    from fleetbus.client import RouterUnavailable, SyncClient

    try:
        return SyncClient(fleet).call(fn)
    except RouterUnavailable as e:
        raise CliError(str(e), EXIT_NO_ROUTER) from None
    except ValidationError as e:  # the request could not even be built: nothing was sent
        err = e.errors(include_url=False)[0]
        field = ".".join(map(str, err["loc"]))
        raise CliError(f"{_OPTION_OF.get(field, field)}: {err['msg']} (got {err.get('input')!r}); nothing was sent",
                       EXIT_USAGE) from None


def _slot_checked(fleet, slot: str) -> None:
    if slot not in fleet.slots:
        raise CliError(f"unknown slot {slot!r}; roster slots: {', '.join(fleet.slots) or '(none)'}", EXIT_REJECTED)


# -- commands -------------------------------------------------------------------------------------


def cmd_hook(args: argparse.Namespace) -> int:
    """Forward a runtime hook event to the slot's sidecar. Always exits 0 and prints nothing on
    stdout (Gemini CLI reads hook stdout as JSON): a hook never fails or blocks its runtime (an
    exit 2 would block the prompt in Claude Code). A hook socket refused as unsafe (planted,
    another user's, a directory others may write to) is reported on stderr."""
    from fleetbus.agents.hook import parse_payload, send_hook

    prompt, session, source = "", None, ""
    if not sys.stdin.isatty():
        try:
            prompt, session, source = parse_payload(sys.stdin.read(4 * 1024 * 1024))
        except (OSError, UnicodeDecodeError):
            pass
    send_hook(args.event, prompt=prompt, session_id=args.session_id or session, source=source,
              on_refused=lambda why: print(f"fleet hook: {why}; nothing was sent", file=sys.stderr))
    return EXIT_OK


def _setup_logging(args: argparse.Namespace, fleet, fmt: str) -> None:
    """The daemon's logging: ``--log-file`` rotated at the roster's ``bus.log_max_bytes`` ×
    ``bus.log_backups`` (standard output and error included), else standard error."""
    from fleetbus.logs import setup_logging

    bus = fleet.roster.bus
    try:
        setup_logging(args.log_level, fmt, args.log_file, bus.log_max_bytes, bus.log_backups)
    except OSError as e:
        raise CliError(f"cannot open log file {args.log_file}: {e.strerror or e}", EXIT_USAGE) from None


def cmd_router(args: argparse.Namespace) -> int:
    import anyio

    from fleetbus.router.server import Router, RouterAlreadyRunning, RouterBindError

    from fleetbus.notify import ServiceNotifier

    notifier = ServiceNotifier()  # before anything is spawned: children must not inherit $NOTIFY_SOCKET
    fleet = _fleet(args)
    _paths(fleet)
    _setup_logging(args, fleet, "%(asctime)s %(name)s %(levelname)s %(message)s")
    router = Router(fleet)

    async def main():
        import signal

        ready = anyio.Event()
        async with anyio.create_task_group() as tg:
            async def on_signals():
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                    async for _ in sigs:
                        notifier.status("stopping (slots and sidecars keep running)")
                        router.stop()
                        return

            async def on_ready():
                await ready.wait()  # bound, slots started, serving requests
                notifier.ready(f"serving {len(fleet.slots)} slot(s) of tenant {fleet.tenant}")
                await notifier.keepalive()

            tg.start_soon(on_signals)
            tg.start_soon(on_ready)
            await router.serve(ready=ready)
            tg.cancel_scope.cancel()

    try:
        anyio.run(main, backend="asyncio")
    except* (RouterAlreadyRunning, RouterBindError) as group:
        raise CliError(str(group.exceptions[0]), EXIT_FAIL) from None
    return EXIT_OK


def cmd_holder(args: argparse.Namespace) -> int:
    """The holder unit's main process: keep the fleet's tmux server and its ``_holder`` session.

    Exits 0 on SIGTERM/SIGINT (the server and slots keep running) and 1 when the session or the
    server ended (systemd's ``Restart=on-failure`` then starts it again).
    """
    import logging
    import signal

    import anyio

    from fleetbus.notify import ServiceNotifier
    from fleetbus.router.server import make_transport
    from fleetbus.transports.base import TransportError

    notifier = ServiceNotifier()
    fleet = _fleet(args)
    paths = _paths(fleet)
    logging.basicConfig(level="INFO", format="%(asctime)s fleetbus.holder %(levelname)s %(message)s")
    log = logging.getLogger("fleetbus.holder")
    transport = make_transport(fleet, paths)
    if not hasattr(transport, "hold"):
        raise CliError(f"transport {fleet.roster.transport.kind!r} has no server to hold", EXIT_USAGE)
    ended: list[str] = []

    async def main():
        async with anyio.create_task_group() as tg:
            async def on_signals():
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                    async for _ in sigs:
                        tg.cancel_scope.cancel()

            async def hold():
                def ready():
                    log.info("holding tmux socket %s (session _holder)", paths.tmux_socket)
                    notifier.ready(f"holding tmux socket {paths.tmux_socket}")

                ended.append(await transport.hold(ready))
                tg.cancel_scope.cancel()

            tg.start_soon(on_signals)
            tg.start_soon(hold)

    try:
        anyio.run(main, backend="asyncio")
    except TransportError as e:
        raise CliError(f"cannot start tmux server {paths.tmux_socket}: {e}", EXIT_FAIL) from None
    if ended:
        log.warning("%s; exiting 1 so the service manager starts the holder again", ended[0])
        return EXIT_FAIL
    log.info("stopped; the tmux server and its slots keep running")
    return EXIT_OK


def cmd_sidecar(args: argparse.Namespace) -> int:
    import anyio

    from fleetbus.agents.sidecar import Sidecar

    fleet = _fleet(args)
    _slot_checked(fleet, args.slot)
    curve = None
    if args.router and args.router.startswith("tcp://") or args.key or args.router_key:
        from fleetbus.keys import KeysError, load_public, load_secret

        if not (args.router and args.key and args.router_key):
            raise CliError("a tcp:// router needs all of --router tcp://HOST:PORT, --key FILE (this sidecar's "
                           ".key_secret from `fleet keys create`) and --router-key FILE (the router's router.key)",
                           EXIT_USAGE)
        try:
            public, secret = load_secret(args.key)
            curve = (public, secret, load_public(args.router_key))
        except KeysError as e:
            raise CliError(str(e), EXIT_USAGE) from None
    _setup_logging(args, fleet, f"%(asctime)s sidecar[{args.slot}] %(levelname)s %(message)s")
    anyio.run(Sidecar(fleet, args.slot, router=args.router, curve=curve).run, backend="asyncio")
    return EXIT_OK


def cmd_keys(args: argparse.Namespace) -> int:
    """``fleet keys init|create NAME --slots A,B|list|revoke NAME``: CURVE keys of the tcp endpoint,
    each client key bound to the slots it may serve; ``revoke`` also asks a running router to
    drop the key's live connections (``dropped`` in ``--json``: ``[{"slot", "key"}]``, or null
    when no router runs)."""
    from fleetbus import keys

    if args.name and args.action in ("init", "list"):
        raise CliError(f"`fleet keys {args.action}` takes no NAME", EXIT_USAGE)
    fleet = _fleet(args)
    paths = _paths(fleet)
    try:
        if args.action == "init":
            info, created = keys.init_router_keys(paths)
            out = {"created": created, **info.to_json()}
            text = (f"router key {'created' if created else 'already present'}: {info.public_file}\n"
                    f"public key {info.public_key}\n"
                    f"copy {info.public_file} to each remote machine (fleet sidecar --router-key)")
        elif args.action == "create":
            if not args.name:
                raise CliError("`fleet keys create` needs a NAME", EXIT_USAGE)
            slots = [n for n in (args.slots or "").split(",") if n]
            if not slots:
                raise CliError("`fleet keys create NAME --slots a,b`: a client key serves the slots named there only",
                               EXIT_USAGE)
            unknown = [n for n in slots if n not in fleet.slots]
            if unknown:
                raise CliError(f"--slots names {', '.join(unknown)}, not in the roster (slots: "
                               f"{', '.join(fleet.slots) or '(none)'})", EXIT_USAGE)
            router, _ = keys.init_router_keys(paths)
            info = keys.create_client(paths, args.name, slots)
            endpoint = fleet.roster.bus.tcp or "tcp://HOST:PORT"
            out = {**info.to_json(), "router_public_file": router.public_file, "router_endpoint": fleet.roster.bus.tcp}
            text = (f"client key {info.name!r} created and allowed for slot(s) {', '.join(info.slots)} "
                    f"(public key {info.public_key})\n"
                    f"secret: {info.secret_file}\n"
                    f"copy to the remote machine, keeping the secret private (chmod 600):\n"
                    f"  {info.secret_file}\n  {router.public_file}\n"
                    f"then run there: fleet sidecar SLOT --router {endpoint} --key {info.name}.key_secret "
                    f"--router-key router.key"
                    + ("" if fleet.roster.bus.tcp else "\n(set bus.tcp in the roster so the router listens on tcp)"))
        elif args.action == "revoke":
            if not args.name:
                raise CliError("`fleet keys revoke` needs a NAME", EXIT_USAGE)
            info, changed = keys.revoke_client(paths, args.name)
            dropped = _drop_revoked_connections(fleet, paths) if changed else None
            out = {"changed": changed, "dropped": dropped, **info.to_json()}
            text = (f"client key {info.name!r} " + ("revoked: new connections with it are refused; its secret was "
                                                  "deleted" if changed else "was already revoked"))
            if dropped:
                text += "\nlive connections dropped: " + ", ".join(f"{d['slot']} (key {d['key']})" for d in dropped)
        else:
            router, clients = keys.list_keys(paths)
            out = {"tenant_id": fleet.tenant, "tcp": fleet.roster.bus.tcp, "keys_dir": str(paths.keys_dir),
                   "router": router.to_json() if router else None, "clients": [c.to_json() for c in clients]}
            from tabulate import tabulate

            rows = [["router", "router", router.public_key, router.public_file]] if router else []
            rows += [[c.name, c.status, ",".join(c.slots) or "(none)", c.public_key, c.secret_file or "-"]
                     for c in clients]
            if router:
                rows[0].insert(2, "-")
            head = ["NAME", "STATUS", "SLOTS", "PUBLIC KEY", "COPY TO THE REMOTE MACHINE"]
            text = tabulate(rows, headers=head, tablefmt="plain") if rows else "no keys (run `fleet keys init`)"
    except keys.KeysError as e:
        raise CliError(str(e), EXIT_REJECTED if e.kind in ("unknown", "exists") else EXIT_USAGE) from None
    if args.json:
        _emit_json(out)
    else:
        print(text)
    return EXIT_OK


def _drop_revoked_connections(fleet: Any, paths: Any) -> list[dict[str, str]] | None:
    """Ask a running router to drop the live connections of revoked keys; None when no router
    runs (it refuses the key on its next handshake or frame anyway)."""
    from fleetbus.client import RequestFailed, RouterUnavailable, SyncClient

    if not paths.router_running():
        return None
    try:
        return SyncClient(fleet, paths, connect_timeout_s=3.0).call(lambda c: c.reload_keys())["dropped"]
    except (RouterUnavailable, RequestFailed) as e:
        print(f"fleet: the router did not confirm dropping the key's connections ({e}); it refuses the key's "
              "next frame", file=sys.stderr)
        return None


def cmd_up(args: argparse.Namespace) -> int:
    from fleetbus import ops

    fleet = _fleet(args)
    paths = _paths(fleet)
    try:
        res = ops.up(fleet, paths, timeout_s=args.timeout)
    except ops.OpsError as e:
        raise CliError(str(e), EXIT_FAIL) from None
    if args.json:
        _emit_json({"router_started": res.started, "via": res.via, "detail": res.detail,
                    "handed_over": res.handed_over, "slots": [r.model_dump(by_alias=True) for r in res.rows]})
    else:
        if res.handed_over:
            print(f"router pid {res.handed_over} ran outside systemd: stopped it (slots kept running)")
        what = "router started" if res.started else "router already running"
        print(f"{what} (supervisor: {res.via}; {res.detail})")
        print(ops.render_ps(res.rows, _boot_footer(fleet, paths, res.rows)))
    return EXIT_OK


def cmd_down(args: argparse.Namespace) -> int:
    from fleetbus import ops

    fleet = _fleet(args)
    summary = ops.down(fleet, _paths(fleet))
    left = summary["leftovers"]
    if args.json:
        _emit_json(summary)
    else:
        print(f"fleet of tenant {fleet.tenant!r} is down ({summary['via']})")
        if left:
            print(f"{len(left)} process(es) of the fleet outlived the teardown; ended by pid:", file=sys.stderr)
            for p in left:
                state = (f"STILL RUNNING (last signal: {p['signal'] or 'none, not permitted'})" if p["running"]
                         else f"ended with {p['signal'] or 'no signal'}")
                print(f"  pid {p['pid']} ({p['role']}) {state}: {p['cmdline'][:120]}", file=sys.stderr)
    return EXIT_FAIL if any(p["running"] for p in left) else EXIT_OK


def _boot_footer(fleet, paths, rows) -> list[str]:
    """Why the fleet would not survive a reboot, read again only when ``ops.ps`` flagged it."""
    from fleetbus import ops

    return ops.boot_problems(fleet, paths) if any("BOOT-ENABLE" in r.flags for r in rows) else []


def cmd_ps(args: argparse.Namespace) -> int:
    from fleetbus import ops

    fleet = _fleet(args)
    paths = _paths(fleet)
    rows = ops.ps(fleet, paths)
    if args.json:
        _emit_json([r.model_dump(by_alias=True) for r in rows])
    else:
        print(ops.render_ps(rows, _boot_footer(fleet, paths, rows)))
    return EXIT_OK


#: Most bytes ``send`` reads from ``-f``/stdin: twice the largest ``bus.max_body_bytes`` (1 MiB),
#: since CRLF -> LF can at most halve a body; anything longer is over every roster's limit.
MAX_READ_BYTES = 2 * 1_048_576


def _read_body(args: argparse.Namespace) -> str:
    """The message text of ``send``: ``-m``, ``-f FILE`` or stdin, as UTF-8.

    Only what cannot reach the router is decided here: unreadable input (exit 2), bytes that
    are not UTF-8 and input over :data:`MAX_READ_BYTES` (exit 3, nothing sent). Every other body
    rule (size limit, control characters) is the router's :func:`fleetbus.protocol.check_body`,
    whose rejection prints like any SEND result.
    """
    if args.message is not None:
        try:  # argv bytes that are not UTF-8 arrive as surrogateescape code points: get the bytes back
            data = os.fsencode(args.message)
        except UnicodeEncodeError as e:
            raise CliError(f"message is not UTF-8 (lone surrogate at offset {e.start}); nothing was sent",
                           EXIT_REJECTED) from None
    else:
        try:
            if args.file:
                with open(args.file, "rb") as f:
                    data = f.read(MAX_READ_BYTES + 1)
            elif not sys.stdin.isatty():
                data = sys.stdin.buffer.read(MAX_READ_BYTES + 1)
            else:
                raise CliError("no message: give -m TEXT, -f FILE, or pipe it on stdin", EXIT_USAGE)
        except OSError as e:
            raise CliError(f"cannot read message: {e}", EXIT_USAGE) from None
    if len(data) > MAX_READ_BYTES:
        raise CliError(f"message is over {MAX_READ_BYTES} bytes, more than any roster allows (bus.max_body_bytes, "
                       "at most 1048576 bytes); nothing was sent", EXIT_REJECTED)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CliError(f"message is not UTF-8 (byte 0x{data[e.start]:02X} at offset {e.start}: {e.reason}); "
                       "nothing was sent", EXIT_REJECTED) from None



def cmd_send(args: argparse.Namespace) -> int:
    fleet = _fleet(args)
    body = _read_body(args)
    _slot_checked(fleet, args.slot)
    from fleetbus.client import RequestFailed

    try:
        r = _client_call(fleet, lambda c: c.send(args.slot, body, verify=args.verify, timeout_s=args.timeout,
                                                  sender=args.sender, on_busy_input=args.on_busy_input,
                                                  wait=args.wait, idempotency_key=args.key, when=args.when,
                                                  ttl_s=args.ttl, detach=args.no_wait))
    except RequestFailed as e:  # too large to send, or the router could not read it: nothing was typed
        raise CliError(f"{e} [{e.code}]", EXIT_REJECTED) from None
    if args.json:
        _emit_json(r.model_dump())
    else:
        ev = f" ({r.evidence})" if r.evidence else ""
        code = f" [{r.code}]" if r.code else ""
        detail = f": {r.detail}" if r.detail else ""
        held = f" (held by {r.held_by})" if r.held_by else ""
        dup = " [duplicate: not typed again]" if r.duplicate else ""
        if not r.journaled and r.result != "rejected":
            dup += " [not journaled yet: kept in the router's memory until the journal can be written]"
        print(f"{r.slot}: {r.result}{ev}{held}{code}{dup} in {r.latency_ms:.1f} ms{detail}"
              + (f"  id={r.id}" if r.id else ""))
    return {"accepted": EXIT_OK, "queued": EXIT_OK, "injected": EXIT_OK, "rejected": EXIT_REJECTED,
            "dead-letter": EXIT_REJECTED}.get(r.result, EXIT_FAIL)


def _read_journal(args: argparse.Namespace, fleet, read):
    """``read(journal)`` on the tenant's journal, opened read-only (works while the router is
    down). None when there is no journal yet: then ``[]`` was printed (``--json``) or the reason
    went to stderr."""
    import socket

    from fleetbus.router.journal import Journal, JournalError

    try:
        j = Journal(_paths(fleet).journal, readonly=True, tenant=fleet.tenant, host=socket.gethostname())
    except JournalError as e:
        if args.json:
            _emit_json([])
        else:
            print(f"fleet: {e}", file=sys.stderr)
        return None
    try:
        return read(j)
    finally:
        j.close()


def _prune_journal(args: argparse.Namespace, fleet) -> int:
    """``fleet log --prune``: delete what finished more than ``--older-than`` days ago (default:
    the roster's ``bus.retention_days``) and print what was removed."""
    import datetime
    import socket
    import sqlite3
    import time

    from fleetbus.router.journal import Journal, JournalError

    if args.slot is not None or args.id is not None:
        raise CliError("--prune works on the whole journal; it takes no SLOT or --id", EXIT_USAGE)
    days = fleet.roster.bus.retention_days if args.older_than is None else args.older_than
    if args.older_than is None and days == 0:
        raise CliError("bus.retention_days is 0 (keep everything): pass --older-than DAYS", EXIT_USAGE)
    if not 0 <= days <= 36_500:
        raise CliError(f"--older-than: expected 0 to 36500 days (got {days:g})", EXIT_USAGE)
    path = _paths(fleet).journal
    if not path.exists():
        report = {"before": time.time() - days * 86400, "messages": 0, "tasks": 0, "changes": 0, "slot_events": 0,
                  "bytes_before": 0, "bytes_after": 0}
    else:
        try:
            j = Journal(path, tenant=fleet.tenant, host=socket.gethostname())
        except JournalError as e:
            raise CliError(str(e), EXIT_FAIL) from None
        try:
            report = j.prune(time.time() - days * 86400)
        except sqlite3.Error as e:
            raise CliError(f"cannot prune {path}: {e}", EXIT_FAIL) from None
        finally:
            j.close()
    report = {"tenant_id": fleet.tenant, "journal": str(path), "older_than_days": days, **report}
    if args.json:
        _emit_json(report)
        return EXIT_OK
    when = datetime.datetime.fromtimestamp(report["before"]).strftime("%Y-%m-%d %H:%M:%S")
    print(f"pruned {path}: what finished before {when} ({days:g} days): {report['messages']} messages and "
          f"{report['tasks']} tasks (with their {report['changes']} state changes), {report['slot_events']} slot "
          f"events; {report['bytes_before']:,} -> {report['bytes_after']:,} bytes")
    return EXIT_OK


def cmd_log(args: argparse.Namespace) -> int:
    """History from the journal, read directly (works while the router is down); ``--prune``
    deletes what finished long ago."""
    fleet = _fleet(args)
    if args.prune:
        return _prune_journal(args, fleet)
    if args.slot is not None and args.slot not in fleet.slots:
        _slot_checked(fleet, args.slot)
    rows = _read_journal(args, fleet, lambda j: j.changes_of(args.id) if args.id else j.history(args.slot, args.lines))
    if rows is None:
        return EXIT_OK
    if args.json:
        _emit_json(rows)
        return EXIT_OK
    import datetime

    from tabulate import tabulate

    def what(r: dict) -> str:
        d = r["data"]
        keys = ("selector", "evidence", "code", "held_by", "exit_status", "signal", "duration_s", "backoff_s", "restarts", "reason",
                "pid", "by")
        parts = [f"{k}={d[k]}" for k in keys if d.get(k) is not None]
        if d.get("detail"):
            parts.append(str(d["detail"]))
        if d.get("last_lines"):
            parts.append("last: " + " | ".join(str(x) for x in d["last_lines"][-3:]))
        return "  ".join(parts)

    table = [[datetime.datetime.fromtimestamp(r["at"]).strftime("%H:%M:%S.%f")[:-3], r["slot"] or "-",
              r["id"] or f"({r['kind']})", r["state"], what(r)[:160]] for r in rows]
    print(tabulate(table, headers=["TIME", "SLOT", "ID", "STATE", "DETAIL"], tablefmt="plain"))
    return EXIT_OK


#: publish: task state -> exit code (the requested stage reached: 0)
_TASK_EXIT = {"published": EXIT_OK, "assigned": EXIT_OK, "accepted": EXIT_OK, "done": EXIT_OK,
              "timed-out": EXIT_FAIL, "failed": EXIT_REJECTED}


def _task_line(t) -> str:
    where = f" on {t.slot}" if t.slot else ""
    code = f" [{t.code}]" if t.code else ""
    took = f" in {t.done_ms / 1000:.2f} s" if t.done_ms is not None else ""
    detail = f": {t.detail}" if t.detail and t.state in ("failed", "timed-out") else ""
    dup = " [duplicate: nothing new was created]" if t.duplicate else ""
    return f"{t.id} {t.state}{where}{code}{took}{dup}{detail}"


def cmd_publish(args: argparse.Namespace) -> int:
    fleet = _fleet(args)
    body = _read_body(args)
    from fleetbus.client import RequestFailed

    try:
        r = _client_call(fleet, lambda c: c.publish(args.to, body, wait=args.wait, wait_s=args.wait_s,
                                                     timeout_s=args.timeout, allow_busy=args.allow_busy,
                                                     sender=args.sender, idempotency_key=args.key))
    except RequestFailed as e:  # nothing was created
        code = EXIT_USAGE if e.code == "bad-selector" else EXIT_REJECTED
        raise CliError(f"{e} [{e.code}]", code) from None
    tasks = r if isinstance(r, list) else [r]
    if args.json:
        _emit_json([t.model_dump() for t in tasks] if isinstance(r, list) else r.model_dump())
    else:
        for t in tasks:
            print(_task_line(t))
    return max(_TASK_EXIT[t.state] for t in tasks)


def cmd_tasks(args: argparse.Namespace) -> int:
    """Tasks from the journal, read directly (works while the router is down)."""
    import sqlite3

    def read(j):
        try:
            return j.tasks(args.state, args.lines)
        except sqlite3.OperationalError as e:  # a journal written before tasks existed has no tasks table
            if "no such table" not in str(e):
                raise
            return []

    recs = _read_journal(args, _fleet(args), read)
    if recs is None:
        return EXIT_OK
    rows = [dict(rec.result or {}, id=rec.id, state=rec.state, slot=rec.slot, selector=rec.selector,
                 group=rec.group, message_id=rec.message_id, created=rec.created) for rec in recs]
    if args.json:
        _emit_json(rows)
        return EXIT_OK
    import datetime

    from tabulate import tabulate

    table = [[datetime.datetime.fromtimestamp(r["created"]).strftime("%H:%M:%S"), r["id"], r["selector"],
              r["slot"] or "-", r["state"], r.get("code") or "",
              f"{r['done_ms'] / 1000:.2f}" if r.get("done_ms") is not None else "",
              (r.get("detail") or "")[:80] if r["state"] in ("failed", "timed-out") else ""] for r in rows]
    print(tabulate(table, headers=["CREATED", "TASK", "SELECTOR", "SLOT", "STATE", "CODE", "TOOK_S", "DETAIL"],
                   tablefmt="plain"))
    return EXIT_OK


def cmd_events(args: argparse.Namespace) -> int:
    """Stream the router's events until interrupted (exit 0 on Ctrl-C / SIGINT / SIGTERM)."""
    import signal

    fleet = _fleet(args)
    from fleetbus.client import Client

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM ends it like Ctrl-C

    async def main():
        async with Client(fleet) as c:
            async with c.events(kinds=args.kind, slot=args.slot) as events:
                last = None
                async for ev in events:
                    if last is not None and ev.seq > last + 1 and not args.kind and not args.slot:
                        print(f"fleet: missed {ev.seq - last - 1} event(s)", file=sys.stderr)
                    last = ev.seq
                    if args.json:
                        print(json.dumps(ev.model_dump(exclude={"v", "kind"}), default=str), flush=True)
                    else:
                        print(_event_line(ev), flush=True)

    try:
        _run(main)
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def _event_line(ev) -> str:
    import datetime

    d = dict(ev.data)
    when = datetime.datetime.fromtimestamp(ev.at).strftime("%H:%M:%S.%f")[:-3]
    if ev.topic == "task":
        head = f"{d.pop('id', '')} {d.pop('state', '')}"
        keep = ("selector", "code", "detail", "message_id")
    elif ev.topic == "message":
        head = f"{d.pop('id', '')} {d.pop('state', '')}"
        keep = ("evidence", "code", "held_by", "detail")
    elif ev.topic == "slot":
        head = str(d.pop("event", ""))
        keep = tuple(k for k in d if k != "last_lines")
    else:
        head = str(d.pop("state", d.pop("event", "")))
        keep = tuple(d)
    rest = " ".join(f"{k}={d[k]}" for k in keep if d.get(k) not in (None, "", []))
    return f"{when} {ev.topic:<9} {ev.slot or '-':<12} {head} {rest}".rstrip()


def cmd_slot_op(args: argparse.Namespace) -> int:
    from fleetbus.client import RequestFailed

    fleet = _fleet(args)
    _slot_checked(fleet, args.slot)
    kind = args.command.upper()
    try:
        data = _client_call(fleet, lambda c: c.slot_op(kind, args.slot, getattr(args, "timeout", None)))
    except RequestFailed as e:
        code = EXIT_REJECTED if e.code in ("unknown-slot", "slot-down", "slot-dead", "no-reset", "no-prompt", "busy",
                                           "already-running") else EXIT_FAIL
        if args.json:
            _emit_json({"slot": args.slot, "ok": False, "code": e.code, "error": str(e)})
            return code
        raise CliError(str(e), code) from None
    ok = data.get("confirmed", True)
    if args.json:
        _emit_json({"ok": ok, **data})
    else:
        print(f"{args.slot}: {args.command} {'ok' if ok else 'NOT CONFIRMED'} "
              + " ".join(f"{k}={v}" for k, v in data.items() if k != "slot"))
    return EXIT_OK if ok else EXIT_FAIL


def _tmux(fleet, paths):
    from fleetbus.transports.tmux import TmuxTransport

    if fleet.roster.transport.kind != "tmux":
        raise CliError(f"transport {fleet.roster.transport.kind!r} has no terminal to show", EXIT_USAGE)
    return TmuxTransport(paths.tmux_socket, fleet.roster.transport.width, fleet.roster.transport.height)


def cmd_tail(args: argparse.Namespace) -> int:
    from fleetbus.transports.base import SlotNotFound

    fleet = _fleet(args)
    _slot_checked(fleet, args.slot)
    t = _tmux(fleet, _paths(fleet))
    try:
        text = _run(lambda: t.capture(args.slot, lines=args.lines))
    except SlotNotFound:
        raise CliError(f"slot {args.slot!r} is not running", EXIT_REJECTED) from None
    if args.json:
        _emit_json({"tenant_id": fleet.tenant, "slot": args.slot, "lines": text.split("\n")})
    else:
        print(text)
    return EXIT_OK


def cmd_view(args: argparse.Namespace) -> int:
    from fleetbus.transports.base import TransportError

    fleet = _fleet(args)
    _slot_checked(fleet, args.slot)
    t = _tmux(fleet, _paths(fleet))
    if not sys.stdin.isatty():
        raise CliError(f"`fleet {args.command}` needs a terminal", EXIT_USAGE)
    try:
        return t.watch(args.slot) if args.command == "watch" else t.attach(args.slot)
    except TransportError as e:
        raise CliError(f"slot {args.slot!r} is not running ({e})", EXIT_REJECTED) from None


def _systemd_report(args: argparse.Namespace, rep, verb: str) -> int:
    if args.json:
        _emit_json({"units": [{"name": u.name, "text": u.text} for u in rep.units],
                    "written": [str(p) for p in rep.written], "unchanged": [str(p) for p in rep.unchanged],
                    "removed": [str(p) for p in rep.removed],
                    "ran": [{"argv": a, "status": rc, "output": out} for a, rc, out in rep.ran],
                    "todo": rep.todo, "notes": rep.notes, "complete": rep.complete,
                    "dry_run": bool(getattr(args, "dry_run", False))})
        return EXIT_OK if rep.complete else EXIT_FAIL
    for p in rep.written:
        print(f"wrote {p}")
    for p in rep.unchanged:
        print(f"unchanged {p}")
    for p in rep.removed:
        print(f"removed {p}")
    for argv, rc, out in rep.ran:
        print(f"ran: {' '.join(argv)}: " + ("ok" if rc == 0 else f"failed (exit {rc}): {out.splitlines()[-1] if out else ''}"))
    for n in rep.notes:
        print(f"note: {n}")
    if rep.todo:
        print(f"{verb} is not complete; run these yourself:")
        for t in rep.todo:
            print(f"  {t}")
    return EXIT_OK if rep.complete else EXIT_FAIL


def cmd_install_systemd(args: argparse.Namespace) -> int:
    from fleetbus import systemd

    fleet = _fleet(args)
    paths = _paths(fleet)
    try:
        rep = systemd.install(fleet, paths, enable=args.enable, dry_run=args.dry_run)
    except systemd.ForeignUnit as e:
        raise CliError(str(e), EXIT_REJECTED) from None
    except systemd.SystemdError as e:
        raise CliError(str(e), EXIT_USAGE) from None
    if args.dry_run and not args.json:
        for u, p in zip(rep.units, rep.written):
            print(f"# ---- {p}\n{u.text}")
        names = " ".join(u.name for u in rep.units)
        print("# then: systemctl --user daemon-reload" + (f"; systemctl --user enable {names}; "
              f"loginctl enable-linger {systemd.user_name()}" if args.enable else ""))
        for n in rep.notes:
            print(f"# note: {n}")
        return EXIT_OK
    code = _systemd_report(args, rep, "install-systemd")
    if not args.json and not args.dry_run:
        print("next: fleet up (starts the units" + (")" if rep.complete else " once a systemd user manager runs)"))
    return code


def cmd_uninstall_systemd(args: argparse.Namespace) -> int:
    from fleetbus import systemd

    fleet = _fleet(args)
    try:
        rep = systemd.uninstall(fleet, _paths(fleet))
    except systemd.ForeignUnit as e:
        raise CliError(str(e), EXIT_REJECTED) from None
    if not rep.removed and not args.json:
        print("no fleetbus units installed for this fleet")
    return _systemd_report(args, rep, "uninstall-systemd")


def cmd_doctor(args: argparse.Namespace) -> int:
    """Exit 0 when no check fails (warnings allowed), 1 when one does."""
    from fleetbus import doctor

    fleet = _fleet(args)
    checks = doctor.run_checks(fleet, _paths(fleet))
    if args.json:
        _emit_json(doctor.report(checks))
    else:
        print(f"fleet doctor: tenant {fleet.tenant}, roster {fleet.path}")
        print(doctor.render(checks))
    return EXIT_OK if doctor.report(checks)["ok"] else EXIT_FAIL


def cmd_init(args: argparse.Namespace) -> int:
    """Exit 3 when ``--write`` names an existing file (nothing is written)."""
    import shlex
    from pathlib import Path

    from fleetbus.starter import starter_roster

    if args.write is None:
        sys.stdout.write(starter_roster(args.profile))
        return EXIT_OK
    path = Path(args.write).expanduser()
    text = starter_roster(args.profile, path=shlex.quote(str(path)))
    try:
        with open(path, "x") as f:  # never overwrite an operator's roster
            f.write(text)
    except FileExistsError:
        raise CliError(f"{path} exists; nothing was written (remove it or choose another path)", EXIT_REJECTED) from None
    except OSError as e:
        raise CliError(f"cannot write {path}: {e.strerror}", EXIT_USAGE) from None
    print(f"wrote {path} (profile {args.profile}); next: fleet --roster {path} up")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from fleetbus import demo

    return demo.run(keep=args.keep, json_out=args.json)


# -- parser ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--roster", default=argparse.SUPPRESS,
                        help="roster file (default: $FLEETBUS_ROSTER, then ./fleet.yaml)")
    ap = argparse.ArgumentParser(prog="fleet", description="fleetbus: route messages to a fleet of agents in tmux.",
                                 epilog="Exit codes: 0 ok/accepted, 1 draft/unconfirmed/failed, 2 usage or roster "
                                        "error, 3 rejected, 4 router not running.")
    ap.add_argument("--roster", default=None, help="roster file (default: $FLEETBUS_ROSTER, then ./fleet.yaml)")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn, help: str, json_flag: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help, description=help)
        p.set_defaults(fn=fn)
        if json_flag:
            p.add_argument("--json", action="store_true", help="print JSON")
        return p

    p = add("up", cmd_up, "start the router (through systemd when this fleet's units are installed, else in the "
                          "background), the slots and their sidecars; says which it used", True)
    p.add_argument("--timeout", type=float, default=20.0, help="seconds to wait for sidecars (default 20)")
    add("down", cmd_down, "stop sidecars, slots, the fleet's tmux server and the router; any process of the "
                          "fleet still running 5 s later is ended by pid and listed (exit 1 if one survives "
                          "SIGKILL)", True)
    add("ps", cmd_ps, "one row per slot: pane, process, heartbeat, flags", True)
    p = add("send", cmd_send, "type a message into a slot, optionally verifying it was accepted", True)
    p.add_argument("slot")
    src = p.add_mutually_exclusive_group()
    src.add_argument("-m", "--message", help="message text")
    src.add_argument("-f", "--file", help="read the message from FILE (UTF-8)")
    p.add_argument("--verify", action="store_true", help="wait for evidence: runtime ack or pane diff")
    p.add_argument("--timeout", type=float, default=None, help="verification timeout in seconds (default: roster bus.verify_timeout_s)")
    p.add_argument("--wait", choices=["queued", "accepted"], default="queued",
                   help="with --verify, when the runtime is busy and its TUI queues the message: answer "
                        "`queued` at once (default, exit 0) or wait until the runtime takes it (timeout "
                        "default 600 s)")
    p.add_argument("--on-busy-input", choices=["fail", "clear"], default="fail",
                   help="when the input line already holds text: fail (default, nothing typed) or clear it first")
    p.add_argument("--from", dest="sender", default=os.environ.get("FLEETBUS_SLOT") or "ops",
                   help="sender shown in the message tag (default: $FLEETBUS_SLOT or 'ops')")
    p.add_argument("--key", default=None,
                   help="idempotency key: a SEND repeating a key the journal holds is never typed again "
                        "(default: a random key, so the client's own resends are safe)")
    p.add_argument("--when", choices=["now", "available"], default="now",
                   help="now (default): refuse a slot that is down, dead or not at its prompt; available: hold "
                        "the message in the journal until the slot can take it, for --ttl seconds")
    p.add_argument("--ttl", type=float, default=None,
                   help="with --when available: seconds before an undelivered message becomes dead-letter "
                        "(default: roster bus.message_ttl_s)")
    p.add_argument("--no-wait", action="store_true",
                   help="answer `queued` once the router has journaled the message; follow it with `fleet log`")
    p = add("publish", cmd_publish, "publish a task to a slot, a class, an idle slot or every slot of a class", True)
    src = p.add_mutually_exclusive_group()
    src.add_argument("-m", "--message", help="task text")
    src.add_argument("-f", "--file", help="read the task from FILE (UTF-8)")
    p.add_argument("--to", required=True, metavar="SELECTOR",
                   help="NAME (that slot), class:C (any free slot of class C), idle / idle:C (the least recently "
                        "used idle slot), all:C (one task per slot of class C)")
    p.add_argument("--wait", choices=["published", "assigned", "accepted", "done"], default="published",
                   help="answer once the task reaches this stage or ends (default: published, at once)")
    p.add_argument("--wait-s", type=float, default=None,
                   help="seconds the task may wait for a free matching slot (default: roster bus.task_wait_s; "
                        "0: fail at once), then timed-out [no-slot]")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds an assigned task may take to be done (default: roster bus.task_timeout_s)")
    p.add_argument("--allow-busy", action="store_true",
                   help="a slot that holds another task or whose runtime is busy may take it (its TUI queues it)")
    p.add_argument("--from", dest="sender", default=os.environ.get("FLEETBUS_SLOT") or "ops",
                   help="sender shown in the message tag (default: $FLEETBUS_SLOT or 'ops')")
    p.add_argument("--key", default=None, help="idempotency key: a repeated key creates nothing new")
    p = add("tasks", cmd_tasks, "tasks from the journal (works without the router)", True)
    p.add_argument("--state", default=None, choices=["published", "assigned", "accepted", "done", "failed", "timed-out"])
    p.add_argument("-n", "--lines", type=int, default=50, help="latest N tasks (default 50)")
    p = add("events", cmd_events, "stream the router's events (heartbeat, message, task, slot, hook) until Ctrl-C", True)
    p.add_argument("--slot", default=None, help="only events of this slot")
    p.add_argument("--kind", action="append", default=None, choices=["heartbeat", "message", "task", "slot", "hook"],
                   help="only events of this kind (repeatable)")
    p = add("log", cmd_log, "history of messages and slot events from the journal (works without the router)", True)
    p.add_argument("slot", nargs="?", default=None)
    p.add_argument("-n", "--lines", type=int, default=50, help="latest N records (default 50)")
    p.add_argument("--id", default=None, help="every change of one message")
    p.add_argument("--prune", action="store_true",
                   help="delete finished messages and tasks (with their changes) and old slot events from the "
                        "journal, and print what was removed (unfinished ones are never deleted)")
    p.add_argument("--older-than", type=float, default=None, metavar="DAYS",
                   help="with --prune: what finished more than DAYS days ago (default: roster bus.retention_days)")
    p = add("tail", cmd_tail, "print the last lines of a slot's screen", True)
    p.add_argument("slot")
    p.add_argument("-n", "--lines", type=int, default=40)
    for name, help in (("watch", "watch a slot read-only (throwaway grouped session, removed on detach)"),
                       ("attach", "take over a slot's terminal (read-write)")):
        p = add(name, cmd_view, help)
        p.add_argument("slot")
    for name, help in (("start", "start a stopped or dead slot and its sidecar"), ("stop", "stop a slot and its sidecar"),
                       ("restart", "restart a slot's runtime (its session and sidecar stay)"),
                       ("reset", "submit the runtime's reset command (e.g. /clear) and confirm it by the "
                                 "runtime's session-start event"),
                       ("interrupt", "stop the current turn (Esc for agent TUIs, C-c for shells) and confirm the "
                                     "slot went idle")):
        p = add(name, cmd_slot_op, help, True)
        p.add_argument("slot")
        if name in ("reset", "interrupt"):
            p.add_argument("--timeout", type=float, default=None,
                           help="seconds to wait for confirmation (default: roster bus.verify_timeout_s)")
    p = add("router", cmd_router, "run the router in the foreground")
    p.add_argument("--log-level", default="info")
    p.add_argument("--log-file", default=None, metavar="PATH",
                   help="log to PATH, rotated at bus.log_max_bytes (default: standard error)")
    add("holder", cmd_holder, "hold the fleet's tmux server in the foreground (the systemd holder unit's process)")
    p = add("sidecar", cmd_sidecar, "run one slot's sidecar in the foreground")
    p.add_argument("slot")
    p.add_argument("--router", default=None, metavar="ENDPOINT",
                   help="router endpoint (default: the tenant's local socket); tcp://HOST:PORT for a remote "
                        "router (its roster's bus.tcp) needs --key and --router-key")
    p.add_argument("--key", default=None, metavar="FILE",
                   help="this sidecar's secret key file (from `fleet keys create`)")
    p.add_argument("--router-key", default=None, metavar="FILE", help="the router's public key file (router.key)")
    p.add_argument("--log-level", default="info")
    p.add_argument("--log-file", default=None, metavar="PATH",
                   help="log to PATH, rotated at bus.log_max_bytes (default: standard error)")
    p = add("keys", cmd_keys, "CURVE keys of the tcp endpoint for remote sidecars: init (router keypair), create "
                              "NAME --slots A,B (a client keypair, allowed for those slots), list, revoke NAME (its live "
                              "connections are dropped)", True)
    p.add_argument("action", choices=["init", "create", "list", "revoke"])
    p.add_argument("name", nargs="?", default=None, help="client key name (create, revoke)")
    p.add_argument("--slots", default=None, metavar="A,B",
                   help="create: the roster slots this key may serve (required); it can act for no other slot")
    p = add("hook", cmd_hook, "forward a runtime hook event to the slot's sidecar (reads the hook payload on stdin)")
    p.add_argument("event", choices=["prompt-submit", "prompt-queued", "turn-start", "turn-end", "session-start"])
    p.add_argument("--session-id", default=None)
    p = add("init", cmd_init, "print (or --write) a commented starter roster for the agent CLIs installed here")
    p.add_argument("--profile", choices=["minimal", "software-factory"], default="minimal",
                   help="minimal (one agent and a shell, default) or software-factory (orchestrator, "
                        "implementers, reviewer, shell)")
    p.add_argument("--write", metavar="PATH", default=None, help="write to PATH (never overwrites) instead of stdout")
    p = add("doctor", cmd_doctor, "check tmux, the fleet's socket and holder, exact targets, restart isolation, "
                                  "hooks per slot, systemd and linger; each problem with its fix", True)
    p = add("install-systemd", cmd_install_systemd, "install systemd user units (tmux holder + router), "
            "daemon-reload, enable them and linger, so the fleet survives reboots and logouts", True)
    p.add_argument("--enable", action=argparse.BooleanOptionalAction, default=True,
                   help="enable the units and linger (default) or only install them")
    p.add_argument("--dry-run", action="store_true", help="print the units and the commands; change nothing")
    add("uninstall-systemd", cmd_uninstall_systemd, "disable and remove this fleet's systemd user units (the "
        "router stops; agents keep running)", True)
    p = add("demo", cmd_demo, "run a throwaway fleet on its own tmux socket and show the main job", True)
    p.add_argument("--keep", action="store_true", help="leave the demo fleet running")
    return ap


def main(argv: list[str] | None = None) -> int:
    # pydantic's plugin discovery scans every installed distribution's entry points (~30 ms on
    # each start); fleetbus uses no pydantic plugins
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "roster"):
        args.roster = None
    try:
        return args.fn(args)
    except CliError as e:
        print(f"fleet: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        found = _path_error(e)
        if found is None:
            raise
        print(f"fleet: {found}", file=sys.stderr)
        return EXIT_USAGE


def _path_error(e: BaseException) -> BaseException | None:
    """The :class:`fleetbus.safepath.PathError` in ``e`` (itself, or inside exception groups
    raised by task groups), or None."""
    from fleetbus.safepath import PathError

    if isinstance(e, PathError):
        return e
    for sub in getattr(e, "exceptions", ()):
        found = _path_error(sub)
        if found is not None:
            return found
    return None
