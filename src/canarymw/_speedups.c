/* Optional C implementation of the WSGI adapter's per-request response object.
 *
 * canarymw/wsgi.py holds the reference implementation (_Response) and uses this one
 * when it was built. Both must behave the same: the test suite runs every WSGI test
 * against each. Everything unusual (a header list that is not a list of 2-tuples of
 * str, a status line not seen before, a failing sink) is handed back to the Python
 * code, so this file only has to be right about the common case.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <string.h>
#include <time.h>

/* Set once by configure() from wsgi.py. */
static PyObject *perf_counter;   /* time.perf_counter */
static PyObject *codes;          /* dict: status line -> int */
static PyObject *parse_status;   /* f(line) -> int | None, fills codes */
static PyObject *slow_start;     /* _Response.start_response(resp, line, headers, exc_info) */
static PyObject *record_outcome; /* _outcomes.deliver, for sinks other than MemorySink */
static PyObject *sink_failed;    /* f(mw, exc): counts and logs a failing sink */
static PyObject *fold;           /* f(memory): MemorySink._fold(blocking=False) */
static Py_ssize_t batch = 256;
/* Positions of Decision's fields (a named tuple), checked by configure's caller. */
static Py_ssize_t i_rollout, i_variant, i_set_cookie;

static PyObject *s_record, *s_append, *s_memory, *s_pending, *s_split_only, *s_extra_headers, *s_set_cookie,
    *s_rollout, *s_variant, *s_close, *s_get, *s_name, *s_error_key, *s_split_key, *s_route_key,
    *s_method_key, *s_get_method, *s_head, *s_set_cookie_header;

typedef struct {
    PyObject_HEAD
    PyObject *mw;
    PyObject *decision;
    PyObject *environ;
    PyObject *server_start_response;
    PyObject *inner; /* NULL once closed */
    PyObject *it;    /* iter(inner), once the server iterates */
    PyObject *status;
    PyObject *error;
    double wall;
    double started;
    char done;
    char finished;
} Response;

static PyTypeObject ResponseType;

