"""A domain's documents and packed training blocks: what prepare_data writes, and what `llmcarve carve` trains on.

A domain is a list of training sources, sources held out whole, and the fraction of each training
source held out by group (llmcarve.data.splits). BUILTIN_DOMAINS are params.yaml's domains (and
profiles/gpu.yaml's `legal`), built from corpora inside installed packages; tests/test_cli.py holds them
equal. So a command-line carve on `general` sees exactly the training documents of params.yaml's `general`
domain, and its held-out BoolQ passages are the pipeline's perplexity corpus.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from llmcarve.data.documents import Document
from llmcarve.data.packing import pack_blocks
from llmcarve.data.sources import SourceSpecLike, load_source
from llmcarve.data.splits import split_by_group
from llmcarve.errors import MissingInputError, UserInputError


@dataclass(frozen=True)
class CorpusSpec:
    """A source given in code rather than in params.yaml (it has every field load_source reads)."""

    builtin: str | None = None
    path: str | None = None
    hf_id: str | None = None
    hf_config: str | None = None
    split: str = "train"
    text_column: str = "text"
    group_column: str | None = None
    max_documents: int | None = None


@dataclass(frozen=True)
class BuiltinDomain:
    """Builtin source names (llmcarve.data.sources.BUILTIN_SOURCES) split as params.yaml's domains are."""

    train: tuple[str, ...]
    heldout: tuple[str, ...] = ()
    heldout_fraction: float = 0.0

    def sources(self, names: Iterable[str]) -> list[tuple[str, CorpusSpec]]:
        return [(name, CorpusSpec(builtin=name)) for name in names]


BUILTIN_DOMAINS = {
    # calibration and training text; the BoolQ passages are held out whole, for perplexity
    "general": BuiltinDomain(
        train=("squad_wikipedia_paragraphs", "drop_wikipedia_passages", "cpython_docs_prose"),
        heldout=("boolq_wikipedia_passages",),
    ),
    "legal": BuiltinDomain(train=("scancode_license_texts",), heldout_fraction=0.1),
    "medical": BuiltinDomain(
        train=("bioasq_pubmed_contexts", "hpo_phenotype_definitions", "icd10cm_tabular_by_chapter"), heldout_fraction=0.1
    ),
}
TEXT_SUFFIXES = (".txt", ".md")
_NOT_IN_A_DOMAIN_NAME = re.compile(r"[^a-z0-9_]+")


def domain_documents(
    train: Sequence[tuple[str, SourceSpecLike]],
    heldout: Sequence[tuple[str, SourceSpecLike]],
    heldout_fraction: float,
    seed: int,
) -> tuple[list[Document], list[Document]]:
    """(train, heldout) documents of a domain: each training source split by group on its own (so every
    source contributes to both sides), then the held-out sources whole."""
    train_documents, heldout_documents = [], []
    for name, spec in train:
        kept, held = split_by_group(load_source(name, spec), heldout_fraction, seed)
        train_documents += kept
        heldout_documents += held
    for name, spec in heldout:
        heldout_documents += load_source(name, spec)
    return train_documents, heldout_documents


def training_blocks(
    token_lists: Sequence[Sequence[int]],
    separator_id: int,
    block_size: int,
    where: str,
    block_size_key: str,
    max_train_tokens: int | None = None,
    more_text: str = "add documents",
) -> torch.Tensor:
    """[n, block_size] token ids of the documents' tokens packed end to end (llmcarve.data.packing.pack_blocks),
    at most `max_train_tokens` of them (at least one block).

    Documents shorter than a block are fine: packing joins them. Only a corpus that cannot fill one
    block is an error (`where` and `block_size_key` name the settings in it), since calibration and
    training would have nothing to read.
    """
    blocks = pack_blocks(token_lists, block_size, separator_id)
    if len(blocks) == 0:
        raise UserInputError(
            f"{where}: its {len(token_lists)} training document(s) hold {sum(map(len, token_lists))} tokens, "
            f"fewer than one block of {block_size_key}={block_size}; {more_text} or lower {block_size_key}"
        )
    if max_train_tokens is not None:
        blocks = blocks[: max(1, max_train_tokens // block_size)]
    return blocks


def text_file_documents(path: Path) -> list[Document]:
    """A plain-text file as documents, one per paragraph (paragraphs are separated by blank lines)."""
    paragraphs = re.split(r"\n\s*\n", path.read_text(encoding="utf-8"))
    documents = [Document(text.strip(), path.name) for text in paragraphs if text.strip()]
    if not documents:
        raise UserInputError(f"{path} holds no text")
    return documents


def domain_name_of(path: Path) -> str:
    """The domain a file's text is named by in model names (atp-<domain>@p): its lowercased stem."""
    name = _NOT_IN_A_DOMAIN_NAME.sub("_", path.stem.lower()).strip("_")
    if not name:
        raise UserInputError(f"cannot name a domain after {path.name}: rename the file to start with a letter or digit")
    return name


@dataclass(frozen=True)
class Corpus:
    """A domain's name (as model names carry it) and its documents."""

    domain: str
    train: list[Document]
    heldout: list[Document]


def check_domain_choice(domain: str, key: str) -> None:
    """A builtin domain or an existing file; anything else is refused before any text is read."""
    if domain in BUILTIN_DOMAINS:
        return
    path = Path(domain).expanduser()
    if not path.exists():
        raise MissingInputError(
            f"{key} {domain!r} is neither a builtin domain ({', '.join(BUILTIN_DOMAINS)}) nor an existing file; "
            "give one of those, or a .txt, .md or .jsonl file of your text"
        )
    domain_name_of(path)


def open_corpus(domain: str, seed: int, key: str) -> Corpus:
    """A builtin domain by name, or a file of text: `.txt`/`.md` (paragraphs) or a table with a `text`
    column (.jsonl, .parquet, .arrow or a save_to_disk directory), whose documents all train.

    `key` names the setting in errors (e.g. `--domain`).
    """
    check_domain_choice(domain, key)
    if domain in BUILTIN_DOMAINS:
        recipe = BUILTIN_DOMAINS[domain]
        train, heldout = domain_documents(recipe.sources(recipe.train), recipe.sources(recipe.heldout), recipe.heldout_fraction, seed)
        return Corpus(domain, train, heldout)
    path = Path(domain).expanduser()
    if path.suffix in TEXT_SUFFIXES:
        return Corpus(domain_name_of(path), text_file_documents(path), [])
    return Corpus(domain_name_of(path), load_source(path.name, CorpusSpec(path=str(path))), [])
