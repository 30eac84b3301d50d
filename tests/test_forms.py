"""Form bodies and query strings that would make the parser work too hard or misread them
(notes/bad-inputs.md §3.1): refused before WebOb parses them, in-process and under CGI."""

import io
import json
import re
import time

import pytest
import webob

from helpers import (CHECKOUT, SECRET, cgi_environ, clean_env, make_site, run_wsgi,  # noqa: F401  (a fixture)
                     run_cgi, split_cgi)
from tinyweb import App
from tinyweb.forms import MAX_FIELDS, MAX_LINES, MAX_PART_HEADER_LINES, MAX_PARTS, MAX_SPOOLED_PARTS

pytestmark = pytest.mark.usefixtures("clean_env")

BOUNDARY = "----tinywebForm7d8a0c"
MULTIPART = "multipart/form-data; boundary=" + BOUNDARY
URLENCODED = "application/x-www-form-urlencoded"

# WebOb's plain-text error page: the status, its explanation, then the detail tinyweb gives.
EXPLANATION = {
    400: "The server could not comply with the request since it is either malformed or otherwise incorrect.",
    413: "The body of your request was too large for this server.",
    414: "The request URI was too long for this server.",
}
STATUS = {400: "400 Bad Request", 413: "413 Request Entity Too Large", 414: "414 Request-URI Too Long"}

TOO_MANY_PARTS = "The form has more than %d parts." % MAX_PARTS
TOO_MANY_SPOOLED = "The form has more than %d parts over 1000 bytes." % MAX_SPOOLED_PARTS
TOO_MANY_FIELDS = "The form has more than %d fields." % MAX_FIELDS
TOO_MANY_QUERY_FIELDS = "The query string has more than %d fields." % MAX_FIELDS
TOO_MANY_LINES = "The form has more than %d lines." % MAX_LINES
TOO_MANY_HEADERS = "A part of the form has more than %d header lines." % MAX_PART_HEADER_LINES
UNENDED_HEADERS = "A part of the form has no blank line after its headers."
NESTED = "A part of the form is typed multipart or urlencoded; such parts are not accepted."
NO_BOUNDARY = "The multipart form has no boundary."
BAD_BOUNDARY = "The multipart boundary must be 1 to 70 printable ASCII characters."
NOT_UTF8 = "The form is not valid UTF-8."
NOT_UTF8_FORM = "Forms are accepted in UTF-8 only."
QUERY_NOT_UTF8 = "The query string is malformed or not UTF-8."
BODY_CUT = "The request body ended before its Content-Length."
TOO_LARGE = "The request body is larger than this app accepts."


def page(status, message):
    """Return the body a client gets for an HTTP error with ``message``."""
    return ("%s\n\n%s\n\n %s  " % (STATUS[status], EXPLANATION[status], message)).encode()


def summary(fields):
    """Return a form's fields as JSON can carry them: a file as its name, size and a sample."""
    out = []
    for name, value in fields.items():
        if isinstance(value, str):
            out.append([name, value])
        else:
            out.append([name, file_info(value.filename, value.file.read())])
    return out


def file_info(filename, content):
    return {"filename": filename, "size": len(content), "head": content[:8].hex()}


def make_app(tmp_path, **settings):
    app = App(__name__, secret=SECRET, data_dir=str(tmp_path / "data"), **settings)

    @app.route("/form", methods=["POST", "PUT"])
    def form(request):
        return {"fields": summary(request.POST)}

    @app.get("/query")
    def query(request):
        return {"fields": summary(request.GET)}

    return app


@pytest.fixture
def app(tmp_path):
    return make_app(tmp_path)


def field(name, value):
    """A text field: its header lines and its content."""
    content = value.encode("utf-8") if isinstance(value, str) else value
    return ['Content-Disposition: form-data; name="%s"' % name], content


def upload(name, filename, content, content_type="application/octet-stream"):
    return ['Content-Disposition: form-data; name="%s"; filename="%s"' % (name, filename),
            "Content-Type: " + content_type], content


