"""LaTen (Tan et al., "Neural Incompatibility", ACL 2025), "PrePKT": locate, align, inject, no post-training.

Reads like methods.md §2 and, where the paper is silent, like the official code (``train_LaTen.py``,
``inference_LaTen.py``); every remaining difference is listed in docs/methods/laten.md.

1. Locate (``ops.neurons``), in teacher and student alike, on the answer token y: the last token of the
   response after trailing ``. " ) , ] \n`` and spaces are stripped (official), through the logit lens
   log p(y | h) = log_softmax(lm_head(final_norm(h)))[y]:
   - layer scores for attention and FFN: log p(y | h + out_l) − log p(y | h), h the residual before
     the sublayer;
   - neuron scores: FFN neuron i adds m_i·W_down[:, i], attention neuron (head, head-dim) j adds
     a_j·W_o[:, j] (a: attention output before o_proj).
   The top L_S teacher layers (attention and FFN separately) are paired in order with the student's
   layers; in each pair the top ``transfer_rate`` of the student's neuron count is kept in both
   models, the i-th best teacher neuron feeding the i-th best student neuron. ``locate: per_example``
   (official) does this anew on each update's extract item; ``averaged`` once on the mean scores.
2. Extract the teacher's up_proj rows and down_proj columns of the located FFN neurons, v_proj rows and
   o_proj columns of the located attention neurons (v rows through the grouped kv head).
3. Align: one hypernetwork per module type, shared across layers, on the hidden axis D_T -> D_S:
   Linear(D_T, D_T) -> ReLU -> Linear(D_T, D_S), no bias, weights N(0, init_std), float32.
4. Inject: add the mapped vectors at the student's own located rows/columns (forward hooks while
   training, so no dense delta is ever formed; merged into the weights at the end).
5. Train only the hypernetworks, one update per extract item (official loop): the item + 15 align
   items, each its own micro-batch (CE gradients summed) + n · penalty · MSE(Δ, 0) per module type over
   all its layers; AdamW (wd 0.05, betas 0.9/0.95, lr 3e-4 as the shipped script); OneCycleLR(total =
   number of extract items, pct_start 0.1, final_div_factor 1, cosine). A checkpoint per update; the
   one kept is ``checkpoint`` (the paper's per-task "steps" = the official checkpoint index), or with
   ``choose: validation`` the lowest cross entropy on held-out align items. The test split is never read.
6. The saved model: the injection located on one training item drawn with the seed (official
   inference; ``inject_on: extract_mean`` uses the extract items' mean scores) is merged into the
   weights in float32 (a bfloat16 student is upcast: a delta of norm ~1e-3 would vanish in bfloat16
   weights). The official code saves the unmodified student; ``laten/delta.safetensors`` holds the
   delta's indices and values, and a test proves merged = original + delta.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from pktransfer.config import MethodConfig
from pktransfer.data import IGNORE_INDEX, Example, encode_items, train_and_validation
from pktransfer.errors import DataError, IncompatiblePairError, RecipeError
from pktransfer.fileio import save_safetensors, torch_save, write_json
from pktransfer.methods.base import Method, MethodContext, n_tokens
from pktransfer.models.pair import check_pair
from pktransfer.ops.hypernet import HyperNet, Injection, choose_step, delta_penalty, mapped_deltas, one_cycle
from pktransfer.ops.location import ROLES, AnswerInput, extract, locate_scores, mean_scores, plan_transfer
from pktransfer.progress import Progress
from pktransfer.runs import recipe_sha256
from pktransfer.training import causal_lm_loss_sum, collate_examples

# ---- 1. locate: the answer token, and the located items a grid shares ----------------------------------


# the official code strips these from the end of the response before taking its last token as y (so a GSM8K
# answer "... So the answer is 12." is located on "12", not on ".")
ANSWER_STRIP = (".", '"', " ", ")", "\n", ",", "]")


def strip_answer(text: str) -> str:
    while text and text[-1] in ANSWER_STRIP:
        text = text[:-1]
    return text


def answer_input(formatter: Any, item: Any) -> AnswerInput:
    """Prompt (as the model sees it) + the response stripped of trailing punctuation and spaces; y = its last
    token (official ``get_top_attribute_layers``). In the tulu format the whole text is tokenised at once, as the
    official code does; otherwise prompt and response separately, as in training."""
    if formatter.mode == "tulu":  # official: encode(prompt + stripped answer) as one text (knowledge_neurons.py L229-232)
        whole = formatter.encode_text(formatter.prompt_text(item.prompt) + strip_answer(item.response))
        n_prompt = len(formatter.encode_prompt(item.prompt))
        prompt, resp = whole[:n_prompt], whole[n_prompt:]
    else:
        prompt = formatter.encode_prompt(item.prompt)
        resp = list(formatter.tokenizer(strip_answer(item.response), add_special_tokens=False)["input_ids"])
    if not resp:
        raise DataError(
            f"laten: item '{item.id}' has no answer token left after stripping trailing punctuation",
            hint="LaTen locates neurons on the last answer token; give the item a non-empty response",
        )
    ids = prompt + resp
    return AnswerInput(tuple(ids[:-1]), int(ids[-1]))


LOCATION_CACHE_VERSION = 1  # bump when locate_scores computes something else for the same inputs


class LocationCache:
    """The location scores of single items, one file per (model, item), in a folder several runs share (a grid's
    shared/laten-location): the tuning cells and seeds of one LaTen entry locate the same extract items, each
    item alone (batch of one), so a score read back is the one the run would compute, to the bit (tested).

    A file is named by the SHA-256 of everything its scores depend on: the model as the recipe names it, the dtype
    it is scored in, the location settings, the tokens and the answer token. An unreadable or misshapen file is
    computed anew and replaced. ``folder`` None: every item is computed."""

    def __init__(self, folder: Path | None, progress: Progress) -> None:
        self.folder = folder
        self.progress = progress
        self.computed: list[bool] = []  # of the last ``scores`` call: which items were computed (not read back)

    @staticmethod
    def key(model: dict[str, Any], dtype: torch.dtype, where: dict[str, Any], inp: AnswerInput) -> str:
        fields = {"version": LOCATION_CACHE_VERSION, "model": model, "dtype": str(dtype), **where}
        fields.update(ids=list(inp.ids), y=inp.y)
        return recipe_sha256(fields)

    def _read(self, path: Path, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor] | None:
        from safetensors.torch import load_file

        if not path.is_file():
            return None
        try:
            got = load_file(str(path))
        except Exception as err:  # a corrupt entry is not reused: it is computed again and replaced
            self.progress.warn(f"laten: location cache entry {path.name} is unreadable ({err}); locating that item again")
            return None
        if {k: tuple(v.shape) for k, v in got.items()} != shapes or any(v.dtype != torch.float64 for v in got.values()):
            self.progress.warn(f"laten: location cache entry {path.name} has other shapes than this model's; locating again")
            return None
        return got

    def scores(
        self, loaded: Any, model: dict[str, Any], where: dict[str, Any], inputs: list[AnswerInput], what: str
    ) -> tuple[list[dict[str, torch.Tensor]], int]:
        """Every input's scores in ``loaded`` (read back, or located and stored) and how many were located."""
        arch = loaded.arch
        shapes = {
            "attn_layer": (arch.n_layers,),
            "ffn_layer": (arch.n_layers,),
            "attn": (arch.n_layers, arch.n_heads * arch.head_dim),
            "ffn": (arch.n_layers, arch.intermediate_size),
        }
        dtype = next(loaded.model.parameters()).dtype
        paths = (
            [self.folder / f"{self.key(model, dtype, where, inp)}.safetensors" for inp in inputs]
            if self.folder is not None
            else [None] * len(inputs)
        )
        found = [self._read(p, shapes) if p is not None else None for p in paths]
        todo = [i for i, f in enumerate(found) if f is None]
        if todo:

            def store(n: int, sc: dict[str, torch.Tensor]) -> None:  # each item as soon as it is located
                i = todo[n]
                found[i] = sc
                if paths[i] is not None:
                    save_safetensors(sc, paths[i])

            locate_scores(
                loaded,
                [inputs[i] for i in todo],
                vocab_k=where["locate_vocab"],
                attn_score=where["attn_score"],
                progress=self.progress,
                what=what,
                on_item=store,
            )
        if self.folder is not None and len(todo) < len(inputs):
            self.progress.log(f"laten: {len(inputs) - len(todo)} of {len(inputs)} {what} locations read from {self.folder}")
        computed = set(todo)
        self.computed = [i in computed for i in range(len(inputs))]
        return [f for f in found if f is not None], len(todo)


