"""Build and call the C kernels of ``cpu_kernels.c`` (CPU fast path of LTQ and the RPReLU chain).

The source is plain C with OpenMP and no PyTorch headers, compiled on first use with the system C
compiler (``$CC``, default ``cc``; ``-march`` from ``$N2UQ_CPU_ARCH``, default ``native``) into
``$N2UQ_KERNEL_CACHE`` (default ``~/.cache/n2uq``) and loaded
with :mod:`ctypes`. It links the same ``libgomp.so.1`` that PyTorch already loaded, so both share one
thread pool. When no compiler is present :func:`library` returns ``None`` (with one warning) and
callers use the plain PyTorch path, which computes the same values.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from n2uq.kernels.layout import memory_order
from n2uq.kernels.op_utils import ChainSums, LTQSums, chain_sums_from_buffer, ltq_sums_from_buffer

__all__ = ["library", "available", "build_error", "supports", "ltq_forward", "ltq_backward", "rprelu_forward",
           "rprelu_backward", "decode", "weight_ste", "FLAGS"]

_SOURCE = Path(__file__).with_name("cpu_kernels.c")
#: The headers beside it that it includes (its building blocks): part of the cache key, like the source.
_HEADERS = tuple(sorted(p.name for p in _SOURCE.parent.glob("cpu_kernels*.h")))
#: -ffp-contract=off keeps every multiply and add separately rounded, as PyTorch's kernels do.
#: ``N2UQ_CPU_ARCH`` replaces ``-march=native`` (e.g. ``x86-64-v3`` for a cache shared by machines).
FLAGS = ["-O3", f"-march={os.environ.get('N2UQ_CPU_ARCH', 'native')}", "-ffp-contract=off", "-fno-fast-math",
         "-Wno-psabi", "-fopenmp", "-fPIC", "-shared"]

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_tried = False
_error = ""

_i64, _int, _dbl = ctypes.c_int64, ctypes.c_int, ctypes.c_double
_vp = ctypes.c_void_p


def _cpu_signature() -> str:
    """Identifies the instruction set the library is built for (``-march=native``)."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    return platform.machine() + flags


def _build(cache_dir: Path) -> Path:
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise RuntimeError(f"C compiler {cc!r} not found")
    sources = b"".join(path.read_bytes() for path in (_SOURCE, *(_SOURCE.with_name(h) for h in _HEADERS)))
    key = hashlib.sha256(sources + " ".join([cc, *FLAGS]).encode() + _cpu_signature().encode())
    target = cache_dir / f"n2uq_cpu_{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache_dir)
    os.close(fd)
    try:
        subprocess.run([cc, *FLAGS, str(_SOURCE), "-o", tmp], check=True, capture_output=True, text=True)
        os.replace(tmp, target)  # atomic: concurrent builders never see a half-written file
    except subprocess.CalledProcessError as err:
        raise RuntimeError(f"compiling {_SOURCE.name} failed:\n{err.stderr}") from err
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _declare(lib: ctypes.CDLL) -> None:
    for sfx, real in (("f32", ctypes.c_float), ("f64", ctypes.c_double)):
        getattr(lib, f"ltq_forward_{sfx}").argtypes = [
            _vp, _vp, _vp, _i64, _i64, _i64, _vp, _vp, _vp, real, _vp, _int, _vp, _int]
        getattr(lib, f"ltq_backward_{sfx}").argtypes = [
            _vp, _vp, _vp, _i64, _i64, _i64, _vp, _vp, _vp, real, real, _vp, _vp, _vp, _vp, _int, _vp, _int]
        getattr(lib, f"rprelu_forward_{sfx}").argtypes = [
            _vp, _vp, _vp, _vp, _i64, _i64, _i64, _vp, _vp, _vp, _int]
        getattr(lib, f"rprelu_backward_{sfx}").argtypes = [_vp, _vp, _vp, _i64, _i64, _i64, _vp, _vp, _int]
        getattr(lib, f"decode_{sfx}").argtypes = [_vp, _vp, _i64, _vp, _int]
        for name in ("ltq_forward", "ltq_backward", "rprelu_forward", "rprelu_backward", "decode"):
            getattr(lib, f"{name}_{sfx}").restype = None
    lib.weight_ste_f32.argtypes = [_vp, _vp, _vp, _i64, _i64, ctypes.c_float, ctypes.c_float, _int]
    lib.weight_ste_f32.restype = None