def multipart(parts, boundary=BOUNDARY):
    """Return a multipart/form-data body as a browser sends it (RFC 7578)."""
    out = io.BytesIO()
    for headers, content in parts:
        out.write(b"--%s\r\n%s\r\n\r\n" % (boundary.encode(), "\r\n".join(headers).encode("utf-8")))
        out.write(content)
        out.write(b"\r\n")
    out.write(b"--%s--\r\n" % boundary.encode())
    return out.getvalue()


def post(client, body, content_type=MULTIPART, path="/form", status=200, method="POST"):
    """Send ``body`` as it is: WebOb spools one over 10 KiB to a file, as from a real server."""
    # Not content_type=: TestApp would parse a multipart body and encode it again itself.
    send = getattr(client, method.lower())
    return send(path, body, extra_environ={"CONTENT_TYPE": content_type}, status=status,
                expect_errors=status != 200)


def assert_refused(res, status, message, method="POST", path="/form"):
    """The client sees the status and message, no traceback; the log has one line for it."""
    assert res.status == STATUS[status]
    assert res.body == page(status, message)
    assert b"Traceback" not in res.body
    request_id = re.match(r"tinyweb\[[0-9a-f]{12}\]: ", res.errors)
    assert request_id, res.errors[:300]
    assert res.errors[request_id.end():] == "%d on %s %s: %s\n" % (status, method, path, message)


class _Unreadable(io.RawIOBase):
    """A wsgi.input that fails the test if anything reads it."""

    def readable(self):
        return True

    def readinto(self, buffer):
        raise AssertionError("the body was read")


def call(app, body=b"", content_type=MULTIPART, length=None, stream=None, path="/form"):
    """POST ``body`` or ``stream`` with any CONTENT_LENGTH; return (status, body, log)."""
    environ = webob.Request.blank(path, method="POST").environ
    environ["CONTENT_TYPE"] = content_type
    environ["CONTENT_LENGTH"] = str(len(body) if length is None else length)
    environ["wsgi.input"] = stream if stream is not None else io.BytesIO(body)
    environ["wsgi.errors"] = io.StringIO()
    return run_wsgi(app, environ)


def _size(i, every):
    # cgi.FieldStorage spools a part over 1000 bytes to a temporary file of its own.
    return 1100 if i % every == 0 else 10


def _content(i, every):
    return bytes([i % 256]) * _size(i, every)


def files(count, every=1):
    """``count`` file parts, every ``every``-th one of 1100 bytes (a temporary file in cgi)."""
    return [upload("f%d" % i, "f%d.bin" % i, _content(i, every)) for i in range(count)]


def file_summary(count, every=1):
    return [["f%d" % i, file_info("f%d.bin" % i, _content(i, every))] for i in range(count)]


@pytest.fixture
def temp_files(monkeypatch):
    """Count the temporary files cgi.FieldStorage opens, one per part over 1000 bytes."""
    from webob.compat import cgi_FieldStorage

    opened = []
    real = cgi_FieldStorage.make_file

    def counting(self):
        opened.append(self.name)
        return real(self)

    monkeypatch.setattr(cgi_FieldStorage, "make_file", counting)
    return opened


# -- row 1: the boundary ------------------------------------------------------------------


def test_multipart_without_boundary_is_400(client):
    body = multipart([field("a", "1")])
    assert_refused(post(client, body, "multipart/form-data", status=400), 400, NO_BOUNDARY)
    assert_refused(post(client, body, "multipart/form-data; boundary=", status=400), 400, NO_BOUNDARY)


@pytest.mark.parametrize("boundary", ["b" * 71, '"ends with a space "', "b\xf6undary"])
def test_boundary_over_70_characters_or_not_printable_ascii_is_400(client, boundary):
    body = multipart([field("a", "1")], boundary=boundary.strip('"'))
    res = post(client, body, "multipart/form-data; boundary=" + boundary, status=400)
    assert_refused(res, 400, BAD_BOUNDARY)


def test_boundary_of_70_characters_is_accepted(client):
    boundary = "'()+_,-./:=? " * 5 + "abcdz"
    assert len(boundary) == 70
    body = multipart([field("a", "1"), field("b", "zoë")], boundary=boundary)
    res = post(client, body, 'multipart/form-data; boundary="%s"' % boundary)
    assert res.json == {"fields": [["a", "1"], ["b", "zoë"]]}


