"""A FastCGI client for the tests: a record codec on bytes (no I/O), and a small socket client on top.

The codec follows the FastCGI 1.0 specification, written from it rather than from flup so the
tests do not share the server's mistakes.
"""

import socket
import struct
import time
from typing import Dict, List, Mapping, NamedTuple, Optional, Tuple, Union

VERSION = 1
BEGIN_REQUEST, ABORT_REQUEST, END_REQUEST, PARAMS, STDIN, STDOUT, STDERR, DATA = range(1, 9)
GET_VALUES, GET_VALUES_RESULT, UNKNOWN_TYPE = 9, 10, 11
RESPONDER, AUTHORIZER, FILTER = 1, 2, 3
KEEP_CONN = 1
REQUEST_COMPLETE, CANT_MPX_CONN, OVERLOADED, UNKNOWN_ROLE = range(4)

_HEADER = struct.Struct("!BBHHBx")


class Record(NamedTuple):
    type: int
    request_id: int
    content: bytes


# --- encoding -----------------------------------------------------------------------------


def record(rtype: int, request_id: int = 0, content: bytes = b"", version: int = VERSION,
           padding: Optional[int] = None) -> bytes:
    """Encode one record; padding defaults to what aligns it on 8 bytes."""
    if padding is None:
        padding = -len(content) & 7
    return _HEADER.pack(version, rtype, request_id, len(content), padding) + content + b"\0" * padding


def _length(n: int) -> bytes:
    return bytes([n]) if n < 128 else struct.pack("!L", n | 0x80000000)


def pairs(params: Mapping[str, Union[str, bytes]]) -> bytes:
    """Encode name-value pairs (str encoded latin-1, as PEP 3333 environ strings are)."""
    out = []
    for name, value in params.items():
        name_b = name.encode("latin-1")
        value_b = value if isinstance(value, bytes) else value.encode("latin-1")
        out.append(_length(len(name_b)) + _length(len(value_b)) + name_b + value_b)
    return b"".join(out)


def begin_request(request_id: int = 1, role: int = RESPONDER, flags: int = 0) -> bytes:
    return record(BEGIN_REQUEST, request_id, struct.pack("!HB5x", role, flags))


def stream(rtype: int, request_id: int, data: bytes, chunk: int = 65535,
           padding: Optional[int] = None) -> bytes:
    """Encode a stream as records of at most ``chunk`` bytes, then its empty end record."""
    parts = [record(rtype, request_id, data[i:i + chunk], padding=padding)
             for i in range(0, len(data), chunk)]
    return b"".join(parts) + record(rtype, request_id, padding=padding)


def request(params: Mapping[str, Union[str, bytes]], stdin: bytes = b"", request_id: int = 1,
            keep_conn: bool = False, role: int = RESPONDER, chunk: int = 65535,
            padding: Optional[int] = None) -> bytes:
    """Encode a whole request: BEGIN_REQUEST, the PARAMS stream, the STDIN stream."""
    return (begin_request(request_id, role, KEEP_CONN if keep_conn else 0)
            + stream(PARAMS, request_id, pairs(params), chunk, padding)
            + stream(STDIN, request_id, stdin, chunk, padding))


def abort_request(request_id: int = 1) -> bytes:
    return record(ABORT_REQUEST, request_id)


