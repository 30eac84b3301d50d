"""Measure hello-world FastCGI backends behind nginx: tinyweb against bare WSGI, WebOb, Bottle, Flask.

    python bench/fastcgi.py                 # the full run: 3 rounds, 5 s per run (about 11 minutes)
    python bench/fastcgi.py --quick         # 1 round, 1 s per run, c=1 and c=8 (a smoke test)
    python bench/fastcgi.py --profile       # profile one tinyweb worker under wrk -c8 instead

One nginx (its own config, 127.0.0.1, a free port) sits in front of every candidate; each
candidate is its own backend on a unix socket, started and stopped by this script: nginx's own
``return 200`` (the ceiling), a bare WSGI hello and a bare WebOb hello on flup's threaded and
prefork (2 children) servers, Bottle and Flask on flup's threaded server, tinyweb in its default
process model and with ``--workers 1``, ``--workers 2``, ``--threads 4``, and the tinyweb default
and WebOb-on-flup-prefork again with nginx keeping its connections to the backend open.

Every candidate must answer 200 "hello" first. Then, per round, ``wrk --timeout 5s`` runs each
candidate once at each load (1, 8, 32 connections) in a shuffled order; the median of the
rounds is reported, and each ratio is the median of per-round ratios, so a slow stretch of this
shared 2-core machine hits both sides of a ratio. Before the timing, memory: RSS and PSS of each
worker of the tinyweb default and of WebOb on flup prefork-2 after 10k requests and after a
further 10k.

The results go to ``bench/results/fastcgi-<date>.json`` (and a PNG chart when matplotlib is
importable). tinyweb is measured from this checkout and not changed. See bench/README.md.
"""

import argparse
import datetime
import json
import os
import pstats
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import harness

SCHEMA = 1
LOADS = [("c1", 1, 1), ("c8", 8, 2), ("c32", 32, 2)]  # name, wrk connections, wrk threads
QUICK_LOADS = LOADS[:2]
MEMORY_REQUESTS = 10_000
QUICK_MEMORY_REQUESTS = 1_000
# Idle kept connections nginx caches per worker process (`keepalive` in the upstream block).
UPSTREAM_KEEPALIVE = 8
# flup's prefork parent ignores SIGTERM on Python 3 (notes/servers.md §5): a short wait, then
# harness.Process.stop signals the whole session and SIGKILLs what is left.
FLUP_PREFORK_STOP_WAIT = 1.0
# A worker's RSS may grow this much between 10k and 20k requests and still count as flat.
FLAT_RSS_KIB = 256


@dataclass(frozen=True)
class Candidate:
    name: str
    label: str
    kind: str  # "nginx", "flup" or "tinyweb"
    app: str = ""  # flup backends: wsgi, webob, bottle, flask
    server: str = ""  # flup backends: threaded or prefork2
    flags: tuple = ()  # tinyweb: extra command-line flags
    keepalive: bool = False
    model: str = ""  # the process model, for like-for-like ratios
    needs: str = ""  # a module the backend imports that may be missing

    @property
    def path(self):
        return "/ceiling/" if self.kind == "nginx" else "/%s/app.py/" % self.name


CANDIDATES = [
    Candidate("ceiling", 'nginx return 200 "hello"', "nginx", model="nginx"),
    Candidate("wsgi-threaded", "bare WSGI, flup threaded", "flup", "wsgi", "threaded",
              model="threads"),
    Candidate("wsgi-prefork2", "bare WSGI, flup prefork 2", "flup", "wsgi", "prefork2",
              model="prefork2"),
    Candidate("webob-threaded", "bare WebOb, flup threaded", "flup", "webob", "threaded",
              model="threads", needs="webob"),
    Candidate("webob-prefork2", "bare WebOb, flup prefork 2", "flup", "webob", "prefork2",
              model="prefork2", needs="webob"),
    Candidate("bottle-threaded", "Bottle, flup threaded", "flup", "bottle", "threaded",
              model="threads", needs="bottle"),
    Candidate("flask-threaded", "Flask, flup threaded", "flup", "flask", "threaded",
              model="threads", needs="flask"),
    Candidate("tinyweb-default", "tinyweb default (2 workers)", "tinyweb", model="prefork2"),
    Candidate("tinyweb-workers1", "tinyweb --workers 1", "tinyweb", flags=("--workers", "1"),
              model="prefork1"),
    Candidate("tinyweb-workers2", "tinyweb --workers 2", "tinyweb", flags=("--workers", "2"),
              model="prefork2"),
    Candidate("tinyweb-threads4", "tinyweb --threads 4", "tinyweb", flags=("--threads", "4"),
              model="threads"),
    Candidate("tinyweb-default-ka", "tinyweb default, nginx keep-alive", "tinyweb",
              keepalive=True, model="prefork2"),
    Candidate("webob-prefork2-ka", "bare WebOb, flup prefork 2, nginx keep-alive", "flup",
              "webob", "prefork2", keepalive=True, model="prefork2", needs="webob"),
]
BY_NAME = {c.name: c for c in CANDIDATES}
# Worker processes each backend should show once started (children of the pid we started).
EXPECTED_WORKERS = {"threaded": 0, "prefork2": 2}

# tinyweb against bare WebOb in the same process model (the first target).
SAME_MODEL = [("tinyweb-default", "webob-prefork2"), ("tinyweb-workers2", "webob-prefork2"),
              ("tinyweb-threads4", "webob-threaded"), ("tinyweb-default-ka", "webob-prefork2-ka")]
MEMORY_CANDIDATES = ["tinyweb-default", "webob-prefork2"]


# --- the backends ----------------------------------------------------------------------------

FLUP_BACKEND = '''\
"""Hello-world WSGI apps on flup 1.0.3, for bench/fastcgi.py: python flup_backend.py APP SERVER SOCKET."""
import sys


def wsgi_app():
    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
        return [b"hello"]
    return app


def webob_app():
    from webob import Request, Response

    def app(environ, start_response):
        request = Request(environ)
        response = Response("hello")
        return response(environ, start_response)
    return app


def bottle_app():
    import bottle

    app = bottle.Bottle()

    @app.route("/")
    def index():
        return "hello"
    return app


def flask_app():
    from flask import Flask

    app = Flask("hello")

    @app.route("/")
    def index():
        return "hello"
    return app


def main():
    name, server, sock = sys.argv[1:4]
    app = {"wsgi": wsgi_app, "webob": webob_app, "bottle": bottle_app, "flask": flask_app}[name]()
    # umask 0o111: nginx's worker (www-data when the bench runs as root) must connect.
    if server == "threaded":
        from flup.server.fcgi import WSGIServer

        WSGIServer(app, bindAddress=sock, umask=0o111).run()
    elif server == "prefork2":
        from flup.server.fcgi_fork import WSGIServer

        # minSpare = maxSpare = maxChildren: flup 1.0.3's parent never grows past maxSpare on
        # Python 3 (a bytes/str comparison, notes/servers.md section 5), so fix the count.
        WSGIServer(app, bindAddress=sock, umask=0o111, minSpare=2, maxSpare=2, maxChildren=2).run()
    else:
        raise SystemExit("unknown server %r" % server)


main()
'''

