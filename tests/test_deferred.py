"""``request.defer``: in-process under a plain WSGI caller, the FastCGI workers' TaskPool, then
real processes: a CGI script whose web server must not wait for the task, and a FastCGI
server whose next request must not wait for it. Every wait has a deadline.
"""

import io
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from urllib.parse import urlencode

import pytest
import webob

from helpers import CHECKOUT, SECRET, cgi_environ, clean_env, make_site, run_wsgi, split_cgi  # noqa: F401  (fixture)
from test_fcgi import sock_path, start, wait_until  # noqa: F401  (fixtures)
from tinyweb import App
from tinyweb.deferred import MAX_PENDING, TaskPool, TooManyTasks
from tinyweb.request import Request

BOOM = "the deferred task failed on purpose"


def record(events, *args, **kwargs):
    events.append(("task", args, kwargs))


def failing(events):
    raise ValueError(BOOM)


def exiting(events):
    sys.exit(3)


# --- in-process: the task runs when the server closes the response -------------------------


@pytest.fixture
def app(clean_env, tmp_path):
    app = App(__name__, secret=SECRET, data_dir=str(tmp_path / "data"))

    @app.get("/defer")
    def defer(request):
        events = request.environ["test.events"]
        request.defer(record, events, 1, "two", three=3)
        events.append("handler")
        return "queued"

    def chunks(events):
        events.append("chunk 1")
        yield "one "
        events.append("chunk 2")
        yield "two"

    @app.get("/stream")
    def stream(request):
        request.defer(record, request.environ["test.events"])
        return chunks(request.environ["test.events"])

    @app.get("/stream-defers")
    def stream_defers(request):
        # A generator handler: its body, defer() included, runs only as the server iterates it.
        request.defer(record, request.environ["test.events"], "first")
        yield from chunks(request.environ["test.events"])
        request.defer(record, request.environ["test.events"], "while streaming")

    @app.get("/fail")
    def fail(request):
        events = request.environ["test.events"]
        request.defer(failing, events)
        request.defer(exiting, events)
        request.defer(record, events, "after")
        return "queued"

    @app.get("/many")
    def many(request):
        events = request.environ["test.events"]
        n = int(request.GET["n"])
        for i in range(n):
            if request.GET.get("catch"):
                try:
                    request.defer(record, events, i)
                except TooManyTasks as exc:
                    return "refused task %d: %s" % (i + 1, exc), 503
            else:
                request.defer(record, events, i)
        return "queued"

    @app.get("/defer-then-raise")
    def defer_then_raise(request):
        events = request.environ["test.events"]
        request.defer(record, events, "receipt")
        request.defer(record, events, "mail")
        raise RuntimeError("the order could not be saved")

    @app.get("/not-callable")
    def not_callable(request):
        request.defer("not a function")
        return "queued"

    return app


def environ_for(path, events):
    environ = webob.Request.blank(path).environ
    environ["test.events"] = events
    environ["wsgi.errors"] = io.StringIO()
    return environ


def call(app, path, events):
    """Run ``app`` through wsgiref's validator to the body's close(); return (status, body, log)."""
    return run_wsgi(app, environ_for(path, events))


def test_the_task_runs_when_the_server_closes_the_body_not_before(app):
    events = []
    environ = environ_for("/defer", events)
    body = app(environ, lambda status, headers, exc_info=None: None)
    assert events == ["handler"]
    assert b"".join(body) == b"queued"
    assert events == ["handler"]  # the client has the whole body; the task has not run
    body.close()
    assert events == ["handler", ("task", (1, "two"), {"three": 3})]


def test_a_streamed_body_reaches_the_client_whole_before_the_task(app):
    events = []
    environ = environ_for("/stream", events)
    response = webob.Request(environ).get_response(app)
    assert response.body == b"one two"
    assert events == ["chunk 1", "chunk 2", ("task", (), {})]


def test_a_task_deferred_by_a_generator_handler_runs_at_close(app):
    events = []
    response = webob.Request(environ_for("/stream-defers", events)).get_response(app)
    assert response.body == b"one two"
    assert events == ["chunk 1", "chunk 2", ("task", ("first",), {}),
                      ("task", ("while streaming",), {})]


