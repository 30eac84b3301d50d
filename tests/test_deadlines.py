"""request_timeout: a hung handler gets a 503 (or its stream is cut off) and its process is recycled.

In process first (the Guard and the Alarm on the test's own main thread, the Scoreboard
across a fork), then the same app file run for real: as a CGI script, by the warm CGI
worker, and as a FastCGI server in each process model. Every wait has a deadline; every
server is stopped by its process group (test_fcgi.Server), every CGI worker by pid. The
bounds are wide (this machine is shared): a 1 s deadline must answer within 8 s, and no
test asserts a lower bound under the deadline itself.
"""

import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import fcgi_client as fc
import test_persistent as persistent
from helpers import CHECKOUT, SECRET, Client, cgi_environ, clean_env, make_site, run_cgi, split_cgi  # noqa: F401
from test_fcgi import Server, wait_until
from tinyweb import App
from tinyweb.deadline import Alarm, Guard, RequestTimeout, Scoreboard

ANSWER_WITHIN = 8.0  # seconds, for a 1 s request_timeout

SITE_APP = r'''
import os
import signal
import time

import tinyweb
import tinyweb.runners.prefork as prefork

# Knobs for the tests: shorter than production.
prefork.STUCK_GRACE = float(os.environ.get("TEST_STUCK_GRACE", prefork.STUCK_GRACE))
prefork.SHUTDOWN_GRACE = float(os.environ.get("TEST_GRACE", prefork.SHUTDOWN_GRACE))

app = tinyweb.App(__name__)


@app.get("/pid")
def pid(request):
    return str(os.getpid())


@app.get("/sleep/{seconds}")
def sleep(request, seconds):
    try:
        time.sleep(float(seconds))
    except Exception:  # RequestTimeout is a BaseException: this does not swallow it
        return "swallowed"
    return "slept %s in %d" % (seconds, os.getpid())


@app.get("/loop")
def loop(request):
    while True:
        pass


@app.get("/stream")
def stream(request):
    yield "first chunk\n"
    time.sleep(30)
    yield "second chunk\n"


@app.get("/trickle")
def trickle(request):
    # Each chunk within the deadline, the whole well past it.
    for n in range(6):
        time.sleep(0.4)
        yield "chunk %d\n" % n


@app.get("/stuck")
def stuck(request):
    # A handler stuck where SIGALRM cannot reach it, as C code that never returns would be.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    time.sleep(30)
    return "never"


@app.get("/gil")
def gil(request):
    # C code holding the GIL (ctypes.PyDLL does not release it): no other thread runs either.
    import ctypes

    ctypes.PyDLL(None).sleep(30)
    return "never"


def mark(path):
    path.write_text("ran")


@app.get("/defer-then-sleep/{seconds}")
def defer_then_sleep(request, seconds):
    # The task would leave a file behind; the handler then sleeps, past the deadline or not.
    data = request.app.config.data_dir
    data.mkdir(exist_ok=True)
    request.defer(mark, data / ("ran-after-" + seconds))
    time.sleep(float(seconds))
    return "slept"


@app.get("/log-flood")
def log_flood(request):
    # More than the socket holds, to a web server that reads nothing: the thread blocks
    # writing FCGI_STDERR.
    request.environ["wsgi.errors"].write("x" * 2000000)
    request.environ["wsgi.errors"].flush()
    return "flooded"


@app.get("/sleep-then-log/{seconds}")
def sleep_then_log(request, seconds):
    time.sleep(float(seconds))
    request.environ["wsgi.errors"].write("a line the handler logged once it woke\n")
    return "slept"


@app.get("/alarm")
def alarm(request):
    return {"handler": repr(signal.getsignal(signal.SIGALRM)),
            "timer": signal.getitimer(signal.ITIMER_REAL)[0]}


app.run()
'''


@pytest.fixture
def site(tmp_path):
    """Write the app file, and return a function that writes its tinyweb.ini (request_timeout)."""
    root = make_site(tmp_path, SITE_APP, None)

    def configure(timeout):
        (root / "tinyweb.ini").write_text(
            "[tinyweb]\nsecret = %s\nrequest_timeout = %s\n" % (SECRET, timeout))
        return root

    return configure


# --- in process ---------------------------------------------------------------------------


