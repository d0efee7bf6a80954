"""Open-Instruct's evaluation protocol, as Seeking's authors ran it (their README: "employ Open-Instruct to evaluate").

The pieces below are what open-instruct's evaluation scripts assemble, at commit b55563782 (2023-10-31, the version
current when the Seeking paper appeared); each function names the file it follows. The tasks (``gsm8k``, ``mmlu``,
``humaneval``) use them when ``task.params.style`` is ``open-instruct``. Chat formats (``tulu`` and the model's own
``chat``) put the answer cue after the assistant header, as open-instruct's ``--use_chat_format`` does; the plain
format writes the prompt as open-instruct's non-chat path does.
"""

from __future__ import annotations

import random
import re
import string
from typing import Any

# eval/gsm/examplars.py: the chain-of-thought exemplars of Wei et al. 2022 (Table 20), in open-instruct's order
GSM_EXEMPLARS: tuple[dict[str, str], ...] = (
    {
        "question": "There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are "
        "done, there will be 21 trees. How many trees did the grove workers plant today?",
        "cot_answer": "There are 15 trees originally. Then there were 21 trees after some more were planted. So there "
        "must have been 21 - 15 = 6. So the answer is 6.",
        "short_answer": "6",
    },
    {
        "question": "If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
        "cot_answer": "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. So the answer is 5.",
        "short_answer": "5",
    },
    {
        "question": "Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
        "cot_answer": "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After "
        "eating 35, they had 74 - 35 = 39. So the answer is 39.",
        "short_answer": "39",
    },
    {
        "question": "Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many "
        "lollipops did Jason give to Denny?",
        "cot_answer": "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 "
        "- 12 = 8. So the answer is 8.",
        "short_answer": "8",
    },
    {
        "question": "Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does "
        "he have now?",
        "cot_answer": "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. "
        "5 + 4 = 9. So the answer is 9.",
        "short_answer": "9",
    },
    {
        "question": "There were nine computers in the server room. Five more computers were installed each day, from "
        "monday to thursday. How many computers are now in the server room?",
        "cot_answer": "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = "
        "20 computers were added. 9 + 20 is 29. So the answer is 29.",
        "short_answer": "29",
    },
    {
        "question": "Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How "
        "many golf balls did he have at the end of wednesday?",
        "cot_answer": "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After "
        "losing 2 more, he had 35 - 2 = 33 golf balls. So the answer is 33.",
        "short_answer": "33",
    },
    {
        "question": "Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
        "cot_answer": "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - "
        "15 dollars left. 23 - 15 is 8. So the answer is 8.",
        "short_answer": "8",
    },
)

GSM_MAX_NEW_TOKENS = 512  # eval/gsm/run_eval.py: max_new_tokens=512
GSM_ANSWER_CUE = "Answer:"  # appended after the chat prompt (run_eval.py L66)
MMLU_ANSWER_CUE = "The answer is:"  # eval/mmlu/run_eval.py L57-60
MMLU_MAX_PROMPT_TOKENS = 2048  # eval/mmlu/run_eval.py L62-75: shots are dropped, one at a time, while a prompt is longer
HUMANEVAL_INSTRUCTION = "Complete the following python function.\n\n\n"  # eval/codex_humaneval/run_eval.py L29
HUMANEVAL_CUE = "Here is the completed function:\n\n\n"  # ... L31-33, followed by the problem's prompt
CODEX_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")  # the Codex paper's stop sequences (run_eval.py L52)


def gsm_exemplars(n_shot: int) -> list[dict[str, str]]:
    """eval/gsm/run_eval.py L45-47: all eight in order, or ``random.sample`` of ``n_shot`` after ``random.seed(42)``
    (the script draws no test subset first when ``--max_num_examples`` is unset)."""
    if n_shot >= len(GSM_EXEMPLARS):
        return list(GSM_EXEMPLARS)
    return random.Random(42).sample(list(GSM_EXEMPLARS), n_shot)


