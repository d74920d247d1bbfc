"""Study configuration: small frozen dataclasses per stage, read from TOML.

Unknown or mistyped keys are errors that name the key and suggest the nearest
valid one; a value of the wrong type (a string for a number, a number for a
table...) is an error naming the key and the type it needs.
"""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConceptEvoError, check_positive, suggest
from .units import check_channel_axis
from .records import check_name


#: [data] keys of text studies (kind = "text")
TEXT_KEYS = ("corpus", "tokenizer", "context", "stride")


@dataclass(frozen=True)
class DataConfig:
    kind: str = "fashion-mnist"     # fashion-mnist | idx | folder | synthetic | text
    path: str | None = None         # folder for idx / folder data (fashion-mnist: optional); text: files or a folder
    pool: int | None = 5000         # stimulus image pool: a seeded, class-balanced subset; None = all
    seed: int = 0
    options: dict = field(default_factory=dict)
    # preprocessing, as the model was trained (see conceptevo.data.transforms); pictures show the images before mean/std
    resize: int | list | None = None    # N: shorter side -> N; [H, W]: exactly
    crop: int | list | None = None      # centre crop: N or [H, W]
    mean: float | list | None = None    # per channel, in [0, 1] units
    std: float | list | None = None
    transform: str | None = None        # "package.module:name" or "path/to/file.py:name": a callable on [C, H, W] tensors
    classes: list | None = None         # class names in the model's output order (default: the data's own order)
    holdout: float | None = None        # hold out this seeded fraction of the training images as the test split
    # text (kind = "text"): windows of a token stream are the "images"
    corpus: str | None = None           # "shakespeare" or "generated" instead of a path
    tokenizer: str | None = None        # "char" (default), "bpe", a saved tokenizer JSON file or a Hugging Face folder
    context: int | None = None          # tokens per window (default 64)
    stride: int | None = None           # tokens between window starts (default: context)

    def validate(self):
        if self.pool is not None:
            check_positive("data.pool", self.pool, integer=True)
        text_keys = [k for k in TEXT_KEYS if getattr(self, k) is not None]
        if self.kind == "text":
            for k in ("context", "stride"):
                if getattr(self, k) is not None:
                    check_positive(f"data.{k}", getattr(self, k), integer=True)
            if (self.corpus is None) == (self.path is None):
                raise ConceptEvoError('[data] kind = "text" needs exactly one of path (text files or a folder) '
                                      'and corpus ("shakespeare" or "generated")')
            if self.corpus is not None and self.corpus not in ("shakespeare", "generated"):
                raise ConceptEvoError(f"[data] corpus = {self.corpus!r}: use 'shakespeare' or 'generated', or give your "
                                      "own text as path")
        elif text_keys:
            raise ConceptEvoError(f"[data] {', '.join(text_keys)} only apply to kind = \"text\" (kind is {self.kind!r})")
        _check_seed("data.seed", self.seed)
        if self.holdout is not None and not 0 < self.holdout < 1:
            raise ConceptEvoError(f"data.holdout must be a fraction between 0 and 1 (e.g. 0.2), got {self.holdout!r}")
        if self.transform is not None and (not self.transform or ":" not in self.transform.strip(":")):
            raise ConceptEvoError(f"data.transform must name a callable as 'package.module:name' or 'path/to/file.py:name', "
                                  f"got {self.transform!r}")
        if self.classes is not None and (not self.classes or not all(isinstance(c, str) and c for c in self.classes)):
            raise ConceptEvoError(f"data.classes must be a list of class names in the model's output order, got {self.classes!r}")
        from .data.transforms import Preprocess
        from .errors import DatasetError

        try:
            Preprocess(resize=self.resize, crop=self.crop, mean=self.mean, std=self.std)
        except DatasetError as e:
            raise ConceptEvoError(f"[data] {e}") from None

    def dataset_options(self) -> dict:
        """The keyword arguments of :func:`conceptevo.data.open_dataset` this config gives."""
        extra = {k: getattr(self, k) for k in ("resize", "crop", "mean", "std", "transform", "classes", *TEXT_KEYS)
                 if getattr(self, k) is not None}
        clash = sorted(set(extra) & set(self.options))
        if clash:
            raise ConceptEvoError(f"[data] gives {', '.join(map(repr, clash))} both as a key and in options; keep one")
        return {**self.options, **extra}