TINYWEB_APP = '''\
"""Hello world on tinyweb, for bench/fastcgi.py: the app a user would write."""
import tinyweb

app = tinyweb.App(__name__)


@app.get("/")
def index(request):
    return "hello"


app.run()
'''

# --profile: run a tinyweb worker under cProfile; stats are dumped when the worker stops.
PROFILE_LAUNCHER = '''\
"""Run APP_PATH as __main__ with each tinyweb FastCGI worker under cProfile (bench/fastcgi.py --profile)."""
import cProfile
import os
import runpy
import sys
import time

import tinyweb.runners.prefork as prefork

out, app_path = sys.argv[1], sys.argv[2]
sys.argv = [app_path] + sys.argv[3:]
_run = prefork.Worker.run


def profiled_run(self):
    # CPU time, not wall time: waits for nginx are not the worker's cost, and on a shared
    # machine another process's turn on the CPU would be charged to whatever was running.
    profile = cProfile.Profile(time.process_time)
    profile.enable()
    try:
        return _run(self)
    finally:
        profile.disable()
        profile.dump_stats("%s.%d" % (out, os.getpid()))


prefork.Worker.run = profiled_run
runpy.run_path(app_path, run_name="__main__")
'''

NGINX_CONF = """\
# Written by bench/fastcgi.py: a private nginx on 127.0.0.1; only fastcgi_params is read from /etc.
%(user_line)s
worker_processes 1;
daemon off;
pid %(srv)s/nginx.pid;
error_log %(srv)s/error.log warn;

events {
    worker_connections 1024;
}

http {
    access_log off;
    client_body_temp_path %(srv)s/tmp/client_body;
    fastcgi_temp_path %(srv)s/tmp/fastcgi;
    proxy_temp_path %(srv)s/tmp/proxy;
    uwsgi_temp_path %(srv)s/tmp/uwsgi;
    scgi_temp_path %(srv)s/tmp/scgi;
    default_type application/octet-stream;
    gzip off;
    # wrk keeps its connections: do not make it reconnect every 1000 requests (the default).
    keepalive_requests 1000000;
%(upstreams)s
    server {
        listen 127.0.0.1:%(port)d;
        server_name 127.0.0.1;
        location = /ceiling/ {
            default_type text/plain;
            return 200 "hello";
        }
%(locations)s
    }
}
"""

# tests/servers.py's location (notes/servers.md section 4) without try_files: the app is known
# to exist, and a stat per request is not what is measured.
LOCATION = """\
        location ~ ^/%(name)s/app\\.py(/|$) {
            fastcgi_split_path_info ^(.+?\\.py)(/.*)$;
            include /etc/nginx/fastcgi_params;
            fastcgi_param PATH_INFO $fastcgi_path_info;
            fastcgi_param HTTP_PROXY "";
            fastcgi_pass %(target)s;%(keep_conn)s
        }"""

UPSTREAM = """\
    upstream %(name)s {
        server unix:%(socket)s;
        keepalive %(keepalive)d;
    }"""


class Nginx:
    """A private nginx: ``/ceiling/`` answers itself, ``/NAME/app.py/`` goes to NAME's socket."""

    def __init__(self, workdir: Path, backends):
        """``backends`` maps a candidate to its socket path."""
        self.binary = harness.require_binary("nginx", "nginx-light")
        if not Path("/etc/nginx/fastcgi_params").is_file():
            raise harness.Unavailable("/etc/nginx/fastcgi_params is missing (Debian package nginx-common)")
        self.srv = workdir / "nginx"
        (self.srv / "tmp").mkdir(mode=0o755, parents=True, exist_ok=True)
        os.chmod(self.srv, 0o755)
        self.port = harness.free_port()
        user_line = ""
        if os.geteuid() == 0:
            # As root nginx runs its worker as "nobody" unless told (this build's default).
            user_line = "user www-data;" if _user_exists("www-data") else "user nobody;"
        upstreams, locations = [], []
        for candidate, sock in backends.items():
            if candidate.keepalive:
                upstream = "backend_" + candidate.name.replace("-", "_")
                upstreams.append(UPSTREAM % dict(name=upstream, socket=sock, keepalive=UPSTREAM_KEEPALIVE))
                locations.append(LOCATION % dict(name=candidate.name, target=upstream,
                                                 keep_conn="\n            fastcgi_keep_conn on;"))
            else:
                locations.append(LOCATION % dict(name=candidate.name, target="unix:%s" % sock,
                                                 keep_conn=""))
        self.conf = self.srv / "nginx.conf"
        self.conf.write_text(NGINX_CONF % dict(user_line=user_line, srv=self.srv, port=self.port,
                                               upstreams="\n".join(upstreams),
                                               locations="\n".join(locations)))
        self.argv = [self.binary, "-p", str(self.srv) + "/", "-c", str(self.conf),
                     "-e", str(self.srv / "error.log")]
        self.process = harness.Process("nginx", self.argv, self.srv / "startup.log", cwd=self.srv)

    def start(self):
        check = subprocess.run(self.argv + ["-t"], capture_output=True, text=True, timeout=30)
        if check.returncode != 0:
            raise harness.StartError("nginx -t rejected %s:\n%s%s" % (self.conf, check.stdout, check.stderr))
        self.process.start()
        harness.wait_until(lambda: harness.port_accepts(self.port),
                           "listening on 127.0.0.1:%d" % self.port, self.process)
        return self

    def url(self, candidate):
        return "http://127.0.0.1:%d%s" % (self.port, candidate.path)

    def error_log(self, limit=3000):
        path = self.srv / "error.log"
        return path.read_text(errors="replace")[-limit:] if path.exists() else ""


def _user_exists(name):
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@dataclass
class Backend:
    candidate: Candidate
    process: Optional[harness.Process] = None
    socket: Optional[Path] = None
    workers: List[int] = field(default_factory=list)


