"""Training losses (docs/SPEC.md, training recipe).

* :func:`kd_loss` — the paper's distillation loss from a frozen teacher: the batch mean of the
  cross-entropy between the teacher's softmax and the student's log-softmax (temperature 1,
  no label term).
* :func:`label_smooth_ce` — cross-entropy against ``(1 - ε)·onehot + ε / C`` targets, used when
  training without a teacher.

Both compute in float32 whatever the autocast dtype of the logits.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["kd_loss", "label_smooth_ce"]


def kd_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """``mean_n( -Σ_c softmax(teacher)_{n,c} · log_softmax(student)_{n,c} )``."""
    if teacher_logits.requires_grad:
        raise ValueError("kd_loss: the teacher logits must not require grad (the teacher is frozen)")
    log_p = F.log_softmax(student_logits.float(), dim=1)
    q = F.softmax(teacher_logits.float(), dim=1)
    return -(q * log_p).sum(dim=1).mean()


def label_smooth_ce(logits: Tensor, target: Tensor, smoothing: float = 0.1) -> Tensor:
    """``mean_n( -Σ_c ((1 - ε)·[c = y_n] + ε / C) · log_softmax(logits)_{n,c} )``."""
    return F.cross_entropy(logits.float(), target, label_smoothing=smoothing)
