"""Short LoRA recovery of SmolLM2-135M pruned 20% by hywia and element2: perplexity before and after.

    HYWIA_DATA_DIR=../shared/data python benchmarks/recovery.py

Pruning: 10 calibration windows of 128 tokens (WikiText-2 validation), layer scope, seed 0.
Recovery: `hywia finetune` with the paper's defaults (rank 8, alpha 16, lr 1e-4, effective batch 64) on the
102-record Alpaca-cleaned sample in the data dir for `--epochs` epochs (the paper's 2 are 4 optimizer steps of 64
records here): a smoke-scale recovery, not the paper's 51,760 records. Evaluation: WikiText-2 and PTB test, first
100 windows of 128 tokens; zero-shot tasks are added when DATA_DIR/zeroshot/ holds them (`--zeroshot`).
Results are appended to benchmarks/results/recovery.jsonl (one line per model and epoch count).
"""
import argparse
import json
import os
import tempfile
from pathlib import Path

from hywia.bench import _hywia, machine

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=os.environ.get("HYWIA_DATA_DIR", "../shared/data"))
    parser.add_argument("--max-windows", type=int, default=100)
    parser.add_argument("--zeroshot", action="store_true", help="also run the seven zero-shot tasks (needs DATA_DIR/zeroshot)")
    parser.add_argument("--limit", type=int, default=None, help="zero-shot documents per task")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results" / "recovery.jsonl")
    args = parser.parse_args()

    def evaluate(model: str) -> dict:
        if args.zeroshot:
            extra = ["--limit", str(args.limit)] if args.limit else []
            return _hywia("eval", "zeroshot", "--model", model, "--ppl", "--max-windows", str(args.max_windows),
                          "--data-dir", args.data_dir, *extra)
        return _hywia("eval", "ppl", "--model", model, "--data", "wikitext2", "ptb", "--max-windows", str(args.max_windows),
                      "--data-dir", args.data_dir)

    with tempfile.TemporaryDirectory() as tmp, args.results.open("a") as f:
        for method in ("hywia", "element2"):
            pruned, tuned = str(Path(tmp) / f"{method}-pruned"), str(Path(tmp) / f"{method}-tuned")
            _hywia("prune", "--model", args.model, "--method", method, "--ratio", "0.2", "--data-dir", args.data_dir, "--out", pruned)
            for name, model, steps, seconds in ((f"{method} 20%", pruned, 0, 0.0), (f"{method} 20% + LoRA", tuned, None, None)):
                if steps is None:
                    done = _hywia("finetune", "--model", pruned, "--data", "alpaca", "--data-dir", args.data_dir,
                                  "--epochs", str(args.epochs), "--out", tuned)
                    steps, seconds = done["steps"], done["seconds"]
                result = evaluate(model)
                record = {"name": name, "epochs": args.epochs if steps else 0, "steps": steps, "seconds": seconds,
                          "params": result["params"],
                          "ppl": {k: v["ppl"] for k, v in result["ppl"].items()}, "zeroshot": result.get("zeroshot"),
                          "machine": machine()}
                f.write(json.dumps(record) + "\n")
                f.flush()
                print(record, flush=True)
