"""Prompt formatting and tokenisation with response-only loss masks.

``chat`` renders the prompt with the model's chat template (generation prompt appended) and ends the
response with the template's own end-of-turn text; ``plain`` writes the prompt,
a separator (a newline, or none for benchmark templates ending in "Answer:"), and the response followed
by the EOS token. Prompt and response are tokenised separately and concatenated, so
the boundary is exact: labels are -100 on every prompt token and the response tokens elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pktransfer.data.tasks import Item
from pktransfer.errors import DataError

IGNORE_INDEX = -100
_MARKER = "\x00PKT_RESPONSE\x00"


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
        mode: Literal["auto", "chat", "plain"] = "auto",
        system_prompt: str | None = None,
        plain_separator: str = "\n",
    ) -> None:
        self.tokenizer = tokenizer
        self.plain_separator = plain_separator
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if mode == "chat" and not has_template:
            raise DataError(
                "prompt_format 'chat' was asked for but the tokenizer has no chat template",
                hint="set task.prompt_format: plain (or auto)",
            )
        self.mode: Literal["chat", "plain"] = "chat" if (mode == "chat" or (mode == "auto" and has_template)) else "plain"
        self.system_prompt = system_prompt
        self.end_of_response = self._end_of_response()

    def _messages(self, prompt: str) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*msgs, {"role": "user", "content": prompt}]

    def _end_of_response(self) -> str:
        if self.mode == "plain":
            return self.tokenizer.eos_token or ""
        full = self.tokenizer.apply_chat_template(
            [*self._messages("x"), {"role": "assistant", "content": _MARKER}], tokenize=False
        )
        tail = full.split(_MARKER, 1)[1] if _MARKER in full else (self.tokenizer.eos_token or "")
        return tail.rstrip("\n") or (self.tokenizer.eos_token or "")

    def prompt_text(self, prompt: str) -> str:
        if self.mode == "chat":
            return self.tokenizer.apply_chat_template(self._messages(prompt), tokenize=False, add_generation_prompt=True)
        return prompt + self.plain_separator

    def encode_prompt(self, prompt: str) -> list[int]:
        text = self.prompt_text(prompt)
        # chat text already carries its special tokens; plain text gets the tokenizer's BOS if it uses one
        return list(self.tokenizer(text, add_special_tokens=self.mode == "plain")["input_ids"])

    def encode_example(self, item: Item, max_length: int) -> Example:
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
        return {"mode": self.mode, "system_prompt": self.system_prompt, "end_of_response": self.end_of_response}


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
