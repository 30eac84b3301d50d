"""Run ``bench/gzip.py --quick`` whole, so the gzip bench keeps working as tinyweb changes."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

CHECKOUT = Path(__file__).resolve().parent.parent
# --quick takes about 15 s here; the rest is room for a slow CI machine.
DEADLINE = 240

CANDIDATES = ["identity", "gzip-1", "gzip-6", "gzip-9", "gzip-6+cache"]
LOADS = ["c1", "c8"]


def _missing():
    """Say what the bench needs that this machine lacks, or return None."""
    for name, package in (("nginx", "nginx-light"), ("wrk", "wrk")):
        if not (shutil.which(name) or os.access("/usr/sbin/" + name, os.X_OK)):
            return "%s is not installed (Debian package %s)" % (name, package)
    if not Path("/etc/nginx/fastcgi_params").is_file():
        return "/etc/nginx/fastcgi_params is missing (Debian package nginx-common)"
    return None


@pytest.mark.real_server
def test_gzip_bench_quick_run_writes_its_results(tmp_path):
    missing = _missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail("CI is set and %s" % missing, pytrace=False)
        pytest.skip(missing)
    out = tmp_path / "results"
    proc = subprocess.Popen(
        [sys.executable, str(CHECKOUT / "bench" / "gzip.py"), "--quick", "--out-dir", str(out)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        cwd=str(CHECKOUT), start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        # SIGTERM first: the bench stops its nginx and FastCGI servers on the way out.
        proc.send_signal(signal.SIGTERM)
        try:
            output, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate(timeout=10)
        pytest.fail("bench/gzip.py --quick did not finish within %d s:\n%s" % (DEADLINE, output[-6000:]))
    assert proc.returncode == 0, output[-6000:]

    written = list(out.glob("gzip-*.json"))
    assert len(written) == 1, (written, output[-3000:])
    results = json.loads(written[0].read_text())
    assert {"schema", "bench", "date", "quick", "machine", "page", "in_process", "fastcgi",
            "elapsed_s"} <= set(results)
    assert results["quick"] is True
    assert {"nproc", "cpu", "python"} <= set(results["machine"])

    rows = {row["name"]: row for row in results["in_process"]["rows"]}
    for name in ["md5 of the body (the ETag)", "dict lookup (a cache hit)",
                 "whole request: identity", "whole request: gzip level 6",
                 "whole request: gzip level 6 + cache"] + [
                     "zlib level %d (gzip framing)" % level for level in (1, 4, 6, 9)]:
        assert rows[name]["us"] > 0, name
    assert rows["whole request: identity"]["ratio_to_identity_request"] == 1.0

    fastcgi = results["fastcgi"]
    sizes = fastcgi["sizes"]
    assert set(sizes) == set(CANDIDATES)
    for name in CANDIDATES[1:]:
        assert sizes[name]["content_encoding"] == "gzip"
        assert sizes[name]["body_bytes"] < sizes["identity"]["body_bytes"]
    for load in LOADS:
        summary = fastcgi["summary"][load]
        assert set(summary) == set(CANDIDATES)
        assert summary["identity"]["req_per_s_ratio"] == 1.0
        for name in CANDIDATES:
            for key in ("req_per_s", "p50_us", "p99_us", "app_cpu_us_per_request",
                        "req_per_s_ratio", "p50_us_ratio", "p99_us_ratio"):
                assert summary[name][key] > 0, (load, name, key)


# --- bench/fastcgi.py ------------------------------------------------------------------------

# --quick takes about 35 s here (13 candidates, 2 loads, 1 s each, 2 × 1k requests for memory).
FASTCGI_DEADLINE = 300
FASTCGI_ALWAYS = ["ceiling", "wsgi-threaded", "wsgi-prefork2", "webob-threaded", "webob-prefork2",
                  "tinyweb-default", "tinyweb-workers1", "tinyweb-workers2", "tinyweb-threads4",
                  "tinyweb-default-ka", "webob-prefork2-ka"]
# Not tinyweb dependencies: the bench skips them (and says so) where they are not installed.
FASTCGI_OPTIONAL = ["bottle-threaded", "flask-threaded"]


def _fastcgi_bench_missing():
    """Say which binary bench/fastcgi.py needs that this machine lacks, or return None."""
    for name, package in (("nginx", "nginx-light"), ("wrk", "wrk")):
        if not (shutil.which(name) or os.access("/usr/sbin/" + name, os.X_OK)):
            return "%s is not installed (Debian package %s)" % (name, package)
    if not Path("/etc/nginx/fastcgi_params").is_file():
        return "/etc/nginx/fastcgi_params is missing (Debian package nginx-common)"
    return None


@pytest.mark.real_server
def test_fastcgi_bench_quick_run_writes_its_results(tmp_path):
    missing = _fastcgi_bench_missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail("CI is set and %s" % missing, pytrace=False)
        pytest.skip(missing)
    out = tmp_path / "results"
    proc = subprocess.Popen(
        [sys.executable, str(CHECKOUT / "bench" / "fastcgi.py"), "--quick", "--out-dir", str(out)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        cwd=str(CHECKOUT), start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=FASTCGI_DEADLINE)
    except subprocess.TimeoutExpired:
        # SIGTERM first: the bench stops its nginx and FastCGI backends on the way out.
        proc.send_signal(signal.SIGTERM)
        try:
            output, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate(timeout=10)
        pytest.fail("bench/fastcgi.py --quick did not finish within %d s:\n%s"
                    % (FASTCGI_DEADLINE, output[-6000:]))
    assert proc.returncode == 0, output[-6000:]

    written = list(out.glob("fastcgi-*.json"))
    assert len(written) == 1, (written, output[-3000:])
    results = json.loads(written[0].read_text())
    assert {"schema", "bench", "date", "quick", "machine", "settings", "candidates", "runs",
            "summary", "ratios", "targets", "memory", "keepalive", "flagged", "elapsed_s"} <= set(results)
    assert results["bench"] == "fastcgi" and results["quick"] is True
    assert {"nproc", "cpu", "python"} <= set(results["machine"])
    assert set(results["summary"]) == {"c1", "c8"}

    measured = FASTCGI_ALWAYS + [n for n in FASTCGI_OPTIONAL if "skipped" not in results["candidates"][n]]
    for name in FASTCGI_ALWAYS:
        assert results["candidates"][name]["checked"] == '200 "hello"', name
    for load in ("c1", "c8"):
        assert set(results["summary"][load]) == set(measured), load
        for name in measured:
            entry = results["summary"][load][name]
            for key in ("req_per_s", "p50_us", "p99_us"):
                assert entry[key] > 0, (load, name, key)
            assert "errors" in entry and "flagged" in entry
    ratios = results["ratios"]["req_per_s"]
    assert ratios["tinyweb-default / webob-prefork2"]["c8"] > 0
    assert ratios["tinyweb-default / wsgi-threaded"]["c8"] > 0
    assert results["ratios"]["p99"]["tinyweb-default / webob-prefork2"]["c8"] > 0

    memory = results["memory"]["candidates"]
    assert set(memory) == {"tinyweb-default", "webob-prefork2"}
    for name, data in memory.items():
        assert len(data["workers"]) == 2, name
        assert [s["after_requests"] for s in data["steps"]] == [1000, 2000], name
        for step in data["steps"]:
            for worker in step["per_worker"].values():
                assert worker["rss_kib"] > 0 and worker["pss_kib"] > 0, name
    assert all({"target", "goal", "values", "met"} <= set(t) for t in results["targets"])


# --- bench/cgi.py and bench/modpython.py -----------------------------------------------------

# --quick: about 15 s for cgi.py; modpython.py about 15 s once tests/servers.py's venv is
# cached, a minute or two more when it has to be built. The rest is room for a slow machine.
CGI_BENCH_DEADLINE = 240
MODPYTHON_BENCH_DEADLINE = 600
CGI_BENCH_ALWAYS = ["python -S -c pass", "python -c pass", "wsgiref hello", "webob hello",
                    "webob+beaker session", "tinyweb hello", "tinyweb session", "tinyweb form POST",
                    "tinyweb hello (warm worker)", "tinyweb session (warm worker)"]
CGI_BENCH_WARM = ["tinyweb hello (warm worker)", "tinyweb session (warm worker)"]
# From the bench extra, not tinyweb's dependencies: the bench skips them (and says so) without.
CGI_BENCH_OPTIONAL = ["bottle hello", "flask hello"]


def _run_bench_quick(script, out, deadline):
    """Run ``bench/<script> --quick`` in a session of its own; return its parsed JSON."""
    proc = subprocess.Popen(
        [sys.executable, str(CHECKOUT / "bench" / script), "--quick", "--out-dir", str(out)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        cwd=str(CHECKOUT), start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=deadline)
    except subprocess.TimeoutExpired:
        # SIGTERM first: the bench removes its tree and stops its servers on the way out.
        proc.send_signal(signal.SIGTERM)
        try:
            output, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate(timeout=10)
        pytest.fail("bench/%s --quick did not finish within %d s:\n%s" % (script, deadline, output[-6000:]))
    assert proc.returncode == 0, output[-6000:]
    stem = script[:-len(".py")]
    written = list(out.glob("%s-*.json" % stem))
    assert len(written) == 1, (written, output[-3000:])
    results = json.loads(written[0].read_text())
    assert results["bench"] == stem and results["quick"] is True
    assert {"nproc", "cpu", "python"} <= set(results["machine"])
    return results


def _is_tinyweb_worker(pid):
    """Tell whether ``pid`` is a live tinyweb CGI worker (not a zombie, not another process)."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            cmdline = f.read()
        with open("/proc/%d/stat" % pid, "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return b"tinyweb.runners.cgi_worker" in cmdline and stat[stat.rfind(b")") + 2:][:1] not in b"ZX"


