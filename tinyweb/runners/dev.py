"""Serve an app on a local HTTP port for development: wsgiref, one thread per request."""

import errno
import os
import signal
import socket
import sys
import threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

__all__ = ["serve", "DevServer", "Reloader"]

POLL_SECONDS = 1.0
# The reloader stats at most this many files per poll, so a huge tree stays cheap.
MAX_WATCHED = 5000


class DevServer(ThreadingMixIn, WSGIServer):
    """wsgiref's server with a thread per request, so a streamed response blocks no other."""

    daemon_threads = True  # a stop or a reload does not wait for a slow stream to end

    def __init__(self, address, handler=WSGIRequestHandler):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)

    def setup_environ(self):
        super().setup_environ()
        # Copied into every request's environ by WSGIRequestHandler.get_environ.
        self.base_environ["tinyweb.mode"] = "dev"

    def handle_error(self, request, client_address):
        # A client that goes away mid-response is normal, not an error worth a traceback.
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return
        super().handle_error(request, client_address)


class _RequestHandler(WSGIRequestHandler):
    def log_message(self, format, *args):
        # One line per request on stderr, as BaseHTTPRequestHandler does, with our prefix.
        sys.stderr.write("tinyweb: %s %s\n" % (self.address_string(), format % args))


class _Stop(Exception):
    """SIGTERM arrived: leave serve_forever as Ctrl-C does."""


def _url(host, port):
    shown = "[%s]" % host if ":" in host else host
    return "http://%s:%d/" % (shown, port)


def _say(text):
    sys.stderr.write("tinyweb: %s\n" % text)
    sys.stderr.flush()


def serve(app, options):
    """Serve ``app`` on options.host:options.port until Ctrl-C or SIGTERM; return 0, or 1."""
    host, port = options.host, options.port
    try:
        server = DevServer((host, port), _RequestHandler)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            _say("cannot start the dev server: port %d on %s is in use (another server "
                 "running?); stop it or choose another --port" % (port, host))
        elif exc.errno in (errno.EACCES, errno.EPERM):
            _say("cannot start the dev server: no permission to listen on port %d; "
                 "choose a --port above 1023" % port)
        else:
            _say("cannot start the dev server on %s:%d: %s; check --host and --port"
                 % (host, port, exc.strerror or exc))
        return 1
    server.set_app(app)
    url = _url(host, port)
    if options.announce:
        _say("no CGI request, FastCGI socket or mod_python found: dev server on %s "
             "(--mode to choose)" % url)
    else:
        _say("dev server on %s (Ctrl-C to stop)" % url)

    reloader = Reloader(app, server) if options.reload else None
    previous = _on_sigterm()
    try:
        if reloader is not None:
            reloader.start()
        server.serve_forever()
    except (KeyboardInterrupt, _Stop):
        _say("dev server stopped")
        return 0
    finally:
        if reloader is not None:
            reloader.stop()
        server.server_close()
        _restore_sigterm(previous)
    if reloader is not None and reloader.changed:
        reloader.restart()  # does not return
    return 0


def _on_sigterm():
    if threading.current_thread() is not threading.main_thread():
        return None  # signal handlers can only be set from the main thread

    def stop(signum, frame):
        raise _Stop()

    return signal.signal(signal.SIGTERM, stop)


def _restore_sigterm(previous):
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


class Reloader:
    """Restart the process when the app file or a module it loaded from its tree changes.

    A thread polls modification times once a second and, on a change, stops the server;
    ``serve`` then re-executes the same interpreter with the same arguments. A changed file
    that no longer compiles is reported and the old code keeps serving until it is fixed.
    """

    def __init__(self, app, server, interval=POLL_SECONDS):
        self.server = server
        self.interval = interval
        self.changed = None
        self._stopping = threading.Event()
        self._thread = None
        # Where the restart runs from: a relative script path in argv must still resolve.
        self._cwd = os.getcwd()
        self._roots = self._find_roots(app)
        self._mtimes = {}

    @staticmethod
    def _find_roots(app):
        import tinyweb

        roots = [os.path.dirname(os.path.abspath(tinyweb.__file__)) + os.sep]
        app_file = getattr(app, "app_file", None)
        if app_file:
            from tinyweb.config import app_root

            roots.append(str(app_root(app_file)) + os.sep)
        return roots

    def _watched(self):
        """Yield the files to watch: the app's, and loaded modules' under its root or tinyweb."""
        seen = 0
        main = sys.modules.get("__main__")
        extra = [getattr(main, "__file__", None)]
        for root in self._roots[1:]:
            extra.append(os.path.join(root, "tinyweb.ini"))
        for path in extra:
            if path:
                seen += 1
                yield os.path.abspath(path)
        for module in list(sys.modules.values()):
            path = getattr(module, "__file__", None)
            if not path:
                continue
            path = os.path.abspath(path)
            # Installed libraries under the app's root (a venv inside it) never change.
            if not path.startswith(tuple(self._roots)) or _in_site_packages(path, self._roots[0]):
                continue
            seen += 1
            if seen > MAX_WATCHED:
                return
            yield path

    def check(self):
        """Return a changed file that still compiles, or None; remember what was seen."""
        for path in self._watched():
            try:
                mtime = os.stat(path).st_mtime_ns
            except OSError:
                mtime = None
            old = self._mtimes.setdefault(path, mtime)
            if old == mtime:
                continue
            self._mtimes[path] = mtime
            if mtime is None:
                continue  # deleted, or moved away by an editor saving: wait for it
            if path.endswith(".py") and not _compiles(path):
                continue
            return path
        return None

    def start(self):
        self.check()  # the baseline
        self._thread = threading.Thread(target=self._run, name="tinyweb-reloader", daemon=True)
        self._thread.start()

    def stop(self):
        self._stopping.set()

    def _run(self):
        while not self._stopping.wait(self.interval):
            changed = self.check()
            if changed:
                self.changed = changed
                _say("%s changed: restarting" % changed)
                self.server.shutdown()
                return

    def restart(self):
        """Replace this process with a fresh run of the same command line."""
        argv = list(getattr(sys, "orig_argv", None) or [sys.executable] + sys.argv)
        argv[0] = sys.executable
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.chdir(self._cwd)
        os.execv(sys.executable, argv)


def _in_site_packages(path, tinyweb_root):
    if path.startswith(tinyweb_root):
        return False
    parts = path.split(os.sep)
    return "site-packages" in parts or "dist-packages" in parts


def _compiles(path):
    try:
        with open(path, "rb") as f:
            source = f.read()
        compile(source, path, "exec", dont_inherit=True)
        return True
    except (SyntaxError, ValueError) as exc:
        line = getattr(exc, "lineno", None)
        _say("%s%s does not compile (%s): fix it and save again; still serving the old code"
             % (path, ":%d" % line if line else "", getattr(exc, "msg", exc)))
        return False
    except OSError:
        return False
