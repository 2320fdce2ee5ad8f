"""The GPU paths, on the GPU: run this module on a CUDA machine each time GPU code changes.

    PYTHONPATH=src python -m pytest -q -rA tests/test_cuda.py

(on a GPU machine whose transformers/peft differ from the project's pins, install the pinned wheels
first, as the recorded run did: see the header of tests/cuda_log.txt).

Skipped where no CUDA device is visible (CI, the CPU machines). Its last run is recorded in
tests/cuda_log.txt (device, torch version, command, every measured error next to its bound).

What it checks, on tiny random-weight models (tests/tiny.py, tests/test_carved.py):
- the Triton kernels (llmcarve.kernels.triton_ops) and the fast MoE paths and the static decoder
  built on them (moe_mlp, static_decode) against their PyTorch references;
- one short ToMoE run and one short ATP run on CUDA: finite losses, and the optimizer moved;
- evaluation on the GPU equals evaluation on the CPU (perplexity, multiple-choice log-likelihoods);
- a carved MoE model's forward and backward under bfloat16 autocast.

Tolerances come from tests/tolerance.py: MARGIN times the float32 rounding floor measured on the
computation itself (the float32 result's distance from a float64 run). A comparison across devices
takes the larger of the two devices' floors: each float32 result is about one floor from the exact
value, so the two are about two floors apart, well inside MARGIN. For bfloat16 the floor is the
bfloat16 reference's distance from float64, never taken below one bfloat16 rounding (BF16_EPS).
Each check prints its error and bound, so the log shows how close each one came.
"""

from __future__ import annotations

import copy

import pytest
import torch

from llmcarve.eval.multiple_choice import choice_logliks
from llmcarve.eval.perplexity import Protocol, make_windows, perplexity, window_nll
from llmcarve.eval.tasks import Choice, Question, cloze_question
from llmcarve.kernels import moe_mlp
from llmcarve.kernels.static_decode import StaticDecoder
from llmcarve.methods.atp.trainer import ATPConfig, LoraRunConfig, train_atp
from llmcarve.methods.tomoe.hypernetwork import ToMoEHeads
from llmcarve.methods.tomoe.trainer import ToMoEConfig, train_tomoe
from llmcarve.models.adapters import Geometry
from llmcarve.models.carve import carve
from tests.test_carved import random_plans, sample_ids
from tests.test_kernels import layer_floor, moe_layer
from tests.tiny import TRAINING_TEXT, tiny_llama, tiny_mistral, tiny_qwen2, tiny_tokenizer
from tests.tolerance import FLOAT32_EPS, MARGIN, assert_within_floor, float32_floor, float64_copy, relative_error

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: run tests/test_cuda.py on a GPU machine when GPU code changes"
)

CUDA = torch.device("cuda")
# One bfloat16 rounding, relative: the least a bfloat16 floor is taken to be (as FLOAT32_EPS for float32).
BF16_EPS = torch.finfo(torch.bfloat16).eps
FAMILIES = {"llama-gqa": lambda: tiny_llama(gqa=True), "qwen2": tiny_qwen2, "mistral-window": tiny_mistral}


