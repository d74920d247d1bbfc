"""Loading and saving checkpoints, safely.

All loading goes through :func:`load_checkpoint`, which uses
``torch.load(weights_only=True)``: a checkpoint that would need arbitrary code
to unpickle is refused unless the caller opts in with ``trust=True``
(``--trust-checkpoint`` on the command line). ``.safetensors`` files are read
with the safetensors package when it is installed (no pickle, so they never
need ``trust``).

A checkpoint can also be a folder as Hugging Face's ``save_pretrained`` writes
it (``config.json`` with ``model.safetensors`` or ``pytorch_model.bin``, or
their shards listed in ``model.safetensors.index.json`` /
``pytorch_model.bin.index.json``), and a folder of such folders (one per
training step, ``step0``, ``step512``, ... as published training runs keep
them) is one model's checkpoints, ordered by the step in their names. The
model such a folder describes is built by ``arch = "hf:FOLDER"`` (see
:mod:`conceptevo.models.hf`).

The weights are found in the layouts people save: a bare state_dict, the
PyTorch tutorial's dict (``model_state_dict``, as ``.pt`` or ``.tar``),
Lightning's ``.ckpt`` (``state_dict``, keys under the LightningModule's
attribute, ``model.conv1.weight``), DataParallel's ``module.`` prefix; a
prefix that makes the keys fit the architecture is stripped (and logged).
:func:`validate_checkpoints` checks every checkpoint of a model before a
study's heavy passes.
"""
from __future__ import annotations

import hashlib
import inspect
import logging
import pickle
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..io import atomic_path, file_sha256, read_json, write_json
from ..offline import import_transformers
from ..records import check_name, checkpoint_problem

log = logging.getLogger(__name__)

STATE_KEYS = ("state_dict", "model_state_dict", "model_state", "model", "net", "network")
INDEX_FILE = "checkpoints.json"
# ".tar": the PyTorch tutorial saves its checkpoint dict as "checkpoint.pth.tar"
EXTENSIONS = (".pt", ".pth", ".ckpt", ".bin", ".tar", ".safetensors")
# a model folder as Hugging Face's save_pretrained writes it (conceptevo's own LM checkpoints too)
CONFIG_FILE = "config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


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


def is_model_folder(path) -> bool:
    """True for a folder that holds one saved model: a ``config.json``, weights or a shard index (``save_pretrained``)."""
    path = Path(path)
    return path.is_dir() and any((path / n).is_file() for n in (CONFIG_FILE, *WEIGHT_FILES, *SHARD_INDEXES))


def model_folder_files(folder) -> list[Path]:
    """The files of a model folder that make up the model (config, weights, index, shards), in a fixed order."""
    folder = Path(folder)
    out = [folder / n for n in (CONFIG_FILE, *WEIGHT_FILES) if (folder / n).is_file()]
    for n in SHARD_INDEXES:
        if (folder / n).is_file():
            out.append(folder / n)
            out += [folder / s for s in sorted(set(_shard_map(folder / n).values()))]
    return out


def _shard_map(index: Path) -> dict:
    """The ``weight_map`` (parameter name -> shard file) of a shard index."""
    try:
        d = read_json(index)
    except Exception as e:
        raise CheckpointError(f"shard index {index} cannot be read ({e}); re-save the model") from None
    wm = d.get("weight_map") if isinstance(d, dict) else None
    if not isinstance(wm, dict) or not wm or not all(isinstance(v, str) for v in wm.values()):
        raise CheckpointError(f"shard index {index} has no 'weight_map' of parameter names to shard files; re-save the model")
    for shard in set(wm.values()):
        if Path(shard).name != shard or shard.startswith("."):
            raise CheckpointError(f"shard index {index} names the shard {shard!r}, not a file in its folder; re-save the model")
    return wm


def _present_shards(index: Path, weight_map: dict) -> list[str]:
    """The shard files an index names, sorted; a CheckpointError naming those missing from its folder."""
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not (index.parent / s).is_file()]
    if missing:
        raise CheckpointError(
            f"the shard index {index} names {len(missing)} shard file(s) missing from {index.parent} "
            f"({_examples(missing)}; {len(shards)} shard(s) in all): the copy is incomplete; copy the missing shards in")
    return shards


