"""Choosing the gateway: flags, TINYWEB_* variables, detection, and --bind addresses."""

import os
import random
import socket
import subprocess
import sys
import types

import pytest

import tinyweb.runners
from helpers import CHECKOUT
from tinyweb.runners import UsageError, choose_mode, run
from tinyweb.runners.options import parse_address, parse_options

CGI = {"GATEWAY_INTERFACE": "CGI/1.1", "REQUEST_METHOD": "GET", "SCRIPT_NAME": "/app.py"}


@pytest.fixture(autouse=True)
def no_socket_on_stdin(monkeypatch):
    """Make detection independent of what fd 0 is while pytest runs."""
    monkeypatch.setattr(tinyweb.runners, "_stdin_is_listening_socket", lambda: False)


@pytest.fixture
def gateways(monkeypatch):
    """Record which gateway run() would start, instead of starting it."""
    started = []

    def gateway(mode):
        name = "tinyweb.runners." + mode
        return types.SimpleNamespace(serve=lambda app, options: started.append((name, options)) or 0)

    monkeypatch.setattr("tinyweb.runners.gateway", gateway)
    return started


# -- flags and environment ---------------------------------------------------------------


@pytest.mark.parametrize("argv, environ, mode", [
    (["--mode", "cgi"], {}, "cgi"),
    (["--mode", "dev"], {"TINYWEB_MODE": "fcgi"}, "dev"),
    (["--mode=fcgi"], {"TINYWEB_MODE": "dev"}, "fcgi"),
    ([], {"TINYWEB_MODE": "fcgi"}, "fcgi"),
    ([], {"TINYWEB_MODE": "modpython"}, "modpython"),
    (["--bind", "/tmp/app.sock"], {}, "fcgi"),
    ([], {"TINYWEB_BIND": ":9000"}, "fcgi"),
    ([], {}, "dev"),
])
def test_mode_from_flags_and_environment(argv, environ, mode):
    assert choose_mode(argv, environ, is_main=True).mode == mode


def test_flags_beat_the_environment():
    options = parse_options(["--port", "8001", "--workers", "3", "--bind", "unix:/run/a.sock"],
                            {"TINYWEB_PORT": "9000", "TINYWEB_WORKERS": "8", "TINYWEB_BIND": ":9000",
                             "TINYWEB_MAX_REQUESTS": "500", "TINYWEB_SOCKET_MODE": "0660"})
    assert (options.port, options.workers, options.bind) == (8001, 3, "/run/a.sock")
    assert (options.max_requests, options.socket_mode) == (500, 0o660)


def test_dev_fallback_is_announced():
    options = choose_mode([], {}, is_main=True)
    assert (options.mode, options.announce) == ("dev", True)
    assert (options.host, options.port) == ("127.0.0.1", 8000)
    assert choose_mode(["--mode", "dev"], {}, is_main=True).announce is False


@pytest.mark.parametrize("argv", [
    ["--mode", "dev"], ["--mode=fcgi"], ["--bind", ":9000"], ["--help"], ["-c", "import os"], ["--bogus"],
])
def test_a_cgi_request_never_reads_argv(argv):
    # Apache puts the words of "/app.py?--mode+dev" on argv (ISINDEX); they must not count.
    assert choose_mode(argv, dict(CGI), is_main=True).mode == "cgi"
    assert choose_mode(argv, dict(CGI), is_main=False).mode == "cgi"


def test_a_cgi_request_takes_the_mode_from_the_environment_only():
    environ = dict(CGI, TINYWEB_MODE="fcgi", TINYWEB_BIND=":1")
    options = choose_mode(["--mode", "dev"], environ, is_main=True)
    assert (options.mode, options.bind) == ("fcgi", None)


def test_modpython_is_detected(monkeypatch):
    environ = {"GATEWAY_INTERFACE": "Python-CGI/1.1", "REQUEST_METHOD": "GET"}
    assert choose_mode(["--mode", "dev"], environ, is_main=False).mode == "modpython"

    class CGIStdout:  # the class mod_python's cgihandler puts in sys.stdout
        def write(self, text):
            pass

    monkeypatch.setattr(sys, "stdout", CGIStdout())
    assert choose_mode([], {}, is_main=False).mode == "modpython"


