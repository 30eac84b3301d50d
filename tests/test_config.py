"""Configuration: tinyweb.ini beside htdocs/, TINYWEB_CONFIG, App arguments, bad values."""

import importlib.util
import sys
import uuid
from pathlib import Path

import pytest

from helpers import SECRET, Client, clean_env  # noqa: F401  (clean_env is a fixture)
from tinyweb.config import DEFAULT_MAX_BODY, DEFAULT_REQUEST_TIMEOUT, ConfigError, load_config

pytestmark = pytest.mark.usefixtures("clean_env")

APP_FILE = """
import tinyweb
app = tinyweb.App(__name__)

@app.get("/")
def index(request):
    return {"debug": request.app.config.debug}

app.run()
"""


@pytest.fixture
def site(tmp_path):
    """An app laid out as `tinyweb new` makes it: ROOT/htdocs/app.py and ROOT/tinyweb.ini."""
    root = tmp_path / "site"
    (root / "htdocs").mkdir(parents=True)
    (root / "htdocs" / "app.py").write_text(APP_FILE)
    (root / "tinyweb.ini").write_text(
        "[tinyweb]\nsecret = %s\ndebug = yes\nmax_body = 2048\n"
        "allowed_hosts = Example.com, www.example.com\n"
        "data_dir = var/data\nrequest_timeout = 2.5\n[session]\ntimeout = 600\n" % SECRET
    )
    return root


