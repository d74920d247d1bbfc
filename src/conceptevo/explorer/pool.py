"""An HTTP/1.1 server with a fixed number of threads that holds under many slow or idle clients.

``http.server.ThreadingHTTPServer`` starts one thread per connection and keeps
it for the connection's life: a thousand clients that open a connection and
send nothing (or a byte now and then) make a thousand threads and a thousand
open sockets, and with a normal open-file limit the server can no longer open
its own files. Here instead:

* one thread (the one that calls :meth:`BoundedHTTPServer.serve_forever`)
  accepts connections and reads from all of them without blocking
  (``selectors``), until a connection has sent a whole request head;
* only then is the connection handed, with the bytes read, to one of
  ``workers`` threads, which answers that one request and gives the
  connection back (kept alive, or closed);
* a request head must arrive within ``header_timeout`` seconds of its first
  byte (or of the connection's opening), and a kept-alive connection may sit
  idle ``idle_timeout`` seconds; the connection is closed after that;
* at most ``max_connections`` connections are open at once (by default a
  share of the open-file limit). A new connection past the cap, or one that
  meets "too many open files", closes the oldest connection that has not yet
  completed a request (then the longest-idle kept-alive one): a client that
  only holds a socket open cannot lock out one that asks for something.

So the thread count is fixed (``workers`` + 1) whatever the clients do, and the
server keeps file descriptors for itself. Request handlers are
``BaseHTTPRequestHandler`` subclasses, as for ``http.server``, each called for
one request with the head already in memory.
"""
from __future__ import annotations

import errno
import io
import logging
import queue
import selectors
import socket
import socketserver
import threading
import time
from http.server import BaseHTTPRequestHandler

log = logging.getLogger(__name__)

#: Errors of ``accept`` that mean "out of descriptors or memory", not "this client went away".
_EXHAUSTED = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


