"""The Figure class of every conceptevo figure (defined in :mod:`conceptevo.figure`, a leaf module that io can import)."""
from ..figure import ShownFigure

__all__ = ["ShownFigure"]
