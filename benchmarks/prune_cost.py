"""Wall time and peak memory of `hywia prune` per method on the packaged SmolLM2-135M, one process per run.

    HYWIA_DATA_DIR=../shared/data python benchmarks/prune_cost.py
    # the cost table across sizes: the methods compared there, at both ratios, on each model
    HYWIA_DATA_DIR=../shared/data python benchmarks/prune_cost.py --model qwen2.5-coder-0.5b \
        --methods hywia-adaptive,slimgpt,element2,flap --ratios 0.2,0.5 --results benchmarks/results/cost_by_size.jsonl
    # the default with per-group gradient totals against per-weight statistics, paired on one machine
    HYWIA_DATA_DIR=../shared/data python benchmarks/prune_cost.py --methods hywia-adaptive --ratios 0.2 \
        --results benchmarks/results/stats_store.jsonl                     # and again with --extra "--stats-store groups"
    # the same under glibc's fixed mmap threshold (recorded as the row's "env"; a row is new if its env is)
    MALLOC_MMAP_THRESHOLD_=1048576 HYWIA_DATA_DIR=../shared/data python benchmarks/prune_cost.py --methods hywia-adaptive \
        --ratios 0.2 --results benchmarks/results/owned_weights.jsonl --extra "--stats-store groups"

Run it on an otherwise idle machine: timings are what this reports. "prune s" is scoring + allocation + removal
(gradient passes included, model loading excluded); "peak RSS" is the whole process's maximum resident memory,
loading included. Calibration: 10 or 50 windows of 128 tokens from the WikiText-2 validation split.
"""
import argparse
import json
import os
from dataclasses import asdict
from pathlib import Path

from hywia.bench import Row, allocator_env, run_row

METHODS = ["random", "l1", "l2", "vector", "element1", "element2", "hywia", "wanda_sp", "flap", "hywia-adaptive"]

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=os.environ.get("HYWIA_DATA_DIR", "../shared/data"))
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results" / "prune_cost.jsonl")
    parser.add_argument("--methods", default=None, help="comma-separated methods (default: every method, and 50-window rows)")
    parser.add_argument("--ratios", default="0.2,0.5")
    parser.add_argument("--extra", default="", help="more `hywia prune` flags for every row, e.g. '--stats-store groups'")
    args = parser.parse_args()
    methods = args.methods.split(",") if args.methods else METHODS
    rows = [Row(args.model, m, float(r), extra=tuple(args.extra.split())) for r in args.ratios.split(",") for m in methods]
    if args.methods is None:
        rows += [Row(args.model, m, 0.2, samples=50) for m in ("vector", "element1", "element2", "hywia", "wanda_sp", "flap")]
    done = {json.dumps([r["row"], r.get("env", {})], sort_keys=True) for r in map(json.loads, args.results.read_text().splitlines())} \
        if args.results.exists() else set()
    print("| method | ratio | samples | prune s | load s | peak RSS MB |\n|---|---|---|---|---|---|")
    with args.results.open("a") as f:
        for row in rows:
            if json.dumps([{**asdict(row), "extra": list(row.extra)}, allocator_env()], sort_keys=True) in done:
                continue  # measured already: delete the file to measure everything again
            r = run_row(row, [], args.data_dir)
            f.write(json.dumps(r) + "\n")
            print(f"| {row.method} | {row.ratio:.0%} | {row.samples} | {r['prune_seconds']:.1f} | {r['load_seconds']:.1f} | {r['peak_rss_mb']:.0f} |", flush=True)
