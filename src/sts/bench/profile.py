"""Where a decode round's time goes, kernel by kernel: ``sts bench e2e --profile`` (issue 14, item 2).

:func:`kernel_times` runs a callable (one :meth:`~sts.engine.Engine.generate` call whose CUDA
graphs are already captured) under :mod:`torch.profiler` and returns each kernel's launches and
device time, largest first. CUPTI reports the kernels inside CUDA graph replays one by one, so a
graphed round is broken down as an eager one would be. On the CPU (tests) the operators' own CPU
time stands in for kernel time.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from sts.decoding import synchronize


def kernel_times(run: Callable[[], Any], device: torch.device, top: int = 30) -> tuple[Any, list[dict[str, Any]]]:
    """Return (``run()``'s result, its ``top`` kernels by total time), each ``{"name", "calls", "us", "share"}``.

    ``us``: microseconds of device time over all launches (CPU: the operator's self CPU time);
    ``share``: of the summed time of every kernel of the run (the rows returned may sum to less).
    """
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        result = run()
        synchronize(device)
    rows = []
    for event in prof.key_averages():
        if cuda and event.device_type != DeviceType.CUDA:
            continue
        us = event.self_device_time_total if cuda else event.self_cpu_time_total
        if us > 0:
            rows.append({"name": event.key, "calls": event.count, "us": round(us, 1)})
    total = sum(r["us"] for r in rows) or 1.0
    rows.sort(key=lambda r: -r["us"])
    return result, [{**r, "share": round(r["us"] / total, 4)} for r in rows[:top]]
