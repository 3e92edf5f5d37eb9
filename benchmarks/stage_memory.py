"""Resident memory of one prune at each stage's entry and exit and around each layer walk (VmRSS, Linux), to find
what stays resident between stages.

    HYWIA_DATA_DIR=../shared/data python benchmarks/stage_memory.py --model smollm2-135m --ratio 0.2
    HYWIA_DATA_DIR=../shared/data python benchmarks/stage_memory.py --model qwen2.5-coder-0.5b --ratio 0.5 --stop-after score

Prints one line per event; run it alone on the machine. Figures in docs/RESULTS.md name the commit they ran at.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import hywia  # noqa: E402
from hywia import costs, walk  # noqa: E402


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--data-dir", default=os.environ.get("HYWIA_DATA_DIR", "../shared/data"))
    parser.add_argument("--stop-after", default=None, help="end the prune once this stage has exited (e.g. score)")
    args = parser.parse_args()
    stage = costs.Costs.stage

    @contextlib.contextmanager
    def traced(self, name):
        print(f"{name}: enter {rss_mb():.0f} MB", flush=True)
        with stage(self, name):
            yield
        print(f"{name}: exit {rss_mb():.0f} MB (stage peak {self.stages[name]['peak_rss_mb']} MB)", flush=True)
        if name == args.stop_after:
            raise SystemExit(0)

    walk_layers = walk.walk_layers

    def walked(*a, **k):
        print(f"  walk {k.get('desc')}: enter {rss_mb():.0f} MB", flush=True)
        walk_layers(*a, **k)
        print(f"  walk {k.get('desc')}: exit {rss_mb():.0f} MB", flush=True)

    costs.Costs.stage = traced
    for module in ("hywia.reconstruct", "hywia.importance", "hywia.walk"):
        sys.modules[module].walk_layers = walked
    model, tokenizer = hywia.load_model(args.model, "float32", "cpu")
    print(f"loaded: {rss_mb():.0f} MB", flush=True)
    _, report = hywia.prune(model, tokenizer, ratio=args.ratio, data_dir=args.data_dir)
    print(f"done: {rss_mb():.0f} MB, prune peak {report.peak_rss_mb:.0f} MB", flush=True)


if __name__ == "__main__":
    main()
