"""CKA and the unbiased HSIC against hand-computed values."""

import itertools

import pytest
import torch

from pktransfer.ops.similarity import MinibatchCKA, linear_cka, mean_cosine, unbiased_hsic


def test_linear_cka_by_hand():
    # x = [[1], [2], [3]] centred: [-1, 0, 1]; y = [[1, 0], [0, 1], [1, 1]] centred: [[1/3, -2/3], [-2/3, 1/3], [1/3, 1/3]]
    # yᵀx = [0, 1]; ||yᵀx||² = 1; ||xᵀx|| = 2; yᵀy = [[2/3, -1/3], [-1/3, 2/3]], ||yᵀy||_F = sqrt(10)/3
    x = torch.tensor([[1.0], [2.0], [3.0]])
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert linear_cka(x, y) == pytest.approx(1 / (2 * 10**0.5 / 3), rel=1e-12)
    with pytest.raises(ValueError, match="same examples"):
        linear_cka(x, y[:2])


def test_cka_is_one_for_rotations_and_scalings_of_the_same_representation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 8, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    assert linear_cka(x, 3.0 * x @ q) == pytest.approx(1.0, abs=1e-12)
    m = MinibatchCKA(1, 2)
    for r in range(0, 50, 10):
        m.update([x[r : r + 10]], [x[r : r + 10], 3.0 * x[r : r + 10] @ q])
    assert m.value()[0].tolist() == pytest.approx([1.0, 1.0], abs=1e-12)


def _hsic_by_definition(k: torch.Tensor, l: torch.Tensor) -> float:  # noqa: E741
    """Song et al. (2012) eq. 5 written as sums over index tuples, the slow way."""
    n = k.shape[0]
    idx = range(n)
    t1 = sum(k[i, j] * l[i, j] for i, j in itertools.permutations(idx, 2)) / (n * (n - 1))
    t2 = sum(k[i, j] * l[q, r] for i, j, q, r in itertools.permutations(idx, 4)) / (n * (n - 1) * (n - 2) * (n - 3))
    t3 = sum(k[i, j] * l[i, q] for i, j, q in itertools.permutations(idx, 3)) / (n * (n - 1) * (n - 2))
    return float(t1 + t2 - 2 * t3)


def test_unbiased_hsic_matches_its_definition():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, 2, generator=g, dtype=torch.float64)
    k, l = x @ x.T, y @ y.T  # noqa: E741
    got = unbiased_hsic(k[None], l[None])[0, 0]
    assert float(got) == pytest.approx(_hsic_by_definition(k, l), rel=1e-10)
    with pytest.raises(ValueError, match="at least 4"):
        unbiased_hsic(k[None, :3, :3], l[None, :3, :3])


def test_unrelated_representations_score_near_zero_and_mean_cosine():
    g = torch.Generator().manual_seed(2)
    m = MinibatchCKA(1, 1)
    for _ in range(20):
        m.update([torch.randn(64, 16, generator=g)], [torch.randn(64, 16, generator=g)])
    assert abs(float(m.value()[0, 0])) < 0.05
    assert mean_cosine(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[1.0, 0.0], [-1.0, -1.0]])) == pytest.approx(
        0.0, abs=1e-12
    )
