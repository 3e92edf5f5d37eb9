"""Speed and size of dense and pruned models, measured side by side in one process.

For each model and batch size the same prompt (`prompt_len` token ids, seeded) is run through:
- prefill: one forward pass over the prompt; throughput = batch * prompt_len / time;
- decode: `new_tokens` greedy tokens with the KV cache (`generate` with min = max new tokens, so every run decodes
  the same count). The first token comes from the prefill's logits, so generating N tokens is the prefill plus N - 1
  single-token steps: decode time = generate time - prefill time; latency per token = decode time / (N - 1);
  throughput = batch * (N - 1) / decode time (hence N >= 2).
Each figure is the median of `repeats` runs after one warm-up run, and the first model is measured once untimed
before anything is timed (a cold first model reads 20-30% slow on the development machine). Peak memory is the device's peak allocation on
CUDA, and on CPU the process's peak resident set (Linux VmHWM, reset before each model), weights included.
A pruned model's speedup is dense time / pruned time, shown against the ideal 1 / (1 - fraction of parameters
removed), the speedup if time were proportional to parameters.
"""
from __future__ import annotations

import gc
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import HywiaError
from .options import check_values


@dataclass(frozen=True)
class SpeedRow:
    model: str
    params: int
    file_mb: float | None
    batch_size: int
    prompt_len: int
    new_tokens: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    ms_per_token: float
    peak_memory_mb: float
    device: str
    dtype: str

    def as_dict(self) -> dict:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def file_mb(name: str) -> float | None:
    """Size of a model directory's weight files on disk (None for a packaged or hub model)."""
    path = Path(name).expanduser()
    if not path.is_dir():
        return None
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


@torch.no_grad()
def measure(model, name: str, batch_size: int, prompt_len: int = 128, new_tokens: int = 64, repeats: int = 3,
            seed: int = 0) -> SpeedRow:
    """Prefill and decode speed of `model` on a seeded random prompt [batch_size, prompt_len]."""
    check_values(prompt_len=prompt_len, new_tokens=new_tokens, repeats=repeats)
    if batch_size < 1:
        raise HywiaError("--batch-sizes must be positive")
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().weight.shape[0]
    prompt = torch.randint(0, vocab, (batch_size, prompt_len), generator=torch.Generator().manual_seed(seed)).to(device)
    mask = torch.ones_like(prompt)
    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    model.eval()
    _reset_peak(device)
    prefill, generate = [], []
    for i in range(repeats + 1):  # the first run warms up allocators and kernels
        p = _timed(lambda: model(input_ids=prompt, attention_mask=mask, use_cache=True), device)
        g = _timed(lambda: model.generate(input_ids=prompt, attention_mask=mask, **settings), device)
        if i:
            prefill.append(p)
            generate.append(g)
    p, g = statistics.median(prefill), statistics.median(generate)
    steps, decode = new_tokens - 1, g - p
    if decode <= 0:
        raise HywiaError(f"{name}: {steps} decode steps took no measurable time beyond the prefill ({g:.4f} s against {p:.4f} s); "
                         "measure more --new-tokens")
    return SpeedRow(name, sum(t.numel() for t in model.parameters()), file_mb(name), batch_size, prompt_len, new_tokens,
                    batch_size * prompt_len / p, batch_size * steps / decode, 1000 * decode / steps,
                    _peak_mb(device), str(device), str(next(model.parameters()).dtype).removeprefix("torch."))


def compare(names: list[str], batch_sizes: list[int], dtype: str = "float32", device: str = "cpu", prompt_len: int = 128,
            new_tokens: int = 64, repeats: int = 3) -> list[dict]:
    """Every model at every batch size, the first model as the reference for speedups."""
    from .io import load_model
    rows: list[dict] = []
    for position, name in enumerate(names):
        model, _ = load_model(name, dtype, device)
        if position == 0:  # the first timed model otherwise runs on a cold machine (measured: 20-30% slower)
            for batch in batch_sizes:
                measure(model, name, batch, prompt_len, new_tokens, repeats)
        for batch in batch_sizes:
            rows.append(measure(model, name, batch, prompt_len, new_tokens, repeats).as_dict())
        del model
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    reference = {r["batch_size"]: r for r in rows[:len(batch_sizes)]}
    for r in rows:
        ref = reference[r["batch_size"]]
        r["ideal_speedup"] = ref["params"] / r["params"]
        r["prefill_speedup"] = r["prefill_tokens_per_s"] / ref["prefill_tokens_per_s"]
        r["decode_speedup"] = r["decode_tokens_per_s"] / ref["decode_tokens_per_s"]
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| model | params | file MB | batch | prefill tok/s | decode tok/s | ms/token | peak MB | prefill speedup | "
             "decode speedup | ideal |", "|" + "---|" * 11]
    for r in rows:
        size = f"{r['file_mb']:.0f}" if r["file_mb"] is not None else "-"
        lines.append(f"| {r['model']} | {r['params']:,} | {size} | {r['batch_size']} | {r['prefill_tokens_per_s']:.0f} | "
                     f"{r['decode_tokens_per_s']:.1f} | {r['ms_per_token']:.1f} | {r['peak_memory_mb']:.0f} | "
                     f"{r['prefill_speedup']:.2f}x | {r['decode_speedup']:.2f}x | {r['ideal_speedup']:.2f}x |")
    return "\n".join(lines)
