"""Serve a request under mod_python's cgihandler by talking to its request object directly.

cgihandler emulates CGI with Python objects that break on Python 3 (mod_python/apache.py):
its stdin concatenates bytes to "" (any POST body is a TypeError), its stdout takes str only
and sends bytes as their repr, drops the reason phrase of the status and turns a status
Apache does not know (418) into 500. Both keep the real request as ``.req``: the body is
read with ``req.read`` and the response goes out through ``req.status``/``status_line``,
``req.headers_out`` and ``req.write``, bytes exact, each flushed chunk sent at once.
"""

import os
import sys
from wsgiref.handlers import BaseHandler

from tinyweb.deferred import MAX_PENDING, pending_threads, start_thread

__all__ = ["serve", "ModPythonGateway"]


class _RequestInput:
    """``wsgi.input`` over mod_python's ``req.read``/``req.readline``, which return bytes."""

    def __init__(self, req):
        self._req = req

    def read(self, size=-1):
        if size is None or size < 0:
            return self._req.read()
        return self._req.read(size) if size else b""

    def readline(self, size=-1):
        if size is None or size < 0:
            return self._req.readline()
        return self._req.readline(size) if size else b""

    def readlines(self, hint=-1):
        return list(iter(self.readline, b""))

    def __iter__(self):
        return iter(self.readline, b"")


class ModPythonGateway(BaseHandler):
    """wsgiref's handler with mod_python's request object as its connection."""

    os_environ = {}  # wsgiref's BaseHandler reads os.environ at import time (bpo-7250)
    origin_server = True  # Apache writes the status line; we only fill in the request
    wsgi_run_once = False

    def __init__(self, req, environ, multithread):
        self.req = req
        self.base_env = environ
        self.wsgi_multithread = multithread
        self.wsgi_multiprocess = True

    def get_stdin(self):
        return _RequestInput(self.req)

    def get_stderr(self):
        # cgihandler leaves sys.stderr alone: it is Apache's error log.
        return sys.stderr

    def add_cgi_vars(self):
        self.environ.update(self.base_env)

    def send_headers(self):
        """Put the status and headers on the request instead of writing them as bytes."""
        self.cleanup_headers()
        self.headers_sent = True
        req = self.req
        req.status = int(self.status[:3])
        req.status_line = self.status
        for name, value in self.headers.items():
            lower = name.lower()
            if lower == "content-type":
                req.content_type = value
            elif lower == "content-length":
                req.set_content_length(int(value))
            else:
                req.headers_out.add(name, value)

    def _write(self, data):
        self.req.write(data, 0)

    def _flush(self):
        self.req.flush()


def _pep3333(value):
    # mod_python decodes the request's strings as UTF-8 (apache.build_cgi_env); WSGI wants
    # each byte as one latin-1 character (PEP 3333 "native strings").
    return value.encode("utf-8", "surrogateescape").decode("latin-1")


def modpython_environ():
    """Return the WSGI environ for the request cgihandler put in os.environ."""
    environ = {key: _pep3333(value) for key, value in os.environ.items() if isinstance(value, str)}
    # httpoxy: a client's "Proxy:" header must never become HTTP_PROXY.
    environ.pop("HTTP_PROXY", None)
    os.environ.pop("HTTP_PROXY", None)
    environ["tinyweb.mode"] = "modpython"
    if not environ.get("CONTENT_LENGTH") and environ.get("REQUEST_METHOD", "GET").upper() in (
        "POST", "PUT", "PATCH"
    ):
        environ["wsgi.input_terminated"] = True  # chunked body: Apache ends it for req.read
    return environ


def _threaded():
    try:
        from mod_python import apache

        return bool(apache.mpm_query(apache.AP_MPMQ_IS_THREADED))
    except (ImportError, AttributeError):
        return False


def _refresh_cgi_module():
    # cgihandler purges stdlib *packages* (email, urllib) from sys.modules before each request
    # but keeps top-level stdlib modules such as cgi (cgihandler.py:44-65). From the second
    # request on, cgi.FieldStorage checks parts against the Message class of a purged
    # email.message while the parser makes the new one: every multipart upload is a
    # TypeError ("headers must be mapping or an instance of email.message.Message").
    cgi = sys.modules.get("cgi")
    if cgi is not None:
        import email.message

        cgi.Message = email.message.Message


def serve(app, options):
    """Answer the request mod_python's cgihandler is running this module for; return 0."""
    req = getattr(sys.stdout, "req", None) or getattr(sys.stdin, "req", None)
    if req is None:
        sys.stderr.write("tinyweb: --mode modpython needs mod_python's cgihandler "
                         "(PythonHandler mod_python.cgihandler)\n")
        return 2
    _refresh_cgi_module()
    environ = modpython_environ()
    # A thread, not os.fork(): a forked copy of an Apache child would go on running Python
    # inside Apache's process image, with its locks and listeners. A thread outlives
    # cgihandler's module purge (it holds its own references) and ends with the process;
    # the bound counts live task threads, since module state is purged every request.
    tasks = environ["tinyweb.after_response"] = []
    environ["tinyweb.defer_room"] = max(0, MAX_PENDING - pending_threads())
    gateway = ModPythonGateway(req, environ, _threaded())
    # sys.stdout is cgihandler's header parser: a handler's print() goes to the error log.
    saved, sys.stdout = sys.stdout, sys.stderr
    try:
        gateway.run(app)
    finally:
        sys.stdout = saved
    if tasks:
        # Apache has the whole response once the handler returns; the thread may start now,
        # as the task must not touch the request anyway.
        start_thread(tasks, sys.stderr)
    return 0


# True once preload() ran in this module object: cgihandler's purge would re-import the
# module, and with it this flag, as False.
preloaded = False


def preload():
    """Import what requests need, once per Apache child: for PythonImport.

    cgihandler purges, before each request, every module that was not yet loaded when it
    was first imported (cgihandler.py:44-65), so each request re-imports WebOb and tinyweb.
    Modules that PythonImport loads at child start are kept:

        PythonImport tinyweb.runners.modpython::preload main_interpreter

    (with ``PythonInterpreter main_interpreter`` where the app is served, and PythonPath
    at server level). Then the session and crypto modules Beaker picks inside functions.
    """
    from tinyweb.runners import import_request_modules

    import_request_modules()
    import tinyweb.sessions  # noqa: F401
    import wsgiref.handlers  # noqa: F401

    try:
        import beaker.crypto
        import beaker.session  # noqa: F401

        beaker.crypto.get_crypto_module("default")
    except Exception:  # no crypto backend: sessions still work unencrypted, load on use
        pass
    global preloaded
    preloaded = True
