"""The data library: builtin corpora, file sources and their errors, group splits, packing, fingerprints."""

from __future__ import annotations

import hashlib
import json
import logging

import pytest
import torch

from llmcarve.data.documents import Document
from llmcarve.data.packing import join_for_perplexity, pack_blocks, tokenize_documents
from llmcarve.data.sources import BUILTIN_SOURCES, load_source, scancode_license_categories
from llmcarve.data.splits import fingerprint, split_by_group
from llmcarve.params import SourceSpec
from tests.tiny import tiny_tokenizer

# Pinned package versions (pyproject.toml) fix these counts; a change means the extraction changed.
EXPECTED_BUILTIN_COUNTS = {
    "boolq_wikipedia_passages": 2938,
    "squad_wikipedia_paragraphs": 803,
    "drop_wikipedia_passages": 405,
    "lambada_novel_passages": 5151,
    "coqa_stories": 499,
    "sciq_support": 887,
    "bioasq_pubmed_contexts": 1582,
    "cpython_docs_prose": 78,  # 79 topics; "if" and "else" share one page
    "scancode_license_texts": 1837,
    "hpo_phenotype_definitions": 16449,
    "icd10cm_tabular_by_chapter": 22,
}


def builtin(name: str) -> list[Document]:
    return load_source(name, SourceSpec(builtin=name))


# --- builtins


def test_every_builtin_has_an_expected_count():
    from llmcarve.data.packaged.catalog import CATALOG  # fetched on first use: tests/test_corpora.py

    assert set(BUILTIN_SOURCES) - set(CATALOG) == set(EXPECTED_BUILTIN_COUNTS)


@pytest.mark.parametrize("name", sorted(EXPECTED_BUILTIN_COUNTS))
def test_builtin_loads_expected_unique_documents(name):
    docs = builtin(name)
    assert len(docs) == EXPECTED_BUILTIN_COUNTS[name]
    assert {doc.source for doc in docs} == {name}
    assert all(doc.text.strip() for doc in docs)
    assert len({doc.text for doc in docs}) == len(docs)


def test_builtin_callers_get_independent_lists():
    first = BUILTIN_SOURCES["drop_wikipedia_passages"]()
    first.clear()
    assert len(BUILTIN_SOURCES["drop_wikipedia_passages"]()) == 405


def test_max_documents_truncates_in_source_order():
    everything = builtin("coqa_stories")
    assert load_source("coqa_stories", SourceSpec(builtin="coqa_stories", max_documents=7)) == everything[:7]


def test_squad_paragraphs_are_grouped_by_article_without_the_prompt():
    docs = builtin("squad_wikipedia_paragraphs")
    assert len({doc.group for doc in docs}) == 48
    assert not any(doc.text.startswith("Title:") or "\nQuestion:" in doc.text for doc in docs)


def test_cpython_docs_keep_prose_and_drop_code():
    docs = builtin("cpython_docs_prose")
    assert [doc.group for doc in docs] == sorted(doc.group for doc in docs)
    assert_doc = next(doc for doc in docs if doc.group == "assert")
    assert assert_doc.text.startswith("Assert statements are a convenient way to insert debugging assertions")
    # Grammar rules, doctests, tables, pseudo-code suites, tracebacks.
    code_markers = ("::=", ">>>", "+--", "SUITE", "Traceback (most recent call last)")
    assert not [marker for doc in docs for marker in code_markers if marker in doc.text]


def test_scancode_licenses_are_grouped_by_key_with_categories():
    docs = builtin("scancode_license_texts")
    groups = [doc.group for doc in docs]
    assert "mit" in groups and len(set(groups)) == len(groups)
    mit = docs[groups.index("mit")]
    assert mit.text.startswith("Permission is hereby granted, free of charge")
    categories = scancode_license_categories()
    assert categories["mit"] == "Permissive" and categories["gpl-3.0"] == "Copyleft"
    assert set(groups) <= set(categories)


