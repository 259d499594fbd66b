"""Weighted k-NN classification on frozen features (the InstDisc / DINO protocol).

Cosine similarity between L2-normalised features; each of the k nearest training features votes
for its class with weight exp(sim / T). Wu et al. 2018 (InstDisc) and DINO (eval_knn.py) use
k = 20 and T = 0.07; DINO also reports k = 10, 100, 200.
"""
from __future__ import annotations

from typing import Dict, Sequence

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_K = (20,)
TEMPERATURE = 0.07


@torch.no_grad()
def knn_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, k: int, num_classes: int,
                temperature: float = TEMPERATURE, chunk: int = 1024) -> np.ndarray:
    """Predicted class per test row: argmax over classes of sum_{j in top-k} exp(s_j / T) [y_j = c]."""
    bank = F.normalize(torch.as_tensor(train_x, dtype=torch.float32), dim=1)
    labels = torch.as_tensor(train_y, dtype=torch.long)
    k = min(k, len(bank))
    preds = []
    for start in range(0, len(test_x), chunk):
        q = F.normalize(torch.as_tensor(test_x[start:start + chunk], dtype=torch.float32), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(q), num_classes).scatter_add_(1, labels[idx], (sim / temperature).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds).numpy()


def knn_accuracy(train_x, train_y, test_x, test_y, ks: Sequence[int], num_classes: int,
                 temperature: float = TEMPERATURE) -> Dict[int, float]:
    """Top-1 accuracy (%) for each k."""
    test_y = np.asarray(test_y)
    return {int(k): float(100.0 * (knn_predict(train_x, train_y, test_x, k, num_classes, temperature) == test_y).mean())
            for k in ks}
