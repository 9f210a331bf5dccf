"""CURVE keys, the ZAP authenticator and per-key roles.

Why this module exists: the hub's ZeroMQ sockets are the whole bus, so whoever can reach them can read every
event, inject events and take work. With `[security] curve = true` every socket is encrypted and the hub admits
only client public keys found in `authorized_keys_dir`. Each admitted connection carries a User-Id -- the name
of the certificate file that admitted it -- and `[security.roles.NAME]` limits what that key may do.

A key revoked with `bucketwire keys revoke` is refused whatever the directory holds: the revocation list lives
where every hub reads it (the JetStream cluster, or a lone SQLite hub's state_dir; see `RevocationSource`), since a
file deleted on one hub of a cluster was still admitted by the others.

Key files are the czmq/pyzmq certificate format written by `zmq.auth.create_certificates`
(`NAME.key` public, `NAME.key_secret` secret). Secret keys are never logged and never put in an error message;
only paths are.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from bucketwire.config import Config, ConfigError, RoleConfig, SecurityConfig

log = logging.getLogger("bucketwire.security")

FIX = "create one with `bucketwire keys generate NAME --dir DIR`"


# -- key files at start -------------------------------------------------------------------------------------------
def check_key_files(sec: SecurityConfig) -> None:
    """With `curve = true`, check libzmq supports CURVE and every configured key file loads.

    Run where the keys are used, at start (hub, worker pool, client), so a bad key file is one line there rather
    than a failure inside a loop or in every worker child. Parsing `[security]` stays in `config`, which knows
    nothing about key files.
    """
    if not sec.curve:
        return
    require_curve()
    for key in ("server_secret_key", "previous_server_secret_key", "client_secret_key"):
        p = getattr(sec, key)
        if p is not None:
            load_keypair(p, secret=True, what=f"[security] {key}")
    if sec.server_public_key is not None:
        load_keypair(sec.server_public_key, secret=False, what="[security] server_public_key")
    d = sec.authorized_keys_dir
    if d is not None and not d.is_dir():
        raise ConfigError(f"[security] authorized_keys_dir: {d} is not a directory; create it and copy the "
                          f"clients' public .key files into it ({FIX})")


def require_curve() -> None:
    if not zmq.has("curve"):
        raise ConfigError(
            f"[security] curve = true but this libzmq {zmq.zmq_version()} was built without CURVE; "
            "install pyzmq from its wheel (which bundles libsodium) or set curve = false"
        )


def load_keypair(path: Path, *, secret: bool, what: str = "key") -> tuple[bytes, bytes | None]:
    """Load (public, secret) from a certificate file; errors name the path and the fix, never the key."""
    try:
        with open(path, "rb"):
            pass
        pub, sec = zmq.auth.load_certificate(path)
    except FileNotFoundError:
        raise ConfigError(f"{what}: key file {path} does not exist; {FIX}") from None
    except OSError as e:
        raise ConfigError(f"{what}: cannot read key file {path}: {e.strerror or e}; check its permissions "
                          f"or {FIX}") from None
    except ValueError:
        raise ConfigError(f"{what}: {path} is not a ZeroMQ certificate; {FIX}") from None
    if secret and not sec:
        raise ConfigError(f"{what}: {path} holds no secret key (is it the public .key file? use the "
                          f".key_secret file); {FIX}")
    if len(pub) != 40 or (sec is not None and len(sec) != 40):
        raise ConfigError(f"{what}: {path} holds a malformed key (expected 40 Z85 characters); {FIX}")
    return pub, sec


def _need(sec: SecurityConfig, key: str, who: str) -> Path:
    p = getattr(sec, key)
    if p is None:
        raise ConfigError(f"[security] curve = true but {key} is not set; the {who} needs it ({FIX})")
    return Path(p)


# -- client side -----------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ClientKeys:
    public: bytes
    secret: bytes
    server: bytes


def client_keys(cfg: Config) -> ClientKeys | None:
    """This client's keypair and the hub's public key, or None when CURVE is off. Raises ConfigError."""
    sec = cfg.security
    if not sec.curve:
        return None
    pub, secret = load_keypair(_need(sec, "client_secret_key", "client"), secret=True,
                               what="[security] client_secret_key")
    server, _ = load_keypair(_need(sec, "server_public_key", "client"), secret=False,
                             what="[security] server_public_key")
    assert secret is not None
    return ClientKeys(pub, secret, server)


def apply_client(sock: zmq.Socket[Any], cfg: Config, keys: ClientKeys | None = None) -> None:
    """Make `sock` a CURVE client of the hub; must run before connect(). No-op when CURVE is off."""
    keys = keys if keys is not None else client_keys(cfg)
    if keys is None:
        return
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_serverkey = keys.server


# -- server side -----------------------------------------------------------------------------------------------
def apply_server(sock: zmq.Socket[Any], secret_path: Path, domain: str) -> None:
    """Make `sock` a CURVE server with the key in `secret_path`, authenticated through ZAP `domain`."""
    _, secret = load_keypair(secret_path, secret=True, what="[security] server secret key")
    sock.zap_domain = domain.encode()
    sock.curve_server = True
    sock.curve_secretkey = secret


@dataclass(frozen=True, slots=True)
class BadKeyFile:
    """A `*.key` file in the allow-list directory that admits nobody, and why (never its content)."""

    path: Path
    error: str


def scan_key_dir(directory: Path) -> tuple[dict[bytes, str], list[BadKeyFile]]:
    """Z85 public key -> certificate name (file stem) for every valid `*.key`, and the files that are not valid.

    One bad file must never decide for the good ones: each file is judged on its own, so a stray note or a bare
    key pasted into the directory is skipped (and reported) while removals and additions still take effect.
    """
    out: dict[bytes, str] = {}
    bad: list[BadKeyFile] = []
    try:
        files = sorted(directory.glob("*.key"))
    except OSError:
        return out, bad
    for f in files:
        try:
            pub, _ = zmq.auth.load_certificate(f)
        except (OSError, ValueError) as e:
            bad.append(BadKeyFile(f, f"not a ZeroMQ certificate ({type(e).__name__}: {e})"[:200]))
            continue
        if not pub or len(pub) != 40:
            bad.append(BadKeyFile(f, "holds no 40-character Z85 public key"))
            continue
        out.setdefault(pub, f.stem)
    return out, bad


def key_names(directory: Path) -> dict[bytes, str]:
    """Z85 public key -> certificate name (file stem) for every valid `*.key` in the allow-list directory."""
    return scan_key_dir(directory)[0]


def _dir_signature(directory: Path) -> tuple[tuple[str, int, int], ...]:
    try:
        return tuple(sorted((e.name, e.stat().st_mtime_ns, e.stat().st_size)
                            for e in os.scandir(directory) if e.name.endswith(".key")))
    except OSError:
        return ()


class KeyAuthenticator(ThreadAuthenticator):
    """A ThreadAuthenticator whose User-Id is the key's certificate name, with a reloadable allow-list.

    The User-Id lets the hub apply roles per message (`frame.get("User-Id")`) and refuse messages from a key
    that has been removed from the allow-list even on a connection that was established before. Admission is
    decided by our own key map (a credentials callback), not by pyzmq's directory loader: that loader gives up on
    the whole directory at the first bad file and keeps the previous key set, so a removed key stayed admitted.
    """

    def __init__(self, context: zmq.Context[Any], domain: str, directory: Path) -> None:
        super().__init__(context, log=logging.getLogger("bucketwire.zap"))
        self.domain, self.directory = domain, directory
        self.names: dict[bytes, str] = {}
        self.allowed_names: frozenset[str] = frozenset()
        self.invalid: list[BadKeyFile] = []
        self.revoked: frozenset[bytes] = frozenset()
        """Z85 public keys revoked (`keys revoke`): refused even while their file is in the directory."""
        self._sig: tuple[tuple[str, int, int], ...] = ()
        self.configure_curve_callback(domain=domain, credentials_provider=self)

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP credentials check (auth thread): admitted only if the key is in the map loaded last."""
        return key in self.names

    def curve_user_id(self, client_public_key: bytes) -> str:
        from zmq.utils import z85

        # "" if the key vanished between the check and here: the hub treats an empty User-Id as unknown (denied).
        return self.names.get(z85.encode(client_public_key), "")

    def reload(self, force: bool = False, revoked: frozenset[bytes] | None = None
               ) -> tuple[set[str], set[str]] | None:
        """Re-read the allow-list if it or the revocation list changed; returns (added, removed) key names, or
        None if unchanged. `revoked` (Z85 keys) replaces the revocation list; None keeps the one in force.

        A revoked key leaves the allow-list exactly as if its file had been deleted, so everything that follows a
        removal (handshakes refused, the fatal ERR on live connections, PUB sockets re-created) follows a
        revocation too, whatever the directory holds."""
        sig = _dir_signature(self.directory)
        new_revoked = revoked is not None and revoked != self.revoked
        if not force and sig == self._sig and not new_revoked:
            return None
        self._sig = sig
        if revoked is not None:
            self.revoked = revoked
        names, bad = scan_key_dir(self.directory)
        held = sorted(n for k, n in names.items() if k in self.revoked)
        if held:
            names = {k: n for k, n in names.items() if k not in self.revoked}
        before = self.allowed_names
        before_bad = {b.path for b in self.invalid}
        self.names = names  # one assignment: the auth thread sees the old map or the new one, never a mix
        self.allowed_names = frozenset(names.values())
        self.invalid = bad
        for b in bad:
            if force or b.path not in before_bad:
                log.warning("skipping an invalid file in authorized_keys_dir; it admits nobody",
                            extra={"path": str(b.path), "error": b.error,
                                   "fix": f"remove it or replace it with a client's public .key file ({FIX})"})
        added, removed = set(self.allowed_names - before), set(before - self.allowed_names)
        if added or removed or force:
            log.info("client key allow-list loaded", extra={
                "dir": str(self.directory), "keys": len(names), "added": sorted(added), "removed": sorted(removed),
                "invalid": len(bad), "revoked_in_dir": held,
            })
        return added, removed


