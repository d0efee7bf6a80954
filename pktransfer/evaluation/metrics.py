"""Answer extraction and scoring.

Number rule (documented in README): take the *last* number in the output (like lm-eval's
flexible-extract), where a number may carry a sign, thousands separators and a decimal part
("1,000", "$5.00", "-3", "7.0"); currency signs and separators are dropped and numbers compare by
value, so "7.0" matches "7" and "1,000" matches "1000".
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


SCORERS: dict[str, Callable[[str, str], tuple[str | None, bool]]] = {
    "exact_match_number": exact_match_number,
    "exact_match": exact_match,
}