def _child_env():
    # A clean environment: a TINYWEB_* variable of the caller must not change the gateway.
    return {"PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"), "LANG": "C.UTF-8",
            "PYTHONPATH": str(harness.REPO), "PYTHONDONTWRITEBYTECODE": "1"}


def write_backends(workdir):
    """Write the flup backend script and the tinyweb site; return their paths."""
    flup_script = workdir / "flup_backend.py"
    flup_script.write_text(FLUP_BACKEND)
    htdocs = workdir / "site" / "htdocs"
    htdocs.mkdir(parents=True)
    tinyweb_app = htdocs / "app.py"
    tinyweb_app.write_text(TINYWEB_APP)
    return flup_script, tinyweb_app


def backend_argv(candidate, sock, flup_script, tinyweb_app):
    if candidate.kind == "flup":
        return [sys.executable, flup_script, candidate.app, candidate.server, sock]
    return [sys.executable, tinyweb_app, "--mode", "fcgi", "--bind", "unix:%s" % sock,
            "--socket-mode", "0666", *candidate.flags]


def start_backends(workdir, candidates, flup_script, tinyweb_app):
    backends = {}
    for candidate in candidates:
        if candidate.kind == "nginx":
            backends[candidate.name] = Backend(candidate)
            continue
        sock = workdir / "sock" / (candidate.name + ".sock")
        process = harness.Process(candidate.name, backend_argv(candidate, sock, flup_script, tinyweb_app),
                                  workdir / "logs" / (candidate.name + ".log"), env=_child_env(),
                                  cwd=tinyweb_app.parent)
        backends[candidate.name] = Backend(candidate, process.start(), sock)
    # Started together, waited for together: the imports overlap.
    for backend in backends.values():
        if backend.process is not None:
            harness.wait_until(lambda: harness.unix_socket_accepts(backend.socket),
                               "socket %s" % backend.socket, backend.process)
    return backends


def stop_all(processes):
    """Stop every process at once, each with its own deadline (harness.Process.stop)."""
    threads = []
    for process in processes:
        wait = FLUP_PREFORK_STOP_WAIT if "prefork2" in process.name else harness.STOP_TIMEOUT
        thread = threading.Thread(target=process.stop, args=(wait,), daemon=True)
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join(harness.STOP_TIMEOUT + 10)


def find_workers(backend):
    """Record the worker processes of a backend and check there are as many as its model says."""
    candidate = backend.candidate
    if candidate.kind == "flup":
        expected = EXPECTED_WORKERS[candidate.server]
    elif candidate.kind == "tinyweb":
        expected = 1 if candidate.model in ("prefork1", "threads") else 2
    else:
        return
    deadline = time.monotonic() + 10
    while True:
        found = sorted(harness.children(backend.process.pid))
        if len(found) == expected or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if len(found) != expected:
        raise RuntimeError("%s: expected %d worker processes, found %r" % (candidate.name, expected, found))
    backend.workers = found


def cpu_of(backend):
    """CPU seconds used so far by a backend's processes (the one we started and its workers)."""
    if backend.process is None:
        return 0.0
    total = 0.0
    for pid in [backend.process.pid] + harness.children(backend.process.pid):
        try:
            total += harness.cpu_seconds(pid)
        except OSError:
            pass
    return total


# --- HTTP from Python: the checks and the memory phase ---------------------------------------


def _read_response(sock, buffer, deadline):
    """Read one HTTP/1.1 response with a Content-Length from ``sock``; return (status, body, rest)."""
    while b"\r\n\r\n" not in buffer:
        buffer += _recv(sock, deadline)
    head, _, rest = buffer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    fields = {}
    for line in lines:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    if "content-length" not in fields:
        raise RuntimeError("response without Content-Length: %r" % head[:500])
    length = int(fields["content-length"])
    while len(rest) < length:
        rest += _recv(sock, deadline)
    return int(status_line.split()[1]), rest[:length], rest[length:]


def _recv(sock, deadline):
    left = deadline - time.monotonic()
    if left <= 0:
        raise RuntimeError("no whole response from nginx before the deadline")
    sock.settimeout(left)
    data = sock.recv(65536)
    if not data:
        raise RuntimeError("nginx closed the connection in the middle of a response")
    return data


def check_hello(port, candidate, times=2, timeout=10.0):
    """GET the candidate's URL ``times`` times on one connection; each must be 200 "hello"."""
    request = ("GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % candidate.path).encode("ascii")
    deadline = time.monotonic() + timeout
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        buffer = b""
        for _ in range(times):
            sock.sendall(request)
            status, body, buffer = _read_response(sock, buffer, deadline)
            if status != 200 or body != b"hello":
                raise RuntimeError("%s answered %d %r, expected 200 'hello'"
                                   % (candidate.name, status, body[:300]))


def drive(port, path, total, connections=4, batch=25, timeout=120.0):
    """Send ``total`` GETs through nginx on ``connections`` kept connections, pipelined; return the 200s."""
    request = ("GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % path).encode("ascii")
    deadline = time.monotonic() + timeout
    counts, failures = [], []

    def client(count):
        ok = 0
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
                buffer = b""
                while count:
                    n = min(batch, count)
                    sock.sendall(request * n)
                    for _ in range(n):
                        status, _, buffer = _read_response(sock, buffer, deadline)
                        ok += status == 200
                    count -= n
        except Exception as exc:  # reported by the caller, with the others
            failures.append(exc)
        counts.append(ok)

    share = [total // connections + (i < total % connections) for i in range(connections)]
    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in share]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()) + 5)
    if failures:
        raise RuntimeError("while sending %d requests to %s: %s" % (total, path, failures[0]))
    return sum(counts)


def smaps_rollup(pid):
    """Return RSS, PSS and USS (private clean + dirty) of ``pid`` in KiB."""
    values = {}
    with open("/proc/%d/smaps_rollup" % pid) as f:
        for line in f:
            name, _, rest = line.partition(":")
            parts = rest.split()
            if len(parts) == 2 and parts[1] == "kB":
                values[name] = int(parts[0])
    return {"rss_kib": values["Rss"], "pss_kib": values["Pss"],
            "uss_kib": values.get("Private_Clean", 0) + values.get("Private_Dirty", 0)}


