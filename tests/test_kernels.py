"""The fast inference paths (llmcarve.kernels) compute what the reference paths of the carved model do.

On the CPU these run the torch fallbacks of the same algorithms (sorting, grouped GEMMs, the masked
union, the static-cache decoder); the Triton kernels themselves are checked against the same
references on the GPU by bench/moe_layer.py and bench/decode_speed.py, which refuse to time a
variant whose output differs.
"""

from types import SimpleNamespace

import pytest
import torch

from llmcarve.kernels import moe_mlp
from llmcarve.kernels.static_decode import StaticDecoder
from llmcarve.models.carve import carve
from llmcarve.models.carved import CarvedMLP
from tests.test_carved import random_plans, sample_ids
from tests.tiny import tiny_llama
from tests.tolerance import assert_within_floor, float32_floor


def moe_layer(experts: int = 4, hidden: int = 24, width: int = 40, seed: int = 0) -> CarvedMLP:
    """A CarvedMLP with experts of unequal widths (one of them a single channel)."""
    config = SimpleNamespace(hidden_size=hidden, mlp_dims=[width], num_experts=[experts], hidden_act="silu", moe_impl="masked")
    generator = torch.Generator().manual_seed(seed)
    layer = CarvedMLP(config, 0).eval()
    with torch.no_grad():
        for linear in (layer.gate_proj, layer.up_proj, layer.down_proj, layer.router):
            linear.weight.normal_(0, 1, generator=generator)
        mask = torch.rand(experts, width, generator=generator) < 0.5
        mask[0] = False
        mask[0, 3] = True
        layer.expert_mask.copy_(mask)
    return layer


def layer_floor(layer: CarvedMLP, x: torch.Tensor) -> float:
    """The float32 rounding floor of the reference (masked) layer on x."""
    return float32_floor(lambda m: m(x.to(m.router.weight.dtype)), layer)


PATHS = {
    "grouped": lambda layer, x, packed: moe_mlp.grouped_experts(x, layer.router, packed),
    "masked_union": lambda layer, x, packed: moe_mlp.masked_union(x, layer.router, layer, packed),
    "dispatch": lambda layer, x, packed: moe_mlp.moe_mlp(layer, x, packed),
}


@torch.no_grad()
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("tokens", [1, 2, 37])
def test_fast_moe_paths_equal_the_masked_reference(path, tokens):
    layer = moe_layer()
    packed = moe_mlp.PackedExperts.from_mlp(layer)
    x = torch.randn(tokens, 24, generator=torch.Generator().manual_seed(tokens))
    expected = layer(x)
    assert len(set(moe_mlp.route(x, layer.router).tolist())) > 1 or tokens == 1  # several experts in play
    assert_within_floor(PATHS[path](layer, x, packed), expected, layer_floor(layer, x), f"{path} path, {tokens} tokens")


@torch.no_grad()
def test_one_token_reads_only_its_expert():
    layer = moe_layer()
    packed = moe_mlp.PackedExperts.from_mlp(layer)
    x = torch.randn(1, 24, generator=torch.Generator().manual_seed(5))
    expected, floor = layer(x), layer_floor(layer, x)
    assert_within_floor(moe_mlp.one_token(x, layer.router, packed), expected, floor, "one-token path")
    # zeroing every other expert's packed weights changes nothing: the token never touched them
    expert = int(moe_mlp.route(x, layer.router))
    for other in set(range(4)) - {expert}:
        packed.gate_up[other].normal_()
        packed.down[other].normal_()
    assert_within_floor(moe_mlp.one_token(x, layer.router, packed), expected, floor, "one-token path, other experts scrambled")


@torch.no_grad()
def test_dispatch_takes_each_path(monkeypatch):
    """moe_mlp picks one-token, masked-union and grouped by shape, and each gives the reference."""
    layer = moe_layer()
    packed = moe_mlp.PackedExperts.from_mlp(layer)
    taken = []
    for name in ("one_token", "masked_union", "grouped_experts"):
        original = getattr(moe_mlp, name)
        monkeypatch.setattr(moe_mlp, name, lambda *a, _f=original, _n=name: taken.append(_n) or _f(*a))
    monkeypatch.setattr(moe_mlp, "GROUPED_MIN_TOKENS_CPU", 8)
    for tokens in (1, 4, 12):
        x = torch.randn(1, tokens, 24)
        assert_within_floor(moe_mlp.moe_mlp(layer, x, packed), layer(x), layer_floor(layer, x), f"dispatch, {tokens} tokens")
    assert taken == ["one_token", "masked_union", "grouped_experts"]


def test_route_sorted_groups_tokens_by_expert():
    logits = torch.randn(50, 5, generator=torch.Generator().manual_seed(1))
    logits[::4, 2] = logits[::4, 1] = logits[::4].max(1).values + 1  # exact ties: the first maximum wins
    expert, dest, order, offsets = moe_mlp.route_sorted(logits, torch.arange(5))
    assert torch.equal(expert, logits.argmax(-1))
    assert torch.equal(order[dest], torch.arange(50))
    assert torch.equal(offsets, torch.bincount(expert, minlength=5).cumsum(0).to(torch.int32))
    grouped = expert[order]
    assert torch.equal(grouped, grouped.sort().values)
    for e in range(5):  # ascending token order within each group
        members = order[grouped == e]
        assert torch.equal(members, members.sort().values)


def carved_model(moe: bool) -> torch.nn.Module:
    model = tiny_llama(gqa=True)
    return carve(model, random_plans(model, moe=moe)).eval()


@torch.no_grad()
@pytest.mark.parametrize("moe", [False, True])
def test_static_decoder_logits_equal_the_models_forward(moe):
    model = carved_model(moe)
    model.config.moe_impl = "masked"
    ids = sample_ids(batch=2, length=9)
    decoder = StaticDecoder(model, batch=2, max_length=16)
    steps = [decoder.prefill(ids[:, :6])] + [decoder.step(ids[:, t : t + 1]) for t in range(6, 9)]
    for last, logits in zip(range(6, 10), steps):
        expected = model(input_ids=ids[:, :last]).logits[:, -1]
        floor = float32_floor(lambda m, _last=last: m(input_ids=ids[:, :_last]).logits[:, -1], model)
        assert_within_floor(logits, expected, floor, f"static decoder logits at length {last}")
    # starting over overwrites the cache rather than appending to it; the prompt attends to itself
    # only, so the same prompt in the same process repeats the first prefill bit for bit
    assert torch.equal(decoder.prefill(ids[:, :6]), steps[0])


@torch.no_grad()
def test_static_decoder_generates_the_greedy_continuation():
    model = carved_model(moe=True)
    model.config.moe_impl = "masked"
    prompt = sample_ids(batch=2, length=5)
    got = StaticDecoder(model, batch=2, max_length=12).generate(prompt, new_tokens=6)
    sequence = prompt
    for _ in range(6):  # greedy without any cache: the whole sequence each time
        sequence = torch.cat([sequence, model(input_ids=sequence).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(got, sequence[:, 5:])
    with pytest.raises(ValueError, match="exceed the cache"):
        StaticDecoder(model, batch=2, max_length=8).generate(prompt, new_tokens=6)
