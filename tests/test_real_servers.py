"""Run the demo app (htdocs/app.py), unchanged, under real web servers on 127.0.0.1.

The matrix: Apache event+mod_cgid, prefork+mod_cgi, prefork+mod_python's cgihandler,
mod_fcgid, and nginx in front of the app as an external FastCGI server on a unix socket
and on TCP. Then the modes without a web server: the dev server, the mode flags and
environment, and an app made by ``tinyweb new`` under Apache CGI.
"""

import grp
import hashlib
import json
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import time
from pathlib import Path
from urllib.parse import urljoin

import pytest
import requests

import fcgi_client
import servers

TIMEOUT = 30  # per HTTP request; mod_fcgid's first request spawns the app
SUBPROCESS_TIMEOUT = 30


def get(server, path, **kwargs):
    kwargs.setdefault("allow_redirects", False)
    return requests.get(server.url + path, timeout=TIMEOUT, **kwargs)


def system_python_version():
    return subprocess.run([servers.SYSTEM_PYTHON, "-c", "import sys; print(sys.version.split()[0])"],
                          capture_output=True, text=True, check=True, timeout=30).stdout.strip()


def expected_mode(server):
    return servers.VARIANTS[server.name][1]


def set_cookies(response):
    """Return each Set-Cookie header as (name, value, {attribute: value}) with lower-case keys."""
    cookies = []
    for header in response.raw.headers.getlist("Set-Cookie"):
        first, *attributes = [part.strip() for part in header.split(";")]
        name, _, value = first.partition("=")
        attrs = {}
        for attribute in attributes:
            key, _, val = attribute.partition("=")
            attrs[key.strip().lower()] = val.strip()
        cookies.append((name, value, attrs))
    return cookies


# ---------------------------------------------------------------------------------------
# The matrix: every variant, one server each (the ``server`` fixture in conftest.py)


def test_index_links_carry_the_script_path(server):
    response = get(server, "/app.py/")
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/html")
    assert "<h1>tinyweb demo</h1>" in response.text
    assert 'href="/app.py/users/7"' in response.text
    assert 'href="/app.py/form"' in response.text


def test_int_route_gives_json_and_rejects_non_int(server):
    response = get(server, "/app.py/users/7")
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.json() == {"id": 7, "url": "/app.py/users/7"}
    assert get(server, "/app.py/users/abc").status_code == 404
    assert get(server, "/app.py/no/such/page").status_code == 404


@pytest.mark.parametrize("method, path, body, allowed", [
    ("DELETE", "/app.py/users/7", None, {"GET", "POST"}),
    # With a body the app does not read: mod_cgid loses the response of a CGI script
    # that exits without draining stdin (notes/servers.md §8).
    ("PUT", "/app.py/", b"x=1&y=2", {"GET"}),
])
def test_wrong_method_is_405_with_allow(server, method, path, body, allowed):
    response = requests.request(method, server.url + path, data=body, timeout=TIMEOUT)
    assert response.status_code == 405, response.text
    allow = {m.strip().upper() for m in response.headers.get("Allow", "").split(",") if m.strip()}
    assert allowed <= allow, "Allow: %r" % response.headers.get("Allow")
    assert method not in allow


def test_head_has_the_headers_of_get_and_no_body(server):
    got = get(server, "/app.py/")
    head = requests.head(server.url + "/app.py/", timeout=TIMEOUT)
    assert head.status_code == got.status_code == 200
    assert head.headers["Content-Type"] == got.headers["Content-Type"]
    for name in ("Content-Length", "ETag", "Content-Encoding"):
        if name in head.headers and name in got.headers:
            assert head.headers[name] == got.headers[name], name
    assert head.content == b""
    # The same, on the wire: a HEAD answer that carried a body would desync this connection.
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
    try:
        conn.request("HEAD", "/app.py/users/7")
        first = conn.getresponse()
        assert first.status == 200 and first.read() == b""
        conn.request("GET", "/app.py/users/7")
        second = conn.getresponse()
        assert second.status == 200
        assert json.loads(second.read()) == {"id": 7, "url": "/app.py/users/7"}
    finally:
        conn.close()


