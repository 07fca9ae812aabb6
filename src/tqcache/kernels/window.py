"""The full-precision part of a decode step in one launch: sinks + fp window attention, merged with the
compressed part's partial, written as the layer's attention output.

Why: a decode step of :func:`tqcache.attention.tqcache_attention` attends three key sets — the full-precision
sinks, the compressed slots (the split-K kernel of :mod:`.attention`) and the fp window — and merges them by
log-sum-exp. In torch the two dense parts and the merge are ~50 small ops per layer; in eager mode the step is
bound by the host issuing them (docs/performance.md, "Decode steps in eager mode"). This kernel does the dense
parts and the merge in one program per (batch, KV head), for the plain decode step only: one query token, no
padding mask, no sliding window — every key is visible, so there is no mask to read. Its torch twin is the
composition it replaces (``codec.attention.dense_partial`` per part + ``merge_partials``), against
which ``tests/test_kernels.py`` checks it.

Shapes: ``q [B, Hq, 1, d]``; each dense part ``(k, v)`` ``[B, Hkv, n, d]`` (any strides with a contiguous last
dimension; fp16/bf16/fp32); the compressed partial ``out_c [B, Hq, 1, d]`` fp32 (normalised) and ``lse_c
[B, Hq, 1]`` fp32 (natural log). Output ``[B, 1, Hq, d]`` in q's dtype — the layout the attention interface
returns. Scores and sums in fp32 (``ieee`` products: exact fp32, as the torch twin).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._compat import patch_interpreter
from ._launch import Replay, int_width
from .attention import _p2

__all__ = ["window_unsupported_reason", "check_window", "launch_window", "attend_window_triton"]


# The window lengths change every decode step: not specialized on (each divisibility class was another compile).
@triton.jit(do_not_specialize=["N1", "N2"])
def _window_kernel(
    Q, sqb, sqh,  # [B, Hq, 1, D]
    K1, s1b, s1h, s1t, V1, t1b, t1h, t1t, N1,  # dense part 1 (the sinks; N1 = 0: none)
    K2, s2b, s2h, s2t, V2, t2b, t2h, t2t, N2,  # dense part 2 (the fp window; N2 >= 1)
    OC, socb, soch, LC, slcb, slch,  # compressed partial (HAS_C)
    OUT, sob, soh,  # [B, 1, Hq, D] in q's dtype
    qk_scale,  # softmax scale · log2(e)
    HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BW: tl.constexpr, HAS_C: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // HKV
    h = pid % HKV
    g = tl.arange(0, GP)
    gm = g < G
    dd = tl.arange(0, D)
    rows = h * G + g
    q = tl.load(Q + b * sqb + rows[:, None] * sqh + dd[None, :], mask=gm[:, None], other=0.0).to(tl.float32)
    q = q * qk_scale
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    # Online softmax (log2 units) over the blocks of part 1, then of part 2, as one loop.
    nb1 = tl.cdiv(N1, BW)
    for i in range(nb1 + tl.cdiv(N2, BW)):
        one = i < nb1
        offs = tl.where(one, i, i - nb1) * BW + tl.arange(0, BW)
        ok = offs < tl.where(one, N1, N2)
        kp = tl.where(one, K1 + b * s1b + h * s1h, K2 + b * s2b + h * s2h) + offs[:, None] * tl.where(one, s1t, s2t)
        vp = tl.where(one, V1 + b * t1b + h * t1h, V2 + b * t2b + h * t2h) + offs[:, None] * tl.where(one, t1t, t2t)
        k = tl.load(kp + dd[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every block holds a key
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(vp + dd[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new
    LN2: tl.constexpr = 0.6931471805599453
    lse_w = (m_i + tl.log2(l_i)) * LN2  # natural log, finite (the window holds the query's own token)
    out = acc / l_i[:, None]
    if HAS_C:
        oc = tl.load(OC + b * socb + rows[:, None] * soch + dd[None, :], mask=gm[:, None], other=0.0)
        lc = tl.load(LC + b * slcb + rows * slch, mask=gm, other=float("-inf"))  # -inf: it attended nothing
        mx = tl.maximum(lse_w, lc)
        ew = tl.exp(lse_w - mx)
        ec = tl.exp(lc - mx)
        out = (out * ew[:, None] + oc * ec[:, None]) / (ew + ec)[:, None]
    tl.store(OUT + b * sob + rows[:, None] * soh + dd[None, :], out.to(OUT.dtype.element_ty), mask=gm[:, None])


def window_unsupported_reason(q: torch.Tensor, parts) -> str | None:
    """Why :func:`attend_window_triton` cannot take this call (None when it can)."""
    return _layout_reason(q, parts) or _count_reason(parts)


def _layout_reason(q: torch.Tensor, parts) -> str | None:
    """The checks that do not depend on the dense parts' token counts."""
    B, Hq, Lq, d = q.shape
    if Lq != 1:
        return f"{Lq} query tokens (the window kernel is for one-token decode steps)"
    if d not in (64, 128, 256):
        return f"head_dim {d} (64, 128 or 256)"
    if not 1 <= len(parts) <= 2:
        return "needs the fp window (one or more tokens) and at most one more dense part"
    for k, v in parts:
        if k.shape[:2] != v.shape[:2] or k.shape[0] != B or Hq % k.shape[1] or k.stride(-1) != 1 or v.stride(-1) != 1:
            return f"dense part shapes {tuple(k.shape)} / {tuple(v.shape)} for query {tuple(q.shape)}"
    return None


