"""Persistent CGI: hand a CGI request to a warm worker of the same app over a private socket.

A CGI request pays for a fresh interpreter and every import on each request. With
``cgi_worker = on`` in tinyweb.ini, the CGI process (the "entry") only connects to a worker
process that has the app loaded, passes it the environment and the body, and copies the
response back, the shape SpeedyCGI gave Perl. The entry imports nothing heavy: a warm
request costs little more than starting Python.

Safety, each with its guard:
- the socket is private: it lives in a directory owned by the user the app runs as, mode
  0700 (checked, not assumed), and the worker serves only the app file it loaded;
- no stale code: each request carries the app file's and tinyweb.ini's stat; the worker
  also checks every non-stdlib module it loaded; on any change it answers "stale" and
  exits, and the entry serves the request itself (cold) and starts a fresh worker;
- a cold fallback: no socket, no worker, a refused connection or a stale answer, and the
  entry serves the request the ordinary CGI way. Once the request has been sent, a
  worker that dies gives a 502, never a second run of the request.
"""

import marshal
import os
import sys

__all__ = ["handoff", "socket_path", "spawn_worker", "main"]

MAGIC = b"TWP1"
ANSWER_RESPONSE = b"R"
ANSWER_STALE = b"S"
GO = b"G"
IDLE_SECONDS = 300.0  # a worker with no request for this long exits
MAX_REQUESTS = 10000  # then exits too, bounding whatever the app leaks
MAX_CONNECTIONS = 8   # served at once by one worker (threads)
CHUNK = 65536