/* Seconds on a monotonic clock: only differences are used (durations). */
static int
now(double *out)
{
#if defined(CLOCK_MONOTONIC) && !defined(_WIN32)
    struct timespec ts;
    if (clock_gettime(CLOCK_MONOTONIC, &ts) == 0) {
        *out = (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
        return 0;
    }
#endif
    PyObject *t = PyObject_CallNoArgs(perf_counter);
    if (t == NULL)
        return -1;
    *out = PyFloat_AsDouble(t);
    Py_DECREF(t);
    return (*out == -1.0 && PyErr_Occurred()) ? -1 : 0;
}

/* type(exc).__name__ of the pending exception, which stays pending. */
static PyObject *
pending_error_name(void)
{
    PyObject *type, *value, *tb, *name;
    PyErr_Fetch(&type, &value, &tb);
    name = type ? PyObject_GetAttr(type, s_name) : NULL;
    if (name == NULL)
        PyErr_Clear();
    PyErr_Restore(type, value, tb);
    return name;
}

static void
remember_error(Response *self)
{
    if (self->error == NULL || self->error == Py_None) {
        PyObject *name = pending_error_name();
        if (name != NULL)
            Py_XSETREF(self->error, name);
    }
}

/* getattr(obj, name, None) without building an AttributeError: 1 found, 0 absent, -1 error. */
static int
optional_attr(PyObject *obj, PyObject *name, PyObject **out)
{
#if PY_VERSION_HEX >= 0x030D0000
    return PyObject_GetOptionalAttr(obj, name, out);
#else
    return _PyObject_LookupAttr(obj, name, out);
#endif
}

static PyObject *
env_get(PyObject *environ, PyObject *key)
{
    PyObject *v;
    if (PyDict_CheckExact(environ)) {
        v = PyDict_GetItemWithError(environ, key);
        if (v == NULL && PyErr_Occurred())
            return NULL;
        return Py_NewRef(v ? v : Py_None);
    }
    return PyObject_CallMethodObjArgs(environ, s_get, key, Py_None, NULL);
}

static PyObject *
decision_field(PyObject *decision, Py_ssize_t i, PyObject *name)
{
    if (PyTuple_Check(decision) && i < PyTuple_GET_SIZE(decision))
        return Py_NewRef(PyTuple_GET_ITEM(decision, i));
    return PyObject_GetAttr(decision, name);
}

/* Record the outcome once. Never raises: a failing sink is counted by sink_failed. */
static void
finish(Response *self)
{
    PyObject *mw = self->mw, *record = NULL, *error = NULL, *method = NULL, *route = NULL,
             *fields = NULL, *memory = NULL, *pending = NULL, *res, *flag, *rollout = NULL,
             *variant = NULL;
    PyObject *type, *value, *tb;
    double end;
    int split_only, disconnected;

    if (self->finished || mw == NULL || self->environ == NULL || self->decision == NULL)
        return;
    self->finished = 1;
    /* Keep the exception being raised (if any) while the outcome is recorded. */
    PyErr_Fetch(&type, &value, &tb);
    record = PyObject_GetAttr(mw, s_record);
    if (record == NULL)
        goto failed;
    if (record == Py_None)
        goto done;
    flag = PyObject_GetAttr(mw, s_split_only);
    if (flag == NULL)
        goto failed;
    split_only = PyObject_IsTrue(flag);
    Py_DECREF(flag);
    if (split_only < 0)
        goto failed;
    if (split_only) {
        int split;
        flag = env_get(self->environ, s_split_key);
        if (flag == NULL)
            goto failed;
        split = PyObject_IsTrue(flag);
        Py_DECREF(flag);
        if (split < 0)
            goto failed;
        if (!split)
            goto done;
    }
    if (self->error != NULL && PyObject_IsTrue(self->error)) {
        error = Py_NewRef(self->error);
    }
    else {
        error = env_get(self->environ, s_error_key);
        if (error == NULL)
            goto failed;
    }
    if (PyDict_CheckExact(self->environ)) {
        method = PyDict_GetItemWithError(self->environ, s_method_key);
        if (method == NULL && PyErr_Occurred())
            goto failed;
        method = Py_NewRef(method ? method : s_get_method);
    }
    else {
        method = PyObject_CallMethodObjArgs(self->environ, s_get, s_method_key, s_get_method, NULL);
        if (method == NULL)
            goto failed;
    }
    route = env_get(self->environ, s_route_key);
    if (route == NULL)
        goto failed;
    rollout = decision_field(self->decision, i_rollout, s_rollout);
    if (rollout == NULL)
        goto failed;
    variant = decision_field(self->decision, i_variant, s_variant);
    if (variant == NULL)
        goto failed;
    if (now(&end) < 0)
        goto failed;
    if (self->done || error != Py_None) {
        disconnected = 0;
    }
    else {
        int head = PyObject_RichCompareBool(method, s_head, Py_EQ);
        if (head < 0)
            goto failed;
        disconnected = !head;
    }
    fields = PyTuple_New(10);
    if (fields == NULL)
        goto failed;
    PyTuple_SET_ITEM(fields, 0, rollout);
    PyTuple_SET_ITEM(fields, 1, variant);
    rollout = variant = NULL;
    PyTuple_SET_ITEM(fields, 2, Py_NewRef(self->status ? self->status : Py_None));
    PyTuple_SET_ITEM(fields, 3, PyFloat_FromDouble(end - self->started));
    PyTuple_SET_ITEM(fields, 4, error);
    error = NULL;
    PyTuple_SET_ITEM(fields, 5, Py_NewRef(disconnected ? Py_True : Py_False));
    PyTuple_SET_ITEM(fields, 6, method);
    method = NULL;
    PyTuple_SET_ITEM(fields, 7, route);
    route = NULL;
    PyTuple_SET_ITEM(fields, 8, PyFloat_FromDouble(self->wall));
    PyTuple_SET_ITEM(fields, 9, Py_NewRef(Py_None));
    if (PyTuple_GET_ITEM(fields, 3) == NULL || PyTuple_GET_ITEM(fields, 8) == NULL)
        goto failed;
    memory = PyObject_GetAttr(mw, s_memory);
    if (memory == NULL)
        goto failed;
    if (memory == Py_None) {
        res = PyObject_CallFunctionObjArgs(record_outcome, mw, fields, NULL);
    }
    else {
        pending = PyObject_GetAttr(memory, s_pending);
        if (pending == NULL)
            goto failed;
        res = PyObject_CallMethodOneArg(pending, s_append, fields);
        if (res != NULL) {
            Py_ssize_t n = PyObject_Size(pending);
            Py_DECREF(res);
            res = n < 0 ? NULL : n >= batch ? PyObject_CallOneArg(fold, memory) : Py_NewRef(Py_None);
        }
    }
    if (res == NULL)
        goto failed;
    Py_DECREF(res);
    goto done;

failed : {
    /* As in Python: an Exception is counted; anything else is not ours to swallow,
     * but finish() must not raise, so it is reported as unraisable. */
    PyObject *t2, *v2, *tb2;
    PyErr_Fetch(&t2, &v2, &tb2);
    PyErr_NormalizeException(&t2, &v2, &tb2);
    if (v2 != NULL && tb2 != NULL)
        PyException_SetTraceback(v2, tb2);
    if (v2 != NULL && PyObject_IsInstance(v2, PyExc_Exception) == 1) {
        res = PyObject_CallFunctionObjArgs(sink_failed, mw, v2, NULL);
        if (res == NULL)
            PyErr_WriteUnraisable(mw);
        Py_XDECREF(res);
    }
    else if (t2 != NULL) {
        PyErr_Restore(t2, v2, tb2);
        t2 = v2 = tb2 = NULL;
        PyErr_WriteUnraisable(mw);
    }
    Py_XDECREF(t2);
    Py_XDECREF(v2);
    Py_XDECREF(tb2);
}
done:
    Py_XDECREF(record);
    Py_XDECREF(error);
    Py_XDECREF(method);
    Py_XDECREF(route);
    Py_XDECREF(rollout);
    Py_XDECREF(variant);
    Py_XDECREF(fields);
    Py_XDECREF(memory);
    Py_XDECREF(pending);
    PyErr_Restore(type, value, tb);
}

/* ASCII case-insensitive: is name "vary" or "cache-control"? (No other str lowers to
 * them.) 1 yes, 0 no, -1 error. */
static int
watched(PyObject *name)
{
    Py_ssize_t n = PyUnicode_GET_LENGTH(name);
    const char *want;
    const Py_UCS1 *s;
    if (n == 4)
        want = "vary";
    else if (n == 13)
        want = "cache-control";
    else
        return 0;
#if PY_VERSION_HEX < 0x030C0000
    if (PyUnicode_READY(name) < 0)
        return -1;
#endif
    if (!PyUnicode_IS_ASCII(name))
        return 0;
    s = PyUnicode_1BYTE_DATA(name);
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_UCS1 c = s[i];
        if (c >= 'A' && c <= 'Z')
            c += 'a' - 'A';
        if (c != (Py_UCS1)want[i])
            return 0;
    }
    return 1;
}

