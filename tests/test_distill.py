"""On-policy distillation (gkd), hidden-state distillation (hidden_kd) and composed transfers (compose)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import pktransfer
from pktransfer.errors import IncompatiblePairError
from pktransfer.methods.gkd import completion_tokens, gkd_loss, prompts_of, sampled_batch
from pktransfer.methods.hidden_kd import hidden_kd_loss
from pktransfer.ops.distill import generalized_jsd, hidden_distance, kl_to_teacher, uniform_layer_pairs
from pktransfer.recipe import recipe_from_dict

SEEKING = {"name": "seeking", "n_seed": 3}


def _recipe(base: dict, method: dict, **extra):
    return recipe_from_dict({**base, "method": method, **extra})


def _compose(start: dict, objective: dict) -> dict:
    return {"name": "compose", "start": start, "objective": objective}


# ---- the math --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_generalized_jsd_equals_trls_on_random_logits(beta):
    try:
        from trl.experimental.gkd import GKDTrainer
    except ImportError:  # TRL before GKD moved to experimental
        from trl import GKDTrainer

    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 11, generator=g) * 3, torch.randn(2, 5, 11, generator=g) * 3
    labels = torch.tensor([[-100, 4, 7, -100, 2], [1, -100, -100, 3, 9]])
    for temperature in (1.0, 2.0):
        theirs = GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=beta, temperature=temperature)
        mask = labels != -100
        ours = generalized_jsd(student[mask], teacher[mask], beta, temperature).mean()
        assert ours.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-7)


def test_generalized_jsd_by_hand():
    s = torch.tensor([[0.0, 0.0]])  # q = (1/2, 1/2)
    t = torch.tensor([[math.log(3.0), 0.0]])  # p = (3/4, 1/4)
    forward = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)  # KL(p || q)
    reverse = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # KL(q || p)
    assert generalized_jsd(s, t, 0.0).item() == pytest.approx(forward, rel=1e-6)
    assert generalized_jsd(s, t, 1.0).item() == pytest.approx(reverse, rel=1e-6)
    assert generalized_jsd(s, t, 0.0).item() == pytest.approx(kl_to_teacher(s, t, 1.0).item(), rel=1e-6)
    m = (0.625, 0.375)  # beta 0.5: m = (p + q) / 2
    jsd = 0.5 * (0.75 * math.log(0.75 / m[0]) + 0.25 * math.log(0.25 / m[1])) + 0.5 * (
        0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])
    )
    assert generalized_jsd(s, t, 0.5).item() == pytest.approx(jsd, rel=1e-5)  # float32
    assert generalized_jsd(t, t, 0.5).item() == pytest.approx(0.0, abs=1e-7)


def test_gkd_loss_averages_over_the_positions_that_predict_a_label():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(1, 4, 6, generator=g), torch.randn(1, 4, 6, generator=g)
    labels = torch.tensor([[-100, -100, 3, 5]])  # positions 1 and 2 predict tokens 2 and 3
    want = generalized_jsd(s[0, 1:3], t[0, 1:3], 0.5).mean()
    assert gkd_loss(s, t, labels, beta=0.5).item() == pytest.approx(want.item(), rel=1e-6)


def test_hidden_distances_and_the_loss_by_hand():
    a, b = torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 1.0], [2.0, 2.0]])
    assert hidden_distance(a, b, "mse").tolist() == pytest.approx([1.0, 1.0])
    assert hidden_distance(a, b, "cosine").tolist() == pytest.approx([1.0, 0.0], abs=1e-6)
    logits = torch.zeros(1, 3, 4)  # uniform: CE = log 4 per token
    labels = torch.tensor([[-100, 1, 2]])
    proj, target = [torch.ones(2, 2), torch.zeros(2, 2)], [torch.zeros(2, 2), torch.zeros(2, 2)]
    # mse per position: pair 1 -> 1, pair 2 -> 0; mean over pairs 0.5; summed over 2 positions: 1
    got = hidden_kd_loss(logits, labels, proj, target, alpha=0.25, distance="mse")
    assert got.item() == pytest.approx((0.75 * 2 * math.log(4) + 0.25 * 1.0) / 2, rel=1e-6)


def test_uniform_layer_pairs_by_hand():
    assert uniform_layer_pairs(2, 4) == [(0, 1), (1, 3)]
    assert uniform_layer_pairs(24, 28)[:3] == [(0, 0), (1, 1), (2, 2)] and uniform_layer_pairs(24, 28)[-1] == (23, 27)
    assert uniform_layer_pairs(3, 3) == [(0, 0), (1, 1), (2, 2)]
    with pytest.raises(ValueError):
        uniform_layer_pairs(4, 2)


def test_sampled_batches_keep_the_prompt_and_train_on_the_completion_only():
    ids = torch.tensor([[5, 6, 7, 8, 0], [5, 9, 10, 0, 0]])
    labels = torch.tensor([[-100, -100, 7, 8, -100], [-100, 9, 10, -100, -100]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    prompts = prompts_of(ids, labels, mask)
    assert prompts == [[5, 6], [5]]
    assert completion_tokens([4, 3, 9, 3], {3}) == [4, 3] and completion_tokens([4, 9], {3}) == [4, 9]
    batch = sampled_batch(prompts, [[11, 3], [12, 13, 3]], 0, 64, torch.tensor([0, 1]))
    assert batch["input_ids"].tolist() == [[5, 6, 11, 3], [5, 12, 13, 3]]
    assert batch["labels"].tolist() == [[-100, -100, 11, 3], [-100, 12, 13, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]


# ---- gkd: samples from the current weights, budgets ---------------------------------------------------------


def test_on_policy_samples_come_from_the_weights_of_the_current_step(tiny_recipe, tmp_path, monkeypatch):
    """Every sampling call sees the LoRA as the optimizer left it after the previous step, and the weights move."""
    from transformers import TrainerCallback

    import pktransfer.methods.gkd as gkd
    import pktransfer.pipeline as pipeline
    from pktransfer.methods.base import snapshot_lora

    at_step_begin: list[dict] = []
    seen_by_sampler: list[dict] = []

    class Snapshot(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kw):
            at_step_begin.append(snapshot_lora(model))

    real_sample = gkd.GkdMethod._sample

    def spy(self, model, prompts, ctx, who):
        assert who == "student"
        seen_by_sampler.append(snapshot_lora(model))
        return real_sample(self, model, prompts, ctx, who)

    real_callbacks = gkd.GkdMethod.callbacks
    monkeypatch.setattr(gkd.GkdMethod, "_sample", spy)
    monkeypatch.setattr(gkd.GkdMethod, "callbacks", lambda self, ctx: [*real_callbacks(self, ctx), Snapshot()])
    tiny_recipe["evaluation"].update(teacher=False, student=False)
    res = pktransfer.run(_recipe(tiny_recipe, {"name": "gkd", "lmbda": 1.0}), quiet=True, evaluate=False)
    assert len(seen_by_sampler) == len(at_step_begin) == 4
    for seen, begin in zip(seen_by_sampler, at_step_begin, strict=True):
        assert all(torch.equal(seen[k], begin[k]) for k in seen)
    assert any(not torch.equal(seen_by_sampler[0][k], seen_by_sampler[-1][k]) for k in seen_by_sampler[0])
    budget = res.run["budget"]
    assert budget["on_policy_batches"] == 4 and budget["student_generated_tokens"] > 0
    assert budget["student_generation_seconds"] > 0
    # the teacher scored every trained batch: at least the prompts of 4 batches of 4 plus their samples
    assert budget["teacher"]["forward_tokens"] >= budget["student_generated_tokens"]
    assert len(res.run["method"]["first_samples"]) == 4
    sample = res.run["method"]["first_samples"][0]
    assert sample["tokens"] and {"token", "student_logprob", "teacher_logprob", "jsd"} <= sample["tokens"][0].keys()
    assert "".join(t["token"] for t in sample["tokens"]) == sample["sample"]
    assert pipeline  # imported for monkeypatch targets in sibling tests


def test_gkd_with_lmbda_zero_and_no_seq_kd_trains_on_the_gold_responses_only(tiny_recipe, tmp_path):
    tiny_recipe["evaluation"].update(teacher=False, student=False)
    res = pktransfer.run(_recipe(tiny_recipe, {"name": "gkd", "lmbda": 0.0}), quiet=True, evaluate=False)
    assert res.run["budget"]["on_policy_batches"] == 0 and res.run["budget"]["student_generated_tokens"] == 0
    assert res.run["method"]["batches"] == 4


def test_gkd_warns_when_no_batch_was_sampled_on_policy(tiny_recipe, tmp_path):
    from pktransfer.progress import Progress

    warnings: list[str] = []
    progress = Progress(quiet=True)
    progress.warn = warnings.append  # type: ignore[method-assign]
    tiny_recipe["evaluation"].update(teacher=False, student=False)
    res = pktransfer.run(_recipe(tiny_recipe, {"name": "gkd", "lmbda": 1e-9}), progress=progress, evaluate=False)
    assert res.run["budget"]["on_policy_batches"] == 0
    assert any("none of the 4 training batches was sampled on-policy" in w for w in warnings), warnings
    assert res.run["method"]["sampling"]["repetition_penalty"] == 1.0 and res.run["method"]["sampling"]["top_k"] == 0


def test_gkd_samples_the_pure_policy_whatever_the_students_generation_config_says(tiny_models):
    """A checkpoint's generation_config (a repetition penalty, top-k) must not reshape the on-policy samples: with the
    same seed, samples are the same with a plain config and with one that sets them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from pktransfer.methods.gkd import pure_policy

    path = str(tiny_models["qwen2_student"])
    model, tok = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    ids = torch.tensor([tok("What is 12 + 30?")["input_ids"]])
    kwargs = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=24, pad_token_id=0)

    def sample(config: GenerationConfig) -> list[int]:
        model.generation_config = config
        torch.manual_seed(0)
        with torch.no_grad(), pure_policy(model):
            out = model.generate(input_ids=ids, **kwargs)[0].tolist()
        assert model.generation_config is config  # restored
        return out

    banned = list(range(4, len(tok), 2))  # a config that forbids half the vocabulary
    plain = sample(GenerationConfig())
    shaped = sample(GenerationConfig(repetition_penalty=1.5, top_k=3, no_repeat_ngram_size=2, suppress_tokens=banned))
    assert plain == shaped
    # without the guard the same config changes the samples (so the test can fail)
    model.generation_config = GenerationConfig(repetition_penalty=1.5, no_repeat_ngram_size=2, suppress_tokens=banned)
    torch.manual_seed(0)
    with torch.no_grad():
        assert model.generate(input_ids=ids, **kwargs)[0].tolist() != plain