def test_a_failing_task_is_logged_with_its_traceback_and_the_next_one_runs(app):
    events = []
    status, body, log = call(app, "/fail", events)
    assert (status, body) == ("200 OK", b"queued")
    assert events == [("task", ("after",), {})]
    assert "tinyweb: deferred task test_deferred.failing failed\nTraceback" in log
    assert "ValueError: %s" % BOOM in log
    # sys.exit() in a task ends that task, not the server.
    assert "tinyweb: deferred task test_deferred.exiting failed\nTraceback" in log
    assert "SystemExit: 3" in log


def test_the_17th_task_of_a_request_is_refused_with_a_500(app):
    events = []
    status, body, log = call(app, "/many?n=%d" % MAX_PENDING, events)
    assert status == "200 OK" and len(events) == MAX_PENDING
    events = []
    status, body, log = call(app, "/many?n=%d" % (MAX_PENDING + 1), events)
    assert status == "500 Internal Server Error"
    assert "TooManyTasks: 16 deferred tasks are already pending in this process (at most 16)" in log
    assert events == []  # the request failed: the 16 it queued are dropped with it
    assert " on GET /many?n=17 (16 deferred tasks dropped)\nTraceback" in log


def test_tasks_of_a_handler_that_raises_are_dropped_with_a_500(app):
    # A task follows a response (the receipt for an order taken); a 500 is no such response.
    events = []
    status, body, log = call(app, "/defer-then-raise", events)
    assert status == "500 Internal Server Error"
    assert events == []
    assert "500 on GET /defer-then-raise (2 deferred tasks dropped)\nTraceback" in log
    assert "RuntimeError: the order could not be saved" in log


def test_a_handler_can_catch_too_many_tasks_and_answer_503(app):
    events = []
    status, body, log = call(app, "/many?catch=1&n=%d" % (MAX_PENDING + 1), events)
    assert status == "503 Service Unavailable"
    assert body.startswith(b"refused task 17: 16 deferred tasks are already pending")
    assert len(events) == MAX_PENDING  # what was queued before the refusal still runs
    assert log == ""


def test_defer_needs_a_callable(app):
    with pytest.raises(TypeError, match="defer\\(\\) needs a callable, not 'x'"):
        Request.blank("/").defer("x")
    status, _, log = call(app, "/not-callable", [])
    assert status == "500 Internal Server Error"
    assert "TypeError: defer() needs a callable" in log


def test_a_gateway_owns_the_tasks_when_it_gives_a_list_and_a_room(app):
    events = []
    environ = environ_for("/many?catch=1&n=3", events)
    tasks = environ["tinyweb.after_response"] = []
    environ["tinyweb.defer_room"] = 2  # 14 are pending in this process already
    response = webob.Request(environ).get_response(app)
    assert response.status_int == 503
    assert response.text.startswith("refused task 3: 16 deferred tasks are already pending")
    assert len(tasks) == 2 and events == []  # left for the gateway, not run at close()
    tasks[0]()
    assert events == [("task", (0,), {})]


# --- TaskPool: a FastCGI worker's tasks ----------------------------------------------------


def test_the_pool_runs_a_requests_tasks_in_order_while_the_submitter_goes_on():
    pool, log, gate = TaskPool(threads=2), [], threading.Event()
    pool.submit([lambda: gate.wait(5), lambda: log.append(1), lambda: log.append(2)])
    pool.submit([lambda: log.append("other request")])
    # The submitter is not held by the blocked task, and another request's tasks run meanwhile.
    wait_until(lambda: log == ["other request"], 5, "the second request's task")
    gate.set()
    assert pool.drain(5) == 0
    assert log == ["other request", 1, 2]


def test_room_shrinks_while_tasks_are_pending_and_grows_back():
    pool, gate = TaskPool(threads=1, limit=4), threading.Event()
    assert pool.room() == 4
    pool.submit([lambda: gate.wait(5), lambda: None])
    pool.submit([lambda: None])
    assert pool.room() == 1
    gate.set()
    assert pool.drain(5) == 0
    assert pool.room() == 4
    pool.submit([])  # nothing to queue: no thread is started for it
    assert pool.room() == 4


