"""Measure one CGI request, one fresh process: floors, bare WebOb, Bottle, Flask and tinyweb, cold and warm.

    python bench/cgi.py               # 30 interleaved rounds (about a minute)
    python bench/cgi.py --quick       # 3 rounds: a smoke test
    python bench/cgi.py --rounds 60   # steadier medians

Each candidate is a script in a temp tree (0755 directories), run the way a CGI server runs
it: the script file itself is exec'd (its shebang names the interpreter) in its own
directory, with the environment Apache's mod_cgi passes (notes/servers.md §2) and the
request body on stdin; stdout is read to EOF and the process reaped. Every candidate runs
once before timing, so the modules it imports have their ``__pycache__``; the executed
script is compiled from source every time, as a real CGI script is. Each round runs every
candidate once, in a random order, so a slow stretch of this 2-core machine hits them all;
every response is checked (status 200 and the expected body) and a broken one stops the
bench. The tables give each candidate's median and minimum wall time and its ratios to
``python -S -c pass`` and to the bare WebOb hello (the session rows: to WebOb + Beaker too)
from the same run, then an ``-X importtime`` breakdown of tinyweb's hello.

The two "(warm worker)" rows are tinyweb's hello and session apps with ``cgi_worker = on``
in their tinyweb.ini (README: "A warm worker for CGI"): each CGI process still runs app.py,
but hands the request to a worker process that has the app loaded, over a socket in a
private ``TINYWEB_RUNTIME_DIR`` (0700, in the bench's temp tree). Before timing, one cold
request starts the worker; the bench waits for its socket and pid file, then checks that
requests are answered by the worker (the apps send ``X-Bench-Served-By: worker`` when
``request.environ["tinyweb.cgi_worker"]`` is set, ``cgi`` otherwise: every tinyweb response
is checked for the right one). Their CPU is the CGI process's plus what the worker used
meanwhile (``/proc/PID/task/*/schedstat``). At the end, and on any failure, the workers are
stopped by the pid in their ``.pid`` files: SIGTERM, a deadline, then SIGKILL.

The interpreter is a venv made from the Python running this bench, holding what a web
host's venv would: tinyweb's dependencies (and bottle and flask, with theirs, when they are
installed here; see make_venv), copied from this Python, and a compiled copy of the
checkout's tinyweb. Results go to
``bench/results/cgi-<date>.json``, and a PNG chart beside it when matplotlib is importable.
See bench/README.md.
"""

import argparse
import datetime
import json
import os
import random
import re
import resource
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import harness

SCHEMA = 1
ROUNDS, QUICK_ROUNDS = 30, 3
IMPORTTIME_RUNS, QUICK_IMPORTTIME_RUNS = 7, 2
TOP_IMPORTS = 25
RUN_TIMEOUT = 60.0  # seconds one CGI process may take before the bench gives up on it

HELLO = b"<h1>Hello, world!</h1>\n"
VISIT = re.compile(rb"<h1>Hello, visit (\d+)</h1>\n")
FORM = [("name", "Ada Lovelace"), ("email", "ada@example.org"),
        ("message", "Hello from a form & a bench"), ("count", "3")]
FORM_BODY = urllib.parse.urlencode(FORM).encode("ascii")
FORM_ECHO = "".join("%s=%s\n" % (k, v.replace("&", "&amp;")) for k, v in FORM).encode("ascii")

FLOOR = "python -S -c pass"
WEBOB = "webob hello"
BEAKER = "webob+beaker session"
TINYWEB_HELLO = "tinyweb hello"
TINYWEB_SESSION = "tinyweb session"
WARM_HELLO = "tinyweb hello (warm worker)"
WARM_SESSION = "tinyweb session (warm worker)"

# The warm-worker rows: how long the worker may take to appear after the cold request that
# starts it, and to stop once sent SIGTERM (then SIGKILL, then this long again).
WORKER_START_TIMEOUT = 30.0
WORKER_STOP_TIMEOUT = 10.0
# The worker's idle exit (TINYWEB_CGI_WORKER_IDLE): a backstop should the bench itself be
# killed before it can stop them; a round takes a few seconds.
WORKER_IDLE_SECONDS = 120
SERVED_BY = "x-bench-served-by"  # what the tinyweb apps say served them: "worker" or "cgi"


class BenchError(RuntimeError):
    """A candidate did not give the response it must give; the message shows what it gave."""


# --- the candidates ----------------------------------------------------------------------------

WSGIREF_HELLO = '''\
#!{python}
from wsgiref.handlers import CGIHandler


def app(environ, start_response):
    body = b"<h1>Hello, world!</h1>\\n"
    start_response("200 OK", [("Content-Type", "text/html; charset=utf-8"),
                              ("Content-Length", str(len(body)))])
    return [body]


CGIHandler().run(app)
'''

WEBOB_HELLO = '''\
#!{python}
from wsgiref.handlers import CGIHandler

from webob import Request, Response


def app(environ, start_response):
    request = Request(environ)
    response = Response(text="<h1>Hello, world!</h1>\\n")
    return response(environ, start_response)


CGIHandler().run(app)
'''

BOTTLE_HELLO = '''\
#!{python}
import bottle


@bottle.route("/")
def index():
    return "<h1>Hello, world!</h1>\\n"


bottle.run(server="cgi")
'''

FLASK_HELLO = '''\
#!{python}
from wsgiref.handlers import CGIHandler

from flask import Flask

app = Flask(__name__)


@app.route("/")
def index():
    return "<h1>Hello, world!</h1>\\n"


CGIHandler().run(app)
'''

# Beaker the documented way (its WSGI middleware), with tinyweb's store policy: files in a
# private data dir, JSON (never pickle) for the data, a signed cookie.
WEBOB_BEAKER = '''\
#!{python}
from wsgiref.handlers import CGIHandler

from beaker.middleware import SessionMiddleware
from webob import Request, Response


def app(environ, start_response):
    request = Request(environ)
    session = environ["beaker.session"]
    session["visits"] = session.get("visits", 0) + 1
    session.save()
    response = Response(text="<h1>Hello, visit %d</h1>\\n" % session["visits"])
    return response(environ, start_response)


CGIHandler().run(SessionMiddleware(app, {{
    "session.type": "file",
    "session.data_dir": {data_dir!r},
    "session.key": "bench_session",
    "session.secret": {secret!r},
    "session.data_serializer": "json",
    "session.httponly": True,
    "session.samesite": "Lax",
}}))
'''

