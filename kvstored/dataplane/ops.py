"""The core ops every data transport serves: PUT, GET, PING, AUTH.

Each handler gets the session, the decoded header, the namespace and the key,
after the session has applied the op's epoch gate and auth scope (see
``session.OpTable``); it answers through the session's helpers. A transport
with more ops (shm.py) registers them on ``CORE_OPS.extended()``.
"""
from __future__ import annotations

import logging
import struct
import time
from functools import partial
from typing import TYPE_CHECKING

from kvstore import errors
from kvstore.wire import (COMMIT_AGE, FLAG_COMMIT_AGE, FLAG_NOT_VERIFIED_OK, FLAG_OVERWRITE, FLAG_REPAIR, HEADER_SIZE,
                          MAX_TOKEN_LEN, OP_AUTH, OP_GET, OP_PING, OP_PUT, PUT_FLAGS, decode_commit_age,
                          encode_error, encode_response)

from kvstored.auth import ADMIN, READ, WRITE
from kvstored.engine.fence import OVERFLOW

from .policy import LOGIN
from .session import BODY, EMPTY, HEADER_WINDOW, LARGE_PAYLOAD, DataSession, OpTable

if TYPE_CHECKING:
    from kvstore.wire import Header

    from kvstored.engine import Entry, Reservation

log = logging.getLogger("kvstored.tcp")  # the data plane's log lines keep their logger name


def _put(s: DataSession, h: Header, ns: bytes, key: bytes) -> None:
    flags = h.flags
    if flags & ~FLAG_OVERWRITE:  # a repair write, or bits no PUT defines
        return _put_repair(s, h, ns, key)
    s.put_t0 = s.t_in
    n = h.length
    if n >= LARGE_PAYLOAD:  # (the next reads' sizes: session.py, LARGE_PAYLOAD)
        s.window = HEADER_WINDOW
    else:
        s.window = 0
        s.frame = HEADER_SIZE + len(ns) + len(key) + n
    rid = h.req_id
    reader = s.reader
    if reader.end - reader.start >= n:  # the payload came with its header: one store call
        stored = s.put_buffered(OP_PUT, rid, ns, key, n, h.checksum, flags == FLAG_OVERWRITE,
                                _put_reserved)
        if stored is not None:
            s.send(_put_ok(_PUT_OK_HEAD, rid, _PUT_OK_TAIL) if stored else _dedup_response(rid))
        return
    # the header carries the checksum: bytes already stored are answered from the index
    # (reserve's one lookup, before any slot is taken and past the budgets too), and the
    # payload is read into scratch (_put_reserved with no reservation)
    s.reserve(OP_PUT, rid, ns, key, n, h.checksum, flags == FLAG_OVERWRITE,
              _put_reserved, skip=n, stream=True)


# native/frame.c put_run does what _put does for a whole buffered put of a new key or of
# the bytes stored (every other put comes here): sessions build its context for this handler
_put.native_put = True  # type: ignore[attr-defined]


def _put_reserved(s: DataSession, rid: int, res: "Reservation | None", size: int) -> None:
    if res is None:  # same object already stored: skip the payload, answer "deduplicated"
        s.skip_then_send(rid, size, _dedup_response(rid))
        return
    s.res, s.put_rid = res, rid
    res.on_expire = s.expired
    done = s.put_done
    if done is None:  # one closure per connection, not one per put
        done = s.put_done = partial(_put_received, s)
    s.receive_payload(res.view, size, done)  # zero copy: the kernel fills the slot


