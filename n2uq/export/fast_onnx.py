"""Fast ONNX writer: the integer model in the QDQ form that onnxruntime runs on its 8-bit kernels.

Each quantized convolution is written as ``DequantizeLinear(codes uint8) → Conv ←
DequantizeLinear(weight codes int8, per-channel scale) [← DequantizeLinear(int32 bias)] →
QuantizeLinear`` (the explicit-quantization convention), which onnxruntime fuses into one
``QLinearConv`` (u8 × s8 → int32 accumulation → requantized 8-bit output). The numbers come from
:mod:`n2uq.export.fast_plan`:

* a quantizer after a quantized conv (accumulator input): the conv's output is the accumulator
  shifted, ``q = sat(d·acc + B)`` (one or more 8-bit windows per channel), and each threshold is an
  exact uint8 comparison, ``GreaterOrEqual → Cast → Add``; a unit without such a plan (V-shaped
  channels, too many windows, a grouped conv that would need window copies, an accumulator also
  read as a float) gets a float32 ``Conv`` of the codes (exact integer sums) and the comparisons;
* a quantizer on a float tensor (block input): ``u`` as in the exact export, then the comparisons;
* a conv whose value is used as a float (residual add, ReLU6): ``residual="int8"`` an 8-bit output
  over the calibrated per-channel range, ``Cast → Mul(step) → Add(offset)`` back to float (the one
  lossy step); ``residual="float"`` a float32 ``Conv`` of the codes with constant weights (exact);
* everything else (first conv, FP downsample, residual adds, the block-output RPReLU, pooling,
  ``fc``) as in :mod:`n2uq.export.onnx_export`, in float32.

``weight_type="int4"`` stores the weight codes of convs with at most 3 weight bits as INT4
initializers (opset 21) instead of int8.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from n2uq.export import integer as I
from n2uq.export.fast_plan import AccumulatorPlan, accumulator_plan, calibrate_ranges, output_plan
from n2uq.export.onnx_export import DEFAULT_INPUT, DEFAULT_OUTPUT, OnnxBuilder

__all__ = ["export_fast", "FastExport", "FAST_OPSET", "RESIDUAL_FORMS", "REQUANTIZED_KEY", "requantized_convs"]

FAST_OPSET, INT4_OPSET = 17, 21
#: How a conv whose value is used as a float (residual stream) runs: an 8-bit ``QLinearConv`` over the
#: calibrated range, or a float32 ``Conv`` of the codes (exact integer sums, float speed).
RESIDUAL_FORMS = ("int8", "float")
#: Metadata entry of a fast file: how many convs it requantizes to 8 bits (0: the file is exact).
REQUANTIZED_KEY = "requantized_convs"


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


class FastExport(OnnxBuilder):
    """Builds the QDQ graph of one integer model; ``unit_stats`` records per unit what it reads
    (``source``), its channels and its 8-bit conv output windows (0: its input is a float tensor,
    or an accumulator from a float32 conv)."""

    def __init__(self, model: I.IntegerModel, ranges: Dict[str, Tuple[torch.Tensor, torch.Tensor]],
                 weight_type: str = "int8", residual: str = "int8"):
        super().__init__(qonnx=False)
        if weight_type not in ("int8", "int4"):
            raise ValueError(f"weight_type must be int8 or int4, got {weight_type!r}")
        if residual not in RESIDUAL_FORMS:
            raise ValueError(f"residual must be one of {', '.join(RESIDUAL_FORMS)}, got {residual!r}")
        self.model, self.ranges, self.weight_type, self.residual = model, ranges, weight_type, residual
        self.consumers: Dict[str, List[I.Op]] = {}
        for op in model.ops:
            for name in op.inputs:
                self.consumers.setdefault(name, []).append(op)
        self.float_acc: set = set()  # accumulators computed by a float32 Conv
        self.requantized: List[str] = []  # convs whose float value goes through 8 bits (the lossy step)
        self.unit_stats: Dict[str, Dict[str, object]] = {}
        self.env: Dict[str, str] = {}

    # -- helpers ------------------------------------------------------------------------------

    def scalar(self, base: str, value, dtype) -> str:
        return self.shared_const(f"{base}_{np.dtype(dtype).name}_{value}", np.array(value, dtype))

    def dq(self, x: str, scale: str, zero: str, axis: Optional[int] = None, out: Optional[str] = None) -> str:
        attrs = {} if axis is None else {"axis": axis}
        return self.node("DequantizeLinear", [x, scale, zero], out, **attrs)

    def count(self, name: str, inputs: List[str], levels: List[np.ndarray], base: np.ndarray, like: str) -> str:
        """``base + Σ_k Cast(inputs[k] >= levels[k])`` (per-channel levels) as uint8 codes ``name``
        (``like``: a uint8 tensor of the codes' shape, for a unit with no comparison at all)."""
        total = None
        for k, (x, level) in enumerate(zip(inputs, levels)):
            hit = self.node("GreaterOrEqual", [x, self.channel_const(f"{name}.level{k + 1}", torch.from_numpy(level))])
            hit = self.node("Cast", [hit], to=TensorProto.UINT8)
            total = hit if total is None else self.node("Add", [total, hit])
        if total is None:  # no threshold is ever met
            total = self.node("Mul", [like, self.scalar("zero", 0, np.uint8)])
        if base.any():
            total = self.node("Add", [total, self.channel_const(f"{name}.base", torch.from_numpy(base))])
        return self.node("Identity", [total], name)

    def int4_const(self, base: str, values: np.ndarray) -> str:
        tensor = numpy_int4(self.fresh(base), values)
        self.inits.append(tensor)
        return tensor.name

    def weight(self, op: I.IntConv, scale: np.ndarray, codes: np.ndarray) -> str:
        c = codes.shape[0]
        if self.weight_type == "int4" and op.weight_bits <= 3:
            wname, zero = (self.int4_const(f"{op.name}.weight_codes", codes),
                           self.int4_const(f"{op.name}.weight_zero", np.zeros(c, np.int32)))
        else:
            if np.abs(codes).max() > 127:
                raise ValueError(f"{op.name}: {op.weight_bits}-bit weight codes do not fit int8 (at most 7 bits)")
            wname = self.const(f"{op.name}.weight_codes", codes.astype(np.int8))
            zero = self.const(f"{op.name}.weight_zero", np.zeros(c, np.int8))
        s = self.const(f"{op.name}.weight_scale", scale.astype(np.float32))
        return self.dq(wname, s, zero, axis=0)

    def conv(self, op: I.IntConv, codes: str, w_scale: np.ndarray, bias: np.ndarray, weight: np.ndarray) -> str:
        """``DQ(codes) → Conv(DQ(weight codes), DQ(int32 bias))`` (float output, before the output Q)."""
        x = self.dq(codes, self.scalar("one", 1.0, np.float32), self.scalar("zero", 0, np.uint8))
        w = self.weight(op, w_scale, weight)
        b_scale = self.const(f"{op.name}.bias_scale", w_scale.astype(np.float32))
        b_zero = self.const(f"{op.name}.bias_zero", np.zeros(len(bias), np.int32))
        b = self.dq(self.const(f"{op.name}.bias", bias.astype(np.int32)), b_scale, b_zero, axis=0)
        return self.node("Conv", [x, w, b], strides=op.stride, pads=op.padding * 2, group=op.groups)

    # -- emitters -----------------------------------------------------------------------------

    def int_conv(self, op: I.IntConv, codes: str) -> str:
        users = self.consumers.get(op.output, [])
        user = users[0] if len(users) == 1 else None
        plan = None
        if isinstance(user, I.Threshold) and user.source == "acc" and not bool(user.fallback.any()):
            plan = accumulator_plan(user, op.bound)
            if plan is not None and op.groups > 1 and (len(plan.channel_of) > op.weight.shape[0] or len(plan.slots)
                                                       and any(bool((w >= len(plan.channel_of)).any())
                                                               for w, _ in plan.slots)):
                plan = None  # a grouped conv cannot copy output channels into windows
        if plan is not None:
            self._plans[user.name] = plan
            sign = _np(user.direction).astype(np.int32)[_np(plan.channel_of)]
            weight = _np(op.weight).astype(np.int32)[_np(plan.channel_of)] * sign.reshape(-1, 1, 1, 1)
            scale, bias = _np(plan.scale), _np(plan.bias)
            if any(bool((w == len(plan.channel_of)).any()) for w, _ in plan.slots):  # the constant-zero window
                weight = np.concatenate([weight, np.zeros_like(weight[:1])])
                scale, bias = np.append(scale, 1.0), np.append(bias, 0)
            y = self.conv(op, codes, scale, bias, weight)
            return self.node("QuantizeLinear", [y, self.scalar("one", 1.0, np.float32),
                                                self.scalar("zero", 0, np.uint8)], f"{op.name}.q")
        if user is None or isinstance(user, I.Threshold) or self.residual == "float":
            # float32 conv of the codes: the exact accumulator (integer sums below 2^24), float speed;
            # also for an accumulator read by a quantizer and by a float op (MobileNetV2 block outputs).
            # The weight codes are a float32 initializer (exact small integers), not a DequantizeLinear:
            # onnxruntime prepacks a constant weight for its blocked float kernels, but runs a weight
            # DequantizeLinear that no QLinearConv absorbs on every call (7x slower on a 512-channel conv).
            self.float_acc.add(op.output)
            x = self.dq(codes, self.scalar("one", 1.0, np.float32), self.scalar("zero", 0, np.uint8))
            w = self.const(f"{op.name}.weight_codes_f32", _np(op.weight).astype(np.float32))
            return self.node("Conv", [x, w], f"{op.name}.acc", strides=op.stride, pads=op.padding * 2,
                             group=op.groups)
        if isinstance(user, I.Dequant):
            if user.name not in self.ranges:
                raise ValueError(f"{user.name}: no calibrated range (calibrate on images first)")
            plan = output_plan(user, *self.ranges[user.name])
            self.requantized.append(op.name)
            weight = _np(op.weight).astype(np.int32) * _np(plan.weight_sign).astype(np.int32).reshape(-1, 1, 1, 1)
            y = self.conv(op, codes, _np(plan.weight_scale), _np(plan.bias), weight)
            # uint8 around 128 (onnxruntime fuses a conv whose input and output have the same type)
            q = self.node("QuantizeLinear", [y, self.scalar("inv127", np.float32(1 / 127), np.float32),
                                             self.scalar("mid", 128, np.uint8)], f"{op.name}.q")
            # (q − 128)·half/127 + centre as Cast → Mul → Add: onnxruntime's per-channel
            # DequantizeLinear is a scalar loop, several times slower than these vectorized ops
            step = plan.half / 127
            v = self.node("Mul", [self.node("Cast", [q], to=TensorProto.FLOAT),
                                  self.channel_const(f"{user.name}.step", step.float())])
            offset = (plan.centre - 128 * step).float()
            return self.node("Add", [v, self.channel_const(f"{user.name}.offset", offset)], user.output)
        raise ValueError(f"{op.name}: a quantized conv must feed one quantizer or one float consumer")

    def threshold(self, op: I.Threshold, x: str) -> str:
        c = op.thresholds.shape[0]
        plan = self._plans.get(op.name)
        if plan is None:  # float input, or an accumulator computed in float32: compare u with T
            u = self.threshold_input(op, x)
            self.unit_stats[op.name] = {"source": op.source, "channels": c, "windows": 0}
            levels = [_np(op.thresholds[:, j]) for j in range(op.thresholds.shape[1])]
            return self.count(op.output, [u] * len(levels), levels, np.zeros(c, np.uint8), "")
        windows = len(plan.channel_of)
        self.unit_stats[op.name] = {"source": "acc", "channels": c, "windows": windows}
        first = x  # the channels' first windows: the conv output itself, or its first C channels
        if windows != c or any(bool((w == windows).any()) for w, _ in plan.slots):
            first = self.node("Slice", [x, self.shared_const("i64_0", np.array([0], np.int64)),
                                        self.const(f"{op.name}.channels", np.array([c], np.int64)),
                                        self.shared_const("i64_1", np.array([1], np.int64))])
        inputs = [first if torch.equal(index, torch.arange(c)) else
                  self.node("Gather", [x, self.const(f"{op.name}.window{r + 1}", _np(index))], axis=1)
                  for r, (index, _) in enumerate(plan.slots)]
        return self.count(op.output, inputs, [_np(level) for _, level in plan.slots], _np(plan.base), first)

    def rprelu(self, name: str, x: str, b1, slope, b2, out: Optional[str] = None) -> str:
        """``Add → PReLU → Add``; the PReLU as ``Max(v, w·v)`` when every slope is in [0, 1] (the same
        float values, and much faster than onnxruntime's broadcasting ``PRelu``)."""
        if slope is None or not bool(((slope >= 0) & (slope <= 1)).all()):
            return super().rprelu(name, x, b1, slope, b2, out)
        if b1 is not None:
            x = self.node("Add", [x, self.channel_const(f"{name}.bias1", b1)])
        x = self.node("Max", [x, self.node("Mul", [x, self.channel_const(f"{name}.slope", slope)])])
        if b2 is not None:
            return self.node("Add", [x, self.channel_const(f"{name}.bias2", b2)], out)
        return self.node("Identity", [x], out) if out is not None else x

    def float_dequant(self, op: I.Dequant, acc: str) -> str:
        """``acc·α + β`` of a float32 conv's exact accumulator, written ``Mul(α, acc)``: onnxruntime
        folds a ``Mul(conv, constant)`` into the conv's weights (``α·w`` summed in float32 is not the
        exact integer sum times α); with the constant first its fusion does not apply (the product is
        the same, multiplication being commutative in IEEE arithmetic)."""
        v = self.node("Mul", [self.channel_const(f"{op.name}.alpha", op.alpha), acc])
        return self.node("Add", [v, self.channel_const(f"{op.name}.beta", op.beta)], op.output)

    def emit_op(self, op: I.Op, x: List[str]) -> str:
        if isinstance(op, I.IntConv):
            return self.int_conv(op, x[0])
        if isinstance(op, I.Threshold):
            return self.threshold(op, x[0])
        if isinstance(op, I.Dequant) and op.inputs[0] in self.float_acc:
            return self.float_dequant(op, x[0])
        if isinstance(op, I.Dequant):
            return x[0]  # the conv's per-channel DequantizeLinear already wrote the float value
        return self.emit(op, x)

    def build(self, expose_codes: bool) -> onnx.ModelProto:
        self._plans: Dict[str, AccumulatorPlan] = {}
        self.requantized = []
        env = {self.model.input_name: DEFAULT_INPUT}
        self._names.add(DEFAULT_INPUT)
        for op in self.model.ops:
            env[op.output] = self.emit_op(op, [env[i] for i in op.inputs])
        logits = self.node("Identity", [env[self.model.output_name]], DEFAULT_OUTPUT)
        outputs = [helper.make_tensor_value_info(logits, TensorProto.FLOAT, ["N", None])]
        if expose_codes:
            outputs += [helper.make_tensor_value_info(u.output, TensorProto.UINT8, [None] * 4)
                        for u in self.model.units()]
        graph = helper.make_graph(self.nodes, "n2uq_fast",
                                  [helper.make_tensor_value_info(DEFAULT_INPUT, TensorProto.FLOAT,
                                                                 ["N", 3, "H", "W"])], outputs, self.inits)
        opset = INT4_OPSET if self.weight_type == "int4" else FAST_OPSET
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="n2uq")
        proto.ir_version = 10 if self.weight_type == "int4" else min(proto.ir_version, 8)
        # the file says whether it is exact: convs requantized to 8 bits make it approximate
        form = {"form": "qdq", "residual": self.residual, REQUANTIZED_KEY: len(self.requantized)}
        for key, value in {**self.model.meta, **form}.items():
            proto.metadata_props.add(key=str(key), value=str(value))
        return proto


