"""Sessions: the cookie, its flags, hostile cookies and store files, JSON, ids, the data dir."""

import base64
import json
import os
import pickle
import subprocess
import sys
import uuid
import zlib

import pytest
import webob
from webob import exc

from helpers import CHECKOUT, SECRET, Client, clean_env  # noqa: F401  (clean_env is a fixture)
from tinyweb import App

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


def all_files(root):
    return {os.path.join(d, f) for d, _, files in os.walk(root) for f in files}


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
    with open(session_file(data_dir, value), "rb") as f:
        container = pickle.load(f)  # Beaker's own container format; the session inside is JSON
    stored = container["session"]
    stored = stored[-1] if isinstance(stored, tuple) else stored
    data = json.loads(zlib.decompress(base64.b64decode(stored)))
    assert data["n"] == 1


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
