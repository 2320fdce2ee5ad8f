"""Rewrite the generated blocks of README.md and docs/ from the committed metrics and results files.

    python -m llmcarve.readme            # rewrite every block in place (`make readme`)
    python -m llmcarve.readme --check    # exit 1, naming the files, when a block is stale

A block is the text between `<!-- begin: NAME -->` and `<!-- end: NAME -->`; NAME picks the renderer.
Numbers in the docs come only from here, so a table can never drift from the file it quotes.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Callable

from llmcarve.eval.report import markdown_table
from llmcarve.names import ModelName

# The files whose blocks are generated, relative to the project root.
GENERATED_FILES = ("README.md", "docs/export-and-registry.md")

# Results of the GPU runs the README quotes. A GPU-profile run will replace these files.
TOMOE_GPU = "bench/results/tomoe_gpu_h100.json"
ATP_GPU = {"medical": "bench/results/atp_medical_h100.json", "legal": "bench/results/atp_legal_h100.json"}
CPU_EVALUATE = "metrics/evaluate.json"
ONNX_EXPORT = "metrics/export_onnx.json"
REGISTER = "metrics/register.json"
ONNX_CPU = "bench/results/onnx_cpu.json"

BLOCK = re.compile(r"(?P<begin><!-- begin: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(?P<end><!-- end: (?P=name) -->)", re.S)

# Rows of the ATP table, in this order within a domain: the references first, then the two carvings.
ATP_ROW_ORDER = ("dense", "lora", "twostage", "atp")


def load_json(root: Path, relative: str) -> dict:
    path = root / relative
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: the README's tables are rendered from it. Run the stage or benchmark that "
            "writes it (or `dvc pull`), then `make readme`."
        )
    return json.loads(path.read_text())


def distinct(values) -> str:
    """'8' when every value agrees, '8/16' when they differ (sorted): a caption states what was measured."""
    seen = sorted({str(v) for v in values})
    return "/".join(seen) if seen else "?"


def bos_note(add_bos_values) -> str:
    """How windows start, from the stored protocols: 'no BOS', 'with BOS', or both when they differ."""
    return {"False": "no BOS", "True": "with BOS"}.get(distinct(add_bos_values), "with and without BOS")


# --- CPU smoke table: metrics/evaluate.json of `make run` -------------------------------------------


def cpu_results(root: Path) -> str:
    models = load_json(root, CPU_EVALUATE)["models"]
    reports = list(models.values())
    windows = distinct(p["windows"] for r in reports for p in r.get("ppl", {}).values())
    protocols = [p["protocol"] for r in reports for p in r.get("ppl", {}).values()]
    seq_len = distinct(p["seq_len"] for p in protocols)
    bos = bos_note(p["add_bos"] for p in protocols)
    zero_shot_n = distinct(t["n"] for r in reports for t in r.get("zero_shot", {}).values())
    domain_n = distinct(t["n"] for r in reports for t in r.get("domain", {}).values())
    speed = distinct(f"{r['speed']['device']}, {r['speed']['threads']} threads" for r in reports if r.get("speed"))
    caption = (
        f"_Smoke test, not a quality result: `make run` with `params.yaml` ({len(models)} models, `{CPU_EVALUATE}`). "
        f"Perplexity on the first {windows} windows of {seq_len} tokens per corpus, {bos}; accuracy on {zero_shot_n} "
        f"seeded questions per zero-shot task and {domain_n} per domain task, the same for every model; "
        f"speed at batch 1 ({speed})._"
    )
    return f"{caption}\n\n{markdown_table(models)}\n"


# --- GPU: ToMoE against static pruning ----------------------------------------------------------------


def budget_order(name: str) -> tuple:
    """dense first, then each budget from the largest down, the baseline before the method."""
    parsed = ModelName.parse(name)
    return (parsed.budget is not None, -parsed.kept, parsed.method, parsed.recovery or "")


def static_twin(name: str) -> str | None:
    """The static baseline a ToMoE model is compared with: same budget, same recovery."""
    parsed = ModelName.parse(name)
    if parsed.method != "tomoe":
        return None
    return str(ModelName("static", recovery=parsed.recovery, budget=parsed.budget))


def gpu_tomoe(root: Path) -> str:
    data = load_json(root, TOMOE_GPU)
    models, protocol = data["models"], data["protocol"]
    dense_ppl = models["dense"]["ppl"]
    lines = [
        f"_{data['device']}, {data['date']}, `bench/tomoe_gpu_run.py` (`{TOMOE_GPU}`). Held-out perplexity on "
        f"{protocol['max_windows']} windows of {protocol['seq_len']} tokens of {protocol['corpus']}, "
        f"{bos_note([protocol['add_bos']])}._",
        "",
        "| model | active per token | params | held-out PPL | PPL / dense | PPL / static at the same budget | training tokens |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in sorted(models, key=budget_order):
        report = models[name]
        static = models.get(static_twin(name))
        vs_static = f"{report['ppl'] / static['ppl']:.2f}x" if static else ""
        tokens = f"{report['training']['tokens'] / 1e6:.2f}M" if "training" in report else ""
        lines.append(
            f"| `{name}` | {report['active_ratio']:.3f} | {report['params_total'] / 1e6:.1f}M | {report['ppl']:.2f} | "
            f"{report['ppl'] / dense_ppl:.2f}x | {vs_static} | {tokens} |"
        )
    return "\n".join(lines) + "\n"


# --- GPU: ATP against two-stage pruning and LoRA on dense ---------------------------------------------


def atp_row_order(name: str) -> tuple:
    method = ModelName.parse(name).method
    return (ATP_ROW_ORDER.index(method) if method in ATP_ROW_ORDER else len(ATP_ROW_ORDER), name)


def recovered_cell(report: dict, against: str) -> str:
    entry = report.get("recovered", {}).get(against)
    return f"{entry['mean']:.3f}" if entry else ""


def atp_row(domain: str, name: str, report: dict) -> str:
    accuracy = ", ".join(f"{task} {result['acc']:.3f}" for task, result in report["domain"].items())
    return (
        f"| {domain} | `{name}` | {report['active_ratio']:.3f} | {report['params_total'] / 1e6:.1f}M | "
        f"{report['ppl'][f'{domain}_heldout']['ppl']:.2f} | {report['ppl']['boolq_wikipedia']['ppl']:.2f} | {accuracy} | "
        f"{recovered_cell(report, 'vs_dense')} | {recovered_cell(report, 'vs_lora')} |"
    )


def gpu_atp(root: Path) -> str:
    runs = {domain: load_json(root, path) for domain, path in ATP_GPU.items()}
    protocols = [run["protocol"] for run in runs.values()]
    questions = distinct(t["n"] for run in runs.values() for r in run["models"].values() for t in r["domain"].values())
    lora_tokens = distinct(f"{run['training']['lora_tokens'] / 1e6:.2f}M" for run in runs.values())
    lines = [
        f"_{distinct(r['device'] for r in runs.values())}, {distinct(r['date'] for r in runs.values())}, "
        f"`bench/atp_gpu_run.py` ({', '.join(f'`{p}`' for p in ATP_GPU.values())}). Every tuned model saw "
        f"{lora_tokens} LoRA tokens; perplexity on "
        f"{distinct(p['max_windows'] for p in protocols)} windows of {distinct(p['seq_len'] for p in protocols)} "
        f"tokens of the domain's held-out documents and of BoolQ Wikipedia passages (general), "
        f"{bos_note(p['add_bos'] for p in protocols)}; "
        f"{questions} questions per domain task._",
        "",
        "| domain | model | active | params | domain PPL | general PPL | domain accuracy | recovered vs dense | recovered vs LoRA-dense |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for domain, run in runs.items():
        lines += [atp_row(domain, name, run["models"][name]) for name in sorted(run["models"], key=atp_row_order)]
    return "\n".join(lines) + "\n"


# --- ONNX export and registry: metrics/export_onnx.json + metrics/register.json -----------------------


def experts_cell(report: dict) -> str:
    experts = report.get("expert_parity")
    if experts is None:
        return ""
    missing = report.get("expert_weights_missing") or []
    checked = len(experts["checked"])
    return (
        f"{checked}/{checked + len(experts['unreached'])} routed, rel {experts['max_rel_err']:.1e}, "
        + (f"{len(missing)} MISSING" if missing else "none missing")
    )


def final_champions(registered: dict) -> dict[str, str]:
    """Registered name -> its champion after the stage: what the newest version's registration left."""
    newest: dict[str, dict] = {}
    for entry in registered.values():
        name = entry["registered_name"]
        if name not in newest or int(entry["version"]) > int(newest[name]["version"]):
            newest[name] = entry
    return {name: str(entry["champion"]) for name, entry in newest.items()}


