"""Measure what gzip (by level) and the ETag cost on a ~20 KB HTML page served by tinyweb.

    python bench/gzip.py            # the full run (about 3 minutes)
    python bench/gzip.py --quick    # every part for about a second each (a smoke test)

Part 1, in process: md5 of the body (the ETag), zlib at levels 1, 4, 6 and 9 (gzip framing),
a dict lookup (a cache hit), and the whole ``App.__call__`` of a tiny app returning the page
with ``Accept-Encoding`` absent or gzip, each as the best of several interleaved rounds.

Part 2, through nginx and FastCGI: one FastCGI server per candidate (1 worker, so the CPU
a request costs shows), nginx in front, ``wrk -c1 -t1`` and ``wrk -c8 -t2`` taking turns on
the candidates for several rounds; each ratio is to identity in the same round, and the
median over rounds is reported.

The results go to ``bench/results/gzip-<date>-<time>.json`` (and a PNG chart next to it when
matplotlib is importable). tinyweb is not changed: the bench app sets the gzip level and
puts the cache in by monkeypatching ``tinyweb.representation``. See bench/README.md.
"""

import argparse
import datetime
import hashlib
import html
import importlib.util
import io
import json
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import harness

LEVELS = (1, 4, 6, 9)
PAGE_SIZE = 20_000
# What a browser sends; accepts_gzip() parses the whole header on every request.
BROWSER_ACCEPT = "gzip, deflate, br"
SCHEMA = 1
# A run in which other work took more than this share of the machine's CPU is counted as
# disturbed (this machine is shared); the report says how many there were.
DISTURBED = 0.10


@dataclass(frozen=True)
class Candidate:
    name: str
    level: int
    cache: bool = False
    gzip: bool = True  # whether the client (wrk) sends Accept-Encoding

    @property
    def slug(self):
        """The name as it can stand in a URL path and an nginx regex location."""
        return self.name.replace("+", "-")

    @property
    def headers(self):
        return ["Accept-Encoding: " + BROWSER_ACCEPT] if self.gzip else []


CANDIDATES = [
    Candidate("identity", 6, gzip=False),
    Candidate("gzip-1", 1),
    Candidate("gzip-6", 6),
    Candidate("gzip-9", 9),
    Candidate("gzip-6+cache", 6, cache=True),
]
LOADS = [("c1", 1, 1), ("c8", 8, 2)]  # name, wrk connections, wrk threads


# --- the page and the app --------------------------------------------------------------------


