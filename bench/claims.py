"""Two of the paper's Sec 4.5 claims, measured on CPU over several seeds (docs/results-discoveries.md).

1. **Learn, then collapse** (``--part collapse``). A VGG-like without BatchNorm
   (as VGG16 has none; He-initialised, since PyTorch's default initialisation
   leaves an 8-layer plain ReLU net unable to learn at all), width 8, on a fixed
   6,000-image subset of Fashion-MNIST, SGD with momentum 0.9, batch 64.
   It learns at lr 0.05 for ``--sound-steps`` steps; then the learning rate
   grows by ``--ramp`` per step (x1.005: it doubles every 139 steps) until the
   run has been at chance for a while. Before this ramp was chosen, constant
   rates were tried: 0.05-0.125 learned without collapsing in 1,200 steps,
   >= 0.15 never learned, and a jump from 0.05 to 0.2 collapsed within 25 steps.
   A *control* run of the same seed keeps lr 0.05. A
   :class:`~conceptevo.diagnostics.ConceptMonitor` built on a base space
   (a separate sound run of the same architecture, through the ordinary
   pipeline) checks every ``--every`` steps: concept diversity, collapse,
   warnings; training accuracy is measured on 1,000 fixed training images.
   Reported per seed: when the run's accuracy and its diversity each departed
   from the control's (the same seed, identical until the ramp: more than the
   control's own check-to-check noise below it, at two checks in a row), the
   first warning, and the first check at chance accuracy (<= 0.15 after
   passing 0.5) -- how many checks earlier the monitor warned.
2. **The dropout gap** (``--part dropout``). Per seed, the built-in VGG-like
   (BatchNorm) with and without dropout, width 8, 5 epochs on a fixed
   5,000-image subset, a checkpoint every 5 steps; one study per seed
   (base: the with-dropout model's last checkpoint; the pipeline's defaults);
   the mean distance neurons move between the checkpoints nearest 0.25 -> 0.5
   and 0.5 -> 0.75 training accuracy (``milestone_speed``), divided by the
   accuracy actually gained between those checkpoints (the checkpoints do not
   sit exactly on the milestones). Reported: per seed, and mean +- sd over seeds
   of the ratio without / with dropout.

Writes ``OUT/claims.json``, figures ``OUT/collapse.png``, ``OUT/dropout.png``
and Markdown tables ``OUT/claims.md`` (``--docs FILE`` copies them between the
``<!-- claims -->`` markers of FILE).

Usage::

    python bench/claims.py --out /tmp/claims --seeds 3          # about 30 min on 2 busy CPU cores
    python bench/claims.py --out /tmp/claims --part dropout --seeds 5
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
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from conceptevo.config import (BaseConfig, DataConfig, LayoutConfig, ModelConfig, StimuliConfig,  # noqa: E402
                               StudyConfig)
from conceptevo.data import find_fashion_mnist, open_dataset, sample_pool  # noqa: E402
from conceptevo.data.loader import iter_batches  # noqa: E402
from conceptevo.errors import ConceptEvoError  # noqa: E402
from conceptevo.io import read_json, save_figure, write_json  # noqa: E402
from conceptevo.models import build_model  # noqa: E402
from conceptevo.models.train import TrainConfig, accuracy, train  # noqa: E402
from conceptevo.pipeline import run_study  # noqa: E402

log = logging.getLogger("claims")
CHANCE = 0.15          # "at chance": training top-1 at most this (10 classes)
LEARNED = 0.5          # ... after the run had passed this


@dataclasses.dataclass
class Settings:
    width: int = 8
    batch: int = 64
    train_images: int = 6000
    sound_lr: float = 0.05
    sound_steps: int = 400
    ramp: float = 1.005
    after_chance: int = 100          # steps to keep going once at chance
    max_steps: int = 1400
    every: int = 10                  # monitor check interval (steps)
    base_steps: int = 800            # the separate sound run that defines the monitor's space
    pool: int = 2000
    probe: int = 1000
    # dropout gap
    d_width: int = 8
    d_images: int = 5000
    d_epochs: float = 5
    d_every: int = 5


def he_init(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2.0 / fan_in))
                m.bias.zero_()
    return model


def plain_vgg(s: Settings, seed: int) -> nn.Module:
    return he_init(build_model("vgg_like", in_channels=1, num_classes=10, width=s.width, batchnorm=False, seed=seed), seed)


# ------------------------------------------------------------------------------------------------
# 1. learn, then collapse
# ------------------------------------------------------------------------------------------------
def base_study(s: Settings, data_dir: str, root: Path):
    """A sound run of the plain VGG-like (lr 0.05, cosine) and its study: the monitor's space."""
    run = root / "base-run"
    if not (run / "checkpoints.json").exists():
        tr = open_dataset("fashion-mnist", data_dir, split="train")
        te = open_dataset("fashion-mnist", data_dir, split="test")
        sub = sample_pool(tr, s.train_images, seed=0)
        tc = TrainConfig(epochs=s.base_steps * s.batch / s.train_images, lr=s.sound_lr, batch_size=s.batch, seed=0,
                         first_epoch_checkpoints=1)
        train(plain_vgg(s, 100), sub, te, run, tc, progress=False)
    last = str(run / read_json(run / "checkpoints.json")["checkpoints"][-1]["path"])   # the base: the last checkpoint
    config = StudyConfig(out=str(root / "base-study"), data=DataConfig(kind="fashion-mnist", path=data_dir, pool=s.pool),
                         models=[ModelConfig("plain", "vgg_like", [last], {"width": s.width, "batchnorm": False})],
                         stimuli=StimuliConfig(k=10), layout=LayoutConfig(method="pca")).validate()
    return run_study(config, progress=False)