static PyObject *
Response_start_response(Response *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *line, *headers, *exc_info = Py_None, *code, *cookie = NULL, *extra = NULL, *out = NULL,
             *res = NULL;
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0, n;

    if (self->mw == NULL || self->decision == NULL || self->server_start_response == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "start_response() called on a response that was torn down");
        return NULL;
    }
    if (nargs == 3 && nkw == 0)
        exc_info = args[2];
    else if (!(nargs == 2 && nkw == 0))
        goto slow; /* keywords or a wrong count: the Python signature decides */
    line = args[0];
    headers = args[1];
    if (!PyUnicode_CheckExact(line) || !PyList_CheckExact(headers))
        goto slow;
    n = PyList_GET_SIZE(headers);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(headers, i);
        int w;
        if (!PyTuple_CheckExact(item) || PyTuple_GET_SIZE(item) != 2
            || !PyUnicode_CheckExact(PyTuple_GET_ITEM(item, 0)))
            goto slow;
        w = watched(PyTuple_GET_ITEM(item, 0));
        if (w < 0)
            return NULL;
        if (w)
            goto slow; /* the app set Vary or Cache-Control itself: merge in Python */
    }
    code = PyDict_GetItemWithError(codes, line);
    if (code == NULL) {
        if (PyErr_Occurred())
            return NULL;
        code = PyObject_CallOneArg(parse_status, line);
        if (code == NULL)
            return NULL;
    }
    else {
        Py_INCREF(code);
    }
    Py_XSETREF(self->status, code);
    cookie = decision_field(self->decision, i_set_cookie, s_set_cookie);
    if (cookie == NULL)
        return NULL;
    extra = PyObject_GetAttr(self->mw, s_extra_headers);
    if (extra == NULL)
        goto end;
    out = PyNumber_Add(headers, extra);
    if (out == NULL)
        goto end;
    if (cookie != Py_None) {
        PyObject *pair = PyTuple_Pack(2, s_set_cookie_header, cookie);
        if (pair == NULL || PyList_Append(out, pair) < 0) {
            Py_XDECREF(pair);
            goto end;
        }
        Py_DECREF(pair);
    }
    if (exc_info != Py_None)
        res = PyObject_CallFunctionObjArgs(self->server_start_response, line, out, exc_info, NULL);
    else
        res = PyObject_CallFunctionObjArgs(self->server_start_response, line, out, NULL);
end:
    Py_XDECREF(cookie);
    Py_XDECREF(extra);
    Py_XDECREF(out);
    return res;

slow : {
    /* The reference implementation, with this object as its self. */
    Py_ssize_t total = nargs + nkw;
    PyObject **stack = PyMem_Malloc((size_t)(total + 1) * sizeof(PyObject *));
    if (stack == NULL)
        return PyErr_NoMemory();
    stack[0] = (PyObject *)self;
    memcpy(stack + 1, args, (size_t)total * sizeof(PyObject *));
    res = PyObject_Vectorcall(slow_start, stack, (size_t)(nargs + 1), kwnames);
    PyMem_Free(stack);
    return res;
}
}

static PyObject *
Response_iter(Response *self)
{
    if (self->it == NULL && self->inner != NULL) {
        PyObject *inner = Py_NewRef(self->inner);
        PyObject *it = PyObject_GetIter(inner);
        Py_DECREF(inner);
        if (it == NULL) {
            if (PyErr_ExceptionMatches(PyExc_Exception))
                remember_error(self);
            return NULL;
        }
        if (self->it == NULL && self->inner != NULL)
            self->it = it;
        else
            Py_DECREF(it); /* closed, or iterated, by the app's own __iter__ meanwhile */
    }
    return Py_NewRef((PyObject *)self);
}

