"""flup's FastCGI connection, with what flup 1.0.3 gets wrong in reading and writing records replaced.

flup decodes and encodes records (``fcgi_base.Connection``). Replaced here, each piece with a
comment naming the flup bug it avoids: reading records (no timeout, no bounds checks),
FCGI_PARAMS (decoded record by record, unchecked), FCGI_ABORT_REQUEST (ignored: the request
ran to its end), writing (header, content and padding sent apart) and closing a connection
(waits for the peer forever). fcgi_server.py turns each request into a WSGI call. Importing
this module imports flup: only fcgi.py's ``serve`` does, so a CGI request never pays for it.
"""

import select
import socket
import struct
import sys
import threading
import time

from flup.server import fcgi_base as fb
from webob.request import DisconnectionError

from tinyweb.runners.prefork import DropConnection, IdleConnection, ParkConnection

__all__ = ["GatewayConnection", "ThreadedGatewayConnection", "RequestAborted", "WHOLE", "READ_TIMEOUT"]

# Seconds a web server may leave a connection silent (idle between requests, or stalled in
# the middle of a record) before it is closed, so a slow peer cannot hold a worker forever.
READ_TIMEOUT = 30.0
# Seconds a write may block on a web server that stopped reading (nginx with buffering off).
WRITE_TIMEOUT = 300.0
# Seconds to wait for the web server to close its end after the last record (see _close).
LINGER_TIMEOUT = 2.0
# Bytes of FCGI_PARAMS accepted for one request; web servers send a few KiB.
MAX_PARAMS = 1 << 20
# Bytes of body the app has not read yet past which records are no longer read ahead while
# it runs (to see an FCGI_ABORT_REQUEST): reading on would hold the whole body in memory.
READ_AHEAD_LIMIT = 64 * 1024
# A whole body's records (headers and body) wait for FCGI_END_REQUEST and go in one send, up
# to this much; a longer body is sent as it is written.
HOLD_LIMIT = 64 * 1024
# Set in the environ when the app returned a list: the whole body exists, nothing streams.
WHOLE = "tinyweb.fcgi.whole_body"


def _decode_pairs(data):
    """Decode FastCGI name-value pairs to latin-1 strings; raise DropConnection on an overrun."""
    # One decode of the whole block, then slices: a char per byte, so positions match. On the
    # path of every request (~35 pairs): twice as fast as a decode per name and value.
    text = bytes(data).decode("latin-1")
    pairs, pos, end = [], 0, len(data)
    while pos < end:
        name_len, pos = _pair_length(data, pos, end)
        value_len, pos = _pair_length(data, pos, end)
        name_end = pos + name_len
        stop = name_end + value_len
        if stop > end:
            raise DropConnection("name-value pair overruns FCGI_PARAMS (%d bytes claimed)" % (name_len + value_len))
        pairs.append((text[pos:name_end], text[name_end:stop]))
        pos = stop
    return pairs


def _pair_length(data, pos, end):
    """Return a name or value length at ``pos`` (one byte, or four with the top bit set) and
    the position after it."""
    if pos >= end:
        raise DropConnection("truncated name-value pair in FCGI_PARAMS")
    length = data[pos]
    if not length & 0x80:
        return length, pos + 1
    if pos + 4 > end:
        raise DropConnection("truncated name-value pair length in FCGI_PARAMS")
    return int.from_bytes(data[pos:pos + 4], "big") & 0x7FFFFFFF, pos + 4


class RequestAborted(DisconnectionError, ConnectionAbortedError):
    """The web server aborted the request, or its connection failed, while the app ran."""

    # A ConnectionAbortedError, as a client disconnect is; and WebOb's own "the client
    # disconnected while sending the body", so WebOb-based code, tinyweb's Request.body
    # among it (request.py), answers a client that hung up, not a server error.

class GatewayInput(fb.InputStream):
    """flup's wsgi.input, whose reads raise RequestAborted once the request is aborted."""

    aborted = None  # why, once the request is aborted

    def _waitForData(self):
        # flup reads one more record and loops until data comes (fcgi_base.py:145-162):
        # after an FCGI_ABORT_REQUEST it waited for records that never come, and a dead
        # or malformed connection raised EOFError or DropConnection into the app.
        if self.aborted is None:
            self._conn.read_for_input()
        if self.aborted is not None:
            raise RequestAborted(self.aborted)

    @property
    def unread(self):
        """Bytes received and not read by the app yet."""
        return self._avail - self._pos

def _content_length(params):
    """Return CONTENT_LENGTH as an int, or None when it is absent or not a number."""
    value = params.get("CONTENT_LENGTH", "")
    return int(value) if value.isascii() and value.isdigit() and len(value) < 20 else None


