"""Linear probe on frozen pooled-C5 features (the quick mode: on cached features).

The seed's ImageNet protocol (SGD lr 30, momentum 0.9, wd 0, batch 256, 100 epochs, steps at 60
and 80, RandomResizedCrop + flip through the frozen trunk) needs a GPU and ImageNet; `quick_linear`
is the same kind of classifier trained on the cached centre-crop features, for small data and
CPUs: features standardised with the training split's mean/std (the role BN plays in front of the
seed's head), then full-batch L-BFGS on the cross-entropy with a small L2 penalty. Deterministic
for given features; the result is not tuned on the evaluation split.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

QUICK_ITERS = 200     # L-BFGS iterations: converged on 10 classes x 512-2048 features
QUICK_WEIGHT_DECAY = 1e-4


def quick_linear(train_x, train_y, test_x, test_y, num_classes: int, iters: int = QUICK_ITERS,
                 weight_decay: float = QUICK_WEIGHT_DECAY) -> dict:
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    xtr, xte = (train_x - mean) / std, (test_x - mean) / std
    w = torch.zeros(xtr.shape[1], num_classes, requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xtr @ w + b, train_y) + weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        train_acc = 100.0 * ((xtr @ w + b).argmax(1) == train_y).float().mean().item()
        test_acc = 100.0 * ((xte @ w + b).argmax(1) == test_y).float().mean().item()
    return {"top1": test_acc, "train_top1": train_acc}
