"""Check a form body against limits, and for what cgi.FieldStorage would misread, before it parses.

WebOb 1.8 parses forms with cgi.FieldStorage, which has no limits of its own (WebOb does not
pass max_num_fields, bpo-34866). The checks here take bytes and raise an HTTP error; Request
(request.py) runs them before WebOb parses. No module-level import of cgi: a CGI hello must
not load it (runners/oneshot.py).
"""

from webob import exc

__all__ = ["MAX_PARTS", "MAX_SPOOLED_PARTS", "MAX_PART_HEADER_LINES", "MAX_FIELDS", "MAX_BOUNDARY",
           "MAX_LINES", "boundary", "mapped", "check_multipart", "replaced", "check_utf8_urlencoded"]

# Each limit answers a row of notes/bad-inputs.md §3.1.

#: Parts of a multipart body (rows 3 and 5). cgi.FieldStorage spools every part over 1000
#: bytes to its own open temporary file, so 2000 parts of 1.1 KB run a process out of file
#: descriptors (EMFILE); 20k small parts take half a second. Werkzeug's max_form_parts and
#: Go's mime/multipart ReadForm stop at 1000 too (CVE-2023-25577, CVE-2023-24536).
MAX_PARTS = 1000
#: Parts over SPOOLED bytes, each of which cgi.FieldStorage keeps in an open temporary file
#: until the request ends: 1000 of them would take most of a default RLIMIT_NOFILE of 1024,
#: shared by every thread of a FastCGI process. Django stops at 100 files too
#: (DATA_UPLOAD_MAX_NUMBER_FILES).
MAX_SPOOLED_PARTS = 100
SPOOLED = 1000  # cgi.FieldStorage.read_lines: past 1000 bytes a part goes to make_file()
#: Header lines of one part, folded lines included (row 4): cgi reads them with no bound and
#: the email parser takes seconds over 100k lines (half a minute over 1M folded lines).
MAX_PART_HEADER_LINES = 100
#: Fields of a urlencoded body, and of a query string (row 5): 200k fields take 0.3 s.
MAX_FIELDS = 1000
#: RFC 2046 §5.1.1: a boundary is 1 to 70 characters (row 1); cgi.valid_boundary takes 201.
MAX_BOUNDARY = 70
#: Lines of a multipart body (row 6, within max_body): cgi.FieldStorage reads it a line at a
#: time in Python, ~0.5 us a line, so 10 MB of bare newlines cost 5 s of CPU where a 10 MB
#: upload of 50-byte lines costs 0.1 s. 1M lines bound it to ~0.5 s.
MAX_LINES = 1000000
#: How much of a mapped body is counted at a time (a slice of an mmap is a copy).
_COUNT_CHUNK = 1 << 20

URLENCODED = "application/x-www-form-urlencoded"
MULTIPART = "multipart/form-data"


def boundary(content_type):
    """Return the multipart boundary of ``content_type`` as bytes; 400 when it is missing or bad."""
    # cgi's own parser (a stand-in until the first form in a CGI process, runners/oneshot.py):
    # the boundary cgi.FieldStorage will look for.
    from webob.compat import parse_header

    value = parse_header(content_type)[1].get("boundary")
    if not value:
        raise exc.HTTPBadRequest("The multipart form has no boundary.")
    printable = value.isascii() and value.isprintable() and value[-1] != " "
    if len(value) > MAX_BOUNDARY or not printable:
        raise exc.HTTPBadRequest(
            "The multipart boundary must be 1 to %d printable ASCII characters." % MAX_BOUNDARY)
    return value.encode("ascii")


def mapped(body_file, length):
    """Return the first ``length`` bytes of a seekable body, mapped when it is spooled to a file.

    A body over 10 KiB is in a temporary file (webob/request.py copy_body); mapping it spares
    a copy in memory of a body that max_body may allow to be large.
    """
    if length <= 0:
        return b""
    try:
        fileno = body_file.fileno()
    except (AttributeError, OSError):  # BytesIO: io.UnsupportedOperation
        fileno = None
    if fileno is not None:
        import mmap

        try:
            getattr(body_file, "flush", lambda: None)()
            return mmap.mmap(fileno, length, access=mmap.ACCESS_READ)
        except (OSError, ValueError):  # not a regular file, or shorter than its Content-Length
            pass
    body_file.seek(0)
    data = body_file.read(length)
    body_file.seek(0)
    return data


