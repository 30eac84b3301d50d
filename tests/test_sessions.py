"""Sessions: the cookie, its flags, hostile cookies and store files, JSON, ids, the data dir,
parallel requests on one session, a full disk, and the sweep of expired sessions."""

import base64
import fcntl
import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib

import pytest
import webob
from webob import exc

from helpers import CHECKOUT, SECRET, Client, cgi_environ, clean_env, make_site, split_cgi  # noqa: F401
from tinyweb import App, session_sweep, sessions

pytestmark = pytest.mark.usefixtures("clean_env")

COOKIE = "tinyweb_session"


def make_app(data_dir, **settings):
    settings.setdefault("secret", SECRET)
    app = App(__name__, data_dir=str(data_dir), **settings)

    @app.get("/count")
    def count(request):
        request.session["n"] = request.session.get("n", 0) + 1
        return {"n": request.session["n"]}

    @app.get("/peek")
    def peek(request):
        return {"n": request.session.get("n"), "user": request.session.get("user")}

    @app.get("/login")
    def login(request):
        request.session.regenerate_id()
        request.session["user"] = "ann"
        return "welcome"

    @app.get("/logout")
    def logout(request):
        request.session.delete()
        return "bye"

    @app.get("/bad-value")
    def bad_value(request):
        request.session["when"] = {1, 2}
        return "not saved"

    @app.get("/page")
    def page(request):
        return "no session here"

    @app.get("/login-redirect")
    def login_redirect(request):
        request.session["user"] = "bea"
        raise exc.HTTPFound(location="/peek")

    @app.get("/own-response")
    def own_response(request):
        request.session["user"] = "cy"
        return webob.Response(body=b"mine", content_type="text/plain", charset=None)

    return app


@pytest.fixture
def data_dir(tmp_path):
    return tmp_path / "site" / "data"


@pytest.fixture
def client(data_dir):
    return Client(make_app(data_dir))


def cookie_of(res):
    """Return (value, {attribute: value}) of the session's Set-Cookie header."""
    headers = [v for k, v in res.headerlist if k == "Set-Cookie" and v.startswith(COOKIE + "=")]
    assert len(headers) == 1, res.headerlist
    first, *attributes = [part.strip() for part in headers[0].split(";")]
    flags = {}
    for attribute in attributes:
        key, _, value = attribute.partition("=")
        flags[key.lower()] = value
    return first.split("=", 1)[1], flags


def session_file(data_dir, cookie_value):
    session_id = cookie_value[40:]  # after the 40-hex-digit HMAC
    folder = data_dir / "sessions" / "container_file" / session_id[0] / session_id[:2]
    return folder / (session_id + ".cache")


def lock_file(data_dir, cookie_value):
    """Return the path of Beaker's lock file for the session (sha1 of its id)."""
    digest = hashlib.sha1(cookie_value[40:].encode()).hexdigest()
    return data_dir / "sessions" / "container_file_lock" / digest[0] / digest[:2] / (digest + ".lock")


def stored(data_dir, cookie_value):
    """Return the session data as stored on disk (Beaker's pickled container, JSON inside)."""
    with open(session_file(data_dir, cookie_value), "rb") as f:
        container = pickle.load(f)
    return json.loads(zlib.decompress(base64.b64decode(container["session"])))


def all_files(root):
    return {os.path.join(d, f) for d, _, files in os.walk(root) for f in files}


def temp_files(root):
    return [path for path in all_files(root) if path.endswith(".temp")]


def test_counter_counts_with_the_cookie(client, data_dir):
    res = client.get("/count")
    assert res.body == b'{"n":1}'
    value, _ = cookie_of(res)
    assert len(value) == 72 and all(c in "0123456789abcdef" for c in value)
    for n in (2, 3):
        res = client.get("/count", headers={"Cookie": "%s=%s" % (COOKIE, value)})
        assert res.body == b'{"n":%d}' % n
        assert "Set-Cookie" not in res.headers  # the same session: no new cookie
    assert session_file(data_dir, value).is_file()


def test_without_the_cookie_it_starts_again(client):
    client.get("/count")
    assert client.get("/count").body == b'{"n":1}'


def test_cookie_found_among_other_cookies(client):
    value, _ = cookie_of(client.get("/count"))
    header = 'other=1; bad"cookie=\\x; %s=%s; last=2' % (COOKIE, value)
    assert client.get("/count", headers={"Cookie": header}).body == b'{"n":2}'


@pytest.mark.parametrize("environ, path, secure", [
    ({"SCRIPT_NAME": "/app.py"}, "/app.py", False),
    ({"SCRIPT_NAME": ""}, "/", False),
    ({"SCRIPT_NAME": "/cgi-bin/shop.py", "wsgi.url_scheme": "https", "HTTPS": "on"},
     "/cgi-bin/shop.py", True),
])
def test_cookie_flags(data_dir, environ, path, secure):
    client = Client(make_app(data_dir), **environ)
    res = client.get(environ["SCRIPT_NAME"] + "/count")
    _, flags = cookie_of(res)
    assert flags["path"] == path
    assert "httponly" in flags
    assert flags["samesite"] == "Lax"
    assert ("secure" in flags) is secure
    assert "domain" not in flags


