"""What a client can make the server hold, bounded by limits and not by the
request: deadlines on reading a request, the connection table that lets new
clients in past slow ones, a bound on a JSON body's structure, a text budget
from the context, and the decoded-pixel budget shared by all requests.

The hardened HTTP transport is here too (`LimitedHTTPServer`,
`LimitedHandler`, errors as `APIError` replies); the server (server.py)
adds the endpoints.
"""

import io
import json
import re
import select
import socket
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Tuple
from urllib.parse import urlsplit

from .processors.image import short


class DeadlineReader(io.RawIOBase):
    """A socket's reading side with a wall-clock deadline over all its reads
    (a client that sends one byte every few seconds gets no more time than one
    that sends nothing); without a deadline each read waits at most `timeout`."""

    def __init__(self, sock: socket.socket, timeout: float):
        self.sock, self.timeout, self.deadline = sock, timeout, None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        wait = self.timeout
        if self.deadline is not None:
            wait = min(wait, self.deadline - time.monotonic())
            if wait <= 0:
                raise TimeoutError("the request was not received in time")
        self.sock.settimeout(wait)
        try:
            return self.sock.recv_into(buffer)
        finally:
            self.sock.settimeout(self.timeout)  # writes keep the plain per-call timeout


class Connection:
    """One open connection as the connection table sees it: `reading` while it
    waits for (the rest of) a request, since `since`; `overflow` if it came in
    over the cap and may only be told to retry (or read /health)."""

    def __init__(self, sock: socket.socket, overflow: bool = False):
        self.sock, self.overflow = sock, overflow
        self.reading, self.since, self.evicted = True, time.monotonic(), False


class ConnectionTable:
    """At most `cap` connections; when a new one arrives at the cap, the one
    that has waited longest for its request is closed to make room (an idle
    keep-alive connection or a client sending slowly), so slow or idle sockets
    cannot starve new clients. Connections answering a request are never
    closed. With none to close, up to `overflow` more are let in only to read
    their request and answer 503 (or /health); beyond that the new connection
    is refused at once."""

    def __init__(self, cap: int, overflow: int):
        self.cap, self.overflow = cap, overflow
        self.lock = threading.Lock()
        self.open: Dict[socket.socket, Connection] = {}
        self.evictions = 0

    def admit(self, sock: socket.socket) -> Optional[Connection]:
        """The new connection's entry, or None if it must be refused now."""
        with self.lock:
            live = [c for c in self.open.values() if not c.evicted]
            regular = [c for c in live if not c.overflow]
            if len(regular) >= self.cap:
                waiting = [c for c in regular if c.reading]
                if waiting:
                    self._evict(min(waiting, key=lambda c: c.since))
                elif len(live) - len(regular) < self.overflow:
                    return self._add(Connection(sock, overflow=True))
                else:
                    return None
            return self._add(Connection(sock))

    def _add(self, connection: Connection) -> Connection:
        self.open[connection.sock] = connection
        return connection

    def _evict(self, connection: Connection) -> None:
        connection.evicted, connection.reading = True, False
        self.evictions += 1
        try:
            connection.sock.shutdown(socket.SHUT_RDWR)  # its thread's read returns at once
        except OSError:
            pass

    def reading(self, sock: socket.socket, reading: bool) -> bool:
        """Mark the connection as waiting for a request (or not); False if it
        has been closed to make room."""
        with self.lock:
            connection = self.open.get(sock)
            if connection is None or connection.evicted:
                return False
            connection.reading = reading
            if reading:
                connection.since = time.monotonic()
            return True

    def get(self, sock: socket.socket) -> Optional[Connection]:
        with self.lock:
            return self.open.get(sock)

    def remove(self, sock: socket.socket) -> None:
        with self.lock:
            self.open.pop(sock, None)


# ------------------------------------------------------------------- JSON bodies

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')


def json_values(body: bytes, limit: int) -> int:
    """An upper bound on the number of values (objects, arrays, members and
    items) that parsing `body` would create, or `limit + 1` once it is over
    `limit`: counted from the bytes, without parsing. A first count over the
    whole body is exact unless strings hold brackets or commas; only then are
    the strings cut out and the count redone."""
    count = body.count(b",") + body.count(b"{") + body.count(b"[") + 1
    if count <= limit:
        return count
    outside = _STRING.sub(b"", body)
    return outside.count(b",") + outside.count(b"{") + outside.count(b"[") + 1


# ------------------------------------------------------------------------ text

