"""Cross-check pktransfer's GSM8K and MMLU numbers against lm-evaluation-harness on the same items.

    python -m venv .venv-lmeval && .venv-lmeval/bin/pip install -c constraints.txt torch==2.13.0 "lm-eval[hf]==0.4.13" accelerate
    python bench/lmeval_crosscheck.py --lm-eval-python .venv-lmeval/bin/python [--tasks mmlu,gsm8k] [--n 200]

Both harnesses score the same model (default: the offline student, float32 on CPU) on the same seeded
subset of the test sets, with the same template (lm-eval's: plain text, no chat template), the same
shots (first-n exemplars: MMLU's dev items of the subject; GSM8K's first train solutions) and greedy
decoding with the same stop strings and budget. lm-eval reads local copies of the subset through
custom task YAMLs (no hub access needed). The script prints and saves both accuracies, the difference
and the per-item agreement, and the prompts are compared for the first item.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pktransfer
from pktransfer.data import get_task
from pktransfer.data.tasks import read_jsonl
from pktransfer.evaluation import subset
from pktransfer.models.builtin import DEFAULT_STUDENT

MMLU_YAML = """task: pkt_mmlu_{subject}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {test}
    dev: {dev}
test_split: test
fewshot_split: dev
fewshot_config:
  sampler: first_n
