"""Run a FastCGI worker: the accept loop, its idle kept-alive connections, its deadlines.

Written by hand, with the supervisor that forks workers (supervisor.py), because flup
1.0.3's prefork server is broken on Python 3 (notes/servers.md §5): it waits in
``select(..., None)``, which PEP 475 retries after a signal, so SIGTERM is never acted on; a
bytes/str comparison makes every busy child look idle; SIGUSR1 kills the parent; and a
child that exits unwinds through the caller's stack. Here every wait has a deadline, and a
worker leaves with ``os._exit``.
"""

import errno
import os
import select
import signal
import sys
import threading
import time
import traceback

from tinyweb.deferred import TaskPool

__all__ = ["Worker", "DropConnection", "IdleConnection", "ParkConnection", "log"]

# Seconds a stopping worker may take to finish its requests before it is killed.
SHUTDOWN_GRACE = 10.0
# Idle kept-alive connections a single-threaded worker holds at most (nginx keeps
# `keepalive N` per nginx worker); past it the longest idle is closed.
MAX_PARKED = 64
# Seconds past request_timeout after which the supervisor SIGKILLs a worker still in a request
# (stuck where SIGALRM cannot reach: C code that never returns to the interpreter).
STUCK_GRACE = 10.0

# This process's Scoreboard and slot, set in a forked worker by Supervisor._child
# (supervisor.py).
_own_slot = None

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def log(message):
    """Write one line about the server to stderr (the web server's error log)."""
    try:
        sys.stderr.write("tinyweb fcgi[%d]: %s\n" % (os.getpid(), message))
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


class DropConnection(Exception):
    """Close this connection and log why (a malformed record, a silent peer)."""


class IdleConnection(Exception):
    """Close this connection quietly: no request is in progress and the worker stops or it expired."""


class ParkConnection(Exception):
    """Keep this connection open and idle: its next request is waited for with the others."""


