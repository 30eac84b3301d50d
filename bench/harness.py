"""Run benchmark servers and load on this machine: nginx, FastCGI apps, wrk, in-process timers.

Every process starts in a session of its own, logs to a file in the bench's work dir, and is
stopped by pid with a deadline (then what is left of its session, by pid); every wait has a
deadline and its error says what was awaited. Only 127.0.0.1 and unix sockets are used.
Shared by the scripts in bench/, which import it as ``harness`` (their own folder is first
on sys.path when run as ``python bench/NAME.py``).
"""

import json
import os
import platform
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
import timeit
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

__all__ = [
    "REPO", "Unavailable", "StartError", "Process", "Nginx", "require_binary", "free_port",
    "wait_until", "unix_socket_accepts", "port_accepts", "run_wrk", "cpu_seconds",
    "children", "machine", "source_state", "time_interleaved", "median", "CpuMeter",
]

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0


class Unavailable(RuntimeError):
    """A binary or file the bench needs is not on this machine; the message names the package."""


class StartError(RuntimeError):
    """A process was started but did not come up; the message carries its log."""


def require_binary(name: str, package: str) -> str:
    """Return the path of ``name``, or raise Unavailable naming the Debian package to install."""
    for candidate in (shutil.which(name), "/usr/sbin/" + name, "/usr/bin/" + name):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise Unavailable("%s is not installed (Debian package %s)" % (name, package))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- processes -------------------------------------------------------------------------------


def _session_members(sid: int) -> List[int]:
    """Return the pids whose session id is ``sid``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry, "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # After the parenthesised command: state ppid pgrp session ...
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) > 3 and int(fields[3]) == sid:
            pids.append(int(entry))
    return pids


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


class Process:
    """A process in a session of its own, its stdout and stderr in ``log``."""

    def __init__(self, name: str, argv: Sequence[str], log: Path, *,
                 env: Optional[Dict[str, str]] = None, cwd: Optional[Path] = None,
                 stop_signal: int = signal.SIGTERM):
        self.name, self.argv, self.log = name, [str(a) for a in argv], log
        self.env, self.cwd, self.stop_signal = env, cwd, stop_signal
        self.popen: Optional[subprocess.Popen] = None

    def start(self) -> "Process":
        with open(self.log, "ab") as log:
            self.popen = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=self.env, cwd=self.cwd, start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def exited(self) -> Optional[int]:
        return None if self.popen is None else self.popen.poll()

    def tail(self, limit: int = 4000) -> str:
        try:
            data = self.log.read_bytes()
        except OSError as exc:
            return "(cannot read %s: %s)" % (self.log, exc)
        return data[-limit:].decode("utf-8", "replace")

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Signal the pid we started, wait; then SIGTERM and SIGKILL what is left of its session."""
        if self.popen is None:
            return
        deadline = time.monotonic() + timeout
        if self.popen.poll() is None:
            _signal(self.pid, self.stop_signal)
            try:
                self.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        # Workers the main process left behind, or the main process itself if it hung.
        for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 2.0)):
            members = _session_members(self.pid)
            if not members:
                break
            for pid in members:
                _signal(pid, sig)
            until = time.monotonic() + grace
            while time.monotonic() < until and _session_members(self.pid):
                self.popen.poll()
                time.sleep(0.05)
        try:
            self.popen.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass


def wait_until(ready: Callable[[], bool], what: str, process: Process,
               timeout: float = START_TIMEOUT) -> None:
    """Return once ``ready()`` is true; raise StartError with the log if ``process`` dies or time runs out."""
    deadline = time.monotonic() + timeout
    while not ready():
        code = process.exited()
        if code is not None:
            raise StartError("%s exited with status %s before %s\n--- %s ---\n%s"
                             % (process.name, code, what, process.log, process.tail()))
        if time.monotonic() > deadline:
            raise StartError("%s: no %s within %g s\n--- %s ---\n%s"
                             % (process.name, what, timeout, process.log, process.tail()))
        time.sleep(0.05)


def unix_socket_accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def port_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def children(pid: int) -> List[int]:
    """Return the pids of the children of ``pid`` (Linux 3.5+ /proc/PID/task/TID/children)."""
    found = []
    try:
        tasks = os.listdir("/proc/%d/task" % pid)
    except OSError:
        return found
    for tid in tasks:
        try:
            with open("/proc/%d/task/%s/children" % (pid, tid)) as f:
                found += [int(p) for p in f.read().split()]
        except OSError:
            pass
    return found


