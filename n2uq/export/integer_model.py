"""The integer model itself: :class:`IntegerModel` runs a list of ops in order.

It holds the ops of :mod:`n2uq.export.ops` and :mod:`n2uq.export.integer_ops` (all listed in
:data:`OP_TYPES`, by the type name a packed file records), frees every tensor after its last use,
and can record or override the codes of its quantizer units for comparisons layer by layer
(:mod:`n2uq.export.verify`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Type

import torch
from torch import Tensor, nn

from n2uq.export.integer_ops import INTEGER_OPS, IntConv, Threshold
from n2uq.export.ops import FLOAT_OPS, Op

__all__ = ["OP_TYPES", "UnitRecord", "IntegerModel"]

#: Every op type an integer model may hold, by class name.
OP_TYPES: Dict[str, Type[Op]] = {cls.__name__: cls for cls in (*FLOAT_OPS, *INTEGER_OPS)}


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
