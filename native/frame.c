/* kvstored._frame: the daemon's frame parser, FrameReader.next (client/kvstore/wire.py)
 * without its Python frame, two struct unpacks and the Header's tuple.__new__.
 *
 * next_frame(reader, header_type) does exactly what reader.next() does for a well-formed
 * header: None while the reader receives a payload or the frame is incomplete, else
 * (header_type(op, flags, req_id, status, ns_len, key_len, aux, length, checksum), ns, key)
 * with reader.start / reader.end moved past the frame. A header with another magic or
 * version is left to reader.next() itself, which raises the codec's FrameError: the wire
 * format and its errors stay defined in wire.py, and tests/unit/test_frame_native.py holds
 * the two to the same answers. Layout ("<4sBBHQHBBIQQ", 40 bytes, little endian):
 * magic 0, version 4, op 5, flags 6, req_id 8, status 16, ns_len 18, key_len 19, aux 20,
 * length 24, checksum 32; the namespace and key follow. Portable C: bytes assembled one
 * by one, no unaligned loads, no ISA extensions past the baseline (SSE2 is part of every
 * x86-64; elsewhere copy_to_slot is memcpy).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#define HEADER_SIZE 40

static PyObject *s_buf, *s_start, *s_end, *s_target, *s_next, *zero, *one;

static uint64_t le(const unsigned char *p, int n) {
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}

/* o.<name> as a Py_ssize_t (-1 with an error set on failure) */
static Py_ssize_t get_index(PyObject *r, PyObject *name) {
    PyObject *v = PyObject_GetAttr(r, name);
    if (!v) return -1;
    Py_ssize_t n = PyLong_AsSsize_t(v);
    Py_DECREF(v);
    return n;
}

static PyObject *next_frame(PyObject *m, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyType_Check(args[1]) ||
        !PyType_IsSubtype((PyTypeObject *)args[1], &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "next_frame(reader, header_type): header_type is a "
                        "tuple subclass (kvstore.wire.Header)");
        return NULL;
    }
    PyObject *r = args[0];
    PyTypeObject *htype = (PyTypeObject *)args[1];
    PyObject *target = PyObject_GetAttr(r, s_target);
    if (!target) return NULL;
    int receiving = target != Py_None;
    Py_DECREF(target);
    if (receiving) Py_RETURN_NONE;
    Py_ssize_t start = get_index(r, s_start);
    if (start == -1 && PyErr_Occurred()) return NULL;
    Py_ssize_t end = get_index(r, s_end);
    if (end == -1 && PyErr_Occurred()) return NULL;
    /* no subtraction that can overflow (the positions are any Python ints): a negative
       start goes on to the bounds check below and is refused */
    if (start >= 0 && (end < start || end - start < HEADER_SIZE)) Py_RETURN_NONE;

    PyObject *buf = PyObject_GetAttr(r, s_buf);
    if (!buf) return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE) < 0) {
        Py_DECREF(buf);
        return NULL;
    }
    Py_DECREF(buf);  /* the reader holds it; the exported view keeps it alive meanwhile */
    if (start < 0 || end > view.len) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "next_frame: the reader's start/end lie outside its buffer");
        return NULL;
    }
    const unsigned char *p = (const unsigned char *)view.buf + start;
    if (memcmp(p, "KVSD", 4) != 0 || p[4] != 1) {
        PyBuffer_Release(&view);
        return PyObject_CallMethodNoArgs(r, s_next);  /* raises the codec's FrameError */
    }
    Py_ssize_t nl = p[18], kl = p[19];
    Py_ssize_t e = start + HEADER_SIZE + nl + kl;
    if (e > end) {
        PyBuffer_Release(&view);
        Py_RETURN_NONE;
    }
    PyObject *h = htype->tp_alloc(htype, 9);
    PyObject *ns = PyBytes_FromStringAndSize((const char *)p + HEADER_SIZE, nl);
    PyObject *key = PyBytes_FromStringAndSize((const char *)p + HEADER_SIZE + nl, kl);
    PyObject *out = NULL;
    if (h && ns && key) {
        PyObject *f[9] = {
            PyLong_FromLong(p[5]), PyLong_FromLong((long)le(p + 6, 2)),
            PyLong_FromUnsignedLongLong(le(p + 8, 8)), PyLong_FromLong((long)le(p + 16, 2)),
            PyLong_FromLong(p[18]), PyLong_FromLong(p[19]),
            PyLong_FromUnsignedLongLong(le(p + 20, 4)),
            PyLong_FromUnsignedLongLong(le(p + 24, 8)), PyLong_FromUnsignedLongLong(le(p + 32, 8)),
        };
        int ok = 1;
        for (int i = 0; i < 9; i++) {
            if (!f[i]) ok = 0;
            PyTuple_SET_ITEM(h, i, f[i]);  /* a NULL item is fine for the dealloc below */
        }
        if (ok) {
            int moved;
            if (e == end) {
                moved = PyObject_SetAttr(r, s_start, zero) == 0 && PyObject_SetAttr(r, s_end, zero) == 0;
            } else {
                PyObject *en = PyLong_FromSsize_t(e);
                moved = en && PyObject_SetAttr(r, s_start, en) == 0;
                Py_XDECREF(en);
            }
            if (moved) out = PyTuple_Pack(3, h, ns, key);
        }
    }
    PyBuffer_Release(&view);
    Py_XDECREF(h);
    Py_XDECREF(ns);
    Py_XDECREF(key);
    return out;
}

