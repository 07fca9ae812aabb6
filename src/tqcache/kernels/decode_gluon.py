"""Decode attention over a TurboQuant-packed cache in Gluon: codes decoded straight into the MMA operand layout.

Why a second decode kernel: in the Triton kernel (:mod:`.attention`) the compiler picks the register layout
of every tensor. The decoded centroid tile lands in a blocked layout and is moved into the tensor-core
operand layout through shared memory — ~260 register moves plus STS/LDS per 64-token block, more
instructions than the centroid lookup itself (docs/kernel-notes.md, v4). Gluon lets the kernel choose
layouts, and the codec lets it choose the channel order (a dot product does not care how its channels are
numbered, so a permutation folds into the query map A and the unrotation U at zero run-time cost). This
kernel numbers the channels so that **each thread loads exactly the code bytes its ``mma.sync`` fragments
need, contiguously, and decodes them in place**: no operand staging through shared memory, no layout
conversion that moves data (shared memory only holds the cp.async ring of raw code bytes, each lane's own, stored
lane-major so that no copy or read has a bank conflict: :func:`_lane_major`).

Scope (everything else takes the Triton kernel): decode and speculative verification (``M = G·Lq ≤ 16``),
one codec segment per side of 2, 3 or 4 bits (the plane layouts of ``_ASM_LUT2``/``_ASM_LUT4``, and the 3-bit
lookups below) at head_dim 64 or 128 — of 2 or 4 bits (keys also 8) at head_dim 256, in 16-token blocks, where any
other side (3 bits; keys also 5) makes both run as 128-channel halves (:func:`split_halves`) — or two halves of 64
channels at head_dim
128 (channel-split or rotated fractional bits: turbo3.5 = 4 | 3, 2.5 = 3 | 2 bits; each half its own codes, table
and norm), or quarter-bit keys of 32 | 96 channels (k3.25v3, k2.25v2: run in 64 | 128-channel containers,
:func:`key_containers`) — at head_dim 256 their 64 | 192 as three key segments, 64 | 64 + 128, beside values as
halves (:func:`kernel_segments`) — or 8-bit keys (one plane, centroids gathered from the fp16 table), or 5-bit keys at
head_dim 128 and in each 128-channel half at 256 (one plane; a lane's 32 codes are words 5t .. 5t + 4 of the row,
centroids shuffled from the lane that holds them: :func:`_codes5`); QJL keys at head_dim 64, 128, and 256 as
halves (the sign sketch as one more ±1 key plane per 128 channels — at 64, one of 64 — a lane's signs of a plane one
word of the row: :func:`_sign_plane`, :func:`qjl_order`); fp16/bf16 queries (fp16 operands); the register tables
usable (sign-symmetric fp16 centroids at 4 bits). Same arguments, partials and merge as the Triton kernel; one warp
per program.

Fragment geometry (``mma.sync.m16n8k16``, lane = 4·gid + t). Per segment ``W = d·b/8`` code bytes per token
row; plane ``p`` of byte ``s`` is channel ``s·P + p`` (``P = 8/b``); every plane is a ``[tokens, W]`` tile whose
column ``j`` is byte ``σ(j)`` of the row:

* keys — A operand of ``Sᵀ = K Q̃ᵀ`` (m = token, k = column): lane (gid, t) holds columns
  ``j = 16·kc + 8·h + 2·t + e`` of token ``gid`` (mod 8). Stored byte ``σ_K(j) = (W/4)·t + 4·kc + 2·h + e``, so the
  lane's ``W/4`` bytes of a row are one contiguous load;
* values — A operand of ``Oᵀ += Vᵀ Pᵀ`` (m = column, k = token): lane (gid, t) holds columns ``j = 8·nt + gid``
  of tokens ``2t + e + 8h`` (mod 16). ``σ_V(j) = (W/8)·gid + nt``: ``W/8`` contiguous bytes per row.

3 bits (d = 128, 48 code bytes per row): codes are stored in *units* of 32 — three int32 words ``W0, W1, H``
holding the codes' low bit pairs and top bits (:func:`tqcache.codec.packing.pack_codes`, cache format 3) — and a
*group* of 8 codes (group q of a unit) becomes the nibbles of one word in three or four instructions (:func:`_nib`).
Four planes of 32 columns; plane ``p`` holds codes ``2p, 2p + 1`` of every group (:func:`group3`):

* keys — lane t reads unit t, words ``3t .. 3t + 2`` (its groups ``4t .. 4t + 3``; a 4th, masked word pads the tile
  to a power of two); column ``16·kc + 8·h + 2·t + e`` is code ``2p + e`` of group ``4t + 2·kc + h``, so each fp16
  pair of the fragment is two codes of one group;
* values — lane gid reads half ``gid mod 2`` of unit ``gid div 2``: its low-bit word and the unit's H (its groups
  ``2·gid, 2·gid + 1``; per-lane H rotations); column ``8·nt + gid`` is code ``2p + (nt & 1)`` of group
  ``2·gid + nt // 2``, and each register pairs tokens ``2t, 2t + 1`` of one code.

At d = 64 (24 bytes per row, two units) keys read half ``t mod 2`` of unit ``t div 2`` (groups ``2t, 2t + 1``, as
the values above), values the low-bit word and H of group ``gid mod 4`` of unit ``gid div 4`` (group ``gid``). A side of
two halves (64 channels each) runs each half with its own ring, table and norm on the d = 64 geometry; the
kernel addresses rows in 4-byte units from the 16-byte-aligned row buffer, with each half's start a constexpr.
2-bit values over 64 channels leave a lane 2 bytes per row, below cp.async's 4: their ring is shared — lanes copy
4 bytes each and read back their own 2 after a barrier.

The load tiles are ``[N, 4, W/4]`` (keys) and ``[N, 8, W/8]`` (values) in blocked layouts whose lanes and
registers are those of the operand; ``reshape``/``permute`` renumber the elements into ``[W, N]`` / ``[N, W]``
operand order, and the final ``convert_layout`` only renames registers (checked: the compiled kernel has no
shared-memory instructions). :func:`kernel_order` gives the column orders that A and U fold in.
"""

from __future__ import annotations

import functools

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2
from triton.runtime.jit import constexpr_function

from .attention import _ASM_LUT2, _ASM_LUT4, _LUT2_CONSTRAINTS, _LUT4_CONSTRAINTS
from .encode import aligned4

__all__ = ["gluon_reason", "kernel_order", "gluon_plan", "sigma", "fragment_columns", "group3", "qjl_order",
           "words_ok"]


# ------------------------------------------------------------------------------------------ 3-bit lookups
# 3-bit codes are stored in units of 32 (codec/packing.py, cache format 3): words W0, W1 hold the codes' low two
# bits — group q's code j at bits 4j + 2(q mod 2) of W_{q div 2} — and H their top bits, at bit 4j + (2, 3, 0, 1)[q].
# So one group's 8 codes become the nibbles of one word (nibble j = code j, bit 3 clear) with a shift of W, a shift
# or rotate of H, one AND and one lop3: (W' & 0x33333333) | (H' & 0x44444444). (Format 2's dense stream took a
# 7-instruction spread per group: turbo3's loop 893 -> 750 SASS instructions per 32-token block.)
_LO2 = "0x33333333"
_HI1 = "0x44444444"


def _nib(n: str, w: str, w_shift: int | str, h: str, h_rot: int | str) -> str:
    """PTX: ``n`` = the nibble word of a group from its low-bit word ``w`` (shifted right by ``w_shift``: 0 or 2,
    an immediate or a register) and the unit's top-bit word ``h`` rotated left by ``h_rot`` (0, 31, 2 or 1)."""
    out = []
    src = w
    if w_shift != 0:
        out.append(f"shr.b32 a, {w}, {w_shift};\n")
        src = "a"
    if h_rot != 0:
        out.append(f"shf.l.wrap.b32 t, {h}, {h}, {h_rot};\nand.b32 t, t, {_HI1};\n")
    else:
        out.append(f"and.b32 t, {h}, {_HI1};\n")
    out.append(f"lop3.b32 {n}, {src}, {_LO2}, t, 0xEA;\n")  # (src & LO2) | t
    return "".join(out)


def _look3(sel: str, out: tuple[str, str], inter: tuple[int, int]) -> str:
    """PTX: the 4 codes in the low nibbles of ``sel`` -> fp16 centroids; ``inter`` picks which two pairs of the four
    looked-up values go into ``out`` (byte selectors over low bytes ``l`` and high bytes ``h``)."""
    return (f"prmt.b32 l, $T0, $T1, {sel};\nprmt.b32 h, $T2, $T3, {sel};\n"
            f"prmt.b32 {out[0]}, l, h, {inter[0]:#x};\nprmt.b32 {out[1]}, l, h, {inter[1]:#x};\n")


def _tables(asm: str, first: int) -> str:
    """Name the four table-word operands (each broadcast over the 4 pack registers; the first of each is used)."""
    for k in range(4):
        asm = asm.replace(f"$T{k}", f"${first + 4 * k}")
    return asm


_ROT = (0, 31, 2, 1)  # H's rotation for group q (its top bits to bit 2 of each nibble)