def cpu_seconds(pid: int) -> float:
    """Return the user + system CPU seconds ``pid`` has used so far."""
    with open("/proc/%d/stat" % pid, "rb") as f:
        stat = f.read()
    fields = stat[stat.rfind(b")") + 2:].split()
    # Fields 14 and 15 of proc(5) (utime, stime); the slice starts at field 3 (state).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _system_cpu() -> tuple:
    """Return (busy, steal) CPU seconds of the whole machine since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


def _session_cpu(sid: int) -> float:
    total = 0.0
    for pid in _session_members(sid):
        try:
            total += cpu_seconds(pid)
        except OSError:
            pass  # exited in between
    return total


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class CpuMeter:
    """Tell how much CPU went to work that is not the bench's while a load ran.

    This machine is shared: another bench or test suite running at the same time takes
    cores from the servers measured. ``foreign_share`` is the machine's busy CPU time
    minus that of the sessions given (servers), of the children this process waited for
    (wrk) and of this process, over all the cores' time; ``steal_share`` is what the
    hypervisor took. Run a load between start() and stop().
    """

    def __init__(self, sessions: Sequence[int]):
        self.sessions = list(sessions)

    def _ours(self) -> float:
        own = sum(os.times()[:2])
        return sum(_session_cpu(sid) for sid in self.sessions) + _children_cpu() + own

    def start(self) -> None:
        self._start = (time.monotonic(), _system_cpu(), self._ours())

    def stop(self) -> dict:
        elapsed = time.monotonic() - self._start[0]
        (busy, steal), ours = _system_cpu(), self._ours()
        capacity = max(elapsed * (os.cpu_count() or 1), 1e-9)
        foreign = (busy - self._start[1][0]) - (ours - self._start[2])
        return {"foreign_share": max(foreign, 0.0) / capacity,
                "steal_share": (steal - self._start[1][1]) / capacity}


# --- nginx -----------------------------------------------------------------------------------

_NGINX_CONF = """\
# Written by bench/harness.py: a private nginx on 127.0.0.1; only fastcgi_params is read from /etc.
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
    # The app does the compressing; nginx must pass its bytes on as they are.
    gzip off;
    # wrk keeps its connections: do not make it reconnect every 1000 requests (the default).
    keepalive_requests 1000000;
    # Whole responses up to 64 KiB stay in memory, never in a temp file.
    fastcgi_buffer_size 8k;
    fastcgi_buffers 8 8k;
    fastcgi_max_temp_file_size 0;

    server {
        listen 127.0.0.1:%(port)d;
        server_name 127.0.0.1;
%(locations)s
    }
}
"""

# The tests' config (tests/servers.py, notes/servers.md §4) without try_files: the app
# is known to exist, and a stat per request is not what is measured.
_LOCATION = """\
        location ~ ^/%(name)s/app\\.py(/|$) {
            fastcgi_split_path_info ^(.+?\\.py)(/.*)$;
            include /etc/nginx/fastcgi_params;
            fastcgi_param PATH_INFO $fastcgi_path_info;
            fastcgi_param HTTP_PROXY "";
            fastcgi_pass unix:%(socket)s;
        }"""


class Nginx:
    """A private nginx in front of FastCGI apps: ``/NAME/app.py/...`` goes to ``sockets[NAME]``."""

    def __init__(self, workdir: Path, sockets: Dict[str, Path]):
        self.binary = require_binary("nginx", "nginx-light")
        if not Path("/etc/nginx/fastcgi_params").is_file():
            raise Unavailable("/etc/nginx/fastcgi_params is missing (Debian package nginx-common)")
        self.srv = workdir / "nginx"
        for sub in ("", "tmp"):
            (self.srv / sub).mkdir(mode=0o755, exist_ok=True)
        self.port = free_port()
        # As root nginx would run its worker as "nobody" (this build's default); www-data is
        # the user the tests use, and it must be able to reach the unix sockets.
        user_line = ""
        if os.geteuid() == 0:
            user = "www-data" if _user_exists("www-data") else "nobody"
            user_line = "user %s;" % user
        locations = "\n".join(_LOCATION % dict(name=name, socket=path) for name, path in sockets.items())
        self.conf = self.srv / "nginx.conf"
        self.conf.write_text(_NGINX_CONF % dict(user_line=user_line, srv=self.srv, port=self.port,
                                                locations=locations))
        self.argv = [self.binary, "-p", str(self.srv) + "/", "-c", str(self.conf),
                     "-e", str(self.srv / "error.log")]
        self.process = Process("nginx", self.argv, self.srv / "startup.log", cwd=self.srv)

    def start(self) -> "Nginx":
        check = subprocess.run(self.argv + ["-t"], capture_output=True, text=True, timeout=30)
        if check.returncode != 0:
            raise StartError("nginx -t rejected %s:\n%s%s" % (self.conf, check.stdout, check.stderr))
        self.process.start()
        wait_until(lambda: port_accepts(self.port), "listening on 127.0.0.1:%d" % self.port,
                   self.process)
        return self

    def error_log(self) -> str:
        path = self.srv / "error.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def stop(self) -> None:
        self.process.stop()


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


# --- wrk -------------------------------------------------------------------------------------

# wrk calls done() once, after the run: the request path stays free of Lua.
_WRK_REPORT = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "bytes": %d, "connect_errors": %d, ' ..
    '"read_errors": %d, "write_errors": %d, "status_errors": %d, "timeouts": %d, ' ..
    '"p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
"""


