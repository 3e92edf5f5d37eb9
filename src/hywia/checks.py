"""Every option of every command, checked in order of cost before the work it guards (docs/errors.md).

1. `check_args`: what needs nothing. Ranges (hywia.options), choices and method options, the device, and paths:
   the model reference, data files, the data dir, the output (not there unless --overwrite, not an input, its
   folder writable). Nothing is loaded; the defaults a method implies are filled in here, once, for an option
   left out, never for a value given (0 is a value).
2. `check_config`: what needs the model's config (config.json or GGUF metadata, no weights): family support,
   window lengths within the context, --layers and --groups within the layer count.
3. `check_weights` (hywia.finite): what needs the weights: every tensor finite, before calibration, training or
   evaluation uses them.
"""
from __future__ import annotations

import argparse
import errno
import os
from pathlib import Path

import torch

from .data import SOURCES, data_dir, split_paths
from .errors import HywiaError
from .evaluate import BOS_CHOICES, PROTOCOLS
from .grouping import layer_slice, parse_layers
from .importance import CRITERIA
from .io import ACCELERATE_MAPS, DTYPES, check_model_ref
from .outputs import check_output, check_writable
from .options import RANGES, check_values, flag
from .recipe import JUDGE_CALIB_FIX, STRUCTURED_DEFAULTS, UNSTRUCTURED_DEFAULTS, Recipe
from .sparsify import SPARSIFIERS

def is_unstructured(method: str) -> bool:
    return method in SPARSIFIERS


