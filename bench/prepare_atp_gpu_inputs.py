"""Collect the inputs of bench/atp_gpu_run.py on a CPU machine, so the GPU side needs no data packages.

Reads a project whose `prepare_data` stage has run (its artifacts/data, so the splits are exactly the
pipeline's) and writes OUT/atp_inputs.safetensors and OUT/atp_tasks.json:
- per domain (medical, legal): `<domain>.train_blocks` [n, 512] (the training split, packed) and
  `<domain>.heldout_tokens` (held-out documents' token stream, enough for 64 windows of 512);
- `general.train_blocks` (static pruning's calibration text) and `general.heldout_tokens` (BoolQ
  passages): the general perplexity;
- the domain multiple-choice tasks of params.yaml, a seeded sample of `--limit` questions each.
    python bench/prepare_atp_gpu_inputs.py PROJECT_DIR OUT [--limit 200]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from llmcarve.data.documents import Document
from llmcarve.data.packing import join_for_perplexity
from llmcarve.eval.tasks import load_task, select
from llmcarve.io import read_jsonl
from llmcarve.params import load_params

WINDOWS_TOKENS = 64 * 512 + 1
MAX_TRAIN_BLOCKS = 4096  # 2M tokens per domain: more than a GPU run of a few minutes takes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("project")
    parser.add_argument("out")
    parser.add_argument("--limit", type=int, default=200)
    args = parser.parse_args()
    project, out = Path(args.project), Path(args.out)
    params = load_params(project / "params.yaml")
    tokenizer = AutoTokenizer.from_pretrained(project / "artifacts" / "model")
    tensors = {}
    for domain in ("general", "medical", "legal"):
        data = project / "artifacts" / "data" / domain
        tensors[f"{domain}.train_blocks"] = load_file(data / "train_blocks.safetensors")["blocks"][:MAX_TRAIN_BLOCKS].to(torch.uint16)  # vocab < 65536: half the bytes to carry
        documents = [Document(**row) for row in read_jsonl(data / "heldout.jsonl")]
        tokens = tokenizer(join_for_perplexity(documents), add_special_tokens=False).input_ids[:WINDOWS_TOKENS]
        tensors[f"{domain}.heldout_tokens"] = torch.tensor(tokens, dtype=torch.int32)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "atp_inputs.safetensors")
    tasks = {
        name: [dataclasses.asdict(q) for q in select(load_task(spec), args.limit, params.seed)]
        for name, spec in params.evaluate.domain_tasks.items()
    }
    (out / "atp_tasks.json").write_text(json.dumps(tasks))
    print({name: tuple(t.shape) for name, t in tensors.items()}, {name: len(qs) for name, qs in tasks.items()})


if __name__ == "__main__":
    main()
