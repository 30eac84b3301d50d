"""Start real web servers on 127.0.0.1 from config files written here, and stop them by pid.

Everything a server touches lives in a tree under ``/var/tmp/tinyweb-tests`` that is 0755 on
every level: Apache and nginx workers, CGI scripts, mod_python and FastCGI apps run as
www-data, which can reach neither ``/root`` nor pytest's 0700 ``tmp_path``
(notes/servers.md §0). Each server runs in its own session (Apache's prefork parent
signals its whole process group on stop) and is stopped by the pid in its pid file, then
by its session, with a deadline at every step. Nothing under ``/etc`` is written.
"""

import fcntl
import hashlib
import itertools
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

__all__ = [
    "BASE",
    "SERVER_USER",
    "ServerUnavailable",
    "StartError",
    "Venv",
    "Site",
    "Process",
    "Server",
    "VARIANTS",
    "build_venv",
    "make_site",
    "new_workdir",
    "start_apache",
    "start_nginx",
    "start_fcgi_app",
    "start_variant",
    "free_port",
    "wait_for_port",
    "wait_for_unix_socket",
]

BASE = Path(os.environ.get("TINYWEB_TEST_BASE", "/var/tmp/tinyweb-tests"))
SERVER_USER = "www-data"
SYSTEM_PYTHON = "/usr/bin/python3"  # what mod_python embeds; reachable by www-data
START_TIMEOUT = 15.0
STOP_TIMEOUT = 15.0
# Bump when the way the venv is built changes, so cached venvs are rebuilt.
_VENV_RECIPE = "1"

Address = Union[str, Tuple[str, int]]


class ServerUnavailable(RuntimeError):
    """This machine lacks a binary or module a server needs (skip locally, fail on CI)."""


class StartError(RuntimeError):
    """A server was started but did not come up; the message carries its log."""


# ---------------------------------------------------------------------------------------
# Directories www-data can reach


def _mkdir(path: Path, mode: int = 0o755, owner: Optional[str] = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, mode)  # explicit: a umask of 077 (some CI images) would hide it
    if owner is not None:
        shutil.chown(path, owner, owner)
    return path


def _check_reachable(path: Path) -> None:
    """Raise unless every directory from / down to ``path`` is searchable by others."""
    for parent in [*reversed(path.parents), path]:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            raise StartError(
                "%s is mode %o: www-data cannot traverse it to reach %s; "
                "set TINYWEB_TEST_BASE to a directory that is 0755 from / down"
                % (parent, mode & 0o7777, path)
            )


def _base() -> Path:
    _mkdir(BASE)
    _check_reachable(BASE)
    return BASE


_counter = itertools.count(1)


def new_workdir(kind: str) -> Path:
    """Make a fresh 0755 directory for one server instance or scaffolded app."""
    _prune_stale_workdirs()
    path = _base() / ("run-%d-%d-%s" % (os.getpid(), next(_counter), kind))
    if path.exists():
        shutil.rmtree(path)
    return _mkdir(path)


def _prune_stale_workdirs() -> None:
    """Remove run trees left by test processes that no longer exist."""
    if not BASE.is_dir():
        return
    for entry in BASE.glob("run-*"):
        match = re.match(r"run-(\d+)-", entry.name)
        if match and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------------------
# The www-data-usable Python


@dataclass
class Venv:
    path: Path

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    def bin(self, name: str) -> Path:
        return self.path / "bin" / name

    @property
    def site_packages(self) -> Path:
        return next((self.path / "lib").glob("python3.*/site-packages"))


_INSTALL_FILES = ("pyproject.toml", "setup.py", "setup.cfg", "MANIFEST.in")
_INSTALL_GLOBS = ("README*", "LICENSE*", "COPYING*")
_INSTALL_DIRS = ("tinyweb", "app_template")


