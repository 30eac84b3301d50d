"""Open a request's Beaker session with safe defaults, and save it when the handler changed it.

Beaker is imported only here, and only when a handler first touches ``request.session``.
With the default file store, a save writes only what this request changed over what is
stored at that moment, under the session's lock; one save in CLEANUP_EVERY also sweeps a
bounded part of the store for sessions unused for their lifetime.
"""

import os
import re

__all__ = ["open_session", "save_session", "SessionStoreError", "COOKIE_NAME"]

COOKIE_NAME = "tinyweb_session"

# A save waits this long (seconds) for another request's save of the same session, then
# gives up with a 503 rather than hold a worker.
LOCK_TIMEOUT = 10.0
# Without a [session] timeout, a session file neither changed nor read for this long is
# swept away (a timeout replaces it, plus the 2 minutes Beaker itself adds, session.py:186-191).
DEFAULT_LIFETIME = 30 * 24 * 3600
# Reading a session whose file is older than this re-stamps the file (and its lock file),
# so a session that is only read stays alive; once a day at most, not on every read.
TOUCH_AFTER = 24 * 3600
# One save in CLEANUP_EVERY sweeps the store (session_sweep.py), like PHP's
# session.gc_probability.
CLEANUP_EVERY = 100

# Beaker's signed cookie is 40 hex digits of HMAC-SHA1 followed by the id, and its ids are
# uuid4().hex. Anything else never reaches Beaker: its file store turns the raw id into a
# file name (beaker#248: "..poc" climbed a directory; 300 characters or a NUL gave a 500).
_SIGNED_ID = re.compile(r"^[0-9a-f]{40}[0-9a-f]{32}$")
# What Session.clear() (and so delete()) leaves in an emptied session (session.py:81-91).
_CONFIG_KEYS = {"_domain", "_path"}


class SessionStoreError(RuntimeError):
    """The session store cannot be used (data dir missing, unwritable, disk full, locked)."""


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
    """Return {key: JSON text} of the session's data, to tell at the end which keys changed."""
    import json  # here, not at the top: every request imports this module for its errors

    texts = {}
    for key, value in session.items():
        if key == "_accessed_time":  # Beaker restamps it on every load (session.py:467)
            continue
        try:
            texts[key] = json.dumps(value, sort_keys=True, default=repr)
        except (TypeError, ValueError):
            texts[key] = repr(value)
    return texts


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
        raise SessionStoreError("cannot create the session directory %s: %s; %s"
                                % (path, exc.strerror, _ownership_advice(path)))
    if not os.access(path, os.W_OK | os.X_OK):
        raise SessionStoreError(
            "the session directory %s is not writable by uid %d: make the data dir belong to "
            "the user the app runs as (`tinyweb new DIR --user www-data`)" % (path, os.getuid())
        )


def _ownership_advice(path):
    return ("the data dir and everything in it must belong to uid %d, which the app runs as "
            "(`chown -R` it), on a writable file system" % os.geteuid())


