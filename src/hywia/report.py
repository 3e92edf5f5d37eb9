"""The report stage of a prune: what was removed, per layer and kind, and what the run cost (hywia.json's body)."""
from __future__ import annotations

import hashlib
import resource
from dataclasses import dataclass, field

import torch
from torch import nn

from .allocate import allocate
from .errors import HywiaError
from .grouping import LayerGroups
from .options import report_record
from .recipe import Recipe


@dataclass
class PruneReport:
    method: str
    ratio: float
    achieved_ratio: float
    scope: str
    target: str
    layers: list[int]
    params_before: int
    params_after: int
    prunable_before: int
    prunable_after: int
    per_layer: list[dict]
    kept: dict[str, list[int]]
    calibration: dict
    seed: int
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    extra: dict = field(default_factory=dict)
    # intermediate per-group scores by name ("fine", "alpha", ...) and "LAYER.KIND": kept out of JSON, saved as safetensors
    scores: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)
    recipe: Recipe | None = None  # every option, resolved: what `--recipe` replays

    def as_dict(self) -> dict:
        return report_record(self, skip=("scores",))


def kept_params_per_layer(sets: list[LayerGroups], removed: list[torch.Tensor]) -> dict[int, int]:
    kept: dict[int, int] = {}
    for s, r in zip(sets, removed):
        kept[s.layer] = kept.get(s.layer, 0) + (s.count - len(r)) * s.params_per_group
    return kept


def compare_allocations(sets: list[LayerGroups], details: dict[str, list[torch.Tensor]], ratio: float,
                        min_keep: int, attention_share: float | None = None) -> dict[str, dict[str, dict[int, int]]]:
    """Kept parameters per layer if each kept score alone drove the pruning, under both scopes and the run's split
    of the budget between attention and MLP (for figures)."""
    compared: dict[str, dict[str, dict[int, int]]] = {}
    for scope in ("layer", "global"):
        compared[scope] = {}
        for name in ("fine", "coarse", "fused"):
            if name in details:
                try:
                    compared[scope][name] = kept_params_per_layer(sets, allocate(sets, details[name], ratio, scope, min_keep,
                                                                                  attention_share=attention_share))
                except HywiaError:  # e.g. a global ranking by one granularity alone that would empty a layer
                    pass
    return compared


def peak_rss_mb() -> float:
    """The process's peak resident memory so far, in MiB (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fingerprint(model: nn.Module, calib: object = None) -> str:
    """A digest of every weight's name, shape, dtype and 256 of its values (and of calibration token ids, if given):
    what tells one model's weights from another's without hashing gigabytes (a prune's checkpoint records it)."""
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        digest.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        digest.update(flat[:: max(1, flat.numel() // 256)].float().cpu().numpy().tobytes())
    if isinstance(calib, torch.Tensor):
        digest.update(calib.cpu().numpy().tobytes())
    return digest.hexdigest()[:20]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