def _install_files(checkout: Path) -> List[Path]:
    """List the files of the checkout that go into the installed package, sorted."""
    files = [checkout / name for name in _INSTALL_FILES if (checkout / name).is_file()]
    for pattern in _INSTALL_GLOBS:
        files += [p for p in checkout.glob(pattern) if p.is_file()]
    for name in _INSTALL_DIRS:
        top = checkout / name
        if top.is_dir():
            files += [
                p
                for p in top.rglob("*")
                if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
            ]
    return sorted(set(files))


def _copy_for_install(checkout: Path, dest: Path) -> None:
    """Copy what the package is built from (package dirs whole, even empty ones)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
    dest.mkdir(parents=True, exist_ok=True)
    for name in _INSTALL_DIRS:
        if (checkout / name).is_dir():
            shutil.copytree(checkout / name, dest / name, ignore=ignore)
    for item in _install_files(checkout):
        if item.parent == checkout:
            shutil.copy2(item, dest / item.name)


def _venv_key(checkout: Path) -> str:
    digest = hashlib.sha256()
    digest.update(_VENV_RECIPE.encode())
    digest.update(subprocess.run(
        [SYSTEM_PYTHON, "-c", "import sys; print(sys.version)"],
        capture_output=True, check=True,
    ).stdout)
    for path in _install_files(checkout):
        digest.update(str(path.relative_to(checkout)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _run(argv: Sequence[str], what: str, timeout: float = 600, **kwargs) -> str:
    try:
        done = subprocess.run(
            list(map(str, argv)), capture_output=True, text=True, timeout=timeout, **kwargs
        )
    except subprocess.TimeoutExpired as exc:
        raise StartError("%s: timed out after %ss: %s" % (what, timeout, " ".join(map(str, argv)))) from exc
    if done.returncode != 0:
        raise StartError(
            "%s failed (exit %s): %s\n--- stdout ---\n%s\n--- stderr ---\n%s"
            % (what, done.returncode, " ".join(map(str, argv)), done.stdout[-4000:], done.stderr[-4000:])
        )
    return done.stdout


def _system_venv(path: Path) -> Venv:
    """Create a venv from Debian's python3 at ``path`` (ensurepip comes from python3-venv)."""
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        raise ServerUnavailable("%s is missing (Debian package python3)" % SYSTEM_PYTHON)
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import ensurepip, venv"], capture_output=True)
    if probe.returncode != 0:
        raise ServerUnavailable(
            "%s has no ensurepip/venv (Debian package python3-venv)" % SYSTEM_PYTHON
        )
    _run([SYSTEM_PYTHON, "-m", "venv", path], "creating a venv")
    return Venv(path)


def _make_world_readable(path: Path) -> None:
    _run(["chmod", "-R", "u+rwX,go+rX,go-w", path], "chmod venv")


def _assert_usable_by_server_user(venv: Venv, modules: Sequence[str]) -> None:
    code = "import %s" % ", ".join(modules)
    _run([venv.python, "-c", code], "importing %s as %s" % (modules, SERVER_USER),
         timeout=60, user=SERVER_USER, group=SERVER_USER, extra_groups=[], cwd="/")


