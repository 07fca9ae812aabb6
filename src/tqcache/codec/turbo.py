"""TurboQuant (arXiv 2504.19874) in pure torch: the specification every kernel is tested against.

**MSE stage, b bits.** For a vector ``x ∈ R^d``: ``n = ‖x‖``, ``y = R·x/n`` (R a seeded random rotation),
``idx_j = argmin_k |y_j − c_k|`` with ``c`` the Lloyd–Max levels for the coordinate density of a rotated
unit vector (codebook.py). Store the b-bit code of ``idx`` (packing.py; codes are sign-magnitude,
:func:`code_order`) and one fp16 scale: ``n``, or with norm correction ``n/‖c[idx]‖`` so that
``x̂ = scale·Rᵀc[idx]`` keeps ``‖x̂‖ = ‖x‖`` exactly.

**QJL stage (TurboQuant-prod).** With ``qjl=True`` and b total bits, the MSE stage gets b−1 bits; the
residual ``r = x − x̂`` is stored as ``sign(S·r)`` (1 bit per coordinate, S a d×d standard Gaussian matrix
seeded independently of R) and ``γ = ‖r‖`` (fp16). Unbiased inner product (paper Thm. 2):
``⟨q, x⟩ ≈ ⟨q, x̂⟩ + γ·√(π/2)/d·⟨S·q, sign(S·r)⟩``.

**Fractional bits.** ``bits = b + f`` (0 < f < 1) codes ``f·d`` coordinates at ``b+1`` bits and the rest at
``b`` ("segments" ``[(d_0, b+1), (d_1, b)]``; the high-bit segment is always segment 0). Two ways:

* ``split="halves"`` / ``"outliers"``: the *channels* are cut into two independent instances, each with its
  own rotation (``d_s × d_s``), codebook (for ``d_s``'s density) and norm. ``"halves"`` gives the extra bit
  to a fixed set of channels (the first ones), ``"outliers"`` to the channels of largest RMS in the first
  data seen (:meth:`TurboQuantizer.calibrate`). Two fp16 norms per vector.
* ``split="rotated"``: the whole (channel-scaled) vector is rotated by one ``d × d`` rotation and normalised
  by ONE norm; the first ``d_0`` rotated coordinates are quantized with the ``(b+1)``-bit codebook and the
  rest with the ``b``-bit one (both for ``d``'s coordinate density: every rotated coordinate has it). One
  fp16 norm per vector, with norm correction ``‖x‖/‖ĉ‖`` over the whole concatenated reconstruction
  ``ĉ = [c_0[idx_0], c_1[idx_1]]`` -- 0.25 bit less than the channel splits at d = 64. The unit-vector
  MSE is ``f·MSE_{b+1}(d) + (1−f)·MSE_b(d)``.

**Scores in the rotated space.** Attention never reconstructs keys: ``⟨q, x̂⟩ = Σ_s scale_s·⟨(Rq)_s, c[idx_s]⟩``
(``scale_s`` the norm of segment s's block: its own, or the shared one), so the query is rotated once
(:meth:`rotate_query`, segments concatenated in code order) and compared with centroid values
(:meth:`rotated`); a value-weighted sum is accumulated in the rotated space and rotated back once
(:meth:`unrotate`).

Packed fields (all ``[*lead, width]``; see docs/formats.md)::

    codes      uint8    [*lead, Σ_s d_s·b_s/8]  segment 0's bit stream, then segment 1's
    norms      float16  [*lead, S]              scale per segment (‖x_s‖ or ‖x_s‖/‖c[idx_s]‖); S = 1 for
                                                whole bits and for split="rotated" (one scale for both)
    qjl_signs  uint8    [*lead, d/8]            sign(S·r) as 1-bit codes (1 = positive), qjl only
    qjl_norms  float16  [*lead, 1]              γ = ‖r‖, qjl only

Example::

    >>> q = TurboQuantizer(dim=128, bits=3)
    >>> x = torch.randn(4, 128)
    >>> packed = q.quantize(x)
    >>> q.dequantize(packed).shape, round(packed.bits_per_element, 3)
    (torch.Size([4, 128]), 3.125)
"""

