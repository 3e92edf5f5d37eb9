"""Checks of the evaluation protocol on the dense packaged models (each one a row of docs/RESULTS.md):

    HYWIA_DATA_DIR=../shared/data python benchmarks/eval_checks.py

- bos:        WikiText-2 (raw) perplexity, llm-pruner protocol, first 20 windows, with BOS-first windows and without, for Gemma-3-270M (its tokenizer adds BOS) and SmolLM2-135M (its tokenizer does not).
- hellaswag:  SmolLM2-135M HellaSwag acc / acc_norm on the first `--hellaswag-limit` items of the text mirror, with the
              ctx_a/ctx_b split rebuilt (`--hellaswag-case restore`) and as written (`as-file`).
- dtype:      SmolLM2-135M perplexity (first 200 windows) and the seven zero-shot tasks (first 100 documents) in float32,
              to set against the bfloat16 dense row of Table 1.
Rows go to benchmarks/results/eval_checks.jsonl; a row already there is not run again.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("HYWIA_DATA_DIR", "../shared/data"))
    parser.add_argument("--hellaswag-limit", type=int, default=500)
    parser.add_argument("--only", default="bos,hellaswag,dtype")
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results" / "eval_checks.jsonl")
    args = parser.parse_args()
    done = {json.loads(l)["key"] for l in args.results.read_text().splitlines()} if args.results.exists() else set()
    common = ["--data-dir", args.data_dir]

    def run(check: str, key: dict, *command: str) -> None:
        key = json.dumps({"check": check, **key}, sort_keys=True)
        if check not in args.only.split(",") or key in done:
            return
        print(f"[{time.strftime('%H:%M:%S')}] {key}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        result = _hywia(*command, *common)
        with args.results.open("a") as f:
            f.write(json.dumps({"key": key, "check": check, **json.loads(key), "result": result,
                                "seconds": time.perf_counter() - start, "machine": machine()}) + "\n")

    for model in ("gemma3-270m", "smollm2-135m"):
        for bos in ("yes", "no"):
            run("bos", {"model": model, "bos": bos, "windows": 20}, "eval", "ppl", "--model", model, "--data", "wikitext2",
                "--max-windows", "20", "--bos", bos)
    for case in ("restore", "as-file"):
        run("hellaswag", {"model": "smollm2-135m", "case": case, "limit": args.hellaswag_limit}, "eval", "zeroshot",
            "--model", "smollm2-135m", "--tasks", "hellaswag", "--limit", str(args.hellaswag_limit), "--hellaswag-case", case,
            "--dtype", "bfloat16")
    run("dtype", {"model": "smollm2-135m", "dtype": "float32"}, "eval", "zeroshot", "--model", "smollm2-135m", "--ppl",
        "--max-windows", "200", "--limit", "100", "--dtype", "float32")


if __name__ == "__main__":
    main()
