"""Measure tinyweb under Apache prefork + mod_python's cgihandler against CGI on the same Apache.

    python bench/modpython.py            # 20 interleaved rounds of 20 requests per candidate
    python bench/modpython.py --quick    # 2 rounds of 5: a smoke test

Three private Apaches (prefork MPM, 127.0.0.1, User www-data), each from a config of its own
written by tests/servers.py, serve one app tree: a tinyweb hello (plus ``/session``, and
``/modules``, which reports what cgihandler will purge) with a venv built from
/usr/bin/python3 holding a regular install of the checkout:

  modpython          the README's config: ``PythonHandler mod_python.cgihandler``, PythonPath
  modpython+preload  the README's preloaded config (tests/servers.py's "modpython-preload"):
                     server-level PythonPath, the one line ``PythonImport
                     tinyweb.runners.modpython::preload main_interpreter``, and
                     ``PythonInterpreter main_interpreter`` on the app
  cgi                mod_cgi, the app.py executed per request

and two floors: ``bare.py``, a script that imports only sys, served by cgihandler (in the
preloaded Apache, in main_interpreter too) and by mod_cgi.

cgihandler deletes, before every request, each module that was not in ``sys.modules`` when
cgihandler itself was first imported (bar top-level stdlib files): webob, tinyweb and stdlib
packages such as email are re-imported on every request. ``PythonImport`` runs at child
start, before the first request imports cgihandler, so what it imports is kept; tinyweb's
``preload()`` runs one request through a throwaway app, so it imports what a request does.
The bench checks that on one connection (one Apache child): ``preload()`` ran there,
``sys.modules['webob']`` stays the same object (a counter kept on it grows), and nothing but
the app script is purged after a hello or after a session request (what a hello and a
session request leave to purge under plain cgihandler is reported too). If anything else
is still purged, the preload does not hold and the bench stops, naming it.

Each request is timed by a sequential client (a fresh connection per request, GET to the
last byte); rounds run each candidate's batch in a random order. Every response must be a
200 with the hello body. Results go to ``bench/results/modpython-<date>.json`` and a PNG
chart beside it when matplotlib is importable. See bench/README.md.
"""

import argparse
import datetime
import http.client
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import harness

sys.path.insert(0, str(harness.REPO / "tests"))
import servers  # noqa: E402  (tests/servers.py: the venv, the app tree, Apache from its own config)

SCHEMA = 1
ROUNDS, QUICK_ROUNDS = 20, 2
REQUESTS, QUICK_REQUESTS = 20, 5
WARM_REQUESTS = 12
HELLO = b"<h1>Hello, world!</h1>\n"
PATH = "/app.py/"
SESSION_PATH = "/app.py/session"
VISIT = re.compile(rb"<h1>Hello, visit \d+</h1>\n")
REQUEST_TIMEOUT = 30.0
INTERPRETER = "main_interpreter"
PRELOAD_LINE = "PythonImport tinyweb.runners.modpython::preload %s" % INTERPRETER

PLAIN, PRELOAD, CGI = "modpython", "modpython+preload", "cgi"
# Floors: a script that imports only sys, under the preloaded mod_python and under CGI.
BARE_MP, BARE_CGI = "modpython bare script", "cgi bare script"
BARE_PATH = "/bare.py"
ORDER = [BARE_MP, PLAIN, PRELOAD, BARE_CGI, CGI]

BARE = '''\
#!%s
"""The floor of bench/modpython.py: a CGI script that imports nothing but sys."""
import sys

sys.stdout.write("Status: 200 OK\\r\\nContent-Type: text/html; charset=utf-8\\r\\n\\r\\n"
                 "<h1>Hello, world!</h1>\\n")
'''