from __future__ import annotations

import math

import torch

from .base import Packed, check_input
from .codebook import codebook
from .packing import pack_bits, pack_codes, packed_width, unpack_bits, unpack_codes
from .rotation import rotation_matrix

__all__ = ["TurboQuantizer", "code_order", "code_order_packed", "derive_seed", "segments_for"]

_TINY = 1e-30
_FP16_MAX = 65504.0
_SPLITS = ("halves", "outliers", "rotated")


def bf16_reciprocal_scale(s: torch.Tensor) -> torch.Tensor:
    """The fp32 scales nearest ``s`` (within a few bf16 steps of 1/s) whose fp32 reciprocal ``1/s`` is exact in
    bf16. Then ``x · (1/s)`` of a bf16 ``x`` is exact in fp32, and its bf16 rounding — the codec's working space —
    is one bf16x2 multiply in the encode kernel. (``1/(1/c)`` returns ``c`` for ~80 % of bf16 values ``c``; the
    rest take the nearest bf16 value that does, ≤ 3 steps of 2^-8 away, moving a scale by ≤ 1.2 %: the scale is
    a calibration heuristic, and the decode side multiplies by the same stored ``s``.)"""
    c0 = (1.0 / s.float()).to(torch.bfloat16)
    bits = c0.view(torch.int16).to(torch.int32)
    out = torch.full_like(s, float("nan"), dtype=torch.float32)
    for step in (0, 1, -1, 2, -2, 3, -3, 4, -4):
        c = (bits + step).to(torch.int16).view(torch.bfloat16).float()
        t = 1.0 / c
        fits = torch.isnan(out) & ((1.0 / t) == c) & (c > 0) & torch.isfinite(t)
        out = torch.where(fits, t, out)
    return torch.where(torch.isnan(out), s.float(), out)


def pow2_scale(s: torch.Tensor) -> torch.Tensor:
    """``s`` rounded to the nearest power of two in the log domain (within a factor √2). Then ``x · (1/s)`` of a
    bf16 ``x`` is itself a bf16 value (an exponent shift), so the encode kernel folds the scale into the rotation
    instead of multiplying every tile (:attr:`TurboQuantizer.pow2_scales`)."""
    return torch.exp2(torch.round(torch.log2(s.float())))


