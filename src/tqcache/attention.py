"""The ``"tqcache"`` attention implementation: attention that reads the compressed cache.

``import tqcache`` registers it with transformers' ``AttentionInterface`` (and the matching mask
function), so a model loaded with ``attn_implementation="tqcache"`` calls :func:`tqcache_attention`.

For a :class:`~tqcache.cache.TurboQuantLayer` step the keys arrive with a :class:`~tqcache.cache.StepHandle`
attached; attention is computed per part and merged by log-sum-exp::

    sinks (full precision)  ─┐
    compressed prefix        ├─ (out_k, lse_k) each ──► merge_partials ──► output
    window + new tokens (fp) ┘

The mask function (:func:`_tqcache_mask`) passes transformers' SDPA mask through, except one that says nothing
but causality, which becomes None: positions give causality here. The compressed part goes to the fused Triton
kernel when one is available for the device and configuration (``tqcache.kernels``), otherwise to the pure-torch
reference
(:func:`tqcache.codec.attention.attend_packed`). Anything else (a ``DynamicCache``, the ``"none"``
scheme, a prefill with nothing compressed yet) falls through to transformers' SDPA unchanged, which is why
scheme ``"none"`` is bit-identical to ``DynamicCache``.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .codec.attention import attend_packed, dense_partial, merge_partials

__all__ = ["tqcache_attention", "register", "dense_partial", "attend_compressed"]  # dense_partial: codec.attention

def _visible(pos: torch.Tensor, step, mask: torch.Tensor | None, B: int, Lq: int) -> torch.Tensor:
    """Boolean ``[B or 1, 1, Lq, n]``: which keys at absolute positions ``pos [n]`` (-1 = empty) each query sees."""
    if mask is not None:
        cols = pos - step.kv_offset
        ok = (pos >= 0) & (cols >= 0) & (cols < mask.shape[-1])
        m = mask[..., cols.clamp(0, mask.shape[-1] - 1)]
        return m & ok
    q_pos = step.q_start + torch.arange(Lq, device=pos.device)
    m = (pos[None, :] >= 0) & (pos[None, :] <= q_pos[:, None])
    if step.sliding_window is not None:
        m &= pos[None, :] > q_pos[:, None] - step.sliding_window
    return m[None, None]


def attend_compressed(query: torch.Tensor, step, mask_c: torch.Tensor | None, scale: float):
    """Attention of ``query`` over the compressed slots of ``step``: fused kernel when possible, else torch.
    ``mask_c`` None: every slot is visible to every query."""
    layer = step.layer
    kp, vp = layer.packed("k", step.n_slots), layer.packed("v", step.n_slots)
    kernel = _kernel_for(query, layer)
    if kernel is not None and step.slot_pos is None:
        # Full layer: every compressed token is older than every query, so the only masking is left
        # padding, i.e. a per-sequence first visible slot (the mask's first True column; None: all visible).
        kv_start = None
        if mask_c is not None:
            m = mask_c.expand(query.shape[0], 1, query.shape[2], step.n_slots)[:, 0, -1]
            kv_start = torch.where(m.any(-1), m.int().argmax(-1),
                                   torch.full_like(m[:, 0], step.n_slots, dtype=torch.int)).to(torch.int32)
        out = kernel(query, layer.k_codec, kp, layer.v_codec, vp, scale=scale, kv_start=kv_start)
        if out is not None:
            layer.paths["kernel"] = layer.paths.get("kernel", 0) + 1
            return out
    layer.paths["reference"] = layer.paths.get("reference", 0) + 1
    return attend_packed(query, layer.k_codec, kp, layer.v_codec, vp, scale=scale, mask=mask_c)


def _kernels_for(query: torch.Tensor):
    """The kernels module if Triton can run on this device (a GPU, or the CPU under ``TRITON_INTERPRET=1``),
    else None. The kernels probe each configuration themselves and fall back to the torch twin when a
    configuration is not covered or its self-test failed."""
    try:
        from . import kernels
    except ImportError:
        return None
    if getattr(kernels, "attend", None) is None or not kernels.available(query.device):
        return None
    return kernels


def _kernel_for(query: torch.Tensor, layer):
    """The fused attention kernel's entry point (``kernels.attend``) where :func:`_kernels_for` allows, else None."""
    kernels = _kernels_for(query)
    return kernels.attend if kernels is not None else None


