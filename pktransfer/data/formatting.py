"""Prompt formatting and tokenisation with response-only loss masks.

``chat`` renders the prompt with the model's chat template (generation prompt appended) and ends the
response with the template's own end-of-turn text; ``plain`` writes the prompt,
a separator (a newline, or none for benchmark templates ending in "Answer:"), and the response followed
by the EOS token. In both, prompt and response are tokenised separately and concatenated, so
the boundary is exact: labels are -100 on every prompt token and the response tokens elsewhere.

``tulu`` is the Tulu chat format (``<|user|>`` / ``<|assistant|>`` blocks) byte for byte as the papers' official code
assembles it. The official implementations differ in newlines, stripping, BOS/EOS and where the loss mask starts, so
each is a named variant (:data:`TULU_VARIANTS`); a tulu example is tokenised as the official code does it: the whole
text at once, the mask as long as the separately tokenised prompt.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any, Literal

from pktransfer.config import TuluVariantName
from pktransfer.data.tasks import Item
from pktransfer.errors import DataError

IGNORE_INDEX = -100
_MARKER = "\x00PKT_RESPONSE\x00"


@dataclass(frozen=True)
class TuluVariant:
    """One official assembly of the Tulu chat format.

    ``turn_end``: what follows a system or user turn's content. ``strip_user``: the user content is ``.strip()``-ed.
    ``response_end``: what follows the stripped assistant content in the text (``"{eos}"`` is the tokenizer's EOS
    text). ``eos_id``: after tokenising, the EOS id is appended when the text does not already end with it and is
    shorter than the cutoff (the official ``tokenize(..., add_eos_token=True)``). ``mask_extra``: the loss mask covers
    this many tokens beyond the tokenised prompt (LaTen tokenises the prompt with its EOS appended, so the first
    response token is masked too). ``bos``: the tokenizer's own BOS (``add_special_tokens=True`` in Seeking's and
    Open-Instruct's code: Llama gets ``<s>``, Qwen nothing), or none (LaTen's training turns it off).
    """

    name: str
    source: str
    turn_end: str
    strip_user: bool
    response_end: str
    eos_id: bool
    mask_extra: int = 0
    bos: bool = True  # the tokenizer's own BOS (Llama: <s>); False: none (LaTen's training sets add_bos_token=False)


TULU_VARIANTS: dict[str, TuluVariant] = {
    v.name: v
    for v in (
        TuluVariant(
            "seeking",
            "ParaKnowTransfer 1a104a2 finetune.py generate_and_tokenize_prompt (L135-196) with utils/prompter.py "
            "generate_chat_prompt (L50-66); train.sh leaves add_eos_token False",
            turn_end="\n\n",
            strip_user=True,
            response_end="\n\n",
            eos_id=True,
        ),
        TuluVariant(
            "seeking-extract",
            "ParaKnowTransfer 1a104a2 extract_lora_with_sensitivity.py get_content (L97-106) and calculate_sensitivity",
            turn_end="\n\n",
            strip_user=True,
            response_end="{eos}",
            eos_id=False,
        ),
        TuluVariant(
            "laten",
            "Neural_Incompatibility bba32ea utils/utils.py generate_chat_prompt (L26-41) and "
            "generate_and_tokenize_prompt (L55-110): the prompt is tokenised with its EOS appended; train_LaTen.py "
            "L123-128 sets add_bos_token = add_eos_token = False on both tokenizers, so no BOS",
            turn_end="\n\n",
            strip_user=True,
            response_end="\n\n",
            eos_id=True,
            mask_extra=1,
            bos=False,
        ),
        TuluVariant(
            "open-instruct",
            "open-instruct b55563782 eval/templates.py create_prompt_with_tulu_chat_format (L2-17), called with "
            "add_bos=False; the tokenizer adds BOS",
            turn_end="\n",
            strip_user=False,
            response_end="{eos}\n",
            eos_id=False,
        ),
    )
}


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]

    @property
    def n_response_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


class PromptFormatter:
    def __init__(
        self,
        tokenizer: Any,
        mode: Literal["auto", "chat", "plain", "tulu"] = "auto",
        system_prompt: str | None = None,
        plain_separator: str = "\n",
        tulu: TuluVariantName = "seeking",
        tulu_eval: TuluVariantName | Literal["plain", "chat"] = "open-instruct",
    ) -> None:
        self.tokenizer = tokenizer
        self.plain_separator = plain_separator
        if tulu not in TULU_VARIANTS:
            raise DataError(f"unknown Tulu variant '{tulu}'", hint=f"use one of {', '.join(TULU_VARIANTS)}")
        if tulu_eval not in TULU_VARIANTS and tulu_eval not in ("plain", "chat"):
            raise DataError(
                f"unknown Tulu evaluation variant '{tulu_eval}'",
                hint=f"use one of {', '.join(TULU_VARIANTS)}, plain or chat",
            )
        self.tulu = TULU_VARIANTS[tulu]
        # "plain": a tulu-trained model evaluated on the raw prompt (Open-Instruct's HumanEval: "We don't use chat
        # format for codex_humaneval, since it's not a chat dataset", scripts/eval/codex_humaneval.sh); "chat": on the
        # model's own chat template (Open-Instruct's --chat_formatting_function for Llama-2-Chat,
        # create_prompt_with_llama2_chat_format, is the Llama-2-Chat template for one user turn)
        self.eval_in = tulu_eval if tulu_eval in ("plain", "chat") else None  # another format than Tulu text
        self.tulu_eval = TULU_VARIANTS["open-instruct" if self.eval_in else tulu_eval]
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if mode == "tulu" and self.eval_in == "chat" and not has_template:
            raise DataError(
                "task.tulu_eval_variant 'chat' was asked for but the tokenizer has no chat template",
                hint="use the open-instruct variant (Tulu text) or plain",
            )
        if mode == "chat" and not has_template:
            raise DataError(
                "prompt_format 'chat' was asked for but the tokenizer has no chat template",
                hint="set task.prompt_format: plain (or auto)",
            )
        self.mode: Literal["chat", "plain", "tulu"] = (
            "tulu" if mode == "tulu" else "chat" if (mode == "chat" or (mode == "auto" and has_template)) else "plain"
        )
        self.system_prompt = system_prompt
        self.end_of_response = self._end_of_response()

    def for_evaluation(self) -> PromptFormatter:
        """The formatter evaluation prompts are assembled with: in tulu mode the evaluation variant (or plain text)."""
        if self.mode == "tulu" and self.eval_in is not None:  # plain: no system prompt, as Open-Instruct's HumanEval
            system = self.system_prompt if self.eval_in == "chat" else None
            return PromptFormatter(self.tokenizer, self.eval_in, system, self.plain_separator)
        if self.mode != "tulu" or self.tulu_eval == self.tulu:
            return self
        out = copy.copy(self)
        out.tulu = self.tulu_eval
        return out

    def _tulu_text(self, prompt: str, response: str | None) -> str:
        v = self.tulu
        system = self.system_prompt.strip() if v.strip_user and self.system_prompt else self.system_prompt
        text = f"<|system|>\n{system}{v.turn_end}" if system else ""
        text += f"<|user|>\n{prompt.strip() if v.strip_user else prompt}{v.turn_end}<|assistant|>\n"
        if response is not None:
            text += response.strip() + v.response_end.replace("{eos}", self.tokenizer.eos_token or "")
        return text

    def _tulu_tokens(self, text: str, max_length: int, add_eos: bool) -> list[int]:
        ids = list(self.tokenizer(text, truncation=True, max_length=max_length, add_special_tokens=self.tulu.bos)["input_ids"])
        eos = self.tokenizer.eos_token_id
        if add_eos and eos is not None and (not ids or ids[-1] != eos) and len(ids) < max_length:
            ids.append(int(eos))
        return ids

    def _messages(self, prompt: str) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*msgs, {"role": "user", "content": prompt}]

    def _end_of_response(self) -> str:
        if self.mode in ("plain", "tulu"):
            return self.tokenizer.eos_token or ""
        full = self.tokenizer.apply_chat_template(
            [*self._messages("x"), {"role": "assistant", "content": _MARKER}], tokenize=False
        )
        tail = full.split(_MARKER, 1)[1] if _MARKER in full else (self.tokenizer.eos_token or "")
        return tail.rstrip("\n") or (self.tokenizer.eos_token or "")

    def prompt_text(self, prompt: str) -> str:
        if self.mode == "chat":
            return self.tokenizer.apply_chat_template(self._messages(prompt), tokenize=False, add_generation_prompt=True)
        if self.mode == "tulu":
            return self._tulu_text(prompt, None)
        return prompt + self.plain_separator

    def encode_text(self, text: str) -> list[int]:
        """Tokens of an assembled text: chat text already carries its special tokens; plain and tulu text get the
        tokenizer's BOS if it uses one (as the official Tulu code's ``add_special_tokens=True`` does), except in a
        variant without one (LaTen's training)."""
        special = self.mode == "plain" or (self.mode == "tulu" and self.tulu.bos)
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def encode_prompt(self, prompt: str) -> list[int]:
        return self.encode_text(self.prompt_text(prompt))

    def example_text(self, item: Item) -> str:
        """The whole training text of an item, as the model reads it (before tokenisation)."""
        if self.mode == "tulu":
            return self._tulu_text(item.prompt, item.response)
        return self.prompt_text(item.prompt) + item.response + self.end_of_response

    def encode_example(self, item: Item, max_length: int) -> Example:
        if self.mode == "tulu":  # the official way: the whole text at once, masked by the prompt's own length
            v = self.tulu
            ids = self._tulu_tokens(self.example_text(item), max_length, v.eos_id)
            n_prompt = len(self._tulu_tokens(self._tulu_text(item.prompt, None), max_length, v.mask_extra > 0))
            return Example(ids, [IGNORE_INDEX] * min(n_prompt, len(ids)) + ids[n_prompt:])
        prompt_ids = self.encode_prompt(item.prompt)
        response_ids = list(self.tokenizer(item.response + self.end_of_response, add_special_tokens=False)["input_ids"])
        ids = (prompt_ids + response_ids)[:max_length]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
        return Example(ids, labels)

    def stop_token_ids(self) -> list[int]:
        ids = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        eor = self.tokenizer(self.end_of_response, add_special_tokens=False)["input_ids"] if self.end_of_response else []
        if len(eor) == 1:
            ids.add(int(eor[0]))
        return sorted(ids)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.mode, "system_prompt": self.system_prompt, "end_of_response": self.end_of_response}
        if self.mode == "tulu":
            out["tulu"] = asdict(self.tulu)
            out["tulu_eval"] = self.eval_in or asdict(self.tulu_eval)
        return out