def test_drain_waits_up_to_its_timeout_and_says_how_many_are_left():
    pool, gate = TaskPool(threads=1), threading.Event()
    pool.submit([lambda: gate.wait(5), lambda: None])
    began = time.monotonic()
    assert pool.drain(0.3) == 2
    assert 0.25 <= time.monotonic() - began < 2
    gate.set()
    assert pool.drain(5) == 0
    assert TaskPool().drain(0) == 0


def test_a_failing_or_exiting_task_does_not_stop_the_pool():
    out = io.StringIO()
    pool, log = TaskPool(threads=1, stream=out), []
    pool.submit([lambda: sys.exit(1)])
    pool.submit([lambda: 1 / 0, lambda: log.append("next")])
    pool.submit([lambda: log.append("next request")])
    assert pool.drain(5) == 0
    assert log == ["next", "next request"]
    assert "SystemExit: 1" in out.getvalue() and "ZeroDivisionError" in out.getvalue()
    assert pool.room() == MAX_PENDING


# --- CGI: the web server reads the response to EOF; the task must not hold it -------------


CGI_APP = r'''
import json, os, sys, time

import tinyweb

app = tinyweb.App(__name__)

if os.environ.get("TEST_FAIL_SECOND_FORK"):
    # The middle child's fork fails, as it does at the process limit.
    _forks, _real_fork = [], os.fork

    def _fork():
        _forks.append(1)
        if len(_forks) == 2:
            raise BlockingIOError(11, "Resource temporarily unavailable")
        return _real_fork()

    os.fork = _fork


def report(path, seconds):
    # The pid first, so the test can stop this process should it fail before the end.
    with open(path + ".pid", "w") as f:
        f.write(str(os.getpid()))
    time.sleep(seconds)
    facts = {"pid": os.getpid(), "sid": os.getsid(0),
             "fds": [os.readlink("/proc/self/fd/%d" % n) for n in (0, 1, 2)]}
    with open(path + ".tmp", "w") as f:
        json.dump(facts, f)
    os.rename(path + ".tmp", path)
    os.remove(path + ".pid")


def failing():
    raise ValueError("BOOM")


@app.get("/defer")
def defer(request):
    request.defer(report, request.GET["path"], float(request.GET.get("seconds", 0)))
    return "queued by %d" % os.getpid()


@app.get("/fail")
def fail(request):
    request.defer(failing)
    request.defer(report, request.GET["path"], 0)
    return "queued"


app.run()
'''.replace("BOOM", BOOM)


@pytest.fixture
def cgi_site(tmp_path):
    """An app laid out as `tinyweb new` makes it; its detached tasks are stopped at the end."""
    root = make_site(tmp_path, CGI_APP)
    started = []
    yield root, started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    for pid_file in tmp_path.glob("*.pid"):  # left only by a task that has not finished
        pid = int(pid_file.read_text() or 0)
        try:
            with open("/proc/%d/cmdline" % pid, "rb") as f:
                if str(root / "htdocs" / "app.py").encode() in f.read():
                    os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):
            pass


def run_to_eof(site, path, query, stderr=subprocess.PIPE, timeout=10, **extra):
    """Run the script as a CGI server does, reading to EOF; return (stdout, stderr, and the
    seconds until each reached EOF: what a web server waits for)."""
    root, started = site
    env = cgi_environ(path, QUERY_STRING=urlencode(query), PYTHONPATH=str(CHECKOUT), **extra)
    began = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(root / "htdocs" / "app.py")], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr,
                            start_new_session=True)
    started.append(proc)
    streams = {proc.stdout.fileno(): "out"}
    if proc.stderr is not None:
        streams[proc.stderr.fileno()] = "err"
    data = {"out": b"", "err": b""}
    eof = {"out": None, "err": None}
    deadline = began + timeout
    while streams:
        ready, _, _ = select.select(list(streams), [], [], max(deadline - time.monotonic(), 0))
        if not ready:
            raise AssertionError("no EOF after %g s; so far %r" % (timeout, data))
        for fd in ready:
            chunk = os.read(fd, 65536)
            if chunk:
                data[streams[fd]] += chunk
            else:
                eof[streams.pop(fd)] = time.monotonic() - began
    assert proc.wait(timeout) == 0
    proc.stdout.close()
    if proc.stderr is not None:
        proc.stderr.close()
    return data["out"], data["err"], eof["out"], eof["err"]


