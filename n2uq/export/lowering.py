"""Conversion of a trained N2UQ model into an integer model: :func:`convert`.

The float graph of :mod:`n2uq.export.graph` is lowered node by node. Each graph tensor is
represented by what the integer model holds for it: a float tensor, an integer accumulator with
its still symbolic per-channel meaning ``acc·α + β``, a quantizer's codes, or an RPReLU not yet
emitted (a following quantizer may fold it into its thresholds). Quantizers become
:class:`~n2uq.export.integer_ops.Threshold` units, quantized convolutions become
:class:`~n2uq.export.integer_ops.IntConv`, a BatchNorm after an integer conv is folded into ``α, β``,
and a float consumer of an accumulator gets a :class:`~n2uq.export.integer_ops.Dequant`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from n2uq.export import ops
from n2uq.export.graph import Graph, GraphError, Node, trace_graph
from n2uq.export.integer_model import IntegerModel
from n2uq.export.integer_ops import (
    ACCUMULATOR_DTYPES,
    EXACT_FLOAT32_BOUND,
    Dequant,
    FallbackChain,
    IntConv,
    Threshold,
    UnitKind,
)
from n2uq.export.streamline import (
    float_thresholds,
    integer_thresholds,
    ltq_count,
    pact_code,
    rprelu_ltq_chain,
)
from n2uq.quant import LTQ, HardQuantizeConv

__all__ = ["convert"]


@dataclass
class _Float:
    name: str


@dataclass
class _Acc:
    """Integer accumulator tensor ``name`` whose value means ``acc·alpha + beta`` (float64 [C])."""

    name: str
    alpha: Tensor
    beta: Tensor
    bound: int
    dtype: str


@dataclass
class _Codes:
    name: str
    step: float
    n: int


@dataclass
class _Chain:
    """An RPReLU on graph tensor ``source``, not emitted yet: a quantizer may fold it."""

    source: str
    modules: Tuple[nn.Module, nn.Module, nn.Module]


def _sign(v: Tensor) -> Tensor:
    return torch.where(v < 0, -1.0, 1.0).to(torch.float32)


def _flat(t: Tensor, dtype: torch.dtype, channels: int) -> Tensor:
    return t.detach().reshape(-1).to(dtype).expand(channels).clone()


class _Lowering:
    def __init__(self, graph: Graph):
        self.users = graph.consumers()
        self.emitted: List[ops.Op] = []
        self.reps: Dict[str, Any] = {graph.input: _Float(graph.input)}
        self.materialized: Dict[str, str] = {}

    def emit(self, op: ops.Op) -> str:
        self.emitted.append(op)
        return op.output

    def as_float(self, name: str) -> str:
        """Name of a float tensor holding the value of graph tensor ``name`` (emits a Dequant or an
        RPReLU the first time a folded value is needed as a float)."""
        rep = self.reps[name]
        if isinstance(rep, _Float):
            return rep.name
        if name not in self.materialized:
            if isinstance(rep, _Acc):
                op: ops.Op = Dequant(f"{name}.dequant", (rep.name,), name,
                                     rep.alpha.to(torch.float32), rep.beta.to(torch.float32))
            elif isinstance(rep, _Chain):
                b1, prelu, b2 = rep.modules
                c = b1.bias.numel()
                op = ops.RPReLU(name, (self.as_float(rep.source),), name, _flat(b1.bias, torch.float32, c),
                                prelu.weight.detach().clone(), _flat(b2.bias, torch.float32, c))
            else:
                raise GraphError(f"{name}: quantizer codes used by a float op; not an N2UQ layout")
            self.materialized[name] = self.emit(op)
        return self.materialized[name]

    def lower(self, node: Node) -> None:
        op, name, m = node.op, node.name, node.module
        if op == "rprelu":
            self.reps[name] = _Chain(node.inputs[0], m)
            users = self.users.get(name, [])
            if not (len(users) == 1 and users[0].op == "ltq"):  # not folded into a quantizer
                self.reps[name] = _Float(self.as_float(name))
        elif op in ("ltq", "pact"):
            self.reps[name] = self.quantizer(node)
        elif op == "qconv":
            self.reps[name] = self.int_conv(node)
        elif op == "bn" and isinstance(self.reps[node.inputs[0]], _Acc):
            src = self.reps[node.inputs[0]]
            g, h = _bn_affine(m)
            self.reps[name] = _Acc(src.name, src.alpha * g, src.beta * g + h, src.bound, src.dtype)
        else:
            inputs = tuple(self.as_float(i) for i in node.inputs)
            self.reps[name] = _Float(self.emit(_float_op(node, inputs)))

    def int_conv(self, node: Node) -> _Acc:
        conv: HardQuantizeConv = node.module
        src = self.reps[node.inputs[0]]
        if not isinstance(src, _Codes):
            raise GraphError(f"{node.name}: HardQuantizeConv input does not come from a quantizer")
        codes, _ = conv.weight_codes()
        n_w = 2**conv.num_bits - 1
        # Wq = k · s·c/(2n): with clip_val c = 2 the step is s/n (the paper's weight quantizer,
        # see docs/SPEC.md, weight quantizer).
        s = conv.scale().reshape(-1).to(torch.float64)
        w_step = s * float(conv.clip_val) / (2 * n_w)
        k = conv.in_chn // conv.groups * conv.kernel_size * conv.kernel_size
        bound = k * src.n * n_w
        dtype = "float32" if bound < EXACT_FLOAT32_BOUND else "float64"
        wdt = torch.int8 if n_w <= 127 else torch.int16
        geometry = ops.ConvGeometry((conv.stride,) * 2, (conv.padding,) * 2, groups=conv.groups)
        self.emit(IntConv(node.name, (src.name,), node.name, codes.to(wdt), geometry, conv.num_bits, bound, dtype))
        return _Acc(node.name, src.step * w_step, torch.zeros_like(w_step), bound, dtype)

    def quantizer(self, node: Node) -> _Codes:
        users = self.users.get(node.name, [])
        if not users or any(u.op != "qconv" for u in users):
            raise GraphError(f"{node.name}: a quantizer must feed HardQuantizeConv layers only")
        channels = users[0].module.in_chn
        src, chain = self.reps[node.inputs[0]], None
        if isinstance(src, _Chain):
            src, chain = self.reps[src.source], src.modules
        if not isinstance(src, (_Float, _Acc)):
            raise GraphError(f"{node.name}: quantizer applied to codes")
        unit = _threshold_unit(node, src, chain, channels)
        self.emit(unit)
        return _Codes(node.name, unit.step, 2**unit.bits - 1)


def _bn_affine(bn: nn.BatchNorm2d) -> Tuple[Tensor, Tensor]:
    """Eval BatchNorm as ``x·g + h`` (float64)."""
    g = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
    return g, bn.bias.detach().double() - bn.running_mean.double() * g


def _float_op(node: Node, inputs: Tuple[str, ...]) -> ops.Op:
    m, name, op = node.module, node.name, node.op
    if op == "conv":
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            raise GraphError(f"{name}: only zero padding given as numbers is supported")
        return ops.FloatConv(name, inputs, name, m.weight.detach().clone(),
                             None if m.bias is None else m.bias.detach().clone(),
                             ops.ConvGeometry(m.stride, m.padding, m.dilation, m.groups))
    if op == "bn":
        return ops.BatchNorm(name, inputs, name, m.running_mean.clone(), m.running_var.clone(),
                             m.weight.detach().clone(), m.bias.detach().clone(), m.eps)
    if op == "maxpool":
        pair = lambda v: list(v) if isinstance(v, (tuple, list)) else [v, v]
        return ops.MaxPool(name, inputs, name, pair(m.kernel_size), pair(m.stride or m.kernel_size),
                           pair(m.padding), pair(m.dilation), m.ceil_mode)
    if op == "linear":
        return ops.Linear(name, inputs, name, m.weight.detach().clone(),
                          None if m.bias is None else m.bias.detach().clone())
    simple = {"relu": ops.Relu, "relu6": ops.Relu6, "gap": ops.GlobalAvgPool, "flatten": ops.Flatten, "add": ops.Add}
    return simple[op](name, inputs, name)


def _threshold_unit(node: Node, src: Union[_Float, _Acc], chain, channels: int) -> Threshold:
    """Build the :class:`Threshold` for quantizer ``node`` on ``src`` with an optional RPReLU."""
    mod = node.module
    acc = isinstance(src, _Acc)
    dtype = ACCUMULATOR_DTYPES[src.dtype] if acc else torch.float32
    cdt = torch.float64 if acc else torch.float32  # precision of the threshold search
    b1 = w = b2 = None
    if chain is not None:
        b1 = _flat(chain[0].bias, torch.float32, channels)
        w = chain[1].weight.detach().to(torch.float32).reshape(-1)
        b2 = _flat(chain[2].bias, torch.float32, channels)
    alpha = src.alpha if acc else torch.ones(channels, dtype=torch.float64)
    beta = src.beta if acc else torch.zeros(channels, dtype=torch.float64)
    col = lambda v: None if v is None else v.to(cdt).view(1, -1, 1)  # [1, C, 1] for the search

    if isinstance(mod, LTQ):
        n, bits = mod.n_val, mod.n_bit
        t, scale1 = mod.thresholds(), mod.scale1.detach().clone()
        direction = _sign(alpha * scale1.double())
        monotone = torch.ones(channels, dtype=torch.bool) if w is None else (w.expand(channels) >= 0)

        def code_fn(u: Tensor) -> Tensor:
            x = u * col(direction)
            if acc:
                x = x * col(alpha) + col(beta)
            return ltq_count(rprelu_ltq_chain(x, col(b1), None if w is None else w.to(cdt), col(b2),
                                              scale1.to(cdt)), t)
    else:  # PACT, monotone non-decreasing in its input
        n, bits, scale1 = 2**mod.num_bits - 1, mod.num_bits, None
        clip = mod.clip_val.detach().to(cdt)
        if float(clip) <= 0:
            raise GraphError(f"{node.name}: PACT clip_val must be positive, got {float(clip)}")
        direction, monotone = _sign(alpha), torch.ones(channels, dtype=torch.bool)

        def code_fn(u: Tensor) -> Tensor:
            x = u * col(direction)
            if acc:
                x = x * col(alpha) + col(beta)
            return pact_code(x, clip, n)

    if acc:
        mono = integer_thresholds(code_fn, channels, n, src.bound).to(dtype)
    else:
        mono = float_thresholds(code_fn, channels, n)
    fallback_chain = None
    thresholds = mono
    if not bool(monotone.all()):  # fallback channels: u = chain value, T = nextafter(t) (">=" is ">")
        inf = torch.tensor(float("inf"), dtype=dtype)
        thresholds = torch.where(monotone[:, None], mono, torch.nextafter(t.to(dtype), inf).expand(channels, n))
        as_dt = lambda v: None if v is None else v.to(dtype)
        fallback_chain = FallbackChain(alpha=as_dt(alpha) if acc else None, beta=as_dt(beta) if acc else None,
                                       bias1=as_dt(b1), slope=as_dt(w), bias2=as_dt(b2), scale1=as_dt(scale1))
    ltq = isinstance(mod, LTQ)
    step = mod.interval * float(mod.scale2) if ltq else float(mod.clip_val) / n
    kind = UnitKind(bits=bits, step=step, source="acc" if acc else "float", quantizer="ltq" if ltq else "pact")
    return Threshold(node.name, (src.name,), node.name, thresholds.contiguous(), direction, ~monotone, kind,
                     fallback_chain)


@torch.no_grad()
def convert(model: nn.Module, meta: Optional[Dict[str, Any]] = None) -> IntegerModel:
    """Integer inference model of an N2UQ ResNet/MobileNetV2 (eval statistics of its BatchNorms).

    The model is not modified. Raises :class:`~n2uq.export.graph.GraphError` for a layout this
    converter does not know, and :class:`ValueError` for a model (or a submodule) in training mode:
    BatchNorm folding uses the running statistics, which only eval mode applies.
    """
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        raise ValueError(f"convert() needs a model in eval mode (BatchNorm is folded with its running statistics), "
                         f"but {training[0]} is in training mode: call model.eval() first")
    graph = trace_graph(model)
    low = _Lowering(graph)
    for node in graph.nodes:
        low.lower(node)
    out = low.as_float(graph.output)
    return IntegerModel(low.emitted, graph.input, out, meta)
