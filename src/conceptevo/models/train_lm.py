"""Train a language model on text windows, with checkpoints laid out like published training runs.

:func:`checkpoint_steps` is the schedule (Pythia's: step 0, 1, 2, 4, ... 512,
then evenly spaced). :func:`train_lm` writes one Hugging Face-style folder per
checkpoint step::

    out/
      step0/config.json  step0/model.safetensors
      step1/...
      tokenizer.json       the tokenizer, saved once
      train_log.json       per-step train loss, the checkpoint steps, steps/s

For ``lm_tiny``, ``config.json`` is ``{"conceptevo_arch": "lm_tiny", ...its
hyperparameters}``; a Hugging Face model (GPT-NeoX) is written with its own
``save_pretrained``. Each folder is written to a temporary name and renamed
into place, so a folder named ``stepN`` is always complete.

:func:`load_lm_folder` reads such a folder back. It is deliberately minimal:
conceptevo's own ``lm_tiny`` folders, and Hugging Face folders through
``transformers`` (offline) when it is installed; the general reader of
Hugging Face folders and safetensors files lives with the other checkpoint
formats in :mod:`conceptevo.models.checkpoints`.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError, ConceptEvoError
from .lm import TinyLM, _transformers, lm_loss
from .train import decay_groups

log = logging.getLogger(__name__)

#: The last log-spaced step of the schedule (as in Pythia's 1, 2, 4, ... 512).
LOG_SPACED_UNTIL = 512


def checkpoint_steps(total: int, every: int, log_until: int = LOG_SPACED_UNTIL) -> list[int]:
    """Steps to checkpoint in a run of ``total`` steps: 0, the powers of two up to ``log_until``, every ``every``-th, and ``total``.

    All capped at ``total``, sorted, without repeats. Pythia's 143,000-step
    runs are ``checkpoint_steps(143000, 1000)``: 154 checkpoints.
    """
    for name, v in (("total", total), ("every", every)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "total" else 1):
            raise ConceptEvoError(f"checkpoint_steps: {name}={v!r} must be a {'non-negative' if name == 'total' else 'positive'} integer")
    steps = {0, total}
    p = 1
    while p <= min(log_until, total):
        steps.add(p)
        p *= 2
    steps.update(range(every, total + 1, every))
    return sorted(steps)


def _write_folder(out: Path, name: str, write) -> Path:
    """Call ``write(tmp_folder)``, then rename the folder to ``out/name`` (replacing an older one)."""
    final = out / name
    tmp = out / f".{name}.tmp{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        if final.exists():
            old = out / f".{name}.old{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def save_lm_folder(model: nn.Module, folder: str | os.PathLike) -> Path:
    """Write ``model`` as a Hugging Face-style folder, atomically: ``config.json`` + ``model.safetensors``."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path):
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(tmp, safe_serialization=True)
        elif isinstance(model, TinyLM):
            from safetensors.torch import save_file

            (tmp / "config.json").write_text(json.dumps(model.config(), indent=1))
            save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                      str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            raise ConceptEvoError(f"cannot save a {type(model).__name__} as a model folder: give lm_tiny or a "
                                  "Hugging Face model (with save_pretrained)")

    return _write_folder(folder.parent, folder.name, write)


def load_lm_folder(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """A model folder :func:`save_lm_folder` wrote, in eval mode: ``lm_tiny``, or a Hugging Face model (offline)."""
    p = Path(path)
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{p} is not a model folder: it has no config.json")
    try:
        cfg = json.loads(cfg_file.read_text())
    except ValueError as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON ({e}); the folder is damaged") from None
    if cfg.get("conceptevo_arch") == TinyLM.arch:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        hp = {k: cfg[k] for k in ("vocab_size", "d_model", "n_layers", "n_heads", "d_mlp", "context", "dropout") if k in cfg}
        model = TinyLM(**hp)
        weights = p / "model.safetensors"
        if not weights.is_file():
            raise CheckpointError(f"{p} has config.json but no model.safetensors")
        try:
            state = load_file(str(weights))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{weights} cannot be read ({e}); the file is damaged or truncated") from None
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"{weights} does not match the config's lm_tiny: missing {missing[:4]}, "
                                  f"unexpected {unexpected[:4]}")
        return model.to(device).eval()
    if "model_type" in cfg:
        tf = _transformers()
        try:
            model = tf.AutoModelForCausalLM.from_pretrained(str(p), local_files_only=True)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read the Hugging Face model folder {p}: {e}") from None
        return model.to(device).eval()
    raise CheckpointError(f"{cfg_file} names neither conceptevo_arch nor a Hugging Face model_type; "
                          "it is not a language-model folder")


