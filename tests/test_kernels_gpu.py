"""Triton kernels (n2uq.kernels.triton_ops) on CUDA against the unfused modules (the definitions).

Parameter gradients are float32 sums over many elements, some with heavy cancellation; the Triton
kernels and the definitions add them in different orders, hence tolerances of 1e-3 of the largest
entry (the same comparisons run in float64 for the CPU backends in tests/test_backends.py).

Marked ``gpu``: skipped without CUDA or Triton (run them with ``scripts/gpu_check.sh``). One slow
test runs the same kernels in Triton's interpreter on CPU when Triton is installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from n2uq.kernels import ltq, triton_ops, use_backend
from n2uq.kernels.fused import stage_output
from resnet.resnet import resnet18
from tests.test_fused import Stage, _assert_grads_close, _model_grads, _randomise, _run, _unfuse

needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and triton_ops.HAS_TRITON),
                                reason="needs CUDA and Triton")
pytestmark = [pytest.mark.gpu]


@needs_cuda
@pytest.mark.parametrize("n_bit", [2, 4, 8])  # 8 bits: plain PyTorch (more than 15 thresholds)
@pytest.mark.parametrize("channels_last", [False, True])
def test_stage_on_cuda_matches_modules(n_bit, channels_last):
    stage = _randomise(Stage(6, 5, n_bit), n_bit).cuda()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = (torch.randn(3, 6, 9, 7) * 1.5).cuda().to(memory_format=fmt)
    upstream = torch.randn(3, 5, 9, 7).cuda().to(memory_format=fmt)
    y, grads = _run(stage, x, stage, upstream)
    y_ref, grads_ref = _run(stage.unfused, x, stage, upstream)
    assert torch.equal(y, y_ref)
    _assert_grads_close(grads, grads_ref, rel=1e-3)


@needs_cuda
def test_stage_output_same_on_cuda_and_cpu():
    stage = _randomise(Stage(8, 8, 2), 3)
    x = torch.randn(2, 8, 16, 16)
    y_cpu, c_cpu, _ = stage_output(x, stage.bias1, stage.prelu, stage.bias2, stage.quan, want_codes=True)
    stage.cuda()
    y_gpu, c_gpu, _ = stage_output(x.cuda(), stage.bias1, stage.prelu, stage.bias2, stage.quan, want_codes=True)
    assert torch.equal(y_cpu, y_gpu.cpu()) and torch.equal(c_cpu, c_gpu.cpu())


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_stage_matches_modules(dtype):
    """Under autocast the fused stage writes its output in the autocast dtype (the convolution would
    cast it anyway): the same convolution input, output and gradients as the modules."""
    stage = _randomise(Stage(8, 8, 2), 4).cuda()
    x = torch.randn(4, 8, 12, 12, device="cuda").to(memory_format=torch.channels_last)
    upstream = torch.randn(4, 8, 12, 12, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        y, grads = _run(stage, x, stage, upstream)
        y_ref, grads_ref = _run(stage.unfused, x, stage, upstream)
    assert y.dtype == dtype and torch.equal(y, y_ref)
    _assert_grads_close(grads, grads_ref, rel=1e-2)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_input_gradients_match_modules(dtype):
    """bf16/fp16 stage input (as under autocast, channels_last): the Triton kernels compute in float32
    and round the input gradient once to the input dtype, as autograd of the modules does."""
    stage = _randomise(Stage(8, 8, 2), 6).cuda()
    x = (torch.randn(4, 8, 12, 12, device="cuda") * 1.5).to(dtype).to(memory_format=torch.channels_last)
    upstream = torch.randn(4, 8, 12, 12, device="cuda").to(memory_format=torch.channels_last)
    y, grads = _run(stage, x, stage, upstream)
    y_ref, grads_ref = _run(stage.unfused, x, stage, upstream)
    assert torch.equal(y, y_ref) and grads[0][1].dtype == dtype
    assert torch.equal(grads[0][1], grads_ref[0][1])
    _assert_grads_close(grads[1:], grads_ref[1:], rel=1e-3)


@needs_cuda
def test_large_batch_grid_and_int64_offsets():
    """A batch above the 65535 limit of CUDA grid axes 1 and 2, and (given the memory) a tensor of
    more than 2^31 elements: offsets past int32."""
    stage = _randomise(Stage(4, 4, 2), 8).cuda()
    x = torch.randn(70000, 4, 3, 3, device="cuda")
    y, codes, _ = stage_output(x, stage.bias1, stage.prelu, stage.bias2, stage.quan, want_codes=True)
    with use_backend("torch"):
        y_ref, codes_ref, _ = stage_output(x, stage.bias1, stage.prelu, stage.bias2, stage.quan, want_codes=True)
    assert torch.equal(y, y_ref) and torch.equal(codes, codes_ref)
    if torch.cuda.get_device_properties(0).total_memory > 40 * 2**30:
        q = stage.quan
        big = torch.empty(2**31 // 8 * 9, device="cuda", dtype=torch.bfloat16).normal_()  # 2.4e9 elements
        y_big = ltq(q, big)
        assert torch.equal(y_big[-1000:], q(big[-1000:].clone())) and torch.equal(y_big[:1000], q(big[:1000].clone()))
        del y_big, big


@needs_cuda
@pytest.mark.parametrize("train", [True, False])
def test_whole_resnet_on_cuda_fused_equals_unfused(train):
    torch.backends.cudnn.deterministic = True
    model = _randomise(resnet18(2, False, 10), 7).cuda().train(train)
    reference = _unfuse(model).train(train)
    x = torch.randn(4, 3, 32, 32, device="cuda")
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    if not train:  # train-mode gradients are compared in float64 on CPU (test_fused)
        upstream = torch.randn(4, 10, device="cuda")
        _, grads = _model_grads(model, x, upstream)
        _, grads_ref = _model_grads(reference, x, upstream)
        _assert_grads_close(grads, grads_ref, rel=1e-3)


@needs_cuda
def test_cuda_backward_is_deterministic():
    stage = _randomise(Stage(8, 8, 2), 9).cuda()
    x, up = torch.randn(4, 8, 40, 40, device="cuda"), torch.randn(4, 8, 40, 40, device="cuda")

    def ltq_part(x_):
        return stage_output(x_, stage.bias1, stage.prelu, stage.bias2, stage.quan)[0]

    chain_and_ltq = torch.nn.ModuleList([stage.bias1, stage.prelu, stage.bias2, stage.quan])
    first, second = _run(ltq_part, x, chain_and_ltq, up)[1], _run(ltq_part, x, chain_and_ltq, up)[1]
    for (name, a), (_, b) in zip(first, second):
        assert torch.equal(a, b), name


@needs_cuda
def test_torch_backend_on_cuda_matches_kernels():
    stage = _randomise(Stage(6, 6, 4), 5).cuda()
    x, up = torch.randn(2, 6, 10, 10, device="cuda"), torch.randn(2, 6, 10, 10, device="cuda")
    y, grads = _run(stage, x, stage, up)
    with use_backend("torch"):
        y_t, grads_t = _run(stage, x, stage, up)
    assert torch.equal(y, y_t)
    _assert_grads_close(grads, grads_t)


_INTERPRETER_CHECK = r"""
import torch
from n2uq import quant
from n2uq.quant import LTQ
from n2uq.kernels import cpu, triton_ops as T
from n2uq.kernels.ltq_state import ltq_state
torch.manual_seed(0)


