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
 * by one, no unaligned loads, no ISA extensions.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define HEADER_SIZE 40

static PyObject *s_buf, *s_start, *s_end, *s_target, *s_next, *zero;

static uint64_t le(const unsigned char *p, int n) {
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}

/* reader.<name> as a Py_ssize_t (-1 with an error set on failure) */
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

static PyMethodDef mod_methods[] = {
    {"next_frame", (PyCFunction)(void (*)(void))next_frame, METH_FASTCALL,
     "next_frame(reader, header_type): reader.next() of a kvstore.wire.FrameReader, in C "
     "(a bad magic or version: reader.next() itself raises the FrameError)"},
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
    if (!s_buf || !s_start || !s_end || !s_target || !s_next || !zero) return NULL;
    return PyModule_Create(&moddef);
}
