"""Parse the gateway options from command-line flags and TINYWEB_* environment variables.

Every CGI request imports this module to choose its gateway, so it imports nothing at the
top: argparse, re and dataclasses would cost a CGI request ~50 ms (bench/README.md), and a
CGI request never parses a command line.
"""

MODES = ("cgi", "modpython", "fcgi", "dev")


class UsageError(ValueError):
    """A flag or environment variable has a value tinyweb cannot use."""


class Options:
    """How to serve: the mode and its settings.

    ``bind`` is a unix socket path, or a (host, port) / (host, port, 0, 0) address for
    socket.bind. ``announce`` is true when the mode was not asked for but fell back to
    "dev": the dev gateway says so.
    """

    _DEFAULTS = dict(mode=None, bind=None, workers=None, threads=None, max_requests=0, umask=None,
                     socket_group=None, socket_mode=None, host="127.0.0.1", port=8000,
                     reload=False, announce=False)

    def __init__(self, **settings):
        unknown = set(settings) - set(self._DEFAULTS)
        if unknown:
            raise TypeError("unknown option(s): %s" % ", ".join(sorted(unknown)))
        self.__dict__.update(self._DEFAULTS, **settings)

    def __eq__(self, other):
        return isinstance(other, Options) and vars(self) == vars(other)

    def __repr__(self):
        return "Options(%s)" % ", ".join("%s=%r" % kv for kv in vars(self).items())


# HOST:PORT or [IPV6]:PORT; and what was meant as one, not as a file name: no "/", and a
# ":" or "[". Compiled on first use (see the module docstring).
_TCP_PATTERN = r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^/\[\]:]*)):(?P<port>\d{1,5})$"
_LOOKS_TCP_PATTERN = r"^(?:\[|[^/]*:)[^/]*$"


def parse_address(text):
    """Turn ``PATH``, ``unix:PATH``, ``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` into an address."""
    import re

    if text.startswith("unix:"):
        path = text[len("unix:"):]
        if not path:
            raise UsageError("--bind unix: needs a socket path, e.g. unix:/run/app.sock")
        return path
    match = re.match(_TCP_PATTERN, text)
    if match is None:
        if not text:
            raise UsageError("--bind needs an address: PATH, unix:PATH, HOST:PORT or :PORT")
        if re.match(_LOOKS_TCP_PATTERN, text):
            # Taken as a path, "localhost:http" or "[::1]" would quietly become a socket file.
            raise UsageError("--bind %s: write HOST:PORT, [IPV6]:PORT or :PORT with a port number, "
                             "or unix:%s for a socket file of that name" % (text, text))
        return text
    port = int(match.group("port"))
    if not 0 < port < 65536:
        raise UsageError("--bind %s: port must be 1-65535" % text)
    if match.group("v6") is not None:
        return (match.group("v6"), port, 0, 0)
    return (match.group("host") or "127.0.0.1", port)


def _octal(text):
    try:
        return int(text, 8)
    except ValueError:
        import argparse

        raise argparse.ArgumentTypeError("%r is not an octal number such as 0660" % text)


def _positive(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        import argparse

        raise argparse.ArgumentTypeError("%r is not a whole number of at least 1" % text)
    return value


def _count(text):
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        import argparse

        raise argparse.ArgumentTypeError("%r is not a whole number of at least 0" % text)
    return value


def _port(text):
    value = _positive(text)
    if value > 65535:
        import argparse

        raise argparse.ArgumentTypeError("%r is not a port number (1-65535)" % text)
    return value


# flag, environment variable, argparse keyword arguments
_FLAGS = [
    ("--mode", "TINYWEB_MODE", dict(choices=MODES, help="gateway to serve through")),
    ("--bind", "TINYWEB_BIND",
     dict(help="fcgi: PATH or unix:PATH, HOST:PORT, [IPV6]:PORT or :PORT (127.0.0.1); "
               "default: the listening socket on stdin")),
    ("--workers", "TINYWEB_WORKERS", dict(type=_positive, help="fcgi: N single-threaded processes")),
    ("--threads", "TINYWEB_THREADS", dict(type=_positive, help="fcgi: one process with N threads")),
    ("--max-requests", "TINYWEB_MAX_REQUESTS",
     dict(type=_count, help="fcgi: recycle a worker after N requests (0: never)")),
    ("--umask", "TINYWEB_UMASK", dict(type=_octal, help="fcgi: umask for the process (octal)")),
    ("--socket-group", "TINYWEB_SOCKET_GROUP",
     dict(help="fcgi: group that owns the unix socket (the web server's)")),
    ("--socket-mode", "TINYWEB_SOCKET_MODE",
     dict(type=_octal, help="fcgi: permissions of the unix socket (octal, e.g. 0660)")),
    ("--host", "TINYWEB_HOST", dict(help="dev: address to listen on (default 127.0.0.1)")),
    ("--port", "TINYWEB_PORT", dict(type=_port, help="dev: port (default 8000)")),
]


def build_parser(prog=None):
    import argparse

    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve this tinyweb app. Without --mode the gateway is detected: "
        "mod_python, a FastCGI socket on stdin, a CGI request, else the dev server.",
    )
    for flag, env, kwargs in _FLAGS:
        kwargs = dict(kwargs)
        kwargs["help"] = "%s [env %s]" % (kwargs["help"], env)
        parser.add_argument(flag, **kwargs)
    parser.add_argument("--reload", action="store_true", help="dev: restart when a source file changes")
    return parser