def test_seq_kd_trains_on_the_teachers_samples(tiny_recipe, tmp_path):
    tiny_recipe["evaluation"].update(teacher=False, student=False)
    res = pktransfer.run(_recipe(tiny_recipe, {"name": "gkd", "lmbda": 0.0, "seq_kd": True}), quiet=True, evaluate=False)
    assert res.run["method"]["teacher_sampled_batches"] == 4 and res.run["method"]["teacher_generated_tokens"] > 0
    assert "teacher samples (seq_kd)" in res.run["budget"]["teacher"]["what"]


# ---- every new method through pkt run on two families ----------------------------------------------------------

NEW = [
    {"name": "gkd", "lmbda": 0.5},
    {"name": "hidden_kd"},
    {"name": "hidden_kd", "distance": "mse", "projection": "per_layer", "pairing": [[0, 1], [1, 3]]},
    _compose(SEEKING, {"name": "gkd", "lmbda": 1.0}),
    _compose({"name": "weight_selection"}, {"name": "kd"}),
    _compose({"name": "pissa"}, {"name": "hidden_kd"}),
]


@pytest.mark.parametrize("method", NEW, ids=["gkd", "hidden_kd", "hidden_kd-mse", "seeking+gkd", "ws+kd", "pissa+hidden_kd"])
@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_new_methods_train_save_a_plain_adapter_and_evaluate(tiny_recipe, tiny_models, tmp_path, family, method):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tiny_recipe["teacher"]["model"] = str(tiny_models[f"{family}_teacher"])
    tiny_recipe["student"]["model"] = str(tiny_models[f"{family}_student"])
    tiny_recipe["evaluation"]["teacher"] = False
    tiny_recipe["training"]["save_merged"] = True
    res = pktransfer.run(_recipe(tiny_recipe, method), quiet=True)
    assert res.run["training"]["steps"] == 4 and res.metrics["trained"]["test"]["n"] == 6
    # the adapter applies to the unmodified student (a composed start's is rebased like the start's own)
    student = AutoModelForCausalLM.from_pretrained(tiny_models[f"{family}_student"])
    merged = PeftModel.from_pretrained(student, str(res.output_dir / "adapter")).merge_and_unload()
    assert not any("hidden_projection" in k for k in merged.state_dict())
    evaluated = AutoModelForCausalLM.from_pretrained(str(res.output_dir / "merged"))  # what the run evaluated
    ids = torch.tensor([[5, 17, 30, 44, 60, 71, 2, 9]])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, evaluated(input_ids=ids).logits, atol=1e-4)


