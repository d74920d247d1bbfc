"""The `conceptevo` command: a thin layer over the Python API."""
from __future__ import annotations

import argparse
import importlib
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
    if args.text:
        from .demo_text import run_text_demo

        out = args.out if args.out != "demo-out" else "demo-text-out"
        ws = run_text_demo(out, quick=args.quick, progress=not args.no_progress)
        print(ws.summary())
        print(f"figures: {ws.figures_dir / 'space.png'}, {ws.figures_dir / 'contexts.png'}, {ws.figures_dir / 'contexts.html'}")
        print(f"done in {time.perf_counter() - t0:.0f} s")
        return 0
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
    if args.text:
        return _train_text(args)
    from .data import open_dataset
    from .models import build_model
    from .models.train import TrainConfig, default_optimizer, train

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
                     optimizer=args.optimizer or default_optimizer(arch), weight_decay=args.weight_decay,
                     warmup=args.warmup, every_steps=args.every_steps, first_epoch_checkpoints=args.first_epoch_checkpoints,
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


def _train_text(args) -> int:
    """`conceptevo train --text`: a small language model with checkpoints as step folders (models/train_lm.py)."""
    import torch

    from .models.train_lm import DEMO_DEFAULTS, train_text

    torch.set_num_threads(1)  # measured faster than two threads on a loaded 2-core machine
    arch = "lm_tiny" if args.arch == "vgg_like" else args.arch
    if arch not in ("lm_tiny", "gpt_neox_tiny"):
        raise ConceptEvoError(f"--text trains lm_tiny or gpt_neox_tiny, not {arch!r}")
    opts = {k: v for k, v in (("steps", args.steps), ("every", args.every), ("context", args.context)) if v is not None}
    log_obj = train_text(args.out, corpus=args.corpus, arch=arch, tokenizer=args.tokenizer, seed=args.seed,
                         device=args.device, **opts)
    loss = log_obj["loss"]
    print(f"{len(log_obj['checkpoints'])} checkpoints (steps {log_obj['checkpoints'][0]}..{log_obj['checkpoints'][-1]}) "
          f"in {args.out}; train loss {loss[0]:.3f} -> {loss[-1]:.3f}" if loss else f"checkpoints in {args.out}")
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
    if "occurrences" in r:  # a text study: the class is a target next token
        print(f"most important evolutions {args.tag_from} -> {args.tag_to} for next token {r['class_name']} "
              f"(score = share of {r['importance'].num_images} of its {len(r['occurrences'])} occurrences whose "
              "log-probability the evolution raised):")
    else:
        print(f"most important evolutions {args.tag_from} -> {args.tag_to} for class {r['class_name']!r} "
              f"(score = share of the class's images whose logit the evolution raised):")
    print("\n".join(r["importance"].top_lines(args.top)))
    print(f"all scores: {r['csv']}\nfigure: {r['png']}")
    return 0


def cmd_evaluate_importance(args) -> int:
    from .importance.commands import evaluate_command

    r = evaluate_command(args.workspace, args.model, stages=args.stages, classes=args.classes, repeats=args.repeats,
                         images=args.images, seed=args.seed, device=args.device, progress=not args.no_progress,
                         log_loss=args.log_loss)
    if not ddp.is_main():
        return 0
    print(r["markdown"].read_text())  # the table, then one verdict per stage, split and claim
    print(f"table: {r['markdown']}  {r['csv']}\nchart: {r['png']}")
    return 0


def _handler(module: str, name: str):
    """The command ``name`` of ``conceptevo.MODULE``, imported when the command runs: ``conceptevo --help`` and a
    typo stay fast, as the commands' modules import torch, numba and matplotlib."""
    def run(args) -> int:
        return getattr(importlib.import_module(f"conceptevo.{module}"), name)(args)
    run.__name__ = name
    return run


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


