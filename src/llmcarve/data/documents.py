"""The unit of text every source produces."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Document:
    """One text, the source it came from, and the group it must stay with.

    `group` names the unit that must never be split across train and heldout (a license, a
    Wikipedia article, an ICD chapter). Left empty, it defaults to the SHA-1 of the text, so every
    distinct text is its own group.
    """

    text: str
    source: str
    group: str = ""

    def __post_init__(self) -> None:
        if not self.group:
            # Frozen dataclasses only allow filling a derived field through object.__setattr__.
            object.__setattr__(self, "group", text_group(self.text))


def text_group(text: str) -> str:
    """The default group of a text: its SHA-1, so equal texts always share a group."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()
