"""The C kernels (n2uq.kernels.cpu) against the plain PyTorch path, and backend selection."""

from __future__ import annotations

import warnings

import pytest
import torch

from n2uq import LTQ, HardQuantizeConv
from n2uq.kernels import cpu, get_backend, ops_for, set_backend, use_backend
from n2uq.quant import ltq_breakpoints, ltq_forward_thresholds, ltq_state

needs_kernels = pytest.mark.skipif(not cpu.available(), reason="no C compiler: plain PyTorch path only")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _ltq(n_bit: int, seed: int) -> LTQ:
    g = torch.Generator().manual_seed(seed)
    q = LTQ(n_bit)
    with torch.no_grad():
        q.start.fill_(-0.2)
        q.a.copy_(torch.rand(q.n_val, generator=g) * 2 * q.interval + 1e-4)
        q.scale1.fill_(1.07)
        q.scale2.fill_(0.93)
    return q


def _fwd_bwd(q: LTQ, x: torch.Tensor, upstream: torch.Tensor):
    x = x.clone().requires_grad_(True)
    y = q(x)
    return y, torch.autograd.grad(y, [x, q.start, q.a, q.scale1, q.scale2], upstream)


@needs_kernels
@pytest.mark.parametrize("n_bit", [1, 2, 3, 4, 5, 8])
def test_kernel_matches_torch_path_on_large_odd_tensors(n_bit):
    """Several work items, vector bodies and scalar tails, values exactly on thresholds."""
    q = _ltq(n_bit, n_bit)
    x = torch.randn(3, 7, 61, 67) * 1.2
    a_pos = torch.where(q.a > q.eps, q.a, q.eps).detach()
    edges = torch.cat([ltq_forward_thresholds(q.start.detach(), a_pos), ltq_breakpoints(q.start.detach(), a_pos)])
    x.view(-1)[: edges.numel()] = edges / q.scale1.detach()
    upstream = torch.randn(x.shape)
    y, grads = _fwd_bwd(q, x, upstream)
    with use_backend("torch"):
        y_ref, grads_ref = _fwd_bwd(q, x, upstream)
    assert torch.equal(y, y_ref)
    assert torch.equal(grads[0], grads_ref[0])  # the same float operations per element
    # Parameter gradients are sums over 1.2M elements: the torch path adds them in float32
    # (index_add_, sum), the kernel in double, so they differ by float32 summation error.
    for name, g, g_ref in zip(["start", "a", "scale1", "scale2"], grads[1:], grads_ref[1:]):
        assert (g - g_ref).abs().max() <= 2e-4 * g_ref.abs().max().clamp_min(1e-12), name


@needs_kernels
def test_nan_input_takes_the_lowest_level_like_the_reference():
    q = _ltq(2, 0)
    y = q(torch.tensor([float("nan"), 5.0]))
    assert y[0] == 0 and y[1] == q.levels[-1] * q.scale2.detach()


def test_backend_selection():
    assert get_backend() in ("auto", "torch")
    x = torch.randn(4)
    with use_backend("torch"):
        assert ops_for(x, torch.float32) is None
    assert ops_for(x.bfloat16(), torch.float32) is None  # mixed dtypes: plain PyTorch on CPU
    with pytest.raises(ValueError, match="backend"):
        set_backend("fast")


def test_missing_compiler_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.raises(RuntimeError, match="compiler"):
        cpu._build(tmp_path)


