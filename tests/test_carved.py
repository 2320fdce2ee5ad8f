"""The carved model equals the dense model with the dropped channels zeroed, and behaves like an HF model.

The reference ("masked dense") is built here with forward hooks on the unmodified dense model, from
the plan alone, so it shares no code with llmcarve.models.carved / carve.
"""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, DynamicCache, MistralConfig, MistralForCausalLM

import llmcarve  # noqa: F401  (registers the carved model with the Auto classes)
from llmcarve.eval.accounting import attention_mlp_weights, parameter_report
from llmcarve.kernels import moe_mlp
from llmcarve.models.adapters import Geometry
from llmcarve.models.carve import LayerPlan, carve
from llmcarve.models.carved import CarvedForCausalLM, DynamicVMask, attention_mask_for
from tests.tiny import tiny_llama, tiny_qwen2, tiny_tokenizer
from tests.tolerance import assert_within_floor, float32_floor

FAMILIES = {"llama-mha": lambda: tiny_llama(), "llama-gqa": lambda: tiny_llama(gqa=True), "qwen2": tiny_qwen2}
V_OFFSET = 0.0  # with random V mask weights this keeps about half of the dims on, per token


# ------------------------------------------------------------------------------------------------
# Random plans


def _subset(size: int, keep: int, generator: torch.Generator) -> torch.LongTensor:
    return torch.randperm(size, generator=generator)[:keep].sort().values


def random_plan(geometry: Geometry, seed: int, moe: bool = False) -> LayerPlan:
    """A random plan; with moe, 3 experts over the kept channels and a dynamic V mask (emb 6)."""
    generator = torch.Generator().manual_seed(seed)
    hd, half, d = geometry.head_dim, geometry.head_dim // 2, geometry.hidden_size
    pairs = _subset(half, 2, generator)
    plan = LayerPlan(
        qk_index=torch.cat([pairs, pairs + half]),
        v_index=_subset(hd, 5, generator),
        mlp_index=_subset(geometry.intermediate_size, 40, generator),
    )
    if moe:
        plan.expert_mask = torch.rand(3, 40, generator=generator) < 0.6
        plan.router_weight = torch.randn(3, d, generator=generator)
        plan.v_router = {
            "router": torch.randn(6, d, generator=generator),
            "state": torch.randn(6, generator=generator),
            "norm_weight": 1 + 0.1 * torch.randn(6, generator=generator),
            "norm_bias": 0.1 * torch.randn(6, generator=generator),
            "decoder": torch.randn(hd, 6, generator=generator),  # full head_dim rows: carve slices them
            "offset": V_OFFSET,
        }
    return plan


def random_plans(model, moe: bool = False) -> list[LayerPlan]:
    geometry = Geometry.from_config(model.config)
    return [random_plan(geometry, seed=layer, moe=moe) for layer in range(geometry.num_layers)]


# ------------------------------------------------------------------------------------------------
# The masked dense reference


def _index_mask(index: torch.Tensor, size: int) -> torch.Tensor:
    mask = torch.zeros(size)
    mask[index] = 1.0
    return mask


def _per_head(activation: torch.Tensor, mask: torch.Tensor, head_dim: int) -> torch.Tensor:
    """activation [..., heads * hd] times mask [hd] or [..., hd] (per token), shared by every head."""
    shape = activation.shape
    return (activation.view(*shape[:-1], -1, head_dim) * mask.unsqueeze(-2)).view(shape)