def measure_memory(nginx, backends, requests):
    """RSS/PSS/USS of each worker of the memory candidates after ``requests`` and 2 × ``requests``."""
    result = {"requests_per_step": requests, "client": "4 kept connections through nginx, "
              "pipelined 25 at a time", "candidates": {}}
    names = [n for n in MEMORY_CANDIDATES if n in backends]
    for name in names:
        result["candidates"][name] = {"workers": backends[name].workers, "steps": []}
    for step in (1, 2):
        for name in names:  # interleaved: A, B, A, B
            backend = backends[name]
            ok = drive(nginx.port, backend.candidate.path, requests)
            if ok != requests:
                raise RuntimeError("%s: %d of %d requests answered 200" % (name, ok, requests))
            if sorted(harness.children(backend.process.pid)) != backend.workers:
                raise RuntimeError("%s: its workers were replaced during the memory phase" % name)
            per_worker = {str(pid): smaps_rollup(pid) for pid in backend.workers}
            result["candidates"][name]["steps"].append(
                {"after_requests": requests * step, "per_worker": per_worker,
                 "max_rss_kib": max(w["rss_kib"] for w in per_worker.values()),
                 "max_pss_kib": max(w["pss_kib"] for w in per_worker.values()),
                 "max_uss_kib": max(w["uss_kib"] for w in per_worker.values())})
            print("  memory %-16s after %6d requests: " % (name, requests * step) + ", ".join(
                "pid %s RSS %.1f PSS %.1f MiB" % (pid, w["rss_kib"] / 1024, w["pss_kib"] / 1024)
                for pid, w in per_worker.items()), flush=True)
    for name in names:
        steps = result["candidates"][name]["steps"]
        result["candidates"][name]["rss_growth_kib"] = max(
            steps[1]["per_worker"][pid]["rss_kib"] - steps[0]["per_worker"][pid]["rss_kib"]
            for pid in steps[0]["per_worker"])
    return result


# --- the machine's other load ----------------------------------------------------------------


class LoadWatch:
    """Account for the CPU this machine spent on work that is not this bench's, between checks.

    The machine is shared: another bench or a test suite running at the same time takes CPU
    from both sides of every ratio unevenly. Between two checks, the busy time in /proc/stat
    less what this process, its reaped children (the wrk runs) and its live servers used is
    someone else's; so is steal time (the hypervisor's). Each check is recorded, with the
    processes that used the most of it (short-lived ones that ended between two checks, such
    as a test suite's servers, count in the share but cannot be named), and a warning is
    printed past 5 % of the machine.
    """

    def __init__(self):
        self.log = []
        self.own_live = []  # pids of our live servers and their workers
        self._last = self._sample()

    @staticmethod
    def _system():
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal ...
        busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6]
        return busy / _HZ, (fields[7] if len(fields) > 7 else 0) / _HZ

    def _ours(self):
        import resource

        total = 0.0
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
            usage = resource.getrusage(who)
            total += usage.ru_utime + usage.ru_stime
        for pid in self.own_live:
            try:
                total += harness.cpu_seconds(pid)
            except OSError:
                pass
        return total

    def _processes(self):
        own = set(self.own_live) | _ancestors()
        found = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) in own:
                continue
            try:
                cpu = harness.cpu_seconds(int(entry))
            except (OSError, IndexError, ValueError):
                continue
            found[int(entry)] = cpu
        return found

    def _sample(self):
        busy, steal = self._system()
        return {"t": time.monotonic(), "busy": busy, "steal": steal, "ours": self._ours(),
                "procs": self._processes()}

    def check(self, when):
        now = self._sample()
        last, self._last = self._last, now
        wall = max(now["t"] - last["t"], 1e-3)
        others = max(0.0, (now["busy"] - last["busy"]) - (now["ours"] - last["ours"]))
        steal = now["steal"] - last["steal"]
        share = (others + steal) / (wall * (os.cpu_count() or 1))
        busiest = sorted(((cpu - last["procs"].get(pid, 0.0), pid) for pid, cpu in now["procs"].items()),
                         reverse=True)[:5]
        top = ["%.1f s %s" % (delta, _cmdline(pid)) for delta, pid in busiest if delta >= 0.2]
        entry = {"when": when, "seconds": round(wall, 1), "others_cpu_s": round(others, 1),
                 "steal_s": round(steal, 1), "share_of_machine": round(share, 3),
                 "loadavg": [round(x, 2) for x in os.getloadavg()], "busiest_others": top}
        self.log.append(entry)
        if share > 0.05:
            print("  warning (%s): %.0f %% of the machine went to other work over the last %.0f s; "
                  "numbers are noisier: %s" % (when, share * 100, wall, "; ".join(t[:70] for t in top[:3])),
                  flush=True)
        return entry


_HZ = os.sysconf("SC_CLK_TCK")


def _cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            words = f.read().decode("utf-8", "replace").replace("\0", " ").split()
        if not words:  # a kernel thread
            with open("/proc/%d/comm" % pid) as f:
                return "[%s]" % f.read().strip()
        return " ".join(words)[:100]
    except OSError:
        return "(gone)"


def _ancestors():
    """This process and its parents (a test runner waiting for this bench is not load)."""
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            with open("/proc/%d/stat" % pid, "rb") as f:
                stat = f.read()
        except OSError:
            break
        pid = int(stat[stat.rfind(b")") + 2:].split()[1])
    return pids


def own_pids(nginx, backends):
    pids = []
    for process in ([nginx.process] if nginx else []) + [b.process for b in backends.values() if b.process]:
        if process.popen is not None:
            pids.append(process.pid)
            pids += harness.children(process.pid)
    return pids


# --- timing ----------------------------------------------------------------------------------


def time_candidates(nginx, backends, loads, rounds, seconds, workdir, rng, warmup, watch):
    runs = []
    names = list(backends)
    if warmup:
        for name in names:
            harness.run_wrk(nginx.url(backends[name].candidate), 8, 2, warmup, workdir)
    for number in range(rounds):
        for load, connections, threads in loads:
            order = names[:]
            rng.shuffle(order)
            for name in order:
                backend = backends[name]
                before = cpu_of(backend)
                result = harness.run_wrk(nginx.url(backend.candidate), connections, threads,
                                         seconds, workdir)
                cpu = cpu_of(backend) - before
                result.update(round=number, load=load, candidate=name,
                              backend_cpu_us_per_request=cpu / max(result["requests"], 1) * 1e6)
                if backend.workers and sorted(harness.children(backend.process.pid)) != backend.workers:
                    result["workers_replaced"] = True
                runs.append(result)
                flag = "  ERRORS %d" % result["errors"] if result["errors"] else ""
                print("  round %d %-3s %-19s %8.0f req/s  p50 %7.2f ms  p99 %8.2f ms%s" % (
                    number + 1, load, name, result["req_per_s"], result["p50_us"] / 1000,
                    result["p99_us"] / 1000, flag), flush=True)
        watch.check("round %d" % (number + 1))
    return runs


