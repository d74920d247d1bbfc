"""``conceptevo export WORKSPACE --tensorboard DIR``: the unified space in TensorBoard's embedding projector.

``DIR`` becomes a TensorBoard log folder (``tensorboard --logdir DIR``, then the
*Projector* tab) holding, as projector embeddings:

* ``units: MODEL TAG``: one per checkpoint, its units' vectors in the unified space;
* ``units: all checkpoints``: every checkpoint's units together (the space is
  shared, so a unit's positions at successive checkpoints are comparable: colour
  by ``checkpoint`` to see the concepts move);
* ``images``: the image vectors of the base space.

Each point has metadata columns (a unit's id, model, checkpoint, epoch, layer,
channel, the most frequent class among its stimuli and the three most frequent
with their counts; an image's dataset index and class) and a picture: a unit's
top example patch, an image itself, or a blank grey tile where there is none
(units of checkpoints without example patches). An embedding none of whose
points has a picture gets no sprite: the projector then draws coloured dots.

Text studies have no pictures: their units carry text metadata instead, the
commonest argmax tokens of their contexts (``top_token``, ``top_tokens``) and
their strongest context as one line (``top_context``, the argmax token in
brackets; label points by it in the projector), and no sprite. Their windows'
vectors are not exported (a window has no picture and no label).

The files follow TensorBoard's projector format, written with its own
``ProjectorConfig`` message: ``projector_config.pbtxt`` in ``DIR`` naming, per
embedding, a tensor TSV, a metadata TSV and a sprite PNG (all paths relative,
so the folder can be moved). ``SummaryWriter.add_embedding`` writes the same
format but formats the numbers one at a time and builds the sprite in float64
(for 100,000 points at 25 px: 7925 x 7925 x 3 x 8 bytes, 1.5 GB), hence the
direct writer.

Two limits of the projector page shape the files:

* it reads at most :data:`MAX_POINTS` rows of a tensor, so larger embeddings are
  written as a seeded sample of that many rows (logged);
* it refuses sprite images larger than :data:`SPRITE_MAX` pixels a side. The
  sprite is a grid of ``ceil(sqrt(n))`` columns, so the tile size is the patch
  size, shrunk to ``SPRITE_MAX // ceil(sqrt(n))`` when the grid would not fit
  (at ``MAX_POINTS`` points: 25 px).
"""
from __future__ import annotations

import io
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConceptEvoError
from ..io import write_bytes
from ..patches import PatchStore
from ..workspace import Workspace
from .units import CheckpointUnits, StimulusLabels, UnitPictures, checkpoint_units, to_rgb

log = logging.getLogger(__name__)

SPRITE_MAX = 8192      # TensorBoard's projector refuses larger sprite images (pixels a side)
MAX_POINTS = 100_000   # the projector page asks for at most this many rows of a tensor
BLANK = 224            # grey level of the tile of a point without a picture
MARKER = ".conceptevo-tensorboard"
CONFIG = "projector_config.pbtxt"
UNIT_COLUMNS = ["unit", "model", "checkpoint", "epoch", "layer", "channel", "top_class", "top_classes"]
TEXT_UNIT_COLUMNS = ["unit", "model", "checkpoint", "step", "layer", "channel", "top_token", "top_tokens", "top_context"]
IMAGE_COLUMNS = ["image", "class"]


def _import_projector():
    try:
        from google.protobuf import text_format
        from tensorboard.plugins.projector import ProjectorConfig
    except ImportError:
        raise ConceptEvoError("the TensorBoard export needs the tensorboard package: "
                              "pip install 'conceptevo[tensorboard]' (or pip install tensorboard)") from None
    return ProjectorConfig, text_format


