"""The data plane's policy objects alone: epoch gate, auth guard, connection budget."""
from __future__ import annotations

import math

import pytest

from kvstore import errors
from kvstored.auth import READ, WRITE, Auth, Unauthenticated
from kvstored.dataplane.policy import LOGIN, AuthGuard, ConnectionBudget, EpochGate

TOKENS = '''
[[token]]
name = "rw"
token = "read-write-token-0001"
namespaces = ["a", "b"]
scopes = ["read", "write"]

[[token]]
name = "ro"
token = "read-only-token-00002"
namespaces = ["*"]
scopes = ["read"]
'''


@pytest.fixture
def auth(tmp_path):
    f = tmp_path / "tokens.toml"
    f.write_text(TOKENS)
    return Auth(str(f))


@pytest.mark.parametrize("mine, theirs, redirect", [
    (0, 0, False), (0, 7, False), (7, 0, False), (7, 7, False), (7, 8, True)])
def test_epoch_gate(mine, theirs, redirect):
    err = EpochGate(mine).check(theirs)
    assert (err is not None) == redirect
    if redirect:
        assert isinstance(err, errors.Redirect) and "00000008" in err.message


def test_epoch_gate_lapses_once_past_its_lease_deadline():
    """Past the deadline the check runs the lapse hook (membership drops the node: here,
    the epoch a dropped node has), once; no deadline (single node, static peers, no
    lease): never."""
    g, lapses = EpochGate(7), []

    def drop():
        lapses.append(g.deadline)
        g.epoch = 0xFFFFFFFF
    g.on_lapse = drop
    g.check_lease(1e12)  # no lease kept: no deadline
    assert not lapses and g.check(7) is None
    g.deadline = 100.0
    g.check_lease(99.9)
    assert not lapses and g.check(7) is None
    g.check_lease(100.0)
    assert lapses == [math.inf]  # disarmed before the hook ran
    assert isinstance(g.check(7), errors.Redirect) and g.check(0) is None  # no epoch: passes
    g.check_lease(200.0)
    assert len(lapses) == 1


def test_guard_before_login(auth):
    g = AuthGuard(auth)
    for need in (LOGIN, READ, WRITE):
        reason, err = g.check(b"a", need)
        assert reason == "no_token" and isinstance(err, Unauthenticated)


def test_guard_bad_token_forgets_the_old_one(auth):
    g = AuthGuard(auth)
    g.login(b"read-write-token-0001")
    assert g.check(b"a", WRITE) is None
    with pytest.raises(errors.PermissionDenied):
        g.login(b"not-a-known-token-xyz")
    assert g.check(b"a", READ)[0] == "no_token"


def test_guard_namespaces_and_scopes(auth):
    g = AuthGuard(auth)
    g.login(b"read-write-token-0001")
    assert g.check(b"a", READ) is None and g.check(b"b", WRITE) is None
    assert g.check(b"c", READ)[0] == "namespace"
    g.login(b"read-only-token-00002")  # a new token replaces the cached permissions
    assert g.check(b"c", READ) is None
    reason, err = g.check(b"a", WRITE)
    assert reason == "scope" and "write" in err.message and g.check(b"a", LOGIN) is None


def test_guard_sees_reloads_and_revocations(auth, tmp_path):
    g = AuthGuard(auth)
    g.login(b"read-write-token-0001")
    assert g.check(b"a", WRITE) is None
    (tmp_path / "tokens.toml").write_text(TOKENS.replace('scopes = ["read", "write"]',
                                                         'scopes = ["read"]'))
    auth.reload()
    assert g.check(b"a", WRITE)[0] == "scope"  # the cached mask was dropped
    (tmp_path / "tokens.toml").write_text(TOKENS.split("[[token]]")[0] + "[[token]]"
                                          + TOKENS.split("[[token]]")[2])
    auth.reload()
    reason, err = g.check(b"a", READ)
    assert reason == "revoked" and "authenticate again" in err.message


def test_guard_mask_cache_is_bounded(auth):
    g = AuthGuard(auth)
    g.login(b"read-only-token-00002")
    for i in range(5000):  # namespace spraying must not grow memory without bound
        assert g.check(b"ns%d" % i, READ) is None
    assert len(g.masks) <= 1024


def test_budget():
    assert ConnectionBudget(8, 1 << 20).admit_reservation(10 ** 12, 10 ** 12) is None  # 0: no bound
    b = ConnectionBudget(8, 1 << 20, max_reserved_bytes=1000)
    assert b.admit_reservation(0, 1000) is None
    err = b.admit_reservation(600, 500)
    assert isinstance(err, errors.NoSpace) and "limit 1000" in err.message
