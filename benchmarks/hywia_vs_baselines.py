"""HyWIA against its baselines on the packaged SmolLM2-135M (issue 3's RESULTS table).

    HYWIA_DATA_DIR=../shared/data python benchmarks/hywia_vs_baselines.py

Rows: hywia (attention fusion, seeds 0, 1, 2), hywia --fusion fixed --alpha 0.5, element1, element2, vector, l2,
random; at 20% and 50%; calibrated on 10 and 50 random 128-token windows of the WikiText-2 validation split
(the train split is not available offline; the test split is never seen before evaluation). l2 and random use
no calibration data, so they run once per ratio. Evaluation: WikiText-2 and PTB test, first 100 windows of 128.
Shares benchmarks/results/smollm2.jsonl with criteria.py, so rows measured there are not run again.
"""
import argparse
import os
from pathlib import Path

from hywia.bench import Row, markdown_table, run_grid


def rows(model: str) -> list[Row]:
    grid = [Row(model, "dense", 0.0)]
    for ratio in (0.2, 0.5):
        grid += [Row(model, "l2", ratio), Row(model, "random", ratio)]
        for samples in (10, 50):
            grid += [Row(model, "hywia", ratio, seed=s, samples=samples) for s in (0, 1, 2)]
            grid += [Row(model, "hywia", ratio, samples=samples, extra=("--fusion", "fixed", "--alpha", "0.5"))]
            grid += [Row(model, m, ratio, samples=samples) for m in ("element2", "element1", "vector")]
    return grid


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=os.environ.get("HYWIA_DATA_DIR", "../shared/data"))
    parser.add_argument("--max-windows", type=int, default=100)
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results" / "smollm2.jsonl")
    args = parser.parse_args()
    data = ["wikitext2", "ptb"]
    records = run_grid(rows(args.model), args.results, data, args.data_dir, max_windows=args.max_windows)
    print(markdown_table(records, data))
