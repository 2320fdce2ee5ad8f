"""Trainer config fields that carry their own help text and bounds.

A method's trainer config is a frozen dataclass whose fields are declared with `option(...)`. That one
declaration is the trainer's argument, the params.yaml schema (llmcarve.params builds each method's
pydantic section from these fields: type, default, help as the description, bounds) and the command
line's options, so a default, a bound or a help text is written once.

Standard library only: the trainers import this on GPU hosts that have no pydantic.
"""

from __future__ import annotations

import dataclasses
from typing import Any

BOUNDS = ("gt", "ge", "lt", "le")


def option(
    default: Any,
    help: str,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
) -> Any:
    """A dataclass field with a default, a help text and optional bounds (checked when params are validated)."""
    given = {"gt": gt, "ge": ge, "lt": lt, "le": le}
    return dataclasses.field(
        default=default, metadata={"help": help, "bounds": {k: v for k, v in given.items() if v is not None}}
    )


def help_of(config_field: dataclasses.Field) -> str:
    """The field's help text; a config field declared without one is a bug, reported with its name."""
    if "help" not in config_field.metadata:
        raise TypeError(f"config field '{config_field.name}' has no help text: declare it with option(default, help)")
    return config_field.metadata["help"]


def bounds_of(config_field: dataclasses.Field) -> dict[str, float]:
    """{'gt'|'ge'|'lt'|'le': value} of the field (empty when unbounded)."""
    return dict(config_field.metadata.get("bounds", {}))