@pytest.fixture
def alarm():
    """An Alarm on this (the main) thread, taken back after the test."""
    made = []

    def make(seconds):
        timer = Alarm(seconds)
        timer.install()
        made.append(timer)
        return timer

    before = signal.getsignal(signal.SIGALRM)
    yield make
    for timer in made:
        timer.uninstall()
    assert signal.getsignal(signal.SIGALRM) == before
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def _app():
    app = App(__name__, secret=SECRET)

    @app.get("/sleep")
    def sleep(request):
        try:
            time.sleep(10)
        except Exception:
            return "swallowed"
        return "slept"

    @app.get("/trickle")
    def trickle(request):
        for n in range(4):
            time.sleep(0.3)
            yield "chunk %d\n" % n

    @app.get("/hello")
    def hello(request):
        return "hello"

    return app


def test_the_app_alone_never_touches_sigalrm(clean_env):
    before = signal.getsignal(signal.SIGALRM)
    assert Client(_app()).get("/hello").body == b"hello"
    assert signal.getsignal(signal.SIGALRM) == before
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_guarded_app_answers_503_and_disarms(clean_env, alarm):
    timer = alarm(0.3)
    client = Client(Guard(_app(), timer))
    began = time.monotonic()
    res = client.get("/sleep", status=503, expect_errors=True)
    assert time.monotonic() - began < 5
    assert b"The request took too long." in res.body and b"Traceback" not in res.body
    assert "503 on GET /sleep: the request ran past request_timeout (0.3 s)" in res.errors
    assert "time.sleep(10)" in res.errors  # the traceback shows where it was stuck
    assert timer.fired
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert client.get("/hello").body == b"hello"


