"""Bound how long a request runs: a per-step deadline around a WSGI app, and SIGALRM to enforce it.

A gateway that runs requests in its main thread wraps the app in a ``Guard`` with an
``Alarm``: ``signal.setitimer`` arms SIGALRM for ``request_timeout`` seconds around the app
call, around each chunk of a streamed body and around ``close()``, and disarms it while the
gateway writes. When it rings, ``RequestTimeout`` is raised wherever the handler is (a sleep, a
loop, a blocked read); a BaseException, it passes through the App (and any handler's
``except Exception``) to the Guard, which answers 503 and logs where it was raised. Once
output has gone out there is no 503 to give: the Guard raises ``ResponseCutOff`` and the
gateway ends the response short.

Only gateways use this (CGI, the warm CGI worker, FastCGI workers); ``tinyweb.App`` alone
never touches signals, so any WSGI server or test client runs it as it is. Work deferred with
``request.defer`` runs after the Guard is done and is not bounded by it.
"""

import sys
import time

# _signal, not signal: signal.py only wraps these ints in IntEnums, and importing it costs a
# one-shot CGI request ~0.5 ms (python -X importtime); _signal is loaded at startup anyway.
import _signal

__all__ = ["RequestTimeout", "ResponseCutOff", "Alarm", "PostedAlarm", "Watch", "Scoreboard", "Guard",
           "timeout_of", "ANSWER"]

TOO_LONG = "The request took too long."
# SIGALRM that rings sooner than this before the deadline of the step now running belongs to a
# step already over (it was pending when that step disarmed): ignored.
_STALE = 0.05


class RequestTimeout(BaseException):
    """The request ran past request_timeout.

    A BaseException, so a handler's ``except Exception`` does not swallow it.
    """


class ResponseCutOff(Exception):
    """The deadline passed after part of the response went out: end the response short."""


def timeout_of(app):
    """Return the request_timeout of a tinyweb App, or the default for any other WSGI callable."""
    from tinyweb.config import DEFAULT_REQUEST_TIMEOUT

    while not hasattr(type(app), "config") and hasattr(app, "__wrapped__"):
        app = app.__wrapped__  # a gateway's own wrapper (functools.update_wrapper's convention)
    try:
        config = app.config
    except AttributeError:
        return DEFAULT_REQUEST_TIMEOUT  # a plain WSGI callable served by our gateway
    except Exception:
        # A bad tinyweb.ini is reported on every request (a 500 naming it): bound those too.
        return DEFAULT_REQUEST_TIMEOUT
    return getattr(config, "request_timeout", DEFAULT_REQUEST_TIMEOUT)


class Alarm:
    """A deadline for requests run in this process's main thread, rung by SIGALRM.

    The timer protocol a Guard drives: ``start(environ) -> token`` when the request begins,
    ``pause(token)`` after each step, ``resume(token)`` before the next, ``end(token)`` when
    it is over. ``fired`` stays true once a deadline passed: the process may be inconsistent.
    """

    def __init__(self, seconds):
        self.seconds = seconds
        self.fired = False
        self._due = None
        self._previous = None

    def install(self):
        """Take SIGALRM (call from the main thread)."""
        self._previous = _signal.signal(_signal.SIGALRM, self._ring)

    def uninstall(self):
        """Disarm and give SIGALRM back to whoever had it."""
        self.pause(None)
        if self._previous is not None:
            _signal.signal(_signal.SIGALRM, self._previous)
            self._previous = None

    def _ring(self, signum, frame):
        due = self._due
        if due is None or time.monotonic() < due - _STALE:
            return
        self._due = None  # one raise per step, even if the handler code goes on
        self.fired = True
        raise RequestTimeout("the request ran past request_timeout (%g s)" % self.seconds)

    def start(self, environ):
        self.resume(None)

    def resume(self, token):
        self._due = time.monotonic() + self.seconds
        _signal.setitimer(_signal.ITIMER_REAL, self.seconds)

    def pause(self, token):
        if self._due is not None:
            self._due = None  # first: a SIGALRM already on its way is then ignored
            _signal.setitimer(_signal.ITIMER_REAL, 0)

    end = pause