/* ------------------------------------------------------------------ put_run
 * put_run(session, ctx, limit): the data session's common put (ops._put ->
 * DataSession.put_buffered -> Store.put_bytes -> DataSession.send) for a run of up to
 * ``limit`` PUT frames that lie whole in the session's read buffer, in one call; returns
 * how many frames it took. It stops at the first frame it does not take, leaving it
 * unparsed for the Python path (DataSession.advance): another op or flag (a repair
 * write), a partial frame, a size of 0 or past max_value_size, a namespace not in the
 * session's cache of checked ones or a key of another length, a key that holds other
 * bytes (a conflict, an overwrite, a held record), a size with no cached class, a connection or client
 * over its reservation bound, a frame the epoch gate has to look at (another epoch: see
 * there), a namespace the auth guard has not granted the op's scope in its cache (see
 * there), no slot from ``ctx``'s alloc (NoSpace; with an NVMe tier also a slot only an
 * eviction, maybe a demotion, would free: DramTier.alloc_if_free). The session
 * builds ``ctx`` (DataSession.fast_put) only where the Python path would run ops._put,
 * and calls this where advance() has tested its
 * loop's conditions for the first frame; those a put changes (queued bytes and frames,
 * the burst) are tested here before each further one.
 *
 * A put of the bytes stored under its key is answered "stored already" (Store._same, which
 * refreshes the object as put_bytes does). A new key's, in the Python path's order: a
 * slot from DramTier.alloc (which evicts), the
 * payload copied in, its checksum computed over the slot (what a get serves; from NT_MIN
 * bytes over the same bytes in the read buffer, see copy_to_slot) and compared
 * with the header's, Store._publish (index, eviction lists, counters, observer: those
 * rules stay in one place), then the OK answer queued and timed into the put latency
 * histogram as DataSession.send does; the session's ``window`` and ``frame`` are set from
 * the last frame taken as ops._put sets them (the next reads' sizes). A checksum mismatch is counted and its slot freed
 * (Store.put_bytes), and a typed error of _publish (the index full) is answered by the
 * session's reject with the payload skipped (put_buffered); the run stops after either.
 *
 * ctx: see C_* below (built by kvstored/dataplane/session.py, _fast_put_context); the
 * session's own parts (reader, budget, clients, gate, put_latency) are read from it at
 * each call, as its Python does (tests and reloads replace some).
 */
enum { C_INDEX_GET, C_CLASSES, C_ARENA, C_ALLOC, C_FREE, C_PUBLISH, C_COUNTERS,
       C_LIMITS, C_NAMES, C_CHECKSUM, C_NOW, C_BUCKETS, C_OK_HEAD, C_OK_TAIL, C_MISMATCH, C_LARGE, C_WINDOW, C_ERROR, C_SAME,
       C_GUARD, C_SCOPE, C_LEN };

#define OP_PUT 1
#define FLAG_OVERWRITE 1
#define MAX_KEY_LEN 128
#define MAX_BUCKETS 64

static PyObject *s_req_id, *s_put_t0, *s_t_in, *s_window, *s_frame, *s_no_wait_until, *s_sent, *s_queued,
    *s_queued_frames, *s_flushed_at, *s_out, *s_reserved, *s_client, *s_max_reserved_bytes,
    *s_max_queued_bytes, *s_max_queued_frames, *s_burst, *s_cap, *s_held, *s_max_value_size,
    *s_counts, *s_sum, *s_reject, *s_checksum_failures, *s_epoch, *s_reader,
    *s_budget, *s_clients, *s_gate, *s_put_latency, *s_grant, *s_generation, *s_auth, *s_masks,
    *zero_float, *kw_recommit;

static double get_double(PyObject *o, PyObject *name) {
    PyObject *v = PyObject_GetAttr(o, name);
    if (!v) return -1;
    double d = PyFloat_AsDouble(v);
    Py_DECREF(v);
    return d;
}