def registered_cell(entry: dict | None, champions: dict[str, str]) -> str:
    if not entry:
        return ""
    champion = champions.get(entry["registered_name"]) == str(entry["version"])
    return f"`{entry['registered_name']}` v{entry['version']}" + (" (champion)" if champion else "")


def speed_cell(speed: dict, what: str, digits: int) -> str:
    ort, torch = speed.get("onnxruntime", {}), speed.get("pytorch", {})
    key = f"{what}_tokens_per_s"
    if key not in ort:
        return ""
    return f"{ort[key]:.{digits}f} / {torch[key]:.{digits}f} ({speed[f'{what}_speedup']:.2f}x)"


def onnx_row(name: str, report: dict, registered: dict | None, champions: dict[str, str]) -> str:
    speed = report.get("speed") or {}
    greedy = "yes" if report["greedy_match"] else f"no (token {report['greedy_first_mismatch']})"
    cells = [
        f"`{name}`",
        f"{report['file_bytes'] / 1e6:.0f}",
        f"{report['max_abs_diff']:.1e}",
        f"{report['rel_err']:.1e}",
        f"{report['pytorch_fp32_vs_fp64']['rel_err']:.1e}",
        f"{greedy} ({report['greedy_tokens']})",
        experts_cell(report),
        speed_cell(speed, "prefill", 0),
        speed_cell(speed, "decode", 1),
        registered_cell(registered, champions),
    ]
    return "| " + " | ".join(cells) + " |"


