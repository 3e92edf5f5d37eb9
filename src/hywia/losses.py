"""The objectives a recovery run trains on, per micro-batch: next-token NLL, or distillation from the dense model
(hywia.distill); and the guard's mean loss, measured on the same records before training and on the merged model."""
from __future__ import annotations

from collections.abc import Callable

import torch

from .distill import Distillation, distillation_loss

GUARD_RECORDS = 64


def collate(examples: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    length = max(len(e) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, :len(e)], mask[i, :len(e)] = e, 1
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def micro_batch_nll(model, batch: list[torch.Tensor], pad_id: int) -> torch.Tensor:
    """Summed next-token NLL of a micro-batch of examples (padding ignored)."""
    device = next(model.parameters()).device
    ids, mask, labels = (t.to(device) for t in collate(batch, pad_id))
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="sum")


def micro_batch_kd(model, teacher, batch: list[torch.Tensor], pad_id: int, settings: Distillation) -> torch.Tensor:
    """Summed distillation loss of a micro-batch (hywia.distill), on the student's device."""
    device = next(model.parameters()).device
    ids, mask, _ = (t.to(device) for t in collate(batch, pad_id))
    return distillation_loss(model, teacher, ids, mask, settings)


@torch.no_grad()
def mean_loss(model, examples: list[torch.Tensor], pad_id: int, micro_batch_size: int = 4,
              loss_of: Callable | None = None) -> float:
    """Token-weighted mean of the training objective `loss_of(model, batch)` (default the NLL) over `examples`, in
    eval mode (no dropout)."""
    loss_of = loss_of or (lambda m, batch: micro_batch_nll(m, batch, pad_id))
    was_training = model.training
    model.eval()
    try:
        total = sum(loss_of(model, examples[m:m + micro_batch_size]).item()
                    for m in range(0, len(examples), micro_batch_size))
    finally:
        model.train(was_training)
    return total / sum(len(e) - 1 for e in examples)


def guard_examples(examples: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    return [examples[i] for i in order[:GUARD_RECORDS]]


def pad_id_of(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
