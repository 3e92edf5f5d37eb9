"""The paper's Table 1 for one model: perplexity (two protocols) and seven zero-shot accuracies, before and after
LoRA recovery, for dense and each method at each ratio.

    HYWIA_DATA_DIR=../shared/data python benchmarks/table1.py                 # everything (resumes where it stopped)
    HYWIA_DATA_DIR=../shared/data python benchmarks/table1.py --no-recovery   # the retraining-free rows only
    python benchmarks/report.py                                               # the tables in docs/RESULTS.md

Every step is a separate `hywia` process. Pruned and recovered models are kept in `--work` (default runs/table1)
so a stopped run resumes: a model folder that exists is not made again, and a row already in the results file
(benchmarks/results/table1.jsonl, one JSON line per evaluated model) is not evaluated again.

Protocol (the defaults; each is recorded in every row): pruning calibrates on 10 random 128-token windows of the
WikiText-2 *validation* split, seed 0. Evaluation runs in bfloat16 (2.3x faster than float32 on the 2-core
CPU; the effect is measured on the dense model, see docs/RESULTS.md): WikiText-2 (raw) and PTB test, the
first 200 windows of the llm-pruner protocol (128 tokens) and the first 12 windows of the sparsegpt protocol
(2048 tokens), about 25k predicted tokens each; zero-shot on the first `--limit` documents of each task.
Recovery: `hywia finetune` at the paper's settings (LoRA r=8, alpha 16, lr 1e-4, effective batch 64) for one
epoch over the first `--records` Alpaca-cleaned records, bfloat16 compute merged into float32 weights.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from hywia.bench import _hywia, machine  # noqa: E402

METHODS = {  # row label -> `hywia prune` flags; the order is the order rows are made (most important first)
    "hywia": ["--method", "hywia"],
    "element2": ["--method", "element2"],
    "flap (layer scope)": ["--method", "flap", "--scope", "layer"],
    "wanda_sp": ["--method", "wanda_sp"],
    "vector": ["--method", "vector"],
}
RECOVERED = ("hywia", "element2", "flap (layer scope)")  # the 20% models recovered: HyWIA, Element2, best retraining-free


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=os.environ.get("HYWIA_DATA_DIR", "../shared/data"))
    parser.add_argument("--ratios", default="0.2,0.5")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=100, help="zero-shot documents per task")
    parser.add_argument("--windows-128", type=int, default=200)
    parser.add_argument("--windows-2048", type=int, default=12)
    parser.add_argument("--dtype", default="bfloat16", help="evaluation dtype")
    parser.add_argument("--records", type=int, default=2000, help="Alpaca records for the one-epoch recovery")
    parser.add_argument("--no-recovery", action="store_true")
    parser.add_argument("--work", type=Path, default=Path("runs") / "table1")
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results" / "table1.jsonl")
    args = parser.parse_args()

    done = {json.loads(l)["key"] for l in args.results.read_text().splitlines()} if args.results.exists() else set()
    work = args.work / slug(args.model)
    work.mkdir(parents=True, exist_ok=True)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    common = ["--data-dir", args.data_dir]

    def evaluate(key: str, path: str, info: dict) -> None:
        key = json.dumps({"model": args.model, "row": key, "seed": args.seed, "limit": args.limit, "dtype": args.dtype,
                          "windows": [args.windows_128, args.windows_2048]}, sort_keys=True)
        if key in done:
            return
        print(f"[{time.strftime('%H:%M:%S')}] evaluating {info['name']}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        zs = _hywia("eval", "zeroshot", "--model", path, "--ppl", "--max-windows", str(args.windows_128), "--dtype", args.dtype,
                    "--limit", str(args.limit), *common)
        long = _hywia("eval", "ppl", "--model", path, "--data", "wikitext2", "ptb", "--protocol", "sparsegpt",
                      "--max-windows", str(args.windows_2048), "--dtype", args.dtype, *common)
        record = {"key": key, **info, "params": zs["params"], "ppl_128": zs["ppl"], "ppl_2048": long["ppl"],
                  "zeroshot": zs["zeroshot"], "average": zs["average"], "limit": args.limit, "dtype": args.dtype,
                  "eval_seconds": time.perf_counter() - start, "machine": machine()}
        with args.results.open("a") as f:
            f.write(json.dumps(record) + "\n")
        done.add(key)

    def prune(method: str, ratio: float) -> Path:
        pruned = work / f"{slug(method)}-{ratio}-s{args.seed}"
        if not pruned.is_dir():
            print(f"[{time.strftime('%H:%M:%S')}] pruning {method} {ratio:.0%}", file=sys.stderr, flush=True)
            _hywia("prune", "--model", args.model, *METHODS[method], "--ratio", str(ratio), "--seed", str(args.seed),
                   "--out", str(pruned), *common)
        recipe = json.loads((pruned / "hywia.json").read_text())
        evaluate(f"{method} {ratio}", str(pruned), {"name": f"{method} {ratio:.0%}", "method": method, "ratio": ratio,
                                                    "recovered": False, "prune_seconds": recipe["seconds"],
                                                    "achieved_ratio": recipe["achieved_ratio"]})
        return pruned

    def recover(method: str, pruned: Path) -> None:
        tuned = pruned.with_name(f"{pruned.name}-lora{args.records}")
        if not tuned.is_dir():
            print(f"[{time.strftime('%H:%M:%S')}] recovering {method} 20%", file=sys.stderr, flush=True)
            resume = ["--resume"] if tuned.with_name(tuned.name + ".checkpoints").is_dir() else []
            _hywia("finetune", "--model", str(pruned), "--data", "alpaca", "--max-records", str(args.records), "--epochs", "1",
                   "--dtype", "bfloat16", "--save-steps", "4", "--out", str(tuned), *resume, *common)
        tune = json.loads((tuned / "hywia.json").read_text())["finetune"]
        evaluate(f"{method} 0.2 lora{args.records}", str(tuned), {
            "name": f"{method} 20% + LoRA", "method": method, "ratio": 0.2, "recovered": True, "finetune_seconds": tune["seconds"],
            "finetune_steps": tune["steps"], "finetune_records": tune["data"]["records"], "guard": tune.get("guard")})

    def attempt(step, *step_args) -> Path | None:
        """One row; a failure is logged and the grid goes on (a rerun retries it)."""
        try:
            return step(*step_args)
        except RuntimeError as e:
            print(f"[{time.strftime('%H:%M:%S')}] FAILED: {e}", file=sys.stderr, flush=True)
            return None

    attempt(evaluate, "dense", args.model, {"name": "dense", "method": "dense", "ratio": 0.0, "recovered": False})
    methods = [m for m in args.methods.split(",") if m]
    for ratio in [float(r) for r in args.ratios.split(",")]:
        pruned = {method: attempt(prune, method, ratio) for method in methods}
        if ratio == 0.2 and not args.no_recovery:  # recovery right after the 20% rows: the heart of Table 1
            for method in RECOVERED:
                if pruned.get(method) is not None:
                    attempt(recover, method, pruned[method])


if __name__ == "__main__":
    main()
