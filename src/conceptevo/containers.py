"""The results of the pipeline's first stages, as plain containers: :class:`Stimuli`,
:class:`NeuronEmbedding`, :class:`ImageEmbedding`.

Each holds numpy arrays and ids, and saves to / loads from a folder of ``.npy``
and JSON files. This module imports neither numba nor torch, so reading results
(the explorer, reports, a notebook) does not pay for the compiled kernels that
compute them (:mod:`conceptevo.stimuli`, :mod:`conceptevo.embedding`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ConceptEvoError, suggest
from .io import load_npy, read_json, save_npy, write_json
from .units import LayerInfo, layer_of


@dataclass
class Stimuli:
    """Top-k images of every neuron of one checkpoint.

    ``indices[n]`` are image indices, strongest first; ``values[n]`` their
    strengths; ``positions[n]`` the flat argmax position in the neuron's
    activation map (-1 when unknown), decoded with ``layers``' position shapes.
    """

    neuron_ids: list[str]
    indices: np.ndarray
    values: np.ndarray
    positions: np.ndarray | None = None
    layers: list[LayerInfo] = field(default_factory=list)
    num_images: int | None = None
    mean: np.ndarray | None = None  # per-neuron mean strength over the pool (float32 [N])
    std: np.ndarray | None = None   # per-neuron strength standard deviation over the pool

    def __post_init__(self):
        self.indices = np.asarray(self.indices, dtype=np.int64)
        self.values = np.asarray(self.values, dtype=np.float32)
        if self.indices.ndim != 2 or self.indices.shape != self.values.shape:
            raise ConceptEvoError(f"indices and values must both be [neurons, k]; got {self.indices.shape} and {self.values.shape}")
        if len(self.neuron_ids) != self.indices.shape[0]:
            raise ConceptEvoError(f"{len(self.neuron_ids)} neuron ids for {self.indices.shape[0]} rows of stimuli")
        if self.positions is None:
            self.positions = np.full(self.indices.shape, -1, dtype=np.int64)
        self.positions = np.asarray(self.positions, dtype=np.int64)
        if self.num_images is None and self.indices.size:
            self.num_images = int(self.indices.max()) + 1

    @classmethod
    def from_arrays(cls, neuron_ids, indices, values, positions=None, num_images=None) -> "Stimuli":
        """Build from stimuli found elsewhere."""
        return cls(list(map(str, neuron_ids)), indices, values, positions, num_images=num_images)

    @property
    def k(self) -> int:
        return int(self.indices.shape[1])

    def __len__(self) -> int:
        return len(self.neuron_ids)

    def layer_slices(self) -> dict[str, slice]:
        out, start = {}, 0
        for info in self.layers:
            out[info.name] = slice(start, start + info.channels)
            start += info.channels
        return out

    def position_hw(self, row: int, j: int) -> tuple[int, ...]:
        """The (h, w) of neuron ``row``'s j-th stimulus' argmax."""
        layer = layer_of(self.neuron_ids[row])
        info = next(i for i in self.layers if i.name == layer)
        return tuple(int(v) for v in np.unravel_index(int(self.positions[row, j]), info.spatial)) if info.spatial else ()

    def save(self, folder) -> None:
        folder = Path(folder)
        save_npy(folder / "indices.npy", self.indices)
        save_npy(folder / "values.npy", self.values)
        save_npy(folder / "positions.npy", self.positions)
        if self.mean is not None:
            save_npy(folder / "mean.npy", self.mean)
            save_npy(folder / "std.npy", self.std)
        write_json(folder / "neurons.json", {
            "neuron_ids": self.neuron_ids,
            "layers": [i.to_json() for i in self.layers],
            "num_images": self.num_images,
        })

    @classmethod
    def load(cls, folder, mmap: bool = False) -> "Stimuli":
        folder = Path(folder)
        meta = read_json(folder / "neurons.json")
        opt = lambda n: load_npy(folder / n, mmap) if (folder / n).exists() else None  # noqa: E731
        return cls(
            meta["neuron_ids"], load_npy(folder / "indices.npy", mmap), load_npy(folder / "values.npy", mmap),
            load_npy(folder / "positions.npy", mmap),
            layers=[LayerInfo.from_json(d) for d in meta["layers"]],
            num_images=meta.get("num_images"), mean=opt("mean.npy"), std=opt("std.npy"),
        )


@dataclass
class NeuronEmbedding:
    """Vectors of neurons in a semantic space.

    Attributes
    ----------
    neuron_ids : list[str]
        Stable neuron ids (``"features.3:12"``), one per row of ``vectors``.
    vectors : float32 [N, dim]
        The neurons' vectors. Learned ones for the base checkpoint
        (:func:`embed_neurons`), projected ones for others
        (:func:`conceptevo.projection.project`).
    j1_history : float64 [epochs_run] or None
        Running J1 of each training epoch: the sum over that epoch's pairs of
        each pair's objective term, evaluated just before the pair's update
        (the usual "running loss"; divide by ``num_pairs`` for a per-pair value).
        None for projected embeddings.
    epochs_run : int
        Epochs actually run (fewer than asked when early stopping fired).
        ``config["stop_reason"]`` says why the run ended.
    num_pairs : int
        |D|, the number of co-activation pairs per epoch.
    config : dict
        The parameters that made it (for provenance).
    """

    neuron_ids: list[str]
    vectors: np.ndarray
    j1_history: np.ndarray | None = None
    epochs_run: int = 0
    num_pairs: int = 0
    config: dict = field(default_factory=dict)

    def __post_init__(self):
        self.neuron_ids = [str(i) for i in self.neuron_ids]
        self.vectors = np.asarray(self.vectors, dtype=np.float32)
        if self.vectors.ndim != 2 or self.vectors.shape[0] != len(self.neuron_ids):
            raise ConceptEvoError(f"vectors must be [len(neuron_ids)={len(self.neuron_ids)}, dim], "
                                  f"got shape {self.vectors.shape}")
        if self.j1_history is not None:
            self.j1_history = np.asarray(self.j1_history, dtype=np.float64)
        self._index: dict[str, int] | None = None

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return len(self.neuron_ids)

    def index_of(self, neuron_id: str) -> int:
        """Row of ``neuron_id`` in ``vectors``."""
        if self._index is None or len(self._index) != len(self.neuron_ids):
            self._index = {nid: i for i, nid in enumerate(self.neuron_ids)}
        try:
            return self._index[str(neuron_id)]
        except KeyError:
            raise ConceptEvoError(f"neuron {neuron_id!r} is not in this embedding."
                                  + suggest(neuron_id, self.neuron_ids)) from None

    def vector(self, neuron_id: str) -> np.ndarray:
        """The vector of one neuron."""
        return self.vectors[self.index_of(neuron_id)]

    def save(self, folder) -> None:
        """Write ``vectors.npy``, ``neuron_ids.json`` and ``meta.json`` (history, config) into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_npy(folder / "vectors.npy", self.vectors)
        write_json(folder / "neuron_ids.json", self.neuron_ids)
        write_json(folder / "meta.json", {
            "epochs_run": int(self.epochs_run),
            "num_pairs": int(self.num_pairs),
            "j1_history": None if self.j1_history is None else [float(v) for v in self.j1_history],
            "config": self.config,
        })

    @classmethod
    def load(cls, folder, mmap: bool = False) -> "NeuronEmbedding":
        """Read what :meth:`save` wrote."""
        folder = Path(folder)
        if not (folder / "vectors.npy").exists():
            raise ConceptEvoError(f"no neuron embedding in {folder} (vectors.npy missing); "
                                  "run embed_neurons and save it there first")
        meta = read_json(folder / "meta.json") if (folder / "meta.json").exists() else {}
        return cls(
            neuron_ids=read_json(folder / "neuron_ids.json"),
            vectors=load_npy(folder / "vectors.npy", mmap=mmap),
            j1_history=meta.get("j1_history"),
            epochs_run=int(meta.get("epochs_run", 0)),
            num_pairs=int(meta.get("num_pairs", 0)),
            config=meta.get("config", {}),
        )