class PostedAlarm(Alarm):
    """An Alarm that also posts, on a Scoreboard, when its supervisor is to SIGKILL this process.

    SIGALRM cannot interrupt a handler stuck in C code that never returns to the interpreter;
    the supervisor can, ``grace`` seconds after the deadline.
    """

    def __init__(self, seconds, board, slot, grace):
        super().__init__(seconds)
        self._board, self._slot, self._limit = board, slot, seconds + grace
        self._posted = False

    # Alarm's steps written out again, not called through super(): they run on every request
    # of a FastCGI worker (~2 us a request in all in process, two setitimer calls ~0.8 us of it).
    def start(self, environ):
        now = time.monotonic()
        self._board.post(self._slot, now + self._limit, now, line_of(environ))
        self._posted = True
        self._due = now + self.seconds
        _signal.setitimer(_signal.ITIMER_REAL, self.seconds)

    def resume(self, token):
        now = time.monotonic()
        self._board.post(self._slot, now + self._limit)
        self._posted = True
        self._due = now + self.seconds
        _signal.setitimer(_signal.ITIMER_REAL, self.seconds)

    def pause(self, token):
        if self._due is not None:
            self._due = None
            _signal.setitimer(_signal.ITIMER_REAL, 0)
        if self._posted:  # also after the alarm rang: a worker writing its 503 is not stuck
            self._posted = False
            self._board.post(self._slot, 0.0)

    end = pause


class Watch:
    """Requests running in threads, for a watchdog thread to check: threads cannot be interrupted."""

    fired = False  # set by the watchdog

    def __init__(self, seconds):
        import _thread

        self.seconds = seconds
        self._ident = _thread.get_ident
        self._running = {}  # thread id -> [step start (None between steps), environ]

    def start(self, environ):
        token = self._ident()
        self._running[token] = [time.monotonic(), environ]
        return token

    def resume(self, token):
        self._running[token][0] = time.monotonic()

    def pause(self, token):
        entry = self._running.get(token)
        if entry is not None:
            entry[0] = None

    def end(self, token):
        self._running.pop(token, None)

    def beat(self, slot, grace):
        """Post a heartbeat on ``slot`` (Scoreboard, index); return the running steps.

        If a thread holds the GIL in C code for good, the beats stop, and the supervisor kills
        the process ``grace`` seconds after the deadline of the last one.
        """
        now = time.monotonic()
        steps = [(since, environ) for since, environ in list(self._running.values())
                 if since is not None]
        if slot is not None:
            oldest = min(steps, key=lambda step: step[0])[1] if steps else None
            slot[0].post(slot[1], now + self.seconds + grace, now,
                         line_of(oldest) if oldest is not None else b"")
        return now, steps

    def watchdog(self, overdue, slot=None, grace=0.0):
        """Check the running requests for ever (a daemon thread's target), beating on ``slot``.

        Call ``overdue(request line, seconds, request_timeout, answered)`` once, for the
        first request past its deadline. A late request whose gateway can answer it from
        this thread (ANSWER in its environ) gets the 503 at once, if its response has not
        begun; its thread goes on until it returns, and nothing it writes goes out. The
        caller beats once before the threads that serve start: a request that takes the GIL
        for good before this thread first runs must still find a deadline posted.
        """
        tick = min(1.0, self.seconds / 4)
        while True:
            time.sleep(tick)
            now, steps = self.beat(slot, grace)
            late = [(now - since, environ, _answer(environ, self.seconds))
                    for since, environ in steps if now - since > self.seconds]
            if late and not self.fired:
                elapsed, environ, answered = max(late, key=lambda step: step[0])
                overdue(printable(line_of(environ).decode("latin-1")), elapsed, self.seconds,
                        answered)
                self.fired = True


