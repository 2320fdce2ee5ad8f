"""Train/heldout splits that never cut a group in two, and a fingerprint of a document list."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Sequence

from llmcarve.data.documents import Document


def split_by_group(
    docs: Sequence[Document], heldout_fraction: float, seed: int
) -> tuple[list[Document], list[Document]]:
    """(train, heldout), each in the original document order; a group lands wholly on one side.

    Heldout receives about `heldout_fraction` of the documents. With a positive fraction and at
    least two groups it receives at least one group; train is never left empty. A single group
    cannot be split, so it all goes to train.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    heldout_groups = _heldout_groups(Counter(doc.group for doc in docs), heldout_fraction, seed)
    train = [doc for doc in docs if doc.group not in heldout_groups]
    heldout = [doc for doc in docs if doc.group in heldout_groups]
    return train, heldout


def _heldout_groups(group_sizes: Counter[str], heldout_fraction: float, seed: int) -> set[str]:
    if heldout_fraction == 0.0 or len(group_sizes) < 2:
        return set()
    total = sum(group_sizes.values())
    target = min(round(heldout_fraction * total), total - 1)  # keep at least one training document
    candidates = sorted(group_sizes, key=lambda group: _seeded_rank(group, seed))
    chosen, held = set(), 0
    for group in candidates:
        if held + group_sizes[group] <= target:
            chosen.add(group)
            held += group_sizes[group]
    if not chosen:
        # Every group is bigger than the target: hold out the smallest (first in seeded order on ties).
        chosen.add(min(candidates, key=group_sizes.__getitem__))
    return chosen


def _seeded_rank(group: str, seed: int) -> bytes:
    # A hash rather than random.shuffle: a group's rank depends only on its name and the seed, not
    # on the order documents arrive in, and it is the same on every machine and Python version.
    return hashlib.sha256(f"{seed}\0{group}".encode("utf-8")).digest()


def fingerprint(docs: Iterable[Document]) -> str:
    """SHA-256 hex digest of the documents' sources and texts, in order; stable across runs and machines."""
    digest = hashlib.sha256()
    for doc in docs:
        for field in (doc.source, doc.text):
            encoded = field.encode("utf-8")
            # Length-prefixing keeps field boundaries unambiguous: ("ab", "c") and ("a", "bc") differ.
            digest.update(len(encoded).to_bytes(8, "little"))
            digest.update(encoded)
    return digest.hexdigest()