def start_authenticator(zctx: zmq.Context[Any], sec: SecurityConfig,
                        revoked: frozenset[bytes] = frozenset()) -> KeyAuthenticator:
    """Start ZAP for the hub's sockets; only keys in `authorized_keys_dir` and not in `revoked` are admitted."""
    d = _need(sec, "authorized_keys_dir", "hub")
    if not d.is_dir():
        raise ConfigError(f"[security] authorized_keys_dir: {d} is not a directory; create it and copy the "
                          f"clients' public .key files into it ({FIX})")
    auth = KeyAuthenticator(zctx, sec.zap_domain, d)
    auth.revoked = revoked  # in force before the first handshake: a restart never admits a revoked key
    auth.start()
    auth.reload(force=True)
    return auth


def server_key_path(sec: SecurityConfig) -> Path:
    return _need(sec, "server_secret_key", "hub")


# -- roles ---------------------------------------------------------------------------------------------------------
LOCAL_USER = "local/"
"""Who a peer on the hub's local socket ([hub] local) is: the hub's own OS account, trusted as a key without a role
(that account can read the hub's server key). No key file can be named so: key names hold no "/"."""


class Roles:
    """`[security.roles.NAME]`: a key with a role may only do what its globs allow; a key without one may do all.

    With CURVE, `admitted` is the set of key names in the allow-list right now: an identity outside it (a key
    removed since it connected, an empty or missing User-Id) is denied everything. Unknown must never mean
    unrestricted. `admitted = None` means CURVE is off, where roles do not apply.
    """

    def __init__(self, roles: dict[str, RoleConfig], admitted: frozenset[str] | None = None) -> None:
        self.roles = roles
        self.admitted = admitted

    def _known(self, user: str | None) -> bool:
        return self.admitted is None or user == LOCAL_USER or (bool(user) and user in self.admitted)

    def allows(self, user: str | None, what: str, name: str) -> bool:
        if not self._known(user):
            return False
        role = self.roles.get(user) if user else None
        if role is None:
            return True
        globs: Iterable[str] = getattr(role, what)
        return any(fnmatch.fnmatchcase(name, g) for g in globs)

    def may_operate(self, user: str | None, group: str) -> bool:
        """Operator acts on a group (replay, dlq retry/purge): a key without a role, `admin = true`, or a role
        that lists the group in `groups`."""
        if not self._known(user):
            return False
        role = self.roles.get(user) if user else None
        if role is None or role.admin:
            return True
        return any(fnmatch.fnmatchcase(group, g) for g in role.groups)