#: An environ key: a callable a gateway puts there when it can answer a request from another
#: thread, ``answer(status, headers, body) -> bool`` (False when the response has begun).
ANSWER = "tinyweb.answer_overdue"


def _answer(environ, seconds):
    """Answer a late request with the 503 page through its gateway; tell whether it went out.

    Never raises: it runs on the watchdog's thread, whose heartbeat keeps the process alive.
    """
    answer = environ.get(ANSWER)
    if answer is None:
        return False
    try:
        body = _PAGE.encode("utf-8")
        sent = answer("503 Service Unavailable", [("Content-Type", "text/html; charset=utf-8"),
                                                  ("Content-Length", str(len(body)))], body)
        if sent:
            from tinyweb.app import App, _request_line
            from tinyweb.deferred import drop

            # To our own stderr: the request's connection is shut, and its wsgi.errors is
            # the request thread's to write.
            App._log(dict(environ, **{"wsgi.errors": sys.stderr}),
                     "503 on %s: the request ran past request_timeout (%g s)%s; its thread runs "
                     "on, and nothing more it writes goes out"
                     % (_request_line(environ), seconds, drop(environ)))
        return sent
    except Exception:  # noqa: BLE001 - a failed answer must not stop the watchdog
        return False


class Scoreboard:
    """Shared memory where forked workers post when to be killed; their supervisor reads it.

    Posting is a store into an anonymous shared mapping: no system call on the request path
    (a pipe to the supervisor would cost a write per post and wake it each time). A slot is
    ``kill_at`` and ``since`` (time.monotonic(), one clock for every process on Linux; 0 = no
    request) and the request line. Doubles are stored at 8-byte-aligned offsets with native
    layout, a single load or store on the machines this runs on (x86-64, arm64), and the
    supervisor reads a deadline twice before it acts.
    """

    SLOT = 128
    LINE = SLOT - 17

    def __init__(self, slots):
        import mmap
        import struct

        self._head = struct.Struct("dd")
        self._one = struct.Struct("d")
        # Anonymous and MAP_SHARED (mmap's default): the same pages in every forked child.
        self._mm = mmap.mmap(-1, slots * self.SLOT)
        self._free = list(range(slots))

    def take(self):
        """Return a free slot for a worker about to be forked, or None when all are taken."""
        return self._free.pop(0) if self._free else None

    def release(self, slot):
        offset = slot * self.SLOT
        self._mm[offset:offset + self.SLOT] = bytes(self.SLOT)
        self._free.append(slot)

    def post(self, slot, kill_at, since=None, line=None):
        """Post a new deadline (and the request's start and line); ``kill_at`` 0 clears it."""
        offset = slot * self.SLOT
        if line is not None:
            # Before the deadline: a deadline seen by the supervisor has its line in place.
            line = line[:self.LINE]
            self._mm[offset + 16] = len(line)
            self._mm[offset + 17:offset + 17 + len(line)] = line
        if since is None:
            self._one.pack_into(self._mm, offset, kill_at)
        else:
            self._head.pack_into(self._mm, offset, kill_at, since)

    def read(self, slot):
        """Return (kill_at, since, request line) of a slot."""
        offset = slot * self.SLOT
        kill_at, since = self._head.unpack_from(self._mm, offset)
        size = min(self._mm[offset + 16], self.LINE)
        line = printable(bytes(self._mm[offset + 17:offset + 17 + size]).decode("latin-1"))
        if self._one.unpack_from(self._mm, offset)[0] != kill_at:
            return 0.0, since, line  # it moved while we read: the worker is alive
        return kill_at, since, line


def line_of(environ):
    """Return the request line of ``environ`` as bytes, for a Scoreboard slot or a log line."""
    uri = environ.get("REQUEST_URI") or environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
    return ("%s %s" % (environ.get("REQUEST_METHOD", "?"), uri)).encode("latin-1", "replace")


