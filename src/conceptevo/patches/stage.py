"""The pipeline's patches stage: receptive fields, stimulus images and every checkpoint's patches into the workspace."""
from __future__ import annotations

import hashlib
import logging
from typing import Iterable, Sequence

import numpy as np

from ..data.base import display_image
from ..errors import CheckpointError, ConceptEvoError, WorkspaceError
from ..io import atomic_path, hash_json, load_npy, read_json, save_npy, write_json
from ..contexts import require_images
from ..workspace import Workspace
from .receptive import ReceptiveField, receptive_fields
from .sheets import SHEET_MAX, SheetGeometry, _resize, _write_sheets, crop_patches, to_uint8_image
from .marks import draw_mark, token_box, token_grid
from .store import FORMAT_VERSION, PatchStore, patches_dir

log = logging.getLogger(__name__)

DEFAULT_MAX_CELL = 64     # automatic patch size: the largest receptive field, clipped to [16, 64]


def _stage_key(ws, name: str) -> str:
    rec = ws.stage(name)
    return rec.get("key", "") if rec else ""


def _auto_cell(rfs: Iterable[ReceptiveField], max_cell: int = DEFAULT_MAX_CELL) -> int:
    biggest = max((max(rf.size) for rf in rfs), default=16)
    return int(min(max(biggest, 16), max_cell))


def compute_patches(ws: Workspace, models: Sequence[str] | None = None, cell: int | None = None, force: bool = False,
                    progress: bool = True, trust: bool = False, dataset=None, networks=None) -> list[str]:
    """Receptive fields, example patches and stimulus images for every checkpoint with stimuli.

    Skips checkpoints whose patches are up to date (their stimuli and the patch
    settings are unchanged). Returns the stage names written. The caller should
    hold the workspace lock (:class:`~conceptevo.workspace.WorkspaceLock`).

    ``dataset`` (item i = the image stimuli call i) and ``networks`` ({model:
    nn.Module}, for the receptive fields) replace the study's recorded dataset
    and checkpoints, for workspaces built from results in memory
    (:func:`conceptevo.results.workspace_from_results`).
    """
    require_images(ws, "example patches")
    todo = _checkpoints_with_stimuli(ws, models, cell)
    if dataset is None:
        if not ws.config.get("data") and not force and ws.stage("patches/images") is not None \
                and all(ws.stage(f"patches/{m}/{t}") is not None for m, t in todo):
            return []  # built from results in memory: its patches were made then, from the images it was given
        dataset = ws.images()  # positions are image indices, as in the stimuli
    shape = tuple(int(s) for s in dataset[0][0].shape)
    fields, field_keys = _receptive_fields_stage(ws, todo, dataset, shape, networks, force, trust)
    cell = _cell_size(ws, todo, fields, cell)
    _stimulus_images_stage(ws, dataset, shape, force, progress)
    return _checkpoint_patches_stage(ws, todo, fields, field_keys, cell, force, progress)


def _checkpoints_with_stimuli(ws: Workspace, models: Sequence[str] | None, cell: int | None) -> list[tuple[str, str]]:
    """(model, tag) of every checkpoint of ``models`` (default: all) that has stimuli; checks the request."""
    if cell is not None and (isinstance(cell, bool) or not isinstance(cell, int) or not 4 <= cell <= 256):
        raise ConceptEvoError(f"cell (the patch size in pixels) must be an integer in 4..256, got {cell!r}")
    all_models = ws.models
    models = list(models) if models is not None else all_models
    for m in models:
        if m not in all_models:
            raise WorkspaceError(f"model {m!r} is not in this study; models: {', '.join(all_models) or 'none'}")
    todo = [(m, t) for m in models for t in ws.tags(m) if ws.stage(f"stimuli/{m}/{t}") is not None]
    if not todo:
        raise WorkspaceError(f"the workspace {ws.path} has no stimuli yet; run `conceptevo run` on its config first")
    return todo


def _receptive_fields_stage(ws: Workspace, todo, dataset, shape: tuple, networks, force: bool, trust: bool):
    """Each model's receptive fields ({model: {layer: ReceptiveField}}) and their keys, measured once per model
    (they depend on the architecture only) and kept in ``patches/MODEL/receptive_fields.json``."""
    fields: dict[str, dict[str, ReceptiveField]] = {}
    keys: dict[str, str] = {}
    for m in sorted({m for m, _ in todo}):
        info = ws.model_info(m)
        first_tag = next(t for mm, t in todo if mm == m)
        stim_layers = [l.name for l in ws.stimuli(m, first_tag).layers]
        net = (networks or {}).get(m)
        structure = [] if net is None else [hashlib.sha256(repr(net).encode()).hexdigest()[:16]]
        key = hash_json([FORMAT_VERSION, info["arch"], info.get("options", {}), stim_layers, shape] + structure)
        path = patches_dir(ws, m) / "receptive_fields.json"
        if not force and path.exists() and read_json(path).get("key") == key:
            rfs = {d["layer"]: ReceptiveField.from_dict(d) for d in read_json(path)["layers"]}
        else:
            if net is None:
                try:
                    net = ws.load_model(m, first_tag, dataset, trust=trust)
                except CheckpointError as e:  # receptive fields do not depend on the weights
                    log.info("building %s without weights for its receptive fields (%s)", m, e)
                    net = ws.build_model(m, dataset)
            rfs = receptive_fields(net, stim_layers, shape)
            write_json(path, {"key": key, "model": m, "arch": info["arch"], "input_shape": list(shape),
                              "layers": [rf.to_dict() for rf in rfs.values()]})
        fields[m], keys[m] = rfs, key
    return fields, keys