def test_cgi_response_ends_before_the_task_which_runs_detached(cgi_site, tmp_path):
    root, _ = cgi_site
    marker = tmp_path / "report.json"
    out, err, out_eof, err_eof = run_to_eof(cgi_site, "/defer", {"path": marker, "seconds": 3})
    assert not marker.exists()
    # What Apache waits for: EOF on stdout and (mod_cgi) on stderr, long before the task ends.
    assert out_eof < 1.5 and err_eof < 1.5, (out_eof, err_eof)
    status, _, body = split_cgi(out)
    assert (status, body[:10]) == ("200 OK", b"queued by ")
    assert err == b""
    wait_until(marker.exists, 10, "the detached task's file")
    facts = json.loads(marker.read_text())
    assert facts["pid"] != int(body.split()[-1])
    assert facts["sid"] not in (os.getsid(0), int(body.split()[-1]))  # its own session
    assert facts["fds"] == ["/dev/null", "/dev/null", str(root / "data" / "deferred.log")]


def test_cgi_failing_task_goes_to_deferred_log_when_stderr_is_a_pipe(cgi_site, tmp_path):
    root, _ = cgi_site
    marker = tmp_path / "report.json"
    out, err, _, _ = run_to_eof(cgi_site, "/fail", {"path": marker})
    assert split_cgi(out)[::2] == ("200 OK", b"queued")
    wait_until(marker.exists, 10, "the task after the failing one")
    log = (root / "data" / "deferred.log").read_text()
    assert "tinyweb: deferred task __main__.failing failed\nTraceback" in log
    assert "ValueError: %s" % BOOM in log
    assert err == b""
    assert oct((root / "data" / "deferred.log").stat().st_mode & 0o777) == oct(0o600)


def test_cgi_failing_task_goes_to_stderr_when_it_is_the_error_log_file(cgi_site, tmp_path):
    # mod_cgid makes fd 2 the error log itself.
    root, _ = cgi_site
    marker, error_log = tmp_path / "report.json", tmp_path / "error.log"
    with open(error_log, "wb") as stderr:
        out, _, _, _ = run_to_eof(cgi_site, "/fail", {"path": marker}, stderr=stderr)
    assert split_cgi(out)[::2] == ("200 OK", b"queued")
    wait_until(marker.exists, 10, "the task after the failing one")
    wait_until(lambda: "ValueError: %s" % BOOM in error_log.read_text(), 5, "the traceback")
    assert "tinyweb: deferred task __main__.failing failed\nTraceback" in error_log.read_text()
    assert json.loads(marker.read_text())["fds"][2] == str(error_log)
    assert not (root / "data" / "deferred.log").exists()


def test_cgi_task_runs_and_the_log_says_why_its_failures_cannot_be_logged(cgi_site, tmp_path):
    root, _ = cgi_site
    (tmp_path / "a-file").write_text("")
    (root / "tinyweb.ini").write_text("[tinyweb]\nsecret = %s\ndata_dir = %s\n"
                                      % (SECRET, tmp_path / "a-file" / "data"))
    marker = tmp_path / "report.json"
    out, err, _, _ = run_to_eof(cgi_site, "/defer", {"path": marker})
    assert split_cgi(out)[0] == "200 OK"
    assert b"tinyweb: a failing deferred task cannot be logged ([Errno 20] Not a directory" in err
    wait_until(marker.exists, 10, "the detached task's file")
    assert json.loads(marker.read_text())["fds"][2] == "/dev/null"


def test_cgi_tasks_that_cannot_be_detached_are_not_lost_silently(cgi_site, tmp_path):
    marker = tmp_path / "report.json"
    out, err, _, _ = run_to_eof(cgi_site, "/defer", {"path": marker}, TEST_FAIL_SECOND_FORK="1")
    assert split_cgi(out)[0] == "200 OK"
    assert b"tinyweb: deferred tasks not started\nTraceback" in err
    assert b"BlockingIOError: [Errno 11] Resource temporarily unavailable" in err
    assert not marker.exists() and not (tmp_path / "report.json.pid").exists()


