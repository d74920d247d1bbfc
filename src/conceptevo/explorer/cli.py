"""What the commands for seeing concepts do: ``patches``, ``figures``, ``explore``, ``export``.

Their options are defined with every other command's in :func:`conceptevo.cli.build_parser`.
"""
from __future__ import annotations

import logging

from ..errors import ConceptEvoError
from ..exports import export_tensorboard, export_wandb
from ..patches import compute_patches
from ..report import make_figures
from ..workspace import Workspace, WorkspaceLock
from .export import export_site
from .server import serve

log = logging.getLogger("conceptevo")


def _ensure_patches(ws, args) -> None:
    with WorkspaceLock(ws.path):
        written = compute_patches(ws, cell=getattr(args, "cell", None), force=getattr(args, "force", False),
                                  progress=not getattr(args, "no_progress", False), trust=getattr(args, "trust_checkpoint", False))
    if written:
        log.info("example patches written for %d checkpoint(s)", len(written))


def cmd_patches(args) -> int:
    ws = Workspace(args.workspace)
    _ensure_patches(ws, args)
    print(f"example patches: {ws.path / 'patches'}")
    return 0


def cmd_figures(args) -> int:
    ws = Workspace(args.workspace)
    if not args.no_patches:
        _ensure_patches(ws, args)
    with WorkspaceLock(ws.path):
        paths = make_figures(ws, out=args.out, formats=args.formats, neuron=args.neuron, model=args.model,
                             groups=args.groups, k=args.kmeans)
    for p in paths:
        print(p)
    return 0


def cmd_explore(args) -> int:
    serve(Workspace(args.workspace), host=args.host, port=args.port, kmeans=args.kmeans, open_browser=args.open)
    return 0


def cmd_export(args) -> int:
    if not args.wandb and (args.wandb_dir or args.wandb_name or args.wandb_project != "conceptevo"):
        raise ConceptEvoError("--wandb-dir, --wandb-project and --wandb-name go with --wandb; add --wandb")
    if not (args.html or args.tensorboard or args.wandb):
        raise ConceptEvoError("export needs at least one of --html DIR, --tensorboard DIR, --wandb")
    ws = Workspace(args.workspace)
    if args.html:
        index = export_site(ws, args.html, kmeans=args.kmeans)
        print(f"static explorer: {index}  (open it in a browser; no server needed)")
    if args.tensorboard:
        config = export_tensorboard(ws, args.tensorboard)
        print(f"TensorBoard projector: {config.parent}  (tensorboard --logdir {config.parent}, then the Projector tab)")
    if args.wandb:
        run_dir = export_wandb(ws, args.wandb_dir, project=args.wandb_project, name=args.wandb_name)
        print(f"Weights & Biases offline run: {run_dir}  (upload it with: wandb sync {run_dir})")
    return 0
