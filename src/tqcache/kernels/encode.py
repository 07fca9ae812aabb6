"""TurboQuant encode/append in Triton: rotate + quantize + pack, written straight into the cache's buffers.

Twin and spec: :meth:`tqcache.codec.TurboQuantizer.quantize`. Per token row ``x [d]`` and segment ``s``
(``x_w = (x / channel_scale)[perm]``, segment ``s`` = working channels ``[o_s, o_s + d_s)``)::

    n_s   = ‖x_{w,s}‖
    y_s   = (x_{w,s} @ rot_sᵀ) / n_s
    idx_s = #{k : bounds_s[k] < y_s}                     (ties go to the lower level, as torch.bucketize)
    n̂_s   = n_s / ‖levels_s[idx_s]‖   (norm correction; else n_s), clamped to 65504 and stored as fp16
    QJL:   r = x_w − ⊕_s (n̂_s·levels_s[idx_s]) @ rot_s,  signs = [S·r > 0],  γ = ‖r‖ (fp16)

The permutation and the channel scale are folded into the matrices the kernel multiplies by, so the kernel
reads ``x`` in its original channel order once. Bytes per token (d = 128, bf16 in, 4 bits out):
256 read + 66 written.

Exactness. Codes must equal the torch codec's (``torch.equal``). The only freedom is the summation order of
``x @ rotᵀ``: with a Hadamard rotation every matrix entry is ``±1/√d_s``, so the kernel multiplies by the
exact ±1 matrix on the bf16 tensor cores (the input split into 1–3 bf16 pieces so every product is exact)
and scales by ``1/√d_s`` afterwards; Haar rotations use ``tf32x3``. A coordinate can then still land on
the other side of a decision boundary when it lies within a few fp32 ulps of it; tests count such ties.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._compat import patch_interpreter

__all__ = ["encode_into", "encode_unsupported_reason"]

_FP16_MAX = 65504.0
_TINY = 1e-30


@triton.jit
def _pack_store(ptr_row, tmask, idx, BITS: tl.constexpr, DS: tl.constexpr, BLOCK_T: tl.constexpr):
    """Pack int32 codes ``idx [BLOCK_T, DS]`` (natural channel order) as LSB-first bit streams at ``ptr_row``."""
    if BITS == 8:
        offs = tl.arange(0, DS)
        tl.store(ptr_row[:, None] + offs[None, :], idx.to(tl.uint8), mask=tmask[:, None])
    elif BITS == 4:
        lo, hi = tl.split(tl.reshape(idx, (BLOCK_T, DS // 2, 2)))
        offs = tl.arange(0, DS // 2)
        tl.store(ptr_row[:, None] + offs[None, :], (lo | (hi << 4)).to(tl.uint8), mask=tmask[:, None])
    elif BITS == 2:
        a0, a1 = tl.split(tl.reshape(idx, (BLOCK_T, DS // 4, 2, 2)))  # [i, t] = 4i+2t (+1)
        c0, c2 = tl.split(a0)
        c1, c3 = tl.split(a1)
        offs = tl.arange(0, DS // 4)
        byte = c0 | (c1 << 2) | (c2 << 4) | (c3 << 6)
        tl.store(ptr_row[:, None] + offs[None, :], byte.to(tl.uint8), mask=tmask[:, None])
    else:  # BITS = 1 or 3: groups of 8 codes -> BITS bytes
        e0, e1 = tl.split(tl.reshape(idx, (BLOCK_T, DS // 8, 2, 2, 2)))  # [i,t,u] = 8i+4t+2u (+1)
        f00, f01 = tl.split(e0)
        f10, f11 = tl.split(e1)
        c0, c4 = tl.split(f00)
        c2, c6 = tl.split(f01)
        c1, c5 = tl.split(f10)
        c3, c7 = tl.split(f11)
        w = c0 | (c1 << BITS) | (c2 << (2 * BITS)) | (c3 << (3 * BITS))
        w = w | (c4 << (4 * BITS)) | (c5 << (5 * BITS)) | (c6 << (6 * BITS)) | (c7 << (7 * BITS))
        offs = tl.arange(0, DS // 8) * BITS
        p = ptr_row[:, None] + offs[None, :]
        tl.store(p, (w & 255).to(tl.uint8), mask=tmask[:, None])
        if BITS == 3:
            tl.store(p + 1, ((w >> 8) & 255).to(tl.uint8), mask=tmask[:, None])
            tl.store(p + 2, ((w >> 16) & 255).to(tl.uint8), mask=tmask[:, None])


@triton.jit
def _rot_dot(xf, R, col0, D: tl.constexpr, DS: tl.constexpr, NCOL: tl.constexpr, PIECES: tl.constexpr):
    """``xf [T, D] fp32 @ R[:, col0:col0+DS]``: exact-product bf16 pieces (PIECES ≥ 1) or tf32x3 (PIECES = 0)."""
    offs_d = tl.arange(0, D)
    offs_s = tl.arange(0, DS)
    if PIECES == 0:
        r = tl.load(R + offs_d[:, None] * NCOL + col0 + offs_s[None, :])
        y = tl.dot(xf, r, input_precision="tf32x3")
    else:
        # R holds bf16 ±1 (exact): half the bytes of fp32 for a matrix every program streams from L2.
        r = tl.load(R + offs_d[:, None] * NCOL + col0 + offs_s[None, :])
        xh = xf.to(tl.bfloat16)
        y = tl.dot(xh, r)
        if PIECES > 1:
            rem = xf - xh.to(tl.float32)
            xm = rem.to(tl.bfloat16)
            y += tl.dot(xm, r)
            if PIECES > 2:
                y += tl.dot((rem - xm.to(tl.float32)).to(tl.bfloat16), r)
    return y


@triton.jit
def _quant_segment(xf, segm, R, col0, rs, LV, BD, E, oc_row, tmask,
                   D: tl.constexpr, DS: tl.constexpr, BITS: tl.constexpr, NCOL: tl.constexpr,
                   PIECES: tl.constexpr, NORM_CORR: tl.constexpr, QJL: tl.constexpr, DC: tl.constexpr,
                   BLOCK_T: tl.constexpr):
    """Quantize + pack one segment, DC output channels at a time (bounds the [D, DC] operand in shared memory).

    Returns the fp16 scale ``[T]`` and, with QJL, ``c[idx] @ rot`` in original channel order ``[T, D]`` fp32.
    """
    n = tl.sqrt(tl.sum(tl.where(segm[None, :], xf * xf, 0.0), 1))
    inv_n = 1.0 / tl.maximum(n, 1e-30)
    csq = tl.zeros_like(n)
    xr = tl.zeros_like(xf)
    for c0 in tl.static_range(0, DS, DC):
        y = _rot_dot(xf, R, col0 + c0, D, DC, NCOL, PIECES) * rs
        y = y / tl.maximum(n, 1e-30)[:, None]
        # Binary search for #{k : bounds[k] < y} over the sorted bounds (2^BITS − 1 of them).
        idx = tl.zeros_like(y.to(tl.int32))
        for step in tl.static_range(BITS):
            cand = idx + (1 << (BITS - 1 - step))
            bk = tl.load(BD + cand - 1)
            idx = tl.where(bk < y, cand, idx)
        c = tl.load(LV + idx)
        csq += tl.sum(c * c, 1)
        _pack_store(oc_row + c0 * BITS // 8, tmask, idx, BITS, DC, BLOCK_T)
        if QJL:
            e = tl.load(E + (col0 + c0 + tl.arange(0, DC))[:, None] * D + tl.arange(0, D)[None, :])
            xr += tl.dot(c, e, input_precision="tf32x3")
    if NORM_CORR:
        sc = n / tl.maximum(tl.sqrt(csq), 1e-30)
    else:
        sc = n
    sc = tl.minimum(sc, 65504.0).to(tl.float16)
    return sc, xr


@triton.jit
def _encode_kernel(
    X, stride_xb, stride_xh, stride_xn,  # [B, Hkv, N, D] fp16/bf16/fp32 new tokens
    R, RS,  # [D, D0+D1] fp32 rotation (rows in original channel order; ±1 when PIECES ≥ 1), [2] post-scales
    SEG, CS,  # [D] int32 segment of each original channel, [D] fp32 channel scale
    LV, BD,  # [2, 256] fp32 levels, bounds (row = segment)
    E, SK,  # QJL: [D0+D1, D] fp32 unrotation to original order, [D, D] fp32 sketchᵀ with permuted rows
    OC, stride_ocb, stride_och, stride_oct,  # codes   [B, Hkv, cap, wC] uint8
    ON, stride_onb, stride_onh, stride_ont,  # norms   [B, Hkv, cap, S] fp16
    OS, stride_osb, stride_osh, stride_ost,  # qjl_signs [B, Hkv, cap, D/8] uint8
    OG, stride_ogb, stride_ogh, stride_ogt,  # qjl_norms [B, Hkv, cap, 1] fp16
    N, start,
    HKV: tl.constexpr, D: tl.constexpr,
    D0: tl.constexpr, B0: tl.constexpr, D1: tl.constexpr, B1: tl.constexpr,
    QJL: tl.constexpr, NORM_CORR: tl.constexpr, HAS_CS: tl.constexpr, PIECES: tl.constexpr,
    BLOCK_T: tl.constexpr, DC: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_t = tl.program_id(1)
    b = pid_bh // HKV
    h = pid_bh % HKV
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = offs_t < N
    offs_d = tl.arange(0, D)
    NCOL: tl.constexpr = D0 + D1

    x_ptr = X + b * stride_xb + h * stride_xh + offs_t[:, None] * stride_xn + offs_d[None, :]
    xf = tl.load(x_ptr, mask=tmask[:, None], other=0.0).to(tl.float32)
    if HAS_CS:
        xf = xf / tl.load(CS + offs_d)[None, :]
    seg = tl.load(SEG + offs_d)

    slot = start + offs_t
    oc_row = OC + b * stride_ocb + h * stride_och + slot * stride_oct
    on_row = ON + b * stride_onb + h * stride_onh + slot * stride_ont

    DC0: tl.constexpr = DC if DC < D0 else D0
    sc0, xr0 = _quant_segment(xf, seg == 0, R, 0, tl.load(RS), LV, BD, E, oc_row, tmask,
                              D, D0, B0, NCOL, PIECES, NORM_CORR, QJL, DC0, BLOCK_T)
    tl.store(on_row, sc0, mask=tmask)
    if D1 > 0:
        DC1: tl.constexpr = DC if DC < D1 else D1
        sc1, xr1 = _quant_segment(xf, seg == 1, R, D0, tl.load(RS + 1), LV + 256, BD + 256, E,
                                  oc_row + D0 * B0 // 8, tmask, D, D1, B1, NCOL, PIECES, NORM_CORR, QJL, DC1, BLOCK_T)
        tl.store(on_row + 1, sc1, mask=tmask)

    if QJL:
        # Residual against what is stored (fp16 scales), in the channel-scaled original order.
        xr = sc0.to(tl.float32)[:, None] * xr0
        if D1 > 0:
            xr += sc1.to(tl.float32)[:, None] * xr1
        r = xf - xr
        os_row = OS + b * stride_osb + h * stride_osh + slot * stride_ost
        for j0 in tl.static_range(0, D, DC):
            sk = tl.load(SK + offs_d[:, None] * D + (j0 + tl.arange(0, DC))[None, :])
            proj = tl.dot(r, sk, input_precision="tf32x3")
            _pack_store(os_row + j0 // 8, tmask, (proj > 0).to(tl.int32), 1, DC, BLOCK_T)
        gam = tl.minimum(tl.sqrt(tl.sum(r * r, 1)), 65504.0).to(tl.float16)
        tl.store(OG + b * stride_ogb + h * stride_ogh + slot * stride_ogt, gam, mask=tmask)


# ---------------------------------------------------------------------------------------------- launcher
def encode_unsupported_reason(codec, x: torch.Tensor | None = None) -> str | None:
    from ..codec.turbo import TurboQuantizer

    if not isinstance(codec, TurboQuantizer):
        return f"codec is {type(codec).__name__}, the encode kernel writes TurboQuant only"
    if len(codec.segments) > 2:
        return "more than two segments"
    if getattr(codec, "shared_norm", False):
        return "split='rotated' (one norm over a full-width rotation): the encode kernel rotates per segment"
    for d_s, b_s in codec.segments:
        if b_s not in (1, 2, 3, 4, 8):
            return f"segment of {b_s} bits (kernel packs 1, 2, 3, 4, 8)"
        if d_s < 16 or d_s & (d_s - 1):
            return f"segment of {d_s} channels (needs a power of two >= 16)"
    if codec.channel_scale.dim() != 1:
        return "per-head channel scales (the encode kernel reads one shared scale vector)"
    d = codec.dim
    if d & (d - 1) or not 16 <= d <= 256:
        return f"dim {d} (kernel covers powers of two 16..256)"
    if x is not None and x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"input dtype {x.dtype}"
    return None


_ENC_CACHE: dict = {}


def _enc_matrices(codec, device):
    key = (id(codec), str(device), codec.perm._version, codec.channel_scale._version, codec.perm.data_ptr())
    hit = _ENC_CACHE.get(key)
    if hit is not None and hit[0] is codec:
        return hit[1]
    d = codec.dim
    perm = codec.perm.to(device)
    ncol = sum(d_s for d_s, _ in codec.segments)
    R = torch.zeros(d, ncol, device=device)
    E = torch.zeros(ncol, d, device=device)
    seg = torch.zeros(d, dtype=torch.int32, device=device)
    lv = torch.zeros(2, 256, device=device)
    bd = torch.full((2, 256), float("inf"), device=device)
    rs = torch.ones(2, device=device)
    signs_only = True
    off = 0
    for s, (d_s, b_s) in enumerate(codec.segments):
        rot, levels, bounds = (t.to(device) for t in codec._seg(s))
        ch = perm[off : off + d_s]
        R[ch, off : off + d_s] = rot.T
        E[off : off + d_s][:, ch] = rot
        seg[ch] = s
        lv[s, : 1 << b_s] = levels
        bd[s, : (1 << b_s) - 1] = bounds
        mag = rot.abs()
        if torch.all(mag == mag[0, 0]):
            rs[s] = mag[0, 0]
        else:
            signs_only = False
        off += d_s
    if signs_only and device.type != "cpu":
        R = torch.sign(R).to(torch.bfloat16)  # ±1 (and 0 off-segment): exact in bf16; the 1/√d_s magnitude is applied after
    if not (signs_only and device.type != "cpu"):
        rs.fill_(1.0)
        signs_only = False
    sk = torch.zeros(d, d, device=device)
    if codec.qjl:
        sk[perm] = codec.sketch.to(device).T
    out = (R.contiguous(), rs, seg, codec.channel_scale.to(device).float().contiguous(), lv, bd,
           E.contiguous(), sk.contiguous(), signs_only)
    if len(_ENC_CACHE) > 64:
        _ENC_CACHE.clear()
    _ENC_CACHE[key] = (codec, out)
    return out


def encode_into(codec, x: torch.Tensor, fields: dict, start: int, *, block_t: int | None = None) -> None:
    """Quantize ``x [B, Hkv, N, d]`` with ``codec`` and write slots ``[start, start+N)`` of ``fields``.

    Args:
        codec: a :class:`~tqcache.codec.TurboQuantizer` (calibrated first from ``x`` if it needs it).
        x: new tokens, fp16/bf16/fp32, any strides with a contiguous last dim; must be finite (not checked).
        fields: preallocated buffers ``{"codes": [B, Hkv, cap, wC] uint8, "norms": [B, Hkv, cap, S] fp16}``
            plus ``"qjl_signs" [.., d/8] uint8`` and ``"qjl_norms" [.., 1] fp16`` with QJL; ``cap ≥ start+N``.
        start: first slot to write (same for every sequence and head).

    Writes exactly what ``codec.quantize(x)`` returns, byte for byte, up to coordinates within a few fp32 ulps
    of a decision boundary (see the module docstring).

    Example::

        >>> bufs = {k: torch.empty(B, H, cap, w, dtype=dt, device="cuda") for k, (w, dt) in c.field_widths().items()}
        >>> encode_into(c, k_new, bufs, start=t)
    """
    why = encode_unsupported_reason(codec, x)
    if why:
        raise ValueError(f"unsupported by the Triton encode kernel: {why}")
    if x.dim() != 4 or x.shape[-1] != codec.dim:
        raise ValueError(f"x must be [B, Hkv, N, {codec.dim}], got {tuple(x.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    B, H, N, d = x.shape
    widths = codec.field_widths()
    for name, (w, dt) in widths.items():
        t = fields.get(name)
        if t is None or t.dim() != 4 or tuple(t.shape[:2]) != (B, H) or t.shape[3] != w or t.dtype != dt:
            got = None if t is None else (tuple(t.shape), t.dtype)
            raise ValueError(f"field {name!r} must be [{B}, {H}, cap, {w}] {dt}, got {got}")
        if t.shape[2] < start + N or start < 0:
            raise ValueError(f"field {name!r} has capacity {t.shape[2]}, cannot write slots [{start}, {start + N})")
        if t.stride(-1) != 1:
            raise ValueError(f"field {name!r} needs a contiguous last dimension")
        if t.device != x.device:
            raise ValueError(f"field {name!r} is on {t.device}, x on {x.device}")
    if N == 0:
        return
    if codec.needs_calibration and not bool(codec.calibrated):
        codec.calibrate(x)
    if x.device.type == "cpu":
        patch_interpreter()
    R, rs, seg, cs, lv, bd, E, sk, signs_only = _enc_matrices(codec, x.device)
    if not signs_only or x.device.type == "cpu":
        # Haar rotations, and the CPU interpreter (its tl.dot mishandles bf16 operands): plain fp32 products.
        pieces = 0
    elif codec.use_channel_scale or x.dtype == torch.float32:
        pieces = 3
    else:
        pieces = 1 if x.dtype == torch.bfloat16 else 2
    (D0, B0), (D1, B1) = (codec.segments + [(0, 0)])[:2]
    oc, on = fields["codes"], fields["norms"]
    os_, og = (fields["qjl_signs"], fields["qjl_norms"]) if codec.qjl else (oc, on)
    # 32 tokens per program (128 measured 2x slower on H100: register spills of the [128, d] fp32 tile).
    bt = block_t or (32 if d <= 128 else 16)
    grid = (B * H, triton.cdiv(N, bt))
    _encode_kernel[grid](
        x, x.stride(0), x.stride(1), x.stride(2),
        R, rs, seg, cs, lv, bd, E, sk,
        oc, oc.stride(0), oc.stride(1), oc.stride(2),
        on, on.stride(0), on.stride(1), on.stride(2),
        os_, os_.stride(0), os_.stride(1), os_.stride(2),
        og, og.stride(0), og.stride(1), og.stride(2),
        N, int(start),
        HKV=H, D=d, D0=D0, B0=B0, D1=D1, B1=B1,
        QJL=bool(codec.qjl), NORM_CORR=bool(codec.norm_correction), HAS_CS=bool(codec.use_channel_scale),
        PIECES=pieces, BLOCK_T=bt, DC=64, num_warps=4,
    )
