"""Perplexity with a stated protocol.

The test split is joined into one text as in the literature (WikiText-2: rows joined by blank lines; PTB:
sentences joined by spaces), tokenized once, and cut into non-overlapping windows of `seq_len` tokens; the
last partial window is dropped. Each window is scored on its own (no context carried over), every token but
the first is predicted, and ppl = exp(total NLL / predicted tokens). `max_windows` keeps the first N windows:
a fixed, documented subset.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import load_text, tokenize
from .errors import HywiaError


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    nll: float
    tokens: int
    windows: int
    seq_len: int
    data: str
    source: str

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def window_nll(model, windows: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Summed next-token NLL of each window [n, seq_len] -> [n] (float64)."""
    device = next(model.parameters()).device
    sums = []
    for start in tqdm(range(0, len(windows), batch_size), desc="perplexity", unit="batch", leave=False):
        batch = windows[start:start + batch_size].to(device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        nll = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
        sums.append(nll.sum(1).double().cpu())
    return torch.cat(sums)


def perplexity(model, tokenizer, data: str = "wikitext2", seq_len: int = 128, max_windows: int | None = None,
               data_dir: str | None = None, batch_size: int = 8) -> Perplexity:
    """Perplexity of `model` on the test split of `data` (a dataset name or a text file)."""
    if seq_len < 2:
        raise HywiaError(f"--seq-len {seq_len} is too short: a window needs at least 2 tokens")
    text = load_text(data, "test", data_dir)
    ids = tokenize(tokenizer, text.text)
    n = len(ids) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise HywiaError(f"{data} has {len(ids)} tokens, fewer than one --seq-len {seq_len} window")
    was_training = model.training
    model.eval()
    try:
        nll = window_nll(model, ids[: n * seq_len].view(n, seq_len), batch_size).sum().item()
    finally:
        model.train(was_training)
    tokens = n * (seq_len - 1)
    return Perplexity(math.exp(nll / tokens), nll / tokens, tokens, n, seq_len, data, text.source)
