"""The inline PTX of the kernels, run through a small PTX emulator on the CPU: the register-table centroid lookups
of the decode kernels (``_ASM_LUT2/3/4``, the Gluon kernel's 3- and 5-bit ones and QJL sign planes) must decode
every code, with the tables ``_register_tables`` builds, to the codec's fp16 centroid in code order; the encode
kernel's 4/5-bit level search (``grid_asm``) must find every level. The exact asm text the GPU compiles is run.
(The kernel paths themselves are compared with the torch reference on a CUDA GPU by test_kernels.py; the
interpreter cannot run PTX.)"""

from __future__ import annotations

import re
from fractions import Fraction

import numpy as np
import pytest
import torch

from tqcache.codec import TurboQuantizer
from tqcache.codec.packing import pack_bits, pack_codes
from tqcache.kernels.attention import _ASM_LUT2, _ASM_LUT3, _ASM_LUT4, _register_tables

_M = 0xFFFFFFFF


def _prmt(a: int, b: int, c: int) -> int:
    """PTX prmt.b32 default mode: byte i of the result is byte (c's nibble i & 7) of {b, a}; nibble bit 3 = sign fill."""
    src, out = (a & _M) | (b & _M) << 32, 0
    for i in range(4):
        sel = (c >> 4 * i) & 0xF
        byte = (src >> 8 * (sel & 7)) & 0xFF
        if sel & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << 8 * i
    return out


_OPS = {
    "shr": lambda a, b: a >> b, "shl": lambda a, b: (a << b) & _M, "and": lambda a, b: a & b,
    "or": lambda a, b: a | b, "xor": lambda a, b: a ^ b, "mul": lambda a, b: (a * b) & _M,
    "mad": lambda a, b, c: (a * b + c) & _M, "prmt": _prmt, "mov": lambda a: a,
    "add": lambda a, b: (a + b) & _M, "shf": lambda a, b, c: ((b << 32 | a) >> min(c, 32)) & _M,  # shf.r.clamp
    "shf.l.wrap.b32": lambda a, b, c: ((b << 32 | a) << (c & 31) >> 32) & _M,  # (a = b: a rotate left)
    "lop3": lambda a, b, c, lut: sum(((lut >> ((a >> i & 1) << 2 | (b >> i & 1) << 1 | (c >> i & 1))) & 1) << i
                                     for i in range(32)),
}


def _imm(t: str) -> int:
    """An immediate operand: an integer, or ``0fXXXXXXXX`` (the bits of an fp32 constant)."""
    return int(t[2:], 16) if t.startswith("0f") else int(t, 0) & _M


def _run(asm, regs: dict, ops: dict | None = None) -> dict:
    """Run the PTX text of ``asm`` on the registers ``regs`` (``ops`` adds or replaces instructions; an ``@p``
    guard runs a statement only where predicate register p is true)."""
    ops = {**_OPS, **(ops or {})}
    env = dict(regs)
    text = asm if isinstance(asm, str) else asm.value
    for stmt in text.replace("{", "").replace("}", "").split(";"):
        stmt = stmt.strip()
        if not stmt or stmt.startswith(".reg"):
            continue
        if stmt.startswith("@"):
            guard, stmt = stmt.split(None, 1)
            if not env[guard[1:]]:
                continue
        op, rest = stmt.split(None, 1)
        dst, *srcs = [t.strip() for t in rest.split(",")]
        vals = [env[t] if re.match(r"^(\$\d+|[a-z]\w*)$", t) else _imm(t) for t in srcs]
        env[dst] = (ops.get(op) or ops[op.split(".")[0]])(*vals)  # a full name (setp.le.f32) first, then its stem
    return env


def _bits16(levels: torch.Tensor) -> list[int]:
    return [x & 0xFFFF for x in levels.half().view(torch.int16).tolist()]


def _halves(env: dict, *regs: str) -> list[int]:
    """The fp16 bit patterns held by ``regs`` in element order (low half first)."""
    return [(env[r] >> 16 * i) & 0xFFFF for r in regs for i in (0, 1)]


