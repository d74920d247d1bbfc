"""The workspace: one directory per study, holding every result.

Layout::

    STUDY/
      manifest.json                 format version, config, and one record per finished stage
      models/MODEL/checkpoints.json the model's checkpoints (tags, files, accuracies)
      stimuli/MODEL/TAG/*.npy       top-k image indices, strengths, argmax positions
      embedding/neurons/            the base checkpoint's learned neuron vectors
      embedding/images/             image vectors (+ RMSE, coverage)
      embedding/responses.npy       each pool image's most responsive base neurons
      projection/MODEL/TAG/vectors.npy  every checkpoint's neurons in the unified space
      layout/MODEL/TAG/xy.npy       2-D layout (UMAP fitted on the base, transform for the rest)
      figures/                      pictures

Arrays are ``.npy`` (readable with ``mmap_mode="r"``). The manifest lists, for
each stage, its parameters and a key hashing its parameters and inputs; a stage
counts as finished only when its record is in the manifest, and the record is
written (atomically) after the stage's files are durable. A rerun skips stages
whose key is unchanged; a record whose key no longer matches is dropped as soon
as :meth:`Workspace.is_done` says so, before the stage's files are rewritten,
so a crash mid-rewrite never leaves a record vouching for mixed files.

The manifest and the files are checked when read: a damaged or hand-edited
manifest, or a truncated array, is a :class:`~conceptevo.errors.WorkspaceError`
(:class:`~conceptevo.errors.DamagedFileError`) naming the file, never a
traceback from deep inside.
"""
from __future__ import annotations

import datetime as _dt
import logging
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .errors import ConceptEvoError, DamagedFileError, WorkspaceError, suggest
from .io import hash_json, load_npy, read_json, remove_orphan_temporaries, write_json
from .records import check_name, checkpoint_problem, duplicate_tag, name_problem

log = logging.getLogger(__name__)

FORMAT = "conceptevo-workspace"
VERSION = 1


def _safe(part: str) -> str:
    return check_name("name", part, WorkspaceError)


