"""Fixtures for the tests that run the app under real web servers (see servers.py)."""

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import servers  # noqa: E402

CHECKOUT = Path(__file__).resolve().parent.parent


@pytest.fixture
def client(app):
    """A WebTest client of the test module's ``app`` fixture."""
    from helpers import Client

    return Client(app)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "real_server: runs the app under a real Apache/nginx/FastCGI server (needs root)"
    )


def unavailable(what: str):
    """Skip for a missing server piece; on CI (``CI`` set) it is a failure instead."""
    if os.environ.get("CI"):
        pytest.fail("CI is set and %s" % what, pytrace=False)
    pytest.skip(what)


def _require_root_and_user():
    if os.geteuid() != 0:
        unavailable("the real-server tests must run as root (servers switch to %s)"
                    % servers.SERVER_USER)
    try:
        import pwd
        pwd.getpwnam(servers.SERVER_USER)
    except KeyError:
        unavailable("there is no user %s" % servers.SERVER_USER)


@pytest.fixture(scope="session")
def checkout() -> Path:
    return CHECKOUT


@pytest.fixture(scope="session")
def venv(checkout) -> servers.Venv:
    """A venv from /usr/bin/python3 with the checkout installed (not editable), cached."""
    _require_root_and_user()
    try:
        return servers.build_venv(checkout)
    except servers.ServerUnavailable as exc:
        missing = str(exc)
    unavailable(missing)


def _keep_logs(server: servers.Server, tmp_path_factory) -> Path:
    """Copy the server's logs into pytest's tmp dir, where they outlive the run tree."""
    dest = tmp_path_factory.mktemp("logs-" + server.name.replace("+", "-"))
    for log in server.logs:
        if log.exists():
            shutil.copy2(log, dest / ("%s-%s" % (log.parent.parent.name, log.name)))
    return dest


def _discard(server: servers.Server) -> None:
    if not os.environ.get("TINYWEB_TESTS_KEEP"):
        shutil.rmtree(server.workdir, ignore_errors=True)


def start_or_skip(start, *args, **kwargs) -> servers.Server:
    """Call ``start``; a missing binary or module skips (fails on CI)."""
    _require_root_and_user()
    try:
        return start(*args, **kwargs)
    except servers.ServerUnavailable as exc:
        missing = str(exc)
    unavailable(missing)  # outside the except: no chained traceback in the report


@pytest.fixture(scope="module", params=[pytest.param(v, marks=pytest.mark.real_server)
                                        for v in servers.VARIANTS])
def server(request, venv, checkout, tmp_path_factory):
    """The demo site (htdocs/) served at /app.py by each server variant, one per module."""
    started = start_or_skip(servers.start_variant, request.param, venv, checkout / "htdocs")
    yield started
    started.stop()
    _keep_logs(started, tmp_path_factory)
    _discard(started)


@pytest.fixture
def make_server(tmp_path_factory):
    """Start servers with a servers.start_* function; each is stopped after the test."""
    started = []

    def make(start, *args, **kwargs):
        srv = start_or_skip(start, *args, **kwargs)
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()
        _keep_logs(srv, tmp_path_factory)
        _discard(srv)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    item._server_log_sizes = {
        name: value.log_size()
        for name, value in getattr(item, "funcargs", {}).items()
        if isinstance(value, servers.Server)
    }
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    sizes = getattr(item, "_server_log_sizes", {})
    for name, value in getattr(item, "funcargs", {}).items():
        if isinstance(value, servers.Server):
            text = value.log_since(sizes.get(name, {})) or "(nothing new in the logs)"
            report.sections.append(("server logs during the test: %s" % value.name, text[-12000:]))
