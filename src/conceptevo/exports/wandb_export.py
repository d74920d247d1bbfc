"""``conceptevo export WORKSPACE --wandb``: the unified space as a Weights & Biases run.

The run holds

* one table per checkpoint, ``units/MODEL/TAG``: a row per unit with its id,
  model, checkpoint, epoch, layer, channel, 2-D layout coordinates (``x``,
  ``y``: the explorer's frame, shared by every checkpoint), the distance it
  moved since the model's previous checkpoint, the classes of its stimuli, its
  top example patch (a ``wandb.Image``) and its unified-space vector (W&B's
  table projection panel can lay those out itself); for text studies the
  commonest argmax tokens of its contexts and its strongest context as text
  (``top_token``, ``top_tokens``, ``top_context``) instead of classes and patch;
* the diagnostics curves of :func:`conceptevo.diagnostics.diagnose`: per model,
  concept diversity, collapse and distance moved for the whole model (``all``)
  and each layer, and the checkpoint's accuracies (language-model runs: train
  loss), against the epoch (``MODEL/epoch``; ``MODEL/step`` when only steps are
  known, the checkpoint's position when neither is), and the same numbers as a
  ``diagnostics`` table.

By default the run is created in offline mode: nothing is sent and no account
is needed; ``wandb sync DIR/wandb/offline-run-...`` uploads it later (wandb
stages the table files in its data folder, ``~/.local/share/wandb`` unless
``WANDB_DATA_DIR`` says otherwise, until then). Pass ``run=`` to log into a run
you opened yourself (online or not) instead.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..diagnostics.metrics import finite_or_none as _num
from ..diagnostics.metrics import metric_row
from ..errors import ConceptEvoError
from ..patches import PatchStore
from ..workspace import Workspace
from .units import StimulusLabels, UnitPictures, checkpoint_units

log = logging.getLogger(__name__)

UNIT_COLUMNS = ["unit", "model", "checkpoint", "epoch", "layer", "channel", "x", "y", "moved", "top_class",
                "top_classes", "patch", "vector"]
#: Text studies: the commonest argmax tokens and the strongest context (text) instead of classes and a patch.
TEXT_UNIT_COLUMNS = ["unit", "model", "checkpoint", "step", "layer", "channel", "x", "y", "moved", "top_token",
                     "top_tokens", "top_context", "vector"]
DIAGNOSTICS_COLUMNS = ["model", "checkpoint", "epoch", "layer", "diversity", "collapse", "moved", "train_top1", "test_top1",
                       "step", "train_loss"]


def import_wandb():
    try:
        import wandb
    except ImportError:
        raise ConceptEvoError("the Weights & Biases export needs the wandb package: "
                              "pip install 'conceptevo[wandb]' (or pip install wandb)") from None
    return wandb


def _image(wandb, pic):
    if pic is None:
        return None
    a = np.asarray(pic, dtype=np.uint8)
    return wandb.Image(a[..., 0] if a.shape[-1] == 1 else a)


def unit_tables(ws, wandb, images: bool = True) -> dict:
    """``{"units/MODEL/TAG": wandb.Table}`` for every checkpoint with stimuli (text studies: with each unit's
    strongest context as text instead of its top patch)."""
    from ..contexts import is_text_workspace

    text = is_text_workspace(ws)
    store = PatchStore(ws)
    labels = None if text else StimulusLabels(ws, store)
    pictures = UnitPictures(ws, store, labels)
    tables = {}
    for cu in checkpoint_units(ws, labels, store):
        has = images and not text and pictures.has(cu.model, cu.tag)
        layers, channels = cu.layers, cu.channels
        rows = []
        for i, nid in enumerate(cu.ids):
            vec = None
            if cu.vectors is not None and np.isfinite(cu.vectors[i]).all():
                vec = [float(v) for v in cu.vectors[i]]
            x = y = None
            if cu.xy is not None:
                x, y = _num(cu.xy[i, 0]), _num(cu.xy[i, 1])
            rows.append([nid, cu.model, cu.tag, cu.step if text else _num(cu.epoch), layers[i], int(channels[i]) if channels[i].isdigit() else channels[i],
                         x, y, _num(cu.moved[i]) if cu.moved is not None else None, cu.top_class[i], cu.top_classes[i],
                         cu.top_context[i] if text else _image(wandb, pictures.top_patch(cu.model, cu.tag, i)) if has else None,
                         vec])
        tables[f"units/{cu.model}/{cu.tag}"] = wandb.Table(columns=TEXT_UNIT_COLUMNS if text else UNIT_COLUMNS, data=rows)
    note = pictures.note() if images and not text else None
    if note:
        log.warning("%s", note)
    return tables


def log_diagnostics(ws, run, wandb) -> int:
    """Log the diagnostics curves and table into ``run``; return the number of history rows (0: none, logged why)."""
    from ..diagnostics import diagnose

    try:
        diag = diagnose(ws, write=False)
    except ConceptEvoError as e:
        log.warning("no diagnostics curves in the W&B run: %s", e)
        return 0
    rows, table = 0, []
    for m, cks in diag.checkpoints.items():
        known = all(c.epoch is not None for c in cks)
        steps = not known and all(c.step is not None for c in cks)   # language-model runs: by training step
        axis = f"{m}/epoch" if known else f"{m}/step" if steps else f"{m}/checkpoint"
        run.define_metric(axis)
        run.define_metric(f"{m}/*", step_metric=axis)
        for j, c in enumerate(cks):
            per_layer = {"diversity": c.diversity, "collapse": c.collapse, "moved": c.moved}
            acc = {k: _num(c.metrics.get(k)) for k in ("train_top1", "test_top1", "train_loss")}
            x = float(c.epoch) if known else int(c.step) if steps else j
            run.log(metric_row(m, per_layer, {axis.rpartition("/")[2]: x, **acc}))
            rows += 1
            for layer in c.diversity:
                table.append([m, c.tag, _num(c.epoch), layer, _num(c.diversity.get(layer)), _num(c.collapse.get(layer)),
                              _num(c.moved.get(layer)), acc["train_top1"], acc["test_top1"], c.step, acc["train_loss"]])
    run.log({"diagnostics": wandb.Table(columns=DIAGNOSTICS_COLUMNS, data=table)})
    return rows


def export_wandb(ws, dir=None, project: str = "conceptevo", name: str | None = None, run=None,
                 images: bool = True, diagnostics: bool = True) -> Path:
    """Log workspace ``ws`` to a W&B run; return the run's local folder.

    Without ``run``, an offline run is created under ``dir`` (default: the
    current folder; wandb makes ``DIR/wandb/offline-run-...``), in project
    ``project`` with name ``name`` (default: the workspace's folder name), and
    finished. With ``run`` (e.g. ``wandb.init(...)``), the tables and curves go
    into it and it is left open. ``images``: the top patch of each unit as a
    ``wandb.Image``; ``diagnostics``: the curves and the diagnostics table.
    """
    wandb = import_wandb()
    ws = ws if isinstance(ws, Workspace) else Workspace(ws)
    if not ws.models:
        raise ConceptEvoError(f"the workspace {ws.path} lists no model; run the study first")
    own = run is None
    if not own and (dir is not None or name is not None):
        raise ConceptEvoError("dir= and name= are for the run export_wandb creates; with run=, the run you opened "
                              "has its own folder and name: give one or the other, not both")
    if own:
        folder = Path(dir) if dir is not None else Path.cwd()
        if folder.exists() and not folder.is_dir():
            raise ConceptEvoError(f"{folder} is a file; give a folder for the W&B run (--wandb-dir)")
        folder.mkdir(parents=True, exist_ok=True)
        base = ws.manifest.get("base") or {}
        config = {"workspace": ws.path.name, "base": base,
                  "models": {m: {"arch": ws.model_info(m).get("arch"), "checkpoints": ws.tags(m)} for m in ws.models}}
        settings = wandb.Settings(mode="offline", silent=True, console="off", x_disable_stats=True, save_code=False,
                                  disable_git=True, x_save_requirements=False)
        run = wandb.init(project=project, name=name or ws.path.name, dir=str(folder), config=config,
                         job_type="conceptevo-export", settings=settings, reinit="create_new")
    try:
        tables = unit_tables(ws, wandb, images=images)
        if diagnostics:
            log_diagnostics(ws, run, wandb)
        if tables:
            run.log(tables)
        else:
            log.warning("no checkpoint of %s has stimuli: no unit tables", ws.path)
        path = Path(run.settings.sync_dir)
    except BaseException:
        if own:
            run.finish(exit_code=1)  # the run is marked failed, not left looking complete
        raise
    if own:
        run.finish()
    log.info("W&B run written to %s", path)
    return path


__all__ = ["export_wandb", "metric_row", "unit_tables", "log_diagnostics", "import_wandb"]
