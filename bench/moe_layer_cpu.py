"""One MoE MLP layer against the dense MLP on the CPU (float32), side by side in one run.

The same layers and variants as bench/moe_layer.py, through the torch fallbacks of
llmcarve.kernels.moe_mlp (no Triton on the CPU). Token counts stay small enough for a 2-core machine;
each variant is checked against the masked reference before it is timed.
    PYTHONPATH=src nice -n 19 python bench/moe_layer_cpu.py --out bench/results/moe_layer_cpu.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from llmcarve.kernels import moe_mlp
from llmcarve.models.carved import CarvedMLP

SHAPES = {"llama2-7b": (4096, 11008, (1, 16)), "llama3-8b": (4096, 14336, (1, 16)),
          "smollm2-135m": (576, 1536, (1, 16, 64, 256, 2048))}
REPEATS = 15
EXPERTS = 8


def make_layer(hidden: int, width: int) -> CarvedMLP:
    config = SimpleNamespace(hidden_size=hidden, mlp_dims=[width], num_experts=[EXPERTS], hidden_act="silu", moe_impl="masked")
    layer = CarvedMLP(config, 0).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for linear in (layer.gate_proj, layer.up_proj, layer.down_proj, layer.router):
            linear.weight.normal_(0, linear.weight.shape[1] ** -0.5, generator=generator)
        layer.expert_mask.copy_(torch.rand(EXPERTS, width, generator=generator).argsort(-1) < width // 2)
    return layer


def interleaved_medians(variants: dict, inputs: list[torch.Tensor], repeats: int) -> dict[str, float]:
    """Median ms of each variant, timed in turns (variant after variant, round after round), so
    load from other processes on a shared CPU falls on every variant alike."""
    for fn in variants.values():
        fn(inputs[0])
    times = {name: [] for name in variants}
    for round_ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn(inputs[round_ % len(inputs)])
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


@torch.inference_mode()
def bench_shape(name: str, hidden: int, width: int, tokens_list) -> list[dict]:
    layer = make_layer(hidden, width)
    packed = moe_mlp.PackedExperts.from_mlp(layer)
    gate, up, down = (torch.nn.Linear(a, b, bias=False) for a, b in ((hidden, width // 2), (hidden, width // 2), (width // 2, hidden)))
    variants = {
        "dense": lambda x: layer.down_proj(F.silu(layer.gate_proj(x)) * layer.up_proj(x)),
        "ideal": lambda x: down(F.silu(gate(x)) * up(x)),
        "masked": layer,
        "moe": lambda x: moe_mlp.moe_mlp(layer, x, packed),
        "grouped": lambda x: moe_mlp.grouped_experts(x.reshape(-1, hidden), layer.router, packed).view_as(x),
    }
    rows = []
    for tokens in tokens_list:
        inputs = [torch.randn(1, tokens, hidden) for _ in range(3)]
        reference = layer(inputs[0])
        for variant in ("moe", "grouped"):
            error = ((variants[variant](inputs[0]) - reference).norm() / reference.norm()).item()
            if error > 1e-4:
                sys.exit(f"{name} {tokens}: {variant} differs from the reference ({error:.1e})")
        row = {"shape": name, "hidden": hidden, "intermediate": width, "tokens": tokens}
        row.update({f"{v}_ms": ms for v, ms in interleaved_medians(variants, inputs, REPEATS).items()})
        row.update({f"{v}_speedup": row["dense_ms"] / row[f"{v}_ms"] for v in variants if v != "dense"})
        rows.append(row)
        print(f"{name:13s} {tokens:5d} tok  dense {row['dense_ms']:8.2f} ms  " +
              "  ".join(f"{v} {row[f'{v}_speedup']:4.2f}x" for v in variants if v != "dense"), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared 2-core machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    result = {"date": dt.date.today().isoformat(), "device": f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
              "torch": torch.__version__, "dtype": "float32", "command": "PYTHONPATH=src nice -n 19 python " + " ".join(sys.argv),
              "experts": EXPERTS, "expert_width": "50% of the intermediate", "timing": f"wall clock, median of {REPEATS} interleaved rounds; the 2 cores were shared with another long CPU job (load ~2), so absolute times are inflated and noisy",
              "rows": [row for name in args.shapes for row in bench_shape(name, *SHAPES[name])]}
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