class Workspace:
    """Read (and, for the pipeline, write) a study directory."""

    def __init__(self, path, create: bool = False):
        self.path = Path(path)
        self.manifest_path = self.path / "manifest.json"
        if self.path.exists() and not self.path.is_dir():
            raise WorkspaceError(f"{self.path} is a file, not a workspace folder; give the study's output folder")
        if self.manifest_path.exists():
            self.manifest = read_json(self.manifest_path)
            if not isinstance(self.manifest, dict):
                raise _bad_manifest(self.manifest_path, f"it holds a JSON {type(self.manifest).__name__}, not an object")
            if self.manifest.get("format") != FORMAT:
                raise WorkspaceError(f"{self.path} is not a conceptevo workspace (manifest format {self.manifest.get('format')!r})")
            v = self.manifest.get("version")
            if v != VERSION:
                raise WorkspaceError(
                    f"workspace {self.path} has format version {v}, this conceptevo reads version {VERSION}; "
                    "rerun `conceptevo run` into a new directory"
                )
            _check_manifest(self.manifest, self.manifest_path)
        elif create:
            self.path.mkdir(parents=True, exist_ok=True)
            self.manifest = {"format": FORMAT, "version": VERSION, "config": {}, "stages": {}}
            self._flush()
        else:
            raise WorkspaceError(f"no conceptevo workspace at {self.path}; create one with `conceptevo run CONFIG.toml` or `conceptevo demo`")

    @classmethod
    def from_results(cls, path, stimuli, neuron_embedding, image_embedding, **kwargs) -> "Workspace":
        """A workspace written from results computed in memory with the API, for the figures and the explorer.

        ``stimuli`` is ``{model: {tag: Stimuli}}``; keyword arguments ``base``
        (the (model, tag) the embeddings were learned on), ``dataset`` and
        ``models`` ({model: network}) are required. See
        :func:`conceptevo.results.workspace_from_results` for all of them.
        """
        # upward on purpose: results builds on the workspace, this is a shortcut to it (see tests/test_imports.py)
        from .results import workspace_from_results

        return workspace_from_results(path, stimuli, neuron_embedding, image_embedding, **kwargs)

    # -- stage bookkeeping ----------------------------------------------------------------------------
    def _flush(self) -> None:
        """Write the manifest; stage records changed by other processes meanwhile are kept.

        Several commands may write one workspace at once (e.g. two
        ``evaluate-importance`` runs, or patches beside an importance run).
        Under a short file lock the stages on disk are read back and only the
        stages this process finished or dropped are applied to them, before the
        atomic write: per stage, the last writer wins.
        """
        import fcntl

        changed = self.__dict__.setdefault("_changed", set())
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / ".manifest-lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                disk = None
                if self.manifest_path.exists():
                    try:
                        disk = read_json(self.manifest_path)
                        if isinstance(disk, dict):
                            _check_manifest(disk, self.manifest_path)
                    except DamagedFileError:  # replaced by ours; an unreadable one (FileAccessError) stops here
                        disk = None
                if isinstance(disk, dict) and isinstance(disk.get("stages"), dict):
                    stages = dict(disk["stages"])
                    for name in changed:
                        if name in self.manifest["stages"]:
                            stages[name] = self.manifest["stages"][name]
                        else:
                            stages.pop(name, None)
                    self.manifest["stages"] = stages
                write_json(self.manifest_path, self.manifest)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def stage(self, name: str) -> dict | None:
        return self.manifest["stages"].get(name)

    def is_done(self, name: str, key: str) -> bool:
        """True when stage ``name`` finished with inputs ``key``.

        A record made with other inputs is dropped (and the manifest saved)
        before returning False: the caller is about to rewrite the stage's
        files, and a crash while it does so must not leave the old record
        vouching for a mix of old and new files.
        """
        rec = self.stage(name)
        if rec is not None and rec.get("key") != key:
            self.invalidate(name)
            return False
        return rec is not None

    def finish(self, name: str, key: str, params: dict | None = None, **info) -> None:
        """Record a stage as finished (call after its files are written)."""
        self.manifest["stages"][name] = {
            "key": key, "params": params or {}, "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **info,
        }
        self.__dict__.setdefault("_changed", set()).add(name)
        self._flush()

    def run_stage(self, name: str, key: str, write, params: dict | None = None) -> bool:
        """Run stage ``name`` unless it finished with inputs ``key``; return whether it ran.

        ``write()`` computes the stage and writes its files; what it returns (a dict or None) is added to the
        stage's record, which :meth:`finish` writes once the files are durable.
        """
        if self.is_done(name, key):
            return False
        info = write()
        self.finish(name, key, params, **(info or {}))
        return True

    def invalidate(self, name: str) -> None:
        if self.manifest["stages"].pop(name, None) is not None:
            self.__dict__.setdefault("_changed", set()).add(name)
            self._flush()

    def set_config(self, config: dict) -> None:
        self.manifest["config"] = config
        self._flush()

    # -- the study's record (models, base, data, sanity checks) ---------------------------------------
    def record_study(self, models: dict, base: tuple[str, str], data: dict) -> None:
        """Record the study's models (``{name: {arch, options, checkpoints, load}}``), its base (model, tag)
        and its data (fingerprint, pool size, ...), replacing what was recorded; the manifest is saved."""
        self.manifest["models"] = models
        self.manifest["base"] = {"model": base[0], "tag": base[1]}
        self.manifest["data"] = data
        self._flush()

    def update_data(self, **info) -> None:
        """Add ``info`` (classes, preprocessing, test split, ...) to the data record; the manifest is saved."""
        self.manifest.setdefault("data", {}).update(info)
        self._flush()

    @property
    def data_info(self) -> dict:
        """The data record: fingerprint, pool size, ``num_images``, classes, preprocessing, held-out split."""
        data = self.manifest.get("data")
        return data if isinstance(data, dict) else {}

    def sanity_record(self, model: str) -> dict | None:
        """The recorded accuracy check of ``model``'s last checkpoint (see :func:`conceptevo.preflight.sanity_check`)."""
        rec = (self.manifest.get("sanity") or {}).get(model)
        return rec if isinstance(rec, dict) else None

    def record_sanity(self, model: str, record: dict) -> None:
        self.manifest.setdefault("sanity", {})[model] = record
        self._flush()

    @property
    def config(self) -> dict:
        return self.manifest.get("config", {})

    # -- paths -------------------------------------------------------------------------------------
    def model_dir(self, model: str) -> Path:
        return self.path / "models" / _safe(model)

    def stimuli_dir(self, model: str, tag: str) -> Path:
        return self.path / "stimuli" / _safe(model) / _safe(tag)

    def projection_path(self, model: str, tag: str) -> Path:
        return self.path / "projection" / _safe(model) / _safe(tag) / "vectors.npy"

    def layout_path(self, model: str, tag: str) -> Path:
        return self.path / "layout" / _safe(model) / _safe(tag) / "xy.npy"

    @property
    def figures_dir(self) -> Path:
        return self.path / "figures"

    # -- reading results -----------------------------------------------------------------------------
    @contextmanager
    def _reading(self, what: str, where):
        """Turn damage found while decoding ``where`` (bad JSON shapes, mismatched arrays) into a WorkspaceError."""
        try:
            yield
        except ConceptEvoError as e:
            if isinstance(e, WorkspaceError):
                raise
            raise DamagedFileError(f"the {what} in {where} is inconsistent ({e}); restore the folder, "
                                   "or recompute into a new folder with `conceptevo run`") from e
        except (KeyError, TypeError, IndexError, AttributeError, ValueError) as e:
            raise DamagedFileError(f"the {what} in {where} is damaged ({type(e).__name__}: {str(e)[:120]}); restore the folder, "
                                   "or recompute into a new folder with `conceptevo run`") from e

    def _require(self, name: str, what: str):
        if self.stage(name) is None:
            raise WorkspaceError(f"the workspace {self.path} has no {what} yet; run `conceptevo run` on its config to compute it")

    @property
    def models(self) -> list[str]:
        return list(self.manifest.get("models", {}))

    def model_info(self, model: str) -> dict:
        """What the study recorded of ``model``: ``arch``, ``options``, ``checkpoints`` (rows) and ``load`` settings."""
        if model not in self.manifest.get("models", {}):
            raise WorkspaceError(f"model {model!r} is not in this study; models: {', '.join(self.models) or 'none'}")
        return self.manifest["models"][model]

    def checkpoints(self, model: str):
        from .models.checkpoints import Checkpoint  # torch: keeps `import conceptevo.workspace` light

        return [Checkpoint.from_dict(d) for d in self.model_info(model)["checkpoints"]]

    def checkpoint(self, model: str, tag: str):
        """The :class:`~conceptevo.models.checkpoints.Checkpoint` of ``model`` tagged ``tag``."""
        cks = self.checkpoints(model)
        for c in cks:
            if c.tag == tag:
                return c
        tags = [c.tag for c in cks]
        raise ConceptEvoError(f"{model} has no checkpoint {tag!r}.{suggest(tag, tags)} Checkpoints: {', '.join(tags)}")

    def build_model(self, model: str, dataset=None):
        """``model``'s network, untrained, built for ``dataset``'s channels and classes (default: the study's images)."""
        from .study import build_for_dataset  # torch: keeps `import conceptevo.workspace` light

        info = self.model_info(model)
        dataset = self.images() if dataset is None else dataset
        return build_for_dataset(info["arch"], info.get("options", {}), dataset, info.get("load", {}).get("import_path")).eval()

    def load_model(self, model: str, tag: str, dataset=None, trust: bool = False):
        """``model`` at checkpoint ``tag``, in eval mode, built for ``dataset`` (default: the study's images).

        The checkpoint is read with the loading settings the study recorded (``prefix``, ``key``, ``import_path``).
        """
        from .study import load_model  # torch: keeps `import conceptevo.workspace` light

        info = self.model_info(model)
        ck = self.checkpoint(model, tag)
        dataset = self.images() if dataset is None else dataset
        return load_model(info["arch"], info.get("options", {}), ck.path, dataset, trust=trust, **info.get("load", {}))

    def tags(self, model: str) -> list[str]:
        return [c.tag for c in self.checkpoints(model)]

    @property
    def base(self) -> tuple[str, str]:
        b = self.manifest.get("base")
        if not b:
            raise WorkspaceError(f"the workspace {self.path} has no base checkpoint recorded; run the study first")
        return b["model"], b["tag"]

    def stimuli(self, model: str, tag: str, mmap: bool = True):
        from .stimuli import Stimuli  # torch: keeps `import conceptevo.workspace` light

        self._require(f"stimuli/{model}/{tag}", f"stimuli for {model} {tag}")
        folder = self.stimuli_dir(model, tag)
        with self._reading("stimuli", folder):
            return Stimuli.load(folder, mmap=mmap)

    def neuron_embedding(self):
        from .embedding import NeuronEmbedding  # numba: keeps `import conceptevo.workspace` light

        self._require("embedding/neurons", "base neuron embedding")
        folder = self.path / "embedding" / "neurons"
        with self._reading("neuron embedding", folder):
            return NeuronEmbedding.load(folder)

    def image_embedding(self):
        from .embedding import ImageEmbedding  # numba: keeps `import conceptevo.workspace` light

        self._require("embedding/images", "image embedding")
        folder = self.path / "embedding" / "images"
        with self._reading("image embedding", folder):
            return ImageEmbedding.load(folder)

    def projection(self, model: str, tag: str):
        """A checkpoint's neurons in the unified space (a NeuronEmbedding)."""
        from .embedding import NeuronEmbedding  # numba: keeps `import conceptevo.workspace` light

        self._require(f"projection/{model}/{tag}", f"projection of {model} {tag}")
        with self._reading("projection", self.projection_path(model, tag).parent):
            ids = read_json(self.stimuli_dir(model, tag) / "neurons.json")["neuron_ids"]
            return NeuronEmbedding(neuron_ids=ids, vectors=load_npy(self.projection_path(model, tag)))

    def layout(self, model: str, tag: str) -> np.ndarray:
        """``[neurons, 2]`` coordinates of a checkpoint's neurons in the shared 2-D frame."""
        self._require("layout", "2-D layout")
        xy = load_npy(self.layout_path(model, tag))
        if xy.ndim != 2 or xy.shape[1] != 2:
            raise DamagedFileError(f"{self.layout_path(model, tag)} holds an array of shape {xy.shape}, not [neurons, 2]; "
                                   "restore it, or recompute into a new folder with `conceptevo run`")
        return xy

    def dataset(self, split: str = "train"):
        """The study's training or test split, opened (and preprocessed) as the config names it.

        With a held-out test split the positions of this dataset are not image
        indices: to look an image up by its index (as stimuli record it), use :meth:`images`.
        """
        from .study import open_study_dataset  # torch: keeps `import conceptevo.workspace` light

        self._require_data()
        ds = open_study_dataset(self.config, split)
        held = self.manifest.get("data", {}).get("holdout")
        if held and split == "test":
            if hash_json(np.asarray(ds.indices).tolist()) != held.get("key"):
                raise WorkspaceError(
                    f"the held-out images of {self.path} differ from the ones recorded in data/heldout.npy "
                    "(the image folder changed since the study ran); rerun `conceptevo run` into a new folder")
        return ds

    def images(self):
        """Every training image, by image index (the positions stimuli, patches and embeddings refer to)."""
        from .study import open_study_images  # torch: keeps `import conceptevo.workspace` light

        self._require_data()
        return open_study_images(self.config)

    def _require_data(self) -> None:
        if not self.config.get("data"):
            raise WorkspaceError(
                f"the workspace {self.path} records no dataset (it was built from results in memory with "
                "Workspace.from_results), so commands that reread its images cannot run on it; use the Python API "
                "with your dataset, or make the study with `conceptevo run`")

    def summary(self) -> str:
        lines = [f"workspace {self.path}"]
        for m in self.models:
            tags = self.tags(m)
            lines.append(f"  model {m}: {len(tags)} checkpoints ({', '.join(tags)})")
        if self.manifest.get("base"):
            lines.append(f"  base: {self.base[0]} {self.base[1]}")
        sanity = self.manifest.get("sanity") if isinstance(self.manifest.get("sanity"), dict) else {}
        for m in self.models:
            rec = sanity.get(m)
            if isinstance(rec, dict) and isinstance(rec.get("top1"), (int, float)):
                what = "next tokens" if (self.config.get("data") or {}).get("kind") == "text" else "pool images"
                lines.append(f"  {m} {rec.get('tag', 'last')}: top-1 {rec['top1']:.3f} on {rec.get('images')} "
                             f"{what} (chance {rec.get('chance', float('nan')):.3f})")
        rec = self.stage("embedding/images")
        if rec and isinstance(rec.get("rmse"), (int, float)):
            from .embedding.images import fit_summary  # numba: keeps `import conceptevo.workspace` light

            lines.append(f"  image embedding: {fit_summary(rec)}")
        lines.append(f"  stages finished: {len(self.manifest['stages'])}")
        return "\n".join(lines)


