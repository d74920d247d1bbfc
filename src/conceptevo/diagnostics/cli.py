"""Command-line hooks: ``conceptevo diagnose`` and ``conceptevo evaluate-alignment``.

The main CLI registers them with::

    from .diagnostics.cli import add_commands
    add_commands(sub)          # sub = parser.add_subparsers(...)

and, for ``conceptevo train --monitor BASE_WORKSPACE``, builds the monitor with
:func:`train_monitor` (see its docstring).
"""
from __future__ import annotations

import logging

log = logging.getLogger("conceptevo")


def _milestones(text: str | None):
    if text is None:
        return None
    from ..errors import ConceptEvoError

    try:
        vals = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ConceptEvoError(f"cannot read milestones {text!r}; give accuracies such as 0.25,0.5,0.75") from None
    if len(vals) < 2:
        raise ConceptEvoError("give at least two milestones, e.g. 0.25,0.5,0.75")
    return vals


def cmd_diagnose(args) -> int:
    from .diagnose import diagnose

    diag = diagnose(args.workspace, method=args.estimator, jaccard=args.jaccard, milestones=_milestones(args.milestones),
                    key=args.key, tolerance=args.tolerance, out=args.out)
    print(diag.table())
    for f in diag.files:
        print(f"wrote {f}")
    return 0


def cmd_evaluate_alignment(args) -> int:
    from ..alignment import evaluate_alignment

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


def add_commands(subparsers) -> None:
    """Register ``diagnose`` and ``evaluate-alignment`` on an argparse subparsers object."""
    d = subparsers.add_parser("diagnose", help="concept diversity, evolution speed and collapse per checkpoint and layer, with plots")
    d.add_argument("workspace")
    d.add_argument("--milestones", default=None,
                   help="training accuracies for the distance moved between milestones (default: try 0.25,0.5,0.75)")
    d.add_argument("--key", default="train_top1", help="the accuracy the milestones refer to (default train_top1)")
    d.add_argument("--tolerance", type=float, default=0.15, help="how far a checkpoint's accuracy may be from a milestone")
    d.add_argument("--estimator", default="knn", choices=["knn", "vasicek", "gaussian"], help="differential-entropy estimator")
    d.add_argument("--jaccard", type=float, default=0.5, help="stimulus overlap above which two neurons coincide")
    d.add_argument("--out", default=None, help="output folder (default WORKSPACE/diagnostics)")
    d.set_defaults(fn=cmd_diagnose)

    a = subparsers.add_parser("evaluate-alignment", help="K-means groups, concept coherence, intruder test and CKA, without people")
    a.add_argument("workspace")
    a.add_argument("--groups", type=int, default=None, help="number of K-means groups (default: base neurons / 15)")
    a.add_argument("--tasks", type=int, default=200, help="intruder tasks per setting")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--views", default="auto", choices=["auto", "patches", "images"],
                   help="what the judge sees: example patches (when computed) or stimulus images")
    a.add_argument("--no-cka", action="store_true", help="skip the layer-level CKA comparison (it loads checkpoints)")
    a.add_argument("--cka-images", type=int, default=500)
    a.add_argument("--device", default="cpu")
    a.add_argument("--trust-checkpoint", action="store_true")
    a.add_argument("--out", default=None, help="output folder (default WORKSPACE/alignment)")
    a.set_defaults(fn=cmd_evaluate_alignment)


def add_monitor_arguments(parser) -> None:
    """The options ``conceptevo train`` needs for ``--monitor``."""
    parser.add_argument("--monitor", default=None, metavar="BASE_WORKSPACE",
                        help="watch concept diversity/collapse at each checkpoint on this workspace's base space and warn early")
    parser.add_argument("--monitor-probe", type=int, default=1000, help="probe images for --monitor")


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
    from .monitor import monitor_from_workspace

    return monitor_from_workspace(args.monitor, probe_size=getattr(args, "monitor_probe", 1000),
                                  device=getattr(args, "device", None))


__all__ = ["add_commands", "add_monitor_arguments", "train_monitor", "cmd_diagnose", "cmd_evaluate_alignment"]
