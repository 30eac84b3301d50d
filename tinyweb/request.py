"""The request a handler gets: a webob.Request with the app's response, session and url_for."""

from urllib.parse import quote

import webob
from webob import exc
from webob.request import DisconnectionError

__all__ = ["Request", "Response"]

# What WebOb and the stdlib parsers raise on hostile or broken input (notes/dependencies.md
# §1.2): these are the client's fault and become a 400, never a 500.
_BAD_INPUT = (UnicodeError, LookupError, ValueError, DeprecationWarning, IOError)


class Response(webob.Response):
    """A webob.Response with no content type until one is chosen.

    The type then follows what the handler returns (str: HTML, bytes: octet-stream, dict:
    JSON) unless the handler set one itself on ``request.response``.
    """

    default_content_type = None
    #: Set to False to send this response uncompressed even to clients that accept gzip.
    compress = True


class Request(webob.Request):
    """A webob.Request that knows its app; everything it holds lives in ``environ``."""

    ResponseClass = Response

    @property
    def app(self):
        return self.environ["tinyweb.app"]

    @property
    def response(self):
        """The response a ``str``, ``dict`` or tuple returned by the handler is put into."""
        response = self.environ.get("tinyweb.response")
        if response is None:
            response = self.environ["tinyweb.response"] = Response()
        return response

    @property
    def session(self):
        """The Beaker session, loaded from its cookie the first time it is touched."""
        session = self.environ.get("tinyweb.session")
        if session is None:
            from tinyweb.sessions import open_session

            session = self.environ["tinyweb.session"] = open_session(self, self.app.config)
        return session

    def defer(self, func, *args, **kwargs):
        """Run ``func(*args, **kwargs)`` after the whole response has reached the client.

        The task must not touch the request or its session. Raises TooManyTasks past the
        per-process bound of pending tasks; a task that raises is logged with its traceback.
        """
        from tinyweb.deferred import defer

        defer(self.environ, func, args, kwargs)

    def url_for(self, name, **params):
        """Return the path of the route ``name``, below the script's own path (SCRIPT_NAME)."""
        script = self.environ.get("SCRIPT_NAME", "")
        script = quote(script.encode("latin-1"), safe="/") if script else ""
        return script + self.app.router.build(name, params)

    @property
    def GET(self):
        try:
            return webob.Request.GET.fget(self)
        except _BAD_INPUT:
            raise exc.HTTPBadRequest("The query string is malformed or not UTF-8.")

    @property
    def POST(self):
        try:
            return webob.Request.POST.fget(self)
        except exc.HTTPException:
            raise
        except _BAD_INPUT:
            raise exc.HTTPBadRequest("The request body is malformed or not in the declared encoding.")

    params = property(lambda self: webob.multidict.NestedMultiDict(self.GET, self.POST))

    @property
    def body(self):
        try:
            return webob.Request.body.fget(self)
        except DisconnectionError:
            # Content-Length promised more than the client sent before it hung up.
            raise exc.HTTPBadRequest("The request body ended before its Content-Length.")

    @body.setter
    def body(self, value):
        webob.Request.body.fset(self, value)

    @body.deleter
    def body(self):
        webob.Request.body.fdel(self)

    @property
    def json(self):
        """The body parsed as JSON; 400 when it is not JSON in the declared charset."""
        import json  # here, not at the top: a CGI hello never loads it (runners/oneshot.py)

        body = self.body
        try:
            return json.loads(body.decode(self.charset))
        except (UnicodeError, LookupError, ValueError):
            raise exc.HTTPBadRequest("The request body is not valid JSON.")

    @json.setter
    def json(self, value):
        webob.Request.json.fset(self, value)

    @json.deleter
    def json(self):
        del self.body

    json_body = json
