"""Repair's calls to other nodes: Heads, reads and writes, many objects per call.

One SDK Client per peer (cached; replaced when the peer comes back on another address).
A peer that fails with Unavailable is not asked again in the same pass (a dead node that
is still listed must not stall it); NotVerified (a record the peer holds back until its own
repair checks it) is an answer, not a dead peer: that record is no source. Batched reads raise the first error of the batch, so
a batch that fails is retried one object at a time to learn which objects failed.

Writes carry FLAG_REPAIR: a node refuses one of a key it saw deleted lately
(errors.Deleted, kvstored/engine/fence.py), so a delete racing a pass leaves nothing
behind. Reads carry it too: the peer counts them apart from its clients' requests, so its
own repair does not take them for clients waiting (pace.py). Both are sent as pipelined
rounds of frames, and every answer is read, so each record's outcome is known without a
second round.
"""
from __future__ import annotations

import logging
import threading
import time

from kvstore import errors
from kvstore._common import value_parts
from kvstore.client import WINDOW
from kvstore.control import heads_of
from kvstore.recvpool import ReceivePool
from kvstore.wire import (COMMIT_AGE, FLAG_COMMIT_AGE, FLAG_OVERWRITE, FLAG_REPAIR, OP_GET, OP_PUT, checksum_parts,
                          encode_commit_age, encode_request)

log = logging.getLogger("kvstored.repair")

PEER_TIMEOUT = 3.0  # one call to a peer
FENCED = "fenced"  # a write's outcome: refused, the key was deleted on that node lately