# The location, extraction, hypernetwork and injection math lives in ``ops.location`` and ``ops.hypernet``; this file
# holds the training loop's data order and the method itself.

# ---- 5. train: the data order of the official loop, and the hypernetworks on disk ------------------------------


def mean_ce(model: Any, batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    labels = batch["labels"].to(device)
    return causal_lm_loss_sum(out.logits, labels) / (labels[:, 1:] != IGNORE_INDEX).sum().clamp_min(1)


def step_batch(
    step: int, extract: list[Example], align: list[Example], partners: int, seed: int, order: str = "official"
) -> list[Example]:
    """Step s's batch: ``partners`` align examples and extract example s mod n; resumable (a function of s).

    ``official``: ``random.seed(s); random.sample(range(len(align)), 15)``, the extract item appended last
    (train_LaTen.py L241-246); ``file``: the extract item first, partners drawn with (seed, s)."""
    k = min(partners, len(align))
    if order == "official":
        return [*(align[i] for i in random.Random(step).sample(range(len(align)), k)), extract[step % len(extract)]]
    rng = random.Random(seed * 100_003 + step)
    return [extract[step % len(extract)], *rng.sample(align, k)]


def datasets_shuffle_orders(seed: int, sizes: list[int]) -> list[list[int]]:
    """The orders ``Dataset.shuffle()`` (no seed) gives to datasets of these sizes, shuffled one after the other right
    after ``set_seed(seed)``: datasets seeds its generator from numpy's global state and steps it once per shuffle.
    The official scripts shuffle this way (train_LaTen.py L97 then L142-146: extract, then align; inference_LaTen.py
    L122: the train split)."""
    import numpy as np

    state = np.random.RandomState(seed)
    orders = []
    for n in sizes:
        _, keys, pos, *_ = state.get_state()
        generator_seed = keys[pos] if pos < 624 else keys[0]
        state.random_sample()
        orders.append(np.random.default_rng(generator_seed).permutation(n).tolist())
    return orders


def save_hypernets(hyper: dict[str, HyperNet], folder: Path) -> None:
    """``folder/hyper.safetensors``: every role's weights under ``ROLE.``."""
    save_safetensors(
        {f"{r}.{k}": v.detach().cpu() for r, h in hyper.items() for k, v in h.state_dict().items()}, folder / "hyper.safetensors"
    )


def load_hypernets(hyper: dict[str, HyperNet], folder: Path, device: torch.device) -> None:
    from safetensors.torch import load_file

    weights = load_file(str(folder / "hyper.safetensors"))
    for r, h in hyper.items():
        h.load_state_dict({k[len(r) + 1 :]: v.to(device) for k, v in weights.items() if k.startswith(r + ".")})


class LatenConfig(MethodConfig):
    """LaTen (methods.md §2): locate neurons, map them with hypernetworks, inject; no post-training.

    The ``training`` section does not apply: LaTen trains only its hypernetworks, for ``steps`` steps.
    """

    name: Literal["laten"] = "laten"
    n_extract: int = Field(default=20, ge=1, description="extract-split samples used to locate (paper: 20)")
    transfer_rate: float = Field(default=0.1, gt=0, le=1, description="fraction of the student's neurons per layer")
    locate_vocab: int | None = Field(
        default=None,
        ge=1,
        description="softmax over the top-k logit-lens tokens (and y) when scoring neurons; "
        "None: the whole vocabulary (exact, slow on CPU)",
    )
    checkpoint: int = Field(
        default=4,
        ge=0,
        description="the official checkpoint_{k} kept: the paper's per-task 'steps' (GSM8K 4, MMLU 2, "
        "HumanEval 3, MBPP 8); it holds the hypernetworks after k+1 updates",
    )
    total_steps: int | None = Field(
        default=None,
        ge=1,
        description="length of the one-cycle schedule (None: one update per extract item, as the official loop)",
    )
    choose: Literal["checkpoint", "validation"] = Field(
        default="checkpoint",
        description="keep method.checkpoint (official), or train total_steps updates and keep "
        "the lowest cross entropy on the held-out align items (ours)",
    )
    locate: Literal["per_example", "averaged"] = Field(
        default="per_example",
        description="re-locate layers and neurons on each update's extract item (official), or "
        "once on scores averaged over the extract items (ours)",
    )
    inject_on: Literal["train_sample", "extract_mean"] = Field(
        default="train_sample",
        description="where the saved model's injection is located: one training item drawn "
        "with the seed (official inference), or the extract items' mean scores",
    )
    lr: float = Field(
        default=3e-4,
        gt=0,
        le=1,
        description="max lr of the one-cycle schedule (the shipped script's 3e-4; the function's default is 3e-5)",
    )
    weight_decay: float = Field(default=0.05, ge=0)
    warmup_ratio: float = Field(default=0.1, gt=0, lt=1, description="one-cycle pct_start")
    penalty: float = Field(default=1000.0, ge=0, description="weight of the MSE(Δ, 0) per module type")
    partners: int = Field(default=15, ge=0, description="align examples joining each extract example in a batch")
    n_val: int | None = Field(
        default=None,
        ge=0,
        description="align items held out: validation CE per update (recorded; the choice with choose: validation); "
        "never trained on. None: 0 with choose: checkpoint (the official pool of all 80 align items), 16 with "
        "choose: validation",
    )

    @model_validator(mode="after")
    def _check_val(self) -> LatenConfig:
        if self.choose == "validation" and self.n_val == 0:
            raise ValueError("choose: validation needs held-out align items (n_val >= 1)")
        return self

    @property
    def held_out(self) -> int:
        return self.n_val if self.n_val is not None else (16 if self.choose == "validation" else 0)

    init_std: float = Field(default=1e-5, gt=0, description="std of the hypernetworks' initial weights")
    data_order: Literal["official", "file"] = Field(
        default="official",
        description="official: the extract and align items shuffled as the official script's datasets.shuffle() after "
        "set_seed(seed) (use seed 42 for the shipped scripts' order), partners random.seed(step).sample(range(len(align)), "
        "15), the injection item random.sample over the shuffled train items; file: file order, partners and the "
        "injection item drawn with the recipe seed (pktransfer before 2026-12)",
    )
    attn_score: Literal["self_subvalue", "o_input"] = Field(
        default="self_subvalue",
        description="how an attention neuron (head, dim) is scored: self_subvalue (official: the answer position's own "
        "value weighted by its attention to itself, knowledge_neurons.py L246), or o_input (the whole attention output "
        "at the answer position, what the neuron actually adds to the residual stream)",
    )
    train_on_inputs: bool = Field(
        default=False,
        description="the hypernetworks' cross entropy on every token, prompt included (the official README sets it for "
        "MMLU: 'the original answer part is only 1 character which is hard to calculate stable gradient'); false: the "
        "response tokens only (the shipped script)",
    )
    neuron_count: Literal["floor", "round"] = Field(
        default="floor",
        description="neurons per layer = transfer_rate x the student's size, floored as the official int() (at least 1), "
        "or rounded (pktransfer before 2026-12)",
    )
    score_decimals: int | None = Field(
        default=4,
        ge=0,
        le=12,
        description="neuron scores are rounded to this many decimals before ranking, as the official code's "
        "round(score, 4) into a float32 table (knowledge_neurons.py L202, L271): near-ties become ties, broken by the "
        "lower index; None: unrounded float64 scores (pktransfer before 2026-12-06)",
    )


class LatenMethod(Method):
    config_class = LatenConfig
    needs_teacher = True
    teacher_use = "weights"
    post_training = False

    def __init__(self, spec: Any) -> None:
        super().__init__(spec)
        self._info: dict[str, Any] = {}
        self.training: dict[str, Any] = {}
        # a resumed run: what its earlier attempts spent on the location and the updates this attempt reuses
        self._located_reused = False
        self._earlier_locate_s: float | None = None
        self._earlier_updates: dict[str, Any] | None = None
        self._location_cache: dict[str, Any] | None = None  # what the grid's location cache gave this run

    def prepare(self, ctx: MethodContext) -> Any:
        spec, recipe, student = self.spec, ctx.recipe, ctx.student
        out = ctx.workdir / "laten"
        out.mkdir(parents=True, exist_ok=True)
        extract_items, extract_ex, align_ex, val_ex = self._splits(ctx)
        total = spec.total_steps or len(extract_ex)
        n_updates = total if spec.choose == "validation" else spec.checkpoint + 1
        if n_updates > total:
            raise RecipeError(
                f"laten: checkpoint {spec.checkpoint} needs {n_updates} updates, the schedule has "
                f"{total} (method.total_steps, default: the {len(extract_ex)} extract items)",
                hint="lower method.checkpoint or raise method.total_steps / method.n_extract",
            )
        teacher = ctx.load_teacher()
        check_pair(teacher.arch, student.arch, teacher.tokenizer, student.tokenizer, self.name)
        if student.dtype != torch.float32:  # a delta of norm ~1e-3 vanishes in bfloat16 weights: work in float32
            ctx.progress.log(f"laten: the student runs in float32 (was {student.dtype}); merged/ is saved in float32")
            student.model.float()
            student.dtype = torch.float32
        # 1. locate: each step's extract item (official) or the mean over the extract items, and the final plan
        final_item = self._final_item(ctx)
        inputs = [answer_input(ctx.formatter, it) for it in extract_items] + [answer_input(ctx.formatter, final_item)]
        t0 = time.perf_counter()
        t_scores, s_scores, located_from = self._locate(ctx, teacher, inputs, out)
        self._located_reused = located_from == "reused"
        locate_s = time.perf_counter() - t0
        n_ext = len(extract_items)

        def plan(t: dict[str, torch.Tensor], s: dict[str, torch.Tensor]) -> dict[str, Any]:
            try:
                return plan_transfer(t, s, teacher.arch, student.arch, spec.transfer_rate, spec.neuron_count, spec.score_decimals)
            except ValueError as err:
                raise IncompatiblePairError(f"laten: {err}", hint="lower method.transfer_rate") from None

        averaged = plan(mean_scores(t_scores[:n_ext]), mean_scores(s_scores[:n_ext]))
        if spec.locate == "per_example":
            step_plans = [plan(t_scores[s % n_ext], s_scores[s % n_ext]) for s in range(n_updates)]
        else:
            step_plans = [averaged] * n_updates
        final_plan = averaged if spec.inject_on == "extract_mean" else plan(t_scores[-1], s_scores[-1])
        # 2. extract the teacher's vectors for every plan, then free the teacher
        cache: dict[int, dict[str, list[torch.Tensor]]] = {}
        step_vectors = [cache.setdefault(id(p), extract(teacher, p)) for p in step_plans]
        final_vectors = cache.setdefault(id(final_plan), extract(teacher, final_plan))
        teacher.unload()
        device = student.device
        torch.manual_seed(recipe.seed)
        d_t, d_s = teacher.arch.hidden_size, student.arch.hidden_size
        hyper = {r: HyperNet(d_t, d_s, spec.init_std).to(device) for r in ROLES}  # float32
        step_inj = [Injection(student, p) for p in step_plans]
        final_inj = Injection(student, final_plan)
        for p in student.model.parameters():
            p.requires_grad_(False)
        t0 = time.perf_counter()
        best, history, resumed = self._train(
            ctx,
            hyper,
            list(zip(step_vectors, step_inj, strict=True)),
            (final_vectors, final_inj),
            extract_ex,
            align_ex,
            val_ex,
            total,
            n_updates,
            out,
        )
        train_s = time.perf_counter() - t0
        with torch.no_grad():
            deltas = mapped_deltas(hyper, final_vectors, final_inj, device)
        saved = final_inj.merge(student.model, deltas)
        save_safetensors(saved, out / "delta.safetensors")
        norms = {r: float(torch.cat([d.flatten() for d in deltas[r]]).norm()) for r in ROLES}
        self.training = {
            "steps": n_updates,
            "seconds": round(train_s, 2),
            "resumed_from": resumed,
            **self._earlier_attempts(),
            "trainable_parameters": sum(p.numel() for h in hyper.values() for p in h.parameters()),
            "tokens_seen": sum(
                n_tokens(step_batch(s, extract_ex, align_ex, spec.partners, recipe.seed, spec.data_order))
                for s in range(n_updates)
            ),
            "final_loss": next((h["loss"] for h in history if h["step"] == best), None),
            "log_history": history,
        }
        self._info = {
            "located_from": located_from,
            "locate_seconds": round(locate_s, 2),
            **({"location_cache": self._location_cache} if self._location_cache else {}),
            "locate": spec.locate,
            "inject_on": spec.inject_on,
            "final_item": final_item.id,
            "teacher_layers": {f: final_plan[f]["teacher_layers"] for f in ("ffn", "attn")},
            "teacher_layers_per_step": [{f: p[f]["teacher_layers"] for f in ("ffn", "attn")} for p in step_plans],
            "neurons_per_layer": {f: final_plan[f]["n"] for f in ("ffn", "attn")},
            "schedule": {
                "total_steps": total,
                "updates_trained": n_updates,
                "max_lr": spec.lr,
                "pct_start": spec.warmup_ratio,
                "final_div_factor": 1,
                "anneal": "cos",
            },
            "chosen_step": best,
            "checkpoint_kept": best - 1,
            "choice_rule": (
                "official checkpoint index (method.checkpoint = the paper's per-task steps)"
                if spec.choose == "checkpoint"
                else "lowest cross entropy on the held-out align items (ties: earlier step)"
            ),
            "val_loss": {h["step"]: h["val_loss"] for h in history},
            "delta_norm": norms,
            "n_extract": len(extract_ex),
            "n_align": len(align_ex),
            "n_val": len(val_ex),
            "cost": {
                "teacher_locate_passes": len(inputs),
                "student_locate_passes": len(inputs),
                "hypernetwork_updates": n_updates,
                "student_forward_backward": n_updates * (1 + min(spec.partners, len(align_ex))),
                "hypernetwork_parameters": sum(p.numel() for h in hyper.values() for p in h.parameters()),
            },
        }
        write_json(out / "laten.json", self._info)
        val = self._info["val_loss"]
        ctx.progress.log(
            f"laten: kept update {best} of {n_updates}"
            + (f" (val CE {val[best]:.4f}, untrained {val[0]:.4f})" if val.get(best) is not None else "")
            + f"; |Δ| {', '.join(f'{r} {v:.3g}' for r, v in norms.items())}"
        )
        return student.model

    def _earlier_attempts(self) -> dict[str, Any]:
        """A resumed run's ``earlier_attempts`` (as the shared trainer's cost ledger records them): the earlier
        attempts' location and updates, which this attempt reused. ``cost_kept`` is False when a part was saved before
        pktransfer kept its time (then the run's cost counts the last attempt only)."""
        updates = self._earlier_updates
        if not self._located_reused and updates is None:
            return {}
        seconds = [
            self._earlier_locate_s if self._located_reused else 0.0,  # None: located before its cost was kept
            0.0 if updates is None else updates["seconds"],  # None: updated before their time was kept
        ]
        kept = None not in seconds
        out: dict[str, Any] = {"step": 0 if updates is None else updates["step"], "cost_kept": kept}
        if kept:
            out |= {"attempts": 1 if updates is None else updates["attempts"], "train_seconds": round(sum(seconds), 2)}
        return {"earlier_attempts": out}

    def _final_item(self, ctx: MethodContext) -> Any:
        """The item the saved model's injection is located on: official inference draws one training item, here
        one of the run's training items (never a validation item carved from the train split)."""
        if self.spec.inject_on == "extract_mean":
            return ctx.task.split("extract")[0]  # unused for the plan (the mean over the extract items is)
        train, _ = train_and_validation(ctx.task, ctx.recipe.task.n_train, ctx.recipe.task.validation)
        seed = ctx.recipe.seed
        if self.spec.data_order == "official":  # inference_LaTen.py L122-128: shuffle, then random.sample(..., 1)
            (order,) = datasets_shuffle_orders(seed, [len(train)])
            return train[order[random.Random(seed).sample(range(len(train)), 1)[0]]]
        return train[random.Random(seed).randrange(len(train))]

    def _splits(self, ctx: MethodContext) -> tuple[list[Any], list[Example], list[Example], list[Example]]:
        spec, task = self.spec, ctx.task
        max_len = ctx.recipe.training.max_length
        ext = task.split("extract")[: spec.n_extract]
        align = task.split("align")
        if spec.data_order == "official":  # shuffled as the official script does, extract first, then align
            ext_order, align_order = datasets_shuffle_orders(ctx.recipe.seed, [len(ext), len(align)])
            ext, align = [ext[i] for i in ext_order], [align[i] for i in align_order]
        n_val = spec.held_out
        if not ext:
            raise DataError(
                f"laten: task '{task.name}' has an empty extract split",
                hint="LaTen locates neurons on the extract split; pick a task that has one",
            )
        if len(align) <= n_val:
            raise DataError(
                f"laten: the align split of task '{task.name}' has {len(align)} items, but "
                f"method.n_val={n_val} are held out for choosing the step",
                hint="lower method.n_val or use a larger align split",
            )
        enc = ctx.formatter

        def encode(items: list[Any], what: str) -> list[Example]:
            examples = encode_items(enc, items, max_len, what)
            return [Example(e.input_ids, list(e.input_ids)) for e in examples] if spec.train_on_inputs else examples

        return (
            ext,
            encode(ext, f"task '{task.name}' extract split"),
            encode(align[: len(align) - n_val], f"task '{task.name}' align split"),
            encode(align[len(align) - n_val :], f"task '{task.name}' align split (val)") if n_val else [],
        )

    def _locate(
        self, ctx: MethodContext, teacher: Any, inputs: list[AnswerInput], out: Path
    ) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]], str]:
        from safetensors.torch import load_file

        spec, student = self.spec, ctx.student
        path, meta = out / "located.safetensors", out / "located.json"
        key = {
            "teacher": ctx.recipe.teacher.identity(),
            "student": ctx.recipe.student.identity(),
            "locate_vocab": spec.locate_vocab,
            "attn_score": spec.attn_score,
            "inputs": [[list(i.ids), i.y] for i in inputs],
        }
        cost_path = out / "located.cost.json"
        if path.is_file() and meta.is_file() and json.loads(meta.read_text()) == key:  # a resumed run
            if cost_path.is_file():  # an earlier attempt of this run located: its teacher work is this run's
                cost = json.loads(cost_path.read_text())
                ctx.teacher_work.add(**cost["teacher"])
                self._earlier_locate_s = float(cost["seconds"])
            flat = load_file(str(path))
            scores = {
                side: [
                    {k: flat[f"{side}.{n}.{k}"] for k in ("attn_layer", "ffn_layer", "attn", "ffn")} for n in range(len(inputs))
                ]
                for side in ("t", "s")
            }
            return scores["t"], scores["s"], "reused"
        t0 = time.perf_counter()
        cache = LocationCache(ctx.cache_dir / "laten-location" if ctx.cache_dir is not None else None, ctx.progress)
        where = {"locate_vocab": spec.locate_vocab, "attn_score": spec.attn_score}
        t_scores, t_todo = cache.scores(teacher, ctx.recipe.teacher.identity(), where, inputs, "teacher")
        teacher_cost = {
            "what": f"neuron location on {t_todo if t_todo < len(inputs) else ''}{' of ' if t_todo < len(inputs) else ''}"
            f"{len(inputs)} items (forward; the logit-lens scoring of every neuron comes on top and is not in the FLOPs)"
            + (f"; the other {len(inputs) - t_todo} read from the grid's location cache" if t_todo < len(inputs) else ""),
            "forward_tokens": sum(len(i.ids) for i, done in zip(inputs, cache.computed, strict=True) if done),
            "seconds": time.perf_counter() - t0,
            "parameters": teacher.arch.n_parameters,
        }
        if t_todo:  # the teacher work another run of the grid did is counted in that run
            ctx.teacher_work.add(**teacher_cost)
        s_scores, s_todo = cache.scores(student, ctx.recipe.student.identity(), where, inputs, "student")
        if cache.folder is not None:
            self._location_cache = {
                "folder": str(cache.folder),
                "items": len(inputs),
                "teacher_from_cache": len(inputs) - t_todo,
                "student_from_cache": len(inputs) - s_todo,
            }
        save_safetensors(
            {
                f"{side}.{n}.{k}": v
                for side, all_ in (("t", t_scores), ("s", s_scores))
                for n, sc in enumerate(all_)
                for k, v in sc.items()
            },
            path,
        )
        write_json(cost_path, {"teacher": teacher_cost, "seconds": time.perf_counter() - t0}, indent=None)
        write_json(meta, key, indent=None)  # after the scores and their cost: the key vouches for a whole file
        return t_scores, s_scores, "computed"

    def _train(
        self,
        ctx: MethodContext,
        hyper: dict[str, HyperNet],
        steps: list[tuple[dict[str, list[torch.Tensor]], Injection]],
        final: tuple[dict[str, list[torch.Tensor]], Injection],
        extract_ex: list[Example],
        align_ex: list[Example],
        val_ex: list[Example],
        total: int,
        n_updates: int,
        out: Path,
    ) -> tuple[int, list[dict[str, Any]], str | None]:
        """One update per extract item, as the official loop: the step's item + ``partners`` align items, each
        item its own micro-batch (their CE gradients summed, plus n · penalty · MSE), AdamW, OneCycleLR."""
        spec, recipe, student = self.spec, ctx.recipe, ctx.student
        device, pad = student.device, student.tokenizer.pad_token_id
        params = [p for h in hyper.values() for p in h.parameters()]
        opt = torch.optim.AdamW(params, lr=spec.lr, betas=(0.9, 0.95), weight_decay=spec.weight_decay)
        sched = one_cycle(opt, spec.lr, total, spec.warmup_ratio)
        steps_dir = out / "steps"
        model = student.model

        def validate() -> float | None:
            """CE on the held-out align items of the model as it would be saved (the final injection); None when
            none are held out (the official pool)."""
            if not val_ex:
                return None
            vectors, inj = final
            live: dict[str, list[torch.Tensor]] = {}
            handles = inj.hooks(model, live)
            try:
                with torch.no_grad():
                    live.update(mapped_deltas(hyper, vectors, inj, device))
                    total_ce, n = 0.0, 0
                    for r in range(0, len(val_ex), 8):
                        b = collate_examples(val_ex[r : r + 8], pad)
                        out_ = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device))
                        labels = b["labels"].to(device)
                        total_ce += float(causal_lm_loss_sum(out_.logits, labels))
                        n += int((labels[:, 1:] != IGNORE_INDEX).sum())
            finally:
                for h in handles:
                    h.remove()
            return total_ce / max(1, n)

        def state(step: int) -> Path:
            return steps_dir / f"step-{step}"

        history: list[dict[str, Any]] = []
        start, resumed = 0, None
        t0, earlier_s, attempt = time.perf_counter(), 0.0, 1
        done = (
            sorted(int(p.name.split("-")[1]) for p in steps_dir.glob("step-*") if (p / "done").is_file())
            if steps_dir.is_dir()
            else []
        )
        model.eval()  # no dropout in the frozen student; only the hypernetworks learn
        if done:
            last = done[-1]
            load_hypernets(hyper, state(last), device)
            saved = torch.load(state(last) / "optim.pt", weights_only=True)  # tensors and plain data, no pickle
            opt.load_state_dict(saved["optimizer"])
            sched.load_state_dict(saved["scheduler"])
            history = saved["history"]
            start, resumed = last, str(state(last))
            # the updates' time of the earlier attempts (None: saved before pktransfer kept it)
            earlier_s, attempt = history[-1].get("seconds"), history[-1].get("attempt", 1) + 1
            self._earlier_updates = {"step": last, "seconds": earlier_s, "attempts": attempt - 1}
            ctx.progress.log(f"laten: resuming after update {last}")
        else:
            history.append({"step": 0, "loss": None, "val_loss": validate()})
        with ctx.progress.task("laten: train the hypernetworks", total=n_updates) as advance:
            advance(start)
            for step in range(start, n_updates):
                vectors, inj = steps[step]
                items = step_batch(step, extract_ex, align_ex, spec.partners, recipe.seed, spec.data_order)
                deltas = mapped_deltas(hyper, vectors, inj, device)  # through the hypernetworks (graph)
                leaf = {r: [d.detach().requires_grad_(True) for d in ds] for r, ds in deltas.items()}
                handles = inj.hooks(model, leaf)
                try:
                    ces = []
                    for ex in items:  # each item its own micro-batch: its token-mean CE, gradients summed
                        ce = mean_ce(model, collate_examples([ex], pad), device)
                        ce.backward()
                        ces.append(ce.item())
                finally:
                    for h in handles:
                        h.remove()
                penalty = delta_penalty(deltas)
                flat = [d for r in ROLES for d in deltas[r]]
                grads = [d.grad if d.grad is not None else torch.zeros_like(d) for r in ROLES for d in leaf[r]]
                opt.zero_grad(set_to_none=True)
                torch.autograd.backward([*flat, len(items) * spec.penalty * penalty], [*grads, torch.ones_like(penalty)])
                lr = opt.param_groups[0]["lr"]
                opt.step()
                sched.step()
                val = validate()
                mean_ce_ = sum(ces) / len(ces)
                history.append(
                    {
                        "step": step + 1,
                        "loss": mean_ce_ + spec.penalty * penalty.item(),
                        "ce": mean_ce_,
                        "penalty": penalty.item(),
                        "val_loss": val,
                        "lr": lr,
                        # training time of the whole run up to this update, all attempts (a resumed run's cost)
                        "seconds": None if earlier_s is None else round(earlier_s + time.perf_counter() - t0, 2),
                        "attempt": attempt,
                    }
                )
                folder = state(step + 1)
                folder.mkdir(parents=True, exist_ok=True)
                save_hypernets(hyper, folder)
                torch_save(
                    {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "history": history}, folder / "optim.pt"
                )
                write_json(folder / "done", history[-1], indent=None)  # last: the update is complete
                advance(1, loss=f"{history[-1]['loss']:.4f}", **({"val": f"{val:.4f}"} if val is not None else {}))
        best = n_updates if spec.choose == "checkpoint" else choose_step({h["step"]: h["val_loss"] for h in history})
        load_hypernets(hyper, state(best), device)
        return best, history, resumed

    def save_adapter(self, model: Any, folder: Path) -> None:
        raise RecipeError("laten saves a merged student, not an adapter", hint="read the run's merged/ folder")

    @classmethod
    def report_notes(cls, labels: list[str]) -> list[str]:
        return [
            f"`{'`, `'.join(labels)}`: LaTen has no post-training. It trains only its hypernetworks (the official "
            "schedule, one update per extract item), so the training settings above do not apply to it; its "
            "counted budget below is its hypernetworks' parameters, updates and tokens.",
            "",
        ]

    def report(self) -> dict[str, Any]:
        return self._info
