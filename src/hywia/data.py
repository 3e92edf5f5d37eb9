"""Text for calibration and evaluation: named datasets (a table), local files, or an offline data dir.

Resolution of a named dataset, in order: the data dir (`--data-dir` or `HYWIA_DATA_DIR`), where files are
read as released; else the Hugging Face hub through `datasets`. Offline calibration falls back from the train
split to the validation split (the shared data dir holds no train split) and says so in the recipe; evaluation
always reads the test split, so calibration never sees test text (a calibration *file* that is an evaluation
split is warned about).

`wikitext2` is `wikitext-2-raw-v1`, the text every published pruning table uses; `wikitext2-tokens` is the
tokenized v1 release (rare words as `<unk>`), kept for comparison with older hywia figures.

Windows and BOS: a model whose tokenizer puts a BOS token in front of every encoded text (Gemma, LLaMA) was
trained on sequences that start with it, and scores text without it far worse (Gemma-3-270M: WikiText-2 ppl
about 320 without, 40 with). So every window, for calibration as for evaluation, starts with BOS exactly when
the tokenizer adds one by default -- the rule lm-evaluation-harness 0.4 follows when `add_bos_token` is unset.
Such a window holds BOS plus `seq_len - 1` text tokens, and every text token in it is predicted.
"""
from __future__ import annotations

import json
import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .costs import trim_heap
from .errors import HywiaError


@dataclass(frozen=True)
class Source:
    hf_args: tuple[str, ...]
    field: str
    join: str  # how rows are joined into one evaluation text, as in the literature
    files: dict[str, tuple[str, ...]]  # split -> candidate paths relative to the data dir, first found wins
    hf_kwargs: tuple[tuple[str, str], ...] = ()


SOURCES: dict[str, Source] = {
    "wikitext2": Source(("wikitext", "wikitext-2-raw-v1"), "text", "\n\n", {
        "train": ("wikitext2/wiki.train.raw",), "validation": ("wikitext2/wiki.valid.raw",), "test": ("wikitext2/wiki.test.raw",)}),
    "wikitext2-tokens": Source(("wikitext", "wikitext-2-v1"), "text", "\n\n", {
        "train": ("wikitext2/wiki.train.tokens",), "validation": ("wikitext2/wiki.valid.tokens",), "test": ("wikitext2/wiki.test.tokens",)}),
    "ptb": Source(("ptb_text_only", "penn_treebank"), "sentence", " ", {
        "train": ("ptb/ptb.train.txt",), "validation": ("ptb/ptb.valid.txt",), "test": ("ptb/ptb.test.txt",)}),
    "c4": Source(("allenai/c4",), "text", " ", {
        "train": ("c4/c4-train.00000-of-01024.json.gz", "c4/c4-train.00000-of-01024.first1000.jsonl"),
        "validation": ("c4/c4-validation.00000-of-00008.json.gz",)},
        hf_kwargs=(("data_files", "en/c4-train.00000-of-01024.json.gz"),)),
    "bookcorpus": Source(("bookcorpus",), "text", " ", {"train": ("bookcorpus/bookcorpus.txt",)}),
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
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise HywiaError(f"data dir {path} {what}; pass --data-dir DIR (or set HYWIA_DATA_DIR) to a folder like wikitext2/ ptb/")
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
    """Rows of a txt (one per line), jsonl/json (`field` or 'text' of each record) or parquet file; a file that is
    not what its name says is one line naming it."""
    if not path.is_file():
        raise HywiaError(f"data file {path} not found; check the path or --data-dir")
    try:
        return _parse_rows(path, field)
    except UnicodeDecodeError as e:
        raise HywiaError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): give a text, .jsonl or .parquet file") from None
    except OSError as e:  # unreadable, or a .gz that is not gzip
        raise HywiaError(f"cannot read {path} ({e.strerror or e}); check the file and its permissions") from None


