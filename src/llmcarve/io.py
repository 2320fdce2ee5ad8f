"""Writing stage outputs so that a killed stage or a full disk never leaves a half-written artifact behind."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `target` in one rename.

    On any error the temporary directory is removed and the previous `target` is left untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Staging directories of earlier, killed runs: DVC lets one run write a stage's outputs at a time,
    # so any that exist now are orphans.
    for orphan in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(orphan, ignore_errors=True)
    staging = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)


class InsufficientDiskSpaceError(OSError):
    """Less free space than an artifact needs; raised before anything of it is written."""


def human_bytes(count: int) -> str:
    """1536 -> '1.5 KiB': sizes in messages people act on."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"


def ensure_free_space(directory: str | Path, needed_bytes: int, what: str) -> None:
    """Fail early, with the numbers, when `directory`'s filesystem cannot hold `needed_bytes` more.

    Checked before writing, because running out halfway costs the whole stage's compute and leaves a
    staging directory to clean up. `directory` need not exist yet: its nearest existing ancestor is on
    the filesystem it will be created on.
    """
    existing = Path(directory).absolute()
    while not existing.exists():
        existing = existing.parent
    available = shutil.disk_usage(existing).free
    if needed_bytes > available:
        raise InsufficientDiskSpaceError(
            f"not enough free disk space for {what} in {Path(directory).absolute()}: needs about "
            f"{human_bytes(needed_bytes)}, only {human_bytes(available)} available on the filesystem of "
            f"{existing}. Free {human_bytes(needed_bytes - available)} or more (for example old artifacts/ or "
            "the DVC cache) and run the stage again."
        )


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically (temporary file, then rename), pretty-printed for diffs in git."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    staging.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    staging.replace(path)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