def step_folders(run: str | os.PathLike) -> list[tuple[int, Path]]:
    """The ``stepN`` folders of a training run, ``(N, path)`` in step order."""
    out = []
    for d in Path(run).iterdir():
        if d.is_dir() and d.name.startswith("step") and d.name[4:].isdigit():
            out.append((int(d.name[4:]), d))
    return sorted(out)


def train_lm(model: nn.Module, windows, out: str | os.PathLike, steps: int = 1000, every: int = 100,
             batch_size: int = 32, lr: float = 3e-3, weight_decay: float = 0.1, warmup: int = 20,
             seed: int = 0, tokenizer=None, device: str | torch.device = "cpu", log_until: int = LOG_SPACED_UNTIL,
             grad_clip: float | None = 1.0, meta: dict | None = None) -> dict:
    """Train ``model`` on random batches of ``windows`` (a :class:`~conceptevo.data.text.TextWindows`) with AdamW.

    The learning rate warms up linearly over ``warmup`` steps, then decays
    with a cosine to a tenth. Checkpoints at :func:`checkpoint_steps` ``(steps,
    every)`` (step ``N`` = the weights after ``N`` updates) go to ``out/stepN``;
    the tokenizer (``windows.tokenizer`` unless given) to ``out/tokenizer.json``;
    the per-step loss to ``out/train_log.json``, rewritten at every checkpoint.
    Batches are drawn from a generator seeded with ``seed``. ``meta`` (JSON)
    is recorded in the log as it is. Returns the log.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ConceptEvoError(f"steps={steps!r} must be a non-negative integer")
    if batch_size < 1:
        raise ConceptEvoError(f"batch_size={batch_size!r} must be positive")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    schedule = checkpoint_steps(steps, every, log_until)
    tk = tokenizer if tokenizer is not None else getattr(windows, "tokenizer", None)
    if tk is not None:
        tk.save(out / "tokenizer.json")
    model.to(device).train()
    opt = torch.optim.AdamW(decay_groups(model, weight_decay), lr=lr, betas=(0.9, 0.95))

    def lr_at(s):
        if s < warmup:
            return lr * (s + 1) / warmup
        frac = (s - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(1.0, frac))))

    gen = torch.Generator().manual_seed(seed)
    n = len(windows)
    losses: list[float] = []
    log_obj = {"steps": steps, "every": every, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
               "warmup": warmup, "seed": seed, "context": getattr(windows, "context", None),
               **(meta or {}), "checkpoints": [], "loss": losses}
    todo = list(schedule)
    t0 = time.perf_counter()
    train_time = 0.0
    for s in range(steps + 1):
        if todo and todo[0] == s:
            todo.pop(0)
            model.eval()
            save_lm_folder(model, out / f"step{s}")
            model.train()
            log_obj["checkpoints"].append(s)
            log_obj["train_seconds"] = round(train_time, 3)
            log_obj["steps_per_second"] = round(s / train_time, 3) if train_time > 0 else None
            _write_json(out / "train_log.json", log_obj)
        if s == steps:
            break
        t = time.perf_counter()
        idx = torch.randint(0, n, (batch_size,), generator=gen).tolist()
        ids, targets = windows.batch(idx)
        for g in opt.param_groups:
            g["lr"] = lr_at(s)
        loss = lm_loss(model, ids.to(device), targets.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        losses.append(float(loss.detach()))
        train_time += time.perf_counter() - t
        if (s + 1) % max(1, steps // 10) == 0:
            log.info("step %d/%d  loss %.3f", s + 1, steps, losses[-1])
    model.eval()
    log_obj["wall_seconds"] = round(time.perf_counter() - t0, 3)
    _write_json(out / "train_log.json", log_obj)
    return log_obj


#: Defaults for a demo run of lm_tiny on Shakespeare (115k parameters, 5.06M characters, 85-character
#: vocabulary): 21 checkpoints. Measured: 2000 steps in 202 s (10 steps/s) with torch.set_num_threads(1) on a
#: 2-core machine at load average 8; train loss 4.44 -> 1.77 nats per character.
DEMO_DEFAULTS = dict(context=64, d_model=64, n_layers=2, n_heads=4, steps=2000, every=200, batch_size=32, lr=3e-3)


def open_corpus(corpus: str, tokenizer="char", context: int = 64, stride: int | None = None):
    """Windows of a named corpus: ``"shakespeare"`` (the ``shakespeare`` package), ``"generated"`` (:func:`generated_text`), or a file/folder."""
    from ..data.text import corpus_windows

    return corpus_windows(corpus, tokenizer, context, stride)


def train_text(out: str | os.PathLike, corpus: str = "shakespeare", arch: str = "lm_tiny", tokenizer="char",
               seed: int = 0, model_options: dict | None = None, **train_options) -> dict:
    """Build ``arch`` (``lm_tiny`` or ``gpt_neox_tiny``) for ``corpus``'s tokenizer and train it with checkpoints in ``out``.

    Unset options take :data:`DEMO_DEFAULTS`. The model's initial weights
    come from ``seed`` (so do the batches). Returns the training log.
    """
    from .zoo import build_model

    opts = {**DEMO_DEFAULTS, **train_options}
    context = opts.pop("context")
    mopts = {k: opts.pop(k) for k in ("d_model", "n_layers", "n_heads") if k in opts}
    if arch != "lm_tiny":
        mopts = {}
    mopts.update(model_options or {})
    windows = open_corpus(corpus, tokenizer, context)
    model = build_model(arch, vocab_size=windows.tokenizer.vocab_size, context=context, seed=seed, **mopts)
    meta = {"arch": arch, "corpus": corpus, "tokenizer": getattr(windows.tokenizer, "kind", str(tokenizer)),
            "model_options": mopts}
    return train_lm(model, windows, out, seed=seed, meta=meta, **opts)


def run_losses(run: str | os.PathLike) -> Sequence[float]:
    """The per-step train loss of a run :func:`train_lm` wrote."""
    return json.loads((Path(run) / "train_log.json").read_text())["loss"]


def run_of_checkpoint(path: str | os.PathLike) -> Path | None:
    """The run folder (with ``train_log.json``) a checkpoint folder ``RUN/stepN`` belongs to, or None."""
    run = Path(path).parent
    return run if (run / "train_log.json").is_file() else None


def loss_at_step(losses: Sequence[float], step: int, half_window: int = 10) -> float | None:
    """The train loss at checkpoint ``step``: the mean of the per-step losses from ``step - h`` to ``step + h``.

    ``losses[s]`` is the loss of the weights after ``s`` updates (checkpoint ``steps``) on batch ``s``, so
    step 0 is ``losses[0]`` alone; ``h = min(half_window, step // 2)`` keeps the log-spaced early checkpoints'
    windows apart. The last checkpoint (after every update) has no loss of its own: the window ends at the
    last recorded step. None when ``losses`` is empty or ``step`` is outside the run.
    """
    n = len(losses)
    if n == 0 or step is None or step < 0 or step > n:
        return None
    h = min(int(half_window), int(step) // 2)
    lo, hi = max(0, step - h), min(n, step + h + 1)
    if lo >= hi:
        lo = n - 1
    return float(np.mean(losses[lo:hi]))
