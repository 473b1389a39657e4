/*
 * kvstored._uring: a small io_uring binding for the NVMe tier (kvstored/engine/nvmeio.py).
 *
 * Why our own: the PyPI `liburing` wheel (2026.3.30) executes AVX-512 instructions and dies
 * with SIGILL on CPUs without them (AMD EPYC Milan and most x86-64-v3 machines). This file
 * links the system liburing (Debian: liburing-dev) and is compiled for the build machine's
 * baseline ISA, so it runs wherever CPython does. It exposes only what the tier needs:
 * vectored positional reads and writes, an eventfd for completions, and reaping.
 *
 * Lifetime rule: every submitted op holds Py_buffer views of its buffers (and so a
 * reference to their owners) until its completion is reaped, so the kernel never writes
 * into memory Python has freed. A ring with ops in flight waits for them before it is
 * torn down (close() or dealloc), with the GIL released.
 *
 * Re-entry rule: releasing an op's buffers can run Python (the owner's __del__, or the GC), and
 * that Python may call back into this ring: reap, wait, prep, even close it. So completions are
 * moved off the completion queue into C memory, with no Python run, before any buffer is
 * released (reap_ready). Threads: wait() and the drain of close() block with the GIL released;
 * while one does, another thread's close() would unmap the ring under it, and another thread's
 * reap() or wait() could take the completions it waits for (liburing's wait then goes back to
 * sleep for completions that may never come): all three are refused with a RuntimeError. The
 * NVMe tier uses a ring from one thread; a caller with several serialises them itself.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <liburing.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>

typedef struct {
    unsigned long long user_data; /* the caller's id, returned by reap() */
    Py_ssize_t nbufs;
    struct iovec *iov;
    Py_buffer *views;
} uring_op;

typedef struct {
    PyObject_HEAD
    struct io_uring ring;
    int open;
    Py_ssize_t inflight;
    unsigned entries;
    int blocked; /* threads inside a GIL-released wait on this ring: close() must not unmap it */
    int fail_errno;       /* tests only (_fail_submits): wait()'s next submits fail with this */
    unsigned fail_count;
} RingObject;

/* wait()'s submit: io_uring_submit, or the error a test asked for (_fail_submits): the
 * kernel's -EAGAIN / -EBUSY cannot be provoked on demand. */
static int wait_submit(RingObject *self) {
    if (self->fail_count) {
        self->fail_count--;
        return -self->fail_errno;
    }
    return io_uring_submit(&self->ring);
}

/* How long wait() retries a submit the kernel takes none of (-EAGAIN: no memory for the
 * request; -EBUSY: completions it cannot post) before it raises, when nothing it already
 * took could complete meanwhile. */
#define SUBMIT_RETRIES 200
#define SUBMIT_RETRY_NS (5 * 1000 * 1000)

static void op_free(uring_op *op) {
    for (Py_ssize_t i = 0; i < op->nbufs; i++)
        PyBuffer_Release(&op->views[i]);
    PyMem_Free(op->views);
    PyMem_Free(op->iov);
    PyMem_Free(op);
}

static PyObject *raise_errno(int err, const char *what) {
    errno = err;
    return PyErr_SetFromErrnoWithFilename(PyExc_OSError, what);
}

static int Ring_init(RingObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"entries", NULL};
    unsigned entries = 64;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|I", kwlist, &entries))
        return -1;
    if (entries < 1 || entries > 32768) {
        PyErr_SetString(PyExc_ValueError, "entries must be 1..32768");
        return -1;
    }
    if (self->open) {
        PyErr_SetString(PyExc_RuntimeError, "ring already initialised");
        return -1;
    }
    int rc = io_uring_queue_init(entries, &self->ring, 0);
    if (rc < 0) {
        raise_errno(-rc, "io_uring_queue_init");
        return -1;
    }
    self->open = 1;
    self->inflight = 0;
    self->entries = entries;
    return 0;
}

static int check_open(RingObject *self) {
    if (!self->open) {
        PyErr_SetString(PyExc_ValueError, "ring is closed");
        return 0;
    }
    return 1;
}

/* reap() and wait() (close(): ring_teardown) while another thread blocks in a wait: see the
 * threads rule at the top. blocked is changed only with the GIL held, so this test is exact. */
static int check_no_waiter(RingObject *self, const char *what) {
    if (self->blocked > 0) {
        PyErr_Format(PyExc_RuntimeError, "ring is being waited on in another thread: %s it after "
                     "that wait returns (one thread at a time may wait on or reap a ring)", what);
        return 0;
    }
    return 1;
}

