"""Peer KV-cache quantizers measured beside TurboQuant by ``tqcache eval``.

The peers are ``transformers``' own quantized cache layers (KIVI-style: a full-precision *residual* of
recent tokens, the rest re-quantized group-wise every time the residual fills up):

=================  ===========================================================================
name               what it is
=================  ===========================================================================
``quanto4``        ``QuantoQuantizedLayer`` (optimum-quanto), 4-bit, group 64, residual 128
``quanto2``        same, 2-bit
``hqq4``           ``HQQQuantizedLayer`` (hqq), 4-bit, group 64, residual 128
``hqq2``           same, 2-bit
``quanto4-r0``     4-bit quanto with residual length 0 (every step re-quantizes: no fp16 window)
``hqq4-r0``        4-bit HQQ, residual length 0
``quanto4-a-1``    4-bit quanto, ``axis=-1`` (the other grouping axis)
``hqq4-a1``        4-bit HQQ, ``axis=1``
=================  ===========================================================================

Any ``<backend><bits>[-r<residual>][-a<axis>][-g<group>]`` parses, e.g. ``hqq3-r32-a1``. The
defaults are transformers' own (``q_group_size=64``, ``residual_length=128``, ``axis_key=axis_value=0``).

The cache is built from the layer classes directly rather than through ``QuantizedCache``, which refuses
models with sliding-window layers (Gemma-3). On such models every layer is a quantized full layer: the
attention mask still applies the sliding window (transformers builds the sliding mask from the layer's
``get_mask_sizes``, which spans the whole cache), so outputs are those of the real model; the layer just
keeps more tokens than it needs, which does not change bits per element.

Bits are counted from the stored objects: codes at ``nbits`` per element (both backends pack them) plus
every scale and zero-point at 16 bits (the dtype they have in fp16 inference; on a float32 CPU run they are
stored in float32 — we count what a GPU user would hold). The residual full-precision tokens are reported
separately, as the window.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re

__all__ = ["PeerSpec", "parse_peer", "is_peer", "peer_available", "make_peer_cache", "peer_memory", "DEFAULT_PEERS"]

DEFAULT_PEERS = ("quanto4", "quanto2", "hqq4", "hqq2", "quanto4-a-1", "hqq4-a1", "quanto4-r0", "hqq4-r0")

_PATTERN = re.compile(r"^(quanto|hqq)(\d)(?:-r(\d+))?(?:-a(-?\d))?(?:-g(\d+))?$")
_PACKAGES = {"quanto": "optimum.quanto", "hqq": "hqq"}
_PIP = {"quanto": "optimum-quanto", "hqq": "hqq"}


@dataclasses.dataclass(frozen=True)
class PeerSpec:
    """One peer configuration (see the module docstring for names)."""

    backend: str
    nbits: int
    residual_length: int = 128
    axis: int = 0
    q_group_size: int = 64
    name: str = ""


def is_peer(name: str) -> bool:
    return bool(_PATTERN.match(name.strip().lower()))


def parse_peer(name: str) -> PeerSpec:
    m = _PATTERN.match(name.strip().lower())
    if not m:
        raise ValueError(f"not a peer name: {name!r} (e.g. quanto4, hqq2, quanto4-r0, hqq4-r32-a1-g32)")
    backend, nbits = m[1], int(m[2])
    residual = int(m[3]) if m[3] is not None else 128
    axis = int(m[4]) if m[4] is not None else 0
    group = int(m[5]) if m[5] is not None else 64
    return PeerSpec(backend, nbits, residual, axis, group, name=name.strip().lower())


def peer_available(backend: str) -> str | None:
    """``None`` when the backend's package imports, else a one-line reason (with the install command)."""
    module = _PACKAGES[backend]
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        return f"{_PIP[backend]} is not installed (pip install {_PIP[backend]})"
    try:
        if backend == "quanto":
            import optimum.quanto  # noqa: F401
        else:
            from hqq.core.quantize import Quantizer  # noqa: F401
    except Exception as e:  # a broken install: report it, do not crash the whole table
        return f"{_PIP[backend]} does not import: {type(e).__name__}: {e}"
    return None


def make_peer_cache(model_config, spec: "PeerSpec | str"):
    """A transformers ``Cache`` whose every layer is the peer's quantized layer.

    Args:
        model_config: ``model.config`` (the text config is taken from it).
        spec: a :class:`PeerSpec` or a peer name.
    """
    from transformers.cache_utils import Cache, HQQQuantizedLayer, QuantoQuantizedLayer

    spec = parse_peer(spec) if isinstance(spec, str) else spec
    why = peer_available(spec.backend)
    if why:
        raise RuntimeError(f"peer {spec.name or spec.backend}: {why}")
    cls = QuantoQuantizedLayer if spec.backend == "quanto" else HQQQuantizedLayer
    cfg = model_config.get_text_config(decoder=True) if hasattr(model_config, "get_text_config") else model_config
    layers = [
        cls(spec.nbits, spec.axis, spec.axis, spec.q_group_size, spec.residual_length)
        for _ in range(cfg.num_hidden_layers)
    ]
    return Cache(layers=layers)


def _qbits(q) -> tuple[int, int]:
    """(bits stored, elements represented) of one quantized tensor of either backend."""
    if isinstance(q, tuple):  # HQQ: (packed codes, meta)
        _, meta = q
        n = 1
        for s in meta["shape"]:
            n *= int(s)
        meta_bits = 16 * (meta["scale"].numel() + meta["zero"].numel())
        return n * int(meta["nbits"]) + meta_bits, n
    # optimum-quanto WeightQBitsTensor: codes packed at qtype bits, scale and shift per group
    n = q.numel()
    bits = q.qtype.bits
    meta_bits = 16 * (q._scale.numel() + q._shift.numel())
    return n * bits + meta_bits, n


@dataclasses.dataclass(frozen=True)
class PeerMemory:
    bits_per_element: float  # quantized part: codes + scales + zeros
    bits_per_element_total: float  # with the residual fp16 window
    window_tokens: float  # full-precision residual tokens per layer (mean over layers), at the end


def peer_memory(cache) -> PeerMemory:
    """Bits of a peer cache built by :func:`make_peer_cache`, counted from the stored tensors."""
    qbits = qel = fp_el = 0
    win = []
    for layer in cache.layers:
        if not getattr(layer, "is_initialized", False):
            continue
        for q in (layer._quantized_keys, layer._quantized_values):
            b, n = _qbits(q)
            qbits += b
            qel += n
        w = 0
        if layer.keys is not None and layer.keys.dim() == 4:
            w = layer.keys.shape[-2]
            fp_el += layer.keys.numel() + layer.values.numel()
        win.append(w)
    bpe = qbits / qel if qel else float("nan")
    total = (qbits + 16 * fp_el) / (qel + fp_el) if (qel + fp_el) else float("nan")
    return PeerMemory(bpe, total, sum(win) / len(win) if win else 0.0)
