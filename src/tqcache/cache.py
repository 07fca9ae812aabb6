"""`TurboQuantCache`: a transformers ``Cache`` whose layers keep keys/values compressed.

Per layer the tokens live in three places, in position order::

    sinks        positions [0, S)            full precision, the first ``cfg.sinks`` tokens, forever
    compressed   positions [S, S + C)        packed by the layer's K and V codecs (``Packed`` fields)
    window       positions [S + C, n)        full precision, the most recent ``cfg.window`` tokens (while
                                             decoding, up to ``cfg.window + cfg.flush − 1``)

``update(k, v)`` appends the new tokens to the window and compresses what overflows it (oldest first; once
decoding, a full layer waits until ``cfg.flush`` tokens overflow and compresses them in one go);
for this step's attention it hands back a *step handle* recording the state *before* compression, so a
prefill chunk attends to itself in full precision and to older tokens compressed — what a fused decode
kernel sees. Sliding-window layers (Gemma-3's local layers) keep the compressed part in a ring buffer of
``sliding_window − 1 − window`` slots and never store more than the window (plus the one step of overflow
that waits in full precision: a step's overflow is compressed at the start of the next step, into the slot
of a token that has left the window — never into one the step's own attention still reads).

Codecs that calibrate on data (query-aware key scaling, outlier channel split) keep the prompt full
precision for one step: the attention function records the prompt's queries, and the next ``update``
calibrates, then compresses (:meth:`TurboQuantLayer.finish_calibration`).

The cache holds no math: codecs (``codec/``) quantize and measure, ``attention.py`` attends. When the model does not
use the ``"tqcache"`` attention implementation, ``update`` returns ordinary dense tensors (decompressing
the whole cache every step: correct but slow, documented).

Storage of the compressed part: every ``Packed`` field is a preallocated ``[B, H_kv, capacity, width]``
tensor that grows geometrically (full layers) or is fixed (sliding ring); ``nbytes()`` counts the whole
allocation, over-allocated capacity included.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from .codec import Packed, derive_seed, make_codec
from .codec.attention import score_kl as _score_kl
from .config import CacheConfig, parse_scheme

__all__ = ["TurboQuantCache", "TurboQuantLayer", "StepHandle", "CacheMemory"]

_MIN_CAPACITY = 256
_Q_SAMPLE = 64  # query rows per KV head kept to check the key scaling on real scores
_K_SAMPLE = 1024  # most recent prompt keys used for that check


def _encode_kernel(device: torch.device, *codecs):
    """``tqcache.kernels.encode`` when Triton can run on ``device`` (it self-tests and falls back per
    configuration, e.g. to the torch codec for ``split="rotated"``, which it declines), else None."""
    if device.type != "cuda":
        return None
    try:
        from . import kernels
    except ImportError:
        return None
    return kernels.encode if kernels.available(device) else None


@dataclasses.dataclass
class StepHandle:
    """What one ``update`` hands to the attention function (attached to the returned key tensor).

    The parts are disjoint and together hold every token the step's queries may attend:
    ``sink_k/v [B, H, S, d]`` (positions ``0..S-1``), the compressed slots ``[0, n_slots)`` of ``layer``
    with absolute positions ``slot_pos [n_slots]`` (-1 = empty slot), and ``fp_k/v [B, H, F, d]`` at
    positions ``fp_start .. fp_start + F - 1`` (the previous window plus this step's new tokens).
    ``q_start`` is the absolute position of the first query; ``kv_offset`` the absolute position of the
    attention mask's first column (transformers' ``get_mask_sizes``).
    """

    layer: "TurboQuantLayer"
    sink_k: torch.Tensor | None
    sink_v: torch.Tensor | None
    n_slots: int
    c_lo: int
    slot_pos: torch.Tensor | None
    fp_k: torch.Tensor
    fp_v: torch.Tensor
    fp_start: int
    q_start: int
    kv_offset: int
    sliding_window: int | None


@dataclasses.dataclass(frozen=True)
class CacheMemory:
    """Exact memory accounting of a cache (bytes actually allocated).

    Attributes:
        total_bytes: everything allocated: compressed storage (with spare capacity), windows, sinks,
            full-precision layers.
        compressed_bytes: allocated compressed storage; ``compressed_used_bytes`` the part holding tokens.
        window_bytes: full-precision tokens (recent windows, sinks, full-precision layers), as stored.
        fp16_bytes: what an fp16 DynamicCache would hold for the same tokens.
        compressed_tokens, fp_tokens: token·layer counts of each kind.
        bits_per_element: bits per compressed element, every code, norm, scale and sign counted.
        bits_per_element_total: ``8·total_bytes`` over all cached elements (windows included).
    """

    total_bytes: int
    compressed_bytes: int
    compressed_used_bytes: int
    window_bytes: int
    fp16_bytes: int
    compressed_tokens: int
    fp_tokens: int
    bits_per_element: float
    bits_per_element_total: float

    @property
    def compression_ratio(self) -> float:
        return self.fp16_bytes / self.total_bytes if self.total_bytes else float("nan")


class TurboQuantLayer(CacheLayerMixin):
    """One layer's compressed cache (full attention, or sliding window when ``sliding_window`` is set).

    ``compress=False`` makes it a full-precision layer with the same bookkeeping (scheme ``"none"`` and
    ``cfg.fp_layers``).
    """

    is_compileable = False
    is_croppable = True

    def __init__(
        self,
        cfg: CacheConfig,
        layer_idx: int,
        *,
        compress: bool = True,
        sliding_window: int | None = None,
        return_handles: bool = True,
    ):
        self.cfg, self.layer_idx = cfg, layer_idx
        self.compress = compress and cfg.compressed
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.return_handles = return_handles
        self.is_initialized = False
        self.k_codec = self.v_codec = None
        self._reset_state()

    # ------------------------------------------------------------------ state
    def _reset_state(self) -> None:
        self.cumulative_length = 0  # tokens ever appended (absolute position of the next token)
        self.sink_k = self.sink_v = None
        self.win_k = self.win_v = None
        self.win_start = 0  # absolute position of the window's first token
        self.k_store: dict[str, torch.Tensor] | None = None
        self.v_store: dict[str, torch.Tensor] | None = None
        self.c_lo = self.c_hi = 0  # compressed tokens hold positions [c_lo, c_hi)
        self.decoding = False
        self.calibrating = False  # a step kept full precision until the codecs are calibrated
        self._q_sq, self._q_count, self._q_sample, self._scaling = None, 0, None, None
        self.calibration_report: dict | None = None
        self.paths: dict[str, int] = {}  # attention path -> steps (filled by attention.py)

    @property
    def window(self) -> int:
        if not self.compress:
            return math.inf
        return self.cfg.window

    @property
    def n_sinks(self) -> int:
        return 0 if (self.sink_k is None) else self.sink_k.shape[-2]

    @property
    def ring_capacity(self) -> int | None:
        """Slots of the sliding layer's compressed ring (tokens older than the window but inside it)."""
        if not self.is_sliding:
            return None
        return max(self.sliding_window - 1 - self.cfg.window, 0)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        B, H, _, d = key_states.shape
        self.batch, self.heads, self.head_dim = B, H, d
        empty = key_states[:, :, :0]
        self.win_k, self.win_v = empty, value_states[:, :, :0]
        if self.compress and self.k_codec is None:
            self.k_codec, self.v_codec = self.build_codecs(d, H)
            self.k_codec, self.v_codec = self.k_codec.to(self.device), self.v_codec.to(self.device)
        self.is_initialized = True

    def build_codecs(self, head_dim: int, heads: int):
        """Fresh (uncalibrated) key and value codecs of this layer, seeded from ``(cfg.seed, layer_idx)``."""
        cfg, i = self.cfg, self.layer_idx
        return (
            make_codec(cfg.key, head_dim, derive_seed(cfg.seed, i, 0), heads=heads),
            make_codec(cfg.value, head_dim, derive_seed(cfg.seed, i, 1), heads=heads),
        )

    def _alloc(self, codec, capacity: int) -> dict[str, torch.Tensor]:
        return {
            name: torch.zeros(self.batch, self.heads, capacity, w, dtype=dt, device=self.device)
            for name, (w, dt) in codec.field_widths().items()
        }

    @property
    def capacity(self) -> int:
        return 0 if self.k_store is None else next(iter(self.k_store.values())).shape[2]

    # ------------------------------------------------------------------ compressed storage
    def _slots(self, lo: int, hi: int) -> torch.Tensor | slice:
        """Storage slots of positions [lo, hi) (contiguous for full layers, modulo the ring otherwise)."""
        if self.is_sliding:
            return torch.arange(lo, hi, device=self.device) % self.ring_capacity
        return slice(lo - self.c_lo, hi - self.c_lo)

    def _write(self, k: torch.Tensor, v: torch.Tensor, pos0: int) -> None:
        """Compress tokens at positions [pos0, pos0 + n) and append them to the compressed part."""
        n = k.shape[-2]
        if n == 0:
            return
        if self.is_sliding:
            cap = self.ring_capacity
            if cap == 0:
                self.c_lo = self.c_hi = pos0 + n
                return
            if n > cap:  # older ones would be evicted at once: never encode them
                k, v, pos0, n = k[:, :, -cap:], v[:, :, -cap:], pos0 + n - cap, cap
            if self.k_store is None:
                self.k_store, self.v_store = self._alloc(self.k_codec, cap), self._alloc(self.v_codec, cap)
                self.c_lo = self.c_hi = pos0
        else:
            if self.k_store is None:
                self.c_lo = self.c_hi = pos0
            need = self.c_hi + n - self.c_lo
            if need > self.capacity:
                new_cap = max(_MIN_CAPACITY, self.capacity * 2, need)
                grown_k, grown_v = self._alloc(self.k_codec, new_cap), self._alloc(self.v_codec, new_cap)
                used = self.c_hi - self.c_lo
                if self.k_store is not None:
                    for store, grown in ((self.k_store, grown_k), (self.v_store, grown_v)):
                        for name in store:
                            grown[name][:, :, :used] = store[name][:, :, :used]
                self.k_store, self.v_store = grown_k, grown_v
        encode = None if self.is_sliding else _encode_kernel(self.device, self.k_codec, self.v_codec)
        if encode is not None:
            # Fused rotate + quantize + pack straight into the preallocated storage (GPU).
            start = pos0 - self.c_lo
            encode(self.k_codec, k, self.k_store, start)
            encode(self.v_codec, v, self.v_store, start)
            self.c_hi = pos0 + n
            return
        kp = self.k_codec.quantize(k, check=False)
        vp = self.v_codec.quantize(v, check=False)
        slots = self._slots(pos0, pos0 + n)
        for store, packed in ((self.k_store, kp), (self.v_store, vp)):
            for name, t in packed.fields.items():
                store[name][:, :, slots] = t
        self.c_hi = pos0 + n
        if self.is_sliding:
            self.c_lo = max(self.c_lo, self.c_hi - self.ring_capacity)

    def packed(self, kind: str = "k", n_slots: int | None = None) -> Packed:
        """The compressed part as a ``Packed`` over storage slots ``[0, n_slots)`` (fields ``[B, H, n, w]``)."""
        store, codec = (self.k_store, self.k_codec) if kind == "k" else (self.v_store, self.v_codec)
        n = self.n_slots if n_slots is None else n_slots
        return Packed(fields={k: t[:, :, :n] for k, t in store.items()}, dim=self.head_dim, dtype=self.dtype)

    @property
    def n_slots(self) -> int:
        """Storage slots the attention must scan: the used prefix of a full layer, the whole ring of a
        sliding layer (free ring slots have position -1 and are masked out)."""
        if self.k_store is None:
            return 0
        return self.ring_capacity if self.is_sliding else self.c_hi - self.c_lo

    @property
    def n_compressed(self) -> int:
        """Tokens currently held compressed."""
        return self.c_hi - self.c_lo if self.k_store is not None else 0

    def slot_positions(self) -> torch.Tensor | None:
        """Absolute position held by each used slot ``[n_slots]`` (-1 for a free slot); None for full layers."""
        if not self.is_sliding or self.k_store is None:
            return None
        cap = self.ring_capacity
        pos = torch.full((cap,), -1, dtype=torch.long, device=self.device)
        p = torch.arange(self.c_lo, self.c_hi, device=self.device)
        pos[p % cap] = p
        return pos[: self.n_slots]

    # ------------------------------------------------------------------ Cache API
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``[B, H, n, d]`` new keys/values; return what this step's attention reads.

        With handles (attention implementation ``"tqcache"``): ``(keys, values)`` are the full-precision
        tokens of this step (previous window + new) and ``keys._tqcache_step`` is the :class:`StepHandle`.
        Otherwise: dense ``[B, H, kv_length, d]`` keys/values aligned with transformers' attention mask.
        """
        handle = self._append(key_states, value_states)
        if self.return_handles:
            key = handle.fp_k.detach().view_as(handle.fp_k)  # a fresh tensor object to carry the handle
            key._tqcache_step = handle
            return key, handle.fp_v
        return self._dense(handle)

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> StepHandle:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.calibrating:
            # The previous step (the prompt) stayed full precision so its queries could be observed:
            # choose the codecs' channel handling now, then compress what overflows the window.
            self.finish_calibration()
        else:
            self.flush_pending()
        n_new = key_states.shape[-2]
        if n_new == 1:
            self.decoding = True
        # State before this step: what the attention of this step reads.
        handle = self._handle(
            torch.cat([self.win_k, key_states], dim=-2), torch.cat([self.win_v, value_states], dim=-2), n_new
        )
        self.cumulative_length += n_new
        self.win_k, self.win_v = handle.fp_k, handle.fp_v
        if self.compress and self._needs_calibration():
            self.calibrating = True  # keep this step full precision; finish_calibration() at the next one
            self._q_sq, self._q_count, self._q_sample = None, 0, None
            self._trim_sliding()
        else:
            self._settle(write=not self.is_sliding)
        return handle

    def _handle(self, fp_k: torch.Tensor, fp_v: torch.Tensor, n_new: int) -> StepHandle:
        """The current state as a step handle whose full-precision part is ``fp_k/fp_v`` (the window plus
        ``n_new`` tokens about to be appended)."""
        return StepHandle(
            layer=self,
            sink_k=self.sink_k,
            sink_v=self.sink_v,
            n_slots=self.n_slots,
            c_lo=self.c_lo,
            slot_pos=self.slot_positions(),
            fp_k=fp_k,
            fp_v=fp_v,
            fp_start=self.win_start,
            q_start=self.cumulative_length,
            kv_offset=self.get_mask_sizes(n_new)[1],
            sliding_window=self.sliding_window,
        )

    def _needs_calibration(self) -> bool:
        return any(getattr(c, "needs_calibration", False) and not c.is_calibrated() for c in (self.k_codec, self.v_codec))

    def observe_queries(self, query: torch.Tensor, scaling: float | None = None) -> None:
        """Record query statistics while calibration is pending (called by the attention function;
        ``query [B, Hq, Lq, d]``): per-KV-head second moments ``[H_kv, 1, d]`` and the last
        ``_Q_SAMPLE`` query rows of each KV head's group, used to check the scaling on real scores."""
        if not self.calibrating:
            return
        B, Hq, Lq, d = query.shape
        q = query.detach().float().reshape(B, self.heads, (Hq // self.heads) * Lq, d)
        sq = q.pow(2).sum(dim=(0, 2)).unsqueeze(1)
        self._q_sq = sq if self._q_sq is None else self._q_sq + sq
        self._q_count += B * q.shape[2]
        self._q_sample = q[:, :, -_Q_SAMPLE:]
        self._scaling = scaling if scaling is not None else d**-0.5

    def finish_calibration(self) -> None:
        """Calibrate the codecs on the full-precision tokens held so far (and the observed queries, if
        any), then compress what overflows the window.

        Query-aware key scaling is kept only where it helps: with observed queries, the attention
        distributions of the last prompt queries over the prompt's keys are compared (KL to exact) with and
        without the scaling, and the better one is kept for the layer.
        """
        if not self.calibrating:
            return
        q_sq = self._q_sq / self._q_count if self._q_count else None
        keys = torch.cat([t for t in (self.sink_k, self.win_k) if t is not None], -2)
        values = torch.cat([t for t in (self.sink_v, self.win_v) if t is not None], -2)
        kc = self.k_codec
        if getattr(kc, "needs_calibration", False):
            kc.calibrate(keys, q_sq)
            if getattr(kc, "use_channel_scale", False) and self._q_sample is not None:
                scaled = kc.channel_scale.clone()
                sample = keys[:, :, -_K_SAMPLE:]
                kl_scaled = _score_kl(kc, sample, self._q_sample, self._scaling)
                kc.channel_scale.fill_(1.0)
                kl_plain = _score_kl(kc, sample, self._q_sample, self._scaling)
                if kl_scaled < kl_plain:
                    kc.channel_scale.copy_(scaled)
                self.calibration_report = {"kl_plain": kl_plain, "kl_scaled": kl_scaled, "scaled": kl_scaled < kl_plain}
        if getattr(self.v_codec, "needs_calibration", False):
            self.v_codec.calibrate(values)
        self.calibrating, self._q_sq, self._q_count, self._q_sample = False, None, 0, None
        self._settle()

    def flush_pending(self) -> None:
        """Compress a sliding layer's pending overflow (the last step's): what the next ``update()`` does first.

        A sliding layer compresses a step's overflow only at the start of the next step, before that step's
        handle: writing it at the end of its own step would reuse the ring slot of the oldest token that the
        step's attention (which runs after ``update()`` returns) still sees. Between steps it is safe either way.
        """
        if self.is_sliding and self.is_initialized and not self.calibrating:
            self._settle()

    def _settle(self, write: bool = True) -> None:
        """Move window tokens where they belong: sinks first, overflow compressed (unless ``write`` is False:
        sliding layers defer it to the next step), sliding layers trimmed."""
        fp_k, fp_v, fp_start = self.win_k, self.win_v, self.win_start
        # 1) attention sinks come first, kept in full precision forever (not for sliding layers).
        want = self.cfg.sinks if (self.compress and not self.is_sliding) else 0
        if want and self.n_sinks < want and fp_start == self.n_sinks:
            take = min(want - self.n_sinks, fp_k.shape[-2])
            sk, sv = fp_k[:, :, :take], fp_v[:, :, :take]
            self.sink_k = sk if self.sink_k is None else torch.cat([self.sink_k, sk], -2)
            self.sink_v = sv if self.sink_v is None else torch.cat([self.sink_v, sv], -2)
            fp_k, fp_v, fp_start = fp_k[:, :, take:], fp_v[:, :, take:], fp_start + take
        # 2) what overflows the recent window is compressed (two-phase: only once decoding started).
        overflow = fp_k.shape[-2] - self.window if math.isfinite(self.window) else 0
        if self.cfg.two_phase and not self.decoding:
            overflow = 0
        # Once decoding, a full layer compresses its overflow `flush` tokens (or more) at a time: the steps in
        # between launch no encode (CacheConfig.flush). The first compression (a two-phase or calibrating prompt's
        # whole overflow) is not held back.
        least = self.cfg.flush if (self.decoding and not self.is_sliding and self.k_store is not None) else 1
        if overflow >= least and write:
            self._write(fp_k[:, :, :overflow], fp_v[:, :, :overflow], fp_start)
            fp_k, fp_v, fp_start = fp_k[:, :, overflow:], fp_v[:, :, overflow:], fp_start + overflow
        self.win_k, self.win_v, self.win_start = fp_k, fp_v, fp_start
        self._trim_sliding()

    def _trim_sliding(self) -> None:
        """Sliding layers keep at most ``sliding_window - 1`` tokens in all."""
        if self.is_sliding and self.win_k.shape[-2] > self.sliding_window - 1:
            drop = self.win_k.shape[-2] - (self.sliding_window - 1)
            self.win_k, self.win_v = self.win_k[:, :, drop:], self.win_v[:, :, drop:]
            self.win_start += drop

    def _dense(self, h: StepHandle) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense keys/values of a step (positions ``kv_offset ..``), for other attention implementations."""
        ks, vs = [], []
        if h.sink_k is not None:
            ks.append(h.sink_k)
            vs.append(h.sink_v)
        if h.n_slots:
            kp, vp = self.packed("k", h.n_slots), self.packed("v", h.n_slots)
            kd, vd = self.k_codec.dequantize(kp), self.v_codec.dequantize(vp)
            if h.slot_pos is not None:  # ring order -> position order, only positions still in view
                order = torch.argsort(h.slot_pos)
                order = order[h.slot_pos[order] >= h.kv_offset]
                kd, vd = kd[:, :, order], vd[:, :, order]
            ks.append(kd)
            vs.append(vd)
        ks.append(h.fp_k)
        vs.append(h.fp_v)
        k, v = torch.cat(ks, -2), torch.cat(vs, -2)
        if self.is_sliding:  # the mask's columns start at kv_offset
            first = h.fp_start - (k.shape[-2] - h.fp_k.shape[-2])
            k, v = k[:, :, h.kv_offset - first :], v[:, :, h.kv_offset - first :]
        return k, v

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if not self.is_sliding:
            return self.cumulative_length + query_length, 0
        w = self.sliding_window
        kv_offset = max(self.cumulative_length - w + 1, 0)
        kv_length = (w - 1 + query_length) if self.cumulative_length >= w else self.cumulative_length + query_length
        return kv_length, kv_offset

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return self.sliding_window if self.is_sliding else -1

    def reset(self) -> None:
        self._reset_state()
        self.is_initialized = False

    def _map_batch(self, fn) -> None:
        for name in ("sink_k", "sink_v", "win_k", "win_v"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))
        for store in (self.k_store, self.v_store):
            if store is not None:
                for k in list(store):
                    store[k] = fn(store[k])
        if self.win_k is not None:
            self.batch = self.win_k.shape[0]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._map_batch(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens (negative, transformers ≥ 5.15) or keep the first
        ``tokens_to_remove`` (positive, legacy). Removes from the window, then the compressed part, then sinks."""
        n = self.cumulative_length
        keep = tokens_to_remove if tokens_to_remove > 0 else n + tokens_to_remove
        if tokens_to_remove == 0 or keep >= n:
            return
        keep = max(keep, 0)
        if self.is_sliding and keep < self.c_lo and self.c_hi > self.c_lo:
            raise RuntimeError(
                f"cannot crop sliding-window layer {self.layer_idx} to {keep} tokens: tokens before position "
                f"{self.c_lo} were already evicted from its window"
            )
        win_keep = max(keep - self.win_start, 0)
        self.win_k, self.win_v = self.win_k[:, :, :win_keep], self.win_v[:, :, :win_keep]
        if keep < self.win_start:
            self.c_hi = max(min(self.c_hi, keep), self.c_lo)
            if self.c_hi == self.c_lo and self.c_hi > keep:
                self.c_lo = self.c_hi = keep
            if keep < self.n_sinks:
                self.sink_k, self.sink_v = self.sink_k[:, :, :keep], self.sink_v[:, :, :keep]
                self.c_lo = self.c_hi = keep
            self.win_start = keep
        self.cumulative_length = keep

    # ------------------------------------------------------------------ accounting
    def _fp_tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.sink_k, self.sink_v, self.win_k, self.win_v) if t is not None]

    def memory(self) -> dict[str, int]:
        comp_alloc = sum(t.numel() * t.element_size() for s in (self.k_store, self.v_store) if s for t in s.values())
        used = self.n_compressed
        comp_used = 0
        if used and self.k_store is not None:
            per_tok = sum(t[0, 0, 0].numel() * t.element_size() for s in (self.k_store, self.v_store) for t in s.values())
            comp_used = per_tok * used * self.batch * self.heads
        fp_bytes = sum(t.numel() * t.element_size() for t in self._fp_tensors())
        fp_tokens = sum(t.shape[-2] for t in (self.sink_k, self.win_k) if t is not None)
        return {
            "compressed_bytes": comp_alloc,
            "compressed_used_bytes": comp_used,
            "window_bytes": fp_bytes,
            "compressed_tokens": used,
            "fp_tokens": fp_tokens,
            "elements_per_token": 2 * getattr(self, "batch", 0) * getattr(self, "heads", 0) * getattr(self, "head_dim", 0),
        }


