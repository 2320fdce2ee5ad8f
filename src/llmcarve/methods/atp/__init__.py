"""ATP: LoRA fine-tuning on a domain jointly with a trained pruning-decision generator.

config.py     ATPConfig and LoraRunConfig: the trainer's arguments and the params.yaml `atp:` schema
generator.py  the pruning-decision generator (PDG) and the per-layer masks it emits
masking.py    hooks that apply the masks: to the frozen branch only (LoRA updates) or to everything
lora.py       LoRA through PEFT on the seven projections, the groups feeding pruned structures,
              and their group-lasso proximal step
budget.py     the kept fraction of attention+MLP weights, and fitting a frozen decision to it
trainer.py    the alternating schedule with checkpoints, and plain LoRA for the baselines
convert.py    merge LoRA and slice the pruned structures away (a CarvedForCausalLM)
"""
