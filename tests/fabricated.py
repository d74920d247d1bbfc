"""A small but valid workspace, made fast: real checkpoints and real stimuli, fabricated space.

Two models (a VGG-like and a ResNet-like, width 4) with three checkpoints each
(weights drift from a random start), stimuli found by ``find_stimuli`` on a
pool of generated ConceptShapes images, and random-but-coherent unified
vectors and 2-D layouts (neurons of a layer cluster together; every checkpoint
moves a little). Optionally one importance result. Used by the patch, figure
and explorer tests and by ``bench/bench_explorer.py``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from conceptevo.data import open_dataset, sample_pool
from conceptevo.io import save_npy
from conceptevo.models import build_model
from conceptevo.models.checkpoints import checkpoint_hash, save_checkpoint
from conceptevo.stimuli import find_stimuli
from conceptevo.workspace import Workspace

DATA = {"kind": "synthetic", "path": None, "pool": 120, "seed": 0, "options": {"n": 160, "size": 32}}
MODELS = [("vgg", "vgg_like"), ("resnet", "resnet_like")]
TAGS = [("e0.5", 0.5), ("e1", 1.0), ("e2", 2.0)]
DIM = 8


def fabricate(root, k: int = 5, importance: bool = True, seed: int = 0, data: dict | None = None,
              models=MODELS, tags=TAGS, width: int = 4) -> Workspace:
    """Write a workspace under ``root/study`` (checkpoints under ``root/runs``) and return it."""
    root = Path(root)
    data = dict(data or DATA)
    ws = Workspace(root / "study", create=True)
    ws.set_config({"data": data})
    dataset = open_dataset(data["kind"], data["path"], split="train", **data["options"])
    pool = sample_pool(dataset, data["pool"], seed=data["seed"])
    rng = np.random.default_rng(seed)
    in_ch = int(dataset[0][0].shape[0])
    manifest_models = {}
    stim_cache = {}
    for mi, (name, arch) in enumerate(models):
        torch.manual_seed(seed + mi)
        model = build_model(arch, in_channels=in_ch, num_classes=len(dataset.classes), width=width).eval()
        rows = []
        for ti, (tag, epoch) in enumerate(tags):
            if ti:
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(0.3 * p.std().clamp_min(1e-3) * torch.randn_like(p))
            path = root / "runs" / name / f"{tag}.pt"
            save_checkpoint(path, model, epoch=epoch)
            acc = 0.2 + 0.6 * ti / max(1, len(tags) - 1)
            rows.append({"tag": tag, "path": str(path), "epoch": epoch, "step": None,
                         "metrics": {"train_top1": acc, "test_top1": acc - 0.05}, "sha256": checkpoint_hash(path)})
            stim = find_stimuli(model, pool, k=k, batch_size=64, progress=False, num_images=len(dataset))
            stim.save(ws.stimuli_dir(name, tag))
            ws.finish(f"stimuli/{name}/{tag}", f"stim-{name}-{tag}-{seed}", {"k": k}, neurons=len(stim))
            stim_cache[(name, tag)] = stim
        manifest_models[name] = {"arch": arch, "options": {"width": width}, "checkpoints": rows}
    ws.manifest["models"] = manifest_models
    ws.manifest["base"] = {"model": models[0][0], "tag": tags[-1][0]}
    ws.manifest["data"] = {"fingerprint": "fabricated", "pool": data["pool"], "num_images": len(dataset)}
    ws._flush()

    # unified vectors and layout: a layer's neurons cluster; checkpoints drift
    for name, _ in models:
        stim = stim_cache[(name, tags[0][0])]
        layer_of = np.concatenate([np.full(info.channels, j) for j, info in enumerate(stim.layers)])
        centres = rng.normal(0, 3, size=(len(stim.layers), DIM))
        v = centres[layer_of] + rng.normal(0, 0.7, size=(len(layer_of), DIM))
        for tag, _ in tags:
            v = v + rng.normal(0, 0.5, size=v.shape)
            save_npy(ws.projection_path(name, tag), v.astype(np.float32))
            ws.finish(f"projection/{name}/{tag}", f"proj-{name}-{tag}-{seed}")
            save_npy(ws.layout_path(name, tag), (v[:, :2] * 1.5).astype(np.float32))
    ws.finish("layout", f"layout-{seed}", {"seed": seed})

    if importance:
        from conceptevo.importance import EvolutionImportance

        name = models[0][0]
        stim = stim_cache[(name, tags[-1][0])]
        n = len(stim)
        imp = EvolutionImportance(
            neuron_ids=list(stim.neuron_ids), scores=rng.uniform(0, 1, n).astype(np.float32),
            sensitivities=rng.normal(0, 1, (6, n)).astype(np.float32), image_indices=np.arange(6),
            class_index=1, layers=[i.name for i in stim.layers],
        )
        path = ws.path / "importance" / name / f"{tags[0][0]}__{tags[-1][0]}" / "class-1.npz"
        imp.save(path)
        ws.finish(f"importance/{name}/{tags[0][0]}__{tags[-1][0]}/1", "imp",
                  {"model": name, "from": tags[0][0], "to": tags[-1][0], "class": 1},
                  file=str(path.relative_to(ws.path)))
    return ws


_SHARED: dict[str, Workspace] = {}


def shared(tmp_path_factory, name: str = "full", patches: bool = True, **kwargs) -> Workspace:
    """One fabricated workspace per name and test session (read-only for the tests that share it)."""
    if name not in _SHARED:
        torch.set_num_threads(1)
        ws = fabricate(tmp_path_factory.mktemp(f"ws-{name}"), **kwargs)
        if patches:
            from conceptevo.patches import compute_patches

            compute_patches(ws, progress=False)
        _SHARED[name] = ws
    return _SHARED[name]