class TurboQuantCache(Cache):
    """A drop-in ``Cache`` for ``model.generate`` that stores keys/values with TurboQuant.

    Args:
        config: the model's config (``model.config``); layer count, per-layer types (sliding windows) and the
            attention implementation are read from it.
        scheme: a scheme string (``"turbo3.5"``, ``"k4v3"``, ``"affine4"``, ``"none"``, ...) or a
            :class:`~tqcache.config.CacheConfig`.
        dense: return dense keys/values from ``update`` (for attention implementations other than
            ``"tqcache"``). Default: True unless ``config._attn_implementation == "tqcache"``.

    Example::

        >>> cache = TurboQuantCache(model.config, "turbo4")                  # doctest: +SKIP
        >>> out = model.generate(ids, past_key_values=cache, max_new_tokens=32)  # doctest: +SKIP
        >>> cache.memory().compression_ratio                                  # doctest: +SKIP
    """

    def __init__(self, config, scheme: "str | CacheConfig" = "turbo4", *, dense: bool | None = None):
        self.cfg = parse_scheme(scheme)
        text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        n_layers = text_config.num_hidden_layers
        layer_types = getattr(text_config, "layer_types", None) or ["full_attention"] * n_layers
        if dense is None:
            dense = getattr(config, "_attn_implementation", None) != "tqcache"
        self.model_config = text_config
        layers = []
        for i, kind in enumerate(layer_types[:n_layers]):
            sliding = text_config.sliding_window if kind in ("sliding_attention", "chunked_attention") else None
            if kind not in ("full_attention", "sliding_attention"):
                raise ValueError(f"layer {i} has type {kind!r}; TurboQuantCache supports full and sliding attention")
            layers.append(
                TurboQuantLayer(
                    self.cfg,
                    i,
                    compress=not self.cfg.is_fp_layer(i, n_layers),
                    sliding_window=sliding,
                    return_handles=not dense,
                )
            )
        super().__init__(layers=layers)

    def __repr__(self) -> str:
        return f"TurboQuantCache(scheme={self.cfg.name!r}, layers={len(self.layers)})"

    # ---------------------------------------------------------------- accounting
    def memory(self) -> CacheMemory:
        """Exact byte accounting (see :class:`CacheMemory`)."""
        per = [layer.memory() for layer in self.layers if layer.is_initialized]
        comp = sum(p["compressed_bytes"] for p in per)
        comp_used = sum(p["compressed_used_bytes"] for p in per)
        win = sum(p["window_bytes"] for p in per)
        comp_el = sum(p["compressed_tokens"] * p["elements_per_token"] for p in per)
        fp_el = sum(p["fp_tokens"] * p["elements_per_token"] for p in per)
        total = comp + win
        return CacheMemory(
            total_bytes=total,
            compressed_bytes=comp,
            compressed_used_bytes=comp_used,
            window_bytes=win,
            fp16_bytes=2 * (comp_el + fp_el),
            compressed_tokens=sum(p["compressed_tokens"] for p in per),
            fp_tokens=sum(p["fp_tokens"] for p in per),
            bits_per_element=8.0 * comp_used / comp_el if comp_el else float("nan"),
            bits_per_element_total=8.0 * total / (comp_el + fp_el) if (comp_el + fp_el) else float("nan"),
        )

    def nbytes(self) -> int:
        """Bytes allocated by the cache (compressed storage with spare capacity, windows, sinks)."""
        return self.memory().total_bytes

    def bits_per_element(self) -> float:
        """Bits per cached element of the compressed part (every norm, scale and sign counted)."""
        return self.memory().bits_per_element

    def fp16_nbytes(self) -> int:
        """Bytes an fp16 ``DynamicCache`` would need for the same tokens."""
        return self.memory().fp16_bytes

    # ---------------------------------------------------------------- conversion
    @classmethod
    def from_dynamic(cls, cache: Cache, config, scheme: "str | CacheConfig" = "turbo4", **kw) -> Any:
        """Compress a ``DynamicCache`` (or a cache nesting caches, e.g. ``EncoderDecoderCache``)."""
        inner = [(name, getattr(cache, name)) for name in ("self_attention_cache", "cross_attention_cache") if hasattr(cache, name)]
        if inner:
            return type(cache)(*(cls.from_dynamic(c, config, scheme, **kw) for _, c in inner))
        new = cls(config, scheme, **kw)
        for i, layer in enumerate(cache.layers):
            if layer.keys is None or not getattr(layer, "is_initialized", True) or layer.keys.numel() == 0:
                continue
            target = new.layers[i]
            total = layer.get_seq_length()
            stored = layer.keys.shape[-2]
            # A sliding layer stores only its last tokens: start the positions where they start.
            target.lazy_initialization(layer.keys, layer.values)
            target.cumulative_length = target.win_start = target.c_lo = target.c_hi = total - stored
            target._append(layer.keys, layer.values)
            target.finish_calibration()  # no queries to observe here: calibrate on the keys alone
        return new

    def to_dynamic(self) -> DynamicCache:
        """Decompress into a ``DynamicCache`` (sliding layers become ``DynamicSlidingWindowLayer``)."""
        layers = []
        for layer in self.layers:
            dyn = DynamicSlidingWindowLayer(layer.sliding_window) if layer.is_sliding else DynamicLayer()
            if layer.is_initialized:
                h = layer._handle(layer.win_k, layer.win_v, 0)
                k, v = layer._dense(h)
                dyn.lazy_initialization(k, v)
                dyn.keys, dyn.values = k, v
                if layer.is_sliding:
                    dyn.cumulative_length = layer.cumulative_length
            layers.append(dyn)
        out = DynamicCache()
        out.layers = layers
        out.layer_class_to_replicate = None
        return out
