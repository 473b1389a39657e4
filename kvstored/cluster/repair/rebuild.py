"""Records rebuilt for a Reconstruct action from the source records read for it."""
from __future__ import annotations

import logging

from kvstore.layout import (EC_TYPES, FRAG_HEADER, KIND_FRAGMENT, KIND_REPLICA, Policy, checksum,
                            codec, fragment_parts, inner_index, parse_head, parse_record)

from .decide import head_version

log = logging.getLogger("kvstored.repair")


def needed(p: Policy, kind: int) -> int:
    """How many distinct current sources a rebuild needs."""
    return 1 if kind == KIND_REPLICA else p.k


def usable(bufs: list, current, have: set[int] | None = None, p: Policy | None = None,
           kind: int | None = None) -> list[tuple]:
    """The (header, payload) of the valid records of version ``current`` (and, given, of
    ``kind``) among ``bufs``, one per index (an index in ``have`` is skipped and added).

    Valid: the payload matches the header's payload checksum (the end-to-end check: a
    record stored corrupt under its own store checksum passes a transfer checksum and
    fails this one); magic / kind by parse_record, (olen, ocsum, K, M) by the version,
    and a fragment's index, given ``p`` whose codec knows where liberasurecode keeps it,
    against that inner index (under the payload checksum). Given ``p``, the header's two
    fields that neither the payload checksum nor the version covers are checked too (the
    EC type, which M decides, and the reserved zero): every byte of a record is then
    checked here, so repair reads its peers' sources without the transfer checksum
    (``sound_alone``). The kind, given ``kind``: a whole record whose kind bit flipped
    to FRAGMENT passes every other check when its payload starts with its index's bytes,
    and rebuild() would copy that kind into the records it writes. A fragment of another
    K+M than ``p``'s (a version this node's own record does not share) is refused:
    rebuild() would reconstruct it with ``p``'s codec and write the result under ``p``'s
    K and M, with the other version's size and checksum."""
    have = set() if have is None else have
    check_index = p is not None and codec(p).indexed
    ec_type = EC_TYPES.index(p.ec_type) if p is not None and p.kind == "ec" else None
    km = (p.k, p.m) if ec_type is not None else None
    out = []
    for buf in bufs:
        r = _parse(buf)
        if r is None or r[0][3] in have or head_version(r[0]) != current:
            continue
        if kind is not None and r[0][2] != kind:
            continue
        if ec_type is not None and (r[0][6] != ec_type or r[0][7] != 0):
            continue
        if km is not None and r[0][2] == KIND_FRAGMENT and r[0][4:6] != km:
            continue  # rebuild() reconstructs with p's codec and labels with p's K, M
        if check_index and r[0][2] == KIND_FRAGMENT and inner_index(r[1]) != r[0][3]:
            log.warning("repair: a source fragment's header index %d is not its own", r[0][3])
            continue
        have.add(r[0][3])
        out.append(r)
    return out


def sound_alone(p: Policy) -> bool:
    """Whether ``usable`` checks every byte of this policy's records by itself (its
    codec's fragments carry their own index, under the payload checksum): then repair
    reads their sources without the transfer checksum (a second 64-bit hash of every
    source byte: ~50 us of CPU per rebuilt 341 KiB record, RESULTS.md session 17)."""
    return p.kind == "ec" and codec(p).indexed


def _parse(buf) -> tuple | None:
    """parse_record of a record, or of a (header, payload) pair (LocalStore.read_many's
    split sources): the same checks, the payload left where it is."""
    if not isinstance(buf, tuple):
        return parse_record(buf) if buf is not None else None
    head, payload = buf
    h = parse_head(head)
    if h is None or len(head) != FRAG_HEADER.size or checksum(payload) != h[10]:
        return None
    if h[2] == KIND_REPLICA and (len(payload) != h[8] or h[10] != h[9]):
        return None
    return h, payload


def rebuild(p: Policy, kind: int, recs: list[tuple], indices: list[int], what: str = ""
            ) -> dict[int, tuple[bytes, object]] | None:
    """Records for ``indices`` as (header, payload) pairs (written gathered, no copy of
    the payload): re-indexed copies of a whole-object record, or fragments reconstructed
    from K current ones (``recs``: usable() output). None: not possible."""
    if not recs:
        return None
    h, payload = recs[0]
    if kind == KIND_REPLICA:
        return {i: (FRAG_HEADER.pack(*h[:3], i, *h[4:]), payload) for i in indices}
    if len(recs) < p.k:
        log.warning("repair: only %d of the %d fragments needed to rebuild %s", len(recs), p.k, what)
        return None
    c = codec(p)
    want = sorted(indices)
    try:
        frags = c.reconstruct([r[1] for r in recs[:p.k]], want)
    except c.errors as e:  # inconsistent sources: leave it pending, do not stop the pass
        log.warning("repair: reconstruct of %s failed: %s", what, e)
        return None
    olen, ocsum = h[8], h[9]
    return {i: fragment_parts(p, i, f, olen, ocsum) for i, f in zip(want, frags)}
