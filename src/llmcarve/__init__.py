"""llmcarve: carve dense decoder LLMs into Mixture-of-Experts (ToMoE) and domain-tuned compact models (ATP)."""

__version__ = "0.1.0"
