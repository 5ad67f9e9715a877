"""The C kernels (n2uq.kernels.cpu): cases specific to them (generic-kernel fallback, weight kernel,
NumPy state, memory layouts, a missing compiler), and the backend selection.

Their agreement with the definitions on the common cases is in tests/test_backends.py."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from n2uq.kernels import cpu, get_backend, implementation, ltq, set_backend, torch_ops, use_backend
from n2uq.kernels.block_ops import weight_ste
from n2uq.kernels.ltq_state import ltq_state
from n2uq.quant import LTQ, HardQuantizeConv, ltq_breakpoints, ltq_forward_thresholds

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
    """LTQ forward and backward on the fast path of the selected backend."""
    x = x.clone().requires_grad_(True)
    y = ltq(q, x)
    return y, torch.autograd.grad(y, [x, q.start, q.a, q.scale1, q.scale2], upstream)


def test_backend_selection():
    previous = get_backend()
    x = torch.randn(4)
    for name in ("torch", "reference"):
        with use_backend(name):
            assert implementation(x, torch.float32) is torch_ops
    if cpu.available():
        for name in ("auto", "c"):
            with use_backend(name):
                assert implementation(x, torch.float32) is cpu
                assert implementation(x.double(), torch.float64) is cpu
                assert implementation(x.bfloat16(), torch.float32) is torch_ops  # no bf16 kernel on CPU
                assert implementation(x, torch.float32, params=[x.double()]) is torch_ops  # mixed dtypes
    with use_backend("triton"):
        assert implementation(x, torch.float32) is torch_ops  # Triton runs CUDA tensors only
    with pytest.raises(ValueError, match="auto, torch, c, triton, reference"):
        set_backend("fast")
    assert get_backend() == previous


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(root), **env})


def test_backend_from_the_environment():
    ok = _python("from n2uq.kernels import get_backend; print(get_backend())", N2UQ_KERNELS="reference")
    assert ok.returncode == 0 and ok.stdout.strip() == "reference"
    bad = _python("import torch; from n2uq import LTQ; from n2uq.kernels import ltq; ltq(LTQ(2), torch.randn(4))",
                  N2UQ_KERNELS="fastest")
    assert bad.returncode != 0 and "N2UQ_KERNELS" in bad.stderr and "auto, torch, c, triton, reference" in bad.stderr


def test_c_backend_without_a_compiler_is_one_clear_error(tmp_path):
    """``auto`` falls back to plain PyTorch with one warning; ``c`` refuses, saying what to do."""
    code = ("import torch; from n2uq import LTQ; from n2uq.kernels import ltq\n"
            "y = ltq(LTQ(2), torch.randn(2, 3, 4, 4)); print('ran', y.shape)")
    env = {"CC": "/nonexistent/cc", "N2UQ_KERNEL_CACHE": str(tmp_path)}
    auto = _python(code, **env, N2UQ_KERNELS="auto")
    assert auto.returncode == 0 and "ran" in auto.stdout and "CPU kernels unavailable" in auto.stderr
    forced = _python(code, **env, N2UQ_KERNELS="c")
    assert forced.returncode != 0
    assert "N2UQ_KERNELS=c but the C kernels cannot be built" in forced.stderr and "compiler" in forced.stderr


def test_missing_compiler_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.raises(RuntimeError, match="compiler"):
        cpu._build(tmp_path)


@needs_kernels
@pytest.mark.parametrize("n_bit", [1, 2, 3, 4, 8])
def test_weight_kernel_matches_the_definition(n_bit):
    conv = HardQuantizeConv(24, 16, n_bit, kernel_size=3)
    with torch.no_grad():
        conv.weight.normal_(0, 0.05)
        conv.weight[0, 0, 0, 0] = 10.0  # clipped
    upstream = torch.randn(conv.weight.shape)
    with use_backend("c"):
        assert hasattr(implementation(conv.weight, torch.float32), "weight_ste")
        w = weight_ste(conv.weight, conv.clip_val, n_bit)
    (g,) = torch.autograd.grad(w, conv.weight, upstream)
    w_def = conv.quantized_weight()
    (g_def,) = torch.autograd.grad(w_def, conv.weight, upstream)
    assert torch.equal(w, w_def) and torch.equal(g, g_def)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_bit", [1, 2, 4, 8])
def test_numpy_state_equals_sequential_torch_accumulation(n_bit, dtype):
    q = _ltq(n_bit, 3).to(dtype)
    with torch.no_grad():
        q.a[0] = -1.0  # below eps
    with use_backend("c"):
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
    with use_backend("c"):
        y, grads = _fwd_bwd(q, x, upstream)
    x_ref = x.clone().requires_grad_(True)
    y_ref = q(x_ref)  # the definition
    grads_ref = torch.autograd.grad(y_ref, [x_ref, q.start, q.a, q.scale1, q.scale2], upstream)
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


@pytest.mark.parametrize("backend", ["torch", pytest.param("c", marks=needs_kernels)])
def test_channels_last_keeps_layout_without_bucketize_copies(backend, contiguous_bucketize):
    """The plain PyTorch operators search the contiguous permuted view of a channels_last input (no
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
