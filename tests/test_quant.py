"""The definitions in n2uq.quant against the specification's literal forms (tests/spec_forms.py)."""

from __future__ import annotations

import pytest
import torch

from n2uq.quant import (
    LTQ,
    PACT,
    HardQuantizeConv,
    LearnableBias,
    ltq_breakpoints,
    ltq_forward_thresholds,
    ltq_level_table,
)
from tests.spec_forms import (
    spec_ltq,
    spec_ltq_levels,
    spec_ltq_surrogate,
    spec_pact,
    spec_quant_conv,
    spec_weight_quant,
)

BITS = [1, 2, 3, 4, 8]


def _randomised_ltq(n_bit: int, seed: int) -> LTQ:
    """An LTQ with non-trivial trained-looking state, some ``a`` below eps."""
    g = torch.Generator().manual_seed(seed)
    q = LTQ(n_bit)
    n = q.n_val
    with torch.no_grad():
        q.start.fill_(float(torch.randn(1, generator=g)) * 0.2 - 0.1)
        q.a.copy_(torch.rand(n, generator=g) * 2 * q.interval + 1e-4)
        if n >= 3:
            q.a[1] = 5e-4  # below eps
            q.a[-1] = -0.01  # negative: clamped to eps
        q.scale1.fill_(0.8 + 0.4 * float(torch.rand(1, generator=g)))
        q.scale2.fill_(0.7 + 0.6 * float(torch.rand(1, generator=g)))
    return q


def _inputs(q: LTQ, seed: int, size: int = 4000) -> torch.Tensor:
    """Inputs covering below start, every interval, above the last breakpoint and exact thresholds."""
    g = torch.Generator().manual_seed(seed)
    a_pos = torch.where(q.a > q.eps, q.a, q.eps).detach()
    d = ltq_breakpoints(q.start.detach(), a_pos)
    t = ltq_forward_thresholds(q.start.detach(), a_pos)
    lo, hi = float(d[0]) - 0.5, float(d[-1]) + 0.5
    xs = torch.rand(size, generator=g) * (hi - lo) + lo
    exact = torch.cat([t, d])  # values that land exactly on thresholds / breakpoints after scaling
    x = torch.cat([xs / q.scale1.detach(), exact / q.scale1.detach(), torch.tensor([-5.0, 5.0, 0.0])])
    # Make some inputs scale to exactly a threshold: pick x so that x*scale1 == t in float32.
    hits = []
    for value in exact:
        cand = value / q.scale1.detach()
        for delta in (0, 1, -1, 2, -2):
            c = torch.nextafter(cand, cand + delta) if delta else cand
            if (c * q.scale1.detach()) == value:
                hits.append(c)
                break
    if hits:
        x = torch.cat([x, torch.stack(hits).reshape(-1)])
    return x.reshape(1, -1, 1, 1).repeat(2, 1, 1, 1).reshape(2, -1)


@pytest.mark.parametrize("n_bit", BITS)
def test_level_table_matches_spec_accumulation(n_bit):
    n = 2**n_bit - 1
    assert torch.equal(ltq_level_table(n + 1), spec_ltq_levels(n))


@pytest.mark.parametrize("n_bit", BITS)
@pytest.mark.parametrize("seed", [0, 1])
def test_ltq_forward_bit_identical_and_gradients(n_bit, seed):
    q = _randomised_ltq(n_bit, seed)
    x = _inputs(q, seed)
    hits_exact = (x.reshape(-1)[:, None] * q.scale1.detach() == q.thresholds()[None]).any()
    assert hits_exact, "test inputs must include values exactly on a threshold"

    x_def = x.clone().requires_grad_(True)
    y_def = q(x_def)
    params_ref = [p.detach().clone().requires_grad_(True) for p in (q.start, q.a, q.scale1, q.scale2)]
    x_ref = x.clone().requires_grad_(True)
    y_ref = spec_ltq(x_ref, *params_ref)

    assert torch.equal(y_def, y_ref), "LTQ forward must be bit-identical to SPEC §1"
    levels = ltq_level_table(q.n_val + 1) * q.scale2.detach()
    assert torch.isin(y_def, levels).all()

    upstream = torch.randn(y_def.shape, generator=torch.Generator().manual_seed(seed + 7))
    grads_def = torch.autograd.grad(y_def, [x_def, q.start, q.a, q.scale1, q.scale2], upstream)
    grads_ref = torch.autograd.grad(y_ref, [x_ref, *params_ref], upstream)
    for name, gd, gr in zip(["x", "start", "a", "scale1", "scale2"], grads_def, grads_ref):
        tol = 1e-5 * max(gr.abs().max().item(), 1e-12)
        assert gd.shape == gr.shape, name
        assert (gd - gr).abs().max().item() <= tol, f"grad {name}: {gd} vs {gr}"


