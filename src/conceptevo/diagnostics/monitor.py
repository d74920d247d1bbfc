"""A live concept monitor: early warnings while a model trains (paper Sec 4.5).

At chosen moments of training, :class:`ConceptMonitor` finds the model's
stimuli on a fixed probe set, projects its neurons onto a base space that was
built beforehand (the image embedding of a base workspace), records concept
diversity, concept collapse and distance moved per layer
(:mod:`conceptevo.diagnostics.metrics`), and warns, naming the layers, when

* **diversity falls sharply**: a layer's (or the whole model's) diversity is more
  than ``drop`` nats below the highest value it had at an earlier check
  (differences of entropies do not depend on the scale of the space);
* **neurons collapse**: at least ``collapse_share`` of a layer's neurons are
  collapsed (share stimuli heavily with many others) and that share has risen by
  ``collapse_rise`` or more since its lowest value at an earlier check;
* **weights or activations are not finite** (the run has already blown up).

A warning is raised once when a layer starts to fire and again only after it
has recovered, so a collapsed run does not warn at every check. Each warning is
logged with ``logging.warning`` and kept in :attr:`ConceptMonitor.warnings`.

Three ways to use it::

    monitor = monitor_from_workspace("base-study")           # or ConceptMonitor(probe, image_embedding)
    train(model, train_set, test_set, "runs/x", cfg, callbacks=[monitor])   # conceptevo's trainer
    for epoch in ...:                                          # a plain PyTorch loop
        ...; monitor.check(model, epoch)
    trainer = lightning.Trainer(callbacks=[monitor.as_lightning_callback()])  # Lightning, if installed

The Lightning callback checks at the end of each training epoch (1-based epoch
numbers). Lightning is optional and imported only when asked for.

With ``wandb_run=run`` (a Weights & Biases run, e.g. ``wandb.init(...)`` or a
Lightning ``WandbLogger``'s ``experiment``) every check is also logged there,
under ``concept_monitor/`` (against ``concept_monitor/check``), and the
warnings' messages are kept in the run's summary.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from ..errors import ConceptEvoError, NonFiniteActivationError, check_positive
from ..hooks import eval_mode, model_device
from ..io import write_json
from .metrics import ALL, _jsonable, collapse, distance_moved, diversity_by_layer, metric_row

log = logging.getLogger(__name__)

#: A probe set must hold at least this many times k images: with fewer, every
#: neuron must pick its k stimuli from a handful of images, so stimuli overlap
#: (and "collapse") whatever the model does.
MIN_PROBE_PER_K = 10

#: Keys of the checks logged to a W&B run start with this.
WANDB_PREFIX = "concept_monitor"


@dataclass
class ConceptWarning:
    """One early warning: what fired, where, and the numbers behind it."""

    kind: str                  # "diversity", "collapse" or "nonfinite"
    layers: list[str]          # the layers that fire ("all" = the whole model)
    message: str
    check: int                 # index of the check in ConceptMonitor.records
    epoch: float | None = None
    step: int | None = None
    values: dict = field(default_factory=dict)   # layer -> {"reference": r, "current": c}

    def to_dict(self) -> dict:
        return _jsonable(asdict(self))


@dataclass
class MonitorRecord:
    """The metrics of one check."""

    check: int
    epoch: float | None
    step: int | None
    tag: str | None
    diversity: dict[str, float]
    collapse: dict[str, float]
    moved: dict[str, float]           # mean distance moved since the previous check (per layer, "all")
    probe_top1: float | None          # the model's top-1 accuracy on the probe set
    metrics: dict                     # whatever the caller passed (e.g. a checkpoint's accuracies)
    seconds: float
    finite: bool = True

    def to_dict(self) -> dict:
        return _jsonable(asdict(self))


def _probe_indices(probe) -> np.ndarray:
    from ..data.loader import iter_batches

    return np.concatenate([idx.numpy() for _, _, idx in iter_batches(probe, 4096)])


class ConceptMonitor:
    """Record concept diversity / collapse / movement during training and warn early.

    Parameters
    ----------
    probe : dataset
        A fixed set of images returning ``(image, label, index)``, whose indices
        are images of ``image_embedding`` that have a vector (a subset of the
        base workspace's image pool; :func:`monitor_from_workspace` picks one).
        At least ``MIN_PROBE_PER_K * k`` images.
    image_embedding : UnifiedSpace, ImageEmbedding or float array [num_images, dim]
        The base space (a fitted :class:`conceptevo.projection.UnifiedSpace`) or its
        image vectors (``Workspace(path).image_embedding()``).
    k : int
        Stimuli per neuron (paper: 10).
    layers : optional
        Layers to watch (as :func:`conceptevo.layers.resolve_layers` reads them;
        default every Conv2d).
    epochs : iterable of float, optional
        Check only at these epochs (others are skipped); default every call.
    every : int
        Check every ``every``-th call that passes the ``epochs`` filter.
    drop : float
        Diversity warning: fall (nats) below the earlier maximum.
    collapse_share, collapse_rise : float
        Collapse warning: share of collapsed neurons, and its rise since the
        earlier minimum.
    jaccard, min_others :
        What counts as a collapsed neuron (see :func:`~conceptevo.diagnostics.collapse`).
    method : str
        Entropy estimator (``"knn"``, ``"vasicek"``, ``"gaussian"``).
    min_neurons : int
        Layers with fewer neurons are recorded but never warned about (their
        diversity is too noisy).
    probe_accuracy : bool
        Also record the model's top-1 accuracy on the probe set.
    on_warning : callable, optional
        Called with each :class:`ConceptWarning`.
    wandb_run : optional
        A Weights & Biases run to log every check to (see the module docstring).
    """

    def __init__(self, probe, image_embedding, k: int = 10, layers=None, epochs: Iterable[float] | None = None,
                 every: int = 1, drop: float = 0.5, collapse_share: float = 0.5, collapse_rise: float = 0.25,
                 jaccard: float = 0.5, min_others: int | None = None, method: str = "knn", min_neurons: int = 8,
                 batch_size: int = 256, device=None, probe_accuracy: bool = True,
                 on_warning: Callable[[ConceptWarning], None] | None = None, progress: bool = False, wandb_run=None):
        check_positive("k", k, integer=True)
        check_positive("every", every, integer=True)
        check_positive("drop", drop)
        check_positive("batch_size", batch_size, integer=True)
        for name, v in (("collapse_share", collapse_share), ("collapse_rise", collapse_rise), ("jaccard", jaccard)):
            if not 0 < float(v) <= 1:
                raise ConceptEvoError(f"{name} must be in (0, 1], got {v!r}")
        from ..containers import ImageEmbedding
        from ..projection.space import UnifiedSpace
        from .entropy import METHODS

        if method not in METHODS:
            raise ConceptEvoError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
        if isinstance(image_embedding, UnifiedSpace):
            image_embedding = image_embedding.image_embedding_ if hasattr(image_embedding, "image_embedding_") else None
            if image_embedding is None:
                raise ConceptEvoError("the UnifiedSpace given as image_embedding is not fitted; fit it or load a saved one")
        V = image_embedding.vectors if isinstance(image_embedding, ImageEmbedding) else np.asarray(image_embedding)
        if V.ndim != 2:
            raise ConceptEvoError(f"image_embedding must be a fitted UnifiedSpace, an ImageEmbedding or a "
                                  f"[num_images, dim] array, got shape {V.shape}")
        n = len(probe)
        if n < MIN_PROBE_PER_K * k:
            raise ConceptEvoError(
                f"the probe set has {n} images, too few for k={k}: it needs at least {MIN_PROBE_PER_K * k} "
                f"({MIN_PROBE_PER_K} x k), or neurons' stimuli overlap whatever the model does; "
                "use a larger probe set or a smaller k"
            )
        idx = _probe_indices(probe)
        if idx.max() >= V.shape[0] or idx.min() < 0:
            raise ConceptEvoError(
                f"probe image indices go up to {int(idx.max())} but the base space has vectors for {V.shape[0]} images; "
                "the probe must be images of the base workspace's pool (see monitor_from_workspace)"
            )
        blank = ~np.isfinite(np.asarray(V[idx], dtype=np.float64)).all(axis=1)
        if blank.any():
            raise ConceptEvoError(
                f"{int(blank.sum())} of the {n} probe images have no vector in the base space (e.g. image "
                f"{int(idx[blank][0])}); choose probe images from the base workspace's pool"
            )
        self.probe = probe
        self.image_vectors = V
        self.num_images = int(V.shape[0])
        self.k, self.layers, self.every = int(k), layers, int(every)
        self.epochs = None if epochs is None else sorted(float(e) for e in epochs)
        self.drop, self.collapse_share, self.collapse_rise = float(drop), float(collapse_share), float(collapse_rise)
        self.jaccard, self.min_others, self.method = float(jaccard), min_others, method
        self.min_neurons = int(min_neurons)
        self.batch_size, self.device, self.probe_accuracy = int(batch_size), device, bool(probe_accuracy)
        self.on_warning, self.progress = on_warning, progress
        if wandb_run is not None and not callable(getattr(wandb_run, "log", None)):
            raise ConceptEvoError(f"wandb_run must be a Weights & Biases run (with a .log method), got {type(wandb_run).__name__}; "
                                  "pass the object wandb.init() returns")
        self.wandb_run = wandb_run
        self._wandb_ready = False
        self.records: list[MonitorRecord] = []
        self.warnings: list[ConceptWarning] = []
        self._calls = 0
        self._prev = None            # previous check's NeuronEmbedding
        self._best_div: dict[str, float] = {}
        self._least_col: dict[str, float] = {}
        self._active: set[tuple[str, str]] = set()
        self._sizes: dict[str, int] = {}

    # -- entry points -----------------------------------------------------------------------------
    def on_checkpoint(self, model: nn.Module, checkpoint) -> MonitorRecord | None:
        """Hook for :func:`conceptevo.models.train.train` (``callbacks=[monitor]``)."""
        return self.check(model, epoch=checkpoint.epoch, step=checkpoint.step, tag=checkpoint.tag,
                          metrics=dict(checkpoint.metrics or {}))

    def __call__(self, model, epoch=None, **kw):
        return self.check(model, epoch, **kw)

    def wants(self, epoch: float | None) -> bool:
        """Whether a call at ``epoch`` would be checked (the ``epochs`` filter; ``every`` aside)."""
        if self.epochs is None or epoch is None:
            return True
        return any(abs(float(epoch) - e) < 1e-6 for e in self.epochs)

    def check(self, model: nn.Module, epoch: float | None = None, step: int | None = None, tag: str | None = None,
              metrics: dict | None = None) -> MonitorRecord | None:
        """Measure the model now; returns the record, or None when this call is skipped."""
        if not self.wants(epoch):
            return None
        self._calls += 1
        if (self._calls - 1) % self.every:
            return None
        return self._measure(model, epoch, step, tag, dict(metrics or {}))

    # -- measuring --------------------------------------------------------------------------------
    def _measure(self, model, epoch, step, tag, metrics) -> MonitorRecord:
        # Measured in eval mode; afterwards every submodule gets its own mode back (e.g. a BatchNorm
        # frozen in eval mode while the rest trains, which Lightning respects) so training goes on as it was.
        with eval_mode(model):
            return self._measure_now(model, epoch, step, tag, metrics)

    def _measure_now(self, model, epoch, step, tag, metrics) -> MonitorRecord:
        from ..projection import project
        from ..stimuli import find_stimuli

        t0 = time.perf_counter()
        i = len(self.records)
        device = self.device if self.device is not None else model_device(model)
        bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
        stim = None
        if not bad:
            try:
                stim = find_stimuli(model, self.probe, k=self.k, layers=self.layers, batch_size=self.batch_size,
                                    device=device, progress=self.progress, num_images=self.num_images,
                                    desc="monitor stimuli")
            except NonFiniteActivationError as e:
                bad = [e.layer]
        top1 = None
        if self.probe_accuracy and not bad:
            from ..models.train import accuracy

            top1 = accuracy(model, self.probe, batch_size=self.batch_size, device=device)["top1"]
        if bad:
            rec = MonitorRecord(i, epoch, step, tag, {}, {}, {}, top1, metrics, time.perf_counter() - t0, finite=False)
            self.records.append(rec)
            layers = sorted({b.rsplit(".", 1)[0] if b.endswith((".weight", ".bias")) else b for b in bad})
            self._warn(ConceptWarning(
                "nonfinite", layers, f"non-finite weights or activations in {', '.join(layers[:6])}"
                + (f" and {len(layers) - 6} more" if len(layers) > 6 else "")
                + f"{self._when(epoch, step)}: training has blown up (learning rate too high?)",
                i, epoch, step))
            self._log_wandb(rec)
            return rec
        emb = project(stim, self.image_vectors)
        div = diversity_by_layer(emb, method=self.method)
        col = collapse(stim, jaccard=self.jaccard, min_others=self.min_others).by_layer
        for info in stim.layers:
            self._sizes[info.name] = info.channels
        self._sizes[ALL] = len(stim)
        moved = {}
        if self._prev is not None:
            try:
                moved = distance_moved(self._prev, emb).by_layer
            except ConceptEvoError:
                moved = {}
        self._prev = emb
        rec = MonitorRecord(i, epoch, step, tag, div, col, moved, top1, metrics, time.perf_counter() - t0)
        self.records.append(rec)
        self._evaluate(rec)
        self._log_wandb(rec)
        log.debug("monitor check %d%s: diversity %.3f, collapse %.2f, probe top-1 %s", i, self._when(epoch, step),
                  div.get(ALL, float("nan")), col.get(ALL, float("nan")), top1)
        return rec

    @staticmethod
    def _when(epoch, step) -> str:
        parts = []
        if epoch is not None:
            parts.append(f"epoch {float(epoch):g}")
        if step is not None:
            parts.append(f"step {int(step)}")
        return f" at {', '.join(parts)}" if parts else ""

    def _watched(self, layer: str) -> bool:
        return self._sizes.get(layer, 0) >= self.min_neurons

    def _evaluate(self, rec: MonitorRecord) -> None:
        div_fire, col_fire = {}, {}
        for layer, value in rec.diversity.items():
            if math.isnan(value) or not self._watched(layer):
                continue
            best = self._best_div.get(layer)
            if best is not None and value < best - self.drop:
                div_fire[layer] = {"reference": best, "current": value}
        for layer, share in rec.collapse.items():
            if not math.isfinite(share) or not self._watched(layer) or layer == ALL:
                continue
            least = self._least_col.get(layer)
            if least is not None and share >= self.collapse_share and share - least >= self.collapse_rise:
                col_fire[layer] = {"reference": least, "current": share}
        # update the references after judging (a check is compared with earlier checks only)
        for layer, value in rec.diversity.items():
            if math.isfinite(value):
                self._best_div[layer] = max(value, self._best_div.get(layer, -math.inf))
        for layer, share in rec.collapse.items():
            if math.isfinite(share):
                self._least_col[layer] = min(share, self._least_col.get(layer, math.inf))
        when = self._when(rec.epoch, rec.step)
        acc = f" (probe top-1 {rec.probe_top1:.3f})" if rec.probe_top1 is not None else ""
        for kind, fire, text in (
            ("diversity", div_fire, lambda l, v: f"{l} {v['reference']:.2f} -> {v['current']:.2f}"),
            ("collapse", col_fire, lambda l, v: f"{l} {v['reference']:.0%} -> {v['current']:.0%}"),
        ):
            now = {(kind, l) for l in fire}
            new = now - self._active
            self._active = {a for a in self._active if a[0] != kind} | now
            if not new:
                continue
            layers = sorted(fire, key=lambda l: (l != ALL, l))
            what = ("concept diversity fell sharply" if kind == "diversity"
                    else "neurons collapsed onto the same stimuli")
            detail = "; ".join(text(l, fire[l]) for l in layers[:8]) + (f"; and {len(layers) - 8} more layers" if len(layers) > 8 else "")
            unit = " nats" if kind == "diversity" else ""
            self._warn(ConceptWarning(kind, layers, f"{what}{when}{acc}: {detail}{unit}", rec.check, rec.epoch, rec.step,
                                      {l: fire[l] for l in layers}))

    def _log_wandb(self, rec: MonitorRecord) -> None:
        """One row per check in the W&B run (if any): the metrics per layer, probe accuracy, warnings so far."""
        run = self.wandb_run
        if run is None:
            return
        if not self._wandb_ready:
            run.define_metric(f"{WANDB_PREFIX}/check")
            run.define_metric(f"{WANDB_PREFIX}/*", step_metric=f"{WANDB_PREFIX}/check")
            self._wandb_ready = True
        extra = {"check": rec.check, "epoch": None if rec.epoch is None else float(rec.epoch),
                 "step": None if rec.step is None else int(rec.step), "probe_top1": rec.probe_top1,
                 "finite": int(rec.finite), "warnings": len(self.warnings), "seconds": rec.seconds}
        run.log(metric_row(WANDB_PREFIX, {"diversity": rec.diversity, "collapse": rec.collapse, "moved": rec.moved}, extra))
        if self.warnings:
            run.summary[f"{WANDB_PREFIX}/warning_messages"] = [w.message for w in self.warnings]

    def _warn(self, w: ConceptWarning) -> None:
        self.warnings.append(w)
        log.warning("concept monitor: %s", w.message)
        if self.on_warning is not None:
            self.on_warning(w)

    # -- results ----------------------------------------------------------------------------------
    @property
    def fired(self) -> bool:
        return bool(self.warnings)

    def first_warning(self, kinds: Iterable[str] | None = None) -> ConceptWarning | None:
        kinds = None if kinds is None else set(kinds)
        return next((w for w in self.warnings if kinds is None or w.kind in kinds), None)

    def series(self, field_name: str = "diversity", layer: str = ALL) -> np.ndarray:
        """One metric over the checks (NaN where missing): e.g. ``series("collapse", "features.10")``."""
        out = []
        for r in self.records:
            if field_name == "probe_top1":
                out.append(np.nan if r.probe_top1 is None else r.probe_top1)
            else:
                out.append(getattr(r, field_name).get(layer, np.nan))
        return np.asarray(out, dtype=np.float64)

    def to_dict(self) -> dict:
        return {
            "settings": _jsonable({"k": self.k, "drop": self.drop, "collapse_share": self.collapse_share,
                                   "collapse_rise": self.collapse_rise, "jaccard": self.jaccard,
                                   "min_others": self.min_others, "method": self.method, "every": self.every,
                                   "epochs": self.epochs, "probe_images": len(self.probe), "min_neurons": self.min_neurons}),
            "records": [r.to_dict() for r in self.records],
            "warnings": [w.to_dict() for w in self.warnings],
        }

    def save(self, path) -> Path:
        """Write records and warnings as JSON (atomically)."""
        path = Path(path)
        write_json(path, self.to_dict())
        return path

    def summary(self) -> str:
        lines = [f"concept monitor: {len(self.records)} checks, {len(self.warnings)} warnings"]
        for r in self.records:
            acc = "" if r.probe_top1 is None else f"  probe top-1 {r.probe_top1:.3f}"
            if not r.finite:
                lines.append(f"  check {r.check}{self._when(r.epoch, r.step)}: not finite{acc}")
                continue
            lines.append(f"  check {r.check}{self._when(r.epoch, r.step)}: diversity {r.diversity.get(ALL, float('nan')):+.3f}"
                         f"  collapse {r.collapse.get(ALL, float('nan')):.2f}"
                         + (f"  moved {r.moved[ALL]:.3f}" if ALL in r.moved and r.moved[ALL] is not None else "") + acc)
        for w in self.warnings:
            lines.append(f"  WARNING: {w.message}")
        return "\n".join(lines)

    # -- Lightning ---------------------------------------------------------------------------------
    def as_lightning_callback(self, stop_on_warning: bool = False):
        """This monitor as a PyTorch Lightning ``Callback`` (checks at the end of each training epoch).

        Needs ``lightning`` (or ``pytorch_lightning``) installed. With
        ``stop_on_warning`` the trainer stops after the epoch that warned.
        """
        return _lightning_callback_class()(self, stop_on_warning)


def _import_lightning():
    try:
        import lightning.pytorch as pl  # noqa: F401
        return pl
    except ImportError:
        pass
    try:
        import pytorch_lightning as pl  # noqa: F401
        return pl
    except ImportError:
        raise ConceptEvoError("the Lightning callback needs PyTorch Lightning: pip install lightning "
                              "(in a plain loop, call monitor.check(model, epoch) instead)") from None


_LIGHTNING_CLASS = None


def _lightning_callback_class():
    global _LIGHTNING_CLASS
    if _LIGHTNING_CLASS is None:
        pl = _import_lightning()

        class ConceptMonitorCallback(pl.Callback):
            """Runs a :class:`ConceptMonitor` at the end of every training epoch."""

            def __init__(self, monitor: ConceptMonitor, stop_on_warning: bool = False):
                super().__init__()
                self.monitor = monitor
                self.stop_on_warning = stop_on_warning

            def on_train_epoch_end(self, trainer, pl_module):
                if getattr(trainer, "sanity_checking", False):
                    return
                metrics = {}
                for key, v in dict(getattr(trainer, "callback_metrics", {}) or {}).items():
                    try:
                        metrics[str(key)] = float(v)
                    except (TypeError, ValueError):
                        pass
                before = len(self.monitor.warnings)
                self.monitor.check(pl_module, epoch=float(trainer.current_epoch + 1), step=int(trainer.global_step),
                                   metrics=metrics)
                if self.stop_on_warning and len(self.monitor.warnings) > before:
                    trainer.should_stop = True

        # pickle finds the class under this name through the module's __getattr__ below (spawn-based
        # strategies such as ddp_spawn pickle the trainer's callbacks); a local class could not be pickled
        ConceptMonitorCallback.__qualname__ = "ConceptMonitorCallback"
        ConceptMonitorCallback.__module__ = __name__
        _LIGHTNING_CLASS = ConceptMonitorCallback
    return _LIGHTNING_CLASS


def __getattr__(name):
    if name == "ConceptMonitorCallback":
        return _lightning_callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def monitor_from_workspace(path, probe_dataset=None, probe_size: int = 1000, seed: int = 0, **kwargs) -> ConceptMonitor:
    """A :class:`ConceptMonitor` on the base space of the workspace at ``path``.

    The probe set is ``probe_dataset`` if given (its indices must be images of
    the workspace's pool), else a seeded sample of ``probe_size`` images of the
    workspace's own image pool that have vectors (the study's dataset is
    reopened from its config). Other keyword arguments go to ConceptMonitor.
    """
    from ..data.base import Subset
    from ..workspace import Workspace

    ws = Workspace(path)
    emb = ws.image_embedding()
    if probe_dataset is None:
        check_positive("probe_size", probe_size, integer=True)
        full = ws.images()
        has = np.flatnonzero(emb.has_vector[: len(full)])
        if has.size == 0:
            raise ConceptEvoError(f"the image embedding of {ws.path} gives no image a vector; rebuild the workspace")
        rng = np.random.default_rng(seed)
        pick = np.sort(rng.choice(has, size=min(probe_size, has.size), replace=False))
        probe_dataset = Subset(full, pick)
        log.info("concept monitor: %d probe images from %s", len(pick), ws.path)
    return ConceptMonitor(probe_dataset, emb, **kwargs)


__all__ = ["ConceptMonitor", "ConceptWarning", "MonitorRecord", "monitor_from_workspace", "MIN_PROBE_PER_K"]
