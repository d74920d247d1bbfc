"""The paper's discoveries (Sec 4.5, METHOD §9) reproduced on Fashion-MNIST, end to end.

1. Train a VGG-like on a fixed subset of Fashion-MNIST: at a sound learning
   rate (0.05, with dropout: the base model), at too-high rates, and at the
   sound rate without dropout. Checkpoints are geometric in epoch 1, then every
   epoch, each with its training / test accuracy.
2. Build one unified space (base: the sound model's last checkpoint): stimuli of
   every checkpoint on a class-balanced image pool, base neuron embedding,
   image embedding, projection of every checkpoint. The result is an ordinary
   conceptevo workspace (``conceptevo diagnose`` / ``evaluate-alignment`` read it).
3. Discovery (a): concept diversity per checkpoint, sound against too-high
   learning rates; and the ConceptMonitor replayed over each run's checkpoints
   (when would it have warned?).
4. Discovery (b): mean distance neurons move between the checkpoints nearest
   accuracy milestones, with against without dropout.
5. Optionally (--alignment): ``evaluate_alignment`` on this workspace and on a
   small ConceptShapes study (known concepts).

Writes ``OUT/discoveries.json``, figures ``OUT/*.png`` and a Markdown section
(``OUT/discoveries.md``), which ``--docs`` copies into docs/results-discoveries.md
between its ``<!-- measured -->`` markers. Only measured numbers are written.

Usage::

    python bench/discoveries.py --out /tmp/disc --device cuda --alignment
    python bench/discoveries.py --quick            # a CPU smoke run (minutes)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from conceptevo.data import open_dataset, sample_pool  # noqa: E402
from conceptevo.errors import ConceptEvoError  # noqa: E402
from conceptevo.io import hash_json, read_json, save_figure, save_npy, write_json  # noqa: E402
from conceptevo.models import build_model, load_checkpoint  # noqa: E402
from conceptevo.models.checkpoints import checkpoint_hash  # noqa: E402
from conceptevo.models.train import TrainConfig, train  # noqa: E402
from conceptevo.workspace import Workspace  # noqa: E402

log = logging.getLogger("discoveries")

PAPER = {
    "diversity_high_lr": {"epoch 3": 0.30, "epoch 12": 0.09, "epoch 13": -1.11, "epoch 14": -1.09},
    "speed": {"0.25->0.5": {"dropout": 0.991, "no dropout": 0.746}, "0.5->0.75": {"dropout": 0.989, "no dropout": 0.657}},
}


@dataclasses.dataclass
class Settings:
    width: int = 16
    epochs: int = 12
    train_images: int = 10000       # a fixed, seeded subset (so that the model without dropout can overfit)
    first_epoch_checkpoints: int = 8
    pool: int = 3000
    k: int = 10
    sound_lr: float = 0.05
    high_lrs: tuple = (0.5, 2.0)
    batch_size: int = 128
    seed: int = 0
    late_milestones: tuple = (0.85, 0.9, 0.95)

    @classmethod
    def quick(cls) -> "Settings":
        return cls(width=4, epochs=2, train_images=1500, first_epoch_checkpoints=4, pool=500,
                   high_lrs=(2.0,), late_milestones=(0.6, 0.7))


def runs(s: Settings) -> list[tuple[str, str, float]]:
    out = [("sound", "vgg_like", s.sound_lr), ("no-dropout", "vgg_like_nodropout", s.sound_lr)]
    out += [(f"lr{lr:g}", "vgg_like", lr) for lr in s.high_lrs]
    return out


# ------------------------------------------------------------------------------------------------
# 1. training
# ------------------------------------------------------------------------------------------------
def train_all(s: Settings, data: dict, root: Path, device: str) -> dict[str, Path]:
    tr_full = open_dataset(data["kind"], data.get("path"), split="train", **data.get("options", {}))
    te = open_dataset(data["kind"], data.get("path"), split="test", **data.get("options", {}))
    subset = sample_pool(tr_full, s.train_images, seed=s.seed)
    out = {}
    for name, arch, lr in runs(s):
        run_dir = root / "runs" / name
        tc = TrainConfig(epochs=s.epochs, lr=lr, batch_size=s.batch_size, seed=s.seed,
                         first_epoch_checkpoints=s.first_epoch_checkpoints, device=device)
        marker = {"config": dataclasses.asdict(tc), "arch": arch, "width": s.width, "train_images": s.train_images, "data": data}
        mpath = run_dir / "run.json"
        if not (mpath.exists() and read_json(mpath) == json.loads(json.dumps(marker))):
            t0 = time.perf_counter()
            model = build_model(arch, in_channels=1, num_classes=10, width=s.width, seed=tc.seed)
            train(model, subset, te, run_dir, tc, progress=False)
            write_json(mpath, marker)
            log.info("trained %s (lr %g) in %.0f s", name, lr, time.perf_counter() - t0)
        out[name] = run_dir
    return out


# ------------------------------------------------------------------------------------------------
# 2. the unified space, as a workspace
# ------------------------------------------------------------------------------------------------
def build_space(s: Settings, data: dict, run_dirs: dict[str, Path], root: Path, device: str) -> Workspace:
    from conceptevo.embedding import embed_images, embed_neurons
    from conceptevo.models import list_checkpoints
    from conceptevo.projection import project
    from conceptevo.stimuli import find_stimuli, top_responses

    ws = Workspace(root / "study", create=True)
    ws.set_config({"data": {**data, "pool": s.pool, "seed": s.seed}})
    full = open_dataset(data["kind"], data.get("path"), split="train", **data.get("options", {}))
    pool = sample_pool(full, s.pool, seed=s.seed)
    arch = {name: a for name, a, _ in runs(s)}
    models, dropped = {}, {}
    t0 = time.perf_counter()
    for name, d in run_dirs.items():
        rows = []
        for c in list_checkpoints(d):
            row = c.to_dict()
            row["sha256"] = checkpoint_hash(c.path)
            stage = f"stimuli/{name}/{row['tag']}"
            key = hash_json([row["sha256"], s.k, s.pool])
            if not ws.is_done(stage, key):
                model = build_model(arch[name], in_channels=1, num_classes=10, width=s.width)
                load_checkpoint(row["path"], model)
                try:
                    st = find_stimuli(model.to(device).eval(), pool, k=s.k, batch_size=1000, device=device,
                                      progress=False, num_images=len(full))
                except ConceptEvoError as e:
                    if "NaN or Inf" not in str(e):
                        raise
                    dropped.setdefault(name, []).append(row["tag"])  # blown up: no stimuli, no place in the space
                    continue
                st.save(ws.stimuli_dir(name, row["tag"]))
                ws.finish(stage, key, {"k": s.k}, neurons=len(st))
            rows.append(row)
        models[name] = {"arch": arch[name], "options": {"width": s.width}, "checkpoints": rows}
    if dropped:
        log.warning("checkpoints with NaN/Inf activations left out of the space: %s", dropped)
    write_json(root / "dropped.json", dropped)
    ws.manifest["models"] = models
    ws.manifest["base"] = {"model": "sound", "tag": models["sound"]["checkpoints"][-1]["tag"]}
    ws.manifest["data"] = {"fingerprint": pool.fingerprint(), "pool": len(pool), "num_images": len(full)}
    ws._flush()
    log.info("stimuli of %d checkpoints: %.0f s", sum(len(i["checkpoints"]) for i in models.values()), time.perf_counter() - t0)
    bm, bt = ws.base
    base_stim = ws.stimuli(bm, bt, mmap=False)
    if not ws.is_done("embedding/neurons", "v1"):
        emb = embed_neurons(base_stim, seed=s.seed, progress=False)
        emb.save(ws.path / "embedding" / "neurons")
        ws.finish("embedding/neurons", "v1", emb.config, epochs_run=emb.epochs_run)
    emb = ws.neuron_embedding()
    if not ws.is_done("embedding/images", "v1"):
        row = models[bm]["checkpoints"][-1]
        model = build_model(arch[bm], in_channels=1, num_classes=10, width=s.width)
        load_checkpoint(row["path"], model)
        resp = top_responses(model.to(device).eval(), pool, base_stim, top=10, batch_size=1000, device=device,
                             progress=False, num_images=len(full))
        save_npy(ws.path / "embedding" / "responses.npy", resp)
        ws.finish("embedding/responses", "v1", {"top_responses": 10})
        img = embed_images(base_stim, emb, num_images=len(full), responses=resp, seed=s.seed)
        img.save(ws.path / "embedding" / "images")
        ws.finish("embedding/images", "v1", {}, rmse=float(img.rmse))
    image_emb = ws.image_embedding()
    for name, info in models.items():
        for row in info["checkpoints"]:
            stage = f"projection/{name}/{row['tag']}"
            if ws.is_done(stage, "v1"):
                continue
            save_npy(ws.projection_path(name, row["tag"]), project(ws.stimuli(name, row["tag"], mmap=False), image_emb).vectors)
            ws.finish(stage, "v1")
    return ws


# ------------------------------------------------------------------------------------------------
# 3-4. the discoveries
# ------------------------------------------------------------------------------------------------
def replay_monitor(ws: Workspace, model_name: str, s: Settings, device: str) -> dict:
    """Run the live ConceptMonitor over a finished run's checkpoints, in training order."""
    from conceptevo.diagnostics import monitor_from_workspace

    from conceptevo.models import list_checkpoints

    mon = monitor_from_workspace(ws.path, probe_size=min(1000, s.pool), k=s.k, device=device)
    info = ws.manifest["models"][model_name]
    run_dir = Path(info["checkpoints"][0]["path"]).parent
    for c in list_checkpoints(run_dir):  # every checkpoint, also any with blown-up weights
        model = build_model(info["arch"], in_channels=1, num_classes=10, width=s.width)
        load_checkpoint(c.path, model)
        mon.check(model.to(device), epoch=c.epoch, step=c.step, tag=c.tag, metrics=c.metrics)
    first = mon.first_warning()
    acc = [(r.tag, r.epoch, r.metrics.get("train_top1")) for r in mon.records]
    peak = max(a for _, _, a in acc)
    # "reaches chance": the first checkpoint at <= 0.15 training top-1 after the run had passed 0.3
    learned = next((i for i, (_, _, a) in enumerate(acc) if a > 0.3), None)
    collapsed = None if learned is None else next(((t, e, a) for t, e, a in acc[learned:] if a <= 0.15), None)
    return {"model": model_name, "warnings": [w.to_dict() for w in mon.warnings],
            "first_warning": None if first is None else {"tag": mon.records[first.check].tag, "epoch": first.epoch,
                                                         "kind": first.kind, "layers": first.layers,
                                                         "train_top1": mon.records[first.check].metrics.get("train_top1")},
            "peak_train_top1": peak, "first_chance": collapsed,
            "diversity": [r.diversity.get("all") for r in mon.records], "tags": [r.tag for r in mon.records]}


