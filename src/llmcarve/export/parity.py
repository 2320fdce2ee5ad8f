"""Does the exported graph compute what the PyTorch model computes, and how fast does it run?

`check_parity` returns a plain JSON-able dict (a stage writes it as metrics/export_onnx.json):
logits on fresh random inputs of several shapes, greedy generation through the graph's own cache,
the file size, onnxruntime vs PyTorch CPU speed, and for MoE models the per-expert checks.
Where a carved MoE's router is at a near-tie the two engines may route a token differently; such
tokens are reported apart (`near_ties`), and what follows them is left out of the comparison (see
`routing`): each check compares what it can claim exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache

from llmcarve.eval.speed import median_seconds
from llmcarve.export.compare import difference, difference_where
from llmcarve.export.experts import expert_parity, expert_weights_missing
from llmcarve.export.onnx import OnnxExport, as_model
from llmcarve.export.routing import TIE_FACTOR, RoutingRecorder, float64_copy, moe_mlps, near_ties, pinned_forward
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
def logits_parity(model: nn.Module, lm: OnnxCausalLM, shapes=SHAPES, seed: int = 0, exact: nn.Module | None = None) -> dict:
    """Prefill logits on fresh random tokens of each (batch, length) shape, through both, at the
    positions before any router near-tie (see `routing`; a dense model has none); beside them PyTorch's
    own float32 error against a float64 copy of the model (`exact`) with the same routing, at every
    position: the rounding floor no float32 engine can be expected to beat."""
    generator, device, per_shape = torch.Generator().manual_seed(seed), next(model.parameters()).device, []
    exact = float64_copy(model) if exact is None else exact
    for shape in shapes:
        ids = _random_ids(lm.export.vocab_size, shape, generator)
        with RoutingRecorder(model) as routing:
            expected = model(input_ids=ids.to(device)).logits.float().cpu().numpy()
        reference, replayed = pinned_forward(exact, ids, routing)
        ties = near_ties(routing.router_logits, replayed, shape)
        per_shape.append(
            {
                "shape": list(shape),
                **difference_where(lm(ids.numpy())[0], expected, ties.compared()),
                "pytorch_fp32_vs_fp64": difference(expected, reference.numpy()),
                **ties.report(),
            }
        )
    return {**_worst(per_shape), "per_shape": per_shape}


def _worst(per_shape: list[dict]) -> dict:
    """The largest differences over the shapes that compared any token, the token counts summed."""
    compared = [entry for entry in per_shape if entry["compared_tokens"]]
    keys = ("max_abs_diff", "rel_err", "peak_rel_err")
    worst = {key: max((entry[key] for entry in compared), default=float("nan")) for key in keys}
    floor = {key: max(entry["pytorch_fp32_vs_fp64"][key] for entry in per_shape) for key in keys[1:]}
    counts = {key: sum(entry[key] for entry in per_shape) for key in ("tokens", "compared_tokens", "near_ties")}
    return {**worst, **counts, "pytorch_fp32_vs_fp64": floor}


def next_token_near_ties(chosen_from: list[torch.Tensor], reference: torch.Tensor, factor: float = TIE_FACTOR) -> dict:
    """The greedy steps whose best two next-token logits (batch 1) were within `factor` float32 floors,
    the floor being the largest difference of PyTorch's step logits from the float64 `reference` [steps, vocab]."""
    logits = torch.cat(chosen_from).double().cpu()
    floor = float((logits - reference.double()).abs().max())
    top = logits.topk(2, dim=-1)
    margin = top.values[:, 0] - top.values[:, 1]
    steps = (margin <= factor * floor).nonzero().flatten().tolist()
    return {
        "floor": floor,
        "threshold": factor * floor,
        "steps": [{"step": step, "tokens": top.indices[step].tolist(), "margin": float(margin[step])} for step in steps],
    }


