"""Run work after the whole response has reached the client: ``request.defer(func, ...)``.

The gateway owns that moment, because only it knows when the client has everything (flup
calls a body's close() before FCGI_END_REQUEST, so close() is too early there). A gateway
that does puts a list at ``environ["tinyweb.after_response"]`` and how many more tasks it
can take at ``environ["tinyweb.defer_room"]``, and runs the list after the response: CGI
in a detached grandchild, FastCGI on a bounded pool after FCGI_END_REQUEST, mod_python on a
thread. Under any other WSGI server the tasks run when the server closes the response.
"""

import sys

# functools, threading and traceback are imported where used: a CGI request imports this
# module on every request and rarely defers anything.

__all__ = ["defer", "drop", "run_tasks", "start_thread", "TooManyTasks", "MAX_PENDING", "AtClose",
           "TaskPool"]

# Pending tasks one process will hold; past it defer() raises instead of piling up work
# (or, under CGI, processes) without bound.
MAX_PENDING = 16
THREAD_NAME = "tinyweb-deferred"


class TooManyTasks(RuntimeError):
    """More tasks are pending in this process than it will hold."""


def defer(environ, func, args, kwargs):
    """Queue ``func(*args, **kwargs)`` to run after this request's response."""
    if not callable(func):
        raise TypeError("defer() needs a callable, not %r" % (func,))
    tasks = environ.get("tinyweb.after_response")
    if tasks is None:
        tasks = environ.setdefault("tinyweb.deferred_at_close", [])
    room = environ.get("tinyweb.defer_room", MAX_PENDING)
    if len(tasks) >= room:
        raise TooManyTasks(
            "%d deferred tasks are already pending in this process (at most %d): "
            "do the work now, or hand it to a job queue" % (MAX_PENDING - room + len(tasks), MAX_PENDING)
        )
    import functools

    tasks.append(functools.partial(func, *args, **kwargs))


def drop(environ):
    """Forget the tasks this request deferred, for it failed; return what its log line says of it.

    A task is work that follows a response (the receipt for an order taken): after an
    uncaught exception or a request past its deadline, there is no such response to follow.
    """
    dropped = 0
    for key in ("tinyweb.after_response", "tinyweb.deferred_at_close"):
        tasks = environ.get(key)
        if tasks:
            dropped += len(tasks)
            del tasks[:]
    if not dropped:
        return ""
    return " (%d deferred task%s dropped)" % (dropped, "" if dropped == 1 else "s")


def _name(task):
    func = getattr(task, "func", task)
    return "%s.%s" % (getattr(func, "__module__", "?"), getattr(func, "__qualname__", repr(func)))


def run_tasks(tasks, stream=None):
    """Run each task; log a failing one with its traceback and go on with the next."""
    for task in tasks:
        try:
            task()
        # SystemExit too: a task's sys.exit() ends that task, not the pool thread (which would
        # die silently, leaving the tasks queued behind it to wait forever) nor the worker.
        except (Exception, SystemExit):
            out = stream or sys.stderr
            try:
                import traceback

                out.write("tinyweb: deferred task %s failed\n%s" % (_name(task), traceback.format_exc()))
                out.flush()
            except (OSError, ValueError):
                pass


def pending_threads():
    """Count this process's deferred-task threads that are still running."""
    import threading

    return sum(1 for t in threading.enumerate() if t.name == THREAD_NAME)


def start_thread(tasks, stream=None):
    """Run ``tasks`` on a new daemon-less thread, so the process waits for them at exit."""
    import threading

    thread = threading.Thread(target=run_tasks, args=(list(tasks), stream), name=THREAD_NAME)
    thread.start()
    return thread


class AtClose:
    """A response body that runs deferred tasks once the server has closed it (PEP 3333)."""

    def __init__(self, body, tasks, stream):
        self._body, self._tasks, self._stream = body, tasks, stream

    def __iter__(self):
        return iter(self._body)

    def close(self):
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            run_tasks(self._tasks, self._stream)


class TaskPool:
    """A few threads that run deferred tasks for a long-lived process, at most MAX_PENDING queued.

    A FastCGI worker serves its next request while these run, so a slow task never holds
    it; the bound makes defer() fail before a burst of slow tasks eats the process.
    """

    def __init__(self, threads=2, limit=MAX_PENDING, stream=None):
        self.threads, self.limit, self.stream = threads, limit, stream
        self._pending = 0
        import threading

        self._cond = threading.Condition()
        self._queue = []
        self._started = False

    def room(self):
        """Return how many more tasks this pool takes now."""
        with self._cond:
            return self.limit - self._pending

    def submit(self, tasks):
        """Queue ``tasks`` (a list from one request) to run in order."""
        if not tasks:
            return
        with self._cond:
            if not self._started:
                for n in range(self.threads):
                    import threading

                    threading.Thread(target=self._work, name=THREAD_NAME, daemon=True).start()
                self._started = True
            self._pending += len(tasks)
            self._queue.append(list(tasks))
            self._cond.notify()

    def _work(self):
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                tasks = self._queue.pop(0)
            try:
                run_tasks(tasks, self.stream)
            finally:
                with self._cond:
                    self._pending -= len(tasks)
                    self._cond.notify_all()

    def drain(self, timeout):
        """Wait up to ``timeout`` seconds for the queued tasks; return how many are left."""
        import time

        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return self._pending
