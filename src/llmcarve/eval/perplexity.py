"""Perplexity with an explicit, reproducible protocol.

Protocol (recorded next to every number): the corpus is one token stream (documents joined by a blank
line, no special tokens). Windows of `seq_len` positions start every `stride` tokens; each window
scores only tokens that no earlier window scored, so stride == seq_len gives the usual
non-overlapping windows and a smaller stride gives sliding windows with more context per token.
Without BOS a window's first token has no context and is not scored; with `add_bos` every window
starts with BOS and all its text tokens are scored.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm


@dataclass(frozen=True)
class Protocol:
    seq_len: int = 512
    stride: int | None = None  # None: non-overlapping windows
    max_windows: int | None = 64
    add_bos: bool = False

    def describe(self) -> dict:
        return asdict(self) | {"stride": self.stride or (self.seq_len - 1 if self.add_bos else self.seq_len)}


@dataclass(frozen=True)
class Window:
    input_ids: list[int]
    first_scored: int  # index in input_ids of the first position whose token is scored


def make_windows(tokens: list[int], protocol: Protocol, bos_id: int | None) -> list[Window]:
    if protocol.add_bos and bos_id is None:
        raise ValueError("add_bos is set but the tokenizer has no BOS token")
    text_len = protocol.seq_len - 1 if protocol.add_bos else protocol.seq_len
    stride = protocol.stride or text_len
    windows, scored_until = [], 0 if protocol.add_bos else 1  # first token without BOS has no context
    for begin in range(0, len(tokens), stride):
        chunk = tokens[begin : begin + text_len]
        end = begin + len(chunk)
        if end <= scored_until:
            break
        prefix = [bos_id] if protocol.add_bos else []
        first_scored = len(prefix) + max(scored_until - begin, 0)
        if first_scored == 0:  # position 0 can only be scored when BOS precedes it
            first_scored = 1
        windows.append(Window(prefix + chunk, first_scored))
        scored_until = end
        if protocol.max_windows and len(windows) == protocol.max_windows:
            break
    return windows


@torch.inference_mode()
def window_nll(model, window: Window) -> tuple[float, int]:
    """Summed negative log-likelihood of the window's scored tokens, and how many there are."""
    device = next(model.parameters()).device
    ids = torch.tensor([window.input_ids], device=device)
    logits = model(input_ids=ids).logits[0, :-1].float()
    targets = ids[0, 1:]
    # logits[i] predicts token i+1, so token positions >= first_scored use logits from first_scored-1.
    nll = F.cross_entropy(logits[window.first_scored - 1 :], targets[window.first_scored - 1 :], reduction="sum")
    return nll.item(), len(targets) - (window.first_scored - 1)


def perplexity(model, tokens: list[int], protocol: Protocol, bos_id: int | None = None, progress: bool = True) -> dict:
    windows = make_windows(tokens, protocol, bos_id)
    if not windows:
        raise ValueError(f"corpus has {len(tokens)} tokens: too short for one window of the protocol {protocol}")
    total_nll, total_tokens = 0.0, 0
    for window in tqdm(windows, desc="perplexity", unit="window", disable=not progress):
        nll, count = window_nll(model, window)
        total_nll += nll
        total_tokens += count
    return {
        "ppl": math.exp(total_nll / total_tokens),
        "nll_per_token": total_nll / total_tokens,
        "scored_tokens": total_tokens,
        "windows": len(windows),
        "protocol": protocol.describe(),
    }
