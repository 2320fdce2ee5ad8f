"""onnxruntime against PyTorch on the CPU, side by side in one run: prefill and greedy decoding, batch 1.

Reads what `make run` produced: the PyTorch model directories and their exports in artifacts/onnx/.
Both engines get the same thread count (torch.get_num_threads()) and the same random tokens; decoding
is 32 greedy tokens through each engine's own KV cache after an 8-token prompt (included, as in
`llmcarve.eval.speed`). Each number is the median of --repeats runs after one warm-up.

    python bench/onnx_cpu.py --out bench/results/onnx_cpu.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
from pathlib import Path

import torch

from llmcarve.export import OnnxCausalLM
from llmcarve.export.parity import speed
from llmcarve.models.loading import load_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # stages.evaluate.model_dir: one home for where each model lives
from stages.evaluate import model_dir  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["dense", "tomoe@0.5", "static@0.5", "atp-medical@0.6"])
    parser.add_argument("--prefill", nargs="+", type=int, default=[16, 128, 512])
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "onnx_cpu.json")
    args = parser.parse_args()

    rows = []
    for name in args.models:
        model, _ = load_model(ROOT / model_dir(name))
        lm = OnnxCausalLM(ROOT / "artifacts" / "onnx" / name, threads=torch.get_num_threads())
        for tokens in args.prefill:
            report = speed(model, lm, prefill_tokens=tokens, decode_tokens=args.decode_tokens, repeats=args.repeats)
            rows.append({"model": name, **report})
            print(
                f"{name:22s} prefill {tokens:4d}: ORT {report['onnxruntime']['prefill_tokens_per_s']:7.1f} tok/s, "
                f"PyTorch {report['pytorch']['prefill_tokens_per_s']:7.1f} ({report['prefill_speedup']:.2f}x); "
                f"decode: ORT {report['onnxruntime']['decode_tokens_per_s']:5.1f}, "
                f"PyTorch {report['pytorch']['decode_tokens_per_s']:5.1f} tok/s ({report['decode_speedup']:.2f}x)",
                flush=True,
            )
        del model, lm
    record = {
        "date": dt.date.today().isoformat(),
        "device": f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads",
        "command": "python " + " ".join(sys.argv),
        "torch": torch.__version__,
        "onnxruntime": __import__("onnxruntime").__version__,
        "rows": rows,
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
