"""ATP's configs: the trainer's arguments, the `atp:` section of params.yaml and the command line's options.

Kept free of torch and PEFT so that validating a params file does not load the training stack.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llmcarve.options import option

if TYPE_CHECKING:
    from llmcarve.methods.atp.lora import LoraSettings


@dataclass(frozen=True)
class LoraRunConfig:
    """What ATP and the LoRA baselines share, so they train on the same tokens the same way.

    In params.yaml rank, alpha, dropout and lr sit under `atp.lora:`, steps, batch_size and checkpoint_every
    under `atp:`; seed is the top-level seed (llmcarve.params builds both sections from these fields).
    """

    steps: int = option(60, "LoRA updates, one training batch each; the LoRA baselines take as many", ge=2)
    batch_size: int = option(2, "sequences per LoRA update", gt=0)
    rank: int = option(8, "LoRA rank, on all seven projections", gt=0, le=256)
    alpha: float = option(8.0, "LoRA scale = alpha / rank", gt=0)
    dropout: float = option(0.05, "dropout on the LoRA branch's input", ge=0.0, lt=1.0)
    lr: float = option(1e-3, "AdamW learning rate of the LoRA factors", gt=0)
    checkpoint_every: int = option(10, "steps between checkpoints; a killed run resumes from the last", gt=0)
    seed: int = option(0, "seeds the LoRA initialisation, the data order, dropout and the Gumbel noise")

    @property
    def settings(self) -> LoraSettings:
        from llmcarve.methods.atp.lora import LoraSettings  # here, not at the top: lora.py loads PEFT and torch

        return LoraSettings(self.rank, self.alpha, self.dropout)


@dataclass(frozen=True)
class ATPConfig:
    """One ATP run. params.yaml's `atp:` section is built from these fields, except `lora` (built from the
    section, see LoraRunConfig) and `p` (one run per entry of atp.budgets)."""

    lora: LoraRunConfig = field(default_factory=LoraRunConfig, metadata={"help": "the LoRA run ATP tunes with"})
    p: float = option(0.6, "KEPT fraction of attention+MLP weights", gt=0.0, le=1.0)
    search_fraction: float = option(
        0.5, "share of the steps that alternate generator and LoRA updates; then the decision is frozen", gt=0.0, lt=1.0
    )
    generator_lr: float = option(1e-2, "AdamW learning rate of the decision generator", gt=0)
    temperature: float = option(0.4, "Gumbel temperature of the masks", gt=0)
    offset: float = option(3.0, "mask logit offset: a positive offset starts the search from the dense model")
    ratio_weight: float = option(5.0, "weight of |log(kept / p)| in the generator's loss", ge=0)
    group_lasso_search: float = option(
        0.1, "proximal group-lasso strength on pruned LoRA groups while decisions move (shrink = strength x lr per step)", ge=0
    )
    group_lasso_final: float = option(10.0, "proximal group-lasso strength once the decision is frozen", gt=0)

    @property
    def search_steps(self) -> int:
        return min(self.lora.steps - 1, max(1, round(self.lora.steps * self.search_fraction)))