def default_max_connections(reserve: int = 64) -> int:
    """Half of the open-file limit left after ``reserve`` descriptors, clipped to 8..512."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY:
            soft = 1 << 16
    except (ImportError, OSError, ValueError):  # pragma: no cover - not POSIX
        soft = 1024
    return max(8, min(512, (soft - reserve) // 2))


class _Conn:
    __slots__ = ("sock", "addr", "buf", "opened", "deadline", "served", "last", "registered")

    def __init__(self, sock, addr, now: float, header_timeout: float):
        self.sock = sock
        self.addr = addr
        self.buf = bytearray()
        self.opened = now
        self.deadline = now + header_timeout
        self.served = 0          # requests answered on this connection
        self.last = now          # last byte received or response sent
        self.registered = False  # watched by the selector (else: with a worker, or queued for one)


class _SocketWriter(io.BufferedIOBase):
    """``wfile`` for a handler: every write goes out whole (``sendall``, bounded by the socket's timeout)."""

    def __init__(self, sock):
        self._sock = sock

    def writable(self):
        return True

    def write(self, b):
        self._sock.sendall(b)
        with memoryview(b) as view:
            return view.nbytes


def head_complete(buf: bytes | bytearray) -> bool:
    """True when ``buf`` holds a whole request head, or a first line that cannot start one (to be refused)."""
    nl = buf.find(b"\n")
    if nl < 0:
        return False
    if len(buf[:nl].split()) != 3:  # HTTP/0.9 ("GET /") or garbage: answered at once, with an error
        return True
    return buf.find(b"\r\n\r\n", nl - 1) >= 0 or buf.find(b"\n\n", nl) >= 0


class BoundedHTTPServer(socketserver.TCPServer):
    """A TCP server answering HTTP with ``workers`` threads; see the module docstring."""

    allow_reuse_address = True
    request_queue_size = 128
    workers = 8
    header_timeout = 10.0   # seconds for a whole request head to arrive
    idle_timeout = 15.0     # seconds a kept-alive connection may wait for its next request
    write_timeout = 30.0    # seconds to send a whole response
    max_head = 16 * 1024    # bytes of request line and headers

    def __init__(self, address, handler_class, max_connections: int | None = None, bind_and_activate: bool = True):
        self.max_connections = int(max_connections) if max_connections else default_max_connections()
        self.peak_connections = 0  # the most connections open at once so far
        self._conns: dict[int, _Conn] = {}
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._returned: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._running = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        super().__init__(address, handler_class, bind_and_activate)

    # -- public --------------------------------------------------------------------------------------
    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Serve until :meth:`shutdown`; the calling thread accepts and reads, ``workers`` threads answer."""
        self._stopped.clear()  # (a shutdown() asked before this point still stops it at once)
        self._running.set()
        self._threads = [threading.Thread(target=self._work, name=f"explorer-worker-{i}", daemon=True) for i in range(self.workers)]
        for t in self._threads:
            t.start()
        sel = selectors.DefaultSelector()
        self._sel = sel
        self.socket.setblocking(False)
        sel.register(self.socket, selectors.EVENT_READ, "listen")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        listening, resume_at = True, 0.0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if not listening and now >= resume_at:
                    sel.register(self.socket, selectors.EVENT_READ, "listen")
                    listening = True
                for key, _ in sel.select(timeout=min(poll_interval, 0.25)):
                    if key.data == "listen":
                        if not self._accept():
                            sel.unregister(self.socket)  # out of descriptors and nothing to close: wait a little
                            listening, resume_at = False, time.monotonic() + 0.05
                    elif key.data == "wake":
                        try:
                            while self._wake_r.recv(4096):
                                pass
                        except BlockingIOError:
                            pass
                    else:
                        self._read(key.data)
                self._take_back()
                self._expire(time.monotonic())
        finally:
            for _ in self._threads:
                self._jobs.put(None)
            for t in self._threads:
                t.join(timeout=2.0)  # daemon threads: one still sending a response does not hold up the stop
            self._take_back()
            for conn in list(self._conns.values()):
                self._close(conn)
            sel.close()
            self._running.clear()
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop :meth:`serve_forever` and wait until it has returned (open connections are closed)."""
        self._stop.set()
        self._wake()
        if self._running.is_set():
            self._stopped.wait()

    def server_close(self) -> None:
        super().server_close()
        for s in (self._wake_r, self._wake_w):
            s.close()

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    # -- the selector thread ------------------------------------------------------------------------
    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass  # already pending, or closed

    def _accept(self) -> bool:
        """Accept what is waiting; False when out of descriptors with nothing to close."""
        for _ in range(64):
            try:
                sock, addr = self.socket.accept()
            except BlockingIOError:
                return True
            except OSError as e:
                if e.errno in _EXHAUSTED:
                    if self._evict():
                        continue
                    log.warning("explorer: out of file descriptors (%s) and no idle connection to close", e.strerror)
                    return False
                return True  # the client went away before we accepted it
            if len(self._conns) >= self.max_connections and not self._evict():
                sock.close()
                continue
            sock.setblocking(False)
            now = time.monotonic()
            conn = _Conn(sock, addr, now, self.header_timeout)
            self._conns[id(conn)] = conn
            self.peak_connections = max(self.peak_connections, len(self._conns))
            self._watch(conn)
        return True

    def _watch(self, conn: _Conn) -> None:
        self._sel.register(conn.sock, selectors.EVENT_READ, conn)
        conn.registered = True

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            return self._close(conn)
        if not data:
            return self._close(conn)
        now = time.monotonic()
        if not conn.buf and conn.served:  # the first byte of a new request on a kept-alive connection
            conn.deadline = now + self.header_timeout
        conn.buf += data
        conn.last = now
        self._dispatch_if_ready(conn)

    def _dispatch_if_ready(self, conn: _Conn) -> None:
        if head_complete(conn.buf) or len(conn.buf) > self.max_head:
            if conn.registered:
                self._sel.unregister(conn.sock)
                conn.registered = False
            self._jobs.put(conn)

    def _take_back(self) -> None:
        """Connections the workers are done with: closed, or watched again for the next request."""
        while True:
            try:
                conn, keep = self._returned.get_nowait()
            except queue.Empty:
                return
            if not keep or self._stop.is_set():
                self._close(conn)
                continue
            try:
                conn.sock.setblocking(False)
            except OSError:
                self._close(conn)
                continue
            now = time.monotonic()
            conn.last = now
            conn.deadline = now + (self.header_timeout if conn.buf else self.idle_timeout)
            if conn.buf and (head_complete(conn.buf) or len(conn.buf) > self.max_head):
                self._jobs.put(conn)  # a pipelined request is already here
            else:
                self._watch(conn)

    def _expire(self, now: float) -> None:
        for conn in [c for c in self._conns.values() if c.registered and c.deadline <= now]:
            if conn.buf:  # a request that never finished arriving
                try:
                    conn.sock.send(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                except OSError:
                    pass
            self._close(conn)

    def _evict(self) -> bool:
        """Close one watched connection to make room: the oldest that never completed a request, else the longest idle."""
        waiting = [c for c in self._conns.values() if c.registered]
        if not waiting:
            return False
        fresh = [c for c in waiting if not c.served]
        victim = min(fresh, key=lambda c: c.opened) if fresh else min(waiting, key=lambda c: c.last)
        self._close(victim)
        return True

    def _close(self, conn: _Conn) -> None:
        if conn.registered:
            try:
                self._sel.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
            conn.registered = False
        self._conns.pop(id(conn), None)
        try:
            conn.sock.close()
        except OSError:
            pass

    # -- the workers ---------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            conn = self._jobs.get()
            if conn is None:
                return
            keep = False
            try:
                keep = self._answer(conn)
            except Exception:  # noqa: BLE001 - a worker must survive anything a request does
                log.exception("explorer: request from %s failed", conn.addr)
            self._returned.put((conn, keep))
            self._wake()

    def _answer(self, conn: _Conn) -> bool:
        """Answer the one request at the start of ``conn.buf``; True to keep the connection open."""
        sock = conn.sock
        try:
            sock.settimeout(self.write_timeout)
        except OSError:
            return False
        complete = head_complete(conn.buf)
        rfile = io.BytesIO(bytes(conn.buf))
        handler = self.RequestHandlerClass.for_request(sock, conn.addr, self, rfile)
        if not complete:  # the head outgrew max_head
            handler.refuse_head_too_large()
            return False
        try:
            handler.handle_one_request()
        except (ConnectionError, TimeoutError, OSError):
            return False
        del conn.buf[:rfile.tell()]
        conn.served += 1
        return not handler.close_connection


class OneRequestHandler(BaseHTTPRequestHandler):
    """A ``BaseHTTPRequestHandler`` made for one request whose head is already in ``rfile`` (see BoundedHTTPServer)."""

    protocol_version = "HTTP/1.1"

    def __init__(self, *args, **kwargs):  # built by for_request, never by socketserver
        raise TypeError("use OneRequestHandler.for_request(...)")

    @classmethod
    def for_request(cls, sock, addr, server, rfile):
        self = cls.__new__(cls)
        self.request = self.connection = sock
        self.client_address = addr
        self.server = server
        self.rfile = rfile
        self.wfile = _SocketWriter(sock)
        self.close_connection = True
        return self

    def send_response_only(self, code, message=None):
        if getattr(self, "request_version", None) == "HTTP/0.9":  # never answer without a status line
            self.request_version = "HTTP/1.0"
            self.close_connection = True
        super().send_response_only(code, message)

    def refuse_head_too_large(self):
        self.request_version, self.command, self.requestline = "HTTP/1.1", "", ""
        self.close_connection = True
        self.send_error(431, f"request line and headers longer than {self.server.max_head} bytes")

    def parse_request(self):
        """As http.server's, but HTTP/0.9 requests (no version, no status line in the answer) are refused."""
        ok = super().parse_request()
        if ok and self.request_version == "HTTP/0.9":
            self.send_error(400, "HTTP/0.9 requests are not supported; send HTTP/1.0 or HTTP/1.1")
            return False
        return ok
