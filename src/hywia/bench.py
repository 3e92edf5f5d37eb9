"""Benchmark grids: every run is a separate `hywia` process, so its wall time and peak memory are its own.

A row prunes (or, at ratio 0, evaluates the dense model) and measures perplexity with one protocol for all
rows. Results are appended to a JSON-lines file as they finish, so a long grid that is stopped keeps what it
measured and a rerun skips rows already there.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Row:
    model: str
    method: str
    ratio: float
    seed: int = 0
    samples: int = 10
    seq_len: int = 128
    extra: tuple[str, ...] = ()  # more `hywia prune` flags, e.g. ("--fusion", "fixed")

    @property
    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def _hywia(*args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "hywia.cli", *args, "--json"], capture_output=True, text=True)
    for line in dict.fromkeys(l for l in done.stderr.splitlines() if l.startswith("hywia: warning:")):
        print(line, file=sys.stderr, flush=True)  # the step's warnings, once each, where the grid's log shows them
    if done.returncode != 0:  # name the error line, not the last progress bar
        lines = [l for l in done.stderr.replace("\r", "\n").splitlines() if l.strip() and "it/s]" not in l]
        reason = next((l for l in reversed(lines) if l.startswith("hywia: error") or "Error" in l), lines[-1] if lines else "")
        raise RuntimeError(f"hywia {' '.join(args)} failed (exit {done.returncode}): {reason}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def warn_emulated(dtype: str, device: str) -> None:
    """Say before a grid starts what `hywia` would say only after its first step: this CPU emulates the half type
    its evaluation or recovery will run in, tens of times slower than float32 (benchmarks/half_speed.py)."""
    import torch

    from .io import DTYPES, emulated_half
    if emulated_half(DTYPES[dtype], device):
        print(f"hywia: warning: this CPU emulates {dtype} (no AVX-512 or AMX): every {dtype} step of this grid runs tens of "
              f"times slower than float32 would (torch {torch.__version__}, CPU capability "
              f"{torch.backends.cpu.get_cpu_capability()})", file=sys.stderr, flush=True)


def cpu_name() -> str:
    """The processor's model name where Linux gives one: machines of one kind differ (an Intel Xeon with AVX-512 one
    day, an AMD EPYC with AVX2 the next), and their seconds are not comparable."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or "unknown CPU"


def machine(device: str = "cpu") -> str:
    """Where a figure was measured: the CPU always, and the accelerator when the work ran on one."""
    cpu = f"{cpu_name()}, {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    if not device.startswith("cuda"):
        return cpu
    import torch  # only here: the benchmark drivers that call machine() need no torch otherwise
    return f"{torch.cuda.get_device_name(device)}, {cpu}"


def allocator_env() -> dict[str, str]:
    """The C allocator's settings from the environment (glibc reads MALLOC_*_ and GLIBC_TUNABLES at start), which
    every `hywia` process a row runs inherits: they change a prune's peak memory and time, so a row records them."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"}


def _prune(row: Row, data_dir: str, out: str) -> dict:
    return _hywia("prune", "--model", row.model, "--method", row.method, "--ratio", str(row.ratio),
                  "--samples", str(row.samples), "--seq-len", str(row.seq_len), "--seed", str(row.seed),
                  "--data-dir", data_dir, "--out", out, *row.extra)


def kept_digest(kept: dict) -> str:
    """A digest of a prune's kept groups (hywia.json's "kept"): two rows with the same digest removed the same groups."""
    return hashlib.sha1(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:12]


def weights_digest(folder: Path) -> str:
    """A digest of a saved model's weight files: two rows with the same digest pruned to the same weights, bit for bit."""
    digest = hashlib.sha1()
    for path in sorted(folder.glob("*.safetensors")):
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()[:12]


