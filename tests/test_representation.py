"""ETag, conditional GET, gzip and Vary on whole responses, checked in-process on raw bytes.

The app is called as a WSGI callable (wrapped in wsgiref's validator) and its body read as
the gateway would send it: WebTest would decode a gzip body and hide what went on the wire.
"""

import gzip
import hashlib
import io
import json
from wsgiref.validate import validator

import pytest
import webob
from webob import exc

from helpers import SECRET, clean_env  # noqa: F401  (clean_env is a fixture)
from tinyweb import App
from tinyweb import representation
from tinyweb.representation import MIN_GZIP_SIZE, accepts_gzip, compressible
from webob import Request

pytestmark = pytest.mark.usefixtures("clean_env")

PAGE = "<p>A paragraph long enough that a page of them is worth compressing.</p>\n" * 40
SMALL = "<p>short</p>"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8
DATE = "Thu, 15 Jan 2026 12:00:00 GMT"
EARLIER = "Wed, 14 Jan 2026 12:00:00 GMT"
GZIP = {"Accept-Encoding": "gzip"}


class Raw:
    """What a gateway would send: the status, the header list and the body bytes."""

    def __init__(self, status, headers, body, errors):
        self.status, self.headers, self.body, self.errors = status, headers, body, errors

    @property
    def code(self):
        return int(self.status[:3])

    def header(self, name):
        """Return the one value of ``name``, or None; fail if it is sent twice."""
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        assert len(values) <= 1, "%s sent %d times: %r" % (name, len(values), self.headers)
        return values[0] if values else None


def call(app, path, method="GET", headers=None):
    """Call ``app`` as a WSGI server does and return the Raw response."""
    environ = webob.Request.blank(path, method=method, headers=headers or {}).environ
    errors = environ["wsgi.errors"] = io.StringIO()
    got = []

    def start_response(status, headerlist, exc_info=None):
        got.append((status, headerlist))
        return lambda data: None

    body = validator(app)(environ, start_response)
    try:
        data = b"".join(body)
    finally:
        body.close()
    (status, headerlist), = got
    return Raw(status, headerlist, data, errors.getvalue())


def md5(body):
    return hashlib.md5(body).hexdigest()


@pytest.fixture
def app(tmp_path):
    app = App(__name__, secret=SECRET, data_dir=str(tmp_path / "data"))

    @app.get("/page")
    def page(request):
        return PAGE

    @app.get("/small")
    def small(request):
        return SMALL

    @app.get("/json")
    def as_json(request):
        return {"items": [{"id": n, "name": "item %d" % n} for n in range(60)]}

    @app.get("/problem")
    def problem(request):
        request.response.content_type = "application/problem+json"
        return json.dumps({"detail": "x" * 2000})

    @app.get("/svg")
    def svg(request):
        request.response.content_type = "image/svg+xml"
        return "<svg>%s</svg>" % ("<g/>" * 400)

    @app.get("/events")
    def events(request):
        request.response.content_type = "text/event-stream"
        return "data: x\n\n" * 200

    @app.get("/png")
    def png(request):
        request.response.content_type = "image/png"
        return PNG

    @app.get("/zip")
    def archive(request):
        request.response.content_type = "application/zip"
        return b"PK" + b"\0" * 2000

    @app.get("/stream")
    def stream(request):
        yield PAGE
        yield PAGE

    @app.get("/dated")
    def dated(request):
        request.response.last_modified = DATE
        return PAGE

    @app.get("/vary")
    def vary(request):
        request.response.vary = ["Cookie"]
        return PAGE

    @app.get("/encoded")
    def encoded(request):
        request.response.content_type = "text/html"
        request.response.headers["Content-Encoding"] = "gzip"
        return gzip.compress(PAGE.encode(), mtime=0)

    @app.get("/own-etag")
    def own_etag(request):
        request.response.etag = "v1"
        return PAGE

    @app.get("/weak-etag")
    def weak_etag(request):
        request.response.etag = ("v1", False)
        return PAGE

    @app.get("/no-gzip")
    def no_gzip(request):
        request.response.compress = False  # the opt-out representation.finish reads
        return PAGE

    @app.get("/missing")
    def missing(request):
        raise exc.HTTPNotFound()

    @app.get("/boom")
    def boom(request):
        raise RuntimeError("failed on purpose")

    @app.get("/go")
    def go(request):
        raise exc.HTTPFound(location="/page")

    @app.get("/created")
    def created(request):
        return PAGE, 201

    @app.get("/raised-ok")
    def raised_ok(request):
        raise exc.HTTPOk()

    return app


