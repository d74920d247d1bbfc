"""The explorer: data scripts, the server's API and safety rules, the static export, and the page in a real browser."""
from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import os
import re
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fabricated
from conceptevo.errors import ConceptEvoError
from conceptevo.explorer import ExplorerData, export_site, make_server, page_html

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
from conftest import CHROMIUM, launch_chromium


pytestmark = pytest.mark.usefixtures("one_thread_module")  # tiny models: one torch thread


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return fabricated.shared(tmp_path_factory)


@pytest.fixture(scope="module")
def data(ws):
    return ExplorerData(ws, kmeans=4)


@pytest.fixture(scope="module")
def bare_ws(tmp_path_factory):
    """A workspace missing stages: no patches, no importance, one checkpoint without a layout."""
    w = fabricated.shared(tmp_path_factory, name="bare", patches=False, importance=False,
                          models=fabricated.MODELS[:1])
    w.layout_path("vgg", "e0.5").unlink()
    return w


class Running:
    def __init__(self, server):
        self.server = server
        self.thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.host, self.port = server.server_address[:2]

    def request(self, path, method="GET", headers=None, body=None):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            conn.putrequest(method, path, skip_host=bool(headers and "Host" in headers), skip_accept_encoding=True)
            for k, v in (headers or {}).items():
                conn.putheader(k, v)
            if body is not None:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            r = conn.getresponse()
            return r.status, dict(r.getheaders()), r.read()
        finally:
            conn.close()

    def json(self, path):
        status, _, body = self.request(path)
        return status, json.loads(body)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def server(ws, data):
    r = Running(make_server(ws, port=0, data=data))
    yield r
    r.close()


@pytest.fixture(scope="module")
def bare_server(bare_ws):
    r = Running(make_server(bare_ws, port=0, kmeans=3))
    yield r
    r.close()


def f32(s):
    return np.frombuffer(base64.b64decode(s), dtype="<f4")


def i32(s):
    return np.frombuffer(base64.b64decode(s), dtype="<i4")


def script_obj(raw: bytes, key: str):
    text = raw.decode()
    prefix = f"window.__ceLoad({json.dumps(key)},"
    assert text.startswith(prefix) and text.rstrip().endswith(");")
    return json.loads(text[len(prefix):text.rstrip().rindex(")")])


# ------------------------------------------------------------------------------ data
def test_data_scripts_carry_the_workspace(ws, data):
    meta = script_obj(data.script("meta"), "meta")
    assert [m["name"] for m in meta["models"]] == ws.models
    assert meta["missing"] == []
    vgg = meta["models"][0]
    stim = ws.stimuli("vgg", "e1")
    assert vgg["ids"] == stim.neuron_ids and vgg["n"] == len(stim)
    assert [c["tag"] for c in vgg["checkpoints"]] == ws.tags("vgg")
    assert vgg["checkpoints"][1]["metrics"]["train_top1"] == pytest.approx(0.5)
    assert len(i32(vgg["layer_of"])) == len(stim) and vgg["layers"] == [i.name for i in stim.layers]
    ck = script_obj(data.script("ck-0-1"), "ck-0-1")
    np.testing.assert_array_equal(f32(ck["xy"]).reshape(-1, 2), ws.layout("vgg", "e1"))
    moved = f32(script_obj(data.script("ck-0-0"), "ck-0-0")["moved"])
    assert np.isnan(moved).all()  # nothing before the first checkpoint
    v0, v1 = ws.projection("vgg", "e0.5").vectors, ws.projection("vgg", "e1").vectors
    np.testing.assert_allclose(f32(ck["moved"]), np.linalg.norm(v1 - v0, axis=1), rtol=1e-5)
    groups = i32(ck["group"])
    assert groups.min() >= 0 and groups.max() < 4
    st = script_obj(data.script("stim-1-2"), "stim-1-2")
    np.testing.assert_array_equal(i32(st["indices"]).reshape(-1, st["k"]), ws.stimuli("resnet", "e2").indices)
    imp = script_obj(data.script("imp-0"), "imp-0")
    assert imp["model"] == "vgg" and imp["from"] == "e0.5" and imp["to"] == "e2" and imp["class"] == 1
    assert len(imp["top"]) > 0 and imp["top"][0][1] >= imp["top"][-1][1]
    for key in ("nope", "ck-9-0", "ck-0-9", "imp-3", "../meta"):
        with pytest.raises(KeyError):
            data.script(key)
    with pytest.raises(ConceptEvoError, match="kmeans"):
        ExplorerData(ws, kmeans=0)


