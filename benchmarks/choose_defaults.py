"""Choose a method's default on calibration data only: prune with each value of one option and measure perplexity
on held-out windows of the *calibration* corpus (never a test split).

    HYWIA_DATA_DIR=../shared/data python benchmarks/choose_defaults.py --method saap --option spread \
        --values 0,0.25,0.5,0.75,1 --prune-args "--ratio 0.2"
    HYWIA_DATA_DIR=../shared/data python benchmarks/choose_defaults.py --method mixed --option spread \
        --values 0,0.05,0.1,0.15,0.2 --prune-args "--sparsity 0.6 --samples 32 --seq-len 512" --held-out c4 --seq-len 512

Held-out text: the first `--windows` consecutive windows of the calibration corpus (`wikitext2` -> the raw
validation file, `c4` -> the shared C4 file); calibration draws its windows at random from the same text, so a
held-out window may overlap one of them (a few percent of windows at the defaults). One JSON line per value is
appended to benchmarks/results/defaults.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from hywia.bench import _hywia, machine  # noqa: E402

HELD_OUT = {"wikitext2": "wikitext2/wiki.valid.raw", "c4": "c4/c4-train.00000-of-01024.first1000.jsonl"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", required=True)
    parser.add_argument("--option", required=True, help="the option to choose, e.g. spread")
    parser.add_argument("--values", required=True, help="comma-separated values to try")
    parser.add_argument("--prune-args", default="", help="the other `hywia prune` flags, e.g. '--ratio 0.2'")
    parser.add_argument("--held-out", default="wikitext2", choices=sorted(HELD_OUT))
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--windows", type=int, default=100)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--data-dir", default=os.environ.get("HYWIA_DATA_DIR", "../shared/data"))
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results" / "defaults.jsonl")
    args = parser.parse_args()

    held_out = Path(args.data_dir) / HELD_OUT[args.held_out]
    if args.held_out == "c4":  # `hywia eval ppl` reads plain text: the documents' text, one per line
        text = Path(tempfile.mkdtemp()) / "c4-held-out.txt"
        text.write_text("\n\n".join(json.loads(line)["text"] for line in held_out.read_text().splitlines()))
        held_out = text
    for seed in [int(s) for s in args.seeds.split(",")]:
        for value in args.values.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                pruned = _hywia("prune", "--model", args.model, "--method", args.method, f"--{args.option}", value,
                                *shlex.split(args.prune_args), "--seed", str(seed), "--data-dir", args.data_dir, "--out", f"{tmp}/m")
                ppl = _hywia("eval", "ppl", "--model", f"{tmp}/m", "--data", str(held_out), "--seq-len", str(args.seq_len),
                             "--max-windows", str(args.windows), "--dtype", "bfloat16", "--data-dir", args.data_dir)
            value_ppl = next(iter(ppl["ppl"].values()))["ppl"]
            row = {"model": args.model, "method": args.method, "option": args.option, "value": value, "seed": seed,
                   "prune_args": args.prune_args, "held_out": args.held_out, "seq_len": args.seq_len, "windows": args.windows,
                   "ppl": value_ppl, "seconds": time.perf_counter() - start, "machine": machine(),
                   "achieved": pruned.get("achieved_ratio", pruned.get("achieved_sparsity"))}
            print(json.dumps(row), flush=True)
            args.results.parent.mkdir(parents=True, exist_ok=True)
            with args.results.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