def test_cgi_bench_quick_run_writes_its_results(tmp_path):
    results = _run_bench_quick("cgi.py", tmp_path / "results", CGI_BENCH_DEADLINE)
    assert {"schema", "bench", "date", "quick", "rounds", "seed", "machine", "method", "rows",
            "skipped", "targets", "importtime", "importtime_session", "elapsed_s"} <= set(results)
    rows = {row["name"]: row for row in results["rows"]}
    assert set(rows) == set(CGI_BENCH_ALWAYS) | (set(CGI_BENCH_OPTIONAL) - set(results["skipped"]))
    for name, row in rows.items():
        assert len(row["wall_ms"]) == results["rounds"], name
        for key in ("median_ms", "min_ms", "cpu_median_ms", "x_floor_median", "x_webob_median"):
            assert row[key] > 0, (name, key)
    assert rows["python -S -c pass"]["x_floor_median"] == 1.0
    assert rows["webob hello"]["x_webob_median"] == 1.0
    assert rows["webob+beaker session"]["x_beaker_median"] == 1.0
    # The same three targets, for the cold rows and then for the warm-worker rows.
    assert [t["limit"] for t in results["targets"]] == [0.85, 4.0, 0.8] * 2
    assert [t["subject"] for t in results["targets"]] == (
        ["tinyweb hello"] * 2 + ["tinyweb session"] + ["tinyweb hello (warm worker)"] * 2
        + ["tinyweb session (warm worker)"])
    assert all(isinstance(t["met"], bool) and t["value"] > 0 for t in results["targets"])
    # Every tinyweb response said who served it: the warm rows' worker, the others cold.
    for name, row in rows.items():
        if name.startswith("tinyweb"):
            assert row["served_by"] == ("worker" if name in CGI_BENCH_WARM else "cgi"), name
    for name in CGI_BENCH_WARM:
        assert rows[name]["cpu_entry_median_ms"] > 0 and rows[name]["cpu_worker_median_ms"] > 0, name
        # The bench stopped its workers by their pid files, and none was left running.
        ended = results["workers"][name]
        assert ended and all(how == "stopped by SIGTERM" for how in ended.values()), (name, ended)
        for pid in ended:
            assert not _is_tinyweb_worker(int(pid)), (name, pid)
    imports = results["importtime"]
    assert imports["tinyweb_self_ms"] > 0
    assert 0 < len(imports["top_cumulative"]) <= 25
    assert any(m["name"].startswith("tinyweb") for m in imports["modules"])
    assert results["importtime_session"]["reference"] == "webob+beaker session"
    assert any(m["name"].startswith("beaker") for m in results["importtime_session"]["modules"])


