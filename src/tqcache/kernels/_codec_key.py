"""One cache key for the per-codec constants the kernels derive on the host (matrices, tables, constexprs), and the
cache those constants live in."""

from __future__ import annotations

import weakref


def codec_key(codec, device) -> tuple:
    """``(id, device, (data_ptr, version) of every buffer)``: any in-place change to a codec's state (calibration,
    ``load_state_dict``, an edited codebook) or a replaced buffer yields a new key, so derived constants are
    rebuilt instead of reused stale. Callers also check the cached entry's codec ``is`` this one (ids recycle)."""
    # The codecs keep their whole state in their own buffers (no submodules): reading ``_buffers`` directly is ~4×
    # cheaper than ``Module.buffers()``'s recursive generator, and this runs several times per decode step.
    bufs = codec.buffers() if codec._modules else (t for t in codec._buffers.values() if t is not None)
    return (id(codec), str(device), tuple((t.data_ptr(), t._version) for t in bufs))


def cached(cache: dict, key: tuple, codecs: tuple):
    """The constants ``cache`` holds under ``key`` (built from :func:`codec_key` of ``codecs``), or None. An entry
    counts only while its codecs are these very objects (ids recycle); it keeps none of them alive."""
    hit = cache.get(key)
    if hit is not None and all(r() is c for r, c in zip(hit[0], codecs)):
        return hit[1]
    return None


def remember(cache: dict, key: tuple, codecs: tuple, value, limit: int = 64):
    """Store ``value`` for :func:`cached`, emptying ``cache`` past ``limit`` entries (few codecs live at once);
    returns ``value``."""
    if len(cache) > limit:
        cache.clear()
    cache[key] = (tuple(weakref.ref(c) for c in codecs), value)
    return value