# -- row 3: parts, and the temporary file cgi opens for each ------------------------------


def test_2000_file_parts_are_413_before_any_temporary_file_is_opened(client, temp_files):
    body = multipart(files(2000))
    assert len(body) < 10 * 1024 * 1024  # under max_body: only the part limits stop it
    assert_refused(post(client, body, status=413), 413, TOO_MANY_SPOOLED)
    assert temp_files == []
    # Small parts, 20 of them spooled: the limit on parts stops these.
    assert_refused(post(client, multipart(files(2000, every=100)), status=413), 413, TOO_MANY_PARTS)
    assert temp_files == []


def test_1000_file_parts_are_parsed(client, temp_files):
    # One in ten spooled: 1000 descriptors would be most of a default RLIMIT_NOFILE of 1024.
    res = post(client, multipart(files(MAX_PARTS, every=10)))
    assert res.json == {"fields": file_summary(MAX_PARTS, every=10)}
    assert len(temp_files) == MAX_PARTS // 10  # the spy sees what the test above says did not happen


def test_more_than_100_parts_over_1000_bytes_are_413_before_any_temporary_file(client, temp_files):
    # Each would be an open temporary file until the request ends (Django's limit is 100 too).
    body = multipart(files(MAX_SPOOLED_PARTS + 1))
    assert_refused(post(client, body, status=413), 413, TOO_MANY_SPOOLED)
    assert temp_files == []
    res = post(client, multipart(files(MAX_SPOOLED_PARTS)))
    assert res.json == {"fields": file_summary(MAX_SPOOLED_PARTS)}
    assert len(temp_files) == MAX_SPOOLED_PARTS


def test_lines_that_start_with_the_boundary_count_towards_the_limit(client):
    # A content line that starts with the boundary but is not a delimiter is content to cgi,
    # as to RFC 2046; it is counted, so that walking them stays bounded.
    stray = b"--" + BOUNDARY.encode() + b"x"
    res = post(client, multipart([upload("f", "f.txt", b"before\r\n" + stray + b"\r\nafter", "text/plain")]))
    assert res.json["fields"][0][1]["size"] == len(b"before\r\n" + stray + b"\r\nafter")
    body = multipart([upload("f", "f.txt", b"\r\n".join([stray] * (MAX_PARTS + 1)), "text/plain")])
    assert_refused(post(client, body, status=413), 413, TOO_MANY_PARTS)


# -- row 4: header lines in one part ------------------------------------------------------


def test_part_with_300k_header_lines_is_400_at_once(client):
    headers, content = field("a", "1")
    body = multipart([(headers + ["X-Filler: %d" % i for i in range(300000)], content)])
    started = time.monotonic()
    res = post(client, body, status=400)
    # cgi's email parser takes seconds over as many lines (notes/dependencies.md §1.2).
    assert time.monotonic() - started < 2
    assert_refused(res, 400, TOO_MANY_HEADERS)


def test_folded_header_lines_count(client):
    headers, content = field("a", "1")
    body = multipart([(headers + ["X-Folded: start"] + [" more"] * (MAX_PART_HEADER_LINES - 1), content)])
    assert_refused(post(client, body, status=400), 400, TOO_MANY_HEADERS)


def test_part_with_100_header_lines_is_parsed(client):
    headers, content = field("a", "zoë")
    headers += ["X-Filler-%d: %s" % (i, "v" * 50) for i in range(MAX_PART_HEADER_LINES - 2)] + [" folded"]
    assert len(headers) == MAX_PART_HEADER_LINES
    res = post(client, multipart([(headers, content), field("b", "2")]))
    assert res.json == {"fields": [["a", "zoë"], ["b", "2"]]}


def test_headers_that_run_into_the_next_part_are_400(client):
    # cgi reads header lines up to a blank line, across delimiters: 20 such parts of 99
    # lines would be one block of 2000 lines to its email parser.
    part = b"--%s\r\n" % BOUNDARY.encode() + b"X-Filler: 1\r\n" * 99
    body = part * 20 + b"\r\nvalue\r\n--%s--\r\n" % BOUNDARY.encode()
    assert_refused(post(client, body, status=400), 400, UNENDED_HEADERS)