def printable(text):
    """Return ``text`` with control characters escaped, fit for one log line."""
    return "".join(c if " " <= c < "\x7f" else "\\x%02x" % ord(c) for c in text)


class Guard:
    """A WSGI app that runs ``app`` under ``timer``: the call, each chunk of its body, close()."""

    def __init__(self, app, timer):
        self.app = app
        self.timer = timer

    def __call__(self, environ, start_response):
        timer = self.timer
        token = result = None
        try:
            token = timer.start(environ)
            try:
                result = self.app(environ, start_response)
            finally:
                timer.pause(token)
        except RequestTimeout as exc:
            # From the handler, WebOb building the response, or any WSGI callable: the one
            # place a deadline becomes a 503.
            timer.end(token)
            _close(result)
            return self.timed_out(environ, start_response, exc)
        except BaseException:
            timer.end(token)
            raise
        if type(result) is list:
            # A whole body: the gateway only writes it, which the deadline does not bound.
            timer.end(token)
            return result
        return _GuardedBody(self, result, token, environ, start_response)

    def timed_out(self, environ, start_response, exc):
        """Return a 503 body, or raise ResponseCutOff when output has already gone out."""
        import traceback

        text = traceback.format_exc().rstrip()
        body = _PAGE.encode("utf-8")
        try:
            # With exc_info, start_response re-raises when the headers are out (PEP 3333).
            start_response("503 Service Unavailable",
                           [("Content-Type", "text/html; charset=utf-8"),
                            ("Content-Length", str(len(body)))],
                           (type(exc), exc, exc.__traceback__))
        except RequestTimeout:
            _log(environ, "response cut off", exc, text)
            raise ResponseCutOff("%s; the response was cut off" % exc) from None
        _log(environ, "503", exc, text)
        return [body]


class _GuardedBody:
    """A streamed body whose every chunk must come within the deadline (re-armed per chunk)."""

    def __init__(self, guard, result, token, environ, start_response):
        self._guard, self._result, self._token = guard, result, token
        self._environ, self._start_response = environ, start_response

    def __iter__(self):
        timer, token = self._guard.timer, self._token
        iterator = None
        while True:
            try:
                timer.resume(token)
                try:
                    if iterator is None:
                        iterator = iter(self._result)
                    chunk = next(iterator)
                finally:
                    timer.pause(token)
            except StopIteration:
                return
            except RequestTimeout as exc:
                timer.pause(token)
                yield from self._guard.timed_out(self._environ, self._start_response, exc)
                return
            yield chunk  # written by the gateway with the deadline off

    def close(self):
        timer, token = self._guard.timer, self._token
        try:
            close = getattr(self._result, "close", None)
            if close is not None:
                timer.resume(token)
                try:
                    close()
                finally:
                    timer.pause(token)
        except RequestTimeout as exc:
            # The response is out whole or cut already; only the log can hear of it.
            import traceback

            _log(self._environ, "close() of the response body stopped", exc,
                 traceback.format_exc().rstrip(), drop_tasks=False)
        finally:
            timer.end(token)


def _close(result):
    close = getattr(result, "close", None)
    if close is not None:
        try:
            close()
        except Exception:
            pass


def _log(environ, what, exc, text, drop_tasks=True):
    """Log one line about the request, as the App logs a 500, with where it was stuck.

    The tasks the request deferred are dropped, as after a 500, unless ``drop_tasks`` is
    false: a 503 or a cut-off response is not the response they were to follow.
    """
    from tinyweb.app import App, _request_line
    from tinyweb.deferred import drop

    note = drop(environ) if drop_tasks else ""
    App._log(environ, "%s on %s: %s%s\n%s" % (what, _request_line(environ), exc, note, text))


_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>503 Service Unavailable</title></head>
<body><h1>503 Service Unavailable</h1>
<p>%s Try again later.</p>
</body></html>
""" % TOO_LONG
