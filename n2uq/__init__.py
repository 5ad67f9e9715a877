"""N2UQ: Nonuniform-to-Uniform Quantization (CVPR 2022) for PyTorch."""

from n2uq.quant import LTQ, PACT, HardQuantizeConv, LearnableBias

__version__ = "0.1.0"
__all__ = ["LTQ", "HardQuantizeConv", "PACT", "LearnableBias", "__version__"]
