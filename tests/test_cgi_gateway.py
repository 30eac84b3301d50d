"""The CGI gateway: an app file run as a subprocess with a CGI environment and stdin, as a
web server runs it (RFC 3875), checked byte for byte on stdout."""
import re

import hashlib
import hmac
import json
import os
import subprocess
import sys

import pytest

from helpers import CHECKOUT, SECRET, cgi_environ, make_site, run_cgi, split_cgi

DEMO = CHECKOUT / "htdocs" / "app.py"

SITE_APP = """
import os
import sys

import tinyweb

app = tinyweb.App(__name__)


@app.get("/print")
def printing(request):
    print("debug output from a handler")
    sys.stdout.write("more debug output\\n")
    return "clean"


@app.get("/proxy")
def proxy(request):
    return {"environ": request.environ.get("HTTP_PROXY"), "os": os.environ.get("HTTP_PROXY")}


@app.get("/path/{rest:path}")
def path(request, rest):
    return {"rest": rest, "mode": request.environ["tinyweb.mode"]}


@app.route("/ignore", methods=["POST"])
def ignore(request):
    return "ignored the body"


@app.post("/echo")
def echo(request):
    return request.body


@app.get("/boom")
def boom(request):
    raise RuntimeError("boom under cgi")


@app.get("/stdlib")
def stdlib(request):
    # Imported by WebOb or Beaker, but not used by a hello or a session read and write.
    deferred = ["urllib.request", "email.utils", "calendar", "cgi", "tempfile", "mimetypes", "json",
                "html", "importlib.metadata", "inspect", "traceback", "socket", "hashlib", "hmac",
                "queue"]
    result = {}
    if "session" in request.GET:
        request.session["seen"] = result["seen"] = request.session.get("seen", 0) + 1
    # Stand-ins must be gone once WebOb and Beaker are imported: only real modules left.
    result["stand_ins"] = sorted(name for name, module in list(sys.modules.items())
                                 if type(module).__name__ == "_StandIn")
    result["loaded"] = sorted(name for name in deferred if name in sys.modules)
    return result


@app.get("/stdlib/works")
def stdlib_works(request):
    # What WebOb and Beaker bound from the deferred modules still works when called.
    import datetime
    import webob.compat
    import webob.datetime_utils
    import webob.request
    import beaker.cache
    import beaker.crypto
    import beaker.util
    import webob.cookies
    import webob.response
    import webob.util

    with webob.compat.url_open("file://" + os.path.abspath(__file__)) as f:
        url_open = b"app.run()" in f.read()
    when = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    return {
        "url_open": url_open,
        "date": webob.datetime_utils.serialize_date(when),
        "parsed": webob.datetime_utils.parse_date("Fri, 02 Jan 2026 03:04:05 GMT") == when,
        "parse_header": list(webob.compat.parse_header("text/plain; charset=latin-1")),
        "json": webob.request.json.dumps([1, "é"]),
        "escape": webob.compat.escape("<&>"),
        "tempfile": webob.request.tempfile.TemporaryFile is not None,
        "signature": list(beaker.util.func_signature(lambda a, b=1: None).parameters),
        "entry_points": beaker.cache.importlib.metadata.entry_points(group="tinyweb-none") == (),
        "md5": webob.response.md5(b"abc").hexdigest(),
        "signed": webob.cookies.SignedSerializer("k", "s").loads(
            webob.cookies.SignedSerializer("k", "s").dumps({"a": 1})),
        "differ": [webob.util.strings_differ("ab", "ab"), webob.util.strings_differ("ab", "ac")],
        "beaker_hmac": beaker.crypto.hmac.new(b"k", b"m", beaker.crypto.sha1).hexdigest(),
        "queue": webob.compat.Queue().empty(),
    }


@app.route("/upload", methods=["POST"])
def upload(request):
    import hashlib

    upload = request.POST["file"]
    return {"note": request.POST["note"], "name": upload.filename,
            "sha256": hashlib.sha256(upload.file.read()).hexdigest(),
            "field_storage": [k.__module__ + "." + k.__name__ for k in type(upload).__mro__]}


@app.get("/slow-stream")
def slow_stream(request):
    import time

    yield "first\\n"
    time.sleep(1)
    yield "second\\n"


@app.get("/dated")
def dated(request):
    import datetime

    request.response.last_modified = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    return "dated"


app.run()
"""