def _parse_rows(path: Path, field: str) -> list[str]:
    suffixes = "".join(path.suffixes[-2:])
    if path.suffix == ".parquet":
        import pyarrow
        import pyarrow.parquet as pq
        try:
            table = pq.read_table(path)
        except pyarrow.ArrowException as e:
            raise HywiaError(f"{path} is not a Parquet file ({str(e).splitlines()[0]}): give a real .parquet file, or name the "
                             "file for what it holds (.txt, .jsonl)") from None
        column = field if field in table.column_names else "text"
        if column not in table.column_names:
            raise HywiaError(f"{path} has no '{column}' column (it has: {', '.join(table.column_names) or 'none'}); give it a "
                             f"'{column}' column")
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
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise HywiaError(f"{path} must hold JSON records (objects), one per line or as a list")
        key = field if records and field in records[0] else "text"
        missing = next((i for i, r in enumerate(records) if key not in r), None)
        if missing is not None:
            raise HywiaError(f"record {missing} of {path} has no '{key}' field (it has: {', '.join(records[missing]) or 'nothing'}); "
                             f"give each record a '{key}' field")
        return [str(r[key]) for r in records]
    with open(path, encoding="utf-8", newline="\n") as f:  # lines end at "\n" only, as released (not at U+2028 & co.)
        return list(f)


def _join(rows: list[str], source: Source) -> str:
    """Rows joined as the literature does. WikiText's release files hold a blank HF row as a line " ": it is the
    empty string in the HF `text` column, so it is emptied here ("\n\n".join(test["text"]) exactly)."""
    if source.join == " ":
        return " ".join(r.strip() for r in rows)
    return source.join.join("" if not r.strip() else r for r in rows)


def split_paths(local: Path, name: str, split: str) -> list[Path]:
    return [local / rel for rel in SOURCES[name].files.get(split, (f"{name}/{split}",))]


def evaluation_files(data_dir_path: str | os.PathLike | None = None) -> set[Path]:
    """Every test-split file of the named datasets in the data dir (for the calibration-on-test warning)."""
    local = data_dir(data_dir_path)
    if local is None:
        return set()
    return {p.resolve() for name in SOURCES for p in split_paths(local, name, "test") if p.is_file()}


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
            for path in split_paths(local, name, candidate):
                if path.is_file():
                    return Text(_join(_read_rows(path, source.field), source), str(path), candidate)
        raise HywiaError(f"{name} {split} split not found in data dir {local}: expected {split_paths(local, name, split)[0]}")
    if not hub_reachable():
        raise HywiaError(f"cannot load {name} from the Hugging Face hub (offline); pass --data-dir DIR holding "
                         f"{source.files.get(split, (name,))[0]} (or set HYWIA_DATA_DIR)")
    import datasets
    rows = datasets.load_dataset(*source.hf_args, split=split, **dict(source.hf_kwargs))[source.field]
    return Text(_join(rows, source), "/".join(source.hf_args), split)


def bos_id(tokenizer) -> int | None:
    """The BOS id if the tokenizer puts BOS in front of an encoded text by default (see the module docstring)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if ids and ids[0] == bos else None


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D tensor of token ids, no special tokens (windows add BOS themselves)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # long-input warnings are expected
        limit = tokenizer.model_max_length
        tokenizer.model_max_length = int(1e12)
        try:
            ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        finally:
            tokenizer.model_max_length = limit
    trim_heap()  # the tokenizer's scratch for a whole text is freed but stays resident (0.28 GB for WikiText-2 validation)
    return ids


def _with_bos(chunks: torch.Tensor, bos: int | None) -> torch.Tensor:
    if bos is None:
        return chunks
    return torch.cat([torch.full((len(chunks), 1), bos, dtype=chunks.dtype), chunks], dim=1)


def consecutive_windows(ids: torch.Tensor, seq_len: int, bos: int | None = None, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows [n, seq_len] from the start of `ids`, BOS first when given; the partial tail is dropped."""
    body = seq_len - (bos is not None)
    n = len(ids) // body
    if max_windows is not None:
        n = min(n, max_windows)
    return _with_bos(ids[: n * body].view(n, body), bos)


def random_windows(ids: torch.Tensor, n: int, seq_len: int, seed: int, bos: int | None = None) -> torch.Tensor:
    """`n` windows [n, seq_len] at seeded random offsets (SparseGPT/Wanda calibration), BOS first when given."""
    body = seq_len - (bos is not None)
    if len(ids) <= body:
        raise HywiaError(f"calibration text has {len(ids)} tokens, fewer than --seq-len {seq_len}; use more text or a shorter --seq-len")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - body, (n,), generator=generator)
    return _with_bos(torch.stack([ids[s:s + body] for s in starts.tolist()]), bos)


