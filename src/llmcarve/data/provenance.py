"""Per-source lines of the prepare_data manifest: documents and tokens, and for a packaged corpus
its package, version, licence, content hashes and the documents decontamination dropped.

The text hashes stand in for a DVC dependency on the `.corpora/` cache: a changed corpus changes
the manifest (and the split fingerprints) even though DVC does not track the cache.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

from llmcarve.data.documents import Document

# Fields of a packaged source's record that belong in the manifest.
_RECORD_FIELDS = (
    "registry", "package", "version", "licence", "archive_sha256", "text_sha256",
    "documents_extracted", "documents_dropped",
)


def source_summaries(
    names: Iterable[str], specs: Mapping, documents: Sequence[Document], token_lists: Sequence[Sequence[int]]
) -> dict[str, dict]:
    """{source name: summary} for the named sources of one split; `token_lists[i]` are the tokens of `documents[i]`."""
    from llmcarve.data.packaged.catalog import CATALOG
    from llmcarve.data.packaged.store import read_record

    counted_documents, counted_tokens = Counter(), Counter()
    for document, tokens in zip(documents, token_lists, strict=True):
        counted_documents[document.source] += 1
        counted_tokens[document.source] += len(tokens)
    summaries = {}
    for name in names:
        spec = specs[name]
        key = spec.builtin or name  # a builtin's documents carry the builtin's name
        summary = {"documents": counted_documents[key], "tokens": counted_tokens[key]}
        if spec.builtin in CATALOG and (record := read_record(spec.builtin)) is not None:
            summary.update({field: record[field] for field in _RECORD_FIELDS})
        summaries[name] = summary
    return summaries
