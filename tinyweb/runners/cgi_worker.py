"""The persistent-CGI worker: serve the requests entries hand over, for one app file, until idle or stale.

Started detached by a cold CGI request (persistent.spawn_worker); the protocol, the socket's
place and what makes a worker stale are in persistent.py, shared with the entry.
"""

import marshal
import os
import sys

from tinyweb.runners.persistent import (
    ANSWER_BUSY,
    ANSWER_RESPONSE,
    ANSWER_STALE,
    GO,
    MAGIC,
    MAX_REQUESTS,
    TAKEOVER_SECONDS,
    python_stamp,
    request_stamps,
    stamp,
)

__all__ = ["Worker", "main"]


class _BodyReader:
    """The request body the entry sends as length-prefixed chunks, ending with an empty one."""

    def __init__(self, rfile):
        self._rfile = rfile
        self._buf = bytearray()  # appended to and cut from the front: no quadratic copying
        self._done = False

    def _fill(self):
        if self._done:
            return False
        head = self._rfile.read(4)
        if len(head) < 4:
            self._done = True
            return False
        size = int.from_bytes(head, "big")
        if size == 0:
            self._done = True
            return False
        self._buf += self._rfile.read(size)
        return True

    def _take(self, size):
        data = bytes(self._buf[:size])
        del self._buf[:size]
        return data

    def read(self, size=-1):
        if size is None or size < 0:
            while self._fill():
                pass
            return self._take(len(self._buf))
        while len(self._buf) < size and self._fill():
            pass
        return self._take(size)

    def read1(self, size=-1):
        if not self._buf:
            self._fill()
        return self._take(size if size is not None and size >= 0 else len(self._buf))

    def readline(self, size=-1):
        if size is None:
            size = -1
        while b"\n" not in self._buf and (size < 0 or len(self._buf) < size) and self._fill():
            pass
        end = self._buf.find(b"\n") + 1 or len(self._buf)
        if size >= 0:
            end = min(end, size)
        return self._take(end)

    def readlines(self, hint=-1):
        return list(iter(self.readline, b""))

    def __iter__(self):
        return iter(self.readline, b"")


def _stdlib_dirs():
    import sysconfig

    paths = sysconfig.get_paths()
    return tuple({paths["stdlib"] + os.sep, paths["platstdlib"] + os.sep})


def _in_stdlib(path, stdlib_dirs):
    # On a pyenv or self-built Python, site-packages sits inside the stdlib folder.
    return path.startswith(stdlib_dirs) and "-packages" + os.sep not in path


def _module_files(stdlib_dirs):
    """List the files of the loaded modules outside the standard library."""
    files = []
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if isinstance(path, str) and not _in_stdlib(path, stdlib_dirs):
            files.append(path)
    return files


