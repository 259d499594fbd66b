"""Weighted k-nearest-neighbour classification (the InstDisc / DINO protocol for SSL features).

Cosine similarity between L2-normalised features; each of the k nearest bank samples votes for its
class with weight exp(similarity / T). T = 0.07 and k = 20 are the usual choices (the seed reports
k = 10/20/100/200 on ImageNet).
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch
import torch.nn.functional as F

DEFAULT_K = 20
TEMPERATURE = 0.07


def knn_predict(bank: torch.Tensor, bank_labels: torch.Tensor, query: torch.Tensor, k: int,
                num_classes: int, temperature: float = TEMPERATURE, chunk: int = 1024) -> torch.Tensor:
    """-> predicted class of every query row. Features need not be normalised (done here)."""
    bank, query = F.normalize(bank.float(), dim=1), F.normalize(query.float(), dim=1)
    k = min(k, len(bank))
    preds = []
    for q in query.split(chunk):
        sim, idx = (q @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(q), num_classes).scatter_add_(1, bank_labels[idx], (sim / temperature).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


def knn_accuracy(bank, bank_labels, query, query_labels, ks: Sequence[int], num_classes: int,
                 temperature: float = TEMPERATURE) -> Dict[int, float]:
    """Top-1 accuracy in percent for each k."""
    return {k: 100.0 * (knn_predict(bank, bank_labels, query, k, num_classes, temperature) == query_labels)
            .float().mean().item() for k in ks}
