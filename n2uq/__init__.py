"""N2UQ: Nonuniform-to-Uniform Quantization (CVPR 2022) for PyTorch.

``n2uq.LTQ``, ``n2uq.HardQuantizeConv`` and ``n2uq.PACT`` are the quantizer modules to build
networks with: the definitions of :mod:`n2uq.quant` (same arguments, state dict and values) running
the fast operators of :mod:`n2uq.kernels` (:mod:`n2uq.kernels.modules`), or the definitions
themselves under ``N2UQ_KERNELS=reference``; ``n2uq.LearnableBias`` (one add) is the definition.
The paper's definitions are in :mod:`n2uq.quant`; the compared methods (LSQ, PACT, DoReFa-Net) in
:mod:`n2uq.baselines`.
"""

from n2uq.baselines import dorefa_activation, dorefa_weight, lsq_quantize, pact_quantize
from n2uq.kernels.modules import LTQ, PACT, HardQuantizeConv
from n2uq.quant import LearnableBias

__version__ = "0.1.0"
__all__ = ["LTQ", "HardQuantizeConv", "PACT", "LearnableBias", "lsq_quantize", "pact_quantize", "dorefa_weight",
           "dorefa_activation", "__version__"]