static int set_ll(PyObject *o, PyObject *name, long long n) {
    PyObject *v = PyLong_FromLongLong(n);
    if (!v) return -1;
    int r = PyObject_SetAttr(o, name, v);
    Py_DECREF(v);
    return r;
}

static int set_double(PyObject *o, PyObject *name, double d) {
    PyObject *v = PyFloat_FromDouble(d);
    if (!v) return -1;
    int r = PyObject_SetAttr(o, name, v);
    Py_DECREF(v);
    return r;
}

/* d[key] += n, d a dict of ints */
static int count(PyObject *d, PyObject *key, long long n) {
    PyObject *v = PyDict_GetItemWithError(d, key);
    if (!v && PyErr_Occurred()) return -1;
    PyObject *k = PyLong_FromLongLong(n);
    if (!k) return -1;
    PyObject *sum = v ? PyNumber_Add(v, k) : (Py_INCREF(k), k);
    Py_DECREF(k);
    if (!sum) return -1;
    int r = PyDict_SetItem(d, key, sum);
    Py_DECREF(sum);
    return r;
}

/* A put's payload into its arena slot. The slot is cold (the arena is far larger than the
   caches, and the slot freed for it is the least recently used one): ordinary stores read
   each line in before writing it, which made this copy 12 % of the daemon's CPU for 64 KiB
   puts; streaming stores write the lines without reading them (64 KiB: ~7.5 -> ~5 us to a
   cold slot here). The bytes then go to memory, not to the cache, so put_run verifies the
   checksum over the source, which the kernel has just written and is in the cache (the same
   bytes). Below NT_MIN the cache is left as it was (small objects read back soon stay hot). */
#define NT_MIN (32 << 10)
static void copy_to_slot(char *dst, const char *src, size_t n) {
#if defined(__SSE2__)
    if (n >= NT_MIN) {
        size_t head = (16 - ((uintptr_t)dst & 15)) & 15;  /* streaming stores are aligned */
        memcpy(dst, src, head);
        size_t i = head;
        for (; i + 64 <= n; i += 64) {
            __m128i a = _mm_loadu_si128((const __m128i *)(src + i));
            __m128i b = _mm_loadu_si128((const __m128i *)(src + i + 16));
            __m128i c = _mm_loadu_si128((const __m128i *)(src + i + 32));
            __m128i d = _mm_loadu_si128((const __m128i *)(src + i + 48));
            _mm_stream_si128((__m128i *)(dst + i), a);
            _mm_stream_si128((__m128i *)(dst + i + 16), b);
            _mm_stream_si128((__m128i *)(dst + i + 32), c);
            _mm_stream_si128((__m128i *)(dst + i + 48), d);
        }
        memcpy(dst + i, src + i, n - i);
        _mm_sfence();  /* ordered before anything after the put (its publish) */
        return;
    }
#endif
    memcpy(dst, src, n);
}

/* what put_run keeps of the session while it runs: read at its start, written back once
   at its end (and before it calls the session's reject) */
typedef struct {
    PyObject *s, *reader, *hist, *out, *counts;
    Py_ssize_t pos, end;
    long long queued, queued_frames, sent, flushed_at;
    double t_in, hist_sum;
    uint64_t rid;        /* the last frame taken */
    uint64_t size;
    Py_ssize_t flen;     /* its frame's length (header, names, payload) */
    int taken, stored;   /* frames taken; puts stored */
    Py_ssize_t large, window;
} Run;

static int write_back(Run *u) {
    if (!u->taken) return 0;
    int ok;
    if (u->pos == u->end)
        ok = PyObject_SetAttr(u->reader, s_start, zero) == 0
             && PyObject_SetAttr(u->reader, s_end, zero) == 0;
    else
        ok = set_ll(u->reader, s_start, u->pos) == 0;
    ok = ok && set_ll(u->s, s_req_id, (long long)u->rid) == 0  /* (no request id is >= 2**63) */
         && set_double(u->s, s_put_t0, u->t_in) == 0
         && set_ll(u->s, s_window, (Py_ssize_t)u->size >= u->large ? u->window : 0) == 0
         && ((Py_ssize_t)u->size >= u->large || set_ll(u->s, s_frame, u->flen) == 0)
         && set_ll(u->s, s_sent, u->sent) == 0
         && set_ll(u->s, s_queued, u->queued) == 0
         && set_ll(u->s, s_queued_frames, u->queued_frames) == 0
         && set_double(u->hist, s_sum, u->hist_sum) == 0;
    if (ok && u->stored)  /* (what _hold does besides counting: put_buffered) */
        ok = PyObject_SetAttr(u->s, s_no_wait_until, zero_float) == 0;
    return ok ? 0 : -1;
}