def flat(s):  # the named sums of one backward as one vector (the C kernels' are NumPy arrays)
    chain = list(s.chain) if s.chain is not None else []
    parts = [s.gste.grad, s.gste.offset, s.gste.scale1, s.gste.scale2, *chain]
    return torch.cat([torch.as_tensor(p, dtype=torch.float64).reshape(-1) for p in parts])


for n_bit in (1, 2, 3, 4):
    for channels_last in (False, True):
        q = LTQ(n_bit)
        with torch.no_grad():
            q.a.copy_(torch.rand(q.n_val) * 2 * q.interval + 1e-4); q.start.fill_(-0.1)
            if q.n_val >= 3:
                q.a[1] = 5e-4  # below eps
            q.scale1.fill_(1.1); q.scale2.fill_(0.9)
        st = ltq_state(q.start, q.a, q.scale2, q.eps, q.levels, torch.float32)
        # the one-launch state kernel (used on CUDA) against the definitions, bit for bit
        tstate = T.ltq_state(q.start, q.a, q.eps, q.scale2, q.levels)
        a_pos = torch.where(q.a > q.eps, q.a, q.eps).detach()
        start = q.start.detach()
        definitions = (a_pos, quant.ltq_forward_thresholds(start, a_pos), quant.ltq_breakpoints(start, a_pos),
                       quant.gste_slopes(a_pos), st.table)
        for got, want in zip(tstate, definitions):
            assert torch.equal(got, want), (got, want)
        x, g, r = torch.randn(2, 6, 5, 7), torch.randn(2, 6, 5, 7), torch.randn(2, 6, 5, 7)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        xt, rt = x.to(memory_format=fmt), r.to(memory_format=fmt)
        chain = tuple(torch.randn(6) * 0.3 for _ in range(3))
        s1, s2 = q.scale1.detach(), q.scale2.detach()
        for ch in (None, chain):
            y1, c1 = cpu.ltq_forward(x, ch, s1, st.thresholds, st.table, True)
            y2, c2 = T.ltq_forward(xt, ch, s1, st.thresholds, st.table, True)
            assert torch.equal(y1, y2) and torch.equal(c1, c2)
            assert torch.equal(T.decode(c2, st.table), y2)
            args = (s1, s2, st.thresholds, st.levels, st.breakpoints, st.slope)
            gx1, sums1 = cpu.ltq_backward(x, g, ch, *args)
            gx2, sums2 = T.ltq_backward(xt, g, ch, *args)
            assert torch.allclose(gx1, gx2, atol=1e-6)
            assert torch.allclose(flat(sums1), flat(sums2), rtol=1e-5, atol=1e-5)
            # bfloat16 input: promoted to float32 exactly as PyTorch does; the gradient is stored as
            # bf16 (round to nearest on a GPU; the interpreter truncates, hence one bf16 ulp here).
            xb = xt.bfloat16()
            y3, c3 = T.ltq_forward(xb, ch, s1, st.thresholds, st.table, True)
            y4, c4 = cpu.ltq_forward(xb.float().contiguous(), ch, s1, st.thresholds, st.table, True)
            assert torch.equal(y3, y4) and torch.equal(c3, c4)
            gx3, sums3 = T.ltq_backward(xb, g, ch, *args)
            gx4, sums4 = cpu.ltq_backward(xb.float().contiguous(), g, ch, *args)
            assert gx3.dtype == torch.bfloat16 and torch.allclose(gx3.float(), gx4, rtol=2**-7, atol=0)
            assert torch.allclose(flat(sums3), flat(sums4), rtol=1e-5, atol=1e-5)
        y1, z1 = cpu.rprelu_forward(x, r, chain)
        y2, z2 = T.rprelu_forward(xt, rt, chain)
        assert torch.equal(y1, y2) and torch.equal(z1, z2)
        y5, z5 = T.rprelu_forward(xt, rt, chain, want_z=False)
        assert z5 is None and torch.equal(y5, y2)
        g1, sums1 = cpu.rprelu_backward(g, z1, chain[1])
        g2, sums2 = T.rprelu_backward(g, z2, chain[1])
        assert torch.equal(g1, g2) and torch.allclose(torch.stack(sums1), torch.stack(sums2), atol=1e-5)