def _lut3_keys() -> str:
    """Keys, pack = 4: ``$16, $17, $18`` are the lane's unit (W0, W1, H: its 32 codes, groups q = 0..3; ``$19`` is
    padding), the table words ``$20, $24, $28, $32``. Output ``$(4m + q)`` is the fp16 pair ``(c_2m, c_2m+1)`` of
    group q."""
    body = []
    for q in range(4):
        body += [_nib("n", ("$16", "$17")[q // 2], 2 * (q % 2), "$18", _ROT[q]),
                 _look3("n", (f"${q}", f"${4 + q}"), (0x5140, 0x7362)),
                 "shr.b32 s, n, 16;\n", _look3("s", (f"${8 + q}", f"${12 + q}"), (0x5140, 0x7362))]
    return _tables("{\n.reg .b32 a, t, n, s, l, h;\n" + "".join(body) + "}", 20)


def _lut3_values() -> str:
    """Values, pack = 4: ``$16/$17`` are the lane's low-bit word W of tokens a/b (a pair 2t, 2t + 1), ``$18/$19``
    their top-bit word H; the lane's groups g = 0, 1 are groups 2h + g of the unit (h = gid mod 2), whose H rotations
    (0, 31 or 2, 1) are the per-lane ``$20``/``$24``. Table words ``$28, $32, $36, $40``. Output ``$(2k + g)`` is the
    pair ``(c_k(a), c_k(b))`` of group g — tokens paired in a register, as the transposed value operand packs them."""
    body = []
    for g in (0, 1):
        body += [_nib("n", "$16", 2 * g, "$18", ("$20", "$24")[g]), _nib("nb", "$17", 2 * g, "$19", ("$20", "$24")[g])]
        for k, mix in ((0, 0x5140), (4, 0x7362)):  # m's nibbles: c_k(a), c_k+1(a), c_k(b), c_k+1(b), then k + 2, k + 3
            body += [f"prmt.b32 m, n, nb, {mix:#x};\n", _look3("m", (f"${2 * k + g}", f"${2 * k + 2 + g}"), (0x6240, 0x7351)),
                     "shr.b32 s, m, 16;\n", _look3("s", (f"${2 * k + 4 + g}", f"${2 * k + 6 + g}"), (0x6240, 0x7351))]
    return _tables("{\n.reg .b32 a, t, n, nb, m, s, l, h;\n" + "".join(body) + "}", 28)


def _lut3_keys64() -> str:
    """Keys at d = 64, pack = 4: ``$16, $17`` are the lane's W and H words of row r, ``$18, $19`` of row r + 8; its
    groups g = 0, 1 are groups 2h + g of unit t div 2 (h = t mod 2), H rotated by the per-lane ``$20``/``$24``.
    Table words ``$28, $32, $36, $40``. Output ``$(4m + 2g + k)`` is the pair ``(c_2m, c_2m+1)`` of group g in row k."""
    body = []
    for k, (w, hw) in enumerate((("$16", "$17"), ("$18", "$19"))):
        for g, rot in enumerate(("$20", "$24")):
            body += [_nib("n", w, 2 * g, hw, rot),
                     _look3("n", (f"${2 * g + k}", f"${4 + 2 * g + k}"), (0x5140, 0x7362)),
                     "shr.b32 s, n, 16;\n", _look3("s", (f"${8 + 2 * g + k}", f"${12 + 2 * g + k}"), (0x5140, 0x7362))]
    return _tables("{\n.reg .b32 a, t, n, s, l, h;\n" + "".join(body) + "}", 28)


def _lut3_values64() -> str:
    """Values at d = 64, pack = 4, 8 outputs: ``$8/$9`` are the lane's low-bit word W of tokens a/b, ``$10/$11``
    the unit's top-bit word H; the lane's group gid is group q = gid mod 4 of unit gid div 4: W shifted right by
    the per-lane ``$12`` (0 or 2), H rotated left by ``$16``. Table words ``$20, $24, $28, $32``. Output ``$k`` is the
    pair ``(c_k(a), c_k(b))``."""
    body = [_nib("n", "$8", "$12", "$10", "$16"), _nib("nb", "$9", "$12", "$11", "$16")]
    for k, mix in ((0, 0x5140), (4, 0x7362)):
        body += [f"prmt.b32 m, n, nb, {mix:#x};\n", _look3("m", (f"${k}", f"${k + 1}"), (0x6240, 0x7351)),
                 "shr.b32 s, m, 16;\n", _look3("s", (f"${k + 2}", f"${k + 3}"), (0x6240, 0x7351))]
    return _tables("{\n.reg .b32 a, t, n, nb, m, s, l, h;\n" + "".join(body) + "}", 20)


# --------------------------------------------------------------------------------- 5-bit keys (d = 128)
# A lane's 32 codes are one run of 160 bits (words 5t .. 5t + 4 of the 80-byte row). The 32-entry table lives in the
# warp's registers, entry L in lane L, and ``shfl.sync.idx`` fetches entry c: it reads only the low 5 bits of its lane
# operand, so a code needs one shift (a funnel shift where it straddles two words) and no mask. (A gather from a
# 1024-entry table of fp16 pairs in memory issues fewer instructions but its 32 lanes hit ~20 L1 lines per load:
# k5v3 ran at 1.0–1.3× SDPA that way, H100.)
def _codes5() -> str:
    """PTX, pack = 8: ``$16..$20`` are a lane's 5 words of one row (``$21..$23`` padding), ``$24`` the lane's table
    entry (its fp16 centroid in both halves). Output ``$m`` (m < 16) is the fp16 pair (level[c_2m], level[c_2m+1])."""
    body = []
    for m in range(16):
        for e in (0, 1):
            a, off = divmod(5 * (2 * m + e), 32)
            src = f"${16 + a}" if off == 0 else f"x{e}"
            if off + 5 > 32:
                body.append(f"shf.r.clamp.b32 x{e}, ${16 + a}, ${17 + a}, {off};\n")
            elif off:
                body.append(f"shr.b32 x{e}, ${16 + a}, {off};\n")
            body.append(f"shfl.sync.idx.b32 v{e}, $24, {src}, 0x1f, 0xffffffff;\n")
        body.append(f"prmt.b32 ${m}, v0, v1, 0x5410;\n")
    return "{\n.reg .b32 x0, x1, v0, v1;\n" + "".join(body) + "}"


_ASM_CODES5 = gl.constexpr(_codes5())
_CODES5_CONSTRAINTS = gl.constexpr("=r," * 16 + ",".join(["r"] * 12))


_ASM_LUT3K = gl.constexpr(_lut3_keys())
_ASM_LUT3K64 = gl.constexpr(_lut3_keys64())
_ASM_LUT3V64 = gl.constexpr(_lut3_values64())
_LUT3V64_CONSTRAINTS = gl.constexpr("=r," * 8 + ",".join(["r"] * 28))
_ASM_LUT3V = gl.constexpr(_lut3_values())
_LUT3K_CONSTRAINTS = gl.constexpr("=r," * 16 + ",".join(["r"] * 20))
_LUT3V_CONSTRAINTS = gl.constexpr("=r," * 16 + ",".join(["r"] * 28))


@constexpr_function
def _lane_major(key, n, inner, vec):
    """Shared layout of one slot ``[n, 4 | 8, inner]`` of a cp.async ring (keys: lane = 4·(row mod 8) + t; values: lane =
    (row >> 1 & 3) + 4·gid, row bit 0 a register) that stores each lane's ``vec`` contiguous elements, then the 32
    lanes side by side, then the lane's other elements (the ring's slots follow one another). Every copy and read
    instruction then touches 32 distinct banks, or whole 128-byte lines of vectors. Row-major slots cost 2–8-way bank
    conflicts (3-bit keys: lanes 8 rows apart share banks), which made the L1 data pipe the bottleneck (H100, B = 8:
    74 % busy at turbo3, 85 % at k5v3)."""
    dim = lambda d, b: [1 << b if i == d else 0 for i in range(3)]  # noqa: E731
    lg = lambda x: x.bit_length() - 1  # noqa: E731
    bases = [dim(2, b) for b in range(lg(vec))]
    if key:
        bases += [dim(1, 0), dim(1, 1), dim(0, 0), dim(0, 1), dim(0, 2)]
    else:
        bases += [dim(0, 1), dim(0, 2), dim(1, 0), dim(1, 1), dim(1, 2), dim(0, 0)]
    bases += [dim(2, b) for b in range(lg(vec), lg(inner))] + [dim(0, b) for b in range(3, lg(n))]
    return gl.SharedLinearLayout(bases)


@gluon.jit
def _load_table(lut_ptr):
    """The four int32 words of a register table (once per program: they do not change along the loop)."""
    return gl.load(lut_ptr), gl.load(lut_ptr + 1), gl.load(lut_ptr + 2), gl.load(lut_ptr + 3)


@gluon.jit
def _lane_entry5(lut_ptr, BLOCK_N: gl.constexpr, LK: gl.constexpr):
    """5-bit keys: each lane's entry of the 32-entry fp16 table, entry lane = 4·(token mod 8) + t of the key load
    tile ``LK`` — ``[N, 4, 1]``, broadcast against the word tile by :func:`_key_scores`."""
    r = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, gl.SliceLayout(2, LK)))
    t = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, LK)))
    return gl.expand_dims(gl.load(lut_ptr + (4 * (r % 8))[:, None] + t[None, :]), 2)


@gluon.jit
def _decode_planes(bt, t0, t1, t2, t3, BITS: gl.constexpr):
    """Centroid planes of the byte tile ``bt`` (any shape and layout; 4 consecutive register bytes per lookup)
    from the register table ``t0..t3``: 4 bits -> 2 planes (low, high nibble), 2 bits -> 4 planes (bit pairs);
    planes past P alias plane 0."""
    if BITS == 4:
        c0, c1 = gl.inline_asm_elementwise(_ASM_LUT4, _LUT4_CONSTRAINTS, [bt, t0, t1, t2, t3],
                                           dtype=(gl.float16, gl.float16), is_pure=True, pack=4)
        c2 = c0
        c3 = c0
    else:
        c0, c1, c2, c3 = gl.inline_asm_elementwise(
            _ASM_LUT2, _LUT2_CONSTRAINTS, [bt, t0, t1],
            dtype=(gl.float16, gl.float16, gl.float16, gl.float16), is_pure=True, pack=4)
    return c0, c1, c2, c3


