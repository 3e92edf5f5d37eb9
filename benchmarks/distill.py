"""Recovery by distillation vs LoRA on the data's next tokens, at the same token budget.

    HYWIA_DATA_DIR=../shared/data python benchmarks/distill.py --tokens 20480 --seeds 0

The dense model is pruned once per seed (`--method`, `--ratio`, WikiText-2 calibration windows drawn with that seed),
then recovered from the same pruned model by each mode, on the same C4 training windows (`--cutoff-len` tokens,
the data dir's C4 sample) and the same budget of predicted tokens:

- `lora`: LoRA on the text's next tokens (cross-entropy), the recovery hywia had before;
- `kd`: LoRA trained to the dense teacher's next-token distributions (KL, temperature 1);
- `kd+hidden`: the same plus the residual-stream loss after every layer (weight `--kd-hidden`).

A mode may also name what is trained and its learning rate, `OBJECTIVE[/TRAIN][@LR]`: `lora/norms+lora` (LoRA and
every normalisation weight), `lora/full@5e-5` (every weight, at a learning rate of its own; `--lr` is LoRA's).

Quality is WikiText-2 *validation* perplexity (the held-out choice corpus, first `--max-windows` windows of 128
tokens): what a default is chosen on. The test split is for the final tables only. One JSON line per run is
appended to benchmarks/results/distill.jsonl.
"""
import argparse
import json
import os
import tempfile
from pathlib import Path

from hywia.bench import _hywia, machine
from table1 import slug

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="hywia-adaptive")
    parser.add_argument("--reconstruct", default="no", help="the pruned model's --reconstruct (no: as the first distillation rows were made)")
    parser.add_argument("--ratio", default="0.2")
    parser.add_argument("--data-dir", default=os.environ.get("HYWIA_DATA_DIR", "../shared/data"))
    parser.add_argument("--tokens", type=int, default=20480)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--cutoff-len", type=int, default=128)
    parser.add_argument("--lr", default="5e-4")
    parser.add_argument("--kd-hidden", default="1.0")
    parser.add_argument("--modes", default="lora,kd,kd+hidden")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--max-windows", type=int, default=40)
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results" / "distill.jsonl")
    args = parser.parse_args()
    validation = str(Path(args.data_dir) / "wikitext2" / "wiki.valid.raw")

    def validation_ppl(model: str) -> float:
        return _hywia("eval", "ppl", "--model", model, "--data", validation, "--max-windows", str(args.max_windows))["ppl"][validation]["ppl"]

    with tempfile.TemporaryDirectory() as tmp, args.results.open("a") as f:
        for seed in args.seeds.split(","):
            pruned = str(Path(tmp) / f"pruned-{seed}")
            _hywia("prune", "--model", args.model, "--method", args.method, "--reconstruct", args.reconstruct, "--ratio", args.ratio, "--seed", seed,
                   "--data-dir", args.data_dir, "--out", pruned)
            rows = [("dense", args.model, None), ("pruned", pruned, None)]
            for mode in args.modes.split(","):
                rows.append((mode, str(Path(tmp) / f"{slug(mode)}-{seed}"), mode))
            for name, model, mode in rows:
                done, lr, train, objective = {}, args.lr, "lora", mode
                if mode is not None:
                    mode, _, lr = mode.partition("@")
                    objective, _, train = mode.partition("/")
                    lr, train = lr or args.lr, train or "lora"
                    extra = ["--teacher", args.model] if objective.startswith("kd") else []
                    extra += ["--kd-hidden", args.kd_hidden] if objective == "kd+hidden" else []
                    done = _hywia("finetune", "--model", pruned, "--data", "c4", "--data-dir", args.data_dir, "--tokens", str(args.tokens),
                                  "--batch-size", str(args.batch_size), "--micro-batch-size", "4", "--cutoff-len", str(args.cutoff_len),
                                  "--lr", lr, "--train", train, "--seed", seed, "--out", model, *extra)
                record = {"name": name, "method": args.method, "ratio": args.ratio, "seed": seed, "tokens": done.get("tokens", 0),
                          "steps": done.get("steps", 0), "seconds": done.get("seconds", 0.0), "lr": lr, "train": train,
                          "batch": args.batch_size, "cutoff_len": args.cutoff_len,
                          "kd_hidden": args.kd_hidden if objective == "kd+hidden" else None,
                          "validation_ppl": validation_ppl(model), "max_windows": args.max_windows, "machine": machine()}
                f.write(json.dumps(record) + "\n")
                f.flush()
                print(record, flush=True)