@pytest.fixture
def demo_env(tmp_path):
    """The environment for the demo app, with its config in tmp_path (not the checkout's)."""
    ini = tmp_path / "demo.ini"
    ini.write_text("[tinyweb]\nsecret = %s\ndata_dir = %s\n" % (SECRET, tmp_path / "data"))

    def env(path="/", **extra):
        return cgi_environ(path, TINYWEB_CONFIG=str(ini), **extra)

    return env


@pytest.fixture
def site(tmp_path):
    """An app laid out as `tinyweb new` makes it, with tinyweb importable as if installed."""
    return make_site(tmp_path, SITE_APP, "max_body = 100000\n")


def site_env(path="/", **extra):
    return cgi_environ(path, PYTHONPATH=str(CHECKOUT), **extra)


def run_site(site, environ, body=b"", **kwargs):
    # A CGI server runs the script in its own directory; never in the checkout.
    return run_cgi(site / "htdocs" / "app.py", environ, body, **kwargs)


def md5(body):
    return hashlib.md5(body).hexdigest().encode()


def test_get_exact_bytes(demo_env):
    out = run_cgi(DEMO, demo_env("/users/7"))
    assert out.returncode == 0
    assert out.stdout == (b"Status: 200 OK\r\n"
                          b"Content-Type: application/json\r\n"
                          b"Content-Length: 32\r\n"
                          b'ETag: "%s"\r\n'
                          b"\r\n"
                          b'{"id":7,"url":"/app.py/users/7"}' % md5(b'{"id":7,"url":"/app.py/users/7"}'))
    assert out.stderr == b""


def test_not_found_and_head(demo_env):
    status, headers, body = split_cgi(run_cgi(DEMO, demo_env("/nowhere")).stdout)
    assert status == "404 Not Found"
    status, headers, body = split_cgi(run_cgi(DEMO, demo_env("/users/7", REQUEST_METHOD="HEAD")).stdout)
    assert status == "200 OK"
    assert ("Content-Length", "32") in headers
    assert body == b""


def test_post_body_from_stdin(demo_env):
    body = b"name=Ann+%3Cb%3E"
    out = run_cgi(DEMO, demo_env("/form", REQUEST_METHOD="POST", CONTENT_LENGTH=str(len(body)),
                                 CONTENT_TYPE="application/x-www-form-urlencoded"), body)
    status, headers, page = split_cgi(out.stdout)
    assert status == "200 OK"
    assert b'<p id="greeting">Hello, Ann &lt;b&gt;!</p>' in page
    assert ("Content-Length", str(len(page))) in headers


def test_chunked_post_without_content_length_is_read_to_eof(demo_env):
    # A chunked upload reaches a CGI script with no CONTENT_LENGTH, its body readable to EOF.
    environ = demo_env("/form", REQUEST_METHOD="POST", CONTENT_TYPE="application/x-www-form-urlencoded")
    out = run_cgi(DEMO, environ, b"name=Chunky")
    status, _, page = split_cgi(out.stdout)
    assert status == "200 OK"
    assert b'<p id="greeting">Hello, Chunky!</p>' in page


def test_chunked_post_over_max_body_is_413(site):
    out = run_site(site, site_env("/echo", REQUEST_METHOD="POST"), b"x" * 100001)
    status, _, body = split_cgi(out.stdout)
    assert status == "413 Request Entity Too Large"
    assert b"xxxx" not in body
    out = run_site(site, site_env("/echo", REQUEST_METHOD="POST"), b"x" * 100000)
    assert split_cgi(out.stdout)[::2] == ("200 OK", b"x" * 100000)


def test_redirect_location_is_relative(demo_env):
    out = run_cgi(DEMO, demo_env("/go", HTTP_HOST="evil.example"))
    status, headers, _ = split_cgi(out.stdout)
    assert status == "302 Found"
    assert ("Location", "/app.py/") in headers


def test_argv_is_ignored_under_cgi(demo_env):
    # Apache passes "/app.py?--mode+dev" as argv; a dev server here would never answer.
    out = run_cgi(DEMO, demo_env("/about", QUERY_STRING="--mode+dev"), argv=["--mode", "dev"])
    status, _, body = split_cgi(out.stdout)
    assert status == "200 OK"
    about = json.loads(body)
    assert about["mode"] == "cgi"
    assert about["loaded"] == {"beaker": False, "flup": False}


