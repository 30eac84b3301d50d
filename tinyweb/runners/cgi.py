"""Serve one request as a CGI/1.1 script (RFC 3875): environment, stdin and stdout."""

import os
import select
import sys
import time
from wsgiref.handlers import BaseCGIHandler, read_environ

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


def cgi_environ(mode):
    """Return the WSGI environ for the CGI request in os.environ."""
    # read_environ re-encodes os.environ's surrogate escapes as PEP 3333 latin-1 strings,
    # which a hand-made copy of os.environ gets wrong for non-ASCII paths.
    environ = read_environ()
    # httpoxy (CVE-2016-5385..5388): a client's "Proxy:" header must never reach code that
    # reads HTTP_PROXY from the environment.
    environ.pop("HTTP_PROXY", None)
    os.environ.pop("HTTP_PROXY", None)
    environ["tinyweb.mode"] = mode
    if not environ.get("CONTENT_LENGTH") and environ.get("REQUEST_METHOD", "GET").upper() in (
        "POST", "PUT", "PATCH"
    ):
        # A chunked upload reaches a CGI script with no CONTENT_LENGTH, its body readable to
        # EOF (Apache mod_cgi and mod_cgid alike); the app bounds what it reads.
        environ["wsgi.input_terminated"] = True
    return environ


def serve(app, options):
    """Answer the one request this process was started for; return 0."""
    environ = cgi_environ("cgi")
    stdin = _CountingInput(sys.stdin.buffer)
    stdout = sys.stdout.buffer
    # stdout is the response: a handler's print() goes to stderr (the error log) instead.
    saved, sys.stdout = sys.stdout, sys.stderr
    try:
        CGIGateway(stdin, stdout, sys.stderr, environ).run(app)
    finally:
        sys.stdout = saved
    length = environ.get("CONTENT_LENGTH", "")
    if length.isascii() and length.isdigit() and int(length) > stdin.consumed:
        stdin.drain(int(length))
    return 0
