"""The ``tinyweb`` command: ``new`` makes a working app, ``serve`` and ``python app.py`` run the dev server.

Every process started here runs in its own session, is waited for with a deadline and is
stopped by its pid; its stderr goes to a file in ``tmp_path``.
"""

import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest

from tinyweb import __version__
from tinyweb.cli import main
from tinyweb.cli import new as new_command
from tinyweb.config import SECRET_PLACEHOLDER

CHECKOUT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0


# ---------------------------------------------------------------------------------------
# Helpers


def child_env(**extra):
    """The environment for a child Python: tinyweb from this checkout, no CGI or TINYWEB_*."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("TINYWEB_") and k not in ("GATEWAY_INTERFACE", "REQUEST_METHOD")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CHECKOUT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_app(directory, *extra):
    assert main(["new", str(directory), *extra]) == 0
    return directory / "htdocs" / "app.py"


def ini_secret(directory):
    match = re.search(r"^secret = (.*)$", (directory / "tinyweb.ini").read_text(), re.M)
    return match.group(1)


class Running:
    """A process started in its own session, with its stderr in a file."""

    def __init__(self, argv, log, **kwargs):
        self.log = log
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                         start_new_session=True, env=child_env(), **kwargs)

    def stderr(self):
        return self.log.read_text(errors="replace")

    def get(self, url, headers=None, timeout=5.0):
        """Return (status, headers, body) of a GET."""
        request = urllib.request.Request(url, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.headers, error.read()

    def wait_ready(self, url, timeout=START_TIMEOUT):
        """Return the first answer of ``url``; fail if the process exits or the deadline passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail("exited with %s before serving:\n%s" % (self.proc.returncode, self.stderr()))
            try:
                return self.get(url, timeout=2.0)
            except (urllib.error.URLError, ConnectionError, socket.timeout):
                time.sleep(0.1)
        pytest.fail("no answer from %s within %.0f s:\n%s" % (url, timeout, self.stderr()))

    def wait_for_log(self, text, timeout=START_TIMEOUT):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.stderr():
                return
            time.sleep(0.1)
        pytest.fail("%r never appeared on stderr within %.0f s:\n%s" % (text, timeout, self.stderr()))

    def stop(self, sig=signal.SIGTERM):
        """Signal the process; return its exit status (killing its session past the deadline)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: pgid == pid
            self.proc.wait(STOP_TIMEOUT)
            pytest.fail("did not stop within %.0f s of %s:\n%s" % (STOP_TIMEOUT, sig, self.stderr()))


@pytest.fixture
def running(tmp_path):
    """Start processes with Running(argv, ...); each one still alive is stopped after the test."""
    started = []

    def start(argv, **kwargs):
        process = Running(argv, tmp_path / ("stderr-%d.log" % len(started)), **kwargs)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.proc.poll() is None:
            process.stop(signal.SIGKILL)


def cgi_request(app, path, cookie=None, timeout=30):
    """Run ``app`` as a CGI script (through its shebang) for GET ``path``; return the output."""
    env = child_env(GATEWAY_INTERFACE="CGI/1.1", REQUEST_METHOD="GET", SCRIPT_NAME="/app.py",
                    PATH_INFO=path, QUERY_STRING="", SERVER_NAME="localhost", SERVER_PORT="80",
                    SERVER_PROTOCOL="HTTP/1.1", REMOTE_ADDR="127.0.0.1", HTTP_HOST="localhost")
    if cookie:
        env["HTTP_COOKIE"] = cookie
    done = subprocess.run([str(app)], input=b"", capture_output=True, env=env, timeout=timeout,
                          cwd=str(app.parent))
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    head, _, body = done.stdout.partition(b"\r\n\r\n")
    if not _:
        head, _, body = done.stdout.partition(b"\n\n")
    return head.decode("latin-1"), body


# ---------------------------------------------------------------------------------------
# tinyweb --version / --help


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == "tinyweb %s" % __version__


def test_help_lists_the_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "new" in out and "serve" in out
    for later in ("config", "probe", "doctor"):
        assert later not in out


def test_no_command_or_an_unknown_one_is_a_usage_error(capsys):
    assert main([]) == 2
    assert "usage" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2


# ---------------------------------------------------------------------------------------
# tinyweb new


def test_new_makes_an_app(tmp_path, capsys):
    target = tmp_path / "shop"
    app = make_app(target)
    out = capsys.readouterr().out

    assert sorted(p.name for p in target.iterdir()) == ["data", "htdocs", "tinyweb.ini"]
    assert stat.S_IMODE(app.stat().st_mode) == 0o755
    assert stat.S_IMODE((target / "htdocs").stat().st_mode) == 0o755
    assert stat.S_IMODE((target / "tinyweb.ini").stat().st_mode) == 0o600
    assert stat.S_IMODE((target / "data").stat().st_mode) == 0o700
    assert list((target / "data").iterdir()) == []

    assert app.read_text().splitlines()[0] == "#!" + sys.executable
    assert "app.run()" in app.read_text()
    config = (target / "tinyweb.ini").read_text()
    assert SECRET_PLACEHOLDER not in config
    assert re.fullmatch(r"[0-9a-f]{64}", ini_secret(target))

    # How to run it in each mode, with this app's paths.
    for text in ("tinyweb serve %s" % target, "Options +ExecCGI", "AddHandler cgi-script .py",
                 "SetHandler mod_python", "PythonHandler mod_python.cgihandler",
                 "PythonPath \"['%s/htdocs'" % target, "AddHandler fcgid-script .py",
                 "%s %s --mode fcgi --bind unix:/run/shop/app.sock --socket-group www-data "
                 "--socket-mode 0660" % (sys.executable, app),
                 "compiles the script it runs on every request"):
        assert text in out


def test_new_writes_a_fresh_secret_each_time(tmp_path):
    make_app(tmp_path / "one")
    make_app(tmp_path / "two")
    assert ini_secret(tmp_path / "one") != ini_secret(tmp_path / "two")


def test_new_fills_an_empty_folder(tmp_path):
    target = tmp_path / "empty"
    target.mkdir()
    assert (make_app(target)).is_file()


def test_new_refuses_a_folder_that_is_not_empty(tmp_path, capsys):
    target = tmp_path / "busy"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    assert main(["new", str(target)]) == 1
    err = capsys.readouterr().err
    assert "not empty" in err and err.count("\n") == 1
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert (target / "keep.txt").read_text() == "mine"


def test_new_refuses_a_file(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert main(["new", str(target)]) == 1
    assert "not a folder" in capsys.readouterr().err


def test_new_refuses_an_unknown_user_and_makes_nothing(tmp_path, capsys):
    target = tmp_path / "nouser"
    assert main(["new", str(target), "--user", "no-such-user-tinyweb"]) == 1
    assert "no user 'no-such-user-tinyweb'" in capsys.readouterr().err
    assert not target.exists()


def test_new_user_needs_root(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 4242)
    target = tmp_path / "notroot"
    assert main(["new", str(target), "--user", "nobody"]) == 1
    assert "needs root" in capsys.readouterr().err
    assert not target.exists()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="chown needs root")
def test_new_user_owns_the_data_and_the_secret(tmp_path):
    import pwd

    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody")
    target = tmp_path / "owned"
    make_app(target, "--user", "nobody")
    for path, mode in ((target / "data", 0o700), (target / "tinyweb.ini", 0o600)):
        info = path.stat()
        assert (info.st_uid, info.st_gid) == (nobody.pw_uid, nobody.pw_gid), path
        assert stat.S_IMODE(info.st_mode) == mode
    assert (target / "htdocs" / "app.py").stat().st_uid == os.geteuid()


def test_new_compiles_modules_but_not_the_script(tmp_path):
    target = tmp_path / "compiled"
    app = make_app(target)
    (app.parent / "helpers.py").write_text("X = 1\n")
    assert new_command.compile_modules(app.parent, app)
    cached = sorted(p.name.split(".")[0] for p in (app.parent / "__pycache__").iterdir())
    assert cached == ["helpers"]


def test_unreachable_names_a_closed_folder(tmp_path):
    closed = tmp_path / "closed"
    (closed / "inside").mkdir(parents=True)
    os.chmod(closed, 0o700)
    blocked = new_command.unreachable(closed / "inside" / "python")
    # pytest's own base folder is 0700 too: whichever comes first on the way is named.
    assert blocked is not None and closed.is_relative_to(blocked)
    assert not blocked.stat().st_mode & stat.S_IXOTH
    assert new_command.unreachable("/usr/bin/env") is None


def test_new_warns_when_the_web_server_cannot_reach_the_app(tmp_path, capsys):
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    os.chmod(closed, 0o700)
    make_app(closed / "app")
    err = capsys.readouterr().err
    assert "tinyweb: warning: %s is out of reach of other users" % (closed / "app") in err


def test_scaffolded_app_answers_cgi_with_a_session(tmp_path):
    app = make_app(tmp_path / "cgiapp")
    head, body = cgi_request(app, "/")
    assert head.startswith("Status: 200")
    assert b"<h1>Hello</h1>" in body

    head, body = cgi_request(app, "/users/3")
    assert head.startswith("Status: 200")
    assert json.loads(body) == {"id": 3, "seen": 1}
    cookie = re.search(r"^Set-Cookie: ([^;]+)", head, re.M | re.I).group(1)
    head, body = cgi_request(app, "/users/3", cookie=cookie)
    assert json.loads(body) == {"id": 3, "seen": 2}


# ---------------------------------------------------------------------------------------
# tinyweb serve / python app.py (the dev server)


def test_serve_runs_the_demo_in_dev_mode(running):
    port = free_port()
    server = running([sys.executable, "-m", "tinyweb.cli", "serve", "htdocs/app.py",
                      "--port", str(port)], cwd=str(CHECKOUT))
    base = "http://127.0.0.1:%d" % port
    status, _, body = server.wait_ready(base + "/")
    assert status == 200 and b"dev" in body
    status, _, body = server.get(base + "/about")
    assert status == 200 and json.loads(body)["mode"] == "dev"
    # `tinyweb serve` replaced itself with the app: the pid is the server's.
    assert server.stop(signal.SIGTERM) == 0
    err = server.stderr()
    assert "dev server on %s/" % base in err
    assert '"GET /about HTTP/1.1" 200' in err
    assert "Traceback" not in err


def test_serve_finds_the_app_in_a_folder_and_keeps_the_session(tmp_path, running):
    make_app(tmp_path / "devapp")
    port = free_port()
    server = running([sys.executable, "-m", "tinyweb.cli", "serve", "--port", str(port)],
                     cwd=str(tmp_path / "devapp"))
    base = "http://127.0.0.1:%d" % port
    status, headers, body = server.wait_ready(base + "/users/5")
    assert status == 200 and json.loads(body) == {"id": 5, "seen": 1}
    cookie = headers["Set-Cookie"].split(";")[0]
    status, _, body = server.get(base + "/users/5", {"Cookie": cookie})
    assert json.loads(body) == {"id": 5, "seen": 2}
    assert server.stop(signal.SIGINT) == 0
    assert "Traceback" not in server.stderr()


def test_serve_without_an_app_says_where_it_looked(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["serve"]) == 1
    err = capsys.readouterr().err
    assert "htdocs/app.py" in err and "tinyweb new" in err
    assert main(["serve", "missing.py"]) == 1


def test_serve_runs_the_app_as_main_under_this_python(tmp_path, monkeypatch):
    app = make_app(tmp_path / "argv")
    calls = []
    monkeypatch.setattr(os, "execv", lambda path, argv: calls.append((path, argv)))
    assert main(["serve", str(app), "--host", "::1", "--port", "9123", "--reload"]) == 0
    assert calls == [(sys.executable, [sys.executable, str(app), "--mode", "dev", "--host", "::1",
                                       "--port", "9123", "--reload"])]


def test_python_app_without_a_mode_falls_back_to_dev_and_says_so(running):
    port = free_port()
    server = running([sys.executable, "htdocs/app.py", "--port", str(port)], cwd=str(CHECKOUT))
    status, _, body = server.wait_ready("http://127.0.0.1:%d/about" % port)
    assert status == 200 and json.loads(body)["mode"] == "dev"
    assert server.stop(signal.SIGINT) == 0
    err = server.stderr()
    assert ("no CGI request, FastCGI socket or mod_python found: dev server on "
            "http://127.0.0.1:%d/" % port) in err
    assert "Traceback" not in err


def test_a_port_in_use_is_one_clear_line_and_status_1(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        done = subprocess.run([sys.executable, "htdocs/app.py", "--port", str(port)],
                              cwd=str(CHECKOUT), env=child_env(TINYWEB_CONFIG=str(tmp_path / "none")),
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if "config file" not in line]
    assert len(lines) == 1, done.stderr
    assert "port %d on 127.0.0.1 is in use" % port in lines[0] and "--port" in lines[0]


def test_reload_restarts_on_a_change_and_survives_a_syntax_error(tmp_path, running):
    app = make_app(tmp_path / "reload")
    port = free_port()
    server = running([str(app), "--port", str(port), "--reload"], cwd=str(tmp_path))
    base = "http://127.0.0.1:%d" % port
    assert server.wait_ready(base + "/")[0] == 200
    assert server.get(base + "/extra")[0] == 404

    source = app.read_text()
    broken = source.replace("app.run()", "def broken(:\n\napp.run()")
    app.write_text(broken)
    server.wait_for_log("does not compile")
    assert server.get(base + "/")[0] == 200  # the old code still serves

    added = source.replace("app.run()", '@app.get("/extra")\ndef extra(request):\n'
                                        '    return "more"\n\n\napp.run()')
    app.write_text(added)
    os.utime(app, (time.time() + 5, time.time() + 5))  # a new mtime even on coarse clocks
    server.wait_for_log("changed: restarting")
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        try:
            if server.get(base + "/extra", timeout=2.0)[0] == 200:
                break
        except (urllib.error.URLError, ConnectionError, socket.timeout):
            pass
        time.sleep(0.2)
    else:
        pytest.fail("/extra never appeared after the reload:\n" + server.stderr())
    assert server.proc.poll() is None  # re-executed in place: same pid
    assert server.stop(signal.SIGTERM) == 0


# ---------------------------------------------------------------------------------------
# The wheel ships the template, so an installed `tinyweb new` works


def test_the_wheel_carries_the_template_and_new_works_from_it(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        if (CHECKOUT / name).exists():
            shutil.copy2(CHECKOUT / name, source / name)
    for name in ("tinyweb", "app_template"):
        shutil.copytree(CHECKOUT / name, source / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    wheels = tmp_path / "wheels"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "-w", str(wheels),
                            "--no-deps", "-q"], capture_output=True, text=True, timeout=180)
    if built.returncode != 0 and "No module named pip" in built.stderr:
        pytest.skip("no pip in %s" % sys.executable)
    assert built.returncode == 0, built.stderr
    (wheel,) = wheels.glob("tinyweb-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "tinyweb/app_template/htdocs/app.py" in names
    assert "tinyweb/app_template/tinyweb.ini" in names
    assert "tinyweb/cli/__init__.py" in names and "tinyweb/runners/dev.py" in names

    site = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                                "--target", str(site), str(wheel)],
                               capture_output=True, text=True, timeout=120)
    assert installed.returncode == 0, installed.stderr
    env = child_env(PYTHONPATH=str(site))  # the installed copy, not this checkout
    target = tmp_path / "fromwheel"
    made = subprocess.run([str(site / "bin" / "tinyweb"), "new", str(target)], cwd=str(tmp_path),
                          env=env, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    assert (target / "htdocs" / "app.py").is_file() and (target / "data").is_dir()
    where = subprocess.run([sys.executable, "-c", "import tinyweb.cli.new as n; print(n.find_template())"],
                           cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=60)
    assert where.stdout.strip() == str(site / "tinyweb" / "app_template")