def library() -> Optional[ctypes.CDLL]:
    """The loaded kernel library, building it on first call; ``None`` if it cannot be built."""
    global _lib, _tried, _error
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        _tried = True
        cache = Path(os.environ.get("N2UQ_KERNEL_CACHE", Path.home() / ".cache" / "n2uq"))
        try:
            lib = ctypes.CDLL(str(_build(cache)))
            _declare(lib)
            _lib = lib
        except (OSError, RuntimeError) as err:
            _error = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            warnings.warn(f"n2uq: CPU kernels unavailable, using the plain PyTorch path ({err})", stacklevel=2)
    return _lib


def available() -> bool:
    return library() is not None


def build_error() -> str:
    """Why the library could not be built or loaded (empty when it was)."""
    library()
    return _error


def supports(x: Tensor, dtype: torch.dtype) -> bool:
    """Whether these kernels handle ``x`` computed in ``dtype`` (CPU, float32/64, same dtype, not empty:
    an empty tensor takes plain PyTorch, which has nothing to compute either)."""
    return (x.device.type == "cpu" and x.dtype == dtype and dtype in (torch.float32, torch.float64)
            and x.numel() > 0 and available())


# ---------------------------------------------------------------------------------------------
# Thin wrappers: prepared LTQ tensors in, results out. `chain` is (bias1, prelu_weight, bias2) as
# contiguous [C] vectors of the input dtype, or None for a plain LTQ.
# ---------------------------------------------------------------------------------------------