# -- key files ---------------------------------------------------------------------------------------------------
def generate(name: str, directory: Path) -> tuple[Path, Path]:
    """Write NAME.key and NAME.key_secret (mode 600) into `directory`; refuses to overwrite."""
    if not name or "/" in name or "\0" in name or name.startswith(".") or len(name) > 128:
        raise ConfigError(f"key name {name!r}: use letters, digits, '-', '_' (it names the files and the role)")
    directory.mkdir(parents=True, exist_ok=True)
    pub, sec = directory / f"{name}.key", directory / f"{name}.key_secret"
    for p in (pub, sec):
        if p.exists():
            raise ConfigError(f"{p} already exists; pick another name or remove it first")
    old = os.umask(0o077)  # the secret file is never readable by others, not even for an instant
    try:
        pub_s, sec_s = zmq.auth.create_certificates(directory, name)
    finally:
        os.umask(old)
    os.chmod(sec_s, stat.S_IRUSR | stat.S_IWUSR)
    os.chmod(pub_s, 0o644)
    return Path(pub_s), Path(sec_s)


def list_keys(directory: Path) -> list[dict[str, Any]]:
    """Public information about every key file in `directory`: name, kind, public key, mode. No secrets."""
    out = []
    for f in sorted(directory.glob("*.key*")):
        if f.suffix not in (".key", ".key_secret"):
            continue
        try:
            pub, sec = zmq.auth.load_certificate(f)
            public = pub.decode()
        except (OSError, ValueError) as e:
            public = f"<unreadable: {e}>"
            sec = None
        mode = f.stat().st_mode & 0o777
        out.append({"name": f.stem, "file": str(f), "kind": "secret" if f.suffix == ".key_secret" else "public",
                    "public_key": public, "mode": f"{mode:o}", "has_secret": bool(sec),
                    "warning": "secret key readable by group/others; chmod 600"
                    if f.suffix == ".key_secret" and mode & 0o077 else None})
    return out


