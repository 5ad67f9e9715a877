"""Building blocks of the integer export: threshold search, bit packing, the packed format."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from n2uq.export.packing import load_packed, pack_bits, unpack_bits
from n2uq.export.streamline import (
    float32_from_key,
    float_thresholds,
    integer_thresholds,
    ltq_count,
    pact_code,
    rprelu_ltq_chain,
)
from n2uq.quant import LTQ


def _count_ge(u: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """``#{j : u[c, i] >= T[c, j]}`` for ``u [C, K]``."""
    return (u.unsqueeze(-1) >= thresholds.unsqueeze(1)).sum(-1)


def _ltq_chain_fn(channels: int, seed: int, scale1_sign: float = 1.0, acc: bool = False):
    gen = torch.Generator().manual_seed(seed)
    ltq = LTQ(3)
    with torch.no_grad():
        ltq.start.fill_(-0.4)
        ltq.a.copy_(ltq.interval * (0.3 + 1.4 * torch.rand(ltq.a.shape, generator=gen)))
        ltq.a[2] = 1e-4  # below eps: the clamp a⁺ = eps applies
    dt = torch.float64 if acc else torch.float32
    b1 = (0.3 * torch.randn(1, channels, 1, generator=gen)).to(dt)
    w = torch.rand(channels, generator=gen).to(dt)  # >= 0: monotone
    b2 = (0.3 * torch.randn(1, channels, 1, generator=gen)).to(dt)
    alpha = (0.05 * torch.randn(1, channels, 1, generator=gen)).to(dt)
    beta = (0.3 * torch.randn(1, channels, 1, generator=gen)).to(dt)
    scale1 = torch.tensor([1.7 * scale1_sign], dtype=dt)
    t = ltq.thresholds()
    direction = torch.where(alpha * scale1 < 0, -1.0, 1.0).to(dt) if acc else torch.sign(scale1).to(dt)

    def code(x):  # the chain on the *input* (before the direction)
        v = x * alpha + beta if acc else x
        return ltq_count(rprelu_ltq_chain(v, b1, w, b2, scale1), t)

    return code, direction, ltq.n_val


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_float_thresholds_reproduce_the_float32_chain_exactly(sign):
    channels = 6
    code, direction, n = _ltq_chain_fn(channels, seed=0, scale1_sign=sign)
    thresholds = float_thresholds(lambda u: code(u * direction.view(1, -1, 1)), channels, n)
    assert thresholds.dtype == torch.float32 and bool((thresholds.diff(dim=1) >= 0).all())
    # Random inputs plus the float32 neighbours of every threshold (the hardest points).
    u = torch.cat([torch.randn(channels, 5000) * 2, thresholds,
                   torch.nextafter(thresholds, torch.tensor(-np.inf)),
                   torch.nextafter(thresholds, torch.tensor(np.inf))], dim=1)
    u = u[:, torch.isfinite(u).all(0)]
    expected = code((u * direction.view(-1, 1)).unsqueeze(0))[0]
    assert torch.equal(_count_ge(u, thresholds), expected)


def test_integer_thresholds_reproduce_the_chain_on_every_integer():
    channels, bound = 5, 400
    code, direction, n = _ltq_chain_fn(channels, seed=1, acc=True)
    thresholds = integer_thresholds(lambda u: code(u * direction.view(1, -1, 1)), channels, n, bound)
    u = torch.arange(-bound, bound + 1, dtype=torch.float64).expand(channels, -1)
    expected = code((u * direction.view(-1, 1)).unsqueeze(0))[0]
    assert torch.equal(_count_ge(u, thresholds.to(torch.float64)), expected)


def test_pact_thresholds_follow_round_half_to_even():
    clip, n, channels, bound = torch.tensor(2.0, dtype=torch.float64), 15, 3, 300
    alpha = torch.tensor([0.01, 0.0075, 1 / 120], dtype=torch.float64).view(1, -1, 1)

    def code(u):
        return pact_code(u * alpha, clip, n)

    thresholds = integer_thresholds(code, channels, n, bound)
    u = torch.arange(-bound, bound + 1, dtype=torch.float64).expand(channels, -1)
    assert torch.equal(_count_ge(u, thresholds.to(torch.float64)), code(u.unsqueeze(0))[0].long())


def test_float_keys_are_ordered():
    keys = torch.arange(-(2**31) + 2**23, 2**31 - 2**23, 2**20 + 7, dtype=torch.int64)
    keys = keys[(keys >= -0x7F800001) & (keys <= 0x7F800000)]
    values = float32_from_key(keys)
    assert bool((values.diff() >= 0).all())
    assert float(float32_from_key(torch.tensor([0]))) == 0.0
    assert float(float32_from_key(torch.tensor([0x7F800000]))) == np.inf


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_bits_round_trip(bits):
    values = np.random.default_rng(bits).integers(0, 2**bits, size=1003)
    data = pack_bits(values, bits)
    assert len(data) == (1003 * bits + 7) // 8
    assert np.array_equal(unpack_bits(data, bits, 1003), values)


def test_pack_bits_rejects_values_too_wide():
    with pytest.raises(ValueError, match="does not fit"):
        pack_bits(np.array([4]), 2)


def test_load_packed_rejects_other_files(tmp_path):
    bad = tmp_path / "x.n2uq"
    bad.write_bytes(b"not a packed file at all")
    with pytest.raises(ValueError, match="bad magic"):
        load_packed(bad)
