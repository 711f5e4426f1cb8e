/* apptrace._frames: build StackFrame tuples from the columns that
 * apptrace._blazepack flattens a blazesym result into.
 *
 * Why C: on addresses it has not seen, the Python loops that turn columns
 * into frames cost about 1 us per address, twice the blazesym lookup. Here a
 * frame costs one allocation. Frames and the per-address tuples that hold
 * them are untracked by the cyclic garbage collector: a frame holds ints and
 * one shared, immutable _Where record, so it can never be part of a cycle,
 * and tens of thousands of tracked frames made every later collection walk
 * them (a tenth of the time of a batch).
 *
 * Built by apptrace/_blazepack_build.py (`make blazepack`); optional:
 * apptrace.symbolize falls back to the Python loops without it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

/* A tuple subclass instance of `cls` with 4 items, untracked. The frames
   of one address (inlined calls, then the function) share its int. */
static PyObject *new_frame(PyTypeObject *cls, PyObject *a, uint64_t offset, uint32_t line,
                           PyObject *where)
{
    PyObject *f = cls->tp_alloc(cls, 4), *o, *l;

    if (f == NULL)
        return NULL;
    Py_INCREF(a);
    o = PyLong_FromUnsignedLongLong(offset);
    l = PyLong_FromUnsignedLong(line);
    if (o == NULL || l == NULL) {
        Py_DECREF(a);
        Py_XDECREF(o);
        Py_XDECREF(l);
        Py_DECREF(f);
        return NULL;
    }
    Py_INCREF(where);
    PyTuple_SET_ITEM(f, 0, a);
    PyTuple_SET_ITEM(f, 1, o);
    PyTuple_SET_ITEM(f, 2, l);
    PyTuple_SET_ITEM(f, 3, where);
    PyObject_GC_UnTrack(f);
    return f;
}

/* build(cls, n_frames, addrs, offsets, lines, where_ids, wheres,
 *       n_groups, groups, keys, keys_in, into)
 *
 * Pointers are passed as integers (cffi's addresses of the columns).
 * Group g holds the next groups[g] frames (innermost first) and belongs to
 * keys_in[keys[g]]. With `into` a dict, each group goes in it under that
 * key and None is returned; otherwise the list of groups in order. */
static PyObject *build(PyObject *self, PyObject *args)
{
    PyObject *cls_obj, *wheres, *keys_in, *into, *out = NULL, *addr = NULL;
    unsigned long long p_addrs, p_offsets, p_lines, p_where_ids, p_groups, p_keys;
    Py_ssize_t nf, cnt, k = 0, g, nwhere;
    const uint64_t *addrs, *offsets, *keys;
    const uint32_t *lines, *where_ids, *groups;
    PyTypeObject *cls;

    (void)self;
    if (!PyArg_ParseTuple(args, "OnKKKKO!nKKOO", &cls_obj, &nf, &p_addrs, &p_offsets, &p_lines,
                          &p_where_ids, &PyList_Type, &wheres, &cnt, &p_groups, &p_keys,
                          &keys_in, &into))
        return NULL;
    if (!PyType_Check(cls_obj) || !PyType_IsSubtype((PyTypeObject *)cls_obj, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "cls must be a tuple subclass");
        return NULL;
    }
    if (into != Py_None && !PyDict_Check(into)) {
        PyErr_SetString(PyExc_TypeError, "into must be a dict or None");
        return NULL;
    }
    if (!PySequence_Check(keys_in)) {
        PyErr_SetString(PyExc_TypeError, "keys_in must be a sequence");
        return NULL;
    }
    cls = (PyTypeObject *)cls_obj;
    addrs = (const uint64_t *)(uintptr_t)p_addrs;
    offsets = (const uint64_t *)(uintptr_t)p_offsets;
    lines = (const uint32_t *)(uintptr_t)p_lines;
    where_ids = (const uint32_t *)(uintptr_t)p_where_ids;
    groups = (const uint32_t *)(uintptr_t)p_groups;
    keys = (const uint64_t *)(uintptr_t)p_keys;
    nwhere = PyList_GET_SIZE(wheres);
    if (into == Py_None && (out = PyList_New(cnt)) == NULL)
        return NULL;
    for (g = 0; g < cnt; g++) {
        Py_ssize_t n = groups[g], j;
        PyObject *group;

        if (n < 0 || k + n > nf) {
            PyErr_SetString(PyExc_ValueError, "group sizes exceed the frame count");
            goto fail;
        }
        if ((group = PyTuple_New(n)) == NULL)
            goto fail;
        for (j = 0; j < n; j++, k++) {
            PyObject *f;

            if (where_ids[k] >= (uint32_t)nwhere) {
                PyErr_SetString(PyExc_ValueError, "frame names an unknown function record");
                Py_DECREF(group);
                goto fail;
            }
            if (j == 0 || addrs[k] != addrs[k - 1]) {
                Py_XDECREF(addr);
                if ((addr = PyLong_FromUnsignedLongLong(addrs[k])) == NULL) {
                    Py_DECREF(group);
                    goto fail;
                }
            }
            f = new_frame(cls, addr, offsets[k], lines[k], PyList_GET_ITEM(wheres, where_ids[k]));
            if (f == NULL) {
                Py_DECREF(group);
                goto fail;
            }
            PyTuple_SET_ITEM(group, j, f);
        }
        PyObject_GC_UnTrack(group);
        if (out != NULL) {
            PyList_SET_ITEM(out, g, group);
        } else {
            PyObject *key = PySequence_GetItem(keys_in, (Py_ssize_t)keys[g]);
            int rc;

            if (key == NULL) {
                Py_DECREF(group);
                goto fail;
            }
            rc = PyDict_SetItem(into, key, group);
            Py_DECREF(key);
            Py_DECREF(group);
            if (rc != 0)
                goto fail;
        }
    }
    Py_XDECREF(addr);
    if (out != NULL)
        return out;
    Py_RETURN_NONE;
fail:
    Py_XDECREF(addr);
    Py_XDECREF(out);
    return NULL;
}

static PyMethodDef methods[] = {
    {"build", build, METH_VARARGS,
     "Frames grouped per address from _blazepack's columns (see the C source)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "apptrace._frames",
    "StackFrame tuples built in C from flattened blazesym results.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__frames(void)
{
    return PyModule_Create(&module);
}