static PyObject *
Response_next(Response *self)
{
    PyObject *chunk, *it;
    if (self->it == NULL) {
        if (self->inner == NULL || self->done)
            return NULL;
        PyObject *me = Response_iter(self);
        if (me == NULL)
            return NULL;
        Py_DECREF(me);
    }
    if (self->done || self->it == NULL)
        return NULL;
    /* Our own reference: the app's code may close this response while it runs. */
    it = Py_NewRef(self->it);
    chunk = (*Py_TYPE(it)->tp_iternext)(it);
    Py_DECREF(it);
    if (chunk != NULL)
        return chunk;
    if (PyErr_Occurred()) {
        if (PyErr_ExceptionMatches(PyExc_StopIteration)) {
            PyErr_Clear();
            self->done = 1;
        }
        else if (PyErr_ExceptionMatches(PyExc_Exception)) {
            remember_error(self);
        }
        return NULL;
    }
    self->done = 1;
    return NULL;
}

static PyObject *
Response_close(Response *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *inner = self->inner, *close, *res;
    if (inner == NULL)
        Py_RETURN_NONE;
    self->inner = NULL;
    Py_CLEAR(self->it);
    if (optional_attr(inner, s_close, &close) < 0)
        goto raised;
    if (close != NULL) {
        res = PyObject_CallNoArgs(close);
        Py_DECREF(close);
        if (res == NULL)
            goto raised;
        Py_DECREF(res);
    }
    Py_DECREF(inner);
    finish(self);
    Py_RETURN_NONE;
raised:
    Py_DECREF(inner);
    remember_error(self);
    finish(self);
    return NULL;
}

static int
Response_traverse(Response *self, visitproc visit, void *arg)
{
    Py_VISIT(self->mw);
    Py_VISIT(self->decision);
    Py_VISIT(self->environ);
    Py_VISIT(self->server_start_response);
    Py_VISIT(self->inner);
    Py_VISIT(self->it);
    Py_VISIT(self->status);
    Py_VISIT(self->error);
    return 0;
}

static int
Response_clear(Response *self)
{
    Py_CLEAR(self->mw);
    Py_CLEAR(self->decision);
    Py_CLEAR(self->environ);
    Py_CLEAR(self->server_start_response);
    Py_CLEAR(self->inner);
    Py_CLEAR(self->it);
    Py_CLEAR(self->status);
    Py_CLEAR(self->error);
    return 0;
}

static void
Response_dealloc(Response *self)
{
    PyObject_GC_UnTrack(self);
    Response_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Response_methods[] = {
    {"start_response", (PyCFunction)(void (*)(void))Response_start_response,
     METH_FASTCALL | METH_KEYWORDS, "PEP 3333 start_response, passing our headers on to the server's."},
    {"close", (PyCFunction)Response_close, METH_NOARGS,
     "Close the app's iterable exactly once, then record the outcome."},
    {NULL},
};

static PyMemberDef Response_members[] = {
    {"mw", T_OBJECT, offsetof(Response, mw), READONLY, NULL},
    {"decision", T_OBJECT, offsetof(Response, decision), READONLY, NULL},
    {"environ", T_OBJECT, offsetof(Response, environ), READONLY, NULL},
    {"server_start_response", T_OBJECT, offsetof(Response, server_start_response), READONLY, NULL},
    {"inner", T_OBJECT, offsetof(Response, inner), READONLY, NULL},
    {"status", T_OBJECT, offsetof(Response, status), 0, NULL},
    {"error", T_OBJECT, offsetof(Response, error), 0, NULL},
    {"done", T_BOOL, offsetof(Response, done), READONLY, NULL},
    {NULL},
};

static PyMethodDef start_response_def = {
    "start_response", (PyCFunction)(void (*)(void))Response_start_response, METH_FASTCALL | METH_KEYWORDS,
    "PEP 3333 start_response, passing our headers on to the server's."};

static PyTypeObject ResponseType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "canarymw._speedups.Response",
    .tp_basicsize = sizeof(Response),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The WSGI adapter's response iterable for one request (C implementation).",
    .tp_dealloc = (destructor)Response_dealloc,
    .tp_traverse = (traverseproc)Response_traverse,
    .tp_clear = (inquiry)Response_clear,
    .tp_iter = (getiterfunc)Response_iter,
    .tp_iternext = (iternextfunc)Response_next,
    .tp_methods = Response_methods,
    .tp_members = Response_members,
};

/* ---- ASGI: the wrapper around the server's send --------------------------------
 *
 * asgi._Exchange.send is the reference implementation. Sender handles the two messages
 * of nearly every response (http.response.start without Vary/Cache-Control from the
 * app, and http.response.body) and hands every other message to _Exchange.send. Its
 * awaitable delegates to the server's, and does what follows the await in Python:
 * stamp the end of the response after the last body message, and record a client
 * disconnect when the server's send raises OSError.
 */