def check_multipart(data, boundary):
    """Refuse a multipart body past one of the limits above, or one cgi would misread.

    Finds the delimiter lines as cgi.FieldStorage does (read_multi, read_lines_to_outerboundary),
    so that it never sees more parts, or longer header blocks, than are counted here. Linear in
    the body: bytes.find between delimiters, and Python code only per part and header line.
    """
    import re

    size = len(data)
    lines = sum(data[at:at + _COUNT_CHUNK].count(b"\n") for at in range(0, size, _COUNT_CHUNK))
    if lines > MAX_LINES:
        raise exc.HTTPRequestEntityTooLarge("The form has more than %d lines." % MAX_LINES)
    # read_multi skips lines up to the first that strips to "--boundary".
    first = re.compile(rb"(?m)^[ \t\r\v\f]*--%s[ \t\r\v\f]*$" % re.escape(boundary)).search(data)
    if first is None:
        return  # cgi finds no part either
    needle = b"\n--" + boundary
    start = first.end() + 1  # the first part's headers, just past the delimiter's newline
    seen = 0  # parts, and lines of content that begin with the boundary
    spooled = 0  # parts cgi will keep in a temporary file
    while start < size:
        seen += 1
        if seen > MAX_PARTS:
            raise _too_many_parts()
        # cgi reads header lines up to a blank one, over any delimiter in the way: a block
        # must end before the next line that begins with the boundary, or two parts' headers
        # would add up in cgi past what is counted here for each.
        ahead = data.find(needle, start - 1)
        content, form_typed, is_file = _walk_headers(data, start, size if ahead < 0 else ahead + 1)
        if content is None:
            raise exc.HTTPBadRequest("A part of the form has no blank line after its headers.")
        if form_typed:
            raise exc.HTTPBadRequest(
                "A part of the form is typed multipart or urlencoded; such parts are not accepted.")
        end, start, strays = _next_delimiter(data, needle, content - 1, MAX_PARTS - seen)
        seen += strays
        if end - content > SPOOLED:
            spooled += 1
            if spooled > MAX_SPOOLED_PARTS:
                raise exc.HTTPRequestEntityTooLarge(
                    "The form has more than %d parts over %d bytes." % (MAX_SPOOLED_PARTS, SPOOLED))
        if not is_file:
            # cgi decodes a field with errors="replace": its bytes must be UTF-8, as a
            # urlencoded field's must (row 12), or the handler gets U+FFFD for them.
            try:
                data[content:end].decode("utf-8")
            except UnicodeDecodeError:
                raise exc.HTTPBadRequest("The form is not valid UTF-8.")


def _too_many_parts():
    return exc.HTTPRequestEntityTooLarge("The form has more than %d parts." % MAX_PARTS)


def _walk_headers(data, start, limit):
    """Walk the header lines of the part at ``start``, up to a blank line before ``limit``.

    Return (where its content starts, None when no blank line comes before ``limit``;
    whether it is typed as a form; whether it may be a file).
    """
    pos, count, is_file, types, in_type = start, 0, False, [], False
    while True:
        if pos >= limit:
            if limit < len(data):
                return None, False, is_file  # ran into the next delimiter
            break  # the body ends within the headers; so does the part
        eol = data.find(b"\n", pos, limit)
        end = limit if eol < 0 else eol + 1
        line, pos = data[pos:end], end
        if not line.strip():
            break  # the blank line that ends the headers, as read_multi tests it
        count += 1
        if count > MAX_PART_HEADER_LINES:
            raise exc.HTTPBadRequest(
                "A part of the form has more than %d header lines." % MAX_PART_HEADER_LINES)
        line = line.lower()
        if line[:1] in (b" ", b"\t"):  # a folded line goes on with the header above it
            if in_type:
                types[-1] += line
        else:
            name, colon, value = line.partition(b":")
            in_type = bool(colon) and name.strip() == b"content-type"
            if in_type:
                types.append(value)
        # cgi keeps a part's bytes when its Content-Disposition has a filename parameter.
        is_file = is_file or b"filename" in line
    # cgi.FieldStorage.__init__ parses a part typed as a form as one: a urlencoded part takes
    # the rest of the body as fields, with no limit; a multipart part nests parts in this one.
    mimes = [value.split(b";", 1)[0].strip() for value in types]
    form_typed = any(m.startswith(b"multipart/") or m == URLENCODED.encode() for m in mimes)
    return pos, form_typed, is_file


def _next_delimiter(data, needle, at, budget):
    """Find the delimiter line after the part content that starts at ``at`` + 1.

    Return (where the content ends, where the next part starts, how many lines of content
    began with the boundary). cgi reads such lines as content (RFC 2046 forbids them): they
    are counted with the parts, 413 past ``budget``, so that finding them stays bounded.
    """
    size, strays = len(data), 0
    while True:
        at = data.find(needle, at)
        if at < 0:
            return size, size, strays
        eol = data.find(b"\n", at + len(needle))
        rest = data[at + len(needle):size if eol < 0 else eol].rstrip()
        if rest == b"--":
            return at, size, strays  # the last delimiter: cgi reads no further
        if not rest:
            return at, size if eol < 0 else eol + 1, strays
        strays += 1
        if strays > budget:
            raise _too_many_parts()
        at += len(needle)


def replaced(form):
    """Return whether a parsed form holds U+FFFD, which cgi puts in place of bad UTF-8."""
    return any("\ufffd" in key or isinstance(value, str) and "\ufffd" in value
               for key, value in form.items())


def check_utf8_urlencoded(body):
    """Raise 400 unless ``body``, and what its %-escapes stand for, are UTF-8 (row 12)."""
    from urllib.parse import unquote_to_bytes

    try:
        body.decode("utf-8")
        unquote_to_bytes(body).decode("utf-8")
    except UnicodeDecodeError:
        raise exc.HTTPBadRequest("The form is not valid UTF-8.")
