"""Attention over packed keys/values in pure torch: the twin (and spec) of the Triton attention kernels.

Math (per query head h, query i; GQA: query head h reads KV head ``h // G``)::

    s_ij   = scale · ⟨rotate_query(q_i), rotated(K_j)⟩  (+ scale · ⟨S·q_i, γ_j√(π/2)/d·sign_j⟩ with QJL)
    m_i    = max_j s_ij,   l_i = Σ_j exp(s_ij − m_i),   lse_i = m_i + log l_i
    out_i  = unrotate(Σ_j exp(s_ij − m_i)·rotated(V_j)) / l_i

Keys are never reconstructed in the original space and values are rotated back once per query, exactly
as a fused kernel does. The sequence is processed in chunks with an online softmax, so memory stays
``O(chunk)`` rather than a dense fp32 copy of the cache. Returning ``lse`` lets the caller merge this
part with attention over the full-precision window (:func:`merge_partials`).
"""

from __future__ import annotations

import math

import torch

from .base import Packed

__all__ = ["attend_packed", "build_mask", "dense_partial", "merge_partials", "score_kl"]


def build_mask(
    B: int,
    Lq: int,
    T: int,
    *,
    kv_start: torch.Tensor | None = None,
    kv_end: torch.Tensor | None = None,
    q_pos: torch.Tensor | None = None,
    window: int | None = None,
    device=None,
) -> torch.Tensor | None:
    """Boolean ``[B, 1, Lq, T]`` mask (True = attend) from the structured arguments kernels take.

    Key slot ``j`` is visible to query ``i`` of sequence ``b`` when ``kv_start[b] <= j < kv_end[b]`` (left
    padding / valid length), and, if ``q_pos`` is given (causal), ``j <= q_pos[b] + i``, and, if ``window`` is
    given (sliding window), ``j > q_pos[b] + i - window``. Returns None when nothing is masked.
    """
    if kv_start is None and kv_end is None and q_pos is None:
        return None
    j = torch.arange(T, device=device).view(1, 1, T)
    i = torch.arange(Lq, device=device).view(1, Lq, 1)
    ok = torch.ones(B, Lq, T, dtype=torch.bool, device=device)
    if kv_start is not None:
        ok &= j >= kv_start.to(device).view(B, 1, 1)
    if kv_end is not None:
        ok &= j < kv_end.to(device).view(B, 1, 1)
    if q_pos is not None:
        pos = q_pos.to(device).view(B, 1, 1) + i
        ok &= j <= pos
        if window is not None:
            ok &= j > pos - window
    return ok[:, None]


