"""GPU timing shared by the bench scripts (imported as `timing`: a script's own folder is on sys.path)."""

from __future__ import annotations

import torch


def cuda_event_ms(fn, repeats: int) -> list[float]:
    """Milliseconds of each of `repeats` calls of `fn`, between CUDA events (device time, not host)."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times