# --- the negotiation rules, alone --------------------------------------------------------


@pytest.mark.parametrize("header, expected", [
    ("gzip", True),
    ("GZIP", True),
    ("x-gzip", True),
    ("deflate, gzip", True),
    (" gzip ; q=0.5 ", True),
    ("gzip;q=0", False),
    ("gzip; q=0.0", False),
    ("gzip;Q=0", False),
    ("*", True),
    ("*;q=0", False),
    ("gzip;q=0, *", False),  # the explicit refusal beats the wildcard
    ("*;q=0, gzip;q=0.1", True),
    ("identity", False),
    ("br, gzip;q=0.5", True),
    ("br", False),
    ("", False),
    (None, False),
    (", ,", False),
    ("gzip;q=abc", False),
    ("gzip;q=", False),
    ("gzip;q=nan", False),
    ("gzip;level=9", True),  # an unknown parameter is not a q value
])
def test_accepts_gzip(header, expected):
    assert accepts_gzip(header) is expected


@pytest.mark.parametrize("content_type, expected", [
    ("text/html; charset=utf-8", True),
    ("TEXT/Plain", True),
    ("text/css", True),
    ("text/event-stream", False),
    ("text/event-stream; charset=utf-8", False),
    ("application/json", True),
    ("application/json; charset=utf-8", True),
    ("application/problem+json", True),
    ("application/javascript", True),
    ("application/xml", True),
    ("image/svg+xml", True),
    ("image/png", False),
    ("application/zip", False),
    ("application/octet-stream", False),
    ("", False),
    (None, False),
])
def test_compressible(content_type, expected):
    assert compressible(content_type) is expected


# --- ETag and conditional GET ------------------------------------------------------------


def test_a_whole_200_body_has_a_strong_etag_of_its_bytes(app):
    r = call(app, "/page")
    assert r.code == 200 and r.body == PAGE.encode()
    assert r.header("ETag") == '"%s"' % md5(r.body)
    assert r.header("Content-Encoding") is None


@pytest.mark.parametrize("path, code", [
    ("/stream", 200), ("/missing", 404), ("/boom", 500), ("/go", 302), ("/created", 201),
    ("/raised-ok", 200),  # webob.exc makes its body only when called: nothing to hash before
])
def test_no_etag_where_there_is_no_whole_200_body(app, path, code):
    r = call(app, path, headers=GZIP)
    assert r.code == code
    assert r.header("ETag") is None
    assert r.header("Content-Encoding") is None


def test_if_none_match_answers_304_without_a_body(app):
    etag = call(app, "/page").header("ETag")
    for sent in (etag, "W/" + etag, '"other", ' + etag):
        r = call(app, "/page", headers={"If-None-Match": sent})
        assert (r.code, r.body) == (304, b""), sent
        assert r.header("ETag") == etag
        assert r.header("Content-Length") is None and r.header("Content-Type") is None
    assert call(app, "/page", headers={"If-None-Match": '"other"'}).code == 200


def test_if_modified_since_answers_304_with_last_modified(app):
    r = call(app, "/dated")
    assert r.header("Last-Modified") == DATE
    assert (r.code, len(r.body)) == (200, len(PAGE))
    assert call(app, "/dated", headers={"If-Modified-Since": DATE}).code == 304
    assert call(app, "/dated", headers={"If-Modified-Since": EARLIER}).code == 200
    # RFC 9110 §13.2.2: If-None-Match, when sent, decides; If-Modified-Since is then ignored.
    both = call(app, "/dated", headers={"If-Modified-Since": DATE, "If-None-Match": '"other"'})
    assert both.code == 200
    # A page without Last-Modified never matches a date.
    assert call(app, "/page", headers={"If-Modified-Since": DATE}).code == 200


