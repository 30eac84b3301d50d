"""The App in-process: routing, what handlers return, errors, redirects, hosts and body limits."""

import io
import re
import json
from urllib.parse import urljoin
from wsgiref.validate import validator

import pytest
import webob
from webob import exc

from helpers import SECRET, Client, clean_env  # noqa: F401  (clean_env is a fixture)
from tinyweb import App

pytestmark = pytest.mark.usefixtures("clean_env")

BOOM = "the handler failed on purpose"


def make_app(tmp_path, **settings):
    """Return an app with one route for each kind of handler return value."""
    settings.setdefault("secret", SECRET)
    settings.setdefault("data_dir", str(tmp_path / "data"))
    app = App(__name__, **settings)

    @app.get("/", name="index")
    def index(request):
        return "<h1>Hello, wörld</h1>"

    @app.get("/bytes")
    def raw(request):
        return b"\x00\x01\xff"

    @app.get("/dict")
    def as_dict(request):
        return {"name": "Zoë", "n": [1, 2]}

    @app.get("/list")
    def as_list(request):
        return [1, "two", None]

    @app.get("/plain")
    def plain(request):
        request.response.content_type = "text/plain"
        request.response.set_cookie("flavour", "plain")
        return "héllo"

    @app.get("/created")
    def created(request):
        return {"id": 3}, 201

    @app.get("/tuple3")
    def tuple3(request):
        return "teapot", "418 I'm a teapot", {"X-Kind": "tea", "Content-Type": "text/plain"}

    @app.get("/tuple3list")
    def tuple3list(request):
        return b"ok", 202, [("X-One", "1"), ("X-Two", "2")]

    @app.get("/response")
    def own_response(request):
        return webob.Response(body=b"mine", content_type="text/csv", charset=None, status=203)

    @app.get("/stream")
    def stream(request):
        progress = request.environ["test.progress"]
        progress.append("started")
        yield "<p>please wait</p>"
        progress.append("worked")
        yield b"<p>done</p>"

    @app.route("/users/{id:int}", methods=["GET", "POST"], name="user")
    def user(request, id):
        return {"id": id, "url": request.url_for("user", id=id)}

    @app.post("/users")
    def add_user(request):
        return "added"

    @app.get("/files/{rest:path}", name="file")
    def files(request, rest):
        return {"rest": rest, "url": request.url_for("file", rest=rest, v=2)}

    @app.get("/link")
    def link(request):
        return request.url_for("index")

    @app.get("/none")
    def returns_none(request):
        return None

    @app.get("/int")
    def returns_int(request):
        return 42

    @app.get("/tuple1")
    def returns_tuple1(request):
        return ("x",)

    @app.get("/badchunk")
    def bad_chunk(request):
        yield {"not": "bytes"}

    @app.get("/boom")
    def boom(request):
        raise RuntimeError(BOOM)

    @app.get("/notfound")
    def not_found(request):
        raise exc.HTTPNotFound("no such thing")

    @app.get("/go")
    def go(request):
        raise exc.HTTPFound(location=request.GET.get("to", request.url_for("index")))

    @app.get("/see-other")
    def see_other(request):
        request.response.status = 303
        request.response.location = "/done"
        return ""

    @app.get("/header")
    def header(request):
        value = request.GET["value"]
        name = request.GET.get("name", "X-Test")
        request.response.headers[name] = value
        return "should not be sent"

    @app.get("/tuple-header")
    def tuple_header(request):
        return "x", 200, {"X-Evil": "a\r\nSet-Cookie: evil=1"}

    @app.get("/redirect-header")
    def redirect_header(request):
        raise exc.HTTPFound(location="/x", headers={"X-Evil": "a\nb"})

    @app.post("/echo")
    def echo(request):
        return request.body

    @app.post("/form")
    def form(request):
        return dict(request.POST)

    @app.post("/json")
    def as_json(request):
        return request.json

    return app


@pytest.fixture
def app(tmp_path):
    return make_app(tmp_path)


# -- handler return values ---------------------------------------------------------------


def test_str_is_utf8_html(client):
    res = client.get("/")
    assert res.status == "200 OK"
    assert res.headers["Content-Type"].lower() == "text/html; charset=utf-8"
    assert res.body == "<h1>Hello, wörld</h1>".encode("utf-8")
    assert res.headers["Content-Length"] == str(len(res.body))


def test_bytes_are_octet_stream(client):
    res = client.get("/bytes")
    assert res.headers["Content-Type"] == "application/octet-stream"
    assert res.body == b"\x00\x01\xff"


