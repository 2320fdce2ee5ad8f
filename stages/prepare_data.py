"""Stage prepare_data: build each domain's train/heldout documents and packed training blocks.

Reads `data:` and `seed`; for every domain writes artifacts/data/<domain>/{train,heldout}.jsonl and
train_blocks.safetensors ([n, block_size] token ids), plus artifacts/data/manifest.json and
metrics/prepare_data.json with document/token counts and a fingerprint of every split.

No document is in two splits: documents of one group (a license key, a topic, ...) stay together, and
sources listed as `heldout` are never split into training data.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer

from llmcarve.data.domains import domain_documents, training_blocks
from llmcarve.data.packing import tokenize_documents
from llmcarve.data.provenance import source_summaries
from llmcarve.data.splits import fingerprint
from llmcarve.io import atomic_directory, write_json, write_jsonl
from llmcarve.params import DomainSpec, Params
from llmcarve.tracking import stage_run
from stages.common import ARTIFACTS, METRICS, main

OUT = ARTIFACTS / "data"


def build_domain(domain: str, spec: DomainSpec, params: Params, tokenizer, directory: Path) -> dict:
    sources = params.data.sources
    train, heldout = domain_documents(
        [(name, sources[name]) for name in spec.train], [(name, sources[name]) for name in spec.heldout], spec.heldout_fraction, params.seed
    )
    token_lists = tokenize_documents(tokenizer, train)
    blocks = training_blocks(
        token_lists, tokenizer.eos_token_id, params.data.block_size, f"data.domains.{domain}", "data.block_size", spec.max_train_tokens,
        more_text="add documents (or raise max_documents / lower heldout_fraction)",
    )
    directory.mkdir(parents=True)
    save_file({"blocks": blocks.to(torch.int32)}, directory / "train_blocks.safetensors")
    summary = {"train_blocks": len(blocks), "train_tokens": blocks.numel()}
    # per training source: documents, tokens before packing, and a packaged corpus's licence and hashes
    summary["sources"] = source_summaries(spec.train, params.data.sources, train, token_lists)
    for split, docs in (("train", train), ("heldout", heldout)):
        write_jsonl(directory / f"{split}.jsonl", [dataclasses.asdict(d) for d in docs])
        summary[split] = {
            "documents": len(docs),
            "groups": len({d.group for d in docs}),
            "sources": sorted({d.source for d in docs}),
            "fingerprint": fingerprint(docs),
        }
    return summary


def run(params: Params) -> None:
    with stage_run("prepare_data", {"data": params.data.model_dump(), "seed": params.seed}) as tracker:
        tokenizer = AutoTokenizer.from_pretrained(ARTIFACTS / "model")
        manifest = {"block_size": params.data.block_size, "seed": params.seed, "domains": {}}
        with atomic_directory(OUT) as staging:
            for domain, spec in params.data.domains.items():
                manifest["domains"][domain] = build_domain(domain, spec, params, tokenizer, staging / domain)
            write_json(staging / "manifest.json", manifest)
        for domain, summary in manifest["domains"].items():
            for split in ("train", "heldout"):
                tracker.log_dataset(OUT / domain / f"{split}.jsonl", f"{domain}-{split}-{summary[split]['fingerprint'][:8]}", split, rows=[summary[split]])
        write_json(METRICS / "prepare_data.json", manifest)
        tracker.log_metrics({d: {"train_tokens": s["train_tokens"], "heldout_documents": s["heldout"]["documents"]} for d, s in manifest["domains"].items()})


if __name__ == "__main__":
    main(run, __doc__)
