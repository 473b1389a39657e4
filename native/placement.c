/* kvstore._placement: the per-key work of kvstore.placement's fast path (rendezvous
 * hashing) in C, with the same answers as the plain Python forms (_preference_any,
 * _place_any, _place_positions_any): tests/cluster/test_placement_equivalence.py holds
 * both paths to a frozen copy of them.
 *
 * placement.py still owns everything that depends only on (members, ns) and every check
 * that raises: it builds an _Entry per (members, ns) and hands this module a Table of what
 * the hashing needs (each member's prefix ``len(node) node len(ns) ns``, its rank by
 * node_id, its failure domain as a small int). Then, per key:
 *
 *   order(table, key)                      member indexes by descending (score, node_id)
 *   place(table, key, members, n)          placement.place's answer
 *   place_positions(table, key, members, n) placement.place_positions's answer
 *
 * and it keeps the last few entries by the identity of their member objects (cached,
 * remember: see below), so a call on a list already seen costs no per-member Python work.
 *
 * A score is xxh3_64(prefix || key [|| "\0pos" || le16(j)]) from the system libxxhash (the
 * same function as the Python xxhash package's xxh3_64_intdigest). Equal scores need no
 * plain form here: every comparison is on (score, rank[, position]), the total order the
 * plain forms sort by. Built for the baseline ISA like the other extensions (setup.py).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

/* XXH3's output is final from libxxhash 0.8.0 on (before it changed between releases, and
 * its declarations were not in the plain header): an older one would hash otherwise than
 * the xxhash package, so the extension is not built against it (setup.py then skips it).
 * At run time placement.py checks the loaded library against the package all the same. */
#if !defined(XXH_VERSION_NUMBER) || XXH_VERSION_NUMBER < 800
#error "kvstore._placement needs libxxhash 0.8.0 or later (XXH3 final)"
#endif

static const unsigned char POS[4] = {0, 'p', 'o', 's'}; /* placement._POS */
#define TAIL 6                                          /* POS + le16(position) */
#define SELECT_MAX 16 /* place(): up to this n, n passes of selection; above, one sort */

typedef struct {
    PyObject_HEAD
    Py_ssize_t nm;       /* members */
    Py_ssize_t ndom;     /* distinct failure domains */
    Py_ssize_t maxhead;  /* longest prefix */
    Py_ssize_t *hoff;    /* prefix i is heads[hoff[i] .. hoff[i + 1]) */
    unsigned char *heads;
    uint32_t *rank;      /* rank of member i's node_id among all (distinct) */
    uint32_t *dom;       /* member i's failure domain, 0 .. ndom-1 */
    uint64_t mask;       /* scores are hash & mask: all ones but in the tie tests */
} Table;

static void table_dealloc(Table *t) {
    PyMem_Free(t->hoff);
    PyMem_Free(t->heads);
    PyMem_Free(t->rank);
    PyMem_Free(t->dom);
    Py_TYPE(t)->tp_free((PyObject *)t);
}

/* items of a list of ints, each in 0 .. bound-1, into out (-1 with an error set) */
static int read_indexes(PyObject *seq, Py_ssize_t nm, Py_ssize_t bound, uint32_t *out,
                        const char *what) {
    PyObject *f = PySequence_Fast(seq, what);
    if (!f) return -1;
    if (PySequence_Fast_GET_SIZE(f) != nm) {
        Py_DECREF(f);
        PyErr_Format(PyExc_ValueError, "%s: %zd items for %zd members", what,
                     PySequence_Fast_GET_SIZE(f), nm);
        return -1;
    }
    for (Py_ssize_t i = 0; i < nm; i++) {
        Py_ssize_t v = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(f, i));
        if (v == -1 && PyErr_Occurred()) {
            Py_DECREF(f);
            return -1;
        }
        if (v < 0 || v >= bound) {
            Py_DECREF(f);
            PyErr_Format(PyExc_ValueError, "%s: %zd out of range", what, v);
            return -1;
        }
        out[i] = (uint32_t)v;
    }
    Py_DECREF(f);
    return 0;
}

/* Table(heads: list[bytes], rank: list[int], dom: list[int], mask=2**64-1); a small mask
 * makes equal scores common, so tests reach every tie-break (placement never passes one) */
