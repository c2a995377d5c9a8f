/* Native fill of a bucket's input buffers (``runtime.model.BucketInputs``) from a batch in
 * each layout ``predict`` takes: the cheap half of ``runtime.validate`` and the copy into the
 * buffers in one call, what numpy's fixed cost per call made several microseconds at batch 1.
 *
 * Each function returns the batch's index count (the buffers hold the batch; a count beyond
 * the index buffer's length copies no index, and the caller grows it and calls again), or -1
 * when the batch is anything but the plain case: an input not a C-contiguous native-order
 * array, an index or offset type other than int32 or int64, a shape that does not fit, a dense
 * value not finite, a first bag not at 0, an offset that overflows. Then the Python checks
 * run, which name what is wrong or handle the rarer case. Nothing here raises, and nothing
 * reads past an input: every shape is compared before an element is read. As in Python, the
 * values of indices and offsets are left to the compiled code, which checks them.
 *
 * Every function's last three arguments are the bucket's buffers, as numpy views: dense
 * float32 [size, F], indices int64 [capacity], offsets int64 [T*size+1] (T and size come from
 * their shapes). Rows past the batch's are padded as ``plan`` pads: zero features, empty bags.
 */
#define PY_SSIZE_T_CLEAN
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <Python.h>
#include <math.h>
#include <string.h>
#include <numpy/arrayobject.h>

typedef struct {
    float *dense;
    int64_t *indices, *offsets;
    npy_intp size, features, tables, capacity;
} Buffers;

/* ``o`` as an ndarray of ``ndim`` dimensions, C-contiguous, aligned, in native byte order;
 * else NULL. */
static PyArrayObject *plain(PyObject *o, int ndim) {
    if (!PyArray_Check(o)) return NULL;
    PyArrayObject *a = (PyArrayObject *)o;
    if (PyArray_NDIM(a) != ndim || !PyArray_ISCARRAY_RO(a) || !PyArray_ISNOTSWAPPED(a))
        return NULL;
    return a;
}

/* The byte width of a signed int32/int64 array, else 0. */
static int int_width(PyArrayObject *a) {
    if (!PyArray_ISSIGNED(a)) return 0;
    int w = (int)PyArray_ITEMSIZE(a);
    return w == 4 || w == 8 ? w : 0;
}

static int64_t at(const void *data, int width, npy_intp i) {
    return width == 8 ? ((const int64_t *)data)[i] : ((const int32_t *)data)[i];
}

static void copy_ints(int64_t *dst, const void *src, int width, npy_intp n) {
    if (width == 8) {
        memcpy(dst, src, (size_t)n * 8);
    } else {
        for (npy_intp i = 0; i < n; i++) dst[i] = ((const int32_t *)src)[i];
    }
}

/* Parse the three buffers; 0 on success. */
static int buffers(PyObject *d, PyObject *i, PyObject *o, Buffers *b) {
    PyArrayObject *dense = plain(d, 2), *idx = plain(i, 1), *off = plain(o, 1);
    if (!dense || !idx || !off || PyArray_TYPE(dense) != NPY_FLOAT32 || int_width(idx) != 8 ||
        int_width(off) != 8 || !PyArray_ISWRITEABLE(dense) || !PyArray_ISWRITEABLE(idx) ||
        !PyArray_ISWRITEABLE(off))
        return -1;
    b->size = PyArray_DIM(dense, 0);
    b->features = PyArray_DIM(dense, 1);
    b->capacity = PyArray_DIM(idx, 0);
    if (b->size < 1 || (PyArray_DIM(off, 0) - 1) % b->size) return -1;
    b->tables = (PyArray_DIM(off, 0) - 1) / b->size;
    b->dense = PyArray_DATA(dense);
    b->indices = PyArray_DATA(idx);
    b->offsets = PyArray_DATA(off);
    return 0;
}

/* Copy dense [rows, F] float32, every value finite, into the buffer and zero the padding;
 * the batch's rows, or -1. */
static npy_intp fill_dense(PyObject *o, const Buffers *b) {
    PyArrayObject *a = plain(o, 2);
    if (!a || PyArray_TYPE(a) != NPY_FLOAT32 || PyArray_DIM(a, 1) != b->features) return -1;
    npy_intp rows = PyArray_DIM(a, 0), n = rows * b->features;
    if (rows < 1 || rows > b->size) return -1;
    const float *src = PyArray_DATA(a);
    int finite = 1;
    for (npy_intp k = 0; k < n; k++) finite &= isfinite(src[k]) != 0;
    if (!finite) return -1;
    memcpy(b->dense, src, (size_t)n * sizeof(float));
    memset(b->dense + n, 0, (size_t)(b->size * b->features - n) * sizeof(float));
    return rows;
}

/* Table t's bags from ``rows`` to the bucket's size: empty, at ``end``. */
static void pad_bags(const Buffers *b, npy_intp t, npy_intp rows, int64_t end) {
    for (npy_intp r = rows; r < b->size; r++) b->offsets[t * b->size + r] = end;
}

/* reference(dense_x, lS_o, lS_i, *buffers): lS_o [T, B] bag starts from 0 in each table,
 * lS_i T 1-D arrays (a list or tuple) or one [T, N] array. */
