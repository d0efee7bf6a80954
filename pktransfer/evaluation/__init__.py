"""Evaluation: generation, answer extraction, scoring, per-item outputs."""

from pktransfer.data.scoring import SCORERS, exact_match_number, extract_last_number
from pktransfer.evaluation.evaluate import EvalOptions, EvalResult, evaluate_items, subset
from pktransfer.evaluation.generation import generate

__all__ = [
    "SCORERS",
    "EvalOptions",
    "EvalResult",
    "evaluate_items",
    "exact_match_number",
    "extract_last_number",
    "generate",
    "subset",
]
