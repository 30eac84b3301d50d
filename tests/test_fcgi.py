"""The FastCGI gateway, run in real processes: an app file started with ``--mode fcgi``.

Each test writes a plain WSGI app (no tinyweb core; one test checks what an abort leaves in
the log of a tinyweb.App), starts it in its own session, waits for its socket with a deadline,
talks FastCGI to it with ``fcgi_client`` and stops it by process group. Nothing here waits
without a deadline.
"""

import grp
import json
import os
import random
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import pytest

import fcgi_client as fc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_TIMEOUT = 15.0
STOP_TIMEOUT = 15.0

APP = r'''
import json, os, sys, time

import tinyweb.runners.fcgi_connection as fcgi_connection
import tinyweb.runners.prefork as prefork

# Knobs for the tests: shorter timeouts than production.
fcgi_connection.READ_TIMEOUT = float(os.environ.get("TEST_READ_TIMEOUT", fcgi_connection.READ_TIMEOUT))
prefork.SHUTDOWN_GRACE = float(os.environ.get("TEST_GRACE", prefork.SHUTDOWN_GRACE))

from tinyweb.runners import run

TOKEN = os.urandom(4).hex()  # new each time this file is executed (a SIGHUP reload)


def app(environ, start_response):
    path, query = environ["PATH_INFO"], environ.get("QUERY_STRING", "")
    ctype = "text/plain"
    if path == "/echo":
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        out = b"%s %s %d\n" % (environ["REQUEST_METHOD"].encode(), environ["CONTENT_TYPE"].encode(),
                               len(body)) + body
        ctype = "application/octet-stream"
    elif path == "/sleep":
        time.sleep(float(query or 1))
        out = b"slept %d" % os.getpid()
    elif path == "/pid":
        out = b"%d" % os.getpid()
    elif path == "/env":
        keys = ["tinyweb.mode", "wsgi.multithread", "wsgi.multiprocess", "wsgi.run_once",
                "wsgi.url_scheme", "SCRIPT_NAME", "PATH_INFO", "QUERY_STRING", "HTTP_X_TEST"]
        out = json.dumps({k: environ.get(k) for k in keys}).encode()
        ctype = "application/json"
    elif path == "/token":
        out = TOKEN.encode()
    elif path == "/umask":
        mask = os.umask(0)
        os.umask(mask)
        out = b"%04o" % mask
    elif path == "/after":
        def task():
            time.sleep(1)
            with open(query, "w") as f:
                f.write("done %d" % os.getpid())
        def failing():
            raise ValueError("task failed on purpose")
        environ["tinyweb.after_response"].extend([failing, task])
        out = b"queued"
    elif path == "/boom":
        environ["wsgi.errors"].write("about to fail\n")
        raise RuntimeError("boom on purpose")
    elif path == "/crash":
        os._exit(3)
    elif path == "/record":  # the file named by the query gets a line each time the app runs
        with open(query, "a") as f:
            f.write("ran\n")
        out = b"recorded"
    elif path == "/slowbody":  # reads its body; says in the file named by the query how it went
        note(query, "reading")
        try:
            body = environ["wsgi.input"].read(int(environ["CONTENT_LENGTH"]))
        except Exception as exc:
            kind = "ConnectionAbortedError" if isinstance(exc, ConnectionAbortedError) else type(exc).__name__
            note(query, "raised %s: %s" % (kind, exc))
            raise
        out = b"read %d" % len(body)
    elif path == "/readall":  # reads wsgi.input to its end, whatever CONTENT_LENGTH says
        out = b"read %d" % len(environ["wsgi.input"].read())
    elif path == "/stream":
        start_response("200 OK", [("Content-Type", ctype)])
        return stream(query)
    else:
        out = b"hello"
    start_response("200 OK", [("Content-Type", ctype), ("X-Path", path)])
    return [out]


def note(path, line):
    with open(path, "a") as f:
        f.write(line + "\n")


def stream(folder):
    """Yield "first", wait (up to 10 s) for the file go in ``folder``, then yield forever."""
    try:
        yield b"first\n"
        deadline = time.monotonic() + 10
        while not os.path.exists(os.path.join(folder, "go")) and time.monotonic() < deadline:
            time.sleep(0.01)
        while True:
            yield b"more\n" * 20
            time.sleep(0.01)
    finally:  # close() ran: GeneratorExit
        note(os.path.join(folder, "closed"), "closed")


sys.exit(run(app))
'''


# --- helpers ------------------------------------------------------------------------------


def wait_until(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("timed out after %g s waiting for %s" % (timeout, what))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def can_connect(address):
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family) as s:
        s.settimeout(1.0)
        try:
            s.connect(address)
        except OSError:
            return False
        return True


