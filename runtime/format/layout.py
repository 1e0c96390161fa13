"""The packed layout of one quantized Linear: the single source of truth.

The packer (``llmq.quant``), the exact torch decoder (:func:`dequantize`), the artifact
validator and the numpy emulation of the CUDA kernels' index math all read this module; each
``cuda/*.cu`` file refers to it. ``docs/format.md`` describes the same thing in prose.

A weight ``W`` of shape ``[N, K]`` (out, in) is split by input channel:

* ``perm`` (int32 ``[K]``): packed column ``c`` holds original input channel ``perm[c]``. The
  first ``k2`` packed columns are the 2-bit part, the last ``k4`` the 4-bit stripes.
* The 2-bit part, ``[N, k2p]`` with ``k2p = ceil(k2 / g1) * g1`` (columns past ``k2`` are zero
  padding, counted in the bits per weight). Row ``r``, packed column ``c``, group
  ``j = c // g1``, block ``b = j // g2``::

      scale = scale2[r, b] * (qs[r, j] + szero2[r, b])          # second-order decode, fp32
      w     = scale * (q2[r, c] - z2[r, j])

  ``q2`` and ``z2`` are INT2, ``qs`` has ``scale_bits`` bits, ``szero2`` is INT4 and
  ``scale2`` fp16. ``meta2[r, j]`` packs one group: ``z2`` in bits 0-1, ``qs`` in bits 2-7.
* The 4-bit part, ``[N, k4]`` in groups of ``g4``: ``w = scale4[r, j] * (q4[r, c] - zero4[r, j])``
  with INT4 ``q4`` and ``zero4``, fp16 ``scale4``.
* Optional outliers, only inside the 2-bit part, in CSR form: ``outlier_val`` (fp16) is *added*
  to the decoded 2-bit weight at row ``r``, packed column ``outlier_col``.

Codes are packed into little-endian 32-bit words, ``32 / bits`` codes per word, row-major along
the input dimension. Within a word the codes are *half-interleaved*: code ``i`` sits at bit
``(i // 2) * bits`` if ``i`` is even and at ``16 + (i // 2) * bits`` if odd. A GPU thread then
turns codes ``(2m, 2m + 1)`` into a half2 with one shift, one AND and one OR
(``(w >> m * bits) & mask | 0x64006400``), without unpacking bit by bit.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

WORD_BITS = 32
META2_ZERO_BITS = 2
MAX_SCALE_BITS = 8 - META2_ZERO_BITS
INT2_MAX = 3  # largest 2-bit code and 2-bit zero
INT4_MAX = 15  # largest 4-bit code and 4-bit zero
SZERO_MAX = INT4_MAX  # the second-order zero is INT4


def codes_per_word(bits: int) -> int:
    assert bits in (2, 4), bits
    return WORD_BITS // bits


def lane_shifts(bits: int) -> list[int]:
    """Bit offset of code ``i`` inside its word, for ``i`` in ``range(codes_per_word(bits))``."""
    return [(i // 2) * bits + (16 if i % 2 else 0) for i in range(codes_per_word(bits))]


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes ``[..., n]`` (``n`` a multiple of ``32 / bits``) into int32 ``[..., n * bits / 32]``."""
    per_word = codes_per_word(bits)
    assert codes.shape[-1] % per_word == 0, (codes.shape, bits)
    assert codes.numel() == 0 or (int(codes.min()) >= 0 and int(codes.max()) < 1 << bits)
    grouped = codes.to(torch.int64).reshape(*codes.shape[:-1], -1, per_word)
    shifts = torch.tensor(lane_shifts(bits), dtype=torch.int64, device=codes.device)
    words = (grouped << shifts).sum(dim=-1)  # disjoint bit ranges, so sum == bitwise or
    return _to_int32(words)