typedef struct {
    uring_op *op;
    int res;
} reaped_op;

/* Turn completed CQEs into a list of (user_data, res), releasing each op's buffers.
 * First the ready CQEs are copied into a C array and the queue advanced, with no Python run (no
 * Python object is made, so not even the GC): the ring is then consistent, and the Python that
 * building the list or releasing a buffer may run (see the re-entry rule) finds every one of
 * these completions already taken. A MemoryError while building the list loses these results;
 * their buffers are still released. */
static PyObject *reap_ready(RingObject *self) {
    unsigned ready = io_uring_cq_ready(&self->ring);
    if (ready == 0)
        return PyList_New(0);
    reaped_op *batch = PyMem_Malloc((size_t)ready * sizeof(reaped_op)); /* runs no Python */
    if (batch == NULL)
        return PyErr_NoMemory(); /* nothing taken: the completions wait for the next reap */
    struct io_uring_cqe *cqe;
    unsigned head, seen = 0;
    Py_ssize_t n = 0;
    io_uring_for_each_cqe(&self->ring, head, cqe) {
        if (seen == ready)
            break;
        seen++;
        uring_op *op = (uring_op *)io_uring_cqe_get_data(cqe);
        if (op == NULL)
            continue; /* the no-op that stands in for a failed prep */
        batch[n].op = op;
        batch[n].res = cqe->res;
        n++;
    }
    io_uring_cq_advance(&self->ring, seen);
    self->inflight -= n;
    /* From here Python may run, and may use or close this ring. */
    PyObject *out = PyList_New(n);
    for (Py_ssize_t i = 0; out != NULL && i < n; i++) {
        PyObject *t = Py_BuildValue("(Ki)", batch[i].op->user_data, batch[i].res);
        if (t == NULL)
            Py_CLEAR(out);
        else
            PyList_SET_ITEM(out, i, t);
    }
    PyObject *et, *ev, *tb; /* an owner's __del__ must not run with our error set */
    PyErr_Fetch(&et, &ev, &tb);
    for (Py_ssize_t i = 0; i < n; i++)
        op_free(batch[i].op);
    PyMem_Free(batch);
    PyErr_Restore(et, ev, tb);
    return out;
}

/* Block (GIL released) until every op in flight has completed; drop their results. Ops
 * prepped and not yet submitted are submitted first (else they would never complete). Waits in
 * short slices: another thread may reap the last completion while this one is not looking. */
static void drain_all(RingObject *self) {
    while (self->open && self->inflight > 0) {
        struct io_uring_cqe *cqe = NULL;
        struct __kernel_timespec slice = {.tv_sec = 0, .tv_nsec = 100 * 1000 * 1000};
        int rc = io_uring_submit(&self->ring);
        if (rc < 0 && rc != -EINTR && rc != -EAGAIN && rc != -EBUSY)
            break; /* ring unusable: leak the views rather than free memory under the kernel */
        self->blocked++;
        Py_BEGIN_ALLOW_THREADS
        rc = io_uring_wait_cqe_timeout(&self->ring, &cqe, &slice);
        Py_END_ALLOW_THREADS
        self->blocked--;
        if (rc < 0 && rc != -EINTR && rc != -EAGAIN && rc != -ETIME)
            break; /* ring unusable: leak the views rather than free memory under the kernel */
        PyObject *done = reap_ready(self);
        if (done == NULL)
            PyErr_Clear();
        Py_XDECREF(done);
    }
}

/* close() and dealloc: drain, then unmap, unless Python run by the drain closed it already. */
static int ring_teardown(RingObject *self) {
    if (!check_no_waiter(self, "close"))
        return -1;
    drain_all(self);
    if (!check_no_waiter(self, "close")) /* another thread began a wait while this one drained */
        return -1;
    if (self->open) {
        io_uring_queue_exit(&self->ring);
        self->open = 0;
    }
    return 0;
}