/* the answer to a stored put: DataSession.send, inlined (out, counts, the histogram) */
static int answer(Run *u, PyObject *ctx, PyObject *now_fn, const double *buckets,
                  Py_ssize_t nbuckets, int dedup) {
    PyObject *frame = PyBytes_FromStringAndSize(NULL, HEADER_SIZE);
    if (!frame) return -1;
    unsigned char *f = (unsigned char *)PyBytes_AS_STRING(frame);
    memcpy(f, PyBytes_AS_STRING(PyTuple_GET_ITEM(ctx, C_OK_HEAD)), 8);
    for (int i = 0; i < 8; i++) f[8 + i] = (unsigned char)(u->rid >> (8 * i));
    memcpy(f + 16, PyBytes_AS_STRING(PyTuple_GET_ITEM(ctx, C_OK_TAIL)), 24);
    if (dedup) f[20] = 1;  /* aux=1: the object was stored already (ops._dedup_response) */
    int r = PyList_Append(u->out, frame);
    Py_DECREF(frame);
    if (r < 0) return -1;
    u->sent += HEADER_SIZE;
    u->queued += HEADER_SIZE;
    u->queued_frames += 1;
    PyObject *t = PyObject_CallNoArgs(now_fn);
    if (!t) return -1;
    double d = PyFloat_AsDouble(t) - u->t_in;
    Py_DECREF(t);
    if (PyErr_Occurred()) return -1;
    Py_ssize_t i = 0;  /* bisect_left: a value equal to a bound falls in that bucket */
    while (i < nbuckets && buckets[i] < d) i++;
    /* (now_fn ran Python: the list's length is tested again, and its item held while
       the add runs, rather than trusted from the run's start) */
    if (i >= PyList_GET_SIZE(u->counts)) {
        PyErr_SetString(PyExc_RuntimeError, "put_run: the put histogram's counts changed length");
        return -1;
    }
    PyObject *c = PyList_GET_ITEM(u->counts, i);
    Py_INCREF(c);
    PyObject *c1 = PyNumber_Add(c, one);
    Py_DECREF(c);
    if (!c1) return -1;
    if (PyList_SetItem(u->counts, i, c1) < 0) return -1;  /* (steals c1; drops the old item) */
    u->hist_sum += d;
    return 0;
}

static PyObject *put_run(PyObject *m, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3 || !PyTuple_Check(args[1]) || PyTuple_GET_SIZE(args[1]) != C_LEN) {
        PyErr_SetString(PyExc_TypeError, "put_run(session, ctx, limit): ctx is the tuple "
                        "DataSession.fast_put holds");
        return NULL;
    }
    PyObject *ctx = args[1];
#define CX(i) PyTuple_GET_ITEM(ctx, i)
    Py_ssize_t limit = PyLong_AsSsize_t(args[2]);
    if (limit == -1 && PyErr_Occurred()) return NULL;
    Run u = {.s = args[0]};
    PyObject *budget = NULL, *clients = NULL, *gate = NULL, *client = NULL, *err = NULL;
    PyObject *masks = NULL;  /* the auth guard's namespace -> scope bits (NULL: auth off) */
    long scope = 0;
    Py_buffer arena = {0}, rbuf = {0};
    PyObject *buf = NULL;
    int failed = 1, have_arena = 0, have_rbuf = 0;
    if (!(u.reader = PyObject_GetAttr(u.s, s_reader))) return NULL;
    PyObject *target = PyObject_GetAttr(u.reader, s_target);
    if (!target) goto done;
    int receiving = target != Py_None;
    Py_DECREF(target);
    if (receiving) goto nothing;
    if ((u.pos = get_index(u.reader, s_start)) == -1 && PyErr_Occurred()) goto done;
    if ((u.end = get_index(u.reader, s_end)) == -1 && PyErr_Occurred()) goto done;
    if (!(buf = PyObject_GetAttr(u.reader, s_buf))) goto done;
    if (!PyByteArray_CheckExact(buf)) goto nothing;
    /* Held and exported for the whole run, as next_frame does: a run calls Python (the
       index, _same, alloc and its evictions, the checksum, _publish, a collection) while
       it reads frames through this pointer; with the export a resize from any of them
       raises BufferError instead of moving the bytes under it. */
    if (PyObject_GetBuffer(buf, &rbuf, PyBUF_SIMPLE) < 0) goto done;
    have_rbuf = 1;
    if (u.pos < 0 || u.end > rbuf.len || u.end < u.pos) {
        PyErr_SetString(PyExc_ValueError, "put_run: the reader's start/end lie outside its buffer");
        goto done;
    }
    {   /* a first look before anything else is read: the calls that take nothing (a GET) */
        const unsigned char *p = (const unsigned char *)rbuf.buf + u.pos;
        if (u.end - u.pos < HEADER_SIZE || p[5] != OP_PUT) goto nothing;
    }
    if (!(budget = PyObject_GetAttr(u.s, s_budget)) || !(clients = PyObject_GetAttr(u.s, s_clients))
            || !(gate = PyObject_GetAttr(u.s, s_gate)) || !(u.hist = PyObject_GetAttr(u.s, s_put_latency)))
        goto done;
    long long max_qbytes, max_qframes, burst, max_reserved, client_cap, max_value, reserved;
    long long epoch;
    long long client_held = 0;
    double buckets[MAX_BUCKETS];
    Py_ssize_t nbuckets = 0;
