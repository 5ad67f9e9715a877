"""The compared methods (n2uq.baselines) against their papers' formulas, and N2UQ's ablations."""

from __future__ import annotations

import math

import pytest
import torch

from mobilenetv2.mobilenet_v2 import MobileNetV2
from n2uq import LTQ
from n2uq.baselines import (
    DoReFaActivation,
    DoReFaConv,
    LSQActivation,
    LSQConv,
    PACTActivation,
    dorefa_activation,
    dorefa_weight,
    lsq_quantize,
    pact_quantize,
)
from n2uq.methods import METHODS, Quantizers
from n2uq.quant import HardQuantizeConv, MaxAbsQuantizeConv
from resnet.resnet import resnet18


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _grad(fn, *inputs, upstream=None):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    y = fn(*leaves)
    upstream = torch.ones_like(y) if upstream is None else upstream
    return y, torch.autograd.grad(y, leaves, upstream)


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("n_bit", [2, 3, 4])
def test_lsq_values_and_gradients_follow_the_paper(n_bit, signed):
    q_n, q_p = (2 ** (n_bit - 1), 2 ** (n_bit - 1) - 1) if signed else (0, 2**n_bit - 1)
    step, grad_scale = torch.tensor([0.37]), 0.125
    v = torch.cat([torch.linspace(-q_n - 3, q_p + 3, 997), torch.tensor([-q_n, q_p, 0.5, -0.5]).float()])
    x = v * step  # includes values exactly on the clamps
    upstream = torch.randn(x.shape)
    y, (g_x, g_s) = _grad(lambda x_, s_: lsq_quantize(x_, s_, n_bit, signed, grad_scale), x, step, upstream=upstream)
    ratio = x / step
    assert torch.equal(y, torch.round(torch.clamp(ratio, -q_n, q_p)) * step)
    inside = (ratio > -q_n) & (ratio < q_p)
    assert torch.allclose(g_x, torch.where(inside, upstream, torch.zeros(())), rtol=1e-6, atol=0)  # (1/s)·s
    # eq. 3: -x/s + round(x/s) inside, -Q_N below, Q_P above; times the gradient scale
    ds = torch.where(inside, -ratio + torch.round(ratio), torch.where(ratio <= -q_n, -float(q_n), float(q_p)))
    assert torch.allclose(g_s, (upstream * ds).sum().reshape(1) * grad_scale, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_bit", [2, 4])
def test_pact_values_and_gradients_follow_the_paper(n_bit):
    alpha = torch.tensor([1.7])
    x = torch.cat([torch.linspace(-1, 3, 1001), torch.tensor([0.0, 1.7])])
    upstream = torch.randn(x.shape)
    y, (g_x, g_alpha) = _grad(lambda x_, a_: pact_quantize(x_, a_, n_bit), x, alpha, upstream=upstream)
    n = 2**n_bit - 1
    assert torch.allclose(y, torch.round(torch.clamp(x, 0, 1.7) * n / 1.7) * 1.7 / n, atol=1e-6)
    assert len(torch.unique(y)) == n + 1  # uniform levels k·α/(2^b-1), k = 0..2^b-1
    assert torch.equal(g_x, torch.where((x >= 0) & (x < alpha), upstream, torch.zeros(())))
    assert torch.allclose(g_alpha, upstream[x >= alpha].sum().reshape(1))


@pytest.mark.parametrize("n_bit", [1, 2, 4])
def test_dorefa_weights_follow_the_paper(n_bit):
    w = torch.randn(8, 4, 3, 3) * 0.3
    upstream = torch.randn(w.shape)
    y, (g,) = _grad(lambda w_: dorefa_weight(w_, n_bit), w, upstream=upstream)
    n = 2**n_bit - 1
    t = torch.tanh(w)
    assert torch.allclose(y, 2 * torch.round((t / (2 * t.abs().max()) + 0.5) * n) / n - 1, atol=1e-6)
    assert set(torch.unique(torch.round((y + 1) * n / 2)).tolist()) <= set(range(n + 1))
    # straight through the rounding: the gradient of the unrounded expression
    _, (g_ref,) = _grad(lambda w_: 2 * (torch.tanh(w_) / (2 * torch.tanh(w_).abs().max()) + 0.5) - 1, w,
                        upstream=upstream)
    assert torch.allclose(g, g_ref, atol=1e-6)


@pytest.mark.parametrize("n_bit", [2, 3])
def test_dorefa_activations_follow_the_paper(n_bit):
    x = torch.linspace(-0.5, 1.5, 401)
    upstream = torch.randn(x.shape)
    y, (g,) = _grad(lambda x_: dorefa_activation(x_, n_bit), x, upstream=upstream)
    n = 2**n_bit - 1
    assert torch.allclose(y, torch.round(torch.clamp(x, 0, 1) * n) / n)
    off_edges = (x != 0) & (x != 1)  # the clamp's own bounds are measure zero
    expected = torch.where((x > 0) & (x < 1), upstream, torch.zeros(()))
    assert torch.allclose(g[off_edges], expected[off_edges], rtol=1e-6, atol=0)


def test_lsq_steps_start_from_the_data_once():
    act = LSQActivation(2)
    x = torch.randn(4, 8, 5, 5).abs()
    act.train()(x)
    assert act.step.item() == pytest.approx(2 * x.abs().mean().item() / math.sqrt(3), rel=1e-6)
    assert act.initialized.item() == 1 and "initialized" in act.state_dict()
    act(x * 10)  # later batches do not re-initialise
    assert act.step.item() == pytest.approx(2 * x.abs().mean().item() / math.sqrt(3), rel=1e-6)
    fresh = LSQActivation(2).eval()
    fresh(x)
    assert fresh.initialized.item() == 0  # evaluation never initialises
    conv = LSQConv(8, 6, 3, kernel_size=3)
    with torch.no_grad():
        conv.weight.normal_(0, 0.1)  # e.g. loaded from a full-precision model after construction
    conv.train()(torch.randn(1, 8, 6, 6))
    assert conv.step.item() == pytest.approx(2 * conv.weight.abs().mean().item() / math.sqrt(3), rel=1e-6)


def test_lsq_gradient_scale_is_one_over_sqrt_n_qp():
    act = LSQActivation(3).train()
    x = torch.randn(2, 4, 3, 3)
    act(x)  # initialise
    act.step.grad = None
    act(x).sum().backward()
    q_p, n = 7, 4 * 3 * 3
    ratio = x / act.step.detach()
    expected = torch.where(ratio <= 0, 0.0, torch.where(ratio >= q_p, float(q_p), -ratio + torch.round(ratio))).sum()
    assert act.step.grad.item() == pytest.approx(expected.item() / math.sqrt(n * q_p), rel=1e-5)


def test_modules_and_their_state():
    assert set(PACTActivation(2).state_dict()) == {"clip_alpha"} and PACTActivation(2).clip_alpha.item() == 10.0
    assert dict(DoReFaActivation(2).state_dict()) == {}
    assert set(DoReFaConv(4, 4, 2).state_dict()) == {"weight"}
    assert set(LSQConv(4, 4, 2).state_dict()) == {"weight", "step", "initialized"}
    with pytest.raises(ValueError, match="n_bit"):
        LSQConv(4, 4, 1)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_builds_the_same_skeleton(method):
    n2uq_keys = set(resnet18(2, True, 10).state_dict())
    model = resnet18(2, True, 10, Quantizers(2, method))
    keys = set(model.state_dict())
    quantizer_keys = {k for k in n2uq_keys ^ keys if ".quan" in k or ".conv" in k or ".downsample." in k}
    assert n2uq_keys ^ keys == quantizer_keys  # only the quantizers' own state differs
    x = torch.randn(2, 3, 32, 32)
    model.train()(x).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    mbv2 = MobileNetV2(4, 10, Quantizers(4, method)).eval()
    assert mbv2(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_quantizers_refuse_what_does_not_apply():
    with pytest.raises(ValueError, match="unknown quantization method"):
        Quantizers(2, "apot")
    with pytest.raises(ValueError, match="ablations are N2UQ's"):
        Quantizers(2, "lsq", learned_thresholds=False)
    with pytest.raises(ValueError, match="differs"):
        resnet18(2, False, 10, Quantizers(4))
    assert Quantizers(2).is_default and Quantizers(2).tag == "n2uq"
    assert Quantizers(2, learned_thresholds=False, entropy_preserving=False).tag == \
        "n2uq-uniform-thresholds-maxabs-weights"


def test_uniform_threshold_ablation_keeps_the_grid_through_training():
    model = resnet18(2, False, 10, Quantizers(2, learned_thresholds=False))
    ltqs = [m for m in model.modules() if isinstance(m, LTQ)]
    assert ltqs and all(not m.a.requires_grad for m in ltqs)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    for m in ltqs:
        assert torch.equal(m.a, torch.full_like(m.a, m.interval))
        t = m.thresholds() - m.start.detach()
        assert torch.allclose(t[1:] - t[:-1], torch.full_like(t[1:], m.interval))


def test_maxabs_ablation_scales_by_the_largest_weight():
    conv = MaxAbsQuantizeConv(4, 3, 2, kernel_size=3)
    with torch.no_grad():
        conv.weight.normal_(0, 0.1)
    w = conv.quantized_weight().detach()
    s = conv.weight.detach().abs().amax(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(w.abs().amax(dim=(1, 2, 3), keepdim=True), s)  # the grid's ends are ±max|W|
    assert set(conv.state_dict()) == set(HardQuantizeConv(4, 3, 2).state_dict())
    codes, step = conv.weight_codes()
    assert torch.allclose(codes * step.reshape(-1, 1, 1, 1), w, atol=1e-7)