def _put_repair(s: DataSession, h: Header, ns: bytes, key: bytes) -> None:
    """A PUT with FLAG_REPAIR: a cluster repair agent's write, refused (errors.Deleted) when
    the key was deleted here lately (kvstored/engine/fence.py): checked before the payload
    is taken, and again right before the commit (a delete may land while it arrives).
    With FLAG_COMMIT_AGE the payload starts with the source record's commit age
    (wire.COMMIT_AGE), and the record is stored with that commit time on this node's clock."""
    if s.plane.repair_queue.hold(s, h, ns, key, _put_repair):  # behind this node's clients
        return
    s.put_t0 = s.t_in
    s.counters["repair_requests"] += 1  # not a client's (kvstored/cluster/repair/pace.py)
    rid, n = h.req_id, h.length
    if h.flags & ~PUT_FLAGS or (h.flags & FLAG_COMMIT_AGE and not h.flags & FLAG_REPAIR):
        return s.reject(OP_PUT, rid, n, errors.InvalidArgument(
            f"a PUT's flags are {FLAG_OVERWRITE:#x} (overwrite), {FLAG_REPAIR:#x} (repair) and, "
            f"with repair only, {FLAG_COMMIT_AGE:#x} (commit age); got {h.flags:#x}"))
    if s.guard is not None:  # the fence refuses puts: only nodes' repair agents (admin) may ask
        refused = s.guard.check(ns, ADMIN)
        if refused is not None:
            s.counters["auth_rejected_" + refused[0]] += 1
            return s.reject(OP_PUT, rid, n, refused[1])
    why = s.store.fence.refusal(ns, key)
    if why is not None:
        return s.reject(OP_PUT, rid, n, _refused(ns, key, why))
    if not h.flags & FLAG_COMMIT_AGE:  # (an agent of an earlier version: the commit's own time)
        return _repair_reserve(s, h, ns, key, n, None)
    if n < COMMIT_AGE.size:
        return s.reject(OP_PUT, rid, n, errors.InvalidArgument(
            f"a commit-age put's payload is {n} bytes: shorter than its {COMMIT_AGE.size}-byte age"))
    prefix = bytearray(COMMIT_AGE.size)
    s.receive_payload(memoryview(prefix), COMMIT_AGE.size,
                      lambda: _repair_aged(s, h, ns, key, n - COMMIT_AGE.size, prefix))


def _repair_aged(s: DataSession, h: Header, ns: bytes, key: bytes, n: int, prefix: bytearray) -> None:
    """The commit age of a FLAG_COMMIT_AGE put has arrived; its record (``n`` bytes) follows."""
    try:
        age = decode_commit_age(prefix)
    except errors.InvalidArgument as e:
        return s.reject(OP_PUT, h.req_id, n, e)
    # on this node's clock: the age crossed nodes, the sender's clock did not (an age
    # measured before the frame left: the copy looks newer by its transit, never older)
    _repair_reserve(s, h, ns, key, n, time.time() - age)


def _repair_reserve(s: DataSession, h: Header, ns: bytes, key: bytes, n: int,
                    committed_at: float | None) -> None:
    s.window = HEADER_WINDOW if n >= LARGE_PAYLOAD else 0
    s.reserve(OP_PUT, h.req_id, ns, key, n, h.checksum, bool(h.flags & FLAG_OVERWRITE),
              partial(_repair_reserved, committed_at=committed_at), skip=n, stream=True,
              recommit=False)


def _repair_reserved(s: DataSession, rid: int, res: "Reservation | None", size: int,
                     committed_at: float | None = None) -> None:
    if res is None:
        s.skip_then_send(rid, size, _dedup_response(rid))
        return
    res.committed_at = committed_at  # Store.commit: the source's commit time (None: now)
    s.res, s.put_rid = res, rid
    res.on_expire = s.expired
    s.receive_payload(res.view, size, partial(_repair_received, s))


def _repair_received(s: DataSession) -> None:
    res = s.res
    why = s.store.fence.refusal(res.ns, res.key)
    if why is not None:  # deleted while its payload arrived
        s.res = None
        s._drop_reservation(res)
        s.error(OP_PUT, s.put_rid, _refused(res.ns, res.key, why, "while this repair write arrived"))
        return
    _put_received(s)


def _refused(ns: bytes, key: bytes, why: str, when: str = "lately") -> errors.KVStoreError:
    if why == OVERFLOW:  # no evidence of a delete: the writer retries later
        return errors.NoSpace("this node's delete fence is over its bound: repair writes wait "
                              "until the keys it forgot early have expired")
    return errors.Deleted(f"key {key[:48].hex()} of namespace {ns.decode(errors='replace')} was "
                          f"deleted here {when}: a repair write does not bring it back")


