"""Padding and collation: one helper for training, scoring and generation."""

import pytest


def test_one_padding_helper_right_left_and_labels():
    from pktransfer.data.batching import pad
    from pktransfer.training import collate_examples

    ids, mask = pad([[5, 6, 7], [8]], 0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad([[5, 6, 7], [8], []], 0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]] and mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    with pytest.raises(ValueError, match="width 2"):
        pad([[1, 2, 3]], 0, width=2)
    from pktransfer.data import IGNORE_INDEX, Example

    batch = collate_examples([Example([1, 2, 3], [IGNORE_INDEX, 2, 3]), Example([4, 5], [IGNORE_INDEX, 5])], pad_id=9)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, 9]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 2, 3], [IGNORE_INDEX, 5, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]] and batch["index"].tolist() == [0, 1]


def test_per_example_cache_packs_and_reads_rows(tmp_path):
    import torch

    from pktransfer.errors import DataError
    from pktransfer.fileio import save_safetensors
    from pktransfer.methods.teacher_cache import PerExampleCache, pack_per_example

    # two batches: examples with 2, 0, 3 and 1 rows
    blocks = [torch.arange(4).reshape(2, 2) + 0.0, torch.arange(6).reshape(3, 2) + 10.0, torch.tensor([[99.0, 98.0]])]
    packed = pack_per_example([2, 0, 3, 1], {"x": [torch.cat(blocks[:1]), torch.cat(blocks[1:])]})
    assert packed["offsets"].tolist() == [0, 2, 2, 5, 6]
    path = save_safetensors(packed, tmp_path / "c.safetensors")
    cache = PerExampleCache(path, 4, "kd")
    assert cache.rows("x", [3, 0]).tolist() == [[99.0, 98.0], [0.0, 1.0], [2.0, 3.0]]
    assert cache.rows("x", [1]).shape == (0, 2)
    with pytest.raises(DataError, match="holds 4 examples, training has 5"):
        PerExampleCache(path, 5, "kd")
    with pytest.raises(ValueError, match="counts add up"):
        pack_per_example([1], {"x": [torch.zeros(2, 1)]})


def test_the_lm_head_sees_a_contiguous_input_during_generation(tiny_models):
    """transformers hands the head a non-contiguous [B, 1, D] slice; on CPU with a frozen weight PyTorch then
    expands the whole [V, D] weight over the batch (seconds and gigabytes on a real vocabulary). generate() makes
    the slice contiguous; outputs are unchanged."""
    import torch

    from pktransfer.evaluation.generation import contiguous_head_input, generate
    from pktransfer.models import load_model
    from pktransfer.recipe import ModelSpec

    loaded = load_model(ModelSpec(model=str(tiny_models["qwen2_student"])))
    model, tok = loaded.model, loaded.tokenizer
    for p in model.parameters():
        p.requires_grad_(False)  # as in a merged model
    seen: list[bool] = []
    probe = model.get_output_embeddings().register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous()))
    prompts = [tok("12+3=")["input_ids"], tok("7*8=")["input_ids"]]
    kwargs = dict(batch_size=2, max_new_tokens=3, stop_token_ids=[tok.eos_token_id])
    fixed = generate(model, tok, prompts, **kwargs)
    probe.remove()
    assert seen and all(seen)
    # the same as an unhooked decode (the hook is removed afterwards)
    ids = torch.tensor([[tok.pad_token_id] * (len(prompts[0]) - len(prompts[1])) + prompts[1]])
    with contiguous_head_input(model):
        a = model(input_ids=ids).logits
    b = model(input_ids=ids).logits
    assert torch.equal(a, b) and not model.get_output_embeddings()._forward_pre_hooks
    assert len(fixed[0]) == 2
