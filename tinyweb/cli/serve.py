"""``tinyweb serve [APP]``: run an app file in the dev server, as ``python APP`` would."""

import os
import sys

__all__ = ["add_parser", "run", "find_app"]

# The places `tinyweb serve` looks for an app when none is named, in order.
DEFAULT_APPS = (os.path.join("htdocs", "app.py"), "app.py")


def add_parser(commands):
    parser = commands.add_parser(
        "serve",
        help="run an app in the dev server",
        description="Run APP in the dev server on http://127.0.0.1:8000/. APP is an app file, "
        "or a folder holding htdocs/app.py or app.py; default: ./htdocs/app.py, else ./app.py.",
    )
    parser.add_argument("app", nargs="?", metavar="APP", help="the app file (or its folder)")
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (default 8000)")
    parser.add_argument("--reload", action="store_true",
                        help="restart when the app or a module it loaded from its folder changes")
    parser.set_defaults(run=run)
    return parser


def find_app(name=None):
    """Return the app file for ``name`` (a file or a folder; None: the current folder), or None."""
    if name is not None and not os.path.isdir(name):
        return name if os.path.isfile(name) else None
    for candidate in DEFAULT_APPS:
        path = os.path.join(name or os.curdir, candidate)
        if os.path.isfile(path):
            return path
    return None


def run(args, exec_=None):
    """Replace this process with ``python APP --mode dev ...``; return 1 if there is no APP."""
    app = find_app(args.app)
    if app is None:
        where = args.app or os.getcwd()
        if args.app and not os.path.isdir(args.app):
            sys.stderr.write("tinyweb: no app file %s: name an existing app.py\n" % args.app)
        else:
            sys.stderr.write(
                "tinyweb: no app to serve in %s: neither htdocs/app.py nor app.py is there; "
                "name one (tinyweb serve path/to/app.py) or make one (tinyweb new DIR)\n" % where
            )
        return 1
    if args.port is not None and not 0 < args.port < 65536:
        sys.stderr.write("tinyweb: --port %d is not a port number (1-65535)\n" % args.port)
        return 2
    # The app runs as __main__ exactly as `python app.py` would run it, under this
    # interpreter (the one tinyweb is installed in). Flags not given are left to the
    # app's own defaults and TINYWEB_HOST / TINYWEB_PORT.
    argv = [sys.executable, app, "--mode", "dev"]
    if args.host is not None:
        argv += ["--host", args.host]
    if args.port is not None:
        argv += ["--port", str(args.port)]
    if args.reload:
        argv.append("--reload")
    sys.stdout.flush()
    sys.stderr.flush()
    (exec_ or os.execv)(sys.executable, argv)
    return 0  # only reached when exec_ is a stand-in (tests)