def build_venv(checkout: Path) -> Venv:
    """Return a venv with a regular (non-editable) install of ``checkout``, cached by content.

    mod_python does not process .pth files, so an editable install would be invisible to
    it (notes/servers.md §0); the checkout is copied first, since www-data may not reach it.
    """
    checkout = Path(checkout).resolve()
    base = _base()
    path = base / ("venv-" + _venv_key(checkout))
    marker = path / ".tinyweb-tests-complete"
    with open(base / "venv.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists():
            marker.touch()  # in use: keeps _prune_old_venvs away
            return Venv(path)
        if path.exists():
            shutil.rmtree(path)
        venv = _system_venv(path)
        source = path / "src"
        _copy_for_install(checkout, source)
        _run([venv.bin("pip"), "install", "--no-input", "--disable-pip-version-check",
              "--no-warn-script-location", str(source)], "pip install of the checkout")
        shutil.rmtree(source)
        _make_world_readable(path)
        _assert_usable_by_server_user(venv, ["tinyweb", "webob", "beaker", "flup"])
        marker.write_text(str(checkout) + "\n")
        _prune_old_venvs(keep=path)
        return venv


def _prune_old_venvs(keep: Path, max_age: float = 2 * 3600, max_count: int = 4,
                     min_age: float = 600) -> None:
    """Remove venvs no run has used for ``max_age`` s, or past the ``max_count`` newest.

    Each run touches its venv's marker, so one that a concurrent run is using (used within
    ``min_age`` s) is never removed.
    """
    now = time.time()
    aged = []
    for entry in BASE.glob("venv-*"):
        marker = entry / ".tinyweb-tests-complete"
        try:
            used = (marker if marker.exists() else entry).stat().st_mtime
        except OSError:
            continue
        if entry != keep:
            aged.append((used, entry))
    aged.sort(reverse=True)
    for rank, (used, entry) in enumerate(aged, start=1):
        age = now - used
        if age > max_age or (rank >= max_count and age > min_age):
            shutil.rmtree(entry, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# An app tree: root/{tinyweb.ini, data/, htdocs/app.py}


@dataclass
class Site:
    root: Path

    @property
    def htdocs(self) -> Path:
        return self.root / "htdocs"

    @property
    def app(self) -> Path:
        return self.htdocs / "app.py"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def config(self) -> Path:
        return self.root / "tinyweb.ini"


def _rewrite_shebang(script: Path, python: Path) -> None:
    text = script.read_text(encoding="utf-8")
    lines = text.split("\n", 1)
    rest = lines[1] if lines[0].startswith("#!") and len(lines) > 1 else text
    script.write_text("#!%s\n%s" % (python, rest), encoding="utf-8")


def make_site(workdir: Path, htdocs: Path, python: Path, data_owner: str = SERVER_USER) -> Site:
    """Copy ``htdocs`` into ``workdir/site`` as an app a server can run, and return it.

    app.py gets a shebang naming ``python`` and mode 0755; the app root gets a
    ``tinyweb.ini`` with a fresh secret and a private ``data/`` owned by ``data_owner``.
    """
    site = Site(_mkdir(workdir / "site"))
    shutil.copytree(htdocs, site.htdocs,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for dirpath, dirnames, filenames in os.walk(site.htdocs):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o644)
    if site.app.exists():
        _rewrite_shebang(site.app, python)
        os.chmod(site.app, 0o755)
    # Private to the app's user, as app_template/tinyweb.ini asks.
    site.config.write_text("[tinyweb]\nsecret = %s\n" % secrets.token_hex(32))
    os.chmod(site.config, 0o600)
    shutil.chown(site.config, data_owner, data_owner)
    _mkdir(site.data, 0o700, owner=data_owner)
    _check_reachable(site.htdocs)
    return site


# ---------------------------------------------------------------------------------------
# Processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _session_members(sid: int) -> List[int]:
    """Return the pids whose session id is ``sid`` (all started from that session leader)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry, "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # Fields after the parenthesised command: state ppid pgrp session ...
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) > 3 and int(fields[3]) == sid:
            pids.append(int(entry))
    return pids


def _tail(path: Path, limit: int = 6000) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        return "(cannot read %s: %s)" % (path, exc)
    text = data[-limit:].decode("utf-8", "replace")
    return ("...\n" if len(data) > limit else "") + text


@dataclass
class Process:
    """A process started in a session of its own, its stdout and stderr in a log file."""

    name: str
    argv: List[str]
    log: Path
    pidfile: Optional[Path] = None
    cwd: Optional[Path] = None
    env: Optional[Dict[str, str]] = None
    user: Optional[str] = None
    popen: Optional[subprocess.Popen] = None

    def start(self) -> "Process":
        kwargs = {}
        if self.user is not None:
            kwargs = dict(user=self.user, group=self.user, extra_groups=[])
        with open(self.log, "ab") as log:
            self.popen = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.cwd, env=self.env, start_new_session=True, **kwargs,
            )
        return self

    @property
    def sid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def main_pid(self) -> int:
        """Return the pid from the pid file if there is one, else the pid we started."""
        if self.pidfile is not None:
            try:
                pid = int(self.pidfile.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                pass
            else:
                if pid in _session_members(self.sid):  # never signal a stranger
                    return pid
        return self.sid

    def exited(self) -> Optional[int]:
        return None if self.popen is None else self.popen.poll()

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM the main pid, wait, SIGTERM the rest of the session, then SIGKILL."""
        if self.popen is None:
            return
        deadline = time.monotonic() + timeout
        if self.popen.poll() is None:
            _signal(self.main_pid(), signal.SIGTERM)
            try:
                self.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        # What is left of the session: fcgid apps, flup prefork children (which setpgid
        # into groups of their own, so a killpg would miss them), detached CGI helpers
        # that kept the session.
        for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 2.0)):
            members = _session_members(self.sid)
            if not members:
                break
            for pid in members:
                _signal(pid, sig)
            until = time.monotonic() + grace
            while time.monotonic() < until and _session_members(self.sid):
                self.popen.poll()
                time.sleep(0.05)
        try:
            self.popen.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _socket_inodes(sid: int) -> set:
    """Return the inodes of the sockets held open by the processes of session ``sid``."""
    inodes = set()
    for pid in _session_members(sid):
        try:
            fds = os.listdir("/proc/%d/fd" % pid)
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink("/proc/%d/fd/%s" % (pid, fd))
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes


def _tcp_listener_inodes(host: str, port: int) -> set:
    want = "%s:%04X" % ("".join("%02X" % b for b in reversed(socket.inet_aton(host))), port)
    inodes = set()
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1] in (want, "00000000:%04X" % port) and fields[3] == "0A":  # LISTEN
                inodes.add(int(fields[9]))
    return inodes


def _unix_listener_inodes(path: str) -> set:
    inodes = set()
    with open("/proc/net/unix") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if len(fields) >= 8 and fields[7] == path and fields[5] == "01":  # listening
                inodes.add(int(fields[6]))
    return inodes


def wait_for_port(port: int, process: Process, logs: Sequence[Path],
                  timeout: float = START_TIMEOUT, host: str = "127.0.0.1") -> None:
    """Return once ``process`` listens on ``host:port``; raise StartError with the logs if not.

    A connection alone proves nothing: a stranger may hold the port while our server fails
    to bind it. The listening socket must belong to a process of our server's session.
    """
    deadline = time.monotonic() + timeout
    while True:
        if _tcp_listener_inodes(host, port) & _socket_inodes(process.sid):
            try:
                with socket.create_connection((host, port), timeout=1.0):
                    return
            except OSError:
                pass
        _check_alive(process, logs, "before listening on %s:%s" % (host, port))
        if time.monotonic() > deadline:
            raise StartError("%s did not listen on %s:%s within %ss\n%s"
                             % (process.name, host, port, timeout, _logs_text(logs)))
        time.sleep(0.05)


def wait_for_unix_socket(path: Path, process: Process, logs: Sequence[Path],
                         timeout: float = START_TIMEOUT) -> None:
    """Return once the unix socket ``path`` accepts connections; raise StartError if not."""
    deadline = time.monotonic() + timeout
    while True:
        if path.exists() and _unix_listener_inodes(str(path)) & _socket_inodes(process.sid):
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.settimeout(1.0)
                    sock.connect(str(path))
                    return
            except OSError:
                pass
        _check_alive(process, logs, "before its socket %s accepted connections" % path)
        if time.monotonic() > deadline:
            raise StartError("%s did not listen on %s within %ss\n%s"
                             % (process.name, path, timeout, _logs_text(logs)))
        time.sleep(0.05)