def runtime_dir():
    """Return the private directory for this user's worker sockets, or None if unsafe."""
    base = os.environ.get("TINYWEB_RUNTIME_DIR") or "/tmp/tinyweb-%d" % os.getuid()
    try:
        os.mkdir(base, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return None
    st = os.lstat(base)
    # Another local user could have made it first (or a symlink): then it is not ours to use.
    if not (st.st_uid == os.getuid() and (st.st_mode & 0o777) == 0o700 and (st.st_mode & 0o170000) == 0o040000):
        return None
    return base


def socket_path(app_file):
    """Return the worker socket path for ``app_file`` (the worker checks it is that app)."""
    import zlib

    base = runtime_dir()
    if base is None:
        return None
    return os.path.join(base, "%08x.sock" % zlib.crc32(os.path.abspath(app_file).encode("utf-8", "surrogateescape")))


def stamp(path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def request_stamps(app_file):
    """What must not have changed for the worker's code to be current."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(app_file)))
    config = os.environ.get("TINYWEB_CONFIG") or os.path.join(root, "tinyweb.ini")
    return {"app": stamp(app_file), "config": stamp(config), "config_path": config}


# --- the entry: the CGI process ------------------------------------------------------------


def _send_all(sock, data):
    view = memoryview(data)
    while view:
        sent = sock.send(view)
        view = view[sent:]


def handoff(app_file):
    """Serve this CGI request through a warm worker; return False if none took it.

    False means nothing was written to stdout: the caller serves the request itself.
    """
    import _socket
    import select

    path = socket_path(app_file)
    if path is None:
        return False
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(2.0)
        sock.connect(path)
        env = dict(os.environ)
        header = marshal.dumps({"app": os.path.abspath(app_file), "env": env,
                                "stamps": request_stamps(app_file)})
        _send_all(sock, MAGIC + len(header).to_bytes(4, "big") + header)
        # The worker answers once it has a free slot; until we say "go" it runs nothing,
        # so giving up here (busy, stale) and serving cold can never run the request twice.
        sock.settimeout(30.0)
        answer = sock.recv(1)
        if answer == ANSWER_RESPONSE:
            _send_all(sock, GO)
    except OSError:
        sock.close()
        return False
    if answer != ANSWER_RESPONSE:
        sock.close()  # stale or refused: serve cold
        return False

    # Now the worker owns the request: relay the body in and the response out, without
    # ever blocking on one side while the other is full (no deadlock on big bodies).
    sock.settimeout(None)
    sock.setblocking(False)
    out = sys.stdout.buffer
    out.flush()
    length = env.get("CONTENT_LENGTH", "")
    to_send = int(length) if length.isascii() and length.isdigit() else (
        -1 if env.get("REQUEST_METHOD", "GET").upper() in ("POST", "PUT", "PATCH") else 0)
    pending = b""
    body_done = False  # the empty chunk that ends the body has been queued
    stdin_fd = 0
    got_any = False
    while True:
        if not pending and not body_done and to_send == 0:
            pending, body_done = b"\0\0\0\0", True  # the worker reads the body to this mark
        want_read = [sock]
        want_write = [sock] if pending else []
        if not pending and not body_done:
            want_read.append(stdin_fd)
        readable, writable, _ = select.select(want_read, want_write, [], 60.0)
        if not readable and not writable:
            break  # the worker went silent for a minute
        if stdin_fd in readable:
            data = os.read(stdin_fd, CHUNK if to_send < 0 else min(CHUNK, to_send))
            if to_send > 0:
                to_send -= len(data)
            if not data:
                to_send = 0  # EOF before Content-Length: the worker sees a short body
            else:
                pending = len(data).to_bytes(4, "big") + data
        if sock in writable and pending:
            try:
                sent = sock.send(pending)
            except BlockingIOError:
                sent = 0
            except OSError:
                pending, body_done = b"", True  # the worker stopped reading: it has what it needs
                sent = 0
            pending = pending[sent:]
        if sock in readable:
            try:
                data = sock.recv(CHUNK)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                break
            got_any = True
            out.write(data)
            out.flush()
    sock.close()
    if to_send != 0:
        _drain_stdin(to_send)
    if not got_any:
        out.write(b"Status: 502 Bad Gateway\r\nContent-Type: text/plain\r\n\r\n"
                  b"The app's worker stopped before answering.\n")
        out.flush()
        sys.stderr.write("tinyweb: the CGI worker for %s closed the connection without a response\n" % app_file)
    return True


def _drain_stdin(left, limit=64 * 1024 * 1024, seconds=10.0):
    """Read and drop the body the worker did not want (mod_cgid loses the response otherwise)."""
    import select
    import time

    deadline = time.monotonic() + seconds
    left = limit if left < 0 else min(left, limit)
    while left > 0:
        wait = deadline - time.monotonic()
        if wait <= 0 or not select.select([0], [], [], wait)[0]:
            return
        data = os.read(0, min(CHUNK, left))
        if not data:
            return
        left -= len(data)


def spawn_worker(app_file):
    """Start a worker for ``app_file`` detached from this CGI process; return at once."""
    path = socket_path(app_file)
    if path is None:
        return
    sys.stdout.flush()
    pid = os.fork()
    if pid:
        os.waitpid(pid, 0)
        return
    try:
        os.setsid()
        if os.fork():
            os._exit(0)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.close(null)
        # fd 2 stays: under mod_cgid it is the error log, where the worker's errors belong;
        # under mod_cgi it is a pipe Apache waits on, so it goes to /dev/null there.
        import stat as _stat

        if not _stat.S_ISREG(os.fstat(2).st_mode):
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 2)
            os.close(null)
        env = {k: v for k, v in os.environ.items()
               if k.startswith("TINYWEB_") or k in ("PATH", "LANG", "LC_ALL", "PYTHONPATH", "HOME")}
        os.execve(sys.executable, [sys.executable, "-m", "tinyweb.runners.persistent", app_file, path], env)
    finally:
        os._exit(127)


# --- the worker ------------------------------------------------------------------------------


class _BodyReader:
    """The request body the entry sends as length-prefixed chunks, ending with an empty one."""

    def __init__(self, rfile):
        self._rfile = rfile
        self._buf = b""
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

    def read(self, size=-1):
        if size is None or size < 0:
            while self._fill():
                pass
            data, self._buf = self._buf, b""
            return data
        while len(self._buf) < size and self._fill():
            pass
        data, self._buf = self._buf[:size], self._buf[size:]
        return data

    def read1(self, size=-1):
        if not self._buf:
            self._fill()
        return self.read(min(size, len(self._buf)) if size and size > 0 else -1)

    def readline(self, size=-1):
        while b"\n" not in self._buf and (size < 0 or len(self._buf) < size) and self._fill():
            pass
        end = self._buf.find(b"\n") + 1 or len(self._buf)
        if size is not None and size >= 0:
            end = min(end, size)
        data, self._buf = self._buf[:end], self._buf[end:]
        return data

    def readlines(self, hint=-1):
        return list(iter(self.readline, b""))

    def __iter__(self):
        return iter(self.readline, b"")

    def drain(self):
        while self._fill():
            self._buf = b""


def _module_stamps():
    """Stat every loaded module file outside the standard library."""
    import sysconfig

    stdlib = sysconfig.get_paths()["stdlib"]
    stamps = {}
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if path and not path.startswith(stdlib):
            stamps[path] = stamp(path)
    return stamps


class Worker:
    """Serve CGI requests handed over by entries, for one app file, until idle or stale."""

    def __init__(self, app_file, path):
        self.app_file = os.path.abspath(app_file)
        self.path = path
        self.app = None
        self.started = request_stamps(self.app_file)
        self.modules = {}
        self.stale = False
        self.served = 0

    def load(self):
        import importlib.util

        from tinyweb.app import App

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
        self.modules = _module_stamps()

    def current(self, stamps):
        """Tell whether the entry's app and config, and our modules, are what we loaded."""
        if stamps.get("app") != self.started["app"] or stamps.get("config") != self.started["config"]:
            return False
        return all(stamp(path) == old for path, old in self.modules.items())

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
            if header.get("app") != self.app_file or self.stale or not self.current(header.get("stamps", {})):
                self.stale = True
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
            body = _BodyReader(rfile)
            CGIGateway(body, wfile, sys.stderr, environ).run(self.app)
            wfile.flush()
            body.drain()
            self.tasks.submit(tasks)
        finally:
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
        import fcntl
        import socket
        import threading
        import time

        from tinyweb.deferred import TaskPool

        self.tasks = TaskPool(stream=sys.stderr)
        lock = open(self.path + ".lock", "a")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return 0  # another worker for this app is starting or running
        self.load()
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
        inode = os.stat(self.path).st_ino
        with open(self.path + ".pid", "w") as f:
            f.write("%d\n" % os.getpid())
        listener.listen(64)
        listener.settimeout(1.0)
        slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        last = time.monotonic()
        try:
            while not self.stale and self.served < MAX_REQUESTS and time.monotonic() - last < IDLE_SECONDS:
                try:
                    conn, _ = listener.accept()
                except socket.timeout:
                    continue
                last = time.monotonic()
                conn.settimeout(300.0)
                slots.acquire()

                def run(conn=conn):
                    try:
                        self.handle(conn)
                    except Exception:
                        import traceback

                        sys.stderr.write("tinyweb: CGI worker request failed\n%s" % traceback.format_exc())
                    finally:
                        slots.release()

                threading.Thread(target=run, daemon=True).start()
        finally:
            # Stop taking requests first, so entries fall back to cold at once.
            try:
                if os.stat(self.path).st_ino == inode:  # not a successor's socket
                    os.unlink(self.path)
                    os.unlink(self.path + ".pid")
            except OSError:
                pass
            listener.close()
            for _ in range(MAX_CONNECTIONS):
                slots.acquire(timeout=30)
            self.tasks.drain(10.0)
        return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        sys.stderr.write("usage: python -m tinyweb.runners.persistent APP_FILE SOCKET\n")
        return 2
    return Worker(argv[0], argv[1]).serve()


if __name__ == "__main__":
    sys.exit(main())
