"""Decontamination: a training text sharing a 13-word span with an evaluation text is dropped, nothing else."""

from __future__ import annotations

from llmcarve.data.decontaminate import SPAN_WORDS, SpanIndex, contaminated, question_texts, words
from llmcarve.eval.tasks import Choice, Question, cloze_question, qa_prompt

EVALUATION_PASSAGE = (
    "The Treaty of Westphalia ended thirty years of war in central Europe and established the principle "
    "that each state decides its own religion without outside interference."
)


def test_a_planted_copy_is_dropped_and_the_rest_kept():
    training = [
        "Unrelated text about sailing boats and the winds of the southern ocean in early spring.",
        # the planted copy: 13 consecutive words of the passage, with other case, punctuation and line breaks
        "History notes. THE TREATY of Westphalia -- ended thirty\nyears of war, in central Europe; and so on.",
        # 12 shared words only: a common phrase is not a copy
        "Some say the Treaty of Westphalia ended thirty years of war in central Europe instead.",
        "Another unrelated document on baking bread with sourdough starter and rye flour at home.",
    ]
    dropped = list(contaminated(training, SpanIndex([EVALUATION_PASSAGE])))
    assert [d.index for d in dropped] == [1]
    assert dropped[0].span == "the treaty of westphalia ended thirty years of war in central europe and"


def test_spans_are_exactly_thirteen_words_and_shorter_texts_never_match():
    index = SpanIndex([EVALUATION_PASSAGE])
    passage_words = words(EVALUATION_PASSAGE)
    assert len(index) == len(passage_words) - SPAN_WORDS + 1
    for start in range(len(passage_words) - SPAN_WORDS + 1):
        assert index.shared_span(" ".join(passage_words[start : start + SPAN_WORDS])) is not None
    assert index.shared_span(" ".join(passage_words[: SPAN_WORDS - 1])) is None


def test_a_span_of_unknown_words_in_known_positions_does_not_match():
    # Every word is in the reference vocabulary, but never in this order.
    index = SpanIndex([EVALUATION_PASSAGE])
    shuffled = " ".join(reversed(words(EVALUATION_PASSAGE)))
    assert index.shared_span(shuffled) is None


def test_an_empty_reference_matches_nothing():
    assert SpanIndex([]).shared_span(EVALUATION_PASSAGE) is None


def test_question_texts_join_question_and_answer_without_prompt_labels():
    """A copied question with its answer is caught across the prompt's 'Question:'/'Answer:' labels."""
    question = cloze_question(qa_prompt("Which planet in the solar system has the largest number of known moons"), ["Saturn", "Mars"], 0)
    texts = list(question_texts([question]))
    assert len(texts) == 2
    assert "Question:" not in texts[0] and "Answer:" not in texts[0]
    copied = "Quiz: which planet in the solar system has the largest number of known moons? Saturn, it is."
    assert SpanIndex(texts).shared_span(copied) is not None
    winogrande_like = Question((Choice("The trophy did not fit in the suitcase because the trophy", " was too big."),), 0)
    assert list(question_texts([winogrande_like])) == ["The trophy did not fit in the suitcase because the trophy was too big."]
