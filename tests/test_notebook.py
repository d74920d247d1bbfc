"""Notebooks: figures that leave matplotlib's global state alone, the explorer shown inline, the example notebook."""
from __future__ import annotations

import json
import re
import os
import socket
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest

import fabricated

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread_module")


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]
                                        + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.pop("MPLBACKEND", None)
    return env


# Every public function that draws a figure, called in a process whose matplotlib backend was chosen by the
# user ("svg", one that is not the library's Agg). Each must return a Figure (or figures) and leave the backend,
# pyplot (never imported) and its figure list as they were.
FIGURES_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import matplotlib
    matplotlib.use("svg")
    before = matplotlib.get_backend()
    from matplotlib.figure import Figure

    import torch
    torch.set_num_threads(1)
    import conceptevo as ce
    from conceptevo.alignment import evaluate_alignment
    from conceptevo.diagnostics import diagnose, plot_diagnosis
    from conceptevo.importance import EvolutionImportance, ReversionResult, plot_reversion_bars
    from conceptevo.importance.commands import plot_evolutions
    from conceptevo.report import plot_neuron_evolution, plot_neuron_groups, plot_space_grid
    import numpy as np

    ws_path, align_path, out = (Path(a) for a in sys.argv[1:4])
    ws = ce.Workspace(ws_path)
    figs = {}
    figs["space"] = plot_space_grid(ws)                        # no path: nothing written
    figs["groups"] = plot_neuron_groups(ws_path, out / "groups.png", formats=("png",))
    figs["evolution"] = plot_neuron_evolution(ws, out / "evolution.svg", formats=("svg",))
    imp_file = next((ws_path / "importance").rglob("class-1.npz"))
    imp = EvolutionImportance.load(imp_file)
    tags = ws.tags("vgg")
    figs["evolutions"] = plot_evolutions(ws, "vgg", tags[0], tags[-1], imp, top=3, examples=2, path=None,
                                         class_name="one")
    rng = np.random.default_rng(0)
    res = ReversionResult(class_indices=[0, 1], layers=["a", "b"], bins=["0-50", "50-100", "random"],
                          changes=rng.normal(0, 0.1, (2, 3, 2, 2, 2, 3)), clean=np.full((2, 3, 2, 2), 0.8),
                          num_images=np.full((2, 3, 2), 8), stage=("e0", "e2"))
    figs["reversion"] = plot_reversion_bars(None, [res])
    diag = diagnose(ws, write=False)
    for name, fig in plot_diagnosis(diag).items():
        figs["diagnosis-" + name] = fig
    made = ce.make_figures(ws, out=out / "all", formats=("png",))
    aligned = evaluate_alignment(align_path, tasks=20, random_groups=20, cka_images=60)
    print(json.dumps({
        "before": before, "after": matplotlib.get_backend(),
        "pyplot": "matplotlib.pyplot" in sys.modules,
        "not_figures": [k for k, f in figs.items() if not isinstance(f, Figure)],
        "titles": {k: f.get_suptitle() or (f.axes[0].get_title() if f.axes else "") for k, f in figs.items()},
        "made": sorted(Path(p).name for p in made),
        "written": sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()),
        "alignment": sorted(p.name for p in (align_path / "alignment").glob("*.png")),
    }))
""")


def test_figure_functions_return_figures_and_leave_the_backend_alone(tmp_path, tmp_path_factory, fabricated_copy):
    ws = fabricated.shared(tmp_path_factory)
    align = fabricated_copy
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-c", FIGURES_SCRIPT, str(ws.path), str(align), str(out)], env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["before"] == "svg" and got["after"] == "svg"
    assert got["pyplot"] is False, "a figure function imported pyplot (global figure state)"
    assert got["not_figures"] == []
    assert set(got["titles"]) == {"space", "groups", "evolution", "evolutions", "reversion",
                                  "diagnosis-diversity", "diagnosis-speed", "diagnosis-collapse", "diagnosis-layers"}
    assert got["titles"]["space"] == "Unified semantic space, per checkpoint"
    assert got["titles"]["diagnosis-speed"].startswith("speed per checkpoint")
    # a path writes the formats asked for, no path writes nothing; make_figures still lists what it wrote
    assert got["made"] == ["evolution.png", "groups.png", "space.png"]
    assert got["written"] == ["all/evolution.png", "all/groups.png", "all/space.png", "evolution.svg", "groups.png"]
    assert got["alignment"] == ["layers.png", "roc.png"]


# ================================================================================ the explorer inline
def _bind_fails(port: int) -> bool:
    """True while something listens on 127.0.0.1:port (even SO_REUSEADDR cannot bind over a listening socket)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, dict(r.headers), r.read()


def test_explore_returns_a_server_a_notebook_shows_inline_and_stop_frees_the_port(tmp_path_factory):
    import conceptevo as ce
    from conceptevo.explorer import page_html

    ws = fabricated.shared(tmp_path_factory)
    app = ce.explore(ws, background=True)   # no port: a free one
    try:
        host, port = app.server_address[:2]
        assert host == "127.0.0.1" and port != 8000 and app.url == f"http://127.0.0.1:{port}/"
        html = app._repr_html_()
        assert f'<iframe src="{app.url}"' in html and f'href="{app.url}"' in html
        assert str(ws.path.resolve()) in repr(app) and app.url in repr(app)
        status, headers, body = _get(app.url)
        assert status == 200 and body == page_html()
        # pages of this machine (a notebook on any port) may frame it; nothing else may
        csp = headers["Content-Security-Policy"]
        assert "frame-ancestors 'self' http://127.0.0.1:* http://localhost:*" in csp and "X-Frame-Options" not in headers
        status, _, body = _get(app.url + "api/info")
        assert status == 200 and [m["name"] for m in json.loads(body)["models"]] == ["vgg", "resnet"]
        assert _bind_fails(port)
    finally:
        app.stop()
    assert app.closed and not _bind_fails(port)
    with pytest.raises(OSError):
        _get(app.url)
    assert "stopped" in app._repr_html_() and "<iframe" not in app._repr_html_()
    app.close()  # again: nothing to do
    with ce.explore(ws.path, port=0, background=True) as again:
        assert _get(again.url)[0] == 200
    assert again.closed and not _bind_fails(again.server_address[1])