@pytest.mark.parametrize("headers", [{}, GZIP], ids=["identity", "gzip"])
@pytest.mark.parametrize("path", ["/page", "/json", "/small", "/png", "/stream"])
def test_head_sends_the_headers_of_get_and_no_body(app, path, headers):
    get, head = call(app, path, headers=headers), call(app, path, "HEAD", headers=headers)
    assert (head.status, head.headers, head.body) == (get.status, get.headers, b"")
    if path != "/stream":
        assert get.header("Content-Length") == str(len(get.body))


def test_head_answers_304_too(app):
    etag = call(app, "/page", headers=GZIP).header("ETag")
    r = call(app, "/page", "HEAD", headers={"If-None-Match": etag, **GZIP})
    assert (r.code, r.body) == (304, b"")


# --- gzip --------------------------------------------------------------------------------


@pytest.mark.parametrize("path, accept, zipped", [
    ("/page", "gzip", True),
    ("/page", "gzip, deflate, br", True),
    ("/json", "gzip", True),
    ("/problem", "gzip", True),
    ("/svg", "gzip", True),
    ("/page", None, False),
    ("/page", "gzip;q=0, identity", False),
    ("/page", "br", False),
    ("/small", "gzip", False),  # under MIN_GZIP_SIZE
    ("/png", "gzip", False),
    ("/zip", "gzip", False),
    ("/events", "gzip", False),
    ("/stream", "gzip", False),
    ("/no-gzip", "gzip", False),
])
def test_gzip_only_when_whole_big_compressible_and_accepted(app, path, accept, zipped):
    r = call(app, path, headers={"Accept-Encoding": accept} if accept else {})
    assert r.code == 200
    assert r.header("Content-Encoding") == ("gzip" if zipped else None)
    if zipped:
        assert r.body[:2] == b"\x1f\x8b"
        assert r.header("Content-Length") == str(len(r.body))


def test_the_gzip_threshold(app):
    assert len(SMALL) < MIN_GZIP_SIZE <= len(PAGE)
    assert call(app, "/small", headers=GZIP).header("Vary") is None


def test_gzip_body_decompresses_to_the_identity_body_under_its_own_etag(app):
    plain, zipped = call(app, "/page"), call(app, "/page", headers=GZIP)
    assert gzip.decompress(zipped.body) == plain.body
    assert len(zipped.body) < len(plain.body) // 4
    assert zipped.header("Content-Type") == plain.header("Content-Type")
    identity_tag, gzip_tag = plain.header("ETag"), zipped.header("ETag")
    assert identity_tag != gzip_tag and not gzip_tag.startswith("W/")
    # Each variant answers 304 to its own ETag, and not to the other's.
    assert call(app, "/page", headers={"If-None-Match": identity_tag}).code == 304
    assert call(app, "/page", headers={"If-None-Match": gzip_tag, **GZIP}).code == 304
    assert call(app, "/page", headers={"If-None-Match": identity_tag, **GZIP}).code == 200
    assert call(app, "/page", headers={"If-None-Match": gzip_tag}).code == 200
    not_modified = call(app, "/page", headers={"If-None-Match": gzip_tag, **GZIP})
    assert not_modified.header("ETag") == gzip_tag
    assert not_modified.header("Vary") == "Accept-Encoding"


def test_gzip_bytes_are_the_same_on_every_request(app):
    first, second = call(app, "/page", headers=GZIP), call(app, "/page", headers=GZIP)
    assert first.body == second.body
    assert first.header("ETag") == second.header("ETag")


# --- Vary --------------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, GZIP, {"Accept-Encoding": "gzip;q=0"}],
                         ids=["none", "gzip", "refused"])
def test_vary_on_compressible_big_bodies_whether_or_not_compressed(app, headers):
    assert call(app, "/page", headers=headers).header("Vary") == "Accept-Encoding"
    assert call(app, "/json", headers=headers).header("Vary") == "Accept-Encoding"


def test_vary_is_merged_with_the_handlers(app):
    for headers in ({}, GZIP):
        assert call(app, "/vary", headers=headers).header("Vary") == "Cookie, Accept-Encoding"


