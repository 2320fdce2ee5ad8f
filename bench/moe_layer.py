"""One MoE MLP layer against the dense MLP, side by side in one run (GPU, bf16).

Top-1 of E=8 experts, each a random half of the intermediate channels (their union covers the MLP,
as ToMoE's union loss makes it). Every variant is checked against the masked reference on fresh
random inputs before it is timed; the script refuses to time a variant whose output differs.

- dense:        the full SwiGLU MLP as the model runs it (gate, up, silu, mul, down; speed 1.0x)
- ideal:        the same MLP at half the width (what 50% active could give at best)
- masked:       CarvedMLP moe_impl="masked" (the reference: all channels computed, then masked)
- fast_grouped: llmcarve.kernels.moe_mlp, grouped GEMMs over K-major packed experts, fused SwiGLU,
                no host sync (forced at every token count)
- fast_masked:  llmcarve.kernels.moe_mlp masked union with the expert mask fused into SwiGLU (forced)
- moe:          llmcarve.kernels.moe_mlp as it dispatches (1 token: fused one-token kernels; up to
                2047 tokens (8191 at hidden < 1024): fast_masked; more: fast_grouped)
- gather/sorted (--all): the official per-call weight gather, CarvedMLP moe_impl="sorted"

A carved model runs `moe` (CarvedMLP moe_impl="auto", the default) or `fast_grouped` ("grouped").
results/moe_layer_fast_h100.json also has a "grouped" column: CarvedMLP's former grouped path (padded
experts, grouped GEMMs, a bincount that syncs), since replaced by `fast_grouped`.

Times are medians of CUDA-event timings. "graph" times capture each variant over R rotating input
sets in one CUDA graph and divide a replay by R (launch overhead out, as in a graph-captured decode
step); "eager" times launch from Python. dense_ms / ideal_ms / moe_ms in the JSON are graph times.
    PYTHONPATH=src python bench/moe_layer.py --out bench/results/moe_layer_fast_h100.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from timing import cuda_event_ms

from llmcarve.kernels import moe_mlp
from llmcarve.models.carved import CarvedMLP

SHAPES = {"llama2-7b": (4096, 11008), "llama3-8b": (4096, 14336), "smollm2-135m": (576, 1536)}
TOKENS = (1, 16, 64, 256, 1024, 2048, 8192)
EXPERTS = 8
ROTATE = 4  # input sets per timed graph (the smaller shapes' weights fit in L2 either way)


def make_layer(hidden: int, width: int, impl: str, seed: int = 0) -> CarvedMLP:
    config = SimpleNamespace(hidden_size=hidden, mlp_dims=[width], num_experts=[EXPERTS], hidden_act="silu", moe_impl=impl)
    layer = CarvedMLP(config, 0)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for linear in (layer.gate_proj, layer.up_proj, layer.down_proj, layer.router):
            linear.weight.normal_(0, linear.weight.shape[1] ** -0.5, generator=generator)
        keep = torch.rand(EXPERTS, width, generator=generator).argsort(-1) < width // 2
        layer.expert_mask.copy_(keep)
    return layer.cuda().to(torch.bfloat16).eval()


def share_weights(source: CarvedMLP, impl: str) -> CarvedMLP:
    config = SimpleNamespace(**{**vars(source.config), "moe_impl": impl})
    layer = CarvedMLP(config, 0).cuda().to(torch.bfloat16).eval()
    layer.load_state_dict(source.state_dict())
    return layer


def gather_per_call(layer: CarvedMLP, x: torch.Tensor) -> torch.Tensor:
    """The official code's pattern: sort tokens, gather each expert's weight rows on every call."""
    flat = x.reshape(-1, x.shape[-1])
    expert = layer.router(flat).argmax(-1)
    out = torch.zeros_like(flat)
    for e in range(EXPERTS):
        tokens = (expert == e).nonzero().squeeze(1)
        if len(tokens):
            index = layer.expert_mask[e].nonzero().squeeze(1)
            h = F.silu(flat[tokens] @ layer.gate_proj.weight[index].T) * (flat[tokens] @ layer.up_proj.weight[index].T)
            out[tokens] = h @ layer.down_proj.weight[:, index].T
    return out.view_as(x)


def events_median(fn, repeats: int) -> float:
    return statistics.median(cuda_event_ms(fn, repeats))


def eager_ms(fn, inputs: list[torch.Tensor], repeats: int = 40) -> float:
    for x in inputs:
        fn(x)
    turn = iter(range(10**9))
    return events_median(lambda: fn(inputs[next(turn) % len(inputs)]), repeats)


def graph_ms(fn, inputs: list[torch.Tensor], repeats: int = 40) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for x in inputs:  # warm up on the side stream (autotuning, workspace allocation)
            fn(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for x in inputs:
            fn(x)
    graph.replay()
    torch.cuda.synchronize()
    return events_median(graph.replay, repeats) / len(inputs)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def half_width_mlp(hidden: int, width: int):
    gate, up, down = (torch.nn.Linear(a, b, bias=False).cuda().bfloat16() for a, b in ((hidden, width), (hidden, width), (width, hidden)))
    return lambda x: down(F.silu(gate(x)) * up(x))


@torch.inference_mode()
def bench_shape(name: str, hidden: int, width: int, tokens_list, include_all: bool) -> list[dict]:
    masked = make_layer(hidden, width, "masked")
    sorted_ = share_weights(masked, "sorted")
    packed = moe_mlp.PackedExperts.from_mlp(masked)
    ideal = half_width_mlp(hidden, width // 2)

    def dense(x):
        return masked.down_proj(F.silu(masked.gate_proj(x)) * masked.up_proj(x))

    def fast_grouped(x):
        return moe_mlp.grouped_experts(x.reshape(-1, hidden), masked.router, packed).view_as(x)

    def fast_masked(x):
        return moe_mlp.masked_union(x.reshape(-1, hidden), masked.router, masked, packed).view_as(x)

    variants = {"dense": dense, "ideal": ideal, "masked": masked, "fast_grouped": fast_grouped, "fast_masked": fast_masked, "moe": lambda x: moe_mlp.moe_mlp(masked, x, packed)}
    if include_all:
        variants.update(gather=lambda x: gather_per_call(masked, x), sorted=sorted_)
    no_graph = {"gather", "sorted"}  # they ask the host for expert counts
    checked = [v for v in variants if v not in ("dense", "ideal", "masked")]
    rows = []
    for tokens in tokens_list:
        errors = {}
        for variant in checked:
            for trial in range(2):  # fresh inputs each check
                x = torch.randn(1, tokens, hidden, device="cuda", dtype=torch.bfloat16)
                reference = masked(x)
                out = variants[variant](x)
                error = relative_error(out, reference)
                errors[variant] = max(errors.get(variant, 0.0), error)
                if not torch.isfinite(out).all() or error > 1e-2:
                    sys.exit(f"{name} tokens={tokens}: {variant} differs from the reference (relative error {error:.2e}); not timing it")
        inputs = [torch.randn(1, tokens, hidden, device="cuda", dtype=torch.bfloat16) for _ in range(ROTATE)]
        row = {"shape": name, "hidden": hidden, "intermediate": width, "tokens": tokens}
        for variant, fn in variants.items():
            if variant not in no_graph:
                row[f"{variant}_ms"] = graph_ms(fn, inputs)
            row[f"{variant}_eager_ms"] = eager_ms(fn, inputs)
        for variant in variants:
            if variant not in no_graph and variant != "dense":
                row[f"{variant}_speedup"] = row["dense_ms"] / row[f"{variant}_ms"]
        row["moe_vs_ideal_speedup"] = row["moe_speedup"] / row["ideal_speedup"]
        row["max_relative_error"] = errors
        rows.append(row)
        print(f"{name:13s} {tokens:5d} tok  dense {row['dense_ms']*1e3:8.1f}us  ideal {row['ideal_speedup']:4.2f}x  "
              f"moe {row['moe_speedup']:4.2f}x ({row['moe_vs_ideal_speedup']:4.2f} of ideal)  fast_grouped {row['fast_grouped_speedup']:4.2f}x  "
              f"fast_masked {row['fast_masked_speedup']:4.2f}x  masked {row['masked_speedup']:4.2f}x", flush=True)
    return rows


@torch.inference_mode()
def ceilings() -> dict:
    """The two numbers every time is judged against: bf16 GEMM rate and device copy bandwidth."""
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ms = eager_ms(lambda _: a @ b, [a], repeats=20)
    src = torch.randn(2**30 // 2, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy_ms = eager_ms(lambda _: dst.copy_(src), [src], repeats=20)
    return {"bf16_gemm_tflops": 2 * 8192**3 / ms / 1e9, "copy_tb_per_s": 2 * 2**30 / copy_ms / 1e9}


@torch.inference_mode()
def check_routing() -> None:
    """The Triton routing kernels against torch's sort, exactly, at awkward sizes."""
    for tokens, experts in ((1, 8), (7, 8), (1000, 8), (1025, 6), (5000, 8), (8192, 8), (20000, 16)):
        logits = torch.randn(tokens, experts, device="cuda", dtype=torch.bfloat16)
        logits[::7, 1] = logits[::7, 0]  # exact ties: the first maximum must win
        ids = torch.arange(experts, device="cuda")
        got = moe_mlp.route_sorted(logits, ids)
        want = moe_mlp.route_sorted(logits.cpu(), ids.cpu())
        for name, a, b in zip(("expert", "dest", "order", "offsets"), got, want):
            if not torch.equal(a.cpu(), b):
                sys.exit(f"routing kernel: {name} differs from torch at tokens={tokens} experts={experts}")
    print("routing kernels match torch's sort exactly", flush=True)


