"""CURVE keys, the ZAP authenticator and per-key roles.

Why this module exists: the hub's ZeroMQ sockets are the whole bus, so whoever can reach them can read every
event, inject events and take work. With `[security] curve = true` every socket is encrypted and the hub admits
only client public keys found in `authorized_keys_dir`. Each admitted connection carries a User-Id -- the name
of the certificate file that admitted it -- and `[security.roles.NAME]` limits what that key may do.

Key files are the czmq/pyzmq certificate format written by `zmq.auth.create_certificates`
(`NAME.key` public, `NAME.key_secret` secret). Secret keys are never logged and never put in an error message;
only paths are.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
        self._sig: tuple[tuple[str, int, int], ...] = ()
        self.configure_curve_callback(domain=domain, credentials_provider=self)

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP credentials check (auth thread): admitted only if the key is in the map loaded last."""
        return key in self.names

    def curve_user_id(self, client_public_key: bytes) -> str:
        from zmq.utils import z85

        # "" if the key vanished between the check and here: the hub treats an empty User-Id as unknown (denied).
        return self.names.get(z85.encode(client_public_key), "")

    def reload(self, force: bool = False) -> tuple[set[str], set[str]] | None:
        """Re-read the allow-list if it changed; returns (added, removed) key names, or None if unchanged."""
        sig = _dir_signature(self.directory)
        if not force and sig == self._sig:
            return None
        self._sig = sig
        names, bad = scan_key_dir(self.directory)
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
                "invalid": len(bad),
            })
        return added, removed


def start_authenticator(zctx: zmq.Context[Any], sec: SecurityConfig) -> KeyAuthenticator:
    """Start ZAP for the hub's sockets; only keys in `authorized_keys_dir` are admitted."""
    d = _need(sec, "authorized_keys_dir", "hub")
    if not d.is_dir():
        raise ConfigError(f"[security] authorized_keys_dir: {d} is not a directory; create it and copy the "
                          f"clients' public .key files into it ({FIX})")
    auth = KeyAuthenticator(zctx, sec.zap_domain, d)
    auth.start()
    auth.reload(force=True)
    return auth


def server_key_path(sec: SecurityConfig) -> Path:
    return _need(sec, "server_secret_key", "hub")


# -- roles ---------------------------------------------------------------------------------------------------------
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
        return self.admitted is None or (bool(user) and user in self.admitted)

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
