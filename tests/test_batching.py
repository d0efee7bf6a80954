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