# --- FastCGI: the worker's next request does not wait for the task -------------------------


FCGI_APP = r'''
import os, sys, time

import tinyweb.runners.prefork as prefork

prefork.SHUTDOWN_GRACE = float(os.environ.get("TEST_GRACE", prefork.SHUTDOWN_GRACE))

import tinyweb
from tinyweb.deferred import TooManyTasks

app = tinyweb.App(__name__)


def write_later(path, seconds):
    time.sleep(seconds)
    with open(path, "w") as f:
        f.write("done by %d" % os.getpid())


def wait_for(gate):
    deadline = time.monotonic() + 10
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.02)


@app.get("/later")
def later(request):
    request.defer(write_later, request.GET["path"], float(request.GET["seconds"]))
    return "queued"


@app.get("/pid")
def pid(request):
    return str(os.getpid())


@app.get("/gated")
def gated(request):
    n = int(request.GET["n"])
    for i in range(n):
        try:
            request.defer(wait_for, request.GET["gate"])
        except TooManyTasks as exc:
            return "refused task %d: %s" % (i + 1, exc), 503
    return "queued %d" % n


@app.get("/room")
def room(request):
    return str(request.environ["tinyweb.defer_room"])


app.run()
'''


@pytest.fixture
def fcgi_server(start, sock_path, tmp_path):
    """Start FCGI_APP with one worker; test_fcgi's ``start`` stops it by process group."""
    (tmp_path / "app.py").write_text(FCGI_APP)  # Server writes its own app only if there is none
    ini = tmp_path / "tinyweb.ini"
    ini.write_text("[tinyweb]\nsecret = %s\n" % SECRET)

    def _start(**env):
        return start("--mode", "fcgi", "--bind", "unix:" + sock_path, "--workers", "1",
                     address=sock_path, env={"TINYWEB_CONFIG": str(ini), **env})

    return _start


def test_fcgi_slow_task_does_not_hold_the_next_request(fcgi_server, tmp_path):
    server = fcgi_server()
    marker = tmp_path / "later.txt"
    began = time.monotonic()
    r = server.fetch("/later", query=urlencode({"path": marker, "seconds": 2}))
    assert (r.status, r.body) == (200, b"queued")
    second = server.fetch("/pid")
    assert time.monotonic() - began < 1.0
    assert second.status == 200 and not marker.exists()
    wait_until(marker.exists, 5, "the deferred task's file")
    wait_until(lambda: marker.read_text().startswith("done"), 2, "the file to be written")
    assert marker.read_text() == "done by %s" % second.body.decode()  # the same worker


def test_fcgi_17_pending_tasks_in_a_worker_are_refused(fcgi_server, tmp_path):
    server = fcgi_server()
    gate = str(tmp_path / "gate")
    r = server.fetch("/gated", query=urlencode({"gate": gate, "n": MAX_PENDING + 1}))
    assert r.status == 503
    assert r.body.startswith(b"refused task 17: 16 deferred tasks are already pending")
    # The 16 are pending in the worker now: its next request has no room left at all.
    assert server.fetch("/room").body == b"0"
    r = server.fetch("/gated", query=urlencode({"gate": gate, "n": 1}))
    assert (r.status, r.body[:15]) == (503, b"refused task 1:")
    open(gate, "w").close()
    wait_until(lambda: server.fetch("/room").body == b"16", 5, "the room to grow back")
    assert server.fetch("/gated", query=urlencode({"gate": gate, "n": MAX_PENDING})).status == 200


def test_fcgi_sigterm_lets_a_pending_task_finish_before_exit(fcgi_server, tmp_path):
    server = fcgi_server()
    marker = tmp_path / "later.txt"
    assert server.fetch("/later", query=urlencode({"path": marker, "seconds": 1.5})).status == 200
    began = time.monotonic()
    server.signal(signal.SIGTERM)
    assert server.wait_exit(10) == 0
    assert marker.read_text().startswith("done by ")
    assert 1.0 < time.monotonic() - began < 10  # it waited for the task, within the grace
    assert "unfinished" not in server.stderr and "killing it" not in server.stderr