output_type: multiple_choice
description: "The following are multiple choice questions (with answers) about {subject_words}.\\n\\n"
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{choices[0]}}}}\\nB. {{{{choices[1]}}}}\\n\\
  C. {{{{choices[2]}}}}\\nD. {{{{choices[3]}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: "{{{{['A', 'B', 'C', 'D'].index(answer)}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

GSM_YAML = r"""task: pkt_gsm8k
dataset_path: json
dataset_kwargs:
  data_files:
    test: {test}
    train: {train}
test_split: test
fewshot_split: train
fewshot_config:
  sampler: first_n
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\nAnswer:"
doc_to_target: "{{{{answer}}}}"
target_delimiter: " "
fewshot_delimiter: "\n\n"
generation_kwargs:
  until: ["Question:", "</s>", "<|im_end|>"]
  do_sample: false
  temperature: 0.0
  max_gen_toks: {max_tokens}
filter_list:
  - name: strict-match
    filter:
      - function: regex
        regex_pattern: "#### (\\-?[0-9\\.\\,]+)"
      - function: take_first
  - name: flexible-extract
    filter:
      - function: regex
        group_select: -1
        regex_pattern: "(-?[$0-9.,]{{2,}})|(-?[0-9]+)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: false
    regexes_to_ignore: [",", "\\$", "(?s).*#### ", "\\.$"]
"""


def _rows(path: Path) -> list[dict]:
    return read_jsonl(path)  # (str.splitlines would also split at U+2028 inside MMLU strings)


def _prompt(sample: dict) -> str:
    args = sample["arguments"]
    return args["gen_args_0"]["arg_0"] if isinstance(args, dict) else args[0][0]


def run_lm_eval(python: str, model: str, tasks: list[str], include: Path, out: Path, shots: int, batch: int) -> list[dict]:
    cmd = [
        python,
        "-m",
        "lm_eval",
        "--model",
        "hf",
        "--model_args",
        f"pretrained={model},dtype=float32",
        "--tasks",
        ",".join(tasks),
        "--include_path",
        str(include),
        "--num_fewshot",
        str(shots),
        "--batch_size",
        str(batch),
        "--device",
        "cpu",
        "--log_samples",
        "--output_path",
        str(out),
    ]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    samples = []
    for f in sorted(out.rglob("samples_*.jsonl")):
        samples += _rows(f)
    return samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lm-eval-python", required=True, help="python of an environment with lm-eval installed")
    ap.add_argument("--model", default=None, help="model folder (default: the prepared offline student)")
    ap.add_argument("--tasks", default="mmlu,gsm8k")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--mmlu-shots", type=int, default=0)
    ap.add_argument("--gsm8k-shots", type=int, default=0)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", default="bench/results/lmeval_crosscheck.json")
    args = ap.parse_args()
    model = args.model or str(pktransfer.prepare_builtin(DEFAULT_STUDENT.split(":", 1)[1]))
    spec = pktransfer.recipe.ModelSpec(model=model, dtype="float32", device="cpu")
    tmp = Path(tempfile.mkdtemp(prefix="pkt-lmeval-"))
    report: dict = {"model": model, "n": args.n, "subset_seed": args.seed, "tasks": {}}
    for name in args.tasks.split(","):
        t0 = time.time()
        if name == "mmlu":
            task = get_task("mmlu", {"shots": args.mmlu_shots})
            items = subset(task.split("test"), args.n, args.seed)
            rows = _rows(task.data_dir() / "mmlu" / "test.jsonl")
            dev = _rows(task.data_dir() / "mmlu" / "dev.jsonl")
            chosen = [rows[int(it.id.rsplit("-", 1)[1])] for it in items]
            by_subject: dict[str, list] = {}
            for r in chosen:
                by_subject.setdefault(r["subject"], []).append(r)
            names = []
            for subj, rs in by_subject.items():
                (tmp / f"mmlu_{subj}.test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
                (tmp / f"mmlu_{subj}.dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dev if r["subject"] == subj))
                (tmp / f"pkt_mmlu_{subj}.yaml").write_text(
                    MMLU_YAML.format(
                        subject=subj,
                        subject_words=subj.replace("_", " "),
                        test=tmp / f"mmlu_{subj}.test.jsonl",
                        dev=tmp / f"mmlu_{subj}.dev.jsonl",
                    )
                )
                names.append(f"pkt_mmlu_{subj}")
            samples = run_lm_eval(args.lm_eval_python, model, names, tmp, tmp / "out-mmlu", args.mmlu_shots, args.batch_size)
            lm_correct = {(s["doc"]["subject"], s["doc"]["question"]): s["acc"] for s in samples}
            theirs = sum(lm_correct.values()) / len(lm_correct)
            prompt_lm = {(s["doc"]["subject"], s["doc"]["question"]): _prompt(s) for s in samples}
            ll_lm = {(s["doc"]["subject"], s["doc"]["question"]): [float(r[0][0]) for r in s["resps"]] for s in samples}
            ours_res = pktransfer.evaluate(
                spec,
                "mmlu",
                limit=args.n,
                subset_seed=args.seed,
                prompt_format="plain",
                task_params={"shots": args.mmlu_shots},
                batch_size=args.batch_size,
            )
            keys = [(r["subject"], rows[int(r["id"].rsplit("-", 1)[1])]["question"]) for r in ours_res.records]
            agree = sum(float(r["correct"]) == lm_correct[k] for r, k in zip(ours_res.records, keys, strict=True))
            same_prompt = prompt_lm[keys[0]] == items[0].prompt
            report["mmlu_max_loglik_difference"] = max(
                abs(r["loglik"][L] - ll_lm[k][j])
                for r, k in zip(ours_res.records, keys, strict=True)
                for j, L in enumerate("ABCD")
            )
            metric = "acc (micro)"
        else:
            task = get_task("gsm8k", {"style": "lm-eval", "shots": args.gsm8k_shots})
            items = subset(task.split("test"), args.n, args.seed)
            rows = _rows(task.data_dir() / "gsm8k" / "test.jsonl")
            chosen = [rows[it.metadata["line"]] for it in items]
            (tmp / "gsm8k.test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chosen))
            (tmp / "pkt_gsm8k.yaml").write_text(
                GSM_YAML.format(
                    test=tmp / "gsm8k.test.jsonl", train=task.data_dir() / "gsm8k" / "train.jsonl", max_tokens=args.max_tokens
                )
            )
            samples = run_lm_eval(
                args.lm_eval_python, model, ["pkt_gsm8k"], tmp, tmp / "out-gsm8k", args.gsm8k_shots, args.batch_size
            )
            by_q = {s["doc"]["question"]: s for s in samples}
            ours_res = pktransfer.evaluate(
                spec,
                "gsm8k",
                limit=args.n,
                subset_seed=args.seed,
                prompt_format="plain",
                task_params={"style": "lm-eval", "shots": args.gsm8k_shots},
                batch_size=args.batch_size,
                max_new_tokens=args.max_tokens,
            )
            qs = [rows[int(r["id"].rsplit("-", 1)[1])]["question"] for r in ours_res.records]
            # lm-eval logs one sample per filter: read both filters' results per document
            lm = {f: {} for f in ("strict-match", "flexible-extract")}
            for s in samples:
                lm[s.get("filter", "strict-match")][s["doc"]["question"]] = s["exact_match"]
            theirs = sum(lm["flexible-extract"].values()) / len(qs)
            theirs_strict = sum(lm["strict-match"].values()) / len(qs)
            agree = sum(float(r["correct"]) == lm["flexible-extract"][q] for r, q in zip(ours_res.records, qs, strict=True))
            same_prompt = _prompt(by_q[qs[0]]) == items[0].prompt
            same_output = sum(
                by_q[q]["resps"][0][0].split("Question:")[0].strip() == r["output"].strip()
                for r, q in zip(ours_res.records, qs, strict=True)
            )
            report.setdefault("gsm8k_extra", {}).update(
                {
                    "lm_eval_strict": theirs_strict,
                    "ours_strict": ours_res.summary["metrics"]["exact_match,strict"],
                    "identical_generations": same_output,
                }
            )
            metric = "exact_match, flexible-extract"
        ours = ours_res.accuracy
        entry = {
            "metric": metric,
            "ours": ours,
            "lm_eval": theirs,
            "difference_points": round(100 * (ours - theirs), 2),
            "items": len(ours_res.records),
            "per_item_agreement": agree / len(ours_res.records),
            "first_prompt_identical": same_prompt,
            "seconds_both": round(time.time() - t0, 1),
        }
        report["tasks"][name] = entry
        print(name, json.dumps(entry), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    sys.exit(main())
