"""The module-level dataflow graph of an N2UQ model, read from its module tree
(the architectures of docs/SPEC.md).

The exporters never run a block's ``forward`` (it may be fused or reordered for speed); they walk
the submodules by their reference names and build a list of :class:`Node` in execution order.
:func:`run_graph` evaluates that list by calling each original module, which gives the
fake-quant reference values (and every quantizer's input) for the export checks; its logits are
compared with ``model(x)`` there, so a graph that misreads the model cannot pass unnoticed.

Recognised layouts (duck-typed, the library never imports the architecture folders):

* ResNet: ``conv1, bn1, maxpool, layer1..4, avgpool, fc``; blocks with quantized stages
  ``bias{k}1, prelu{k}, bias{k}2, quan{k}, conv{k}, bn{k}``, an identity or ``downsample``
  (``LTQ → HardQuantizeConv → BN`` or ``Conv2d → BN``), then the output RPReLU
  (``bias31, prelu3, bias32`` in BasicBlock, ``bias01, prelu0, bias02`` in Bottleneck).
* MobileNetV2: ``feature`` = FP stem (``conv1, bn1``, ReLU6), inverted residuals (three
  quantized stages, residual when input and output channels match and every stride is 1),
  the head (``quan1`` PACT, ``conv1``, ``bn1``, ReLU6); a global average pool (``AvgPool2d(7)``
  on the 7×7 map of a 224×224 input is exactly that); ``fc``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from n2uq.quant import LTQ, PACT, HardQuantizeConv, LearnableBias

__all__ = ["Node", "Graph", "GraphError", "trace_graph", "run_graph", "QuantizerTrace"]

#: Ops of the float graph. "rprelu" holds ``(LearnableBias, PReLU, LearnableBias)``.
OPS = ("conv", "bn", "relu", "relu6", "maxpool", "rprelu", "ltq", "pact", "qconv", "add", "gap",
       "flatten", "linear")


class GraphError(ValueError):
    """The model's module tree is not one of the N2UQ layouts this exporter understands."""


@dataclass
class Node:
    """One op; ``name`` is the module path (also the name of its output tensor)."""

    op: str
    name: str
    inputs: Tuple[str, ...]
    module: Any = None  # nn.Module, or a tuple of modules for "rprelu"


@dataclass
class Graph:
    nodes: List[Node] = field(default_factory=list)
    input: str = "input"
    output: str = ""

    def consumers(self) -> Dict[str, List[Node]]:
        users: Dict[str, List[Node]] = {}
        for node in self.nodes:
            for name in node.inputs:
                users.setdefault(name, []).append(node)
        return users


class _Builder:
    def __init__(self) -> None:
        self.graph = Graph()

    def add(self, op: str, name: str, inputs: Tuple[str, ...], module: Any = None) -> str:
        if any(n.name == name for n in self.graph.nodes):
            raise GraphError(f"duplicate node name {name!r}")
        self.graph.nodes.append(Node(op, name, tuple(inputs), module))
        return name

    def rprelu(self, block: nn.Module, prefix: str, b1: str, p: str, b2: str, name: str, x: str) -> str:
        mods = (_child(block, b1, LearnableBias, prefix), _child(block, p, nn.PReLU, prefix),
                _child(block, b2, LearnableBias, prefix))
        return self.add("rprelu", _join(prefix, name), (x,), mods)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _child(parent: nn.Module, name: str, kind: type, prefix: str) -> nn.Module:
    mod = getattr(parent, name, None)
    if not isinstance(mod, kind):
        raise GraphError(f"{_join(prefix, name)}: expected {kind.__name__}, found {type(mod).__name__}")
    return mod


