"""ATP against its baselines on a GPU, for one domain: the README's ATP table for the embedded SmolLM2.

Trains, on the same LoRA blocks for the same steps with the same LoRA settings:
  lora-<domain>@1.0      LoRA on the dense model (the tuned reference)
  atp-<domain>@<p>       ATP (generator + LoRA, then merge and physical removal)
  twostage-<domain>@<p>  static pruning to p (calibration statistics of the general text), then LoRA
and evaluates them next to dense with the pipeline's protocols: held-out domain perplexity and
general (BoolQ passages) perplexity, 512-token non-overlapping windows, no BOS, first 64 windows;
domain multiple-choice accuracy; recovered performance against dense and against lora-<domain>@1.0.

Inputs come from bench/prepare_atp_gpu_inputs.py (tokens and questions only, so the GPU side needs
torch, transformers, peft, safetensors and gguf):
    python bench/atp_gpu_run.py --gguf SmolLM2.gguf --inputs .gpudata --domain medical --out results.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file

from llmcarve.calibration import collect_channel_stats
from llmcarve.eval.accounting import parameter_report
from llmcarve.eval.multiple_choice import score_questions
from llmcarve.eval.perplexity import Protocol, perplexity
from llmcarve.eval.recovery import add_recovery
from llmcarve.eval.tasks import Choice, Question
from llmcarve.methods.atp.convert import convert_atp, merged_model
from llmcarve.methods.atp.lora import lora_parameters
from llmcarve.methods.atp.trainer import ATPConfig, LoraRunConfig, train_atp, train_lora
from llmcarve.methods.baselines.static import prune_static
from llmcarve.models.loading import load_model, materialize

PROTOCOL = Protocol(seq_len=512, max_windows=64)
DOMAIN_TASKS = {"medical": ["medqa", "medmcqa", "mmlu_medical"], "legal": ["mmlu_law"]}


def load_questions(path: Path) -> dict[str, list[Question]]:
    raw = json.loads(path.read_text())
    return {
        name: [Question(tuple(Choice(**choice) for choice in q["choices"]), q["gold"]) for q in questions]
        for name, questions in raw.items()
    }


def evaluate(model, tokenizer, tokens: dict[str, list[int]], questions: dict[str, list[Question]]) -> dict:
    model.eval()
    return {
        "ppl": {name: perplexity(model, stream, PROTOCOL, progress=False) for name, stream in tokens.items()},
        "domain": {name: score_questions(model, tokenizer, qs, batch_size=32, progress=False) for name, qs in questions.items()},
        **parameter_report(model, 512),
    }


def timed(train):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = train()
    torch.cuda.synchronize()
    return result, {"seconds": round(time.perf_counter() - start, 1), "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--inputs", required=True, help="folder written by bench/prepare_atp_gpu_inputs.py")
    parser.add_argument("--domain", choices=sorted(DOMAIN_TASKS), required=True)
    parser.add_argument("--p", type=float, default=0.6, help="KEPT fraction of attention+MLP weights")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--generator-lr", type=float, default=1e-2)
    parser.add_argument("--search-fraction", type=float, default=0.5)
    parser.add_argument("--calibration-blocks", type=int, default=64)
    parser.add_argument("--methods", nargs="+", choices=["lora", "atp", "twostage"], default=["lora", "atp", "twostage"])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # train and evaluate in true fp32, as on the CPU

    model_dir = materialize(args.gguf, "/tmp/llmcarve-model")
    inputs = load_file(Path(args.inputs) / "atp_inputs.safetensors")
    blocks = inputs[f"{args.domain}.train_blocks"].long()
    lora_blocks, calibration_blocks = blocks[: -args.calibration_blocks], blocks[-args.calibration_blocks :]
    tokens = {f"{args.domain}_heldout": inputs[f"{args.domain}.heldout_tokens"].tolist(), "boolq_wikipedia": inputs["general.heldout_tokens"].tolist()}
    questions = {k: v for k, v in load_questions(Path(args.inputs) / "atp_tasks.json").items() if k in DOMAIN_TASKS[args.domain]}
    run = LoraRunConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, checkpoint_every=10**9)
    config = ATPConfig(lora=run, p=args.p, generator_lr=args.generator_lr, search_fraction=args.search_fraction)
    results = {
        "date": dt.date.today().isoformat(),
        "device": torch.cuda.get_device_name(),
        "command": "python bench/atp_gpu_run.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "protocol": PROTOCOL.describe(),
        "training": {"lora_tokens": args.steps * args.batch_size * blocks.shape[1], "config": {"lora": run.__dict__, "p": args.p, "search_steps": config.search_steps}},
        "models": {},
    }

    def fresh(device="cuda"):
        return load_model(model_dir, "float32", device)

    dense, tokenizer = fresh()
    results["models"]["dense"] = evaluate(dense, tokenizer, tokens, questions)
    stats = collect_channel_stats(dense, inputs["general.train_blocks"][:32].long().cuda(), batch_size=8, progress=False)
    del dense

    if "lora" in args.methods:
        tuned, cost = timed(lambda: train_lora(fresh()[0], lora_blocks, run, Path(f"/tmp/ckpt-{args.domain}-lora")))
        results["models"][f"lora-{args.domain}@1.0"] = evaluate(merged_model(tuned[0]), tokenizer, tokens, questions) | {"training": cost}
        del tuned
    if "atp" in args.methods:
        run_atp(args, config, fresh, lora_blocks, calibration_blocks, tokenizer, tokens, questions, results)
    if "twostage" in args.methods:
        static = prune_static(fresh("cpu")[0], stats, args.p).cuda()
        tuned, cost = timed(lambda: train_lora(static, lora_blocks, run, Path(f"/tmp/ckpt-{args.domain}-twostage")))
        results["models"][f"twostage-{args.domain}@{args.p:g}"] = evaluate(merged_model(tuned[0]), tokenizer, tokens, questions) | {"training": cost}

    spec = SimpleNamespace(perplexity=[f"{args.domain}_heldout"], tasks=DOMAIN_TASKS[args.domain])
    add_recovery(results["models"], {args.domain: spec})
    Path(args.out).write_text(json.dumps(results, indent=2))
    for name, report in results["models"].items():
        ppl = {k: round(v["ppl"], 2) for k, v in report["ppl"].items()}
        acc = {k: round(v["acc"], 3) for k, v in report["domain"].items()}
        recovered = {k: round(v["mean"], 3) for k, v in report.get("recovered", {}).items()}
        print(f"{name:22s} active {report['active_ratio']:.3f} ppl {ppl} acc {acc} recovered {recovered}")


def run_atp(args, config, fresh, lora_blocks, calibration_blocks, tokenizer, tokens, questions, results) -> None:
    checkpoints = Path(f"/tmp/ckpt-{args.domain}-atp-{args.generator_lr:g}")
    atp, cost = timed(lambda: train_atp(fresh()[0], lora_blocks, calibration_blocks, config, checkpoints))
    probe = torch.randint(0, tokenizer.vocab_size, (2, 64), device="cuda")
    state = {name: value.detach().clone() for name, value in lora_parameters(atp.model).items()}
    compact, removal = convert_atp(fresh()[0], state, atp.masks, config.lora, probe)
    history = atp.history
    curve = [round(history[i]["lora_ce"], 3) for i in range(0, len(history), max(1, len(history) // 20))]
    results["models"][f"atp-{args.domain}@{args.p:g}"] = evaluate(compact, tokenizer, tokens, questions) | {
        "training": cost | {"freeze": atp.report["freeze"], "lora_ce_curve": curve, "kept": atp.report["kept"]},
        "removal": removal,
    }
    del atp, compact


if __name__ == "__main__":
    main()