def process_state(pid):
    """Return the state letter of ``pid`` (Z for a zombie), or None when it is gone."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def children(pid):
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append((int(entry), fields[0]))
    return out


class Server:
    """One app process started in its own session, its output in files under tmp_path."""

    def __init__(self, tmp_path, args, address=None, stdin=None, env=None, name="server"):
        self.address = address
        self.out_path = tmp_path / (name + ".out")
        self.err_path = tmp_path / (name + ".err")
        app_path = tmp_path / "app.py"
        if not app_path.exists():
            app_path.write_text(APP)
        environ = {k: v for k, v in os.environ.items() if not k.startswith("TINYWEB_")}
        environ["PYTHONPATH"] = REPO
        environ.update(env or {})
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(app_path)] + list(args), cwd=str(tmp_path),
                stdin=stdin if stdin is not None else subprocess.DEVNULL,
                stdout=out, stderr=err, env=environ, start_new_session=True)

    @property
    def pid(self):
        return self.proc.pid

    @property
    def stderr(self):
        return self.err_path.read_text(errors="replace")

    def wait_ready(self):
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError("server exited with %s before listening:\n%s"
                                     % (self.proc.returncode, self.stderr))
            return can_connect(self.address)
        wait_until(ready, START_TIMEOUT, "%s to accept connections" % (self.address,))
        return self

    def wait_exit(self, timeout=STOP_TIMEOUT):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError("server still running after %g s:\n%s" % (timeout, self.stderr))

    def signal(self, signum):
        os.kill(self.proc.pid, signum)

    def kill_group(self):
        """Stop the whole process group: SIGTERM, then SIGKILL after a deadline."""
        for signum, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, signum)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                break  # the leader and every worker are gone
            time.sleep(0.2)

    def fetch(self, path="/", **kwargs):
        return fc.fetch(self.address, path, **kwargs)


@pytest.fixture
def start(tmp_path):
    """Start app servers for a test; stop every one of them afterwards, by process group."""
    started = []

    def _start(*args, address=None, ready=True, **kwargs):
        server = Server(tmp_path, args, address, name="server%d" % len(started), **kwargs)
        started.append(server)
        return server.wait_ready() if ready else server

    yield _start
    for server in started:
        server.kill_group()


@pytest.fixture
def sock_path(tmp_path):
    path = str(tmp_path / "app.sock")
    assert len(path) < 100, "unix socket paths are limited to 107 bytes"
    return path


def concurrently(calls):
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
        return [f.result(timeout=30) for f in futures]


# --- the codec, with no I/O ----------------------------------------------------------------


def test_codec_encodes_golden_bytes():
    assert fc.begin_request(1, fc.RESPONDER, fc.KEEP_CONN) == (
        b"\x01\x01\x00\x01\x00\x08\x00\x00" b"\x00\x01\x01\x00\x00\x00\x00\x00")
    assert fc.pairs({"A": "bc"}) == b"\x01\x02Abc"
    assert fc.pairs({"N": "v" * 200}) == b"\x01\x80\x00\x00\xc8N" + b"v" * 200
    assert fc.record(fc.STDIN, 1, b"abc") == b"\x01\x05\x00\x01\x00\x03\x05\x00abc\0\0\0\0\0"


def test_codec_decodes_whole_and_byte_by_byte():
    wire = (fc.record(fc.STDOUT, 1, b"Status: 404 Not Found\r\nX-A: b\r\n\r\nnope")
            + fc.record(fc.STDOUT, 1) + fc.record(fc.STDERR, 1, b"warn")
            + fc.record(fc.END_REQUEST, 1, b"\0\0\0\0\0\0\0\0"))
    whole = fc.Decoder().feed(wire)
    decoder, pieces = fc.Decoder(), []
    for i in range(len(wire)):
        pieces.extend(decoder.feed(wire[i:i + 1]))
    assert pieces == whole and len(whole) == 4
    response = fc.Response()
    for rec in whole:
        response.add(rec)
    assert (response.status, response.headers, response.body, response.stderr) == (
        404, [("Status", "404 Not Found"), ("X-A", "b")], b"nope", b"warn")
    assert fc.decode_pairs(fc.pairs({"K": "v" * 300, "E": ""})) == [(b"K", b"v" * 300), (b"E", b"")]


def test_importing_the_gateway_does_not_import_flup():
    code = "import sys, tinyweb.runners.fcgi; print(any(m.startswith('flup') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=REPO),
                         capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "False", out.stderr


# --- serving ------------------------------------------------------------------------------


def test_get_and_post_default_prefork(start, sock_path):
    server = start("--mode", "fcgi", "--bind", "unix:" + sock_path, address=sock_path)
    r = server.fetch("/env", query="a=1", params={"HTTP_X_TEST": "yes"})
    assert r.status == 200 and r.protocol_status == fc.REQUEST_COMPLETE
    assert r.headers == [("Status", "200 OK"), ("Content-Type", "application/json"),
                         ("X-Path", "/env"), ("Content-Length", str(len(r.body)))]
    assert json.loads(r.body) == {
        "tinyweb.mode": "fcgi", "wsgi.multithread": False, "wsgi.multiprocess": True,
        "wsgi.run_once": False, "wsgi.url_scheme": "http", "SCRIPT_NAME": "/app.py",
        "PATH_INFO": "/env", "QUERY_STRING": "a=1", "HTTP_X_TEST": "yes"}

    body = bytes(range(256)) * 1000  # 256 kB: many STDIN records, many STDOUT records
    r = server.fetch("/echo", method="POST", body=body, content_type="application/x-test")
    assert r.status == 200
    assert r.header("Content-Type") == "application/octet-stream"
    assert r.body == b"POST application/x-test 256000\n" + body
    # Two single-threaded workers by default (notes/performance.md).
    wait_until(lambda: len(children(server.pid)) == 2, 5, "two workers")


def test_tcp_port_means_localhost(start):
    port = free_port()
    server = start("--bind", ":%d" % port, address=("127.0.0.1", port))
    assert server.fetch("/").body == b"hello"


def test_records_split_byte_by_byte_and_keep_conn(start, sock_path):
    start("--workers", "1", "--bind", sock_path, address=sock_path)
    body = b"a=1&b=\xff\x00"
    with fc.Client(sock_path) as client:
        # Records of 1 and 3 bytes (a name-value pair split across PARAMS records), of 64 KiB,
        # and with the most padding a record can have.
        for chunk, padding in ((1, None), (3, 255), (65535, None), (65535, 255)):
            r = client.request("POST", "/echo", body=body, content_type="x/y", keep_conn=True,
                               chunk=chunk, padding=padding)
            assert (r.status, r.body) == (200, b"POST x/y 8\n" + body)
        big = bytes(range(256)) * 600  # 150 kB: three STDIN records of 64 KiB
        r = client.request("POST", "/echo", body=big, content_type="x/y", keep_conn=True, padding=255)
        assert r.body == b"POST x/y 153600\n" + big
        # The wire itself one byte per send.
        wire = fc.request(fc.cgi_params("POST", "/echo", body=body, content_type="x/y"), body,
                          keep_conn=True, chunk=5, padding=3)
        for i in range(len(wire)):
            client.send(wire[i:i + 1])
        assert client.read_response().body == b"POST x/y 8\n" + body
        # The empty STDOUT end record and END_REQUEST arrive; the connection stays usable.
        assert client.request("GET", "/pid", keep_conn=True).status == 200


def test_management_records_and_unknown_role(start, sock_path):
    server = start("--workers", "1", "--bind", sock_path, address=sock_path)
    with fc.Client(sock_path) as client:
        client.send(fc.record(fc.GET_VALUES, 0, fc.pairs(
            {"FCGI_MAX_CONNS": "", "FCGI_MPXS_CONNS": "", "OTHER": ""})))
        rec = client.next_record(time.monotonic() + 5)
        assert rec.type == fc.GET_VALUES_RESULT
        assert dict(fc.decode_pairs(rec.content)) == {b"FCGI_MAX_CONNS": b"1", b"FCGI_MPXS_CONNS": b"0"}
        client.send(fc.record(42, 0, b"12345678"))
        assert client.next_record(time.monotonic() + 5) == (fc.UNKNOWN_TYPE, 0, b"\x2a" + b"\0" * 7)
        client.send(fc.request(fc.cgi_params(), role=fc.AUTHORIZER))
        r = client.read_response()
        assert (r.protocol_status, r.stdout) == (fc.UNKNOWN_ROLE, b"")
    with fc.Client(sock_path) as client:  # FILTER, with the FCGI_DATA stream it brings
        client.send(fc.request(fc.cgi_params(), role=fc.FILTER) + fc.stream(fc.DATA, 1, b"d" * 1000))
        r = client.read_response()
        assert (r.protocol_status, r.stdout) == (fc.UNKNOWN_ROLE, b"")
    assert server.fetch("/").status == 200


def test_app_errors_go_to_fcgi_stderr_and_ours_when_bound(start, sock_path):
    server = start("--workers", "1", "--bind", sock_path, address=sock_path)
    r = server.fetch("/boom")
    assert r.status == 500
    assert b"boom on purpose" not in r.body
    assert r.stderr.startswith(b"about to fail\n")
    assert b"RuntimeError: boom on purpose" in r.stderr  # flup: traceback to FCGI_STDERR only
    assert server.fetch("/").status == 200
    assert "about to fail\n" in server.stderr  # wsgi.errors is also our stderr when bound


def test_workers_serve_in_parallel(start, sock_path):
    server = start("--workers", "2", "--bind", sock_path, address=sock_path)
    began = time.monotonic()
    results = concurrently([lambda: server.fetch("/sleep", query="1")] * 2)
    elapsed = time.monotonic() - began
    assert [r.status for r in results] == [200, 200]
    assert len({r.body for r in results}) == 2  # two pids
    assert elapsed < 1.8, elapsed


def test_threads_serve_in_parallel_in_one_process(start, sock_path):
    server = start("--threads", "4", "--bind", sock_path, address=sock_path)
    assert json.loads(server.fetch("/env").body)["wsgi.multithread"] is True
    began = time.monotonic()
    results = concurrently([lambda: server.fetch("/sleep", query="1")] * 4)
    elapsed = time.monotonic() - began
    assert {r.body for r in results} == {results[0].body}  # one process
    assert elapsed < 1.8, elapsed


# --- the socket ---------------------------------------------------------------------------


def test_stale_socket_is_replaced(start, sock_path):
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(sock_path)
    dead.close()  # the file stays, no one listens: what a killed server leaves
    assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
    server = start("--bind", sock_path, address=sock_path)
    assert server.fetch("/").body == b"hello"


def test_live_socket_is_refused(start, sock_path):
    first = start("--workers", "1", "--bind", sock_path, address=sock_path)
    second = start("--bind", sock_path, ready=False)
    assert second.wait_exit() == 1
    assert second.stderr == (
        "tinyweb: socket %s is held by a running server (pid %d); stop it or choose another "
        "--bind\n" % (sock_path, first.pid))
    assert first.fetch("/").body == b"hello"


def test_regular_file_at_the_path_is_refused(start, sock_path):
    with open(sock_path, "w") as f:
        f.write("precious")
    server = start("--bind", sock_path, ready=False)
    assert server.wait_exit() == 1
    assert server.stderr == (
        "tinyweb: %s exists and is not a socket; remove it or choose another --bind\n" % sock_path)
    with open(sock_path) as f:
        assert f.read() == "precious"


def test_missing_directory_is_one_clear_line(start, tmp_path):
    path = str(tmp_path / "nowhere" / "app.sock")
    server = start("--bind", path, ready=False)
    assert server.wait_exit() == 1
    assert server.stderr == "tinyweb: cannot create socket %s: directory %s does not exist\n" % (
        path, tmp_path / "nowhere")


def test_unknown_group_is_refused(start, sock_path):
    server = start("--bind", sock_path, "--socket-group", "no-such-group-tw", ready=False)
    assert server.wait_exit() == 1
    assert "unknown group 'no-such-group-tw'" in server.stderr
    assert "Traceback" not in server.stderr
    assert not os.path.exists(sock_path)


def _other_group():
    for name in ("www-data", "nogroup", "daemon"):
        try:
            return grp.getgrnam(name)
        except KeyError:
            pass
    pytest.skip("no group to hand the socket to")


def test_socket_mode_and_group(start, sock_path):
    group = _other_group()
    server = start("--bind", sock_path, "--socket-mode", "0660", "--socket-group", group.gr_name,
                   address=sock_path)
    st = os.stat(sock_path)
    assert stat.S_ISSOCK(st.st_mode)
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, group.gr_gid)
    assert server.fetch("/").status == 200


def test_socket_group_alone_makes_the_socket_group_writable(start, sock_path):
    group = _other_group()
    start("--bind", sock_path, "--socket-group", group.gr_name, address=sock_path)
    st = os.stat(sock_path)
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, group.gr_gid)


def test_tcp_port_in_use_is_refused(start):
    port = free_port()
    first = start("--bind", ":%d" % port, "--workers", "1", address=("127.0.0.1", port))
    second = start("--bind", ":%d" % port, ready=False)
    assert second.wait_exit() == 1
    assert second.stderr == ("tinyweb: address 127.0.0.1:%d is in use by another server; stop it "
                             "or choose another --bind\n" % port)
    assert first.fetch("/").status == 200


def test_umask_applies_to_the_process_and_the_socket(start, sock_path):
    server = start("--bind", sock_path, "--umask", "0077", address=sock_path)
    assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o700
    assert server.fetch("/umask").body == b"0077"


# --- signals, recycling, crashes -----------------------------------------------------------


@pytest.mark.parametrize("model", [["--workers", "2"], ["--threads", "4"]], ids=["workers", "threads"])
def test_sigterm_lets_the_request_finish_then_exits_0(start, sock_path, model):
    server = start("--bind", sock_path, *model, address=sock_path)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(server.fetch, "/sleep", query="2")
        time.sleep(0.5)  # the request is in the app now
        server.signal(signal.SIGTERM)
        response = pending.result(timeout=10)
    assert (response.status, response.body[:5]) == (200, b"slept")
    assert server.wait_exit(10) == 0
    assert not os.path.exists(sock_path)
    assert "Traceback" not in server.stderr


@pytest.mark.parametrize("model", [["--workers", "1"], ["--threads", "2"]], ids=["workers", "threads"])
def test_idle_kept_alive_connection_does_not_delay_shutdown(start, sock_path, model):
    server = start("--bind", sock_path, *model, address=sock_path)
    with fc.Client(sock_path) as client:
        assert client.request("GET", "/", keep_conn=True).body == b"hello"
        began = time.monotonic()
        server.signal(signal.SIGTERM)
        assert server.wait_exit(10) == 0
        assert time.monotonic() - began < 2  # not READ_TIMEOUT (30 s)
        assert client.read_until_closed() == b""


def test_sighup_under_threads_reloads(start, sock_path):
    server = start("--bind", sock_path, "--threads", "2", address=sock_path)
    token = server.fetch("/token").body
    server.signal(signal.SIGHUP)
    wait_until(lambda: server.fetch("/token").body != token, 10, "the reloaded code")
    assert json.loads(server.fetch("/env").body)["wsgi.multithread"] is True
    server.signal(signal.SIGTERM)
    assert server.wait_exit() == 0
    assert not os.path.exists(sock_path)


def test_stuck_request_is_killed_after_the_grace_period(start, sock_path):
    server = start("--bind", sock_path, "--workers", "1", address=sock_path,
                   env={"TEST_GRACE": "1"})
    client = fc.Client(sock_path, timeout=20)
    client.send(fc.request(fc.cgi_params(path="/sleep", query="60")))
    time.sleep(0.3)
    began = time.monotonic()
    server.signal(signal.SIGTERM)
    assert server.wait_exit(10) == 0
    assert time.monotonic() - began < 5
    assert client.read_until_closed() == b""  # the worker was killed mid-request
    client.close()
    assert "still busy after 1 s; killing it" in server.stderr
    assert not os.path.exists(sock_path)


def test_max_requests_recycles_workers(start, sock_path):
    server = start("--bind", sock_path, "--workers", "1", "--max-requests", "3", address=sock_path)
    pids = []
    for _ in range(10):
        r = server.fetch("/pid")
        assert r.status == 200
        pids.append(int(r.body))
    assert [len(set(pids[i:i + 3])) for i in range(0, 10, 3)] == [1, 1, 1, 1]
    assert len(set(pids)) == 4, pids
    wait_until(lambda: all(state != "Z" for _, state in children(server.pid)), 5, "no zombies")
    assert server.proc.poll() is None


def test_crashed_worker_is_replaced(start, sock_path):
    server = start("--bind", sock_path, "--workers", "1", address=sock_path)
    with pytest.raises((EOFError, ConnectionResetError)):
        server.fetch("/crash")
    assert server.fetch("/").body == b"hello"
    wait_until(lambda: "exited with status 3; starting another" in server.stderr, 5, "the log line")


def test_sighup_reloads_the_code_and_keeps_the_socket(start, sock_path):
    server = start("--bind", sock_path, "--workers", "2", address=sock_path)
    token = server.fetch("/token").body
    inode = os.stat(sock_path).st_ino
    old_workers = {pid for pid, _ in wait_until(lambda: len(children(server.pid)) == 2 and
                                                children(server.pid), 5, "two workers")}
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(server.fetch, "/sleep", query="1")
        time.sleep(0.3)
        server.signal(signal.SIGHUP)
        # Served throughout: by old workers still up, or queued in the kept socket's backlog.
        new_token = wait_until(lambda: server.fetch("/token").body != token and
                               server.fetch("/token").body, 10, "the reloaded code")
        assert pending.result(timeout=10).status == 200
    assert new_token != token
    assert server.proc.poll() is None
    assert os.stat(sock_path).st_ino == inode
    wait_until(lambda: not old_workers & {pid for pid, _ in children(server.pid)}, 5,
               "the old workers to exit")
    server.signal(signal.SIGTERM)
    assert server.wait_exit() == 0
    assert not os.path.exists(sock_path)


def test_workers_leave_when_the_supervisor_is_killed(start, sock_path):
    server = start("--bind", sock_path, "--workers", "2", address=sock_path)
    workers = wait_until(lambda: len(children(server.pid)) == 2 and children(server.pid), 5,
                         "two workers")
    workers = [pid for pid, _ in workers]
    server.signal(signal.SIGKILL)
    server.wait_exit()
    wait_until(lambda: all(process_state(pid) in (None, "Z") for pid in workers), 5,
               "orphaned workers to exit")


# --- bad peers ----------------------------------------------------------------------------

BAD_INPUTS = {
    "short-begin-request": fc.record(fc.BEGIN_REQUEST, 1, b"\x00\x01"),
    "http-garbage": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "version-2": fc.record(fc.BEGIN_REQUEST, 1, b"\x00\x01\x00\x00\x00\x00\x00\x00", version=2),
    "pair-overrun": fc.begin_request() + fc.record(fc.PARAMS, 1, b"\x05\x7fABCDE") + fc.record(fc.PARAMS, 1),
    "truncated-record": fc.begin_request() + fc.record(fc.PARAMS, 1, b"x" * 64)[:20],
}
EXPECTED_LOG = {
    "short-begin-request": "FCGI_BEGIN_REQUEST body of 2 bytes, expected 8",
    "http-garbage": "record version 71, expected 1 (an HTTP request sent to the FastCGI socket?)",
    "version-2": "record version 2, expected 1",
    "pair-overrun": "name-value pair overruns FCGI_PARAMS",
    "truncated-record": "closed the connection in the middle of a record",
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_malformed_input_closes_only_that_connection(start, sock_path, name):
    server = start("--bind", sock_path, "--workers", "1", address=sock_path)
    pid = server.fetch("/pid").body
    began = time.monotonic()
    with fc.Client(sock_path, timeout=5) as client:
        client.send(BAD_INPUTS[name])
        if name == "truncated-record":
            client.sock.shutdown(socket.SHUT_WR)
        assert client.read_until_closed() == b""
    assert time.monotonic() - began < 3
    assert server.fetch("/pid").body == pid  # the same worker serves on
    wait_until(lambda: EXPECTED_LOG[name] in server.stderr, 5, "the log line")
    assert "Traceback" not in server.stderr


def memory_kib(pid, field):
    """Return VmRSS or VmHWM (the peak since the last reset) of ``pid`` from /proc, in KiB."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError("no %s in /proc/%d/status" % (field, pid))


