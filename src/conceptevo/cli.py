"""The `conceptevo` command: a thin layer over the Python API."""
from __future__ import annotations

import argparse
import logging
import sys
import time

from . import distributed as ddp
from .errors import ConceptEvoError

log = logging.getLogger("conceptevo")


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose < 0 else logging.DEBUG if verbose > 0 else logging.INFO
    logging.basicConfig(level=level, format="conceptevo: %(message)s", stream=sys.stderr)
    for noisy in ("numba", "matplotlib", "PIL", "umap"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_demo(args) -> int:
    from .demo import run_demo

    t0 = time.perf_counter()
    ws = run_demo(args.out, quick=args.quick, device=args.device, data_dir=args.data, progress=not args.no_progress)
    print(ws.summary())
    print(f"figure: {ws.figures_dir / 'space.png'}")
    print(f"done in {time.perf_counter() - t0:.0f} s")
    return 0


def cmd_run(args) -> int:
    from .config import load_config
    from .pipeline import run_study

    config = load_config(args.config)
    ws = run_study(config, progress=not args.no_progress, trust=args.trust_checkpoint, allow_chance=args.allow_chance)
    if ws is not None:  # under torchrun, only rank 0 returns the workspace
        print(ws.summary())
    return 0


def cmd_train(args) -> int:
    from .data import open_dataset
    from .models import build_model
    from .models.train import TrainConfig, train

    train_set = open_dataset(args.data, args.data_path, split="train")
    test_set = open_dataset(args.data, args.data_path, split="test")
    arch = args.arch
    if args.no_dropout:
        if arch != "vgg_like":
            raise ConceptEvoError("--no-dropout applies to the vgg_like architecture only")
        arch = "vgg_like_nodropout"
    model = build_model(arch, in_channels=int(train_set[0][0].shape[0]), num_classes=len(train_set.classes), width=args.width,
                        seed=args.seed)
    tc = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                     every_steps=args.every_steps, first_epoch_checkpoints=args.first_epoch_checkpoints,
                     train_images=args.train_images, device=args.device)
    from .diagnostics.cli import train_monitor

    monitor = train_monitor(args)
    cks = train(model, train_set, test_set, args.out, tc, progress=not args.no_progress, callbacks=[monitor] if monitor else [])
    if monitor:
        from pathlib import Path

        monitor.save(Path(args.out) / "monitor.json")
        print(monitor.summary())
    for c in cks:
        print(f"{c.tag:>8}  train top-1 {c.metrics['train_top1']:.3f}  test top-1 {c.metrics['test_top1']:.3f}  {c.path}")
    return 0


def cmd_info(args) -> int:
    from .workspace import Workspace

    print(Workspace(args.workspace).summary())
    return 0


def cmd_choose_base(args) -> int:
    from .basechoice import choose_base

    choice = choose_base(args.workspace, candidates=args.candidates, seed=args.seed, device=args.device,
                         trust=args.trust_checkpoint, progress=not args.no_progress)
    print(choice.report())
    if args.json:
        from .io import write_json

        write_json(args.json, choice.to_dict())
    return 0


def cmd_importance(args) -> int:
    from .importance.commands import importance_command

    r = importance_command(args.workspace, args.model, args.tag_from, args.tag_to, args.class_name, top=args.top,
                           images=args.images, seed=args.seed, device=args.device, progress=not args.no_progress)
    if not ddp.is_main():  # under torchrun every rank computes; rank 0 reports
        return 0
    print(f"most important evolutions {args.tag_from} -> {args.tag_to} for class {r['class_name']!r} "
          f"(score = share of the class's images whose logit the evolution raised):")
    print("\n".join(r["importance"].top_lines(args.top)))
    print(f"all scores: {r['csv']}\nfigure: {r['png']}")
    return 0


