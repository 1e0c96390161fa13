"""The packed layout: bit-exact round trips, the interleave, the tensor table and the reference decoder."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmq.runtime.format import layout as L


@given(bits=st.sampled_from([2, 4]), rows=st.integers(1, 5), words=st.integers(1, 6), seed=st.integers(0, 2**31))
def test_pack_unpack_round_trip_is_bit_exact(bits, rows, words, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, words * L.codes_per_word(bits)), generator=gen)
    packed = L.pack_codes(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (rows, words)
    assert torch.equal(L.unpack_codes(packed, bits), codes)


@pytest.mark.parametrize("bits", [2, 4])
def test_half_interleave_puts_even_codes_low_and_odd_codes_high(bits):
    per_word = L.codes_per_word(bits)
    for i in range(per_word):
        codes = torch.zeros(1, per_word, dtype=torch.long)
        codes[0, i] = 1
        word = int(L.pack_codes(codes, bits)[0, 0]) & 0xFFFFFFFF
        expected_bit = (i // 2) * bits + (16 if i % 2 else 0)
        assert word == 1 << expected_bit


def test_golden_words():
    """Fixed bytes for fixed codes: any change to the bit order breaks this on purpose."""
    codes2 = torch.arange(16).remainder(4).reshape(1, 16)
    codes4 = torch.arange(8).reshape(1, 8) * 2 + 1
    word2 = int(L.pack_codes(codes2, 2)[0, 0]) & 0xFFFFFFFF
    word4 = int(L.pack_codes(codes4, 4)[0, 0]) & 0xFFFFFFFF
    # 2-bit: even codes 0,2,0,2,... in the low half, odd codes 1,3,1,3,... in the high half.
    # 4-bit: even codes 1,5,9,13 in the low half, odd codes 3,7,11,15 in the high half.
    assert (word2, word4) == (0xDDDD8888, 0xFB73D951)


@given(zero=st.integers(0, 3), code=st.integers(0, 63))
def test_meta2_round_trip(zero, code):
    meta = L.pack_meta2(torch.tensor([zero]), torch.tensor([code]))
    assert meta.dtype == torch.uint8
    z, c = L.unpack_meta2(meta)
    assert (int(z), int(c)) == (zero, code)


def _slow_reference(t: dict[str, torch.Tensor], lay: L.LinearLayout) -> torch.Tensor:
    """The formula of runtime/format/layout.py's docstring, one weight at a time, in float64."""
    w = torch.zeros(lay.out_features, lay.in_features, dtype=torch.float64)
    q2 = L.unpack_codes(t["qweight2"], 2) if lay.k2 else None
    q4 = L.unpack_codes(t["qweight4"], 4) if lay.k4 else None
    for r in range(lay.out_features):
        for c in range(lay.in_features):
            channel = int(t["perm"][c])
            if c < lay.k2:
                j, b = c // lay.g1, c // lay.g1 // lay.g2
                meta = int(t["meta2"][r, j])
                zero, code = meta & 3, meta >> 2
                scale = float(t["scale2"][r, b]) * (code + int(t["szero2"][r, b]))
                w[r, channel] = scale * (int(q2[r, c]) - zero)
            else:
                c4 = c - lay.k2
                j = c4 // lay.g4
                w[r, channel] = float(t["scale4"][r, j]) * (int(q4[r, c4]) - int(t["zero4"][r, j]))
    return w


@pytest.mark.parametrize(
    "shape_k4",
    [((3, 48), 0), ((2, 40), 16), ((4, 100), 32), ((1, 64), 64), ((5, 17), 8)],
)
def test_reference_decoder_matches_the_formula(shape_k4):
    (n, k), k4 = shape_k4
    lay = L.LinearLayout(n, k, k4, g1=16, g2=2, g4=8, scale_bits=6)
    assert lay.check() == []
    t = L.random_packed(lay)
    assert {name: (v.dtype, tuple(v.shape)) for name, v in t.items()} == lay.tensor_specs()
    decoded = L.dequantize(t, lay)
    assert decoded.dtype == torch.float32 and decoded.shape == (n, k)
    torch.testing.assert_close(decoded.double(), _slow_reference(t, lay), rtol=1e-6, atol=1e-9)


def test_outliers_are_added_to_the_2bit_weight():
    lay = L.LinearLayout(3, 32, 0, g1=16, g2=2, g4=8, scale_bits=6, n_outliers=2)
    t = L.random_packed(lay)
    base = L.dequantize(t, L.LinearLayout(3, 32, 0, 16, 2, 8, 6))
    t.update(
        outlier_rowptr=torch.tensor([0, 1, 1, 2], dtype=torch.int32),
        outlier_col=torch.tensor([5, 31], dtype=torch.int32),
        outlier_val=torch.tensor([0.5, -0.25], dtype=torch.float16),
    )
    decoded = L.dequantize(t, lay)
    perm = t["perm"].long()
    expected = base.clone()
    expected[0, perm[5]] += 0.5
    expected[2, perm[31]] -= 0.25
    assert torch.equal(decoded, expected)


def test_stored_bits_count_every_byte():
    lay = L.LinearLayout(192, 576, 64, g1=32, g2=8, g4=64, scale_bits=6, n_outliers=10)
    specs = lay.tensor_specs()
    by_hand = (
        576 * 32  # perm
        + 192 * 512 * 2  # 2-bit codes
        + 192 * 16 * 8  # meta bytes
        + 192 * 2 * (16 + 8)  # second-order fp16 scale + zero byte per block of 8 groups
        + 192 * 64 * 4  # 4-bit codes
        + 192 * 1 * (16 + 8)  # 4-bit scale + zero byte per group of 64
        + 193 * 32
        + 10 * (32 + 16)  # CSR outliers
    )
    assert lay.stored_bits() == by_hand and len(specs) == 11
    assert lay.bits_per_weight() == pytest.approx(by_hand / (192 * 576))


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"g1": 24}, "g1=24"),
        ({"g4": 12}, "g4=12"),
        ({"k4": 30}, "k4=30"),
        ({"scale_bits": 7}, "scale_bits=7"),
        ({"out_features": 0}, "empty"),
        ({"n_outliers": 10**9}, "n_outliers"),
    ],
)
def test_invalid_layouts_are_reported(kwargs, fragment):
    base = {"out_features": 4, "in_features": 64, "k4": 32, "g1": 16, "g2": 2, "g4": 16, "scale_bits": 6}
    problems = L.LinearLayout(**{**base, **kwargs}).check()
    assert any(fragment in p for p in problems), problems


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 6), k=st.integers(1, 200), frac=st.floats(0, 1), seed=st.integers(0, 1000))
def test_quantize_then_decode_has_the_planned_layout(n, k, frac, seed):
    from llmq.quant.config import QuantConfig
    from llmq.quant.linear import quantize_weight

    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    layout, tensors = quantize_weight("w", w, QuantConfig(g1=16, g4=16, stripe_fraction=frac))
    assert {name: (v.dtype, tuple(v.shape)) for name, v in tensors.items()} == layout.tensor_specs()
    decoded = L.dequantize(tensors, layout)
    assert decoded.shape == (n, k) and torch.isfinite(decoded).all()
    assert float((decoded - w).norm()) <= float(w.norm()) + 1e-6  # never worse than all zeros