# Shaped like app_template/htdocs/app.py: thin, unguarded app.run() at module level. The
# same file serves the cold rows and the warm-worker rows (only tinyweb.ini differs); the
# header says which way a response was served, and the bench checks it on every request.
TINYWEB_APP = '''\
#!{python}
"""A tinyweb app for bench/cgi.py."""
import tinyweb

app = tinyweb.App(__name__)


def served_by(request):
    return {{"X-Bench-Served-By": "worker" if request.environ.get("tinyweb.cgi_worker") else "cgi"}}


{route}

app.run()
'''

TINYWEB_ROUTES = {
    "hello": '''\
@app.get("/")
def index(request):
    return "<h1>Hello, world!</h1>\\n", 200, served_by(request)''',
    "session": '''\
@app.get("/")
def index(request):
    request.session["visits"] = request.session.get("visits", 0) + 1
    return "<h1>Hello, visit %d</h1>\\n" % request.session["visits"], 200, served_by(request)''',
    "form": '''\
@app.post("/")
def index(request):
    return "".join("%s=%s\\n" % (key, value.replace("&", "&amp;"))
                   for key, value in request.POST.items()), 200, served_by(request)''',
}


@dataclass
class Candidate:
    name: str
    note: str
    source: Optional[str] = None          # the script; None for a bare interpreter floor
    argv: List[str] = field(default_factory=list)  # interpreter arguments of a floor
    tinyweb: bool = False                 # needs tinyweb.ini beside htdocs/
    method: str = "GET"
    body: bytes = b""
    session: bool = False                 # carries a cookie; the visit count must grow
    expect: Optional[bytes] = HELLO
    requires: Optional[str] = None        # an optional package (the bench extra); skipped without it
    worker: bool = False                  # cgi_worker = on: timed warm, through the worker
    # Filled in by prepare():
    script: Optional[Path] = None
    cwd: Optional[Path] = None
    env: Dict[str, str] = field(default_factory=dict)
    visits: int = 0
    runtime_dir: Optional[Path] = None    # the worker's TINYWEB_RUNTIME_DIR (0700)
    # Filled in by start_worker():
    worker_pid: Optional[int] = None

    @property
    def floor(self) -> bool:
        return self.source is None


def candidates() -> List[Candidate]:
    return [
        Candidate(FLOOR, "the interpreter alone, no site.py", argv=["-S", "-c", "pass"], expect=None),
        Candidate("python -c pass", "the interpreter with site.py", argv=["-c", "pass"], expect=None),
        Candidate("wsgiref hello", "bare WSGI hello under wsgiref CGIHandler, no WebOb", WSGIREF_HELLO),
        Candidate(WEBOB, "webob Request/Response under wsgiref CGIHandler", WEBOB_HELLO),
        Candidate("bottle hello", "bottle.run(server='cgi')", BOTTLE_HELLO, requires="bottle"),
        Candidate("flask hello", "Flask under wsgiref CGIHandler", FLASK_HELLO, requires="flask"),
        Candidate("webob+beaker session", "Beaker SessionMiddleware, file store, JSON: read + write",
                  WEBOB_BEAKER, session=True, expect=None),
        Candidate(TINYWEB_HELLO, "tinyweb app returning a str", TINYWEB_APP, tinyweb=True),
        Candidate(TINYWEB_SESSION, "request.session read + write (file store)", TINYWEB_APP,
                  tinyweb=True, session=True, expect=None),
        Candidate("tinyweb form POST", "urlencoded POST, 4 fields echoed", TINYWEB_APP,
                  tinyweb=True, method="POST", body=FORM_BODY, expect=FORM_ECHO),
        Candidate(WARM_HELLO, "the hello app, cgi_worker = on: handed to a warm worker",
                  TINYWEB_APP, tinyweb=True, worker=True),
        Candidate(WARM_SESSION, "the session app, cgi_worker = on: handed to a warm worker",
                  TINYWEB_APP, tinyweb=True, session=True, expect=None, worker=True),
    ]


def _route(candidate: Candidate) -> str:
    if candidate.method == "POST":
        return TINYWEB_ROUTES["form"]
    return TINYWEB_ROUTES["session" if candidate.session else "hello"]


# --- the tree and the interpreter --------------------------------------------------------------


def _mkdir(path: Path, mode: int = 0o755) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, mode)  # explicit: a umask of 077 would hide it
    return path


def _marker_holds(marker: str) -> Optional[bool]:
    """Evaluate a PEP 508 environment marker here, or return None when no parser is at hand."""
    try:
        from packaging.markers import Marker
    except ImportError:
        try:
            from pip._vendor.packaging.markers import Marker
        except ImportError:
            return None
    return Marker(marker).evaluate()


def _requirements(lines: Optional[List[str]]) -> List[str]:
    """Return the distribution names among PEP 508 ``lines`` this Python needs (no extras)."""
    names = []
    for line in lines or []:
        spec, _, marker = line.partition(";")
        if "extra" in marker:
            continue
        name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec).group(1)
        holds = _marker_holds(marker) if marker.strip() else True
        if holds is None:  # no marker parser: take it if it is installed
            holds = _installed(name)
        if holds:
            names.append(name)
    return names


def _installed(name: str) -> bool:
    from importlib import metadata

    try:
        metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return False
    return True


def copy_distributions(names: List[str], purelib: Path) -> Dict[str, str]:
    """Copy the installed distributions ``names`` and what they require into ``purelib``.

    Return {name: version}; raise PackageNotFoundError naming one that is not installed.
    """
    from importlib import metadata

    copied: Dict[str, str] = {}
    todo = list(names)
    while todo:
        dist = metadata.distribution(todo.pop(0))
        key = dist.metadata["Name"].lower().replace("_", "-")
        if key in copied:
            continue
        copied[key] = dist.version
        for entry in dist.files or []:
            relative = Path(str(entry))
            if relative.parts[0] == "..":
                continue  # console scripts: not used here
            source = Path(str(entry.locate()))
            if source.is_file():
                target = purelib / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)  # the mtime too, so copied .pyc stay valid
        todo += _requirements(dist.requires)
    return copied


def _tinyweb_requirements(checkout: Path) -> List[str]:
    import tomllib

    with open(checkout / "pyproject.toml", "rb") as f:
        return _requirements(tomllib.load(f)["project"]["dependencies"])


