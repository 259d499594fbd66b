"""Dense probe: a 1x1-conv (per-pixel linear) head on frozen C4 or C5 maps, mIoU on the val split.

The maps come from the feature cache (float16), standardised per channel with the training
set's statistics (BN-free, as the linear probe). Logits are bilinearly upsampled to the mask
size (`image_size`: masks get the images' resize + center crop, nearest-neighbour) and trained
with cross-entropy, ignore index 255. Recipe (ours, documented, not a published one): SGD,
momentum 0.9, lr DENSE_LR with a cosine schedule, weight decay DENSE_WD, batch DENSE_BATCH,
DENSE_EPOCHS epochs; seeded.

Class balance: where background covers most pixels, plain cross-entropy is minimised by
predicting background everywhere, whatever the features (the probe then scores every trunk
alike). By default (`class_weights="balanced"`) each class's loss is weighted by
(f_median / f_c) ** BALANCE_POWER, f_c its share of the labelled training pixels (median-frequency
balancing, Eigen & Fergus 2015, softened by the square root so that background is not given up
either); a class absent from the training masks gets weight 0. `"none"`: plain cross-entropy.

Scores from the confusion matrix over all val pixels: IoU per class TP / (TP + FP + FN); mIoU
averaged over the classes that occur in the val masks or predictions; foreground mIoU the same
over every class but background (class 0 when it is named "background"), the figure a probe
that predicts background everywhere scores 0 on.
"""
from __future__ import annotations

import math
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T

from .datasets import IGNORE_INDEX, load_mask

DENSE_EPOCHS = 30
DENSE_LR = 0.1
DENSE_WD = 1e-4
DENSE_BATCH = 16
BALANCE_POWER = 0.5
CLASS_WEIGHTS = ("balanced", "none")


def load_masks(split, image_size: int) -> np.ndarray:
    """uint8 [N, S, S]: each mask resized (short side, nearest) and center-cropped like its image."""
    tf = T.Compose([T.Resize(image_size, interpolation=T.InterpolationMode.NEAREST), T.CenterCrop(image_size)])
    return np.stack([np.asarray(tf(load_mask(p)), dtype=np.uint8) for p in split.masks])


def confusion(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore: int = IGNORE_INDEX) -> np.ndarray:
    keep = target != ignore
    idx = target[keep].astype(np.int64) * num_classes + pred[keep].astype(np.int64)
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def miou(conf: np.ndarray) -> tuple[float, np.ndarray]:
    """-> (mean IoU in % over classes present in target or prediction, IoU per class (nan = absent))."""
    tp = np.diag(conf).astype(np.float64)
    denom = conf.sum(0) + conf.sum(1) - tp
    iou = np.where(denom > 0, tp / np.maximum(denom, 1), np.nan)
    return float(100.0 * np.nanmean(iou)), iou


def foreground_miou(iou: np.ndarray, background: int | None = 0) -> float:
    """Mean IoU (%) over the classes other than `background` that occur (nan when none does)."""
    fg = np.delete(iou, background) if background is not None else iou
    fg = fg[np.isfinite(fg)]
    return float(100.0 * fg.mean()) if len(fg) else float("nan")


def balanced_weights(masks: torch.Tensor, num_classes: int, power: float = BALANCE_POWER) -> torch.Tensor:
    """(median share / share of class c) ** power per class over the labelled pixels; 0 for absent classes."""
    counts = torch.bincount(masks[masks != IGNORE_INDEX].flatten(), minlength=num_classes)[:num_classes].double()
    present = counts > 0
    if not present.any():
        raise ValueError("the training masks hold no labelled pixel")
    share = counts / counts.sum()
    w = torch.zeros(num_classes, dtype=torch.float64)
    w[present] = (share[present].median() / share[present]) ** power
    return w.float()


def train_dense(train_maps, train_masks, val_maps, val_masks, num_classes: int, *, epochs: int = DENSE_EPOCHS,
                lr: float = DENSE_LR, weight_decay: float = DENSE_WD, batch_size: int = DENSE_BATCH,
                class_weights: str = "balanced", background: int | None = 0, seed: int = 0, progress: bool = True,
                device: torch.device = torch.device("cpu")) -> dict:
    """`background`: the index of the background class (None: no such class; every class is foreground)."""
    from tqdm import tqdm
    if class_weights not in CLASS_WEIGHTS:
        raise ValueError(f"class_weights={class_weights!r}: use one of {CLASS_WEIGHTS}")
    tm = torch.as_tensor(train_maps).float()
    mean = tm.mean(dim=(0, 2, 3), keepdim=True)
    std = tm.std(dim=(0, 2, 3), keepdim=True) + 1e-6
    norm = lambda m: ((torch.as_tensor(m).float() - mean) / std)
    tm = norm(train_maps)
    ty = torch.as_tensor(train_masks).long()
    bad = ty[(ty != IGNORE_INDEX) & (ty >= num_classes)]
    if len(bad):
        raise ValueError(f"mask value {int(bad[0])} outside 0..{num_classes - 1} and not {IGNORE_INDEX}")
    weight = balanced_weights(ty, num_classes) if class_weights == "balanced" else None
    g = torch.Generator().manual_seed(seed)
    head = nn.Conv2d(tm.shape[1], num_classes, 1)
    with torch.no_grad():
        head.weight.normal_(0, 0.01, generator=g)
        head.bias.zero_()
    head = head.to(device)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * math.ceil(len(tm) / batch_size))
    size = ty.shape[-2:]
    w_dev = None if weight is None else weight.to(device)
    for _ in tqdm(range(epochs), desc="dense probe", disable=not progress, file=sys.stderr):
        perm = torch.randperm(len(tm), generator=g)
        for s in range(0, len(tm), batch_size):
            b = perm[s:s + batch_size]
            logits = F.interpolate(head(tm[b].to(device)), size=size, mode="bilinear", align_corners=False)
            loss = F.cross_entropy(logits, ty[b].to(device), weight=w_dev, ignore_index=IGNORE_INDEX)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    conf = np.zeros((num_classes, num_classes), np.int64)
    vm = torch.as_tensor(val_masks)
    with torch.no_grad():
        for s in range(0, len(val_maps), batch_size):
            x = norm(val_maps[s:s + batch_size]).to(device)
            pred = F.interpolate(head(x), size=vm.shape[-2:], mode="bilinear", align_corners=False).argmax(1)
            conf += confusion(pred.cpu().numpy(), vm[s:s + batch_size].numpy(), num_classes)
    m, iou = miou(conf)
    return {"mIoU": m, "fg_mIoU": foreground_miou(iou, background),
            "iou": [None if not np.isfinite(v) else 100.0 * float(v) for v in iou],
            "pixel_acc": float(100.0 * np.diag(conf).sum() / max(conf.sum(), 1)), "epochs": epochs, "lr": lr,
            "weight_decay": weight_decay, "batch_size": batch_size, "class_weights": class_weights,
            "class_weight_values": None if weight is None else [round(float(v), 6) for v in weight],
            "background_class": background, "final_loss": float(loss.item())}
