"""Sharded recovery (FSDP) for models whose frozen weights do not fit one device once per process.

Under `accelerate launch --use_fsdp` (or `hywia finetune --fsdp` under any `accelerate launch`), the frozen weights of
the student, and all of the teacher, are split over the processes by PyTorch's own FSDP (`fully_shard`, one unit per
decoder layer and one for the rest, as accelerate's transformer wrap policy does): each process holds 1/N of them
and gathers a layer's weights only while that layer runs. What is trained (LoRA, norms) is left out of the sharding
(`ignored_params`): it is a few MB, stays replicated, and keeps the loop's one all-reduce of the step's gradients,
its checkpoints and its exact resume unchanged. `--train full` would shard nothing and is refused.

A sharded forward pass is collective (every process gathers every layer), so each process must run as many passes
as the others: `passes` deals the step's micro-batches out in turn, as the unsharded loop does, and pads the
processes that have fewer with a pass whose loss counts zero.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from .adapters import adapter_for
from .errors import HywiaError


def fsdp_requested(flag: bool) -> bool:
    """`--fsdp`, or accelerate's launcher started with `--use_fsdp` (it says so in ACCELERATE_USE_FSDP)."""
    return flag or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true", "yes")


def check_fsdp(train: str, device: str) -> None:
    """What sharding cannot do, refused before training starts."""
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise HywiaError(f"--fsdp puts each process's part of the weights on one device: use --device cpu or cuda, not "
                         f"{device} (a device map spreads one process's whole model instead)")
    if train == "full":
        raise HywiaError("--fsdp shards the frozen weights, and --train full freezes none: use --train lora or "
                         "norms+lora with --fsdp, or drop --fsdp")


def shard(model: nn.Module, device: str) -> dict[str, int]:
    """Split `model`'s frozen weights over the processes (one FSDP unit per decoder layer, one for the rest) and move
    this process's part to `device`; returns how many frozen parameters this process holds of how many."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    kind = torch.device(device).type
    if kind == "cuda":
        torch.cuda.set_device(torch.device(device))
    mesh = init_device_mesh(kind, (torch.distributed.get_world_size(),))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under PEFT's wrapper
    trained = {p for p in model.parameters() if p.requires_grad}
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    for layer in base.get_submodule(adapter_for(base.config).layers):
        fully_shard(layer, mesh=mesh, ignored_params=trained)
    fully_shard(base, mesh=mesh, ignored_params=trained)
    model.to(device)
    held = sum(p.to_local().numel() for p in model.parameters() if not p.requires_grad and hasattr(p, "to_local"))
    return {"frozen_params": frozen, "frozen_params_held": held}


def passes(micro_batches: int, processes, sharded: bool) -> list[tuple[int, bool]]:
    """This process's micro-batches of a step as (index, counts): every `num_processes`-th one from its own index,
    then, when sharded, passes that count zero until it has run as many as the busiest process."""
    mine = list(range(processes.process_index, micro_batches, processes.num_processes))
    runs = [(j, True) for j in mine]
    if sharded:
        busiest = -(-micro_batches // processes.num_processes)
        runs += [(mine[-1] if mine else 0, False)] * (busiest - len(mine))
    return runs