def test_missing_stages_are_named_with_the_command(bare_ws):
    d = ExplorerData(bare_ws, kmeans=3)
    missing = {m["what"]: m for m in d.missing()}
    assert set(missing) == {"patches", "importance", "layout"}
    assert "conceptevo patches" in missing["patches"]["how"]
    assert "vgg e0.5" in missing["layout"]["detail"]
    ck = script_obj(d.script("ck-0-0"), "ck-0-0")
    assert ck["xy"] is None
    meta = script_obj(d.script("meta"), "meta")
    assert meta["images"] is None and meta["importance"] == []
    public = ExplorerData(bare_ws, kmeans=3, public=True)
    assert str(bare_ws.path) not in public.script("meta").decode()


# ------------------------------------------------------------------------------ server
def test_server_serves_page_data_and_sheets(server, ws):
    status, headers, body = server.request("/")
    assert status == 200 and body == page_html() and "Content-Security-Policy" in headers
    status, headers, body = server.request("/data/meta.js")
    assert status == 200 and headers["Content-Type"].startswith("text/javascript")
    status, headers, body = server.request("/files/patches/vgg/e1/sheet-000.png")
    assert status == 200 and body[:4] == b"\x89PNG" and headers["Content-Type"] == "image/png"
    status, _, _ = server.request("/", method="HEAD")
    assert status == 200
    assert server.server.server_address[0] == "127.0.0.1"


def test_api_neuron_patches_nearest(server, ws):
    status, obj = server.json("/api/info")
    assert status == 200 and [m["name"] for m in obj["models"]] == ["vgg", "resnet"]
    status, obj = server.json("/api/neuron?model=vgg&tag=e1&id=features.7:3")
    stim = ws.stimuli("vgg", "e1")
    row = stim.neuron_ids.index("features.7:3")
    assert status == 200 and obj["row"] == row and obj["stimuli"]["images"] == stim.indices[row].tolist()
    assert len(obj["stimuli"]["boxes"]) == stim.k
    status, headers, body = server.request(obj["patches"])
    assert status == 200 and headers["Content-Type"] == "image/png"
    im = np.asarray(Image.open(io.BytesIO(body)))
    from conceptevo.patches import PatchStore

    p = PatchStore(ws).patches("vgg", "e1", row)
    assert im.shape[:2] == (p.shape[1], p.shape[0] * p.shape[2])
    np.testing.assert_array_equal(im[:, : p.shape[2]], p[0])
    status, obj = server.json("/api/nearest?model=vgg&tag=e1&id=features.7:3&k=3")
    assert status == 200 and obj["nearest"][0]["model"] == "resnet" and len(obj["nearest"][0]["neighbours"]) == 3
    d = [n["distance"] for n in obj["nearest"][0]["neighbours"]]
    assert d == sorted(d)


@pytest.mark.parametrize("path", [
    "/files/../manifest.json", "/files/%2e%2e/manifest.json", "/files/%2E%2E/%2E%2E/etc/passwd",
    "/files/patches/../manifest.json", "/files/patches/%2e%2e/manifest.json", "/files/patches/..%2fmanifest.json",
    "/files/patches/vgg/..%2f..%2f..%2fmanifest.json", "/files/%252e%252e/manifest.json", "/files//etc/passwd",
    "/files/%2fetc%2fpasswd", "/files/patches\\..\\manifest.json", "/files/patches/%5c..%5cmanifest.json",
    "/files/patches/vgg/e1/sheet-000.png%00.json", "/files/manifest.json", "/files/stimuli/vgg/e1/indices.npy",
    "/files/patches/images/pixels.npy", "/data/../manifest.json", "/data/%2e%2e%2fmanifest.json", "/data/meta",
    "/data/ck-0-99.js", "/data/x.js", "/../manifest.json", "/manifest.json", "/etc/passwd", "/api/nope",
    "/files/patches/./vgg/e1/sheet-000.png", "/files/patches/vgg/e1/missing.png",
])
def test_paths_outside_the_served_files_are_404(server, path):
    status, _, body = server.request(path)
    assert status == 404, (path, body[:200])
    assert b"root:" not in body and b"conceptevo-workspace" not in body


