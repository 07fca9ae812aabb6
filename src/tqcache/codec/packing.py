"""Bit packing of b-bit codes (b = 1..8) into bytes: an LSB-first bit stream per row.

Layout (docs/formats.md): for a row of ``n`` codes ``c_0 .. c_{n-1}``, code ``c_j`` occupies bits
``[j·b, (j+1)·b)`` of the row's bit stream, and bit ``k`` of the stream is bit ``k % 8`` of byte ``k // 8``.
So for b = 4 byte ``i`` holds ``c_{2i} | c_{2i+1} << 4``; for b = 2, four codes per byte, lowest first; for
b = 3, 8 codes fill 3 bytes and a code may straddle two bytes. Rows are ``n·b/8`` bytes and contiguous
per token, which is what the kernels read (a token's codes are one contiguous run of bytes).
"""

from __future__ import annotations

import torch

__all__ = ["pack_bits", "unpack_bits", "packed_width"]


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
