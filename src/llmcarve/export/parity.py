"""Does the exported graph compute what the PyTorch model computes, and how fast does it run?

`check_parity` returns a plain JSON-able dict (a stage writes it as metrics/export_onnx.json):
logits on fresh random inputs of several shapes, greedy generation through the graph's own cache,
the file size, onnxruntime vs PyTorch CPU speed, and for MoE models the per-expert checks.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache

from llmcarve.eval.speed import _median_seconds
from llmcarve.export.compare import difference
from llmcarve.export.experts import expert_parity, expert_weights_missing, moe_mlps
from llmcarve.export.onnx import OnnxExport, as_model
from llmcarve.export.runtime import OnnxCausalLM

SHAPES = ((1, 7), (2, 16), (3, 33))


@torch.inference_mode()
def torch_greedy(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The PyTorch side of `OnnxCausalLM.greedy`: argmax tokens over the model's own KV cache.

    An explicit loop rather than `generate`: a model's generation_config may stop at EOS or apply a
    repetition penalty, and either would make the two sides generate by different rules.
    """
    cache = DynamicCache()
    logits = model(input_ids=prompt, past_key_values=cache, use_cache=True).logits
    tokens, chosen_from = [], []
    for _ in range(new_tokens):
        last = logits[:, -1].float()
        token = last.argmax(-1, keepdim=True)
        tokens.append(token)
        chosen_from.append(last)
        if len(tokens) < new_tokens:
            logits = model(input_ids=token, past_key_values=cache, use_cache=True).logits
    return torch.cat(tokens, dim=1), chosen_from


def _random_ids(vocab_size: int, shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, vocab_size, shape, generator=generator)


@torch.inference_mode()
def logits_parity(model: nn.Module, lm: OnnxCausalLM, shapes=SHAPES, seed: int = 0) -> dict:
    """Prefill logits on fresh random tokens of each (batch, length) shape, through both; beside them
    PyTorch's own float32 error against a float64 copy of the model on the same tokens (the rounding
    floor no float32 engine can be expected to beat)."""
    generator, device, per_shape = torch.Generator().manual_seed(seed), next(model.parameters()).device, []
    exact = copy.deepcopy(model).double()
    for shape in shapes:
        ids = _random_ids(lm.export.vocab_size, shape, generator).to(device)
        expected = model(input_ids=ids).logits.float().cpu().numpy()
        reference = exact(input_ids=ids).logits.cpu().numpy()
        per_shape.append(
            {
                "shape": list(shape),
                **difference(lm(ids.cpu().numpy())[0], expected),
                "pytorch_fp32_vs_fp64": difference(expected, reference),
            }
        )
    del exact
    worst = {key: max(entry[key] for entry in per_shape) for key in ("max_abs_diff", "rel_err", "peak_rel_err")}
    floor = {key: max(entry["pytorch_fp32_vs_fp64"][key] for entry in per_shape) for key in ("rel_err", "peak_rel_err")}
    return {**worst, "pytorch_fp32_vs_fp64": floor, "per_shape": per_shape}


def greedy_parity(model: nn.Module, lm: OnnxCausalLM, new_tokens: int = 32, prompt_length: int = 8, seed: int = 0) -> dict:
    """Greedy tokens from a random prompt, each side through its own cache; the decode-step logits are
    compared up to the first differing token (after it the two sides see different inputs)."""
    prompt = _random_ids(lm.export.vocab_size, (1, prompt_length), torch.Generator().manual_seed(seed + 1))
    expected, expected_logits = torch_greedy(model, prompt.to(next(model.parameters()).device), new_tokens)
    actual, actual_logits = lm.greedy(prompt.numpy(), new_tokens)
    expected = expected.cpu().numpy()
    differing = np.flatnonzero((actual != expected).any(0))
    first_mismatch = int(differing[0]) if len(differing) else None
    compared = range(new_tokens if first_mismatch is None else first_mismatch + 1)
    step_differences = [difference(actual_logits[step], expected_logits[step].cpu().numpy()) for step in compared]
    return {
        "greedy_match": first_mismatch is None,
        "greedy_tokens": new_tokens,
        "greedy_first_mismatch": first_mismatch,
        "decode_max_abs_diff": max(step["max_abs_diff"] for step in step_differences),
        "decode_rel_err": max(step["rel_err"] for step in step_differences),
    }