@pytest.mark.parametrize("d", [64, 128, 256])
def test_lut4_decodes_every_byte(d):
    c = TurboQuantizer(d, 4)
    words, ok = _register_tables(c)
    assert ok
    w = [x & _M for x in words[0].tolist()]
    lv = _bits16(c.code_levels(0))
    gen = torch.Generator().manual_seed(d)
    for start in range(0, 256, 4):
        b = [start, start + 1, start + 2, start + 3]  # every byte value, in every lane over the sweep
        b = [b[i] for i in torch.randperm(4, generator=gen).tolist()]
        regs = {"$4": sum(x << 8 * i for i, x in enumerate(b))}
        regs.update({f"${5 + 4 * k + j}": w[k] for k in range(4) for j in range(4)})
        env = _run(_ASM_LUT4, regs)
        for p, regs in enumerate((("$0", "$1"), ("$2", "$3"))):  # plane p = nibble p of each byte
            assert _halves(env, *regs) == [lv[(x >> 4 * p) & 15] for x in b]


def test_lut4_refuses_asymmetric_tables():
    c = TurboQuantizer(128, 4)
    c.levels0[3] += 1e-2  # no longer c[15 - n] = -c[n] (in code order: c[m] = -c[8 + m])
    assert not _register_tables(c)[1]


def test_lut2_decodes_every_byte():
    c = TurboQuantizer(128, 2)
    w = [x & _M for x in _register_tables(c)[0][0].tolist()]
    lv = _bits16(c.code_levels(0))
    for start in range(0, 256, 4):
        b = [start, start + 1, start + 2, start + 3]
        regs = {"$8": sum(x << 8 * i for i, x in enumerate(b))}
        regs.update({f"${9 + 4 * k + j}": w[k] for k in range(2) for j in range(4)})
        env = _run(_ASM_LUT2, regs)
        for p in range(4):
            assert _halves(env, f"${2 * p}", f"${2 * p + 1}") == [lv[(x >> 2 * p) & 3] for x in b]


@pytest.mark.parametrize("d", [64, 128])
def test_lut3_decodes_every_half_word(d):
    # Halves of a group's nibble word (codes at bits 0, 4, 8, 12; attention._decode_planes): every combination of
    # the four codes in lane 0, random halves in lanes 1-3; all other bits (bit 3 of each nibble, bits above 16)
    # random, which the lookup must ignore.
    c = TurboQuantizer(d, 3)
    w = [x & _M for x in _register_tables(c)[0][0].tolist()]
    lv = _bits16(c.code_levels(0))
    gen = torch.Generator().manual_seed(3)
    noise = torch.randint(0, 1 << 31, (4, 4096), generator=gen).tolist()
    for v in range(4096):
        spread = sum(((v >> 3 * j) & 7) << 4 * j for j in range(4))
        xs = [spread | (noise[0][v] & ~0x7777 & _M)] + [noise[k][v] for k in (1, 2, 3)]
        regs = {f"${8 + k}": xs[k] for k in range(4)}
        regs.update({f"${12 + 4 * k + j}": w[k] for k in range(4) for j in range(4)})
        env = _run(_ASM_LUT3, regs)
        for j in range(4):
            assert _halves(env, f"${2 * j}", f"${2 * j + 1}") == [lv[(x >> 4 * j) & 7] for x in xs]


