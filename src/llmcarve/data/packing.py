"""From documents to model inputs: token ids, fixed-size training blocks, and the perplexity text."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from llmcarve.data.documents import Document

PERPLEXITY_SEPARATOR = "\n\n"


def tokenize_documents(tokenizer, docs: Sequence[Document], batch_size: int = 1000) -> list[list[int]]:
    """Token ids of each document, without special tokens (`pack_blocks` adds the separators).

    Batched calls let a fast tokenizer encode a whole batch in parallel in Rust.
    """
    texts = [doc.text for doc in docs]
    token_lists: list[list[int]] = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(
            texts[start : start + batch_size],
            add_special_tokens=False,
            return_attention_mask=False,
            verbose=False,  # documents longer than the model's context are expected: they get packed
        )
        token_lists.extend(encoded["input_ids"])
    return token_lists


def pack_blocks(token_lists: Iterable[Sequence[int]], block_size: int, separator_id: int) -> torch.LongTensor:
    """[n_blocks, block_size] ids: documents joined by `separator_id`, cut into full blocks.

    The tail shorter than a block is dropped so every block is a full-length example; n_blocks is
    0 when the documents do not fill one block. Empty documents are skipped rather than producing
    two separators in a row.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    stream: list[int] = []
    for tokens in token_lists:
        if not tokens:
            continue
        if stream:
            stream.append(separator_id)
        stream.extend(tokens)
    n_blocks = len(stream) // block_size
    return torch.tensor(stream[: n_blocks * block_size], dtype=torch.long).view(n_blocks, block_size)


def join_for_perplexity(docs: Iterable[Document]) -> str:
    """The single text the perplexity protocol scores: documents joined by a blank line."""
    return PERPLEXITY_SEPARATOR.join(doc.text for doc in docs)
