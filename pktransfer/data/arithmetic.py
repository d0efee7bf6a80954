"""Built-in arithmetic task: seeded multi-digit addition and multiplication.

Deterministic for a given ``data_seed`` (independent of the run's seed, so the test split is the
same across runs). Problems are unique up to commutativity across *all* splits, so no split leaks
into another. Splits are drawn test first, then seed, extract, align, train: changing the train size
never changes the test split. Operations alternate, so every split is balanced.

The default mix (3-digit addition, 2-digit multiplication) is where the offline 1.5B teacher clearly
beats the 0.5B student (see docs/offline-models.md).
"""

from __future__ import annotations

import random
from typing import Any

from pktransfer.data.tasks import SPLITS, Item, Task, register_task
from pktransfer.errors import RecipeError

_OPS = {"add": ("+", lambda a, b: a + b), "mul": ("*", lambda a, b: a * b), "sub": ("-", lambda a, b: a - b)}
DEFAULT_SIZES = {"test": 100, "seed": 32, "extract": 20, "align": 80, "train": 1000}
DEFAULT_DIGITS = {"add": 3, "mul": 2, "sub": 3}


@register_task
class ArithmeticTask(Task):
    name = "arithmetic"
    description = "built-in: multi-digit addition and multiplication, exact match on the number"
    scorer = "exact_match_number"
    max_new_tokens = 12

    def __init__(self, params: dict[str, Any] | None = None, data_dir: str | None = None) -> None:
        super().__init__(params, data_dir)
        p = self.params
        allowed = {"data_seed", "ops", "digits", "sizes"}
        unknown = set(p) - allowed
        if unknown:
            raise RecipeError(
                f"task.params: unknown option(s) {sorted(unknown)} for task 'arithmetic'", hint=f"allowed: {sorted(allowed)}"
            )
        self.data_seed = int(p.get("data_seed", 1234))
        self.ops: list[str] = list(p.get("ops", ["add", "mul"]))
        bad = [o for o in self.ops if o not in _OPS]
        if bad or not self.ops:
            raise RecipeError(f"task.params.ops: unknown operation(s) {bad or '[]'}", hint=f"allowed: {sorted(_OPS)}")
        self.digits = {**DEFAULT_DIGITS, **dict(p.get("digits", {}))}
        for op, d in self.digits.items():
            if not isinstance(d, int) or not 1 <= d <= 9:
                raise RecipeError(f"task.params.digits.{op}: {d!r} is not an integer in 1..9", hint="e.g. digits: {add: 3}")
        sizes = dict(p.get("sizes", {}))
        bad_splits = set(sizes) - set(SPLITS)
        if bad_splits:
            raise RecipeError(f"task.params.sizes: unknown split(s) {sorted(bad_splits)}", hint=f"splits: {list(SPLITS)}")
        self.sizes = {**DEFAULT_SIZES, **{k: int(v) for k, v in sizes.items()}}
        total = sum(self.sizes.values())
        for i, op in enumerate(self.ops):  # operations alternate, so each needs its share of distinct problems
            need = -(-(total - i) // len(self.ops))
            if need > self._capacity(op):
                raise RecipeError(
                    f"task.params: {need} distinct '{op}' problems are needed for sizes {self.sizes}, "
                    f"but only {self._capacity(op)} exist with {self.digits[op]} digit(s)",
                    hint="use more digits or smaller sizes",
                )
        self._all: dict[str, list[Item]] | None = None

    def _capacity(self, op: str) -> int:
        lo, hi = 10 ** (self.digits[op] - 1), 10 ** self.digits[op]
        n = hi - lo
        return n * (n + 1) // 2 if op in ("add", "mul") else n * n

    @staticmethod
    def prompt_for(a: int, op: str, b: int) -> str:
        return f"What is {a} {_OPS[op][0]} {b}? Reply with the number only."

    def _generate(self) -> dict[str, list[Item]]:
        rng = random.Random(self.data_seed)
        seen: set[tuple[str, int, int]] = set()
        out: dict[str, list[Item]] = {}
        k = 0
        for split in ("test", "seed", "extract", "align", "train"):
            items: list[Item] = []
            while len(items) < self.sizes[split]:
                op = self.ops[k % len(self.ops)]
                lo, hi = 10 ** (self.digits[op] - 1), 10 ** self.digits[op] - 1
                a, b = rng.randint(lo, hi), rng.randint(lo, hi)
                key = (op, min(a, b), max(a, b)) if op in ("add", "mul") else (op, a, b)
                if key in seen:
                    continue
                seen.add(key)
                k += 1
                result = str(_OPS[op][1](a, b))
                items.append(
                    Item(
                        id=f"arith-{split}-{len(items)}",
                        prompt=self.prompt_for(a, op, b),
                        response=result,
                        reference=result,
                        metadata={"op": op, "a": a, "b": b},
                    )
                )
            out[split] = items
        return out

    def _load(self, split: str) -> list[Item]:
        if self._all is None:
            self._all = self._generate()
        return self._all[split]

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "data_seed": self.data_seed,
            "ops": self.ops,
            "digits": {o: self.digits[o] for o in self.ops},
            "sizes": self.sizes,
        }
