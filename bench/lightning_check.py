"""Check the ConceptMonitor as a PyTorch Lightning callback (needs lightning; the test machines lack it).

Usage: python bench/lightning_check.py BASE_WORKSPACE [--device cuda]
Trains a VGG-like for 3 short epochs on the workspace's dataset with the monitor
attached as a Lightning callback and checks that it measured once per epoch.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("workspace")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    import lightning.pytorch as pl  # the point of this check

    from conceptevo.data.loader import iter_batches
    from conceptevo.diagnostics import monitor_from_workspace
    from conceptevo.models import build_model
    from conceptevo.workspace import Workspace

    ws = Workspace(args.workspace)
    data = ws.dataset("train")
    mon = monitor_from_workspace(args.workspace, probe_size=500, k=10)

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = build_model("vgg_like", in_channels=1, num_classes=10, width=8)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, _):
            x, y, _ = batch
            loss = torch.nn.functional.cross_entropy(self(x), y)
            self.log("loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    class Batches(torch.utils.data.IterableDataset):
        def __iter__(self):
            it = iter_batches(data, 128, shuffle=True, positions=range(0, 6400))
            yield from it

    loader = torch.utils.data.DataLoader(Batches(), batch_size=None)
    trainer = pl.Trainer(max_epochs=3, accelerator="gpu" if args.device.startswith("cuda") else "cpu", devices=1,
                         callbacks=[mon.as_lightning_callback()], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False)
    trainer.fit(Module(), loader)
    print(mon.summary())
    assert len(mon.records) == 3, len(mon.records)
    assert [r.epoch for r in mon.records] == [1.0, 2.0, 3.0]
    assert all(r.finite for r in mon.records) and "loss" in mon.records[-1].metrics
    print("lightning callback: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