def test_compose_of_the_plain_start_and_kd_trains_exactly_what_kd_trains(tiny_recipe, tmp_path):
    tiny_recipe["evaluation"].update(teacher=False, student=False)
    outs = {}
    for name, method in (
        ("kd", {"name": "kd", "alpha": 0.7}),
        ("lora+kd", _compose({"name": "lora"}, {"name": "kd", "alpha": 0.7})),
    ):
        tiny_recipe["output_dir"] = str(tmp_path / name)
        res = pktransfer.run(_recipe(tiny_recipe, method), quiet=True, evaluate=False)
        outs[name] = load_file(str(tmp_path / name / "adapter" / "adapter_model.safetensors"))
        assert res.run["training"]["final_loss"] is not None
    for k in outs["kd"]:
        assert torch.equal(outs["kd"][k], outs["lora+kd"][k]), k


def test_a_composed_start_is_the_start_alone_at_step_0(tiny_recipe, tmp_path):
    """seeking+gkd's student before training equals Seeking's (and so the original student's outputs)."""
    from conftest import tiny_method_context

    from pktransfer.methods.base import snapshot_lora

    ids = torch.tensor([[5, 17, 30, 44, 60, 71, 2, 9]])
    original = None
    starts = {}
    for name, method in (("seeking", SEEKING), ("composed", _compose(SEEKING, {"name": "gkd"}))):
        recipe = _recipe(tiny_recipe, method)
        m, ctx = tiny_method_context(recipe, tmp_path / name)
        (tmp_path / name).mkdir()
        if original is None:
            with torch.no_grad():
                original = ctx.student.model(input_ids=ids).logits
        model = m.prepare(ctx)
        model.eval()
        with torch.no_grad():
            assert torch.allclose(model(input_ids=ids).logits, original, atol=1e-4)
        starts[name] = snapshot_lora(model)
    for k in starts["seeking"]:
        assert torch.equal(starts["seeking"][k], starts["composed"][k]), k


