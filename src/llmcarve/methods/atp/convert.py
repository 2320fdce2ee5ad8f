"""Physical removal: merge LoRA into the weights, then slice the pruned structures away.

The result is a CarvedForCausalLM with per-layer Q/K dims, V dims and MLP widths (in config.json),
the softmax scale of the original head dim, loading with from_pretrained after `import llmcarve`.
It computes exactly the PRUNED forward of masking.py: every sliced row or column only ever saw
zeros there. What removal does drop is the LoRA contribution of pruned groups in the LoRA-update
forward; `lora.group_norms` measures it, and the group lasso drives it to zero before this runs.
"""

from __future__ import annotations

import torch
from torch import nn

from llmcarve.methods.atp.generator import LayerMasks
from llmcarve.methods.atp.lora import base_model, group_norms, lora_parameters, pruned_slices
from llmcarve.methods.atp.masking import ATPMasker, Forward
from llmcarve.methods.atp.trainer import LoraRunConfig, with_lora
from llmcarve.models.carve import LayerPlan, carve
from llmcarve.models.carved import CarvedForCausalLM


def plans_from_masks(masks: list[LayerMasks]) -> list[LayerPlan]:
    def kept(mask):
        return mask.detach().cpu().nonzero().flatten()

    return [LayerPlan(qk_index=kept(m.qk), v_index=kept(m.v), mlp_index=kept(m.mlp)) for m in masks]


def compact_model(peft_model: nn.Module, masks: list[LayerMasks]) -> CarvedForCausalLM:
    """Merge W0 + B A (in place: the wrapped model is consumed) and carve the kept structures."""
    merged = peft_model.merge_and_unload()
    return carve(merged, plans_from_masks(masks))


def merged_model(peft_model: nn.Module) -> nn.Module:
    """A LoRA-tuned model without pruning (the dense reference and two-stage's carved model)."""
    return peft_model.merge_and_unload()


@torch.no_grad()
def convert_atp(
    dense: nn.Module, lora_state: dict[str, torch.Tensor], masks: list[LayerMasks], lora: LoraRunConfig, probe: torch.Tensor
) -> tuple[CarvedForCausalLM, dict]:
    """The compact model of a trained ATP run, and what removal changed.

    `probe` token ids are run through the masked (PRUNED forward) model and the compact one:
    `max_abs_logit_diff` must be at float rounding level. `removed_group_norm_max` is the largest
    LoRA group that removal drops; near zero means the LoRA-update forward is unchanged too.
    """
    model = with_lora(dense, lora)
    parameters = lora_parameters(model)
    missing = set(parameters) - set(lora_state)
    if missing:
        raise ValueError(f"the saved LoRA state lacks {len(missing)} factors (e.g. {sorted(missing)[0]}); was it trained on this model?")
    for name, parameter in parameters.items():
        parameter.copy_(lora_state[name])
    norms = group_norms(pruned_slices(model, masks))
    masker = ATPMasker(base_model(model)).attach()
    masker.use(masks, Forward.PRUNED)
    masked_logits = model.eval()(input_ids=probe).logits
    masker.detach()
    compact = compact_model(model, masks)
    report = {
        "max_abs_logit_diff": (compact(input_ids=probe).logits - masked_logits).abs().max().item(),
        "removed_groups": len(norms),
        "removed_group_norm_max": norms.max().item() if len(norms) else 0.0,
    }
    return compact, report