def test_session_counter_over_cgi(demo_env, tmp_path):
    out = run_cgi(DEMO, demo_env("/counter"))
    status, headers, body = split_cgi(out.stdout)
    assert body == b'{"count":1}'
    cookie = dict(headers)["Set-Cookie"]
    assert "Path=/app.py" in cookie and "HttpOnly" in cookie
    out = run_cgi(DEMO, demo_env("/counter", HTTP_COOKIE=cookie.split(";")[0]))
    assert split_cgi(out.stdout)[2] == b'{"count":2}'
    assert oct((tmp_path / "data").stat().st_mode & 0o777) == oct(0o700)


def test_print_in_a_handler_goes_to_stderr(site):
    out = run_site(site, site_env("/print"))
    assert out.stdout == (b"Status: 200 OK\r\n"
                          b"Content-Type: text/html; charset=UTF-8\r\n"
                          b"Content-Length: 5\r\n"
                          b'ETag: "%s"\r\n'
                          b"\r\n"
                          b"clean" % md5(b"clean"))
    assert b"debug output from a handler\nmore debug output\n" in out.stderr


def test_http_proxy_is_removed(site):
    out = run_site(site, site_env("/proxy", HTTP_PROXY="http://127.0.0.1:1/"))
    assert json.loads(split_cgi(out.stdout)[2]) == {"environ": None, "os": None}


def test_non_ascii_path(site):
    # The server hands PATH_INFO over as UTF-8 bytes; the app must see "zoë", not mojibake.
    out = run_site(site, site_env("/path/zoë/ß.txt"))
    assert json.loads(split_cgi(out.stdout)[2]) == {"rest": "zoë/ß.txt", "mode": "cgi"}


def test_error_is_500_with_traceback_on_stderr(site):
    out = run_site(site, site_env("/boom", QUERY_STRING="a=1"))
    status, _, body = split_cgi(out.stdout)
    assert status == "500 Internal Server Error"
    assert b"Traceback" not in body and b"boom under cgi" not in body
    assert re.search(rb"tinyweb\[[0-9a-f]{12}\]: 500 on GET /app.py/boom\?a=1\nTraceback", out.stderr)
    assert b"RuntimeError: boom under cgi" in out.stderr


def _pipe_with(body):
    """A pipe holding ``body`` and closed for writing, as a web server's stdin to the script."""
    read_end, write_end = os.pipe()
    assert len(body) <= 65536, "must fit in the pipe buffer"
    os.write(write_end, body)
    os.close(write_end)
    return read_end


def _left_in(read_end):
    os.set_blocking(read_end, False)
    try:
        return os.read(read_end, 1 << 20)
    except BlockingIOError:
        return b""
    finally:
        os.close(read_end)


@pytest.mark.parametrize("path, length, status", [
    ("/ignore", "60000", "200 OK"),     # the handler never reads the body
    ("/nowhere", "60000", "404 Not Found"),
])
def test_unread_body_is_drained(site, path, length, status):
    # Under mod_cgid a script that exits with its body unread loses its response.
    read_end = _pipe_with(b"b" * int(length))
    out = run_site(site, site_env(path, REQUEST_METHOD="POST", CONTENT_LENGTH=length), stdin=read_end)
    assert split_cgi(out.stdout)[0] == status
    assert _left_in(read_end) == b""


def test_oversized_body_is_413_and_drained(site):
    read_end = _pipe_with(b"b" * 60000)
    (site / "tinyweb.ini").write_text("[tinyweb]\nsecret = %s\nmax_body = 1000\n" % SECRET)
    out = run_site(site, site_env("/echo", REQUEST_METHOD="POST", CONTENT_LENGTH="60000"), stdin=read_end)
    assert split_cgi(out.stdout)[0] == "413 Request Entity Too Large"
    assert _left_in(read_end) == b""


def test_body_shorter_than_content_length_does_not_hang(site):
    # The client hung up: EOF comes before CONTENT_LENGTH bytes; the drain stops at EOF.
    read_end = _pipe_with(b"b" * 10)
    out = run_site(site, site_env("/echo", REQUEST_METHOD="POST", CONTENT_LENGTH="5000"), stdin=read_end,
                   timeout=8)
    os.close(read_end)
    assert split_cgi(out.stdout)[0] == "400 Bad Request"


def test_cgi_hello_loads_none_of_the_deferred_stdlib_modules(site):
    # The one-shot CGI process defers stdlib modules WebOb and Beaker bind at import but a
    # request does not use (runners/oneshot.py): none is loaded by a hello, no stand-in is
    # left in sys.modules once the imports are done.
    out = run_site(site, site_env("/stdlib"))
    assert json.loads(split_cgi(out.stdout)[2]) == {"loaded": [], "stand_ins": []}
    assert out.stderr == b""