static PyObject *reference(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 6) return PyErr_Format(PyExc_TypeError, "reference takes 6 arguments");
    PyObject *dense = args[0], *starts_o = args[1], *lists = args[2];
    PyObject *bd = args[3], *bi = args[4], *bo = args[5];
    Buffers b;
    npy_intp rows;
    PyArrayObject *starts = plain(starts_o, 2);
    int sw;
    if (buffers(bd, bi, bo, &b) || !starts || !(sw = int_width(starts)) ||
        (rows = fill_dense(dense, &b)) < 0 || PyArray_DIM(starts, 0) != b.tables ||
        PyArray_DIM(starts, 1) != rows)
        return PyLong_FromLong(-1);
    const void *s = PyArray_DATA(starts);
    /* the tables' index arrays: T of them, or the rows of one [T, N] array */
    PyArrayObject *whole = plain(lists, 2);
    PyObject *seq = NULL;
    int iw = 0;
    if (whole) {
        if (PyArray_DIM(whole, 0) != b.tables || !(iw = int_width(whole)))
            return PyLong_FromLong(-1);
    } else if (PyList_CheckExact(lists) || PyTuple_CheckExact(lists)) {
        seq = lists;
        if (PySequence_Fast_GET_SIZE(seq) != b.tables) return PyLong_FromLong(-1);
    } else {
        return PyLong_FromLong(-1);
    }
    PyObject **items = seq ? PySequence_Fast_ITEMS(seq) : NULL;
    int64_t first = 0;          /* where table t's indices begin in the flat buffer */
    for (npy_intp t = 0; t < b.tables; t++) {
        npy_intp len;
        const void *src;
        int w;
        if (whole) {
            len = PyArray_DIM(whole, 1);
            w = iw;
            src = (const char *)PyArray_DATA(whole) + t * len * w;
        } else {
            PyArrayObject *a = plain(items[t], 1);
            if (!a || !(w = int_width(a))) return PyLong_FromLong(-1);
            len = PyArray_DIM(a, 0);
            src = PyArray_DATA(a);
        }
        if (at(s, sw, t * rows) != 0) return PyLong_FromLong(-1);
        for (npy_intp r = 0; r < rows; r++) {
            int64_t v;
            if (__builtin_add_overflow(at(s, sw, t * rows + r), first, &v))
                return PyLong_FromLong(-1);
            b.offsets[t * b.size + r] = v;
        }
        if (first + len <= b.capacity) copy_ints(b.indices + first, src, w, len);
        first += len;
        pad_bags(&b, t, rows, first);
    }
    b.offsets[b.tables * b.size] = first;
    return PyLong_FromLongLong(first);
}

/* What the flat layouts share: the buffers (args 3-5), the dense features (arg 0) copied,
 * the indices (arg 1) and a second array (arg 2) of T*B + ``extra`` entries, both 1-D int32
 * or int64 arrays. */
typedef struct {
    Buffers b;
    PyArrayObject *idx, *aux;
    int iw, aw;
    npy_intp rows;
} Flat;

static int flat(PyObject *const *args, npy_intp extra, Flat *f) {
    f->idx = plain(args[1], 1);
    f->aux = plain(args[2], 1);
    if (buffers(args[3], args[4], args[5], &f->b) || !f->idx || !f->aux ||
        !(f->iw = int_width(f->idx)) || !(f->aw = int_width(f->aux)) ||
        (f->rows = fill_dense(args[0], &f->b)) < 0 ||
        PyArray_DIM(f->aux, 0) != f->b.tables * f->rows + extra)
        return -1;
    return 0;
}

/* Copy a flat layout's indices; their count. */
static PyObject *flat_indices(const Flat *f) {
    npy_intp count = PyArray_DIM(f->idx, 0);
    if (count <= f->b.capacity) copy_ints(f->b.indices, PyArray_DATA(f->idx), f->iw, count);
    return PyLong_FromSsize_t(count);
}

/* jagged(dense_x, indices, offsets, *buffers): FBGEMM's flat layout, indices [N] and
 * offsets [T*B+1]. */
static PyObject *jagged(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 6) return PyErr_Format(PyExc_TypeError, "jagged takes 6 arguments");
    Flat f;
    if (flat(args, 1, &f)) return PyLong_FromLong(-1);
    const void *o = PyArray_DATA(f.aux);
    for (npy_intp t = 0; t < f.b.tables; t++) {
        for (npy_intp r = 0; r < f.rows; r++)
            f.b.offsets[t * f.b.size + r] = at(o, f.aw, t * f.rows + r);
        pad_bags(&f.b, t, f.rows, at(o, f.aw, (t + 1) * f.rows));
    }
    f.b.offsets[f.b.tables * f.b.size] = at(o, f.aw, f.b.tables * f.rows);
    return flat_indices(&f);
}

/* kjt(dense_x, values, lengths, *buffers): TorchRec's KeyedJaggedTensor layout, values [N]
 * key-major and lengths [T*B]. */
static PyObject *kjt(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 6) return PyErr_Format(PyExc_TypeError, "kjt takes 6 arguments");
    Flat f;
    if (flat(args, 0, &f)) return PyLong_FromLong(-1);
    const void *l = PyArray_DATA(f.aux);
    int64_t sum = 0;
    for (npy_intp t = 0; t < f.b.tables; t++) {
        for (npy_intp r = 0; r < f.rows; r++) {
            f.b.offsets[t * f.b.size + r] = sum;
            if (__builtin_add_overflow(sum, at(l, f.aw, t * f.rows + r), &sum))
                return PyLong_FromLong(-1);
        }
        pad_bags(&f.b, t, f.rows, sum);
    }
    f.b.offsets[f.b.tables * f.b.size] = sum;
    return flat_indices(&f);
}

static PyMethodDef methods[] = {
    {"reference", (PyCFunction)(void (*)(void))reference, METH_FASTCALL,
     "Fill the buffers from the reference layout."},
    {"jagged", (PyCFunction)(void (*)(void))jagged, METH_FASTCALL,
     "Fill the buffers from FBGEMM's flat layout."},
    {"kjt", (PyCFunction)(void (*)(void))kjt, METH_FASTCALL,
     "Fill the buffers from a KeyedJaggedTensor's values and lengths."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fill", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fill(void) {
    import_array();
    return PyModule_Create(&module);
}
