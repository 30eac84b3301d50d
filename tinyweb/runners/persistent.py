"""Persistent CGI: hand a CGI request to a warm worker of the same app over a private socket.

A CGI request pays for a fresh interpreter and every import on each request. With
``cgi_worker = on`` in tinyweb.ini, the CGI process (the "entry") only connects to a worker
process that has the app loaded, passes it the environment and the body, and copies the
response back, the shape SpeedyCGI gave Perl. The entry imports nothing heavy: a warm
request costs little more than starting Python.

Safety, each with its guard:
- the socket is private: it lives in a directory owned by the user the app runs as, mode
  0700 (checked, not assumed), and the worker serves only the app file it loaded;
- no stale code: each request carries the app file's and tinyweb.ini's stat, its TINYWEB_*
  settings and its interpreter and sys.path; the worker also checks every non-stdlib
  module it has loaded; on any difference it answers "stale" and exits, and the entry
  serves the request itself (cold) and starts a fresh worker;
- a cold fallback: no socket, no worker, a refused connection or a stale answer, and the
  entry serves the request the ordinary CGI way. Once the request has been sent, a
  worker that dies gives a 502, never a second run of the request.

The worker (cgi_worker.py) runs one request at a time on its main thread, as `python
app.py` would (module state such as an sqlite3 connection is bound to its thread); an
entry that finds it busy is told so at once and serves cold. It logs to the error log it inherited (under mod_cgid) or to
``data/worker.log``, and exits after IDLE_SECONDS without a request;
``TINYWEB_CGI_WORKER_IDLE`` (seconds, read by the worker when it starts) overrides that.
"""

import marshal
import os
import sys

__all__ = ["handoff", "socket_path", "spawn_worker", "let_go_of_stdout"]

MAGIC = b"TWP1"
ANSWER_RESPONSE = b"R"
ANSWER_STALE = b"S"
ANSWER_BUSY = b"B"
GO = b"G"
IDLE_SECONDS = 300.0  # a worker with no request for this long exits
MAX_REQUESTS = 10000  # then exits too, bounding whatever the app leaks
CHUNK = 65536
# The entry's deadlines: to connect and send the request, for the worker's answer (at
# once: a request to run, stale, or busy, which all but the first mean a cold request), and for the
# worker's silence once it owns the request (Apache's own default Timeout).
CONNECT_SECONDS = 2.0
ANSWER_SECONDS = 5.0
SILENT_SECONDS = 60.0
# A new worker waits this long for the one it replaces to let go of the socket.
TAKEOVER_SECONDS = 5.0


def runtime_dir(create=False):
    """Return the private directory for this user's worker sockets, or None if unsafe.

    Only a worker being started creates it: with no worker, a CGI request leaves no trace.
    """
    base = os.environ.get("TINYWEB_RUNTIME_DIR") or "/tmp/tinyweb-%d" % os.getuid()
    try:
        if create:
            try:
                os.mkdir(base, 0o700)
            except FileExistsError:
                pass
        st = os.lstat(base)
    except OSError:
        return None
    # Another local user could have made it first (or a symlink): then it is not ours to use.
    if not (st.st_uid == os.getuid() and (st.st_mode & 0o777) == 0o700 and (st.st_mode & 0o170000) == 0o040000):
        return None
    return base


def socket_path(app_file, create=False):
    """Return the worker socket path for ``app_file`` (the worker checks it is that app)."""
    base = runtime_dir(create)
    if base is None:
        return None
    import zlib

    path = os.path.join(base, "%08x.sock" % zlib.crc32(os.path.abspath(app_file).encode("utf-8", "surrogateescape")))
    # sun_path holds 108 bytes (unix(7)): a worker could never bind a longer one.
    return path if len(os.fsencode(path)) < 108 else None


def stamp(path):
    """Return what changes when the file at ``path`` does, or None if there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    # ctime too: a copy that keeps the mtime (cp -p, tar, rsync -t) still moves it.
    return (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)


def request_stamps(app_file, environ):
    """What must be the same for the worker's code and settings to be this request's."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(app_file)))
    config = environ.get("TINYWEB_CONFIG") or os.path.join(root, "tinyweb.ini")
    return {
        "app": stamp(app_file),
        "config": (config, stamp(config)),
        # TINYWEB_CONFIG, TINYWEB_DEBUG, ...: a request from a server with other settings
        # for the same app file is not this worker's to serve.
        "settings": sorted((k, v) for k, v in environ.items() if k.startswith("TINYWEB_")),
    }


def python_stamp():
    """The interpreter and import path, which decide what code ``import`` finds."""
    return [sys.executable] + sys.path


# --- the entry: the CGI process ------------------------------------------------------------


def _send_all(sock, data):
    view = memoryview(data)
    while view:
        sent = sock.send(view)
        view = view[sent:]


