/* kvstored._index: the Store's packed index (issue 13; docs/scale.md, "The packed index").
 *
 * One fixed-width record per object in a dense array addressed by a u32 record number
 * (a free list keeps numbers stable while a record lives), an open-addressing table of
 * (record number, hash) pairs probed by a seeded 64-bit hash of (namespace id, key),
 * keys in per-length pools (no Python object per key), a namespace table, and the
 * DRAM slot map (slot -> record) as u32 arrays per slab.
 *
 * Python objects exist only for what is in flight: ``Entry`` is a view of one record.
 * A view built by ``Entry(...)`` is detached (holds its own fields) until
 * ``Table.insert`` copies them into a record; after that its attributes read and write
 * the record. The table maps record number -> live view (borrowed pointers, removed
 * by the view's dealloc), so every lookup of a record returns the same object while
 * anyone holds it: the Store and the eviction policy compare entries with ``is``.
 * A record leaves the hash table on ``remove``; it is freed when it is out of the
 * table and no view of it is left (a removed entry is still read by its holders).
 *
 * Everything runs on the daemon's event loop thread under the GIL: no locks.
 * Compiled for the baseline ISA (setup.py): no intrinsics, no -march.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <sys/random.h>

#define NOREC 0xFFFFFFFFu
#define MAX_RECS 0xFFFFFFF0u
#define MAX_KEY 255
#define MAX_SPACES 65535
#define MAX_CLASSES 255
#define NVME_BLOCK 4096

enum {
    F_USED = 1,        /* the record holds an object (else it is on the free list) */
    F_INTABLE = 2,     /* reachable by get (else removed, kept for its views) */
    F_DEAD = 4,        /* state DEAD */
    F_UNVERIFIED = 8,
    F_KEYLESS = 16,    /* its key is not in RAM (on the NVMe header, or in the arena's key area) */
    F_PIN = 32,        /* a pin record exists in the pins dict */
    F_NVME = 64,       /* has an NVMe location */
    F_NVSIDE = 128,    /* ... kept whole in the side dict (it did not pack) */
    F_DF = 256,        /* keyless: the record's union holds its DRAM form (else its NVMe form) */
    F_ASIDE = 512,     /* keyless in its DRAM form: its packed NVMe location is in the aside table */
    F_REFS = 1024,     /* readers in flight: the count is in the refs table */
};

/* The DRAM form, 17 bytes: what an object needs while it has a DRAM copy or is in an
   eviction list. A keyless record holds it in its own union (below); a keyed one at the
   head of its key chunk. Readers in flight are not here: a side table (refs > 0 only
   while a read is under way). */
typedef struct __attribute__((packed)) {
    uint64_t off : 40;    /* DRAM offset / 64 (64 TiB), OFF_NONE: none */
    uint64_t stamp : 28;  /* eviction clock, its low 28 bits (stamp_full: the clock's window) */
    uint64_t reads : 4;   /* saturating at 15: the Store asks only "read at all?" and orders
                             the shutdown flush by it */
    uint32_t newer, older; /* eviction links (record numbers) */
} DForm;

/* The NVMe form, 14 bytes: a keyed record's key chunk and the packed NVMe location (a
   keyless record in its DRAM form keeps the location in the aside table). */
typedef struct __attribute__((packed)) {
    uint32_t part;        /* keyed: its chunk (DRAM form + key) in pool key_class(key_len) */
    uint32_t blk;         /* NVMe record offset / 4096; with the geometry: the region */
    uint32_t gen;
    uint16_t region;      /* the region; with the geometry: the block in the region */
} NForm;

/* The record, 51 bytes, every object (issue 13: <= 64 B with the table's 8.4 and the slot
   map's 4.2 at 4 M). Records never move while they live (views, the slot map, the table
   and the lists hold record numbers): the state-dependent fields share a union, and the
   rare states are side tables (readers in flight; the NVMe location of a keyless object
   that is also in DRAM). Packed (alignment 1): fields are read as unaligned loads. */
typedef struct __attribute__((packed)) {
    uint64_t fp;          /* seeded 64-bit fingerprint of (namespace id, key): probe start, first compare */
    uint64_t checksum;
    double committed_at;  /* as written to NVMe and compared by repair: kept exact */
    uint32_t size;
    uint16_t ns;
    uint8_t key_len;
    uint8_t sc;
    unsigned flags : 13;
    signed seg : 3;       /* eviction list (-1: none) */
    union __attribute__((packed)) {
        DForm d;          /* keyless with F_DF */
        NForm n;          /* keyed always; keyless without F_DF */
        uint32_t next;    /* on the free list */
    } u;
} Rec;

_Static_assert(sizeof(DForm) == 17, "a DRAM form is 17 bytes");
_Static_assert(sizeof(Rec) == 51, "a record is 51 bytes");

/* A DRAM offset is kept as a 40-bit count of 64-byte units: every arena offset up to
   64 TiB packs (slot sizes are multiples of 64, slabs of 4096: arena.py). An unaligned
   offset (none from the arena) or one past 64 TiB goes to a side dict. */
#define OFF_UNIT 64
#define OFF_NONE 0xFFFFFFFFFFULL  /* offset -1: NVMe only */
#define OFF_WIDE 0xFFFFFFFFFEULL  /* kept in the side dict */
#define REFS_MAX 0xFFFFFFLL
#define STAMP_MAX 0xFFFFFFFFFFFFLL /* Entry.stamp's range (the clock is a u64) */
#define READS_MAX 0xFu
/* Eviction stamps keep the clock's low 28 bits. An age (clock - stamp) counts at most
   AGE_CAP ticks (the Python Policy caps it the same: eviction.STAMP_AGE_CAP), so a sweep
   (clock_advance) sets a linked record's stamp older than that to clock - AGE_CAP, and
   visits every record once per 2**25 ticks: no live stamp is 2**28 old, so its full
   value is the clock minus (clock - stamp) mod 2**28. */
#define STAMP_BITS 28
#define STAMP_MASK ((1ULL << STAMP_BITS) - 1)
#define AGE_CAP (1ULL << 27)
#define SWEEP_SHIFT 26

static const DForm DF0 = {OFF_NONE, 0, 0, NOREC, NOREC};

/* A side table: record -> a small value, open addressing (key rec + 1, 0 empty),
   backward-shift deletion, grown at 3/4 and shrunk at 1/8. Bounded by the rare state
   it holds, not by the records. */
typedef struct { uint32_t key, a, b; uint16_t c, pad; } SEnt;
typedef struct { SEnt *e; uint32_t mask, n; } SMap;  /* mask + 1 slots; e NULL: none */

typedef struct { uint32_t rec; void *view; } VSlot;            /* rec + 1; 0 = empty */
typedef struct { char *buf; uint32_t n, cap, free; } Pool;     /* chunks of 17 + 8 * class bytes */
/* nh: the seeded hash of the name, which fingerprints start from (not the id: ids are
   reused once a namespace empties, and a fingerprint must stay the same for a key while
   the table lives, as the eviction ghost remembers it) */
typedef struct { PyObject *name; uint64_t objects, bytes, nh; uint32_t nrec; } Space;
typedef struct { uint32_t slot_size, nslots; uint32_t *recs; } Row; /* recs: rec + 1 */

typedef struct {
    PyObject_HEAD
    int ready;
    uint64_t seed;
    Rec *recs;
    uint32_t nrecs, caprecs, freehead;
    uint32_t *slots;        /* record + 1 (0: empty); the probe start is the record's fp */
    uint64_t mask;          /* slots - 1 */
    uint64_t fp_mask;       /* ~0; fewer bits only in tests (set_fingerprint_bits) */
    uint64_t nkeyless;      /* records whose key is not in RAM */
    uint64_t count;         /* records in the table */
    uint64_t object_bytes, unverified;
    Pool pools[MAX_KEY / 8 + 2];  /* keyed records' chunks (DRAM form + key) by key length class */
    SMap refs;              /* rec -> readers in flight (a: count), F_REFS */
    SMap aside;             /* rec -> packed NVMe location of a keyless record in its DRAM form, F_ASIDE */
    uint64_t clock;         /* the eviction clock (the Lru's ticks; Entry.stamp writes raise it) */
    uint32_t sweep;         /* clock_advance's next record */
    uint64_t sweep_acc;     /* its fraction of a record to visit */
    Space *spaces;
    uint32_t nspaces, capspaces;
    uint32_t *freespaces;
    uint32_t nfreespaces;
    PyObject *space_ids;    /* name -> id */
    PyObject *classes;      /* list of size class objects */
    uint32_t slot_sizes[MAX_CLASSES + 1];
    uint32_t slots_per[MAX_CLASSES + 1];  /* the class's slots per slab (0: unknown) */
    uint32_t key_base[MAX_CLASSES + 1];   /* its slabs' key area start (0: none) */
    Py_buffer karena;       /* the arena (use_key_area; .obj NULL: none): key records */
    uint32_t key_width;     /* bytes of a slot's key record */
    int64_t slab_size;
    Row *rows;
    uint64_t nrows;
    VSlot *views;
    uint64_t vmask, vcount;
    PyObject *pins;         /* rec -> [pins, pin_until] */
    PyObject *nvside;       /* rec -> Location that did not pack */
    int64_t nv_start, nv_region;  /* NVMe geometry (use_nvme_geometry); nv_region 0: unknown */
    PyObject *wide;         /* rec -> DRAM offset that did not pack (OFF_WIDE) */
    PyObject *loctype;      /* builds Locations from packed fields */
    PyObject *key_loader;   /* fn(entry) -> bytes | None: the key of a keyless entry */
    uint32_t lrus;          /* live Lru objects over this table: they own seg and the links */
} Table;

typedef struct {
    Rec r;           /* its union is unused: the fields below */
    DForm d;         /* its off and stamp are unused: offset, stamp below */
    uint32_t refs;
    uint64_t stamp;
    int64_t offset;
    PyObject *ns, *key, *sc, *nvme;
    long pins;
    double pin_until;
} Detached;

typedef struct {
    PyObject_HEAD
    Table *ix;       /* NULL while detached */
    uint32_t rec;
    uint8_t inserting;  /* inside Table.insert: a second insert (from Python it runs) is refused */
    Detached *det;   /* non-NULL while detached */
} Entry;

static PyTypeObject TableType, EntryType, IterType;
static PyObject *time_time;  /* time.time: an entry's commit time, as the dict index's */
/* raised when a fixed-width field runs out (namespaces, records, a key pool):
   packedindex.py sets an OverflowError that is also the wire's NoSpace */
static PyObject *full_error;

/* ------------------------------------------------------------------ helpers */

static uint64_t mix(uint64_t h) {
    h ^= h >> 33; h *= 0xff51afd7ed558ccdULL; h ^= h >> 33; h *= 0xc4ceb9fe1a85ec53ULL;
    h ^= h >> 33;
    return h;
}

/* The fingerprint: a seeded mix of (namespace, key), every word of the key through a
   multiply-xorshift with the per-table seed (clients choose keys: none can aim them at
   one probe run without the seed). It starts from the namespace's name hash (nh), not
   its id, so a key's fingerprint is the same for the table's whole life: the native
   eviction policy's ghost remembers an evicted key by it (no key read at eviction). */
static uint64_t words_mix(uint64_t h, const char *k, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, k + i, 8);
        h = mix(h ^ w) + 0x9E3779B97F4A7C15ULL;
    }
    if (i < n) {
        uint64_t w = 0;
        memcpy(&w, k + i, n - i);
        h = mix(h ^ w ^ 0xA5A5A5A5ULL);
    }
    return mix(h);
}

/* the name hash of a namespace (Space.nh): seeded, another start than keys' */
static uint64_t name_hash(Table *t, const char *name, size_t n) {
    return words_mix(t->seed ^ 0x5851F42D4C957F2DULL ^ (n * 0xC2B2AE3D27D4EB4FULL), name, n);
}

static uint64_t fp_named(Table *t, uint64_t nh, const char *k, size_t n) {
    return words_mix(t->seed ^ nh ^ (n * 0x9E3779B97F4A7C15ULL), k, n) & t->fp_mask;
}

static inline uint64_t fp_of(Table *t, uint16_t ns, const char *k, size_t n) {
    return fp_named(t, t->spaces[ns].nh, k, n);
}

static int grow(void **p, size_t elem, uint64_t *cap, uint64_t want) {
    if (want <= *cap) return 0;
    uint64_t nc = *cap ? *cap : 16;
    while (nc < want) nc = nc + nc / 2 + 16;
    void *q = PyMem_RawRealloc(*p, nc * elem);
    if (!q) { PyErr_NoMemory(); return -1; }
    *p = q;
    *cap = nc;
    return 0;
}

static inline size_t chunk_size(unsigned c) { return sizeof(DForm) + 8 * (size_t)c; }
static inline unsigned key_class(size_t n) { return (unsigned)(n + 7) / 8; }

static inline DForm *chunk_df(Table *t, unsigned c, uint32_t i) {
    return (DForm *)(t->pools[c].buf + (size_t)i * chunk_size(c));
}

/* A record's DRAM form: a keyed one's at the head of its key chunk, a keyless one's in
   its union (F_DF), else NULL (every field at its default). */
static inline DForm *df_ptr(Table *t, Rec *r) {
    if (!(r->flags & F_KEYLESS)) return chunk_df(t, key_class(r->key_len), r->u.n.part);
    return r->flags & F_DF ? &r->u.d : NULL;
}

/* the key bytes of a keyed record (after its DRAM form) */
static inline char *key_ptr(Table *t, Rec *r) {
    return (char *)chunk_df(t, key_class(r->key_len), r->u.n.part) + sizeof(DForm);
}

/* A chunk of pool c (zeroed), or -1 with an exception. May move the pool's buffer. */
static int64_t chunk_alloc(Table *t, unsigned c) {
    Pool *p = &t->pools[c];
    size_t cs = chunk_size(c);
    uint32_t i;
    if (p->free != NOREC) {
        i = p->free;
        memcpy(&p->free, p->buf + (size_t)i * cs, 4);
    } else {
        if (p->n == NOREC - 1) { PyErr_SetString(full_error, "index full (2**32 keys of one key length class)"); return -1; }
        uint64_t cap = p->cap;
        if (grow((void **)&p->buf, cs, &cap, (uint64_t)p->n + 1) < 0) return -1;
        p->cap = cap > NOREC - 1 ? NOREC - 1 : (uint32_t)cap;
        i = p->n++;
    }
    memset(p->buf + (size_t)i * cs, 0, cs);
    return i;
}

static void chunk_free(Table *t, unsigned c, uint32_t i) {
    Pool *p = &t->pools[c];
    memcpy(p->buf + (size_t)i * chunk_size(c), &p->free, 4);
    p->free = i;
}

/* ------------------------------------------------------------- side tables */

static inline uint32_t s_home(uint32_t rec, uint32_t mask) {
    return (uint32_t)(((uint64_t)(rec + 1) * 0x9E3779B97F4A7C15ULL) >> 32) & mask;
}

static SEnt *s_find(SMap *m, uint32_t rec) {
    if (!m->e) return NULL;
    for (uint32_t i = s_home(rec, m->mask);; i = (i + 1) & m->mask) {
        if (!m->e[i].key) return NULL;
        if (m->e[i].key == rec + 1) return &m->e[i];
    }
}

/* Test hook (module function _fail_allocs(n, after=0)): past the next ``after``
   side-table allocations, n fail as out of memory (an SMap's rebuild, an insert into the
   nvside or wide dict), so the tests reach the MemoryError paths that must leave a record
   as it was, a call's second allocation included. Checked only where a side table
   allocates (rare states), never on a lookup or a list step. */
static Py_ssize_t fail_allocs, fail_after;

static inline int side_alloc_fails(void) {
    if (fail_allocs <= 0) return 0;
    if (fail_after > 0) { fail_after--; return 0; }
    fail_allocs--;
    return 1;
}

/* Rebuilt with ncap slots (a power of two >= 16); -1 leaves it as it was. */
static int s_resize(SMap *m, uint32_t ncap) {
    SEnt *ne = side_alloc_fails() ? NULL : PyMem_RawCalloc(ncap, sizeof(SEnt));
    if (!ne) return -1;
    if (m->e)
        for (uint32_t i = 0; i <= m->mask; i++) {
            if (!m->e[i].key) continue;
            uint32_t j = s_home(m->e[i].key - 1, ncap - 1);
            while (ne[j].key) j = (j + 1) & (ncap - 1);
            ne[j] = m->e[i];
        }
    PyMem_RawFree(m->e);
    m->e = ne;
    m->mask = ncap - 1;
    return 0;
}

/* rec's entry, made (zeroed) when absent; NULL with MemoryError. */
static SEnt *s_put(SMap *m, uint32_t rec) {
    SEnt *x = s_find(m, rec);
    if (x) return x;
    if ((!m->e || ((uint64_t)m->n + 1) * 4 > ((uint64_t)m->mask + 1) * 3) &&
        s_resize(m, m->e ? (m->mask + 1) * 2 : 16) < 0) {
        PyErr_NoMemory();
        return NULL;
    }
    uint32_t i = s_home(rec, m->mask);
    while (m->e[i].key) i = (i + 1) & m->mask;
    memset(&m->e[i], 0, sizeof(SEnt));
    m->e[i].key = rec + 1;
    m->n++;
    return &m->e[i];
}

static void s_del(SMap *m, uint32_t rec) {
    SEnt *x = s_find(m, rec);
    if (!x) return;
    uint32_t i = (uint32_t)(x - m->e), j = i, mask = m->mask;
    for (;;) {  /* backward shift, as slot_del */
        j = (j + 1) & mask;
        if (!m->e[j].key) break;
        uint32_t k = s_home(m->e[j].key - 1, mask);
        if ((j > i && (k <= i || k > j)) || (j < i && (k <= i && k > j))) {
            m->e[i] = m->e[j];
            i = j;
        }
    }
    m->e[i].key = 0;
    m->n--;
    /* give memory back once mostly empty (a failed allocation keeps the bigger one) */
    if (mask + 1 > 64 && (uint64_t)m->n * 8 < (uint64_t)mask + 1) s_resize(m, (mask + 1) / 2);
}

/* readers in flight of an attached record */
static inline uint32_t refs_of(Table *t, uint32_t rec) {
    if (!(t->recs[rec].flags & F_REFS)) return 0;
    SEnt *x = s_find(&t->refs, rec);
    return x ? x->a : 0;
}

static int refs_set(Table *t, uint32_t rec, uint32_t n) {
    if (!n) {
        if (t->recs[rec].flags & F_REFS) {
            s_del(&t->refs, rec);
            t->recs[rec].flags &= ~F_REFS;
        }
        return 0;
    }
    SEnt *x = s_put(&t->refs, rec);
    if (!x) return -1;
    x->a = n;
    t->recs[rec].flags |= F_REFS;
    return 0;
}

/* The packed NVMe location of a record with F_NVME and not F_NVSIDE: inline, or aside
   for a keyless record in its DRAM form. */
static void nv_get(Table *t, uint32_t rec, uint32_t *blk, uint32_t *gen, uint16_t *region) {
    Rec *r = &t->recs[rec];
    if (r->flags & F_ASIDE) {
        SEnt *x = s_find(&t->aside, rec);
        *blk = x ? x->a : 0; *gen = x ? x->b : 0; *region = x ? x->c : 0;
        return;
    }
    *blk = r->u.n.blk; *gen = r->u.n.gen; *region = r->u.n.region;
}

/* Its packed NVMe location set (the caller sets F_NVME); -1 with MemoryError. */
static int nv_set(Table *t, uint32_t rec, uint32_t blk, uint32_t gen, uint16_t region) {
    Rec *r = &t->recs[rec];
    if ((r->flags & (F_KEYLESS | F_DF)) == (F_KEYLESS | F_DF)) {
        SEnt *x = s_put(&t->aside, rec);
        if (!x) return -1;
        x->a = blk; x->b = gen; x->c = region;
        r->flags |= F_ASIDE;
        return 0;
    }
    r->u.n.blk = blk; r->u.n.gen = gen; r->u.n.region = region;
    return 0;
}

/* Its packed NVMe location dropped (F_NVME cleared by the caller). */
static void nv_clear(Table *t, uint32_t rec) {
    if (t->recs[rec].flags & F_ASIDE) {
        s_del(&t->aside, rec);
        t->recs[rec].flags &= ~F_ASIDE;
    }
}

static inline int df_default(const DForm *d) {
    return d->off == OFF_NONE && !d->stamp && !d->reads && d->newer == NOREC && d->older == NOREC;
}

/* The DRAM form of record ``rec`` to write: a keyless record in its NVMe form turns to
   its DRAM form, its packed NVMe location going aside; NULL with an exception. */
static DForm *df_for_write(Table *t, uint32_t rec) {
    Rec *r = &t->recs[rec];
    DForm *d = df_ptr(t, r);
    if (d) return d;
    if ((r->flags & (F_NVME | F_NVSIDE)) == F_NVME) {
        SEnt *x = s_put(&t->aside, rec);
        if (!x) return NULL;
        x->a = r->u.n.blk; x->b = r->u.n.gen; x->c = r->u.n.region;
        r->flags |= F_ASIDE;
    }
    r->u.d = DF0;
    r->flags |= F_DF;
    return &r->u.d;
}

/* A keyless record goes back to its NVMe form once every DRAM field is at its default
   and it is in no eviction list (the lists read its form: a sole member's links are both
   NOREC, so its form can look default). */
static void df_settle(Table *t, uint32_t rec) {
    Rec *r = &t->recs[rec];
    if ((r->flags & (F_KEYLESS | F_DF)) != (F_KEYLESS | F_DF) || r->seg >= 0 || !df_default(&r->u.d))
        return;
    NForm n = {NOREC, 0, 0, 0};
    if (r->flags & F_ASIDE) {
        SEnt *x = s_find(&t->aside, rec);
        if (x) { n.blk = x->a; n.gen = x->b; n.region = x->c; }
        s_del(&t->aside, rec);
    }
    r->u.n = n;
    r->flags &= ~(F_DF | F_ASIDE);
}

/* ------------------------------------------------------------ eviction clock */

/* The full value of a stored stamp: the clock's latest tick with those low bits. */
static inline uint64_t stamp_full(const Table *t, uint64_t s) {
    return t->clock - ((t->clock - s) & STAMP_MASK);
}

/* The stamp the policy compares: at most AGE_CAP ticks old (eviction.Policy: the same). */
static inline uint64_t stamp_eff(const Table *t, uint64_t s) {
    uint64_t f = stamp_full(t, s);
    return t->clock > AGE_CAP && f < t->clock - AGE_CAP ? t->clock - AGE_CAP : f;
}

/* The clock moves to ``to``: the sweep visits the next records in array order, (records
   + 1) per 2**(SWEEP_SHIFT - 1) ticks (an accumulator carries the fraction), and sets the
   stamp of a linked one older than AGE_CAP at ``to`` to to - AGE_CAP. So every record is
   visited once per 2**(SWEEP_SHIFT - 1) ticks and no stamp gets older than AGE_CAP +
   2**(SWEEP_SHIFT - 1) < 2**28 (stamp_full stays exact). At 1 M records that is one
   record every 32 ticks; a jump of the clock past 2**(SWEEP_SHIFT - 1) (a test,
   Entry.stamp) sweeps them all. */
static void clock_advance(Table *t, uint64_t to) {
    uint64_t old = t->clock;
    if (to <= old) return;
    uint64_t nrecs = t->nrecs, n = nrecs, d = to - old;
    if (d < (1ULL << (SWEEP_SHIFT - 1))) {
        t->sweep_acc += d * (nrecs + 1);  /* < 2**25 x 2**32: no overflow */
        n = t->sweep_acc >> (SWEEP_SHIFT - 1);
        t->sweep_acc &= (1ULL << (SWEEP_SHIFT - 1)) - 1;
        if (n > nrecs) n = nrecs;
    }
    for (; n; n--) {
        if (t->sweep >= t->nrecs) t->sweep = 0;
        Rec *r = &t->recs[t->sweep++];
        if (!(r->flags & F_USED) || r->seg < 0) continue;
        DForm *d = df_ptr(t, r);
        if (!d) continue;
        uint64_t f = old - ((old - d->stamp) & STAMP_MASK);
        if (to - f > AGE_CAP) d->stamp = (to - AGE_CAP) & STAMP_MASK;
    }
    t->clock = to;
}