FLOOD = 100 * 1024 * 1024
FLOOD_RECORD = 65535


def flood(params, what):
    """Return the bytes before the flood, and one record of it, repeated to FLOOD bytes."""
    if what == "params":
        return fc.begin_request(), fc.record(fc.PARAMS, 1, b"\x01" * FLOOD_RECORD)
    head = fc.begin_request(flags=fc.KEEP_CONN) + fc.stream(fc.PARAMS, 1, fc.pairs(params))
    if what == "stdin-after-the-body":
        head += fc.record(fc.STDIN, 1, b"x" * 10)  # CONTENT_LENGTH's worth, then more
    return head, fc.record(fc.STDIN, 1, b"y" * FLOOD_RECORD)


@pytest.mark.parametrize("what, path, log_line", [
    ("params", "/", "FCGI_PARAMS over 1048576 bytes"),
    # The app reads wsgi.input to its end: flup would buffer all 100 MB for it.
    ("stdin-read-to-end", "/readall", "FCGI_STDIN longer than CONTENT_LENGTH (10 bytes)"),
    # The app reads its 10 bytes; on a kept-alive connection the rest is read as records.
    ("stdin-after-the-body", "/echo", "FCGI_STDIN longer than CONTENT_LENGTH (10 bytes)"),
])
def test_100_mb_of_params_or_stdin_are_capped(start, sock_path, what, path, log_line):
    server = start("--bind", sock_path, "--workers", "1", address=sock_path)
    pid = int(server.fetch("/pid").body)
    baseline = memory_kib(pid, "VmRSS")
    with open("/proc/%d/clear_refs" % pid, "w") as f:
        f.write("5")  # VmHWM := VmRSS, so VmHWM is the peak during the flood
    head, record = flood(fc.cgi_params("POST", path, body=b"x" * 10), what)
    sent = 0
    began = time.monotonic()
    with fc.Client(sock_path, timeout=10) as client:
        try:
            client.send(head)
            while sent < FLOOD:
                client.send(record)
                sent += FLOOD_RECORD
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed while we were still sending: what we want
        client.read_until_closed()  # a response may come first; then the close, bounded
    assert sent < FLOOD // 10, "the server read %d bytes before closing" % sent
    assert time.monotonic() - began < 5
    assert memory_kib(pid, "VmHWM") - baseline < 16 * 1024
    assert server.fetch("/pid").body == b"%d" % pid  # the same worker serves on
    wait_until(lambda: log_line in server.stderr, 5, "the log line")
    assert "Traceback" not in server.stderr


