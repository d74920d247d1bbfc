"""Figures (matplotlib Figures, no pyplot): the space per checkpoint (Fig 2), neuron groups (Fig 1), one neuron's evolution (Fig 3)."""
from .figures import make_figures, plot_neuron_evolution, plot_neuron_groups
from .space import plot_space_grid

__all__ = ["plot_space_grid", "plot_neuron_groups", "plot_neuron_evolution", "make_figures"]
