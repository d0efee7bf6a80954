"""Can this teacher and student be used together for a transfer method?"""

from __future__ import annotations

from typing import Any

from pktransfer.errors import IncompatiblePairError
from pktransfer.models.arch import ArchitectureDescription


def check_pair(
    teacher: ArchitectureDescription,
    student: ArchitectureDescription,
    teacher_tokenizer: Any = None,
    student_tokenizer: Any = None,
    method: str = "",
    *,
    padded_vocab: bool = False,
) -> None:
    """Same family, same vocabulary, and a student no larger than the teacher; else one precise error.

    ``padded_vocab``: the method reads only logits of the shared tokenizer's tokens, so output layers padded to
    different sizes beyond it are fine (Qwen2.5 up to 3B has 151,936 rows and 7B+ 152,064 over one tokenizer);
    the tokenizers themselves must still be identical."""
    why = f" for method '{method}'" if method else ""
    if teacher.family != student.family:
        raise IncompatiblePairError(
            f"teacher is a {teacher.family} model and student a {student.family} model{why}: "
            "parametric transfer needs one architecture family",
            hint="pick a teacher and student of the same family (e.g. two Qwen2 or two Llama models)",
        )
    same_vocab = teacher.vocab_size == student.vocab_size
    if teacher_tokenizer is not None and student_tokenizer is not None:
        same_tokenizer = teacher_tokenizer.get_vocab() == student_tokenizer.get_vocab()
        if padded_vocab and same_tokenizer:  # rows beyond the tokenizer are padding the method never reads
            return _check_sizes(teacher, student, why)
        same_vocab = same_vocab and same_tokenizer
    if not same_vocab:
        raise IncompatiblePairError(
            f"teacher and student have different vocabularies (sizes {teacher.vocab_size} and {student.vocab_size}){why}",
            hint="use a pair that shares one tokenizer; cross-tokenizer transfer is not supported",
        )
    _check_sizes(teacher, student, why)


def _check_sizes(teacher: ArchitectureDescription, student: ArchitectureDescription, why: str) -> None:
    if student.n_layers > teacher.n_layers or student.n_parameters > teacher.n_parameters:
        raise IncompatiblePairError(
            f"student ({student.n_layers} layers, {student.n_parameters / 1e6:.0f}M parameters) is larger than the "
            f"teacher ({teacher.n_layers} layers, {teacher.n_parameters / 1e6:.0f}M){why}",
            hint="swap teacher and student, or pick a larger teacher",
        )
