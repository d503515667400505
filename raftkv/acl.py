"""Users, roles and permissions (etcd RBAC semantics, Redis ACL spirit): pure, no I/O.

Theory of operation
-------------------
A *role* grants command categories (``read``, ``write``, ``txn``, ``admin``)
and key prefixes to read and to write (``b""`` is every key).  A *user* has a
salted scrypt hash of its password and a list of roles; its permissions are the
union of its roles'.  A request is allowed when its command's category is
granted and every key it reads matches a read prefix and every key it writes a
write prefix -- all keys are checked before anything runs, so MSET, TXN and
EXEC are allowed whole or refused whole.  ``root`` is built in and grants
everything; connection commands (PING, AUTH, HELLO, routing lookups) need no
grant at all.

The table is replicated data: one reserved key (``ACL_KEY``) in the cluster's
own key space holds it encoded, changed by compare-and-set so two operators
cannot interleave, and no client command may read or write reserved keys.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import msgpack

CATEGORIES = ("read", "write", "txn", "admin")
CONN = "conn"  # commands every authenticated connection may run
RESERVED_PREFIX = b"\x00raftkv/"
ACL_KEY = RESERVED_PREFIX + b"acl"
ROOT = "root"
NAME_BYTES_MAX = 64
PREFIXES_MAX = 64

# scrypt cost: ~16 MiB and tens of milliseconds per check, paid once per AUTH.
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1


class AclError(ValueError):
    """A user or role change that cannot be made; the message says why."""


@dataclass(frozen=True)
class Role:
    """What a role grants: command categories and key prefixes to read and to write."""

    name: str
    categories: frozenset[str]
    read: tuple[bytes, ...] = ()
    write: tuple[bytes, ...] = ()


ROOT_ROLE = Role(ROOT, frozenset(CATEGORIES), (b"",), (b""))


@dataclass(frozen=True)
class User:
    name: str
    password_hash: str
    roles: tuple[str, ...] = ()


@dataclass(frozen=True)
class Access:
    """What one request needs: its command's category and the keys it reads and writes."""

    category: str
    reads: tuple[bytes, ...] = ()
    writes: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class Permissions:
    """The union of some roles' grants."""

    categories: frozenset[str] = frozenset()
    read: tuple[bytes, ...] = ()
    write: tuple[bytes, ...] = ()

    @classmethod
    def of(cls, roles: Iterable[Role]) -> Permissions:
        cats: set[str] = set()
        read: list[bytes] = []
        write: list[bytes] = []
        for r in roles:
            cats |= r.categories
            read += r.read
            write += r.write
        return cls(frozenset(cats), tuple(sorted(set(read))), tuple(sorted(set(write))))

    def check(self, access: Access) -> str | None:
        """None if ``access`` is allowed, else why not (names the first refused key)."""
        if access.category == CONN:
            return None
        if access.category not in self.categories:
            return f"no permission to run {access.category} commands"
        for k in access.reads:
            if not any(k.startswith(p) for p in self.read):
                return f"no permission to read key {k!r}"
        for k in access.writes:
            if not any(k.startswith(p) for p in self.write):
                return f"no permission to write key {k!r}"
        return None


@dataclass(frozen=True)
class AclTable:
    """Every user and role the cluster manages online (``root`` is implicit)."""

    users: dict[str, User] = field(default_factory=dict)
    roles: dict[str, Role] = field(default_factory=dict)

    # -- queries --------------------------------------------------------------------------
    def permissions(self, user: str) -> Permissions | None:
        """The user's permissions, or None if the table does not know the user."""
        u = self.users.get(user)
        if u is None:
            return None
        return Permissions.of(ROOT_ROLE if r == ROOT else self.roles[r] for r in u.roles if r == ROOT or r in self.roles)

    # -- changes (each returns a new table) --------------------------------------------------
    def put_user(self, name: str, password_hash: str, roles: Iterable[str]) -> AclTable:
        _check_name(name, "user")
        roles = tuple(dict.fromkeys(roles))
        for r in roles:
            self._need_role(r)
        return replace(self, users={**self.users, name: User(name, password_hash, roles)})

    def delete_user(self, name: str) -> AclTable:
        self._need_user(name)
        return replace(self, users={k: v for k, v in self.users.items() if k != name})

    def grant(self, name: str, role: str) -> AclTable:
        u = self._need_user(name)
        self._need_role(role)
        if role in u.roles:
            return self
        return replace(self, users={**self.users, name: replace(u, roles=(*u.roles, role))})

    def revoke(self, name: str, role: str) -> AclTable:
        u = self._need_user(name)
        return replace(self, users={**self.users, name: replace(u, roles=tuple(r for r in u.roles if r != role))})

    def put_role(self, name: str, categories: Iterable[str], read: Iterable[bytes], write: Iterable[bytes]) -> AclTable:
        _check_name(name, "role")
        if name == ROOT:
            raise AclError("the root role is built in and cannot be changed")
        cats = frozenset(categories)
        unknown = cats - set(CATEGORIES)
        if unknown:
            raise AclError(f"unknown categories {sorted(unknown)}; known: {', '.join(CATEGORIES)}")
        read, write = tuple(read), tuple(write)
        if len(read) > PREFIXES_MAX or len(write) > PREFIXES_MAX:
            raise AclError(f"at most {PREFIXES_MAX} read and {PREFIXES_MAX} write prefixes per role")
        return replace(self, roles={**self.roles, name: Role(name, cats, read, write)})

    def delete_role(self, name: str) -> AclTable:
        if name not in self.roles:
            raise AclError(f"no role {name!r}")
        users = {k: replace(u, roles=tuple(r for r in u.roles if r != name)) for k, u in self.users.items()}
        return replace(self, users=users, roles={k: v for k, v in self.roles.items() if k != name})

    def _need_user(self, name: str) -> User:
        u = self.users.get(name)
        if u is None:
            raise AclError(f"no user {name!r}")
        return u

    def _need_role(self, name: str) -> None:
        if name != ROOT and name not in self.roles:
            raise AclError(f"no role {name!r}; create it first (RAFTKV.ROLE SET)")

    # -- encoding (the replicated value) ------------------------------------------------------
    def encode(self) -> bytes:
        users = [[u.name, u.password_hash, list(u.roles)] for u in self.users.values()]
        roles = [[r.name, sorted(r.categories), list(r.read), list(r.write)] for r in self.roles.values()]
        return msgpack.packb([1, users, roles], use_bin_type=True)

    @classmethod
    def decode(cls, blob: bytes | None) -> AclTable:
        if not blob:
            return cls()
        version, users, roles = msgpack.unpackb(blob, raw=False)
        if version != 1:
            raise AclError(f"unsupported ACL table version {version}")
        return cls(users={n: User(n, h, tuple(rs)) for n, h, rs in users},
                   roles={n: Role(n, frozenset(c), tuple(r), tuple(w)) for n, c, r, w in roles})


def _check_name(name: str, what: str) -> None:
    if not name or len(name.encode()) > NAME_BYTES_MAX or not name.isprintable() or " " in name:
        raise AclError(f"{what} name must be 1-{NAME_BYTES_MAX} printable bytes without spaces")


# -- passwords ----------------------------------------------------------------------------------------

def hash_password(password: str, salt: bytes) -> str:
    """``scrypt$N$r$p$salt$hash`` (hex); ``salt`` must be random (16 bytes)."""
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, dklen=32)
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    """Constant-time check of ``password`` against ``hash_password`` output."""
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        if kind != "scrypt":
            return False
        got = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p),
                             dklen=len(digest) // 2)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got.hex(), digest)
