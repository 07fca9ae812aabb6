"""The ``"tqcache"`` attention implementation: attention that reads the compressed cache.

``import tqcache`` registers it with transformers' ``AttentionInterface`` (and the matching mask
function), so a model loaded with ``attn_implementation="tqcache"`` calls :func:`tqcache_attention`.

For a :class:`~tqcache.cache.TurboQuantLayer` step the keys arrive with a :class:`~tqcache.cache.StepHandle`
attached; attention is computed per part and merged by log-sum-exp::

    sinks (full precision)  ─┐
    compressed prefix        ├─ (out_k, lse_k) each ──► merge_partials ──► output
    window + new tokens (fp) ┘

The compressed part goes to the fused Triton kernel when one is available for the device and
configuration (``tqcache.kernels``), otherwise to the pure-torch reference
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

    parts = []
    if sinks:
        vis = visible(lambda: torch.arange(step.sink_k.shape[-2], device=dev))
        parts.append(dense_partial(query, step.sink_k, step.sink_v, vis, scale))
    if step.n_slots:
        if step.slot_pos is not None:  # a ring of slots (sliding layers): some may be empty or out of reach
            vis = _visible(step.slot_pos, step, mask, B, Lq)
        else:
            vis = visible(lambda: step.c_lo + torch.arange(step.n_slots, device=dev))
        parts.append(attend_compressed(query, step, vis, scale))
    vis = visible(lambda: step.fp_start + torch.arange(step.fp_k.shape[-2], device=dev))
    parts.append(dense_partial(query, step.fp_k, step.fp_v, vis, scale))
    out, _ = merge_partials(parts)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def _tqcache_mask(*args, **kwargs):
    # The same boolean [B, 1, Lq, kv_length] mask SDPA gets; None when it is purely causal without padding.
    return sdpa_mask(*args, **kwargs)


def register() -> None:
    """Register ``"tqcache"`` with transformers (idempotent; done by ``import tqcache``)."""
    AttentionInterface.register("tqcache", tqcache_attention)
    AttentionMaskInterface.register("tqcache", _tqcache_mask)
