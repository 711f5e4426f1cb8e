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
 * plan() and fill() do the result cache's bookkeeping for a batch in one
 * pass each (which addresses are cached, the distinct new ones sorted); in
 * Python, set, difference, sort and a final dict pass cost about as much as
 * blazesym's own lookup.
 *
 * Built by apptrace/_blazepack_build.py (`make blazepack`); optional:
 * apptrace.symbolize falls back to the Python loops without it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

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

/* An address still to look up and where it came from in the caller's list. */
struct at_todo {
    uint64_t value;
    uint32_t index;
};

/* Stable LSD radix sort by value, a byte at a time; passes whose byte is
   the same everywhere (the high bytes of user addresses) are skipped. */
static int sort_todo(struct at_todo *a, Py_ssize_t n)
{
    struct at_todo *tmp, *src = a, *dst;
    Py_ssize_t count[256], i;
    int shift;

    if (n < 2)
        return 0;
    if ((tmp = PyMem_Malloc((size_t)n * sizeof *tmp)) == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    dst = tmp;
    for (shift = 0; shift < 64; shift += 8) {
        Py_ssize_t sum = 0;
        int skip = 0;

        memset(count, 0, sizeof count);
        for (i = 0; i < n; i++)
            count[(src[i].value >> shift) & 0xff]++;
        for (i = 0; i < 256; i++) {
            Py_ssize_t c = count[i];
            if (c == n)
                skip = 1;
            count[i] = sum;
            sum += c;
        }
        if (skip)
            continue;
        for (i = 0; i < n; i++)
            dst[count[(src[i].value >> shift) & 0xff]++] = src[i];
        dst = src;
        src = src == a ? tmp : a;
    }
    if (src != a)
        memcpy(a, src, (size_t)n * sizeof *a);
    PyMem_Free(tmp);
    return 0;
}

/* plan(addrs, known, adjust) -> (out, values, adj, keys, order)
 *
 * One pass over a batch of addresses for apptrace.symbolize's result cache:
 * out[i] is known[addrs[i]] where the cache has it and None elsewhere;
 * values (uint64 in native order) are the distinct other addresses,
 * ascending (blazesym is faster so), each minus adj[u]: `adjust` (1 looks a
 * return address up one byte early), or 0 for an address below it (0 is no
 * return address: junk in a stack walked without frame pointers; it is
 * looked up as is and comes back unknown). adj is None when adjust is 0.
 * keys[u] is the caller's own int object for values[u] (a dict finds it
 * again by identity); order (uint32 per address) is the position in values
 * of each address not in the cache, or 0xffffffff. fill() puts the groups
 * found for values into out. */
static PyObject *plan(PyObject *self, PyObject *args)
{
    PyObject *seq_in, *known, *seq = NULL, *out = NULL, *values = NULL, *keys = NULL;
    PyObject *order = NULL, *adj = NULL, *result = NULL, **items;
    struct at_todo *todo = NULL;
    Py_ssize_t n, m = 0, u = 0, i;
    unsigned long long adjust;
    uint64_t *vals;
    uint32_t *pos;
    uint8_t *adj_of = NULL;

    (void)self;
    if (!PyArg_ParseTuple(args, "OO!K", &seq_in, &PyDict_Type, &known, &adjust))
        return NULL;
    if (adjust > 255) {
        PyErr_SetString(PyExc_ValueError, "adjust must be from 0 to 255");
        return NULL;
    }
    if ((seq = PySequence_Fast(seq_in, "addresses must be a sequence of integers")) == NULL)
        return NULL;
    n = PySequence_Fast_GET_SIZE(seq);
    items = PySequence_Fast_ITEMS(seq);
    if ((uint64_t)n >= UINT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "too many addresses in one batch");
        goto done;
    }
    if ((out = PyList_New(n)) == NULL)
        goto done;
    if ((todo = PyMem_Malloc((size_t)(n ? n : 1) * sizeof *todo)) == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (i = 0; i < n; i++) {
        PyObject *item = items[i], *group;
        unsigned long long v;

        if (!PyLong_Check(item)) {
            PyErr_Format(PyExc_TypeError, "%.100s is not an integer", Py_TYPE(item)->tp_name);
            goto done;
        }
        group = PyDict_GetItemWithError(known, item);
        if (group != NULL) {
            Py_INCREF(group);
            PyList_SET_ITEM(out, i, group);
            continue;
        }
        if (PyErr_Occurred())
            goto done;
        v = PyLong_AsUnsignedLongLong(item);
        if (v == (unsigned long long)-1 && PyErr_Occurred())
            goto done;
        Py_INCREF(Py_None);
        PyList_SET_ITEM(out, i, Py_None);
        todo[m].value = v;
        todo[m++].index = (uint32_t)i;
    }
    if (sort_todo(todo, m) != 0)
        goto done;
    for (i = 0; i < m; i++)
        u += i == 0 || todo[i].value != todo[i - 1].value;
    values = PyByteArray_FromStringAndSize(NULL, u * (Py_ssize_t)sizeof(uint64_t));
    order = PyByteArray_FromStringAndSize(NULL, n * (Py_ssize_t)sizeof(uint32_t));
    keys = PyList_New(u);
    if (adjust != 0)
        adj = PyByteArray_FromStringAndSize(NULL, u);
    else {
        Py_INCREF(Py_None);
        adj = Py_None;
    }
    if (values == NULL || order == NULL || keys == NULL || adj == NULL)
        goto done;
    if (adjust != 0)
        adj_of = (uint8_t *)PyByteArray_AS_STRING(adj);
    vals = (uint64_t *)PyByteArray_AS_STRING(values);
    pos = (uint32_t *)PyByteArray_AS_STRING(order);
    if (n)
        memset(pos, 0xff, (size_t)n * sizeof *pos);
    u = -1;
    for (i = 0; i < m; i++) {
        if (i == 0 || todo[i].value != todo[i - 1].value) {
            PyObject *key = items[todo[i].index];

            uint64_t d = todo[i].value >= adjust ? adjust : 0;

            vals[++u] = todo[i].value - d;
            if (adj_of != NULL)
                adj_of[u] = (uint8_t)d;
            Py_INCREF(key);
            PyList_SET_ITEM(keys, u, key);
        }
        pos[todo[i].index] = (uint32_t)u;
    }
    result = PyTuple_Pack(5, out, values, adj, keys, order);
done:
    PyMem_Free(todo);
    Py_XDECREF(out);
    Py_XDECREF(values);
    Py_XDECREF(keys);
    Py_XDECREF(order);
    Py_XDECREF(adj);
    Py_DECREF(seq);
    return result;
}

/* fill(out, order, groups): out[i] = groups[order[i]] wherever order[i]
 * names one (see plan). */
static PyObject *fill(PyObject *self, PyObject *args)
{
    PyObject *out, *groups;
    Py_buffer order;
    const uint32_t *pos;
    Py_ssize_t n, ng, i;

    (void)self;
    if (!PyArg_ParseTuple(args, "O!y*O!", &PyList_Type, &out, &order, &PyList_Type, &groups))
        return NULL;
    n = PyList_GET_SIZE(out);
    ng = PyList_GET_SIZE(groups);
    if (order.len != n * (Py_ssize_t)sizeof(uint32_t)) {
        PyBuffer_Release(&order);
        PyErr_SetString(PyExc_ValueError, "order does not match out");
        return NULL;
    }
    pos = order.buf;
    for (i = 0; i < n; i++)
        if (pos[i] != UINT32_MAX && (Py_ssize_t)pos[i] >= ng) {
            PyBuffer_Release(&order);
            PyErr_SetString(PyExc_ValueError, "order names a group that is not there");
            return NULL;
        }
    for (i = 0; i < n; i++) {
        if (pos[i] != UINT32_MAX) {
            PyObject *g = PyList_GET_ITEM(groups, pos[i]), *old = PyList_GET_ITEM(out, i);

            Py_INCREF(g);
            PyList_SET_ITEM(out, i, g);
            Py_DECREF(old);
        }
    }
    PyBuffer_Release(&order);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"build", build, METH_VARARGS,
     "Frames grouped per address from _blazepack's columns (see the C source)."},
    {"plan", plan, METH_VARARGS,
     "Split a batch into cached groups and distinct addresses to look up (see the C source)."},
    {"fill", fill, METH_VARARGS, "Put looked-up groups into plan()'s output list."},
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
