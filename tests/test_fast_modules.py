"""What a user imports: ``n2uq.LTQ`` / ``n2uq.HardQuantizeConv`` run the fast operators (the
definitions under ``N2UQ_KERNELS=reference``) with the definitions' state and values; G-STE's
parameter gradients have one home (n2uq.quant.gste_param_grads) that every fast path uses; one
bit-width check and one name (``n_bit``, with the authors' ``num_bits`` kept working)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import n2uq
from n2uq import quant as definitions
from n2uq.bitwidth import check_bits
from n2uq.kernels import cpu, torch_ops, use_backend
from n2uq.kernels.ltq_state import ltq_state
from n2uq.kernels.op_utils import LTQSums
from n2uq.methods import Quantizers
from tests.test_backends import _ltq


def _counting(monkeypatch, cls, name: str, calls: dict, static: bool = False) -> None:
    real = getattr(cls, name)

    def counted(*args):
        calls[name] = calls.get(name, 0) + 1
        return real(*args)

    monkeypatch.setattr(cls, name, staticmethod(counted) if static else counted)


def _fwd_bwd(module, x, upstream, params):
    x = x.clone().requires_grad_(True)
    y = module(x)
    return y, torch.autograd.grad(y, [x, *params], upstream)


def _copy_into(kind, source, *args):
    """A module of class ``kind`` holding ``source``'s state (strict both ways: the same state dict)."""
    target = kind(*args)
    target.load_state_dict(source.state_dict(), strict=True)
    return target


@pytest.mark.parametrize("n_bit", [2, 3, 4, 8])
def test_n2uq_ltq_is_the_definition_running_the_fast_operator(monkeypatch, n_bit):
    definition = _ltq(n_bit, n_bit, "cpu")
    fast = _copy_into(n2uq.LTQ, definition, n_bit)
    assert isinstance(fast, definitions.LTQ) and set(fast.state_dict()) == set(definition.state_dict())
    g = torch.Generator().manual_seed(n_bit)
    x, upstream = torch.randn(4, 6, 9, 9, generator=g) * 1.3, torch.randn(4, 6, 9, 9, generator=g)
    calls: dict = {}
    _counting(monkeypatch, definitions.LTQFunction, "forward", calls, static=True)
    y_def, g_def = _fwd_bwd(definition, x, upstream, [definition.start, definition.a, definition.scale1,
                                                      definition.scale2])
    assert calls == {"forward": 1}
    with use_backend("auto"):
        y, grads = _fwd_bwd(fast, x, upstream, [fast.start, fast.a, fast.scale1, fast.scale2])
    assert calls == {"forward": 1}, "n2uq.LTQ ran the definition under auto"
    assert torch.equal(y, y_def)
    for grad, grad_def in zip(grads, g_def):  # the definition sums in float32, the fast path in float64
        assert (grad - grad_def).abs().max() <= 1e-4 * grad_def.abs().max().clamp_min(1e-12)
    with use_backend("reference"):
        y_ref, _ = _fwd_bwd(fast, x, upstream, [fast.start, fast.a, fast.scale1, fast.scale2])
    assert calls == {"forward": 2} and torch.equal(y_ref, y_def)


def test_n2uq_hard_quantize_conv_is_the_definition_running_the_weight_operator(monkeypatch):
    torch.manual_seed(0)
    definition = definitions.HardQuantizeConv(6, 8, 2, kernel_size=3, stride=2, padding=1, groups=2)
    with torch.no_grad():
        definition.weight.normal_(0, 0.1)
    fast = _copy_into(n2uq.HardQuantizeConv, definition, 6, 8, 2, 3, 2, 1, 2)
    x, upstream = torch.randn(2, 6, 9, 9), torch.randn(2, 8, 5, 5)
    y_def, g_def = _fwd_bwd(definition, x, upstream, [definition.weight])
    calls: dict = {}
    _counting(monkeypatch, definitions.HardQuantizeConv, "quantized_weight", calls)
    with use_backend("auto"):
        y, grads = _fwd_bwd(fast, x, upstream, [fast.weight])
    assert calls == {}, "n2uq.HardQuantizeConv ran the definition under auto"
    assert torch.equal(y, y_def) and all(torch.equal(g, gd) for g, gd in zip(grads, g_def))
    with use_backend("reference"):
        fast(x)
    assert calls == {"quantized_weight": 1}


def test_a_subclass_that_changes_the_weight_scale_is_honoured():
    class MaxAbs(n2uq.HardQuantizeConv):
        scale = definitions.MaxAbsQuantizeConv.scale

    torch.manual_seed(3)
    mine = MaxAbs(4, 6, 2)
    with torch.no_grad():
        mine.weight.normal_(0, 0.1)
    ablation = _copy_into(definitions.MaxAbsQuantizeConv, mine, 4, 6, 2)
    x = torch.randn(2, 4, 7, 7)
    with use_backend("auto"):
        assert torch.equal(mine(x), ablation(x))


