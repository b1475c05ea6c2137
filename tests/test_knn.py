"""Weighted k-NN against a brute-force reference written the obvious way."""
import math

import pytest
import torch

import engine.knn as knn_module
from engine.knn import knn_accuracy


def brute_force(bank, bank_y, query, query_y, k, t, classes):
    bank = [v / v.norm() for v in bank]
    correct = 0
    for q, y in zip(query, query_y):
        q = q / q.norm()
        sims = sorted(((float(q @ b), int(by)) for b, by in zip(bank, bank_y)), key=lambda s: -s[0])[:k]
        votes = [0.0] * classes
        for s, label in sims:
            votes[label] += math.exp(s / t)
        correct += int(max(range(classes), key=lambda c: (votes[c], -c)) == int(y))
    return 100.0 * correct / len(query)


@pytest.mark.parametrize("n_bank, n_query, classes, dim", [(50, 13, 3, 8), (7, 40, 5, 4), (200, 1, 11, 16)])
def test_matches_brute_force_for_every_k(n_bank, n_query, classes, dim):
    g = torch.Generator().manual_seed(n_bank)
    bank, query = torch.randn(n_bank, dim, generator=g), torch.randn(n_query, dim, generator=g)
    bank_y = torch.randint(0, classes, (n_bank,), generator=g)
    query_y = torch.randint(0, classes, (n_query,), generator=g)
    ks = [1, 5, 20, 100]
    got = knn_accuracy(bank, bank_y, query, query_y, ks, 0.07, num_classes=classes)
    for k in ks:
        assert got[k] == pytest.approx(brute_force(bank, bank_y, query, query_y, min(k, n_bank), 0.07, classes))


def test_chunking_does_not_change_the_answer(monkeypatch):
    g = torch.Generator().manual_seed(1)
    bank, query = torch.randn(300, 6, generator=g), torch.randn(77, 6, generator=g)
    bank_y, query_y = torch.randint(0, 4, (300,), generator=g), torch.randint(0, 4, (77,), generator=g)
    whole = knn_accuracy(bank, bank_y, query, query_y, [1, 20])
    monkeypatch.setattr(knn_module, "_SIM_BUDGET", 300 * 4)  # 4 queries per chunk
    assert knn_accuracy(bank, bank_y, query, query_y, [1, 20]) == whole


def test_separable_clusters_are_classified_perfectly():
    centres = torch.eye(4) * 10
    bank = centres.repeat_interleave(25, 0) + torch.randn(100, 4) * 0.1
    labels = torch.arange(4).repeat_interleave(25)
    assert knn_accuracy(bank, labels, bank, labels, [20])[20] == 100.0


def test_empty_inputs_are_rejected():
    with pytest.raises(ValueError, match="at least one"):
        knn_accuracy(torch.zeros(0, 3), torch.zeros(0), torch.randn(2, 3), torch.zeros(2), [1])