def _option(*args, **kwargs) -> argparse.ArgumentParser:
    """A parent parser holding one option that several commands share (one definition, one help text)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(*args, **kwargs)
    return p


DEVICE = _option("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, mps (default cpu)")
NO_PROGRESS = _option("--no-progress", action="store_true", help="no progress bars")
TRUST = _option("--trust-checkpoint", action="store_true", help="allow checkpoints that need arbitrary code to load")


def build_parser() -> argparse.ArgumentParser:
    """Every ``conceptevo`` command: its options here, its work in the function it names."""
    p = argparse.ArgumentParser(prog="conceptevo", description="How the concepts a CNN detects evolve during training (ConceptEvo).")
    p.add_argument("--version", action="version", version=f"conceptevo {__import__('conceptevo').__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, help: str, fn, parents=()) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, parents=list(parents))
        c.set_defaults(fn=fn)
        return c

    # -- a study: data and checkpoints -> the unified space ----------------------------------------
    d = command("demo", "train on Fashion-MNIST, build the unified space, write the pictures", cmd_demo, [DEVICE, NO_PROGRESS])
    d.add_argument("--out", default="demo-out", help="output folder (default: demo-out)")
    d.add_argument("--quick", action="store_true", help="fewer images and epochs: a smoke test under a minute")
    d.add_argument("--data", default=None, help="folder of the Fashion-MNIST IDX files (default: the Debian package's)")
    d.add_argument("--text", action="store_true", help="the language-model demo: two small LMs on Shakespeare "
                   "(--quick: generated text), output in demo-text-out unless --out")

    r = command("run", "run a study from a TOML config (reuses finished stages)", cmd_run, [TRUST, NO_PROGRESS])
    r.add_argument("config")
    r.add_argument("--allow-chance", action="store_true",
                   help="run even when a model's last checkpoint scores at chance on the pool (e.g. an untrained baseline)")

    t = command("train", "train a built-in architecture and save checkpoints through training", cmd_train, [DEVICE, NO_PROGRESS])
    t.add_argument("--arch", default="vgg_like", help="vgg_like, vgg_like_nodropout, resnet_like, vit_tiny, tv:NAME")
    t.add_argument("--data", default="fashion-mnist", help="fashion-mnist, idx, folder, synthetic")
    t.add_argument("--data-path", default=None)
    t.add_argument("--out", required=True, help="folder for the checkpoints")
    t.add_argument("--epochs", type=float, default=3)
    t.add_argument("--optimizer", choices=["sgd", "adamw"], default=None,
                   help="sgd (momentum 0.9) or adamw, each with a cosine schedule (default: adamw for vit_tiny, sgd otherwise)")
    t.add_argument("--lr", type=float, default=None, help="peak learning rate (default: sgd 0.05, adamw 0.001)")
    t.add_argument("--weight-decay", type=float, default=None,
                   help="default: sgd 5e-4 on every parameter, adamw 0.05 on weight matrices only")
    t.add_argument("--warmup", type=float, default=None,
                   help="fraction of the steps over which the learning rate rises linearly (default: sgd 0, adamw 0.05)")
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--width", type=int, default=16)
    t.add_argument("--no-dropout", action="store_true", help="the VGG-like without dropout")
    t.add_argument("--every-steps", type=int, default=None, help="a checkpoint every N steps (default: fractions of epoch 1, then every epoch)")
    t.add_argument("--first-epoch-checkpoints", type=int, default=6, help="geometric within epoch 1: 6 gives 1/32, 1/16, ..., 1/2, 1")
    t.add_argument("--train-images", type=int, default=None, help="images per epoch (a seeded subset)")
    # language models (conceptevo.models.train_lm)
    t.add_argument("--text", action="store_true", help="train a small language model (lm_tiny, or --arch gpt_neox_tiny) "
                   "on --corpus, checkpoints as step folders")
    t.add_argument("--corpus", default="shakespeare", help="with --text: shakespeare, generated, or text files/a folder")
    t.add_argument("--tokenizer", default="char", help="with --text: char, bpe, a tokenizer JSON or a Hugging Face folder")
    t.add_argument("--steps", type=int, default=None, help="with --text: training steps (default 2000)")
    t.add_argument("--every", type=int, default=None, help="with --text: a checkpoint every N steps after the log-spaced ones (default 200)")
    t.add_argument("--context", type=int, default=None, help="with --text: tokens per window (default 64)")
    # concept diversity and collapse warnings while training (conceptevo.diagnostics.cli.train_monitor)
    t.add_argument("--monitor", default=None, metavar="BASE_WORKSPACE",
                   help="watch concept diversity/collapse at each checkpoint on this workspace's base space and warn early")
    t.add_argument("--monitor-probe", type=int, default=1000, help="probe images for --monitor")

    i = command("info", "summarise a workspace", cmd_info)
    i.add_argument("workspace")

    cb = command("choose-base", "build the space on each candidate base checkpoint, measure it, recommend one", cmd_choose_base,
                 [DEVICE, TRUST, NO_PROGRESS])
    cb.add_argument("workspace")
    cb.add_argument("--candidates", nargs="+", default=None, metavar="MODEL:TAG",
                    help="checkpoints to compare (default: every model's last checkpoint and the study's base)")
    cb.add_argument("--seed", type=int, default=0)
    cb.add_argument("--json", default=None, help="also write the measures to this JSON file")

    # -- importance of concept evolutions -----------------------------------------------------------
    im = command("importance", "rank the concept evolutions t -> t' that matter for a class (Eqs 5-7)", cmd_importance,
                 [DEVICE, NO_PROGRESS])
    im.add_argument("workspace")
    im.add_argument("--model", required=True)
    im.add_argument("--from", dest="tag_from", required=True, help="checkpoint tag t")
    im.add_argument("--to", dest="tag_to", required=True, help="checkpoint tag t'")
    im.add_argument("--class", dest="class_name", required=True,
                    help="class index or name; for a text study a target next token: its text with escapes (\\n, \\t, "
                         "\\\\, \\|, \\,), a name (newline, space, tab, comma, pipe), a class of the vocabulary (upper, "
                         "lower, letter, digit, punct), or several joined by | (\"A|B|C\")")
    im.add_argument("--top", type=int, default=10)
    im.add_argument("--images", type=int, default=128, help="sampled images of the class (text: occurrences of the target)")
    im.add_argument("--seed", type=int, default=0)

    ev = command("evaluate-importance", "revert important evolutions and measure the accuracy change (Table 1, Fig 6)",
                 cmd_evaluate_importance, [DEVICE, NO_PROGRESS])
    ev.add_argument("workspace")
    ev.add_argument("--model", required=True)
    ev.add_argument("--stages", default="auto", help="auto (by accuracy milestones 0.25/0.5/0.75; text: by shares "
                    "0.25/0.5/0.75 of the loss drop) or T:T2,T2:T3")
    ev.add_argument("--classes", default="all", help="all, a number of random classes, or a comma-separated list; "
                    "for a text study, target next tokens separated by commas (as importance --class; a comma "
                    "itself is comma or \\,), e.g. 'newline,upper,comma'")
    ev.add_argument("--repeats", type=int, default=5)
    ev.add_argument("--images", type=int, default=128, help="sampled images of each class, from the training and from "
                    "the test split (text: occurrences of each target; test only with [data] holdout)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--log-loss", action="store_true", help="also measure the change of the true class's log-loss "
                    "(cross-entropy; lower is better); always on for a text study")

    # -- seeing concepts: patches, figures, the explorer, exports -----------------------------------
    pa = command("patches", "example patches (receptive-field crops of the stimuli) for every checkpoint",
                 _handler("explorer.cli", "cmd_patches"), [TRUST, NO_PROGRESS])
    pa.add_argument("workspace")
    pa.add_argument("--cell", type=int, default=None, help="patch size in pixels (default: the largest receptive field, 16..64)")
    pa.add_argument("--force", action="store_true", help="recompute even when up to date")

    f = command("figures", "the space per checkpoint (Fig 2), neuron groups (Fig 1), a neuron's evolution (Fig 3)",
                _handler("explorer.cli", "cmd_figures"), [TRUST, NO_PROGRESS])
    f.add_argument("workspace")
    f.add_argument("--out", default=None, help="folder for the figures (default: WORKSPACE/figures)")
    f.add_argument("--formats", type=_formats, default=("png", "pdf"), help="comma-separated: png, pdf, svg (default png,pdf)")
    f.add_argument("--neuron", default=None, help="neuron id for the evolution figure (default: the one that moved most)")
    f.add_argument("--model", default=None, help="model of that neuron (default: the base model)")
    f.add_argument("--groups", type=int, default=3, help="neuron groups shown in the groups figure")
    f.add_argument("--kmeans", type=int, default=8, help="K-means groups of the unified space")
    f.add_argument("--no-patches", action="store_true", help="do not compute missing example patches first")

    e = command("explore", "interactive explorer in the browser (a local web server)", _handler("explorer.cli", "cmd_explore"))
    e.add_argument("workspace")
    e.add_argument("--port", type=_port, default=8000, help="port (default 8000; 0 picks a free one)")
    e.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    e.add_argument("--kmeans", type=int, default=8, help="K-means groups for the colouring")
    e.add_argument("--open", action="store_true", help="open the page in the default browser")

    x = command("export", "the space for other tools: a static explorer site, TensorBoard's projector, "
                          "a Weights & Biases run (no server, no network)", _handler("explorer.cli", "cmd_export"))
    x.add_argument("workspace")
    x.add_argument("--html", metavar="DIR", help="folder to write the static explorer site into")
    x.add_argument("--kmeans", type=int, default=8, help="K-means groups for the site's colouring")
    x.add_argument("--tensorboard", metavar="DIR", help="folder to write TensorBoard projector embeddings into (needs tensorboard)")
    x.add_argument("--wandb", action="store_true", help="log the units tables and diagnostics curves to an offline W&B run (needs wandb)")
    x.add_argument("--wandb-dir", metavar="DIR", default=None, help="folder for the W&B run (default: the current folder)")
    x.add_argument("--wandb-project", default="conceptevo", metavar="NAME", help="W&B project name (default conceptevo)")
    x.add_argument("--wandb-name", default=None, metavar="NAME", help="W&B run name (default: the workspace's folder name)")

    # -- diagnostics and alignment without people ---------------------------------------------------
    dg = command("diagnose", "concept diversity, evolution speed and collapse per checkpoint and layer, with plots",
                 _handler("diagnostics.cli", "cmd_diagnose"))
    dg.add_argument("workspace")
    dg.add_argument("--milestones", default=None,
                    help="training accuracies for the distance moved between milestones (default: try 0.25,0.5,0.75)")
    dg.add_argument("--key", default="train_top1", help="the accuracy the milestones refer to (default train_top1)")
    dg.add_argument("--tolerance", type=float, default=0.15, help="how far a checkpoint's accuracy may be from a milestone")
    dg.add_argument("--estimator", default="knn", choices=["knn", "vasicek", "gaussian"], help="differential-entropy estimator")
    dg.add_argument("--jaccard", type=float, default=0.5, help="stimulus overlap above which two neurons coincide")
    dg.add_argument("--out", default=None, help="output folder (default WORKSPACE/diagnostics)")

    a = command("evaluate-alignment", "K-means groups, concept coherence, intruder test and CKA, without people",
                _handler("diagnostics.cli", "cmd_evaluate_alignment"), [DEVICE, TRUST])
    a.add_argument("workspace")
    a.add_argument("--groups", type=int, default=None, help="number of K-means groups (default: base neurons / 15)")
    a.add_argument("--tasks", type=int, default=200, help="intruder tasks per setting")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--views", default="auto", choices=["auto", "patches", "images", "contexts"],
                   help="what the judge sees: example patches (when computed) or stimulus images; for text "
                        "studies their top contexts")
    a.add_argument("--no-cka", action="store_true", help="skip the layer-level CKA comparison (it loads checkpoints)")
    a.add_argument("--cka-images", type=int, default=500)
    a.add_argument("--out", default=None, help="output folder (default WORKSPACE/alignment)")
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