# wide channels_last tiles (64 channels) and a plain LTQ on a channels_last tensor
x = torch.randn(2, 70, 3, 5).to(memory_format=torch.channels_last)
chain = tuple(torch.randn(70) * 0.3 for _ in range(3))
assert torch.equal(T.ltq_forward(x, chain, s1, st.thresholds, st.table, True)[0],
                   cpu.ltq_forward(x.contiguous(), chain, s1, st.thresholds, st.table, True)[0])
assert torch.equal(T.ltq_forward(x, None, s1, st.thresholds, st.table, False)[0],
                   cpu.ltq_forward(x, None, s1, st.thresholds, st.table, False)[0])
# NaN and ±inf: the same outputs, codes and gradients as the C kernels (NaN -> level 0)
special = torch.tensor([float("nan"), float("inf"), float("-inf"), 1e30, -1e30, 0.0])
xs = special.reshape(1, 6, 1, 1).repeat(2, 1, 2, 3)
chain6 = (torch.randn(6) * 0.3, torch.rand(6) * 0.5, torch.randn(6) * 0.3)
g = torch.randn(xs.shape)
for ch in (None, chain6):
    y1, c1 = cpu.ltq_forward(xs, ch, s1, st.thresholds, st.table, True)
    y2, c2 = T.ltq_forward(xs, ch, s1, st.thresholds, st.table, True)
    assert torch.equal(y1, y2) and torch.equal(c1, c2) and bool((c2[:, 0] == 0).all())
    args = (s1, s2, st.thresholds, st.levels, st.breakpoints, st.slope)
    gx1, sums1 = cpu.ltq_backward(xs, g, ch, *args)
    gx2, sums2 = T.ltq_backward(xs, g, ch, *args)
    assert torch.equal(gx1, gx2)
    torch.testing.assert_close(flat(sums1), flat(sums2), rtol=1e-5, atol=1e-5, equal_nan=True)
print("interpreter ok")
"""


@pytest.mark.slow
@pytest.mark.skipif(not triton_ops.HAS_TRITON, reason="Triton not installed")
def test_triton_kernels_in_interpreter_match_cpu_kernels():
    """Runs without a GPU: Triton's interpreter executes the kernels on CPU tensors."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    result = subprocess.run([sys.executable, "-c", _INTERPRETER_CHECK], env=env, cwd=root,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "interpreter ok" in result.stdout, result.stderr[-3000:]
