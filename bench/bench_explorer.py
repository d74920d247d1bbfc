"""Explorer speed: first paint, animation frame rate at ~50,000 points, and the server's patch answers.

Usage::

    python bench/bench_explorer.py [--workspace STUDY] [--points 50000] [--repeats 3]

* first paint: from navigation to the first complete drawing of every panel
  (``body[data-ready]``) in headless Chromium, for the given workspace (default:
  ``demo-out-quick/study`` when present, else a small fabricated one), and for
  a generated workspace of about ``--points`` neurons x checkpoints (3 models x
  10 checkpoints, no patches). Targets: under 2 s.
* frames: frames per second while the slider animates the large workspace.
* patches: latency of ``/api/patches.png`` (a neuron's patches as PNG) and of
  ``/api/neuron``, cold (first read of a sheet) and warm. Target: under 50 ms.

Needs Chromium at /usr/bin/chromium and Playwright for Python for the browser
rows (skipped otherwise).
"""
from __future__ import annotations

import argparse
import http.client
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

CHROMIUM = os.environ.get("CONCEPTEVO_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]


def big_workspace(root: Path, points: int, models: int = 3, checkpoints: int = 10, dim: int = 30):
    """A workspace of ``models`` x ``checkpoints`` checkpoints totalling about ``points`` neurons (no real models)."""
    from conceptevo.io import save_npy
    from conceptevo.layers import LayerInfo, neuron_ids_of
    from conceptevo.stimuli import Stimuli
    from conceptevo.workspace import Workspace

    ws = Workspace(root / "study", create=True)
    ws.set_config({"data": {"kind": "synthetic", "path": None, "pool": 1000, "seed": 0, "options": {"n": 1000, "size": 32}}})
    rng = np.random.default_rng(0)
    per_model = points // (models * checkpoints)
    widths = [16, 16, 32, 32, 64, 64, 128, 128, 256, 256] + [512] * 200
    manifest = {}
    for mi in range(models):
        name = f"model{mi}"
        infos, total = [], 0
        for j, w in enumerate(widths):
            w = min(w, per_model - total)
            if w <= 0:
                break
            infos.append(LayerInfo(f"features.{3 * j}", w, (8, 8)))
            total += w
        ids = neuron_ids_of(infos)
        n = len(ids)
        layer_of = np.concatenate([np.full(i.channels, j) for j, i in enumerate(infos)])
        centres = rng.normal(0, 3, (len(infos), dim))
        v = centres[layer_of] + rng.normal(0, 1, (n, dim))
        rows = []
        for ti in range(checkpoints):
            tag = f"e{ti + 1}"
            rows.append({"tag": tag, "path": f"/nonexistent/{name}/{tag}.pt", "epoch": float(ti + 1), "step": None,
                         "metrics": {"train_top1": 0.1 + 0.08 * ti}})
            stim = Stimuli(ids, rng.integers(0, 1000, (n, 10)), rng.random((n, 10)), np.zeros((n, 10), np.int64),
                           layers=infos, num_images=1000)
            stim.save(ws.stimuli_dir(name, tag))
            ws.finish(f"stimuli/{name}/{tag}", "k")
            v = v + rng.normal(0, 0.3, v.shape)
            save_npy(ws.projection_path(name, tag), v.astype(np.float32))
            ws.finish(f"projection/{name}/{tag}", "k")
            save_npy(ws.layout_path(name, tag), (v[:, :2] + 0.2 * v[:, 2:4]).astype(np.float32))
        manifest[name] = {"arch": "generated", "options": {}, "checkpoints": rows}
    ws.manifest["models"] = manifest
    ws.manifest["base"] = {"model": "model0", "tag": f"e{checkpoints}"}
    ws._flush()
    ws.finish("layout", "k")
    return ws


class Served:
    def __init__(self, ws):
        from conceptevo.explorer import make_server

        t = time.perf_counter()
        self.server = make_server(ws, port=0)
        self.startup = time.perf_counter() - t
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = self.server.url

    def get(self, path):
        host, port = self.server.server_address[:2]
        conn = http.client.HTTPConnection(host, port, timeout=10)
        t = time.perf_counter()
        conn.request("GET", path)
        r = conn.getresponse()
        body = r.read()
        dt = time.perf_counter() - t
        conn.close()
        if r.status != 200:
            raise RuntimeError(f"{path}: {r.status} {body[:200]!r}")
        return dt

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def first_paint(browser, url, repeats):
    times, inner = [], []
    for _ in range(repeats):
        ctx = browser.new_context(viewport={"width": 1400, "height": 900})
        page = ctx.new_page()
        t = time.perf_counter()
        page.goto(url)
        page.wait_for_selector("body[data-ready='1']", state="attached", timeout=60000)
        times.append(time.perf_counter() - t)
        inner.append(page.evaluate("window.__conceptevo.firstPaint") / 1000)
        drawn = page.evaluate("window.__conceptevo.drawnCount")
        ctx.close()
    return statistics.median(times), statistics.median(inner), drawn


def frame_rate(browser, url, seconds=3.0):
    ctx = browser.new_context(viewport={"width": 1400, "height": 900})
    page = ctx.new_page()
    page.goto(url)
    page.wait_for_selector("body[data-ready='1']", state="attached", timeout=60000)
    page.wait_for_timeout(1500)  # let every checkpoint load
    page.click("#play")
    f0 = page.evaluate("window.__conceptevo.frames")
    page.wait_for_timeout(int(seconds * 1000))
    f1 = page.evaluate("window.__conceptevo.frames")
    drawn = page.evaluate("window.__conceptevo.drawnCount")
    ctx.close()
    return (f1 - f0) / seconds, drawn


def patch_latency(served, ws, samples=200):
    from conceptevo.report.analysis import neuron_ids

    rng = np.random.default_rng(0)
    reqs = []
    for m in ws.models:
        for t in ws.tags(m):
            ids = neuron_ids(ws, m, t)
            for i in rng.choice(len(ids), size=min(len(ids), samples // max(1, len(ws.models) * len(ws.tags(m))) + 1), replace=False):
                reqs.append((m, t, ids[int(i)]))
    cold = [served.get(f"/api/patches.png?model={m}&tag={t}&id={nid}") for m, t, nid in reqs]
    warm = [served.get(f"/api/patches.png?model={m}&tag={t}&id={nid}") for m, t, nid in reqs]
    meta = [served.get(f"/api/neuron?model={m}&tag={t}&id={nid}") for m, t, nid in reqs]
    q = lambda xs, p: float(np.percentile(np.array(xs) * 1000, p))  # noqa: E731
    return {"cold": (q(cold, 50), q(cold, 95), max(cold) * 1000), "warm": (q(warm, 50), q(warm, 95), max(warm) * 1000),
            "neuron": (q(meta, 50), q(meta, 95), max(meta) * 1000), "n": len(reqs)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workspace", default=None, help="a workspace with patches (default: demo-out-quick/study, else fabricated)")
    ap.add_argument("--points", type=int, default=50000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from conceptevo.workspace import Workspace

    tmp = Path(tempfile.mkdtemp(prefix="bench-explorer-"))
    if args.workspace:
        ws = Workspace(args.workspace)
        label = args.workspace
    elif (ROOT / "demo-out-quick" / "study" / "manifest.json").exists():
        ws = Workspace(ROOT / "demo-out-quick" / "study")
        label = "demo-out-quick/study"
    else:
        import fabricated

        ws = fabricated.fabricate(tmp / "small")
        label = "fabricated (2 models x 3 checkpoints)"
    from conceptevo.patches import PatchStore, compute_patches

    if not all(PatchStore(ws).has(m, t) for m in ws.models for t in ws.tags(m)):
        print(f"computing patches for {label} ...", file=sys.stderr)
        compute_patches(ws, progress=False)
    n_small = sum(len(ws.stimuli(m, t)) for m in ws.models for t in ws.tags(m))
    big = big_workspace(tmp / "big", args.points)
    n_big = sum(len(big.stimuli(m, t)) for m in big.models for t in big.tags(m))
    wide = big_workspace(tmp / "wide", 2 * args.points, models=1, checkpoints=2)  # every point on screen at once

    rows = []
    small, large, huge = Served(ws), Served(big), Served(wide)
    rows.append(("server start (load + K-means)", label, f"{small.startup:.2f} s", ""))
    rows.append(("server start (load + K-means)", f"generated, {n_big} points", f"{large.startup:.2f} s", ""))
    lat = patch_latency(small, ws)
    rows.append((f"/api/patches.png, cold sheet (n={lat['n']})", label, "p50 {:.1f} / p95 {:.1f} / max {:.1f} ms".format(*lat["cold"]), "< 50 ms"))
    rows.append((f"/api/patches.png, warm (n={lat['n']})", label, "p50 {:.1f} / p95 {:.1f} / max {:.1f} ms".format(*lat["warm"]), "< 50 ms"))
    rows.append((f"/api/neuron (n={lat['n']})", label, "p50 {:.1f} / p95 {:.1f} / max {:.1f} ms".format(*lat["neuron"]), ""))
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is None or not Path(CHROMIUM).exists():
        rows.append(("first paint", "-", "skipped (no Playwright or Chromium)", "< 2 s"))
    else:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            first_paint(browser, small.url, 1)  # warm the browser and the server's caches
            wall, inner, drawn = first_paint(browser, small.url, args.repeats)
            rows.append((f"first paint ({drawn} points drawn)", f"{label}, {n_small} points in all", f"{wall:.2f} s (page {inner:.2f} s)", "< 2 s"))
            first_paint(browser, large.url, 1)
            wall, inner, drawn = first_paint(browser, large.url, args.repeats)
            rows.append((f"first paint ({drawn} points drawn)", f"generated, {n_big} points in all", f"{wall:.2f} s (page {inner:.2f} s)", "< 2 s"))
            big_url = large.url + "?panels=" + ",".join(big.models)
            fps, drawn = frame_rate(browser, big_url)
            rows.append((f"animation ({drawn} points moving)", f"generated, {n_big} points in all", f"{fps:.0f} frames/s", ""))
            first_paint(browser, huge.url, 1)
            wall, inner, drawn = first_paint(browser, huge.url, args.repeats)
            rows.append((f"first paint ({drawn} points drawn)", f"generated, 1 model of {drawn} neurons", f"{wall:.2f} s (page {inner:.2f} s)", "< 2 s"))
            fps, drawn = frame_rate(browser, huge.url)
            rows.append((f"animation ({drawn} points moving)", f"generated, 1 model of {drawn} neurons", f"{fps:.0f} frames/s", ""))
            browser.close()
    for srv in (small, large, huge):
        srv.close()
    w = [max(len(r[i]) for r in rows + [("what", "workspace", "measured", "target")]) for i in range(4)]
    line = lambda r: "  ".join(str(c).ljust(w[i]) for i, c in enumerate(r))  # noqa: E731
    print(line(("what", "workspace", "measured", "target")))
    print("  ".join("-" * x for x in w))
    for r in rows:
        print(line(r))
    print(f"\n(machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