static PyObject *s_type, *s_body_kind, *s_start_kind, *s_more_body, *s_headers, *s_status,
    *s_trailers, *s_ended, *s_done, *s_finish, *s_send, *s_throw;

typedef struct {
    PyObject_HEAD
    PyObject *x; /* the _Exchange */
    PyObject *server_send;
    PyObject *extra; /* list of header pairs to append */
    vectorcallfunc vectorcall;
} Sender;

typedef struct {
    PyObject_HEAD
    PyObject *x;
    PyObject *it; /* the server's awaitable, as an iterator */
    char last;
} Awaiter;

static PyTypeObject SenderType, AwaiterType;

/* x.finish(None, True, perf_counter()) unless the outcome was recorded; the pending
 * exception (the server's OSError) stays pending. */
static void
record_disconnect(PyObject *x)
{
    PyObject *type, *value, *tb, *done, *at, *res = NULL;
    int is_done;
    PyErr_Fetch(&type, &value, &tb);
    done = PyObject_GetAttr(x, s_done);
    is_done = done ? PyObject_IsTrue(done) : -1;
    Py_XDECREF(done);
    if (is_done == 0) {
        at = PyObject_CallNoArgs(perf_counter);
        if (at != NULL) {
            res = PyObject_CallMethodObjArgs(x, s_finish, Py_None, Py_True, at, NULL);
            Py_DECREF(at);
        }
    }
    if (is_done < 0 || (is_done == 0 && res == NULL))
        PyErr_WriteUnraisable(x);
    Py_XDECREF(res);
    PyErr_Restore(type, value, tb);
}

/* After the server's awaitable returned: stamp the end of a last body message. */
static int
Awaiter_done(Awaiter *self)
{
    PyObject *at;
    int failed;
    if (!self->last)
        return 0;
    at = PyObject_CallNoArgs(perf_counter);
    failed = at == NULL || PyObject_SetAttr(self->x, s_ended, at) < 0;
    Py_XDECREF(at);
    return failed ? -1 : 0;
}

/* One step of the server's awaitable, for am_send (the interpreter's await loop). */
static PySendResult
Awaiter_am_send(PyObject *op, PyObject *value, PyObject **result)
{
    Awaiter *self = (Awaiter *)op;
    PyObject *res;
    PySendResult r = PyIter_Send(self->it, value, &res);
    if (r == PYGEN_NEXT) {
        *result = res;
        return PYGEN_NEXT;
    }
    if (r == PYGEN_RETURN) {
        Py_DECREF(res);
        if (Awaiter_done(self) < 0) {
            *result = NULL;
            return PYGEN_ERROR;
        }
        *result = Py_NewRef(Py_None);
        return PYGEN_RETURN;
    }
    if (PyErr_ExceptionMatches(PyExc_OSError))
        record_disconnect(self->x);
    *result = NULL;
    return PYGEN_ERROR;
}

/* The same step as a method or __next__: a return becomes StopIteration (or, for
 * __next__, NULL without an exception). */
static PyObject *
Awaiter_result(Awaiter *self, PyObject *res, int method)
{
    if (res != NULL)
        return res;
    if (PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_StopIteration)) {
            if (PyErr_ExceptionMatches(PyExc_OSError))
                record_disconnect(self->x);
            return NULL;
        }
        PyErr_Clear();
    }
    if (Awaiter_done(self) < 0)
        return NULL;
    if (method)
        PyErr_SetNone(PyExc_StopIteration);
    return NULL;
}

static PyObject *
Awaiter_stepped(Awaiter *self, PyObject *value, int method)
{
    PyObject *res;
    PySendResult r = Awaiter_am_send((PyObject *)self, value, &res);
    if (r == PYGEN_NEXT)
        return res;
    if (r == PYGEN_RETURN) {
        Py_DECREF(res);
        if (method)
            PyErr_SetNone(PyExc_StopIteration);
    }
    return NULL;
}

static PyObject *
Awaiter_next(Awaiter *self)
{
    return Awaiter_stepped(self, Py_None, 0);
}

static PyObject *
Awaiter_send(Awaiter *self, PyObject *value)
{
    return Awaiter_stepped(self, value, 1);
}

static PyObject *
Awaiter_throw(Awaiter *self, PyObject *args)
{
    PyObject *meth = PyObject_GetAttr(self->it, s_throw), *res;
    if (meth == NULL)
        return NULL;
    res = PyObject_Call(meth, args, NULL);
    Py_DECREF(meth);
    return Awaiter_result(self, res, 1);
}

static PyObject *
Awaiter_close(Awaiter *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *meth;
    int found = optional_attr(self->it, s_close, &meth);
    if (found <= 0)
        return found < 0 ? NULL : Py_NewRef(Py_None);
    PyObject *res = PyObject_CallNoArgs(meth);
    Py_DECREF(meth);
    return res;
}

