"""Time of one greedy OBS selection (`hywia.reconstruct.obs_order`, with the dampened inverse it reads) on a random MLP
reader of a given width, the step that dominates SlimGPT's and the default's prune time above 0.5B parameters, and of
the refit of the kept columns two ways: solved on H_KK (`refit`) and from the selection's inverse (`obs_refit`).

    python benchmarks/obs_cost.py --width 4864 --out 896 --count 2400      # Qwen2.5-0.5B's down projection at 50%
    PYTHONPATH=OTHER/src python benchmarks/obs_cost.py ...                  # the same for another checkout's code
"""
from __future__ import annotations

import argparse
import time
import types

import torch

from hywia.grouping import Part
from hywia.reconstruct import damped_inverse, kept_columns, obs_order, obs_refit, refit


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=4864, help="input columns of the reader (MLP channels)")
    p.add_argument("--out", type=int, default=896, help="output rows of the reader (the hidden size)")
    p.add_argument("--count", type=int, default=2400, help="channels to remove")
    p.add_argument("--tokens", type=int, default=6000, help="calibration tokens behind the Hessian")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.tokens, args.width) * torch.rand(args.width) * 3
    hessian, weight = (x.T @ x).double(), torch.randn(args.out, args.width)
    reader = Part("reader", torch.nn.Linear(args.width, args.out, bias=False), 1, 1)
    groups = types.SimpleNamespace(reader=reader, count=args.width, blocks=1, kind="mlp", layer=0)
    total = x.sum(0).double()
    seconds: dict[str, list[float]] = {"inverse + obs_order": [], "refit (solve)": [], "obs_refit (from the inverse)": []}
    for _ in range(args.repeats):
        start = time.perf_counter()
        inverse = damped_inverse(hessian)
        gone = obs_order(groups, weight, inverse, args.count)
        seconds["inverse + obs_order"].append(time.perf_counter() - start)
        keep = kept_columns(groups, gone, args.width)
        for name, fit in (("refit (solve)", lambda: refit(weight, hessian, keep, total, args.tokens)),
                          ("obs_refit (from the inverse)", lambda: obs_refit(weight, inverse, keep, total, args.tokens))):
            start = time.perf_counter()
            fit()
            seconds[name].append(time.perf_counter() - start)
    print(f"width {args.width} out {args.out} count {args.count}, {args.threads} thread(s):")
    for name, values in seconds.items():
        print(f"  {name}: " + ", ".join(f"{s:.1f}" for s in values) + " s")


if __name__ == "__main__":
    main()