static PyObject *table_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    PyObject *heads, *rank, *dom;
    unsigned long long mask = UINT64_MAX;
    static char *kwlist[] = {"heads", "rank", "dom", "mask", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO|$K:Table", kwlist, &heads, &rank, &dom, &mask))
        return NULL;
    PyObject *hf = PySequence_Fast(heads, "Table: heads must be a sequence");
    if (!hf) return NULL;
    Py_ssize_t nm = PySequence_Fast_GET_SIZE(hf);
    if (nm >= (Py_ssize_t)1 << 30) {
        Py_DECREF(hf);
        return PyErr_Format(PyExc_ValueError, "Table: %zd members", nm);
    }
    Table *t = (Table *)type->tp_alloc(type, 0);
    if (!t) {
        Py_DECREF(hf);
        return NULL;
    }
    t->nm = nm;
    t->mask = mask;
    t->hoff = PyMem_Malloc((nm + 1) * sizeof(Py_ssize_t));
    t->rank = PyMem_Malloc((nm ? nm : 1) * sizeof(uint32_t));
    t->dom = PyMem_Malloc((nm ? nm : 1) * sizeof(uint32_t));
    if (!t->hoff || !t->rank || !t->dom) {
        PyErr_NoMemory();
        goto fail;
    }
    Py_ssize_t total = 0;
    t->hoff[0] = 0;
    for (Py_ssize_t i = 0; i < nm; i++) {
        PyObject *h = PySequence_Fast_GET_ITEM(hf, i);
        if (!PyBytes_Check(h)) {
            PyErr_SetString(PyExc_TypeError, "Table: heads must be bytes");
            goto fail;
        }
        Py_ssize_t len = PyBytes_GET_SIZE(h);
        if (len > t->maxhead) t->maxhead = len;
        total += len;
        t->hoff[i + 1] = total;
    }
    t->heads = PyMem_Malloc(total ? total : 1);
    if (!t->heads) {
        PyErr_NoMemory();
        goto fail;
    }
    for (Py_ssize_t i = 0; i < nm; i++)
        memcpy(t->heads + t->hoff[i], PyBytes_AS_STRING(PySequence_Fast_GET_ITEM(hf, i)),
               t->hoff[i + 1] - t->hoff[i]);
    if (read_indexes(rank, nm, nm, t->rank, "Table: rank") < 0 ||
        read_indexes(dom, nm, nm, t->dom, "Table: dom") < 0)
        goto fail;
    /* ranks must be a permutation: the tie-breaks rely on their being distinct */
    unsigned char *seen = PyMem_Calloc(nm ? nm : 1, 1);
    if (!seen) {
        PyErr_NoMemory();
        goto fail;
    }
    for (Py_ssize_t i = 0; i < nm; i++) {
        if (seen[t->rank[i]]++) {
            PyMem_Free(seen);
            PyErr_SetString(PyExc_ValueError, "Table: rank is not a permutation");
            goto fail;
        }
        if ((Py_ssize_t)t->dom[i] + 1 > t->ndom) t->ndom = t->dom[i] + 1;
    }
    PyMem_Free(seen);
    Py_DECREF(hf);
    return (PyObject *)t;
fail:
    Py_DECREF(hf);
    Py_DECREF(t);
    return NULL;
}

static PyTypeObject TableType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kvstore._placement.Table",
    .tp_doc = "What placement hashes for one (members, ns): Table(heads, rank, dom, *, mask).",
    .tp_basicsize = sizeof(Table),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = table_new,
    .tp_dealloc = (destructor)table_dealloc,
};

/* A hash input: each member's prefix is copied right-aligned before the key (and tail),
 * which stay in place for every member. */
typedef struct {
    unsigned char *buf;
    Py_ssize_t keyat, len; /* key starts at buf + keyat; len = key (+ tail) bytes */
} Input;

static int input_init(Input *in, const Table *t, const char *key, Py_ssize_t klen, int tail) {
    in->keyat = t->maxhead;
    in->len = klen + (tail ? TAIL : 0);
    in->buf = PyMem_Malloc(t->maxhead + in->len + 1);
    if (!in->buf) {
        PyErr_NoMemory();
        return -1;
    }
    memcpy(in->buf + in->keyat, key, klen);
    if (tail) memcpy(in->buf + in->keyat + klen, POS, sizeof POS);
    return 0;
}

