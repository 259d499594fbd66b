"""Linear probe on the pooled C5 of the frozen trunk.

`quick` (default off a GPU or for small sets): a linear layer trained on cached features,
standardised with the training set's per-dimension mean/std (BN-free: the frozen trunk's features
have arbitrary scales, standardising makes one recipe fit all). Recipe: SGD, momentum 0.9,
lr QUICK_LR with a cosine schedule, weight decay QUICK_WD, batch QUICK_BATCH, QUICK_EPOCHS
epochs but at least QUICK_MIN_STEPS steps, cross-entropy; seeded.

`imagenet` preset: the seed repo's linear-classification recipe (OpenSelfSup
configs/benchmarks/linear_classification/imagenet/r50_multihead: SGD lr 30, momentum 0.9,
wd 0, batch 256, 100 epochs, lr x0.1 at epochs 60 and 80; RandomResizedCrop + flip; the trunk
frozen in eval mode, every batch forwarded through it). Meant for a GPU.
"""
from __future__ import annotations

import math
import sys
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

QUICK_EPOCHS = 50
QUICK_LR = 0.1
QUICK_WD = 5e-4
QUICK_BATCH = 256
QUICK_MIN_STEPS = 1000   # small sets: epochs raised to at least this many SGD steps (else the head barely leaves its init)
IMAGENET_RECIPE = dict(lr=30.0, momentum=0.9, weight_decay=0.0, batch_size=256, epochs=100, milestones=(60, 80), gamma=0.1)


def standardise(train_x: np.ndarray, *others):
    mean = train_x.mean(0, keepdims=True)
    std = train_x.std(0, keepdims=True) + 1e-6
    return [(x - mean) / std for x in (train_x,) + others]


def fit_linear(tx: torch.Tensor, ty: torch.Tensor, num_classes: int, *, epochs: int, lr: float, weight_decay: float,
               batch_size: int, min_steps: int, seed: int, desc: str, progress: bool = False):
    """A seeded linear head on standardised features [N, C] -> (head, epochs run, last batch's loss).
    SGD, momentum 0.9, cosine lr; `epochs` raised to at least `min_steps` steps (small sets: else the
    head barely leaves its init)."""
    from tqdm import tqdm
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(tx.shape[1], num_classes)
    with torch.no_grad():
        head.weight.normal_(0, 0.01, generator=g)
        head.bias.zero_()
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(tx) / batch_size)
    epochs = max(epochs, math.ceil(min_steps / steps_per_epoch))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch)
    for _ in tqdm(range(epochs), desc=desc, disable=not progress, file=sys.stderr):
        perm = torch.randperm(len(tx), generator=g)
        for s in range(0, len(tx), batch_size):
            b = perm[s:s + batch_size]
            loss = F.cross_entropy(head(tx[b]), ty[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return head, epochs, float(loss.item())


def train_quick(train_x, train_y, test_x, test_y, num_classes: int, *, epochs: int = QUICK_EPOCHS,
                lr: float = QUICK_LR, weight_decay: float = QUICK_WD, batch_size: int = QUICK_BATCH,
                seed: int = 0, progress: bool = False) -> dict:
    """-> {"top1": % on test, "train_top1": %, "epochs": ...}."""
    tx, vx = (torch.as_tensor(a, dtype=torch.float32) for a in standardise(np.asarray(train_x, np.float32),
                                                                           np.asarray(test_x, np.float32)))
    ty, vy = torch.as_tensor(train_y, dtype=torch.long), torch.as_tensor(test_y, dtype=torch.long)
    head, epochs, final_loss = fit_linear(tx, ty, num_classes, epochs=epochs, lr=lr, weight_decay=weight_decay,
                                          batch_size=batch_size, min_steps=QUICK_MIN_STEPS, seed=seed, desc="linear",
                                          progress=progress)
    with torch.no_grad():
        top1 = float(100.0 * (head(vx).argmax(1) == vy).float().mean())
        train_top1 = float(100.0 * (head(tx).argmax(1) == ty).float().mean())
    return {"top1": top1, "train_top1": train_top1, "epochs": epochs, "lr": lr, "weight_decay": weight_decay,
            "batch_size": batch_size, "final_loss": final_loss}


def train_imagenet_preset(trunk, train_split, test_x, test_y, num_classes: int, *, image_size: int,
                          device: torch.device, workers: int = 0, epochs: Optional[int] = None, seed: int = 0,
                          batch_size: Optional[int] = None, progress: bool = True) -> dict:
    """The seed recipe: augmentation, frozen eval-mode trunk, fc on pooled C5. `epochs` other than
    100 scales the lr milestones proportionally. Evaluated on the cached center-crop features."""
    import torchvision.transforms as T
    from torch.utils.data import DataLoader, Dataset
    from tqdm import tqdm

    from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
    r = dict(IMAGENET_RECIPE)
    epochs = epochs or r["epochs"]
    batch_size = batch_size or r["batch_size"]
    milestones = [round(m * epochs / r["epochs"]) for m in r["milestones"]]
    tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    class Aug(Dataset):
        def __len__(self):
            return len(train_split)

        def __getitem__(self, i):
            return tf(train_split.load(i)), int(train_split.labels[i])

    torch.manual_seed(seed)
    cuda = device.type == "cuda"
    trunk = trunk.to(device).eval().requires_grad_(False)
    if cuda:
        trunk = trunk.to(memory_format=torch.channels_last)
    head = nn.Linear(trunk.out_channels, num_classes).to(device)
    nn.init.normal_(head.weight, 0, 0.01)
    nn.init.zeros_(head.bias)
    opt = torch.optim.SGD(head.parameters(), lr=r["lr"], momentum=r["momentum"], weight_decay=r["weight_decay"])
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, r["gamma"])
    loader = DataLoader(Aug(), batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=False,
                        pin_memory=cuda, generator=torch.Generator().manual_seed(seed))
    for _ in tqdm(range(epochs), desc="linear (imagenet preset)", disable=not progress, file=sys.stderr):
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if cuda:
                x = x.to(memory_format=torch.channels_last)
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                f = trunk(x).float().mean(dim=(2, 3))
            loss = F.cross_entropy(head(f), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    with torch.no_grad():
        pred = head(torch.as_tensor(test_x, dtype=torch.float32, device=device)).argmax(1).cpu()
    top1 = float(100.0 * (pred == torch.as_tensor(test_y)).float().mean())
    return {"top1": top1, "epochs": epochs, "milestones": milestones, **{k: v for k, v in r.items() if k not in ("epochs", "milestones")},
            "batch_size": batch_size, "final_loss": float(loss.item())}
