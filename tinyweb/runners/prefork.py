"""Run FastCGI workers: the accept loop each worker runs, and the supervisor that forks them.

Written by hand because flup 1.0.3's prefork server is broken on Python 3 (notes/servers.md
§5): it waits in ``select(..., None)``, which PEP 475 retries after a signal, so SIGTERM is
never acted on; a bytes/str comparison makes every busy child look idle; SIGUSR1 kills the
parent; and a child that exits unwinds through the caller's stack. Here the parent only
supervises, every wait has a deadline, and a worker leaves with ``os._exit``.
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

__all__ = ["Supervisor", "Worker", "DropConnection", "IdleConnection", "ParkConnection", "log"]

# Seconds a stopping worker may take to finish its requests before it is killed.
SHUTDOWN_GRACE = 10.0
# Seconds to wait for a killed worker to be reaped before giving up on it.
KILL_WAIT = 5.0
# Idle kept-alive connections a single-threaded worker holds at most (nginx keeps
# `keepalive N` per nginx worker); past it the longest idle is closed.
MAX_PARKED = 64
# Longest pause between restarts of a worker that keeps dying as soon as it starts.
MAX_RESPAWN_DELAY = 5.0
# Seconds past request_timeout after which the supervisor SIGKILLs a worker still in a request
# (stuck where SIGALRM cannot reach: C code that never returns to the interpreter).
STUCK_GRACE = 10.0

# This process's Scoreboard and slot, set in a forked worker by Supervisor._child.
_own_slot = None

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


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
        for signum in _STOP_SIGNALS:
            signal.signal(signum, self.stop)
        # Blocked by the supervisor across fork (Supervisor._fork): a stop signal sent since
        # is delivered now, to these handlers.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
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

    def _overdue(self, line, elapsed, seconds):
        log("%s has run for %.0f s, past request_timeout (%g s); threads cannot be interrupted, "
            "so this worker takes no more requests, lets the others finish (up to %g s) and "
            "exits, and a fresh one takes over" % (line, elapsed, seconds, SHUTDOWN_GRACE))
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


class Supervisor:
    """Keep ``count`` forked workers running; replace, stop or reload them on signals."""

    def __init__(self, worker_main, count, reexec=None, retiring=()):
        """``worker_main(parent_pid) -> status`` runs in each child; ``reexec(pids)`` reloads."""
        self.worker_main = worker_main
        self.count = count
        self.reexec = reexec
        self.workers = {}  # pid -> start time
        # pid -> when to SIGKILL it; a reload hands its old workers over through reexec.
        self.retiring = {pid: time.monotonic() + SHUTDOWN_GRACE for pid in retiring}
        self.killed = {}  # pid -> when to stop waiting for it
        self.board = None  # the Scoreboard where workers post their request deadlines
        self.slots = {}  # pid -> its slot on the board
        self._respawn_delay = 0.0
        self._next_spawn = 0.0
        self._wake = ()

    def run(self):
        """Supervise until SIGTERM or SIGINT; SIGHUP reloads. Return the exit status."""
        from tinyweb.deadline import Scoreboard

        # Room for a full set of workers and the set a reload retires, and a few being killed.
        self.board = Scoreboard(2 * self.count + 4)
        wake_r, wake_w = self._wake = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        handlers = [(signum, signal.signal(signum, _ignore))
                    for signum in _STOP_SIGNALS + (signal.SIGCHLD,)]
        old_wakeup = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        try:
            return self._loop(wake_r)
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for signum, handler in handlers:
                signal.signal(signum, handler)
            os.close(wake_r)
            os.close(wake_w)
            for pid in list(self.workers) + list(self.retiring):  # only on an unexpected error
                _kill(pid, signal.SIGKILL)
            self._reap()

    def _loop(self, wake_r):
        stopping = False
        while True:
            self._reap()
            if not stopping:
                self._spawn_missing()
            elif not (self.workers or self.retiring or self.killed):
                return 0
            self._enforce_deadlines()
            poller = select.poll()
            poller.register(wake_r, select.POLLIN)
            poller.poll(self._next_timeout())
            for signum in _drain(wake_r):
                if signum in (signal.SIGTERM, signal.SIGINT) and not stopping:
                    log("stopping: letting requests in progress finish (up to %g s)" % SHUTDOWN_GRACE)
                    stopping = True
                    self._retire_all()
                elif signum == signal.SIGHUP and not stopping:
                    self._reload()

    def _reload(self):
        """Replace the workers without closing the listening socket (SIGHUP)."""
        log("reloading: old workers finish their requests, new ones take over")
        self._retire_all()
        if self.reexec is not None:
            self.reexec(sorted(self.retiring))  # returns only if exec failed
        # Not re-executed: fork fresh workers from this process at once.
        self._next_spawn = 0.0

    def _spawn_missing(self):
        while len(self.workers) < self.count and time.monotonic() >= self._next_spawn:
            try:
                pid = self._fork()
            except OSError as exc:  # EAGAIN/ENOMEM: out of processes or memory for now
                self._back_off()
                log("cannot start a worker (%s); retrying in %g s" % (exc.strerror, self._respawn_delay))
                return
            self.workers[pid] = time.monotonic()

    def _back_off(self):
        self._respawn_delay = min(max(self._respawn_delay * 2, 0.1), MAX_RESPAWN_DELAY)
        self._next_spawn = time.monotonic() + self._respawn_delay

    def _fork(self):
        # Block the stop signals across fork: in the child the inherited handlers would only
        # wake this parent, so a SIGTERM there would be lost. Worker.run unblocks them.
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        # Taken before fork: a child that asked getppid() after a parent already killed would
        # get 1 and never notice it is orphaned.
        parent = os.getpid()
        slot = self.board.take() if self.board is not None else None
        try:
            pid = os.fork()
            if pid == 0:
                self._child(parent, slot)
        except OSError:
            if slot is not None:
                self.board.release(slot)
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        if slot is not None:
            self.slots[pid] = slot
        return pid

    def _child(self, parent, slot):
        """Run one worker in the forked child; never return into the caller's stack."""
        global _own_slot
        status = 1
        if slot is not None:
            _own_slot = (self.board, slot)
        try:
            signal.set_wakeup_fd(-1)
            for fd in self._wake:
                os.close(fd)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            for signum in _STOP_SIGNALS:
                signal.signal(signum, signal.SIG_DFL)
            status = self.worker_main(parent) or 0
        except BaseException:  # the child must reach os._exit whatever happens
            log("worker failed:\n%s" % traceback.format_exc())
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
            # flup's children unwind through the caller's try/finally (notes/dependencies.md
            # §1.6 #2): os._exit skips it, so only the parent removes the socket file.
            os._exit(status)

    def _reap(self):
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._forget(pid, os.waitstatus_to_exitcode(status))

    def _forget(self, pid, code):
        started = self.workers.pop(pid, None)
        self.retiring.pop(pid, None)
        self.killed.pop(pid, None)
        slot = self.slots.pop(pid, None)
        if slot is not None:
            self.board.release(slot)
        if started is None:
            return
        if code == 0:  # --max-requests reached
            self._respawn_delay = 0.0
            return
        how = "was killed by signal %d" % -code if code < 0 else "exited with status %d" % code
        if time.monotonic() - started < 1.0:
            self._back_off()  # a worker that dies at once would be forked in a tight loop
        log("worker %d %s; starting another" % (pid, how))

    def _retire_all(self):
        deadline = time.monotonic() + SHUTDOWN_GRACE
        for pid in self.workers:
            _kill(pid, signal.SIGTERM)
            self.retiring[pid] = deadline
        self.workers.clear()

    def _enforce_deadlines(self):
        now = time.monotonic()
        for pid, slot in list(self.slots.items()):
            if pid not in self.workers:
                continue  # retiring or killed: it has its own deadline
            kill_at, since, line = self.board.read(slot)
            if kill_at and now >= kill_at:
                log("worker %d stuck in %s for %.0f s, past its request_timeout and %g s more; "
                    "killed it, starting another"
                    % (pid, line or "a request", now - since, STUCK_GRACE))
                _kill(pid, signal.SIGKILL)
                del self.workers[pid]  # replaced at once; reaped (quietly) when it is gone
                self.killed[pid] = now + KILL_WAIT
        for pid, deadline in list(self.retiring.items()):
            if now >= deadline:
                log("worker %d still busy after %g s; killing it" % (pid, SHUTDOWN_GRACE))
                _kill(pid, signal.SIGKILL)
                del self.retiring[pid]
                self.killed[pid] = now + KILL_WAIT
        for pid, deadline in list(self.killed.items()):
            if now >= deadline:
                log("worker %d did not exit after SIGKILL; no longer waiting for it" % pid)
                del self.killed[pid]
                self.slots.pop(pid, None)  # its slot stays taken: it might still write there

    def _next_timeout(self):
        """Milliseconds until the next deadline or respawn, at most one second."""
        now = time.monotonic()
        moments = list(self.retiring.values()) + list(self.killed.values())
        if len(self.workers) < self.count:
            moments.append(self._next_spawn)
        soonest = min(moments, default=now + 1.0)
        return max(0, min(1000, int((soonest - now) * 1000) + 1))


def _ignore(signum, frame):
    """Let the signal through to the wakeup pipe; the supervisor loop acts on it."""


def _drain(fd):
    signals = []
    while True:
        try:
            data = os.read(fd, 512)
        except (BlockingIOError, InterruptedError):
            return signals
        if not data:
            return signals
        signals.extend(data)


def _kill(pid, signum):
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