def greedy_parity(
    model: nn.Module, lm: OnnxCausalLM, new_tokens: int = 32, prompt_length: int = 8, seed: int = 0, exact: nn.Module | None = None
) -> dict:
    """Greedy tokens from a random prompt, each side through its own cache.

    A first differing token is put down to a near-tie, not to the graph, when PyTorch's own choice
    there was one (its best two next-token logits within TIE_FACTOR floors) or a router near-tie came
    at or before the position it was chosen from (see `routing`; both measured against `exact`, a
    float64 copy replaying PyTorch's decisions over everything its loop fed). The decode-step logits
    are compared up to the first differing token and before any router near-tie: after either, the two
    sides may compute from different inputs.
    """
    exact = float64_copy(model) if exact is None else exact
    prompt = _random_ids(lm.export.vocab_size, (1, prompt_length), torch.Generator().manual_seed(seed + 1))
    with RoutingRecorder(model) as routing:
        expected, expected_logits = torch_greedy(model, prompt.to(next(model.parameters()).device), new_tokens)
    actual, actual_logits = lm.greedy(prompt.numpy(), new_tokens)
    expected = expected.cpu().numpy()
    fed = torch.cat([prompt, torch.from_numpy(expected[:, :-1])], dim=1)  # the last token is never fed
    reference, replayed = pinned_forward(exact, fed, routing)
    chosen_at = prompt_length - 1 + np.arange(new_tokens)  # the position each step's logits come from
    router_ties = near_ties(routing.router_logits, replayed, tuple(fed.shape))
    next_token = next_token_near_ties(expected_logits, reference[0, torch.from_numpy(chosen_at)])
    routed_safely = chosen_at < router_ties.first_positions[0]  # steps no router near-tie reaches

    differing = np.flatnonzero((actual != expected).any(0))
    first_mismatch = int(differing[0]) if len(differing) else None
    near_tie = first_mismatch is not None and (
        not routed_safely[first_mismatch] or first_mismatch in {tie["step"] for tie in next_token["steps"]}
    )
    compared = [step for step in range(new_tokens if first_mismatch is None else first_mismatch + 1) if routed_safely[step]]
    step_differences = [difference(actual_logits[step], expected_logits[step].cpu().numpy()) for step in compared]
    return {
        "greedy_match": first_mismatch is None,
        "greedy_tokens": new_tokens,
        "greedy_first_mismatch": first_mismatch,
        "greedy_mismatch_near_tie": near_tie,
        "greedy_near_ties": {"router": router_ties.report(), "next_token": next_token},
        "decode_steps_compared": len(compared),
        "decode_max_abs_diff": max((step["max_abs_diff"] for step in step_differences), default=float("nan")),
        "decode_rel_err": max((step["rel_err"] for step in step_differences), default=float("nan")),
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
            median_seconds(lambda: lm(prefill.numpy()), repeats, cpu),
            median_seconds(lambda: lm.greedy(prompt.numpy(), decode_tokens), repeats, cpu),
        ),
        "pytorch": (
            median_seconds(forward, repeats, device),
            median_seconds(lambda: torch_greedy(model, prompt.to(device), decode_tokens), repeats, device),
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
    exact = float64_copy(model)  # one float64 copy for every floor below
    # PyTorch runs as configured (for a carved MoE, its own `moe_impl`, not necessarily the graph's
    # masked routing): the claim checked is that the file computes what the model computes.
    report = {
        "model_type": lm.export.model_type,
        "exporter": lm.export.exporter,
        "opset": lm.export.opset,
        "file_bytes": lm.export.file_bytes,
        "external_data": lm.export.external_data,
        **logits_parity(model, lm, shapes, seed, exact),
        **greedy_parity(model, lm, new_tokens, prompt_length, seed, exact),
    }
    if moe_mlps(model):
        report["moe_impl"] = model.config.moe_impl
        report["expert_weights_missing"] = expert_weights_missing(model, lm.export.path)
        report["expert_parity"] = expert_parity(model, lm, seed=seed, exact=exact)
    del exact
    if timing:
        report["speed"] = speed(model, lm, prefill_tokens, new_tokens, prompt_length, repeats)
    return report
