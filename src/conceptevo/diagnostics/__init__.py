"""Watching training through concepts (METHOD §9; paper Sec 4.5).

- :mod:`.entropy`: differential-entropy estimators (Kozachenko-Leonenko by default);
- :mod:`.metrics`: concept diversity, evolution speed (distance moved, also
  between accuracy milestones) and concept collapse, per checkpoint and layer;
- :mod:`.diagnose`: all of them over a workspace, with plots (``conceptevo diagnose``);
- :mod:`.monitor`: :class:`ConceptMonitor`, early warnings while a model trains
  (a plain-loop callback, conceptevo's trainer callback, or a Lightning callback).
"""
from __future__ import annotations

from .diagnose import Diagnosis, diagnose, plot_diagnosis
from .entropy import differential_entropy, gaussian_entropy, mean_entropy
from .metrics import (ALL, CheckpointMetrics, Collapse, Movement, checkpoint_metrics, collapse, distance_moved,
                      diversity, diversity_by_layer, jaccard_matrix, milestone_speed)
from .monitor import ConceptMonitor, ConceptWarning, MonitorRecord, monitor_from_workspace

__all__ = [
    "ALL", "differential_entropy", "mean_entropy", "gaussian_entropy",
    "diversity", "diversity_by_layer", "Movement", "distance_moved", "milestone_speed",
    "Collapse", "collapse", "jaccard_matrix", "CheckpointMetrics", "checkpoint_metrics",
    "Diagnosis", "diagnose", "plot_diagnosis",
    "ConceptMonitor", "ConceptWarning", "MonitorRecord", "monitor_from_workspace",
]
