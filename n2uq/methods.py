"""Which quantizers a model is built with: N2UQ (the default), its ablations, or a compared method.

The paper compares N2UQ with PACT, DoReFa-Net and LSQ; here they differ from N2UQ in the
quantizers only. :class:`Quantizers` makes, for every quantized stage of a block, the activation
quantizer (``quan{i}``, in place of :class:`~n2uq.quant.LTQ`) and the quantized convolution
(``conv{i}``, in place of :class:`~n2uq.quant.HardQuantizeConv`); the skeleton around them — RPReLU,
BatchNorm, full-precision first conv and classifier, the downsample choice — is the same for all.

========== ========================================== =======================================
method     activations (``quan{i}``)                  weights (``conv{i}``)
========== ========================================== =======================================
``n2uq``   :class:`~n2uq.LTQ`                         :class:`~n2uq.HardQuantizeConv`
``lsq``    :class:`~n2uq.baselines.LSQActivation`     :class:`~n2uq.baselines.LSQConv`
``pact``   :class:`~n2uq.baselines.PACTActivation`    :class:`~n2uq.baselines.DoReFaConv`
``dorefa`` :class:`~n2uq.baselines.DoReFaActivation`  :class:`~n2uq.baselines.DoReFaConv`
========== ========================================== =======================================

``n2uq.LTQ`` and ``n2uq.HardQuantizeConv`` (:mod:`n2uq.kernels.modules`) are the definitions of
:mod:`n2uq.quant` running the fast operators (the definitions under ``N2UQ_KERNELS=reference``):
the same state dict and values, so a quantizer taken out of a model is as fast as inside it.

N2UQ's ablations: ``learned_thresholds=False`` freezes every LTQ's interval lengths ``a`` at the
uniform grid (uniform thresholds, uniform levels; ``start`` and the scales still learn), and
``entropy_preserving=False`` scales the weights by ``max|W|`` (:class:`~n2uq.quant.MaxAbsQuantizeConv`).
``full_lr_thresholds=True`` is a variant of the recipe rather than of the quantizer: every LTQ's
interval lengths ``a`` train at the full lr instead of the reference's lr/10 (the LTQ is marked,
:data:`FULL_LR_MARK`, and :func:`n2uq.recipe.split_parameters` reads the mark), so the method tag,
the run folder and the checkpoint's ``config['quantizers']`` record it like the ablations.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from n2uq.baselines import DoReFaActivation, DoReFaConv, LSQActivation, LSQConv, PACTActivation
from n2uq.bitwidth import check_bits
from n2uq.kernels.modules import LTQ, HardQuantizeConv  # the definitions running the fused operators
from n2uq.quant import MaxAbsQuantizeConv

__all__ = ["METHODS", "FULL_LR_MARK", "Quantizers", "method_tag", "intervals_at_full_lr"]

METHODS = ("n2uq", "lsq", "pact", "dorefa")

#: Attribute set to ``True`` on an LTQ whose interval lengths ``a`` train at the full lr.
FULL_LR_MARK = "intervals_at_full_lr"

_ACTIVATIONS = {"lsq": LSQActivation, "pact": PACTActivation, "dorefa": DoReFaActivation}
_CONVS = {"lsq": LSQConv, "pact": DoReFaConv, "dorefa": DoReFaConv}


def method_tag(method: str, learned_thresholds: bool = True, entropy_preserving: bool = True,
               full_lr_thresholds: bool = False) -> str:
    """``n2uq``, ``lsq``, ``pact``, ``dorefa``, or N2UQ with its ablations (``n2uq-uniform-thresholds``,
    ``n2uq-maxabs-weights``, ``n2uq-full-lr-thresholds``, joined when several): the name used in run
    folders, checkpoints and tables."""
    parts = [method]
    if not learned_thresholds:
        parts.append("uniform-thresholds")
    if not entropy_preserving:
        parts.append("maxabs-weights")
    if full_lr_thresholds:
        parts.append("full-lr-thresholds")
    return "-".join(parts)


def intervals_at_full_lr(module: nn.Module) -> bool:
    """Whether ``module`` is an LTQ built by :attr:`Quantizers.full_lr_thresholds` (its ``a`` at the full lr)."""
    return isinstance(module, LTQ) and bool(getattr(module, FULL_LR_MARK, False))


@dataclass(frozen=True)
class Quantizers:
    """The quantizers of every stage: ``n_bit`` bits, ``method``, N2UQ's two ablation switches and
    ``full_lr_thresholds`` (the interval lengths ``a`` at the full lr, a departure from the reference)."""

    n_bit: int = 2
    method: str = "n2uq"
    learned_thresholds: bool = True
    entropy_preserving: bool = True
    full_lr_thresholds: bool = False

    def __post_init__(self) -> None:
        check_bits(self.n_bit, "Quantizers")
        if self.method not in METHODS:
            raise ValueError(f"unknown quantization method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.method != "n2uq" and not (self.learned_thresholds and self.entropy_preserving
                                          and not self.full_lr_thresholds):
            raise ValueError(f"the full-lr-threshold variant and the uniform-threshold and max-abs-weight ablations "
                             f"are N2UQ's; they do not apply to {self.method}")
        if self.full_lr_thresholds and not self.learned_thresholds:
            raise ValueError("full_lr_thresholds needs learned thresholds: frozen interval lengths have no lr")
        if self.method == "lsq" and self.n_bit < 2:
            raise ValueError("LSQ needs at least 2 bits (its signed 1-bit weight grid is empty)")
        if self.method == "pact" and self.n_bit < 2:  # docs/training.md: why 1-bit PACT cannot train
            raise ValueError("PACT needs at least 2 bits (at 1 bit every activation below alpha/2 = 5 quantizes to 0)")

    @property
    def is_default(self) -> bool:
        """Plain N2UQ: the paper's method, whose run folders and checkpoints keep the names of the authors' code."""
        return self == Quantizers(self.n_bit)

    @property
    def tag(self) -> str:
        """``n2uq``, ``lsq``, ``pact``, ``dorefa``, or N2UQ with its ablations, e.g.
        ``n2uq-uniform-thresholds`` / ``n2uq-maxabs-weights``: the name used in run folders and tables."""
        return method_tag(self.method, self.learned_thresholds, self.entropy_preserving, self.full_lr_thresholds)

    def activation(self) -> nn.Module:
        """The activation quantizer of one stage (``quan{i}``)."""
        if self.method != "n2uq":
            return _ACTIVATIONS[self.method](self.n_bit)
        ltq = LTQ(self.n_bit)
        if not self.learned_thresholds:
            ltq.a.requires_grad_(False)  # a stays at the uniform interval: uniform thresholds
        if self.full_lr_thresholds:
            setattr(ltq, FULL_LR_MARK, True)  # n2uq.recipe puts this a in the full-lr group
        return ltq

    def conv(self, in_chn: int, out_chn: int, kernel_size: int, stride: int = 1, padding: int = 0,
             groups: int = 1) -> nn.Module:
        """The quantized convolution of one stage (``conv{i}``)."""
        if self.method != "n2uq":
            return _CONVS[self.method](in_chn, out_chn, self.n_bit, kernel_size, stride, padding, groups)
        kind = HardQuantizeConv if self.entropy_preserving else MaxAbsQuantizeConv
        return kind(in_chn, out_chn, self.n_bit, kernel_size, stride, padding, groups)

    def as_dict(self) -> dict:
        """What a checkpoint records (``config['quantizers']``)."""
        return asdict(self)
