"""Plumbing every trainer shares: seeded batches and noise, checkpoints with exact resume, the NaN stop.

Randomness is a pure function of (seed, step): the blocks a step trains on (`batch_for_step`) and the
noise it draws (`noise_generator`, `step_seed`) come from generators seeded with them. A checkpoint
therefore holds no RNG state, only what the trainer hands it (state dicts and JSON values), and a run
killed at any point and resumed from its last checkpoint replays exactly the steps the uninterrupted run
would have taken.

A trainer owns what goes into a checkpoint; this module owns the file:
- `save_checkpoint(directory, step, tensors, optimizers, metadata, config_hash)` writes one safetensors
  file atomically (a kill mid-write leaves the previous checkpoint);
- `load_checkpoint(directory, config_hash, logger)` returns it as a `Checkpoint` (None without one) and
  refuses a checkpoint written under another config (`run_fingerprint`): resuming it would mix two runs.

The trainer's loop checks its loss parts with `check_finite` before it saves, so a NaN or inf stops the
run with `NonFiniteLossError` and leaves the last good checkpoint in place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from llmcarve.errors import UserError

CHECKPOINT = "checkpoint.safetensors"
# what the file's metadata records besides the trainer's own entries
FORMAT_KEY, FORMAT = "format", "llmcarve-checkpoint/1"
STEP_KEY, HASH_KEY, OPTIMIZERS_KEY = "step", "config_hash", "optimizers"
RESERVED_KEYS = (FORMAT_KEY, STEP_KEY, HASH_KEY, OPTIMIZERS_KEY)
OPTIMIZER_PREFIX = "optimizer."

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """A loss part became NaN or inf; training stops and keeps the last good checkpoint."""


class CheckpointMismatchError(UserError, RuntimeError):
    """The checkpoint in a run's directory was written by another run (config, data) or format."""


# ------------------------------------------------------------------------------------------------
# randomness as a function of (seed, step)


def step_seed(seed: int, step: int) -> int:
    """The seed of everything random in step `step` (noise, dropout); a prime keeps runs of nearby seeds apart."""
    return seed * 1_000_003 + step


def noise_generator(device: torch.device, seed: int, step: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(step_seed(seed, step))


def batch_for_step(num_blocks: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Indices of the blocks step `step` trains on: epochs of seeded permutations, no state needed."""
    first = step * batch_size
    indices = []
    for position in range(first, first + batch_size):
        epoch, offset = divmod(position, num_blocks)
        order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        indices.append(order[offset])
    return torch.stack(indices)


# ------------------------------------------------------------------------------------------------
# the NaN stop


def check_finite(values: Mapping[str, torch.Tensor | float], step: int, advice: str = "lower the learning rate or check the data") -> None:
    """Raise NonFiniteLossError naming the first NaN or inf value; call it before the step's checkpoint."""
    for name, value in values.items():
        tensor = torch.as_tensor(value)
        if not torch.isfinite(tensor).all():
            shown = tensor.item() if tensor.numel() == 1 else f"not finite in {int((~torch.isfinite(tensor)).sum())} of {tensor.numel()} elements"
            raise NonFiniteLossError(
                f"'{name}' is {shown} at step {step}; training stopped, the last good checkpoint is kept "
                f"and no model is written ({advice})"
            )


# ------------------------------------------------------------------------------------------------
# checkpoints


@dataclass
class Checkpoint:
    """What `save_checkpoint` was given, back from the file."""

    path: Path
    step: int  # steps done: training resumes at this step
    tensors: dict[str, torch.Tensor]  # the trainer's own tensors, on the CPU
    optimizers: dict[str, dict]  # label -> {"state": ...}: see `optimizer`
    metadata: dict[str, Any]  # the trainer's JSON values

    def optimizer(self, label: str) -> dict:
        """The saved state of the optimizer saved under `label`, for `restore_optimizer`."""
        if label not in self.optimizers:
            raise KeyError(f"checkpoint {self.path} holds no state for an optimizer '{label}' (it holds {sorted(self.optimizers)})")
        return self.optimizers[label]


def run_fingerprint(config: Any, *data: torch.Tensor) -> str:
    """A hash of what decides a run's numbers: its config (a dataclass) and its training data.

    Recorded in every checkpoint, so that a directory reused for another config or other data is refused
    instead of silently resumed.
    """
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(config), sort_keys=True).encode())
    for tensor in data:
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{tuple(tensor.shape)}{tensor.dtype}".encode())  # same bytes, other shape: other data
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())  # as bytes: numpy has no bfloat16
    return digest.hexdigest()


def checkpoint_due(done: int, every: int, steps: int) -> bool:
    """Whether to save after `done` steps: every `every` steps and after the last one."""
    return done % every == 0 or done == steps


