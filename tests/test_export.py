"""Integer inference: the integer model, ONNX (onnxruntime) and QONNX (qonnx executor) exports and
the packed file against the fake-quant PyTorch model (issue: integer inference; SPEC §1-§3, §5).

Every configuration is checked with generated trained-looking weights and again after a short
training run on generated data. Codes are compared layer by layer (see n2uq/export/verify.py);
mismatches must all lie within float rounding of a threshold and be < 1e-4 of the elements.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from mobilenetv2.mobilenet_v2 import MobileNetV2
from n2uq.export.graph import GraphError
from n2uq.export.integer import IntConv, convert
from n2uq.export.onnx_export import export_onnx
from n2uq.export.packing import load_packed, save_packed
from n2uq.export.synthetic import randomize_
from n2uq.export.verify import Agreement, check_against_fake_quant, check_against_runtime
from n2uq.quant import LTQ
from resnet.resnet import resnet18, resnet50

ort = pytest.importorskip("onnxruntime")

# (id, builder, input size, QONNX-executor check only with -m slow)
CONFIGS = [
    ("resnet18_w2a2_qd0", lambda: resnet18(2, False, 10), 32, False),
    ("resnet18_w2a2_qd1", lambda: resnet18(2, True, 10), 32, True),
    ("resnet18_w4a4_qd0", lambda: resnet18(4, False, 10), 32, True),
    ("resnet18_w4a4_qd1", lambda: resnet18(4, True, 10), 32, False),
    ("resnet50_w2a2_qd1", lambda: resnet50(2, True, 10), 32, True),
    ("mobilenetv2_w4a4", lambda: MobileNetV2(4, 10), 32, True),
]
STATES = ("generated", "trained")


def train_briefly(model: torch.nn.Module, size: int, steps: int = 2, seed: int = 0) -> None:
    """A few Adam steps on random images and labels (updates BN statistics and LTQ parameters)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(steps):
        images = torch.randn(8, 3, size, size, generator=gen)
        labels = torch.randint(0, 10, (8,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


_CACHE: dict = {}


def build(config: str, state: str):
    """(model, integer model, check batch) for a configuration, cached per test session."""
    key = (config, state)
    if key not in _CACHE:
        _, make, size, _ = next(c for c in CONFIGS if c[0] == config)
        torch.manual_seed(0)
        model = make()
        x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1))
        randomize_(model, torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(2)), seed=3)
        if state == "trained":
            train_briefly(model, size)
        _CACHE[key] = (model, convert(model, meta={"config": config}), x)
    return _CACHE[key]


def assert_agrees(a: Agreement, what: str) -> None:
    print(f"\n{what}\n  " + "\n  ".join(a.lines()))
    assert a.codes.far == 0, f"{what}: codes differ away from any threshold: {a.codes.per_unit}"
    assert a.codes.fraction < 1e-4, f"{what}: {a.codes}"
    assert a.logits.rel <= 1e-4, f"{what}: {a.logits}"
    assert a.logits.top1_same == a.logits.samples, f"{what}: {a.logits}"


def onnx_run(int_model, x: torch.Tensor):
    proto = export_onnx(int_model, expose_codes=True)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    outs = dict(zip(names, sess.run(None, {"input": x.numpy()})))
    codes = {u.name: torch.from_numpy(outs[u.name].astype(np.int64)) for u in int_model.units()}
    return torch.from_numpy(outs["logits"]), codes


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("config", [c[0] for c in CONFIGS])
def test_integer_model_matches_fake_quant(config, state):
    model, int_model, x = build(config, state)
    summary = int_model.summary()
    # Both the integer-threshold form and the float fallback are exercised.
    assert summary["streamlined_channels"] > 0 and summary["fallback_channels"] > 0, summary
    a = check_against_fake_quant(model, int_model, x)
    assert_agrees(a, f"{config} ({state}) integer model vs fake-quant")
    # Codes use every level (the generated state is not degenerate).
    units = int_model.units()
    codes = torch.cat([c.flatten() for c in _unit_codes(int_model, x).values()])
    assert int(codes.max()) == 2 ** units[0].bits - 1 and int(codes.min()) == 0


def _unit_codes(int_model, x):
    record: dict = {}
    int_model.run(x, record=record)
    return {k: r.codes for k, r in record.items()}


@pytest.mark.parametrize("config", [c[0] for c in CONFIGS])
def test_onnx_matches_integer_model(config):
    model, int_model, x = build(config, "trained")
    logits, codes = onnx_run(int_model, x)
    assert_agrees(check_against_runtime(int_model, x, logits, codes), f"{config} onnxruntime vs integer model")


def _qonnx_params():
    return [pytest.param(c[0], marks=pytest.mark.slow) if c[3] else c[0] for c in CONFIGS]


