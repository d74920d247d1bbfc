"""Text stimuli shown as text: each unit's top windows as token contexts around the argmax token.

For a language model a stimulus is a window of tokens and the argmax position
inside it (:func:`conceptevo.stimuli.find_stimuli`). What a reader needs to
see is the token where the unit fired most and a few tokens each side, as
max-activating-context viewers show them. :func:`token_contexts` cuts those
out of the token stream: ``width`` tokens before the argmax token (never
before the window's first token: the model saw nothing earlier) and ``width``
after it (read from the stream, so a context near the window's end still shows
what came next). The contexts stage stores them per checkpoint as token ids
(``contexts/MODEL/TAG.npy``, ``int32 [neurons, k, 2 * width + 1]``, -1 where
there is no token, the argmax token in the middle) and the tokenizer as
``data/tokenizer.json``; text is decoded when shown, and every figure and page
escapes it (HTML entities; newlines and tabs as visible marks).

Image patches do not exist for text stages: :func:`require_images` raises a
:class:`~conceptevo.errors.ConceptEvoError` naming the gap.
"""
from __future__ import annotations

import html
import logging
from pathlib import Path

import numpy as np

from .errors import ConceptEvoError, WorkspaceError
from .io import hash_json, load_npy, save_npy

log = logging.getLogger(__name__)

#: Tokens shown each side of the argmax token (common max-activating-context viewers show about 10).
DEFAULT_WIDTH = 10
#: Visible stand-ins for characters that would break a line of contexts.
VISIBLE = {"\n": "\u23ce", "\r": "\u240d", "\t": "\u2192"}


def is_text_workspace(ws) -> bool:
    """Whether ``ws``'s study reads text windows (``[data] kind = "text"``)."""
    return (ws.config.get("data") or {}).get("kind") == "text"


def require_images(ws, what: str) -> None:
    """Raise a clear error when ``what`` (an image-only step) is asked of a text study."""
    if is_text_workspace(ws):
        raise ConceptEvoError(f"{what} is not available for text studies ([data] kind = \"text\"): their stimuli are "
                              "token windows, not images; see the unit contexts (conceptevo.contexts, "
                              "figures/contexts.html) instead")


def token_contexts(windows, indices: np.ndarray, positions: np.ndarray, width: int = DEFAULT_WIDTH) -> np.ndarray:
    """Token ids ``int32 [..., 2 * width + 1]`` around each (window index, argmax position); -1 where no token.

    ``windows`` is a :class:`~conceptevo.data.text.TextWindows` (or a Subset of one); the argmax token sits at
    offset ``width``. Left of it: only tokens of the window; right of it: the stream's next ``width`` tokens.
    """
    if width < 0 or int(width) != width:
        raise ConceptEvoError(f"width={width!r} must be a non-negative integer")
    base = windows.base if hasattr(windows, "base") and not getattr(windows, "token_windows", False) else windows
    if not getattr(base, "token_windows", False):
        raise ConceptEvoError("token contexts need text windows (conceptevo.data.text.TextWindows)")
    indices, positions = np.asarray(indices, np.int64), np.asarray(positions, np.int64)
    if (positions < 0).any() or (positions >= base.context).any():
        raise ConceptEvoError("argmax positions outside the window: these stimuli were not found on these windows")
    starts = indices * base.stride
    at = starts + positions                                  # stream position of the argmax token
    offsets = np.arange(-width, width + 1)
    stream = at[..., None] + offsets                         # [..., 2W+1]
    ok = (stream >= starts[..., None]) & (stream < len(base.tokens))
    toks = np.asarray(base.tokens[np.clip(stream, 0, len(base.tokens) - 1).ravel()], dtype=np.int64).reshape(stream.shape)
    return np.where(ok, toks, -1).astype(np.int32)


def visible_marks(s: str) -> str:
    """``s`` with newlines, carriage returns and tabs as visible marks (:data:`VISIBLE`); not escaped."""
    for ch, mark in VISIBLE.items():
        s = s.replace(ch, mark)
    return s


def context_tokens(tokenizer, row: np.ndarray) -> list[str]:
    """The token strings of one context row as they are (no marks, not escaped), ``''`` where there is no token."""
    return [tokenizer.token_str(int(i)) if i >= 0 else "" for i in np.asarray(row)]


def context_strings(tokenizer, row: np.ndarray) -> tuple[str, str, str]:
    """``(before, token, after)`` of one context row, decoded, with newlines and tabs as visible marks (not escaped)."""
    toks = context_tokens(tokenizer, row)
    w = len(toks) // 2
    return visible_marks("".join(toks[:w])), visible_marks(toks[w]), visible_marks("".join(toks[w + 1:]))


def context_html(tokenizer, row: np.ndarray) -> str:
    """One context as HTML: escaped text with the argmax token in ``<mark>``."""
    before, tok, after = context_strings(tokenizer, row)
    return f"{html.escape(before)}<mark>{html.escape(tok)}</mark>{html.escape(after)}"


# ------------------------------------------------------------------------------------------ workspace stage
def contexts_path(ws, model: str, tag: str) -> Path:
    return ws.path / "contexts" / model / f"{tag}.npy"


def tokenizer_path(ws) -> Path:
    return ws.path / "data" / "tokenizer.json"


def save_tokenizer(ws, windows) -> Path:
    """Write the study's tokenizer into the workspace (``data/tokenizer.json``), the one contexts decode with."""
    base = windows.base if hasattr(windows, "base") else windows
    if getattr(base, "tokenizer", None) is None:
        raise ConceptEvoError("the text windows carry no tokenizer to save")
    return base.tokenizer.save(tokenizer_path(ws))


