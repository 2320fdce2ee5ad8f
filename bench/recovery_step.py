"""One recovery (distillation) training step of a carved model: ToMoE-carved vs static-carved vs dense.

A training step = forward, loss, backward, gradient-norm clip 1.0, AdamW step, with every weight
trainable (the distillation recipe's student: bf16 autocast over float32 weights on CUDA; float32 on
the CPU). The loss is the cross-entropy on the batch's own next tokens: it costs what the
distillation KL costs (one log-softmax over the vocabulary per token) without a teacher forward,
which is the same for every student. Models, all `CarvedForCausalLM` with random weights at the real
shapes (speed does not depend on the values; the random router spreads tokens over the experts):
- dense:  nothing carved
- static: the compact model at about half the active weights: Q/K and V keep half of each head's
          dims, the MLP half of its channels
- tomoe:  the ToMoE shape at about the same active ratio (as bench/decode_speed.py builds it): every
          MLP top-1 of 8 experts, each a random half of the full width; Q/K keep half of each head's
          dims; V keeps every dim in storage with a dynamic per-token mask of at most half of them.
          Trained through its default `moe_impl` ("auto"); `--moe-impls` adds others side by side
          (tomoe-masked, tomoe-grouped, tomoe-sorted).
Variants are timed in interleaved rounds (each one step per round, so load from other processes or
clock changes fall on all alike), after warm-up rounds; ratios are taken per round and their median
is reported with its range. On CUDA a step is timed between CUDA events (bench/timing.py), and one
extra step per variant counts the host synchronisations (torch.cuda sync debug mode).
    PYTHONPATH=src python bench/recovery_step.py --shape smollm2 --out bench/results/recovery_step_h100.json
    PYTHONPATH=src python bench/recovery_step.py --device cpu --shape smollm2 --layers 4 --batch 1 --seq-len 256 \\
        --rounds 3 --warmup 1 --out /tmp/recovery_step_cpu.json   (a short check on the CPU)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # timing, decode_speed, run from anywhere
from decode_speed import SHAPES, llama_config  # noqa: E402
from timing import cuda_event_ms  # noqa: E402

from llmcarve.models.carved import CarvedConfig, CarvedForCausalLM  # noqa: E402

SHAPE_NAMES = {"smollm2": "smollm2-135m", "llama7b": "llama2-7b"}
# Per shape: (batch, tokens per sequence, layers). LLaMA-2-7B keeps 6 of its 32 layers: three
# models with float32 weights, gradients and AdamW state (16 bytes a weight) must fit one 80 GB GPU
# at once for interleaved timing; every layer costs the same, so the per-layer ratio is kept (the
# embeddings and LM head weigh more in a 6-layer step than in the whole model's, which pulls every
# ratio a little toward 1).
RUNS = {"smollm2": (16, 512, None), "llama7b": (2, 2048, 6)}
EXPERTS = 8
V_ROUTER_DIM = 32  # the dynamic V mask's embedding size, as bench/decode_speed.py builds it
LEARNING_RATE, CLIP_NORM = 1e-4, 1.0  # the distillation recipe's


def model_configs(shape: str, layers: int | None) -> dict[str, CarvedConfig]:
    base = llama_config(SHAPES[SHAPE_NAMES[shape]])
    layers = layers or base.num_hidden_layers
    head_dim, width = base.head_dim, base.intermediate_size
    common = dict(
        vocab_size=base.vocab_size, hidden_size=base.hidden_size, intermediate_size=width, num_hidden_layers=layers,
        num_attention_heads=base.num_attention_heads, num_key_value_heads=base.num_key_value_heads, head_dim=head_dim,
        hidden_act="silu", max_position_embeddings=base.max_position_embeddings, rms_norm_eps=base.rms_norm_eps,
        rope_parameters=dict(base.rope_parameters), tie_word_embeddings=base.tie_word_embeddings,
    )
    half = [head_dim // 2] * layers
    return {
        "dense": CarvedConfig(**common),
        "static": CarvedConfig(**common, qk_dims=half, v_dims=half, mlp_dims=[width // 2] * layers),
        "tomoe": CarvedConfig(**common, qk_dims=half, v_dims=[head_dim] * layers, v_active=half,
                              v_router=[True] * layers, v_router_dim=V_ROUTER_DIM, num_experts=[EXPERTS] * layers),
    }


def build(config: CarvedConfig, device: torch.device) -> CarvedForCausalLM:
    torch.manual_seed(0)
    with device:
        model = CarvedForCausalLM(config)
    randomise_experts(model)
    return model.train()


@torch.no_grad()
def randomise_experts(model: CarvedForCausalLM) -> None:
    """Each expert a random half of the MLP's channels; routers and V masks spread over their choices."""
    generator = torch.Generator(device=model.device).manual_seed(1)
    for layer in model.model.layers:
        mlp, v_mask = layer.mlp, layer.self_attn.v_mask
        if mlp.router is not None:
            experts, width = mlp.expert_mask.shape
            scores = torch.rand(experts, width, generator=generator, device=model.device)
            mlp.expert_mask.copy_(scores.argsort(-1) < width // 2)
            mlp.router.weight.normal_(0, mlp.router.weight.shape[1] ** -0.5, generator=generator)
        if v_mask is not None:
            v_mask.router.weight.normal_(0, v_mask.router.weight.shape[1] ** -0.5, generator=generator)
            v_mask.decoder.weight.normal_(0, 8 * v_mask.decoder.weight.shape[1] ** -0.5, generator=generator)


class Trainee:
    """A model, its optimizer and how it steps (its `moe_impl` is set before every step, as the
    variants may share one model)."""

    def __init__(self, model: CarvedForCausalLM, moe_impl: str, autocast: bool):
        self.model, self.moe_impl, self.autocast = model, moe_impl, autocast
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)

    def step(self, ids: torch.Tensor) -> None:
        self.model.config.moe_impl = self.moe_impl
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss = self.model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP_NORM)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def step_ms(trainee: Trainee, ids: torch.Tensor) -> float:
    if ids.is_cuda:
        return cuda_event_ms(lambda: trainee.step(ids), 1)[0]
    start = time.perf_counter()
    trainee.step(ids)
    return (time.perf_counter() - start) * 1e3