#define LL(var, o, name) if ((var = get_index(o, name)) == -1 && PyErr_Occurred()) goto done
    LL(u.queued, u.s, s_queued);
    LL(u.queued_frames, u.s, s_queued_frames);
    LL(u.sent, u.s, s_sent);
    LL(u.flushed_at, u.s, s_flushed_at);
    LL(reserved, u.s, s_reserved);
    LL(max_qbytes, budget, s_max_queued_bytes);
    LL(max_qframes, budget, s_max_queued_frames);
    LL(burst, budget, s_burst);
    LL(max_reserved, budget, s_max_reserved_bytes);
    LL(client_cap, clients, s_cap);
    LL(max_value, CX(C_LIMITS), s_max_value_size);
    if ((u.t_in = get_double(u.s, s_t_in)) == -1 && PyErr_Occurred()) goto done;
    /* The epoch gate (policy.EpochGate.check): a put is taken only where it has nothing to
       say, so its answers stay its own: no epoch (0) on either side or the same one. (Its
       lease deadline is checked by advance() before any frame of the batch, this one's
       caller: past it, the node is dropped first and the gate's epoch says so.) */
    LL(epoch, gate, s_epoch);
#undef LL
    if ((u.hist_sum = get_double(u.hist, s_sum)) == -1 && PyErr_Occurred()) goto done;
    if ((u.large = PyLong_AsSsize_t(CX(C_LARGE))) == -1 && PyErr_Occurred()) goto done;
    if ((u.window = PyLong_AsSsize_t(CX(C_WINDOW))) == -1 && PyErr_Occurred()) goto done;
    if (CX(C_GUARD) != Py_None) {
        /* policy.AuthGuard.check, for what it lets pass from its cache: a grant, still of
           the token table's generation (a reload runs between events, never inside a run),
           and the namespace's scope bits cached. A namespace met first, a refusal, a
           reload: the Python path asks the guard, which answers, counts and caches. */
        if ((scope = PyLong_AsLong(CX(C_SCOPE))) == -1 && PyErr_Occurred()) goto done;
        PyObject *g = CX(C_GUARD);
        PyObject *grant = PyObject_GetAttr(g, s_grant);
        if (!grant) goto done;
        int none = grant == Py_None;  /* no token shown: the guard's refusal */
        Py_DECREF(grant);
        if (none) goto nothing;
        PyObject *auth = PyObject_GetAttr(g, s_auth);
        if (!auth) goto done;
        PyObject *mine = PyObject_GetAttr(g, s_generation);
        PyObject *now = mine ? PyObject_GetAttr(auth, s_generation) : NULL;
        Py_DECREF(auth);
        int same = now ? PyObject_RichCompareBool(mine, now, Py_EQ) : -1;
        Py_XDECREF(mine);
        Py_XDECREF(now);
        if (same < 0) goto done;
        if (!same) goto nothing;
        if (!(masks = PyObject_GetAttr(g, s_masks))) goto done;
        if (!PyDict_CheckExact(masks)) {
            PyErr_SetString(PyExc_TypeError, "put_run: AuthGuard.masks is a dict");
            goto done;
        }
    }
    if (!(client = PyObject_GetAttr(u.s, s_client))) goto done;
    int has_client = PyObject_IsTrue(client);
    if (has_client < 0) goto done;
    if (client_cap && has_client) {  /* ClientSpace.admit's test (put_buffered) */
        PyObject *held = PyObject_GetAttr(clients, s_held);
        if (!held) goto done;
        PyObject *v = PyDict_Check(held) ? PyDict_GetItemWithError(held, client) : NULL;
        client_held = v ? PyLong_AsLongLong(v) : 0;
        if (!PyDict_Check(held) && !PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "put_run: ClientSpace.held is a dict");
        Py_DECREF(held);
        if (PyErr_Occurred()) goto done;
    } else {
        client_cap = 0;
    }
    if (!(u.out = PyObject_GetAttr(u.s, s_out))) goto done;
    if (!(u.counts = PyObject_GetAttr(u.hist, s_counts))) goto done;
    PyObject *bt = CX(C_BUCKETS);
    if (!PyList_Check(u.out) || !PyTuple_Check(bt) || PyTuple_GET_SIZE(bt) >= MAX_BUCKETS
            || !PyList_Check(u.counts) || PyList_GET_SIZE(u.counts) != PyTuple_GET_SIZE(bt) + 1
            || !PyBytes_Check(CX(C_OK_HEAD)) || PyBytes_GET_SIZE(CX(C_OK_HEAD)) != 8
            || !PyBytes_Check(CX(C_OK_TAIL)) || PyBytes_GET_SIZE(CX(C_OK_TAIL)) != 24) {
        PyErr_SetString(PyExc_TypeError, "put_run: ctx does not hold what the session builds");
        goto done;
    }
    nbuckets = PyTuple_GET_SIZE(bt);
    for (Py_ssize_t i = 0; i < nbuckets; i++)
        if ((buckets[i] = PyFloat_AsDouble(PyTuple_GET_ITEM(bt, i))) == -1 && PyErr_Occurred())
            goto done;
    if (PyObject_GetBuffer(CX(C_ARENA), &arena, PyBUF_WRITABLE) < 0) goto done;
    have_arena = 1;

    while (u.taken < limit) {
        if (u.taken && (u.queued >= max_qbytes || u.queued_frames >= max_qframes
                        || u.sent - u.flushed_at >= burst))
            break;  /* advance() tests these again and acts (pauses, flushes) */
        const unsigned char *p = (const unsigned char *)rbuf.buf + u.pos;
        if (u.end - u.pos < HEADER_SIZE || memcmp(p, "KVSD", 4) != 0 || p[4] != 1
                || p[5] != OP_PUT || (le(p + 6, 2) & ~(uint64_t)FLAG_OVERWRITE))
            break;
        Py_ssize_t nl = p[18], kl = p[19];
        uint64_t size = le(p + 24, 8), csum = le(p + 32, 8), aux = le(p + 20, 4);
        int overwrite = (int)le(p + 6, 2);
        Py_ssize_t data = u.pos + HEADER_SIZE + nl + kl;
        if (data > u.end || size == 0 || size > (uint64_t)(u.end - data)
                || size > (uint64_t)max_value || kl < 1 || kl > MAX_KEY_LEN)
            break;
        if ((max_reserved && reserved + (long long)size > max_reserved)
                || (client_cap && client_held + (long long)size > client_cap))
            break;  /* over a bound: reserve() answers or waits (put_buffered) */
        if (aux && epoch && aux != (uint64_t)epoch)
            break;  /* the epoch gate would answer Redirect: the Python path does */
        PyObject *ns = NULL, *key = NULL, *sz = NULL, *off = NULL, *got = NULL, *sc = NULL;
        int go = 0;  /* 1: stored; 0: left to the Python path; -1: raised */
        ns = PyBytes_FromStringAndSize((const char *)p + HEADER_SIZE, nl);
        key = PyBytes_FromStringAndSize((const char *)p + HEADER_SIZE + nl, kl);
        sz = PyLong_FromUnsignedLongLong(size);
        if (!ns || !key || !sz) { go = -1; goto put_end; }
        int known = PySet_Contains(CX(C_NAMES), ns);  /* _check_names passed it before */
        if (known != 1) { go = known; goto put_end; }
        if (masks) {  /* granted from the guard's cache, or the guard's to answer */
            PyObject *mask = PyDict_GetItemWithError(masks, ns);  /* (borrowed) */
            if (!mask) { go = PyErr_Occurred() ? -1 : 0; goto put_end; }
            long bits = PyLong_AsLong(mask);
            if (bits == -1 && PyErr_Occurred()) { go = -1; goto put_end; }
            if (!(bits & scope)) goto put_end;  /* refused: the Python path answers */
        }
        /* the class before the lookup: a size met first is the Python path's, which
           then makes the put's one index lookup */
        sc = PyDict_GetItemWithError(CX(C_CLASSES), sz);
        if (!sc) { go = PyErr_Occurred() ? -1 : 0; goto put_end; }
        Py_INCREF(sc);  /* (held from here: the lookup and _same below run Python) */
        PyObject *nk[2] = {ns, key};
        PyObject *old = PyObject_Vectorcall(CX(C_INDEX_GET), nk, 2, NULL);
        if (!old) { go = -1; goto put_end; }
        if (old != Py_None) {  /* stored already: these bytes (Store._same) or a conflict */
            PyObject *cs = PyLong_FromUnsignedLongLong(csum);
            /* (recommit by name: a client's put; a change of _same's parameters fails
               loudly here rather than passing a flag where another argument now is) */
            PyObject *sa[4] = {old, sz, cs, Py_True};
            PyObject *same = cs ? PyObject_Vectorcall(CX(C_SAME), sa, 3, kw_recommit) : NULL;
            Py_DECREF(old);
            Py_XDECREF(cs);
            if (!same) { go = -1; goto put_end; }
            Py_DECREF(same);
            if (same != Py_True) goto put_end;  /* a conflict or an overwrite: Python */
            u.taken++;  /* answered from the index: the payload is skipped */
            u.rid = le(p + 8, 8);
            u.size = size;
            u.flen = HEADER_SIZE + nl + kl + (Py_ssize_t)size;
            u.pos = data + (Py_ssize_t)size;
            u.stored++;
            go = answer(&u, ctx, CX(C_NOW), buckets, nbuckets, 1) < 0 ? -1 : 1;
            goto put_end;
        }
        Py_DECREF(old);
        off = PyObject_CallOneArg(CX(C_ALLOC), sc);  /* may evict (Python) */
        if (!off || off == Py_None) {  /* no slot: the Python path's alloc evicts, or _slot
                                          counts and raises NoSpace */
            go = off ? 0 : -1;
            goto put_end;
        }
        Py_ssize_t o = PyLong_AsSsize_t(off);
        if (o < 0 || (uint64_t)o > (uint64_t)arena.len || size > (uint64_t)(arena.len - o)) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_RuntimeError, "put_run: a slot outside the arena");
            go = -1;
            goto put_end;
        }
        const char *src = (const char *)p + HEADER_SIZE + nl + kl;
        copy_to_slot((char *)arena.buf + o, src, (size_t)size);
        /* the checksum of the bytes just copied, read where they are in the cache: the
           slot below NT_MIN, else the source, which holds the same bytes (copy_to_slot);
           nothing but the checksum function runs before the buffer is read */
        PyObject *mv = PyMemoryView_FromMemory(
            size >= NT_MIN ? (char *)src : (char *)arena.buf + o, (Py_ssize_t)size, PyBUF_READ);
        got = mv ? PyObject_CallOneArg(CX(C_CHECKSUM), mv) : NULL;
        Py_XDECREF(mv);
        unsigned long long actual = got ? PyLong_AsUnsignedLongLong(got) : 0;
        if (!got || PyErr_Occurred()) {
            PyObject *f = PyObject_CallOneArg(CX(C_FREE), off);  /* the slot is not kept */
            Py_XDECREF(f);
            go = -1;
            goto put_end;
        }
        /* the frame is this put's from here: its header is consumed (an error answered
           by reject skips the payload) */
        u.taken++;
        u.rid = le(p + 8, 8);
        u.size = size;
        u.flen = HEADER_SIZE + nl + kl + (Py_ssize_t)size;
        u.pos = data;
        if (actual != csum) {  /* Store.put_bytes: counted, the slot freed, nothing stored */
            PyObject *f = PyObject_CallOneArg(CX(C_FREE), off);
            if (!f || count(CX(C_COUNTERS), s_checksum_failures, 1) < 0) {
                Py_XDECREF(f);
                go = -1;
                goto put_end;
            }
            Py_DECREF(f);
            err = PyObject_CallNoArgs(CX(C_MISMATCH));
            go = err ? 0 : -1;
            goto put_end;
        }
        PyObject *pa[8] = {ns, key, off, sz, got, sc, overwrite ? Py_True : Py_False, Py_True};
        PyObject *stored = PyObject_Vectorcall(CX(C_PUBLISH), pa, 7, kw_recommit);
        if (!stored) {  /* a typed error (the index full) is answered; the slot is freed */
            if (PyErr_ExceptionMatches(CX(C_ERROR))) {
                PyObject *t, *v, *tb;
                PyErr_Fetch(&t, &v, &tb);
                PyErr_NormalizeException(&t, &v, &tb);
                Py_XDECREF(t);
                Py_XDECREF(tb);
                err = v;
                go = err ? 0 : -1;
            } else {
                go = -1;
            }
            goto put_end;
        }
        int dedup = stored == Py_False;  /* (a key taken meanwhile: _publish's race) */
        Py_DECREF(stored);
        u.pos = data + (Py_ssize_t)size;  /* the payload is taken from the buffer */
        u.stored++;
        go = answer(&u, ctx, CX(C_NOW), buckets, nbuckets, dedup) < 0 ? -1 : 1;
    put_end:
        Py_XDECREF(ns);
        Py_XDECREF(key);
        Py_XDECREF(sz);
        Py_XDECREF(off);
        Py_XDECREF(got);
        Py_XDECREF(sc);
        if (go < 0) goto done;
        if (go == 0) break;
    }