def derive_seed(seed: int, *tags: int) -> int:
    """Mix ``seed`` with integer tags (splitmix64), giving independent 63-bit seeds per layer/segment/role."""
    z = int(seed) & 0xFFFFFFFFFFFFFFFF
    for t in tags:
        z = (z + 0x9E3779B97F4A7C15 + (int(t) & 0xFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        z ^= z >> 31
    return z & 0x7FFFFFFFFFFFFFFF


def code_order(idx: torch.Tensor, bits: int) -> torch.Tensor:
    """The stored code of each sorted level index ``idx`` — and back: the map is its own inverse.

    Codes are sign-magnitude: with ``L = 2^bits`` levels, code ``L/2 + m`` is the m-th level above the middle (its
    sorted index kept) and code ``m`` the m-th level below it (sorted index ``L/2 − 1 − m``). For a codebook
    symmetric about 0 the top bit is then the sign and the low bits index ``|level|`` directly, which saves the
    decode kernels' 4-bit register lookup a fold per code (``kernels/attention.py``, ``_ASM_LUT4``). Storage
    format version 2 (``persist.py`` converts version-1 files, which stored ``idx``).
    """
    half = 1 << (bits - 1)
    return torch.where(idx >= half, idx, half - 1 - idx)


def code_order_packed(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`code_order` applied to every code of a packed stream (``packing.pack_bits`` layout, uint8
    ``[..., W]`` with ``W`` a multiple of ``bits``): the same bytes, each b-bit code below ``L/2`` mirrored.

    Without unpacking: since ``L/2 − 1 − c = c XOR (L/2 − 1)`` for ``c < L/2``, a run of whole codes held in one
    integer X becomes ``X XOR (T·(L/2 − 1))``, ``T`` = X's inverted top bits moved to the bottom of their fields.
    The runs are int32 words for 1, 2, 4 and 8 bits (no code straddles a byte) and groups of ``bits`` bytes (8
    codes) in an int64 otherwise. Its own inverse, like :func:`code_order`. (For loading version-1 cache files:
    unpacking a 32K-token layer costs seconds.)"""
    if packed.dtype != torch.uint8 or packed.shape[-1] % bits:
        raise ValueError(f"expected uint8 codes whose width is a multiple of {bits} bytes, got "
                         f"{packed.dtype} [..., {packed.shape[-1]}]")
    packed = packed.contiguous()
    lead, w = packed.shape[:-1], packed.shape[-1]
    words = 8 % bits == 0 and w % 4 == 0
    if words:
        x, per = packed.view(torch.int32), 32 // bits  # little-endian words = the LSB-first stream
    else:  # each group of `bits` bytes zero-padded to one little-endian int64
        grouped = torch.nn.functional.pad(packed.reshape(*lead, w // bits, bits), (0, 8 - bits))
        x, per = grouped.view(torch.int64), 8
    fields = sum(1 << (bits * k) for k in range(per))  # the lowest bit of each field
    if x.dtype == torch.int32 and fields >= 1 << 31:
        fields -= 1 << 32
    # (the arithmetic shift fills the top with copies of the sign bit; the mask keeps only field bits)
    x = x ^ ((((~x) >> (bits - 1)) & fields) * ((1 << (bits - 1)) - 1))  # a wrapping multiply: bit pattern right
    out = x.view(torch.uint8)
    return out if words else out.reshape(*lead, w // bits, 8)[..., :bits].reshape(packed.shape)


def segments_for(dim: int, mse_bits: float) -> list[tuple[int, int]]:
    """Channel segments ``[(channels, bits), ...]`` for a (possibly fractional) MSE bit-width.

    Whole bits give one segment. ``b + f`` (0 < f < 1) gives ``f·dim`` channels at ``b+1`` bits and the rest
    at ``b``; both counts must be whole multiples of 8 so each segment packs into whole bytes.
    """
    lo = math.floor(mse_bits)
    frac = mse_bits - lo
    if frac == 0:
        packed_width(dim, lo)  # raises if dim·bits is not whole bytes
        return [(dim, lo)]
    hi_channels = frac * dim
    if abs(hi_channels - round(hi_channels)) > 1e-9 or round(hi_channels) % 8 or (dim - round(hi_channels)) % 8:
        raise ValueError(
            f"bits={mse_bits:g} is not representable for dim={dim}: the fractional part needs "
            f"{hi_channels:g} channels at {lo + 1} bits, which must be a whole multiple of 8 (e.g. 2.5, 3.25, 3.5 for dim 128)"
        )
    hi = round(hi_channels)
    return [(hi, lo + 1), (dim - hi, lo)]


class TurboQuantizer(torch.nn.Module):
    """TurboQuant-MSE / TurboQuant-prod quantizer for vectors of size ``dim``.

    Args:
        dim: vector size (head_dim); ``dim·bits`` must pack into whole bytes (any multiple of 8 works).
        bits: total bits per coordinate including the QJL sign bit when ``qjl=True``; may be fractional
            (2.5, 3.5, ...; see :func:`segments_for`).
        qjl: add the 1-bit QJL residual sketch (unbiased inner products).
        rotation: ``"hadamard"`` or ``"haar"`` (non-power-of-two segment sizes always use Haar).
        norm_correction: store ``‖x‖/‖c[idx]‖`` so reconstructions keep the exact norm.
        seed: seed of the rotations and the QJL matrix (explicit; no global RNG is touched).
        split: fractional bits as a channel split (``"halves"`` or ``"outliers"``: two instances, two norms)
            or after one full-width rotation (``"rotated"``: one rotation, one norm; see the module docstring).
        channel_scale: query-aware per-channel scaling before the rotation (set by :meth:`calibrate`):
            channel j is divided by ``s_j = (E[x_j²]/E[q_j²])^(1/4)`` and queries are multiplied by it, which
            leaves inner products unchanged and minimises the expected score error for those statistics.
        heads: with ``channel_scale``, keep one scale vector per head (buffer ``[heads, 1, dim]``; inputs are
            then ``[..., heads, T, dim]``) instead of one shared ``[dim]``.
        density: codebook density, ``"exact"`` (Beta-type, exact for a rotated unit vector) or ``"gaussian"``.

    All state (rotations, codebooks, sketch, channel permutation and scales) lives in buffers, so
    ``.to(device)`` moves it and ``state_dict()`` saves it.
    """

    def __init__(
        self,
        dim: int,
        bits: float = 4,
        qjl: bool = False,
        rotation: str = "hadamard",
        norm_correction: bool = True,
        seed: int = 0,
        split: str = "halves",
        channel_scale: bool = False,
        density: str = "exact",
        heads: int | None = None,
    ):
        super().__init__()
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 8 or dim % 8:
            raise ValueError(f"dim must be a positive multiple of 8, got {dim!r}")
        try:
            bits = float(bits)
        except (TypeError, ValueError):
            raise ValueError(f"bits must be a number, got {bits!r}") from None
        mse_bits = bits - 1 if qjl else bits
        if not 1 <= mse_bits <= 8 or math.isnan(bits):
            rng = "2..9 (qjl=True spends one bit on the sign sketch)" if qjl else "1..8"
            raise ValueError(f"TurboQuant bits must be in {rng}, got bits={bits:g}")
        if rotation not in ("hadamard", "haar"):
            raise ValueError(f"rotation must be 'hadamard' or 'haar', got {rotation!r}")
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
        self.dim, self.bits, self.qjl = dim, bits, bool(qjl)
        self.rotation_kind, self.norm_correction, self.seed = rotation, bool(norm_correction), int(seed)
        self.split, self.use_channel_scale, self.density = split, bool(channel_scale), density
        try:
            self.segments = segments_for(dim, mse_bits)
        except ValueError as e:
            if not qjl:
                raise
            raise ValueError(
                f"bits={bits:g} with qjl=True is not representable for dim={dim}: QJL spends one bit on the sign "
                f"sketch, leaving {mse_bits:g} bits for the MSE stage ({e})"
            ) from None

        # Rotation blocks = norm groups: one per segment, or one over all channels for split="rotated" (the
        # segments are then cut from the rotated vector; both codebooks are for dim's coordinate density).
        shared = self.split == "rotated" and len(self.segments) > 1
        self.blocks = [dim] if shared else [d_s for d_s, _ in self.segments]
        for s, d_b in enumerate(self.blocks):
            self.register_buffer(f"rot{s}", rotation_matrix(d_b, derive_seed(seed, 1, s), rotation))
        for s, (d_s, b_s) in enumerate(self.segments):
            levels = codebook(dim if shared else d_s, b_s, density)
            self.register_buffer(f"levels{s}", levels)
            self.register_buffer(f"bounds{s}", 0.5 * (levels[1:] + levels[:-1]))
        if self.qjl:
            gen = torch.Generator().manual_seed(derive_seed(seed, 2))
            self.register_buffer("sketch", torch.randn(dim, dim, generator=gen, dtype=torch.float64).float())
        # Channel order: perm[:d_0] are segment 0's channels. Data-dependent (outliers) after calibrate().
        self.register_buffer("perm", torch.arange(dim))
        scale_shape = (heads, 1, dim) if (heads and channel_scale) else (dim,)
        self.register_buffer("channel_scale", torch.ones(scale_shape))
        self.register_buffer("calibrated", torch.tensor(not self.needs_calibration))

    def is_calibrated(self) -> bool:
        """``bool(self.calibrated)``, read from the device once per state of the buffer: every decode step asks,
        and on a GPU each read is a device sync that stops the host from running ahead of the kernels. The
        answer is cached against the buffer's identity and version, so ``calibrate``, ``load_state_dict`` (an
        in-place copy) or ``.to()`` (a new buffer) are seen. An inference-mode buffer has no version counter:
        then only a True answer is kept (once calibrated, a codec stays so unless its state is replaced)."""
        t = self.calibrated
        try:
            key = (id(t), t.data_ptr(), t._version)
        except RuntimeError:  # inference tensors do not track versions
            key = (id(t), t.data_ptr(), "inference")
        if self.__dict__.get("_calibrated_key") != key:
            value = bool(t)
            self.__dict__["_calibrated_value"] = value
            self.__dict__["_calibrated_key"] = key if value or key[2] != "inference" else None
        return self.__dict__["_calibrated_value"]

    # ------------------------------------------------------------------ layout
    @property
    def needs_calibration(self) -> bool:
        """True when channel choices depend on data (outlier split or channel scaling)."""
        return (self.split == "outliers" and len(self.segments) > 1) or self.use_channel_scale

    @property
    def shared_norm(self) -> bool:
        """True when two segments share one norm (``split="rotated"`` with fractional bits)."""
        return len(self.blocks) < len(self.segments)

    def field_widths(self) -> dict[str, tuple[int, torch.dtype]]:
        """Width and dtype of every packed field (see the module docstring)."""
        widths = {
            "codes": (sum(packed_width(d_s, b_s) for d_s, b_s in self.segments), torch.uint8),
            "norms": (len(self.blocks), torch.float16),
        }
        if self.qjl:
            widths["qjl_signs"] = (self.dim // 8, torch.uint8)
            widths["qjl_norms"] = (1, torch.float16)
        return widths

    @property
    def bits_per_element(self) -> float:
        """Stored bits per element including norms and QJL metadata."""
        total = sum(w * torch.empty((), dtype=dt).element_size() for w, dt in self.field_widths().values())
        return 8.0 * total / self.dim

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, bits={self.bits:g}, qjl={self.qjl}, rotation={self.rotation_kind}, "
            f"norm_correction={self.norm_correction}, segments={self.segments}, split={self.split}, seed={self.seed}"
        )

    def _block_of(self, s: int) -> int:
        """The rotation block / norm group segment ``s`` belongs to."""
        return 0 if len(self.blocks) == 1 else s

    def code_levels(self, s: int) -> torch.Tensor:
        """Segment ``s``'s levels in stored-code order, ``[2^b_s]`` fp32: entry ``c`` is the level code ``c``
        stands for (:func:`code_order`) — the table every kernel looks codes up in."""
        levels = getattr(self, f"levels{s}")
        return levels[code_order(torch.arange(levels.numel(), device=levels.device), self.segments[s][1])]

    def _seg(self, s: int):
        """``(rotation of segment s's block, levels, bounds)``; with ``split="rotated"`` the rotation is the
        full ``[dim, dim]`` one, shared by both segments."""
        return getattr(self, f"rot{self._block_of(s)}"), getattr(self, f"levels{s}"), getattr(self, f"bounds{s}")

    # ------------------------------------------------------------------ calibration
    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, q_sq: torch.Tensor | None = None) -> None:
        """Choose data-dependent channel handling from sample vectors ``x [..., dim]`` (e.g. a prefill's keys).

        ``split="outliers"``: segment 0 (the extra bit) gets the channels of largest RMS (shared by all heads).
        ``channel_scale=True``: ``s = ((E[x²] + ε)/(E[q²] + ε))^(1/4)`` per channel (per head when the codec
        was built with ``heads``; ``x`` is then ``[..., heads, T, dim]``), normalised to RMS 1. ``q_sq`` holds
        the queries' per-channel second moments, shaped like the scale (``[heads, 1, dim]`` or ``[dim]``);
        without it the queries are taken as isotropic (``s = E[x²]^(1/4)``). Why 1/4: the score error of a
        rotated quantizer is ``≈ c·‖q⊙s‖²·‖x/s‖²``, minimised over ``s`` at ``s² ∝ √(E[x²]/E[q²])``.
        Does nothing when :attr:`needs_calibration` is False. Calibrating twice keeps the first choice, so a
        cache's stored codes never change meaning.
        """
        if self.is_calibrated():
            return
        check_input(x, self.dim)
        xf = x.detach().float()
        if self.use_channel_scale:
            if self.channel_scale.dim() == 3:
                heads = self.channel_scale.shape[0]
                if xf.dim() < 3 or xf.shape[-3] != heads:
                    raise ValueError(
                        f"this codec keeps per-head scales for {heads} heads: calibrate with x [..., {heads}, T, "
                        f"{self.dim}], got shape {tuple(x.shape)}"
                    )
                x_sq = xf.movedim(-3, 0).reshape(heads, -1, self.dim).pow(2).mean(1, keepdim=True)
            else:
                x_sq = xf.reshape(-1, self.dim).pow(2).mean(0)
            x_sq = x_sq + 1e-6 * x_sq.mean(-1, keepdim=True) + _TINY
            ratio = x_sq
            if q_sq is not None:
                q_sq = q_sq.detach().float().to(x_sq.device).expand_as(x_sq)
                ratio = x_sq / (q_sq + 1e-6 * q_sq.mean(-1, keepdim=True) + _TINY)
            s = ratio.pow(0.25)
            s = s / s.pow(2).mean(-1, keepdim=True).sqrt()
            if self.pow2_scales:  # powers of two: the encode kernel folds them into the rotation
                s = pow2_scale(s)
            elif self.bf16_working:  # 1/s exact in bf16: the encode kernel's one-multiply scaling
                s = bf16_reciprocal_scale(s)
            self.channel_scale.copy_(s)
        if self.split == "outliers" and len(self.segments) > 1:
            rms = xf.reshape(-1, self.dim).pow(2).mean(0)
            d0 = self.segments[0][0]
            top = torch.argsort(rms, descending=True, stable=True)
            hi = torch.sort(top[:d0]).values
            lo = torch.sort(top[d0:]).values
            self.perm.copy_(torch.cat([hi, lo]))
        self.calibrated.fill_(True)

    # ------------------------------------------------------------------ quantize / dequantize
    @property
    def pow2_scales(self) -> bool:
        """True when calibration rounds the channel scales to powers of two: channel-scaled codecs whose segments
        are all 4-bit (turbo4's and k4v3's keys).

        Why: ``x · (1/s)`` is then exact, so the encode kernel multiplies by a per-head rotation with the scale
        folded in rather than scaling every tile (H100, 4-bit keys, 32K tokens × 8 heads: 46.3 → 43.8 µs). Only at
        4 bits: measured with ``tqcache eval`` (docs/fidelity.md, v21), power-of-two scales left 4-bit keys' KL as
        it was (SmolLM2 turbo4 0.00337 → 0.00328, Gemma-3 0.00227 → 0.00224) but raised 3-bit keys' (SmolLM2 turbo3
        0.01058 → 0.01312). Scales saved before keep their values; the kernel checks what it is given."""
        return self.bf16_working and all(b == 4 for _, b in self.segments)

    @property
    def bf16_working(self) -> bool:
        """True when the channel-scaled input is rounded to bf16 before the rotation (channel scaling with
        segments of ≤ 5 bits).

        Why: ``x / s`` has a full fp32 mantissa, so a tensor-core rotation that must reproduce this codec's codes
        exactly (the encode kernel) would split it into three bf16 pieces — three products instead of one. The
        rounding moves each coordinate by ≤ 2^-9 of itself, the precision bf16 activations already carry; the
        quantization error it adds is < 0.1 % of a 5-bit codebook's (≈ 3 % of an 8-bit one's, which therefore
        keep fp32)."""
        return self.use_channel_scale and max(b for _, b in self.segments) <= 5

    def _to_working(self, x: torch.Tensor) -> torch.Tensor:
        """Original space -> permuted, channel-scaled fp32 space in which the segments are cut: ``x · (1/s)``
        (the fp32 reciprocal, which the encode kernel multiplies by too), rounded to bf16 when
        :attr:`bf16_working`."""
        xf = x.float()
        if self.use_channel_scale:
            xf = xf * (1.0 / self.channel_scale)
            if self.bf16_working:
                xf = xf.to(torch.bfloat16).float()
        return xf[..., self.perm]

    def _from_working(self, xw: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(xw)
        out[..., self.perm] = xw
        if self.use_channel_scale:
            out = out * self.channel_scale
        return out

    @torch.no_grad()
    def quantize(self, x: torch.Tensor, *, check: bool = True) -> Packed:
        """Quantize ``x [..., dim]`` (fp16/bf16/fp32) into a :class:`Packed` with the fields above.

        Zero vectors are stored with norm 0 and decode to exact zeros. Norms are stored as fp16: a norm
        above 65504 raises ``ValueError`` (with ``check=False`` it is clamped to 65504), and norms below
        ~6e-5 are fp16 subnormals (relative precision degrades; below ~6e-8 they decode to zero).
        ``check=False`` skips these scans (device syncs) for hot paths whose inputs are known sane.
        """
        check_input(x, self.dim, check_finite=check)
        if self.needs_calibration and not self.is_calibrated():
            self.calibrate(x)
        xw = self._to_working(x)
        # Per rotation block (one per segment, or one for split="rotated"): its norm and its rotated,
        # normalised coordinates. Segments are cut from their concatenation.
        norms = [xb.norm(dim=-1, keepdim=True) for xb in xw.split(self.blocks, -1)]
        y = torch.cat(
            [yb / n.clamp_min(_TINY) for yb, n in zip(self._rotate_blocks(xw, True).split(self.blocks, -1), norms)], -1
        )
        codes, cs = [], []
        for s, (ys, (_, b_s)) in enumerate(zip(y.split([d_s for d_s, _ in self.segments], -1), self.segments)):
            _, levels, bounds = self._seg(s)
            # bucketize(right=False) counts boundaries strictly below y: ties go to the lower level.
            idx = torch.bucketize(ys.contiguous(), bounds)
            codes.append(pack_codes(code_order(idx, b_s), b_s))
            cs.append(levels[idx])
        scales, rot_parts = [], []
        for cb, n in zip(torch.cat(cs, -1).split(self.blocks, -1), norms):
            scale = n / cb.norm(dim=-1, keepdim=True).clamp_min(_TINY) if self.norm_correction else n
            if check and scale.numel() and bool((scale > _FP16_MAX).any()):
                raise ValueError(
                    f"a vector norm of {scale.max().item():.4g} exceeds the fp16 range (65504) in which TurboQuant "
                    "stores norms; rescale the input"
                )
            scale = scale.clamp_max(_FP16_MAX).half()
            scales.append(scale)
            rot_parts.append(scale.float() * cb)
        fields = {"codes": torch.cat(codes, -1), "norms": torch.cat(scales, -1)}
        if self.qjl:
            # Residual against what is actually stored (fp16 scales), in the working space.
            r = xw - self._unrotate_working(torch.cat(rot_parts, -1))
            proj = r @ self.sketch.T
            fields["qjl_signs"] = pack_bits((proj > 0).to(torch.int64), 1)
            fields["qjl_norms"] = r.norm(dim=-1, keepdim=True).clamp_max(_FP16_MAX).half()
        return Packed(fields=fields, dim=self.dim, dtype=x.dtype)

    def _check_packed(self, packed: Packed) -> None:
        if not isinstance(packed, Packed):
            raise TypeError(f"expected a Packed state, got {type(packed).__name__}")
        for name, (w, dt) in self.field_widths().items():
            t = packed.fields.get(name)
            if t is None or t.shape[-1] != w or t.dtype != dt:
                got = None if t is None else (tuple(t.shape), t.dtype)
                raise ValueError(f"packed field {name!r} should be [..., {w}] {dt}, got {got}")

    def rotated(self, packed: Packed) -> torch.Tensor:
        """MSE reconstruction in the rotated space, ``[..., dim]`` fp32: ``concat_s scale_s·c_s[idx_s]``."""
        self._check_packed(packed)
        codes, norms = packed["codes"], packed["norms"].float()
        parts, byte = [], 0
        for s, (d_s, b_s) in enumerate(self.segments):
            _, levels, _ = self._seg(s)
            w = packed_width(d_s, b_s)
            idx = code_order(unpack_codes(codes[..., byte : byte + w], b_s, d_s), b_s)
            byte += w
            blk = self._block_of(s)
            parts.append(norms[..., blk : blk + 1] * levels[idx])
        return torch.cat(parts, -1)

    def _rotate_blocks(self, xw: torch.Tensor, transpose: bool) -> torch.Tensor:
        """Each rotation block of a working-space vector times ``R.T`` (rotate) or ``R`` (unrotate)."""
        parts = []
        for blk, xb in enumerate(xw.split(self.blocks, -1)):
            rot = getattr(self, f"rot{blk}")
            parts.append(xb @ (rot.T if transpose else rot))
        return torch.cat(parts, -1)

    def _unrotate_working(self, y: torch.Tensor) -> torch.Tensor:
        return self._rotate_blocks(y, transpose=False)  # x = y·R (R orthogonal)

    def unrotate(self, y: torch.Tensor) -> torch.Tensor:
        """Map a rotated-space vector (e.g. a value-weighted sum of :meth:`rotated`) back: ``[..., dim]`` fp32."""
        return self._from_working(self._unrotate_working(y.float()))

    def rotate_query(self, q: torch.Tensor) -> torch.Tensor:
        """The query in the rotated space, ``[..., dim]`` fp32, so that ``⟨q, x̂⟩ = ⟨rotate_query(q), rotated(p)⟩``."""
        qf = q.float()
        if self.use_channel_scale:
            qf = qf * self.channel_scale  # ⟨q, x⟩ = ⟨q·s, x/s⟩
        return self._rotate_blocks(qf[..., self.perm], transpose=True)

    # ------------------------------------------------------------------ QJL
    @property
    def qjl_scale(self) -> float:
        """√(π/2)/d, the constant of the unbiased QJL inner-product estimator."""
        return math.sqrt(math.pi / 2) / self.dim

    def sketch_query(self, q: torch.Tensor) -> torch.Tensor:
        """``S·q`` in the working space, ``[..., dim]`` fp32 (qjl only)."""
        qf = q.float()
        if self.use_channel_scale:
            qf = qf * self.channel_scale
        return qf[..., self.perm] @ self.sketch.T

    def qjl_vectors(self, packed: Packed) -> torch.Tensor:
        """``γ·√(π/2)/d·sign(S·r)`` as ``[..., dim]`` fp32 (±1 signs times the per-vector constant)."""
        signs = unpack_bits(packed["qjl_signs"], 1, self.dim).float() * 2 - 1
        return packed["qjl_norms"].float() * self.qjl_scale * signs

    def unsketch(self, z: torch.Tensor) -> torch.Tensor:
        """``Sᵀ·z`` mapped back to the original space: the QJL part of a reconstruction, ``[..., dim]`` fp32."""
        return self._from_working(z.float() @ self.sketch)

    # ------------------------------------------------------------------ public reconstructions
    def dequantize(self, packed: Packed) -> torch.Tensor:
        """Reconstruct ``x̂ [..., dim]`` in the input's dtype (with QJL: ``x̂_mse + γ√(π/2)/d·Sᵀsign(S·r)``)."""
        xw = self._unrotate_working(self.rotated(packed))
        if self.qjl:
            xw = xw + self.qjl_vectors(packed) @ self.sketch
        return self._from_working(xw).to(packed.dtype)

    def inner_product(self, y: torch.Tensor, packed: Packed) -> torch.Tensor:
        """Estimate ``⟨y, x⟩`` for each packed vector; ``y [..., dim]`` broadcasts against the packed lead dims.

        Unbiased when ``qjl=True`` (paper Thm. 2); otherwise the (biased, lower-variance) MSE estimate.
        """
        if y.shape[-1] != self.dim:
            raise ValueError(f"last dimension must be dim={self.dim}, got {tuple(y.shape)}")
        ip = (self.rotate_query(y) * self.rotated(packed)).sum(-1)
        if self.qjl:
            ip = ip + (self.sketch_query(y) * self.qjl_vectors(packed)).sum(-1)
        return ip
