"""Per-cell probe: a linear classifier of every cell of the frozen C5 and C4 maps, on the mosaics.

Each position of a g x g feature map is one sample: its C-channel vector, labelled with the label of
the image's g x g grid cell (`mosaics.cell_labels`: the quadrant label covering most of the cell;
10 garment classes + empty). At 64 px, C5 of a resnet18 is 2 x 2 (one cell per quadrant: one garment
each) and C4 is 4 x 4. The maps come from the feature cache (`map_c5`, `map_c4`), standardised per
channel with the training cells' statistics (BN-free, as the linear probe). One linear layer (a 1x1
convolution) per map, shared by all positions, trained with cross-entropy. Recipe (ours, documented,
not a published one): SGD, momentum 0.9, lr CELL_LR with a cosine schedule, weight decay CELL_WD,
batch CELL_BATCH cells, CELL_EPOCHS epochs but at least CELL_MIN_STEPS steps (`--epochs N`: exactly N);
seeded. Seconds on a
CPU for 10,000 mosaics.

Scores on the evaluation split's cells: accuracy; mean per-class accuracy (the mean over the classes
present in the evaluation cells of each one's recall: empty cells are ~20%, each garment class ~8%);
the recall per class; and `chance`, the share of the commonest class, what a constant answer scores.
"""
from __future__ import annotations

import numpy as np
import torch

from ..data.mosaics import CELL_CLASSES, cell_labels
from .linear import fit_linear, standardise

CELL_EPOCHS = 20
CELL_LR = 0.1
CELL_WD = 5e-4
CELL_BATCH = 512
CELL_MIN_STEPS = 200
LAYERS = ("c5", "c4")


def cells_of(maps, quadrants) -> tuple[np.ndarray, np.ndarray]:
    """Maps [N, C, g, g] and quadrant labels [N, 4] -> (cell vectors [N*g*g, C], labels [N*g*g])."""
    maps = np.asarray(maps)
    if maps.ndim != 4 or maps.shape[2] != maps.shape[3]:
        raise ValueError(f"feature maps of shape {maps.shape}: need N x C x g x g")
    g = maps.shape[2]
    x = maps.transpose(0, 2, 3, 1).reshape(-1, maps.shape[1]).astype(np.float32)
    return x, cell_labels(quadrants, g).reshape(-1)


def scores(pred: np.ndarray, target: np.ndarray, num_classes: int) -> dict:
    conf = np.bincount(target * num_classes + pred, minlength=num_classes * num_classes).reshape(num_classes, -1)
    support = conf.sum(1)
    present = support > 0
    recall = np.where(present, np.diag(conf) / np.maximum(support, 1), np.nan)
    return {"acc": float(100.0 * np.diag(conf).sum() / max(conf.sum(), 1)),
            "mean_class_acc": float(100.0 * np.nanmean(recall)) if present.any() else float("nan"),
            "class_acc": [None if not np.isfinite(v) else 100.0 * float(v) for v in recall],
            "chance": float(100.0 * support.max() / max(support.sum(), 1))}


def train_cells(train_maps, train_quadrants, val_maps, val_quadrants, *, num_classes: int = len(CELL_CLASSES),
                epochs: int = CELL_EPOCHS, lr: float = CELL_LR, weight_decay: float = CELL_WD,
                batch_size: int = CELL_BATCH, min_steps: int = CELL_MIN_STEPS, seed: int = 0,
                progress: bool = False) -> dict:
    """`epochs`, raised to at least `min_steps` steps (small sets: else the head barely leaves its init)."""
    tx, ty = cells_of(train_maps, train_quadrants)
    vx, vy = cells_of(val_maps, val_quadrants)
    tx, vx = (torch.as_tensor(a) for a in standardise(tx, vx))
    ty_t = torch.as_tensor(ty)
    head, epochs, final_loss = fit_linear(tx, ty_t, num_classes, epochs=epochs, lr=lr, weight_decay=weight_decay,
                                          batch_size=batch_size, min_steps=min_steps, seed=seed, desc="cells probe",
                                          progress=progress)
    with torch.no_grad():
        pred = head(vx).argmax(1).numpy()
        train_acc = float(100.0 * (head(tx).argmax(1) == ty_t).float().mean())
    r = scores(pred, vy, num_classes)
    r.update(grid=int(np.asarray(val_maps).shape[-1]), train_cells=len(tx), eval_cells=len(vx), train_acc=train_acc,
             epochs=epochs, lr=lr, weight_decay=weight_decay, batch_size=batch_size, final_loss=final_loss)
    return r
