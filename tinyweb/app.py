"""The App: a WSGI callable that routes a request to its handler and returns the response."""

import sys

from tinyweb.routing import Router

__all__ = ["App"]

# Characters of a request line written in a log line; the rest is counted, not written.
MAX_LOGGED_LINE = 2000


class _LimitedInput:
    """A body stream that stops a request at ``limit`` bytes with 413.

    Used where the body has no Content-Length (a chunked upload passed on by a CGI server):
    WebOb would otherwise copy it whole, with no upper bound (webob/request.py copy_body).
    """

    def __init__(self, stream, limit):
        self._stream, self._left = stream, limit

    def _take(self, data):
        self._left -= len(data)
        if self._left < 0:
            from webob import exc

            raise exc.HTTPRequestEntityTooLarge("The request body is larger than this app accepts.")
        return data

    def read(self, size=-1):
        want = self._left + 1 if size is None or size < 0 else min(size, self._left + 1)
        return self._take(self._stream.read(want))

    def readline(self, size=-1):
        want = self._left + 1 if size is None or size < 0 else min(size, self._left + 1)
        return self._take(self._stream.readline(want))

    def __iter__(self):
        return iter(self.readline, b"")


class App:
    """A tinyweb application: routes, settings, and the WSGI entry point."""

    def __init__(self, import_name="__main__", **settings):
        self.import_name = import_name
        self.router = Router()
        self._settings = settings
        self._config = None

    # -- routes ---------------------------------------------------------------------------

    def route(self, pattern, methods=("GET",), name=None):
        """Register the decorated function as the handler of ``pattern`` for ``methods``."""

        def decorator(handler):
            self.router.add(pattern, handler, methods, name)
            return handler

        return decorator

    def get(self, pattern, name=None):
        return self.route(pattern, ("GET",), name)

    def post(self, pattern, name=None):
        return self.route(pattern, ("POST",), name)

    def put(self, pattern, name=None):
        return self.route(pattern, ("PUT",), name)

    def delete(self, pattern, name=None):
        return self.route(pattern, ("DELETE",), name)

    # -- settings -------------------------------------------------------------------------

    @property
    def app_file(self):
        module = sys.modules.get(self.import_name)
        return getattr(module, "__file__", None)

    @property
    def config(self):
        """The app's Config, read from tinyweb.ini on first use."""
        if self._config is None:
            from tinyweb.config import load_config

            self._config = load_config(self.app_file, self._settings)
        return self._config

    # -- serving --------------------------------------------------------------------------

    def run(self, argv=None):
        """Serve through the gateway this process was started for; do nothing when imported."""
        from tinyweb.runners import run

        is_main = self.import_name == "__main__"
        status = run(self, argv=argv, is_main=is_main)
        if is_main and status:
            raise SystemExit(status)
        return status

    def __call__(self, environ, start_response):
        from tinyweb.request import Request

        environ.setdefault("tinyweb.mode", "wsgi")
        environ["tinyweb.app"] = self
        request = Request(environ)
        response = self._respond(request)
        prefix = _own_origin(environ)

        def checked_start_response(status, headers, exc_info=None):
            # WebOb makes every Location absolute from the Host header (which nginx's
            # fastcgi_params passes without the port, and a client may forge); a
            # same-origin redirect is sent as a path, which RFC 9110 allows.
            headers = [
                (k, _relative_location(v, prefix)) if k.lower() == "location" else (k, v)
                for k, v in headers
            ]
            return start_response(status, headers, exc_info)

        body = response(environ, checked_start_response)
        if "tinyweb.after_response" not in environ:
            # No gateway of ours owns the moment after the response: the server's close().
            # Wrapped even with no task queued yet: a generator handler defers while the
            # server iterates its body, after this returns.
            from tinyweb.deferred import AtClose

            tasks = environ.setdefault("tinyweb.deferred_at_close", [])
            return AtClose(body, tasks, environ.get("wsgi.errors"))
        return body

    def _respond(self, request):
        from webob import exc

        from tinyweb import responses
        from tinyweb.config import ConfigError
        from tinyweb.sessions import SessionStoreError

        environ = request.environ
        try:
            try:
                response = self._dispatch(request)
            except exc.HTTPException as error:
                response = error.wsgi_response
                if response.status_code >= 400 and response.status_code not in (404, 405):
                    # Bad input is the client's mistake, but the operator should see it (an
                    # unknown path or method is the access log's business).
                    detail = getattr(response, "detail", None) or response.status
                    self._log(environ, "%s on %s: %s" % (response.status_code, _request_line(environ), detail))
            session = environ.get("tinyweb.session")
            if session is not None:
                from tinyweb.sessions import save_session

                save_session(session, response)
            from tinyweb.representation import finish

            response = finish(request, response)
            responses.check_headers(response.headerlist)
            return response
        except SessionStoreError as error:
            from tinyweb.deferred import drop

            # A 503 asks the client to try again: the tasks would run once more then.
            self._log(environ, "503 on %s%s: %s" % (_request_line(environ), drop(environ), error))
            return exc.HTTPServiceUnavailable("The session store is unavailable; try again later.")
        except Exception as error:
            import traceback

            from tinyweb.deferred import drop

            text = traceback.format_exc()
            dropped = drop(environ)
            self._log(environ, "500 on %s%s\n%s" % (_request_line(environ), dropped, text.rstrip()))
            debug = False
            if not isinstance(error, ConfigError):
                try:
                    debug = self.config.debug
                except ConfigError:
                    pass
            return responses.error_page(text if debug else None, _request_id(environ))

    def _dispatch(self, request):
        from webob import exc

        from tinyweb.responses import to_response

        environ = request.environ
        config = self.config
        _check_host(environ, config.allowed_hosts)
        _check_body(environ, config.max_body)
        try:
            path = environ.get("PATH_INFO", "").encode("latin-1").decode("utf-8")
        except UnicodeError:
            raise exc.HTTPBadRequest("The path is not valid UTF-8.")
        route, params = self.router.match(environ["REQUEST_METHOD"].upper(), path or "/")
        value = route.handler(request, **params)
        return to_response(request, route.handler, value)

    @staticmethod
    def _log(environ, text):
        stream = environ.get("wsgi.errors") or sys.stderr
        line = "tinyweb[%s]: %s\n" % (_request_id(environ), text)
        try:
            stream.write(line)
            getattr(stream, "flush", lambda: None)()
        except (OSError, ValueError):
            if stream is not sys.stderr:  # the server's error stream is gone: ours, then
                try:
                    sys.stderr.write(line)
                except (OSError, ValueError):
                    pass


