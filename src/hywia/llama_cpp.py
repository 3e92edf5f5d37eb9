"""The file people deploy, measured where it runs: perplexity of a GGUF file in llama.cpp itself (llama-cpp-python).

transformers reads a GGUF file by dequantizing it to float and computing in PyTorch; that is not what a q4_0 file does
in llama.cpp (8-bit activations in its dot products, its own kernels), and transformers cannot read llama.cpp's `deci`
architecture at all, which is how hywia writes a model whose layers differ. `hywia eval ppl --backend llama.cpp`
runs the file in llama.cpp: the same protocol as the transformers backend (hywia.evaluate: the same windows of the
same test text, each scored on its own), with the file's own tokenizer and BOS rule, llama.cpp's logits turned into
the summed NLL of each window in float64.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .errors import HywiaError
from .evaluate import Perplexity, Scorer, text_perplexity

INSTALL = "pip install llama-cpp-python (it builds llama.cpp from source, minutes)"


def check_installed() -> None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise HywiaError(f"--backend llama.cpp needs llama-cpp-python: {INSTALL}") from None


def load(path: str | Path, n_ctx: int, threads: int | None = None):
    """A llama.cpp model of `path` that keeps the logits of every position of a window up to `n_ctx` tokens."""
    check_installed()
    import llama_cpp
    threads = threads or os.cpu_count() or 1
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False,
                               n_threads=threads, n_threads_batch=threads)
    except ValueError as e:  # llama-cpp-python reports a file llama.cpp refuses as "Failed to load model from file"
        raise HywiaError(f"llama.cpp cannot load {path} ({e}): check that it is a whole GGUF file of an architecture "
                         "llama.cpp knows (hywia export writes such files)") from None


def window_nll(llm, windows: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of each window [n, seq_len] -> [n] (float64), each window evaluated from an empty cache."""
    sums = []
    for window in windows.tolist():
        llm.reset()
        llm.eval(window)
        logits = np.asarray(llm.scores[: len(window) - 1], dtype=np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        sums.append(-logp[np.arange(len(window) - 1), window[1:]].sum())
    return torch.tensor(sums, dtype=torch.float64)


def _tokens(llm, text: str) -> torch.Tensor:
    return torch.tensor(llm.tokenize(text.encode("utf-8"), add_bos=False, special=False), dtype=torch.long)


def perplexity(path: str | Path, data: str = "wikitext2", seq_len: int | None = None, max_windows: int | None = None,
               data_dir: str | None = None, protocol: str | None = None, bos: str = "auto",
               threads: int | None = None) -> Perplexity:
    """`hywia.evaluate.perplexity` of the GGUF file at `path`, computed by llama.cpp."""
    from .evaluate import resolve_seq_len
    probe = load(path, 8, threads)  # the trained context decides the window length; a tiny context reads it cheaply
    context = probe._model.n_ctx_train()
    first = probe.tokenize(b"", add_bos=True, special=False)  # llama.cpp adds BOS only where the vocabulary says so
    bos_token = probe.token_bos() if probe.token_bos() >= 0 else None
    length, _ = resolve_seq_len(context, protocol, seq_len)
    del probe
    llm = load(path, length, threads)
    scorer = Scorer(lambda windows: window_nll(llm, windows), lambda text: _tokens(llm, text),
                    first[0] if first else None, bos_token, context)
    return text_perplexity(scorer, data, seq_len, max_windows, data_dir, protocol, bos)