@dataclass
class ImageEmbedding:
    """Vectors of every image of the pool on the base semantic space.

    Attributes
    ----------
    vectors : float32 [num_images, dim]
        NaN rows for images that got no vector.
    covered : bool [num_images]
        Image is in some base neuron's stimuli (its vector solves J2).
    rmse : float
        Error per neuron, ``sqrt(2 * J2)`` = root of the mean squared distance
        between a base neuron's learned vector and its stimuli's mean image
        vector, at the solution (the paper's unit; see the module docstring).
    indirect : bool [num_images]
        Image got its vector from the indirect step (mean of its responsive
        base neurons' vectors).
    info : dict
        Method, solver iterations, seconds, J2, ``relative_error``,
        ``rmse_per_coordinate``, ``num_neurons``, ``num_covered``,
        ``determined`` ("under" or "over": covered images >= base neurons or
        not), parameters.
    """

    vectors: np.ndarray
    covered: np.ndarray
    rmse: float
    indirect: np.ndarray | None = None
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        self.vectors = np.asarray(self.vectors, dtype=np.float32)
        self.covered = np.asarray(self.covered, dtype=bool)
        if self.vectors.ndim != 2 or self.covered.shape != (self.vectors.shape[0],):
            raise ConceptEvoError(f"vectors must be [num_images, dim] and covered [num_images]; "
                                  f"got {self.vectors.shape} and {self.covered.shape}")
        if self.indirect is None:
            self.indirect = np.zeros_like(self.covered)
        self.indirect = np.asarray(self.indirect, dtype=bool)
        self.rmse = float(self.rmse)

    @property
    def num_images(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def has_vector(self) -> np.ndarray:
        """bool [num_images]: the image has a (non-NaN) vector."""
        return ~np.isnan(self.vectors).any(axis=1)

    def save(self, folder) -> None:
        """Write ``vectors.npy``, ``covered.npy``, ``indirect.npy`` and ``meta.json`` into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_npy(folder / "vectors.npy", self.vectors)
        save_npy(folder / "covered.npy", self.covered)
        save_npy(folder / "indirect.npy", self.indirect)
        write_json(folder / "meta.json", {"rmse": self.rmse, "rmse_unit": "per neuron", "info": self.info})

    @classmethod
    def load(cls, folder, mmap: bool = False) -> "ImageEmbedding":
        """Read what :meth:`save` wrote."""
        folder = Path(folder)
        if not (folder / "vectors.npy").exists():
            raise ConceptEvoError(f"no image embedding in {folder} (vectors.npy missing); "
                                  "run embed_images and save it there first")
        meta = read_json(folder / "meta.json")
        vectors = load_npy(folder / "vectors.npy", mmap=mmap)
        rmse = meta["rmse"]
        if meta.get("rmse_unit") != "per neuron":  # written before the error was per neuron: per coordinate
            rmse = float(rmse) * np.sqrt(vectors.shape[1])
        return cls(vectors, load_npy(folder / "covered.npy"), rmse, load_npy(folder / "indirect.npy"),
                   meta.get("info", {}))


__all__ = ["Stimuli", "NeuronEmbedding", "ImageEmbedding"]
