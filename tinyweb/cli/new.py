"""``tinyweb new DIR``: make an app from the template, with a fresh secret and a private data dir."""

import os
import re
import secrets
import shutil
import stat
import sys
from importlib.util import find_spec
from pathlib import Path

from tinyweb.config import SECRET_PLACEHOLDER

__all__ = ["add_parser", "run", "find_template", "scaffold", "NewError"]

APP = Path("htdocs", "app.py")
CONFIG = Path("tinyweb.ini")
DATA = Path("data")
SERVER_USER = "www-data"  # Debian's Apache and nginx; what the printed advice assumes
_SKIP = ("__pycache__", ".gitkeep", "__init__.py")


class NewError(Exception):
    """The app cannot be made; the message says why and what to do."""


def add_parser(commands):
    parser = commands.add_parser(
        "new",
        help="make a new app in DIR",
        description="Make a new app in DIR: htdocs/app.py (whose first line names this Python), "
        "tinyweb.ini with a fresh secret, and a private data/ for sessions. "
        "Prints how to run it under each web server.",
    )
    parser.add_argument("dir", metavar="DIR", help="where to make it (new, or an empty folder)")
    parser.add_argument(
        "--user", metavar="USER",
        help="the user the app will run as (the web server's, e.g. www-data): owns data/ and "
        "tinyweb.ini (needs root)",
    )
    parser.set_defaults(run=run)
    return parser


def find_template():
    """Return the app template's folder: package tinyweb.app_template, else the checkout's."""
    candidates = []
    try:
        spec = find_spec("tinyweb.app_template")
    except ImportError:
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates.extend(spec.submodule_search_locations)
    import tinyweb

    # A checkout (or an editable install): app_template/ beside the tinyweb package.
    candidates.append(os.path.join(os.path.dirname(os.path.dirname(tinyweb.__file__)), "app_template"))
    for candidate in candidates:
        path = Path(candidate)
        if (path / APP).is_file() and (path / CONFIG).is_file():
            return path
    raise NewError("the app template is missing from this tinyweb (looked in %s): reinstall tinyweb"
                   % ", ".join(str(c) for c in candidates))


def _lookup_user(name):
    import pwd

    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise NewError("there is no user %r on this machine: create it, or pass the user "
                       "your web server runs as (--user %s)" % (name, SERVER_USER))
    if os.geteuid() != 0 and entry.pw_uid != os.geteuid():
        raise NewError("giving data/ and tinyweb.ini to %s needs root: run this with sudo, or "
                       "without --user and then `sudo chown -R %s DIR/data DIR/tinyweb.ini`"
                       % (name, name))
    return entry


def _check_target(target):
    if target.exists() or target.is_symlink():
        if not target.is_dir():
            raise NewError("%s exists and is not a folder: choose another DIR" % target)
        if any(target.iterdir()):
            raise NewError("%s is not empty: choose a new or empty folder (tinyweb new never "
                           "overwrites files)" % target)
        return False
    return True


def _write_new(path, data, mode):
    """Create ``path`` (never overwrite) with ``data`` and exactly ``mode``."""
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have taken bits away
        with os.fdopen(fd, "wb") as f:
            fd = None
            f.write(data)
    finally:
        if fd is not None:
            os.close(fd)


def _mkdir(path, mode):
    path.mkdir(exist_ok=False)
    os.chmod(path, mode)


def _with_shebang(source, python):
    first, sep, rest = source.partition(b"\n")
    if not first.startswith(b"#!"):
        rest = source
    return b"#!" + os.fsencode(python) + b"\n" + rest


def scaffold(template, target, python, secret, owner=None):
    """Copy ``template`` into the empty or new folder ``target``; return the files made.

    htdocs/app.py gets ``python`` in its shebang and mode 0755; tinyweb.ini gets ``secret``
    and mode 0600; data/ is made 0700. With ``owner`` (a pwd entry) those two are chowned.
    """
    made = []
    if not target.exists():
        target.mkdir(parents=True)
        os.chmod(target, 0o755)
    for dirpath, dirnames, filenames in os.walk(template):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP)
        relative = Path(dirpath).relative_to(template)
        for name in dirnames:
            _mkdir(target / relative / name, 0o755)
        for name in sorted(filenames):
            if name in _SKIP or name.endswith((".pyc", ".pyo")):
                continue
            source = Path(dirpath) / name
            dest = target / relative / name
            data = source.read_bytes()
            mode = 0o644
            if relative / name == APP:
                data, mode = _with_shebang(data, python), 0o755
            elif relative / name == CONFIG:
                if SECRET_PLACEHOLDER.encode() not in data:
                    raise NewError("the template's %s has no %s to put the secret in: "
                                   "reinstall tinyweb" % (CONFIG, SECRET_PLACEHOLDER))
                data, mode = data.replace(SECRET_PLACEHOLDER.encode(), secret.encode()), 0o600
            _write_new(dest, data, mode)
            made.append(dest)
    data_dir = target / DATA
    if not data_dir.exists():
        _mkdir(data_dir, 0o700)
    os.chmod(data_dir, 0o700)
    if owner is not None and owner.pw_uid != os.geteuid():
        for path in (data_dir, target / CONFIG):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    return made


