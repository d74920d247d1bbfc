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


class StorageError(ConceptEvoError):
    """A write failed for lack of space (or quota); nothing half-written was kept."""


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


def check_device(device) -> str:
    """The device string, or a clear error when it names a GPU this machine does not have."""
    import torch

    name = str(device)
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConceptEvoError(f"device {name!r} was asked for but no CUDA GPU is available here; use --device cpu")
    if name.startswith("mps") and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConceptEvoError(f"device {name!r} was asked for but MPS is not available here; use --device cpu")
    return name
