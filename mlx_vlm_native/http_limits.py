"""What a client can make the server hold, bounded by limits and not by the
request: deadlines on reading a request, the connection table that lets new
clients in past slow ones, a bound on a JSON body's structure, a text budget
from the context, and the decoded-pixel budget shared by all requests.

Standard library only; the server (server.py) wires these in.
"""

import io
import re
import socket
import threading
import time
from typing import Dict, List, Optional


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