/* one tick: the new stamp */
static inline uint64_t clock_tick(Table *t) {
    clock_advance(t, t->clock + 1);
    return t->clock;
}

/* ---------------------------------------------------------------- views map */

static inline uint64_t vhash(uint32_t rec) { return (uint64_t)rec * 0x9E3779B97F4A7C15ULL >> 20; }

static Entry *view_get(Table *t, uint32_t rec) {
    if (!t->views) return NULL;
    for (uint64_t i = vhash(rec) & t->vmask;; i = (i + 1) & t->vmask) {
        if (t->views[i].rec == 0) return NULL;
        if (t->views[i].rec == rec + 1) return (Entry *)t->views[i].view;
    }
}

static int views_resize(Table *t, uint64_t ncap) {
    VSlot *nv = PyMem_RawCalloc(ncap, sizeof(VSlot));
    if (!nv) return -1;
    if (t->views) {
        for (uint64_t i = 0; i <= t->vmask; i++) {
            if (!t->views[i].rec) continue;
            uint64_t j = vhash(t->views[i].rec - 1) & (ncap - 1);
            while (nv[j].rec) j = (j + 1) & (ncap - 1);
            nv[j] = t->views[i];
        }
        PyMem_RawFree(t->views);
    }
    t->views = nv;
    t->vmask = ncap - 1;
    return 0;
}

static int view_put(Table *t, uint32_t rec, Entry *v) {
    if ((!t->views || (t->vcount + 1) * 2 > t->vmask + 1) &&
        views_resize(t, t->views ? (t->vmask + 1) * 2 : 64) < 0) {
        PyErr_NoMemory();
        return -1;
    }
    uint64_t i = vhash(rec) & t->vmask;
    while (t->views[i].rec) i = (i + 1) & t->vmask;
    t->views[i].rec = rec + 1;
    t->views[i].view = v;
    t->vcount++;
    return 0;
}

static void view_del(Table *t, uint32_t rec) {
    uint64_t m = t->vmask, i = vhash(rec) & m;
    while (t->views[i].rec != rec + 1) {
        if (!t->views[i].rec) return;
        i = (i + 1) & m;
    }
    /* backward shift: no tombstones */
    uint64_t j = i;
    for (;;) {
        j = (j + 1) & m;
        if (!t->views[j].rec) break;
        uint64_t k = vhash(t->views[j].rec - 1) & m;
        if ((j > i && (k <= i || k > j)) || (j < i && (k <= i && k > j))) {
            t->views[i] = t->views[j];
            i = j;
        }
    }
    t->views[i].rec = 0;
    t->vcount--;
    /* a walk that held every view (the shutdown flush sorts them) leaves a big map:
       give it back once it is mostly empty (a failed allocation keeps the old one) */
    if (t->vmask + 1 > 1024 && t->vcount * 8 < t->vmask + 1) views_resize(t, (t->vmask + 1) / 2);
}

/* ---------------------------------------------------------------- hash table */

/* Doubled when an insert would pass 3/4 load: with the fingerprint in the record (not in
   the slot), every slot a probe passes is a record read, so the table is kept shorter
   than the 7/8 of 8-byte slots (docs/scale.md has the probe lengths). Rebuilt from the
   records in record order (sequential reads). */
static int table_grow(Table *t) {
    uint64_t ncap = t->slots ? (t->mask + 1) * 2 : 1024;
    uint32_t *ns = PyMem_RawCalloc(ncap, sizeof(uint32_t));
    if (!ns) { PyErr_NoMemory(); return -1; }
    for (uint32_t r = 0; r < t->nrecs; r++) {
        if ((t->recs[r].flags & (F_USED | F_INTABLE)) != (F_USED | F_INTABLE)) continue;
        uint64_t j = t->recs[r].fp & (ncap - 1);
        while (ns[j]) j = (j + 1) & (ncap - 1);
        ns[j] = r + 1;
    }
    PyMem_RawFree(t->slots);
    t->slots = ns;
    t->mask = ncap - 1;
    return 0;
}

static inline int table_full(Table *t) {
    return (t->count + 1) * 4 > (t->slots ? t->mask + 1 : 0) * 3;
}

/* Slot index of (ns, key), or -1. A keyed record matches by its bytes; a keyless one by
   namespace, length and fingerprint, and only when no keyed record of the run has the
   bytes (so a keyed key is always found as itself, even beside a keyless record of
   equal fingerprint). ``k`` NULL: the first record of that namespace, length and
   fingerprint, keyed or not (duplicate checks of a keyless record). */
static int64_t find(Table *t, uint16_t ns, const char *k, size_t n, uint64_t fp) {
    if (!t->slots) return -1;
    int64_t keyless = -1;
    for (uint64_t i = fp & t->mask;; i = (i + 1) & t->mask) {
        uint32_t s = t->slots[i];
        if (!s) return keyless;
        Rec *r = &t->recs[s - 1];
        if (r->fp != fp || r->ns != ns || r->key_len != n) continue;
        if (!k || n == 0) return (int64_t)i;
        if (r->flags & F_KEYLESS) {
            if (keyless < 0) keyless = (int64_t)i;
        } else if (memcmp(key_ptr(t, r), k, n) == 0) {
            return (int64_t)i;
        }
    }
}

/* Whether a keyless record other than ``rec`` has rec's namespace, length and
   fingerprint: two such could not be told apart, so the second keeps its key. */
static int keyless_twin(Table *t, uint16_t ns, size_t n, uint64_t fp, uint32_t rec) {
    if (!t->slots) return 0;
    for (uint64_t i = fp & t->mask;; i = (i + 1) & t->mask) {
        uint32_t s = t->slots[i];
        if (!s) return 0;
        Rec *r = &t->recs[s - 1];
        if (s != rec + 1 && r->fp == fp && r->ns == ns && r->key_len == n && (r->flags & F_KEYLESS))
            return 1;
    }
}

/* The slot holding record ``rec``, or -1. */
static int64_t find_rec(Table *t, uint32_t rec) {
    if (!t->slots) return -1;
    for (uint64_t i = t->recs[rec].fp & t->mask;; i = (i + 1) & t->mask) {
        if (!t->slots[i]) return -1;
        if (t->slots[i] == rec + 1) return (int64_t)i;
    }
}

static void slot_put(Table *t, uint32_t rec) {
    uint64_t i = t->recs[rec].fp & t->mask;
    while (t->slots[i]) i = (i + 1) & t->mask;
    t->slots[i] = rec + 1;
}

static void slot_del(Table *t, uint64_t i) {
    uint64_t m = t->mask, j = i;
    for (;;) {
        j = (j + 1) & m;
        if (!t->slots[j]) break;
        uint64_t k = t->recs[t->slots[j] - 1].fp & m;
        if ((j > i && (k <= i || k > j)) || (j < i && (k <= i && k > j))) {
            t->slots[i] = t->slots[j];
            i = j;
        }
    }
    t->slots[i] = 0;
}

/* ---------------------------------------------------------------- namespaces */

static int space_id(Table *t, PyObject *name, int create) {
    PyObject *v = PyDict_GetItemWithError(t->space_ids, name);
    if (v) return (int)PyLong_AsLong(v);
    if (PyErr_Occurred() || !create) return -1;
    uint32_t id;
    if (t->nfreespaces) {
        id = t->freespaces[--t->nfreespaces];
    } else {
        if (t->nspaces >= MAX_SPACES) {
            PyErr_SetString(full_error, "index full: more than 65535 namespaces hold objects");
            return -1;
        }
        uint64_t cap = t->capspaces;
        if (grow((void **)&t->spaces, sizeof(Space), &cap, (uint64_t)t->nspaces + 1) < 0) return -1;
        t->capspaces = (uint32_t)cap;
        id = t->nspaces++;
    }
    /* keep a bytes object of our own: the caller's may be a subclass or be mutated */
    PyObject *own = PyBytes_FromStringAndSize(PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name));
    PyObject *idv = PyLong_FromUnsignedLong(id);
    if (!own || !idv || PyDict_SetItem(t->space_ids, own, idv) < 0) {
        Py_XDECREF(own); Py_XDECREF(idv);
        t->freespaces[t->nfreespaces++] = id;
        return -1;
    }
    Py_DECREF(idv);
    Space *s = &t->spaces[id];
    s->name = own;
    s->nh = name_hash(t, PyBytes_AS_STRING(own), (size_t)PyBytes_GET_SIZE(own));
    s->objects = s->bytes = 0;
    s->nrec = 0;
    return (int)id;
}

static void space_release(Table *t, uint16_t id) {
    Space *s = &t->spaces[id];
    if (--s->nrec) return;
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    if (PyDict_DelItem(t->space_ids, s->name) < 0) PyErr_Clear();
    PyErr_Restore(et, ev, tb);
    Py_CLEAR(s->name);
    t->freespaces[t->nfreespaces++] = id;
}

/* ------------------------------------------------------------------- classes */

/* An optional int attribute below 2**32: 0 when absent or not an int; an error only
   from a failing getattr other than AttributeError. */
static uint32_t opt_attr(PyObject *o, const char *name) {
    PyObject *v = PyObject_GetAttrString(o, name);
    if (!v) {
        if (PyErr_ExceptionMatches(PyExc_AttributeError)) PyErr_Clear();
        return 0;
    }
    long x = PyLong_Check(v) ? PyLong_AsLong(v) : 0;
    Py_DECREF(v);
    if (x == -1 && PyErr_Occurred()) { PyErr_Clear(); return 0; }
    return x > 0 && x <= 0xFFFFFFFFL ? (uint32_t)x : 0;
}

static int class_id(Table *t, PyObject *sc) {
    Py_ssize_t n = PyList_GET_SIZE(t->classes);
    for (Py_ssize_t i = 0; i < n; i++)
        if (PyList_GET_ITEM(t->classes, i) == sc) return (int)i;
    if (n >= MAX_CLASSES) {
        PyErr_SetString(PyExc_OverflowError, "more than 255 size classes in the index");
        return -1;
    }
    PyObject *ss = PyObject_GetAttrString(sc, "slot_size");
    if (!ss) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "sc must be a size class (with slot_size), not %.80s",
                     Py_TYPE(sc)->tp_name);
        return -1;
    }
    long v = PyLong_Check(ss) ? PyLong_AsLong(ss) : -1;
    Py_DECREF(ss);
    if (v <= 0 || v > 0x7FFFFFFFL) {
        PyErr_Clear();
        PyErr_SetString(PyExc_ValueError, "sc.slot_size must be a positive int below 2**31");
        return -1;
    }
    /* the arena's layout of the class, where it says (arena.SizeClass; tests' stand-ins
       may not): its slots per slab size the slot map's rows, its key area's start is where
       get_read finds a slot's key record */
    uint32_t per = opt_attr(sc, "slots_per_slab"), kb = opt_attr(sc, "key_base");
    if (PyErr_Occurred()) return -1;
    if (PyList_Append(t->classes, sc) < 0) return -1;
    t->slot_sizes[n] = (uint32_t)v;
    t->slots_per[n] = per;
    t->key_base[n] = kb;
    return (int)n;
}

/* ------------------------------------------------------------------- records */

static int64_t rec_alloc(Table *t) {
    uint32_t i;
    if (t->freehead != NOREC) {
        i = t->freehead;
        t->freehead = t->recs[i].u.next;
    } else {
        if (t->nrecs >= MAX_RECS) {
            PyErr_SetString(full_error, "index full (2**32 records)");
            return -1;
        }
        uint64_t cap = t->caprecs;
        if (grow((void **)&t->recs, sizeof(Rec), &cap, (uint64_t)t->nrecs + 1) < 0) return -1;
        t->caprecs = cap > MAX_RECS ? MAX_RECS : (uint32_t)cap;
        i = t->nrecs++;
    }
    memset(&t->recs[i], 0, sizeof(Rec));
    t->recs[i].u.n.part = NOREC;
    return i;
}

static void dict_pop_rec(PyObject *d, uint32_t rec);
static int side_dict_set(PyObject *d, uint32_t rec, PyObject *v);

static inline uint64_t off_units(Table *t, Rec *r) {
    DForm *d = df_ptr(t, r);
    return d ? d->off : OFF_NONE;
}

static void slot_clear(Table *t, uint32_t rec);
static void slot_clear_at(Table *t, uint32_t rec, int64_t off);

static int64_t rec_offset(Table *t, uint32_t rec) {
    uint64_t o = off_units(t, &t->recs[rec]);
    if (o == OFF_NONE) return -1;
    if (o != OFF_WIDE) return (int64_t)o * OFF_UNIT;
    PyObject *k = PyLong_FromUnsignedLong(rec);
    PyObject *v = k ? PyDict_GetItemWithError(t->wide, k) : NULL;
    Py_XDECREF(k);
    long long x = v ? PyLong_AsLongLong(v) : -1;
    if (PyErr_Occurred()) PyErr_Clear();
    return x;
}

/* 0, or -1 with MemoryError and the record as it was: what may fail (the wide dict's
   insert, a keyless record's DRAM form) comes before the old offset's slot and side
   entry go. */
static int rec_set_offset(Table *t, uint32_t rec, int64_t off) {
    int64_t old = rec_offset(t, rec);
    int was_wide = off_units(t, &t->recs[rec]) == OFF_WIDE;
    uint64_t u = OFF_NONE;
    DForm *d = NULL;
    if (off >= 0) {
        u = OFF_WIDE;
        if (off % OFF_UNIT == 0 && (uint64_t)(off / OFF_UNIT) < OFF_WIDE) {
            u = (uint64_t)(off / OFF_UNIT);
        } else {
            /* replaces a wide old offset in place: the failure below cannot follow then
               (a wide offset's record has its DRAM form) */
            PyObject *v = PyLong_FromLongLong(off);
            int bad = !v || side_dict_set(t->wide, rec, v) < 0;
            Py_XDECREF(v);
            if (bad) return -1;
        }
        /* a keyless record turns to its DRAM form here (promotion) */
        if (!(d = df_for_write(t, rec))) {
            if (u == OFF_WIDE) dict_pop_rec(t->wide, rec);
            return -1;
        }
    }
    /* the slot it leaves must not keep pointing at it: once the record is freed and its
       number reused, at(old offset) would return another object (callers displace first;
       this makes a missed displace harmless) */
    if (old != off) slot_clear_at(t, rec, old);
    if (was_wide && u != OFF_WIDE) dict_pop_rec(t->wide, rec);
    if (off < 0) {
        d = df_ptr(t, &t->recs[rec]);
        if (d) d->off = OFF_NONE;
        df_settle(t, rec);
        return 0;
    }
    d->off = u;
    return 0;
}

static Row *row_of(Table *t, int64_t off, uint64_t *slab, int64_t *rel) {
    *slab = (uint64_t)(off / t->slab_size);
    *rel = off % t->slab_size;
    return *slab < t->nrows && t->rows[*slab].recs ? &t->rows[*slab] : NULL;
}

static void slot_clear(Table *t, uint32_t rec) { slot_clear_at(t, rec, rec_offset(t, rec)); }

/* rec's slot at DRAM offset off (its current one, or the one it leaves) is emptied */
static void slot_clear_at(Table *t, uint32_t rec, int64_t off) {
    if (off < 0) return;
    uint64_t slab; int64_t rel;
    Row *row = row_of(t, off, &slab, &rel);
    if (row && rel % row->slot_size == 0 && (uint64_t)(rel / row->slot_size) < row->nslots &&
        row->recs[rel / row->slot_size] == rec + 1)
        row->recs[rel / row->slot_size] = 0;
}

static void dict_pop_rec(PyObject *d, uint32_t rec) {
    PyObject *k = PyLong_FromUnsignedLong(rec);
    if (!k || PyDict_DelItem(d, k) < 0) PyErr_Clear();
    Py_XDECREF(k);
}

/* d.pop(rec) without releasing the value: it is returned (new reference, or NULL), for
   the caller to release once its record pointers are no longer needed (a side table's
   value may be the last reference to an object whose __del__ runs Python) */
static PyObject *dict_take_rec(PyObject *d, uint32_t rec) {
    PyObject *k = PyLong_FromUnsignedLong(rec);
    PyObject *v = k ? PyDict_GetItemWithError(d, k) : NULL;
    Py_XINCREF(v);
    if (v && PyDict_DelItem(d, k) < 0) Py_CLEAR(v);
    if (PyErr_Occurred()) PyErr_Clear();
    Py_XDECREF(k);
    return v;
}

/* d[rec] = v for a side dict (nvside, wide): 0, or -1 with MemoryError and d as it was.
   An old value under rec is replaced; it is an int or a Location (the caller holds a
   Location it replaces: its release may run Python). */
static int side_dict_set(PyObject *d, uint32_t rec, PyObject *v) {
    if (side_alloc_fails()) { PyErr_NoMemory(); return -1; }
    PyObject *k = PyLong_FromUnsignedLong(rec);
    int rc = k ? PyDict_SetItem(d, k, v) : -1;
    Py_XDECREF(k);
    return rc;
}

/* Free a record that left the table and has no view. The side tables' values (a pin
   record, an unpacked Location) are released last, when the record is free: their
   release may run Python (a __del__) that grows the record array or reads this index. */
static void rec_free(Table *t, uint32_t rec) {
    Rec *r = &t->recs[rec];
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    slot_clear(t, rec);
    PyObject *pin = r->flags & F_PIN ? dict_take_rec(t->pins, rec) : NULL;
    PyObject *loc = r->flags & F_NVSIDE ? dict_take_rec(t->nvside, rec) : NULL;
    if (off_units(t, r) == OFF_WIDE) dict_pop_rec(t->wide, rec);  /* an exact int */
    if (!(r->flags & F_KEYLESS)) chunk_free(t, key_class(r->key_len), r->u.n.part);
    else t->nkeyless--;
    refs_set(t, rec, 0);
    nv_clear(t, rec);
    space_release(t, r->ns);
    r = &t->recs[rec];
    r->flags = 0;
    r->seg = -1;
    r->u.next = t->freehead;
    t->freehead = rec;
    Py_XDECREF(pin);
    Py_XDECREF(loc);
    PyErr_Restore(et, ev, tb);
}

/* The view of record ``rec`` (new reference): the live one, or a new one. */
static PyObject *view_of(Table *t, uint32_t rec) {
    if (rec >= t->nrecs || !(t->recs[rec].flags & F_USED)) {
        PyErr_Format(PyExc_RuntimeError, "record %u is not in the index (a stale link)", rec);
        return NULL;
    }
    Entry *v = view_get(t, rec);
    if (v) { Py_INCREF(v); return (PyObject *)v; }
    v = PyObject_GC_New(Entry, &EntryType);
    if (!v) return NULL;
    /* the allocation may have run a collection whose Python made this record's view (a
       second one would be filed beside it, and the map keep a freed one) or freed it */
    Entry *w = rec < t->nrecs && (t->recs[rec].flags & F_USED) ? view_get(t, rec) : NULL;
    if (w || rec >= t->nrecs || !(t->recs[rec].flags & F_USED)) {
        PyObject_GC_Del(v);
        if (w) { Py_INCREF(w); return (PyObject *)w; }
        PyErr_Format(PyExc_RuntimeError, "record %u left the index while its view was made", rec);
        return NULL;
    }
    v->ix = NULL; v->det = NULL; v->rec = rec; v->inserting = 0;
    if (view_put(t, rec, v) < 0) { v->ix = NULL; PyObject_GC_Del(v); return NULL; }
    Py_INCREF(t);
    v->ix = t;
    PyObject_GC_Track(v);
    return (PyObject *)v;
}

/* ------------------------------------------------------------------- Entry */

static Rec *R(Entry *e) { return e->ix ? &e->ix->recs[e->rec] : &e->det->r; }
/* its DRAM form to read (DF0: none, all fields at their defaults) */
static const DForm *A(Entry *e) {
    if (!e->ix) return &e->det->d;
    DForm *d = df_ptr(e->ix, R(e));
    return d ? d : &DF0;
}
/* ... to write (a keyless record turns to its DRAM form: A_settle after the write) */
static DForm *A_w(Entry *e) { return e->ix ? df_for_write(e->ix, e->rec) : &e->det->d; }
static void A_settle(Entry *e) { if (e->ix) df_settle(e->ix, e->rec); }

static int check_attached(Entry *e, Table *t) {
    if (e->ix != t) {
        PyErr_SetString(PyExc_KeyError, e->ix ? "entry belongs to another index"
                                              : "entry is not in this index (never inserted)");
        return -1;
    }
    return 0;
}

static int offset_check(long long offset) {
    if (offset < -1) {
        PyErr_Format(PyExc_ValueError, "offset must be a DRAM offset or -1, not %lld", offset);
        return -1;
    }
    return 0;
}

/* The checks an entry's fields get however they come in (Entry(...), Table.add). */
static int fields_check(PyObject *key, PyObject *sizeobj, uint32_t *size, PyObject *csum,
                        unsigned long long *cs) {
    if (PyBytes_GET_SIZE(key) > MAX_KEY) {
        PyErr_Format(PyExc_ValueError, "key of %zd bytes: the packed index holds keys of at most %d",
                     PyBytes_GET_SIZE(key), MAX_KEY);
        return -1;
    }
    if (!PyLong_Check(sizeobj)) {
        PyErr_SetString(PyExc_TypeError, "size must be an int");
        return -1;
    }
    int of = 0;
    long long sz = PyLong_AsLongLongAndOverflow(sizeobj, &of);
    if (sz == -1 && PyErr_Occurred()) return -1;
    if (of || sz < 0 || sz > 0xFFFFFFFFLL) {
        PyErr_SetString(PyExc_ValueError, "size must be in [0, 2**32)");
        return -1;
    }
    *size = (uint32_t)sz;
    if (!PyLong_Check(csum)) {
        PyErr_SetString(PyExc_TypeError, "checksum must be an int");
        return -1;
    }
    *cs = PyLong_AsUnsignedLongLong(csum);
    if (*cs == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_SetString(PyExc_ValueError, "checksum must be an int in [0, 2**64)");
        return -1;
    }
    return 0;
}

static PyObject *Entry_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"ns", "key", "offset", "size", "checksum", "sc", NULL};
    PyObject *ns, *key, *sc, *csum, *sizeobj;
    long long offset;
    uint32_t size;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "SSLOOO:Entry", kwlist, &ns, &key, &offset,
                                     &sizeobj, &csum, &sc))
        return NULL;
    unsigned long long cs;
    if (fields_check(key, sizeobj, &size, csum, &cs) < 0 || offset_check(offset) < 0) return NULL;
    Entry *e = PyObject_GC_New(Entry, type);
    if (!e) return NULL;
    e->ix = NULL; e->rec = NOREC; e->inserting = 0;
    e->det = PyMem_Calloc(1, sizeof(Detached));
    if (!e->det) { PyObject_GC_Del(e); return PyErr_NoMemory(); }
    Detached *d = e->det;
    /* exact bytes of our own for a subclass: then ns and key can be in no reference cycle,
       so the GC never clears them (Entry_clear) and a cleared entry still reads them */
    d->ns = PyBytes_CheckExact(ns) ? Py_NewRef(ns)
                                   : PyBytes_FromStringAndSize(PyBytes_AS_STRING(ns), PyBytes_GET_SIZE(ns));
    d->key = PyBytes_CheckExact(key) ? Py_NewRef(key)
                                     : PyBytes_FromStringAndSize(PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key));
    Py_INCREF(sc); d->sc = sc;
    d->nvme = NULL;
    if (!d->ns || !d->key) { Py_DECREF(e); return NULL; }
    d->offset = offset;
    d->r.size = size;
    d->r.checksum = cs;
    d->d = DF0;
    d->refs = 0;
    d->stamp = 0;
    d->r.seg = -1;
    d->r.flags = F_USED;
    PyObject *now = PyObject_CallNoArgs(time_time);
    if (!now) { Py_DECREF(e); return NULL; }
    d->r.committed_at = PyFloat_AsDouble(now);
    Py_DECREF(now);
    PyObject_GC_Track(e);
    return (PyObject *)e;
}

static int Entry_traverse(Entry *e, visitproc visit, void *arg) {
    Py_VISIT(e->ix);
    if (e->det) {
        Py_VISIT(e->det->ns); Py_VISIT(e->det->key); Py_VISIT(e->det->sc); Py_VISIT(e->det->nvme);
    }
    return 0;
}