APP = '''\
#!/usr/bin/env python3
"""The tinyweb hello of bench/modpython.py; /modules says what cgihandler purges."""
import os
import sys

import tinyweb

app = tinyweb.App(__name__)


@app.get("/")
def index(request):
    return "<h1>Hello, world!</h1>\\n"


@app.get("/session")
def session(request):
    request.session["visits"] = request.session.get("visits", 0) + 1
    return "<h1>Hello, visit %d</h1>\\n" % request.session["visits"]


def _purgeable():
    """Return the modules cgihandler will delete before the next request in this process."""
    cgihandler = sys.modules.get("mod_python.cgihandler")
    if cgihandler is None:
        return None
    # cgihandler.handler's own rule (mod_python/cgihandler.py): every module not in
    # `original` goes, unless it has no __file__ or its file sits directly in the stdlib dir.
    original = set(cgihandler.original)
    return sorted(name for name, module in list(sys.modules.items())
                  if name not in original and getattr(module, "__file__", None)
                  and os.path.dirname(module.__file__) != cgihandler.stdlib)


@app.get("/modules")
def modules(request):
    webob = sys.modules.get("webob")
    seen = None
    if webob is not None:
        # A counter kept on the module object: it grows only while the module survives.
        seen = webob.__dict__["_bench_requests_seen"] = webob.__dict__.get("_bench_requests_seen", 0) + 1
    cgihandler = sys.modules.get("mod_python.cgihandler")
    runner = sys.modules.get("tinyweb.runners.modpython")
    return {"pid": os.getpid(), "webob_id": id(webob) if webob else None, "webob_seen": seen,
            "interpreter": getattr(sys.modules.get("mod_python.apache"), "interpreter", None),
            # True only in the module object preload() ran in (a purge re-imports it as False).
            "preloaded": getattr(runner, "preloaded", None),
            "original": len(cgihandler.original) if cgihandler else None,
            # Noted at the very end of the previous request in this process (below).
            "purged_before_this_request": getattr(sys, "tinyweb_bench_purge", None)}


app.run()

# The request is served: note, on a module the purge keeps, what it will delete next time.
sys.tinyweb_bench_purge = _purgeable()
'''


class BenchError(RuntimeError):
    """A server gave a response the bench cannot use; the message says which and shows it."""


def missing() -> Optional[str]:
    """Say what this bench needs that the machine lacks, or return None."""
    if os.geteuid() != 0:
        return "the bench must run as root (Apache switches to %s)" % servers.SERVER_USER
    try:
        import pwd

        pwd.getpwnam(servers.SERVER_USER)
    except KeyError:
        return "there is no user %s" % servers.SERVER_USER
    for path, package in (("/usr/sbin/apache2", "apache2"),
                          ("/usr/lib/apache2/modules/mod_mpm_prefork.so", "apache2"),
                          ("/usr/lib/apache2/modules/mod_cgi.so", "apache2"),
                          ("/usr/lib/apache2/modules/mod_python.so", "libapache2-mod-python"),
                          (servers.SYSTEM_PYTHON, "python3")):
        if not os.path.exists(path):
            return "%s is missing (Debian package %s)" % (path, package)
    return None


# --- HTTP ----------------------------------------------------------------------------------------


def get(conn: http.client.HTTPConnection, path: str) -> Tuple[int, bytes]:
    conn.request("GET", path, headers={"User-Agent": "tinyweb-bench"})
    response = conn.getresponse()
    return response.status, response.read()


def timed_get(port: int, path: str = PATH) -> Tuple[float, int, bytes]:
    """GET ``path`` on a fresh connection; return (seconds to the last byte, status, body)."""
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT)
    try:
        status, body = get(conn, path)
        elapsed = time.perf_counter() - start
    finally:
        conn.close()
    return elapsed, status, body


def check(name: str, server: servers.Server, status: int, body: bytes) -> None:
    if status != 200 or body != HELLO:
        raise BenchError("%s answered %d %r, not 200 %r\n%s"
                         % (name, status, body[:300], HELLO, server.log_text(3000)))


def probe_modules(name: str, server: servers.Server, middle: str = PATH) -> dict:
    """On one connection (so one Apache child): /modules, ``middle``, /modules again.

    The second report says whether webob survived the ``middle`` request (the hello, or one
    that reads and writes the session), and what the purge deleted before it: everything
    that request left that cgihandler does not keep.
    """
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=REQUEST_TIMEOUT)
    reports = []
    try:
        for path in ("/app.py/modules", middle, "/app.py/modules"):
            status, body = get(conn, path)
            if path == PATH:
                check(name, server, status, body)
                continue
            if path == SESSION_PATH:
                if status != 200 or not VISIT.fullmatch(body):
                    raise BenchError("%s: %s answered %d %r\n%s"
                                     % (name, path, status, body[:300], server.log_text(3000)))
                continue
            if status != 200:
                raise BenchError("%s: %s answered %d %r\n%s"
                                 % (name, path, status, body[:300], server.log_text(3000)))
            reports.append(json.loads(body))
    finally:
        conn.close()
    first, second = reports
    if first["pid"] != second["pid"]:
        raise BenchError("%s: requests on one connection reached two processes %s"
                         % (name, [first["pid"], second["pid"]]))
    return {
        "pid": first["pid"],
        "interpreter": first["interpreter"],
        "preloaded": [first["preloaded"], second["preloaded"]],
        "webob_id": [first["webob_id"], second["webob_id"]],
        "webob_seen": [first["webob_seen"], second["webob_seen"]],
        # The counter on the module object is the proof; equal ids alone could be a reused address.
        "webob_kept": second["webob_seen"] == first["webob_seen"] + 1
        and first["webob_id"] == second["webob_id"],
        "original_modules": second["original"],
        "purged_per_request": second["purged_before_this_request"] or [],
    }


