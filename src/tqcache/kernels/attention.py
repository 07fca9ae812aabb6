"""Split-K (flash-decoding) attention over a TurboQuant-packed KV cache, in Triton.

Twin and spec: :func:`tqcache.codec.attention.attend_packed`. Same arguments, same return contract.

Math, per KV head (GQA group of ``G`` query heads, ``Lq`` queries each; ``M = G·Lq`` rows ``m = i·G + g``)::

    q̃_m   = rotate_query(q_m) · scale · log2(e)                       (_query_map_kernel, once per step)
    s_mj  = Σ_s n^K_{j,s} · ⟨q̃_{m,s}, c^K_s[idx^K_{j,s}]⟩              (+ γ_j·√(π/2)/d·⟨S q̃_m, sign_j⟩ with QJL)
    per split σ over the key slots:  m_σ = max_j s_mj,  l_σ = Σ_j 2^(s_mj − m_σ),
                                     a_σ = Σ_j 2^(s_mj − m_σ) · (n^V_{j,s} · c^V_s[idx^V_{j,s}])_s
    merge:   m = max_σ m_σ,  l = Σ_σ l_σ 2^(m_σ − m),  out = unrotate(Σ_σ a_σ 2^(m_σ − m) / l),  lse = ln2·(m + log2 l)

Keys are never rotated back; values are accumulated in the rotated space and rotated back once per output
row (a [d, d] product inside the merge kernel). ``c_s`` are the Lloyd–Max centroids of segment ``s``
(one segment for whole bits, two for fractional bits), ``n_{j,s}`` the fp16 per-segment scales (one shared
by both segments for ``split="rotated"``).

Work decomposition: one program per (batch·KV head, split, query tile) covers all ``G`` query heads of the
group, so each compressed K/V byte is read once per query tile — exactly once at decode, where
``M = G·Lq ≤ 16`` fits one tile. The GQA group is padded to ``BLOCK_M = 16`` rows so both products run on
the tensor cores (``tl.dot``). Three launches per step: the query map, the split kernel, and a merge kernel
with one program per output row (log-sum-exp over the splits, normalise, rotate back; at small batches four per
row over column chunks, :func:`merge_chunks`). Prefill chunks
(``M > 16``) use 64-row query tiles and re-read the prefix once per tile.

Decode steps that the Gluon kernel of :mod:`.decode_gluon` covers (``decode_gluon.gluon_reason``: every named
TurboQuant scheme at head_dim 128 and 256; one-segment 2/3/4-bit sides and
8-bit keys at 64; fp16/bf16 queries; QJL keys, at 256 as halves) run it instead (same partials, query map and merge;
``config=dict(..., gluon=False)`` forces this one). Measured (H100, docs/performance.md, v9/v10 — this kernel beside
it): turbo3 0.87–0.91× the speed of bf16 SDPA at 64K–128K here, against 2.23–3.11× on the Gluon kernel, which
takes every named TurboQuant scheme to 1.18–4.04× from 16K on. This kernel is bound by instruction issue and latency
(~6.5 thread instructions per centroid value at 4 bits, ~10 at 3 bits), not by bytes. docs/kernel-notes.md has the
profiles, the versions and next steps.

Bytes read per token per KV head (d = 128): codes ``d·b/8`` + norms ``2·S`` for K and for V, e.g. 4 bits:
64 + 2 + 64 + 2 = 132 B; 3 bits: 100 B; 3.5 bits: 120 B; K4/V3: 116 B. Everything else (queries,
partials, tables) is O(B·Hq·Lq·d) and does not grow with the context.

Unpacking (docs/formats.md, LSB-first bit stream per token row; 3-bit codes in 32-code units of three words
``W0, W1, H``, :func:`tqcache.codec.packing.pack_codes`, with any ``n mod 32`` codes after them in the stream).
**Plane layout** (b ∈ {2, 3, 4}, when each plane keeps ≥ 16 channels, ≥ 32 for keys): for b ∈ {2, 4} one
contiguous byte load per row, byte i holds channels ``i·P + p`` (``P = 8/b``) at bits ``[p·b, (p+1)·b)``; for
b = 3 each unit's three words give its four 8-code groups' nibble words (nibble j = code j), each split into two
16-bit halves, and plane j holds code j of every half (P = 4). Each
plane decodes its own ``[BLOCK_N, d_s/P]`` centroid tile and gets its own ``tl.dot`` — against the matching
query columns for keys, into its own accumulator for values. The plane-major channel order
(:func:`_plane_perm`) is folded into the query map A (columns) and the unrotation U (rows) in torch, so nothing
is re-interleaved at run time. **Centroid lookup:** compiled with fp16 tables, from registers by PTX ``prmt``
(byte permute) — ``_ASM_LUT4`` / ``_ASM_LUT3`` / ``_ASM_LUT2`` below; elsewhere (interpreter, fp32 queries,
a table that is not sign-symmetric) a gather from a ≤ 256-entry table in L1. Other segments (1 and 8 bits,
narrow segments) are read in natural order through ``tl.join`` and the gather.
"""

from __future__ import annotations

import functools
import weakref

import torch
import triton
import triton.language as tl

from ._codec_key import cached, codec_key, remember
from ._compat import patch_interpreter
from ._launch import Plans, Replay, int_spec, int_width
from .encode import aligned4

try:  # programmatic dependent launch's grid controls (gluon_config's PDL; in Triton 3.6, not in every older one)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - depends on the Triton version: steps then launch plainly
    gdc_launch_dependents = gdc_wait = None

__all__ = ["attend_packed_triton", "unsupported_reason", "launch_config"]

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
_BITS_OK = (1, 2, 3, 4, 5, 6, 7, 8)


# ---------------------------------------------------------------------------------------------- helpers
@triton.jit
def _load_word(p, nmask):
    """The little-endian 32-bit word at byte pointers ``p [BLOCK_N, k]`` as int32 (four byte loads: rows are only
    byte-aligned in general)."""
    w = tl.load(p, mask=nmask[:, None], other=0).to(tl.int32)
    w = w | (tl.load(p + 1, mask=nmask[:, None], other=0).to(tl.int32) << 8)
    w = w | (tl.load(p + 2, mask=nmask[:, None], other=0).to(tl.int32) << 16)
    return w | (tl.load(p + 3, mask=nmask[:, None], other=0).to(tl.int32) << 24)


@triton.jit
def _group_nibbles(w0, w1, h, Q: tl.constexpr):
    """Group ``Q`` (codes 8Q..8Q+7) of 3-bit units from their words ``W0, W1, H``: nibble j = code 8Q + j (bit 3 of
    each nibble 0). Low bits: bits 4j + 2(Q mod 2), +1 of W_{Q div 2}; top bit: bit 4j + (2, 3, 0, 1)[Q] of H.
    (int32 shifts are arithmetic: the sign copies land only in bits the masks drop.)"""
    SL: tl.constexpr = 2 * (Q % 2)
    SH: tl.constexpr = (Q + 2) % 4
    if Q < 2:
        lo = (w0 >> SL) & 0x33333333
    else:
        lo = (w1 >> SL) & 0x33333333
    return lo | (((h >> SH) & 0x11111111) << 2)


@triton.jit
def _unit_nibbles(row_ptr, nmask, U: tl.constexpr):
    """The nibble words of the ``4·U`` 8-code groups of ``U`` TurboQuant 3-bit units (codec.packing.pack_codes,
    12 bytes = W0, W1, H each) starting at ``row_ptr``: int32 ``[BLOCK_N, 4U]``, column g = group g (unit g // 4,
    group g % 4), nibble j = code 8g + j."""
    p = row_ptr[:, None] + tl.arange(0, U)[None, :] * 12
    w0 = _load_word(p, nmask)
    w1 = _load_word(p + 4, nmask)
    h = _load_word(p + 8, nmask)
    n0 = _group_nibbles(w0, w1, h, 0)
    n1 = _group_nibbles(w0, w1, h, 1)
    n2 = _group_nibbles(w0, w1, h, 2)
    n3 = _group_nibbles(w0, w1, h, 3)
    # [u, t, v] = n_{2t+v} -> flat 4u + 2t + v = g.
    return tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), (w0.shape[0], 4 * U))