static void det_free(Entry *e) {
    if (!e->det) return;
    Detached *d = e->det;
    e->det = NULL;
    Py_XDECREF(d->ns); Py_XDECREF(d->key); Py_XDECREF(d->sc); Py_XDECREF(d->nvme);
    PyMem_Free(d);
}

static void detach_view(Entry *e) {
    Table *t = e->ix;
    if (!t) return;
    e->ix = NULL;
    if (e->rec < t->nrecs) {
        Rec *r = &t->recs[e->rec];
        view_del(t, e->rec);
        /* a record still in an eviction list (seg set) is kept: the lists link it by
           number (Lru.remove unlinks it; its next view's dealloc frees it) */
        if ((r->flags & F_USED) && !(r->flags & F_INTABLE) && r->seg < 0) rec_free(t, e->rec);
    }
    Py_DECREF(t);
}

static int Entry_clear(Entry *e) {
    /* A cycle through a view (e.g. the index's pinned set): it stays a view of its record
       until dealloc. A detached entry drops only the objects a cycle can pass through (sc,
       nvme; ns and key are exact bytes): the GC clears the objects of a cycle one by one,
       and Python run meanwhile (a weakref callback made by a finalizer, when an object
       the cleared one held dies) may still read this entry, so the detached part stays
       until dealloc and its getters see NULL, not freed memory. */
    if (e->det) {
        Py_CLEAR(e->det->sc);
        Py_CLEAR(e->det->nvme);
    }
    return 0;
}

static void Entry_dealloc(Entry *e) {
    PyObject_GC_UnTrack(e);
    det_free(e);
    detach_view(e);
    PyObject_GC_Del(e);
}

/* --- field access */

static PyObject *bad_set(const char *name) {
    PyErr_Format(PyExc_AttributeError, "cannot delete Entry.%s", name);
    return NULL;
}

static int int_arg(PyObject *v, const char *name, long long lo, long long hi, long long *out) {
    if (!v) { bad_set(name); return -1; }
    if (!PyLong_Check(v)) {
        PyErr_Format(PyExc_TypeError, "Entry.%s must be an int, not %.80s", name, Py_TYPE(v)->tp_name);
        return -1;
    }
    int of = 0;
    long long x = PyLong_AsLongLongAndOverflow(v, &of);
    if (x == -1 && PyErr_Occurred()) return -1;
    if (of || x < lo || x > hi) {
        PyErr_Format(PyExc_ValueError, "Entry.%s out of range [%lld, %lld]", name, lo, hi);
        return -1;
    }
    *out = x;
    return 0;
}

static PyObject *get_refs(Entry *e, void *c) {
    return PyLong_FromUnsignedLong(e->ix ? refs_of(e->ix, e->rec) : e->det->refs);
}
static int set_refs(Entry *e, PyObject *v, void *c) {
    long long x;
    if (int_arg(v, "refs", 0, REFS_MAX, &x) < 0) return -1;
    if (!e->ix) { e->det->refs = (uint32_t)x; return 0; }
    return refs_set(e->ix, e->rec, (uint32_t)x);
}

/* The full stamp (the clock's window: stamp_full); 0 without a DRAM form. */
static PyObject *get_stamp(Entry *e, void *c) {
    if (!e->ix) return PyLong_FromUnsignedLongLong(e->det->stamp);
    DForm *d = df_ptr(e->ix, R(e));
    /* the sweep keeps only linked records' stamps within the clock's window: an unlinked
       one never stamped reads 0 (not the window's base); one stamped and left unlinked
       for 2**28 ticks or more reads wrong, and no decision reads it (a link stamps anew) */
    if (!d || (R(e)->seg < 0 && d->stamp == 0)) return PyLong_FromLong(0);
    return PyLong_FromUnsignedLongLong(stamp_full(e->ix, d->stamp));
}
/* A stamp past the clock moves the clock there; one older than AGE_CAP is kept as
   clock - AGE_CAP (the policy counts no age past it). */
static void stamp_store(Table *t, DForm *d, uint64_t x);
static int set_stamp(Entry *e, PyObject *v, void *c) {
    long long x;
    if (int_arg(v, "stamp", 0, STAMP_MAX, &x) < 0) return -1;
    if (!e->ix) { e->det->stamp = (uint64_t)x; return 0; }
    if (x == 0 && A(e) == &DF0) return 0;
    Table *t = e->ix;
    clock_advance(t, (uint64_t)x);  /* before the form: the sweep may not see this one's old stamp */
    DForm *d = A_w(e);
    if (!d) return -1;
    stamp_store(t, d, (uint64_t)x);
    A_settle(e);
    return 0;
}

static void stamp_store(Table *t, DForm *d, uint64_t x) {
    if (t->clock > AGE_CAP && x < t->clock - AGE_CAP) x = t->clock - AGE_CAP;
    d->stamp = x & STAMP_MASK;
}

/* While a native eviction policy (Lru) lives over the table, a record's seg and links
   are its lists' (their heads and counts are in the Lru): a write from Python would
   put a record in a list without linking it, or out of one still linked (the Lru's
   count and head then go wrong; its next unlink reads the wrong list). Only the Python
   Policy writes them, over its own lists: refused here unless the write changes nothing. */
static int lists_owned(Entry *e, const char *name) {
    if (!e->ix || !e->ix->lrus) return 0;
    PyErr_Format(PyExc_ValueError, "Entry.%s is kept by the index's native eviction policy "
                 "(kvstored._index.Lru: insert / remove link and unlink an entry)", name);
    return -1;
}

static PyObject *get_seg(Entry *e, void *c) { return PyLong_FromLong(R(e)->seg); }
static int set_seg(Entry *e, PyObject *v, void *c) {
    long long x;
    if (int_arg(v, "seg", -1, 2, &x) < 0) return -1;
    if (x == R(e)->seg) return 0;
    if (lists_owned(e, "seg") < 0) return -1;
    /* a listed record has a DRAM form (the lists read its links): a keyless one turns to
       it first, so a MemoryError leaves the segment as it was */
    if (x >= 0 && !A_w(e)) return -1;
    R(e)->seg = (int8_t)x;
    A_settle(e);  /* out of the lists: a keyless record's DRAM form may go now */
    return 0;
}

static int64_t entry_offset(Entry *e) { return e->ix ? rec_offset(e->ix, e->rec) : e->det->offset; }

static PyObject *get_offset(Entry *e, void *c) { return PyLong_FromLongLong(entry_offset(e)); }
static int set_offset(Entry *e, PyObject *v, void *c) {
    if (!v) { bad_set("offset"); return -1; }
    if (!PyLong_Check(v)) {
        PyErr_Format(PyExc_TypeError, "Entry.offset must be an int, not %.80s", Py_TYPE(v)->tp_name);
        return -1;
    }
    int of = 0;
    long long x = PyLong_AsLongLongAndOverflow(v, &of);
    if (x == -1 && PyErr_Occurred()) return -1;
    if (of || x < -1) {
        PyErr_SetString(PyExc_ValueError, "Entry.offset out of range [-1, 2**63)");
        return -1;
    }
    if (!e->ix) { e->det->offset = x; return 0; }
    return rec_set_offset(e->ix, e->rec, x);
}

static PyObject *get_size(Entry *e, void *c) { return PyLong_FromUnsignedLong(R(e)->size); }
static PyObject *get_checksum(Entry *e, void *c) {
    return PyLong_FromUnsignedLongLong(R(e)->checksum);
}

static PyObject *get_reads(Entry *e, void *c) { return PyLong_FromUnsignedLong(A(e)->reads); }
static int set_reads(Entry *e, PyObject *v, void *c) {
    if (!v || !PyLong_Check(v)) {
        PyErr_SetString(PyExc_TypeError, "Entry.reads must be an int");
        return -1;
    }
    int of = 0;
    long long x = PyLong_AsLongLongAndOverflow(v, &of);
    if (x == -1 && PyErr_Occurred()) return -1;
    if (of < 0 || (!of && x < 0)) {
        PyErr_SetString(PyExc_ValueError, "Entry.reads must not be negative");
        return -1;
    }
    uint32_t n = (of || x > (long long)READS_MAX) ? READS_MAX : (uint32_t)x; /* saturating */
    if (!n && A(e) == &DF0) return 0;
    DForm *a = A_w(e);
    if (!a) return -1;
    a->reads = n;
    A_settle(e);
    return 0;
}

static PyObject *get_committed_at(Entry *e, void *c) { return PyFloat_FromDouble(R(e)->committed_at); }
static int set_committed_at(Entry *e, PyObject *v, void *c) {
    if (!v) { bad_set("committed_at"); return -1; }
    double d = PyFloat_AsDouble(v);
    if (d == -1.0 && PyErr_Occurred()) return -1;
    R(e)->committed_at = d;
    return 0;
}

static PyObject *get_state(Entry *e, void *c) { return PyLong_FromLong(R(e)->flags & F_DEAD ? 2 : 1); }
static int set_state(Entry *e, PyObject *v, void *c) {
    long s = v && PyLong_Check(v) ? PyLong_AsLong(v) : 0;
    if (s != 1 && s != 2) {
        PyErr_Clear();
        PyErr_SetString(PyExc_ValueError, "Entry.state must be COMMITTED (1) or DEAD (2)");
        return -1;
    }
    if (s == 2) R(e)->flags |= F_DEAD; else R(e)->flags &= ~F_DEAD;
    return 0;
}

static PyObject *get_unverified(Entry *e, void *c) { return PyBool_FromLong(R(e)->flags & F_UNVERIFIED); }
static int set_unverified(Entry *e, PyObject *v, void *c) {
    if (!v) { bad_set("unverified"); return -1; }
    int b = PyObject_IsTrue(v);
    if (b < 0) return -1;
    Rec *r = R(e);
    if (!(r->flags & F_UNVERIFIED) == !b) return 0;  /* already so */
    r->flags ^= F_UNVERIFIED;
    /* an entry in the table: its count follows (as mark_unverified / verify), so a later
       remove never takes it below zero */
    if (e->ix && (r->flags & F_INTABLE)) {
        if (b) e->ix->unverified++;
        else e->ix->unverified--;
    }
    return 0;
}

static PyObject *get_ns(Entry *e, void *c) {
    PyObject *o = e->ix ? e->ix->spaces[R(e)->ns].name : e->det->ns;
    Py_INCREF(o);
    return o;
}
/* A keyless record's key comes from the key loader (the Store's: a read of the NVMe
   record header); it must have the record's length and fingerprint. */
static PyObject *load_key(Entry *e) {
    Table *t = e->ix;
    if (!t->key_loader)
        return PyErr_Format(PyExc_LookupError, "key of an NVMe-only entry is not in RAM (record %u; "
                            "no key loader: Index.set_key_loader)", e->rec);
    PyObject *loader = t->key_loader;
    Py_INCREF(loader);
    PyObject *k = PyObject_CallOneArg(loader, (PyObject *)e);
    Py_DECREF(loader);
    if (!k) return NULL;
    if (k == Py_None) {
        Py_DECREF(k);
        return PyErr_Format(PyExc_LookupError, "key of an NVMe-only entry is not in RAM (record %u) "
                            "and the key loader found none", e->rec);
    }
    if (!PyBytes_Check(k)) {
        PyErr_Format(PyExc_TypeError, "the key loader must return bytes or None, not %.80s",
                     Py_TYPE(k)->tp_name);
        Py_DECREF(k);
        return NULL;
    }
    Rec *r = R(e);  /* after the call: the loader may have grown the record array */
    if ((size_t)PyBytes_GET_SIZE(k) != r->key_len ||
        fp_of(t, r->ns, PyBytes_AS_STRING(k), r->key_len) != r->fp) {
        Py_DECREF(k);
        return PyErr_Format(PyExc_LookupError, "the key loader returned a key that is not record "
                            "%u's (its length or fingerprint differs)", e->rec);
    }
    return k;
}

static PyObject *get_key(Entry *e, void *c) {
    if (!e->ix) { Py_INCREF(e->det->key); return e->det->key; }
    Rec *r = R(e);
    if (r->flags & F_KEYLESS) return load_key(e);
    return PyBytes_FromStringAndSize(r->key_len ? key_ptr(e->ix, r) : "", r->key_len);
}

static PyObject *get_key_in_ram(Entry *e, void *c) {
    return PyBool_FromLong(!e->ix || !(R(e)->flags & F_KEYLESS));
}
/* the size class of a detached entry the GC cleared (Entry_clear) is gone */
static PyObject *cleared_error(void) {
    PyErr_SetString(PyExc_RuntimeError, "entry was cleared by the garbage collector (it was in "
                    "a reference cycle being freed): its size class is gone");
    return NULL;
}

static PyObject *get_sc(Entry *e, void *c) {
    PyObject *o = e->ix ? PyList_GET_ITEM(e->ix->classes, R(e)->sc) : e->det->sc;
    if (!o) return cleared_error();
    Py_INCREF(o);
    return o;
}

static PyObject *link_get(Entry *e, uint32_t l) {
    if (l == NOREC) Py_RETURN_NONE;
    return view_of(e->ix, l);
}
static int link_set(Entry *e, PyObject *v, int older, const char *name) {
    if (!v) { bad_set(name); return -1; }
    uint32_t l = NOREC;
    if (v != Py_None) {
        if (!PyObject_TypeCheck(v, &EntryType) || !e->ix || ((Entry *)v)->ix != e->ix) {
            PyErr_Format(PyExc_TypeError, "Entry.%s must be None or an entry of the same index "
                         "(link entries only after Index.insert)", name);
            return -1;
        }
        l = ((Entry *)v)->rec;
    }
    if (l == (older ? A(e)->older : A(e)->newer)) return 0;
    if (lists_owned(e, name) < 0) return -1;
    DForm *a = A_w(e);
    if (!a) return -1;
    if (older) a->older = l; else a->newer = l;
    A_settle(e);
    return 0;
}
static PyObject *get_newer(Entry *e, void *c) { return link_get(e, A(e)->newer); }
static PyObject *get_older(Entry *e, void *c) { return link_get(e, A(e)->older); }
static int set_newer(Entry *e, PyObject *v, void *c) { return link_set(e, v, 0, "newer"); }
static int set_older(Entry *e, PyObject *v, void *c) { return link_set(e, v, 1, "older"); }

/* NVMe location: packed when it is (region < 0xFFFF, 4 KiB aligned offset, the entry's
   length and checksum, a 32-bit generation), else kept whole in a side dict. */
static PyObject *get_nvme(Entry *e, void *c) {
    if (!e->ix) {
        PyObject *o = e->det->nvme ? e->det->nvme : Py_None;
        Py_INCREF(o);
        return o;
    }
    Table *t = e->ix;
    Rec *r = R(e);
    if (!(r->flags & F_NVME)) Py_RETURN_NONE;
    if (r->flags & F_NVSIDE) {
        PyObject *k = PyLong_FromUnsignedLong(e->rec);
        if (!k) return NULL;
        PyObject *o = PyDict_GetItemWithError(t->nvside, k);
        Py_DECREF(k);
        if (!o) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_RuntimeError, "NVMe location lost");
            return NULL;
        }
        Py_INCREF(o);
        return o;
    }
    uint32_t blk, gen;
    uint16_t region;
    nv_get(t, e->rec, &blk, &gen, &region);
    unsigned long long reg = region, off = (unsigned long long)blk * NVME_BLOCK;
    if (t->nv_region) {
        reg = blk;
        off = (unsigned long long)t->nv_start + reg * (unsigned long long)t->nv_region +
              (unsigned long long)region * NVME_BLOCK;
    }
    return PyObject_CallFunction(t->loctype, "KKkKk", reg, off,
                                 (unsigned long)r->size, (unsigned long long)r->checksum,
                                 (unsigned long)gen);
}

/* the Location attribute names nvme_store reads, made once (a str built per read cost
   more than the rest of a demotion's index update) */
static PyObject *loc_names[5];

static int attr_ull(PyObject *o, int which, unsigned long long *out) {
    static const char *const names[5] = {"region", "offset", "length", "checksum", "generation"};
    if (!loc_names[which] && !(loc_names[which] = PyUnicode_InternFromString(names[which])))
        return -1;
    PyObject *v = PyObject_GetAttr(o, loc_names[which]);
    if (!v) return -1;
    if (!PyLong_Check(v)) { Py_DECREF(v); *out = ~0ULL; return 0; }
    *out = PyLong_AsUnsignedLongLong(v);
    Py_DECREF(v);
    if (PyErr_Occurred()) { PyErr_Clear(); *out = ~0ULL; }
    return 0;
}

/* 0, or -1 with an exception and the entry's location as it was: the new location is
   stored (the aside table's entry, the side dict's) before the old one goes, so a
   MemoryError never leaves an object on NVMe that the index cannot find. */
static int nvme_store(Table *t, uint32_t rec, PyObject *v) {
    unsigned long long reg = 0, off = 0, len = 0, cs = 0, gen = 0;
    /* the attributes first: getattr may run Python code (which may grow the record
       array), so no pointer into it is held across them */
    if (v != Py_None &&
        (attr_ull(v, 0, &reg) < 0 || attr_ull(v, 1, &off) < 0 ||
         attr_ull(v, 2, &len) < 0 || attr_ull(v, 3, &cs) < 0 ||
         attr_ull(v, 4, &gen) < 0)) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "Entry.nvme must be None or a Location, not %.80s",
                     Py_TYPE(v)->tp_name);
        return -1;
    }
    Rec *r = &t->recs[rec];
    /* the old side dict Location is held until the record is consistent: its release
       may run Python (a __del__) */
    PyObject *old = NULL;
    if (r->flags & F_NVSIDE) {
        PyObject *k = PyLong_FromUnsignedLong(rec);
        old = k ? PyDict_GetItemWithError(t->nvside, k) : NULL;
        Py_XDECREF(k);
        if (!old && PyErr_Occurred()) return -1;
        Py_XINCREF(old);
    }
    int packed = 0;
    uint32_t pblk = 0, pgen = 0;
    uint16_t preg = 0;
    if (v != Py_None && t->loctype != Py_None && Py_IS_TYPE(v, (PyTypeObject *)t->loctype) &&
        off % NVME_BLOCK == 0 && len == r->size && cs == r->checksum && gen <= 0xFFFFFFFFULL) {
        if (t->nv_region) {
            /* the device's geometry is known: (region: 32 bits, block in it: 16 bits), so a
               drive of any size packs (before it, past 65535 regions or 16 TiB did not) */
            unsigned long long base = (unsigned long long)t->nv_start + reg * (unsigned long long)t->nv_region;
            if (reg < 0xFFFFFFFFULL && reg <= (~0ULL - (unsigned long long)t->nv_start) / (unsigned long long)t->nv_region &&
                off >= base && off - base < (unsigned long long)t->nv_region) {
                packed = 1;
                pblk = (uint32_t)reg; pgen = (uint32_t)gen; preg = (uint16_t)((off - base) / NVME_BLOCK);
            }
        } else if (reg < 0xFFFF && off / NVME_BLOCK < 0xFFFFFFFFULL) {
            packed = 1;
            pblk = (uint32_t)(off / NVME_BLOCK); pgen = (uint32_t)gen; preg = (uint16_t)reg;
        }
    }
    if (packed) {
        /* inline, or the aside table's entry (the old one's, else a new one) */
        if (nv_set(t, rec, pblk, pgen, preg) < 0) { Py_XDECREF(old); return -1; }
        if (old) dict_pop_rec(t->nvside, rec);  /* held: not released here */
        t->recs[rec].flags = (t->recs[rec].flags & ~F_NVSIDE) | F_NVME;
    } else if (v != Py_None) {
        if (side_dict_set(t->nvside, rec, v) < 0) { Py_XDECREF(old); return -1; }
        nv_clear(t, rec);
        t->recs[rec].flags |= F_NVME | F_NVSIDE;
    } else {
        if (old) dict_pop_rec(t->nvside, rec);
        nv_clear(t, rec);
        t->recs[rec].flags &= ~(F_NVME | F_NVSIDE);
    }
    Py_XDECREF(old);
    return 0;
}

static int set_nvme(Entry *e, PyObject *v, void *c) {
    if (!v) { bad_set("nvme"); return -1; }
    if (!e->ix) {
        PyObject *old = e->det->nvme;
        e->det->nvme = NULL;
        if (v != Py_None) { Py_INCREF(v); e->det->nvme = v; }
        Py_XDECREF(old);
        return 0;
    }
    return nvme_store(e->ix, e->rec, v);
}

/* --- pins: a side dict keyed by record number, for the few pinned entries */

static PyObject *pin_rec(Entry *e) {  /* borrowed [pins, until] or NULL (no error) */
    if (!e->ix || !(R(e)->flags & F_PIN)) return NULL;
    PyObject *k = PyLong_FromUnsignedLong(e->rec);
    if (!k) { PyErr_Clear(); return NULL; }
    PyObject *v = PyDict_GetItemWithError(e->ix->pins, k);
    Py_DECREF(k);
    if (!v) PyErr_Clear();
    return v;
}

static PyObject *get_pins(Entry *e, void *c) {
    if (!e->ix) return PyLong_FromLong(e->det->pins);
    PyObject *p = pin_rec(e);
    if (!p) return PyLong_FromLong(0);
    PyObject *o = PyList_GET_ITEM(p, 0);
    Py_INCREF(o);
    return o;
}
static PyObject *get_pin_until(Entry *e, void *c) {
    if (!e->ix) return PyFloat_FromDouble(e->det->pin_until);
    PyObject *p = pin_rec(e);
    if (!p) return PyFloat_FromDouble(0.0);
    PyObject *o = PyList_GET_ITEM(p, 1);
    Py_INCREF(o);
    return o;
}

static int set_pin(Entry *e, int i, PyObject *v) {
    if (!v) { bad_set(i ? "pin_until" : "pins"); return -1; }
    if (i == 0 && !PyLong_Check(v)) { PyErr_SetString(PyExc_TypeError, "Entry.pins must be an int"); return -1; }
    if (i == 1 && !PyFloat_Check(v) && !PyLong_Check(v)) {
        PyErr_SetString(PyExc_TypeError, "Entry.pin_until must be a number");
        return -1;
    }
    int truth = PyObject_IsTrue(v);
    if (truth < 0) return -1;
    if (!e->ix) {
        if (i == 0) {
            long n = PyLong_AsLong(v);
            if (n == -1 && PyErr_Occurred()) return -1;
            e->det->pins = n;
        } else {
            e->det->pin_until = PyFloat_AsDouble(v);
        }
        return 0;
    }
    Table *t = e->ix;
    PyObject *p = pin_rec(e);
    if (!p) {
        if (!truth) return 0;
        p = Py_BuildValue("[if]", 0, 0.0);
        if (!p) return -1;
        PyObject *k = PyLong_FromUnsignedLong(e->rec);
        if (!k || PyDict_SetItem(t->pins, k, p) < 0) { Py_XDECREF(k); Py_DECREF(p); return -1; }
        Py_DECREF(k);
        R(e)->flags |= F_PIN;
    } else {
        Py_INCREF(p);
    }
    /* an int subclass's __bool__ runs Python code, which may drop the pin record or grow
       the record array: p is held, and no record pointer is kept across the tests */
    Py_INCREF(v);
    PyList_SetItem(p, i, v);
    int on = PyObject_IsTrue(PyList_GET_ITEM(p, 0));
    if (on == 0) on = PyObject_IsTrue(PyList_GET_ITEM(p, 1));
    if (on == 0) {
        dict_pop_rec(t->pins, e->rec);
        R(e)->flags &= ~F_PIN;
    }
    Py_DECREF(p);
    return on < 0 ? -1 : 0;
}
static int set_pins(Entry *e, PyObject *v, void *c) { return set_pin(e, 0, v); }
static int set_pin_until(Entry *e, PyObject *v, void *c) { return set_pin(e, 1, v); }

static PyObject *Entry_pinned(Entry *e, PyObject *now) {
    double t = PyFloat_AsDouble(now);
    if (t == -1.0 && PyErr_Occurred()) return NULL;
    long pins;
    double until;
    if (!e->ix) {
        pins = e->det->pins;
        until = e->det->pin_until;
    } else {
        PyObject *p = pin_rec(e);
        if (!p) Py_RETURN_FALSE;
        pins = PyLong_AsLong(PyList_GET_ITEM(p, 0));
        until = PyFloat_AsDouble(PyList_GET_ITEM(p, 1));
        if (PyErr_Occurred()) return NULL;
    }
    return PyBool_FromLong(pins > 0 && until > t);
}