@dataclass(frozen=True)
class ModelConfig:
    name: str
    arch: str                       # built-in name, tv:NAME, or package.module:function
    checkpoints: Any                # a folder, one file, or a list of files
    options: dict = field(default_factory=dict)
    prefix: str | None = None       # key prefix to strip from the checkpoints' keys ("model."); default: found
    key: str | None = None          # the checkpoint entry holding the state_dict ("state_dict"); default: found
    import_path: list | None = None  # folders searched first for package.module:function; default: the config's folder
    allow_chance: bool = False      # run even when its last checkpoint scores at chance (e.g. an untrained baseline)

    def validate(self):
        check_name("model name", self.name)
        if self.import_path is not None and not all(isinstance(f, str) and f for f in self.import_path):
            raise ConceptEvoError(f"model {self.name!r}: import_path must be a list of folders, got {self.import_path!r}")
        cks = self.checkpoints
        if not (isinstance(cks, str) and cks) and not (
                isinstance(cks, (list, tuple)) and cks and all(isinstance(c, str) and c for c in cks)):
            raise ConceptEvoError(f"model {self.name!r}: checkpoints must be a folder, a file or a non-empty list of files, got {cks!r}")

    def loading(self) -> dict:
        """How to build the model and read its checkpoints beyond arch and options (recorded in the workspace)."""
        return {k: v for k, v in (("prefix", self.prefix), ("key", self.key), ("import_path", self.import_path)) if v is not None}


@dataclass(frozen=True)
class BaseConfig:
    model: str | None = None        # default: the first model
    checkpoint: str = "last"        # a checkpoint tag, or "last"


@dataclass(frozen=True)
class StimuliConfig:
    k: int = 10
    layers: list | None = None      # module paths or globs; None = each model's default units (every Conv2d; a ViT: its MLP units)
    batch_size: int = 256
    device: str = "cpu"
    channel_axis: dict | int | None = None  # {"layer or glob" = 1 or -1}: where the channels sit, when the rule guesses wrong

    def validate(self):
        check_channel_axis(self.channel_axis, "stimuli.channel_axis")
        check_positive("stimuli.k", self.k, integer=True)
        check_positive("stimuli.batch_size", self.batch_size, integer=True)
        if self.layers is not None and not all(isinstance(x, str) and x for x in self.layers):
            raise ConceptEvoError(f"stimuli.layers must be a list of layer names or globs, got {self.layers!r}")


@dataclass(frozen=True)
class EmbeddingConfig:
    """The base neuron embedding (METHOD §4). These are also :func:`conceptevo.embedding.embed_neurons`' defaults.

    The defaults were chosen from ``bench/bench_fidelity.py`` (docs/fidelity.md): a
    learning rate that decays linearly to ~0 over a fixed 1,000 epochs reaches the
    fidelity plateau (5-NN concept purity on a planted-concept set) in seconds at
    VGG16 scale; no early-stopping rule tried did better than that fixed schedule.
    """

    dim: int = 30
    negatives: int = 3
    lr: float = 0.05
    lr_schedule: str = "linear"     # linear: lr decays to ~0 over `epochs`; constant: the paper's fixed lr
    epochs: int = 1000              # epochs to run (the most, when early_stop is on)
    early_stop: bool = False        # stop when nearest-neighbour sets stop settling (see embed_neurons)
    tol: float = 0.01               # early stop: the least fall of the share of changed neighbours ...
    patience: int = 3               # ... over this many checks
    check_every: int = 50           # epochs between two checks of the neighbour sets
    seed: int = 0

    def validate(self):
        check_positive("embedding.dim", self.dim, integer=True)
        check_positive("embedding.lr", self.lr)
        check_positive("embedding.epochs", self.epochs, integer=True)
        check_positive("embedding.patience", self.patience, integer=True)
        check_positive("embedding.check_every", self.check_every, integer=True)
        if isinstance(self.negatives, bool) or not isinstance(self.negatives, int) or self.negatives < 0:
            raise ConceptEvoError(f"embedding.negatives must be a non-negative integer, got {self.negatives!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConceptEvoError(f"embedding.lr_schedule must be one of {', '.join(map(repr, LR_SCHEDULES))}, "
                                  f"got {self.lr_schedule!r}")
        if isinstance(self.tol, bool) or not isinstance(self.tol, (int, float)) or not self.tol >= 0 or self.tol == float("inf"):
            raise ConceptEvoError(f"embedding.tol must be a finite number >= 0, got {self.tol!r}")
        _check_seed("embedding.seed", self.seed)