def test_n2uq_pact_is_the_definition_with_a_closed_form_backward(monkeypatch):
    definition = definitions.PACT(3, 1.5)
    fast = _copy_into(n2uq.PACT, definition, 3, 1.5)
    x = torch.randn(4, 5, 8, 8) * 2
    x.view(-1)[:5] = torch.tensor([0.0, 1.5, float("inf"), -1.0, 1.5 * 6 / 7])  # on the clip, a level
    upstream = torch.randn(x.shape)
    y_def, g_def = _fwd_bwd(definition, x, upstream, [definition.clip_val])
    calls: dict = {}
    _counting(monkeypatch, definitions.PACT, "forward", calls)
    with use_backend("auto"):
        y, grads = _fwd_bwd(fast, x, upstream, [fast.clip_val])
    assert calls == {} and torch.equal(y, y_def) and torch.equal(grads[0], g_def[0])
    assert torch.allclose(grads[1], g_def[1], rtol=1e-5, atol=1e-6) and grads[1].shape == (1,)
    with use_backend("reference"):
        fast(x)
    assert calls == {"forward": 1}


def test_every_quantizer_exported_from_n2uq_has_a_fast_form():
    exported = [getattr(n2uq, name) for name in n2uq.__all__]
    quantizers = [c for c in exported if isinstance(c, type) and c.__module__ == "n2uq.kernels.modules"]
    assert {c.__name__ for c in quantizers} == {"LTQ", "HardQuantizeConv", "PACT"}
    for cls in quantizers:
        assert cls.__bases__ == (getattr(definitions, cls.__name__),) and "forward" in vars(cls)


def test_models_are_built_from_the_fast_modules():
    stage = Quantizers(2)
    assert type(stage.activation()) is n2uq.LTQ and type(stage.conv(4, 4, 3)) is n2uq.HardQuantizeConv
    ablation = Quantizers(2, entropy_preserving=False).conv(4, 4, 3)
    assert type(ablation) is definitions.MaxAbsQuantizeConv


# --- G-STE: one formula --------------------------------------------------------------------------


def _param_grads_of_fast_paths(q, x, upstream):
    """Parameter gradients of ``n2uq.kernels.ltq`` under the C kernels and the plain-PyTorch ones."""
    out = {}
    for backend in ("c", "torch"):
        with use_backend(backend):
            out[backend] = _fwd_bwd(lambda t: n2uq.kernels.ltq(q, t), x, upstream, [q.start, q.a, q.scale1,
                                                                                     q.scale2])[1][1:]
    return out


@pytest.mark.skipif(not cpu.available(), reason="the C kernels could not be built (no C compiler)")
def test_an_edited_gste_formula_changes_every_fast_path(monkeypatch):
    """The fast paths compute only the sums; the parameter gradients come from the definitions'
    gste_param_grads, so editing it there changes them (and the definition's own backward) alike."""
    q = _ltq(3, 1, "cpu")
    x, upstream = torch.randn(2, 4, 12, 12), torch.randn(2, 4, 12, 12)
    before = _param_grads_of_fast_paths(q, x, upstream)
    real = definitions.gste_param_grads

    def edited(sums, a_pos, a, eps, scale2):  # "a new estimator": twice the interval-length gradient
        grads = real(sums, a_pos, a, eps, scale2)
        return grads._replace(a=grads.a * 2)

    monkeypatch.setattr(definitions, "gste_param_grads", edited)
    after = _param_grads_of_fast_paths(q, x, upstream)
    with use_backend("reference"):
        by_definition = _fwd_bwd(q, x, upstream, [q.start, q.a, q.scale1, q.scale2])[1][1:]
    for backend in ("c", "torch"):
        assert torch.allclose(after[backend][1], 2 * before[backend][1], rtol=1e-6, atol=0)
        assert torch.equal(after[backend][0], before[backend][0])  # start: untouched by the edit
        assert torch.allclose(after[backend][1], by_definition[1], rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not cpu.available(), reason="the C kernels could not be built (no C compiler)")