static PyObject *Entry_forget_pin(Entry *e, PyObject *unused) {
    if (!e->ix) {
        e->det->pins = 0;
        e->det->pin_until = 0.0;
    } else if (R(e)->flags & F_PIN) {
        dict_pop_rec(e->ix->pins, e->rec);
        R(e)->flags &= ~F_PIN;
    }
    Py_RETURN_NONE;
}

static PyObject *Entry_record(Entry *e, void *c) {
    if (!e->ix) Py_RETURN_NONE;
    return PyLong_FromUnsignedLong(e->rec);
}

static PyObject *Entry_repr(Entry *e) {
    /* a keyless entry's repr does not read the NVMe header */
    PyObject *ns = get_ns(e, NULL), *key = e->ix && (R(e)->flags & F_KEYLESS)
        ? PyUnicode_FromFormat("<key not in RAM, fp %llu>", (unsigned long long)R(e)->fp)
        : get_key(e, NULL);
    PyObject *s = NULL;
    if (ns && key)
        s = PyUnicode_FromFormat("<Entry %R %R size=%u offset=%lld%s>", ns, key, R(e)->size,
                                 (long long)entry_offset(e), e->ix ? "" : " detached");
    Py_XDECREF(ns); Py_XDECREF(key);
    return s;
}

static PyGetSetDef Entry_getset[] = {
    {"ns", (getter)get_ns, NULL, "namespace (the index's shared bytes object)", NULL},
    {"key", (getter)get_key, NULL, "key bytes (a new bytes object per read; keyless: the key loader's)", NULL},
    {"key_in_ram", (getter)get_key_in_ram, NULL, "False while the key is only on NVMe (shed_key)", NULL},
    {"sc", (getter)get_sc, NULL, "size class", NULL},
    {"offset", (getter)get_offset, (setter)set_offset, "DRAM offset, -1 when on NVMe only", NULL},
    {"size", (getter)get_size, NULL, "object size", NULL},
    {"checksum", (getter)get_checksum, NULL, "payload checksum", NULL},
    {"state", (getter)get_state, (setter)set_state, "COMMITTED (1) or DEAD (2)", NULL},
    {"refs", (getter)get_refs, (setter)set_refs, "reader references", NULL},
    {"seg", (getter)get_seg, (setter)set_seg, "eviction list (-1: none)", NULL},
    {"stamp", (getter)get_stamp, (setter)set_stamp, "eviction clock of the last access", NULL},
    {"newer", (getter)get_newer, (setter)set_newer, "eviction link", NULL},
    {"older", (getter)get_older, (setter)set_older, "eviction link", NULL},
    {"committed_at", (getter)get_committed_at, (setter)set_committed_at, "time.time() of commit", NULL},
    {"nvme", (getter)get_nvme, (setter)set_nvme, "Location of the NVMe copy, or None", NULL},
    {"reads", (getter)get_reads, (setter)set_reads, "gets served (saturating at 15)", NULL},
    {"unverified", (getter)get_unverified, (setter)set_unverified, "held back until verified", NULL},
    {"pins", (getter)get_pins, (setter)set_pins, "pin count (side table)", NULL},
    {"pin_until", (getter)get_pin_until, (setter)set_pin_until, "pin lease end (side table)", NULL},
    {"record", (getter)Entry_record, NULL, "record number, None while detached", NULL},
    {NULL}
};

static PyMethodDef Entry_methods[] = {
    {"pinned", (PyCFunction)Entry_pinned, METH_O, "pinned(now): a pin lease is live"},
    {"forget_pin", (PyCFunction)Entry_forget_pin, METH_NOARGS, "drop the pin record"},
    {NULL}
};

static PyTypeObject EntryType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kvstored._index.Entry",
    .tp_doc = "One object of the packed index: a view of its record (detached until inserted).",
    .tp_basicsize = sizeof(Entry),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = Entry_new,
    .tp_dealloc = (destructor)Entry_dealloc,
    .tp_traverse = (traverseproc)Entry_traverse,
    .tp_clear = (inquiry)Entry_clear,
    .tp_getset = Entry_getset,
    .tp_methods = Entry_methods,
    .tp_repr = (reprfunc)Entry_repr,
};

/* ------------------------------------------------------------------- Table */

static int Table_init(Table *t, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"slab_size", "location_type", NULL};
    long long slab;
    PyObject *loctype = Py_None;
    if (t->ready) {
        PyErr_SetString(PyExc_RuntimeError, "Table.__init__ called twice");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kw, "L|O:Table", kwlist, &slab, &loctype)) return -1;
    if (slab <= 0) {
        PyErr_Format(PyExc_ValueError, "slab_size must be positive, not %lld", slab);
        return -1;
    }
    if (loctype != Py_None && !PyType_Check(loctype)) {
        PyErr_SetString(PyExc_TypeError, "location_type must be a type or None");
        return -1;
    }
    t->slab_size = slab;
    t->freehead = NOREC;
    t->fp_mask = ~0ULL;
    for (size_t i = 0; i < sizeof t->pools / sizeof t->pools[0]; i++) t->pools[i].free = NOREC;
    if (getrandom(&t->seed, sizeof t->seed, GRND_NONBLOCK) != sizeof t->seed)
        t->seed = (uint64_t)(uintptr_t)t ^ 0x243F6A8885A308D3ULL;  /* no entropy yet: still per table */
    t->freespaces = PyMem_RawMalloc((MAX_SPACES + 1) * sizeof(uint32_t));
    t->space_ids = PyDict_New();
    t->classes = PyList_New(0);
    t->pins = PyDict_New();
    t->nvside = PyDict_New();
    t->wide = PyDict_New();
    if (!t->freespaces || !t->space_ids || !t->classes || !t->pins || !t->nvside || !t->wide) {
        PyErr_NoMemory();
        return -1;
    }
    Py_INCREF(loctype);
    t->loctype = loctype;
    t->ready = 1;
    return 0;
}

static int Table_traverse(Table *t, visitproc visit, void *arg) {
    Py_VISIT(t->key_loader);  /* a bound method of the Store's: a cycle */
    return 0;
}

static int Table_clear(Table *t) {
    Py_CLEAR(t->key_loader);
    return 0;
}

static void Table_dealloc(Table *t) {
    /* views hold a reference to the table: none is left here */
    PyObject_GC_UnTrack(t);
    Py_CLEAR(t->key_loader);
    if (t->karena.obj) PyBuffer_Release(&t->karena);
    PyMem_RawFree(t->recs);
    PyMem_RawFree(t->slots);
    PyMem_RawFree(t->views);
    for (size_t i = 0; i < sizeof t->pools / sizeof t->pools[0]; i++) PyMem_RawFree(t->pools[i].buf);
    PyMem_RawFree(t->refs.e);
    PyMem_RawFree(t->aside.e);
    for (uint32_t i = 0; i < t->nspaces; i++) Py_XDECREF(t->spaces[i].name);
    PyMem_RawFree(t->spaces);
    PyMem_RawFree(t->freespaces);
    for (uint64_t i = 0; i < t->nrows; i++) PyMem_RawFree(t->rows[i].recs);
    PyMem_RawFree(t->rows);
    Py_XDECREF(t->space_ids);
    Py_XDECREF(t->classes);
    Py_XDECREF(t->pins);
    Py_XDECREF(t->nvside);
    Py_XDECREF(t->wide);
    Py_XDECREF(t->loctype);
    Py_TYPE(t)->tp_free((PyObject *)t);
}

#define READY(t, ret)                                                              \
    if (!(t)->ready) {                                                              \
        PyErr_SetString(PyExc_RuntimeError, "Table.__init__ was not called");       \
        return ret;                                                                 \
    }

static int entry_arg(PyObject *o, Entry **e) {
    if (!PyObject_TypeCheck(o, &EntryType)) {
        PyErr_Format(PyExc_TypeError, "expected a kvstored._index.Entry, not %.80s",
                     Py_TYPE(o)->tp_name);
        return -1;
    }
    *e = (Entry *)o;
    return 0;
}

/* The record of (ns, key) in args (get and get_read): 1 and *rec when found, 0 when not,
   -1 with an exception (args not two bytes: the TypeError names ``call``). */
static int lookup_args(Table *t, PyObject *const *args, Py_ssize_t n, const char *call,
                       uint32_t *rec) {
    if (n != 2 || !PyBytes_Check(args[0]) || !PyBytes_Check(args[1])) {
        PyErr_Format(PyExc_TypeError, "%s(ns: bytes, key: bytes)", call);
        return -1;
    }
    Py_ssize_t kl = PyBytes_GET_SIZE(args[1]);
    if (kl > MAX_KEY) return 0;
    int ns = space_id(t, args[0], 0);
    if (ns < 0) return PyErr_Occurred() ? -1 : 0;
    const char *k = PyBytes_AS_STRING(args[1]);
    int64_t i = find(t, (uint16_t)ns, k, (size_t)kl, fp_of(t, (uint16_t)ns, k, (size_t)kl));
    if (i < 0) return 0;
    *rec = t->slots[i] - 1;
    return 1;
}

static PyObject *Table_get(Table *t, PyObject *const *args, Py_ssize_t n) {
    READY(t, NULL);
    uint32_t rec;
    int got = lookup_args(t, args, n, "get", &rec);
    if (got < 0) return NULL;
    if (!got) Py_RETURN_NONE;
    return view_of(t, rec);
}

/* Record of (namespace id ns, key), -1 when absent, -2 with a TypeError (key not bytes). */
static int64_t rec_of_key(Table *t, int ns, PyObject *key) {
    if (!PyBytes_Check(key)) {
        PyErr_Format(PyExc_TypeError, "keys are bytes, not %.80s", Py_TYPE(key)->tp_name);
        return -2;
    }
    Py_ssize_t kl = PyBytes_GET_SIZE(key);
    if (kl > MAX_KEY || ns < 0) return -1;
    const char *k = PyBytes_AS_STRING(key);
    int64_t i = find(t, (uint16_t)ns, k, (size_t)kl, fp_of(t, (uint16_t)ns, k, (size_t)kl));
    return i < 0 ? -1 : (int64_t)(t->slots[i] - 1);
}

/* The namespace id of a batch call's ns (-1: none holds objects), -2 with an error. */
static int batch_ns(Table *t, PyObject *const *args, Py_ssize_t n, const char *what) {
    if (n != 2 || !PyBytes_Check(args[0])) {
        PyErr_Format(PyExc_TypeError, "%s(ns: bytes, keys: list)", what);
        return -2;
    }
    int ns = space_id(t, args[0], 0);
    return ns < 0 && PyErr_Occurred() ? -2 : ns;
}

/* present(ns, keys) -> [bool]: each key stored and not held back (unverified), as
   ``get(ns, k)`` and ``not e.unverified`` would say, without building a view (Store's
   exists; the dict index has the same in Python). */
static PyObject *Table_present(Table *t, PyObject *const *args, Py_ssize_t n) {
    READY(t, NULL);
    int ns = batch_ns(t, args, n, "present");
    if (ns == -2) return NULL;
    PyObject *seq = PySequence_Fast(args[1], "present(ns, keys): keys must be a sequence");
    if (!seq) return NULL;
    Py_ssize_t m = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq), *out = PyList_New(m);
    for (Py_ssize_t i = 0; out && i < m; i++) {
        int64_t rec = rec_of_key(t, ns, items[i]);
        if (rec == -2) { Py_CLEAR(out); break; }
        PyObject *b = rec >= 0 && !(t->recs[rec].flags & F_UNVERIFIED) ? Py_True : Py_False;
        Py_INCREF(b);
        PyList_SET_ITEM(out, i, b);
    }
    Py_DECREF(seq);
    return out;
}

/* prefix(ns, keys) -> (count, bytes): how many leading keys are present (as ``present``
   says) and their objects' bytes (Store's lookup). */
static PyObject *Table_prefix(Table *t, PyObject *const *args, Py_ssize_t n) {
    READY(t, NULL);
    int ns = batch_ns(t, args, n, "prefix");
    if (ns == -2) return NULL;
    PyObject *seq = PySequence_Fast(args[1], "prefix(ns, keys): keys must be a sequence");
    if (!seq) return NULL;
    Py_ssize_t m = PySequence_Fast_GET_SIZE(seq), i = 0;
    PyObject **items = PySequence_Fast_ITEMS(seq);
    unsigned long long bytes = 0;
    for (; i < m; i++) {
        int64_t rec = rec_of_key(t, ns, items[i]);
        if (rec == -2) { Py_DECREF(seq); return NULL; }
        if (rec < 0 || (t->recs[rec].flags & F_UNVERIFIED)) break;
        bytes += t->recs[rec].size;
    }
    Py_DECREF(seq);
    return Py_BuildValue("(nK)", i, bytes);
}

static void space_drop_if_unused(Table *t, int ns) {
    if (!t->spaces[ns].nrec) { t->spaces[ns].nrec = 1; space_release(t, (uint16_t)ns); }
}

/* The record goes into the table and the aggregates. */
static void table_enter(Table *t, uint32_t rec) {
    slot_put(t, rec);
    Rec *r = &t->recs[rec];
    r->flags |= F_INTABLE;
    Space *s = &t->spaces[r->ns];
    s->objects++; s->bytes += r->size;
    t->count++; t->object_bytes += r->size;
    if (r->flags & F_UNVERIFIED) t->unverified++;
}

/* A new record from fields, put in the table; ``view`` (may be NULL) is attached to it.
   ``keyless``: the key is fingerprinted, not kept (offset must be -1, nvme a Location).
   Returns the record number, or -1 with an exception and nothing changed. */
static int64_t insert_new(Table *t, PyObject *nsobj, PyObject *keyobj, const Rec *src,
                          const DForm *srcd, uint32_t refs, uint64_t stamp, int64_t offset,
                          PyObject *scobj, PyObject *nvme, long pins, double pin_until,
                          Entry *view, int keyless) {
    /* the size class first: its slot_size is read by getattr, which may run Python code
       and a garbage collection that frees the last record of the namespace looked up
       below (its id would be recycled under this record) */
    int sc = class_id(t, scobj);
    if (sc < 0) return -1;
    int ns = space_id(t, nsobj, 1);
    if (ns < 0) return -1;
    const char *k = PyBytes_AS_STRING(keyobj);
    size_t kl = (size_t)PyBytes_GET_SIZE(keyobj);
    uint64_t fp = fp_of(t, (uint16_t)ns, k, kl);
    int64_t dup = find(t, (uint16_t)ns, k, kl, fp);
    uint32_t twin = NOREC;  /* the keyless record this one may sit beside */
    if (dup >= 0 && keyless && (t->recs[t->slots[dup] - 1].flags & F_KEYLESS)) {
        /* a keyless record of equal fingerprint (recovery adds each key once: another
           key): this one keeps its key, so both are found as themselves */
        twin = t->slots[dup] - 1;
        keyless = 0;
        dup = -1;
    }
    if (dup >= 0) {
        /* read before the tuple's allocation, which may run Python that moves the slots */
        int dup_keyless = (t->recs[t->slots[dup] - 1].flags & F_KEYLESS) != 0;
        PyObject *key = PyTuple_Pack(2, nsobj, keyobj);
        if (key)
            PyErr_Format(PyExc_KeyError, "index already holds %R%s; remove the old entry first", key,
                         dup_keyless ? " (a keyless record of its fingerprint: maybe this key)" : "");
        Py_XDECREF(key);
        space_drop_if_unused(t, ns);
        return -1;
    }
    int64_t rec = -1, ch = -1;
    if ((table_full(t) && table_grow(t) < 0) ||
        (!keyless && (ch = chunk_alloc(t, key_class(kl))) < 0) || (rec = rec_alloc(t)) < 0) {
        if (ch >= 0) chunk_free(t, key_class(kl), (uint32_t)ch);
        space_drop_if_unused(t, ns);
        return -1;
    }
    Rec *r = &t->recs[rec];
    *r = *src;
    r->fp = fp;
    r->key_len = (uint8_t)kl;
    r->ns = (uint16_t)ns;
    r->sc = (uint8_t)sc;
    r->flags = (src->flags & (F_DEAD | F_UNVERIFIED)) | F_USED;
    r->seg = -1;  /* in no list: the policy links it after insert, as its links (below) */
    NForm n0 = {NOREC, 0, 0, 0};
    r->u.n = n0;
    if (keyless) {
        r->flags |= F_KEYLESS;
        t->nkeyless++;
    } else {
        r->u.n.part = (uint32_t)ch;
        DForm *d = df_ptr(t, r);
        *d = *srcd;
        d->off = OFF_NONE;
        d->newer = d->older = NOREC;  /* links are made after insert */
        d->stamp = 0;
        if (kl) memcpy((char *)d + sizeof(DForm), k, kl);
        if (stamp) {
            clock_advance(t, stamp);
            stamp_store(t, df_ptr(t, &t->recs[rec]), stamp);
        }
    }
    t->spaces[ns].nrec++;
    /* from here a failure frees the record (rec_free: key, namespace, side tables) */
    if (refs_set(t, (uint32_t)rec, refs) < 0 || rec_set_offset(t, (uint32_t)rec, offset) < 0 ||
        (nvme && nvme != Py_None && nvme_store(t, (uint32_t)rec, nvme) < 0)) {
        rec_free(t, (uint32_t)rec);
        return -1;
    }
    if (keyless && !(t->recs[rec].flags & F_NVME)) {
        PyErr_SetString(PyExc_ValueError, "a keyless record needs its NVMe location (nvme=)");
        rec_free(t, (uint32_t)rec);
        return -1;
    }
    if (pins || pin_until) {
        PyObject *p = Py_BuildValue("[ld]", pins, pin_until);
        PyObject *kk = PyLong_FromLongLong(rec);
        int ok = p && kk && PyDict_SetItem(t->pins, kk, p) == 0;
        Py_XDECREF(p); Py_XDECREF(kk);
        if (!ok) { rec_free(t, (uint32_t)rec); return -1; }
        t->recs[rec].flags |= F_PIN;
    }
    /* Python run since the check above (a Location's getattr, a collection run by the pin
       record's allocation) may have indexed this key: two records would hold it */
    int64_t again = find(t, (uint16_t)ns, k, kl, fp);
    if (again >= 0 && t->slots[again] - 1 != twin) {
        PyErr_SetString(PyExc_KeyError, "index already holds this key (indexed by Python code "
                        "that this insert ran); remove the old entry first");
        rec_free(t, (uint32_t)rec);
        return -1;
    }
    if (view) {
        if (view_put(t, (uint32_t)rec, view) < 0) { rec_free(t, (uint32_t)rec); return -1; }
        Py_INCREF(t);
        view->ix = t;
        view->rec = (uint32_t)rec;
    }
    table_enter(t, (uint32_t)rec);
    return rec;
}

static PyObject *Table_insert(Table *t, PyObject *o) {
    READY(t, NULL);
    Entry *e;
    if (entry_arg(o, &e) < 0) return NULL;
    if (e->ix && e->ix != t) {
        PyErr_SetString(PyExc_ValueError, "entry belongs to another index");
        return NULL;
    }
    if (e->ix) {  /* re-insert of a removed entry */
        Rec *r = R(e);
        if (r->flags & F_INTABLE) {
            PyErr_SetString(PyExc_KeyError, "index already holds this entry");
            return NULL;
        }
        const char *k = r->flags & F_KEYLESS ? NULL : key_ptr(t, r);
        if (find(t, r->ns, k, r->key_len, r->fp) >= 0) {
            PyErr_SetString(PyExc_KeyError, "index already holds this key; remove the old entry first");
            return NULL;
        }
        if (table_full(t) && table_grow(t) < 0) return NULL;
        table_enter(t, e->rec);
        Py_RETURN_NONE;
    }
    if (!e->det->sc) return cleared_error();
    if (e->inserting) {
        PyErr_SetString(PyExc_RuntimeError, "entry is already being inserted (insert called "
                        "again from Python code that inserting it ran)");
        return NULL;
    }
    /* insert_new runs Python (the size class's getattr, finalizers run by a collection)
       that may set this entry's fields or insert it elsewhere: it reads a copy holding its
       own references, and the entry is marked so that a second insert is refused (it would
       free the detached part under this one and attach the entry twice) */
    Detached c = *e->det;
    Py_INCREF(c.ns); Py_INCREF(c.key); Py_INCREF(c.sc); Py_XINCREF(c.nvme);
    e->inserting = 1;
    int64_t rec = insert_new(t, c.ns, c.key, &c.r, &c.d, c.refs, c.stamp, c.offset, c.sc, c.nvme,
                             c.pins, c.pin_until, e, 0);
    e->inserting = 0;
    if (rec >= 0) det_free(e);  /* the view reads the record now */
    Py_DECREF(c.ns); Py_DECREF(c.key); Py_DECREF(c.sc); Py_XDECREF(c.nvme);
    if (rec < 0) return NULL;
    Py_RETURN_NONE;
}

/* add(ns, key, offset, size, checksum, sc, committed_at, nvme=None, unverified=False,
   keyless=False): index an object without building a Python object for it (recovery at
   start); keyless: an NVMe-only object whose key stays on NVMe. */
static PyObject *Table_add(Table *t, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"ns", "key", "offset", "size", "checksum", "sc", "committed_at",
                             "nvme", "unverified", "keyless", NULL};
    READY(t, NULL);
    PyObject *ns, *key, *sc, *csum, *sizeobj, *nvme = Py_None;
    long long offset;
    uint32_t size;
    double committed_at;
    int unverified = 0, keyless = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "SSLOOOd|Opp:add", kwlist, &ns, &key, &offset,
                                     &sizeobj, &csum, &sc, &committed_at, &nvme, &unverified,
                                     &keyless))
        return NULL;
    Rec src;
    memset(&src, 0, sizeof src);
    unsigned long long cs;
    if (fields_check(key, sizeobj, &size, csum, &cs) < 0 || offset_check(offset) < 0) return NULL;
    if (keyless && (offset != -1 || nvme == Py_None)) {
        PyErr_SetString(PyExc_ValueError, "add(keyless=True) is for NVMe-only objects: offset -1 "
                        "and an NVMe location (nvme=)");
        return NULL;
    }
    src.checksum = cs;
    src.size = size;
    src.committed_at = committed_at;
    src.seg = -1;
    src.flags = unverified ? F_UNVERIFIED : 0;
    if (insert_new(t, ns, key, &src, &DF0, 0, 0, offset, sc, nvme, 0, 0.0, NULL, keyless) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Table_remove(Table *t, PyObject *o) {
    READY(t, NULL);
    Entry *e;
    if (entry_arg(o, &e) < 0) return NULL;
    if (check_attached(e, t) < 0) return NULL;
    Rec *r = R(e);
    if (!(r->flags & F_INTABLE)) {
        PyErr_SetString(PyExc_KeyError, "entry is not in the index (removed already)");
        return NULL;
    }
    int64_t i = find_rec(t, e->rec);
    if (i < 0) {
        PyErr_SetString(PyExc_RuntimeError, "packed index inconsistent: entry not at its fingerprint");
        return NULL;
    }
    slot_del(t, (uint64_t)i);
    r->flags &= ~F_INTABLE;
    Space *s = &t->spaces[r->ns];
    s->objects--;
    s->bytes -= r->size;
    if (!s->objects) s->bytes = 0;
    t->count--;
    t->object_bytes -= r->size;
    if (r->flags & F_UNVERIFIED) {
        r->flags &= ~F_UNVERIFIED;
        t->unverified--;
    }
    if (r->flags & F_PIN) {
        /* the flag first: the pin record's release may run Python (an int subclass's
           __del__) that grows the record array under r */
        r->flags &= ~F_PIN;
        dict_pop_rec(t->pins, e->rec);
    }
    /* the record lives on while its view does (freed by the view's dealloc) */
    Py_RETURN_NONE;
}

/* shed_key(entry, dram=False): an inserted entry's key leaves RAM. Lookups match it by
   namespace, length and fingerprint from then on; Entry.key asks the key loader. It keeps
   its key when a keyless record of equal namespace, length and fingerprint exists (the
   two could not be told apart): key_in_ram says which.
   dram=False: an NVMe-only entry (offset -1, nvme set, in no eviction list): its DRAM
   part goes, with its read count and eviction stamp (readers and links, if any, stay in
   a bare part); the key is on the NVMe record header.
   dram=True: also an entry with a DRAM copy and/or in an eviction list (its key is kept
   beside the copy: the arena's key area, read back by the key loader); every field of
   its DRAM part stays (offset, readers, links, stamp, read count). It needs a DRAM copy
   or an NVMe location (else the key would be nowhere). */
/* A vectorcall of (obj, flag=False): the flag's truth (0 when not given), or -1 with a
   TypeError naming ``usage`` (no obj, too many arguments, another keyword). */
static int flag_arg(PyObject *const *args, Py_ssize_t n, PyObject *kwnames, const char *kw,
                    const char *usage) {
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    if (n < 1 || n + nkw > 2 ||
        (nkw && PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0), kw) != 0)) {
        PyErr_SetString(PyExc_TypeError, usage);
        return -1;
    }
    return n + nkw == 2 ? PyObject_IsTrue(args[1]) : 0;
}