class WorkspaceLock:
    """An exclusive lock on a workspace, enforced by the operating system (``flock`` on ``STUDY/.lock``).

    The lock file is never deleted (deleting it would let two processes lock
    two different files of the same name); the holder writes its pid into it
    for the "in use by process N" message and empties it when done. A process
    that dies, SIGKILL included, loses the lock with it: a lock left by a dead
    process never blocks anyone, whatever the file says.
    """

    def __init__(self, path):
        self.file = Path(path) / ".lock"
        self._fd: int | None = None

    def __enter__(self):
        import fcntl

        self.file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.file, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            who = f"process {pid}" if pid else "another conceptevo process"
            raise WorkspaceError(f"workspace {self.file.parent} is in use by {who}; wait for it to finish") from None
        except BaseException:
            os.close(fd)
            raise
        stale = _read_pid(fd)
        if stale and stale != os.getpid():
            log.info("taking over the lock of process %s, which is no longer running", stale)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        removed = remove_orphan_temporaries(self.file.parent)
        if removed:
            log.warning("removed %d temporary file(s) left by a process that was killed mid-write", removed)
        return self

    def __exit__(self, *exc):
        import fcntl

        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)  # no pid: nobody holds it
        except OSError:
            pass
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    @staticmethod
    def holder(path) -> int | None:
        """The pid holding the lock of workspace ``path`` (0 when it cannot be told), or None when it is free.

        Probes the lock itself for a moment: do not call it while another
        process may be trying to take the lock (it would be refused).
        """
        import fcntl

        file = Path(path) / ".lock"
        try:
            fd = os.open(file, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return _read_pid(fd)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)


