"""Heads answers in both forms (kvstore/control.py heads_of): the packed records a node
of this version sends when asked (HeadsRequest.packed), and the repeated Head messages a
node of an earlier version sends whatever it is asked (it does not know the flag)."""
import pytest

from kvstore import errors
from kvstore.control import HeadRecord, head_struct, heads_of
from kvstore.v1 import control_pb2 as pb

HEAD = bytes(range(64))
# a verified EC record, an unverified one, a short record (head shorter than asked),
# a key deleted there 3.5 s ago, an absent key
RECORDS = [HeadRecord(True, False, 349_568, 2**64 - 1, HEAD, 0.0, 12.25),
           HeadRecord(True, True, 1 << 20, 7, HEAD[::-1], 0.0, 0.0),
           HeadRecord(True, False, 5, 99, b"short", 0.0, 1e9),
           HeadRecord(False, False, 0, 0, b"", 3.5, 0.0),
           HeadRecord(False, False, 0, 0, b"", 0.0, 0.0)]


def _repeated(records) -> pb.HeadsResponse:
    """What a node of an earlier version answers: Head messages, no packed_heads."""
    return pb.HeadsResponse(heads=[pb.Head(present=r.present, unverified=r.unverified, size=r.size,
                                           checksum=r.checksum, head=r.head, deleted_ago=r.deleted_ago,
                                           committed_ago=r.committed_ago) for r in records],
                            unverified_objects=4, epoch=9, put_flags=3)


def _packed(records, head_bytes: int) -> pb.HeadsResponse:
    pack = head_struct(head_bytes).pack
    data = b"".join(pack(r.present, r.unverified, r.size, r.checksum, r.deleted_ago, r.committed_ago,
                         len(r.head), r.head) for r in records)
    return pb.HeadsResponse(packed_heads=data, unverified_objects=4, epoch=9, put_flags=3)


def test_an_earlier_versions_answer_reads_as_the_packed_one():
    """The wire bytes of both forms (as sent) read back to the same heads and fields."""
    for r in (_repeated(RECORDS), _packed(RECORDS, 64)):
        got = heads_of(pb.HeadsResponse.FromString(r.SerializeToString()), len(RECORDS), 64)
        assert got.heads == RECORDS
        assert (got.unverified_objects, got.epoch, got.put_flags) == (4, 9, 3)
        assert got.heads[2].head == b"short" and got.heads[0].present is True
        assert got.heads[1].unverified is True and got.heads[3].deleted_ago == 3.5


def test_packed_records_are_fixed_width_per_head_bytes():
    for n in (0, 1, 64):
        recs = [r._replace(head=r.head[:n]) for r in RECORDS]
        r = _packed(recs, n)
        assert len(r.packed_heads) == len(recs) * (35 + n)  # 2 flags, 4 x 8 bytes, the head length
        assert heads_of(r, len(recs), n).heads == recs


def test_no_keys_is_no_heads():
    assert heads_of(pb.HeadsResponse(), 0, 64).heads == []


@pytest.mark.parametrize("answer, n_keys", [
    (_packed(RECORDS, 64), len(RECORDS) + 1),  # a record short
    (pb.HeadsResponse(packed_heads=b"\x01" * 97), 1),  # not whole records
    (_packed(RECORDS, 16), len(RECORDS)),  # records of another head_bytes
    (_repeated(RECORDS[:2]), 3),  # Head messages short
    (pb.HeadsResponse(), 2),  # nothing for keys asked
])
def test_an_answer_not_of_the_keys_asked_is_a_protocol_error(answer, n_keys):
    with pytest.raises(errors.ProtocolError):
        heads_of(answer, n_keys, 64)