@pytest.mark.parametrize("path, status, user", [
    ("/login-redirect", 302, "bea"),
    ("/own-response", 200, "cy"),
])
def test_cookie_reaches_a_raised_or_returned_response(client, path, status, user):
    res = client.get(path, status=status)
    value, _ = cookie_of(res)
    assert client.get("/peek", headers={"Cookie": "%s=%s" % (COOKIE, value)}).json["user"] == user


def test_reading_a_session_sets_no_cookie_and_writes_nothing(client, data_dir):
    res = client.get("/peek")
    assert res.json == {"n": None, "user": None}
    assert "Set-Cookie" not in res.headers
    assert all_files(data_dir) == set()


def test_a_page_without_session_sets_no_cookie(client, data_dir):
    assert "Set-Cookie" not in client.get("/page").headers
    assert not data_dir.exists()


def _flip(text, index):
    return text[:index] + ("0" if text[index] != "0" else "1") + text[index + 1:]


@pytest.mark.parametrize("forge", [
    lambda v: _flip(v, 0),                       # signature
    lambda v: _flip(v, 71),                      # id
    lambda v: v[40:],                            # id without signature
    lambda v: "0" * 40 + uuid.uuid4().hex,       # a made-up id, signed with nothing
    lambda v: "garbage",
    lambda v: "../../x",
    lambda v: v[:40] + "../../../../x",
    lambda v: "a" * 300,
    lambda v: v[:40] + "f" * 300,
    lambda v: '"a\\000b"',
    lambda v: v + "\x00",
    lambda v: "",
])
def test_forged_cookie_gets_a_fresh_session(client, data_dir, tmp_path, forge):
    value, _ = cookie_of(client.get("/count"))
    original = session_file(data_dir, value).read_bytes()
    before = all_files(tmp_path)

    res = client.get("/count", headers={"Cookie": "%s=%s" % (COOKIE, forge(value))})

    assert res.status_int == 200
    assert res.body == b'{"n":1}'
    new_value, _ = cookie_of(res)
    assert new_value != value
    assert session_file(data_dir, value).read_bytes() == original
    created = all_files(tmp_path) - before
    assert created and all(path.startswith(str(data_dir) + os.sep) for path in created), created


def test_traversing_cookie_creates_nothing_outside_the_data_dir(client):
    target = "tinyweb-escape-%s" % uuid.uuid4().hex
    for value in ("../" * 12 + "tmp/" + target, "/tmp/" + target, "..%2F..%2F" + target):
        assert client.get("/count", headers={"Cookie": "%s=%s" % (COOKIE, value)}).status_int == 200
    assert not [name for name in os.listdir("/tmp") if target in name]


@pytest.mark.parametrize("garbage", [b"\x80\x04garbage\xff" * 8, b"", b"not a pickle at all",
                                     pickle.dumps({"session": b"not base64 json"})])
def test_corrupt_session_file_gives_a_fresh_session(client, data_dir, garbage):
    value, _ = cookie_of(client.get("/count"))
    session_file(data_dir, value).write_bytes(garbage)
    with pytest.warns(Warning, match="Invalidating corrupt session"):
        res = client.get("/count", headers={"Cookie": "%s=%s" % (COOKIE, value)})
    assert res.status_int == 200
    assert res.body == b'{"n":1}'
    assert cookie_of(res)[0] != value


def test_session_is_stored_as_json(client, data_dir):
    value, _ = cookie_of(client.get("/count"))
    assert stored(data_dir, value)["n"] == 1


def test_non_json_value_is_500_with_a_clear_log_line(client, data_dir):
    value, _ = cookie_of(client.get("/count"))
    original = session_file(data_dir, value).read_bytes()
    res = client.get("/bad-value", headers={"Cookie": "%s=%s" % (COOKIE, value)}, status=500,
                     expect_errors=True)
    assert b"not saved" not in res.body and b"Traceback" not in res.body
    assert "Set-Cookie" not in res.headers
    assert "session['when'] cannot be stored: session values must be JSON-serialisable" in res.errors
    assert "500 on GET /bad-value" in res.errors
    assert session_file(data_dir, value).read_bytes() == original


def test_regenerate_id_changes_the_cookie_and_keeps_the_data(client):
    old, _ = cookie_of(client.get("/count"))
    res = client.get("/login", headers={"Cookie": "%s=%s" % (COOKIE, old)})
    new, flags = cookie_of(res)
    assert new != old and new[40:] != old[40:]
    assert flags["path"] == "/" and "httponly" in flags
    res = client.get("/peek", headers={"Cookie": "%s=%s" % (COOKIE, new)})
    assert res.json == {"n": 1, "user": "ann"}
    # The id an attacker may have planted before the login does not carry the login.
    assert client.get("/peek", headers={"Cookie": "%s=%s" % (COOKIE, old)}).json == {"n": None, "user": None}