def _ptr(t: Optional[Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _fn(name: str, dtype: torch.dtype):
    return getattr(library(), f"{name}_{'f32' if dtype == torch.float32 else 'f64'}")


def _planes(x: Tensor, per_channel: bool) -> tuple[int, int, int]:
    """(planes, plane size, channels) of a contiguous tensor; a plain LTQ is one flat plane."""
    if not per_channel:
        return 1, x.numel(), 1
    channels = x.shape[1]
    planes = x.shape[0] * channels
    return planes, x.numel() // max(planes, 1), channels


def _threads() -> int:
    return torch.get_num_threads()


def _dense(x: Tensor, chain) -> Tensor:
    """``x`` as the kernels read it: a plain LTQ is elementwise, so any dense layout (channels_last
    included) is used in place; the RPReLU chain indexes channels by NCHW planes, so a tensor in
    another layout is copied to NCHW first (channels_last on CPU is not a fast path)."""
    if chain is None and (x.is_contiguous() or memory_order(x) is not None):
        return x
    return x.contiguous()


def _like(t: Tensor, x: Tensor) -> Tensor:
    """``t`` with the strides of the dense tensor ``x`` (the kernels walk both in one order)."""
    return t if t.stride() == x.stride() else torch.empty_like(x).copy_(t)


def ltq_forward(x: Tensor, chain, scale1: Tensor, thresholds: Tensor, table: Tensor, want_codes: bool,
                out_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Optional[Tensor]]:
    """``y = table[m]`` with ``m`` the LTQ code of ``scale1·chain(x)``; also the uint8 codes if asked.

    Outputs have the layout of the (dense) input; ``y`` is cast to ``out_dtype`` if given."""
    x = _dense(x, chain)
    y = torch.empty_like(x)
    codes = torch.empty_like(x, dtype=torch.uint8) if want_codes else None
    planes, hw, channels = _planes(x, chain is not None)
    b1, w, b2 = chain if chain is not None else (None, None, None)
    _fn("ltq_forward", x.dtype)(x.data_ptr(), y.data_ptr(), _ptr(codes), planes, hw, channels, _ptr(b1), _ptr(w),
                                _ptr(b2), float(scale1), thresholds.data_ptr(), thresholds.numel(),
                                table.data_ptr(), _threads())
    return (y if out_dtype is None else y.to(out_dtype)), codes


def ltq_backward(x: Tensor, grad: Tensor, chain, scale1: Tensor, scale2: Tensor, thresholds: Tensor,
                 levels: Tensor, breakpoints: Tensor, slope: Tensor) -> tuple[Tensor, LTQSums]:
    """Input gradient and the sums G-STE needs (see :mod:`n2uq.kernels.torch_ops`), named."""
    x = _dense(x, chain)
    grad = _like(grad, x)
    gx = torch.empty_like(x)
    planes, hw, channels = _planes(x, chain is not None)
    n = thresholds.numel()
    # a NumPy buffer: G-STE's parameter gradients are then computed from it in NumPy (a few µs
    # instead of a dozen small torch ops; n2uq.quant.gste_param_grads takes either)
    sums = np.empty(2 * n + 2 + (3 * channels if chain is not None else 0), dtype=np.float64)
    b1, w, b2 = chain if chain is not None else (None, None, None)
    _fn("ltq_backward", x.dtype)(x.data_ptr(), grad.data_ptr(), gx.data_ptr(), planes, hw, channels, _ptr(b1),
                                 _ptr(w), _ptr(b2), float(scale1), float(scale2), thresholds.data_ptr(),
                                 levels.data_ptr(),
                                 breakpoints.data_ptr(), slope.data_ptr(), n, sums.ctypes.data, _threads())
    return gx, ltq_sums_from_buffer(sums, n, channels if chain is not None else None)


def rprelu_forward(a: Tensor, residual: Optional[Tensor], chain,
                   want_z: bool = True) -> tuple[Tensor, Optional[Tensor]]:
    """``y = prelu(z, w) + b2`` and, if wanted (for backward), ``z = (a + residual) + b1``."""
    a = a.contiguous()
    residual = residual.contiguous() if residual is not None else None
    y, z = torch.empty_like(a), torch.empty_like(a)
    planes, hw, channels = _planes(a, True)
    b1, w, b2 = chain
    _fn("rprelu_forward", a.dtype)(a.data_ptr(), _ptr(residual), y.data_ptr(), z.data_ptr(), planes, hw,
                                   channels, b1.data_ptr(), w.data_ptr(), b2.data_ptr(), _threads())
    return y, (z if want_z else None)


def rprelu_backward(grad: Tensor, z: Tensor, weight: Tensor) -> tuple[Tensor, ChainSums]:
    """Input gradient and the float64 per-channel sums of the parameters' gradients, named."""
    z, grad = z.contiguous(), grad.contiguous()
    gx = torch.empty_like(z)
    planes, hw, channels = _planes(z, True)
    sums = torch.empty(3 * channels, dtype=torch.float64)
    _fn("rprelu_backward", z.dtype)(grad.data_ptr(), z.data_ptr(), gx.data_ptr(), planes, hw, channels,
                                    weight.data_ptr(), sums.data_ptr(), _threads())
    return gx, chain_sums_from_buffer(sums, channels)


def decode(codes: Tensor, table: Tensor) -> Tensor:
    """``table[codes]`` for uint8 codes (the exact LTQ output), in the layout of dense ``codes``."""
    codes = _dense(codes, None)
    y = torch.empty_like(codes, dtype=table.dtype)
    _fn("decode", table.dtype)(codes.data_ptr(), y.data_ptr(), codes.numel(), table.data_ptr(), _threads())
    return y


def weight_ste(weight: Tensor, scale: Tensor, half: Tensor, steps: Tensor) -> Tensor:
    """Value of HardQuantizeConv's ``(W_q - W_s) + W_s`` (:func:`n2uq.quant.quantize_weight`), float32, one pass."""
    weight, scale = weight.contiguous(), scale.contiguous()
    out = torch.empty_like(weight)
    library().weight_ste_f32(weight.data_ptr(), scale.data_ptr(), out.data_ptr(), weight.shape[0],
                             weight[0].numel(), float(half), float(steps), _threads())
    return out