def run_wrk(url: str, connections: int, threads: int, seconds: int, workdir: Path,
            headers: Sequence[str] = ()) -> dict:
    """Run wrk against ``url``; return its summary (req/s, latency percentiles in µs, errors)."""
    binary = require_binary("wrk", "wrk")
    script = workdir / "wrk-report.lua"
    if not script.exists():
        script.write_text(_WRK_REPORT)
    argv = [binary, "-c%d" % connections, "-t%d" % threads, "-d%ds" % seconds,
            "--timeout", "5s", "-s", str(script)]
    for header in headers:
        argv += ["-H", header]
    argv.append(url)
    limit = seconds + 30
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=5)
        raise RuntimeError("wrk did not finish within %d s: %s" % (limit, " ".join(argv)))
    except BaseException:
        proc.kill()
        proc.wait(timeout=5)
        raise
    report = [line for line in out.splitlines() if line.startswith("WRK_JSON ")]
    if proc.returncode != 0 or not report:
        raise RuntimeError("wrk failed (exit %s): %s\n%s%s" % (proc.returncode, " ".join(argv), out, err))
    result = json.loads(report[-1][len("WRK_JSON "):])
    result["req_per_s"] = result["requests"] / (result["duration_us"] / 1e6)
    result["errors"] = sum(result[k] for k in ("connect_errors", "read_errors", "write_errors",
                                               "status_errors", "timeouts"))
    return result


# --- in-process timing -----------------------------------------------------------------------


def time_interleaved(candidates: Dict[str, Callable[[], object]], rounds: int, target: float,
                     setup: Optional[Dict[str, Callable[[], object]]] = None) -> Dict[str, float]:
    """Return each candidate's best seconds per call: min over ``rounds`` of ``target``-second batches.

    The candidates take turns in every round, so a slow stretch of the machine hits them all;
    ``setup[name]()`` runs before each of that candidate's batches, outside the timing.
    """
    setup = setup or {}
    numbers = {}
    for name, func in candidates.items():
        setup.get(name, lambda: None)()
        timer = timeit.Timer(func)
        once = timer.timeit(1)  # also a warm-up: first calls import and fill caches
        numbers[name] = max(1, int(target / max(once, 1e-7)))
        # Recalibrate on a batch, since one call is a poor estimate for fast functions.
        batch = timer.timeit(numbers[name])
        numbers[name] = max(1, int(numbers[name] * target / max(batch, 1e-7)))
    best = {name: float("inf") for name in candidates}
    for _ in range(rounds):
        for name, func in candidates.items():
            setup.get(name, lambda: None)()
            elapsed = timeit.Timer(func).timeit(numbers[name])
            best[name] = min(best[name], elapsed / numbers[name])
    return best


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


# --- the machine -----------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(argv: Sequence[str]) -> str:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0] if text else "unknown"


def _dist_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine() -> dict:
    """Describe this machine and the versions that matter to a web bench."""
    import zlib

    return {
        "nproc": os.cpu_count(),
        "cpu": _cpu_model(),
        "python": sys.version.split()[0],
        "python_executable": sys.executable,
        "kernel": platform.release(),
        "loadavg_at_start": os.getloadavg(),
        "zlib": zlib.ZLIB_RUNTIME_VERSION,
        "webob": _dist_version("webob"),
        "beaker": _dist_version("beaker"),
        "flup": _dist_version("flup"),
        "nginx": _version([shutil.which("nginx") or "/usr/sbin/nginx", "-v"]),
        "wrk": _version([shutil.which("wrk") or "wrk", "-v"]),
    }


def source_state() -> dict:
    """Name the checkout measured: its commit and the files changed since (``git status``)."""
    def git(*args):
        try:
            done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                                  timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout if done.returncode == 0 else None

    import hashlib

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    # The tree may change under a long run or between runs: this names the code measured.
    digest = hashlib.sha256()
    for path in sorted((REPO / "tinyweb").rglob("*.py")):
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes() + b"\0")
    return {"commit": commit.strip() if commit else None,
            "modified": [line[3:] for line in status.splitlines()] if status else [],
            "tinyweb_sha256": digest.hexdigest()[:16]}