static int shed_rec(Table *t, uint32_t rec, int dram);

static PyObject *Table_shed_key(Table *t, PyObject *const *args, Py_ssize_t n, PyObject *kwnames) {
    READY(t, NULL);
    int dram = flag_arg(args, n, kwnames, "dram", "shed_key(entry, dram=False)");
    if (dram < 0) return NULL;
    Entry *e;
    if (entry_arg(args[0], &e) < 0) return NULL;
    if (e->ix != t || !(R(e)->flags & F_INTABLE)) {
        PyErr_SetString(PyExc_ValueError, e->ix && e->ix != t ? "shed_key: entry belongs to another index"
                        : "shed_key: the entry is not in the index (never inserted, or removed)");
        return NULL;
    }
    if (shed_rec(t, e->rec, dram) < 0) return NULL;
    Py_RETURN_NONE;
}

/* shed_key of record rec (in this table): 0, or -1 with a ValueError / MemoryError and
   nothing changed */
static int shed_rec(Table *t, uint32_t rec, int dram) {
    int64_t off = rec_offset(t, rec);
    if (t->recs[rec].flags & F_KEYLESS) {
        /* already keyless (shed with dram=True while it had a copy): on NVMe only and out
           of the lists now (drop_copy's call), its stamp and read count go as above, and
           with them its part */
        DForm *d = df_ptr(t, &t->recs[rec]);
        if (!dram && off < 0 && t->recs[rec].seg < 0 && d) {
            d->stamp = 0;
            d->reads = 0;
            df_settle(t, rec);
        }
        return 0;
    }
    if (off >= 0 && !dram) {
        PyErr_Format(PyExc_ValueError, "shed_key: the entry has a DRAM copy (offset %lld); only "
                     "an NVMe-only entry (offset -1) sheds its key, or dram=True", (long long)off);
        return -1;
    }
    if (off < 0 && !(t->recs[rec].flags & F_NVME)) {
        PyErr_SetString(PyExc_ValueError, "shed_key: the entry has no NVMe location (nvme is "
                        "None) and no DRAM copy: its key would be nowhere");
        return -1;
    }
    if (t->recs[rec].seg >= 0 && !dram) {  /* its links are in the DRAM part that would go */
        PyErr_Format(PyExc_ValueError, "shed_key: the entry is in an eviction list (seg %d); "
                     "the policy removes it first, or dram=True", (int)t->recs[rec].seg);
        return -1;
    }
    Rec *r0 = &t->recs[rec];
    if (keyless_twin(t, r0->ns, r0->key_len, r0->fp, rec)) return 0;
    Rec *r = &t->recs[rec];
    DForm keep = *df_ptr(t, r);
    if (!dram) {
        keep.stamp = 0;
        keep.reads = 0;
    }
    /* its DRAM form in the union when a field is set or it is linked (df_settle); the
       packed NVMe location then goes aside (first: a MemoryError changes nothing) */
    int in_df = !df_default(&keep) || r->seg >= 0;
    if (in_df && (r->flags & (F_NVME | F_NVSIDE)) == F_NVME) {
        SEnt *x = s_put(&t->aside, rec);
        if (!x) return -1;
        r = &t->recs[rec];
        x->a = r->u.n.blk; x->b = r->u.n.gen; x->c = r->u.n.region;
        r->flags |= F_ASIDE;
    }
    chunk_free(t, key_class(r->key_len), r->u.n.part);
    r->u.n.part = NOREC;
    r->flags |= F_KEYLESS;
    t->nkeyless++;
    if (in_df) {
        r->u.d = keep;
        r->flags |= F_DF;
    }
    return 0;
}

/* restore_key(entry, key): a keyless entry gets its key back (promotion to DRAM, after
   the Store compared the NVMe header's key with the one asked for). */
static PyObject *Table_restore_key(Table *t, PyObject *const *args, Py_ssize_t n) {
    READY(t, NULL);
    Entry *e;
    if (n != 2 || entry_arg(args[0], &e) < 0 || !PyBytes_Check(args[1])) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "restore_key(entry, key: bytes)");
        return NULL;
    }
    PyObject *key = args[1];
    const char *k = PyBytes_AS_STRING(key);
    size_t kl = (size_t)PyBytes_GET_SIZE(key);
    if (!e->ix) {  /* detached: holds its key */
        if (PyBytes_GET_SIZE(e->det->key) != (Py_ssize_t)kl || memcmp(PyBytes_AS_STRING(e->det->key), k, kl)) {
            PyErr_SetString(PyExc_ValueError, "restore_key: not the entry's key");
            return NULL;
        }
        Py_RETURN_NONE;
    }
    if (e->ix != t) {
        PyErr_SetString(PyExc_ValueError, "restore_key: entry belongs to another index");
        return NULL;
    }
    uint32_t rec = e->rec;
    Rec *r = &t->recs[rec];
    if (kl != r->key_len || fp_of(t, r->ns, k, kl) != r->fp) {
        PyErr_Format(PyExc_ValueError, "restore_key: a key of %zu bytes that is not the entry's "
                     "(%u bytes, fingerprint %llu)", kl, r->key_len, (unsigned long long)r->fp);
        return NULL;
    }
    if (!(r->flags & F_KEYLESS)) {
        if (kl && memcmp(key_ptr(t, r), k, kl)) {
            PyErr_SetString(PyExc_ValueError, "restore_key: not the entry's key (it has its key in RAM)");
            return NULL;
        }
        Py_RETURN_NONE;
    }
    unsigned c = key_class(kl);
    int64_t ch = chunk_alloc(t, c);
    if (ch < 0) return NULL;
    r = &t->recs[rec];
    DForm *nd = chunk_df(t, c, (uint32_t)ch);
    *nd = r->flags & F_DF ? r->u.d : DF0;
    if (kl) memcpy((char *)nd + sizeof(DForm), k, kl);
    NForm n0 = {(uint32_t)ch, 0, 0, 0};
    if (r->flags & F_ASIDE) {
        SEnt *x = s_find(&t->aside, rec);
        if (x) { n0.blk = x->a; n0.gen = x->b; n0.region = x->c; }
        s_del(&t->aside, rec);
    } else if (!(r->flags & F_DF)) {
        n0.blk = r->u.n.blk; n0.gen = r->u.n.gen; n0.region = r->u.n.region;
    }
    r->u.n = n0;
    r->flags &= ~(F_KEYLESS | F_DF | F_ASIDE);
    t->nkeyless--;
    Py_RETURN_NONE;
}

static PyObject *Table_set_key_loader(Table *t, PyObject *fn) {
    READY(t, NULL);
    if (fn != Py_None && !PyCallable_Check(fn)) {
        PyErr_Format(PyExc_TypeError, "set_key_loader(fn): fn must be callable or None, not %.80s",
                     Py_TYPE(fn)->tp_name);
        return NULL;
    }
    PyObject *old = t->key_loader;
    t->key_loader = NULL;
    if (fn != Py_None) { Py_INCREF(fn); t->key_loader = fn; }
    Py_XDECREF(old);
    Py_RETURN_NONE;
}

/* set_fingerprint_bits(bits): fingerprints keep only their low ``bits`` (tests: forces
   collisions); before the first record only. */
static PyObject *Table_set_fingerprint_bits(Table *t, PyObject *v) {
    READY(t, NULL);
    long b = PyLong_AsLong(v);
    if (b == -1 && PyErr_Occurred()) return NULL;
    if (b < 1 || b > 64) return PyErr_Format(PyExc_ValueError, "bits must be in [1, 64], not %ld", b);
    if (t->nrecs) {
        PyErr_SetString(PyExc_ValueError, "records exist already: the fingerprint width cannot change");
        return NULL;
    }
    t->fp_mask = b == 64 ? ~0ULL : (1ULL << b) - 1;
    Py_RETURN_NONE;
}

/* mark_unverified (on) / verify (off): flip the flag; the count follows for a record in
   the table. */
static PyObject *table_flag_unverified(Table *t, PyObject *o, int on) {
    READY(t, NULL);
    Entry *e;
    if (entry_arg(o, &e) < 0) return NULL;
    if (e->ix && e->ix != t) {  /* its flag would change another index's count */
        PyErr_SetString(PyExc_ValueError, "entry belongs to another index");
        return NULL;
    }
    Rec *r = R(e);
    if (!(r->flags & F_UNVERIFIED) == !on) Py_RETURN_NONE;  /* already so */
    r->flags ^= F_UNVERIFIED;
    if (e->ix && (r->flags & F_INTABLE)) {
        if (on) t->unverified++;
        else t->unverified--;
    }
    Py_RETURN_NONE;
}

static PyObject *Table_mark_unverified(Table *t, PyObject *o) { return table_flag_unverified(t, o, 1); }

/* mark_all_unverified(): every record in the table held back (a node the cluster dropped
   while alive: RepairHooks.hold_all); returns how many were not already. One pass over
   the records: a walk of views costs ~1 s and ~100 B per record per million records,
   on the loop that also renews the node's lease. */
static PyObject *Table_mark_all_unverified(Table *t, PyObject *unused) {
    READY(t, NULL);
    uint64_t n = 0;
    for (uint32_t i = 0; i < t->nrecs; i++) {
        Rec *r = &t->recs[i];
        if ((r->flags & (F_USED | F_INTABLE)) != (F_USED | F_INTABLE)) continue;
        if (r->flags & F_UNVERIFIED) continue;
        r->flags |= F_UNVERIFIED;
        n++;
    }
    t->unverified += n;
    return PyLong_FromUnsignedLongLong(n);
}

static PyObject *Table_verify(Table *t, PyObject *o) { return table_flag_unverified(t, o, 0); }

static Py_ssize_t Table_len(Table *t) { return (Py_ssize_t)t->count; }

static PyObject *Table_count(Table *t, PyObject *ns) {
    READY(t, NULL);
    if (!PyBytes_Check(ns)) { PyErr_SetString(PyExc_TypeError, "count(ns: bytes)"); return NULL; }
    int id = space_id(t, ns, 0);
    if (id < 0) {
        if (PyErr_Occurred()) return NULL;
        return PyLong_FromLong(0);
    }
    return PyLong_FromUnsignedLongLong(t->spaces[id].objects);
}

static PyObject *Table_namespaces(Table *t, PyObject *unused) {
    READY(t, NULL);
    PyObject *d = PyDict_New();
    if (!d) return NULL;
    for (uint32_t i = 0; i < t->nspaces; i++) {
        /* read the space before allocating: an allocation may run the GC, whose
           finalizers may add a namespace (t->spaces moves) or empty one (its name goes) */
        Space *s = &t->spaces[i];
        if (!s->name || !s->objects) continue;
        PyObject *name = s->name;
        unsigned long long objects = s->objects, bytes = s->bytes;
        Py_INCREF(name);
        PyObject *v = Py_BuildValue("(KK)", objects, bytes);
        int r = v ? PyDict_SetItem(d, name, v) : -1;
        Py_DECREF(name);
        Py_XDECREF(v);
        if (r < 0) { Py_DECREF(d); return NULL; }
    }
    return d;
}

/* --- slot map */

static PyObject *Table_use_slab_size(Table *t, PyObject *v) {
    READY(t, NULL);
    long long s = PyLong_AsLongLong(v);
    if (s == -1 && PyErr_Occurred()) return NULL;
    if (s <= 0) return PyErr_Format(PyExc_ValueError, "slab_size must be positive, not %lld", s);
    for (uint64_t i = 0; i < t->nrows; i++)
        if (t->rows[i].recs && s != t->slab_size) {
            PyErr_SetString(PyExc_ValueError, "slots are placed already: the slab size cannot change");
            return NULL;
        }
    t->slab_size = s;
    Py_RETURN_NONE;
}

/* use_nvme_geometry(data_start, region_size): where the NVMe tier's regions lie, so a
   Location packs as (region, block in region) on a drive of any size. Before the first
   record only (records packed the other way would read wrong). */
static PyObject *Table_use_nvme_geometry(Table *t, PyObject *args) {
    READY(t, NULL);
    long long start, size;
    if (!PyArg_ParseTuple(args, "LL:use_nvme_geometry", &start, &size)) return NULL;
    if (start < 0 || start % NVME_BLOCK || size <= 0 || size % NVME_BLOCK ||
        size / NVME_BLOCK > 0x10000) {
        PyErr_Format(PyExc_ValueError, "NVMe geometry: data_start %lld and region_size %lld must "
                     "be 4 KiB multiples, the region at most 256 MiB", start, size);
        return NULL;
    }
    if (t->nv_start == start && t->nv_region == size) Py_RETURN_NONE;
    if (t->nrecs) {
        PyErr_SetString(PyExc_ValueError, "records exist already: the NVMe geometry cannot change");
        return NULL;
    }
    t->nv_start = start;
    t->nv_region = size;
    Py_RETURN_NONE;
}

static PyObject *Table_place(Table *t, PyObject *o) {
    READY(t, NULL);
    Entry *e;
    if (entry_arg(o, &e) < 0 || check_attached(e, t) < 0) return NULL;
    Rec *r = R(e);
    int64_t off = rec_offset(t, e->rec);
    if (off < 0) {
        PyErr_SetString(PyExc_ValueError, "entry has no DRAM slot (offset -1)");
        return NULL;
    }
    uint32_t size = t->slot_sizes[r->sc];
    uint64_t slab = (uint64_t)(off / t->slab_size);
    int64_t rel = off % t->slab_size;
    /* checked before any row changes: a refused place leaves the slab's map as it was */
    if (rel % size) {
        PyErr_Format(PyExc_ValueError, "offset %lld is not a slot of %u bytes in a slab of %lld "
                     "(use_slab_size not called with the arena's?)", (long long)off, size,
                     (long long)t->slab_size);
        return NULL;
    }
    /* a row per slab: the class's slots per slab where the arena says (fewer than
       slab / slot where its slabs keep a key area), else slab / slot + 1 (a spare slot, as
       the dict index's: an offset past a slab's last whole slot reads None) */
    uint64_t ns = (uint64_t)t->slab_size / size + 1;
    if (t->slots_per[r->sc] && t->slots_per[r->sc] < ns) ns = t->slots_per[r->sc];
    if ((uint64_t)(rel / size) >= ns) {
        PyErr_Format(PyExc_ValueError, "offset %lld is past the %llu slots of %u bytes a slab "
                     "of its class holds", (long long)off, (unsigned long long)ns, size);
        return NULL;
    }
    if (slab >= 0xFFFFFFFFULL || ns > 0xFFFFFFFFULL) {
        PyErr_Format(PyExc_ValueError, "offset %lld: slab %llu of %lld bytes is past the slot "
                     "map (2**32 slabs of 2**32 slots)", (long long)off,
                     (unsigned long long)slab, (long long)t->slab_size);
        return NULL;
    }
    if (slab >= t->nrows) {
        /* a fresh zeroed array (calloc: untouched pages for a far slab), grown by half
           at least so that slabs placed in order do not copy the map each time */
        uint64_t cap = t->nrows + t->nrows / 2 + 16;
        if (cap < slab + 1) cap = slab + 1;
        Row *nr = PyMem_RawCalloc(cap, sizeof(Row));
        if (!nr) return PyErr_NoMemory();
        if (t->nrows) memcpy(nr, t->rows, t->nrows * sizeof(Row));
        PyMem_RawFree(t->rows);
        t->rows = nr;
        t->nrows = cap;
    }
    Row *row = &t->rows[slab];
    if (!row->recs || row->slot_size != size) {
        /* a slab that changed class was emptied first: a fresh row. One spare slot at the
           end, as the dict index's: an offset past a slab's last whole slot reads None. */
        uint32_t *nrecs = PyMem_RawCalloc(ns, sizeof(uint32_t));
        if (!nrecs) return PyErr_NoMemory();
        PyMem_RawFree(row->recs);
        row->recs = nrecs;
        row->slot_size = size;
        row->nslots = (uint32_t)ns;
    }
    row->recs[rel / size] = e->rec + 1;
    Py_RETURN_NONE;
}

static PyObject *Table_displace(Table *t, PyObject *o) {
    READY(t, NULL);
    Entry *e;
    if (entry_arg(o, &e) < 0 || check_attached(e, t) < 0) return NULL;
    slot_clear(t, e->rec);
    Py_RETURN_NONE;
}

/* --- key areas: a get's check of a keyless DRAM entry */

/* use_key_area(arena, key_width): the arena's buffer (held until use_key_area(None, 0)
   or the table's end) and the width of its slots' key records, whose places come from
   each class's key_base and slot size and the slab size (arena.py's layout). */
static PyObject *Table_use_key_area(Table *t, PyObject *args) {
    READY(t, NULL);
    PyObject *buf;
    long w;
    if (!PyArg_ParseTuple(args, "Ol:use_key_area", &buf, &w)) return NULL;
    if (buf != Py_None && (w < 2 || w > MAX_KEY + 1))
        return PyErr_Format(PyExc_ValueError, "key_width must be in [2, %d], not %ld", MAX_KEY + 1, w);
    Py_buffer nb = {0};
    /* writable where it can be (keep_key_in_area writes records; get_read only reads) */
    if (buf != Py_None && PyObject_GetBuffer(buf, &nb, PyBUF_WRITABLE) < 0) {
        PyErr_Clear();
        if (PyObject_GetBuffer(buf, &nb, PyBUF_SIMPLE) < 0) return NULL;
    }
    if (t->karena.obj) PyBuffer_Release(&t->karena);
    t->karena = nb;
    t->key_width = buf != Py_None ? (uint32_t)w : 0;
    Py_RETURN_NONE;
}

/* Whether the key record of record rec's DRAM slot holds key k (kl bytes): the record
   is at its slab's key area (the class's key_base) + slot number x key_width, a length
   byte and the key. 0 where the table has no key area, the class none, or the place is
   outside the buffer (never read past it: the offset is the record's own, the bytes are
   shared with clients, who may have rewritten them). */
static int key_record_holds(Table *t, uint32_t rec, const char *k, size_t kl) {
    Rec *r = &t->recs[rec];
    uint32_t kb = t->key_base[r->sc], w = t->key_width, size = t->slot_sizes[r->sc];
    int64_t off = rec_offset(t, rec);
    if (!t->karena.obj || !kb || off < 0 || kl >= w) return 0;
    int64_t rel = off % t->slab_size;
    uint64_t at = (uint64_t)(off - rel) + kb + (uint64_t)(rel / size) * w;
    if (at + w > (uint64_t)t->karena.len) return 0;
    const unsigned char *p = (const unsigned char *)t->karena.buf + at;
    return p[0] == kl && memcmp(p + 1, k, kl) == 0;
}

/* keep_key_in_area(entry) -> bool: a committed keyed entry with a DRAM copy writes its
   key into its slot's key record (a length byte, the key, zeros to the record's end: no
   stale byte) and sheds it from RAM (shed_key(e, dram=True)); False, nothing changed,
   where the table has no key area, its class none, or the key does not fit a record
   (it stays in RAM). One call per put (Store._publish), no Python. */
static PyObject *Table_keep_key_in_area(Table *t, PyObject *o) {
    READY(t, NULL);
    Entry *e;
    if (entry_arg(o, &e) < 0 || check_attached(e, t) < 0) return NULL;
    if (!(R(e)->flags & F_INTABLE)) {
        PyErr_SetString(PyExc_ValueError, "keep_key_in_area: the entry is not in the index");
        return NULL;
    }
    uint32_t rec = e->rec;
    Rec *r = &t->recs[rec];
    uint32_t kb = t->key_base[r->sc], w = t->key_width, size = t->slot_sizes[r->sc];
    if (!t->karena.obj || t->karena.readonly || !kb || (r->flags & F_KEYLESS) || r->key_len >= w)
        Py_RETURN_FALSE;
    int64_t off = rec_offset(t, rec);
    if (off < 0) Py_RETURN_FALSE;
    r = &t->recs[rec];
    int64_t rel = off % t->slab_size;
    uint64_t at = (uint64_t)(off - rel) + kb + (uint64_t)(rel / size) * w;
    if (at + w > (uint64_t)t->karena.len) Py_RETURN_FALSE;
    unsigned char *p = (unsigned char *)t->karena.buf + at;
    p[0] = r->key_len;
    memcpy(p + 1, key_ptr(t, r), r->key_len);
    memset(p + 1 + r->key_len, 0, w - 1 - r->key_len);
    if (shed_rec(t, rec, 1) < 0) return NULL;
    return PyBool_FromLong((t->recs[rec].flags & F_KEYLESS) != 0);
}

/* get_read(ns, key): ``get`` for a read of the object's bytes. A keyless entry with a
   DRAM copy was found by its 64-bit fingerprint alone: it is returned only if its slot's
   key record holds ``key`` (another key of that fingerprint, or a record a local client
   rewrote, reads None: a miss, never another object's bytes). An NVMe-only keyless one
   is returned as ``get`` does (its read compares the key on the record's header). */
static PyObject *Table_get_read(Table *t, PyObject *const *args, Py_ssize_t n) {
    READY(t, NULL);
    uint32_t rec;
    int got = lookup_args(t, args, n, "get_read", &rec);
    if (got < 0) return NULL;
    if (!got) Py_RETURN_NONE;
    Rec *r = &t->recs[rec];
    if ((r->flags & F_KEYLESS) && off_units(t, r) != OFF_NONE &&
        !key_record_holds(t, rec, PyBytes_AS_STRING(args[1]), (size_t)PyBytes_GET_SIZE(args[1])))
        Py_RETURN_NONE;
    return view_of(t, rec);
}

static PyObject *Table_at(Table *t, PyObject *v) {
    READY(t, NULL);
    long long off = PyLong_AsLongLong(v);
    if (off == -1 && PyErr_Occurred()) return NULL;
    if (off < 0) Py_RETURN_NONE;
    uint64_t slab; int64_t rel;
    Row *row = row_of(t, off, &slab, &rel);
    if (!row || rel % row->slot_size || (uint64_t)(rel / row->slot_size) >= row->nslots)
        Py_RETURN_NONE;
    uint32_t r = row->recs[rel / row->slot_size];
    if (!r) Py_RETURN_NONE;
    return view_of(t, r - 1);
}

/* --- walks */

typedef struct {
    PyObject_HEAD
    Table *t;
    uint32_t pos;
    int ns;  /* -1: all */
} Iter;

static PyObject *Table_iterate(Table *t, PyObject *args) {
    READY(t, NULL);
    PyObject *ns = Py_None;
    if (!PyArg_ParseTuple(args, "|O:iterate", &ns)) return NULL;
    int id = -1;
    if (ns != Py_None) {
        if (!PyBytes_Check(ns)) { PyErr_SetString(PyExc_TypeError, "iterate(ns: bytes | None)"); return NULL; }
        id = space_id(t, ns, 0);
        if (id < 0 && PyErr_Occurred()) return NULL;
        if (id < 0) id = -2;  /* no such namespace: an empty walk */
    }
    Iter *it = PyObject_New(Iter, &IterType);
    if (!it) return NULL;
    Py_INCREF(t);
    it->t = t;
    it->pos = 0;
    it->ns = id;
    return (PyObject *)it;
}

static void Iter_dealloc(Iter *it) { Py_DECREF(it->t); PyObject_Free(it); }

static PyObject *Iter_next(Iter *it) {
    Table *t = it->t;
    if (it->ns == -2) return NULL;
    /* bounded by the record count read each step: a change while walking never reads
       outside the array (the caller is told to snapshot first) */
    while (it->pos < t->nrecs) {
        uint32_t i = it->pos++;
        Rec *r = &t->recs[i];
        if ((r->flags & (F_USED | F_INTABLE)) != (F_USED | F_INTABLE)) continue;
        if (it->ns >= 0 && r->ns != it->ns) continue;
        return view_of(t, i);
    }
    return NULL;
}