#: Learning-rate schedules of the neuron embedding.
LR_SCHEDULES = ("linear", "constant")


@dataclass(frozen=True)
class ImagesConfig:
    top_responses: int = 10         # base neurons that place an image outside every base stimulus set

    def validate(self):
        check_positive("images.top_responses", self.top_responses, integer=True)


@dataclass(frozen=True)
class LayoutConfig:
    n_neighbors: int = 15
    min_dist: float = 0.1
    seed: int = 0
    method: str = "umap"            # umap | pca (pca: no compile time, for smoke tests)

    def validate(self):
        check_positive("layout.n_neighbors", self.n_neighbors, integer=True)
        _check_seed("layout.seed", self.seed)
        if self.method not in ("umap", "pca"):
            raise ConceptEvoError(f"layout.method must be 'umap' or 'pca', got {self.method!r}")


@dataclass(frozen=True)
class StudyConfig:
    out: str
    data: DataConfig
    models: list[ModelConfig]
    base: BaseConfig = BaseConfig()
    stimuli: StimuliConfig = StimuliConfig()
    embedding: EmbeddingConfig = EmbeddingConfig()
    images: ImagesConfig = ImagesConfig()
    layout: LayoutConfig = LayoutConfig()

    def validate(self) -> "StudyConfig":
        _check_plain("config", self.to_dict())
        for where, p in [("[study] out", self.out), ("[data] path", self.data.path)] + [
                (f"model {m.name!r} checkpoints", c) for m in self.models
                for c in (m.checkpoints if isinstance(m.checkpoints, list) else [m.checkpoints])]:
            if isinstance(p, str) and "\x00" in p:
                raise ConceptEvoError(f"{where} {p!r} contains a NUL character, which no path can hold")
        for part in (self.data, self.stimuli, self.embedding, self.images, self.layout, *self.models):
            if hasattr(part, "validate"):
                part.validate()
        if not self.models:
            raise ConceptEvoError("the config names no model; add a [[models]] table with name, arch and checkpoints")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ConceptEvoError(f"model names must be unique, got {names}")
        if self.base.model is not None and self.base.model not in names:
            raise ConceptEvoError(f"base model {self.base.model!r} is not in the study.{suggest(self.base.model, names)} Models: {', '.join(names)}")
        return self

    @property
    def base_model(self) -> str:
        return self.base.model or self.models[0].name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, root: Path | None = None) -> "StudyConfig":
        d = dict(d)
        _check_keys("config", d, {f.name for f in dataclasses.fields(cls)} | {"study"})
        study = d.pop("study", {}) or {}
        _check_keys("[study]", study, {"out"})
        out = d.pop("out", None) or study.get("out")
        if not out:
            raise ConceptEvoError("the config names no output folder; add [study] out = \"my-study\"")
        if not isinstance(out, str):
            raise ConceptEvoError(f"[study] out must be a folder name (a string), got {out!r}")
        models_raw = d.pop("models", None)
        if not models_raw:
            raise ConceptEvoError("the config names no model; add a [[models]] table with name, arch and checkpoints")
        if not isinstance(models_raw, list):
            raise ConceptEvoError("models must be an array of tables: write each model as a [[models]] table")
        models = [_build(ModelConfig, m, "[[models]]") for m in models_raw]
        data = _build(DataConfig, d.pop("data", {}), "[data]")
        sections = {name: _build(typ, d.pop(name, {}) or {}, f"[{name}]") for name, typ in
                    (("base", BaseConfig), ("stimuli", StimuliConfig), ("embedding", EmbeddingConfig),
                     ("images", ImagesConfig), ("layout", LayoutConfig))}
        config = cls(out=out, data=data, models=models, **sections).validate()
        if root is None:
            return config
        # paths relative to the config file (only once every value is known to be well-typed)
        out = str((root / out).resolve()) if not Path(out).is_absolute() else out
        if data.path and not Path(data.path).is_absolute():
            data = dataclasses.replace(data, path=str((root / data.path).resolve()))
        if data.transform and data.transform.rpartition(":")[0].endswith(".py") and not Path(data.transform).is_absolute():
            data = dataclasses.replace(data, transform=str((root / data.transform).resolve()))
        models = [dataclasses.replace(m, checkpoints=_resolve_paths(m.checkpoints, root),
                                      import_path=_import_path(m, root)) for m in models]
        return dataclasses.replace(config, out=out, data=data, models=models)


