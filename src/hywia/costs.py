"""Seconds and peak memory of each stage of a run, recorded in hywia.json (`extra.stages`; `peak_rss_mb` in MiB,
2^20 bytes, as Linux counts it).

A process's peak resident memory only grows, so a stage's own peak needs the peak reset at its start: Linux does
that when "5" is written to /proc/self/clear_refs (the high-water mark VmHWM drops to the current RSS). Where that
is not possible, each stage records the process's peak so far, and says so (`rss: "cumulative"`). On CUDA the
allocator's peak is reset per stage as well.

It also holds what a run does to keep those peaks down: hand freed memory back to the OS (`release_memory`
between stages, `HeapTrimmer` within a loop that frees as it goes), and own
the weights it will replace (`own_weights`). transformers maps a safetensors checkpoint into memory and hands out
tensors that are views of the mapping; once read, a page stays resident for as long as any tensor of the file lives,
and the embedding and the norms, never pruned, live as long as the model. A Linear that removal replaces by a smaller
one would keep its dense weights resident as mapped pages beside the pruned ones (hywia.removal releases the replaced
module's tensors, which frees only memory the process owns). So a prune first copies each mapped tensor into memory
of its own, a chunk at a time, and tells the kernel it may drop the chunk's mapped pages (`madvise(MADV_DONTNEED)`:
an unmodified private mapping of a file reads the file again if touched), never holding a tensor twice on the way.
With both, the default's build stage on SmolLM2-135M fell from 1.96 to 1.56 GB (docs/RESULTS.md, "Where a prune's
memory goes").
"""
from __future__ import annotations

import ctypes
import functools
import gc
import mmap
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

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


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library, loaded once: each `ctypes.CDLL` is a class with reference cycles, garbage that only a full
    collection frees, and a full collection of a loaded model's process takes a quarter of a second."""
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def trim_heap() -> None:
    """glibc's malloc_trim alone (no garbage collection: cheap enough to call once per layer or group set): freed
    temporaries below glibc's mmap threshold (up to 32 MB, one MLP weight of a 0.5B model) otherwise stay resident,
    fragmented, and a loop over layers grows the resident set by gigabytes it no longer uses."""
    trim = getattr(_libc(), "malloc_trim", None)  # not glibc: nothing to trim, or no way to ask
    if trim is not None:
        trim(0)


_STATM = Path("/proc/self/statm")


def _rss_bytes() -> int | None:
    """The resident set now (/proc/self/statm: a read of one short line, cheap enough for every weight's gradient)."""
    try:
        return int(_STATM.read_text().split()[1]) * mmap.PAGESIZE
    except (OSError, IndexError, ValueError):
        return None


GRADIENT_TRIM_BUDGET = 128 * 2**20


class HeapTrimmer:
    """Called after each freed temporary: trims the heap once the resident set has grown by `budget` bytes since the
    last trim. The gradient passes free each weight's gradient and its products with the weight (1-4 MiB each at
    135M, 17 MiB at 0.5B) once a sample; glibc keeps them in its heap, fragmented, and the calibrate stage's peak
    stood 0.7 GiB above the process before it at 135M, 2.2 GiB at 0.5B. Trimmed on 128 MiB of growth it stands 0.4
    and 0.8 GiB above, for 6 and 32 s more gradient passes (docs/RESULTS.md, "Where a prune's memory goes"); a larger
    budget trims less often and saves less, a trim after every weight costs more (each trimmed page is faulted in
    again when reused). No-op where /proc is missing."""

    def __init__(self, budget: int | None = None) -> None:
        self.budget = GRADIENT_TRIM_BUDGET if budget is None else budget
        self.base = _rss_bytes()

    def __call__(self) -> None:
        if self.base is None:
            return
        rss = _rss_bytes()
        if rss is not None and rss > self.base + self.budget:
            trim_heap()
            self.base = _rss_bytes()


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


_MADV_DONTNEED = 4  # Linux's value on every architecture torch ships for


def file_backed_ranges() -> list[tuple[int, int]]:
    """Address ranges [start, end) this process maps from files (Linux /proc/self/maps; empty elsewhere)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):
            start, end = (int(a, 16) for a in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def mapped(tensor: torch.Tensor, ranges: list[tuple[int, int]]) -> bool:
    """Whether `tensor`'s memory lies in one of `ranges` (a view of a mapped file)."""
    if tensor.device.type != "cpu" or tensor.numel() == 0:
        return False
    address = tensor.data_ptr()
    return any(start <= address < end for start, end in ranges)


def _drop_pages(tensor: torch.Tensor) -> None:
    """Let the kernel drop the whole pages inside contiguous `tensor`'s memory from this process's resident set."""
    if not tensor.is_contiguous():
        return  # its span is not its size; its pages go with the mapping
    page = mmap.PAGESIZE
    first = -(-tensor.data_ptr() // page) * page
    last = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // page * page
    libc = _libc()
    if last > first and libc is not None:
        libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)


def owned_copy(tensor: torch.Tensor, chunk_bytes: int = 16 * 2**20) -> torch.Tensor:
    """A copy of mapped `tensor` in the process's own memory, made `chunk_bytes` of rows at a time with each chunk's
    mapped pages dropped once copied: the copy never holds a whole tensor twice (Gemma 3's embedding is 0.67 GB)."""
    copy = torch.empty_like(tensor, memory_format=torch.contiguous_format)
    if not tensor.is_contiguous() or tensor.dim() == 0:
        return copy.copy_(tensor)
    step = max(1, chunk_bytes // max(1, tensor[0].numel() * tensor.element_size()))
    for start in range(0, len(tensor), step):
        copy[start:start + step].copy_(tensor[start:start + step])
        _drop_pages(tensor[start:start + step])
    _drop_pages(tensor)  # the pages chunks shared
    return copy


def own_weights(model: nn.Module) -> int:
    """Copy every parameter and buffer of `model` that is a view of a mapped file into the process's own memory;
    returns how many tensors it copied (none off Linux, where it does nothing). Tensors that are views of the same
    memory get one copy between them, so weights tied that way stay tied."""
    if not sys.platform.startswith("linux"):
        return 0
    ranges = file_backed_ranges()
    copies: dict[tuple, torch.Tensor] = {}
    seen: set[int] = set()
    for module in model.modules():
        for tensors in (module._parameters, module._buffers):
            for tensor in tensors.values():
                if tensor is None or id(tensor) in seen or not mapped(tensor, ranges):
                    continue
                seen.add(id(tensor))
                key = (tensor.data_ptr(), tensor.shape, tensor.stride(), tensor.dtype)
                if key not in copies:
                    copies[key] = owned_copy(tensor.data)
                tensor.data = copies[key]  # a Parameter keeps its identity: tied weights stay tied
    return len(seen)