static PyTypeObject IterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kvstored._index.Iter",
    .tp_basicsize = sizeof(Iter),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = (destructor)Iter_dealloc,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)Iter_next,
};

static PyObject *Table_footprint(Table *t, PyObject *unused) {
    READY(t, NULL);
    uint64_t keys = 0, keycap = 0, parts = 0, partcap = 0, rows = 0;
    for (size_t c = 0; c < sizeof t->pools / sizeof t->pools[0]; c++) {
        keys += (uint64_t)t->pools[c].n * 8 * c;
        keycap += (uint64_t)t->pools[c].cap * 8 * c;
        parts += (uint64_t)t->pools[c].n * sizeof(DForm);
        partcap += (uint64_t)t->pools[c].cap * sizeof(DForm);
    }
    rows = t->nrows * sizeof(Row);
    for (uint64_t i = 0; i < t->nrows; i++)
        if (t->rows[i].recs) rows += (uint64_t)t->rows[i].nslots * 4;
    return Py_BuildValue("{sKsKsKsKsKsKsKsKsKsKsKsKsKsKsnsnsKsKsKsK}",
                         "view_slots", (unsigned long long)(t->views ? t->vmask + 1 : 0),
                         "record_size", (unsigned long long)sizeof(Rec),
                         "records", (unsigned long long)t->nrecs * sizeof(Rec),
                         "records_capacity", (unsigned long long)t->caprecs * sizeof(Rec),
                         "dram_part_size", (unsigned long long)sizeof(DForm),
                         "dram_parts", (unsigned long long)parts,
                         "dram_parts_capacity", (unsigned long long)partcap,
                         "keyless", (unsigned long long)t->nkeyless,
                         "table", (unsigned long long)(t->slots ? (t->mask + 1) * sizeof(uint32_t) : 0),
                         "keys", (unsigned long long)keys,
                         "keys_capacity", (unsigned long long)keycap,
                         "slot_map", (unsigned long long)rows,
                         "views", (unsigned long long)t->vcount,
                         "namespaces", (unsigned long long)(t->nspaces - t->nfreespaces),
                         "wide_offsets", PyDict_GET_SIZE(t->wide),
                         "nvme_side", PyDict_GET_SIZE(t->nvside),
                         "readers", (unsigned long long)t->refs.n,
                         "refs_table", (unsigned long long)(t->refs.e ? (t->refs.mask + 1ULL) * sizeof(SEnt) : 0),
                         "nvme_aside", (unsigned long long)t->aside.n,
                         "aside_table", (unsigned long long)(t->aside.e ? (t->aside.mask + 1ULL) * sizeof(SEnt) : 0));
}

/* probes() -> (longest, mean hit, mean miss): slots a lookup reads, over the keys present
   (hit) and over every home slot a missing key may hash to (miss: to the next empty
   slot). Each slot read is a record read (the fingerprint is in the record). A check
   that keys spread (tests, bench_index); walks the whole table. */
static PyObject *Table_probes(Table *t, PyObject *unused) {
    READY(t, NULL);
    uint64_t longest = 0, total = 0, miss = 0, run = 0;
    if (t->slots) {
        uint64_t cap = t->mask + 1, start = 0;
        while (t->slots[start]) start++;  /* a run may wrap: begin at an empty slot */
        for (uint64_t n = 1; n <= cap; n++) {
            uint64_t i = (start + n) & t->mask;
            if (!t->slots[i]) {
                miss += (run + 1) * (run + 2) / 2;  /* homes in the run, and this empty one */
                run = 0;
                continue;
            }
            run++;
            uint64_t d = (i - (t->recs[t->slots[i] - 1].fp & t->mask)) & t->mask;
            total += d + 1;
            if (d + 1 > longest) longest = d + 1;
        }
    }
    return Py_BuildValue("(Kdd)", (unsigned long long)longest,
                         t->count ? (double)total / (double)t->count : 0.0,
                         t->slots ? (double)miss / (double)(t->mask + 1) : 0.0);
}

/* key_hash(ns, key) -> the table's 64-bit fingerprint of the key (None: no such
   namespace); for tests that check the per-table seed is mixed in */
static PyObject *Table_key_hash(Table *t, PyObject *const *args, Py_ssize_t n) {
    READY(t, NULL);
    if (n != 2 || !PyBytes_Check(args[0]) || !PyBytes_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "key_hash(ns: bytes, key: bytes)");
        return NULL;
    }
    int ns = space_id(t, args[0], 0);
    if (ns < 0) {
        if (PyErr_Occurred()) return NULL;
        Py_RETURN_NONE;
    }
    return PyLong_FromUnsignedLongLong(fp_of(t, (uint16_t)ns, PyBytes_AS_STRING(args[1]),
                                             (size_t)PyBytes_GET_SIZE(args[1])));
}

static PyObject *Table_get_object_bytes(Table *t, void *c) { return PyLong_FromUnsignedLongLong(t->object_bytes); }
static PyObject *Table_get_unverified(Table *t, void *c) { return PyLong_FromUnsignedLongLong(t->unverified); }

static PyGetSetDef Table_getset[] = {
    {"object_bytes", (getter)Table_get_object_bytes, NULL, "bytes of the objects in the index", NULL},
    {"unverified", (getter)Table_get_unverified, NULL, "entries held back until verified", NULL},
    {NULL}
};

static PyMethodDef Table_methods[] = {
    {"present", (PyCFunction)(void (*)(void))Table_present, METH_FASTCALL,
     "present(ns, keys) -> [bool]: stored and not held back (unverified), no view built"},
    {"prefix", (PyCFunction)(void (*)(void))Table_prefix, METH_FASTCALL,
     "prefix(ns, keys) -> (count, bytes): the leading keys present, their bytes"},
    {"get", (PyCFunction)(void (*)(void))Table_get, METH_FASTCALL, "get(ns, key) -> Entry | None"},
    {"get_read", (PyCFunction)(void (*)(void))Table_get_read, METH_FASTCALL,
     "get_read(ns, key) -> Entry | None: get, a keyless DRAM entry only if its key record holds key"},
    {"keep_key_in_area", (PyCFunction)Table_keep_key_in_area, METH_O,
     "keep_key_in_area(entry) -> bool: its key into its slot's key record, shed from RAM"},
    {"use_key_area", (PyCFunction)Table_use_key_area, METH_VARARGS,
     "use_key_area(arena_buffer | None, key_width): where get_read finds slots' key records"},
    {"insert", (PyCFunction)Table_insert, METH_O, "insert(entry): add under its (free) key"},
    {"add", (PyCFunction)(void (*)(void))Table_add, METH_VARARGS | METH_KEYWORDS,
     "add(ns, key, offset, size, checksum, sc, committed_at, nvme=None, unverified=False, keyless=False)"},
    {"remove", (PyCFunction)Table_remove, METH_O, "remove(entry)"},
    {"mark_unverified", (PyCFunction)Table_mark_unverified, METH_O, NULL},
    {"mark_all_unverified", (PyCFunction)Table_mark_all_unverified, METH_NOARGS, NULL},
    {"verify", (PyCFunction)Table_verify, METH_O, NULL},
    {"count", (PyCFunction)Table_count, METH_O, "objects in a namespace"},
    {"namespaces", (PyCFunction)Table_namespaces, METH_NOARGS, "ns -> (objects, bytes)"},
    {"use_slab_size", (PyCFunction)Table_use_slab_size, METH_O, NULL},
    {"use_nvme_geometry", (PyCFunction)Table_use_nvme_geometry, METH_VARARGS,
     "use_nvme_geometry(data_start, region_size): NVMe Locations pack on any drive size"},
    {"place", (PyCFunction)Table_place, METH_O, "entry now holds DRAM slot entry.offset"},
    {"displace", (PyCFunction)Table_displace, METH_O, "entry gave up its DRAM slot"},
    {"at", (PyCFunction)Table_at, METH_O, "the entry in the DRAM slot at offset, or None"},
    {"iterate", (PyCFunction)Table_iterate, METH_VARARGS, "iterate(ns=None): entries, record order"},
    {"footprint", (PyCFunction)Table_footprint, METH_NOARGS, "bytes used by part"},
    {"probes", (PyCFunction)Table_probes, METH_NOARGS, "(longest, mean hit, mean miss) slots read per lookup"},
    {"key_hash", (PyCFunction)(void (*)(void))Table_key_hash, METH_FASTCALL,
     "key_hash(ns, key): the seeded 64-bit fingerprint (None: no such namespace)"},
    {"shed_key", (PyCFunction)(void (*)(void))Table_shed_key, METH_FASTCALL | METH_KEYWORDS,
     "shed_key(entry, dram=False): the entry's key leaves RAM (dram=True: also one with a DRAM "
     "copy or in an eviction list)"},
    {"restore_key", (PyCFunction)(void (*)(void))Table_restore_key, METH_FASTCALL,
     "restore_key(entry, key): a keyless entry gets its key back"},
    {"set_key_loader", (PyCFunction)Table_set_key_loader, METH_O,
     "set_key_loader(fn): fn(entry) -> bytes | None gives Entry.key of a keyless entry"},
    {"set_fingerprint_bits", (PyCFunction)Table_set_fingerprint_bits, METH_O,
     "set_fingerprint_bits(bits): narrower fingerprints (tests: forced collisions); empty index only"},
    {NULL}
};

static PySequenceMethods Table_seq = {.sq_length = (lenfunc)Table_len};

static PyTypeObject TableType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kvstored._index.Table",
    .tp_doc = "Table(slab_size, location_type=None): the packed index's records and lookups.",
    .tp_basicsize = sizeof(Table),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Table_init,
    .tp_dealloc = (destructor)Table_dealloc,
    .tp_traverse = (traverseproc)Table_traverse,
    .tp_clear = (inquiry)Table_clear,
    .tp_methods = Table_methods,
    .tp_getset = Table_getset,
    .tp_as_sequence = &Table_seq,
};

/* ------------------------------------------------------------------- Ghost */

/* The eviction policy's ghost (kvstored/engine/eviction.py): the 64-bit digests
   (hash((ns, key)), masked) of evicted keys, oldest first, each with the list it left
   (0..2). A Python dict of int -> int cost ~70 B per key (the int object, the dict
   entry and its index, over-allocated); this is 9 B of ring slot (digest + origin
   byte) and a u32 probe slot at <= 3/4 load per key (docs/scale.md, "The ghost").

   The ring is circular: appends at lo + used, trims from lo, so a ghost held at its
   limit (one eviction in, the oldest key out) neither grows nor moves. A pop or a
   re-add (which moves a key to the newest end, as the dict's pop + set did) leaves a
   dead slot behind; dead slots at the oldest end are stepped over, the others go when
   a full ring is compacted. The probe table holds ring slot + 1 (0: empty), probed
   linearly from a seeded mix of the digest, reduced to the table's size by a multiply
   (any size, not only powers of two: a table sized to its count, not to the next
   power of two). Both are rebuilt smaller when the count falls to a quarter of what
   they were sized for, so a ghost whose limit shrank gives its memory back. */

#define G_DEAD 0xFF                 /* origin byte of a dead ring slot */
#define G_MINCAP 64u                /* ring slots at least */
#define G_MINTAB 96u                /* probe slots at least */
#define G_MAXLIVE 0xB0000000u       /* digests at most: the table (u32 slots) stays <= 3/4 full */

typedef struct {
    PyObject_HEAD
    uint64_t seed;
    uint64_t *dig;       /* ring: digests */
    uint8_t *org;        /* ring: origins, G_DEAD: popped or moved to the newest end */
    uint32_t cap, lo, used;  /* ring slots; the oldest (always live when used > 0); slots from lo in use */
    uint32_t *slots;     /* probe table: ring slot + 1, 0 = empty */
    uint32_t tcap;       /* probe slots (0: none yet) */
    uint32_t count;      /* live digests */
    uint64_t n[3];       /* live digests by origin */
} Ghost;

static PyTypeObject GhostType;

static inline uint32_t g_home(const Ghost *g, uint64_t d, uint32_t tcap) {
    return (uint32_t)(((mix(d ^ g->seed) >> 32) * (uint64_t)tcap) >> 32);
}

static inline uint32_t g_ring(const Ghost *g, uint64_t k) {  /* ring slot k after lo */
    uint64_t p = (uint64_t)g->lo + k;
    return (uint32_t)(p >= g->cap ? p - g->cap : p);
}

/* Probe slot of digest d, or -1. */
static int64_t g_find(const Ghost *g, uint64_t d) {
    if (!g->tcap) return -1;
    for (uint32_t i = g_home(g, d, g->tcap);; i = i + 1 == g->tcap ? 0 : i + 1) {
        uint32_t s = g->slots[i];
        if (!s) return -1;
        if (g->dig[s - 1] == d) return i;
    }
}

/* Probe slot holding ring slot p (which is live, so it is in the table). */
static uint32_t g_find_pos(const Ghost *g, uint32_t p) {
    uint32_t i = g_home(g, g->dig[p], g->tcap);
    while (g->slots[i] != p + 1) i = i + 1 == g->tcap ? 0 : i + 1;
    return i;
}

static void g_tput(uint32_t *slots, uint32_t tcap, uint32_t home, uint32_t p) {
    uint32_t i = home;
    while (slots[i]) i = i + 1 == tcap ? 0 : i + 1;
    slots[i] = p + 1;
}

/* Backward-shift deletion, as slot_del (cyclic comparisons hold for any table size). */
static void g_tdel(Ghost *g, uint32_t i) {
    uint32_t j = i, m = g->tcap;
    for (;;) {
        j = j + 1 == m ? 0 : j + 1;
        if (!g->slots[j]) break;
        uint32_t k = g_home(g, g->dig[g->slots[j] - 1], m);
        if ((j > i && (k <= i || k > j)) || (j < i && (k <= i && k > j))) {
            g->slots[i] = g->slots[j];
            i = j;
        }
    }
    g->slots[i] = 0;
}

/* Probe slots for n digests: load 1/2 when (re)built, grown at 3/4. */
static uint32_t g_tcap_for(uint64_t n) {
    uint64_t t = 2 * n + 1;
    if (t < G_MINTAB) t = G_MINTAB;
    return t > 0xFFFFFFFFull ? 0xFFFFFFFFu : (uint32_t)t;
}

/* Ring slots for n digests: room for a quarter more before the next rebuild. */
static uint32_t g_cap_for(uint64_t n) {
    uint64_t c = n + n / 4 + 1;
    if (c < G_MINCAP) c = G_MINCAP;
    return c > 0xFFFFFFFEull ? 0xFFFFFFFEu : (uint32_t)c;
}

/* New ring of ncap slots (>= count) with the live digests first, in order, and a new
   probe table of ntcap slots. -1 (MemoryError set) leaves the ghost as it was. */
static int g_rebuild(Ghost *g, uint32_t ncap, uint32_t ntcap) {
    uint64_t *nd = PyMem_RawMalloc((size_t)ncap * sizeof(uint64_t));
    uint8_t *no = PyMem_RawMalloc(ncap);
    uint32_t *ns = PyMem_RawCalloc(ntcap, sizeof(uint32_t));
    if (!nd || !no || !ns) {
        PyMem_RawFree(nd); PyMem_RawFree(no); PyMem_RawFree(ns);
        PyErr_NoMemory();
        return -1;
    }
    uint32_t w = 0;
    for (uint32_t k = 0; k < g->used; k++) {
        uint32_t p = g_ring(g, k);
        if (g->org[p] == G_DEAD) continue;
        nd[w] = g->dig[p];
        no[w] = g->org[p];
        g_tput(ns, ntcap, g_home(g, nd[w], ntcap), w);
        w++;
    }
    PyMem_RawFree(g->dig); PyMem_RawFree(g->org); PyMem_RawFree(g->slots);
    g->dig = nd; g->org = no; g->slots = ns;
    g->cap = ncap; g->tcap = ntcap;
    g->lo = 0; g->used = w;
    return 0;
}

/* A bigger probe table, the ring as it is. */
static int g_tgrow(Ghost *g, uint32_t ntcap) {
    uint32_t *ns = PyMem_RawCalloc(ntcap, sizeof(uint32_t));
    if (!ns) { PyErr_NoMemory(); return -1; }
    for (uint32_t k = 0; k < g->used; k++) {
        uint32_t p = g_ring(g, k);
        if (g->org[p] != G_DEAD) g_tput(ns, ntcap, g_home(g, g->dig[p], ntcap), p);
    }
    PyMem_RawFree(g->slots);
    g->slots = ns;
    g->tcap = ntcap;
    return 0;
}

/* Kill the live digest in ring slot p, whose probe slot is i. */
static void g_kill(Ghost *g, uint32_t p, uint32_t i) {
    g_tdel(g, i);
    g->n[g->org[p]]--;
    g->org[p] = G_DEAD;
    g->count--;
    while (g->used && g->org[g->lo] == G_DEAD) {  /* keep lo on a live slot */
        g->lo = g->lo + 1 == g->cap ? 0 : g->lo + 1;
        g->used--;
    }
}

/* Give memory back once the count is a quarter of what the ring or table was sized
   for (rebuilt for twice the count: a ghost going up and down does not rebuild on
   every step). Best effort: without memory it keeps the bigger arrays. */
static void g_maybe_shrink(Ghost *g) {
    uint64_t c = g->count;
    if ((g->cap > G_MINCAP && c * 4 < g->cap) || (g->tcap > G_MINTAB && c * 8 < g->tcap)) {
        if (g_rebuild(g, g_cap_for(2 * c), g_tcap_for(c)) < 0) PyErr_Clear();
    }
}

static int g_digest(PyObject *o, uint64_t *d) {
    if (!PyLong_Check(o)) {
        PyErr_Format(PyExc_TypeError, "a ghost digest is an int, not %.80s", Py_TYPE(o)->tp_name);
        return -1;
    }
    *d = PyLong_AsUnsignedLongLongMask(o);  /* hash() is signed: its 64 bits, any int */
    return *d == (uint64_t)-1 && PyErr_Occurred() ? -1 : 0;
}

static void g_drop_oldest(Ghost *g) {
    uint32_t p = g->lo;
    g_kill(g, p, g_find_pos(g, p));
}

static PyObject *Ghost_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    if (PyTuple_GET_SIZE(args) || (kw && PyDict_GET_SIZE(kw))) {
        PyErr_SetString(PyExc_TypeError, "Ghost() takes no arguments");
        return NULL;
    }
    Ghost *g = (Ghost *)type->tp_alloc(type, 0);
    if (!g) return NULL;
    if (getrandom(&g->seed, sizeof g->seed, GRND_NONBLOCK) != sizeof g->seed)
        g->seed = (uint64_t)(uintptr_t)g ^ 0x13198A2E03707344ULL;
    return (PyObject *)g;
}

static void Ghost_dealloc(Ghost *g) {
    PyMem_RawFree(g->dig);
    PyMem_RawFree(g->org);
    PyMem_RawFree(g->slots);
    Py_TYPE(g)->tp_free((PyObject *)g);
}

/* add, pop and trim on digests: Ghost's methods and the native policy's (Lru) */
static int g_add(Ghost *g, uint64_t d, int o) {
    if (g->count >= G_MAXLIVE) g_drop_oldest(g);  /* billions of keys: the oldest goes early */
    /* room first, so a MemoryError leaves the ghost as it was */
    if (g->used == g->cap) {
        if (g_rebuild(g, g_cap_for((uint64_t)g->count + 1), g_tcap_for((uint64_t)g->count + 1)) < 0)
            return -1;
    } else if (((uint64_t)g->count + 1) * 4 > (uint64_t)g->tcap * 3) {
        if (g_tgrow(g, g_tcap_for((uint64_t)g->count + 1)) < 0) return -1;
    }
    int64_t i = g_find(g, d);
    if (i >= 0) g_kill(g, g->slots[i] - 1, (uint32_t)i);  /* re-added: to the newest end */
    uint32_t p = g_ring(g, g->used);
    g->dig[p] = d;
    g->org[p] = (uint8_t)o;
    g->used++;
    g_tput(g->slots, g->tcap, g_home(g, d, g->tcap), p);
    g->n[o]++;
    g->count++;
    return 0;
}

/* The origin of digest d, which leaves the ghost; -1: not in it. */
static int g_pop(Ghost *g, uint64_t d) {
    int64_t i = g_find(g, d);
    if (i < 0) return -1;
    uint32_t p = g->slots[i] - 1;
    int origin = g->org[p];
    g_kill(g, p, (uint32_t)i);
    g_maybe_shrink(g);
    return origin;
}

static uint64_t g_trim(Ghost *g, uint64_t limit) {
    uint64_t dropped = 0;
    while (g->count > limit) {
        g_drop_oldest(g);
        dropped++;
    }
    if (dropped) g_maybe_shrink(g);
    return dropped;
}

