"""Zero-shot multiple-choice scoring, defined as lm-evaluation-harness (v0.4.13, HFLM) defines it.

Each choice is scored by the summed log-probability of its continuation tokens given its context:

    acc       mean over questions of [argmax_i loglik_i == gold]
    acc_norm  mean over questions of [argmax_i loglik_i / len(choice_text_i) == gold]

where len counts characters of the option as the task lists it, without the leading delimiter
(see `Choice.norm_length`). Ties go to the first choice, as numpy's argmax does.

Tokenisation follows HFLM for a causal model: whitespace at the end of the context moves to the front
of the continuation, context+continuation is encoded as one string and the continuation tokens are
what follows the context's own tokens (so a merge across the boundary is handled as lm-eval does). The
tokenizer adds its default special tokens (as lm-eval 0.4.13 does; earlier 0.4.x releases passed
add_special_tokens=False for causal models), except when the text already starts with the prefix token
(BOS, else EOS). An empty context is replaced by that prefix token.
Sequences longer than `max_length + 1` tokens lose tokens from the left; `max_length` defaults to the
model's max_position_embeddings capped at 2048 (lm-eval does not cap; only prompts over 2048 tokens
can tell the difference).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from llmcarve.eval.tasks import Choice, Question

# lm-eval's fallback when the config gives no length; also our cap, which bounds memory on CPU.
DEFAULT_MAX_LENGTH = 2048


@dataclass(frozen=True)
class ChoiceTokens:
    """One choice ready for the model: the tokens fed in and how many trailing ones are scored."""

    input_ids: list[int]
    targets: list[int]  # the continuation tokens; the last len(targets) inputs predict them

    @property
    def length(self) -> int:
        return len(self.input_ids)


# --- tokenisation --------------------------------------------------------------------------------


def prefix_token_id(tokenizer) -> int | None:
    """The token that stands in for an empty context: BOS, else EOS."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def encode(tokenizer, text: str) -> list[int]:
    # The tokenizer's own special tokens, unless the text already starts with the prefix token, which
    # they would double (HFLM's rule).
    prefix_id = prefix_token_id(tokenizer)
    starts_with_prefix = prefix_id is not None and text.startswith(tokenizer.decode([prefix_id]))
    return tokenizer.encode(text, add_special_tokens=not starts_with_prefix)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation), split the way lm-eval's `_encode_pair` splits them."""
    # "Answer: " + "Paris" must tokenize like "Answer:" + " Paris": BPE vocabularies attach a space
    # to the word after it.
    stripped = context.rstrip()
    continuation = context[len(stripped) :] + continuation
    if not stripped:  # the first scored token still needs something to be predicted from
        return [prefix_token_id(tokenizer)], tokenizer.encode(continuation, add_special_tokens=False)
    context_ids = encode(tokenizer, stripped)
    whole_ids = encode(tokenizer, stripped + continuation)
    return context_ids, whole_ids[len(context_ids) :]


def fit_window(context_ids: list[int], continuation_ids: list[int], max_length: int) -> ChoiceTokens:
    if not continuation_ids:
        raise ValueError("a continuation encodes to no tokens; nothing to score")
    if len(continuation_ids) > max_length:
        raise ValueError(f"a continuation of {len(continuation_ids)} tokens exceeds max_length {max_length}")
    # The last token is never an input (nothing after it is predicted), so a window of max_length + 1
    # tokens fills max_length positions.
    window = (context_ids + continuation_ids)[-(max_length + 1) :]
    return ChoiceTokens(input_ids=window[:-1], targets=continuation_ids)


def tokenize_choice(tokenizer, choice: Choice, max_length: int) -> ChoiceTokens:
    return fit_window(*encode_pair(tokenizer, choice.context, choice.continuation), max_length)


def resolve_max_length(model, max_length: int | None) -> int:
    if max_length is not None:
        return max_length
    configured = getattr(model.config, "max_position_embeddings", None) or DEFAULT_MAX_LENGTH
    return min(configured, DEFAULT_MAX_LENGTH)


# --- the model -------------------------------------------------------------------------------------


