"""Each ingredient of hywia's own method, paired against the one before it, next to the baselines it
has to beat (Element² at 20%, FLAP with per-layer allocation at 50%), over calibration seeds, no recovery. The
chain ends at `--method hywia-adaptive --reconstruct no` (the default without its reconstruction); an ablation row ("- ...") removes one ingredient from it again, and the
"... as hywia-adaptive" rows give the baselines' own scores the same structure, allocation and split, so what the
hybrid scores themselves add is measured apart from what the structure adds. The last rows update the
kept weights: SlimGPT, and "X + reconstruction" (X's groups, then a least-squares refit of the weights that read
them on 128 calibration windows, layer by layer; with X's compensation, jointly with the biases), each paired with
the row PAIRED names; "+ both splits built" is `--method hywia-adaptive` ("hywia-adaptive + obs
selection" is `--kind-split evidence`).

    HYWIA_DATA_DIR=../shared/data python benchmarks/hybrid.py --models smollm2-135m --seeds 0,1,2
    python benchmarks/report.py          # the tables in docs/RESULTS.md

Per model and seed the dense model is loaded once and the calibration statistics (gradients, Fisher, input
moments, the held-out draw) are collected once and shared by every configuration (`prune(stats=...)`), so a
configuration costs its scoring, removal and evaluation only. Each pruned model is scored on two texts:
`heldout` (WikiText-2 *validation*, the calibration corpus: the one that may choose a configuration) and `test`
(WikiText-2 test: reported, never used to choose). One JSON line per (model, seed, ratio, configuration) goes to
benchmarks/results/hybrid.jsonl, with prune seconds and peak RSS.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from hywia import load_model, perplexity, prune  # noqa: E402
from hywia.bench import machine  # noqa: E402
from hywia.importance import Stats  # noqa: E402
from hywia.report import peak_rss_mb as _peak_rss_mb  # noqa: E402

# name -> prune keyword arguments; the order is the ingredient chain (each row adds one thing to the row before)
CONFIGS = {
    "element2": {"method": "element2"},
    "flap (layer scope)": {"method": "flap", "scope": "layer"},
    "hywia (paper: attention fusion)": {"method": "hywia"},
    "+ evidence fusion": {"method": "hywia", "fusion": "evidence"},
    "+ query heads": {"method": "hywia", "fusion": "evidence", "attention_unit": "query"},
    "+ compensation": {"method": "hywia", "fusion": "evidence", "attention_unit": "query", "compensate": True},
    # per-layer ratios: one ranking per kind over all layers, so query-head steps go where they cost least
    "+ global scope": {"method": "hywia", "fusion": "evidence", "attention_unit": "query", "compensate": True, "scope": "global"},
    # the attention/MLP split of the budget chosen by held-out calibration loss (hywia.split): all of hywia-adaptive
    "+ evidence split": {"method": "hywia-adaptive", "reconstruct": False},
    # ablation of the last row: paired with it ("-" rows, like "+" rows, are paired with the row before them)
    "- compensation": {"method": "hywia-adaptive", "compensate": False, "reconstruct": False},
    # the same structure, allocation and split under the baselines' own scores: what the hybrid scores add
    "element2 + query heads + compensation": {"method": "element2", "attention_unit": "query", "compensate": True},
    "element2 as hywia-adaptive": {"method": "element2", "attention_unit": "query", "compensate": True, "scope": "global",
                                   "kind_split": "evidence"},
    "flap as hywia-adaptive": {"method": "flap", "attention_unit": "query", "scope": "global", "kind_split": "evidence"},
    # methods that update the kept weights (hywia.reconstruct), each "X + reconstruction" paired with X
    "slimgpt": {"method": "slimgpt"},
    "element2 + reconstruction": {"method": "element2", "reconstruct": True},
    "hywia-adaptive + reconstruction": {"method": "hywia-adaptive", "reconstruct": True},  # refit jointly with the biases
    "- compensation + reconstruction": {"method": "hywia-adaptive", "compensate": False, "reconstruct": True},  # refit replaces it
    # hywia-adaptive's allocation (how many groups each set loses), OBS errors on the pruned prefix choosing which
    "hywia-adaptive + obs selection": {"method": "hywia-adaptive", "reconstruct": "obs", "kind_split": "evidence"},
    # the attention/MLP split weighed on candidates refit one-shot, as the walk will build the model (hywia.split)
    "+ refit-weighed split": {"method": "hywia-adaptive", "reconstruct": "obs", "kind_split": "evidence-refit"},
    # both screens; where their shares differ, both models built by the walk and judged on a draw of their own: the
    # masked screen's kept unless the refit one wins beyond the draw's noise (hywia.split.judged_share)
    "+ both splits built": {"method": "hywia-adaptive", "reconstruct": "obs", "kind_split": "evidence-best"},
}
# the row each issue-22 row is paired with (the others: "+"/"-" with the row before them in CONFIGS)
PAIRED = {"element2 + reconstruction": "element2", "hywia-adaptive + reconstruction": "+ evidence split",
          "- compensation + reconstruction": "hywia-adaptive + reconstruction",
          "hywia-adaptive + obs selection": "hywia-adaptive + reconstruction", "+ both splits built": "hywia-adaptive + obs selection"}
# chain rows that a method name gives (tested equal); the default method's reconstruction is the chain's last step
NAMED = {"+ evidence split": "--method hywia-adaptive --reconstruct no",
         "hywia-adaptive + obs selection": "--method hywia-adaptive --kind-split evidence",
         "+ both splits built": "--method hywia-adaptive"}


def reset_peak_rss() -> None:
    """Linux: start the process's peak resident set (VmHWM) afresh, so the next reading is one configuration's peak.
    Elsewhere nothing is reset and `peak_rss_mb` reports the whole process's peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """VmHWM since the last reset (Linux); the whole process's peak where that cannot be read."""
    status = Path("/proc/self/status")
    for line in (status.read_text().splitlines() if status.exists() else []):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return _peak_rss_mb()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2-135m")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--ratios", default="0.2,0.5")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names from CONFIGS")
    parser.add_argument("--windows", type=int, default=100, help="128-token windows of each text (the first N)")
    parser.add_argument("--data-dir", default=os.environ.get("HYWIA_DATA_DIR", "../shared/data"))
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results" / "hybrid.jsonl")
    args = parser.parse_args()
    done = {json.loads(l)["key"] for l in args.results.read_text().splitlines()} if args.results.exists() else set()
    heldout_text = str(Path(args.data_dir) / "wikitext2" / "wiki.valid.raw")
    for name in args.models.split(","):
        dense, tokenizer = load_model(name)
        for seed in [int(s) for s in args.seeds.split(",")]:
            stats = Stats(seed=seed)
            for ratio in [float(r) for r in args.ratios.split(",")]:
                for config in args.configs.split(","):
                    key = json.dumps({"model": name, "seed": seed, "ratio": ratio, "config": config, "windows": args.windows}, sort_keys=True)
                    if key in done:
                        continue
                    print(f"[{time.strftime('%H:%M:%S')}] {name} seed {seed} {ratio:.0%} {config}", file=sys.stderr, flush=True)
                    shared = bool(stats.grad)  # later configurations of a seed reuse the gradients the first one collected
                    reset_peak_rss()
                    start = time.perf_counter()
                    model, report = prune(copy.deepcopy(dense), tokenizer, ratio=ratio, seed=seed, data_dir=args.data_dir,
                                          stats=stats, **CONFIGS[config])
                    seconds = time.perf_counter() - start
                    prune_peak = peak_rss_mb()  # the dense copy, statistics and the pruning itself
                    model = model.to(torch.bfloat16)
                    ppl = {text: perplexity(model, tokenizer, data, seq_len=128, max_windows=args.windows, data_dir=args.data_dir).ppl
                           for text, data in (("heldout", heldout_text), ("test", "wikitext2"))}
                    alphas = {k: round(v[0].item(), 2) for k, v in report.scores.get("alpha", {}).items()} if config.startswith(("+", "-")) else {}
                    row = {"key": key, "model": name, "seed": seed, "ratio": ratio, "config": config, "options": CONFIGS[config],
                           "achieved_ratio": report.achieved_ratio, "params_after": report.params_after, "ppl": ppl,
                           "alphas": alphas, "kind_split": report.extra.get("kind_split_evidence"), "prune_seconds": seconds, "shared_stats": shared, "process_peak_rss_mb": _peak_rss_mb(),
                           "prune_peak_rss_mb": prune_peak,
                           "windows": args.windows, "machine": machine()}
                    with args.results.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    done.add(key)
                    del model


if __name__ == "__main__":
    main()
