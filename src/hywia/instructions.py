"""Training data for recovery: instruction records (Alpaca's prompt template, LLM-Pruner's recovery data) or plain
text windows (for distillation), tokenized into examples."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .data import SOURCES, bos_id, consecutive_windows, hub_reachable, load_text, tokenize
from .data import data_dir as resolve_data_dir
from .errors import HywiaError

PROMPT_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                     "Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
                   "### Instruction:\n{instruction}\n\n### Response:\n")
# the full release, the first 5,000 records of it (the shared data dir), an early 102-record sample; first found wins
ALPACA_FILES = ("alpaca/alpaca_data_cleaned.json", "alpaca/alpaca_data_cleaned.first5000.json", "alpaca/alpaca_data_cleaned.sample.json")
ALPACA_HUB = "yahma/alpaca-cleaned"


def load_instructions(name: str, data_dir: str | None = None) -> tuple[list[dict], str]:
    """Instruction records (instruction, input, output) and where they came from; malformed records are named."""
    path = Path(name).expanduser()
    if name == "alpaca":
        local = resolve_data_dir(data_dir)
        if local is not None:
            path = next((local / f for f in ALPACA_FILES if (local / f).is_file()), local / ALPACA_FILES[0])
        elif hub_reachable():
            import datasets
            return [dict(r) for r in datasets.load_dataset(ALPACA_HUB, split="train")], ALPACA_HUB
        else:
            raise HywiaError(f"cannot load alpaca from the hub (offline); pass --data-dir DIR holding {ALPACA_FILES[0]} or a json/jsonl path")
    if not path.is_file():
        raise HywiaError(f"instruction data {path} not found; pass alpaca or a json/jsonl file of instruction/input/output records")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise HywiaError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): give a json/jsonl file of records") from None
    except OSError as e:
        raise HywiaError(f"cannot read {path} ({e.strerror}); check the path and its permissions") from None
    try:
        records = json.loads(text) if text.lstrip().startswith("[") else [json.loads(l) for l in text.splitlines() if l.strip()]
    except json.JSONDecodeError as e:
        raise HywiaError(f"{path} is not valid JSON/JSONL ({e.msg} at line {e.lineno}); fix the file") from None
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not isinstance(r.get("instruction"), str) or not isinstance(r.get("output"), str) \
                or not isinstance(r.get("input", ""), str):
            raise HywiaError(f"record {i} of {path} is malformed: each record needs string 'instruction' and 'output' (and optional 'input')")
    if not records:
        raise HywiaError(f"{path} holds no records")
    return records, str(path)


def is_instruction_data(name: str) -> bool:
    """alpaca, or a json/jsonl file of instruction records; anything else (a dataset name, a text file) is text."""
    path = Path(name).expanduser()
    if name == "alpaca":
        return True
    if name in SOURCES or path.suffix not in (".json", ".jsonl") or not path.is_file():
        return False
    with path.open(encoding="utf-8", errors="replace") as f:
        return '"instruction"' in f.read(4096)


def text_examples(name: str, tokenizer, cutoff_len: int, data_dir: str | None) -> tuple[list[torch.Tensor], str]:
    """Consecutive windows of `cutoff_len` tokens of a training text (a dataset's train split, else its validation
    split, as calibration reads it; or a file), BOS first where the tokenizer adds it, and where they came from."""
    text = load_text(name, "train", data_dir, fall_back_to_validation=True)
    windows = consecutive_windows(tokenize(tokenizer, text.text), cutoff_len, bos_id(tokenizer))
    if len(windows) == 0:
        raise HywiaError(f"{text.source} holds fewer than --cutoff-len {cutoff_len} tokens: give more text or a shorter --cutoff-len")
    return list(windows), f"{text.source} ({len(windows)} windows of {cutoff_len} tokens)"


def prompt(record: dict) -> str:
    template = PROMPT_WITH_INPUT if record.get("input") else PROMPT_NO_INPUT
    return template.format(instruction=record["instruction"], input=record.get("input", "")) + record["output"]


def tokenize_records(records: list[dict], tokenizer, cutoff_len: int) -> list[torch.Tensor]:
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return [torch.tensor((tokenizer(prompt(r))["input_ids"] + eos)[:cutoff_len], dtype=torch.long) for r in records]


def training_examples(data: str, tokenizer, cutoff_len: int, max_records: int | None,
                      data_dir: str | None) -> tuple[list[torch.Tensor], int, str]:
    """The examples a run trains on (the first `max_records`), how many records its source gave, and the source."""
    if is_instruction_data(data):
        records, source = load_instructions(data, data_dir)
        records = records[:max_records] if max_records is not None else records
        return tokenize_records(records, tokenizer, cutoff_len), len(records), source
    examples, source = text_examples(data, tokenizer, cutoff_len, data_dir)
    examples = examples[:max_records] if max_records is not None else examples
    return examples, len(examples), source
