"""N2UQ: Nonuniform-to-Uniform Quantization (CVPR 2022) for PyTorch.

The quantizers as the paper defines them are in :mod:`n2uq.quant`; the compared methods (LSQ,
PACT, DoReFa-Net) in :mod:`n2uq.baselines`; fast implementations in :mod:`n2uq.kernels`.
"""

from n2uq.baselines import dorefa_activation, dorefa_weight, lsq_quantize, pact_quantize
from n2uq.quant import LTQ, PACT, HardQuantizeConv, LearnableBias

__version__ = "0.1.0"
__all__ = ["LTQ", "HardQuantizeConv", "PACT", "LearnableBias", "lsq_quantize", "pact_quantize", "dorefa_weight",
           "dorefa_activation", "__version__"]