def _quantized_block(b: _Builder, block: nn.Module, prefix: str, x: str, resnet: bool) -> str:
    """Quantized stages, residual and output RPReLU of a BasicBlock/Bottleneck/InvertedResidual."""
    out, stage = x, 1
    convs = []
    while isinstance(getattr(block, f"conv{stage}", None), HardQuantizeConv) and hasattr(block, f"quan{stage}"):
        k = stage
        out = b.rprelu(block, prefix, f"bias{k}1", f"prelu{k}", f"bias{k}2", f"rprelu{k}", out)
        out = b.add("ltq", _join(prefix, f"quan{k}"), (out,), _child(block, f"quan{k}", LTQ, prefix))
        conv = _child(block, f"conv{k}", HardQuantizeConv, prefix)
        convs.append(conv)
        out = b.add("qconv", _join(prefix, f"conv{k}"), (out,), conv)
        out = b.add("bn", _join(prefix, f"bn{k}"), (out,), _child(block, f"bn{k}", nn.BatchNorm2d, prefix))
        stage += 1
    if stage < 3:
        raise GraphError(f"{prefix}: expected at least two quantized stages (bias11, prelu1, bias12, "
                         f"quan1, conv1, bn1, ...), found {stage - 1}")
    if resnet:
        identity = x
        ds = getattr(block, "downsample", None)
        if ds is not None:
            identity = _downsample(b, ds, _join(prefix, "downsample"), x)
        out = b.add("add", _join(prefix, "add"), (out, identity))
        if hasattr(block, "bias01"):
            out = b.rprelu(block, prefix, "bias01", "prelu0", "bias02", "rprelu0", out)
        else:
            out = b.rprelu(block, prefix, "bias31", "prelu3", "bias32", "rprelu3", out)
    elif convs[0].in_chn == convs[-1].out_chn and all(c.stride == 1 for c in convs):
        out = b.add("add", _join(prefix, "add"), (out, x))
    return out


def _downsample(b: _Builder, ds: nn.Module, prefix: str, x: str) -> str:
    mods = list(ds.children()) if isinstance(ds, nn.Sequential) else []
    kinds = [type(m) for m in mods]
    if len(mods) == 3 and isinstance(mods[0], LTQ) and isinstance(mods[1], HardQuantizeConv) \
            and isinstance(mods[2], nn.BatchNorm2d):
        x = b.add("ltq", f"{prefix}.0", (x,), mods[0])
        x = b.add("qconv", f"{prefix}.1", (x,), mods[1])
        return b.add("bn", f"{prefix}.2", (x,), mods[2])
    if len(mods) == 2 and isinstance(mods[0], nn.Conv2d) and isinstance(mods[1], nn.BatchNorm2d):
        x = b.add("conv", f"{prefix}.0", (x,), mods[0])
        return b.add("bn", f"{prefix}.1", (x,), mods[1])
    raise GraphError(f"{prefix}: expected Sequential(LTQ, HardQuantizeConv, BatchNorm2d) or "
                     f"Sequential(Conv2d, BatchNorm2d), found {[k.__name__ for k in kinds]}")


def _head(b: _Builder, x: str) -> str:
    x = b.add("gap", "avgpool", (x,))
    x = b.add("flatten", "flatten", (x,))
    return x


def _trace_resnet(model: nn.Module) -> Graph:
    b = _Builder()
    x = b.add("conv", "conv1", (b.graph.input,), _child(model, "conv1", nn.Conv2d, ""))
    x = b.add("bn", "bn1", (x,), _child(model, "bn1", nn.BatchNorm2d, ""))
    x = b.add("relu", "relu", (x,))
    x = b.add("maxpool", "maxpool", (x,), _child(model, "maxpool", nn.MaxPool2d, ""))
    for stage in range(1, 5):
        for i, block in enumerate(_child(model, f"layer{stage}", nn.Sequential, "")):
            x = _quantized_block(b, block, f"layer{stage}.{i}", x, resnet=True)
    pool = getattr(model, "avgpool", None)
    if not (isinstance(pool, nn.AdaptiveAvgPool2d) and pool.output_size in (1, (1, 1))):
        raise GraphError(f"avgpool: expected AdaptiveAvgPool2d((1, 1)), found {pool!r}")
    x = _head(b, x)
    b.graph.output = b.add("linear", "fc", (x,), _child(model, "fc", nn.Linear, ""))
    return b.graph


def _trace_mobilenetv2(model: nn.Module) -> Graph:
    b = _Builder()
    x = b.graph.input
    for i, block in enumerate(model.feature):
        prefix = f"feature.{i}"
        quan1 = getattr(block, "quan1", None)
        if isinstance(getattr(block, "conv1", None), nn.Conv2d) and quan1 is None:  # FP stem
            x = b.add("conv", f"{prefix}.conv1", (x,), block.conv1)
            x = b.add("bn", f"{prefix}.bn1", (x,), _child(block, "bn1", nn.BatchNorm2d, prefix))
            x = b.add("relu6", f"{prefix}.relu6", (x,))
        elif isinstance(quan1, PACT):  # head: PACT -> quantized 1x1 -> BN -> ReLU6
            x = b.add("pact", f"{prefix}.quan1", (x,), quan1)
            x = b.add("qconv", f"{prefix}.conv1", (x,), _child(block, "conv1", HardQuantizeConv, prefix))
            x = b.add("bn", f"{prefix}.bn1", (x,), _child(block, "bn1", nn.BatchNorm2d, prefix))
            x = b.add("relu6", f"{prefix}.relu6", (x,))
        else:
            x = _quantized_block(b, block, prefix, x, resnet=False)
    x = _head(b, x)
    b.graph.output = b.add("linear", "fc", (x,), _child(model, "fc", nn.Linear, ""))
    return b.graph