def cmd_evaluate_importance(args) -> int:
    from .importance.commands import evaluate_command

    r = evaluate_command(args.workspace, args.model, stages=args.stages, classes=args.classes, repeats=args.repeats,
                         images=args.images, seed=args.seed, device=args.device, progress=not args.no_progress)
    if not ddp.is_main():
        return 0
    print(r["markdown"].read_text())  # the table, then one verdict per stage, split and claim
    print(f"table: {r['markdown']}  {r['csv']}\nchart: {r['png']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="conceptevo", description="How the concepts a CNN detects evolve during training (ConceptEvo).")
    p.add_argument("--version", action="version", version=f"conceptevo {__import__('conceptevo').__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="train on Fashion-MNIST, build the unified space, write the pictures")
    d.add_argument("--out", default="demo-out", help="output folder (default: demo-out)")
    d.add_argument("--quick", action="store_true", help="fewer images and epochs: a smoke test under 2 minutes")
    d.add_argument("--data", default=None, help="folder of the Fashion-MNIST IDX files (default: the Debian package's)")
    d.add_argument("--device", default="cpu")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(fn=cmd_demo)

    r = sub.add_parser("run", help="run a study from a TOML config (reuses finished stages)")
    r.add_argument("config")
    r.add_argument("--trust-checkpoint", action="store_true", help="allow checkpoints that need arbitrary code to load")
    r.add_argument("--allow-chance", action="store_true",
                   help="run even when a model's last checkpoint scores at chance on the pool (e.g. an untrained baseline)")
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(fn=cmd_run)

    t = sub.add_parser("train", help="train a built-in architecture and save checkpoints through training")
    t.add_argument("--arch", default="vgg_like", help="vgg_like, vgg_like_nodropout, resnet_like, tv:NAME")
    t.add_argument("--data", default="fashion-mnist", help="fashion-mnist, idx, folder, synthetic")
    t.add_argument("--data-path", default=None)
    t.add_argument("--out", required=True, help="folder for the checkpoints")
    t.add_argument("--epochs", type=float, default=3)
    t.add_argument("--lr", type=float, default=0.05)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--width", type=int, default=16)
    t.add_argument("--no-dropout", action="store_true", help="the VGG-like without dropout")
    t.add_argument("--every-steps", type=int, default=None, help="a checkpoint every N steps (default: fractions of epoch 1, then every epoch)")
    t.add_argument("--first-epoch-checkpoints", type=int, default=6, help="geometric within epoch 1: 6 gives 1/32, 1/16, ..., 1/2, 1")
    t.add_argument("--train-images", type=int, default=None, help="images per epoch (a seeded subset)")
    t.add_argument("--device", default="cpu")
    t.add_argument("--no-progress", action="store_true")
    from .diagnostics.cli import add_commands as diagnostics_commands, add_monitor_arguments

    add_monitor_arguments(t)  # --monitor BASE_WORKSPACE: concept diversity and collapse warnings while training
    t.set_defaults(fn=cmd_train)

    im = sub.add_parser("importance", help="rank the concept evolutions t -> t' that matter for a class (Eqs 5-7)")
    im.add_argument("workspace")
    im.add_argument("--model", required=True)
    im.add_argument("--from", dest="tag_from", required=True, help="checkpoint tag t")
    im.add_argument("--to", dest="tag_to", required=True, help="checkpoint tag t'")
    im.add_argument("--class", dest="class_name", required=True, help="class index or name")
    im.add_argument("--top", type=int, default=10)
    im.add_argument("--images", type=int, default=128, help="sampled images of the class")
    im.add_argument("--seed", type=int, default=0)
    im.add_argument("--device", default="cpu")
    im.add_argument("--no-progress", action="store_true")
    im.set_defaults(fn=cmd_importance)

    ev = sub.add_parser("evaluate-importance", help="revert important evolutions and measure the accuracy change (Table 1, Fig 6)")
    ev.add_argument("workspace")
    ev.add_argument("--model", required=True)
    ev.add_argument("--stages", default="auto", help="auto (by accuracy milestones 0.25/0.5/0.75) or T:T2,T2:T3")
    ev.add_argument("--classes", default="all", help="all, a number of random classes, or a comma-separated list")
    ev.add_argument("--repeats", type=int, default=5)
    ev.add_argument("--images", type=int, default=128, help="sampled images of each class, from the training and from the test split")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(fn=cmd_evaluate_importance)

    i = sub.add_parser("info", help="summarise a workspace")
    i.add_argument("workspace")
    i.set_defaults(fn=cmd_info)

    cb = sub.add_parser("choose-base", help="build the space on each candidate base checkpoint, measure it, recommend one")
    cb.add_argument("workspace")
    cb.add_argument("--candidates", nargs="+", default=None, metavar="MODEL:TAG",
                    help="checkpoints to compare (default: every model's last checkpoint and the study's base)")
    cb.add_argument("--seed", type=int, default=0)
    cb.add_argument("--device", default="cpu")
    cb.add_argument("--json", default=None, help="also write the measures to this JSON file")
    cb.add_argument("--trust-checkpoint", action="store_true")
    cb.add_argument("--no-progress", action="store_true")
    cb.set_defaults(fn=cmd_choose_base)

    from .explorer.cli import add_commands as explorer_commands

    explorer_commands(sub)  # patches, figures, explore, export
    diagnostics_commands(sub)  # diagnose, evaluate-alignment
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(-1 if args.quiet else args.verbose)
    try:
        return args.fn(args)
    except ConceptEvoError as e:
        print(f"conceptevo: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("conceptevo: interrupted; finished stages are kept, rerun to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