def test_cgi_session_loads_none_of_beakers_deferred_modules(site):
    # Sessions are stored as JSON and their cookie is signed with HMAC: those are the
    # deferred modules a session loads.
    out = run_site(site, site_env("/stdlib", QUERY_STRING="session"))
    status, headers, body = split_cgi(out.stdout)
    assert status == "200 OK"
    assert json.loads(body) == {"seen": 1, "loaded": ["hashlib", "hmac", "json"],
                                "stand_ins": []}
    cookie = dict(headers)["Set-Cookie"].split(";")[0]
    # A second request reads the stored session and writes it again.
    out = run_site(site, site_env("/stdlib", QUERY_STRING="session", HTTP_COOKIE=cookie))
    assert json.loads(split_cgi(out.stdout)[2]) == {"seen": 2, "loaded": ["hashlib", "hmac", "json"],
                                                        "stand_ins": []}
    assert out.stderr == b""


def test_deferred_stdlib_functions_still_work_under_cgi(site):
    out = run_site(site, site_env("/stdlib/works"))
    assert json.loads(split_cgi(out.stdout)[2]) == {
        "url_open": True,
        "date": "Fri, 02 Jan 2026 03:04:05 GMT",
        "parsed": True,
        "parse_header": ["text/plain", {"charset": "latin-1"}],
        "json": '[1, "\\u00e9"]',
        "escape": "&lt;&amp;&gt;",
        "tempfile": True,
        "signature": ["a", "b"],
        "entry_points": True,
        "md5": hashlib.md5(b"abc").hexdigest(),
        "signed": {"a": 1},
        "differ": [False, True],
        "beaker_hmac": hmac.new(b"k", b"m", hashlib.sha1).hexdigest(),
        "queue": True,
    }
    assert out.stderr == b""


def test_multipart_upload_under_cgi(site):
    # WebOb subclasses cgi.FieldStorage at import; in the one-shot process its base is put
    # in place when the first form is parsed.
    content = bytes(range(256)) * 3
    boundary = "----tinyweb7d8a"
    body = (
        "--%s\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nzoë\r\n"
        "--%s\r\nContent-Disposition: form-data; name=\"file\"; filename=\"all.bin\"\r\n"
        "Content-Type: application/octet-stream\r\n\r\n" % (boundary, boundary)
    ).encode("utf-8") + content + ("\r\n--%s--\r\n" % boundary).encode()
    out = run_site(site, site_env("/upload", REQUEST_METHOD="POST", CONTENT_LENGTH=str(len(body)),
                                  CONTENT_TYPE="multipart/form-data; boundary=%s" % boundary), body)
    status, _, page = split_cgi(out.stdout)
    assert status == "200 OK"
    result = json.loads(page)
    assert result["note"] == "zoë"
    assert result["name"] == "all.bin"
    assert result["sha256"] == hashlib.sha256(content).hexdigest()
    assert "cgi.FieldStorage" in result["field_storage"]


def test_last_modified_and_if_modified_since_under_cgi(site):
    status, headers, body = split_cgi(run_site(site, site_env("/dated")).stdout)
    assert (status, body) == ("200 OK", b"dated")
    assert ("Last-Modified", "Fri, 02 Jan 2026 03:04:05 GMT") in headers
    out = run_site(site, site_env("/dated", HTTP_IF_MODIFIED_SINCE="Fri, 02 Jan 2026 03:04:05 GMT"))
    status, headers, body = split_cgi(out.stdout)
    assert (status, body) == ("304 Not Modified", b"")
    out = run_site(site, site_env("/dated", HTTP_IF_MODIFIED_SINCE="Thu, 01 Jan 2026 00:00:00 GMT"))
    assert split_cgi(out.stdout)[::2] == ("200 OK", b"dated")


def test_a_client_gone_mid_stream_is_a_quiet_exit(site):
    # The web server stops reading (its client went) while the handler streams: the next
    # write fails, and Python's exit would flush the rest again ("Exception ignored ...
    # BrokenPipeError" in the error log, exit status 120).
    proc = subprocess.Popen([sys.executable, str(site / "htdocs" / "app.py")],
                            env=site_env("/slow-stream"), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.read(1) == b"S"  # "Status: 200 OK": the response has begun
    proc.stdout.close()
    _, err = proc.communicate(timeout=20)
    assert (proc.returncode, err) == (0, b"")
