"""Text for calibration and evaluation: named datasets (a table), local files, or an offline data dir.

Resolution of a named dataset, in order: the data dir (`--data-dir` or `HYWIA_DATA_DIR`), where files are
read as released; else the Hugging Face hub through `datasets`. Offline calibration falls back from the train
split to the validation split (the shared data dir holds no train split) and says so in the recipe; evaluation
always reads the test split, so calibration never sees test text.
"""
from __future__ import annotations

import json
import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import HywiaError


@dataclass(frozen=True)
class Source:
    hf_args: tuple[str, ...]
    field: str
    join: str  # how rows are joined into one evaluation text, as in the literature
    files: dict[str, str]  # split -> path relative to the data dir
    hf_kwargs: tuple[tuple[str, str], ...] = ()


SOURCES: dict[str, Source] = {
    "wikitext2": Source(("wikitext", "wikitext-2-raw-v1"), "text", "\n\n", {
        "train": "wikitext2/wiki.train.tokens", "validation": "wikitext2/wiki.valid.tokens", "test": "wikitext2/wiki.test.tokens"}),
    "ptb": Source(("ptb_text_only", "penn_treebank"), "sentence", " ", {
        "train": "ptb/ptb.train.txt", "validation": "ptb/ptb.valid.txt", "test": "ptb/ptb.test.txt"}),
    "c4": Source(("allenai/c4",), "text", " ", {"train": "c4/c4-train.00000-of-01024.json.gz", "validation": "c4/c4-validation.00000-of-00008.json.gz"},
                 hf_kwargs=(("data_files", "en/c4-validation.00000-of-00008.json.gz"),)),
    "bookcorpus": Source(("bookcorpus",), "text", " ", {"train": "bookcorpus/bookcorpus.txt"}),
}


@dataclass(frozen=True)
class Text:
    """A resolved text: its content and where it came from (recorded in every report)."""

    text: str
    source: str
    split: str | None


def data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    value = explicit or os.environ.get("HYWIA_DATA_DIR")
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise HywiaError(f"data dir {path} does not exist; pass --data-dir DIR (or set HYWIA_DATA_DIR) to a folder like wikitext2/ ptb/")
    return path


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers; checked first so offline runs fail in seconds, not after retries."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _read_rows(path: Path, field: str) -> list[str]:
    """Rows of a txt (one per line), jsonl/json (`field` or 'text' of each record) or parquet file."""
    if not path.is_file():
        raise HywiaError(f"data file {path} not found; check the path or --data-dir")
    suffixes = "".join(path.suffixes[-2:])
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        table = pq.read_table(path)
        column = field if field in table.column_names else "text"
        return [str(x) for x in table.column(column).to_pylist()]
    if path.suffix in (".jsonl", ".json") or suffixes.endswith(".json.gz"):
        import gzip
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            content = f.read()
        try:
            records = json.loads(content) if content.lstrip().startswith("[") else [json.loads(l) for l in content.splitlines() if l.strip()]
        except json.JSONDecodeError as e:
            raise HywiaError(f"{path} is not valid JSON/JSONL ({e.msg} at line {e.lineno}); fix the file") from None
        key = field if records and field in records[0] else "text"
        return [str(r[key]) for r in records]
    return path.read_text(encoding="utf-8").splitlines(keepends=True)


def _join(rows: list[str], source: Source) -> str:
    return source.join.join(r.strip() if source.join == " " else r for r in rows)


def load_text(name: str, split: str, data_dir_path: str | os.PathLike | None = None, fall_back_to_validation: bool = False) -> Text:
    """The text of dataset `name` (a SOURCES key or a file path) for `split`, joined as the literature does."""
    if name not in SOURCES:
        path = Path(name).expanduser()
        if not path.exists():
            raise HywiaError(f"unknown dataset '{name}': use one of {', '.join(SOURCES)} or a path to a .txt/.jsonl/.parquet file")
        rows = _read_rows(path, "text")
        is_text_file = path.suffix not in (".jsonl", ".json", ".parquet", ".gz")
        return Text("".join(rows) if is_text_file else "\n\n".join(rows), str(path), None)  # a text file verbatim
    source = SOURCES[name]
    local = data_dir(data_dir_path)
    if local is not None:
        splits = [split] + (["validation"] if fall_back_to_validation and split != "validation" else [])
        for candidate in splits:
            path = local / source.files.get(candidate, f"{name}/{candidate}")
            if path.is_file():
                return Text(_join(_read_rows(path, source.field), source), str(path), candidate)
        raise HywiaError(f"{name} {split} split not found in data dir {local}: expected {local / source.files.get(split, name)}")
    if not hub_reachable():
        raise HywiaError(f"cannot load {name} from the Hugging Face hub (offline); pass --data-dir DIR holding "
                         f"{source.files.get(split, name)} (or set HYWIA_DATA_DIR)")
    import datasets
    rows = datasets.load_dataset(*source.hf_args, split=split, **dict(source.hf_kwargs))[source.field]
    return Text(_join(rows, source), "/".join(source.hf_args), split)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """One long 1-D tensor of token ids (the whole text; long-input warnings are expected and silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        limit = tokenizer.model_max_length
        tokenizer.model_max_length = int(1e12)
        try:
            return torch.tensor(tokenizer(text, add_special_tokens=True)["input_ids"], dtype=torch.long)
        finally:
            tokenizer.model_max_length = limit


def random_windows(ids: torch.Tensor, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """`n` windows of `seq_len` tokens at seeded random offsets (SparseGPT/Wanda calibration): [n, seq_len]."""
    if len(ids) <= seq_len:
        raise HywiaError(f"calibration text has {len(ids)} tokens, fewer than --seq-len {seq_len}; use more text or a shorter --seq-len")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len, (n,), generator=generator)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def generated_samples(model, tokenizer, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """Text sampled from the model itself: the last resort when no calibration data is reachable."""
    torch.manual_seed(seed)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else (tokenizer.eos_token_id or 0)
    prompt = torch.full((n, 1), start, dtype=torch.long, device=next(model.parameters()).device)
    with torch.no_grad():
        out = model.generate(prompt, do_sample=True, top_p=0.95, temperature=1.0, max_new_tokens=seq_len - 1,
                             min_new_tokens=seq_len - 1, pad_token_id=tokenizer.eos_token_id)
    return out[:, :seq_len].cpu()


def calibration_samples(model, tokenizer, calib: str, n: int, seq_len: int, seed: int,
                        data_dir_path: str | os.PathLike | None = None) -> tuple[torch.Tensor, dict]:
    """[n, seq_len] calibration token ids and a record of where they came from."""
    try:
        text = load_text(calib, "train", data_dir_path, fall_back_to_validation=True)
    except HywiaError as e:
        if calib not in SOURCES or data_dir(data_dir_path) is not None:
            raise
        warnings.warn(f"NO CALIBRATION DATA REACHABLE ({e}). Calibrating on {n} sequences sampled from the model itself; "
                      "scores will differ from a run on real text. Pass --data-dir to use real data.", stacklevel=2)
        return generated_samples(model, tokenizer, n, seq_len, seed), {"source": "generated-by-model", "split": None}
    return random_windows(tokenize(tokenizer, text.text), n, seq_len, seed), {"source": text.source, "split": text.split}
