"""Serve a WSGI app over FastCGI: flup speaks the protocol, this module runs the connections.

flup 1.0.3 decodes and encodes records (``fcgi_base.Connection``/``Request``) and turns a
request into a WSGI call (``BaseFCGIServer.handler``). What it gets wrong is replaced, each
piece with a comment naming the flup bug it avoids: reading records (no timeout, no bounds
checks), closing a connection (waits for the peer forever), binding the socket
(``listen.py``) and the processes (``prefork.py``).
Nothing imports flup until ``serve`` runs: a CGI request never pays for it.
"""

import os
import select
import socket
import struct
import sys
import time

from tinyweb.runners.listen import BindError, listen, reexec
from tinyweb.runners.prefork import DropConnection, IdleConnection, Supervisor, Worker, log

__all__ = ["serve", "BindError", "READ_TIMEOUT"]

# Seconds a web server may leave a connection silent (idle between requests, or stalled in
# the middle of a record) before it is closed, so a slow peer cannot hold a worker forever.
READ_TIMEOUT = 30.0
# Seconds a write may block on a web server that stopped reading (nginx with buffering off).
WRITE_TIMEOUT = 300.0
# Seconds to wait for the web server to close its end after the last record (see _close).
LINGER_TIMEOUT = 2.0
# Bytes of FCGI_PARAMS accepted for one request; web servers send a few KiB.
MAX_PARAMS = 1 << 20
# A whole body's records (headers and body) wait for FCGI_END_REQUEST and go in one send, up
# to this much; a longer body is sent as it is written.
HOLD_LIMIT = 64 * 1024
# Set in the environ when the app returned a list: the whole body exists, nothing streams.
_WHOLE = "tinyweb.fcgi.whole_body"
# notes/performance.md: prefork with 2 single-threaded workers was fastest on 2 cores.
DEFAULT_WORKERS = 2

def serve(app, options):
    """Serve ``app`` over FastCGI as ``options`` say; return the exit status."""
    if options.umask is not None:
        os.umask(options.umask)
    if options.bind is None:
        return _serve_stdin(app, options)
    try:
        listener, retiring = listen(options)
    except BindError as exc:
        sys.stderr.write("tinyweb: %s\n" % exc)
        return 1
    threads = options.threads or 1
    workers = 1 if options.threads else (options.workers or DEFAULT_WORKERS)
    server, connection_class = _make_server(app, options.bind, threads, multiprocess=workers > 1)
    _share_before_fork(app)

    def worker_main(parent_pid):
        return Worker(server, listener.sock, connection_class, threads, options.max_requests,
                      parent_pid).run()

    supervisor = Supervisor(
        worker_main, workers, reexec=lambda pids: reexec(listener, pids), retiring=retiring
    )
    try:
        return supervisor.run()
    finally:
        listener.close()


def _share_before_fork(app):
    """Load what every worker needs in the supervisor, so the workers share those pages."""
    # Each worker importing WebOb itself cost ~1.3 x a bare WebOb worker's memory
    # (bench/README.md). gc.freeze() keeps the collector from touching, and so copying,
    # the shared objects in each worker.
    from tinyweb.runners import import_request_modules

    import_request_modules()
    try:
        app.config  # read tinyweb.ini once; a bad one is reported on each request
    except Exception:
        pass
    import gc

    gc.collect()
    gc.freeze()


def _serve_stdin(app, options):
    """Serve on the listening socket a FastCGI process manager left on fd 0 (mod_fcgid)."""
    sock = None
    try:
        sock = socket.socket(fileno=os.dup(0))
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    except OSError:
        listening = False
    if not listening:
        if sock is not None:
            sock.close()
        sys.stderr.write(
            "tinyweb: --mode fcgi without --bind serves the listening socket a FastCGI server "
            "puts on stdin (mod_fcgid, spawn-fcgi), and stdin is not one; give --bind PATH "
            "or --bind :PORT to start a server yourself\n"
        )
        return 2
    if options.workers:
        log("--workers is ignored on the socket on stdin: the web server starts the processes")
    sock.setblocking(False)
    # mod_fcgid sends one request at a time to a process and starts more processes itself.
    threads = options.threads or 1
    server, connection_class = _make_server(app, None, threads, multiprocess=True)
    try:
        return Worker(server, sock, connection_class, threads, options.max_requests).run()
    finally:
        sock.close()