def check_device(device: str, option: str = "--device", maps: bool = True) -> None:
    """A device this machine has (`maps`: or one of accelerate's placements, auto / balanced ...)."""
    if maps and device in ACCELERATE_MAPS:
        return
    placements = ", or auto / balanced" if maps else ""
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise HywiaError(f"unknown {option} '{device}': use cpu, cuda, cuda:N{placements}") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise HywiaError(f"{option} {device}: no CUDA device is available here; use {option} cpu")
        if parsed.index is not None and parsed.index >= count:
            raise HywiaError(f"{option} {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise HywiaError(f"{option} {device}: MPS is not available here; use {option} cpu")
    elif parsed.type not in ("cpu", "cuda", "mps", "xpu"):
        raise HywiaError(f"{option} {device}: hywia runs on cpu, cuda or mps")


PATH_OPTIONS = ("model", "out", "calib", "data", "data_dir", "checkpoint_dir", "teacher")


def _check_path_syntax(option: str, value: str) -> None:
    """A value the file system cannot even look up (a NUL byte, a name too long) is refused by name, before any
    check asks the file system about it."""
    if "\x00" in value:
        raise HywiaError(f"{flag(option)} {value!r} holds a NUL character, which no path can: give a real path or name")
    try:
        os.stat(value)
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            raise HywiaError(f"{flag(option)}: the path is longer than the file system allows: give a shorter path") from None


def _check_choice(name: str, value: str | None, choices) -> None:
    if value is not None and value not in choices:
        raise HywiaError(f"unknown {flag(name)} '{value}': use {', '.join(choices)}")


def _check_text(name: str, option: str, data_dir_path: str | None, splits: tuple[str, ...]) -> None:
    """A named dataset (whose split is in the data dir, when one is given), or a file that exists and can be read."""
    if name in SOURCES:
        local = data_dir(data_dir_path)
        if local is not None and not any(p.is_file() for split in splits for p in split_paths(local, name, split)):
            raise HywiaError(f"{option} {name}: its {' or '.join(splits)} split is not in data dir {local} "
                             f"(expected {split_paths(local, name, splits[0])[0]})")
        return
    if not Path(name).expanduser().exists():
        raise HywiaError(f"unknown dataset '{name}' for {option}: use one of {', '.join(SOURCES)} or the path of a .txt/.jsonl/.parquet file")
    _check_file(name, option)


def _check_file(name: str, option: str) -> None:
    path = Path(name).expanduser()
    if not path.exists():
        raise HywiaError(f"{option} {name} not found: check the path")
    if not path.is_file():
        raise HywiaError(f"{option} {name} is a folder: give a text, .jsonl or .parquet file")
    try:
        with path.open("rb") as f:
            f.read(1)
    except OSError as e:
        raise HywiaError(f"cannot read {option} {name} ({e.strerror}); check its permissions") from None
    if path.suffix == ".parquet":  # its footer, not its rows: milliseconds, and a file named .parquet that is not one is named now
        import pyarrow
        import pyarrow.parquet as pq
        try:
            pq.read_metadata(path)
        except pyarrow.ArrowException as e:
            raise HywiaError(f"{option} {name} is not a Parquet file ({str(e).splitlines()[0]}): give a real .parquet file, or "
                             "name the file for what it holds (.txt, .jsonl)") from None


def _common(args: argparse.Namespace) -> None:
    _check_choice("dtype", args.dtype, DTYPES)
    check_device(args.device)
    data_dir(args.data_dir)


def _numbers(args: argparse.Namespace) -> None:
    check_values(**{name: getattr(args, name) for name in RANGES if getattr(args, name, None) is not None})


def _check_prune(args: argparse.Namespace) -> None:
    if args.model is None:
        raise HywiaError("--model is required (or --recipe, the hywia.json of a model to make again)")
    recipe = Recipe.from_args(args).check()
    if args.stats_device is not None:
        check_device(args.stats_device, "--stats-device", maps=False)
    for name in ("calib", "samples", "seq_len", "batch_size"):  # the later checks (windows within the context, text) read these
        if getattr(args, name) is None:
            setattr(args, name, (UNSTRUCTURED_DEFAULTS if recipe.unstructured else STRUCTURED_DEFAULTS)[name])
    _common(args)
    if args.layers:
        layer_slice(args.layers)  # the syntax now; the range once the layer count is known (check_config)
    _check_text(args.calib, "--calib", args.data_dir, ("train", "validation"))
    judge = recipe.judge_calib  # named by the user: it must be there (the default falls back, hywia.prune.draw_judge)
    if judge not in (None, "none"):
        try:
            _check_text(judge, "--judge-calib", args.data_dir, ("train", "validation"))
        except HywiaError as e:
            raise HywiaError(f"{e}; the judge of --kind-split evidence-best or evidence-both reads this second text: {JUDGE_CALIB_FIX}") from None
    check_output(args.out, args.overwrite, inputs=(args.model,))
    check_model_ref(args.model)
    if args.gguf is not None:
        from .export import TYPES
        _check_choice("gguf", args.gguf, TYPES)
        if recipe.unstructured:
            raise HywiaError("--gguf exports structured pruning's smaller dense model; sparse zeros gain nothing in llama.cpp")


def memory_device(device: str) -> str | None:
    """Where a sequential statistics walk moves each layer: `--device`, unless it names a placement over devices."""
    return None if device in ACCELERATE_MAPS else device


def _check_finetune(args: argparse.Namespace) -> None:
    _numbers(args)
    _common(args)
    from .finetune import TRAINABLES
    _check_choice("train", args.train, TRAINABLES)
    if args.tokens is not None and args.max_steps is not None:
        raise HywiaError("--tokens and --max-steps both set the run's length: give one of them")
    if args.data is None:
        args.data = "c4" if args.teacher else "alpaca"
    if args.data != "alpaca":
        _check_text(args.data, "--data", args.data_dir, ("train", "validation"))
    if args.teacher is not None:
        check_model_ref(args.teacher)
    given = [flag(name) for name in ("kd_temperature", "kd_hidden") if getattr(args, name) is not None]
    if given and args.teacher is None:
        raise HywiaError(f"{' and '.join(given)} set{'s' if len(given) == 1 else ''} distillation from a teacher, and this run has "
                         f"none: add --teacher DENSE (the model it was pruned from), or leave {'it' if len(given) == 1 else 'them'} out for plain LoRA")
    args.kd_temperature = 1.0 if args.kd_temperature is None else args.kd_temperature
    args.kd_hidden = 0.0 if args.kd_hidden is None else args.kd_hidden
    if args.eval_every is not None:
        _check_text("wikitext2", "--eval-every", args.data_dir, ("validation",))
    if args.checkpoint_dir is not None:
        folder = Path(args.checkpoint_dir).expanduser()
        if folder.exists() and not folder.is_dir():
            raise HywiaError(f"--checkpoint-dir {folder} is a file: give a folder (hywia creates it if it is not there)")
        check_writable(folder / "step-0.pt")
    check_output(args.out, args.overwrite, inputs=(args.model,))
    check_model_ref(args.model)


def _check_eval(args: argparse.Namespace) -> None:
    from .zeroshot import check_options
    _numbers(args)
    _common(args)
    _check_choice("protocol", args.protocol, PROTOCOLS)
    _check_choice("bos", args.bos, BOS_CHOICES)
    if args.eval_command == "zeroshot":
        args.task_list = [t.strip() for t in args.tasks.split(",") if t.strip()]
        if not args.task_list:
            raise HywiaError("--tasks is empty: give comma-separated task names, e.g. boolq,piqa")
        check_options(args.task_list, args.hellaswag_case)
    for name in args.data if args.eval_command == "ppl" else ["wikitext2", "ptb"] if args.ppl else []:
        _check_text(name, "--data", args.data_dir, ("test",))
    check_model_ref(args.model)
    if args.eval_command == "ppl":
        _check_backend(args)


BACKENDS = ("transformers", "llama.cpp")


def _check_backend(args: argparse.Namespace) -> None:
    """`eval ppl --backend llama.cpp` runs a GGUF file as it is: the options that pick how transformers computes are
    refused rather than ignored, and so is a model that is no GGUF file."""
    _check_choice("backend", args.backend, BACKENDS)
    if args.backend != "llama.cpp":
        return
    from .llama_cpp import check_installed
    if Path(args.model).expanduser().suffix != ".gguf":
        raise HywiaError(f"--backend llama.cpp runs a .gguf file, and {args.model} is none: export one with `hywia export "
                         f"--model {args.model} --type q8_0 --out model.gguf`, or use --backend transformers")
    for option, default, why in (("dtype", "float32", "llama.cpp computes in the file's own types"),
                                 ("device", "cpu", "llama.cpp runs where llama-cpp-python was built to run")):
        if getattr(args, option) != default:
            raise HywiaError(f"--{option} {getattr(args, option)} does not apply to --backend llama.cpp ({why}): leave it out")
    check_installed()


def _check_bench(args: argparse.Namespace) -> None:
    _numbers(args)
    _check_choice("dtype", args.dtype, DTYPES)
    check_device(args.device)
    try:
        args.batches = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        raise HywiaError(f"--batch-sizes {args.batch_sizes!r}: give comma-separated integers, e.g. 1,8") from None
    if len(args.batches) == 0 or min(args.batches) < 1:
        raise HywiaError(f"--batch-sizes {args.batch_sizes!r}: give comma-separated integers >= 1, e.g. 1,8")
    for model in args.model:
        check_model_ref(model)


def _check_export(args: argparse.Namespace) -> None:
    from .export import TYPES
    _check_choice("format", args.format, ("gguf",))
    _check_choice("type", args.type, TYPES)
    if args.pad_to < 1:
        raise HywiaError(f"--pad-to {args.pad_to} must be at least 1 (1: FFN widths as pruned)")
    check_model_ref(args.model)
    out = Path(args.out).expanduser()
    if out.suffix != ".gguf":
        raise HywiaError(f"--out {args.out} must name a .gguf file")
    check_output(out, args.overwrite, inputs=(args.model,), file=True)
    from .export import source_gguf, check_tokenizer_fits
    from .io import peek_config
    config = peek_config(args.model)
    if config is not None:  # the tokenizer against the embedding, before the weights are read
        check_tokenizer_fits(source_gguf(args.model), config.vocab_size)


COMMANDS = {"prune": _check_prune, "finetune": _check_finetune, "eval": _check_eval, "bench": _check_bench, "export": _check_export}


def check_args(args: argparse.Namespace) -> None:
    """Stage 1: everything that needs nothing loaded, for the command `args` were parsed for."""
    for option in PATH_OPTIONS:
        values = getattr(args, option, None)
        for value in values if isinstance(values, list) else [values]:
            if value is not None:
                _check_path_syntax(option, value)
    COMMANDS[args.command](args)


def _context(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _layer_count(config) -> int | None:
    value = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    return value if isinstance(value, int) else None


def check_config(args: argparse.Namespace, config) -> None:
    """Stage 2: what needs the model's config (None: a layout only the loader understands, checked as it loads)."""
    if config is None:
        return
    from .adapters import adapter_for
    from .io import _causal_lm_class, peek_config
    _causal_lm_class(config)
    context, layers = _context(config), _layer_count(config)
    windows = []
    if args.command == "prune":
        if not is_unstructured(args.method):
            adapter_for(config)
            if args.gguf is not None:
                from .export import check_exportable
                scope = CRITERIA[args.method].scope if args.scope is None else args.scope
                varies = scope != "layer" or bool(args.layers)
                check_exportable(config.model_type, varies, args.model, heads_pruned=args.target != "mlp",  # stage 1 filled the default
                                 vocab_size=config.vocab_size)
            if args.layers is not None and layers:
                parse_layers(args.layers, layers)
        if args.seq_len == UNSTRUCTURED_DEFAULTS["seq_len"] and is_unstructured(args.method) and context:
            args.seq_len = min(args.seq_len, context)  # the default, not a value given: SparseGPT's 2048 or the context
        windows.append(("seq_len", args.seq_len))
    elif args.command == "finetune":
        adapter_for(config)
        if args.teacher is not None:
            from .distill import check_teacher
            check_teacher(config, peek_config(args.teacher) or config)
        windows.append(("cutoff_len", args.cutoff_len))
        if layers and args.groups > layers:
            raise HywiaError(f"--groups {args.groups} is more than the model's {layers} decoder layers")
    elif args.command == "eval":
        windows.append(("seq_len", args.seq_len))
    for name, value in windows:
        if value is not None and context and value > context:
            raise HywiaError(f"{flag(name)} {value} is longer than the model's context ({context} tokens): give at most {context}")
