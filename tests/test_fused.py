"""Fused block operators (n2uq.kernels.fused): codes, memory, determinism, fallbacks, whole blocks.

Forward values must be bit-identical to the modules run one by one (the definitions); gradients of
the input and of every parameter must agree to float rounding; backward must be deterministic.
The per-backend comparisons (torch, c, triton) are in tests/test_backends.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mobilenetv2.mobilenet_v2 import MobileNetV2
from n2uq import quant as definitions
from n2uq.kernels import modules as fast_modules
from n2uq.kernels.fused import quant_stage, stage_output
from n2uq.quant import LTQ, HardQuantizeConv, LearnableBias
from resnet.resnet import resnet18, resnet50


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _randomise(module: nn.Module, seed: int) -> nn.Module:
    """Trained-looking parameters: biases, PReLU slopes, LTQ intervals (some below eps), scales."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, LearnableBias):
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.3)
            elif isinstance(m, nn.PReLU):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5 - 0.1)
            elif isinstance(m, LTQ):
                m.start.fill_(float(torch.randn(1, generator=g)) * 0.2)
                m.a.copy_(torch.rand(m.a.shape, generator=g) * 2 * m.interval + 1e-4)
                if m.n_val >= 3:
                    m.a[1] = 5e-4
                m.scale1.fill_(0.8 + 0.4 * float(torch.rand(1, generator=g)))
                m.scale2.fill_(0.7 + 0.6 * float(torch.rand(1, generator=g)))
            elif isinstance(m, HardQuantizeConv):  # He scale keeps activations and gradients O(1)
                m.weight.normal_(0, (2 / m.weight[0].numel()) ** 0.5, generator=g)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.2, generator=g)
    return module