static PyObject *
Awaiter_self(PyObject *self)
{
    return Py_NewRef(self);
}

static int
Awaiter_traverse(Awaiter *self, visitproc visit, void *arg)
{
    Py_VISIT(self->x);
    Py_VISIT(self->it);
    return 0;
}

static int
Awaiter_clear(Awaiter *self)
{
    Py_CLEAR(self->x);
    Py_CLEAR(self->it);
    return 0;
}

static void
Awaiter_dealloc(Awaiter *self)
{
    PyObject_GC_UnTrack(self);
    Awaiter_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Awaiter_methods[] = {
    {"send", (PyCFunction)Awaiter_send, METH_O, NULL},
    {"throw", (PyCFunction)Awaiter_throw, METH_VARARGS, NULL},
    {"close", (PyCFunction)Awaiter_close, METH_NOARGS, NULL},
    {NULL},
};

static PyAsyncMethods Awaiter_async = {.am_await = Awaiter_self, .am_send = Awaiter_am_send};

static PyTypeObject AwaiterType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "canarymw._speedups.SendAwaiter",
    .tp_basicsize = sizeof(Awaiter),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Awaits the server's send for one message (C implementation).",
    .tp_dealloc = (destructor)Awaiter_dealloc,
    .tp_traverse = (traverseproc)Awaiter_traverse,
    .tp_clear = (inquiry)Awaiter_clear,
    .tp_as_async = &Awaiter_async,
    .tp_iter = Awaiter_self,
    .tp_iternext = (iternextfunc)Awaiter_next,
    .tp_methods = Awaiter_methods,
};

/* 1: headers is a list of (bytes, bytes) tuples naming neither vary nor cache-control. */
static int
plain_headers(PyObject *headers)
{
    if (!PyList_CheckExact(headers))
        return 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(headers); i++) {
        PyObject *item = PyList_GET_ITEM(headers, i), *name;
        if (!PyTuple_CheckExact(item) || PyTuple_GET_SIZE(item) != 2)
            return 0;
        name = PyTuple_GET_ITEM(item, 0);
        if (!PyBytes_CheckExact(name))
            return 0;
        if ((PyBytes_GET_SIZE(name) == 4 && memcmp(PyBytes_AS_STRING(name), "vary", 4) == 0)
            || (PyBytes_GET_SIZE(name) == 13
                && memcmp(PyBytes_AS_STRING(name), "cache-control", 13) == 0))
            return 0;
    }
    return 1;
}

static int
truthy_attr(PyObject *obj, PyObject *name)
{
    PyObject *v = PyObject_GetAttr(obj, name);
    int t;
    if (v == NULL)
        return -1;
    t = PyObject_IsTrue(v);
    Py_DECREF(v);
    return t;
}