def test_regenerate_id_removes_the_old_session_file(client, data_dir):
    old, _ = cookie_of(client.get("/count"))
    assert session_file(data_dir, old).exists()
    new, _ = cookie_of(client.get("/login", headers={"Cookie": "%s=%s" % (COOKIE, old)}))
    assert not session_file(data_dir, old).exists()
    assert session_file(data_dir, new).exists()


def test_delete_sends_an_expired_cookie_and_forgets_the_data(client):
    value, _ = cookie_of(client.get("/count"))
    res = client.get("/logout", headers={"Cookie": "%s=%s" % (COOKIE, value)})
    _, flags = cookie_of(res)
    assert flags["expires"].endswith("GMT")
    from email.utils import parsedate_to_datetime
    import datetime

    assert parsedate_to_datetime(flags["expires"]) < datetime.datetime.now(datetime.timezone.utc)
    assert client.get("/peek", headers={"Cookie": "%s=%s" % (COOKIE, value)}).json["n"] is None


def test_data_dir_is_created_private(client, data_dir):
    old = os.umask(0o022)
    try:
        client.get("/count")
    finally:
        os.umask(old)
    assert oct(data_dir.stat().st_mode & 0o777) == oct(0o700)
    assert oct((data_dir / "sessions").stat().st_mode & 0o777) == oct(0o700)


def test_unusable_session_store_is_503(tmp_path):
    (tmp_path / "file").write_text("a file where the data dir should be")
    client = Client(make_app(tmp_path / "file" / "data"))
    res = client.get("/count", status=503, expect_errors=True)
    assert b"Traceback" not in res.body
    assert "503 on GET" in res.errors and ": cannot create the session directory" in res.errors
    assert client.get("/page").body == b"no session here"


def test_tasks_of_a_request_whose_session_store_fails_are_dropped(tmp_path):
    # The 503 asks the client to try again: its tasks would run twice.
    (tmp_path / "file").write_text("a file where the data dir should be")
    app = make_app(tmp_path / "file" / "data")
    ran = []

    @app.get("/defer-and-count")
    def defer_and_count(request):
        request.defer(ran.append, "task")
        request.session["n"] = 1
        return "counted"

    res = Client(app).get("/defer-and-count", status=503, expect_errors=True)
    assert ran == []
    assert "503 on GET /defer-and-count (1 deferred task dropped): cannot create" in res.errors


def test_missing_secret_is_500_naming_the_config_file(data_dir):
    config = os.environ["TINYWEB_CONFIG"]
    client = Client(make_app(data_dir, secret=None))
    res = client.get("/count", status=500, expect_errors=True)
    assert b"secret" not in res.body
    assert "sessions need a secret" in res.errors
    assert "under [tinyweb] in %s" % config in res.errors
    assert client.get("/page").body == b"no session here"
    assert not data_dir.exists()


def test_placeholder_secret_is_500_naming_the_config_file(tmp_path, data_dir, monkeypatch):
    ini = tmp_path / "tinyweb.ini"
    ini.write_text("[tinyweb]\nsecret = @SECRET@\n")
    monkeypatch.setenv("TINYWEB_CONFIG", str(ini))
    res = Client(make_app(data_dir, secret=None)).get("/count", status=500, expect_errors=True)
    assert "the secret in %s is a placeholder" % ini in res.errors


def test_bad_session_option_names_the_config_file(tmp_path, data_dir, monkeypatch):
    ini = tmp_path / "tinyweb.ini"
    ini.write_text("[tinyweb]\nsecret = %s\n[session]\ntimeout = soon\n" % SECRET)
    monkeypatch.setenv("TINYWEB_CONFIG", str(ini))
    res = Client(make_app(data_dir, secret=None)).get("/count", status=500, expect_errors=True)
    assert "ConfigError: %s: [session]" % ini in res.errors
    assert "timeout" in res.errors


def test_cookie_sessions_are_refused(tmp_path, data_dir, monkeypatch):
    ini = tmp_path / "tinyweb.ini"
    ini.write_text("[tinyweb]\nsecret = %s\n[session]\ntype = cookie\n" % SECRET)
    monkeypatch.setenv("TINYWEB_CONFIG", str(ini))
    res = Client(make_app(data_dir, secret=None)).get("/count", status=500, expect_errors=True)
    assert "type = cookie is not supported" in res.errors