def test_symlink_out_of_the_workspace_is_404(server, ws, tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG secret")
    link = ws.path / "patches" / "leak.png"
    link.symlink_to(secret)
    try:
        status, _, body = server.request("/files/patches/leak.png")
        assert status == 404 and b"secret" not in body
    finally:
        link.unlink()


@pytest.mark.parametrize("query, message", [
    ("", "missing parameter 'model'"),
    ("model=vgg&tag=e1", "missing parameter 'id'"),
    ("model=vgg&tag=e1&id=nocolon", "malformed neuron id"),
    ("model=vgg&tag=e1&id=features.0:1&id=features.0:2", "given 2 times"),
    ("model=vgg&tag=e1&id=features.0:1&colour=red", "unknown parameter"),
    ("model=vgg&&tag=e1", "malformed query"),
    ("model=vgg&tag=e1&id=features.0:1&k=abc", "unknown parameter"),
    ("model=" + "x" * 400 + "&tag=e1&id=a:1", "malformed"),
    ("model=%ff&tag=e1&id=a:1", "malformed query"),
])
def test_malformed_parameters_are_400_with_a_message(server, query, message):
    status, obj = server.json("/api/neuron?" + query)
    assert status == 400 and message in obj["error"], obj


def test_unknown_things_are_404_and_other_rules(server, bare_server):
    status, obj = server.json("/api/neuron?model=nope&tag=e1&id=a:1")
    assert status == 404 and "no model 'nope'" in obj["error"]
    status, obj = server.json("/api/neuron?model=vgg&tag=e9&id=features.0:1")
    assert status == 404 and "no checkpoint" in obj["error"]
    status, obj = server.json("/api/neuron?model=vgg&tag=e1&id=features.0:999")
    assert status == 404
    status, obj = server.json("/api/nearest?model=vgg&tag=e1&id=features.0:1&k=1000")
    assert status == 400 and "'k'" in obj["error"]
    status, _, _ = server.request("/api/info", method="POST", body=b"x" * 10)
    assert status == 405
    status, _, _ = server.request("/", headers={"Content-Length": "5"}, body=b"hello")
    assert status == 400
    status, _, _ = server.request("/data/meta.js?" + "a" * 5000)
    assert status == 414
    status, _, _ = server.request("/", headers={"Host": "evil.example:80"})
    assert status == 403
    status, _, _ = server.request("/", headers={"Host": f"localhost:{server.port}"})
    assert status == 200
    # a workspace without patches: the API says how to make them
    status, obj = bare_server.json("/api/patches.png?model=vgg&tag=e1&id=features.0:1")
    assert status == 404 and "conceptevo patches" in obj["error"]
    status, obj = bare_server.json("/api/neuron?model=vgg&tag=e0.5&id=features.0:1")
    assert status == 200 and obj["xy"] is None and obj["patches"] is None


def test_port_errors(ws, data):
    with pytest.raises(ConceptEvoError, match="port"):
        make_server(ws, port=70000, data=data)
    r = Running(make_server(ws, port=0, data=data))
    try:
        with pytest.raises(ConceptEvoError, match="another --port"):
            make_server(ws, port=r.port, data=data)
    finally:
        r.close()


# ------------------------------------------------------------------------------ arrays read once
_NPY_OPENS: dict = {"on": False, "paths": []}


def _audit(event, args):  # installed once (audit hooks cannot be removed); records only while a test asks
    if _NPY_OPENS["on"] and event == "open" and isinstance(args[0], (str, os.PathLike)) and str(args[0]).endswith(".npy"):
        _NPY_OPENS["paths"].append(str(args[0]))


sys.addaudithook(_audit)


@contextlib.contextmanager
def npy_opens():
    """Every .npy file opened (by anything: numpy, conceptevo, a memory map) inside the block."""
    _NPY_OPENS["paths"] = []
    _NPY_OPENS["on"] = True
    try:
        yield _NPY_OPENS["paths"]
    finally:
        _NPY_OPENS["on"] = False


def test_server_reads_each_array_once_and_again_when_the_manifest_changes(ws, tmp_path):
    """After a first request for each thing, the server answers from memory: 5 more rounds of every route open no
    .npy file. A new manifest (a stage finished) makes it read the workspace again, once."""
    from conceptevo.workspace import Workspace

    shutil.copytree(ws.path, tmp_path / "study")
    w = Workspace(tmp_path / "study")
    r = Running(make_server(w, port=0, kmeans=3))
    try:
        ids = w.stimuli("vgg", "e1").neuron_ids[::7]
        paths = ["/data/meta.js", "/data/stim-0-1.js", "/data/ck-1-2.js", "/files/patches/vgg/e1/sheet-000.png"]
        for m, t in (("vgg", "e1"), ("resnet", "e2")):
            for nid in (ids if m == "vgg" else w.stimuli(m, t).neuron_ids[::9]):
                q = f"model={m}&tag={t}&id={nid}"
                paths += [f"/api/neuron?{q}", f"/api/patches.png?{q}", f"/api/nearest?{q}&k=3"]
        assert {p: r.request(p)[0] for p in paths} == {p: 200 for p in paths}
        with npy_opens() as opened:
            for _ in range(5):
                for p in paths:
                    assert r.request(p)[0] == 200, p
        assert opened == [], f"{len(opened)} .npy reads for {5 * len(paths)} requests: {sorted(set(opened))[:3]}"
        before = r.server.data
        w.finish("touched", "k")  # the manifest changes
        with npy_opens() as opened:
            for p in paths:
                assert r.request(p)[0] == 200, p
        assert opened and r.server.data is not before
        with npy_opens() as opened:
            for p in paths:
                assert r.request(p)[0] == 200, p
        assert opened == []
    finally:
        r.close()


def test_resource_failures_are_503_not_damaged(server, monkeypatch):
    from conceptevo.errors import FileAccessError

    def out_of_files(*args):
        raise FileAccessError("cannot read x.npy: this process has too many open files; ...")

    monkeypatch.setattr(ExplorerData, "stimuli", out_of_files)
    status, headers, body = server.request("/api/neuron?model=vgg&tag=e2&id=features.0:1")
    assert status == 503 and headers.get("Retry-After") == "1" and b"too many open files" in body


# ------------------------------------------------------------------------------ names, links, numbers, HTTP/0.9
@pytest.fixture(scope="module")
def odd_ws(tmp_path_factory):
    """A study whose model and checkpoint names use what the name rule allows beyond [A-Za-z0-9._-]."""
    return fabricated.shared(tmp_path_factory, name="odd", importance=False, models=[("vgg net #1", "vgg_like")],
                             tags=[("epoch=0 (a)", 0.5), ("epoch=1 + é", 1.0)])


def test_sheets_of_any_valid_name_are_served_and_exported(odd_ws, tmp_path):
    from urllib.parse import unquote, urlencode

    data = ExplorerData(odd_ws, kmeans=2)
    r = Running(make_server(odd_ws, port=0, data=data))
    try:
        status, _, body = r.request("/data/meta.js")
        meta = script_obj(body, "meta")
        [model] = meta["models"]
        assert model["name"] == "vgg net #1"
        sheets = [u for c in model["checkpoints"] for u in c["patches"]["sheets"]]
        assert len(sheets) >= 2
        for url in sheets:
            status, headers, body = r.request("/" + url)
            assert status == 200 and body[:4] == b"\x89PNG", url
        nid = odd_ws.stimuli("vgg net #1", "epoch=1 + é").neuron_ids[0]
        q = urlencode({"model": "vgg net #1", "tag": "epoch=1 + é", "id": nid})
        assert r.request(f"/api/patches.png?{q}")[0] == 200
        assert r.request(f"/api/neuron?{q}")[0] == 200
    finally:
        r.close()
    index = export_site(odd_ws, tmp_path / "site", data=data)
    for url in sheets:  # a file:// URL names the file with its percent-encoding undone
        assert (index.parent / unquote(url)).is_file(), url


@pytest.mark.parametrize("name", ["a:b", "a,b", "50%", ".hidden", " padded", "a/b", "tab\there", "x" * 201])
def test_names_outside_the_rule_are_refused_where_they_enter(tmp_path, name):
    from conceptevo.config import ModelConfig
    from conceptevo.errors import CheckpointError
    from conceptevo.models import list_checkpoints

    with pytest.raises(ConceptEvoError, match="model name"):
        ModelConfig(name=name, arch="vgg_like", checkpoints="x").validate()
    if "/" not in name and len(name) < 200:
        (tmp_path / f"{name}.pt").write_bytes(b"")
        # a folder listing skips hidden files, so the file is also named explicitly
        for source in ([tmp_path / f"{name}.pt"],) if name.startswith(".") else (tmp_path, [tmp_path / f"{name}.pt"]):
            with pytest.raises(CheckpointError, match="checkpoint tag"):
                list_checkpoints(source)


def test_symlinks_to_other_workspace_files_are_404(server, ws):
    """Only patches/ and figures/ are served: a link inside them to any other file, in the workspace or not, is not followed."""
    made_figures = not (ws.path / "figures").exists()
    (ws.path / "figures").mkdir(exist_ok=True)
    links = {ws.path / "patches" / "leak.json": ws.path / "manifest.json",
             ws.path / "patches" / "vgg" / "ids.json": ws.path / "stimuli" / "vgg" / "e1" / "neurons.json",
             ws.path / "figures" / "sheet.png": ws.path / "patches" / "vgg" / "e1" / "sheet-000.png"}
    try:
        for link, target in links.items():
            link.symlink_to(target)
        for link in links:
            status, _, body = server.request("/files/" + link.relative_to(ws.path).as_posix())
            assert status == 404 and b"conceptevo-workspace" not in body and b"neuron_ids" not in body, link
    finally:
        for link in links:
            link.unlink(missing_ok=True)
        if made_figures:
            (ws.path / "figures").rmdir()


@pytest.mark.parametrize("k", ["%C2%B2", "%EF%BC%95", "%D9%A3", "+5", "5.0", "05%00"])
def test_k_must_be_ascii_digits(server, k):
    status, obj = server.json(f"/api/nearest?model=vgg&tag=e1&id=features.0:1&k={k}")
    assert status == 400 and "'k'" in obj["error"], obj


def test_http_0_9_is_refused_with_a_status_line(server):
    import socket

    for request in (b"GET /\r\n", b"GET /\r\n\r\n", b"POST /\r\n"):
        with socket.create_connection((server.host, server.port), timeout=10) as sock:
            sock.sendall(request)
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        first = reply.split(b"\r\n", 1)[0]
        assert first.startswith(b"HTTP/1.") and b" 400 " in first + b" ", (request, reply[:80])
        assert b"<html" not in reply.lower()


# ------------------------------------------------------------------------------ static export
def test_export_is_self_contained(ws, data, tmp_path):
    out = tmp_path / "site"
    index = export_site(ws, out, data=ExplorerData(ws, kmeans=4, public=True))
    assert index == out / "index.html"
    assert sorted(p.name for p in (out / "data").iterdir()) == sorted(f"{k}.js" for k in data.keys())
    assert (out / "files" / "patches" / "vgg" / "e1" / "sheet-000.png").exists()
    assert (out / "files" / "patches" / "images" / "sheet-000.png").exists()
    html = index.read_text()
    assert not re.search(r"(?:src|href)\s*=\s*[\"']?(?:https?:)?//", html), "the page must not load anything from the network"
    assert not re.search(r"https?://", html)
    for p in (out / "data").iterdir():
        assert str(ws.path) not in p.read_text()
    export_site(ws, out, data=data)  # a previous export is replaced
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(ConceptEvoError, match="not empty"):
        export_site(ws, tmp_path / "other", data=data)


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_export_follows_the_umask(ws, data, tmp_path, umask, file_mode, dir_mode):
    """Under umask 022 another user (a web server) can read every file of the site; under 077 nobody else can."""
    old = os.umask(umask)
    try:
        export_site(ws, tmp_path / "site", data=data)
    finally:
        os.umask(old)
    paths = list((tmp_path / "site").rglob("*"))
    assert any(p.name == "index.html" for p in paths) and any(p.suffix == ".js" for p in paths)
    wrong = [(p.name, oct(p.stat().st_mode & 0o777)) for p in paths
             if p.stat().st_mode & 0o777 != (file_mode if p.is_file() else dir_mode)]
    assert wrong == []


# ------------------------------------------------------------------------------ in a real browser
def _browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}")
    sync_api = pytest.importorskip("playwright.sync_api")
    pw = sync_api.sync_playwright().start()
    try:
        return pw, launch_chromium(pw)
    except BaseException:  # the skip of a browser that does not start
        pw.stop()
        raise