static PyObject *
Sender_call(Sender *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    PyObject *message, *kind, *msg = NULL, *aw, *it;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    int last = 0;
    Awaiter *awaiter;
    if (nargs != 1 || kwnames != NULL)
        goto python;
    message = args[0];
    if (!PyDict_CheckExact(message))
        goto python;
    kind = PyDict_GetItemWithError(message, s_type);
    if (kind == NULL) {
        if (PyErr_Occurred())
            return NULL;
        goto python;
    }
    if (!PyUnicode_CheckExact(kind))
        goto python;
    if (PyUnicode_Compare(kind, s_body_kind) == 0) {
        PyObject *more = PyDict_GetItemWithError(message, s_more_body);
        int ended, trailers, more_body;
        if (more == NULL && PyErr_Occurred())
            return NULL;
        if ((ended = truthy_attr(self->x, s_ended)) < 0 || (trailers = truthy_attr(self->x, s_trailers)) < 0)
            return NULL;
        more_body = more == NULL ? 0 : PyObject_IsTrue(more);
        if (more_body < 0)
            return NULL;
        last = !(ended || trailers || more_body);
        msg = Py_NewRef(message);
    }
    else if (PyUnicode_Compare(kind, s_start_kind) == 0) {
        PyObject *headers = PyDict_GetItemWithError(message, s_headers), *status, *trailers, *merged;
        int has_trailers;
        if (headers == NULL) {
            if (PyErr_Occurred())
                return NULL;
            goto python;
        }
        if (!plain_headers(headers))
            goto python;
        status = PyDict_GetItemWithError(message, s_status);
        if (status == NULL && PyErr_Occurred())
            return NULL;
        trailers = PyDict_GetItemWithError(message, s_trailers);
        if (trailers == NULL && PyErr_Occurred())
            return NULL;
        has_trailers = trailers == NULL ? 0 : PyObject_IsTrue(trailers);
        if (has_trailers < 0)
            return NULL;
        if (PyObject_SetAttr(self->x, s_status, status ? status : Py_None) < 0
            || PyObject_SetAttr(self->x, s_trailers, has_trailers ? Py_True : Py_False) < 0)
            return NULL;
        merged = PyNumber_Add(headers, self->extra);
        if (merged == NULL)
            return NULL;
        msg = PyDict_Copy(message);
        if (msg == NULL || PyDict_SetItem(msg, s_headers, merged) < 0) {
            Py_DECREF(merged);
            Py_XDECREF(msg);
            return NULL;
        }
        Py_DECREF(merged);
    }
    else {
        goto python;
    }
    aw = PyObject_CallOneArg(self->server_send, msg);
    Py_DECREF(msg);
    if (aw == NULL) {
        if (PyErr_ExceptionMatches(PyExc_OSError))
            record_disconnect(self->x);
        return NULL;
    }
    if (PyCoro_CheckExact(aw)) {
        it = aw; /* driven directly with PyIter_Send: no wrapper object */
    }
    else {
        if (Py_TYPE(aw)->tp_as_async == NULL || Py_TYPE(aw)->tp_as_async->am_await == NULL) {
            PyErr_Format(PyExc_TypeError, "object %.100s can't be used in 'await' expression",
                         Py_TYPE(aw)->tp_name);
            Py_DECREF(aw);
            return NULL;
        }
        it = Py_TYPE(aw)->tp_as_async->am_await(aw);
        Py_DECREF(aw);
        if (it == NULL)
            return NULL;
        if (Py_TYPE(it)->tp_iternext == NULL) {
            PyErr_Format(PyExc_TypeError, "__await__() returned non-iterator of type '%.100s'",
                         Py_TYPE(it)->tp_name);
            Py_DECREF(it);
            return NULL;
        }
    }
    awaiter = PyObject_GC_New(Awaiter, &AwaiterType);
    if (awaiter == NULL) {
        Py_DECREF(it);
        return NULL;
    }
    awaiter->x = Py_NewRef(self->x);
    awaiter->it = it;
    awaiter->last = (char)last;
    PyObject_GC_Track(awaiter);
    return (PyObject *)awaiter;

python : {
    /* The reference implementation: _Exchange.send(message), a coroutine. */
    PyObject *meth = PyObject_GetAttr(self->x, s_send), *res;
    if (meth == NULL)
        return NULL;
    res = PyObject_Vectorcall(meth, args, nargsf, kwnames);
    Py_DECREF(meth);
    return res;
}
}

static int
Sender_traverse(Sender *self, visitproc visit, void *arg)
{
    Py_VISIT(self->x);
    Py_VISIT(self->server_send);
    Py_VISIT(self->extra);
    return 0;
}

static int
Sender_clear(Sender *self)
{
    Py_CLEAR(self->x);
    Py_CLEAR(self->server_send);
    Py_CLEAR(self->extra);
    return 0;
}

static void
Sender_dealloc(Sender *self)
{
    PyObject_GC_UnTrack(self);
    Sender_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Sender_vectorcall_entry(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    if (((Sender *)self)->x == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "send() called on a request that was torn down");
        return NULL;
    }
    return Sender_call((Sender *)self, args, nargsf, kwnames);
}

#ifndef Py_TPFLAGS_HAVE_VECTORCALL
#define Py_TPFLAGS_HAVE_VECTORCALL _Py_TPFLAGS_HAVE_VECTORCALL
#endif

static PyTypeObject SenderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "canarymw._speedups.Sender",
    .tp_basicsize = sizeof(Sender),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_vectorcall_offset = offsetof(Sender, vectorcall),
    .tp_doc = "The ASGI send an app is given (C implementation of asgi._Exchange.send).",
    .tp_dealloc = (destructor)Sender_dealloc,
    .tp_traverse = (traverseproc)Sender_traverse,
    .tp_clear = (inquiry)Sender_clear,
    .tp_call = PyVectorcall_Call,
};

/* respond(mw, app, decision, environ, start_response, wall) -> Response */
static PyObject *
respond(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    Response *self;
    PyObject *bound, *inner;
    double wall;
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "respond() takes exactly 6 arguments");
        return NULL;
    }
    wall = PyFloat_AsDouble(args[5]);
    if (wall == -1.0 && PyErr_Occurred())
        return NULL;
    self = PyObject_GC_New(Response, &ResponseType);
    if (self == NULL)
        return NULL;
    self->mw = Py_NewRef(args[0]);
    self->decision = Py_NewRef(args[2]);
    self->environ = Py_NewRef(args[3]);
    self->server_start_response = Py_NewRef(args[4]);
    self->inner = self->it = self->status = self->error = NULL;
    self->wall = wall;
    self->done = self->finished = 0;
    PyObject_GC_Track(self);
    bound = PyCFunction_NewEx(&start_response_def, (PyObject *)self, NULL);
    if (bound == NULL || now(&self->started) < 0) {
        Py_XDECREF(bound);
        Py_DECREF(self);
        return NULL;
    }
    inner = PyObject_CallFunctionObjArgs(args[1], self->environ, bound, NULL);
    Py_DECREF(bound);
    if (inner == NULL) {
        remember_error(self);
        finish(self);
        Py_DECREF(self);
        return NULL;
    }
    self->inner = inner;
    return (PyObject *)self;
}