def summarize(runs, loads, names):
    summary = {}
    for load, _, _ in loads:
        summary[load] = {}
        for name in names:
            mine = [r for r in runs if r["load"] == load and r["candidate"] == name]
            if not mine:
                continue
            entry = {key: harness.median([r[key] for r in mine])
                     for key in ("req_per_s", "p50_us", "p90_us", "p99_us", "max_us",
                                 "backend_cpu_us_per_request")}
            entry["worst_max_us"] = max(r["max_us"] for r in mine)
            entry["worst_p99_us"] = max(r["p99_us"] for r in mine)
            for key in ("errors", "timeouts", "status_errors", "connect_errors", "read_errors",
                        "write_errors", "requests"):
                entry[key] = sum(r[key] for r in mine)
            entry["flagged"] = entry["errors"] > 0
            entry["runs"] = len(mine)
            summary[load][name] = entry
    return summary


def round_ratios(runs, load, a, b, key="req_per_s"):
    """``a[key] / b[key]`` in each round, each pair taken from the same round and load."""
    ratios = []
    for number in sorted({r["round"] for r in runs}):
        x = [r for r in runs if r["round"] == number and r["load"] == load and r["candidate"] == a]
        y = [r for r in runs if r["round"] == number and r["load"] == load and r["candidate"] == b]
        if x and y and y[0][key] > 0:
            ratios.append(round(x[0][key] / y[0][key], 3))
    return ratios


def per_round_ratio(runs, load, a, b, key="req_per_s"):
    """Median over rounds of ``a[key] / b[key]``, each pair taken from the same round and load."""
    ratios = round_ratios(runs, load, a, b, key)
    return round(harness.median(ratios), 3) if ratios else None


def compute_ratios(runs, loads, names):
    pairs = [(a, b) for a, b in SAME_MODEL]
    pairs += [("tinyweb-default", "wsgi-threaded"), ("tinyweb-default", "bottle-threaded"),
              ("tinyweb-default", "flask-threaded"), ("tinyweb-threads4", "bottle-threaded"),
              ("tinyweb-threads4", "flask-threaded"), ("tinyweb-default-ka", "tinyweb-default"),
              ("webob-prefork2-ka", "webob-prefork2"), ("tinyweb-workers1", "tinyweb-default"),
              # The same configuration twice: how far apart two identical candidates land is
              # the noise floor of every other ratio in this run.
              ("tinyweb-workers2", "tinyweb-default")]
    pairs += [(name, "ceiling") for name in names if name != "ceiling"]
    ratios = {"req_per_s": {}, "p99": {}, "req_per_s_rounds": {}}
    for a, b in pairs:
        if a not in names or b not in names:
            continue
        key = "%s / %s" % (a, b)
        ratios["req_per_s"][key] = {load: per_round_ratio(runs, load, a, b) for load, _, _ in loads}
        ratios["req_per_s_rounds"][key] = {load: round_ratios(runs, load, a, b) for load, _, _ in loads}
    for a, b in SAME_MODEL:
        if a in names and b in names:
            ratios["p99"]["%s / %s" % (a, b)] = {
                load: per_round_ratio(runs, load, a, b, "p99_us") for load, _, _ in loads}
    return ratios


def _target(name, goal, values, met, note=""):
    entry = {"target": name, "goal": goal, "values": values, "met": met}
    if note:
        entry["note"] = note
    return entry


def evaluate_targets(ratios, summary, memory, loads):
    """Say where tinyweb stands against each target; ``met`` is None when it was not measured."""
    rps, p99 = ratios["req_per_s"], ratios["p99"]
    load_names = [load for load, _, _ in loads]
    targets = []

    def all_at_least(values, bound):
        known = [v for v in values.values() if v is not None]
        return (all(v >= bound for v in known) and len(known) == len(values)) if values else None

    for a, b in SAME_MODEL[:3]:
        values = rps.get("%s / %s" % (a, b))
        targets.append(_target("%s >= 0.9 x %s (req/s, same process model)" % (a, b),
                               ">= 0.9 at " + ", ".join(load_names), values,
                               all_at_least(values, 0.9) if values else None))
    values = rps.get("tinyweb-default / wsgi-threaded")
    c8 = {"c8": values.get("c8")} if values else None
    targets.append(_target("tinyweb default >= 2.2 x bare WSGI on flup threaded at 8 clients",
                           ">= 2.2 at c8", c8, c8["c8"] >= 2.2 if c8 and c8["c8"] else None))
    for a in ("tinyweb-default", "tinyweb-threads4"):
        for b in ("bottle-threaded", "flask-threaded"):
            values = rps.get("%s / %s" % (a, b))
            targets.append(_target("%s ahead of %s" % (a, b), "> 1.0 at " + ", ".join(load_names),
                                   values, (all(v is not None and v > 1.0 for v in values.values())
                                            if values else None),
                                   "" if values else "%s not measured (not importable here)" % b))
    values = p99.get("tinyweb-default / webob-prefork2")
    c8 = {"c8": values.get("c8")} if values else None
    targets.append(_target("tinyweb default p99 <= 1.5 x bare WebOb (flup prefork 2) p99 at 8 clients",
                           "<= 1.5 at c8", c8, c8["c8"] <= 1.5 if c8 and c8["c8"] else None))
    cands = memory.get("candidates", {}) if memory else {}
    if "tinyweb-default" in cands and "webob-prefork2" in cands:
        t, w = cands["tinyweb-default"], cands["webob-prefork2"]
        ratio = round(t["steps"][0]["max_rss_kib"] / w["steps"][0]["max_rss_kib"], 3)
        targets.append(_target("RSS per worker, tinyweb default <= 1.1 x bare WebOb prefork 2 "
                               "after %d requests" % memory["requests_per_step"], "<= 1.1",
                               {"ratio": ratio, "tinyweb_kib": t["steps"][0]["max_rss_kib"],
                                "webob_kib": w["steps"][0]["max_rss_kib"]}, ratio <= 1.1))
        targets.append(_target("tinyweb default worker RSS flat over a further %d requests"
                               % memory["requests_per_step"], "growth <= %d KiB" % FLAT_RSS_KIB,
                               {"growth_kib": t["rss_growth_kib"],
                                "webob_growth_kib": w["rss_growth_kib"]},
                               t["rss_growth_kib"] <= FLAT_RSS_KIB))
    return targets


