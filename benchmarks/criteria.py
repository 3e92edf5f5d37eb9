"""The six baseline criteria on the packaged SmolLM2-135M at 0%, 20% and 50% (issue 2's RESULTS table).

    HYWIA_DATA_DIR=../shared/data python benchmarks/criteria.py

Calibration: 10 random 128-token windows of the WikiText-2 validation split (offline; no train split here).
Evaluation: WikiText-2 and PTB test, 128-token windows, the first 100 of each. Each row is its own process.
Results go to benchmarks/results/smollm2.jsonl (rows already there are skipped) and a table is printed.
"""
import argparse
import os
from pathlib import Path

from hywia.bench import Row, markdown_table, run_grid

METHODS = ["random", "l1", "l2", "vector", "element1", "element2"]

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=os.environ.get("HYWIA_DATA_DIR", "../shared/data"))
    parser.add_argument("--max-windows", type=int, default=100)
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results" / "smollm2.jsonl")
    args = parser.parse_args()
    rows = [Row(args.model, "dense", 0.0)] + [Row(args.model, m, r) for r in (0.2, 0.5) for m in METHODS]
    data = ["wikitext2", "ptb"]
    records = run_grid(rows, args.results, data, args.data_dir, max_windows=args.max_windows)
    print(markdown_table(records, data))