@torch.inference_mode()
def one_token_configs(hidden: int, width: int) -> dict:
    """Rows per program and K block of the one-token kernels (graph-timed; the default is what is used)."""
    from llmcarve.kernels import triton_ops

    masked = make_layer(hidden, width, "masked")
    packed = moe_mlp.PackedExperts.from_mlp(masked)
    inputs = [torch.randn(1, hidden, device="cuda", dtype=torch.bfloat16) for _ in range(ROTATE)]
    times = {}
    for rows in (4, 8, 16):
        for block_k in (256, 512, 1024):
            fn = lambda x, r=rows, k=block_k: triton_ops.one_token_moe(x, masked.router.weight, packed.gate_up, packed.down, r, k)
            if relative_error(fn(inputs[0]), masked(inputs[0])) > 1e-2:
                sys.exit(f"one-token kernel rows={rows} block_k={block_k} differs from the reference")
            times[f"rows{rows}_k{block_k}"] = graph_ms(fn, inputs) * 1e3
    print(f"one-token configs {hidden}x{width} (us): " + "  ".join(f"{k} {v:.1f}" for k, v in times.items()), flush=True)
    return times


def profile(name: str, hidden: int, width: int, tokens: int) -> None:
    masked = make_layer(hidden, width, "masked")
    packed = moe_mlp.PackedExperts.from_mlp(masked)
    x = torch.randn(1, tokens, hidden, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        for _ in range(3):
            moe_mlp.moe_mlp(masked, x, packed)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                moe_mlp.moe_mlp(masked, x, packed)
            torch.cuda.synchronize()
    print(f"--- profile {name} {tokens} tokens (10 calls)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    parser.add_argument("--all", action="store_true", help="also time the slow gather and sorted variants")
    parser.add_argument("--profile", action="store_true", help="print a kernel breakdown of moe at 2048 and 8192 tokens")
    args = parser.parse_args()
    torch.manual_seed(0)
    result = {"date": dt.date.today().isoformat(), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "dtype": "bfloat16", "command": "PYTHONPATH=src python " + " ".join(sys.argv), "experts": EXPERTS,
              "expert_width": "50% of the intermediate", "timing": "CUDA graph over 4 rotating inputs, median of 40 replays",
              "ceilings": ceilings()}
    print(result["ceilings"], flush=True)
    check_routing()
    result["one_token_configs_us"] = {name: one_token_configs(*SHAPES[name]) for name in args.shapes}
    result["rows"] = [row for name in args.shapes for row in bench_shape(name, *SHAPES[name], args.tokens, args.all)]
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=2)
    if args.profile:
        for tokens in (2048, 8192):
            profile("llama2-7b", *SHAPES["llama2-7b"], tokens)


if __name__ == "__main__":
    main()
