"""The FastCGI gateway, run in real processes: an app file started with ``--mode fcgi``.

Each test writes a plain WSGI app (no tinyweb core), starts it in its own session, waits for
its socket with a deadline, talks FastCGI to it with ``fcgi_client`` and stops it by process
group. Nothing here waits without a deadline.
"""

import grp
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import fcgi_client as fc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_TIMEOUT = 15.0
STOP_TIMEOUT = 15.0

APP = r'''
import json, os, sys, time

import tinyweb.runners.fcgi as fcgi
import tinyweb.runners.prefork as prefork

# Knobs for the tests: shorter timeouts than production.
fcgi.READ_TIMEOUT = float(os.environ.get("TEST_READ_TIMEOUT", fcgi.READ_TIMEOUT))
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
    else:
        out = b"hello"
    start_response("200 OK", [("Content-Type", ctype), ("X-Path", path)])
    return [out]


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
        for chunk in (1, 3, 65535):
            r = client.request("POST", "/echo", body=body, content_type="x/y", keep_conn=True,
                               chunk=chunk)
            assert (r.status, r.body) == (200, b"POST x/y 8\n" + body)
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


def test_oversized_params_close_the_connection(start, sock_path):
    server = start("--bind", sock_path, "--workers", "1", address=sock_path)
    with fc.Client(sock_path) as client:
        try:
            client.send(fc.begin_request() + fc.record(fc.PARAMS, 1, b"\x01" * 65535) * 17)
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed while we were still sending: what we want
        assert client.read_until_closed() == b""
    assert server.fetch("/").body == b"hello"
    wait_until(lambda: "FCGI_PARAMS over 1048576 bytes" in server.stderr, 5, "the log line")


def test_silent_connection_is_closed_after_the_read_timeout(start, sock_path):
    server = start("--bind", sock_path, "--workers", "1", address=sock_path,
                   env={"TEST_READ_TIMEOUT": "1"})
    began = time.monotonic()
    with fc.Client(sock_path, timeout=10) as client:
        assert client.read_until_closed() == b""
    assert 0.8 < time.monotonic() - began < 5
    assert server.fetch("/").body == b"hello"
    assert "no request within 1 s" in server.stderr


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