@pytest.fixture(scope="module")
def browser():
    pw, b = _browser()
    yield b
    b.close()
    pw.stop()


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport={"width": 1280, "height": 800}, device_scale_factor=1)
    pg = ctx.new_page()
    pg.errors = []
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    pg.on("console", lambda m: pg.errors.append(m.text) if m.type == "error" else None)
    # no network: anything that is not the local server or a file fails the test
    pg.route(re.compile(r"^(?!http://127\.0\.0\.1|file://|data:).*"), lambda route: (pg.errors.append("network: " + route.request.url), route.abort()))
    yield pg
    ctx.close()


def wait_ready(pg):
    pg.wait_for_selector("body[data-ready='1']", state="attached", timeout=15000)


def poll(pg, expr, timeout=5.0):
    """Wait until a JS expression is truthy (evaluated through the protocol, so the page's CSP stays on)."""
    import time

    end = time.monotonic() + timeout
    while True:
        got = pg.evaluate(expr)
        if got:
            return got
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {expr}")
        pg.wait_for_timeout(50)


def shot(pg, name):
    ARTIFACTS.mkdir(exist_ok=True)
    pg.screenshot(path=str(ARTIFACTS / name))


def hover_isolated(pg, panel=0):
    row = pg.evaluate(f"window.__conceptevo.isolated({panel}, 8)")
    assert row >= 0, "no isolated point to hover"
    pos = pg.evaluate(f"window.__conceptevo.screenPos({panel}, {row})")
    pg.mouse.move(pos["x"] + 1, pos["y"])
    return row, pos


