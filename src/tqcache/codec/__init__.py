"""Pure-torch codecs: the specification that kernels and caches are tested against.

``make_codec(cfg, dim, seed)`` builds the codec a :class:`~tqcache.config.CodecConfig` describes. Every
codec offers ``quantize(x) -> Packed``, ``dequantize(p)``, ``field_widths()``, and the attention trio
``rotate_query(q)``, ``rotated(p)``, ``unrotate(y)`` with ``⟨q, x̂⟩ = ⟨rotate_query(q), rotated(p)⟩``.
"""

from __future__ import annotations

from ..config import CodecConfig
from .affine import AffineQuantizer
from .base import Packed
from .codebook import codebook, expected_mse, lloyd_max
from .packing import pack_bits, packed_width, unpack_bits
from .rotation import fwht, rotation_matrix
from .turbo import TurboQuantizer, code_order, code_order_packed, derive_seed, segments_for

__all__ = [
    "AffineQuantizer",
    "Packed",
    "TurboQuantizer",
    "code_order",
    "code_order_packed",
    "codebook",
    "derive_seed",
    "expected_mse",
    "fwht",
    "lloyd_max",
    "make_codec",
    "pack_bits",
    "packed_width",
    "rotation_matrix",
    "segments_for",
    "unpack_bits",
]


def make_codec(cfg: CodecConfig, dim: int, seed: int = 0, heads: int | None = None) -> "TurboQuantizer | AffineQuantizer":
    """The codec for one tensor kind of one layer (``heads``: KV heads, for per-head channel scales).
    ``cfg.kind == "none"`` has no codec (raises)."""
    if cfg.kind == "turbo":
        return TurboQuantizer(
            dim,
            bits=cfg.bits,
            qjl=cfg.qjl,
            rotation=cfg.rotation,
            norm_correction=cfg.norm_correction,
            seed=seed,
            split=cfg.split,
            channel_scale=cfg.channel_scale,
            heads=heads,
        )
    if cfg.kind == "affine":
        return AffineQuantizer(dim, bits=int(cfg.bits), group_size=min(cfg.group_size, dim), axis="token")
    raise ValueError(f"codec kind {cfg.kind!r} stores tensors as they are; there is no codec to build")
