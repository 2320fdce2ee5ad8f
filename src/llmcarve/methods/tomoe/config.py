"""ToMoE's one config: the trainer's argument, the `tomoe:` section of params.yaml and the command line's options.

Kept free of torch so that validating a params file does not load the training stack.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmcarve.options import option


@dataclass(frozen=True)
class ToMoEConfig:
    """Everything one ToMoE training run reads. params.yaml's `tomoe:` section is built from these fields
    (llmcarve.params), except `p` (one run per entry of tomoe.budgets) and `seed` (the top-level seed)."""

    p: float = option(0.5, "KEPT fraction of attention+MLP weights per token", gt=0.0, le=1.0)
    num_experts: int = option(8, "experts per MLP: each token is routed to one channel subset", ge=1, le=64)
    steps: int = option(200, "optimizer steps, one batch each", gt=0)
    batch_size: int = option(1, "sequences per step (split evenly over data-parallel processes)", gt=0)
    lr: float = option(1e-3, "AdamW learning rate of the hypernetwork and heads", gt=0)
    weight_decay: float = option(0.05, "AdamW weight decay", ge=0)
    temperature: float = option(0.4, "Gumbel temperature of routers and masks", gt=0)
    offset: float = option(3.0, "mask logit offset: a positive offset starts training from the dense model")
    lam: float = option(16.0, "weight of the two-sided budget penalty", ge=0)
    alpha_union: float = option(3.0, "weight of the expert coverage (union) loss", ge=0)
    alpha_balance: float = option(1.0, "weight of the load-balance loss", ge=0)
    kd_weight: float = option(2.0, "weight of self-distillation from the unmasked model", ge=0)
    checkpoint_every: int = option(50, "steps between checkpoints; a killed run resumes from the last", gt=0)
    seed: int = option(0, "seeds the heads' initialisation, the data order and the Gumbel noise")