def unpack_codes(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int32 ``[..., w]`` -> int64 codes ``[..., w * 32 / bits]``."""
    shifts = torch.tensor(lane_shifts(bits), dtype=torch.int64, device=words.device)
    unsigned = words.to(torch.int64) & 0xFFFFFFFF
    codes = (unsigned.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*words.shape[:-1], -1)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Reinterpret uint32 values held in int64 as int32 (two's complement), without overflow."""
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def pack_meta2(zero: torch.Tensor, scale_code: torch.Tensor) -> torch.Tensor:
    """One byte per 2-bit group: INT2 zero in bits 0-1, the first-order scale code above it."""
    return (zero.to(torch.int64) | (scale_code.to(torch.int64) << META2_ZERO_BITS)).to(torch.uint8)


def unpack_meta2(meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_meta2`: ``(zero, scale_code)`` as int64."""
    m = meta.to(torch.int64)
    return m & ((1 << META2_ZERO_BITS) - 1), m >> META2_ZERO_BITS


@dataclass(frozen=True)
class LinearLayout:
    """Every size that fixes the packed tensors of one quantized Linear."""

    out_features: int  # N
    in_features: int  # K
    k4: int  # input channels in 4-bit stripes (a multiple of g4)
    g1: int  # 2-bit group size (a multiple of 16)
    g2: int  # first-order scales per second-order block
    g4: int  # 4-bit group size (a multiple of 8)
    scale_bits: int  # bits of a first-order scale code
    n_outliers: int = 0

    @property
    def k2(self) -> int:
        return self.in_features - self.k4

    @property
    def k2_padded(self) -> int:
        return math.ceil(self.k2 / self.g1) * self.g1

    @property
    def groups2(self) -> int:
        return self.k2_padded // self.g1

    @property
    def blocks2(self) -> int:
        return math.ceil(self.groups2 / self.g2)

    @property
    def groups4(self) -> int:
        return self.k4 // self.g4

    @property
    def words2(self) -> int:
        """32-bit words per row of the 2-bit codes (padding included)."""
        return self.k2_padded // codes_per_word(2)

    @property
    def words4(self) -> int:
        """32-bit words per row of the 4-bit codes."""
        return self.k4 // codes_per_word(4)

    def check(self) -> list[str]:
        """Problems with these sizes, as messages; empty if the layout is valid."""
        problems = []
        if self.out_features < 1 or self.in_features < 1:
            problems.append(f"shape [{self.out_features}, {self.in_features}] is empty")
        if self.g1 < 16 or self.g1 % 16:
            problems.append(f"g1={self.g1} must be a positive multiple of 16 (whole 32-bit words of 2-bit codes)")
        if self.g4 < 8 or self.g4 % 8:
            problems.append(f"g4={self.g4} must be a positive multiple of 8 (whole 32-bit words of 4-bit codes)")
        if self.g2 < 1:
            problems.append(f"g2={self.g2} must be at least 1")
        if not 1 <= self.scale_bits <= MAX_SCALE_BITS:
            problems.append(f"scale_bits={self.scale_bits} must be between 1 and {MAX_SCALE_BITS}")
        if self.k4 < 0 or self.k4 > self.in_features or (self.g4 > 0 and self.k4 % self.g4):
            problems.append(f"k4={self.k4} must be a multiple of g4={self.g4} between 0 and {self.in_features}")
        if not 0 <= self.n_outliers <= self.out_features * max(self.k2, 0):
            problems.append(f"n_outliers={self.n_outliers} is out of range")
        return problems

    def tensor_specs(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """Name suffix -> (dtype, shape) of every stored tensor. The one table all readers check."""
        n = self.out_features
        specs: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {"perm": (torch.int32, (self.in_features,))}
        if self.k2 > 0:
            specs["qweight2"] = (torch.int32, (n, self.words2))
            specs["meta2"] = (torch.uint8, (n, self.groups2))
            specs["scale2"] = (torch.float16, (n, self.blocks2))
            specs["szero2"] = (torch.uint8, (n, self.blocks2))
        if self.k4 > 0:
            specs["qweight4"] = (torch.int32, (n, self.words4))
            specs["scale4"] = (torch.float16, (n, self.groups4))
            specs["zero4"] = (torch.uint8, (n, self.groups4))
        if self.n_outliers > 0:
            specs["outlier_rowptr"] = (torch.int32, (n + 1,))
            specs["outlier_col"] = (torch.int32, (self.n_outliers,))
            specs["outlier_val"] = (torch.float16, (self.n_outliers,))
        return specs

    def stored_bits(self) -> int:
        """Every stored bit of this layer: codes, padding, scales, zeros, permutation, outliers."""
        return sum(math.prod(shape) * dtype.itemsize * 8 for dtype, shape in self.tensor_specs().values())

    def bits_per_weight(self) -> float:
        return self.stored_bits() / (self.out_features * self.in_features)

    def to_json(self) -> dict[str, int]:
        return asdict(self)


def random_packed(layout: LinearLayout, seed: int = 0) -> dict[str, torch.Tensor]:
    """Valid packed tensors with random codes and scales, straight from the table (tests, kernel benchmarks)."""
    gen = torch.Generator().manual_seed(seed)
    n = layout.out_features
    t: dict[str, torch.Tensor] = {"perm": torch.randperm(layout.in_features, generator=gen).to(torch.int32)}
    if layout.k2:
        t["qweight2"] = pack_codes(torch.randint(0, INT2_MAX + 1, (n, layout.k2_padded), generator=gen), 2)
        t["meta2"] = pack_meta2(
            torch.randint(0, INT2_MAX + 1, (n, layout.groups2), generator=gen),
            torch.randint(0, 1 << layout.scale_bits, (n, layout.groups2), generator=gen),
        )
        t["scale2"] = (torch.rand(n, layout.blocks2, generator=gen) * 0.01).half()
        t["szero2"] = torch.randint(0, SZERO_MAX + 1, (n, layout.blocks2), generator=gen).to(torch.uint8)
    if layout.k4:
        t["qweight4"] = pack_codes(torch.randint(0, INT4_MAX + 1, (n, layout.k4), generator=gen), 4)
        t["scale4"] = (torch.rand(n, layout.groups4, generator=gen) * 0.01).half()
        t["zero4"] = torch.randint(0, INT4_MAX + 1, (n, layout.groups4), generator=gen).to(torch.uint8)
    return t


def dequantize(tensors: dict[str, torch.Tensor], layout: LinearLayout) -> torch.Tensor:
    """The exact reference decoder: packed tensors -> fp32 weight ``[N, K]`` in the original column order."""
    n, k = layout.out_features, layout.in_features
    packed = torch.zeros(n, layout.k2 + layout.k4, dtype=torch.float32, device=tensors["perm"].device)
    if layout.k2 > 0:
        packed[:, : layout.k2] = _decode_2bit(tensors, layout)[:, : layout.k2]
    if layout.k4 > 0:
        packed[:, layout.k2 :] = _decode_4bit(tensors, layout)
    weight = torch.empty(n, k, dtype=torch.float32, device=packed.device)
    weight[:, tensors["perm"].long()] = packed
    return weight


def _decode_2bit(tensors: dict[str, torch.Tensor], layout: LinearLayout) -> torch.Tensor:
    zero, scale_code = unpack_meta2(tensors["meta2"])  # [N, G]
    block = torch.arange(layout.groups2, device=zero.device) // layout.g2
    scale = tensors["scale2"].float()[:, block] * (scale_code + tensors["szero2"].long()[:, block]).float()
    codes = unpack_codes(tensors["qweight2"], 2).reshape(layout.out_features, layout.groups2, layout.g1)
    weight = scale.unsqueeze(-1) * (codes - zero.unsqueeze(-1)).float()
    weight = weight.reshape(layout.out_features, layout.k2_padded)
    if layout.n_outliers > 0:
        rowptr = tensors["outlier_rowptr"].long()
        rows = torch.repeat_interleave(torch.arange(layout.out_features, device=rowptr.device), rowptr.diff())
        weight.index_put_((rows, tensors["outlier_col"].long()), tensors["outlier_val"].float(), accumulate=True)
    return weight


def _decode_4bit(tensors: dict[str, torch.Tensor], layout: LinearLayout) -> torch.Tensor:
    codes = unpack_codes(tensors["qweight4"], 4).reshape(layout.out_features, layout.groups4, layout.g4)
    zero = tensors["zero4"].long().unsqueeze(-1)
    weight = tensors["scale4"].float().unsqueeze(-1) * (codes - zero).float()
    return weight.reshape(layout.out_features, layout.k4)
