"""Shared pieces of the in-process tests: a clean configuration, a WebTest client, the CGI run."""

import http.cookiejar
import os
import subprocess
import sys
from pathlib import Path
from wsgiref.validate import validator

import pytest
import webtest

CHECKOUT = Path(__file__).resolve().parent.parent
SECRET = "test-secret-0123456789abcdef0123456789abcdef"


def run_wsgi(app, environ):
    """Run ``app`` under wsgiref's validator to its body's close(); return (status, body, log),
    the log being what went to ``environ["wsgi.errors"]`` (a StringIO)."""
    errors = environ["wsgi.errors"]  # the validator wraps it in place
    statuses = []
    body = validator(app)(environ, lambda status, headers, exc_info=None: statuses.append(status))
    try:
        data = b"".join(body)
    finally:
        body.close()
    return statuses[0], data, errors.getvalue()


def make_site(tmp_path, app_text, settings=""):
    """Lay an app out as `tinyweb new` makes it in tmp_path/site: htdocs/app.py and a
    tinyweb.ini with a secret and ``settings`` (None: no tinyweb.ini). Return the root."""
    root = tmp_path / "site"
    (root / "htdocs").mkdir(parents=True)
    (root / "htdocs" / "app.py").write_text(app_text)
    if settings is not None:
        (root / "tinyweb.ini").write_text("[tinyweb]\nsecret = %s\n%s" % (SECRET, settings))
    return root


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """Keep the developer's tinyweb.ini and TINYWEB_* variables out of a test.

    An app built in a test module has its root in the checkout, where the README's demo
    command writes a tinyweb.ini; TINYWEB_CONFIG points at an empty one instead.
    """
    for name in list(os.environ):
        if name.startswith("TINYWEB_"):
            monkeypatch.delenv(name)
    ini = tmp_path / "empty.ini"
    ini.write_text("[tinyweb]\n")
    monkeypatch.setenv("TINYWEB_CONFIG", str(ini))


class Client(webtest.TestApp):
    """WebTest around ``app`` wrapped in wsgiref's validator, with no cookie jar.

    Tests send the session cookie themselves, so what travels is what the test says.
    """

    def __init__(self, app, **environ):
        no_cookies = http.cookiejar.CookieJar(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
        super().__init__(validator(app), extra_environ=environ, cookiejar=no_cookies)


def cgi_environ(path="/", method="GET", query="", script="/app.py", **extra):
    """Return the environment a CGI/1.1 server gives a script, as in RFC 3875 §4.1."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "GATEWAY_INTERFACE": "CGI/1.1",
        "SERVER_SOFTWARE": "test",
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": script,
        "PATH_INFO": path,
        "QUERY_STRING": query,
        "HTTP_HOST": "localhost",
    }
    env.update(extra)
    return env


def run_cgi(script, environ, body=b"", argv=(), stdin=None, timeout=20):
    """Run ``script`` as a web server runs a CGI script; return the CompletedProcess."""
    return subprocess.run(
        [sys.executable, str(script), *argv],
        input=None if stdin is not None else body,
        stdin=stdin,
        env=environ,
        capture_output=True,
        timeout=timeout,
    )


def split_cgi(stdout):
    """Split a CGI response into (status line, [(name, value)], body); it must have a blank line."""
    head, sep, body = stdout.partition(b"\r\n\r\n")
    assert sep, "no blank line after the CGI headers: %r" % stdout[:200]
    lines = head.decode("latin-1").split("\r\n")
    headers = [tuple(line.split(": ", 1)) for line in lines]
    assert headers[0][0] == "Status", lines
    return headers[0][1], headers[1:], body