def test_dict_and_list_are_json(client):
    res = client.get("/dict")
    assert res.headers["Content-Type"] == "application/json"
    assert json.loads(res.body) == {"name": "Zoë", "n": [1, 2]}
    assert client.get("/list").body == b'[1,"two",null]'


def test_handler_sets_type_and_cookie_on_request_response(client):
    res = client.get("/plain")
    assert res.headers["Content-Type"].lower() == "text/plain; charset=utf-8"
    assert res.body == "héllo".encode("utf-8")
    assert res.headers["Set-Cookie"].startswith("flavour=plain;")


def test_body_status_tuple(client):
    res = client.get("/created", status=201)
    assert res.status == "201 Created"
    assert res.body == b'{"id":3}'


def test_body_status_headers_tuple(client):
    res = client.get("/tuple3", status=418)
    assert res.status == "418 I'm a teapot"
    assert res.headers["X-Kind"] == "tea"
    assert res.headers["Content-Type"].lower() == "text/plain; charset=utf-8"
    assert res.body == b"teapot"
    res = client.get("/tuple3list", status=202)
    assert (res.headers["X-One"], res.headers["X-Two"]) == ("1", "2")
    assert res.body == b"ok"


def test_returned_response_is_sent_as_is(client):
    res = client.get("/response", status=203)
    assert res.headers["Content-Type"] == "text/csv"
    assert res.body == b"mine"


def test_generator_is_streamed_chunk_by_chunk(app):
    environ = webob.Request.blank("/stream").environ
    progress = environ["test.progress"] = []
    started = []
    body = validator(app)(environ, lambda status, headers, exc_info=None: started.append((status, headers)))
    try:
        assert started[0][0] == "200 OK"
        assert dict(started[0][1])["Content-Type"].lower() == "text/html; charset=utf-8"
        assert "Content-Length" not in dict(started[0][1])
        chunks = iter(body)
        assert next(chunks) == b"<p>please wait</p>"
        assert progress == ["started"]  # the first chunk went out before the work went on
        assert next(chunks) == b"<p>done</p>"
        assert progress == ["started", "worked"]
        assert list(chunks) == []
    finally:
        body.close()


@pytest.mark.parametrize("path, what", [
    ("/none", "returned None"),
    ("/int", "returned 42"),
    ("/tuple1", "returned a tuple of 1"),
])
def test_bad_return_value_is_a_type_error_naming_the_handler(client, path, what):
    res = client.get(path, status=500, expect_errors=True)
    assert b"Traceback" not in res.body
    handler = "test_app.make_app.<locals>.returns_" + path.strip("/")
    assert "TypeError: handler %s %s" % (handler, what) in res.errors


def test_bad_chunk_is_a_type_error_naming_the_handler(app):
    environ = webob.Request.blank("/badchunk").environ
    body = validator(app)(environ, lambda status, headers, exc_info=None: None)
    with pytest.raises(TypeError, match=r"bad_chunk yielded a dict"):
        list(body)
    body.close()


# -- routing -----------------------------------------------------------------------------


def test_path_parameters_are_converted(client):
    assert client.get("/users/42").json == {"id": 42, "url": "/users/42"}
    assert client.get("/files/a/b c.txt").json == {"rest": "a/b c.txt", "url": "/files/a/b%20c.txt?v=2"}


def test_unknown_path_is_404(client):
    res = client.get("/nowhere", status=404)
    assert res.status == "404 Not Found"
    assert client.get("/users/abc", status=404).status_int == 404


def test_wrong_method_is_405_with_allow(client):
    res = client.delete("/users/1", status=405)
    assert res.headers["Allow"] == "GET, HEAD, POST"
    res = client.put("/", status=405)
    assert res.headers["Allow"] == "GET, HEAD"
    assert client.post("/users/1").json["id"] == 1


def test_head_has_get_headers_and_no_body(client):
    get = client.get("/dict")
    head = client.head("/dict")
    assert head.status == "200 OK"
    assert head.body == b""
    assert head.headers["Content-Type"] == get.headers["Content-Type"]
    assert head.headers["Content-Length"] == get.headers["Content-Length"] == str(len(get.body))
    assert client.head("/nowhere", status=404).body == b""


