"""Where a job computes: the one reading of a `device` setting (params.yaml's `<stage>.device`, the CLI's
`--device`), checked before any model is loaded."""

from __future__ import annotations

import torch

from llmcarve.errors import UserInputError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(choice: str, key: str) -> torch.device:
    """'auto' is CUDA when a CUDA device is visible, else the CPU; 'cpu' and 'cuda' are taken as asked.

    `key` names the setting in the error (e.g. `tomoe.device`, `--device`): asking for CUDA on a machine
    without it fails here, before any compute, rather than deep inside the first `.to("cuda")`.
    """
    if choice not in DEVICE_CHOICES:
        raise UserInputError(f"{key} is {choice!r}; allowed: {', '.join(DEVICE_CHOICES)}")
    cuda = torch.cuda.is_available()
    if choice == "cuda" and not cuda:
        raise UserInputError(f"{key} is 'cuda' but no CUDA device is visible on this machine; set {key} to 'auto' or 'cpu'")
    return torch.device("cuda" if choice in ("auto", "cuda") and cuda else "cpu")
