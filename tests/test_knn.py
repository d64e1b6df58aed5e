"""Weighted kNN (barlow.knn) against a hand-computed example and a plain-Python brute force."""
import math
import random

import pytest
import torch

from barlow.knn import knn_predict, knn_top1

T = 0.07


def test_hand_computed_votes_change_between_k1_and_k3():
    # Query (1, 0). Cosines, by hand (vectors with hypotenuse 29: 20² + 21² = 29²):
    #   (21, 20) -> 21/29 = 0.7241, label 1      (-1, 0) -> -1, label 1
    #   (20, 21) -> 20/29 = 0.6897, label 0      (0, 5)  ->  0, label 1
    #   (20,-21) -> 20/29 = 0.6897, label 0
    # k=1: only label 1's neighbour votes.
    # k=3: label 1: e^(0.7241/0.07) = e^10.345 = 31,096; label 0: 2 e^(0.6897/0.07) = 2 e^9.852 = 38,001.
    # k=4 adds (0, 5) with e^0 = 1 for label 1: 31,097 < 38,001. k=5: e^(-14.3) more for label 1.
    bank = torch.tensor([[21.0, 20.0], [20.0, 21.0], [20.0, -21.0], [0.0, 5.0], [-1.0, 0.0]])
    labels = torch.tensor([1, 0, 0, 1, 1])
    query = torch.tensor([[3.0, 0.0]])  # not unit length: the classifier normalises
    w1, w0 = math.exp(21 / 29 / T), 2 * math.exp(20 / 29 / T)
    assert w1 == pytest.approx(31096, rel=1e-4) and w0 == pytest.approx(38001, rel=1e-4)
    got = {k: int(knn_predict(bank, labels, query, k)[0]) for k in (1, 2, 3, 4, 5)}
    # k=2: one label-0 neighbour, e^9.852 = 19,000 < 31,096 (the tie at 20/29 is either of the two)
    assert got == {1: 1, 2: 1, 3: 0, 4: 0, 5: 0}


def test_k_larger_than_the_bank_uses_the_whole_bank():
    bank = torch.tensor([[21.0, 20.0], [20.0, 21.0], [20.0, -21.0], [0.0, 5.0], [-1.0, 0.0]])
    labels = torch.tensor([1, 0, 0, 1, 1])
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.1]])
    for k in (6, 20, 200):
        assert torch.equal(knn_predict(bank, labels, queries, k), knn_predict(bank, labels, queries, 5))


def test_top1_per_k_in_percent():
    bank = torch.tensor([[21.0, 20.0], [20.0, 21.0], [20.0, -21.0], [0.0, 5.0], [-1.0, 0.0]])
    labels = torch.tensor([1, 0, 0, 1, 1])
    query = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    # predictions: k=1 -> 1, k=3 -> 0 (the hand-computed example); 1 of 3 queries is labelled 1
    assert knn_top1(bank, labels, query, torch.tensor([1, 0, 0]), ks=(1, 3)) == {1: 33.33, 3: 66.67}


def test_empty_bank_is_refused():
    with pytest.raises(ValueError, match="empty"):
        knn_predict(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), torch.ones(2, 4), 20)


def brute_force(bank, labels, queries, k, classes):
    """The protocol in plain Python: cosine, k largest, exp(sim / T) votes, lowest class on ties."""
    def unit(v):
        n = math.sqrt(sum(a * a for a in v))
        return [a / n for a in v]

    bank = [unit(b) for b in bank]
    out = []
    for q in map(unit, queries):
        sims = sorted(((sum(a * b for a, b in zip(q, row)), j) for j, row in enumerate(bank)), reverse=True)
        votes = [0.0] * classes
        for s, j in sims[:k]:
            votes[labels[j]] += math.exp(s / T)
        out.append(max(range(classes), key=lambda c: (votes[c], -c)))
    return out


@pytest.mark.parametrize("k", [1, 5, 20, 200])
def test_matches_a_plain_python_brute_force(k):
    rng = random.Random(0)
    dim, classes = 8, 5
    bank = [[rng.gauss(0, 1) for _ in range(dim)] for _ in range(60)]
    labels = [rng.randrange(classes) for _ in bank]
    queries = [[rng.gauss(0, 1) for _ in range(dim)] for _ in range(40)]
    got = knn_predict(torch.tensor(bank), torch.tensor(labels), torch.tensor(queries), k, classes=classes)
    assert got.tolist() == brute_force(bank, labels, queries, k, classes)


def test_chunks_give_the_result_of_one_chunk():
    g = torch.Generator().manual_seed(1)
    bank, queries = torch.randn(300, 16, generator=g), torch.randn(101, 16, generator=g)
    labels = torch.randint(0, 7, (300,), generator=g)
    whole = knn_predict(bank, labels, queries, 20, chunk=1024)
    for chunk in (1, 7, 100):
        assert torch.equal(knn_predict(bank, labels, queries, 20, chunk=chunk), whole)


def test_float16_features_are_classified_in_float32():
    """The probes' cached features are float16: the result is that of their exact float32 values."""
    g = torch.Generator().manual_seed(2)
    bank, queries = torch.randn(200, 32, generator=g).half(), torch.randn(50, 32, generator=g).half()
    labels = torch.randint(0, 4, (200,), generator=g)
    assert torch.equal(knn_predict(bank, labels, queries, 20), knn_predict(bank.float(), labels, queries.float(), 20))
    ref = brute_force(bank.float().tolist(), labels.tolist(), queries.float().tolist(), 20, 4)
    assert knn_predict(bank, labels, queries, 20).tolist() == ref
