"""Errors that name the problem and the fix.

Every error the library raises on purpose derives from :class:`ConceptEvoError`
(a ``ValueError``), so the CLI can print its one-line message instead of a
traceback.
"""
from __future__ import annotations

import difflib
import math


class ConceptEvoError(ValueError):
    """A problem with the user's input, stated with the fix."""


class LayerNotFoundError(ConceptEvoError):
    pass


class CheckpointError(ConceptEvoError):
    pass


class DatasetError(ConceptEvoError):
    pass


class ChanceAccuracyError(ConceptEvoError):
    """A model scores at chance on the study's images: its inputs are probably not what it was trained on."""


class WorkspaceError(ConceptEvoError):
    pass


class DamagedFileError(WorkspaceError):
    """A file conceptevo reads (a workspace array or record) is missing, truncated or not what it should be."""


class FileAccessError(WorkspaceError):
    """A file could not be read for a reason outside its contents: too many open files, permission, a failing disk.

    Not a :class:`DamagedFileError`: the file itself may well be fine, and the
    message says what to change (the open-file limit, the permissions, the disk).
    """


class StorageError(ConceptEvoError):
    """A write failed for lack of space (or quota); nothing half-written was kept."""


class NonFiniteActivationError(ConceptEvoError):
    """A layer produced NaN or Inf activations; ``.layer`` names it."""

    def __init__(self, layer: str):
        self.layer = layer
        super().__init__(f"layer {layer!r} produced NaN or Inf activations; check the checkpoint's weights and the input scaling")

    def __reduce__(self):  # picklable (raised in worker processes too)
        return (type(self), (self.layer,))


class ModelInputError(ConceptEvoError):
    """The study's images cannot go through the model (wrong channels or size)."""

    def __init__(self, image_shape, model_name: str, cause: BaseException | str):
        self.image_shape = [int(s) for s in image_shape]
        self.model_name = model_name
        self.cause = str(cause).splitlines()[0][:160] if str(cause) else type(cause).__name__
        super().__init__(f"images of shape {self.image_shape} cannot go through {model_name} ({self.cause}); "
                         "give images with the channels and size the model was built for")

    def __reduce__(self):
        return (type(self), (self.image_shape, self.model_name, self.cause))


def suggest(name: str, options, n: int = 3) -> str:
    """' Did you mean X?' when a near match exists, else ''."""
    close = difflib.get_close_matches(str(name), [str(o) for o in options], n=n, cutoff=0.5)
    if not close:
        return ""
    return " Did you mean " + " or ".join(repr(c) for c in close) + "?"


def check_positive(name: str, value, integer: bool = False) -> None:
    """Raise a ConceptEvoError naming ``name`` unless value > 0 (and an int if asked)."""
    if integer:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConceptEvoError(f"{name} must be a positive integer, got {value!r}")
    else:
        try:
            value = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ConceptEvoError(f"{name} must be a positive number, got {value!r}") from None
    if not value > 0:
        raise ConceptEvoError(f"{name} must be positive, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConceptEvoError(f"{name} must be a finite number, got {value!r}")


def available_memory() -> int | None:
    """Bytes this process may still allocate (the system's available memory, or the address-space limit
    if lower), or None where it cannot be told."""
    avail = None
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        try:
            import os

            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = None
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
        if limit != resource.RLIM_INFINITY:
            avail = limit if avail is None else min(avail, limit)
    except (ImportError, OSError, ValueError):  # pragma: no cover - not POSIX
        pass
    return avail


def format_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


def check_memory(nbytes: float, what: str, fix: str) -> None:
    """Refuse, before allocating, work estimated to need more memory than is available: say both figures and the fix."""
    avail = available_memory()
    if avail is not None and nbytes > avail:
        raise ConceptEvoError(f"{what} needs about {format_bytes(nbytes)} of memory, more than the {format_bytes(avail)} "
                              f"available here; {fix}")


def check_device(device) -> str:
    """The device string, or a clear error when it names a GPU this machine does not have.

    The one check that a device exists; :func:`conceptevo.hooks.check_model_device` adds the check
    that a model's weights are on it.
    """
    import torch

    name = str(device)
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConceptEvoError(f"device {name!r} was asked for but no CUDA GPU is available here; use --device cpu")
    if name.startswith("mps") and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConceptEvoError(f"device {name!r} was asked for but MPS is not available here; use --device cpu")
    return name
