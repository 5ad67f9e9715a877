"""Every fast implementation against the definitions of n2uq.quant.

Each test runs for the ``torch``, ``c`` and ``triton`` backends (``fast_backend`` in conftest.py),
skipped with the reason where this machine lacks one, and first asserts that the backend's own
implementation computes the case, so no case silently tests plain PyTorch twice. The definitions
themselves are checked against the specification's literal forms in tests/test_quant.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import n2uq.quant
from n2uq.kernels import ltq, quant_stage, rprelu, use_backend
from n2uq.kernels.block_ops import rprelu as rprelu_op
from n2uq.kernels.torch_ops import codes_of
from n2uq.quant import LTQ, HardQuantizeConv, LearnableBias, ltq_breakpoints, ltq_forward_thresholds
from tests.test_fused import Stage, _assert_grads_close, _model_grads, _randomise, _run

BITS = [1, 2, 3, 4, 8]


def _ltq(n_bit: int, seed: int, device) -> LTQ:
    """A trained-looking LTQ: some ``a`` below eps, scales away from 1."""
    g = torch.Generator().manual_seed(seed)
    q = LTQ(n_bit)
    with torch.no_grad():
        q.start.fill_(float(torch.randn(1, generator=g)) * 0.2 - 0.1)
        q.a.copy_(torch.rand(q.n_val, generator=g) * 2 * q.interval + 1e-4)
        if q.n_val >= 3:
            q.a[1] = 5e-4
        q.scale1.fill_(1.07)
        q.scale2.fill_(0.93)
    return q.to(device)


def _inputs_on_edges(q: LTQ, shape, seed: int) -> torch.Tensor:
    """Random inputs with the thresholds and breakpoints themselves among them (after scaling)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 1.2
    a_pos = torch.where(q.a > q.eps, q.a, q.eps).detach().cpu()
    edges = torch.cat([ltq_forward_thresholds(q.start.detach().cpu(), a_pos),
                       ltq_breakpoints(q.start.detach().cpu(), a_pos)])
    x.view(-1)[: edges.numel()] = edges / q.scale1.detach().cpu()
    return x


def _grads(fn, q: LTQ, x: torch.Tensor, upstream: torch.Tensor):
    x = x.clone().requires_grad_(True)
    y = fn(x)
    return y, torch.autograd.grad(y, [x, q.start, q.a, q.scale1, q.scale2], upstream)


def _skip_wide_on_triton(backend, n_bit: int) -> None:
    if backend.name == "triton" and n_bit > 4:
        pytest.skip("Triton takes at most 15 thresholds; wider LTQs run the plain-PyTorch operators (tested as torch)")


@pytest.mark.parametrize("n_bit", BITS)
def test_plain_ltq_matches_definition(fast_backend, n_bit):
    _skip_wide_on_triton(fast_backend, n_bit)
    q = _ltq(n_bit, n_bit, fast_backend.device)
    x = _inputs_on_edges(q, (3, 7, 61, 67), n_bit).to(fast_backend.device)
    upstream = torch.randn(x.shape, device=fast_backend.device)
    fast_backend.assert_computes(x, n_thresholds=q.n_val)
    y, grads = _grads(lambda t: ltq(q, t), q, x, upstream)
    y_def, grads_def = _grads(q, q, x, upstream)  # the module's forward is the definition
    assert torch.equal(y, y_def)
    assert torch.equal(grads[0], grads_def[0])  # the same float operations per element
    # Parameter gradients are sums over 1.4M elements, added in different orders and precisions.
    for name, g, g_def in zip(["start", "a", "scale1", "scale2"], grads[1:], grads_def[1:]):
        assert (g - g_def).abs().max() <= 2e-4 * g_def.abs().max().clamp_min(1e-12), name


def _grad_dtype(backend) -> torch.dtype:
    """Gradients are compared in float64 where the backend computes it: in float32 the parameter
    gradients are sums with heavy cancellation, whose rounding depends on the summation order."""
    return torch.float32 if backend.name == "triton" else torch.float64


@pytest.mark.parametrize("n_bit", BITS)
def test_fused_stage_matches_modules(fast_backend, n_bit):
    _skip_wide_on_triton(fast_backend, n_bit)
    stage = _randomise(Stage(6, 5, n_bit), n_bit).to(fast_backend.device)
    x = (torch.randn(3, 6, 9, 7) * 1.5).to(fast_backend.device)  # 63 per plane: vector body and scalar tail
    upstream = torch.randn(3, 5, 9, 7, device=fast_backend.device)
    fast_backend.assert_computes(x, n_thresholds=stage.quan.n_val)
    with torch.no_grad():
        assert torch.equal(stage(x), stage.unfused(x))  # forward: bit-identical in float32
    dtype = _grad_dtype(fast_backend)
    stage, x, upstream = stage.to(dtype), x.to(dtype), upstream.to(dtype)
    fast_backend.assert_computes(x, n_thresholds=stage.quan.n_val)
    y, grads = _run(stage, x, stage, upstream)
    y_def, grads_def = _run(stage.unfused, x, stage, upstream)
    assert torch.equal(y, y_def)
    _assert_grads_close(grads, grads_def, rel=1e-9 if dtype == torch.float64 else 1e-3)