def test_url_for_uses_script_name(app):
    mounted = Client(app, SCRIPT_NAME="/cgi-bin/app.py")
    assert mounted.get("/cgi-bin/app.py/users/7").json["url"] == "/cgi-bin/app.py/users/7"
    assert mounted.get("/cgi-bin/app.py/link").body == b"/cgi-bin/app.py/"
    at_root = Client(app, SCRIPT_NAME="")
    assert at_root.get("/users/7").json["url"] == "/users/7"
    assert at_root.get("/link").body == b"/"


def test_mode_is_wsgi_under_a_plain_wsgi_server(tmp_path):
    app = App(__name__, secret=SECRET)

    @app.get("/")
    def mode(request):
        return request.environ["tinyweb.mode"]

    assert Client(app).get("/").body == b"wsgi"
    assert Client(app, **{"tinyweb.mode": "fcgi"}).get("/").body == b"fcgi"


def test_path_not_utf8_is_400(client):
    res = client.get("/%ff", status=400, expect_errors=True)
    assert re.match(r"tinyweb\[[0-9a-f]{12}\]: 400 on GET /%FF: The path is not valid UTF-8\.\n$", res.errors)


def test_query_not_utf8_is_400(client):
    res = client.get("/go?to=%ff%fe", status=400, expect_errors=True)
    assert "400 on GET /go?to=%ff%fe: The query string is malformed or not UTF-8." in res.errors


# -- errors ------------------------------------------------------------------------------


def test_exception_is_500_without_traceback_and_logged_with_request_line(app):
    res = Client(app, SCRIPT_NAME="/app.py").get("/app.py/boom?x=1", status=500, expect_errors=True)
    assert res.headers["Content-Type"].lower() == "text/html; charset=utf-8"
    assert b"Internal Server Error" in res.body
    assert b"Traceback" not in res.body
    assert BOOM.encode() not in res.body
    assert re.match(r"tinyweb\[([0-9a-f]{12})\]: 500 on GET /app.py/boom\?x=1\nTraceback \(most recent call last\):", res.errors)
    # The page names the id of the log entry, so a visitor's report can be matched to it.
    request_id = re.match(r"tinyweb\[([0-9a-f]{12})\]", res.errors).group(1)
    assert ("error %s" % request_id).encode() in res.body
    assert "RuntimeError: %s" % BOOM in res.errors


def test_debug_shows_the_traceback(tmp_path):
    res = Client(make_app(tmp_path, debug=True)).get("/boom", status=500, expect_errors=True)
    assert b"Traceback (most recent call last)" in res.body
    assert ("RuntimeError: %s" % BOOM).encode() in res.body
    assert "RuntimeError: %s" % BOOM in res.errors


def test_debug_page_escapes_html(tmp_path):
    app = App(__name__, debug=True)

    @app.get("/")
    def fail(request):
        raise ValueError("<script>alert(1)</script>")

    res = Client(app).get("/", status=500, expect_errors=True)
    assert b"<script>" not in res.body
    assert b"&lt;script&gt;alert(1)&lt;/script&gt;" in res.body


def test_http_exception_from_a_handler_is_its_response(client):
    res = client.get("/notfound", status=404)
    assert b"no such thing" in res.body
    assert res.errors == ""


# -- headers and redirects ---------------------------------------------------------------


@pytest.mark.parametrize("name, value", [
    ("X-Test", "a\r\nSet-Cookie: evil=1"),
    ("X-Test", "a\nSet-Cookie: evil=1"),
    ("X-Test", "a\rb"),
    ("X-Test", "a\x00b"),
    ("X-Test", "a\x0bb"),
    ("X Test", "ok"),
    ("X-Test:", "ok"),
    ("Set-Cookie\r\nX", "ok"),
    ("X-Test", "price: 5 €"),
])
def test_header_injection_is_500_and_never_emitted(client, name, value):
    res = client.get("/header", params={"name": name, "value": value}, status=500, expect_errors=True)
    assert "X-Test" not in res.headers and "Set-Cookie" not in res.headers
    assert b"should not be sent" not in res.body
    assert "HeaderError" in res.errors


def test_header_injection_through_a_tuple_or_an_http_exception(client):
    res = client.get("/tuple-header", status=500, expect_errors=True)
    assert "Set-Cookie" not in res.headers and "X-Evil" not in res.headers
    res = client.get("/redirect-header", status=500, expect_errors=True)
    assert "Location" not in res.headers and "X-Evil" not in res.headers