def workspace_tokenizer(ws):
    from .data.text import load_tokenizer

    p = tokenizer_path(ws)
    if not p.exists():
        raise WorkspaceError(f"{p} is missing: run the study (conceptevo run) to write the tokenizer")
    return load_tokenizer(p)


def compute_contexts(ws, windows=None, width: int = DEFAULT_WIDTH) -> list[str]:
    """The contexts stage: every checkpoint's stimuli as token contexts (skipped where up to date). Returns stages run."""
    windows = windows if windows is not None else ws.images()
    save_tokenizer(ws, windows)
    ran = []
    for model in ws.models:
        for tag in ws.tags(model):
            srec = ws.stage(f"stimuli/{model}/{tag}")
            if srec is None:
                continue
            name = f"contexts/{model}/{tag}"

            def write(model=model, tag=tag):
                st = ws.stimuli(model, tag, mmap=False)
                save_npy(contexts_path(ws, model, tag), token_contexts(windows, st.indices, st.positions, width))
                return {"width": width}

            if ws.run_stage(name, hash_json([srec.get("key", ""), width]), write, {"width": width}):
                ran.append(name)
    return ran


def load_contexts(ws, model: str, tag: str) -> np.ndarray:
    if ws.stage(f"contexts/{model}/{tag}") is None:
        raise WorkspaceError(f"no contexts for {model} {tag}: run the study (conceptevo run) first")
    return load_npy(contexts_path(ws, model, tag))


def neuron_contexts_html(ws, neuron: str, model: str | None = None, k: int | None = None) -> str:
    """An HTML page: one unit's top contexts at every checkpoint of its model, strongest first, escaped."""
    model = model or ws.base[0]
    tk = workspace_tokenizer(ws)
    parts = [f"<h2>{html.escape(model)} / {html.escape(neuron)}: top contexts per checkpoint</h2>"]
    for tag in ws.tags(model):
        st = ws.stimuli(model, tag)
        if neuron not in st.neuron_ids:
            raise ConceptEvoError(f"unit {neuron!r} is not in {model} {tag}")
        row = st.neuron_ids.index(neuron)
        ctx = load_contexts(ws, model, tag)[row][:k]
        vals = np.asarray(st.values[row])[:k]
        items = "".join(f"<li><code>{context_html(tk, c)}</code> <small>{v:.3g}</small></li>" for c, v in zip(ctx, vals))
        parts.append(f"<h3>{html.escape(tag)}</h3><ol>{items}</ol>")
    style = "<style>mark{background:#ffd54f;font-weight:bold}code{white-space:pre}</style>"
    return f"<!doctype html><meta charset='utf-8'>{style}" + "\n".join(parts)


def draw_context_line(ax, y: float, before: str, token: str, after: str, fontsize: float = 7, x: float = 0.5,
                      chars: int | None = None) -> None:
    """Draw one context on ``ax`` at height ``y`` (axes fraction): the token highlighted and centred on ``x``,
    ``before`` right-aligned to its left, ``after`` left-aligned to its right, in monospace. Text is drawn as
    it is (no mathtext: ``$`` stays a dollar sign); give it through :func:`context_strings` so newlines are
    marks. ``chars`` keeps only that many characters each side (the ones nearest the token)."""
    from matplotlib.transforms import offset_copy

    if chars is not None:
        before, after = before[max(0, len(before) - chars):], after[:chars]
    fig = ax.figure
    half = 0.6 * fontsize * max(1, len(token)) / 2 + 1.5  # half the token's width in points (monospace)
    kw = dict(fontsize=fontsize, family="monospace", va="center", parse_math=False)
    ax.text(x, y, token, ha="center", transform=ax.transAxes,
            bbox=dict(facecolor="#ffd54f", edgecolor="none", pad=0.6), **kw)
    ax.text(x, y, before, ha="right", transform=offset_copy(ax.transAxes, fig, x=-half, units="points"), **kw)
    ax.text(x, y, after, ha="left", transform=offset_copy(ax.transAxes, fig, x=half, units="points"), **kw)


def plot_neuron_contexts(ws, path, neuron: str, model: str | None = None, k: int = 8, formats=("png",),
                         max_checkpoints: int = 8) -> list[Path]:
    """A figure: one unit's top-``k`` contexts (argmax token highlighted), one panel per checkpoint (at most
    ``max_checkpoints``, evenly spread, first and last included)."""
    from matplotlib.figure import Figure

    from . import io

    model = model or ws.base[0]
    tk = workspace_tokenizer(ws)
    tags = ws.tags(model)
    if len(tags) > max_checkpoints:
        tags = [tags[i] for i in sorted(set(np.linspace(0, len(tags) - 1, max_checkpoints).round().astype(int)))]
    fs = 7
    fig = Figure(figsize=(7, 0.16 * (k + 2) * len(tags) + 0.4), layout="constrained")
    axes = fig.subplots(len(tags), 1, squeeze=False)
    for ax, tag in zip(axes[:, 0], tags):
        st = ws.stimuli(model, tag)
        if neuron not in st.neuron_ids:
            raise ConceptEvoError(f"unit {neuron!r} is not in {model} {tag}")
        row = st.neuron_ids.index(neuron)
        ctx = load_contexts(ws, model, tag)[row][:k]
        ax.set_axis_off()
        ax.set_title(f"{model} {tag}", fontsize=8, loc="left")
        for j, c in enumerate(ctx):
            draw_context_line(ax, 1 - (j + 0.5) / max(1, len(ctx)), *context_strings(tk, c), fontsize=fs)
    fig.suptitle(f"unit {neuron}: top contexts per checkpoint (argmax token highlighted)", fontsize=9)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return io.save_figure(fig, Path(path), formats, dpi=150)
