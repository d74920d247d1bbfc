"""Images in a folder with one sub-folder per class, read with Pillow."""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import DatasetError
from .base import ImageDataset
from .transforms import as_preprocess

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
#: Pillow modes that hold a single intensity channel (with or without alpha).
GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
#: How many images are opened at construction to choose the channel count and check sizes.
SAMPLE_SIZE = 32

# What Pillow raises on a file it cannot decode.
_READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def _list_images(folder: Path) -> list[Path]:
    """Image files below ``folder`` (recursively, hidden entries skipped), in sorted order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
                found.append(Path(dirpath) / f)
    return found


def _unreadable(path: Path, err: Exception) -> DatasetError:
    return DatasetError(
        f"cannot read image file {path} ({type(err).__name__}: {err}); "
        "replace or delete it, or pass skip_corrupt=True to skip unreadable files"
    )


def _check_file(path: Path) -> bool:
    """True when Pillow can verify *and* decode the file."""
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            im.load()
    except _READ_ERRORS:
        return False
    return True


class ImageFolderDataset(ImageDataset):
    """A dataset of image files laid out as ``root/<class name>/<image>``.

    Class names are the sub-folder names, sorted; images below each class
    folder (recursively) with extension png, jpg, jpeg, bmp, gif or webp (any
    case) belong to it. Other files and hidden entries are ignored.

    Images are converted to RGB (``channels=3``) or grayscale (``channels=1``).
    By default a sample of up to 32 images (evenly spread over the sorted file
    list) is opened: grayscale when all of them have a single-channel Pillow
    mode, RGB otherwise (a warning names ``channels=`` when the sample mixes
    both; :attr:`mixed_modes` is then True). With ``size`` every image
    is resized to ``size x size``; without it all images must share the size of
    the first one (checked on the sample and again whenever an image is read),
    unless ``transform`` resizes them all to one size.

    ``transform``: a callable applied to each image tensor (see
    :mod:`conceptevo.data.transforms`), or a :class:`~conceptevo.data.transforms.Preprocess`
    (resize, crop, mean/std). ``classes`` (names in the model's output order)
    or ``class_to_idx`` (name -> output index) number the classes as the
    model does; by default they are numbered in sorted folder-name order.

    Corrupt files: by default construction only *lists* the files, so it stays
    cheap; a file Pillow cannot decode raises :class:`DatasetError` naming it
    when it is read (a corrupt file in the construction sample is passed over
    there, unless no sampled file is readable). With ``skip_corrupt=True`` construction opens every file,
    verifies and decodes it, leaves out the ones that fail, records their paths
    in :attr:`skipped` and logs a warning with their count.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        size: int | None = None,
        channels: int | None = None,
        skip_corrupt: bool = False,
        transform=None,
        classes=None,
        class_to_idx=None,
    ):
        root = Path(root)
        if not root.exists():
            raise DatasetError(f"image folder {root} does not exist; check the path")
        if not root.is_dir():
            raise DatasetError(f"{root} is a file, not a folder; pass a folder with one sub-folder per class")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
            raise DatasetError(f"size must be a positive integer (pixels), got {size!r}")
        if channels not in (None, 1, 3):
            raise DatasetError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
        preprocess = as_preprocess(transform)

        class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not class_dirs:
            raise DatasetError(
                f"image folder {root} has no class sub-folders; put each class's images in root/<class name>/"
            )
        files: list[Path] = []
        targets: list[int] = []
        self.skipped: list[str] = []
        for c, d in enumerate(class_dirs):
            imgs = _list_images(d)
            if skip_corrupt:
                ok = [_check_file(p) for p in imgs]
                self.skipped += [str(p) for p, good in zip(imgs, ok) if not good]
                imgs = [p for p, good in zip(imgs, ok) if good]
            if not imgs:
                raise DatasetError(
                    f"class folder {d} has no readable images ({', '.join(IMAGE_EXTENSIONS)}); "
                    "add images to it or remove the folder"
                )
            files += imgs
            targets += [c] * len(imgs)
        if self.skipped:
            log.warning("skipped %d unreadable image file(s) under %s", len(self.skipped), root)

        self.root = str(root)
        self.files = files
        self.targets = np.asarray(targets, dtype=np.int64)
        self.classes = [d.name for d in class_dirs]
        self.name = root.name or str(root)
        self.size = size

        picks = np.unique(np.linspace(0, len(files) - 1, num=min(SAMPLE_SIZE, len(files))).astype(int))
        sample = [files[int(i)] for i in picks]
        opened = []
        first_error = None
        for p in sample:
            try:
                with Image.open(p) as im:
                    im.load()
                    opened.append((p, im.mode, im.size))
            except _READ_ERRORS as e:  # left for reading time, per the corrupt-file policy
                first_error = first_error or _unreadable(p, e)
        if not opened:
            raise first_error
        gray = sum(mode in GRAY_MODES for _, mode, _ in opened)
        self.mixed_modes = 0 < gray < len(opened)
        if channels is None:
            channels = 1 if gray == len(opened) else 3
            if self.mixed_modes:
                log.warning("image folder %s mixes grayscale and colour images (%d of %d sampled are grayscale): "
                            "reading all as RGB (3 channels); pass channels=1 to read them as grayscale",
                            root, gray, len(opened))
        self.channels = channels
        self._mode = "L" if channels == 1 else "RGB"
        if size is None and preprocess is not None and preprocess.fixed_size:
            self._hw = None  # sizes may differ: the transform's resize/crop makes them one
        elif size is None:
            first_path, _, first_size = opened[0]
            for p, _, sz in opened[1:]:
                if sz != first_size:
                    raise DatasetError(
                        f"images differ in size ({first_path} is {first_size[0]}x{first_size[1]}, "
                        f"{p} is {sz[0]}x{sz[1]}); pass size=N to resize them all to NxN, or resize=[H, W] / crop=N"
                    )
            self._hw = (first_size[1], first_size[0])
        else:
            self._hw = (size, size)
        self.reorder_classes(classes, class_to_idx)
        self.set_preprocess(preprocess)

    def load(self, i: int) -> np.ndarray:
        """Image ``i`` as a uint8 array ``[H, W, C]`` after conversion and resizing."""
        path = self.files[i]
        try:
            with Image.open(path) as im:
                im = im.convert(self._mode)
                if self.size is not None and im.size != (self.size, self.size):
                    im = im.resize((self.size, self.size), Image.Resampling.BILINEAR)
                arr = np.array(im, dtype=np.uint8)
        except _READ_ERRORS as e:
            raise _unreadable(path, e) from None
        if self._hw is not None and arr.shape[:2] != self._hw:
            raise DatasetError(
                f"image {path} is {arr.shape[1]}x{arr.shape[0]} but the others are "
                f"{self._hw[1]}x{self._hw[0]}; pass size=N to resize them all to NxN"
            )
        return arr.reshape(arr.shape[0], arr.shape[1], self.channels)

    def image(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.load(i)).permute(2, 0, 1).float().div_(255.0).contiguous()

    @property
    def image_shape(self) -> tuple[int, int, int]:
        if self.preprocess is not None or self._hw is None:
            return super().image_shape
        return (self.channels, *self._hw)

    def fingerprint(self) -> str:
        """Hash of the relative file paths, the settings and a sample of image contents."""
        h = hashlib.sha256(super().fingerprint().encode())
        h.update(f"{self.size}/{self.channels}".encode())
        for p in self.files:
            h.update(os.path.relpath(p, self.root).encode())
        return h.hexdigest()[:16]
