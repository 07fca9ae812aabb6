"""Seeded random rotations: randomized Hadamard (fast Walsh–Hadamard) and dense Haar (QR of a Gaussian).

Both are drawn on the CPU from a ``torch.Generator`` seeded explicitly, in float64, so the same seed gives
the same matrix on every machine and device; the matrix is then cast to float32 and moved where needed.

Choice for non-power-of-two dims (80, 96, ...): a Walsh–Hadamard matrix exists only for powers of two, so
``kind="hadamard"`` falls back to a dense Haar rotation there (documented in docs/design.md). Every rotation
is applied as a dense ``d×d`` matmul: for d ≤ 256 that is cheaper on a GPU than log₂d butterfly passes,
and the kernels need the matrix anyway.
"""

from __future__ import annotations

import torch

__all__ = ["fwht", "rotation_matrix", "is_power_of_two"]


def is_power_of_two(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised fast Walsh–Hadamard transform along the last dim (length a power of two).

    ``fwht(x) == x @ H`` with ``H`` the Sylvester–Hadamard matrix (entries ±1, ``H @ H = d·I``);
    O(d log d): log₂d vectorised butterfly passes, no Python loop over elements.
    """
    d = x.shape[-1]
    if not is_power_of_two(d):
        raise ValueError(f"fwht needs a power-of-two length, got {d}")
    lead = x.shape[:-1]
    y = x.reshape(-1, d)
    h = 1
    while h < d:
        y = y.view(-1, d // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return y.reshape(*lead, d)


def rotation_matrix(dim: int, seed: int, kind: str = "hadamard") -> torch.Tensor:
    """A random orthogonal matrix ``R`` ``[dim, dim]`` float32 (CPU); rotate with ``y = x @ R.T``.

    ``hadamard``: ``R = H·diag(s)/√d`` with random signs ``s`` (requires power-of-two ``dim``; otherwise
    ``haar`` is used). ``haar``: ``Q·diag(sign(diag(R)))`` from the QR of a Gaussian matrix, which makes
    the distribution exactly Haar.
    """
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    if kind not in ("hadamard", "haar"):
        raise ValueError(f"rotation kind must be 'hadamard' or 'haar', got {kind!r}")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    if kind == "hadamard" and is_power_of_two(dim):
        signs = torch.randint(0, 2, (dim,), generator=gen, dtype=torch.int64).to(torch.float64) * 2 - 1
        h = fwht(torch.eye(dim, dtype=torch.float64))  # rows of H
        r = h * signs[None, :] / dim**0.5  # H · diag(s) / √d
    else:
        g = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
        q, rr = torch.linalg.qr(g)
        r = q * torch.sign(torch.diagonal(rr))[None, :]
    return r.to(torch.float32).contiguous()