def save_checkpoint(
    directory: Path,
    step: int,
    tensors: Mapping[str, torch.Tensor],
    optimizers: Mapping[str, dict],
    metadata: Mapping[str, Any],
    config_hash: str | None,
) -> Path:
    """Write the checkpoint of `step` steps done; returns its path.

    `optimizers` maps a label to an optimizer's `state_dict()`. Only its per-parameter state is kept: the
    hyperparameters (param_groups) come from the config, which `config_hash` pins. `config_hash=None`
    writes a checkpoint any run may start from (a warm start from given weights).
    """
    clashes = sorted(set(metadata) & set(RESERVED_KEYS))
    if clashes:
        raise ValueError(f"checkpoint metadata keys {clashes} are reserved for the checkpoint itself; rename them")
    flat = {name: value.detach().cpu().contiguous() for name, value in tensors.items()}
    if any(name.startswith(OPTIMIZER_PREFIX) for name in flat):
        raise ValueError(f"tensor names starting with '{OPTIMIZER_PREFIX}' are reserved for optimizer state; rename them")
    for label, state_dict in optimizers.items():
        if "." in label:
            raise ValueError(f"optimizer label '{label}' contains '.'; use a plain word such as 'lora'")
        flat |= _optimizer_tensors(label, state_dict)
    header = {FORMAT_KEY: FORMAT, STEP_KEY: str(step), OPTIMIZERS_KEY: json.dumps(list(optimizers))}
    if config_hash is not None:
        header[HASH_KEY] = config_hash
    directory.mkdir(parents=True, exist_ok=True)
    path, staging = directory / CHECKPOINT, directory / f".{CHECKPOINT}.tmp"
    save_file(flat, staging, metadata=header | {key: json.dumps(value) for key, value in metadata.items()})
    with open(staging, "rb") as handle:
        os.fsync(handle.fileno())  # on disk before the rename, so a crash cannot leave a renamed empty file
    staging.replace(path)  # atomic: a kill mid-write leaves the previous checkpoint
    return path


def load_checkpoint(directory: Path, config_hash: str | None, logger: logging.Logger = log) -> Checkpoint | None:
    """The checkpoint in `directory`, or None if it holds none; logs where training resumes.

    Raises CheckpointMismatchError when the checkpoint records another config hash than `config_hash`
    (or was written in an older format). A checkpoint saved with `config_hash=None` is accepted.
    """
    path = directory / CHECKPOINT
    if not path.exists():
        return None
    with safe_open(path, "pt") as handle:
        header = dict(handle.metadata() or {})
    _check_belongs_to_run(path, header, config_hash, logger)
    tensors = load_file(path)
    step = int(header[STEP_KEY])
    labels = json.loads(header[OPTIMIZERS_KEY])
    optimizers = {label: {"state": _optimizer_state(label, tensors)} for label in labels}
    own = {name: value for name, value in tensors.items() if not name.startswith(OPTIMIZER_PREFIX)}
    metadata = {key: json.loads(value) for key, value in header.items() if key not in RESERVED_KEYS}
    logger.info("resumed from checkpoint %s at step %s", path, step)
    return Checkpoint(path, step, own, optimizers, metadata)


def restore_optimizer(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Load a checkpoint's optimizer state, keeping the optimizer's own hyperparameters (from the config)."""
    optimizer.load_state_dict({"state": saved["state"], "param_groups": optimizer.state_dict()["param_groups"]})


def _check_belongs_to_run(path: Path, header: dict[str, str], expected: str | None, logger: logging.Logger) -> None:
    start_over = f"delete {path.parent} to train this run from step 0, or give it a checkpoint directory of its own"
    if header.get(FORMAT_KEY) != FORMAT:
        written = f"in format {header[FORMAT_KEY]}" if FORMAT_KEY in header else "by an earlier llmcarve"
        raise CheckpointMismatchError(f"checkpoint {path} was written {written}; this version reads {FORMAT}: {start_over}")
    recorded = header.get(HASH_KEY)
    if recorded is None:
        logger.warning("checkpoint %s records no config hash: starting from it without checking it belongs to this run", path)
    elif recorded != expected:
        raise CheckpointMismatchError(
            f"checkpoint {path} was written by another run (config hash {recorded}; this run's is {expected}): "
            f"resuming it would mix two configurations or data sets; {start_over}"
        )


def _optimizer_tensors(label: str, state_dict: dict) -> dict[str, torch.Tensor]:
    """`optimizer.<label>.<parameter index>.<name>` for every per-parameter state value."""
    return {
        f"{OPTIMIZER_PREFIX}{label}.{index}.{name}": torch.as_tensor(value).detach().cpu().contiguous()
        for index, state in state_dict["state"].items()
        for name, value in state.items()
    }


def _optimizer_state(label: str, tensors: dict[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    prefix = f"{OPTIMIZER_PREFIX}{label}."
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix):
            index, name = key.removeprefix(prefix).split(".", 1)
            state.setdefault(int(index), {})[name] = value
    return state