static PyObject *Ring_prep(RingObject *self, PyObject *args) {
    int write, fd;
    long long offset;
    unsigned long long user_data;
    PyObject *bufs;
    if (!PyArg_ParseTuple(args, "piLOK", &write, &fd, &offset, &bufs, &user_data))
        return NULL;
    if (!check_open(self))
        return NULL;
    if (offset < 0) {
        PyErr_SetString(PyExc_ValueError, "offset must be >= 0");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(bufs, "bufs must be a sequence of buffers");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n < 1 || n > IOV_MAX) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "bufs must hold 1..%d buffers", IOV_MAX);
        return NULL;
    }
    struct io_uring_sqe *sqe = io_uring_get_sqe(&self->ring);
    if (sqe == NULL) { /* submission queue full: the caller submits and retries later */
        Py_DECREF(seq);
        Py_RETURN_FALSE;
    }
    uring_op *op = PyMem_Calloc(1, sizeof(uring_op));
    if (op == NULL) {
        Py_DECREF(seq);
        io_uring_prep_nop(sqe); /* the sqe is taken: complete it as a no-op */
        io_uring_sqe_set_data(sqe, NULL);
        return PyErr_NoMemory();
    }
    op->user_data = user_data;
    op->iov = PyMem_Calloc((size_t)n, sizeof(struct iovec));
    op->views = PyMem_Calloc((size_t)n, sizeof(Py_buffer));
    if (op->iov == NULL || op->views == NULL) {
        op_free(op);
        Py_DECREF(seq);
        io_uring_prep_nop(sqe);
        io_uring_sqe_set_data(sqe, NULL);
        return PyErr_NoMemory();
    }
    int flags = write ? PyBUF_SIMPLE : PyBUF_WRITABLE;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(seq, i), &op->views[i],
                               flags | PyBUF_C_CONTIGUOUS) < 0) {
            op_free(op);
            Py_DECREF(seq);
            io_uring_prep_nop(sqe);
            io_uring_sqe_set_data(sqe, NULL);
            return NULL;
        }
        op->nbufs = i + 1;
        op->iov[i].iov_base = op->views[i].buf;
        op->iov[i].iov_len = (size_t)op->views[i].len;
    }
    Py_DECREF(seq);
    if (write)
        io_uring_prep_writev(sqe, fd, op->iov, (unsigned)n, (__u64)offset);
    else
        io_uring_prep_readv(sqe, fd, op->iov, (unsigned)n, (__u64)offset);
    io_uring_sqe_set_data(sqe, op);
    self->inflight++;
    Py_RETURN_TRUE;
}

static PyObject *Ring_submit(RingObject *self, PyObject *Py_UNUSED(ignored)) {
    if (!check_open(self))
        return NULL;
    int rc = io_uring_submit(&self->ring);
    if (rc < 0)
        return raise_errno(-rc, "io_uring_submit");
    return PyLong_FromLong(rc);
}

static PyObject *Ring_reap(RingObject *self, PyObject *Py_UNUSED(ignored)) {
    if (!check_open(self) || !check_no_waiter(self, "reap"))
        return NULL;
    return reap_ready(self);
}

static PyObject *Ring_wait(RingObject *self, PyObject *args) {
    unsigned want = 1;
    if (!PyArg_ParseTuple(args, "|I", &want))
        return NULL;
    if (!check_open(self) || !check_no_waiter(self, "wait on"))
        return NULL;
    if (want > (unsigned)self->inflight)
        want = (unsigned)self->inflight;
    for (unsigned tries = 0; want > 0; tries++) {
        struct io_uring_cqe *cqe = NULL;
        int rc;
        /* Ops prepped and not yet submitted count in inflight: submitted first, or a wait
         * for them would never return (Python run by a released buffer's owner during the
         * last reap may have queued one, as drain_all also allows for) */
        if (io_uring_sq_ready(&self->ring)) {
            rc = wait_submit(self);
            if (rc < 0 && rc != -EINTR && rc != -EAGAIN && rc != -EBUSY)
                return raise_errno(-rc, "io_uring_submit");
        }
        /* Only what the kernel took can complete: a submit it refused (-EAGAIN, -EBUSY) leaves
         * ops in the queue, and waiting for them too would block for ever. */
        unsigned queued = io_uring_sq_ready(&self->ring);
        unsigned taken = (unsigned)self->inflight > queued ? (unsigned)self->inflight - queued : 0;
        if (taken == 0) {
            if (tries >= SUBMIT_RETRIES)
                return PyErr_Format(PyExc_BlockingIOError, "io_uring_submit: the kernel took none "
                                    "of %u queued ops in %u tries; they stay queued", queued, tries);
            struct timespec pause = {.tv_sec = 0, .tv_nsec = SUBMIT_RETRY_NS};
            self->blocked++;  /* a waiter still: another thread's close/reap/wait is refused */
            Py_BEGIN_ALLOW_THREADS
            nanosleep(&pause, NULL);
            Py_END_ALLOW_THREADS
            self->blocked--;
            continue;
        }
        self->blocked++;
        Py_BEGIN_ALLOW_THREADS
        rc = io_uring_wait_cqe_nr(&self->ring, &cqe, want < taken ? want : taken);
        Py_END_ALLOW_THREADS
        self->blocked--;
        if (rc < 0 && rc != -EINTR)
            return raise_errno(-rc, "io_uring_wait_cqe");
        break;
    }
    return reap_ready(self);
}