nothing:
    failed = 0;
done:
    if (have_arena) PyBuffer_Release(&arena);
    if (have_rbuf) PyBuffer_Release(&rbuf);
    Py_XDECREF(buf);
    if (failed) {  /* raised: what was taken is written back, the error stays raised */
        PyObject *t, *v, *tb;
        PyErr_Fetch(&t, &v, &tb);
        write_back(&u);
        PyErr_Restore(t, v, tb);
    } else if (write_back(&u) < 0) {
        failed = 1;
    } else if (err != NULL) {  /* put_buffered's answer to a refused put, the payload skipped */
        PyObject *op = PyLong_FromLong(OP_PUT);
        PyObject *rid = PyLong_FromUnsignedLongLong(u.rid);
        PyObject *plen = PyLong_FromUnsignedLongLong(u.size);
        PyObject *r = op && rid && plen
            ? PyObject_CallMethodObjArgs(u.s, s_reject, op, rid, plen, err, NULL) : NULL;
        Py_XDECREF(op);
        Py_XDECREF(rid);
        Py_XDECREF(plen);
        Py_XDECREF(r);
        failed = r == NULL;
    }
    Py_XDECREF(err);
    Py_XDECREF(client);
    Py_XDECREF(u.out);
    Py_XDECREF(u.counts);
    Py_XDECREF(u.hist);
    Py_XDECREF(u.reader);
    Py_XDECREF(budget);
    Py_XDECREF(clients);
    Py_XDECREF(gate);
    Py_XDECREF(masks);
    return failed ? NULL : PyLong_FromLong(u.taken);