@contextlib.contextmanager
def eval_mode(model):
    """Score without dropout, then give the model back in the mode it came in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def pad_batch(batch: Sequence[ChoiceTokens], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to a rectangle. With right padding every real token keeps its position id, and the
    causal mask already hides the padding from the real tokens before it."""
    width = max(seq.length for seq in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, seq in enumerate(batch):
        input_ids[row, : seq.length] = torch.tensor(seq.input_ids)
        attention_mask[row, : seq.length] = 1
    return input_ids.to(device), attention_mask.to(device)


def batch_logliks(model, batch: Sequence[ChoiceTokens], pad_id: int) -> list[float]:
    input_ids, attention_mask = pad_batch(batch, pad_id, model_device(model))
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    logliks = []
    for row, seq in enumerate(batch):
        # Only the continuation positions are normalised: a softmax over the whole vocabulary at every
        # position would cost batch x width x vocab floats.
        scored = logits[row, seq.length - len(seq.targets) : seq.length].float()
        targets = torch.tensor(seq.targets, device=scored.device)
        logprobs = F.log_softmax(scored, dim=-1).gather(-1, targets[:, None])
        logliks.append(logprobs.sum().item())
    return logliks


def padding_id(tokenizer) -> int:
    # Any id works: padded positions are masked and never scored.
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


@torch.inference_mode()
def choice_logliks(
    model,
    tokenizer,
    questions: Sequence[Question],
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = True,
) -> list[list[float]]:
    """log p(continuation | context) of every choice, as logliks[question][choice]."""
    max_length = resolve_max_length(model, max_length)
    choices = [choice for question in questions for choice in question.choices]
    tokenized = [tokenize_choice(tokenizer, choice, max_length) for choice in choices]
    with eval_mode(model):
        flat = score_in_batches(model, tokenized, batch_size, padding_id(tokenizer), progress)
    return _regroup(flat, [len(question.choices) for question in questions])


def score_in_batches(
    model, tokenized: Sequence[ChoiceTokens], batch_size: int, pad_id: int, progress: bool
) -> list[float]:
    # Longest first, so each batch holds sequences of similar length (little padding) and running
    # out of memory happens at once rather than at the end.
    order = sorted(range(len(tokenized)), key=lambda i: -tokenized[i].length)
    logliks = [0.0] * len(tokenized)
    with tqdm(total=len(order), desc="scoring choices", unit="choice", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            for index, loglik in zip(chunk, batch_logliks(model, [tokenized[i] for i in chunk], pad_id)):
                logliks[index] = loglik
            bar.update(len(chunk))
    return logliks


def _regroup(flat: list[float], sizes: list[int]) -> list[list[float]]:
    grouped, start = [], 0
    for size in sizes:
        grouped.append(flat[start : start + size])
        start += size
    return grouped


# --- metrics -----------------------------------------------------------------------------------------


def argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # first of equal maxima, like numpy


def predictions(questions: Sequence[Question], logliks: Sequence[Sequence[float]]) -> tuple[list[int], list[int]]:
    """The chosen option per question: by raw log-likelihood, and by log-likelihood per character."""
    raw = [argmax(lls) for lls in logliks]
    normed = [argmax([ll / c.norm_length for ll, c in zip(lls, q.choices)]) for q, lls in zip(questions, logliks)]
    return raw, normed


def mean_stderr(hits: Sequence[float]) -> float:
    """Standard error of a mean, with the sample (n - 1) standard deviation as lm-eval reports it."""
    n = len(hits)
    if n < 2:
        return float("nan")
    mean = sum(hits) / n
    return math.sqrt(sum((h - mean) ** 2 for h in hits) / (n - 1) / n)


def accuracy_metrics(questions: Sequence[Question], logliks: Sequence[Sequence[float]]) -> dict:
    raw, normed = predictions(questions, logliks)
    hits = [float(p == q.gold) for p, q in zip(raw, questions)]
    norm_hits = [float(p == q.gold) for p, q in zip(normed, questions)]
    n = len(questions)
    return {"acc": sum(hits) / n, "acc_norm": sum(norm_hits) / n, "n": n, "acc_stderr": mean_stderr(hits)}


def score_questions(
    model,
    tokenizer,
    questions: Sequence[Question],
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = True,
) -> dict:
    """acc, acc_norm, n and acc_stderr of `model` on `questions`."""
    if not questions:
        raise ValueError("no questions to score")
    logliks = choice_logliks(model, tokenizer, questions, batch_size, max_length, progress)
    return accuracy_metrics(questions, logliks)