static void input_position(Input *in, Py_ssize_t j) {
    unsigned char *p = in->buf + in->keyat + in->len - 2;
    p[0] = (unsigned char)(j & 0xff);
    p[1] = (unsigned char)(j >> 8 & 0xff);
}

/* scores of every member for the input as it stands */
static void score_all(const Table *t, Input *in, uint64_t *out) {
    for (Py_ssize_t i = 0; i < t->nm; i++) {
        Py_ssize_t hl = t->hoff[i + 1] - t->hoff[i];
        unsigned char *at = in->buf + in->keyat - hl;
        memcpy(at, t->heads + t->hoff[i], hl);
        out[i] = XXH3_64bits(at, hl + in->len) & t->mask;
    }
}

/* member a before member b in preference order: higher score, then higher node_id */
#define BEFORE(t, s, a, b) ((s)[a] > (s)[b] || ((s)[a] == (s)[b] && (t)->rank[a] > (t)->rank[b]))

typedef struct {
    uint64_t score;
    uint32_t rank, index;
} Ranked;

static int ranked_cmp(const void *x, const void *y) {
    const Ranked *a = x, *b = y;
    if (a->score != b->score) return a->score < b->score ? 1 : -1;
    return a->rank < b->rank ? 1 : (a->rank > b->rank ? -1 : 0);
}

/* every member index by preference into idx */
static int sort_members(const Table *t, const uint64_t *s, uint32_t *idx) {
    Ranked *r = PyMem_Malloc((t->nm ? t->nm : 1) * sizeof(Ranked));
    if (!r) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < t->nm; i++) {
        r[i].score = s[i];
        r[i].rank = t->rank[i];
        r[i].index = (uint32_t)i;
    }
    qsort(r, t->nm, sizeof(Ranked), ranked_cmp);
    for (Py_ssize_t i = 0; i < t->nm; i++) idx[i] = r[i].index;
    PyMem_Free(r);
    return 0;
}

static int parse_n(PyObject *o, const Table *t, const char *name, Py_ssize_t *n) {
    *n = PyNumber_AsSsize_t(o, PyExc_OverflowError); /* any __index__, as range() takes */
    if (*n == -1 && PyErr_Occurred()) return -1;
    if (*n < 1 || *n > t->nm || *n > 0x10000) {
        PyErr_Format(PyExc_ValueError, "%s(): cannot place on %zd of %zd members", name, *n,
                     t->nm);
        return -1;
    }
    return 0;
}

/* key: bytes-like; the Table; members (when given) a sequence of the table's length; n
   (when given: 4 arguments) how many to place */
static int parse(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t want, const char *name,
                 Table **t, Py_buffer *key, Py_ssize_t *n) {
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments (%zd given)", name, want, nargs);
        return -1;
    }
    if (!PyObject_TypeCheck(args[0], &TableType)) {
        PyErr_Format(PyExc_TypeError, "%s(): the first argument must be a Table", name);
        return -1;
    }
    *t = (Table *)args[0];
    if (PyObject_GetBuffer(args[1], key, PyBUF_SIMPLE) < 0) return -1;
    if (want > 2) {
        Py_ssize_t len = PySequence_Size(args[2]);
        if (len < 0) goto fail;
        if (len != (*t)->nm) {
            PyErr_Format(PyExc_ValueError, "%s(): %zd members for a table of %zd", name, len,
                         (*t)->nm);
            goto fail;
        }
    }
    if (want > 3 && parse_n(args[3], *t, name, n) < 0) goto fail;
    return 0;
fail:
    PyBuffer_Release(key);
    return -1;
}

/* [members[i] for i in idx[:n]] */
static PyObject *pick(PyObject *members, const uint32_t *idx, Py_ssize_t n) {
    PyObject *out = PyList_New(n);
    if (!out) return NULL;
    for (Py_ssize_t j = 0; j < n; j++) {
        PyObject *m = PySequence_GetItem(members, idx[j]);
        if (!m) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, j, m);
    }
    return out;
}

