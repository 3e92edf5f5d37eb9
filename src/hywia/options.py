"""The allowed range of every numeric option, in one table, and the type of every option a recipe file records.

The command line checks every value against it before anything is loaded, and the Python API checks the values it
is given on entry, so 0 is never read as "unset", a negative count never becomes an empty tensor minutes later, and
NaN or infinity never reaches the math. Names are the Python names; the messages spell them as flags. A recipe file
(hywia.json) is checked field by field against its dataclass (`check_fields`), naming the file and the field.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import typing
from dataclasses import dataclass
from pathlib import Path

from .errors import HywiaError


@dataclass(frozen=True)
class Range:
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself excluded
    high_open: bool = False
    integer: bool = False
    what: str = ""

    def admits(self, value: float) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if self.integer and value != int(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or (value < self.high or (not self.high_open and value == self.high))

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        if self.low is not None and self.high is not None:
            bounds = f"{self.low:g} {'<' if self.low_open else '<='} x {'<' if self.high_open else '<='} {self.high:g}"
        elif self.low is not None:
            bounds = f"x {'>' if self.low_open else '>='} {self.low:g}"
        else:
            bounds = f"x {'<' if self.high_open else '<='} {self.high:g}"
        return f"give {kind} with {bounds}" + (f" ({self.what})" if self.what else "")


def _count(what: str, low: int = 1) -> Range:
    return Range(low, integer=True, what=what)


def _fraction(what: str) -> Range:
    return Range(0, 1, low_open=True, high_open=True, what=what)


RANGES: dict[str, Range] = {
    # prune
    "ratio": _fraction("the fraction of prunable parameters to remove"),
    "sparsity": _fraction("the fraction of decoder weights to zero"),
    "samples": _count("calibration windows"),
    "seq_len": _count("tokens per window", 2),
    "seed": Range(0, 2**63 - 1, integer=True, what="a seed"),
    "min_keep": _count("groups every layer keeps", 0),
    "round_to": _count("MLP channels are kept in multiples of it"),
    "alpha": Range(0, 1, what="the weight on the fine-grained score"),
    "fusion_dim": _count("the fusion model's width"),
    "spread": Range(0, what="how far ratios spread"),
    "sensitivity_samples": _count("calibration windows for the sensitivity"),
    "reconstruct_samples": _count("calibration windows the reconstruction fits on"),
    "judge_samples": _count("calibration windows that judge the two models of --kind-split evidence-best or evidence-both; a paired standard error needs two", 2),
    "wbits": Range(2, 16, integer=True, what="bits per kept weight"),
    "layers_per_pass": _count("decoder layers per gradient sweep"),
    "batch_size": _count("sequences per batch"),
    # eval
    "max_windows": _count("the first N windows are scored"),
    "limit": _count("the first N documents of each task are scored"),
    # finetune
    "rank": _count("the LoRA rank"),
    "lora_alpha": Range(0, low_open=True, what="the LoRA scaling numerator"),
    "lora_dropout": Range(0, 1, high_open=True, what="the LoRA dropout probability"),
    "lr": Range(0, low_open=True, what="the learning rate"),
    "micro_batch_size": _count("sequences per forward pass"),
    "epochs": _count("passes over the data"),
    "max_steps": _count("optimizer steps"),
    "max_records": _count("the first N records are used"),
    "warmup_steps": _count("steps of linear warmup", 0),
    "cutoff_len": _count("tokens per record", 2),
    "save_steps": _count("steps between checkpoints"),
    "groups": _count("groups of layers trained one after another"),
    "tokens": _count("the training budget in predicted tokens"),
    "eval_every": _count("steps between held-out perplexity measurements"),
    "eval_windows": _count("held-out windows measured"),
    "kd_temperature": Range(0, low_open=True, what="the distillation temperature"),
    "kd_hidden": Range(0, what="the weight of the hidden-state distillation loss"),
    # bench
    "prompt_len": _count("prompt tokens"),
    "new_tokens": _count("generated tokens: the first comes from the prefill, decode speed needs at least one more", 2),
    "repeats": _count("timed repeats"),
}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_values(**values: float | None) -> None:
    """Refuse the first value outside its range in RANGES (None means "not given" and passes)."""
    for name, value in values.items():
        if value is not None and not RANGES[name].admits(value):
            raise HywiaError(f"{flag(name)} {value} is out of range: {RANGES[name].describe()}")


def read_record(path: str | Path, made: str) -> object:
    """The JSON of a saved model's hywia.json (None if it is not JSON); a missing file is one line (`made`: what
    hywia did to the model whose record is wanted, "pruned" or "fine-tuned")."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise HywiaError(f"--recipe {path} not found: give the hywia.json of a model hywia {made}") from None
    except (OSError, ValueError):
        return None


def check_fields(cls: type, values: dict, where: str, key: str) -> None:
    """Every field of `values` is one of dataclass `cls`'s, of its type: else one line naming `where` and the field."""
    if not isinstance(values, dict):
        raise HywiaError(f"{where}: '{key}' is not an object of option names and values; give a hywia.json hywia wrote")
    known = typing.get_type_hints(cls)
    for name, value in values.items():
        if name not in known:
            raise HywiaError(f"{where}: unknown field '{name}' in {key}; remove it (its fields are the command's options, "
                             "with - written as _)")
        kinds = typing.get_args(known[name]) or (known[name],)
        if not _fits(value, kinds):
            wanted = " or ".join(_KIND_NAMES[k] for k in kinds if k is not type(None))
            raise HywiaError(f"{where}: field '{name}' is {json.dumps(value)}, not {wanted}; correct it or remove it")


_KIND_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _fits(value, kinds: tuple) -> bool:
    if value is None:
        return type(None) in kinds
    if isinstance(value, bool):
        return bool in kinds
    if isinstance(value, int):
        return int in kinds or float in kinds
    if isinstance(value, float):
        return float in kinds and value == value and abs(value) != float("inf")
    return isinstance(value, str) and str in kinds


def report_record(report, skip: tuple[str, ...] = ()) -> dict:
    """A prune or sparsity report as hywia.json holds it: its fields copied (those in `skip` left out) and its recipe
    as the recipe records itself (token ids by their shape)."""
    record = {f.name: copy.deepcopy(getattr(report, f.name)) for f in dataclasses.fields(report) if f.name not in (*skip, "recipe")}
    return {**record, "recipe": report.recipe.as_dict() if report.recipe is not None else None}