# -- row 5: fields -------------------------------------------------------------------------


def test_20k_multipart_fields_are_413(client):
    body = multipart([field("f%d" % i, "1") for i in range(20000)])
    assert_refused(post(client, body, status=413), 413, TOO_MANY_PARTS)


def test_1000_multipart_fields_are_parsed_and_1001_are_413(client):
    res = post(client, multipart([field("f%d" % i, str(i)) for i in range(MAX_PARTS)]))
    assert res.json == {"fields": [["f%d" % i, str(i)] for i in range(MAX_PARTS)]}
    res = post(client, multipart([field("f%d" % i, str(i)) for i in range(MAX_PARTS + 1)]), status=413)
    assert_refused(res, 413, TOO_MANY_PARTS)


def test_200k_urlencoded_fields_are_413(client):
    body = "&".join("f%d=1" % i for i in range(200000)).encode()
    assert_refused(post(client, body, URLENCODED, status=413), 413, TOO_MANY_FIELDS)


def test_1000_urlencoded_fields_are_parsed_and_1001_are_413(client):
    res = post(client, "&".join("f%d=%d" % (i, i) for i in range(MAX_FIELDS)).encode(), URLENCODED)
    assert res.json == {"fields": [["f%d" % i, str(i)] for i in range(MAX_FIELDS)]}
    body = "&".join("f%d=%d" % (i, i) for i in range(MAX_FIELDS + 1)).encode()
    assert_refused(post(client, body, URLENCODED, status=413), 413, TOO_MANY_FIELDS)


def test_query_string_with_200k_fields_is_414(client):
    query = "&".join("f%d=1" % i for i in range(200000))
    res = client.get("/query?" + query, status=414, expect_errors=True)
    # The log line keeps the first 2000 characters of the request line and counts the rest.
    line = "/query?" + query
    logged = "%s... (%d characters)" % (("GET " + line)[:2000][len("GET "):], len("GET " + line))
    assert_refused(res, 414, TOO_MANY_QUERY_FIELDS, "GET", logged)
    assert len(res.errors) < 2200


@pytest.mark.parametrize("separator", ["&", ";"])
def test_query_string_with_1000_fields_is_parsed_and_1001_is_414(client, separator):
    query = separator.join("f%d=%d" % (i, i) for i in range(MAX_FIELDS))
    assert client.get("/query?" + query).json == {"fields": [["f%d" % i, str(i)] for i in range(MAX_FIELDS)]}
    query += separator + "one=more"
    res = client.get("/query?" + query, status=414, expect_errors=True)
    # The log line keeps the first 2000 characters of the request line and counts the rest.
    line = "/query?" + query
    logged = "%s... (%d characters)" % (("GET " + line)[:2000][len("GET "):], len("GET " + line))
    assert_refused(res, 414, TOO_MANY_QUERY_FIELDS, "GET", logged)
    assert len(res.errors) < 2200


# -- row 6: a large part with no CRLF -----------------------------------------------------


def test_20_mb_part_without_crlf_is_413_by_max_body(client):
    body = multipart([upload("f", "big.bin", b"\n" + b"a" * (20 * 1024 * 1024))])
    assert_refused(post(client, body, status=413), 413, TOO_LARGE)


def test_part_of_2m_bare_newlines_under_max_body_is_413_unparsed(client, temp_files):
    # cgi.FieldStorage reads a line at a time, ~0.5 us each: 10 MB of newlines is 5 s of CPU.
    body = multipart([upload("f", "lines.txt", b"\n" * (2 * MAX_LINES)), field("note", "ok")])
    assert_refused(post(client, body, status=413), 413, TOO_MANY_LINES)
    assert temp_files == []  # refused before cgi spooled the part


def test_form_of_1m_lines_is_parsed(client):
    content = b"\n" * (MAX_LINES - 10)  # the delimiters and headers are lines too
    res = post(client, multipart([upload("f", "lines.txt", content), field("note", "ok")]))
    assert res.json == {"fields": [["f", file_info("lines.txt", content)], ["note", "ok"]]}
    over = content + b"\n" * 10
    res = post(client, multipart([upload("f", "lines.txt", over), field("note", "ok")]), status=413)
    assert_refused(res, 413, TOO_MANY_LINES)