class Worker:
    """Accept connections on a listening socket and serve them, one per thread, until stopped."""

    def __init__(self, server, listen_sock, connection_class, threads=1, max_requests=0,
                 parent_pid=None):
        self.server = server
        self.listen_sock = listen_sock
        self.connection_class = connection_class
        self.threads = threads
        self.max_requests = max_requests
        self.parent_pid = parent_pid
        self.served = 0
        self.stopping = False
        self.failed = False
        self.tasks = TaskPool()
        self.timer = None  # what bounds each request (tinyweb/deadline.py), once running
        self._lock = threading.Lock()
        # Readable once stop() ran, so every poller wakes at once.
        self.stop_fd, self._stop_w = os.pipe()
        os.set_blocking(self._stop_w, False)

    def stop(self, *_signal_args):
        """Stop accepting; finish the requests in progress (safe in a signal handler)."""
        self.stopping = True
        try:
            os.write(self._stop_w, b".")  # never read: the pipe stays readable
        except BlockingIOError:
            pass

    def request_done(self):
        with self._lock:
            self.served += 1
            if self.max_requests and self.served >= self.max_requests:
                self.stop()
        if self.timer is not None and self.timer.fired and not self.stopping:
            # Interrupted wherever it was, the app's state may be half-updated: a fresh worker
            # (forked by the supervisor, or spawned by mod_fcgid) takes over.
            log("a request ran past request_timeout (%g s); this worker stops and a fresh one "
                "takes over" % self.timer.seconds)
            self.stop()

    def run(self):
        """Serve until SIGTERM, SIGINT, SIGHUP or --max-requests; return the exit status."""
        try:
            return self._run()
        finally:
            # Deferred tasks of requests already answered get the same grace as requests.
            left = self.tasks.drain(SHUTDOWN_GRACE)
            if left:
                log("stopping with %d deferred task(s) unfinished" % left)

    def _run(self):
        for signum in STOP_SIGNALS:
            signal.signal(signum, self.stop)
        # Blocked by the supervisor across fork (Supervisor._fork): a stop signal sent since
        # is delivered now, to these handlers.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        self._bound_requests()
        if self.threads == 1:
            self._accept_loop()
            return 0
        pool = [threading.Thread(target=self._thread_main, name="fcgi-%d" % n, daemon=True)
                for n in range(self.threads)]
        for thread in pool:
            thread.start()
        give_up = None
        while True:
            alive = [thread for thread in pool if thread.is_alive()]
            if not alive:
                return 1 if self.failed else 0
            if self.stopping:
                # Bounded, as the supervisor bounds a stopping worker: a request stuck for good
                # (the watchdog's reason to stop) must not keep the process, and under mod_fcgid
                # no supervisor would kill it.
                give_up = give_up or time.monotonic() + SHUTDOWN_GRACE
                if time.monotonic() >= give_up:
                    log("%d request(s) still running after %g s; exiting without them"
                        % (len(alive), SHUTDOWN_GRACE))
                    return 1
            alive[0].join(min(1.0, max(give_up - time.monotonic(), 0.01)) if give_up else 1.0)
            self._check_parent()

    def _bound_requests(self):
        """Run the app under request_timeout: SIGALRM in the main thread, else a watchdog."""
        from tinyweb.deadline import Alarm, Guard, PostedAlarm, Watch, timeout_of

        seconds = timeout_of(self.server.application)
        if not seconds:
            return
        if self.threads > 1:
            self.timer = Watch(seconds)
            self.timer.beat(_own_slot, STUCK_GRACE)
            threading.Thread(target=self.timer.watchdog,
                             args=(self._overdue, _own_slot, STUCK_GRACE),
                             name="tinyweb-watchdog", daemon=True).start()
        elif _own_slot is not None:
            self.timer = PostedAlarm(seconds, _own_slot[0], _own_slot[1], STUCK_GRACE)
        else:
            self.timer = Alarm(seconds)  # mod_fcgid's process: no supervisor to post to
        if self.threads == 1:
            self.timer.install()  # the requests run in this, the main thread (_accept_loop)
        # flup's server calls .application for each request; this process has its own copy of
        # the server (a forked worker, or the one process under mod_fcgid).
        self.server.application = Guard(self.server.application, self.timer)

    def _overdue(self, line, elapsed, seconds, answered):
        log("%s has run for %.0f s, past request_timeout (%g s)%s; threads cannot be "
            "interrupted, so this worker takes no more requests, lets the others finish (up to "
            "%g s) and exits, and a fresh one takes over"
            % (line, elapsed, seconds, ", answered 503" if answered else "", SHUTDOWN_GRACE))
        self.stop()

    def _thread_main(self):
        try:
            self._accept_loop()
        except Exception:
            # A dead thread would shrink the pool unseen: stop the whole worker instead, so
            # the supervisor starts a fresh one.
            log("worker thread failed; stopping this worker:\n%s" % traceback.format_exc())
            self.failed = True
            self.stop()

    def _check_parent(self):
        # A supervisor killed with SIGKILL cannot stop its workers: they notice and leave.
        if self.parent_pid is not None and os.getppid() != self.parent_pid and not self.stopping:
            log("the supervising process is gone; stopping")
            self.stop()

    def _accept_loop(self):
        listen_fd = self.listen_sock.fileno()
        poller = _poller(listen_fd, self.stop_fd)
        # A single-threaded worker keeps its idle kept-alive connections here, waited for
        # together with the listening socket: fd -> (connection, since).
        parked = {} if self.threads == 1 else None
        try:
            while not self.stopping:
                self._check_parent()
                ready = poller.poll(1.0)
                if self.stopping:
                    break
                for fd, _ in ready:
                    if fd == listen_fd:
                        self._accept(parked, poller)
                    elif parked and fd in parked:
                        conn = parked.pop(fd)[0]
                        poller.unregister(fd)
                        self._serve(conn, parked, poller)
                if parked:
                    self._expire(parked, poller)
        finally:
            for conn, _ in (parked or {}).values():
                conn.close(linger=False)

    def _accept(self, parked, poller):
        try:
            sock, addr = self.listen_sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return  # another worker took it, or the peer gave up
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                raise
            log("cannot accept a connection: %s" % exc.strerror)
            select.select([self.stop_fd], [], [], 0.5)
            return
        conn = self.connection_class(sock, addr, self.server, self)
        conn.parkable = parked is not None
        self._serve(conn, parked, poller)

    def _expire(self, parked, poller):
        oldest = sorted(parked.items(), key=lambda item: item[1][1])
        for n, (fd, (conn, since)) in enumerate(oldest):
            if conn.idle_expired(since) or len(oldest) - n > MAX_PARKED:
                del parked[fd]
                poller.unregister(fd)
                conn.close(linger=False)

    def _serve(self, conn, parked, poller):
        """Run ``conn`` until it ends (log why unless that was normal), or until it idles between
        requests and is parked."""
        addr = conn._addr
        peer = " from %s:%s" % addr[:2] if isinstance(addr, tuple) else ""
        try:
            conn.run()
            conn.close()
        except ParkConnection:
            fd = conn._sock.fileno()
            parked[fd] = (conn, time.monotonic())
            poller.register(fd, select.POLLIN)
        except EOFError:
            conn.close()
        except IdleConnection:
            conn.close(linger=False)
        except (BrokenPipeError, ConnectionResetError):
            conn.abort()  # the web server went away: normal, not an error
        except DropConnection as exc:
            log("closing a connection%s: %s" % (peer, exc))
            conn.abort()
        except Exception:
            # flup's thread pool swallows these silently (threadpool.py:81) and its prefork
            # child dies of them; here the connection goes and the worker serves the next.
            log("closing a connection%s after an error:\n%s" % (peer, traceback.format_exc()))
            conn.abort()


def _poller(listen_fd, stop_fd):
    """Return an object whose poll(seconds) waits for a connection or the stop pipe.

    With epoll's EPOLLEXCLUSIVE (Linux 4.5) the kernel wakes one waiting worker per
    connection; plain poll() on the shared socket wakes every worker for each, and all
    but one find nothing to accept (bench/README.md: ~10 % of a hello at 1 client).
    """
    exclusive = getattr(select, "EPOLLEXCLUSIVE", None)
    if exclusive is not None:
        try:
            poller = select.epoll()
            poller.register(listen_fd, select.EPOLLIN | exclusive)
            poller.register(stop_fd, select.EPOLLIN)
            return poller
        except OSError:
            pass

    class _Poll:
        def __init__(self):
            self._poll = select.poll()
            self._poll.register(listen_fd, select.POLLIN)
            self._poll.register(stop_fd, select.POLLIN)

        def poll(self, seconds):
            return self._poll.poll(seconds * 1000)

        def register(self, fd, events):
            self._poll.register(fd, events)

        def unregister(self, fd):
            self._poll.unregister(fd)

    return _Poll()