GENERATION_CACHE_BYTES = 2**30  # the most KV cache one batch of self-sampled calibration text may hold


def generation_batches(model, n: int, seq_len: int) -> list[int]:
    """How many sequences to sample at a time, batch by batch: as few even batches as keep the KV cache under
    GENERATION_CACHE_BYTES, bounded as if every attention head kept its own keys and values. All 128 of
    SmolLM2-135M's reconstruction windows at once took the README's first command's calibrate stage to 2,534 MB
    (1,646 MB in batches; hywia.json's stages); a 7B model's would hold 17 GB of cache in float32."""
    config = model.config.get_text_config()
    layers, hidden = getattr(config, "num_hidden_layers", None), getattr(config, "hidden_size", None)
    per_sequence = 2 * (layers or 0) * (hidden or 0) * seq_len * next(model.parameters()).element_size()
    count = -(-n // max(1, GENERATION_CACHE_BYTES // per_sequence)) if per_sequence else 1
    return [n // count + (i < n % count) for i in range(count)]


def generated_samples(model, tokenizer, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """Text sampled from the model itself: the last resort when no calibration data is reachable."""
    torch.manual_seed(seed)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else (tokenizer.eos_token_id or 0)
    device, out = next(model.parameters()).device, []
    with torch.no_grad():
        for size in generation_batches(model, n, seq_len):
            prompt = torch.full((size, 1), start, dtype=torch.long, device=device)
            out.append(model.generate(prompt, do_sample=True, top_p=0.95, temperature=1.0, max_new_tokens=seq_len - 1,
                                      min_new_tokens=seq_len - 1, pad_token_id=tokenizer.eos_token_id)[:, :seq_len].cpu())
    return torch.cat(out)


def calibration_samples(model, tokenizer, calib: str, n: int, seq_len: int, seed: int,
                        data_dir_path: str | os.PathLike | None = None) -> tuple[torch.Tensor, dict]:
    """[n, seq_len] calibration token ids and a record of where they came from."""
    if calib not in SOURCES and Path(calib).expanduser().resolve() in evaluation_files(data_dir_path):
        warnings.warn(f"--calib {calib} is an evaluation (test) split: importance scores will have seen the text the model "
                      "is then evaluated on. Calibrate on a train or validation split (e.g. --calib wikitext2 or c4).", stacklevel=2)
    try:
        text = load_text(calib, "train", data_dir_path, fall_back_to_validation=True)
    except HywiaError as e:
        if calib not in SOURCES or data_dir(data_dir_path) is not None:
            raise
        warnings.warn(f"NO CALIBRATION DATA REACHABLE ({e}). Calibrating on {n} sequences sampled from the model itself; "
                      "scores will differ from a run on real text. Pass --data-dir to use real data.", stacklevel=2)
        return generated_samples(model, tokenizer, n, seq_len, seed), {"source": "generated-by-model", "split": None}
    bos = bos_id(tokenizer)
    windows = random_windows(tokenize(tokenizer, text.text), n, seq_len, seed, bos)
    return windows, {"source": text.source, "split": text.split, "bos": bos is not None}


def calibration_ids(model, tokenizer, calib: str | torch.Tensor, samples: int, seq_len: int, seed: int,
                    data_dir: str | None) -> tuple[torch.Tensor, dict]:
    """Calibration token ids [n, seq_len] and where they came from: `calib` names text (or a file) to draw
    windows from with `tokenizer`, or is the ids already."""
    if isinstance(calib, torch.Tensor):
        ids, record = calib, {"source": "tensor", "split": None, "name": "tensor"}
    elif tokenizer is None:
        raise HywiaError("this method needs calibration text: pass a tokenizer with calib, or token ids as a tensor")
    else:
        ids, record = calibration_samples(model, tokenizer, calib, samples, seq_len, seed, data_dir)
        record["name"] = calib
    return ids, {**record, "samples": len(ids), "seq_len": ids.shape[1]}