def attend_packed(
    q: torch.Tensor,
    k_codec,
    k_packed: Packed,
    v_codec,
    v_packed: Packed,
    *,
    scale: float,
    kv_start: torch.Tensor | None = None,
    kv_end: torch.Tensor | None = None,
    q_pos: torch.Tensor | None = None,
    window: int | None = None,
    mask: torch.Tensor | None = None,
    chunk: int = 2048,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` over packed K/V.

    Args:
        q: ``[B, Hq, Lq, d]`` queries (any float dtype).
        k_codec, v_codec: the codecs that produced the packed state (``rotate_query``/``rotated``/``unrotate``).
        k_packed, v_packed: fields ``[B, Hkv, T, width]``; ``Hq`` must be a multiple of ``Hkv``.
        scale: softmax scale applied to the scores.
        kv_start, kv_end: optional int ``[B]``: valid key slots are ``kv_start[b] <= j < kv_end[b]``.
        q_pos: optional int ``[B]``: causal; query ``i`` sits at key slot ``q_pos[b] + i``.
        window: with ``q_pos``, sliding window: only the last ``window`` slots up to the query's own.
        mask: optional boolean ``[B, 1 or Hq, Lq, T]`` (True = attend), ANDed with the above; the torch
            reference only (kernels take the structured arguments).
        chunk: tokens per online-softmax step.

    Returns:
        ``(out, lse)``: ``out [B, Hq, Lq, d]`` float32 in the original space, already normalised;
        ``lse [B, Hq, Lq]`` float32 log-sum-exp of the scaled scores (``-inf`` where nothing is attended,
        with ``out`` = 0 there).
    """
    B, Hq, Lq, d = q.shape
    lead = k_packed.lead_shape
    if len(lead) != 3 or lead[0] != B:
        raise ValueError(f"packed keys must have lead shape [B={B}, Hkv, T], got {tuple(lead)}")
    Hkv, T = lead[1], lead[2]
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    G = Hq // Hkv
    # [B, Hkv, G·Lq, d]: all query heads of a GQA group against their KV head's packed state at once.
    qg = q.reshape(B, Hkv, G * Lq, d)
    q_rot = k_codec.rotate_query(qg)
    k_qjl = getattr(k_codec, "qjl", False)
    v_qjl = getattr(v_codec, "qjl", False)
    q_sk = k_codec.sketch_query(qg) if k_qjl else None
    structured = build_mask(B, Lq, T, kv_start=kv_start, kv_end=kv_end, q_pos=q_pos, window=window, device=q.device)
    if structured is not None:
        mask = structured if mask is None else (mask & structured)
    if mask is not None:
        mask = mask.expand(B, Hq, Lq, T).reshape(B, Hkv, G * Lq, T)

    m = torch.full((B, Hkv, G * Lq), -math.inf, device=q.device)
    l = torch.zeros((B, Hkv, G * Lq), device=q.device)
    acc = torch.zeros((B, Hkv, G * Lq, d), device=q.device)
    acc_qjl = torch.zeros_like(acc) if v_qjl else None
    for t0 in range(0, T, chunk):
        sl = slice(t0, min(t0 + chunk, T))
        kc = k_packed.map(lambda t: t[:, :, sl])
        vc = v_packed.map(lambda t: t[:, :, sl])
        s = q_rot @ k_codec.rotated(kc).transpose(-1, -2)
        if k_qjl:
            s = s + q_sk @ k_codec.qjl_vectors(kc).transpose(-1, -2)
        s = s * scale
        if mask is not None:
            s = s.masked_fill(~mask[..., sl], -math.inf)
        m_new = torch.maximum(m, s.amax(-1))
        m_safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
        p = torch.exp(s - m_safe[..., None])
        alpha = torch.exp(m - m_safe)
        l = l * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + p @ v_codec.rotated(vc)
        if v_qjl:
            acc_qjl = acc_qjl * alpha[..., None] + p @ v_codec.qjl_vectors(vc)
        m = m_new
    out = v_codec.unrotate(acc)
    if v_qjl:
        out = out + v_codec.unsketch(acc_qjl)
    out = out / l.clamp_min(1e-30)[..., None]
    lse = torch.where(l > 0, m + torch.log(l.clamp_min(1e-30)), torch.full_like(m, -math.inf))
    return out.reshape(B, Hq, Lq, d), lse.reshape(B, Hq, Lq)


_QUERY_CHUNK = 1024  # query rows per dense-part block: bounds the fp32 score matrix at long prefill


def dense_partial(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float):
    """Attention over full-precision keys with its log-sum-exp (SDPA does not return one).

    ``q [B, Hq, Lq, d]``, ``k/v [B, Hkv, T, d]``, ``mask`` boolean broadcastable to ``[B, 1, Lq, T]`` or None.
    Returns ``(out [B, Hq, Lq, d] fp32, lse [B, Hq, Lq] fp32)``.
    """
    B, Hq, Lq, d = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    G = Hq // Hkv
    kf, vf = k.float(), v.float()
    outs, lses = [], []
    for i0 in range(0, Lq, _QUERY_CHUNK):
        i1 = min(i0 + _QUERY_CHUNK, Lq)
        qc = q[:, :, i0:i1].float().reshape(B, Hkv, G * (i1 - i0), d)
        s = (qc @ kf.transpose(-1, -2)).reshape(B, Hkv, G, i1 - i0, T) * scale
        if mask is not None:
            s = s.masked_fill(~mask[:, :, None, i0:i1], -math.inf)
        lse = torch.logsumexp(s, dim=-1)
        # A row with no visible key has lse = -inf; without a mask every row sees all T ≥ 1 keys.
        lse_safe = lse if mask is None and T else torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        p = torch.exp(s - lse_safe[..., None]).reshape(B, Hkv, G * (i1 - i0), T)
        outs.append((p @ vf).reshape(B, Hq, i1 - i0, d))
        lses.append(lse.reshape(B, Hq, i1 - i0))
    if len(outs) == 1:
        return outs[0], lses[0]
    return torch.cat(outs, 2), torch.cat(lses, 2)


def merge_partials(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge normalised partial attentions ``(out [..., d], lse [...])`` over disjoint key sets.

    ``out = Σ_k out_k · exp(lse_k − lse)``, ``lse = log Σ_k exp(lse_k)``; parts that attended nothing
    (``lse = -inf``) contribute zero.
    """
    lses = torch.stack([p[1] for p in parts]).float()
    lse = torch.logsumexp(lses, dim=0)
    # Rows that no part saw: -inf - -inf = nan, weight 0. One stacked product instead of a loop over parts, and no
    # fp32 copies of the parts (stack promotes mixed dtypes): fewer torch ops, since eager decode steps and
    # prefill chunks are host-bound.
    w = torch.exp(lses - lse).nan_to_num_(0.0)
    out = (torch.stack([p[0] for p in parts]) * w[..., None]).sum(0, dtype=torch.float32)
    return out, lse


@torch.no_grad()
def score_kl(codec, keys: torch.Tensor, queries: torch.Tensor, scaling: float) -> float:
    """Mean KL(exact ‖ quantized) of the attention of ``queries [B, H, Q, d]`` over ``keys [B, H, T, d]``
    when the keys go through ``codec`` (scores in the rotated space, as attention computes them)."""
    exact = (queries @ keys.float().transpose(-1, -2)) * scaling
    packed = codec.quantize(keys, check=False)
    approx = (codec.rotate_query(queries) @ codec.rotated(packed).transpose(-1, -2)) * scaling
    p = exact.log_softmax(-1)
    return float((p.exp() * (p - approx.log_softmax(-1))).sum(-1).mean())
