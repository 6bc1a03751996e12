/* Optional C implementation of the adapters' per-request hot paths: the WSGI
 * response object and the ASGI HTTP request.
 *
 * canarymw/wsgi.py (_Response) and canarymw/asgi.py (ASGICanaryMiddleware.__call__,
 * _Exchange) hold the reference implementations and use these when they were built.
 * Both must behave the same: the test suite runs every adapter test against each.
 * Everything unusual (a header list of another shape, a status line not seen before,
 * a first visit's decision, a failing sink) is handed back to the Python code, so
 * this file only has to be right about the common case.
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
#if defined(__linux__)
    /* What time.perf_counter() reads on Linux: durations may mix both. */
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

/* mapping.get(key, dflt) (a WSGI environ or an ASGI scope): a new reference. */
static PyObject *
mapping_get(PyObject *mapping, PyObject *key, PyObject *dflt)
{
    PyObject *v;
    if (PyDict_CheckExact(mapping)) {
        v = PyDict_GetItemWithError(mapping, key);
        if (v == NULL && PyErr_Occurred())
            return NULL;
        return Py_NewRef(v ? v : dflt);
    }
    return PyObject_CallMethodObjArgs(mapping, s_get, key, dflt, NULL);
}

/* obj.close() if it has one (None if not): the result, or NULL with an exception. */
static PyObject *
call_close(PyObject *obj)
{
    PyObject *meth, *res;
    int found = optional_attr(obj, s_close, &meth);
    if (found <= 0)
        return found < 0 ? NULL : Py_NewRef(Py_None);
    res = PyObject_CallNoArgs(meth);
    Py_DECREF(meth);
    return res;
}

/* The GC-tracked types' tp_dealloc: untrack, drop the references (tp_clear), free. */
static void
gc_dealloc(PyObject *self)
{
    PyObject_GC_UnTrack(self);
    Py_TYPE(self)->tp_clear(self);
    Py_TYPE(self)->tp_free(self);
}

static PyObject *
decision_field(PyObject *decision, Py_ssize_t i, PyObject *name)
{
    if (PyTuple_Check(decision) && i < PyTuple_GET_SIZE(decision))
        return Py_NewRef(PyTuple_GET_ITEM(decision, i));
    return PyObject_GetAttr(decision, name);
}

/* Hand one outcome's fields (in Outcome order) to mw's sink: straight into a
 * MemorySink's queue, else through _outcomes.deliver. -1 with an exception set. */
static int
hand_over(PyObject *mw, PyObject *fields)
{
    PyObject *memory = PyObject_GetAttr(mw, s_memory), *pending, *res;
    if (memory == NULL)
        return -1;
    if (memory == Py_None) {
        Py_DECREF(memory);
        res = PyObject_CallFunctionObjArgs(record_outcome, mw, fields, NULL);
    }
    else {
        pending = PyObject_GetAttr(memory, s_pending);
        res = pending ? PyObject_CallMethodOneArg(pending, s_append, fields) : NULL;
        if (res != NULL) {
            Py_ssize_t n = PyObject_Size(pending);
            Py_DECREF(res);
            res = n < 0 ? NULL : n >= batch ? PyObject_CallOneArg(fold, memory) : Py_NewRef(Py_None);
        }
        Py_XDECREF(pending);
        Py_DECREF(memory);
    }
    if (res == NULL)
        return -1;
    Py_DECREF(res);
    return 0;
}

/* Recording an outcome raised (pending). As in Python (_outcomes.deliver): an
 * Exception is a failing sink, counted by sink_failed and cleared: 0. Anything else
 * (KeyboardInterrupt, SystemExit, cancellation) is not the sink's to swallow and stays
 * pending: -1. */
static int
outcome_failed(PyObject *mw)
{
    PyObject *t2, *v2, *tb2, *res;
    if (!PyErr_ExceptionMatches(PyExc_Exception))
        return -1;
    PyErr_Fetch(&t2, &v2, &tb2);
    PyErr_NormalizeException(&t2, &v2, &tb2);
    if (tb2 != NULL)
        PyException_SetTraceback(v2, tb2);
    res = PyObject_CallFunctionObjArgs(sink_failed, mw, v2, NULL);
    if (res == NULL)
        PyErr_WriteUnraisable(mw);
    Py_XDECREF(res);
    Py_XDECREF(t2);
    Py_XDECREF(v2);
    Py_XDECREF(tb2);
    return 0;
}

/* End an outcome's recording: (type, value, tb), the exception that was pending when it
 * began (stolen; may be NULL), is pending again, unless recording itself left one
 * pending (a sink's BaseException), which then propagates in its place with it as its
 * __context__, as when Python code raises in an except block. -1 in that case. */
static int
outcome_done(PyObject *type, PyObject *value, PyObject *tb)
{
    PyObject *t2, *v2, *tb2;
    if (!PyErr_Occurred()) {
        PyErr_Restore(type, value, tb);
        return 0;
    }
    if (type == NULL)
        return -1;
    PyErr_Fetch(&t2, &v2, &tb2);
    PyErr_NormalizeException(&t2, &v2, &tb2);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL)
        PyException_SetTraceback(value, tb);
    if (v2 != NULL && value != NULL && v2 != value) {
        PyObject *context = PyException_GetContext(v2);
        if (context == NULL)
            PyException_SetContext(v2, Py_NewRef(value));
        Py_XDECREF(context);
    }
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    PyErr_Restore(t2, v2, tb2);
    return -1;
}

/* Record the outcome once. A failing sink is counted by sink_failed; -1 only when a
 * sink raised something other than an Exception, which is then pending. */
