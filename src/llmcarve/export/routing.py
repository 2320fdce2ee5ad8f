"""PyTorch's routing decisions: recorded, replayed on a float64 copy, and their near-ties.

A carved MoE sends each token to `argmax(router logits)`. onnxruntime and PyTorch both compute those
logits in float32, summing in different orders, so where a token's best two experts are closer than
that rounding the two engines may pick different experts, and from there on both compute something
correct but different: that token's MLP output and, through attention, every later token of its
sequence. Such a token says nothing about the graph. So each parity check:

1. records PyTorch's router logits (and ToMoE's per-token V masks) while it computes the expected logits;
2. replays the same inputs through a float64 copy of the model with every decision pinned to PyTorch's
   (the same experts, the same V masks), so the copy's router logits differ from PyTorch's by rounding
   alone; their largest difference in each layer is that layer's float32 floor;
3. calls a decision a near-tie when its top-1 - top-2 margin is at most `TIE_FACTOR` floors, and
   compares logits only at the positions of each sequence before its first near-tie.

The near-ties are reported, never failed on. Near-ties come from PyTorch's side alone, so a graph
that computes something else cannot make one: it still differs at every compared position.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from llmcarve.models.adapters import adapter_for

# How many float32 floors a margin must clear before two float32 engines surely agree on the argmax.
# onnxruntime's margin differs from PyTorch's by at most both engines' errors on both logits: 4 floors
# if onnxruntime were as close to exact as PyTorch. Measured on the test suite's tiny ToMoE: onnxruntime's
# router logits were up to 2.7 floors from PyTorch's and its margins up to 2.9 floors; on SmolLM2
# carvings onnxruntime's final logits were up to 3.7 times as far from PyTorch's as PyTorch's from
# float64 (metrics/export_onnx.json), which puts margins within 2 x (1 + 3.7) = 9.4 floors. 16 keeps
# room over that, and is still a sliver of the logits' spread (on the tiny ToMoE, 16 floors are
# about 1e-4 against router logits of about 10), so near-ties stay rare.
TIE_FACTOR = 16.0
# The replay's MoE path: plain tensor ops in any dtype, routed by the router module's output (on a
# GPU the fused kernels may route inside the kernel); see llmcarve.models.carved.
_REPLAY_MOE_IMPL = "masked"


def moe_mlps(model: nn.Module) -> dict[int, nn.Module]:
    """Layer number -> MLP, for the layers whose MLP routes tokens to experts."""
    adapter = adapter_for(model.config)
    mlps = {number: adapter.mlp(layer) for number, layer in enumerate(adapter.layers(model))}
    return {number: mlp for number, mlp in mlps.items() if getattr(mlp, "router", None) is not None}


def v_masks(model: nn.Module) -> dict[int, nn.Module]:
    """Layer number -> ToMoE's per-token V mask module, for the layers that have one."""
    adapter = adapter_for(model.config)
    masks = {number: getattr(adapter.attention(layer), "v_mask", None) for number, layer in enumerate(adapter.layers(model))}
    return {number: mask for number, mask in masks.items() if mask is not None}


