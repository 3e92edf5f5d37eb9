"""Perplexity with a stated protocol.

The test split is joined into one text as in the literature (WikiText-2 raw: rows joined by blank lines; PTB:
sentences joined by spaces), tokenized once without special tokens, and cut into non-overlapping windows; the
last partial window is dropped. Each window is scored on its own (no context carried over) and ppl =
exp(total NLL / predicted tokens). Two protocols are in use in the field and both are offered:

- `llm-pruner`: 128-token windows (LLM-Pruner, FLAP, HyWIA tables);
- `sparsegpt`: 2048-token windows, or the model's context when shorter (SparseGPT, Wanda, SliceGPT tables).

A model whose tokenizer adds BOS gets it at the start of every window (see `hywia.data`); each window then holds
`seq_len - 1` text tokens, all predicted. Without BOS every token but a window's first is predicted. Either way a
window predicts `seq_len - 1` tokens. `max_windows` keeps the first N windows: a fixed, documented subset.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import bos_id, consecutive_windows, load_text, tokenize
from .errors import HywiaError
from .options import check_values

PROTOCOLS = {"llm-pruner": 128, "sparsegpt": 2048}
LOGITS_BUDGET = 2 ** 28  # logit values materialised at once (1 GiB in float32): bounds memory for 262k-token vocabularies


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    nll: float
    tokens: int
    windows: int
    seq_len: int
    protocol: str
    bos: bool
    max_windows: int | None
    data: str
    source: str

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        subset = f"first {self.windows} windows" if self.max_windows is not None else f"all {self.windows} windows"
        return (f"{self.data}: ppl {self.ppl:.3f} ({self.protocol} protocol: {subset} of {self.seq_len} tokens"
                f"{', BOS first' if self.bos else ''}; {self.source})")


def resolve_seq_len(context: int | None, protocol: str | None, seq_len: int | None) -> tuple[int, str]:
    """The window length and the protocol's name: an explicit `seq_len` wins and is reported as `custom`; a protocol's
    length is cut to the model's `context` (its trained context length) when shorter."""
    if seq_len is not None:
        if seq_len < 2:
            raise HywiaError(f"--seq-len {seq_len} is too short: a window needs at least 2 tokens")
        return seq_len, protocol if protocol and PROTOCOLS.get(protocol) == seq_len else "custom"
    protocol = protocol or "llm-pruner"
    if protocol not in PROTOCOLS:
        raise HywiaError(f"unknown protocol '{protocol}': use {', '.join(PROTOCOLS)} (or give --seq-len)")
    return min(PROTOCOLS[protocol], context or PROTOCOLS[protocol]), protocol


@dataclass(frozen=True)
class Scorer:
    """What perplexity needs of a model, whatever runs it (transformers here, llama.cpp in hywia.llama_cpp): the summed
    next-token NLL of each window [n, seq_len] -> [n] (float64), the text's token ids, the BOS the tokenizer puts first
    (None if it puts none), its BOS token (for --bos yes) and the trained context length."""

    window_nll: Callable[[torch.Tensor], torch.Tensor]
    tokenize: Callable[[str], torch.Tensor]
    bos_first: int | None
    bos_token: int | None
    context: int | None


@torch.no_grad()
def window_nll(model, windows: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Summed next-token NLL of each window [n, seq_len] -> [n] (float64)."""
    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().weight.shape[0]
    batch_size = max(1, min(batch_size, LOGITS_BUDGET // (windows.shape[1] * vocab)))
    sums = []
    for start in tqdm(range(0, len(windows), batch_size), desc="perplexity", unit="batch", leave=False):
        batch = windows[start:start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        nll = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
        sums.append(nll.sum(1).double().cpu())
    return torch.cat(sums)


BOS_CHOICES = ("auto", "yes", "no")


def perplexity(model, tokenizer, data: str = "wikitext2", seq_len: int | None = None, max_windows: int | None = None,
               data_dir: str | None = None, batch_size: int = 8, protocol: str | None = None, bos: str = "auto") -> Perplexity:
    """Perplexity of `model` on the test split of `data` (a dataset name or a text file).

    `bos`: "auto" follows the tokenizer (see `hywia.data`); "yes"/"no" force BOS-first windows on or off, to
    reproduce another paper's protocol or to measure what BOS is worth."""
    check_values(batch_size=batch_size)

    def scored(windows: torch.Tensor) -> torch.Tensor:
        was_training = model.training
        model.eval()
        try:
            return window_nll(model, windows, batch_size)
        finally:
            model.train(was_training)

    scorer = Scorer(scored, lambda text: tokenize(tokenizer, text), bos_id(tokenizer), tokenizer.bos_token_id,
                    getattr(model.config, "max_position_embeddings", None))
    return text_perplexity(scorer, data, seq_len, max_windows, data_dir, protocol, bos)


def text_perplexity(scorer: Scorer, data: str, seq_len: int | None, max_windows: int | None, data_dir: str | None,
                    protocol: str | None, bos: str) -> Perplexity:
    """The protocol itself, for any `scorer`: the windows of the test text, their NLL, and the checks on both."""
    check_values(seq_len=seq_len, max_windows=max_windows)
    if bos not in BOS_CHOICES:
        raise HywiaError(f"unknown --bos '{bos}': use {', '.join(BOS_CHOICES)}")
    seq_len, protocol = resolve_seq_len(scorer.context, protocol, seq_len)
    text = load_text(data, "test", data_dir)
    if bos == "yes" and scorer.bos_token is None:
        raise HywiaError("--bos yes: this tokenizer has no BOS token; use --bos auto or no")
    bos = {"auto": scorer.bos_first, "yes": scorer.bos_token, "no": None}[bos]
    windows = consecutive_windows(scorer.tokenize(text.text), seq_len, bos, max_windows)
    if len(windows) == 0:
        raise HywiaError(f"{data} has fewer tokens than one --seq-len {seq_len} window")
    per_window = scorer.window_nll(windows)
    bad = (~torch.isfinite(per_window)).nonzero().flatten()
    if len(bad):
        first = bad[0].item()
        raise HywiaError(f"{data}: the loss of window {first} (tokens {first * (seq_len - (bos is not None))} onwards) is "
                         f"{per_window[first].item()}, and of {len(bad)} of {len(windows)} windows: the model's logits overflow or "
                         "are NaN there; evaluate in --dtype float32, or check the model")
    nll = per_window.sum().item()
    tokens = len(windows) * (seq_len - 1)
    return Perplexity(math.exp(nll / tokens), nll / tokens, tokens, len(windows), seq_len, protocol, bos is not None,
                      max_windows, data, text.source)
