"""Pruned models in llama.cpp: perplexity against transformers on the same windows, and speed.

    HYWIA_DATA_DIR=../shared/data python benchmarks/in_llama_cpp.py [--pause-group PGID]

Prunes SmolLM2-135M with `hywia-adaptive` (the default: per-layer widths, so the file is llama.cpp's `deci`
architecture) at 20% and 50%, as it is and with `--round-to 32` (FFN widths a multiple of q8_0/q4_0's block, so no
matrix stays f16), and with `element2` at 20% (`--scope layer`: uniform widths, `llama`), once, into runs/llama_cpp/; exports each and the dense model with `hywia export` as f16, q8_0 and q4_0 (f32 for the
perplexity reference), then measures with llama-cpp-python (llama.cpp built from source):

- perplexity: WikiText-2 test, the first `--windows` windows of 128 tokens (LLM-Pruner's protocol, as
  `hywia eval ppl --max-windows`), each window scored on its own from llama.cpp's logits, beside transformers'
  float32 perplexity on the same windows;
- speed: prefill tokens/s of a 128-token prompt and decode tokens/s of `--new-tokens` tokens (one at a time),
  batch 1, `--threads` threads (the machine's cores), median of `--repeats` after a warm-up; the speedup over dense
  against the ideal 1 / (1 - fraction of parameters removed).

Rows go to benchmarks/results/llama_cpp.jsonl, each with the run's start time (`run`), and
`python benchmarks/report.py` prints the latest run's tables; `--pause-group` SIGSTOPs another process group while
timing, so a quiet machine is only needed for the seconds of the timings.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from hywia.bench import _hywia, machine  # noqa: E402
from speed import paused  # noqa: E402

# measured before hywia-adaptive's default became --reconstruct obs: pinned off so the rows reproduce;
# the widths, and so the speeds, are the same either way (obs keeps each layer's count)
CHOOSE_ONLY = ["--method", "hywia-adaptive", "--reconstruct", "no"]
MODELS = {"hywia-adaptive 20%": [*CHOOSE_ONLY, "--ratio", "0.2"],
          "hywia-adaptive 50%": [*CHOOSE_ONLY, "--ratio", "0.5"],
          "hywia-adaptive 20% (round-to 32)": [*CHOOSE_ONLY, "--ratio", "0.2", "--round-to", "32"],
          "hywia-adaptive 50% (round-to 32)": [*CHOOSE_ONLY, "--ratio", "0.5", "--round-to", "32"],
          "element2 20% (layer)": ["--method", "element2", "--ratio", "0.2"]}


def llama(path: Path, threads: int):
    import llama_cpp
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=threads,
                           n_threads_batch=threads, n_batch=256)


def llama_ppl(path: Path, windows: np.ndarray, threads: int) -> float:
    """llama.cpp's perplexity of these windows: hywia.llama_cpp.window_nll, what `hywia eval ppl --backend llama.cpp` runs."""
    import torch

    from hywia.llama_cpp import window_nll
    nll = window_nll(llama(path, threads), torch.as_tensor(windows)).sum().item()
    return math.exp(nll / (windows.shape[0] * (windows.shape[1] - 1)))