# --- the protocol: flup's classes, with the reads, writes and closes it gets wrong ----------


def _decode_pairs(data):
    """Decode FastCGI name-value pairs to latin-1 strings; raise DropConnection on an overrun."""
    # One decode of the whole block, then slices: a char per byte, so positions match. On the
    # path of every request (~35 pairs): twice as fast as a decode per name and value.
    text = bytes(data).decode("latin-1")
    pairs, pos, end = [], 0, len(data)
    while pos < end:
        name_len = data[pos]
        if name_len & 0x80:
            if pos + 4 > end:
                raise DropConnection("truncated name-value pair length in FCGI_PARAMS")
            name_len = int.from_bytes(data[pos:pos + 4], "big") & 0x7FFFFFFF
            pos += 4
        else:
            pos += 1
        if pos >= end:
            raise DropConnection("truncated name-value pair in FCGI_PARAMS")
        value_len = data[pos]
        if value_len & 0x80:
            if pos + 4 > end:
                raise DropConnection("truncated name-value pair length in FCGI_PARAMS")
            value_len = int.from_bytes(data[pos:pos + 4], "big") & 0x7FFFFFFF
            pos += 4
        else:
            pos += 1
        name_end = pos + name_len
        stop = name_end + value_len
        if stop > end:
            raise DropConnection("name-value pair overruns FCGI_PARAMS (%d bytes claimed)" % (name_len + value_len))
        pairs.append((text[pos:name_end], text[name_end:stop]))
        pos = stop
    return pairs


def _marking_whole_bodies(app):
    """Wrap ``app`` to mark the environ when it returns a list: a body with nothing to stream."""

    def application(environ, start_response):
        body = app(environ, start_response)
        if type(body) is list:
            environ[_WHOLE] = True
        return body

    return application


def _make_server(app, bind, threads, multiprocess):
    """Return the flup server that turns requests into WSGI calls, and the connection class."""
    server_class, connection_class = _flup_classes()
    # bindAddress only decides here whether wsgi.errors also goes to our stderr (when bound).
    server = server_class(app, multithreaded=threads > 1, multiprocess=multiprocess,
                          bindAddress=bind)
    return server, connection_class


_classes = []


def _flup_classes():
    """Return (server, connection) classes built on flup, importing it on first use."""
    # Built in a function because subclassing at module level would import flup, and a CGI
    # request (which imports this package) must not pay for it (notes/performance.md: 14 ms).
    if not _classes:
        _classes.extend(_build_classes())
    return _classes


def _build_classes():
    from flup.server import fcgi_base as fb

    class GatewayRequest(fb.Request):
        """A flup Request that runs the app's after-response tasks once END_REQUEST is out."""

        def __init__(self, *args):
            super().__init__(*args)
            self.params_buffer = bytearray()

        def run(self):
            # flup's run() ends with Connection.end_request (FCGI_END_REQUEST, and the socket
            # closed unless FCGI_KEEP_CONN): the web server has the whole response by now. Never
            # in the body's close(): flup calls that before END_REQUEST (handler, line 1184).
            try:
                super().run()
            finally:
                worker = self._conn.worker
                worker.request_done()
                # On the worker's pool, so a slow task never holds its next request.
                worker.tasks.submit(self.params.get("tinyweb.after_response"))

    class GatewayServer(fb.BaseFCGIServer):
        request_class = GatewayRequest

        def __init__(self, application, **kwargs):
            super().__init__(_marking_whole_bodies(application), **kwargs)

        def handler(self, req):
            req.params["tinyweb.mode"] = "fcgi"
            req.params["tinyweb.after_response"] = []
            req.params["tinyweb.defer_room"] = req._conn.worker.tasks.room()
            return super().handler(req)

    return GatewayServer, _build_connection_class(fb)