def discoveries(ws: Workspace, s: Settings, device: str, out: Path) -> dict:
    from conceptevo.diagnostics import diagnose, milestone_speed
    from conceptevo.errors import ConceptEvoError

    diag = diagnose(ws, out=out / "diagnose")
    res = {"settings": dataclasses.asdict(s), "device": device, "models": {}, "milestones": {}, "monitor": {}}
    for m, rows in diag.checkpoints.items():
        res["models"][m] = [{"tag": c.tag, "epoch": c.epoch, "train_top1": c.metrics.get("train_top1"),
                             "test_top1": c.metrics.get("test_top1"), "diversity": c.diversity.get("all"),
                             "diversity_layers": {k: v for k, v in c.diversity.items() if k != "all"},
                             "collapse": c.collapse.get("all"),
                             "collapse_layers": {k: v for k, v in c.collapse.items() if k != "all"},
                             "moved": c.moved.get("all")} for c in rows]
    for label, ms in (("paper", (0.25, 0.5, 0.75)), ("late", tuple(s.late_milestones))):
        res["milestones"][label] = {}
        for m in ("sound", "no-dropout"):
            try:
                res["milestones"][label][m] = milestone_speed(ws, m, ms, tolerance=0.15)
            except ConceptEvoError as e:
                res["milestones"][label][m] = {"error": str(e)}
    for m in ["sound"] + [f"lr{lr:g}" for lr in s.high_lrs]:
        res["monitor"][m] = replay_monitor(ws, m, s, device)
    return res