# --- the servers ---------------------------------------------------------------------------------


def preload_conf(server: servers.Server) -> str:
    """Return the mod_python lines of ``server``'s config (the preload, as tests/servers.py wrote it)."""
    lines = Path(server.info["conf"]).read_text().splitlines()
    top = [line for line in lines if re.match(r"Python\w+ ", line)]  # server level: not indented
    first = next(i for i, line in enumerate(lines) if line.strip() == '<Files "app.py">')
    last = next(i for i in range(first, len(lines)) if lines[i].strip() == "</Files>")
    return "\n".join(top + ['<Directory "%s">' % server.docroot] + lines[first:last + 1]
                     + ["</Directory>"]) + "\n"


def bare_conf(site: servers.Site, venv: servers.Venv) -> str:
    """Return the lines that serve bare.py through cgihandler too (a floor; not part of the advice).

    In main_interpreter, where the preloaded app runs, so the floor is cgihandler there.
    """
    return "\n".join([
        "", "# bench/modpython.py: the floor, a script that imports only sys.",
        '<Directory "%s">' % site.htdocs,
        '    <Files "bare.py">',
        "        SetHandler mod_python",
        "        PythonHandler mod_python.cgihandler",
        "        PythonInterpreter %s" % INTERPRETER,
        "    </Files>",
        "</Directory>", ""])


def start(workdir: Path, kind: str, site: servers.Site, venv: servers.Venv,
          extra_conf: str = "") -> servers.Server:
    handler = {CGI: "cgi", PLAIN: "modpython", PRELOAD: "modpython-preload"}[kind]
    server = servers.start_apache(workdir / kind.replace("+", "-"), site.htdocs, mpm="prefork",
                                  handler=handler, venv=venv, name=kind, extra_conf=extra_conf)
    server.site = site
    return server


# --- timing --------------------------------------------------------------------------------------


def _session_cpu_with_reaped(sid: int) -> float:
    """CPU seconds of the processes in session ``sid``, with the children they reaped.

    mod_cgi's scripts are children of the Apache children, which reap them: their time is
    in the Apache children's cutime/cstime (proc(5) fields 16-17), not in their own.
    """
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in harness._session_members(sid):
        try:
            with open("/proc/%d/stat" % pid, "rb") as f:
                stat = f.read()
        except OSError:
            continue  # exited in between
        fields = stat[stat.rfind(b")") + 2:].split()
        total += sum(int(v) for v in fields[11:15]) / tick
    return total


class ApacheCpuMeter(harness.CpuMeter):
    """harness.CpuMeter for Apache sessions: the CGI scripts the Apaches ran count as ours."""

    def _ours(self) -> float:
        own = sum(os.times()[:2])
        return sum(_session_cpu_with_reaped(sid) for sid in self.sessions) + harness._children_cpu() + own



def warm(name: str, server: servers.Server, count: int, path: str = PATH) -> None:
    for _ in range(count):
        _, status, body = timed_get(server.port, path)
        check(name, server, status, body)


def time_rounds(cands: Dict[str, Tuple[servers.Server, str]], rounds: int, requests: int,
                seed: int) -> Dict[str, List[List[float]]]:
    """Per round, run each candidate's batch of sequential requests, in a random order."""
    rng = random.Random(seed)
    times: Dict[str, List[List[float]]] = {name: [] for name in cands}
    for number in range(rounds):
        order = list(cands)
        rng.shuffle(order)
        for name in order:
            server, path = cands[name]
            batch = []
            for _ in range(requests):
                elapsed, status, body = timed_get(server.port, path)
                check(name, server, status, body)
                batch.append(elapsed)
            times[name].append(batch)
        if (number + 1) % 5 == 0 or number + 1 == rounds:
            print("  round %d/%d" % (number + 1, rounds), flush=True)
    return times