_IMPORTS = """
import io, json, sys
sys.path.insert(0, %(checkout)r)
import webob, tinyweb
app = tinyweb.App("probe", secret=%(secret)r, data_dir=%(data)r)
@app.get("/page")
def page(request):
    return "plain"
@app.get("/count")
def count(request):
    request.session["n"] = 1
    return "counted"
seen = {}
for path in ("/page", "/count"):
    req = webob.Request.blank(path)
    req.environ["wsgi.errors"] = io.StringIO()
    assert req.get_response(app).status_int == 200, path
    seen[path] = sorted(m for m in ("beaker", "beaker.session", "flup") if m in sys.modules)
print(json.dumps(seen))
"""


def test_beaker_is_imported_only_when_a_session_is_touched(tmp_path):
    code = _IMPORTS % {"checkout": str(CHECKOUT), "secret": SECRET, "data": str(tmp_path / "data")}
    env = {k: v for k, v in os.environ.items() if not k.startswith("TINYWEB_")}
    env["TINYWEB_CONFIG"] = str(tmp_path / "none.ini")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=30)
    assert out.returncode == 0, out.stderr.decode()
    assert json.loads(out.stdout) == {"/page": [], "/count": ["beaker", "beaker.session"]}


# --- Parallel requests on one session (bad-inputs.md row 28) ------------------------------
#
# tinyweb merges on save: each request writes the keys it changed over what is stored at that
# moment, under the session's lock, so every request's key lands; see sessions.py.


def _request(app, path, cookie=None):
    """Run one request in this thread; return (status, body, log)."""
    req = webob.Request.blank(path)
    req.environ["wsgi.errors"] = io.StringIO()
    if cookie:
        req.headers["Cookie"] = "%s=%s" % (COOKIE, cookie)
    res = req.get_response(app)
    return res.status_int, res.body, req.environ["wsgi.errors"].getvalue()


def make_parallel_app(data_dir, parties):
    """An app whose /put/KEY loads the session, waits until ``parties`` requests have, then sets KEY."""
    app = make_app(data_dir)
    barrier = threading.Barrier(parties, timeout=30)

    @app.get("/put/{key}")
    def put(request, key):
        request.session.get(key)  # loaded now, before any of the others saves
        barrier.wait()
        request.session[key] = key
        return "stored"

    return app


def test_parallel_threads_each_keep_their_key_and_the_file_always_parses(data_dir):
    parties = 50
    app = make_parallel_app(data_dir, parties)
    value, _ = cookie_of(Client(app).get("/count"))
    assert session_file(data_dir, value).exists()  # stored before the parallel requests begin
    results, reads, bad_reads = [], [], []
    done = threading.Event()

    def reader():
        # The stored file is replaced by a rename: a reader sees one whole version or another.
        while not done.is_set():
            try:
                reads.append(stored(data_dir, value))
            except Exception as exc:  # any failure to parse is what this test is about
                bad_reads.append(repr(exc))

    def worker(i):
        results.append(_request(app, "/put/k%02d" % i, value))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(parties)]
    watcher = threading.Thread(target=reader)
    watcher.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    done.set()
    watcher.join(timeout=10)
    assert not any(thread.is_alive() for thread in threads + [watcher])

    assert sorted(status for status, _, _ in results) == [200] * parties, results
    assert bad_reads == [] and reads
    data = stored(data_dir, value)
    assert sorted(k for k in data if k.startswith("k")) == ["k%02d" % i for i in range(parties)]
    assert data["n"] == 1
    assert temp_files(data_dir) == []


SITE_APP = """
import os
import time

import tinyweb

app = tinyweb.App(__name__)


@app.get("/put/{key}")
def put(request, key):
    request.session.get(key)  # loads the session
    barrier = os.environ.get("TEST_BARRIER")
    if barrier:
        # Every process has loaded the session before any saves: the worst case.
        open(os.path.join(barrier, key), "w").close()
        deadline = time.monotonic() + 30
        while len(os.listdir(barrier)) < int(os.environ["TEST_PARTIES"]):
            if time.monotonic() > deadline:
                raise RuntimeError("the other processes never came")
            time.sleep(0.01)
    request.session[key] = request.GET.get("value", key)
    return "stored"


@app.get("/keys")
def keys(request):
    return sorted(k for k in request.session if not k.startswith("_"))


app.run()
"""


@pytest.fixture
def site(tmp_path):
    """A CGI app laid out as `tinyweb new` makes it; its sessions in site/data."""
    return make_site(tmp_path, SITE_APP)


def site_env(path, **extra):
    return cgi_environ(path, PYTHONPATH=str(CHECKOUT), **extra)


def start_cgi(site, environ, prefix=()):
    return subprocess.Popen([*prefix, sys.executable, str(site / "htdocs" / "app.py")],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=environ)


def run_site(site, environ, prefix=()):
    process = start_cgi(site, environ, prefix)
    stdout, stderr = process.communicate(timeout=30)
    return split_cgi(stdout), stderr.decode()


