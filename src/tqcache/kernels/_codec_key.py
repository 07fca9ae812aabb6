"""One cache key for the per-codec constants the kernels derive on the host (matrices, tables, constexprs)."""

from __future__ import annotations


def codec_key(codec, device) -> tuple:
    """``(id, device, (data_ptr, version) of every buffer)``: any in-place change to a codec's state (calibration,
    ``load_state_dict``, an edited codebook) or a replaced buffer yields a new key, so derived constants are
    rebuilt instead of reused stale. Callers also check the cached entry's codec ``is`` this one (ids recycle)."""
    # The codecs keep their whole state in their own buffers (no submodules): reading ``_buffers`` directly is ~4×
    # cheaper than ``Module.buffers()``'s recursive generator, and this runs several times per decode step.
    bufs = codec.buffers() if codec._modules else (t for t in codec._buffers.values() if t is not None)
    return (id(codec), str(device), tuple((t.data_ptr(), t._version) for t in bufs))