static int
finish(Response *self)
{
    PyObject *mw = self->mw, *record = NULL, *error = NULL, *method = NULL, *route = NULL,
             *fields = NULL, *flag, *rollout = NULL, *variant = NULL;
    PyObject *type, *value, *tb;
    double end;
    int split_only, disconnected;

    if (self->finished || mw == NULL || self->environ == NULL || self->decision == NULL)
        return 0;
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
        flag = mapping_get(self->environ, s_split_key, Py_None);
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
        error = mapping_get(self->environ, s_error_key, Py_None);
        if (error == NULL)
            goto failed;
    }
    method = mapping_get(self->environ, s_method_key, s_get_method);
    if (method == NULL)
        goto failed;
    route = mapping_get(self->environ, s_route_key, Py_None);
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
    if (hand_over(mw, fields) < 0)
        goto failed;
    goto done;

failed:
    outcome_failed(mw);
done:
    Py_XDECREF(record);
    Py_XDECREF(error);
    Py_XDECREF(method);
    Py_XDECREF(route);
    Py_XDECREF(rollout);
    Py_XDECREF(variant);
    Py_XDECREF(fields);
    return outcome_done(type, value, tb);
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
    PyObject *inner = self->inner, *res;
    if (inner == NULL)
        Py_RETURN_NONE;
    self->inner = NULL;
    Py_CLEAR(self->it);
    res = call_close(inner);
    if (res == NULL)
        goto raised;
    Py_DECREF(res);
    Py_DECREF(inner);
    if (finish(self) < 0)
        return NULL;
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
    .tp_dealloc = gc_dealloc,
    .tp_traverse = (traverseproc)Response_traverse,
    .tp_clear = (inquiry)Response_clear,
    .tp_iter = (getiterfunc)Response_iter,
    .tp_iternext = (iternextfunc)Response_next,
    .tp_methods = Response_methods,
    .tp_members = Response_members,
};

/* ---- ASGI: one HTTP request ------------------------------------------------------
 *
 * asgi.ASGICanaryMiddleware.__call__ and asgi._Exchange are the reference
 * implementation. A Router (one per middleware) copies the scope, decides, and calls
 * the chosen app with a Receiver and a Sender; the Exchange it returns is the request's
 * state and the awaitable that drives the app. Decisions other than a cached returning
 * visitor's are made by ASGICanaryMiddleware._decide/_pick, and every message other
 * than a plain response start (no Vary/Cache-Control from the app) or body goes to
 * _Exchange.send with the Exchange as its self, so this file only has to be right
 * about the common case.
 */

static PyObject *s_type, *s_body_kind, *s_start_kind, *s_more_body, *s_headers, *s_status, *s_trailers,
    *s_throw, *s_decide, *s_pick, *s_old_app, *s_decision_key, *s_method, *s_route, *s_path, *s_new,
    *s_disconnect_kind, *b_set_cookie;
static PyObject *py_send;   /* asgi._Exchange.send */
static PyObject *wall_time; /* time.time */

typedef struct {
    PyObject_HEAD
    PyObject *mw;
    PyObject *decision;
    PyObject *scope; /* our copy */
    PyObject *server_send;
    PyObject *server_receive;
    PyObject *extra;  /* header pairs to append to a response start */
    PyObject *cookie; /* the Set-Cookie value (bytes), or NULL */
    PyObject *status;
    PyObject *it; /* the app's awaitable, as an iterator, until it ends */
    double wall;
    double started;
    double ended; /* when the last response message went out; 0: not yet */
    char trailers;
    char done; /* the outcome has been recorded */
} Exchange;

typedef struct {
    PyObject_HEAD
    Exchange *x;
    vectorcallfunc vectorcall;
} Channel; /* the send or receive given to the app */

typedef struct {
    PyObject_HEAD
    Exchange *x;
    PyObject *it; /* the server's awaitable, as an iterator */
    char last;    /* a send of the last response message */
    char receiving;
} Awaiter;

typedef struct {
    PyObject_HEAD
    PyObject *mw;
    PyObject *cached; /* rollout.cached, or NULL when decide() must always run */
    PyObject *extra;
    vectorcallfunc vectorcall;
} Router;

static PyTypeObject ExchangeType, SenderType, ReceiverType, AwaiterType, RouterType;

