"""The unified semantic space: :func:`project` (METHOD §6, Eq 2) and :class:`UnifiedSpace`, the whole
space as one estimator (fit on the base checkpoint, transform any checkpoint).

:class:`UnifiedSpace` follows scikit-learn's and umap-learn's manner: every
parameter is an ``__init__`` keyword stored as given and checked at ``fit``;
``fit`` returns the estimator; what it learned ends in ``_``:

* ``neuron_embedding_``: the base neurons' learned vectors (METHOD §4,
  :func:`conceptevo.embedding.embed_neurons`);
* ``responses_``: for every pool image its most responsive base neurons
  (``int [num_images, top_responses]``, :func:`conceptevo.stimuli.top_responses`),
  or None when fitted without them;
* ``image_embedding_``: every pool image's vector (METHOD §5,
  :func:`conceptevo.embedding.embed_images`).

``transform(stimuli)`` places any checkpoint's neurons (same image pool) in the
space: each neuron at the mean of its stimulus images' vectors
(:func:`conceptevo.projection.project`). ``save(folder)`` / ``load(folder)``
keep the fitted state as ``.npy`` and JSON (no pickle). The same functions do
the work as in the pipeline, so an estimator and a ``conceptevo run`` with the
same settings give the same arrays.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from ..config import EmbeddingConfig, ImagesConfig
from ..containers import ImageEmbedding, NeuronEmbedding
from ..embedding import embed_images, embed_neurons
from ..embedding._util import stimuli_arrays
from ..embedding.images import stimulus_matrix
from ..errors import ConceptEvoError
from ..io import load_npy, read_json, save_npy, write_json

log = logging.getLogger(__name__)

def _few(values, n: int = 5) -> str:
    values = [int(v) for v in values]
    text = ", ".join(map(str, values[:n]))
    return text + (f" (and {len(values) - n} more)" if len(values) > n else "")


def project(stimuli, image_embedding) -> NeuronEmbedding:
    """Vectors of ``stimuli``' neurons: the mean of their stimulus images' vectors (Eq 2).

    Parameters
    ----------
    stimuli : Stimuli
        Any checkpoint's stimuli over the same image pool as the base.
    image_embedding : ImageEmbedding or float array [num_images, dim]
        Image vectors from :func:`conceptevo.embedding.embed_images`.

    Each image counts once per neuron; negative indices (padding) are skipped;
    a neuron without any stimulus image gets a NaN vector (logged). Raises a
    ConceptEvoError naming the images when a stimulus image is outside the
    embedded pool or has no vector.
    """
    ids, indices, _ = stimuli_arrays(stimuli)
    if isinstance(image_embedding, ImageEmbedding):
        V = image_embedding.vectors
    else:
        V = np.asarray(image_embedding)
        if V.ndim != 2:
            raise ConceptEvoError(f"image_embedding must be an ImageEmbedding or a [num_images, dim] array, "
                                  f"got shape {V.shape}")
    A, images, rows = stimulus_matrix(indices)
    outside = images[images >= V.shape[0]]
    if outside.size:
        raise ConceptEvoError(f"stimuli refer to image(s) {_few(outside)} but the image embedding holds only "
                              f"{V.shape[0]} images; embed images over the same whole image pool")
    used = np.asarray(V[images], dtype=np.float64)
    blank = np.isnan(used).any(axis=1)
    if blank.any():
        raise ConceptEvoError(f"{int(blank.sum())} stimulus image(s) have no vector: {_few(images[blank])}; "
                              "pass responses (top_responses over the whole pool) to embed_images so every "
                              "image gets one")
    out = np.full((len(ids), V.shape[1]), np.nan, dtype=np.float32)
    out[rows] = A @ used
    if rows.size < len(ids):
        log.warning("%d of %d neurons have no stimulus image; their projected vectors are NaN",
                    len(ids) - rows.size, len(ids))
    return NeuronEmbedding(ids, out, config={"projected": True})


_EMBEDDING_KEYS = tuple(f.name for f in dataclasses.fields(EmbeddingConfig))
_FORMAT = 1


class UnifiedSpace:
    """Fit the unified space on base stimuli; project any checkpoint's stimuli into it.

    Parameters
    ----------
    dim, negatives, lr, lr_schedule, epochs, early_stop, tol, patience, check_every, seed :
        The base neuron embedding's settings (:class:`conceptevo.config.EmbeddingConfig`,
        whose defaults these are); ``seed`` also seeds the image embedding.
    top_responses : int
        Base neurons that give an image outside every base stimulus set its vector
        (:class:`conceptevo.config.ImagesConfig`).
    progress : bool
        Progress bars while fitting.
    """

    def __init__(self, dim: int = EmbeddingConfig.dim, negatives: int = EmbeddingConfig.negatives,
                 lr: float = EmbeddingConfig.lr, lr_schedule: str = EmbeddingConfig.lr_schedule,
                 epochs: int = EmbeddingConfig.epochs, early_stop: bool = EmbeddingConfig.early_stop,
                 tol: float = EmbeddingConfig.tol, patience: int = EmbeddingConfig.patience,
                 check_every: int = EmbeddingConfig.check_every, seed: int = EmbeddingConfig.seed,
                 top_responses: int = ImagesConfig.top_responses, progress: bool = False):
        self.dim = dim
        self.negatives = negatives
        self.lr = lr
        self.lr_schedule = lr_schedule
        self.epochs = epochs
        self.early_stop = early_stop
        self.tol = tol
        self.patience = patience
        self.check_every = check_every
        self.seed = seed
        self.top_responses = top_responses
        self.progress = progress

    @classmethod
    def from_config(cls, embedding: EmbeddingConfig = EmbeddingConfig(), images: ImagesConfig = ImagesConfig(),
                    progress: bool = False) -> "UnifiedSpace":
        """The estimator a study config's ``[embedding]`` and ``[images]`` tables describe."""
        return cls(**dataclasses.asdict(embedding), top_responses=images.top_responses, progress=progress)

    @classmethod
    def from_fitted(cls, neuron_embedding: NeuronEmbedding, image_embedding: ImageEmbedding, responses=None,
                    embedding: EmbeddingConfig = EmbeddingConfig(), images: ImagesConfig = ImagesConfig()) -> "UnifiedSpace":
        """A fitted space from parts computed elsewhere (a workspace's stages), with the settings that made them."""
        if not isinstance(neuron_embedding, NeuronEmbedding) or not isinstance(image_embedding, ImageEmbedding):
            raise ConceptEvoError("from_fitted needs a NeuronEmbedding and an ImageEmbedding (embed_neurons, embed_images)")
        if neuron_embedding.dim != image_embedding.dim:
            raise ConceptEvoError(f"the neuron vectors have dim {neuron_embedding.dim} but the image vectors "
                                  f"{image_embedding.dim}; give the image embedding fitted on these neuron vectors")
        out = cls.from_config(embedding, images)
        out.neuron_embedding_ = neuron_embedding
        out.image_embedding_ = image_embedding
        out.responses_ = None if responses is None else np.asarray(responses, dtype=np.int64)
        return out

    # ------------------------------------------------------------------------------------------ params
    def get_params(self) -> dict:
        return {key: getattr(self, key) for key in (*_EMBEDDING_KEYS, "top_responses", "progress")}

    def embedding_config(self) -> EmbeddingConfig:
        """The parameters as an :class:`EmbeddingConfig`, checked (errors name the parameter)."""
        cfg = EmbeddingConfig(**{key: getattr(self, key) for key in _EMBEDDING_KEYS})
        cfg.validate()
        ImagesConfig(self.top_responses).validate()
        return cfg

    def __repr__(self) -> str:
        default = UnifiedSpace()
        changed = {k: v for k, v in self.get_params().items() if getattr(default, k) != v}
        return f"UnifiedSpace({', '.join(f'{k}={v!r}' for k, v in changed.items())})"

    # ------------------------------------------------------------------------------------------ fit
    def fit(self, base_stimuli, responses=None, *, model=None, dataset=None, num_images: int | None = None,
            batch_size: int = 256, device="cpu") -> "UnifiedSpace":
        """Learn the base neurons' vectors and every pool image's vector from ``base_stimuli``.

        Images outside every base stimulus set get a vector from their most
        responsive base neurons: pass ``responses`` (``int [num_images, top]``, from
        :func:`conceptevo.stimuli.top_responses`), or the base ``model`` and the pool
        ``dataset`` to compute them here. With neither those images have no vector,
        and a checkpoint whose stimuli use them cannot be transformed.
        """
        cfg = self.embedding_config()
        if responses is None and model is not None:
            if dataset is None:
                raise ConceptEvoError("fit(model=...) needs dataset=, the image pool the stimuli were found on")
            from ..stimuli import top_responses  # torch is loaded only when responses are computed here

            responses = top_responses(model, dataset, base_stimuli, top=self.top_responses, batch_size=batch_size,
                                      device=device, progress=self.progress, num_images=num_images)
        elif responses is not None and model is not None:
            raise ConceptEvoError("give either responses= or model= (to compute them), not both")
        self.neuron_embedding_ = embed_neurons(base_stimuli, **dataclasses.asdict(cfg), progress=self.progress)
        self.responses_ = None if responses is None else np.asarray(responses, dtype=np.int64)
        self.image_embedding_ = embed_images(base_stimuli, self.neuron_embedding_, num_images=num_images,
                                             responses=self.responses_, seed=cfg.seed)
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "image_embedding_"):
            raise ConceptEvoError("this UnifiedSpace is not fitted yet; call fit(base_stimuli, ...) or UnifiedSpace.load(folder)")

    def transform(self, stimuli) -> NeuronEmbedding:
        """Vectors of any checkpoint's neurons (stimuli over the same image pool): the mean of their stimuli's vectors."""
        self._check_fitted()
        return project(stimuli, self.image_embedding_)

    def fit_transform(self, base_stimuli, responses=None, **fit_args) -> NeuronEmbedding:
        """:meth:`fit`, then the base neurons' projected vectors (placed as every other checkpoint's are)."""
        return self.fit(base_stimuli, responses, **fit_args).transform(base_stimuli)

    @property
    def image_vectors_(self) -> np.ndarray:
        """float32 ``[num_images, dim]``: every pool image's vector (NaN rows: no vector)."""
        self._check_fitted()
        return self.image_embedding_.vectors

    # ------------------------------------------------------------------------------------------ files
    def save(self, folder) -> None:
        """Write the parameters and the fitted state into ``folder`` (``.npy`` and JSON, no pickle)."""
        self._check_fitted()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.neuron_embedding_.save(folder / "neurons")
        self.image_embedding_.save(folder / "images")
        if self.responses_ is not None:
            save_npy(folder / "responses.npy", self.responses_)
        write_json(folder / "space.json", {"format": _FORMAT, "params": self.get_params(),
                                           "responses": self.responses_ is not None})

    @classmethod
    def load(cls, folder, mmap: bool = False) -> "UnifiedSpace":
        """Read what :meth:`save` wrote."""
        folder = Path(folder)
        if not (folder / "space.json").exists():
            raise ConceptEvoError(f"no unified space in {folder} (space.json missing); fit one and save it there first")
        meta = read_json(folder / "space.json")
        if meta.get("format") != _FORMAT:
            raise ConceptEvoError(f"{folder / 'space.json'} has format {meta.get('format')!r}, not {_FORMAT}; "
                                  "save the space again with this version")
        out = cls(**meta["params"])
        out.neuron_embedding_ = NeuronEmbedding.load(folder / "neurons", mmap=mmap)
        out.image_embedding_ = ImageEmbedding.load(folder / "images", mmap=mmap)
        out.responses_ = load_npy(folder / "responses.npy", mmap) if meta.get("responses") else None
        return out


__all__ = ["UnifiedSpace", "project"]
