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
) -> None:
    """Same family, same vocabulary, and a student no larger than the teacher; else one precise error."""
    why = f" for method '{method}'" if method else ""
    if teacher.family != student.family:
        raise IncompatiblePairError(
            f"teacher is a {teacher.family} model and student a {student.family} model{why}: "
            "parametric transfer needs one architecture family",
            hint="pick a teacher and student of the same family (e.g. two Qwen2 or two Llama models)",
        )
    same_vocab = teacher.vocab_size == student.vocab_size
    if same_vocab and teacher_tokenizer is not None and student_tokenizer is not None:
        same_vocab = teacher_tokenizer.get_vocab() == student_tokenizer.get_vocab()
    if not same_vocab:
        raise IncompatiblePairError(
            f"teacher and student have different vocabularies (sizes {teacher.vocab_size} and {student.vocab_size}){why}",
            hint="use a pair that shares one tokenizer; cross-tokenizer transfer is not supported",
        )
    if student.n_layers > teacher.n_layers or student.n_parameters > teacher.n_parameters:
        raise IncompatiblePairError(
            f"student ({student.n_layers} layers, {student.n_parameters / 1e6:.0f}M parameters) is larger than the "
            f"teacher ({teacher.n_layers} layers, {teacher.n_parameters / 1e6:.0f}M){why}",
            hint="swap teacher and student, or pick a larger teacher",
        )