static PyObject *
configure(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *pc, *cd, *ps, *ss, *ro, *sf, *fo;
    Py_ssize_t b, ir, iv, ic;
    if (!PyArg_ParseTuple(args, "OO!OOOOOn(nnn):configure", &pc, &PyDict_Type, &cd, &ps, &ss, &ro, &sf,
                          &fo, &b, &ir, &iv, &ic))
        return NULL;
    i_rollout = ir;
    i_variant = iv;
    i_set_cookie = ic;
    Py_XSETREF(perf_counter, Py_NewRef(pc));
    Py_XSETREF(codes, Py_NewRef(cd));
    Py_XSETREF(parse_status, Py_NewRef(ps));
    Py_XSETREF(slow_start, Py_NewRef(ss));
    Py_XSETREF(record_outcome, Py_NewRef(ro));
    Py_XSETREF(sink_failed, Py_NewRef(sf));
    Py_XSETREF(fold, Py_NewRef(fo));
    batch = b;
    Py_RETURN_NONE;
}

/* sender(exchange, server_send, extra) -> Sender */
static PyObject *
sender(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    Sender *self;
    if (nargs != 3 || !PyList_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "sender(exchange, server_send, extra: list)");
        return NULL;
    }
    self = PyObject_GC_New(Sender, &SenderType);
    if (self == NULL)
        return NULL;
    self->x = Py_NewRef(args[0]);
    self->server_send = Py_NewRef(args[1]);
    self->extra = Py_NewRef(args[2]);
    self->vectorcall = Sender_vectorcall_entry;
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

static PyMethodDef module_methods[] = {
    {"sender", (PyCFunction)(void (*)(void))sender, METH_FASTCALL,
     "sender(exchange, server_send, extra): the send to give an ASGI app for one request."},
    {"respond", (PyCFunction)(void (*)(void))respond, METH_FASTCALL,
     "respond(mw, app, decision, environ, start_response, wall): call app, return our iterable."},
    {"configure", configure, METH_VARARGS, "Hand over the Python helpers (called once by wsgi.py)."},
    {NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "canarymw._speedups",
    "Optional C implementation of the WSGI adapter's per-request hot path.", -1, module_methods,
};

#define INTERN(var, text)                                                                         \
    if ((var = PyUnicode_InternFromString(text)) == NULL)                                         \
        return NULL;

PyMODINIT_FUNC
PyInit__speedups(void)
{
    PyObject *m;
    /* The helpers configure() keeps are one interpreter's objects: in a sub-interpreter
     * (mod_wsgi's default) the pure-Python path is used instead. */
    if (PyInterpreterState_Get() != PyInterpreterState_Main()) {
        PyErr_SetString(PyExc_ImportError, "canarymw._speedups is only loaded in the main interpreter");
        return NULL;
    }
    INTERN(s_record, "_record");
    INTERN(s_append, "append");
    INTERN(s_memory, "_memory");
    INTERN(s_pending, "_pending");
    INTERN(s_split_only, "split_only");
    INTERN(s_extra_headers, "extra_headers");
    INTERN(s_set_cookie, "set_cookie");
    INTERN(s_rollout, "rollout");
    INTERN(s_variant, "variant");
    INTERN(s_close, "close");
    INTERN(s_get, "get");
    INTERN(s_name, "__name__");
    INTERN(s_error_key, "canarymw.error");
    INTERN(s_split_key, "canarymw.split");
    INTERN(s_route_key, "canarymw.route");
    INTERN(s_method_key, "REQUEST_METHOD");
    INTERN(s_get_method, "GET");
    INTERN(s_head, "HEAD");
    INTERN(s_set_cookie_header, "Set-Cookie");
    INTERN(s_type, "type");
    INTERN(s_body_kind, "http.response.body");
    INTERN(s_start_kind, "http.response.start");
    INTERN(s_more_body, "more_body");
    INTERN(s_headers, "headers");
    INTERN(s_status, "status");
    INTERN(s_trailers, "trailers");
    INTERN(s_ended, "ended");
    INTERN(s_done, "done");
    INTERN(s_finish, "finish");
    INTERN(s_send, "send");
    INTERN(s_throw, "throw");
    if (PyType_Ready(&ResponseType) < 0 || PyType_Ready(&SenderType) < 0 || PyType_Ready(&AwaiterType) < 0)
        return NULL;
    m = PyModule_Create(&module_def);
    if (m == NULL)
        return NULL;
    Py_INCREF(&ResponseType);
    if (PyModule_AddObject(m, "Response", (PyObject *)&ResponseType) < 0) {
        Py_DECREF(&ResponseType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