def make_venv(workdir: Path, optional: List[str], checkout: Path):
    """Make a venv holding tinyweb's dependencies, ``optional`` if installed, and tinyweb.

    Return (its python, {distribution: version} copied, the optional ones not installed).
    The distributions are copied from the Python running this bench (with the files their
    RECORD lists, their .pyc included) rather than fetched, and not reached with
    ``--system-site-packages``: that would also bring whatever else is installed here (with
    cryptography present, beaker.session imports it, ~15 ms), and run the .pth files there,
    one of which (``_sandboxing_egress_ca.pth``) imports certifi at every start, ~30 ms with
    re, pathlib and typing. A web host's venv holds tinyweb and its dependencies.
    """
    from importlib import metadata

    venv = workdir / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)],
                   check=True, timeout=120, stdin=subprocess.DEVNULL)
    python = venv / "bin" / "python"
    purelib = Path(subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, timeout=60, capture_output=True, text=True).stdout.strip())
    try:
        copied = copy_distributions(_tinyweb_requirements(checkout), purelib)
    except metadata.PackageNotFoundError as exc:
        raise BenchError("tinyweb's dependency %s is not installed for %s: pip install -e . "
                         "(or pip install 'tinyweb[bench]') and run again" % (exc, sys.executable))
    absent = []
    for name in optional:
        try:
            copied.update(copy_distributions([name], purelib))
        except metadata.PackageNotFoundError:
            absent.append(name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(checkout / "tinyweb", purelib / "tinyweb", ignore=ignore)
    if (checkout / "app_template").is_dir():
        shutil.copytree(checkout / "app_template", purelib / "tinyweb" / "app_template", ignore=ignore)
    subprocess.run([str(python), "-m", "compileall", "-q", str(purelib / "tinyweb")],
                   check=True, timeout=120, stdin=subprocess.DEVNULL)
    return python, copied, absent


def cgi_environ(candidate: Candidate, docroot: Path, script: Path) -> Dict[str, str]:
    """Return what Apache's mod_cgi puts in a script's environment (notes/servers.md §2)."""
    env = {
        "CONTEXT_DOCUMENT_ROOT": str(docroot),
        "CONTEXT_PREFIX": "",
        "DOCUMENT_ROOT": str(docroot),
        "GATEWAY_INTERFACE": "CGI/1.1",
        "HTTP_HOST": "127.0.0.1:8080",
        "HTTP_USER_AGENT": "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
        "HTTP_ACCEPT": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
        "HTTP_ACCEPT_LANGUAGE": "en-GB,en;q=0.5",
        "HTTP_ACCEPT_ENCODING": "gzip, deflate, br",
        "HTTP_CONNECTION": "keep-alive",
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "PATH_INFO": "/",
        "PATH_TRANSLATED": str(docroot) + "/",
        "QUERY_STRING": "",
        "REMOTE_ADDR": "127.0.0.1",
        "REMOTE_PORT": "51234",
        "REQUEST_METHOD": candidate.method,
        "REQUEST_SCHEME": "http",
        "REQUEST_URI": "/app.py/",
        "SCRIPT_FILENAME": str(script),
        "SCRIPT_NAME": "/app.py",
        "SERVER_ADDR": "127.0.0.1",
        "SERVER_ADMIN": "[no address given]",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8080",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "SERVER_SIGNATURE": "<address>Apache/2.4 (Debian) Server at 127.0.0.1 Port 8080</address>\n",
        "SERVER_SOFTWARE": "Apache/2.4 (Debian)",
    }
    if candidate.body:
        env["CONTENT_TYPE"] = "application/x-www-form-urlencoded"
        env["CONTENT_LENGTH"] = str(len(candidate.body))
    return env


def prepare(candidate: Candidate, tree: Path, python: Path) -> None:
    """Write the candidate's script (and app root) under ``tree``; fill in its argv and env."""
    slug = re.sub(r"[^a-z0-9]+", "-", candidate.name.lower()).strip("-")
    root = _mkdir(tree / slug)
    htdocs = _mkdir(root / "htdocs")
    candidate.cwd = htdocs
    script = htdocs / "app.py"
    if candidate.floor:
        candidate.env = cgi_environ(candidate, htdocs, script)
        return
    values = dict(python=python, data_dir=str(_mkdir(root / "data", 0o700) / "sessions"),
                  secret=secrets.token_hex(32), route=_route(candidate))
    script.write_text(candidate.source.format(**values))
    os.chmod(script, 0o755)
    if candidate.tinyweb:
        ini = root / "tinyweb.ini"
        ini.write_text("[tinyweb]\nsecret = %s\n%s" % (secrets.token_hex(32),
                                                       "cgi_worker = on\n" if candidate.worker else ""))
        os.chmod(ini, 0o600)
    candidate.script = script
    candidate.env = cgi_environ(candidate, htdocs, script)
    if candidate.worker:
        # Private to this candidate: its worker's socket, .pid and .lock are the only files here.
        candidate.runtime_dir = _mkdir(root / "run", 0o700)
        socket_path = candidate.runtime_dir / "00000000.sock"  # the name's length (persistent.py)
        if len(os.fsencode(str(socket_path))) >= 108:
            raise BenchError("%s: the worker socket path %s is too long for a unix socket; "
                             "set TMPDIR to a shorter directory" % (candidate.name, socket_path))
        candidate.env["TINYWEB_RUNTIME_DIR"] = str(candidate.runtime_dir)
        candidate.env["TINYWEB_CGI_WORKER_IDLE"] = str(WORKER_IDLE_SECONDS)


# --- one request -------------------------------------------------------------------------------


@dataclass
class Run:
    wall: float   # seconds from spawn to reaped, stdout read to EOF
    cpu: float    # user + system seconds of the process (and of the worker, for a warm row)
    stdout: bytes
    stderr: bytes
    status: int
    entry_cpu: float = 0.0                # the CGI process alone
    worker_cpu: Optional[float] = None    # what the warm worker ran meanwhile (seconds)


def argv_of(candidate: Candidate, python: Path, extra: List[str] = ()) -> List[str]:
    if candidate.floor:
        return [str(python)] + list(extra) + candidate.argv
    if extra:
        return [str(python)] + list(extra) + [str(candidate.script)]
    return [str(candidate.script)]  # exec'd as a CGI server does: the kernel reads the shebang


def run_once(candidate: Candidate, python: Path, extra: List[str] = ()) -> Run:
    """Run one request of ``candidate`` in a fresh process, as a CGI server does."""
    argv = argv_of(candidate, python, extra)
    worker_before = _worker_cpu_ns(candidate)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=str(candidate.cwd), env=candidate.env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(candidate.body, timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=10)
        raise BenchError("%s: no response within %g s (%s)" % (candidate.name, RUN_TIMEOUT, " ".join(argv)))
    except BaseException:
        proc.kill()
        proc.wait(timeout=10)
        raise
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    worker_cpu = None
    if worker_before is not None:
        worker_after = _worker_cpu_ns(candidate)
        if worker_after is not None:
            worker_cpu = (worker_after - worker_before) / 1e9
    return Run(wall, cpu + (worker_cpu or 0.0), out, err, proc.returncode, entry_cpu=cpu,
               worker_cpu=worker_cpu)


# --- the warm worker ---------------------------------------------------------------------------


def _worker_cpu_ns(candidate: Candidate) -> Optional[int]:
    """Return the nanoseconds the threads of ``candidate``'s worker have run, or None without one.

    From /proc/PID/task/*/schedstat (the scheduler's own count), not /proc/PID/stat, whose
    clock ticks (10 ms) are coarser than a warm request. The worker is not the bench's
    child (it detaches), so getrusage never sees it.
    """
    pid = candidate.worker_pid
    if pid is None or not _is_worker(pid, candidate):
        return None
    try:
        tasks = os.listdir("/proc/%d/task" % pid)
    except OSError:
        return None
    total = 0
    for tid in tasks:
        try:
            with open("/proc/%d/task/%s/schedstat" % (pid, tid)) as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # a thread that ended in between
    return total


def _is_worker(pid: int, candidate: Candidate) -> bool:
    """Tell whether ``pid`` is, right now, a live worker serving from ``candidate``'s runtime dir."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            stat = f.read()
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    if stat[stat.rfind(b")") + 2:][:1] in (b"Z", b"X"):
        return False  # exited; its parent (init) has not reaped it yet
    runtime_dir = os.fsencode(str(candidate.runtime_dir)) + b"/"
    return (any(b"tinyweb.runners.cgi_worker" in arg for arg in argv)
            and any(arg.startswith(runtime_dir) for arg in argv))


def _worker_log(candidate: Candidate) -> str:
    """The tail of the worker's log: data/worker.log, since the bench's stderr is a pipe."""
    path = candidate.cwd.parent / "data" / "worker.log"
    try:
        return path.read_text(errors="replace")[-3000:] or "(empty)"
    except OSError:
        return "(no %s)" % path


def start_worker(candidate: Candidate, python: Path) -> None:
    """Start ``candidate``'s worker with one cold request; wait for its socket and pid file."""
    run = run_once(candidate, python)
    check(candidate, run)  # no worker yet: served cold, and it says so
    _no_stderr(candidate, run)
    deadline = time.monotonic() + WORKER_START_TIMEOUT
    while True:
        sockets = sorted(candidate.runtime_dir.glob("*.sock"))
        pid_files = sorted(candidate.runtime_dir.glob("*.sock.pid"))
        pid = None
        if sockets and pid_files:
            try:
                pid = int(pid_files[0].read_text().strip())  # written whole (renamed into place)
            except (OSError, ValueError):
                pid = None
        if pid is not None and _is_worker(pid, candidate):
            break
        if time.monotonic() > deadline:
            raise BenchError("%s: no worker (socket and .pid in %s) within %g s of a cold request; "
                             "found %s\n--- worker.log ---\n%s"
                             % (candidate.name, candidate.runtime_dir, WORKER_START_TIMEOUT,
                                sorted(p.name for p in candidate.runtime_dir.iterdir()),
                                _worker_log(candidate)))
        time.sleep(0.02)
    if len(sockets) != 1:
        raise BenchError("%s: %d sockets in its private runtime dir: %s"
                         % (candidate.name, len(sockets), sockets))
    candidate.worker_pid = pid


def _processes_under(root: Path) -> List[int]:
    """Return the live processes whose command line names a file under ``root``.

    A worker names its app and socket; one being started by a cold request, still between
    fork and exec, the app.py of the CGI process that forked it. No CGI process of the
    bench is running when this is asked (each is reaped before the next starts).
    """
    prefix = os.fsencode(str(root)) + b"/"
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open("/proc/%s/cmdline" % entry, "rb") as f:
                argv = f.read().split(b"\0")
            with open("/proc/%s/stat" % entry, "rb") as f:
                stat = f.read()
        except OSError:
            continue
        if stat[stat.rfind(b")") + 2:][:1] in (b"Z", b"X"):
            continue
        if any(arg.startswith(prefix) for arg in argv):
            found.append(int(entry))
    return found


def stop_worker(candidate: Candidate) -> Dict[str, str]:
    """Stop ``candidate``'s workers by the pids in their .pid files: SIGTERM, deadline, SIGKILL.

    Return {pid: how it ended}. First the runtime dir loses its 0700 mode, so tinyweb will
    neither use it nor start a worker there (persistent.runtime_dir). Besides the pid files,
    it stops any process still naming this candidate's private tree: a worker that a cold
    fallback started and that has not written its pid file yet. Each pid is checked to
    be one of those before it is signalled (a pid file can outlive its process).
    """
    if candidate.runtime_dir is None:
        return {}
    root = candidate.cwd.parent
    try:
        os.chmod(candidate.runtime_dir, 0o755)
    except OSError:
        pass

    def ours(pid):
        return _is_worker(pid, candidate) or pid in _processes_under(root)

    def gone_within(pid, seconds):
        until = time.monotonic() + seconds
        while ours(pid):
            if time.monotonic() > until:
                return False
            time.sleep(0.05)
        return True

    report: Dict[str, str] = {}
    for attempt in range(2):  # the second look, a moment later, catches a worker mid-start
        pids = set(_processes_under(root))
        for path in candidate.runtime_dir.glob("*.pid"):
            try:
                pids.add(int(path.read_text().strip()))
            except (OSError, ValueError):
                pass
        if candidate.worker_pid is not None:
            pids.add(candidate.worker_pid)  # in case it took its pid file with it but lingers
        for pid in sorted(pids):
            if str(pid) in report and not report[str(pid)].startswith("STILL"):
                continue
            if not ours(pid):
                report.setdefault(str(pid), "not running")
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                report[str(pid)] = "not running"
                continue
            if gone_within(pid, WORKER_STOP_TIMEOUT):
                report[str(pid)] = "stopped by SIGTERM"
                continue
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            report[str(pid)] = ("killed (SIGKILL after %g s)" % WORKER_STOP_TIMEOUT
                                if gone_within(pid, WORKER_STOP_TIMEOUT) else "STILL RUNNING after SIGKILL")
        if attempt == 0:
            time.sleep(0.3)
    return report


def stop_workers(cands: List[Candidate]) -> Dict[str, Dict[str, str]]:
    """Stop every warm row's worker; return {candidate: {pid: how it ended}}. Safe to repeat."""
    return {c.name: stop_worker(c) for c in cands if c.worker}


def parse_cgi(output: bytes):
    """Split CGI output into (status, headers, body); status 200 when the script sent none."""
    ends = [(i, len(sep)) for sep in (b"\r\n\r\n", b"\n\n") for i in [output.find(sep)] if i >= 0]
    if not ends:
        raise ValueError("no blank line after the headers")
    end, size = min(ends)
    headers = []
    for line in output[:end].decode("latin-1").splitlines():
        name, sep, value = line.partition(":")
        if not sep:
            raise ValueError("header line without a colon: %r" % line)
        headers.append((name.strip().lower(), value.strip()))
    status = 200
    for name, value in headers:
        if name == "status":
            status = int(value.split()[0])
    return status, headers, output[end + size:]


def check(candidate: Candidate, run: Run) -> None:
    """Raise BenchError unless ``run`` is the response ``candidate`` must give."""
    def fail(why):
        raise BenchError("%s is broken: %s\n--- exit status %s; stdout ---\n%s\n--- stderr ---\n%s"
                         % (candidate.name, why, run.status, run.stdout[-3000:].decode("utf-8", "replace"),
                            run.stderr[-3000:].decode("utf-8", "replace")))

    if run.status != 0:
        fail("exit status %d" % run.status)
    if candidate.worker_pid is not None and run.worker_cpu is None:
        fail("its worker (pid %d) is gone\n--- worker.log ---\n%s"
             % (candidate.worker_pid, _worker_log(candidate)))
    if candidate.floor:
        if run.stdout or run.stderr:
            fail("a floor printed something")
        return
    try:
        status, headers, body = parse_cgi(run.stdout)
    except ValueError as exc:
        fail("not a CGI response (%s)" % exc)
    if status != 200:
        fail("status %d, not 200" % status)
    if candidate.tinyweb:
        # Warm rows once their worker runs: the worker must have answered (not a cold
        # fallback: busy, stale or gone). Every other tinyweb request: served cold.
        want = "worker" if candidate.worker_pid is not None else "cgi"
        served = [v for n, v in headers if n == SERVED_BY]
        if served != [want]:
            fail("served by %s, not %r%s" % (served or "(no %s header)" % SERVED_BY, want,
                                             "\n--- worker.log ---\n" + _worker_log(candidate)
                                             if candidate.worker else ""))
    if candidate.session:
        match = VISIT.fullmatch(body)
        if not match:
            fail("body %r is not a visit count" % body[:200])
        visits = int(match.group(1))
        if visits != candidate.visits + 1:
            fail("visit %d after visit %d: the session was not read and written" % (visits, candidate.visits))
        candidate.visits = visits
        if "HTTP_COOKIE" not in candidate.env:
            cookies = [v for n, v in headers if n == "set-cookie"]
            if not cookies:
                fail("a new session sent no Set-Cookie")
            candidate.env["HTTP_COOKIE"] = cookies[0].split(";", 1)[0]
    elif body != candidate.expect:
        fail("body %r, expected %r" % (body[:200], candidate.expect))


# --- the rounds --------------------------------------------------------------------------------


def _no_stderr(candidate: Candidate, run: Run) -> None:
    if run.stderr:
        raise BenchError("%s wrote to stderr, which a CGI server logs:\n%s"
                         % (candidate.name, run.stderr.decode("utf-8", "replace")[-3000:]))


def warm_up(cands: List[Candidate], python: Path) -> None:
    """Run each candidate until it is warm and proven: pycache written, session cookie set.

    A warm row first starts its worker (one cold request), then must be answered by it.
    """
    for candidate in cands:
        if candidate.worker:
            start_worker(candidate, python)
            print("  %s: worker pid %d" % (candidate.name, candidate.worker_pid), flush=True)
        for _ in range(3 if candidate.session else 2):
            run = run_once(candidate, python)
            check(candidate, run)
            _no_stderr(candidate, run)


def time_rounds(cands: List[Candidate], python: Path, rounds: int, seed: int) -> Dict[str, dict]:
    """Run every candidate once per round, in a fresh random order each round."""
    rng = random.Random(seed)
    raw: Dict[str, dict] = {c.name: {"wall_s": [], "cpu_s": []} for c in cands}
    for c in cands:
        if c.worker:
            raw[c.name].update(entry_cpu_s=[], worker_cpu_s=[])
    for number in range(rounds):
        order = cands[:]
        rng.shuffle(order)
        for candidate in order:
            run = run_once(candidate, python)
            check(candidate, run)
            entry = raw[candidate.name]
            entry["wall_s"].append(run.wall)
            entry["cpu_s"].append(run.cpu)
            if candidate.worker:
                entry["entry_cpu_s"].append(run.entry_cpu)
                entry["worker_cpu_s"].append(run.worker_cpu)
        if (number + 1) % 10 == 0 or number + 1 == rounds:
            print("  round %d/%d" % (number + 1, rounds), flush=True)
    return raw


def summarise(cands: List[Candidate], raw: Dict[str, dict]) -> List[dict]:
    """Return a row per candidate: median and min (ms), CPU, and ratios to the two references."""
    def ms(x):
        return round(x * 1000, 3)

    floor, webob, beaker = raw[FLOOR]["wall_s"], raw[WEBOB]["wall_s"], raw[BEAKER]["wall_s"]
    floor_cpu, webob_cpu = statistics.median(raw[FLOOR]["cpu_s"]), statistics.median(raw[WEBOB]["cpu_s"])
    beaker_cpu = statistics.median(raw[BEAKER]["cpu_s"])
    rows = []
    for candidate in cands:
        walls, cpus = raw[candidate.name]["wall_s"], raw[candidate.name]["cpu_s"]
        med, low = statistics.median(walls), min(walls)
        row = {
            "name": candidate.name,
            "note": candidate.note,
            "median_ms": ms(med),
            "min_ms": ms(low),
            "cpu_median_ms": ms(statistics.median(cpus)),
            "x_floor_median": round(med / statistics.median(floor), 2),
            "x_floor_min": round(low / min(floor), 2),
            # Each round's own ratio, then their median: robust to the machine drifting.
            "x_floor_paired": round(statistics.median(w / f for w, f in zip(walls, floor)), 2),
            "x_webob_median": round(med / statistics.median(webob), 3),
            "x_webob_min": round(low / min(webob), 3),
            "x_webob_paired": round(statistics.median(w / f for w, f in zip(walls, webob)), 3),
            # CPU time is what another process's load on the 2 cores disturbs least.
            "x_floor_cpu": round(statistics.median(cpus) / floor_cpu, 2),
            "x_webob_cpu": round(statistics.median(cpus) / webob_cpu, 3),
            # The session rows' reference: the bare WebOb + Beaker session (given for every row).
            "x_beaker_median": round(med / statistics.median(beaker), 3),
            "x_beaker_min": round(low / min(beaker), 3),
            "x_beaker_paired": round(statistics.median(w / f for w, f in zip(walls, beaker)), 3),
            "x_beaker_cpu": round(statistics.median(cpus) / beaker_cpu, 3),
            "served_by": ("worker" if candidate.worker else "cgi") if candidate.tinyweb else None,
            "wall_ms": [ms(w) for w in walls],
            "cpu_ms": [ms(c) for c in cpus],
        }
        if candidate.worker:
            # cpu_ms is their sum: what one warm request costs the machine.
            entry, worker = raw[candidate.name]["entry_cpu_s"], raw[candidate.name]["worker_cpu_s"]
            row.update(cpu_entry_median_ms=ms(statistics.median(entry)),
                       cpu_worker_median_ms=ms(statistics.median(worker)),
                       cpu_entry_ms=[ms(c) for c in entry], cpu_worker_ms=[ms(c) for c in worker])
        rows.append(row)
    return rows


def targets(rows: List[dict]) -> List[dict]:
    """Check the project's CGI targets against this run's medians: cold, then the warm worker."""
    by = {row["name"]: row for row in rows}

    def ratio(a, b, key):
        return round(by[a][key] / by[b][key], 3)

    def paired(a, b):
        return round(statistics.median(x / y for x, y in zip(by[a]["wall_ms"], by[b]["wall_ms"])), 3)

    found = []
    for hello, session, how in ((TINYWEB_HELLO, TINYWEB_SESSION, "cold"),
                                (WARM_HELLO, WARM_SESSION, "warm worker")):
        for what, a, b, limit in (
            ("%s ≤ 0.85 × webob hello" % hello, hello, WEBOB, 0.85),
            ("stretch: %s ≤ 4 × python -S -c pass" % hello, hello, FLOOR, 4.0),
            ("%s ≤ 0.8 × webob+beaker session" % session, session, BEAKER, 0.8),
        ):
            value = ratio(a, b, "median_ms")
            found.append({"target": what, "subject": a, "reference": b, "how": how,
                          "value": value, "limit": limit, "met": value <= limit,
                          "value_min": ratio(a, b, "min_ms"), "value_cpu": ratio(a, b, "cpu_median_ms"),
                          "value_paired": paired(a, b)})
    return found


# --- -X importtime -----------------------------------------------------------------------------

_IMPORTTIME = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \| ( *)(\S+)\s*$")


def parse_importtime(text: str) -> List[dict]:
    """Return the imports in ``-X importtime`` output, each with who imported it first."""
    entries = []
    pending: List[dict] = []
    for line in text.splitlines():
        match = _IMPORTTIME.match(line)
        if not match:
            continue
        entry = {"name": match.group(4), "self_us": int(match.group(1)),
                 "cumulative_us": int(match.group(2)), "depth": len(match.group(3)) // 2,
                 "parent": None}
        # Children are printed before the module that imported them, one level deeper.
        for child in pending:
            if child["depth"] == entry["depth"] + 1 and child["parent"] is None:
                child["parent"] = entry["name"]
        pending = [c for c in pending if c["parent"] is None and c["depth"] <= entry["depth"]]
        pending.append(entry)
        entries.append(entry)
    return entries


def _importtime_modules(candidate: Candidate, python: Path, runs: int, startup: set) -> List[dict]:
    """Return ``candidate``'s imports beyond ``startup``, each with its median self/cumulative ms."""
    per_run = []
    for _ in range(runs):
        run = run_once(candidate, python, ["-X", "importtime"])
        check(candidate, run)
        per_run.append(parse_importtime(run.stderr.decode("utf-8", "replace")))
    self_us: Dict[str, list] = {}
    cumulative_us: Dict[str, list] = {}
    for entries in per_run:
        for e in entries:
            self_us.setdefault(e["name"], []).append(e["self_us"])
            cumulative_us.setdefault(e["name"], []).append(e["cumulative_us"])
    modules = []
    for e in per_run[0]:
        name = e["name"]
        if name in startup:
            continue  # imported by the interpreter's own start (site, encodings): in the floor
        modules.append({
            "name": name, "imported_by": e["parent"] or "(top level)", "depth": e["depth"],
            "self_ms": round(statistics.median(self_us[name]) / 1000, 2),
            "cumulative_ms": round(statistics.median(cumulative_us[name]) / 1000, 2),
        })
    return modules


def importtime(subject: Candidate, reference: Candidate, bare: Candidate, python: Path,
               runs: int) -> dict:
    """Break ``subject`` down by module (``-X importtime``, medians over ``runs`` runs).

    What ``bare`` (``python -c pass``) imports at start (site, os, encodings) is left out.
    ``reference`` (the bare WebOb counterpart) is broken down too, to tell which imports
    only tinyweb makes.
    """
    startup = {e["name"] for e in parse_importtime(
        run_once(bare, python, ["-X", "importtime"]).stderr.decode("utf-8", "replace"))}
    modules = _importtime_modules(subject, python, runs, startup)
    reference_modules = _importtime_modules(reference, python, runs, startup)
    reference_names = {m["name"] for m in reference_modules}
    packages: Dict[str, float] = {}
    for m in modules:
        top = m["name"].split(".")[0]
        packages[top] = packages.get(top, 0.0) + m["self_ms"]
    tinyweb_self = {m["name"]: m["self_ms"] for m in modules if m["name"].split(".")[0] == "tinyweb"}
    extra = [m for m in modules if m["name"] not in reference_names]
    return {
        "subject": subject.name,
        "reference": reference.name,
        "runs": runs,
        "note": "medians over the runs, under -X importtime (which slows imports a little); "
                "modules the bare interpreter imports at start are left out",
        "imports_total_ms": round(sum(m["self_ms"] for m in modules), 2),
        "tinyweb_self_ms": round(sum(tinyweb_self.values()), 2),
        "tinyweb_modules": tinyweb_self,
        # Each import the script or a function makes at the top: where the time enters.
        "entry_points": [{"name": m["name"], "cumulative_ms": m["cumulative_ms"]}
                         for m in modules if m["depth"] == 0],
        "top_cumulative": sorted(modules, key=lambda m: -m["cumulative_ms"])[:TOP_IMPORTS],
        "self_by_package": [{"package": k, "self_ms": round(v, 2)}
                            for k, v in sorted(packages.items(), key=lambda kv: -kv[1])],
        "reference_imports_ms": round(sum(m["self_ms"] for m in reference_modules), 2),
        "shared_with_reference_ms": round(
            sum(m["self_ms"] for m in modules if m["name"] in reference_names), 2),
        "beyond_reference_ms": round(sum(m["self_ms"] for m in extra), 2),
        "beyond_reference": sorted(({"name": m["name"], "self_ms": m["self_ms"],
                                     "imported_by": m["imported_by"]} for m in extra),
                                   key=lambda m: -m["self_ms"]),
        "modules": modules,
        "reference_modules": reference_modules,
    }


# --- output ------------------------------------------------------------------------------------


def format_tables(results: dict) -> str:
    """Return the results as Markdown tables (as in bench/README.md)."""
    rows = results["rows"]
    floor = next(r for r in rows if r["name"] == FLOOR)
    during = results.get("cpu_during_timing", {})
    lines = ["%d interleaved rounds; `python -S -c pass` median %.1f ms, min %.1f ms. Load average "
             "before timing %s; other work on the machine while timing: %.1f %% of its CPU "
             "(steal %.1f %%)." % (results["rounds"], floor["median_ms"], floor["min_ms"],
                                   " ".join("%.2f" % v for v in results.get("loadavg_before_timing", ())),
                                   100 * during.get("foreign_share", 0.0),
                                   100 * during.get("steal_share", 0.0)), "",
             "| candidate | median ms | min ms | CPU ms | × `python -S` (median) | × `python -S` (min) "
             "| × `python -S` (CPU) | × WebOb hello (median) | × WebOb hello (CPU) "
             "| × WebOb + Beaker (median) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        session = r["name"] in (BEAKER, TINYWEB_SESSION, WARM_SESSION)
        lines.append("| %s | %.1f | %.1f | %.1f | %.2f | %.2f | %.2f | %.2f | %.2f | %s |" % (
            r["name"], r["median_ms"], r["min_ms"], r["cpu_median_ms"], r["x_floor_median"],
            r["x_floor_min"], r["x_floor_cpu"], r["x_webob_median"], r["x_webob_cpu"],
            "%.2f" % r["x_beaker_median"] if session else ""))
    for name, why in results["skipped"].items():
        lines.append("| %s | skipped: %s | | | | | | | | |" % (name, why))
    warm = [r for r in rows if "cpu_worker_median_ms" in r]
    if warm:
        lines += ["", "Warm rows' CPU = the CGI process + the worker meanwhile: " + "; ".join(
            "%s %.1f + %.1f ms" % (r["name"], r["cpu_entry_median_ms"], r["cpu_worker_median_ms"])
            for r in warm) + " (medians)."]
    for name, ended in results.get("workers", {}).items():
        lines.append("%s: worker %s." % (name, ", ".join("pid %s %s" % kv for kv in ended.items())
                                         or "never started"))
    lines += ["", "| target | median | min | CPU | paired by round | met (median) |",
              "|---|---:|---:|---:|---:|---|"]
    for t in results["targets"]:
        lines.append("| %s | %.2f | %.2f | %.2f | %.2f | %s |" % (
            t["target"], t["value"], t["value_min"], t["value_cpu"], t["value_paired"],
            "yes" if t["met"] else "**no**"))
    it = results["importtime"]
    lines += ["", "`-X importtime` of tinyweb hello (median of %d runs; %.1f ms of imports beyond "
              "the interpreter's start, %.2f ms of it in tinyweb's own modules):" % (
                  it["runs"], it["imports_total_ms"], it["tinyweb_self_ms"]), "",
              "| module | cumulative ms | self ms | imported by |", "|---|---:|---:|---|"]
    for m in it["top_cumulative"]:
        lines.append("| %s%s | %.2f | %.2f | %s |" % ("· " * m["depth"], m["name"], m["cumulative_ms"],
                                                      m["self_ms"], m["imported_by"]))
    lines += ["", "Where the import time enters (imports made by the script or inside a function): "
              + ", ".join("%s %.1f" % (m["name"], m["cumulative_ms"]) for m in it["entry_points"])
              + " (ms, cumulative)."]
    lines += ["", "Imports the bare WebOb hello does not make: %.1f ms of %.1f (the WebOb hello's "
              "imports: %.1f ms); the largest: %s (ms, self)." % (
                  it["beyond_reference_ms"], it["imports_total_ms"], it["reference_imports_ms"],
                  ", ".join("%s %.2f" % (m["name"], m["self_ms"]) for m in it["beyond_reference"][:15]))]
    lines += ["", "Self time by top-level package: " + ", ".join(
        "%s %.1f" % (p["package"], p["self_ms"]) for p in it["self_by_package"][:15]) + " (ms)."]
    it = results["importtime_session"]
    lines += ["", "`-X importtime` of tinyweb session: %.1f ms of imports (webob+beaker session: %.1f); "
              "entering at %s (ms, cumulative); not made by webob+beaker: %.1f ms, the largest: %s "
              "(ms, self)." % (
                  it["imports_total_ms"], it["reference_imports_ms"],
                  ", ".join("%s %.1f" % (m["name"], m["cumulative_ms"]) for m in it["entry_points"]),
                  it["beyond_reference_ms"],
                  ", ".join("%s %.2f" % (m["name"], m["self_ms"]) for m in it["beyond_reference"][:10]))]
    return "\n".join(lines)


def write_chart(results: dict, path: Path) -> str:
    """Draw median and min per candidate; return what was done, or why not."""
    try:
        import matplotlib
    except ImportError:
        return "chart skipped: matplotlib is not importable (pip install tinyweb[bench])"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"][::-1]
    floor = next(r for r in rows if r["name"] == FLOOR)["median_ms"]
    fig, ax = plt.subplots(figsize=(9, 5.5))
    y = range(len(rows))
    ax.barh(y, [r["median_ms"] for r in rows], color="#4c72b0", label="median")
    ax.plot([r["min_ms"] for r in rows], y, "k|", markersize=14, label="min")
    for times, style in ((1, ":"), (4, "--")):
        ax.axvline(floor * times, color="#c44e52", linestyle=style, linewidth=1)
        ax.text(floor * times, len(rows) - 0.4, " %d× python -S" % times, color="#c44e52", fontsize=8)
    ax.set_yticks(list(y))
    ax.set_yticklabels([r["name"] for r in rows])
    ax.set_xlabel("ms per request (one process)")
    ax.set_title("CGI, one request = one process (%d rounds, %s)" % (results["rounds"], results["date"][:10]))
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return "chart: %s" % path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="%d rounds: a smoke test" % QUICK_ROUNDS)
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default %d)" % ROUNDS)
    parser.add_argument("--seed", type=int, default=None, help="seed of the round order")
    parser.add_argument("--out-dir", type=Path, default=harness.REPO / "bench" / "results",
                        help="where the JSON and the chart go (default bench/results)")
    parser.add_argument("--checkout", type=Path, default=harness.REPO,
                        help="the tinyweb checkout to measure (default: the one holding this bench), "
                             "e.g. a `git worktree` of another commit")
    args = parser.parse_args(argv)
    args.checkout = args.checkout.resolve()
    if not (args.checkout / "tinyweb" / "__init__.py").is_file():
        parser.error("--checkout %s holds no tinyweb/ package" % args.checkout)
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else ROUNDS)
    if rounds < 1:
        parser.error("--rounds must be at least 1")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2 ** 32)

    # Run as a script, bench/ is first on sys.path, where this file would stand in for the
    # stdlib's cgi module if anything here imported it: harness is in, so drop it.
    bench_dir = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != bench_dir]
    # A SIGTERM unwinds like Ctrl-C, so the temp tree is removed on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="tinyweb-bench-cgi-"))
    os.chmod(workdir, 0o755)
    keep = False
    cands: List[Candidate] = []
    try:
        print("venv with tinyweb from %s" % args.checkout, flush=True)
        cands = candidates()
        optional = [c.requires for c in cands if c.requires]
        python, installed, absent = make_venv(workdir, optional, args.checkout)
        print("  " + ", ".join("%s %s" % kv for kv in sorted(installed.items())), flush=True)
        tree = _mkdir(workdir / "tree")
        skipped = {c.name: "%s is not installed (pip install 'tinyweb[bench]')" % c.requires
                   for c in cands if c.requires in absent}
        for name, why in skipped.items():
            print("skipping %s: %s" % (name, why), flush=True)
        cands = [c for c in cands if c.name not in skipped]
        for candidate in cands:
            prepare(candidate, tree, python)
        print("warming up and checking %d candidates" % len(cands), flush=True)
        warm_up(cands, python)
        loadavg_before = os.getloadavg()
        print("timing: %d rounds (seed %d); load average %.2f %.2f %.2f"
              % ((rounds, seed) + loadavg_before), flush=True)
        # What else the machine ran meanwhile (another bench, a test suite): the CGI
        # processes are our children, the workers each a session of their own.
        meter = harness.CpuMeter([c.worker_pid for c in cands if c.worker_pid is not None])
        meter.start()
        raw = time_rounds(cands, python, rounds, seed)
        during = meter.stop()
        print("other work on the machine while timing: %.1f %% of its CPU (steal %.1f %%)"
              % (100 * during["foreign_share"], 100 * during["steal_share"]), flush=True)
        rows = summarise(cands, raw)
        # Done with the workers: stopped now, so they are not left running (nor idle during
        # what follows); stopped again, harmlessly, on the way out.
        workers = stop_workers(cands)
        print("workers: %s" % workers, flush=True)
        print("-X importtime of %s" % TINYWEB_HELLO, flush=True)
        by_name = {c.name: c for c in cands}
        runs = QUICK_IMPORTTIME_RUNS if args.quick else IMPORTTIME_RUNS
        bare = by_name["python -c pass"]
        imports = importtime(by_name[TINYWEB_HELLO], by_name[WEBOB], bare, python, runs)
        print("-X importtime of tinyweb session", flush=True)
        session_imports = importtime(by_name[TINYWEB_SESSION], by_name[BEAKER], bare, python, runs)
        machine = harness.machine()
        for key in ("nginx", "wrk"):
            machine.pop(key, None)
        machine["venv"] = installed
        results = {
            "schema": SCHEMA, "bench": "cgi",
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "quick": args.quick, "rounds": rounds, "seed": seed, "machine": machine,
            "checkout": checkout_state(args.checkout),
            "method": "each request a fresh process: the script exec'd with a mod_cgi "
                      "environment, stdout read to EOF; wall = spawn to reaped; CPU = the "
                      "child's user + system time",
            "rows": rows, "skipped": skipped, "targets": targets(rows), "importtime": imports,
            "importtime_session": session_imports,
            "workers": workers,
            "cpu_during_timing": {k: round(v, 4) for k, v in during.items()},
            "loadavg_before_timing": loadavg_before,
            "worker_settings": {"cgi_worker": "on", "TINYWEB_RUNTIME_DIR": "<row>/run (0700)",
                                "TINYWEB_CGI_WORKER_IDLE": WORKER_IDLE_SECONDS},
        }
    except Exception:
        keep = True
        sys.stderr.write("bench/cgi.py failed; its tree is kept in %s\n" % workdir)
        raise
    finally:
        # Whatever happened (a broken response, Ctrl-C, SIGTERM): no worker outlives the bench.
        stopped = stop_workers(cands)
        if keep and stopped:
            sys.stderr.write("bench/cgi.py: workers on the way out: %s\n" % stopped)
        left = [(name, pid) for name, ended in stopped.items() for pid, how in ended.items()
                if how.startswith("STILL")]
        if left:
            sys.stderr.write("bench/cgi.py: workers still running: %s\n" % left)
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = "cgi-" + datetime.datetime.now().strftime("%Y-%m-%d-%H%M%S") + ("-quick" if args.quick else "")
    json_path = args.out_dir / (stem + ".json")
    json_path.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    print()
    print(format_tables(results))
    print()
    print("results: %s" % json_path)
    print(write_chart(results, args.out_dir / (stem + ".png")))
    print("took %.0f s" % results["elapsed_s"])
    return 0


def checkout_state(checkout: Path) -> dict:
    """Say which tinyweb was measured: where from, its commit, a digest of tinyweb/ as it stood."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted((checkout / "tinyweb").rglob("*.py")):
        digest.update(str(path.relative_to(checkout)).encode() + b"\0" + path.read_bytes())
    state = {"path": str(checkout), "tinyweb_sha256": digest.hexdigest()[:16]}
    try:
        done = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"],
                              capture_output=True, text=True, timeout=30)
        state["commit"] = done.stdout.strip() or None
        if state["commit"]:
            done = subprocess.run(["git", "-C", str(checkout), "status", "--porcelain", "--", "tinyweb"],
                                  capture_output=True, text=True, timeout=30)
            state["tinyweb_modified"] = bool(done.stdout.strip())
    except (OSError, subprocess.TimeoutExpired):
        pass
    return state


if __name__ == "__main__":
    sys.exit(main())
