"""Corpora for calibration, fine-tuning and perplexity: where documents come from, how they are split
into train/heldout without leaking a group across the boundary, and how they become token blocks.

- `documents`: the `Document` record every source produces.
- `sources`: builtin corpora extracted from installed packages, plus local files and HF datasets.
- `splits`: group-aware, seeded train/heldout split and a content fingerprint.
- `packing`: tokenization, fixed-size training blocks, and the perplexity text.
"""
