"""Triton kernels vs their torch twins (the spec): attention over packed K/V, and encode/append.

On a machine without CUDA the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set here
before the kernel modules are imported — Triton picks interpreter or compiler when a kernel is decorated);
with CUDA they are compiled and run on the GPU. Shapes are small so the interpreter stays fast.

Tolerances (DESIGN §4): fp32 queries — a tight absolute bound (the kernel uses ≈fp32 tf32x3 products on
the GPU, exact fp32 in the interpreter); fp16/bf16 queries — the kernel's error against the fp32 reference
is at most 2× that of a same-precision torch attention over the decoded cache (plus a hair). Packed bytes
from the encode kernel must equal the torch codec's, except coordinates within 1e-5 of a decision boundary
(counted and printed; none occur in the interpreter).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


def _needs_fresh_process() -> bool:
    """Triton picks interpreter or compiler when a function is decorated, its own library functions
    (tl.cdiv, reductions) included. If another test module imported Triton first without
    TRITON_INTERPRET=1, the CPU tests cannot run here: they then run in a fresh process instead."""
    if HAS_CUDA or "triton" not in sys.modules:
        return False
    try:
        import triton.language.standard as _std

        return type(_std.cdiv).__name__ != "InterpretedFunction"
    except Exception:  # pragma: no cover
        return False


_DELEGATE = _needs_fresh_process()
_PREV_INTERPRET = os.environ.get("TRITON_INTERPRET")
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # read by @triton.jit when the kernel modules are imported

triton = pytest.importorskip("triton")

import tqcache.kernels as K  # noqa: E402
from tqcache.codec import TurboQuantizer  # noqa: E402
from tqcache.codec.attention import attend_packed  # noqa: E402
from tqcache.kernels.attention import attend_packed_triton  # noqa: E402
from tqcache.kernels.encode import encode_into  # noqa: E402

# Restore the environment for other test modules (their CPU tensors keep taking the torch reference);
# inside this module the fixture below turns the interpreter dispatch back on for each test.
if not HAS_CUDA:
    if _PREV_INTERPRET is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _PREV_INTERPRET

DEV = torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(autouse=True)
def _interpret_on_cpu(request, monkeypatch):
    if _DELEGATE and request.node.name != "test_in_fresh_process":
        pytest.skip("Triton was imported without the interpreter: run by test_in_fresh_process")
    if not HAS_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def test_in_fresh_process():
    if not _DELEGATE:
        pytest.skip("the kernel tests run in this process")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider"],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _make(d, kbits, vbits, kqjl=False, B=2, Hkv=2, T=37, seed=0, rotation="hadamard", split="halves"):
    g = _gen(seed)
    kc = TurboQuantizer(d, kbits, qjl=kqjl, seed=seed + 1, rotation=rotation, split=split).to(DEV)
    vc = TurboQuantizer(d, vbits, seed=seed + 2, rotation=rotation, split=split).to(DEV)
    # Keys with a few large channels (real keys have outliers), values plain.
    k = torch.randn(B, Hkv, T, d, generator=g) * (1 + 4 * (torch.rand(d, generator=g) > 0.9))
    v = torch.randn(B, Hkv, T, d, generator=g)
    return kc, vc, kc.quantize(k.to(DEV)), vc.quantize(v.to(DEV))


def _baseline(q, kc, kp, vc, vp, scale, mask):
    """Same-precision torch attention over the decoded cache: products in q's dtype, softmax in fp32."""
    dt = q.dtype
    B, Hq, Lq, d = q.shape
    Hkv = kp.lead_shape[1]
    kd = kc.dequantize(kp).to(dt).repeat_interleave(Hq // Hkv, 1)
    vd = vc.dequantize(vp).to(dt).repeat_interleave(Hq // Hkv, 1)
    s = (q @ kd.transpose(-1, -2)).float() * scale
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return (p.to(dt) @ vd).float(), lse


def _check(q, kc, kp, vc, vp, *, splits=None, **kw):
    scale = q.shape[-1] ** -0.5
    out, lse = attend_packed_triton(q, kc, kp, vc, vp, scale=scale, splits=splits, **kw)
    ref, rlse = attend_packed(q.float(), kc, kp, vc, vp, scale=scale, **kw)
    assert out.shape == ref.shape and lse.shape == rlse.shape
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert torch.isfinite(out).all()
    empty = torch.isinf(rlse)
    assert torch.equal(torch.isinf(lse), empty), "rows that attend nothing must have lse = -inf"
    assert torch.all(out[empty] == 0)
    fin = ~empty
    err = (out - ref).abs().max().item()
    lerr = (lse[fin] - rlse[fin]).abs().max().item() if fin.any() else 0.0
    mag = ref.abs().max().item() + 1e-6
    if q.dtype == torch.float32:
        assert err <= 2e-5 * mag + 1e-6, f"fp32 out error {err:.3g} (|ref| {mag:.3g})"
        assert lerr <= 2e-5 * (rlse[fin].abs().max().item() + 1 if fin.any() else 1), f"fp32 lse error {lerr:.3g}"
    else:
        from tqcache.codec.attention import build_mask

        B, _, Lq, _ = q.shape
        mask = build_mask(B, Lq, kp.lead_shape[2], device=q.device, **kw)
        bout, blse = _baseline(q, kc, kp, vc, vp, scale, mask)
        berr = (bout - ref).abs().max().item()
        blerr = (blse[fin] - rlse[fin]).abs().max().item() if fin.any() else 0.0
        assert err <= 2 * berr + 1e-4 * mag, f"{q.dtype} out error {err:.3g} > 2x baseline {berr:.3g}"
        assert lerr <= 2 * blerr + 1e-3, f"{q.dtype} lse error {lerr:.3g} > 2x baseline {blerr:.3g}"
    return out, lse


# ---------------------------------------------------------------------------------------------- attention
ATT_CASES = [
    # d, kbits, vbits, key qjl, q dtype, T, Lq
    (64, 4, 4, False, torch.float32, 37, 1),
    (64, 3, 2, False, torch.float16, 130, 1),
    (64, 2, 3, False, torch.bfloat16, 1, 1),
    (128, 4, 3, False, torch.bfloat16, 130, 1),
    (128, 3.5, 3.5, False, torch.float32, 130, 2),
    (128, 2.5, 4, False, torch.float16, 37, 1),
    (128, 8, 4, False, torch.float32, 37, 1),
    (64, 4, 8, False, torch.bfloat16, 37, 4),
    (256, 3, 2, False, torch.float32, 37, 1),
    (256, 4, 3.5, False, torch.bfloat16, 37, 1),
    (64, 4, 4, True, torch.float32, 130, 1),
    (128, 3, 3, True, torch.float16, 37, 2),
    (128, 4.5, 4, True, torch.float32, 37, 1),
    (64, 3, 2, False, torch.float16, 130, 1),  # narrow key planes take the natural path, value planes 16 wide
    (128, 3.5, 2.5, False, torch.bfloat16, 130, 1),
    (64, 4, 3.25, False, torch.float32, 70, 1),  # quarter-bit values: 48 channels read as 32 + 16
    (128, 2.25, 3.25, False, torch.bfloat16, 70, 2),  # 96 = 64 + 32 on both sides, three kernel segments
    (128, 5, 3, False, torch.float32, 37, 1),  # 5-7 bits: 40-56-bit group words (k5v3)
    (64, 6, 7, False, torch.float16, 70, 2),
]


@pytest.mark.parametrize("d,kb,vb,kqjl,dt,T,Lq", ATT_CASES)
def test_attend_matches_reference(d, kb, vb, kqjl, dt, T, Lq):
    kc, vc, kp, vp = _make(d, kb, vb, kqjl, T=T, seed=hash((d, kb, vb, T)) % 1000)
    q = (torch.randn(2, 8, Lq, d, generator=_gen(7)) * 2).to(DEV, dt)
    _check(q, kc, kp, vc, vp)


# ------------------------------------------------------------------------------------------ prefill (prefill.py)
@pytest.mark.parametrize("d,bits,split,scaled", [(128, 4, "halves", False), (64, 3.5, "outliers", True),
                                                 (128, 5, "halves", True), (64, 2, "halves", False),
                                                 (128, 8, "halves", False), (128, 3.5, "rotated", False)])
def test_dequantize_rotated_equals_the_codec(d, bits, split, scaled):
    from tqcache.kernels.prefill import dequantize_rotated

    g = _gen(int(bits * 10) + d)
    c = TurboQuantizer(d, bits, seed=3, split=split, channel_scale=scaled).to(DEV)
    p = c.quantize((torch.randn(2, 3, 45, d, generator=g) * 3).to(DEV))
    ref = c.rotated(p)
    view = {n: t[:, :, 5:44] for n, t in p.fields.items()}  # a strided slice of the storage, as the cache passes
    assert torch.equal(dequantize_rotated(c, view, torch.float32), ref[:, :, 5:44])
    assert torch.equal(dequantize_rotated(c, p.fields, torch.float16), ref.to(torch.float16))


@pytest.mark.parametrize("d,kb,vb,heads_scale", [(64, 4, 4, False), (128, 3.5, 3, True), (64, 5, 3, True)])
def test_attend_prefill_matches_reference(d, kb, vb, heads_scale):
    """Every packed token from kv_start on is visible; the prefix decoded in 3 chunks and merged by LSE."""
    from tqcache.kernels.prefill import attend_prefill

    g = _gen(d + int(kb * 10))
    Hkv, T = 2, 70
    kc = TurboQuantizer(d, kb, seed=1, channel_scale=heads_scale, heads=Hkv if heads_scale else None).to(DEV)
    vc = TurboQuantizer(d, vb, seed=2).to(DEV)
    k = torch.randn(3, Hkv, T, d, generator=g) * (1 + 3 * (torch.rand(d, generator=g) > 0.8))
    if heads_scale:
        kc.calibrate(k.to(DEV), torch.rand(Hkv, 1, d, generator=g).to(DEV) + 0.1)
    kp, vp = kc.quantize(k.to(DEV)), vc.quantize(torch.randn(3, Hkv, T, d, generator=g).to(DEV))
    q = torch.randn(3, Hkv * 4, 6, d, generator=g).to(DEV)
    start = torch.tensor([0, 9, T], device=DEV, dtype=torch.int32)  # the last sequence sees nothing
    out, lse = attend_prefill(q, kc, kp.fields, vc, vp.fields, scale=d**-0.5, kv_start=start, chunk=25)
    ref, rlse = attend_packed(q, kc, kp, vc, vp, scale=d**-0.5, kv_start=start)
    assert torch.equal(torch.isinf(lse), torch.isinf(rlse)) and torch.isinf(lse[2]).all() and (out[2] == 0).all()
    # fp32 products in the CPU interpreter; fp16 operands on the GPU (as the split-K kernel's), fp32 accumulation.
    tol = 1e-5 if DEV.type == "cpu" else 2e-3
    assert (out - ref).abs().max() <= tol * ref.abs().max()
    assert (lse[:2] - rlse[:2]).abs().max() <= tol


def test_kernels_attend_routes_long_prefill_chunks(monkeypatch):
    """kernels.attend sends a prefill chunk of ≥ PREFILL_MIN_ROWS rows per KV head to attend_prefill (probed
    first), and keeps the split-K kernel for shorter chunks, other masks and QJL keys (with the reason)."""
    from tqcache.kernels import prefill

    calls = []
    real = prefill.attend_prefill
    monkeypatch.setattr(prefill, "attend_prefill", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(prefill, "PREFILL_MIN_ROWS", 16)
    kc, vc, kp, vp = _make(64, 4, 3, T=40, seed=8)
    dt = torch.float32 if DEV.type == "cpu" else torch.bfloat16  # (the GPU path takes fp16/bf16 queries)
    q = torch.randn(2, 4, 8, 64, generator=_gen(8)).to(DEV, dt)  # G = 2, Lq = 8: 16 rows per KV head
    start = torch.tensor([0, 3], device=DEV, dtype=torch.int32)
    out, lse = K.attend(q, kc, kp, vc, vp, scale=0.125, kv_start=start)
    ref, rlse = attend_packed(q.float(), kc, kp, vc, vp, scale=0.125, kv_start=start)
    assert len(calls) == 2  # the probe's call and this one
    assert (out - ref).abs().max() <= (1e-5 if DEV.type == "cpu" else 2e-3) * ref.abs().max()
    K.attend(q[:, :, :7], kc, kp, vc, vp, scale=0.125, kv_start=start)  # 14 rows: the kernel
    K.attend(q, kc, kp, vc, vp, scale=0.125, q_pos=torch.tensor([40, 40], device=DEV))  # causal: the kernel
    assert len(calls) == 2
    qkc, qvc, qkp, qvp = _make(64, 4, 3, kqjl=True, T=40, seed=9)
    assert "QJL" in prefill.prefill_reason(q, qkc, qvc)
    K.attend(q, qkc, qkp, qvc, qvp, scale=0.125)
    assert len(calls) == 2
    assert "segment of 96 channels" in prefill.prefill_reason(q, *_make(128, 2.25, 2, T=4)[:2])


def test_self_test_runs_every_probe_under_the_dispatch_keys():
    """kernels.self_test (``tqcache info --probe``) runs the probes the dispatchers would run on first use, records
    them under the same keys, and they pass for a preset; a scheme without codecs is refused."""
    got = K.self_test(DEV, "turbo4", head_dim=64, heads=2)
    assert set(got) == {"attend", "attend causal", "encode keys", "encode values", "window", "prefill"}, got
    assert all(v["passed"] for v in got.values()), got
    probes = K.info()["probes"]
    for kind in ("attend", "encode", "window", "prefill"):
        assert any(k.startswith(kind + " ") for k in probes), kind
    assert K.info()["prefill"]["min_rows_per_kv_head"] > 0
    with pytest.raises(ValueError, match="'none' compresses nothing"):
        K.self_test(DEV, "none")


def test_attend_probes_the_layout_it_runs(monkeypatch):
    """The first-use probe of kernels.attend runs the call's own compile-time layout (its KV heads, group, decode or
    chunk, which of kv_start / kv_end / q_pos / window it passes), so what the probe compiles is what the call
    launches; a call with another layout gets a probe of its own, and both agree with the reference."""
    from tqcache.codec.attention import attend_packed
    from tqcache.kernels._launch import Plans

    monkeypatch.setattr(K, "_PROBES", {})  # (only this test's probes)
    monkeypatch.setattr(K, "_CHECKS", Plans(per_codec=256))
    kc, vc, kp, vp = _make(64, 4, 4, T=40)
    q = torch.randn(2, 4 * kp.lead_shape[1], 1, 64, generator=_gen(32)).to(DEV)
    for kw in ({}, {"kv_end": torch.tensor([40, 23], device=DEV)}):
        out, _ = K.attend(q, kc, kp, vc, vp, scale=0.125, **kw)
        ref, _ = attend_packed(q.float(), kc, kp, vc, vp, scale=0.125, **kw)
        assert (out - ref).abs().max() < 1e-3
    hkv = kp.lead_shape[1]
    keys = [k for k in K.info()["probes"] if k.startswith("attend ")]
    assert len(keys) == 2 and keys[0].endswith(f"Hkv={hkv} G=4 decode") and keys[1].endswith("G=4 decode kv_end"), keys


def test_attend_haar_rotation():
    kc, vc, kp, vp = _make(64, 3.5, 2.5, T=37, rotation="haar")
    q = torch.randn(2, 4, 1, 64, generator=_gen(3)).to(DEV)
    _check(q, kc, kp, vc, vp)


@pytest.mark.parametrize("d,kb,vb,dt", [(128, 3.5, 2.5, torch.float32), (64, 3.5, 2.5, torch.float16),
                                          (128, 2.5, 3.5, torch.bfloat16)])
def test_attend_shared_norm_split(d, kb, vb, dt):
    # split="rotated": both segments of a vector share one stored norm (norms width 1).
    kc, vc, kp, vp = _make(d, kb, vb, T=70, seed=21, split="rotated")
    assert kp["norms"].shape[-1] == 1 and vp["norms"].shape[-1] == 1
    q = torch.randn(2, 4, 2, d, generator=_gen(21)).to(DEV, dt)
    _check(q, kc, kp, vc, vp)


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
def test_attend_ragged_batch_and_empty_rows(dt):
    # Sequence 0 attends slots [3, 30), sequence 1 has nothing (start == end), sequence 2 the full range.
    kc, vc, kp, vp = _make(64, 4, 3, B=3, Hkv=2, T=70, seed=5)
    q = torch.randn(3, 6, 1, 64, generator=_gen(4)).to(DEV, dt)
    st = torch.tensor([3, 10, 0], device=DEV)
    en = torch.tensor([30, 10, 70], device=DEV)
    _, lse = _check(q, kc, kp, vc, vp, kv_start=st, kv_end=en, splits=3)
    assert torch.isinf(lse[1]).all() and torch.isfinite(lse[0]).all()


@pytest.mark.parametrize("window", [None, 9])
def test_attend_causal_chunk(window):
    # A prefill chunk of 40 queries (G·Lq = 80 rows: two query tiles) at per-sequence positions.
    kc, vc, kp, vp = _make(64, 4, 3, B=2, Hkv=2, T=130, seed=6)
    q = torch.randn(2, 4, 40, 64, generator=_gen(5)).to(DEV)
    qp = torch.tensor([90, 20], device=DEV)
    _check(q, kc, kp, vc, vp, q_pos=qp, window=window, kv_start=torch.tensor([0, 4], device=DEV))


def test_attend_speculative_window_fp16():
    kc, vc, kp, vp = _make(128, 3, 3, B=2, Hkv=1, T=130, seed=8)
    q = torch.randn(2, 4, 3, 128, generator=_gen(6)).to(DEV, torch.float16)
    _check(q, kc, kp, vc, vp, q_pos=torch.tensor([127, 60], device=DEV), window=50)


def test_split_count_does_not_change_the_result():
    kc, vc, kp, vp = _make(64, 4, 4, T=130, seed=9)
    q = torch.randn(2, 4, 1, 64, generator=_gen(8)).to(DEV)
    outs = [attend_packed_triton(q, kc, kp, vc, vp, scale=0.125, splits=s)[0] for s in (1, 2, 5)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-5, atol=1e-6)


def test_merge_column_chunks_match_one_program_per_row(monkeypatch):
    """The merge over NC column chunks (merge_chunks: small batches; the last program of a row to arrive adds the
    chunks' outputs) gives the one-program-per-row merge's output up to fp32 summation order and the same lse, and
    the same bits on a second call (the chunks are added in chunk order, not arrival order)."""
    from tqcache.kernels import attention as A
    from tqcache.kernels._launch import Plans

    kc, vc, kp, vp = _make(64, 4, 3, B=1, Hkv=2, T=150, seed=31)
    q = torch.randn(1, 8, 1, 64, generator=_gen(32)).to(DEV)
    assert A.merge_chunks(1 * 2 * 4, 64) > 1  # this shape takes the chunked merge by default
    got = {}
    for nc in (1, 2, 4):
        monkeypatch.setattr(A, "MERGE_NC", nc)
        monkeypatch.setattr(A, "_PLANS", Plans())  # plans fix NC when made
        for r in (A._QMAP, A._MERGE, A._DECODE):
            monkeypatch.setattr(r, "hits", {})
        o, lse = attend_packed_triton(q, kc, kp, vc, vp, scale=0.125, splits=5)
        o2, lse2 = attend_packed_triton(q, kc, kp, vc, vp, scale=0.125, splits=5)
        assert torch.equal(o, o2) and torch.equal(lse, lse2)
        got[nc] = (o, lse)
    for nc in (2, 4):
        torch.testing.assert_close(got[nc][0], got[1][0], rtol=1e-5, atol=1e-6)
        assert torch.equal(got[nc][1], got[1][1])


def test_codebook_changed_in_place_is_not_served_stale():
    """The kernels cache constants derived from a codec (centroid tables, query map); editing the codec's
    buffers in place after a first call must rebuild them."""
    kc, vc, kp, vp = _make(64, 4, 3, T=40, seed=21)
    q = torch.randn(2, 4, 1, 64, generator=_gen(22)).to(DEV)
    _check(q, kc, kp, vc, vp)  # constants cached
    with torch.no_grad():
        vc.levels0.mul_(1.25)
        kc.levels0.mul_(0.8)
    _check(q, kc, kp, vc, vp)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_plane_permutation_matches_the_bit_stream(bits):
    # 2/4 bits: plane p of byte i holds the code of channel i·P + p. 3 bits (32-code units W0, W1, H): the nibble
    # word n_g of group g = 4u + q is ((W_{q//2} >> 2(q%2)) & 0x33333333) | (rotl(H, (0, 31, 2, 1)[q]) & 0x44444444),
    # split into halves x[2g + h] = n_g >> 16h, and plane j holds code j (bits 4j..4j+2) of each half. The kernel's
    # column order (_plane_perm, folded into A and U) must say the same as the packed codes.
    from tqcache.codec.packing import pack_codes
    from tqcache.kernels.attention import _planes, _plane_perm

    d = 128
    P = _planes(d, bits)
    assert P == (4 if bits == 3 else 8 // bits)
    codes = torch.randint(0, 1 << bits, (5, d), generator=_gen(11))
    by = pack_codes(codes, bits).long()  # [5, d·bits/8]
    if bits == 3:
        words = (by.reshape(5, d // 32, 3, 4) << torch.arange(0, 32, 8)).sum(-1)  # [5, units, (W0, W1, H)]
        hw = words[..., 2]
        n = []
        for q, r in enumerate((0, 31, 2, 1)):
            rot = ((hw << r) | (hw >> (32 - r))) & 0xFFFFFFFF if r else hw
            n.append(((words[..., q // 2] >> 2 * (q % 2)) & 0x33333333) | (rot & 0x44444444))
        n = torch.stack(n, -1).reshape(5, d // 8)  # column g = 4u + q
        x = torch.stack([n & 0xFFFF, n >> 16], -1).reshape(5, -1)
        planes = torch.cat([(x >> (4 * j)) & 7 for j in range(P)], -1)
    else:
        planes = torch.cat([(by >> (p * bits)) & ((1 << bits) - 1) for p in range(P)], -1)
    perm = _plane_perm(TurboQuantizer(d, bits, seed=1))
    assert sorted(perm) == list(range(d))
    assert torch.equal(planes, codes[:, perm])
    assert _plane_perm(TurboQuantizer(d, bits, seed=1), enabled=False) == list(range(d))
    assert _planes(32, 2) == 1 and _planes(32, 3) == 1 and _planes(128, 8) == 1  # natural-order paths
    assert _planes(64, 2) == 4 and _planes(64, 2, key=True) == 1  # keys need 32-channel planes


# ---------------------------------------------------------------------------------------------- Gluon decode
def test_gluon_fragment_geometry_gives_each_lane_one_contiguous_run():
    # The Gluon kernel's column numbering: the columns a lane's mma.sync B fragments need (keys: k = column;
    # values: n = column) must be exactly the bytes its one vector load per token row brings in.
    from tqcache.kernels.decode_gluon import fragment_columns, sigma

    for W in (16, 32, 64):
        for key in (True, False):
            assert sorted(sigma(j, W, key) for j in range(W)) == list(range(W))
            run = W // 4 if key else W // 8
            for lane in range(32):
                first = (lane & 3) * run if key else (lane >> 2) * run
                assert sorted(sigma(j, W, key) for j in fragment_columns(lane, W, key)) == list(
                    range(first, first + run)), (W, key, lane)


@pytest.mark.parametrize("d", [128, 64])
def test_gluon_3bit_fragments_are_the_lanes_own_words(d):
    # 3 bits: the columns a lane's fragments need come from the groups whose bytes its word loads bring in, and
    # every (group, code) of those groups appears exactly once over the 4 planes. d = 128 — keys: groups
    # 4t .. 4t + 3 (words 3t .. 3t + 2), values: 2·gid, 2·gid + 1 (words (3·gid) // 2 and the next); d = 64 — keys:
    # 2t, 2t + 1 (words (3t) // 2, +1), values: gid (words (3·gid) // 4, +1).
    from tqcache.kernels.decode_gluon import fragment_columns, group3, kernel_order

    per_k, per_v = d // 32, d // 64  # groups per lane and row
    for lane in range(32):
        gid, t = lane >> 2, lane & 3
        for key, first in ((True, per_k * t), (False, per_v * gid)):
            cols = fragment_columns(lane, d // 4, key)
            got = sorted(8 * g + 2 * p + o for p in range(4) for g, o in (group3(j, key, d) for j in cols))
            n = per_k if key else per_v
            assert got == list(range(8 * first, 8 * (first + n))), (d, lane, key)
            # the groups' bytes lie inside the words the kernel loads for this lane
            w0 = (3 * t if per_k == 4 else 3 * t // 2) if key else (3 * gid // 2 if per_v == 2 else 3 * gid // 4)
            nw = 3 if (key and per_k == 4) else 2
            assert 4 * w0 <= 3 * first and 3 * (first + n) <= 4 * (w0 + nw), (d, lane, key)
    for key in (True, False):
        assert sorted(kernel_order(TurboQuantizer(d, 3), key)) == list(range(d))


@pytest.mark.parametrize("bits,split", [(3.5, "halves"), (3.5, "rotated"), (2.5, "outliers")])
def test_gluon_kernel_order_of_two_halves(bits, split):
    # Two segments: each half's own order, the second offset by 64, and A / U fold the whole order.
    from tqcache.kernels.attention import _matrices
    from tqcache.kernels.decode_gluon import _segment_order, kernel_order

    c = TurboQuantizer(128, bits, split=split, seed=2)
    (d0, b0), (d1, b1) = c.segments
    for key in (True, False):
        perm = kernel_order(c, key)
        assert perm == _segment_order(d0, b0, key) + [d0 + x for x in _segment_order(d1, b1, key)]
        assert sorted(perm) == list(range(128))
    A, U, *_ = _matrices(c, c, torch.device("cpu"), torch.float16, gluon=True)
    eye = torch.eye(128)
    torch.testing.assert_close(A, c.rotate_query(eye)[:, kernel_order(c, True)])
    torch.testing.assert_close(U, c.unrotate(eye)[kernel_order(c, False)])


@pytest.mark.parametrize("bits", [3.25, 2.25])
def test_gluon_quarter_bit_keys_run_in_containers_with_zero_extra_columns(bits):
    # 32 | 96 key channels run as 64 | 128: each container's order over its channels, the ones past the segment
    # -1, and A zero in those columns (so the masked, zero-filled code bytes there contribute nothing).
    from tqcache.kernels.attention import _matrices
    from tqcache.kernels.decode_gluon import _segment_order, kernel_order, key_containers

    c = TurboQuantizer(128, bits, split="outliers", seed=4)
    assert key_containers(c) == [(64, 32), (128, 96)]
    perm = kernel_order(c, True)
    (_, b0), (_, b1) = c.segments
    want = [x if x < 32 else -1 for x in _segment_order(64, b0, True)]
    want += [32 + x if x < 96 else -1 for x in _segment_order(128, b1, True)]
    assert perm == want and sorted(x for x in perm if x >= 0) == list(range(128))
    A, *_ = _matrices(c, TurboQuantizer(128, 3), torch.device("cpu"), torch.float16, gluon=True)
    p = torch.tensor(perm)
    assert A.shape == (128, 192) and bool((A[:, p < 0] == 0).all())
    torch.testing.assert_close(A[:, p >= 0], c.rotate_query(torch.eye(128))[:, p[p >= 0]])


@pytest.mark.parametrize("bits", [3.25, 2.25])
def test_gluon_quarter_bit_keys_at_256_run_as_three_segments(bits):
    # head_dim 256 as halves: 64 | 192 key channels run as 64 | 64 + 128, the wide segment's two pieces sharing its
    # table row (and norm); each piece starts on a 4-byte boundary of the row and orders its own channels.
    from tqcache.kernels.attention import _matrices
    from tqcache.kernels.decode_gluon import _segment_codes, _segment_order, kernel_order, kernel_segments, split_halves

    c, v = TurboQuantizer(256, bits, split="outliers", seed=4), TurboQuantizer(256, int(bits))
    (_, b0), (_, b1) = c.segments
    assert split_halves(c, v) and kernel_segments(c, True) == [(64, b0, 0), (64, b1, 1), (128, b1, 1)]
    perm = kernel_order(c, True, split=True)
    assert perm == _segment_order(64, b0, True) + [64 + x for x in _segment_order(64, b1, True)] + \
        [128 + x for x in _segment_order(128, b1, True)]
    codes = torch.zeros(1, 1, 4, (64 * b0 + 192 * b1) // 8, dtype=torch.uint8)
    starts = [off * (4 if t.dtype == torch.int32 else 1) for t, off in _segment_codes(codes, c, split=True)]
    assert starts == [0, 8 * b0, 8 * b0 + 8 * b1] and all(x % 4 == 0 for x in starts)
    A, *_ = _matrices(c, v, torch.device("cpu"), torch.float16, gluon=True)
    torch.testing.assert_close(A, c.rotate_query(torch.eye(256))[:, perm])


@pytest.mark.parametrize("d,bits", [(128, 4), (128, 2), (64, 4), (64, 2)])
def test_gluon_kernel_order_matches_the_bit_stream(d, bits):
    # Emulates what the kernel reads: plane p of column j is bits [p·b, (p+1)·b) of stored byte σ(j). That must
    # be the code of channel kernel_order[p·W + j], the order A (keys) and U (values) fold in.
    from tqcache.codec.packing import pack_bits
    from tqcache.kernels.attention import _matrices
    from tqcache.kernels.decode_gluon import kernel_order, sigma

    P, W = 8 // bits, d * bits // 8
    codes = torch.randint(0, 1 << bits, (7, d), generator=_gen(31))
    by = pack_bits(codes, bits).long()
    for key in (True, False):
        cols = by[:, [sigma(j, W, key) for j in range(W)]]
        planes = torch.cat([(cols >> (p * bits)) & ((1 << bits) - 1) for p in range(P)], -1)
        perm = kernel_order(TurboQuantizer(d, bits, seed=1), key)
        assert sorted(perm) == list(range(d))
        assert torch.equal(planes, codes[:, perm])
    kc, vc = TurboQuantizer(d, bits, seed=3), TurboQuantizer(d, bits, seed=4)
    A, U, *_ = _matrices(kc, vc, torch.device("cpu"), torch.float16, gluon=True)
    eye = torch.eye(d)
    torch.testing.assert_close(A, kc.rotate_query(eye)[:, kernel_order(kc, True)])
    torch.testing.assert_close(U, vc.unrotate(eye)[kernel_order(vc, False)])


def test_gluon_5bit_keys_read_the_lanes_own_words():
    # 5-bit keys: lane t's fragment columns are its 32 stored codes 32t .. 32t + 31, i.e. bits [160t, 160t + 160) of
    # the row: words 5t .. 5t + 4, which is what the kernel copies. kernel_order must name those channels.
    from tqcache.codec.packing import pack_bits
    from tqcache.kernels.decode_gluon import _segment_order, fragment_columns, kernel_order, sigma

    c = TurboQuantizer(128, 5)
    perm = kernel_order(c, key=True)
    assert sorted(perm) == list(range(128)) and perm == _segment_order(128, 8, True)
    codes = torch.randint(0, 32, (3, 128), generator=_gen(5))
    words = pack_bits(codes, 5).view(torch.int32).long() & 0xFFFFFFFF  # [3, 20]
    for lane in range(32):
        t = lane & 3
        run = sum(int(words[0, 5 * t + k]) << (32 * k) for k in range(5))  # the lane's 160 bits
        for j in fragment_columns(lane, 128, key=True):
            i = sigma(j, 128, True) - 32 * t
            assert 0 <= i < 32
            assert (run >> (5 * i)) & 31 == int(codes[0, perm[j]])


def test_gluon_head_dim_256_halves_order():
    # head_dim 256 with a side the d = 256 geometry lacks (3 bits, fractional bits): both sides run as two
    # 128-channel halves; a 256-channel segment's halves are its first and second 128 codes (same table, norm).
    from tqcache.kernels.attention import _matrices
    from tqcache.kernels.decode_gluon import _segment_order, kernel_order, kernel_segments, split_halves

    c3, c4, c2 = TurboQuantizer(256, 3, seed=1), TurboQuantizer(256, 4, seed=2), TurboQuantizer(256, 2, seed=3)
    assert split_halves(c3, c3) and split_halves(c4, c3) and not split_halves(c4, c2)
    c5 = TurboQuantizer(256, 5, seed=4)
    assert split_halves(c5, c2) and kernel_segments(c5, True) == [(128, 5, 0), (128, 5, 0)]
    half5 = _segment_order(128, 5, True)
    assert kernel_order(c5, True, True) == half5 + [128 + x for x in half5]
    assert kernel_segments(c3, True) == [(128, 3, 0), (128, 3, 0)] and kernel_segments(c3) == [(256, 3, 0)]
    for key in (True, False):
        half = _segment_order(128, 3, key)
        assert kernel_order(c3, key, True) == half + [128 + x for x in half]
        assert sorted(kernel_order(c4, key, True)) == list(range(256))
    A, U, *_ = _matrices(c4, c3, torch.device("cpu"), torch.float16, gluon=True)
    eye = torch.eye(256)
    torch.testing.assert_close(A, c4.rotate_query(eye)[:, kernel_order(c4, True, True)])
    torch.testing.assert_close(U, c3.unrotate(eye)[kernel_order(c3, False, True)])


def _ring_offsets(layout, shape) -> dict:
    """coordinate -> element offset of a SharedLinearLayout (its bases map offset bits to coordinates)."""
    out = {}
    for off in range(shape[0] * shape[1] * shape[2]):
        c = [0, 0, 0]
        for bit, basis in enumerate(layout.offset_bases):
            if off >> bit & 1:
                c = [x ^ y for x, y in zip(c, basis)]
        out[tuple(c)] = off
    return out


@pytest.mark.parametrize("key,inner,vec,esize", [(True, 4, 1, 4), (True, 8, 1, 4), (True, 16, 16, 1), (True, 8, 8, 1),
                                                  (False, 2, 1, 4), (False, 8, 8, 1), (False, 4, 4, 1)])
def test_gluon_lane_major_rings_have_no_bank_conflicts(key, inner, vec, esize):
    # Every cp.async and every read of a ring slot is one instruction per (register) element slot of the lanes: a
    # `vec`-element vector per lane. The 32 lanes' vectors must cover distinct 4-byte banks within each 128-byte
    # wavefront: 32·vec·esize bytes in the fewest wavefronts. (The row-major slot this replaced does not.)
    from tqcache.kernels.decode_gluon import _lane_major

    n, mid = 32, 4 if key else 8
    off = _ring_offsets(_lane_major(key, n, inner, vec), (n, mid, inner))
    assert sorted(off.values()) == list(range(n * mid * inner))  # a bijection onto the slot

    def lane_elems(lane):  # the tile coordinates a lane holds (the load layouts LK / LV of the kernel)
        if key:
            return [(r, lane & 3, k) for r in range(lane >> 2, n, 8) for k in range(inner)]
        return [(r, lane >> 2, k) for r in range(n) if (r >> 1) & 3 == lane & 3 for k in range(inner)]

    def wavefronts(offsets_of_lanes):
        lines = {}
        for vecs in offsets_of_lanes:  # bytes of one lane's vector, within one access
            for b in vecs:
                lines.setdefault((b // 4) % 32, set()).add(b // 4)
        return max(len(v) for v in lines.values())

    for slot in range(len(lane_elems(0)) // vec):
        acc = []
        for lane in range(32):
            e = lane_elems(lane)[slot * vec:(slot + 1) * vec]
            base = [off[c] * esize for c in e]
            assert base == list(range(base[0], base[0] + vec * esize, esize))  # the lane's vector is contiguous
            acc.append(range(base[0], base[0] + vec * esize))
        assert wavefronts(acc) == max(1, 32 * vec * esize // 128)
    rowmajor = {(r, m, k): (r * mid + m) * inner + k for r in range(n) for m in range(mid) for k in range(inner)}
    if esize == 4 and key:  # 3- and 5-bit keys: the old row-major slot put lanes 8 rows apart on one bank
        assert wavefronts([range(rowmajor[e] * 4, rowmajor[e] * 4 + 4) for e in
                           (lane_elems(lane)[0] for lane in range(32))]) > 1


def test_gluon_reason_names_what_it_does_not_cover():
    from tqcache.kernels.attention import choose_config
    from tqcache.kernels.decode_gluon import gluon_reason

    q = torch.randn(1, 8, 1, 128)
    k4, k3, k325 = TurboQuantizer(128, 4), TurboQuantizer(128, 3), TurboQuantizer(128, 3.25)
    assert "CUDA" in gluon_reason(q, k4, k4, 4, True)
    assert not choose_config(q, k4, k4, 2, 100).get("gluon")  # CPU: the Triton kernel's configuration
    if HAS_CUDA:
        qc = q.to(DEV, torch.bfloat16)
        assert gluon_reason(qc, k4.to(DEV), k4.to(DEV), 4, True) is None
        assert gluon_reason(qc, k3.to(DEV), k4.to(DEV), 4, True) is None
        assert gluon_reason(qc, TurboQuantizer(128, 3.5).to(DEV), k4.to(DEV), 4, True) is None  # two halves
        assert gluon_reason(qc, k325.to(DEV), k4.to(DEV), 4, True) is None  # quarter-bit keys: 32 | 96 channels
        assert "value segments" in gluon_reason(qc, k4.to(DEV), k325.to(DEV), 4, True)  # not on values
        assert gluon_reason(qc, k4.to(DEV), TurboQuantizer(128, 2.5).to(DEV), 4, True) is None  # 2-bit halves
        k3s, k2s = TurboQuantizer(64, 3).to(DEV), TurboQuantizer(64, 2).to(DEV)
        assert gluon_reason(qc[..., :64], k3s, k3s, 4, True) is None
        assert gluon_reason(qc[..., :64], k3s, k2s, 4, True) is None
        assert gluon_reason(qc, TurboQuantizer(128, 5).to(DEV), k3.to(DEV), 4, True) is None  # 5-bit keys
        assert "value segments" in gluon_reason(qc, k4.to(DEV), TurboQuantizer(128, 5).to(DEV), 4, True)
        k5s = TurboQuantizer(64, 5).to(DEV)
        assert "key segments" in gluon_reason(qc[..., :64], k5s, k3s, 4, True)  # 5 bits at d = 64: 2.5 words a lane
        q256 = torch.randn(1, 8, 1, 256, device=DEV, dtype=torch.bfloat16)
        k256, v256 = TurboQuantizer(256, 4).to(DEV), TurboQuantizer(256, 2).to(DEV)
        assert gluon_reason(q256, k256, v256, 4, True) is None  # head_dim 256: 2/4-bit sides, 16-token blocks
        assert gluon_reason(q256, TurboQuantizer(256, 3).to(DEV), v256, 4, True) is None  # 128-channel halves
        assert gluon_reason(q256, TurboQuantizer(256, 5).to(DEV), v256, 4, True) is None  # 5-bit keys: halves
        assert "at head_dim 256" in gluon_reason(q256, k256, TurboQuantizer(256, 5).to(DEV), 4, True)  # 5-bit values
        assert "halves" in gluon_reason(q256, TurboQuantizer(256, 8).to(DEV), TurboQuantizer(256, 3).to(DEV), 4, True)
        assert "head_dim 96" in gluon_reason(torch.randn(1, 8, 1, 96, device=DEV, dtype=torch.bfloat16),
                                             TurboQuantizer(96, 4).to(DEV), TurboQuantizer(96, 4).to(DEV), 4, True)
        assert "17 query rows" in gluon_reason(qc, k4.to(DEV), k4.to(DEV), 17, True)
        assert "float32" in gluon_reason(q.to(DEV), k4.to(DEV), k4.to(DEV), 4, True)
        assert "sign-symmetric" in gluon_reason(qc, k4.to(DEV), k4.to(DEV), 4, False)


GLUON_CASES = [
    # d, kbits, vbits, q dtype, B, Hkv, Hq, T, Lq, extra
    (128, 4, 4, torch.bfloat16, 2, 2, 8, 1000, 1, None),
    (128, 2, 2, torch.float16, 2, 2, 8, 517, 1, None),
    (128, 4, 2, torch.bfloat16, 2, 2, 8, 300, 4, "causal"),
    (64, 4, 4, torch.float16, 2, 2, 8, 130, 1, None),
    (64, 2, 4, torch.bfloat16, 2, 1, 8, 77, 2, "causal"),
    (128, 4, 4, torch.float16, 3, 2, 8, 200, 1, "ragged"),
    (128, 4, 4, torch.float16, 2, 1, 4, 260, 3, "window"),
    (128, 2, 4, torch.bfloat16, 1, 2, 16, 3000, 1, None),  # G = 8
    (128, 3, 3, torch.bfloat16, 2, 2, 8, 1000, 1, None),
    (128, 4, 3, torch.float16, 2, 2, 8, 517, 2, "causal"),
    (128, 3, 4, torch.bfloat16, 3, 2, 8, 200, 1, "ragged"),
    (128, 3, 2, torch.float16, 2, 1, 4, 260, 3, "window"),
    (128, 3, 3, torch.float16, 1, 2, 16, 3000, 1, None),  # G = 8
    (64, 3, 3, torch.bfloat16, 2, 2, 8, 700, 1, None),
    (64, 4, 3, torch.float16, 2, 2, 8, 333, 2, "causal"),
    (64, 3, 4, torch.bfloat16, 3, 2, 8, 200, 1, "ragged"),
    (64, 3, 3, torch.float16, 2, 1, 4, 260, 3, "window"),
    # two halves per side (channel-split fractional bits: two norms), and the rotated split (one shared norm)
    (128, 3.5, 3.5, torch.bfloat16, 2, 2, 8, 1000, 1, None),
    (128, 4, 3.5, torch.float16, 2, 2, 8, 517, 2, "causal"),
    (128, 3.5, 4, torch.bfloat16, 3, 2, 8, 200, 1, "ragged"),
    (128, 2.5, 3, torch.float16, 2, 1, 4, 260, 3, "window"),
    (128, 3.5, 3.5, torch.float16, 1, 2, 16, 3000, 1, "rotated"),  # G = 8
    # 2-bit values over 64 channels: the shared copy ring (lanes copy 4 bytes, read back 2 after a barrier)
    (64, 4, 2, torch.float16, 2, 2, 8, 333, 1, None),
    (64, 2, 2, torch.bfloat16, 2, 1, 4, 260, 3, "window"),
    (128, 2.5, 2.5, torch.bfloat16, 3, 2, 8, 1000, 2, "ragged"),
    # quarter-bit keys (32 | 96 channels) in 64 | 128-channel containers
    (128, 3.25, 3, torch.bfloat16, 2, 2, 8, 1000, 1, None),
    (128, 2.25, 2, torch.float16, 2, 1, 4, 260, 3, "window"),
    (128, 3.25, 3, torch.float16, 3, 2, 8, 200, 1, "ragged"),
    # 8-bit keys: centroids gathered from the 256-entry fp16 table
    (128, 8, 4, torch.bfloat16, 2, 2, 8, 1000, 1, None),
    (64, 8, 3, torch.float16, 2, 1, 4, 260, 3, "window"),
    # QJL keys (d = 128, kbits counts the sign bit): the sign sketch as one more ±1 key plane
    (128, 4, 4, torch.bfloat16, 2, 2, 8, 1000, 1, "qjl"),
    (128, 3, 3, torch.float16, 2, 2, 8, 517, 2, "qjl-causal"),
    (128, 3.5, 4, torch.bfloat16, 3, 2, 8, 200, 1, "qjl-ragged"),
    (128, 4, 2, torch.float16, 2, 1, 4, 260, 3, "qjl-window"),
    (128, 6, 3, torch.bfloat16, 2, 2, 8, 1000, 1, "qjl"),
    (128, 9, 4, torch.float16, 2, 2, 8, 300, 1, "qjl"),
    # ... at head_dim 64: one sign plane of 64 columns
    (64, 4, 4, torch.float16, 2, 2, 8, 700, 1, "qjl"),
    (64, 3, 3, torch.bfloat16, 2, 1, 4, 260, 3, "qjl-window"),
    (64, 5, 4, torch.float16, 3, 2, 6, 200, 1, "qjl-ragged"),  # G = 3 (SmolLM2's 9 / 3 heads)
    # ... at head_dim 256 (both sides as 128-channel halves): two sign planes
    (256, 4, 3, torch.bfloat16, 2, 2, 8, 1000, 1, "qjl"),
    (256, 3, 3, torch.float16, 2, 2, 8, 517, 2, "qjl-causal"),
    (256, 6, 4, torch.bfloat16, 3, 2, 8, 200, 1, "qjl-ragged"),
    (256, 4, 2, torch.float16, 2, 1, 4, 260, 3, "qjl-window"),
    # quarter-bit keys at head_dim 256: 64 | 64 + 128 channels (three key segments), values as halves
    (256, 3.25, 3, torch.bfloat16, 2, 2, 8, 1000, 1, None),
    (256, 2.25, 2, torch.float16, 2, 1, 4, 260, 3, "window"),
    (256, 3.25, 3, torch.float16, 3, 2, 8, 200, 1, "ragged"),
    (256, 2.25, 2, torch.bfloat16, 2, 2, 8, 517, 2, "causal"),
    # 5-bit keys (d = 128): centroids shuffled (shfl.sync.idx) from the lane holding that table entry
    (128, 5, 3, torch.bfloat16, 2, 2, 8, 1000, 1, None),
    (128, 5, 4, torch.float16, 2, 2, 8, 517, 2, "causal"),
    (128, 5, 2, torch.bfloat16, 3, 2, 8, 200, 1, "ragged"),
    (128, 5, 3, torch.float16, 2, 1, 4, 260, 3, "window"),
    (128, 5, 3.5, torch.float16, 1, 2, 16, 3000, 1, None),  # G = 8
    # head_dim 256 (Gemma): 2/4-bit sides and 8-bit keys, 16-token blocks
    (256, 4, 4, torch.bfloat16, 2, 2, 8, 1000, 1, None),
    (256, 2, 2, torch.float16, 2, 1, 4, 517, 2, "causal"),
    (256, 4, 2, torch.bfloat16, 3, 2, 8, 200, 1, "ragged"),
    (256, 8, 4, torch.float16, 2, 1, 4, 260, 3, "window"),
    (256, 4, 4, torch.float16, 1, 1, 4, 3000, 1, None),  # Gemma-3-270M's 4 / 1 heads
    # head_dim 256 as two 128-channel halves (a 3-bit side, or fractional bits): the d = 128 geometry per half
    (256, 3, 3, torch.bfloat16, 2, 2, 8, 1000, 1, None),
    (256, 4, 3, torch.float16, 2, 1, 4, 517, 2, "causal"),
    (256, 3.5, 3.5, torch.bfloat16, 3, 2, 8, 200, 1, "ragged"),
    (256, 3, 2, torch.float16, 2, 1, 4, 260, 3, "window"),
    (256, 3.5, 3, torch.float16, 1, 1, 4, 3000, 1, "rotated"),
    # 5-bit keys at head_dim 256 (k5v3 on Gemma): two 128-channel halves of 20 words, one shuffled table
    (256, 5, 3, torch.bfloat16, 2, 2, 8, 1000, 1, None),
    (256, 5, 4, torch.float16, 1, 1, 4, 517, 2, "causal"),
    (256, 5, 2, torch.bfloat16, 3, 2, 8, 200, 1, "ragged"),
]


def _gluon_case(d, kb, vb, dt, B, Hkv, Hq, T, Lq, extra, seed=0):
    """A GLUON_CASES row as inputs: ``(kc, vc, kp, vp, q, kw)``, kw the structured mask arguments of ``extra``."""
    qjl = extra is not None and extra.startswith("qjl")
    if qjl:
        extra = extra[4:] or None
    kc, vc, kp, vp = _make(d, kb, vb, kqjl=qjl, B=B, Hkv=Hkv, T=T, seed=hash((d, kb, vb, T, seed)) % 1000,
                           split="rotated" if extra == "rotated" else "halves")
    q = (torch.randn(B, Hq, Lq, d, generator=_gen(17 + seed)) * 2).to(DEV, dt)
    kw = {}
    if extra == "causal":
        kw = dict(q_pos=torch.tensor([T - Lq, T // 2][:B], device=DEV))
    elif extra == "ragged":
        kw = dict(kv_start=torch.tensor([5, 40, 0], device=DEV), kv_end=torch.tensor([190, 40, 200], device=DEV))
    elif extra == "window":
        kw = dict(q_pos=torch.tensor([T - Lq, 100], device=DEV), window=70)
    return kc, vc, kp, vp, q, kw


@pytest.mark.skipif(not HAS_CUDA, reason="Gluon kernels compile for CUDA only (no interpreter)")
@pytest.mark.parametrize("d,kb,vb,dt,B,Hkv,Hq,T,Lq,extra", GLUON_CASES)
def test_gluon_decode_matches_reference(d, kb, vb, dt, B, Hkv, Hq, T, Lq, extra):
    from tqcache.kernels import attention as att

    kc, vc, kp, vp, q, kw = _gluon_case(d, kb, vb, dt, B, Hkv, Hq, T, Lq, extra)
    assert att._gluon_module().gluon_reason(q, kc, vc, Lq * Hq // Hkv, True) is None
    assert att.choose_config(q, kc, vc, Hkv, T).get("gluon"), "the default configuration must pick the Gluon kernel"
    out, lse = _check(q, kc, kp, vc, vp, **kw)
    # Same answer as the Triton kernel (different operand order and tiles: fp16-level agreement).
    o2, l2 = attend_packed_triton(q, kc, kp, vc, vp, scale=d**-0.5, config=dict(
        att.launch_config(B, Hkv, Lq * Hq // Hkv, T, d, DEV, k_codec=kc, v_codec=vc), gluon=False), **kw)
    torch.testing.assert_close(out, o2, rtol=2e-2, atol=2e-2 * out.abs().max().item())


PDL_CASES = [c for c in GLUON_CASES if c[:3] in {(128, 4, 4), (128, 3, 3), (128, 3.5, 3), (64, 2, 3), (256, 4, 4)}]


@pytest.mark.skipif(not HAS_CUDA or torch.cuda.get_device_capability() < (9, 0),
                    reason="programmatic dependent launch needs a Hopper (or later) GPU")
@pytest.mark.parametrize("d,kb,vb,dt,B,Hkv,Hq,T,Lq,extra", PDL_CASES)
def test_gluon_step_chained_by_pdl_matches_plain_launches(d, kb, vb, dt, B, Hkv, Hq, T, Lq, extra, monkeypatch):
    # PDL changes when the three kernels start, not what they compute: with the same merge (one program per row;
    # merge_chunks picks it under PDL) the same bits as plain launches, eager and replayed from a CUDA graph (which
    # keeps the programmatic edges), and the reference's answer.
    from tqcache.kernels import attention as att

    monkeypatch.setattr(att, "MERGE_NC", 1)
    kc, vc, kp, vp, q, kw = _gluon_case(d, kb, vb, dt, B, Hkv, Hq, T, Lq, extra, seed=1)
    cfg = att.choose_config(q, kc, vc, Hkv, T)
    assert cfg.get("gluon")
    plain = attend_packed_triton(q, kc, kp, vc, vp, scale=d**-0.5, config=dict(cfg, PDL=False), **kw)
    chained = attend_packed_triton(q, kc, kp, vc, vp, scale=d**-0.5, config=dict(cfg, PDL=True), **kw)
    assert att.LAUNCH_CONFIGS[f"attend B={B} Hq={Hq} Hkv={Hkv} Lq={Lq} d={d} {str(dt)[6:]} T={T}"]["PDL"]
    for a, b in zip(plain, chained):
        assert torch.equal(a, b)
    outs = []
    graph = torch.cuda.CUDAGraph()
    attend_packed_triton(q, kc, kp, vc, vp, scale=d**-0.5, config=dict(cfg, PDL=True), **kw)  # (plans made)
    with torch.cuda.graph(graph):
        outs.append(attend_packed_triton(q, kc, kp, vc, vp, scale=d**-0.5, config=dict(cfg, PDL=True), **kw))
    for t in outs[0]:
        t.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(plain, outs[0]):
        assert torch.equal(a, b)
    _check(q, kc, kp, vc, vp, **kw)


def test_gluon_config_chains_launches_only_on_full_grids(monkeypatch):
    # The rule, on a pretend H100 (132 SMs, PDL available): programmatic dependent launch where the grid has
    # >= 12 programs on every SM, the plain launch rules elsewhere (smaller grids lost up to 17 % under PDL).
    from tqcache.kernels import attention as att

    monkeypatch.setattr(att, "pdl_ok", lambda device: True)
    monkeypatch.setattr(att, "_num_sms", lambda device: 132)
    cpu = torch.device("cpu")
    c = att.gluon_config(1, 8, 65536, cpu)
    assert (c["SPLITS"], c["PDL"]) == (198, True)  # one wave of 12 per SM
    c = att.gluon_config(1, 8, 32768, cpu)
    assert (c["SPLITS"], c["PDL"]) == (198, True)  # the full wave replaces 8 per SM (132 splits)
    c = att.gluon_config(1, 8, 16384, cpu)
    assert (c["SPLITS"], c["PDL"]) == (128, False)  # >= 4 blocks per split caps it at 128: not full
    c = att.gluon_config(8, 8, 131072, cpu)
    assert (c["SPLITS"], c["PDL"]) == (49, True)  # two waves
    c = att.gluon_config(1, 8, 65536, cpu, d=256)
    assert not c["PDL"]  # measured at head_dim 128 only
    monkeypatch.setattr(att, "pdl_ok", lambda device: False)
    c = att.gluon_config(1, 8, 32768, cpu)
    assert (c["SPLITS"], c["PDL"]) == (132, False)  # without PDL: 8 per SM up to 32K


def test_kernel_segments_split_widths_that_are_two_powers_of_two():
    from tqcache.kernels.attention import _kernel_segments, unsupported_reason

    # d = 128 at 3.25 bits: 32 channels at 4 bits, 96 at 3 -> 32 | 64 + 32; bytes 16 and 24 + 12; norms 0 | 1, 1.
    segs = _kernel_segments(TurboQuantizer(128, 3.25), key=True)
    assert [(w, b, off, row, col, ch) for w, b, _, off, row, col, ch in segs] == [
        (32, 4, 0, 0, 0, 0), (64, 3, 16, 1, 1, 32), (32, 3, 40, 1, 1, 96)]
    assert [P for _, _, P, *_ in segs] == [1, 1, 1]  # keys need 32-channel planes
    assert [P for _, _, P, *_ in _kernel_segments(TurboQuantizer(128, 3.25))] == [2, 4, 1]  # values 16
    rot = _kernel_segments(TurboQuantizer(128, 3.25, split="rotated"))
    assert [col for *_, col, _ in rot] == [0, 0, 0]  # one shared norm
    odd = TurboQuantizer(128, 3.125)  # 16 at 4 bits + 112 at 3: 112 = 64 + 48 does not fit
    assert _kernel_segments(odd) is None
    q = torch.randn(1, 2, 1, 128)
    assert "112" in unsupported_reason(q, odd, odd)
    # Keys need 32-channel segments (16-channel key products are wrong on the H100): d = 64 at 3.25 bits has 16.
    small = TurboQuantizer(64, 3.25)
    assert _kernel_segments(small) is not None and _kernel_segments(small, key=True) is None
    assert "key segments" in unsupported_reason(torch.randn(1, 2, 1, 64), small, small)


@pytest.mark.parametrize("d,kb,vb", [(128, 4, 2), (128, 2, 4), (128, 3.5, 2.5), (64, 2.5, 4), (128, 3, 3), (64, 4, 3)])
def test_plane_layout_matches_natural_layout(d, kb, vb):
    # The bit-plane path (permuted A/U, one dot per plane) against the tl.join path on the same inputs.
    from tqcache.kernels.attention import launch_config

    kc, vc, kp, vp = _make(d, kb, vb, T=130, seed=12)
    q = torch.randn(2, 4, 1, d, generator=_gen(12)).to(DEV)
    cfg = launch_config(2, 2, 2, 130, d, DEV)
    o1, l1 = attend_packed_triton(q, kc, kp, vc, vp, scale=d**-0.5, config=dict(cfg, planes=True))
    o0, l0 = attend_packed_triton(q, kc, kp, vc, vp, scale=d**-0.5, config=dict(cfg, planes=False))
    torch.testing.assert_close(o1, o0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    _check(q, kc, kp, vc, vp)


def test_per_head_key_scales_fold_into_a_per_head_query_map():
    # Per-head key scales become A [Hkv, d, d'] (the query map is applied in torch); per-head value scales
    # would need a per-head U in the merge kernel, so they stay on the torch path.
    from tqcache.kernels.attention import unsupported_reason

    g = _gen(31)
    kc = TurboQuantizer(64, 4, seed=1, channel_scale=True, heads=2)
    vc = TurboQuantizer(64, 3, seed=2)
    k = torch.randn(2, 2, 40, 64, generator=g) * torch.exp(torch.randn(2, 1, 64, generator=g))
    kc.calibrate(k, torch.rand(2, 1, 64, generator=g) + 0.1)
    kc, vc = kc.to(DEV), vc.to(DEV)
    kp, vp = kc.quantize(k.to(DEV)), vc.quantize(torch.randn(2, 2, 40, 64, generator=g).to(DEV))
    q = torch.randn(2, 4, 1, 64, generator=g).to(DEV)
    assert unsupported_reason(q, kc, vc, kp) is None
    _check(q, kc, kp, vc, vp)
    vc_heads = TurboQuantizer(64, 4, seed=1, channel_scale=True, heads=2)
    assert "per-head" in unsupported_reason(q, kc, vc_heads, kp)
    assert unsupported_reason(q, TurboQuantizer(64, 4, seed=1, channel_scale=True), vc) is None


def test_cache_buffer_views():
    # Fields as views into larger capacity buffers (strided over T), as a cache hands them over.
    kc, vc, kp, vp = _make(64, 4, 3, T=50, seed=10)
    big = lambda p: p.map(lambda t: torch.cat([t, t[:, :, :14]], 2)[:, :, :50])  # noqa: E731
    q = torch.randn(2, 4, 1, 64, generator=_gen(9)).to(DEV)
    _check(q, kc, big(kp), vc, big(vp))


def test_launcher_rejects_bad_input():
    kc, vc, kp, vp = _make(64, 4, 4, T=10)
    q = torch.randn(2, 4, 1, 64).to(DEV)
    with pytest.raises(ValueError, match="structured"):
        attend_packed_triton(q, kc, kp, vc, vp, scale=1.0, mask=torch.ones(2, 1, 1, 10, dtype=torch.bool))
    with pytest.raises(ValueError, match="multiple"):
        attend_packed_triton(torch.randn(2, 3, 1, 64).to(DEV), kc, kp, vc, vp, scale=1.0)
    vq = TurboQuantizer(64, 4, qjl=True).to(DEV)
    with pytest.raises(ValueError, match="QJL on values"):
        attend_packed_triton(q, kc, kp, vq, vq.quantize(torch.randn(2, 2, 10, 64).to(DEV)), scale=1.0)


# ---------------------------------------------------------------------------------------------- dispatch
def test_dispatch_runs_kernel_after_probe_and_falls_back():
    kc, vc, kp, vp = _make(64, 4, 3, T=37, seed=11)
    q = torch.randn(2, 4, 1, 64, generator=_gen(10)).to(DEV)
    out, lse = K.attend(q, kc, kp, vc, vp, scale=0.125)
    ref, rlse = attend_packed(q, kc, kp, vc, vp, scale=0.125)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    inf = K.info()
    assert inf["kernels_available"] is True
    assert any(v["passed"] for v in inf["probes"].values()), inf["probes"]
    assert inf["launch_configs"], "launch configuration per shape is recorded"
    # Value QJL and explicit masks take the torch reference (and the reason is recorded).
    vq = TurboQuantizer(64, 4, qjl=True).to(DEV)
    vqp = vq.quantize(torch.randn(2, 2, 37, 64).to(DEV))
    out2, _ = K.attend(q, kc, kp, vq, vqp, scale=0.125)
    torch.testing.assert_close(out2, attend_packed(q, kc, kp, vq, vqp, scale=0.125)[0])
    m = torch.ones(2, 1, 1, 37, dtype=torch.bool, device=DEV)
    K.attend(q, kc, kp, vc, vp, scale=0.125, mask=m)
    reasons = " ".join(K.info()["fallbacks"])
    assert "QJL on values" in reasons and "mask" in reasons


def test_cpu_without_interpreter_uses_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not K.available("cpu")
    kc, vc = TurboQuantizer(64, 4), TurboQuantizer(64, 4)
    x = torch.randn(1, 1, 5, 64)
    q = torch.randn(1, 2, 1, 64)
    out, _ = K.attend(q, kc, kc.quantize(x), vc, vc.quantize(x), scale=0.1)
    torch.testing.assert_close(out, attend_packed(q, kc, kc.quantize(x), vc, vc.quantize(x), scale=0.1)[0])


# ---------------------------------------------------------------------------------------------- encode
def _boundary_distance(codec, x):
    """Per coordinate, the distance of the rotated value to the nearest decision boundary (float64)."""
    xw = codec._to_working(x).double()
    out, off = [], 0
    for s, (d_s, _) in enumerate(codec.segments):
        rot, _, bounds = codec._seg(s)
        xs = xw[..., off : off + d_s]
        off += d_s
        y = (xs @ rot.double().T) / xs.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        out.append((y[..., None] - bounds.double()).abs().amin(-1))
    return out


ENC_CASES = [
    # d, bits, qjl, dtype, rotation, split, channel_scale, N
    (64, 4, False, torch.float32, "hadamard", "halves", False, 37),
    (64, 3, False, torch.bfloat16, "hadamard", "halves", False, 37),
    (64, 2, False, torch.float16, "hadamard", "halves", False, 1),
    (128, 8, False, torch.float32, "hadamard", "halves", False, 20),
    (128, 3.5, False, torch.bfloat16, "hadamard", "halves", False, 37),
    (128, 2.5, False, torch.float32, "hadamard", "outliers", True, 37),
    (64, 4, True, torch.float32, "hadamard", "halves", False, 37),
    (128, 3, True, torch.float16, "hadamard", "halves", False, 20),
    (64, 3.5, False, torch.float32, "haar", "halves", False, 37),
    (256, 4, False, torch.bfloat16, "hadamard", "halves", False, 9),
    (256, 3, True, torch.float32, "hadamard", "halves", False, 9),
    # per-KV-head channel scales (the presets' keys), one and two segments
    (128, 4, False, torch.bfloat16, "hadamard", "halves", "heads", 70),
    (128, 3.5, False, torch.float16, "hadamard", "outliers", "heads", 37),
    # 5-bit keys (k5v3), and 5 bits at d = 64
    (128, 5, False, torch.bfloat16, "hadamard", "halves", "heads", 37),
    (64, 5, False, torch.float32, "hadamard", "halves", False, 20),
    (256, 5, False, torch.bfloat16, "hadamard", "halves", "heads", 9),
    # d = 256: the butterfly on one [128, 128] block (Hadamard, one segment), with scales and input pieces; a Haar
    # rotation streams [256, 64] chunks
    (256, 3, False, torch.float16, "hadamard", "halves", "heads", 9),
    (256, 2, False, torch.float32, "haar", "halves", False, 9),
]


# exact=None: the device's default (bit-exact arithmetic in the interpreter, the fast path on a GPU);
# exact=False on the CPU runs the GPU's arithmetic (summed level steps, norms from the rotated row, fp16
# packing operands) in the interpreter, judged by the same tie rules as the GPU.
ENC_EXACT = [None] if DEV == "cuda" else [None, False]


@pytest.mark.parametrize("exact", ENC_EXACT)
@pytest.mark.parametrize("d,bits,qjl,dt,rot,split,cs,N", ENC_CASES)
def test_encode_matches_codec(d, bits, qjl, dt, rot, split, cs, N, exact):
    c = TurboQuantizer(d, bits, qjl=qjl, rotation=rot, split=split, channel_scale=bool(cs), seed=3,
                       heads=3 if cs == "heads" else None).to(DEV)
    g = _gen(int(bits * 10) + d)
    x = (torch.randn(2, 3, N, d, generator=g) * (0.5 + 3 * torch.rand(d, generator=g))).to(DEV, dt)
    c.calibrate(x)
    ref = c.quantize(x)
    start, cap = 5, N + 9
    # Poisoned buffers (0xAB bytes) of capacity N + 9; the kernel writes slots [start, start + N).
    fields = {n: torch.full((2, 3, cap, w * t.itemsize), 0xAB, dtype=torch.uint8, device=DEV).view(t)
              for n, (w, t) in c.field_widths().items()}
    poison = {n: f.clone() for n, f in fields.items()}
    encode_into(c, x, fields, start, exact=exact)
    for n, f in fields.items():
        assert torch.equal(f[:, :, :start].view(torch.uint8), poison[n][:, :, :start].view(torch.uint8)), f"{n} wrote below start"
        assert torch.equal(f[:, :, start + N :].view(torch.uint8), poison[n][:, :, start + N :].view(torch.uint8)), f"{n} wrote past the end"
    got = {n: f[:, :, start : start + N] for n, f in fields.items()}
    if torch.equal(got["codes"], ref["codes"]) and all(torch.equal(got[n], ref[n]) for n in ref.fields):
        return
    # Not bit-identical: every differing code must sit within 1e-5 of a decision boundary.
    from tqcache.codec import code_order
    from tqcache.codec.packing import unpack_codes

    dist = _boundary_distance(c, x)
    byte, ties = 0, 0
    tie_rows = torch.zeros(got["codes"].shape[:-1], dtype=torch.bool, device=DEV)
    for s, (d_s, b_s) in enumerate(c.segments):
        w = d_s * b_s // 8
        # as sorted level indices (codes are sign-magnitude: a tie at 0 is codes 0 and L/2, levels L/2 − 1 and L/2)
        a = code_order(unpack_codes(got["codes"][..., byte : byte + w], b_s, d_s), b_s)
        r = code_order(unpack_codes(ref["codes"][..., byte : byte + w], b_s, d_s), b_s)
        byte += w
        diff = a != r
        assert torch.all(dist[s][diff] < 1e-5), f"segment {s}: codes differ away from a boundary"
        assert (a - r).abs().max() <= 1
        ties += int(diff.sum())
        tie_rows |= diff.any(-1)
    # Norms may differ only on rows with a tie (their centroid norm changed) or by one fp16 ulp.
    dn = (got["norms"].float() - ref["norms"].float()).abs()
    ulp = ref["norms"].float().abs() * 2.0**-10 + 1e-7
    assert torch.all((dn <= ulp) | tie_rows[..., None])
    if qjl:
        nd = (got["qjl_signs"] != ref["qjl_signs"]).sum().item()
        assert nd <= max(2, 0.002 * got["qjl_signs"].numel() * 8) + 8 * int(tie_rows.sum()), f"{nd} QJL sign bytes differ"
    print(f"encode {d}/{bits}/{dt}: {ties} boundary ties of {x.numel()} coordinates")


@pytest.mark.parametrize("bits", [3, 4, 2, 5])
def test_encode_word_and_byte_stores_agree(bits):
    """Codes leave as whole 32-bit words when rows are 4-byte aligned; a caller's misaligned view (rows 1 byte
    into a wider buffer) takes byte stores. Both must write the same codes, and nothing outside the view."""
    c = TurboQuantizer(128, bits, seed=9).to(DEV)
    g = _gen(400 + bits)
    x = torch.randn(1, 2, 19, 128, generator=g).to(DEV, torch.bfloat16)
    w = c.field_widths()["codes"][0]
    aligned = {n: torch.zeros(1, 2, 20, wd, dtype=t, device=DEV) for n, (wd, t) in c.field_widths().items()}
    wide = torch.randint(0, 256, (1, 2, 20, w + 3), generator=g, dtype=torch.uint8).to(DEV)
    before = wide.clone()
    shifted = dict(aligned, codes=wide[..., 1 : w + 1])
    assert shifted["codes"].data_ptr() % 4 == 1
    encode_into(c, x, aligned, 1)
    encode_into(c, x, shifted, 1)
    assert torch.equal(shifted["codes"][:, :, 1:20], aligned["codes"][:, :, 1:20])
    assert torch.equal(shifted["codes"][:, :, 1:20], c.quantize(x)["codes"])
    outside = torch.ones_like(wide, dtype=torch.bool)
    outside[:, :, 1:20, 1 : w + 1] = False
    assert torch.equal(wide[outside], before[outside]), "byte stores wrote outside the view"


def test_bf16_working_space():
    """Channel-scaled codecs of ≤ 5 bits cut their segments from x·(1/s) rounded to bf16 (the encode kernel's
    one exact tensor-core piece); 8-bit ones keep fp32. Inner products stay those of x: ⟨q·s, x/s⟩."""
    g = _gen(21)
    x = torch.randn(2, 40, 64, generator=g) * (0.5 + 3 * torch.rand(64, generator=g))
    for bits, rounded in ((4, True), (5, True), (3.5, True), (8, False)):
        c = TurboQuantizer(64, bits, channel_scale=True, seed=1)
        c.calibrate(x)
        assert c.bf16_working is rounded
        xw = c._to_working(x)
        exact = (x * (1.0 / c.channel_scale))[..., c.perm]
        if rounded:
            assert torch.equal(xw, exact.to(torch.bfloat16).float())
            assert not torch.equal(xw, exact)
        else:
            assert torch.equal(xw, exact)
    assert not TurboQuantizer(64, 4).bf16_working


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_encode_grid_level_search(bits, monkeypatch):
    """The estimate-and-correct level search (one quadratic, one comparison, two table reads) at every width it
    covers — the GPU takes it from 4 bits, the comparison chain below — must write the codec's codes; zero rows
    (every coordinate a tie at 0) must take the lower middle level, as torch does."""
    import importlib

    enc = importlib.import_module("tqcache.kernels.encode")
    monkeypatch.setattr(enc, "GRID_MIN_BITS", 1)
    enc._ENC_CACHE.clear()
    try:
        c = TurboQuantizer(128, bits, seed=13).to(DEV)
        assert enc._enc_matrices(c, DEV)[-2].get("G0") is not None
        g = _gen(500 + bits)
        x = (torch.randn(1, 2, 33, 128, generator=g) * (0.5 + 3 * torch.rand(128, generator=g))).to(DEV)
        x[0, 1, 7] = 0
        fields = {n: torch.zeros(1, 2, 33, w, dtype=t, device=DEV) for n, (w, t) in c.field_widths().items()}
        encode_into(c, x, fields, 0, exact=False)
        ref = c.quantize(x)
        from tqcache.codec.packing import unpack_codes

        diff = unpack_codes(fields["codes"], bits, 128) != unpack_codes(ref["codes"], bits, 128)
        assert int(diff.sum()) <= 2, f"{int(diff.sum())} codes differ"
        assert torch.equal(fields["codes"][0, 1, 7], ref["codes"][0, 1, 7])
        dn = (fields["norms"].float() - ref["norms"].float()).abs()
        assert torch.all(dn <= ref["norms"].float() * 2.0**-10 + 1e-7)
    finally:
        enc._ENC_CACHE.clear()


@pytest.mark.parametrize("width", [32, 64, 128])
def test_thread_order_gives_each_quad_lane_consecutive_coordinates(width):
    """With the rotation's columns in thread order, lane t of a quad — which the tensor-core accumulator gives
    columns 8g + 2t + {0, 1} of every 8-column tile — computes coordinates [t·w/4, (t+1)·w/4): whole words of
    2- and 4-bit codes (and whole 3-bit units at w = 128), packed without leaving the thread."""
    from tqcache.kernels.encode import thread_order

    order = thread_order(width)
    assert sorted(order.tolist()) == list(range(width))
    for t in range(4):
        cols = [8 * g + 2 * t + e for g in range(width // 8) for e in (0, 1)]
        assert order[cols].tolist() == list(range(t * width // 4, (t + 1) * width // 4))


def test_grid_map_covers_the_codebooks_and_declines_what_it_cannot_fit():
    """Every Lloyd–Max codebook of 2–5 bits from d = 16 to 256 gets a map whose estimate is #{pb < a} or one more
    for every a (checked here independently of the finder's own check, in float64 around each bound); bounds
    that no increasing quadratic can separate — a tight pair beside a wide gap — get None (the chain)."""
    import numpy as np

    from tqcache.kernels.encode import grid_map

    for d in (16, 32, 64, 128, 256):
        for bits in (2, 3, 4, 5):
            c = TurboQuantizer(d, bits, seed=1)
            bounds = c._seg(0)[2].double()
            pb = bounds[1 << (bits - 1) :].numpy()
            got = grid_map(tuple(pb.tolist()))
            assert got is not None, (d, bits)
            c1, c2, ga = got
            a = np.concatenate([np.linspace(0, 1.5, 30001), pb * (1 - 1e-6), pb * (1 + 1e-6)])
            am = np.minimum(a, ga)
            m0 = np.floor(am * (c1 + c2 * am) + 0.5)
            m = np.searchsorted(pb, a, side="left")
            assert np.all((m0 == m) | (m0 == m + 1)), (d, bits)
    assert grid_map((0.1, 0.101, 0.9)) is None
    assert grid_map(()) is None


@pytest.mark.parametrize("exact", ENC_EXACT)
def test_encode_general_codebook(exact):
    """A codebook that is not symmetric about 0 (e.g. loaded from elsewhere) takes the binary-search path;
    changing it in place after a first encode must not reuse the old constants."""
    c = TurboQuantizer(64, 3, seed=5).to(DEV)
    g = _gen(77)
    x = torch.randn(1, 2, 21, 64, generator=g).to(DEV)
    fields = {n: torch.zeros(1, 2, 24, w, dtype=t, device=DEV) for n, (w, t) in c.field_widths().items()}
    encode_into(c, x, fields, 1, exact=exact)  # symmetric constants cached first
    with torch.no_grad():
        c.levels0 += 0.011 * torch.rand(c.levels0.shape, generator=g).to(DEV)
        c.levels0.copy_(c.levels0.sort().values)
        c.bounds0.copy_(0.5 * (c.levels0[1:] + c.levels0[:-1]))
    ref = c.quantize(x)
    encode_into(c, x, fields, 1, exact=exact)
    got = fields["codes"][:, :, 1:22]
    from tqcache.codec.packing import unpack_codes

    diff = unpack_codes(got, 3, 64) != unpack_codes(ref["codes"], 3, 64)
    assert int(diff.sum()) <= 2, f"{int(diff.sum())} codes differ from the torch codec"
    dn = (fields["norms"][:, :, 1:22].float() - ref["norms"].float()).abs()
    assert torch.all(dn <= ref["norms"].float() * 2.0**-10 + 1e-7)


def test_encode_dispatch_matches_codec():
    c = TurboQuantizer(64, 3).to(DEV)
    x = torch.randn(1, 2, 11, 64).to(DEV)
    fields = {n: torch.zeros(1, 2, 16, w, dtype=t, device=DEV) for n, (w, t) in c.field_widths().items()}
    K.encode(c, x, fields, 2)
    ref = c.quantize(x)
    for n in ref.fields:
        assert torch.equal(fields[n][:, :, 2:13], ref[n])


def test_encode_rejects_bad_fields():
    c = TurboQuantizer(64, 4).to(DEV)
    x = torch.randn(1, 2, 8, 64).to(DEV)
    small = {n: torch.zeros(1, 2, 8, w, dtype=t, device=DEV) for n, (w, t) in c.field_widths().items()}
    with pytest.raises(ValueError, match="capacity"):
        encode_into(c, x, small, 4)
    with pytest.raises(ValueError, match="codes"):
        encode_into(c, x, {"codes": torch.zeros(1, 2, 8, 3, dtype=torch.uint8, device=DEV)}, 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


# ---------------------------------------------------------------------------------------------- window kernel
@pytest.mark.parametrize("d,G,n_sink,n_win,compressed,dt", [
    (128, 4, 4, 130, True, torch.float32),
    (64, 1, 0, 1, False, torch.float32),
    (256, 8, 2, 33, True, torch.bfloat16),
    (128, 4, 0, 70, True, torch.float16),
    (64, 3, 4, 17, True, torch.bfloat16),  # G not a power of two
])
def test_window_kernel_matches_its_torch_twin(d, G, n_sink, n_win, compressed, dt):
    # One-token decode: sinks + fp window attention merged with the compressed partial, as the layer output.
    from tqcache.kernels.window import attend_window_triton

    g = _gen(hash((d, G, n_win)) % 1000)
    B, Hkv = 2, 2
    q = torch.randn(B, Hkv * G, 1, d, generator=g).to(DEV, dt)

    def kv(n):  # windows are views into a longer buffer (strided rows), as the cache keeps them
        buf = torch.randn(B, Hkv, n + 9, d, generator=g).to(DEV, dt)
        return buf[:, :, 3 : 3 + n]

    parts = ([(kv(n_sink), kv(n_sink))] if n_sink else []) + [(kv(n_win), kv(n_win))]
    oc = lc = None
    if compressed:
        oc = torch.randn(B, Hkv * G, 1, d, generator=g).to(DEV)
        lc = (torch.randn(B, Hkv * G, 1, generator=g) * 4).to(DEV)
        lc[1, :G] = -math.inf  # a sequence whose compressed part attended nothing
    got = attend_window_triton(q, parts, oc, lc, d**-0.5)
    assert got.shape == (B, 1, Hkv * G, d) and got.dtype == dt
    ref = K.window_reference(q, parts, oc, lc, d**-0.5)
    exact = K.window_reference(q.float(), [(k.float(), v.float()) for k, v in parts], oc, lc, d**-0.5)
    if dt == torch.float32:
        torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-5)
    else:  # rounding the output to q's dtype: no worse than the torch twin's own rounding, plus one ulp
        err, err_ref = (got.float() - exact).abs().max(), (ref.float() - exact).abs().max()
        assert err <= 2 * err_ref + 2 * torch.finfo(dt).eps * exact.abs().max(), (float(err), float(err_ref))
    # The compressed partial must matter: without it the output is far off.
    if compressed:
        alone = attend_window_triton(q, parts, None, None, d**-0.5)
        assert (alone.float() - exact).abs().max() > 1e-2


def test_window_kernel_refuses_prefill_chunks():
    from tqcache.kernels.window import attend_window_triton

    q = torch.randn(1, 4, 3, 64, device=DEV)
    k = torch.randn(1, 2, 5, 64, device=DEV)
    with pytest.raises(ValueError, match="3 query tokens"):
        attend_window_triton(q, [(k, k)], None, None, 0.125)


# ---------------------------------------------------------------------------------------------- plans and replays
# Each entry point keeps a plan per call signature (checks, constants, launch layout) and, on a GPU, replays the
# compiled kernels without Triton's per-call path (kernels/_launch.py). What may change between calls that share a
# plan — the token count, the write slot, the window length, the addresses — must still come out right, including
# across the values Triton specializes ints on (1, multiples of 16), and a changed codec state must not reuse stale
# constants.
def test_attend_plan_follows_the_token_count():
    kc, vc, kp, vp = _make(128, 4, 3, T=80, seed=21)
    q = torch.randn(2, 8, 1, 128, generator=_gen(22)).to(DEV, torch.float16)
    for T in (37, 48, 1, 64, 80, 17):  # one plan: views of the same buffers, T crossing 1 and multiples of 16
        kv = {n: t[:, :, :T] for n, t in kp.fields.items()}, {n: t[:, :, :T] for n, t in vp.fields.items()}
        _check(q, kc, type(kp)(fields=kv[0], dim=kp.dim, dtype=kp.dtype), vc,
               type(vp)(fields=kv[1], dim=vp.dim, dtype=vp.dtype))


def test_attend_plan_sees_a_changed_codec():
    kc, vc, kp, vp = _make(64, 4, 4, T=40, seed=23)
    q = torch.randn(2, 4, 1, 64, generator=_gen(24)).to(DEV)
    first, _ = _check(q, kc, kp, vc, vp)
    with torch.no_grad():
        vc.levels0.mul_(0.5)  # in place: same tensors, new state (a stale plan would keep the old tables)
    second, _ = _check(q, kc, kp, vc, vp)
    assert not torch.allclose(first, second)


def test_encode_plan_follows_the_slot():
    c = TurboQuantizer(128, 4, seed=5).to(DEV)
    x = torch.randn(1, 2, 40, 128, generator=_gen(25)).to(DEV)
    ref = c.quantize(x)
    fields = {n: torch.zeros(1, 2, 40, w, dtype=dt, device=DEV) for n, (w, dt) in c.field_widths().items()}
    slots = [0, 1, 16, 17, 31, 32, 39]
    for s in slots:  # one token per call: one plan, the slot crossing 1 and multiples of 16
        encode_into(c, x[:, :, s : s + 1], fields, s)
    for n, t in ref.fields.items():
        assert (fields[n][:, :, slots] != t[:, :, slots]).float().mean() < 0.01, n
        assert not fields[n][:, :, 2:16].any(), f"{n}: a slot nobody wrote"
    with pytest.raises(ValueError, match="capacity"):
        encode_into(c, x[:, :, :1], fields, 40)


def test_encode_plan_takes_any_chunk():
    """Prefill chunks hand the encode window slices of a new length, start and stride every time: one plan serves
    them all (a plan per shape re-ran every check, and a kernel specialized on the counts recompiled), and each
    call still writes exactly its slots, with the capacity checked on the buffers it gets."""
    from tqcache.kernels import _enc

    c = TurboQuantizer(64, 3, seed=7).to(DEV)
    x = torch.randn(1, 2, 120, 64, generator=_gen(27)).to(DEV)
    ref = c.quantize(x)
    fields = {n: torch.zeros(1, 2, 128, w, dtype=dt, device=DEV) for n, (w, dt) in c.field_widths().items()}
    start = 0
    for n in (17, 5, 32, 1, 40, 25):  # chunk lengths; each a slice of a buffer of another length (other strides)
        buf = torch.empty(1, 2, n + 9, 64, device=DEV)
        buf[:, :, :n] = x[:, :, start : start + n]
        encode_into(c, buf[:, :, :n], fields, start)
        start += n
    assert start == 120
    assert len(_enc._PLANS._by[id(c)]) == 1
    for n, t in ref.fields.items():
        assert (fields[n][:, :, :120] != t).float().mean() < 0.01, n
        assert not fields[n][:, :, 120:].any(), f"{n}: a slot past the last chunk was written"
    encode_into(c, x[:, :, :0], fields, 128)  # nothing to write: no launch, no error
    with pytest.raises(ValueError, match="capacity 128"):
        encode_into(c, x[:, :, :9], fields, 120)


@pytest.mark.skipif(not HAS_CUDA, reason="counts compiled kernels: the interpreter compiles nothing")
def test_split_count_compiles_nothing_new():
    """A decode loop at a short context meets a new split count every 128 tokens: the decode kernel must not be
    compiled again for it (it was: ~1 s per 128 generated tokens), and every split count stays exact."""
    from tqcache.kernels import attention as A
    from tqcache.kernels import decode_gluon as G

    kc, vc = TurboQuantizer(128, 4, seed=8).to(DEV), TurboQuantizer(128, 4, seed=9).to(DEV)
    kp = kc.quantize(torch.randn(2, 2, 700, 128, generator=_gen(29)).to(DEV))
    vp = vc.quantize(torch.randn(2, 2, 700, 128, generator=_gen(30)).to(DEV))
    q = torch.randn(2, 8, 1, 128, generator=_gen(31)).to(DEV, torch.bfloat16)

    def variants():
        return sum(len(c[0]) for fn in (A._attn_fwd_kernel, G._gluon_decode_kernel) for c in fn.device_caches.values())

    _check(q, kc, kp, vc, vp, splits=2)
    before = variants()
    for splits in (3, 5, 6, 7, 11):
        _check(q, kc, kp, vc, vp, splits=splits)
    assert variants() == before


def test_encode_with_scales_from_before_v16():
    """A key codec whose 1/s is not exact in bf16 (saved before calibration chose such scales) still encodes what
    the codec does: the kernel keeps the fp32 product and rounding for it."""
    c = TurboQuantizer(128, 4, channel_scale=True, heads=2, seed=8).to(DEV)
    g = _gen(808)
    x = (torch.randn(1, 2, 40, 128, generator=g) * (0.5 + 3 * torch.rand(128, generator=g))).to(DEV, torch.bfloat16)
    c.calibrate(x)
    inv = 1.0 / c.channel_scale
    assert torch.equal(inv, inv.to(torch.bfloat16).float())  # calibrated now: exact
    with torch.no_grad():  # an older codec's scales: arbitrary fp32
        c.channel_scale.mul_(1.0 + 0.003 * torch.rand(c.channel_scale.shape, generator=g).to(DEV))
    inv = 1.0 / c.channel_scale
    assert not torch.equal(inv, inv.to(torch.bfloat16).float())
    fields = {n: torch.zeros(1, 2, 40, w, dtype=t, device=DEV) for n, (w, t) in c.field_widths().items()}
    encode_into(c, x, fields, 0)
    ref = c.quantize(x)
    from tqcache.codec.packing import unpack_bits

    diff = unpack_bits(fields["codes"], 4, 128) != unpack_bits(ref["codes"], 4, 128)
    assert int(diff.sum()) <= 2, f"{int(diff.sum())} codes differ"


def test_encode_folds_power_of_two_key_scales(monkeypatch):
    """4-bit keys with power-of-two scales on bf16 input: the kernel folds the scales into one rotation per KV head
    and gives each (batch, KV head) pair its own programs — two per pair here, taking alternate tiles of three —
    and must still write the codec's codes and norms."""
    import importlib

    enc = importlib.import_module("tqcache.kernels.encode")
    c = TurboQuantizer(128, 4, channel_scale=True, heads=3, seed=21).to(DEV)
    g = _gen(2121)
    x = (torch.randn(2, 3, 150, 128, generator=g) * torch.exp(torch.randn(128, generator=g))).to(DEV, torch.bfloat16)
    c.calibrate(x)
    assert c.pow2_scales
    seen = {}
    launch = enc._ENCODE

    def record(key, grid, args, meta):
        seen.update(grid=grid, fold=meta["FOLD"])
        return launch(key, grid, args, meta)

    monkeypatch.setattr(enc, "_ENCODE", record)
    fields = {n: torch.full((2, 3, 160, w), 7, dtype=t, device=DEV) for n, (w, t) in c.field_widths().items()}
    encode_into(c, x, fields, 4, exact=False, programs_per_sm=12 if DEV == "cpu" else None)
    assert seen["fold"]
    if DEV == "cpu":
        assert seen["grid"] == (12,)  # 6 pairs × 2 programs
    ref = c.quantize(x)
    from tqcache.codec.packing import unpack_bits

    got = fields["codes"][:, :, 4:154]
    diff = unpack_bits(got, 4, 128) != unpack_bits(ref["codes"], 4, 128)
    assert int(diff.sum()) <= 2, f"{int(diff.sum())} codes differ"
    dn = (fields["norms"][:, :, 4:154].float() - ref["norms"].float()).abs()
    assert torch.all(dn <= ref["norms"].float() * 2.0**-10 + 1e-7)
    assert torch.all(fields["codes"][:, :, :4] == 7) and torch.all(fields["codes"][:, :, 154:] == 7)


@pytest.mark.parametrize("rot,bits,cs", [("hadamard", 4, False), ("hadamard", 3, True), ("haar", 4, False)])
def test_encode_butterfly_at_head_dim_256(rot, bits, cs, monkeypatch):
    """Head_dim 256 with a Hadamard rotation runs as two products on one [128, 128] block (BFLY) — with per-head
    scales, whose sign vector joins them — and a Haar rotation, which has no such structure, streams its chunks;
    both must write the codec's codes and norms."""
    import importlib

    enc = importlib.import_module("tqcache.kernels.encode")
    c = TurboQuantizer(256, bits, rotation=rot, channel_scale=cs, heads=2 if cs else None, seed=5).to(DEV)
    g = _gen(256 + bits)
    x = (torch.randn(1, 2, 70, 256, generator=g) * (0.5 + 3 * torch.rand(256, generator=g))).to(DEV, torch.bfloat16)
    c.calibrate(x)
    seen = {}
    launch = enc._ENCODE

    def record(key, grid, args, meta):
        seen.update(bfly=meta["BFLY"], dc=meta["DC"])
        return launch(key, grid, args, meta)

    monkeypatch.setattr(enc, "_ENCODE", record)
    fields = {n: torch.full((1, 2, 75, w), 7, dtype=t, device=DEV) for n, (w, t) in c.field_widths().items()}
    encode_into(c, x, fields, 2, exact=False)
    assert seen["bfly"] == (rot == "hadamard")
    assert seen["dc"] == (128 if rot == "hadamard" else 64)
    ref = c.quantize(x)
    from tqcache.codec.packing import unpack_codes

    got = fields["codes"][:, :, 2:72]
    diff = unpack_codes(got, bits, 256) != unpack_codes(ref["codes"], bits, 256)
    assert int(diff.sum()) <= 2, f"{int(diff.sum())} codes differ"
    dn = (fields["norms"][:, :, 2:72].float() - ref["norms"].float()).abs()
    assert torch.all(dn <= ref["norms"].float() * 2.0**-10 + 1e-7)
    assert torch.all(fields["codes"][:, :, :2] == 7) and torch.all(fields["codes"][:, :, 72:] == 7)


def test_encode_butterfly_factors_only_sylvester_blocks():
    """``_butterfly`` accepts exactly ``[[A, A], [tA, −tA]]`` with t = ±1 per row."""
    from tqcache.kernels.encode import _butterfly

    g = _gen(77)
    a = torch.sign(torch.randn(8, 8, generator=g))
    t = torch.sign(torch.randn(8, generator=g))
    r = torch.cat([torch.cat([a, a], 1), torch.cat([t[:, None] * a, -t[:, None] * a], 1)], 0)
    r00, tt = _butterfly(r)
    assert torch.equal(r00, a) and torch.equal(tt, t)
    x = torch.randn(5, 16, generator=g)
    assert torch.allclose(torch.cat([x[:, :8] @ a + (x[:, 8:] * t) @ a, x[:, :8] @ a - (x[:, 8:] * t) @ a], 1), x @ r)
    bad = r.clone()
    bad[3, 12] *= -1
    assert _butterfly(bad) is None


@pytest.mark.parametrize("d", [64, 128, 256])
def test_cell_map_counts_bounds(d):
    """The 8-bit cell table gives #{pb < |y|} and the level's square for any |y|: at, just above and just below every
    bound, and at random points; the kernel path (``exact=False``) then matches the codec."""
    import importlib

    enc = importlib.import_module("tqcache.kernels.encode")
    c = TurboQuantizer(d, 8, seed=4)
    levels, bounds = c._seg(0)[1:]
    winv, K, t = enc.cell_map(levels, bounds)
    pb = bounds[128:].float()
    g = _gen(d + 8)
    a = torch.cat([pb, torch.nextafter(pb, torch.full_like(pb, 1.0)), torch.nextafter(pb, torch.zeros_like(pb)),
                   torch.rand(5000, generator=g) * float(pb[-1]) * 1.2, torch.tensor([0.0, 1.0, 3.0])])
    k = torch.clamp((a * torch.tensor(winv, dtype=torch.float32)).long(), max=K)
    m = t[K + 1 + k] + (a > t[k]).float()
    want = (pb[None, :] < a[:, None]).sum(1).float()
    assert torch.equal(m, want)
    assert torch.equal(t[2 * (K + 1) + m.long()], levels[128:].float()[m.long()] ** 2)
    assert enc._enc_matrices(c.to(DEV), DEV)[-1]["CELL0"] == (winv, K)


def test_encode_plan_sees_calibration():
    c = TurboQuantizer(64, 4, seed=6, channel_scale=True).to(DEV)  # needs calibration: scales from the data
    x = torch.randn(1, 2, 8, 64, generator=_gen(26)).to(DEV)
    fields = {n: torch.zeros(1, 2, 8, w, dtype=dt, device=DEV) for n, (w, dt) in c.field_widths().items()}
    encode_into(c, x, fields, 0)  # calibrates, then encodes
    before = {n: t.clone() for n, t in fields.items()}
    with torch.no_grad():
        c.channel_scale[:8] *= 3.0  # in place: same tensor, new state (a stale plan would keep the old scales)
    encode_into(c, x, fields, 0)
    ref = c.quantize(x)
    for n, t in ref.fields.items():
        assert (fields[n] != t).float().mean() < 0.01, n
    assert not torch.equal(before["codes"], fields["codes"])


def test_window_plan_follows_the_window_length():
    from tqcache.kernels.window import attend_window_triton

    B, Hkv, G, d = 1, 2, 4, 64
    q = torch.randn(B, Hkv * G, 1, d, generator=_gen(28)).to(DEV)
    buf = torch.randn(B, Hkv, 40, d, generator=_gen(29)).to(DEV)
    sinks = torch.randn(B, Hkv, 4, d, generator=_gen(30)).to(DEV)
    for n in (15, 16, 1, 17, 32):
        parts = [(sinks, sinks), (buf[:, :, :n], buf[:, :, :n])]
        got = attend_window_triton(q, parts, None, None, d**-0.5)
        torch.testing.assert_close(got, K.window_reference(q, parts, None, None, d**-0.5), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not HAS_CUDA, reason="replays need compiled kernels (CUDA)")
def test_replays_match_tritons_own_launches():
    from tqcache.kernels import _launch

    kc, vc, kp, vp = _make(128, 3, 4, T=300, seed=31)
    q = torch.randn(2, 8, 1, 128, generator=_gen(32)).to(DEV, torch.bfloat16)
    x = torch.randn(2, 2, 1, 128, generator=_gen(33)).to(DEV, torch.bfloat16)
    outs = []
    for on in (False, True, True):  # Triton's path, then the first replay, then a second
        prev = _launch.set_enabled(on)
        try:
            o, l = attend_packed_triton(q, kc, kp, vc, vp, scale=0.1)
            f = {n: torch.zeros(2, 2, 4, w, dtype=dt, device=DEV) for n, (w, dt) in kc.field_widths().items()}
            encode_into(kc, x, f, 2)
            w = K.attend_window(q, [(x, x)], o, l, 0.1)
        finally:
            _launch.set_enabled(prev)
        outs.append((o, l, f, w))
    for o, l, f, w in outs[1:]:
        assert torch.equal(o, outs[0][0]) and torch.equal(l, outs[0][1]) and torch.equal(w, outs[0][3])
        assert all(torch.equal(f[n], outs[0][2][n]) for n in f)


def test_plans_do_not_keep_codecs_alive():
    # Plans, checks and constants live per codec: a dropped cache must take its codecs (and their GPU buffers) along.
    import gc
    import weakref

    kc, vc, kp, vp = _make(64, 4, 3, T=20, seed=41)
    q = torch.randn(2, 4, 1, 64, generator=_gen(42)).to(DEV)
    K.attend(q, kc, kp, vc, vp, scale=0.125)
    fields = {n: torch.zeros(2, 2, 4, w, dtype=dt, device=DEV) for n, (w, dt) in kc.field_widths().items()}
    K.encode(kc, torch.randn(2, 2, 1, 64, generator=_gen(43)).to(DEV), fields, 1)
    from tqcache.kernels import _attn, _enc

    refs, ids = [weakref.ref(kc), weakref.ref(vc)], {id(kc), id(vc)}
    tables = (_attn._PLANS._by, _enc._PLANS._by, K._CHECKS._by)
    assert all(id(kc) in t for t in tables)
    del kc, vc, kp, vp
    gc.collect()
    assert all(r() is None for r in refs)
    assert not any(ids & set(t) for t in tables), "plans of a dead codec linger"


def test_int_spec_follows_tritons_specialization():
    # A replay key carries how Triton specialized each changing int: = 1, a multiple of 16, or outside int32.
    from tqcache.kernels._launch import int_spec

    assert [int_spec(x) for x in (1, 0, 16, 48, 17, 2, -16)] == [1, 2, 2, 2, 0, 0, 2]
    assert int_spec(2**31) == 2 | 4 and int_spec(2**31 + 1) == 4 and int_spec(-(2**31)) == 2
    assert len({int_spec(t) for t in range(1, 200)}) == 3  # T growing by one meets three specializations
