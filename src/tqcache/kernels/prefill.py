"""Prefill chunks over a compressed prefix: dequantize to the rotated space, then flash attention.

A prefill chunk of ``Lq`` tokens (a prompt continued from a reused prompt cache, a later turn of a chat, chunked
prefill) attends to every compressed token of a full-attention layer. The split-K kernel of :mod:`.attention`
re-reads and re-decodes the whole prefix once per 64-row query tile, so its cost grows as ``N·Lq`` in *decode*
work: on the H100 a 2048-token chunk over a 32K-token turbo4 prefix took 10.3 ms per layer, 6.5× SDPA over the same
tokens in bf16 (``benchmarks/results/prefill_h100_v14.json``). Here the prefix is decoded once instead (3.4 ms):

    K̂ = n^K · c^K[idx^K],  V̂ = n^V · c^V[idx^V]        rotated space, fp16, in chunks of ≤ ``chunk`` tokens
    q̃ = rotate_query(q)                                 so that ⟨q̃, K̂_t⟩ = ⟨q, k̂_t⟩
    (o, lse) = flash(q̃, K̂, V̂)  per chunk, merged by log-sum-exp
    out = unrotate(o)

Only the decode is ours (:func:`dequantize_rotated`, a Triton kernel whose torch twin is
:meth:`TurboQuantizer.rotated`); the products run in torch's flash-attention kernel, which returns the
log-sum-exp the caller merges the fp window with. The GQA group rides along as query rows (``[B, Hkv, G·Lq, d]``:
every prefix token is visible to every query of the chunk, so nothing is masked but left padding, which is a
first visible slot per sequence, ``kv_start``). Precision matches the kernel: fp16 operands (a product ``n·c``
rounded once), fp32 accumulation. On the CPU (the interpreter tests) the same steps run in fp32 with torch's CPU
flash kernel.

Covered: TurboQuant codecs without QJL on the keys whose segments are powers of two ≥ 16 channels (every named
preset but the quarter-bit ``k3.25v3`` / ``k2.25v2`` and ``-qjl``), head_dim a multiple of 8 up to 256, fp16/bf16
queries on a CUDA GPU. :func:`prefill_reason` says why not; ``kernels.attend`` then keeps the split-K kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._codec_key import cached, codec_key, remember
from ._compat import patch_interpreter
from ._launch import Replay, int_spec, int_width
from .attention import _cdiv, _unpack_codes, level_table

__all__ = ["attend_prefill", "dense_flash", "dense_flash_reason", "dequantize_rotated", "prefill_reason",
           "PREFILL_MIN_ROWS"]

# Query rows per KV head (G·Lq) from which the dequantize + flash path runs instead of the split-K kernel. H100,
# turbo4 / turbo3, 4K–128K-token prefixes (benchmarks/results/prefill_h100_v14.json): at 64 rows (Lq = 16 with
# G = 4) the kernel is 1.2–2.3× faster; from 256 rows this path is: 1.1–2.2× there, 2.4–4.6× from 2048 rows.
PREFILL_MIN_ROWS = 256
_BUDGET = 1 << 16  # prefix tokens × sequences decoded at once (bounds the transient fp16 K̂, V̂)


# N is not specialized on: a chunk's prefix length is any number, and each new divisibility class would otherwise be
# one more compile (seconds) in the middle of a chat.
@triton.jit(do_not_specialize=["N"])
def _dequant_kernel(
    C, stride_cb, stride_ch, stride_ct,  # codes [B, H, N, W] uint8
    NRM, stride_nb, stride_nh, stride_nt,  # norms [B, H, N, S] fp16
    LV,  # [2, 256] fp32 levels per segment
    OUT, stride_ob, stride_oh, stride_ot,  # [B, H, N, D] fp16/fp32 out
    N,
    H: tl.constexpr, D0: tl.constexpr, B0: tl.constexpr, NB0: tl.constexpr,
    D1: tl.constexpr, B1: tl.constexpr, NB1: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One ``BLOCK_N``-token tile of one (batch, head): each segment's codes → level × its norm, stored at the
    segment's channels (segment 1, when ``D1 > 0``, starts at channel ``D0`` and byte ``D0·B0/8``)."""
    pid_bh = tl.program_id(0)
    b = pid_bh // H
    h = pid_bh % H
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = rows < N
    crow = C + b * stride_cb + h * stride_ch + rows * stride_ct
    nrow = NRM + b * stride_nb + h * stride_nh + rows * stride_nt
    orow = OUT + b * stride_ob + h * stride_oh + rows * stride_ot
    idx = _unpack_codes(crow, ok, B0, D0, BLOCK_N)
    n0 = tl.load(nrow + NB0, mask=ok, other=0.0).to(tl.float32)
    v = tl.load(LV + idx) * n0[:, None]
    tl.store(orow[:, None] + tl.arange(0, D0)[None, :], v.to(OUT.dtype.element_ty), mask=ok[:, None])
    if D1 > 0:
        idx1 = _unpack_codes(crow + D0 * B0 // 8, ok, B1, D1, BLOCK_N)
        n1 = tl.load(nrow + NB1, mask=ok, other=0.0).to(tl.float32)
        v1 = tl.load(LV + 256 + idx1) * n1[:, None]
        tl.store(orow[:, None] + D0 + tl.arange(0, D1)[None, :], v1.to(OUT.dtype.element_ty), mask=ok[:, None])


def _pow2(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


def _codec_reason(codec, name: str) -> str | None:
    from ..codec.turbo import TurboQuantizer

    if not isinstance(codec, TurboQuantizer):
        return f"{name} codec is {type(codec).__name__}, not TurboQuant"
    if len(codec.segments) > 2:
        return f"{name} codec has {len(codec.segments)} segments"
    for d_s, b_s in codec.segments:
        if not _pow2(d_s) or not 1 <= b_s <= 8:
            return f"{name} segment of {d_s} channels at {b_s} bits (the decode takes powers of two ≥ 16 channels)"
    return None


def prefill_reason(q: torch.Tensor, k_codec, v_codec) -> str | None:
    """Why :func:`attend_prefill` cannot take this call (None when it can)."""
    why = _codec_reason(k_codec, "key") or _codec_reason(v_codec, "value")
    if why:
        return why
    if k_codec.qjl or v_codec.qjl:
        return "QJL codecs (the sign sketch is not decoded into the keys)"
    d = q.shape[-1]
    if d % 8 or d > 256:
        return f"head_dim {d} (flash attention takes multiples of 8 up to 256)"
    if q.device.type == "cuda" and q.dtype not in (torch.float16, torch.bfloat16):
        return f"{q.dtype} queries on the GPU (the flash path is fp16)"
    return None


_CONSTS: dict = {}


def _codec_consts(codec, device) -> tuple:
    """Per codec state (weakly cached like the encode's matrices; a changed codec state is a new key):
    ``(levels [2, 256] fp32, segments ((d_s, b_s, norm column), ...), A, U)`` with ``A = rotate_query(I)``
    (``[d, d]``, or ``[Hkv, d, d]`` with per-head channel scales) and ``U = unrotate(I)`` ``[d, d]`` fp32: the
    query map and the unrotation as one product each instead of the codec's chain of torch ops per call (a
    prefill chunk's host time is what its cost is, docs/performance.md)."""
    key = codec_key(codec, device)
    hit = cached(_CONSTS, key, (codec,))
    if hit is not None:
        return hit
    segs = tuple((d_s, b_s, codec._block_of(s)) for s, (d_s, b_s) in enumerate(codec.segments))
    eye = torch.eye(codec.dim, device=device)
    out = (level_table(codec, device), segs, codec.rotate_query(eye).contiguous(), codec.unrotate(eye).contiguous())
    return remember(_CONSTS, key, (codec,), out)


_DEQUANT = Replay(_dequant_kernel)


def dequantize_rotated(codec, fields: dict, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """``codec.rotated(packed)`` in ``dtype``: ``[B, H, N, d]`` from the packed fields ``[B, H, N, width]``
    (views of a cache's storage are fine). Triton on the GPU (and under ``TRITON_INTERPRET=1``); the product
    ``norm · level`` is taken in fp32 and rounded once, exactly as the torch twin."""
    codes, norms = fields["codes"], fields["norms"]
    B, H, N, _ = codes.shape
    out = torch.empty(B, H, N, codec.dim, device=codes.device, dtype=dtype)
    if N == 0:
        return out
    if codes.device.type == "cpu":
        patch_interpreter()
    lv, segs, _, _ = _codec_consts(codec, codes.device)
    (d0, b0, nb0), (d1, b1, nb1) = segs[0], (segs[1] if len(segs) > 1 else (0, 1, 0))
    block = 64 if codec.dim <= 128 else 32
    strides = (*codes.stride()[:3], *norms.stride()[:3], *out.stride()[:3])
    args = (codes, *strides[:3], norms, *strides[3:6], lv, out, *strides[6:], N)
    meta = dict(H=H, D0=d0, B0=b0, NB0=nb0, D1=d1, B1=b1, NB1=nb1, BLOCK_N=block, num_warps=4)
    # Everything Triton specializes on (_launch's contract): dtypes, alignments, the strides' classes, N's width.
    key = (codes.dtype, norms.dtype, dtype, codes.data_ptr() & 15, norms.data_ptr() & 15, out.data_ptr() & 15,
           lv.data_ptr() & 15, tuple(int_spec(st) for st in strides), int_width(N), tuple(meta.items()))
    _DEQUANT(key, (B * H, _cdiv(N, block)), args, meta)
    return out


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
           causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of softmax(q kᵀ·scale) v with the natural-log log-sum-exp per row (torch's flash kernels;
    ``causal``: row i sees keys ≤ i, for square problems)."""
    if q.device.type == "cuda":
        res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    else:
        res = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    return res[0], res[1]


def attend_prefill(q: torch.Tensor, k_codec, k_fields: dict, v_codec, v_fields: dict, *, scale: float,
                   kv_start: torch.Tensor | None = None, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q [B, Hq, Lq, d]`` over every packed token ``[kv_start_b, T)`` of each sequence: the
    ``(out [B, Hq, Lq, d] fp32, lse [B, Hq, Lq] fp32)`` of :func:`tqcache.codec.attention.attend_packed` (lse
    -inf and out 0 where nothing is visible). The prefix is decoded ``chunk`` tokens at a time (default: 64K
    token·sequences, at least 1K tokens — a transient fp16 K̂ and V̂ of 268 MB at 8 heads × 128). With ``kv_start``
    the per-sequence starts are read on the host (one sync: this runs once per layer of a prefill chunk, not per
    decode step)."""
    B, Hq, Lq, d = q.shape
    Hkv, T = k_fields["codes"].shape[1], k_fields["codes"].shape[2]
    G = Hq // Hkv
    work = torch.float16 if q.device.type == "cuda" else torch.float32
    # Rows g·Lq + i of KV head h: query head h·G + g, token i. Per-head key scales ([Hkv, d, d] maps) broadcast here.
    qr = torch.matmul(q.reshape(B, Hkv, G * Lq, d).float(), _codec_consts(k_codec, q.device)[2]).to(work)
    U = _codec_consts(v_codec, q.device)[3]
    starts = [0] * B if kv_start is None else [max(0, int(s)) for s in kv_start.tolist()]

    def attend_span(b: int, e: int, c0: int, c1: int):  # sequences [b, e) over prefix tokens [c0, c1)
        kf = {n: t[b:e, :, c0:c1] for n, t in k_fields.items()}
        vf = {n: t[b:e, :, c0:c1] for n, t in v_fields.items()}
        o, s = _flash(qr[b:e], dequantize_rotated(k_codec, kf, work), dequantize_rotated(v_codec, vf, work), scale)
        return o.float(), s.float()

    def staging():  # the output buffers, made only when several runs must be put together (or nothing ran)
        return (torch.zeros(B, Hkv, G * Lq, d, device=q.device, dtype=torch.float32),
                torch.full((B, Hkv, G * Lq), float("-inf"), device=q.device, dtype=torch.float32))

    out = lse = None
    b = 0
    while b < B:  # runs of sequences with the same first visible slot share the decode and the products
        e = b + 1
        while e < B and starts[e] == starts[b]:
            e += 1
        step = chunk or max(1024, _BUDGET // (e - b))
        parts = [attend_span(b, e, c0, min(T, c0 + step)) for c0 in range(starts[b], T, step)]
        if len(parts) > 1:
            from ..codec.attention import merge_partials

            parts = [merge_partials(parts)]
        if parts and e - b == B:  # one run (B = 1, or no padding): nothing to stage
            o, s = parts[0]
            return torch.matmul(o, U).reshape(B, Hq, Lq, d), s.reshape(B, Hq, Lq)
        if out is None:
            out, lse = staging()
        if parts:
            out[b:e], lse[b:e] = parts[0]
        b = e
    if out is None:  # (B = 0)
        out, lse = staging()
    return torch.matmul(out, U).reshape(B, Hq, Lq, d), lse.reshape(B, Hq, Lq)


# The full-precision parts of a prefill chunk (sinks, the fp window, the chunk itself) through flash attention too:
# see dense_flash. A switch for A/B runs and for bisecting; the torch composition is the twin either way.
DENSE_FLASH = True


def dense_flash_reason(q: torch.Tensor) -> str | None:
    """Why :func:`dense_flash` does not take ``q`` here (None when it does): the GPU's flash kernel, fp16/bf16."""
    if not DENSE_FLASH:
        return "switched off (prefill.DENSE_FLASH)"
    if q.device.type != "cuda":
        return "not a CUDA tensor"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"{q.dtype} queries"
    if q.shape[-1] % 8 or q.shape[-1] > 256:
        return f"head_dim {q.shape[-1]}"
    return None


def dense_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool = False):
    """:func:`tqcache.codec.attention.dense_partial` for the two masks a plain prefill chunk needs, on flash
    attention: every key visible (``causal=False``; the GQA group rides as query rows), or the chunk over its own
    keys (``causal=True``: ``k/v`` are exactly the chunk's ``Lq`` tokens, query ``i`` sees keys ``≤ i``; the KV heads
    are repeated for the group). ``q [B, Hq, Lq, d]``, ``k/v [B, Hkv, T, d]`` in q's dtype; returns ``(out [B, Hq,
    Lq, d] in q's dtype, lse [B, Hq, Lq] fp32)`` — :func:`~tqcache.codec.attention.merge_partials` promotes the
    parts it stacks, so no fp32 copy is made here. Products in the inputs' dtype with fp32 accumulation, as SDPA's."""
    B, Hq, Lq, d = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    G = Hq // Hkv
    if causal:
        if T != Lq:
            raise ValueError(f"causal dense_flash takes the chunk's own {Lq} keys, got {T}")
        if G > 1:
            k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
        return _flash(q, k, v, scale, causal=True)
    o, lse = _flash(q.reshape(B, Hkv, G * Lq, d), k, v, scale)
    return o.reshape(B, Hq, Lq, d), lse.reshape(B, Hq, Lq)