def _build_connection_class(fb):
    class GatewayConnection(fb.Connection):
        """flup's Connection with bounded, checked reads and a bounded close."""

        def __init__(self, sock, addr, server, worker):
            super().__init__(sock, addr, server, None)
            self.worker = worker
            self._buffer = bytearray()
            self._held = []
            self._held_size = 0
            self._write_error = None
            self._closed = False
            self._seen_request = False
            self._stdin_done = False  # the empty FCGI_STDIN record that ends a body has come

        def run(self):
            # flup's run() swallows EOFError and lets everything else kill the caller (prefork
            # child) or vanish (thread pool, threadpool.py:81); here the Worker logs it.
            self._keepGoing = True
            while self._keepGoing:
                self.process_input()

        def process_input(self):
            # flup reads with select(..., 1.0) forever and unpacks whatever comes (struct.error
            # on a short FCGI_BEGIN_REQUEST, 1799 bytes awaited for "GET / HTTP/1.0").
            header = self._take(fb.FCGI_HEADER_LEN, at_boundary=True)
            version, rtype, request_id, length, padding = struct.unpack(fb.FCGI_Header, header)
            if version != fb.FCGI_VERSION_1:
                hint = " (an HTTP request sent to the FastCGI socket?)" if header[:1].isalpha() else ""
                raise DropConnection("record version %d, expected 1%s" % (version, hint))
            content = self._take(length + padding)[:length]
            if rtype == fb.FCGI_BEGIN_REQUEST and length != 8:
                raise DropConnection("FCGI_BEGIN_REQUEST body of %d bytes, expected 8" % length)
            rec = fb.Record(rtype, request_id)
            rec.contentLength, rec.contentData = length, content
            if rtype == fb.FCGI_BEGIN_REQUEST:
                self._seen_request = True
            method = self._methods.get(rtype)
            if method is not None:
                getattr(self, method)(rec)
            elif request_id == fb.FCGI_NULL_REQUEST_ID:
                self._do_unknown_type(rec)

        _methods = {
            fb.FCGI_GET_VALUES: "_do_get_values",
            fb.FCGI_BEGIN_REQUEST: "_do_begin_request",
            fb.FCGI_ABORT_REQUEST: "_do_abort_request",
            fb.FCGI_PARAMS: "_do_params",
            fb.FCGI_STDIN: "_do_stdin",
            fb.FCGI_DATA: "_do_data",
        }

        def _take(self, size, at_boundary=False):
            while len(self._buffer) < size:
                idle = at_boundary and not self._buffer and not self._requests
                data = self._receive(idle)
                if not data:
                    if idle or (at_boundary and not self._buffer):
                        raise EOFError
                    raise DropConnection("the web server closed the connection in the middle of a record")
                self._buffer += data
            chunk = bytes(self._buffer[:size])
            del self._buffer[:size]
            return chunk

        def _receive(self, idle):
            if idle:
                self._wait_for_request()
            self._sock.settimeout(READ_TIMEOUT)
            try:
                return self._sock.recv(65536)
            except socket.timeout:
                raise DropConnection("no data from the web server for %g s" % READ_TIMEOUT) from None

        def _wait_for_request(self):
            """Wait for the next request's first bytes; give up when the worker stops."""
            poller = select.poll()
            poller.register(self._sock.fileno(), select.POLLIN)
            if self.worker.stopping and not poller.poll(0):
                raise IdleConnection
            poller.register(self.worker.stop_fd, select.POLLIN)
            for fd, _ in poller.poll(READ_TIMEOUT * 1000):
                if fd == self._sock.fileno():
                    return
            if self.worker.stopping or self._seen_request:
                raise IdleConnection  # stopping, or a kept-alive connection expiring: both normal
            raise DropConnection("no request within %g s" % READ_TIMEOUT)

        def _do_params(self, inrec):
            # flup decodes each record on its own, without bounds checks (a pair split across
            # records, or a bogus length, silently truncates params): collect, then decode.
            req = self._requests.get(inrec.requestId)
            if req is None:
                return
            if inrec.contentLength:
                req.params_buffer += inrec.contentData
                if len(req.params_buffer) > MAX_PARAMS:
                    raise DropConnection("FCGI_PARAMS over %d bytes" % MAX_PARAMS)
                return
            req.params.update(_decode_pairs(req.params_buffer))
            req.params_buffer = bytearray()
            self._start_request(req)

        def _do_get_values(self, inrec):
            # flup looks bytes names up in a str-keyed dict and answers nothing (fcgi_base.py:756).
            n = self.worker.threads
            known = {"FCGI_MAX_CONNS": n, "FCGI_MAX_REQS": n, "FCGI_MPXS_CONNS": 0}
            rec = fb.Record(fb.FCGI_GET_VALUES_RESULT)
            for name, _ in _decode_pairs(inrec.contentData):
                if name in known:
                    rec.contentData += fb.encode_pair(name.encode("latin-1"), str(known[name]).encode("ascii"))
            rec.contentLength = len(rec.contentData)
            self.writeRecord(rec)

        def writeRecord(self, rec):
            # One send per record (flup sends header, content and padding apart); the empty
            # records that end STDOUT/STDERR travel with FCGI_END_REQUEST, which follows them,
            # and so do a whole body's (flup writes its headers and body apart): one send for
            # a whole response, where streaming needs each chunk sent as it comes.
            if self._write_error is not None:
                raise self._write_error
            data = rec.contentData
            padding = -len(data) & 7
            out = struct.pack(fb.FCGI_Header, 1, rec.type, rec.requestId, len(data), padding)
            out += data + bytes(padding)
            if rec.type in (fb.FCGI_STDOUT, fb.FCGI_STDERR) and (not data or self._holding(rec)):
                self._held.append(out)
                self._held_size += len(out)
                return
            if self._held:
                out = b"".join(self._held) + out
                self._held = []
                self._held_size = 0
            try:
                self._sock.settimeout(WRITE_TIMEOUT)
                self._sock.sendall(out)
            except socket.timeout:
                # Not an OSError any more: flup's handler would retry writing an error page.
                self._write_error = DropConnection(
                    "the web server read nothing for %g s" % WRITE_TIMEOUT)
                raise self._write_error from None
            except OSError as exc:
                self._write_error = exc  # a dead peer fails every later write at once
                raise

        def _holding(self, rec):
            if rec.type != fb.FCGI_STDOUT or self._held_size + len(rec.contentData) > HOLD_LIMIT:
                return False
            req = self._requests.get(rec.requestId)
            return req is not None and req.params.get(_WHOLE, False)

        def _do_stdin(self, inrec):
            if not inrec.contentLength:
                self._stdin_done = True
            super()._do_stdin(inrec)

        def _cleanupSocket(self):
            # Called by flup's end_request when the web server did not ask to keep the connection.
            self.close()

        def close(self, linger=True):
            """Close after the last record: FIN, then read until the web server closes, bounded."""
            # flup waits in select(..., None) for that close (fcgi_base.py:650): a peer that never
            # closes holds a single-threaded worker forever. Reading before close() avoids a
            # reset that could destroy the response in the peer's receive queue; with no
            # response in flight (an idle kept-alive connection) there is nothing to protect.
            if self._closed:
                return
            self._closed = True
            self._keepGoing = False
            if not linger:
                self._sock.close()
                return
            if self._stdin_done and not select.select([self._sock], [], [], 0)[0]:
                # The body was read to its end and nothing else is waiting: the web server
                # sends no more, so closing now cannot reset the response. Waiting for its
                # close held each worker ~20 % of a hello (bench/README.md).
                self._sock.close()
                return
            deadline = time.monotonic() + LINGER_TIMEOUT
            try:
                self._sock.shutdown(socket.SHUT_WR)
                while True:
                    self._sock.settimeout(max(deadline - time.monotonic(), 0.001))
                    if not self._sock.recv(65536):
                        break
            except OSError:
                pass
            finally:
                self._sock.close()

        def abort(self):
            """Close at once (a malformed or dead connection)."""
            self._closed = True
            self._keepGoing = False
            self._sock.close()

    return GatewayConnection