def _reference_v_mask(plan: LayerPlan, x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """ToMoE's per-token V mask over the full head dim: zero outside v_index."""
    router = plan.v_router
    embedding = F.linear(x, router["router"]) + router["state"]
    normed = F.layer_norm(embedding, (embedding.shape[-1],), router["norm_weight"], router["norm_bias"])
    logits = F.linear(F.gelu(normed), router["decoder"]) + router["offset"]
    return (logits > 0).float() * _index_mask(plan.v_index, head_dim)


def _hook_layer(layer, plan: LayerPlan, geometry: Geometry) -> list:
    hd, attention, mlp = geometry.head_dim, layer.self_attn, layer.mlp
    qk_mask, v_mask = _index_mask(plan.qk_index, hd), _index_mask(plan.v_index, hd)
    mlp_mask = _index_mask(plan.mlp_index, geometry.intermediate_size)
    token = {}  # this forward's per-token masks

    def attention_input(_module, args, kwargs):
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        token["v"] = _reference_v_mask(plan, x, hd) if plan.v_router is not None else v_mask

    def mlp_input(_module, args):
        if plan.router_weight is None:
            token["mlp"] = mlp_mask
            return
        expert = F.linear(args[0], plan.router_weight).argmax(-1)
        expert_masks = torch.zeros(plan.num_experts, geometry.intermediate_size)
        expert_masks[:, plan.mlp_index] = plan.expert_mask.float()
        token["mlp"] = expert_masks[expert]

    return [
        attention.register_forward_pre_hook(attention_input, with_kwargs=True),
        attention.q_proj.register_forward_hook(lambda _m, _a, out: _per_head(out, qk_mask, hd)),
        attention.k_proj.register_forward_hook(lambda _m, _a, out: _per_head(out, qk_mask, hd)),
        attention.v_proj.register_forward_hook(lambda _m, _a, out: _per_head(out, token["v"], hd)),
        attention.o_proj.register_forward_pre_hook(lambda _m, args: (_per_head(args[0], token["v"], hd),)),
        mlp.register_forward_pre_hook(mlp_input),
        mlp.down_proj.register_forward_pre_hook(lambda _m, args: (args[0] * token["mlp"],)),
    ]


@torch.no_grad()
def masked_dense_logits(model, plans: list[LayerPlan], input_ids: torch.Tensor) -> torch.Tensor:
    geometry = Geometry.from_config(model.config)
    handles = [h for layer, plan in zip(model.model.layers, plans) for h in _hook_layer(layer, plan, geometry)]
    try:
        return model(input_ids=input_ids).logits
    finally:
        for handle in handles:
            handle.remove()


def sample_ids(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 200, (batch, length), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------
# Equivalence


@pytest.mark.parametrize("moe", [False, True], ids=["static", "moe-dynamic-v"])
@pytest.mark.parametrize("family", FAMILIES)
def test_carved_logits_equal_masked_dense_logits(family, moe):
    model = FAMILIES[family]()
    plans = random_plans(model, moe=moe)
    carved = carve(model, plans)
    ids = sample_ids()
    with torch.no_grad():
        logits = carved(input_ids=ids).logits
    floor = float32_floor(lambda m: m(input_ids=ids).logits, carved)
    assert_within_floor(logits, masked_dense_logits(model, plans, ids), floor, f"{family} carved vs masked dense logits")
    assert not torch.allclose(logits, model(input_ids=ids).logits, atol=1e-3)  # the plan really prunes


def test_keeping_everything_reproduces_a_sliding_window_mistral():
    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=4, max_position_embeddings=64,
    )
    dense = MistralForCausalLM(config).eval()
    geometry = Geometry.from_config(config)
    carved = carve(dense, [LayerPlan.dense(geometry)] * geometry.num_layers)
    ids = sample_ids(length=12)
    with torch.no_grad():
        floor = float32_floor(lambda m: m(input_ids=ids).logits, dense)
        assert_within_floor(carved(input_ids=ids).logits, dense(input_ids=ids).logits, floor, "carved vs dense Mistral logits")
    # decoding past the window with a cache: the carved masks must drop keys older than 4 tokens
    generated = carved.generate(ids[:1], max_new_tokens=6, do_sample=False)
    assert torch.equal(generated, dense.generate(ids[:1], max_new_tokens=6, do_sample=False))


# ------------------------------------------------------------------------------------------------
# A Hugging Face model: save/load, generate, padding


def test_save_and_auto_load_round_trip(tmp_path):
    model = tiny_qwen2()
    carved = carve(model, random_plans(model, moe=True))
    carved.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.py"))  # no remote code
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "llmcarve" and config["base_model_type"] == "qwen2"
    assert config["qk_dims"] == [4, 4] and config["num_experts"] == [3, 3] and config["v_mask_offset"] == V_OFFSET

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(reloaded) is CarvedForCausalLM
    ids = sample_ids()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, carved(input_ids=ids).logits)