@gluon.jit
def _key_planes3(w, sel0, sel1, t0, t1, t2, t3, BLOCK_N: gl.constexpr, D: gl.constexpr):
    """3-bit keys: the word tile -> four ``[N, 4(t), D/16]`` planes; plane m holds codes (2m, 2m + 1) of the lane's
    groups, column 2·group + e (see :func:`kernel_order`). d = 128: ``[N, 4(t), 4]`` (12 bytes + padding per lane
    and row; the selectors are unused); d = 64: ``[N, 4(t), 2]`` with the lane's byte selectors."""
    if D == 128:
        o0, o1, o2, o3, o4, o5, o6, o7 = gl.inline_asm_elementwise(
            _ASM_LUT3K, _LUT3K_CONSTRAINTS, [w, t0, t1, t2, t3],
            dtype=(gl.float16, gl.float16, gl.float16, gl.float16, gl.float16, gl.float16, gl.float16, gl.float16),
            is_pure=True, pack=4)
    else:
        o0, o1, o2, o3, o4, o5, o6, o7 = gl.inline_asm_elementwise(
            _ASM_LUT3K64, _LUT3V_CONSTRAINTS, [w, sel0, sel1, t0, t1, t2, t3],
            dtype=(gl.float16, gl.float16, gl.float16, gl.float16, gl.float16, gl.float16, gl.float16, gl.float16),
            is_pure=True, pack=4)
    return (_key_plane3(o0, o1, BLOCK_N, D // 16), _key_plane3(o2, o3, BLOCK_N, D // 16),
            _key_plane3(o4, o5, BLOCK_N, D // 16), _key_plane3(o6, o7, BLOCK_N, D // 16))


@gluon.jit
def _key_plane3(lo, hi, BLOCK_N: gl.constexpr, L: gl.constexpr):
    """Output tensors 2m, 2m + 1 of a key lookup -> ``[N, 4, L]``, column = 2·group + e. d = 128: element i = 2k + e
    of tensor 2m + r is group 2r + k (column 4r + i); d = 64: element (row, e) of tensor 2m + g is group g."""
    return gl.reshape(gl.permute(gl.join(lo, hi), [0, 1, 3, 2]), [BLOCK_N, 4, L])


@gluon.jit
def _key_plane5(w, tv, BLOCK_N: gl.constexpr):
    """5-bit keys: the word tile ``[N, 4(t), 8]`` (5 words per lane and row) and the lane's table entry ``tv``
    (``[N, 4, 8]`` fp16, level[lane] everywhere) -> the one ``[N, 4(t), 32]`` plane; element i is the lane's code i
    (stored code 32t + i, :func:`kernel_order`)."""
    o0, o1, o2, o3 = gl.inline_asm_elementwise(_ASM_CODES5, _CODES5_CONSTRAINTS, [w, tv],
                                               dtype=(gl.float16, gl.float16, gl.float16, gl.float16),
                                               is_pure=True, pack=8)
    # tensor k holds codes 8k .. 8k + 7
    lo = gl.reshape(gl.permute(gl.join(o0, o1), [0, 1, 3, 2]), [BLOCK_N, 4, 16])
    hi = gl.reshape(gl.permute(gl.join(o2, o3), [0, 1, 3, 2]), [BLOCK_N, 4, 16])
    return gl.reshape(gl.permute(gl.join(lo, hi), [0, 1, 3, 2]), [BLOCK_N, 4, 32])


# (~w << s) & 0x80008000 | 0x3C003C00 as one lop3 (lut 0xAE = ~a & b | c): two 32-bit constants need a register
# operand, which ptxas only finds when the PTX says so (written as and + or it emits two LOP3s).
_ASM_SIGNS = gl.constexpr("{\n.reg .b32 t, m, c;\nmov.b32 m, 0x80008000;\nmov.b32 c, 0x3C003C00;\n"
                          "shl.b32 t, $2, $3;\nlop3.b32 t, t, m, c, 0xAE;\nmov.b32 {$0, $1}, t;\n}")


@gluon.jit
def _sign_plane(w, BLOCK_N: gl.constexpr, NP: gl.constexpr, LSP: gl.constexpr):
    """QJL keys: the sign word tile ``[N, 4(t), 1]`` (one word of lane t's row, bit = 1 when positive) -> one
    ``[N, 4(t), 2·NP]`` fp16 plane of ±1 (NP = 16 pairs: a 128-column plane; 8: head_dim 64); element 2j + e is
    bit j + 16e of the word (:func:`qjl_order`). Register j holds bits j and j + 16 of the word, so one shift puts
    both at the fp16 sign bits (15 and 31) and one ``lop3`` masks them and ors in 1.0 in both halves: 2 instructions
    per pair, no table. ``LSP``: the ``[N, 4, NP]`` layout of the pairs."""
    j = gl.arange(0, NP, layout=gl.SliceLayout(0, gl.SliceLayout(1, LSP)))[None, None, :]
    wb, sh = gl.broadcast(gl.convert_layout(w, LSP), 15 - j)
    lo, hi = gl.inline_asm_elementwise(_ASM_SIGNS, "=h,=h,r,r", [wb, sh], dtype=(gl.float16, gl.float16),
                                       is_pure=True, pack=1)
    return gl.reshape(gl.join(lo, hi), [BLOCK_N, 4, 2 * NP])


@gluon.jit
def _sign_scores(w, qs, sq, BLOCK_N: gl.constexpr, NP: gl.constexpr, LSP: gl.constexpr, OPA: gl.constexpr,
                 OPB: gl.constexpr):
    """``sq`` plus one sign plane's scores ``[N, BLOCK_M]``: the ±1 plane of the word tile ``w``
    (:func:`_sign_plane`: ``8·NP`` columns, ``2·NP`` per lane and row) times its sketched query columns in shared
    memory ``qs``."""
    return mma_v2(_k_operand(_sign_plane(w, BLOCK_N, NP, LSP), BLOCK_N, 8 * NP, OPA), qs.load(OPB), sq)


@gluon.jit
def _value_planes3_64(w, sel0, sel1, t0, t1, t2, t3):
    """3-bit values at d = 64: word tile ``[N, 8(gid), 2]`` -> four ``[N, 8, 2]`` planes (tensor p = codes 2p, 2p + 1
    on its word axis = column bit nt)."""
    return gl.inline_asm_elementwise(
        _ASM_LUT3V64, _LUT3V64_CONSTRAINTS, [w, sel0, sel1, t0, t1, t2, t3],
        dtype=(gl.float16, gl.float16, gl.float16, gl.float16), is_pure=True, pack=4)


@gluon.jit
def _value_planes3(w, sel0, sel1, t0, t1, t2, t3, BLOCK_N: gl.constexpr):
    """3-bit values: the word tile ``[N, 8(gid), 2]`` (token pairs adjacent in registers) and the lane's byte
    selectors -> four ``[N, 8(gid), 4]`` planes; plane p holds codes (2p, 2p + 1), column 2·group + code bit."""
    o0, o1, o2, o3, o4, o5, o6, o7 = gl.inline_asm_elementwise(
        _ASM_LUT3V, _LUT3V_CONSTRAINTS, [w, sel0, sel1, t0, t1, t2, t3],
        dtype=(gl.float16, gl.float16, gl.float16, gl.float16, gl.float16, gl.float16, gl.float16, gl.float16),
        is_pure=True, pack=4)
    # tensor k = code k, its word axis = the lane's group: join -> [N, 8, 2(group), 2(code bit)]
    return (gl.reshape(gl.join(o0, o1), [BLOCK_N, 8, 4]), gl.reshape(gl.join(o2, o3), [BLOCK_N, 8, 4]),
            gl.reshape(gl.join(o4, o5), [BLOCK_N, 8, 4]), gl.reshape(gl.join(o6, o7), [BLOCK_N, 8, 4]))


@gluon.jit
def _k_operand(c, BLOCK_N: gl.constexpr, W: gl.constexpr, OPA: gl.constexpr):
    """``[N, 4(t), W/4(i)]`` plane -> ``[N, W]`` A operand: i = 4·kc + 2·h + e -> column 16·kc + 8·h + 2·t + e."""
    c = gl.reshape(c, [BLOCK_N, 4, W // 16, 2, 2])
    c = gl.permute(c, [0, 2, 3, 1, 4])
    return gl.convert_layout(gl.reshape(c, [BLOCK_N, W]), OPA)


@gluon.jit
def _v_operand(c, BLOCK_N: gl.constexpr, W: gl.constexpr, OPA: gl.constexpr):
    """``[N, 8(gid), W/8(i)]`` plane -> ``[W, N]`` A operand (transposed): column 8·i + gid."""
    c = gl.reshape(gl.permute(c, [0, 2, 1]), [BLOCK_N, W])
    return gl.convert_layout(gl.permute(c, [1, 0]), OPA)


@gluon.jit
def _half_unit(w, e, half):
    """In-row word offsets of a lane that reads half ``half`` (0 or 1: groups 2·half, 2·half + 1, or one of them) of
    the 3-bit unit at word ``w``: element ``e`` = 0 is the low-bit word W_half (word w + half), element 1 the top-bit
    word H (word w + 2)."""
    return w + gl.where(e == 0, half, 2)


@gluon.jit
def _half_rotations(zero, half):
    """H's left rotations for the two groups of a unit half (:func:`_nib`): 0, 31 (half 0) or 2, 1 (half 1)."""
    return zero + 2 * half, zero + gl.where(half == 1, 1, 31)


@gluon.jit
def _key_offsets(BLOCK_N: gl.constexpr, BITS: gl.constexpr, DS: gl.constexpr, KL: gl.constexpr, LK: gl.constexpr):
    """Token rows, minor index, in-row offsets (elements of the segment's code tensor: bytes, or int32 words at 3
    bits) and H rotations of one key segment's ``[N, 4(t), KL]`` load tile. Lane t reads bytes
    ``[t·W/4, (t+1)·W/4)``; 3 bits: unit t, words 3t .. 3t + 2 (d_s = 128), or half t mod 2 of unit t div 2 — its W
    and H words (d_s = 64; :func:`_half_unit`); 5 bits: words 5t .. 5t + 4."""
    kt = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, gl.SliceLayout(2, LK)))
    kl = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, LK)))
    ki = gl.arange(0, KL, layout=gl.SliceLayout(0, gl.SliceLayout(1, LK)))
    zero = gl.zeros([BLOCK_N, 4, KL], gl.int32, LK)
    if BITS == 3 and DS == 64:  # lane t: half t mod 2 of unit t div 2
        off = _half_unit((kl // 2 * 3)[None, :, None], ki[None, None, :], (kl % 2)[None, :, None])
        sel0, sel1 = _half_rotations(zero, (kl % 2)[None, :, None])
    else:
        off = (kl * (BITS if BITS == 3 or BITS == 5 else KL))[None, :, None] + ki[None, None, :]
        sel0 = zero
        sel1 = zero
    return kt, ki, off, sel0, sel1


@gluon.jit
def _value_offsets(BLOCK_N: gl.constexpr, BITS: gl.constexpr, DS: gl.constexpr, VL: gl.constexpr,
                   LV: gl.constexpr, LV2: gl.constexpr):
    """Token rows, in-row offsets (in the copy layout ``LV``) and per-lane shifts (in the lookup's layout ``LV2``) of
    one value segment's ``[N, 8(gid), VL]`` tile. Lane gid reads bytes ``[gid·W/8, ..)``; 3 bits (units of 32 codes,
    W0 W1 H): the W and H words of half gid mod 2 of unit gid div 2, with H's two rotations (d_s = 128,
    :func:`_half_unit`, :func:`_half_rotations`), or of group gid mod 4 of unit gid div 4, with W's shift and H's rotation (d_s = 64)."""
    vt = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, gl.SliceLayout(2, LV)))
    vl = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(2, LV)))
    vi = gl.arange(0, VL, layout=gl.SliceLayout(0, gl.SliceLayout(1, LV)))
    g = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(2, LV2)))[None, :, None]
    zero = gl.zeros([BLOCK_N, 8, VL], gl.int32, LV2)
    if BITS == 3 and DS == 64:  # lane gid: group q = gid mod 4 of unit gid div 4 (W_{q div 2} >> 2(q mod 2), H)
        off = _half_unit((vl // 4 * 3)[None, :, None], vi[None, None, :], (vl % 4 // 2)[None, :, None])
        gq = g % 4
        sel0 = zero + 2 * (gq % 2)
        sel1 = zero + gl.where(gq == 0, 0, gl.where(gq == 1, 31, gl.where(gq == 2, 2, 1)))
    elif BITS == 3:  # lane gid: half gid mod 2 of unit gid div 2
        off = _half_unit((vl // 2 * 3)[None, :, None], vi[None, None, :], (vl % 2)[None, :, None])
        sel0, sel1 = _half_rotations(zero, g % 2)
    else:
        off = (vl * VL)[None, :, None] + vi[None, None, :]
        sel0 = zero
        sel1 = zero
    return vt, off, sel0, sel1


@gluon.jit
def _copy_rows(buf, base, rows, stride, off, ki, s_hi, PAD: gl.constexpr, NREAL: gl.constexpr, CUT: gl.constexpr):
    """cp.async one block of code rows into ``buf``; ``PAD`` > 0: a lane's words past the first ``PAD`` are padding
    (3-bit d_s = 128 keys: 3 of 4, 5-bit keys: 5 of 8); ``CUT``: elements at offsets ≥ ``NREAL`` lie past the
    segment (masked: not read, zero-filled)."""
    m = (rows < s_hi)[:, None, None]
    if PAD > 0:
        m = m & (ki < PAD)[None, None, :]
    if CUT:
        m = m & (off < NREAL)
    async_copy.async_copy_global_to_shared(buf, base + (rows * stride)[:, None, None] + off, mask=m)


@gluon.jit
def _copy_stage(slot, r0, s_hi, smk0, kc0, kt0, sk0, ko0, ki0, smv0, vc0, vt0, sv0, vo0,
                smk1, kc1, kt1, sk1, ko1, ki1, smv1, vc1, vt1, sv1, vo1, smq, kq, ktq, sq, qo, kiq,
                smk2, kc2, kt2, sk2, ko2, ki2,
                PADK0: gl.constexpr, PADK1: gl.constexpr, TWO_K: gl.constexpr, TWO_V: gl.constexpr,
                KR0: gl.constexpr, KR1: gl.constexpr, CUT0: gl.constexpr, CUT1: gl.constexpr, QJL: gl.constexpr,
                PADK2: gl.constexpr, THREE_K: gl.constexpr):
    """cp.async the code rows ``r0 ..`` of every segment (and the QJL sign words) into ring slot ``slot``, as one
    commit group. ``CUT``: a key container wider than its segment, whose elements past ``KR`` are not read
    (zero-filled)."""
    _copy_rows(smk0.index(slot), kc0, r0 + kt0, sk0, ko0, ki0, s_hi, PADK0, KR0, CUT0)
    _copy_rows(smv0.index(slot), vc0, r0 + vt0, sv0, vo0, vt0, s_hi, 0, 0, False)
    if TWO_K:
        _copy_rows(smk1.index(slot), kc1, r0 + kt1, sk1, ko1, ki1, s_hi, PADK1, KR1, CUT1)
    if TWO_V:
        _copy_rows(smv1.index(slot), vc1, r0 + vt1, sv1, vo1, vt1, s_hi, 0, 0, False)
    if THREE_K:
        _copy_rows(smk2.index(slot), kc2, r0 + kt2, sk2, ko2, ki2, s_hi, PADK2, 0, False)
    if QJL:
        _copy_rows(smq.index(slot), kq, r0 + ktq, sq, qo, kiq, s_hi, 0, 0, False)
    async_copy.commit_group()


@gluon.jit
def _load_q(qrow, qm, stride_qm, q_ok, OFF: gl.constexpr, KP: gl.constexpr, KW: gl.constexpr, LQ: gl.constexpr,
            OPB: gl.constexpr):
    """Query planes of one key segment as B operands ``[KW, BLOCK_M]``: element (c, m) = q̃[m, OFF + p·KW + c]."""
    qc = gl.arange(0, KW, layout=gl.SliceLayout(1, LQ))
    ptr = qrow + qm[None, :] * stride_qm + qc[:, None] + OFF
    q0 = gl.convert_layout(gl.load(ptr, mask=q_ok, other=0.0), OPB)
    q1 = q0
    q2 = q0
    q3 = q0
    if KP > 1:
        q1 = gl.convert_layout(gl.load(ptr + KW, mask=q_ok, other=0.0), OPB)
    if KP == 4:
        q2 = gl.convert_layout(gl.load(ptr + 2 * KW, mask=q_ok, other=0.0), OPB)
        q3 = gl.convert_layout(gl.load(ptr + 3 * KW, mask=q_ok, other=0.0), OPB)
    return q0, q1, q2, q3


@gluon.jit
def _key_scores(ck, sel0, sel1, tab, t0, t1, t2, t3, q0, q1, q2, q3, BITS: gl.constexpr, DS: gl.constexpr,
                KP: gl.constexpr, KW: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr,
                MMA: gl.constexpr, OPA: gl.constexpr):
    """Raw scores ``Sᵀ [N, BLOCK_M] = Σ_p plane_p q_pᵀ`` of one key segment (before its norm). 8 bits: one plane,
    the centroids gathered from the 256-entry fp16 table ``tab`` (512 bytes: it stays in L1); 5 bits: one plane,
    the centroids shuffled from the lanes that hold them (``tab`` is then the lane's entry, :func:`_key_plane5`)."""
    if BITS == 3:
        c0, c1, c2, c3 = _key_planes3(ck, sel0, sel1, t0, t1, t2, t3, BLOCK_N, DS)
    elif BITS == 5:
        c0 = _key_plane5(ck, gl.broadcast(tab, ck)[0], BLOCK_N)
        c1 = c0
        c2 = c0
        c3 = c0
    elif BITS == 8:
        c0 = gl.load(tab + ck.to(gl.int32))
        c1 = c0
        c2 = c0
        c3 = c0
    else:
        c0, c1, c2, c3 = _decode_planes(ck, t0, t1, t2, t3, BITS)
    s = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, MMA)
    s = mma_v2(_k_operand(c0, BLOCK_N, KW, OPA), q0, s)
    if KP > 1:
        s = mma_v2(_k_operand(c1, BLOCK_N, KW, OPA), q1, s)
    if KP == 4:
        s = mma_v2(_k_operand(c2, BLOCK_N, KW, OPA), q2, s)
        s = mma_v2(_k_operand(c3, BLOCK_N, KW, OPA), q3, s)
    return s


@gluon.jit
def _value_update(cv, sel0, sel1, t0, t1, t2, t3, pv, alpha, a0, a1, a2, a3, BITS: gl.constexpr,
                  DS: gl.constexpr, VP: gl.constexpr, VW: gl.constexpr, BLOCK_N: gl.constexpr, OPA: gl.constexpr):
    """One value segment's accumulators ``a_pᵀ ← a_pᵀ·alpha + plane_pᵀ pvᵀ`` (``cv`` in the lookup layout LV2)."""
    if BITS == 3 and DS == 64:
        v0, v1, v2, v3 = _value_planes3_64(cv, sel0, sel1, t0, t1, t2, t3)
    elif BITS == 3:
        v0, v1, v2, v3 = _value_planes3(cv, sel0, sel1, t0, t1, t2, t3, BLOCK_N)
    else:
        v0, v1, v2, v3 = _decode_planes(cv, t0, t1, t2, t3, BITS)
    a0 = mma_v2(_v_operand(v0, BLOCK_N, VW, OPA), pv, a0 * alpha[None, :])
    a1 = mma_v2(_v_operand(v1, BLOCK_N, VW, OPA), pv, a1 * alpha[None, :])
    if VP == 4:
        a2 = mma_v2(_v_operand(v2, BLOCK_N, VW, OPA), pv, a2 * alpha[None, :])
        a3 = mma_v2(_v_operand(v3, BLOCK_N, VW, OPA), pv, a3 * alpha[None, :])
    return a0, a1, a2, a3


@gluon.jit
def _store_acc(pa, sm, a0, a1, a2, a3, OFF: gl.constexpr, VP: gl.constexpr, VW: gl.constexpr, TOK: gl.constexpr):
    """One value segment's accumulators into the partials row ``pa`` ([1, BLOCK_M] pointers) at column OFF."""
    ac = gl.arange(0, VW, layout=TOK)
    ptr = pa + ac[:, None] + OFF
    gl.store(ptr, a0, mask=sm)
    gl.store(ptr + VW, a1, mask=sm)
    if VP == 4:
        gl.store(ptr + 2 * VW, a2, mask=sm)
        gl.store(ptr + 3 * VW, a3, mask=sm)


@gluon.jit
def _grid_wait():
    """``griddepcontrol.wait``: block until the grid this one depends on (the query map) has finished and its writes
    are visible (a no-op without programmatic dependent launch)."""
    gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _grid_launch_dependents():
    """``griddepcontrol.launch_dependents``: the next kernel (the merge), launched with programmatic dependent launch,
    may be scheduled once every program has said so; it waits for this grid's end before it reads what this wrote."""
    gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32, is_pure=False,
                              pack=1)


@gluon.jit(do_not_specialize=["SPLITS"])  # (it grows with T at short contexts: attention._attn_fwd_kernel's note)
def _gluon_decode_kernel(
    Q, stride_qb, stride_qh, stride_qm,  # [B, Hkv, M, D] fp16 rotated, pre-scaled; columns in kernel_order
    # Codes per segment: the whole [B, Hkv, T, W] row buffer as uint8, or as int32 words for a 3-bit segment, and the
    # segment's start KO/VO in those elements (the buffer itself is 16-byte aligned; a sliced view at byte 24 would
    # not be, and the compiler would allow no cp.async width at all). Strides are in 4-byte units for both (the
    # kernel scales uint8 ones back up), which tells it that rows are 4-byte aligned: a 3.5-bit row is 56 bytes.
    KC0, stride_k0b, stride_k0h, stride_k0t,  # key codes of segment 0
    KC1, stride_k1b, stride_k1h, stride_k1t,  # segment 1 (= KC0 when there is one)
    KC2, stride_k2b, stride_k2h, stride_k2t,  # segment 2 (KB2 > 0; = KC0 otherwise)
    KN, stride_knb, stride_knh, stride_knt,  # [B, Hkv, T, KS] fp16 key norms
    VC0, stride_v0b, stride_v0h, stride_v0t,  # value codes, as the keys
    VC1, stride_v1b, stride_v1h, stride_v1t,
    VN, stride_vnb, stride_vnh, stride_vnt,  # [B, Hkv, T, VS] fp16 value norms
    KQ, stride_kqb, stride_kqh, stride_kqt,  # [B, Hkv, T, D/32] int32 QJL sign words (QJL > 0; strides in words)
    KG, stride_kgb, stride_kgh, stride_kgt,  # [B, Hkv, T, 1] fp16 QJL residual norms γ (QJL)
    LUTK0, LUTK1, LUTV0, LUTV1, LUTK2,  # int32 [4] register tables per segment (8-bit keys: LUTK0 = the fp16 table)
    KV_START, KV_END, QPOS,  # int32 [B] (or dummies)
    PACC, PM, PL,  # partials [B·Hkv, SPLITS, M, D] fp32, [B·Hkv, SPLITS, M] fp32 ×2 (the merge kernel's input)
    T, M, window, qjl_c, SPLITS,  # qjl_c: √(π/2)/d, the sketch's inner-product scale
    HKV: gl.constexpr, G: gl.constexpr, D: gl.constexpr,
    KO0: gl.constexpr, KO1: gl.constexpr, VO0: gl.constexpr, VO1: gl.constexpr,  # segment starts (elements)
    KB0: gl.constexpr, KB1: gl.constexpr, VB0: gl.constexpr, VB1: gl.constexpr, KS: gl.constexpr, VS: gl.constexpr,
    KD0: gl.constexpr, KD1: gl.constexpr, KR0: gl.constexpr, KR1: gl.constexpr,  # key containers, real row widths
    KO2: gl.constexpr, KB2: gl.constexpr, KD2: gl.constexpr,  # a third key segment (KB2 > 0), norm = segment 1's
    QJL: gl.constexpr, HAS_START: gl.constexpr, HAS_END: gl.constexpr, CAUSAL: gl.constexpr,
    HAS_WINDOW: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr,
    STAGES: gl.constexpr, PDL: gl.constexpr,
):
    """Tokens are the MMA's M dimension and the ``BLOCK_M`` (8 or 16) query rows its N: ``Sᵀ = K Q̃ᵀ`` and
    ``Oᵀ += Vᵀ Pᵀ`` — half the padded work of ``Q̃ Kᵀ`` with 16 query rows, and half the accumulator registers.

    Each side has one segment, or two (``KB1``/``VB1`` > 0: fractional bits, e.g. 3.5 = 4 | 3 bits over d/2 channels
    each; keys also 32 | 96 channels, run in ``KD0 | KD1`` = 64 | 128-channel containers whose elements past
    ``KR0``/``KR1`` are masked), each with its own codes, table and — ``KS``/``VS`` = 2 — norm: scores are
    ``n_0·S_0 + n_1·S_1``, and segment s's values accumulate ``P·n_s``. 8-bit keys are one plane gathered from
    the fp16 table. ``KB2`` > 0: a third key segment of 128 channels (2, 3 or 4 bits) sharing segment 1's table and
    norm — head_dim 256 quarter-bit keys as halves, 64 | 64 + 128 channels (:func:`kernel_segments`). ``QJL`` > 0:
    the sign sketch as that many more key planes of ±1 (head_dim 64: one of 64 columns; 128: one of 128; 256: two;
    :func:`_sign_plane`) against the sketched query columns that follow the key containers in Q, their scores times
    ``γ·qjl_c``."""
    KM0: gl.constexpr = 1 if KB0 == 3 or KB0 == 5 else 4  # stride units -> elements (3 and 5 bits: int32 words)
    KM1: gl.constexpr = 1 if KB1 == 3 or KB1 == 5 else 4
    KU0: gl.constexpr = 32 if KB0 == 3 or KB0 == 5 else 8  # bits per element of the code tensor
    KU1: gl.constexpr = 32 if KB1 == 3 or KB1 == 5 else 8
    KPAD0: gl.constexpr = 3 if KB0 == 3 and KD0 == 128 else (5 if KB0 == 5 else 0)  # real words per lane and row
    KPAD1: gl.constexpr = 3 if KB1 == 3 and KD1 == 128 else (5 if KB1 == 5 else 0)
    KM2: gl.constexpr = 1 if KB2 == 3 else 4
    KPAD2: gl.constexpr = 3 if KB2 == 3 else 0
    KP2: gl.constexpr = 4 if KB2 == 3 else (8 // KB2 if KB2 > 0 else 2)
    KW2: gl.constexpr = KD2 // KP2 if KB2 > 0 else 16
    KL2: gl.constexpr = 4 if KB2 == 3 else KW2 // 4
    VM0: gl.constexpr = 1 if VB0 == 3 else 4
    VM1: gl.constexpr = 1 if VB1 == 3 else 4
    # Channels per segment. Keys: the *container* the kernel runs each segment as (key_containers: a 96-channel
    # segment runs as 128, with the rows past its KR real elements masked and A's extra columns zero); values: D or
    # two halves.
    VD0: gl.constexpr = D if VB1 == 0 else D // 2
    VD1: gl.constexpr = D - VD0
    KP0: gl.constexpr = 4 if KB0 == 3 else 8 // KB0  # planes (5 and 8 bits: one)
    VP0: gl.constexpr = 4 if VB0 == 3 else 8 // VB0
    KP1: gl.constexpr = 4 if KB1 == 3 else (8 // KB1 if KB1 > 0 else 2)
    VP1: gl.constexpr = 4 if VB1 == 3 else (8 // VB1 if VB1 > 0 else 2)
    KW0: gl.constexpr = KD0 // KP0  # columns per plane (= code bytes per row at 2 and 4 bits)
    VW0: gl.constexpr = VD0 // VP0
    KW1: gl.constexpr = KD1 // KP1 if KB1 > 0 else 16  # (16: shapes of the unused second segment)
    VW1: gl.constexpr = VD1 // VP1 if VB1 > 0 else 16
    # Load-tile minor widths: 2/4 bits load bytes (a lane's run per row), 3 bits int32 words.
    KL0: gl.constexpr = (4 if KD0 == 128 else 2) if KB0 == 3 else (8 if KB0 == 5 else KW0 // 4)
    KL1: gl.constexpr = (4 if KD1 == 128 else 2) if KB1 == 3 else (8 if KB1 == 5 else KW1 // 4)
    VL0: gl.constexpr = 2 if VB0 == 3 else VW0 // 8
    VL1: gl.constexpr = 2 if VB1 == 3 else VW1 // 8
    # 2-bit values over 64 channels: 2 bytes per lane and row, below cp.async's 4. Lanes then copy 4 bytes each
    # (their own and a neighbour's) and read back their own after a barrier: a shared ring, not a per-lane one.
    SH0: gl.constexpr = VB0 == 2 and VD0 == 64
    SH1: gl.constexpr = VB1 == 2 and VD1 == 64
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])
    OPA: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    OPB: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    TOK: gl.constexpr = gl.SliceLayout(1, MMA)  # [BLOCK_N] per token (rows of Sᵀ)
    QRY: gl.constexpr = gl.SliceLayout(0, MMA)  # [BLOCK_M] per query row (columns of Sᵀ)
    # Load tiles: keys [N, 4, KL] (lane = 4·(token mod 8) + t), values [N, 8, VL] (lane = 4·gid + token bits 1–2).
    LK0: gl.constexpr = gl.BlockedLayout([1, 1, KL0], [8, 4, 1], [1, 1, 1], [2, 1, 0])
    LK1: gl.constexpr = gl.BlockedLayout([1, 1, KL1], [8, 4, 1], [1, 1, 1], [2, 1, 0])
    LK2: gl.constexpr = gl.BlockedLayout([1, 1, KL2], [8, 4, 1], [1, 1, 1], [2, 1, 0])
    LV0: gl.constexpr = gl.BlockedLayout([2, 1, VL0], [4, 8, 1], [1, 1, 1], [2, 0, 1])
    LV1: gl.constexpr = gl.BlockedLayout([2, 1, VL1], [4, 8, 1], [1, 1, 1], [2, 0, 1])
    LS: gl.constexpr = gl.BlockedLayout([1, 1, 4], [8, 4, 1], [1, 1, 1], [2, 1, 0])  # SH copies: [N, 4, 4] bytes
    # Same lanes as LV, token pairs (2t, 2t + 1) adjacent in registers: the lookup then emits (token, token + 1)
    # fp16 pairs of one column, which is how the transposed value operand packs its registers.
    LW0: gl.constexpr = gl.BlockedLayout([2, 1, VL0], [4, 8, 1], [1, 1, 1], [0, 2, 1])
    LW1: gl.constexpr = gl.BlockedLayout([2, 1, VL1], [4, 8, 1], [1, 1, 1], [0, 2, 1])
    LQ: gl.constexpr = gl.BlockedLayout([4, 1], [4, 8], [1, 1], [0, 1])
    # QJL sign planes: QJL of QC columns each (head_dim 64: one plane of 64, from the two words of the row that
    # every lane copies; 128: one; 256: two, words 2t, 2t + 1 of lane t); QH words per lane and row.
    QH: gl.constexpr = 2 if QJL == 2 or D == 64 else 1
    QC: gl.constexpr = 64 if D == 64 else 128
    LKQ: gl.constexpr = gl.BlockedLayout([1, 1, QH], [8, 4, 1], [1, 1, 1], [2, 1, 0])  # QJL sign words [N, 4, QH]
    LKQP: gl.constexpr = gl.BlockedLayout([1, 1, QC // 8], [8, 4, 1], [1, 1, 1], [2, 1, 0])  # ... a plane's pairs

    pid_bh = gl.program_id(0)
    split = gl.program_id(1)
    b = pid_bh // HKV
    h = pid_bh % HKV

    offs_m = gl.arange(0, BLOCK_M, layout=QRY)
    mvalid = offs_m < M
    qi = offs_m // G

    lo = pid_bh * 0
    hi = lo + T
    if HAS_START:
        lo = gl.load(KV_START + b)
    if HAS_END:
        hi = gl.minimum(gl.load(KV_END + b), T)
    if CAUSAL:
        qp = gl.load(QPOS + b)
        hi = gl.minimum(hi, qp + (M - 1) // G + 1)
        if HAS_WINDOW:
            lo = gl.maximum(lo, qp - window + 1)
    lo = gl.maximum(lo, 0)
    n_tok = gl.maximum(hi - lo, 0)
    per = gl.cdiv(gl.cdiv(n_tok, SPLITS), BLOCK_N) * BLOCK_N
    s_lo = lo + split * per
    s_hi = gl.minimum(s_lo + per, hi)

    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, QRY)
    # Σ p per query row, kept as each lane's sum over its own tokens (tokens ≡ gid mod 8): adding a block's p then
    # needs no cross-lane reduction; the lanes' partials are summed once after the loop.
    LPART: gl.constexpr = gl.BlockedLayout([1, 2], [8, 4], [1, 1], [1, 0])  # [token mod 8, BLOCK_M], lanes as MMA's
    l_p = gl.zeros([8, BLOCK_M], gl.float32, LPART)
    a0 = gl.zeros([VW0, BLOCK_M], gl.float32, MMA)
    a1 = a0
    a2 = a0
    a3 = a0
    if VB1 > 0:
        a4 = gl.zeros([VW1, BLOCK_M], gl.float32, MMA)
        a5 = a4
        a6 = a4
        a7 = a4

    kt, ki0, k_off0, ksa0, ksb0 = _key_offsets(BLOCK_N, KB0, KD0, KL0, LK0)
    if SH0:  # the copy tile is [N, 4, 4] bytes (4 per lane), read back as [N, 8, 2]
        vt, _u, v_off0, vsa0, vsb0 = _key_offsets(BLOCK_N, 2, 64, 4, LS)
    else:
        vt, v_off0, vsa0, vsb0 = _value_offsets(BLOCK_N, VB0, VD0, VL0, LV0, LW0)
    kc0 = KC0 + KO0 + b * (stride_k0b * KM0) + h * (stride_k0h * KM0)
    vc0 = VC0 + VO0 + b * (stride_v0b * VM0) + h * (stride_v0h * VM0)
    kt1, ki1, k_off1, ksa1, ksb1, kc1 = kt, ki0, k_off0, ksa0, ksb0, kc0  # aliases when a side has one segment
    vt1, v_off1, vsa1, vsb1, vc1 = vt, v_off0, vsa0, vsb0, vc0
    if KB1 > 0:
        kt1, ki1, k_off1, ksa1, ksb1 = _key_offsets(BLOCK_N, KB1, KD1, KL1, LK1)
        kc1 = KC1 + KO1 + b * (stride_k1b * KM1) + h * (stride_k1h * KM1)
    kt2, ki2, k_off2, ksa2, ksb2, kc2 = kt, ki0, k_off0, ksa0, ksb0, kc0  # (aliases without a third segment)
    if KB2 > 0:
        kt2, ki2, k_off2, ksa2, ksb2 = _key_offsets(BLOCK_N, KB2, KD2, KL2, LK2)
        kc2 = KC2 + KO2 + b * (stride_k2b * KM2) + h * (stride_k2h * KM2)
    if VB1 > 0:
        if SH1:
            vt1, _u, v_off1, vsa1, vsb1 = _key_offsets(BLOCK_N, 2, 64, 4, LS)
        else:
            vt1, v_off1, vsa1, vsb1 = _value_offsets(BLOCK_N, VB1, VD1, VL1, LV1, LW1)
        vc1 = VC1 + VO1 + b * (stride_v1b * VM1) + h * (stride_v1h * VM1)
    kn_base = KN + b * stride_knb + h * stride_knh
    vn_base = VN + b * stride_vnb + h * stride_vnh
    ktq, kiq, q_off, kq = kt, ki0, k_off0, kc0  # (aliases without QJL: never copied)
    if QJL > 0:  # lane t copies words QH·t .. QH·t + QH - 1 of each row (head_dim 64: every lane words 0, 1)
        ktq, kiq, q_off, _u0, _u1 = _key_offsets(BLOCK_N, 1, D, QH, LKQ)
        if D == 64:
            q_off = q_off % 2
        kq = KQ + b * stride_kqb + h * stride_kqh
        kg_base = KG + b * stride_kgb + h * stride_kgh
    rows = gl.arange(0, BLOCK_N, layout=TOK)

    # Code bytes stream through a STAGES-deep ring in shared memory per segment (cp.async): block i + STAGES - 1 is
    # in flight while block i is decoded. Each lane copies and later reads back exactly its own bytes (the load
    # layouts above), so no barrier is needed between lanes. Norms are prefetched one block ahead in registers.
    SHK: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[2, 1, 0])
    # Lane-major rings (_lane_major): vectors of 16 bytes at most, one word for 3- and 5-bit segments (their runs start
    # at any word). Row-major stays for the shared 2-bit ring (SH: read across lanes) and for 8-bit keys (lane-major
    # measured slower there: 875 vs 747 µs at B = 8, 128K — its L1-resident gathers share the pipe).
    SK0: gl.constexpr = SHK if KB0 == 8 else _lane_major(True, BLOCK_N, KL0, 1 if KM0 == 1 else min(KL0, 16))
    SK1: gl.constexpr = _lane_major(True, BLOCK_N, KL1, 1 if KM1 == 1 else min(KL1, 16))
    SV0: gl.constexpr = SHK if SH0 else _lane_major(False, BLOCK_N, VL0, 1 if VM0 == 1 else min(VL0, 16))
    SV1: gl.constexpr = SHK if SH1 else _lane_major(False, BLOCK_N, VL1, 1 if VM1 == 1 else min(VL1, 16))
    smk0 = gl.allocate_shared_memory(KC0.dtype.element_ty, [STAGES, BLOCK_N, 4, KL0], SK0)
    smv0 = gl.allocate_shared_memory(VC0.dtype.element_ty, [STAGES, BLOCK_N, 4 if SH0 else 8, 4 if SH0 else VL0], SV0)
    smk1 = smk0  # (aliases when a side has one segment: never copied to or read)
    smk2 = smk0
    if KB2 > 0:
        smk2 = gl.allocate_shared_memory(KC2.dtype.element_ty, [STAGES, BLOCK_N, 4, KL2],
                                         _lane_major(True, BLOCK_N, KL2, 1 if KM2 == 1 else min(KL2, 16)))
    smv1 = smv0
    if KB1 > 0:
        smk1 = gl.allocate_shared_memory(KC1.dtype.element_ty, [STAGES, BLOCK_N, 4, KL1], SK1)
    if VB1 > 0:
        smv1 = gl.allocate_shared_memory(VC1.dtype.element_ty, [STAGES, BLOCK_N, 4 if SH1 else 8, 4 if SH1 else VL1],
                                         SV1)
    smq = smk0
    if QJL > 0:
        smq = gl.allocate_shared_memory(KQ.dtype.element_ty, [STAGES, BLOCK_N, 4, QH],
                                        _lane_major(True, BLOCK_N, QH, 1))
    n_iter = gl.cdiv(gl.maximum(s_hi - s_lo, 0), BLOCK_N)
    for i in gl.static_range(STAGES - 1):
        _copy_stage(i, s_lo + i * BLOCK_N, s_hi,
                    smk0, kc0, kt, stride_k0t * KM0, k_off0, ki0, smv0, vc0, vt, stride_v0t * VM0, v_off0,
                    smk1, kc1, kt1, stride_k1t * KM1, k_off1, ki1, smv1, vc1, vt1, stride_v1t * VM1, v_off1,
                    smq, kq, ktq, stride_kqt, q_off, kiq, smk2, kc2, kt2, stride_k2t * KM2, k_off2, ki2,
                    KPAD0, KPAD1, KB1 > 0, VB1 > 0, KR0, KR1, KR0 < KD0 * KB0 // KU0, KR1 < KD1 * KB1 // KU1,
                    QJL > 0, KPAD2, KB2 > 0)
    offs_n = s_lo + rows
    kn = gl.load(kn_base + offs_n * stride_knt, mask=offs_n < s_hi, other=0.0)
    vn = gl.load(vn_base + offs_n * stride_vnt, mask=offs_n < s_hi, other=0.0)
    if KS == 2:
        kn1 = gl.load(kn_base + 1 + offs_n * stride_knt, mask=offs_n < s_hi, other=0.0)
    if VS == 2:
        vn1 = gl.load(vn_base + 1 + offs_n * stride_vnt, mask=offs_n < s_hi, other=0.0)
    if QJL > 0:
        kg = gl.load(kg_base + offs_n * stride_kgt, mask=offs_n < s_hi, other=0.0)
    tk0, tk1, tk2, tk3 = _load_table(LUTK0)
    tv0, tv1, tv2, tv3 = _load_table(LUTV0)
    tabk0 = LUTK0
    if KB0 == 5:
        tabk0 = _lane_entry5(LUTK0, BLOCK_N, LK0)
    tabk1 = LUTK1
    if KB1 == 5:  # head_dim 256 as halves: the second half's lanes hold the same table (its row is segment 0's)
        tabk1 = _lane_entry5(LUTK1, BLOCK_N, LK1)
    if KB1 > 0:
        uk0, uk1, uk2, uk3 = _load_table(LUTK1)
    if KB2 > 0:
        wk0, wk1, wk2, wk3 = _load_table(LUTK2)
    if VB1 > 0:
        uv0, uv1, uv2, uv3 = _load_table(LUTV1)
    # The queries are the query map's output. Under programmatic dependent launch (PDL) this program starts while the
    # query map runs: everything above (offsets, the first blocks' copies, norms and tables) overlaps it, and only the
    # query loads wait for it.
    if PDL:
        _grid_wait()
    # ---- query planes as B operands (segment 0's, then segment 1's at column KD0)
    qm = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, LQ))
    qrow = Q + b * stride_qb + h * stride_qh
    q_ok = (qm < M)[None, :]  # (the query row holds KD0 + KD1 columns)
    q0, q1, q2, q3 = _load_q(qrow, qm, stride_qm, q_ok, 0, KP0, KW0, LQ, OPB)
    if KB1 > 0:
        q4, q5, q6, q7 = _load_q(qrow, qm, stride_qm, q_ok, KD0, KP1, KW1, LQ, OPB)
    if KB2 > 0:
        q8, q9, q10, q11 = _load_q(qrow, qm, stride_qm, q_ok, KD0 + KD1, KP2, KW2, LQ, OPB)
    if QJL > 0:  # the sketched query: [128·QJL, BLOCK_M] after the key containers, parked in shared memory (its
        # 16 registers per plane as a B operand would make ptxas re-materialize the lookup tables from uniform
        # registers)
        qc = gl.arange(0, QC * QJL, layout=gl.SliceLayout(1, LQ))
        qs = gl.load(qrow + qm[None, :] * stride_qm + qc[:, None] + KD0 + KD1 + KD2, mask=q_ok, other=0.0)
        sqs = gl.allocate_shared_memory(gl.float16, [QC * QJL, BLOCK_M],
                                        gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0]), qs)

    for it in range(n_iter):
        start = s_lo + it * BLOCK_N
        nxt = start + (STAGES - 1) * BLOCK_N
        slot = (it + STAGES - 1) % STAGES
        if SH0 or SH1:  # every lane has read the slot it is about to overwrite (last iteration's)
            gl.thread_barrier()
        _copy_stage(slot, nxt, s_hi,
                    smk0, kc0, kt, stride_k0t * KM0, k_off0, ki0, smv0, vc0, vt, stride_v0t * VM0, v_off0,
                    smk1, kc1, kt1, stride_k1t * KM1, k_off1, ki1, smv1, vc1, vt1, stride_v1t * VM1, v_off1,
                    smq, kq, ktq, stride_kqt, q_off, kiq, smk2, kc2, kt2, stride_k2t * KM2, k_off2, ki2,
                    KPAD0, KPAD1, KB1 > 0, VB1 > 0, KR0, KR1, KR0 < KD0 * KB0 // KU0, KR1 < KD1 * KB1 // KU1,
                    QJL > 0, KPAD2, KB2 > 0)
        offs_n = start + rows
        nmask = offs_n < s_hi
        nxt_ok = offs_n + BLOCK_N < s_hi
        knf = kn.to(gl.float32)
        vnf = vn.to(gl.float32)
        kn = gl.load(kn_base + (offs_n + BLOCK_N) * stride_knt, mask=nxt_ok, other=0.0)
        vn = gl.load(vn_base + (offs_n + BLOCK_N) * stride_vnt, mask=nxt_ok, other=0.0)
        if KS == 2:
            kn1f = kn1.to(gl.float32)
            kn1 = gl.load(kn_base + 1 + (offs_n + BLOCK_N) * stride_knt, mask=nxt_ok, other=0.0)
        if VS == 2:
            vn1f = vn1.to(gl.float32)
            vn1 = gl.load(vn_base + 1 + (offs_n + BLOCK_N) * stride_vnt, mask=nxt_ok, other=0.0)
        if QJL > 0:
            kgf = kg.to(gl.float32) * qjl_c
            kg = gl.load(kg_base + (offs_n + BLOCK_N) * stride_kgt, mask=nxt_ok, other=0.0)
        async_copy.wait_group(STAGES - 1)
        if SH0 or SH1:  # the other lanes' copies of this slot have landed too
            gl.thread_barrier()
        cur = it % STAGES
        ck0 = smk0.index(cur).load(LK0)
        if SH0:
            cv0 = smv0.index(cur).reshape([BLOCK_N, 8, VL0]).load(LV0)
        else:
            cv0 = smv0.index(cur).load(LV0)
        if KB1 > 0:
            ck1 = smk1.index(cur).load(LK1)
        if KB2 > 0:
            ck2 = smk2.index(cur).load(LK2)
        if VB1 > 0:
            if SH1:
                cv1 = smv1.index(cur).reshape([BLOCK_N, 8, VL1]).load(LV1)
            else:
                cv1 = smv1.index(cur).load(LV1)

        # ---- scores Sᵀ [N, BLOCK_M]: per segment Σ_p plane_p q_pᵀ, times the token's norm of that segment
        s = _key_scores(ck0, ksa0, ksb0, tabk0, tk0, tk1, tk2, tk3, q0, q1, q2, q3,
                        KB0, KD0, KP0, KW0, BLOCK_N, BLOCK_M, MMA, OPA)
        if KB1 > 0:
            s1 = _key_scores(ck1, ksa1, ksb1, tabk1, uk0, uk1, uk2, uk3, q4, q5, q6, q7,
                             KB1, KD1, KP1, KW1, BLOCK_N, BLOCK_M, MMA, OPA)
            if KB2 > 0:  # the third segment shares segment 1's norm
                s1 = s1 + _key_scores(ck2, ksa2, ksb2, LUTK2, wk0, wk1, wk2, wk3, q8, q9, q10, q11,
                                      KB2, KD2, KP2, KW2, BLOCK_N, BLOCK_M, MMA, OPA)
            if KS == 2:
                s = s * knf[:, None] + s1 * kn1f[:, None]
            else:
                s = (s + s1) * knf[:, None]
        else:
            s = s * knf[:, None]
        if QJL > 0:  # + γ·√(π/2)/d · ⟨S q̃, sign⟩, one 128-column plane per word of the lane
            cw = smq.index(cur).load(LKQ)
            sq = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, MMA)
            if QH == 1:
                sq = _sign_scores(cw, sqs, sq, BLOCK_N, 16, LKQP, OPA, OPB)
            elif D == 64:  # lane t's 16 signs: half t % 2 of word t // 2, its bytes moved to 0 and 2 (pairs j, j + 16)
                w0, w1 = gl.split(cw)
                tq = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, LKQ)))[None, :]
                wt = gl.where(tq < 2, w0, w1) >> (16 * (tq % 2))
                wt = (wt & 0xFF) | ((wt & 0xFF00) << 8)
                sq = _sign_scores(gl.expand_dims(wt, 2), sqs, sq, BLOCK_N, 8, LKQP, OPA, OPB)
            else:
                w0, w1 = gl.split(cw)
                sq = _sign_scores(gl.expand_dims(w0, 2), sqs.slice(0, 128), sq, BLOCK_N, 16, LKQP, OPA, OPB)
                sq = _sign_scores(gl.expand_dims(w1, 2), sqs.slice(128, 128), sq, BLOCK_N, 16, LKQP, OPA, OPB)
            s = s + sq * kgf[:, None]
        ok = nmask[:, None] & mvalid[None, :]
        if CAUSAL:
            pos = qp + qi
            ok = ok & (offs_n[:, None] <= pos[None, :])
            if HAS_WINDOW:
                ok = ok & (offs_n[:, None] > pos[None, :] - window)
        s = gl.where(ok, s, float("-inf"))

        # ---- online softmax (base 2) down the token axis; rows that saw nothing keep m = -inf
        m_new = gl.maximum(m_i, gl.max(s, 0))
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
        p = gl.exp2(s - m_safe[None, :])
        alpha = gl.exp2(m_i - m_safe)
        part = gl.convert_layout(gl.sum(gl.reshape(p, [BLOCK_N // 8, 8, BLOCK_M]), 0), LPART)
        l_p = l_p * gl.convert_layout(alpha, gl.SliceLayout(0, LPART))[None, :] + part
        m_i = m_new

        # ---- values: a_pᵀ = a_pᵀ·alpha + plane_pᵀ (p · n^V)ᵀ per segment
        pv = gl.convert_layout((p * vnf[:, None]).to(gl.float16), OPB)
        a0, a1, a2, a3 = _value_update(gl.convert_layout(cv0, LW0), vsa0, vsb0,
                                       tv0, tv1, tv2, tv3, pv, alpha, a0, a1, a2, a3, VB0, VD0, VP0, VW0, BLOCK_N, OPA)
        if VB1 > 0:
            if VS == 2:
                pv = gl.convert_layout((p * vn1f[:, None]).to(gl.float16), OPB)
            a4, a5, a6, a7 = _value_update(gl.convert_layout(cv1, LW1), vsa1, vsb1,
                                           uv0, uv1, uv2, uv3, pv, alpha, a4, a5, a6, a7, VB1, VD1, VP1, VW1,
                                           BLOCK_N, OPA)

    if PDL:  # the merge may be scheduled now (it waits for this grid's end before it reads the partials)
        _grid_launch_dependents()
    # ---- partials (rows past M are not stored); accumulator columns in kernel_order
    prow = (pid_bh * SPLITS + split) * M + offs_m
    gl.store(PM + prow, m_i, mask=mvalid)
    gl.store(PL + prow, gl.convert_layout(gl.sum(l_p, 0), QRY), mask=mvalid)
    pa = PACC + prow[None, :] * D
    _store_acc(pa, mvalid[None, :], a0, a1, a2, a3, 0, VP0, VW0, TOK)
    if VB1 > 0:
        _store_acc(pa, mvalid[None, :], a4, a5, a6, a7, VD0, VP1, VW1, TOK)


# ---------------------------------------------------------------------------------------------- host side
def sigma(j: int, W: int, key: bool) -> int:
    """Stored byte of kernel column ``j`` (0 <= j < W) of every plane (module docstring)."""
    if key:
        t, e, h, kc = (j >> 1) & 3, j & 1, (j >> 3) & 1, j >> 4
        return (W // 4) * t + 4 * kc + 2 * h + e
    return (W // 8) * (j & 7) + (j >> 3)


def fragment_columns(lane: int, W: int, key: bool) -> list[int]:
    """Kernel columns (of one plane) that ``lane`` holds in its ``mma.sync.m16n8k16`` B fragments for one token
    row: keys ``16·kc + 8·h + 2·t + e``, values ``8·nt + gid`` (lane = 4·gid + t)."""
    gid, t = lane >> 2, lane & 3
    if key:
        return [16 * kc + 8 * h + 2 * t + e for kc in range(W // 16) for h in (0, 1) for e in (0, 1)]
    return [8 * nt + gid for nt in range(W // 8)]


def group3(j: int, key: bool, d: int = 128) -> tuple[int, int]:
    """3 bits: ``(group, code offset)`` of kernel column ``j`` (0 <= j < d/4) of every plane; plane ``p`` adds ``2p``
    to the code offset (channel = 8·group + 2p + offset). Keys: lane t's columns ``16·kc + 8·h + 2·t + e`` are codes
    (2p + e) of its groups (d/32)·t + 2·kc + h; values: lane gid's columns ``8·nt + gid`` are code bit nt & 1 of its
    groups (d/64)·gid + nt // 2 (module docstring)."""
    if key:
        return (d // 32) * ((j >> 1) & 3) + (j >> 3), j & 1
    return (d // 64) * (j & 7) + (j >> 4), (j >> 3) & 1


def _segment_order(d: int, b: int, key: bool) -> list[int]:
    """Column order of one segment of ``d`` channels at ``b`` bits (channels of the segment, 0-based)."""
    if b == 3:
        return [8 * g + 2 * p + o for p in range(4) for g, o in (group3(j, key, d) for j in range(d // 4))]
    if b in (5, 8):  # one plane of d columns: column j is stored code σ(j)
        return [sigma(j, d, key) for j in range(d)]
    P, W = 8 // b, d * b // 8
    return [sigma(j, W, key) * P + p for p in range(P) for j in range(W)]


def _native256(codec, key: bool) -> bool:
    """Whether a head_dim-256 side runs as one segment (2 or 4 bits; keys also 8) on the d = 256 geometry."""
    segs = [tuple(x) for x in codec.segments]
    return segs in ([(256, 2)], [(256, 4)]) or key and segs == [(256, 8)]


def split_halves(k_codec, v_codec) -> bool:
    """head_dim 256 where a side is not native (:func:`_native256`): both sides then run as two 128-channel halves
    on the d = 128 geometry — a 256-channel segment of b bits is its first and second 128 codes (16·b bytes each,
    the stream is byte-aligned there) sharing its norm and table, as the rotated split of fractional bits does."""
    return k_codec.dim == 256 and not (_native256(k_codec, True) and _native256(v_codec, False))


def kernel_segments(codec, split: bool = False) -> list[tuple[int, int, int]]:
    """``(channels, bits, table row)`` of the segments the kernel runs: the codec's own, or with ``split`` each
    256-channel segment as two 128-channel halves of the same table (:func:`split_halves`), and the 192-channel
    segment of quarter-bit keys (64 | 192) as 64 + 128 — the keys then run as three segments, 64 | 64 + 128."""
    out = []
    for s, (d_s, b_s) in enumerate(codec.segments):
        if split and d_s in (192, 256):  # (192: quarter-bit keys' wide segment, as 64 + 128 channels)
            out += [(d_s - 128, b_s, s), (128, b_s, s)]
        else:
            out.append((d_s, b_s, s))
    return out


def key_containers(codec, split: bool = False) -> list[tuple[int, int]]:
    """``(container channels, real channels)`` per key segment: a segment runs as 64 or 128 channels — the
    quarter-bit keys (k3.25v3, k2.25v2: 32 | 96 channels) run as 64 | 128 — with A's extra columns zero and the
    row's bytes past the segment masked (the query row then has 192 columns, a multiple of the query map's 64)."""
    return [(64 if d_s <= 64 else 128 if d_s <= 128 else d_s, d_s) for d_s, _, _ in kernel_segments(codec, split)]


def kernel_order(codec, key: bool, split: bool = False) -> list[int]:
    """Column order of the kernel: ``perm[column] = natural (rotated-space) channel``, segments in order, planes major.

    2/4 bits: column ``p·W + j`` is plane ``p`` of stored byte ``σ(j)`` (module docstring), i.e. channel
    ``σ(j)·P + p``. 3 bits: column ``p·d_s/4 + j`` is channel ``8·g + 2p + o`` with ``(g, o) = group3(j)``. A second
    segment's columns follow the first's, offset by its channel count. Key segments run in their containers
    (:func:`key_containers`): a container's columns past the segment are ``-1`` (A holds zeros there). ``split``:
    the segments of :func:`kernel_segments`. Keys fold this into the query map A (columns), values into the
    unrotation U (rows).
    """
    out, off = [], 0
    segs = kernel_segments(codec, split)
    sizes = key_containers(codec, split) if key else [(d_s, d_s) for d_s, _, _ in segs]
    for (c, d_s), (_, b_s, _) in zip(sizes, segs):
        out += [off + x if x < d_s else -1 for x in _segment_order(c, b_s, key)]  # -1: a container's extra column
        off += d_s
    return out


def qjl_order(d: int = 128) -> list[int]:
    """QJL keys: ``perm[column] = sketch row`` of the sign planes (:func:`_sign_plane`; ``P = d/128`` planes of 128
    columns). Lane t reads words ``P·t .. P·t + P - 1`` of the stored row; plane p takes word ``P·t + p``, whose bit
    ``j + 16·e`` (``j = 2·kc + h``) feeds column ``16·kc + 8·h + 2·t + e`` — sketch row ``32·(P·t + p) + j + 16·e``
    (the codec packs sign i at bit i % 8 of byte i // 8). A folds this into the sketched query columns."""
    if d == 64:  # one plane of 64: lane t's 16 signs are bits 16·(t % 2) .. + 15 of word t // 2 = sketch rows 16t ..
        # 16t + 15, moved so that pair j takes rows 16t + j and 16t + j + 8
        return [16 * ((c >> 1) & 3) + 2 * (c >> 4) + ((c >> 3) & 1) + 8 * (c & 1) for c in range(64)]
    P = d // 128
    out = []
    for c in range(d):
        p, c = divmod(c, 128)
        t, e, h, kc = (c >> 1) & 3, c & 1, (c >> 3) & 1, c >> 4
        out.append(32 * (P * t + p) + 2 * kc + h + 16 * e)
    return out


@functools.lru_cache(maxsize=8)
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def gluon_reason(q: torch.Tensor, k_codec, v_codec, M: int, lut_ok: bool) -> str | None:
    """Why the Gluon decode kernel does not take this call (None when it does); the Triton kernel runs instead."""
    if q.device.type != "cuda":
        return "not a CUDA tensor (Gluon has no interpreter)"
    if _capability(q.device) < (8, 0):
        return "GPU older than sm_80 (mma.sync m16n8k16)"
    if M > 16:
        return f"{M} query rows per KV head (decode kernel: G·Lq <= 16)"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"query dtype {q.dtype} (fp16 operands only)"
    d = q.shape[-1]
    if d not in (64, 128, 256):
        return f"head_dim {d} (64, 128 or 256)"
    split = split_halves(k_codec, v_codec)
    for name, c in (("key", k_codec), ("value", v_codec)):
        segs = [tuple(x) for x in c.segments]
        if d == 256:  # 16-token blocks: both sides whole (_native256), or both as 128-channel halves (split_halves)
            halves = [(c_, b) for c_, b, _ in kernel_segments(c, True)]
            ok_bits = (2, 3, 4, 5) if name == "key" else (2, 3, 4)
            quarter = name == "key" and [c_ for c_, _ in halves] == [64, 64, 128] and \
                all(b in (2, 3, 4) for _, b in halves)
            if not (all(c_ == 128 and b in ok_bits for c_, b in halves) or quarter if split
                    else _native256(c, name == "key")):
                return (f"{name} segments {segs} at head_dim 256 (2/4-bit sides and 8-bit keys run whole; otherwise "
                        f"both sides run as 128-channel halves of 2, 3 or 4 bits — keys also 5, or quarter-bit "
                        f"keys as 64 | 64 + 128 channels)")
            continue
        two = [(64, 64)] + ([(32, 96)] if name == "key" else [])  # quarter-bit keys: 32 | 96 channels
        wide = name == "key" and segs in ([(d, 8)], [(128, 5)])  # one gathered plane: 8 bits, or 5 at d = 128
        if not (len(segs) == 1 or (len(segs) == 2 and d == 128 and (segs[0][0], segs[1][0]) in two)) or \
                any(b not in (2, 3, 4) for _, b in segs) and not wide:
            return (f"{name} segments {segs} (one segment of 2, 3 or 4 bits — keys also 8, or 5 at head_dim 128 — "
                    f"or two of 64 channels — keys also 32 | 96 — at head_dim 128)")
    if v_codec.qjl:
        return "QJL on values"
    if k_codec.qjl and d == 256 and not split:
        return ("QJL keys on the native head_dim-256 geometry (sign planes run where both sides run as 128-channel "
                "halves)")
    if not lut_ok:
        return "centroid table not sign-symmetric in fp16 (register lookup needs it)"
    return None


def _segment_codes(codes: torch.Tensor, codec, split: bool = False) -> list[tuple[torch.Tensor, int]]:
    """Per kernel segment, the row buffer as the kernel reads it — uint8, or int32 words for 3 and 5 bits — and the
    segment's start in those elements."""
    out, off = [], 0
    for d_s, b_s, _ in kernel_segments(codec, split):
        out.append((codes.view(torch.int32), off // 4) if b_s in (3, 5) else (codes, off))
        off += d_s * b_s // 8
    return out


def words_ok(codes: torch.Tensor, codec) -> bool:
    """Whether the kernel can read ``codes`` (``[B, Hkv, T, W]`` uint8): it addresses rows in 4-byte units (3-bit
    segments are int32 words), so the start, the row strides and every segment's width must be 4-byte aligned —
    always so for cache buffers; a byte-offset view is not."""
    return aligned4(codes, *(d_s * b_s // 8 for d_s, b_s in codec.segments))


def gluon_plan(qk, kc, kn, vc, vn, lutk, lutv, *, k_codec, v_codec, M, Hkv, G, d, block_n, stages=2, lvk=None,
               qjl=None, given=(False, False, False, False)):
    """What a launch of :func:`_gluon_decode_kernel` derives from the codecs and the layouts of its buffers — not from
    their addresses, the token count or the split count — as ``(assemble, meta)``. ``meta``: every constexpr and the
    launch options. ``assemble(qk, kc, kn, vc, vn, ks, kg, st, en, qp, pacc, pm, pl, T, window, splits)``:
    the runtime arguments in order, for buffers laid out as the ones given here (same shapes but T, strides and
    dtypes; ``ks``/``kg`` the QJL fields or None; ``st``/``en``/``qp`` the int32 [B] tensors or a dummy; grid
    ``(B·Hkv, SPLITS)``). ``lutk``/``lutv``: the ``[2, 4]`` register tables, one row per segment; ``lvk``: the
    ``[2, 256]`` fp16 key tables (8-bit keys gather from it, 5-bit keys hold entry L in lane L); ``qjl``: QJL keys'
    ``(signs uint8 [B, Hkv, T, d/8], norms fp16 [B, Hkv, T, 1])``, :func:`words_ok` rows. Buffers are
    tensors or, once Triton has specialized the kernel on tensors, int addresses (the compiled launcher takes
    either). ``given``: whether ``(kv_start, kv_end, q_pos, window)`` are."""
    split = split_halves(k_codec, v_codec)
    ks_, vs_ = kernel_segments(k_codec, split), kernel_segments(v_codec, split)
    kb = [b for _, b, _ in ks_] + [0, 0]
    vb = [b for _, b, _ in vs_] + [0]
    kt = [t for _, _, t in ks_] * 3  # table row per kernel segment (halves of one segment share it; a lone segment's
    vt = [t for _, _, t in vs_] * 2  # row is repeated only to fill the unused second slot)
    kd = [c for c, _ in key_containers(k_codec, split)] + [0, 0]
    # real row widths in the elements the kernel reads (bytes, or words at 3 bits)
    kr = [d_s * b_s // (32 if b_s in (3, 5) else 8) for d_s, b_s, _ in ks_] + [0]
    # Per kernel segment: whether it reads int32 words (3 and 5 bits), and its start in those elements.
    kseg = [(b_s in (3, 5), off) for (_, off), (_, b_s, _) in zip(_segment_codes(kc, k_codec, split), ks_)]
    vseg = [(b_s in (3, 5), off) for (_, off), (_, b_s, _) in zip(_segment_codes(vc, v_codec, split), vs_)]
    (kw0, ko0), (kw1, ko1) = (kseg * 2)[:2]  # one segment: the second is the first (unused)
    kw2, ko2 = kseg[2] if len(kseg) > 2 else (kw0, 0)  # a third (quarter-bit keys at head_dim 256)
    (vw0, vo0), (vw1, vo1) = (vseg * 2)[:2]
    has_qjl = qjl is not None
    # Code and sign strides in 4-byte units (words_ok checked they divide); norms in fp16 elements.
    kwords, vwords = [st // 4 for st in kc.stride()[:3]], [st // 4 for st in vc.stride()[:3]]
    swords = [st // 4 for st in qjl[0].stride()[:3]] if has_qjl else kwords
    kns, vns = list(kn.stride()[:3]), list(vn.stride()[:3])
    kgs = list(qjl[1].stride()[:3]) if has_qjl else kns
    qks = list(qk.stride()[:3])
    tables = (lvk[kt[0]] if kb[0] in (5, 8) else lutk[kt[0]], lvk[kt[1]] if kb[1] == 5 else lutk[kt[1]], lutv[vt[0]],
              lutv[vt[1]], lutk[kt[2]])
    qjl_c = k_codec.qjl_scale if has_qjl else 0.0

    def words(t, as_words: bool):  # a code or sign buffer as the kernel reads it: int32 words, or bytes
        return t.view(torch.int32) if as_words and isinstance(t, torch.Tensor) else t

    def assemble(qk, kc, kn, vc, vn, ks, kg, st, en, qp, pacc, pm, pl, T, window, splits):
        if not has_qjl:
            ks, kg = words(kc, kw0), kn  # (unused)
        return (
            qk, *qks,
            words(kc, kw0), *kwords, words(kc, kw1), *kwords, words(kc, kw2), *kwords,
            kn, *kns,
            words(vc, vw0), *vwords, words(vc, vw1), *vwords,
            vn, *vns,
            words(ks, has_qjl), *swords, kg, *kgs,
            *tables, st, en, qp,
            pacc, pm, pl,
            T, M, int(window) if window is not None else 0, qjl_c, splits,
        )

    has_start, has_end, causal, has_window = given
    meta = dict(
        HKV=Hkv, G=G, D=d, KO0=ko0, KO1=ko1, VO0=vo0, VO1=vo1, KD0=kd[0], KD1=kd[1], KR0=kr[0], KR1=kr[1], KO2=ko2,
        KB2=kb[2], KD2=kd[2], KB0=kb[0], KB1=kb[1], VB0=vb[0], VB1=vb[1], KS=kn.shape[-1], VS=vn.shape[-1],
        QJL=max(1, d // 128) if has_qjl else 0, HAS_START=has_start, HAS_END=has_end, CAUSAL=causal,
        HAS_WINDOW=has_window, BLOCK_N=block_n, BLOCK_M=8 if M <= 8 else 16, STAGES=stages, PDL=False, num_warps=1,
    )
    return assemble, meta