class PeerIO:
    def __init__(self, token: str | None = None, tls=None, count=None):
        """``tls``: a kvstore.TLSConfig (the node's own certificate) or None; ``count``:
        ``count(name, n)`` for the agent's failure counter."""
        self.token = token or None
        self.tls = tls
        self._count = count or (lambda name, n=1: None)
        self._clients: dict[str, object] = {}
        self._lock = threading.Lock()
        # One receive pool for the sources read from every peer (a chunk's sources come
        # from several peers at once, and a buffer one peer's batch gave back serves the
        # next peer's): a pool per peer client kept that many chunks' worth of buffers,
        # each page faulted in once per peer (~22,000 faults per 3,072 rebuilds, 5 nodes)
        self._pool = ReceivePool()
        self.unreachable: set[str] = set()
        # node_id -> the PUT flags its last Heads answer listed (0: an earlier version)
        self.put_flags: dict[str, int] = {}

    def new_pass(self) -> None:
        self.unreachable = set()

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for c in clients:
            try:
                c.close()
            except Exception:
                pass

    def client(self, member):
        with self._lock:
            c = self._clients.get(member.node_id)
            if c is not None and c.address == member.address:
                return c
            old, c = c, self._new_client(member.address)
            self._clients[member.node_id] = c
        if old is not None:
            old.close()
        return c

    def _new_client(self, address: str):
        from kvstore.client import Client
        # Checksums verified on receive, as every client does: the wire check covers a
        # record's header as well as its payload, and replica repair copies whole objects
        # that carry no inner checksum. Turning it off for EC sources saved ~1 % of the
        # survivors' CPU (within the noise; RESULTS.md, H8 session 5): not worth a weaker check.
        return Client(address, timeout=PEER_TIMEOUT, shm=False, token=self.token, tls=self.tls,
                      ride_out_restarts=False, transport="tcp")

    def _down(self, member, e: Exception) -> None:
        if isinstance(e, errors.Unavailable) and not isinstance(e, errors.NotVerified):
            self.unreachable.add(member.node_id)

    def heads(self, member, ns: bytes, keys: list[bytes], head_bytes: int):
        """The Heads of ``keys`` on ``member`` (kvstore.control.heads_of: asked packed, a
        node of an earlier version answers in Head messages), or None when it did not
        answer."""
        if member.node_id in self.unreachable:
            return None
        try:
            r = heads_of(self.client(member).heads(keys, head_bytes=head_bytes, namespace=ns.decode(),
                                                   packed=True), len(keys), head_bytes)
        except errors.KVStoreError as e:
            log.debug("repair: %s did not answer Heads: %s", member.node_id, e)
            self._down(member, e)
            return None
        self.put_flags[member.node_id] = r.put_flags  # (a write to it follows its Heads)
        return r

    def get_many(self, member, ns: bytes, keys: list[bytes], verify: bool = True
                 ) -> list[bytearray | None]:
        """The bytes of each key on ``member`` (None where it failed, is absent or held
        back there: no source), as repair reads (FLAG_REPAIR); with ``verify``, each
        checked against the transfer checksum (without: the caller checks every byte
        itself, rebuild.sound_alone)."""
        if not keys or member.node_id in self.unreachable:
            return [None] * len(keys)

        client = self.client(member)
        # A receive pool, as batch_get's: a fresh bytearray per record costs an mmap and a
        # page fault per 4 KiB (~20 % of repair's CPU, measured); a record is handed back
        # to the pool once repair drops its last reference (kvstore.recvpool)
        take = self._pool.take

        def fetch(conn) -> list:  # batch_get's rounds, flagged; every answer read, errors in place
            out: list = []
            for w in range(0, len(keys), WINDOW):
                order = conn.send_keyed(OP_GET, ns, keys[w:w + WINDOW], FLAG_REPAIR)
                out += conn._collect(order, None, verify, take, OP_GET, keep_errors=True)
            return out

        try:
            got = client._run(fetch)
        except errors.ChecksumMismatch:  # one record arrived corrupt (raised after all came)
            return self._get_each(member, ns, keys)
        except errors.KVStoreError as e:
            self._down(member, e)
            return [None] * len(keys)
        except OSError as e:
            self._down(member, errors.Unavailable(str(e)))
            return [None] * len(keys)
        return [None if isinstance(r, errors.KVStoreError) else r for r in got]

    def _get_each(self, member, ns: bytes, keys: list[bytes]) -> list:
        """``get_many`` one key at a time (to learn which record failed its checksum)."""
        if len(keys) == 1:
            return [None]
        return [self.get_many(member, ns, [k])[0] for k in keys]

    def put_many(self, member, ns: bytes, items: list[tuple[bytes, object]],
                 overwrite: bool, committed: list | None = None) -> list:
        """Write each (key, record) to ``member`` as a repair write (a record: bytes, or a
        (header, payload) pair sent gathered): True stored, False already there
        (identical), FENCED refused (the key was deleted there lately), None failed (a
        Conflict: something else is there now; or the peer failed). The next pass looks
        again at an object with any outcome but True and False.

        ``committed``: per record, the commit time (time.time() on this node) of the record
        it copies or was rebuilt from, or None. Sent as its age (FLAG_COMMIT_AGE) when the
        peer's Heads said it takes one, so the copy keeps that time there; else the peer
        stores it with the time of the write (a node of an earlier version)."""
        if not items:
            return []
        if member.node_id in self.unreachable:
            return [None] * len(items)
        records = [(k, *value_parts(v)) for k, v in items]  # (key, parts, size)
        if not self.put_flags.get(member.node_id, 0) & FLAG_COMMIT_AGE:
            committed = None

        def send(conn) -> list:  # one pipelined round; every answer read, errors in place
            order: dict[int, int] = {}
            if committed is None:
                conn.send(conn.put_frames(ns, records, overwrite, order, flags=FLAG_REPAIR))
            else:
                conn.send(_aged_frames(conn, ns, records, overwrite, order, committed))
            return conn._collect(order, None, False, None, OP_PUT, keep_errors=True)

        try:
            got = self.client(member)._run(send)
        except errors.KVStoreError as e:
            self._failed(member, e, len(items))
            return [None] * len(items)
        except OSError as e:
            self._failed(member, errors.Unavailable(str(e)), len(items))
            return [None] * len(items)
        out: list = []
        for r in got:
            if isinstance(r, errors.Deleted):
                out.append(FENCED)
            elif isinstance(r, errors.Conflict):
                out.append(None)
            elif isinstance(r, errors.KVStoreError):
                self._failed(member, r, 1)
                out.append(None)
            else:
                out.append(r)
        return out

    def _failed(self, member, e: Exception, n: int) -> None:
        self._count("failures", n)
        self._down(member, e)
        log.info("repair: could not write to %s: %s", member.node_id, e)


def _aged_frames(conn, ns: bytes, records: list, overwrite: bool, order: dict[int, int],
                 committed: list) -> list:
    """``conn.put_frames`` of repair writes, each record whose commit time is known
    preceded by its age (wire.FLAG_COMMIT_AGE: the header's length counts the age, its
    checksum is the record's alone). The ages are taken now, as the frames are sent."""
    plain = FLAG_REPAIR | (FLAG_OVERWRITE if overwrite else 0)
    now = time.time()
    bufs: list = []
    for (k, parts, n), at in zip(records, committed):
        rid = conn.next_id()
        order[rid] = len(order)
        if at is None:
            bufs.append(encode_request(OP_PUT, rid, ns, k, n, checksum_parts(parts), plain, conn.epoch))
        else:
            bufs.append(encode_request(OP_PUT, rid, ns, k, n + COMMIT_AGE.size, checksum_parts(parts),
                                       plain | FLAG_COMMIT_AGE, conn.epoch) + encode_commit_age(now - at))
        bufs += parts
    return bufs