def requantized_convs(proto: onnx.ModelProto) -> int:
    """How many convs of a fast file run their float output through 8 bits (``--fast_residual int8``;
    0: the file computes what the integer model computes)."""
    return int(next((p.value for p in proto.metadata_props if p.key == REQUANTIZED_KEY), 0))


def numpy_int4(name: str, values: np.ndarray) -> onnx.TensorProto:
    """An INT4 initializer (two values per byte, low nibble first, as ONNX packs them)."""
    flat = values.astype(np.int32).reshape(-1)
    if flat.size and (flat.min() < -8 or flat.max() > 7):
        raise ValueError(f"{name}: values outside INT4's [-8, 7]")
    nibbles = (flat & 0xF).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    packed = nibbles[0::2] | (nibbles[1::2] << 4)
    tensor = onnx.TensorProto(name=name, data_type=TensorProto.INT4, dims=list(values.shape))
    tensor.raw_data = packed.tobytes()
    return tensor


def export_fast(model: I.IntegerModel, calibration: torch.Tensor, path=None, expose_codes: bool = False,
                weight_type: str = "int8", residual: str = "int8", margin: float = 1.0):
    """Fast (QDQ) ONNX model of ``model``; residual-stream ranges calibrated on ``calibration`` images.

    Returns ``(proto, unit_stats)``; saves to ``path`` when given (input ``input`` [N, 3, H, W]
    float32, output ``logits``; ``expose_codes`` adds every unit's uint8 codes as outputs)."""
    builder = FastExport(model, calibrate_ranges(model, calibration, margin), weight_type, residual)
    proto = builder.build(expose_codes)
    onnx.checker.check_model(proto)
    if path is not None:
        onnx.save(proto, os.fspath(path))
    return proto, builder.unit_stats