def longest_token_bytes(tokenizer) -> int:
    """The most UTF-8 bytes one token of `tokenizer` stands for (a bound: a
    byte-level key is one character per byte, a byte-fallback key is longer
    than its byte). A text of n bytes is at least n / this many tokens."""
    vocab = getattr(tokenizer, "get_vocab", None)
    keys = list(vocab().keys()) if vocab is not None else []
    keys += [str(t) for t in getattr(tokenizer, "all_special_tokens", [])]
    return max([len(k.encode("utf-8", "surrogatepass")) for k in keys] + [1])


def text_of(messages: list) -> List[str]:
    """Every string of a chat template's messages (content strings and text parts)."""
    texts = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts += [p["text"] for p in content if isinstance(p.get("text"), str)]
    return texts


# ---------------------------------------------------------------------- pixels

class PixelBudget:
    """Pixels of images held by requests in flight, server-wide: a request takes
    its images' pixels (from their headers) before its job is queued and gives
    them back when its answer ends. A request that does not fit waits at most
    `wait` seconds for others to finish."""

    def __init__(self, total: int, wait: float):
        self.total, self.wait, self.used = total, wait, 0
        self.changed = threading.Condition()

    def take(self, pixels: int) -> bool:
        """Take `pixels` (False: still not free after `wait` seconds)."""
        if pixels <= 0:
            return True
        deadline = time.monotonic() + self.wait
        with self.changed:
            while self.used + pixels > self.total:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.changed.wait(remaining)
            self.used += pixels
            return True

    def give(self, pixels: int) -> None:
        if pixels <= 0:
            return
        with self.changed:
            self.used -= pixels
            self.changed.notify_all()


# ------------------------------------------------------------------- transport

class APIError(Exception):
    """A request that gets an error reply; the message says what to change."""

    TYPES = {404: "not_found_error", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, code: Optional[str] = None, param: Optional[str] = None,
                 headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        error_type = self.TYPES.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": error_type, "param": self.param, "code": self.code}}


class ClientGone(Exception):
    """The client closed its connection while its answer was being made."""


BUSY_REPLY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
              b"Connection: close\r\nContent-Length: %d\r\n\r\n%s")


class LimitedHTTPServer(ThreadingHTTPServer):
    """One thread per connection and a listen backlog deep enough that a burst
    of clients waits instead of being reset. The connection table keeps at
    most `limits.max_connections`: a new client gets in by closing the
    connection that has waited longest for its request (slow or idle), so slow
    sockets cannot lock anyone out. `limits` also holds the deadlines and the
    body size the handler (a `LimitedHandler`) enforces."""

    request_queue_size = 128

    def __init__(self, address, handler, limits):
        self.limits = limits
        self.table = ConnectionTable(limits.max_connections, limits.overflow_connections)
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        if self.table.admit(request) is None:
            body = json.dumps(APIError(503, "the server has too many open connections; retry later",
                                       "server_busy").body()).encode()
            try:
                request.sendall(BUSY_REPLY % (len(body), body))
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.table.remove(request)
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.table.remove(request)

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], OSError):  # a client that left or was closed to make room
            return
        super().handle_error(request, client_address)