def sprite_tile(n: int, cell: int) -> int:
    """Tile size (pixels) for ``n`` pictures of ``cell`` px in a ``ceil(sqrt(n))``-column sprite of at most SPRITE_MAX a side."""
    if n < 1:
        raise ConceptEvoError(f"a sprite needs at least one picture, got {n}")
    cols = math.ceil(math.sqrt(n))
    tile = min(int(cell), SPRITE_MAX // cols)
    if tile < 1:
        raise ConceptEvoError(f"{n} pictures do not fit a {SPRITE_MAX} px sprite; export at most {SPRITE_MAX ** 2} points")
    return tile


def sprite_png(pictures, n: int, tile: int) -> bytes:
    """PNG bytes of a sprite: ``pictures`` (n items, each ``uint8 [H, W, C]`` or None) in a ``ceil(sqrt(n))``-column grid."""
    from PIL import Image

    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    sheet = np.full((rows * tile, cols * tile, 3), BLANK, dtype=np.uint8)
    for i, pic in enumerate(pictures):
        if pic is None:
            continue
        rgb = to_rgb(pic)
        if rgb.shape[:2] != (tile, tile):
            rgb = np.asarray(Image.fromarray(rgb).resize((tile, tile), Image.BILINEAR))
        y, x = divmod(i, cols)
        sheet[y * tile:(y + 1) * tile, x * tile:(x + 1) * tile] = rgb
    buf = io.BytesIO()
    Image.fromarray(sheet).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _tsv_cell(v) -> str:
    return " ".join(str(v).split())  # no tabs or line breaks inside a cell


def metadata_tsv(columns: list[str], rows) -> bytes:
    lines = ["\t".join(columns)] + ["\t".join(_tsv_cell(v) for v in row) for row in rows]
    return ("\n".join(lines) + "\n").encode("utf-8")


def tensor_tsv(vectors: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savetxt(buf, np.asarray(vectors, dtype=np.float32), fmt="%.7g", delimiter="\t")
    return buf.getvalue()


def _epoch_text(epoch) -> str:
    return "?" if epoch is None else f"{float(epoch):g}"


@dataclass
class _Points:
    """Rows of one embedding: vectors, metadata rows and pictures (lazily read, in order)."""

    name: str
    folder: str
    columns: list[str]
    vectors: np.ndarray
    rows: list[list]
    pictures: list          # callables returning uint8 [H, W, C] or None
    cell: int
    has_pictures: bool = True   # False: no point has a picture, so no sprite (the projector draws dots)

    def __len__(self):
        return len(self.vectors)

    def sample(self, limit: int, seed: int) -> "_Points":
        if len(self) <= limit:
            return self
        keep = np.sort(np.random.default_rng(seed).choice(len(self), size=limit, replace=False))
        log.warning("%s has %d points; TensorBoard's projector reads at most %d, so a seeded sample of %d is written",
                    self.name, len(self), limit, limit)
        return _Points(self.name, self.folder, self.columns, self.vectors[keep], [self.rows[i] for i in keep],
                       [self.pictures[i] for i in keep], self.cell, self.has_pictures)


def _unit_points(cu: CheckpointUnits, pictures: UnitPictures, cell: int) -> _Points | None:
    if cu.vectors is None:
        return None
    ok = np.flatnonzero(np.isfinite(cu.vectors).all(axis=1))
    if len(ok) < len(cu):
        log.info("%s %s: %d of %d units have no vector in the unified space and are left out",
                 cu.model, cu.tag, len(cu) - len(ok), len(cu))
    layers, channels = cu.layers, cu.channels
    text = bool(cu.top_context)
    has = not text and pictures.has(cu.model, cu.tag)
    when = ("?" if cu.step is None else str(cu.step)) if text else _epoch_text(cu.epoch)   # language models: by step
    rows = [[cu.ids[i], cu.model, cu.tag, when, layers[i], channels[i], cu.top_class[i] or "?",
             cu.top_classes[i] or "?"] + ([cu.top_context[i]] if text else []) for i in ok]
    pics = [(lambda m=cu.model, t=cu.tag, r=int(i): pictures.top_patch(m, t, r)) if has else (lambda: None) for i in ok]
    return _Points(f"units: {cu.model} {cu.tag}", f"units/{cu.model}/{cu.tag}", TEXT_UNIT_COLUMNS if text else UNIT_COLUMNS,
                   cu.vectors[ok], rows, pics, cell, has)


def _image_points(ws, pictures: UnitPictures, labels: StimulusLabels) -> _Points | None:
    if ws.stage("embedding/images") is None:
        log.info("no image embedding in the workspace: the images are not exported")
        return None
    emb = ws.image_embedding()
    idx = np.flatnonzero(emb.has_vector)
    if not len(idx):
        return None
    lab = labels.labels(idx)
    rows = [[int(i), labels.name(int(c)) or "?"] for i, c in zip(idx, lab)]
    shape = pictures.store.images_index.get("image_shape") if pictures.store.has_images else None
    cell = int(min(max(shape[:2]), 96)) if shape else 32
    pics = [(lambda i=int(i): pictures.image(i)) for i in idx]
    return _Points("images", "images", IMAGE_COLUMNS, np.asarray(emb.vectors[idx], dtype=np.float32), rows, pics, cell)


def _combine(parts: list[_Points]) -> _Points:
    return _Points("units: all checkpoints", "units/all-checkpoints", parts[0].columns,
                   np.concatenate([p.vectors for p in parts]), [r for p in parts for r in p.rows],
                   [f for p in parts for f in p.pictures], max(p.cell for p in parts), any(p.has_pictures for p in parts))


def _prepare(out: Path, ws) -> None:
    """Check ``out`` (missing, empty, or a previous export: its files are removed)."""
    if out.exists():
        if not out.is_dir():
            raise ConceptEvoError(f"{out} exists and is not a folder; give a new folder for the TensorBoard export")
        if Path(ws.path).resolve().is_relative_to(out.resolve()):
            raise ConceptEvoError(f"{out} contains the workspace; export somewhere else")
        if any(out.iterdir()) and not (out / MARKER).exists():
            raise ConceptEvoError(f"{out} is not empty and not a previous conceptevo TensorBoard export; "
                                  "give an empty or new folder")
        (out / CONFIG).unlink(missing_ok=True)   # first, so no config ever names files that are gone
        for sub in ("units", "images"):
            if (out / sub).exists():
                shutil.rmtree(out / sub)
    out.mkdir(parents=True, exist_ok=True)
    write_bytes(out / MARKER, b"conceptevo TensorBoard projector export\n")


def export_tensorboard(ws, out, images: bool = True, combined: bool = True, seed: int = 0) -> Path:
    """Write the projector files for workspace ``ws`` into the folder ``out``; return the config's path.

    ``images``: also export the image vectors; ``combined``: also one embedding
    with every checkpoint's units. ``out`` must be missing, empty, or a previous
    TensorBoard export of conceptevo (replaced). Open it with
    ``tensorboard --logdir OUT`` (the Projector tab).
    """
    from ..contexts import is_text_workspace

    ProjectorConfig, text_format = _import_projector()
    ws = ws if isinstance(ws, Workspace) else Workspace(ws)
    text = is_text_workspace(ws)
    out = Path(out)
    store = PatchStore(ws)
    labels = None if text else StimulusLabels(ws, store)
    pictures = UnitPictures(ws, store, labels)
    cell = pictures.cell or 32
    parts = [p for cu in checkpoint_units(ws, labels, store) if (p := _unit_points(cu, pictures, cell)) is not None]
    if not parts:
        raise ConceptEvoError(f"the workspace {ws.path} has no checkpoint projected onto the unified space yet; "
                              "run `conceptevo run` on its config first")
    embeddings = list(parts)
    if combined and len(parts) > 1:
        embeddings.append(_combine(parts))
    if images and text:
        log.info("a text study's windows have no picture or label: their vectors are not exported")
    elif images:
        img = _image_points(ws, pictures, labels)
        if img is not None:
            embeddings.append(img)
    _prepare(out, ws)
    config = ProjectorConfig()
    for pts in embeddings:
        pts = pts.sample(MAX_POINTS, seed)
        folder = out / pts.folder
        write_bytes(folder / "tensors.tsv", tensor_tsv(pts.vectors))
        write_bytes(folder / "metadata.tsv", metadata_tsv(pts.columns, pts.rows))
        e = config.embeddings.add()
        e.tensor_name = pts.name
        e.tensor_shape.extend([len(pts), int(pts.vectors.shape[1])])
        e.tensor_path = f"{pts.folder}/tensors.tsv"
        e.metadata_path = f"{pts.folder}/metadata.tsv"
        if pts.has_pictures:
            tile = sprite_tile(len(pts), pts.cell)
            if tile < pts.cell:
                log.info("%s: %d pictures, tiles shrunk from %d to %d px to fit the %d px sprite limit",
                         pts.name, len(pts), pts.cell, tile, SPRITE_MAX)
            write_bytes(folder / "sprite.png", sprite_png((f() for f in pts.pictures), len(pts), tile))
            e.sprite.image_path = f"{pts.folder}/sprite.png"
            e.sprite.single_image_dim.extend([tile, tile])
    path = out / CONFIG
    write_bytes(path, text_format.MessageToString(config).encode("utf-8"))
    note = None if text else pictures.note()
    if note:
        log.warning("%s", note)
    log.info("wrote %d projector embeddings to %s", len(config.embeddings), out)
    return path


__all__ = ["export_tensorboard", "sprite_tile", "SPRITE_MAX", "MAX_POINTS"]
