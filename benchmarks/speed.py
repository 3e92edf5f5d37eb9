"""Speed and size of SmolLM2-135M dense and pruned at 20% and 50%, with and without MLP widths rounded to 64.

    HYWIA_DATA_DIR=../shared/data python benchmarks/speed.py [--pause-group PGID]

Prunes (once, kept in runs/speed/) Element2 models at 20% and 50% with `--round-to 1` and `--round-to 64` (every
layer-scope criterion gives the same widths at a ratio, so the method does not matter for speed), then runs
`hywia bench speed` over all five models in one process: batch 1 and 8, a 128-token prompt, 64 new tokens, median
of `--repeats` runs (3) after a warm-up, float32. The table and the raw rows go to benchmarks/results/speed.jsonl.

`--pause-group PGID` SIGSTOPs another process group (say, a running grid and its children) while measuring and
resumes it afterwards, so the figures are taken on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from hywia.bench import _hywia, machine  # noqa: E402


@contextlib.contextmanager
def paused(group: int | None):
    if group is not None:
        os.killpg(group, signal.SIGSTOP)
    try:
        yield
    finally:
        if group is not None:
            os.killpg(group, signal.SIGCONT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=os.environ.get("HYWIA_DATA_DIR", "../shared/data"))
    parser.add_argument("--work", type=Path, default=Path("runs") / "speed")
    parser.add_argument("--pause-group", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results" / "speed.jsonl")
    args = parser.parse_args()
    models = [args.model]
    for ratio in ("0.2", "0.5"):
        for multiple in ("1", "64"):
            out = args.work / f"element2-{ratio}-round{multiple}"
            if not out.is_dir():
                _hywia("prune", "--model", args.model, "--method", "element2", "--ratio", ratio, "--round-to", multiple,
                       "--data-dir", args.data_dir, "--out", str(out))
            models.append(str(out))
    with paused(args.pause_group):
        rows = _hywia("bench", "speed", "--model", *models, "--batch-sizes", "1,8", "--repeats", str(args.repeats))["speed"]
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with args.results.open("a") as f:
        for row in rows:
            f.write(json.dumps({**row, "machine": machine()}) + "\n")
    from hywia.speed import markdown
    print(markdown(rows))


if __name__ == "__main__":
    main()
