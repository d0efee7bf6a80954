"""Pure math of the transfer methods, on hand-checked tensors."""

from __future__ import annotations

import pytest
import torch

from pktransfer.ops.lowrank import rebase_as_plain_lora, svd_init
from pktransfer.ops.ranking import top_k
from pktransfer.ops.selection import (
    max_sum_submatrix,
    max_sum_submatrix_bruteforce,
    max_sum_window,
    random_indices,
    reduce_dims,
    select_layers,
    uniform_indices,
)
from pktransfer.ops.sensitivity import ParamSensitivity, accumulate, sensitivity_over

# ---- sensitivity -------------------------------------------------------------------------------


def test_accumulate_matches_the_formula_by_hand():
    w = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    g1 = torch.tensor([[0.5, 1.0], [-1.0, 2.0]])
    g2 = torch.tensor([[-1.0, 0.0], [1.0, -4.0]])
    acc = ParamSensitivity.empty((2, 2), "full")
    accumulate(acc, w, g1)
    accumulate(acc, w, g2)
    # |w*g1| = [[.5, 2], [3, 1]], |w*g2| = [[1, 0], [3, 2]]: per-sample abs, then summed
    expected = torch.tensor([[1.5, 2.0], [6.0, 3.0]])
    assert torch.equal(acc.full, expected)
    assert torch.equal(acc.rows, expected.sum(1)) and torch.equal(acc.cols, expected.sum(0))
    assert float(acc.total) == 12.5
    # not |w * (g1 + g2)|: absolute values are taken per sample
    assert not torch.equal(acc.full, (w * (g1 + g2)).abs())


def test_accumulate_in_chunks_equals_whole():
    torch.manual_seed(0)
    w, g = torch.randn(37, 11), torch.randn(37, 11)
    a, b = ParamSensitivity.empty((37, 11), "full"), ParamSensitivity.empty((37, 11), "full")
    accumulate(a, w, g)
    accumulate(b, w, g, chunk_elems=20)  # 1 row per chunk
    assert torch.allclose(a.full, b.full) and torch.allclose(a.cols, b.cols)


def test_streaming_sensitivity_of_a_linear_layer_equals_the_formula():
    torch.manual_seed(0)

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2, bias=False)

        def forward(self, x, y):
            return type("Out", (), {"loss": torch.nn.functional.mse_loss(self.lin(x), y)})()

    model = Tiny()
    batches = [{"x": torch.randn(1, 3), "y": torch.randn(1, 2)} for _ in range(3)]
    expected = torch.zeros(2, 3)
    for b in batches:
        model.zero_grad()
        model(**b).loss.backward()
        expected += (model.lin.weight * model.lin.weight.grad).abs()
    model.zero_grad(set_to_none=True)
    sens = sensitivity_over(model, batches, lambda n, s: "full")
    assert torch.allclose(sens.params["lin.weight"].full, expected, atol=1e-7)
    assert sens.n_samples == 3
    assert model.lin.weight.grad is None  # gradients were freed, never kept


def test_reduced_mode_keeps_no_map():
    acc = ParamSensitivity.empty((4, 5), "reduced")
    assert acc.full is None and acc.rows.shape == (4,) and acc.cols.shape == (5,)
    assert ParamSensitivity.empty((4, 5), "cols").rows is None
    assert ParamSensitivity.empty((4,), "full").mode == "total"


# ---- layer selection ---------------------------------------------------------------------------


def test_select_layers_strategies():
    scores = [0.1, 5.0, 0.3, 4.0, 4.0, 0.2]
    assert select_layers(scores, 3, "sensitivity") == [1, 3, 4]
    assert select_layers([1, 2, 2, 0], 2, "sensitivity") == [1, 2]  # ties: lower index
    assert select_layers(scores, 2, "top") == [0, 1]
    assert select_layers(scores, 2, "last") == [4, 5]
    assert select_layers(scores, 2, [5, 0]) == [0, 5]
    r1, r2 = select_layers(scores, 3, "random", seed=1), select_layers(scores, 3, "random", seed=1)
    assert r1 == r2 and len(set(r1)) == 3 and r1 == sorted(r1)
    assert any(select_layers(scores, 3, "random", seed=s) != r1 for s in range(2, 6))
    with pytest.raises(ValueError):
        select_layers(scores, 7)
    with pytest.raises(ValueError):
        select_layers(scores, 2, [1, 1])


def test_top_k_one_tie_rule_for_every_caller():
    scores = torch.tensor([2.0, 5.0, 2.0, 5.0, 1.0])
    assert top_k(scores, 3).tolist() == [1, 3, 0]  # best first; among equal scores the lower index first
    assert top_k(scores, 3, in_index_order=True).tolist() == [0, 1, 3]
    assert top_k([0.5, 0.5, 0.5], 2).tolist() == [0, 1]
    assert top_k(scores, 0).tolist() == []
    # the callers: Seeking's layers, SemAlign's 1-based critical layers
    assert select_layers(scores.tolist(), 2) == [1, 3]
    from pktransfer.ops.semantic import top_layers

    assert top_layers(scores.tolist(), 3) == [1, 2, 4]
    with pytest.raises(ValueError, match="top 6 of 5"):
        top_k(scores, 6)
    with pytest.raises(ValueError, match="1-D"):
        top_k(torch.ones(2, 2), 1)


# ---- dimension reduction -----------------------------------------------------------------------


def test_top_k_uniform_random_window():
    assert top_k(torch.tensor([1.0, 9.0, 3.0, 9.0, 0.0]), 2, in_index_order=True).tolist() == [1, 3]
    assert uniform_indices(10, 4).tolist() == [0, 3, 6, 9]
    assert uniform_indices(5, 5).tolist() == [0, 1, 2, 3, 4]
    assert random_indices(10, 4, 3).tolist() == random_indices(10, 4, 3).tolist()
    assert max_sum_window(torch.tensor([1.0, 0.0, 5.0, 5.0, 0.0]), 2) == 2