def handoff(app_file):
    """Serve this CGI request through a warm worker; return False if none took it.

    False means nothing was written to stdout and nothing read from stdin: the caller
    serves the request itself.
    """
    path = socket_path(app_file)
    if path is None:
        return False
    try:
        os.stat(path)
    except OSError:
        return False  # no worker: the cold request pays for nothing more
    import _socket

    env = dict(os.environ)
    stamps = dict(request_stamps(app_file, env), python=python_stamp())
    header = marshal.dumps({"app": os.path.abspath(app_file), "env": env, "stamps": stamps})
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(CONNECT_SECONDS)
        sock.connect(path)
        _send_all(sock, MAGIC + len(header).to_bytes(4, "big") + header)
        # The worker answers once it has a free slot; until we say "go" it runs nothing,
        # so giving up here (busy, stale, gone) and serving cold never runs the request
        # twice. A "go" that could not be sent never reached the worker.
        sock.settimeout(ANSWER_SECONDS)
        if sock.recv(1) != ANSWER_RESPONSE:
            sock.close()
            return False
        _send_all(sock, GO)
    except OSError:
        sock.close()
        return False

    # Now the worker owns the request: whatever happens, this process answers it and never
    # falls back to running it.
    out = sys.stdout.buffer
    got_any, left, why = _relay(sock, out, env)
    sock.close()
    if not got_any:
        try:
            out.write(b"Status: 502 Bad Gateway\r\nContent-Type: text/plain\r\n\r\n"
                      b"The app's worker stopped before answering.\n")
            out.flush()
        except OSError:
            let_go_of_stdout()
    if why:
        sys.stderr.write("tinyweb: the CGI worker for %s %s\n" % (app_file, why))
    if left:
        _drain_stdin(left)
    return True


def _relay(sock, out, env):
    """Copy the body from stdin to the worker and its response to ``out``.

    Never blocks on one side while the other is full (no deadlock on big bodies). Return
    (whether any response came, body bytes left unread (-1: to EOF), what went wrong).
    """
    import select

    sock.setblocking(False)
    out.flush()
    length = env.get("CONTENT_LENGTH", "")
    if length.isascii() and length.isdigit():
        left = int(length)
    else:
        left = -1 if env.get("REQUEST_METHOD", "GET").upper() in ("POST", "PUT", "PATCH") else 0
    pending = b""
    body_done = False  # the empty chunk that ends the body has been queued
    got_any = False
    while True:
        if not pending and not body_done and left == 0:
            pending, body_done = b"\0\0\0\0", True  # the worker reads the body to this mark
        want_read = [sock] if pending or body_done else [sock, 0]
        readable, writable, _ = select.select(want_read, [sock] if pending else [], [], SILENT_SECONDS)
        if not readable and not writable:
            return got_any, left, "sent nothing for %d s; gave up on the response" % SILENT_SECONDS
        if 0 in readable:
            try:
                data = os.read(0, CHUNK if left < 0 else min(CHUNK, left))
            except OSError:
                data = b""
            if not data:
                left = 0  # EOF before Content-Length: the worker sees a short body
            else:
                if left > 0:
                    left -= len(data)
                pending = len(data).to_bytes(4, "big") + data
        if pending and sock in writable:
            try:
                pending = pending[sock.send(pending):]
            except BlockingIOError:
                pass
            except OSError:
                pending, body_done = b"", True  # the worker stopped reading: it has what it needs
        if sock in readable:
            try:
                data = sock.recv(CHUNK)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                why = None if got_any else "closed the connection without a response"
                return got_any, left, why
            got_any = True
            try:
                out.write(data)
                out.flush()
            except OSError:
                let_go_of_stdout()
                return True, left, None  # the client went away: nobody to answer


# Here rather than in cgi.py, which uses it too: every CGI request imports this module first
# (handoff), and only a cold one imports cgi.py and its wsgiref.
def let_go_of_stdout():
    """Point fd 1 at /dev/null, for the web server has stopped reading it (its client went).

    What sys.stdout still buffers would fail again when Python flushes it at exit: "Exception
    ignored ... BrokenPipeError" in the error log, and exit status 120 (the recipe is in the
    signal module's documentation, "Note on SIGPIPE").
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)
    except OSError:
        pass


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
        try:
            data = os.read(0, min(CHUNK, left))
        except OSError:
            return
        if not data:
            return
        left -= len(data)


# Run the worker as `python app.py` runs the app: the app's folder first on sys.path, where
# `python -m` or `-c` would put the working directory (a module beside app.py must import,
# and the same tinyweb must load as in the entry).
_BOOTSTRAP = ("import sys; sys.path[0] = sys.argv[1]; "
              "from tinyweb.runners.cgi_worker import main; sys.exit(main(sys.argv[2:]))")


def spawn_worker(app_file, log_fd=None):
    """Start a worker for ``app_file`` detached from this CGI process; return at once.

    The worker's stderr is ``log_fd`` if given (closed here), else this process's fd 2 when
    that is a file (mod_cgid's error log), else /dev/null.
    """
    path = socket_path(app_file, create=True)
    if path is None:
        if log_fd is not None:
            os.close(log_fd)
        return
    from tinyweb.runners.detach import detach, error_log_fd

    if not detach(error_log_fd() if log_fd is None else log_fd, "the CGI worker"):
        return
    try:
        env = {k: v for k, v in os.environ.items()
               if k.startswith("TINYWEB_") or k in ("PATH", "LANG", "LC_ALL", "PYTHONPATH", "HOME")}
        app_dir = os.path.dirname(os.path.realpath(app_file))
        os.execve(sys.executable, [sys.executable, "-c", _BOOTSTRAP, app_dir, app_file, path], env)
    finally:
        os._exit(127)
