"""Alignment and meaningfulness of the unified space, measured without people (METHOD §10; paper Sec 4.2-4.3).

- :mod:`.space`: the unified space as one table of neurons; K-means groups;
- :mod:`.coherence`: concept coherence of groups on data with known concepts, against random groups;
- :mod:`.intruder`: the intruder test, judged from pictures only, ROC AUC with chance level;
- :mod:`.cka`: layer-level linear CKA beside the unified space's layer similarity;
- :mod:`.evaluate`: all of it over a workspace (``conceptevo evaluate-alignment``).
"""
from __future__ import annotations

from .cka import LayerComparison, compare_checkpoints, linear_cka, space_similarity_matrix
from .coherence import CoherenceResult, coherence_test, dataset_concepts, dominant_concepts, group_coherence
from .evaluate import PAPER_AUC, alignment_markdown, evaluate_alignment
from .intruder import IntruderResult, description_matrix, intruder_test, judge_task, picture_features
from .space import NeuronTable, kmeans_groups, neuron_table

__all__ = [
    "NeuronTable", "neuron_table", "kmeans_groups",
    "dominant_concepts", "dataset_concepts", "group_coherence", "coherence_test", "CoherenceResult",
    "picture_features", "description_matrix", "judge_task", "intruder_test", "IntruderResult",
    "linear_cka", "space_similarity_matrix", "compare_checkpoints", "LayerComparison",
    "evaluate_alignment", "alignment_markdown", "PAPER_AUC",
]