# -- revocations -----------------------------------------------------------------------------------------------
REVOKED_FILE = "revoked_keys.json"
"""With the SQLite journal (one hub): the revocation list, in the hub's state_dir."""


def public_key_of(text: str) -> bytes | None:
    """`text` as a Z85 public key (40 characters that decode to 32 bytes), or None."""
    from zmq.utils import z85

    raw = text.strip().encode("ascii", "replace")
    if len(raw) != 40:
        return None
    try:
        return raw if len(z85.decode(raw)) == 32 else None
    except (ValueError, KeyError, TypeError):
        return None


def key_hex(public: bytes) -> str:
    """A Z85 public key as the hex of its raw 32 bytes: the revocation list's key (a NATS KV key may not hold
    every Z85 character)."""
    from zmq.utils import z85

    return bytes(z85.decode(public)).hex()


def key_of_hex(h: str) -> bytes | None:
    from zmq.utils import z85

    try:
        raw = bytes.fromhex(h)
    except ValueError:
        return None
    return z85.encode(raw) if len(raw) == 32 else None


def server_public_keys(sec: SecurityConfig) -> dict[bytes, str]:
    """The hub's own public keys (current and previous), Z85 -> config key: never revocable."""
    out: dict[bytes, str] = {}
    for k in ("server_secret_key", "previous_server_secret_key", "server_public_key"):
        p = getattr(sec, k)
        if p is not None:
            try:
                out.setdefault(load_keypair(p, secret=k != "server_public_key", what=f"[security] {k}")[0],
                               f"[security] {k}")
            except ConfigError:
                continue  # a key file this host does not have; the others still count
    return out