def _unfuse(model: nn.Module) -> nn.Module:
    """A copy that runs the definitions module by module: its quantizers become the definitions'
    classes (``n2uq.LTQ`` → ``n2uq.quant.LTQ``: same state) and its LTQs carry a no-op hook, so the
    fused paths call every module in turn."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if type(m) is fast_modules.LTQ:
            m.__class__ = definitions.LTQ
        elif type(m) is fast_modules.HardQuantizeConv:
            m.__class__ = definitions.HardQuantizeConv
        if isinstance(m, (LTQ, LearnableBias)):
            m.register_forward_hook(lambda *args: None)
    return model


def _assert_grads_close(named_a, named_b, rel=1e-5):
    for (name, ga), (_, gb) in zip(named_a, named_b):
        assert ga is not None and gb is not None, name
        tol = rel * max(gb.abs().max().item(), 1e-12)
        assert (ga - gb).abs().max().item() <= tol, f"grad {name}: max diff {(ga - gb).abs().max().item()}"


class Stage(nn.Module):
    def __init__(self, cin, cout, n_bit, stride=1, groups=1, kernel=3, prelu_params=None):
        super().__init__()
        self.bias1 = LearnableBias(cin)
        self.prelu = nn.PReLU(prelu_params or cin)
        self.bias2 = LearnableBias(cin)
        self.quan = LTQ(n_bit)
        self.conv = HardQuantizeConv(cin, cout, n_bit, kernel, stride, kernel // 2, groups)

    def forward(self, x):
        return quant_stage(x, self.bias1, self.prelu, self.bias2, self.quan, self.conv)

    def unfused(self, x):
        return self.conv(self.quan(self.bias2(self.prelu(self.bias1(x)))))


def _run(fn, x, module, upstream):
    x = x.clone().requires_grad_(True)
    y = fn(x)
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(y, [x] + [p for _, p in params], upstream)
    return y, list(zip(["x"] + [n for n, _ in params], grads))


def test_stage_float64_depthwise_strided_shared_prelu(fast_backend):
    if fast_backend.name == "triton":
        pytest.skip("the Triton kernels compute in float32")
    stage = _randomise(Stage(4, 4, 2, stride=2, groups=4, prelu_params=1), 3).double()
    x = torch.randn(2, 4, 11, 11, dtype=torch.float64)
    upstream = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    fast_backend.assert_computes(x)
    y, grads = _run(stage, x, stage, upstream)
    y_ref, grads_ref = _run(stage.unfused, x, stage, upstream)
    assert torch.equal(y, y_ref)
    _assert_grads_close(grads, grads_ref, rel=1e-10)


def test_stage_output_codes_are_the_ltq_codes():
    stage = _randomise(Stage(4, 4, 3), 5)
    x = torch.randn(2, 4, 8, 8)
    y, codes, table = stage_output(x, stage.bias1, stage.prelu, stage.bias2, stage.quan, want_codes=True)
    chained = stage.bias2(stage.prelu(stage.bias1(x)))
    assert codes.dtype == torch.uint8
    assert torch.equal(codes.long(), stage.quan.codes(chained))
    assert torch.equal(table[codes.long()], y) and torch.equal(y, stage.quan(chained))


def test_stage_without_grad_and_bf16_fallback():
    stage = _randomise(Stage(4, 3, 2), 6)
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        assert torch.equal(stage(x), stage.unfused(x))
    xb = x.bfloat16()  # no kernel for bf16 on CPU: plain PyTorch path, same values as the modules
    assert torch.equal(stage(xb), stage.unfused(xb))


def _model_grads(model, x, upstream):
    x = x.clone().requires_grad_(True)
    out = model(x)
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    grads = torch.autograd.grad(out, [x, *params], upstream)
    return out, list(zip(["x", *names], grads))


def _compare_models(model, x, upstream, train):
    """Forward bit-identical in float32; gradients compared in float64.

    In float32 some gradients are sums with heavy cancellation (``scale2`` ahead of a train-mode
    BN is scale-invariant, so its true gradient is ~0; fresh random networks have BN channels of
    near-zero variance), where any two summation orders differ by more than 1e-5 of the result.
    float64 removes that rounding noise and leaves the comparison meaningful.
    """
    model.train(train)
    reference = _unfuse(model).train(train)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    model, reference = copy.deepcopy(model).double(), reference.double()
    out, grads = _model_grads(model, x.double(), upstream.double())
    out_ref, grads_ref = _model_grads(reference, x.double(), upstream.double())
    assert torch.equal(out, out_ref)
    _assert_grads_close(grads, grads_ref, rel=1e-6)


@pytest.mark.parametrize("build", [lambda: resnet18(2, False, 10), lambda: resnet18(4, True, 10)],
                         ids=["resnet18_w2a2_qd0", "resnet18_w4a4_qd1"])
@pytest.mark.parametrize("train", [True, False])
def test_whole_resnet_fused_equals_unfused(build, train):
    torch.manual_seed(0)
    _compare_models(_randomise(build(), 7), torch.randn(2, 3, 32, 32), torch.randn(2, 10), train)


@pytest.mark.parametrize("qd", [False, True])
def test_downsampling_block_fused_equals_unfused(qd):
    block = _randomise(resnet18(3, qd, 10), 11).layer2[0]
    _compare_models(block, torch.randn(4, 64, 10, 10), torch.randn(4, 128, 5, 5), train=True)


def test_mobilenet_block_fused_equals_unfused():
    block = _randomise(MobileNetV2(4, 10), 4).feature[2]
    _compare_models(block, torch.randn(2, 16, 12, 12), torch.randn(2, 24, 6, 6), train=True)


@pytest.mark.slow
def test_resnet50_and_mobilenet_fused_equal_unfused():
    for model in (resnet50(2, True, 10), MobileNetV2(4, 10)):
        _compare_models(_randomise(model, 2), torch.randn(2, 3, 64, 64), torch.randn(2, 10), train=True)


def _saved_activation_bytes(fn, x):
    """Bytes of the activation-sized tensors that autograd keeps for backward."""
    total = 0

    def pack(t):
        nonlocal total
        if t.numel() == x.numel():
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return total


def test_stage_saves_input_once_plus_codes():
    stage = _randomise(Stage(16, 16, 2), 8)
    x = torch.randn(2, 16, 16, 16, requires_grad=True)
    x_bytes = x.numel() * x.element_size()
    assert _saved_activation_bytes(stage, x) == x_bytes + x.numel()  # x (float32) + codes (uint8)
    assert _saved_activation_bytes(stage.unfused, x) == 3 * x_bytes  # PReLU, LTQ and conv inputs


def test_backward_is_deterministic_across_runs_and_threads():
    stage = _randomise(Stage(8, 8, 3), 9)
    x = torch.randn(4, 8, 40, 40)  # several work items per plane
    up = torch.randn(4, 8, 40, 40)

    def ltq_part(x_):
        return stage_output(x_, stage.bias1, stage.prelu, stage.bias2, stage.quan)[0]

    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            chain_and_ltq = nn.ModuleList([stage.bias1, stage.prelu, stage.bias2, stage.quan])
            results.append(_run(ltq_part, x, chain_and_ltq, up)[1])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for (name, a), (_, b) in zip(results[0], other):
            assert torch.equal(a, b), name
    up_conv = torch.randn(4, 8, 40, 40)
    first, second = _run(stage, x, stage, up_conv)[1], _run(stage, x, stage, up_conv)[1]
    for (name, a), (_, b) in zip(first, second):
        if name != "conv.weight":  # oneDNN's weight-gradient reduction is not ours to pin down
            assert torch.equal(a, b), name


def test_hooks_and_subclasses_disable_fusion():
    stage = _randomise(Stage(4, 4, 2), 10)
    seen = []
    stage.quan.register_forward_hook(lambda m, i, o: seen.append(o))
    stage(torch.randn(1, 4, 5, 5))
    assert len(seen) == 1  # the LTQ module itself ran, so its hook fired


@pytest.mark.parametrize("groups", [1, 16])
def test_cpu_bfloat16_stride2_one_pixel_input_has_correct_gradients(groups):
    """PyTorch's CPU bfloat16 convolution_backward gives garbage weight gradients for a 3×3 stride-2
    conv on a 1-pixel input (most calls); the fused stage and the plain module both avoid it and agree
    with the same computation in float32 on the bfloat16-rounded operands."""
    stage = _randomise(Stage(16, 32, 2, stride=2, groups=groups), 5)
    upstream = torch.randn(4, 32, 1, 1)
    for _ in range(10):
        x = torch.randn(4, 16, 1, 1) * 1.5
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fused = _run(stage, x, stage, upstream)
            plain = _run(stage.unfused, x, stage, upstream)
        # reference: the conv input and weight rounded to bfloat16 as autocast does, summed in float32
        xr = x.clone().requires_grad_(True)
        y_in = stage.quan(stage.bias2(stage.prelu(stage.bias1(xr)))).to(torch.bfloat16).float()
        w = stage.conv.quantized_weight()
        out = torch.nn.functional.conv2d(y_in, w.to(torch.bfloat16).float(), None, 2, 1, 1, groups)
        g_ref = torch.autograd.grad(out, stage.conv.weight, upstream.to(torch.bfloat16).float())[0]
        for y, grads in (fused, plain):
            assert y.dtype == torch.bfloat16
            g_w = dict(grads)["conv.weight"]
            assert torch.isfinite(g_w).all()
            assert torch.allclose(g_w, g_ref, rtol=1e-2, atol=1e-2 * g_ref.abs().max().item())