def _read_folder(folder: Path, trust: bool) -> dict:
    """The state_dict saved in a model folder: one weights file, or the shards its index names (merged)."""
    for name in SHARD_INDEXES:
        index = folder / name
        if not index.is_file():
            continue
        wm = _shard_map(index)
        shards = _present_shards(index, wm)
        state: dict = {}
        for shard in shards:
            part = extract_state_dict(_read_state(folder / shard, trust), folder / shard)
            state.update(part)
        lost = [k for k in wm if k not in state]
        if lost:
            raise CheckpointError(f"the shards of {folder} lack {len(lost)} weight(s) their index {name} names "
                                  f"({_examples(lost)}): a shard is truncated or from another save; re-save the model")
        return state
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return _read_state(folder / name, trust)
    what = "a config.json but" if (folder / CONFIG_FILE).is_file() else ""
    raise CheckpointError(
        f"model folder {folder} has {what} no model weights: expected {' or '.join(WEIGHT_FILES)}, or shards with "
        f"{' or '.join(SHARD_INDEXES)}; copy the weight files in (a download that took only the config leaves them out)"
    )


def _read_state(path: Path, trust: bool):
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path")
    if path.is_dir():
        if not is_model_folder(path):
            raise CheckpointError(
                f"checkpoint {path} is a folder without a saved model ({CONFIG_FILE} with {' or '.join(WEIGHT_FILES)}, "
                "as save_pretrained writes); give a checkpoint file or a model folder"
            )
        return _read_folder(path, trust)
    if path.suffix.lower() == ".safetensors":
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


