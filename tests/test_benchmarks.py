"""Benchmarks: metrics on hand-made outputs, prompt templates, log-likelihood scoring, code execution, splits."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import needs_data
from typer.testing import CliRunner

import pktransfer
from pktransfer.data import Item, PromptFormatter, get_task
from pktransfer.errors import DataError
from pktransfer.evaluation import EvalOptions, evaluate_items, subset
from pktransfer.evaluation.generation import continuation_logliks, encode_pair
from pktransfer.evaluation.metrics import gsm8k_strict, normalize_answer, pass_at_k, rouge_l, super_ni_scores

# ---- metrics on hand-made outputs ------------------------------------------------------------------


@pytest.mark.parametrize(
    "output,reference,strict_ok,flex_ok",
    [
        ("She pays 3 + 2 = 5 dollars.\n#### 5", "5", True, True),
        ("#### 1,000 apples", "1000", True, True),
        ("#### -3", "-3", True, True),
        ("The answer is $5.00", "5", False, True),  # no '####': strict fails, flexible reads 5.00 = 5
        ("#### 7.0", "7", True, True),
        ("#### 12\nbut then 13", "12", True, False),  # strict takes the '####' number, flexible the last one
        ("no number at all", "4", False, False),
    ],
)
def test_gsm8k_strict_and_flexible(output, reference, strict_ok, flex_ok):
    task = get_task("gsm8k")
    s = task.score(output, Item("x", "q", "r", reference))
    assert gsm8k_strict(output, reference)[1] is strict_ok
    assert s["metrics"] == {"exact_match,flexible": float(flex_ok), "exact_match,strict": float(strict_ok)}
    assert s["correct"] is flex_ok  # flexible is the primary metric


def test_super_ni_metrics():
    assert normalize_answer("  The Cat, sat!  ") == "cat sat"
    assert super_ni_scores("The cat sat.", ["cat sat"]) == {"exact_match": 1.0, "rougeL": 1.0}
    # LCS("a b c d", "a c d e") = 3 tokens: P = R = 3/4, F = 0.75
    assert rouge_l("a b c d", "a c d e") == pytest.approx(0.75)
    s = super_ni_scores("dog", ["cat", "a dog"])  # best over references
    assert s == {"exact_match": 1.0, "rougeL": 1.0}
    assert super_ni_scores("", ["cat"]) == {"exact_match": 0.0, "rougeL": 0.0}


def test_pass_at_k_estimator():
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(10, 8, 5) == 1.0  # fewer than k failures: some k-subset always passes
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 5)


def test_subset_is_first_n_or_a_seeded_draw_in_order():
    items = [Item(str(i), "p", "r", "r") for i in range(50)]
    assert [it.id for it in subset(items, 3, None)] == ["0", "1", "2"]
    a, b = subset(items, 10, 7), subset(items, 10, 7)
    assert [it.id for it in a] == [it.id for it in b] and [int(it.id) for it in a] == sorted(int(it.id) for it in a)
    assert [it.id for it in subset(items, 10, 8)] != [it.id for it in a]
    assert subset(items, None, 3) == items


# ---- templates and splits --------------------------------------------------------------------------


@needs_data
def test_mmlu_prompt_is_lm_evals_template_with_dev_shots():
    zero = get_task("mmlu").split("test")[0]
    assert zero.prompt.startswith("The following are multiple choice questions (with answers) about abstract algebra.\n\n")
    assert zero.prompt.endswith("\nA. 0\nB. 4\nC. 2\nD. 6\nAnswer:") and zero.metadata["choices"] == [" A", " B", " C", " D"]
    five = get_task("mmlu", {"shots": 5}).split("test")[0]
    assert five.prompt.count("\nAnswer: ") == 5 and five.prompt.endswith(zero.prompt.split("\n\n", 1)[1])
    with pytest.raises(pktransfer.RecipeError, match="shots"):
        get_task("mmlu", {"shots": 9}).split("test")


@needs_data
def test_gsm8k_eight_shot_lm_eval_style():
    task = get_task("gsm8k", {"style": "lm-eval", "shots": 8})
    item = task.split("test")[0]
    assert item.prompt.count("Question: ") == 9 and item.prompt.endswith("\nAnswer:")
    assert item.prompt.count("#### ") == 8 and task.stop_strings[0] == "Question:" and task.plain_separator == ""
    first_train = json.loads((task.data_dir() / "gsm8k" / "train.jsonl").read_text().split("\n", 1)[0])
    assert item.prompt.startswith(f"Question: {first_train['question']}\nAnswer: {first_train['answer']}\n\n")


@needs_data
def test_super_ni_heldout_is_disjoint_and_named():
    task = get_task("super_ni")
    test, train, seed = task.split("test"), task.split("train"), task.split("seed")
    assert len(test) == 200 and len(train) == 800 and len(seed) == 32
    ids = {it.id for it in test}
    assert not ids & {it.id for it in train} and not ids & {it.id for it in seed}
    assert task.eval_name == "super_ni-heldout" and "not the official" in task.protocol()["note"]
    assert [it.id for it in get_task("super_ni").split("test")] == [it.id for it in test]  # fixed seed


def test_user_supplied_super_ni_test_file(tmp_path):
    f = tmp_path / "mine.jsonl"
    f.write_text(json.dumps({"id": "u1", "prompt": "Say hi", "response": "hi"}) + "\n")
    task = get_task("super_ni", {"test_file": str(f)})
    assert [it.id for it in task.split("test")] == ["u1"] and task.eval_name == "super_ni-user-test"
    # nothing of the Seeking file is held out for a user test set: training reads all 1,000 rows (official)
    assert len(task.split("train")) == 1000 and len(task.split("seed")) == 32


def test_missing_data_file_names_the_file(tmp_path):
    (tmp_path / "mmlu").mkdir()
    with pytest.raises(DataError, match=r"mmlu/test.jsonl' is missing") as err:
        get_task("mmlu", data_dir=str(tmp_path)).split("test")
    assert "PKT_DATA_DIR" in err.value.hint
    with pytest.raises(DataError, match=r"mbpp/mbpp.jsonl' is missing"):
        get_task("mbpp", data_dir=str(tmp_path)).split("test")


@needs_data
def test_mbpp_split_by_task_id_and_three_shot_prompt():
    task = get_task("mbpp")
    test = task.split("test")
    assert len(test) == 500 and test[0].metadata["task_id"] == 11 and test[-1].metadata["task_id"] == 510
    assert test[0].prompt.count("[BEGIN]") == 4 and test[0].prompt.count("[DONE]") == 3
    assert test[0].prompt.endswith("[BEGIN]\n")


# ---- code execution --------------------------------------------------------------------------------


@needs_data
def test_reference_solutions_pass_and_wrong_ones_fail():
    from pktransfer.evaluation.sandbox import run_programs

    he, mbpp = get_task("humaneval"), get_task("mbpp")
    he_items, mbpp_items = he.split("test")[:4], mbpp.split("test")[:4]
    good = [he.program(it, it.response) for it in he_items] + [mbpp.program(it, it.response) for it in mbpp_items]
    bad = [he.program(it, "    return None\n") for it in he_items] + [
        mbpp.program(it, "def nothing():\n    pass\n") for it in mbpp_items
    ]
    results = run_programs(good + bad)
    assert [r.passed for r in results] == [True] * 8 + [False] * 8, [r.stderr[-300:] for r in results if not r.passed][:2]
    # a chat model's fenced answer holding the whole function is used as the program body
    fenced = "Here you go:\n```python\n" + he_items[0].metadata["code_prompt"] + he_items[0].response + "```\nDone."
    assert run_programs([he.program(he_items[0], fenced)])[0].passed


# ---- model side (tiny model) -----------------------------------------------------------------------


def test_continuation_logliks_match_a_direct_computation(tiny_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_models["qwen2_student"]
    model, tok = AutoModelForCausalLM.from_pretrained(str(path)), AutoTokenizer.from_pretrained(str(path))
    contexts = [tok("abc d", add_special_tokens=False)["input_ids"], tok("xy", add_special_tokens=False)["input_ids"]]
    conts = [[[5], [7], [9]], [[3, 4], [6]]]  # first context: single tokens (fast path); second: general path
    got = continuation_logliks(model, contexts, conts, batch_size=2, pad_id=0)
    with torch.no_grad():
        for i, ctx in enumerate(contexts):
            for j, cont in enumerate(conts[i]):
                ids = torch.tensor([ctx + cont])
                logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[0]
                want = sum(float(logp[len(ctx) - 1 + k, t]) for k, t in enumerate(cont))
                assert got[i][j] == pytest.approx(want, abs=1e-4)


def test_encode_pair_moves_trailing_spaces_like_lm_eval(tiny_models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_models["qwen2_student"]))
    ctx, cont = encode_pair(tok, "Answer: ", "A")
    ctx2, cont2 = encode_pair(tok, "Answer:", " A")
    assert (ctx, cont) == (ctx2, cont2)


@needs_data
def test_choice_evaluation_reports_subjects_macro_and_micro(tiny_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_models["qwen2_student"]
    model, tok = AutoModelForCausalLM.from_pretrained(str(path)), AutoTokenizer.from_pretrained(str(path))
    task = get_task("mmlu")
    items = subset(task.split("test"), 12, 3)
    res = evaluate_items(
        model,
        PromptFormatter(tok, "plain", None, ""),
        items,
        label="m",
        task=task,
        split="test",
        options=EvalOptions(batch_size=4),
    )
    s = res.summary
    per = s["per_subject"]
    assert sum(v["n"] for v in per.values()) == 12
    assert s["metrics"]["acc,macro"] == pytest.approx(sum(v["accuracy"] for v in per.values()) / len(per))
    assert s["accuracy"] == s["metrics"]["acc,micro"] == pytest.approx(sum(r["correct"] for r in res.records) / 12)
    r = res.records[0]
    assert set(r["loglik"]) == {"A", "B", "C", "D"} and r["extracted"] == max(r["loglik"], key=r["loglik"].get)
    assert s["protocol"]["shots"] == 0 and s["protocol"]["prompt_format"]["mode"] == "plain"


def test_pkt_eval_refuses_code_tasks_without_opt_in_and_runs_with_it(tiny_models, tmp_path):
    from pktransfer.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["eval", "-m", str(tiny_models["qwen2_student"]), "-t", "humaneval", "--limit", "2"])
    assert res.exit_code == 2 and "--allow-code-execution" in res.output and "Traceback" not in res.output
    res = runner.invoke(
        app,
        [
            "eval",
            "-m",
            str(tiny_models["qwen2_student"]),
            "-t",
            "humaneval",
            "--limit",
            "2",
            "--allow-code-execution",
            "--max-new-tokens",
            "4",
            "-q",
            "-o",
            str(tmp_path / "he"),
        ],
    )
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "he" / "model.humaneval.test.summary.json").read_text())
    assert summary["n"] == 2 and "pass@1" in summary["metrics"] and summary["sandbox"]["isolation"]["audit_guard"]
    rows = [json.loads(x) for x in (tmp_path / "he" / "model.humaneval.test.items.jsonl").read_text().splitlines()]
    assert {"prompt", "output", "extracted", "reference", "correct", "execution"} <= set(rows[0])


def test_auto_batch_size_shrinks_after_out_of_memory_on_cuda():
    from pktransfer.evaluation.generation import run_batched

    class FakeCudaModel:
        def parameters(self):
            class P:
                device = torch.device("cuda")

            yield P()

    tried = []

    def fn(bs):
        tried.append(bs)
        if bs > 8:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return "done"

    result, used = run_batched(FakeCudaModel(), "auto", fn, start=64)
    assert result == "done" and used == tried[-1] <= 8 < tried[-2]
    assert tried[0] == 64 and tried == sorted(tried, reverse=True)  # shrinks until it fits
    assert run_batched(FakeCudaModel(), 5, fn) == ("done", 5)


def test_jsonl_task_refuses_an_unknown_scorer():
    with pytest.raises(pktransfer.RecipeError, match="unknown scorer 'bleu'"):
        get_task("jsonl", {"test": "x.jsonl", "scorer": "bleu"})


# ---- realistic chat answers through each protocol's extraction and scoring -------------------------------

CHAT_HUMANEVAL_ANSWER = (
    "Certainly! Here's a Python script that checks whether any two numbers are closer than the threshold:\n\n"
    "```python\nfrom typing import List\n\n\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
    "    for i, a in enumerate(numbers):\n        for b in numbers[i + 1:]:\n"
    "            if abs(a - b) < threshold:\n                return True\n    return False\n```\n\n"
    "### Explanation\n- We compare every pair.\n\n```python\nprint(has_close_elements([1.0, 2.0], 0.5))\n```\n"
)


def test_humaneval_chat_protocol_asks_for_a_code_block_and_keeps_the_answer_whole():
    from pktransfer.evaluation.sandbox import run_program

    he = get_task("humaneval")
    item = he.split("test")[0]
    prompt = he.eval_prompt(item, "chat")
    assert prompt.startswith("Please provide a self-contained Python script") and item.prompt.strip() in prompt
    assert he.eval_prompt(item, "plain") == item.prompt
    # the completion-style stop strings would cut "```python\nfrom typing import List\n" right where code starts
    assert he.stop_strings_for("chat") == () and "\ndef" in he.stop_strings_for("plain")
    program = he.program(item, CHAT_HUMANEVAL_ANSWER, "chat")
    assert program.count("def has_close_elements") == 1 and "print(" not in program.split("def check")[0]
    assert run_program(program).passed
    # an answer holding only the body after the signature is completed with the prompt, as in plain format
    body_only = "```python\n" + item.response + "```"
    assert run_program(he.program(item, body_only, "chat")).passed
    # a wrong function fails
    assert not run_program(he.program(item, CHAT_HUMANEVAL_ANSWER.replace("return True", "return False"), "chat")).passed


def test_humaneval_chat_answer_without_imports_gets_the_prompts_imports():
    from pktransfer.evaluation.sandbox import run_program

    he = get_task("humaneval")
    item = he.split("test")[0]
    answer = (
        "```python\n"
        + CHAT_HUMANEVAL_ANSWER.split("```python\n")[1].split("```")[0].replace("from typing import List\n", "")
        + "```"
    )
    assert "from typing import List" not in answer
    assert run_program(he.program(item, answer, "chat")).passed


def test_an_unclosed_code_block_cut_by_the_token_budget_is_still_extracted():
    from pktransfer.data.benchmarks import code_from_output

    assert code_from_output("Sure:\n```python\ndef f():\n    return 1\n", "f") == "def f():\n    return 1\n"
    assert code_from_output("def f():\n    return 1\n", "f") == "def f():\n    return 1\n"  # no fence: as is
    # seen from the offline student: a bare fence, then the language tag on its own line
    assert code_from_output("```\npython\ndef f():\n    return 1\n```", "f") == "def f():\n    return 1\n"


def test_mbpp_chat_answer_with_prose_and_fence():
    from pktransfer.data.tasks import Item
    from pktransfer.evaluation.sandbox import run_program

    mbpp = get_task("mbpp")
    item = Item(id="mbpp-x", prompt="", response="", reference="pass", metadata={"test": "\nassert add(1, 2) == 3", "task_id": 0})
    answer = "Here is the function:\n\n```python\ndef add(a, b):\n    return a + b\n```\n\nIt adds two numbers."
    assert run_program(mbpp.program(item, answer, "chat")).passed
    assert "[DONE]" in mbpp.stop_strings_for("chat")  # the few-shot template's end marker, in both formats


@needs_data
def test_gsm8k_chat_answer_is_scored_on_its_final_number():
    task = get_task("gsm8k")
    item = task.split("test")[0]
    answer = (
        f"Janet's ducks lay 16 eggs per day. She eats 3 and bakes with 4, so 16 - 3 - 4 = 9 eggs are left.\n"
        f"She sells them for $2 each: 9 * 2 = ${item.reference}.\n\nSo the answer is {item.reference}."
    )
    s = task.score(answer, item)
    assert s["correct"] and s["extracted"] == item.reference
    assert task.score(answer.replace(f"So the answer is {item.reference}.", "So the answer is 17."), item)["correct"] is False


def test_arithmetic_chat_answer_with_prose():
    task = get_task("arithmetic")
    item = task.split("test")[0]
    assert task.score(f"The answer is {item.reference}.", item)["correct"]
    assert task.score(f"{item.prompt.split('?')[0]} = {item.reference}", item)["correct"]


def test_super_ni_answer_is_normalised_before_exact_match():
    from pktransfer.data.tasks import Item

    task = get_task("super_ni")
    item = Item(id="x", prompt="Classify", response="Positive", reference="Positive")
    assert task.score("positive.", item)["correct"] and not task.score("The answer is negative", item)["correct"]


@pytest.mark.parametrize("family", ["qwen2", "llama", "gemma2"])
def test_shared_context_scoring_equals_scoring_each_continuation_alone(tmp_path, family):
    """Multi-token choices are scored from one cached read of each context (the planted-facts task's candidates):
    the sums must be those of scoring every (context + continuation) alone, for contexts of different lengths in one
    batch (right padding, positions after the real length) and continuations of different lengths (one token too).
    Gemma 2's short sliding window takes the separate path, which must give the same sums."""
    from conftest import STUDENT_SHAPE, make_model

    from pktransfer.evaluation import generation

    model = make_model(family, vocab=40, seed=3, **STUDENT_SHAPE).eval()
    g = torch.Generator().manual_seed(0)
    contexts = [torch.randint(4, 40, (n,), generator=g).tolist() for n in (9, 3, 6, 12)]
    conts = [
        [torch.randint(4, 40, (m,), generator=g).tolist() for m in lengths]
        for lengths in ([3, 2, 4], [1, 3], [2, 2, 2, 5], [4, 1])
    ]
    got = continuation_logliks(model, contexts, conts, batch_size=3, pad_id=0)
    assert generation._shared_context_fits(model, 17) == (family != "gemma2")  # the tiny Gemma 2 has a 16-token window
    with torch.no_grad():
        for i, ctx in enumerate(contexts):
            for j, cont in enumerate(conts[i]):
                logp = torch.log_softmax(model(input_ids=torch.tensor([ctx + cont])).logits.float(), -1)[0]
                want = sum(float(logp[len(ctx) - 1 + k, t]) for k, t in enumerate(cont))
                assert got[i][j] == pytest.approx(want, abs=1e-4), (i, j)
