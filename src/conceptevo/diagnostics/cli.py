"""What ``conceptevo diagnose`` and ``conceptevo evaluate-alignment`` do, and the monitor of
``conceptevo train --monitor BASE_WORKSPACE`` (:func:`train_monitor`).

Their options are defined with every other command's in :func:`conceptevo.cli.build_parser`.
"""
from __future__ import annotations

import logging

from ..alignment import evaluate_alignment
from ..errors import ConceptEvoError
from .diagnose import diagnose
from .monitor import monitor_from_workspace

log = logging.getLogger("conceptevo")


def _milestones(text: str | None):
    if text is None:
        return None

    try:
        vals = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ConceptEvoError(f"cannot read milestones {text!r}; give accuracies such as 0.25,0.5,0.75") from None
    if len(vals) < 2:
        raise ConceptEvoError("give at least two milestones, e.g. 0.25,0.5,0.75")
    return vals


def cmd_diagnose(args) -> int:
    diag = diagnose(args.workspace, method=args.estimator, jaccard=args.jaccard, milestones=_milestones(args.milestones),
                    key=args.key, tolerance=args.tolerance, out=args.out)
    print(diag.table())
    for f in diag.files:
        print(f"wrote {f}")
    return 0


def cmd_evaluate_alignment(args) -> int:
    res = evaluate_alignment(args.workspace, n_groups=args.groups, tasks=args.tasks, seed=args.seed, views=args.views,
                             cka=not args.no_cka, cka_images=args.cka_images, device=args.device, out=args.out,
                             trust=args.trust_checkpoint)
    for r in res["coherence"]:
        print(f"coherence {r['setting']:<14} {r['coherence']:.3f}  (random groups {r['random_mean']:.3f} ± {r['random_std']:.3f}, p={r['p_value']:.3g})")
    for r in res["intruder"]:
        print(f"intruder  {r['setting']:<14} ROC AUC {r['auc']:.3f}  (paper {r['paper_auc']:.2f}; random groups {r['chance_auc']:.3f})")
    for n in res["notes"]:
        print(f"note: {n}")
    for f in res["files"]:
        print(f"wrote {f}")
    return 0


def train_monitor(args):
    """The ConceptMonitor for ``conceptevo train --monitor BASE_WORKSPACE`` (None without --monitor).

    In ``cmd_train``::

        monitor = train_monitor(args)
        cks = train(model, train_set, test_set, args.out, tc, callbacks=[monitor] if monitor else [])
        if monitor:
            monitor.save(Path(args.out) / "monitor.json"); print(monitor.summary())
    """
    if not getattr(args, "monitor", None):
        return None

    return monitor_from_workspace(args.monitor, probe_size=getattr(args, "monitor_probe", 1000),
                                  device=getattr(args, "device", None))


__all__ = ["train_monitor", "cmd_diagnose", "cmd_evaluate_alignment"]