def test_the_command_line_server_still_refuses_frames(tmp_path_factory):
    from conceptevo.explorer import make_server

    ws = fabricated.shared(tmp_path_factory)
    with make_server(ws, port=0) as server:
        import threading

        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        _, headers, _ = _get(server.url)
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"] and headers["X-Frame-Options"] == "DENY"
        assert "<iframe" not in server._repr_html_() and server.url in server._repr_html_()


def test_explore_serves_in_the_background_by_itself_inside_a_jupyter_kernel(tmp_path_factory, monkeypatch):
    import types

    import conceptevo as ce

    ws = fabricated.shared(tmp_path_factory)
    shell = types.SimpleNamespace(kernel=object())
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: shell))
    app = ce.explore(ws)   # would block outside a notebook
    try:
        assert _get(app.url)[0] == 200
    finally:
        app.stop()
    shell.kernel = None   # IPython in a terminal: not a notebook
    from conceptevo.explorer import _in_notebook

    assert _in_notebook() is False


from conftest import CHROMIUM, launch_chromium


def test_the_inline_explorer_loads_in_a_frame_of_another_loopback_page(tmp_path_factory, tmp_path):
    """A notebook's output in a real browser: the explorer's iframe inside a page served from another port."""
    import http.server
    import threading

    import conceptevo as ce
    from conceptevo.explorer import make_server

    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}")
    sync_api = pytest.importorskip("playwright.sync_api")
    ws = fabricated.shared(tmp_path_factory)
    app = ce.explore(ws, background=True)
    refusing = make_server(ws, port=0)   # as `conceptevo explore` serves: no frames
    threading.Thread(target=refusing.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    (tmp_path / "nb.html").write_text(f"<!doctype html><html><body><h1>notebook</h1>{app._repr_html_()}</body></html>")
    (tmp_path / "refused.html").write_text(f'<!doctype html><html><body><iframe src="{refusing.url}"></iframe></body></html>')
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = lambda *a, **kw: Quiet(*a, directory=str(tmp_path), **kw)  # noqa: E731
    notebook = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=notebook.serve_forever, daemon=True).start()
    nb_url = f"http://127.0.0.1:{notebook.server_address[1]}/"
    try:
        with sync_api.sync_playwright() as pw:
            browser = launch_chromium(pw)
            try:
                page = browser.new_page()
                page.goto(nb_url + "nb.html")
                frame = page.frame_locator("iframe")
                frame.locator("body[data-ready='1']").wait_for(state="attached", timeout=20000)
                [inner] = [f for f in page.frames if f.url.startswith(app.url)]
                panels = inner.evaluate("window.__conceptevo.panels()")
                assert panels and all(p["drawnCount"] == p["n"] > 0 for p in panels)
                # the command-line server's page does not load inside another page
                page.goto(nb_url + "refused.html")
                page.wait_for_timeout(1500)
                [child] = [f for f in page.frames if f is not page.main_frame]
                assert child.url.startswith("chrome-error://"), child.url   # blocked by its frame-ancestors 'none'
            finally:
                browser.close()
    finally:
        app.stop()
        refusing.stop()
        notebook.shutdown()
        notebook.server_close()


# ================================================================================ the example notebook
@pytest.mark.slow
def test_the_example_notebook_runs_and_shows_its_figures_and_the_explorer(tmp_path, monkeypatch):
    """docs/example.ipynb executed by a real Jupyter kernel, as a reader would run it top to bottom."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    # the kernel imports this checkout's package, and writes its study into the test's folder
    monkeypatch.setenv("PYTHONPATH", _env()["PYTHONPATH"])
    monkeypatch.delenv("MPLBACKEND", raising=False)
    nb = nbformat.read(ROOT / "docs" / "example.ipynb", as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    text = "".join(o.get("text", "") for c in code for o in c.outputs if o.output_type == "stream")
    assert "e4 training accuracy" in text

    def shown(cell, mime):
        return [o["data"][mime] for o in cell.outputs if o.output_type == "execute_result" and mime in o.get("data", {})]

    figures = [c for c in code if "plot_" in c.source and shown(c, "image/png")]
    assert len(figures) == 2, "both figure cells show a PNG"
    assert (tmp_path / "notebook-study" / "figures" / "evolution.png").exists()
    assert (tmp_path / "notebook-study" / "manifest.json").exists()
    [explorer] = [c for c in code if c.source.startswith("app = ce.explore(ws)")]
    [html] = shown(explorer, "text/html")
    url = re.search(r'<iframe src="(http://127\.0\.0\.1:\d+/)"', html).group(1)
    [stopped] = shown(code[-1], "text/html")
    assert "stopped" in stopped and url in stopped
    with pytest.raises(OSError):
        _get(url)   # the notebook stopped it