def host_syncs(trainee: Trainee, ids: torch.Tensor) -> int:
    """Host synchronisations in one step, as torch.cuda's sync debug mode reports them."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainee.step(ids)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(warning.message) for warning in caught)


def active_ratios(trainees: dict[str, Trainee]) -> dict[str, float]:
    dense = trainees["dense"].model.active_attention_mlp_params()
    return {name: t.model.active_attention_mlp_params() / dense for name, t in trainees.items()}


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def bench(args, device: torch.device) -> dict:
    batch, length, layers = RUNS[args.shape]
    batch, length, layers = args.batch or batch, args.seq_len or length, args.layers or layers
    autocast = device.type == "cuda"
    configs = model_configs(args.shape, layers)
    trainees = {"dense": Trainee(build(configs["dense"], device), "auto", autocast),
                "static": Trainee(build(configs["static"], device), "auto", autocast)}
    tomoe = build(configs["tomoe"], device)  # one model for every MoE path: they compute the same thing
    for impl in args.moe_impls:
        trainees["tomoe" if impl == "auto" else f"tomoe-{impl}"] = Trainee(tomoe, impl, autocast)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, configs["dense"].vocab_size, (batch, length), generator=generator).to(device)

    times = {name: [] for name in trainees}
    for round_number in range(args.warmup + args.rounds):
        for name, trainee in trainees.items():
            milliseconds = step_ms(trainee, ids)
            if round_number >= args.warmup:
                times[name].append(milliseconds)
        timed = round_number >= args.warmup
        line = "  ".join(f"{name} {ms[-1]:.0f} ms" for name, ms in times.items()) if timed else "warm-up"
        print(f"round {round_number + 1}/{args.warmup + args.rounds}: {line}", flush=True)

    result = {"shape": SHAPE_NAMES[args.shape], "batch": batch, "seq_len": length, "tokens_per_step": batch * length,
              "layers": layers or configs["dense"].num_hidden_layers, "experts": EXPERTS,
              "active_ratio": active_ratios(trainees), "step_ms": {n: spread(v) for n, v in times.items()},
              "step_ms_all": times, "ratios_per_round": {}}
    for name in trainees:
        for baseline in ("static", "dense"):
            if name not in ("dense", baseline):
                ratios = [a / b for a, b in zip(times[name], times[baseline])]
                result["ratios_per_round"][f"{name}/{baseline}"] = spread(ratios)
    if device.type == "cuda":
        # counted on the second of two steps: a first step under the debug mode can report one-off syncs
        syncs = [{name: host_syncs(trainee, ids) for name, trainee in trainees.items()} for _ in range(2)]
        result["host_syncs_per_step"] = syncs[-1]
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def report(result: dict) -> None:
    print(f"{result['shape']}, {result['layers']} layers, {result['batch']} x {result['seq_len']} tokens per step:")
    for name, row in result["step_ms"].items():
        syncs = result.get("host_syncs_per_step", {}).get(name)
        print(f"  {name:14s} {row['median']:9.1f} ms (min {row['min']:.1f}, max {row['max']:.1f})  "
              f"active ratio {result['active_ratio'][name]:.3f}" + ("" if syncs is None else f"  host syncs {syncs}"))
    for pair, row in result["ratios_per_round"].items():
        print(f"  {pair:22s} {row['median']:.2f}x (rounds {row['min']:.2f}-{row['max']:.2f})")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the results JSON")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", choices=sorted(RUNS), default="smollm2")
    parser.add_argument("--batch", type=int, help="sequences per step (default: per shape, see RUNS)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default: per shape)")
    parser.add_argument("--layers", type=int, help="decoder layers (default: per shape)")
    parser.add_argument("--moe-impls", nargs="+", default=["auto"], choices=["auto", "masked", "grouped", "sorted"],
                        help="the carved MoE model's training paths to time (config.moe_impl)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {
        "date": dt.date.today().isoformat(),
        "device": device_name(device),
        "torch": torch.__version__, "command": "PYTHONPATH=src python " + " ".join(sys.argv),
        "precision": "bf16 autocast, float32 weights" if device.type == "cuda" else "float32",
        "weights": "random at the real shapes", "rounds": args.rounds, "warmup_rounds": args.warmup,
    }
    result.update(bench(args, device))
    report(result)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
