"""Loading and saving checkpoints, safely.

All loading goes through :func:`load_checkpoint`, which uses
``torch.load(weights_only=True)``: a checkpoint that would need arbitrary code
to unpickle is refused unless the caller opts in with ``trust=True``
(``--trust-checkpoint`` on the command line). ``.safetensors`` files are read
with the safetensors package when it is installed.
"""
from __future__ import annotations

import logging
import pickle
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..io import atomic_path, file_sha256, read_json, write_json
from ..records import check_name, checkpoint_problem

log = logging.getLogger(__name__)

STATE_KEYS = ("state_dict", "model_state_dict", "model")
INDEX_FILE = "checkpoints.json"
EXTENSIONS = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")


@dataclass
class Checkpoint:
    """One saved state of a model: its file, when in training, and how good it was."""

    tag: str  # e.g. "e0.25", "e3"
    path: str
    epoch: float | None = None
    step: int | None = None
    metrics: dict = field(default_factory=dict)  # train_top1, train_top5, test_top1, test_top5, ...

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Checkpoint":
        return cls(tag=str(d["tag"]), path=str(d["path"]), epoch=d.get("epoch"), step=d.get("step"), metrics=dict(d.get("metrics", {})))


def epoch_tag(epoch: float) -> str:
    """'e3' for whole epochs, 'e0.25' for fractions."""
    return f"e{round(float(epoch), 2):g}"


def _read_state(path: Path, trust: bool):
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise CheckpointError(f"{path} is a safetensors file; install it with `pip install safetensors`") from None
        try:
            return load_file(str(path))
        except Exception as e:
            raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({e}); re-save it") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as e:
        if not trust:
            raise CheckpointError(
                f"checkpoint {path} needs arbitrary code to load, refused for safety ({str(e).splitlines()[0][:120]}); "
                "if you trust its source, pass --trust-checkpoint (trust=True)"
            ) from None
        raise CheckpointError(f"checkpoint {path} is corrupt ({e}); re-save it") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({str(e).splitlines()[0][:160]}); re-save it") from None


def extract_state_dict(obj, path="checkpoint") -> dict:
    """The state_dict inside the layouts people save: bare, or under state_dict/model_state_dict/model."""
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, dict):
        for key in STATE_KEYS:
            inner = obj.get(key)
            if isinstance(inner, dict):
                return inner
            if isinstance(inner, nn.Module):
                return inner.state_dict()
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise CheckpointError(
        f"{path} holds no state_dict: expected a dict of tensors, or one under "
        f"{', '.join(repr(k) for k in STATE_KEYS)}"
    )


def load_checkpoint(path, model: nn.Module, trust: bool = False, strict: bool = True) -> nn.Module:
    """Load the weights saved at ``path`` into ``model`` (in place) and return it."""
    path = Path(path)
    state = extract_state_dict(_read_state(path, trust), path)
    # checkpoints saved from DataParallel / DDP wrap names in "module."
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=strict)
    except RuntimeError as e:
        first = [ln.strip() for ln in str(e).splitlines() if ln.strip()][:3]
        raise CheckpointError(
            f"checkpoint {path} does not fit the architecture {type(model).__name__}: {' '.join(first)[:300]}; "
            "build the model with the architecture and options it was trained with"
        ) from None
    return model


def save_checkpoint(path, model: nn.Module, **meta) -> None:
    """Save ``{"state_dict": ..., "meta": {...}}`` atomically; loadable with weights_only."""
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save({"state_dict": model.state_dict(), "meta": meta}, tmp)


def _natural_key(s: str):
    return [float(t) if re.fullmatch(r"\d+(\.\d+)?", t) else t for t in re.split(r"(\d+(?:\.\d+)?)", s)]


def list_checkpoints(source) -> list[Checkpoint]:
    """Checkpoints of one model: a folder (with conceptevo's ``checkpoints.json`` or plain files) or a list of paths."""
    if isinstance(source, (list, tuple)):
        out = []
        for p in source:
            p = Path(p)
            if not p.exists():
                raise CheckpointError(f"checkpoint {p} does not exist; check the path")
            out.append(Checkpoint(tag=p.stem, path=str(p)))
        return _unique(out)
    folder = Path(source)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist; train first (`conceptevo train`) or fix the path")
    index = folder / INDEX_FILE
    if index.exists():
        cks = [Checkpoint.from_dict(d) for d in _index_rows(index)]
        for c in cks:
            if not Path(c.path).is_absolute():
                c.path = str(folder / c.path)
        return _unique(cks)
    files = sorted((p for p in folder.iterdir() if p.suffix in EXTENSIONS), key=lambda p: _natural_key(p.stem))
    if not files:
        raise CheckpointError(f"no checkpoint files ({', '.join(EXTENSIONS)}) in {folder}")
    return _unique([Checkpoint(tag=p.stem, path=str(p)) for p in files])


def _index_rows(index: Path) -> list[dict]:
    """The rows of a ``checkpoints.json``, each checked (see :func:`conceptevo.records.checkpoint_problem`)."""
    rows = read_json(index)
    rows = rows.get("checkpoints") if isinstance(rows, dict) else None
    if not isinstance(rows, list):
        raise CheckpointError(f"{index} lists no 'checkpoints'; rewrite it, or remove it to list the folder's files")
    for i, row in enumerate(rows):
        problem = checkpoint_problem(row)
        if problem is not None:
            raise CheckpointError(f"{index}: checkpoint {i + 1} {problem}; correct it, or remove the file to list the folder's files")
    return rows


def _unique(cks: list[Checkpoint]) -> list[Checkpoint]:
    seen = set()
    for c in cks:
        check_name("checkpoint tag", c.tag, CheckpointError, fix=f"rename {c.path} (its tag is its file name less the suffix)")
        if c.tag in seen:
            raise CheckpointError(f"two checkpoints share the tag {c.tag!r}; give each a distinct file name")
        seen.add(c.tag)
    return cks


def write_index(folder, checkpoints: list[Checkpoint], **info) -> None:
    """Record a model's checkpoints (paths relative to ``folder``) in ``checkpoints.json``."""
    folder = Path(folder)
    rows = []
    for c in checkpoints:
        d = c.to_dict()
        try:
            d["path"] = str(Path(c.path).relative_to(folder))
        except ValueError:
            pass
        rows.append(d)
    write_json(folder / INDEX_FILE, {"checkpoints": rows, **info})


def checkpoint_hash(path) -> str:
    return file_sha256(path)[:16]