def run_row(row: Row, data: list[str], data_dir: str, eval_seq_len: int = 128, max_windows: int | None = 100) -> dict:
    """Prune (unless ratio is 0) and, if `data` names datasets, evaluate one row; returns its measurements."""
    result: dict = {"row": asdict(row), "machine": machine()}
    env = allocator_env()
    if env:
        result["env"] = env
    with tempfile.TemporaryDirectory() as tmp:
        model = row.model
        if row.ratio > 0:
            model = str(Path(tmp) / "pruned")
            pruned = _prune(row, data_dir, model)
            result.update(params=pruned["params_after"], prune_seconds=pruned["seconds"], load_seconds=pruned["load_seconds"],
                          peak_rss_mb=pruned["peak_rss_mb"], achieved_ratio=pruned["achieved_ratio"],
                          params_before=pruned["params_before"], stages=pruned.get("extra", {}).get("stages"),
                          kept_digest=kept_digest(pruned["kept"]),
                          weights_digest=weights_digest(Path(model)))
            if "kind_split_evidence" in pruned.get("extra", {}):  # the screens' shares and the judge's verdict, if any
                result["kind_split_evidence"] = pruned["extra"]["kind_split_evidence"]
        if data:
            ppl = _hywia("eval", "ppl", "--model", model, "--data", *data, "--seq-len", str(eval_seq_len),
                         "--max-windows", str(max_windows), "--data-dir", data_dir)
            result.update(params=ppl["params"], ppl={k: v["ppl"] for k, v in ppl["ppl"].items()},
                          windows={k: v["windows"] for k, v in ppl["ppl"].items()})
    return result


def run_grid(rows: list[Row], results: Path, data: list[str], data_dir: str, eval_seq_len: int = 128,
             max_windows: int = 100) -> list[dict]:
    """Run rows not yet in `results` (JSON lines), appending each as it finishes; returns all results."""
    done = {}
    if results.exists():
        for line in results.read_text().splitlines():
            record = json.loads(line)
            done[Row(**{**record["row"], "extra": tuple(record["row"]["extra"])}).key] = record
    results.parent.mkdir(parents=True, exist_ok=True)
    for row in rows:
        if row.key in done:
            continue
        print(f"running {row}", file=sys.stderr, flush=True)
        record = run_row(row, data, data_dir, eval_seq_len, max_windows)
        done[row.key] = record
        with results.open("a") as f:
            f.write(json.dumps(record) + "\n")
    return [done[row.key] for row in rows]


def markdown_table(records: list[dict], data: list[str]) -> str:
    """One line per record: method, ratio, params, ppl per dataset, prune seconds, peak RSS."""
    head = "| method | ratio | seed | params | " + " | ".join(f"{d} ppl" for d in data) + " | prune s | peak RSS MB |"
    lines = [head, "|" + "---|" * (6 + len(data))]
    for r in records:
        row = r["row"]
        name = row["method"] + (" " + " ".join(row["extra"]) if row["extra"] else "") if row["ratio"] > 0 else "dense"
        ppl = " | ".join(f"{r['ppl'][d]:.2f}" for d in data)
        seconds = f"{r['prune_seconds']:.1f}" if "prune_seconds" in r else "-"
        rss = f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r else "-"
        lines.append(f"| {name} | {row['ratio']:.0%} | {row['seed']} | {r['params']:,} | {ppl} | {seconds} | {rss} |")
    return "\n".join(lines)


def grid_main(doc: str, rows: Callable[[str], list[Row]]) -> None:
    """The command line of a grid script: run `rows(model)` into the shared results file and print the table."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=os.environ.get("HYWIA_DATA_DIR", "../shared/data"))
    parser.add_argument("--max-windows", type=int, default=100)
    parser.add_argument("--results", type=Path, default=Path("benchmarks") / "results" / "smollm2.jsonl")
    args = parser.parse_args()
    data = ["wikitext2", "ptb"]
    records = run_grid(rows(args.model), args.results, data, args.data_dir, max_windows=args.max_windows)
    print(markdown_table(records, data))