def compile_modules(htdocs, script):
    """Compile the Python files under ``htdocs`` but the executed ``script``; return success.

    The script a CGI server runs is compiled on every request whatever is cached, and the
    web server's user cannot write __pycache__ here: modules beside it are compiled now.
    """
    import compileall

    skip = re.compile(re.escape(str(script)) + r"\Z")
    ok = compileall.compile_dir(str(htdocs), quiet=1, rx=skip)
    for dirpath, dirnames, filenames in os.walk(htdocs):
        if os.path.basename(dirpath) == "__pycache__":
            os.chmod(dirpath, 0o755)
            for name in filenames:
                os.chmod(os.path.join(dirpath, name), 0o644)
    return bool(ok)


def unreachable(path):
    """Return the first folder on the way to ``path`` that others cannot enter, or None."""
    path = Path(os.path.abspath(path))
    for folder in reversed(path.parents):
        try:
            if not os.stat(folder).st_mode & stat.S_IXOTH:
                return folder
        except OSError:
            return folder
    return None


def reach_warnings(python, target):
    """Return warnings about what the web server's user (not root, not you) cannot reach."""
    warnings = []
    real = os.path.realpath(python)
    for path in dict.fromkeys([python, real]):
        blocked = unreachable(path)
        if blocked is not None:
            shown = python if real == python else "%s (a link to %s)" % (python, real)
            warnings.append(
                "%s, the Python named on line 1 of htdocs/app.py, is out of reach of other users "
                "(%s is %s), so the web server's user (%s) cannot run the app as CGI or FastCGI. "
                "Make a venv where everyone can reach it (/usr/bin/python3 -m venv /srv/venv), "
                "install tinyweb into it with /srv/venv/bin/pip, and make the app with "
                "/srv/venv/bin/tinyweb new"
                % (shown, blocked, _mode(blocked), SERVER_USER))
            break
    else:
        if not os.stat(real).st_mode & stat.S_IXOTH:
            warnings.append("%s is not executable by other users: `chmod o+rx %s`, or use "
                            "another Python" % (python, real))
    if b" " in os.fsencode(python):
        warnings.append("%s has a space in its path, which a shebang line cannot hold: "
                        "use a Python whose path has none" % python)
    import tinyweb

    package = os.path.dirname(os.path.abspath(tinyweb.__file__))
    blocked = unreachable(os.path.join(package, "__init__.py"))
    if blocked is not None and not warnings:
        warnings.append("tinyweb itself (%s) is out of reach of other users (%s is %s): the web "
                        "server's user cannot import it; install tinyweb where everyone can "
                        "read it" % (package, blocked, _mode(blocked)))
    blocked = unreachable(target / "htdocs" / "app.py")
    if blocked is not None:
        warnings.append("%s is out of reach of other users (%s is %s): a web server cannot "
                        "serve it from there (the dev server can); for a web server, make the "
                        "app in a folder everyone can enter, e.g. /srv/%s"
                        % (target, blocked, _mode(blocked), target.name))
    return warnings


def _mode(path):
    try:
        return "%04o" % stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return "missing"


def _import_dirs():
    """Return the folders that hold tinyweb and its request-time dependencies, for PythonPath."""
    dirs = []
    for name in ("tinyweb", "webob", "beaker"):
        spec = find_spec(name)
        if spec is not None and spec.origin:
            dirs.append(os.path.dirname(os.path.dirname(spec.origin)))
    return list(dict.fromkeys(dirs))