def test_silent_connection_is_closed_after_the_read_timeout(start, sock_path):
    server = start("--bind", sock_path, "--workers", "1", address=sock_path,
                   env={"TEST_READ_TIMEOUT": "1"})
    began = time.monotonic()
    with fc.Client(sock_path, timeout=10) as client:
        assert client.read_until_closed() == b""
    assert 0.8 < time.monotonic() - began < 5
    assert server.fetch("/").body == b"hello"
    assert "no request within 1 s" in server.stderr


def test_a_connection_accepted_before_a_stop_is_still_served(start, sock_path):
    # A stop signal that comes between the worker's accept and the request's first bytes must
    # not drop the request (a SIGHUP reload under load did, now and then).
    server = start("--bind", sock_path, "--workers", "1", address=sock_path)
    pid = server.fetch("/pid").body
    with fc.Client(sock_path, timeout=10) as client:
        time.sleep(0.3)  # accepted: the worker waits for this connection's first bytes
        server.signal(signal.SIGTERM)
        time.sleep(0.3)
        r = client.request("GET", "/pid")
        assert (r.status, r.body) == (200, pid)
    assert server.wait_exit() == 0
    assert "Traceback" not in server.stderr


def test_an_idle_kept_connection_does_not_hold_a_single_worker(start, sock_path):
    # nginx with fastcgi_keep_conn keeps connections open between requests and sends the next
    # request on any of them: a single-threaded worker must not sit on one idle connection
    # while another waits (the wait was READ_TIMEOUT, 30 s, before).
    server = start("--bind", sock_path, "--workers", "1", address=sock_path)
    with fc.Client(sock_path, timeout=10) as kept:
        pid = kept.request("GET", "/pid", keep_conn=True).body
        began = time.monotonic()
        with fc.Client(sock_path, timeout=10) as other:
            for _ in range(3):
                assert other.request("GET", "/pid", keep_conn=True).body == pid
        assert server.fetch("/pid").body == pid
        assert time.monotonic() - began < 3
        # The first connection, idle meanwhile, is served again by the same worker.
        assert kept.request("GET", "/pid", keep_conn=True).body == pid
    assert "Traceback" not in server.stderr


