"""Seconds and peak memory of each stage of a run, recorded in hywia.json (`extra.stages`; `peak_rss_mb` in MiB,
2^20 bytes, as Linux counts it).

A process's peak resident memory only grows, so a stage's own peak needs the peak reset at its start: Linux does
that when "5" is written to /proc/self/clear_refs (the high-water mark VmHWM drops to the current RSS). Where that
is not possible, each stage records the process's peak so far, and says so (`rss: "cumulative"`). On CUDA the
allocator's peak is reset per stage as well.
"""
from __future__ import annotations

import ctypes
import gc
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def _hwm_mb() -> float:
    """The process's peak RSS since the last reset (VmHWM), or since it started (ru_maxrss) where /proc lacks it."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_hwm() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def release_memory() -> None:
    """Hand memory Python has freed back to the OS: glibc keeps freed blocks below its mmap threshold for reuse, so
    without a trim the statistics freed after scoring would still count in every later stage's resident set."""
    gc.collect()
    trim_heap()


def trim_heap() -> None:
    """glibc's malloc_trim alone (no garbage collection: cheap enough to call once per layer or group set): freed
    temporaries below glibc's mmap threshold (up to 32 MB, one MLP weight of a 0.5B model) otherwise stay resident,
    fragmented, and a loop over layers grows the resident set by gigabytes it no longer uses."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim, or no way to ask
        pass


class Costs:
    """`with costs.stage("score"): ...` records the block's seconds and peak RSS (and CUDA peak) under its name."""

    def __init__(self) -> None:
        self.peak_mb = round(_hwm_mb(), 1)  # what the process reached before the first stage (loading the model)
        self.stages: dict[str, dict] = {"before": {"peak_rss_mb": self.peak_mb}}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        release_memory()  # what the last stage freed is not this one's: hand it back before the peak is reset
        self.peak_mb = max(self.peak_mb, _hwm_mb())
        reset = _reset_hwm()
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            yield
        finally:
            record = {"seconds": round(time.perf_counter() - start, 3), "peak_rss_mb": round(_hwm_mb(), 1)}
            if not reset:
                record["rss"] = "cumulative"
            if cuda:
                record["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            self.peak_mb = max(self.peak_mb, record["peak_rss_mb"])
            self.stages[name] = record