def parse_options(argv, environ, prog=None):
    """Return Options from ``argv`` and ``environ``; a flag beats its environment variable."""
    args = _plain_args(argv, environ)
    if args is None:
        args = _argparse_args(argv, environ, prog)
    if args["workers"] is not None and args["threads"] is not None:
        # A UsageError, not parser.error(): either may come from the environment.
        raise UsageError("--workers and --threads (TINYWEB_WORKERS, TINYWEB_THREADS) exclude each "
                         "other: choose one process model")
    options = Options(
        mode=args["mode"],
        bind=parse_address(args["bind"]) if args["bind"] is not None else None,
        workers=args["workers"],
        threads=args["threads"],
        max_requests=args["max_requests"] or 0,
        umask=args["umask"],
        socket_group=args["socket_group"],
        socket_mode=args["socket_mode"],
        host=args["host"] or "127.0.0.1",
        port=args["port"] or 8000,
        reload=args["reload"],
    )
    if options.bind is not None and options.mode is None:
        options.mode = "fcgi"
    return options


def _argparse_args(argv, environ, prog):
    """Parse with argparse: every form of the command line it knows, --help, and the errors."""
    import argparse

    parser = build_parser(prog)
    # Environment values go through the same parser, so they are checked the same way.
    env_argv = []
    for flag, env, _ in _FLAGS:
        value = environ.get(env)
        if value:
            env_argv.append("%s=%s" % (flag, value))

    class _Raising(argparse.ArgumentParser):
        def error(self, message):
            raise UsageError("environment: " + message)

    env_parser = build_parser(prog)
    env_parser.__class__ = _Raising
    defaults = vars(env_parser.parse_args(env_argv))
    parser.set_defaults(**{k: v for k, v in defaults.items() if v is not None})
    return vars(parser.parse_args(argv))


def _plain_args(argv, environ):
    """Read what argparse would from ``--flag value`` and ``--flag=value`` alone, else None.

    A FastCGI worker is forked from the process that read its options, and argparse with
    gettext is ~600 KiB of RSS in it for good (bench/README.md): the usual command line, or
    none under mod_fcgid, is read here without them. Anything else (--help, an abbreviated
    or unknown flag, a value argparse would refuse or might read otherwise) goes to argparse,
    so its messages and exit status stay the ones users get; tests/test_modes.py checks that
    both read the same.
    """
    specs = {flag: kwargs for flag, _, kwargs in _FLAGS}
    args = {flag[2:].replace("-", "_"): None for flag in specs}
    args["reload"] = False

    def take(flag, text):
        kwargs = specs[flag]
        if not text or text.startswith("-"):
            return False  # argparse's reading of an empty or dash-led value is its own
        try:
            value = kwargs.get("type", str)(text)
        except Exception:  # noqa: BLE001 - argparse says what is wrong with it
            return False
        if value not in kwargs.get("choices", (value,)):
            return False
        args[flag[2:].replace("-", "_")] = value
        return True

    for flag, env, _ in _FLAGS:
        if environ.get(env) and not take(flag, environ[env]):
            return None
    words = list(argv)
    while words:
        word = words.pop(0)
        if word == "--reload":
            args["reload"] = True
            continue
        flag, equals, text = word.partition("=")
        if flag not in specs:
            return None
        if not equals:
            if not words:
                return None
            text = words.pop(0)
        if not take(flag, text):
            return None
    return args
