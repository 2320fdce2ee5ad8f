"""Stage evaluate: perplexity, zero-shot and domain multiple choice, parameters, FLOPs and speed.

Reads `evaluate:`; writes metrics/evaluate.json = {"models": {NAME: {...}}} for every model named in
evaluate.models (NAME = method[-domain]@kept, e.g. tomoe@0.5; the uncarved model is `dense`); domain
models also get `recovered` against dense and the domain's LoRA-tuned dense (llmcarve.eval.recovery); plus
plots/zero_shot.csv (DVC plot data) and plots/evaluate.png.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

from llmcarve.data.documents import Document
from llmcarve.data.packing import join_for_perplexity
from llmcarve.eval.accounting import parameter_report
from llmcarve.eval.multiple_choice import score_questions
from llmcarve.eval.perplexity import Protocol, perplexity
from llmcarve.eval.plots import plot_evaluation, plot_perplexity_vs_active
from llmcarve.eval.recovery import add_recovery
from llmcarve.eval.speed import measure_speed
from llmcarve.eval.tasks import load_task, select
from llmcarve.io import read_jsonl, write_json
from llmcarve.models.loading import load_model
from llmcarve.params import EvaluateParams, Params, TaskSpec
from llmcarve.tracking import stage_run
from stages.common import ARTIFACTS, METRICS, PLOTS, main



def model_dir(name: str) -> Path:
    """dense is the prepared model; the LoRA baselines come from their stage; every other carved
    model is a directory written by the remove stage."""
    if name == "dense":
        return ARTIFACTS / "model"
    if name.startswith(("lora-", "twostage-")):
        return ARTIFACTS / "lora_baselines" / name
    return ARTIFACTS / "remove" / name


def corpus_tokens(tokenizer, where: str) -> list[int]:
    domain, split = where.split("/")
    documents = [Document(**row) for row in read_jsonl(ARTIFACTS / "data" / domain / f"{split}.jsonl")]
    if not documents:
        raise ValueError(
            f"evaluate.perplexity.corpora: '{where}' has no documents, so there is nothing to score "
            f"(for a heldout split, give data.domains.{domain} `heldout` sources or a heldout_fraction > 0)"
        )
    return tokenizer(join_for_perplexity(documents), add_special_tokens=False).input_ids


def score_tasks(model, tokenizer, tasks: dict[str, TaskSpec], default_limit: int | None, section: EvaluateParams, seed: int) -> dict:
    results = {}
    for name, spec in tasks.items():
        questions = select(load_task(spec), spec.limit or default_limit, seed)
        results[name] = score_questions(model, tokenizer, questions, batch_size=section.batch_size)
    return results


def evaluate_model(directory: Path, section: EvaluateParams, seed: int) -> dict:
    model, tokenizer = load_model(directory)
    ppl = section.perplexity
    protocol = Protocol(seq_len=ppl.seq_len, stride=ppl.stride, max_windows=ppl.max_windows, add_bos=ppl.add_bos)
    report = parameter_report(model, context_len=ppl.seq_len)
    report["ppl"] = {
        name: perplexity(model, corpus_tokens(tokenizer, where), protocol, tokenizer.bos_token_id)
        for name, where in ppl.corpora.items()
    }
    report["zero_shot"] = score_tasks(model, tokenizer, section.zero_shot, section.zero_shot_limit, section, seed)
    report["domain"] = score_tasks(model, tokenizer, section.domain_tasks, section.domain_limit, section, seed)
    speed = section.speed
    report["speed"] = measure_speed(model, len(tokenizer), speed.prefill_tokens, speed.decode_tokens, speed.repeats, seed)
    return report


def write_plot_data(models: dict) -> None:
    PLOTS.mkdir(exist_ok=True)
    with (PLOTS / "zero_shot.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["model", "task", "acc", "acc_norm"])
        for name, report in models.items():
            for task, scores in {**report["zero_shot"], **report["domain"]}.items():
                writer.writerow([name, task, f"{scores['acc']:.4f}", f"{scores['acc_norm']:.4f}"])
    plot_evaluation(models, PLOTS / "evaluate.png")
    first_corpus = next(iter(next(iter(models.values()))["ppl"]))
    plot_perplexity_vs_active(models, first_corpus, PLOTS / "perplexity_vs_active.png")


def run(params: Params) -> None:
    section = params.evaluate
    with stage_run("evaluate", {"evaluate": section.model_dump(), "seed": params.seed}) as tracker:
        start = time.perf_counter()
        models = {name: evaluate_model(model_dir(name), section, params.seed) for name in section.models}
        add_recovery(models, section.recovery)
        write_json(METRICS / "evaluate.json", {"models": models, "seconds": time.perf_counter() - start})
        write_plot_data(models)
        tracker.log_metrics({"models": models})
        tracker.log_artifact(PLOTS / "evaluate.png")
        tracker.log_artifact(PLOTS / "perplexity_vs_active.png")


if __name__ == "__main__":
    main(run, __doc__)
