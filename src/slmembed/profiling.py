"""Where a training step's time goes: torch.profiler over a window of steps, summarised per process.

``slmembed train --profile [FIRST:COUNT]`` profiles steps FIRST+1..FIRST+COUNT (default 20:10: after compilation and
warm-up) and writes into the run folder's ``profile/``, for each process r:

* ``rank{r}.json``: per step, the wall time; the host's busy time (the own time of every host operator, all
  threads); the GPU's busy time (the union of its kernels' intervals) and the time in NCCL kernels (transfers, and
  waiting for the other GPUs to arrive); host reads of the GPU (``cuda*Synchronize`` calls) in the window. A step
  whose GPU is busy for much less than its wall time is bound by the host; NCCL time is what the collectives cost.
* ``rank{r}.txt``: operators ranked by GPU time and by own host time (torch.profiler's tables).

``host_peak_gib`` is a process's peak host memory, which every run's summary records for each process.
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType

from slmembed.atomic import write_json, write_text

SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def host_peak_gib() -> float:
    """This process's peak resident set so far, in GiB (the kernel counts it in KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20


class StepProfiler:
    """Call ``after(done)`` after every step; the profiler runs while FIRST < done <= FIRST + COUNT. A context
    manager: leaving it stops the profiler (``close``)."""

    def __init__(self, folder: str | Path, first: int, count: int, rank: int, device: torch.device) -> None:
        self.folder, self.first, self.count, self.rank, self.device = Path(folder), first, count, rank, device
        self.prof, self.t0 = None, 0.0

    def after(self, done: int) -> None:
        if done == self.first:
            self._sync()
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=activities)
            self.prof.__enter__()
            self.t0 = time.perf_counter()
        elif self.prof is not None and done == self.first + self.count:
            self._sync()
            wall = time.perf_counter() - self.t0
            self.prof.__exit__(None, None, None)
            self._write(wall)
            self.prof = None

    def __enter__(self) -> StepProfiler:
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def close(self) -> None:
        """Stop profiling if the window is still open (the run failed or ended in it): nothing is written."""
        if self.prof is not None:
            self.prof.__exit__(None, None, None)
            self.prof = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _write(self, wall: float) -> None:
        events = self.prof.events()
        kernels = [e for e in events if e.device_type == DeviceType.CUDA]
        def per_step(microseconds: float) -> float:
            return round(microseconds / 1000 / self.count, 2)

        summary = {
            "steps": f"{self.first + 1}..{self.first + self.count}", "rank": self.rank,
            "wall_ms_per_step": round(wall * 1000 / self.count, 2),
            "host_busy_ms_per_step": per_step(sum(e.self_cpu_time_total for e in events
                                                  if e.device_type == DeviceType.CPU)),
            "gpu_busy_ms_per_step": per_step(busy_union(kernels)),
            "nccl_ms_per_step": per_step(busy_union([k for k in kernels if "nccl" in k.name.lower()])),
            "kernels_per_step": round(len(kernels) / self.count, 1),
            "host_syncs": sum(e.name in SYNCS for e in events),
        }
        averages = self.prof.key_averages()
        orders = [("by GPU time", "self_device_time_total")] if kernels else []
        tables = [f"{name}\n{averages.table(sort_by=key, row_limit=30, max_name_column_width=70)}"
                  for name, key in [*orders, ("by own host time", "self_cpu_time_total")]]
        write_json(self.folder / f"rank{self.rank}.json", summary)
        write_text(self.folder / f"rank{self.rank}.txt", f"{summary}\n\n" + "\n\n".join(tables))


def busy_union(events: list) -> float:
    """Microseconds covered by the events' intervals (overlaps, as on several streams, counted once)."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted((e.time_range.start, e.time_range.end) for e in events):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total