# ------------------------------------------------------------------------------------------------
# figures and text
# ------------------------------------------------------------------------------------------------
def figures(res: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    # (a) diversity per checkpoint, sound vs too-high learning rates, with training accuracy
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for i, m in enumerate(["sound"] + [k for k in res["models"] if k.startswith("lr")]):
        rows = res["models"][m]
        x = [max(r["epoch"], 1e-3) for r in rows]
        ax.plot(x, [np.nan if r["diversity"] is None else r["diversity"] for r in rows], "-o", ms=3, color=f"C{i}", label=m)
        ax2.plot(x, [r["train_top1"] for r in rows], "-o", ms=3, color=f"C{i}", label=m)
    ax.set_ylabel("concept diversity (nats)")
    ax.set_title("Concept diversity per checkpoint: sound vs too-high learning rate")
    ax.legend(fontsize=8)
    ax2.set_ylabel("training top-1")
    ax2.set_xlabel("epoch (log scale)")
    ax2.set_xscale("log")
    fig.tight_layout()
    files += [str(p) for p in save_figure(fig, out / "diversity.png", dpi=120)]
    plt.close(fig)
    # (b) distance moved between milestones, dropout vs no dropout
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
    for ax, label in zip(axes, ("paper", "late")):
        stages = res["milestones"][label]
        names, vals = [], {"sound": [], "no-dropout": []}
        ok = all(isinstance(stages.get(m), list) for m in vals)
        if ok:
            for i, st in enumerate(stages["sound"]):
                names.append(f"{st['milestones'][0]:g}->{st['milestones'][1]:g}")
                for m in vals:
                    vals[m].append(stages[m][i]["mean"])
            xs = np.arange(len(names))
            ax.bar(xs - 0.18, vals["sound"], 0.36, label="with dropout")
            ax.bar(xs + 0.18, vals["no-dropout"], 0.36, label="without dropout")
            ax.set_xticks(xs, names)
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "milestones not reached", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"{label} milestones (train top-1)", fontsize=9)
        ax.set_ylabel("mean distance moved")
    fig.tight_layout()
    files += [str(p) for p in save_figure(fig, out / "speed.png", dpi=120)]
    plt.close(fig)
    return files