class RoutingRecorder:
    """PyTorch's decisions over the forward calls made inside `with RoutingRecorder(model) as routing:`.

    Calls that extend a KV cache (prefill, then one token at a time) are joined along the sequence, so
    a greedy loop's record lines up with one forward over everything it fed. Router logits are taken
    from the MLP's input, as `route` computes them: the fused MoE paths route inside their kernels.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._router: dict[int, list[torch.Tensor]] = {}
        self._v_mask: dict[int, list[torch.Tensor]] = {}
        self._handles: list = []

    def __enter__(self) -> "RoutingRecorder":
        for number, mlp in moe_mlps(self.model).items():
            self._handles.append(mlp.register_forward_pre_hook(partial(self._record_router, number)))
        for number, mask in v_masks(self.model).items():
            self._handles.append(mask.register_forward_hook(partial(self._record_v_mask, number)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @torch.no_grad()
    def _record_router(self, number: int, mlp: nn.Module, args: tuple) -> None:
        self._router.setdefault(number, []).append(mlp.router(args[0]).float().cpu())

    def _record_v_mask(self, number: int, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self._v_mask.setdefault(number, []).append(output.detach().cpu())

    @property
    def router_logits(self) -> dict[int, torch.Tensor]:
        """Layer -> router logits [batch, length, experts], float32."""
        return {number: torch.cat(parts, dim=-2) for number, parts in self._router.items()}

    @property
    def choices(self) -> dict[int, torch.Tensor]:
        """Layer -> the expert [batch, length] each token went to."""
        return {number: logits.argmax(-1) for number, logits in self.router_logits.items()}

    @property
    def v_masks(self) -> dict[int, torch.Tensor]:
        return {number: torch.cat(parts, dim=-2) for number, parts in self._v_mask.items()}


def float64_copy(model: nn.Module) -> nn.Module:
    """The model in float64, for the rounding floor (its RMSNorm and RoPE still round in float32,
    as transformers writes them, so the floor is a slight underestimate; TIE_FACTOR covers it)."""
    return copy.deepcopy(model).double().eval()


@contextmanager
def _pinned(exact: nn.Module, routing: RoutingRecorder) -> Iterator[dict[int, torch.Tensor]]:
    """`exact` takes `routing`'s experts and V masks; yields where its own router logits are recorded.

    Pinned at the router's output, which every MoE path argmaxes: the router returns a one-hot of the
    recorded expert after its true logits are kept.
    """
    own_logits: dict[int, torch.Tensor] = {}
    choices, masks = routing.choices, routing.v_masks

    def pin(number: int, _router: nn.Module, _args: tuple, logits: torch.Tensor) -> torch.Tensor:
        chosen = choices[number]
        if chosen.numel() != logits.shape[:-1].numel():
            raise ValueError(f"layer {number}: recorded routing {tuple(chosen.shape)} does not fit router input {tuple(logits.shape[:-1])}")
        own_logits[number] = logits.detach().reshape(*chosen.shape, -1)
        return F.one_hot(chosen.reshape(logits.shape[:-1]).to(logits.device), logits.shape[-1]).to(logits.dtype)

    mlps = moe_mlps(exact)
    handles = [mlp.router.register_forward_hook(partial(pin, number)) for number, mlp in mlps.items()]
    for number, module in v_masks(exact).items():
        handles.append(module.register_forward_hook(lambda _m, _a, output, mask=masks[number]: mask.to(output)))
    saved = getattr(exact.config, "moe_impl", None)
    if mlps:
        exact.config.moe_impl = _REPLAY_MOE_IMPL
    try:
        yield own_logits
    finally:
        for handle in handles:
            handle.remove()
        if mlps:
            exact.config.moe_impl = saved


@torch.inference_mode()
def pinned_forward(exact: nn.Module, input_ids: torch.Tensor, routing: RoutingRecorder, **kwargs) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """`exact`'s logits on `input_ids` (one forward, no cache) with `routing`'s decisions, and its
    router logits per layer. kwargs go to the model (`logits_to_keep=1` when only routers matter)."""
    device = next(exact.parameters()).device
    with _pinned(exact, routing) as router_logits:
        logits = exact(input_ids=input_ids.to(device), **kwargs).logits
    return logits.cpu(), {number: logits.cpu() for number, logits in router_logits.items()}


@dataclass(frozen=True)
class NearTie:
    """A token whose top two experts were closer than TIE_FACTOR float32 floors in one layer."""

    row: int
    position: int
    layer: int
    experts: tuple[int, int]  # PyTorch's first and second choice
    margin: float
    threshold: float

    def as_dict(self) -> dict:
        return {**asdict(self), "experts": list(self.experts)}


@dataclass
class NearTies:
    """The near-ties of one batch, with the per-layer float32 floors they were judged by."""

    ties: list[NearTie]
    floors: dict[int, float]
    shape: tuple[int, int]  # [batch, length]

    @property
    def first_positions(self) -> np.ndarray:
        """Each row's first near-tie position; `length` where it has none."""
        first = np.full(self.shape[0], self.shape[1])
        for tie in self.ties:
            first[tie.row] = min(first[tie.row], tie.position)
        return first

    def compared(self) -> np.ndarray:
        """[batch, length] True at the positions that precede every near-tie of their row: their
        logits depend on no decision the engines may take differently."""
        return np.arange(self.shape[1])[None, :] < self.first_positions[:, None]

    def report(self) -> dict:
        return {
            "near_ties": len(self.ties),
            "near_tie_tokens": [tie.as_dict() for tie in self.ties],
            "router_floor": {str(layer): floor for layer, floor in sorted(self.floors.items())},
        }


def margins(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 - top-2 logit [batch, length] and the two experts [batch, length, 2]: first the one argmax
    takes (on an exact tie, the lower index, which topk need not list first), then the runner-up."""
    top = logits.double().topk(2, dim=-1)
    chosen = logits.argmax(-1)
    runner_up = torch.where(top.indices[..., 0] == chosen, top.indices[..., 1], top.indices[..., 0])
    return top.values[..., 0] - top.values[..., 1], torch.stack([chosen, runner_up], dim=-1)


def near_ties(
    recorded: dict[int, torch.Tensor], replayed: dict[int, torch.Tensor], shape: tuple[int, int], factor: float = TIE_FACTOR
) -> NearTies:
    """The near-ties among `recorded` router logits (float32, [batch, length, experts] per layer) of a
    batch of `shape`, judged by each layer's floor: its largest difference from the `replayed` float64
    logits. A model without routers has none."""
    ties, floors = [], {}
    for layer, logits in sorted(recorded.items()):
        if logits.shape[-1] < 2:
            continue  # one expert: nothing to choose
        floors[layer] = float((logits.double() - replayed[layer].double()).abs().max())
        threshold = factor * floors[layer]
        margin, experts = margins(logits)
        # <=: an exact tie (margin 0) is a near-tie even where the floor is 0
        for row, position in (margin <= threshold).nonzero().tolist():
            first, second = experts[row, position].tolist()
            ties.append(NearTie(row, position, layer, (first, second), float(margin[row, position]), threshold))
    ties.sort(key=lambda tie: (tie.row, tie.position, tie.layer))
    return NearTies(ties, floors, tuple(shape))


def clearance(recorded: dict[int, torch.Tensor]) -> torch.Tensor:
    """[batch, length]: how far every decision up to each position is from a tie, the smallest margin
    over layers and earlier positions, each layer's margins in units of their median (layers differ in
    scale). For picking inputs before any floor is measured: the larger, the safer."""
    scaled = []
    for logits in recorded.values():
        if logits.shape[-1] >= 2:
            margin = margins(logits)[0]
            scaled.append(margin / margin.median().clamp_min(torch.finfo(margin.dtype).tiny))
    return torch.stack(scaled).amin(0).cummin(-1).values
