"""KV events for routers, in vLLM's wire format (ZMQ PUB, msgpack).

KV-aware routers (vLLM's, Dynamo's, llm-d's) learn which blocks a worker holds
from the events vLLM publishes. A kvstored node publishes the same stream for
the objects it holds, so a router can subscribe to it like to an engine.

Wire format (what vLLM's ``ZmqEventPublisher`` sends, field for field):

* a ZMQ PUB socket; each message is three frames: the topic (``events.topic``,
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

Late subscribers and gaps: a ROUTER socket (``events.replay_endpoint``) answers
a request carrying a start sequence number (8 bytes, big-endian; sent from a
REQ socket or a DEALER with an empty delimiter frame) with every buffered
batch from that number on, each as ``[seq, payload]``, then ``[-1, b""]``
(vLLM's protocol). The buffer keeps the last ``events.replay_buffer`` batches
(and at most ``REPLAY_MAX_BYTES``).

The data path never waits for this: the store's commit and removal only append
a tuple to a bounded queue; batches are encoded and handed to ZMQ (non-blocking;
its own I/O thread does the sending) every ``FLUSH_DELAY`` (2 ms) at most. A subscriber
that does not read costs at most ``SNDHWM`` queued messages, after which ZMQ
drops its messages (it sees a gap in the sequence and can replay). Should the
queue itself overflow (a burst of more than ``MAX_PENDING`` events between two
flushes, e.g. a delete-all of a huge namespace), the queued events are dropped
and counted (``kvstored_kv_events_dropped_total``), and the next batch starts
with AllBlocksCleared: a router then under-estimates this node, never trusts a
block that is gone.

Connections: ZMQ accepts any number on a bound socket, each a descriptor of this process
outside the node's connection limits. So each endpoint takes at most
``events.max_subscribers`` at once (kept aside in the descriptor budget, descriptors.py):
a ZMQ socket monitor reports every accept with its descriptor, and one over the limit is
shut down at once (``shutdown`` on a duplicate; ZMQ's I/O thread then sees it end and
closes its own). Refusals are counted (``kvstored_kv_event_subscribers_refused_total``)
and logged once a minute at most. A refused ZMQ subscriber reconnects by itself (every
100 ms by default) and gets in once a place is free.

The limit is on connections kept, not on accepts: ZMQ accepts (and greets) in its own I/O
thread before the loop reads the reports, so a burst holds descriptors past the limit
until the loop has read them: one loop turn after they come in at best, every one that
comes while the loop is busy. Measured (limit 4, 500 connections at once from another
process, a shared 2-core machine): 60-300 held past the limit at the peak, all closed
within the next turns. Not bounded tighter: only ZMQ's thread could stop its accepts in
time, it has no option for it, and ``zmq_unbind`` (the one way to stop them from here)
also ends the connections that listener accepted. The excess comes out of what the
budget leaves free (descriptors.py: HEADROOM, data places not in use); at the process's
limit accepts fail with EMFILE (the descriptor watch logs it) until the loop has closed it.
"""
from __future__ import annotations

import asyncio
import collections
import errno
import functools
import logging
import os
import socket
import time
from typing import Any

from xxhash import xxh3_64_intdigest

log = logging.getLogger("kvstored.events")

MAX_PENDING = 65536  # events queued between two flushes before they are dropped
# Events wait this long to share a batch: a batch costs a ZMQ send (several us) on the
# loop, so at most ~500 batches/s whatever the put rate; routers do not notice 2 ms.
FLUSH_DELAY = 0.002
MAX_BATCH = 256  # events per published batch (a burst is split over loop turns)
# Messages ZMQ queues per subscriber before dropping that subscriber's: 8 s at the most
# batches a second; memory at most SNDHWM x ~10 KiB (a full batch) per stalled subscriber
SNDHWM = 4000
REPLAY_MAX_BYTES = 32 << 20  # payload bytes the replay buffer keeps at most
REPLAY_CHUNK = 256  # batches a replay sends per loop turn (others are served meanwhile)
MAX_REPLAYS = 16  # replays in progress at once; more requests get only the end marker
MAX_REQUESTS_PER_TURN = 64  # replay requests read per loop turn
END_SEQ = (-1).to_bytes(8, "big", signed=True)
MAX_MONITOR_EVENTS_PER_TURN = 256  # accept/disconnect reports read per loop turn
RECONCILE_EVERY = 1.0  # s: at the limit, drop tracked connections gone unreported, at most this often
REFUSED_LOG_EVERY = 60.0  # s between warnings while connections are refused

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


