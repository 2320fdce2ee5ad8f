"""llmcarve: carve dense decoder LLMs into Mixture-of-Experts (ToMoE) and domain-tuned compact models (ATP)."""

__version__ = "0.1.0"

from llmcarve import models  # noqa: E402,F401  (registers the carved model class with transformers)