def test_many_idle_kept_connections_each_get_their_next_request(start, sock_path):
    server = start("--bind", sock_path, "--workers", "1", address=sock_path)
    clients = [fc.Client(sock_path, timeout=10) for _ in range(10)]
    try:
        for round_ in range(3):
            for client in reversed(clients) if round_ % 2 else clients:
                assert client.request("GET", "/", keep_conn=True).body == b"hello"
    finally:
        for client in clients:
            client.close()
    assert "Traceback" not in server.stderr and "closing a connection" not in server.stderr


def test_an_idle_kept_connection_is_closed_after_the_read_timeout(start, sock_path):
    server = start("--bind", sock_path, "--workers", "1", address=sock_path,
                   env={"TEST_READ_TIMEOUT": "1"})
    with fc.Client(sock_path, timeout=10) as kept:
        assert kept.request("GET", "/", keep_conn=True).body == b"hello"
        began = time.monotonic()
        assert kept.read_until_closed() == b""
        assert 0.8 < time.monotonic() - began < 5
    assert server.fetch("/").body == b"hello"
    assert "Traceback" not in server.stderr and "closing a connection" not in server.stderr


# --- the web server aborts or goes away (FCGI_ABORT_REQUEST, closes) -----------------------


@pytest.mark.parametrize("when, keep_conn", [
    ("during-params", True),  # BEGIN_REQUEST, some params, ABORT
    ("after-params", True),  # the params stream ended: flup calls the app at once
    ("after-first-stdin", True),
    ("after-first-stdin", False),
])
def test_abort_before_the_app_runs_ends_the_request_without_it(start, sock_path, tmp_path, when,
                                                              keep_conn):
    server = start("--bind", sock_path, "--workers", "1", address=sock_path)
    ran = tmp_path / "ran.txt"
    params = fc.pairs(fc.cgi_params("POST", "/record", query=str(ran), body=b"x" * 100))
    wire = fc.begin_request(flags=fc.KEEP_CONN if keep_conn else 0) + fc.record(fc.PARAMS, 1, params)
    if when != "during-params":
        wire += fc.record(fc.PARAMS, 1)
    if when == "after-first-stdin":
        wire += fc.record(fc.STDIN, 1, b"x" * 10)
    with fc.Client(sock_path, timeout=5) as client:
        client.send(wire + fc.abort_request())
        r = client.read_response()
        assert (r.stdout, r.stderr, r.protocol_status) == (b"", b"", fc.REQUEST_COMPLETE)
        if keep_conn:  # the connection carries on with the next request
            assert client.request("GET", "/pid", keep_conn=True).status == 200
        else:
            assert client.read_until_closed() == b""
    assert not ran.exists()  # the app never ran
    assert server.fetch("/record", query=str(ran)).body == b"recorded"
    assert ran.read_text() == "ran\n"
    assert "Traceback" not in server.stderr


def test_abort_while_the_app_reads_its_body(start, sock_path, tmp_path):
    server = start("--bind", sock_path, "--workers", "1", address=sock_path)
    pid = server.fetch("/pid").body
    report = tmp_path / "report.txt"
    params = fc.cgi_params("POST", "/slowbody", query=str(report), body=b"x" * 100000)
    began = time.monotonic()
    with fc.Client(sock_path, timeout=5) as client:
        client.send(fc.begin_request() + fc.stream(fc.PARAMS, 1, fc.pairs(params))
                    + fc.record(fc.STDIN, 1, b"x" * 1000))  # and the other 99 000 never come
        wait_until(lambda: report.exists(), 5, "the app to read its body")
        client.send(fc.abort_request())
        r = client.read_response()
        assert (r.stdout, r.protocol_status) == (b"", fc.REQUEST_COMPLETE)
        assert client.read_until_closed() == b""
    assert time.monotonic() - began < 3  # not READ_TIMEOUT (30 s)
    assert report.read_text() == (
        "reading\nraised ConnectionAbortedError: the web server aborted the request "
        "(FCGI_ABORT_REQUEST)\n")
    assert server.fetch("/pid").body == pid  # a new connection, the same worker
    assert "Traceback" not in server.stderr


