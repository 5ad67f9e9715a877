"""Compact file for the integer model: weight codes bit-packed at ``b`` bits, everything else raw.

Layout (little-endian)::

    b"N2UQPACK" | uint32 version | uint32 header length | header (UTF-8 JSON) | data

The header lists the ops of the :class:`~n2uq.export.integer_model.IntegerModel` (type, name, inputs,
output, attributes) and, for each of their tensors, dtype, shape, byte offset and length in the
data section, and an encoding:

* ``odd-codes``: weight codes ``k ∈ {-n, -n+2, …, n}`` (``n = 2^b - 1``) stored as the level
  ``(k + n) / 2 ∈ 0..n`` in ``b`` bits each, packed LSB first (``numpy.packbits`` little);
* ``raw``: the tensor's bytes (per-channel thresholds, affine factors, float layers).

:func:`load_packed` rebuilds the same integer model; a round trip returns identical tensors.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch

from n2uq.export.integer_model import OP_TYPES, IntegerModel
from n2uq.export.integer_ops import IntConv

__all__ = ["pack_bits", "unpack_bits", "save_packed", "load_packed", "PackStats", "size_table"]

MAGIC = b"N2UQPACK"
VERSION = 1
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "int8": torch.int8, "int16": torch.int16,
           "int32": torch.int32, "int64": torch.int64, "uint8": torch.uint8, "bool": torch.bool}
_NAMES = {v: k for k, v in _DTYPES.items()}


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Pack unsigned integers ``< 2^bits`` into ``ceil(len·bits / 8)`` bytes, LSB first."""
    v = np.asarray(values, dtype=np.uint16).reshape(-1)
    if v.size and int(v.max()) >= 2**bits:
        raise ValueError(f"value {int(v.max())} does not fit in {bits} bits")
    planes = ((v[:, None] >> np.arange(bits, dtype=np.uint16)) & 1).astype(np.uint8)
    return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