class Interrupt(Exception):
    pass


def _stop_at_step_3() -> object:
    """A callback that crashes training at the end of step 3 (after checkpoint-2): a run to resume."""
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:
                raise Interrupt

    return StopAt()


def test_a_composed_run_resumes_to_the_same_adapter(tiny_recipe, tmp_path, monkeypatch):
    import pktransfer.methods.hidden_kd as hidden_kd

    method = _compose(SEEKING, {"name": "hidden_kd", "distance": "mse"})
    tiny_recipe["evaluation"].update(teacher=False, student=False)
    tiny_recipe["output_dir"] = str(tmp_path / "full")
    pktransfer.run(_recipe(tiny_recipe, method), quiet=True, evaluate=False)
    tiny_recipe["output_dir"] = str(tmp_path / "cut")
    real = hidden_kd.HiddenKdMethod.callbacks
    monkeypatch.setattr(hidden_kd.HiddenKdMethod, "callbacks", lambda self, ctx: [*real(self, ctx), _stop_at_step_3()])
    with pytest.raises(Interrupt):
        pktransfer.run(_recipe(tiny_recipe, method), quiet=True, evaluate=False)
    assert (tmp_path / "cut.partial" / "checkpoints" / "checkpoint-2" / hidden_kd.PROJECTION_FILE).is_file()
    monkeypatch.setattr(hidden_kd.HiddenKdMethod, "callbacks", real)
    res = pktransfer.run(_recipe(tiny_recipe, method), quiet=True, evaluate=False)
    assert res.run["training"]["resumed_from"].endswith("checkpoint-2")
    a = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter" / "adapter_model.safetensors"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_a_grid_composes_shares_the_start_and_tunes_an_objective_key(tiny_recipe, tmp_path, monkeypatch):
    import pktransfer.methods.seeking as seeking

    calls = []
    real = seeking.measured_sensitivity
    monkeypatch.setattr(seeking, "measured_sensitivity", lambda *a, **k: calls.append(1) or real(*a, **k))
    tiny_recipe["task"]["validation"] = 4
    tiny_recipe["compare"] = {
        "methods": [
            "lora",
            {"name": "seeking", "n_seed": 3},
            {
                **_compose(SEEKING, {"name": "gkd"}),
                "tune": {"key": "method.objective.lmbda", "values": [1.0, 0.0]},
            },
        ],
        "seeds": [0],
    }
    res = pktransfer.compare(recipe_from_dict(tiny_recipe), quiet=True)
    labels = res.result["summary"]["labels"]
    assert labels == ["lora", "seeking", "seeking+gkd"]
    assert len(calls) == 1  # one sensitivity for the Seeking entry and the composed start
    assert res.result["chosen"]["seeking+gkd"]["method.objective.lmbda"] in (1.0, 0.0)
    assert res.result["groups"]["seeking+gkd"] == "composed"
    md = (res.output_dir / "compare.md").read_text()
    assert "student samples (tokens)" in md and "teacher-derived start + teacher objective" in md