def _read_pid(fd: int) -> int:
    try:
        return int(os.pread(fd, 32, 0).decode("ascii", "replace").strip() or 0)
    except (OSError, ValueError):
        return 0


def _bad_manifest(path, what: str) -> DamagedFileError:
    return DamagedFileError(f"the manifest {path} is damaged: {what}; conceptevo writes it atomically, so it was "
                            "changed afterwards: restore it, or recompute into a new folder with `conceptevo run`")


def _check_manifest(m: dict, path) -> None:
    """Check the manifest's structure (what the readers rely on); raise DamagedFileError naming the first problem."""
    def need(cond, what):
        if not cond:
            raise _bad_manifest(path, what)

    stages = m.get("stages")
    need(isinstance(stages, dict), "'stages' is not an object")
    for name, rec in stages.items():
        need(isinstance(rec, dict) and isinstance(rec.get("key"), str), f"stage {name!r} has no record with a string 'key'")
        need(isinstance(rec.get("params", {}), dict), f"stage {name!r} has 'params' that are not an object")
        need(isinstance(rec.get("file", ""), str), f"stage {name!r} has a 'file' that is not a string")
    need(isinstance(m.get("config", {}), dict), "'config' is not an object")
    models = m.get("models", {})
    need(isinstance(models, dict), "'models' is not an object")
    for name, info in models.items():
        problem = name_problem(name)
        need(problem is None, f"model name {name!r} {problem}")
        need(isinstance(info, dict) and isinstance(info.get("checkpoints"), list), f"model {name!r} lists no 'checkpoints'")
        need(isinstance(info.get("arch", ""), str) and isinstance(info.get("options", {}), dict),
             f"model {name!r} has a bad 'arch' or 'options'")
        for row in info["checkpoints"]:
            problem = checkpoint_problem(row)
            need(problem is None, f"a checkpoint of model {name!r} {problem}")
        dup = duplicate_tag(info["checkpoints"])
        need(dup is None, f"model {name!r} has two checkpoints tagged {dup!r}, so no command could tell them apart")
    base = m.get("base")
    if base is not None:
        need(isinstance(base, dict) and isinstance(base.get("model"), str) and isinstance(base.get("tag"), str),
             "'base' is not an object with string 'model' and 'tag'")
        need(base["tag"] in [r["tag"] for r in models.get(base["model"], {}).get("checkpoints", [])],
             f"the base checkpoint {base['model']} {base['tag']} is not among the models' checkpoints")
    data = m.get("data", {})
    need(isinstance(data, dict), "'data' is not an object")
    for key in ("pool", "num_images"):
        need(data.get(key) is None or (isinstance(data[key], int) and not isinstance(data[key], bool) and data[key] >= 0),
             f"'data' has {key} {data.get(key)!r}, not an integer >= 0")