def _modpython_bench_missing():
    """Say what bench/modpython.py needs that this machine lacks, or return None."""
    if os.geteuid() != 0:
        return "bench/modpython.py must run as root (Apache switches to www-data)"
    try:
        import pwd

        pwd.getpwnam("www-data")
    except KeyError:
        return "there is no user www-data"
    for path, package in (("/usr/sbin/apache2", "apache2"),
                          ("/usr/lib/apache2/modules/mod_mpm_prefork.so", "apache2"),
                          ("/usr/lib/apache2/modules/mod_cgi.so", "apache2"),
                          ("/usr/lib/apache2/modules/mod_python.so", "libapache2-mod-python"),
                          ("/usr/bin/python3", "python3")):
        if not os.path.exists(path):
            return "%s is missing (Debian package %s)" % (path, package)
    return None


@pytest.mark.real_server
def test_modpython_bench_quick_run_writes_its_results(tmp_path):
    missing = _modpython_bench_missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail("CI is set and %s" % missing, pytrace=False)
        pytest.skip(missing)
    results = _run_bench_quick("modpython.py", tmp_path / "results", MODPYTHON_BENCH_DEADLINE)
    assert {"schema", "bench", "date", "quick", "rounds", "requests_per_round", "seed", "machine",
            "method", "rows", "ratios", "target", "preload", "survival",
            "purged_under_plain_cgihandler", "elapsed_s"} <= set(results)
    rows = {row["name"]: row for row in results["rows"]}
    assert set(rows) == {"modpython", "modpython+preload", "cgi", "modpython bare script",
                         "cgi bare script"}
    for name, row in rows.items():
        assert row["requests"] == results["rounds"] * results["requests_per_round"], name
        assert row["median_ms"] > 0 and row["min_ms"] > 0, name
    assert rows["cgi"]["x_cgi_median"] == 1.0
    for key in ("preload_over_cgi_median", "preload_over_cgi_min", "plain_over_cgi_median"):
        assert results["ratios"][key] > 0, key
    assert isinstance(results["target"]["met"], bool)
    # Under plain cgihandler webob is re-imported every request; preloaded, it is kept.
    assert results["survival"]["modpython"]["webob_kept"] is False
    assert "webob" in results["purged_under_plain_cgihandler"]
    assert results["survival"]["modpython+preload"]["webob_kept"] is True
    assert results["survival"]["modpython+preload"]["purged_per_request"] == ["app"]
    assert results["preload"]["still_purged"] == []
    assert results["survival_session"]["modpython+preload"]["purged_per_request"] == ["app"]
    # The README's one line, and preload() ran in the child that served the requests.
    assert ("PythonImport tinyweb.runners.modpython::preload main_interpreter"
            in results["preload"]["conf"].splitlines())
    assert results["preload"]["ran"] is True and results["preload"]["webob_kept"] is True
