"""Turn what a handler returns into a response, and build the 500 page."""

import re

import webob

__all__ = ["to_response", "error_page", "check_headers", "HeaderError"]

_HTML = "text/html"
_JSON = "application/json"
_OCTETS = "application/octet-stream"

# RFC 9110 field-name token, and a value without control characters but HTAB (§5.5): WebOb's
# plain header assignment, flup and wsgiref all pass CR/LF through (response splitting).
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class HeaderError(ValueError):
    """A handler set a header whose name or value could split the response."""


def _name(handler):
    return "%s.%s" % (getattr(handler, "__module__", "?"), getattr(handler, "__qualname__", handler))


def _set_body(response, value, handler):
    if isinstance(value, str):
        if response.content_type is None:
            response.content_type = _HTML
        if not response.charset:
            response.charset = "utf-8"
        response.body = value.encode(response.charset)
    elif isinstance(value, (bytes, bytearray, memoryview)):
        if response.content_type is None:
            response.content_type = _OCTETS
        response.body = bytes(value)
    elif isinstance(value, (dict, list)):
        import json  # here, not at the top: a CGI hello never loads it (runners/oneshot.py)

        if response.content_type is None:
            response.content_type = _JSON
        response.body = json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    else:
        raise TypeError(
            "handler %s returned a %s as a body: return str, bytes, dict or list"
            % (_name(handler), type(value).__name__)
        )


class _Chunks:
    """Encode the str chunks of a streamed body as UTF-8, and pass close() on."""

    def __init__(self, iterable, handler):
        self._iterable = iterable
        self._iterator = iter(iterable)
        self._handler = handler

    def __iter__(self):
        return self

    def __next__(self):
        chunk = next(self._iterator)
        if isinstance(chunk, str):
            return chunk.encode("utf-8")
        if isinstance(chunk, bytes):
            return chunk
        # Left to the gateway, this is an assertion deep in wsgiref or flup that names no one.
        raise TypeError(
            "handler %s yielded a %s: a streamed body is made of str or bytes chunks"
            % (_name(self._handler), type(chunk).__name__)
        )

    def close(self):
        close = getattr(self._iterable, "close", None)
        if close is not None:
            close()


def to_response(request, handler, value):
    """Return the webob.Response for a handler's return value, or raise TypeError naming it."""
    if isinstance(value, webob.Response):
        return value
    response = request.response
    if isinstance(value, tuple):
        if len(value) not in (2, 3):
            raise TypeError(
                "handler %s returned a tuple of %d: return (body, status) or (body, status, headers)"
                % (_name(handler), len(value))
            )
        body, status = value[0], value[1]
        response.status = status
        headers = value[2] if len(value) == 3 else ()
        for name, header in (headers.items() if hasattr(headers, "items") else headers):
            if name.lower() == "content-type":
                response.content_type = None
                response.headers["Content-Type"] = header
            else:
                response.headers[name] = header
        _set_body(response, body, handler)
        return response
    if isinstance(value, (str, bytes, bytearray, memoryview, dict, list)):
        _set_body(response, value, handler)
        return response
    if value is not None and hasattr(value, "__iter__"):
        if response.content_type is None:
            response.content_type = _HTML
            response.charset = "utf-8"
        response.app_iter = _Chunks(value, handler)
        # nginx buffers FastCGI responses unless told per response (notes/servers.md §7).
        response.headers["X-Accel-Buffering"] = "no"
        return response
    raise TypeError(
        "handler %s returned %r: return str, bytes, dict, list, a webob.Response, "
        "a (body, status[, headers]) tuple or an iterable of chunks" % (_name(handler), value)
    )


def check_headers(headerlist):
    """Raise HeaderError if any header name or value could split or break the response."""
    for name, value in headerlist:
        if not _TOKEN.match(name):
            raise HeaderError("invalid header name %r" % name)
        if _BAD_VALUE.search(value):
            raise HeaderError("header %s has a control character (CR, LF, NUL...) in its value" % name)
        try:
            # PEP 3333: header strings are latin-1; a gateway would fail encoding them
            # after this app's error handling has had its chance.
            value.encode("latin-1")
        except UnicodeEncodeError:
            raise HeaderError("header %s has a character outside latin-1 in its value: "
                              "encode it (RFC 8187, or percent-encoding)" % name)


_ERROR = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>500 Internal Server Error</title></head>
<body><h1>Internal Server Error</h1>
<p>The server could not complete your request. The error has been logged%s.</p>
%s</body></html>
"""


def error_page(traceback_text=None, request_id=None):
    """Return a 500 response; the traceback is shown only when given (debug on)."""
    import html

    detail = "<pre>%s</pre>\n" % html.escape(traceback_text) if traceback_text else ""
    ref = " as error %s" % html.escape(request_id) if request_id else ""
    response = webob.Response(status=500, content_type=_HTML, charset="utf-8")
    response.body = (_ERROR % (ref, detail)).encode("utf-8")
    return response
