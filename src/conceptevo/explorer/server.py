"""The explorer's local web server: the page, its data scripts, the workspace's patch sheets, a small JSON API.

Standard library only. Bound to 127.0.0.1 unless told otherwise. Only GET and
HEAD; only files of the workspace's ``patches/`` and ``figures/`` folders are
ever read from disk, and only after the decoded path has been checked segment
by segment (each a valid name, :mod:`conceptevo.records`) and resolved inside
that folder (a symbolic link out of it, even to another workspace file, is not
followed): ``..``, absolute paths, backslashes, NUL bytes and their
percent-encoded forms all get 404. Malformed query parameters get 400 with a
message; long request lines 414; request bodies and HTTP/0.9 are refused.

Connections are served by a fixed pool of threads with header and idle
timeouts and a cap on open connections (:mod:`conceptevo.explorer.pool`), so
idle or slow clients cannot use up the server's threads or file descriptors.
The workspace's arrays are read once (:class:`~conceptevo.explorer.data.ExplorerData`)
and served from memory; when ``manifest.json`` changes (a stage finished or
was redone), the data is read again. A file that cannot be read for lack of
resources (too many open files...) gets 503 with the reason, never "damaged".

API (all GET, JSON unless noted):

* ``/api/info`` — models, checkpoints, what is missing and how to compute it.
* ``/api/neuron?model=M&tag=T&id=ID`` — one neuron at one checkpoint: layer, 2-D
  position, distance moved, group, stimuli (dataset indices, strengths, boxes).
* ``/api/patches.png?model=M&tag=T&id=ID`` — its example patches side by side (PNG).
  (Text studies: ``/api/neuron`` also gives ``contexts``, each ``{before, token, after}`` as plain text.)
* ``/api/nearest?model=M&tag=T&id=ID[&k=5]`` — its nearest neurons in every other
  model (at the checkpoint nearest in time), in the unified space.
"""
from __future__ import annotations

import errno
import json
import logging
import posixpath
import re
import threading
import time
from collections import OrderedDict
from http import HTTPStatus
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

import numpy as np

from ..errors import ConceptEvoError, FileAccessError
from ..records import is_valid_name
from ..units import layer_of, split_neuron_id
from .data import FILE_ROOTS, KEY_RE, ExplorerData, manifest_signature
from .pool import BoundedHTTPServer, OneRequestHandler

log = logging.getLogger(__name__)

