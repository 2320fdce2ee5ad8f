"""Where an eager prefill's time goes, per carved MoE path against dense: wall time per forward,
GPU kernel time per forward, and the top operators by host (self CPU) time. For reading, not for
recording: bench/prefill_product.py records the speeds.
    cd bench && PYTHONPATH=../src python profile_prefill.py --shape llama2-7b --tokens 512
"""

from __future__ import annotations

import argparse
import time

import torch
from decode_speed import SHAPES, build, carved_config, llama_config, randomise_experts
from timing import profile_totals
from transformers import LlamaForCausalLM

from llmcarve.models.carved import CarvedForCausalLM

CALLS = 5


@torch.inference_mode()
def profile(model, tokens: int, label: str) -> None:
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device="cuda")
    for _ in range(3):
        model(input_ids=ids, use_cache=False)
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(CALLS):
            model(input_ids=ids, use_cache=False)
        torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) * 1e3 / CALLS
    events = prof.key_averages()
    kernel_ms, launches = profile_totals(events)
    print(f"--- {label}: wall {wall_ms:.1f} ms (profiled), GPU kernels {kernel_ms / CALLS:.1f} ms, {launches / CALLS:.0f} kernel launches per forward")
    print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=45))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama2-7b", choices=list(SHAPES))
    parser.add_argument("--tokens", type=int, default=512)
    args = parser.parse_args()
    config = llama_config(SHAPES[args.shape])
    profile(build(LlamaForCausalLM, config), args.tokens, f"{args.shape} dense, {args.tokens} tokens")
    carved = build(CarvedForCausalLM, carved_config(config, moe=True))
    randomise_experts(carved)
    for path in ("auto", "masked"):
        carved.config.moe_impl = path
        profile(carved, args.tokens, f"{args.shape} carved {path}, {args.tokens} tokens")


if __name__ == "__main__":
    main()