def test_hpo_and_icd_texts_follow_the_recipe():
    hpo = builtin("hpo_phenotype_definitions")
    assert hpo[0].text == (
        "Abnormality of body height: Deviation from the norm of height with respect to that which is "
        "expected according to age and gender norms."
    )
    assert hpo[0].group == "HP:0000002"
    icd = builtin("icd10cm_tabular_by_chapter")
    assert [doc.group for doc in icd[:2]] == ["chapter-1", "chapter-2"]
    cholera = "\nA00 Cholera\nA00.0 Cholera due to Vibrio cholerae 01, biovar cholerae\n  Classical cholera\n"
    assert cholera in icd[0].text


# --- local files


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def test_jsonl_source_reads_text_and_group_and_skips_empty_texts(tmp_path, caplog):
    path = write_jsonl(
        tmp_path / "notes.jsonl",
        [{"body": "first", "doc": 1}, {"body": "  ", "doc": 2}, {"body": None, "doc": 3}, {"body": "second", "doc": 1}],
    )
    with caplog.at_level(logging.INFO, logger="llmcarve.data.sources"):
        docs = load_source("notes", SourceSpec(path=str(path), text_column="body", group_column="doc"))
    assert docs == [Document("first", "notes", "1"), Document("second", "notes", "1")]
    assert "skipped 2 empty text(s)" in caplog.text


def test_jsonl_bad_json_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 3: not valid JSON"):
        load_source("bad", SourceSpec(path=str(path)))


def test_jsonl_missing_column_lists_the_columns(tmp_path):
    path = write_jsonl(tmp_path / "cols.jsonl", [{"text": "a"}, {"body": "b", "id": 2}])
    with pytest.raises(ValueError, match=r"cols\.jsonl, line 2: no column 'text' \(columns: body, id\)"):
        load_source("cols", SourceSpec(path=str(path)))


def test_jsonl_non_utf8_names_file_and_byte_offset(tmp_path):
    path = tmp_path / "latin1.jsonl"
    first_line = b'{"text": "ok"}\n'
    path.write_bytes(first_line + b'{"text": "caf\xe9"}\n')
    offset = len(first_line) + len(b'{"text": "caf')
    with pytest.raises(ValueError, match=rf"latin1\.jsonl: not valid UTF-8 at byte offset {offset} \(line 2\)"):
        load_source("latin1", SourceSpec(path=str(path)))


def test_source_without_documents_is_an_error_naming_it(tmp_path):
    path = write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}, {"text": "   "}])
    with pytest.raises(ValueError, match="source 'blank' yielded no documents"):
        load_source("blank", SourceSpec(path=str(path)))


def test_empty_jsonl_file_is_an_error_naming_the_source(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="source 'empty' yielded no documents"):
        load_source("empty", SourceSpec(path=str(path)))


def save_table(fmt: str, directory):
    """A small table with an empty text, saved in one of the formats a `path` source reads."""
    import datasets
    import pyarrow

    table = datasets.Dataset.from_dict({"passage": ["alpha", "", "beta"], "key": ["k1", "k2", "k1"]})
    if fmt == "parquet":
        table.to_parquet(str(directory / "t.parquet"))
        return directory / "t.parquet"
    if fmt == "arrow_stream":  # what save_to_disk writes
        table.save_to_disk(str(directory / "saved"))
        return next((directory / "saved").glob("*.arrow"))
    if fmt == "arrow_file":  # Arrow's random-access format, as other tools write it
        arrow = table.with_format("arrow")[:]
        with pyarrow.ipc.new_file(str(directory / "t.arrow"), arrow.schema) as writer:
            writer.write_table(arrow)
        return directory / "t.arrow"
    datasets.DatasetDict(train=table).save_to_disk(str(directory / "dict"))
    return directory / "dict"


@pytest.mark.parametrize("fmt", ["parquet", "arrow_stream", "arrow_file", "save_to_disk"])
def test_table_sources_read_the_mapped_columns(tmp_path, fmt):
    path = save_table(fmt, tmp_path)
    spec = SourceSpec(path=str(path), text_column="passage", group_column="key")
    assert load_source("t", spec) == [Document("alpha", "t", "k1"), Document("beta", "t", "k1")]
    with pytest.raises(ValueError, match=r"no column 'text' \(columns: passage, key\)"):
        load_source("t", SourceSpec(path=str(path)))


