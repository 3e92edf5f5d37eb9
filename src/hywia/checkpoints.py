"""Checkpoints of a fine-tuning run and of a prune: written atomically, found on resume, and removed (only what
hywia wrote) once the model is saved."""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import HywiaError, Interrupted
from .importance import Moments, Scores, Stats

if TYPE_CHECKING:
    from .prune import Pruning

OWNED = ".hywia-checkpoints"  # marks a checkpoint folder hywia created, and so may remove once it is empty


def save_checkpoint(directory: Path, step: int, lora: dict[str, torch.nn.Parameter], optimizer, scheduler, recipe: dict,
                     losses: list[float], tokens: int, curve: list[dict]) -> None:
    state = {"step": step, "recipe": recipe, "losses": losses, "tokens": tokens, "curve": curve, "rng": torch.get_rng_state(),
             "lora": {n: p.detach().clone() for n, p in lora.items()},
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    _atomic_save(state, directory / f"step-{step}.pt")  # a kill leaves the previous checkpoint intact
    for old in directory.glob("step-*.pt"):
        if old.name != f"step-{step}.pt":
            old.unlink()


def remove_checkpoints(directory: Path) -> None:
    """Remove what hywia wrote in `directory` (step-N.pt and unfinished .step-N.pt.tmp files), and the folder itself
    only if hywia created it and nothing else is in it: a --checkpoint-dir a user named keeps their own files."""
    if not directory.is_dir():
        return
    for file in [*directory.glob("step-*.pt"), *directory.glob(".step-*.pt.tmp"), *directory.glob(SPLIT), *directory.glob(f".{SPLIT}.tmp")]:
        file.unlink()
    if (directory / OWNED).is_file() and [p.name for p in directory.iterdir()] == [OWNED]:
        (directory / OWNED).unlink()
        directory.rmdir()


def latest_checkpoint(directory: Path) -> Path | None:
    found = sorted(directory.glob("step-*.pt"), key=lambda p: int(p.stem.split("-")[1])) if directory.is_dir() else []
    return found[-1] if found else None


SPLIT = "split.pt"  # a prune's checkpoint: everything its build stage reads, written once the split is chosen


class SplitCheckpoint:
    """A prune's stages before its build (calibrate, score, split), kept in `directory/split.pt` once the split is
    chosen, so a reconstructing prune killed during its walks (on two CPU cores at 1.5B, hours of work) resumes at the
    build: `read()` gives back the scores and shares, and puts the draws, records and costs of those
    stages back into the run. A checkpoint is read only for the recipe and the weights it was made from."""

    def __init__(self, directory: Path | None, run: Pruning, resume: bool):
        self.run, self.path = run, (directory / SPLIT if directory is not None else None)
        self.key = {"recipe": run.recipe.as_dict(), "model": fingerprint(run.model, run.recipe.calib)} if directory else {}
        check_resume(directory, resume)

    def read(self) -> tuple[Scores, list] | None:
        """The scores and shares of the checkpoint (None without one), its draws and records put back into the run."""
        if self.path is None or not self.path.is_file():
            return None
        state = torch.load(self.path, weights_only=True)
        if state["key"] != self.key:
            raise HywiaError(f"{self.path} was made by another recipe or from other weights; resume with the same command "
                             "and model, or remove it to start over")
        run = self.run
        run.recipe = replace(run.recipe, judge_calib=state["judge_calib"])
        run.walk_ids, run.judge_ids = state["walk_ids"], state["judge_ids"]
        run.calib_record, run.extra = state["calib_record"], state["extra"]
        run.judge_texts = {name: slice(*bounds) for name, bounds in state["judge_texts"].items()}
        means = {name: Moments(count, total, squares) for name, (count, total, squares) in state["means"].items()}
        run.stats = Stats(seed=run.recipe.seed, inputs=means)  # all the build reads of the statistics: compensation's means
        run.costs.stages.update(state["stages"])
        run.costs.peak_mb = max(run.costs.peak_mb, state["peak_mb"])
        run.started -= state["seconds"]  # the report's seconds are the whole prune's, both processes
        run.extra["resumed"] = {"from": "split", "seconds_before": round(state["seconds"], 3)}
        scores = Scores(state["per_set"], state["details"], state["layer_ratios"])
        return scores, state["shares"]

    def write(self, scores: Scores, shares: list) -> None:
        """Keep the run's state for its build, atomically, where a build with a walk follows."""
        run = self.run
        if self.path is None or not run.recipe.reconstruct:
            return
        means = {name: (m.count, m.total, m.squares) for name, m in run.stats.inputs.items()} if run.recipe.compensate else {}
        state = {"key": self.key, "judge_calib": run.recipe.judge_calib, "walk_ids": run.walk_ids, "judge_ids": run.judge_ids,
                 "judge_texts": {name: (s.start, s.stop) for name, s in run.judge_texts.items()},
                 "calib_record": run.calib_record, "extra": run.extra, "means": means, "stages": run.costs.stages,
                 "peak_mb": run.costs.peak_mb, "seconds": time.perf_counter() - run.started, "per_set": scores.per_set,
                 "details": scores.details, "layer_ratios": scores.layer_ratios, "shares": shares}
        _atomic_save(state, self.path)


def kept_split(directory: Path | None) -> str | None:
    """What a rerun can start from, if `directory` keeps a prune's stages before its build (None if it does not)."""
    if directory is None or not (directory / SPLIT).is_file():
        return None
    return f"the prune's calibration, scores and split are in {directory}: run the same command with --resume to continue from its build"


def interrupted(e: KeyboardInterrupt, directory: Path | None) -> Interrupted:
    """A prune's interruption as the user reads it: the signal, and what a rerun can start from, if anything."""
    kept = kept_split(directory)
    return Interrupted(getattr(e, "signal_name", "SIGINT"), f"no output was written; {kept}" if kept else None)


def check_resume(directory: Path | None, resume: bool) -> None:
    """Refuse to start a prune over its own checkpoint by accident, or to resume one that is not there."""
    if resume and directory is None:
        raise HywiaError("resume=True needs the checkpoint_dir the prune kept its stages in")
    found = directory is not None and (directory / SPLIT).is_file()
    if found and not resume:
        raise HywiaError(f"{directory} holds a prune's checkpoint ({SPLIT}); pass --resume to continue it, or remove it to start over")
    if resume and not found:
        raise HywiaError(f"--resume found no prune checkpoint in {directory}; run without --resume to start")


def fingerprint(model: torch.nn.Module, calib: object = None) -> str:
    """A digest of every weight's name, shape, dtype and 256 of its values (and of calibration token ids, if given):
    what tells a checkpoint's model from another without hashing gigabytes."""
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        digest.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        digest.update(flat[:: max(1, flat.numel() // 256)].float().cpu().numpy().tobytes())
    if isinstance(calib, torch.Tensor):
        digest.update(calib.cpu().numpy().tobytes())
    return digest.hexdigest()[:20]


def _atomic_save(state: dict, path: Path) -> None:
    if not path.parent.exists():
        path.parent.mkdir(parents=True)
        (path.parent / OWNED).touch()
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)  # atomic: a kill leaves no half-written checkpoint
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise HywiaError(f"cannot write a checkpoint in {path.parent} ({e.strerror or e}); free disk space or pass another --checkpoint-dir") from None