SPECIAL = [float("nan"), float("inf"), float("-inf"), 1e30, -1e30, 0.0, 0.3, -0.3]


@pytest.mark.parametrize("chain", [False, True], ids=["ltq", "rprelu_ltq"])
def test_nan_and_inf_give_the_reference_outputs(fast_backend, chain):
    """NaN → level 0 (every comparison with NaN is false), +inf → the top level, -inf → level 0,
    as the reference; gradients as the definition's (NaN where it has NaN: ``scale1``'s sum)."""
    stage = _randomise(Stage(len(SPECIAL), 4, 2), 3).to(fast_backend.device)
    with torch.no_grad():
        stage.prelu.weight.abs_()  # -inf stays -inf through the PReLU
    x = torch.tensor(SPECIAL).reshape(1, -1, 1, 1).repeat(2, 1, 3, 3).to(fast_backend.device)
    fast_backend.assert_computes(x, n_thresholds=3)
    q = stage.quan
    if chain:
        fast = lambda t: quant_stage(t, stage.bias1, stage.prelu, stage.bias2, q, stage.conv)
        definition = stage.unfused
    else:
        fast, definition = (lambda t: ltq(q, t)), q
        with torch.no_grad():
            y = fast(x)
        top = q.levels[-1] * q.scale2.detach()
        for i, value in enumerate(SPECIAL[:3]):
            assert torch.all(y[:, i] == (top if value == float("inf") else 0)), value
    upstream = torch.randn(definition(x).shape, device=fast_backend.device)
    y, grads = _grads(fast, q, x, upstream)
    y_def, grads_def = _grads(definition, q, x, upstream)
    assert torch.equal(y, y_def)
    for name, g, g_def in zip(["x", "start", "a", "scale1", "scale2"], grads, grads_def):
        assert torch.equal(torch.isnan(g), torch.isnan(g_def)), name
        torch.testing.assert_close(g, g_def, rtol=1e-5, atol=1e-6, equal_nan=True, msg=name)
    assert torch.all(grads[0][:, :3] == 0)  # no gradient reaches x from NaN or ±inf


def test_rprelu_with_residual_matches_modules(fast_backend):
    """The fused block-output RPReLU against the modules. Under ``torch`` the blocks run the modules
    themselves (nothing to gain from fusing), so the operator is called directly: it is what ``auto``
    runs where no kernel applies (e.g. CUDA without Triton)."""
    b1, pr, b2 = _randomise(nn.ModuleList([LearnableBias(5), nn.PReLU(5), LearnableBias(5)]), 1).to(
        fast_backend.device)
    a, r, up = (torch.randn(2, 5, 6, 6, device=fast_backend.device) for _ in range(3))
    fast_backend.assert_computes(a)

    def run(fn):
        a_, r_ = a.clone().requires_grad_(True), r.clone().requires_grad_(True)
        y = fn(a_, r_)
        return y, torch.autograd.grad(y, [a_, r_, b1.bias, pr.weight, b2.bias], up)

    if fast_backend.name == "torch":
        y, grads = run(lambda a_, r_: rprelu_op(a_, r_, b1.bias, pr.weight, b2.bias))
    else:
        y, grads = run(lambda a_, r_: rprelu(a_, b1, pr, b2, residual=r_))
    y_def, grads_def = run(lambda a_, r_: b2(pr(b1(a_ + r_))))
    assert torch.equal(y, y_def)
    names = ["a", "residual", "bias1", "prelu", "bias2"]
    _assert_grads_close(zip(names, grads), zip(names, grads_def))


def test_ltq_codes_of_the_torch_operators_match_the_definition():
    xs = torch.tensor(SPECIAL + [0.1, 0.5, 0.9])
    thresholds = torch.tensor([-0.2, 0.1, 0.5])
    assert torch.equal(codes_of(xs, thresholds), n2uq.quant.ltq_codes(xs, thresholds))


# ---------------------------------------------------------------------------------------------
# Whole models: the fast path against the definitions (N2UQ_KERNELS=reference)
# ---------------------------------------------------------------------------------------------

MODEL_TAGS = ["resnet18_w2a2_qd1", "resnet18_w3a3_qd0", "mobilenetv2_w4a4",
              pytest.param("resnet50_w3a3_qd0", marks=pytest.mark.slow)]


def _model(tag: str, device) -> torch.nn.Module:
    from tests.test_models import build_from_tag

    torch.manual_seed(0)
    return _randomise(build_from_tag(tag, num_classes=10), 1).to(device)


