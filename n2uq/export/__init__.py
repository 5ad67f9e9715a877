"""Integer inference for N2UQ models: converter, ONNX / QONNX writers, bit-packed weights.

See ``docs/integer_inference.md`` for how each part maps to the paper and SPEC.
"""

from n2uq.export.graph import GraphError, trace_graph
from n2uq.export.integer import IntegerModel, convert

__all__ = ["GraphError", "IntegerModel", "convert", "trace_graph"]