def tqcache_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
):
    """transformers attention function (``AttentionInterface`` signature); returns ``([B, Lq, Hq, d], None)``."""
    step = getattr(key, "_tqcache_step", None)
    if step is not None and step.layer.calibrating:
        step.layer.observe_queries(query, scaling)
    if step is None or (step.n_slots == 0 and step.sink_k is None):
        if attention_mask is None and query.shape[2] > 1 and key.shape[2] > query.shape[2]:
            # _tqcache_mask dropped a plain causal mask; SDPA's is_causal would align it top-left: rebuild it.
            attention_mask = _causal(query.shape[2], key.shape[2], query.device)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("attention logit soft-capping is not supported by the tqcache attention")
    B, Hq, Lq, d = query.shape
    scale = scaling if scaling is not None else d**-0.5
    mask = attention_mask
    if mask is not None and mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2  # additive mask: 0 = visible, large negative = masked
    dev = query.device
    # One new token, no padding mask, no sliding window: it sees every sink, every compressed slot of a full
    # layer and the whole fp window (all older than it, or itself), so no masks are built — a dozen fewer torch
    # ops per layer on the decode step, which is host-bound in eager mode (docs/performance.md, "Decode steps").
    see_all = mask is None and Lq == 1 and step.sliding_window is None

    def visible(pos_fn):
        return None if see_all else _visible(pos_fn(), step, mask, B, Lq)

    sinks = step.sink_k is not None and step.sink_k.shape[-2] > 0
    if see_all:  # (a full layer: no ring of slots)
        # The plain decode step: the dense parts and the merge in one launch (kernels.attend_window), when the
        # kernels run here; otherwise the same composition in torch below.
        kernels = _kernels_for(query)
        if kernels is not None:
            c_out = attend_compressed(query, step, None, scale) if step.n_slots else (None, None)
            dense = ([(step.sink_k, step.sink_v)] if sinks else []) + [(step.fp_k, step.fp_v)]
            out = kernels.attend_window(query, dense, c_out[0], c_out[1], scale)
            if out is None:  # not covered here: the same composition in torch
                out = kernels.window_reference(query, dense, c_out[0], c_out[1], scale)
            return out, None

    # A plain prefill chunk on a full layer (every sink and older window token visible, the chunk causal over itself)
    # runs its full-precision parts through flash attention on the GPU (kernels/prefill.py, dense_flash); anything
    # else — padding, sliding windows, fp32, the CPU — keeps the torch composition, its twin. Without a mask the
    # chunk is plain by construction (positions give causality); a mask is checked (one device sync).
    flash = None
    if Lq > 1 and step.slot_pos is None and step.sliding_window is None:
        kernels = _kernels_for(query)
        if kernels is not None and kernels.dense_flash_ready(query):
            flash = kernels.dense_flash
    vis_s = vis_f = None
    if not flash or mask is not None:  # the torch composition needs the masks; flash needs them checked
        vis_s = visible(lambda: torch.arange(step.sink_k.shape[-2], device=dev)) if sinks else None
        vis_f = visible(lambda: step.fp_start + torch.arange(step.fp_k.shape[-2], device=dev))
        if flash and not _plain_chunk(vis_s, vis_f, Lq):
            flash = None
    parts = []
    if sinks:
        parts.append(flash(query, step.sink_k, step.sink_v, scale) if flash else
                     dense_partial(query, step.sink_k, step.sink_v, vis_s, scale))
    if step.n_slots:
        if step.slot_pos is not None:  # a ring of slots (sliding layers): some may be empty or out of reach
            vis = _visible(step.slot_pos, step, mask, B, Lq)
        elif mask is None and step.sliding_window is None:
            vis = None  # every compressed token is older than every query: all visible (no mask, no kv_start)
        else:
            vis = visible(lambda: step.c_lo + torch.arange(step.n_slots, device=dev))
        parts.append(attend_compressed(query, step, vis, scale))
    if flash:
        old = step.fp_k.shape[-2] - Lq  # the window before this chunk, then the chunk's own tokens
        if old:
            parts.append(flash(query, step.fp_k[:, :, :old], step.fp_v[:, :, :old], scale))
        parts.append(flash(query, step.fp_k[:, :, old:], step.fp_v[:, :, old:], scale, causal=True))
    else:
        parts.append(dense_partial(query, step.fp_k, step.fp_v, vis_f, scale))
    out, _ = merge_partials(parts)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def _plain_chunk(vis_s: torch.Tensor | None, vis_f: torch.Tensor, Lq: int) -> bool:
    """Whether a prefill chunk's full-precision parts see what a plain chunk sees: every sink (``vis_s``) and every
    window token older than the chunk, and the chunk's own tokens causally (``vis_f [B or 1, 1, Lq, F]``, the
    chunk being its last ``Lq`` columns). One device sync; prefill only, never the decode step."""
    F = vis_f.shape[-1]
    if F < Lq:
        return False
    ok = (vis_f == _causal(Lq, F, vis_f.device)).all()
    if vis_s is not None:
        ok = ok & vis_s.all()
    return bool(ok)


def _causal(Lq: int, kv: int, device) -> torch.Tensor:
    """``[1, 1, Lq, kv]`` bool: query ``i`` (the last ``Lq`` of ``kv`` positions) sees keys ``≤ kv − Lq + i``."""
    return torch.ones(Lq, kv, dtype=torch.bool, device=device).tril(kv - Lq)[None, None]


def _tqcache_mask(*args, **kwargs):
    """The boolean ``[B, 1, Lq, kv_length]`` mask SDPA gets — or None when it says nothing but causality (no
    padding, no packed sequences, no sliding band that cuts a token). transformers materializes the causal mask of
    a chunk that follows cached tokens; tqcache_attention rebuilds causality from positions, and with no mask a
    prefill chunk runs without visibility masks or device syncs (its full-precision parts on flash attention,
    kernels/prefill.py). One comparison per forward of a multi-token chunk (a device sync); decode steps (one
    token) get None from sdpa_mask already when there is no padding."""
    mask = sdpa_mask(*args, **kwargs)
    if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[-2] > 1:
        Lq, kv = mask.shape[-2], mask.shape[-1]
        if kv >= Lq and bool((mask == _causal(Lq, kv, mask.device)).all()):
            return None
    return mask


def register() -> None:
    """Register ``"tqcache"`` with transformers (idempotent; done by ``import tqcache``)."""
    AttentionInterface.register("tqcache", tqcache_attention)
    AttentionMaskInterface.register("tqcache", _tqcache_mask)