def test_tab_in_a_header_value_is_allowed(app):
    # RFC 9110 §5.5 allows HTAB in a field value; wsgiref's validator does not, so no wrapper.
    environ = webob.Request.blank("/header?value=a%09b").environ
    started = []
    app(environ, lambda status, headers, exc_info=None: started.append((status, headers)))
    assert started[0][0] == "200 OK"
    assert ("X-Test", "a\tb") in started[0][1]


@pytest.mark.parametrize("host", ["localhost", "localhost:80", "example.com:8080", "[::1]:9000"])
def test_same_origin_redirect_has_a_relative_location(app, host):
    client = Client(app, HTTP_HOST=host, SCRIPT_NAME="/app.py")
    assert client.get("/app.py/go", status=302).headers["Location"] == "/app.py/"
    assert client.get("/app.py/go?to=/a/b%3Fc%3D1", status=302).headers["Location"] == "/a/b?c=1"
    assert client.get("/app.py/see-other", status=303).headers["Location"] == "/done"


def test_redirect_without_host_header_is_relative(app):
    client = Client(app, SERVER_NAME="example.org", SERVER_PORT="8000")
    res = client.get("/go", extra_environ={"HTTP_HOST": ""}, status=302)
    assert res.headers["Location"] == "/"


@pytest.mark.parametrize("to, location", [
    ("https://other.example/x", "https://other.example/x"),
    ("https://localhost/x", "https://localhost/x"),  # another scheme is another origin
])
def test_redirect_elsewhere_stays_absolute(client, to, location):
    assert client.get("/go", params={"to": to}, status=302).headers["Location"] == location


@pytest.mark.parametrize("to", [
    "//evil.example/x",
    "/a/..//evil.example/x",
    ".//evil.example/x",
    "http://localhost//evil.example/x",
    "/\\evil.example/x",
    "/\t/evil.example/x",
])
def test_redirect_never_becomes_protocol_relative(client, to):
    # A browser follows "//host" and "/\host" to another host: such a path stays absolute.
    location = client.get("/go", params={"to": to}, status=302).headers["Location"]
    assert not location.startswith(("//", "/\\", "\\")), location
    assert location.startswith(("/", "http://localhost/"))
    # Whatever the browser makes of it, it stays on this host.
    assert urljoin("http://localhost/go", location.replace("\\", "/")).startswith("http://localhost/")


# -- allowed hosts -----------------------------------------------------------------------


@pytest.mark.parametrize("host, status", [
    ("example.com", 200),
    ("EXAMPLE.com:8080", 200),
    ("www.example.com", 200),
    ("evil.example", 400),
    ("a@example.com", 400),
    ("example.com.evil.example", 400),
    ("example.com\r\nX-Injected: 1", 400),
])
def test_allowed_hosts(tmp_path, host, status):
    client = Client(make_app(tmp_path, allowed_hosts="example.com, www.example.com"))
    res = client.get("/", extra_environ={"HTTP_HOST": host}, status=status, expect_errors=True)
    if status == 400:
        assert "400 on GET /: This host name is not served here." in res.errors
    if status == 400:
        assert b"Hello" not in res.body
        assert "X-Injected" not in res.headers


def test_allowed_hosts_falls_back_to_server_name(tmp_path):
    client = Client(make_app(tmp_path, allowed_hosts=["example.com"]), SERVER_NAME="example.com")
    assert client.get("/", extra_environ={"HTTP_HOST": ""}).status_int == 200


def test_no_allowed_hosts_serves_any_host(client):
    assert client.get("/", extra_environ={"HTTP_HOST": "anything.example"}).status_int == 200


# -- request bodies ----------------------------------------------------------------------
# WebTest sets CONTENT_LENGTH from the body it sends, so requests whose Content-Length
# disagrees with the body are built with Request.blank and run through the validator.


class _Unreadable(io.RawIOBase):
    """A wsgi.input that fails the test if anything reads it."""

    def readable(self):
        return True

    def readinto(self, buffer):
        raise AssertionError("the body was read")


def send(app, path, body=b"", length=None, content_type=None, terminated=False, stream=None,
         validate=True):
    """POST ``body`` (or ``stream``) with CONTENT_LENGTH ``length`` (None: no header).

    Return (status, headers, body bytes, what the app wrote to wsgi.errors).
    """
    environ = webob.Request.blank(path, method="POST").environ
    environ.pop("CONTENT_LENGTH", None)
    if length is not None:
        environ["CONTENT_LENGTH"] = length
    if content_type:
        environ["CONTENT_TYPE"] = content_type
    environ["wsgi.input"] = stream if stream is not None else io.BytesIO(body)
    if terminated:
        environ["wsgi.input_terminated"] = True
    errors = environ["wsgi.errors"] = io.StringIO()
    started = []
    wsgi_app = validator(app) if validate else app
    result = wsgi_app(environ, lambda status, headers, exc_info=None: started.append((status, headers)))
    try:
        data = b"".join(result)
    finally:
        if hasattr(result, "close"):
            result.close()
    return started[0][0], dict(started[0][1]), data, errors.getvalue()


