"""Train the bundled Fashion-MNIST classifiers and write their weights and accuracies.

Trains every architecture of ``assets/hub/fmnist_nets.py`` on the Fashion-MNIST training part (the
60,000 official training images minus the shipped calibration split, see ``build_data.py``) with
fixed seeds, then measures test accuracy on the shipped test subset and records it in
``assets/hub/models.json``. Weights are saved as ``state_dict``s (load with ``weights_only=True``).

CPU only, single process; about 10-20 minutes per model on 2 cores. Not part of the tests.

Usage::

    python scripts/train_models.py               # all models
    python scripts/train_models.py tiniest --epochs 12
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
HUB = ROOT / "assets" / "hub"
sys.path.insert(0, str(HUB))
sys.path.insert(0, str(ROOT / "scripts"))

from build_data import fashion_mnist_splits  # noqa: E402
from fmnist_nets import ARCHITECTURES  # noqa: E402

EPOCHS = {"tiniest": 12, "resnet_small": 6}


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and random translation by up to 2 pixels (zero padding)."""
    n = x.shape[0]
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    padded = F.pad(x, (2, 2, 2, 2))
    dx, dy = torch.randint(0, 5, (2,), generator=gen).tolist()
    return padded[:, :, dy : dy + 28, dx : dx + 28]


@torch.no_grad()
def accuracy(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, bs: int = 1000) -> float:
    net.eval()
    correct = sum(
        (net(x[i : i + bs]).argmax(1) == y[i : i + bs]).sum().item() for i in range(0, len(x), bs)
    )
    return correct / len(x)


def train(name: str, epochs: int, seed: int = 0, batch_size: int = 128) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    splits = fashion_mnist_splits()
    xtr, ytr = (torch.from_numpy(a) for a in splits["train"])
    xtr = xtr.float().div(255).unsqueeze(1)
    xte, yte = (torch.from_numpy(a) for a in splits["test"])
    xte = xte.float().div(255).unsqueeze(1)
    net = ARCHITECTURES[name]()
    n_params = sum(p.numel() for p in net.parameters())
    steps = epochs * (len(xtr) // batch_size)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        net.train()
        perm = torch.randperm(len(xtr), generator=gen)
        for i in range(len(xtr) // batch_size):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            loss = F.cross_entropy(net(augment(xtr[idx], gen)), ytr[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        acc = accuracy(net, xte, yte)
        print(
            f"{name} epoch {epoch + 1}/{epochs} loss {loss.item():.3f} test acc {acc:.4f} "
            f"({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    net.eval()
    path = HUB / "weights" / f"{name}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return {
        "test_accuracy": round(accuracy(net, xte, yte), 4),
        "n_test": len(xte),
        "params": n_params,
        "epochs": epochs,
        "seed": seed,
        "train_seconds": round(time.perf_counter() - t0),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=list(ARCHITECTURES))
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    np.random.seed(0)
    manifest_path = HUB / "models.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    for name in args.models:
        manifest[name] = train(name, args.epochs or EPOCHS[name])
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
        print(name, manifest[name], flush=True)


if __name__ == "__main__":
    main()