def _is_state(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def extract_state_dict(obj, path="checkpoint", key: str | None = None) -> dict:
    """The state_dict inside the layouts people save.

    Bare (a dict of tensors), or under one of ``STATE_KEYS`` (``state_dict``:
    Lightning and conceptevo; ``model_state_dict``: the PyTorch tutorial's
    dict; ...). ``key`` names the entry explicitly (``"a/b"`` for a nested one).
    """
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if key is not None:
        inner = obj
        for part in str(key).split("/"):
            if not isinstance(inner, dict) or part not in inner:
                have = ", ".join(repr(k) for k in list(inner)[:8]) if isinstance(inner, dict) else type(inner).__name__
                raise CheckpointError(f"{path} has no entry {key!r} (key option); its entries are: {have}")
            inner = inner[part]
        if isinstance(inner, nn.Module):
            return inner.state_dict()
        if _is_state(inner):
            return inner
        raise CheckpointError(f"entry {key!r} of {path} is not a dict of tensors (a state_dict); give the entry that holds the weights")
    if isinstance(obj, dict):
        for k in STATE_KEYS:
            inner = obj.get(k)
            if _is_state(inner):
                return inner
            if isinstance(inner, nn.Module):
                return inner.state_dict()
        if _is_state(obj):
            return obj
        entries = ", ".join(repr(k) for k in list(obj)[:8]) + (", ..." if len(obj) > 8 else "")
        raise CheckpointError(
            f"{path} holds no state_dict under {', '.join(repr(k) for k in STATE_KEYS)}; its entries are {entries}: "
            "name the one that holds the weights with key = '...' in [[models]] (key= in the API)"
        )
    raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state_dict (a dict of tensors); save model.state_dict()")


_SAID: set = set()


def _say_once(what, message: str, *args) -> None:
    """Log ``message`` at INFO the first time for ``what``, at DEBUG after (a folder of checkpoints says it once)."""
    level = logging.DEBUG if what in _SAID else logging.INFO
    _SAID.add(what)
    log.log(level, message, *args)


def _optional(name: str) -> bool:
    # BatchNorm fills in a missing counter itself (checkpoints from before torch 0.4.1 have none)
    return name.endswith("num_batches_tracked")


def _prefix_candidates(keys, wanted: set) -> dict[str, int]:
    """Prefixes (``"model."``) whose removal turns checkpoint keys into the model's, with how many keys each turns."""
    counts: dict[str, int] = {}
    for k in keys:
        parts = k.split(".")
        for i in range(1, len(parts)):
            if ".".join(parts[i:]) in wanted:
                p = ".".join(parts[:i]) + "."
                counts[p] = counts.get(p, 0) + 1
    return counts


def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _examples(names, n: int = 3) -> str:
    names = list(names)
    shown = ", ".join(names[:n])
    return shown + (f" (+{len(names) - n} more)" if len(names) > n else "")


def fit_state_dict(state: dict, model: nn.Module, prefix: str | None = None, path="checkpoint") -> tuple[dict, str]:
    """``state`` with its keys made to fit ``model``'s, and the key prefix stripped for that ("" for none).

    A LightningModule saves its network's weights under the attribute that
    holds it (``model.conv1.weight`` for ``self.model``), DataParallel under
    ``module.``. Without ``prefix``, a prefix whose removal gives every one of
    the model's keys is found and stripped (and said, once, in the log);
    entries outside it (a loss's buffers, a second copy of the network...) are
    left out. Several such prefixes are an error asking for ``prefix``. When
    no prefix gives every key, the one that gives the most (more than no
    prefix does, and at least half of them or a prefix of at least half the
    checkpoint's keys) is stripped, so that a mismatch is reported on the
    network's own key names.
    """
    wanted = set(model.state_dict())
    need = {k for k in wanted if not _optional(k)}
    if prefix is not None:
        prefix = str(prefix)
        if prefix and not prefix.endswith("."):
            prefix += "."
        picked = _strip(state, prefix)
        if not picked:
            firsts = sorted({k.split(".")[0] + "." for k in state})
            raise CheckpointError(f"no key of {path} starts with the prefix {prefix!r}; its keys start with "
                                  f"{_examples(map(repr, firsts), 5)}: set prefix to one of those, or leave it out")
        if len(picked) < len(state):
            _say_once(("prefix", prefix), "checkpoint %s: took the %d entries under %r, left out %d others",
                      path, len(picked), prefix, len(state) - len(picked))
        return picked, prefix
    if need <= set(state):
        return state, ""
    counts = _prefix_candidates(state, wanted)
    fits = sorted(p for p in counts if need <= set(_strip(state, p)))
    if len(fits) > 1:
        raise CheckpointError(
            f"the keys of {path} fit the architecture {type(model).__name__} under several prefixes ({', '.join(map(repr, fits))}); "
            f"say which with prefix = {fits[0]!r} in [[models]] (prefix= in the API)"
        )
    if fits:
        p = fits[0]
        stripped = _strip(state, p)
        left = len(state) - len(stripped)
        _say_once(("prefix", p), "checkpoint %s: the weights are saved under the key prefix %r (a LightningModule attribute, "
                  "or DataParallel's 'module.'); stripped it%s", path, p, f", left out {left} entries outside it" if left else "")
        return stripped, p
    direct = len(wanted & set(state))
    best = max(sorted(counts), key=counts.get, default=None)
    if best is not None and counts[best] > direct:
        under = sum(k.startswith(best) for k in state)
        if 2 * counts[best] >= len(wanted) or 2 * under >= len(state):
            return _strip(state, best), best
    return state, ""


def _likely_cause(state: dict, model: nn.Module, missing, unexpected, shapes, stripped: str) -> str:
    wanted = model.state_dict()
    firsts = {k.split(".")[0] for k in state}
    if not stripped and len(firsts) == 1 and len(state) > 1 and not any(k.startswith(next(iter(firsts)) + ".") for k in wanted):
        p = next(iter(firsts)) + "."
        return (f"every key of the checkpoint starts with {p!r} and none of the model's does: a wrapper's attribute "
                f"(set prefix = {p!r}) or another architecture (check arch)")
    if shapes and not missing and not unexpected:
        a, b = shapes[0][1], shapes[0][2]
        last = [n for n in wanted if n.endswith("weight") and wanted[n].dim() == 2][-1:]
        first = [n for n in wanted if n.endswith("weight") and wanted[n].dim() >= 2][:1]
        names = [s[0] for s in shapes]
        head = last + [last[0][:-len("weight")] + "bias"] if last else []
        if last and names in (last, head) and a[1:] == b[1:]:
            return f"a different number of classes (checkpoint {a[0]}, model {b[0]}): give the classes the model was trained on"
        if names == first and a[0] == b[0] and len(a) > 1:
            return (f"a different number of input channels (checkpoint {a[1]}, model {b[1]}): the images must have "
                    f"{a[1]} channel(s) (the dataset's channels option)")
        return "the same layers with other sizes: build the model with the options it was trained with (width, ...) in options"
    if unexpected and not missing:
        return "the checkpoint has layers the architecture lacks (a deeper or different network): check arch and its options"
    if missing and not unexpected:
        return "the architecture has layers the checkpoint lacks (a shallower or different network): check arch and its options"
    return "a different architecture: check arch and its options"


def fill_tied(state: dict, model: nn.Module) -> dict:
    """``state`` with the model's tied weights filled in from the copy that was saved.

    A model whose parameters share one tensor (a language model's output layer
    tied to its token embedding) is saved with the tensor once
    (``save_pretrained``, safetensors): a missing key whose tensor is shared
    with a saved key takes that key's value.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    if not missing:
        return state
    by_ptr: dict = {}
    for k, v in own.items():
        if isinstance(v, torch.Tensor) and v.numel():
            by_ptr.setdefault((v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)), []).append(k)
    out = dict(state)
    for k in missing:
        v = own[k]
        if not isinstance(v, torch.Tensor) or not v.numel():
            continue
        twins = [t for t in by_ptr.get((v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)), []) if t in state]
        if twins:
            out[k] = state[twins[0]]
            log.debug("%s is tied to %s: took its saved value", k, twins[0])
    return out


def check_fit(state: dict, model: nn.Module, path="checkpoint", stripped: str = "") -> None:
    """A one-line CheckpointError unless ``state`` has exactly ``model``'s keys and shapes.

    It shows a few of the missing and of the unexpected keys and names the
    likely cause (a prefix, other layer sizes, another architecture).
    """
    wanted = model.state_dict()
    missing = sorted(k for k in wanted if k not in state and not _optional(k))
    unexpected = sorted(k for k in state if k not in wanted)
    shapes = [(k, list(state[k].shape), list(wanted[k].shape)) for k in wanted
              if k in state and isinstance(state[k], torch.Tensor) and tuple(state[k].shape) != tuple(wanted[k].shape)]
    if not (missing or unexpected or shapes):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} of the model's keys missing ({_examples(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({_examples(unexpected)})")
    if shapes:
        parts.append(f"{len(shapes)} of other shape ({_examples(f'{k} {a} vs model {b}' for k, a, b in shapes)})")
    after = f" (after stripping the key prefix {stripped!r})" if stripped else ""
    raise CheckpointError(
        f"checkpoint {path} does not fit the architecture {type(model).__name__}{after}: {'; '.join(parts)}; "
        f"likely cause: {_likely_cause(state, model, missing, unexpected, shapes, stripped)}"
    )


def load_checkpoint(path, model: nn.Module, trust: bool = False, strict: bool = True, prefix: str | None = None,
                    key: str | None = None) -> nn.Module:
    """Load the weights saved at ``path`` into ``model`` (in place) and return it.

    ``key``: the checkpoint entry that holds the state_dict (found by itself
    for the usual layouts). ``prefix``: the key prefix to strip
    (``"model."``; found by itself when one prefix makes the keys fit).
    """
    if not str(path):
        raise CheckpointError("this checkpoint has no file: its workspace was built from results in memory "
                              "(Workspace.from_results); pass the loaded models to the Python API instead")
    path = Path(path)
    if path.is_dir() and _is_transformers(model):
        return _load_transformers_folder(path, model, trust, strict)
    state = extract_state_dict(_read_state(path, trust), path, key=key)
    state, stripped = fit_state_dict(state, model, prefix=prefix, path=path)
    state = fill_tied(state, model)
    if strict:
        check_fit(state, model, path, stripped)
    try:
        model.load_state_dict(state, strict=strict)
    except RuntimeError as e:
        first = [ln.strip() for ln in str(e).splitlines() if ln.strip()][:3]
        raise CheckpointError(
            f"checkpoint {path} does not fit the architecture {type(model).__name__}: {' '.join(first)[:300]}; "
            "build the model with the architecture and options it was trained with"
        ) from None
    return model


def _is_transformers(model: nn.Module) -> bool:
    tf = sys.modules.get("transformers")
    return tf is not None and isinstance(model, getattr(tf, "PreTrainedModel", ()))


def _check_folder_files(folder: Path) -> None:
    """The clear errors of :func:`_read_folder` (no weights, a missing shard) without reading the weights."""
    for name in SHARD_INDEXES:
        if (folder / name).is_file():
            _present_shards(folder / name, _shard_map(folder / name))
            return
    if not any((folder / n).is_file() for n in WEIGHT_FILES):
        _read_folder(folder, trust=False)  # raises the no-weights error


def _load_transformers_folder(folder: Path, model: nn.Module, trust: bool, strict: bool) -> nn.Module:
    """Load a ``save_pretrained`` folder into a ``transformers`` model through ``transformers`` itself.

    ``transformers`` renames weights between its saved files and its modules
    (version 5 saves ``vit.encoder.layer.0.intermediate.dense`` for the
    module ``vit.layers.0.mlp.fc1``), so the folder is read with
    ``from_pretrained`` (offline, ``weights_only`` unless ``trust``), which
    applies its own renaming; the weights it read must be complete and then
    fit ``model`` exactly.
    """
    if not is_model_folder(folder):
        _read_state(folder, trust)  # raises: not a model folder
    _check_folder_files(folder)
    tf = import_transformers(f"checkpoint {folder}")
    cls = type(model).__mro__[1] if getattr(type(model), "_conceptevo_logits", False) else type(model)
    was = tf.utils.logging.is_progress_bar_enabled()
    tf.utils.logging.disable_progress_bar()
    try:
        safe = {"weights_only": not trust} if "weights_only" in inspect.signature(cls.from_pretrained).parameters else {}
        loaded, info = cls.from_pretrained(str(folder), local_files_only=True, output_loading_info=True, **safe)
    except CheckpointError:
        raise
    except Exception as e:
        first = str(e).splitlines()[0][:240] if str(e) else type(e).__name__
        raise CheckpointError(f"transformers cannot load the model folder {folder} into {cls.__name__} ({first}); "
                              "check that the folder is a complete save_pretrained output of this architecture") from None
    finally:
        if was:
            tf.utils.logging.enable_progress_bar()
    bad = {k: sorted(map(str, v)) for k, v in info.items() if k != "error_msgs" and v}
    if bad or info.get("error_msgs"):
        parts = [f"{len(v)} {k.replace('_', ' ')} ({_examples(v)})" for k, v in bad.items()]
        parts += [str(m).splitlines()[0][:160] for m in info.get("error_msgs", [])[:2]]
        raise CheckpointError(f"checkpoint {folder} does not fit the architecture {cls.__name__} (as transformers reads it): "
                              f"{'; '.join(parts)}; likely cause: a different architecture or config: check arch")
    state = loaded.state_dict()
    if strict:
        check_fit(state, model, folder)
    model.load_state_dict(state, strict=strict)
    return model


def validate_checkpoints(paths, build, trust: bool = False, prefix: str | None = None, key: str | None = None,
                         name: str = "model") -> None:
    """Check that every checkpoint is readable and fits the architecture, before any heavy pass.

    ``build`` makes the model (called once; a factory error shows here); each
    checkpoint is loaded into it as :func:`load_checkpoint` would. Raises one
    CheckpointError naming every checkpoint that fails, with the first one's
    reason.
    """
    paths = [str(p) for p in paths]
    model = build()
    failed: list[tuple[str, CheckpointError]] = []
    for p in paths:
        try:
            load_checkpoint(p, model, trust=trust, prefix=prefix, key=key)
        except CheckpointError as e:
            failed.append((p, e))
    if failed:
        others = f"; the others that fail: {_examples([Path(p).name for p, _ in failed[1:]], 5)}" if len(failed) > 1 else ""
        raise CheckpointError(f"{len(failed)} of {len(paths)} checkpoints of {name} cannot be used (checked before any "
                              f"heavy pass): {failed[0][1]}{others}")
    log.info("%s: %d checkpoint(s) read, each fits %s", name, len(paths), type(model).__name__)


def save_checkpoint(path, model: nn.Module, **meta) -> None:
    """Save ``{"state_dict": ..., "meta": {...}}`` atomically; loadable with weights_only."""
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save({"state_dict": model.state_dict(), "meta": meta}, tmp)


def _natural_key(s: str):
    return [float(t) if re.fullmatch(r"\d+(\.\d+)?", t) else t for t in re.split(r"(\d+(?:\.\d+)?)", s)]


def checkpoint_stem(path) -> str:
    """The file name without its checkpoint suffixes: ``checkpoint.pth.tar`` -> ``checkpoint``."""
    name = Path(path).name
    for _ in range(2):
        stem, suffix = name.rsplit(".", 1) if "." in name else (name, "")
        if "." + suffix.lower() not in EXTENSIONS or not stem:
            break
        name = stem
    return name


_NUM = r"(\d+(?:\.\d+)?)"
_EPOCH = re.compile(r"(?:^|[^a-z0-9])(?:epoch|ep|e)[=_\- ]?" + _NUM + r"(?![\d.])", re.IGNORECASE)
_STEP = re.compile(r"(?:^|[^a-z0-9])(?:global_step|step|steps|iteration|iter|it|s)[=_\- ]?" + _NUM + r"(?![\d.])", re.IGNORECASE)


def parse_position(stem: str) -> tuple[float | None, int | None]:
    """The epoch and step a checkpoint's file name states, each None where it does not.

    ``epoch=0-step=10`` (Lightning) -> (0, 10); ``model_e1`` -> (1, None);
    ``e0.25`` (conceptevo) -> (0.25, None); ``s300``, ``iter_300`` -> (None,
    300). A bare number (``ckpt_000100``) names no unit: (None, None), and the
    number still orders the files. Values are as the name gives them
    (Lightning's ``epoch=0`` is its first epoch, counted from 0).
    """
    e, s = _EPOCH.search(stem), _STEP.search(stem)
    epoch = float(e.group(1)) if e else None
    step = int(float(s.group(1))) if s and float(s.group(1)).is_integer() else None
    if epoch is not None and epoch.is_integer():
        epoch = int(epoch)
    return epoch, step


def _order(cks: list[Checkpoint]) -> list[Checkpoint]:
    """Files in training order: by step where every file names one, else by epoch (then step), else by name.

    A file that names neither (Lightning's ``last``, ``model_best``) goes after
    the others, with a warning: its place in training is not known. Without
    any epoch or step in the names, the order is by name, numbers compared as
    numbers (``ckpt_000100`` before ``ckpt_000200``).
    """
    known = [c for c in cks if c.epoch is not None or c.step is not None]
    unknown = sorted((c for c in cks if c.epoch is None and c.step is None), key=lambda c: _natural_key(c.tag))
    if not known:
        return unknown
    unknown = [c for c in unknown if not _copy_of(c, known)]
    if all(c.step is not None for c in known):
        known.sort(key=lambda c: (c.step, _natural_key(c.tag)))
    elif all(c.epoch is not None for c in known):
        known.sort(key=lambda c: (c.epoch, -1 if c.step is None else c.step, _natural_key(c.tag)))
    else:
        known.sort(key=lambda c: _natural_key(c.tag))
    if unknown:
        log.warning("checkpoint(s) %s name no epoch or step: placed after the others; list the files in order in "
                    "[[models]] checkpoints to place them yourself", ", ".join(c.tag for c in unknown))
    return known + unknown


def _copy_of(c: Checkpoint, others: list[Checkpoint]) -> bool:
    """True (and said) when ``c``'s file has the same bytes as one of ``others`` (Lightning's ``last.ckpt``)."""
    size = _size(c.path)
    for o in others:
        if _size(o.path) == size and checkpoint_hash(o.path) == checkpoint_hash(c.path):
            log.info("checkpoint %s is a copy of %s; left out", Path(c.path).name, Path(o.path).name)
            return True
    return False


def _size(path) -> int:
    path = Path(path)
    return sum(f.stat().st_size for f in model_folder_files(path)) if path.is_dir() else path.stat().st_size


def list_checkpoints(source) -> list[Checkpoint]:
    """Checkpoints of one model: a folder (with conceptevo's ``checkpoints.json`` or plain files), one file, or a list of paths.

    A list keeps its order. A folder without an index is ordered by the epoch
    or step in the file names (:func:`parse_position`), else by name with
    numbers compared as numbers; each file's tag is its name without the
    suffixes, and its epoch and step are the ones its name states.

    Model folders (``save_pretrained``: ``config.json`` + weights) count as
    checkpoint files: a model folder given as the source is one checkpoint,
    and a folder of model folders (``step0``, ``step1``, ..., ``step143000``)
    is one model's run, ordered by the step in the folder names (tag
    ``step512``, step 512).
    """
    if isinstance(source, (list, tuple)):
        out = []
        for p in source:
            p = Path(p)
            if not p.exists():
                raise CheckpointError(f"checkpoint {p} does not exist; check the path")
            out.append(_from_file(p))
        return _unique(out)
    folder = Path(source)
    if folder.is_file() or (not folder.exists() and folder.suffix.lower() in EXTENSIONS):
        return list_checkpoints([folder])  # one checkpoint file
    if is_model_folder(folder) and not (folder / INDEX_FILE).exists():
        steps = [p for p in _subfolders(folder) if is_model_folder(p)]
        if any((folder / n).is_file() for n in (*WEIGHT_FILES, *SHARD_INDEXES)) or not steps:
            if steps:
                log.warning("%s holds a saved model and %d model folder(s) under it (%s): taken as one checkpoint, the "
                            "folder's own model; to study the ones under it, list them in [[models]] checkpoints",
                            folder, len(steps), _examples(sorted(p.name for p in steps)))
            return list_checkpoints([folder])  # one saved model (save_pretrained)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist; train first (`conceptevo train`) or fix the path")
    index = folder / INDEX_FILE
    if index.exists():
        cks = [Checkpoint.from_dict(d) for d in _index_rows(index)]
        for c in cks:
            if not Path(c.path).is_absolute():
                c.path = str(folder / c.path)
        return _unique(cks)
    files = [p for p in folder.iterdir() if p.suffix.lower() in EXTENSIONS and not p.name.startswith(".") and p.is_file()]
    files += [p for p in _subfolders(folder) if is_model_folder(p)]
    if not files:
        raise CheckpointError(f"no checkpoint files ({', '.join(EXTENSIONS)}) or model folders ({CONFIG_FILE} with "
                              f"{' or '.join(WEIGHT_FILES)}) in {folder}")
    return _unique(_order([_from_file(p) for p in files]))


def _subfolders(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]


def _from_file(p: Path) -> Checkpoint:
    tag = p.name if p.is_dir() else checkpoint_stem(p)
    epoch, step = parse_position(tag)
    return Checkpoint(tag=tag, path=str(p), epoch=epoch, step=step)


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
    """A checkpoint's content hash (16 hex digits); for a model folder, over its config, weights, index and shards."""
    path = Path(path)
    if not path.is_dir():
        return file_sha256(path)[:16]
    h = hashlib.sha256()
    for f in model_folder_files(path):
        h.update(f"{f.name}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()[:16]