static PyObject *order(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Table *t;
    Py_buffer key;
    if (parse(args, nargs, 2, "order", &t, &key, NULL) < 0) return NULL;
    PyObject *out = NULL;
    Input in = {0};
    Py_ssize_t nm = t->nm;
    uint64_t *s = PyMem_Malloc((nm ? nm : 1) * sizeof(uint64_t));
    uint32_t *idx = PyMem_Malloc((nm ? nm : 1) * sizeof(uint32_t));
    if (!s || !idx) {
        PyErr_NoMemory();
        goto done;
    }
    if (input_init(&in, t, key.buf, key.len, 0) < 0) goto done;
    score_all(t, &in, s);
    if (sort_members(t, s, idx) < 0) goto done;
    out = PyList_New(nm);
    if (!out) goto done;
    for (Py_ssize_t i = 0; i < nm; i++) {
        PyObject *v = PyLong_FromUnsignedLong(idx[i]);
        if (!v) {
            Py_CLEAR(out);
            goto done;
        }
        PyList_SET_ITEM(out, i, v);
    }
done:
    PyMem_Free(in.buf);
    PyMem_Free(s);
    PyMem_Free(idx);
    PyBuffer_Release(&key);
    return out;
}

/* place(): the first member of each failure domain in preference order (at most n), then
 * the best of the others, in preference order, up to n */
static PyObject *place(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Table *t;
    Py_buffer key;
    Py_ssize_t n;
    if (parse(args, nargs, 4, "place", &t, &key, &n) < 0) return NULL;
    PyObject *out = NULL;
    Input in = {0};
    Py_ssize_t nm = t->nm, got = 0;
    uint64_t *s = PyMem_Malloc(nm * sizeof(uint64_t));
    uint32_t *idx = PyMem_Malloc(nm * sizeof(uint32_t));
    uint32_t *res = PyMem_Malloc(n * sizeof(uint32_t));
    unsigned char *taken = PyMem_Calloc(nm, 1), *dseen = PyMem_Calloc(t->ndom, 1);
    if (!s || !idx || !res || !taken || !dseen) {
        PyErr_NoMemory();
        goto done;
    }
    if (input_init(&in, t, key.buf, key.len, 0) < 0) goto done;
    score_all(t, &in, s);
    if (n <= SELECT_MAX) {
        /* round 1: the best member of an unseen domain, n times at most; round 2: the
         * best member not taken */
        for (int spread = 1; spread >= 0 && got < n; spread--) {
            while (got < n) {
                Py_ssize_t b = -1;
                for (Py_ssize_t i = 0; i < nm; i++)
                    if (!taken[i] && !(spread && dseen[t->dom[i]]) && (b < 0 || BEFORE(t, s, i, b)))
                        b = i;
                if (b < 0) break;
                taken[b] = 1;
                dseen[t->dom[b]] = 1;
                res[got++] = (uint32_t)b;
            }
        }
    } else {
        if (sort_members(t, s, idx) < 0) goto done;
        for (Py_ssize_t r = 0; r < nm && got < n; r++) {
            uint32_t i = idx[r];
            if (!dseen[t->dom[i]]) {
                dseen[t->dom[i]] = 1;
                taken[i] = 1;
                res[got++] = i;
            }
        }
        for (Py_ssize_t r = 0; r < nm && got < n; r++)
            if (!taken[idx[r]]) res[got++] = idx[r];
    }
    out = pick(args[2], res, n);
done:
    PyMem_Free(in.buf);
    PyMem_Free(s);
    PyMem_Free(idx);
    PyMem_Free(res);
    PyMem_Free(taken);
    PyMem_Free(dseen);
    PyBuffer_Release(&key);
    return out;
}

/* place_positions(): the plain form scans every (position j, member i) pair by descending
 * (score, node_id, -j) and takes a pair while its position and member are free (and, in a
 * first round, its failure domain). Pairs only lose eligibility, so that is taking the best
 * eligible pair over and over; the best eligible member of each free position is kept
 * (best[j]) and found again only when a take made it ineligible. */
