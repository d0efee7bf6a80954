from __future__ import annotations

import sys

import pytest

from pktransfer.data import IGNORE_INDEX, Item, PromptFormatter, encode_items
from pktransfer.errors import DataError

sys.path.insert(0, "tests")
from conftest import make_tokenizer

ITEM = Item(id="x", prompt="What is 2 + 3?", response="5", reference="5")


def test_chat_mode_masks_the_prompt_exactly():
    tok = make_tokenizer(chat=True)
    f = PromptFormatter(tok)
    assert f.mode == "chat" and f.end_of_response == "<|im_end|>"
    ex = f.encode_example(ITEM, max_length=512)
    n_prompt = len(f.encode_prompt(ITEM.prompt))
    assert ex.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    response = [t for t in ex.labels if t != IGNORE_INDEX]
    assert tok.decode(response) == "5<|im_end|>"
    assert ex.input_ids[n_prompt:] == response
    # the full sequence is exactly what the chat template renders for the whole conversation
    full = tok.apply_chat_template(
        [{"role": "user", "content": ITEM.prompt}, {"role": "assistant", "content": "5"}], tokenize=False
    )
    assert tok.decode(ex.input_ids) == full.rstrip("\n")


def test_plain_mode_without_template():
    tok = make_tokenizer(chat=False)
    f = PromptFormatter(tok)
    assert f.mode == "plain"
    ex = f.encode_example(ITEM, max_length=512)
    assert tok.decode([t for t in ex.labels if t != IGNORE_INDEX]) == "5<|endoftext|>"
    with pytest.raises(DataError, match="no chat template"):
        PromptFormatter(tok, mode="chat")


def test_truncation_and_all_prompt_sets():
    f = PromptFormatter(make_tokenizer())
    n_prompt = len(f.encode_prompt(ITEM.prompt))
    ex = f.encode_example(ITEM, max_length=n_prompt + 1)
    assert len(ex.input_ids) == n_prompt + 1 and ex.n_response_tokens == 1
    with pytest.raises(DataError, match=r"none of the 1 items has response tokens"):
        encode_items(f, [ITEM], max_length=n_prompt, what="seed set")


def test_stop_tokens_include_end_of_turn():
    tok = make_tokenizer()
    f = PromptFormatter(tok)
    assert tok.convert_tokens_to_ids("<|im_end|>") in f.stop_token_ids()
