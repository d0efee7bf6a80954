from __future__ import annotations

import pytest

from pktransfer.evaluation.metrics import exact_match, exact_match_number, extract_last_number


@pytest.mark.parametrize(
    "text,expected",
    [
        ("1447", "1447"),
        ("The answer is 1,000.", "1000"),
        ("$5.00", "5"),
        ("it costs -3 dollars", "-3"),
        ("7.0", "7"),
        ("3.50", "3.5"),
        ("12 + 3 = 15", "15"),
        ("no number", None),
        ("1,234,567", "1234567"),
        ("-$4", "-4"),
        ("0.25", "0.25"),
    ],
)
def test_extract_last_number(text, expected):
    assert extract_last_number(text) == expected


@pytest.mark.parametrize(
    "output,reference,ok",
    [
        ("1000", "1,000", True),
        ("1,000", "1000", True),
        ("$5.00", "5", True),
        ("7.0", "7", True),
        ("-3", "-3", True),
        ("3", "-3", False),
        ("so 18 eggs", "18", True),
        ("18.5", "18", False),
        ("", "3", False),
        ("24 * 10 = 2400", "240", False),
    ],
)
def test_exact_match_number(output, reference, ok):
    assert exact_match_number(output, reference)[1] is ok


def test_exact_match_strips_whitespace_only():
    assert exact_match(" yes \n", "yes") == ("yes", True)
    assert exact_match("Yes", "yes")[1] is False


@pytest.mark.parametrize("family", ["qwen2", "llama", "gemma2", "phi3"])
def test_float32_logits_equal_the_models_own_in_float32(family):
    """Multiple choice scores come from the head computed in float32 (no bfloat16 ties between letters); on a
    float32 model that equals the model's own logits, Gemma 2's final soft-cap included."""
    import sys

    import torch

    sys.path.insert(0, "tests")
    from conftest import STUDENT_SHAPE, make_model

    from pktransfer.evaluation.generation import float32_head

    model = make_model(family, vocab=100, **STUDENT_SHAPE).eval()
    ids = torch.randint(0, 100, (2, 7))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        own = model(input_ids=ids, attention_mask=mask).logits
        head = float32_head(model)
        ours = head(ids, mask)
        picked = head(ids, mask, torch.tensor([0, 1]), torch.tensor([6, 3]))
    assert torch.allclose(ours, own, atol=1e-5)
    assert torch.allclose(picked, own[[0, 1], [6, 3]], atol=1e-5)
    if family == "gemma2":
        assert own.abs().max() <= model.config.final_logit_softcapping
