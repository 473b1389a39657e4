"""KV events for routers, in vLLM's wire format (ZMQ PUB, msgpack).

KV-aware routers (vLLM's, Dynamo's, llm-d's) learn which blocks a worker holds
from the events vLLM publishes. A kvstored node publishes the same stream for
the objects it holds, so a router can subscribe to it like to an engine.

Wire format (what vLLM's ``ZmqEventPublisher`` sends, field for field):

* a ZMQ PUB; each message is three frames: the topic (``events.topic``,
  default empty), the sequence number (8 bytes, big-endian, from 0 at start,
  +1 per message), and the msgpack payload;
* the payload is a batch ``[ts, [event, ...], dp_rank]`` (msgspec's
  ``array_like`` encoding of vLLM's ``KVEventBatch``; ts is Unix seconds as a
  float, dp_rank is always 0);
* each event is a tagged array (msgspec ``tag=True, array_like=True``: the
  class name first, then the fields in declaration order):

  - ``["BlockStored", block_hashes, parent_block_hash, token_ids, block_size,
    lora_id, medium]``
  - ``["BlockRemoved", block_hashes, medium]``
  - ``["AllBlocksCleared"]``

What they mean here: BlockStored when an object is committed (enters the
index), BlockRemoved when it leaves the index (evicted without an NVMe copy,
deleted, overwritten, dropped as corrupt). Objects move between DRAM and NVMe
without events: a router asks "does this node hold it", not "in which tier".
A BlockStored per object, its ``block_hashes`` one 64-bit hash of (namespace,
key) (see :func:`block_hash`): several would claim a chain of blocks; a run
of removals (an eviction pass, a delete-all) shares one BlockRemoved.
``parent_block_hash`` is None and
``token_ids`` is empty (the data path carries neither yet), ``block_size`` is
``events.block_size`` (tokens per block; 0 = unknown), ``lora_id`` is None and
``medium`` is ``events.medium`` (default ``EXTERNAL``: a store outside the
engine). Every start publishes ``AllBlocksCleared`` first, so a router drops
what it knew of this node's previous life (objects recovered from NVMe are
not announced).

Late subscribers and gaps: a ROUTER (``events.replay_endpoint``) answers
a request carrying a start sequence number (8 bytes, big-endian; sent from a
REQ socket or a DEALER with an empty delimiter frame) with every buffered
batch from that number on, each as ``[seq, payload]``, then ``[-1, b""]``
(vLLM's protocol). The buffer keeps the last ``events.replay_buffer`` batches
(and at most ``REPLAY_MAX_BYTES``).

The data path never waits for this: the store's commit and removal only append
a tuple to a bounded queue; batches are encoded every ``FLUSH_DELAY`` (2 ms) at most,
framed once and written to each subscriber's socket without waiting (what the kernel
does not take at once is queued, bounded per subscriber: see below). Should the
queue itself overflow (a burst of more than ``MAX_PENDING`` events between two
flushes, e.g. a delete-all of a huge namespace), the queued events are dropped
and counted (``kvstored_kv_events_dropped_total``), and the next batch starts
with AllBlocksCleared: a router then under-estimates this node, never trusts a
block that is gone.

Connections: the daemon speaks ZMTP 3 (ZeroMQ's wire protocol, NULL security, as a PUB
on the events endpoint and as a ROUTER on the replay endpoint) on its own listening
sockets, on its loop (``ZmtpServer``): libzmq accepts in its own I/O thread without limit
and offers no way to bound that, so an accept could only be refused after the fact, and a
burst held descriptors past the limit (60-300 of 500 in one measurement). Here each
endpoint accepts while fewer than ``events.max_subscribers`` connections are open, and
fewer than ``events.max_subscribers_per_client`` from the connecting source address (a
unix socket's: its peer's uid), so one client cannot take every place; one over either is
accepted and closed at once (so an endpoint holds at most the limit + 1 descriptors, the
one for the instant of a refusal); refusals are counted
(``kvstored_kv_event_subscribers_refused_total``; those for the per-source cap also in
``kvstored_kv_event_subscribers_refused_per_client_total``) and logged once a minute at
most. A refused ZMQ subscriber reconnects by itself (every 100 ms by default) and gets in
once a place is free. What one connection can hold, and for how long:

* a connection that has not finished ZMTP's greeting and READY within
  ``HANDSHAKE_TIMEOUT`` (10 s) is closed (libzmq's own default is 30 s);
* what it sends is read into at most ``MAX_FRAME`` bytes: a larger frame is skipped
  unread (a replay request with one is answered with the end marker), a message of more
  than ``MAX_FRAMES`` frames is malformed; subscriptions are not stored, only whether one
  matches ``events.topic`` (libzmq keeps every subscription in a trie without bound);
* a subscriber that does not read costs at most ``SUBSCRIBER_BUFFER`` bytes queued in the
  daemon (past the kernel's socket buffer); past that its copies of new batches are
  dropped and counted (``kvstored_kv_event_subscriber_drops_total``): it sees a gap in
  the sequence and can replay;
* a replay runs while its connection has less than ``REPLAY_BUFFER`` bytes queued; one
  whose connection, with bytes waiting for it, takes fewer than ``events.replay_min_rate``
  bytes a second over an ``events.replay_rate_window`` (64 KiB/s over 30 s) is closed and
  counted (``kvstored_kv_event_replays_stalled_total``): it held one of
  ``events.max_replays`` places (before this rule a reader taking a few KiB every 29 s
  held one for good), at most ``events.max_replays_per_client`` of them from one source
  (more get the end marker); at
  most ``MAX_QUEUED_REQUESTS`` requests wait behind a connection's replay in progress,
  more are dropped (counted as refused);
* a connection with more than its bound queued (``SUBSCRIBER_BUFFER``, ``REPLAY_BUFFER``)
  is not read until half of it has gone: what it sends (replay requests, ZMTP PINGs)
  cannot queue answers it does not read;
* a replay connection with no replay in progress closes after ``REPLAY_IDLE_TIMEOUT``
  (300 s) without a request (a ZMQ DEALER or REQ reconnects by itself when it next sends).
* a tcp connection whose peer vanished (no FIN: a host gone) is found by TCP keepalive
  (``KEEPALIVE_IDLE`` + 3 x ``KEEPALIVE_INTERVAL``, 90 s) and its place freed.

Accepts that fail (EMFILE: the process is at its descriptor limit) are counted
(``kvstored_accept_failures_total``) and logged (at most once a minute); the endpoint
stops accepting for ``ACCEPT_RETRY_DELAY`` then (the listening socket stays ready, and
looking again at once would spin).
"""
from __future__ import annotations

