"""Supervise forked FastCGI workers: keep the count, replace the dead, stop, reload, kill the stuck.

Written by hand because flup 1.0.3's prefork parent is broken on Python 3 (notes/servers.md
§5; prefork.py runs the workers). Here the parent only supervises and every wait has a
deadline.
"""

import os
import select
import signal
import sys
import time
import traceback

from tinyweb.runners import prefork
from tinyweb.runners.prefork import log

__all__ = ["Supervisor"]

# Seconds to wait for a killed worker to be reaped before giving up on it.
KILL_WAIT = 5.0
# Longest pause between restarts of a worker that keeps dying as soon as it starts.
MAX_RESPAWN_DELAY = 5.0


class Supervisor:
    """Keep ``count`` forked workers running; replace, stop or reload them on signals."""

    def __init__(self, worker_main, count, reexec=None, retiring=()):
        """``worker_main(parent_pid) -> status`` runs in each child; ``reexec(pids)`` reloads."""
        self.worker_main = worker_main
        self.count = count
        self.reexec = reexec
        self.workers = {}  # pid -> start time
        # pid -> when to SIGKILL it; a reload hands its old workers over through reexec.
        self.retiring = {pid: time.monotonic() + prefork.SHUTDOWN_GRACE for pid in retiring}
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
                    for signum in prefork.STOP_SIGNALS + (signal.SIGCHLD,)]
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
                    log("stopping: letting requests in progress finish (up to %g s)" % prefork.SHUTDOWN_GRACE)
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
        signal.pthread_sigmask(signal.SIG_BLOCK, prefork.STOP_SIGNALS)
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
            signal.pthread_sigmask(signal.SIG_UNBLOCK, prefork.STOP_SIGNALS)
        if slot is not None:
            self.slots[pid] = slot
        return pid

    def _child(self, parent, slot):
        """Run one worker in the forked child; never return into the caller's stack."""
        status = 1
        if slot is not None:
            prefork._own_slot = (self.board, slot)
        try:
            signal.set_wakeup_fd(-1)
            for fd in self._wake:
                os.close(fd)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            for signum in prefork.STOP_SIGNALS:
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
        deadline = time.monotonic() + prefork.SHUTDOWN_GRACE
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
                    % (pid, line or "a request", now - since, prefork.STUCK_GRACE))
                _kill(pid, signal.SIGKILL)
                del self.workers[pid]  # replaced at once; reaped (quietly) when it is gone
                self.killed[pid] = now + KILL_WAIT
        for pid, deadline in list(self.retiring.items()):
            if now >= deadline:
                log("worker %d still busy after %g s; killing it" % (pid, prefork.SHUTDOWN_GRACE))
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