def _cell_size(ws: Workspace, todo, fields: dict, cell: int | None) -> int:
    """The patch size in pixels: ``cell``, or the largest receptive field's, so that k patches fit a sheet."""
    k_max = max(int(ws.stimuli(m, t).k) for m, t in todo)
    if cell is None:
        return min(_auto_cell(rf for rfs in fields.values() for rf in rfs.values()), SHEET_MAX // k_max)
    if cell * k_max > SHEET_MAX:
        raise ConceptEvoError(f"{k_max} patches of {cell} px do not fit a {SHEET_MAX} px sprite sheet; "
                              f"use a cell of at most {SHEET_MAX // k_max} px")
    return cell


def _stimulus_images_stage(ws: Workspace, dataset, shape: tuple, force: bool, progress: bool) -> None:
    """The full stimulus images (every image any checkpoint's stimuli use), under ``patches/images``."""
    from tqdm.auto import tqdm

    all_pairs = [(m, t) for m in ws.models for t in ws.tags(m) if ws.stage(f"stimuli/{m}/{t}") is not None]
    img_key = hash_json([FORMAT_VERSION, [_stage_key(ws, f"stimuli/{m}/{t}") for m, t in all_pairs], shape])
    img_dir = patches_dir(ws) / "images"
    if not force and ws.is_done("patches/images", img_key):
        return
    used = np.unique(np.concatenate([np.asarray(ws.stimuli(m, t).indices).ravel() for m, t in all_pairs]))
    used = used[used >= 0]
    # the images as people see them (resized/cropped like the model's input, never mean/std-normalised)
    first_img = to_uint8_image(display_image(dataset, int(used[0])))
    labels = np.array([int(dataset[int(i)][1]) for i in used], dtype=np.int64) if not hasattr(dataset, "targets") \
        else np.asarray(dataset.targets, dtype=np.int64)[used]
    icell = int(min(max(shape[1], shape[2]), 96))
    geom = SheetGeometry.plan(len(used), 1, icell)
    # the images themselves, written straight into a memory-mapped .npy (never all in memory)
    with atomic_path(img_dir / "pixels.npy", suffix=".npy") as tmp:
        pix = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(used),) + first_img.shape)
        for r, i in enumerate(tqdm(used, desc="stimulus images", disable=not progress, leave=False)):
            im = first_img if r == 0 else to_uint8_image(display_image(dataset, int(i)))
            if im.shape != first_img.shape:
                raise ConceptEvoError(f"image {int(i)} has shape {im.shape}, image {int(used[0])} {first_img.shape}; "
                                      "example patches need images of one size")
            pix[r] = im
        pix.flush()
        files = _write_sheets(img_dir, "sheet", geom, first_img.shape[-1], lambda r: _resize(pix[r], icell)[None])
        del pix
    save_npy(img_dir / "indices.npy", used.astype(np.int64))
    save_npy(img_dir / "labels.npy", labels)
    write_json(img_dir / "index.json", {
        "format": FORMAT_VERSION, "geometry": geom.to_dict(), "sheets": files, "image_shape": list(first_img.shape),
        "classes": [str(c) for c in (getattr(dataset, "classes", None) or [])],
    })
    ws.finish("patches/images", img_key, {"cell": icell}, images=int(len(used)))