def _f(x, spec=".3f"):
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def markdown(res: dict) -> str:
    s = res["settings"]
    L = [f"Measured with `bench/discoveries.py` on {res.get('device_name', res['device'])}: VGG-like (width {s['width']}, "
         f"BatchNorm) trained on a fixed class-balanced subset of {s['train_images']} Fashion-MNIST training images for "
         f"{s['epochs']} epochs (SGD, momentum 0.9, cosine schedule, batch {s['batch_size']}, seed {s['seed']}); "
         f"stimuli (k = {s['k']}) on a {s['pool']}-image pool; base = the sound model's last checkpoint; diversity "
         "estimator: Kozachenko-Leonenko (k = 3), nats, averaged over the 30 dimensions.", ""]
    # (a)
    L += ["### (a) Too-high learning rate: concept diversity", "",
          "| model | lr | checkpoint | epoch | train top-1 | test top-1 | diversity | collapsed neurons |", "|---|---|---|---|---|---|---|---|"]
    lrs = {"sound": s["sound_lr"], **{f"lr{lr:g}": lr for lr in s["high_lrs"]}}
    for m, lr in lrs.items():
        for r in res["models"][m]:
            L.append(f"| {m} | {lr:g} | {r['tag']} | {_f(r['epoch'], '.3g')} | {_f(r['train_top1'])} | {_f(r['test_top1'])} | "
                     f"{_f(r['diversity'], '+.3f')} | {_f(r['collapse'], '.0%')} |")
    L += ["", "Paper (VGG16 on ImageNet, lr 0.05 vs a sound 0.01): diversity 0.30 (epoch 3), 0.09 (epoch 12, accuracy "
          "collapsing), -1.11 (epoch 13), -1.09 (epoch 14).", ""]
    L += ["Monitor replayed over each run's checkpoints (default thresholds: a fall of 0.5 nats below the earlier "
          "maximum, or >= 50% of a layer collapsed after a rise of >= 0.25 since its earlier minimum):", "",
          "| run | peak train top-1 | first warning | its train top-1 | first checkpoint at <= 0.15 train top-1 after passing 0.3 |",
          "|---|---|---|---|---|"]
    for m, r in res["monitor"].items():
        fw = r["first_warning"]
        ch = r["first_chance"]
        warn = "none" if fw is None else "{} ({}: {})".format(fw["tag"], fw["kind"], ", ".join(fw["layers"][:4]))
        chance = "never" if ch is None else "{} ({})".format(ch[0], _f(ch[2]))
        L.append(f"| {m} | {_f(r['peak_train_top1'])} | {warn} | {'-' if fw is None else _f(fw['train_top1'])} | {chance} |")
    # (b)
    L += ["", "### (b) Without dropout: distance moved between accuracy milestones", "",
          "| milestones | stage | with dropout | without dropout | paper: with / without |", "|---|---|---|---|---|"]
    for label in ("paper", "late"):
        st = res["milestones"][label]
        if not all(isinstance(st.get(m), list) for m in ("sound", "no-dropout")):
            errs = "; ".join(f"{m}: {st[m]['error']}" for m in ("sound", "no-dropout") if isinstance(st.get(m), dict))
            L.append(f"| {label} | not reached | | | ({errs}) |")
            continue
        for a, b in zip(st["sound"], st["no-dropout"]):
            key = f"{a['milestones'][0]:g}->{a['milestones'][1]:g}"
            paper = PAPER["speed"].get(key)
            ref = "-" if paper is None else "{} / {}".format(paper["dropout"], paper["no dropout"])
            L.append(f"| {label} | {key} ({a['from']}->{a['to']} / {b['from']}->{b['to']}) | {_f(a['mean'])} | {_f(b['mean'])} | {ref} |")
    fin = {m: res["models"][m][-1] for m in ("sound", "no-dropout")}
    L += ["", f"Final accuracies: with dropout train {_f(fin['sound']['train_top1'])} / test {_f(fin['sound']['test_top1'])}; "
          f"without dropout train {_f(fin['no-dropout']['train_top1'])} / test {_f(fin['no-dropout']['test_top1'])}.", ""]
    return "\n".join(L) + "\n"