def test_parallel_cgi_processes_each_keep_their_key(site, tmp_path):
    parties = 16
    (status, headers, _), _ = run_site(site, site_env("/put/first"))
    cookie = dict(headers)["Set-Cookie"].split(";")[0]
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    processes = [start_cgi(site, site_env("/put/k%02d" % i, HTTP_COOKIE=cookie, TEST_BARRIER=str(barrier),
                                          TEST_PARTIES=str(parties)))
                 for i in range(parties)]
    try:
        outputs = [process.communicate(timeout=60) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
    for stdout, stderr in outputs:
        assert split_cgi(stdout)[0] == "200 OK", stderr.decode()

    (status, _, body), _ = run_site(site, site_env("/keys", HTTP_COOKIE=cookie))
    assert status == "200 OK"
    assert json.loads(body) == ["first"] + ["k%02d" % i for i in range(parties)]
    assert temp_files(site / "data") == []


def test_a_request_in_flight_does_not_bring_back_a_deleted_session(data_dir):
    app = make_app(data_dir)
    loaded, resume = threading.Event(), threading.Event()

    @app.get("/slow-note")
    def slow_note(request):
        assert request.session["user"] == "bea"  # loaded before the logout
        loaded.set()
        assert resume.wait(timeout=30)
        request.session["note"] = "written after the logout"
        return "noted"

    client = Client(app)
    value, _ = cookie_of(client.get("/login-redirect", status=302))
    result = []
    slow = threading.Thread(target=lambda: result.append(_request(app, "/slow-note", value)))
    slow.start()
    try:
        assert loaded.wait(timeout=30)
        client.get("/logout", headers={"Cookie": "%s=%s" % (COOKIE, value)})
        assert not session_file(data_dir, value).exists()
    finally:
        resume.set()
        slow.join(timeout=30)
    assert result[0][0] == 200
    # Only what the late request itself changed is written: the login stays gone.
    data = stored(data_dir, value)
    assert data["note"] == "written after the logout"
    assert "user" not in data and "n" not in data


def test_a_session_locked_too_long_is_503_and_left_as_it_was(data_dir, monkeypatch):
    monkeypatch.setattr(sessions, "LOCK_TIMEOUT", 0.3)
    app = make_app(data_dir)
    held = []

    @app.get("/write-while-locked")
    def write_while_locked(request):
        request.session["n"] = 99
        # Another process holds the session's lock, as a writer stuck on a dead disk would.
        fd = os.open(lock_file(data_dir, value), os.O_RDONLY)
        held.append(fd)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return "not saved"

    client = Client(app)
    value, _ = cookie_of(client.get("/count"))
    original = session_file(data_dir, value).read_bytes()
    try:
        started = time.monotonic()
        res = client.get("/write-while-locked", headers={"Cookie": "%s=%s" % (COOKIE, value)},
                         status=503, expect_errors=True)
        assert time.monotonic() - started < 5
    finally:
        for fd in held:
            os.close(fd)
    assert b"Traceback" not in res.body and b"not saved" not in res.body
    assert ("503 on GET /write-while-locked: a session stayed locked by another request for "
            "more than 0.3 s") in res.errors
    assert len(res.errors.splitlines()) == 1
    assert session_file(data_dir, value).read_bytes() == original
    # Once the lock is free, the next request saves.
    res = client.get("/count", headers={"Cookie": "%s=%s" % (COOKIE, value)})
    assert res.json == {"n": 2}


def test_a_handler_that_raises_leaves_no_lock_behind(data_dir, monkeypatch):
    monkeypatch.setattr(sessions, "LOCK_TIMEOUT", 1.0)
    app = make_app(data_dir)

    @app.get("/boom")
    def boom(request):
        request.session["n"] = 50
        raise RuntimeError("boom after touching the session")

    client = Client(app)
    value, _ = cookie_of(client.get("/count"))
    headers = {"Cookie": "%s=%s" % (COOKIE, value)}
    assert client.get("/boom", headers=headers, status=500, expect_errors=True).status_int == 500
    started = time.monotonic()
    assert client.get("/count", headers=headers).json == {"n": 2}  # the raise saved nothing
    assert time.monotonic() - started < 1.0
    fd = os.open(lock_file(data_dir, value), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free: nobody holds it
    finally:
        os.close(fd)


# --- A full disk while saving (row 29) ------------------------------------------------------

# Runs the CGI script with a file size limit: a write past it fails with EFBIG, as ENOSPC
# does on a full disk (SIGXFSZ ignored, else the kernel kills the process).
FILE_SIZE_LIMIT = [sys.executable, "-c",
                   "import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
                   "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096)); "
                   "os.execv(sys.argv[1], sys.argv[1:])"]


def test_a_full_disk_while_saving_is_503_and_keeps_the_old_session(site):
    (status, headers, _), _ = run_site(site, site_env("/put/note", QUERY_STRING="value=small"))
    cookie = dict(headers)["Set-Cookie"].split(";")[0]
    value = cookie.split("=", 1)[1]
    data_dir = site / "data"
    original = session_file(data_dir, value).read_bytes()

    big = os.urandom(8000).hex()  # does not compress below the 4 KiB limit
    (status, headers, body), log = run_site(
        site, site_env("/put/note", QUERY_STRING="value=" + big, HTTP_COOKIE=cookie), prefix=FILE_SIZE_LIMIT)

    assert status == "503 Service Unavailable"
    assert b"Traceback" not in body and b"File too large" not in body
    lines = log.splitlines()
    assert len(lines) == 1, log
    # The request line is cut in the log past 2000 characters (app.py MAX_LOGGED_LINE).
    assert "503 on GET /app.py/put/note?value=%s" % big[:100] in lines[0]
    assert ": cannot save a session in %s/sessions: File too large; " \
           "the disk is full or the process may not write files this large" % data_dir in lines[0]
    assert session_file(data_dir, value).read_bytes() == original
    assert temp_files(data_dir) == []
    # Under the limit, the same process setup saves again.
    (status, _, _), _ = run_site(site, site_env("/put/note", QUERY_STRING="value=again", HTTP_COOKIE=cookie),
                                 prefix=FILE_SIZE_LIMIT)
    assert status == "200 OK"
    assert stored(data_dir, value)["note"] == "again"


# --- An unusable data dir, the app not running as root (row 30) ----------------------------

_AS_ANOTHER_USER = """
import io, json, os, sys
sys.path.insert(0, %(checkout)r)
import webob, tinyweb
apps = {}
for name, data_dir in %(cases)r:
    app = apps[name] = tinyweb.App("probe", secret=%(secret)r, data_dir=data_dir)
    app.get("/count")(lambda request: {"n": request.session.setdefault("n", 1)})
    app.get("/page")(lambda request: "no session here")
def run(app, path):
    req = webob.Request.blank(path)
    req.environ["wsgi.errors"] = io.StringIO()
    res = req.get_response(app)
    return [res.status_int, res.text, req.environ["wsgi.errors"].getvalue()]
# Every code path once as root, in scratch dirs (a 200 and a 503): the interpreter and its
# stdlib live under /root, which the app's user cannot read to import more afterwards.
for scratch in (%(scratch)r, os.path.join(%(scratch)r, "file")):
    warm = tinyweb.App("warm", secret=%(secret)r, data_dir=scratch)
    warm.get("/count")(lambda request: {"n": request.session.setdefault("n", 1)})
    run(warm, "/count")
if %(uid)r is not None:  # then the app runs as this user
    os.setgroups([])
    os.setgid(%(gid)r)
    os.setuid(%(uid)r)
out = {}
for name, app in apps.items():
    out[name] = [run(app, "/count"), run(app, "/page")]
print(json.dumps(out))
"""


def test_an_unusable_data_dir_is_503_with_what_to_do(monkeypatch):
    import pwd

    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        uid, gid = nobody.pw_uid, nobody.pw_gid
    else:
        uid = gid = None  # already not root: chmod stands in for "owned by another user"
    app_uid = os.geteuid() if uid is None else uid
    base = tempfile.mkdtemp(prefix="tinyweb-test-")  # pytest's tmp_path is closed to others
    try:
        os.chmod(base, 0o755)

        def place(name, mode, owned_by_app=True):
            path = os.path.join(base, name)
            os.makedirs(path, exist_ok=True)
            os.chmod(path, mode)
            if uid is not None:
                os.chown(path, uid if owned_by_app else 0, gid if owned_by_app else 0)
            return path

        place("missing", 0o755)
        place("read-only/data", 0o700)
        place("read-only/data/sessions", 0o500)
        place("other-owner", 0o755)
        place("other-owner/data", 0o700 if uid is not None else 0o000, owned_by_app=False)
        place("other-owner-inside/data", 0o700)
        place("other-owner-inside/data/sessions", 0o700)
        place("other-owner-inside/data/sessions/container_file_lock", 0o700 if uid is not None else 0o500,
              owned_by_app=False)
        cases = [(name, os.path.join(base, name, "data"))
                 for name in ("missing", "read-only", "other-owner", "other-owner-inside")]
        scratch = os.path.join(base, "scratch")
        os.makedirs(scratch)
        with open(os.path.join(scratch, "file"), "w") as f:
            f.write("a file where a data dir should be")
        code = _AS_ANOTHER_USER % {"checkout": str(CHECKOUT), "secret": SECRET, "cases": cases,
                                   "uid": uid, "gid": gid, "scratch": scratch}
        env = {k: v for k, v in os.environ.items() if not k.startswith("TINYWEB_")}
        env["TINYWEB_CONFIG"] = os.path.join(base, "none.ini")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=60)
        assert out.returncode == 0, out.stderr.decode()
        results = json.loads(out.stdout)

        # A missing data dir is made, private to the app's user.
        assert [r[0] for r in results["missing"]] == [200, 200]
        made = os.stat(os.path.join(base, "missing", "data"))
        assert (made.st_uid, oct(made.st_mode & 0o777)) == (app_uid, "0o700")

        expected = {
            "read-only": "the session directory %s/read-only/data/sessions is not writable by uid %d"
                         % (base, app_uid),
            "other-owner": "cannot create the session directory %s/other-owner/data/sessions: "
                           "Permission denied; the data dir and everything in it must belong to uid %d"
                           % (base, app_uid),
            "other-owner-inside": "cannot save a session in %s/other-owner-inside/data/sessions/"
                                  "container_file_lock" % base,
        }
        for name, message in expected.items():
            (status, body, log), (page_status, page, _) = results[name]
            assert status == 503, (name, log)
            assert "Traceback" not in body and base not in body
            assert len(log.splitlines()) == 1, log
            assert "503 on GET /count: " + message in log, log
            assert (page_status, page) == (200, "no session here")  # the rest of the app serves
        assert "Permission denied; the data dir and everything in it must belong to uid %d" % app_uid \
            in results["other-owner-inside"][0][2]
    finally:
        shutil.rmtree(base, ignore_errors=True)


# --- The sweep of expired sessions (row 32) -------------------------------------------------

DAY = 24 * 3600


def age(path, seconds):
    when = time.time() - seconds
    os.utime(path, (when, when), follow_symlinks=False)


def plant(path, seconds_old, content=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    age(path, seconds_old)
    return path


@pytest.fixture
def sweep_every_save(monkeypatch):
    monkeypatch.setattr(sessions, "CLEANUP_EVERY", 1)
    monkeypatch.setattr(session_sweep, "CLEANUP_MAX_ENTRIES", 10 ** 6)
    monkeypatch.setattr(session_sweep, "CLEANUP_MAX_SECONDS", 60.0)


def test_sweep_removes_expired_sessions_and_nothing_else(client, data_dir, tmp_path, sweep_every_save,
                                                         monkeypatch):
    monkeypatch.setattr(sessions, "CLEANUP_EVERY", 10 ** 9)  # no sweep while setting up
    expired = 31 * DAY
    old = [cookie_of(client.get("/count"))[0] for _ in range(3)]
    fresh = cookie_of(client.get("/count"))[0]
    for value in old:
        age(session_file(data_dir, value), expired)
        age(lock_file(data_dir, value), expired)
    store = data_dir / "sessions" / "container_file"
    locks = data_dir / "sessions" / "container_file_lock"
    in_use = old[2]  # expired, but a request holds its lock right now
    # A bucket no session uses yet, to be a symlink to a folder outside the store.
    free = next(p for p in ("%02x" % i for i in range(256)) if not (store / p[0] / p).exists())
    keep = {
        "fresh": session_file(data_dir, fresh),
        "fresh lock": lock_file(data_dir, fresh),
        "in use": session_file(data_dir, in_use),
        "in use lock": lock_file(data_dir, in_use),
        "fresh temp": plant(store / "d" / "de" / ("de" + "0" * 30 + ".cache.temp"), 60),
        "fresh orphan lock": plant(locks / "e" / "e1" / ("e1" + "2" * 38 + ".lock"), DAY),
        "not ours": plant(store / "a" / "ab" / "notes.txt", expired),
        "not an id": plant(store / "a" / "ab" / ("AB" + "0" * 30 + ".cache"), expired),
        "not a lock": plant(locks / "a" / "ab" / "other.lock", expired),
        "beside the buckets": plant(store / ("ab" + "0" * 30 + ".cache"), expired),
        "outside": plant(tmp_path / "outside" / (free + "1" * 30 + ".cache"), expired),
        "link target": plant(tmp_path / "target.txt", expired, b"precious"),
    }
    link = store / "b" / "bc" / ("bc" + "0" * 30 + ".cache")
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(keep["link target"])
    age(link, expired)
    keep["symlink"] = link
    linked_bucket = store / free[0] / free
    linked_bucket.parent.mkdir(parents=True, exist_ok=True)
    linked_bucket.symlink_to(tmp_path / "outside", target_is_directory=True)
    gone = {
        "expired": [session_file(data_dir, v) for v in old[:2]],
        "expired locks": [lock_file(data_dir, v) for v in old[:2]],
        "stale temp": [plant(store / "f" / "f0" / ("f0" + "0" * 30 + ".cache.temp"), 2 * 3600)],
        "expired orphan lock": [plant(locks / "0" / "01" / ("01" + "3" * 38 + ".lock"), expired)],
    }
    assert all(path.exists() for paths in gone.values() for path in paths)

    monkeypatch.setattr(sessions, "CLEANUP_EVERY", 1)
    fd = os.open(lock_file(data_dir, in_use), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # as Beaker's load holds it
        newest = cookie_of(client.get("/count"))[0]  # a save: the sweep runs
    finally:
        os.close(fd)

    assert {name: [str(p) for p in paths if os.path.lexists(p)] for name, paths in gone.items()} == \
        {name: [] for name in gone}
    assert [name for name, path in keep.items() if not os.path.lexists(path)] == []
    assert keep["link target"].read_bytes() == b"precious" and keep["symlink"].is_symlink()
    assert session_file(data_dir, newest).exists() and session_file(data_dir, fresh).exists()
    assert client.get("/peek", headers={"Cookie": "%s=%s" % (COOKIE, fresh)}).json["n"] == 1


def test_sweep_uses_the_session_timeout(tmp_path, data_dir, monkeypatch, sweep_every_save):
    ini = tmp_path / "tinyweb.ini"
    ini.write_text("[tinyweb]\nsecret = %s\n[session]\ntimeout = 600\n" % SECRET)
    monkeypatch.setenv("TINYWEB_CONFIG", str(ini))
    monkeypatch.setattr(sessions, "CLEANUP_EVERY", 10 ** 9)
    client = Client(make_app(data_dir, secret=None))
    idle_long, idle_short = (cookie_of(client.get("/count"))[0] for _ in range(2))
    for value, idle in ((idle_long, 15 * 60), (idle_short, 5 * 60)):
        age(session_file(data_dir, value), idle)
        age(lock_file(data_dir, value), idle)
    monkeypatch.setattr(sessions, "CLEANUP_EVERY", 1)
    client.get("/count")
    assert not session_file(data_dir, idle_long).exists() and not lock_file(data_dir, idle_long).exists()
    assert session_file(data_dir, idle_short).exists() and lock_file(data_dir, idle_short).exists()


def test_reading_an_old_session_keeps_it_alive(client, data_dir, sweep_every_save, monkeypatch):
    monkeypatch.setattr(sessions, "CLEANUP_EVERY", 10 ** 9)
    value, _ = cookie_of(client.get("/count"))
    for path in (session_file(data_dir, value), lock_file(data_dir, value)):
        age(path, 29 * DAY)
    assert client.get("/peek", headers={"Cookie": "%s=%s" % (COOKIE, value)}).json["n"] == 1
    for path in (session_file(data_dir, value), lock_file(data_dir, value)):
        assert time.time() - path.stat().st_mtime < 600, path
    # Two days on, with no change, the sweep still keeps it.
    monkeypatch.setattr(sessions, "CLEANUP_EVERY", 1)
    monkeypatch.setattr(sessions, "DEFAULT_LIFETIME", DAY)
    client.get("/count")
    assert client.get("/peek", headers={"Cookie": "%s=%s" % (COOKIE, value)}).json["n"] == 1


def _plant_abandoned(data_dir, count):
    """Leave ``count`` expired sessions on disk, with their lock files, as cookieless clients would."""
    store = data_dir / "sessions" / "container_file"
    locks = data_dir / "sessions" / "container_file_lock"
    paths = []
    for _ in range(count):
        sid = uuid.uuid4().hex
        digest = hashlib.sha1(sid.encode()).hexdigest()
        paths.append(plant(store / sid[0] / sid[:2] / (sid + ".cache"), 31 * DAY))
        paths.append(plant(locks / digest[0] / digest[:2] / (digest + ".lock"), 31 * DAY, b""))
    return paths


def test_one_sweep_does_bounded_work(client, data_dir, monkeypatch):
    client.get("/count")  # the store's folders exist
    planted = _plant_abandoned(data_dir, 300)
    monkeypatch.setattr(sessions, "CLEANUP_EVERY", 10 ** 9)
    client.get("/count")
    assert all(path.exists() for path in planted)  # most saves do not sweep at all
    monkeypatch.setattr(sessions, "CLEANUP_EVERY", 1)
    monkeypatch.setattr(session_sweep, "CLEANUP_MAX_ENTRIES", 50)
    client.get("/count")
    removed = sum(not path.exists() for path in planted)
    assert 0 < removed <= 50


def test_ten_thousand_abandoned_sessions_are_swept_away(client, data_dir, monkeypatch):
    # Default bounds per sweep; every save sweeps, so a few hundred saves must empty the store.
    client.get("/count")
    planted = _plant_abandoned(data_dir, 5000)  # 10,000 files
    monkeypatch.setattr(sessions, "CLEANUP_EVERY", 1)
    live = []
    for _ in range(400):
        live.append(cookie_of(client.get("/count"))[0])
        if not any(path.exists() for path in planted):
            break
    assert not any(path.exists() for path in planted), "%d left" % sum(p.exists() for p in planted)
    assert all(session_file(data_dir, value).exists() for value in live)
    assert len(all_files(data_dir)) <= 2 * (len(live) + 1)