def unpack_bits(data: bytes, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` unsigned integers (uint16)."""
    flat = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=count * bits, bitorder="little")
    planes = flat.reshape(count, bits).astype(np.uint16)
    return (planes << np.arange(bits, dtype=np.uint16)).sum(axis=1).astype(np.uint16)


@dataclass
class PackStats:
    """Bytes in the packed file: bit-packed weight codes, other tensors, header."""

    code_bytes: int = 0
    code_count: int = 0
    other_bytes: int = 0
    header_bytes: int = 0
    file_bytes: int = 0
    bits: Dict[str, int] = field(default_factory=dict)  # weight bits per IntConv


def _encode(op_name: str, key: str, t: torch.Tensor, op, offset: int) -> Tuple[dict, bytes]:
    t = t.detach().cpu().contiguous()
    entry = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "offset": offset}
    if isinstance(op, IntConv) and key == "weight":
        n = 2**op.weight_bits - 1
        k = t.to(torch.int64).numpy()
        if ((k + n) % 2).any() or np.abs(k).max(initial=0) > n:
            raise ValueError(f"{op_name}: weight codes are not odd integers in [-{n}, {n}]")
        data = pack_bits((k + n) // 2, op.weight_bits)
        entry.update(encoding="odd-codes", bits=op.weight_bits)
    else:
        data = t.numpy().tobytes()
        entry["encoding"] = "raw"
    entry["nbytes"] = len(data)
    return entry, data


def save_packed(model: IntegerModel, path: str | os.PathLike[str]) -> PackStats:
    """Write ``model`` to ``path``; returns the byte counts for the size table."""
    stats = PackStats()
    chunks: List[bytes] = []
    offset = 0
    ops = []
    for op in model.ops:
        tensors = {}
        for key, t in op.tensors().items():
            entry, data = _encode(op.name, key, t, op, offset)
            tensors[key] = entry
            chunks.append(data)
            offset += len(data)
            if entry["encoding"] == "odd-codes":
                stats.code_bytes += len(data)
                stats.code_count += t.numel()
                stats.bits[op.name] = op.weight_bits
            else:
                stats.other_bytes += len(data)
        ops.append({"type": type(op).__name__, "name": op.name, "inputs": list(op.inputs),
                    "output": op.output, "attrs": op.attrs(), "tensors": tensors})
    header = json.dumps({"format": "n2uq-integer", "version": VERSION, "meta": model.meta,
                         "input": model.input_name, "output": model.output_name, "ops": ops}).encode()
    stats.header_bytes = len(MAGIC) + 8 + len(header)
    with open(path, "wb") as f:
        f.write(MAGIC + struct.pack("<II", VERSION, len(header)) + header)
        for data in chunks:
            f.write(data)
    stats.file_bytes = os.path.getsize(path)
    return stats


def load_packed(path: str | os.PathLike[str]) -> IntegerModel:
    """Read a file written by :func:`save_packed` back into an :class:`IntegerModel`."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:8] != MAGIC or len(raw) < 16:
        raise ValueError(f"{path} is not an n2uq packed integer model (bad magic)")
    version, header_len = struct.unpack("<II", raw[8:16])
    if version != VERSION:
        raise ValueError(f"{path}: packed format version {version}, this code reads {VERSION}")
    header = json.loads(raw[16:16 + header_len].decode())
    data = memoryview(raw)[16 + header_len:]
    ops = []
    for spec in header["ops"]:
        tensors = {}
        for key, e in spec["tensors"].items():
            chunk = bytes(data[e["offset"]:e["offset"] + e["nbytes"]])
            if len(chunk) != e["nbytes"]:
                raise ValueError(f"{path} is truncated (tensor {spec['name']}.{key})")
            count = int(np.prod(e["shape"], dtype=np.int64))
            if e["encoding"] == "odd-codes":
                n = 2 ** e["bits"] - 1
                levels = unpack_bits(chunk, e["bits"], count).astype(np.int64)
                t = torch.from_numpy(2 * levels - n).to(_DTYPES[e["dtype"]])
            else:
                np_dtype = torch.empty((), dtype=_DTYPES[e["dtype"]]).numpy().dtype
                t = torch.from_numpy(np.frombuffer(chunk, dtype=np_dtype).copy())
            tensors[key] = t.reshape(e["shape"])
        op_type = OP_TYPES[spec["type"]]
        ops.append(op_type.from_saved(spec["name"], spec["inputs"], spec["output"], spec["attrs"], tensors))
    return IntegerModel(ops, header["input"], header["output"], header.get("meta"))


def size_table(state_dict: Mapping[str, torch.Tensor], stats: PackStats,
               checkpoint_bytes: Optional[int] = None) -> str:
    """Text table: the fp32 model (quantized-conv weights vs the rest) against the packed file."""
    mb = lambda b: f"{b / 1e6:10.3f}"
    q_fp32 = other_fp32 = 0
    for key, t in state_dict.items():
        if not torch.is_floating_point(t):
            continue
        if key.endswith(".weight") and t.dim() == 4 and key.rsplit(".", 1)[0] + ".clip_val" in state_dict:
            q_fp32 += t.numel() * 4
        else:
            other_fp32 += t.numel() * 4
    bits = sorted(set(stats.bits.values()))
    rows = [
        ("", "fp32 MB", "packed MB"),
        (f"quantized conv weights ({'/'.join(map(str, bits))}-bit codes)", mb(q_fp32), mb(stats.code_bytes)),
        ("everything else (FP layers, thresholds, scales)", mb(other_fp32), mb(stats.other_bytes)),
        ("header", "", mb(stats.header_bytes)),
        ("total", mb(q_fp32 + other_fp32), mb(stats.file_bytes)),
    ]
    lines = [f"{a:<52}{b:>12}{c:>12}" for a, b, c in rows]
    ratio = (q_fp32 + other_fp32) / max(stats.file_bytes, 1)
    lines.append(f"compression {ratio:.1f}x vs the fp32 weights")
    if checkpoint_bytes is not None:
        lines.append(f"checkpoint file on disk: {checkpoint_bytes / 1e6:.3f} MB")
    return "\n".join(lines)