def _check_alive(process: Process, logs: Sequence[Path], when: str) -> None:
    code = process.exited()
    if code is not None:
        raise StartError("%s exited with status %s %s\n%s"
                         % (process.name, code, when, _logs_text(logs)))


def _logs_text(logs: Sequence[Path]) -> str:
    return "\n".join("--- %s ---\n%s" % (p, _tail(p)) for p in logs if p.exists())


@dataclass
class Server:
    """A running front server (and the FastCGI app behind it, if any)."""

    name: str
    port: int
    workdir: Path
    docroot: Path
    processes: List[Process]
    logs: List[Path]
    site: Optional[Site] = None
    info: Dict[str, object] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return "http://127.0.0.1:%d" % self.port

    def log_text(self, limit: int = 6000) -> str:
        return "\n".join("--- %s ---\n%s" % (p.name, _tail(p, limit)) for p in self.logs if p.exists())

    def log_size(self) -> Dict[Path, int]:
        return {p: p.stat().st_size for p in self.logs if p.exists()}

    def log_since(self, sizes: Dict[Path, int]) -> str:
        """Return what the logs gained since ``sizes`` (from log_size())."""
        parts = []
        for p in self.logs:
            if p.exists():
                with open(p, "rb") as f:
                    f.seek(sizes.get(p, 0))
                    new = f.read()
                if new:
                    parts.append("--- %s ---\n%s" % (p.name, new.decode("utf-8", "replace")))
        return "\n".join(parts)

    def stop(self) -> None:
        # Front server first, then the app behind it.
        for process in self.processes:
            process.stop()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------
# Apache