def summarise(times: Dict[str, List[List[float]]]) -> Tuple[List[dict], dict]:
    def ms(x):
        return round(x * 1000, 3)

    flat = {name: [t for batch in batches for t in batch] for name, batches in times.items()}
    med = {name: statistics.median(v) for name, v in flat.items()}
    low = {name: min(v) for name, v in flat.items()}
    rows = []
    for name, values in flat.items():
        rows.append({
            "name": name, "requests": len(values),
            "median_ms": ms(med[name]), "min_ms": ms(low[name]),
            "p90_ms": ms(statistics.quantiles(values, n=10)[-1]) if len(values) >= 10 else None,
            "x_cgi_median": round(med[name] / med[CGI], 3),
            "x_cgi_min": round(low[name] / low[CGI], 3),
            "round_medians_ms": [ms(statistics.median(b)) for b in times[name]],
        })

    def paired(name):
        # Each round's median over the CGI median of the same round, then the median of those.
        return round(statistics.median(statistics.median(a) / statistics.median(c)
                                       for a, c in zip(times[name], times[CGI])), 3)

    ratios = {
        "preload_over_cgi_median": round(med[PRELOAD] / med[CGI], 3),
        "preload_over_cgi_min": round(low[PRELOAD] / low[CGI], 3),
        "preload_over_cgi_paired": paired(PRELOAD),
        "plain_over_cgi_median": round(med[PLAIN] / med[CGI], 3),
        "plain_over_cgi_min": round(low[PLAIN] / low[CGI], 3),
        "plain_over_cgi_paired": paired(PLAIN),
    }
    return rows, ratios


# --- output --------------------------------------------------------------------------------------


