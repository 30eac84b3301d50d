"""Serve one request as a CGI/1.1 script (RFC 3875): environment, stdin and stdout."""

import os
import select
import stat
import sys
import time
from wsgiref.handlers import BaseCGIHandler

from tinyweb.deferred import MAX_PENDING, run_tasks

__all__ = ["serve", "CGIGateway"]

# After the response, unread request body is drained up to this much, for this long:
# under mod_cgid a script that exits without reading its body loses its response (the
# client sees a reset instead of, say, a 413). notes/servers.md §8.
DRAIN_LIMIT = 64 * 1024 * 1024
DRAIN_SECONDS = 10.0


class _CountingInput:
    """The request body stream, counting what the app read so the rest can be drained."""

    def __init__(self, stream):
        self._stream = stream
        self.consumed = 0

    def read(self, size=-1):
        data = self._stream.read(size)
        self.consumed += len(data)
        return data

    def readline(self, size=-1):
        data = self._stream.readline(size)
        self.consumed += len(data)
        return data

    def readlines(self, hint=-1):
        lines = self._stream.readlines(hint)
        self.consumed += sum(len(line) for line in lines)
        return lines

    def __iter__(self):
        return iter(self.readline, b"")

    def drain(self, expected, fd=0):
        """Read and drop what is left of an ``expected``-byte body, within the limits."""
        left = min(expected - self.consumed, DRAIN_LIMIT)
        deadline = time.monotonic() + DRAIN_SECONDS
        first = True
        while left > 0:
            # The first read1 may be served from what the buffer already holds, which
            # select cannot see; after it, wait for the fd with the deadline.
            if not first:
                wait = deadline - time.monotonic()
                if wait <= 0 or not select.select([fd], [], [], wait)[0]:
                    return
            first = False
            data = self._stream.read1(min(left, 65536))
            if not data:
                return
            left -= len(data)


class CGIGateway(BaseCGIHandler):
    """wsgiref's CGI handler, given its environ explicitly rather than read at import."""

    os_environ = {}  # wsgiref's BaseHandler reads os.environ at import time (bpo-7250)

    def __init__(self, stdin, stdout, stderr, environ):
        super().__init__(stdin, stdout, stderr, environ, multithread=False, multiprocess=True)
        self.run_once = True

    def handle_error(self):
        from tinyweb.deadline import ResponseCutOff

        if isinstance(sys.exc_info()[1], ResponseCutOff):
            # Logged by the deadline's Guard; the response just ends here. A CGI script has no
            # way to tell the web server it is short: with no Content-Length it looks whole.
            return
        super().handle_error()


def guarded(app):
    """Return (``app`` under its request_timeout, the Alarm), or (app, None) when there is none."""
    from tinyweb.deadline import Alarm, Guard, timeout_of

    seconds = timeout_of(app)
    if not seconds:
        return app, None
    alarm = Alarm(seconds)
    try:
        alarm.install()
    except ValueError:
        return app, None  # not the main thread (a test calling serve), where SIGALRM cannot go
    return Guard(app, alarm), alarm


# CGI variables that carry request bytes (wsgiref.handlers._needs_transcode).
_REQUEST_VARS = {"SCRIPT_NAME", "PATH_INFO", "QUERY_STRING", "REQUEST_METHOD", "AUTH_TYPE",
                 "CONTENT_TYPE", "CONTENT_LENGTH", "HTTPS", "REMOTE_USER", "REMOTE_IDENT"}


def _carries_request_bytes(key):
    while key.startswith("REDIRECT_"):
        key = key[len("REDIRECT_"):]
    return key in _REQUEST_VARS or key.startswith(("HTTP_", "SSL_"))


