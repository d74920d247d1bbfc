"""Evaluate importance by reverting evolutions (METHOD section 8, paper Sec 4.4, Table 1, Fig 6).

For a class c and a stage t -> t': rank each layer's neurons by the importance
of their evolution, cut the ranking into bins (0-25th percentile = most
important), and run model t' with one bin's activation maps replaced by model
t's on the same input ("reverting" those evolutions). If importance is
meaningful, reverting a more important bin costs more accuracy; reverting a
random 25% of the layer should land between the 25-50 and 50-75 bins.

Replacement goes through forward hooks, so any architecture works.

What is computed once and reused, per batch of evaluation images:

* model t's activations at every evaluated layer: one ``no_grad`` forward,
  shared by all layers and bins;
* model t''s clean output (the "no reversion" accuracy): one forward;
* per layer, the prefix of model t' up to that layer runs once for all bins:
  the layer's hook *forks* the batch into one copy per bin (4 percentile bins
  + random), each with its own channels replaced, and the rest of the network
  runs on the stacked copies (on the CPU in chunks of about
  ``batch / (bins + 1)`` images, so the forked tensors stay about one batch
  in size). Forking is
  checked on the first batch against plain per-bin forwards; where it cannot
  work (a skip connection that joins the forked path with an un-forked tensor
  from before the layer, as inside a residual block) that layer falls back to
  one forward per bin, which recomputes its prefix.
"""
from __future__ import annotations

from .engine import _choose_mode, reversion_counts, revert
from .experiment import _bin_masks, evaluate_reversion
from .tables import (
    LOG_LOSS, METRICS, RANDOM, SPLITS, ReversionResult, bin_labels, combine_reversion, metric_label, plot_reversion_bars,
    reversion_markdown, reversion_table, write_reversion_csv, write_reversion_markdown,
)

__all__ = [
    "SPLITS", "METRICS", "LOG_LOSS", "metric_label", "RANDOM", "bin_labels", "revert", "reversion_counts", "evaluate_reversion", "ReversionResult",
    "combine_reversion", "reversion_table", "write_reversion_csv", "reversion_markdown", "write_reversion_markdown",
    "plot_reversion_bars",
]