@triton.jit
def _unpack_codes(row_ptr, nmask, BITS: tl.constexpr, DS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Codes of ``DS`` channels at ``BITS`` bits for ``BLOCK_N`` token rows: int32 ``[BLOCK_N, DS]``, natural order.

    ``row_ptr [BLOCK_N]`` points at each row's first byte of this segment's bit stream.
    """
    if BITS == 8:
        offs = tl.arange(0, DS)
        x = tl.load(row_ptr[:, None] + offs[None, :], mask=nmask[:, None], other=0).to(tl.int32)
    elif BITS == 4:
        offs = tl.arange(0, DS // 2)
        b = tl.load(row_ptr[:, None] + offs[None, :], mask=nmask[:, None], other=0).to(tl.int32)
        # byte i = c_{2i} | c_{2i+1} << 4; join puts the pair on a new minor axis -> channel 2i + k.
        x = tl.reshape(tl.join(b & 15, b >> 4), (BLOCK_N, DS))
    elif BITS == 2:
        offs = tl.arange(0, DS // 4)
        b = tl.load(row_ptr[:, None] + offs[None, :], mask=nmask[:, None], other=0).to(tl.int32)
        x0 = b & 3
        x1 = (b >> 2) & 3
        x2 = (b >> 4) & 3
        x3 = (b >> 6) & 3
        # [i, t, u] = x_{2t+u} -> flat 4i + 2t + u: natural order.
        x = tl.reshape(tl.join(tl.join(x0, x2), tl.join(x1, x3)), (BLOCK_N, DS))
    elif BITS == 3 and DS % 32 == 0:
        # TurboQuant 3-bit units (codec.packing.pack_codes): per 32 codes three words W0, W1, H -> the nibble word of
        # each 8-code group (nibble j = code j) -> 8 codes per group, as in the dense branch below at stride 4.
        n = _unit_nibbles(row_ptr, nmask, DS // 32)  # [BLOCK_N, DS/8]: column g = group g
        x0 = n & 7
        x1 = (n >> 4) & 7
        x2 = (n >> 8) & 7
        x3 = (n >> 12) & 7
        x4 = (n >> 16) & 7
        x5 = (n >> 20) & 7
        x6 = (n >> 24) & 7
        x7 = n >> 28  # nibbles are < 8: no mask, no sign
        x = tl.join(tl.join(tl.join(x0, x4), tl.join(x2, x6)), tl.join(tl.join(x1, x5), tl.join(x3, x7)))
        x = tl.reshape(x, (BLOCK_N, DS))
    else:
        # 8 codes per BITS bytes (BITS = 1, 3, 5, 6, 7): one word of 8·BITS bits per group of 8 channels — int32 up
        # to 3 bits, int64 from 5 (40–56 bits). 3 bits here only for fewer than 32 codes: the dense tail of a
        # TurboQuant segment (or all of one under 32 channels; see _kernel_segments).
        offs = tl.arange(0, DS // 8)
        p = row_ptr[:, None] + offs[None, :] * BITS
        WT: tl.constexpr = tl.int64 if BITS > 3 else tl.int32
        w = tl.load(p, mask=nmask[:, None], other=0).to(WT)
        for k in tl.static_range(1, BITS):
            w = w | (tl.load(p + k, mask=nmask[:, None], other=0).to(WT) << (8 * k))
        MK: tl.constexpr = (1 << BITS) - 1
        x0 = (w & MK).to(tl.int32)
        x1 = ((w >> BITS) & MK).to(tl.int32)
        x2 = ((w >> (2 * BITS)) & MK).to(tl.int32)
        x3 = ((w >> (3 * BITS)) & MK).to(tl.int32)
        x4 = ((w >> (4 * BITS)) & MK).to(tl.int32)
        x5 = ((w >> (5 * BITS)) & MK).to(tl.int32)
        x6 = ((w >> (6 * BITS)) & MK).to(tl.int32)
        x7 = ((w >> (7 * BITS)) & MK).to(tl.int32)
        # [i, t, u, v] = x_{4t+2u+v} -> flat 8i + 4t + 2u + v: natural order.
        x = tl.join(tl.join(tl.join(x0, x4), tl.join(x2, x6)), tl.join(tl.join(x1, x5), tl.join(x3, x7)))
        x = tl.reshape(x, (BLOCK_N, DS))
    return x


@triton.jit
def _seg_values(row_ptr, nmask, lv_ptr, BITS: tl.constexpr, DS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Centroid values ``c[idx]`` ``[BLOCK_N, DS]`` in the table's dtype (the dot operand dtype)."""
    idx = _unpack_codes(row_ptr, nmask, BITS, DS, BLOCK_N)
    return tl.load(lv_ptr + idx)


@triton.jit
def _load_bytes(row_ptr, nmask, W: tl.constexpr):
    """The ``W`` code bytes of each token row: int32 ``[BLOCK_N, W]`` (one contiguous load per row)."""
    return tl.load(row_ptr[:, None] + tl.arange(0, W)[None, :], mask=nmask[:, None], other=0).to(tl.int32)


@triton.jit
def _plane(bt, lv_ptr, BITS: tl.constexpr, P: tl.constexpr, I: tl.constexpr):
    """Centroids of bit-plane ``I`` of the byte tile ``bt``: channels ``i·P + I`` (``P = 8 / BITS`` planes)."""
    MK: tl.constexpr = (1 << BITS) - 1
    if I == 0:
        idx = bt & MK
    elif I == P - 1:
        idx = bt >> (I * BITS)  # the top plane needs no mask (bytes < 256)
    else:
        idx = (bt >> (I * BITS)) & MK
    return tl.load(lv_ptr + idx)


# Centroid lookup without memory: the table lives in four registers and `prmt` (byte permute) picks from it.
# 4 bits (Lloyd–Max levels are symmetric, and codes are sign-magnitude — codec.turbo.code_order: code 8 + m is
# +|c_m|, code m is −|c_m|): the code's low 3 bits m select the low and the high byte of |c_m| from two 8-byte
# tables (TL = words 0–1, TH = 2–3), and two more prmt interleave them into fp16 pairs. The sign goes into the
# high bytes before that: prmt's sign-replicate mode turns bit 3 of each nibble (the top bit of a byte of x or of
# x << 4) into a 0x00 / 0xFF byte mask, and one lop3 flips bit 7 of the high bytes of the codes below 8. Per 4 code
# bytes (8 values, both planes) 15 instructions (v4–v6: ~25, the sign moved bit by bit after the interleave; v7–v16:
# 18, when codes were sorted level indices and m needed a fold, n ≥ 8: n − 8, else 7 − n).
_ASM_LUT4 = tl.constexpr("""
{
.reg .b32 m, m2, l0, h0, l1, h1, y, s0, s1;
and.b32 m, $4, 0x77777777;
shr.b32 m2, m, 16;
prmt.b32 l0, $5, $9, m;
prmt.b32 h0, $13, $17, m;
prmt.b32 l1, $5, $9, m2;
prmt.b32 h1, $13, $17, m2;
shl.b32 y, $4, 4;
prmt.b32 s0, y, $4, 0xD9C8;
prmt.b32 s1, y, $4, 0xFBEA;
lop3.b32 h0, h0, s0, 0x80808080, 0xD2;
lop3.b32 h1, h1, s1, 0x80808080, 0xD2;
prmt.b32 $0, l0, h0, 0x6240;
prmt.b32 $2, l0, h0, 0x7351;
prmt.b32 $1, l1, h1, 0x6240;
prmt.b32 $3, l1, h1, 0x7351;
}
""")
# 2 bits: the whole 4-entry fp16 table is 8 bytes (T = words 0–1); for a code c the selector nibbles
# (2c, 2c + 1) come from one multiply-add per 4 codes: byte·0x22 + 0x10. Plane p = bits [2p, 2p + 2).
_ASM_LUT2 = tl.constexpr("{\n.reg .b32 x, s, s2;\n" + "".join(
    (f"shr.b32 x, $8, {2 * p};\nand.b32 x, x, 0x03030303;\n" if p else "and.b32 x, $8, 0x03030303;\n")
    + f"mad.lo.u32 s, x, 0x22, 0x10101010;\nprmt.b32 ${2 * p}, $9, $13, s;\n"
    + f"shr.b32 s2, s, 16;\nprmt.b32 ${2 * p + 1}, $9, $13, s2;\n"
    for p in range(4)) + "}")
# Operand constraints of the two lookups with pack = 4 (4 code bytes in one register, each table word broadcast):
# LUT4 -> 2 planes × 2 fp16x2 registers, inputs bytes + 4 table words; LUT2 -> 4 planes × 2, bytes + 2 words.
# Shared with decode_gluon.py, which calls the same PTX.
_LUT4_CONSTRAINTS = tl.constexpr("=r,=r,=r,=r,r" + ",r" * 16)
_LUT2_CONSTRAINTS = tl.constexpr("=r,=r,=r,=r,=r,=r,=r,=r,r" + ",r" * 8)


# 3 bits, 4 planes: a group's nibble word n (8 codes, nibble j = code j: TurboQuant 3-bit units, _group_nibbles)
# enters as two 16-bit halves (x = n, n >> 16; bits above 16 are ignored), and plane j of half h is code 4h + j, at
# bits [4j, 4j + 3) of x. Per two halves x0, x1 the selectors gather the 3-bit codes into nibbles, cross-wise
# — sel_A = [c0(x0), c0(x1), c1(x0), c1(x1)], sel_B likewise for c2, c3 — so one prmt looks up 4 low bytes in
# the 8-entry table (TL = words 0–1), one the high bytes (TH = 2–3), and one interleave
# gives plane j's fp16 pair (c_j(x0), c_j(x1)) directly. ~23 instructions per 8 values; two pairs per call.
def _nibbles(dst: str, fields: list[tuple[str, int]]) -> str:
    """PTX that packs 3-bit fields into the nibbles of ``dst``: nibble i = bits [at_i, at_i + 3) of register src_i."""
    out = []
    for i, (src, at) in enumerate(fields):
        shift = 4 * i - at
        op = f"shl.b32 t, {src}, {shift}" if shift > 0 else f"shr.b32 t, {src}, {-shift}"
        out += [op if shift else f"mov.b32 t, {src}", f"and.b32 t, t, {7 << 4 * i:#x}",
                f"mov.b32 {dst}, t" if i == 0 else f"or.b32 {dst}, {dst}, t"]
    return ";\n".join(out) + ";\n"


def _lut3_pair(x0: str, x1: str, out: list[str], tl_: tuple[str, str], th: tuple[str, str]) -> str:
    """PTX for two 16-bit halves ``x0, x1`` (codes at bits 0, 4, 8, 12) -> the fp16 pairs ``(c_j(x0), c_j(x1))``
    of planes j = 0..3 in ``out``."""
    looks = "".join(
        f"prmt.b32 l{k}, {tl_[0]}, {tl_[1]}, s{k};\nprmt.b32 h{k}, {th[0]}, {th[1]}, s{k};\n"
        f"prmt.b32 {out[2 * k]}, l{k}, h{k}, 0x5140;\nprmt.b32 {out[2 * k + 1]}, l{k}, h{k}, 0x7362;\n"
        for k in range(2))
    return ("{\n.reg .b32 s0, s1, t, l0, h0, l1, h1;\n"
            + _nibbles("s0", [(x0, 0), (x1, 0), (x0, 4), (x1, 4)])  # [c0(x0), c0(x1), c1(x0), c1(x1)]
            + _nibbles("s1", [(x0, 8), (x1, 8), (x0, 12), (x1, 12)])  # [c2(x0), c2(x1), c3(x0), c3(x1)]
            + looks + "}\n")


# pack = 4: halves x0..x3 in $8..$11, table words in $12, $16, $20, $24; plane j's two registers are $2j, $2j+1.
_ASM_LUT3 = tl.constexpr(
    _lut3_pair("$8", "$9", ["$0", "$2", "$4", "$6"], ("$12", "$16"), ("$20", "$24"))
    + _lut3_pair("$10", "$11", ["$1", "$3", "$5", "$7"], ("$12", "$16"), ("$20", "$24"))
)


@triton.jit
def _decode_planes(row_ptr, nmask, lv_ptr, lut_ptr, BITS: tl.constexpr, P: tl.constexpr, DS: tl.constexpr,
                   FAST: tl.constexpr):
    """Centroid tiles ``[BLOCK_N, DS/P]`` of the ``P`` planes of one ``DS``-channel segment (planes 2, 3 alias 0
    when P = 2). Column orders: :func:`_plane_perm`.

    ``FAST``: the register-table lookups above (fp16 tables, compiled GPU only); else gathers from ``lv_ptr``.
    """
    if FAST:  # the segment's register table (words unused by a bit width are never read)
        t0 = tl.load(lut_ptr)
        t1 = tl.load(lut_ptr + 1)
        t2 = tl.load(lut_ptr + 2)
        t3 = tl.load(lut_ptr + 3)
    if BITS == 3:
        # TurboQuant 3-bit units (codec.packing.pack_codes; a plane segment is ≥ 64 channels, so whole units) -> the
        # nibble word n_g of each 8-code group (nibble j = code j), as 16-bit halves x[:, 2g + h] = n_g >> 16h: code
        # 4h + j of group g sits at bits [4j, 4j + 3) of x[:, 2g + h] (bits above 16 of h = 0 are not masked).
        tl.static_assert(DS % 32 == 0, "3-bit planes read whole 32-code units")
        n = _unit_nibbles(row_ptr, nmask, DS // 32)  # [BLOCK_N, DS/8]: column g = group g
        x = tl.reshape(tl.join(n, n >> 16), (n.shape[0], 2 * (DS // 8)))  # [g, h] -> 2g + h
        if FAST:
            c0, c1, c2, c3 = tl.inline_asm_elementwise(
                _ASM_LUT3, "=r" + ",=r" * 7 + ",r" * 20, [x, t0, t1, t2, t3],
                dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True, pack=4)
        else:
            c0 = tl.load(lv_ptr + (x & 7))
            c1 = tl.load(lv_ptr + ((x >> 4) & 7))
            c2 = tl.load(lv_ptr + ((x >> 8) & 7))
            c3 = tl.load(lv_ptr + ((x >> 12) & 7))
    elif FAST:
        W: tl.constexpr = DS * BITS // 8
        bt = tl.load(row_ptr[:, None] + tl.arange(0, W)[None, :], mask=nmask[:, None], other=0)
        if BITS == 4:
            c0, c1 = tl.inline_asm_elementwise(
                _ASM_LUT4, _LUT4_CONSTRAINTS, [bt, t0, t1, t2, t3],
                dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
            c2 = c0
            c3 = c0
        else:
            c0, c1, c2, c3 = tl.inline_asm_elementwise(
                _ASM_LUT2, _LUT2_CONSTRAINTS, [bt, t0, t1],
                dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True, pack=4)
    else:
        bt = _load_bytes(row_ptr, nmask, DS * BITS // 8)
        c0 = _plane(bt, lv_ptr, BITS, P, 0)
        c1 = _plane(bt, lv_ptr, BITS, P, 1)
        c2 = c0
        c3 = c0
        if P == 4:
            c2 = _plane(bt, lv_ptr, BITS, P, 2)
            c3 = _plane(bt, lv_ptr, BITS, P, 3)
    return c0, c1, c2, c3


@triton.jit
def _k_planes(row_ptr, nmask, lv_ptr, lut_ptr, q0, q1, q2, q3, BITS: tl.constexpr, P: tl.constexpr,
              DS: tl.constexpr, PREC: tl.constexpr, FAST: tl.constexpr):
    """Σ_p q_p · c[plane_p]ᵀ: raw scores ``[BLOCK_M, BLOCK_N]`` of one segment in plane layout (P ∈ {2, 4})."""
    c0, c1, c2, c3 = _decode_planes(row_ptr, nmask, lv_ptr, lut_ptr, BITS, P, DS, FAST)
    s = tl.dot(q0, tl.trans(c0), input_precision=PREC)
    s += tl.dot(q1, tl.trans(c1), input_precision=PREC)
    if P == 4:
        s += tl.dot(q2, tl.trans(c2), input_precision=PREC)
        s += tl.dot(q3, tl.trans(c3), input_precision=PREC)
    return s


@triton.jit
def _v_planes(row_ptr, nmask, lv_ptr, lut_ptr, pv, alpha, a0, a1, a2, a3, BITS: tl.constexpr, P: tl.constexpr,
              DS: tl.constexpr, PREC: tl.constexpr, FAST: tl.constexpr):
    """a_p ← a_p·α + pv @ c[plane_p]: one accumulator ``[BLOCK_M, DS/P]`` per plane (P ∈ {2, 4})."""
    c0, c1, c2, c3 = _decode_planes(row_ptr, nmask, lv_ptr, lut_ptr, BITS, P, DS, FAST)
    a0 = a0 * alpha[:, None] + tl.dot(pv, c0, input_precision=PREC)
    a1 = a1 * alpha[:, None] + tl.dot(pv, c1, input_precision=PREC)
    if P == 4:
        a2 = a2 * alpha[:, None] + tl.dot(pv, c2, input_precision=PREC)
        a3 = a3 * alpha[:, None] + tl.dot(pv, c3, input_precision=PREC)
    return a0, a1, a2, a3


@triton.jit
def _load_q_seg(q_base, mvalid, OFF: tl.constexpr, P: tl.constexpr, DS: tl.constexpr):
    """Query columns of one kernel segment: ``[BLOCK_M, DS]`` (P = 1), else plane p = columns ``OFF + p·W + [0, W)``
    with ``W = DS/P`` (planes past P alias plane 0)."""
    W: tl.constexpr = DS // P
    offs = tl.arange(0, W)[None, :]
    q0 = tl.load(q_base + OFF + offs, mask=mvalid[:, None], other=0.0)
    q1 = q0
    q2 = q0
    q3 = q0
    if P > 1:
        q1 = tl.load(q_base + OFF + W + offs, mask=mvalid[:, None], other=0.0)
    if P == 4:
        q2 = tl.load(q_base + OFF + 2 * W + offs, mask=mvalid[:, None], other=0.0)
        q3 = tl.load(q_base + OFF + 3 * W + offs, mask=mvalid[:, None], other=0.0)
    return q0, q1, q2, q3


@triton.jit
def _k_seg(row_ptr, nrm, nmask, lv_ptr, lut_ptr, q0, q1, q2, q3, BITS: tl.constexpr, P: tl.constexpr,
           DS: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr, FAST: tl.constexpr):
    """Scores ``[BLOCK_M, BLOCK_N]`` of one kernel segment: ``n_j · ⟨q̃_seg, c[idx_j]⟩``."""
    if P > 1:
        s = _k_planes(row_ptr, nmask, lv_ptr, lut_ptr, q0, q1, q2, q3, BITS, P, DS, PREC, FAST)
    else:
        s = tl.dot(q0, tl.trans(_seg_values(row_ptr, nmask, lv_ptr, BITS, DS, BLOCK_N)), input_precision=PREC)
    return s * nrm[None, :]


@triton.jit
def _v_seg(row_ptr, nrm, nmask, lv_ptr, lut_ptr, p, alpha, a0, a1, a2, a3, BITS: tl.constexpr, P: tl.constexpr,
           DS: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr, FAST: tl.constexpr):
    """Accumulators of one kernel segment ← ·α + (p·n) @ c[idx] (the scale rides on p; centroids stay raw)."""
    pv = (p * nrm[None, :]).to(lv_ptr.dtype.element_ty)
    if P > 1:
        a0, a1, a2, a3 = _v_planes(row_ptr, nmask, lv_ptr, lut_ptr, pv, alpha, a0, a1, a2, a3, BITS, P, DS, PREC,
                                   FAST)
    else:
        cv = _seg_values(row_ptr, nmask, lv_ptr, BITS, DS, BLOCK_N)
        a0 = a0 * alpha[:, None] + tl.dot(pv, cv, input_precision=PREC)
    return a0, a1, a2, a3


@triton.jit
def _store_seg(pa, mvalid, a0, a1, a2, a3, OFF: tl.constexpr, P: tl.constexpr, DS: tl.constexpr):
    W: tl.constexpr = DS // P
    offs = tl.arange(0, W)[None, :]
    tl.store(pa + OFF + offs, a0, mask=mvalid[:, None])
    if P > 1:
        tl.store(pa + OFF + W + offs, a1, mask=mvalid[:, None])
    if P == 4:
        tl.store(pa + OFF + 2 * W + offs, a2, mask=mvalid[:, None])
        tl.store(pa + OFF + 3 * W + offs, a3, mask=mvalid[:, None])


# ---------------------------------------------------------------------------------------------- kernels
# The split count is a runtime value the kernels do not specialize on: at short contexts it grows with T (one more
# split per 128 tokens), and as a constexpr it compiled the decode and merge kernels again every 128 generated
# tokens (~1 s each on the H100). T keeps its specialization (two classes, compiled once): without it the kernels
# ran 2–3 % slower (its divisibility by 16 lets the per-token loads of norms vectorize under their masks).
@triton.jit(do_not_specialize=["SPLITS"])
def _attn_fwd_kernel(
    Q, stride_qb, stride_qh, stride_qm,  # [B, Hkv, M, DQ] rotated, pre-scaled queries (dot dtype)
    KC, stride_kcb, stride_kch, stride_kct,  # [B, Hkv, T, wK] uint8 key codes
    KN, stride_knb, stride_knh, stride_knt,  # [B, Hkv, T, S_K] fp16 key scales
    KS, stride_ksb, stride_ksh, stride_kst,  # [B, Hkv, T, d/8] uint8 QJL signs (K_QJL only)
    KG, stride_kgb, stride_kgh, stride_kgt,  # [B, Hkv, T, 1] fp16 QJL residual norms (K_QJL only)
    VC, stride_vcb, stride_vch, stride_vct,  # [B, Hkv, T, wV] uint8 value codes
    VN, stride_vnb, stride_vnh, stride_vnt,  # [B, Hkv, T, S_V] fp16 value scales
    LVK, LVV,  # [2, 256] centroid tables (dot dtype), row s = codec segment s
    LUTK, LUTV,  # [2, 4] int32 register tables per codec segment (FAST only; see _ASM_LUT4/3/2)
    KV_START, KV_END, QPOS,  # int32 [B] (or dummies when the flags are off)
    PACC, PM, PL,  # partials: [B·Hkv, SPLITS, M, D] fp32, [B·Hkv, SPLITS, M] fp32 ×2
    T, M, Lq, window, qjl_c, SPLITS,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
    # Up to three kernel segments per side (_kernel_segments): channels, bits, planes, byte offset in the
    # code row, table row (codec segment), norm column. A codec segment of 48/96/192 channels is read as two.
    KD0: tl.constexpr, KB0: tl.constexpr, KP0: tl.constexpr, KO0: tl.constexpr, KT0: tl.constexpr, KN0: tl.constexpr,
    KD1: tl.constexpr, KB1: tl.constexpr, KP1: tl.constexpr, KO1: tl.constexpr, KT1: tl.constexpr, KN1: tl.constexpr,
    KD2: tl.constexpr, KB2: tl.constexpr, KP2: tl.constexpr, KO2: tl.constexpr, KT2: tl.constexpr, KN2: tl.constexpr,
    VD0: tl.constexpr, VB0: tl.constexpr, VP0: tl.constexpr, VO0: tl.constexpr, VT0: tl.constexpr, VN0: tl.constexpr,
    VD1: tl.constexpr, VB1: tl.constexpr, VP1: tl.constexpr, VO1: tl.constexpr, VT1: tl.constexpr, VN1: tl.constexpr,
    VD2: tl.constexpr, VB2: tl.constexpr, VP2: tl.constexpr, VO2: tl.constexpr, VT2: tl.constexpr, VN2: tl.constexpr,
    K_QJL: tl.constexpr, HAS_START: tl.constexpr, HAS_END: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr, FAST: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    pid_m = tl.program_id(2)
    b = pid_bh // HKV
    h = pid_bh % HKV
    DT = LVK.dtype.element_ty
    PREC: tl.constexpr = "tf32x3" if DOT_FP32 else "tf32"

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mvalid = offs_m < M
    qi = offs_m // G  # query index within the chunk (rows are m = i·G + g)

    # ---- key range of this (sequence, query tile, split): only slots some row can see are read.
    zero = pid_bh * 0  # a 0-d int32 (plain ints become 1-element arrays under the interpreter)
    lo = zero
    hi = zero + T
    if HAS_START:
        lo = tl.load(KV_START + b)
    if HAS_END:
        hi = tl.minimum(tl.load(KV_END + b), T)
    if CAUSAL:
        qp = tl.load(QPOS + b)
        i_hi = tl.minimum(pid_m * BLOCK_M + BLOCK_M - 1, M - 1) // G
        hi = tl.minimum(hi, qp + i_hi + 1)
        if HAS_WINDOW:
            lo = tl.maximum(lo, qp + (pid_m * BLOCK_M) // G - window + 1)
    lo = tl.maximum(lo, zero)
    n_tok = tl.maximum(hi - lo, 0)
    per = tl.cdiv(tl.cdiv(n_tok, SPLITS), BLOCK_N) * BLOCK_N
    s_lo = lo + split * per
    s_hi = tl.minimum(s_lo + per, hi)

    # ---- queries, rotated and pre-scaled by scale·log2(e): per kernel segment a [BLOCK_M, D_s] tile, or its
    # planes (columns permuted in A, see _plane_perm).
    q_base = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm
    qa0, qa1, qa2, qa3 = _load_q_seg(q_base, mvalid, 0, KP0, KD0)
    if KD1 > 0:
        qb0, qb1, qb2, qb3 = _load_q_seg(q_base, mvalid, KD0, KP1, KD1)
    if KD2 > 0:
        qc0, qc1, qc2, qc3 = _load_q_seg(q_base, mvalid, KD0 + KD1, KP2, KD2)
    if K_QJL:
        qs = tl.load(q_base + D + tl.arange(0, D)[None, :], mask=mvalid[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    # Value accumulators per kernel segment and plane (planes past P stay untouched and are dropped).
    aa0 = tl.zeros([BLOCK_M, VD0 // VP0], tl.float32)
    aa1 = aa0
    aa2 = aa0
    aa3 = aa0
    if VD1 > 0:
        ab0 = tl.zeros([BLOCK_M, VD1 // VP1], tl.float32)
        ab1 = ab0
        ab2 = ab0
        ab3 = ab0
    if VD2 > 0:
        ac0 = tl.zeros([BLOCK_M, VD2 // VP2], tl.float32)
        ac1 = ac0
        ac2 = ac0
        ac3 = ac0

    kc_base = KC + b * stride_kcb + h * stride_kch
    kn_base = KN + b * stride_knb + h * stride_knh
    vc_base = VC + b * stride_vcb + h * stride_vch
    vn_base = VN + b * stride_vnb + h * stride_vnh

    for start in range(s_lo, s_hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        nmask = offs_n < s_hi
        # ---- scores s[m, j] (base 2): per segment a [BLOCK_M, D_s] x [D_s, BLOCK_N] product of centroids.
        kc_row = kc_base + offs_n * stride_kct
        kn_row = kn_base + offs_n * stride_knt
        kn = tl.load(kn_row + KN0, mask=nmask, other=0.0).to(tl.float32)
        s = _k_seg(kc_row + KO0, kn, nmask, LVK + 256 * KT0, LUTK + 4 * KT0, qa0, qa1, qa2, qa3, KB0, KP0, KD0,
                   BLOCK_N, PREC, FAST)
        if KD1 > 0:
            kn = tl.load(kn_row + KN1, mask=nmask, other=0.0).to(tl.float32)
            s += _k_seg(kc_row + KO1, kn, nmask, LVK + 256 * KT1, LUTK + 4 * KT1, qb0, qb1, qb2, qb3, KB1, KP1,
                        KD1, BLOCK_N, PREC, FAST)
        if KD2 > 0:
            kn = tl.load(kn_row + KN2, mask=nmask, other=0.0).to(tl.float32)
            s += _k_seg(kc_row + KO2, kn, nmask, LVK + 256 * KT2, LUTK + 4 * KT2, qc0, qc1, qc2, qc3, KB2, KP2,
                        KD2, BLOCK_N, PREC, FAST)
        if K_QJL:
            ks_row = KS + b * stride_ksb + h * stride_ksh + offs_n * stride_kst
            sg = _unpack_codes(ks_row, nmask, 1, D, BLOCK_N)
            sgn = (sg * 2 - 1).to(DT)
            kg = tl.load(KG + b * stride_kgb + h * stride_kgh + offs_n * stride_kgt, mask=nmask, other=0.0)
            s += tl.dot(qs, tl.trans(sgn), input_precision=PREC) * (kg.to(tl.float32) * qjl_c)[None, :]

        ok = nmask[None, :] & mvalid[:, None]
        if CAUSAL:
            pos = qp + qi
            ok = ok & (offs_n[None, :] <= pos[:, None])
            if HAS_WINDOW:
                ok = ok & (offs_n[None, :] > pos[:, None] - window)
        s = tl.where(ok, s, float("-inf"))

        # ---- online softmax in base 2; rows that saw nothing yet keep m = -inf (m_safe = 0).
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new

        # ---- values: acc_s += (p · n^V_s) @ c^V_s[idx], per kernel segment.
        vc_row = vc_base + offs_n * stride_vct
        vn_row = vn_base + offs_n * stride_vnt
        vn = tl.load(vn_row + VN0, mask=nmask, other=0.0).to(tl.float32)
        aa0, aa1, aa2, aa3 = _v_seg(vc_row + VO0, vn, nmask, LVV + 256 * VT0, LUTV + 4 * VT0, p, alpha,
                                    aa0, aa1, aa2, aa3, VB0, VP0, VD0, BLOCK_N, PREC, FAST)
        if VD1 > 0:
            vn = tl.load(vn_row + VN1, mask=nmask, other=0.0).to(tl.float32)
            ab0, ab1, ab2, ab3 = _v_seg(vc_row + VO1, vn, nmask, LVV + 256 * VT1, LUTV + 4 * VT1, p, alpha,
                                        ab0, ab1, ab2, ab3, VB1, VP1, VD1, BLOCK_N, PREC, FAST)
        if VD2 > 0:
            vn = tl.load(vn_row + VN2, mask=nmask, other=0.0).to(tl.float32)
            ac0, ac1, ac2, ac3 = _v_seg(vc_row + VO2, vn, nmask, LVV + 256 * VT2, LUTV + 4 * VT2, p, alpha,
                                        ac0, ac1, ac2, ac3, VB2, VP2, VD2, BLOCK_N, PREC, FAST)

    # ---- partials of this split (rows past M are not stored).
    prow = (pid_bh * SPLITS + split) * M + offs_m
    tl.store(PM + prow, m_i, mask=mvalid)
    tl.store(PL + prow, l_i, mask=mvalid)
    pa = PACC + prow[:, None] * D
    _store_seg(pa, mvalid, aa0, aa1, aa2, aa3, 0, VP0, VD0)
    if VD1 > 0:
        _store_seg(pa, mvalid, ab0, ab1, ab2, ab3, VD0, VP1, VD1)
    if VD2 > 0:
        _store_seg(pa, mvalid, ac0, ac1, ac2, ac3, VD0 + VD1, VP2, VD2)


@triton.jit
def _query_map_kernel(
    Q, stride_qb, stride_qh, stride_ql,  # [B, Hq, Lq, D] queries (any float dtype)
    A, stride_ah,  # [(Hkv,) D, DA] fp32 query map (stride_ah = 0 when shared by the heads)
    QK, stride_kb, stride_kh, stride_km,  # [B, Hkv, M, DA] out, dot dtype
    CNT,  # [B·Hkv·M] int32: the merge's arrival counts, zeroed here (ZERO; the step's first launch)
    M, c,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DA: tl.constexpr,
    BLOCK_M: tl.constexpr, DC: tl.constexpr, ZERO: tl.constexpr, PDL: tl.constexpr,
):
    """``q̃ = (q @ A)·c`` for the rows ``m = i·G + g`` of one (batch·KV head, row tile, DC-column chunk), in one launch.

    Replaces the torch prologue (cast, batched matmul, scale, cast: four launches, ~10 µs of fixed cost per
    decode step). Products in ``tf32x3`` (≈ fp32), like the fp32 matmul it replaces. One column chunk per program:
    at decode the kernel is a latency chain (load q and A, three products, store), so more, shorter programs
    finish sooner than few that loop over the chunks. ``PDL``: the decode kernel is this one's programmatic
    dependent (:func:`gluon_config`), released at once: it copies its first blocks while this runs.
    """
    if PDL:  # the decode kernel may start now: it copies its first blocks while this runs, then waits for it
        gdc_launch_dependents()
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    c0 = tl.program_id(2) * DC
    b = pid_bh // HKV
    h = pid_bh % HKV
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mvalid = offs_m < M
    offs_d = tl.arange(0, D)
    head = h * G + offs_m % G
    qi = offs_m // G
    q = tl.load(Q + b * stride_qb + head[:, None] * stride_qh + qi[:, None] * stride_ql + offs_d[None, :],
                mask=mvalid[:, None], other=0.0).to(tl.float32)
    a_base = A + h * stride_ah
    out = QK + b * stride_kb + h * stride_kh + offs_m[:, None] * stride_km
    offs_c = tl.arange(0, DC)
    a = tl.load(a_base + offs_d[:, None] * DA + (c0 + offs_c)[None, :])
    r = tl.dot(q, a, input_precision="tf32x3") * c
    tl.store(out + (c0 + offs_c)[None, :], r.to(QK.dtype.element_ty), mask=mvalid[:, None])
    if ZERO:
        if c0 == 0:
            tl.store(CNT + pid_bh * M + offs_m, tl.zeros([BLOCK_M], tl.int32), mask=mvalid)


@triton.jit(do_not_specialize=["SPLITS"])
def _attn_merge_kernel(
    PACC, PM, PL,  # partials as written by _attn_fwd_kernel
    U,  # [D, D] fp32: row j = unrotate(e_j), so out = acc @ U
    OUT, stride_ob, stride_oh, stride_ol,  # [B, Hq, Lq, D] fp32
    LSE, stride_lb, stride_lh,  # [B, Hq, Lq] fp32 (contiguous last dim)
    PO, CNT,  # NC > 1: [B·Hkv·M, NC, D] fp32 partial outputs, [B·Hkv·M] int32 arrival counts (zero at launch)
    M, SPLITS,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
    SPLITS_P2: tl.constexpr, SCH: tl.constexpr, DC: tl.constexpr, NC: tl.constexpr, PDL: tl.constexpr,
):
    """Log-sum-exp merge of the ``SPLITS`` partials of one output row ``(batch·KV head, m)``, normalise, rotate back.

    One program per row — or, with ``NC`` > 1 (:func:`merge_chunks`: small batches), NC per row, each merging
    ``D/NC`` accumulator columns and multiplying them by their rows of U; the last of the row's programs to arrive
    (an acq_rel counter the query map zeroed) adds the NC partial outputs in chunk order, so the result does not
    depend on the arrival order. The merge is latency-bound (a few KB per row), so it wants many small programs
    and no load that waits on another — the maxima of all splits in one ``[SPLITS_P2]`` load, the accumulators ``SCH``
    splits at a time as ``[SCH, D]`` tiles, the unrotation ``acc @ U`` as fp32 products over ``[D, DC]`` tiles of
    ``U`` (which stays in L2). The launcher makes the tiles as large as 8 warps hold (all 256 splits and all of U
    at d = 128: two dependent loads per row), which took the merge alone from 9.7 to 5.8 µs at 198 splits (H100,
    docs/kernel-notes.md v6); with one tile, all four loads are issued before any reduction (v10: 6.5 → 5.8 µs in
    a whole decode step). (v1–v3 merged a 16-row query tile per program, one split per iteration: ~40 µs of
    fixed cost per decode step at 66 splits and 8 programs.) ``PDL``: launched as the decode kernel's programmatic
    dependent, resident before it ends: U is read first, the partials after ``griddepcontrol.wait``.
    """
    pid_bh = tl.program_id(0)
    m = tl.program_id(1)
    b = pid_bh // HKV
    h = pid_bh % HKV
    offs_d = tl.arange(0, D)
    DW: tl.constexpr = D // NC  # accumulator columns merged here (NC > 1: one chunk per program, axis 2)
    offs_w = tl.program_id(2) * DW + tl.arange(0, DW)

    offs_s = tl.arange(0, SPLITS_P2)
    row0 = pid_bh * SPLITS * M + m
    ONE: tl.constexpr = SPLITS_P2 <= SCH  # one tile holds every split's accumulator
    if DC == D or NC > 1:
        u1 = tl.load(U + offs_w[:, None] * D + offs_d[None, :])  # rows of U for these columns: [DW, D]
    if PDL:  # launched while the decode kernel runs: U (a constant) is read before this, its partials only after
        gdc_wait()
    if ONE:  # issue every load first: none depends on another, so their latencies overlap
        a1 = tl.load(PACC + (row0 + offs_s * M)[:, None] * D + offs_w[None, :], mask=(offs_s < SPLITS)[:, None],
                     other=0.0)
    m_s = tl.load(PM + row0 + offs_s * M, mask=offs_s < SPLITS, other=float("-inf"))
    l_s = tl.load(PL + row0 + offs_s * M, mask=offs_s < SPLITS, other=0.0)
    m_g = tl.max(m_s, 0)
    m_safe = tl.where(m_g == float("-inf"), 0.0, m_g)
    w_s = tl.math.exp2(m_s - m_safe)
    l_g = tl.sum(l_s * w_s, 0)

    if ONE:
        acc = tl.sum(a1 * w_s[:, None], 0)
    else:
        acc = tl.zeros([DW], tl.float32)
        offs_c = tl.arange(0, SCH)
        for c0 in range(0, SPLITS, SCH):
            sp = c0 + offs_c
            ok = sp < SPLITS
            w = tl.math.exp2(tl.load(PM + row0 + sp * M, mask=ok, other=float("-inf")) - m_safe)
            a = tl.load(PACC + (row0 + sp * M)[:, None] * D + offs_w[None, :], mask=ok[:, None], other=0.0)
            acc += tl.sum(a * w[:, None], 0)
    acc = acc / tl.maximum(l_g, 1e-30)
    lse = tl.where(l_g > 0, (m_g + tl.log2(tl.maximum(l_g, 1e-30))) * 0.6931471805599453, float("-inf"))

    o_row = OUT + b * stride_ob + (h * G + m % G) * stride_oh + (m // G) * stride_ol
    tl.store(LSE + b * stride_lb + (h * G + m % G) * stride_lh + m // G, lse)  # (every chunk: the same value)
    offs_o = tl.arange(0, DC)
    if NC > 1:
        # out = Σ_chunks acc_chunk @ U[chunk rows]: each program stores its term; the last of the row's NC to arrive
        # adds them in chunk order (the same sum whatever the arrival order) and writes the row.
        row = pid_bh * M + m
        tl.store(PO + (row * NC + tl.program_id(2)) * D + offs_d, tl.sum(acc[:, None] * u1, 0))
        tl.debug_barrier()  # every thread's store precedes the (single-thread) release below
        if tl.atomic_add(CNT + row, 1, sem="acq_rel") == NC - 1:
            tot = tl.load(PO + row * NC * D + offs_d, cache_modifier=".cg")
            for c in tl.static_range(1, NC):
                tot += tl.load(PO + (row * NC + c) * D + offs_d, cache_modifier=".cg")
            tl.store(o_row + offs_d, tot)
    elif DC == D:
        tl.store(o_row + offs_o, tl.sum(acc[:, None] * u1, 0))
    else:
        for c0 in tl.static_range(0, D, DC):
            u = tl.load(U + offs_d[:, None] * D + (c0 + offs_o)[None, :])
            tl.store(o_row + c0 + offs_o, tl.sum(acc[:, None] * u, 0))


# ---------------------------------------------------------------------------------------------- launcher
def _cdiv(a: int, b: int) -> int:
    """Host-side ceil division (``triton.cdiv`` is a constexpr function: ~10 µs a call on the host)."""
    return -(-a // b)


def _p2(n: int) -> int:
    """The next power of two ≥ n (host side, like ``_cdiv``)."""
    return 1 << max(n - 1, 0).bit_length()


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def unsupported_reason(q: torch.Tensor, k_codec, v_codec, k_packed=None, v_packed=None) -> str | None:
    """Why the Triton kernel cannot run this configuration (None when it can)."""
    from ..codec.turbo import TurboQuantizer

    for name, c in (("key", k_codec), ("value", v_codec)):
        if not isinstance(c, TurboQuantizer):
            return f"{name} codec is {type(c).__name__}, the kernel reads TurboQuant only"
        if len(c.segments) > 2:
            return f"{name} codec has {len(c.segments)} segments"
        if _kernel_segments(c, key=name == "key") is None:
            return (f"{name} segments {c.segments}: each must be a power of two >= {_min_dot_k(name == 'key')} "
                    f"channels, or one power of two plus another (e.g. 96 = 64 + 32), three at most in all")
        if c.channel_scale.dim() != 1 and (name == "value" or c.channel_scale.shape[0] != k_packed_heads(k_packed, q)):
            # Per-head key scales fold into a per-head query map A [Hkv, d, d']; the value side folds one
            # shared unrotation U into the merge kernel, so per-head value scales stay on the torch path.
            return f"{name} codec keeps per-head channel scales (the kernel folds one shared scale vector into U)"
        for d_s, b_s in c.segments:
            if b_s not in _BITS_OK:
                return f"{name} segment of {b_s} bits (kernel unpacks {_BITS_OK})"
    if v_codec.qjl:
        return "QJL on values: the torch reference handles it (the kernel supports QJL on keys only)"
    d = q.shape[-1]
    if not _pow2(d) or not 16 <= d <= 256:
        return f"head_dim {d} (kernel covers powers of two 16..256)"
    if k_codec.dim != d or v_codec.dim != d:
        return "codec dim differs from head_dim"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"query dtype {q.dtype}"
    return None


def k_packed_heads(k_packed, q) -> int | None:
    """KV heads of a packed key state (None when unknown)."""
    if k_packed is None:
        return None
    return k_packed["codes"].shape[1]


@functools.lru_cache(maxsize=16)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: few splits keep CPU tests fast while still exercising the merge


_DUMMY: dict = {}


def _dummy(device) -> torch.Tensor:
    t = _DUMMY.get(device)
    if t is None:
        t = _DUMMY[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return t


# Decode (BLOCK_M = 16) tiles per (d, key segments, value segments, many programs = B·Hkv ≥ 32), from the v4
# sweeps on H100 at 128K (docs/kernel-notes.md): value (BLOCK_N, num_warps, split multiplier on the 4/SM or
# 8/SM target). BLOCK_N 64 × 2 warps with 4× the splits won for the whole-bit schemes at B = 1 and B = 8 (more
# resident programs hide the latency of each program's short dependent chains; splits are capped at 128).
# Comments: sweep µs (graph, 128K, B = 1 / B = 8); final runs in docs/performance.md. Schemes not listed take
# the same tile as the default (the v4 segments sweep picked it for turbo3.5, k3.25v3 and k2.25v2 too).
_DECODE_TUNED: dict = {
    (128, ((128, 4),), ((128, 4),), False): (64, 2, 4),  # turbo4  144.7 (smul 1) -> 140–145
    (128, ((128, 4),), ((128, 4),), True): (64, 2, 4),  # turbo4  828 vs 852 (smul 2), 938 (128 × 4 warps)
    (128, ((128, 3),), ((128, 3),), False): (64, 2, 4),  # turbo3  276
    (128, ((128, 3),), ((128, 3),), True): (64, 2, 4),  # turbo3  1984 vs 2053 (smul 2)
    (128, ((128, 4),), ((128, 3),), False): (64, 2, 4),  # k4v3    216
    (128, ((128, 4),), ((128, 3),), True): (64, 2, 4),  # k4v3    1507 vs 1561 (smul 2)
}


def _bits_key(c) -> tuple:
    return tuple(b for _, b in c.segments) if c is not None else ()


def _seg_key(c) -> tuple:
    return tuple(tuple(s) for s in c.segments) if c is not None else ()


def launch_config(B: int, Hkv: int, M: int, T: int, d: int, device: torch.device, *, k_codec=None,
                  v_codec=None, seg_keys: tuple | None = None) -> dict:
    """Block sizes, split count and warps for one shape (recorded by :func:`tqcache.kernels.info`).

    Splits: enough programs for 4–8 per SM (many loads in flight), but each split keeps ≥ 4 blocks of tokens
    so the per-split overhead (query load, partial write, merge read) stays small against what it streams.
    Decode shapes take their measured tile from ``_DECODE_TUNED`` when listed, else the v4 default: BLOCK_N 64,
    2 warps, 4× splits at d ≤ 128 — the sweep's pick for every scheme measured, multi-segment ones included
    (turbo3.5, k3.25v3, k2.25v2; turbo3.5 spills a little at that tile and still wins) — and the earlier
    BLOCK_N 32 × 4 warps at d = 256 (not re-measured). (A config passed to :func:`attend_packed_triton` may
    also carry ``planes=False`` / ``fast=False``, for A/B comparisons.) ``seg_keys``: ``(_seg_key(k_codec),
    _seg_key(v_codec))`` in place of the codecs (plans keep no codec).
    """
    block_m = 16 if M <= 16 else 64
    m_tiles = _cdiv(M, block_m)
    progs = B * Hkv * m_tiles
    # ~4 resident programs per SM: 4/SM at B·Hkv = 8, 8/SM from 32, times the split multiplier.
    target = (8 if progs >= 32 else 4) * _num_sms(device)
    if block_m == 16:
        block_n, num_warps, smul = 64, 2, 4
        if d > 128:  # the earlier rule, not re-measured
            block_n, num_warps, smul = 32, 4, 1
        ks, vs = seg_keys or (_seg_key(k_codec), _seg_key(v_codec))
        tuned = _DECODE_TUNED.get((d, ks, vs, progs >= 32))
        if tuned:
            block_n, num_warps, smul = tuned
    else:
        block_n, num_warps, smul = 64, 8, 1
    max_splits = max(1, _cdiv(T, 4 * block_n))
    splits = max(1, min(_cdiv(target, progs) * smul, max_splits, 128))
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, SPLITS=splits, m_tiles=m_tiles, num_warps=num_warps)


def _gluon_module():
    """``decode_gluon`` when this Triton has Gluon (3.5+), else None (the Triton kernel takes every shape)."""
    global _GLUON
    if _GLUON is False:
        try:
            from . import decode_gluon
        except Exception:  # pragma: no cover - depends on the Triton version
            decode_gluon = None
        _GLUON = decode_gluon
    return _GLUON


_GLUON = False


def choose_config(q: torch.Tensor, k_codec, v_codec, Hkv: int, T: int) -> dict:
    """The launch configuration :func:`attend_packed_triton` uses by default: :func:`gluon_config` (``gluon=True``)
    when the Gluon decode kernel covers the call, else :func:`launch_config` for the Triton kernel."""
    B, Hq, Lq, d = q.shape
    M = (Hq // Hkv) * Lq
    g = _gluon_module()
    if g is not None and g.gluon_reason(q, k_codec, v_codec, M, True) is None and \
            _matrices(k_codec, v_codec, q.device, torch.float16, gluon=True)[6]:
        return gluon_config(B, Hkv, T, q.device, d)
    return launch_config(B, Hkv, M, T, d, q.device, k_codec=k_codec, v_codec=v_codec)


def gluon_config(B: int, Hkv: int, T: int, device: torch.device, d: int = 128) -> dict:
    """Launch configuration of the Gluon decode kernel: one warp per program, ``BLOCK_N`` 32 tokens per step,
    a 2-deep cp.async ring, splits for about ``GLUON_PER_SM`` programs per SM (each split keeps ≥ 4 blocks,
    ≤ 256 splits). H100 sweep at 128K (docs/kernel-notes.md, v5): 12 per SM — one full wave at 168 registers —
    for B·Hkv < 32; from 32 on, two full waves (at most 24 per SM, rounded down: v16 A/B against the 16 per SM of
    v5–v15, which left 1.3–1.4 waves, µs: B = 16 +8–14 %, B = 4 and 8 −2 … +5.5 %, mostly +1 %;
    `attention_h100_v16_two_waves.json`; at head_dim 64, where 16 fit at 128 registers, the same rule is within 1 %
    of the best of 12 / 16 / 36 per SM and 1–13 % faster than 16: `attention_h100_v17_d64_splits.json`). At head_dim 128 up to 32K
    tokens and under 2^20 token-heads (B·Hkv·T), 8 per SM: an A/B over B ∈ {1, 2, 4, 8} × 4K–32K (turbo4, turbo3,
    turbo3.5, buffers rotated past L2) gained 2–8 % there (B = 1, 32K: 31.3 → 29.4 µs) and lost up to 18 % beyond
    it (B = 8, 32K; docs/kernel-notes.md, v11). head_dim 256 takes 16-token
    blocks (32 spill at 255 registers; 16 need ~221) and 6 / 27 programs per SM (H100 sweep, turbo4, 16 / 8 heads,
    64K: 107.5 µs at B = 1 against 121.5–139.9 for 9–12, 659.9 at B = 8 against 686–887 for 6–18).

    ``PDL``: on Hopper, at head_dim 128, where the grid fills every SM (≥ 12 programs each: the one- or two-wave
    split count, whatever T), the step's three kernels are chained by programmatic dependent launch — the decode
    kernel starts while the query map runs (it copies its first blocks, then waits for the queries), and the merge is
    scheduled as the decode programs finish — and the 8-per-SM rule gives way to the full wave. H100, turbo4, graph µs
    of the step, same process (`attention_h100_v19_pdl_variants.json`): B = 1 32K 27.9 → 26.8, 64K 43.2 → 41.0, 128K
    71.6 → 68.8; B = 2 32K 42.9 → 41.5; B = 8 128K 431.2 → 428.1. On a grid that leaves SMs short it lost up to
    42 % (B = 2, 32K at 8 per SM: 42.9 → 50.4; B = 4, 16K at 6 per SM: 43.3 → 61.7;
    `attention_h100_v19_pdl_variants.json`), so smaller grids launch as before."""
    block_n = 16 if d > 128 else 32
    sms = _num_sms(device)

    def split_count(per_sm: int, two_waves: bool) -> int:
        programs = per_sm * sms
        # two waves: at most two full waves of 12 resident, no partial one (16 per SM left 1.3–1.4 waves)
        want = programs // (B * Hkv) if two_waves else _cdiv(programs, B * Hkv)
        return max(1, min(want, _cdiv(T, 4 * block_n), 256))

    def config(splits: int, pdl: bool = False) -> dict:
        return dict(BLOCK_M=16, BLOCK_N=block_n, SPLITS=splits, m_tiles=1, num_warps=1, gluon=True, STAGES=2, PDL=pdl)

    if GLUON_PER_SM:
        return config(split_count(GLUON_PER_SM, False))
    if d > 128:
        return config(split_count(6 if B * Hkv < 32 else 27, False))
    # one full wave of 12 per SM, or from B·Hkv = 32 on two (24 per SM is then a cap, rounded down)
    full = split_count(12, False) if B * Hkv < 32 else split_count(24, True)
    if d == 128 and pdl_ok(device) and B * Hkv * full >= 12 * sms:
        return config(full, True)
    if d == 128 and T <= 32768 and B * Hkv * T < 1 << 20:
        return config(split_count(8, False))  # short contexts, small batches: fewer, longer splits
    return config(full)


GLUON_PER_SM = 0  # 0: the rule above; a number overrides it (sweeps)


def _min_dot_k(key: bool) -> int:
    """Fewest channels one product may reduce over: 16 (a tensor-core K) for values, 32 for keys — on the H100
    with Triton 3.6 a key product ``q [16, 16] @ cᵀ [16, N]`` came out wrong (planes and natural order alike)
    while the same value product was right."""
    return 32 if key else 16


def _planes(d_s: int, b_s: int, enabled: bool = True, key: bool = False) -> int:
    """Planes a segment is read in: ``8/b`` bit-planes for b ∈ {2, 4}, 4 code planes for b = 3 (codes ``4h + j``
    of each 8-code group), when each plane keeps :func:`_min_dot_k` channels; else 1 (natural channel order:
    8 bits directly, 1 bit and narrow segments via ``tl.join``)."""
    if enabled and b_s in (2, 3, 4):
        P = 4 if b_s == 3 else 8 // b_s
        if d_s // P >= _min_dot_k(key):
            return P
    return 1


def _kernel_segments(codec, enabled: bool = True, key: bool = False) -> list[tuple] | None:
    """The codec's segments as the kernel reads them: ``[(channels, bits, planes, byte offset, table row, norm
    column, channel offset), ...]``, at most three; None when the codec does not fit.

    A segment whose width is not a power of two but the sum of two (48 = 32 + 16, 96 = 64 + 32, 192 = 128 + 64:
    the quarter-bit presets) is read as two kernel segments with the same codebook and norm — its bit stream
    splits at a byte boundary since both parts are multiples of 8 channels. Each needs :func:`_min_dot_k` channels.

    At 3 bits (``pack_codes``: 32-code units, then the ``d_s mod 32`` remaining codes in the dense stream) the kernel
    reads a segment of a multiple of 32 channels as whole units and any other (16 channels) as dense stream
    (``_unpack_codes``), so each kernel segment must start at a unit boundary and cover whole units, or be exactly
    the dense tail. The split above guarantees it (the larger part is a power of two ≥ 32, so the smaller one is
    the 16-channel tail or whole units); asserted here.
    """
    out, byte, chan = [], 0, 0
    shared = getattr(codec, "shared_norm", False)
    for s, (d_s, b_s) in enumerate(codec.segments):
        parts = [d_s] if _pow2(d_s) else [1 << (d_s.bit_length() - 1), d_s - (1 << (d_s.bit_length() - 1))]
        at = 0  # channel offset of the part within its codec segment
        for w in parts:
            if not _pow2(w) or w < _min_dot_k(key):
                return None
            if b_s == 3:  # whole units from a unit boundary, or exactly the dense tail (docstring)
                assert (w % 32 == 0 and at % 32 == 0) or (at == d_s - d_s % 32 and w == d_s % 32), (d_s, w, at)
            out.append((w, b_s, _planes(w, b_s, enabled, key), byte, s, 0 if shared else s, chan))
            byte += w * b_s // 8
            chan += w
            at += w
    return out if len(out) <= 3 else None


def _plane_perm(codec, enabled: bool = True, key: bool = False) -> list[int]:
    """Kernel column order: ``perm[new] = natural channel``. Plane p of a kernel segment at channel offset o fills
    columns ``o + p·d_s/P + e``: for 2/4 bits column e holds channel ``o + e·P + p`` (bit-plane p of byte e); for
    3 bits ``o + 8·(e // 2) + 4·(e % 2) + p`` (code 4h + p of group e // 2, h = e % 2). Identity in natural order."""
    perm = []
    for d_s, b_s, P, _, _, _, off in _kernel_segments(codec, enabled, key):
        if P > 1 and b_s == 3:
            perm += [off + 8 * (e // 2) + 4 * (e % 2) + p for p in range(P) for e in range(d_s // P)]
        else:
            perm += [off + i * P + p for p in range(P) for i in range(d_s // P)]
    return perm


_MAT_CACHE: dict = {}
COMPILED: dict = {}  # launch config -> registers / spills of the compiled attention kernel (info())


KERNELS: dict = {}  # same keys as COMPILED -> the compiled kernel (benchmarks read its SASS)


def _record_compile(ck, cfg, bits: str = "", fast: bool = False) -> None:
    n_regs = getattr(ck, "n_regs", None)
    if n_regs is None or len(COMPILED) > 64:
        return
    key = (f"{bits} BLOCK_M={cfg['BLOCK_M']} BLOCK_N={cfg['BLOCK_N']} warps={cfg['num_warps']} "
           f"stages={cfg.get('num_stages', 2)} planes={bool(cfg.get('planes', True))} fast={fast}").strip()
    if key not in COMPILED:
        COMPILED[key] = {"n_regs": n_regs, "n_spills": getattr(ck, "n_spills", None)}
        KERNELS[key] = ck


def _i32(words) -> list[int]:
    return [((w & 0xFFFFFFFF) ^ 0x80000000) - 0x80000000 for w in words]


def _register_tables(codec) -> tuple[torch.Tensor, bool]:
    """``([2, 4] int32 words, usable)``: each codec segment's fp16 centroid table, in code order
    (``codec.code_levels``: ``c[n]`` is the level code n stands for), in the register form of ``_ASM_LUT4`` (low
    bytes of ``|c[8..15]|`` in words 0–1, high bytes in 2–3), ``_ASM_LUT3`` (low bytes of ``c[0..7]`` in words
    0–1, high bytes in 2–3) or ``_ASM_LUT2`` (the 4 fp16 levels in words 0–1); zeros for other bit widths. Not
    usable when a 4-bit table is not exactly sign-symmetric in fp16 (``c[m] = −c[8 + m]``)."""
    words, ok = [[0] * 4, [0] * 4], True
    for s, (d_s, b_s) in enumerate(codec.segments):
        if b_s not in (2, 3, 4):
            continue
        h = [x & 0xFFFF for x in codec.code_levels(s).detach().cpu().half().view(torch.int16).tolist()]
        if b_s == 2:
            words[s][:2] = [h[0] | h[1] << 16, h[2] | h[3] << 16]
            continue
        if b_s == 3:
            lo, hi = [x & 0xFF for x in h], [x >> 8 for x in h]
        else:
            mag = h[8:]
            ok &= all(m < 0x8000 for m in mag) and all(h[i] == mag[i] | 0x8000 for i in range(8))
            lo, hi = [m & 0xFF for m in mag], [m >> 8 for m in mag]
        words[s] = [sum(part[4 * k + i] << 8 * i for i in range(4)) for part in (lo, hi) for k in range(2)]
    return torch.tensor([_i32(w) for w in words], dtype=torch.int32), ok


def _segment_args(k_codec, v_codec, planes: bool) -> dict:
    """The kernel-segment constexprs ``{K,V}{D,B,P,O,T,N}{0,1,2}`` of :func:`_attn_fwd_kernel` (absent = 0)."""
    args = {}
    for side, codec, key in (("K", k_codec, True), ("V", v_codec, False)):
        segs = _kernel_segments(codec, planes, key)
        for i in range(3):
            d_s, b_s, P, off, row, col, _ = segs[i] if i < len(segs) else (0, 0, 1, 0, 0, 0, 0)
            args.update({f"{side}D{i}": d_s, f"{side}B{i}": b_s, f"{side}P{i}": P, f"{side}O{i}": off,
                         f"{side}T{i}": row, f"{side}N{i}": col})
    return args


def _matrices(k_codec, v_codec, device, dot_dtype, planes: bool = True, gluon: bool = False):
    """(A [(Hkv,) d, d or 2d] fp32 query map, U [d, d] fp32 unrotation, K/V centroid tables [2, 256] dot dtype,
    K/V register tables [2, 4] int32, whether the register tables are usable, the kernel-segment constexprs).

    The kernel's column permutation is folded in — :func:`_plane_perm` for this module's kernel,
    ``decode_gluon.kernel_order`` with ``gluon`` — so A's first d columns are in the kernel's key column order
    and U's rows in its value column order (zero run-time cost).
    """
    key = (codec_key(k_codec, device), codec_key(v_codec, device), dot_dtype, planes, gluon)
    hit = cached(_MAT_CACHE, key, (k_codec, v_codec))
    if hit is not None:
        return hit
    d = k_codec.dim
    eye = torch.eye(d, device=device, dtype=torch.float32)
    with torch.no_grad():
        if gluon:
            from .decode_gluon import kernel_order, split_halves
            from .decode_gluon import qjl_order as kernel_qjl_order

            split = split_halves(k_codec, v_codec)  # head_dim 256 run as 128-channel halves
            pk = torch.tensor(kernel_order(k_codec, True, split), device=device)  # -1: a key container's extra column
            pv = torch.tensor(kernel_order(v_codec, False, split), device=device)
        else:
            pk = torch.tensor(_plane_perm(k_codec, planes, key=True), device=device)
            pv = torch.tensor(_plane_perm(v_codec, planes), device=device)
        # [d, d'] for a shared key scale, [Hkv, d, d'] for per-head scales (matmul broadcasts over heads).
        a = k_codec.rotate_query(eye)[..., pk.clamp(min=0)] * (pk >= 0)  # extra columns: exact zeros
        if k_codec.qjl:  # the sketched query columns after the key columns (Gluon: in its sign plane's order)
            sk = k_codec.sketch_query(eye)
            a = torch.cat([a, sk[..., kernel_qjl_order(d)] if gluon else sk], dim=-1)
        u = v_codec.unrotate(eye)[pv].contiguous()

        lk, fk = _register_tables(k_codec)
        lv, fv = _register_tables(v_codec)
        out = (a.contiguous(), u, level_table(k_codec, device).to(dot_dtype).contiguous(),
               level_table(v_codec, device).to(dot_dtype).contiguous(), lk.to(device), lv.to(device), fk and fv,
               _segment_args(k_codec, v_codec, planes))
    return remember(_MAT_CACHE, key, (k_codec, v_codec), out)


def level_table(codec, device) -> torch.Tensor:
    """``[2, 256]`` fp32: row s = segment s's Lloyd–Max levels in code order (``codec.code_levels``), zero past its
    ``2^b`` (the kernels' centroid table: entry n is the level code n stands for)."""
    t = torch.zeros(2, 256, device=device, dtype=torch.float32)
    for s, (_, b_s) in enumerate(codec.segments):
        t[s, : 1 << b_s] = codec.code_levels(s)
    return t


def _fields_sig(f) -> tuple:
    """A packed state's fields as they enter a plan key: everything but the token count (and the address)."""
    return tuple((n, t.dtype, t.shape[0], t.shape[1], t.shape[3], t.stride(), t.data_ptr() & 15) for n, t in f.items())


def _tensor_sig(t) -> tuple | None:
    """An optional tensor argument (kv_start, kv_end, q_pos) as it enters a plan key."""
    return None if t is None else (t.dtype, t.shape, t.stride(), t.data_ptr() & 15, t.device)


MERGE_NC = 0  # 0: merge_chunks' rule; a number overrides it (A/B runs)
PDL = True  # programmatic dependent launch of full-wave Gluon steps (gluon_config); False for A/B runs


def pdl_ok(device: torch.device) -> bool:
    """Whether the GPU chains launches by programmatic dependent launch (Hopper and later): see :func:`gluon_config`.
    Only the Gluon decode step chains its launches; its module's capability lookup is cached (this runs per step)."""
    g = _gluon_module() if PDL and gdc_wait is not None and device.type == "cuda" else None
    return g is not None and g._capability(device) >= (9, 0)


def merge_chunks(rows: int, d: int, pdl: bool = False) -> int:
    """Programs per output row of the merge kernel (column chunks of the accumulator, each with its rows of U).

    At B = 1 (32 rows: 8 KV heads × 4) the one-row programs leave 100 of 132 SMs idle, each of the 32 reading
    its row's partials and all of U (~165 KB at 198 splits); 4 chunks spread that over 128 programs at the cost of
    a second dependent step (the last to arrive adds the chunks' outputs). H100, turbo4, graph µs of the whole
    step, same process (`attention_h100_v17_merge_chunks_ab.json`), 1 -> 4 chunks: B = 1 16K 20.2 -> 19.6, 64K
    44.4 -> 43.6, 128K 73.3 -> 72.5; B = 8 (256 rows) 233.8 -> 244.0 at 64K: slower, so only for ≤ 32 rows
    (between 32 and 256 unmeasured) and head_dim ≤ 128. Under programmatic dependent launch (``pdl``) the merge's
    programs are resident, their rows of U loaded, when the decode kernel ends, and the one-row merge without the
    second step is faster: B = 1, graph µs, 4 -> 1 chunks: turbo4 32K 26.9 -> 26.4, 64K 41.6 -> 40.7, 128K 68.3 ->
    68.1; turbo3 27.6 -> 27.3, 42.5 -> 41.6, 68.3 -> 67.6 (`attention_h100_v19_b1_ab.json`)."""
    if MERGE_NC:
        return MERGE_NC
    return 4 if rows <= 32 and d <= 128 and not pdl else 1


_PLANS = Plans()  # per key codec, call key -> (weakref to the value codec, run): see attend_packed_triton
LAUNCH_CONFIGS: dict = {}  # "attend B=.. T=.." -> the launch configuration first used for it (kernels.info())
_QMAP = Replay(_query_map_kernel)
_DECODE = Replay(_attn_fwd_kernel)
_MERGE = Replay(_attn_merge_kernel)
_GLUON_DECODE: list = []  # [Replay of decode_gluon._gluon_decode_kernel], made on first use


def attend_packed_triton(
    q: torch.Tensor,
    k_codec,
    k_packed,
    v_codec,
    v_packed,
    *,
    scale: float,
    kv_start: torch.Tensor | None = None,
    kv_end: torch.Tensor | None = None,
    q_pos: torch.Tensor | None = None,
    window: int | None = None,
    mask: torch.Tensor | None = None,
    splits: int | None = None,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`tqcache.codec.attention.attend_packed` (same arguments, same returns).

    Args:
        q: ``[B, Hq, Lq, d]`` fp16/bf16/fp32 queries; ``Hq = G·Hkv``.
        k_packed, v_packed: TurboQuant fields ``[B, Hkv, T, width]`` (codes uint8, norms fp16, and for keys with
            QJL ``qjl_signs`` uint8 ``[.., d/8]``, ``qjl_norms`` fp16 ``[.., 1]``); any strides with a
            contiguous last dim (cache buffers of capacity ≥ T are fine: pass views ``[:, :, :T]``).
        kv_start, kv_end, q_pos: optional int ``[B]`` tensors on q's device; window: int (needs q_pos).
        mask: not supported (raises): use the structured arguments.
        splits, config: override the launch configuration (benchmarks, tests).

    Returns:
        ``(out [B, Hq, Lq, d] fp32 original space, normalised; lse [B, Hq, Lq] fp32, -inf where empty)``.

    A decode step calls this once per layer, and in eager mode the host is the bottleneck (docs/performance.md,
    "Decode steps in eager mode"): a call like an earlier one — same codec states, the same shapes (T aside),
    strides, dtypes and alignments of every tensor, the same options — reuses that call's checks, matrices and
    launch plan, and replays its three launches (:mod:`._launch`). Only T and the split count it implies change.

    Example::

        >>> out, lse = attend_packed_triton(q, kc, kc.quantize(k), vc, vc.quantize(v), scale=d**-0.5)
    """
    if mask is not None:
        raise ValueError("the Triton kernel takes structured masks only (kv_start/kv_end/q_pos/window), not mask=")
    if q.stride(-1) != 1:
        q = q.contiguous()
    dev = q.device
    i32 = lambda t: t.to(device=dev, dtype=torch.int32).contiguous() if t is not None else None  # noqa: E731
    st, en, qp = i32(kv_start), i32(kv_end), i32(q_pos)
    kf, vf = k_packed.fields, v_packed.fields
    key = (codec_key(k_codec, dev), codec_key(v_codec, dev), q.dtype, q.shape, q.stride(), q.data_ptr() & 15,
           _fields_sig(kf), _fields_sig(vf), _tensor_sig(st), _tensor_sig(en), _tensor_sig(qp), window is None,
           splits, None if config is None else tuple(sorted(config.items())))
    plan = _PLANS.get(k_codec, key)
    if plan is None or plan[0]() is not v_codec:
        plan = (weakref.ref(v_codec), _plan(q, k_codec, k_packed, v_codec, v_packed, st, en, qp, window, splits, config,
                                            key))
        _PLANS.put(k_codec, key, plan)
    else:  # the key fixed everything but T: the fields must still agree on it
        T = kf["codes"].shape[2]
        if any(t.shape[2] != T for t in kf.values()) or any(t.shape[2] != T for t in vf.values()):
            raise ValueError(f"packed K/V fields disagree on the token count: "
                             f"{[tuple(t.shape) for t in kf.values()]}, {[tuple(t.shape) for t in vf.values()]}")
    return plan[1](q, kf, vf, st, en, qp, window, scale)


def _plan(q, k_codec, k_packed, v_codec, v_packed, st, en, qp, window, splits, config, key):
    """Check a call and derive everything its launches need but the token count and the addresses; returns
    ``run(q, k_fields, v_fields, st, en, qp, window, scale) -> (out, lse)``."""
    why = unsupported_reason(q, k_codec, v_codec, k_packed)
    if why:
        raise ValueError(f"unsupported by the Triton attention kernel: {why}")
    B, Hq, Lq, d = q.shape
    lead = k_packed.lead_shape
    if len(lead) != 3 or lead[0] != B or tuple(v_packed.lead_shape) != tuple(lead):
        raise ValueError(f"packed K/V must share lead shape [B={B}, Hkv, T], got {tuple(lead)}, {tuple(v_packed.lead_shape)}")
    Hkv, T = lead[1], lead[2]
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    if window is not None and qp is None:
        raise ValueError("window needs q_pos (the sliding window is relative to the query's slot)")
    k_codec._check_packed(k_packed)
    v_codec._check_packed(v_packed)
    kc, kn = k_packed["codes"], k_packed["norms"]
    vc, vn = v_packed["codes"], v_packed["norms"]
    for t in (kc, kn, vc, vn):
        if t.stride(-1) != 1:
            raise ValueError("packed fields need a contiguous last dimension")
    G = Hq // Hkv
    M = G * Lq
    dev = q.device
    if dev.type == "cpu":
        patch_interpreter()
    dot_dtype = torch.float32 if q.dtype == torch.float32 else torch.float16
    cfg = dict(config) if config else choose_config(q, k_codec, v_codec, Hkv, T)
    fixed = config is not None  # an explicit configuration keeps its split count
    use_planes = bool(cfg.get("planes", True))
    # The Gluon decode kernel (decode_gluon.py) runs when the configuration asks for it (choose_config's pick
    # for the shapes it covers) and the call is covered; a gluon config on a call it does not cover falls back.
    use_gluon = False
    if cfg.get("gluon"):
        if _gluon_module() is not None and _gluon_module().gluon_reason(q, k_codec, v_codec, M, True) is None:
            A, U, lvk, lvv, lutk, lutv, lut_ok, seg_args = _matrices(k_codec, v_codec, dev, dot_dtype, gluon=True)
            use_gluon = lut_ok and _gluon_module().words_ok(kc, k_codec) and _gluon_module().words_ok(vc, v_codec) \
                and (not k_codec.qjl or aligned4(k_packed["qjl_signs"]))
        if not use_gluon:
            cfg, fixed = launch_config(B, Hkv, M, T, d, dev, k_codec=k_codec, v_codec=v_codec), False
    if not use_gluon:
        A, U, lvk, lvv, lutk, lutv, lut_ok, seg_args = _matrices(k_codec, v_codec, dev, dot_dtype, use_planes)
    # Register-table lookup: compiled fp16 path only (the interpreter runs no PTX; fp32 queries use fp32 tables).
    fast = bool(cfg.get("fast", True)) and lut_ok and dot_dtype == torch.float16 and dev.type == "cuda"
    BM, BN = cfg["BLOCK_M"], cfg["BLOCK_N"]
    m_tiles = _cdiv(M, BM)

    seg_keys = (_seg_key(k_codec), _seg_key(v_codec))
    k_qjl, qjl_scale = bool(k_codec.qjl), k_codec.qjl_scale if k_codec.qjl else 0.0
    # (run must not hold the codecs: plans live as long as the key codec, and would keep it alive.)

    pdl_asked = bool(config and config.get("PDL")) and use_gluon and pdl_ok(dev)  # fixed splits: only when asked

    def splits_for(T: int) -> tuple[int, bool]:
        """The split count for T, and whether the step chains its launches (gluon_config's PDL)."""
        if splits is not None:
            return int(splits), pdl_asked
        if fixed:
            return cfg["SPLITS"], pdl_asked
        if use_gluon:
            c = gluon_config(B, Hkv, T, dev, d)
            return c["SPLITS"], c["PDL"]
        return launch_config(B, Hkv, M, T, d, dev, seg_keys=seg_keys)["SPLITS"], False

    # Queries: [B, Hq, Lq, d] -> rows m = i·G + g of each KV head, rotated (+ sketched) and pre-scaled.
    DA = A.shape[-1]
    DCQ = 32  # query-map columns per program (DA is a multiple: d, 192 for quarter-bit key containers, + d for QJL)
    # The merge: one program per output row, or NC per row over column chunks (merge_chunks), whose partial
    # outputs and arrival counts live in the scratch after the partials (the counts zeroed by the query map).
    rows = B * Hkv * M
    qmeta = dict(HKV=Hkv, G=G, D=d, DA=DA, BLOCK_M=BM, DC=DCQ, num_warps=4)
    a_stride = A.stride(0) if A.dim() == 3 else 0
    qk_strides = (Hkv * M * DA, M * DA, DA)
    esize = 4 if dot_dtype == torch.float32 else 2
    qk_bytes = _cdiv(B * Hkv * M * DA * esize, 16) * 16  # scratch: qk, then the partials (16-byte aligned)
    qjl = (k_packed["qjl_signs"], k_packed["qjl_norms"]) if k_codec.qjl else None
    dummy = _dummy(dev)
    if use_gluon:
        g = _gluon_module()
        if not _GLUON_DECODE:
            _GLUON_DECODE.append(Replay(g._gluon_decode_kernel))
        assemble, gmeta = g.gluon_plan(
            torch.empty(B, Hkv, M, DA, device="meta"), kc, kn, vc, vn, lutk, lutv, k_codec=k_codec, v_codec=v_codec,
            M=M, Hkv=Hkv, G=G, d=d, block_n=BN, stages=cfg.get("STAGES", 2), lvk=lvk, qjl=qjl,
            given=(st is not None, en is not None, qp is not None, window is not None))
        decode = _GLUON_DECODE[0]
        bits = f"gluon K{_bits_key(k_codec)} V{_bits_key(v_codec)}"
    else:
        tmeta = dict(HKV=Hkv, G=G, D=d, **seg_args, K_QJL=bool(k_codec.qjl), HAS_START=st is not None,
                     HAS_END=en is not None, CAUSAL=qp is not None, HAS_WINDOW=window is not None, BLOCK_M=BM,
                     BLOCK_N=BN, DOT_FP32=dot_dtype == torch.float32, FAST=fast, num_warps=cfg["num_warps"],
                     num_stages=cfg.get("num_stages", 2))
        decode = _DECODE
        bits = f"K{_bits_key(k_codec)} V{_bits_key(v_codec)}"
    bits = bits.replace(" ", "").replace(",)", ")")
    metas: dict = {}  # (split count, PDL, merge chunks) -> (decode, merge, query map constexprs)
    shape_key = f"attend B={B} Hq={Hq} Hkv={Hkv} Lq={Lq} d={d} {str(q.dtype).replace('torch.', '')}"

    def run(q, kf, vf, st, en, qp, window, scale):
        T = kf["codes"].shape[2]
        SPL, pdl = splits_for(T)
        NC = merge_chunks(rows, d, pdl)
        m = metas.get((SPL, pdl, NC))
        first = m is None  # first call with this split count: record its configuration and compiled kernel
        if first:
            c = dict(cfg, SPLITS=SPL, PDL=pdl)
            # PDL: the decode kernel is launched as the query map's programmatic dependent, and the merge as the
            # decode kernel's (gluon_config); each waits (griddepcontrol.wait) before it reads the previous output.
            m = metas[SPL, pdl, NC] = (dict(gmeta, PDL=pdl, launch_pdl=pdl) if use_gluon else tmeta,
                                       dict(HKV=Hkv, G=G, D=d, SPLITS_P2=_p2(SPL),
                                            SCH=max(1, min(_p2(SPL), 32768 // d)), DC=min(d, 16384 // d), NC=NC,
                                            PDL=pdl, num_warps=8, launch_pdl=pdl),
                                       dict(qmeta, ZERO=NC > 1, PDL=pdl))
            if len(LAUNCH_CONFIGS) < 256:
                LAUNCH_CONFIGS[f"{shape_key} T={T}"] = c
        dmeta, mmeta, qm = m
        wspec = int_spec(int(window)) if window is not None else 0
        # (SPL is not specialized on, only its int width matters; the merge's tiles follow its power of 2)
        dkey, mkey = (key, pdl, wspec, int_spec(T), int_width(SPL)), (key, pdl, NC, _p2(SPL), int_width(SPL))
        n_part = B * Hkv * SPL * M
        part_end = qk_bytes + 4 * n_part * (d + 2)
        merge_bytes = 4 * rows * (NC * d + 1) if NC > 1 else 4
        buf = torch.empty(part_end + merge_bytes, device=dev, dtype=torch.uint8)
        if _QMAP.ready((key, pdl, NC)) and decode.ready(dkey) and _MERGE.ready(mkey):
            # Replays: the scratch as addresses (the compiled launchers take ints; no views to make).
            qk = buf.data_ptr()
            pacc = qk + qk_bytes
            pm = pacc + 4 * n_part * d
            pl = pm + 4 * n_part
            po = qk + part_end
            cnt = po + 4 * rows * NC * d
        else:  # Triton specializes on these calls: tensors
            qk = buf[: B * Hkv * M * DA * esize].view(dot_dtype).view(B, Hkv, M, DA)
            pacc = buf[qk_bytes : qk_bytes + 4 * n_part * d].view(torch.float32)
            pm = buf[qk_bytes + 4 * n_part * d : qk_bytes + 4 * n_part * (d + 1)].view(torch.float32)
            pl = buf[qk_bytes + 4 * n_part * (d + 1) : part_end].view(torch.float32)
            po = buf[part_end : part_end + 4 * rows * NC * d].view(torch.float32)
            cnt = buf[part_end + 4 * rows * NC * d :].view(torch.int32)
        out = torch.empty(B, Hq, Lq, d, device=dev, dtype=torch.float32)
        lse = torch.empty(B, Hq, Lq, device=dev, dtype=torch.float32)
        _QMAP((key, pdl, NC), (B * Hkv, m_tiles, DA // DCQ),
              (q, q.stride(0), q.stride(1), q.stride(2), A, a_stride, qk, *qk_strides, cnt, M, float(scale * _LOG2E)),
              qm)
        kc, kn, vc, vn = kf["codes"], kf["norms"], vf["codes"], vf["norms"]
        if use_gluon:
            args = assemble(qk, kc, kn, vc, vn, kf.get("qjl_signs"), kf.get("qjl_norms"),
                            st if st is not None else dummy, en if en is not None else dummy,
                            qp if qp is not None else dummy, pacc, pm, pl, T, window, SPL)
        else:
            ks, kg = (kf["qjl_signs"], kf["qjl_norms"]) if k_qjl else (kc, kn)  # (unused without QJL)
            args = (qk, *qk_strides,
                    kc, kc.stride(0), kc.stride(1), kc.stride(2),
                    kn, kn.stride(0), kn.stride(1), kn.stride(2),
                    ks, ks.stride(0), ks.stride(1), ks.stride(2),
                    kg, kg.stride(0), kg.stride(1), kg.stride(2),
                    vc, vc.stride(0), vc.stride(1), vc.stride(2),
                    vn, vn.stride(0), vn.stride(1), vn.stride(2),
                    lvk, lvv, lutk, lutv,
                    st if st is not None else dummy, en if en is not None else dummy, qp if qp is not None else dummy,
                    pacc, pm, pl,
                    T, M, Lq, int(window) if window is not None else 0, qjl_scale, SPL)
        grid = (B * Hkv, SPL) if use_gluon else (B * Hkv, SPL, m_tiles)
        ck = decode(dkey, grid, args, dmeta)
        if first:
            _record_compile(ck, c, bits, fast and not use_gluon)
        _MERGE(mkey, (B * Hkv, M, NC),
               (pacc, pm, pl, U, out, Hq * Lq * d, Lq * d, d, lse, Hq * Lq, Lq, po, cnt, M, SPL), mmeta)
        return out, lse

    return run
