"""CURVE keys of a tenant's ``tcp://`` endpoint: the router's keypair and the client allow-list.

Files are ZeroMQ certificate files written and read by pyzmq (``zmq.auth.create_certificates``,
``zmq.auth.load_certificate``), kept under ``FleetPaths.keys_dir`` = ``<state_dir>/keys/``::

    keys/                       0700
      router.key                the router's public certificate: copy it to remote machines
                                (``fleet sidecar --router-key``)
      router.key_secret         the router's secret certificate (0600, never leaves this machine)
      clients/NAME.key_secret   a client's secret certificate (0600): copy it to the remote
                                machine (``fleet sidecar --key``)
      allowed/NAME.key          public certificates the router accepts: the allow-list; each
                                names the slots the key may serve in its ``metadata`` section
                                (``slots = "a,b"``)
      revoked/NAME.key          public certificates of revoked clients (their secret is deleted)

A key is bound to slots (``fleet keys create NAME --slots a,b``): a peer with that key may
register, ping, acknowledge and report hook events for those slots only (the router reads the
ZAP User-Id, ``key:NAME``, of every frame; :mod:`fleetbus.router.remote`). A certificate without
a ``slots`` entry (made before bindings existed) serves no slot. The router re-reads ``allowed/``
on every CURVE handshake and whenever the folder changes, so ``fleet keys revoke`` refuses new
connections at once, and the router drops the key's live connections at once.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import zmq.auth

from fleetbus.config import MAX_NAME, NAME_RE
from fleetbus.paths import FleetPaths


class KeysError(RuntimeError):
    """A key operation failed. ``kind``: ``invalid`` (bad name or unreadable file), ``unknown``
    (no such client key), ``exists`` (the name is taken)."""

    def __init__(self, message: str, kind: str = "invalid"):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class KeyInfo:
    """One key. ``status``: ``router``, ``allowed`` or ``revoked``. ``public_key`` is Z85 text
    (40 characters). ``secret_file`` is None once revoked (the secret is deleted). ``slots``: the
    slot names the key may serve (empty for the router's key and for keys made without a binding)."""

    name: str
    status: str
    public_key: str
    public_file: str
    secret_file: str | None
    slots: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return asdict(self)


def _private_dir(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    if d.stat().st_mode & 0o077:
        os.chmod(d, 0o700)
    return d


def allowed_dir(paths: FleetPaths) -> Path:
    """The allow-list folder (public certificates of the clients the router accepts)."""
    return paths.keys_dir / "allowed"


def router_files(paths: FleetPaths) -> tuple[Path, Path]:
    """``(public_file, secret_file)`` of the router's keypair (they may not exist yet)."""
    return paths.keys_dir / "router.key", paths.keys_dir / "router.key_secret"


def _create(folder: Path, name: str, metadata: dict[str, str] | None = None) -> tuple[Path, Path]:
    old = os.umask(0o077)  # the secret file is never readable by others, not even for a moment
    try:
        public, secret = zmq.auth.create_certificates(folder, name, metadata=metadata)
    finally:
        os.umask(old)
    os.chmod(secret, 0o600)
    if metadata:  # pyzmq writes metadata into the secret certificate only: the public one gets it too
        head = Path(public).read_text(encoding="utf-8").split("metadata\n", 1)[0]
        body = Path(secret).read_text(encoding="utf-8").split("metadata\n", 1)[1]
        Path(public).write_text(head + "metadata\n" + "".join(
            x for x in body.splitlines(keepends=True) if not x.strip().startswith("secret-key")), encoding="utf-8")
    return Path(public), Path(secret)


def load_public(path: str | os.PathLike) -> bytes:
    """The Z85 public key (40 bytes) in a certificate file (public or secret one).

    Raises:
        KeysError: the file is missing or holds no public key.
    """
    try:
        public, _ = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise KeysError(f"cannot read a public key from {path}: {e}") from None
    if len(public) != 40:
        raise KeysError(f"{path}: the public key is not 40 Z85 characters")
    return public


def load_secret(path: str | os.PathLike) -> tuple[bytes, bytes]:
    """``(public, secret)`` Z85 keys from a secret certificate file.

    Raises:
        KeysError: the file is missing, is readable by other users, or holds no secret key.
    """
    try:
        public, secret = zmq.auth.load_certificate(path)
        mode = os.stat(path).st_mode
    except (OSError, ValueError) as e:
        raise KeysError(f"cannot read a secret key from {path}: {e}") from None
    if secret is None or len(secret) != 40 or len(public) != 40:
        raise KeysError(f"{path} holds no secret key (give the .key_secret file, not the public .key)")
    if mode & 0o077:
        raise KeysError(f"{path} is readable by other users (mode {mode & 0o777:o}); run `chmod 600 {path}`")
    return public, secret


def init_router_keys(paths: FleetPaths) -> tuple[KeyInfo, bool]:
    """Create the router's keypair unless it exists. Returns ``(info, created)``.

    Raises:
        KeysError: an existing key file is unreadable.
    """
    public, secret = router_files(paths)
    created = False
    if not secret.exists():
        _private_dir(paths.keys_dir)
        _create(paths.keys_dir, "router")
        created = True
    load_secret(secret)
    return KeyInfo("router", "router", load_public(public).decode(), str(public), str(secret)), created


def router_keypair(paths: FleetPaths) -> tuple[bytes, bytes]:
    """``(public, secret)`` Z85 keys of the router, created on first use."""
    init_router_keys(paths)
    return load_secret(router_files(paths)[1])


def _check_name(name: str) -> None:
    if not NAME_RE.fullmatch(name) or len(name) > MAX_NAME or name == "router":
        raise KeysError(f"key names match [a-z0-9][a-z0-9._-]*, are at most {MAX_NAME} characters and are not "
                        f"'router' (got {name!r})")


def read_slots(path: str | os.PathLike) -> tuple[str, ...]:
    """The slot names bound to the certificate ``path`` (its ``metadata`` ``slots = "a,b"``
    line); ``()`` when it has none. Names that are not slot names are dropped."""
    try:
        with open(path, "rb") as f:
            for raw in f:
                line = raw.strip()
                if line.startswith(b"slots") and b"=" in line:
                    value = line.split(b"=", 1)[1].strip(b" \t'\"").decode("utf-8", "replace")
                    return tuple(n for n in value.split(",") if NAME_RE.fullmatch(n) and len(n) <= MAX_NAME)
                if line == b"curve":
                    break
    except OSError:
        pass
    return ()


@dataclass(frozen=True)
class Binding:
    """An allowed client key: its ``name`` and the ``slots`` it may serve."""

    name: str
    slots: frozenset[str]


def allowed_bindings(folder: Path) -> dict[bytes, Binding]:
    """Z85 public key (40 bytes) → :class:`Binding` of every certificate in the allow-list folder
    ``folder`` (unreadable files are skipped; a missing folder allows nothing)."""
    out: dict[bytes, Binding] = {}
    for f in folder.glob("*.key") if folder.is_dir() else []:
        try:
            out[load_public(f)] = Binding(f.name.removesuffix(".key"), frozenset(read_slots(f)))
        except KeysError:
            continue
    return out


def create_client(paths: FleetPaths, name: str, slots: list[str] | tuple[str, ...] = ()) -> KeyInfo:
    """Create client keypair ``name``, bound to ``slots``, and put its public key on the allow-list.

    Raises:
        KeysError: invalid name or slot name, or no slot (``invalid``); the name is already used,
            allowed or revoked (``exists``); nothing is changed then.
    """
    _check_name(name)
    slots = tuple(dict.fromkeys(slots))
    if not slots:
        raise KeysError("a client key serves named slots only: give them with --slots a,b")
    for s in slots:
        if not NAME_RE.fullmatch(s) or len(s) > MAX_NAME:
            raise KeysError(f"{s!r} is not a slot name ([a-z0-9][a-z0-9._-]*, at most {MAX_NAME} characters)")
    for status in ("allowed", "revoked"):
        if (paths.keys_dir / status / f"{name}.key").exists():
            raise KeysError(f"a client key named {name!r} already exists ({status}); choose another name", "exists")
    clients = _private_dir(paths.keys_dir / "clients")
    allowed = _private_dir(allowed_dir(paths))
    _private_dir(paths.keys_dir / "revoked")
    public, secret = _create(clients, name, {"slots": f'"{",".join(slots)}"'})
    # the public certificate goes on the allow-list last: the key is usable only once complete
    os.replace(public, allowed / public.name)
    return KeyInfo(name, "allowed", load_public(allowed / public.name).decode(), str(allowed / public.name),
                   str(secret), slots)


def revoke_client(paths: FleetPaths, name: str) -> tuple[KeyInfo, bool]:
    """Take client key ``name`` off the allow-list and delete its secret. Returns ``(info,
    changed)``; ``changed`` is False when it was revoked already.

    Raises:
        KeysError: no client key of that name (``unknown``).
    """
    _check_name(name)
    src = allowed_dir(paths) / f"{name}.key"
    dst = paths.keys_dir / "revoked" / f"{name}.key"
    if not src.exists():
        if dst.exists():
            return KeyInfo(name, "revoked", load_public(dst).decode(), str(dst), None, read_slots(dst)), False
        raise KeysError(f"no client key named {name!r} (see `fleet keys list`)", "unknown")
    _private_dir(dst.parent)
    os.replace(src, dst)
    (paths.keys_dir / "clients" / f"{name}.key_secret").unlink(missing_ok=True)
    return KeyInfo(name, "revoked", load_public(dst).decode(), str(dst), None, read_slots(dst)), True


def list_keys(paths: FleetPaths) -> tuple[KeyInfo | None, list[KeyInfo]]:
    """``(router, clients)``: the router's key (None before ``init``) and every client key,
    allowed and revoked, sorted by name.

    Raises:
        KeysError: a key file is unreadable.
    """
    public, secret = router_files(paths)
    router = KeyInfo("router", "router", load_public(public).decode(), str(public), str(secret)) \
        if public.exists() else None
    clients = []
    for status in ("allowed", "revoked"):
        folder = paths.keys_dir / status
        for f in sorted(folder.glob("*.key")) if folder.is_dir() else []:
            name = f.name.removesuffix(".key")
            sec = paths.keys_dir / "clients" / f"{name}.key_secret"
            clients.append(KeyInfo(name, status, load_public(f).decode(), str(f),
                                   str(sec) if status == "allowed" and sec.exists() else None, read_slots(f)))
    return router, sorted(clients, key=lambda k: k.name)


def revoked_keys(paths: FleetPaths) -> dict[bytes, str]:
    """Z85 public key → name of every revoked client (to name a refused key in the router log)."""
    folder = paths.keys_dir / "revoked"
    out = {}
    for f in folder.glob("*.key") if folder.is_dir() else []:
        try:
            out[load_public(f)] = f.name.removesuffix(".key")
        except KeysError:
            pass
    return out
