"""ONNX writer for :class:`~n2uq.export.integer.IntegerModel` (standard ops, onnxruntime CPU).

Mapping (one :class:`~n2uq.export.integer.Op` → ONNX nodes):

* ``IntConv`` → ``ConvInteger`` (uint8 activation codes × int8 weight codes → int32 accumulator);
* ``Threshold`` → ``u`` (``Mul`` by the per-channel direction; on fallback channels the float chain
  ``Mul α, Add β, Add, PRelu, Add, Mul scale1`` and a ``Where``), then
  ``GreaterOrEqual(u[:, :, None], T[None, :, :]) → Cast → ReduceSum`` over the thresholds → ``uint8``;
* ``Dequant`` → ``Cast(int32 → float) → Mul α → Add β``;
* float ops → ``Conv``, ``BatchNormalization``, ``Relu``, ``Clip``, ``MaxPool``, ``Add``, ``PRelu``,
  ``GlobalAveragePool``, ``Flatten``, ``Gemm``.

The same builder writes the QONNX form (:mod:`n2uq.export.qonnx_export`), where thresholds become
``MultiThreshold`` nodes and integers travel in float32 tensors.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from n2uq.export import integer as I

__all__ = ["export_onnx", "OnnxBuilder", "OPSET", "DEFAULT_INPUT", "DEFAULT_OUTPUT"]

OPSET = 17
DEFAULT_INPUT, DEFAULT_OUTPUT = "input", "logits"
_ONNX_FLOAT = {torch.float32: TensorProto.FLOAT, torch.float64: TensorProto.DOUBLE}


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


class OnnxBuilder:
    """Collects nodes and initializers; ``qonnx=True`` selects the QONNX forms."""

    def __init__(self, qonnx: bool = False):
        self.qonnx = qonnx
        self.nodes: List[onnx.NodeProto] = []
        self.inits: List[onnx.TensorProto] = []
        self.datatypes: Dict[str, str] = {}  # QONNX tensor annotations
        self._names: set = set()

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self._names:
            name, i = f"{base}_{i}", i + 1
        self._names.add(name)
        return name

    def const(self, base: str, value: np.ndarray) -> str:
        name = self.fresh(base)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def shared_const(self, name: str, value: np.ndarray) -> str:
        """A small constant used by many nodes, stored once."""
        if name not in self._names:
            self.const(name, value)
        return name

    def node(self, op_type: str, inputs: Sequence[str], out: Optional[str] = None, domain: str = "",
             **attrs) -> str:
        out = out if out is not None else self.fresh(f"{inputs[0]}/{op_type}")
        self._names.add(out)
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=self.fresh(f"{out}:{op_type}"),
                                           domain=domain, **attrs))
        return out

    def channel_const(self, base: str, v: torch.Tensor, dtype=None) -> str:
        """A per-channel vector as a ``[1, C, 1, 1]`` constant."""
        arr = _np(v.reshape(1, -1, 1, 1))
        return self.const(base, arr.astype(dtype) if dtype is not None else arr)

    # -- one emitter per op -----------------------------------------------------------------

    def emit(self, op: I.Op, x: List[str]) -> str:
        out = op.output
        if isinstance(op, I.FloatConv):
            ins = [x[0], self.const(f"{op.name}.weight", _np(op.weight))]
            if op.bias is not None:
                ins.append(self.const(f"{op.name}.bias", _np(op.bias)))
            return self.node("Conv", ins, out, strides=op.stride, pads=op.padding * 2, dilations=op.dilation,
                             group=op.groups)
        if isinstance(op, I.BatchNorm):
            ins = [x[0]] + [self.const(f"{op.name}.{k}", _np(getattr(op, k)))
                            for k in ("weight", "bias", "running_mean", "running_var")]
            return self.node("BatchNormalization", ins, out, epsilon=op.eps)
        if isinstance(op, I.Relu):
            return self.node("Relu", x, out)
        if isinstance(op, I.Relu6):
            lo = self.shared_const("zero", np.array(0, np.float32))
            return self.node("Clip", [x[0], lo, self.shared_const("six", np.array(6, np.float32))], out)
        if isinstance(op, I.MaxPool):
            return self.node("MaxPool", x, out, kernel_shape=op.kernel, strides=op.stride, pads=op.padding * 2,
                             dilations=op.dilation, ceil_mode=int(op.ceil_mode))
        if isinstance(op, I.GlobalAvgPool):
            return self.node("GlobalAveragePool", x, out)
        if isinstance(op, I.Flatten):
            return self.node("Flatten", x, out, axis=1)
        if isinstance(op, I.Linear):
            ins = [x[0], self.const(f"{op.name}.weight", _np(op.weight))]
            if op.bias is not None:
                ins.append(self.const(f"{op.name}.bias", _np(op.bias)))
            return self.node("Gemm", ins, out, transB=1)
        if isinstance(op, I.Add):
            return self.node("Add", x, out)
        if isinstance(op, I.RPReLU):
            return self.rprelu(op.name, x[0], op.bias1, op.slope, op.bias2, out)
        if isinstance(op, I.IntConv):
            return self.int_conv(op, x[0])
        if isinstance(op, I.Dequant):
            return self.dequant(op, x[0])
        if isinstance(op, I.Threshold):
            return self.threshold(op, x[0])
        raise TypeError(f"no ONNX form for {type(op).__name__}")

    def rprelu(self, name: str, x: str, b1, slope, b2, out: Optional[str] = None) -> str:
        """``Add → PRelu → Add`` (PRelu slope broadcast as ``[C, 1, 1]``)."""
        if b1 is not None:
            x = self.node("Add", [x, self.channel_const(f"{name}.bias1", b1)])
        if slope is not None:
            x = self.node("PRelu", [x, self.const(f"{name}.slope", _np(slope.reshape(-1, 1, 1)))])
        if b2 is not None:
            return self.node("Add", [x, self.channel_const(f"{name}.bias2", b2)], out)
        return x

    def int_conv(self, op: I.IntConv, codes: str) -> str:
        attrs = dict(strides=op.stride, pads=op.padding * 2, group=op.groups)
        if self.qonnx:
            w = self.const(f"{op.name}.weight_codes", _np(op.weight).astype(np.float32))
            self.datatypes[w] = f"INT{op.weight_bits + 1}"
            self.datatypes[op.output] = "INT32"
            return self.node("Conv", [codes, w], op.output, **attrs)
        if op.weight.abs().max() > 127:
            raise ValueError(f"{op.name}: {op.weight_bits}-bit weight codes do not fit ConvInteger's int8; "
                             f"ONNX export supports at most 7 bits")
        w = self.const(f"{op.name}.weight_codes", _np(op.weight).astype(np.int8))
        return self.node("ConvInteger", [codes, w], op.output, **attrs)

    def acc_as(self, acc: str, dtype: torch.dtype) -> str:
        """The accumulator as a float tensor of ``dtype`` (already float32 in QONNX)."""
        if self.qonnx:
            return acc
        return self.node("Cast", [acc], self.fresh(f"{acc}/as_float"), to=_ONNX_FLOAT[dtype])

    def dequant(self, op: I.Dequant, acc: str) -> str:
        v = self.node("Mul", [self.acc_as(acc, torch.float32), self.channel_const(f"{op.name}.alpha", op.alpha)])
        return self.node("Add", [v, self.channel_const(f"{op.name}.beta", op.beta)], op.output)

    def threshold_input(self, op: I.Threshold, x: str) -> str:
        """``u``: direction-signed input, the float chain on fallback channels."""
        dtype = op.thresholds.dtype
        if op.source == "acc":
            x = self.acc_as(x, dtype)
        u = x
        if bool((op.direction != 1).any()):
            u = self.node("Mul", [x, self.channel_const(f"{op.name}.direction", op.direction, _np_dtype(dtype))])
        if bool(op.fallback.any()):
            v = x
            if op.alpha is not None:
                v = self.node("Mul", [v, self.channel_const(f"{op.name}.alpha", op.alpha)])
                v = self.node("Add", [v, self.channel_const(f"{op.name}.beta", op.beta)])
            v = self.rprelu(op.name, v, op.bias1, op.slope, op.bias2)
            v = self.node("Mul", [v, self.const(f"{op.name}.scale1", _np(op.scale1))])
            mask = self.channel_const(f"{op.name}.fallback", op.fallback)
            u = self.node("Where", [mask, v, u], self.fresh(f"{op.name}/u"))
        return u

    def threshold(self, op: I.Threshold, x: str) -> str:
        u = self.threshold_input(op, x)
        if self.qonnx:
            t = self.const(f"{op.name}.thresholds", _np(op.thresholds).astype(np.float32))
            self.datatypes[op.output] = f"UINT{op.bits}"
            return self.node("MultiThreshold", [u, t], op.output, domain="qonnx.custom_op.general",
                             out_dtype=f"UINT{op.bits}", data_layout="NCHW")
        c, n = op.thresholds.shape
        t = self.const(f"{op.name}.thresholds", _np(op.thresholds.reshape(1, c, n, 1, 1)))
        axis = self.shared_const("axis2", np.array([2], np.int64))
        ge = self.node("GreaterOrEqual", [self.node("Unsqueeze", [u, axis]), t])
        count = self.node("ReduceSum", [self.node("Cast", [ge], to=TensorProto.INT32), axis], keepdims=0)
        return self.node("Cast", [count], op.output, to=TensorProto.UINT8)


def _np_dtype(dtype: torch.dtype):
    return np.float64 if dtype == torch.float64 else np.float32


def build_graph(model: I.IntegerModel, builder: OnnxBuilder, input_shape: Sequence, expose_codes: bool,
                name: str) -> onnx.ModelProto:
    """Emit every op of ``model``; returns the ONNX model (no checks, no save)."""
    env = {model.input_name: DEFAULT_INPUT}
    builder._names.add(DEFAULT_INPUT)
    for op in model.ops:
        env[op.output] = builder.emit(op, [env[i] for i in op.inputs])
    logits = builder.node("Identity", [env[model.output_name]], DEFAULT_OUTPUT)
    outputs = [helper.make_tensor_value_info(logits, TensorProto.FLOAT, [input_shape[0], None])]
    if expose_codes:
        code_type = TensorProto.FLOAT if builder.qonnx else TensorProto.UINT8
        outputs += [helper.make_tensor_value_info(u.output, code_type, [None] * 4) for u in model.units()]
    graph = helper.make_graph(builder.nodes, name,
                              [helper.make_tensor_value_info(DEFAULT_INPUT, TensorProto.FLOAT, list(input_shape))],
                              outputs, builder.inits)
    opsets = [helper.make_opsetid("", OPSET)]
    if builder.qonnx:
        opsets.append(helper.make_opsetid("qonnx.custom_op.general", 1))
    proto = helper.make_model(graph, opset_imports=opsets, producer_name="n2uq")
    proto.ir_version = min(proto.ir_version, 8)  # readable by older onnxruntime releases
    for key, value in model.meta.items():
        proto.metadata_props.add(key=str(key), value=str(value))
    return proto


def export_onnx(model: I.IntegerModel, path: Optional[str | os.PathLike[str]] = None,
                expose_codes: bool = False) -> onnx.ModelProto:
    """ONNX model of ``model`` (input ``input`` [N, 3, H, W] float32, output ``logits``), checked
    with ``onnx.checker`` and saved to ``path`` when given. ``expose_codes`` adds every threshold
    unit's codes (uint8, named like the quantizer module) as extra outputs."""
    proto = build_graph(model, OnnxBuilder(qonnx=False), ["N", 3, "H", "W"], expose_codes, "n2uq_integer")
    onnx.checker.check_model(proto)
    if path is not None:
        onnx.save(proto, os.fspath(path))
    return proto