def collapse_run(s: Settings, data_dir: str, ws_path, seed: int, ramp: bool) -> dict:
    from conceptevo.diagnostics import monitor_from_workspace

    torch.manual_seed(seed)
    tr = open_dataset("fashion-mnist", data_dir, split="train")
    sub = np.sort(np.random.default_rng(seed).choice(len(tr), s.train_images, replace=False))
    ev = sub[np.random.default_rng(seed + 1).choice(len(sub), 1000, replace=False)]
    model = plain_vgg(s, seed)
    opt = torch.optim.SGD(model.parameters(), lr=s.sound_lr, momentum=0.9, weight_decay=5e-4)
    mon = monitor_from_workspace(ws_path, probe_size=s.probe, k=10)
    loss_fn = nn.CrossEntropyLoss()
    step, epoch, lrs, at_chance = 0, 0, [], None
    t0 = time.perf_counter()

    def check():
        acc = accuracy(model, tr, ev)["top1"]
        mon.check(model, epoch=step * s.batch / s.train_images, step=step, tag=f"s{step}",
                  metrics={"train_top1": acc, "lr": opt.param_groups[0]["lr"]})
        model.train()
        return acc

    learned = False
    check()
    while step < s.max_steps:
        for x, y, _ in iter_batches(tr, s.batch, shuffle=True, seed=seed * 1000 + epoch, positions=sub):
            model.train()
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if ramp and step > s.sound_steps:
                for g in opt.param_groups:
                    g["lr"] *= s.ramp
            if step % s.every == 0:
                acc = check()
                learned |= acc > LEARNED
                if learned and acc <= CHANCE and at_chance is None:
                    at_chance = step
            if step >= s.max_steps or (at_chance is not None and step >= at_chance + s.after_chance):
                break
        epoch += 1
        if at_chance is not None and step >= at_chance + s.after_chance:
            break
    recs = mon.records
    return {"seed": seed, "ramp": ramp, "seconds": time.perf_counter() - t0,
            "steps": [r.step for r in recs], "lr": [r.metrics["lr"] for r in recs],
            "train_top1": [r.metrics["train_top1"] for r in recs],
            "diversity": [r.diversity.get("all") for r in recs],
            "collapse": [r.collapse.get("all") for r in recs],
            "warnings": [{"check": w.check, "step": w.step, "kind": w.kind, "layers": w.layers} for w in mon.warnings]}