static int
wall_now(double *out)
{
#if defined(__linux__)
    struct timespec ts;
    if (clock_gettime(CLOCK_REALTIME, &ts) == 0) {
        *out = (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
        return 0;
    }
#endif
    PyObject *t = PyObject_CallNoArgs(wall_time);
    if (t == NULL)
        return -1;
    *out = PyFloat_AsDouble(t);
    Py_DECREF(t);
    return (*out == -1.0 && PyErr_Occurred()) ? -1 : 0;
}

/* Record the outcome once (ASGICanaryMiddleware._outcome); the pending exception, if
 * any, stays pending. -1 only when a sink raised something other than an Exception,
 * which is then pending instead (see outcome_done). */
static int
exchange_finish(Exchange *x, PyObject *error, int disconnected, double at)
{
    PyObject *mw = x->mw, *scope = x->scope, *record = NULL, *route = NULL, *err = NULL, *method = NULL,
             *rollout = NULL, *variant = NULL, *fields = NULL, *type, *value, *tb;
    x->done = 1;
    if (mw == NULL || scope == NULL || x->decision == NULL)
        return 0;
    PyErr_Fetch(&type, &value, &tb);
    record = PyObject_GetAttr(mw, s_record);
    if (record == NULL)
        goto failed;
    if (record == Py_None)
        goto done;
    route = mapping_get(scope, s_route_key, Py_None);
    if (route == NULL)
        goto failed;
    if (route == Py_None) {
        /* Starlette's Router (and FastAPI's) store the matched route object here. */
        PyObject *obj = PyDict_GetItemWithError(scope, s_route), *path = NULL;
        if (obj == NULL && PyErr_Occurred())
            goto failed;
        if (obj != NULL && optional_attr(obj, s_path, &path) < 0)
            goto failed;
        if (path != NULL && PyUnicode_Check(path))
            Py_SETREF(route, path);
        else
            Py_XDECREF(path);
    }
    if (error != NULL && error != Py_None) {
        err = Py_NewRef(error);
    }
    else if ((err = mapping_get(scope, s_error_key, Py_None)) == NULL) {
        goto failed;
    }
    method = mapping_get(scope, s_method, s_get_method);
    if (method == NULL)
        goto failed;
    rollout = decision_field(x->decision, i_rollout, s_rollout);
    if (rollout == NULL)
        goto failed;
    variant = decision_field(x->decision, i_variant, s_variant);
    if (variant == NULL)
        goto failed;
    fields = PyTuple_New(10);
    if (fields == NULL)
        goto failed;
    PyTuple_SET_ITEM(fields, 0, rollout);
    PyTuple_SET_ITEM(fields, 1, variant);
    rollout = variant = NULL;
    PyTuple_SET_ITEM(fields, 2, Py_NewRef(x->status ? x->status : Py_None));
    PyTuple_SET_ITEM(fields, 3, PyFloat_FromDouble(at - x->started));
    PyTuple_SET_ITEM(fields, 4, err);
    PyTuple_SET_ITEM(fields, 5, Py_NewRef(disconnected ? Py_True : Py_False));
    PyTuple_SET_ITEM(fields, 6, method);
    PyTuple_SET_ITEM(fields, 7, route);
    PyTuple_SET_ITEM(fields, 8, PyFloat_FromDouble(x->wall));
    PyTuple_SET_ITEM(fields, 9, Py_NewRef(Py_None));
    err = method = route = NULL;
    if (PyTuple_GET_ITEM(fields, 3) == NULL || PyTuple_GET_ITEM(fields, 8) == NULL)
        goto failed;
    if (hand_over(mw, fields) == 0)
        goto done;
failed:
    outcome_failed(mw);
done:
    Py_XDECREF(record);
    Py_XDECREF(route);
    Py_XDECREF(err);
    Py_XDECREF(method);
    Py_XDECREF(rollout);
    Py_XDECREF(variant);
    Py_XDECREF(fields);
    return outcome_done(type, value, tb);
}

/* Now; the start of the request if the clock fails (reported, never raised), so an
 * outcome is still recorded. Call with no exception pending. */
static double
now_or_started(Exchange *x)
{
    double t;
    if (now(&t) < 0) {
        PyErr_WriteUnraisable((PyObject *)x);
        return x->started;
    }
    return t;
}

/* The end of the response if it went out, else now. */
static double
end_or_now(Exchange *x)
{
    return x->ended ? x->ended : now_or_started(x);
}

/* The app returned: the outcome, unless a disconnect already recorded it. */
static int
exchange_returned(Exchange *x)
{
    return x->done ? 0 : exchange_finish(x, NULL, 0, end_or_now(x));
}

/* The app raised (the exception is pending and stays so): an Exception is recorded by
 * its type name; anything else (cancelled from outside) is a disconnect unless the
 * response had ended. */
static void
exchange_raised(Exchange *x)
{
    PyObject *name = NULL, *type, *value, *tb;
    int error;
    double at;
    if (x->done)
        return;
    error = PyErr_ExceptionMatches(PyExc_Exception);
    if (error)
        name = pending_error_name();
    PyErr_Fetch(&type, &value, &tb); /* nothing pending while the clock is read */
    at = end_or_now(x);
    PyErr_Restore(type, value, tb);
    exchange_finish(x, name, error ? 0 : !x->ended, at);
    Py_XDECREF(name);
}

/* A send that raised OSError (pending, stays so): the client is gone. */
static void
record_disconnect(Exchange *x)
{
    PyObject *type, *value, *tb;
    double at;
    if (x->done)
        return;
    PyErr_Fetch(&type, &value, &tb);
    at = now_or_started(x);
    PyErr_Restore(type, value, tb);
    exchange_finish(x, NULL, 1, at);
}

/* The iterator to drive for an awaitable (coroutines directly, no wrapper); steals aw. */
static PyObject *
awaitable_iter(PyObject *aw)
{
    PyObject *it;
    if (PyCoro_CheckExact(aw))
        return aw;
    if (Py_TYPE(aw)->tp_as_async == NULL || Py_TYPE(aw)->tp_as_async->am_await == NULL) {
        PyErr_Format(PyExc_TypeError, "object %.100s can't be used in 'await' expression", Py_TYPE(aw)->tp_name);
        Py_DECREF(aw);
        return NULL;
    }
    it = Py_TYPE(aw)->tp_as_async->am_await(aw);
    Py_DECREF(aw);
    if (it != NULL && Py_TYPE(it)->tp_iternext == NULL) {
        PyErr_Format(PyExc_TypeError, "__await__() returned non-iterator of type '%.100s'", Py_TYPE(it)->tp_name);
        Py_CLEAR(it);
    }
    return it;
}

/* Raise StopIteration(value) (a coroutine's return); steals value. */
static void
set_stop(PyObject *value)
{
    if (value == Py_None) {
        PyErr_SetNone(PyExc_StopIteration);
    }
    else {
        PyObject *exc = PyObject_CallOneArg(PyExc_StopIteration, value);
        if (exc != NULL) {
            PyErr_SetObject(PyExc_StopIteration, exc);
            Py_DECREF(exc);
        }
    }
    Py_DECREF(value);
}

/* The value of a pending StopIteration, cleared (a new reference); NULL if another
 * exception is pending. */
static PyObject *
take_stop_value(void)
{
    PyObject *type, *value, *tb, *res;
    if (!PyErr_ExceptionMatches(PyExc_StopIteration))
        return NULL;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    res = Py_NewRef(value ? ((PyStopIterationObject *)value)->value : Py_None);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    return res;
}

/* The generator protocol on top of am_send, shared by Exchange and Awaiter (3.12+
 * await loops call __next__/send rather than am_send). */
static PyObject *
step(PyObject *self, PyObject *value, int method)
{
    PyObject *res;
    PySendResult r = Py_TYPE(self)->tp_as_async->am_send(self, value, &res);
    if (r == PYGEN_NEXT)
        return res;
    if (r == PYGEN_RETURN) {
        if (!method && res == Py_None)
            Py_DECREF(res); /* __next__ may end without an exception */
        else
            set_stop(res);
    }
    return NULL;
}

static PyObject *
step_next(PyObject *self)
{
    return step(self, Py_None, 0);
}

static PyObject *
step_send(PyObject *self, PyObject *value)
{
    return step(self, value, 1);
}

static PyObject *
same(PyObject *self)
{
    return Py_NewRef(self);
}

/* Throw into an iterator as `await` would: its throw(), or raise it in place. */
static PyObject *
throw_into(PyObject *it, PyObject *args)
{
    PyObject *meth, *res;
    int found = optional_attr(it, s_throw, &meth);
    if (found < 0)
        return NULL;
    if (found == 0) {
        PyObject *typ = PyTuple_GET_SIZE(args) > 0 ? PyTuple_GET_ITEM(args, 0) : PyExc_TypeError;
        PyObject *val = PyTuple_GET_SIZE(args) > 1 ? PyTuple_GET_ITEM(args, 1) : Py_None;
        if (PyExceptionInstance_Check(typ))
            PyErr_SetObject((PyObject *)Py_TYPE(typ), typ);
        else
            PyErr_SetObject(typ, val);
        return NULL;
    }
    res = PyObject_Call(meth, args, NULL);
    Py_DECREF(meth);
    return res;
}

/* ---- Awaiter: one call of the server's send or receive ---- */

/* After the server's awaitable returned res (stolen): the value the app gets. */
static PyObject *
Awaiter_complete(Awaiter *self, PyObject *res)
{
    Exchange *x = self->x;
    if (self->receiving) {
        if (!(x->done || x->ended)) {
            PyObject *kind;
            int is_disconnect;
            if (PyDict_CheckExact(res)) {
                kind = PyDict_GetItemWithError(res, s_type);
                if (kind == NULL) {
                    if (!PyErr_Occurred())
                        PyErr_SetObject(PyExc_KeyError, s_type);
                    Py_DECREF(res);
                    return NULL;
                }
                Py_INCREF(kind);
            }
            else if ((kind = PyObject_GetItem(res, s_type)) == NULL) {
                Py_DECREF(res);
                return NULL;
            }
            is_disconnect = PyObject_RichCompareBool(kind, s_disconnect_kind, Py_EQ);
            Py_DECREF(kind);
            if (is_disconnect < 0) {
                Py_DECREF(res);
                return NULL;
            }
            if (is_disconnect) {
                double t;
                if (now(&t) < 0) {
                    Py_DECREF(res);
                    return NULL;
                }
                if (exchange_finish(x, NULL, 1, t) < 0) {
                    Py_DECREF(res);
                    return NULL;
                }
            }
        }
        return res;
    }
    Py_DECREF(res);
    if (self->last && now(&x->ended) < 0)
        return NULL;
    return Py_NewRef(Py_None);
}

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
        *result = Awaiter_complete(self, res);
        return *result ? PYGEN_RETURN : PYGEN_ERROR;
    }
    if (!self->receiving && PyErr_ExceptionMatches(PyExc_OSError))
        record_disconnect(self->x);
    *result = NULL;
    return PYGEN_ERROR;
}

