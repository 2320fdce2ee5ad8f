"""Checks that an exported MoE graph holds every expert, not only those the export's example reached.

Two independent checks, because a graph can fail either way:
- weights: every channel of every expert (its gate/up rows, down column), the router rows and the
  expert masks must be rows or columns of the graph's initializers;
- behaviour: for each layer and expert, inputs that the PyTorch router sends to that expert must give
  the same logits in onnxruntime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from llmcarve.export.compare import difference
from llmcarve.export.runtime import OnnxCausalLM
from llmcarve.models.adapters import adapter_for


def moe_mlps(model: nn.Module) -> dict[int, nn.Module]:
    """Layer number -> MLP, for the layers whose MLP routes tokens to experts."""
    adapter = adapter_for(model.config)
    mlps = {number: adapter.mlp(layer) for number, layer in enumerate(adapter.layers(model))}
    return {number: mlp for number, mlp in mlps.items() if getattr(mlp, "router", None) is not None}


@torch.no_grad()
def router_choices(model: nn.Module, input_ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """Layer number -> the expert [batch, length] each token goes to (the carved MLP's own `route`).

    Routed from each MLP's input, not read off its router's output: the fast MoE paths call the router
    on flattened tokens, or (one token on a GPU) inside a fused kernel without calling it at all.
    """
    choices, handles = {}, []

    def record(number: int):
        def hook(mlp, args):
            choices[number] = mlp.route(args[0]).cpu()

        return hook

    for number, mlp in moe_mlps(model).items():
        handles.append(mlp.register_forward_pre_hook(record(number)))
    try:
        model(input_ids=input_ids)
    finally:
        for handle in handles:
            handle.remove()
    return choices


def routed_inputs(model: nn.Module, per_expert: int = 4, candidates: int = 4096, seed: int = 0) -> dict[tuple[int, int], torch.Tensor]:
    """(layer, expert) -> up to `per_expert` input sequences in which that layer routes a token to that expert.

    One-token sequences first: their routing depends on the token id alone, so they are an exact,
    cheap search over the vocabulary. An expert no single token reaches (possible in deep layers) is
    looked for in random 16-token sequences; one reached by neither is left out (see `expert_parity`).
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
        for layer, chosen in router_choices(model, pool.to(device)).items():
            for expert in range(experts[layer]):
                hits = (chosen == expert).sum(-1)  # tokens of each sequence routed to this expert
                if (layer, expert) not in found and hits.any():
                    best_first = hits.argsort(descending=True, stable=True)
                    found[layer, expert] = pool[best_first[: min(per_expert, int((hits > 0).sum()))]]
    return found


def expert_parity(model: nn.Module, lm: OnnxCausalLM, per_expert: int = 4, seed: int = 0) -> dict:
    """Max |logit difference| per (layer, expert) on inputs routed to it, and the experts no input reached.

    The inputs of all experts run as one batch per sequence length (two batches in all, whatever the
    number of experts), so checking a real model's hundreds of experts costs two forward passes.
    """
    inputs = routed_inputs(model, per_expert=per_expert, seed=seed)
    device = next(model.parameters()).device
    logits: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
    for length in sorted({ids.shape[1] for ids in inputs.values()}):
        pairs = [pair for pair, ids in inputs.items() if ids.shape[1] == length]
        batch = torch.cat([inputs[pair] for pair in pairs])
        with torch.no_grad():
            expected = model(input_ids=batch.to(device)).logits.float().cpu().numpy()
        actual = lm(batch.numpy())[0]
        start = 0
        for pair in pairs:
            rows = slice(start, start + inputs[pair].shape[0])
            logits[pair], start = (actual[rows], expected[rows]), rows.stop
    checked, unreached = [], []
    for layer, mlp in moe_mlps(model).items():
        for expert in range(mlp.router.out_features):
            if (layer, expert) not in logits:
                unreached.append({"layer": layer, "expert": expert})
                continue
            checked.append(
                {"layer": layer, "expert": expert, "sequences": list(inputs[layer, expert].shape), **difference(*logits[layer, expert])}
            )
    return {
        "checked": checked,
        "unreached": unreached,
        "max_rel_err": max((entry["rel_err"] for entry in checked), default=0.0),
    }


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