def import_app(app_file):
    """Import an app file the way mod_python's cgihandler does: under its own module name."""
    name = "site_app_%s" % uuid.uuid4().hex
    spec = importlib.util.spec_from_file_location(name, app_file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


@pytest.fixture
def site_app(site, monkeypatch):
    monkeypatch.delenv("TINYWEB_CONFIG")
    module = import_app(site / "htdocs" / "app.py")
    yield module.app
    del sys.modules[module.__name__]


def test_ini_beside_htdocs_is_read(site):
    config = load_config(str(site / "htdocs" / "app.py"), environ={})
    assert config.path == site / "tinyweb.ini"
    assert config.root == site
    assert config.secret == SECRET
    assert config.debug is True
    assert config.max_body == 2048
    assert config.allowed_hosts == ["example.com", "www.example.com"]
    assert config.data_dir == site / "var" / "data"
    assert config.request_timeout == 2.5
    assert config.session == {"timeout": "600"}


def test_app_finds_its_ini_from_its_own_file_not_the_cwd(site, site_app, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "tinyweb.ini").write_text("[tinyweb]\nsecret = from-the-working-directory\ndebug = no\n")
    monkeypatch.chdir(elsewhere)
    assert site_app.config.path == site / "tinyweb.ini"
    assert site_app.config.secret == SECRET
    assert Client(site_app, HTTP_HOST="www.example.com").get("/").json == {"debug": True}


def test_importing_the_app_serves_nothing(site_app):
    # app.run() at module level returned without serving: the import above came back.
    assert site_app.run() == 0


def test_tinyweb_config_names_another_file(site, tmp_path):
    other = tmp_path / "other.ini"
    other.write_text("[tinyweb]\nsecret = another-secret-of-some-length\n")
    config = load_config(str(site / "htdocs" / "app.py"), environ={"TINYWEB_CONFIG": str(other)})
    assert config.path == other
    assert config.secret == "another-secret-of-some-length"
    assert config.debug is False
    assert config.max_body == DEFAULT_MAX_BODY
    assert config.request_timeout == DEFAULT_REQUEST_TIMEOUT == 30
    assert config.data_dir == site / "data"


def test_app_arguments_win_over_the_file(site):
    config = load_config(str(site / "htdocs" / "app.py"),
                         {"debug": False, "max_body": 10, "secret": "s" * 20, "data_dir": "/srv/d",
                          "allowed_hosts": "a.example", "session": {"type": "ext:redis"},
                          "request_timeout": 0},
                         environ={})
    assert (config.debug, config.max_body, config.secret) == (False, 10, "s" * 20)
    assert config.request_timeout == 0
    assert config.data_dir == Path("/srv/d")
    assert config.allowed_hosts == ["a.example"]
    assert config.session == {"timeout": "600", "type": "ext:redis"}


def test_none_arguments_leave_the_file_alone(site):
    config = load_config(str(site / "htdocs" / "app.py"), {"debug": None, "secret": None}, environ={})
    assert (config.debug, config.secret) == (True, SECRET)


@pytest.mark.parametrize("value, debug", [("1", True), ("yes", True), ("0", False), ("", False)])
def test_tinyweb_debug_turns_debug_on(tmp_path, value, debug):
    (tmp_path / "htdocs").mkdir()
    warnings = []
    config = load_config(str(tmp_path / "htdocs" / "app.py"), environ={"TINYWEB_DEBUG": value},
                         warn=warnings.append)
    assert config.debug is debug


def test_tinyweb_debug_shows_tracebacks(monkeypatch, tmp_path):
    from tinyweb import App

    monkeypatch.setenv("TINYWEB_DEBUG", "1")
    app = App(__name__, secret=SECRET)

    @app.get("/")
    def fail(request):
        raise KeyError("in debug")

    res = Client(app).get("/", status=500, expect_errors=True)
    assert b"Traceback (most recent call last)" in res.body and b"in debug" in res.body


def test_missing_file_warns_and_serves(tmp_path, monkeypatch, capsys):
    from tinyweb import App

    missing = tmp_path / "missing.ini"
    warnings = []
    config = load_config(str(tmp_path / "htdocs" / "app.py"), environ={"TINYWEB_CONFIG": str(missing)},
                         warn=warnings.append)
    assert config.path is None and config.secret is None
    assert len(warnings) == 1 and str(missing) in warnings[0]

    monkeypatch.setenv("TINYWEB_CONFIG", str(missing))
    app = App(__name__)

    @app.get("/")
    def index(request):
        return "still serving"

    assert Client(app).get("/").body == b"still serving"
    assert "no config file at %s" % missing in capsys.readouterr().err


def test_missing_file_with_a_secret_argument_does_not_warn(tmp_path):
    warnings = []
    load_config(str(tmp_path / "htdocs" / "app.py"), {"secret": SECRET},
                environ={"TINYWEB_CONFIG": str(tmp_path / "missing.ini")}, warn=warnings.append)
    assert warnings == []


@pytest.mark.parametrize("line, key", [
    ("debug = maybe", "debug"),
    ("max_body = lots", "max_body"),
    ("max_body = -1", "max_body"),
    ("max_body = 10M", "max_body"),
    ("request_timeout = 60s", "request_timeout"),
    ("request_timeout = -1", "request_timeout"),
    ("request_timeout = inf", "request_timeout"),
    ("request_timeout = nan", "request_timeout"),
    ("request_timeout =", "request_timeout"),
])
def test_bad_values_name_the_file_and_key(tmp_path, line, key):
    ini = tmp_path / "tinyweb.ini"
    ini.write_text("[tinyweb]\nsecret = %s\n%s\n" % (SECRET, line))
    with pytest.raises(ConfigError) as caught:
        load_config(str(tmp_path / "htdocs" / "app.py"), environ={})
    assert str(ini) in str(caught.value)
    assert key in str(caught.value)


@pytest.mark.parametrize("text", [
    "no section header\n",
    "[tinyweb]\nsecret\n",
    b"[tinyweb]\nsecret = \xff\n",
])
def test_unreadable_file_is_a_config_error_naming_it(tmp_path, text):
    ini = tmp_path / "tinyweb.ini"
    if isinstance(text, bytes):
        ini.write_bytes(text)
    else:
        ini.write_text(text)
    with pytest.raises(ConfigError, match="cannot read %s" % ini):
        load_config(str(tmp_path / "htdocs" / "app.py"), environ={})


def test_bad_app_arguments(tmp_path):
    with pytest.raises(ConfigError, match="App\\(...\\): max_body = 'big'"):
        load_config(str(tmp_path / "htdocs" / "app.py"), {"max_body": "big"}, environ={})
    with pytest.raises(ConfigError, match="App\\(...\\): request_timeout = True is not a number of seconds"):
        load_config(str(tmp_path / "htdocs" / "app.py"), {"request_timeout": True}, environ={})
    with pytest.raises(ConfigError, match="unknown setting 'secrett'"):
        load_config(str(tmp_path / "htdocs" / "app.py"), {"secrett": "x"}, environ={})


def test_bad_config_is_a_500_naming_the_file(tmp_path, monkeypatch):
    from tinyweb import App

    ini = tmp_path / "tinyweb.ini"
    ini.write_text("[tinyweb]\ndebug = sometimes\n")
    monkeypatch.setenv("TINYWEB_CONFIG", str(ini))
    app = App(__name__)

    @app.get("/")
    def index(request):
        return "never"

    res = Client(app).get("/", status=500, expect_errors=True)
    assert b"Traceback" not in res.body and b"sometimes" not in res.body
    assert "%s: debug = 'sometimes' is not true or false" % ini in res.errors