static PyObject *
Awaiter_throw(Awaiter *self, PyObject *args)
{
    PyObject *res = throw_into(self->it, args);
    if (res != NULL)
        return res;
    res = take_stop_value();
    if (res != NULL) {
        res = Awaiter_complete(self, res);
        if (res != NULL)
            set_stop(res);
        return NULL;
    }
    if (!self->receiving && PyErr_ExceptionMatches(PyExc_OSError))
        record_disconnect(self->x);
    return NULL;
}

static PyObject *
Awaiter_close(Awaiter *self, PyObject *Py_UNUSED(ignored))
{
    return call_close(self->it);
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

static PyMethodDef Awaiter_methods[] = {
    {"send", (PyCFunction)step_send, METH_O, NULL},
    {"throw", (PyCFunction)Awaiter_throw, METH_VARARGS, NULL},
    {"close", (PyCFunction)Awaiter_close, METH_NOARGS, NULL},
    {NULL},
};

static PyAsyncMethods Awaiter_async = {.am_await = same, .am_send = Awaiter_am_send};

static PyTypeObject AwaiterType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "canarymw._speedups.Awaiter",
    .tp_basicsize = sizeof(Awaiter),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Awaits the server's send or receive for one call (C implementation).",
    .tp_dealloc = gc_dealloc,
    .tp_traverse = (traverseproc)Awaiter_traverse,
    .tp_clear = (inquiry)Awaiter_clear,
    .tp_as_async = &Awaiter_async,
    .tp_iter = same,
    .tp_iternext = step_next,
    .tp_methods = Awaiter_methods,
};

/* An Awaiter for the server's awaitable aw (stolen). */
static PyObject *
new_awaiter(Exchange *x, PyObject *aw, int last, int receiving)
{
    Awaiter *self;
    PyObject *it = awaitable_iter(aw);
    if (it == NULL)
        return NULL;
    self = PyObject_GC_New(Awaiter, &AwaiterType);
    if (self == NULL) {
        Py_DECREF(it);
        return NULL;
    }
    self->x = (Exchange *)Py_NewRef(x);
    self->it = it;
    self->last = (char)last;
    self->receiving = (char)receiving;
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

/* ---- Sender and Receiver ---- */

/* bool(message.get(key, False)) for an exact dict: 1, 0, or -1 with an exception. */
static int
dict_flag(PyObject *message, PyObject *key)
{
    PyObject *v = PyDict_GetItemWithError(message, key);
    if (v == NULL)
        return PyErr_Occurred() ? -1 : 0;
    return PyObject_IsTrue(v);
}

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
            || (PyBytes_GET_SIZE(name) == 13 && memcmp(PyBytes_AS_STRING(name), "cache-control", 13) == 0))
            return 0;
    }
    return 1;
}

