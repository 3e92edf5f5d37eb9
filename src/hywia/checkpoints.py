"""Checkpoints of a fine-tuning run and of a prune: written atomically, found on resume, and removed (only what
hywia wrote) once the model is saved."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import HywiaError, Interrupted

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


def remove_checkpoints(directory: Path, names: tuple[str, ...] = ("step-*.pt", ".step-*.pt.tmp")) -> None:
    """Remove the checkpoint files a finished run wrote (`names`: fine-tuning's steps by default; a prune passes
    PRUNE_FILES), and the folder itself only if hywia created it and nothing else is in it: a --checkpoint-dir a
    user named keeps their own files, and one run's cleanup never takes another kind of run's checkpoint."""
    if not directory.is_dir():
        return
    for file in [found for name in names for found in directory.glob(name)]:
        file.unlink()
    if (directory / OWNED).is_file() and [p.name for p in directory.iterdir()] == [OWNED]:
        (directory / OWNED).unlink()
        directory.rmdir()


def latest_checkpoint(directory: Path) -> Path | None:
    found = sorted(directory.glob("step-*.pt"), key=lambda p: int(p.stem.split("-")[1])) if directory.is_dir() else []
    return found[-1] if found else None


SPLIT = "split.pt"  # a prune's checkpoint: everything its build reads, written once the split is chosen (hywia.prune)
PRUNE_FILES = (SPLIT, f".{SPLIT}.tmp")  # what a finished prune removes from its checkpoint folder


def save_split(directory: Path, state: dict) -> None:
    """Keep a prune's state before its build (hywia.prune.keep_split) in `directory/split.pt`, atomically."""
    _atomic_save(state, directory / SPLIT)


def load_split(directory: Path, key: dict) -> dict:
    """The state `save_split` kept, refused unless it was made under `key` (the recipe and the weights' digest)."""
    path = directory / SPLIT
    state = torch.load(path, weights_only=True)
    if state["key"] != key:
        raise HywiaError(f"{path} was made by another recipe or from other weights; resume with the same command "
                         "and model, or remove it to start over")
    return state


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
