import math

import pytest
import torch
from torch import nn

from llmcarve.eval.perplexity import Protocol, make_windows, perplexity
from tests.tiny import tiny_llama


class FixedLogits(nn.Module):
    """A 'model' whose next-token distribution is the same known table at every position."""

    def __init__(self, probabilities: list[float]):
        super().__init__()
        self.log_probs = nn.Parameter(torch.tensor(probabilities).log(), requires_grad=False)

    def forward(self, input_ids):
        batch, length = input_ids.shape
        return type("Out", (), {"logits": self.log_probs.expand(batch, length, -1)})()


def test_perplexity_matches_hand_computation():
    # p(token 0) = 0.5, p(1) = 0.25, p(2) = 0.25. Tokens [0, 1, 2, 0, 1, 2, 0]: the first token of a
    # window has no context, so windows of 4 score tokens 1..3 and then 5..6 (token 4 starts window 2).
    model = FixedLogits([0.5, 0.25, 0.25])
    tokens = [0, 1, 2, 0, 1, 2, 0]
    result = perplexity(model, tokens, Protocol(seq_len=4, max_windows=None), progress=False)
    scored = [1, 2, 0] + [2, 0]
    expected_nll = -sum(math.log([0.5, 0.25, 0.25][t]) for t in scored) / len(scored)
    assert result["scored_tokens"] == 5
    assert result["ppl"] == pytest.approx(math.exp(expected_nll), rel=1e-6)


def test_uniform_model_has_perplexity_of_vocab_size():
    model = FixedLogits([0.1] * 10)
    result = perplexity(model, list(range(10)) * 5, Protocol(seq_len=8, max_windows=None), progress=False)
    assert result["ppl"] == pytest.approx(10.0, rel=1e-5)


def test_windows_score_every_token_once():
    tokens = list(range(100))
    for protocol in (Protocol(seq_len=16, max_windows=None), Protocol(seq_len=16, stride=5, max_windows=None), Protocol(seq_len=16, add_bos=True, max_windows=None)):
        scored = []
        for window in make_windows(tokens, protocol, bos_id=-1):
            scored += [t for t in window.input_ids[window.first_scored :]]
        first = 0 if protocol.add_bos else 1
        if protocol.stride is None and not protocol.add_bos:
            # non-overlapping windows cannot score each window's first token
            expected = [t for t in tokens if t % 16 != 0]
        else:
            expected = tokens[first:]
        assert scored == expected, protocol


def test_sliding_windows_on_a_real_model_score_all_but_the_first_token():
    model = tiny_llama()
    tokens = torch.randint(3, 200, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    flat = perplexity(model, tokens, Protocol(seq_len=64, max_windows=None), progress=False)
    slide = perplexity(model, tokens, Protocol(seq_len=64, stride=16, max_windows=None), progress=False)
    assert slide["scored_tokens"] == len(tokens) - 1
    assert flat["scored_tokens"] == len(tokens) - math.ceil(len(tokens) / 64)
    assert math.isfinite(slide["ppl"]) and slide["ppl"] != flat["ppl"]


def test_bos_protocol_needs_a_bos_token():
    with pytest.raises(ValueError, match="no BOS"):
        make_windows([1, 2, 3], Protocol(seq_len=4, add_bos=True), bos_id=None)
