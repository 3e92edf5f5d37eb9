"""Why balanced query-head pruning loses at layer scope: per layer, the loss increase of removing what
Element² removes at 20% with `--attention-unit query` (the lowest-scored query head of every KV group) against
`--attention-unit kv` (the lowest-scored whole KV group), each layer on its own and all layers at once.

    HYWIA_DATA_DIR=../shared/data python benchmarks/query_heads.py

Removal is simulated by zeroing the heads' output-projection columns (equal to physical removal: tested in
tests/test_query_heads.py). The loss is measured on 8 windows of 128 tokens of WikiText-2 *validation* (the
calibration text, a draw disjoint from the calibration windows' seed), never the test split.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from hywia import load_model, prune  # noqa: E402
from hywia.adapters import adapter_for  # noqa: E402
from hywia.bench import machine  # noqa: E402
from hywia.data import calibration_ids  # noqa: E402
from hywia.grouping import head_counts, head_dim  # noqa: E402
from hywia.importance import Stats  # noqa: E402


def removed_heads(kept: list[int], unit: str, n_heads: int, n_kv: int) -> list[int]:
    """Query heads a run removed, from its kept list (query heads, or KV groups of n_heads // n_kv heads)."""
    if unit == "query":
        return [h for h in range(n_heads) if h not in kept]
    per_group = n_heads // n_kv
    return [h for g in range(n_kv) if g not in kept for h in range(g * per_group, (g + 1) * per_group)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="element2")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=os.environ.get("HYWIA_DATA_DIR", "../shared/data"))
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results" / "query_heads.jsonl")
    args = parser.parse_args()
    dense, tokenizer = load_model(args.model)
    ids, _ = calibration_ids(dense, tokenizer, "wikitext2", 8, 128, args.seed + 5, args.data_dir)
    adapter, size = adapter_for(dense.config), head_dim(dense.config)
    layers = dense.get_submodule(adapter.layers)
    reader = next(m.path for m in adapter.attention if m.dim == 1)
    with torch.no_grad():
        base = dense(ids, labels=ids).loss.item()

    def loss_increase(removed: dict[int, list[int]]) -> float:
        model = copy.deepcopy(dense)
        for layer, heads in removed.items():
            weight = model.get_submodule(f"{adapter.layers}.{layer}.{reader}").weight.data
            for h in heads:
                weight[:, h * size:(h + 1) * size] = 0
        with torch.no_grad():
            return model(ids, labels=ids).loss.item() - base

    stats = Stats(seed=args.seed)
    removed = {}
    for unit, kind in (("query", "query"), ("kv", "attention")):
        _, report = prune(copy.deepcopy(dense), tokenizer, method=args.method, ratio=args.ratio, seed=args.seed,
                          data_dir=args.data_dir, stats=stats, target="attention", attention_unit=unit)
        removed[unit] = {}
        for layer in range(len(layers)):
            n_heads, n_kv = head_counts(dense, f"{adapter.layers}.{layer}", adapter)
            removed[unit][layer] = removed_heads(report.kept[f"{layer}.{kind}"], unit, n_heads, n_kv)
    row = {"model": args.model, "method": args.method, "ratio": args.ratio, "seed": args.seed, "base_loss": base,
           "all_layers": {unit: loss_increase(removed[unit]) for unit in removed},
           "per_layer": [{"layer": layer, **{f"{unit}_heads": removed[unit][layer] for unit in removed},
                          **{unit: loss_increase({layer: removed[unit][layer]}) for unit in removed}} for layer in range(len(layers))],
           "machine": machine()}
    print(f"all layers: query heads {row['all_layers']['query']:+.3f}, KV groups {row['all_layers']['kv']:+.3f} nats")
    for r in row["per_layer"]:
        print(f"layer {r['layer']:2d}: query heads {r['query_heads']} {r['query']:+.3f}, KV group heads {r['kv_heads']} {r['kv']:+.3f}")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with args.results.open("a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
