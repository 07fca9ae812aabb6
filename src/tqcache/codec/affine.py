"""Affine (min/max) group quantization: the baseline of KIVI-style and transformers' quantized caches.

Each group of ``g`` consecutive elements stores ``scale = (max − min)/(2^b − 1)`` and ``zero = min`` (fp16)
and b-bit codes ``round((x − zero)/scale)``; ``x̂ = code·scale + zero``. Quantization uses the fp16-rounded
scale and zero, so the codes are optimal for what is actually stored.

``axis="token"`` groups along the last dim (channels of one token: streams naturally, the cache's choice).
``axis="channel"`` groups along the second-to-last dim (tokens of one channel, KIVI's treatment of keys):
``x [..., T, dim]`` with ``T % g == 0`` is transposed internally, so its fields are ``[..., dim, T·b/8]``.

Packed fields (``axis="token"``)::

    codes   uint8    [*lead, dim·b/8]
    scales  float16  [*lead, dim/g]
    zeros   float16  [*lead, dim/g]
"""

from __future__ import annotations

import torch

from .base import Packed, check_input
from .packing import pack_bits, packed_width, unpack_bits

__all__ = ["AffineQuantizer"]


class AffineQuantizer(torch.nn.Module):
    """Min/max affine quantizer with groups of ``group_size`` elements.

    Example::

        >>> q = AffineQuantizer(dim=64, bits=4, group_size=32)
        >>> p = q.quantize(torch.randn(3, 64))
        >>> p.bits_per_element
        5.0
    """

    def __init__(self, dim: int, bits: int = 4, group_size: int = 32, axis: str = "token"):
        super().__init__()
        if not isinstance(bits, int) or isinstance(bits, bool):
            if isinstance(bits, float) and bits.is_integer():
                bits = int(bits)
            else:
                raise ValueError(f"affine bits must be a whole number in 1..8, got {bits!r}")
        if not 1 <= bits <= 8:
            raise ValueError(f"affine bits must be a whole number in 1..8, got {bits!r}")
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        if axis not in ("token", "channel"):
            raise ValueError(f"axis must be 'token' or 'channel', got {axis!r}")
        if not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
        if axis == "token" and dim % group_size:
            raise ValueError(f"group_size={group_size} must divide dim={dim} for axis='token'")
        self.dim, self.bits, self.group_size, self.axis = dim, bits, group_size, axis
        self.qjl = False

    def extra_repr(self) -> str:
        return f"dim={self.dim}, bits={self.bits}, group_size={self.group_size}, axis={self.axis}"

    def field_widths(self, n: int | None = None) -> dict[str, tuple[int, torch.dtype]]:
        """Field widths for rows of ``n`` elements (``dim`` for axis='token', T for axis='channel')."""
        n = self.dim if n is None else n
        return {
            "codes": (packed_width(n, self.bits), torch.uint8),
            "scales": (n // self.group_size, torch.float16),
            "zeros": (n // self.group_size, torch.float16),
        }

    @property
    def bits_per_element(self) -> float:
        return self.bits + 32.0 / self.group_size

    @torch.no_grad()
    def quantize(self, x: torch.Tensor, *, check: bool = True) -> Packed:
        """Quantize ``x [..., dim]`` (axis='token') or ``x [..., T, dim]`` (axis='channel')."""
        check_input(x, self.dim, check_finite=check)
        xf = x.float()
        if self.axis == "channel":
            if x.dim() < 2 or x.shape[-2] % self.group_size:
                raise ValueError(
                    f"axis='channel' needs x [..., T, dim] with T a multiple of group_size={self.group_size}, "
                    f"got shape {tuple(x.shape)}"
                )
            xf = xf.transpose(-1, -2)
        n = xf.shape[-1]
        g = xf.reshape(*xf.shape[:-1], n // self.group_size, self.group_size)
        lo, hi = g.amin(-1), g.amax(-1)
        levels = (1 << self.bits) - 1
        if check and g.numel() and bool((g.abs() > 65504).any()):
            raise ValueError(
                f"input magnitude {g.abs().max().item():.4g} exceeds the fp16 range (65504) in which the affine "
                "codec stores scales and zero points; rescale the input"
            )
        scale = ((hi - lo) / levels).half()
        zero = lo.half()
        # A constant group has scale 0: any code decodes to `zero`, so divide by 1 instead.
        s = scale.float().unsqueeze(-1)
        s = torch.where(s > 0, s, torch.ones_like(s))
        codes = torch.round((g - zero.float().unsqueeze(-1)) / s).clamp(0, levels).to(torch.int64)
        fields = {
            "codes": pack_bits(codes.reshape(*xf.shape[:-1], n), self.bits),
            "scales": scale,
            "zeros": zero,
        }
        return Packed(fields=fields, dim=n, dtype=x.dtype)

    def rotated(self, packed: Packed) -> torch.Tensor:
        """The fp32 reconstruction (affine has no rotation; the 'rotated space' is the original one)."""
        n = packed.dim
        codes = unpack_bits(packed["codes"], self.bits, n).float()
        g = codes.reshape(*codes.shape[:-1], n // self.group_size, self.group_size)
        out = g * packed["scales"].float().unsqueeze(-1) + packed["zeros"].float().unsqueeze(-1)
        return out.reshape(*codes.shape[:-1], n)

    def rotate_query(self, q: torch.Tensor) -> torch.Tensor:
        return q.float()

    def unrotate(self, y: torch.Tensor) -> torch.Tensor:
        return y.float()

    def dequantize(self, packed: Packed) -> torch.Tensor:
        out = self.rotated(packed)
        if self.axis == "channel":
            out = out.transpose(-1, -2)
        return out.to(packed.dtype)

    def inner_product(self, y: torch.Tensor, packed: Packed) -> torch.Tensor:
        """``⟨y, x̂⟩`` per packed vector (axis='token')."""
        return (y.float() * self.dequantize(packed).float()).sum(-1)