def test_lut3_decodes_packed_units():
    # The halves as the kernel builds them from pack_codes' units (W0, W1, H -> nibble word of group q -> n, n >> 16):
    # plane j of halves (x[2g], x[2g + 1]) is codes (8g + j, 8g + 4 + j).
    c = TurboQuantizer(128, 3)
    w = [x & _M for x in _register_tables(c)[0][0].tolist()]
    lv = _bits16(c.code_levels(0))
    codes = torch.randint(0, 8, (64, 128), generator=torch.Generator().manual_seed(4))
    for row, packed in zip(codes.tolist(), pack_codes(codes, 3).tolist()):
        units = [[int.from_bytes(bytes(packed[12 * u + 4 * i: 12 * u + 4 * i + 4]), "little") for i in range(3)]
                 for u in range(4)]
        xs = []
        for u in range(4):
            w0, w1, hw = units[u]
            for q, r in enumerate((0, 31, 2, 1)):
                rot = ((hw << r) | (hw >> (32 - r))) & _M
                n = (((w0, w1)[q // 2] >> 2 * (q % 2)) & 0x33333333) | (rot & 0x44444444)
                xs += [n, n >> 16]
        for k in range(0, len(xs), 4):  # pack = 4: halves of groups k/2, k/2 + 1
            regs = {f"${8 + i}": xs[k + i] for i in range(4)}
            regs.update({f"${12 + 4 * t + j}": w[t] for t in range(4) for j in range(4)})
            env = _run(_ASM_LUT3, regs)
            g = k // 2
            for j in range(4):
                want = [lv[row[8 * g + j]], lv[row[8 * g + 4 + j]], lv[row[8 * g + 8 + j]], lv[row[8 * g + 12 + j]]]
                assert _halves(env, f"${2 * j}", f"${2 * j + 1}") == want


# ---------------------------------------------------------------------------------- Gluon kernel, 3-bit codes
def _lut3_setup(key: bool, d: int):
    """(table words, fp16 level bits, the kernel's column order, a generator) of a 3-bit codec."""
    from tqcache.kernels.decode_gluon import kernel_order

    c = TurboQuantizer(d, 3)
    return ([x & _M for x in _register_tables(c)[0][0].tolist()], _bits16(c.code_levels(0)), kernel_order(c, key=key),
            torch.Generator().manual_seed(5 + key + d))


def _words(row: bytes, first_byte: int, n: int) -> list[int]:
    return [int.from_bytes(row[first_byte + 4 * i: first_byte + 4 * i + 4], "little") for i in range(n)]


def _table_regs(w: list[int], first: int) -> dict:
    return {f"${first + 4 * k + j}": w[k] for k in range(4) for j in range(4)}


def _rotation_regs(half: int, first: int = 20) -> dict:
    """The two per-lane H rotations of a unit half (_half_rotations: 0, 31 or 2, 1) as $first.. and $(first + 4)..,
    each broadcast over its 4 pack registers."""
    rot = (2, 1) if half else (0, 31)
    return {f"${first + 4 * k + j}": rot[k] for k in range(2) for j in range(4)}


@pytest.mark.parametrize("d", [128, 64])
def test_gluon_lut3_keys_put_each_channel_where_kernel_order_says(d):
    # Token rows through the key lookup of decode_gluon, then the kernel's tensor renumbering (_key_plane3*,
    # _k_operand): column j of plane m of lane t must hold the centroid of channel kernel_order[(d/4)·m + j].
    from tqcache.kernels.decode_gluon import _ASM_LUT3K, _ASM_LUT3K64

    w, lv, perm, gen = _lut3_setup(True, d)
    W = d // 4
    for _ in range(6):
        codes = torch.randint(0, 8, (2, d), generator=gen)
        rows = [bytes(r.tolist()) for r in pack_codes(codes, 3)]
        for t in range(4):
            got = {}  # (row, plane, column) -> fp16 bits
            if d == 128:  # words 3t .. 3t + 2 of one row (+ padding); $(4m + g) = pair m of group g
                for r, row in enumerate(rows):
                    pad = int(torch.randint(0, 1 << 32, (1,), generator=gen))
                    regs = dict(zip(("$16", "$17", "$18", "$19"), _words(row, 12 * t, 3) + [pad]))
                    env = _run(_ASM_LUT3K, {**regs, **_table_regs(w, 20)})
                    for m in range(4):
                        for j in (16 * kc + 8 * h + 2 * t + e for kc in (0, 1) for h in (0, 1) for e in (0, 1)):
                            g = 2 * (j >> 4) + ((j >> 3) & 1)
                            got[r, m, j] = (env[f"${4 * m + g}"] >> 16 * (j & 1)) & 0xFFFF
            else:  # W and H words per row, rows r and r + 8 in one call; $(4m + 2g + k) = pair m of group g, row k
                wa, wb = ((_words(row, 12 * (t // 2) + 4 * (t % 2), 1) + _words(row, 12 * (t // 2) + 8, 1)) for row in rows)
                regs = {"$16": wa[0], "$17": wa[1], "$18": wb[0], "$19": wb[1], **_table_regs(w, 28),
                        **_rotation_regs(t % 2)}
                env = _run(_ASM_LUT3K64, regs)
                for r in (0, 1):
                    for m in range(4):
                        for j in (8 * h + 2 * t + e for h in (0, 1) for e in (0, 1)):
                            got[r, m, j] = (env[f"${4 * m + 2 * (j >> 3) + r}"] >> 16 * (j & 1)) & 0xFFFF
            for (r, m, j), val in got.items():
                assert val == lv[codes[r, perm[W * m + j]]], (d, t, r, m, j)


@pytest.mark.parametrize("d", [128, 64])
def test_gluon_lut3_values_put_each_channel_where_kernel_order_says(d):
    # A token pair (a, b) through the value lookup; the fp16 pair in a register is (token a, token b) of one column,
    # column j = 8·nt + gid of plane p. d = 128: lane gid reads the W and H words of half gid mod 2 of unit gid div 2
    # (two groups); d = 64: of group gid mod 4 of unit gid div 4 (one group; W shifted by 2·(gid mod 2)).
    from tqcache.kernels.decode_gluon import _ASM_LUT3V, _ASM_LUT3V64

    w, lv, perm, gen = _lut3_setup(False, d)
    W = d // 4
    for _ in range(6):
        codes = torch.randint(0, 8, (2, d), generator=gen)
        rows = [bytes(r.tolist()) for r in pack_codes(codes, 3)]
        for gid in range(8):
            if d == 128:
                u, h = divmod(gid, 2)
                wa, wb = ((_words(r, 12 * u + 4 * h, 1) + _words(r, 12 * u + 8, 1)) for r in rows)
                regs = {"$16": wa[0], "$17": wb[0], "$18": wa[1], "$19": wb[1], **_table_regs(w, 28),
                        **_rotation_regs(h)}
                env = _run(_ASM_LUT3V, regs)
                # tensor 2p + u (code), its register g = the lane's group: column nt = 2g + u
                cols = {(p, 8 * (2 * g + u) + gid): f"${2 * (2 * p + u) + g}" for p in range(4) for u in (0, 1) for g in (0, 1)}
            else:
                u, q = divmod(gid, 4)
                wa, wb = ((_words(r, 12 * u + 4 * (q // 2), 1) + _words(r, 12 * u + 8, 1)) for r in rows)
                regs = {"$8": wa[0], "$9": wb[0], "$10": wa[1], "$11": wb[1], **_table_regs(w, 20)}
                regs.update({f"${12 + j}": 2 * (q % 2) for j in range(4)} | {f"${16 + j}": (0, 31, 2, 1)[q] for j in range(4)})
                env = _run(_ASM_LUT3V64, regs)
                cols = {(k // 2, 8 * (k % 2) + gid): f"${k}" for k in range(8)}  # register k = code k = plane k // 2
            for (p, j), reg in cols.items():
                assert _halves(env, reg) == [lv[codes[tok, perm[W * p + j]]] for tok in (0, 1)], (d, gid, p, j)


def test_gluon_codes5_put_each_channel_where_kernel_order_says():
    # 5-bit keys: the PTX shifts each code of a lane's 5 words to the low bits (a funnel shift where it straddles two
    # words) and fetches its centroid with shfl.sync.idx from the lane that holds it (lane L: level[L]; only the low
    # 5 bits of the lane operand count). Lane element i must be the centroid of channel kernel_order[j] for the
    # fragment column j it feeds.
    from tqcache.kernels.decode_gluon import _ASM_CODES5, fragment_columns, kernel_order, sigma

    c = TurboQuantizer(128, 5, seed=3)
    lv = _bits16(c.code_levels(0))
    shfl = {"shfl": lambda a, b, c_, m: lv[b & 31] * 0x10001}  # a lane's register: its entry in both halves
    perm = kernel_order(c, key=True)
    gen = torch.Generator().manual_seed(11)
    for _ in range(3):
        codes = torch.randint(0, 32, (128,), generator=gen)
        w = [x & _M for x in pack_bits(codes[None], 5).view(torch.int32)[0].tolist()]
        for t in range(4):
            regs = {f"${16 + k}": w[5 * t + k] for k in range(5)}
            regs.update({f"${21 + k}": int(torch.randint(0, 1 << 32, (1,), generator=gen)) for k in range(3)})  # padding
            regs["$24"] = 0  # (the lane's own entry: only read through shfl above)
            got = _halves(_run(_ASM_CODES5, regs, shfl), *[f"${m}" for m in range(16)])
            for lane in range(t, 32, 4):
                for j in fragment_columns(lane, 128, key=True):
                    assert got[sigma(j, 128, True) - 32 * t] == lv[int(codes[perm[j]])]


@pytest.mark.parametrize("d", [64, 128, 256])
def test_gluon_qjl_signs_put_each_sketch_row_where_qjl_order_says(d):
    # QJL keys: lane t reads words P·t .. P·t + P - 1 of the sign row (P = d/128 planes; bit = 1 when positive);
    # plane p's word becomes 16 fp16 pairs of ±1, pair j from bits j and j + 16 by one shift and one lop3. Element
    # i of the lane feeds fragment column fragment_columns(t)[i] of plane p, whose query column is sketch row
    # qjl_order[128·p + column]: its sign must match. d = 64: one plane of 64 columns; lane t takes half t % 2 of
    # word t // 2 with its high byte moved to bits 16..23 (the kernel's shift and masks), then 8 pairs.
    from tqcache.kernels.decode_gluon import _ASM_SIGNS, fragment_columns, qjl_order

    body, last = _ASM_SIGNS.value.rsplit("mov.b32", 1)
    assert last.split(";")[0].split() == ["{$0,", "$1},", "t"]  # the last statement splits t into the two halves
    asm = type(_ASM_SIGNS)(body + "}")
    perm, P, W = qjl_order(d), max(1, d // 128), min(d, 128)
    assert sorted(perm) == list(range(d))
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        pos = torch.rand(d, generator=gen) > 0.5
        w = [x & _M for x in pack_bits(pos.long()[None], 1).view(torch.int32)[0].tolist()]
        for t in range(4):
            for p in range(P):
                if d == 64:
                    x = w[t // 2] >> 16 * (t % 2)
                    x = (x & 0xFF) | (x & 0xFF00) << 8
                else:
                    x = w[P * t + p]
                got = []
                for j in range(W // 8):
                    v = _run(asm, {"$2": x, "$3": 15 - j})["t"]
                    got += [v & 0xFFFF, v >> 16]
                cols = fragment_columns(t, W, key=True)
                assert got == [0x3C00 if pos[perm[128 * p + c]] else 0xBC00 for c in cols], (t, p)


# ------------------------------------------------------------------------- encode: the 4- and 5-bit level search
def _f32(bits: int) -> float:
    return float(np.uint32(bits).view(np.float32))


def _bits32(x) -> int:
    return int(np.float32(x).view(np.uint32))


def _fma_f32(a: int, b: int, c: int) -> int:
    """fma.rn.f32 on bit patterns: the exact a·b + c rounded once to the nearest fp32 (ties to even)."""
    exact = Fraction(_f32(a)) * Fraction(_f32(b)) + Fraction(_f32(c))
    near = np.float32(float(exact))  # within one fp32 ulp; settle the candidates exactly
    cands = [near, np.nextafter(near, np.float32(-np.inf)), np.nextafter(near, np.float32(np.inf))]
    best = min(cands, key=lambda v: (abs(Fraction(float(v)) - exact), int(v.view(np.uint32)) & 1))
    return int(best.view(np.uint32))


_F32_OPS = {
    "abs": lambda a: a & 0x7FFFFFFF,
    "min": lambda a, b: _bits32(min(_f32(a), _f32(b))),
    "fma": _fma_f32,
    "set.le.f32.f32": lambda a, b: _bits32(1.0 if _f32(a) <= _f32(b) else 0.0),
    "sub.f32": lambda a, b: _bits32(_f32(a) - _f32(b)),
}


@pytest.mark.parametrize("d,bits,qjl", [(128, 4, False), (128, 5, False), (64, 4, False), (256, 5, True)])
def test_encode_level_search_ptx_finds_every_level(d, bits, qjl):
    """The encode kernel's 4- and 5-bit level search (``grid_asm``: a fitted quadratic estimate, one exact
    comparison, warp shuffles from the per-lane table of ``_LANE_TABLE``), run on the exact asm text with
    fp32 arithmetic rounded as the GPU rounds it: for |y| 1–4 ulps around every bound, at the bounds, on a random
    grid and past the last level, it must return 2^23 + #{pb < |y|} (the level's magnitude index, as fp32 bits),
    that level's fp32 square and (QJL) |level| — bit for bit what the table holds. The GPU runs this PTX; the
    interpreter runs its tl.load twin (test_kernels.py)."""
    from tqcache.kernels.encode import grid_asm, grid_map

    c = TurboQuantizer(d, bits, qjl=qjl, seed=4)
    b = bits - qjl
    half = 1 << (b - 1)
    pos = c.levels0.float()[half:]
    pb = c.bounds0.float()[half:]
    g = grid_map(tuple(pb.tolist()))
    assert g is not None
    # The lane table's three rows (lane k holds entry k): −inf, bounds, +inf; levels²; |levels| (fp32 bits).
    rows = [[_bits32(-np.inf)] + [_bits32(v) for v in pb.tolist()] + [_bits32(np.inf)],
            [_bits32(v) for v in (pos * pos).tolist()], [_bits32(v) for v in pos.tolist()]]
    rows = [r + [0] * (32 - len(r)) for r in rows]
    b32 = pb.numpy()
    ys = [b32, -b32, np.float32([0.0, -0.0, 1.0, -1.0, 4.0, float(pos[-1]) * 1.5])]
    for toward in (np.float32(0), np.float32(np.inf)):
        v = b32
        for _ in range(4):
            v = np.nextafter(v, toward)
            ys += [v, -v]
    gen = torch.Generator().manual_seed(d + bits)
    ys.append((torch.randn(2000, generator=gen) * float(pos[-1]) / 2).numpy().astype(np.float32))
    ys = np.concatenate(ys).astype(np.float32)
    for want_mag in (False, True):
        asm = grid_asm(g, want_mag)
        n = 3 if want_mag else 2
        # the table registers hold a row id; shfl.sync.idx reads that row's entry of the source lane (low 5 bits)
        shfl = {"shfl": lambda row, lane, clamp, mask: rows[row][lane & 31]}
        for y in ys.tolist():
            regs = {f"${n}": _bits32(y), f"${n + 1}": 0, f"${n + 2}": 1, f"${n + 3}": 2}
            env = _run(asm, regs, {**_F32_OPS, **shfl})
            m = int(np.searchsorted(b32, np.float32(abs(y)), side="left"))
            assert env["$0"] == _bits32(8388608.0 + m), (y, m, _f32(env["$0"]) - 8388608.0)
            assert env["$1"] == rows[1][m], (y, m)
            if want_mag:
                assert env["$2"] == rows[2][m], (y, m)