def test_imported_without_a_request_is_none():
    assert choose_mode(["--mode", "dev"], {"TINYWEB_MODE": "fcgi"}, is_main=False) is None


def test_run_does_nothing_when_imported(gateways):
    assert run(object(), argv=["--mode", "dev"], environ={"TINYWEB_MODE": "fcgi"}, is_main=False) == 0
    assert gateways == []


def test_run_starts_the_chosen_gateway(gateways):
    app = object()
    assert run(app, argv=["--mode", "fcgi"], environ=dict(CGI), is_main=True) == 0
    assert run(app, argv=["--port", "8123"], environ={}, is_main=True) == 0
    assert [(name, options.mode) for name, options in gateways] == [
        ("tinyweb.runners.cgi", "cgi"), ("tinyweb.runners.dev", "dev")]
    assert gateways[1][1].port == 8123


@pytest.mark.parametrize("environ, message", [
    ({"TINYWEB_MODE": "bogus"}, "TINYWEB_MODE='bogus'"),
    ({"TINYWEB_MODE": "options"}, "TINYWEB_MODE='options'"),
    ({"TINYWEB_WORKERS": "many"}, "'many' is not a whole number"),
    ({"TINYWEB_WORKERS": "0"}, "'0' is not a whole number of at least 1"),
    ({"TINYWEB_PORT": "99999"}, "not a port number"),
    ({"TINYWEB_UMASK": "9"}, "not an octal number"),
    ({"TINYWEB_MAX_REQUESTS": "-1"}, "at least 0"),
    ({"TINYWEB_BIND": "[::1]"}, "--bind [::1]"),
    ({"TINYWEB_WORKERS": "2", "TINYWEB_THREADS": "4"}, "exclude each other"),
])
def test_bad_environment_values_are_usage_errors(environ, message):
    with pytest.raises(UsageError) as caught:
        choose_mode([], environ, is_main=True)
    assert message in str(caught.value)


def test_bad_mode_is_refused_under_cgi_too(gateways, capsys):
    with pytest.raises(UsageError, match="TINYWEB_MODE='fcgi2'"):
        choose_mode([], dict(CGI, TINYWEB_MODE="fcgi2"), is_main=False)
    assert run(object(), argv=[], environ=dict(CGI, TINYWEB_MODE="fcgi2"), is_main=True) == 2
    assert "tinyweb: environment: TINYWEB_MODE='fcgi2'" in capsys.readouterr().err
    assert gateways == []


@pytest.mark.parametrize("argv", [["--mode", "ftp"], ["--port", "0"], ["--workers", "x"]])
def test_bad_flags_exit_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as caught:
        choose_mode(argv, {}, is_main=True)
    assert caught.value.code == 2
    assert "usage:" in capsys.readouterr().err


# The usual command lines are read without argparse (options._plain_args); whatever they
# read must be what argparse reads, and whatever they cannot read must go to argparse.

_WORDS = ["--mode", "fcgi", "dev", "ftp", "--bind", "unix:/run/a.sock", ":9000", "--workers", "3",
          "0", "x", "--threads", "--max-requests", "--umask", "022", "9", "--socket-group",
          "www-data", "--socket-mode", "0660", "--host", "::1", "--port", "8001", "99999",
          "--reload", "--reload=1", "--work", "--mode=dev", "--port=", "--umask=0077", "-h", "--",
          "-1", "--bogus", "--workers=2", "--bind=a=b"]
_ENVIRONS = [{}, {"TINYWEB_WORKERS": "8", "TINYWEB_BIND": ":9000"}, {"TINYWEB_MODE": "fcgi"},
             {"TINYWEB_PORT": "0"}, {"TINYWEB_UMASK": "-22"}, {"TINYWEB_THREADS": "2"},
             {"TINYWEB_SOCKET_GROUP": "--x"}, {"TINYWEB_MAX_REQUESTS": "500", "TINYWEB_HOST": "h"}]


