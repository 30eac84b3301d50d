"""Give whole responses an ETag and gzip them when the client accepts it, with an honest Vary.

A response the handler streams is left alone: it has no whole body to hash or compress,
and buffering it would hold back the chunks the handler meant to send at once.
"""

import zlib

try:
    # CPython's own md5, the one hashlib falls back to: the same digest, as fast as OpenSSL's
    # for a page, and calling it leaves unpaged the ~600 KiB of libcrypto that OpenSSL's md5
    # brought into every FastCGI worker's RSS (bench/README.md, worker memory).
    from _md5 import md5 as _md5
except ImportError:  # a Python built without it (--with-builtin-hashlib-hashes): OpenSSL's
    from hashlib import md5 as _md5

__all__ = ["finish", "accepts_gzip", "compressible", "GZIP_LEVEL", "MIN_GZIP_SIZE"]

# Chosen from bench/gzip.py (bench/README.md): on a 20 KB page level 6 takes 3x level 1's
# time (249 against 84 us) to save 3 % of the page; nginx's gzip_comp_level defaults to 1 too.
GZIP_LEVEL = 1
# Compressed bodies kept per process, by the ETag computed from the identity body: under
# FastCGI (or preloaded mod_python) a repeated page then costs what an identity one does
# (bench/README.md). Bounded in bytes; useless, and harmless, in a one-request CGI process.
CACHE_BYTES = 1 << 20
_cache = {}  # (identity md5, level) -> gzip bytes, oldest first
_cached = [0]  # bytes held; a list so it updates in place
# Below this, gzip's 18-byte frame and the CPU are not worth it (and the body fits a packet).
MIN_GZIP_SIZE = 1024

_COMPRESSIBLE = {
    "application/json", "application/javascript", "application/ecmascript",
    "application/xml", "application/xhtml+xml", "application/rss+xml", "application/atom+xml",
    "application/ld+json", "application/manifest+json", "application/x-javascript",
    "image/svg+xml",
}


def compressible(content_type):
    """Tell whether a media type is worth compressing (text, JSON, JavaScript, XML, SVG)."""
    if not content_type:
        return False
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind.startswith("text/"):
        # An event stream is sent as it happens; compressing it would buffer it.
        return kind != "text/event-stream"
    return kind in _COMPRESSIBLE or kind.endswith("+json") or kind.endswith("+xml")


def accepts_gzip(header):
    """Tell whether an Accept-Encoding header allows gzip (RFC 9110 §12.5.3, q=0 refuses)."""
    if not header:
        return False
    explicit, star = None, None
    for item in header.split(","):
        coding, _, params = item.strip().partition(";")
        coding = coding.strip().lower()
        q = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = 0.0
        if coding in ("gzip", "x-gzip"):
            explicit = q > 0 if explicit is None else explicit or q > 0
        elif coding == "*":
            star = q > 0
    if explicit is not None:
        return explicit
    return bool(star)


def _add_vary(response, token):
    vary = response.headers.get("Vary")
    if not vary:
        response.headers["Vary"] = token
    elif token.lower() not in [v.strip().lower() for v in vary.split(",")] and vary.strip() != "*":
        response.headers["Vary"] = vary + ", " + token


def _whole(response):
    # webob keeps a whole body as a list of bytes; anything else is the handler's iterator.
    # A raised webob.exc response (HTTPOk) makes its body only when called
    # (WSGIHTTPException.generate_response): its list is empty until then.
    from webob.exc import WSGIHTTPException

    return isinstance(response.app_iter, list) and not isinstance(response, WSGIHTTPException)


def _variant_etag(etag, suffix):
    """Return ``etag`` (a header value) with ``suffix`` inside its quotes, weak if it was weak."""
    # Built on the header, not on response.etag: webob's getter drops the W/ of a weak ETag,
    # and a weak validator set by the handler must not come back strong (RFC 9110 §8.8.1).
    if etag.endswith('"'):
        return etag[:-1] + suffix + '"'
    return '"%s%s"' % (etag.replace('"', ""), suffix)  # an unquoted ETag a handler set


def _gzip(body, digest):
    """Return ``body`` gzipped, from the cache when ``digest`` (our md5 of it) is there."""
    # Only our own digest keys the cache: a handler's ETag need not change with the body.
    key = (digest, GZIP_LEVEL) if digest else None
    data = _cache.get(key) if key else None
    if data is None:
        compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)  # 31: gzip framing
        data = compressor.compress(body) + compressor.flush()
        if key and len(data) <= CACHE_BYTES // 8:
            _cache[key] = data
            _cached[0] += len(data)
            # Single dict operations (atomic under the GIL), so --threads needs no lock; the
            # byte count may drift a little there, which only loosens the bound.
            while _cached[0] > CACHE_BYTES:
                try:
                    _cached[0] -= len(_cache.pop(next(iter(_cache))))
                except (StopIteration, KeyError, RuntimeError):
                    break
    return data


def finish(request, response):
    """Add an ETag and gzip to a whole 200 response; leave streamed and error responses."""
    if response.status_code != 200 or not _whole(response):
        return response
    if request.method not in ("GET", "HEAD"):
        return response
    body = response.body
    headers = response.headers
    encoded = "Content-Encoding" in headers
    digest = None
    if response.etag is None:
        # Strong validator from the identity body; the gzip variant gets its own below.
        # usedforsecurity=False: a FIPS-mode OpenSSL refuses md5 otherwise, and every page would
        # be a 500; this hash only tells versions apart.
        digest = response.etag = _md5(body, usedforsecurity=False).hexdigest()
    if (
        not encoded
        and getattr(response, "compress", True)
        and len(body) >= MIN_GZIP_SIZE
        and compressible(headers.get("Content-Type"))
    ):
        # The encoding now depends on the request, compressed or not: caches must know.
        _add_vary(response, "Accept-Encoding")
        if accepts_gzip(request.environ.get("HTTP_ACCEPT_ENCODING")):
            response.body = _gzip(body, digest)
            headers["Content-Encoding"] = "gzip"
            # A different representation needs its own ETag (RFC 9110 §8.8.3).
            headers["ETag"] = _variant_etag(headers["ETag"], "-gzip")
    response.conditional_response = True
    return response