@pytest.fixture(autouse=True)
def full_float32_matmuls():
    """float32 matmuls in full float32: TF32 would round at 1e-3 and turn every float32 floor into a guess."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(previous)


def check(actual, expected, floor: float, what: str, least: float = FLOAT32_EPS) -> None:
    """assert_within_floor with the floor taken no lower than `least`, and the numbers printed for the log."""
    print(f"{what}: error {relative_error(actual, expected):.2e}, floor measured {floor:.2e}, bound {MARGIN * max(floor, least):.2e}")
    assert_within_floor(actual, expected, max(floor, least), what)


def triton_ops():
    # imported here, as the library does: a missing Triton fails these tests, not the module's collection
    from llmcarve.kernels import triton_ops

    return triton_ops


# ------------------------------------------------------------------------------------------------
# (1) the Triton kernels against torch


def halves(tokens: int, width: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """gate and up as the two halves of one [T, 2w] tensor: strided views, as the grouped path hands them in."""
    generator = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(tokens, 2 * width, generator=generator).to(CUDA, dtype)
    return gate_up[:, :width], gate_up[:, width:]


def reference_silu_mul(gate, up, expert=None, mask=None):
    hidden = torch.nn.functional.silu(gate) * up
    return hidden if mask is None else hidden * mask[expert].to(hidden.dtype)


@torch.no_grad()
@pytest.mark.parametrize("masked", [False, True], ids=["plain", "expert-mask"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_silu_mul_kernel_equals_torch(dtype, masked):
    tokens, width, experts = 37, 1100, 5  # width past one 1024-column block: two programs per row
    gate, up = halves(tokens, width, dtype, seed=1)
    generator = torch.Generator().manual_seed(2)
    expert = torch.randint(experts, (tokens,), generator=generator).to(CUDA) if masked else None
    mask = (torch.rand(experts, width, generator=generator) < 0.5).to(CUDA, torch.uint8) if masked else None
    got = triton_ops().silu_mul(gate, up, expert, mask)
    expected = reference_silu_mul(gate, up, expert, mask)
    floor = relative_error(expected, reference_silu_mul(gate.double(), up.double(), expert, mask))
    check(got, expected, floor, f"silu_mul {dtype}, mask {masked}", least=BF16_EPS if dtype == torch.bfloat16 else FLOAT32_EPS)


@torch.no_grad()
def test_routed_silu_mul_kernel_equals_torch():
    """The router folded into the SwiGLU kernel picks each token's expert as the router's argmax does."""
    tokens, hidden, width, experts = 37, 600, 1100, 5  # hidden past one 256-wide K block, experts padded to 8
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(tokens, hidden, generator=generator).to(CUDA)
    router = torch.randn(experts, hidden, generator=generator).to(CUDA)
    mask = (torch.rand(experts, width, generator=generator) < 0.5).to(CUDA, torch.uint8)
    gate, up = halves(tokens, width, torch.float32, seed=4)
    got = triton_ops().routed_silu_mul(gate, up, x, router, mask)

    def reference(gate, up, x, router):
        return reference_silu_mul(gate, up, (x @ router.T).argmax(-1), mask)

    expected = reference(gate, up, x, router)
    floor = relative_error(expected, reference(gate.double(), up.double(), x.double(), router.double()))
    check(got, expected, floor, "routed_silu_mul")


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tokens,experts", [(1, 8), (7, 8), (1025, 6), (5000, 8), (3000, 16)])
def test_route_sorted_kernel_equals_torch_sort_exactly(tokens, experts, dtype):
    logits = torch.randn(tokens, experts, generator=torch.Generator().manual_seed(tokens)).to(CUDA, dtype)
    logits[::7, 1] = logits[::7, 0]  # exact ties: the first maximum wins, as torch.argmax
    ids = torch.arange(experts)
    got = triton_ops().route_sorted(logits)
    want = moe_mlp.route_sorted(logits.cpu(), ids)  # the CPU path: argmax, stable sort, searchsorted
    for name, a, b in zip(("expert", "dest", "order", "offsets"), got, want):
        assert torch.equal(a.cpu(), b), f"route_sorted kernel: {name} differs from torch's sort ({tokens} tokens, {experts} experts, {dtype})"


SHAPES = {"narrow": dict(experts=4, hidden=24, width=40), "wide": dict(experts=8, hidden=600, width=1100)}
PATHS = {
    "grouped": lambda layer, x, packed: moe_mlp.grouped_experts(x, layer.router, packed),
    "masked_union": lambda layer, x, packed: moe_mlp.masked_union(x, layer.router, layer, packed),
    "dispatch": lambda layer, x, packed: moe_mlp.moe_mlp(layer, x, packed),
}


def cuda_layer(shape: str, dtype: torch.dtype = torch.float32):
    layer = moe_layer(**SHAPES[shape]).to(CUDA, dtype)
    return layer, moe_mlp.PackedExperts.from_mlp(layer)


def tokens_in(shape: str, tokens: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(tokens, SHAPES[shape]["hidden"], generator=torch.Generator().manual_seed(tokens)).to(CUDA, dtype)


@torch.no_grad()
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("tokens", [1, 2, 37, 300])  # 300: past the routed SwiGLU's 256 tokens
def test_fast_moe_paths_equal_the_masked_reference_on_cuda(path, tokens, shape):
    layer, packed = cuda_layer(shape)
    x = tokens_in(shape, tokens)
    check(PATHS[path](layer, x, packed), layer(x), layer_floor(layer, x), f"{path} path, {shape}, {tokens} tokens")


@torch.no_grad()
@pytest.mark.parametrize("shape", SHAPES)
def test_one_token_kernels_read_only_the_tokens_expert(shape):
    layer, packed = cuda_layer(shape)
    x = tokens_in(shape, 1)
    expected, floor = layer(x), layer_floor(layer, x)
    check(moe_mlp.one_token(x, layer.router, packed), expected, floor, f"one-token kernels, {shape}")
    expert = int(moe_mlp.route(x, layer.router))
    for other in set(range(len(packed.gate_up))) - {expert}:  # scramble every expert the token does not use
        packed.gate_up[other].normal_()
        packed.down[other].normal_()
    check(moe_mlp.one_token(x, layer.router, packed), expected, floor, f"one-token kernels, {shape}, other experts scrambled")


@torch.no_grad()
@pytest.mark.parametrize("path,tokens", [("grouped", 37), ("grouped", 300), ("masked_union", 300)])
def test_fast_moe_paths_in_bfloat16(path, tokens):
    """bfloat16, the dtype the kernels serve. Only the paths that route through the layer's own router
    (so every token goes to the reference's expert; the fused kernels' own router sums could round a
    near-tie the other way, which bfloat16 makes likely)."""
    layer, packed = cuda_layer("wide", torch.bfloat16)
    x = tokens_in("wide", tokens, torch.bfloat16)
    check(PATHS[path](layer, x, packed), layer(x), layer_floor(layer, x), f"{path} path, bf16, {tokens} tokens", least=BF16_EPS)


def carved_moe_model() -> torch.nn.Module:
    model = tiny_llama(gqa=True)
    return carve(model, random_plans(model, moe=True)).eval().to(CUDA)


@torch.no_grad()
@pytest.mark.parametrize("impl", ["auto", "grouped"])
@pytest.mark.parametrize("batch,length", [(2, 12), (2, 150)])  # 24 tokens: routed SwiGLU; 300: masked SwiGLU
def test_carved_model_kernels_equal_the_masked_model(impl, batch, length):
    model = carved_moe_model()
    model.config.moe_impl = "masked"
    ids = sample_ids(batch=batch, length=length).to(CUDA)
    expected = model(input_ids=ids).logits
    floor = float32_floor(lambda m: m(input_ids=ids).logits, model)
    model.config.moe_impl = impl
    check(model(input_ids=ids).logits, expected, floor, f"carved model, moe_impl {impl}, {batch}x{length} tokens")


@torch.no_grad()
def test_static_decoder_and_its_cuda_graph_equal_the_models_forward():
    model = carved_moe_model()
    model.config.moe_impl = "masked"  # the reference; the decoder itself runs the kernels (FastMLP)
    ids = sample_ids(batch=2, length=9).to(CUDA)
    decoder = StaticDecoder(model, batch=2, max_length=16)
    steps = [decoder.prefill(ids[:, :6])] + [decoder.step(ids[:, t : t + 1]) for t in range(6, 9)]
    for last, logits in zip(range(6, 10), steps):
        expected = model(input_ids=ids[:, :last]).logits[:, -1]
        floor = float32_floor(lambda m, _last=last: m(input_ids=ids[:, :_last]).logits[:, -1], model)
        check(logits, expected, floor, f"static decoder logits at length {last}")
    prompt = ids[:, :5]
    decoder.capture(prompt)
    got = decoder.generate(prompt, new_tokens=6)  # replays the captured step
    sequence = prompt
    for _ in range(6):  # greedy without any cache: the whole sequence each time
        sequence = torch.cat([sequence, model(input_ids=sequence).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(got, sequence[:, 5:]), "the CUDA-graph decoder's greedy tokens differ from the model's own"


# ------------------------------------------------------------------------------------------------
# (2) one ToMoE and one ATP training run, a couple of steps each


BLOCKS = torch.randint(3, 250, (16, 24), generator=torch.Generator().manual_seed(0))


def assert_finite_history(history: list[dict], steps: int, what: str) -> None:
    assert len(history) == steps, f"{what}: {len(history)} logged steps, expected {steps}"
    for entry in history:
        print(f"{what} step {entry['step']}: " + ", ".join(f"{k} {v:.4g}" for k, v in entry.items() if isinstance(v, float)))
        bad = {k: v for k, v in entry.items() if isinstance(v, float) and not torch.isfinite(torch.tensor(v))}
        assert not bad, f"{what}: non-finite values at step {entry['step']}: {bad}"


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_tomoe_trains_on_cuda(compiled, tmp_path):
    """Two steps, eager and through torch.compile (the GPU default): finite losses, and the heads moved."""
    model = tiny_llama(gqa=True).to(CUDA)
    config = ToMoEConfig(p=0.5, steps=2, lr=2e-2, num_experts=4, checkpoint_every=2)
    result = train_tomoe(model, BLOCKS, config, tmp_path, compile_student=compiled)
    assert_finite_history(result.history, 2, f"tomoe ({'compiled' if compiled else 'eager'})")
    # the first step's ratio is one Gumbel sample (CUDA draws other noise than the CPU): the positive
    # mask offset starts it near dense, so closer to dense than to the budget, whatever the draw
    first = result.history[0]["ratio"]
    assert first > (1 + config.p) / 2, f"the first step keeps {first:.3f} of the weights; the mask offset should start it near dense"
    initial = ToMoEHeads(Geometry.from_config(model.config), config.num_experts, seed=config.seed).state_dict()
    trained = result.heads.state_dict()
    assert all(value.device.type == CUDA.type and value.isfinite().all() for value in trained.values())
    moved = [name for name, value in trained.items() if not torch.equal(value.cpu(), initial[name])]
    assert moved, "no parameter of the ToMoE heads changed in two optimizer steps"


def test_atp_trains_on_cuda(tmp_path):
    """Two steps (one of search, one with the decision frozen): finite losses, and LoRA moved."""
    data = torch.randint(3, 300, (24, 32), generator=torch.Generator().manual_seed(0))
    config = ATPConfig(lora=LoraRunConfig(steps=2, batch_size=2, lr=5e-3, checkpoint_every=2), p=0.5, generator_lr=5e-2)
    result = train_atp(tiny_llama(gqa=True).to(CUDA), data[:16], data[16:], config, tmp_path)
    assert_finite_history(result.history, 2, "atp")
    assert [entry["phase"] for entry in result.history] == ["search", "frozen"]
    lora_b = [p for name, p in result.model.named_parameters() if "lora_B" in name]
    assert lora_b and all(p.device.type == CUDA.type and p.isfinite().all() for p in lora_b)
    # PEFT starts every B factor at zero: a nonzero one is the LoRA update having happened
    assert any(p.count_nonzero() for p in lora_b), "every LoRA B factor is still zero after two steps"


# ------------------------------------------------------------------------------------------------
# (3) evaluation on the GPU equals evaluation on the CPU


def corpus_tokens() -> list[int]:
    return tiny_tokenizer().encode("\n\n".join(TRAINING_TEXT[:10]))


PROTOCOL = Protocol(seq_len=32, stride=12, max_windows=None)  # sliding windows: each scores its new tokens only


def window_nlls(model) -> torch.Tensor:
    return torch.tensor([window_nll(model, window)[0] for window in make_windows(corpus_tokens(), PROTOCOL, None)], dtype=torch.float64)


def device_floor(run, model, gpu_model) -> float:
    """The larger of the CPU's and the GPU's float32 rounding floors of `run`."""
    return max(float32_floor(run, model), float32_floor(run, gpu_model))


@pytest.mark.parametrize("family", FAMILIES)
def test_perplexity_on_cuda_equals_the_cpu(family):
    model = FAMILIES[family]()
    gpu_model = copy.deepcopy(model).to(CUDA)
    floor = device_floor(window_nlls, model, gpu_model)
    check(window_nlls(gpu_model), window_nlls(model), floor, f"{family}: per-window NLL, GPU vs CPU")
    on_gpu, on_cpu = (perplexity(m, corpus_tokens(), PROTOCOL, progress=False) for m in (gpu_model, model))
    assert on_gpu["scored_tokens"] == on_cpu["scored_tokens"] and on_gpu["windows"] == on_cpu["windows"]
    check(on_gpu["nll_per_token"], on_cpu["nll_per_token"], floor, f"{family}: NLL per token, GPU vs CPU")


QUESTIONS = [
    cloze_question("Question: What is the capital of France?\nAnswer:", ["Paris", "London", "the lazy dog"], 0),
    cloze_question("The patient presented with", ["fever", "a licence to copy and modify the software."], 0),
    Question((Choice("def main", "():\n    return 42"), Choice("def", " main")), 1),
]


def flat_logliks(model) -> list[float]:
    # batches of 4 over 7 choices of unequal lengths: right padding and the attention mask are in play
    return [ll for question in choice_logliks(model, tiny_tokenizer(), QUESTIONS, batch_size=4, progress=False) for ll in question]


@pytest.mark.parametrize("family", FAMILIES)
def test_multiple_choice_logliks_on_cuda_equal_the_cpu(family):
    model = FAMILIES[family]()
    gpu_model = copy.deepcopy(model).to(CUDA)
    floor = device_floor(flat_logliks, model, gpu_model)
    check(flat_logliks(gpu_model), flat_logliks(model), floor, f"{family}: choice log-likelihoods, GPU vs CPU")


# ------------------------------------------------------------------------------------------------
# (4) a carved MoE model trains under bfloat16 autocast


def loss_logits_grads(model, ids, autocast: bool) -> tuple[float, torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        output = model(input_ids=ids, labels=ids)
    output.loss.backward()
    grads = {name: p.grad.double() for name, p in model.named_parameters() if p.grad is not None}
    return output.loss.item(), output.logits.detach().double(), grads


def flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([grads[name].flatten() for name in sorted(grads)])


@pytest.mark.parametrize("impl", ["auto", "grouped"])  # auto trains through the masked union; grouped through grouped GEMMs
def test_carved_moe_forward_and_backward_under_bf16_autocast(impl):
    model = carved_moe_model().train()  # train mode: the straight-through gate carries the routers' gradient
    ids = sample_ids(batch=2, length=12).to(CUDA)
    exact = float64_copy(model)
    exact.config.moe_impl = "masked"
    _, exact_logits, exact_grads = loss_logits_grads(exact, ids, autocast=False)
    model.config.moe_impl = "masked"  # the bfloat16 floor: the reference path's own distance from float64
    _, floor_logits, floor_grads = loss_logits_grads(model, ids, autocast=True)
    logits_floor, grads_floor = relative_error(floor_logits, exact_logits), relative_error(flat(floor_grads), flat(exact_grads))
    model.config.moe_impl = impl
    loss, logits, grads = loss_logits_grads(model, ids, autocast=True)
    print(f"bf16 autocast, moe_impl {impl}: loss {loss:.4f}")
    assert torch.isfinite(torch.tensor(loss)), f"bf16 autocast loss is {loss}"
    assert sorted(grads) == sorted(exact_grads), "bf16 autocast gives gradients to other parameters than float64 does"
    assert all(g.isfinite().all() for g in grads.values()), "non-finite gradients under bf16 autocast"
    for part in ("mlp.router", "mlp.gate_proj", "mlp.down_proj"):
        assert any(g.count_nonzero() for name, g in grads.items() if part in name), f"no gradient reaches the {part} weights"
    check(logits, exact_logits, logits_floor, f"bf16 autocast logits, moe_impl {impl}, vs float64", least=BF16_EPS)
    check(flat(grads), flat(exact_grads), grads_floor, f"bf16 autocast gradients, moe_impl {impl}, vs float64", least=BF16_EPS)