def test_a_formula_edited_with_tensor_only_operations_still_reaches_the_c_path(monkeypatch):
    """The C kernels hand NumPy sums to gste_param_grads; an edit written with torch-only calls (here
    torch.clamp) is given tensors instead, and its gradients are what the edit says."""
    q = _ltq(2, 1, "cpu")
    x, upstream = torch.randn(2, 4, 12, 12), torch.randn(2, 4, 12, 12)
    before = _param_grads_of_fast_paths(q, x, upstream)
    real = definitions.gste_param_grads

    def edited(sums, a_pos, a, eps, scale2):
        grads = real(sums, a_pos, a, eps, scale2)
        return grads._replace(a=grads.a.clamp(-1e-4, 1e-4))  # .clamp: a tensor method, not NumPy's

    monkeypatch.setattr(definitions, "gste_param_grads", edited)
    after = _param_grads_of_fast_paths(q, x, upstream)
    assert torch.allclose(after["c"][1], before["c"][1].clamp(-1e-4, 1e-4), rtol=1e-6, atol=0)
    assert torch.allclose(after["c"][1], after["torch"][1], rtol=1e-4, atol=1e-9)
    assert torch.equal(after["c"][0], before["c"][0])  # start: untouched by the edit


@pytest.mark.skipif(not cpu.available(), reason="the C kernels could not be built (no C compiler)")
def test_an_edited_slope_reaches_the_fast_state(monkeypatch):
    """The slopes (and thresholds, breakpoints) of the fast paths' per-call state are the definitions'."""
    q = _ltq(2, 4, "cpu")
    with use_backend("c"):
        slope = ltq_state(q.start, q.a, q.scale2, q.eps, q.levels, torch.float32).slope
        monkeypatch.setattr(definitions, "gste_slopes", lambda a_pos: 3 * a_pos)
        edited = ltq_state(q.start, q.a, q.scale2, q.eps, q.levels, torch.float32).slope
    a_pos = torch.where(q.a > q.eps, q.a, q.eps).detach()
    assert not torch.equal(slope, edited) and torch.equal(edited, 3 * a_pos)


@pytest.mark.skipif(not cpu.available(), reason="the C kernels could not be built (no C compiler)")
def test_a_state_formula_edited_with_tensor_only_operations_still_reaches_the_c_path(monkeypatch):
    q = _ltq(2, 4, "cpu")
    monkeypatch.setattr(definitions, "gste_slopes", lambda a_pos: 3 * a_pos.clamp(min=0))  # .clamp: tensors only
    with use_backend("c"):
        edited = ltq_state(q.start, q.a, q.scale2, q.eps, q.levels, torch.float32).slope
    a_pos = torch.where(q.a > q.eps, q.a, q.eps).detach()
    assert torch.equal(edited, 3 * a_pos)


def test_the_kernels_return_named_sums():
    q = _ltq(2, 2, "cpu")
    state = ltq_state(q.start, q.a, q.scale2, q.eps, q.levels, torch.float32)
    x, g = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    chain = tuple(torch.randn(3) for _ in range(3))
    impls = [torch_ops] + ([cpu] if cpu.available() else [])
    for impl in impls:
        for ch in (None, chain):
            _, sums = impl.ltq_backward(x, g, ch, q.scale1.detach(), q.scale2.detach(), state.thresholds,
                                        state.levels, state.breakpoints, state.slope)
            assert isinstance(sums, LTQSums) and isinstance(sums.gste, definitions.GSTESums)
            assert sums.gste.grad.shape == sums.gste.offset.shape == (q.n_val,)
            assert (sums.chain is None) == (ch is None)
            if ch is not None:
                assert all(s.shape == (3,) for s in sums.chain)


@pytest.mark.parametrize("n_bit", [1, 2, 4])
def test_gste_param_grads_are_the_same_on_numpy_and_tensors(n_bit):
    """The CPU kernels hand their float64 sums to gste_param_grads as NumPy arrays, the other paths as
    tensors: one formula, the same gradients (including an interval clamped at eps, whose gradient is 0)."""
    g = torch.Generator().manual_seed(n_bit)
    n = 2**n_bit - 1
    a = (torch.full((n,), 2.0 / n) + 0.05 * torch.randn(n, generator=g)).float()
    a[0] = -0.5  # below eps: a⁺ = eps, no gradient
    eps, scale2 = torch.tensor([1e-3]), torch.tensor([1.3])
    a_pos = torch.where(a > eps, a, eps)
    sums = definitions.GSTESums(*(torch.randn(k, generator=g, dtype=torch.float64) for k in (n, n)),
                                *(torch.randn((), generator=g, dtype=torch.float64) for _ in range(2)))
    by_tensor = definitions.gste_param_grads(sums, a_pos, a, eps, scale2)
    by_numpy = definitions.gste_param_grads(definitions.GSTESums(*(t.numpy() for t in sums)),
                                            *(t.numpy() for t in (a_pos, a, eps, scale2)))
    for t, arr in zip(by_tensor, by_numpy):
        assert isinstance(arr, np.ndarray) and arr.dtype == np.float32 and t.dtype == torch.float32
        assert torch.allclose(torch.from_numpy(arr), t, rtol=1e-6, atol=0), (arr, t)
    assert by_numpy.a[0] == 0 and by_tensor.a[0] == 0