def _import_path(m: ModelConfig, root: Path) -> list | None:
    """A model factory (package.module:function) is imported from the config file's folder first, as a script would be."""
    if m.import_path is not None:
        return _resolve_paths(list(m.import_path), root)
    own = ":" in m.arch and not m.arch.startswith(("tv:", "torchvision:"))
    return [str(root)] if own else None


def _resolve_paths(value, root: Path):
    if isinstance(value, str):
        return value if Path(value).is_absolute() else str((root / value).resolve())
    return [_resolve_paths(v, root) for v in value]


def _check_keys(where: str, d: dict, valid: set[str]) -> None:
    if not isinstance(d, dict):
        raise ConceptEvoError(f"{where} must be a table of keys, got {type(d).__name__}")
    for key in d:
        if key not in valid:
            raise ConceptEvoError(f"unknown key {key!r} in {where}.{suggest(key, valid)} Valid keys: {', '.join(sorted(valid))}")


def _check_plain(where: str, value) -> None:
    """The config is saved as JSON in the workspace: only strings, numbers, booleans, lists and tables."""
    if isinstance(value, dict):
        for k, v in value.items():
            _check_plain(f"{where}.{k}", v)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(f"{where}[{i}]", v)
    elif value is not None and not isinstance(value, (str, int, float, bool)):
        raise ConceptEvoError(f"{where} is a {type(value).__name__} ({value!r}); config values must be strings, "
                              "numbers, booleans, lists or tables (write dates and times as strings)")


def _check_seed(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConceptEvoError(f"{name} must be a non-negative integer, got {value!r}")


#: Annotation names used by the config dataclasses -> the TOML value types they accept.
_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "dict": (dict,), "list": (list,),
          "None": (type(None),), "Any": (object,)}
_TYPE_WORDS = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
               "dict": "a table", "list": "a list", "None": "omitted"}


def _check_type(where: str, key: str, value, annotation) -> None:
    """Raise a ConceptEvoError unless ``value`` fits ``annotation`` (e.g. ``"int | None"``)."""
    names = [a.strip() for a in str(annotation).split("|")]
    for name in names:
        types = _TYPES.get(name, (object,))
        if isinstance(value, bool) and bool not in types and object not in types:
            continue  # TOML true/false is not a number
        if isinstance(value, types):
            return
    wanted = " or ".join(_TYPE_WORDS.get(n, n) for n in names if n != "None")
    if names == ["int"] and isinstance(value, float):
        wanted = "an integer"
    elif "int" in names or "float" in names:
        wanted = "a number" + (" (an integer)" if "float" not in names else "")
    raise ConceptEvoError(f"{where} {key} must be {wanted}, got {value!r}")


def _build(cls, d: dict, where: str):
    _check_keys(where, d, {f.name for f in dataclasses.fields(cls)})
    hints = {f.name: f for f in dataclasses.fields(cls)}
    missing = [n for n, f in hints.items() if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and n not in d]
    if missing:
        raise ConceptEvoError(f"{where} is missing {', '.join(repr(m) for m in missing)}")
    for key, value in d.items():
        _check_type(where, key, value, hints[key].type)
    return cls(**d)


def load_config(path) -> StudyConfig:
    """Read a study config from a TOML file; relative paths are relative to the file."""
    path = Path(path)
    if not path.exists():
        raise ConceptEvoError(f"config file {path} does not exist; write one (see `conceptevo init-config`) or fix the path")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConceptEvoError(f"config file {path} is not valid TOML: {e}") from None
    except RecursionError:
        raise ConceptEvoError(f"config file {path} is not valid TOML: arrays or tables nested too deeply") from None
    except UnicodeDecodeError as e:
        raise ConceptEvoError(f"config file {path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    except IsADirectoryError:
        raise ConceptEvoError(f"config path {path} is a folder; give the .toml file") from None
    return StudyConfig.from_dict(raw, root=path.parent.resolve())
