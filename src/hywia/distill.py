"""Knowledge distillation from the dense model a pruned model came from: recovery with a teacher.

Structured pruning keeps the hidden size and the layer count, so the student can follow the teacher twice:

- logits: KL(teacher || student) of the next-token distributions at temperature T, times T^2 so the gradient's
  scale does not depend on T (Hinton et al.), summed over predicted tokens;
- residual stream (`hidden` > 0): after every decoder layer, the squared error between the student's and the
  teacher's hidden state, relative to the teacher's mean square at that layer (so deep layers with large
  activations do not drown the others), averaged over layers, summed over tokens, times `hidden` -- the
  width-pruning-plus-distillation recipe of Minitron, which matches intermediate states as well as logits.

Both are sums over tokens, like the NLL they replace, so the fine-tuning loop's token-weighted mean, gradient
accumulation and guards apply unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import HywiaError


@dataclass(frozen=True)
class Distillation:
    temperature: float = 1.0
    hidden: float = 0.0  # weight of the hidden-state loss; 0 matches logits only


def check_teacher(student_config, teacher_config) -> None:
    """The teacher must share what pruning keeps: vocabulary, hidden size and layer count."""
    for name in ("vocab_size", "hidden_size", "num_hidden_layers"):
        s, t = getattr(student_config, name, None), getattr(teacher_config, name, None)
        if s != t:
            raise HywiaError(f"the teacher's {name} is {t} but the student's is {s}: pass as --teacher the dense model "
                             "the student was pruned from")


def distillation_loss(student: nn.Module, teacher: nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                      settings: Distillation) -> torch.Tensor:
    """Summed distillation loss of a padded batch `ids` [b, L] with `mask` [b, L] (1 on real tokens)."""
    hidden = settings.hidden > 0
    out = student(input_ids=ids, attention_mask=mask, output_hidden_states=hidden)
    with torch.no_grad():
        ref = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=hidden)
    predicted = mask[:, 1:].bool()
    t = settings.temperature
    student_logp = F.log_softmax(out.logits[:, :-1][predicted].float() / t, dim=-1)
    teacher_logp = F.log_softmax(ref.logits[:, :-1][predicted].float() / t, dim=-1)
    loss = F.kl_div(student_logp, teacher_logp, log_target=True, reduction="sum") * t * t
    if hidden:
        real = mask.bool()
        layers = list(zip(out.hidden_states[1:], ref.hidden_states[1:]))
        for h_student, h_teacher in layers:
            s, r = h_student[real].float(), h_teacher[real].float()
            scale = r.pow(2).mean().clamp_min(1e-12)
            loss = loss + settings.hidden / len(layers) * ((s - r).pow(2).mean(-1) / scale).sum()
    return loss
