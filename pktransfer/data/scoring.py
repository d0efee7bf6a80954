"""Answer extraction and scoring, one pure function per rule.

Number rule (documented in README): take the *last* number in the output (like lm-eval's
flexible-extract), where a number may carry a sign, thousands separators and a decimal part
("1,000", "$5.00", "-3", "7.0"); currency signs and separators are dropped and numbers compare by
value, so "7.0" matches "7" and "1,000" matches "1000".

GSM8K reports two filters like lm-eval: ``strict`` reads the number after "#### " (the format of
the GSM8K solutions and few-shot exemplars) and ``flexible`` the last number anywhere.

Super-NI: exact match and ROUGE-L after the official normalisation (lower case, no punctuation, no
English articles, single spaces), best over the references.

Code: pass@k with the unbiased estimator of Chen et al. (2021), 1 − C(n−c, k) / C(n, k).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation

_NUMBER = re.compile(r"-?\$?\s?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\$?\s?\d+(?:\.\d+)?")


def normalize_number(text: str) -> Decimal | None:
    cleaned = text.replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        return Decimal(cleaned)
    except InvalidOperation:
        return None


def extract_last_number(text: str) -> str | None:
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    value = normalize_number(matches[-1])
    if value is None:
        return None
    value = value.normalize()
    return format(value, "f") if value != value.to_integral() else str(int(value))


def exact_match_number(output: str, reference: str) -> tuple[str | None, bool]:
    pred = extract_last_number(output)
    ref = normalize_number(reference.strip())
    if pred is None or ref is None:
        return pred, False
    return pred, Decimal(pred) == ref


def exact_match(output: str, reference: str) -> tuple[str | None, bool]:
    pred = output.strip()
    return pred, pred == reference.strip()


_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")


def gsm8k_strict(output: str, reference: str) -> tuple[str | None, bool]:
    """lm-eval's strict-match: the first '#### NUMBER' in the output, compared by value."""
    m = _STRICT.search(output)
    if not m:
        return None, False
    value = normalize_number(m.group(1))
    ref = normalize_number(reference.strip())
    return m.group(1), value is not None and ref is not None and value == ref


def normalize_answer(text: str) -> str:
    """Super-NI's normalisation: lower case, drop punctuation and English articles, collapse spaces."""
    import string

    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (Google's rouge-score, its default tokenizer) in [0, 1]."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return float(scorer.score(reference, prediction)["rougeL"].fmeasure)


def super_ni_scores(output: str, references: list[str]) -> dict[str, float]:
    pred = normalize_answer(output)
    em = max(float(pred == normalize_answer(r)) for r in references)
    rl = max(rouge_l(pred, normalize_answer(r)) for r in references)
    return {"exact_match": em, "rougeL": rl}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed (Chen et al. 2021)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def exact_match_word(output: str, reference: str) -> tuple[str | None, bool]:
    """A one-word answer: the output's first line without surrounding spaces and final '.' / '!', compared with the
    reference ignoring case ('Zorvel.' matches 'Zorvel'; 'Zorvel is' does not)."""
    word = output.strip().split("\n", 1)[0].strip().rstrip(".!").strip()
    return word, word.casefold() == reference.strip().casefold()


SCORERS: dict[str, Callable[[str, str], tuple[str | None, bool]]] = {
    "exact_match_number": exact_match_number,
    "exact_match": exact_match,
    "exact_match_word": exact_match_word,
    "gsm8k_strict": gsm8k_strict,
}