def test_streamed_chunks_each_get_the_whole_deadline(clean_env, alarm):
    client = Client(Guard(_app(), alarm(1.0)))
    res = client.get("/trickle")  # 1.2 s in all, 0.3 s a chunk
    assert res.body == b"chunk 0\nchunk 1\nchunk 2\nchunk 3\n"
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_guard_answers_503_for_a_plain_wsgi_callable(alarm):
    def plain(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        time.sleep(10)
        return [b"never"]

    res = Client(Guard(plain, alarm(0.3))).get("/", status=503, expect_errors=True)
    assert b"The request took too long." in res.body
    assert "503 on GET /: the request ran past request_timeout (0.3 s)" in res.errors


def test_request_timeout_is_a_base_exception():
    assert not issubclass(RequestTimeout, Exception)


def test_scoreboard_is_shared_with_a_forked_child():
    board = Scoreboard(2)
    slot = board.take()
    pid = os.fork()
    if pid == 0:
        board.post(slot, 1234.5, 1000.25, b"GET /x?\n\x1b" + b"y" * 200)
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    kill_at, since, line = board.read(slot)
    assert (kill_at, since) == (1234.5, 1000.25)
    assert line.startswith("GET /x?\\x0a\\x1byyy") and line.count("y") == Scoreboard.LINE - 9
    board.post(slot, 0.0)
    assert board.read(slot)[0] == 0.0
    board.release(slot)
    assert board.read(slot) == (0.0, 0.0, "")


# --- CGI ------------------------------------------------------------------------------------


def _cgi(root, path):
    began = time.monotonic()
    out = run_cgi(root / "htdocs" / "app.py", cgi_environ(path, PYTHONPATH=str(CHECKOUT)), timeout=60)
    return out, time.monotonic() - began


@pytest.mark.parametrize("path, where", [("/sleep/30", "time.sleep(float(seconds))"),
                                         ("/loop", "while True:")], ids=["sleep", "loop"])
def test_cgi_hung_handler_answers_503(site, path, where):
    out, seconds = _cgi(site(1), path)
    assert seconds < ANSWER_WITHIN
    status, headers, body = split_cgi(out.stdout)
    assert status == "503 Service Unavailable"
    assert b"The request took too long." in body
    assert b"Traceback" not in body and b"swallowed" not in body
    err = out.stderr.decode()
    assert "503 on GET /app.py%s: the request ran past request_timeout (1 s)" % path in err
    assert "Traceback (most recent call last)" in err and where in err


def test_cgi_tasks_of_a_timed_out_request_are_dropped(site):
    root = site(1)
    out, _ = _cgi(root, "/defer-then-sleep/30")
    assert split_cgi(out.stdout)[0] == "503 Service Unavailable"
    assert ("503 on GET /app.py/defer-then-sleep/30: the request ran past request_timeout (1 s) "
            "(1 deferred task dropped)\nTraceback") in out.stderr.decode()
    # The same task of a request that completes runs; by then the other's would have too.
    out, _ = _cgi(root, "/defer-then-sleep/0")
    assert split_cgi(out.stdout)[::2] == ("200 OK", b"slept")
    wait_until(lambda: (root / "data" / "ran-after-0").exists(), 10, "the task to run")
    assert not (root / "data" / "ran-after-30").exists()


def test_cgi_stream_whose_next_chunk_never_comes_is_cut_off(site):
    out, seconds = _cgi(site(1), "/stream")
    assert seconds < ANSWER_WITHIN
    status, headers, body = split_cgi(out.stdout)
    assert status == "200 OK"  # the headers were out before the deadline passed
    assert body == b"first chunk\n"
    err = out.stderr.decode()
    assert "response cut off on GET /app.py/stream: the request ran past request_timeout (1 s)" in err
    assert err.count("Traceback") == 1  # ours, not wsgiref's too


def test_cgi_stream_of_timely_chunks_runs_past_the_deadline(site):
    out, _ = _cgi(site(1), "/trickle")
    assert split_cgi(out.stdout)[2] == b"".join(b"chunk %d\n" % n for n in range(6))
    assert out.stderr == b""


@pytest.mark.parametrize("mode", ["cgi", "fcgi"])
def test_request_timeout_0_never_interrupts(site, start, tmp_path, mode):
    root = site(0)
    if mode == "cgi":
        out, _ = _cgi(root, "/sleep/3")
        status, _, body = split_cgi(out.stdout)
        assert (status, body[:8]) == ("200 OK", b"slept 3 ")
        out, _ = _cgi(root, "/alarm")
        alarm = split_cgi(out.stdout)[2]
    else:
        server = _fcgi(start, tmp_path, root, "--workers", "1")
        r = server.fetch("/sleep/3", timeout=20)
        assert (r.status, r.body[:8]) == (200, b"slept 3 ")
        alarm = server.fetch("/alarm").body
    assert alarm == b'{"handler":"<Handlers.SIG_DFL: 0>","timer":0.0}'


def test_warm_cgi_worker_answers_503_and_retires(tmp_path):
    site = persistent.make_site(tmp_path, "cgi_worker = on\nrequest_timeout = 1\n")
    try:
        worker = persistent.warm_up(site)
        began = time.monotonic()
        response = site.request("/slow")  # sleeps 3 s
        assert time.monotonic() - began < ANSWER_WITHIN
        assert response.status == "503 Service Unavailable", response
        assert b"The request took too long." in response.body
        persistent.wait_gone(worker)  # retired: its state may be half-updated
        log = (site.root / "data" / "worker.log").read_text()
        assert "503 on GET /app.py/slow: the request ran past request_timeout (1 s)" in log
        assert "retiring this worker" in log
        assert site.get_json("/who")["warm"] is False  # served cold, and a fresh worker starts
        persistent.wait_for_worker(site, not_pids=(worker,))
    finally:
        persistent.stop_workers(site.app, site.runtime)


# --- FastCGI --------------------------------------------------------------------------------


@pytest.fixture
def start(tmp_path):
    """Start FastCGI servers for a test; stop each by its process group afterwards."""
    started = []

    def _start(*args, **kwargs):
        server = Server(tmp_path, args, name="server%d" % len(started), **kwargs)
        started.append(server)
        return server

    yield _start
    for server in started:
        server.kill_group()


def _fcgi(start, tmp_path, root, *model, env=None, stdin=None):
    """Start the site's app.py as a FastCGI server on a unix socket (or the socket on stdin)."""
    sock = str(tmp_path / "app.sock")
    # test_fcgi.Server runs tmp_path/app.py: this site's, with its tinyweb.ini beside htdocs/.
    (tmp_path / "app.py").write_text(SITE_APP)
    env = dict(env or {}, TINYWEB_CONFIG=str(root / "tinyweb.ini"))
    if stdin is not None:
        server = start(stdin=stdin, env=env)
        server.address = sock
        return server
    server = start("--bind", sock, *model, address=sock, env=env)
    return server.wait_ready()


def _fcgi_on_stdin(start, tmp_path, root, env=None):
    """Start the site's app.py with a listening socket on stdin, as mod_fcgid spawns it."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "app.sock"))
    listener.listen(16)
    try:
        return _fcgi(start, tmp_path, root, stdin=listener, env=env)
    finally:
        listener.close()


def _pid(server):
    return int(server.fetch("/pid").body)


def test_fcgi_hung_handler_answers_503_and_the_worker_is_recycled(site, start, tmp_path):
    server = _fcgi(start, tmp_path, site(1), "--workers", "1")
    first = _pid(server)
    began = time.monotonic()
    r = server.fetch("/sleep/30", timeout=20)
    assert time.monotonic() - began < ANSWER_WITHIN
    assert r.status == 503 and b"The request took too long." in r.body
    assert b"Traceback" not in r.body
    assert b"503 on GET /app.py/sleep/30" in r.stderr  # FCGI_STDERR: the web server's error log
    wait_until(lambda: _pid(server) != first, 10, "a fresh worker")
    assert "this worker stops and a fresh one takes over" in server.stderr
    assert "Traceback" in server.stderr and "time.sleep(float(seconds))" in server.stderr
    assert server.fetch("/sleep/0.1").status == 200  # and the new one serves on


def test_fcgi_stream_is_cut_off_without_end_request(site, start, tmp_path):
    server = _fcgi(start, tmp_path, site(1), "--workers", "1")
    first = _pid(server)
    with fc.Client(server.address, timeout=20) as client:
        client.send(fc.request(fc.cgi_params(path="/stream")))
        began = time.monotonic()
        raw = client.read_until_closed()
        assert time.monotonic() - began < ANSWER_WITHIN
    records = fc.Decoder().feed(raw)
    stdout = b"".join(rec.content for rec in records if rec.type == fc.STDOUT)
    assert b"first chunk\n" in stdout and b"second" not in stdout
    # No FCGI_END_REQUEST: the web server sees the response end short (nginx: "upstream
    # prematurely closed connection"), not a whole page.
    assert fc.END_REQUEST not in [rec.type for rec in records]
    wait_until(lambda: "the response was cut off" in server.stderr, 5, "the log line")
    wait_until(lambda: _pid(server) != first, 10, "a fresh worker")


def test_fcgi_handler_stuck_in_c_is_killed_by_the_supervisor(site, start, tmp_path):
    server = _fcgi(start, tmp_path, site(1), "--workers", "1", env={"TEST_STUCK_GRACE": "1"})
    first = _pid(server)
    with fc.Client(server.address, timeout=20) as client:
        client.send(fc.request(fc.cgi_params(path="/stuck")))
        began = time.monotonic()
        assert client.read_until_closed() == b""  # killed: no 503 possible
        assert time.monotonic() - began < 10  # 1 s + 1 s grace + the supervisor's 1 s scan
    wait_until(lambda: "worker %d stuck in GET /app.py/stuck for" % first in server.stderr, 5,
               "the supervisor's line")
    assert "killed it, starting another" in server.stderr
    assert "was killed by signal" not in server.stderr  # one line, not two
    assert _pid(server) != first
    assert server.proc.poll() is None


def test_fcgi_threads_watchdog_answers_503_and_restarts_the_process_after_the_others_finish(
        site, start, tmp_path):
    server = _fcgi(start, tmp_path, site(3), "--threads", "4", env={"TEST_GRACE": "3"})
    first = _pid(server)
    with ThreadPoolExecutor(3) as pool:
        began = time.monotonic()
        hung = pool.submit(server.fetch, "/sleep/30", timeout=30)
        time.sleep(2.5)
        # In flight when the hung one passes its deadline (3 s, seen within a 0.75 s tick),
        # each well within its own.
        others = [pool.submit(server.fetch, "/sleep/2", timeout=30) for _ in range(2)]
        # A thread cannot be interrupted: the watchdog answers for it, at its deadline.
        r = hung.result(timeout=30)
        assert time.monotonic() - began < 3 + ANSWER_WITHIN
        assert r.status == 503 and b"The request took too long." in r.body
        assert ("Content-Type", "text/html; charset=utf-8") in r.headers
        for other in others:
            r = other.result(timeout=30)
            assert (r.status, r.body) == (200, b"slept 2 in %d" % first)
    assert "503 on GET /app.py/sleep/30: the request ran past request_timeout (3 s); its thread " \
           "runs on, and nothing more it writes goes out" in server.stderr
    assert "GET /app.py/sleep/30 has run for" in server.stderr
    assert "answered 503; threads cannot be interrupted" in server.stderr
    wait_until(lambda: _pid(server) != first, 15, "a fresh process")
    assert "1 request(s) still running after 3 s; exiting without them" in server.stderr
    assert server.proc.poll() is None


def test_fcgi_threads_late_output_of_an_answered_request_never_goes_out(site, start, tmp_path):
    # The handler returns at 3 s, past its 1 s deadline and the watchdog's 503: what it
    # writes then is dropped, and its connection (kept alive) was closed with the 503.
    server = _fcgi(start, tmp_path, site(1), "--threads", "2", env={"TEST_GRACE": "10"})
    first = _pid(server)
    with fc.Client(server.address, timeout=20) as client:
        r = client.request(path="/sleep/3", keep_conn=True)
        assert r.status == 503 and b"The request took too long." in r.body
        assert (r.app_status, r.protocol_status) == (0, fc.REQUEST_COMPLETE)
        assert client.read_until_closed() == b""  # no "slept 3", no second FCGI_END_REQUEST
    # The worker waits for its stuck thread to return, then exits: a fresh one takes over.
    wait_until(lambda: _pid(server) != first, 15, "a fresh process")
    assert server.stderr.count("503 on GET /app.py/sleep/3: the request ran past") == 1
    assert "Traceback" not in server.stderr


def test_fcgi_threads_watchdog_answers_while_another_thread_is_stuck_writing(site, start, tmp_path):
    # One thread blocks writing to a web server that reads nothing (holding its connection's
    # write lock); the watchdog must still answer the other, and go on beating.
    server = _fcgi(start, tmp_path, site(1), "--threads", "2")
    with fc.Client(server.address, timeout=30) as flood:
        flood.send(fc.request(fc.cgi_params(path="/log-flood")))
        time.sleep(0.5)
        began = time.monotonic()
        r = server.fetch("/sleep/30", timeout=30)
        assert r.status == 503 and b"The request took too long." in r.body
        assert time.monotonic() - began < ANSWER_WITHIN


def test_fcgi_threads_socket_on_stdin_keeps_what_an_answered_request_logged(site, start, tmp_path):
    # Under mod_fcgid wsgi.errors is only FCGI_STDERR, buffered until the request ends: after
    # the watchdog's 503 the connection is shut, and the lines go to our stderr instead.
    server = _fcgi_on_stdin(start, tmp_path, site(1), env={"TINYWEB_THREADS": "2"})
    r = server.fetch("/sleep-then-log/3", timeout=20)
    assert r.status == 503
    wait_until(lambda: "a line the handler logged once it woke" in server.stderr, 10,
               "the handler's line, once it returns")
    assert "503 on GET /app.py/sleep-then-log/3: the request ran past request_timeout" in server.stderr


def test_fcgi_threads_stream_that_began_is_cut_off_when_the_worker_exits(site, start, tmp_path):
    server = _fcgi(start, tmp_path, site(1), "--threads", "2", env={"TEST_GRACE": "1"})
    with fc.Client(server.address, timeout=20) as client:
        client.send(fc.request(fc.cgi_params(path="/stream")))
        raw = client.read_until_closed()
    records = fc.Decoder().feed(raw)
    stdout = b"".join(rec.content for rec in records if rec.type == fc.STDOUT)
    assert b"first chunk\n" in stdout and b"503" not in stdout  # its headers were out: no 503
    assert fc.END_REQUEST not in [rec.type for rec in records]
    assert "GET /app.py/stream has run for" in server.stderr
    assert "answered 503" not in server.stderr


def test_fcgi_threads_process_holding_the_gil_is_killed_by_the_supervisor(site, start, tmp_path):
    # The watchdog cannot run either: its heartbeat on the scoreboard stops, and the
    # supervisor kills the process STUCK_GRACE after the deadline that heartbeat posted.
    server = _fcgi(start, tmp_path, site(1), "--threads", "2", env={"TEST_STUCK_GRACE": "1"})
    first = _pid(server)
    with fc.Client(server.address, timeout=20) as client:
        client.send(fc.request(fc.cgi_params(path="/gil")))
        began = time.monotonic()
        assert client.read_until_closed() == b""
        assert time.monotonic() - began < 10
    wait_until(lambda: "worker %d stuck in" % first in server.stderr, 5, "the supervisor's line")
    assert _pid(server) != first


def test_fcgi_socket_on_stdin_answers_503_then_exits_for_a_fresh_process(site, start, tmp_path):
    server = _fcgi_on_stdin(start, tmp_path, site(1))
    r = server.fetch("/sleep/30", timeout=20)
    assert r.status == 503
    # mod_fcgid spawns another process for the next request.
    assert server.wait_exit(10) == 0
    assert "this worker stops and a fresh one takes over" in server.stderr
