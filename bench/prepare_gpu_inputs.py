"""Tokenise the inputs of bench/tomoe_gpu_run.py on a CPU machine, so the GPU side needs no data packages.

Writes OUT/inputs.safetensors: `train_blocks` [n, 512] (the general training domain of params.yaml:
SQuAD + DROP passages and CPython documentation prose) and `heldout_tokens` (the BoolQ Wikipedia
passages' token stream, enough for 64 windows of 512).
    python bench/prepare_gpu_inputs.py MODEL_DIR OUT
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer

from llmcarve.data.packing import join_for_perplexity, pack_blocks, tokenize_documents
from llmcarve.data.sources import BUILTIN_SOURCES

TRAIN = ("squad_wikipedia_paragraphs", "drop_wikipedia_passages", "cpython_docs_prose")
HELDOUT = "boolq_wikipedia_passages"


def main(model_dir: str, out: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train = [doc for name in TRAIN for doc in BUILTIN_SOURCES[name]()]
    blocks = pack_blocks(tokenize_documents(tokenizer, train), 512, tokenizer.eos_token_id)
    heldout = tokenizer(join_for_perplexity(BUILTIN_SOURCES[HELDOUT]()), add_special_tokens=False).input_ids
    Path(out).mkdir(parents=True, exist_ok=True)
    save_file(
        {"train_blocks": blocks.to(torch.int32), "heldout_tokens": torch.tensor(heldout[: 64 * 512 + 1], dtype=torch.int32)},
        Path(out) / "inputs.safetensors",
    )
    print(f"train blocks {tuple(blocks.shape)}, heldout tokens {min(len(heldout), 64 * 512 + 1)}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
