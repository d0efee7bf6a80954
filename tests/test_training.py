from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pktransfer.data import PromptFormatter, encode_items, get_task
from pktransfer.models import load_model
from pktransfer.pipeline import seed_everything
from pktransfer.recipe import LoraSpec, ModelSpec, TrainingSpec
from pktransfer.training import train


def _setup(tiny_models, seed: int = 0):
    from peft import get_peft_model

    from pktransfer.training import lora_config

    student = load_model(ModelSpec(model=str(tiny_models["qwen2_student"]), device="cpu"))
    task = get_task("arithmetic", {"sizes": {"test": 4, "seed": 2, "extract": 2, "align": 2, "train": 24}})
    f = PromptFormatter(student.tokenizer)
    examples = encode_items(f, task.split("train"), 64, "train")
    seed_everything(seed)
    model = get_peft_model(student.model, lora_config(LoraSpec(r=4, alpha=8, dropout=0.1), student.arch))
    return student, model, examples


SPEC = TrainingSpec(max_steps=6, batch_size=4, lr=5e-3, max_length=64, save_steps=2, logging_steps=1)


def _train(tiny_models, out: Path, spec: TrainingSpec = SPEC, callbacks=None, seed: int = 0):
    student, model, examples = _setup(tiny_models, seed)
    res = train(model, student.tokenizer, examples, spec, output_dir=out / "ckpt", seed=seed, callbacks=callbacks)
    model.save_pretrained(str(out / "adapter"))
    return res, model, student


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def test_training_lowers_the_loss_and_logs(tiny_models, tmp_path):
    res, _, _ = _train(
        tiny_models,
        tmp_path,
        TrainingSpec(max_steps=12, batch_size=4, lr=1e-2, max_length=64, save_steps=50, logging_steps=1, warmup_ratio=0),
    )
    losses = [h["loss"] for h in res.log_history if "loss" in h]
    assert res.steps == 12 and len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert (tmp_path / "ckpt" / "log_history.json").is_file()


