"""The Figure class of every conceptevo figure: a notebook shows it as a PNG when it is a cell's value."""
from __future__ import annotations

import io

from matplotlib.figure import Figure


class ShownFigure(Figure):
    """A matplotlib ``Figure`` with a ``_repr_png_``: shown inline by Jupyter (and VS Code) even when
    the notebook never ran ``%matplotlib inline`` nor imported pyplot. Otherwise a plain ``Figure``."""

    def _repr_png_(self) -> bytes:
        buf = io.BytesIO()
        self.savefig(buf, format="png", bbox_inches="tight")
        return buf.getvalue()