# ------------------------------------------------------------------------------------------------
def alignment_runs(ws: Workspace, s: Settings, root: Path, device: str, quick: bool) -> dict:
    """evaluate_alignment on the Fashion-MNIST study and on a small ConceptShapes study with known concepts."""
    from conceptevo.alignment import evaluate_alignment

    out = {"fashion-mnist": evaluate_alignment(ws, tasks=200, seed=s.seed, device=device, out=root / "align-fmnist")}
    # ConceptShapes: two architectures, 3 epochs, known concepts
    n = 3000 if quick else 12000
    data = {"kind": "synthetic", "path": None, "options": {"n": n, "size": 32}}
    tr = open_dataset("synthetic", split="train", n=n, size=32)
    te = open_dataset("synthetic", split="test", n=2000, size=32)
    sroot = root / "shapes"
    run_dirs = {}
    for name, arch in (("vgg", "vgg_like"), ("resnet", "resnet_like")):
        d = sroot / "runs" / name
        if not (d / "checkpoints.json").exists():
            tc = TrainConfig(epochs=1 if quick else 3, lr=0.05, seed=s.seed, first_epoch_checkpoints=4, device=device)
            train(build_model(arch, in_channels=3, num_classes=10, width=s.width, seed=tc.seed), tr, te, d, tc, progress=False)
        run_dirs[name] = d
    ss = dataclasses.replace(s, pool=min(3000, n))
    sws = build_space_generic(ss, data, run_dirs, {"vgg": "vgg_like", "resnet": "resnet_like"}, sroot, device, in_ch=3)
    out["concept-shapes"] = evaluate_alignment(sws, tasks=200, seed=s.seed, device=device, out=root / "align-shapes")
    return out