/* The channel's request, or NULL (RuntimeError) if the garbage collector tore it down. */
static Exchange *
live(PyObject *op)
{
    Exchange *x = ((Channel *)op)->x;
    if (x == NULL || x->server_send == NULL || x->server_receive == NULL || x->extra == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "send() or receive() called on a request that was torn down");
        return NULL;
    }
    return x;
}

static PyObject *
Sender_call(PyObject *op, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Exchange *x = live(op);
    PyObject *message, *kind, *msg, *aw;
    int last = 0;
    if (x == NULL)
        return NULL;
    if (PyVectorcall_NARGS(nargsf) != 1 || kwnames != NULL)
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
        int more_body = dict_flag(message, s_more_body);
        if (more_body < 0)
            return NULL;
        last = !(x->ended || x->trailers || more_body);
        msg = Py_NewRef(message);
    }
    else if (PyUnicode_Compare(kind, s_start_kind) == 0) {
        PyObject *headers = PyDict_GetItemWithError(message, s_headers), *status, *merged;
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
        has_trailers = dict_flag(message, s_trailers);
        if (has_trailers < 0)
            return NULL;
        Py_XSETREF(x->status, Py_NewRef(status ? status : Py_None));
        x->trailers = (char)has_trailers;
        merged = PyNumber_Add(headers, x->extra);
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
    aw = PyObject_CallOneArg(x->server_send, msg);
    Py_DECREF(msg);
    if (aw == NULL) {
        if (PyErr_ExceptionMatches(PyExc_OSError))
            record_disconnect(x);
        return NULL;
    }
    return new_awaiter(x, aw, last, 0);

python : {
    /* The reference implementation, _Exchange.send, with the Exchange as its self. */
    PyObject *bound = PyMethod_New(py_send, (PyObject *)x), *res;
    if (bound == NULL)
        return NULL;
    res = PyObject_Vectorcall(bound, args, nargsf, kwnames);
    Py_DECREF(bound);
    return res;
}
}

static PyObject *
Receiver_call(PyObject *op, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Exchange *x = live(op);
    PyObject *aw;
    if (x == NULL)
        return NULL;
    if (PyVectorcall_NARGS(nargsf) != 0 || kwnames != NULL) {
        PyErr_SetString(PyExc_TypeError, "receive() takes no arguments");
        return NULL;
    }
    aw = PyObject_CallNoArgs(x->server_receive);
    if (aw == NULL)
        return NULL;
    return new_awaiter(x, aw, 0, 1);
}

static int
Channel_traverse(Channel *self, visitproc visit, void *arg)
{
    Py_VISIT(self->x);
    return 0;
}

static int
Channel_clear(Channel *self)
{
    Py_CLEAR(self->x);
    return 0;
}

#ifndef Py_TPFLAGS_HAVE_VECTORCALL
#define Py_TPFLAGS_HAVE_VECTORCALL _Py_TPFLAGS_HAVE_VECTORCALL
#endif

#define CHANNEL_TYPE(var, name, doc)                                                              \
    static PyTypeObject var = {                                                                   \
        PyVarObject_HEAD_INIT(NULL, 0).tp_name = "canarymw._speedups." name,                      \
        .tp_basicsize = sizeof(Channel),                                                          \
        .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,         \
        .tp_vectorcall_offset = offsetof(Channel, vectorcall),                                    \
        .tp_doc = doc,                                                                            \
        .tp_dealloc = gc_dealloc,                                                \
        .tp_traverse = (traverseproc)Channel_traverse,                                            \
        .tp_clear = (inquiry)Channel_clear,                                                       \
        .tp_call = PyVectorcall_Call,                                                             \
    };

CHANNEL_TYPE(SenderType, "Sender", "The ASGI send an app is given (C implementation of _Exchange.send).")
CHANNEL_TYPE(ReceiverType, "Receiver", "The ASGI receive an app is given (C implementation of _Exchange.receive).")

static PyObject *
new_channel(PyTypeObject *type, Exchange *x, vectorcallfunc call)
{
    Channel *self = PyObject_GC_New(Channel, type);
    if (self == NULL)
        return NULL;
    self->x = (Exchange *)Py_NewRef(x);
    self->vectorcall = call;
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

/* ---- Exchange: the request, awaited by ASGICanaryMiddleware.__call__ ---- */

static PySendResult
Exchange_am_send(PyObject *op, PyObject *value, PyObject **result)
{
    Exchange *x = (Exchange *)op;
    PyObject *res, *it = x->it;
    PySendResult r;
    if (it == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "cannot reuse already awaited request");
        *result = NULL;
        return PYGEN_ERROR;
    }
    r = PyIter_Send(it, value, &res);
    if (r == PYGEN_NEXT) {
        *result = res;
        return PYGEN_NEXT;
    }
    x->it = NULL;
    Py_DECREF(it);
    if (r == PYGEN_RETURN) {
        Py_DECREF(res);
        if (exchange_returned(x) < 0) {
            *result = NULL;
            return PYGEN_ERROR;
        }
        *result = Py_NewRef(Py_None);
        return PYGEN_RETURN;
    }
    exchange_raised(x);
    *result = NULL;
    return PYGEN_ERROR;
}