def test_post_body_and_form(client):
    assert client.post("/echo", b"\x00abc\xff").body == b"\x00abc\xff"
    assert client.post("/form", {"name": "Zoë"}).json == {"name": "Zoë"}


def test_content_length_over_max_body_is_413_without_reading(tmp_path):
    app = make_app(tmp_path, max_body=100)
    status, _, body, errors = send(app, "/echo", length="101", stream=_Unreadable())
    assert status == "413 Request Entity Too Large"
    assert "413 on POST /echo: The request body is larger than this app accepts." in errors
    assert send(app, "/echo", b"x" * 100, length="100")[::2] == ("200 OK", b"x" * 100)


def test_content_length_of_a_terabyte_is_413(app):
    status, _, _, _ = send(app, "/echo", length=str(10 ** 12), stream=_Unreadable())
    assert status == "413 Request Entity Too Large"


@pytest.mark.parametrize("length", ["abc", "-5", "1e3", " 12", "0x10", "\xb2", "\u0661\u0662"])
def test_non_numeric_content_length_is_400(app, length):
    # wsgiref's validator itself refuses such an environ, so the app is called bare.
    status, _, body, errors = send(app, "/echo", length=length, stream=_Unreadable(), validate=False)
    assert status == "400 Bad Request"
    assert b"Traceback" not in body and "Traceback" not in errors


def test_unsized_body_is_read_to_eof_up_to_max_body(tmp_path):
    app = make_app(tmp_path, max_body=1000)
    assert send(app, "/echo", b"y" * 1000, terminated=True)[::2] == ("200 OK", b"y" * 1000)


def test_unsized_body_over_max_body_is_413(tmp_path):
    status, _, body, errors = send(make_app(tmp_path, max_body=1000), "/echo", b"y" * 1001, terminated=True)
    assert status == "413 Request Entity Too Large"
    assert b"yyyy" not in body
    assert "413 on POST" in errors


def test_unsized_form_over_max_body_is_413(tmp_path):
    status, _, _, _ = send(make_app(tmp_path, max_body=50), "/form", b"name=" + b"z" * 100, terminated=True,
                           content_type="application/x-www-form-urlencoded")
    assert status == "413 Request Entity Too Large"


def test_unsized_body_without_input_terminated_is_empty(app):
    # PEP 3333: without CONTENT_LENGTH (and no wsgi.input_terminated) there is no body.
    assert send(app, "/echo", stream=_Unreadable())[::2] == ("200 OK", b"")


@pytest.mark.parametrize("path, content_type", [
    ("/echo", None),
    ("/json", "application/json"),
    ("/form", "application/x-www-form-urlencoded"),
])
def test_body_shorter_than_content_length_is_400(app, path, content_type):
    # The client announced 100 bytes and hung up after 10.
    status, _, body, errors = send(app, path, b"a=12345678", length="100", content_type=content_type)
    assert status == "400 Bad Request"
    assert "Traceback" not in errors


def test_malformed_json_body_is_400(app):
    status, _, _, _ = send(app, "/json", b'{"a": ', length="6", content_type="application/json")
    assert status == "400 Bad Request"
    status, _, body, _ = send(app, "/json", b'{"a": 1}', length="8", content_type="application/json")
    assert (status, body) == ("200 OK", b'{"a":1}')


def test_bad_form_charset_is_400(app):
    status, _, _, _ = send(app, "/form", b"a=1", length="3",
                           content_type="application/x-www-form-urlencoded; charset=bogus-xx")
    assert status == "400 Bad Request"


def test_multipart_without_boundary_is_400(app):
    body = b"--x\r\nContent-Disposition: form-data; name=a\r\n\r\n1\r\n--x--\r\n"
    status, _, _, _ = send(app, "/form", body, length=str(len(body)), content_type="multipart/form-data")
    assert status == "400 Bad Request"
    status, _, data, _ = send(app, "/form", body, length=str(len(body)),
                              content_type="multipart/form-data; boundary=x")
    assert (status, data) == ("200 OK", b'{"a":"1"}')
