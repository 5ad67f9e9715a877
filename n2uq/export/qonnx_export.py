"""QONNX writer: the integer model with ``MultiThreshold`` nodes, for FINN-style FPGA flows.

QONNX carries integers in float32 tensors annotated with their integer type. Here:

* each ``Threshold`` unit is ``MultiThreshold(u, T)`` (domain ``qonnx.custom_op.general``,
  ``out_dtype = UINT<b>``, ``T [C, 2^b-1]``, count of ``u >= T[c, j]``); on a streamlined layer
  ``u`` is the accumulator itself (times ±1 per channel), i.e. the FINN streamlined form
  ``Conv → MultiThreshold → Conv``; fallback channels feed the float chain through a ``Where``;
* each quantized convolution is a ``Conv`` whose weights are the integer codes (annotated
  ``INT<b+1>``) and whose output is the exact accumulator (annotated ``INT32``): exact in float32
  because every accumulator is bounded by ``K·n_a·n_w < 2^24`` (checked here);
* float parts are standard ONNX, as in :mod:`n2uq.export.onnx_export`.

The graph has a static input shape (FINN needs one). :func:`run_qonnx` runs it with qonnx's
executor (``qonnx.core.onnx_exec.execute_onnx``).
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import onnx

from n2uq.export import integer as I
from n2uq.export.onnx_export import DEFAULT_INPUT, DEFAULT_OUTPUT, OnnxBuilder, build_graph

__all__ = ["export_qonnx", "run_qonnx"]


def export_qonnx(model: I.IntegerModel, input_shape: Sequence[int],
                 path: Optional[str | os.PathLike[str]] = None):
    """QONNX ``ModelWrapper`` of ``model`` for inputs of shape ``input_shape`` (N, 3, H, W), shapes
    and integer datatypes annotated; saved to ``path`` when given."""
    from qonnx.core.datatype import DataType
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.infer_shapes import InferShapes

    for op in model.ops:
        if isinstance(op, I.IntConv) and op.bound >= I.EXACT_FLOAT32_BOUND:
            raise ValueError(f"{op.name}: accumulators up to {op.bound} are not exact in QONNX's float32 "
                             f"tensors (limit 2^24); use at most 5 bits, or the ONNX export")
    builder = OnnxBuilder(qonnx=True)
    proto = build_graph(model, builder, list(input_shape), expose_codes=False, name="n2uq_qonnx")
    wrapper = ModelWrapper(proto)
    wrapper = wrapper.transform(InferShapes())
    for tensor, dtype in builder.datatypes.items():
        wrapper.set_tensor_datatype(tensor, DataType[dtype])
    if path is not None:
        wrapper.save(os.fspath(path))
    return wrapper


def run_qonnx(model_or_path, x: np.ndarray, code_names: Sequence[str] = ()) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
    """Execute a QONNX model with qonnx's executor; returns ``(logits, {unit: codes})``."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx

    wrapper = model_or_path if isinstance(model_or_path, ModelWrapper) else ModelWrapper(os.fspath(model_or_path))
    context = execute_onnx(wrapper, {DEFAULT_INPUT: np.asarray(x, dtype=np.float32)},
                           return_full_exec_context=True)
    return context[DEFAULT_OUTPUT], {name: context[name] for name in code_names}


def load_qonnx(path: str | os.PathLike[str]):
    """The saved QONNX model as a ``ModelWrapper``."""
    from qonnx.core.modelwrapper import ModelWrapper

    return ModelWrapper(onnx.load(os.fspath(path)))