#undef CX
}

static PyMethodDef mod_methods[] = {
    {"next_frame", (PyCFunction)(void (*)(void))next_frame, METH_FASTCALL,
     "next_frame(reader, header_type): reader.next() of a kvstore.wire.FrameReader, in C "
     "(a bad magic or version: reader.next() itself raises the FrameError)"},
    {"put_run", (PyCFunction)(void (*)(void))put_run, METH_FASTCALL,
     "put_run(session, ctx, limit): up to limit whole buffered PUT frames stored and answered "
     "in one call (see native/frame.c); how many it took"},
    {NULL}
};

static struct PyModuleDef moddef = {
    PyModuleDef_HEAD_INIT, "kvstored._frame",
    "The daemon's frame parser (native/frame.c; kvstored/dataplane/session.py).", -1, mod_methods,
};

PyMODINIT_FUNC PyInit__frame(void) {
    s_buf = PyUnicode_InternFromString("buf");
    s_start = PyUnicode_InternFromString("start");
    s_end = PyUnicode_InternFromString("end");
    s_target = PyUnicode_InternFromString("target");
    s_next = PyUnicode_InternFromString("next");
    zero = PyLong_FromLong(0);
    one = PyLong_FromLong(1);
    zero_float = PyFloat_FromDouble(0.0);
    if (!s_buf || !s_start || !s_end || !s_target || !s_next || !zero || !one || !zero_float)
        return NULL;
    struct { PyObject **p; const char *name; } names[] = {
        {&s_req_id, "req_id"}, {&s_put_t0, "put_t0"}, {&s_t_in, "t_in"}, {&s_window, "window"},
        {&s_frame, "frame"},
        {&s_no_wait_until, "no_wait_until"}, {&s_sent, "sent"}, {&s_queued, "queued"},
        {&s_queued_frames, "queued_frames"}, {&s_flushed_at, "flushed_at"}, {&s_out, "out"},
        {&s_reserved, "reserved"}, {&s_client, "client"},
        {&s_max_reserved_bytes, "max_reserved_bytes"}, {&s_max_queued_bytes, "max_queued_bytes"},
        {&s_max_queued_frames, "max_queued_frames"}, {&s_burst, "burst"}, {&s_cap, "cap"},
        {&s_held, "held"}, {&s_max_value_size, "max_value_size"}, {&s_counts, "counts"},
        {&s_sum, "sum"}, {&s_reject, "reject"}, {&s_checksum_failures, "checksum_failures"},
        {&s_epoch, "epoch"}, {&s_reader, "reader"},
        {&s_budget, "budget"}, {&s_clients, "clients"}, {&s_gate, "gate"},
        {&s_put_latency, "put_latency"}, {&s_grant, "grant"}, {&s_generation, "generation"},
        {&s_auth, "auth"}, {&s_masks, "masks"},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (!(*names[i].p = PyUnicode_InternFromString(names[i].name))) return NULL;
    if (!(kw_recommit = Py_BuildValue("(s)", "recommit"))) return NULL;
    return PyModule_Create(&moddef);
}