def test_submatrix_on_a_hand_built_matrix():
    s = torch.zeros(5, 6)
    s[2:4, 3:6] = 1.0
    assert max_sum_submatrix(s, 2, 3) == (2, 3, 6.0)
    # ties go to the lowest (row, col): an all-equal matrix picks the top-left corner
    assert max_sum_submatrix(torch.ones(4, 4), 2, 2)[:2] == (0, 0)


@pytest.mark.parametrize("seed", range(6))
def test_vectorised_submatrix_equals_bruteforce(seed):
    g = torch.Generator().manual_seed(seed)
    h, w = int(torch.randint(3, 14, (1,), generator=g)), int(torch.randint(3, 14, (1,), generator=g))
    s = torch.rand(h, w, generator=g)
    if seed % 2:  # integer values make exact ties likely
        s = torch.randint(0, 3, (h, w), generator=g).float()
    bh, bw = int(torch.randint(1, h + 1, (1,), generator=g)), int(torch.randint(1, w + 1, (1,), generator=g))
    slow = max_sum_submatrix_bruteforce(s, bh, bw)
    for chunk in (1, 3, 512):  # chunked rows must not change the answer
        fast = max_sum_submatrix(s, bh, bw, chunk=chunk)
        assert fast[:2] == slow[:2] and fast[2] == pytest.approx(slow[2])


def test_reduce_dims_structures():
    full = torch.zeros(6, 8)
    full[4, :] = 10
    full[:, 1] = 7
    rows, cols = full.sum(1), full.sum(0)
    r, c = reduce_dims("submatrix", (2, 3), full=full)
    # rows 3-4 and 4-5 tie at 34 (as do columns 0-2 and 1-3): the lowest position wins
    assert r.tolist() == [3, 4] and c.tolist() == [0, 1, 2]
    r, c = reduce_dims("row_column", (2, 3), rows=rows, cols=cols)
    assert 4 in r.tolist() and 1 in c.tolist() and len(r) == 2 and len(c) == 3
    r, c = reduce_dims("neuron", (2, 3), rows=rows, cols=cols)
    assert 4 in r.tolist() and c.tolist() == [0, 1, 2]
    r, c = reduce_dims("uniform", (3, 4), source=(6, 8))
    assert r.tolist() == [0, 2, 5] and c.tolist() == [0, 2, 5, 7]
    r, c = reduce_dims("random", (3, 4), source=(6, 8), seed=1)
    assert len(set(r.tolist())) == 3 and len(set(c.tolist())) == 4
    with pytest.raises(ValueError, match="does not fit"):
        reduce_dims("uniform", (7, 4), source=(6, 8))
    with pytest.raises(ValueError, match="full sensitivity map"):
        reduce_dims("submatrix", (2, 2), rows=rows, cols=cols)


# ---- SVD init and rebasing -----------------------------------------------------------------------


def test_svd_init_factorises_to_the_best_rank_r():
    torch.manual_seed(0)
    w = torch.randn(8, 5)
    b, a = svd_init(w, 5)
    assert b.shape == (8, 5) and a.shape == (5, 5)
    assert torch.allclose(b @ a, w, atol=1e-5)
    b2, a2 = svd_init(w, 2)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    assert torch.allclose(b2 @ a2, (u[:, :2] * s[:2]) @ vh[:2], atol=1e-5)
    assert torch.allclose(a2 @ a2.T, torch.eye(2), atol=1e-5)  # A = V_rᵀ has orthonormal rows
    with pytest.raises(ValueError, match="exceeds"):
        svd_init(w, 6)


def test_rebase_as_plain_lora_reproduces_the_difference():
    torch.manual_seed(0)
    a0, b0, a1, b1 = torch.randn(3, 7), torch.randn(5, 3), torch.randn(3, 7), torch.randn(5, 3)
    out = rebase_as_plain_lora({"x.lora_A.weight": a1, "x.lora_B.weight": b1}, {"x.lora_A.weight": a0, "x.lora_B.weight": b0})
    assert out["x.lora_A.weight"].shape == (6, 7)
    assert torch.allclose(out["x.lora_B.weight"] @ out["x.lora_A.weight"], b1 @ a1 - b0 @ a0, atol=1e-5)


def test_vocab_hooks_equal_the_dense_gradient_path(tiny_models):
    """Embedding/lm_head via module hooks (no dense gradient) == parameter hooks on the dense gradient."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_models["qwen2_teacher"]))
    batches = [
        {"input_ids": torch.tensor([[5, 9, 9, 30, 41, 5, 7]]), "labels": torch.tensor([[-100, -100, 9, 30, 41, 5, 7]])},
        {"input_ids": torch.tensor([[12, 13, 14, 5]]), "labels": torch.tensor([[-100, 13, 14, 5]])},
    ]

    def mode(name, shape):
        return "cols" if ("embed_tokens" in name or "lm_head" in name) else "reduced"

    dense = sensitivity_over(model, batches, mode)
    hooked = sensitivity_over(model, batches, mode, vocab_modules={"model.embed_tokens": "embedding", "lm_head": "linear"})
    for name in dense.params:
        d, h = dense.params[name], hooked.params[name]
        assert float(h.total) == pytest.approx(float(d.total), rel=1e-5), name
        for k in ("rows", "cols"):
            if getattr(d, k) is not None:
                assert torch.allclose(getattr(h, k), getattr(d, k), rtol=1e-4, atol=1e-9), (name, k)
    assert all(p.requires_grad for p in model.parameters())  # frozen only while extracting
    assert all(p.grad is None for p in model.parameters())
