"""Checkpoints of a fine-tuning run: written atomically, the latest found on resume, and removed (only what hywia
wrote) once the merged model is saved."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import HywiaError

OWNED = ".hywia-checkpoints"  # marks a checkpoint folder hywia created, and so may remove once it is empty


def save_checkpoint(directory: Path, step: int, lora: dict[str, torch.nn.Parameter], optimizer, scheduler, recipe: dict,
                     losses: list[float], tokens: int, curve: list[dict]) -> None:
    if not directory.exists():
        directory.mkdir(parents=True)
        (directory / OWNED).touch()
    state = {"step": step, "recipe": recipe, "losses": losses, "tokens": tokens, "curve": curve, "rng": torch.get_rng_state(),
             "lora": {n: p.detach().clone() for n, p in lora.items()},
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    tmp = directory / f".step-{step}.pt.tmp"
    try:
        torch.save(state, tmp)
        os.replace(tmp, directory / f"step-{step}.pt")  # atomic: a kill leaves the previous checkpoint intact
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise HywiaError(f"cannot write a checkpoint in {directory} ({e.strerror or e}); free disk space or pass another --checkpoint-dir") from None
    for old in directory.glob("step-*.pt"):
        if old.name != f"step-{step}.pt":
            old.unlink()


def remove_checkpoints(directory: Path) -> None:
    """Remove what hywia wrote in `directory` (step-N.pt and unfinished .step-N.pt.tmp files), and the folder itself
    only if hywia created it and nothing else is in it: a --checkpoint-dir a user named keeps their own files."""
    if not directory.is_dir():
        return
    for file in [*directory.glob("step-*.pt"), *directory.glob(".step-*.pt.tmp")]:
        file.unlink()
    if (directory / OWNED).is_file() and [p.name for p in directory.iterdir()] == [OWNED]:
        (directory / OWNED).unlink()
        directory.rmdir()


def latest_checkpoint(directory: Path) -> Path | None:
    found = sorted(directory.glob("step-*.pt"), key=lambda p: int(p.stem.split("-")[1])) if directory.is_dir() else []
    return found[-1] if found else None