def trace_graph(model: nn.Module) -> Graph:
    """The float dataflow graph of an N2UQ ResNet-18/34/50 or MobileNetV2 (docs/SPEC.md, architectures)."""
    quantizers = getattr(model, "quantizers", None)
    if quantizers is not None and quantizers.method != "n2uq":
        raise GraphError(f"integer export covers N2UQ models (LTQ activations, HardQuantizeConv weights); this "
                         f"model was built with --method {quantizers.method}, whose quantizers are not exported")
    if isinstance(getattr(model, "feature", None), nn.ModuleList):
        return _trace_mobilenetv2(model)
    if all(hasattr(model, f"layer{i}") for i in range(1, 5)):
        return _trace_resnet(model)
    raise GraphError(f"{type(model).__name__} is neither an N2UQ ResNet (layer1..4) nor a MobileNetV2 "
                     f"(feature); cannot export it")


@dataclass
class QuantizerTrace:
    """What one quantizer saw in the fake-quant model.

    ``xs`` is the value compared with ``boundaries``: ``scale1·x`` against the LTQ thresholds, or
    ``clip(relu(x), c)·nq`` against the PACT rounding points ``j - 1/2``.
    """

    xs: Tensor
    codes: Tensor
    boundaries: Tensor


def _ltq_trace(mod: LTQ, x: Tensor) -> QuantizerTrace:
    return QuantizerTrace(x * mod.scale1, mod.codes(x), mod.thresholds())


def _pact_trace(mod: PACT, x: Tensor) -> QuantizerTrace:
    n = 2**mod.num_bits - 1
    xc = torch.where(F.relu(x) < mod.clip_val, F.relu(x), mod.clip_val)
    bounds = torch.arange(n, dtype=x.dtype) + 0.5
    return QuantizerTrace(xc * (n / mod.clip_val), mod.codes(x), bounds)


def _dequantize(mod: Any, codes: Tensor, dtype: torch.dtype) -> Tensor:
    """The fake-quant output value of ``codes``: ``L[m]·scale2`` (LTQ) or ``m/nq`` (PACT)."""
    if isinstance(mod, LTQ):
        return (mod.levels.to(dtype) * mod.scale2.to(dtype))[codes]
    return codes.to(dtype) / ((2**mod.num_bits - 1) / mod.clip_val.to(dtype))


@torch.no_grad()
def run_graph(graph: Graph, x: Tensor, record: Optional[Dict[str, QuantizerTrace]] = None,
              override: Optional[Dict[str, Tensor]] = None) -> Tensor:
    """Evaluate the graph with the model's own modules (fake-quant semantics, eval mode).

    With ``record``, every quantizer's :class:`QuantizerTrace` is stored under its module name;
    ``override`` replaces a quantizer's output by the value of the given codes (teacher forcing).
    """
    env: Dict[str, Tensor] = {graph.input: x}
    for node in graph.nodes:
        args = [env[i] for i in node.inputs]
        m = node.module
        if node.op in ("conv", "bn", "maxpool", "qconv", "linear"):
            y = m(args[0])
        elif node.op == "rprelu":
            y = m[2](m[1](m[0](args[0])))
        elif node.op in ("ltq", "pact"):
            y = m(args[0])
            if record is not None:
                record[node.name] = (_ltq_trace if node.op == "ltq" else _pact_trace)(m, args[0])
            if override is not None and node.name in override:
                y = _dequantize(m, override[node.name], y.dtype)
        elif node.op == "relu":
            y = F.relu(args[0])
        elif node.op == "relu6":
            y = F.relu6(args[0])
        elif node.op == "add":
            y = args[0] + args[1]
        elif node.op == "gap":
            y = F.adaptive_avg_pool2d(args[0], 1)
        elif node.op == "flatten":
            y = torch.flatten(args[0], 1)
        else:  # pragma: no cover - OPS is closed
            raise GraphError(f"unknown op {node.op}")
        env[node.name] = y
    return env[graph.output]
