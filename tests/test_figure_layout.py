"""Figure layout, measured with matplotlib's renderer: labels never overlap; the space grid wraps and has a colour key."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from PIL import Image

import fabricated
from conceptevo import io as ce_io
from conceptevo.io import save_npy
from conceptevo.patches import compute_patches
from conceptevo.report import plot_neuron_evolution, plot_space_grid
from conceptevo.workspace import Workspace

pytestmark = pytest.mark.usefixtures("one_thread_module")  # tiny models: one torch thread

# seven checkpoints known by file name only (no epochs), as a plain training loop saves them
SEVEN = [(f"ckpt_{100 * (i + 1):06d}", None) for i in range(7)]
NEURON = "features.3:1"


@pytest.fixture(scope="module")
def seven(tmp_path_factory):
    """One model, seven checkpoints; the neuron NEURON barely moves, near the right edge of the picture."""
    ws = fabricated.fabricate(tmp_path_factory.mktemp("seven"), importance=False, models=fabricated.MODELS[:1],
                              tags=SEVEN, k=10)
    row = ws.stimuli("vgg", SEVEN[0][0]).neuron_ids.index(NEURON)
    xy_all = np.concatenate([ws.layout("vgg", t) for t, _ in SEVEN])
    right, mid = xy_all[:, 0].max(), np.median(xy_all[:, 1])
    for i, (t, _) in enumerate(SEVEN):
        xy = np.array(ws.layout("vgg", t))
        xy[row] = (right - 0.01 * i, mid + 0.01 * i)   # seven points within a few pixels of each other
        save_npy(ws.layout_path("vgg", t), xy)
    compute_patches(ws, progress=False)
    return Workspace(ws.path)


@pytest.fixture
def captured(monkeypatch):
    """The figures handed to the writer, drawn, with the renderer that drew them."""
    figs = []
    real = ce_io.save_figure

    def keep(fig, *a, **kw):
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        out = real(fig, *a, **kw)
        if not isinstance(fig.canvas, FigureCanvasAgg):
            FigureCanvasAgg(fig)
        fig.canvas.draw()
        fig.measure = fig.canvas.get_renderer()   # kept: closing the figure takes its canvas away
        figs.append(fig)
        return out

    monkeypatch.setattr(ce_io, "save_figure", keep)
    return figs


def _texts(fig):
    from matplotlib.text import Text

    r = fig.measure
    out = []
    for t in fig.findobj(Text):
        if not t.get_visible() or not t.get_text().strip() or t.axes is not None and not t.axes.get_visible():
            continue
        bb = Text.get_window_extent(t, r)
        if bb.width > 0 and bb.height > 0:
            out.append((t.get_text(), bb))
    return out


def test_evolution_labels_overlap_neither_each_other_nor_the_patches(seven, captured, tmp_path):
    plot_neuron_evolution(seven, tmp_path / "e.png", neuron=NEURON, formats=("png",))
    [fig] = captured
    texts = _texts(fig)
    for (a, ba), (b, bb) in itertools.combinations(texts, 2):
        assert not ba.overlaps(bb), f"labels {a!r} and {b!r} overlap"
    r = fig.measure
    path_ax, patch_ax = fig.axes[:2]
    patches_box = patch_ax.get_window_extent(r)
    for text, bb in texts:
        assert not bb.overlaps(patches_box), f"label {text!r} lies on the patches"
    # every checkpoint's point on the path is labelled, inside the path's panel
    path_box = path_ax.get_window_extent(r)
    on_path = [(t, bb) for t, bb in texts if t in {tag for tag, _ in SEVEN}]
    assert sorted(t for t, _ in on_path) == [tag for tag, _ in SEVEN]
    for t, bb in on_path:
        assert path_box.x0 <= bb.x0 and bb.x1 <= path_box.x1 and path_box.y0 <= bb.y0 and bb.y1 <= path_box.y1, t


def _grid(fig):
    """Scatter panels as rows of the grid (by vertical position), and the colour bar's axes."""
    panels = [ax for ax in fig.axes if ax.collections and ax.get_visible() and ax.axison and ax.get_label() != "<colorbar>"]
    rows: dict[float, int] = {}
    for ax in panels:
        y = round(ax.get_position().y0, 3)
        rows[y] = rows.get(y, 0) + 1
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    return [rows[y] for y in sorted(rows, reverse=True)], bars


def test_space_grid_wraps_seven_checkpoints_into_rows_with_a_colour_key(seven, captured, tmp_path):
    png = tmp_path / "space.png"
    returned = plot_space_grid(seven, png, formats=("png",))
    [fig] = captured
    assert fig is returned
    per_row, bars = _grid(fig)
    assert sum(per_row) == 7 and max(per_row) <= 4 and len(per_row) == 2
    with Image.open(png) as im:
        w, h = im.size
    assert 1.0 <= w / h <= 2.5, f"{w}x{h}"
    assert min(w, h) >= 500
    [bar] = bars
    labels = [t.get_text() for t in bar.get_xticklabels() + bar.get_yticklabels()]
    assert "first layer" in labels and "last layer" in labels
    texts = _texts(fig)
    for (a, ba), (b, bb) in itertools.combinations(texts, 2):
        assert not ba.overlaps(bb), f"labels {a!r} and {b!r} overlap"


def test_space_grid_with_several_models_keeps_a_model_per_row_block(tmp_path_factory, captured, tmp_path):
    ws = fabricated.shared(tmp_path_factory)   # two models, three checkpoints each
    plot_space_grid(ws, tmp_path / "space.png", formats=("png",))
    per_row, bars = _grid(captured[0])
    assert per_row == [3, 3] and len(bars) == 1
    ylabels = [ax.get_ylabel() for ax in captured[0].axes if ax.get_ylabel()]
    assert ylabels == ["vgg", "resnet"]
