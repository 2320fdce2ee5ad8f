"""Checks that an exported MoE graph holds every expert, not only those the export's example reached.

Two independent checks, because a graph can fail either way:
- weights: every channel of every expert (its gate/up rows, down column), the router rows and the
  expert masks must be rows or columns of the graph's initializers;
- behaviour: for each layer and expert, inputs that the PyTorch router sends to that expert must give
  the same logits in onnxruntime, up to the first router near-tie of each input (`routing`): past
  one, the engines may rightly take different experts.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from llmcarve.export.compare import difference_where
from llmcarve.export.routing import RoutingRecorder, clearance, float64_copy, moe_mlps, near_ties, pinned_forward
from llmcarve.export.runtime import OnnxCausalLM


@torch.no_grad()
def router_choices(model: nn.Module, input_ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """Layer number -> the expert [batch, length] each token goes to (the carved MLP's own `route`)."""
    with RoutingRecorder(model) as routing:
        model(input_ids=input_ids.to(next(model.parameters()).device))
    return routing.choices


@torch.inference_mode()
def routed_inputs(model: nn.Module, per_expert: int = 4, candidates: int = 4096, seed: int = 0) -> dict[tuple[int, int], torch.Tensor]:
    """(layer, expert) -> up to `per_expert` input sequences in which that layer routes a token to that expert.

    One-token sequences first: their routing depends on the token id alone, so they are an exact,
    cheap search over the vocabulary. An expert no single token reaches (possible in deep layers) is
    looked for in random 16-token sequences; one reached by neither is left out (see `expert_parity`).
    Of the sequences that reach an expert, those whose decisions up to its first routed token are
    furthest from a tie come first (`routing.clearance`), so that token is rarely behind a near-tie.
    """
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    pools = [
        torch.randperm(vocab, generator=generator)[:candidates, None],
        torch.randint(0, vocab, (64, 16), generator=generator),
    ]
    found: dict[tuple[int, int], torch.Tensor] = {}
    experts = {layer: mlp.router.out_features for layer, mlp in moe_mlps(model).items()}
    device = next(model.parameters()).device
    for pool in pools:
        with RoutingRecorder(model) as routing:
            model(input_ids=pool.to(device), logits_to_keep=1)  # only the routing matters here
        safety = clearance(routing.router_logits)
        for layer, chosen in routing.choices.items():
            for expert in range(experts[layer]):
                routed = chosen == expert
                reaching = routed.any(-1)
                if (layer, expert) in found or not reaching.any():
                    continue
                first_routed = routed.int().argmax(-1, keepdim=True)
                score = safety.gather(-1, first_routed)[:, 0].masked_fill(~reaching, -math.inf)
                safest_first = score.argsort(descending=True, stable=True)
                found[layer, expert] = pool[safest_first[: min(per_expert, int(reaching.sum()))]]
    return found


def expert_parity(model: nn.Module, lm: OnnxCausalLM, per_expert: int = 4, seed: int = 0, exact: nn.Module | None = None) -> dict:
    """The logit difference per (layer, expert) on inputs routed to it, and the experts left unchecked.

    Each pair's logits are compared at the positions before its sequences' first router near-tie
    (see `routing`; `exact` is the float64 copy that measures the floors). A pair counts as checked
    only if a token routed to it is among them; the near-ties are reported, never failed on. The
    inputs of all experts run as one batch per sequence length (two batches in all, whatever the
    number of experts), so checking a real model's hundreds of experts costs two forward passes.
    """
    inputs = routed_inputs(model, per_expert=per_expert, seed=seed)
    exact = float64_copy(model) if exact is None else exact
    results: dict[tuple[int, int], dict] = {}
    ties: dict[tuple, dict] = {}  # one entry per (input, position, layer): a sequence may serve several pairs
    floors: dict[int, float] = {}
    for length in sorted({ids.shape[1] for ids in inputs.values()}):
        pairs = [pair for pair, ids in inputs.items() if ids.shape[1] == length]
        batch = torch.cat([inputs[pair] for pair in pairs])
        results.update(_batch_parity(model, lm, exact, batch, {pair: inputs[pair].shape[0] for pair in pairs}, ties, floors))
    checked, unreached = [], []
    for layer, mlp in moe_mlps(model).items():
        for expert in range(mlp.router.out_features):
            result = results.get((layer, expert))
            if result is None:
                unreached.append({"layer": layer, "expert": expert, "why": "no searched input routes a token to it"})
            elif not result["routed_tokens_compared"]:
                unreached.append({"layer": layer, "expert": expert, "why": "each token routed to it follows a router near-tie"})
            else:
                checked.append({"layer": layer, "expert": expert, **result})
    return {
        "checked": checked,
        "unreached": unreached,
        "max_rel_err": max((entry["rel_err"] for entry in checked), default=0.0),
        "near_ties": len(ties),
        "near_tie_tokens": list(ties.values()),
        "router_floor": {str(layer): floor for layer, floor in sorted(floors.items())},
    }


def _batch_parity(
    model: nn.Module, lm: OnnxCausalLM, exact: nn.Module, batch: torch.Tensor, rows: dict[tuple[int, int], int], ties: dict, floors: dict
) -> dict[tuple[int, int], dict]:
    """One batch of sequences of one length (`rows`: each pair's number of them, in order) through
    both engines; its near-ties are added to `ties` and its floors to `floors`."""
    with torch.no_grad(), RoutingRecorder(model) as routing:
        expected = model(input_ids=batch.to(next(model.parameters()).device)).logits.float().cpu().numpy()
    _, replayed = pinned_forward(exact, batch, routing, logits_to_keep=1)  # only the routers' floors are needed
    found = near_ties(routing.router_logits, replayed, tuple(batch.shape))
    for tie in found.ties:
        sequence = batch[tie.row].tolist()
        ties[tuple(sequence), tie.position, tie.layer] = {"input_ids": sequence, **tie.as_dict()}
    for layer, floor in found.floors.items():
        floors[layer] = max(floor, floors.get(layer, 0.0))
    actual, compared, choices = lm(batch.numpy())[0], found.compared(), routing.choices
    results, start = {}, 0
    for (layer, expert), count in rows.items():
        span = slice(start, start + count)
        routed = (choices[layer][span] == expert).numpy() & compared[span]
        results[layer, expert] = {
            "sequences": [count, batch.shape[1]],
            "routed_tokens_compared": int(routed.sum()),
            **difference_where(actual[span], expected[span], compared[span]),
        }
        start = span.stop
    return results


def _row_hashes(path: Path) -> set[int]:
    """Hashes of every row and column of every 2-D initializer, as float32 (a bool mask becomes 0/1)."""
    hashes = set()
    for initializer in onnx.load(str(path)).graph.initializer:
        array = numpy_helper.to_array(initializer)
        if array.ndim == 2:
            array = array.astype(np.float32)
            hashes.update(hash(np.ascontiguousarray(vector).tobytes()) for matrix in (array, array.T) for vector in matrix)
    return hashes


def expert_weights_missing(model: nn.Module, onnx_path: str | Path) -> list[str]:
    """What of the experts' weights the graph's initializers lack (empty when every expert is there).

    Compared as rows or columns because the exporter may store a weight transposed or fused with
    another; values must be bit-equal, as constant folding copies them without arithmetic.
    """
    present, missing = _row_hashes(Path(onnx_path)), []

    def require(vectors: torch.Tensor, what: str) -> None:
        vectors = vectors.detach().float().cpu().numpy()
        if not all(hash(np.ascontiguousarray(vector).tobytes()) in present for vector in vectors):
            missing.append(what)

    for layer, mlp in moe_mlps(model).items():
        for expert, channels in enumerate(mlp.expert_mask):
            index = channels.nonzero().squeeze(1)
            where = f"layer {layer} expert {expert}"
            require(mlp.gate_proj.weight[index], f"{where}: gate_proj rows")
            require(mlp.up_proj.weight[index], f"{where}: up_proj rows")
            require(mlp.down_proj.weight[:, index].T, f"{where}: down_proj columns")
            require(mlp.router.weight[expert : expert + 1], f"{where}: router row")
            require(channels[None], f"{where}: expert_mask row")
    return missing
