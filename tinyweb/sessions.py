"""Open a request's Beaker session with safe defaults, and save it when the handler changed it.

Beaker is imported only here, and only when a handler first touches ``request.session``.
"""

import os
import re

__all__ = ["open_session", "save_session", "SessionStoreError", "COOKIE_NAME"]

COOKIE_NAME = "tinyweb_session"

# Beaker's signed cookie is 40 hex digits of HMAC-SHA1 followed by the id, and its ids are
# uuid4().hex. Anything else never reaches Beaker: its file store turns the raw id into a
# file name (beaker#248: "..poc" climbed a directory; 300 characters or a NUL gave a 500).
_SIGNED_ID = re.compile(r"^[0-9a-f]{40}[0-9a-f]{32}$")


class SessionStoreError(RuntimeError):
    """The session store cannot be used (data dir missing, unwritable, disk full)."""


def _cookie_value(header, name):
    # Pick our one cookie out by hand rather than give Beaker the whole header: Python's
    # cookie parser is quadratic on backslashes (CVE-2024-7592) and drops every cookie when
    # another site's cookie on the same host is malformed.
    for part in header.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            return value.strip().strip('"')
    return None


def _snapshot(session):
    import json  # here, not at the top: every request imports this module for its errors

    data = {k: v for k, v in session.items() if k != "_accessed_time"}
    try:
        return json.dumps(data, sort_keys=True, default=repr)
    except (TypeError, ValueError):
        return repr(sorted(data.items(), key=lambda kv: str(kv[0])))


def _session_options(config, request):
    options = {
        "type": "file",
        "data_dir": str(config.data_dir / "sessions"),
        "key": COOKIE_NAME,
        "timeout": None,
    }
    options.update(config.session)
    from beaker.util import coerce_session_params

    try:
        options = coerce_session_params(options)
    except Exception as exc:  # Beaker raises a bare Exception for a bad option (util.py)
        from tinyweb.config import ConfigError

        where = config.path or (config.root / "tinyweb.ini")
        raise ConfigError("%s: [session] %s" % (where, exc))
    # These are not left to the config file: pickle from a store or cookie a client can
    # reach is code execution (CVE-2013-7489); a corrupt or forged session is a new one.
    options.update(
        secret=config.require_secret(),
        data_serializer="json",
        invalidate_corrupt=True,
        httponly=True,
        samesite="Lax",
        secure=request.scheme == "https",
        cookie_path=request.environ.get("SCRIPT_NAME") or "/",
    )
    if options.get("type") == "cookie":
        # Cookie-only sessions put the data in the client's hands; not offered.
        from tinyweb.config import ConfigError

        raise ConfigError("[session] type = cookie is not supported: use file (default) or ext:*")
    return options


def _ensure_dir(path):
    # Beaker's file store pickles its container (container.py) whatever the serializer: the
    # data dir must be private to the app's user, so every level made here is 0700.
    try:
        if not os.path.isdir(path):
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            os.mkdir(path, 0o700)
    except FileExistsError:
        pass  # made meanwhile by a concurrent request
    except OSError as exc:
        raise SessionStoreError("cannot create the session directory %s: %s" % (path, exc.strerror))
    if not os.access(path, os.W_OK | os.X_OK):
        raise SessionStoreError(
            "the session directory %s is not writable by uid %d: make the data dir belong to "
            "the user the app runs as (`tinyweb new DIR --user www-data`)" % (path, os.getuid())
        )


def open_session(request, config):
    """Load the session named by the request's cookie, or start a fresh one."""
    from beaker.session import Session

    options = _session_options(config, request)
    if options["type"] == "file":
        _ensure_dir(options["data_dir"])
    value = _cookie_value(request.environ.get("HTTP_COOKIE", ""), options["key"])
    beaker_request = {}
    if value and _SIGNED_ID.match(value):
        beaker_request["cookie"] = "%s=%s" % (options["key"], value)
    try:
        session = Session(beaker_request, **options)
    except OSError as exc:
        raise SessionStoreError("cannot read the session store: %s" % exc)
    session._tinyweb = (beaker_request, session.id, _snapshot(session), beaker_request.get("cookie_out"))
    return session


def save_session(session, response):
    """Persist ``session`` if the handler changed it, and send its cookie when that changed."""
    beaker_request, first_id, first, first_cookie = session._tinyweb
    if session.id == first_id and _snapshot(session) == first:
        return
    import json

    # Checked before save(): Beaker opens the store file for replacing before it serialises,
    # so a value JSON refuses would leave the stored session emptied.
    for key, value in session.items():
        try:
            json.dumps({key: value})
        except (TypeError, ValueError) as exc:
            raise TypeError("session[%r] cannot be stored: session values must be "
                            "JSON-serialisable (%s)" % (key, exc))
    old = getattr(session, "namespace", None)
    try:
        if session.id != first_id and old is not None and old.namespace == first_id:
            # regenerate_id() keeps the data under a new id, and Beaker leaves the old file
            # behind: whoever planted or stole the old id must not keep a copy.
            old.acquire_write_lock()
            try:
                old.remove()
            finally:
                old.release_write_lock()
        session.save()
    except OSError as exc:
        raise SessionStoreError("cannot save the session: %s" % exc)
    # A new session, regenerate_id(), invalidate() and delete() (an expired cookie, so the
    # browser forgets it) each leave Beaker a new cookie to send.
    cookie = beaker_request.get("cookie_out")
    if cookie and (session.is_new or cookie != first_cookie):
        response.headers.add("Set-Cookie", cookie.strip())