def test_page_draws_every_neuron_hover_shows_patches_slider_moves_points(server, ws, page):
    page.goto(server.server.url + "?panels=vgg,resnet&step=1")
    wait_ready(page)
    panels = page.evaluate("window.__conceptevo.panels()")
    assert [(p["model"], p["tag"]) for p in panels] == [("vgg", "e1"), ("resnet", "e1")]
    for p in panels:
        assert p["drawnCount"] == p["n"] == len(ws.stimuli(p["model"], p["tag"]))
    shot(page, "explorer-loaded.png")

    row, pos = hover_isolated(page, 0)
    poll(page, "document.getElementById('tooltip').dataset.patches === '5'")
    tip = page.evaluate("(() => { const t = document.getElementById('tooltip'); return {hidden: t.hidden, neuron: t.dataset.neuron, tag: t.dataset.tag, text: t.innerText}; })()")
    assert not tip["hidden"] and tip["neuron"] == ws.stimuli("vgg", "e1").neuron_ids[row] and tip["tag"] == "e1"
    # the patches really are on the tooltip's canvas: compare with the stored patch
    px = page.evaluate("(() => { const c = document.querySelector('#tooltip canvas'); const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let s = 0; for (let i = 0; i < d.length; i += 4) s += d[i] + d[i+1] + d[i+2]; return s; })()")
    assert px > 0
    shot(page, "explorer-hover.png")

    before = page.evaluate("window.__conceptevo.dataPos(0, 3)")
    page.mouse.move(5, 5)
    page.eval_on_selector("#slider", "(s) => { s.value = 2; s.dispatchEvent(new Event('input', {bubbles: true})); }")
    poll(page, "window.__conceptevo.panels()[0].tag === 'e2'")
    page.wait_for_timeout(100)
    after = page.evaluate("window.__conceptevo.dataPos(0, 3)")
    np.testing.assert_allclose(before, ws.layout("vgg", "e1")[3], rtol=1e-6)
    np.testing.assert_allclose(after, ws.layout("vgg", "e2")[3], rtol=1e-6)
    assert page.evaluate("window.__conceptevo.panels()[0].drawnCount") == len(ws.stimuli("vgg", "e2"))
    # halfway between two checkpoints the points are halfway
    page.evaluate("window.__conceptevo.setStep(1.5)")
    page.wait_for_timeout(100)
    mid = page.evaluate("window.__conceptevo.dataPos(0, 3)")
    np.testing.assert_allclose(mid, (ws.layout("vgg", "e1")[3] + ws.layout("vgg", "e2")[3]) / 2, rtol=1e-5, atol=1e-6)
    shot(page, "explorer-slider.png")

    # click: trajectory and nearest neurons in the other model; colour by group; search
    page.evaluate("window.__conceptevo.setStep(2)")
    page.wait_for_timeout(100)
    row, pos = hover_isolated(page, 0)
    page.mouse.click(pos["x"] + 1, pos["y"])
    page.wait_for_selector("#trajrows .row")
    assert page.locator("#trajrows .row").count() == 3
    page.wait_for_selector("#tab-neuron .link")
    page.select_option("#color", "group")
    page.fill("#search", "resnet/layers.1.conv1:2")
    page.press("#search", "Enter")
    poll(page, "document.querySelector('#tab-neuron h3').textContent.includes('layers.1.conv1:2')")
    page.mouse.move(5, 5)
    shot(page, "explorer-selected.png")
    page.fill("#search", "no.such:1")
    page.press("#search", "Enter")
    assert "no neuron" in page.inner_text("#tab-neuron")
    page.click("aside nav button[data-tab=classes]")
    page.wait_for_selector("#tab-classes table.top")
    page.click("aside nav button[data-tab=curves]")
    shot(page, "explorer-curves.png")
    assert page.errors == []


