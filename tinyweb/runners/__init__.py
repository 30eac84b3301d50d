"""Choose the gateway that serves an app, from flags, the environment and what is on fd 0.

Each gateway is a module in this package with ``serve(app, options) -> int``; it turns its
world into a WSGI environ (with ``tinyweb.mode`` set) and back, and knows nothing of routes.
"""

import os
import sys

from tinyweb.runners.options import MODES, Options, UsageError, parse_options

__all__ = ["run", "choose_mode", "Options", "UsageError", "MODES"]


def _under_modpython(environ):
    # mod_python's cgihandler swaps in its own stdout object for the request (apache.py
    # CGIStdout) and sets GATEWAY_INTERFACE to "Python-CGI/1.1" (apache.build_cgi_env).
    return type(sys.stdout).__name__ == "CGIStdout" or environ.get(
        "GATEWAY_INTERFACE", ""
    ).startswith("Python-CGI")


def _in_cgi_request(environ):
    return "GATEWAY_INTERFACE" in environ and "REQUEST_METHOD" in environ


def _stdin_is_listening_socket():
    """Tell whether fd 0 is a listening socket, as mod_fcgid and spawn-fcgi hand us.

    Testing only "fd 0 is a socket" is wrong: under mod_cgid fd 0 is a *connected* unix
    socket carrying the CGI request, which is why flup's own check misfires there.
    """
    import socket

    try:
        sock = socket.socket(fileno=os.dup(0))
    except OSError:
        return False
    try:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    except OSError:
        return False
    finally:
        sock.close()


def choose_mode(argv, environ, is_main):
    """Return the Options to serve with, or None when the app is only being imported.

    A CGI request in the environment means the command line is never read: Apache puts
    the words of a query without "=" on argv (ISINDEX), so ``/app.py?--mode+fcgi`` must
    not steer the gateway (see php-cgi CVE-2012-1823).
    """
    env_mode = environ.get("TINYWEB_MODE") or None
    if env_mode is not None and env_mode not in MODES:
        # Checked here too: under CGI the value never goes through the option parser.
        raise UsageError("environment: TINYWEB_MODE=%r is not one of %s" % (env_mode, ", ".join(MODES)))
    if _under_modpython(environ):
        return Options(mode=env_mode or "modpython")
    if _in_cgi_request(environ):
        return Options(mode=env_mode or "cgi")
    if not is_main:
        return None
    options = parse_options(argv, environ)
    if options.mode is None:
        if options.bind is not None or _stdin_is_listening_socket():
            options.mode = "fcgi"
        else:
            options.mode = "dev"
            options.announce = True
    return options


def run(app, argv=None, environ=None, is_main=True):
    """Serve ``app`` through the gateway chosen for this process; return an exit status."""
    environ = os.environ if environ is None else environ
    argv = sys.argv[1:] if argv is None else argv
    try:
        options = choose_mode(argv, environ, is_main)
    except UsageError as exc:
        sys.stderr.write("tinyweb: %s\n" % exc)
        return 2
    if options is None:
        return 0
    app_file = getattr(app, "app_file", None)
    if options.mode == "cgi" and app_file:
        # A warm worker of this app (cgi_worker = on) answers before anything heavy loads.
        from tinyweb.runners.persistent import handoff

        if handoff(app_file):
            return 0
    return gateway(options.mode).serve(app, options)


def import_request_modules():
    """Import what serving a request imports, by one request through a throwaway app.

    For processes that serve many requests: a FastCGI supervisor before it forks (the
    workers then share these pages), mod_python's preload. Whatever the request path comes
    to import, this imports too.
    """
    from wsgiref.util import setup_testing_defaults

    from tinyweb.app import App

    app = App("tinyweb.runners.import_request_modules", secret="-" * 32)

    @app.get("/")
    def index(request):
        return {"warm": True}

    environ = {"HTTP_ACCEPT_ENCODING": "gzip", "tinyweb.after_response": []}
    setup_testing_defaults(environ)
    for _ in app(environ, lambda status, headers, exc_info=None: None):
        pass


def gateway(mode):
    """Return the module that serves ``mode``."""
    # __import__ rather than importlib.import_module: importlib's package is one more
    # import on every CGI request.
    name = "tinyweb.runners." + mode
    __import__(name)
    return sys.modules[name]