import asyncio
import collections
import errno
import fcntl
import functools
import itertools
import logging
import os
import socket
import stat
import struct
import termios
import time
from typing import Any

from xxhash import xxh3_64_intdigest

log = logging.getLogger("kvstored.events")

MAX_PENDING = 65536  # events queued between two flushes before they are dropped
# Events wait this long to share a batch: a batch costs a write per subscriber on the
# loop, so at most ~500 batches/s whatever the put rate; routers do not notice 2 ms.
FLUSH_DELAY = 0.002
MAX_BATCH = 256  # events per published batch (a burst is split over loop turns)
# bytes queued in the daemon for one subscriber (beyond the kernel's socket buffer) past
# which its copies of new batches are dropped: ~2 s of the highest batch rate of full
# batches (~12 KiB each); 256 MiB at most over the default 64 subscribers
SUBSCRIBER_BUFFER = 4 << 20
REPLAY_MAX_BYTES = 32 << 20  # payload bytes the replay buffer keeps at most
REPLAY_CHUNK = 256  # batches a replay sends per loop turn (others are served meanwhile)
REPLAY_BUFFER = 1 << 20  # bytes queued for a replay connection before its replay waits
# Replays in progress at once (events.max_replays; more requests get only the end marker)
# and of them from one source (IP; unix socket: uid; events.max_replays_per_client): one
# client with 16 connections, each reading just above events.replay_min_rate, held every
# place for minutes at a time
MAX_REPLAYS = 16
MAX_REPLAYS_PER_CLIENT = 4
MAX_QUEUED_REQUESTS = 4  # requests waiting behind a connection's replay; more are dropped
REPLAY_IDLE_TIMEOUT = 300.0  # s a replay connection may stay without a replay
END_SEQ = (-1).to_bytes(8, "big", signed=True)
HANDSHAKE_TIMEOUT = 10.0  # s for ZMTP's greeting and READY after the accept
# bytes of one received frame kept (a subscription, a replay request, an identity; the
# topic is at most 256 characters); a larger one is skipped unread
MAX_FRAME = 4 << 10
MAX_FRAMES = 16  # frames of one received message kept; more: malformed
READ_SIZE = 64 << 10  # bytes read from a connection per readiness event
# a queued write under this many bytes is copied into the queue's last chunk (up to
# QUEUE_CHUNK): one object per small answer (a PONG of 23 bytes) cost ~10x its size in
# headers, so a client flooding PINGs held ~70 MB for SUBSCRIBER_BUFFER's 4 MiB
SMALL_WRITE = 1 << 10
QUEUE_CHUNK = 64 << 10
MAX_ACCEPTS_PER_TURN = 64  # accepts per readiness event of a listening socket
ACCEPT_RETRY_DELAY = 1.0  # s without accepting after an accept failed (EMFILE)
BACKLOG = 128
KEEPALIVE_IDLE = 60  # s of silence before TCP keepalive probes a tcp connection
KEEPALIVE_INTERVAL = 10  # s between probes (3 unanswered: the connection is gone)
REFUSED_LOG_EVERY = 60.0  # s between warnings while connections are refused
_OUTQ = getattr(termios, "TIOCOUTQ", None)  # Linux: a socket's bytes not yet acked (SIOCOUTQ)

_STORED, _REMOVED = 0, 1


@functools.lru_cache(maxsize=1024)
def _ns_seed(ns: bytes) -> int:
    return xxh3_64_intdigest(ns)


def block_hash(ns: bytes, key: bytes) -> int:
    """The 64-bit block hash events carry for object ``key`` of namespace ``ns``:
    ``xxh3_64(key, seed=xxh3_64(ns))`` (unsigned).

    Seeded by the namespace so equal keys in two namespaces do not collide; any client
    can compute it (xxhash is an SDK dependency) to match events to its own keys.
    xxh3 rather than a keyed BLAKE2b: ~0.15 us instead of ~1 us per event.
    """
    return xxh3_64_intdigest(key, _ns_seed(ns))


