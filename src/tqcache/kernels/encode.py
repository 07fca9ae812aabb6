"""TurboQuant encode/append in Triton: rotate + quantize + pack, written straight into the cache's buffers.

Twin and spec: :meth:`tqcache.codec.TurboQuantizer.quantize`. Per token row ``x [d]`` and segment ``s``
(``x_w = (x · (1/channel_scale))[perm]``, rounded to bf16 when the codec's ``bf16_working``; segment ``s`` =
working channels ``[o_s, o_s + d_s)``)::

    n_s   = ‖x_{w,s}‖
    y_s   = (x_{w,s} @ rot_sᵀ) / n_s
    idx_s = #{k : bounds_s[k] < y_s}                     (ties go to the lower level, as torch.bucketize)
    code_s = code_order(idx_s): idx_s from L/2 up, else L/2 − 1 − idx_s      (sign-magnitude, L = 2^b_s)
    n̂_s   = n_s / ‖levels_s[idx_s]‖   (norm correction; else n_s), clamped to 65504 and stored as fp16
    QJL:   r = x_w − ⊕_s (n̂_s·levels_s[idx_s]) @ rot_s,  signs = [S·r > 0],  γ = ‖r‖ (fp16)
           (d ≤ 128: computed as r_rot @ (E·Sᵀ) and ‖r_rot‖ from the rotated residual r_rot = y − n̂·levels)

The permutation and the channel scale (one vector, or one per KV head) are folded into what the kernel
multiplies by, so it reads ``x`` in its original channel order once. Bytes per token (d = 128, bf16 in, 4 bits
out): 256 read + 66 written.

How (v11, v16, v21, v22). A persistent grid of as many programs as the GPU holds at once; each keeps its segments'
±1 rotation blocks in shared memory for its whole life (d ≤ 128; at d = 256 one [128, 128] block of the Hadamard
rotation, whose two halves a butterfly combines: :func:`_butterfly`) and walks 64-token tiles, two or three in
flight.
Per tile: one tensor-core product for the rotation, the norm from the rotated row, the level index — the
Lloyd–Max codebooks are symmetric, so |y| and its sign suffice, and the sign-magnitude code is ``m + (y > 0)·L/2``
— and the packing. The rotation's columns are in *thread order* (:func:`thread_order`): the accumulator then
gives each thread d_s/4 consecutive coordinates of its rows, whose 2-, 3- and 4-bit codes it packs into whole
words in its own registers — a shift-add or multiply-add per code (:func:`_words_local`; 3 bits as
``pack_codes``' 32-code units W0, W1, H, :func:`_unit3_from_nibbles`) — and stores whole, so a warp writes whole
sectors. (5-bit codes, and byte stores into a misaligned buffer, take two more tensor-core products per word
instead, :func:`_half_dot`.) The level index: below 4 bits from comparisons against the positive bounds baked in
as compile-time constants (``_levels_sym``: one ``set`` per bound whose 0/1 results the FMA pipe sums into the
level and its square); from 4 bits by estimate and correction (``_levels_grid``: a fitted quadratic lands within
one level, one comparison settles it, warp shuffles read the bound and the squared level). Codebooks that are
not symmetric take a binary search over the bounds in memory; symmetric ones of 6–8 bits a table of uniform cells
over |y|, each holding at most one bound (``_levels_cells``: one comparison).

Exactness. Codes must equal the torch codec's (``torch.equal``) up to ties. With a Hadamard rotation every
matrix entry is ``±1/√d_s``, so the kernel multiplies by the exact ±1 matrix on the bf16 tensor cores — one
product when ``x_w`` is bf16 (bf16 input without a channel scale, or the codec's bf16 working space), else the
input split into 2–3 bf16 pieces so every product is exact — and scales by ``1/√d_s`` afterwards; Haar
rotations use ``tf32x3``. The summation order, a multiply by 1/n instead of a division and the norm taken from
the rotated row move a value by a few fp32 ulps, so a coordinate within that distance of a decision boundary
may land on its other side (one level off), and a stored norm may differ by one fp16 ulp; tests bound both.
``exact=True`` (the default on the CPU interpreter) divides, takes norms from ``x`` and honours torch's tie
rule to the bit.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._codec_key import cached, codec_key, remember
from ._compat import patch_interpreter
from ._launch import Plans, Replay, int_spec, int_width

__all__ = ["encode_into", "encode_unsupported_reason"]

@triton.jit
def _pack_dot(code, BITS: tl.constexpr, DS: tl.constexpr, PER: tl.constexpr, FIRST: tl.constexpr,
              CNT: tl.constexpr, NW: tl.constexpr):
    """``Σ_{i<CNT} code[u·PER + FIRST + i] · 2^(BITS·i)`` for each packing unit u: ``[T, NW]`` int32.

    A product ``code @ W`` on the tensor cores, ``W[c, u] = 2^(BITS·i)`` for the unit's codes: every operand is
    a whole number exact in fp16 and every sum stays below 2^24, so the fp32 accumulator is exact. NW ≥ 16
    (tl.dot's minimum N): columns past DS/PER are zero.
    """
    c = tl.arange(0, DS)[:, None]
    u = tl.arange(0, NW)[None, :]
    i = c % PER - FIRST
    w = tl.where((c // PER == u) & (i >= 0) & (i < CNT), tl.exp2((i * BITS).to(tl.float32)), 0.0)
    return tl.dot(code, w.to(code.dtype), out_dtype=tl.float32).to(tl.int32)


@triton.jit
def _half_dot(code, BITS: tl.constexpr, DS: tl.constexpr, NW: tl.constexpr, HALF: tl.constexpr):
    """Bits ``[32·j + 16·HALF, +16)`` of the row's LSB-first code stream, for each 32-bit word j: ``[T, NW]`` int32.

    Code c occupies stream bits ``[b·c, b·c + b)``; the product ``code @ W`` with ``W[c, j] = 2^(b·c − lo)`` (lo =
    the half's first bit) over every code that overlaps the half sums them in place. At 5 bits (and 3, whose
    TurboQuant rows use :func:`_unit3_store` instead) a code may start up to b − 1 bits below lo (weights 2^-1 ..
    2^-(b−1): exact in fp16, and the sum, below 2^20, is exact in fp32 with those fractional bits, which the
    conversion drops) or run past the half's top (masked); 1, 2 and 4 bits never straddle. Weights stay ≤ 2^15,
    within fp16.
    """
    c = tl.arange(0, DS)[:, None]
    j = tl.arange(0, NW)[None, :]
    e = c * BITS - (32 * j + 16 * HALF)  # exponent of code c in this half
    w = tl.where((e < 16) & (e + BITS > 0), tl.exp2(e.to(tl.float32)), 0.0)
    s = tl.dot(code, w.to(code.dtype), out_dtype=tl.float32).to(tl.int32)
    if 16 % BITS != 0:
        s = s & 0xFFFF
    return s


@triton.jit
def _unit3_store(ptr_row, tmask, code, DS: tl.constexpr, WORDS: tl.constexpr):
    """Store the whole 3-bit units of ``code [T, DS]`` (``tqcache.codec.packing``: 32 codes in three words W0, W1,
    H) at ``ptr_row [T]``: whole int32 words (``WORDS``, rows 4-byte aligned) or their bytes.

    First the nibble words ``N_q`` of each unit's groups q (nibble j = code 8q + j): those are the 4-bit stream
    of the codes, two tensor-core products (:func:`_half_dot` with 4 bits; a 3-bit code
    fills bits 0–2 of its nibble); then :func:`_unit3_from_nibbles`."""
    NW4: tl.constexpr = DS // 8 if DS // 8 >= 16 else 16  # tl.dot's N ≥ 16: nibble words past DS/8 are zero
    nib = _half_dot(code, 4, DS, NW4, 0) | (_half_dot(code, 4, DS, NW4, 1) << 16)  # [T, NW4]: word 4u + q
    _unit3_from_nibbles(ptr_row, tmask, nib, DS, WORDS)


@triton.jit
def _unit3_from_nibbles(ptr_row, tmask, nib, DS: tl.constexpr, WORDS: tl.constexpr):
    """Store the 3-bit units of a row from its nibble words ``nib [T, NW4]`` (word 4u + q: nibble j = code 8q + j
    of unit u; words past DS/8 are ignored): per unit ``W_k = N_2k & 0x33.. | (N_2k+1 & 0x33..) << 2`` and ``H``
    = the four groups' bit-2 planes moved to bits (2, 3, 0, 1) of each nibble — its two halves from groups (0, 1)
    and (2, 3) side by side, added across the pair (disjoint bits): integer operations on ``[T, NW4]`` words."""
    NW4: tl.constexpr = nib.shape[1]
    U: tl.constexpr = NW4 // 4
    T: tl.constexpr = nib.shape[0]
    e0, e1 = tl.split(tl.reshape(nib, [T, U, 2, 2]))  # q = 2k + e -> [T, U, 2(k)] each
    LO2: tl.constexpr = 0x33333333
    HI1: tl.constexpr = 0x44444444
    w = (e0 & LO2) | ((e1 & LO2) << 2)  # W_k: the low bit pairs of groups 2k (bits 0-1) and 2k + 1 (bits 2-3)
    k = tl.arange(0, 2)[None, None, :]
    a = e0 & HI1
    b = e1 & HI1
    h = tl.sum(tl.where(k == 0, a | (b << 1), (a >> 2) | (b >> 1)), 2)  # top bits of groups 0, 1 | 2, 3
    u = tl.arange(0, U)
    ok = tmask[:, None] & (u < DS // 32)[None, :]
    ow = (3 * u)[None, :, None] + k  # W_k at word 3u + k, H at 3u + 2
    oh = (3 * u + 2)[None, :]
    if WORDS:
        ptr = ptr_row.to(tl.pointer_type(tl.int32), bitcast=True)
        tl.store(ptr[:, None, None] + ow, w, mask=ok[:, :, None])
        tl.store(ptr[:, None] + oh, h, mask=ok)
    else:
        for i in tl.static_range(4):
            tl.store(ptr_row[:, None, None] + 4 * ow + i, ((w >> (8 * i)) & 255).to(tl.uint8), mask=ok[:, :, None])
            tl.store(ptr_row[:, None] + 4 * oh + i, ((h >> (8 * i)) & 255).to(tl.uint8), mask=ok)


@triton.jit
def _thread_major(code, DS: tl.constexpr):
    """``code [T, DS]`` computed against the rotation's columns in *thread order* (:func:`thread_order`: column
    ``8g + 2t + e`` holds coordinate ``(DS/4)·t + 2g + e``), viewed in natural coordinate order. On the GPU the
    rotation product's accumulator gives thread t of a quad columns ``8g + 2t + {0, 1}`` of every 8-column tile,
    so in this view each thread holds DS/4 consecutive coordinates of its rows — whole words of codes — and the
    view is a relabelling of registers, no data moves."""
    T: tl.constexpr = code.shape[0]
    return tl.reshape(tl.permute(tl.reshape(code, [T, DS // 8, 4, 2]), (0, 2, 1, 3)), [T, DS])


@triton.jit
def _pair(x, T: tl.constexpr, NW: tl.constexpr, N: tl.constexpr, SH: tl.constexpr):
    """``x [T, NW, N]`` → ``[T, NW, N/2]``: entry i is ``x[2i] + x[2i + 1] · 2^SH`` (int32: a shift-add, mod 2^32;
    fp32: one multiply-add)."""
    a, b = tl.split(tl.reshape(x, [T, NW, N // 2, 2]))
    if x.dtype == tl.int32:
        y = a + (b << SH)
    else:
        y = tl.fma(b, (1 << SH) * 1.0, a)
    return y


@triton.jit
def _sum_tree(x, T: tl.constexpr, NW: tl.constexpr, N: tl.constexpr, SH: tl.constexpr):
    """``Σ_i x[.., i] · 2^(SH·i)`` over the last axis of ``x [T, NW, N]`` (N = 4, 8 or 16) as a tree of
    :func:`_pair` steps: ``[T, NW]``."""
    x = _pair(x, T, NW, N, SH)
    x = _pair(x, T, NW, N // 2, 2 * SH)
    if N >= 8:
        x = _pair(x, T, NW, N // 4, 4 * SH)
    if N >= 16:
        x = _pair(x, T, NW, N // 8, 8 * SH)
    return tl.reshape(x, [T, NW])


@triton.jit
def _words_local(code, BITS: tl.constexpr, DS: tl.constexpr):
    """The LSB-first words ``[T, DS·BITS/32]`` int32 of ``code [T, DS]`` (natural order; BITS 2 or 4). With the
    codes in :func:`_thread_major`'s view every operand is in the thread's own registers: about one operation per
    code, no tensor-core product, no shared memory. Two forms of the codes, as the level searches give them:

    * fp32 whole numbers (:func:`_levels_sym`): multiply-adds within each 16-bit half (exact: every sum stays
      below 2^16), then ``2^23 +`` the half puts its bits at the bottom of the fp32 pattern — one add and one bit
      operation per half;
    * int32 fp32 patterns of ``2^23 + code`` (:func:`_levels_grid` with BIAS: its estimate is that number already):
      ``Σ_i bits_i << (BITS·i)`` mod 2^32, one shift-add per code, less the constant the 2^23 terms add up to.
    """
    T: tl.constexpr = code.shape[0]
    NWD: tl.constexpr = DS * BITS // 32
    if code.dtype == tl.int32:
        w = _sum_tree(tl.reshape(code, [T, NWD, 32 // BITS]), T, NWD, 32 // BITS, BITS)
        # Σ_i 2^23 · 2^(BITS·i) mod 2^32, as a signed int32
        OFF: tl.constexpr = (0x4B000000 * ((1 << 32) - 1) // ((1 << BITS) - 1)) % (1 << 32)
        SOFF: tl.constexpr = OFF - (1 << 32) if OFF >= (1 << 31) else OFF
        w = w - SOFF
    else:
        h = _sum_tree(tl.reshape(code, [T, 2 * NWD, 16 // BITS]), T, 2 * NWD, 16 // BITS, BITS)
        lo, hi = tl.split(tl.reshape((h + 8388608.0).to(tl.int32, bitcast=True), [T, NWD, 2]))
        w = (lo & 0xFFFF) | (hi << 16)  # (the shift drops hi's exponent bits)
    return w


@triton.jit
def _pack_store_local(ptr_row, tmask, code, BITS: tl.constexpr, DS: tl.constexpr):
    """:func:`_pack_store`'s words (WORDS) from codes in the rotation's thread order (either form of
    :func:`_words_local`), packed in registers."""
    nat = _thread_major(code, DS)
    if BITS == 3:
        _unit3_from_nibbles(ptr_row, tmask, _words_local(nat, 4, DS), DS, True)
    else:
        NWD: tl.constexpr = DS * BITS // 32
        j = tl.arange(0, NWD)[None, :]
        ptr = ptr_row.to(tl.pointer_type(tl.int32), bitcast=True)
        tl.store(ptr[:, None] + j, _words_local(nat, BITS, DS), mask=tmask[:, None])


@triton.jit
def _pack_store(ptr_row, tmask, code, BITS: tl.constexpr, DS: tl.constexpr, WORDS: tl.constexpr):
    """Store codes ``code [T, DS]`` (whole numbers < 2^BITS in fp16 or fp32, natural channel order; 8 bits: any
    dtype, one byte per code) at ``ptr_row [T]``: LSB-first bit streams, except 3 bits, which take
    ``tqcache.codec.packing``'s layout — whole units of 32 codes (12 bytes: words W0, W1, H), then any
    remaining DS mod 32 codes in the stream.

    WORDS (rows 4-byte aligned, DS·BITS a multiple of 32 — at 3 bits, DS a multiple of 32): whole 32-bit words,
    each from two tensor-core packing products (its low and high 16 bits, :func:`_half_dot`; 3 bits:
    :func:`_unit3_store`: the 4-bit products, then bit operations), so a warp's store covers whole 32-byte
    sectors. Otherwise bytes (3 bits: the units' words byte by byte, the tail as below; 5 bits: 5 bytes per 8 codes from two
    packing products of 4 codes). Byte stores cost a sector per lane: 3-bit values wrote 12.6 M sectors for
    0.3 M of output (H100, 32K tokens × 8 heads)."""
    if BITS == 8:
        tl.store(ptr_row[:, None] + tl.arange(0, DS)[None, :], code.to(tl.uint8), mask=tmask[:, None])
    elif WORDS:
        NWD: tl.constexpr = DS * BITS // 32
        NW: tl.constexpr = 16 if NWD <= 16 else (32 if NWD <= 32 else 64)  # a power of two ≥ 16
        j = tl.arange(0, NW)[None, :]
        if BITS == 3:
            tl.static_assert(DS % 32 == 0, "3-bit word stores need whole units")
            _unit3_store(ptr_row, tmask, code, DS, True)
        else:
            word = _half_dot(code, BITS, DS, NW, 0) | (_half_dot(code, BITS, DS, NW, 1) << 16)
            ptr = ptr_row.to(tl.pointer_type(tl.int32), bitcast=True)
            tl.store(ptr[:, None] + j, word, mask=tmask[:, None] & (j < NWD))
    else:
        PER: tl.constexpr = 8 if BITS == 3 or BITS == 5 else 8 // BITS
        NU: tl.constexpr = DS // PER
        NW: tl.constexpr = NU if NU >= 16 else 16
        u = tl.arange(0, NW)[None, :]
        umask = tmask[:, None] & (u < NU)
        # 3 bits: the whole units (4 groups of 8 codes each), as bytes of their words; the stream below then
        # covers only the groups after them (a group g of the tail sits at byte 3g either way).
        G3: tl.constexpr = 4 * (DS // 32) if BITS == 3 else 0
        if G3 > 0:
            _unit3_store(ptr_row, tmask, code, DS, False)
        if BITS == 3 or BITS == 5:  # 8 codes = BITS bytes, from two products of 4 codes (≤ 20 bits each)
            if G3 < NU:
                lo = _pack_dot(code, BITS, DS, 8, 0, 4, NW).to(tl.int64)
                word = lo | (_pack_dot(code, BITS, DS, 8, 4, 4, NW).to(tl.int64) << (4 * BITS))
                p = ptr_row[:, None] + u * BITS
                for k in tl.static_range(BITS):
                    tl.store(p + k, ((word >> (8 * k)) & 255).to(tl.uint8), mask=umask & (u >= G3))
        else:
            byte = _pack_dot(code, BITS, DS, PER, 0, PER, NW)
            tl.store(ptr_row[:, None] + u, byte.to(tl.uint8), mask=umask)


@triton.jit
def _load_rot(R, col0, D: tl.constexpr, DS: tl.constexpr, NCOL: tl.constexpr):
    """Columns ``[col0, col0 + DS)`` of the rotation ``R [D, NCOL]`` (original channel order in rows)."""
    return tl.load(R + tl.arange(0, D)[:, None] * NCOL + col0 + tl.arange(0, DS)[None, :])


@triton.jit
def _rot_dot(x, r, PIECES: tl.constexpr):
    """``x [T, D] @ r [D, DS]`` in fp32: exact products — bf16 ``x`` as is, fp16/fp32 ``x`` split into 2–3 bf16
    pieces, against the bf16 ±1 matrix (PIECES ≥ 1) — or tf32x3 on a general fp32 matrix (PIECES = 0)."""
    if PIECES == 0:
        y = tl.dot(x.to(tl.float32), r, input_precision="tf32x3")
    elif PIECES == 1:
        y = tl.dot(x.to(tl.bfloat16), r)
    else:
        xf = x.to(tl.float32)
        xh = xf.to(tl.bfloat16)
        rem = xf - xh.to(tl.float32)
        xm = rem.to(tl.bfloat16)
        y = tl.dot(xh, r) + tl.dot(xm, r)
        if PIECES > 2:
            y += tl.dot((rem - xm.to(tl.float32)).to(tl.bfloat16), r)
    return y


@triton.jit
def _levels_sym(y, PB: tl.constexpr, LS: tl.constexpr, LQ: tl.constexpr, EXACT: tl.constexpr,
                WANT_MAG: tl.constexpr, SC):
    """Level index and squared level of each normalised coordinate, for a codebook symmetric about 0.

    With L = 2^b levels the middle bound is 0, ``bounds[L/2 + j] = −bounds[L/2 − 2 − j]`` and
    ``levels[L/2 + m] = −levels[L/2 − 1 − m]``, so ``idx = #{k : bounds[k] < y}`` needs only the L/2 − 1
    positive bounds ``PB``: with ``m = #{pb < |y|}``, idx = L/2 + m for y > 0 and L/2 − 1 − m for y ≤ 0 (±0 take
    the lower level, as in torch), so the stored (sign-magnitude) code is L/2 + m or m. ``PB``, the positive levels ``LS`` and their fp32 squares ``LQ`` are
    compile-time constants: comparisons against immediates, no gathers, no registers.

    EXACT (the CPU interpreter): bit-identical to torch — |y| is nudged up one ulp for y < 0 (torch counts
    "≤" there; no float lies in between) and m and levels² come from select chains. GPU: each bound is one
    ``set`` (1.0 if |y| > pb, an ALU op) whose result the FMA pipe adds to m and to the row's count of values
    past that bound; the row's Σ levels² is then ``width · LQ[0] + Σ_j (LQ[j+1] − LQ[j]) · count_j`` (v11 summed
    the steps per value, one multiply-add per bound more). An exact tie on a negative bound is one of the
    boundary ties the module docstring allows. ``y`` may come unnormalised (GPU), with ``SC [T, 1]`` the factor
    that normalises it back (n / rs): the bounds are scaled per row instead of every value (one multiply per value
    fewer; the product's rounding moves only boundary ties). Returns ``(code, Σ_row levels[idx]² [T],
    |levels[idx]|)`` (code int32 with EXACT, else a whole-number fp32; the last only when WANT_MAG).
    """
    HALF: tl.constexpr = len(LS)
    pos = y > 0
    a = tl.abs(y)
    if EXACT:
        a = (a.to(tl.int32, bitcast=True) + tl.where(pos, 0, 1)).to(tl.float32, bitcast=True)
        m = tl.zeros(y.shape, tl.int32)
        msq = tl.zeros(y.shape, tl.float32) + LQ[0]
        for j in tl.static_range(HALF - 1):
            # The bounds are sorted, so the last one below |y| decides: selects, not sums, keep the squared
            # level bit-identical to levels[idx]².
            p = a > PB[j]
            m = tl.where(p, j + 1, m)
            msq = tl.where(p, LQ[j + 1], msq)
        code = tl.where(pos, HALF + m, m)
        csq = tl.sum(msq, 1)
    else:
        # Σ levels² of a row = Σ_j (LQ[j+1] − LQ[j]) · #{values past bound j} + width · LQ[0]: the per-bound counts
        # are row sums of the 0/1 steps (one add per value and bound), not a squared level per value (a multiply-
        # add per value and bound, then a row sum) — exact integers, one rounding per bound and row.
        m = tl.zeros(y.shape, tl.float32)
        csq = tl.zeros((y.shape[0],), tl.float32) + LQ[0] * y.shape[1]
        for j in tl.static_range(HALF - 1):
            s = tl.where(a > PB[j] * SC, 1.0, 0.0)
            m += s
            csq = tl.fma(tl.sum(s, 1), LQ[j + 1] - LQ[j], csq)
        code = tl.fma(pos.to(tl.float32), HALF * 1.0, m)  # (a 0/1 value, not a predicate kept live till the packing)
    mag = csq
    if WANT_MAG:
        mag = tl.zeros(y.shape, tl.float32) + LS[0]
        for j in tl.static_range(HALF - 1):
            mag = tl.where(m > j, LS[j + 1], mag)
    return code, csq, mag


@triton.jit
def _levels_grid(y, nrow, TG, GC1: tl.constexpr, GC2: tl.constexpr, GA: tl.constexpr, HALF: tl.constexpr,
                 WANT_MAG: tl.constexpr, ASM: tl.constexpr, BIAS: tl.constexpr = 0.0):
    """Code, the row's Σ levels² and |level| of normalised coordinates for a symmetric codebook, in a fixed
    handful of operations whatever the bit width (the GPU's path; :func:`grid_map` finds the constants).

    ``m = #{pb < |y|}`` is first estimated as ``m0 = ⌊f(|y|) + ½⌋`` with the monotone quadratic ``f(a) = GC1·a +
    GC2·a²``, which puts every positive bound ``pb_j`` inside ``(j + ½, j + 3/2)``: so ``m0`` is ``m`` or ``m + 1``,
    and one exact comparison against ``pb[m0 − 1]`` settles it (``|y|`` is clamped to ``GA`` for the estimate only,
    so that ``m0 ≤ HALF``). ``m0`` is computed as the low bits of ``f(a) + 2^23`` (one fma rounds it to a whole
    number), and ``pb[m0 − 1]`` and ``levels²[m]`` are read from the segment's ``TG`` row — ``[0, 32)``: ``−inf,
    pb_0 .. pb_{P−1}, +inf``; ``[32, 64)``: levels²; ``[64, 96)``: |levels| — addressed by those bits directly.
    7 bounds (4 bits) cost 21 ``set``/add/fma per value on the comparison path, 15 (5 bits) 45; this costs ~9.
    Ties and the returned types are those of :func:`_levels_sym` (non-EXACT): the comparison is exact, and the
    squared level is the table's, bit-identical to ``levels[idx]²``. With BIAS = 2^23 the code comes as the
    whole number 2^23 + code, i.e. the code in the low bits of its fp32 pattern (one subtraction fewer).
    """
    if len(ASM) > 0:  # the same steps in PTX, the table read by a warp shuffle: lane k holds entry k of each row
        # (loaded per row of the tile — two per thread — with the row norm ``nrow`` only fixing the layout)
        t1, t2, t3 = tl.inline_asm_elementwise(_LANE_TABLE, "=f,=f,=f,l,f", [TG.to(tl.int64), nrow[:, None]],
                                               dtype=(tl.float32, tl.float32, tl.float32), is_pure=True, pack=1)
        if WANT_MAG:
            mf, msq, mag = tl.inline_asm_elementwise(ASM, "=f,=f,=f,f,f,f,f", [y, t1, t2, t3],
                                                     dtype=(tl.float32, tl.float32, tl.float32), is_pure=True, pack=1)
        else:
            mf, msq = tl.inline_asm_elementwise(ASM, "=f,=f,f,f,f", [y, t1, t2],
                                                dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
            mag = msq
    else:
        tab = TG - 0x4B000000  # the bits of 2^23 + k, as an offset, address entry k
        a = tl.abs(y)
        am = tl.minimum(a, GA)
        ub = tl.fma(am, tl.fma(am, GC2, GC1), 8388608.0).to(tl.int32, bitcast=True)  # 2^23 + m0, as fp32 bits
        mi = ub - (a <= tl.load(tab + ub)).to(tl.int32)  # 2^23 + m
        msq = tl.load(tab + 32 + mi)
        mf = mi.to(tl.float32, bitcast=True)
        mag = msq
        if WANT_MAG:
            mag = tl.load(tab + 64 + mi)
    if BIAS == 0.0:
        mf = mf - 8388608.0
    code = tl.fma((y > 0).to(tl.float32), HALF * 1.0, mf)  # sign-magnitude: L/2 + m or m (+ BIAS = 2^23)
    return code, tl.sum(msq, 1), mag


# Lane k of the warp loads entry k of the three table rows (32 fp32 each).
_LANE_TABLE = tl.constexpr("{\n.reg .u32 l;\n.reg .u64 ad;\nmov.u32 l, %laneid;\nmad.wide.u32 ad, l, 4, $3;\n"
                           "ld.global.nc.f32 $0, [ad];\nld.global.nc.f32 $1, [ad+128];\n"
                           "ld.global.nc.f32 $2, [ad+256];\n}")

# The shuffles run on the shared-memory pipe, one warp-wide per clock per SM: two per value cost ~9 µs per 32K × 8
# heads, so below 4 bits the comparison chain (3 bounds or fewer) stays faster. H100, bf16 in, same process
# (benchmarks/results/encode_h100_v16_grid_ab.json), µs chain -> grid: 4-bit values 65.4 -> 53.3, keys 69.7
# -> 55.3; 5-bit keys 117.3 -> 58.7; 3-bit values 47.7 -> 53.5, 2-bit 40.6 -> 52.4.
GRID_MIN_BITS = 4


def grid_asm(g: tuple[float, float, float], want_mag: bool) -> str:
    """PTX of :func:`_levels_grid`'s steps for one value: ``$0`` = 2^23 + m (fp32), ``$1`` = levels² [, ``$2`` =
    |level|] from the inputs y and the lane's table entries (``_LANE_TABLE``); the constants are fp32
    immediates, and ``shfl.sync.idx`` takes the source lane from the low 5 bits of 2^23 + m0's bits. (Reading
    levels²[m0] and levels²[m0 − 1] beside the bound instead of levels²[m] after it — three shuffles, a shorter
    chain — measured slower: 4-bit values 53.3 -> 63.0 µs.)"""
    import struct

    c1, c2, ga = ("0f%08X" % struct.unpack("<I", struct.pack("<f", v))[0] for v in g)
    n = 3 if want_mag else 2
    y, t1, t2, t3 = (f"${n + i}" for i in range(4))
    return ("{\n.reg .f32 a, am, t, u, p, le;\n.reg .u32 ub;\n"
            f"abs.f32 a, {y};\nmin.f32 am, a, {ga};\nfma.rn.f32 t, am, {c2}, {c1};\n"
            "fma.rn.f32 u, am, t, 0f4B000000;\nmov.b32 ub, u;\n"
            f"shfl.sync.idx.b32 p, {t1}, ub, 0x1f, 0xffffffff;\n"
            # 1.0 where |y| <= the bound, subtracted in fp32 (exact at 2^23 + m0). (A predicate per value, guarding
            # an integer subtract, ran ptxas out of predicate registers once the packing left many values in
            # flight: 90 P2R per tile, 4-bit keys.)
            "set.le.f32.f32 le, a, p;\nsub.f32 u, u, le;\nmov.b32 ub, u;\n"
            f"shfl.sync.idx.b32 $1, {t2}, ub, 0x1f, 0xffffffff;\n"
            + (f"shfl.sync.idx.b32 $2, {t3}, ub, 0x1f, 0xffffffff;\n" if want_mag else "")
            + "mov.b32 $0, ub;\n}")


@triton.jit
def _levels_search(y, LV, BD, BITS: tl.constexpr):
    """General codebooks: binary search for ``idx = #{k : bounds[k] < y}`` over the sorted bounds (gathers).
    Returns ``(code_order(idx), Σ_row levels[idx]², levels[idx])``."""
    idx = tl.zeros_like(y.to(tl.int32))
    for step in tl.static_range(BITS):
        cand = idx + (1 << (BITS - 1 - step))
        bk = tl.load(BD + cand - 1)
        idx = tl.where(bk < y, cand, idx)
    c = tl.load(LV + idx)
    half: tl.constexpr = 1 << (BITS - 1)
    return tl.where(idx >= half, idx, (half - 1) - idx), tl.sum(c * c, 1), c


@triton.jit
def _scaled(x, c, MUL16: tl.constexpr, ROUND16: tl.constexpr, PIECES: tl.constexpr):
    """``x · c`` (``c [D]`` fp32 reciprocal channel scales, broadcast over the rows). MUL16: bf16 ``x`` and a
    bf16-exact ``c``: their product is exact in fp32, so one bf16x2 multiply (rounded once) gives the fp32 path's
    ``bf16(x · c)`` bit for bit, at a quarter of its ops. ROUND16: the codec's bf16 working space (one exact
    piece; PIECES = 0 — fp32 products, and the interpreter, whose bf16 casts truncate — rounds to nearest even
    by hand)."""
    if MUL16:
        y = tl.inline_asm_elementwise("mul.rn.bf16x2 $0, $1, $2;", "=r,r,r", [x, c.to(tl.bfloat16)[None, :]],
                                      dtype=tl.bfloat16, is_pure=True, pack=2)
    else:
        y = x.to(tl.float32) * c[None, :]
        if ROUND16:
            if PIECES == 0:
                bits = y.to(tl.int32, bitcast=True)
                bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
                y = bits.to(tl.float32, bitcast=True)
            else:
                y = y.to(tl.bfloat16)
    return y  # (one return: Triton wants every return of one type, dead branches included)


@triton.jit
def _levels_cells(y, CT, WINV: tl.constexpr, K: tl.constexpr, HALF: tl.constexpr, WANT_MAG: tl.constexpr):
    """Code, the row's Σ levels² and |level| of normalised coordinates for a symmetric codebook of many levels (6–8
    bits), from a table of uniform cells over |y| narrower than any gap between bounds (:func:`cell_map`): cell
    ``k = ⌊|y|·WINV⌋`` (fp32, clamped to K) holds at most one positive bound ``pb`` and counts ``m0`` bounds below
    it, so ``m = #{pb < |y|} = m0 + (|y| > pb)`` — three independent gathers and one that depends on them, instead
    of a binary search's eight dependent ones. ``CT``: ``[pb per cell (K + 1) | m0 (K + 1) | levels² (HALF) |
    |levels| (HALF)]`` fp32. Ties as :func:`_levels_sym` (non-EXACT)."""
    a = tl.abs(y)
    k = tl.minimum((a * WINV).to(tl.int32), K)
    m = tl.load(CT + (K + 1) + k) + (a > tl.load(CT + k)).to(tl.float32)
    mi = m.to(tl.int32)
    lq = tl.load(CT + 2 * (K + 1) + mi)
    mag = lq
    if WANT_MAG:
        mag = tl.load(CT + 2 * (K + 1) + HALF + mi)
    return tl.fma((y > 0).to(tl.float32), HALF * 1.0, m), tl.sum(lq, 1), mag


@triton.jit
def _quant_segment(xin, segm, r, R, col0, rs, LV, BD,
                   PB: tl.constexpr, LS: tl.constexpr, LQ: tl.constexpr, E, oc_row, tmask,
                   D: tl.constexpr, DS: tl.constexpr, BITS: tl.constexpr, NCOL: tl.constexpr,
                   PIECES: tl.constexpr, NORM_CORR: tl.constexpr, QJL: tl.constexpr, DC: tl.constexpr,
                   HOIST: tl.constexpr, SYM: tl.constexpr, EXACT: tl.constexpr, WORDS: tl.constexpr,
                   TG, G: tl.constexpr, GASM: tl.constexpr, LOCAL: tl.constexpr, PRE: tl.constexpr = False,
                   y2=None, BFLY: tl.constexpr = False, CT=None, CELL: tl.constexpr = ()):
    """Quantize + pack one segment of the tile ``xin [T, D]`` (input dtype, channel-scaled).

    HOIST: ``r`` is the segment's rotation block ``[D, DS]``, loaded once per program, and the segment is one
    chunk (DC = DS); PRE (and HOIST): ``r`` is the rotated segment itself, ``[T, DS]`` fp32; BFLY (PRE, HOIST):
    ``r`` and ``y2`` are its two chunks ``[T, DS/2]`` (DC = DS/2; see the kernel); else ``[D, DC]`` chunks are
    streamed from ``R``. Returns the fp16 scale ``[T]`` and, with QJL, ``c[idx] @ rot`` in original channel
    order ``[T, D]`` fp32 — or, HOIST, the residual in rotated coordinates ``y·rs − scale·c[idx]`` ``[T, DS]``.
    """
    csq = tl.zeros((xin.shape[0],), tl.float32)
    xr = tl.zeros(xin.shape, tl.float32)
    if PRE:
        y = r
    elif HOIST:
        y = _rot_dot(xin, r, PIECES)
    if HOIST and not EXACT:
        # ‖x_s‖ from the rotated row itself (the rotation is orthogonal up to rs): no fp32 copy of the input
        # tile, no channel mask. It differs from torch's ‖x_s‖ by fp32 rounding only (boundary ties, ≤ 1 ulp).
        if BFLY:
            n = tl.sqrt(tl.sum(y * y, 1) + tl.sum(y2 * y2, 1)) * rs
        else:
            n = tl.sqrt(tl.sum(y * y, 1)) * rs
    else:
        xf = xin.to(tl.float32)
        n = tl.sqrt(tl.sum(tl.where(segm[None, :], xf * xf, 0.0), 1))
    nc = tl.maximum(n, 1e-30)
    inv = rs / nc
    GRID: tl.constexpr = len(G) > 0 and not EXACT
    for c0 in tl.static_range(0, DS, DC):
        if not HOIST:
            y = _rot_dot(xin, _load_rot(R, col0 + c0, D, DC, NCOL), PIECES)
        if BFLY and c0 > 0:
            y = y2
        if EXACT:  # the torch codec divides; the CPU interpreter matches it bit for bit
            yn = (y * rs) / nc[:, None]
        else:  # one multiply: differs from the division by ≤ 1 ulp, i.e. only for boundary ties
            yn = y * inv[:, None]
        # Each returns the stored code, the row's Σ levels² and (QJL) |level| per value.
        if GRID:  # G = (GC1, GC2, GA): the estimate-and-correct path (LOCAL: codes as the fp32 whole numbers
            # 2^23 + code, whose bit patterns the packing adds up)
            code, csq_r, mag = _levels_grid(yn, n, TG, G[0], G[1], G[2], len(LS), QJL, GASM,
                                            8388608.0 if LOCAL else 0.0)
        elif SYM and not EXACT:  # |y| against the bounds times n / rs: a multiply per row and bound, not per value
            code, csq_r, mag = _levels_sym(y, PB, LS, LQ, EXACT, QJL, (nc / rs)[:, None])
        elif SYM:
            code, csq_r, mag = _levels_sym(yn, PB, LS, LQ, EXACT, QJL, 1.0)
        elif len(CELL) > 0 and not EXACT:  # CELL = (WINV, K): the cell table (6–8 bits)
            code, csq_r, mag = _levels_cells(yn, CT, CELL[0], CELL[1], 1 << (BITS - 1), QJL)
        else:
            code, csq_r, mag = _levels_search(yn, LV, BD, BITS)
        csq += csq_r
        # (3 bits: a chunk of a longer segment is DC ≥ 64 codes, whole 32-code units, so the segment's units
        # continue at byte 3·c0/8 as the stream would)
        if LOCAL:
            # (2^23 + code from the estimate, as its fp32 pattern; the others' whole numbers as fp32)
            _pack_store_local(oc_row + c0 * BITS // 8, tmask,
                              code.to(tl.int32, bitcast=True) if GRID else code.to(tl.float32), BITS, DC)
        else:
            # Codes enter the packing products as whole numbers: fp16 on the GPU, fp32 (exact dot) in the
            # interpreter; 8-bit codes are stored as they are.
            code = code if BITS == 8 else code.to(tl.float32 if EXACT else tl.float16)
            _pack_store(oc_row + c0 * BITS // 8, tmask, code, BITS, DC, WORDS)
        if QJL:
            c = tl.where(y > 0, mag, -mag) if SYM else mag
            if not HOIST:
                e = tl.load(E + (col0 + c0 + tl.arange(0, DC))[:, None] * D + tl.arange(0, D)[None, :])
                xr += tl.dot(c, e, input_precision="tf32x3")
    if NORM_CORR:
        sc = n / tl.maximum(tl.sqrt(csq), 1e-30)
    else:
        sc = n
    sc = tl.minimum(sc, 65504.0).to(tl.float16)
    if QJL and HOIST:  # (one chunk: y and c are the whole segment) the residual against what is stored, in rotated
        # coordinates — the rotation is orthogonal, so its norm is γ's and the kernel sketches it through E·S
        xr = y * rs - sc.to(tl.float32)[:, None] * c
    return sc, xr


# Not specialized on the token count, the first slot or the tile counts: they change with every prefill chunk, and
# each new divisibility class would be another compile of seconds (the stores' alignment comes from the strides).
@triton.jit(do_not_specialize=["N", "start", "n_tiles", "n_items"])
def _encode_kernel(
    X, stride_xb, stride_xh, stride_xn,  # [B, Hkv, N, D] fp16/bf16/fp32 new tokens
    R, RS,  # [D, D0+D1] fp32 rotation (rows in original channel order; ±1 when PIECES ≥ 1), [2] post-scales
    SEG, CS, stride_csh,  # [D] int32 segment of each original channel; [Hkv or 1, D] fp32 1 / channel scale
    LV, BD,  # [2, 256] fp32 levels, bounds (row = segment)
    TG,  # [2, 96] fp32 per segment: shifted positive bounds, levels², |levels| (see _levels_grid)
    CT,  # [2, CLEN] fp32 per segment: the cell table of _levels_cells (CELL0 / CELL1)
    E, SK,  # QJL: [D0+D1, D] fp32 unrotation to original order (HOIST: M = E·SK), [D, D] fp32 sketchᵀ, permuted rows
    OC, stride_ocb, stride_och, stride_oct,  # codes   [B, Hkv, cap, wC] uint8
    ON, stride_onb, stride_onh, stride_ont,  # norms   [B, Hkv, cap, S] fp16
    OS, stride_osb, stride_osh, stride_ost,  # qjl_signs [B, Hkv, cap, D/8] uint8
    OG, stride_ogb, stride_ogh, stride_ogt,  # qjl_norms [B, Hkv, cap, 1] fp16
    N, start, n_tiles, n_items,
    HKV: tl.constexpr, D: tl.constexpr,
    D0: tl.constexpr, B0: tl.constexpr, D1: tl.constexpr, B1: tl.constexpr,
    QJL: tl.constexpr, NORM_CORR: tl.constexpr, HAS_CS: tl.constexpr, CS_BF16: tl.constexpr, CS_MUL16: tl.constexpr,
    PIECES: tl.constexpr,
    HOIST: tl.constexpr, SYM: tl.constexpr, EXACT: tl.constexpr,
    BLOCK_T: tl.constexpr, DC: tl.constexpr, WORDS: tl.constexpr, WORDS_QJL: tl.constexpr, LOCAL: tl.constexpr,
    X_REGS: tl.constexpr = False, FOLD: tl.constexpr = False, BFLY: tl.constexpr = False,
    # SYM: per segment, positive bounds, levels and levels² (fp32; see _levels_sym)
    PB0: tl.constexpr = (), LS0: tl.constexpr = (), LQ0: tl.constexpr = (),
    PB1: tl.constexpr = (), LS1: tl.constexpr = (), LQ1: tl.constexpr = (),
    # per segment, the (GC1, GC2, GA) of _levels_grid, or () for the comparison chain, and its PTX (GPU) or ""
    G0: tl.constexpr = (), G1: tl.constexpr = (), GASM0: tl.constexpr = "", GASM1: tl.constexpr = "",
    # per segment, the (WINV, K) of _levels_cells, or (); CLEN: the table's row length
    CELL0: tl.constexpr = (), CELL1: tl.constexpr = (), CLEN: tl.constexpr = 0,
):
    """Persistent grid: program p encodes tiles p, p + P, ... of the ``n_items = B·Hkv·n_tiles`` token tiles,
    so the rotation blocks (HOIST) are read from L2 once per program, not once per tile. FOLD: the key scales
    are powers of two folded into a rotation per KV head (``R [Hkv, D, D0]``), and the grid is G programs per
    (batch, KV head) pair, each keeping its pair's rotation and taking its tiles g, g + G, ..."""
    offs_d = tl.arange(0, D)
    NCOL: tl.constexpr = D0 + D1
    seg = tl.load(SEG + offs_d)
    rs0 = tl.load(RS)
    rs1 = tl.load(RS + 1)
    r0 = R
    r1 = R
    # Two equal segments (turbo3.5, turbo2.5): one [D, D0 + D1] product for both, not two of half the width (H100:
    # turbo3.5 keys / values 51.5 / 49.5 -> 49.4 / 46.9 µs).
    ONE: tl.constexpr = HOIST and D1 > 0 and D0 == D1
    if BFLY:  # R is the [D/2, D/2] block R00
        r0 = tl.load(R + tl.arange(0, D // 2)[:, None] * (D // 2) + tl.arange(0, D // 2)[None, :])
    elif FOLD:  # G programs per (batch, KV head) pair; R [Hkv, D, NCOL] holds each head's scaled rotation
        G = tl.num_programs(0) // (n_items // n_tiles)
        pair = tl.program_id(0) // G
        r0 = _load_rot(R + (pair % HKV) * D * NCOL, 0, D, D0, NCOL)
    elif ONE:
        r0 = _load_rot(R, 0, D, NCOL, NCOL)
    elif HOIST:
        r0 = _load_rot(R, 0, D, D0, NCOL)
        if D1 > 0:
            r1 = _load_rot(R, D0, D, D1, NCOL)
    if QJL and HOIST:  # E holds M = E·Sᵀ [D0 + D1, D] (encode_into), each segment's rows kept for the program's life
        m0 = tl.load(E + tl.arange(0, D0)[:, None] * D + offs_d[None, :])
        m1 = m0
        if D1 > 0:
            m1 = tl.load(E + (D0 + tl.arange(0, D1))[:, None] * D + offs_d[None, :])
    if FOLD:  # this pair's tiles g, g + G, ...
        i0 = tl.program_id(0) % G
        i_step = G
        i_end = n_tiles
    else:  # every pair's tiles, p, p + P, ... of all B·Hkv·n_tiles
        i0 = tl.program_id(0)
        i_step = tl.num_programs(0)
        i_end = n_items
    for item in range(i0, i_end, i_step):
        if FOLD:
            pid_bh = pair
            pid_t = item
        else:
            pid_bh = item // n_tiles
            pid_t = item % n_tiles
        b = pid_bh // HKV
        h = pid_bh % HKV
        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        tmask = offs_t < N

        if BFLY:
            # Head_dim 256, one segment, a Hadamard rotation: R = [[R00, R00], [R10, −R10]] with R10 = diag(t)·R00
            # (encode_into checks it), so y = [a + b, a − b] with a = x_lo @ R00 and b = (x_hi·t) @ R00 — two
            # [T, 128] × [128, 128] products on one block kept for the program's life, instead of [T, 256] ×
            # [256, 256] streamed from L2 in [256, 64] chunks per tile. t is folded into the high half of CS (which
            # holds [1, t] when the codec has no channel scale): x_hi·t is exact. x is the low half from here on.
            HD: tl.constexpr = D // 2
            offs_x = tl.arange(0, HD)
            xp = X + b * stride_xb + h * stride_xh + offs_t[:, None] * stride_xn + offs_x[None, :]
            x = tl.load(xp, mask=tmask[:, None], other=0.0)
            xh = _scaled(tl.load(xp + HD, mask=tmask[:, None], other=0.0),
                         tl.load(CS + h * stride_csh + HD + offs_x), CS_MUL16, CS_BF16, PIECES)
        else:
            offs_x = offs_d
            x = tl.load(X + b * stride_xb + h * stride_xh + offs_t[:, None] * stride_xn + offs_d[None, :],
                        mask=tmask[:, None], other=0.0)
        if X_REGS:  # the tile through registers (identity moves): see encode_into
            x = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=tl.bfloat16, is_pure=True, pack=2)
        if FOLD:  # the scale is in the rotation
            pass
        elif HAS_CS:  # the reciprocal channel scale: one shared vector (stride_csh = 0) or one per KV head; the
            # codec's bf16 working space (TurboQuantizer.bf16_working) rounds it to one exact bf16 piece
            x = _scaled(x, tl.load(CS + h * stride_csh + offs_x), CS_MUL16, CS_BF16, PIECES)

        slot = start + offs_t
        oc_row = OC + b * stride_ocb + h * stride_och + slot * stride_oct
        on_row = ON + b * stride_onb + h * stride_onh + slot * stride_ont

        DC0: tl.constexpr = DC if DC < D0 else D0
        if BFLY:  # the segment's two chunks, y = [a + b, a − b]
            a = _rot_dot(x, r0, PIECES)
            bq = _rot_dot(xh, r0, PIECES)
            q0 = a + bq
            q1 = a - bq
        elif ONE:  # both segments rotated by one product, its halves split apart (whole 8-column tiles each: the
            # split is a relabelling of registers)
            q0, q1 = tl.split(tl.permute(tl.reshape(_rot_dot(x, r0, PIECES), [BLOCK_T, 2, D0]), (0, 2, 1)))
        else:  # each segment's rotation block
            q0 = r0
            q1 = r1
        sc0, xr0 = _quant_segment(x, seg == 0, q0, R, 0, rs0, LV, BD, PB0, LS0, LQ0, E, oc_row, tmask,
                                  D, D0, B0, NCOL, PIECES, NORM_CORR, QJL, DC0, HOIST or BFLY, SYM, EXACT, WORDS, TG, G0,
                                  GASM0, LOCAL, ONE or BFLY, y2=q1, BFLY=BFLY, CT=CT, CELL=CELL0)
        tl.store(on_row, sc0, mask=tmask)
        if D1 > 0:
            DC1: tl.constexpr = DC if DC < D1 else D1
            sc1, xr1 = _quant_segment(x, seg == 1, q1, R, D0, rs1, LV + 256, BD + 256, PB1, LS1, LQ1, E,
                                      oc_row + D0 * B0 // 8, tmask, D, D1, B1, NCOL, PIECES, NORM_CORR, QJL, DC1,
                                      HOIST, SYM, EXACT, WORDS, TG + 96, G1, GASM1, LOCAL, ONE, CT=CT + CLEN,
                                      CELL=CELL1)
            tl.store(on_row + 1, sc1, mask=tmask)

        if QJL and HOIST:
            # The segments' rotated residuals (fp16 scales, as stored) times the hoisted M_s = E_s·Sᵀ: S·r without
            # unrotating r, and γ = ‖r‖ from the rotated coordinates.
            proj = tl.dot(xr0, m0, input_precision="tf32x3")
            g2 = tl.sum(xr0 * xr0, 1)
            if D1 > 0:
                proj += tl.dot(xr1, m1, input_precision="tf32x3")
                g2 += tl.sum(xr1 * xr1, 1)
            os_row = OS + b * stride_osb + h * stride_osh + slot * stride_ost
            _pack_store(os_row, tmask, (proj > 0).to(tl.float32 if EXACT else tl.float16), 1, D, WORDS_QJL)
            gam = tl.minimum(tl.sqrt(g2), 65504.0).to(tl.float16)
            tl.store(OG + b * stride_ogb + h * stride_ogh + slot * stride_ogt, gam, mask=tmask)
        elif QJL:
            # Residual against what is stored (fp16 scales), in the channel-scaled original order.
            xr = sc0.to(tl.float32)[:, None] * xr0
            if D1 > 0:
                xr += sc1.to(tl.float32)[:, None] * xr1
            r = x.to(tl.float32) - xr
            os_row = OS + b * stride_osb + h * stride_osh + slot * stride_ost
            QC: tl.constexpr = DC if DC < D else D
            for j0 in tl.static_range(0, D, QC):
                sk = tl.load(SK + offs_d[:, None] * D + (j0 + tl.arange(0, QC))[None, :])
                proj = tl.dot(r, sk, input_precision="tf32x3")
                _pack_store(os_row + j0 // 8, tmask, (proj > 0).to(tl.float32 if EXACT else tl.float16), 1, QC,
                            WORDS_QJL)
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
        if b_s not in (1, 2, 3, 4, 5, 8):
            return f"segment of {b_s} bits (kernel packs 1, 2, 3, 4, 5, 8)"
        if d_s < 16 or d_s & (d_s - 1):
            return f"segment of {d_s} channels (needs a power of two >= 16)"
    if x is not None and codec.channel_scale.dim() != 1 and codec.channel_scale.shape[0] != x.shape[1]:
        return f"{codec.channel_scale.shape[0]} per-head channel scales for {x.shape[1]} KV heads"
    d = codec.dim
    if d & (d - 1) or not 16 <= d <= 256:
        return f"dim {d} (kernel covers powers of two 16..256)"
    if x is not None and x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"input dtype {x.dtype}"
    return None


def cell_map(levels: torch.Tensor, bounds: torch.Tensor) -> tuple[float, int, torch.Tensor] | None:
    """``(WINV, K, table)`` of :func:`_levels_cells` for a symmetric codebook (CPU fp32 table), or None.

    Cells are ``k(a) = ⌊fl32(a · WINV)⌋``, with ``1/WINV`` just under the smallest gap between positive bounds. The
    map is monotone, so every bound in a lower cell than ``a``'s is below ``a`` and every bound in a higher one is
    not; only a bound in ``a``'s own cell needs comparing, and the fp32 products checked here (the kernel computes
    the same) put at most one in each. Cell K collects everything past the last bound."""
    half = len(levels) // 2
    pb = bounds[half:].float().cpu()
    pos = levels[half:].float().cpu()
    if len(pb) < 2:
        return None
    winv = float(torch.tensor(1.0 / (0.98 * float((pb[1:] - pb[:-1]).min())), dtype=torch.float32))
    k = torch.floor(pb * torch.tensor(winv, dtype=torch.float32)).long()
    if bool(torch.any(k[1:] <= k[:-1])):  # two bounds in one cell (cannot happen with a gap-wide cell; checked)
        return None
    K = int(k[-1]) + 1
    if K > 4096:
        return None
    pbc = torch.full((K + 1,), float("inf"))
    pbc[k] = pb
    m0 = torch.searchsorted(k, torch.arange(K + 1)).float()  # #{j : k_j < cell}
    return winv, K, torch.cat([pbc, m0, pos * pos, pos])


@functools.lru_cache(maxsize=256)  # ~15–20 ms per call; every layer's codec of one width shares its codebook
def grid_map(pb: tuple[float, ...]) -> tuple[float, float, float] | None:
    """Constants ``(GC1, GC2, GA)`` of :func:`_levels_grid` for the sorted positive bounds ``pb`` of a symmetric
    codebook, or None when no quadratic fits (the kernel then compares against every bound).

    Wanted: ``f(a) = GC1·a + GC2·a²`` increasing on ``[0, GA]`` with ``j + ½ < f(pb_j) < j + 3/2`` for every j —
    then ``⌊f(a) + ½⌋`` is ``#{pb < a}`` or one more — and ``f(GA) < P + 3/2``, which caps the estimate at
    ``P + 1``. For fixed GC2 the conditions bound GC1 from both sides; a scan over GC2 keeps the widest margin
    (the Lloyd–Max bounds of 2–5 bits at d = 32..256 leave 0.28–0.5 of a cell). The fp32 constants are then
    checked as the kernel evaluates them, around every bound and on a fine grid over ``[0, 1]``.
    """
    import numpy as np

    P = len(pb)
    if P == 0 or P > 30 or pb[0] <= 0:
        return None
    b = np.asarray(pb, dtype=np.float64)
    j = np.arange(P, dtype=np.float64)
    best = None
    for c2 in np.linspace(-1.5, 1.5, 1201) * (P + 1) / b[-1] ** 2:
        lo = np.max((j + 0.5 - c2 * b * b) / b)
        hi = np.min((j + 1.5 - c2 * b * b) / b)
        if hi <= max(lo, 0.0):
            continue
        c1 = 0.5 * (lo + hi)
        f = c1 * b + c2 * b * b
        margin = float(np.min(np.minimum(f - (j + 0.5), (j + 1.5) - f)))
        # GA: where f reaches P + 1.4 (the estimate's cap is then P + 1), or f's vertex if it peaks below that;
        # past the last bound, with f increasing up to it.
        top = P + 1.4
        vertex = -c1 / (2 * c2) if c2 < 0 else np.inf
        disc = c1 * c1 + 4 * c2 * top
        ga = top / c1 if c2 == 0 else (vertex if disc < 0 else (-c1 + np.sqrt(disc)) / (2 * c2))
        ga = min(ga, vertex)
        if not b[-1] < ga < np.inf:
            continue
        if best is None or margin > best[0]:
            best = (margin, c1, c2, ga)
    if best is None or best[0] < 0.05:
        return None
    c1, c2, ga = (float(np.float32(v)) for v in best[1:])
    # The kernel's arithmetic in fp32 (fma: an exact product, one rounding) on every bound ± 4 ulps and a grid.
    b32 = b.astype(np.float32)
    samples = [np.linspace(0, 1, 200001, dtype=np.float32), b32, np.float32([0, ga, 1, 4])]
    for toward in (np.float32(0), np.float32(np.inf)):  # 1..4 ulps below and above every bound
        v = b32
        for _ in range(4):
            v = np.nextafter(v, toward)
            samples.append(v)
    a = np.concatenate(samples)
    am = np.minimum(a, np.float32(ga)).astype(np.float64)
    t = (am * c2 + c1).astype(np.float32).astype(np.float64)
    m0 = np.rint(am * t).astype(np.int64)  # = bits of fl(am·t + 2^23) − 2^23 (ties: measure zero, margins)
    tab = np.concatenate([[-np.inf], b32, [np.inf]])
    if m0.min() < 0 or m0.max() > P + 1:
        return None
    m = m0 - (a <= tab[m0])
    if not np.array_equal(m, np.searchsorted(b32, a, side="left")):
        return None
    return c1, c2, ga


_ENC_CACHE: dict = {}


def thread_order(width: int) -> torch.Tensor:
    """Coordinate held by each column of a ``width``-column chunk in *thread order*: column ``8g + 2t + e``
    holds coordinate ``(width/4)·t + 2g + e`` (t < 4, e < 2). The tensor-core accumulator of ``x @ R`` gives lane
    t of each quad columns ``8g + 2t + {0, 1}`` of every 8-column tile, so with ``R``'s columns in this order a
    thread computes width/4 consecutive coordinates — whole words of 2-, 3- and 4-bit codes, which it then packs
    in its own registers (:func:`_pack_store_local`). The stored codes are in natural order either way, and the
    result does not depend on the layout: on a GPU whose accumulator spreads columns otherwise the packing is as
    exact, only no longer free of data movement."""
    c = torch.arange(width)
    return (width // 4) * ((c % 8) // 2) + 2 * (c // 8) + c % 2


def _enc_matrices(codec, device, chunk: int = 0):
    """The kernel's constant tensors and constexprs for ``codec`` on ``device``; ``chunk`` > 0: the rotation's
    columns (and the unrotation's rows) in :func:`thread_order` per chunk of ``min(chunk, d_s)`` of each segment."""
    from ..codec.turbo import pow2_scale

    key = codec_key(codec, device) + (chunk,)
    hit = cached(_ENC_CACHE, key, (codec,))
    if hit is not None:
        return hit
    d = codec.dim
    perm = codec.perm.to(device)
    ncol = sum(d_s for d_s, _ in codec.segments)
    R = torch.zeros(d, ncol, device=device)
    E = torch.zeros(ncol, d, device=device)
    seg = torch.zeros(d, dtype=torch.int32, device=device)
    lv = torch.zeros(2, 256, device=device)
    bd = torch.full((2, 256), float("inf"), device=device)
    tg = torch.full((2, 96), float("inf"), device=device)
    rs = torch.ones(2, device=device)
    signs_only = True
    sym = True
    sym_consts = {}
    cells, tables = {}, []
    off = 0
    for s, (d_s, b_s) in enumerate(codec.segments):
        rot, levels, bounds = (t.to(device) for t in codec._seg(s))
        ch = perm[off : off + d_s]
        if chunk:
            w = min(chunk, d_s)
            order = (torch.arange(0, d_s, w)[:, None] + thread_order(w)[None, :]).reshape(-1).to(device)
            rot = rot[order]  # rows of rot = rotated coordinates = columns of R
        R[ch, off : off + d_s] = rot.T
        E[off : off + d_s][:, ch] = rot
        seg[ch] = s
        lv[s, : 1 << b_s] = levels
        bd[s, : (1 << b_s) - 1] = bounds
        # Lloyd–Max codebooks of the symmetric coordinate density are exactly symmetric (codebook.py enforces
        # it); the register comparison path relies on that, anything else takes the binary search.
        symmetric = bool(torch.equal(levels, -levels.flip(0)) and torch.equal(bounds, -bounds.flip(0)))
        sym &= b_s <= 5 and symmetric
        # 6–8 bits: the cell table instead of the binary search (8-bit keys, H100: see _levels_cells)
        cm = cell_map(levels, bounds) if symmetric and b_s >= 6 else None
        if cm is not None:
            cells[f"CELL{s}"] = cm[:2]
            tables.append((s, cm[2]))
        if sym:  # compile-time constants of the kernel (fp32 values as Python floats; squares in fp32)
            half = 1 << (b_s - 1)
            pos_lv = levels.float().cpu()[half:]
            sym_consts[f"PB{s}"] = tuple(bounds.float().cpu()[half:].tolist())
            sym_consts[f"LS{s}"] = tuple(pos_lv.tolist())
            sq = pos_lv * pos_lv
            sym_consts[f"LQ{s}"] = tuple(sq.tolist())
            g = grid_map(sym_consts[f"PB{s}"]) if b_s >= GRID_MIN_BITS else None
            if g is not None:
                # the GPU reads the table through inline PTX; the interpreter (which runs no PTX) with tl.load
                sym_consts[f"G{s}"] = g
                sym_consts[f"GASM{s}"] = grid_asm(g, bool(codec.qjl)) if device.type == "cuda" else ""
                tg[s, 0] = float("-inf")
                tg[s, 1 : half] = bounds.float()[half:]
                tg[s, 32 : 32 + half] = sq.to(device)
                tg[s, 64 : 64 + half] = pos_lv.to(device)
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
    cs = (1.0 / codec.channel_scale.to(device).float()).reshape(-1, d).contiguous()
    # 1/s exact in bf16 (codecs calibrated since v16 choose their scales so; older saved ones may not be): the
    # kernel may then scale bf16 input with one bf16x2 multiply (CS_MUL16)
    cs_mul16 = device.type == "cuda" and bool(torch.equal(cs, cs.to(torch.bfloat16).float()))
    # powers of two (TurboQuantizer.pow2_scales): the kernel may fold 1/s into the rotation (FOLD). (Both checks read
    # the device once per codec state, here, not per launch plan.)
    cs_pow2 = bool(torch.equal(cs, pow2_scale(cs)))
    clen = max([len(t) for _, t in tables], default=1)
    ct = torch.zeros(2, clen)
    for s, t in tables:
        ct[s, : len(t)] = t
    cells["CLEN"] = clen
    # QJL's M = E·SK: row j sketches rotated coordinate j (kernel column order), S·r = r_rot @ M for r = r_rot @ E
    qm = (E.double() @ sk.double()).float().contiguous() if codec.qjl else E
    out = (R.contiguous(), rs, seg, cs, lv, bd, tg, ct.to(device), E.contiguous(), sk.contiguous(), qm, signs_only,
           cs_mul16, cs_pow2, sym_consts if sym else None, cells)
    return remember(_ENC_CACHE, key, (codec,), out)


def encode_into(codec, x: torch.Tensor, fields: dict, start: int, *, block_t: int | None = None,
                programs_per_sm: int | None = None, num_warps: int = 4, num_stages: int | None = None,
                exact: bool | None = None) -> None:
    """Quantize ``x [B, Hkv, N, d]`` with ``codec`` and write slots ``[start, start+N)`` of ``fields``.

    Args:
        codec: a :class:`~tqcache.codec.TurboQuantizer` (calibrated first from ``x`` if it needs it).
        x: new tokens, fp16/bf16/fp32, any strides with a contiguous last dim; must be finite (not checked).
        fields: preallocated buffers ``{"codes": [B, Hkv, cap, wC] uint8, "norms": [B, Hkv, cap, S] fp16}``
            plus ``"qjl_signs" [.., d/8] uint8`` and ``"qjl_norms" [.., 1] fp16`` with QJL; ``cap ≥ start+N``.
        start: first slot to write (same for every sequence and head).
        block_t, programs_per_sm, num_warps, num_stages: launch overrides for tuning (tokens per tile, persistent
            programs per SM, warps per program, x tiles in flight); the defaults are the H100 sweep's choice.
        exact: bit-identical arithmetic (divisions, x-based norms, two select chains); default: on the CPU
            interpreter only. ``exact=False`` on the CPU runs the GPU's arithmetic in the interpreter (tests).

    Writes exactly what ``codec.quantize(x)`` returns, byte for byte, up to coordinates within a few fp32 ulps
    of a decision boundary (see the module docstring).

    Example::

        >>> bufs = {k: torch.empty(B, H, cap, w, dtype=dt, device="cuda") for k, (w, dt) in c.field_widths().items()}
        >>> encode_into(c, k_new, bufs, start=t)
    """
    if x.dim() == 4 and x.stride(-1) != 1:
        x = x.contiguous()
    # A call like an earlier one — same codec state, the same shapes, strides, dtypes and alignments of x and of
    # every field, the same options — reuses that call's checks, constants and launch (one per layer and decode
    # step, where the host binds): only the slot range is checked again.
    # The key leaves out the token count, the capacity and the stride values — a prefill chunk's window slice has
    # new ones every time — keeping only what Triton specializes on (each stride's int_spec); the kernel does not
    # specialize on N, start and the tile counts at all.
    key = (codec_key(codec, x.device), x.dtype, x.shape[:2], x.shape[3:], tuple(int_spec(st) for st in x.stride()),
           x.data_ptr() & 15,
           tuple((n, t.dtype, t.shape[:2], t.shape[3:], tuple(int_spec(st) for st in t.stride()), t.data_ptr() & 15,
                  t.device) for n, t in fields.items()),
           block_t, programs_per_sm, num_warps, num_stages, exact)
    plan = _PLANS.get(codec, key)
    if plan is not None:
        bt, max_programs, meta, consts, qjl = plan
        N = x.shape[2]
        cap = min(t.shape[2] for t in fields.values())
        if start < 0 or start + N > cap:
            raise ValueError(f"fields have capacity {cap}, cannot write slots [{start}, {start + N})")
        if N == 0:
            return
        n_tiles = -(-N // bt)
        n_items = x.shape[0] * x.shape[1] * n_tiles
        _ENCODE((key, int_width(start)), (_grid(n_items, n_tiles, max_programs, meta["FOLD"]),),
                _encode_args(x, fields, start, consts, qjl, n_tiles, n_items), meta)
        return
    why = encode_unsupported_reason(codec, x)
    if why:
        raise ValueError(f"unsupported by the Triton encode kernel: {why}")
    if x.dim() != 4 or x.shape[-1] != codec.dim:
        raise ValueError(f"x must be [B, Hkv, N, {codec.dim}], got {tuple(x.shape)}")
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
    # (A first read of the flag syncs the device; a CUDA-graph capture of a calibrated codec skips the check.)
    capturing = x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if codec.needs_calibration and not capturing and not codec.is_calibrated():
        codec.calibrate(x)
    on_cpu = x.device.type == "cpu"
    if on_cpu:
        patch_interpreter()
    exact = on_cpu if exact is None else bool(exact)
    hoist = _hoisted(codec)
    # Head_dim 256 in one segment: a Hadamard rotation factors into two products on one [128, 128] block (BFLY,
    # checked on the matrix below; else the [256, 64] chunks stream from L2).
    bfly_try = d == 256 and len(codec.segments) == 1 and not codec.qjl and not exact
    for dc in ((128, 64) if bfly_try else (128 if hoist else 64,)):
        # Whole 32-bit word stores where every row and segment start is 4-byte aligned (always, in buffers the cache
        # allocates); a misaligned view of the caller's gets byte stores.
        words = all(b_s == 8 or (min(dc, d_s) * b_s) % 32 == 0 for d_s, b_s in codec.segments) and \
            aligned4(fields["codes"], (codec.segments[0][0] * codec.segments[0][1]) // 8)
        # Codes packed in registers (2-4 bits, power-of-two chunks of 32-128 codes): the rotation's columns in
        # thread order. Else the tensor-core packing products (5 bits, byte stores of a misaligned buffer).
        local = words and all(b_s in (2, 3, 4) and min(dc, d_s) in (32, 64, 128) for d_s, b_s in codec.segments)
        R, rs, seg, cs, lv, bd, tg, ct, E, sk, qm, signs_only, cs_mul16, cs_pow2, sym_consts, cells = _enc_matrices(
            codec, x.device, dc if local else 0)
        bfly = _butterfly(R) if bfly_try and dc == 128 else None
        if bfly is not None or not bfly_try:
            break
    if not signs_only or on_cpu:
        # Haar rotations, and the CPU interpreter (its tl.dot mishandles bf16 operands): plain fp32 products.
        pieces = 0
    elif codec.bf16_working:
        pieces = 1  # x / s rounded to bf16 in the kernel, as the codec does
    elif codec.use_channel_scale or x.dtype == torch.float32:
        pieces = 3
    else:
        pieces = 1 if x.dtype == torch.bfloat16 else 2
    (D0, B0), (D1, B1) = (codec.segments + [(0, 0)])[:2]
    oc, on = fields["codes"], fields["norms"]
    os_, og = (fields["qjl_signs"], fields["qjl_norms"]) if codec.qjl else (oc, on)
    # Tokens per tile (H100 sweeps, benchmarks/results/encode_h100*.json): 64 fills one warpgroup's MMA (3 bits
    # too, since codes leave as whole words: 111 -> 47 µs for turbo3 values). d = 256 too: its rotation streams
    # from L2 in [256, 64] chunks once per tile, so 16-token tiles read 16× their input from L2 (turbo4 values,
    # 32K tokens × 8 heads: 1147 µs at 16, 237 at 64).
    bt = block_t or 64
    n_tiles = -(-N // bt)
    n_items = B * H * n_tiles
    words_qjl = bool(codec.qjl) and min(dc, d) % 32 == 0 and aligned4(os_)
    # Power-of-two key scales (TurboQuantizer.pow2_scales) on bf16 input: x · (1/s) is exact, so it is folded into
    # a rotation per KV head, R_h = diag(1/s_h) · R (exact: ±2^k in bf16), and the tiles skip the scaling — its
    # copy, shared-memory pass, conversion and multiply per tile (H100, turbo4 keys 46.3 -> 43.8 µs). One segment,
    # hoisted rotation, the GPU's arithmetic (the exact path takes norms from the scaled input).
    fold = bool(codec.use_channel_scale and codec.bf16_working and hoist and D1 == 0 and not exact
                and x.dtype == torch.bfloat16 and pieces <= 1 and cs_pow2)
    if fold:
        R = (cs.expand(H, d)[:, :, None] * R.float()[None]).to(R.dtype).contiguous()
    if bfly is not None:  # R00, and the sign vector t folded into the high half of the reciprocal scales
        R, t = bfly
        if codec.use_channel_scale:
            cs = torch.cat([cs[:, : d // 2], cs[:, d // 2 :] * t], 1).contiguous()
        else:
            cs = torch.cat([torch.ones_like(t), t]).reshape(1, d).contiguous()
    sign16 = x.device.type == "cuda" and x.dtype == torch.bfloat16 and pieces == 1
    if codec.qjl and hoist:  # the sketch of a residual in rotated coordinates: M = E·Sᵀ (float64 on the host)
        E = qm
    consts = (R, rs, seg, cs, cs.stride(0) if cs.shape[0] > 1 else 0, lv, bd, tg, ct, E, sk)
    args = _encode_args(x, fields, start, consts, codec.qjl, n_tiles, n_items)
    meta = dict(
        HKV=H, D=d, D0=D0, B0=B0, D1=D1, B1=B1,
        QJL=bool(codec.qjl), NORM_CORR=bool(codec.norm_correction), HAS_CS=bool(codec.use_channel_scale),
        CS_BF16=codec.bf16_working,
        # (the interpreter runs no PTX: it keeps the fp32 product and rounds by hand). Not with the quadratic level
        # search and the packing products (5 bits): slower there (H100, 5-bit keys 60.2 -> 63.4 µs; 4-bit keys,
        # packed in registers, 49.9 -> 48.4).
        CS_MUL16=bool(codec.bf16_working and x.dtype == torch.bfloat16 and pieces == 1 and cs_mul16
                      and (local or not any(k in (sym_consts or {}) for k in ("G0", "G1"))))
        or (bfly is not None and not codec.use_channel_scale and sign16),  # BFLY: x_hi·t as one bf16x2 multiply
        FOLD=fold, BFLY=bfly is not None,
        PIECES=pieces, HOIST=hoist, SYM=sym_consts is not None, **(sym_consts or {}), **cells, EXACT=exact,
        BLOCK_T=bt,
        # Two or three stages prefetch the next tiles' x: three for 64-token tiles of one piece (turbo4 values
        # 92 -> 66 µs, turbo3 72 -> 47, H100), two for three pieces (their registers: turbo3 keys 116 -> 105 µs);
        # streamed operands and the gathers of the general-codebook path stay single-buffered (the latter also
        # trips Triton 3.6's pipeliner on the packing dot).
        DC=dc, WORDS=words, WORDS_QJL=words_qjl, LOCAL=local,
        # The rotation's left operand from registers rather than straight from the x tile's shared-memory stage:
        # the pipeliner then keeps two stages of x instead of three (70 KB instead of 86: three programs per SM),
        # as the scaled keys always did. H100, same process: turbo4 values 46.9 -> 45.1 µs, turbo3 43.0 -> 41.9,
        # turbo3.5 56.8 -> 49.3. (bf16 x of one piece; the scaled keys' multiply does it anyway.)
        X_REGS=bool(x.device.type == "cuda" and (hoist or bfly is not None) and pieces == 1
                    and x.dtype == torch.bfloat16 and (fold or not codec.use_channel_scale)),
        num_warps=num_warps,
        # (BFLY: three with codes packed in registers, two programs per SM by registers — H100, 32K tokens × 8
        # heads, turbo4 keys: 2 -> 3 stages 106.4 -> 90.0 µs, 4: 131 (encode_h100_v22_d256_stages.json); two with
        # the packing products — 5-bit keys 178 -> 130 µs (encode_h100_v22_d256_stages_b.json))
        num_stages=num_stages or ((3 if local else 2) if bfly is not None else
                                  (3 if bt >= 64 and pieces <= 1 else 2) if hoist and sym_consts is not None else 1),
    )
    if x.device.type == "cuda":
        # Persistent grid: exactly as many programs as fit on the GPU at once (a partial second wave would leave
        # SMs idle while others finish their extra program), or programs_per_sm per SM if that is fewer.
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        per_sm = _resident_per_sm(args, meta, x.device)
        max_programs = sms * min(per_sm, programs_per_sm or per_sm)
    else:
        max_programs = programs_per_sm or 4  # the interpreter: a few programs, each looping
    key = (codec_key(codec, x.device),) + key[1:]  # the codec's state after any calibration above
    _ENCODE((key, int_width(start)), (_grid(n_items, n_tiles, max_programs, meta["FOLD"]),), args, meta)
    _PLANS.put(codec, key, (bt, max_programs, meta, consts, bool(codec.qjl)))


# Per codec, call key -> (tokens per tile, programs at most, constexprs and options, constant tensors, QJL); the key is
# built in encode_into from everything the checks, the constants and Triton's specialization depend on.
_PLANS = Plans()
_ENCODE = Replay(_encode_kernel)


def _butterfly(R: torch.Tensor):
    """``(R00, t)`` when the kernel rotation ``R [d, d]`` (rows: channels, columns: coordinates, each half in the
    same order) is ``[[R00, R00], [diag(t)·R00, −diag(t)·R00]]`` with ``t`` a ±1 vector — a Sylvester–Hadamard
    matrix with random signs is (``H_d = H_2 ⊗ H_{d/2}``) — else None: then ``x @ R = [a + b, a − b]`` with
    ``a = x_lo @ R00`` and ``b = (x_hi·t) @ R00``, exactly (the entries are ±1, or ±1/√d in fp32)."""
    h = R.shape[0] // 2
    r00, r01, r10, r11 = R[:h, :h], R[:h, h:], R[h:, :h], R[h:, h:]
    t = (torch.sign(r10[:, 0].float()) * torch.sign(r00[:, 0].float()))
    ok = (bool(torch.all(t.abs() == 1)) and torch.equal(r01, r00) and torch.equal(r11, -r10)
          and torch.equal(r10, (t[:, None] * r00.float()).to(R.dtype)))
    return (r00.contiguous(), t) if ok else None


def _hoisted(codec) -> bool:
    """Whether each persistent program holds its rotation blocks for its whole life: when they fit (d ≤ 128: ±1
    entries in bf16, ≤ 32 KB); d = 256 streams [d, 64] chunks from L2 per tile instead (a hoisted block is one
    chunk: DC = 128 covers every segment of d ≤ 128). With QJL the program also keeps M = E·Sᵀ (≤ 64 KB fp32),
    which sketches the rotated residual directly."""
    return codec.dim <= 128


def _grid(n_items: int, n_tiles: int, max_programs: int, fold: bool) -> int:
    """Programs to launch: every item's own when there are few, else as many as the GPU holds at once; FOLD: a
    whole number G ≥ 1 of programs per (batch, KV head) pair, at most one per tile."""
    if not fold:
        return min(n_items, max_programs)
    n_bh = n_items // n_tiles
    return n_bh * max(1, min(max_programs // n_bh, n_tiles))


def _encode_args(x, fields, start, consts, qjl, n_tiles, n_items) -> tuple:
    """The runtime arguments of :func:`_encode_kernel` in order."""
    oc, on = fields["codes"], fields["norms"]
    os_, og = (fields["qjl_signs"], fields["qjl_norms"]) if qjl else (oc, on)
    return (
        x, x.stride(0), x.stride(1), x.stride(2), *consts,
        oc, oc.stride(0), oc.stride(1), oc.stride(2),
        on, on.stride(0), on.stride(1), on.stride(2),
        os_, os_.stride(0), os_.stride(1), os_.stride(2),
        og, og.stride(0), og.stride(1), og.stride(2),
        x.shape[2], int(start), n_tiles, n_items,
    )


def aligned4(t: torch.Tensor, *offsets: int) -> bool:
    """Every row of the uint8 buffer ``t`` (and each byte offset into it) starts on a 4-byte boundary — the
    condition for reading or writing its rows as 32-bit words (here, and in the Gluon decode kernel)."""
    return t.data_ptr() % 4 == 0 and all(st % 4 == 0 for st in t.stride()[:-1]) and all(o % 4 == 0 for o in offsets)


_RESIDENT: dict = {}


def _resident_per_sm(args, meta, device) -> int:
    """Programs of this configuration one SM holds at once, from the compiled kernel's registers and shared
    memory (compiled once per configuration; ``warmup`` compiles without launching)."""
    key = (str(device), args[0].dtype, args[4].dtype,
           tuple((k, v) for k, v in meta.items() if not isinstance(v, torch.Tensor)))
    hit = _RESIDENT.get(key)
    if hit is None:
        ck = _encode_kernel.warmup(*args, grid=(1,), **meta)
        if getattr(ck, "n_regs", None) is None and hasattr(ck, "_init_handles"):
            ck._init_handles()  # loads the module: registers are known from then on
        if getattr(ck, "n_regs", None) is None:
            hit = _RESIDENT[key] = 4  # this Triton does not say: the H100 sweep's best
            return hit
        p = torch.cuda.get_device_properties(device)
        threads = 32 * meta["num_warps"]
        regs = -(-max(int(ck.n_regs), 1) // 8) * 8  # allocated per thread in multiples of 8
        by_regs = getattr(p, "regs_per_multiprocessor", 65536) // (regs * threads)
        by_smem = getattr(p, "shared_memory_per_multiprocessor", 233472) // max(int(ck.metadata.shared), 1)
        by_threads = getattr(p, "max_threads_per_multi_processor", 2048) // threads
        hit = _RESIDENT[key] = max(1, min(by_regs, by_smem, by_threads))
    return hit
