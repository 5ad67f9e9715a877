"""Fast implementations of the N2UQ quantizers, behind one seam.

The definitions live in :mod:`n2uq.quant`; everything here computes the same values faster and
is chosen in one place, :mod:`n2uq.kernels.select` (``N2UQ_KERNELS=auto|torch|c|triton|reference``):

* :mod:`~n2uq.kernels.modules` — ``n2uq.LTQ``, ``n2uq.HardQuantizeConv``, ``n2uq.PACT``: the
  definitions' modules whose forward runs the operators below;
* :mod:`~n2uq.kernels.fused` — what the blocks call: :func:`quant_stage` (``RPReLU → LTQ →
  HardQuantizeConv``), :func:`rprelu` (block output with its residual), :func:`ltq` (a plain LTQ);
* :mod:`~n2uq.kernels.ltq_op`, :mod:`~n2uq.kernels.block_ops` — the fused operators as
  ``torch.library`` custom ops (``torch.compile`` traces through them whole);
* the implementations of those operators, one interface: :mod:`~n2uq.kernels.cpu` (C/OpenMP,
  built on first use), :mod:`~n2uq.kernels.triton_ops` (CUDA), :mod:`~n2uq.kernels.torch_ops`
  (plain PyTorch), which compute the elementwise part and G-STE's sums (:class:`n2uq.quant.GSTESums`);
  :mod:`~n2uq.kernels.ltq_state` for LTQ's small per-call vectors, from the definitions' formulas.

Model code never sees which implementation runs: it calls :func:`quant_stage` and :func:`rprelu`
(through :mod:`n2uq.blocks`), and with ``reference`` those run the modules one by one.
"""

from n2uq.kernels.fused import ltq, quant_stage, rprelu
from n2uq.kernels.select import (
    BACKENDS,
    KernelUnavailableError,
    get_backend,
    implementation,
    set_backend,
    use_backend,
)

__all__ = ["BACKENDS", "KernelUnavailableError", "get_backend", "set_backend", "use_backend", "implementation",
           "quant_stage", "rprelu", "ltq"]
