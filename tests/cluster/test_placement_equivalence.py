"""The cached/fast placement (kvstore.placement) gives exactly the answers of the plain
implementation it replaced (frozen below as REF): same members, same order, same typed
errors, ties included. A changed answer would move data in a running cluster.

Both fast paths are held to it: the Python one and the C one (kvstore._placement,
native/placement.c), by the ``path`` fixture; the C one's tie-breaks by tables that keep
2 bits of each score (its hash is always the real xxh3, never the coarse one)."""
from __future__ import annotations

import random
import struct
import threading

import pytest
import xxhash
from kvstore import placement
from kvstore.errors import InvalidArgument
from kvstore.placement import Member

PATHS = ["python"] + (["c"] if placement._C is not None else [])


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """The fast path under test: placement's C per-key work or its Python one."""
    monkeypatch.setattr(placement, "_NATIVE", request.param == "c")
    return request.param


def native():
    if placement._C is None:
        pytest.skip("kvstore._placement not built (native/placement.c needs libxxhash-dev)")
    return placement._C

# ---- frozen reference: kvstore/placement.py as of commit 45d06b7 (hash looked up in
# REF_HASH so the tie tests can swap in a coarse one) ----
# a fixed amount of disk and CPU work: up to 21 s a test at load 12 here, so a 3-4x slower
# CI machine comes near the suite's 120 s hang guard; this limit still only catches a hang
pytestmark = pytest.mark.timeout(300)

_LEN = struct.Struct("<H")
_POS = b"\x00pos"
REF_HASH = {"h": xxhash.xxh3_64_intdigest}


def _b(x) -> bytes:
    if isinstance(x, str):
        return x.encode()
    return bytes(x)


def ref_score(node_id, ns, key) -> int:
    n, s, k = _b(node_id), _b(ns), _b(key)
    return REF_HASH["h"](b"".join((_LEN.pack(len(n)), n, _LEN.pack(len(s)), s, k)))


def ref_preference(key, members, ns="default") -> list:
    return sorted(members, key=lambda m: (ref_score(m.node_id, ns, key), m.node_id), reverse=True)


def _domain(m) -> str:
    return getattr(m, "failure_domain", "") or m.node_id


def ref_place(key, members, n, ns="default") -> list:
    if n < 1:
        raise InvalidArgument(f"cannot place on {n} nodes")
    ids = [m.node_id for m in members]
    if len(set(ids)) != len(ids):
        raise InvalidArgument("duplicate node_id in the member list")
    if n > len(members):
        raise InvalidArgument(f"placement needs {n} nodes but the cluster has {len(members)}")
    pref = ref_preference(key, members, ns)
    chosen, seen, rest = [], set(), []
    for m in pref:
        d = _domain(m)
        if d in seen:
            rest.append(m)
        else:
            seen.add(d)
            chosen.append(m)
    return (chosen + rest)[:n]


def ref_place_positions(key, members, n, ns="default") -> list:
    if n < 1:
        raise InvalidArgument(f"cannot place on {n} nodes")
    if n > len(members):
        raise InvalidArgument(f"placement needs {n} nodes but the cluster has {len(members)}")
    ids = [m.node_id for m in members]
    if len(set(ids)) != len(ids):
        raise InvalidArgument("duplicate node_id in the member list")
    k = _b(key)
    s = _b(ns)
    ns_part = _LEN.pack(len(s)) + s
    h = REF_HASH["h"]
    heads = [(_LEN.pack(len(nb)) + nb + ns_part, m)
             for m in members for nb in (m.node_id.encode(),)]
    pairs = []
    for j in range(n):
        tail = b"".join((k, _POS, _LEN.pack(j)))
        pairs += [(h(head + tail), m.node_id, -j, m) for head, m in heads]
    pairs.sort(reverse=True)
    chosen: list = [None] * n
    used: set[str] = set()
    for spread in (True, False):
        if None not in chosen:
            break
        domains = {_domain(m) for m in chosen if m is not None}
        for _s, nid, neg_j, m in pairs:
            j = -neg_j
            if chosen[j] is not None or nid in used or (spread and _domain(m) in domains):
                continue
            chosen[j] = m
            used.add(nid)
            domains.add(_domain(m))
    return chosen
# ---- end of the frozen reference ----


def outcome(f, *a):
    """A call's answer as comparable data: member identities, or the error's type and text."""
    try:
        return [id(m) for m in f(*a)]
    except Exception as e:  # noqa: BLE001 - the error itself is what is compared
        return (type(e), str(e))


