"""The contract every codec follows: a codec turns ``x[..., dim]`` into a :class:`Packed` state and back.

A :class:`Packed` is a bag of tensors that all share ``x``'s leading dimensions and differ only in their
last dimension (its *width*). That single rule is what lets the cache store any codec's output in
preallocated per-field buffers ``[B, H, capacity, width]`` and slice, reorder, crop and save them without
knowing which codec produced them.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Mapping

import torch

__all__ = ["Packed", "check_input"]


@dataclasses.dataclass(frozen=True)
class Packed:
    """Packed (quantized) tensors of one codec.

    Attributes:
        fields: name -> tensor ``[*lead, width]``; the names and widths are fixed per codec instance
            (see :meth:`tqcache.codec.TurboQuantizer.field_widths`).
        dim: the last dimension of the tensor that was quantized.
        dtype: dtype that :meth:`dequantize` returns (the input's dtype).

    ``nbytes`` counts every stored byte (codes, norms, scales, signs); ``bits_per_element`` divides it by
    the number of quantized elements, so it is the honest storage cost.
    """

    fields: Mapping[str, torch.Tensor]
    dim: int
    dtype: torch.dtype

    FLOAT_FIELDS: ClassVar[tuple[str, ...]] = ()

    @property
    def lead_shape(self) -> torch.Size:
        first = next(iter(self.fields.values()))
        return first.shape[:-1]

    @property
    def numel(self) -> int:
        """Number of quantized elements (``prod(lead_shape) * dim``)."""
        n = self.dim
        for s in self.lead_shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.fields.values())

    @property
    def bits_per_element(self) -> float:
        return 8.0 * self.nbytes / max(self.numel, 1)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.fields[name]

    def map(self, fn) -> "Packed":
        """Apply ``fn`` to every field tensor (e.g. an index along a leading dim, ``.to(device)``)."""
        return dataclasses.replace(self, fields={k: fn(v) for k, v in self.fields.items()})


def check_input(x: torch.Tensor, dim: int, *, check_finite: bool = True) -> None:
    """Validate a tensor about to be quantized; every message names the bad value."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point tensor (float16/bfloat16/float32), got dtype {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != dim:
        raise ValueError(f"last dimension must be dim={dim}, got tensor of shape {tuple(x.shape)}")
    if check_finite and x.numel() and not bool(torch.isfinite(x).all()):
        bad = (~torch.isfinite(x)).sum().item()
        raise ValueError(f"input contains {bad} NaN/inf value(s); TurboQuant cannot encode non-finite numbers")