static PyObject *
Exchange_throw(Exchange *x, PyObject *args)
{
    PyObject *res, *it = x->it;
    if (it == NULL)
        return throw_into(Py_None, args);
    Py_INCREF(it);
    res = throw_into(it, args);
    if (res != NULL) {
        Py_DECREF(it);
        return res;
    }
    if (x->it == it)
        Py_CLEAR(x->it);
    Py_DECREF(it);
    res = take_stop_value();
    if (res != NULL) {
        Py_DECREF(res);
        if (exchange_returned(x) == 0)
            PyErr_SetNone(PyExc_StopIteration);
        return NULL;
    }
    exchange_raised(x);
    return NULL;
}

static PyObject *
Exchange_close(Exchange *x, PyObject *Py_UNUSED(ignored))
{
    PyObject *it = x->it, *res;
    if (it == NULL)
        Py_RETURN_NONE;
    x->it = NULL;
    res = call_close(it);
    Py_DECREF(it);
    if (res == NULL) {
        exchange_raised(x);
        return NULL;
    }
    Py_DECREF(res);
    /* As a coroutine closed while awaiting: GeneratorExit, not an Exception. */
    if (!x->done && exchange_finish(x, NULL, !x->ended, end_or_now(x)) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* finish(error, disconnected, at): _Exchange.finish, for _Exchange.send. */
static PyObject *
Exchange_finish_method(Exchange *x, PyObject *const *args, Py_ssize_t nargs)
{
    int disconnected;
    double at;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "finish(error, disconnected, at)");
        return NULL;
    }
    if ((disconnected = PyObject_IsTrue(args[1])) < 0)
        return NULL;
    at = PyFloat_AsDouble(args[2]);
    if (at == -1.0 && PyErr_Occurred())
        return NULL;
    if (exchange_finish(x, args[0], disconnected, at) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static int
Exchange_traverse(Exchange *x, visitproc visit, void *arg)
{
    Py_VISIT(x->mw);
    Py_VISIT(x->decision);
    Py_VISIT(x->scope);
    Py_VISIT(x->server_send);
    Py_VISIT(x->server_receive);
    Py_VISIT(x->extra);
    Py_VISIT(x->cookie);
    Py_VISIT(x->status);
    Py_VISIT(x->it);
    return 0;
}

static int
Exchange_clear(Exchange *x)
{
    Py_CLEAR(x->mw);
    Py_CLEAR(x->decision);
    Py_CLEAR(x->scope);
    Py_CLEAR(x->server_send);
    Py_CLEAR(x->server_receive);
    Py_CLEAR(x->extra);
    Py_CLEAR(x->cookie);
    Py_CLEAR(x->status);
    Py_CLEAR(x->it);
    return 0;
}

static PyMethodDef Exchange_methods[] = {
    {"send", (PyCFunction)step_send, METH_O, NULL},
    {"throw", (PyCFunction)Exchange_throw, METH_VARARGS, NULL},
    {"close", (PyCFunction)Exchange_close, METH_NOARGS, NULL},
    {"finish", (PyCFunction)(void (*)(void))Exchange_finish_method, METH_FASTCALL,
     "Record the outcome once: finish(error, disconnected, at)."},
    {NULL},
};

/* What _Exchange.send reads and writes. */
static PyMemberDef Exchange_members[] = {
    {"mw", T_OBJECT, offsetof(Exchange, mw), READONLY, NULL},
    {"decision", T_OBJECT, offsetof(Exchange, decision), READONLY, NULL},
    {"scope", T_OBJECT, offsetof(Exchange, scope), READONLY, NULL},
    {"server_send", T_OBJECT, offsetof(Exchange, server_send), READONLY, NULL},
    {"server_receive", T_OBJECT, offsetof(Exchange, server_receive), READONLY, NULL},
    {"extra", T_OBJECT, offsetof(Exchange, extra), READONLY, NULL},
    {"cookie", T_OBJECT, offsetof(Exchange, cookie), READONLY, NULL},
    {"status", T_OBJECT, offsetof(Exchange, status), 0, NULL},
    {"ended", T_DOUBLE, offsetof(Exchange, ended), 0, NULL},
    {"trailers", T_BOOL, offsetof(Exchange, trailers), 0, NULL},
    {"done", T_BOOL, offsetof(Exchange, done), READONLY, NULL},
    {"wall", T_DOUBLE, offsetof(Exchange, wall), READONLY, NULL},
    {"started", T_DOUBLE, offsetof(Exchange, started), READONLY, NULL},
    {NULL},
};

static PyAsyncMethods Exchange_async = {.am_await = same, .am_send = Exchange_am_send};

static PyTypeObject ExchangeType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "canarymw._speedups.Exchange",
    .tp_basicsize = sizeof(Exchange),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "One HTTP request through the ASGI adapter (C implementation of asgi._Exchange).",
    .tp_dealloc = gc_dealloc,
    .tp_traverse = (traverseproc)Exchange_traverse,
    .tp_clear = (inquiry)Exchange_clear,
    .tp_as_async = &Exchange_async,
    .tp_iter = same,
    .tp_iternext = step_next,
    .tp_methods = Exchange_methods,
    .tp_members = Exchange_members,
};

/* ---- Router: ASGICanaryMiddleware.__call__ for one HTTP request ---- */

/* The joined Cookie header of a list or tuple of (bytes, bytes) tuples: a new
 * reference; NULL with an exception on error, or without one when there is no cookie
 * header or the headers have another shape (the caller then lets _decide read them).
 * Joined in one allocation: linear however many cookie headers there are.
 * See: RFC 9113 §8.2.3 (HTTP/2 splits cookies; rejoin with "; ") */
static PyObject *
cookie_of(PyObject *headers)
{
    PyObject *first = NULL, *out, **items;
    Py_ssize_t n, count = 0, size = 0;
    char *p;
    if (PyList_CheckExact(headers)) {
        n = PyList_GET_SIZE(headers);
        items = ((PyListObject *)headers)->ob_item;
    }
    else if (PyTuple_CheckExact(headers)) {
        n = PyTuple_GET_SIZE(headers);
        items = ((PyTupleObject *)headers)->ob_item;
    }
    else {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = items[i], *name, *value;
        if (!PyTuple_CheckExact(item) || PyTuple_GET_SIZE(item) != 2)
            return NULL;
        name = PyTuple_GET_ITEM(item, 0);
        if (!PyBytes_CheckExact(name))
            return NULL;
        if (PyBytes_GET_SIZE(name) != 6 || memcmp(PyBytes_AS_STRING(name), "cookie", 6) != 0)
            continue;
        value = PyTuple_GET_ITEM(item, 1);
        if (!PyBytes_CheckExact(value))
            return NULL;
        if (count++ == 0)
            first = value;
        size += PyBytes_GET_SIZE(value) + 2;
    }
    if (count <= 1)
        return first == NULL ? NULL : Py_NewRef(first);
    /* No Python code ran since the first pass: the same items, all well formed. */
    out = PyBytes_FromStringAndSize(NULL, size - 2);
    if (out == NULL)
        return NULL;
    p = PyBytes_AS_STRING(out);
    count = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *name = PyTuple_GET_ITEM(items[i], 0), *value;
        if (PyBytes_GET_SIZE(name) != 6 || memcmp(PyBytes_AS_STRING(name), "cookie", 6) != 0)
            continue;
        value = PyTuple_GET_ITEM(items[i], 1);
        if (count++ > 0) {
            memcpy(p, "; ", 2);
            p += 2;
        }
        memcpy(p, PyBytes_AS_STRING(value), (size_t)PyBytes_GET_SIZE(value));
        p += PyBytes_GET_SIZE(value);
    }
    return out;
}

