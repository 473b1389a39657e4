"""A verified TCP get hashes a large payload chunk by chunk as it lands (channel.VERIFY_CHUNK):
same checksum as hashing it whole, the same typed ChecksumMismatch when bytes were damaged
on the way (whichever chunk they are in), a typed error and a connection in step after a
payload cut short, and get_into still writes straight into the caller's buffer.

The daemon is real; what damages or cuts the bytes is a relay between the SDK and the
daemon's data port (a faulty network, not a stand-in for the daemon)."""
from __future__ import annotations

import socket
import threading
import time

import pytest
import relayutil

import kvstore
from kvstore import channel
from kvstore.wire import HEADER_SIZE, checksum

MiB = 1 << 20
CHUNK = channel.VERIFY_CHUNK


def _val(seed: int, n: int) -> bytes:
    return (seed.to_bytes(4, "little") * (n // 4 + 1))[:n]


class Relay(relayutil.Relay):
    """Forwards one or more TCP connections to ``target``. Bytes from the daemon pass through
    ``flip`` (stream offsets, per connection, whose byte is inverted) and ``cut`` (after that
    many bytes of a connection, both sides are closed). Threads end with the sockets."""

    def __init__(self, target: tuple[str, int]):
        self.flip: set[int] = set()
        self.cut: int | None = None
        super().__init__(target)

    def pumps(self, client, daemon) -> list:
        # this connection keeps the flips and cut set when it was accepted
        return [(self.pass_through, (client, daemon)),
                (self._damage, (daemon, client, set(self.flip), self.cut))]

    def _damage(self, src: socket.socket, dst: socket.socket, flip: set[int], cut: int | None) -> None:
        off = 0
        try:
            while not self._stop.is_set():
                data = src.recv(1 << 20)
                if not data:
                    break
                if cut is not None and off + len(data) >= cut:
                    dst.sendall(data[:cut - off])
                    break
                hit = [o - off for o in flip if off <= o < off + len(data)]
                if hit:
                    data = bytearray(data)
                    for i in hit:
                        data[i] ^= 0xFF
                dst.sendall(data)
                off += len(data)
        except OSError:
            pass
        self.shut(src, dst)


@pytest.fixture
def daemon(shared_daemon):
    """The module's tests share one kvstored, emptied before each (conftest.shared_daemon)."""
    return shared_daemon


@pytest.fixture
def relay(daemon):
    r = Relay(("127.0.0.1", daemon.data_port))
    yield r
    r.close()


def _client(daemon, relay, **kw) -> kvstore.Client:
    return kvstore.Client(daemon.control, namespace="vs", timeout=10.0, transport="tcp",
                          data_address=f"127.0.0.1:{relay.port}", **kw)


# First bytes of a get's payload on a fresh relayed connection: the setup PING's answer
# (one header), then the get's header.
PAYLOAD_AT = 2 * HEADER_SIZE


def test_recv_hashed_matches_whole_checksum():
    """Sizes around the chunk boundaries, received over a socket pair."""
    a, b = socket.socketpair()
    try:
        ch = channel.TcpChannel.__new__(channel.TcpChannel)
        ch.sock = a
        ch._init_framing(10.0)
        for n in (0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 12345):
            data = _val(n, n)
            t = threading.Thread(target=b.sendall, args=(data,))
            t.start()
            buf = bytearray(n)
            got = ch.recv_hashed(memoryview(buf))
            t.join(10)
            assert got == checksum(data) and buf == data, n
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("where", [0, CHUNK - 1, CHUNK, 4 * MiB - 1])
def test_damaged_payload_is_a_checksum_mismatch(daemon, relay, where):
    """One inverted byte in the first, at the end of the first, at the start of the second,
    or in the last chunk of a 4 MiB get: the same typed error for get() and get_into."""
    val = _val(7, 4 * MiB)
    with kvstore.Client(daemon.control, namespace="vs", timeout=10.0, transport="tcp") as direct:
        direct.put(b"big", val)
    relay.flip = {PAYLOAD_AT + where}
    with _client(daemon, relay) as c:
        with pytest.raises(kvstore.ChecksumMismatch):
            c.get(b"big")
        # the connection is in step after the error: the next get (same connection, which
        # the relay damages only at the first payload's offsets) returns the object
        assert c.get(b"big") == val
    with _client(daemon, relay) as c:  # a new connection: damaged again, into a caller's buffer
        buf = bytearray(4 * MiB)
        with pytest.raises(kvstore.ChecksumMismatch):
            c.get_into(b"big", buf)
        assert c.get_into(b"big", buf) == 4 * MiB and buf == val
    with _client(daemon, relay, verify_checksums=False) as c:  # the relay did damage it
        got = c.get(b"big")
        assert got[where] == val[where] ^ 0xFF and got[:where] == val[:where]


def test_damaged_small_and_batch(daemon, relay):
    """A 64 KiB object (one chunk) and a batch whose second object is damaged: the batch
    raises ChecksumMismatch and the connection stays usable."""
    small, big = _val(1, 64 << 10), _val(2, 3 * MiB + 5)
    with kvstore.Client(daemon.control, namespace="vs", timeout=10.0, transport="tcp") as direct:
        direct.batch_put([(b"s", small), (b"b", big)])
    relay.flip = {PAYLOAD_AT + 100}
    with _client(daemon, relay) as c:
        with pytest.raises(kvstore.ChecksumMismatch):
            c.get(b"s")
        assert c.get(b"s") == small
    # batch: s's payload, then b's header, then b's payload; damage b past its first chunk
    relay.flip = {PAYLOAD_AT + len(small) + HEADER_SIZE + CHUNK + 3}
    with _client(daemon, relay) as c:
        with pytest.raises(kvstore.ChecksumMismatch):
            c.batch_get([b"s", b"b"])
        assert c.batch_get([b"s", b"b"]) == [small, big]


@pytest.mark.parametrize("cut_in", [10, CHUNK + 7])
def test_payload_cut_short_is_a_typed_error(daemon, relay, cut_in):
    """The connection closes partway through a 4 MiB payload (in the first chunk or a later
    one): Unavailable, not a hang or a wrong result; once the path is whole again the same
    client gets the object."""
    val = _val(9, 4 * MiB)
    with kvstore.Client(daemon.control, namespace="vs", timeout=10.0, transport="tcp") as direct:
        direct.put(b"big", val)
    relay.cut = PAYLOAD_AT + cut_in
    with _client(daemon, relay) as c:
        buf = bytearray(4 * MiB)
        t = time.monotonic()
        with pytest.raises(kvstore.Unavailable):
            c.get_into(b"big", buf)
        assert time.monotonic() - t < 8  # failed on the close, not on the 10 s timeout
        assert relay.accepted == 1  # a connection broken on its first use is not retried (no ride-out)
        relay.cut = None
        assert c.get(b"big") == val


# ---------------------------------------------------------------- AsyncClient, same relay

def test_async_get_damaged_and_bad_arguments(daemon, relay):
    """AsyncClient's get / get_into (which skip the batch calls' list handling): a damaged
    payload is ChecksumMismatch and the connection stays in step; bad keys and buffers raise
    InvalidArgument before anything is sent; eight concurrent gets each get their object."""
    import asyncio

    vals = {f"a{i}": _val(i, (64 << 10) + i) for i in range(8)}
    with kvstore.Client(daemon.control, namespace="vs", timeout=10.0, transport="tcp") as direct:
        direct.batch_put(list(vals.items()))
    relay.flip = {PAYLOAD_AT + 5}

    async def main():
        async with kvstore.AsyncClient(daemon.control, namespace="vs", timeout=10.0,
                                       data_address=f"127.0.0.1:{relay.port}") as ac:
            with pytest.raises(kvstore.ChecksumMismatch):
                await ac.get("a0")
            assert await ac.get("a0") == vals["a0"]
            for bad in (b"", b"k" * 129):
                with pytest.raises(kvstore.InvalidArgument):
                    await ac.get(bad)
                with pytest.raises(kvstore.InvalidArgument):
                    await ac.get_into(bad, bytearray(10))
            with pytest.raises(kvstore.InvalidArgument):
                await ac.get_into("a1", b"read-only bytes")
            with pytest.raises(kvstore.InvalidArgument):  # does not fit
                await ac.get_into("a1", bytearray(10))
            bufs = [bytearray((64 << 10) + 8) for _ in range(8)]
            sizes = await asyncio.wait_for(asyncio.gather(
                *(ac.get_into(f"a{i}", bufs[i]) for i in range(8))), 20)
            assert all(bytes(bufs[i][:n]) == vals[f"a{i}"] for i, n in enumerate(sizes))
            got = await asyncio.wait_for(asyncio.gather(*(ac.get(k) for k in vals)), 20)
            assert got == list(vals.values())

    asyncio.run(main())
