"""Whether `--stats-store groups` changes what a prune removes: the scores of one method from the per-weight store and
from per-group totals on the same calibration draw, how many groups' values differ, and whether the allocation at
each candidate attention share (what the split screens and the build walk are given) removes the same groups.

    HYWIA_DATA_DIR=../shared/data python benchmarks/stats_store.py --model smollm2-135m --ratio 0.2

The prunes themselves, with their time and peak memory, are `benchmarks/prune_cost.py` rows (its docstring).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import hywia  # noqa: E402
from hywia.allocate import allocate  # noqa: E402
from hywia.prune import begin, calibrate, score  # noqa: E402
from hywia.split import MULTIPLES  # noqa: E402


def scores_and_allocations(model, tokenizer, recipe: hywia.Recipe, data_dir: str) -> tuple:
    """The prune's scores and, per candidate attention share the floors allow, the groups its allocation removes."""
    run = begin(model, tokenizer, recipe, data_dir, None, None)
    calibrate(run)
    with torch.no_grad():
        scores = score(run)
    r, allocations = run.recipe, {}
    for share in sorted({round(m * r.ratio, 6) for m in MULTIPLES}):
        try:
            allocations[share] = allocate(run.sets, scores.per_set, r.ratio, r.scope, r.min_keep, scores.layer_ratios, share)
        except hywia.HywiaError:  # infeasible under the floors: the screens skip it too
            pass
    return run.sets, scores, allocations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="hywia-adaptive")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=os.environ.get("HYWIA_DATA_DIR", "../shared/data"))
    args = parser.parse_args()
    model, tokenizer = hywia.load_model(args.model)
    runs = {store: scores_and_allocations(model, tokenizer, hywia.Recipe(method=args.method, ratio=args.ratio, seed=args.seed,
                                                                        stats_store=store), args.data_dir)
            for store in ("weights", "groups")}
    (sets, weights, by_weights), (_, groups, by_groups) = runs["weights"], runs["groups"]
    for name in weights.details or {"score": None}:
        a, b = (weights.details[name], groups.details[name]) if weights.details else (weights.per_set, groups.per_set)
        changed = sum(int((x != y).sum()) for x, y in zip(a, b))
        print(f"{name}: {changed} of {sum(len(x) for x in a)} groups' values differ")
    for share in by_weights:
        same = all(torch.equal(x.sort().values, y.sort().values) for x, y in zip(by_weights[share], by_groups[share]))
        moved = [(s.layer, s.kind, len(x), len(y)) for s, x, y in zip(sets, by_weights[share], by_groups[share]) if len(x) != len(y)]
        print(f"attention share {share:g}: the same groups removed: {same}" + (f"; counts that differ: {moved}" if moved else ""))


if __name__ == "__main__":
    main()
