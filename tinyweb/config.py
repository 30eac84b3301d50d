"""Read an app's settings from tinyweb.ini beside its htdocs/, the environment and App arguments."""

import configparser
import os
import sys
from pathlib import Path

__all__ = ["Config", "ConfigError", "load_config", "app_root"]

DEFAULT_MAX_BODY = 10 * 1024 * 1024
# Seconds a request may run before it is answered 503 and its worker recycled; 0 turns it off.
# Under the web servers' own deadlines (mod_fcgid's FcgidIOTimeout 40 s, nginx's
# fastcgi_read_timeout 60 s), so the client gets tinyweb's 503 rather than their 502/504;
# PHP's max_execution_time is 30 s too.
DEFAULT_REQUEST_TIMEOUT = 30.0
# What app_template/tinyweb.ini holds until `tinyweb new` writes a real secret there.
SECRET_PLACEHOLDER = "@SECRET@"
MIN_SECRET_LENGTH = 16


class ConfigError(ValueError):
    """tinyweb.ini or an App argument holds a value tinyweb cannot use."""


class Config:
    """An app's settings; ``path`` is the file they came from, or None."""

    # A plain class, not a dataclass: every CGI request reads its config, and dataclasses
    # (with inspect and typing) would cost it ~20 ms (bench/README.md).
    def __init__(self, root, path, secret=None, data_dir=None, debug=False,
                 max_body=DEFAULT_MAX_BODY, allowed_hosts=(), cgi_worker=False,
                 request_timeout=DEFAULT_REQUEST_TIMEOUT, session=None):
        self.root = root
        self.path = path
        self.secret = secret
        self.data_dir = Path("data") if data_dir is None else data_dir
        self.debug = debug
        self.max_body = max_body
        self.allowed_hosts = list(allowed_hosts)
        self.cgi_worker = cgi_worker
        self.request_timeout = request_timeout
        self.session = dict(session or {})

    def __eq__(self, other):
        return isinstance(other, Config) and vars(self) == vars(other)

    def __repr__(self):
        shown = dict(vars(self), secret="***" if self.secret else None)
        return "Config(%s)" % ", ".join("%s=%r" % kv for kv in shown.items())

    def require_secret(self):
        """Return the secret, or raise ConfigError saying where to put one."""
        where = self.path or (self.root / "tinyweb.ini")
        if not self.secret:
            raise ConfigError(
                "sessions need a secret: add `secret = <random text>` under [tinyweb] in %s "
                "(`tinyweb new` writes one)" % where
            )
        if self.secret == SECRET_PLACEHOLDER or len(self.secret) < MIN_SECRET_LENGTH:
            raise ConfigError(
                "the secret in %s is a placeholder or shorter than %d characters: "
                "put a long random one there, e.g. from `python -c \"import secrets; "
                "print(secrets.token_hex(32))\"`" % (where, MIN_SECRET_LENGTH)
            )
        return self.secret


def app_root(app_file):
    """Return the folder above the one holding the app file (the folder above htdocs/)."""
    return Path(os.path.abspath(app_file)).parent.parent


def _bool(text, key, where):
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError("%s: %s = %r is not true or false" % (where, key, text))


def _size(text, key, where):
    try:
        value = int(str(text).strip())
    except ValueError:
        value = -1
    if value < 0:
        raise ConfigError("%s: %s = %r is not a number of bytes" % (where, key, text))
    return value


def _seconds(text, key, where):
    # A float, but not "inf", "nan" or True (float(True) is 1.0): a typo must not read as a number.
    try:
        value = float(str(text).strip()) if not isinstance(text, bool) else -1.0
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise ConfigError("%s: %s = %r is not a number of seconds (0 turns it off)"
                          % (where, key, text))
    return value


def _hosts(value):
    if isinstance(value, str):
        value = value.replace(",", " ").split()
    return [h.strip().lower() for h in value if h.strip()]


def load_config(app_file, overrides=None, environ=None, warn=None):
    """Return the Config for the app whose file is ``app_file``.

    The file is found from the app's own location, never from the working directory
    (mod_python's cgihandler and CGI servers each choose their own cwd); TINYWEB_CONFIG
    names another file. ``overrides`` (App arguments) win over the file.
    """
    environ = os.environ if environ is None else environ
    warn = warn or (lambda text: sys.stderr.write("tinyweb: %s\n" % text))
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if app_file:
        root = app_root(app_file)
    else:
        # No file to start from (an app made in an interactive session): a root is needed
        # for data_dir, but no tinyweb.ini is looked for in the working directory.
        root = Path(os.getcwd())
    if environ.get("TINYWEB_CONFIG"):
        path = Path(environ["TINYWEB_CONFIG"])
    elif app_file:
        path = root / "tinyweb.ini"
    else:
        path = Path("<no app file: set TINYWEB_CONFIG>")

    config = Config(root=root, path=None, data_dir=root / "data")
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
        config.path = path
    except FileNotFoundError:
        if "secret" not in overrides:
            warn("no config file at %s: serving without a secret, so sessions are off "
                 "(`tinyweb new` makes one)" % path)
    except (OSError, UnicodeDecodeError, configparser.Error) as exc:
        raise ConfigError("cannot read %s: %s" % (path, exc))

    where = str(path)
    if parser.has_section("tinyweb"):
        section = parser["tinyweb"]
        config.secret = section.get("secret", "").strip() or None
        if section.get("data_dir", "").strip():
            config.data_dir = root / section["data_dir"].strip()
        config.debug = _bool(section.get("debug", "false"), "debug", where)
        config.max_body = _size(section.get("max_body", DEFAULT_MAX_BODY), "max_body", where)
        config.allowed_hosts = _hosts(section.get("allowed_hosts", ""))
        config.cgi_worker = _bool(section.get("cgi_worker", "false"), "cgi_worker", where)
        config.request_timeout = _seconds(section.get("request_timeout", DEFAULT_REQUEST_TIMEOUT),
                                          "request_timeout", where)
    if parser.has_section("session"):
        config.session = dict(parser["session"])

    if environ.get("TINYWEB_DEBUG", "").strip() not in ("", "0"):
        config.debug = True
    for key, value in overrides.items():
        if key == "data_dir":
            value = root / value
        elif key in ("debug", "cgi_worker") and isinstance(value, str):
            value = _bool(value, key, "App(...)")
        elif key == "max_body":
            value = _size(value, key, "App(...)")
        elif key == "request_timeout":
            value = _seconds(value, key, "App(...)")
        elif key == "allowed_hosts":
            value = _hosts(value)
        elif key == "session":
            value = dict(config.session, **value)
        elif not hasattr(config, key) or key in ("root", "path"):
            raise ConfigError("App(...) got an unknown setting %r" % key)
        setattr(config, key, value)
    return config