def test_recipes_refuse_a_start_as_objective_and_name_the_choices(tiny_recipe):
    from pktransfer.errors import RecipeError

    with pytest.raises(RecipeError, match="expected tags"):
        _recipe(tiny_recipe, _compose({"name": "lora"}, {"name": "seeking"}))
    with pytest.raises(RecipeError, match="expected tags"):
        _recipe(tiny_recipe, _compose({"name": "kd"}, {"name": "gkd"}))


# ---- vocabularies padded differently ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def padded_teachers(tmp_path_factory):
    """The tiny Qwen2 teacher with 16 extra padding rows in its embedding and lm_head (same tokenizer), and one
    whose tokenizer really differs."""
    from conftest import TEACHER_SHAPE, make_model, make_tokenizer

    root = tmp_path_factory.mktemp("padded")
    tok = make_tokenizer()
    padded = make_model("qwen2", vocab=len(tok) + 16, seed=1, **TEACHER_SHAPE)
    padded.save_pretrained(root / "padded")
    tok.save_pretrained(root / "padded")
    other = make_tokenizer()
    other.add_tokens(["<extra_token>"])
    different = make_model("qwen2", vocab=len(other), seed=1, **TEACHER_SHAPE)
    different.save_pretrained(root / "different")
    other.save_pretrained(root / "different")
    return {"padded": root / "padded", "different": root / "different"}


@pytest.mark.parametrize(
    "method",
    [
        {"name": "kd"},
        {"name": "kd", "cache": False},
        {"name": "gkd", "lmbda": 1.0},
        {"name": "semalign", "critical_layers": "all", "output_loss": "kl"},
        {"name": "hidden_kd"},  # never reads the teacher's logits at all
    ],
    ids=["kd", "kd-live", "gkd", "semalign-kl", "hidden_kd"],
)
def test_objectives_accept_a_teacher_padded_beyond_the_shared_tokenizer(tiny_recipe, padded_teachers, method):
    tiny_recipe["teacher"]["model"] = str(padded_teachers["padded"])
    tiny_recipe["evaluation"].update(teacher=False, student=False)
    res = pktransfer.run(_recipe(tiny_recipe, method), quiet=True, evaluate=False)
    assert res.run["training"]["steps"] == 4 and math.isfinite(res.run["training"]["final_loss"])