/* _fail_submits(errno, count): tests only. wait()'s next count submits fail with -errno, as the
 * kernel's would under memory pressure (EAGAIN) or a full completion queue (EBUSY). */
static PyObject *Ring_fail_submits(RingObject *self, PyObject *args) {
    int err;
    unsigned count;
    if (!PyArg_ParseTuple(args, "iI", &err, &count))
        return NULL;
    if (err <= 0)
        return PyErr_Format(PyExc_ValueError, "_fail_submits: errno must be positive, not %d", err);
    self->fail_errno = err;
    self->fail_count = count;
    Py_RETURN_NONE;
}

static PyObject *Ring_register_eventfd(RingObject *self, PyObject *args) {
    int efd;
    if (!PyArg_ParseTuple(args, "i", &efd))
        return NULL;
    if (!check_open(self))
        return NULL;
    int rc = io_uring_register_eventfd(&self->ring, efd);
    if (rc < 0)
        return raise_errno(-rc, "io_uring_register_eventfd");
    Py_RETURN_NONE;
}

static PyObject *Ring_close(RingObject *self, PyObject *Py_UNUSED(ignored)) {
    if (self->open && ring_teardown(self) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Ring_get_inflight(RingObject *self, void *closure) {
    return PyLong_FromSsize_t(self->inflight);
}

static PyObject *Ring_get_entries(RingObject *self, void *closure) {
    return PyLong_FromUnsignedLong(self->entries);
}

static void Ring_dealloc(RingObject *self) {
    /* no thread can be waiting: a wait holds a reference to the ring */
    if (self->open && ring_teardown(self) < 0)
        PyErr_WriteUnraisable((PyObject *)self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Ring_methods[] = {
    {"prep", (PyCFunction)Ring_prep, METH_VARARGS,
     "prep(write, fd, offset, bufs, user_data) -> bool: queue a readv/writev of bufs at offset; "
     "False when the submission queue is full (submit, then retry)."},
    {"submit", (PyCFunction)Ring_submit, METH_NOARGS, "submit() -> int: hand queued ops to the kernel."},
    {"reap", (PyCFunction)Ring_reap, METH_NOARGS,
     "reap() -> [(user_data, res)]: completions ready now (res < 0 is -errno)."},
    {"wait", (PyCFunction)Ring_wait, METH_VARARGS,
     "wait(n=1) -> [(user_data, res)]: submit what is queued, block (GIL released) for n "
     "completions, then reap."},
    {"_fail_submits", (PyCFunction)Ring_fail_submits, METH_VARARGS,
     "_fail_submits(errno, count): tests only; wait()'s next count submits fail with -errno."},
    {"register_eventfd", (PyCFunction)Ring_register_eventfd, METH_VARARGS,
     "register_eventfd(fd): the kernel signals fd on every completion."},
    {"close", (PyCFunction)Ring_close, METH_NOARGS,
     "close(): wait for ops in flight, then tear the ring down."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Ring_getset[] = {
    {"inflight", (getter)Ring_get_inflight, NULL, "ops submitted and not yet reaped", NULL},
    {"entries", (getter)Ring_get_entries, NULL, "submission queue size", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject RingType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kvstored._uring.Ring",
    .tp_basicsize = sizeof(RingObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Ring(entries=64): an io_uring instance for vectored positional I/O.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Ring_init,
    .tp_dealloc = (destructor)Ring_dealloc,
    .tp_methods = Ring_methods,
    .tp_getset = Ring_getset,
};

static struct PyModuleDef uring_module = {
    PyModuleDef_HEAD_INIT, "kvstored._uring",
    "io_uring through the system liburing, built for any x86-64 CPU (see native/uring.c).",
    -1, NULL,
};

PyMODINIT_FUNC PyInit__uring(void) {
    if (PyType_Ready(&RingType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&uring_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&RingType);
    if (PyModule_AddObject(m, "Ring", (PyObject *)&RingType) < 0) {
        Py_DECREF(&RingType);
        Py_DECREF(m);
        return NULL;
    }
    PyModule_AddStringConstant(m, "LIBURING", "system");
    return m;
}
