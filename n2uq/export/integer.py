"""Integer inference model of a trained N2UQ network (paper Fig. 1b; SPEC §1-§3, §5).

:func:`convert` lowers the float graph of :mod:`n2uq.export.graph` into a list of :class:`Op`
modules run by :class:`IntegerModel`:

* every ``LTQ`` (with the RPReLU in front of it) and the ``PACT`` become a :class:`Threshold` that
  outputs the integer code ``m`` (SPEC §1: ``m = #{i : x·scale1 > t[i]}``); the uniform output
  step ``interval·scale2`` (PACT: ``c/n``) is not applied but folded downstream;
* every ``HardQuantizeConv`` becomes an :class:`IntConv` over activation codes ``m ∈ 0..2^b-1`` and
  odd weight codes ``k ∈ [-(2^b-1), 2^b-1]`` (SPEC §2). Its accumulator ``Σ m·k`` is an integer
  with ``|acc| <= bound = K·n_a·n_w`` (``K`` = inputs per output); it is computed exactly in
  float32 when ``bound < 2^24`` (every partial sum is then an integer that float32 represents, so
  no addition rounds, in any order) and in float64 otherwise (exact to ``2^53``);
* the accumulator's meaning, ``acc·α + β`` per output channel with ``α = step_a · s/n · γ/σ`` and
  ``β`` from the BatchNorm that follows (eval statistics), is kept symbolic: a following quantizer
  folds it into per-channel integer thresholds (:mod:`n2uq.export.streamline`), and only a float
  consumer (residual add, ReLU6 → pool) gets a :class:`Dequant`;
* the first conv, the FP downsample, BN on float tensors, residual additions, the block-output
  RPReLU, pooling and ``fc`` stay float, computed with the same ops as the fake-quant model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Type, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from n2uq.export.graph import Graph, GraphError, Node, trace_graph
from n2uq.export.streamline import (
    float_thresholds,
    integer_thresholds,
    ltq_count,
    pact_code,
    rprelu_ltq_chain,
)
from n2uq.quant import LTQ, HardQuantizeConv, weight_scale

__all__ = ["Op", "Threshold", "IntConv", "Dequant", "IntegerModel", "convert", "OP_TYPES",
           "EXACT_FLOAT32_BOUND"]

#: Integers up to this magnitude are exact in float32, and so is every sum of them that stays below.
EXACT_FLOAT32_BOUND = 2**24

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _channel(v: Tensor) -> Tensor:
    """``[C]`` → ``[1, C, 1, 1]``."""
    return v.view(1, -1, 1, 1)


class Op(nn.Module):
    """One step of the integer model: reads the named tensors ``inputs``, writes ``output``.

    Parameters live in buffers (saved by :mod:`n2uq.export.packing`); ``attrs()`` returns the
    JSON-able rest, so ``type(op)(name, inputs, output, **op.attrs(), **buffers)`` rebuilds it.
    """

    def __init__(self, name: str, inputs: Tuple[str, ...], output: str):
        super().__init__()
        self.name, self.inputs, self.output = name, tuple(inputs), output

    def attrs(self) -> Dict[str, Any]:
        return {}

    def tensors(self) -> Dict[str, Tensor]:
        return dict(self.named_buffers(recurse=False))

    def extra_repr(self) -> str:
        return f"{self.name}: {', '.join(self.inputs)} -> {self.output}"


class FloatConv(Op):
    def __init__(self, name, inputs, output, weight: Tensor, bias: Optional[Tensor] = None,
                 stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups: int = 1):
        super().__init__(name, inputs, output)
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.stride, self.padding, self.dilation, self.groups = list(stride), list(padding), list(dilation), groups

    def attrs(self):
        return {"stride": self.stride, "padding": self.padding, "dilation": self.dilation, "groups": self.groups}

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class BatchNorm(Op):
    """Eval-mode BatchNorm on a float tensor (the same call as ``nn.BatchNorm2d.eval()``)."""

    def __init__(self, name, inputs, output, running_mean: Tensor, running_var: Tensor,
                 weight: Tensor, bias: Tensor, eps: float = 1e-5):
        super().__init__(name, inputs, output)
        for key, value in (("running_mean", running_mean), ("running_var", running_var),
                           ("weight", weight), ("bias", bias)):
            self.register_buffer(key, value)
        self.eps = float(eps)

    def attrs(self):
        return {"eps": self.eps}

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class Relu(Op):
    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x)


class Relu6(Op):
    def forward(self, x: Tensor) -> Tensor:
        return F.relu6(x)


class MaxPool(Op):
    def __init__(self, name, inputs, output, kernel=(3, 3), stride=(2, 2), padding=(1, 1),
                 dilation=(1, 1), ceil_mode: bool = False):
        super().__init__(name, inputs, output)
        self.kernel, self.stride, self.padding = list(kernel), list(stride), list(padding)
        self.dilation, self.ceil_mode = list(dilation), bool(ceil_mode)

    def attrs(self):
        return {"kernel": self.kernel, "stride": self.stride, "padding": self.padding,
                "dilation": self.dilation, "ceil_mode": self.ceil_mode}

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool2d(x, self.kernel, self.stride, self.padding, self.dilation, self.ceil_mode)


class GlobalAvgPool(Op):
    def forward(self, x: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(x, 1)


class Flatten(Op):
    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(x, 1)


class Linear(Op):
    def __init__(self, name, inputs, output, weight: Tensor, bias: Optional[Tensor] = None):
        super().__init__(name, inputs, output)
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class Add(Op):
    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return a + b


class RPReLU(Op):
    """``LearnableBias → PReLU → LearnableBias`` on a float tensor (a block's output)."""

    def __init__(self, name, inputs, output, bias1: Tensor, slope: Tensor, bias2: Tensor):
        super().__init__(name, inputs, output)
        self.register_buffer("bias1", bias1)
        self.register_buffer("slope", slope)
        self.register_buffer("bias2", bias2)

    def forward(self, x: Tensor) -> Tensor:
        return F.prelu(x + _channel(self.bias1), self.slope) + _channel(self.bias2)


class IntConv(Op):
    """Convolution of activation codes by weight codes; returns the exact integer accumulator
    (held in ``dtype``: float32 when ``bound < 2^24``, else float64).

    A convolution that sums products (direct or GEMM, PyTorch's CPU paths) is exact here without
    help; the final ``round`` makes transform-based algorithms (Winograd, FFT: possible on GPUs)
    exact too, as long as their error stays below 1/2.
    """

    def __init__(self, name, inputs, output, weight: Tensor, stride=(1, 1), padding=(0, 0),
                 groups: int = 1, weight_bits: int = 2, bound: int = 0, dtype: str = "float32"):
        super().__init__(name, inputs, output)
        self.register_buffer("weight", weight)  # odd integer codes, int8 (int16 for 8 bits)
        self.stride, self.padding, self.groups = list(stride), list(padding), int(groups)
        self.weight_bits, self.bound, self.dtype = int(weight_bits), int(bound), dtype

    def attrs(self):
        return {"stride": self.stride, "padding": self.padding, "groups": self.groups,
                "weight_bits": self.weight_bits, "bound": self.bound, "dtype": self.dtype}

    def forward(self, codes: Tensor) -> Tensor:
        dt = _DTYPES[self.dtype]
        return F.conv2d(codes.to(dt), self.weight.to(dt), None, self.stride, self.padding, 1, self.groups).round()


class Dequant(Op):
    """``acc·α + β`` per channel (the integer accumulator's float value, BN folded), in α's dtype."""

    def __init__(self, name, inputs, output, alpha: Tensor, beta: Tensor):
        super().__init__(name, inputs, output)
        self.register_buffer("alpha", alpha)
        self.register_buffer("beta", beta)

    def forward(self, acc: Tensor) -> Tensor:
        return acc.to(self.alpha.dtype) * _channel(self.alpha) + _channel(self.beta)


class Threshold(Op):
    """Quantizer unit: input (float tensor or integer accumulator) → code ``m ∈ 0..2^b-1``.

    ``u = d·x`` on streamlined channels and ``u = scale1·RPReLU(α·x + β)`` (the float chain) on
    fallback channels; then ``m = #{j : u >= T[c, j]}`` (:mod:`n2uq.export.streamline`). On
    fallback channels ``T`` is ``nextafter(t, +inf)``, so ``>=`` is the LTQ's strict ``>``.
    ``step`` is the value of one code step downstream (``interval·scale2``, or ``c/n`` for PACT).
    """

    def __init__(self, name, inputs, output, thresholds: Tensor, direction: Tensor, fallback: Tensor,
                 alpha: Optional[Tensor] = None, beta: Optional[Tensor] = None,
                 bias1: Optional[Tensor] = None, slope: Optional[Tensor] = None,
                 bias2: Optional[Tensor] = None, scale1: Optional[Tensor] = None,
                 bits: int = 2, step: float = 1.0, source: str = "float", quantizer: str = "ltq"):
        super().__init__(name, inputs, output)
        self.register_buffer("thresholds", thresholds)  # [C, n], non-decreasing per row
        self.register_buffer("direction", direction)  # [C], ±1
        self.register_buffer("fallback", fallback)  # [C] bool
        for key, value in (("alpha", alpha), ("beta", beta), ("bias1", bias1), ("slope", slope),
                           ("bias2", bias2), ("scale1", scale1)):
            self.register_buffer(key, value)
        self.bits, self.step, self.source, self.quantizer = int(bits), float(step), source, quantizer

    def attrs(self):
        return {"bits": self.bits, "step": self.step, "source": self.source, "quantizer": self.quantizer}

    @property
    def streamlined_channels(self) -> int:
        return int((~self.fallback).sum())

    def chain(self, x: Tensor) -> Tensor:
        """The float chain (fallback channels), in the thresholds' dtype."""
        if self.alpha is not None:
            x = x * _channel(self.alpha) + _channel(self.beta)
        b1 = None if self.bias1 is None else _channel(self.bias1)
        b2 = None if self.bias2 is None else _channel(self.bias2)
        return rprelu_ltq_chain(x, b1, self.slope, b2, self.scale1)

    def preactivation(self, x: Tensor) -> Tensor:
        """``u``, the value compared with the thresholds."""
        x = x.to(self.thresholds.dtype)
        u = x * _channel(self.direction.to(x.dtype))
        if bool(self.fallback.any()):
            u = torch.where(_channel(self.fallback), self.chain(x), u)
        return u

    def count(self, u: Tensor) -> Tensor:
        """``#{j : u >= T[c, j]}`` as float32 codes."""
        c = u.shape[1]
        flat = u.transpose(0, 1).reshape(c, -1).contiguous()
        codes = torch.searchsorted(self.thresholds, flat, right=True)
        return codes.reshape(c, u.shape[0], *u.shape[2:]).transpose(0, 1).to(torch.float32)

    def forward(self, x: Tensor) -> Tensor:
        return self.count(self.preactivation(x))


OP_TYPES: Dict[str, Type[Op]] = {cls.__name__: cls for cls in (
    FloatConv, BatchNorm, Relu, Relu6, MaxPool, GlobalAvgPool, Flatten, Linear, Add, RPReLU,
    IntConv, Dequant, Threshold)}


@dataclass
class UnitRecord:
    """A threshold unit's preactivation ``u`` and its own codes, from :meth:`IntegerModel.run`."""

    u: Tensor
    codes: Tensor


class IntegerModel(nn.Module):
    """Runs the ops in order. ``meta`` describes the source model (config, bits, ...)."""

    def __init__(self, ops: List[Op], input_name: str, output_name: str, meta: Optional[Dict[str, Any]] = None):
        super().__init__()
        self.ops = nn.ModuleList(ops)
        self.input_name, self.output_name = input_name, output_name
        self.meta = dict(meta or {})
        last_use: Dict[str, int] = {}
        for i, op in enumerate(ops):
            for name in op.inputs:
                last_use[name] = i
        self._free_after = [[n for n in op.inputs if last_use[n] == i and n != output_name]
                            for i, op in enumerate(ops)]

    def units(self) -> List[Threshold]:
        return [op for op in self.ops if isinstance(op, Threshold)]

    @torch.no_grad()
    def run(self, x: Tensor, record: Optional[Dict[str, UnitRecord]] = None,
            override: Optional[Dict[str, Tensor]] = None) -> Tensor:
        """Forward pass. ``record`` collects every unit's :class:`UnitRecord`; ``override`` replaces a
        unit's output by the given codes (teacher forcing, for comparisons layer by layer)."""
        env: Dict[str, Tensor] = {self.input_name: x}
        for op, free in zip(self.ops, self._free_after):
            args = [env[name] for name in op.inputs]
            if isinstance(op, Threshold) and (record is not None or override is not None):
                u = op.preactivation(args[0])
                y = op.count(u)
                if record is not None:
                    record[op.name] = UnitRecord(u, y)
                if override is not None and op.name in override:
                    y = override[op.name].to(y.dtype)
            else:
                y = op(*args)
            env[op.output] = y
            for name in free:
                env.pop(name, None)
        return env[self.output_name]

    def forward(self, x: Tensor) -> Tensor:
        return self.run(x)

    def summary(self) -> Dict[str, int]:
        units = self.units()
        channels = sum(u.fallback.numel() for u in units)
        fallback = sum(int(u.fallback.sum()) for u in units)
        return {"threshold_units": len(units), "int_convs": sum(isinstance(o, IntConv) for o in self.ops),
                "channels": channels, "streamlined_channels": channels - fallback,
                "fallback_channels": fallback}


# ---------------------------------------------------------------------------------------------
# Lowering: float graph -> integer ops
# ---------------------------------------------------------------------------------------------


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
        self.graph = graph
        self.users = graph.consumers()
        self.ops: List[Op] = []
        self.reps: Dict[str, Any] = {graph.input: _Float(graph.input)}
        self.materialized: Dict[str, str] = {}

    def emit(self, op: Op) -> str:
        self.ops.append(op)
        return op.output

    def as_float(self, name: str) -> str:
        """Name of a float tensor holding the value of graph tensor ``name`` (emits a Dequant or an
        RPReLU the first time a folded value is needed as a float)."""
        rep = self.reps[name]
        if isinstance(rep, _Float):
            return rep.name
        if name not in self.materialized:
            if isinstance(rep, _Acc):
                op: Op = Dequant(f"{name}.dequant", (rep.name,), name,
                                 rep.alpha.to(torch.float32), rep.beta.to(torch.float32))
            elif isinstance(rep, _Chain):
                b1, prelu, b2 = rep.modules
                c = b1.bias.numel()
                op = RPReLU(name, (self.as_float(rep.source),), name, _flat(b1.bias, torch.float32, c),
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
        # Wq = k · s·c/(2n): with clip_val c = 2 the step is s/n (SPEC §2).
        s = weight_scale(conv.weight, conv.num_bits).reshape(-1).to(torch.float64)
        w_step = s * float(conv.clip_val) / (2 * n_w)
        k = conv.in_chn // conv.groups * conv.kernel_size * conv.kernel_size
        bound = k * src.n * n_w
        dtype = "float32" if bound < EXACT_FLOAT32_BOUND else "float64"
        wdt = torch.int8 if n_w <= 127 else torch.int16
        self.emit(IntConv(node.name, (src.name,), node.name, codes.to(wdt), (conv.stride,) * 2,
                          (conv.padding,) * 2, conv.groups, conv.num_bits, bound, dtype))
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


def _float_op(node: Node, inputs: Tuple[str, ...]) -> Op:
    m, name, op = node.module, node.name, node.op
    if op == "conv":
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            raise GraphError(f"{name}: only zero padding given as numbers is supported")
        return FloatConv(name, inputs, name, m.weight.detach().clone(),
                         None if m.bias is None else m.bias.detach().clone(),
                         m.stride, m.padding, m.dilation, m.groups)
    if op == "bn":
        return BatchNorm(name, inputs, name, m.running_mean.clone(), m.running_var.clone(),
                         m.weight.detach().clone(), m.bias.detach().clone(), m.eps)
    if op == "maxpool":
        pair = lambda v: list(v) if isinstance(v, (tuple, list)) else [v, v]
        return MaxPool(name, inputs, name, pair(m.kernel_size), pair(m.stride or m.kernel_size),
                       pair(m.padding), pair(m.dilation), m.ceil_mode)
    if op == "linear":
        return Linear(name, inputs, name, m.weight.detach().clone(),
                      None if m.bias is None else m.bias.detach().clone())
    simple = {"relu": Relu, "relu6": Relu6, "gap": GlobalAvgPool, "flatten": Flatten, "add": Add}
    return simple[op](name, inputs, name)


def _threshold_unit(node: Node, src: Union[_Float, _Acc], chain, channels: int) -> Threshold:
    """Build the :class:`Threshold` for quantizer ``node`` on ``src`` with an optional RPReLU."""
    mod = node.module
    acc = isinstance(src, _Acc)
    dtype = _DTYPES[src.dtype] if acc else torch.float32
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
    chain_tensors: Dict[str, Optional[Tensor]] = {}
    thresholds = mono
    if not bool(monotone.all()):  # fallback channels: u = chain value, T = nextafter(t) (">=" is ">")
        inf = torch.tensor(float("inf"), dtype=dtype)
        thresholds = torch.where(monotone[:, None], mono, torch.nextafter(t.to(dtype), inf).expand(channels, n))
        as_dt = lambda v: None if v is None else v.to(dtype)
        chain_tensors = {"alpha": as_dt(alpha) if acc else None, "beta": as_dt(beta) if acc else None,
                         "bias1": as_dt(b1), "slope": as_dt(w), "bias2": as_dt(b2), "scale1": as_dt(scale1)}
    ltq = isinstance(mod, LTQ)
    step = mod.interval * float(mod.scale2) if ltq else float(mod.clip_val) / n
    return Threshold(node.name, (src.name,), node.name, thresholds.contiguous(), direction, ~monotone,
                     bits=bits, step=step, source="acc" if acc else "float", quantizer="ltq" if ltq else "pact",
                     **chain_tensors)


@torch.no_grad()
def convert(model: nn.Module, meta: Optional[Dict[str, Any]] = None) -> IntegerModel:
    """Integer inference model of an N2UQ ResNet/MobileNetV2 (eval statistics of its BatchNorms).

    The model is not modified. Raises :class:`~n2uq.export.graph.GraphError` for a layout this
    converter does not know.
    """
    graph = trace_graph(model)
    low = _Lowering(graph)
    for node in graph.nodes:
        low.lower(node)
    out = low.as_float(graph.output)
    return IntegerModel(low.ops, graph.input, out, meta)