def _dedup_response(rid: int) -> bytes:
    return encode_response(OP_PUT, rid, aux=1)  # aux=1: the object was already stored


def _get(s: DataSession, h: Header, ns: bytes, key: bytes) -> None:
    if h.flags & FLAG_NOT_VERIFIED_OK:
        s.not_verified_ok = True
    if h.flags & FLAG_REPAIR:  # a peer's repair read, not a client's (cluster/repair/pace.py)
        if s.plane.repair_queue.hold(s, h, ns, key, _get):  # behind this node's clients
            return
        s.counters["repair_requests"] += 1
    s.acquire(h.req_id, ns, key, OP_GET, _send_object)


def _send_object(s: DataSession, rid: int, e: "Entry", t0: float = 0.0) -> None:
    s.out.append(encode_response(OP_GET, rid, 0, e.size, e.checksum))
    s.out.append(s.store.view(e))  # the arena itself: the transport sends it without a copy
    s.sent += HEADER_SIZE + e.size
    s.pending.append((s.sent, e, t0 or s.t_in))  # released once its bytes left (written())


def _ping(s: DataSession, h: Header, ns: bytes, key: bytes) -> None:
    s.send(encode_response(OP_PING, h.req_id))


def _auth(s: DataSession, h: Header, ns: bytes, key: bytes) -> None:
    rid, n = h.req_id, h.length
    if h.ns_len or h.key_len or not 1 <= n <= MAX_TOKEN_LEN:
        s.reject(OP_AUTH, rid, n, errors.InvalidArgument(
            f"an auth frame carries a token of 1-{MAX_TOKEN_LEN} bytes and no namespace or key"))
        return
    token = bytearray(n)
    s.receive_payload(memoryview(token), n, lambda: _authenticate(s, rid, bytes(token)))


def _authenticate(s: DataSession, rid: int, token: bytes) -> None:
    if s.guard is None:  # auth off: a token is accepted and ignored
        s.send(encode_response(OP_AUTH, rid))
        return
    try:
        s.guard.login(token)
    except errors.PermissionDenied as e:
        s.counters["auth_rejected_bad_token"] += 1
        s.counters["errors_PermissionDenied"] += 1
        log.info("closing data connection: %s", e.message, extra={"req_id": rid, "peer": s.peer})
        s.send(encode_error(OP_AUTH, rid, e.code, e.message))
        s.close()
        return
    s.counters["auth_ok"] += 1
    s.send(encode_response(OP_AUTH, rid))


CORE_OPS = OpTable()
CORE_OPS.register(OP_PUT, _put, scope=WRITE, epoch=True, length=BODY)
CORE_OPS.register(OP_GET, _get, scope=READ, epoch=True, length=EMPTY)
CORE_OPS.register(OP_PING, _ping, scope=LOGIN, length=EMPTY)
CORE_OPS.register(OP_AUTH, _auth, scope=None, length=BODY)


def _put_received(s: DataSession) -> None:
    """A put's payload is all in its slot: publish it and answer."""
    res, s.res = s.res, None
    rid = s.put_rid
    try:
        stored = s.commit(res)
    except errors.KVStoreError as e:
        s.error(OP_PUT, rid, e)
        return
    s.send(_put_ok(_PUT_OK_HEAD, rid, _PUT_OK_TAIL) if stored else _dedup_response(rid))


# A put's OK answer is the same 40 bytes but for the request id (bytes 8-16, "<Q"): one
# pack of the two constant parts around it costs about a third of encode_response's pack
# of eleven fields, once per put.
_PUT_OK_HEAD, _PUT_OK_TAIL = encode_response(OP_PUT, 0)[:8], encode_response(OP_PUT, 0)[16:]
_put_ok = struct.Struct("<8sQ24s").pack
if encode_response(OP_PUT, 0x0102030405060708) != _put_ok(_PUT_OK_HEAD, 0x0102030405060708,
                                                          _PUT_OK_TAIL):
    raise ImportError("kvstore.wire's header layout changed: ops._put_ok no longer matches it")
