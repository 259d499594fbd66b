"""A label-trained trunk for the per-cell probe's calibration: a ResNet trained on the mosaics' cell labels.

    python -m densecl_fast.eval.supervised --data fashion-mnist-mosaics:ROOT --out runs/cells/label_trained.pth

A fresh (seeded) ResNet with a 1x1-conv head on C5 is trained with cross-entropy on every C5 cell's
label (`mosaics.cell_labels` at the C5 grid: at 64 px one cell per quadrant), for `--steps` steps of
`--batch-size` training mosaics drawn at random (no augmentation), with Adam (SGD barely moves a
fresh ResNet in a few hundred steps). Its BN running statistics are then re-estimated as a plain
average over up to BN_IMAGES training mosaics: after a short run the running averages lag far behind
the weights. The trunk is written (atomically) as a torchvision state dict, which `--checkpoint` of
`python -m densecl_fast.eval` reads. It shows what a trunk that knows the classes scores on the probe;
it is a reference, not a result. Bad input: one line `error: ...`, exit status 2.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import atomic_save
from ..data import DataError
from ..data.mosaics import CELL_CLASSES, cell_labels
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..model import ResNetTrunk
from ..usage import Parser, UsageError, run_cli
from ..weights import ARCHS
from .datasets import load_eval_data
from .features import stages

STEPS = 300
BATCH = 64
LR = 2e-3
BN_IMAGES = 512


def images_of(split, image_size: int) -> torch.Tensor:
    """uint8 [N, 3, S, S]: the split's images resized and center-cropped as the eval transform does."""
    import torchvision.transforms as T
    prep = T.Compose([T.Resize(image_size, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
                      T.CenterCrop(image_size)])
    return torch.from_numpy(np.stack([np.asarray(prep(split.load(i)), np.uint8) for i in range(len(split))])
                            ).permute(0, 3, 1, 2).contiguous()


def _normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x.float() / 255.0 - mean) / std


def train_supervised(split, *, arch: str = "resnet18", image_size: int, steps: int = STEPS, batch_size: int = BATCH,
                     lr: float = LR, seed: int = 0, progress: bool = False) -> tuple[ResNetTrunk, dict]:
    """-> (the trained trunk in eval mode, a summary). `split`: a mosaics EvalSplit (with `cells`)."""
    from tqdm import tqdm
    if split.cells is None:
        raise DataError("the label-trained trunk needs the mosaics' cell labels (fashion-mnist-mosaics:ROOT)")
    images = images_of(split, image_size)
    torch.manual_seed(seed)
    trunk = ResNetTrunk(arch)
    with torch.no_grad():
        grid = trunk(_normalise(images[:1])).shape[-1]
    targets = torch.as_tensor(cell_labels(split.cells, grid))
    head = nn.Conv2d(trunk.out_channels, len(CELL_CLASSES), 1)
    opt = torch.optim.Adam([*trunk.parameters(), *head.parameters()], lr=lr)
    g = torch.Generator().manual_seed(seed)
    trunk.train()
    t0, losses, correct, seen = time.time(), [], 0, 0
    for _ in tqdm(range(steps), desc="label-trained trunk", disable=not progress, file=sys.stderr):
        b = torch.randint(0, len(images), (batch_size,), generator=g)
        logits = head(stages(trunk, _normalise(images[b]))["c5"])
        loss = F.cross_entropy(logits, targets[b])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        correct += int((logits.argmax(1) == targets[b]).sum())
        seen += targets[b].numel()
    for m in trunk.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # a plain average over the batches below
    with torch.no_grad():
        for s in range(0, min(len(images), BN_IMAGES), batch_size):
            trunk(_normalise(images[s:s + batch_size]))
    tail = losses[-max(1, len(losses) // 10):]
    return trunk.eval(), {"arch": arch, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "grid": grid,
                          "train_images": len(images), "image_size": image_size, "first_loss": losses[0],
                          "final_loss": sum(tail) / len(tail), "train_cell_acc_running": 100.0 * correct / max(seen, 1),
                          "seconds": round(time.time() - t0, 1)}


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m densecl_fast.eval.supervised", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="fashion-mnist-mosaics:ROOT[#train=N,size=S]")
    p.add_argument("--out", required=True, help="the trunk's file (torchvision state dict, .pth)")
    p.add_argument("--arch", default="resnet18", choices=ARCHS)
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--batch-size", type=int, default=BATCH)
    p.add_argument("--lr", type=float, default=LR, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=0, help="init and batch order")
    p.add_argument("--image-size", type=int, help="default: the mosaics' side")
    p.add_argument("--max-train", type=int, default=0, help="first N training mosaics (0 = all)")
    p.add_argument("--data-cache-dir", default="~/.cache/densecl_fast", help="where the mosaics are generated")
    p.add_argument("--no-progress", action="store_true")
    return p


def run(args) -> dict:
    from ..data import mosaics
    spec = mosaics.parse_source(args.data)
    if spec is None:
        raise UsageError(f"--data {args.data}: the label-trained trunk needs fashion-mnist-mosaics:ROOT")
    if args.steps < 1 or args.batch_size < 1 or not args.lr > 0:
        raise UsageError("--steps, --batch-size and --lr must be positive")
    size = args.image_size or spec.size
    if size < 32:
        raise UsageError(f"--image-size {size}: at least 32")
    train, _ = load_eval_data(args.data, task="cells", max_train=args.max_train, data_cache_dir=args.data_cache_dir)
    trunk, info = train_supervised(train, arch=args.arch, image_size=size, steps=args.steps, batch_size=args.batch_size,
                                   lr=args.lr, seed=args.seed, progress=not args.no_progress)
    atomic_save(trunk.state_dict(), args.out)
    return info


def main(argv=None) -> int:
    rc, args = run_cli(lambda: parser().parse_args(argv))
    if rc:
        return rc
    rc, info = run_cli(lambda: run(args), (DataError,))
    if rc:
        return rc
    print(f"label-trained {info['arch']} on {args.data}: {info['steps']} steps of {info['batch_size']}, C5 grid "
          f"{info['grid']}x{info['grid']}, loss {info['first_loss']:.3f} -> {info['final_loss']:.3f}, running train "
          f"cell acc {info['train_cell_acc_running']:.1f}% ({info['seconds']:.0f} s); wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
