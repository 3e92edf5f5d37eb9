"""The paper's Table 1 for one model: perplexity (two protocols) and seven zero-shot accuracies, before and after
LoRA recovery, for dense and each method at each ratio.

    HYWIA_DATA_DIR=../shared/data python benchmarks/table1.py                 # everything (resumes where it stopped)
    HYWIA_DATA_DIR=../shared/data python benchmarks/table1.py --no-recovery   # the retraining-free rows only
    python benchmarks/report.py                                               # the tables in docs/RESULTS.md

Every step is a separate `hywia` process. Pruned and recovered models are kept in `--work` (default runs/table1)
so a stopped run resumes: a model folder that exists is not made again, and a row already in the results file
(benchmarks/results/table1.jsonl, one JSON line per evaluated model) is not evaluated again.

Protocol (the defaults; each is recorded in every row): pruning calibrates on 10 random 128-token windows of the
WikiText-2 *validation* split, seed 0. Evaluation runs in bfloat16 (2.3x faster than float32 on a 2-core
CPU with native bfloat16; an AVX2-only CPU emulates it, many times slower; the effect is measured on the dense
model, see docs/RESULTS.md): WikiText-2 (raw) and PTB test, the
first 200 windows of the llm-pruner protocol (128 tokens) and the first 12 windows of the sparsegpt protocol
(2048 tokens), about 25k predicted tokens each; zero-shot on the first `--limit` documents of each task.
Recovery: `hywia finetune` at the paper's settings (LoRA r=8, alpha 16, lr 1e-4, effective batch 64) for one
epoch over the first `--records` Alpaca-cleaned records, bfloat16 compute merged into float32 weights; SAAP's
with its group fine-tuning (`--groups 3`: layers 20-29, then 10-19, then 0-9, a third of the steps each).
With `--tokens N` every recovery mode in `--recovery` gets the same budget of N predicted tokens instead:
`lora` on Alpaca as above, `kd` distilled from the dense model on the C4 sample (`--teacher`, logits and
`--kd-hidden` residual stream), at the ratios in `--recover-ratios`. `--eval-every K` measures WikiText-2 validation
perplexity (first 32 windows) every K recovery steps: the quality-vs-tokens curve (tokens.png beside the model, and
the report's "recovery curves" table).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from hywia.bench import _hywia, machine, warn_emulated  # noqa: E402

METHODS = {  # row label -> `hywia prune` flags; the order is the order rows are made (most important first)
    "hywia": ["--method", "hywia"],
    "hywia-adaptive": ["--method", "hywia-adaptive"],  # --reconstruct obs, --kind-split evidence-best
    "hywia-adaptive --kind-split evidence": ["--method", "hywia-adaptive", "--kind-split", "evidence"],  # the masked split alone
    "hywia-adaptive --reconstruct no": ["--method", "hywia-adaptive", "--reconstruct", "no"],  # choosing without the refit
    "element2": ["--method", "element2"],
    "flap (layer scope)": ["--method", "flap", "--scope", "layer"],
    "wanda_sp": ["--method", "wanda_sp"],
    "vector": ["--method", "vector"],
    "saap": ["--method", "saap"],
    "slimgpt": ["--method", "slimgpt"],  # structured OBS, kept weights refit (retraining-free rows only)
}
# the 20% models recovered: HyWIA, Element2, the best retraining-free baseline, and SAAP with its own group fine-tuning
RECOVERED = {"hywia-adaptive": [], "hywia-adaptive --kind-split evidence": [], "hywia-adaptive --reconstruct no": [], "hywia": [],
             "element2": [], "flap (layer scope)": [], "saap": ["--groups", "3"]}


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-")


class Grid:
    """Models made once into `work` and evaluated once into `results` (one JSON line per evaluated model)."""

    def __init__(self, args: argparse.Namespace, results: Path):
        self.args, self.results = args, results
        self.done = {json.loads(l)["key"] for l in results.read_text().splitlines()} if results.exists() else set()
        self.work = args.work / slug(args.model)
        self.work.mkdir(parents=True, exist_ok=True)
        results.parent.mkdir(parents=True, exist_ok=True)
        self.common = ["--data-dir", args.data_dir]

    def evaluate(self, row: str, path: str, info: dict) -> None:
        """Both perplexity protocols and the seven zero-shot tasks of the model at `path`, unless already measured."""
        a = self.args
        seed = 0 if info["method"] == "dense" else a.seed  # the dense model is the same at every seed: measured once
        key = json.dumps({"model": a.model, "row": row, "seed": seed, "limit": a.limit, "dtype": a.dtype,
                          "windows": [a.windows_128, a.windows_2048]}, sort_keys=True)
        if key in self.done:
            return
        print(f"[{time.strftime('%H:%M:%S')}] evaluating {info['name']}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        if a.limit:
            zs = _hywia("eval", "zeroshot", "--model", path, "--ppl", "--max-windows", str(a.windows_128), "--dtype", a.dtype,
                        "--limit", str(a.limit), "--device", a.device, *self.common)
        else:  # perplexity only: the extra seeds of a grid whose zero-shot columns one seed already resolves
            zs = _hywia("eval", "ppl", "--model", path, "--data", "wikitext2", "ptb", "--protocol", "llm-pruner",
                        "--max-windows", str(a.windows_128), "--dtype", a.dtype, "--device", a.device, *self.common)
            zs.update(zeroshot={}, average=None)
        long = _hywia("eval", "ppl", "--model", path, "--data", "wikitext2", "ptb", "--protocol", "sparsegpt",
                      "--max-windows", str(a.windows_2048), "--dtype", a.dtype, "--device", a.device, *self.common)
        record = {"key": key, **info, "params": zs["params"], "ppl_128": zs["ppl"], "ppl_2048": long["ppl"],
                  "zeroshot": zs["zeroshot"], "average": zs["average"], "limit": a.limit, "dtype": a.dtype,
                  "eval_seconds": time.perf_counter() - start, "machine": machine(a.device)}
        with self.results.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.done.add(key)

    def make(self, label: str, flags: list[str], folder: str) -> dict:
        """`hywia prune MODEL FLAGS` into work/FOLDER unless it is there; returns its hywia.json."""
        out = self.work / folder
        if not out.is_dir():
            print(f"[{time.strftime('%H:%M:%S')}] pruning {label}", file=sys.stderr, flush=True)
            resume = ["--resume"] if (out.with_name(out.name + ".checkpoints") / "split.pt").is_file() else []  # a killed prune's
            _hywia("prune", "--model", self.args.model, *flags, "--seed", str(self.args.seed), "--out", str(out),
                   "--device", self.args.device, *resume, *self.common)
        return {"path": str(out), **json.loads((out / "hywia.json").read_text())}


def attempt(step, *step_args):
    """One row; a failure is logged and the grid goes on (a rerun retries it)."""
    try:
        return step(*step_args)
    except RuntimeError as e:
        print(f"[{time.strftime('%H:%M:%S')}] FAILED: {e}", file=sys.stderr, flush=True)
        return None


def arguments(doc: str, results: Path) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=os.environ.get("HYWIA_DATA_DIR", "../shared/data"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=100, help="zero-shot documents per task (0: perplexity only)")
    parser.add_argument("--windows-128", type=int, default=200)
    parser.add_argument("--windows-2048", type=int, default=12)
    parser.add_argument("--dtype", default="bfloat16", help="evaluation dtype")
    parser.add_argument("--device", default="cpu", help="where pruning, recovery and evaluation run (cpu, cuda)")
    parser.add_argument("--work", type=Path, default=Path("runs") / "table1")
    parser.add_argument("--results", type=Path, default=results)
    return parser


def main() -> None:
    parser = arguments(__doc__, Path(__file__).parent / "results" / "table1.jsonl")
    parser.add_argument("--ratios", default="0.2,0.5")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--records", type=int, default=2000, help="Alpaca records for the one-epoch recovery")
    parser.add_argument("--no-recovery", action="store_true")
    parser.add_argument("--tokens", type=int, default=None, help="recovery budget in predicted tokens, the same for every mode")
    parser.add_argument("--recovery", default="lora", help="recovery modes with --tokens: lora, kd (comma-separated)")
    parser.add_argument("--recover-ratios", default="0.2")
    parser.add_argument("--kd-hidden", default="0")
    parser.add_argument("--eval-every", default=None, help="recovery steps between WikiText-2 validation perplexities (tokens.png)")
    args = parser.parse_args()
    for dtype in {args.dtype, *([] if args.no_recovery else ["bfloat16"])}:  # recovery computes in bfloat16
        warn_emulated(dtype, args.device)
    grid = Grid(args, args.results)

    def prune(method: str, ratio: float) -> Path:
        recipe = grid.make(f"{method} {ratio:.0%}", [*METHODS[method], "--ratio", str(ratio)], f"{slug(method)}-{ratio}-s{args.seed}")
        grid.evaluate(f"{method} {ratio}", recipe["path"], {"name": f"{method} {ratio:.0%}", "method": method, "ratio": ratio,
                                                            "recovered": False, "prune_seconds": recipe["seconds"],
                                                            "achieved_ratio": recipe["achieved_ratio"]})
        return Path(recipe["path"])

    def recover(method: str, pruned: Path, ratio: float = 0.2, mode: str = "lora") -> None:
        budget = f"{mode}{args.tokens}t" if args.tokens else f"lora{args.records}"
        tuned = pruned.with_name(f"{pruned.name}-{budget}")
        if args.tokens is None:
            data = ["--data", "alpaca", "--max-records", str(args.records), "--epochs", "1"]
        elif mode == "lora":
            data = ["--data", "alpaca", "--tokens", str(args.tokens)]
        else:
            data = ["--data", "c4", "--tokens", str(args.tokens), "--teacher", args.model, "--kd-hidden", args.kd_hidden]
        if not tuned.is_dir():
            print(f"[{time.strftime('%H:%M:%S')}] recovering {method} {ratio:.0%} ({budget})", file=sys.stderr, flush=True)
            resume = ["--resume"] if tuned.with_name(tuned.name + ".checkpoints").is_dir() else []
            curve = ["--eval-every", args.eval_every] if args.eval_every else []
            _hywia("finetune", "--model", str(pruned), *data, "--dtype", "bfloat16", "--save-steps", "4", "--out", str(tuned),
                   "--seed", str(args.seed), "--device", args.device, *RECOVERED[method], *curve, *resume, *grid.common)
        tune = json.loads((tuned / "hywia.json").read_text())["finetune"]
        label = "LoRA" if mode == "lora" else f"KD (hidden {args.kd_hidden})"
        grid.evaluate(f"{method} {ratio} {budget}", str(tuned), {
            "name": f"{method} {ratio:.0%} + {label}", "method": method, "ratio": ratio, "recovered": True, "mode": mode,
            "finetune_seconds": tune["seconds"], "finetune_steps": tune["steps"], "finetune_records": tune["data"]["trained"],
            "finetune_tokens": tune.get("tokens"), "guard": tune.get("guard"), "groups": tune["settings"].get("groups", 1),
            "finetune_peak_rss_mb": tune.get("peak_rss_mb"), "finetune_processes": tune.get("processes"),
            "finetune_resumed_from": tune.get("resumed_from"), "finetune_curve": tune.get("curve") or None})
        # seconds and peak memory are the last process's; the curve is WikiText-2 validation ppl against tokens (--eval-every)

    attempt(grid.evaluate, "dense", args.model, {"name": "dense", "method": "dense", "ratio": 0.0, "recovered": False})
    methods = [m for m in args.methods.split(",") if m]
    for ratio in [float(r) for r in args.ratios.split(",")]:
        pruned = {method: attempt(prune, method, ratio) for method in methods}
        if f"{ratio:g}" in args.recover_ratios.split(",") and not args.no_recovery:  # recovery right after its pruned rows
            for method in RECOVERED:
                for mode in (args.recovery.split(",") if args.tokens else ["lora"]):
                    if pruned.get(method) is not None:
                        attempt(recover, method, pruned[method], ratio, mode)


if __name__ == "__main__":
    main()