@needs_kernels
@pytest.mark.parametrize("n_bit", [1, 2, 3, 4, 8])
def test_weight_kernel_matches_torch_expression(n_bit):
    conv = HardQuantizeConv(24, 16, n_bit, kernel_size=3)
    with torch.no_grad():
        conv.weight.normal_(0, 0.05)
        conv.weight[0, 0, 0, 0] = 10.0  # clipped
    upstream = torch.randn(conv.weight.shape)
    w = conv.quantized_weight()
    (g,) = torch.autograd.grad(w, conv.weight, upstream)
    with use_backend("torch"):
        w_ref = conv.quantized_weight()
        (g_ref,) = torch.autograd.grad(w_ref, conv.weight, upstream)
    assert torch.equal(w, w_ref) and torch.equal(g, g_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_bit", [1, 2, 4, 8])
def test_numpy_state_equals_sequential_torch_accumulation(n_bit, dtype):
    q = _ltq(n_bit, 3).to(dtype)
    with torch.no_grad():
        q.a[0] = -1.0  # below eps
    state = ltq_state(q.start, q.a, q.scale2, q.eps, q.levels, dtype)
    a_pos = torch.where(q.a > q.eps, q.a, q.eps).detach()
    assert torch.equal(state.thresholds, ltq_forward_thresholds(q.start.detach(), a_pos))
    assert torch.equal(state.breakpoints, ltq_breakpoints(q.start.detach(), a_pos))
    assert torch.equal(state.a_pos, a_pos)


@needs_kernels
def test_thresholds_outside_their_intervals_take_the_generic_kernel():
    """With |start| ~ 1e5, float rounding can move a threshold out of its interval; the vector
    kernel assumes it does not (the code of an element in interval k is k-1 or k), so such
    parameters go to the generic kernel, which must still equal the plain PyTorch path."""
    for seed in range(100):
        q = LTQ(4)
        with torch.no_grad():
            q.start.fill_(1e5)
            q.a.copy_(torch.rand(15, generator=torch.Generator().manual_seed(seed)) * 0.2 + 0.01)
        state = ltq_state(q.start, q.a, q.scale2, q.eps, q.levels, torch.float32)
        t, d = state.thresholds, state.breakpoints
        if not bool(((d[:-1] <= t) & (t <= d[1:])).all()):
            break
    else:
        pytest.fail("no parameters with a threshold outside its interval found")
    x = 1e5 + torch.rand(2, 3, 40, 40) * 3.0
    upstream = torch.randn(x.shape)
    y, grads = _fwd_bwd(q, x, upstream)
    with use_backend("torch"):
        y_ref, grads_ref = _fwd_bwd(q, x, upstream)
    assert torch.equal(y, y_ref) and torch.equal(grads[0], grads_ref[0])
    for g, g_ref in zip(grads[1:], grads_ref[1:]):
        assert (g - g_ref).abs().max() <= 2e-4 * g_ref.abs().max().clamp_min(1e-12)


@pytest.fixture
def contiguous_bucketize(monkeypatch):
    """torch.bucketize that fails on a non-contiguous input (which it would copy, warning once)."""
    real_bucketize = torch.bucketize

    def checked(values, boundaries, **kwargs):
        assert values.is_contiguous(), "bucketize got a non-contiguous input (it would copy it)"
        return real_bucketize(values, boundaries, **kwargs)

    monkeypatch.setattr(torch, "bucketize", checked)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_channels_last_keeps_layout_without_bucketize_copies(backend, contiguous_bucketize):
    """The plain PyTorch path searches the contiguous permuted view of a channels_last input (no
    copy inside torch.bucketize), and every path returns the input's layout."""
    q = _ltq(3, 5)
    x = torch.randn(2, 8, 5, 7) * 1.2
    upstream = torch.randn(x.shape)
    with use_backend("torch"):
        y_ref, grads_ref = _fwd_bwd(q, x, upstream)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with use_backend(backend), warnings.catch_warnings():
        warnings.simplefilter("error")
        y, grads = _fwd_bwd(q, x_cl, upstream)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert grads[0].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, y_ref) and torch.equal(grads[0], grads_ref[0])
    for g, g_ref in zip(grads[1:], grads_ref[1:]):
        assert (g - g_ref).abs().max() <= 1e-5 * g_ref.abs().max().clamp_min(1e-12)


def test_channels_last_model_step_on_the_torch_path_is_warning_free(contiguous_bucketize):
    from resnet.resnet import resnet18

    model = resnet18(2, 0, num_classes=10).to(memory_format=torch.channels_last)
    images = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with use_backend("torch"), warnings.catch_warnings():
        warnings.simplefilter("error")
        model(images).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