static PyObject *place_positions(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Table *t;
    Py_buffer key;
    Py_ssize_t n;
    if (parse(args, nargs, 4, "place_positions", &t, &key, &n) < 0) return NULL;
    PyObject *out = NULL;
    Input in = {0};
    Py_ssize_t nm = t->nm, left = n;
    uint64_t *s = PyMem_Malloc((size_t)n * nm * sizeof(uint64_t));
    uint32_t *chosen = PyMem_Malloc(n * sizeof(uint32_t));
    Py_ssize_t *best = PyMem_Malloc(n * sizeof(Py_ssize_t));
    unsigned char *used = PyMem_Calloc(nm, 1), *dtaken = PyMem_Calloc(t->ndom, 1);
    if (!s || !chosen || !best || !used || !dtaken) {
        PyErr_NoMemory();
        goto done;
    }
    if (input_init(&in, t, key.buf, key.len, 1) < 0) goto done;
    for (Py_ssize_t j = 0; j < n; j++) {
        input_position(&in, j);
        score_all(t, &in, s + j * nm);
        chosen[j] = UINT32_MAX;
    }
    for (int spread = 1; spread >= 0 && left; spread--) {
        for (Py_ssize_t j = 0; j < n; j++) best[j] = -2; /* -2: to find, -1: none left */
        while (left) {
            Py_ssize_t jb = -1;
            for (Py_ssize_t j = 0; j < n; j++) {
                if (chosen[j] != UINT32_MAX) continue;
                const uint64_t *row = s + j * nm;
                if (best[j] == -2) {
                    Py_ssize_t b = -1;
                    for (Py_ssize_t i = 0; i < nm; i++)
                        if (!used[i] && !(spread && dtaken[t->dom[i]]) &&
                            (b < 0 || BEFORE(t, row, i, b)))
                            b = i;
                    best[j] = b;
                }
                if (best[j] < 0) continue;
                if (jb < 0) {
                    jb = j;
                    continue;
                }
                uint64_t sj = row[best[j]], sb = s[jb * nm + best[jb]];
                /* ties between positions: the higher node_id, then the lower position */
                if (sj > sb || (sj == sb && t->rank[best[j]] > t->rank[best[jb]])) jb = j;
            }
            if (jb < 0) break; /* no eligible pair left in this round */
            Py_ssize_t i = best[jb];
            chosen[jb] = (uint32_t)i;
            used[i] = 1;
            dtaken[t->dom[i]] = 1;
            left--;
            for (Py_ssize_t j = 0; j < n; j++)
                if (chosen[j] == UINT32_MAX && best[j] >= 0 &&
                    (best[j] == i || (spread && t->dom[best[j]] == t->dom[i])))
                    best[j] = -2;
        }
    }
    if (left) { /* cannot happen with n <= members: every free position has a free member */
        PyErr_SetString(PyExc_RuntimeError, "place_positions: a position was left empty");
        goto done;
    }
    out = pick(args[2], chosen, n);
done:
    PyMem_Free(in.buf);
    PyMem_Free(s);
    PyMem_Free(chosen);
    PyMem_Free(best);
    PyMem_Free(used);
    PyMem_Free(dtaken);
    PyBuffer_Release(&key);
    return out;
}

/* The entry cache in front of placement._entry: the _Entry last built for a list (or
 * tuple) of the very same member objects and the same ns, found by identity in a few
 * pointer compares instead of placement._entry's tuples of node ids and failure domains
 * (O(members) Python work a call). Only lists of exactly one type are kept, the frozen
 * dataclass Member: the same object always has the same node_id and failure_domain, so
 * identity answers for them. The slots hold their member objects, so no address is reused
 * while a slot names it. Nothing here runs Python code (no attribute reads), so the GIL is
 * held throughout and threads see whole slots. */
#define SLOTS 32 /* (members, ns) pairs: a client with several namespaces, repair's two lists */

static struct {
    PyObject *ns;      /* bytes */
    PyObject *members; /* tuple */
    PyObject *entry;
} slots[SLOTS];
static int next_slot;

/* ns (str or bytes, exactly) as bytes; 0 when it is another type or not UTF-8-encodable */
static int ns_bytes(PyObject *ns, const char **p, Py_ssize_t *len) {
    if (PyBytes_CheckExact(ns)) {
        *p = PyBytes_AS_STRING(ns);
        *len = PyBytes_GET_SIZE(ns);
        return 1;
    }
    if (PyUnicode_CheckExact(ns)) {
        *p = PyUnicode_AsUTF8AndSize(ns, len);
        if (*p) return 1;
        PyErr_Clear(); /* lone surrogates: placement's own path raises the encoder's error */
    }
    return 0;
}

