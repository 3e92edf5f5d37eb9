"""Resident memory of one prune at each stage's entry and exit and around each layer walk (VmRSS, Linux), to find
what stays resident between stages.

    HYWIA_DATA_DIR=../shared/data python benchmarks/stage_memory.py --model smollm2-135m --ratio 0.2
    HYWIA_DATA_DIR=../shared/data python benchmarks/stage_memory.py --model qwen2.5-coder-0.5b --ratio 0.5 --stop-after score
    # where inside each stage its peak falls: RSS and the prune's innermost frames sampled every 0.1 s
    HYWIA_DATA_DIR=../shared/data python benchmarks/stage_memory.py --sample 0.1 -- --stats-store groups

Prints one line per event; run it alone on the machine. Figures in docs/RESULTS.md name the commit they ran at.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import hywia  # noqa: E402
from hywia import costs, walk  # noqa: E402
from hywia.cli import _parser  # noqa: E402


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Sampler(threading.Thread):
    """The resident set and the main thread's hywia frames every `every` seconds; `take()` returns the highest sample
    since the last call, so a stage's peak can be placed in the code that held it (a sample costs the prune some time)."""

    def __init__(self, every: float):
        super().__init__(daemon=True)
        self.every, self.main = every, threading.main_thread().ident
        self.peak: tuple[float, list[str]] = (0.0, [])

    def run(self) -> None:
        while True:
            frame = sys._current_frames().get(self.main)
            stack = [f"{Path(f.filename).name}:{f.name}:{f.lineno}" for f in traceback.extract_stack(frame)
                     if "hywia" in f.filename] if frame is not None else []
            del frame  # a frame held through the sleep keeps its locals, tensors too, alive past their function's end
            rss = rss_mb()
            if rss > self.peak[0]:
                self.peak = (rss, stack)
            time.sleep(self.every)

    def take(self) -> tuple[float, list[str]]:
        peak, self.peak = self.peak, (0.0, [])
        return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--data-dir", default=os.environ.get("HYWIA_DATA_DIR", "../shared/data"))
    parser.add_argument("--stop-after", default=None, help="end the prune once this stage has exited (e.g. score)")
    parser.add_argument("--sample", type=float, default=None, help="also sample RSS and the stack every this many seconds")
    parser.add_argument("options", nargs="*", help="`hywia prune` flags after --, e.g. -- --stats-store groups")
    args = parser.parse_args()
    stage = costs.Costs.stage
    sampler = Sampler(args.sample) if args.sample else None

    @contextlib.contextmanager
    def traced(self, name):
        print(f"{name}: enter {rss_mb():.0f} MB", flush=True)
        if sampler is not None:
            sampler.take()
        with stage(self, name):
            yield
        print(f"{name}: exit {rss_mb():.0f} MB (stage peak {self.stages[name]['peak_rss_mb']} MB)", flush=True)
        if sampler is not None:
            rss, stack = sampler.take()
            print(f"  highest sample {rss:.0f} MB in {' > '.join(stack[-4:])}", flush=True)
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
    # the flags read as `hywia prune` reads them (--out is required there, unused here)
    recipe = hywia.Recipe.from_args(_parser().parse_args(["prune", "--ratio", str(args.ratio), "--out", "-", *args.options]))
    model, tokenizer = hywia.load_model(args.model, "float32", "cpu")
    print(f"loaded: {rss_mb():.0f} MB", flush=True)
    if sampler is not None:
        sampler.start()
    _, report = hywia.prune(model, tokenizer, recipe, data_dir=args.data_dir)
    print(f"done: {rss_mb():.0f} MB, prune peak {report.peak_rss_mb:.0f} MB", flush=True)


if __name__ == "__main__":
    main()