static PyObject *Ghost_add(Ghost *g, PyObject *const *args, Py_ssize_t n) {
    uint64_t d;
    if (n != 2) {
        PyErr_SetString(PyExc_TypeError, "add(digest, origin)");
        return NULL;
    }
    if (g_digest(args[0], &d) < 0) return NULL;
    if (!PyLong_Check(args[1])) {
        PyErr_Format(PyExc_TypeError, "a ghost origin is an int, not %.80s", Py_TYPE(args[1])->tp_name);
        return NULL;
    }
    int over = 0;
    long o = PyLong_AsLongAndOverflow(args[1], &over);
    if (o == -1 && PyErr_Occurred()) return NULL;
    if (over || o < 0 || o > 2) {
        PyErr_SetString(PyExc_ValueError, "a ghost origin is 0, 1 or 2");
        return NULL;
    }
    if (g_add(g, d, (int)o) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *Ghost_pop(Ghost *g, PyObject *o) {
    uint64_t d;
    if (g_digest(o, &d) < 0) return NULL;
    int origin = g_pop(g, d);
    if (origin < 0) Py_RETURN_NONE;
    return PyLong_FromLong(origin);
}

static PyObject *Ghost_get(Ghost *g, PyObject *o) {
    uint64_t d;
    if (g_digest(o, &d) < 0) return NULL;
    int64_t i = g_find(g, d);
    if (i < 0) Py_RETURN_NONE;
    return PyLong_FromLong(g->org[g->slots[i] - 1]);
}

static PyObject *Ghost_trim(Ghost *g, PyObject *o) {
    int over = 0;
    if (!PyLong_Check(o)) {
        PyErr_Format(PyExc_TypeError, "trim(limit): limit is an int, not %.80s", Py_TYPE(o)->tp_name);
        return NULL;
    }
    long long limit = PyLong_AsLongLongAndOverflow(o, &over);
    if (limit == -1 && PyErr_Occurred()) return NULL;
    if (over > 0) limit = LLONG_MAX;  /* past 2**63: nothing to drop */
    if (over < 0 || limit < 0) {
        PyErr_SetString(PyExc_ValueError, "trim(limit): limit must be >= 0");
        return NULL;
    }
    return PyLong_FromUnsignedLongLong(g_trim(g, (uint64_t)limit));
}

static Py_ssize_t Ghost_len(Ghost *g) { return (Py_ssize_t)g->count; }

static int Ghost_contains(Ghost *g, PyObject *o) {
    uint64_t d;
    if (g_digest(o, &d) < 0) return -1;
    return g_find(g, d) >= 0;
}

static PyObject *Ghost_items(Ghost *g, PyObject *unused) {
    /* copied out first, with no Python run: each tuple's allocation may run a collection
       whose Python adds to or pops from this ghost (the ring moves, the count changes) */
    uint32_t n = 0;
    uint64_t *dig = PyMem_Malloc(((size_t)g->count + 1) * sizeof(uint64_t));
    uint8_t *org = PyMem_Malloc((size_t)g->count + 1);
    if (!dig || !org) { PyMem_Free(dig); PyMem_Free(org); return PyErr_NoMemory(); }
    for (uint32_t k = 0; k < g->used && n < g->count; k++) {
        uint32_t p = g_ring(g, k);
        if (g->org[p] == G_DEAD) continue;
        dig[n] = g->dig[p];
        org[n++] = g->org[p];
    }
    PyObject *l = PyList_New(n);
    for (uint32_t i = 0; l && i < n; i++) {
        PyObject *t = Py_BuildValue("(Ki)", (unsigned long long)dig[i], (int)org[i]);
        if (!t) Py_CLEAR(l);
        else PyList_SET_ITEM(l, i, t);
    }
    PyMem_Free(dig);
    PyMem_Free(org);
    return l;
}

static PyObject *Ghost_footprint(Ghost *g, PyObject *unused) {
    return Py_BuildValue("{sIsIsIsIsK}", "ring_slots", g->cap, "ring_used", g->used,
                         "table_slots", g->tcap, "digests", g->count,
                         "bytes", (unsigned long long)(sizeof(Ghost) + (uint64_t)g->cap * 9 +
                                                       (uint64_t)g->tcap * 4));
}

static PyObject *Ghost_get_counts(Ghost *g, void *c) {
    return Py_BuildValue("(KKK)", (unsigned long long)g->n[0], (unsigned long long)g->n[1],
                         (unsigned long long)g->n[2]);
}

static PyObject *Ghost_get_nbytes(Ghost *g, void *c) {
    return PyLong_FromUnsignedLongLong(sizeof(Ghost) + (uint64_t)g->cap * 9 + (uint64_t)g->tcap * 4);
}

/* Not copied or pickled: object's default would make an empty ghost of a full one. */
static PyObject *Ghost_reduce(Ghost *g, PyObject *unused) {
    PyErr_SetString(PyExc_TypeError, "a Ghost cannot be copied or pickled");
    return NULL;
}

static PyGetSetDef Ghost_getset[] = {
    {"counts", (getter)Ghost_get_counts, NULL, "(n0, n1, n2): live digests by origin", NULL},
    {"nbytes", (getter)Ghost_get_nbytes, NULL, "bytes allocated (ring, probe table, object)", NULL},
    {NULL}
};

static PyMethodDef Ghost_methods[] = {
    {"add", (PyCFunction)(void (*)(void))Ghost_add, METH_FASTCALL,
     "add(digest, origin): the newest digest (an existing one moves to the newest end)"},
    {"pop", (PyCFunction)Ghost_pop, METH_O, "pop(digest) -> origin | None"},
    {"get", (PyCFunction)Ghost_get, METH_O, "get(digest) -> origin | None"},
    {"trim", (PyCFunction)Ghost_trim, METH_O, "trim(limit) -> dropped: oldest first down to limit"},
    {"items", (PyCFunction)Ghost_items, METH_NOARGS, "[(digest & (2**64 - 1), origin)], oldest first"},
    {"footprint", (PyCFunction)Ghost_footprint, METH_NOARGS, "ring and table sizes, bytes"},
    {"__reduce__", (PyCFunction)Ghost_reduce, METH_NOARGS, NULL},
    {NULL}
};

static PySequenceMethods Ghost_seq = {
    .sq_length = (lenfunc)Ghost_len,
    .sq_contains = (objobjproc)Ghost_contains,
};

static PyTypeObject GhostType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kvstored._index.Ghost",
    .tp_doc = "Ghost(): 64-bit digests, oldest first, each with an origin 0..2 "
              "(the eviction policy's ghost).",
    .tp_basicsize = sizeof(Ghost),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Ghost_new,
    .tp_dealloc = (destructor)Ghost_dealloc,
    .tp_methods = Ghost_methods,
    .tp_getset = Ghost_getset,
    .tp_as_sequence = &Ghost_seq,
};

/* -------------------------------------------------------------------- Lru */

/* The eviction policy's lists for the packed index (kvstored/engine/eviction.py,
   NativePolicy): per size class the PROBATION, PROTECTED and COLD lists, linked through
   the records' DRAM parts (newer/older record numbers, seg, stamp: the fields the
   Python Policy sets through Entry views), with the clock, the resident count, the
   last lookup's stamps and the adaptive age bonus. Every decision is the Python
   Policy's, step for step (tests/engine/test_policy_native.py replays workloads
   through both); here a touch or an eviction is one call and no view is built for a
   neighbour. The ghost is a native Ghost (digests added, popped and trimmed here) or
   any object with the Ghost's add/pop/trim/counts (DictGhost), called through Python.
   tail_hints, parents and counters are the Python policy's dicts, shared: note_chain
   stays in Python. Records are changed in place, so a view held meanwhile reads the
   new fields. Per object: nothing beyond the record's own fields. */

enum { L_PROB = 0, L_PROT = 1, L_COLD = 2 };

typedef struct { uint32_t head, tail; uint64_t count; } LList;

typedef struct {
    PyObject_HEAD
    Table *t;                 /* the index whose records are linked */
    PyObject *ghost;          /* a Ghost, or an object with its methods */
    PyObject *tail_hints, *parents, *counters;  /* the Python policy's dicts */
    PyObject *last;           /* the entry inserted last (its view), or NULL */
    uint32_t nclasses;
    LList *lists;             /* nclasses x (PROBATION, PROTECTED, COLD) */
    int32_t cidx[MAX_CLASSES + 1];  /* the table's class id -> sc.index; -1: not read yet */
    int64_t resident;
    uint64_t lo, hi;          /* (lo, hi]: the stamps the last lookup's hits got */
    double share, bonus, rate, bonus_max;
    uint64_t ghost_min;
} Lru;

static PyTypeObject LruType;

static inline DForm *L_aux(Table *t, uint32_t rec) { return df_ptr(t, &t->recs[rec]); }

static void l_push(Table *t, LList *L, uint32_t rec) {
    DForm *a = L_aux(t, rec);
    a->older = L->head;
    a->newer = NOREC;
    if (L->head != NOREC) L_aux(t, L->head)->newer = rec;
    L->head = rec;
    if (L->tail == NOREC) L->tail = rec;
    L->count++;
}

/* rec just older than ref (which is in L) */
static void l_behind(Table *t, LList *L, uint32_t ref, uint32_t rec) {
    DForm *ra = L_aux(t, ref), *a = L_aux(t, rec);
    uint32_t older = ra->older;
    a->newer = ref;
    a->older = older;
    if (older != NOREC) L_aux(t, older)->newer = rec; else L->tail = rec;
    ra->older = rec;
    L->count++;
}

static void l_remove(Table *t, LList *L, uint32_t rec) {
    DForm *a = L_aux(t, rec);
    uint32_t nw = a->newer, ol = a->older;
    if (nw != NOREC) L_aux(t, nw)->older = ol; else L->head = ol;
    if (ol != NOREC) L_aux(t, ol)->newer = nw; else L->tail = nw;
    a->newer = a->older = NOREC;
    L->count--;
}

static int lru_ready(Lru *p) {
    if (!p->t) {
        PyErr_SetString(PyExc_RuntimeError, "Lru is not initialised (or was cleared)");
        return -1;
    }
    return 0;
}

/* sc.index of the table's class id (read once per class: getattr runs Python code) */
static int lru_class(Lru *p, unsigned cid) {
    int32_t v = p->cidx[cid];
    if (v >= 0) return v;
    if (cid >= (unsigned)PyList_GET_SIZE(p->t->classes)) {
        PyErr_SetString(PyExc_RuntimeError, "packed index: a record's size class is unknown");
        return -1;
    }
    PyObject *ix = PyObject_GetAttrString(PyList_GET_ITEM(p->t->classes, cid), "index");
    if (!ix) return -1;
    long x = PyLong_Check(ix) ? PyLong_AsLong(ix) : -2;
    Py_DECREF(ix);
    if (x == -1 && PyErr_Occurred()) return -1;
    if (x < 0 || x >= (long)p->nclasses) {
        PyErr_Format(PyExc_ValueError, "a size class's index must be an int in [0, %u)", p->nclasses);
        return -1;
    }
    p->cidx[cid] = (int32_t)x;
    return (int)x;
}

/* The record of an entry of this policy's index, or -1 with an exception. */
static int64_t lru_rec(Lru *p, PyObject *o) {
    if (!PyObject_TypeCheck(o, &EntryType)) {
        PyErr_Format(PyExc_TypeError, "expected a kvstored._index.Entry, not %.80s", Py_TYPE(o)->tp_name);
        return -1;
    }
    if (check_attached((Entry *)o, p->t) < 0) return -1;
    return ((Entry *)o)->rec;
}

static void lru_balance(Lru *p, int idx) {
    Table *t = p->t;
    LList *L = &p->lists[(size_t)idx * 3], *prot = &L[L_PROT];
    uint64_t total = prot->count + L[L_PROB].count + L[L_COLD].count;
    if (prot->count > 1 && (double)prot->count > p->share * (double)total) {
        uint32_t r = prot->tail;
        l_remove(t, prot, r);
        t->recs[r].seg = L_PROB;  /* keeps its stamp: it is as old as its last access */
        l_push(t, &L[L_PROB], r);
    }
}

static int lru_touch_rec(Lru *p, uint32_t rec) {
    Table *t = p->t;
    if (t->recs[rec].seg < 0) return 0;
    /* the class first: its first read is a getattr, which may run Python that unlinks rec */
    int idx = lru_class(p, t->recs[rec].sc);
    if (idx < 0) return -1;
    if (t->recs[rec].seg < 0) return 0;
    DForm *a = L_aux(t, rec);
    if (!a) {
        PyErr_Format(PyExc_RuntimeError, "record %u is in an eviction list without its DRAM form", rec);
        return -1;
    }
    uint64_t es = stamp_eff(t, a->stamp);
    if (p->lo < es && es <= p->hi) return 0;  /* the last lookup ordered it */
    Rec *r = &t->recs[rec];
    LList *L = &p->lists[(size_t)idx * 3];
    l_remove(t, &L[r->seg], rec);
    a->stamp = clock_tick(t) & STAMP_MASK;
    r->seg = L_PROT;
    l_push(t, &L[L_PROT], rec);
    lru_balance(p, idx);
    return 0;
}

/* _push: at the head of list seg of class idx, stamped with the next tick */
static int lru_not_linked(Lru *p, uint32_t rec);

static int lru_push(Lru *p, uint32_t rec, int seg, int idx) {
    /* checked here, where it is linked: the Python a caller ran since its own check (the
       ghost's methods, a key loader, a collection's finalizers) may have linked it */
    if (lru_not_linked(p, rec) < 0) return -1;
    DForm *a = df_for_write(p->t, rec);
    if (!a) return -1;
    a->stamp = clock_tick(p->t) & STAMP_MASK;
    p->t->recs[rec].seg = seg;
    l_push(p->t, &p->lists[(size_t)idx * 3 + seg], rec);
    p->resident++;
    return 0;
}

/* (ns, key) of a record, a new tuple (the keys of the Python policy's tail_hints and
   parents), or NULL with an error */
static PyObject *lru_key(Lru *p, PyObject *e) {
    PyObject *key = get_key((Entry *)e, NULL);
    if (!key) return NULL;
    PyObject *tup = PyTuple_Pack(2, p->t->spaces[R((Entry *)e)->ns].name, key);
    Py_DECREF(key);
    return tup;
}

/* The ghost's digest of a record: its fingerprint, a seeded 64-bit hash of (namespace
   name, key) that stays the same for a key while the table lives (fp_of), so neither an
   insert nor an eviction reads the key (a keyless one's is in the arena or on NVMe).
   The Python policy digests hash((ns, key)): other values, the same decisions (a
   collision of either is ~2**-64 per pair of keys). */
typedef uint64_t Digest;
static inline Digest lru_digest(Lru *p, uint32_t rec) { return p->t->recs[rec].fp; }

static PyObject *digest_obj(Digest h) { return PyLong_FromUnsignedLongLong(h); }

/* ghost.pop(digest): the origin, -1 when absent, -2 on an error */
static int lru_ghost_pop(Lru *p, Digest h) {
    if (Py_TYPE(p->ghost) == &GhostType) return g_pop((Ghost *)p->ghost, (uint64_t)h);
    PyObject *d = digest_obj(h);
    PyObject *o = d ? PyObject_CallMethod(p->ghost, "pop", "O", d) : NULL;
    Py_XDECREF(d);
    if (!o) return -2;
    long v = o == Py_None ? -1 : PyLong_AsLong(o);
    Py_DECREF(o);
    if (v == -1 && PyErr_Occurred()) return -2;
    return (int)v;
}

/* ghost.add(digest, origin); ghost.trim(limit) */
static int lru_ghost_add_trim(Lru *p, Digest h, int origin, uint64_t limit) {
    if (Py_TYPE(p->ghost) == &GhostType) {
        if (g_add((Ghost *)p->ghost, (uint64_t)h, origin) < 0) return -1;
        g_trim((Ghost *)p->ghost, limit);
        return 0;
    }
    PyObject *d = digest_obj(h);
    PyObject *o = d ? PyObject_CallMethod(p->ghost, "add", "Oi", d, origin) : NULL;
    Py_XDECREF(d);
    if (!o) return -1;
    Py_DECREF(o);
    o = PyObject_CallMethod(p->ghost, "trim", "K", (unsigned long long)limit);
    if (!o) return -1;
    Py_DECREF(o);
    return 0;
}

/* the ghost's live digests by origin */
static int lru_ghost_counts(Lru *p, uint64_t n[3]) {
    if (Py_TYPE(p->ghost) == &GhostType) {
        memcpy(n, ((Ghost *)p->ghost)->n, 3 * sizeof(uint64_t));
        return 0;
    }
    PyObject *c = PyObject_GetAttrString(p->ghost, "counts");
    if (!c) return -1;
    int ok = PyArg_ParseTuple(c, "KKK", (unsigned long long *)&n[0], (unsigned long long *)&n[1],
                              (unsigned long long *)&n[2]);
    Py_DECREF(c);
    return ok ? 0 : -1;
}

/* _ghost_hit: a key put again had left list ``origin`` (the ghost has let it go) */
static int lru_ghost_hit(Lru *p, int origin) {
    if (p->rate == 0.0 || origin == L_COLD) return 0;
    uint64_t n[3];
    if (lru_ghost_counts(p, n) < 0) return -1;
    double step = p->rate / (double)(p->resident > 1 ? p->resident : 1);
    double prob = (double)(n[L_PROB] + 1), prot = (double)(n[L_PROT] + 1);
    if (origin == L_PROT) {
        double r = prob / prot, b = p->bonus + step * (r > 1.0 ? r : 1.0);
        p->bonus = b < p->bonus_max ? b : p->bonus_max;
    } else {
        double r = prot / prob, b = p->bonus - step * (r > 1.0 ? r : 1.0);
        p->bonus = b > 0.0 ? b : 0.0;
    }
    return 0;
}

static int count_up(PyObject *counters, const char *name) {
    PyObject *v = PyDict_GetItemString(counters, name), *one = PyLong_FromLong(1);
    PyObject *n = v && one ? PyNumber_Add(v, one) : one;
    if (n != one) Py_XDECREF(one);
    if (!n) return -1;
    int rc = PyDict_SetItemString(counters, name, n);
    Py_DECREF(n);
    return rc;
}

/* d.pop(k, None) is not None; -1 on an error */
static int dict_take(PyObject *d, PyObject *k, PyObject **val) {
    if (!k) return 0;  /* no key: the dict was empty (Lru_insert builds none then) */
    PyObject *v = PyDict_GetItemWithError(d, k);
    if (!v) return PyErr_Occurred() ? -1 : 0;
    if (val) { Py_INCREF(v); *val = v; }
    if (PyDict_DelItem(d, k) < 0) { if (val) Py_CLEAR(*val); return -1; }
    return 1;
}

/* Whether record rec is the object named by ``nk``, a (ns, key) tuple of bytes: 1 or 0;
   2: ``nk`` is something else (the caller compares tuples in Python). A keyless record
   is compared by its fingerprint (its key is in the arena or on NVMe: no read per chain
   put); a false match, ~2**-64, only links a new entry behind the wrong last insert. */
static int rec_named(Table *t, uint32_t rec, PyObject *nk) {
    if (!PyTuple_CheckExact(nk) || PyTuple_GET_SIZE(nk) != 2 ||
        !PyBytes_CheckExact(PyTuple_GET_ITEM(nk, 0)) || !PyBytes_CheckExact(PyTuple_GET_ITEM(nk, 1)))
        return 2;
    PyObject *ns = PyTuple_GET_ITEM(nk, 0), *key = PyTuple_GET_ITEM(nk, 1);
    Rec *r = &t->recs[rec];
    PyObject *name = t->spaces[r->ns].name;
    Py_ssize_t kl = PyBytes_GET_SIZE(key);
    if (PyBytes_GET_SIZE(ns) != PyBytes_GET_SIZE(name) ||
        memcmp(PyBytes_AS_STRING(ns), PyBytes_AS_STRING(name), (size_t)PyBytes_GET_SIZE(ns)) ||
        kl != r->key_len)
        return 0;
    if (r->flags & F_KEYLESS)
        return fp_of(t, r->ns, PyBytes_AS_STRING(key), (size_t)kl) == r->fp;
    return memcmp(key_ptr(t, r), PyBytes_AS_STRING(key), (size_t)kl) == 0;
}

/* _push_probation: just behind the chain parent when it was inserted just before */
static int lru_push_probation(Lru *p, uint32_t rec, int idx, PyObject *k) {
    PyObject *parent = NULL;
    if (PyDict_GET_SIZE(p->parents) && dict_take(p->parents, k, &parent) < 0) return -1;
    Entry *last = (Entry *)p->last;
    if (parent && last && last->ix == p->t && R(last)->seg == L_PROB) {
        /* held: the Python run below (the class's getattr, the compare with the parent, a
           collection) may insert another entry, and p->last held the only reference */
        Py_INCREF(last);
        int lidx = lru_class(p, R(last)->sc);
        int same = lidx < 0 ? -1 : 0;
        if (lidx == idx)
            same = rec_named(p->t, last->rec, parent);
        if (same == 2) {  /* not plain bytes: Python's compare of the tuples */
            PyObject *lk = get_key(last, NULL);
            PyObject *tup = lk ? PyTuple_Pack(2, p->t->spaces[R(last)->ns].name, lk) : NULL;
            Py_XDECREF(lk);
            same = tup ? PyObject_RichCompareBool(tup, parent, Py_EQ) : -1;
            Py_XDECREF(tup);
        }
        Py_DECREF(parent);
        /* behind the parent only if it is still the last insert, in PROBATION, and rec
           is still unlinked: else at the head, as when it was not inserted just before */
        if (same > 0 && ((PyObject *)last != p->last || last->ix != p->t || R(last)->seg != L_PROB))
            same = 0;
        if (same > 0 && lru_not_linked(p, rec) < 0)
            same = -1;
        DForm *a = same > 0 ? df_for_write(p->t, rec) : NULL;
        if (same > 0 && !a)
            same = -1;
        if (a) {
            clock_tick(p->t);  /* an insertion ticks the clock wherever it is linked */
            a->stamp = L_aux(p->t, last->rec)->stamp;
            p->t->recs[rec].seg = L_PROB;
            l_behind(p->t, &p->lists[(size_t)idx * 3 + L_PROB], last->rec, rec);
            p->resident++;
        }
        Py_DECREF(last);  /* may run Python (its record's side tables): nothing is held now */
        if (same < 0) return -1;
        if (same) return 0;
    } else {
        Py_XDECREF(parent);
    }
    return lru_push(p, rec, L_PROB, idx);
}

static int lru_not_linked(Lru *p, uint32_t rec) {
    if (p->t->recs[rec].seg >= 0) {
        PyErr_Format(PyExc_ValueError, "entry (record %u) is in an eviction list already", rec);
        return -1;
    }
    return 0;
}

static PyObject *Lru_insert(Lru *p, PyObject *e) {
    if (lru_ready(p) < 0) return NULL;
    int64_t rec = lru_rec(p, e);
    if (rec < 0 || lru_not_linked(p, (uint32_t)rec) < 0) return NULL;
    int idx = lru_class(p, p->t->recs[rec].sc);
    if (idx < 0) return NULL;
    /* the (ns, key) tuple only where a chain hint may name it (the dicts are empty
       without prefix lookups that missed); first, so an unreadable key changes nothing */
    PyObject *k = NULL;
    if (PyDict_GET_SIZE(p->tail_hints) || PyDict_GET_SIZE(p->parents)) {
        k = lru_key(p, e);
        if (!k) return NULL;
    }
    /* the push's one allocation first (a keyless record's DRAM form: its packed NVMe
       location goes aside), so that a MemoryError leaves the ghost, the hints, the
       counters and the age bonus as they were; a later failure takes the form back */
    int rc = 0, origin = -1;
    if (!df_for_write(p->t, (uint32_t)rec)) {
        rc = -1;
    } else if ((origin = lru_ghost_pop(p, lru_digest(p, (uint32_t)rec))) == -2) {
        rc = -1;
    } else if (origin >= 0) {
        if (lru_ghost_hit(p, origin) < 0 || dict_take(p->tail_hints, k, NULL) < 0 ||
            count_up(p->counters, "ghost_hits") < 0 || lru_push(p, (uint32_t)rec, L_PROT, idx) < 0)
            rc = -1;
        else
            lru_balance(p, idx);
    } else {
        int hinted = dict_take(p->tail_hints, k, NULL);
        if (hinted < 0)
            rc = -1;
        else if (hinted)
            rc = count_up(p->counters, "cold_inserts") < 0 || lru_push(p, (uint32_t)rec, L_COLD, idx) < 0
                 ? -1 : 0;
        else
            rc = lru_push_probation(p, (uint32_t)rec, idx, k);
    }
    Py_XDECREF(k);
    if (rc < 0) {
        df_settle(p->t, (uint32_t)rec);  /* its NVMe form again, unless something linked it */
        return NULL;
    }
    Py_INCREF(e);
    Py_XSETREF(p->last, e);
    Py_RETURN_NONE;
}

static PyObject *Lru_insert_loaded(Lru *p, PyObject *e) {
    if (lru_ready(p) < 0) return NULL;
    int64_t rec = lru_rec(p, e);
    if (rec < 0 || lru_not_linked(p, (uint32_t)rec) < 0) return NULL;
    int idx = lru_class(p, p->t->recs[rec].sc);
    if (idx < 0 || lru_push(p, (uint32_t)rec, L_PROT, idx) < 0) return NULL;
    lru_balance(p, idx);
    Py_RETURN_NONE;
}

static PyObject *Lru_touch(Lru *p, PyObject *e) {
    if (lru_ready(p) < 0) return NULL;
    int64_t rec = lru_rec(p, e);
    if (rec < 0 || lru_touch_rec(p, (uint32_t)rec) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *Lru_touch_run(Lru *p, PyObject *entries) {
    if (lru_ready(p) < 0) return NULL;
    PyObject *seq = PySequence_Fast(entries, "touch_run(entries): a list of entries");
    if (!seq) return NULL;
    /* the items are read each step: a list's may move (Python run by a touch may change it) */
    for (Py_ssize_t i = PySequence_Fast_GET_SIZE(seq) - 1; i >= 0; i--) {  /* deepest first */
        if (i >= PySequence_Fast_GET_SIZE(seq)) continue;
        int64_t rec = lru_rec(p, PySequence_Fast_ITEMS(seq)[i]);
        if (rec < 0 || lru_touch_rec(p, (uint32_t)rec) < 0) { Py_DECREF(seq); return NULL; }
    }
    Py_DECREF(seq);
    Py_RETURN_NONE;
}

/* touch_keys(index, ns, keys): touch_run of the entries stored under ``keys`` (unverified
   ones and missing keys left out), found here: no view is built (a batch call's earlier
   steps, whose entries may have gone stale while the loop ran, are touched by key) */
static PyObject *Lru_touch_keys(Lru *p, PyObject *const *args, Py_ssize_t n) {
    if (lru_ready(p) < 0) return NULL;
    if (n != 3 || args[0] != (PyObject *)p->t || !PyBytes_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "touch_keys(index, ns: bytes, keys): index is this policy's");
        return NULL;
    }
    Table *t = p->t;
    int ns = space_id(t, args[1], 0);
    if (ns < 0) {
        if (PyErr_Occurred()) return NULL;
        Py_RETURN_NONE;  /* no object in the namespace */
    }
    PyObject *seq = PySequence_Fast(args[2], "touch_keys(index, ns, keys): a list of keys");
    if (!seq) return NULL;
    for (Py_ssize_t i = PySequence_Fast_GET_SIZE(seq) - 1; i >= 0; i--) {  /* deepest first */
        if (i >= PySequence_Fast_GET_SIZE(seq)) continue;  /* as touch_run */
        int64_t rec = rec_of_key(t, ns, PySequence_Fast_ITEMS(seq)[i]);
        if (rec == -2 || (rec >= 0 && !(t->recs[rec].flags & F_UNVERIFIED) &&
                          lru_touch_rec(p, (uint32_t)rec) < 0)) {
            Py_DECREF(seq);
            return NULL;
        }
    }
    Py_DECREF(seq);
    Py_RETURN_NONE;
}

static PyObject *Lru_chain_begin(Lru *p, PyObject *unused) {
    if (lru_ready(p) < 0) return NULL;
    p->lo = p->hi = 0;
    return PyLong_FromUnsignedLongLong(p->t->clock);
}

static PyObject *Lru_chain_end(Lru *p, PyObject *start) {
    if (lru_ready(p) < 0) return NULL;
    unsigned long long s = PyLong_AsUnsignedLongLong(start);
    if (s == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    p->lo = s;
    p->hi = p->t->clock;
    Py_RETURN_NONE;
}

static PyObject *Lru_touch_chain(Lru *p, PyObject *entries) {
    if (lru_ready(p) < 0) return NULL;
    uint64_t start = p->t->clock;
    p->lo = p->hi = 0;
    PyObject *r = Lru_touch_run(p, entries);
    p->lo = start;
    p->hi = p->t->clock;
    return r;
}

static PyObject *Lru_remove(Lru *p, PyObject *const *args, Py_ssize_t n, PyObject *kwnames) {
    if (lru_ready(p) < 0) return NULL;
    int evicted = flag_arg(args, n, kwnames, "evicted", "remove(entry, evicted=False)");
    if (evicted < 0) return NULL;
    int64_t rec = lru_rec(p, args[0]);
    if (rec < 0) return NULL;
    Digest h = lru_digest(p, (uint32_t)rec);  /* no key read: a keyless one's may not verify */
    int seg = p->t->recs[rec].seg, idx = -1;
    if (seg >= 0) {
        idx = lru_class(p, p->t->recs[rec].sc);
        if (idx < 0) return NULL;
        seg = p->t->recs[rec].seg;  /* the class's getattr may have run Python that unlinked it */
    }
    if (seg >= 0) {
        l_remove(p->t, &p->lists[(size_t)idx * 3 + seg], (uint32_t)rec);
        p->t->recs[rec].seg = -1;
        p->resident--;
        df_settle(p->t, (uint32_t)rec);
    }
    if (evicted) {
        uint64_t limit = p->resident > (int64_t)p->ghost_min ? (uint64_t)p->resident : p->ghost_min;
        if (lru_ghost_add_trim(p, h, seg < 0 ? L_COLD : seg, limit) < 0) return NULL;
    }
    Py_RETURN_NONE;
}

/* evictable: refs == 0 and not pinned at now (Entry.pinned); 1, 0, or -1 on an error */
static int lru_evictable_at(Table *t, uint32_t rec, double now) {
    if (refs_of(t, rec)) return 0;
    if (!(t->recs[rec].flags & F_PIN)) return 1;
    PyObject *k = PyLong_FromUnsignedLong(rec);
    if (!k) return -1;
    PyObject *v = PyDict_GetItemWithError(t->pins, k);
    Py_DECREF(k);
    if (!v) return PyErr_Occurred() ? -1 : 1;
    long pins = PyLong_AsLong(PyList_GET_ITEM(v, 0));
    double until = PyFloat_AsDouble(PyList_GET_ITEM(v, 1));
    if (PyErr_Occurred()) return -1;
    return !(pins > 0 && until > now);
}

static int lru_evictable(Lru *p, uint32_t rec, PyObject *fn, double now) {
    if (!fn) return lru_evictable_at(p->t, rec, now);
    PyObject *v = view_of(p->t, rec);
    if (!v) return -1;
    PyObject *r = PyObject_CallOneArg(fn, v);
    Py_DECREF(v);
    if (!r) return -1;
    int b = PyObject_IsTrue(r);
    Py_DECREF(r);
    return b;
}

/* _tail: the oldest evictable record of list seg, NOREC if none, or -1 on an error;
   the unevictable ones met move to the head (each looked at once) */
static int64_t lru_tail(Lru *p, int idx, int seg, PyObject *fn, double now) {
    LList *L = &p->lists[(size_t)idx * 3 + seg];
    for (uint64_t i = 0, n = L->count; i < n; i++) {
        uint32_t rec = L->tail;
        int ok = lru_evictable(p, rec, fn, now);
        if (ok < 0) return -1;
        /* a callable may have changed the lists (unlinked, even freed, this record): go on
           only with a record still at the tail */
        if (L->tail != rec) {
            PyErr_SetString(PyExc_RuntimeError, "evictable() changed the eviction lists");
            return -1;
        }
        if (ok) return rec;
        if (L->count == 1) return NOREC;
        l_remove(p->t, L, rec);
        l_push(p->t, L, rec);
    }
    return NOREC;
}

static int lru_index_arg(Lru *p, PyObject *o) {
    long x = PyLong_Check(o) ? PyLong_AsLong(o) : -2;
    if (x == -1 && PyErr_Occurred()) return -1;
    if (x < 0 || x >= (long)p->nclasses) {
        PyErr_Format(PyExc_ValueError, "size class index must be an int in [0, %u)", p->nclasses);
        return -1;
    }
    return (int)x;
}

/* victim(sc_index, evictable): evictable is the time ``now`` (a number: refs == 0 and not
   pinned at now, tested here) or a callable taking the entry */
static PyObject *Lru_victim(Lru *p, PyObject *const *args, Py_ssize_t n) {
    if (lru_ready(p) < 0) return NULL;
    if (n != 2) {
        PyErr_SetString(PyExc_TypeError, "victim(sc_index, now | evictable)");
        return NULL;
    }
    int idx = lru_index_arg(p, args[0]);
    if (idx < 0) return NULL;
    PyObject *fn = NULL;
    double now = 0.0;
    if (PyFloat_Check(args[1]) || PyLong_Check(args[1])) {
        now = PyFloat_AsDouble(args[1]);
        if (now == -1.0 && PyErr_Occurred()) return NULL;
    } else if (PyCallable_Check(args[1])) {
        fn = args[1];
    } else {
        PyErr_SetString(PyExc_TypeError, "victim(sc_index, evictable): a time or a callable");
        return NULL;
    }
    LList *L = &p->lists[(size_t)idx * 3];
    int64_t v = NOREC, prob = NOREC, prot = NOREC;
    if (L[L_COLD].count && (v = lru_tail(p, idx, L_COLD, fn, now)) < 0) return NULL;
    if (v == NOREC) {
        if (L[L_PROB].count && (prob = lru_tail(p, idx, L_PROB, fn, now)) < 0) return NULL;
        if (L[L_PROT].count && (prot = lru_tail(p, idx, L_PROT, fn, now)) < 0) return NULL;
        if (prob != NOREC && L[L_PROB].tail != (uint32_t)prob) {  /* moved by PROTECTED's test */
            PyErr_SetString(PyExc_RuntimeError, "evictable() changed the eviction lists");
            return NULL;
        }
        if (prob == NOREC) {
            v = prot;
        } else if (prot == NOREC) {
            v = prob;
        } else {
            /* ages past AGE_CAP count as AGE_CAP, and a protected tail whose age reached the
               cap goes before a probation tail whose age did not: with a bonus term past the
               cap (bonus x resident >= 2**27) it would stay for ever, where exact stamps let
               it age out (eviction.Policy: the same) */
            uint64_t ep = stamp_eff(p->t, L_aux(p->t, (uint32_t)prot)->stamp);
            uint64_t eb = stamp_eff(p->t, L_aux(p->t, (uint32_t)prob)->stamp);
            int aged_out = p->t->clock >= AGE_CAP && ep <= p->t->clock - AGE_CAP &&
                           eb > p->t->clock - AGE_CAP;
            v = aged_out || (double)ep + p->bonus * (double)(p->resident > 1 ? p->resident : 1) <
                            (double)eb ? prot : prob;
        }
    }
    if (v == NOREC) Py_RETURN_NONE;
    return view_of(p->t, (uint32_t)v);
}

static PyObject *Lru_count(Lru *p, PyObject *o) {
    if (lru_ready(p) < 0) return NULL;
    int idx = lru_index_arg(p, o);
    if (idx < 0) return NULL;
    LList *L = &p->lists[(size_t)idx * 3];
    return PyLong_FromUnsignedLongLong(L[0].count + L[1].count + L[2].count);
}

/* order(sc_index, seg): the list's entries, head (newest) first (tests, tools) */
static PyObject *Lru_order(Lru *p, PyObject *args) {
    int idx, seg;
    if (lru_ready(p) < 0 || !PyArg_ParseTuple(args, "ii:order", &idx, &seg)) return NULL;
    if (idx < 0 || (uint32_t)idx >= p->nclasses || seg < 0 || seg > 2) {
        PyErr_SetString(PyExc_ValueError, "order(sc_index, seg): out of range");
        return NULL;
    }
    /* The record numbers first, with no Python run in between: building a view may run a
       collection whose Python (a finalizer) unlinks, frees or reuses records of this list,
       and a link read after that may name a freed record (a chunk index it no longer has:
       a read out of bounds). Each view is then checked to be of a record still in the list
       (and the table is held: the same Python may clear this Lru). */
    Table *t = p->t;
    LList *L = &p->lists[(size_t)idx * 3 + seg];
    uint64_t n = L->count, k = 0;
    uint32_t *recs = PyMem_Malloc((size_t)(n ? n : 1) * sizeof(uint32_t));
    if (!recs) return PyErr_NoMemory();
    for (uint32_t r = L->head; r != NOREC; k++) {
        if (k == n || r >= t->nrecs) {
            PyMem_Free(recs);
            PyErr_SetString(PyExc_RuntimeError, "eviction list longer than its count");
            return NULL;
        }
        recs[k] = r;
        const DForm *a = L_aux(t, r);
        r = a ? a->older : NOREC;
    }
    Py_INCREF(t);
    PyObject *out = PyList_New(0);
    for (uint64_t i = 0; out && i < k; i++) {
        uint32_t r = recs[i];
        PyObject *v = view_of(t, r);
        if (!v) {
            Py_CLEAR(out);
            break;
        }
        int rc = PyList_Append(out, v);
        Py_DECREF(v);
        if (rc < 0) Py_CLEAR(out);
    }
    /* the last view made, no Python runs below: every record answered must still be in
       the list (one unlinked while a later view was made is not) */
    for (Py_ssize_t i = 0; out && i < PyList_GET_SIZE(out); i++) {
        uint32_t r = ((Entry *)PyList_GET_ITEM(out, i))->rec;
        /* (a record removed from the index while linked is still in the list) */
        if (r >= t->nrecs || !(t->recs[r].flags & F_USED) || t->recs[r].seg != seg) {
            Py_CLEAR(out);
            PyErr_SetString(PyExc_RuntimeError, "eviction list changed while order() read it");
        }
    }
    Py_DECREF(t);
    PyMem_Free(recs);
    return out;
}

static PyObject *Lru_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"table", "nclasses", "ghost", "tail_hints", "parents", "counters",
                             "protected_share", "age_bonus", "adapt_rate", "bonus_max",
                             "ghost_min", NULL};
    PyObject *table, *ghost, *hints, *parents, *counters;
    int nclasses;
    double share, bonus, rate, bmax;
    unsigned long long gmin;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!iOO!O!O!ddddK:Lru", kwlist, &TableType, &table,
                                     &nclasses, &ghost, &PyDict_Type, &hints, &PyDict_Type, &parents,
                                     &PyDict_Type, &counters, &share, &bonus, &rate, &bmax, &gmin))
        return NULL;
    if (nclasses < 1 || nclasses > MAX_CLASSES + 1) {
        PyErr_Format(PyExc_ValueError, "nclasses must be in [1, %d]", MAX_CLASSES + 1);
        return NULL;
    }
    if (!(share > 0.0 && share < 1.0) || !(bonus >= 0.0 && bonus <= bmax) || !(rate >= 0.0)) {
        PyErr_SetString(PyExc_ValueError, "protected_share in (0, 1), age_bonus in [0, bonus_max], "
                        "adapt_rate >= 0");
        return NULL;
    }
    if (((Table *)table)->lrus) {  /* both would link the same records' fields: lists torn */
        PyErr_SetString(PyExc_ValueError, "this index has a live Lru already: its lists are the "
                        "records' own link fields, which a second Lru would relink under it "
                        "(drop the first before making another)");
        return NULL;
    }
    Lru *p = (Lru *)type->tp_alloc(type, 0);
    if (!p) return NULL;
    p->lists = PyMem_Calloc((size_t)nclasses * 3, sizeof(LList));
    if (!p->lists) { Py_DECREF(p); return PyErr_NoMemory(); }
    for (size_t i = 0; i < (size_t)nclasses * 3; i++) p->lists[i].head = p->lists[i].tail = NOREC;
    for (size_t i = 0; i <= MAX_CLASSES; i++) p->cidx[i] = -1;
    p->nclasses = (uint32_t)nclasses;
    Py_INCREF(table); p->t = (Table *)table;
    p->t->lrus++;  /* Entry.seg and the links are this Lru's now (lists_owned) */
    Py_INCREF(ghost); p->ghost = ghost;
    Py_INCREF(hints); p->tail_hints = hints;
    Py_INCREF(parents); p->parents = parents;
    Py_INCREF(counters); p->counters = counters;
    p->share = share; p->bonus = bonus; p->rate = rate; p->bonus_max = bmax;
    p->ghost_min = gmin;
    return (PyObject *)p;
}

