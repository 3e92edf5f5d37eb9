"""What HyWIA's fusion changes: the alpha it produces and how far its pruned groups are from Element²'s and Vector's.

    HYWIA_DATA_DIR=../shared/data python benchmarks/hywia_selection.py

Prunes the packaged SmolLM2-135M at 20% (layer scope, 10 WikiText-2 validation windows of 128 tokens) with
`--method hywia` for seeds 0, 1, 2 (the seed draws the calibration windows and the fusion model), and reads each
run's scores.safetensors. With layer scope every layer prunes the same number of groups of each kind whatever the
scores, so the pruned set of a score is its k lowest groups per layer: the script compares those sets for the
fine-only (Element²), coarse-only (Vector), fixed-α 0.5 and fused scores of one seed, and across seeds.
`--normalize mean` runs the first reading of the scale handling instead of the default rank normalisation.
Output: a markdown summary; a rank run also copies seed 0's two figures to docs/figures/.
"""
import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from hywia.bench import _hywia

SEEDS = (0, 1, 2)


def pruned_sets(scores: dict[str, torch.Tensor], prune_counts: dict[str, int]) -> dict[str, set[int]]:
    """LAYER.KIND -> indices of its k lowest-scoring groups (k: how many the run pruned in that set)."""
    return {key: set(torch.argsort(s)[:prune_counts[key.split(".")[1]]].tolist()) for key, s in scores.items()}


def agreement(a: dict[str, set[int]], b: dict[str, set[int]], kind: str) -> float:
    """Fraction of the pruned groups of `kind` that two selections share."""
    keys = [k for k in a if k.endswith("." + kind)]
    return sum(len(a[k] & b[k]) for k in keys) / max(1, sum(len(a[k]) for k in keys))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=os.environ.get("HYWIA_DATA_DIR", "../shared/data"))
    parser.add_argument("--normalize", default="rank", choices=["rank", "mean"])
    parser.add_argument("--figures", type=Path, default=Path(__file__).parent.parent / "docs" / "figures")
    args = parser.parse_args()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in SEEDS:
            out = Path(tmp) / f"seed{seed}"
            _hywia("prune", "--model", args.model, "--method", "hywia", "--ratio", "0.2", "--samples", "10",
                   "--seq-len", "128", "--seed", str(seed), "--normalize", args.normalize, "--data-dir", args.data_dir, "--out", str(out))
            flat = load_file(str(out / "scores.safetensors"))
            runs[seed] = {name: {k.split("/", 1)[1]: t for k, t in flat.items() if k.startswith(name + "/")}
                          for name in ("fine", "coarse", "alpha", "fused")}
            config = json.loads((out / "config.json").read_text())
            kept = {"attention": config["num_key_value_heads"], "mlp": config["intermediate_size"]}
            if seed == 0 and args.normalize == "rank":
                args.figures.mkdir(parents=True, exist_ok=True)
                for name in ("kept_params.png", "alpha.png"):
                    shutil.copyfile(out / name, args.figures / name)
    first = runs[0]
    counts = {kind: first["fine"][next(k for k in first["fine"] if k.endswith("." + kind))].numel() - kept[kind]
              for kind in kept}
    sets = {}
    for seed, run in runs.items():
        fixed = {k: 0.5 * run["fine"][k] + 0.5 * run["coarse"][k] for k in run["fine"]}
        sets[seed] = {name: pruned_sets(run[name], counts) for name in ("fine", "coarse", "fused")}
        sets[seed]["fixed"] = pruned_sets(fixed, counts)

    print(f"pruned per layer: {counts}\n\n| kind | alpha mean | alpha std over groups | mean within-layer std | min | max |\n|---|---|---|---|---|---|")
    for kind in kept:
        alphas = [runs[s]["alpha"][k] for s in SEEDS for k in runs[s]["alpha"] if k.endswith("." + kind)]
        pooled = torch.cat(alphas)
        within = torch.stack([a.std() if a.numel() > 1 else torch.tensor(0.0) for a in alphas]).mean()
        print(f"| {kind} | {pooled.mean():.3f} | {pooled.std():.3f} | {within:.4f} | {pooled.min():.3f} | {pooled.max():.3f} |")
    comparisons = [(f"seed {s}: fused vs {ref}", (s, "fused"), (s, ref)) for s in SEEDS for ref in ("fine", "coarse", "fixed")]
    comparisons += [(f"seed {s}: fixed α 0.5 vs fine", (s, "fixed"), (s, "fine")) for s in SEEDS]
    comparisons += [(f"seed {s}: fine vs coarse", (s, "fine"), (s, "coarse")) for s in SEEDS]
    comparisons += [(f"seed {s} vs seed 0: {name}", (s, name), (0, name)) for s in SEEDS[1:] for name in ("fine", "fused")]
    print("\nshare of pruned groups two selections have in common\n\n| selections | attention | MLP |\n|---|---|---|")
    for title, (sa, na), (sb, nb) in comparisons:
        a, b = sets[sa][na], sets[sb][nb]
        print(f"| {title} | {agreement(a, b, 'attention'):.2f} | {agreement(a, b, 'mlp'):.2f} |")
    for kind in kept:
        fine, coarse = (torch.cat([first[n][k] for k in first[n] if k.endswith("." + kind)]) for n in ("fine", "coarse"))
        print(f"\n{kind} ({args.normalize}-normalised, seed 0): fine median {fine.median():.3f}, max {fine.max():.1f}; "
              f"coarse median {coarse.median():.3f}, max {coarse.max():.1f}")


if __name__ == "__main__":
    main()