def _store_error(doing, exc, store):
    """Return a SessionStoreError for ``exc`` naming the directory and what to do about it."""
    import errno

    # The directory, not the file: a session file's name is the session id.
    where = os.path.dirname(exc.filename) if isinstance(exc.filename, str) else store
    text = "cannot %s%s: %s" % (doing, " in %s" % where if where else "", exc.strerror or exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        text += "; the disk is full or the process may not write files this large (ulimit -f)"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and store:
        text += "; " + _ownership_advice(store)
    return SessionStoreError(text)


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
        # Beaker's load waits for the session's shared flock with no timeout
        # (synchronization.py:257); only saves hold it exclusively, each for one file write.
        session = Session(beaker_request, **options)
        if options["type"] == "file" and not session.is_new and session.timeout is None:
            _keep_alive(session)
    except OSError as exc:
        raise _store_error("read a session", exc, options["data_dir"])
    session._tinyweb = (beaker_request, session.id, _snapshot(session), beaker_request.get("cookie_out"))
    return session


def _keep_alive(session):
    # tinyweb writes a session only when it changed, so a file's age is its idle time only
    # if reads re-stamp it too; the sweep goes by that age.
    import time

    namespace = session.namespace
    try:
        if time.time() - os.stat(namespace.file).st_mtime > TOUCH_AFTER:
            os.utime(namespace.file)
            os.utime(namespace.access_lock.filename)
    except OSError:
        pass  # removed meanwhile (a logout, the sweep), or not ours: a read still succeeds


def save_session(session, response):
    """Persist ``session`` if the handler changed it, and send its cookie when that changed."""
    beaker_request, first_id, first, first_cookie = session._tinyweb
    now = _snapshot(session)
    if session.id == first_id and now == first:
        return
    import json

    # Checked before saving: Beaker opens the store file for replacing before it serialises,
    # so a value JSON refuses would leave the stored session emptied.
    for key, value in session.items():
        try:
            json.dumps({key: value})
        except (TypeError, ValueError) as exc:
            raise TypeError("session[%r] cannot be stored: session values must be "
                            "JSON-serialisable (%s)" % (key, exc))
    try:
        if session.type == "file":
            _merge_save(session, first if session.id == first_id else {}, now)
            if session.id != first_id:
                # regenerate_id() and invalidate() keep or drop the data under a new id, and
                # Beaker leaves the old file behind: whoever planted or stole the old id must
                # not keep a copy. Removed once the new one is saved, so a failed save
                # loses nothing.
                _remove(_namespace(session, first_id))
        else:
            # Other backends (ext:redis, ...) have no lock across processes (their access
            # lock is a null_synchronizer): Beaker's whole-session save, last writer wins.
            old = getattr(session, "namespace", None)
            if session.id != first_id and old is not None and old.namespace == first_id:
                old.remove()
            session.save()
    except OSError as exc:
        raise _store_error("save a session", exc, session.data_dir)
    if session.type == "file" and _one_in(CLEANUP_EVERY):
        from tinyweb.session_sweep import sweep

        lifetime = DEFAULT_LIFETIME if session.timeout is None else session.timeout + 120
        try:
            sweep(session, lifetime)
        except OSError:
            pass  # the sweep is housekeeping: a request never fails for it; the next one retries
    # A new session, regenerate_id(), invalidate() and delete() (an expired cookie, so the
    # browser forgets it) each leave Beaker a new cookie to send.
    cookie = beaker_request.get("cookie_out")
    if cookie and (session.is_new or cookie != first_cookie):
        response.headers.add("Set-Cookie", cookie.strip())


# --- Saving under the session's lock ------------------------------------------------------
#
# Beaker's file store is last-writer-wins: load() copies the stored dict under a shared
# flock and lets go (session.py:422-472); save() rewrites the whole dict under an exclusive
# one (session.py:498-513). Parallel requests of one user, each setting its own key, lose all
# but one key (bad-inputs.md row 28; beaker#9). tinyweb merges on save instead: under the
# session's exclusive flock it re-reads what is stored, applies the keys this request set,
# changed or deleted, and writes. All keys land, and no lock is held while a handler runs, so
# a user's requests do not queue behind one another, a handler that raises or a generator
# that touches the session late can leave no lock behind, and a request that was in flight
# when another deleted the session (logout) cannot bring the deleted data back. The price:
# two requests that change the same key keep the last one's value (a counter bumped by
# parallel requests can lose a bump), as with Beaker alone.
#
# The lock is Beaker's own lock file for the session (FileNamespaceManager.get_access_lock,
# container.py:650), an OS-level flock that threads, prefork workers and CGI processes all
# share; taken without blocking and retried until LOCK_TIMEOUT, since Beaker's blocking
# acquire has no timeout (synchronization.py:271).


def _namespace(session, session_id):
    # As Session.save() makes it (session.py:491-496).
    return session.namespace_class(session_id, data_dir=session.data_dir,
                                   digest_filenames=False, **session.namespace_args)


def _lock(synchronizer):
    """Take ``synchronizer``'s exclusive lock, or raise SessionStoreError after LOCK_TIMEOUT."""
    import time

    deadline = time.monotonic() + LOCK_TIMEOUT
    pause = 0.001
    while not synchronizer.acquire_write_lock(wait=False):
        if time.monotonic() >= deadline:
            raise SessionStoreError(
                "a session stayed locked by another request for more than %g s (lock file %s): "
                "a process may be stuck writing in %s"
                % (LOCK_TIMEOUT, synchronizer.filename, os.path.dirname(synchronizer.filename)))
        time.sleep(pause)
        pause = min(pause * 2, 0.02)


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _remove(namespace):
    """Remove a session's file under its lock."""
    synchronizer = namespace.access_lock
    _lock(synchronizer)
    try:
        _unlink(namespace.file)
    finally:
        synchronizer.release_write_lock()


def _merge_save(session, base, now):
    """Write the keys that differ between ``base`` and ``now`` over what is stored now."""
    import time

    namespace = _namespace(session, session.id)
    synchronizer = namespace.access_lock
    _lock(synchronizer)
    try:
        if set(session) <= _CONFIG_KEYS:
            # delete() or clear(): the session ends, including keys another request added.
            _unlink(namespace.file)
            return
        try:
            namespace.acquire_write_lock()  # re-entrant in this thread: reads the stored file
        except OSError:
            raise
        except Exception:  # a corrupt container; Session.load() would invalidate it
            namespace.acquire_write_lock(replace=True)
        try:
            stored = {}
            if "session" in namespace:
                try:
                    stored = dict(session._decrypt_data(namespace["session"]))
                except Exception:  # corrupt or forged data: replaced, as on load
                    stored = {}
            for key in base:
                if key not in now:
                    stored.pop(key, None)
            for key, text in now.items():
                if base.get(key) != text:
                    stored[key] = session[key]
            stored["_accessed_time"] = session.get("_accessed_time") or time.time()
            stored.setdefault("_creation_time", session.get("_creation_time", stored["_accessed_time"]))
            namespace["session"] = session._encrypt_data(stored)
        finally:
            try:
                # Writes <file>.temp and renames it over the file (container.py:678-681,
                # util.py:442-448); a failed write (ENOSPC, EFBIG) leaves the old file whole
                # but the temp file behind, removed here while the lock is still ours.
                namespace.release_write_lock()
            except OSError:
                _unlink(namespace.file + ".temp")
                raise
        # The lock file's age says when the session was last used, for the sweep.
        os.utime(synchronizer.filename)
    finally:
        synchronizer.release_write_lock()


def _one_in(n):
    return n <= 1 or int.from_bytes(os.urandom(4), "little") % n == 0