def _read_by(reader, argv, environ):
    try:
        return "read", reader(argv, environ)
    except SystemExit as exc:  # argparse's usage error
        return "exit", exc.code
    except UsageError as exc:
        return "usage", str(exc)


def test_plain_command_lines_read_as_argparse_reads_them(capsys):
    from tinyweb.runners import options

    rng = random.Random(4)
    cases = [(["--mode", "fcgi", "--bind", "unix:/run/a.sock", "--socket-mode", "0660"], {}),
             ([], {}), (["--workers", "2", "--max-requests=100"], {"TINYWEB_UMASK": "007"})]
    cases += [([rng.choice(_WORDS) for _ in range(rng.randint(0, 5))], rng.choice(_ENVIRONS))
              for _ in range(1500)]
    plain = 0
    for argv, environ in cases:
        quick = _read_by(lambda a, e: options._plain_args(a, e), argv, environ)
        full = _read_by(lambda a, e: options._argparse_args(a, e, "app.py"), argv, environ)
        if quick[0] != "read" or quick[1] is None:
            continue  # left to argparse, as intended
        plain += 1
        assert quick == full, (argv, environ)
    capsys.readouterr()
    assert plain > 150  # the generator reaches the plain path, not only the fallback
    for argv, environ in cases[:3]:
        assert options._plain_args(argv, environ) is not None


# -- --bind addresses --------------------------------------------------------------------


@pytest.mark.parametrize("text, address", [
    ("unix:/x", "/x"),
    ("unix:relative.sock", "relative.sock"),
    ("unix:/run/a:b.sock", "/run/a:b.sock"),
    ("/x.sock", "/x.sock"),
    ("app.sock", "app.sock"),
    ("/run/app:1.sock", "/run/app:1.sock"),
    ("localhost:9000", ("localhost", 9000)),
    ("0.0.0.0:1", ("0.0.0.0", 1)),
    ("[::1]:9000", ("::1", 9000, 0, 0)),
    ("[::]:65535", ("::", 65535, 0, 0)),
    (":9000", ("127.0.0.1", 9000)),
])
def test_parse_address(text, address):
    assert parse_address(text) == address


@pytest.mark.parametrize("text", [
    "", "unix:", "host:0", "host:65536", ":99999", "[::1]", "localhost:http", ":abc", "[::1]:x",
])
def test_bad_address(text):
    with pytest.raises(UsageError):
        parse_address(text)


# -- what is on fd 0 ---------------------------------------------------------------------


_DETECT = """
import sys
sys.path.insert(0, %r)
from tinyweb.runners import choose_mode
print(choose_mode([], {}, is_main=True).mode)
""" % str(CHECKOUT)


def _mode_with_stdin(stdin):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("TINYWEB_") and k not in ("GATEWAY_INTERFACE", "REQUEST_METHOD")}
    out = subprocess.run([sys.executable, "-c", _DETECT], stdin=stdin, env=env, capture_output=True,
                         timeout=20)
    assert out.returncode == 0, out.stderr.decode()
    return out.stdout.decode().strip()


def test_listening_socket_on_stdin_is_fcgi():
    # mod_fcgid and spawn-fcgi hand the app a listening socket as fd 0.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        assert _mode_with_stdin(listener.fileno()) == "fcgi"


def test_connected_socket_on_stdin_is_not_fcgi():
    # mod_cgid gives a CGI script a connected unix socket as fd 0 (flup's check misfires).
    left, right = socket.socketpair()
    with left, right:
        assert _mode_with_stdin(left.fileno()) == "dev"


def test_pipe_on_stdin_is_not_fcgi():
    read_end, write_end = os.pipe()
    try:
        assert _mode_with_stdin(read_end) == "dev"
    finally:
        os.close(read_end)
        os.close(write_end)