@pytest.mark.parametrize("how", ["close", "silence"])
def test_body_that_stops_coming_fails_the_app_read(start, sock_path, tmp_path, how):
    server = start("--bind", sock_path, "--workers", "1", address=sock_path,
                   env={"TEST_READ_TIMEOUT": "1"})
    pid = server.fetch("/pid").body
    report = tmp_path / "report.txt"
    params = fc.cgi_params("POST", "/slowbody", query=str(report), body=b"x" * 100000)
    with fc.Client(sock_path, timeout=5) as client:
        client.send(fc.begin_request() + fc.stream(fc.PARAMS, 1, fc.pairs(params))
                    + fc.record(fc.STDIN, 1, b"x" * 1000))
        wait_until(report.exists, 5, "the app to read its body")
        if how == "close":
            client.close()
        else:
            assert client.read_until_closed() == b""  # after READ_TIMEOUT: no response
    reason = {"close": "the web server closed the connection",
              "silence": "the connection to the web server failed: no data from the web server for 1 s"}
    wait_until(lambda: "raised" in report.read_text(), 5, "the app's read to fail")
    assert report.read_text() == "reading\nraised ConnectionAbortedError: %s\n" % reason[how]
    assert server.fetch("/pid").body == pid
    if how == "silence":
        assert "closing a connection: no data from the web server for 1 s" in server.stderr
    else:
        assert "closing a connection" not in server.stderr
    assert "Traceback" not in server.stderr


TINYWEB_APP = r'''
import os

import tinyweb

app = tinyweb.App(__name__)


@app.post("/upload")
def upload(request):
    with open(os.environ["TEST_REPORT"], "a") as f:
        f.write("reading\n")
    return "%d bytes" % len(request.body)


@app.get("/pid")
def pid(request):
    return str(os.getpid())


@app.post("/echo")
def echo(request):
    return request.body


@app.post("/form")
def form(request):
    return dict(request.POST)


@app.get("/query")
def query(request):
    return request.GET.get("a", "")


app.run()
'''


def test_abort_while_a_tinyweb_handler_reads_the_body_logs_one_line(start, sock_path, tmp_path):
    (tmp_path / "app.py").write_text(TINYWEB_APP)
    report = tmp_path / "report.txt"
    server = start("--mode", "fcgi", "--bind", sock_path, "--workers", "1", address=sock_path,
                   env={"TEST_REPORT": str(report)})
    params = fc.cgi_params("POST", "/upload", body=b"x" * 100000, content_type="application/octet-stream")
    with fc.Client(sock_path, timeout=5) as client:
        client.send(fc.begin_request() + fc.stream(fc.PARAMS, 1, fc.pairs(params))
                    + fc.record(fc.STDIN, 1, b"x" * 1000))
        wait_until(report.exists, 5, "the handler to read the body")
        client.send(fc.abort_request())
        r = client.read_response()
        assert (r.stdout, r.protocol_status) == (b"", fc.REQUEST_COMPLETE)
    # tinyweb's Request.body answers the broken body with a 400, and says so in one line.
    lines = wait_until(lambda: [line for line in server.stderr.splitlines() if "/upload" in line],
                       5, "the log line")
    assert len(lines) == 1
    assert lines[0].endswith(
        "400 on POST /app.py/upload: The request body ended before its Content-Length.")
    assert "Traceback" not in server.stderr


def test_a_body_cut_short_by_a_departing_web_server_is_one_400_line(start, sock_path, tmp_path):
    # The app logs its 400 to wsgi.errors after the connection is gone: that write must not
    # fail the request a second time (it was logged as a 500 with a traceback).
    (tmp_path / "app.py").write_text(TINYWEB_APP)
    server = start("--mode", "fcgi", "--bind", sock_path, "--workers", "1", address=sock_path)
    params = fc.cgi_params("POST", "/echo", body=b"x" * 100, content_type="application/octet-stream")
    with fc.Client(sock_path, timeout=10) as client:
        client.send(fc.begin_request() + fc.stream(fc.PARAMS, 1, fc.pairs(params))
                    + fc.record(fc.STDIN, 1, b"x" * 10))
        client.sock.shutdown(socket.SHUT_WR)
        assert client.read_until_closed() == b""
    line = "400 on POST /app.py/echo: The request body ended before its Content-Length."
    wait_until(lambda: line in server.stderr, 5, "the log line")
    assert server.fetch("/pid").status == 200
    assert "500 on" not in server.stderr and "Traceback" not in server.stderr


@pytest.mark.parametrize("model", [["--workers", "1"], ["--threads", "2"]], ids=["workers", "threads"])
def test_spooled_bodies_are_closed_when_their_request_ends(start, sock_path, tmp_path, model):
    # WebOb spools a body over 10 KiB to a temporary file; flup's environ is a reference
    # cycle, so without an explicit close each file stayed open until the garbage collector
    # ran (tens at a time in an idle worker, each up to max_body of disk).
    (tmp_path / "app.py").write_text(TINYWEB_APP)
    server = start("--mode", "fcgi", "--bind", sock_path, *model, address=sock_path)
    worker = int(server.fetch("/pid").body)
    for n in range(30):
        body = bytes([n]) * 20000
        r = fc.fetch(sock_path, "/echo", method="POST", body=body, content_type="application/octet-stream")
        assert (r.status, r.body) == (200, body)
    spooled = [fd for fd in settled_fds(worker) if fd.endswith("(deleted)")]
    assert spooled == []


# --- a long mix of good and bad input: nothing leaks (notes/bad-inputs.md row 68) ----------

# 10 000 requests take ~2 s per process model on the 2-core test machine (~3 s a test).
SOAK_REQUESTS = 10000
SOAK_WARM_UP = 300
BAD_REQUEST_PAGE = (b"400 Bad Request\n\nThe server could not comply with the request since it is "
                    b"either malformed or otherwise incorrect.\n\n %s  ")