def build_space_generic(s, data, run_dirs, arch, root, device, in_ch):
    """build_space for any models (base: the first model's last checkpoint)."""
    from conceptevo.embedding import embed_images, embed_neurons
    from conceptevo.models import list_checkpoints
    from conceptevo.projection import project
    from conceptevo.stimuli import find_stimuli, top_responses

    ws = Workspace(root / "study", create=True)
    ws.set_config({"data": {**data, "pool": s.pool, "seed": s.seed}})
    full = open_dataset(data["kind"], data.get("path"), split="train", **data.get("options", {}))
    pool = sample_pool(full, s.pool, seed=s.seed)
    models = {}
    for name, d in run_dirs.items():
        rows = [{**c.to_dict(), "sha256": checkpoint_hash(c.path)} for c in list_checkpoints(d)]
        models[name] = {"arch": arch[name], "options": {"width": s.width}, "checkpoints": rows}
    first = next(iter(models))
    ws.manifest.update(models=models, base={"model": first, "tag": models[first]["checkpoints"][-1]["tag"]},
                       data={"fingerprint": pool.fingerprint(), "pool": len(pool), "num_images": len(full)})
    ws._flush()

    def net(name, path):
        m = build_model(arch[name], in_channels=in_ch, num_classes=10, width=s.width)
        load_checkpoint(path, m)
        return m.to(device).eval()

    for name, info in models.items():
        for row in info["checkpoints"]:
            st = find_stimuli(net(name, row["path"]), pool, k=s.k, batch_size=1000, device=device, progress=False,
                              num_images=len(full))
            st.save(ws.stimuli_dir(name, row["tag"]))
            ws.finish(f"stimuli/{name}/{row['tag']}", "v1", {"k": s.k})
    bm, bt = ws.base
    bst = ws.stimuli(bm, bt, mmap=False)
    emb = embed_neurons(bst, seed=s.seed, progress=False)
    emb.save(ws.path / "embedding" / "neurons")
    ws.finish("embedding/neurons", "v1")
    resp = top_responses(net(bm, models[bm]["checkpoints"][-1]["path"]), pool, bst, top=10, batch_size=1000,
                         device=device, progress=False, num_images=len(full))
    img = embed_images(bst, emb, num_images=len(full), responses=resp, seed=s.seed)
    img.save(ws.path / "embedding" / "images")
    ws.finish("embedding/images", "v1", rmse=float(img.rmse))
    for name, info in models.items():
        for row in info["checkpoints"]:
            save_npy(ws.projection_path(name, row["tag"]), project(ws.stimuli(name, row["tag"], mmap=False), img).vectors)
            ws.finish(f"projection/{name}/{row['tag']}", "v1")
    return ws


def update_docs(doc: Path, section: str, marker: str = "measured") -> None:
    """Put ``section`` between the ``<!-- marker -->`` and ``<!-- /marker -->`` lines of ``doc`` (added at the end if absent)."""
    a, b = f"<!-- {marker} -->", f"<!-- /{marker} -->"
    text = doc.read_text() if doc.exists() else f"{a}\n{b}\n"
    if a not in text or b not in text:
        text += f"\n{a}\n{b}\n"
    head, rest = text.split(a, 1)
    _, tail = rest.split(b, 1)
    doc.write_text(f"{head}{a}\n{section}{b}{tail}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="discoveries-out")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data", default=None, help="Fashion-MNIST folder (default: the Debian package's)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--alignment", action="store_true", help="also run evaluate_alignment (Fashion-MNIST and ConceptShapes)")
    p.add_argument("--docs", default=None, help="write the measured section into this Markdown file")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--high-lrs", default=None, help="comma-separated too-high learning rates (default 0.5,2)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("numba", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    s = Settings.quick() if args.quick else Settings()
    if args.width:
        s.width = args.width
    if args.epochs:
        s.epochs = args.epochs
    if args.high_lrs:
        s.high_lrs = tuple(float(x) for x in args.high_lrs.split(","))
    from conceptevo.data import find_fashion_mnist

    root_data = args.data or find_fashion_mnist()
    if not root_data:
        print("Fashion-MNIST not found; give --data", file=sys.stderr)
        return 2
    data = {"kind": "fashion-mnist", "path": str(Path(root_data).resolve()), "options": {}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    run_dirs = train_all(s, data, out, args.device)
    log.info("training done at %.0f s", time.perf_counter() - t0)
    ws = build_space(s, data, run_dirs, out, args.device)
    log.info("unified space done at %.0f s", time.perf_counter() - t0)
    res = discoveries(ws, s, args.device, out)
    res["device_name"] = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU"
    res["seconds"] = {"to_discoveries": time.perf_counter() - t0}
    write_json(out / "discoveries.json", res)
    res["figures"] = figures(res, out)
    md = markdown(res)
    (out / "discoveries.md").write_text(md)
    log.info("discoveries done at %.0f s", time.perf_counter() - t0)
    if args.alignment:
        al = alignment_runs(ws, s, out, args.device, args.quick)
        res["alignment"] = {k: {kk: v[kk] for kk in ("coherence", "intruder", "layers", "notes", "n_groups", "views",
                                                     "known_concepts", "neurons")} for k, v in al.items()}
        write_json(out / "discoveries.json", res)
        log.info("alignment done at %.0f s", time.perf_counter() - t0)
    res["seconds"]["total"] = time.perf_counter() - t0
    write_json(out / "discoveries.json", res)
    if args.docs:
        update_docs(Path(args.docs), md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