def test_9_mb_part_without_crlf_under_max_body_is_parsed(client):
    content = b"\n" + b"a" * (9 * 1024 * 1024)
    res = post(client, multipart([upload("f", "big.bin", content), field("note", "ok")]))
    assert res.json == {"fields": [["f", file_info("big.bin", content)], ["note", "ok"]]}


# -- rows 8, 9, 12, 13: escapes, encodings, charsets --------------------------------------


def test_invalid_percent_escapes_in_the_query_are_kept_literally(client):
    assert client.get("/query?a=%zz&b=%").json == {"fields": [["a", "%zz"], ["b", "%"]]}


def test_query_not_utf8_is_400(client):
    assert_refused(client.get("/query?a=%ff%fe", status=400, expect_errors=True), 400, QUERY_NOT_UTF8,
                   "GET", "/query?a=%ff%fe")


@pytest.mark.parametrize("body, content_type", [
    (b"a=%ff", URLENCODED),
    (b"a=1&b=caf%e9", URLENCODED),
    (b"a=\xff", URLENCODED),
    (b"%c3=1", URLENCODED),
    (multipart([field("a", b"caf\xe9")]), MULTIPART),
])
def test_form_not_utf8_is_400(client, body, content_type):
    assert_refused(post(client, body, content_type, status=400), 400, NOT_UTF8)


@pytest.mark.parametrize("body, content_type", [
    (b"name=Zo%C3%AB&r=%EF%BF%BD&plus=a+b&raw=caf\xc3\xa9", URLENCODED),
    (multipart([field("name", "Zoë"), field("r", "\ufffd"), field("plus", "a+b"), field("raw", "café")]),
     MULTIPART),
])
def test_form_in_utf8_is_parsed_replacement_character_included(client, body, content_type):
    plus = "a b" if content_type == URLENCODED else "a+b"
    assert post(client, body, content_type).json == {
        "fields": [["name", "Zoë"], ["r", "\ufffd"], ["plus", plus], ["raw", "café"]]}


def test_file_bytes_need_not_be_utf8(client):
    content = bytes(range(256))
    res = post(client, multipart([upload("f", "all.bin", content), field("note", "ok")]))
    assert res.json == {"fields": [["f", file_info("all.bin", content)], ["note", "ok"]]}


@pytest.mark.parametrize("charset", ["bogus-xx", "utf-16", "latin-1"])
@pytest.mark.parametrize("content_type", [URLENCODED, MULTIPART])
def test_form_in_another_charset_is_400(client, content_type, charset):
    body = b"a=1" if content_type == URLENCODED else multipart([field("a", "1")])
    res = post(client, body, "%s; charset=%s" % (content_type, charset), status=400)
    assert_refused(res, 400, NOT_UTF8_FORM)


@pytest.mark.parametrize("charset", ["utf-8", "UTF8", '"UTF-8"'])
def test_form_labelled_utf8_is_parsed(client, charset):
    res = post(client, b"a=%C3%A9", "%s; charset=%s" % (URLENCODED, charset))
    assert res.json == {"fields": [["a", "é"]]}


# -- rows 17 and 20: the body's length ----------------------------------------------------


@pytest.mark.parametrize("content_type", [URLENCODED, MULTIPART])
def test_body_shorter_than_content_length_is_400(app, content_type):
    body = b"a=1" if content_type == URLENCODED else multipart([field("a", "1")])
    status, page_body, log = call(app, body, content_type, length=len(body) + 100)
    assert (status, page_body) == ("400 Bad Request", page(400, BODY_CUT))
    assert re.fullmatch(r"tinyweb\[[0-9a-f]{12}\]: 400 on POST /form: %s\n" % re.escape(BODY_CUT), log)


def test_content_length_of_a_terabyte_is_413_without_reading(app):
    status, body, log = call(app, content_type=MULTIPART, length=10 ** 12, stream=_Unreadable())
    assert (status, body) == ("413 Request Entity Too Large", page(413, TOO_LARGE))
    assert "413 on POST /form: " + TOO_LARGE in log