def _request_id(environ):
    """Return the id that ties this request's log lines to the error page the client saw."""
    rid = environ.get("tinyweb.request_id")
    if rid is None:
        import binascii
        import os

        rid = environ["tinyweb.request_id"] = binascii.hexlify(os.urandom(6)).decode()
    return rid


def _request_line(environ):
    """Return "METHOD /path?query" for a log line, the path quoted as it came on the wire."""
    from urllib.parse import quote

    path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
    # Quoted, so a CR, LF or escape sequence in a path cannot forge a line in the log.
    path = quote(path.encode("latin-1", "replace"), safe="/:@!$&'()*+,;=~")
    query = quote(environ.get("QUERY_STRING", ""), safe="/:@!$&'()*+,;=~%?")
    method = quote(environ.get("REQUEST_METHOD", "?"), safe="")
    line = "%s %s%s" % (method, path, "?" + query if query else "")
    if len(line) > MAX_LOGGED_LINE:
        # A 414 for a 200k-field query string must not write megabytes to the error log.
        line = "%s... (%d characters)" % (line[:MAX_LOGGED_LINE], len(line))
    return line


def _own_origin(environ):
    # The origin webob.Response._make_location_absolute builds a relative Location from.
    scheme = environ.get("wsgi.url_scheme", "http")
    host = environ.get("HTTP_HOST") or "%s:%s" % (
        environ.get("SERVER_NAME", ""), environ.get("SERVER_PORT", ""))
    origin = "%s://%s" % (scheme, host)
    if scheme == "http" and origin.endswith(":80") or scheme == "https" and origin.endswith(":443"):
        origin = origin.rsplit(":", 1)[0]
    return origin


def _relative_location(location, origin):
    """Return ``location`` as a path when it points into ``origin``, else unchanged."""
    if not location.startswith(origin + "/"):
        return location
    path = location[len(origin):]
    # "http://host//evil.example/" (from "/a/..//evil.example" or ".//evil.example") is
    # on this host, but as a path a browser reads "//evil.example" and "/\evil.example" as
    # another host (WHATWG URL: a backslash is a slash in http URLs): those stay absolute.
    if path[1:2] in ("/", "\\"):
        return location
    return path


def _check_host(environ, allowed):
    if not allowed:
        return
    host = environ.get("HTTP_HOST") or environ.get("SERVER_NAME", "")
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    if name.lower() not in allowed:
        from webob import exc

        raise exc.HTTPBadRequest("This host name is not served here.")


def _check_body(environ, limit):
    """Refuse a body over ``limit`` before anything reads it (413), or bound an unsized one."""
    from webob import exc

    length = environ.get("CONTENT_LENGTH", "")
    if length:
        # RFC 9110 §8.6: 1*DIGIT, ASCII only; str.isdigit() also takes "²", which int() refuses.
        if not (length.isascii() and length.isdigit()):
            raise exc.HTTPBadRequest("Content-Length is not a number.")
        if int(length) > limit:
            raise exc.HTTPRequestEntityTooLarge("The request body is larger than this app accepts.")
    elif environ.get("wsgi.input_terminated") and "wsgi.input" in environ:
        environ["wsgi.input"] = _LimitedInput(environ["wsgi.input"], limit)
