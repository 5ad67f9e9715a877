"""The bit width every quantizer takes: one check, one name.

Every quantizer module calls its bit width ``n_bit`` (as :class:`n2uq.quant.LTQ`, the compared
methods, :class:`n2uq.methods.Quantizers` and the ``--n_bit`` flag do). The authors' weight
quantizer and PACT spelled it ``num_bits``; that keyword still works through
:func:`bits_argument`, so constructors written against the authors' code run unchanged.
"""

from __future__ import annotations

from typing import Optional

__all__ = ["MIN_BITS", "MAX_BITS", "check_bits", "bits_argument", "NumBitsAlias"]

#: The bit widths a quantizer takes: 1..8 (``2^b - 1`` thresholds fit a uint8 code).
MIN_BITS, MAX_BITS = 1, 8


def check_bits(value: object, owner: str, low: int = MIN_BITS) -> int:
    """``value`` if it is an integer in ``low..8``; else ``ValueError`` naming ``owner`` and the range.

    ``bool`` is refused although it is an ``int`` (``True`` bits is a mistake, not 1 bit).
    """
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= MAX_BITS:
        raise ValueError(f"{owner}: n_bit must be an integer in {low}..{MAX_BITS}, got {value!r}")
    return value


def bits_argument(owner: str, n_bit: Optional[int], num_bits: Optional[int]) -> int:
    """The bit width given as ``n_bit`` or as the authors' keyword ``num_bits`` (exactly one), checked."""
    if (n_bit is None) == (num_bits is None):
        raise ValueError(f"{owner}: give the bit width once, as n_bit (or the authors' num_bits); "
                         f"got n_bit={n_bit!r}, num_bits={num_bits!r}")
    return check_bits(n_bit if num_bits is None else num_bits, owner)


class NumBitsAlias:
    """Mixin for a module with ``n_bit``: ``.num_bits`` reads it (the authors' attribute name)."""

    n_bit: int

    @property
    def num_bits(self) -> int:
        return self.n_bit
