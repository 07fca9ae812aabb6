"""One cache key for the per-codec constants the kernels derive on the host (matrices, tables, constexprs)."""

from __future__ import annotations


def codec_key(codec, device) -> tuple:
    """``(id, device, (data_ptr, version) of every buffer)``: any in-place change to a codec's state (calibration,
    ``load_state_dict``, an edited codebook) or a replaced buffer yields a new key, so derived constants are
    rebuilt instead of reused stale. Callers also check the cached entry's codec ``is`` this one (ids recycle)."""
    return (id(codec), str(device), tuple((t.data_ptr(), t._version) for t in codec.buffers()))