def test_page_on_a_workspace_missing_stages(bare_server, bare_ws, page):
    page.goto(bare_server.server.url + "?step=0")
    wait_ready(page)
    banner = page.inner_text("#banner")
    assert "conceptevo patches" in banner or "conceptevo run" in banner
    assert "no 2-D layout" in page.inner_text(".panel .empty")
    assert page.evaluate("window.__conceptevo.panels()[0].drawnCount") == 0
    page.evaluate("window.__conceptevo.setStep(1)")
    poll(page, "window.__conceptevo.panels()[0].drawnCount > 0")
    assert page.evaluate("window.__conceptevo.panels()[0].drawnCount") == len(bare_ws.stimuli("vgg", "e1"))
    hover_isolated(page, 0)
    page.wait_for_selector("#tooltip:not([hidden])")
    assert "no patches computed" in page.inner_text("#tooltip")
    page.click("aside nav button[data-tab=status]")
    assert "conceptevo patches" in page.inner_text("#tab-status")
    shot(page, "explorer-missing-stages.png")
    assert page.errors == []


def test_static_export_works_from_file_urls(ws, data, page, tmp_path):
    index = export_site(ws, tmp_path / "site", data=data)
    page.goto(index.as_uri() + "?panels=resnet")
    wait_ready(page)
    [p] = page.evaluate("window.__conceptevo.panels()")
    assert p["model"] == "resnet" and p["drawnCount"] == len(ws.stimuli("resnet", p["tag"]))
    row, _ = hover_isolated(page, 0)
    poll(page, "document.getElementById('tooltip').dataset.patches === '5'")
    assert page.evaluate("document.getElementById('tooltip').dataset.neuron") == ws.stimuli("resnet", "e2").neuron_ids[row]
    shot(page, "explorer-static-export.png")
    assert page.errors == []