def _zmq():
    try:
        import msgpack
        import zmq
        import zmq.utils.monitor  # noqa: F401 (here: read accepts without an import, which
        # failed with EMFILE in a burst that took the process to its descriptor limit)
    except ModuleNotFoundError as e:
        raise EventsError(f"events.endpoint is set but the '{e.name}' package is not "
                          "installed: pip install 'kvstored[server]'") from None
    return zmq, msgpack


class EventPublisher:
    """Publishes the store's index changes; the store's observer calls ``stored``/``removed``.

    Lives on the daemon's event loop (the store does): no locks.
    """

    def __init__(self, endpoint: str, *, replay_endpoint: str = "", replay_buffer: int = 10000,
                 topic: str = "", medium: str = "EXTERNAL", block_size: int = 0,
                 max_subscribers: int = 64):
        self.endpoint = endpoint
        self.max_subscribers = max_subscribers
        self.replay_endpoint = replay_endpoint
        self.topic = topic.encode()
        self.medium = medium or None
        self.block_size = block_size
        self._pending: collections.deque = collections.deque()
        self._lost = False  # events were dropped: the next batch starts with AllBlocksCleared
        self._scheduled = False
        self._buffer: collections.deque[tuple[int, bytes]] = collections.deque(maxlen=replay_buffer)
        self._buffer_bytes = 0
        self._replays: collections.deque = collections.deque()  # [ident, delim, next seq]
        self._replay_scheduled = False
        self.seq = 0
        self.counters = dict.fromkeys(("events", "batches", "dropped", "send_errors", "replays",
                                       "replay_bad_requests", "replays_refused",
                                       "subscribers_refused"), 0)
        self._limits: list[ConnectionLimit] = []  # the PUB's, then the ROUTER's
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ctx = self._pub = self._router = None
        self._packb = None
        self._z: Any = None  # the zmq module, once started
        self._reader_fd: int | None = None
        self.closed = False

    # ------------------------------------------------------------ lifecycle
    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Bind the sockets and announce AllBlocksCleared. Raises EventsError (one line)."""
        zmq, msgpack = _zmq()
        self._z = zmq
        self._packb = msgpack.Packer(use_bin_type=True).pack
        self._loop = loop or asyncio.get_running_loop()
        self._ctx = zmq.Context(io_threads=1)
        try:
            self._pub = self._bind(zmq.PUB, self.endpoint, "events.endpoint")
            self._limits.append(ConnectionLimit(self, self._pub, "events.endpoint"))
            if self.replay_endpoint:
                self._router = self._bind(zmq.ROUTER, self.replay_endpoint,
                                          "events.replay_endpoint")
                self._limits.append(ConnectionLimit(self, self._router, "events.replay_endpoint"))
                self._reader_fd = self._router.getsockopt(zmq.FD)
                self._loop.add_reader(self._reader_fd, self._service_replay)
        except BaseException:
            self.close()
            raise
        self._lost = True  # first batch: AllBlocksCleared (see the module docstring)
        self._schedule()

    def _bind(self, kind: int, endpoint: str, setting: str):
        zmq = self._z
        s = self._ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, SNDHWM)
        try:
            s.bind(endpoint)
        except zmq.ZMQError as e:
            s.close(0)
            why = os.strerror(e.errno) if e.errno and e.errno < 1000 else str(e)  # not ZMQ's addr=
            raise EventsError(f"{setting}: cannot bind {endpoint!r} ({why}); use e.g. "
                              "tcp://127.0.0.1:5557, tcp://*:5557 or ipc:///run/kvstored/events")
        return s

    def close(self) -> None:
        """Publish what is queued (best effort), then close the sockets at once (no linger)."""
        if self.closed:
            return
        self.closed = True
        if self._pub is not None and (self._pending or self._lost):
            self._scheduled = True  # no new schedule: flush now, in full
            while self._pending or self._lost:
                self._flush_some()
        if self._reader_fd is not None and self._loop is not None:
            self._loop.remove_reader(self._reader_fd)
            self._reader_fd = None
        for lim in self._limits:
            lim.close()
        self._limits = []
        for s in (self._pub, self._router):
            if s is not None:
                s.close(0)
        self._pub = self._router = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

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
        zmq = self._z
        seq = self.seq
        self.seq += 1
        try:
            # PUB never blocks: at a subscriber's SNDHWM ZMQ drops that subscriber's copy
            self._pub.send_multipart((self.topic, seq.to_bytes(8, "big"), payload),
                                     flags=zmq.NOBLOCK)
        except zmq.ZMQError as e:  # the batch stays replayable
            self.counters["send_errors"] += 1
            if self.counters["send_errors"] == 1:
                log.warning("KV events: publishing failed (%s); batches stay in the replay "
                            "buffer", e.strerror)
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
    def _service_replay(self) -> None:
        """Read replay requests (the ROUTER's fd is edge-triggered: read until empty)."""
        if self._router is None:
            return
        zmq = self._z
        for _ in range(MAX_REQUESTS_PER_TURN):
            try:
                if not self._router.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    break
                frames = self._router.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                break
            except zmq.ZMQError as e:
                log.warning("KV events: replay socket error (%s)", e.strerror)
                break
            self._request(frames)
        else:  # more may be waiting: look again next turn, without a new fd edge
            self._loop.call_soon(self._service_replay)
        if self._replays and not self._replay_scheduled:
            self._replay_scheduled = True
            self._loop.call_soon(self._replay_some)

    def _request(self, frames: list[bytes]) -> None:
        # [identity, b"", start] from REQ (or a DEALER sending the delimiter); [identity,
        # start] from a bare DEALER: the answer keeps the same shape
        if len(frames) == 3 and frames[1] == b"" and len(frames[2]) == 8:
            ident, delim, start = frames[0], [b""], frames[2]
        elif len(frames) == 2 and len(frames[1]) == 8:
            ident, delim, start = frames[0], [], frames[1]
        else:
            self.counters["replay_bad_requests"] += 1
            log.debug("KV events: malformed replay request (%d frames)", len(frames))
            if len(frames) >= 2:  # answer the end marker, so a client does not wait forever
                delim = [b""] if frames[1] == b"" else []
                self._send_reply([frames[0], *delim, END_SEQ, b""])
            return
        if len(self._replays) >= MAX_REPLAYS:
            self.counters["replays_refused"] += 1
            self._send_reply([ident, *delim, END_SEQ, b""])
            return
        self.counters["replays"] += 1
        self._replays.append([ident, delim, int.from_bytes(start, "big")])

    def _replay_some(self) -> None:
        self._replay_scheduled = False
        if self._router is None:
            return
        budget = REPLAY_CHUNK
        buf = self._buffer
        while self._replays and budget > 0:
            job = self._replays[0]
            ident, delim, nxt = job
            # buffered seqs are consecutive, so the next batch's index follows from its seq
            # (the buffer moves on while a replay is in progress; what fell out is skipped)
            i = max(0, nxt - buf[0][0]) if buf else 0
            while i < len(buf) and budget > 0:
                seq, payload = buf[i]
                self._send_reply([ident, *delim, seq.to_bytes(8, "big"), payload])
                i += 1
                budget -= 1
                nxt = seq + 1
            if i >= len(buf):
                self._send_reply([ident, *delim, END_SEQ, b""])
                self._replays.popleft()
            else:
                job[2] = nxt
                self._replays.rotate(-1)  # round-robin between subscribers
        if self._replays:
            self._replay_scheduled = True
            self._loop.call_soon(self._replay_some)
        # sending on the ROUTER can consume its fd's edge: look for requests again
        self._loop.call_soon(self._service_replay)

    def _send_reply(self, frames: list[bytes]) -> None:
        zmq = self._z
        try:  # ROUTER drops (never blocks) for a peer past its HWM or gone
            self._router.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def subscribers(self) -> int:
        """Connections to the events endpoint now (subscribers, and clients that never
        finished ZMQ's handshake)."""
        return len(self._limits[0].live) if self._limits else 0

    def stats(self) -> dict[str, int]:
        return {**self.counters, "pending": len(self._pending), "replay_buffered": len(self._buffer),
                "replay_buffered_bytes": self._buffer_bytes, "seq": self.seq,
                "subscribers": self.subscribers(),
                "replay_connections": len(self._limits[1].live) if len(self._limits) > 1 else 0}


class ConnectionLimit:
    """At most ``publisher.max_subscribers`` connections on one bound ZMQ socket (see the
    module docstring); reads the socket's monitor on the publisher's loop."""

    def __init__(self, publisher: EventPublisher, sock, setting: str):
        zmq = publisher._z
        self.zmq, self.publisher, self.setting = zmq, publisher, setting
        self.limit = publisher.max_subscribers
        self.sock = sock
        self.local = _local_address(sock.getsockopt(zmq.LAST_ENDPOINT).decode())
        self.live: set[int] = set()  # descriptors of the connections ZMQ holds
        self.reconciled = 0.0
        self.refused_since_log = 0
        self.logged = -REFUSED_LOG_EVERY
        self.mon = sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self.loop = publisher._loop
        self.fd = self.mon.getsockopt(zmq.FD)
        self.loop.add_reader(self.fd, self._read)
        self.loop.call_soon(self._read)  # ZMQ's fd signals changes only: read what came first

    def close(self) -> None:
        if self.mon is None:
            return
        self.loop.remove_reader(self.fd)
        try:
            self.sock.disable_monitor()
        except self.zmq.ZMQError:
            pass
        self.mon.close(0)
        self.mon = None

    def _read(self) -> None:
        """Monitor reports (edge-triggered fd: read until empty, a bounded number a turn)."""
        zmq = self.zmq
        if self.mon is None:
            return
        parse_monitor_message = zmq.utils.monitor.parse_monitor_message
        for _ in range(MAX_MONITOR_EVENTS_PER_TURN):
            try:
                if not self.mon.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    return
                msg = parse_monitor_message(self.mon.recv_multipart(flags=zmq.NOBLOCK))
            except zmq.Again:
                return
            except zmq.ZMQError as e:
                log.warning("KV events: %s monitor error (%s)", self.setting, e.strerror)
                return
            fd = int(msg["value"])
            if msg["event"] == zmq.EVENT_DISCONNECTED:
                self.live.discard(fd)
            elif msg["event"] == zmq.EVENT_ACCEPTED:
                self._accepted(fd)
        self.loop.call_soon(self._read)  # more may be waiting, without a new fd edge

    def _accepted(self, fd: int) -> None:
        if len(self.live) >= self.limit:
            self._reconcile()
        if len(self.live) < self.limit:
            self.live.add(fd)
            return
        ours = _shut_down_if(fd, self.local)
        if ours:
            self.publisher.counters["subscribers_refused"] += 1
            self.refused_since_log += 1
            now = time.monotonic()
            if now - self.logged >= REFUSED_LOG_EVERY:
                log.warning("KV events: %d connection(s) to %s refused: %d at once at most "
                            "(events.max_subscribers)", self.refused_since_log, self.setting,
                            self.limit)
                self.logged, self.refused_since_log = now, 0
        elif ours is None:  # not checked (out of descriptors): a connection all the same
            self.live.add(fd)
        # False: closed (and its descriptor reused) before this report was read

    def _reconcile(self) -> None:
        """Drop descriptors no longer ours (a disconnect the monitor did not report: its
        queue is bounded); at most every RECONCILE_EVERY s."""
        now = time.monotonic()
        if now - self.reconciled < RECONCILE_EVERY:
            return
        self.reconciled = now
        for fd in list(self.live):
            if _shut_down_if(fd, self.local, shut=False) is False:
                self.live.discard(fd)


def _local_address(endpoint: str) -> tuple[int, Any]:
    """(family, port or path) of a bound ZMQ endpoint (ZMQ_LAST_ENDPOINT)."""
    if endpoint.startswith("ipc://"):
        return socket.AF_UNIX, endpoint[6:]
    return socket.AF_INET, int(endpoint.rpartition(":")[2])


def _shut_down_if(fd: int, local: tuple[int, Any], shut: bool = True) -> bool | None:
    """Whether ``fd`` is a connection accepted on ``local``; if so and ``shut``, shut it
    down. The check guards against a descriptor closed and reused since its report. Works
    on a duplicate: ZMQ's I/O thread owns ``fd`` and closes it once it sees the end.
    None: not known (no descriptor left for the duplicate)."""
    try:
        dup = os.dup(fd)
    except OSError as e:
        return False if e.errno == errno.EBADF else None
    try:
        s = socket.socket(fileno=dup)
    except OSError:
        os.close(dup)
        return False
    with s:
        try:
            if s.type != socket.SOCK_STREAM:
                return False
            name = s.getsockname()
            if local[0] == socket.AF_UNIX:
                ours = s.family == socket.AF_UNIX and name == local[1]
            else:
                ours = s.family in (socket.AF_INET, socket.AF_INET6) and name[1] == local[1]
            if ours and shut:
                s.shutdown(socket.SHUT_RDWR)
            return ours
        except OSError:
            return False


def default_replay_endpoint(endpoint: str) -> str:
    """The replay endpoint next to ``endpoint`` (vLLM's examples: PUB 5557, replay 5558):
    a tcp port + 1, or ``-replay`` appended to an ipc path."""
    if endpoint.startswith("tcp://"):
        host, sep, port = endpoint[6:].rpartition(":")
        if sep and port.isdigit() and 0 < int(port) < 65535:
            return f"tcp://{host}:{int(port) + 1}"
        return ""
    if endpoint.startswith("ipc://"):
        return endpoint + "-replay"
    return ""
