"""KD loss and label-smoothed CE against the SPEC §6 formulas written out by hand."""

from __future__ import annotations

import pytest
import torch

from n2uq.losses import kd_loss, label_smooth_ce


def test_kd_loss_equals_spec_formula():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(5, 7, generator=g, requires_grad=True)
    teacher = torch.randn(5, 7, generator=g) * 3
    # mean over batch of -sum_c softmax(teacher)_c * log_softmax(student)_c, as a batched product
    q = torch.softmax(teacher, 1).unsqueeze(1)
    log_p = torch.log_softmax(student, 1).unsqueeze(2)
    expected = (-torch.bmm(q, log_p)).mean()
    got = kd_loss(student, teacher)
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-7)
    got.backward()
    # d/ds of the loss: (softmax(s) - softmax(t)) / N
    assert torch.allclose(student.grad, (torch.softmax(student, 1) - torch.softmax(teacher, 1)) / 5, atol=1e-6)


def test_kd_loss_minimum_is_teacher_entropy_and_teacher_must_be_frozen():
    t = torch.randn(4, 6)
    q = torch.softmax(t, 1)
    entropy = -(q * torch.log(q)).sum(1).mean()
    assert torch.allclose(kd_loss(t.clone(), t), entropy, atol=1e-6)
    with pytest.raises(ValueError, match="frozen"):
        kd_loss(torch.randn(2, 3), torch.randn(2, 3, requires_grad=True))


def test_label_smooth_ce_formula():
    g = torch.Generator().manual_seed(1)
    logits, target, eps = torch.randn(6, 10, generator=g), torch.randint(0, 10, (6,), generator=g), 0.1
    soft = torch.full((6, 10), eps / 10).scatter_(1, target[:, None], 1 - eps + eps / 10)
    expected = (-soft * torch.log_softmax(logits, 1)).sum(1).mean()
    assert torch.allclose(label_smooth_ce(logits, target, eps), expected, atol=1e-6)
    assert torch.allclose(label_smooth_ce(logits.bfloat16(), target, eps).float(),
                          label_smooth_ce(logits.bfloat16().float(), target, eps), atol=1e-6)
