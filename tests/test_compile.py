"""torch.compile of quantized blocks: the fused operators are opaque custom ops (n2uq.kernels.ops),
so a compiled block has no graph break, does not recompile for a second call with the same shapes,
and computes what the eager block computes."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from n2uq import LTQ
from n2uq.kernels import use_backend
from resnet.resnet import BasicBlock

BACKENDS = ["auto", "torch"]


def _block() -> BasicBlock:
    torch.manual_seed(0)
    block = BasicBlock(16, 16, 1, quantizers=2)
    with torch.no_grad():  # trained-looking RPReLU and LTQ parameters
        for name, p in block.named_parameters():
            if name.startswith("bias"):
                p.normal_(0, 0.2)
            elif name.endswith(".a"):
                p.uniform_(0.3, 1.0)
    return block


def _fwd_bwd(fn, module, x, upstream):
    x = x.clone().requires_grad_(True)
    y = fn(x)
    params = [p for p in module.parameters() if p.requires_grad]
    return y, torch.autograd.grad(y, [x] + params, upstream)


def _compiled_twice(module, compiler: str, x, upstream):
    """Compile, run forward+backward twice (the second run must not recompile); count graph breaks."""
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(module, backend=compiler)
    first = _fwd_bwd(compiled, module, x, upstream)
    with torch._dynamo.config.patch(error_on_recompile=True):
        second = _fwd_bwd(compiled, module, x, upstream)
    breaks = sum(counters["graph_break"].values())
    torch._dynamo.reset()
    return first, second, breaks


def _assert_close(got, want, rel):
    (y, grads), (y_ref, grads_ref) = got, want
    assert (y - y_ref).abs().max() <= rel * y_ref.abs().max()
    for g, g_ref in zip(grads, grads_ref):
        assert (g - g_ref).abs().max() <= rel * g_ref.abs().max().clamp_min(1e-12)


def _check_compiled(module, compiler, x, upstream, rel):
    """Compiled twice: no graph break, no recompilation, both results within ``rel`` of eager
    (``rel=0``: bit-identical)."""
    eager = _fwd_bwd(module, module, x, upstream)
    first, second, breaks = _compiled_twice(module, compiler, x, upstream)
    assert breaks == 0
    _assert_close(first, eager, rel)
    _assert_close(second, eager, rel)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_block_traces_the_fused_ops_whole(backend):
    """Dynamo + AOTAutograd (fake implementations, registered backwards) on a BasicBlock: one graph,
    no break, no recompilation, and bit-identical results (the same kernels run)."""
    block = _block()
    x, upstream = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8)
    with use_backend(backend):
        _check_compiled(block, "aot_eager", x, upstream, 0.0)


def test_compiled_plain_ltq_any_shape():
    q = LTQ(3)
    x, upstream = torch.randn(5, 7) * 1.5, torch.randn(5, 7)
    _check_compiled(q, "aot_eager", x, upstream, 0.0)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_inductor_compiled_block_matches_eager(backend):
    """The default compiler (Inductor, C++ codegen on CPU; about 20 s cold): no break, no
    recompilation; values agree to float rounding (Inductor's own BatchNorm and adds)."""
    block = _block()
    x, upstream = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8)
    with use_backend(backend):
        _check_compiled(block, "inductor", x, upstream, 1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_inductor_compiled_block_on_cuda_matches_eager():
    """On CUDA the ops run the Triton kernels inside the compiled graph (bf16 autocast, channels_last)."""
    block = _block().cuda().to(memory_format=torch.channels_last)
    x = torch.randn(4, 16, 16, 16, device="cuda").to(memory_format=torch.channels_last)
    upstream = torch.randn(4, 16, 16, 16, device="cuda")
    _check_compiled(block, "inductor", x, upstream, 1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y_eager = block(x)
        y_compiled = torch.compile(block)(x)
    assert y_compiled.dtype == y_eager.dtype
    assert (y_compiled.float() - y_eager.float()).abs().max() <= 0.05 * y_eager.float().abs().max()
