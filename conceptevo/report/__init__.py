"""Figures (matplotlib, Agg backend)."""
from .space import plot_space_grid

__all__ = ["plot_space_grid"]