/* cached(members, ns) -> the _Entry remembered for these member objects and ns, or None */
static PyObject *cached(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "cached() takes 2 arguments");
        return NULL;
    }
    PyObject *ms = args[0];
    const char *nsp;
    Py_ssize_t nsl;
    if (!(PyList_CheckExact(ms) || PyTuple_CheckExact(ms)) || !ns_bytes(args[1], &nsp, &nsl))
        Py_RETURN_NONE;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(ms);
    PyObject **items = PySequence_Fast_ITEMS(ms);
    for (int s = 0; s < SLOTS; s++) {
        if (!slots[s].entry || PyTuple_GET_SIZE(slots[s].members) != n ||
            PyBytes_GET_SIZE(slots[s].ns) != nsl || memcmp(PyBytes_AS_STRING(slots[s].ns), nsp, nsl))
            continue;
        PyObject **had = &PyTuple_GET_ITEM(slots[s].members, 0);
        Py_ssize_t i = 0;
        while (i < n && items[i] == had[i]) i++;
        if (i == n) return Py_NewRef(slots[s].entry);
    }
    Py_RETURN_NONE;
}

/* remember(members, ns: bytes, entry, member_type): keep entry for these member objects
 * when every one is exactly member_type (an immutable type); else nothing */
static PyObject *remember(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4 || !PyBytes_CheckExact(args[1]) || !PyType_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError, "remember(members, ns: bytes, entry, member_type)");
        return NULL;
    }
    PyObject *ms = args[0];
    if (!(PyList_CheckExact(ms) || PyTuple_CheckExact(ms))) Py_RETURN_NONE;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(ms);
    PyObject **items = PySequence_Fast_ITEMS(ms);
    for (Py_ssize_t i = 0; i < n; i++)
        if (Py_TYPE(items[i]) != (PyTypeObject *)args[3]) Py_RETURN_NONE;
    PyObject *copy = PyTuple_New(n);
    if (!copy) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) PyTuple_SET_ITEM(copy, i, Py_NewRef(items[i]));
    int s = next_slot;
    next_slot = (next_slot + 1) % SLOTS;
    PyObject *ons = slots[s].ns, *oms = slots[s].members, *oe = slots[s].entry;
    slots[s].ns = Py_NewRef(args[1]);
    slots[s].members = copy;
    slots[s].entry = Py_NewRef(args[2]);
    Py_XDECREF(ons); /* after the slot is whole again: a deallocation may run Python code */
    Py_XDECREF(oms);
    Py_XDECREF(oe);
    Py_RETURN_NONE;
}

/* xxh3_64(data): the hash this module scores with, for the tests to compare with the
 * Python xxhash package */
static PyObject *xxh3_64(PyObject *self, PyObject *arg) {
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0) return NULL;
    uint64_t h = XXH3_64bits(b.buf, b.len);
    PyBuffer_Release(&b);
    return PyLong_FromUnsignedLongLong(h);
}

static PyMethodDef methods[] = {
    {"order", (PyCFunction)(void (*)(void))order, METH_FASTCALL,
     "order(table, key) -> member indexes by descending (score, node_id)"},
    {"place", (PyCFunction)(void (*)(void))place, METH_FASTCALL,
     "place(table, key, members, n) -> kvstore.placement.place's answer"},
    {"place_positions", (PyCFunction)(void (*)(void))place_positions, METH_FASTCALL,
     "place_positions(table, key, members, n) -> kvstore.placement.place_positions's answer"},
    {"cached", (PyCFunction)(void (*)(void))cached, METH_FASTCALL,
     "cached(members, ns) -> the entry remembered for these member objects, or None"},
    {"remember", (PyCFunction)(void (*)(void))remember, METH_FASTCALL,
     "remember(members, ns, entry, member_type) -> None"},
    {"xxh3_64", xxh3_64, METH_O, "xxh3_64(data) -> int, from the linked libxxhash"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moddef = {
    PyModuleDef_HEAD_INIT, "kvstore._placement",
    "Rendezvous placement's per-key work (see kvstore.placement)", -1, methods,
};

PyMODINIT_FUNC PyInit__placement(void) {
    if (PyType_Ready(&TableType) < 0) return NULL;
    PyObject *m = PyModule_Create(&moddef);
    if (!m) return NULL;
    Py_INCREF(&TableType);
    if (PyModule_AddObject(m, "Table", (PyObject *)&TableType) < 0) {
        Py_DECREF(&TableType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