def environ_from(source, mode):
    """Return the WSGI environ for the CGI request whose variables are ``source``."""
    # As wsgiref's read_environ: Python decoded the environment with surrogate escapes,
    # and WSGI wants each request byte as one latin-1 character (PEP 3333).
    encoding = sys.getfilesystemencoding()
    environ = {
        key: value.encode(encoding, "surrogateescape").decode("latin-1") if _carries_request_bytes(key) else value
        for key, value in source.items()
    }
    # httpoxy (CVE-2016-5385..5388): a client's "Proxy:" header must never reach code that
    # reads HTTP_PROXY from the environment.
    environ.pop("HTTP_PROXY", None)
    environ["tinyweb.mode"] = mode
    if not environ.get("CONTENT_LENGTH") and environ.get("REQUEST_METHOD", "GET").upper() in (
        "POST", "PUT", "PATCH"
    ):
        # A chunked upload reaches a CGI script with no CONTENT_LENGTH, its body readable to
        # EOF (Apache mod_cgi and mod_cgid alike); the app bounds what it reads.
        environ["wsgi.input_terminated"] = True
    return environ


def cgi_environ(mode):
    """Return the WSGI environ for the CGI request in os.environ."""
    os.environ.pop("HTTP_PROXY", None)
    return environ_from(os.environ, mode)


def _stderr_is_a_file():
    # mod_cgid (and mod_fcgid) make fd 2 the error log file itself; mod_cgi makes it a pipe
    # that Apache reads to EOF, so a child keeping it would hold the response open
    # (notes/servers.md §2, "Background child holding stdout").
    try:
        return stat.S_ISREG(os.fstat(2).st_mode)
    except OSError:
        return False


def _task_log(app, name="deferred.log", what="a failing deferred task"):
    """Return an fd for a detached process's stderr: the error log if we have it, else a file."""
    if _stderr_is_a_file():
        return os.dup(2)
    try:
        data_dir = str(app.config.data_dir)
        os.makedirs(data_dir, mode=0o700, exist_ok=True)
        return os.open(os.path.join(data_dir, name), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    except Exception as exc:
        # No usable data dir (not writable by the web server's user, say): the tasks still
        # run, their failures go nowhere, and the error log says so now, while we hold it.
        sys.stderr.write("tinyweb: %s cannot be logged (%s); make the data "
                         "dir writable by this user\n" % (what, exc))
        sys.stderr.flush()
        return os.open(os.devnull, os.O_WRONLY)


def run_detached(tasks, app):
    """Run ``tasks`` in a detached grandchild (see detach.py); return at once."""
    from tinyweb.runners.detach import detach

    if not detach(_task_log(app), "deferred tasks"):
        return
    try:
        run_tasks(tasks)
    finally:
        os._exit(0)  # never unwind into the caller's code: this is not the request process


def serve(app, options):
    """Answer the one request this process was started for; return 0."""
    from tinyweb.runners import oneshot

    oneshot.install()
    environ = cgi_environ("cgi")
    tasks = environ["tinyweb.after_response"] = []
    environ["tinyweb.defer_room"] = MAX_PENDING
    stdin = _CountingInput(sys.stdin.buffer)
    stdout = sys.stdout.buffer
    # stdout is the response: a handler's print() goes to stderr (the error log) instead.
    saved, sys.stdout = sys.stdout, sys.stderr
    runner, alarm = guarded(app)
    try:
        CGIGateway(stdin, stdout, sys.stderr, environ).run(runner)
    finally:
        sys.stdout = saved
        if alarm is not None:
            alarm.uninstall()
    try:
        stdout.flush()
    except OSError:  # the client went away mid-response (wsgiref let it pass)
        from tinyweb.runners.persistent import let_go_of_stdout

        let_go_of_stdout()
    length = environ.get("CONTENT_LENGTH", "")
    if length.isascii() and length.isdigit() and int(length) > stdin.consumed:
        stdin.drain(int(length))
    if tasks:
        run_detached(tasks, app)
    _start_worker_if_wanted(app)
    return 0


def _start_worker_if_wanted(app):
    """Start a warm worker for the next requests when tinyweb.ini asks for one."""
    app_file = getattr(app, "app_file", None)
    try:
        wanted = app_file and app.config.cgi_worker
    except Exception:  # a config error was already reported on the request
        return
    if wanted:
        from tinyweb.runners.persistent import socket_path, spawn_worker

        if socket_path(app_file, create=True) is not None:
            # Its errors go where a detached task's would (the error log, else data/).
            spawn_worker(app_file, _task_log(app, "worker.log", "the CGI worker's errors"))
