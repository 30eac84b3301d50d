"""The request a handler gets: a webob.Request with the app's response, session and url_for.

Its query string and form body are checked against limits (forms.py) before WebOb parses them.
"""

from urllib.parse import quote

import webob
from webob import exc
from webob.request import DisconnectionError

from tinyweb import forms
from tinyweb.forms import MAX_FIELDS

__all__ = ["Request", "Response"]

# What WebOb and the stdlib parsers raise on hostile or broken input (notes/dependencies.md
# §1.2): these are the client's fault and become a 400, never a 500. Not OSError at large:
# EMFILE or ENOSPC while a form is spooled is the server's fault, a 500 with its traceback.
_BAD_INPUT = (UnicodeError, LookupError, ValueError, DeprecationWarning)
# The client hung up before the body it announced was read (a DisconnectionError is an IOError).
_BODY_CUT = (DisconnectionError, ConnectionError)
_BODY_CUT_MESSAGE = "The request body ended before its Content-Length."



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
        """The query string's fields; 400 when it is not UTF-8, 414 past MAX_FIELDS."""
        query = self.environ.get("QUERY_STRING", "")
        # WebOb splits the query on "&" and ";" (webob/compat.py parse_qsl_text); the same
        # upper bound as parse_qsl's max_num_fields, which counts the separators.
        if query.count("&") + query.count(";") >= MAX_FIELDS:
            raise exc.HTTPRequestURITooLong("The query string has more than %d fields." % MAX_FIELDS)
        try:
            return webob.Request.GET.fget(self)
        except _BAD_INPUT:
            raise exc.HTTPBadRequest("The query string is malformed or not UTF-8.")

    @property
    def POST(self):
        """The form fields of the body; 400 when it is malformed, 413 past the form limits."""
        parsed = self.environ.get("webob._parsed_post_vars")
        if parsed is not None and parsed[1] is self.body_file_raw:
            return parsed[0]  # parsed, and checked, before (webob/request.py POST)
        try:
            syntax = self._check_form()
            form = webob.Request.POST.fget(self)
            if syntax == forms.URLENCODED and forms.replaced(form):
                forms.check_utf8_urlencoded(self.body)
        except exc.HTTPException:
            raise
        except _BODY_CUT:
            raise exc.HTTPBadRequest(_BODY_CUT_MESSAGE)
        except _BAD_INPUT:
            raise exc.HTTPBadRequest("The request body is malformed or not in the declared encoding.")
        return form

    def _check_form(self):
        """Refuse a form body WebOb is about to parse when it is over a limit or would be misread.

        Return the syntax cgi.FieldStorage will read the body in (None: it reads no body).
        """
        content_type = self.content_type
        # The bodies webob.Request.POST hands to cgi.FieldStorage, which reads none for GET
        # and HEAD (it parses QUERY_STRING, which WebOb empties, instead).
        if content_type not in ("", forms.URLENCODED, forms.MULTIPART):
            return None
        if self.method != "POST" and not content_type:
            return None
        if self.charset != "UTF-8":
            # WebOb raises DeprecationWarning here (Request._check_charset).
            raise exc.HTTPBadRequest("Forms are accepted in UTF-8 only.")
        if self.method in ("GET", "HEAD"):
            return None
        if content_type != forms.MULTIPART:
            # cgi.FieldStorage splits on "&" only (parse_qsl's separator); an empty type is
            # read as urlencoded too when CONTENT_TYPE is missing.
            if self.body.count(b"&") >= MAX_FIELDS:
                raise exc.HTTPRequestEntityTooLarge("The form has more than %d fields." % MAX_FIELDS)
            return forms.URLENCODED
        boundary = forms.boundary(self.environ.get("CONTENT_TYPE", ""))
        self.make_body_seekable()
        data = forms.mapped(self.body_file_raw, self.content_length or 0)
        try:
            forms.check_multipart(data, boundary)
        finally:
            if not isinstance(data, bytes):
                data.close()
        return forms.MULTIPART

    params = property(lambda self: webob.multidict.NestedMultiDict(self.GET, self.POST))

    @property
    def body(self):
        try:
            return webob.Request.body.fget(self)
        except _BODY_CUT:
            # Content-Length promised more than the client sent before it hung up.
            raise exc.HTTPBadRequest(_BODY_CUT_MESSAGE)

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