def _encode(rtype, request_id, data):
    """Return a record's bytes: header, content, padding to a multiple of 8."""
    padding = -len(data) & 7
    return struct.pack(fb.FCGI_Header, 1, rtype, request_id, len(data), padding) + data + bytes(padding)


class GatewayConnection(fb.Connection):
    """flup's Connection with bounded, checked reads, aborts answered, and a bounded close."""

    _inputStreamClass = GatewayInput

    def __init__(self, sock, addr, server, worker):
        super().__init__(sock, addr, server, None)
        # Non-blocking, with the waits done here (_receive, _send): a socket with a timeout
        # polls before every recv and send, and each settimeout() is an ioctl; most reads
        # and writes here find the socket ready (strace of a kept-alive hello: 14 system
        # calls before, 8 after).
        sock.setblocking(False)
        self.worker = worker
        self._buffer = bytearray()
        self._held = []
        self._held_size = 0
        self._failure = None  # raised by every read and write once the connection failed
        self._closed = False
        self._seen_request = False
        self._peer_eof = False  # a read ahead found the web server's end closed
        # The request in progress (one at a time: no web server multiplexes).
        self._request_id = None
        self._stdin_done = False  # the empty FCGI_STDIN record that ends a body has come
        self._stdin_count = 0  # bytes of FCGI_STDIN received
        self._stdin_limit = None  # CONTENT_LENGTH, once the params are in

    parkable = False  # set by a single-threaded worker: see _wait_for_request

    def idle_expired(self, since):
        """Tell whether a connection parked at ``since`` (time.monotonic) has idled too long."""
        return time.monotonic() - since > READ_TIMEOUT

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
        if self._failure is not None:
            raise self._failure
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
        try:
            return self._sock.recv(65536)  # whatever has come: it usually has
        except BlockingIOError:
            pass
        if idle:
            self._wait_for_request()
        deadline = time.monotonic() + READ_TIMEOUT
        while True:
            if not self._wait_io(select.POLLIN, deadline):
                raise DropConnection("no data from the web server for %g s" % READ_TIMEOUT)
            try:
                return self._sock.recv(65536)
            except BlockingIOError:
                pass

    def _send(self, data, timeout=WRITE_TIMEOUT):
        """Send all of ``data`` within ``timeout``; raise socket.timeout past it."""
        view, deadline = memoryview(data), None
        while view:
            try:
                view = view[self._sock.send(view):]
                continue
            except BlockingIOError:
                pass
            if deadline is None:
                deadline = time.monotonic() + timeout
            if not self._wait_io(select.POLLOUT, deadline):
                raise socket.timeout

    def _wait_io(self, events, deadline):
        """Wait until the socket is ready for ``events`` or ``deadline``; tell whether it is."""
        poller = select.poll()
        poller.register(self._sock.fileno(), events)
        return bool(poller.poll(max(deadline - time.monotonic(), 0) * 1000))

    def _wait_for_request(self):
        """Wait for the next request's first bytes (none has come yet); give up when the worker stops."""
        if self._seen_request:
            if self.worker.stopping:
                raise IdleConnection
            if self.parkable:
                # A kept-alive connection (fastcgi_keep_conn) between requests: a
                # single-threaded worker waiting here would leave the web server's other
                # connections unserved until this one's next request or READ_TIMEOUT (p99
                # stalls of 1-4 s, bench/README.md); the worker waits for all of them at once.
                raise ParkConnection
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLIN)
        if self._seen_request:
            # An idle kept-alive connection gives up when the worker stops. A new one does
            # not: it was accepted for a request whose bytes are on their way, and dropping
            # it would fail that request (a stop signal arriving just after the accept).
            poller.register(self.worker.stop_fd, select.POLLIN)
        for fd, _ in poller.poll(READ_TIMEOUT * 1000):
            if fd == self._sock.fileno():
                return
        if self._seen_request:
            raise IdleConnection  # stopping, or a kept-alive connection expiring: both normal
        raise DropConnection("no request within %g s" % READ_TIMEOUT)

    def _do_begin_request(self, inrec):
        if not self._requests:  # else flup answers FCGI_CANT_MPX_CONN
            self._request_id = inrec.requestId
            self._stdin_done, self._stdin_count, self._stdin_limit = False, 0, None
        super()._do_begin_request(inrec)

    def _do_params(self, inrec):
        # flup decodes each record on its own, without bounds checks (a pair split across
        # records, or a bogus length, silently truncates params): collect, then decode.
        req = self._requests.get(inrec.requestId)
        if req is None:
            return
        if req.params_done:
            # flup would run the app a second time, inside the first (fcgi_base.py:807).
            raise DropConnection("FCGI_PARAMS after the end of the params stream")
        if inrec.contentLength:
            req.params_buffer += inrec.contentData
            if len(req.params_buffer) > MAX_PARAMS:
                raise DropConnection("FCGI_PARAMS over %d bytes" % MAX_PARAMS)
            return
        req.params.update(_decode_pairs(req.params_buffer))
        req.params_buffer = bytearray()
        req.params_done = True
        self._stdin_limit = _content_length(req.params)
        self._check_stdin_length()
        self._start_request(req)

    def _start_request(self, req):
        # flup calls the app as soon as the params end (fcgi_base.py:788-791). An
        # FCGI_ABORT_REQUEST sent with them is in the buffer already: then it never is.
        # Only looked for there: reading ahead on every request cost ~3.5 us of a hello.
        if self._abort_buffered(req.requestId):
            self._read_ahead(req)
            if self._failure is not None:
                raise self._failure
            if self._requests.get(req.requestId) is not req:
                return  # ended by the FCGI_ABORT_REQUEST
        req.started = True
        req.run()

    def _abort_buffered(self, request_id):
        """Tell whether an FCGI_ABORT_REQUEST for ``request_id`` is in the buffer."""
        buf, pos = self._buffer, 0
        while pos + fb.FCGI_HEADER_LEN <= len(buf):
            rtype, rid, length, padding = struct.unpack_from("!xBHHB", buf, pos)
            if rtype == fb.FCGI_ABORT_REQUEST and rid == request_id:
                return True
            pos += fb.FCGI_HEADER_LEN + length + padding
        return False

    def _do_abort_request(self, inrec):
        # flup only sets req.aborted, which nothing reads (fcgi_base.py:778-786): the
        # request ran to its end. FastCGI 1.0 §5.4: the application answers an abort with
        # FCGI_END_REQUEST, as soon as possible.
        req = self._requests.get(inrec.requestId)
        if req is None:
            return
        if req.started:
            # Its next body read or output write raises; run() then ends it.
            req.abort("the web server aborted the request (FCGI_ABORT_REQUEST)")
        else:
            self.end_request(req, 0, fb.FCGI_REQUEST_COMPLETE)

    def read_for_input(self):
        """Read one record for an app waiting for its body; a failure aborts the request."""
        try:
            self.process_input()
        except (EOFError, DropConnection, OSError) as exc:
            self._fail(exc)

    def _read_ahead(self, req):
        """Process the records that have come while ``req`` runs, without waiting for more."""
        # flup reads only when the app reads wsgi.input, and between requests: an
        # FCGI_ABORT_REQUEST sent while the app works or streams was never seen.
        try:
            while (req.abort_reason is None and self._requests.get(req.requestId) is req
                   and req.stdin.unread <= READ_AHEAD_LIMIT):
                if self._record_buffered():
                    self.process_input()
                    continue
                if self._peer_eof:
                    return
                try:
                    data = self._sock.recv(65536)  # non-blocking: only what has come
                except BlockingIOError:
                    return
                if not data:
                    # Half closed (or closed: then the next write fails): only reads end.
                    self._peer_eof = True
                    return
                self._buffer += data
        except (EOFError, DropConnection, OSError) as exc:
            self._fail(exc)

    def _record_buffered(self):
        if len(self._buffer) < fb.FCGI_HEADER_LEN:
            return False
        length, padding = struct.unpack_from("!HB", self._buffer, 4)
        return len(self._buffer) >= fb.FCGI_HEADER_LEN + length + padding

    def _fail(self, exc):
        """Make every later read and write raise ``exc``; abort the request in progress."""
        if self._failure is None:
            self._failure = exc
        if isinstance(exc, EOFError):
            reason = "the web server closed the connection"
        else:
            reason = "the connection to the web server failed: %s" % (
                str(exc) or type(exc).__name__)
        for req in list(self._requests.values()):
            req.abort(reason)

    def _stop_if_aborted(self, rec, read_ahead):
        """Raise RequestAborted instead of writing the output of an aborted request."""
        req = self._requests.get(rec.requestId)
        if req is None:
            return
        if read_ahead:
            self._read_ahead(req)
        if req.abort_reason is not None:
            self._held, self._held_size = [], 0  # its whole body, if held: not sent either
            raise RequestAborted(req.abort_reason)

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
        if rec.type != fb.FCGI_STDERR:
            return self._write_record(rec)
        # The app's log lines (wsgi.errors) never fail it: raising would fail the app's
        # logging of the very loss of its web server (a 400 for a body cut short logged as a
        # 500 with a traceback). Once the connection is gone, they go to our stderr.
        try:
            self._write_record(rec)
        except (OSError, EOFError, DropConnection):
            self._orphaned_stderr(rec.contentData)

    def _write_record(self, rec):
        # One send per record (flup sends header, content and padding apart); the empty
        # records that end STDOUT/STDERR travel with FCGI_END_REQUEST, which follows them,
        # and so do a whole body's (flup writes its headers and body apart): one send for
        # a whole response, where streaming needs each chunk sent as it comes.
        if self._failure is not None:
            raise self._failure
        data = rec.contentData
        hold = rec.type in (fb.FCGI_STDOUT, fb.FCGI_STDERR) and (
            not data or self._holding(rec))
        if data and rec.type == fb.FCGI_STDOUT:
            # Before each chunk that goes out now, look for an FCGI_ABORT_REQUEST.
            self._stop_if_aborted(rec, read_ahead=not hold)
        out = _encode(rec.type, rec.requestId, data)
        if hold:
            self._held.append(out)
            self._held_size += len(out)
            return
        if self._held:
            out = b"".join(self._held) + out
            self._held = []
            self._held_size = 0
        try:
            self._send(out)
        except socket.timeout:
            # Not an OSError any more: flup's handler would retry writing an error page.
            self._fail(DropConnection("the web server read nothing for %g s" % WRITE_TIMEOUT))
            raise self._failure from None
        except OSError as exc:
            self._fail(exc)  # a dead peer fails every later write at once
            raise

    def _orphaned_stderr(self, data):
        """Log to our own stderr what the app logged (wsgi.errors) after the web server went.

        Bound to a socket of our own, the app's wsgi.errors is flup's TeeOutputStream, which
        has written it to our stderr already (fcgi_base.py:1087); what flup itself writes to
        FCGI_STDERR is lost then.
        """
        if data and self.server._bindAddress is None:
            try:
                sys.stderr.write(data.decode("utf-8", "replace"))
                sys.stderr.flush()
            except (OSError, ValueError):
                pass

    def _holding(self, rec):
        if rec.type != fb.FCGI_STDOUT or self._held_size + len(rec.contentData) > HOLD_LIMIT:
            return False
        req = self._requests.get(rec.requestId)
        return req is not None and req.params.get(WHOLE, False)

    def _do_stdin(self, inrec):
        if inrec.requestId == self._request_id:
            if not inrec.contentLength:
                self._stdin_done = True
            else:
                self._stdin_count += inrec.contentLength
                self._check_stdin_length()
        super()._do_stdin(inrec)

    def _check_stdin_length(self):
        # flup buffers whatever comes (fcgi_base.py:227-232): an app reading wsgi.input
        # to its end would hold a body longer than promised in memory, all of it.
        if self._stdin_limit is not None and self._stdin_count > self._stdin_limit:
            raise DropConnection(
                "FCGI_STDIN longer than CONTENT_LENGTH (%d bytes)" % self._stdin_limit)

    def _do_data(self, inrec):
        # Only the FILTER role reads FCGI_DATA, and only RESPONDER is served: flup would
        # keep every byte in memory (fcgi_base.py:815-819).
        pass

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


