"""flup's FastCGI server and request, turning each request into a WSGI call: see fcgi_connection.py.

GatewayServer marks whole bodies so their records go in one send, answers an aborted request
with no error page, and cuts a response short when request_timeout passes mid-stream;
GatewayRequest runs the app's deferred tasks once FCGI_END_REQUEST is out. Importing this
module imports flup: only fcgi.py's ``serve`` does.
"""

from flup.server import fcgi_base as fb

from tinyweb.deadline import ANSWER, ResponseCutOff
from tinyweb.deferred import drop
from tinyweb.runners.fcgi_connection import WHOLE, GatewayConnection, ThreadedGatewayConnection
from tinyweb.runners.prefork import DropConnection

__all__ = ["make_server"]


def make_server(app, bind, threads, multiprocess):
    """Return the flup server that turns requests into WSGI calls, and the connection class."""
    # bindAddress only decides here whether wsgi.errors also goes to our stderr (when bound).
    server = GatewayServer(app, multithreaded=threads > 1, multiprocess=multiprocess,
                           bindAddress=bind)
    return server, (ThreadedGatewayConnection if threads > 1 else GatewayConnection)


def _marking_whole_bodies(app):
    """Wrap ``app`` to mark the environ when it returns a list: a body with nothing to stream."""

    def application(environ, start_response):
        body = app(environ, start_response)
        if type(body) is list:
            environ[WHOLE] = True
        return body

    application.__wrapped__ = app  # the App's settings stay reachable (deadline.timeout_of)
    return application


class GatewayRequest(fb.Request):
    """A flup Request that runs the app's after-response tasks once END_REQUEST is out."""

    def __init__(self, *args):
        super().__init__(*args)
        self.params_buffer = bytearray()
        self.params_done = False  # the empty FCGI_PARAMS record has come
        self.started = False  # the app has been called
        self.abort_reason = None
        self.answered = False  # by answer_overdue: nothing more of this request goes out

    def abort(self, reason):
        """Make the app's body reads and output writes raise RequestAborted from now on."""
        if self.abort_reason is None:
            self.abort_reason = self.stdin.aborted = self.data.aborted = reason

    def answer_overdue(self, status, headers, body):
        """Answer in place of a stuck app, from the watchdog's thread (deadline.ANSWER).

        Return False, sending nothing, when the app's response has begun: it can only be cut
        off, when the worker exits.
        """
        if self.answered or self.stdout.dataWritten or self.abort_reason is not None:
            return False  # each only ever turns true: no need to wait for the lock to see it
        conn = self._conn
        # Not blocking: the request's thread may hold the lock in a long write, and the
        # watchdog must go on beating; it tries again on its next tick.
        if not conn.write_lock.acquire(blocking=False):
            return False
        try:
            if self.stdout.dataWritten or self.abort_reason is not None:
                return False
            self.answered = True
            self.abort("answered 503 past request_timeout")  # the app's writes raise from now on
            head = "Status: %s\r\n%s\r\n" % (status, "".join("%s: %s\r\n" % h for h in headers))
            conn.answer(self.requestId, head.encode("latin-1") + body)
        finally:
            conn.write_lock.release()
        return True

    def _flush(self):
        if self.answered:
            self.stderr.flush()  # what the app logged: to our stderr, its connection is shut
        else:
            super()._flush()

    def _end(self, appStatus=0, protocolStatus=fb.FCGI_REQUEST_COMPLETE):
        if self.answered:
            self._conn.forget(self)  # its FCGI_END_REQUEST went out with the answer
        else:
            super()._end(appStatus, protocolStatus)

    def run(self):
        # flup's run() ends with Connection.end_request (FCGI_END_REQUEST, and the socket
        # closed unless FCGI_KEEP_CONN): the web server has the whole response by now. Never
        # in the body's close(): flup calls that before END_REQUEST (handler, line 1184).
        try:
            super().run()
        finally:
            worker = self._conn.worker
            worker.request_done()
            if self.answered:
                drop(self.params)  # what the app deferred after its 503 went out
            # On the worker's pool, so a slow task never holds its next request.
            worker.tasks.submit(self.params.get("tinyweb.after_response"))
            self._release()

    def _release(self):
        """Close the body WebOb spooled for the app, and let go of the environ.

        flup's wsgi.errors points back at this request, whose params are the environ: a
        cycle that only the garbage collector frees, and with it the spooled body's open
        temporary file (up to max_body of disk each; tens of them were seen open at once
        in an idle worker).
        """
        body = self.params.get("wsgi.input")
        if body is not None and body is not self.stdin:
            try:
                body.close()
            except Exception:  # noqa: BLE001 - an app's own wsgi.input; the request is over
                pass
        self.params = {}


class GatewayServer(fb.BaseFCGIServer):
    request_class = GatewayRequest

    def __init__(self, application, **kwargs):
        super().__init__(_marking_whole_bodies(application), **kwargs)

    def handler(self, req):
        req.params["tinyweb.mode"] = "fcgi"
        req.params["tinyweb.after_response"] = []
        req.params["tinyweb.defer_room"] = req._conn.worker.tasks.room()
        if self.multithreaded:
            req.params[ANSWER] = req.answer_overdue
        try:
            return super().handler(req)
        except ResponseCutOff as exc:
            # request_timeout passed mid-stream (deadline.py): no FCGI_END_REQUEST may
            # follow, or the web server would pass the truncated page on as whole.
            req._conn._fail(DropConnection(str(exc)))
            return fb.FCGI_REQUEST_COMPLETE, 0
        except Exception:
            if req.abort_reason is None:
                raise
            # Stopped by RequestAborted (flup's handler has closed the app's iterable,
            # fcgi_base.py:1182-1184), or failed because of it: flup would print a
            # traceback to FCGI_STDERR and write a 500 page (fcgi_base.py:577-581) for a
            # request that is over. appStatus 0, as Go's net/http/fcgi answers an abort.
            return fb.FCGI_REQUEST_COMPLETE, 0
