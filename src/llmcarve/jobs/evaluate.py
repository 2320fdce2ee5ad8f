"""Evaluating one model: parameter accounting, perplexity, multiple-choice tasks and (optionally) speed.

The evaluate stage scores the corpora prepare_data wrote; `llmcarve evaluate` scores the same held-out
BoolQ passages read from their builtin source (`heldout_corpus`), so both print the same number for the
same model and protocol.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from llmcarve.data.documents import Document
from llmcarve.data.domains import BUILTIN_DOMAINS, domain_documents
from llmcarve.data.packing import join_for_perplexity
from llmcarve.errors import UserInputError
from llmcarve.eval.accounting import parameter_report
from llmcarve.eval.multiple_choice import score_questions
from llmcarve.eval.perplexity import Protocol, perplexity
from llmcarve.eval.speed import measure_speed
from llmcarve.eval.tasks import load_task, select
from llmcarve.params import EvaluateParams, PerplexityParams, TaskSpec


def perplexity_tokens(tokenizer, documents: Sequence[Document], what: str, remedy: str = "") -> list[int]:
    """The token stream the perplexity protocol scores: the documents joined (llmcarve.data.packing)."""
    if not documents:
        raise UserInputError(f"{what} has no documents, so there is nothing to score{remedy}")
    return tokenizer(join_for_perplexity(documents), add_special_tokens=False).input_ids


def heldout_corpus(domain: str, seed: int = 0) -> list[Document]:
    """A builtin domain's held-out documents (for `general`: the BoolQ passages, the pipeline's
    `general/heldout` perplexity corpus)."""
    recipe = BUILTIN_DOMAINS[domain]
    # with nothing split off the training sources, the held-out sources alone are the held-out documents
    train = recipe.sources(recipe.train) if recipe.heldout_fraction > 0 else []
    return domain_documents(train, recipe.sources(recipe.heldout), recipe.heldout_fraction, seed)[1]


def protocol_of(section: PerplexityParams) -> Protocol:
    return Protocol(seq_len=section.seq_len, stride=section.stride, max_windows=section.max_windows, add_bos=section.add_bos)


def score_tasks(model, tokenizer, tasks: Mapping[str, TaskSpec], default_limit: int | None, batch_size: int, seed: int) -> dict:
    """Accuracy on each task, over a seeded sample of `spec.limit` (else `default_limit`) questions."""
    results = {}
    for name, spec in tasks.items():
        questions = select(load_task(spec), spec.limit or default_limit, seed)
        results[name] = score_questions(model, tokenizer, questions, batch_size=batch_size)
    return results


def evaluate_model(model, tokenizer, section: EvaluateParams, corpora: Mapping[str, list[int]], seed: int, speed: bool = True) -> dict:
    """The report of one model: parameters and FLOPs, perplexity of each token stream in `corpora`,
    zero-shot and domain task accuracies, and prefill/decode speed when `speed`."""
    protocol = protocol_of(section.perplexity)
    report = parameter_report(model, context_len=protocol.seq_len)
    report["ppl"] = {name: perplexity(model, tokens, protocol, tokenizer.bos_token_id) for name, tokens in corpora.items()}
    report["zero_shot"] = score_tasks(model, tokenizer, section.zero_shot, section.zero_shot_limit, section.batch_size, seed)
    report["domain"] = score_tasks(model, tokenizer, section.domain_tasks, section.domain_limit, section.batch_size, seed)
    if speed:
        timing = section.speed
        report["speed"] = measure_speed(model, len(tokenizer), timing.prefill_tokens, timing.decode_tokens, timing.repeats, seed)
    return report