def speed(model: nn.Module, lm: OnnxCausalLM, prefill_tokens: int = 128, decode_tokens: int = 32, prompt_length: int = 8, repeats: int = 3) -> dict:
    """onnxruntime vs PyTorch on the same inputs, batch 1. Decode times the greedy loops above, whose
    `prompt_length`-token prefill is included (as in `llmcarve.eval.speed`)."""
    generator, device = torch.Generator().manual_seed(0), next(model.parameters()).device
    prefill = _random_ids(lm.export.vocab_size, (1, prefill_tokens), generator)
    prompt = _random_ids(lm.export.vocab_size, (1, prompt_length), generator)
    cpu = torch.device("cpu")  # onnxruntime runs on the CPU: nothing to synchronise

    def forward():
        with torch.inference_mode():
            model(input_ids=prefill.to(device))

    seconds = {
        "onnxruntime": (
            _median_seconds(lambda: lm(prefill.numpy()), repeats, cpu),
            _median_seconds(lambda: lm.greedy(prompt.numpy(), decode_tokens), repeats, cpu),
        ),
        "pytorch": (
            _median_seconds(forward, repeats, device),
            _median_seconds(lambda: torch_greedy(model, prompt.to(device), decode_tokens), repeats, device),
        ),
    }
    report = {
        "prefill_tokens": prefill_tokens,
        "decode_tokens": decode_tokens,
        "decode_prompt_tokens": prompt_length,
        "threads": torch.get_num_threads(),
        "pytorch_device": str(device),
    }
    for engine, (prefill_s, decode_s) in seconds.items():
        report[engine] = {
            "prefill_latency_ms": 1000 * prefill_s,
            "prefill_tokens_per_s": prefill_tokens / prefill_s,
            "decode_latency_ms_per_token": 1000 * decode_s / decode_tokens,
            "decode_tokens_per_s": decode_tokens / decode_s,
        }
    # Ratios measured in this one run (the project quotes speed as ratios, not absolute numbers).
    report["prefill_speedup"] = report["onnxruntime"]["prefill_tokens_per_s"] / report["pytorch"]["prefill_tokens_per_s"]
    report["decode_speedup"] = report["onnxruntime"]["decode_tokens_per_s"] / report["pytorch"]["decode_tokens_per_s"]
    return report


def check_parity(
    model: nn.Module | str | Path,
    export: OnnxExport | str | Path,
    *,
    shapes=SHAPES,
    new_tokens: int = 32,
    prompt_length: int = 8,
    seed: int = 0,
    timing: bool = True,
    prefill_tokens: int = 128,
    repeats: int = 3,
) -> dict:
    """Everything in one JSON-able dict; see the module docstring. `model` is the PyTorch model the
    export came from (or its saved directory), `export` the export or its directory."""
    model = as_model(model)
    lm = OnnxCausalLM(export, threads=torch.get_num_threads())
    # PyTorch runs as configured (for a carved MoE, its own `moe_impl`, not necessarily the graph's
    # masked routing): the claim checked is that the file computes what the model computes.
    report = {
        "model_type": lm.export.model_type,
        "exporter": lm.export.exporter,
        "opset": lm.export.opset,
        "file_bytes": lm.export.file_bytes,
        "external_data": lm.export.external_data,
        **logits_parity(model, lm, shapes, seed),
        **greedy_parity(model, lm, new_tokens, prompt_length, seed),
    }
    if moe_mlps(model):
        report["moe_impl"] = model.config.moe_impl
        report["expert_weights_missing"] = expert_weights_missing(model, lm.export.path)
        report["expert_parity"] = expert_parity(model, lm, seed=seed)
    if timing:
        report["speed"] = speed(model, lm, prefill_tokens, new_tokens, prompt_length, repeats)
    return report