def departure(steps, values, control_steps, control, start_step) -> tuple[int | None, float]:
    """First check (from start_step) where ``values`` fell below the control run's by more than its noise.

    The two runs are the same seed, identical until the ramp starts, so their difference is the ramp's effect
    plus noise. Noise: the standard deviation of the control's check-to-check changes after start_step (a
    difference of two noisy values). A departure is the first of two consecutive checks where control - values
    exceeds twice that (a blown-up run, whose value is undefined, counts as below). Returns (step, threshold).
    """
    st = np.asarray(steps)
    v = np.asarray([np.nan if x is None else x for x in values], float)
    c = np.asarray([np.nan if x is None else x for x in control], float)
    n = min(len(v), len(c))
    after = np.flatnonzero(st[:n] >= start_step)
    threshold = 2 * float(np.nanstd(np.diff(c[np.asarray(control_steps) >= start_step]), ddof=1))
    assert list(control_steps[:n]) == list(st[:n]), "the two runs must be checked at the same steps"
    below = [(not np.isfinite(v[i])) or (c[i] - v[i] > threshold) for i in after]
    for j in range(len(below) - 1):
        if below[j] and below[j + 1]:
            return int(st[after[j]]), threshold
    return None, threshold


def summarise_collapse(run: dict, s: Settings, control: dict | None = None) -> dict:
    steps, acc = run["steps"], run["train_top1"]
    learned = next((i for i, a in enumerate(acc) if a > LEARNED), None)
    chance = None if learned is None else next((i for i in range(learned, len(acc)) if acc[i] <= CHANCE), None)
    first = run["warnings"][0] if run["warnings"] else None
    out = {"seed": run["seed"], "ramp": run["ramp"], "peak_train_top1": max(acc),
           "first_chance_step": None if chance is None else steps[chance],
           "first_chance_lr": None if chance is None else run["lr"][chance],
           "first_warning_step": None if first is None else first["step"], "first_warning": first}
    if run["ramp"] and control is not None:
        for key, name in (("train_top1", "acc"), ("diversity", "div")):
            out[f"{name}_departure_step"], out[f"{name}_noise"] = departure(steps, run[key], control["steps"], control[key],
                                                                            s.sound_steps)
        d = out["div_departure_step"]
        if d is not None:
            i = steps.index(d)
            out["at_div_departure"] = {"train_top1": acc[i], "control_train_top1": control["train_top1"][i],
                                       "diversity": run["diversity"][i], "control_diversity": control["diversity"][i],
                                       "lr": run["lr"][i]}
    if chance is not None and first is not None:
        out["warning_checks_before_chance"] = chance - first["check"]
        out["warning_train_top1"] = acc[first["check"]]
    return out


def summarise_all(runs: list[dict], s: Settings) -> list[dict]:
    controls = {r["seed"]: r for r in runs if not r["ramp"]}
    return [summarise_collapse(r, s, controls.get(r["seed"])) for r in runs]


# ------------------------------------------------------------------------------------------------
# 2. the dropout gap
# ------------------------------------------------------------------------------------------------
def dropout_seed(s: Settings, data_dir: str, root: Path, seed: int) -> dict:
    from conceptevo.diagnostics import milestone_speed

    tr = open_dataset("fashion-mnist", data_dir, split="train")
    te = open_dataset("fashion-mnist", data_dir, split="test")
    sub = sample_pool(tr, s.d_images, seed=seed)
    models = []
    for name, arch in (("dropout", "vgg_like"), ("no-dropout", "vgg_like_nodropout")):
        d = root / f"seed{seed}" / name
        tc = TrainConfig(epochs=s.d_epochs, lr=0.05, batch_size=128, seed=seed, every_steps=s.d_every)
        if not (d / "checkpoints.json").exists() or read_json(d / "checkpoints.json").get("config") != \
                dataclasses.asdict(tc):
            train(build_model(arch, in_channels=1, num_classes=10, width=s.d_width, seed=seed), sub, te, d, tc,
                  progress=False)
        models.append(ModelConfig(name, arch, str(d), {"width": s.d_width}))
    config = StudyConfig(out=str(root / f"seed{seed}" / "study"),
                         data=DataConfig(kind="fashion-mnist", path=data_dir, pool=s.pool, seed=seed), models=models,
                         base=BaseConfig(model="dropout"), stimuli=StimuliConfig(k=10),
                         layout=LayoutConfig(method="pca")).validate()
    ws = run_study(config, progress=False)
    out = {"seed": seed}
    for name in ("dropout", "no-dropout"):
        try:
            stages = milestone_speed(ws, name, (0.25, 0.5, 0.75), tolerance=0.15)
        except ConceptEvoError as e:  # a milestone the run never reached: reported, left out of the statistics
            return {"seed": seed, "error": f"{name}: {e}"}
        cks = ws.checkpoints(name)
        out[name] = [{"from": st["from"], "to": st["to"], "accuracy": st["accuracy"], "distance": st["mean"],
                      "per_accuracy": st["mean"] / (st["accuracy"][1] - st["accuracy"][0])
                      if st["accuracy"][1] > st["accuracy"][0] else None} for st in stages]
        out[name + "_final"] = {k: cks[-1].metrics[k] for k in ("train_top1", "test_top1")}
    return out


