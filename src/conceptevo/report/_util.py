"""Small checks the report's figure functions share."""
from __future__ import annotations

from typing import Sequence

from ..errors import ConceptEvoError


def _check_formats(formats: Sequence[str]) -> tuple[str, ...]:
    formats = tuple(formats)
    bad = [f for f in formats if f not in ("png", "pdf", "svg")]
    if not formats or bad:
        raise ConceptEvoError(f"formats must be some of png, pdf, svg; got {', '.join(map(repr, bad or formats))}")
    return formats


def _workspace(ws):
    """A :class:`~conceptevo.Workspace`, given one or its folder."""
    from ..workspace import Workspace

    return ws if isinstance(ws, Workspace) else Workspace(ws)
