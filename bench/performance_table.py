"""Print the performance tables of docs/performance.md (markdown) from the recorded benchmark results.

Reads bench/results/: moe_layer_fast_h100.json (bench/moe_layer.py), decode_speed_h100.json
(bench/decode_speed.py), prefill_product_h100.json (bench/prefill_product.py), train_step_h100.json (bench/train_step.py), moe_layer_cpu.json
(bench/moe_layer_cpu.py) and carved_cpu.json (bench/carved_cpu.py); a missing file leaves its table out. Each table names its device, date and
command, and each row its target and whether it was met.
    python bench/performance_table.py [--results bench/results]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

LAYER_TARGET_TOKENS = {1: "faster than dense", 16: "faster than dense", 2048: ">= 0.9 of ideal", 8192: ">= 0.9 of ideal"}


def load(results: Path, name: str) -> dict | None:
    path = results / name
    return json.loads(path.read_text()) if path.exists() else None


def source(data: dict) -> str:
    return f"_{data['device']}, {data['date']}, torch {data.get('torch', '?')}: `{data['command']}`_"


def layer_verdict(row: dict) -> str:
    target = LAYER_TARGET_TOKENS.get(row["tokens"])
    if target is None:
        return "—"
    if target == "faster than dense":
        met = row["moe_ms"] < row["dense_ms"]
    else:
        met = row["moe_vs_ideal_speedup"] >= 0.9
    return f"{target}: {'met' if met else '**not met**'}"


def layer_table(data: dict) -> list[str]:
    lines = ["### MoE MLP layer (top-1 of 8 experts, each 50% of the width, bf16, CUDA-graph timed)", "", source(data), "",
             "| shape | tokens | dense ms | ideal ms | MoE ms | MoE speedup | ideal speedup | MoE / ideal | target |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in data["rows"]:
        lines.append(
            f"| {row['shape']} ({row['hidden']}x{row['intermediate']}) | {row['tokens']} | {row['dense_ms']:.4f} | {row['ideal_ms']:.4f} | "
            f"{row['moe_ms']:.4f} | {row['moe_speedup']:.2f}x | {row['ideal_speedup']:.2f}x | {row['moe_vs_ideal_speedup']:.2f} | {layer_verdict(row)} |")
    return lines


def model_table(data: dict) -> list[str]:
    prefill = data["prefill_tokens"]
    lines = [f"### Whole model, tokens/s (random weights at the real shapes, bf16; decode: {data['prompt_tokens']}-token prompt, greedy)", "",
             source(data), "",
             f"| model | path | prefill {prefill} tok, batch 1 | decode batch 1 | decode batch 16 |", "|---|---|---:|---:|---:|"]
    for shape, models in data["models"].items():
        for label, row in models.items():
            name = f"{shape} {label}"
            lines.append(f"| {name} | HF (`forward` / `generate`) | {row[f'prefill_tps_hf_forward_{prefill}']:,.0f} | "
                         f"{row['decode_tps_hf_generate_b1']:,.0f} | {row['decode_tps_hf_generate_b16']:,.0f} |")
            lines.append(f"| {name} | static cache + CUDA graph | {row[f'prefill_tps_static_graph_{prefill}']:,.0f} | "
                         f"{row['decode_tps_static_graph_b1']:,.0f} | {row['decode_tps_static_graph_b16']:,.0f} |")
            compiled = row.get("compiled")
            if compiled:
                if "decode_tps_static_graph_compiled_b1" in compiled:
                    how = " (checked in float32: see notes)" if "check_float32" in compiled else ""
                    lines.append(f"| {name} | + torch.compile'd layers{how} | — | {compiled['decode_tps_static_graph_compiled_b1']:,.0f} | "
                                 f"{compiled['decode_tps_static_graph_compiled_b16']:,.0f} |")
                else:
                    why = compiled.get("error") or f"check failed: {compiled.get('check')}"
                    lines.append(f"| {name} | + torch.compile'd layers | — | not timed ({why}) | — |")
    return lines


def prefill_product_table(data: dict) -> list[str]:
    paths = sorted({key[len("speedup_"):-len("_vs_dense")] for model in data["models"].values()
                    for row in model.values() for key in row if key.startswith("speedup_") and key.endswith("_vs_dense")})
    lines = ["### Prefill through the product class (`CarvedForCausalLM` from `from_pretrained`, eager, batch 1)", "", source(data), "",
             f"_random weights at the real shapes, bf16; carved = ToMoE-shaped at p = 0.5; median of {data['rounds']} interleaved "
             "rounds of the per-round ratio dense time / carved time, [min, max] over the rounds_", "",
             "| shape | tokens | dense ms | " + " | ".join(f"{p} ms | {p} vs dense" for p in paths) + " |",
             "|---|---:|---:|" + "---:|---:|" * len(paths)]
    for shape, model in data["models"].items():
        for tokens, row in model.items():
            if not tokens.isdigit():
                continue
            cells = [f"{row[p + '_ms']:.2f} | {row['speedup_' + p + '_vs_dense']:.2f}x [{row['speedup_' + p + '_vs_dense_range'][0]:.2f}, "
                     f"{row['speedup_' + p + '_vs_dense_range'][1]:.2f}]" for p in paths]
            lines.append(f"| {shape} | {tokens} | {row['dense_ms']:.2f} | " + " | ".join(cells) + " |")
    return lines


def train_table(data: dict) -> list[str]:
    lines = ["### ToMoE training step vs a dense forward + forward/backward of the same shape (target <= 1.3x)", "", source(data), "",
             "| shape | dtype | tokens/step | dense step s | ToMoE step s | ratio | target | peak GB dense / ToMoE | 20,000 x 2048 tokens |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|"]
    for shape, row in data["runs"].items():
        met = "met" if row["tomoe_over_dense"] <= 1.3 else "**not met**"
        lines.append(f"| {shape} | {row['dtype']} | {row['tokens_per_step']} | {row['dense_step_s']:.3f} | {row['tomoe_step_s']:.3f} | "
                     f"{row['tomoe_over_dense']:.2f}x | {met} | {row['dense_peak_memory_gb']:.1f} / {row['tomoe_peak_memory_gb']:.1f} | "
                     f"{row['projected_hours_20000_steps_of_2048_tokens']:.1f} h |")
    return lines


def cpu_table(data: dict) -> list[str]:
    lines = ["### MoE MLP layer on the CPU (float32)", "", source(data), "", f"_{data['timing']}_", "",
             "| shape | tokens | dense ms | ideal ms | MoE ms | MoE speedup | ideal speedup |", "|---|---:|---:|---:|---:|---:|---:|"]
    for row in data["rows"]:
        lines.append(f"| {row['shape']} | {row['tokens']} | {row['dense_ms']:.2f} | {row['ideal_ms']:.2f} | {row['moe_ms']:.2f} | "
                     f"{row['moe_speedup']:.2f}x | {row['ideal_speedup']:.2f}x |")
    return lines


def carved_cpu_table(data: dict) -> list[str]:
    measures = [key[: -len("_s")] for key in data["dense"]]
    lines = ["### Trained carved models on the CPU, each MoE path against dense (float32, batch 1)", "", source(data), "",
             f"_median of {data['rounds']} interleaved rounds of the per-round ratio dense time / carved time, "
             f"[min, max] over the rounds; {data['threads']} threads; weights: the trained models of `make run`_", "",
             "| model | moe_impl | " + " | ".join(measures) + " |", "|---|---|" + "---:|" * len(measures)]
    for name, model in data["models"].items():
        for path, row in model.items():
            if path == "logits_vs_masked":
                continue
            cells = [f"{row[m + '_speedup_vs_dense']:.2f}x [{row[m + '_speedup_range'][0]:.2f}, {row[m + '_speedup_range'][1]:.2f}]" for m in measures]
            lines.append(f"| {name} | {path} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    sections = [("moe_layer_fast_h100.json", layer_table), ("decode_speed_h100.json", model_table),
                ("prefill_product_h100.json", prefill_product_table), ("train_step_h100.json", train_table), ("moe_layer_cpu.json", cpu_table),
                ("carved_cpu.json", carved_cpu_table)]
    blocks = []
    for name, render in sections:
        data = load(args.results, name)
        if data is not None:
            blocks.append("\n".join(render(data)))
    print("\n\n".join(blocks))


if __name__ == "__main__":
    main()
