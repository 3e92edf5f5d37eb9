"""Peak memory and time of gathering pruning statistics under each memory option, one process per run,
on a model saved as safetensors (so loading is a memory map, not a GGUF dequantization whose transient peak would
hide the differences).

    HYWIA_DATA_DIR=../shared/data python benchmarks/memory.py            # SmolLM2-135M
    HYWIA_DATA_DIR=../shared/data python benchmarks/memory.py --model gemma3-270m
    python benchmarks/report.py                                          # the table in docs/RESULTS.md

Modes: gradient criteria (element2) in one pass, in sweeps of N layers (`--layers-per-pass`), with a bfloat16
store, with activation checkpointing, and all three; with per-group totals instead of a per-weight store
(`--stats-store groups`), alone and with sweeps and checkpointing; forward-only statistics (flap) in one pass and walked one
layer at a time (`--sequential`); `l2` (no statistics) as the floor. "peak RSS" is the process's maximum resident
memory, loading included; "stats MB" the accumulated per-weight statistics kept for scoring. Calibration: 4 x 128
and 2 x 512 tokens (`--calibrations`): a mode's time scales with the windows, its activation memory with their length.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from hywia.bench import Row, _hywia, kept_digest, machine  # noqa: E402

MODES = [  # (method, extra flags)
    ("l2", ()),
    ("element2", ()),
    ("element2", ("--layers-per-pass", "10")),
    ("element2", ("--stats-dtype", "bfloat16")),
    ("element2", ("--checkpointing",)),
    ("element2", ("--layers-per-pass", "10", "--stats-dtype", "bfloat16", "--checkpointing")),
    ("element2", ("--stats-store", "groups")),
    ("element2", ("--layers-per-pass", "10", "--stats-store", "groups", "--checkpointing")),
    ("flap", ()),
    ("flap", ("--sequential",)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calibrations", default="4x128,2x512", help="SAMPLESxSEQ_LEN, comma-separated")
    parser.add_argument("--data-dir", default=os.environ.get("HYWIA_DATA_DIR", "../shared/data"))
    parser.add_argument("--work", type=Path, default=Path("runs") / "memory")
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results" / "memory.jsonl")
    args = parser.parse_args()
    dense = args.work / f"{args.model}-dense"
    if not dense.is_dir():
        from hywia import load_model, save_model
        model, tokenizer = load_model(args.model)
        save_model(model, tokenizer, dense, {"model": args.model})
        del model
    done = {json.loads(l)["key"] for l in args.results.read_text().splitlines()} if args.results.exists() else set()
    for samples, seq_len in [map(int, c.split("x")) for c in args.calibrations.split(",")]:
        for method, extra in MODES:
            row = Row(args.model, method, 0.2, samples=samples, seq_len=seq_len, extra=extra)
            key = json.dumps(asdict(row), sort_keys=True)
            if key in done:
                continue
            out = args.work / "pruned"
            pruned = _hywia("prune", "--model", str(dense), "--method", method, "--ratio", "0.2", "--samples", str(samples),
                            "--seq-len", str(seq_len), "--data-dir", args.data_dir, "--out", str(out), "--overwrite", *extra)
            record = {"key": key, "model": args.model, "method": method, "flags": " ".join(extra), "seq_len": seq_len,
                      "samples": samples, "prune_seconds": pruned["seconds"], "load_seconds": pruned["load_seconds"],
                      "peak_rss_mb": pruned["peak_rss_mb"], "stats_mb": pruned["extra"].get("stats_mb", 0.0),
                      "kept_digest": kept_digest(pruned["kept"]),
                      "machine": machine()}
            print(f"{method} {' '.join(extra)} seq {seq_len}: {record['prune_seconds']:.0f} s, peak {record['peak_rss_mb']:.0f} MB, "
                  f"stats {record['stats_mb']:.0f} MB", flush=True)
            with args.results.open("a") as f:
                f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