/* Headers given as another iterable than a list or tuple (a generator, say) become a
 * list in the scope copy: the decision reads them once and the app again. */
static int
own_headers(PyObject *scope)
{
    PyObject *headers = PyDict_GetItemWithError(scope, s_headers), *list;
    int failed;
    if (headers == NULL)
        return PyErr_Occurred() ? -1 : 0;
    if (PyList_CheckExact(headers) || PyTuple_CheckExact(headers))
        return 0;
    list = PySequence_List(headers);
    if (list == NULL)
        return -1;
    failed = PyDict_SetItem(scope, s_headers, list);
    Py_DECREF(list);
    return failed;
}

/* A cached returning visitor's decision, or None (new references); NULL on error. */
static PyObject *
cached_decision(Router *self, PyObject *scope)
{
    PyObject *headers, *cookie, *text, *decision;
    headers = PyDict_GetItemWithError(scope, s_headers);
    if (headers == NULL)
        return PyErr_Occurred() ? NULL : Py_NewRef(Py_None);
    cookie = cookie_of(headers);
    if (cookie == NULL)
        return PyErr_Occurred() ? NULL : Py_NewRef(Py_None);
    text = PyUnicode_DecodeLatin1(PyBytes_AS_STRING(cookie), PyBytes_GET_SIZE(cookie), NULL);
    Py_DECREF(cookie);
    if (text == NULL)
        return NULL;
    decision = PyObject_CallOneArg(self->cached, text);
    Py_DECREF(text);
    return decision;
}

static PyObject *
Router_call(PyObject *op, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Router *self = (Router *)op;
    PyObject *scope, *decision = NULL, *app = NULL, *variant, *set_cookie, *sender, *receiver, *stack[3], *aw;
    Exchange *x;
    int is_new;
    if (PyVectorcall_NARGS(nargsf) != 3 || kwnames != NULL) {
        PyErr_SetString(PyExc_TypeError, "an ASGI app takes (scope, receive, send)");
        return NULL;
    }
    /* The server's scope is never changed: our copy carries the decision. */
    if (PyDict_CheckExact(args[0])) {
        scope = PyDict_Copy(args[0]);
    }
    else if ((scope = PyDict_New()) != NULL && PyDict_Merge(scope, args[0], 1) < 0) {
        Py_CLEAR(scope);
    }
    if (scope == NULL)
        return NULL;
    if (own_headers(scope) < 0)
        goto error;
    if (self->cached != NULL) {
        decision = cached_decision(self, scope);
        if (decision == NULL)
            goto error;
        if (decision == Py_None)
            Py_CLEAR(decision);
    }
    if (decision == NULL && (decision = PyObject_CallMethodOneArg(self->mw, s_decide, scope)) == NULL)
        goto error;
    variant = decision_field(decision, i_variant, s_variant);
    if (variant == NULL)
        goto error;
    is_new = PyObject_RichCompareBool(variant, s_new, Py_EQ);
    Py_DECREF(variant);
    if (is_new < 0)
        goto error;
    if (is_new) {
        PyObject *pair = PyObject_CallMethodObjArgs(self->mw, s_pick, scope, decision, NULL);
        if (pair == NULL)
            goto error;
        if (!PyTuple_CheckExact(pair) || PyTuple_GET_SIZE(pair) != 2) {
            Py_DECREF(pair);
            PyErr_SetString(PyExc_TypeError, "_pick() must return (app, decision)");
            goto error;
        }
        app = Py_NewRef(PyTuple_GET_ITEM(pair, 0));
        Py_SETREF(decision, Py_NewRef(PyTuple_GET_ITEM(pair, 1)));
        Py_DECREF(pair);
    }
    else if ((app = PyObject_GetAttr(self->mw, s_old_app)) == NULL) {
        goto error;
    }
    if (PyDict_SetItem(scope, s_decision_key, decision) < 0)
        goto error;
    set_cookie = decision_field(decision, i_set_cookie, s_set_cookie);
    if (set_cookie == NULL)
        goto error;
    x = PyObject_GC_New(Exchange, &ExchangeType);
    if (x == NULL) {
        Py_DECREF(set_cookie);
        goto error;
    }
    x->mw = Py_NewRef(self->mw);
    x->decision = decision;
    x->scope = scope;
    x->server_receive = Py_NewRef(args[1]);
    x->server_send = Py_NewRef(args[2]);
    x->extra = Py_NewRef(self->extra);
    x->cookie = x->status = x->it = NULL;
    x->ended = x->started = x->wall = 0.0;
    x->trailers = x->done = 0;
    PyObject_GC_Track(x);
    decision = scope = NULL; /* now x's */
    if (set_cookie != Py_None) {
        PyObject *pair;
        x->cookie = PyUnicode_AsLatin1String(set_cookie);
        if (x->cookie == NULL)
            goto failed_early;
        pair = PyTuple_Pack(2, b_set_cookie, x->cookie);
        if (pair == NULL)
            goto failed_early;
        Py_SETREF(x->extra, PySequence_List(self->extra));
        if (x->extra == NULL || PyList_Append(x->extra, pair) < 0) {
            Py_DECREF(pair);
            goto failed_early;
        }
        Py_DECREF(pair);
    }
    Py_DECREF(set_cookie);
    set_cookie = NULL;
    if (wall_now(&x->wall) < 0 || now(&x->started) < 0)
        goto failed_early;
    sender = new_channel(&SenderType, x, Sender_call);
    receiver = sender ? new_channel(&ReceiverType, x, Receiver_call) : NULL;
    if (receiver == NULL) {
        Py_XDECREF(sender);
        goto failed_early;
    }
    stack[0] = x->scope;
    stack[1] = receiver;
    stack[2] = sender;
    aw = PyObject_Vectorcall(app, stack, 3, NULL);
    Py_DECREF(receiver);
    Py_DECREF(sender);
    Py_CLEAR(app);
    if (aw == NULL || (x->it = awaitable_iter(aw)) == NULL) {
        /* As `await app(...)` raising inside the adapter's try. */
        exchange_raised(x);
        Py_DECREF(x);
        return NULL;
    }
    return (PyObject *)x;

failed_early:
    Py_XDECREF(set_cookie);
    Py_XDECREF(app);
    Py_DECREF(x);
    return NULL;
error:
    Py_XDECREF(app);
    Py_XDECREF(decision);
    Py_DECREF(scope);
    return NULL;
}