def gsm_user_content(question: str, n_shot: int, cot: bool = True) -> str:
    """eval/gsm/run_eval.py L44-63: the prefix and the question (the user turn's content in the chat format)."""
    if n_shot:
        demos = [
            ("Question: " if cot else "Quesion: ")  # sic: the script's no-CoT demonstrations spell it so
            + ex["question"]
            + "\n"
            + "Answer: "
            + (ex["cot_answer"] if cot else ex["short_answer"])
            for ex in gsm_exemplars(n_shot)
        ]
        prefix = "Answer the following questions.\n\n" + "\n\n".join(demos) + "\n\n"
    else:
        prefix = "Answer the following question.\n\n"
    return prefix + "Question: " + question.strip()


def gsm_reference(answer: str) -> str:
    """eval/gsm/run_eval.py L27-34: the text after '####', stripped, with digit-grouping commas removed."""
    return re.sub(r"(\d),(\d)", r"\1\2", answer.split("####")[1].strip())


def gsm_extract(output: str) -> str:
    """eval/gsm/run_eval.py L123-130: the last number after removing digit-grouping commas, else the whole output."""
    output = re.sub(r"(\d),(\d)", r"\1\2", output)
    numbers = re.findall(r"[-+]?\d*\.\d+|\d+", output)
    return numbers[-1] if numbers else output


def exact_match(prediction: str, reference: str) -> bool:
    """HF ``evaluate``'s exact_match with ignore_case and ignore_punctuation (as run_eval.py L135 calls it): both
    lower-cased, ``string.punctuation`` removed, then compared."""
    table = str.maketrans("", "", string.punctuation)
    return prediction.lower().translate(table) == reference.lower().translate(table)


def mmlu_subject(subject: str) -> str:
    """eval/mmlu/run_eval.py format_subject: every word preceded by a space (so the header reads 'about  x')."""
    return "".join(" " + w for w in subject.split("_"))


# pandas' default missing-value strings (pandas >= 2.0 added "None"): run_eval.py reads MMLU with pd.read_csv, so a
# choice that is one of them prints as "nan" (10 of the 14,042 test questions have a choice "None")
PANDAS_NA = frozenset(
    {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A", "NA"}
    | {"NULL", "NaN", "None", "n/a", "nan", "null"}
)


def pandas_cell(value: str) -> str:
    """A CSV cell as ``pd.read_csv`` (pandas >= 2) and then ``str.format`` print it: "nan" for a missing-value string."""
    return "nan" if value in PANDAS_NA else value


def mmlu_example(row: dict[str, Any], include_answer: bool, pandas_na: bool = False) -> str:
    """eval/mmlu/run_eval.py format_example: question as stored, '\\nA. ...' per choice, '\\nAnswer:'.
    ``pandas_na``: a choice pandas reads as missing prints "nan", as the official code prints it under pandas >= 2."""
    choices = [pandas_cell(c) if pandas_na else c for c in row["choices"]]
    prompt = row["question"] + "".join(f"\n{L}. {c}" for L, c in zip("ABCD", choices, strict=True))
    prompt += "\nAnswer:"
    return prompt + (f" {row['answer']}\n\n" if include_answer else "")


def mmlu_prompt_head(subject: str, shots: list[dict[str, Any]], pandas_na: bool = False) -> str:
    """eval/mmlu/run_eval.py gen_prompt: the header, then the dev examples with their answers."""
    head = f"The following are multiple choice questions (with answers) about {mmlu_subject(subject)}.\n\n"
    return head + "".join(mmlu_example(s, True, pandas_na) for s in shots)


def mmlu_prompt(row: dict[str, Any], shots: list[dict[str, Any]], pandas_na: bool = False) -> str:
    """eval/mmlu/run_eval.py gen_prompt + format_example: header, ``ntrain`` dev examples, the question."""
    return mmlu_prompt_head(row["subject"], shots, pandas_na) + mmlu_example(row, False, pandas_na)
