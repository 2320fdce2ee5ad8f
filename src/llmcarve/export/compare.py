"""How far an exported graph's outputs are from PyTorch's: one definition for every check.

`rel_err` is the relative error in norm, ||actual - expected|| / ||expected|| over all logits compared,
the usual measure of a numerical kernel. The element-wise peak (`max_abs_diff` / max |expected|) is
kept beside it as `peak_rel_err`: on a heavily pruned model it reaches 1e-4 from float32 rounding
alone, because PyTorch's own float32 logits are that far from a float64 evaluation of the same model
(measured on static@0.5 of SmolLM2: 7.2e-5 peak for PyTorch fp32 vs fp64, 4.1e-5 for onnxruntime).
"""

from __future__ import annotations

import numpy as np


def difference(actual: np.ndarray, expected: np.ndarray) -> dict[str, float]:
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    gap = actual - expected
    max_abs_diff = float(np.abs(gap).max())
    return {
        "max_abs_diff": max_abs_diff,
        "rel_err": float(np.linalg.norm(gap) / np.linalg.norm(expected)),
        "peak_rel_err": max_abs_diff / float(np.abs(expected).max()),
    }


def difference_where(actual: np.ndarray, expected: np.ndarray, compared: np.ndarray) -> dict[str, float]:
    """`difference` over the [batch, length] positions where `compared` is True (those before any
    near-tie, see `routing`), with how many they are. Of the positions left out only the largest
    difference is kept, `excluded_max_abs_diff`: large when an engine took the other branch of a tie.
    With nothing compared the differences are NaN (and `compared_tokens` 0, which the stage fails on:
    a check that compared nothing proves nothing)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    counts = {"tokens": int(compared.size), "compared_tokens": int(compared.sum())}
    if counts["compared_tokens"]:
        numbers = difference(actual[compared], expected[compared])
    else:
        numbers = dict.fromkeys(("max_abs_diff", "rel_err", "peak_rel_err"), float("nan"))
    if not compared.all():
        left_out = np.abs(actual[~compared].astype(np.float64) - expected[~compared]).max()
        numbers["excluded_max_abs_diff"] = float(left_out)
    return {**numbers, **counts}