def cgi_params(method: str = "GET", path: str = "/", query: str = "", body: bytes = b"",
               content_type: str = "", headers: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """Return the params nginx sends for a request to /app.py (notes/servers.md §4)."""
    params = {
        "GATEWAY_INTERFACE": "CGI/1.1",
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": "/app.py",
        "PATH_INFO": path,
        "QUERY_STRING": query,
        "REQUEST_URI": "/app.py" + path + ("?" + query if query else ""),
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "CONTENT_LENGTH": str(len(body)) if body else "",
        "CONTENT_TYPE": content_type,
    }
    for name, value in (headers or {}).items():
        params["HTTP_" + name.upper().replace("-", "_")] = value
    return params


# --- decoding -----------------------------------------------------------------------------


class ProtocolError(Exception):
    """The server sent bytes that are not FastCGI records."""


class Decoder:
    """Turn bytes, fed in any pieces, into records."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> List[Record]:
        self._buffer += data
        records = []
        while len(self._buffer) >= _HEADER.size:
            version, rtype, request_id, length, padding = _HEADER.unpack_from(self._buffer)
            if version != VERSION:
                raise ProtocolError("record version %d" % version)
            end = _HEADER.size + length + padding
            if len(self._buffer) < end:
                break
            records.append(Record(rtype, request_id, bytes(self._buffer[_HEADER.size:_HEADER.size + length])))
            del self._buffer[:end]
        return records

    @property
    def pending(self) -> int:
        return len(self._buffer)


def decode_pairs(data: bytes) -> List[Tuple[bytes, bytes]]:
    out, pos = [], 0
    while pos < len(data):
        lengths = []
        for _ in range(2):
            if data[pos] & 0x80:
                lengths.append(struct.unpack_from("!L", data, pos)[0] & 0x7FFFFFFF)
                pos += 4
            else:
                lengths.append(data[pos])
                pos += 1
        name = data[pos:pos + lengths[0]]
        pos += lengths[0]
        out.append((name, data[pos:pos + lengths[1]]))
        pos += lengths[1]
    return out


class Response:
    """The records of one request, read back into a CGI-style response."""

    def __init__(self, request_id: int = 1) -> None:
        self.request_id = request_id
        self.stdout = b""
        self.stderr = b""
        self.app_status: Optional[int] = None
        self.protocol_status: Optional[int] = None
        self.stdout_closed = False

    @property
    def complete(self) -> bool:
        return self.protocol_status is not None

    def add(self, rec: Record) -> None:
        if rec.request_id != self.request_id:
            raise ProtocolError("record for request %d, expected %d" % (rec.request_id, self.request_id))
        if rec.type == STDOUT:
            if self.stdout_closed and rec.content:
                raise ProtocolError("STDOUT data after the end of the stream")
            self.stdout += rec.content
            self.stdout_closed = self.stdout_closed or not rec.content
        elif rec.type == STDERR:
            self.stderr += rec.content
        elif rec.type == END_REQUEST:
            self.app_status, self.protocol_status = struct.unpack("!LB3x", rec.content)
        else:
            raise ProtocolError("unexpected record type %d" % rec.type)

    def _split(self) -> Tuple[bytes, bytes]:
        for sep in (b"\r\n\r\n", b"\n\n"):
            head, found, body = self.stdout.partition(sep)
            if found:
                return head, body
        raise ProtocolError("no end of headers in %r" % self.stdout[:200])

    @property
    def headers(self) -> List[Tuple[str, str]]:
        head = self._split()[0].decode("latin-1")
        return [tuple(part.strip() for part in line.split(":", 1))  # type: ignore[misc]
                for line in head.splitlines()]

    def header(self, name: str) -> Optional[str]:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    @property
    def status(self) -> int:
        return int((self.header("Status") or "200").split()[0])

    @property
    def body(self) -> bytes:
        return self._split()[1]


# --- a blocking client ---------------------------------------------------------------------


Address = Union[str, Tuple[str, int]]


class Client:
    """One FastCGI connection, every operation bounded by ``timeout`` seconds."""

    def __init__(self, address: Address, timeout: float = 10.0) -> None:
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.timeout = timeout
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(address)
        self.decoder = Decoder()
        self._records: List[Record] = []

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def next_record(self, deadline: float) -> Record:
        while not self._records:
            self.sock.settimeout(max(deadline - time.monotonic(), 0.01))
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("server closed the connection (%d bytes pending)" % self.decoder.pending)
            self._records.extend(self.decoder.feed(data))
        return self._records.pop(0)

    def read_response(self, request_id: int = 1) -> Response:
        """Read records until END_REQUEST for ``request_id``."""
        deadline = time.monotonic() + self.timeout
        response = Response(request_id)
        while not response.complete:
            response.add(self.next_record(deadline))
        return response

    def request(self, method: str = "GET", path: str = "/", query: str = "", body: bytes = b"",
                content_type: str = "", keep_conn: bool = False, chunk: int = 65535,
                params: Optional[Mapping[str, str]] = None,
                padding: Optional[int] = None) -> Response:
        all_params = cgi_params(method, path, query, body, content_type)
        all_params.update(params or {})
        self.send(request(all_params, body, keep_conn=keep_conn, chunk=chunk, padding=padding))
        return self.read_response()

    def read_stdout_until(self, marker: bytes, deadline: float) -> bytes:
        """Read STDOUT records until their data holds ``marker``; return that data."""
        data = b""
        while marker not in data:
            rec = self.next_record(deadline)
            if rec.type != STDOUT:
                raise ProtocolError("record type %d before %r came" % (rec.type, marker))
            data += rec.content
        return data

    def read_until_closed(self) -> bytes:
        """Return what the server sends before it closes the connection (a reset counts as closed)."""
        deadline = time.monotonic() + self.timeout
        data = b""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("the server kept the connection open for %g s" % self.timeout)
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return data
            if not chunk:
                return data
            data += chunk


def fetch(address: Address, path: str = "/", method: str = "GET", timeout: float = 10.0,
          **kwargs) -> Response:
    """Send one request on a new connection and return its response, as nginx does by default."""
    with Client(address, timeout) as client:
        return client.request(method, path, **kwargs)