@pytest.mark.parametrize("n_bit", [2, 4])
def test_ltq_no_gradient_outside_breakpoints_and_below_eps(n_bit):
    q = _randomised_ltq(n_bit, 3)
    d = ltq_breakpoints(q.start.detach(), torch.where(q.a > q.eps, q.a, q.eps).detach())
    x = torch.tensor([float(d[0]) - 1.0, float(d[0]), float(d[-1]) + 0.1, float(d[-1]) + 10.0])
    x = (x / q.scale1.detach()).requires_grad_(True)
    # Avoid xs landing exactly on d[0] inside after scaling: use xs <= d[0] robustly.
    x.data[1] = torch.nextafter(x.data[1], torch.tensor(-1e9))
    y = q(x)
    gx, gstart, ga = torch.autograd.grad(y.sum(), [x, q.start, q.a])
    assert torch.all(gx == 0) and gstart.item() == 0 and torch.all(ga == 0)
    # a below eps never receives gradient, even from inputs inside its interval.
    if n_bit >= 2:
        x = torch.linspace(float(d[0]), float(d[-1]), 5000) / q.scale1.detach()
        ga = torch.autograd.grad(q(x).sum(), q.a)[0]
        assert ga[1] == 0 and ga[-1] == 0


@pytest.mark.parametrize("n_bit", [1, 2, 3])
def test_ltq_gradcheck_float64(n_bit):
    """``gradcheck`` of the closed-form backward against finite differences of ``scale2·g``.

    The forward is piecewise constant, so the checked function takes its *value* from the
    surrogate ``scale2·g(scale1·x)`` and its *gradient* from the definition (LTQFunction); gradcheck then
    compares the G-STE backward with numerical derivatives of the surrogate, in float64, at points
    away from thresholds and breakpoints.
    """
    from n2uq.quant import LTQFunction

    q = _randomised_ltq(n_bit, 11).double()
    a_pos = torch.where(q.a > q.eps, q.a, q.eps).detach()
    d = ltq_breakpoints(q.start.detach(), a_pos)
    t = ltq_forward_thresholds(q.start.detach(), a_pos)
    g = torch.Generator().manual_seed(5)
    xs = torch.rand(64, generator=g, dtype=torch.float64) * float(d[-1] - d[0] + 1) + float(d[0]) - 0.5
    edges = torch.cat([d, t])
    far = (xs[:, None] - edges[None]).abs().min(dim=1).values > 1e-3
    x = (xs[far] / q.scale1.detach()).requires_grad_(True)
    start, a, s1 = (p.detach().clone().requires_grad_(True) for p in (q.start, q.a, q.scale1))
    s2 = q.scale2.detach()
    levels = q.levels.double()

    def definition_with_surrogate_value(x, start, a, s1):
        y = LTQFunction.apply(x, start, a, s1, s2, q.eps, levels)
        return y - y.detach() + (spec_ltq_surrogate(x, start, a, s1) * s2).detach()

    assert torch.autograd.gradcheck(definition_with_surrogate_value, (x, start, a, s1), eps=1e-6, atol=1e-6)


def test_ltq_constants_are_not_trainable():
    q = LTQ(2)
    names = {n for n, _ in q.named_parameters()}
    assert names == {"start", "a", "scale1", "scale2"}
    sd = q.state_dict()
    for name, value in {"two": 2.0, "one": 1.0, "zero": 0.0, "minusone": -1.0, "eps": 1e-3}.items():
        assert name in sd and sd[name].shape == (1,)
        assert sd[name].item() == pytest.approx(value)
    assert "levels" not in sd
    assert q.a.shape == (3,) and torch.allclose(q.a, torch.full((3,), 2 / 3))


def test_ltq_rejects_bad_bits():
    for bad in (0, 9, 2.0, "2"):
        with pytest.raises(ValueError, match="n_bit"):
            LTQ(bad)


def test_ltq_codes_and_multidim():
    q = _randomised_ltq(3, 4)
    x = torch.randn(2, 5, 7, 7)
    y = q(x)
    codes = q.codes(x)
    assert codes.min() >= 0 and codes.max() <= 7
    assert torch.equal(y, (ltq_level_table(8) * q.scale2.detach())[codes])