@pytest.mark.parametrize("config", _qonnx_params())
def test_qonnx_matches_integer_model(config):
    pytest.importorskip("qonnx")
    from n2uq.export.qonnx_export import export_qonnx, run_qonnx

    model, int_model, x = build(config, "trained")
    wrapper = export_qonnx(int_model, list(x.shape))
    assert len(wrapper.get_nodes_by_op_type("MultiThreshold")) == len(int_model.units())
    assert not wrapper.get_nodes_by_op_type("ConvInteger")
    logits, codes = run_qonnx(wrapper, x.numpy(), [u.name for u in int_model.units()])
    codes_t = {k: torch.from_numpy(v.astype(np.int64)) for k, v in codes.items()}
    assert_agrees(check_against_runtime(int_model, x, torch.from_numpy(logits), codes_t),
                  f"{config} qonnx executor vs integer model")


@pytest.mark.parametrize("config", [c[0] for c in CONFIGS])
def test_packed_file_round_trips(config, tmp_path):
    model, int_model, x = build(config, "trained")
    stats = save_packed(int_model, tmp_path / "m.n2uq")
    loaded = load_packed(tmp_path / "m.n2uq")
    convs = [(a, b) for a, b in zip(int_model.ops, loaded.ops) if isinstance(a, IntConv)]
    assert convs and all(torch.equal(a.weight, b.weight) and a.weight.dtype == b.weight.dtype for a, b in convs)
    for a, b in zip(int_model.ops, loaded.ops):
        assert type(a) is type(b) and a.attrs() == b.attrs() and a.tensors().keys() == b.tensors().keys()
        assert all(torch.equal(a.tensors()[k], b.tensors()[k]) for k in a.tensors())
    assert torch.equal(loaded(x), int_model(x))
    bits = convs[0][0].weight_bits
    n_codes = sum(a.weight.numel() for a, _ in convs)
    assert stats.code_bytes <= sum((a.weight.numel() * bits + 7) // 8 for a, _ in convs)
    assert stats.code_count == n_codes


def test_onnx_uses_convinteger_and_thresholds():
    _, int_model, _ = build("resnet18_w2a2_qd1", "generated")
    proto = export_onnx(int_model)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("ConvInteger") == sum(isinstance(o, IntConv) for o in int_model.ops)
    assert ops.count("Conv") == 1  # the full-precision first conv (downsample is quantized)
    assert ops.count("GreaterOrEqual") == len(int_model.units())


def test_negative_scale1_and_gamma_flip_direction():
    """scale1 < 0 turns float-input units decreasing; every unit keeps exact codes."""
    model = resnet18(2, True, 10)
    images = torch.randn(8, 3, 32, 32)
    randomize_(model, images, seed=5)
    with torch.no_grad():
        for i, m in enumerate(mm for mm in model.modules() if isinstance(mm, LTQ)):
            if i % 2:
                m.scale1.neg_()
                m.start.copy_(-m.start - 2.0)
    int_model = convert(model)
    assert any(bool((u.direction < 0).all()) for u in int_model.units() if u.source == "float")
    assert_agrees(check_against_fake_quant(model, int_model, images[:4]), "negative scale1")


def test_wide_accumulators_use_float64_and_stay_exact():
    """6-bit layer4 accumulators can exceed 2^24: those convs and their thresholds use float64."""
    model = resnet18(6, False, 10)
    images = torch.randn(4, 3, 32, 32)
    randomize_(model, images, seed=6)
    int_model = convert(model)
    wide = [op for op in int_model.ops if isinstance(op, IntConv) and op.dtype == "float64"]
    assert wide and all(op.bound >= 2**24 for op in wide)
    assert_agrees(check_against_fake_quant(model, int_model, images), "resnet18 w6a6 integer model")
    logits, codes = onnx_run(int_model, images)
    assert_agrees(check_against_runtime(int_model, images, logits, codes), "resnet18 w6a6 onnxruntime")
    pytest.importorskip("qonnx")
    from n2uq.export.qonnx_export import export_qonnx

    with pytest.raises(ValueError, match="2\\^24"):
        export_qonnx(int_model, list(images.shape))


def test_a_model_in_training_mode_is_refused():
    """BatchNorm folds with its running statistics: a model left in training mode is an error."""
    model = resnet18(2, True, 10)
    with pytest.raises(ValueError, match=r"call model\.eval\(\) first"):
        convert(model)
    model.eval()
    model.layer1[0].bn1.train()
    with pytest.raises(ValueError, match="layer1.0.bn1 is in training mode"):
        convert(model)


def test_unknown_model_is_refused():
    with pytest.raises(GraphError, match="neither an N2UQ ResNet"):
        convert(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3)).eval())


@pytest.mark.gpu
def test_integer_model_on_cuda_matches_cpu():
    """The integer model on a GPU (cuDNN may pick Winograd/FFT convolutions) gives the CPU's codes."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    _, int_model, x = build("resnet18_w4a4_qd1", "trained")
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # float layers in true float32, like the CPU
    try:
        record: dict = {}
        logits = copy.deepcopy(int_model).cuda().run(x.cuda(), record=record)
    finally:
        torch.backends.cudnn.allow_tf32 = previous
    codes = {k: r.codes.cpu().long() for k, r in record.items()}
    assert_agrees(check_against_runtime(int_model, x, logits.cpu(), codes), "CUDA vs CPU integer model")
