"""The baseline criteria on the packaged SmolLM2-135M at 0%, 20% and 50% (docs/baseline_grids.md).

    HYWIA_DATA_DIR=../shared/data python benchmarks/criteria.py

Calibration: 10 random 128-token windows of the WikiText-2 validation split (offline; no train split here).
Evaluation: WikiText-2 and PTB test, 128-token windows, the first 100 of each. Each row is its own process.
Results go to benchmarks/results/smollm2.jsonl (rows already there are skipped) and a table is printed.
"""
from hywia.bench import Row, grid_main

METHODS = ["random", "l1", "l2", "vector", "element1", "element2", "wanda_sp", "flap"]


def rows(model: str) -> list[Row]:
    grid = [Row(model, "dense", 0.0)] + [Row(model, m, r) for r in (0.2, 0.5) for m in METHODS]
    grid += [Row(model, m, r, samples=50) for r in (0.2, 0.5) for m in ("wanda_sp", "flap")]
    # FLAP's metric without its adaptive structure: the same cut per layer as the other criteria
    return grid + [Row(model, "flap", r, extra=("--scope", "layer")) for r in (0.2, 0.5)]


if __name__ == "__main__":
    grid_main(__doc__, rows)
