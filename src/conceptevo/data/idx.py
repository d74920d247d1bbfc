"""IDX files (the MNIST / Fashion-MNIST format) read with numpy alone.

An IDX file is a 4-byte magic number -- two zero bytes, a type code and the
number of dimensions -- followed by one big-endian uint32 per dimension and
then the values, big-endian, in C order. Files may be gzip-compressed; that is
detected from the content, not the file name.

:func:`read_idx` checks the header against the file's size, so a truncated or
corrupt file raises :class:`~conceptevo.errors.DatasetError` naming the file
and the problem instead of returning garbage.
"""
from __future__ import annotations

import gzip
import logging
import os
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import DatasetError, suggest
from .base import ImageDataset

log = logging.getLogger(__name__)

#: IDX type code -> numpy dtype (big-endian, as stored).
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODES = {dt.newbyteorder("="): code for code, dt in IDX_DTYPES.items()}
_GZIP_MAGIC = b"\x1f\x8b"

#: Default location of the Debian package ``dataset-fashion-mnist``.
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
_INSTALL_HINT = (
    "install it with `apt-get install dataset-fashion-mnist` "
    "or pass the directory holding the IDX files"
)
SPLIT_PREFIXES = {"train": "train", "test": "t10k"}


def _read_bytes(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DatasetError(f"IDX file {path} does not exist; check the path") from None
    except IsADirectoryError:
        raise DatasetError(f"IDX path {path} is a directory; pass the IDX file itself") from None
    except OSError as e:
        raise DatasetError(f"cannot read IDX file {path} ({e.strerror or e}); check its permissions") from None
    if data[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise DatasetError(
                f"IDX file {path} is a corrupt or truncated gzip file ({e}); download or unpack it again"
            ) from None
    return data


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode the bytes of an (uncompressed) IDX file into a native-endian array.

    ``source`` names the data in error messages. The returned array is a
    read-only view of ``data`` when no byte swap is needed.
    """
    fix = "download or unpack it again"
    if len(data) < 4:
        raise DatasetError(f"IDX file {source} is truncated: {len(data)} bytes, shorter than the 4-byte magic; {fix}")
    if data[0] != 0 or data[1] != 0:
        raise DatasetError(
            f"{source} is not an IDX file: magic starts with {data[:2].hex()} instead of 0000; "
            "pass an IDX (MNIST-format) file, plain or .gz"
        )
    code, ndim = data[2], data[3]
    if code not in IDX_DTYPES:
        raise DatasetError(
            f"IDX file {source} has unknown type code 0x{code:02x} "
            f"(valid: {', '.join(f'0x{c:02x}' for c in IDX_DTYPES)}); the file is corrupt, {fix}"
        )
    if ndim == 0:
        raise DatasetError(f"IDX file {source} declares 0 dimensions; the file is corrupt, {fix}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(
            f"IDX file {source} is truncated: {len(data)} bytes, shorter than its "
            f"{header}-byte header for {ndim} dimensions; {fix}"
        )
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[code]
    count = 1
    for d in dims:
        count *= d
    expected = header + count * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "longer than its header says"
        raise DatasetError(
            f"IDX file {source} is {what}: dimensions {list(dims)} of {dtype.name} need "
            f"{expected} bytes but it has {len(data)}; {fix}"
        )
    try:
        arr = np.frombuffer(data, dtype=dtype, count=count, offset=header).reshape(dims)
    except ValueError:  # a zero dimension beside huge ones: no bytes needed, but no array numpy can shape
        raise DatasetError(f"IDX file {source} has dimensions {list(dims)}, which no array can have; {fix}") from None
    if dtype.byteorder == ">":
        arr = arr.astype(dtype.newbyteorder("="))
    return arr


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (plain or gzip-compressed) into a numpy array.

    Raises :class:`DatasetError` naming the file when it is missing, not an
    IDX file, or truncated/corrupt (its size disagrees with its header).
    """
    path = Path(path)
    return parse_idx(_read_bytes(path), str(path))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write ``array`` as an IDX file; gzip-compressed when ``path`` ends in ``.gz``.

    Supported dtypes: uint8, int8, int16, int32, float32, float64.
    """
    arr = np.asarray(array)
    native = arr.dtype.newbyteorder("=")
    if native not in _CODES:
        raise DatasetError(
            f"IDX cannot store dtype {arr.dtype}; convert the array to one of "
            "uint8, int8, int16, int32, float32, float64"
        )
    if arr.ndim == 0 or arr.ndim > 255:
        raise DatasetError(f"IDX stores 1 to 255 dimensions, the array has {arr.ndim}; reshape it")
    code = _CODES[native]
    header = bytes([0, 0, code, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
    payload = header + np.ascontiguousarray(arr, dtype=IDX_DTYPES[code]).tobytes()
    path = Path(path)
    if path.suffix == ".gz":
        payload = gzip.compress(payload, compresslevel=6)
    path.write_bytes(payload)
    return path


class IDXDataset(ImageDataset):
    """Images and labels from a pair of IDX files (or arrays), e.g. MNIST.

    ``images`` is a uint8 array ``[N, H, W]`` (or ``[N, H, W, C]``), ``labels``
    an integer array ``[N]``; either may be given as a path to an IDX file.
    The uint8 array stays in memory (:attr:`array`); each item is converted
    to a float32 tensor ``[C, H, W]`` in [0, 1] when read. Use
    :meth:`images_tensor` to fetch many images at once.
    """

    def __init__(
        self,
        images: str | os.PathLike | np.ndarray,
        labels: str | os.PathLike | np.ndarray,
        classes: Sequence[str] | None = None,
        name: str | None = None,
    ):
        img_src = str(images) if not isinstance(images, np.ndarray) else "the images array"
        lab_src = str(labels) if not isinstance(labels, np.ndarray) else "the labels array"
        arr = images if isinstance(images, np.ndarray) else read_idx(images)
        lab = labels if isinstance(labels, np.ndarray) else read_idx(labels)
        if arr.dtype != np.uint8:
            raise DatasetError(
                f"{img_src} holds {arr.dtype} values; images must be unsigned bytes (IDX type 0x08), "
                "scale them to 0..255 and store them as uint8"
            )
        if arr.ndim == 4 and arr.shape[-1] in (1, 3):
            self._channels_last = True
        elif arr.ndim == 3:
            self._channels_last = False
        else:
            raise DatasetError(
                f"{img_src} has shape {list(arr.shape)}; images must be [N, H, W] or [N, H, W, C] with C 1 or 3"
            )
        if lab.ndim != 1 or not np.issubdtype(lab.dtype, np.integer):
            raise DatasetError(
                f"{lab_src} has shape {list(lab.shape)} and dtype {lab.dtype}; labels must be a 1-D integer array"
            )
        if len(lab) != len(arr):
            raise DatasetError(
                f"{img_src} holds {len(arr)} images but {lab_src} holds {len(lab)} labels; "
                "pass the labels file that belongs to these images"
            )
        if len(arr) == 0:
            raise DatasetError(f"{img_src} holds no images; pass a non-empty IDX file")
        targets = lab.astype(np.int64)
        if targets.min() < 0:
            raise DatasetError(f"{lab_src} has negative labels (min {targets.min()}); labels must be 0..K-1")
        if classes is None:
            classes = [str(c) for c in range(int(targets.max()) + 1)]
        classes = [str(c) for c in classes]
        if targets.max() >= len(classes):
            raise DatasetError(
                f"{lab_src} has label {int(targets.max())} but only {len(classes)} class names were given; "
                "pass one name per class"
            )
        self.array = arr
        self.targets = targets
        self.classes = classes
        if name is None:
            name = "idx" if isinstance(images, np.ndarray) else Path(img_src).name.split(".")[0]
        self.name = name

    def image(self, i: int) -> torch.Tensor:
        x = torch.from_numpy(self.array[i].astype(np.float32)).div_(255.0)
        return x.permute(2, 0, 1).contiguous() if self._channels_last else x.unsqueeze(0)

    def images_tensor(self, indices: Sequence[int] | np.ndarray | slice | None = None) -> torch.Tensor:
        """The images at ``indices`` (all when None) as one float32 tensor ``[B, C, H, W]`` in [0, 1]."""
        sel = self.array if indices is None else self.array[
            indices if isinstance(indices, slice) else np.asarray(indices, dtype=np.int64)
        ]
        x = torch.from_numpy(np.array(sel, dtype=np.float32, copy=True)).div_(255.0)
        return x.permute(0, 3, 1, 2).contiguous() if self._channels_last else x.unsqueeze(1)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        if self.preprocess is not None:
            return super().image_shape
        if self._channels_last:
            n, h, w, c = self.array.shape
            return (c, h, w)
        return (1, *self.array.shape[1:])


def _candidates(root: Path, prefix: str, kind: str) -> list[Path]:
    """File names under which an IDX file is commonly distributed."""
    stems = [f"{prefix}-{kind}", f"{prefix}-{kind.replace('-idx', '.idx')}"]
    return [root / (s + ext) for s in stems for ext in (".gz", "")]


def find_idx_pair(root: str | os.PathLike, split: str = "train") -> tuple[Path, Path]:
    """The (images, labels) IDX files of ``split`` in ``root``, MNIST naming.

    Looks for ``train-images-idx3-ubyte`` / ``train-labels-idx1-ubyte`` (split
    "train") or ``t10k-...`` (split "test"), each plain or ``.gz``.
    """
    if split not in SPLIT_PREFIXES:
        raise DatasetError(
            f"unknown split {split!r}; use one of {', '.join(map(repr, SPLIT_PREFIXES))}."
            + suggest(split, SPLIT_PREFIXES)
        )
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"IDX directory {root} does not exist; {_INSTALL_HINT}")
    prefix = SPLIT_PREFIXES[split]
    found = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        hits = [p for p in _candidates(root, prefix, kind) if p.is_file()]
        if not hits:
            raise DatasetError(
                f"no {prefix}-{kind}[.gz] file in {root}; {_INSTALL_HINT}"
            )
        found.append(hits[0])
    return found[0], found[1]


def find_fashion_mnist() -> str | None:
    """The directory holding Fashion-MNIST's IDX files, or None when it is not installed."""
    root = Path(FASHION_MNIST_ROOT)
    try:
        for split in SPLIT_PREFIXES:
            find_idx_pair(root, split)
    except DatasetError:
        return None
    return str(root)


class FashionMNIST(IDXDataset):
    """Fashion-MNIST (60,000 train / 10,000 test grayscale 28x28 images, 10 classes).

    ``root`` defaults to ``/usr/share/datasets/fashion-mnist``, where the Debian
    package ``dataset-fashion-mnist`` installs the files. Plain and ``.gz``
    IDX files are both accepted.
    """

    def __init__(self, root: str | os.PathLike | None = None, split: str = "train"):
        root = Path(root) if root is not None else Path(FASHION_MNIST_ROOT)
        images, labels = find_idx_pair(root, split)
        log.debug("reading Fashion-MNIST %s from %s and %s", split, images, labels)
        super().__init__(images, labels, classes=FASHION_MNIST_CLASSES, name=f"fashion-mnist-{split}")
        if self.array.shape[1:] != (28, 28):
            raise DatasetError(
                f"{images} holds {list(self.array.shape[1:])} images, not Fashion-MNIST's 28x28; "
                "pass the directory of the real Fashion-MNIST files, or use IDXDataset for other data"
            )
        self.root = str(root)
        self.split = split