def format_tables(results: dict) -> str:
    during = results.get("cpu_during_timing", {})
    lines = ["%d interleaved rounds × %d sequential requests per candidate (fresh connection each, "
             "time to the last byte). Load average before timing %s; other work on the machine "
             "while timing: %.1f %% of its CPU (steal %.1f %%)."
             % (results["rounds"], results["requests_per_round"],
                " ".join("%.2f" % v for v in results.get("loadavg_before_timing", ())),
                100 * during.get("foreign_share", 0.0), 100 * during.get("steal_share", 0.0)), "",
             "| candidate | median ms | min ms | p90 ms | × CGI (median) | × CGI (min) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results["rows"]:
        lines.append("| %s | %.2f | %.2f | %s | %.3f | %.3f |" % (
            r["name"], r["median_ms"], r["min_ms"],
            "%.2f" % r["p90_ms"] if r["p90_ms"] is not None else "-", r["x_cgi_median"], r["x_cgi_min"]))
    ratios = results["ratios"]
    target = results["target"]
    lines += ["", "(b)/(c) preloaded mod_python / CGI: %.3f median, %.3f min, %.3f paired by round; "
              "(a)/(c) plain cgihandler / CGI: %.3f median, %.3f min."
              % (ratios["preload_over_cgi_median"], ratios["preload_over_cgi_min"],
                 ratios["preload_over_cgi_paired"], ratios["plain_over_cgi_median"],
                 ratios["plain_over_cgi_min"]),
              "Target %s: %s." % (target["target"], "met" if target["met"] else "**not met**"), "",
              "The preloaded Apache's mod_python lines (bare.py's left out):", "", "```apache"]
    lines += results["preload"]["conf"].strip().splitlines()
    lines += ["```", ""]
    preload = results["preload"]
    lines.append("%s: preload() %s in the child; after a hello %s, after a session request %s." % (
        preload["line"], "ran" if preload["ran"] else "did not run",
        "purged " + _short(preload["still_purged_after_hello"]) if preload["still_purged_after_hello"]
        else "only app.py is purged",
        "purged " + _short(preload["still_purged_after_session"]) if preload["still_purged_after_session"]
        else "only app.py"))
    lines.append("")
    for name in (PLAIN, PRELOAD):
        s = results["survival"][name]
        lines.append("%s, two requests on one connection (pid %s, interpreter %s): "
                     "id(webob) %s → %s, counter on webob %s → %s: webob %s; purged per request: %s."
                     % (name, s["pid"], s["interpreter"], s["webob_id"][0], s["webob_id"][1],
                        s["webob_seen"][0], s["webob_seen"][1],
                        "kept" if s["webob_kept"] else "re-imported",
                        _short(s["purged_per_request"])))
    for name in (PLAIN, PRELOAD):
        s = results["survival_session"][name]
        lines.append("%s, after a request that reads and writes the session: purged %s."
                     % (name, _short(s["purged_per_request"])))
    return "\n".join(lines)


def _short(names: List[str], limit: int = 12) -> str:
    if len(names) <= limit:
        return ", ".join(names) or "nothing"
    return "%s … (%d modules)" % (", ".join(names[:limit]), len(names))


def write_chart(results: dict, path: Path) -> str:
    try:
        import matplotlib
    except ImportError:
        return "chart skipped: matplotlib is not importable (pip install tinyweb[bench])"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    y = range(len(rows))
    ax.barh(y, [r["median_ms"] for r in rows], color="#4c72b0", label="median")
    ax.plot([r["min_ms"] for r in rows], y, "k|", markersize=14, label="min")
    cgi = next(r for r in rows if r["name"] == CGI)["median_ms"]
    ax.axvline(cgi * 0.3, color="#c44e52", linestyle="--", linewidth=1)
    ax.text(cgi * 0.3, -0.55, " target: 0.3 × CGI", color="#c44e52", fontsize=8, va="bottom")
    ax.set_yticks(list(y))
    ax.set_yticklabels([r["name"] for r in rows])
    ax.set_ylim(len(rows) - 0.5, -0.9)  # the first row on top, room for the label above it
    ax.set_xlabel("ms per request (sequential client, Apache prefork)")
    ax.set_title("tinyweb hello: mod_python cgihandler vs CGI (%s)" % results["date"][:10])
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return "chart: %s" % path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="%d rounds of %d requests: a smoke test" % (QUICK_ROUNDS, QUICK_REQUESTS))
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default %d)" % ROUNDS)
    parser.add_argument("--requests", type=int,
                        help="sequential requests per candidate per round (default %d)" % REQUESTS)
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
    requests = args.requests or (QUICK_REQUESTS if args.quick else REQUESTS)
    if rounds < 1 or requests < 1:
        parser.error("--rounds and --requests must be at least 1")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2 ** 32)

    lack = missing()
    if lack:
        sys.stderr.write("bench/modpython.py: %s; install it and run again\n" % lack)
        return 1
    # A SIGTERM unwinds like Ctrl-C, so the Apaches are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    started = time.monotonic()
    print("venv from %s with %s installed (cached by content)"
          % (servers.SYSTEM_PYTHON, args.checkout), flush=True)
    venv = servers.build_venv(args.checkout)
    workdir = servers.new_workdir("bench-modpython")
    source = workdir / "htdocs-source"
    source.mkdir()
    (source / "app.py").write_text(APP)
    site = servers.make_site(workdir, source, venv.python)
    bare = site.htdocs / "bare.py"
    bare.write_text(BARE % venv.python)
    os.chmod(bare, 0o755)
    running: Dict[str, servers.Server] = {}
    keep = False
    try:
        running[PLAIN] = start(workdir, PLAIN, site, venv)
        running[CGI] = start(workdir, CGI, site, venv)
        warm(PLAIN, running[PLAIN], 2)
        plain = probe_modules(PLAIN, running[PLAIN])
        plain_session = probe_modules(PLAIN, running[PLAIN], SESSION_PATH)
        if plain["webob_kept"]:
            raise BenchError("webob survived plain cgihandler's purge: the bench's premise is wrong "
                             "(%s)" % plain)
        # The README's preloaded config: one PythonImport line; bare.py served beside it.
        running[PRELOAD] = start(workdir, PRELOAD, site, venv, bare_conf(site, venv))
        warm(PRELOAD, running[PRELOAD], 2)
        kept = probe_modules(PRELOAD, running[PRELOAD])
        kept_session = probe_modules(PRELOAD, running[PRELOAD], SESSION_PATH)
        after_hello = [m for m in kept["purged_per_request"] if m != "app"]
        after_session = [m for m in kept_session["purged_per_request"] if m != "app"]
        leftover = sorted(set(after_hello) | set(after_session))
        preload = {"line": PRELOAD_LINE, "conf": preload_conf(running[PRELOAD]),
                   "interpreter": INTERPRETER,
                   "ran": kept["preloaded"] == [True, True] and kept_session["preloaded"] == [True, True],
                   "webob_kept": kept["webob_kept"] and kept_session["webob_kept"],
                   "still_purged": leftover, "still_purged_after_hello": after_hello,
                   "still_purged_after_session": after_session}
        print("  %s: preload %s; webob %s; %s" % (
            PRELOAD_LINE, "ran" if preload["ran"] else "DID NOT RUN",
            "kept" if preload["webob_kept"] else "RE-IMPORTED",
            "still purged per request: " + _short(leftover) if leftover else "nothing but app.py purged"),
            flush=True)
        if not (preload["ran"] and preload["webob_kept"]) or leftover:
            raise BenchError("the one-line preload did not hold: %s\nafter a hello: %s\nafter a "
                             "session request: %s\n%s" % (preload, kept, kept_session,
                                                          running[PRELOAD].log_text(3000)))
        cands = {PLAIN: (running[PLAIN], PATH), PRELOAD: (running[PRELOAD], PATH),
                 CGI: (running[CGI], PATH), BARE_MP: (running[PRELOAD], BARE_PATH),
                 BARE_CGI: (running[CGI], BARE_PATH)}
        for name, (server, path) in cands.items():
            warm(name, server, WARM_REQUESTS, path)
        loadavg_before = os.getloadavg()
        print("timing: %d rounds × %d requests (seed %d); load average %.2f %.2f %.2f"
              % ((rounds, requests, seed) + loadavg_before), flush=True)
        meter = ApacheCpuMeter([server.processes[0].sid for server in running.values()])
        meter.start()
        times = time_rounds(cands, rounds, requests, seed)
        during = meter.stop()
        print("other work on the machine while timing: %.1f %% of its CPU (steal %.1f %%)"
              % (100 * during["foreign_share"], 100 * during["steal_share"]), flush=True)
        rows, ratios = summarise(times)
        rows.sort(key=lambda r: ORDER.index(r["name"]))
        value = ratios["preload_over_cgi_median"]
        results = {
            "schema": SCHEMA, "bench": "modpython",
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "quick": args.quick, "rounds": rounds, "requests_per_round": requests, "seed": seed,
            "machine": _machine(venv), "checkout": checkout_state(args.checkout),
            "method": "sequential client, a fresh TCP connection per request, GET %s timed from "
                      "connect to the last body byte; each round runs every candidate's batch in "
                      "a random order" % PATH,
            "rows": rows, "ratios": ratios,
            "loadavg_before_timing": loadavg_before,
            "cpu_during_timing": {k: round(v, 4) for k, v in during.items()},
            "target": {"target": "preloaded mod_python ≤ 0.3 × plain CGI through Apache",
                       "value": value, "limit": 0.3, "met": value <= 0.3},
            "preload": preload,
            "survival": {PLAIN: plain, PRELOAD: kept},
            "survival_session": {PLAIN: plain_session, PRELOAD: kept_session},
            "purged_under_plain_cgihandler": plain["purged_per_request"],
            "purged_under_plain_cgihandler_session": plain_session["purged_per_request"],
        }
    except Exception:
        keep = True
        sys.stderr.write("bench/modpython.py failed; configs and logs kept in %s\n" % workdir)
        raise
    finally:
        for server in running.values():
            server.stop()
    if not keep:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = "modpython-%s%s" % (datetime.datetime.now().strftime("%Y-%m-%d-%H%M%S"),
                                "-quick" if args.quick else "")
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