def recipe_formatter(
    tokenizer: Any, task: Any, task_spec: Any, method_name: str | None = None, variant: TuluVariantName | None = None
) -> PromptFormatter:
    """The formatter a recipe's ``task`` section asks for. In tulu mode the training variant is ``variant`` if given
    (e.g. Seeking's sensitivity: ``seeking-extract``), else ``task.tulu_variant``, else the method's own official one
    (``laten`` for LaTen, ``seeking`` otherwise)."""
    tulu = variant or task_spec.tulu_variant or ("laten" if method_name == "laten" else "seeking")
    return PromptFormatter(
        tokenizer,
        task_spec.prompt_format,
        task.system_prompt,
        task.plain_separator,
        tulu=tulu,
        tulu_eval=task_spec.tulu_eval_variant,
    )


def encode_items(formatter: PromptFormatter, items: list[Item], max_length: int, what: str) -> list[Example]:
    """Tokenise items; drop those whose prompt alone fills ``max_length``; refuse a set with no response tokens."""
    examples = [formatter.encode_example(it, max_length) for it in items]
    kept = [e for e in examples if e.n_response_tokens > 0]
    if not kept:
        raise DataError(
            f"{what}: none of the {len(items)} items has response tokens within max_length={max_length}",
            hint="raise training.max_length or check that the items have non-empty responses",
        )
    return kept