# -- parts cgi would parse as forms of their own ------------------------------------------


@pytest.mark.parametrize("part_type", [
    "multipart/mixed; boundary=inner",
    "Multipart/Mixed; boundary=inner",
    "application/x-www-form-urlencoded",
])
def test_part_typed_as_a_form_is_400(client, part_type):
    # cgi parses a multipart/* part as nested parts (more files, past the count here) and
    # reads the rest of the body as fields of an urlencoded one, with no field limit.
    inner = b"--inner\r\nContent-Disposition: file; filename=\"x.bin\"\r\n\r\nxx\r\n--inner--"
    headers = ['Content-Disposition: form-data; name="files"', "Content-Type: " + part_type]
    assert_refused(post(client, multipart([(headers, inner)]), status=400), 400, NESTED)
    # A folded header still names the type.
    headers = ['Content-Disposition: form-data; name="files"', "Content-Type:", " " + part_type]
    assert_refused(post(client, multipart([(headers, inner)]), status=400), 400, NESTED)


# -- what real clients send ----------------------------------------------------------------


def test_forms_from_webtest_and_urllib3_are_parsed(client):
    res = client.post("/form", {"note": "zoë"}, upload_files=[("f", "a.txt", b"hello\n")])
    assert res.json == {"fields": [["note", "zoë"], ["f", file_info("a.txt", b"hello\n")]]}
    urllib3 = pytest.importorskip("urllib3")
    body, content_type = urllib3.encode_multipart_formdata(
        [("note", "zoë"), ("f", ("b.bin", bytes(range(200)), "application/octet-stream"))])
    assert post(client, body, content_type).json == {
        "fields": [["note", "zoë"], ["f", file_info("b.bin", bytes(range(200)))]]}


def test_a_put_form_is_checked_too(client):
    body = multipart([field("f%d" % i, "1") for i in range(MAX_PARTS + 1)])
    res = post(client, body, status=413, method="PUT")
    assert_refused(res, 413, TOO_MANY_PARTS, "PUT")


# -- under CGI -----------------------------------------------------------------------------

FORMS_APP = """
import os
import resource

import tinyweb

if os.environ.get("TEST_NOFILE"):
    # Fewer descriptors than 2000 spooled parts take: parsed, they would run the script out
    # of them (EMFILE) and it would die with no response at all.
    limit = int(os.environ["TEST_NOFILE"])
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

app = tinyweb.App(__name__)


@app.post("/form")
def form(request):
    return {"names": list(request.POST.keys()),
            "sizes": sorted({len(value.file.read()) for value in request.POST.values()})}


app.run()
"""


@pytest.fixture
def forms_site(tmp_path):
    """An app laid out as `tinyweb new` makes it, run as a CGI script from its htdocs/."""
    return make_site(tmp_path, FORMS_APP)


def run_form(site, body, **extra):
    environ = cgi_environ("/form", method="POST", PYTHONPATH=str(CHECKOUT), CONTENT_TYPE=MULTIPART,
                          CONTENT_LENGTH=str(len(body)), **extra)
    return run_cgi(site / "htdocs" / "app.py", environ, body)


def test_cgi_2000_file_parts_are_413_with_few_descriptors_left(forms_site):
    out = run_form(forms_site, multipart(files(2000)), TEST_NOFILE="64")
    status, headers, body = split_cgi(out.stdout)
    assert (status, body) == ("413 Request Entity Too Large", page(413, TOO_MANY_SPOOLED))
    line = rb"tinyweb\[[0-9a-f]{12}\]: 413 on POST /app.py/form: %s\n" % re.escape(TOO_MANY_SPOOLED.encode())
    assert re.fullmatch(line, out.stderr), out.stderr[-2000:]


def test_cgi_1000_file_parts_are_parsed(forms_site):
    out = run_form(forms_site, multipart(files(MAX_PARTS, every=10)))
    status, _, body = split_cgi(out.stdout)
    assert status == "200 OK", out.stderr[-2000:]
    assert json.loads(body) == {"names": ["f%d" % i for i in range(MAX_PARTS)], "sizes": [10, 1100]}
    assert out.stderr == b""