def test_hub_failure_explains_the_network_need(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'org/set' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match=r"source 'web': could not load Hugging Face dataset 'org/set'.*network"):
        load_source("web", SourceSpec(hf_id="org/set"))


# --- documents, splits, fingerprints


def test_document_group_defaults_to_sha1_of_text():
    assert Document("hello", "s").group == hashlib.sha1(b"hello").hexdigest()
    assert Document("hello", "s", "g").group == "g"


def license_like_docs() -> list[Document]:
    """30 license keys with 1-4 texts each (a license and its variants), the keys interleaved."""
    sizes = {f"license-{n}": 1 + n % 4 for n in range(30)}
    return [
        Document(f"{key} variant {i}", "licenses", key) for i in range(4) for key, size in sizes.items() if i < size
    ]


def test_split_keeps_groups_whole_and_order():
    docs = license_like_docs()
    train, heldout = split_by_group(docs, 0.2, seed=0)
    assert not {doc.group for doc in train} & {doc.group for doc in heldout}
    assert sorted(train + heldout, key=docs.index) == docs
    assert train == [doc for doc in docs if doc in train] and heldout == [doc for doc in docs if doc in heldout]
    assert abs(len(heldout) - 0.2 * len(docs)) <= 4


def test_split_is_deterministic_per_seed_and_changes_with_seed():
    docs = license_like_docs()
    assert split_by_group(docs, 0.2, seed=1) == split_by_group(list(docs), 0.2, seed=1)
    assert split_by_group(docs, 0.2, seed=1) != split_by_group(docs, 0.2, seed=2)


def test_split_edge_cases():
    docs = license_like_docs()
    tiny_train, tiny_heldout = split_by_group(docs, 0.001, seed=0)
    assert len({doc.group for doc in tiny_heldout}) == 1 and tiny_train
    assert split_by_group(docs, 0.0, seed=0) == (docs, [])
    one_group = [Document(f"t{i}", "s", "same") for i in range(5)]
    assert split_by_group(one_group, 0.5, seed=0) == (one_group, [])
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_by_group(docs, 1.0, seed=0)


def test_fingerprint_is_stable_and_sensitive():
    docs = [Document("ab", "s"), Document("c", "t")]
    assert fingerprint(docs) == "e11fe675e5f470b70b3d098be86acd59852972347ddcaa0143a09351936c86d1"
    assert fingerprint(docs) != fingerprint([Document("a", "s"), Document("bc", "t")])
    assert fingerprint(docs) != fingerprint([Document("ab", "s"), Document("c", "u")])
    assert fingerprint(docs) != fingerprint(docs[::-1])


# --- packing


def test_pack_blocks_joins_with_separator_and_drops_the_tail():
    blocks = pack_blocks([[1, 2, 3], [4, 5], [], [6, 7, 8, 9]], block_size=3, separator_id=0)
    assert blocks.dtype == torch.long
    assert torch.equal(blocks, torch.tensor([[1, 2, 3], [0, 4, 5], [0, 6, 7]]))
    assert pack_blocks([[1, 2]], block_size=3, separator_id=0).shape == (0, 3)


def test_tokenize_then_pack_with_a_real_tokenizer():
    tokenizer = tiny_tokenizer()
    docs = [Document("The quick brown fox", "s"), Document("jumps over the lazy dog.", "s")]
    token_lists = tokenize_documents(tokenizer, docs, batch_size=1)
    assert token_lists == [tokenizer.encode(doc.text, add_special_tokens=False) for doc in docs]
    stream = token_lists[0] + [tokenizer.eos_token_id] + token_lists[1]
    blocks = pack_blocks(token_lists, block_size=4, separator_id=tokenizer.eos_token_id)
    assert blocks.flatten().tolist() == stream[: len(stream) // 4 * 4]


def test_join_for_perplexity():
    assert join_for_perplexity([Document("one", "s"), Document("two\n", "s")]) == "one\n\ntwo\n"
