"""Bit packing of b-bit codes (b = 1..8) into bytes: an LSB-first bit stream per row.

Layout (docs/formats.md): for a row of ``n`` codes ``c_0 .. c_{n-1}``, code ``c_j`` occupies bits
``[j·b, (j+1)·b)`` of the row's bit stream, and bit ``k`` of the stream is bit ``k % 8`` of byte ``k // 8``.
So for b = 4 byte ``i`` holds ``c_{2i} | c_{2i+1} << 4``; for b = 2, four codes per byte, lowest first; for
b = 3, 8 codes fill 3 bytes and a code may straddle two bytes. Rows are ``n·b/8`` bytes and contiguous
per token, which is what the kernels read (a token's codes are one contiguous run of bytes).

TurboQuant codes (:func:`pack_codes`, cache format 3) use this stream for every width but 3. At 3 bits a row is
cut into *units* of 32 codes, 12 bytes each — three little-endian uint32 words ``W0, W1, H`` — with any remaining
``n mod 32`` codes after the units in the stream above. For code ``32u + 8q + j`` of unit u (q, j in 0..3, 0..7):

* its low two bits are bits ``4j + 2(q mod 2)`` and ``+1`` of ``W_{q div 2}``;
* its top bit is bit ``4j + (2, 3, 0, 1)[q]`` of ``H``.

So the 8 codes of group q come out as the nibbles of one word in three or four instructions — ``(W >> 2(q mod 2)) &
0x33333333 | (H rotated left by (0, 31, 2, 1)[q]) & 0x44444444`` — which is what the decode kernels' register
lookups take (a byte-permute selects a table byte per nibble); the dense stream needed seven (docs/formats.md).
"""

from __future__ import annotations

import torch

__all__ = ["pack_bits", "unpack_bits", "packed_width", "pack_codes", "unpack_codes"]


def packed_width(n: int, bits: int) -> int:
    """Bytes per row of ``n`` codes at ``bits`` bits; ``n·bits`` must be a multiple of 8."""
    _check_bits(bits)
    if (n * bits) % 8:
        raise ValueError(f"{n} codes of {bits} bits are {n * bits} bits, not a whole number of bytes")
    return n * bits // 8


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")


def _byte_shifts(n: int, device) -> torch.Tensor:
    return torch.arange(0, 8 * n, 8, device=device, dtype=torch.int64)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``codes [..., n]`` (integers in ``[0, 2**bits)``) into ``[..., n·bits/8]`` uint8."""
    n = codes.shape[-1]
    width = packed_width(n, bits)
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    lead = codes.shape[:-1]
    if n % 8 == 0:
        # Fast path: 8 codes of b bits are exactly b bytes. Build each group's 8b-bit word (≤ 64 bits)
        # with shifts, then cut it into bytes: a handful of vector ops instead of one per bit.
        c = codes.to(torch.int64).reshape(*lead, n // 8, 8)
        word = (c << torch.arange(0, 8 * bits, bits, device=codes.device, dtype=torch.int64)).sum(-1)
        out = (word[..., None] >> _byte_shifts(bits, codes.device)) & 0xFF
        return out.to(torch.uint8).reshape(*lead, width)
    shifts = torch.arange(bits, device=codes.device, dtype=torch.int32)
    # [..., n, bits] bit planes, LSB first -> the row's bit stream -> groups of 8 bits -> bytes.
    stream = ((codes.to(torch.int32)[..., None] >> shifts) & 1).reshape(*lead, width, 8)
    weights = torch.tensor([1 << k for k in range(8)], device=codes.device, dtype=torch.int32)
    return (stream * weights).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``[..., n·bits/8]`` uint8 -> ``[..., n]`` int64 codes."""
    width = packed_width(n, bits)
    if packed.shape[-1] != width:
        raise ValueError(f"expected {width} bytes per row for {n} codes of {bits} bits, got {packed.shape[-1]}")
    if bits == 8:
        return packed.to(torch.int64)
    lead = packed.shape[:-1]
    if n % 8 == 0:
        # Fast path, inverse of pack_bits': b bytes -> one word -> 8 codes.
        g = packed.to(torch.int64).reshape(*lead, n // 8, bits)
        word = (g << _byte_shifts(bits, packed.device)).sum(-1)
        codes = (word[..., None] >> torch.arange(0, 8 * bits, bits, device=packed.device, dtype=torch.int64)) & ((1 << bits) - 1)
        return codes.reshape(*lead, n)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int32)
    stream = ((packed.to(torch.int32)[..., None] >> shifts) & 1).reshape(*lead, n, bits)
    weights = torch.tensor([1 << k for k in range(bits)], device=packed.device, dtype=torch.int32)
    return (stream * weights).sum(-1).to(torch.int64)