def llama_speed(path: Path, threads: int, prompt: list[int], new_tokens: int, repeats: int) -> dict:
    """Tokens/s by the wall clock around llama-cpp-python's calls (what a Python user gets) and by llama.cpp's own
    timers (`llama_perf_context`: the time inside llama_decode, what llama-bench reports), medians over `repeats`."""
    import llama_cpp
    llm = llama(path, threads)
    runs: dict[str, list[float]] = {"prefill_tps": [], "decode_tps": [], "prefill_tps_runtime": [], "decode_tps_runtime": []}
    for r in range(repeats + 1):  # the first is a warm-up
        llm.reset()
        llama_cpp.llama_perf_context_reset(llm._ctx.ctx)
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        token = int(np.argmax(llm.scores[len(prompt) - 1]))
        for _ in range(new_tokens):
            llm.eval([token])
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t2 = time.perf_counter()
        perf = llama_cpp.llama_perf_context(llm._ctx.ctx)
        if r:
            runs["prefill_tps"].append(len(prompt) / (t1 - t0))
            runs["decode_tps"].append(new_tokens / (t2 - t1))
            runs["prefill_tps_runtime"].append(1000 * perf.n_p_eval / perf.t_p_eval_ms)
            runs["decode_tps_runtime"].append(1000 * perf.n_eval / perf.t_eval_ms)
    return {name: statistics.median(values) for name, values in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=os.environ.get("HYWIA_DATA_DIR", "../shared/data"))
    parser.add_argument("--windows", type=int, default=100)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=128, help="decoded tokens per timed run")
    parser.add_argument("--types", default="f16,q8_0,q4_0")
    parser.add_argument("--work", type=Path, default=Path("runs") / "llama_cpp")
    parser.add_argument("--pause-group", type=int, default=None)
    parser.add_argument("--pad-to", type=int, default=32, help="hywia export --pad-to: FFN widths padded with zero channels "
                        "to a multiple of N (32, the default export; 1: the widths as pruned)")
    parser.add_argument("--models", default=",".join(MODELS), help="which pruned models (comma-separated names; dense always)")
    parser.add_argument("--use", action="append", default=[], metavar="NAME=FOLDER",
                        help="measure an already pruned model folder under NAME (e.g. a Table 1 model) instead of pruning; repeatable")
    parser.add_argument("--no-f32", action="store_true", help="skip the f32 file and its perplexity (at 1.5B it is 7 GB; "
                        "the transformers column is the float reference)")
    parser.add_argument("--drop-files", action="store_true", help="delete each GGUF this run exported once measured (disk: a 1.5B model is 3.5 GB in f16)")
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results" / "llama_cpp.jsonl")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    run = time.strftime("%Y-%m-%dT%H:%M:%S")

    from hywia.data import consecutive_windows, load_text, tokenize
    from hywia.io import load_model
    _, tokenizer = load_model(args.model)
    text = load_text("wikitext2", "test", args.data_dir)
    windows = consecutive_windows(tokenize(tokenizer, text.text), 128, None, args.windows).numpy()
    prompt = windows[0].tolist()

    folders = {"dense": args.model}
    for name, flags in ((n, MODELS[n]) for n in args.models.split(",") if n):
        out = args.work / name.replace(" ", "-").replace("%", "").replace("(", "").replace(")", "")
        if not out.is_dir():
            _hywia("prune", "--model", args.model, *flags, "--data-dir", args.data_dir, "--out", str(out))
        folders[name] = str(out)
    for name, folder in (given.split("=", 1) for given in args.use):
        folders[name] = folder

    rows = []
    for name, folder in folders.items():
        params = _hywia("eval", "ppl", "--model", folder, "--data", "wikitext2", "--max-windows", str(args.windows),
                        "--data-dir", args.data_dir)
        row = {"name": name, "params": params["params"], "transformers_ppl": params["ppl"]["wikitext2"]["ppl"],
               "windows": args.windows, "threads": args.threads, "machine": machine(), "run": run,
               "prompt_tokens": len(prompt), "new_tokens": args.new_tokens, "pad_to": args.pad_to}
        for kind in [*([] if args.no_f32 else ["f32"]), *args.types.split(",")]:
            path = args.work / f"{Path(folder).name}.{kind}{'' if args.pad_to == 1 else f'.pad{args.pad_to}'}.gguf"
            done = None if path.is_file() else _hywia("export", "--model", folder, "--type", kind, "--out", str(path),
                                                      "--pad-to", str(args.pad_to))["export"]
            if done is not None:
                row["arch"], row["padded_channels"] = done["arch"], done["padded_channels"]
            row[f"{kind}_mib"] = path.stat().st_size / 2**20
            row[f"{kind}_ppl"] = llama_ppl(path, windows, args.threads)
            if kind != "f32":
                with paused(args.pause_group):
                    row[f"{kind}_speed"] = llama_speed(path, args.threads, prompt, args.new_tokens, args.repeats)
            if args.drop_files and done is not None:  # only a file this run exported, never one that was there before
                path.unlink()
        rows.append(row)
        print(json.dumps(row), flush=True)
    dense = rows[0]
    with args.results.open("a") as f:
        for row in rows:
            row["ideal_speedup"] = dense["params"] / row["params"]
            for kind in args.types.split(","):
                s = row[f"{kind}_speed"]
                for clock in ("", "_runtime"):
                    s[f"prefill_speedup{clock}"] = s[f"prefill_tps{clock}"] / dense[f"{kind}_speed"][f"prefill_tps{clock}"]
                    s[f"decode_speedup{clock}"] = s[f"decode_tps{clock}"] / dense[f"{kind}_speed"][f"decode_tps{clock}"]
                    s[f"decode_vs_ideal{clock}"] = s[f"decode_speedup{clock}"] / row["ideal_speedup"]
            f.write(json.dumps(row) + "\n")
    for row in rows:
        print(row["name"], row.get("arch"), f"ppl transformers {row['transformers_ppl']:.2f}",
              " ".join(f"{k} {row[f'{k}_ppl']:.2f}" for k in ["f32", *args.types.split(",")] if f"{k}_ppl" in row),
              " ".join(f"{k} decode {row[f'{k}_speed']['decode_tps']:.1f} t/s ({row[f'{k}_speed']['decode_vs_ideal']:.2f} of ideal)"
                       for k in args.types.split(",")))


if __name__ == "__main__":
    main()