def test_same_seed_same_adapter(tiny_models, tmp_path):
    _train(tiny_models, tmp_path / "a")
    _train(tiny_models, tmp_path / "b")
    _train(tiny_models, tmp_path / "c", seed=1)
    a, b, c = _adapter(tmp_path / "a"), _adapter(tmp_path / "b"), _adapter(tmp_path / "c")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_adapter_round_trip_with_peft(tiny_models, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, model, _student = _train(tiny_models, tmp_path)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(str(tiny_models["qwen2_student"]))
        plain = base(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
        got = reloaded(input_ids=ids).logits
    assert torch.allclose(expected, got, atol=1e-5)
    assert not torch.allclose(plain, got, atol=1e-4)  # the adapter really changes the model


class _Interrupt(Exception):
    pass


def test_resume_after_interruption_equals_uninterrupted(tiny_models, tmp_path):
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:
                raise _Interrupt

    _train(tiny_models, tmp_path / "full")
    with pytest.raises(_Interrupt):
        _train(tiny_models, tmp_path / "cut", callbacks=[StopAt()])
    assert (tmp_path / "cut" / "ckpt" / "checkpoint-2").is_dir()
    res, _, _ = _train(tiny_models, tmp_path / "cut")
    assert res.resumed_from and res.resumed_from.endswith("checkpoint-2")
    full, resumed = _adapter(tmp_path / "full"), _adapter(tmp_path / "cut")
    for k in full:
        assert torch.allclose(full[k], resumed[k], atol=1e-6), k


def test_warmup_is_passed_as_a_ratio_on_every_transformers_version(monkeypatch):
    """4.x reads a float warmup_steps as a step count (warmup would silently vanish): it gets warmup_ratio."""
    from dataclasses import field, make_dataclass

    import transformers

    from pktransfer.training import warmup_kwargs

    v4 = make_dataclass(
        "TrainingArguments", [("warmup_ratio", float, field(default=0.0)), ("warmup_steps", int, field(default=0))]
    )
    monkeypatch.setattr(transformers, "TrainingArguments", v4)
    assert warmup_kwargs(0.05) == {"warmup_ratio": 0.05}
    v5 = make_dataclass("TrainingArguments", [("warmup_steps", float, field(default=0.0))])
    monkeypatch.setattr(transformers, "TrainingArguments", v5)
    assert warmup_kwargs(0.05) == {"warmup_steps": 0.05}


def test_the_installed_trainer_warms_up_over_the_given_share_of_steps():
    from transformers import TrainingArguments

    from pktransfer.training import warmup_kwargs

    args = TrainingArguments(output_dir="/tmp/pkt-warmup-check", max_steps=100, report_to=[], **warmup_kwargs(0.1))
    assert args.get_warmup_steps(100) == 10


def test_cpu_training_trims_the_heap_after_every_step(tiny_models, tmp_path, monkeypatch):
    """glibc keeps a step's freed activations in its heaps unless trimmed: a long CPU cell grew until killed."""
    import pktransfer.memory

    calls = []
    monkeypatch.setattr(pktransfer.memory, "trim_heap", lambda: calls.append(1))
    res, _, _ = _train(tiny_models, tmp_path)
    assert res.steps == SPEC.max_steps and len(calls) == SPEC.max_steps


@pytest.mark.parametrize("averaging", ["tokens", "micro_batch"])
def test_loss_averaging_over_the_accumulated_micro_batches(tiny_models, tmp_path, monkeypatch, averaging):
    """grad_accum 2: the first step's gradient is that of the token mean over both micro-batches (tokens) or of the
    mean of each micro-batch's token mean (micro_batch, the 2023 Trainer's), recomputed here by hand."""
    from peft import get_peft_model
    from transformers import TrainerCallback

    import pktransfer.training as tr

    batches: list[dict[str, torch.Tensor]] = []

    class Recording(tr.Collator):
        def __call__(self, batch):
            out = super().__call__(batch)
            batches.append({k: out[k].clone() for k in ("input_ids", "attention_mask", "labels")})
            return out

    monkeypatch.setattr(tr, "Collator", Recording)
    grads: dict[str, torch.Tensor] = {}

    class Grab(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            if not grads:
                grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})

    def fresh():
        student = load_model(ModelSpec(model=str(tiny_models["qwen2_student"]), device="cpu"))
        seed_everything(0)
        return student, get_peft_model(student.model, tr.lora_config(LoraSpec(r=4, alpha=8, dropout=0.0), student.arch))

    student, model = fresh()
    task = get_task("arithmetic", {"sizes": {"test": 4, "seed": 2, "extract": 2, "align": 2, "train": 24}})
    examples = encode_items(PromptFormatter(student.tokenizer), task.split("train"), 64, "train")
    examples = examples[:2]  # one step of two micro-batches: both examples, with unequal target counts
    masked = [j for j, t in enumerate(examples[0].labels) if t != -100][:-1]
    examples[0].labels = [-100 if j in masked else t for j, t in enumerate(examples[0].labels)]
    spec = TrainingSpec(max_steps=1, batch_size=1, grad_accum=2, lr=1e-3, max_length=64, warmup_ratio=0, loss_averaging=averaging)
    train(model, student.tokenizer, examples, spec, output_dir=tmp_path / "ckpt", seed=0, callbacks=[Grab()])
    _, ref = fresh()  # the same starting weights
    sums, counts = [], []
    for b in batches[:2]:
        logits = ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        target = b["labels"][:, 1:]
        keep = target != -100
        sums.append(torch.nn.functional.cross_entropy(logits[keep].float(), target[keep], reduction="sum"))
        counts.append(int(keep.sum()))
    assert counts[0] != counts[1]  # otherwise both averagings agree and this test could not tell them apart
    token_mean = (sums[0] + sums[1]) / (counts[0] + counts[1])
    batch_mean = (sums[0] / counts[0] + sums[1] / counts[1]) / 2
    (token_mean if averaging == "tokens" else batch_mean).backward()
    got = torch.cat([grads[n].flatten() for n in sorted(grads)])
    want = torch.cat([p.grad.flatten() for n, p in sorted(ref.named_parameters()) if p.requires_grad])
    # gradient clipping may scale the whole vector: compare directions
    assert torch.allclose(got / got.norm(), want / want.norm(), atol=1e-5), (got / got.norm() - want / want.norm()).abs().max()


def test_steps_per_epoch_floor_counts_as_the_2023_trainer():
    """ParaKnowTransfer: 1,000 items, 8 per GPU x 2 GPUs x 4 accumulation, 3 epochs: 63 micro-batches per GPU per
    epoch, 63 // 4 = 15 steps, 45 in all (today's count: 48); here the same global batch 8 x 8 on one device."""
    from pktransfer.training import total_steps

    spec = TrainingSpec(epochs=3, batch_size=8, grad_accum=8, steps_per_epoch="floor")
    assert total_steps(spec, 1000) == 45 and total_steps(spec, 800) == 36
    assert total_steps(TrainingSpec(epochs=3, batch_size=16, grad_accum=4, steps_per_epoch="floor"), 1000) == 45
    assert total_steps(TrainingSpec(epochs=3, batch_size=8, grad_accum=8), 1000) is None  # ceil: the trainer's own 48
    assert total_steps(TrainingSpec(epochs=0.5, batch_size=8, steps_per_epoch="floor"), 3) == 1  # at least one
    assert total_steps(TrainingSpec(max_steps=7, steps_per_epoch="floor"), 1000) == 7