# --- bit width: one check, one name --------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, 9, 2.0, "2", True, None])
def test_check_bits_rejects_what_is_not_1_to_8(bad):
    with pytest.raises(ValueError, match=r"Thing: n_bit must be an integer in 1\.\.8"):
        check_bits(bad, "Thing")
    assert check_bits(8, "Thing") == 8


@pytest.mark.parametrize("kind", [definitions.HardQuantizeConv, n2uq.HardQuantizeConv])
def test_conv_takes_n_bit_and_the_references_num_bits(kind):
    by_position, by_name, by_old_name = kind(4, 6, 3), kind(4, 6, n_bit=3), kind(4, 6, num_bits=3)
    for conv in (by_position, by_name, by_old_name):
        assert conv.n_bit == conv.num_bits == 3
        assert set(conv.state_dict()) == {"clip_val", "zero", "weight"}
    with pytest.raises(ValueError, match="once"):
        kind(4, 6, 3, num_bits=3)
    with pytest.raises(ValueError, match="n_bit"):
        kind(4, 6, num_bits=9)


def test_pact_takes_n_bit_and_the_references_num_bits():
    assert n2uq.PACT(4).n_bit == n2uq.PACT(num_bits=4).n_bit == n2uq.PACT(n_bit=4).num_bits == 4
    assert list(n2uq.PACT(num_bits=4, init_act_clip_val=3).state_dict()) == ["clip_val"]
    with pytest.raises(ValueError, match="once"):
        n2uq.PACT()


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 0, 4, 4), (2, 3, 0, 4), (0,), ()])
def test_empty_and_0d_inputs_give_what_the_definition_gives(shape):
    """An empty batch (or plane) returns empty results instead of reaching the kernels' partition
    (which divided by the plane size); a 0-d input broadcasts to [1] as in the definition."""
    fast, ref = n2uq.LTQ(2), definitions.LTQ(2)
    x = torch.randn(shape)
    upstream = torch.ones(shape or (1,))
    y_fast, g_fast = _fwd_bwd(fast, x, upstream, [fast.a])
    with use_backend("reference"):
        y_ref, g_ref = _fwd_bwd(ref, x, upstream, [ref.a])
    assert y_fast.shape == y_ref.shape
    torch.testing.assert_close(y_fast, y_ref, rtol=0, atol=0)
    for a, b in zip(g_fast, g_ref):
        assert a.shape == b.shape


@pytest.mark.skipif(not cpu.available(), reason="the C kernels could not be built (no C compiler)")
def test_the_c_kernels_themselves_accept_empty_planes():
    """Called directly (past the dispatcher, which sends empty tensors to plain PyTorch): no crash.
    In a subprocess, since the failure was a floating-point exception that kills the interpreter."""
    import subprocess
    import sys

    code = """if True:
        import torch
        from n2uq.kernels import cpu
        from n2uq.kernels.ltq_state import ltq_state
        from n2uq.quant import LTQ
        q = LTQ(2)
        s = ltq_state(q.start, q.a, q.scale2, q.eps, q.levels, torch.float32)
        for shape in [(0, 3, 4, 4), (2, 3, 0, 4), (2, 0, 4, 4)]:
            x = torch.randn(shape)
            y, _ = cpu.ltq_forward(x, None, q.scale1.detach(), s.thresholds, s.table, False)
            gx, _ = cpu.ltq_backward(x, torch.ones_like(x), None, q.scale1.detach(), q.scale2.detach(),
                                     s.thresholds, s.levels, s.breakpoints, s.slope)
            assert y.shape == gx.shape == x.shape
        print("ok")
    """
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", (run.returncode, run.stderr[-2000:])


@pytest.mark.parametrize("arch", ["resnet18", "mobilenetv2"])
def test_models_take_an_empty_batch(arch):
    from mobilenetv2.mobilenet_v2 import MobileNetV2
    from resnet.resnet import resnet18

    model = resnet18(2, False, 10) if arch == "resnet18" else MobileNetV2(4, 10)
    x = torch.randn(0, 3, 32, 32, requires_grad=True)
    model(x).sum().backward()
    assert x.grad.shape == x.shape
    assert model.eval()(x).shape == (0, 10)


def test_a_second_derivative_through_the_fast_ltq_is_an_error_not_a_silent_zero():
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    fast = n2uq.LTQ(2)
    (g,) = torch.autograd.grad(fast(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        g.sum().backward()
    with use_backend("reference"):  # the definition's backward is made of differentiable operations
        (g,) = torch.autograd.grad(fast(x).pow(2).sum(), x, create_graph=True)
        g.sum().backward()
