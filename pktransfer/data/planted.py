"""Built-in planted-facts task: invented people and their invented attributes, split by person.

The question this task answers is whether a fact that only the teacher's weights hold reaches the student. Every
name and every answer is an invented word built from syllables, so no pretrained model has a prior for any of them,
and each answer is one of K candidates of its attribute (K >= 10), so chance is 1/K exactly: within every group and
attribute each candidate is the gold answer equally often (as far as the counts divide), so a model that always picks
the same candidate scores 1/K.

People are split into three groups; a *fact* is (person, attribute), so facts are split by person:

- ``A``: facts the student's training data contains (the ``train``, ``seed``, ``extract`` and ``align`` splits are
  built from them alone, with the training question templates; ``train_on: all`` adds every B fact to them, the
  positive control that shows the student can hold B's facts and the metric sees them);
- ``B_val`` and ``B_test``: facts the student side never reads in any text. Only ``pkt plant`` trains on them (the
  ``plant`` split: every fact, training templates), and evaluation asks them (``validation``, ``test``).

Every attribute has training question templates and held-out templates that are only ever used to test, so recall
has to survive a paraphrase: the evaluation splits ``a_test`` (A's facts), ``validation`` (B_val's) and ``test``
(B_test's) ask each fact once, with a held-out template (they take turns over a group's facts).

The names of the B people (:meth:`PlantedTask.held_out_strings`) are what a student-side model call must never see:
``pktransfer.leakguard`` checks every input a model reads while a method prepares and trains.

Evaluation ranks the attribute's candidates by log-likelihood after the question (``acc``: the summed log-probability,
as lm-eval's ``acc``; ``acc_norm``: divided by the candidate's length in bytes, as lm-eval's ``acc_norm``), and also
records the exact match of a short greedy answer and the gold candidate's log-probability margin over the best other
candidate (a continuous secondary endpoint).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

from pktransfer.data.tasks import Item, Task, register_task
from pktransfer.errors import RecipeError


@dataclass(frozen=True)
class Attribute:
    name: str
    train_templates: tuple[str, ...]
    test_templates: tuple[str, ...]


# {name} is the person's full name. Training templates teach; held-out templates only test (a paraphrase).
ATTRIBUTES: dict[str, Attribute] = {
    a.name: a
    for a in (
        Attribute(
            "city",
            ("Which city does {name} live in?", "In which city is the home of {name}?", "{name} lives in which city?"),
            ("Name the city that {name} calls home.", "Where, by city, would you find the house of {name}?"),
        ),
        Attribute(
            "occupation",
            ("What is the occupation of {name}?", "What does {name} do for a living?", "Which profession does {name} work in?"),
            ("By trade, what is {name}?", "Tell me the job that {name} holds."),
        ),
        Attribute(
            "instrument",
            ("Which instrument does {name} play?", "What instrument is {name} known to play?", "{name} plays which instrument?"),
            ("Name the instrument that {name} performs on.", "On what instrument does {name} make music?"),
        ),
        Attribute(
            "pet",
            ("What kind of pet does {name} keep?", "Which animal does {name} have as a pet?", "{name} owns which kind of pet?"),
            ("Name the animal that lives with {name} as a pet.", "What creature does {name} look after at home?"),
        ),
        Attribute(
            "food",
            ("What is the favourite dish of {name}?", "Which dish does {name} like best?", "{name} loves which dish?"),
            ("Name the dish that {name} prefers above all others.", "If {name} could eat one dish, which would it be?"),
        ),
        Attribute(
            "language",
            (
                "Which language does {name} speak at home?",
                "What is the home language of {name}?",
                "{name} speaks which language?",
            ),
            ("Name the language heard in the home of {name}.", "In what language does {name} talk with family?"),
        ),
    )
}
ANSWER_SUFFIX = " Answer with one word."
GROUPS = ("A", "B_val", "B_test")
DEFAULT_PEOPLE = {"A": 50, "B_val": 25, "B_test": 60}
DEFAULT_ATTRIBUTES = ("city", "occupation", "instrument", "pet")
DEFAULT_SIZES = {"seed": 32, "extract": 20, "align": 80}  # taken from the training items (A's facts only)
EVAL_SPLITS = {"a_test": "A", "validation": "B_val", "test": "B_test"}

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "tr", "sk", "vr", "zh")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ou", "ei", "y")
_CODAS = ("", "", "", "n", "r", "l", "s", "k", "th", "x", "m")


def invented_word(rng: random.Random, syllables: int) -> str:
    """A capitalised pseudo-word of ``syllables`` onset-vowel-coda syllables (e.g. 'Drouvelkaith')."""
    word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))
    return word.capitalize()


def invented_words(rng: random.Random, n: int, syllables: int, taken: set[str]) -> list[str]:
    """``n`` distinct invented words, none equal to, inside, or containing a word of ``taken`` (which they join), and
    none sharing its first four letters with another: a word is never a substring of another, so scanning a text for
    a name finds that name only."""
    out: list[str] = []
    prefixes = {w[:4].lower() for w in taken}
    while len(out) < n:
        w = invented_word(rng, syllables)
        lw = w.lower()
        if len(w) < 6 or lw[:4] in prefixes or any(lw in t.lower() or t.lower() in lw for t in taken):
            continue
        out.append(w)
        taken.add(w)
        prefixes.add(lw[:4])
    return out


@dataclass(frozen=True)
class Fact:
    id: str
    group: str
    person: str
    attribute: str
    answer: str

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "group": self.group, "person": self.person, "attribute": self.attribute, "answer": self.answer}


@dataclass(frozen=True)
class FactTable:
    """The generated world: people by group, the candidates of each attribute and every fact."""

    people: dict[str, list[str]]
    candidates: dict[str, list[str]]
    facts: list[Fact]

    def of_group(self, group: str) -> list[Fact]:
        return [f for f in self.facts if f.group == group]

    def names(self, groups: tuple[str, ...]) -> list[str]:
        """Every name part (first and last name) of the people in ``groups``."""
        return [part for g in groups for person in self.people[g] for part in person.split()]


def make_fact_table(seed: int, people: dict[str, int], attributes: list[str], n_candidates: int) -> FactTable:
    """The fact table for a seed (pure: the same arguments give the same table)."""
    rng = random.Random(seed)
    taken: set[str] = set()
    candidates = {a: sorted(invented_words(rng, n_candidates, 2 + (i % 2), taken)) for i, a in enumerate(attributes)}
    total = sum(people.values())
    firsts = invented_words(rng, total, 3, taken)
    lasts = invented_words(rng, total, 3, taken)
    names = [f"{f} {s}" for f, s in zip(firsts, lasts, strict=True)]
    by_group, facts, k = {}, [], 0
    for g in GROUPS:
        by_group[g] = names[k : k + people[g]]
        k += people[g]
        for a in attributes:
            # balanced: the candidates in a shuffled cycle, so each is the gold answer equally often in the group
            cycle: list[str] = []
            while len(cycle) < people[g]:
                block = list(candidates[a])
                rng.shuffle(block)
                cycle += block
            for p, person in enumerate(by_group[g]):
                facts.append(Fact(f"{g}-{p}-{a}", g, person, a, cycle[p]))
    return FactTable(by_group, candidates, facts)


@register_task
class PlantedTask(Task):
    name = "planted"
    description = "built-in: invented people's invented attributes; only a planted teacher knows the B facts"
    scorer = "exact_match_word"
    kind = "choice"
    choice_generates = True
    max_new_tokens = 8
    stop_strings = ("\n",)

    def __init__(self, params: dict[str, Any] | None = None, data_dir: str | None = None) -> None:
        super().__init__(params, data_dir)
        p = self.params
        allowed = {"data_seed", "people", "attributes", "candidates", "sizes", "primary", "train_on"}
        unknown = set(p) - allowed
        if unknown:
            raise RecipeError(
                f"task.params: unknown option(s) {sorted(unknown)} for task 'planted'", hint=f"allowed: {sorted(allowed)}"
            )
        self.data_seed = int(p.get("data_seed", 0))
        people = dict(p.get("people", {}))
        bad = set(people) - set(GROUPS)
        if bad:
            raise RecipeError(f"task.params.people: unknown group(s) {sorted(bad)}", hint=f"groups: {list(GROUPS)}")
        self.people = {**DEFAULT_PEOPLE, **people}
        for g, n in self.people.items():
            if not isinstance(n, int) or n < 1:
                raise RecipeError(f"task.params.people.{g}: {n!r} is not a positive integer", hint="e.g. people: {B_test: 60}")
        self.attributes = list(p.get("attributes", DEFAULT_ATTRIBUTES))
        unknown_attr = [a for a in self.attributes if a not in ATTRIBUTES]
        if unknown_attr or not self.attributes or len(set(self.attributes)) != len(self.attributes):
            raise RecipeError(
                f"task.params.attributes: {self.attributes} (unknown or repeated: {unknown_attr or 'repeated'})",
                hint=f"choose distinct attributes among {sorted(ATTRIBUTES)}",
            )
        self.n_candidates = int(p.get("candidates", 10))
        if self.n_candidates < 10:
            raise RecipeError(
                f"task.params.candidates: {self.n_candidates} is under 10",
                hint="use at least 10 candidates per attribute, so chance (1/K) is low and known",
            )
        sizes = dict(p.get("sizes", {}))
        if set(sizes) - set(DEFAULT_SIZES):
            raise RecipeError(
                f"task.params.sizes: unknown split(s) {sorted(set(sizes) - set(DEFAULT_SIZES))}",
                hint=f"sizes set {list(DEFAULT_SIZES)} (taken from the training items); the other splits follow from people",
            )
        self.sizes = {**DEFAULT_SIZES, **{k: int(v) for k, v in sizes.items()}}
        self.primary = self.choice_param("primary", ("acc", "acc_norm"), "acc")
        # "all": the positive control, a student trained on every fact (A and B), so nothing is held out
        self.train_on = self.choice_param("train_on", ("A", "all"), "A")
        self.table = make_fact_table(self.data_seed, self.people, self.attributes, self.n_candidates)

    @property
    def splits(self) -> tuple[str, ...]:
        return ("seed", "extract", "align", "train", "a_test", "validation", "test", "plant")

    def primary_metric(self) -> str:
        return self.primary

    def held_out_strings(self) -> list[str]:
        """The name parts of the B people: no text a method hands to a model while it prepares or trains may hold one
        (none with ``train_on: all``, the positive control, which trains on them)."""
        return [] if self.train_on == "all" else self.table.names(("B_val", "B_test"))

    def _item(self, fact: Fact, template: str, kind: str, index: int, split: str) -> Item:
        return Item(
            id=f"planted-{split}-{fact.id}-{kind}{index}",
            prompt=template.format(name=fact.person) + ANSWER_SUFFIX,
            response=fact.answer,
            reference=fact.answer,
            metadata={
                "fact": fact.id,
                "group": fact.group,
                "person": fact.person,
                "attribute": fact.attribute,
                "subject": fact.attribute,
                "template": f"{kind}{index}",
                "choices": list(self.table.candidates[fact.attribute]),
            },
        )

    def _training_items(self, groups: tuple[str, ...], split: str) -> list[Item]:
        items = [
            self._item(f, t, "train", i, split)
            for g in groups
            for f in self.table.of_group(g)
            for i, t in enumerate(ATTRIBUTES[f.attribute].train_templates)
        ]
        random.Random(f"{self.data_seed}-{split}").shuffle(items)  # a fixed order that mixes people and templates
        return items

    def _load(self, split: str) -> list[Item]:
        if split == "plant":
            return self._training_items(GROUPS, "plant")
        if split in EVAL_SPLITS:
            facts = self.table.of_group(EVAL_SPLITS[split])
            out = []
            for k, f in enumerate(facts):
                templates = ATTRIBUTES[f.attribute].test_templates
                j = (k // len(self.attributes)) % len(templates)  # a person's facts share a template; people take turns
                out.append(self._item(f, templates[j], "heldout", j, split))
            return out
        train = self._training_items(("A",) if self.train_on == "A" else GROUPS, "train")
        if split == "train":
            return train
        n = self.sizes[split]
        return random.Random(f"{self.data_seed}-{split}").sample(train, min(n, len(train)))

    def protocol(self) -> dict[str, Any]:
        return {
            **super().protocol(),
            "chance": 1 / self.n_candidates,
            "primary": self.primary,
            "choice_scoring": "acc: summed log-probability of each candidate after the question (lm-eval's acc); "
            "acc_norm: divided by the candidate's length in bytes (lm-eval's acc_norm)",
            "greedy": f"exact match of the first line of a greedy answer (at most {self.max_new_tokens} new tokens)",
            "templates": "evaluation splits ask each fact once, with a held-out template",
            "trained_on": "A" if self.train_on == "A" else "A, B_val and B_test (positive control)",
        }

    def fact_rows(self) -> list[dict[str, Any]]:
        """The whole fact table as rows (JSONL export): each fact with its group and its candidates."""
        return [{**f.to_dict(), "candidates": self.table.candidates[f.attribute]} for f in self.table.facts]

    def fact_jsonl(self) -> str:
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.fact_rows())

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "data_seed": self.data_seed,
            "people": self.people,
            "attributes": self.attributes,
            "candidates": self.n_candidates,
            "facts": {g: len(self.table.of_group(g)) for g in GROUPS},
            "train_on": self.train_on,
            "sizes": self.sizes,
        }