def make_page(size=PAGE_SIZE):
    """Return a ~``size``-byte HTML page: markup, a 60-row table and English prose, the same every run."""
    # Prose from Python's own documentation (pydoc_data ships with CPython): real English
    # compresses like real pages do, where random words would flatter or punish gzip.
    from pydoc_data.topics import topics

    rng = random.Random(20)
    text = " ".join(topics[k] for k in ("if", "for", "while", "try", "with", "function",
                                        "class", "import", "assignment", "lambda", "numbers"))
    words = text.split()
    names = [w for w in words if w.isalpha() and len(w) > 3]
    parts = ['<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
             '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
             "<title>Catalogue &mdash; Example Shop</title>\n"
             '<link rel="stylesheet" href="/static/site.css?v=20261122">\n<style>\n'
             "body{font-family:system-ui,sans-serif;margin:0;color:#222;background:#fafafa}\n"
             "header,footer{background:#234;color:#fff;padding:.5em 1em}\n"
             "nav a{color:#cde;margin-right:1em}\ntable{border-collapse:collapse;width:100%}\n"
             "td,th{border-bottom:1px solid #ddd;padding:.25em .5em;text-align:left}\n"
             "td.num{text-align:right;font-variant-numeric:tabular-nums}\n"
             ".tag{border-radius:3px;padding:0 .3em;font-size:.8em}\n"
             ".tag-new{background:#dfd}.tag-sale{background:#fdd}.tag-old{background:#eee}\n"
             "</style>\n</head>\n<body>\n<header><nav>"]
    for label in ("Home", "Catalogue", "Offers", "New arrivals", "Brands", "Gift cards",
                  "Help", "Contact", "Account", "Basket"):
        parts.append('<a href="/%s/">%s</a>' % (label.lower().replace(" ", "-"), label))
    parts.append("</nav></header>\n<main>\n<h1>Catalogue</h1>\n<table>\n<thead><tr><th>Item</th>"
                 "<th>Brand</th><th>Price</th><th>Stock</th><th>Added</th><th></th></tr></thead>\n"
                 "<tbody>\n")
    brands = ["Acme", "Globex", "Initech", "Umbrella", "Hooli", "Vandelay", "Stark", "Wayne"]
    months = "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split()
    for _ in range(60):
        name = " ".join(rng.choice(names).capitalize() for _ in range(rng.randint(2, 4)))
        tag = rng.choice(["new", "sale", "old"])
        month, day = rng.randint(1, 12), rng.randint(1, 28)
        parts.append(
            '<tr><td><a href="/items/%d">%s</a></td><td>%s</td><td class="num">%d.%02d</td>'
            '<td class="num">%d</td><td><time datetime="2026-%02d-%02d">%d %s</time></td>'
            '<td><span class="tag tag-%s">%s</span></td></tr>\n'
            % (rng.randrange(10000, 99999), html.escape(name), rng.choice(brands),
               rng.randrange(1, 500), rng.randrange(100), rng.randrange(300), month, day, day,
               months[month - 1], tag, tag))
    parts.append("</tbody>\n</table>\n<section>\n")
    tail = ("</section>\n</main>\n<footer><p>&copy; 2026 Example Shop. Prices include VAT."
            "</p></footer>\n</body>\n</html>\n")
    used, start = sum(map(len, parts)) + len(tail), 0
    while used < size and start < len(words):
        count = rng.randint(40, 90)
        paragraph = "<p>%s</p>\n" % html.escape(" ".join(words[start:start + count]))
        parts.append(paragraph)
        used += len(paragraph)
        start += count
    return "".join(parts) + tail


# The app the FastCGI servers run, written next to page.html; imported in process as well.
APP_SOURCE = '''\
"""Serve the gzip bench's page; BENCH_GZIP_LEVEL and BENCH_GZIP_CACHE say how it is compressed.

Written by bench/gzip.py. tinyweb is not changed: the level and the cache are put into
tinyweb.representation here, at startup, the way an app could.
"""
import hashlib
import os
import zlib
from pathlib import Path

import tinyweb
from tinyweb import representation

PAGE = (Path(__file__).parent / "page.html").read_text(encoding="utf-8")
PAGE_ETAG = hashlib.md5(PAGE.encode("utf-8")).hexdigest()
CACHE_SIZE = 64

app = tinyweb.App(__name__)


@app.get("/")
def page(request):
    return PAGE


@app.get("/given-etag")
def page_with_etag(request):
    # A handler that knows its validator: finish() then skips the md5.
    request.response.etag = PAGE_ETAG
    return PAGE


_finish = representation.finish
_zlib = representation.zlib
_cache = {}
_responding = []  # the response finish() is working on (a worker serves one at a time)


class _CachedCompressor:
    """Answer compress() from the cache, keyed by the identity ETag finish() has just set."""

    def __init__(self, level, method, wbits):
        self.args = (level, method, wbits)

    def compress(self, data):
        key = (_responding[-1].headers["ETag"], self.args)
        body = _cache.get(key)
        if body is None:
            compressor = zlib.compressobj(*self.args)
            body = compressor.compress(data) + compressor.flush()
            if len(_cache) >= CACHE_SIZE:
                del _cache[next(iter(_cache))]  # the oldest: dicts keep insertion order
            _cache[key] = body
        return body

    def flush(self):
        return b""


class _CachingZlib:
    """Stand in for zlib inside tinyweb.representation: compressobj() goes through the cache."""

    DEFLATED = zlib.DEFLATED
    compressobj = _CachedCompressor


def finish_with_cache(request, response):
    """Run tinyweb's own finish(), letting its compress step see which response it serves."""
    _responding.append(response)
    try:
        return _finish(request, response)
    finally:
        _responding.pop()


def configure(level, cache):
    """Set tinyweb's gzip level; put the cache around its compress step, or take it away."""
    representation.GZIP_LEVEL = level
    # App._respond imports finish from the module on every request, so this takes effect.
    representation.finish = finish_with_cache if cache else _finish
    representation.zlib = _CachingZlib if cache else _zlib
    _cache.clear()


configure(int(os.environ.get("BENCH_GZIP_LEVEL") or representation.GZIP_LEVEL),
          os.environ.get("BENCH_GZIP_CACHE") == "1")
app.run()
'''