def _logits_and_grads(model, x, upstream, train: bool, backend: str):
    model = copy.deepcopy(model).train(train)  # train-mode BN updates running stats: start from the same
    with use_backend(backend):
        out, grads = _model_grads(model, x, upstream)
    return out.detach(), grads


@pytest.mark.parametrize("tag", MODEL_TAGS)
def test_whole_model_matches_definitions(fast_backend, tag):
    """Logits bit-identical to the module-by-module definitions (eval and train, float32), and every
    parameter's gradient equal to float rounding (compared in float64 where the backend has it)."""
    model = _model(tag, fast_backend.device)
    size = 64 if tag.startswith("mobilenet") else 40  # every stage sees at least 2×2 pixels
    x = torch.randn(2, 3, size, size, device=fast_backend.device)
    upstream = torch.randn(2, 10, device=fast_backend.device)
    for train in (False, True):
        fast, _ = _logits_and_grads(model, x, upstream, train, fast_backend.name)
        definition, _ = _logits_and_grads(model, x, upstream, train, "reference")
        assert torch.equal(fast, definition), f"logits differ ({'train' if train else 'eval'})"
    dtype = _grad_dtype(fast_backend)
    model, x, upstream = model.to(dtype), x.to(dtype), upstream.to(dtype)
    _, grads = _logits_and_grads(model, x, upstream, True, fast_backend.name)
    _, grads_def = _logits_and_grads(model, x, upstream, True, "reference")
    _assert_grads_close(grads, grads_def, rel=1e-6 if dtype == torch.float64 else 1e-3)


def test_an_edited_definition_reaches_the_models_under_reference(monkeypatch):
    """With N2UQ_KERNELS=reference the models compute through n2uq.quant: change the definition of
    the LTQ codes and the logits change — and then differ from every fast path, which is what
    test_whole_model_matches_definitions would report."""
    model = _model("resnet18_w2a2_qd1", "cpu").eval()
    x = torch.randn(2, 3, 64, 64)
    original, _ = _logits_and_grads(model, x, torch.zeros(2, 10), False, "reference")
    real_codes = n2uq.quant.ltq_codes
    monkeypatch.setattr(n2uq.quant, "ltq_codes", lambda xs, t: real_codes(xs, t).clamp(max=1))  # a "new method"
    edited, _ = _logits_and_grads(model, x, torch.zeros(2, 10), False, "reference")
    fast, _ = _logits_and_grads(model, x, torch.zeros(2, 10), False, "auto")
    assert not torch.equal(edited, original)
    assert torch.equal(fast, original) and not torch.equal(fast, edited)


def test_the_documented_edit_changes_the_logits(monkeypatch, capsys):
    """docs/trying_your_own_quantizer.md: its snippet prints ``False`` (the edit takes effect) on the
    model it builds."""
    import re

    from tests.conftest import REPO_ROOT

    doc = (REPO_ROOT / "docs" / "trying_your_own_quantizer.md").read_text()
    snippet = re.search(r"A quick way to see an edit.*?```python\n(.*?)```", doc, re.S).group(1)
    assert "# False" in snippet
    monkeypatch.setattr(n2uq.quant, "ltq_codes", n2uq.quant.ltq_codes)  # restored whatever the snippet does
    exec(compile(snippet, "trying_your_own_quantizer.md", "exec"), {})
    assert capsys.readouterr().out.strip() == "False"


def test_reference_runs_every_quantizer_module_through_its_definition(monkeypatch):
    calls = {"ltq": 0, "conv": 0}
    real_ltq, real_conv = n2uq.quant.LTQFunction.forward, HardQuantizeConv.forward

    def counting_ltq(ctx, *args):
        calls["ltq"] += 1
        return real_ltq(ctx, *args)

    def counting_conv(self, x):
        calls["conv"] += 1
        return real_conv(self, x)

    monkeypatch.setattr(n2uq.quant.LTQFunction, "forward", staticmethod(counting_ltq))
    monkeypatch.setattr(HardQuantizeConv, "forward", counting_conv)
    model = _model("mobilenetv2_w4a4", "cpu")
    n_ltq = sum(isinstance(m, LTQ) for m in model.modules())
    n_conv = sum(isinstance(m, HardQuantizeConv) for m in model.modules())
    x = torch.randn(1, 3, 64, 64)
    with use_backend("reference"):
        model(x).sum().backward()
    assert calls == {"ltq": n_ltq, "conv": n_conv}
    assert 0 < n_ltq and 0 < n_conv
    calls.update(ltq=0, conv=0)
    with use_backend("auto"):  # fused stages, and the head conv (after PACT) as n2uq.HardQuantizeConv
        model(x).sum().backward()
    assert calls == {"ltq": 0, "conv": 0}