static int
Router_traverse(Router *self, visitproc visit, void *arg)
{
    Py_VISIT(self->mw);
    Py_VISIT(self->cached);
    Py_VISIT(self->extra);
    return 0;
}

static int
Router_clear(Router *self)
{
    Py_CLEAR(self->mw);
    Py_CLEAR(self->cached);
    Py_CLEAR(self->extra);
    return 0;
}

static PyTypeObject RouterType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "canarymw._speedups.Router",
    .tp_basicsize = sizeof(Router),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_vectorcall_offset = offsetof(Router, vectorcall),
    .tp_doc = "The ASGI adapter's HTTP request path (C implementation of ASGICanaryMiddleware.__call__).",
    .tp_dealloc = gc_dealloc,
    .tp_traverse = (traverseproc)Router_traverse,
    .tp_clear = (inquiry)Router_clear,
    .tp_call = PyVectorcall_Call,
};

/* router(mw, cached, extra) -> Router; cached: rollout.cached, or None. */
static PyObject *
router(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    Router *self;
    if (nargs != 3 || !PyList_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "router(mw, cached, extra: list)");
        return NULL;
    }
    self = PyObject_GC_New(Router, &RouterType);
    if (self == NULL)
        return NULL;
    self->mw = Py_NewRef(args[0]);
    self->cached = args[1] == Py_None ? NULL : Py_NewRef(args[1]);
    self->extra = Py_NewRef(args[2]);
    self->vectorcall = Router_call;
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

static PyObject *
configure_asgi(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *send, *wall;
    if (!PyArg_ParseTuple(args, "OO:configure_asgi", &send, &wall))
        return NULL;
    Py_XSETREF(py_send, Py_NewRef(send));
    Py_XSETREF(wall_time, Py_NewRef(wall));
    Py_RETURN_NONE;
}

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

static PyMethodDef module_methods[] = {
    {"router", (PyCFunction)(void (*)(void))router, METH_FASTCALL,
     "router(mw, cached, extra): the ASGI adapter's HTTP request path for one middleware."},
    {"configure_asgi", configure_asgi, METH_VARARGS, "Hand over the Python helpers (called once by asgi.py)."},
    {"respond", (PyCFunction)(void (*)(void))respond, METH_FASTCALL,
     "respond(mw, app, decision, environ, start_response, wall): call app, return our iterable."},
    {"configure", configure, METH_VARARGS, "Hand over the Python helpers (called once by wsgi.py)."},
    {NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "canarymw._speedups",
    "Optional C implementation of the adapters' per-request hot paths.", -1, module_methods,
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
    INTERN(s_throw, "throw");
    INTERN(s_decide, "_decide");
    INTERN(s_pick, "_pick");
    INTERN(s_old_app, "old_app");
    INTERN(s_decision_key, "canarymw.decision");
    INTERN(s_method, "method");
    INTERN(s_route, "route");
    INTERN(s_path, "path");
    INTERN(s_new, "new");
    INTERN(s_disconnect_kind, "http.disconnect");
    if ((b_set_cookie = PyBytes_FromString("set-cookie")) == NULL)
        return NULL;
    if (PyType_Ready(&ResponseType) < 0 || PyType_Ready(&SenderType) < 0 || PyType_Ready(&ReceiverType) < 0
        || PyType_Ready(&AwaiterType) < 0 || PyType_Ready(&ExchangeType) < 0 || PyType_Ready(&RouterType) < 0)
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