# ---------------------------------------------------------------------------- TurboQuant codes (format 3)
_UNIT = 32  # codes per 3-bit unit (12 bytes: W0, W1, H)
_H_SHIFT = (2, 3, 0, 1)  # bit of H (within nibble j) holding the top bit of group q's code j


def _unit_shifts(device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per code k of a unit (k = 8q + j): the word of its low bits (0 or 1), their bit position, its top bit's."""
    k = torch.arange(_UNIT, device=device)
    q, j = k // 8, k % 8
    return q // 2, 4 * j + 2 * (q % 2), 4 * j + torch.tensor(_H_SHIFT, device=device)[q]


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack TurboQuant codes ``[..., n]``: :func:`pack_bits`' stream, except 3 bits in units of 32 (module
    docstring). Same width as :func:`pack_bits` (``n·bits/8`` bytes)."""
    n = codes.shape[-1]
    if bits != 3 or n < _UNIT:
        return pack_bits(codes, bits)
    width = packed_width(n, bits)
    u = n // _UNIT
    lead = codes.shape[:-1]
    c = codes[..., : u * _UNIT].to(torch.int64).reshape(*lead, u, _UNIT)
    word, lo_at, hi_at = _unit_shifts(codes.device)
    lo = (c & 3) << lo_at
    w0 = torch.where(word == 0, lo, 0).sum(-1)
    w1 = torch.where(word == 1, lo, 0).sum(-1)
    h = ((c >> 2) << hi_at).sum(-1)
    words = torch.stack([w0, w1, h], -1)  # [..., u, 3], each < 2^32
    units = ((words[..., None] >> _byte_shifts(4, codes.device)) & 0xFF).to(torch.uint8).reshape(*lead, 12 * u)
    if n == u * _UNIT:
        return units
    out = torch.cat([units, pack_bits(codes[..., u * _UNIT :], bits)], -1)
    assert out.shape[-1] == width
    return out


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``[..., n·bits/8]`` uint8 -> ``[..., n]`` int64 codes."""
    if bits != 3 or n < _UNIT:
        return unpack_bits(packed, bits, n)
    width = packed_width(n, bits)
    if packed.shape[-1] != width:
        raise ValueError(f"expected {width} bytes per row for {n} codes of {bits} bits, got {packed.shape[-1]}")
    u = n // _UNIT
    lead = packed.shape[:-1]
    b = packed[..., : 12 * u].to(torch.int64).reshape(*lead, u, 3, 4)
    words = (b << _byte_shifts(4, packed.device)).sum(-1)  # [..., u, 3]
    word, lo_at, hi_at = _unit_shifts(packed.device)
    w = torch.where(word == 0, words[..., 0:1], words[..., 1:2])  # [..., u, 32]
    c = ((w >> lo_at) & 3) | (((words[..., 2:3] >> hi_at) & 1) << 2)
    c = c.reshape(*lead, u * _UNIT)
    if n == u * _UNIT:
        return c
    return torch.cat([c, unpack_bits(packed[..., 12 * u :], bits, n - u * _UNIT)], -1)