def _current_user():
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def advice(target, python, user, owner_given):
    """Return what to print after making the app: how to run it in each mode."""
    htdocs = target / "htdocs"
    app = htdocs / "app.py"
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", target.name).strip("-.") or "tinyweb"
    sock = "/run/%s/app.sock" % name
    owner = "owner %s" % user if owner_given else "owner %s" % _current_user()
    python_path = ", ".join(repr(p) for p in [str(htdocs)] + _import_dirs())
    run_as = "" if user == _current_user() else "sudo -u %s " % user
    lines = [
        "Made a tinyweb app in %s:" % target,
        "  htdocs/app.py  the app; line 1 runs it with %s" % python,
        "  tinyweb.ini    settings and a fresh session secret (mode 0600, %s)" % owner,
        "  data/          sessions (mode 0700, %s)" % owner,
        "",
        "Try it:  tinyweb serve %s    (http://127.0.0.1:8000/; --reload to follow edits)" % target,
        "",
        "Deploy it: htdocs/ is the document root (or an Alias); the app answers at /app.py/.",
    ]
    if not owner_given:
        lines += [
            "Web servers run the app as their own user: give it the secret and the data with",
            "    sudo chown %s %s %s" % (user, target / CONFIG, target / DATA),
            "(or make the app with `tinyweb new DIR --user %s`)." % user,
        ]
    lines += [
        "",
        "Apache, CGI (a2enmod cgid):",
        "    <Directory %s>" % htdocs,
        "        Options +ExecCGI",
        "        AddHandler cgi-script .py",
        "        Require all granted",
        "    </Directory>",
        "",
        "Apache, mod_python (libapache2-mod-python, prefork MPM):",
        "    <Directory %s>" % htdocs,
        '        <Files "app.py">',
        "            SetHandler mod_python",
        "            PythonHandler mod_python.cgihandler",
        '            PythonPath "[%s] + sys.path"' % python_path,
        "        </Files>",
        "        Require all granted",
        "    </Directory>",
    ]
    if sys.version_info[:2] != (3, 11):
        lines.append("  (mod_python embeds Debian's Python 3.11: PythonPath must name a 3.11 "
                     "site-packages holding tinyweb)")
    lines += [
        "",
        "Apache, mod_fcgid (libapache2-mod-fcgid):",
        "    <Directory %s>" % htdocs,
        "        Options +ExecCGI",
        "        AddHandler fcgid-script .py",
        "        Require all granted",
        "    </Directory>",
        "",
        "nginx: start the app as a FastCGI server on a unix socket (e.g. from a systemd unit)",
        "    sudo install -d -o %s -g %s -m 0750 /run/%s" % (user, SERVER_USER, name),
        "    %s%s %s --mode fcgi --bind unix:%s --socket-group %s --socket-mode 0660"
        % (run_as, python, app, sock, SERVER_USER),
        "  and pass it *.py from the server block:",
        "    location ~ ^.+?\\.py(/|$) {",
        "        root %s;" % htdocs,
        "        fastcgi_split_path_info ^(.+?\\.py)(/.*)$;",
        "        set $path_info $fastcgi_path_info;",
        "        try_files $fastcgi_script_name =404;",
        "        include fastcgi_params;",
        "        fastcgi_param SCRIPT_FILENAME $document_root$fastcgi_script_name;",
        "        fastcgi_param PATH_INFO $path_info;",
        "        fastcgi_pass unix:%s;" % sock,
        "    }",
        "",
        "Keep htdocs/app.py thin: a CGI server compiles the script it runs on every request.",
        "Put the bulk of the code in a package outside htdocs/ (every .py file in htdocs/ is a",
        "script the web server runs or serves), installed with `%s -m pip install -e DIR`," % python,
        "where it is compiled once.",
    ]
    return "\n".join(lines) + "\n"


def run(args):
    """Make the app in args.dir; print what was made and how to deploy it. Return 0 or 1."""
    target = Path(os.path.abspath(args.dir))
    python = sys.executable
    started = created = False
    try:
        owner = _lookup_user(args.user) if args.user else None
        template = find_template()
        created = _check_target(target)
        started = True
        scaffold(template, target, python, secrets.token_hex(32), owner)
        compile_modules(target / "htdocs", target / APP)
    except (NewError, OSError) as exc:
        if isinstance(exc, NewError):
            sys.stderr.write("tinyweb: %s\n" % exc)
        else:
            sys.stderr.write("tinyweb: cannot make the app in %s: %s\n" % (target, exc))
        if started:
            _clean(target, created)
        return 1
    user = args.user or SERVER_USER
    sys.stdout.write(advice(target, python, user, owner_given=bool(args.user)))
    sys.stdout.flush()
    # Last, so they are what stays on the screen.
    for warning in reach_warnings(python, target):
        sys.stderr.write("tinyweb: warning: %s\n" % warning)
    return 0


def _clean(target, created):
    """Take away a half-made app: the folder if this run made it, else what it put inside."""
    if created:
        shutil.rmtree(target, ignore_errors=True)
        return
    for child in target.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink()