def _machine(venv: servers.Venv) -> dict:
    """Describe the machine, with the versions mod_python and the CGI script actually use."""
    info = harness.machine()
    for key in ("nginx", "wrk", "zlib"):
        info.pop(key, None)
    code = ("import importlib.metadata as m, json; "
            "print(json.dumps({n: m.version(n) for n in ('webob', 'beaker', 'flup')}))")
    try:
        done = subprocess.run([str(venv.python), "-c", code], capture_output=True, text=True, timeout=30)
        info.update(json.loads(done.stdout))
        done = subprocess.run(["/usr/sbin/apache2", "-v"], capture_output=True, text=True, timeout=10)
        info["apache"] = done.stdout.splitlines()[0].split(":", 1)[1].strip()
        done = subprocess.run([servers.SYSTEM_PYTHON, "-V"], capture_output=True, text=True, timeout=10)
        info["mod_python_python"] = done.stdout.strip()
    except (OSError, IndexError, ValueError, subprocess.TimeoutExpired):
        pass
    info["mod_python"] = _mod_python_version()
    return info


def _mod_python_version() -> str:
    try:
        text = Path("/usr/lib/python3/dist-packages/mod_python/version.py").read_text()
    except OSError:
        return "unknown"
    for line in text.splitlines():
        if line.startswith("version"):
            return line.split("=", 1)[1].strip().strip("\"'")
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())
