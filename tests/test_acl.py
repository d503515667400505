"""Users, roles and permissions: the pure rules against a model, then a live cluster.

The model states, per command, which keys it reads and writes and which
category it belongs to -- written here independently of the command modules --
and says a request is allowed iff its category is granted and every read key has
a read prefix and every written key a write prefix.  Hypothesis draws roles,
users and requests; the node's answer (``Command.access`` + ``Permissions``)
must match the model on every one.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from raftkv.acl import ACL_KEY, CATEGORIES, AclError, AclTable, Permissions, hash_password, verify_password
from raftkv.cluster import LocalCluster
from raftkv.protocol import encode_command
from raftkv.server.commands import COMMANDS
from tests.conftest import no_retry, running

KEYS = [b"a", b"ab", b"b", b"ba", b"c"]
PREFIXES = [b"", b"a", b"ab", b"b", b"c"]

# The model: command -> (category, keys read, keys written), from the command's arguments.
MODEL = {
    b"GET": lambda a: ("read", a, []),
    b"MGET": lambda a: ("read", a, []),
    b"EXISTS": lambda a: ("read", a, []),
    b"SET": lambda a: ("write", [], a[:1]),
    b"DEL": lambda a: ("write", [], a),
    b"CAS": lambda a: ("write", a[:1], a[:1]),
    b"MSET": lambda a: ("write", [], a[0::2]),
    b"WATCH": lambda a: ("read", a, []),
    b"EXEC": lambda a: ("txn", [], []),
    b"RAFTKV.TRANSFER": lambda a: ("admin", [], []),
    b"RAFTKV.USER": lambda a: ("admin", [], []),
    b"PING": lambda a: ("conn", [], []),
}


def model_allows(roles: list[tuple[set, list, list]], category: str, reads: list, writes: list) -> bool:
    if category == "conn":
        return True
    cats = set().union(*(r[0] for r in roles)) if roles else set()
    rp = [p for r in roles for p in r[1]]
    wp = [p for r in roles for p in r[2]]
    return (category in cats and all(any(k.startswith(p) for p in rp) for k in reads)
            and all(any(k.startswith(p) for p in wp) for k in writes))


def request(name: bytes, keys: list[bytes]) -> list[bytes]:
    if name in (b"SET", b"CAS"):
        return [name, keys[0], b"v"] + ([b"w"] if name == b"CAS" else [])
    if name == b"MSET":
        return [name] + [x for k in keys for x in (k, b"v")]
    if name == b"RAFTKV.TRANSFER":
        return [name, b"0"]
    if name == b"RAFTKV.USER":
        return [name, b"LIST"]
    if name in (b"EXEC", b"PING"):
        return [name]
    if name == b"GET":
        return [name, keys[0]]
    return [name, *keys]


def args_of(req: list[bytes]) -> list[bytes]:
    return {b"SET": req[1:2], b"CAS": req[1:2], b"MSET": req[1:]}.get(req[0], req[1:])


roles_st = st.lists(st.tuples(st.sets(st.sampled_from(CATEGORIES)), st.lists(st.sampled_from(PREFIXES), max_size=2),
                              st.lists(st.sampled_from(PREFIXES), max_size=2)), max_size=3)


@settings(max_examples=400, deadline=None)
@given(roles=roles_st, name=st.sampled_from(sorted(MODEL)), keys=st.lists(st.sampled_from(KEYS), min_size=1,
                                                                           max_size=4))
def test_permissions_match_the_model(roles: list, name: bytes, keys: list[bytes]) -> None:
    table = AclTable()
    for i, (cats, read, write) in enumerate(roles):
        table = table.put_role(f"r{i}", cats, read, write)
    table = table.put_user("u", "scrypt$x", [f"r{i}" for i in range(len(roles))])
    perms = table.permissions("u")
    assert perms is not None
    req = request(name, keys)
    spec = COMMANDS[name]
    access = spec.access(req) if spec.access is not None else None
    allowed = access is None or perms.check(access) is None
    category, reads, writes = MODEL[name](args_of(req))
    assert allowed == model_allows([(set(c), r, w) for c, r, w in roles], category, reads, writes), (req, roles)


def test_multi_key_commands_are_refused_whole_naming_the_key() -> None:
    perms = Permissions.of(AclTable().put_role("w", ["write"], [], [b"app/"]).roles.values())
    access = COMMANDS[b"MSET"].access([b"MSET", b"app/1", b"x", b"other", b"y"])
    assert perms.check(access) == "no permission to write key b'other'"


def test_root_and_table_rules() -> None:
    t = AclTable().put_role("app", ["read"], [b"app/"], [])
    with pytest.raises(AclError):
        t.put_role("root", ["read"], [], [])
    with pytest.raises(AclError):
        t.put_user("bob", "h", ["missing"])
    t = t.put_user("bob", "h", ["app"]).put_user("eve", "h", ["root"])
    assert t.permissions("eve") == Permissions.of([__import__("raftkv.acl").acl.ROOT_ROLE])
    assert t.delete_role("app").users["bob"].roles == ()
    assert AclTable.decode(t.encode()) == t
    assert t.permissions("nobody") is None


def test_password_hashes_are_salted_and_checked() -> None:
    a, b = hash_password("s3cret", os.urandom(16)), hash_password("s3cret", os.urandom(16))
    assert a != b and "s3cret" not in a
    assert verify_password("s3cret", a) and not verify_password("s3cre", a) and not verify_password("x", "junk")


# -- a live cluster ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    import dataclasses

    from raftkv.cluster import free_base_port
    from shards.shardmap import local_cluster

    d = tmp_path_factory.mktemp("acl")
    m = local_cluster(3, 3, base_port=free_base_port(), data_dir=str(d / "data"))
    m = dataclasses.replace(m, security={"password": "opw", "node_key": "k" * 64})
    with running(LocalCluster(d, m)) as c:
        yield c


def r(lc: LocalCluster, node: str = "n1", **kw: object) -> redis.Redis:
    host, port = lc.map.nodes[node].client_addr
    return redis.Redis(host=host, port=port, protocol=2, socket_timeout=20, **kw)


def test_roles_limit_a_user_to_its_prefixes_and_categories(lc: LocalCluster) -> None:
    admin = r(lc, password="opw")
    assert admin.execute_command("RAFTKV.ROLE", "SET", "app", "CATEGORIES", "read,write,txn", "READ", "app/",
                                 "WRITE", "app/") == b"OK"
    assert admin.execute_command("RAFTKV.USER", "ADD", "alice", "apw", "app") == b"OK"
    admin.set("other/x", "before")
    alice = r(lc, "n2", username="alice", password="apw")
    assert alice.set("app/1", "v1") and alice.get("app/1") == b"v1"
    for refused in (lambda: alice.set("other/x", "v"), lambda: alice.get("other/x"),
                    lambda: alice.mset({"app/2": "v", "other/x": "v"}),
                    lambda: alice.execute_command("RAFTKV.TXN", "0", "2", "PUT", "app/3", "v", "PUT", "other/x", "v", "0"),
                    lambda: alice.execute_command("RAFTKV.TRANSFER", "0"),
                    lambda: alice.execute_command("RAFTKV.USER", "LIST"),
                    lambda: alice.execute_command("WATCH", "other/x")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            refused()
    assert admin.get("app/2") is None and admin.get("app/3") is None  # refused whole: nothing ran
    assert admin.get("other/x") == b"before"
    # MULTI/EXEC: a refused queued command aborts EXEC
    raw = socket.create_connection(lc.map.nodes["n1"].client_addr, timeout=10)
    raw.sendall(b"".join(encode_command(*c) for c in (("AUTH", "alice", "apw"), ("MULTI",), ("SET", "app/4", "v"),
                                                          ("SET", "other/x", "v"), ("EXEC",))))
    out = b""
    while b"-EXECABORT" not in out:  # EXEC's reply is the last of the five; the socket's 10 s timeout bounds this
        chunk = raw.recv(65536)
        if not chunk:
            break
        out += chunk
    raw.close()
    assert b"-NOPERM" in out and b"-EXECABORT" in out, out
    assert admin.get("app/4") is None
    # Revoking takes effect at once, for a connection already authenticated.
    assert admin.execute_command("RAFTKV.USER", "REVOKE", "alice", "app") == b"OK"
    deadline = time.monotonic() + 10
    while True:
        try:
            alice.get("app/1")
        except redis.exceptions.NoPermissionError:
            break
        assert time.monotonic() < deadline, "revoke never took effect"
        time.sleep(0.1)


def test_reserved_keys_and_wrong_passwords(lc: LocalCluster) -> None:
    admin = r(lc, password="opw")
    with pytest.raises(redis.exceptions.NoPermissionError):
        admin.get(ACL_KEY)
    with pytest.raises(redis.exceptions.NoPermissionError):
        admin.set(ACL_KEY, "x")
    with pytest.raises(redis.AuthenticationError):
        r(lc, username="alice", password="wrong", retry=no_retry()).ping()


def test_admin_actions_and_refusals_are_audited(lc: LocalCluster) -> None:
    logs = "".join(lc.log_file(n).read_text(errors="replace") for n in lc.map.nodes)
    assert "event=audit action=raftkv.role user=default" in logs and "outcome=allowed" in logs
    assert "event=audit action=raftkv.user" in logs
    assert "event=audit action=raftkv.transfer user=alice" in logs and "outcome=denied" in logs
    assert "event=audit action=auth" in logs


def test_cli_manages_users_and_roles(lc: LocalCluster) -> None:
    from click.testing import CliRunner

    from raftkv.cli import main

    def run(*args: str) -> str:
        res = CliRunner().invoke(main, ["--password", "opw", *args, "--cluster", str(lc.config)])
        assert res.exit_code == 0, res.output
        return res.output

    run("role", "set", "reader", "--category", "read", "--read", "pub/")
    run("user", "add", "bob", "--password", "bpw", "--role", "reader")
    assert "bob\treader" in run("user", "list")
    assert "reader\tcategories=read\tread=['pub/']\twrite=[]" in run("role", "list")
    bob = r(lc, username="bob", password="bpw")
    assert bob.get("pub/x") is None
    with pytest.raises(redis.exceptions.NoPermissionError):
        bob.set("pub/x", "v")
    run("role", "del", "reader")
    assert "bob\t-" in run("user", "list")
    run("user", "del", "bob")
    assert "bob" not in run("user", "list")