BAD_HTTP = [  # Client.request arguments, and the detail of the 400 page they get
    (dict(method="POST", path="/form", content_type="multipart/form-data",
          body=b"--x\r\nContent-Disposition: form-data; name=a\r\n\r\n1\r\n--x--\r\n"),
     b"The multipart form has no boundary."),
    (dict(path="/query", query="a=%ff%fe"), b"The query string is malformed or not UTF-8."),
    (dict(path="/\xff"), b"The path is not valid UTF-8."),  # PATH_INFO of the byte 0xff
    # Content-Length larger than the body, whose FCGI_STDIN stream ends.
    (dict(method="POST", path="/echo", body=b"x" * 10, params={"CONTENT_LENGTH": "100"}),
     b"The request body ended before its Content-Length."),
]


def open_fds(pid):
    """Return what the open fds of ``pid`` point to, sorted: paths, "socket:[inode]", ..."""
    out = []
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            out.append(os.readlink("/proc/%d/fd/%s" % (pid, fd)))
        except FileNotFoundError:
            pass  # closed meanwhile
    return sorted(out)


def settled_fds(pid, timeout=5.0):
    """Return open_fds(pid) once two readings 0.1 s apart agree: the worker has closed the
    connections its peers closed (within ``timeout``)."""
    deadline, previous = time.monotonic() + timeout, None
    while True:
        now = open_fds(pid)
        if now == previous or time.monotonic() > deadline:
            return now
        previous = now
        time.sleep(0.1)


class Mix:
    """Good and bad requests to TINYWEB_APP in a random but repeatable order, each checked as
    the web server sees it: the status and exact body, or the connection closed.

    Bad HTTP (notes/bad-inputs.md rows 1, 9, 10, 17), malformed FastCGI (46, 48), aborts (53),
    web servers that go away (54), kept-alive connections (52).
    """

    WEIGHTS = {"good": 30, "bad_http": 20, "kept": 8, "body_cut_then_close": 4, "garbage": 8,
               "abort": 6, "hang_up": 6}

    def __init__(self, address, seed, pid):
        self.address = address
        self.rng = random.Random(seed)
        self.pid = pid  # the worker's, as /pid answers it
        self.kinds = [kind for kind, weight in self.WEIGHTS.items() for _ in range(weight)]

    def run(self, n):
        """Send at least ``n`` requests."""
        sent = 0
        while sent < n:
            sent += getattr(self, self.rng.choice(self.kinds))()

    def client(self):
        return fc.Client(self.address, timeout=10)

    def check_good(self, client, keep_conn):
        """A GET or POST whose exact body is checked."""
        pick = self.rng.random()
        if pick < 0.4:
            # 20000 bytes: over WebOb's 10 KiB, so the body is spooled to a temporary file.
            body = self.rng.randbytes(self.rng.choice((0, 10, 1000, 20000)))
            r = client.request("POST", "/echo", body=body, content_type="application/octet-stream",
                               keep_conn=keep_conn)
        elif pick < 0.8:
            value = self.rng.choice(("plain", "zo\u00eb", "\u65e5\u672c")) + str(self.rng.randrange(1000))
            r = client.request("GET", "/query", query="a=" + quote(value), keep_conn=keep_conn)
            body = value.encode("utf-8")
        else:
            r = client.request("GET", "/pid", keep_conn=keep_conn)
            body = self.pid
        assert (r.status, r.body) == (200, body)

    def check_bad_http(self, client, keep_conn):
        kwargs, detail = self.rng.choice(BAD_HTTP)
        r = client.request(keep_conn=keep_conn, **kwargs)
        assert (r.status, r.body) == (400, BAD_REQUEST_PAGE % detail)

    def good(self):
        with self.client() as client:
            self.check_good(client, keep_conn=False)
        return 1

    def bad_http(self):
        with self.client() as client:
            self.check_bad_http(client, keep_conn=False)
        return 1

    def kept(self):
        """Several requests, good and bad, on one FCGI_KEEP_CONN connection."""
        n = self.rng.randint(2, 6)
        with self.client() as client:
            for _ in range(n):
                check = self.check_good if self.rng.random() < 0.7 else self.check_bad_http
                check(client, keep_conn=True)
        return n

    def body_cut_then_close(self):
        """Content-Length larger than the body, and the web server closes: its client went away."""
        params = fc.cgi_params("POST", "/echo", body=b"x" * 100, content_type="application/octet-stream")
        with self.client() as client:
            client.send(fc.begin_request() + fc.stream(fc.PARAMS, 1, fc.pairs(params))
                        + fc.record(fc.STDIN, 1, b"x" * 10))
            client.sock.shutdown(socket.SHUT_WR)
            assert client.read_until_closed() == b""
        return 1

    def garbage(self):
        """A malformed FastCGI record: the connection is closed."""
        name = self.rng.choice(sorted(BAD_INPUTS))
        with self.client() as client:
            client.send(BAD_INPUTS[name])
            if name == "truncated-record":
                client.sock.shutdown(socket.SHUT_WR)
            assert client.read_until_closed() == b"", name
        return 1

    def abort(self):
        """FCGI_ABORT_REQUEST before the app runs, or while it waits for its body."""
        keep_conn, while_reading = self.rng.random() < 0.5, self.rng.random() < 0.5
        params = fc.cgi_params("POST", "/echo", body=b"x" * 1000, content_type="application/octet-stream")
        with self.client() as client:
            client.send(fc.begin_request(flags=fc.KEEP_CONN if keep_conn else 0)
                        + fc.stream(fc.PARAMS, 1, fc.pairs(params))
                        + fc.record(fc.STDIN, 1, b"x" * self.rng.randint(1, 999)))
            if while_reading:
                # Records after the params are read only by the app's body read: the answer
                # to this one says the app is waiting for the rest of its body.
                client.send(fc.record(fc.GET_VALUES, 0, fc.pairs({"FCGI_MPXS_CONNS": ""})))
                assert client.next_record(time.monotonic() + 10).type == fc.GET_VALUES_RESULT
            client.send(fc.abort_request())
            r = client.read_response()
            assert (r.stdout, r.protocol_status) == (b"", fc.REQUEST_COMPLETE)
            if not keep_conn:
                assert client.read_until_closed() == b""
                return 1
            self.check_good(client, keep_conn=True)  # the connection carries on
        return 2

    def hang_up(self):
        """A request sent, and the connection closed before the response is read."""
        body = self.rng.randbytes(self.rng.choice((0, 20000)))
        with self.client() as client:
            client.send(fc.request(fc.cgi_params("POST", "/echo", body=body), body))
        return 1