def keepalive_findings(summary, ratios, loads):
    out = {}
    for ka, base in (("tinyweb-default-ka", "tinyweb-default"), ("webob-prefork2-ka", "webob-prefork2")):
        per_load = {}
        for load, _, _ in loads:
            s_ka, s_base = summary[load].get(ka), summary[load].get(base)
            if not s_ka or not s_base:
                continue
            per_load[load] = {
                "req_per_s_ratio": ratios["req_per_s"].get("%s / %s" % (ka, base), {}).get(load),
                "p99_ms": round(s_ka["p99_us"] / 1000, 2),
                "p99_ms_without": round(s_base["p99_us"] / 1000, 2),
                "worst_max_ms": round(s_ka["worst_max_us"] / 1000, 1),
                "timeouts": s_ka["timeouts"], "errors": s_ka["errors"],
                # A stall: some request took over 100 ms, or wrk gave up on one (5 s).
                "stalls": s_ka["worst_max_us"] > 100_000 or s_ka["timeouts"] > 0,
            }
        out[ka] = per_load
    return out


# --- output ----------------------------------------------------------------------------------


def format_table(results):
    loads = results["settings"]["loads"]
    summary = results["summary"]
    head = "| candidate |" + "".join(" c=%d req/s | p50 ms | p99 ms |" % loads[l]["connections"]
                                     for l in loads) + " errors |"
    lines = [head, "|---|" + "---:|---:|---:|" * len(loads) + "---:|"]
    for candidate in CANDIDATES:
        entry = results["candidates"].get(candidate.name)
        if entry is None or entry.get("skipped"):
            continue
        cells, errors = [], 0
        for load in loads:
            s = summary[load].get(candidate.name)
            if s is None:
                cells.append(" - | - | - |")
                continue
            errors += s["errors"]
            cells.append(" %s | %.2f | %.2f |" % ("{:,.0f}".format(s["req_per_s"]), s["p50_us"] / 1000,
                                                  s["p99_us"] / 1000))
        lines.append("| %s |%s %s |" % (candidate.label, "".join(cells),
                                        "**%d** (flagged)" % errors if errors else "0"))
    return "\n".join(lines)


def format_cpu(results):
    loads = list(results["settings"]["loads"])
    lines = ["| backend CPU, us per request (all its processes) | " + " | ".join(loads) + " |",
             "|---|" + "---:|" * len(loads)]
    for candidate in CANDIDATES:
        if candidate.kind == "nginx" or candidate.name not in results["summary"][loads[0]]:
            continue
        cpu = [results["summary"][load][candidate.name]["backend_cpu_us_per_request"] for load in loads]
        lines.append("| %s | " % candidate.label + " | ".join("%.0f" % us for us in cpu) + " |")
    return "\n".join(lines)


def format_ratios(results):
    loads = list(results["settings"]["loads"])
    lines = ["| ratio (median of per-round ratios) | " + " | ".join(loads) + " |",
             "|---|" + "---:|" * len(loads)]
    for kind, table in (("req/s", results["ratios"]["req_per_s"]), ("p99", results["ratios"]["p99"])):
        # p99 ratios of the keep-alive candidates compare stalls with stalls: left to the JSON.
        for key, values in table.items():
            if key.endswith("/ ceiling"):
                continue
            lines.append("| %s %s | " % (kind, key) + " | ".join(
                "-" if values.get(l) is None else "%.2f" % values[l] for l in loads) + " |")
    return "\n".join(lines)


def format_targets(results):
    lines = []
    for t in results["targets"]:
        mark = {True: "MET", False: "NOT MET", None: "not measured"}[t["met"]]
        lines.append("- %s: %s (%s; %s)" % (t["target"], mark, t["goal"], json.dumps(t["values"])))
    return "\n".join(lines)


def format_memory(memory):
    lines = ["| worker (MiB) | after | RSS | PSS | USS |", "|---|---:|---:|---:|---:|"]
    for name, data in memory.get("candidates", {}).items():
        for step in data["steps"]:
            for pid, w in step["per_worker"].items():
                lines.append("| %s pid %s | %d | %.1f | %.1f | %.1f |" % (
                    name, pid, step["after_requests"], w["rss_kib"] / 1024, w["pss_kib"] / 1024,
                    w["uss_kib"] / 1024))
    return "\n".join(lines)