def random_members(rng: random.Random, m: int) -> list:
    style = rng.choice(["none", "few", "mixed", "each", "unicode"])
    ids = rng.sample(range(10**6), m)
    racks = [f"rack-{i}" for i in range(rng.randint(1, max(1, m // 2)))]
    out = []
    for x in ids:
        nid = f"n{x}" if style != "unicode" else f"nœ{x}é"
        if style == "none":
            fd = ""
        elif style == "few":
            fd = rng.choice(racks)
        elif style == "mixed":
            fd = rng.choice(racks + [""])
        elif style == "each":
            fd = nid  # a domain named like a node: the same domain as a domain-less node of that id
        else:
            fd = rng.choice(["", "dc-ü"])
        out.append(Member(nid, f"127.0.0.1:{x % 60000}", fd))
    if style == "each" and m > 1 and rng.random() < 0.5:
        out[1] = Member(out[1].node_id, "", out[0].node_id)  # shares node 0's implicit domain
    return out


def random_key(rng: random.Random):
    k = rng.randbytes(rng.choice([0, 1, 8, 13, 40]))
    return k.decode("latin-1") if rng.random() < 0.1 else k


def compare_case(rng: random.Random, members: list, n: int) -> None:
    key = random_key(rng)
    ns = rng.choice(["default", "ec", b"ec", "", "ns-ü"])
    assert outcome(placement.place_positions, key, members, n, ns) == outcome(ref_place_positions, key, members, n, ns)
    assert outcome(placement.place, key, members, n, ns) == outcome(ref_place, key, members, n, ns)
    assert outcome(placement.preference, key, members, ns) == outcome(ref_preference, key, members, ns)


def sizes(rng: random.Random) -> tuple[int, int]:
    m = rng.choice([1, 2, 3, 4, 5, 5, 6, 6, 7, 8, 10, 16, 24])
    n = rng.choice([1, m, m, min(m, 5), min(m, 6), rng.randint(1, m)])
    return m, n


def test_same_answers_random_cases(path):
    rng = random.Random(1313)
    pools: list = []  # reuse member lists as the cluster does, so cached entries are hit
    for case in range(24_000):
        m, n = sizes(rng)
        if pools and rng.random() < 0.5:
            members = rng.choice(pools)
            n = rng.randint(1, len(members))
        else:
            members = random_members(rng, m)
            pools = (pools + [members])[-40:]
        if case % 7 == 0:
            members = tuple(members)
        compare_case(rng, members, n)


def test_same_answers_with_ties(monkeypatch):
    """A 2-bit hash makes equal scores common: the node_id and position tie-breaks decide."""
    coarse = lambda b: xxhash.xxh3_64_intdigest(b) & 3  # noqa: E731
    monkeypatch.setattr(placement, "_h", coarse)
    monkeypatch.setitem(REF_HASH, "h", coarse)
    rng = random.Random(77)
    for _ in range(6_000):
        m, n = sizes(rng)
        compare_case(rng, random_members(rng, m), n)


def test_large_member_lists(path):
    rng = random.Random(5)
    for m in (50, 100):
        members = random_members(rng, m)
        for n in (1, 5, 6, m):
            for _ in range(20):
                compare_case(rng, members, n)


def test_same_errors(path):
    rng = random.Random(3)
    ms = random_members(rng, 5)
    dup = ms + [Member(ms[2].node_id, "x", "other")]
    for members, n in ((ms, 0), (ms, -1), (ms, 6), ([], 1), (dup, 3), (dup, 7), (dup, 0), (ms[:1], 2)):
        for f, g in ((placement.place_positions, ref_place_positions), (placement.place, ref_place)):
            got, want = outcome(f, b"k", members, n, "ec"), outcome(g, b"k", members, n, "ec")
            assert got == want and got[0] is InvalidArgument, (f.__name__, n, got, want)
    # preference never checked duplicates: both orders are the same stable sort
    assert outcome(placement.preference, b"k", dup, "ec") == outcome(ref_preference, b"k", dup, "ec")


def test_odd_member_lists_take_the_plain_form(path):
    """bytes node ids, a generator for preference, duck-typed members without failure_domain."""
    class Bare:
        def __init__(self, node_id):
            self.node_id = node_id

    rng = random.Random(9)
    byte_ms = [Member(f"b{i}".encode(), "", "") for i in range(5)]  # type: ignore[arg-type]
    bare = [Bare(f"bare-{i}") for i in range(6)]
    for _ in range(200):
        key = random_key(rng)
        n = rng.randint(1, 5)
        assert outcome(placement.place, key, byte_ms, n, "ec") == outcome(ref_place, key, byte_ms, n, "ec")
        assert outcome(placement.place_positions, key, byte_ms, n, "ec") == outcome(ref_place_positions, key, byte_ms, n, "ec")
        assert outcome(placement.place_positions, key, bare, n, "ec") == outcome(ref_place_positions, key, bare, n, "ec")
        assert outcome(placement.place, key, bare, n, "ec") == outcome(ref_place, key, bare, n, "ec")
        assert [id(m) for m in placement.preference(key, iter(bare), "ec")] == [id(m) for m in ref_preference(key, bare, "ec")]


def test_cache_is_bounded_and_keyed_on_domains(path):
    rng = random.Random(11)
    for i in range(placement._CACHE_MAX * 2 + 5):
        placement.place_positions(b"k", random_members(rng, 3), 2, f"ns-{i}")
        assert len(placement._CACHE) <= placement._CACHE_MAX
    # same node ids, domains changed: a cached entry must not answer for the new list
    a = [Member(f"n{i}", "", "r1" if i < 3 else "r2") for i in range(6)]
    b = [Member(m.node_id, "", "") for m in a]
    for k in (f"key-{i}".encode() for i in range(300)):
        for ms in (a, b, a):
            assert outcome(placement.place_positions, k, ms, 4, "ec") == outcome(ref_place_positions, k, ms, 4, "ec")
            assert outcome(placement.place, k, ms, 3, "ec") == outcome(ref_place, k, ms, 3, "ec")


def test_concurrent_callers_agree(path):
    """Threads sharing (and overflowing) the cache still get the reference answers."""
    rng = random.Random(21)
    lists = [random_members(rng, rng.randint(1, 8)) for _ in range(placement._CACHE_MAX + 20)]
    bad: list = []

    def work(seed: int) -> None:
        r = random.Random(seed)
        for _ in range(1500):
            ms = r.choice(lists)
            key, n = r.randbytes(9), r.randint(1, len(ms))
            if outcome(placement.place_positions, key, ms, n, "ec") != outcome(ref_place_positions, key, ms, n, "ec"):
                bad.append((key, n))

    ts = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in ts) and not bad


@pytest.mark.parametrize("m", [4, 5, 6])
def test_every_position_count_on_fixed_keys(m, path):
    """n from 1 to m over many keys on a plain cluster (the layout's common shape)."""
    ms = [Member(f"node-{i}", f"127.0.0.1:{7000 + i}", "") for i in range(m)]
    for i in range(1500):
        k = b"\x01" + i.to_bytes(8, "little") + b"frag"
        for n in range(1, m + 1):
            assert outcome(placement.place_positions, k, ms, n, "ec") == outcome(ref_place_positions, k, ms, n, "ec")


def wide_members(rng: random.Random, m: int) -> list:
    """1..60 members: ids that differ by a space, a case, a NUL, a prefix or an accent
    (distinct strings that sort close together), unicode, failure domains or none."""
    base = rng.choice(["n1", "N1", "node", "ü", "雪", "a" * 40])
    variants = ["", " ", "0", "\x00", "é", "e\u0301", "A", "a", "-1", "10"]
    ids: list = []
    while len(ids) < m:
        nid = base + rng.choice(variants) + (str(rng.randrange(60)) if rng.random() < 0.7 else "")
        if nid not in ids:
            ids.append(nid)
    doms = rng.choice([[""], ["r0", "r1"], ["r0", "r1", "r2", ""], ids[:3] or [""], ["dc-ü", "dc-u"]])
    return [Member(i, "", rng.choice(doms)) for i in ids]


def wide_key(rng: random.Random):
    k = rng.randbytes(rng.choice([0, 1, 7, 17, 64, 200, 4000]))
    r = rng.random()
    if r < 0.15:
        return k.decode("latin-1")
    if r < 0.2:
        return "ключ-" + k.hex()
    return bytearray(k) if r < 0.25 else k


def test_wide_random_lists(path):
    """Member lists of 1..60, n from 1 to members+2, both place and place_positions, and
    preference; str and bytes namespaces and keys, empty and long ones."""
    rng = random.Random(4242)
    lists = [wide_members(rng, rng.randint(1, 60)) for _ in range(24)]
    for case in range(1500):
        ms = rng.choice(lists) if case % 3 else wide_members(rng, rng.randint(1, 60))
        n = rng.choice([1, 2, 3, 5, len(ms), len(ms) + 1, len(ms) + 2, rng.randint(1, len(ms))])
        ns = rng.choice(["default", "", b"", "ns-ü", b"\xff\x00ns", "x" * 300])
        key = wide_key(rng)
        got = outcome(placement.place_positions, key, ms, n, ns)
        assert got == outcome(ref_place_positions, key, ms, n, ns), (path, len(ms), n)
        assert outcome(placement.place, key, ms, n, ns) == outcome(ref_place, key, ms, n, ns)
        if case % 5 == 0:
            assert outcome(placement.preference, key, ms, ns) == outcome(ref_preference, key, ms, ns)


def error_type(f, *a):
    try:
        f(*a)
    except Exception as e:  # noqa: BLE001 - the error's type is what is compared
        return type(e)
    return None


def test_malformed_input_same_typed_errors(path):
    """Keys and namespaces of wrong types, n < 1, huge or not an integer: the error the
    reference raises (its type; its text too for InvalidArgument)."""
    rng = random.Random(8)
    ms = random_members(rng, 5)
    bad_keys = [None, 3.5, object(), ["k"], "\ud800", {"k": 1}]
    for f, g in ((placement.place_positions, ref_place_positions), (placement.place, ref_place)):
        for key in bad_keys:
            want = error_type(g, key, ms, 3, "ec")
            assert want is not None and error_type(f, key, ms, 3, "ec") is want, (f.__name__, key)
        for ns in (None, 2.5, "\udfff"):
            want = error_type(g, b"k", ms, 3, ns)
            assert want is not None and error_type(f, b"k", ms, 3, ns) is want, (f.__name__, ns)
        for n in (-1, 0, -(1 << 70), 6, 1 << 70, 10**30):
            got, want = outcome(f, b"k", ms, n, "ec"), outcome(g, b"k", ms, n, "ec")
            assert got == want and got[0] is InvalidArgument, (f.__name__, n, got)
        for n in (2.5, "3", None):
            want = error_type(g, b"k", ms, n, "ec")
            assert want is TypeError and error_type(f, b"k", ms, n, "ec") is TypeError, (f.__name__, n)
        # a key that bytes() accepts is one: an int is that many zero bytes, as in the reference
        assert outcome(f, 4, ms, 3, "ec") == outcome(g, 4, ms, 3, "ec")


def test_native_hash_is_xxh3():
    """The C path's scores are the xxhash package's xxh3_64 (libxxhash, linked), bit for bit."""
    c = native()
    rng = random.Random(6)
    for n in list(range(0, 260)) + [1024, 4095, 65536 + 7]:
        b = rng.randbytes(n)
        assert c.xxh3_64(b) == xxhash.xxh3_64_intdigest(b), n


def test_native_tie_breaks():
    """The C path's hash is always the real xxh3, so equal scores come from a table whose
    scores keep 2 bits (mask=3), against the reference hashing with that coarse hash:
    every tie-break (node_id, then position) must be the reference's."""
    c = native()
    coarse = lambda b: xxhash.xxh3_64_intdigest(b) & 3  # noqa: E731
    rng = random.Random(31)
    for case in range(1500):
        ms = wide_members(rng, rng.randint(1, 24)) if case % 2 else random_members(rng, sizes(rng)[0])
        ns = rng.choice(["ec", b"", "ns-ü"])
        e = placement._Entry([m.node_id for m in ms], [m.failure_domain for m in ms],
                             _LEN.pack(len(_b(ns))) + _b(ns))
        table = c.Table(e.heads, [r for _, r in e.ranked], e.dom, mask=3)
        key = rng.randbytes(rng.choice([0, 5, 20]))
        n = rng.randint(1, len(ms))
        REF_HASH["h"] = coarse
        try:
            want_pp = [id(m) for m in ref_place_positions(key, ms, n, ns)]
            want_p = [id(m) for m in ref_place(key, ms, n, ns)]
            want_o = [id(m) for m in ref_preference(key, ms, ns)]
        finally:
            REF_HASH["h"] = xxhash.xxh3_64_intdigest
        assert [id(m) for m in c.place_positions(table, key, ms, n)] == want_pp, case
        assert [id(m) for m in c.place(table, key, ms, n)] == want_p, case
        assert [id(ms[i]) for i in c.order(table, key)] == want_o, case


def test_native_entry_cache_follows_the_list(monkeypatch):
    """The C path finds an entry by the identity of the member objects: a list changed in
    place, a list of look-alike objects, or a member subclass gets its own answer."""
    native()
    monkeypatch.setattr(placement, "_NATIVE", True)  # whatever the environment said
    rng = random.Random(12)
    ms = random_members(rng, 6)
    for i in range(200):
        key = f"k{i}".encode()
        assert outcome(placement.place_positions, key, ms, 5, "ec") == outcome(ref_place_positions, key, ms, 5, "ec")
        j = rng.randrange(len(ms))
        ms[j] = Member(f"swap-{i}", "", rng.choice(["", "r1", ms[0].node_id]))  # in place
        twin = [Member(m.node_id, m.address, m.failure_domain) for m in ms]  # equal, not identical
        assert outcome(placement.place, key, twin, 4, b"ec") == outcome(ref_place, key, twin, 4, b"ec")

    class Sub(Member):
        pass

    subs = [Sub(f"s{i}", "", "") for i in range(5)]
    assert outcome(placement.place_positions, b"k", subs, 5, "ec") == outcome(ref_place_positions, b"k", subs, 5, "ec")


def test_native_rejects_malformed_tables_and_calls():
    """The C functions check what they are given (placement.py never passes these)."""
    c = native()
    with pytest.raises(TypeError):
        c.Table([b"a", "b"], [0, 1], [0, 1])
    with pytest.raises(ValueError):
        c.Table([b"a", b"b"], [0, 0], [0, 1])  # ranks must be distinct
    with pytest.raises(ValueError):
        c.Table([b"a", b"b"], [0, 1], [0, 2])  # a domain out of range
    with pytest.raises(ValueError):
        c.Table([b"a"], [0, 1], [0])
    t = c.Table([b"a", b"b", b"c"], [2, 0, 1], [0, 1, 1])
    ms = ["A", "B", "C"]
    for n in (0, -1, 4, 1 << 40):
        with pytest.raises(ValueError):
            c.place_positions(t, b"k", ms, n)
        with pytest.raises(ValueError):
            c.place(t, b"k", ms, n)
    with pytest.raises(OverflowError):
        c.place(t, b"k", ms, 1 << 70)
    with pytest.raises(ValueError):
        c.place(t, b"k", ms[:2], 1)  # members must match the table
    with pytest.raises(TypeError):
        c.place_positions(t, "k", ms, 1)  # keys are bytes-like (placement encodes str)
    with pytest.raises(TypeError):
        c.order(object(), b"k")
    assert sorted(c.place_positions(t, b"k", ms, 3)) == ms and sorted(c.order(t, b"")) == [0, 1, 2]


def test_native_path_only_with_the_packages_hash():
    """The C path is used only when the libxxhash the process loaded hashes as the xxhash
    package does on every length class: a libxxhash before 0.8.0 (XXH3 not final), or
    another one met at run time than the wheel was built against, would place keys
    elsewhere than Python nodes. Such a library leaves placement in Python."""
    import subprocess
    import sys
    c = native()
    assert placement._hashes_agree(c)

    class Like:  # differs from the real hash on some inputs only
        def __init__(self, f):
            self.xxh3_64 = f

    assert not placement._hashes_agree(Like(lambda b: c.xxh3_64(b) & 0xFFFFFFFF))  # an int-returning call
    assert not placement._hashes_agree(Like(lambda b: c.xxh3_64(b) ^ (len(b) > 240)))  # long inputs only
    assert not placement._hashes_agree(Like(lambda b: c.xxh3_64(b) ^ (len(b) == 0)))  # the empty input only
    assert not placement._hashes_agree(Like(lambda b: 1 / 0))
    # at import: a module whose hash differs is not used (placement answers in Python)
    probe = ("import importlib.util, sys, types\n"  # (kvstore's __init__ imports placement)
             "spec = importlib.util.spec_from_file_location('kvstore._placement', sys.argv[1])\n"
             "real = importlib.util.module_from_spec(spec)\n"
             "spec.loader.exec_module(real)\n"
             "fake = types.ModuleType('kvstore._placement')\n"
             "fake.__dict__.update(real.__dict__)\n"
             "fake.xxh3_64 = lambda b: real.xxh3_64(b) ^ (len(b) > 1024)\n"
             "sys.modules['kvstore._placement'] = fake\n"
             "from kvstore import placement as p\n"
             "print(p._C is None, p._NATIVE, p._entry([p.Member('a')], 'ns').table)\n")
    out = subprocess.run([sys.executable, "-c", probe, c.__file__], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and out.stdout.split() == ["True", "False", "None"], (out.stdout, out.stderr)
    assert "differs from the xxhash package" in out.stderr