@pytest.mark.parametrize("model", [["--workers", "1"], ["--threads", "4"]], ids=["workers", "threads"])
def test_a_long_mix_of_good_and_bad_input_leaks_nothing(start, sock_path, tmp_path, model):
    (tmp_path / "app.py").write_text(TINYWEB_APP)
    server = start("--mode", "fcgi", "--bind", sock_path, *model, address=sock_path)
    pid = server.fetch("/pid").body
    worker = int(pid)
    Mix(sock_path, 0, pid).run(SOAK_WARM_UP)  # imports, caches and malloc arenas settle
    fds, rss = settled_fds(worker), memory_kib(worker, "VmRSS")
    Mix(sock_path, 68, pid).run(SOAK_REQUESTS)
    assert server.fetch("/pid").body == pid  # the same worker: never replaced
    kids = children(server.pid)
    assert [child for child, _ in kids] == [worker] and kids[0][1] != "Z"
    assert children(worker) == []
    # The same fds, one for one (the threaded worker has 10: an epoll per thread; prefork 7).
    # A difference names them: "socket:[...]" for a connection, "/tmp/#... (deleted)" for a
    # body WebOb spooled.
    assert Counter(settled_fds(worker)) == Counter(fds)
    # Measured with the spooled bodies closed at the end of each request: +0.6-0.75 MiB for
    # prefork, +1.3-1.5 MiB threaded (an arena per thread). A leak of 1 KiB a request: +10 MiB.
    assert memory_kib(worker, "VmRSS") - rss < 4 * 1024
    stderr = server.stderr
    assert "Traceback" not in stderr, stderr[max(stderr.find("Traceback") - 300, 0):][:3000]


@pytest.mark.parametrize("keep_conn", [True, False], ids=["keep-conn", "close"])
@pytest.mark.parametrize("model", [["--workers", "1"], ["--threads", "2"]], ids=["workers", "threads"])
def test_abort_while_streaming_closes_the_app_iterable(start, sock_path, tmp_path, model, keep_conn):
    server = start("--bind", sock_path, *model, address=sock_path)
    (tmp_path / "go").write_text("")  # the generator streams without end
    with fc.Client(sock_path, timeout=5) as client:
        client.send(fc.request(fc.cgi_params(path="/stream", query=str(tmp_path)), keep_conn=keep_conn))
        client.read_stdout_until(b"more", time.monotonic() + 5)
        began = time.monotonic()
        client.send(fc.abort_request())
        r = client.read_response()  # the chunks already on their way, then END_REQUEST
        assert r.protocol_status == fc.REQUEST_COMPLETE
        assert time.monotonic() - began < 2
        assert (tmp_path / "closed").read_text() == "closed\n"  # before END_REQUEST
        if keep_conn:
            assert client.request("GET", "/", keep_conn=True).body == b"hello"
        else:
            assert client.read_until_closed() == b""
    assert "Traceback" not in server.stderr


@pytest.mark.parametrize("how", ["tcp-fin", "tcp-rst", "unix-close"])
def test_web_server_closing_mid_response_closes_the_app_iterable(start, sock_path, tmp_path, how):
    if how.startswith("tcp"):
        port = free_port()
        address = ("127.0.0.1", port)
        server = start("--bind", ":%d" % port, "--workers", "1", address=address)
    else:
        address = sock_path
        server = start("--bind", sock_path, "--workers", "1", address=address)
    pid = server.fetch("/pid").body
    client = fc.Client(address, timeout=5)
    client.send(fc.request(fc.cgi_params(path="/stream", query=str(tmp_path))))
    # Everything sent so far is read: closing now sends a FIN, not a reset.
    client.read_stdout_until(b"first\n", time.monotonic() + 5)
    if how == "tcp-rst":
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()
    (tmp_path / "go").write_text("")  # the app writes again, into a closed connection
    wait_until(lambda: (tmp_path / "closed").exists(), 5, "the generator's close()")
    assert server.fetch("/pid").body == pid  # the worker serves on
    assert "Traceback" not in server.stderr
    assert "closing a connection" not in server.stderr  # a web server going away is normal


# --- after the response -------------------------------------------------------------------


@pytest.mark.parametrize("model", [["--workers", "1"], ["--threads", "2"]], ids=["workers", "threads"])
def test_after_response_tasks_run_after_end_request(start, sock_path, tmp_path, model):
    server = start("--bind", sock_path, *model, address=sock_path)
    marker = tmp_path / "after.txt"
    began = time.monotonic()
    r = server.fetch("/after", query=str(marker))
    answered = time.monotonic() - began
    assert (r.status, r.body, r.protocol_status) == (200, b"queued", fc.REQUEST_COMPLETE)
    assert answered < 0.9 and not marker.exists()
    wait_until(marker.exists, 5, "the after-response task")
    assert time.monotonic() - began >= 1.0
    wait_until(lambda: "done" in marker.read_text(), 2, "the file to be written")
    # The failing task was logged with its traceback, and did not stop the next one.
    assert "deferred task __main__.app.<locals>.failing failed" in server.stderr
    assert "ValueError: task failed on purpose" in server.stderr


# --- dynamic mode: the socket on stdin (mod_fcgid, spawn-fcgi) -----------------------------


def test_listening_socket_on_stdin_is_detected_and_served(start, sock_path):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path)
    listener.listen(16)
    try:
        server = start(stdin=listener, ready=False)  # no flags at all
    finally:
        listener.close()
    server.address = sock_path
    r = server.fetch("/env")
    env = json.loads(r.body)
    assert (env["tinyweb.mode"], env["wsgi.multiprocess"], env["wsgi.multithread"]) == (
        "fcgi", True, False)
    assert int(server.fetch("/pid").body) == server.pid  # served in the process itself
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(server.fetch, "/sleep", query="1")
        time.sleep(0.3)
        server.signal(signal.SIGTERM)
        assert pending.result(timeout=10).status == 200
    assert server.wait_exit(10) == 0
    assert os.path.exists(sock_path)  # the process manager's socket: not ours to remove


def test_fcgi_without_bind_or_socket_on_stdin_is_a_usage_error(start):
    server = start("--mode", "fcgi", ready=False)
    assert server.wait_exit() == 2
    assert "stdin is not one; give --bind PATH or --bind :PORT" in server.stderr


def test_a_worker_never_imports_argparse(tmp_path, start):
    # Options are read without argparse and gettext, which would stay in every worker's
    # memory for good (bench/README.md, worker RSS).
    (tmp_path / "app.py").write_text(APP_REPORTING_MODULES)
    sock = str(tmp_path / "app.sock")
    server = start("--mode", "fcgi", "--bind", "unix:" + sock, "--socket-mode", "0600",
                   "--workers", "1", "--max-requests=1000", address=sock)
    response = server.fetch("/")
    assert (response.status, response.body) == (200, b"loaded: tinyweb.runners.prefork")


APP_REPORTING_MODULES = """
import sys
import tinyweb

app = tinyweb.App(__name__)


@app.get("/")
def index(request):
    names = ("argparse", "gettext", "tinyweb.runners.prefork")
    return "loaded: " + " ".join(name for name in names if name in sys.modules)


app.run()
"""
