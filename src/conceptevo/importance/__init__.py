"""Which concept evolutions matter for a class, and the check by reverting them (METHOD sections 7-8).

* :func:`evolution_importance` -- Eqs 5-7: for every neuron, the share of a
  class's images on which its evolution t -> t' raised the class logit.
* :func:`nearest_milestones`, :func:`stages_from_milestones` -- choose stages
  by training-accuracy milestones, as the paper chose 5 -> 21 -> 207.
* :func:`evaluate_reversion` -- revert each importance bin's evolutions and
  measure the accuracy change (Table 1, Fig 6); :func:`revert` does one
  reversion on any model through hooks.
"""
from .milestones import DEFAULT_MILESTONES, nearest_milestones, parse_stages, stages_from_milestones
from .reversion import (
    METRICS,
    RANDOM,
    SPLITS,
    ReversionResult,
    bin_labels,
    combine_reversion,
    evaluate_reversion,
    plot_reversion_bars,
    reversion_counts,
    reversion_markdown,
    reversion_table,
    revert,
    write_reversion_csv,
    write_reversion_markdown,
)
from .scores import EvolutionImportance, batch_sensitivities, evolution_importance
from ._common import ModelMismatchError

__all__ = [
    "EvolutionImportance", "evolution_importance", "batch_sensitivities",
    "nearest_milestones", "stages_from_milestones", "parse_stages", "DEFAULT_MILESTONES",
    "ReversionResult", "evaluate_reversion", "revert", "reversion_counts", "combine_reversion",
    "reversion_table", "reversion_markdown", "write_reversion_csv", "write_reversion_markdown", "plot_reversion_bars",
    "bin_labels", "SPLITS", "METRICS", "RANDOM", "ModelMismatchError",
]