def _count_reason(parts) -> str | None:
    if parts[-1][0].shape[-2] < 1:
        return "needs the fp window (one or more tokens) and at most one more dense part"
    return None


def _sig(t: torch.Tensor) -> tuple:
    """What a dense part contributes to the call's key: all but its token count (an int argument of its own)."""
    return (t.dtype, t.shape[0], t.shape[1], t.shape[3], t.stride(), t.data_ptr() & 15)


_WINDOW = Replay(_window_kernel)
_CHECKED: dict = {}  # call signature (token counts aside) -> None, or why the kernel cannot take it


def _signature(q: torch.Tensor, parts, out_c, lse_c) -> tuple:
    """Everything about a call but the token counts of the dense parts (int arguments of their own)."""
    (k1, v1), (k2, v2) = parts if len(parts) == 2 else (parts[0], parts[0])
    return (q.dtype, q.shape, q.stride(), q.data_ptr() & 15, q.device, len(parts), _sig(k1), _sig(v1), _sig(k2),
            _sig(v2), (out_c.dtype, out_c.stride(), out_c.data_ptr() & 15, lse_c.dtype, lse_c.stride(),
                       lse_c.data_ptr() & 15) if out_c is not None else None)


def check_window(q: torch.Tensor, parts, out_c=None, lse_c=None) -> tuple[torch.Tensor, tuple | None, str | None]:
    """``(q, signature, why)``: q with a contiguous last dimension, the call's signature (None when ``parts`` are not
    ``(k, v)`` pairs of 4-D tensors) and why the kernel cannot take the call (None when it can) —
    :func:`window_unsupported_reason` with the layout checks memoised per signature, since this runs once per layer
    and decode step. :func:`launch_window` takes the signature as its launch key."""
    if q.stride(-1) != 1:
        q = q.contiguous()
    try:
        sig = _signature(q, parts, out_c, lse_c)
    except (AttributeError, IndexError, TypeError, ValueError):
        return q, None, window_unsupported_reason(q, parts) or "parts must be (k, v) pairs of [B, Hkv, n, d] tensors"
    why = _CHECKED.get(sig, False)
    if why is False:
        why = _layout_reason(q, parts)
        if len(_CHECKED) > 1024:
            _CHECKED.clear()
        _CHECKED[sig] = why
    return q, sig, why or _count_reason(parts)


def attend_window_triton(q: torch.Tensor, parts, out_c: torch.Tensor | None, lse_c: torch.Tensor | None,
                         scale: float) -> torch.Tensor:
    """Attention of the one-token query ``q [B, Hq, 1, d]`` over the dense ``parts`` (``[(k, v)]``: the sinks,
    optional, then the fp window, each ``[B, Hkv, n, d]``), merged with the compressed partial ``(out_c, lse_c)``
    when given; returns ``[B, 1, Hq, d]`` in q's dtype. Every key is visible (the plain decode step).

    Runs once per layer and decode step, so the checks are memoised per call signature (everything but the
    token counts and addresses) and the launch is replayed (:mod:`._launch`)."""
    q, sig, why = check_window(q, parts, out_c, lse_c)
    if why:
        raise ValueError(f"unsupported by the window kernel: {why}")
    return launch_window(q, parts, out_c, lse_c, scale, sig)


def launch_window(q: torch.Tensor, parts, out_c, lse_c, scale: float, sig: tuple) -> torch.Tensor:
    """The launch of :func:`attend_window_triton` for a call :func:`check_window` passed (``q`` and ``sig`` as it
    returned them)."""
    (k1, v1), (k2, v2) = parts if len(parts) == 2 else (parts[0], parts[0])
    has_c = out_c is not None
    B, Hq, _, d = q.shape
    n1 = k1.shape[-2] if len(parts) == 2 else 0
    n2 = k2.shape[-2]
    Hkv = k2.shape[1]
    G = Hq // Hkv
    if q.device.type == "cpu":
        patch_interpreter()
    out = torch.empty(B, 1, Hq, d, device=q.device, dtype=q.dtype)
    oc, lc = (out_c, lse_c) if has_c else (out, out)
    args = (
        q, q.stride(0), q.stride(1),
        k1, k1.stride(0), k1.stride(1), k1.stride(2), v1, v1.stride(0), v1.stride(1), v1.stride(2), n1,
        k2, k2.stride(0), k2.stride(1), k2.stride(2), v2, v2.stride(0), v2.stride(1), v2.stride(2), n2,
        oc, oc.stride(0), oc.stride(1), lc, lc.stride(0), lc.stride(1),
        out, out.stride(0), out.stride(2),
        float(scale) * 1.4426950408889634,
    )
    meta = dict(HKV=Hkv, G=G, GP=max(16, _p2(G)), D=d, BW=32 if d <= 128 else 16, HAS_C=has_c,
                num_warps=4)
    # The key: the signature (strides, dtypes, alignments of every tensor but out, which torch allocates 512-byte
    # aligned, with the same strides each call) and the two token counts' int width (they are not specialized on).
    _WINDOW((sig, int_width(n1, n2)), (B * Hkv,), args, meta)
    return out
