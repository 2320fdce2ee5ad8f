"""Stage evaluate: perplexity, zero-shot and domain multiple choice, parameters, FLOPs and speed.

Reads `evaluate:`; writes metrics/evaluate.json = {"models": {NAME: {...}}} for every model named in
evaluate.models (NAME as llmcarve.names writes it, e.g. tomoe@0.5; the uncarved model is `dense`); domain
models also get `recovered` against dense and the domain's LoRA-tuned dense (llmcarve.eval.recovery); plus
plots/zero_shot.csv (DVC plot data) and plots/evaluate.png.
"""

from __future__ import annotations

import csv
import time

from llmcarve.data.documents import Document
from llmcarve.eval.plots import plot_evaluation, plot_perplexity_vs_active
from llmcarve.eval.recovery import add_recovery
from llmcarve.io import read_jsonl, write_json
from llmcarve.jobs.evaluate import evaluate_model, perplexity_tokens
from llmcarve.jobs.layout import domain_dir, model_dir
from llmcarve.models.loading import load_model
from llmcarve.params import EvaluateParams, Params
from llmcarve.tracking import stage_run
from stages.common import ARTIFACTS, METRICS, PLOTS, main


def corpus_tokens(tokenizer, where: str) -> list[int]:
    """The token stream of evaluate.perplexity.corpora's '<domain>/<split>', as prepare_data wrote it."""
    domain, split = where.split("/")
    documents = [Document(**row) for row in read_jsonl(domain_dir(domain, ARTIFACTS) / f"{split}.jsonl")]
    remedy = f" (for a heldout split, give data.domains.{domain} `heldout` sources or a heldout_fraction > 0)"
    return perplexity_tokens(tokenizer, documents, f"evaluate.perplexity.corpora: '{where}'", remedy)


def evaluate_named(name: str, section: EvaluateParams, seed: int) -> dict:
    model, tokenizer = load_model(model_dir(name, ARTIFACTS))
    corpora = {metric: corpus_tokens(tokenizer, where) for metric, where in section.perplexity.corpora.items()}
    return evaluate_model(model, tokenizer, section, corpora, seed)


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
        models = {name: evaluate_named(name, section, params.seed) for name in section.models}
        add_recovery(models, section.recovery)
        write_json(METRICS / "evaluate.json", {"models": models, "seconds": time.perf_counter() - start})
        write_plot_data(models)
        tracker.log_metrics({"models": models})
        tracker.log_artifact(PLOTS / "evaluate.png")
        tracker.log_artifact(PLOTS / "perplexity_vs_active.png")


if __name__ == "__main__":
    main(run, __doc__)