@pytest.mark.parametrize("method", [{"name": "kd"}, {"name": "gkd"}], ids=["kd", "gkd"])
def test_a_teacher_with_another_tokenizer_is_one_clear_error(tiny_recipe, padded_teachers, method, tmp_path):
    tiny_recipe["teacher"]["model"] = str(padded_teachers["different"])
    tiny_recipe["evaluation"].update(teacher=False, student=False)
    with pytest.raises(IncompatiblePairError, match="different vocabularies"):
        pktransfer.run(_recipe(tiny_recipe, method), quiet=True, evaluate=False)


def test_a_resumed_run_reports_the_cost_of_the_whole_run(tiny_recipe, tmp_path, monkeypatch):
    """A run stopped after its checkpoint at step 2 and resumed reports what one uninterrupted run reports: the
    teacher's tokens, the student's on-policy samples and the learning curve of every step, the earlier attempt's
    up to the checkpoint kept in its cost ledger. (Before the ledger a resumed gkd cell of the MMLU study counted
    the 8 steps of its last attempt only.)"""
    import pktransfer.methods.gkd as gkd
    from pktransfer.pipeline import LEDGER
    from pktransfer.study.records import resumed_cost

    method = {"name": "gkd", "lmbda": 0.5}
    tiny_recipe["task"]["validation"] = 4
    tiny_recipe["evaluation"].update(teacher=False, student=False, learning_curve=3)
    tiny_recipe["training"].update(max_steps=6, save_steps=2)
    tiny_recipe["output_dir"] = str(tmp_path / "full")
    full = pktransfer.run(_recipe(tiny_recipe, method), quiet=True, evaluate=False).run
    tiny_recipe["output_dir"] = str(tmp_path / "cut")
    real = gkd.GkdMethod.callbacks
    monkeypatch.setattr(gkd.GkdMethod, "callbacks", lambda self, ctx: [*real(self, ctx), _stop_at_step_3()])
    with pytest.raises(Interrupt):
        pktransfer.run(_recipe(tiny_recipe, method), quiet=True, evaluate=False)
    kept = json.loads((tmp_path / "cut.partial" / "checkpoints" / "checkpoint-2" / LEDGER).read_text())
    assert kept["step"] == 2 and kept["attempts"] == 1 and kept["teacher"]["forward_tokens"] > 0
    monkeypatch.setattr(gkd.GkdMethod, "callbacks", real)
    cut = pktransfer.run(_recipe(tiny_recipe, method), quiet=True, evaluate=False).run
    assert cut["training"]["resumed_from"].endswith("checkpoint-2")
    assert cut["budget"]["teacher"]["forward_tokens"] == full["budget"]["teacher"]["forward_tokens"]
    for key in ("student_generated_tokens", "on_policy_batches", "training_tokens", "optimizer_steps"):
        assert cut["budget"][key] == full["budget"][key], key
    assert cut["training"]["learning_curve"] == full["training"]["learning_curve"]
    assert [p["step"] for p in cut["training"]["learning_curve"]] == [2, 4, 6]
    earlier = cut["training"]["earlier_attempts"]
    assert earlier["step"] == 2 and earlier["attempts"] == 1 and earlier["cost_kept"] is True
    assert cut["training"]["seconds"] == pytest.approx(
        cut["training"]["seconds_this_attempt"] + earlier["train_seconds"], abs=0.02
    )
    assert resumed_cost(cut) == earlier and resumed_cost(full) == {}
    # a run resumed before the ledger existed: its step from the checkpoint's name, its cost marked partial
    old = {"training": {"steps": 32, "resumed_from": "/x/checkpoints/checkpoint-24"}}
    assert resumed_cost(old) == {"step": 24, "cost_kept": False}