# ---------------------------------------------------------------------------------------------
# HardQuantizeConv
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_bit", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("groups", [1, 4])
def test_hard_quantize_conv_values_levels_and_gradient(n_bit, groups):
    torch.manual_seed(n_bit * 10 + groups)
    conv = HardQuantizeConv(8, 12, n_bit, kernel_size=3, stride=2, padding=1, groups=groups)
    with torch.no_grad():
        conv.weight.normal_(0, 0.05)
    x = torch.randn(2, 8, 9, 9)
    w_ref = conv.weight.detach().clone().requires_grad_(True)
    y = conv(x)
    y_ref = spec_quant_conv(x, w_ref, n_bit, 2, 1, groups)
    assert torch.allclose(y, y_ref, rtol=1e-5, atol=1e-6)

    # Levels: odd multiples of s/n.
    codes, step = conv.weight_codes()
    n = 2**n_bit - 1
    assert codes.abs().max() <= n and torch.all(codes % 2 == n % 2)
    assert torch.all((codes - n) % 2 == 0)
    wq = conv.quantized_weight().detach()
    # (Wq - Ws) + Ws carries float noise of order ulp(|Ws|) around the exact level.
    assert torch.allclose(wq, codes * step.view(-1, 1, 1, 1), rtol=1e-6, atol=1e-6)
    assert torch.allclose(wq, spec_weight_quant(conv.weight.detach(), n_bit), rtol=1e-6, atol=1e-6)

    # Weight gradient: upstream / s, no clipping mask.
    upstream = torch.randn_like(y)
    (gw,) = torch.autograd.grad(y, conv.weight, upstream)
    (gw_ref,) = torch.autograd.grad(y_ref, w_ref, upstream)
    assert torch.allclose(gw, gw_ref, rtol=1e-5, atol=1e-6 * gw_ref.abs().max().item())
    assert conv.clip_val.grad is None and not conv.clip_val.requires_grad


def test_hard_quantize_conv_gradient_has_no_clip_mask():
    conv = HardQuantizeConv(1, 1, 2, kernel_size=1, padding=0)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[[10.0]]]]))  # huge weight: clipped in value
    x = torch.ones(1, 1, 1, 1)
    (gw,) = torch.autograd.grad(conv(x).sum(), conv.weight)
    s = (3 / 2) * 10.0
    assert gw.item() == pytest.approx(1 / s)


def test_hard_quantize_conv_state_names_and_order():
    conv = HardQuantizeConv(4, 8, 2, kernel_size=3)
    assert list(conv.state_dict()) == ["clip_val", "zero", "weight"]
    assert [n for n, p in conv.named_parameters() if p.requires_grad] == ["weight"]
    assert conv.weight.abs().max() <= 0.0005


# ---------------------------------------------------------------------------------------------
# PACT and LearnableBias
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_bit", [2, 4])
def test_pact_values_and_both_gradients(n_bit):
    pact = PACT(n_bit, init_act_clip_val=1.5)
    x = torch.cat([torch.linspace(-1, 3, 401), torch.tensor([0.0, 1.5])]).requires_grad_(True)
    c_ref = pact.clip_val.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = pact(x)
    y_ref = spec_pact(x_ref, c_ref, n_bit)
    assert torch.equal(y, y_ref)
    upstream = torch.randn_like(y)
    gx, gc = torch.autograd.grad(y, [x, pact.clip_val], upstream)
    gx_ref, gc_ref = torch.autograd.grad(y_ref, [x_ref, c_ref], upstream)
    assert torch.equal(gx, gx_ref) and torch.allclose(gc, gc_ref)
    # Closed form (SPEC §3): x gets grad on 0 < x < c; c gets clipped grads + Σ grad·round(x·nq)/n.
    xd = x.detach()
    inside = (xd > 0) & (xd < 1.5)
    assert torch.equal(gx, torch.where(inside, upstream, torch.zeros_like(upstream)))
    xc = xd.clamp(0, 1.5)
    expected_c = upstream[xd >= 1.5].sum() + (upstream * torch.round(xc * (2**n_bit - 1) / 1.5)).sum() / (
        2**n_bit - 1
    )
    assert gc.item() == pytest.approx(expected_c.item(), rel=1e-5, abs=1e-5)


def test_learnable_bias():
    lb = LearnableBias(3)
    assert lb.bias.shape == (1, 3, 1, 1) and torch.all(lb.bias == 0)
    with torch.no_grad():
        lb.bias.copy_(torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1))
    x = torch.zeros(2, 3, 4, 4)
    assert torch.equal(lb(x)[:, 1], torch.full((2, 4, 4), 2.0))