@dataclass(frozen=True, slots=True)
class RevokedView:
    """The revocation list a hub enforces: the keys of the last reading that succeeded and, while readings fail,
    why (the hub then keeps enforcing the last list it read: a known revocation never lapses)."""

    keys: frozenset[bytes] = frozenset()
    error: str | None = None


class RevocationSource(Protocol):
    """Where a hub reads the revocation list: the JetStream journal (the cluster's `<prefix>_revoked` bucket,
    shared by every hub) or `LocalRevocations` (one hub, SQLite journal)."""

    def read_revoked(self, done: Callable[[], None]) -> None:
        """Start reading the list without blocking the caller (the hub's loop); `done` is called from any thread
        when the reading has ended, well or not."""
        ...

    def revoked_seen(self) -> RevokedView: ...


def revocation_record(public: bytes, name: str, reason: str) -> dict[str, str]:
    import getpass
    import socket

    try:
        who = f"{getpass.getuser()}@{socket.gethostname()}"
    except (KeyError, OSError):
        who = f"uid {os.getuid()}@{socket.gethostname()}"
    return {"public_key": public.decode(), "name": name, "by": who,
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "reason": reason}


def read_local_revocations(path: Path) -> dict[str, dict[str, str]]:
    """hex key -> record of `path`; {} when it does not exist. Raises ConfigError when it cannot be read or is
    not ours: a hub must not start admitting every revoked key because its list was damaged."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the key revocation list ({e.strerror or e}); check its "
                          "permissions") from None
    try:
        doc = json.loads(raw or b"{}")
        if not isinstance(doc, dict) or not all(isinstance(v, dict) and key_of_hex(k) for k, v in doc.items()):
            raise ValueError("not a map of revoked keys")
    except ValueError as e:
        raise ConfigError(f"{path}: the key revocation list is damaged ({e}); restore it, or remove it and run "
                          "`bucketwire keys revoke` again for every key that must stay revoked") from None
    return doc


def write_local_revocations(path: Path, entries: dict[str, dict[str, str]]) -> None:
    """Replace `path` atomically and durably: a crash leaves the old list or the new one, never a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(entries, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class LocalRevocations:
    """The revocation list of a hub on the SQLite journal: `state_dir/revoked_keys.json`, written by `keys revoke`.

    A small local file read on the loop when it changed (a stat, like the key directory). Read at construction
    so a damaged list stops the start with one line instead of admitting the keys it revoked; a list damaged
    later keeps the last one read (and /healthz says so)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sig: tuple[int, int] | None = None
        self._view = RevokedView()
        self._lock = threading.Lock()
        self._load()
        if self._view.error is not None:
            raise ConfigError(self._view.error)

    def _load(self) -> None:
        try:
            st = self.path.stat()
            sig: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except OSError:
            sig = None
        if sig == self._sig and self._view.error is None:
            return
        try:
            entries = read_local_revocations(self.path)
        except ConfigError as e:
            if self._view.error is None:
                log.warning("cannot read the key revocation list; keeping the last one read",
                            extra={"path": str(self.path), "error": str(e)})
            self._view = RevokedView(self._view.keys, str(e))
            return
        self._sig = sig
        keys = frozenset(k for k in (key_of_hex(h) for h in entries) if k is not None)
        if self._view.error is not None:
            log.info("key revocation list readable again", extra={"path": str(self.path)})
        self._view = RevokedView(keys)

    def read_revoked(self, done: Callable[[], None]) -> None:
        with self._lock:
            self._load()
        done()

    def revoked_seen(self) -> RevokedView:
        return self._view