def test_losses_on_the_logits_at_kept_positions_equal_the_full_ones_to_the_bit():
    """gkd, hidden_kd and kd compute the LM head only where a response token is predicted (logits_to_keep): the
    rows the losses read, their order, the loss and its gradient are those of the logits at every position."""
    from pktransfer.methods.kd import kd_loss
    from pktransfer.training import IGNORE_INDEX, causal_lm_loss_sum, kept_positions

    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 9, 13, generator=g, requires_grad=True)
    t = torch.randn(3, 9, 13, generator=g)
    labels = torch.full((3, 9), IGNORE_INDEX)
    labels[0, 4:7] = torch.tensor([1, 2, 3])
    labels[1, 6:9] = torch.tensor([4, 5, 6])
    labels[2, 2:3] = 7
    keep = kept_positions(labels)
    assert keep.tolist() == [1, 3, 4, 5, 6, 7]  # positions predicting a response token in some row
    t_rows = torch.randn(7, 4, generator=g)  # the teacher's top-4 logits at the 7 response positions (KD's cache)
    t_ids = torch.randint(0, 13, (7, 4), generator=g)
    for fn in (
        lambda logits, k: gkd_loss(logits, t if k is None else t[:, k], labels, beta=0.5, keep=k),
        lambda logits, k: causal_lm_loss_sum(logits, labels, k),
        lambda logits, k: kd_loss(logits, labels, t_rows, t_ids, temperature=2.0, alpha=0.5, keep=k),
    ):
        full = fn(s, None)
        (g_full,) = torch.autograd.grad(full, s)
        kept = fn(s[:, keep], keep)
        (g_kept,) = torch.autograd.grad(kept, s)
        assert torch.equal(full, kept) and torch.equal(g_full, g_kept)


def test_distillation_trains_on_the_logits_of_response_positions_only(tiny_recipe, tmp_path, monkeypatch):
    import pktransfer.methods.gkd as gkd
    import pktransfer.methods.hidden_kd as hidden_kd
    import pktransfer.methods.kd as kd

    widths: dict[str, list[tuple[int, int]]] = {}
    for cls in (gkd.GkdMethod, hidden_kd.HiddenKdMethod, kd.KdMethod):
        real = cls.training_loss

        def spy(self, ctx, real=real):
            inner = real(self, ctx)

            def loss(outputs, batch, n):
                key = self.name + ("-live" if getattr(self.spec, "cache", True) is False else "")
                widths.setdefault(key, []).append((outputs.logits.shape[1], batch["input_ids"].shape[1]))
                return inner(outputs, batch, n)

            loss.response_logits = inner.response_logits
            return loss

        monkeypatch.setattr(cls, "training_loss", spy)
    tiny_recipe["evaluation"].update(teacher=False, student=False)
    for name, method in (("gkd", {}), ("hidden_kd", {}), ("kd", {}), ("kd-live", {"cache": False})):
        tiny_recipe["output_dir"] = str(tmp_path / name)
        pktransfer.run(_recipe(tiny_recipe, {"name": name.split("-")[0], **method}), quiet=True, evaluate=False)
    for name in ("gkd", "hidden_kd", "kd", "kd-live"):
        assert widths[name] and all(kept < length for kept, length in widths[name]), (name, widths[name])


def test_hidden_kd_accumulates_exactly_and_distils_every_token_on_request(tiny_recipe, tmp_path, monkeypatch):
    """With grad_accum 2 the loss is normalised by the accumulated batch's token count (the trainer's), not each
    micro-batch's own: its rewrite that asks for hidden states keeps the trainer's count."""
    from pktransfer.methods import hidden_kd

    seen = []
    real = hidden_kd.hidden_kd_loss

    def spy(*args, **kwargs):
        seen.append((kwargs["n_tokens"], kwargs["weight"], len(args[2][0]) if args[2] else 0))
        return real(*args, **kwargs)

    monkeypatch.setattr(hidden_kd, "hidden_kd_loss", spy)
    tiny_recipe["evaluation"].update(teacher=False, student=False)
    tiny_recipe["training"].update(batch_size=4, grad_accum=2, max_steps=1)
    pktransfer.run(_recipe(tiny_recipe, {"name": "hidden_kd"}), quiet=True, evaluate=False)
    assert len(seen) == 2 and all(n is not None for n, _, _ in seen)  # both micro-batches: the trainer's count
    assert seen[0][0] == seen[1][0] and all(w == 1.0 for _, w, _ in seen)
    seen.clear()
    tiny_recipe["output_dir"] = str(tmp_path / "all")
    res = pktransfer.run(_recipe(tiny_recipe, {"name": "hidden_kd", "positions": "all"}), quiet=True, evaluate=False)
    assert res.run["method"]["positions"] == "all"
    assert all(w < 1.0 for _, w, _ in seen)  # more distilled tokens than response tokens, weighted as the response
