"""Seconds of one matrix product of a model's shape in float32, bfloat16 and float16 on this CPU, and whether PyTorch
runs each half type natively here (`hywia.io.native_half`, oneDNN's check for AVX-512 or AMX): the measurement behind
the warning hywia gives when it loads a half-precision model onto a CPU that emulates that type.

    python benchmarks/half_speed.py                                 # SmolLM2-135M's up projection on 128 tokens
    python benchmarks/half_speed.py --tokens 512 --inner 896 --outer 4864 --threads 2   # Qwen2.5-0.5B's, two threads
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from hywia.bench import cpu_name
from hywia.io import native_half


def seconds(a: torch.Tensor, b: torch.Tensor, repeats: int) -> float:
    """The median of `repeats` timed products, after two untimed ones."""
    for _ in range(2):
        a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=128, help="rows of the activations")
    p.add_argument("--inner", type=int, default=576, help="the hidden size the product sums over")
    p.add_argument("--outer", type=int, default=1536, help="output columns (the MLP width)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    a, b = torch.randn(args.tokens, args.inner), torch.randn(args.inner, args.outer)
    row = {"cpu": cpu_name(), "capability": torch.backends.cpu.get_cpu_capability(), "threads": args.threads,
           "shape": [args.tokens, args.inner, args.outer], "torch": torch.__version__}
    base = seconds(a, b, args.repeats)
    row["float32_ms"] = 1e3 * base
    for dtype in (torch.bfloat16, torch.float16):
        name = str(dtype).removeprefix("torch.")
        took = seconds(a.to(dtype), b.to(dtype), args.repeats)
        row[f"{name}_ms"], row[f"{name}_x_float32"], row[f"{name}_native"] = 1e3 * took, took / base, native_half(dtype)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