def _checkpoint_patches_stage(ws: Workspace, todo, fields: dict, field_keys: dict, cell: int, force: bool,
                              progress: bool) -> list[str]:
    """Per checkpoint: each stimulus's box in input pixels, its crop, the sprite sheets; returns the stages written."""
    from tqdm.auto import tqdm

    used = PatchStore(ws).image_indices
    pixels = load_npy(patches_dir(ws) / "images" / "pixels.npy", mmap=True)
    written, token_noted = [], set()
    for m, t in tqdm(todo, desc="patches", disable=not progress, leave=False):
        name = f"patches/{m}/{t}"
        stim = ws.stimuli(m, t)
        tokens = any(info.channel_axis != 1 for info in stim.layers)
        # token-shaped units' sheets carry marks: their own key, so CNN keys (and files) stay as they were
        key = hash_json([FORMAT_VERSION, _stage_key(ws, f"stimuli/{m}/{t}"), field_keys[m], cell]
                        + (["token-marks-1"] if tokens else []))
        if not force and ws.is_done(name, key):
            continue
        N, k = stim.indices.shape
        boxes = _boxes(stim, fields[m], m, t, token_noted)
        marks = _marks(stim, fields[m], m, token_noted) if tokens else None
        rows = np.searchsorted(used, np.asarray(stim.indices))
        rows = np.where((rows < len(used)) & (used[np.minimum(rows, len(used) - 1)] == np.asarray(stim.indices)), rows, -1)
        geom = SheetGeometry.plan(N, k, cell)
        folder = patches_dir(ws, m, t)
        files = _write_sheets(folder, "sheet", geom, pixels.shape[-1],
                              lambda n: _marked(crop_patches(pixels, rows[n:n + 1], boxes[n:n + 1], cell)[0],
                                                boxes[n], None if marks is None else marks[n], rows[n]))
        save_npy(folder / "boxes.npy", boxes)
        if marks is not None:
            save_npy(folder / "marks.npy", marks)
        else:
            (folder / "marks.npy").unlink(missing_ok=True)
        write_json(folder / "index.json", {
            "format": FORMAT_VERSION, "model": m, "tag": t, "geometry": geom.to_dict(), "sheets": files,
            "channels": int(pixels.shape[-1]),
        })
        ws.finish(name, key, {"cell": cell}, neurons=int(N))
        written.append(name)
    return written


def _boxes(stim, rfs: dict[str, ReceptiveField], model: str, tag: str, token_noted: set | None = None) -> np.ndarray:
    """``[neurons, k, 4]`` input-pixel boxes (top, left, bottom, right) of each stimulus's argmax position.

    Token-shaped units (``[B, T, C]``): every token sees the whole image, so their boxes are the whole
    image; :func:`_marks` gives the argmax token's patch, drawn on it."""
    N, k = stim.indices.shape
    boxes = np.zeros((N, k, 4), dtype=np.int32)
    for info, sl in zip(stim.layers, stim.layer_slices().values()):
        if info.name not in rfs:
            raise ConceptEvoError(f"no receptive field for layer {info.name!r} of {model}; recompute with force=True")
        rf = rfs[info.name]
        if info.channel_axis != 1:
            boxes[sl] = (0, 0, *rf.input_size)
            continue
        if tuple(rf.spatial) != tuple(info.spatial):
            raise ConceptEvoError(
                f"layer {info.name!r} of {model} {tag} has activation maps of {info.spatial} in the stimuli but "
                f"{rf.spatial} in the model; were the stimuli computed with another image size?"
            )
        boxes[sl] = rf.boxes(np.asarray(stim.positions[sl]))
    return boxes


def _marks(stim, rfs: dict[str, ReceptiveField], model: str, token_noted: set | None = None) -> np.ndarray:
    """``[neurons, k, 4]`` pixel boxes of each token-shaped unit's argmax token (:func:`~.marks.token_box`:
    a patch of the token grid; the class token's is the whole image); -1 where there is none (map-shaped
    units, tokens that form no grid over the image, which are noted once per model and layer)."""
    N, k = stim.indices.shape
    marks = np.full((N, k, 4), -1, dtype=np.int32)
    for info, sl in zip(stim.layers, stim.layer_slices().values()):
        if info.channel_axis == 1:
            continue
        size = tuple(rfs[info.name].input_size)
        tokens = int(np.prod(info.spatial))
        if len(info.spatial) != 1 or token_grid(tokens, size) is None:
            if token_noted is not None and (model, info.name) not in token_noted:
                token_noted.add((model, info.name))
                log.info("layer %r of %s: its %s positions form no token grid over the %sx%s image, so its example "
                         "patches are whole stimulus images without a mark", info.name, model, info.spatial, *size)
            continue
        table = np.array([token_box(t, tokens, size) for t in range(tokens)], dtype=np.int32)
        pos = np.asarray(stim.positions[sl])
        marks[sl] = np.where((pos >= 0)[..., None], table[np.clip(pos, 0, tokens - 1)], -1)
    return marks


def _marked(cells: np.ndarray, boxes: np.ndarray, marks: np.ndarray | None, rows: np.ndarray) -> np.ndarray:
    """One neuron's cells ``[k, P, P, C]`` with each stimulus's mark drawn (where it has an image and a mark)."""
    if marks is None:
        return cells
    out = cells
    for j in range(cells.shape[0]):
        if rows[j] >= 0 and marks[j, 0] >= 0:
            if out is cells:
                out = cells.copy()
            out[j] = draw_mark(cells[j], tuple(int(v) for v in boxes[j]), tuple(int(v) for v in marks[j]))
    return out
