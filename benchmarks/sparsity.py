"""Unstructured and N:M pruning of one model: SparseGPT, Wanda and sensitivity-aware mixed sparsity at 50%, 60%,
70% and 2:4, in the Table-1 evaluation (both perplexity protocols, seven zero-shot tasks).

    HYWIA_DATA_DIR=../shared/data python benchmarks/sparsity.py          # resumes where it stopped
    python benchmarks/report.py                                          # the tables in docs/RESULTS.md

Calibration: `--samples` C4 windows of `--seq-len` tokens (the papers use 128 x 2048; the default 32 x 512 keeps
one run to minutes on a 2-core CPU, and is stated in every row). Models go to runs/table1/MODEL/ beside Table 1's,
one JSON line per evaluated model to benchmarks/results/sparsity.jsonl, with its own dense row measured the same
way (on the same machine, so a GPU run is paired with a GPU dense row).
"""
from __future__ import annotations

from pathlib import Path

from table1 import Grid, arguments, attempt, slug

METHODS = ("sparsegpt", "wanda", "mixed")
LEVELS = ("0.5", "0.6", "0.7", "2:4")


def main() -> None:
    parser = arguments(__doc__, Path(__file__).parent / "results" / "sparsity.jsonl")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--levels", default=",".join(LEVELS))
    parser.add_argument("--wbits", type=int, default=None, help="also quantize the kept weights (sparsegpt, mixed)")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense row (a further seed of a grid that has it)")
    args = parser.parse_args()
    grid = Grid(args, args.results)
    calibration = ["--samples", str(args.samples), "--seq-len", str(args.seq_len)]

    def row(method: str, level: str) -> None:
        amount = ["--pattern", level] if ":" in level else ["--sparsity", level]
        label = f"{method} {level}" + (f" w{args.wbits}" if args.wbits else "")
        quantize = ["--wbits", str(args.wbits)] if args.wbits else []
        recipe = grid.make(label, ["--method", method, *amount, *quantize, *calibration],
                           f"{slug(label)}-c{args.samples}x{args.seq_len}-s{args.seed}")
        grid.evaluate(label, recipe["path"], {"name": label, "method": method, "level": level, "wbits": args.wbits,
                                              "achieved_sparsity": recipe["achieved_sparsity"], "prune_seconds": recipe["seconds"],
                                              "calibration": recipe["calibration"], "per_matrix": recipe["per_matrix"]})

    if not args.no_dense:
        attempt(grid.evaluate, "dense", args.model, {"name": "dense", "method": "dense", "level": "0"})
    for level in args.levels.split(","):
        for method in args.methods.split(","):
            if (method == "mixed" and ":" in level) or (args.wbits and method == "wanda"):
                continue  # a fixed N:M pattern leaves mixed sparsity nothing to allocate
            attempt(row, method, level)


if __name__ == "__main__":
    main()
