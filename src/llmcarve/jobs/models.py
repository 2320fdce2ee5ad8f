"""Model directories in and out: a model source made loadable, a produced model saved under its name."""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from torch import nn

from llmcarve.eval.accounting import measured_active_ratio
from llmcarve.errors import UserInputError
from llmcarve.io import atomic_directory, ensure_free_space
from llmcarve.models.loading import check_model_directory, materialize, saved_model_bytes
from llmcarve.names import NAME_TOLERANCE, ModelName

log = logging.getLogger(__name__)

NAME_KEY = "llmcarve_name"  # config.json key holding the ModelName of a produced model


@contextmanager
def prepared_model_dir(source: str, allow_pickle_weights: bool = False) -> Iterator[Path]:
    """A safetensors HF directory of `source` (anything params.yaml's model.source accepts), for the block.

    A local safetensors directory is used as it is; any other source (the embedded model, a .gguf, a hub
    id, pickled weights) is materialized into a temporary directory, as the prepare_model stage does.
    """
    path = Path(source).expanduser()
    if path.is_dir() and any(path.glob("*.safetensors")):
        check_model_directory(path)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="llmcarve-model-") as scratch:
        log.info("preparing %s", source)
        yield materialize(source, Path(scratch) / "model", "float32", allow_pickle_weights)


def save_named_model(model: nn.Module, tokenizer, directory: Path, name: ModelName) -> None:
    """A produced model as the artifact contract has it: safetensors, a config.json that names it, the tokenizer."""
    setattr(model.config, NAME_KEY, str(name))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def name_of(directory: str | Path) -> str:
    """The model name a directory's config.json records, else the directory's own name (a model from elsewhere)."""
    config = json.loads((Path(directory) / "config.json").read_text())
    return config.get(NAME_KEY) or Path(directory).resolve().name


def write_model(model: nn.Module, tokenizer, out: Path, name: ModelName, tolerance: float = NAME_TOLERANCE) -> None:
    """Save into `out` in one rename, once the model measures what its name states (within `tolerance`) and the
    disk has room: a failure leaves an earlier `out` as it was."""
    model = model.to("cpu")
    try:
        name.check_measured(measured_active_ratio(model), tolerance)  # before anything is written
    except ValueError as error:
        raise UserInputError(str(error)) from None
    ensure_free_space(out.parent, saved_model_bytes(model), f"the carved model {name}")
    with atomic_directory(out) as staging:
        save_named_model(model, tokenizer, staging, name)
    log.info("saved %s to %s", name, out)