def write_site(workdir):
    """Write site/{tinyweb.ini, htdocs/app.py, htdocs/page.html}; return (app path, page bytes)."""
    htdocs = workdir / "site" / "htdocs"
    htdocs.mkdir(parents=True)
    for path in (workdir / "site", htdocs):
        os.chmod(path, 0o755)
    # A config file of its own, so the app neither warns about a missing one nor reads another.
    (workdir / "site" / "tinyweb.ini").write_text("[tinyweb]\ndebug = false\n")
    page = make_page()
    (htdocs / "page.html").write_text(page, encoding="utf-8")
    app_path = htdocs / "app.py"
    app_path.write_text(APP_SOURCE)
    return app_path, page.encode("utf-8")


def gzip_bytes(data, level):
    compressor = zlib.compressobj(level, zlib.DEFLATED, 31)  # 31: gzip framing, as tinyweb does
    return compressor.compress(data) + compressor.flush()


# --- part 1: in process ----------------------------------------------------------------------


def load_app_module(app_path):
    """Import the bench app under its own module name (so app.run() only returns)."""
    name = "tinyweb_gzip_bench_app"
    spec = importlib.util.spec_from_file_location(name, app_path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # App.app_file finds the file, and tinyweb.ini, through it
    spec.loader.exec_module(module)
    return module


def _environ(path, accept):
    """Return the environ nginx's fastcgi_params would give for GET /app.py``path``."""
    environ = {
        "REQUEST_METHOD": "GET", "SCRIPT_NAME": "/app.py", "PATH_INFO": path,
        "QUERY_STRING": "", "REQUEST_URI": "/app.py" + path, "CONTENT_TYPE": "",
        "CONTENT_LENGTH": "", "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "127.0.0.1", "HTTP_HOST": "127.0.0.1",
        "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(),
        "wsgi.errors": sys.stderr, "wsgi.multithread": False, "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }
    if accept:
        environ["HTTP_ACCEPT_ENCODING"] = accept
    return environ


def _caller(app, path, accept):
    """Return a function that runs one whole request through ``app`` and returns (status, headers, body)."""
    base = _environ(path, accept)

    def call():
        seen = []
        result = app(dict(base), lambda status, headers, exc_info=None: seen.append((status, headers)))
        try:
            body = b"".join(result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        return seen[0][0], dict(seen[0][1]), body

    return call


def _check_in_process(name, call, page, gzip):
    status, headers, body = call()
    if not status.startswith("200"):
        raise RuntimeError("in process, %s answered %s" % (name, status))
    if gzip and (headers.get("Content-Encoding") != "gzip" or zlib.decompress(body, 31) != page):
        raise RuntimeError("in process, %s did not answer the page gzipped: %r" % (name, headers))
    if not gzip and (headers.get("Content-Encoding") or body != page):
        raise RuntimeError("in process, %s did not answer the page as it is: %r" % (name, headers))
    if "ETag" not in headers:
        raise RuntimeError("in process, %s sent no ETag" % name)


def in_process(app_path, page, quick):
    """Time the pieces of a request, and whole requests, in this process; return rows."""
    module = load_app_module(app_path)
    from tinyweb import representation

    saved = (representation.GZIP_LEVEL, representation.finish, representation.zlib)
    pieces = {"md5 of the body (the ETag)": lambda: hashlib.md5(page).hexdigest()}
    for level in LEVELS:
        pieces["zlib level %d (gzip framing)" % level] = lambda level=level: gzip_bytes(page, level)
    cache = {(hashlib.md5(page).hexdigest(), 6): gzip_bytes(page, 6)}
    key = next(iter(cache))
    pieces["dict lookup (a cache hit)"] = lambda: cache.get(key)

    requests, setup = {}, {}
    # label, path, Accept-Encoding, gzip level, cache
    whole = [("identity", "/", None, 6, False),
             ("identity, ETag given by the handler (no md5)", "/given-etag", None, 6, False)]
    whole += [("gzip level %d" % level, "/", BROWSER_ACCEPT, level, False) for level in LEVELS]
    whole += [("gzip level 6 + cache", "/", BROWSER_ACCEPT, 6, True)]
    try:
        for label, path, accept, level, cached in whole:
            name = "whole request: " + label
            requests[name] = _caller(module.app, path, accept)
            setup[name] = lambda level=level, cached=cached: _configure(module, level, cached)
            setup[name]()
            _check_in_process(name, requests[name], page, accept is not None)
        rounds, target = (3, 0.02) if quick else (7, 0.2)
        best = harness.time_interleaved(dict(pieces, **requests), rounds, target, setup)
    finally:
        representation.GZIP_LEVEL, representation.finish, representation.zlib = saved
        sys.modules.pop(module.__name__, None)
    floor = best["whole request: identity"]
    rows = []
    for name, seconds in best.items():
        row = {"name": name, "us": seconds * 1e6, "ratio_to_identity_request": seconds / floor}
        level = next((lv for lv in LEVELS if name.startswith("zlib level %d " % lv)), None)
        if level is not None:
            row["compressed_bytes"] = len(gzip_bytes(page, level))
        rows.append(row)
    return {"rounds": rounds, "seconds_per_batch": target, "floor": "whole request: identity",
            "rows": rows}


def _configure(module, level, cached):
    module.configure(level, cached)
    if cached:
        module.app(_environ("/", BROWSER_ACCEPT), lambda *a: None)  # fill the cache: time hits


# --- part 2: through nginx and FastCGI -------------------------------------------------------


def _child_env(candidate):
    # A clean environment: a TINYWEB_* variable of the caller must not change the gateway.
    return {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "PYTHONPATH": str(harness.REPO),
        "BENCH_GZIP_LEVEL": str(candidate.level),
        "BENCH_GZIP_CACHE": "1" if candidate.cache else "0",
    }


def start_fcgi(workdir, app_path, candidate):
    """Start one FastCGI server (1 worker) for ``candidate``; return (process, socket path)."""
    sock = workdir / "sock" / (candidate.slug + ".sock")
    argv = [sys.executable, app_path, "--mode", "fcgi", "--bind", "unix:%s" % sock,
            "--workers", "1",
            # nginx's worker may run as another user (www-data when we are root).
            "--socket-mode", "0666"]
    process = harness.Process("fcgi " + candidate.name, argv,
                              workdir / "logs" / ("fcgi-%s.log" % candidate.name),
                              env=_child_env(candidate), cwd=app_path.parent)
    process.start()
    harness.wait_until(lambda: harness.unix_socket_accepts(sock), "socket %s" % sock, process)
    return process, sock


def http_get(port, path, headers=(), timeout=10.0):
    """GET ``path`` from 127.0.0.1:``port`` with Connection: close; return (status, headers, body, wire bytes)."""
    lines = ["GET %s HTTP/1.1" % path, "Host: 127.0.0.1", "Connection: close", *headers, "", ""]
    data = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall("\r\n".join(lines).encode("latin-1"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        else:
            raise RuntimeError("GET %s: no end of response within %g s" % (path, timeout))
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    fields = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    if fields.get("transfer-encoding", "").lower() == "chunked":
        raise RuntimeError("GET %s: chunked response; expected a Content-Length" % path)
    return int(status_line.split()[1]), fields, body, len(data)


def check_candidate(port, candidate, page):
    """Fetch the page as wrk will and check it is what the candidate claims; return its sizes."""
    url = "/%s/app.py/" % candidate.slug
    seen = []
    for _ in range(3 if candidate.cache else 1):  # the cache's second answer must match its first
        status, fields, body, wire = http_get(port, url, candidate.headers)
        if status != 200:
            raise RuntimeError("%s answered %s through nginx:\n%r" % (url, status, body[:2000]))
        if "etag" not in fields:
            raise RuntimeError("%s sent no ETag" % url)
        if candidate.gzip:
            if fields.get("content-encoding") != "gzip" or zlib.decompress(body, 31) != page:
                raise RuntimeError("%s did not send the page gzipped: %r" % (url, fields))
            if body != gzip_bytes(page, candidate.level):
                raise RuntimeError("%s: the body is not zlib level %d's" % (url, candidate.level))
        elif "content-encoding" in fields or body != page:
            raise RuntimeError("%s did not send the page as it is: %r" % (url, fields))
        seen.append(body)
    if len(set(seen)) != 1:
        raise RuntimeError("%s: the cached answers differ" % url)
    return {"body_bytes": len(body), "response_bytes": wire, "etag": fields["etag"],
            "content_encoding": fields.get("content-encoding", "identity")}


def through_fastcgi(workdir, app_path, page, quick):
    """Serve the page through nginx + one FastCGI server per candidate; wrk them in turns."""
    harness.require_binary("wrk", "wrk")
    (workdir / "sock").mkdir(mode=0o755)
    (workdir / "logs").mkdir(mode=0o755)
    rounds, seconds, warmup = (1, 1, 0) if quick else (3, 5, 1)
    servers, nginx = {}, None
    try:
        for candidate in CANDIDATES:
            servers[candidate.name] = start_fcgi(workdir, app_path, candidate)
        nginx = harness.Nginx(workdir, {c.slug: servers[c.name][1] for c in CANDIDATES}).start()
        sizes = {c.name: check_candidate(nginx.port, c, page) for c in CANDIDATES}
        if sizes["gzip-6+cache"]["etag"] != sizes["gzip-6"]["etag"]:
            raise RuntimeError("the cached answer's ETag %s is not tinyweb's %s" % (
                sizes["gzip-6+cache"]["etag"], sizes["gzip-6"]["etag"]))
        workers = {}
        for candidate in CANDIDATES:
            process = servers[candidate.name][0]
            found = harness.children(process.pid)
            if len(found) != 1:
                raise RuntimeError("%s: expected 1 worker process, found %r" % (process.name, found))
            workers[candidate.name] = found[0]
            if warmup:
                harness.run_wrk(_url(nginx, candidate), 1, 1, warmup, workdir, candidate.headers)
        meter = harness.CpuMeter([nginx.process.pid] + [p.pid for p, _ in servers.values()])
        runs = []
        for number in range(rounds):
            # Rotated each round, so no candidate always runs first or right after another.
            order = CANDIDATES[number % len(CANDIDATES):] + CANDIDATES[:number % len(CANDIDATES)]
            for load, connections, threads in LOADS:
                for candidate in order:
                    pid = workers[candidate.name]
                    before = harness.cpu_seconds(pid)
                    meter.start()
                    result = harness.run_wrk(_url(nginx, candidate), connections, threads, seconds,
                                             workdir, candidate.headers)
                    result.update(meter.stop())
                    cpu = harness.cpu_seconds(pid) - before
                    if harness.children(servers[candidate.name][0].pid) != [pid]:
                        raise RuntimeError("the worker of %s was replaced during the run" % candidate.name)
                    if result["errors"]:
                        raise RuntimeError("%s at %s: %d errors in wrk's run\n%s" % (
                            candidate.name, load, result["errors"], nginx.error_log()))
                    result.update(round=number, load=load, candidate=candidate.name,
                                  app_cpu_us_per_request=cpu / max(result["requests"], 1) * 1e6)
                    runs.append(result)
                    print("  round %d %s %-13s %6.0f req/s  p50 %6.0f us  p99 %6.0f us  "
                          "app CPU %4.0f us/req  other work %3.0f%%" % (
                              number + 1, load, candidate.name, result["req_per_s"],
                              result["p50_us"], result["p99_us"], result["app_cpu_us_per_request"],
                              100 * result["foreign_share"]), flush=True)
    finally:
        if nginx is not None:
            nginx.stop()
        for process, _ in servers.values():
            process.stop()
    shares = [r["foreign_share"] for r in runs]
    other_work = {"median_share": harness.median(shares), "max_share": max(shares),
                  "disturbed_runs": sum(share > DISTURBED for share in shares),
                  "threshold": DISTURBED, "runs": len(shares)}
    return {"rounds": rounds, "seconds_per_run": seconds, "workers_per_server": 1,
            "other_work": other_work,
            "loads": {name: {"connections": c, "threads": t} for name, c, t in LOADS},
            "accept_encoding": BROWSER_ACCEPT, "sizes": sizes, "runs": runs,
            "summary": summarize(runs)}


def _url(nginx, candidate):
    return "http://127.0.0.1:%d/%s/app.py/" % (nginx.port, candidate.slug)


def summarize(runs):
    """Return, per load and candidate, medians over rounds and ratios to identity in the same round."""
    keys = ("req_per_s", "p50_us", "p99_us", "app_cpu_us_per_request")
    summary = {}
    for load, _, _ in LOADS:
        here = [r for r in runs if r["load"] == load]
        summary[load] = {}
        for candidate in CANDIDATES:
            mine = [r for r in here if r["candidate"] == candidate.name]
            entry = {key: harness.median([r[key] for r in mine]) for key in keys}
            entry["bytes_per_response"] = harness.median([r["bytes"] / max(r["requests"], 1) for r in mine])
            entry["foreign_share_max"] = max(r["foreign_share"] for r in mine)
            for key in keys:
                ratios = []
                for run in mine:
                    floor = next(r for r in here if r["round"] == run["round"] and r["candidate"] == "identity")
                    ratios.append(run[key] / floor[key] if floor[key] else float("nan"))
                entry[key + "_ratio"] = harness.median(ratios)
                entry[key + "_ratio_range"] = [min(ratios), max(ratios)]
            summary[load][candidate.name] = entry
    return summary


# --- report ----------------------------------------------------------------------------------


def format_tables(results):
    """Return the results as Markdown tables (the same as in bench/README.md)."""
    lines = ["In process (best of %d rounds), ratio to the whole identity request:" % results["in_process"]["rounds"], "",
             "| piece | µs | × identity request | gzip bytes |", "|---|---:|---:|---:|"]
    for row in results["in_process"]["rows"]:
        lines.append("| %s | %.1f | %.3f | %s |" % (
            row["name"], row["us"], row["ratio_to_identity_request"], row.get("compressed_bytes", "")))
    fastcgi = results["fastcgi"]
    lines += ["", "Through nginx + FastCGI (1 worker), median of %d rounds of %d s; × = ratio to identity "
              "in the same round:" % (fastcgi["rounds"], fastcgi["seconds_per_run"]), "",
              "| candidate | body bytes | load | req/s | × | p50 µs | × | p99 µs | × | app CPU µs/req | × |",
              "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for candidate in CANDIDATES:
        for load, _, _ in LOADS:
            e = fastcgi["summary"][load][candidate.name]
            lines.append("| %s | %d | %s | %.0f | %.2f | %.0f | %.2f | %.0f | %.2f | %.0f | %.2f |" % (
                candidate.name, fastcgi["sizes"][candidate.name]["body_bytes"], load,
                e["req_per_s"], e["req_per_s_ratio"], e["p50_us"], e["p50_us_ratio"],
                e["p99_us"], e["p99_us_ratio"], e["app_cpu_us_per_request"],
                e["app_cpu_us_per_request_ratio"]))
    other = fastcgi["other_work"]
    lines += ["", "Other work on the machine during the wrk runs: median %.0f%%, max %.0f%% of the CPU; "
              "%d of %d runs over %.0f%%%s" % (
                  100 * other["median_share"], 100 * other["max_share"], other["disturbed_runs"],
                  other["runs"], 100 * other["threshold"],
                  " (noisy: rerun on a quiet machine)" if other["disturbed_runs"] else "")]
    return "\n".join(lines)


def write_chart(results, path):
    """Draw the in-process times and the req/s ratios; return a note when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return "chart skipped: matplotlib is not importable (it is optional)"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["in_process"]["rows"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.5))
    left.barh([r["name"] for r in rows], [r["us"] for r in rows], color="#4a7ab0")
    left.invert_yaxis()
    left.set_xlabel("µs per call (best of rounds)")
    left.set_title("In process, 20 KB page")
    left.tick_params(axis="y", labelsize=8)
    summary = results["fastcgi"]["summary"]
    names = [c.name for c in CANDIDATES]
    width = 0.8 / len(LOADS)
    for i, (load, _, _) in enumerate(LOADS):
        right.bar([n + i * width for n in range(len(names))],
                  [summary[load][name]["req_per_s_ratio"] for name in names], width, label=load)
    right.set_xticks([n + width * (len(LOADS) - 1) / 2 for n in range(len(names))])
    right.set_xticklabels(names, fontsize=8)
    right.axhline(1.0, color="grey", linewidth=0.8)
    right.set_ylabel("req/s, × identity (median of rounds)")
    right.set_title("nginx + tinyweb FastCGI, 1 worker")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return "chart: %s" % path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="every part for about a second, one round (a smoke test)")
    parser.add_argument("--out-dir", type=Path, default=harness.REPO / "bench" / "results",
                        help="where the JSON and the chart go (default bench/results)")
    args = parser.parse_args(argv)

    # Run as a script, bench/ is first on sys.path, where this file would stand in for the
    # stdlib's gzip module if anything imported it (fileinput does): harness is in, so drop it.
    bench_dir = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != bench_dir]
    # Measure the checkout, whether or not a tinyweb is installed.
    sys.path.insert(0, str(harness.REPO))
    # A SIGTERM unwinds like Ctrl-C, so the servers are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    started = time.monotonic()
    try:
        harness.require_binary("nginx", "nginx-light")
        harness.require_binary("wrk", "wrk")
    except harness.Unavailable as exc:
        sys.stderr.write("bench/gzip.py: %s; install it and run again\n" % exc)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="tinyweb-bench-gzip-"))
    # 0755: nginx's worker (www-data when we are root) must reach the unix sockets in here.
    os.chmod(workdir, 0o755)
    keep = False
    try:
        app_path, page = write_site(workdir)
        results = {"schema": SCHEMA, "bench": "gzip",
                   "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                   "quick": args.quick, "machine": harness.machine(),
                   "source": harness.source_state(),
                   "page": {"bytes": len(page), "md5": hashlib.md5(page).hexdigest(),
                            "gzip_bytes": {str(lv): len(gzip_bytes(page, lv)) for lv in LEVELS}}}
        print("page: %d bytes; gzip " % len(page) + ", ".join(
            "%s: %d" % (lv, n) for lv, n in results["page"]["gzip_bytes"].items()), flush=True)
        print("part 1: in process", flush=True)
        results["in_process"] = in_process(app_path, page, args.quick)
        print("part 2: through nginx + FastCGI", flush=True)
        results["fastcgi"] = through_fastcgi(workdir, app_path, page, args.quick)
    except Exception:
        keep = True
        sys.stderr.write("bench/gzip.py failed; logs kept in %s\n" % workdir)
        raise
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    # Other work on the machine during the run shows here (and in the spread of the ratios).
    results["machine"]["loadavg_at_end"] = os.getloadavg()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = "gzip-" + datetime.datetime.now().strftime("%Y-%m-%d-%H%M%S") + ("-quick" if args.quick else "")
    json_path = args.out_dir / (stem + ".json")
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    print()
    print(format_tables(results))
    print()
    print("results: %s" % json_path)
    print(write_chart(results, args.out_dir / (stem + ".png")))
    print("took %.0f s" % results["elapsed_s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