def write_chart(results, path):
    """Draw req/s per candidate and load; return a note saying where, or why not."""
    try:
        import matplotlib
    except ImportError:
        return None, "chart skipped: matplotlib is not importable (it is optional)"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loads = list(results["settings"]["loads"])
    names = [c.name for c in CANDIDATES if c.name in results["summary"][loads[0]] and c.name != "ceiling"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(13, 9), sharex=True)
    width = 0.8 / len(loads)
    for i, load in enumerate(loads):
        xs = [n + i * width for n in range(len(names))]
        top.bar(xs, [results["summary"][load][name]["req_per_s"] for name in names], width, label=load)
        bottom.bar(xs, [results["summary"][load][name]["p99_us"] / 1000 for name in names], width,
                   label=load)
    bottom.set_xticks([n + width * (len(loads) - 1) / 2 for n in range(len(names))])
    bottom.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    top.set_ylabel("req/s (median of rounds)")
    top.set_title("hello through nginx + FastCGI (unix socket); nginx's own return 200: %s req/s at %s"
                  % (", ".join("{:,.0f}".format(results["summary"][l]["ceiling"]["req_per_s"]) for l in loads),
                     ", ".join(loads)))
    top.legend()
    bottom.set_yscale("log")
    bottom.set_ylabel("p99 latency, ms (log)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path), "chart: %s" % path


# --- --profile -------------------------------------------------------------------------------


def profile_tinyweb(workdir, tinyweb_app, seconds, out_dir, profiler):
    """Profile one tinyweb worker (--workers 1) under wrk -c8; print its top functions.

    py-spy samples the running worker from outside (little overhead, so the shares are close to
    the real ones); cProfile runs inside it, counts calls exactly, but inflates call-heavy code.
    """
    if profiler == "auto":
        profiler = "py-spy" if shutil.which("py-spy") else "cprofile"
    candidate = BY_NAME["tinyweb-workers1"]
    sock = workdir / "sock" / "profiled.sock"
    argv = backend_argv(candidate, sock, None, tinyweb_app)
    if profiler == "cprofile":
        launcher = workdir / "profile_launcher.py"
        launcher.write_text(PROFILE_LAUNCHER)
        argv = [sys.executable, launcher, workdir / "worker.prof", tinyweb_app] + argv[2:]
    process = harness.Process("tinyweb-profiled", argv, workdir / "logs" / "profiled.log",
                              env=_child_env(), cwd=tinyweb_app.parent)
    nginx, sampled = None, None
    process.start()
    try:
        harness.wait_until(lambda: harness.unix_socket_accepts(sock), "socket %s" % sock, process)
        nginx = Nginx(workdir, {candidate: sock}).start()
        check_hello(nginx.port, candidate)
        if profiler == "py-spy":
            worker = harness.children(process.pid)[0]
            sampled = workdir / "py-spy.txt"
            spy = subprocess.Popen(
                ["py-spy", "record", "--pid", str(worker), "--duration", str(max(1, seconds - 1)),
                 "--rate", "200", "--function", "--format", "raw", "--output", str(sampled)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                start_new_session=True)
        try:
            result = harness.run_wrk(nginx.url(candidate), 8, 2, seconds, workdir)
        finally:
            if sampled is not None:
                try:
                    _, err = spy.communicate(timeout=seconds + 30)
                except subprocess.TimeoutExpired:
                    spy.kill()
                    _, err = spy.communicate(timeout=5)
                if not sampled.exists():
                    raise RuntimeError("py-spy wrote no samples (it needs ptrace): %s" % err.decode()[-2000:])
    finally:
        if nginx is not None:
            nginx.process.stop()
        process.stop()
    if profiler == "py-spy":
        report = _py_spy_report(sampled)
    else:
        report = _cprofile_report(workdir, process, result["requests"] + 2)
    print("\nprofiled tinyweb --workers 1 with %s under wrk -c8 for %d s: %d requests, %.0f req/s"
          % (profiler, seconds, result["requests"], result["req_per_s"]))
    for title, rows in report["tables"]:
        print("\n%s:" % title)
        for row in rows[:25]:
            print("  " + row)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ("fastcgi-profile-%s.json" % datetime.datetime.now().strftime("%Y-%m-%d-%H%M%S"))
    path.write_text(json.dumps({"schema": SCHEMA, "bench": "fastcgi-profile", "profiler": profiler,
                                "machine": harness.machine(), "wrk": result, **report["data"]},
                               indent=1) + "\n")
    print("\nprofile: %s" % path)


def _py_spy_report(sampled):
    """Share of the worker's busy samples spent in each function itself, and below it."""
    own, inclusive, total = {}, {}, 0
    for line in sampled.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        count, frames = int(count), [_short_frame(f) for f in stack.split(";")]
        total += count
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count
    if not total:
        raise RuntimeError("py-spy recorded no busy samples")

    def table(counts):
        ordered = sorted(counts.items(), key=lambda kv: -kv[1])
        return [{"function": f, "share": round(n / total, 4)} for f, n in ordered]

    own_rows, inclusive_rows = table(own), table(inclusive)
    return {"tables": [("top 25 by own time, share of busy samples (%d)" % total,
                        ["%5.1f %%  %s" % (r["share"] * 100, r["function"]) for r in own_rows]),
                       ("top 25 by inclusive time",
                        ["%5.1f %%  %s" % (r["share"] * 100, r["function"]) for r in inclusive_rows])],
            "data": {"samples": total, "own": own_rows[:200], "inclusive": inclusive_rows[:200]}}


def _short_frame(frame):
    name, _, where = frame.partition(" (")
    return "%s (%s" % (name.replace("<locals>.", ""), _short(where)) if where else frame


def _cprofile_report(workdir, process, requests):
    dumps = list(workdir.glob("worker.prof.*"))
    if not dumps:
        raise RuntimeError("the profiled worker wrote no stats\n%s" % process.tail())
    stats = pstats.Stats(str(dumps[0]))
    rows = []
    for (filename, line, func), (_, calls, own, cumulative, _) in stats.stats.items():
        rows.append({"function": "%s:%d(%s)" % (_short(filename), line, func),
                     "calls_per_request": round(calls / requests, 2),
                     "tottime_us_per_request": round(own / requests * 1e6, 2),
                     "cumtime_us_per_request": round(cumulative / requests * 1e6, 2)})
    total = sum(r["tottime_us_per_request"] for r in rows)
    tables = []
    for key, title in (("tottime_us_per_request", "own"), ("cumtime_us_per_request", "cumulative")):
        ordered = sorted(rows, key=lambda r: -r[key])
        tables.append(("top 25 by %s CPU time, us per request (%.0f us profiled in all)" % (title, total),
                       ["%8.1f  %6.2f calls  %s" % (r[key], r["calls_per_request"], r["function"])
                        for r in ordered]))
    return {"tables": tables,
            "data": {"profiled_us_per_request": round(total, 1),
                     "functions": sorted(rows, key=lambda r: -r["tottime_us_per_request"])[:200]}}


def _short(filename):
    for marker in ("site-packages/", "/lib/python3", str(harness.REPO) + "/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


# --- main ------------------------------------------------------------------------------------


def tinyweb_source():
    """Name the tinyweb measured: the checkout's commit, and the files under tinyweb/ changed since."""
    def git(*argv):
        try:
            done = subprocess.run(["git", "-C", str(harness.REPO), *argv], capture_output=True, text=True,
                                  timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    changed = git("status", "--porcelain", "--", "tinyweb")
    return {"commit": git("rev-parse", "HEAD"),
            "changed_under_tinyweb": changed.splitlines() if changed else []}


def _versions(*names):
    from importlib import metadata

    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def _importable(module):
    done = subprocess.run([sys.executable, "-c", "import " + module], capture_output=True, timeout=60,
                          env=_child_env())
    return done.returncode == 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="1 round, about 1 s per run, 1 and 8 connections (a smoke test)")
    parser.add_argument("--duration", type=int, default=None, metavar="S",
                        help="seconds per wrk run (default 5, --quick 1)")
    parser.add_argument("--rounds", type=int, default=None, metavar="N",
                        help="rounds of every candidate at every load (default 3, --quick 1)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the shuffled orders")
    parser.add_argument("--out-dir", type=Path, default=harness.REPO / "bench" / "results",
                        help="where the JSON and the chart go (default bench/results)")
    parser.add_argument("--profile", nargs="?", const="auto", choices=["auto", "py-spy", "cprofile"],
                        help="instead: profile one tinyweb worker under wrk -c8 and print its top "
                             "functions (py-spy when installed, else cProfile)")
    args = parser.parse_args(argv)
    seconds = args.duration or (1 if args.quick else 5)
    rounds = args.rounds or (1 if args.quick else 3)
    if seconds < 1 or rounds < 1:
        parser.error("--duration and --rounds must be at least 1")
    loads = QUICK_LOADS if args.quick else LOADS
    seed = args.seed if args.seed is not None else int(time.time())

    # Run as a script, bench/ is first on sys.path, where bench/gzip.py would stand in for the
    # stdlib's gzip module if anything imported it: harness is in, so drop bench/.
    bench_dir = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != bench_dir]
    # A SIGTERM unwinds like Ctrl-C, so the servers are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    started = time.monotonic()
    try:
        harness.require_binary("nginx", "nginx-light")
        harness.require_binary("wrk", "wrk")
    except harness.Unavailable as exc:
        sys.stderr.write("bench/fastcgi.py: %s; install it and run again\n" % exc)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="tinyweb-bench-fastcgi-"))
    # 0755: nginx's worker (www-data when we are root) must reach the unix sockets in here.
    os.chmod(workdir, 0o755)
    for sub in ("sock", "logs"):
        (workdir / sub).mkdir(mode=0o755)
    flup_script, tinyweb_app = write_backends(workdir)
    if args.profile:
        try:
            profile_tinyweb(workdir, tinyweb_app, seconds, args.out_dir, args.profile)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return 0

    candidates, skipped = [], {}
    for candidate in CANDIDATES:
        if candidate.needs and not _importable(candidate.needs):
            skipped[candidate.name] = "%s is not importable by %s" % (candidate.needs, sys.executable)
            print("skipping %s: %s" % (candidate.name, skipped[candidate.name]), flush=True)
        else:
            candidates.append(candidate)
    results = {
        "schema": SCHEMA, "bench": "fastcgi",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "quick": args.quick, "machine": dict(harness.machine(), **_versions("bottle", "flask")),
        "tinyweb": tinyweb_source(),
        "settings": {"duration_s": seconds, "rounds": rounds, "seed": seed,
                     "loads": {name: {"connections": c, "wrk_threads": t} for name, c, t in loads},
                     "wrk": "wrk --timeout 5s, percentiles from wrk's latency histogram (as --latency)",
                     "nginx": "1 worker process, unix sockets, upstream keepalive %d + fastcgi_keep_conn "
                              "on for the -ka candidates" % UPSTREAM_KEEPALIVE},
        "candidates": {},
    }
    for candidate in CANDIDATES:
        entry = {"label": candidate.label, "model": candidate.model, "keepalive": candidate.keepalive,
                 "path": candidate.path}
        if candidate.name in skipped:
            entry["skipped"] = skipped[candidate.name]
        results["candidates"][candidate.name] = entry

    watch = LoadWatch()
    time.sleep(1.0)
    watch.check("before start")
    results["other_load"] = watch.log
    backends, nginx, keep = {}, None, False
    try:
        print("starting %d backends and nginx in %s" % (len(candidates) - 1, workdir), flush=True)
        backends = start_backends(workdir, candidates, flup_script, tinyweb_app)
        nginx = Nginx(workdir, {b.candidate: b.socket for b in backends.values() if b.socket}).start()
        for backend in backends.values():
            check_hello(nginx.port, backend.candidate)
            find_workers(backend)
            entry = results["candidates"][backend.candidate.name]
            entry["checked"] = '200 "hello"'
            if backend.process is not None:
                entry["argv"] = [Path(a).name if a.startswith(str(workdir)) else a
                                 for a in backend.process.argv[1:]]
                entry["workers"] = len(backend.workers)
        print("every candidate answered 200 \"hello\"", flush=True)
        watch.own_live = own_pids(nginx, backends)
        watch.check("servers started")
        memory_requests = QUICK_MEMORY_REQUESTS if args.quick else MEMORY_REQUESTS
        print("memory: %d requests, then %d more" % (memory_requests, memory_requests), flush=True)
        results["memory"] = measure_memory(nginx, backends, memory_requests)
        print("timing: %d round(s), %d s per run, loads %s"
              % (rounds, seconds, ", ".join(name for name, _, _ in loads)), flush=True)
        runs = time_candidates(nginx, backends, loads, rounds, seconds, workdir, random.Random(seed),
                               warmup=0 if args.quick else 1, watch=watch)
        results["runs"] = runs
        results["nginx_error_log_tail"] = nginx.error_log()
    except Exception:
        keep = True
        sys.stderr.write("bench/fastcgi.py failed; logs kept in %s\n" % workdir)
        if nginx is not None:
            sys.stderr.write("nginx error log:\n%s\n" % nginx.error_log())
        raise
    finally:
        stop_all(([nginx.process] if nginx is not None else [])
                 + [b.process for b in backends.values() if b.process is not None])
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)

    names = list(backends)
    results["summary"] = summarize(runs, loads, names)
    results["ratios"] = compute_ratios(runs, loads, names)
    results["targets"] = evaluate_targets(results["ratios"], results["summary"], results["memory"], loads)
    results["keepalive"] = keepalive_findings(results["summary"], results["ratios"], loads)
    results["flagged"] = sorted({name for load in results["summary"].values()
                                 for name, s in load.items() if s["flagged"]})
    results["machine"]["loadavg_at_end"] = os.getloadavg()
    results["elapsed_s"] = round(time.monotonic() - started, 1)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = "fastcgi-%s%s" % (datetime.datetime.now().strftime("%Y-%m-%d-%H%M%S"), "-quick" if args.quick else "")
    chart, note = write_chart(results, args.out_dir / (stem + ".png"))
    results["chart"], results["chart_note"] = chart, note
    json_path = args.out_dir / (stem + ".json")
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    print()
    print(format_table(results))
    print()
    print(format_ratios(results))
    print()
    print(format_cpu(results))
    print()
    print(format_memory(results["memory"]))
    print()
    print(format_targets(results))
    print("\nother work on this machine (CPU not used by this bench, incl. steal), per check: " + ", ".join(
        "%s %.0f %%" % (e["when"], e["share_of_machine"] * 100) for e in results["other_load"]))
    if results["flagged"]:
        print("\nflagged (wrk saw errors or timeouts): %s" % ", ".join(results["flagged"]))
    print()
    print("results: %s" % json_path)
    print(note)
    print("took %.0f s" % results["elapsed_s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