static int Lru_traverse(Lru *p, visitproc visit, void *arg) {
    Py_VISIT(p->t); Py_VISIT(p->ghost); Py_VISIT(p->tail_hints); Py_VISIT(p->parents);
    Py_VISIT(p->counters); Py_VISIT(p->last);
    return 0;
}

static int Lru_clear(Lru *p) {
    Py_CLEAR(p->last);
    if (p->t) p->t->lrus--;
    Py_CLEAR(p->t);
    Py_CLEAR(p->ghost); Py_CLEAR(p->tail_hints); Py_CLEAR(p->parents); Py_CLEAR(p->counters);
    return 0;
}

static void Lru_dealloc(Lru *p) {
    PyObject_GC_UnTrack(p);
    Lru_clear(p);
    PyMem_Free(p->lists);
    Py_TYPE(p)->tp_free((PyObject *)p);
}

static PyObject *Lru_get_clock(Lru *p, void *c) {
    if (lru_ready(p) < 0) return NULL;
    return PyLong_FromUnsignedLongLong(p->t->clock);
}
/* a test hook: the clock jumps forward (never back), as after that many ticks */
static int Lru_set_clock(Lru *p, PyObject *v, void *c) {
    if (lru_ready(p) < 0) return -1;
    if (!v || !PyLong_Check(v)) {
        PyErr_SetString(PyExc_TypeError, "Lru.clock must be an int");
        return -1;
    }
    unsigned long long x = PyLong_AsUnsignedLongLong(v);
    if (x == (unsigned long long)-1 && PyErr_Occurred()) return -1;
    if (x < p->t->clock || x > (unsigned long long)STAMP_MAX) {
        PyErr_Format(PyExc_ValueError, "Lru.clock moves forward only, up to 2**48 - 1 (it is %llu)",
                     (unsigned long long)p->t->clock);
        return -1;
    }
    clock_advance(p->t, x);
    return 0;
}
static PyObject *Lru_get_resident(Lru *p, void *c) { return PyLong_FromLongLong(p->resident); }
static PyObject *Lru_get_bonus(Lru *p, void *c) { return PyFloat_FromDouble(p->bonus); }
static int Lru_set_bonus(Lru *p, PyObject *v, void *c) {
    double b = v ? PyFloat_AsDouble(v) : -1.0;
    if (b == -1.0 && PyErr_Occurred()) return -1;
    if (!(b >= 0.0 && b <= p->bonus_max)) {
        PyErr_SetString(PyExc_ValueError, "age_bonus must be in [0, bonus_max]");
        return -1;
    }
    p->bonus = b;
    return 0;
}
static PyObject *Lru_get_ghost(Lru *p, void *c) {
    if (lru_ready(p) < 0) return NULL;
    Py_INCREF(p->ghost);
    return p->ghost;
}
static int Lru_set_ghost(Lru *p, PyObject *v, void *c) {
    if (!v) { PyErr_SetString(PyExc_AttributeError, "cannot delete Lru.ghost"); return -1; }
    Py_INCREF(v);
    Py_XSETREF(p->ghost, v);
    return 0;
}
static PyObject *Lru_get_lookup(Lru *p, void *c) {
    return Py_BuildValue("(KK)", (unsigned long long)p->lo, (unsigned long long)p->hi);
}
static PyObject *Lru_get_last(Lru *p, void *c) {
    PyObject *o = p->last ? p->last : Py_None;
    Py_INCREF(o);
    return o;
}

static PyGetSetDef Lru_getset[] = {
    {"clock", (getter)Lru_get_clock, (setter)Lru_set_clock, "the index's eviction clock: one tick per access or insertion (set: a test hook, forward only)", NULL},
    {"resident", (getter)Lru_get_resident, NULL, "entries in the lists", NULL},
    {"age_bonus", (getter)Lru_get_bonus, (setter)Lru_set_bonus, "the adaptive age bonus", NULL},
    {"ghost", (getter)Lru_get_ghost, (setter)Lru_set_ghost, "the ghost of evicted digests", NULL},
    {"lookup_clock", (getter)Lru_get_lookup, NULL, "(from, to]: the last lookup's stamps", NULL},
    {"last_insert", (getter)Lru_get_last, NULL, "the entry inserted last, or None", NULL},
    {NULL}
};

/* digest(ns, key) -> the ghost's digest of that key (as lru_digest of its record: its
   fingerprint; any namespace, stored or not): NativePolicy.in_ghost */
static PyObject *Lru_digest(Lru *p, PyObject *const *args, Py_ssize_t n) {
    if (lru_ready(p) < 0) return NULL;
    if (n != 2 || !PyBytes_Check(args[0]) || !PyBytes_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "digest(ns: bytes, key: bytes)");
        return NULL;
    }
    Table *t = p->t;
    uint64_t nh = name_hash(t, PyBytes_AS_STRING(args[0]), (size_t)PyBytes_GET_SIZE(args[0]));
    return digest_obj(fp_named(t, nh, PyBytes_AS_STRING(args[1]), (size_t)PyBytes_GET_SIZE(args[1])));
}

static PyMethodDef Lru_methods[] = {
    {"digest", (PyCFunction)(void (*)(void))Lru_digest, METH_FASTCALL,
     "digest(ns, key) -> int: the ghost's digest of a key (its fingerprint in this index)"},
    {"insert", (PyCFunction)Lru_insert, METH_O, "insert(entry): a newly committed entry"},
    {"insert_loaded", (PyCFunction)Lru_insert_loaded, METH_O, "insert_loaded(entry): promoted from NVMe"},
    {"touch", (PyCFunction)Lru_touch, METH_O, "touch(entry): an access"},
    {"touch_run", (PyCFunction)Lru_touch_run, METH_O, "touch_run(entries): touched deepest first"},
    {"touch_chain", (PyCFunction)Lru_touch_chain, METH_O, "chain_begin, touch_run, chain_end"},
    {"touch_keys", (PyCFunction)(void (*)(void))Lru_touch_keys, METH_FASTCALL,
     "touch_keys(index, ns, keys): touch_run of the verified entries under keys"},
    {"chain_begin", (PyCFunction)Lru_chain_begin, METH_NOARGS, "chain_begin() -> start"},
    {"chain_end", (PyCFunction)Lru_chain_end, METH_O, "chain_end(start)"},
    {"remove", (PyCFunction)(void (*)(void))Lru_remove, METH_FASTCALL | METH_KEYWORDS,
     "remove(entry, evicted=False): unlink; evicted: its digest goes to the ghost"},
    {"victim", (PyCFunction)(void (*)(void))Lru_victim, METH_FASTCALL,
     "victim(sc_index, now | evictable) -> entry | None"},
    {"count", (PyCFunction)Lru_count, METH_O, "count(sc_index): entries of the class"},
    {"order", (PyCFunction)Lru_order, METH_VARARGS, "order(sc_index, seg): entries, newest first"},
    {NULL}
};

static PyTypeObject LruType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kvstored._index.Lru",
    .tp_doc = "Lru(table, nclasses, ghost, tail_hints, parents, counters, protected_share, "
              "age_bonus, adapt_rate, bonus_max, ghost_min): the eviction lists of a packed index "
              "(kvstored/engine/eviction.py NativePolicy).",
    .tp_basicsize = sizeof(Lru),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = Lru_new,
    .tp_dealloc = (destructor)Lru_dealloc,
    .tp_traverse = (traverseproc)Lru_traverse,
    .tp_clear = (inquiry)Lru_clear,
    .tp_methods = Lru_methods,
    .tp_getset = Lru_getset,
};

static PyObject *mod_set_full_error(PyObject *m, PyObject *cls) {
    if (!PyType_Check(cls) || !PyType_IsSubtype((PyTypeObject *)cls, (PyTypeObject *)PyExc_OverflowError)) {
        PyErr_SetString(PyExc_TypeError, "set_full_error(cls): cls must subclass OverflowError");
        return NULL;
    }
    Py_INCREF(cls);
    Py_SETREF(full_error, cls);
    Py_RETURN_NONE;
}

/* _fail_allocs(n, after=0): tests only (fail_allocs above) */
static PyObject *mod_fail_allocs(PyObject *m, PyObject *args) {
    Py_ssize_t n, after = 0;
    if (!PyArg_ParseTuple(args, "n|n:_fail_allocs", &n, &after)) return NULL;
    if (n < 0 || after < 0)
        return PyErr_Format(PyExc_ValueError, "_fail_allocs: n and after must be >= 0, not %zd, %zd",
                            n, after);
    fail_allocs = n;
    fail_after = after;
    Py_RETURN_NONE;
}

static PyMethodDef mod_methods[] = {
    {"set_full_error", (PyCFunction)mod_set_full_error, METH_O,
     "set_full_error(cls): the OverflowError subclass raised when the index is full"},
    {"_fail_allocs", (PyCFunction)mod_fail_allocs, METH_VARARGS,
     "_fail_allocs(n, after=0): tests only; past the next `after` side-table allocations (an "
     "SMap's rebuild, an insert into the nvside or wide dict), n fail with MemoryError; 0 ends it"},
    {NULL}
};

static struct PyModuleDef moddef = {
    PyModuleDef_HEAD_INIT, "kvstored._index",
    "The Store's packed index (native/index.c; kvstored/engine/packedindex.py).", -1, mod_methods,
};

PyMODINIT_FUNC PyInit__index(void) {
    if (PyType_Ready(&EntryType) < 0 || PyType_Ready(&TableType) < 0 || PyType_Ready(&IterType) < 0 ||
        PyType_Ready(&GhostType) < 0 || PyType_Ready(&LruType) < 0)
        return NULL;
    PyObject *tm = PyImport_ImportModule("time");
    if (!tm) return NULL;
    time_time = PyObject_GetAttrString(tm, "time");
    Py_DECREF(tm);
    if (!time_time) return NULL;
    if (!full_error) { Py_INCREF(PyExc_OverflowError); full_error = PyExc_OverflowError; }
    PyObject *m = PyModule_Create(&moddef);
    if (!m) return NULL;
    Py_INCREF(&EntryType);
    Py_INCREF(&TableType);
    Py_INCREF(&GhostType);
    Py_INCREF(&LruType);
    if (PyModule_AddObject(m, "Entry", (PyObject *)&EntryType) < 0 ||
        PyModule_AddObject(m, "Table", (PyObject *)&TableType) < 0 ||
        PyModule_AddObject(m, "Ghost", (PyObject *)&GhostType) < 0 ||
        PyModule_AddObject(m, "Lru", (PyObject *)&LruType) < 0 ||
        PyModule_AddIntConstant(m, "RECORD_SIZE", (long)sizeof(Rec)) < 0 ||
        PyModule_AddIntConstant(m, "MAX_KEY", MAX_KEY) < 0 ||
        PyModule_AddIntConstant(m, "STAMP_AGE_CAP", (long)AGE_CAP) < 0 ||
        PyModule_AddIntConstant(m, "STAMP_BITS", STAMP_BITS) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