class EventsError(OSError):
    """The events endpoint cannot be opened; ``str(err)`` is one line (start-up errors of
    the OSError kind end as ``kvstored: error: cannot start: ...``, exit 2)."""


def _msgpack():
    try:
        import msgpack
    except ModuleNotFoundError as e:
        raise EventsError(f"events.endpoint is set but the '{e.name}' package is not "
                          "installed: pip install 'kvstored[server]'") from None
    return msgpack


class EventPublisher:
    """Publishes the store's index changes; the store's observer calls ``stored``/``removed``.

    Lives on the daemon's event loop (the store does): no locks.
    """

    def __init__(self, endpoint: str, *, replay_endpoint: str = "", replay_buffer: int = 10000,
                 topic: str = "", medium: str = "EXTERNAL", block_size: int = 0,
                 max_subscribers: int = 64, max_per_client: int = 0,
                 replay_min_rate: int = 64 << 10, replay_rate_window: float = 30.0,
                 max_replays: int = MAX_REPLAYS, max_replays_per_client: int = MAX_REPLAYS_PER_CLIENT):
        """``max_per_client``: connections at once from one source address (unix sockets: one
        uid) per endpoint, 0 = max_subscribers (no cap of its own; the daemon passes its
        setting). A replay connection must take ``replay_min_rate`` bytes a second over each
        ``replay_rate_window`` while bytes wait for it."""
        self.endpoint = endpoint
        self.max_subscribers = max_subscribers
        self.max_per_client = max_per_client or max_subscribers
        self.replay_min_rate = replay_min_rate
        self.max_replays = max_replays
        self.max_replays_per_client = min(max_replays_per_client, max_replays)
        self.replay_rate_window = replay_rate_window
        self.replay_endpoint = replay_endpoint
        self.topic = topic.encode()
        self.medium = medium or None
        self.block_size = block_size
        self._pending: collections.deque = collections.deque()
        self._lost = False  # events were dropped: the next batch starts with AllBlocksCleared
        self._scheduled = False
        self._buffer: collections.deque[tuple[int, bytes]] = collections.deque(maxlen=replay_buffer)
        self._buffer_bytes = 0
        self._replays: collections.deque[ZmtpConnection] = collections.deque()  # in progress
        self._replay_scheduled = False
        self.seq = 0
        self.counters = dict.fromkeys(("events", "batches", "dropped", "subscriber_drops",
                                       "replays", "replay_bad_requests", "replays_refused",
                                       "replays_stalled", "subscribers_refused",
                                       "subscribers_refused_per_client",
                                       "handshakes_failed", "accept_failed"), 0)
        self._pub: ZmtpServer | None = None
        self._router: ZmtpServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._packb = None
        self.closed = False

    # ------------------------------------------------------------ lifecycle
    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Bind the endpoints and announce AllBlocksCleared. Raises EventsError (one line)."""
        self._packb = _msgpack().Packer(use_bin_type=True).pack
        self._loop = loop or asyncio.get_running_loop()
        try:
            self._pub = ZmtpServer(self, self.endpoint, "events.endpoint", PUB)
            if self.replay_endpoint:
                self._router = ZmtpServer(self, self.replay_endpoint, "events.replay_endpoint",
                                          ROUTER)
        except BaseException:
            self.close()
            raise
        self._lost = True  # first batch: AllBlocksCleared (see the module docstring)
        self._schedule()

    def bound(self) -> tuple[str, str]:
        """The endpoints as bound (a tcp port 0 or * replaced by the port taken)."""
        return (self._pub.bound if self._pub else "", self._router.bound if self._router else "")

    def close(self) -> None:
        """Publish what is queued (best effort: what the sockets take at once), then close
        every connection and listening socket."""
        if self.closed:
            return
        self.closed = True
        if self._pub is not None and (self._pending or self._lost):
            self._scheduled = True  # no new schedule: flush now, in full
            while self._pending or self._lost:
                self._flush_some()
        for server in (self._pub, self._router):
            if server is not None:
                server.close()
        self._pub = self._router = None
        self._replays.clear()

    # -------------------------------------------------- store observer half
    def stored(self, e: Any) -> None:
        self._add((_STORED, e.ns, e.key))

    def removed(self, e: Any) -> None:
        self._add((_REMOVED, e.ns, e.key))

    def _add(self, ev: tuple) -> None:
        if self.closed:
            return
        if len(self._pending) >= MAX_PENDING:
            # drop the queued ones too: the router is told to forget this node (cleared)
            # rather than be left with a hole it cannot see
            self.counters["dropped"] += len(self._pending) + 1
            self._pending.clear()
            self._lost = True
            return
        self._pending.append(ev)
        self._schedule()

    def _schedule(self, delay: float | None = None) -> None:
        if not self._scheduled and self._loop is not None:
            self._scheduled = True
            self._loop.call_later(FLUSH_DELAY if delay is None else delay, self._flush)

    # ------------------------------------------------------------ publishing
    def _flush(self) -> None:
        self._scheduled = False
        if self.closed:
            return
        self._flush_some()
        if self._pending:
            self._schedule(0)  # the rest of a burst next turn: the data path runs in between

    def _flush_some(self) -> None:
        events: list = []
        if self._lost:
            self._lost = False
            events.append(["AllBlocksCleared"])
        pending, medium = self._pending, self.medium
        removed = None  # the hash list of the last event when it is a BlockRemoved
        n = 0
        while pending and n < MAX_BATCH:
            kind, ns, key = pending.popleft()
            h = block_hash(ns, key)
            n += 1
            if kind == _STORED:
                # one per object: several hashes in one BlockStored would claim a chain
                events.append(["BlockStored", [h], None, [], self.block_size, None, medium])
                removed = None
            elif removed is not None:  # a run of removals (an eviction pass, a delete-all)
                removed.append(h)
            else:
                removed = [h]
                events.append(["BlockRemoved", removed, medium])
        if events:
            self._publish(self._packb([time.time(), events, 0]), len(events))

    def _publish(self, payload: bytes, n: int) -> None:
        seq = self.seq
        self.seq += 1
        if self._pub is not None and self._pub.subscribed:
            wire = encode_message((self.topic, seq.to_bytes(8, "big"), payload))
            for conn in tuple(self._pub.subscribed):  # (a failed write removes its connection)
                # never waits: past its bound a subscriber's copy is dropped (it sees the gap)
                if conn.queued + len(wire) > SUBSCRIBER_BUFFER:
                    self.counters["subscriber_drops"] += 1
                else:
                    conn.write(wire)
        self.counters["events"] += n
        self.counters["batches"] += 1
        buf = self._buffer
        if len(buf) == buf.maxlen and buf:
            self._buffer_bytes -= len(buf[0][1])  # the append below pushes it out
        buf.append((seq, payload))
        self._buffer_bytes += len(payload)
        while self._buffer_bytes > REPLAY_MAX_BYTES and len(buf) > 1:
            self._buffer_bytes -= len(buf.popleft()[1])

    # ---------------------------------------------------------------- replay
    def _request(self, conn: ZmtpConnection, frames: list[bytes], bad: bool) -> None:
        """A replay request: ``[b"", start]`` from REQ (or a DEALER sending the delimiter),
        ``[start]`` from a bare DEALER; the answer keeps the same shape."""
        if not bad and len(frames) == 2 and frames[0] == b"" and len(frames[1]) == 8:
            delim, start = True, frames[1]
        elif not bad and len(frames) == 1 and len(frames[0]) == 8:
            delim, start = False, frames[0]
        else:
            self.counters["replay_bad_requests"] += 1
            log.debug("KV events: malformed replay request (%d frames)", len(frames))
            start, delim = None, bool(frames) and frames[0] == b""
        if conn.replay is not None:  # behind the replay in progress: its answer would cut it
            if len(conn.requests) >= MAX_QUEUED_REQUESTS:
                self.counters["replays_refused"] += 1
            else:
                conn.requests.append((delim, start))
            return
        self._begin(conn, delim, start)

    def _begin(self, conn: ZmtpConnection, delim: bool, start: bytes | None) -> None:
        prefix = (b"",) if delim else ()
        if start is None:  # malformed: the end marker, so a client does not wait forever
            conn.write(encode_message((*prefix, END_SEQ, b"")))
            return
        if len(self._replays) >= self.max_replays or sum(
                c.source == conn.source for c in self._replays) >= self.max_replays_per_client:
            self.counters["replays_refused"] += 1
            conn.write(encode_message((*prefix, END_SEQ, b"")))
            return
        self.counters["replays"] += 1
        conn.replay = [prefix, int.from_bytes(start, "big")]
        conn.watch_rate()
        self._replays.append(conn)
        self._schedule_replay()

    def _schedule_replay(self) -> None:
        if not self._replay_scheduled and self._replays and self._loop is not None:
            self._replay_scheduled = True
            self._loop.call_soon(self._replay_some)

    def _replay_some(self) -> None:
        """Send up to REPLAY_CHUNK batches, round-robin over the replays whose connection
        takes bytes (one with REPLAY_BUFFER queued waits until its socket drains)."""
        self._replay_scheduled = False
        if self.closed:
            return
        budget = REPLAY_CHUNK
        buf = self._buffer
        for _ in range(len(self._replays)):
            if budget <= 0:
                break
            conn = self._replays.popleft()
            prefix, nxt = conn.replay
            # buffered seqs are consecutive, so the next batch's index follows from its seq
            # (the buffer moves on while a replay is in progress; what fell out is skipped)
            i = max(0, nxt - buf[0][0]) if buf else 0
            while i < len(buf) and budget > 0 and conn.queued < REPLAY_BUFFER:
                seq, payload = buf[i]
                conn.write(encode_message((*prefix, seq.to_bytes(8, "big"), payload)))
                i += 1
                budget -= 1
                nxt = seq + 1
            if conn.closed:  # a write failed: _replay_ended found it out of the queue
                continue
            if i >= len(buf):
                conn.write(encode_message((*prefix, END_SEQ, b"")))
                conn.replay = None
                conn.idle_since = time.monotonic()
                # next in line: this place (unless the end marker's write closed it)
                while conn.requests and conn.replay is None and not conn.closed:
                    self._begin(conn, *conn.requests.popleft())
            else:
                conn.replay[1] = nxt
                self._replays.append(conn)  # round-robin between subscribers
        if any(c.queued < REPLAY_BUFFER for c in self._replays):
            self._schedule_replay()

    def _replay_ended(self, conn: ZmtpConnection) -> None:
        if conn.replay is not None:
            conn.replay = None
            try:
                self._replays.remove(conn)
            except ValueError:
                pass

    def subscribers(self) -> int:
        """Connections to the events endpoint now (subscribers, and clients that have not
        finished ZMTP's handshake)."""
        return len(self._pub.conns) if self._pub is not None else 0

    def stats(self) -> dict[str, int]:
        return {**self.counters, "pending": len(self._pending), "replay_buffered": len(self._buffer),
                "replay_buffered_bytes": self._buffer_bytes, "seq": self.seq,
                "subscribers": self.subscribers(),
                "replay_connections": len(self._router.conns) if self._router is not None else 0}


# ------------------------------------------------------------------ ZMTP 3 (RFC 23, NULL)

PUB, ROUTER = b"PUB", b"ROUTER"
# the socket types libzmq lets connect to ours (its own check is on its side too)
_PEERS = {PUB: (b"SUB", b"XSUB"), ROUTER: (b"REQ", b"DEALER", b"ROUTER")}
_MORE, _LONG, _COMMAND = 0x01, 0x02, 0x04
_GREETING_SIZE = 64


def _greeting() -> bytes:
    """Ours: signature, version 3.0 (so a libzmq peer sends subscriptions as messages, not
    3.1's SUBSCRIBE commands; both are understood), mechanism NULL, as-server 0, filler."""
    return b"\xff" + b"\0" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\0") + b"\0" * 32


def _frame(flags: int, body: bytes) -> bytes:
    n = len(body)
    if n < 256:
        return bytes((flags, n)) + body
    return bytes((flags | _LONG,)) + n.to_bytes(8, "big") + body


def encode_message(frames: tuple[bytes, ...]) -> bytes:
    """One ZMTP message of ``frames`` as it goes on the wire."""
    last = len(frames) - 1
    return b"".join(_frame(_MORE if i < last else 0, f) for i, f in enumerate(frames))


def _command(name: bytes, data: bytes) -> bytes:
    return _frame(_COMMAND, bytes((len(name),)) + name + data)


def _ready(socket_type: bytes) -> bytes:
    prop = b"Socket-Type"
    return _command(b"READY", bytes((len(prop),)) + prop + len(socket_type).to_bytes(4, "big")
                    + socket_type)


def _properties(data: bytes) -> dict[bytes, bytes] | None:
    """READY's metadata, None when malformed."""
    out, i = {}, 0
    while i < len(data):
        n = data[i]
        name = data[i + 1:i + 1 + n]
        j = i + 1 + n
        if len(name) != n or j + 4 > len(data):
            return None
        m = int.from_bytes(data[j:j + 4], "big")
        if j + 4 + m > len(data):
            return None
        out[name.lower()] = data[j + 4:j + 4 + m]
        i = j + 4 + m
    return out


def _source(sock: socket.socket, addr: Any) -> Any:
    """Whom a connection counts against for the per-client cap: the peer's IP address (a
    port is no identity: one client opens as many as it likes), on a unix socket its uid."""
    if sock.family == socket.AF_UNIX:
        try:
            cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            return ("uid", int.from_bytes(cred[4:8], "little"))
        except (OSError, AttributeError):  # (not Linux: every local peer is one source)
            return ("uid", None)
    return addr[0]


class ZmtpServer:
    """One listening endpoint: accepts at most ``publisher.max_subscribers`` connections at
    once, ``publisher.max_per_client`` of them from one source (one more only for the
    instant of closing it), on the publisher's loop."""

    def __init__(self, publisher: EventPublisher, endpoint: str, setting: str, kind: bytes):
        self.publisher, self.setting, self.kind = publisher, setting, kind
        self.loop = publisher._loop
        self.sock, self.bound, self._path = _listen(endpoint, setting)
        self.conns: set[ZmtpConnection] = set()
        self.per_source: collections.Counter = collections.Counter()  # open connections
        self.subscribed: list[ZmtpConnection] = []  # PUB: connections whose subscription matches
        self.refused_since_log = 0
        self.logged = -REFUSED_LOG_EVERY
        self.source_refused_since_log = 0
        self.source_logged = -REFUSED_LOG_EVERY
        self.failed_logged = -REFUSED_LOG_EVERY
        self._retry: asyncio.TimerHandle | None = None
        self.loop.add_reader(self.sock.fileno(), self._accept)

    @property
    def limit(self) -> int:
        return self.publisher.max_subscribers

    def close(self) -> None:
        if self.sock is None:
            return
        if self._retry is not None:
            self._retry.cancel()
        else:
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        self.sock = None
        if self._path:
            try:
                os.unlink(self._path)
            except OSError:
                pass
        for conn in list(self.conns):
            conn.close()

    def _accept(self) -> None:
        for _ in range(MAX_ACCEPTS_PER_TURN):
            try:
                sock, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                self._accept_failed(e)
                return
            if len(self.conns) >= self.limit:
                sock.close()
                self._refused()
                continue
            source = _source(sock, addr)
            if self.per_source[source] >= self.publisher.max_per_client:
                sock.close()
                self._refused_source(source)
                continue
            conn = ZmtpConnection(self, sock)
            conn.source = source
            self.per_source[source] += 1
            self.conns.add(conn)
            conn.write(_greeting())

    def _accept_failed(self, e: OSError) -> None:
        """Out of descriptors (or memory): counted, logged once a minute at most; no accept
        for ACCEPT_RETRY_DELAY (the listening socket stays ready: retrying at once spins)."""
        self.publisher.counters["accept_failed"] += 1
        now = time.monotonic()
        if now - self.failed_logged >= REFUSED_LOG_EVERY:
            self.failed_logged = now
            log.warning("KV events: accept on %s failed (%s): new subscribers wait until "
                        "descriptors are free", self.setting, e.strerror or e)
        self.loop.remove_reader(self.sock.fileno())
        self._retry = self.loop.call_later(ACCEPT_RETRY_DELAY, self._resume)

    def _resume(self) -> None:
        self._retry = None
        if self.sock is not None:
            self.loop.add_reader(self.sock.fileno(), self._accept)

    def _refused(self) -> None:
        self.publisher.counters["subscribers_refused"] += 1
        self.refused_since_log += 1
        now = time.monotonic()
        if now - self.logged >= REFUSED_LOG_EVERY:
            log.warning("KV events: %d connection(s) to %s refused: %d at once at most "
                        "(events.max_subscribers)", self.refused_since_log, self.setting,
                        self.limit)
            self.logged, self.refused_since_log = now, 0

    def _refused_source(self, source: Any) -> None:
        self.publisher.counters["subscribers_refused"] += 1
        self.publisher.counters["subscribers_refused_per_client"] += 1
        self.source_refused_since_log += 1
        now = time.monotonic()
        if now - self.source_logged >= REFUSED_LOG_EVERY:
            who = f"uid {source[1]}" if isinstance(source, tuple) else source
            log.warning("KV events: %d connection(s) to %s refused for their source (the last "
                        "from %s): %d at once from one source at most "
                        "(events.max_subscribers_per_client)", self.source_refused_since_log,
                        self.setting, who, self.publisher.max_per_client)
            self.source_logged, self.source_refused_since_log = now, 0

    def gone(self, conn: ZmtpConnection) -> None:
        if conn in self.conns:
            self.conns.discard(conn)
            self.per_source[conn.source] -= 1
            if not self.per_source[conn.source]:
                del self.per_source[conn.source]
        if conn.matching:
            self.subscribed.remove(conn)


class ZmtpConnection:
    """One accepted connection: greeting and READY within HANDSHAKE_TIMEOUT, then frames
    read into bounded buffers; writes never block (what the socket does not take is
    queued: the publisher bounds it)."""

    def __init__(self, server: ZmtpServer, sock: socket.socket):
        self.server, self.sock = server, sock
        self.publisher = server.publisher
        self.loop = server.loop
        self.fd = sock.fileno()
        sock.setblocking(False)
        if sock.family != socket.AF_UNIX:
            try:  # batches are small and wanted now
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                # a subscriber never has to send: one whose host vanished is found by
                # keepalive probes (gone after KEEPALIVE_IDLE + 3 x KEEPALIVE_INTERVAL)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                if hasattr(socket, "TCP_KEEPIDLE"):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
            except OSError:  # reset already: the first read says so
                pass
        self.rbuf = bytearray()
        # bytes objects (shared by every subscriber's queue), chunks of small writes, and
        # a view of the head's unsent part
        self.wbuf: collections.deque = collections.deque()
        self.queued = 0  # bytes in wbuf
        self.greeted = self.ready = False
        self.frames: list[bytes] = []  # of the message being received
        self.bad = False  # that message is malformed (too many or too large frames)
        self.skip = 0  # bytes of an oversized frame still to skip
        self.skip_more = False  # that frame had MORE set
        self.topics: dict[bytes, int] = {}  # subscriptions matching events.topic, with counts
        self.matching = False  # in server.subscribed
        self.replay: list | None = None  # [reply prefix, next seq] while a replay runs
        self.requests: collections.deque = collections.deque()
        self.idle_since = time.monotonic()
        self.source: Any = None  # set by the server: whom it counts against
        self.sent = 0  # bytes the socket took
        self.rate: asyncio.TimerHandle | None = None  # the replay rate check while one runs
        self.rate_mark = 0  # self.delivered() when the current window began
        # past this many bytes queued the connection is not read: what it sends (PINGs,
        # requests) would queue answers without bound if it never reads them
        self.read_bound = SUBSCRIBER_BUFFER if server.kind == PUB else REPLAY_BUFFER
        self.reading = True
        self.closed = False
        self.timer = self.loop.call_later(HANDSHAKE_TIMEOUT, self._handshake_expired)
        self.loop.add_reader(self.fd, self._readable)

    # ---------------------------------------------------------------- writing
    def write(self, data: bytes) -> None:
        if self.closed:
            return
        if not self.wbuf:
            try:
                n = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:
                self.close()
                return
            self.sent += n
            if n == len(data):
                return
            self.loop.add_writer(self.fd, self._writable)
            self.wbuf.append(memoryview(data)[n:])
            self.queued += len(data) - n
        else:
            # the head (index 0) may be exported to a view: only a chunk behind it grows
            tail = self.wbuf[-1] if len(self.wbuf) > 1 else None
            if len(data) >= SMALL_WRITE:
                self.wbuf.append(data)
            elif type(tail) is bytearray and len(tail) + len(data) <= QUEUE_CHUNK:
                tail += data
            else:
                self.wbuf.append(bytearray(data))
            self.queued += len(data)
        if self.reading and self.queued > self.read_bound:
            self.reading = False
            self.loop.remove_reader(self.fd)

    def _writable(self) -> None:
        while self.wbuf:
            try:
                n = self.sock.sendmsg(itertools.islice(self.wbuf, 64))
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.close()
                return
            self.queued -= n
            self.sent += n
            while n:
                head = self.wbuf[0]
                if n >= len(head):
                    n -= len(head)
                    self.wbuf.popleft()
                else:
                    self.wbuf[0] = memoryview(head)[n:]
                    n = 0
            if self.replay is not None and self.queued < REPLAY_BUFFER:
                self.publisher._schedule_replay()
            if not self.reading and self.queued <= self.read_bound // 2:
                self.reading = True
                self.loop.add_reader(self.fd, self._readable)
        self.loop.remove_writer(self.fd)

    def watch_rate(self) -> None:
        """A replay began: from now on, each replay_rate_window, a connection with bytes
        still queued must have taken replay_min_rate x window of them (at least one) since
        the last check, or it is closed: a reader taking a few KiB now and then held one of
        MAX_REPLAYS places for good. One with nothing queued is waiting for us, not slow."""
        if self.rate is None:
            self.rate_mark = self.delivered()
            self.rate = self.loop.call_later(self.publisher.replay_rate_window, self._check_rate)

    def delivered(self) -> int:
        """Bytes the peer has taken: those the socket took less those still in the kernel's
        send queue (what the socket takes moves in lumps of a third of its buffer, up to
        ~4 MiB on Linux: a reader's rate is what leaves the kernel)."""
        if _OUTQ is None:
            return self.sent
        try:
            unsent = struct.unpack("i", fcntl.ioctl(self.fd, _OUTQ, b"\0\0\0\0"))[0]
        except OSError:
            unsent = 0
        return self.sent - unsent

    def _check_rate(self) -> None:
        self.rate = None
        if self.closed or self.replay is None:
            return
        pub = self.publisher
        window = pub.replay_rate_window
        taken = self.delivered() - self.rate_mark
        need = max(1, int(pub.replay_min_rate * window))
        if taken < need and self.queued:
            pub.counters["replays_stalled"] += 1
            log.info("KV events: a replay connection took %d bytes in %.1f s, under "
                     "events.replay_min_rate (%d bytes/s): closed", taken, window,
                     pub.replay_min_rate)
            try:  # a reset: the kernel drops the megabytes it still holds for it at once
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            self.close()
            return
        self.watch_rate()

    # ---------------------------------------------------------------- reading
    def _readable(self) -> None:
        try:
            data = self.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        if not data:
            self.close()
            return
        self.rbuf += data
        self._parse()

    def _parse(self) -> None:
        buf = self.rbuf
        pos = 0
        if not self.greeted:
            if len(buf) < _GREETING_SIZE:
                if buf[:1] not in (b"", b"\xff"):  # not ZMTP 2+ (1.0 or not ZMQ at all)
                    self._fail("not a ZMTP 3 greeting")
                return
            g = bytes(buf[:_GREETING_SIZE])
            if g[0] != 0xFF or g[9] & 1 != 1 or g[10] < 3 or g[12:32].rstrip(b"\0") != b"NULL":
                self._fail("not a ZMTP 3 NULL-security greeting")
                return
            self.greeted = True
            pos = _GREETING_SIZE
            self.write(_ready(self.server.kind))
        while not self.closed:
            if self.skip:  # the rest of an oversized frame: dropped as it comes
                n = min(self.skip, len(buf) - pos)
                self.skip -= n
                pos += n
                if self.skip:
                    break
                if not self.skip_more:
                    self._message()
                continue
            if len(buf) - pos < 2:
                break
            flags = buf[pos]
            if flags & _LONG:
                if len(buf) - pos < 9:
                    break
                size, hdr = int.from_bytes(buf[pos + 1:pos + 9], "big"), 9
            else:
                size, hdr = buf[pos + 1], 2
            if flags & _COMMAND:
                if size > MAX_FRAME:  # no command of ours is this large
                    self._fail("command frame too large")
                    return
                if len(buf) - pos < hdr + size:
                    break
                body = bytes(buf[pos + hdr:pos + hdr + size])
                pos += hdr + size
                self._command(body)
                continue
            if not self.ready:
                self._fail("a message before READY")
                return
            if size > MAX_FRAME:
                self.bad = True
                self.skip, self.skip_more = size, bool(flags & _MORE)
                pos += hdr
                continue
            if len(buf) - pos < hdr + size:
                break
            if len(self.frames) < MAX_FRAMES:
                self.frames.append(bytes(buf[pos + hdr:pos + hdr + size]))
            else:
                self.bad = True
            pos += hdr + size
            if not flags & _MORE:
                self._message()
        if pos:
            del buf[:pos]

    def _command(self, body: bytes) -> None:
        n = body[0] if body else 0
        name, data = body[1:1 + n], body[1 + n:]
        if name == b"READY" and not self.ready:
            props = _properties(data)
            if props is None or props.get(b"socket-type") not in _PEERS[self.server.kind]:
                self._fail("READY without a matching Socket-Type")
                return
            self.ready = True
            self.timer.cancel()
            if self.server.kind == ROUTER:
                self.timer = self.loop.call_later(REPLAY_IDLE_TIMEOUT, self._idle_check)
        elif not self.ready:
            self._fail(f"{name!r} before READY")
        elif name == b"PING":  # ZMTP 3.1 heartbeat: TTL (2 bytes), then the context to echo
            self.write(_command(b"PONG", data[2:18]))
        elif name == b"SUBSCRIBE":
            self._subscription(True, data)
        elif name == b"CANCEL":
            self._subscription(False, data)
        elif name == b"ERROR":
            self.close()

    def _message(self) -> None:
        frames, bad = self.frames, self.bad
        self.frames, self.bad = [], False
        if self.server.kind == PUB:  # a subscription (ZMTP 3.0): 1 or 0, then the topic
            if not bad and len(frames) == 1 and frames[0][:1] in (b"\x01", b"\x00"):
                self._subscription(frames[0][0] == 1, frames[0][1:])
            return
        self.idle_since = time.monotonic()
        self.publisher._request(self, frames, bad)

    def _subscription(self, on: bool, topic: bytes) -> None:
        """Only subscriptions that match events.topic are kept (a count each): the others
        could never select a message, and keeping them would cost memory without bound."""
        if self.server.kind != PUB or not self.publisher.topic.startswith(topic):
            return
        if on:
            self.topics[topic] = self.topics.get(topic, 0) + 1
        elif topic in self.topics:
            self.topics[topic] -= 1
            if not self.topics[topic]:
                del self.topics[topic]
        wants = bool(self.topics)
        if wants != self.matching:
            self.matching = wants
            if wants:
                self.server.subscribed.append(self)
            else:
                self.server.subscribed.remove(self)

    # ------------------------------------------------------------------ ending
    def _handshake_expired(self) -> None:
        self._fail(f"no ZMTP handshake within {HANDSHAKE_TIMEOUT:.0f} s")

    def _idle_check(self) -> None:
        """Replay connections: closed after REPLAY_IDLE_TIMEOUT without a replay (ZMQ
        clients reconnect by themselves); one with a replay is the rate check's."""
        if self.closed:
            return
        left = self.idle_since + REPLAY_IDLE_TIMEOUT - time.monotonic()
        if self.replay is None and left <= 0:
            self.close()
        else:
            self.timer = self.loop.call_later(max(left, 1.0), self._idle_check)

    def _fail(self, why: str) -> None:
        if not self.ready:
            self.publisher.counters["handshakes_failed"] += 1
        log.debug("KV events: %s connection closed: %s", self.server.setting, why)
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.timer.cancel()
        if self.rate is not None:
            self.rate.cancel()
        self.loop.remove_reader(self.fd)
        if self.wbuf:
            self.loop.remove_writer(self.fd)
        self.wbuf.clear()
        self.queued = 0
        self.sock.close()
        self.publisher._replay_ended(self)
        self.server.gone(self)


def _listen(endpoint: str, setting: str) -> tuple[socket.socket, str, str]:
    """A non-blocking listening socket for a tcp:// or ipc:// endpoint (ZMQ's spelling:
    ``*`` for every address or for any port, ``ipc://@name`` for Linux's abstract
    namespace); returns (socket, the endpoint as bound, the ipc path to remove at close)."""
    hint = "use e.g. tcp://127.0.0.1:5557, tcp://*:5557 or ipc:///run/kvstored/events"
    path = ""
    try:
        if endpoint.startswith("ipc://"):
            name = endpoint[6:]
            addr = "\0" + name[1:] if name.startswith("@") else name
            if not name.startswith("@"):
                _remove_stale(name)
                path = name
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(addr)
                sock.listen(BACKLOG)
            except BaseException:
                sock.close()
                raise
            bound = endpoint
        elif endpoint.startswith("tcp://"):
            host, _, port = endpoint[6:].rpartition(":")
            host = "0.0.0.0" if host == "*" else host.strip("[]")
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.create_server((host, 0 if port == "*" else int(port)), family=family,
                                        backlog=BACKLOG)
            p = sock.getsockname()[1]
            bound = f"tcp://{endpoint[6:].rpartition(':')[0]}:{p}"
        else:
            raise EventsError(f"{setting}: {endpoint!r} is not a tcp:// or ipc:// endpoint; {hint}")
    except EventsError:
        raise
    except (OSError, ValueError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise EventsError(f"{setting}: cannot bind {endpoint!r} ({why}); {hint}") from None
    sock.setblocking(False)
    return sock, bound, path


def _remove_stale(path: str) -> None:
    """An ipc path left by an earlier run is removed (as libzmq does); one a process still
    listens on, or a file that is not a socket, is an error (bind then says so)."""
    try:
        st = os.lstat(path)
    except OSError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        return  # bind fails: Address already in use
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
    finally:
        probe.close()


def default_replay_endpoint(endpoint: str) -> str:
    """The replay endpoint next to ``endpoint`` (vLLM's examples: PUB 5557, replay 5558):
    a tcp port + 1 (any free port beside port ``*``: the ready file names both), or
    ``-replay`` appended to an ipc path."""
    if endpoint.startswith("tcp://"):
        host, sep, port = endpoint[6:].rpartition(":")
        if sep and port == "*":
            return endpoint
        if sep and port.isdigit() and 0 < int(port) < 65535:
            return f"tcp://{host}:{int(port) + 1}"
        return ""
    if endpoint.startswith("ipc://"):
        return endpoint + "-replay"
    return ""