class ThreadedGatewayConnection(GatewayConnection):
    """A connection of a --threads worker, whose watchdog may answer a stuck request (answer).

    Every record goes out under write_lock, so the watchdog's never lands between another's
    bytes.
    """

    # Seconds the watchdog's answer may take to go out: it must get back to its heartbeat.
    ANSWER_TIMEOUT = 1.0

    def __init__(self, *args):
        super().__init__(*args)
        self.write_lock = threading.RLock()

    def writeRecord(self, rec):
        with self.write_lock:
            super().writeRecord(rec)

    def answer(self, request_id, data):
        """Send ``data`` as the whole output of ``request_id`` and shut the connection down.

        Called from the watchdog's thread, holding write_lock, once none of the request's
        output has gone out. Its own thread is stuck in the app: the shutdown ends its reads,
        and the web server sends its next request on another connection.
        """
        out = b"".join(self._held)
        self._held, self._held_size = [], 0
        for at in range(0, len(data), 65535):
            out += _encode(fb.FCGI_STDOUT, request_id, data[at:at + 65535])
        out += _encode(fb.FCGI_STDOUT, request_id, b"")
        out += _encode(fb.FCGI_END_REQUEST, request_id,
                       struct.pack(fb.FCGI_EndRequestBody, 0, fb.FCGI_REQUEST_COMPLETE))
        try:
            self._send(out, self.ANSWER_TIMEOUT)
        except OSError:
            pass  # the web server is gone or not reading: nobody to answer
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def forget(self, req):
        """End a request answered by answer(), and with it this connection, writing nothing."""
        self._requests.pop(req.requestId, None)
        self._keepGoing = False
