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


# The runtime and driver calls that launch a kernel, as the profiler names them.
LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


def profile_totals(events) -> tuple[float, int]:
    """(GPU kernel milliseconds, kernel launches) in a profiler's key_averages(). Only device-side
    events count toward the time: an operator's own device time repeats its kernels' time."""
    kernel_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    launches = sum(e.count for e in events if e.key in LAUNCH_CALLS)
    return kernel_us / 1e3, launches