@torch.no_grad()
def test_generate_matches_greedy_argmax_without_cache():
    model = tiny_llama(gqa=True)
    carved = carve(model, random_plans(model, moe=True))
    prompt = sample_ids(batch=1, length=5)
    generated = carved.generate(prompt, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    ids = prompt
    for _ in range(8):  # the whole sequence again every step, no cache
        next_token = carved(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_token], dim=1)
    assert torch.equal(generated, ids)

    # and a hand-driven cache, one token at a time with default positions, gives the full-pass logits
    cache, step_logits = DynamicCache(), []
    for position in range(ids.shape[1]):
        step_logits.append(carved(input_ids=ids[:, position : position + 1], past_key_values=cache, use_cache=True).logits)
    floor = float32_floor(lambda m: m(input_ids=ids).logits, carved)
    assert_within_floor(torch.cat(step_logits, dim=1), carved(input_ids=ids).logits, floor, "cached one-token steps vs full pass")


@torch.no_grad()
def test_left_padded_batch_matches_unpadded_rows():
    model = tiny_qwen2()
    carved = carve(model, random_plans(model, moe=True))
    pad = tiny_tokenizer().pad_token_id
    long, short = sample_ids(batch=1, length=9, seed=1), sample_ids(batch=1, length=6, seed=2)
    batch = torch.cat([long, torch.cat([torch.full((1, 3), pad), short], dim=1)])
    attention_mask = (torch.arange(9) >= torch.tensor([[0], [3]])).long()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = carved(input_ids=batch, attention_mask=attention_mask, position_ids=position_ids).logits
    for row, alone in ((logits[0], long), (logits[1, 3:], short)):
        floor = float32_floor(lambda m, _ids=alone: m(input_ids=_ids).logits, carved)
        assert_within_floor(row, carved(input_ids=alone).logits[0], floor, f"padded row vs the {alone.shape[1]} tokens alone")
    assert torch.isfinite(logits).all()

    generated = carved.generate(batch, attention_mask=attention_mask, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    alone = carved.generate(short, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert torch.equal(generated[1, 3:], alone[0])


def test_every_query_sees_at_least_one_key():
    # A left-padding query has no real key to its left; a row without any allowed key would make
    # some SDPA backends return NaN there, and the NaN would reach real tokens through V.
    padding = torch.tensor([[0, 0, 0, 1, 1], [1, 1, 1, 1, 1]])
    for window in (None, 2):
        mask = attention_mask_for(padding, query_length=5, past_length=0, window=window, device="cpu")
        assert mask.any(-1).all()
        assert mask[0, 0, 4].tolist() == [False, False, False, True, True]  # padding is never a key
        assert mask[1, 0, 4].tolist() == [window is None] * 3 + [True, True]


# ------------------------------------------------------------------------------------------------
# Accounting and the MoE paths


def test_parameter_counts_shrink_as_planned():
    model = tiny_llama(gqa=True)  # d 32, H 4, H_kv 2, hd 8, D_ff 64, 2 layers
    plans = random_plans(model, moe=True)
    plans[1].v_active = 3  # layer 1's V mask may keep at most 3 of its 5 dims per token
    carved = carve(model, plans)
    d, heads, kv_heads = 32, 4, 2
    # stored: q/k rows for 4 dims, v rows / o columns for 5 dims, MLP for 40 channels
    per_layer_stored = d * (heads + kv_heads) * (4 + 5) + 3 * d * 40
    assert attention_mlp_weights(carved) == 2 * per_layer_stored
    # active: the widest expert and v_active instead of every kept channel
    widest = [int(plan.expert_mask.sum(1).max()) for plan in plans]
    expected = sum(d * (heads + kv_heads) * (4 + v) + 3 * d * w for v, w in zip([5, 3], widest))
    assert carved.active_attention_mlp_params() == expected
    report = parameter_report(carved, context_len=16)
    assert report["attention_mlp_params_dense"] == parameter_report(model, context_len=16)["attention_mlp_params_dense"]
    assert report["active_ratio"] == pytest.approx(expected / report["attention_mlp_params_dense"])
    assert report["params_total"] < parameter_report(model, context_len=16)["params_total"]


def test_v_mask_keeps_at_most_v_active_dims_per_token():
    torch.manual_seed(0)
    mask_module = DynamicVMask(hidden_size=8, embedding_dim=4, width=6, max_width=2, offset=100.0)
    x = torch.randn(3, 5, 8)
    mask = mask_module(x)
    assert torch.equal(mask.sum(-1), torch.full((3, 5), 2.0))  # every logit is on; the cap keeps 2
    logits = mask_module.decoder(F.gelu(mask_module.norm(mask_module.router(x) + mask_module.state)))
    assert torch.equal(mask.bool(), torch.zeros_like(mask, dtype=torch.bool).scatter_(-1, logits.topk(2).indices, True))


@torch.no_grad()
@pytest.mark.parametrize("fast_path", ["auto", "grouped", "sorted"])
@pytest.mark.parametrize("length", [1, 20, 120])  # "auto": one token, the masked union, grouped GEMMs
def test_masked_and_fast_moe_paths_agree(fast_path, length):
    model = tiny_llama()
    carved = carve(model, random_plans(model, moe=True))
    ids = sample_ids(batch=3 if length > 1 else 1, length=length)
    carved.config.moe_impl = "masked"
    masked = carved(input_ids=ids).logits
    floor = float32_floor(lambda m: m(input_ids=ids).logits, carved)  # of the masked reference path
    carved.config.moe_impl = fast_path
    assert_within_floor(carved(input_ids=ids).logits, masked, floor, f"{fast_path} vs masked MoE path")

    # the fast path's cached expert weights follow in-place weight updates
    for layer in carved.model.layers:
        layer.mlp.up_proj.weight.mul_(0.5)
    halved_fast = carved(input_ids=ids).logits
    carved.config.moe_impl = "masked"
    floor = float32_floor(lambda m: m(input_ids=ids).logits, carved)
    assert_within_floor(halved_fast, carved(input_ids=ids).logits, floor, f"{fast_path} vs masked MoE path after a weight update")
    assert not torch.allclose(halved_fast, masked, atol=1e-3)


@torch.no_grad()
def test_auto_moe_path_takes_each_kernel_by_token_count(monkeypatch):
    model = tiny_llama()
    carved = carve(model, random_plans(model, moe=True))
    assert carved.config.moe_impl == "auto"  # what a converted model runs unless told otherwise
    taken = []
    for name in ("one_token", "masked_union", "grouped_experts"):
        kernel = getattr(moe_mlp, name)
        monkeypatch.setattr(moe_mlp, name, lambda *args, _kernel=kernel, _name=name: taken.append(_name) or _kernel(*args))
    for batch, length in ((1, 1), (3, 20), (3, 120)):
        carved(input_ids=sample_ids(batch=batch, length=length))
    layers = len(carved.model.layers)
    assert taken == ["one_token"] * layers + ["masked_union"] * layers + ["grouped_experts"] * layers
    taken.clear()
    with torch.enable_grad():  # the kernels have no backward: training runs the masked path
        carved(input_ids=sample_ids())
    assert taken == []


def test_sorted_moe_path_trains_the_live_weights():
    model = tiny_llama()
    carved = carve(model, random_plans(model, moe=True))
    ids = sample_ids()
    with torch.inference_mode():
        carved(input_ids=ids)  # caches per-expert slices, which autograd must not use
    up = carved.model.layers[0].mlp.up_proj.weight
    carved(input_ids=ids).logits.sum().backward()
    assert up.grad is not None and up.grad.abs().sum() > 0


def test_plans_the_carved_model_cannot_honour_are_refused():
    model = tiny_llama()
    plans = random_plans(model)
    plans[0].qk_index = torch.tensor([0, 1, 4, 6])  # 1 kept without its partner 5
    with pytest.raises(ValueError, match="layer 0: qk_index must keep RoPE pairs"):
        carve(model, plans)
    plans = random_plans(model)
    plans[1].v_active = 2  # a static V keeps all of v_index for every token: the count would lie
    with pytest.raises(ValueError, match="layer 1: only a dynamic V mask"):
        carve(model, plans)


# ------------------------------------------------------------------------------------------------
# Training a carved MoE model (recovery distillation trains every weight)

TRAINING_PATHS = ("auto", "grouped", "sorted", "masked")


def _trainable_moe_model(moe_impl: str) -> CarvedForCausalLM:
    model = tiny_llama()
    carved = carve(model, random_plans(model, moe=True)).train()
    carved.config.moe_impl = moe_impl
    return carved


def _routed_experts(carved, ids: torch.Tensor) -> list[set[int]]:
    """Per layer, the experts the tokens of `ids` go to (routed as the forward routes them)."""
    routed = [set() for _ in carved.model.layers]

    def record(seen: set):
        return lambda mlp, args: seen.update(mlp.route(args[0]).flatten().tolist())

    handles = [layer.mlp.register_forward_pre_hook(record(seen)) for layer, seen in zip(carved.model.layers, routed)]
    try:
        with torch.no_grad():
            carved(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    return routed


@pytest.mark.parametrize("moe_impl", TRAINING_PATHS)
def test_moe_trains_under_bf16_autocast_with_gradients_to_every_expert_and_the_router(moe_impl):
    carved = _trainable_moe_model(moe_impl)
    ids = sample_ids(batch=3, length=20)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        experts = carved.config.num_experts[0]
        assert _routed_experts(carved, ids) == [set(range(experts))] * len(carved.model.layers), "route to every expert"
        logits = carved(input_ids=ids).logits
    assert logits.dtype == torch.bfloat16
    logits.float().pow(2).mean().backward()
    for number, layer in enumerate(carved.model.layers):
        mlp = layer.mlp
        # every channel of an expert that got tokens has a gradient; a channel of no expert has none
        in_an_expert = mlp.expert_mask.any(0)
        for name, per_channel in (("gate_proj", mlp.gate_proj.weight.grad.abs().sum(1)),
                                  ("up_proj", mlp.up_proj.weight.grad.abs().sum(1)),
                                  ("down_proj", mlp.down_proj.weight.grad.abs().sum(0))):
            assert torch.equal(per_channel > 0, in_an_expert), f"layer {number} {name}: gradient on the wrong channels"
        router_grad = mlp.router.weight.grad
        assert router_grad is not None and torch.isfinite(router_grad).all() and router_grad.abs().sum() > 0, (
            f"layer {number}: no gradient reaches the router"
        )


def _logits_and_gradients(carved, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    carved.zero_grad()
    logits = carved(input_ids=ids).logits
    logits.double().pow(2).mean().backward()
    values = {name: p.grad.double() for name, p in carved.named_parameters() if p.grad is not None}
    return {"logits": logits.detach().double(), **values}


def _worst_relative_error(values: dict, reference: dict) -> float:
    assert values.keys() == reference.keys()
    return max(float((values[name] - reference[name]).norm() / reference[name].norm()) for name in reference)


@pytest.mark.parametrize("moe_impl", ["auto", "grouped", "sorted"])
def test_moe_training_paths_give_the_masked_reference_logits_and_gradients(moe_impl):
    carved = _trainable_moe_model("masked")
    ids = sample_ids(batch=3, length=20)
    exact = _logits_and_gradients(copy.deepcopy(carved).double(), ids)
    # the floor: the masked reference itself in float32 against float64, per tensor (norm-relative)
    floor = _worst_relative_error(_logits_and_gradients(carved, ids), exact)
    carved.config.moe_impl = moe_impl
    error = _worst_relative_error(_logits_and_gradients(carved, ids), exact)
    assert error <= 4 * floor, f"{moe_impl}: error {error:.2e} against float64, the masked path's is {floor:.2e}"


# Operators whose result the host must read (a value, or a size that depends on the values): on a GPU
# each one waits for the device to finish everything queued before it.
HOST_READS = {"_local_scalar_dense", "nonzero", "masked_select", "bincount", "_unique2", "unique_consecutive"}


class HostReadDetector(TorchDispatchMode):
    """Records the host-reading operators (and indexing with a boolean mask) that run under it."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        boolean_index = name.startswith("index") and any(
            isinstance(index, torch.Tensor) and index.dtype == torch.bool
            for arg in args if isinstance(arg, (list, tuple)) for index in arg
        )
        if name in HOST_READS or boolean_index:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("moe_impl", TRAINING_PATHS)
def test_moe_training_step_reads_nothing_back_to_the_host(moe_impl):
    carved = _trainable_moe_model(moe_impl)
    ids = sample_ids(batch=3, length=20)
    carved(input_ids=ids).logits.sum().backward()  # the first step builds the per-mask caches
    with HostReadDetector() as detector:
        carved(input_ids=ids).logits.pow(2).mean().backward()
    if moe_impl == "sorted":  # the per-expert loop reads the token counts: the detector must see it
        assert "bincount" in detector.reads and "nonzero" in detector.reads
    else:
        assert detector.reads == [], f"{moe_impl}: the training step read values back to the host: {detector.reads}"
