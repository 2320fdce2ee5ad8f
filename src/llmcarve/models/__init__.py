"""Model families (adapters), loading any model source, and the carved model class.

Importing this package registers the carved model with transformers' Auto classes (see `carved`),
so `AutoModelForCausalLM.from_pretrained` loads carved directories after `import llmcarve`.
"""

from llmcarve.models import carved  # noqa: F401  (registers CarvedConfig / CarvedForCausalLM)