@pytest.mark.parametrize("path", ["/png", "/zip", "/small", "/stream", "/no-gzip", "/encoded"])
def test_no_vary_where_the_encoding_never_depends_on_the_client(app, path):
    assert call(app, path, headers=GZIP).header("Vary") is None


# --- what the handler chose ----------------------------------------------------------------


def test_an_encoded_body_is_left_alone(app):
    r = call(app, "/encoded", headers=GZIP)
    assert r.header("Content-Encoding") == "gzip"
    assert gzip.decompress(r.body) == PAGE.encode()  # compressed once, not twice
    assert r.header("ETag") == '"%s"' % md5(r.body)


def test_the_handlers_etag_is_kept(app):
    plain = call(app, "/own-etag")
    assert plain.header("ETag") == '"v1"'
    assert call(app, "/own-etag", headers={"If-None-Match": '"v1"'}).code == 304
    zipped = call(app, "/own-etag", headers=GZIP)
    assert zipped.header("ETag") == '"v1-gzip"'
    assert call(app, "/own-etag", headers={"If-None-Match": '"v1-gzip"', **GZIP}).code == 304


def test_a_weak_etag_stays_weak_on_the_gzip_variant(app):
    # A weak validator says "equivalent", not "byte for byte": gzip must not make it strong.
    assert call(app, "/weak-etag").header("ETag") == 'W/"v1"'
    zipped = call(app, "/weak-etag", headers=GZIP)
    assert zipped.header("ETag") == 'W/"v1-gzip"'
    assert call(app, "/weak-etag", headers={"If-None-Match": 'W/"v1-gzip"', **GZIP}).code == 304


def test_a_handler_opts_out_of_gzip_with_compress_false(app):
    r = call(app, "/no-gzip", headers=GZIP)
    assert r.body == PAGE.encode()
    assert r.header("Content-Encoding") is None and r.header("Vary") is None
    assert r.header("ETag") == '"%s"' % md5(r.body)  # conditional GET still works


def test_a_streamed_body_is_sent_as_it_comes(app):
    r = call(app, "/stream", headers=GZIP)
    assert r.body == PAGE.encode() * 2
    assert r.header("Content-Length") is None
    assert r.header("X-Accel-Buffering") == "no"
    assert call(app, "/page").header("X-Accel-Buffering") is None


# --- the cache of compressed bodies ----------------------------------------------------------


def _page(text):
    app = App(__name__, secret="s" * 32)

    @app.get("/")
    def index(request):
        return text

    @app.get("/own-etag")
    def own_etag(request):
        request.response.etag = "v1"
        return text

    return app


def _gz(app, path="/"):
    return Request.blank(path, headers={"Accept-Encoding": "gzip"}).get_response(app)


def test_a_repeated_page_is_compressed_once(monkeypatch):
    representation._cache.clear()
    representation._cached[0] = 0
    calls = []
    real = representation.zlib.compressobj
    monkeypatch.setattr(representation.zlib, "compressobj", lambda *a: calls.append(a) or real(*a))
    app = _page("<p>cached</p>" * 200)
    first, second = _gz(app), _gz(app)
    assert first.body == second.body and gzip.decompress(first.body) == b"<p>cached</p>" * 200
    assert first.headers["ETag"] == second.headers["ETag"]
    assert len(calls) == 1


def test_a_handler_etag_never_keys_the_cache(monkeypatch):
    # A handler's own ETag need not change with the body: two bodies, one ETag, two results.
    representation._cache.clear()
    representation._cached[0] = 0
    one, two = _gz(_page("a" * 3000), "/own-etag"), _gz(_page("b" * 3000), "/own-etag")
    assert gzip.decompress(one.body) == b"a" * 3000 and gzip.decompress(two.body) == b"b" * 3000
    assert representation._cache == {}


def test_the_cache_is_bounded(monkeypatch):
    representation._cache.clear()
    representation._cached[0] = 0
    monkeypatch.setattr(representation, "CACHE_BYTES", 20000)
    for n in range(40):
        _gz(_page("".join("<p>%d %d</p>" % (n, i) for i in range(300))))
    assert 10000 < sum(len(v) for v in representation._cache.values()) <= 20000
    assert representation._cached[0] == sum(len(v) for v in representation._cache.values())