def onnx_table(exported: dict, registered: dict) -> str:
    header = [
        "model", "MB", "max abs diff", "rel err", "PyTorch fp32 vs fp64", "greedy match (tokens)", "MoE experts",
        "prefill tok/s ORT / PyTorch", "decode tok/s ORT / PyTorch", "registered",
    ]
    champions = final_champions(registered)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += [onnx_row(name, report, registered.get(name), champions) for name, report in exported.items()]
    return "\n".join(lines)


def onnx_results(root: Path) -> str:
    exported = load_json(root, ONNX_EXPORT)["models"]
    registered = load_json(root, REGISTER)["models"] if (root / REGISTER).exists() else {}
    caption = (
        f"_`make run` with `params.yaml` on the CPU ({len(exported)} models; `{ONNX_EXPORT}`, `{REGISTER}`). "
        "Speed columns are measured inside the stage, with whatever else ran on the machine._"
    )
    return f"{caption}\n\n{onnx_table(exported, registered)}\n"


def onnx_cpu(root: Path) -> str:
    """onnxruntime against PyTorch over prefill lengths, from bench/onnx_cpu.py's recorded run."""
    data = load_json(root, ONNX_CPU)
    lines = [
        f"_{data['device']}, {data['date']}, torch {data['torch']}, onnxruntime {data['onnxruntime']}: "
        f"`{data['command']}` (`{ONNX_CPU}`). Batch 1, fp32; decode = greedy tokens after a "
        f"{distinct(row['decode_prompt_tokens'] for row in data['rows'])}-token prompt, through each engine's own cache._",
        "",
        "| model | prefill tokens | prefill tok/s ORT / PyTorch | decode tokens | decode tok/s ORT / PyTorch |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in data["rows"]:
        ort, torch = row["onnxruntime"], row["pytorch"]
        lines.append(
            f"| `{row['model']}` | {row['prefill_tokens']} | {ort['prefill_tokens_per_s']:.0f} / "
            f"{torch['prefill_tokens_per_s']:.0f} ({row['prefill_speedup']:.2f}x) | {row['decode_tokens']} | "
            f"{ort['decode_tokens_per_s']:.1f} / {torch['decode_tokens_per_s']:.1f} ({row['decode_speedup']:.2f}x) |"
        )
    return "\n".join(lines) + "\n"


RENDERERS: dict[str, Callable[[Path], str]] = {
    "cpu-results": cpu_results,
    "gpu-tomoe": gpu_tomoe,
    "gpu-atp": gpu_atp,
    "onnx-results": onnx_results,
    "onnx-cpu": onnx_cpu,
}


# --- Rewriting the blocks -----------------------------------------------------------------------------


def render_blocks(text: str, root: Path) -> str:
    """`text` with every generated block's body replaced by its renderer's output."""

    def replace(match: re.Match) -> str:
        name = match["name"]
        if name not in RENDERERS:
            raise KeyError(f"unknown generated block '{name}'; known blocks: {', '.join(sorted(RENDERERS))}")
        return f"{match['begin']}{RENDERERS[name](root)}{match['end']}"

    return BLOCK.sub(replace, text)


def block_names(text: str) -> list[str]:
    return [match["name"] for match in BLOCK.finditer(text)]


def stale_files(root: Path) -> list[str]:
    """The generated files whose blocks differ from what the committed metrics render."""
    return [name for name in GENERATED_FILES if render_blocks((root / name).read_text(), root) != (root / name).read_text()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmcarve.readme", description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="project root (default: the current directory)")
    parser.add_argument("--check", action="store_true", help="only report stale files; exit 1 if any")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files(args.root)
        for name in stale:
            print(f"{name}: generated blocks are stale; run `make readme`", file=sys.stderr)
        return 1 if stale else 0
    for name in GENERATED_FILES:
        path = args.root / name
        text = path.read_text()
        rendered = render_blocks(text, args.root)
        if rendered != text:
            path.write_text(rendered)
            print(f"{name}: rewrote {', '.join(block_names(text))}")
        else:
            print(f"{name}: up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