class Worker:
    """Serve CGI requests handed over by entries, for one app file, until idle or stale."""

    def __init__(self, app_file, path, idle_seconds):
        import threading

        self.app_file = os.path.abspath(app_file)
        self.path = path
        self.idle_seconds = idle_seconds
        self.app = None
        self.runner = None  # the app under its request_timeout (deadline.Guard), once loaded
        self.alarm = None
        self.stamps = None
        self.modules = {}
        self.stale = False
        self.served = 0
        self.active = 0
        self.inode = None  # of our socket, while it is the one at self.path
        self.lock = threading.Lock()
        self.stdlib_dirs = _stdlib_dirs()

    def load(self):
        import importlib.util

        self._watch_imports()
        from tinyweb.app import App

        # Stamped before loading: a change while we load shows as a difference later.
        stamps = request_stamps(self.app_file, os.environ)
        spec = importlib.util.spec_from_file_location("tinyweb_cgi_worker_app", self.app_file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        # The worker's environment has no CGI request in it, so app.run() does nothing here.
        spec.loader.exec_module(module)
        apps = [v for v in vars(module).values() if isinstance(v, App)]
        if not apps:
            raise RuntimeError("%s defines no tinyweb.App" % self.app_file)
        self.app = vars(module).get("app") if isinstance(vars(module).get("app"), App) else apps[0]
        self.app.config  # read tinyweb.ini now: an error shows before any request is taken
        import tinyweb.request  # noqa: F401  (loaded now, so its files are stamped too)
        import tinyweb.runners.cgi  # noqa: F401
        # After the app ran: an entry's sys.path includes what app.py added to it.
        self.stamps = dict(stamps, python=python_stamp())
        self._stamp_loaded()

    def _watch_imports(self):
        """Stamp each module's source file just before the import system reads it.

        Stamped after its import, a file edited meanwhile would look current: a module a
        handler imports on its first call (README: keep app.py's imports light) would then
        be served stale for the worker's life.
        """
        from importlib.machinery import SourceFileLoader

        path_stats = SourceFileLoader.path_stats
        modules, lock, stdlib_dirs = self.modules, self.lock, self.stdlib_dirs

        def stamped_path_stats(loader, path):
            if not _in_stdlib(path, stdlib_dirs):
                with lock:
                    modules.setdefault(path, stamp(path))
            return path_stats(loader, path)

        SourceFileLoader.path_stats = stamped_path_stats

    def _stamp_loaded(self):
        # What came in before _watch_imports, or not from source (extension modules).
        files = _module_files(self.stdlib_dirs)
        with self.lock:
            for path in files:
                self.modules.setdefault(path, stamp(path))
            return list(self.modules.items())

    def current(self, stamps):
        """Tell whether the entry's app, config, settings and Python, and our modules, are what we loaded."""
        if stamps != self.stamps:
            return False
        return all(stamp(path) == old for path, old in self._stamp_loaded())

    def retire(self):
        """Take no more requests: remove our socket and pid file (never a successor's)."""
        with self.lock:
            self.stale = True
            if self.inode is None:
                return
            try:
                if os.stat(self.path).st_ino == self.inode:
                    os.unlink(self.path)
                    os.unlink(self.path + ".pid")
            except OSError:
                pass
            self.inode = None

    def handle(self, conn):
        from tinyweb.runners.cgi import CGIGateway, environ_from

        rfile = conn.makefile("rb")
        wfile = conn.makefile("wb")
        try:
            if rfile.read(4) != MAGIC:
                return
            size = int.from_bytes(rfile.read(4), "big")
            if not 0 < size <= 1 << 24:
                return
            header = marshal.loads(rfile.read(size))
            if header.get("app") != self.app_file:
                # Another app whose socket name collided with ours: not ours to serve, and
                # no reason for us to go.
                wfile.write(ANSWER_STALE)
                wfile.flush()
                return
            if self.stale or not self.current(header.get("stamps")):
                self.retire()  # at once: the next entries find no socket and go cold
                wfile.write(ANSWER_STALE)
                wfile.flush()
                return
            wfile.write(ANSWER_RESPONSE)
            wfile.flush()
            if rfile.read(1) != GO:
                return  # the entry gave up waiting and served the request itself
            environ = environ_from(header["env"], "cgi")
            environ["tinyweb.cgi_worker"] = True
            tasks = environ["tinyweb.after_response"] = []
            environ["tinyweb.defer_room"] = self.tasks.room()
            gateway = CGIGateway(_BodyReader(rfile), wfile, sys.stderr, environ)
            gateway.wsgi_multithread, gateway.run_once = False, False  # one of many, in turn
            gateway.run(self.runner)
            try:
                wfile.flush()
            except OSError:
                pass  # the entry went away (its client did): as under cold CGI, tasks still run
            if self.alarm is not None and self.alarm.fired:
                # Interrupted wherever it was, the app's module state may be half-updated: the
                # next entries go cold and start a fresh worker.
                sys.stderr.write("tinyweb: CGI worker: a request ran past request_timeout; "
                                 "retiring this worker\n")
                sys.stderr.flush()
                self.retire()
            # Body the app left unread is the entry's to drain, within its limits: closing
            # now ends the response for the entry.
            self.tasks.submit(tasks)
        finally:
            with self.lock:
                self.served += 1
            for f in (wfile, rfile):
                try:
                    f.close()
                except OSError:
                    pass
            try:
                conn.shutdown(2)
            except OSError:
                pass
            conn.close()

    def serve(self):
        import queue
        import signal
        import socket
        import threading
        import time

        from tinyweb.deferred import TaskPool

        sys.stdout = sys.stderr  # a handler's print() goes to the log, as under cold CGI
        # Stopped with SIGTERM (by an operator, or a test): unwind through the finally below,
        # so the socket and pid file go with us.
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
        self.tasks = TaskPool(stream=sys.stderr)
        lock = open(self.path + ".lock", "a")
        # The worker we replace (stale, idle) lets go of the lock once its socket is gone.
        if not _take_lock(lock, TAKEOVER_SECONDS):
            return 0  # another worker for this app is starting or running
        self.load()
        from tinyweb.runners.cgi import guarded

        # Requests run on this, the main thread (below), where SIGALRM can interrupt them.
        self.runner, self.alarm = guarded(self.app)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o077)
        try:
            listener.bind(self.path)
        finally:
            os.umask(old)
        self.inode = os.stat(self.path).st_ino
        listener.listen(64)
        listener.settimeout(1.0)
        # Written once we take connections, whole (renamed into place): a pid file names a
        # worker that is ready.
        with open(self.path + ".pid.new", "w") as f:
            f.write("%d\n" % os.getpid())
        os.replace(self.path + ".pid.new", self.path + ".pid")
        # Requests run one at a time on this, the main thread, as they would in `python
        # app.py`: module state such as an sqlite3 connection is bound to the thread that
        # made it. While one runs, the accept thread turns entries away at once ("busy"),
        # and they serve their request cold rather than wait.
        handoff = queue.Queue(maxsize=1)
        stopping = threading.Event()

        def accept_loop():
            # SIGALRM is for the request on the main thread: Linux gives a process's signal to
            # the main thread first anyway (kernel/signal.c complete_signal); never to this one.
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
            while not stopping.is_set():
                try:
                    conn, _ = listener.accept()
                except socket.timeout:
                    continue
                except OSError:
                    return  # the listener was closed: we are stopping
                conn.settimeout(300.0)
                with self.lock:
                    claimed = not self.active
                    if claimed:
                        self.active = 1
                if claimed:
                    handoff.put(conn)
                else:
                    _turn_away(conn)

        acceptor = threading.Thread(target=accept_loop, name="tinyweb-accept", daemon=True)
        acceptor.start()
        last = time.monotonic()
        try:
            while not self.stale and self.served < MAX_REQUESTS:
                try:
                    conn = handoff.get(timeout=1.0)
                except queue.Empty:
                    if time.monotonic() - last >= self.idle_seconds:
                        break
                    continue
                try:
                    self.handle(conn)
                except ConnectionError:
                    pass  # an entry that gave up, or whose client did: normal
                except Exception:
                    import traceback

                    sys.stderr.write("tinyweb: CGI worker request failed\n%s" % traceback.format_exc())
                    sys.stderr.flush()
                finally:
                    last = time.monotonic()
                    with self.lock:
                        self.active = 0
        finally:
            # Stop taking requests first, so entries fall back to cold at once; then let a
            # successor take over while we finish the deferred tasks we took.
            stopping.set()
            self.retire()
            listener.close()
            lock.close()
            acceptor.join(2.0)
            while not handoff.empty():
                _turn_away(handoff.get_nowait())
            self.tasks.drain(10.0)
        return 0


def _turn_away(conn):
    """Tell an entry we are busy, so it serves its request cold at once."""
    try:
        conn.settimeout(1.0)
        conn.sendall(ANSWER_BUSY)
    except OSError:
        pass
    finally:
        conn.close()


def _take_lock(lock, seconds):
    """Take an exclusive flock on ``lock`` within ``seconds``; return whether we have it."""
    import fcntl
    import time

    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)


def main(argv=None):
    """Serve as the worker for APP_FILE on SOCKET; return an exit status."""
    from tinyweb.runners.persistent import IDLE_SECONDS

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        sys.stderr.write("usage: python -m tinyweb.runners.cgi_worker APP_FILE SOCKET\n")
        return 2
    idle = IDLE_SECONDS
    text = os.environ.get("TINYWEB_CGI_WORKER_IDLE", "").strip()
    if text:
        try:
            idle = float(text)
        except ValueError:
            sys.stderr.write("tinyweb: TINYWEB_CGI_WORKER_IDLE=%r is not a number of seconds; "
                             "using %g\n" % (text, idle))
    return Worker(argv[0], argv[1], idle).serve()


if __name__ == "__main__":
    sys.exit(main())
