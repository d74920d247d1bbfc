"""Sub-commands for seeing concepts: ``patches``, ``figures``, ``explore``, ``export``.

``conceptevo.cli`` registers them with :func:`add_commands`.
"""
from __future__ import annotations

import argparse
import logging

log = logging.getLogger("conceptevo")


def _formats(text: str) -> tuple[str, ...]:
    out = tuple(f.strip().lower().lstrip(".") for f in text.split(",") if f.strip())
    bad = [f for f in out if f not in ("png", "pdf", "svg")]
    if not out or bad:
        raise argparse.ArgumentTypeError(f"formats must be a comma-separated list of png, pdf, svg; got {text!r}")
    return out


def _port(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port must be an integer, got {text!r}") from None
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 0..65535, got {v}")
    return v


def _ensure_patches(ws, args) -> None:
    from ..patches import compute_patches
    from ..workspace import WorkspaceLock

    with WorkspaceLock(ws.path):
        written = compute_patches(ws, cell=getattr(args, "cell", None), force=getattr(args, "force", False),
                                  progress=not getattr(args, "no_progress", False), trust=getattr(args, "trust_checkpoint", False))
    if written:
        log.info("example patches written for %d checkpoint(s)", len(written))


def cmd_patches(args) -> int:
    from ..workspace import Workspace

    ws = Workspace(args.workspace)
    _ensure_patches(ws, args)
    print(f"example patches: {ws.path / 'patches'}")
    return 0


def cmd_figures(args) -> int:
    from ..report import make_figures
    from ..workspace import Workspace, WorkspaceLock

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
    from ..workspace import Workspace
    from .server import serve

    serve(Workspace(args.workspace), host=args.host, port=args.port, kmeans=args.kmeans, open_browser=args.open)
    return 0


def cmd_export(args) -> int:
    from ..errors import ConceptEvoError
    from ..workspace import Workspace

    if not args.wandb and (args.wandb_dir or args.wandb_name or args.wandb_project != "conceptevo"):
        raise ConceptEvoError("--wandb-dir, --wandb-project and --wandb-name go with --wandb; add --wandb")
    if not (args.html or args.tensorboard or args.wandb):
        raise ConceptEvoError("export needs at least one of --html DIR, --tensorboard DIR, --wandb")
    ws = Workspace(args.workspace)
    if args.html:
        from .export import export_site

        index = export_site(ws, args.html, kmeans=args.kmeans)
        print(f"static explorer: {index}  (open it in a browser; no server needed)")
    if args.tensorboard:
        from ..exports import export_tensorboard

        config = export_tensorboard(ws, args.tensorboard)
        print(f"TensorBoard projector: {config.parent}  (tensorboard --logdir {config.parent}, then the Projector tab)")
    if args.wandb:
        from ..exports import export_wandb

        run_dir = export_wandb(ws, args.wandb_dir, project=args.wandb_project, name=args.wandb_name)
        print(f"Weights & Biases offline run: {run_dir}  (upload it with: wandb sync {run_dir})")
    return 0


def add_commands(subparsers) -> None:
    """Register ``patches``, ``figures``, ``explore`` and ``export`` on an argparse sub-parser set."""
    pa = subparsers.add_parser("patches", help="example patches (receptive-field crops of the stimuli) for every checkpoint")
    pa.add_argument("workspace")
    pa.add_argument("--cell", type=int, default=None, help="patch size in pixels (default: the largest receptive field, 16..64)")
    pa.add_argument("--force", action="store_true", help="recompute even when up to date")
    pa.add_argument("--trust-checkpoint", action="store_true", help="allow checkpoints that need arbitrary code to load")
    pa.add_argument("--no-progress", action="store_true")
    pa.set_defaults(fn=cmd_patches)

    f = subparsers.add_parser("figures", help="the space per checkpoint (Fig 2), neuron groups (Fig 1), a neuron's evolution (Fig 3)")
    f.add_argument("workspace")
    f.add_argument("--out", default=None, help="folder for the figures (default: WORKSPACE/figures)")
    f.add_argument("--formats", type=_formats, default=("png", "pdf"), help="comma-separated: png, pdf, svg (default png,pdf)")
    f.add_argument("--neuron", default=None, help="neuron id for the evolution figure (default: the one that moved most)")
    f.add_argument("--model", default=None, help="model of that neuron (default: the base model)")
    f.add_argument("--groups", type=int, default=3, help="neuron groups shown in the groups figure")
    f.add_argument("--kmeans", type=int, default=8, help="K-means groups of the unified space")
    f.add_argument("--no-patches", action="store_true", help="do not compute missing example patches first")
    f.add_argument("--trust-checkpoint", action="store_true")
    f.add_argument("--no-progress", action="store_true")
    f.set_defaults(fn=cmd_figures)

    e = subparsers.add_parser("explore", help="interactive explorer in the browser (a local web server)")
    e.add_argument("workspace")
    e.add_argument("--port", type=_port, default=8000, help="port (default 8000; 0 picks a free one)")
    e.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    e.add_argument("--kmeans", type=int, default=8, help="K-means groups for the colouring")
    e.add_argument("--open", action="store_true", help="open the page in the default browser")
    e.set_defaults(fn=cmd_explore)

    x = subparsers.add_parser("export", help="the space for other tools: a static explorer site, TensorBoard's projector, "
                                             "a Weights & Biases run (no server, no network)")
    x.add_argument("workspace")
    x.add_argument("--html", metavar="DIR", help="folder to write the static explorer site into")
    x.add_argument("--kmeans", type=int, default=8, help="K-means groups for the site's colouring")
    x.add_argument("--tensorboard", metavar="DIR", help="folder to write TensorBoard projector embeddings into (needs tensorboard)")
    x.add_argument("--wandb", action="store_true", help="log the units tables and diagnostics curves to an offline W&B run (needs wandb)")
    x.add_argument("--wandb-dir", metavar="DIR", default=None, help="folder for the W&B run (default: the current folder)")
    x.add_argument("--wandb-project", default="conceptevo", metavar="NAME", help="W&B project name (default conceptevo)")
    x.add_argument("--wandb-name", default=None, metavar="NAME", help="W&B run name (default: the workspace's folder name)")
    x.set_defaults(fn=cmd_export)