class LimitedHandler(BaseHTTPRequestHandler):
    """Requests read within the server's deadlines and size limit, routed by
    `ROUTES` (path -> (method, name of the method that answers)); every error is
    an `APIError` reply in OpenAI's shape, a bug a 500, and the connection goes on
    or is closed cleanly."""

    server_version = "mlx-vlm-native"
    timeout = 60  # seconds a client may stall while sending
    ROUTES: Dict[str, Tuple[str, str]] = {}

    def setup(self) -> None:
        super().setup()
        self.rfile.close()
        self.reader = DeadlineReader(self.connection, self.timeout)
        self.rfile = io.BufferedReader(self.reader)

    def handle_one_request(self) -> None:
        """Wait (at most `timeout`) for a request's first byte, then read its
        request line and headers within `header_timeout` of it."""
        self.request_start = None
        if not self.server.table.reading(self.connection, True):
            self.close_connection = True
            return
        self.reader.deadline = None
        try:
            if not self.rfile.peek(1):
                self.close_connection = True
                return
        except OSError:  # idle past the timeout, or closed to make room
            self.close_connection = True
            return
        self.request_start = time.monotonic()
        self.reader.deadline = self.request_start + self.server.limits.header_timeout
        super().handle_one_request()

    do_GET, do_POST, do_PUT, do_DELETE, do_PATCH = (
        lambda self, m=method: self.dispatch(m) for method in ("GET", "POST", "PUT", "DELETE", "PATCH"))

    def dispatch(self, method: str) -> None:
        self.tic, self.logged = time.perf_counter(), False
        self.status, self.note, self.replied = None, "", False
        self.unread_body = ((self.headers.get("Content-Length") or "0").strip() != "0"  # until read_body reads it
                            or self.headers.get("Transfer-Encoding") is not None)
        path = urlsplit(self.path).path.rstrip("/") or "/"
        table = self.server.table
        connection = table.get(self.connection)
        if connection is None or connection.evicted:  # closed to make room while sending its headers
            self.close_connection, self.unread_body = True, False
            return
        self.reader.deadline = self.request_start + self.server.limits.body_timeout
        if not self.unread_body:
            table.reading(self.connection, False)
        try:
            if connection.overflow and path != "/health":  # over the cap: read (or refuse) the body, then 503
                self.close_connection = True
                if self.unread_body:
                    self.read_body(keep=False)
                raise APIError(503, "the server has too many open connections; retry later", "server_busy",
                               headers={"Retry-After": "1"})
            if path not in self.ROUTES:
                raise APIError(404, f"no endpoint {short(path)}; try {', '.join(self.ROUTES)}", "not_found")
            allowed, action = self.ROUTES[path]
            if method != allowed:
                raise APIError(405, f"{path} takes {allowed}, not {method}", "method_not_allowed",
                               headers={"Allow": allowed})
            getattr(self, action)()
        except APIError as e:
            self.fail(e)
        except (ClientGone, BrokenPipeError, ConnectionResetError):
            self.note, self.close_connection = " client went away; generation stopped", True
        except Exception as e:  # a bug must not take the server down; the trace stays in the log
            traceback.print_exc()
            self.fail(APIError(500, f"internal error ({type(e).__name__}); the server log has the details",
                               "internal_error"))
        finally:
            self.log_done()
            if self.unread_body:
                self.close_connection = True
                self.discard_unread_body()

    def log_done(self) -> None:
        """The request's one log line, written before the last bytes of the reply
        so that it is there once the client has its answer."""
        if not self.logged:
            self.logged = True
            elapsed = time.perf_counter() - self.tic
            self.log_message('"%s" %s %.2fs%s', short(self.requestline), self.status, elapsed, self.note)

    def log_request(self, code="-", size="-"):
        pass  # written by `log_done`

    def fail(self, error: APIError) -> None:
        self.note = f" {error.message}"
        try:
            if not self.replied:
                self.send_json(error.status, error.body(), error.headers)
            else:  # mid-stream: the status line is gone, tell the client in the stream
                self.send_event(error.body())
        except OSError:
            self.note += " (client gone)"
            self.close_connection = True

    def send_json(self, status: int, payload: dict, headers: Optional[dict] = None) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.status, self.replied = status, True
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.unread_body or self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.log_done()
        self.wfile.write(body)

    def send_event(self, payload) -> None:
        data = payload if isinstance(payload, str) else json.dumps(payload)
        self.wfile.write(f"data: {data}\n\n".encode())
        self.wfile.flush()

    def client_gone(self) -> bool:
        """Whether the client has closed its end (readable with nothing to read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def read_body(self, keep: bool = True) -> bytes:
        """The request body, refused from its Content-Length before any of it is
        read, and received within `body_timeout` seconds of the request's first
        byte (`keep=False`: read and dropped)."""
        limits = self.server.limits
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise APIError(411, "chunked request bodies are not supported; send a Content-Length",
                           "length_required")
        if length is None:
            raise APIError(411, "a Content-Length header is required", "length_required")
        length = length.strip()
        if not (length.isascii() and length.isdigit()) or len(length) > 20:
            self.close_connection = True
            raise APIError(400, f"bad Content-Length {short(length)!r}: it must be a decimal byte count",
                           "invalid_request")
        size = int(length)
        if size > limits.max_request_bytes:
            self.unread_body = self.close_connection = True
            raise APIError(413, f"the request body is {size} bytes, over the limit of "
                           f"{limits.max_request_bytes} bytes", "request_too_large")
        chunks, received = [], 0
        try:
            while received < size:
                chunk = self.rfile.read1(min(65536, size - received))
                if not chunk:
                    self.unread_body = False
                    self.close_connection = True
                    raise APIError(400, f"the request body ended after {received} of {size} bytes",
                                   "invalid_request")
                if keep:
                    chunks.append(chunk)
                received += len(chunk)
        except TimeoutError:
            self.close_connection = True
            raise APIError(408, f"the request was not received within {limits.body_timeout:g} s "
                           f"({received} of {size} body bytes)", "request_timeout")
        self.unread_body = False
        self.server.table.reading(self.connection, False)
        return b"".join(chunks)

    def discard_unread_body(self, seconds: float = 2.0) -> None:
        """Close after a refused body without resetting the connection, so that the
        client still reads the error: stop sending, then drain for a while."""
        self.reader.deadline = time.monotonic() + seconds
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            while self.rfile.read1(65536):
                pass
        except OSError:
            pass
