"""HTTP behaviour the field gets wrong, checked through every real server variant.

Conditional GET, gzip with an honest Vary, streaming, work after the response and the 500
page, each against the demo app (htdocs/app.py) served unchanged by Apache CGI (mod_cgid
and mod_cgi), mod_python, mod_fcgid and nginx in front of the FastCGI server.
"""

import gzip
import hashlib
import socket
import time
import uuid

import pytest
import requests

TIMEOUT = 30


def get(server, path, headers=None):
    return requests.get(server.url + path, headers=headers or {}, timeout=TIMEOUT,
                        allow_redirects=False, stream=True)


def raw_body(response):
    """The body bytes as they travelled, without requests undoing the Content-Encoding."""
    return response.raw.read(decode_content=False)


class Timed:
    """One HTTP/1.1 request over a raw socket, noting when each part arrived."""

    def __init__(self, server, path, until=None):
        self.started = time.monotonic()
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
        self.sock.sendall(b"GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAccept-Encoding: identity\r\n"
                          b"Connection: close\r\n\r\n" % (path.encode(), server.port))
        self.data = b""
        self.first_seen = None
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self.data += chunk
            if until is not None and self.first_seen is None and until in self.data:
                self.first_seen = time.monotonic() - self.started
        self.closed_after = time.monotonic() - self.started
        self.sock.close()


def wait_for(predicate, seconds, what):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("%s did not happen within %g s" % (what, seconds))


def operator_logs(server):
    """What the operator reads: the server's logs and, under mod_cgi, the app's task log."""
    text = server.log_text(limit=400000)
    task_log = server.site.data / "deferred.log"
    if task_log.exists():
        text += "\n--- %s ---\n%s" % (task_log, task_log.read_text(errors="replace"))
    return text


# --- conditional GET --------------------------------------------------------------------


def test_if_none_match_answers_304_without_a_body(server):
    first = get(server, "/app.py/")
    assert first.status_code == 200
    etag = first.headers["ETag"]
    again = get(server, "/app.py/", {"If-None-Match": etag})
    assert again.status_code == 304
    assert raw_body(again) == b""
    assert again.headers["ETag"] == etag
    changed = get(server, "/app.py/", {"If-None-Match": '"not-this-one"'})
    assert changed.status_code == 200 and raw_body(changed) == raw_body(get(server, "/app.py/"))


def test_if_modified_since_answers_304_on_a_page_with_last_modified(server):
    first = get(server, "/app.py/article")
    assert first.status_code == 200
    assert first.headers["Last-Modified"] == "Thu, 15 Jan 2026 12:00:00 GMT"
    again = get(server, "/app.py/article", {"If-Modified-Since": first.headers["Last-Modified"]})
    assert again.status_code == 304 and raw_body(again) == b""
    older = get(server, "/app.py/article", {"If-Modified-Since": "Wed, 14 Jan 2026 12:00:00 GMT"})
    assert older.status_code == 200


def test_head_and_get_agree_on_the_validators(server):
    got = get(server, "/app.py/article", {"Accept-Encoding": "gzip"})
    head = requests.head(server.url + "/app.py/article", headers={"Accept-Encoding": "gzip"}, timeout=TIMEOUT)
    assert head.status_code == 200 and head.content == b""
    for name in ("ETag", "Last-Modified", "Content-Encoding", "Vary"):
        assert head.headers.get(name) == got.headers.get(name), name


# --- gzip and Vary ----------------------------------------------------------------------


def test_a_20k_page_is_gzipped_with_vary_and_its_own_etag(server):
    identity = get(server, "/app.py/article", {"Accept-Encoding": "identity"})
    plain = raw_body(identity)
    assert len(plain) >= 20000
    assert "Content-Encoding" not in identity.headers
    assert "Accept-Encoding" in identity.headers["Vary"]

    zipped = get(server, "/app.py/article", {"Accept-Encoding": "gzip"})
    assert zipped.headers["Content-Encoding"] == "gzip"
    assert "Accept-Encoding" in zipped.headers["Vary"]
    body = raw_body(zipped)
    assert gzip.decompress(body) == plain
    assert len(body) < len(plain) // 4
    if "Content-Length" in zipped.headers:  # Apache re-frames CGI output as chunked
        assert int(zipped.headers["Content-Length"]) == len(body)
    assert zipped.headers["ETag"] != identity.headers["ETag"]

    refused = get(server, "/app.py/article", {"Accept-Encoding": "gzip;q=0, identity"})
    assert "Content-Encoding" not in refused.headers and raw_body(refused) == plain


def test_a_png_is_never_compressed_and_never_varies(server, checkout):
    response = get(server, "/app.py/logo.png", {"Accept-Encoding": "gzip"})
    assert response.status_code == 200
    assert "Content-Encoding" not in response.headers
    assert "Vary" not in response.headers
    assert raw_body(response) == (checkout / "htdocs" / "logo.png").read_bytes()


# --- streaming --------------------------------------------------------------------------


def test_the_first_chunk_arrives_before_the_work_ends(server):
    timed = Timed(server, "/app.py/wait?seconds=2", until=b'id="wait"')
    assert timed.data.startswith(b"HTTP/1.1 200")
    assert timed.first_seen is not None and timed.first_seen < 1.5, timed.first_seen
    assert b'id="done"' in timed.data
    assert timed.closed_after >= 2.0


# --- work after the response -------------------------------------------------------------


def test_deferred_work_does_not_keep_the_client_waiting(server):
    name = uuid.uuid4().hex
    report = server.site.data / ("report-%s.txt" % name)
    timed = Timed(server, "/app.py/report?seconds=5&name=%s" % name)
    assert timed.data.startswith(b"HTTP/1.1 200"), timed.data[:300]
    assert b'id="queued"' in timed.data
    # The whole response, and the connection closed, long before the 5 s task ends.
    assert timed.closed_after < 1.5, timed.closed_after
    assert not report.exists()
    wait_for(report.exists, 10, "the deferred task's file")
    assert report.read_text().startswith("report made at ")


def test_a_failing_deferred_task_is_logged_where_the_operator_looks(server):
    response = get(server, "/app.py/report?seconds=0&fail=1&name=%s" % uuid.uuid4().hex)
    assert response.status_code == 200
    wait_for(lambda: "RuntimeError: the report could not be made" in operator_logs(server), 10,
             "the failing task's traceback in the logs")
    text = operator_logs(server)
    assert "deferred task" in text and "Traceback (most recent call last)" in text


# --- errors -----------------------------------------------------------------------------


def test_an_exception_is_a_500_without_a_traceback_and_logged(server):
    response = get(server, "/app.py/error")
    assert response.status_code == 500
    body = raw_body(response)
    assert b"Internal Server Error" in body
    assert b"Traceback" not in body and b"deliberate" not in body
    wait_for(lambda: "RuntimeError: a deliberate error" in server.log_text(limit=400000), 5,
             "the traceback in the error log")
    text = server.log_text(limit=400000)
    assert "500 on GET /app.py/error" in text