MAX_URL = 4096
K_RE = re.compile(r"[0-9]{1,3}")  # ASCII digits only ('²' and '５' are digits to str.isdigit)
FILE_CACHE_BYTES = 64 * 2**20      # served workspace files kept in memory (no descriptor per request)
FILE_TYPES = {".png": "image/png", ".pdf": "application/pdf", ".svg": "image/svg+xml", ".json": "application/json"}
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
CSP = ("default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data: blob:; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
#: Pages that may show the explorer in a frame when it is embedded (a notebook served on this machine, any port).
#: CSP has no form for IPv6 literals, so a notebook opened at http://[::1]:PORT cannot frame it.
LOOPBACK_FRAMERS = "'self' http://127.0.0.1:* http://localhost:* https://127.0.0.1:* https://localhost:*"


def page_html() -> bytes:
    """The explorer page (a single self-contained HTML file shipped with the package)."""
    return resources.files("conceptevo.explorer").joinpath("static/index.html").read_bytes()


class BadRequest(Exception):
    """Maps to 400 with the message."""


class NotFound(Exception):
    """Maps to 404 with the message."""


def safe_relative(path: str) -> Path:
    """Validate a URL path below a route (already split off); return it as a relative Path or raise NotFound.

    The path is percent-decoded once; any remaining '%' (double encoding), a
    backslash, NUL, a leading '/', or a segment that is not a valid name
    (:func:`conceptevo.records.is_valid_name`: so no empty, '.' or '..' segment)
    means 404. Model names and checkpoint tags follow the same rule, so every
    workspace file the page may load passes.
    """
    try:
        decoded = unquote(path, errors="strict")
    except UnicodeDecodeError:
        raise NotFound("not found") from None
    if not decoded or "%" in decoded or "\\" in decoded or "\x00" in decoded or decoded.startswith("/"):
        raise NotFound("not found")
    parts = decoded.split("/")
    for part in parts:
        if not is_valid_name(part):
            raise NotFound("not found")
    if posixpath.normpath(decoded) != decoded:
        raise NotFound("not found")
    return Path(*parts)


class ExplorerServer(BoundedHTTPServer):
    """The explorer over one workspace (see the module docstring); ``max_connections``: see BoundedHTTPServer."""

    def __init__(self, address, data: ExplorerData, max_connections: int | None = None):
        self._data = data
        self._reload_lock = threading.Lock()
        self._retry_at = 0.0
        self.root = Path(data.ws.path).resolve()
        self.page = page_html()
        self.allowed_hosts = set(LOOPBACK)
        self.files = _FileCache(FILE_CACHE_BYTES)
        super().__init__(address, ExplorerHandler, max_connections=max_connections)
        host = address[0]
        self.open_host = host in ("", "0.0.0.0", "::")
        self.allowed_hosts.add(host)
        self.frame_ancestors: str | None = None  # who may frame the page (CSP source list); None: nobody
        self.closed = False

    # -- in a notebook -----------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop serving and free the port; calling it again does nothing."""
        if self.closed:
            return
        self.shutdown()
        self.server_close()
        self.closed = True

    close = stop

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
        return False

    def __repr__(self) -> str:
        return f"<conceptevo explorer for {self.root} at {self.url}{' (stopped)' if self.closed else ''}>"

    def _repr_html_(self) -> str:
        """A notebook shows the explorer inline: an iframe on the loopback URL (when framing is allowed) and a link."""
        import html

        url = html.escape(self.url, quote=True)
        if self.closed:
            return f"<p>conceptevo explorer at {url}: stopped</p>"
        link = (f'<p><a href="{url}" target="_blank" rel="noopener">{url}</a> (the explorer of '
                f"{html.escape(str(self.root))}; <code>.stop()</code> stops it)</p>")
        if self.frame_ancestors is None:
            return link
        return (f'<iframe src="{url}" title="ConceptEvo explorer" width="100%" height="{int(self.frame_height)}" '
                f'style="border: 1px solid #ccc"></iframe>' + link)

    frame_height = 720

    @property
    def data(self) -> ExplorerData:
        """The workspace's data, read again first when its manifest changed since it was read."""
        data = self._data
        if manifest_signature(data.ws.manifest_path) == data.signature or time.monotonic() < self._retry_at:
            return data
        if not self._reload_lock.acquire(blocking=False):
            return data  # another request is reading it again: this one is answered from what is loaded
        try:
            data = self._data
            if manifest_signature(data.ws.manifest_path) != data.signature:
                try:
                    data = self._data = data.reloaded()
                    log.info("explorer: the workspace changed; its data was read again")
                except ConceptEvoError as e:
                    self._retry_at = time.monotonic() + 5.0
                    log.warning("explorer: the workspace changed but cannot be read again (%s); serving what was loaded", e)
            return data
        finally:
            self._reload_lock.release()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/"


class _FileCache:
    """Workspace files served from memory (LRU, ``limit`` bytes), keyed by path and the file's identity and age."""

    def __init__(self, limit: int):
        self.limit = limit
        self._lock = threading.Lock()
        self._items: OrderedDict[tuple, bytes] = OrderedDict()
        self._bytes = 0

    def read(self, path: Path, st) -> bytes:
        key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            body = self._items.get(key)
            if body is not None:
                self._items.move_to_end(key)
                return body
        body = path.read_bytes()
        if len(body) <= self.limit // 4:
            with self._lock:
                if key not in self._items:
                    self._items[key] = body
                    self._bytes += len(body)
                while self._bytes > self.limit:
                    _, old = self._items.popitem(last=False)
                    self._bytes -= len(old)
        return body


class ExplorerHandler(OneRequestHandler):
    server: ExplorerServer
    server_version = "conceptevo-explorer"
    sys_version = ""

    # -- plumbing ----------------------------------------------------------------------------------
    def log_message(self, fmt, *args):  # noqa: D401 - route through logging, quietly
        log.debug("%s - %s", self.address_string(), fmt % args)

    def _send(self, status: int, body: bytes, ctype: str, cache: str = "no-cache", head: bool = False, extra=()):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cross-Origin-Resource-Policy", "same-origin")
        for k, v in extra:
            self.send_header(k, v)
        if ctype.startswith("text/html"):
            framers = self.server.frame_ancestors
            if framers is None:
                self.send_header("Content-Security-Policy", CSP)
                self.send_header("X-Frame-Options", "DENY")
            else:
                self.send_header("Content-Security-Policy", CSP.replace("frame-ancestors 'none'", f"frame-ancestors {framers}"))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, obj, head: bool = False, extra=()):
        self._send(status, (json.dumps(obj, allow_nan=False) + "\n").encode(), "application/json; charset=utf-8", head=head, extra=extra)

    def _error(self, status: int, message: str, head: bool = False, extra=()):
        self._json(status, {"error": message, "status": status}, head=head, extra=extra)

    def send_error(self, code, message=None, explain=None):  # errors raised by http.server itself (e.g. 414, 400)
        try:
            self.close_connection = True
            self._error(int(code), message or HTTPStatus(code).phrase)
        except Exception:  # the socket may already be gone
            pass

    # -- methods -----------------------------------------------------------------------------------
    def do_GET(self):
        self._handle(head=False)

    def do_HEAD(self):
        self._handle(head=True)

    def _refuse(self):
        self.close_connection = True
        self._error(405, "only GET and HEAD are supported")

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _refuse

    def _handle(self, head: bool):
        try:
            if len(self.path) > MAX_URL:
                self.close_connection = True
                return self._error(414, f"request line longer than {MAX_URL} characters")
            if self.headers.get("Content-Length") not in (None, "0") or self.headers.get("Transfer-Encoding"):
                self.close_connection = True
                return self._error(400, "requests must not have a body")
            if not self._host_ok():
                return self._error(403, "unexpected Host header; open the explorer through the address it printed")
            self.data = self.server.data  # one snapshot of the workspace for the whole request
            self._route(head)
        except BadRequest as e:
            self._error(400, str(e), head)
        except NotFound as e:
            self._error(404, str(e) or "not found", head)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except FileAccessError as e:  # too many open files, permission, disk: say so, and that it may pass
            log.warning("explorer request %s: %s", self.path, e)
            self._error(503, str(e), head, extra=[("Retry-After", "1")])
        except OSError as e:
            if e.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EACCES, errno.EIO):
                raise
            log.warning("explorer request %s: %s", self.path, e)
            self._error(503, f"the server cannot read a file right now ({e.strerror}); retry in a moment", head,
                        extra=[("Retry-After", "1")])
        except ConceptEvoError as e:  # e.g. a damaged workspace file: the message names it and the fix
            log.warning("explorer request %s: %s", self.path, e)
            self._error(500, str(e), head)
        except Exception as e:  # never leak a traceback to the client
            log.exception("explorer request %s failed", self.path)
            try:
                self._error(500, f"internal error: {type(e).__name__}", head)
            except Exception:
                pass

    def _host_ok(self) -> bool:
        if self.server.open_host:
            return True
        host = self.headers.get("Host")
        if host is None:
            return True  # HTTP/1.0 clients
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if host.startswith("["):
            name = host[: host.find("]") + 1]
        return name.lower() in self.server.allowed_hosts

    # -- routes ------------------------------------------------------------------------------------
    def _route(self, head: bool):
        parts = urlsplit(self.path)
        path = parts.path
        if "\\" in path or "\x00" in path or "%5c" in path.lower() or "%00" in path:
            raise NotFound("not found")
        if path in ("/", "/index.html"):  # the page reads its own query (panels=..., step=...)
            return self._send(200, self.server.page, "text/html; charset=utf-8", head=head)
        if path.startswith("/data/"):
            rel = safe_relative(path[len("/data/"):])
            name = rel.as_posix()
            if not name.endswith(".js") or "/" in name or not KEY_RE.match(name[:-3]):
                raise NotFound("not found")
            try:
                body = self.data.script(name[:-3])
            except KeyError as e:
                raise NotFound(str(e).strip("'\"")) from None
            return self._send(200, body, "text/javascript; charset=utf-8", head=head)
        if path.startswith("/files/"):
            return self._file(safe_relative(path[len("/files/"):]), head)
        if path.startswith("/api/"):
            q = self._query(parts.query)
            route = path[len("/api/"):]
            if route == "info":
                self._only(q, ())
                return self._json(200, self._info(), head)
            if route == "neuron":
                return self._json(200, self._neuron(q), head)
            if route == "patches.png":
                model, tag, row = self._target(q, ("model", "tag", "id"))
                if not self.data.store.has(model, tag):
                    raise NotFound(f"no example patches for {model} {tag}; compute them with `conceptevo patches WORKSPACE`")
                return self._send(200, self.data.store.strip_png(model, tag, row), "image/png", head=head)
            if route == "nearest":
                return self._json(200, self._nearest(q), head)
            raise NotFound(f"no API route {route!r}; routes: info, neuron, patches.png, nearest")
        raise NotFound("not found")

    def _file(self, rel: Path, head: bool):
        if rel.parts[0] not in FILE_ROOTS or rel.suffix.lower() not in FILE_TYPES:
            raise NotFound("not found")
        folder = self.server.root / rel.parts[0]  # patches/ or figures/ itself, not followed if it is a link
        full = (self.server.root / rel).resolve()
        if not full.is_relative_to(folder) or not full.is_file():
            raise NotFound("not found")
        st = full.stat()
        if st.st_size > 256 * 2**20:
            raise NotFound("not found")
        self._send(200, self.server.files.read(full, st), FILE_TYPES[rel.suffix.lower()], cache="max-age=60", head=head)

    # -- API helpers -------------------------------------------------------------------------------
    def _query(self, query: str) -> dict[str, str]:
        if len(query) > 1024:
            raise BadRequest("query string too long (1024 characters at most)")
        if not query:
            return {}
        try:
            raw = parse_qs(query, keep_blank_values=True, strict_parsing=True, max_num_fields=12, errors="strict")
        except (ValueError, UnicodeDecodeError) as e:
            raise BadRequest(f"malformed query string ({e})") from None
        out = {}
        for k, vals in raw.items():
            if len(vals) != 1:
                raise BadRequest(f"parameter {k!r} given {len(vals)} times; give it once")
            if "\x00" in vals[0] or len(vals[0]) > 300:
                raise BadRequest(f"parameter {k!r} is malformed")
            out[k] = vals[0]
        return out

    @staticmethod
    def _only(q: dict, allowed) -> None:
        extra = sorted(set(q) - set(allowed))
        if extra:
            raise BadRequest(f"unknown parameter(s) {', '.join(map(repr, extra))}; expected {', '.join(allowed) or 'none'}")

    def _target(self, q: dict, needed, optional=()) -> tuple[str, str, int]:
        self._only(q, tuple(needed) + tuple(optional))
        for name in needed:
            if not q.get(name):
                raise BadRequest(f"missing parameter {name!r}; expected {', '.join(needed)}")
        d = self.data
        model, tag, nid = q["model"], q["tag"], q["id"]
        try:
            split_neuron_id(nid)
        except ConceptEvoError as e:
            raise BadRequest(str(e)) from None
        try:
            d.model_index(model)
            d.tag_index(model, tag)
            return model, tag, d.neuron_row(model, nid)
        except KeyError as e:
            raise NotFound(str(e).strip("'\"")) from None

    def _info(self) -> dict:
        d = self.data
        return {
            "workspace": str(d.ws.path), "base": d.ws.manifest.get("base"),
            "models": [{"name": m, "neurons": len(d.ids[m]), "checkpoints": d.tags[m]} for m in d.models],
            "missing": d.missing(),
            "importance": [{"model": r.model, "from": r.tag_from, "to": r.tag_to, "class": r.class_index} for r in d.importance],
        }

    def _neuron(self, q: dict) -> dict:
        model, tag, row = self._target(q, ("model", "tag", "id"))
        d = self.data
        ws = d.ws
        fin = lambda x: float(x) if x is not None and np.isfinite(x) else None  # noqa: E731
        xy = d.layouts.get((model, tag))
        moved = d.moved.get((model, tag))
        groups = d.groups.get((model, tag))
        out = {"model": model, "tag": tag, "id": q["id"], "row": row, "layer": layer_of(q["id"]),
               "xy": [fin(xy[row, 0]), fin(xy[row, 1])] if xy is not None else None,
               "moved": fin(moved[row]) if moved is not None else None,
               "group": int(groups[row]) if groups is not None else None,
               "stimuli": None, "patches": None}
        if ws.stage(f"stimuli/{model}/{tag}") is not None:
            s = d.stimuli(model, tag)
            out["stimuli"] = {"images": [int(i) for i in s.indices[row]], "strengths": [fin(v) for v in s.values[row]]}
            if d.store.has(model, tag):
                out["stimuli"]["boxes"] = d.boxes(model, tag)[row].tolist()
                out["patches"] = "/api/patches.png?" + urlencode({"model": model, "tag": tag, "id": q["id"]})
            if ws.stage(f"contexts/{model}/{tag}") is not None:  # text: the stimuli as token contexts (plain text in JSON)
                from ..contexts import context_strings, load_contexts, workspace_tokenizer

                tk = workspace_tokenizer(ws)
                out["contexts"] = [dict(zip(("before", "token", "after"), context_strings(tk, c)))
                                   for c in load_contexts(ws, model, tag)[row]]
        return out

    def _nearest(self, q: dict) -> dict:
        model, tag, row = self._target(q, ("model", "tag", "id"), optional=("k",))
        k = q.get("k", "5")
        if not K_RE.fullmatch(k) or not 1 <= int(k) <= 100:
            raise BadRequest(f"parameter 'k' must be an integer in 1..100 (ASCII digits), got {k!r}")
        k = int(k)
        d = self.data
        v = d.vectors.get((model, tag))
        if v is None or not np.isfinite(v[row]).all():
            raise NotFound(f"{model} {tag} has no vector for {q['id']}; the checkpoint is not projected onto the unified space")
        t_here = d.times[model][d.tag_index(model, tag)]
        out = []
        for m in d.models:
            if m == model:
                continue
            times = d.times[m]
            ti = int(np.argmin([abs(t - t_here) for t in times]))
            other = d.vectors.get((m, d.tags[m][ti]))
            if other is None:
                out.append({"model": m, "tag": d.tags[m][ti], "neighbours": None})
                continue
            dist = np.linalg.norm(other - v[row], axis=1)
            dist[~np.isfinite(dist)] = np.inf
            order = np.argsort(dist, kind="stable")[:k]
            out.append({"model": m, "tag": d.tags[m][ti],
                        "neighbours": [{"id": d.ids[m][i], "distance": float(dist[i])} for i in order if np.isfinite(dist[i])]})
        return {"model": model, "tag": tag, "id": q["id"], "nearest": out}


def make_server(ws, host: str = "127.0.0.1", port: int = 8000, kmeans: int = 8, data: ExplorerData | None = None,
                max_connections: int | None = None) -> ExplorerServer:
    """Build (not start) the explorer server for a workspace; ``port=0`` picks a free port."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConceptEvoError(f"port must be an integer in 0..65535, got {port!r}")
    data = data or ExplorerData(ws, kmeans=kmeans)
    try:
        return ExplorerServer((host, port), data, max_connections=max_connections)
    except OSError as e:
        raise ConceptEvoError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port (0 picks a free one)") from None


def serve(ws, host: str = "127.0.0.1", port: int = 8000, kmeans: int = 8, open_browser: bool = False) -> None:
    """Serve the explorer until interrupted."""
    server = make_server(ws, host, port, kmeans)
    if host not in LOOPBACK:
        log.warning("the explorer listens on %s: anyone who can reach this machine can read the workspace's pictures", host)
    print(f"ConceptEvo explorer for {ws.path} at {server.url}  (Ctrl-C to stop)", flush=True)
    if open_browser:
        import webbrowser

        threading.Timer(0.5, webbrowser.open, args=(server.url,)).start()
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