def test_urlencoded_post_keeps_utf8(server):
    name = "Zoë ✓ 日本"
    response = requests.post(server.url + "/app.py/form", data={"name": name}, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/html")
    assert ('<p id="greeting">Hello, %s!</p>' % name).encode("utf-8") in response.content


def test_multipart_upload_of_every_byte_value(server):
    data = bytes(range(256)) * 64
    response = requests.post(
        server.url + "/app.py/upload",
        files={"file": ("all-bytes.bin", data, "application/octet-stream")},
        timeout=TIMEOUT,
    )
    assert response.status_code == 200, response.text
    assert response.json() == {
        "filename": "all-bytes.bin",
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def test_png_is_byte_identical(server, checkout):
    response = get(server, "/app.py/logo.png")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "image/png"
    assert response.content == (checkout / "htdocs" / "logo.png").read_bytes()


def test_redirect_to_the_index(server):
    response = get(server, "/app.py/go")
    assert response.status_code == 302
    location = response.headers["Location"]
    assert location.endswith("/app.py/"), location
    # Absolute or not, it must lead back to this server (nginx's Debian fastcgi_params
    # send HTTP_HOST without the port: notes/servers.md §4).
    assert urljoin(server.url + "/app.py/go", location) == server.url + "/app.py/", location


def test_session_counter_survives_across_requests(server):
    client = requests.Session()
    counts = []
    for _ in range(3):
        response = client.get(server.url + "/app.py/counter", timeout=TIMEOUT)
        assert response.status_code == 200, response.text
        counts.append(response.json()["count"])
        if len(counts) == 1:
            cookies = set_cookies(response)
            assert cookies, "the first /counter response set no cookie"
            for name, _value, attrs in cookies:
                assert "httponly" in attrs, (name, attrs)
                assert attrs.get("path") == "/app.py", (name, attrs)
                assert attrs.get("samesite", "").lower() == "lax", (name, attrs)
                assert "secure" not in attrs, "Secure on a plain-HTTP request: %r" % (attrs,)
    assert counts == [1, 2, 3]
    # A client without the cookie starts over.
    assert requests.get(server.url + "/app.py/counter", timeout=TIMEOUT).json() == {"count": 1}


def test_about_names_the_gateway(server):
    response = get(server, "/app.py/about")
    assert response.status_code == 200, response.text
    about = response.json()
    assert about["mode"] == expected_mode(server)
    if about["mode"] == "cgi":
        # A plain CGI request pays only for what it uses (style.md rule 8).
        assert about["loaded"] == {"beaker": False, "flup": False}
    # Every variant runs Debian's Python (the venv's, or the one mod_python embeds).
    assert about["python"] == system_python_version()
    # PythonImport's preload survives cgihandler's per-request module purge; nothing else
    # claims to be preloaded. Several requests, so more than one Apache child answers.
    preloaded = server.name.endswith("preload")
    for _ in range(4):
        assert get(server, "/app.py/about").json()["preloaded"] is preloaded


def test_query_words_cannot_steer_the_gateway(server):
    # Apache passes the words of a query without "=" as argv (ISINDEX): /app.py?--mode+dev
    # runs "app.py --mode dev". It must still be served in the server's mode.
    for query in ("--mode+dev", "--mode+fcgi+--bind+127.0.0.1:1", "--help"):
        response = get(server, "/app.py/about?" + query)
        assert response.status_code == 200, (query, response.text)
        assert response.json()["mode"] == expected_mode(server), query


def test_no_tracebacks_in_the_server_logs(server):
    # Runs last for each variant: nothing above (404s, 405s included) may log a traceback.
    text = server.log_text(limit=200000)
    assert "Traceback" not in text, text[-6000:]


# ---------------------------------------------------------------------------------------
# Without a web server: the dev server and the mode flags


def _clean_env(**extra):
    """Return an environment without CGI variables or TINYWEB_* settings, plus ``extra``."""
    cgi = {"GATEWAY_INTERFACE", "REQUEST_METHOD", "SCRIPT_NAME", "PATH_INFO", "QUERY_STRING",
           "CONTENT_TYPE", "CONTENT_LENGTH", "SERVER_NAME", "SERVER_PORT", "SERVER_PROTOCOL"}
    env = {k: v for k, v in os.environ.items()
           if k not in cgi and not k.startswith(("TINYWEB_", "HTTP_"))}
    env.update(extra)
    return env


def _port_is_free(port):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Like the dev server (http.server sets allow_reuse_address): a TIME_WAIT left by
        # an earlier run does not make the port busy.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _start_dev(venv, checkout, tmp_path, args, port):
    """Run the checkout's htdocs/app.py (from the checkout, not a copy) as a dev server."""
    process = servers.Process(
        "dev server", [str(venv.python), str(checkout / "htdocs" / "app.py"), *args],
        log=tmp_path / "dev.log", cwd=tmp_path, env=_clean_env(),
    ).start()
    try:
        servers.wait_for_port(port, process, [process.log])
    except BaseException:
        process.stop()
        raise
    return process


def _check_dev(port, process):
    base = "http://127.0.0.1:%d" % port
    index = requests.get(base + "/", timeout=TIMEOUT)
    assert index.status_code == 200, index.text
    assert 'href="/users/7"' in index.text  # mounted at /: empty SCRIPT_NAME
    about = requests.get(base + "/about", timeout=TIMEOUT).json()
    assert about["mode"] == "dev"
    log = process.log.read_text(errors="replace")
    assert re.search(r"\bdev\b", log, re.IGNORECASE), "stderr does not mention dev mode: %r" % log


def test_dev_server_on_a_given_port(venv, checkout, tmp_path):
    port = servers.free_port()
    process = _start_dev(venv, checkout, tmp_path, ["--port", str(port)], port)
    try:
        _check_dev(port, process)
    finally:
        process.stop()


def test_dev_server_default_port_8000(venv, checkout, tmp_path):
    if not _port_is_free(8000):
        pytest.skip("127.0.0.1:8000 is in use")
    process = _start_dev(venv, checkout, tmp_path, [], 8000)
    try:
        _check_dev(8000, process)
    finally:
        process.stop()


@pytest.fixture
def site(venv, checkout):
    """A copy of the demo site in a tree of its own, run directly by the tests."""
    workdir = servers.new_workdir("direct")
    yield servers.make_site(workdir, checkout / "htdocs", venv.python, data_owner="root")
    if not os.environ.get("TINYWEB_TESTS_KEEP"):
        shutil.rmtree(workdir, ignore_errors=True)


def _request_env(**extra):
    request = dict(REQUEST_METHOD="GET", SCRIPT_NAME="/app.py", QUERY_STRING="",
                   SERVER_NAME="127.0.0.1", SERVER_PORT="80", SERVER_PROTOCOL="HTTP/1.1",
                   REMOTE_ADDR="127.0.0.1")
    request.update(extra)
    return _clean_env(**request)


def _run_app(venv, site, args, env, stdin=b""):
    return subprocess.run([str(venv.python), str(site.app), *args], input=stdin, env=env,
                          cwd="/", capture_output=True, timeout=SUBPROCESS_TIMEOUT)


def _parse_cgi(output):
    """Split CGI output into ({lower-case header: value}, body); fail if there is no header block."""
    for separator in (b"\r\n\r\n", b"\n\n"):
        head, found, body = output.partition(separator)
        if found:
            break
    else:
        raise AssertionError("no blank line after the CGI headers: %r" % output[:500])
    headers = {}
    for line in head.decode("latin-1").splitlines():
        name, colon, value = line.partition(":")
        assert colon, "not a CGI header line: %r" % line
        headers[name.strip().lower()] = value.strip()
    return headers, body


@pytest.mark.parametrize("how", ["env", "flag"])
def test_cgi_mode_forced_without_a_gateway_interface(venv, site, how):
    # No GATEWAY_INTERFACE: nothing to detect, so only TINYWEB_MODE or --mode makes it CGI.
    if how == "env":
        env, args = _request_env(PATH_INFO="/users/5", TINYWEB_MODE="cgi"), []
    else:
        env, args = _request_env(PATH_INFO="/users/5"), ["--mode", "cgi"]
    done = _run_app(venv, site, args, env)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    headers, body = _parse_cgi(done.stdout)
    assert headers.get("status", "200").startswith("200"), headers
    assert headers["content-type"].startswith("application/json")
    assert json.loads(body) == {"id": 5, "url": "/app.py/users/5"}


def test_cgi_request_with_isindex_argv_is_still_cgi(venv, site, tmp_path):
    # What Apache runs for GET /app.py/about?--mode+dev: argv must not be read.
    sock = tmp_path / "steered.sock"
    for args, query in ((["--mode", "dev"], "--mode+dev"),
                        (["--mode", "fcgi", "--bind", "unix:%s" % sock],
                         "--mode+fcgi+--bind+unix:%s" % sock)):
        env = _request_env(GATEWAY_INTERFACE="CGI/1.1", PATH_INFO="/about", QUERY_STRING=query)
        started = time.monotonic()
        done = _run_app(venv, site, args, env)
        assert done.returncode == 0, done.stderr.decode(errors="replace")
        headers, body = _parse_cgi(done.stdout)
        assert headers["content-type"].startswith("application/json"), headers
        assert json.loads(body)["mode"] == "cgi"
        assert not sock.exists()
        assert time.monotonic() - started < SUBPROCESS_TIMEOUT


@pytest.mark.parametrize("how", ["flags", "bind-only", "env", "flag-beats-env"])
def test_fcgi_mode_on_a_unix_socket(venv, site, tmp_path, how):
    sock = tmp_path / "app.sock"
    if how == "flags":
        args, env = ["--mode", "fcgi", "--bind", "unix:%s" % sock], _clean_env()
    elif how == "bind-only":  # --bind without --mode means fcgi
        args, env = ["--bind", "unix:%s" % sock], _clean_env()
    elif how == "env":
        args, env = [], _clean_env(TINYWEB_MODE="fcgi", TINYWEB_BIND="unix:%s" % sock)
    else:
        args = ["--mode", "fcgi", "--bind", "unix:%s" % sock]
        env = _clean_env(TINYWEB_MODE="dev", TINYWEB_BIND="unix:%s" % (tmp_path / "other.sock"))
    process = servers.start_fcgi_app(tmp_path, [str(venv.python), str(site.app), *args],
                                     str(sock), env=env, cwd=Path("/"))
    try:
        response = fcgi_client.fetch(str(sock), "/about")
        assert response.status == 200, (response.stdout, response.stderr)
        assert json.loads(response.body)["mode"] == "fcgi"
    finally:
        process.stop()


def _connect_as(venv, user, path):
    return subprocess.run(
        [str(venv.python), "-c",
         "import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])", str(path)],
        user=user, group=pwd.getpwnam(user).pw_gid, extra_groups=[], capture_output=True, text=True,
        timeout=SUBPROCESS_TIMEOUT, cwd="/",
    )


def test_fcgi_socket_is_open_to_the_server_group_only(venv, site):
    # Like PHP-FPM's listen.group/listen.mode: www-data may connect, nobody else.
    workdir = servers.new_workdir("sock")  # 0755, so www-data can reach the socket
    sock = workdir / "app.sock"
    argv = [str(venv.python), str(site.app), "--mode", "fcgi", "--bind", "unix:%s" % sock,
            "--socket-group", servers.SERVER_USER, "--socket-mode", "0660"]
    process = servers.start_fcgi_app(workdir, argv, str(sock), cwd=site.htdocs)
    try:
        st = os.stat(sock)
        assert stat.S_ISSOCK(st.st_mode)
        assert grp.getgrgid(st.st_gid).gr_name == servers.SERVER_USER
        assert stat.S_IMODE(st.st_mode) == 0o660, oct(st.st_mode)
        allowed = _connect_as(venv, servers.SERVER_USER, sock)
        assert allowed.returncode == 0, allowed.stderr
        denied = _connect_as(venv, "nobody", sock)
        assert denied.returncode != 0 and "Permission denied" in denied.stderr, denied.stderr
        response = fcgi_client.fetch(str(sock), "/about")
        assert response.status == 200 and json.loads(response.body)["mode"] == "fcgi"
    finally:
        process.stop()
        if not os.environ.get("TINYWEB_TESTS_KEEP"):
            shutil.rmtree(workdir, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# `tinyweb new`, then Apache pointed at the new app with no edits


def test_scaffolded_app_runs_under_apache_cgi(venv, make_server):
    tinyweb = venv.bin("tinyweb")
    assert tinyweb.exists(), "no tinyweb console script in %s" % venv.path
    workdir = servers.new_workdir("new")
    done = subprocess.run([str(tinyweb), "new", str(workdir / "site"), "--user", servers.SERVER_USER],
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, cwd="/")
    assert done.returncode == 0, done.stdout + done.stderr
    site = servers.Site(workdir / "site")

    app = site.app.read_text(encoding="utf-8")
    shebang = Path(app.splitlines()[0][2:].strip())
    assert app.startswith("#!") and shebang.parent == venv.bin("python").parent, app.splitlines()[0]
    assert os.access(site.app, os.X_OK) and site.app.stat().st_mode & 0o005 == 0o005
    assert "secret" in site.config.read_text()
    data = site.data.stat()
    assert pwd.getpwuid(data.st_uid).pw_name == servers.SERVER_USER
    assert data.st_mode & 0o777 == 0o700

    server = make_server(servers.start_apache, workdir, site.htdocs, mpm="event", handler="cgid",
                         name="tinyweb-new+cgid")
    index = get(server, "/app.py/")
    assert index.status_code == 200, index.text
    assert index.headers["Content-Type"].startswith("text/html")
    client = requests.Session()
    first = client.get(server.url + "/app.py/users/3", timeout=TIMEOUT)
    assert first.status_code == 200, first.text + server.log_text()
    assert first.json() == {"id": 3, "seen": 1}
    assert client.get(server.url + "/app.py/users/3", timeout=TIMEOUT).json() == {"id": 3, "seen": 2}