def _apache_binary() -> str:
    for candidate in (shutil.which("apache2"), "/usr/sbin/apache2", shutil.which("httpd")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise ServerUnavailable("apache2 is not installed (Debian package apache2)")


def _apache_module(name: str, package: str = "apache2") -> str:
    """Return the LoadModule line for module ``name`` (e.g. "cgid"), from Debian's .load file."""
    load = Path("/etc/apache2/mods-available/%s.load" % name)
    if load.is_file():
        for line in load.read_text().splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == "LoadModule":
                if not Path(parts[2]).is_file():
                    break
                return line.strip()
    so = Path("/usr/lib/apache2/modules/mod_%s.so" % name)
    if so.is_file():
        return "LoadModule %s_module %s" % (name, so)
    raise ServerUnavailable("Apache module %s is not installed (Debian package %s)" % (name, package))


_MPM_TUNING = {
    "prefork": """\
StartServers 2
MinSpareServers 2
MaxSpareServers 4
MaxRequestWorkers 16""",
    "event": """\
StartServers 1
ServerLimit 4
ThreadsPerChild 8
MinSpareThreads 4
MaxSpareThreads 16
MaxRequestWorkers 32""",
}

_APACHE_CONF = """\
# Written by tests/servers.py: a private Apache on 127.0.0.1, nothing under /etc used
# but module files and mime.types.
ServerRoot "%(srv)s"
ServerName 127.0.0.1
Listen 127.0.0.1:%(port)d
PidFile "%(srv)s/run/httpd.pid"
DefaultRuntimeDir "%(srv)s/run"
Mutex file:%(srv)s/run default
ErrorLog "%(srv)s/logs/error.log"
LogLevel info
User %(user)s
Group %(user)s
Timeout 60
KeepAlive On

%(modules)s

TypesConfig /etc/mime.types
%(mpm_tuning)s

%(handler_global)s

DocumentRoot "%(docroot)s"
<Directory />
    AllowOverride None
    Require all denied
</Directory>
<Directory "%(docroot)s">
    AllowOverride None
    Require all granted
    AcceptPathInfo On
%(handler_dir)s
</Directory>
"""

# handler name -> (modules, server-level directives, <Directory> directives)
_APACHE_HANDLERS: Dict[str, Tuple[Sequence[str], str, str]] = {
    "cgi": (["cgi"], "", """\
    Options +ExecCGI
    AddHandler cgi-script .py"""),
    "cgid": (["cgid"], 'ScriptSock "%(srv)s/run/cgid.sock"', """\
    Options +ExecCGI
    AddHandler cgi-script .py"""),
    "modpython": (["python"], "", """\
    <Files "app.py">
        SetHandler mod_python
        PythonHandler mod_python.cgihandler
        PythonPath "['%(docroot)s', '%(site_packages)s'] + sys.path"
    </Files>"""),
    # tinyweb preloaded at child start, one PythonImport line (README: Apache mod_python).
    "modpython-preload": (["python"], """\
PythonPath "['%(docroot)s', '%(site_packages)s'] + sys.path"
PythonImport tinyweb.runners.modpython::preload main_interpreter""", """\
    <Files "app.py">
        SetHandler mod_python
        PythonHandler mod_python.cgihandler
        PythonInterpreter main_interpreter
    </Files>"""),
    "fcgid": (["fcgid"], """\
FcgidIPCDir "%(srv)s/fcgid"
FcgidProcessTableFile "%(srv)s/run/fcgid_shm"
FcgidInitialEnv PATH "/usr/local/bin:/usr/bin:/bin"
# Let a streamed chunk through as soon as the app writes it (notes/servers.md §7).
FcgidOutputBufferSize 0
# Past mod_fcgid's 128 KiB default, so the app's own max_body (10 MiB) is what answers.
FcgidMaxRequestLen 20971520""", """\
    Options +ExecCGI
    AddHandler fcgid-script .py"""),
}

_MODULE_PACKAGES = {"python": "libapache2-mod-python", "fcgid": "libapache2-mod-fcgid"}


def start_apache(workdir: Path, docroot: Path, *, mpm: str, handler: str,
                 venv: Optional[Venv] = None, name: Optional[str] = None,
                 extra_conf: str = "") -> Server:
    """Start a private Apache with ``mpm`` serving ``docroot`` through ``handler``.

    ``handler`` is cgi, cgid, modpython or fcgid; mod_python needs ``venv`` for PythonPath.
    """
    binary = _apache_binary()
    modules, handler_global, handler_dir = _APACHE_HANDLERS[handler]
    loads = [_apache_module("mpm_" + mpm), _apache_module("authz_core"), _apache_module("mime")]
    loads += [_apache_module(m, _MODULE_PACKAGES.get(m, "apache2")) for m in modules]
    if handler.startswith("modpython") and venv is None:
        raise ValueError("mod_python needs the venv for its PythonPath")

    srv = _mkdir(workdir / ("apache-%s-%s" % (mpm, handler)))
    for sub in ("run", "logs", "conf"):
        _mkdir(srv / sub)
    if handler == "fcgid":
        _mkdir(srv / "fcgid", owner=SERVER_USER)
    port = free_port()
    values = dict(srv=srv, port=port, user=SERVER_USER, docroot=docroot,
                  site_packages=venv.site_packages if venv else "")
    conf = _APACHE_CONF % dict(
        values,
        modules="\n".join(loads),
        mpm_tuning=_MPM_TUNING[mpm],
        handler_global=handler_global % values,
        handler_dir=handler_dir % values,
    ) + extra_conf
    conf_path = srv / "conf" / "httpd.conf"
    conf_path.write_text(conf)
    error_log, startup_log = srv / "logs" / "error.log", srv / "logs" / "startup.log"

    check = subprocess.run([binary, "-t", "-f", str(conf_path)], capture_output=True, text=True,
                           timeout=30)
    if check.returncode != 0:
        raise StartError("apache2 -t rejected %s:\n%s%s\n--- config ---\n%s"
                         % (conf_path, check.stdout, check.stderr, conf))

    process = Process("apache %s+%s" % (mpm, handler),
                      [binary, "-f", str(conf_path), "-DFOREGROUND"],
                      log=startup_log, pidfile=srv / "run" / "httpd.pid", cwd=srv,
                      env={"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                           "LANG": "C"})
    process.start()
    server = Server(name or "%s+%s" % (mpm, handler), port, workdir, docroot, [process],
                    [error_log, startup_log], info={"conf": conf_path})
    try:
        wait_for_port(port, process, server.logs)
    except BaseException:
        server.stop()
        raise
    return server


# ---------------------------------------------------------------------------------------
# nginx in front of an external FastCGI app

_NGINX_CONF = """\
# Written by tests/servers.py: a private nginx on 127.0.0.1, nothing under /etc used but
# fastcgi_params.
user %(user)s %(user)s;
worker_processes 1;
daemon off;
pid %(srv)s/run/nginx.pid;
error_log %(srv)s/logs/error.log info;

events {
    worker_connections 256;
}

http {
    access_log %(srv)s/logs/access.log;
    client_body_temp_path %(srv)s/tmp/client_body;
    fastcgi_temp_path %(srv)s/tmp/fastcgi;
    proxy_temp_path %(srv)s/tmp/proxy;
    uwsgi_temp_path %(srv)s/tmp/uwsgi;
    scgi_temp_path %(srv)s/tmp/scgi;
    default_type application/octet-stream;
    # Past nginx's 1m default, so the app's own max_body (10 MiB) is what answers.
    client_max_body_size 20m;

    server {
        listen 127.0.0.1:%(port)d;
        server_name 127.0.0.1;
        root %(docroot)s;

        # notes/servers.md §4: save PATH_INFO before try_files resets it.
        location ~ ^.+?\\.py(/|$) {
            fastcgi_split_path_info ^(.+?\\.py)(/.*)$;
            set $path_info $fastcgi_path_info;
            try_files $fastcgi_script_name =404;
            include /etc/nginx/fastcgi_params;
            fastcgi_param SCRIPT_FILENAME $document_root$fastcgi_script_name;
            fastcgi_param PATH_INFO $path_info;
            fastcgi_param HTTP_PROXY "";
            fastcgi_pass %(upstream)s;
        }
    }
}
"""


def _nginx_binary() -> str:
    for candidate in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise ServerUnavailable("nginx is not installed (Debian package nginx-light or nginx)")


def start_fcgi_app(workdir: Path, argv: Sequence[str], address: Address, *,
                   user: Optional[str] = None, cwd: Optional[Path] = None,
                   env: Optional[Dict[str, str]] = None, name: str = "fastcgi app") -> Process:
    """Start an external FastCGI app and wait until ``address`` accepts connections."""
    logs = _mkdir(workdir / "logs")
    log = logs / "app.log"
    if env is None:
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
    process = Process(name, list(map(str, argv)), log=log, cwd=cwd, env=env, user=user)
    process.start()
    try:
        if isinstance(address, tuple):
            wait_for_port(address[1], process, [log], host=address[0])
        else:
            wait_for_unix_socket(Path(address), process, [log])
    except BaseException:
        process.stop()
        raise
    return process


def start_nginx(workdir: Path, docroot: Path, upstream: Address, *,
                app: Optional[Process] = None, name: str = "nginx") -> Server:
    """Start a private nginx serving ``*.py`` under ``docroot`` from the FastCGI ``upstream``.

    ``app`` (already started) is stopped with the server.
    """
    binary = _nginx_binary()
    if not Path("/etc/nginx/fastcgi_params").is_file():
        raise ServerUnavailable("/etc/nginx/fastcgi_params is missing (Debian package nginx-common)")
    srv = _mkdir(workdir / "nginx")
    for sub in ("run", "logs", "conf", "tmp"):
        _mkdir(srv / sub)
    port = free_port()
    upstream_text = ("%s:%d" % upstream) if isinstance(upstream, tuple) else "unix:%s" % upstream
    conf = _NGINX_CONF % dict(srv=srv, port=port, user=SERVER_USER, docroot=docroot,
                              upstream=upstream_text)
    conf_path = srv / "conf" / "nginx.conf"
    conf_path.write_text(conf)
    error_log, startup_log = srv / "logs" / "error.log", srv / "logs" / "startup.log"
    argv = [binary, "-p", str(srv) + "/", "-c", str(conf_path), "-e", str(error_log)]
    check = subprocess.run(argv + ["-t"], capture_output=True, text=True, timeout=30)
    if check.returncode != 0:
        raise StartError("nginx -t rejected %s:\n%s%s\n--- config ---\n%s"
                         % (conf_path, check.stdout, check.stderr, conf))
    process = Process(name, argv, log=startup_log, pidfile=srv / "run" / "nginx.pid", cwd=srv)
    process.start()
    logs = [error_log, startup_log]
    processes = [process]
    if app is not None:
        logs.append(app.log)
        processes.append(app)
    server = Server(name, port, workdir, docroot, processes, logs,
                    info={"conf": conf_path, "upstream": upstream})
    try:
        wait_for_port(port, process, logs)
    except BaseException:
        server.stop()
        raise
    return server


# ---------------------------------------------------------------------------------------
# The matrix of variants, each serving a Site's htdocs/app.py at /app.py


def _apache_variant(mpm: str, handler: str) -> Callable[..., Server]:
    def start(workdir: Path, site: Site, venv: Venv) -> Server:
        server = start_apache(workdir, site.htdocs, mpm=mpm, handler=handler, venv=venv)
        server.site = site
        return server
    return start


def _nginx_variant(bind: str) -> Callable[..., Server]:
    def start(workdir: Path, site: Site, venv: Venv) -> Server:
        _nginx_binary()  # skip before starting the app when nginx is missing
        argv = [str(venv.python), str(site.app), "--mode", "fcgi"]
        if bind == "unix":
            # The app runs as root here, so the socket must be opened to nginx's group
            # (notes/servers.md §0: flup's default umask gives nginx a 502).
            sock_dir = _mkdir(workdir / "sock")
            address: Address = str(sock_dir / "app.sock")
            argv += ["--bind", "unix:" + address, "--socket-group", SERVER_USER,
                     "--socket-mode", "0660"]
            user = None
        else:
            # Over TCP the app runs as www-data, like a real deployment's app user.
            address = ("127.0.0.1", free_port())
            argv += ["--bind", "127.0.0.1:%d" % address[1]]
            user = SERVER_USER
        app = start_fcgi_app(workdir, argv, address, user=user, cwd=site.htdocs,
                             name="tinyweb fcgi app (%s)" % bind)
        try:
            server = start_nginx(workdir, site.htdocs, address, app=app, name="nginx+" + bind)
        except BaseException:
            app.stop()
            raise
        server.site = site
        server.info["app_argv"] = argv
        return server
    return start


# name -> (start(workdir, site, venv) -> Server, the tinyweb.mode the app should report)
VARIANTS: Dict[str, Tuple[Callable[..., Server], str]] = {
    "event-cgid": (_apache_variant("event", "cgid"), "cgi"),
    "prefork-cgi": (_apache_variant("prefork", "cgi"), "cgi"),
    "prefork-modpython": (_apache_variant("prefork", "modpython"), "modpython"),
    "prefork-modpython-preload": (_apache_variant("prefork", "modpython-preload"), "modpython"),
    "event-fcgid": (_apache_variant("event", "fcgid"), "fcgi"),
    "nginx-unix": (_nginx_variant("unix"), "fcgi"),
    "nginx-tcp": (_nginx_variant("tcp"), "fcgi"),
}


def start_variant(variant: str, venv: Venv, htdocs: Path) -> Server:
    """Start the server ``variant`` serving a fresh copy of ``htdocs``."""
    start, _mode = VARIANTS[variant]
    workdir = new_workdir(variant)
    site = make_site(workdir, htdocs, venv.python)
    server = start(workdir, site, venv)
    server.name = variant
    return server
