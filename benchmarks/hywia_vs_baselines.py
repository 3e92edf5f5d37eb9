"""HyWIA against its baselines on the packaged SmolLM2-135M (docs/baseline_grids.md).

    HYWIA_DATA_DIR=../shared/data python benchmarks/hywia_vs_baselines.py

Rows: hywia (attention fusion), hywia --fusion fixed --alpha 0.5 (each with the default rank normalisation and
with --normalize mean), element2, flap (its joint scope) and flap --scope layer, each with seeds 0, 1, 2 (the seed draws the calibration windows, and for hywia
also the fusion model, so same-seed rows see the same data and can be compared pairwise); element1, vector,
wanda_sp, l2, random with seed 0; at 20% and 50%; calibrated on 10 and 50 random 128-token windows of the
WikiText-2 validation split (the train split is not available offline; the test split is never seen before evaluation). l2 and random use
no calibration data, so they run once per ratio. Evaluation: WikiText-2 and PTB test, first 100 windows of 128.
Shares benchmarks/results/smollm2.jsonl with criteria.py, so rows measured there are not run again.
"""
from hywia.bench import Row, grid_main


FIXED = ("--fusion", "fixed", "--alpha", "0.5")
MEAN = ("--normalize", "mean")


def rows(model: str) -> list[Row]:
    grid = [Row(model, "dense", 0.0)]
    for ratio in (0.2, 0.5):
        grid += [Row(model, "l2", ratio), Row(model, "random", ratio)]
        for samples in (10, 50):
            for extra in ((), FIXED, MEAN, FIXED + MEAN):
                grid += [Row(model, "hywia", ratio, seed=s, samples=samples, extra=extra) for s in (0, 1, 2)]
            grid += [Row(model, "element2", ratio, seed=s, samples=samples) for s in (0, 1, 2)]
            for extra in ((), ("--scope", "layer")):
                grid += [Row(model, "flap", ratio, seed=s, samples=samples, extra=extra) for s in (0, 1, 2)]
            grid += [Row(model, m, ratio, samples=samples) for m in ("element1", "vector", "wanda_sp")]
    return grid


if __name__ == "__main__":
    grid_main(__doc__, rows)
