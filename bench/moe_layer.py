"""One MoE MLP layer against the dense MLP, side by side in one run (GPU, bf16).

Top-1 of E=8 experts, each a random half of the intermediate channels (their union covers the MLP,
as ToMoE's union loss makes it). Variants, each checked against the masked reference before it is
timed (the script refuses to time a variant whose output differs):
- dense:        the full SwiGLU MLP (the baseline, speed 1.0x)
- ideal:        a dense MLP of half the width (what 50% active could give at best)
- gather:       weight rows gathered for each expert on every call (the official ToMoE code)
- sorted:       llmcarve's pre-sliced experts, tokens sorted by expert (CarvedMLP moe_impl="sorted")
- masked:       llmcarve's masked path: all union channels computed, then masked (moe_impl="masked")
- grouped:      llmcarve's grouped path: two grouped GEMMs over tokens sorted by expert, experts
                padded to the widest one, no host synchronisation (moe_impl="grouped")
    python bench/moe_layer.py --out bench/results/moe_layer_h100.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from llmcarve.models.carved import CarvedMLP

SHAPES = {"llama2-7b": (4096, 11008), "llama3-8b": (4096, 14336), "smollm2-135m": (576, 1536)}
TOKENS = (1, 16, 2048, 8192)
EXPERTS = 8


def make_layer(hidden: int, width: int, impl: str) -> CarvedMLP:
    config = SimpleNamespace(hidden_size=hidden, mlp_dims=[width], num_experts=[EXPERTS], hidden_act="silu", moe_impl=impl)
    layer = CarvedMLP(config, 0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for linear in (layer.gate_proj, layer.up_proj, layer.down_proj, layer.router):
            linear.weight.normal_(0, linear.weight.shape[1] ** -0.5, generator=generator)
        keep = torch.rand(EXPERTS, width, generator=generator).argsort(-1) < width // 2
        layer.expert_mask.copy_(keep)
    return layer.cuda().to(torch.bfloat16).eval()


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


def median_ms(fn, repeats: int = 50) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


@torch.inference_mode()
def bench_shape(name: str, hidden: int, width: int) -> list[dict]:
    masked, sorted_, grouped = (make_layer(hidden, width, impl) for impl in ("masked", "sorted", "grouped"))
    half = torch.nn.Linear(hidden, width // 2, bias=False).cuda().bfloat16()
    half_down = torch.nn.Linear(width // 2, hidden, bias=False).cuda().bfloat16()
    rows = []
    for tokens in TOKENS:
        x = torch.randn(1, tokens, hidden, device="cuda", dtype=torch.bfloat16)
        reference = masked(x)
        variants = {
            "dense": lambda: masked.down_proj(F.silu(masked.gate_proj(x)) * masked.up_proj(x)),
            "ideal": lambda: half_down(F.silu(half(x)) * half(x)),
            "gather": lambda: gather_per_call(masked, x),
            "sorted": lambda: sorted_(x),
            "masked": lambda: masked(x),
            "grouped": lambda: grouped(x),
        }
        for variant in ("gather", "sorted", "grouped"):
            error = relative_error(variants[variant](), reference)
            if error > 2e-2:
                raise SystemExit(f"{name} tokens={tokens}: {variant} differs from the reference (relative error {error:.2e}); not timing it")
        times = {variant: median_ms(fn) for variant, fn in variants.items()}
        rows.append({"shape": name, "hidden": hidden, "intermediate": width, "tokens": tokens, **{f"{k}_ms": v for k, v in times.items()},
                     **{f"{k}_speedup": times["dense"] / v for k, v in times.items() if k != "dense"}})
        print(f"{name:13s} {tokens:5d} tok  " + "  ".join(f"{k} {times['dense'] / v:5.2f}x" for k, v in times.items() if k != "dense"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rows = [row for name, (hidden, width) in SHAPES.items() for row in bench_shape(name, hidden, width)]
    result = {"date": dt.date.today().isoformat(), "device": torch.cuda.get_device_name(), "dtype": "bfloat16",
              "command": "python bench/moe_layer.py", "experts": EXPERTS, "expert_width": "50% of the intermediate", "rows": rows}
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
