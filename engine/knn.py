"""Weighted k-NN accuracy on frozen features, as in DINO's eval_knn: the forgetting metric.

Features are L2-normalised, similarity is the dot product (cosine), the top-k neighbours vote for
their class with weight exp(sim / T), T = 0.07. All k come from one top-k. Queries go in chunks so
memory stays bounded (chunk x bank similarities) whatever the number of samples; no
torch.distributed here, any number of samples and classes. Several ranks share the queries
(`knn_correct` on each rank's shard against the whole bank, the counts summed): the same accuracy
as one process scoring all of them.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

_SIM_BUDGET = 1 << 24  # similarities held at once (64 MB in fp32)


def knn_accuracy(bank_feats: torch.Tensor, bank_labels: torch.Tensor, query_feats: torch.Tensor,
                 query_labels: torch.Tensor, ks: Sequence[int] = (20,), temperature: float = 0.07,
                 num_classes: int | None = None) -> dict[int, float]:
    """Top-1 accuracy in percent for each k. A k larger than the bank uses the whole bank."""
    if len(query_feats) == 0:
        raise ValueError("k-NN needs at least one bank sample and one query")
    correct = knn_correct(bank_feats, bank_labels, query_feats, query_labels, ks, temperature, num_classes)
    return {k: 100.0 * correct[k] / len(query_feats) for k in ks}


@torch.no_grad()
def knn_correct(bank_feats: torch.Tensor, bank_labels: torch.Tensor, query_feats: torch.Tensor,
                query_labels: torch.Tensor, ks: Sequence[int] = (20,), temperature: float = 0.07,
                num_classes: int | None = None) -> dict[int, int]:
    """How many queries each k classifies correctly (no queries: zeros)."""
    if len(bank_feats) == 0:
        raise ValueError("k-NN needs at least one bank sample and one query")
    if len(query_feats) == 0:
        return {k: 0 for k in ks}
    if bank_feats.shape[1] != query_feats.shape[1]:
        raise ValueError(f"feature sizes differ: bank {bank_feats.shape[1]}, queries {query_feats.shape[1]}")
    bank = F.normalize(bank_feats.float(), dim=1)                    # (N, D)
    queries = F.normalize(query_feats.float(), dim=1)                # (Q, D)
    bank_labels = bank_labels.long().to(bank.device)
    query_labels = query_labels.long().to(bank.device)
    classes = num_classes or int(max(bank_labels.max(), query_labels.max())) + 1
    k_max = min(max(ks), len(bank))
    chunk = max(1, min(len(queries), _SIM_BUDGET // len(bank)))
    correct = {k: 0 for k in ks}
    for start in range(0, len(queries), chunk):
        q = queries[start:start + chunk]                             # (c, D)
        sims, idx = (q @ bank.T).topk(k_max, dim=1)                  # (c, k_max), sorted descending
        weights = (sims / temperature).exp()
        neighbour_labels = bank_labels[idx]                          # (c, k_max)
        target = query_labels[start:start + chunk]
        for k in ks:
            kk = min(k, k_max)
            votes = torch.zeros(len(q), classes, device=q.device)
            votes.scatter_add_(1, neighbour_labels[:, :kk], weights[:, :kk])
            correct[k] += int((votes.argmax(dim=1) == target).sum())
    return correct