# ------------------------------------------------------------------------------------------------
# figures and text
# ------------------------------------------------------------------------------------------------
def figure_collapse(runs: list[dict], summaries: list[dict], path: Path) -> None:
    """Per seed (rows): accuracy and diversity against the control (left), and their differences from it in units
    of the departure threshold (right): below -1 at two checks in a row = departed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ramped = [(r, m) for r, m in zip(runs, summaries) if r["ramp"]]
    control = {r["seed"]: r for r in runs if not r["ramp"]}
    fig, axes = plt.subplots(len(ramped), 2, figsize=(10, 2.3 * len(ramped) + 0.6), squeeze=False)
    for i, (r, m) in enumerate(ramped):
        c = control[r["seed"]]
        n = len(r["steps"])
        st = np.asarray(r["steps"])
        end = (m["first_chance_step"] or st[-1]) + 40
        keep = (st >= s_default.sound_steps - 150) & (st <= end)
        ax, bx = axes[i]
        div = np.asarray([np.nan if v is None else v for v in r["diversity"]], float)
        cdiv = np.asarray([np.nan if v is None else v for v in c["diversity"][:n]], float)
        ax.plot(st[keep], np.asarray(r["train_top1"])[keep], color="C0", label="train top-1")
        ax.plot(st[keep], np.asarray(c["train_top1"][:n])[keep], color="C0", ls="--", alpha=0.45, label="control")
        ax.set_ylabel(f"seed {r['seed']}\ntraining top-1", color="C0")
        ax.set_ylim(0, 1)
        tw = ax.twinx()
        tw.plot(st[keep], div[keep], color="C3", label="diversity")
        tw.plot(st[keep], cdiv[keep], color="C3", ls="--", alpha=0.45)
        lo = np.nanmin(np.concatenate([div[keep], cdiv[keep]]))
        hi = np.nanmax(np.concatenate([div[keep], cdiv[keep]]))
        tw.set_ylim(max(lo, hi - 0.6) - 0.02, hi + 0.05)          # the collapse itself may fall off the bottom
        tw.set_ylabel("diversity (nats)", color="C3")
        for key, color, series in (("acc_departure_step", "C0", np.asarray(r["train_top1"]) - np.asarray(c["train_top1"][:n])),
                                   ("div_departure_step", "C3", div - cdiv)):
            thr = m[key.replace("departure_step", "noise")]
            z = np.where(np.isfinite(series), series / thr, -3.0)     # a blown-up run counts as far below
            bx.plot(st[keep], np.clip(z[keep], -3, 3), color=color, label=("accuracy" if color == "C0" else "diversity")
                    + " - control")
            if m.get(key) is not None:
                bx.axvline(m[key], color=color, lw=1.5, alpha=0.7)
        bx.axhline(-1, color="grey", lw=0.8)
        bx.set_ylim(-3.2, 3.2)
        bx.set_ylabel("difference /\ndeparture threshold")
        for a in (ax, bx):
            a.axvline(s_default.sound_steps, color="grey", lw=0.8, ls="-")
            if m["first_warning_step"] is not None:
                a.axvline(m["first_warning_step"], color="k", ls=":", lw=1.5)
            if m["first_chance_step"] is not None:
                a.axvline(m["first_chance_step"], color="k", ls="-.", lw=1)
        if i == 0:
            ax.legend(fontsize=7, loc="lower left")
            bx.legend(fontsize=7, loc="lower left")
        if i == len(ramped) - 1:
            ax.set_xlabel("step")
            bx.set_xlabel("step")
    fig.suptitle(f"Learn, then collapse: lr 0.05, then x{s_default.ramp:g} per step from step {s_default.sound_steps} "
                 "(grey), against the same seed at lr 0.05 (dashed).\nDotted: first monitor warning; dash-dot: first "
                 "check at chance; coloured vertical lines (right): the run departs from its control", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def figure_dropout(seeds: list[dict], path: Path) -> None:
    """Distance moved between milestones (the paper's measure) and per accuracy gained: with against without
    dropout, one line per seed (same seed, same data), mean +- sd beside."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(8, 6.2), squeeze=False)
    for row, (key, label) in enumerate((("distance", "mean distance moved"),
                                        ("per_accuracy", "distance per accuracy gained"))):
        for col, stage in enumerate(("0.25 -> 0.5", "0.5 -> 0.75")):
            ax = axes[row, col]
            a = np.array([r["dropout"][col][key] for r in seeds], float)
            b = np.array([r["no-dropout"][col][key] for r in seeds], float)
            for x, y, r in zip(a, b, seeds):
                ax.plot([0, 1], [x, y], "-o", color="grey", alpha=0.6, ms=4)
                ax.annotate(f"seed {r['seed']}", (1, y), xytext=(4, -3), textcoords="offset points", fontsize=6)
            for k, (v, color) in enumerate(((a, "C0"), (b, "C1"))):
                ax.errorbar([k + (-0.15 if k == 0 else 0.3)], [v.mean()], yerr=[v.std(ddof=1) if len(v) > 1 else 0],
                            fmt="s", color=color, capsize=4)
            ax.set_xticks([0, 1], ["with dropout", "without"])
            ax.set_xlim(-0.4, 1.5)
            ax.set_title(f"train top-1 {stage}: without / with = {np.mean(b / a):.2f} ± {np.std(b / a, ddof=1):.2f}",
                         fontsize=8)
            ax.set_ylabel(label, fontsize=8)
    fig.suptitle(f"Dropout gap over {len(seeds)} seeds (lines: one seed; squares: mean ± sd). Paper, distance: "
                 "0.991 / 0.746 and 0.989 / 0.657", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def _f(x, spec=".3f"):
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _ms(values) -> str:
    """mean ± sd over seeds."""
    v = [x for x in values if x is not None]
    return "-" if not v else f"{np.mean(v):.3f} ± {np.std(v, ddof=1):.3f}" if len(v) > 1 else f"{v[0]:.3f}"


def markdown(res: dict) -> str:
    L = []
    if "collapse" in res:
        s = res["settings"]
        L += [f"Measured with `bench/claims.py` (CPU). VGG-like without BatchNorm, width {s['width']}, He-initialised, "
              f"{s['train_images']} fixed Fashion-MNIST training images, batch {s['batch']}, SGD momentum 0.9; lr "
              f"{s['sound_lr']} for {s['sound_steps']} steps, then x{s['ramp']} per step (control: lr {s['sound_lr']} "
              f"throughout); the monitor (default thresholds) checks every {s['every']} steps on a {s['probe']}-image "
              f"probe, in the space of a separate sound run.", "",
              "| seed | peak train top-1 | diversity departs (step; lr) | accuracy departs (step) | first monitor warning "
              "(step, kind: layers) | its train top-1 | first check at chance (step; lr) | warning, checks before chance "
              "| control (lr 0.05): peak train top-1, warnings |", "|---|---|---|---|---|---|---|---|---|"]
        controls = {m["seed"]: m for m in res["collapse"]["summaries"] if not m["ramp"]}
        for m in res["collapse"]["summaries"]:
            if not m["ramp"]:
                continue
            fw, c = m["first_warning"], controls.get(m["seed"], {})
            warn = "none" if fw is None else f"{fw['step']} ({fw['kind']}: {', '.join(fw['layers'][:3])}" + \
                (f" +{len(fw['layers']) - 3})" if len(fw["layers"]) > 3 else ")")
            dep = m.get("at_div_departure")
            div = "-" if dep is None else f"{m['div_departure_step']}; {dep['lr']:.3f}"
            L.append(f"| {m['seed']} | {_f(m['peak_train_top1'])} | {div} | {_f(m.get('acc_departure_step'), 'd')} | "
                     f"{warn} | {_f(m.get('warning_train_top1'))} | {_f(m['first_chance_step'], 'd')}; "
                     f"{_f(m['first_chance_lr'])} | {_f(m.get('warning_checks_before_chance'), 'd')} | "
                     f"{_f(c.get('peak_train_top1'))}, {'none' if c.get('first_warning') is None else c['first_warning']['step']} |")
        L += ["", "A run departs from its control at the first of two consecutive checks where it is below the control by "
              "more than twice the standard deviation of the control's check-to-check changes after the ramp starts "
              "(accuracy: " + ", ".join(f"{m['acc_noise']:.3f}" for m in res["collapse"]["summaries"] if m["ramp"])
              + "; diversity, nats: " + ", ".join(f"{m['div_noise']:.3f}" for m in res["collapse"]["summaries"] if m["ramp"])
              + ", by seed).", ""]
    if "dropout" in res:
        seeds = [r for r in res["dropout"] if "error" not in r]
        L += [f"Seed {r['seed']} left out: {r['error']}" for r in res["dropout"] if "error" in r]
        L += ["| seed | stage | with dropout: checkpoints (acc) | distance | per accuracy | without: checkpoints (acc) | "
              "distance | per accuracy | per-accuracy ratio without / with |", "|---|---|---|---|---|---|---|---|---|"]
        ratios = {0: [], 1: []}
        for r in seeds:
            for i, stage in enumerate(("0.25->0.5", "0.5->0.75")):
                a, b = r["dropout"][i], r["no-dropout"][i]
                ratio = b["per_accuracy"] / a["per_accuracy"] if a["per_accuracy"] and b["per_accuracy"] else None
                if ratio is not None:
                    ratios[i].append(ratio)
                L.append(f"| {r['seed']} | {stage} | {a['from']}->{a['to']} ({a['accuracy'][0]:.2f}->{a['accuracy'][1]:.2f}) | "
                         f"{_f(a['distance'])} | {_f(a['per_accuracy'])} | {b['from']}->{b['to']} "
                         f"({b['accuracy'][0]:.2f}->{b['accuracy'][1]:.2f}) | {_f(b['distance'])} | "
                         f"{_f(b['per_accuracy'])} | {_f(ratio)} |")
        L += ["", "| stage | distance, with dropout | without | distance ratio without / with (seeds < 1) | per accuracy "
              "gained, with dropout | without | ratio without / with (seeds < 1) | paper: distance with / without |",
              "|---|---|---|---|---|---|---|---|"]
        paper = {0: "0.991 / 0.746 (ratio 0.75)", 1: "0.989 / 0.657 (ratio 0.66)"}
        for i, stage in enumerate(("0.25->0.5", "0.5->0.75")):
            a = [r["dropout"][i]["per_accuracy"] for r in seeds]
            b = [r["no-dropout"][i]["per_accuracy"] for r in seeds]
            da = [r["dropout"][i]["distance"] for r in seeds]
            db = [r["no-dropout"][i]["distance"] for r in seeds]
            rd = [y / x for x, y in zip(da, db)]
            rr = ratios[i]
            L.append(f"| {stage} | {_ms(da)} | {_ms(db)} | {_ms(rd)} ({sum(x < 1 for x in rd)} of {len(rd)}) | {_ms(a)} | "
                     f"{_ms(b)} | {_ms(rr)} ({sum(x < 1 for x in rr)} of {len(rr)}) | {paper[i]} |")
        fin = [(r["dropout_final"], r["no-dropout_final"]) for r in seeds]
        L += ["", "Final accuracies (mean over seeds), train / test: with dropout "
              f"{np.mean([a['train_top1'] for a, _ in fin]):.3f} / {np.mean([a['test_top1'] for a, _ in fin]):.3f}; "
              f"without {np.mean([b['train_top1'] for _, b in fin]):.3f} / {np.mean([b['test_top1'] for _, b in fin]):.3f}.", ""]
    return "\n".join(L) + "\n"


s_default = Settings()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="claims-out")
    p.add_argument("--part", choices=("collapse", "dropout", "both"), default="both")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1")
    p.add_argument("--seed-list", default=None, help="these seeds (e.g. 3,4), kept beside earlier results of others")
    p.add_argument("--data", default=None)
    p.add_argument("--docs", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--replot", action="store_true", help="only redo the summaries, figures and tables from OUT/claims.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("numba", "matplotlib", "PIL", "conceptevo"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    data_dir = args.data or find_fashion_mnist()
    if not data_dir:
        print("Fashion-MNIST not found; give --data", file=sys.stderr)
        return 2
    data_dir = str(Path(data_dir).resolve())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    s = s_default
    res_path = out / "claims.json"
    res = read_json(res_path) if res_path.exists() else {}
    settings = dataclasses.asdict(s)
    settings = json.loads(json.dumps(settings))          # as stored (tuples -> lists)
    seed_list = [int(x) for x in args.seed_list.split(",")] if args.seed_list else list(range(args.seeds))
    t0 = time.perf_counter()
    part_settings = {"collapse": {k: v for k, v in settings.items() if not k.startswith("d_")},
                     "dropout": {k: v for k, v in settings.items() if k.startswith("d_") or k == "pool"}}
    for part in ("collapse", "dropout"):   # results of other seeds are kept only if made with the same settings
        if part in res and res.get(f"{part}_settings") != part_settings[part] and not args.replot:
            log.info("%s settings changed since %s was written: its earlier results are dropped", part, res_path)
            del res[part]
    res["settings"] = settings
    if args.replot:
        if "collapse" in res:
            res["collapse"]["summaries"] = summarise_all(res["collapse"]["runs"], s)
            figure_collapse(res["collapse"]["runs"], res["collapse"]["summaries"], out / "collapse.png")
        if "dropout" in res:
            figure_dropout([r for r in res["dropout"] if "error" not in r], out / "dropout.png")
        args.part = "replot"
    if args.part in ("collapse", "both"):
        ws = base_study(s, data_dir, out)
        log.info("base space ready at %.0f s", time.perf_counter() - t0)
        runs = [r for r in res.get("collapse", {}).get("runs", []) if r["seed"] not in seed_list]   # other seeds kept
        for seed in seed_list:
            for ramp in (True, False):
                runs.append(collapse_run(s, data_dir, ws.path, seed, ramp))
                log.info("collapse seed %d ramp %s done at %.0f s", seed, ramp, time.perf_counter() - t0)
        runs.sort(key=lambda r: (r["seed"], not r["ramp"]))
        summaries = summarise_all(runs, s)
        res["collapse"] = {"runs": runs, "summaries": summaries}
        res["collapse_settings"] = part_settings["collapse"]
        write_json(res_path, res)
        figure_collapse(runs, summaries, out / "collapse.png")
    if args.part in ("dropout", "both"):
        seeds = [r for r in res.get("dropout", []) if r["seed"] not in seed_list]
        for seed in seed_list:
            seeds.append(dropout_seed(s, data_dir, out / "dropout", seed))
            log.info("dropout seed %d done at %.0f s", seed, time.perf_counter() - t0)
        seeds.sort(key=lambda r: r["seed"])
        res["dropout"] = seeds
        res["dropout_settings"] = part_settings["dropout"]
        write_json(res_path, res)
        figure_dropout([r for r in seeds if "error" not in r], out / "dropout.png")
    if not args.replot:
        res.setdefault("seconds", {})[args.part] = time.perf_counter() - t0
    write_json(res_path, res)
    md = markdown(res)
    (out / "claims.md").write_text(md)
    if args.docs:
        from discoveries import update_docs

        update_docs(Path(args.docs), md, marker="claims")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
