"""Compressed KV caches on disk: save, load, reuse -- exact, versioned, checked (format: docs/persistence.md).

One file per cache, a plain safetensors file: the packed tensors (codes, norms, scales, signs of the used
slots only), the full-precision windows and sinks, and the codecs' data-dependent buffers; everything else is
JSON in the safetensors header's ``__metadata__`` (strings only)::

    __metadata__ = {
        "format":         "tqcache.kvcache",
        "format_version": "3",
        "meta":           "<JSON: scheme, config, seeds, per-layer state, codec identity hashes, model, token ids>",
        "sha256":         "<hex digest over format_version, meta and every tensor's name, dtype, shape and bytes>",
    }

Loading never unpickles anything (``safetensors.safe_open`` only). Every problem with a file -- missing,
not ours, truncated, corrupted, newer format, another model, another dtype -- raises :class:`CacheFileError`
(a ``ValueError``; the missing-file case is also a ``FileNotFoundError``) with a message naming the problem.
Saving writes a temp file in the target's directory, fsyncs it and renames it into place, so a failed or
interrupted save leaves any previous file untouched.

Example::

    >>> cache = TurboQuantCache(model.config, "turbo4")                          # doctest: +SKIP
    >>> model(ids, past_key_values=cache)                                         # doctest: +SKIP
    >>> save_cache(cache, "prompt.tqc", model=model, token_ids=ids)               # doctest: +SKIP
    >>> cache, meta = load_cache("prompt.tqc", model)                             # doctest: +SKIP
    >>> model.generate(full_ids, past_key_values=cache, max_new_tokens=32)        # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import secrets
import struct
import time
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as _st_save

from .cache import _MIN_CAPACITY, TurboQuantCache, TurboQuantLayer
from .codec import derive_seed
from .config import CacheConfig, CodecConfig

__all__ = [
    "CacheFileError",
    "CacheFileNotFoundError",
    "FORMAT",
    "FORMAT_VERSION",
    "import_dense",
    "load_cache",
    "prompt_cache_step",
    "save_cache",
]

FORMAT = "tqcache.kvcache"
# 3: 3-bit TurboQuant codes in units of 32 codes (codec.packing.pack_codes; 1 and 2 stored the dense stream,
#    codec.pack_bits). 2: TurboQuant codes sign-magnitude (codec.code_order; 1 stored sorted level indices).
FORMAT_VERSION = 3
# Codec buffers that depend on the data first seen (outlier split, channel scaling): saved exactly when the codec
# calibrates. Every other buffer (rotations, codebooks, QJL sketch; these too when the codec does not calibrate)
# is regenerated from the config and seed and checked against a stored SHA-256.
_DATA_DEPENDENT = ("perm", "channel_scale", "calibrated")
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header
_CHUNK = 1 << 20
_DTYPES = {str(dt).replace("torch.", ""): dt for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64,
                                                         torch.uint8, torch.int64, torch.bool)}

Migration = Callable[[dict, "dict[str, torch.Tensor]"], "tuple[dict, dict[str, torch.Tensor]]"]
# format version v -> function upgrading (meta, tensors) of a version-v file to version v + 1. Applied in
# order after the checksum of the file as written is verified (registered below, after _migrate).
_MIGRATIONS: dict[int, Migration] = {}


class CacheFileError(ValueError):
    """A cache file cannot be used: missing, not a tqcache file, damaged, too new, or made for another model."""


class CacheFileNotFoundError(CacheFileError, FileNotFoundError):
    """The cache file does not exist (both a :class:`CacheFileError` and a ``FileNotFoundError``)."""


# ================================================================================================== save
def save_cache(
    cache: TurboQuantCache,
    path: "str | os.PathLike",
    *,
    model: torch.nn.Module | None = None,
    token_ids: "torch.Tensor | list | None" = None,
    overwrite: bool = False,
    extra: dict | None = None,
) -> Path:
    """Write ``cache`` to ``path`` (one safetensors file; see docs/persistence.md).

    Args:
        cache: the :class:`~tqcache.TurboQuantCache` to save (left unchanged).
        path: target file. Written atomically: temp file in the same directory, fsync, rename.
        model: the model the cache belongs to; its fingerprint (:func:`tqcache.models.fingerprint`) is stored
            so that :func:`load_cache` refuses the file for any other model.
        token_ids: the tokens the cache holds, ``[T]`` or ``[B, T]`` with ``T == cache.get_seq_length()``;
            stored so a later prompt can be checked to start with them (prefix reuse).
        overwrite: replace an existing file (otherwise ``FileExistsError`` naming the path).
        extra: JSON-serializable user metadata stored under ``meta["extra"]``.

    Only the used slots of each compressed store are written, in position order, never the spare capacity.
    Returns the path written.
    """
    if not isinstance(cache, TurboQuantCache):
        raise TypeError(
            f"save_cache needs a TurboQuantCache, got {type(cache).__name__}; compress a DynamicCache first with "
            "TurboQuantCache.from_dynamic(cache, model.config, scheme)"
        )
    path = Path(path)
    _check_target(path, overwrite)
    for layer in cache.layers:
        # A layer still holding its prompt full precision for calibration calibrates now, exactly as its
        # next update() would (same tokens, same observed queries): the saved state is the one the cache
        # would continue from.
        if layer.is_initialized and layer.calibrating:
            layer.finish_calibration()
        layer.flush_pending()  # a sliding layer's last overflow, likewise (its next update() compresses it first)
    meta, tensors = _collect(cache, model, token_ids, extra)
    _atomic_write(path, _serialize(meta, tensors, FORMAT_VERSION), overwrite=overwrite)
    return path


def _collect(cache: TurboQuantCache, model, token_ids, extra) -> tuple[dict, dict[str, torch.Tensor]]:
    """The metadata dict and the tensors (CPU, contiguous, unshared) describing ``cache``."""
    from . import __version__

    cfg = cache.cfg
    tensors: dict[str, torch.Tensor] = {}
    layers = []
    for layer in cache.layers:
        layers.append(_collect_layer(layer, tensors))
    live = [lm for lm in layers if lm["initialized"]]
    seq_length = max((lm["cumulative_length"] for lm in live), default=0)
    ids = _token_ids_list(token_ids, seq_length, live[0]["batch"] if live else None)
    fingerprint = None
    if model is not None:
        from .models import fingerprint as _fingerprint

        fingerprint = _fingerprint(model)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "scheme": cfg.name,
        "config": dataclasses.asdict(cfg),
        "seeds": {
            "config": cfg.seed,
            "layers": [[lm["codecs"]["k"]["seed"], lm["codecs"]["v"]["seed"]] if lm.get("codecs") else None for lm in layers],
        },
        "model": {"structure": _structure(cache.model_config, cache.layers), "fingerprint": fingerprint},
        "dtype": live[0]["dtype"] if live else None,
        "batch_size": live[0]["batch"] if live else None,
        "seq_length": seq_length,
        "token_ids": ids,
        "layers": layers,
        "extra": extra or {},
    }
    return meta, tensors


def _collect_layer(layer: TurboQuantLayer, tensors: dict[str, torch.Tensor]) -> dict:
    i, p = layer.layer_idx, f"layers.{layer.layer_idx}."
    lm: dict[str, Any] = {
        "index": i,
        "type": "sliding" if layer.is_sliding else "full",
        "sliding_window": layer.sliding_window,
        "compress": layer.compress,
        "initialized": bool(layer.is_initialized),
    }
    if not layer.is_initialized:
        return lm
    lm.update(
        dtype=_dtype_name(layer.dtype),
        batch=layer.batch,
        heads=layer.heads,
        head_dim=layer.head_dim,
        cumulative_length=layer.cumulative_length,
        sinks=layer.n_sinks,
        win_start=layer.win_start,
        window_tokens=layer.win_k.shape[-2],
        c_lo=layer.c_lo,
        c_hi=layer.c_hi,
        has_store=layer.k_store is not None,
        ring_capacity=layer.ring_capacity,
        decoding=bool(layer.decoding),
    )
    tensors[p + "win_k"], tensors[p + "win_v"] = _cpu(layer.win_k), _cpu(layer.win_v)
    if layer.sink_k is not None:
        tensors[p + "sink_k"], tensors[p + "sink_v"] = _cpu(layer.sink_k), _cpu(layer.sink_v)
    if layer.k_store is not None:
        slots = _used_slots(layer, layer.k_store["codes"].device)
        for kind, store in (("k", layer.k_store), ("v", layer.v_store)):
            for name, t in store.items():
                tensors[f"{p}{kind}.{name}"] = _cpu(t[:, :, slots])
    if layer.k_codec is not None:
        lm["codecs"] = {}
        for kind, codec, role in (("k", layer.k_codec, 0), ("v", layer.v_codec, 1)):
            state, saved = codec.state_dict(), _data_dependent(codec)
            lm["codecs"][kind] = {
                "class": type(codec).__name__,
                "seed": derive_seed(layer.cfg.seed, i, role),
                "description": codec.extra_repr(),
                "fields": {n: [w, _dtype_name(dt)] for n, (w, dt) in codec.field_widths().items()},
                "identity": {n: _identity(t) for n, t in sorted(state.items()) if n not in saved},
            }
            for n in saved:
                tensors[f"{p}{kind}_codec.{n}"] = _cpu(state[n])
    return lm


def _data_dependent(codec) -> list[str]:
    """The codec buffers saved as tensors: the data-dependent ones, when the codec calibrates on data at all
    (otherwise they are fixed by the config, identity-hashed like the rotations)."""
    if not getattr(codec, "needs_calibration", False):
        return []
    state = codec.state_dict()
    return [n for n in _DATA_DEPENDENT if n in state]


def _used_slots(layer: TurboQuantLayer, device) -> "slice | torch.Tensor":
    """Storage slots of positions ``[c_lo, c_hi)`` in position order (a prefix, or ring slots ``pos % capacity``)."""
    if layer.is_sliding:
        return torch.arange(layer.c_lo, layer.c_hi, device=device) % layer.ring_capacity
    return slice(0, layer.c_hi - layer.c_lo)


def _structure(text_config, layers) -> dict:
    """The model shape the cache depends on: layer count and types, sliding window, KV heads, head_dim."""
    heads = getattr(text_config, "num_attention_heads", None)
    head_dim = getattr(text_config, "head_dim", None)
    if head_dim is None and heads:
        head_dim = text_config.hidden_size // heads
    types = ["sliding_attention" if layer.is_sliding else "full_attention" for layer in layers]
    return {
        "num_hidden_layers": len(layers),
        "layer_types": types,
        "sliding_window": getattr(text_config, "sliding_window", None) if "sliding_attention" in types else None,
        "num_key_value_heads": getattr(text_config, "num_key_value_heads", heads),
        "head_dim": head_dim,
    }


def _token_ids_list(token_ids, seq_length: int, batch: int | None) -> list[list[int]] | None:
    if token_ids is None:
        return None
    t = torch.as_tensor(token_ids)
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2 or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"token_ids must be integer ids [T] or [B, T], got {tuple(t.shape)} {t.dtype}")
    if t.shape[1] != seq_length or (batch is not None and t.shape[0] != batch):
        raise ValueError(
            f"token_ids has shape {tuple(t.shape)} but the cache holds {seq_length} tokens"
            + (f" for batch {batch}" if batch is not None else "")
        )
    return t.tolist()


def _serialize(meta: dict, tensors: dict[str, torch.Tensor], version: int) -> bytes:
    meta_json = json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=False)
    header = {
        "format": FORMAT,
        "format_version": str(version),
        "meta": meta_json,
        "sha256": _checksum(str(version), meta_json, tensors),
    }
    return _st_save(tensors, metadata=header)


def _checksum(version: str, meta_json: str, tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the format version, the metadata JSON and every tensor (name, dtype, shape, bytes),
    each item length-prefixed so no two different contents hash the same stream."""
    h = hashlib.sha256()

    def item(b) -> None:
        h.update(struct.pack("<Q", memoryview(b).nbytes))
        h.update(b)

    item(FORMAT.encode())
    item(version.encode())
    item(meta_json.encode())
    for name in sorted(tensors):
        t = tensors[name]
        item(name.encode())
        item(f"{_dtype_name(t.dtype)}{list(t.shape)}".encode())
        item(_raw_bytes(t))
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- safe writes
def _check_target(path: Path, overwrite: bool) -> None:
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give a file path to save the cache to")
    if not overwrite and path.exists():
        raise _exists(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot save the cache to {path}: directory {path.parent} does not exist")


def _exists(path: Path) -> FileExistsError:
    return FileExistsError(f"{path} already exists; pass overwrite=True (CLI: --overwrite) to replace it")


def _write_all(f, data: bytes) -> None:
    """Write ``data`` to the open file ``f`` in 1 MiB chunks (the piece tests interrupt)."""
    view = memoryview(data)
    for start in range(0, len(view), _CHUNK):
        f.write(view[start : start + _CHUNK])


def _atomic_write(path: Path, data: bytes, *, overwrite: bool) -> None:
    """Write ``data`` to a temp file beside ``path``, fsync it, then rename it into place.

    Without ``overwrite`` the rename is a hard link, which fails atomically if ``path`` appeared meanwhile.
    Whatever happens (an exception, Ctrl-C), the temp file is removed and a previous ``path`` is untouched.
    """
    _check_target(path, overwrite)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            _write_all(f, data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise _exists(path) from None
            except OSError:  # no hard links on this filesystem: check, then rename (a tiny race remains)
                if path.exists():
                    raise _exists(path) from None
                os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ================================================================================================== load
def load_cache(
    path: "str | os.PathLike",
    model: torch.nn.Module | None = None,
    *,
    device: "str | torch.device | None" = None,
    dense: bool | None = None,
) -> tuple[TurboQuantCache, dict]:
    """Read a cache written by :func:`save_cache`; returns ``(cache, meta)``.

    Args:
        path: the file.
        model: the model the cache will be used with. Its structure (layers, types, KV heads, head_dim), dtype
            and fingerprint must match the file's; the cache is built from ``model.config``. Without a model the
            cache is built from the structure stored in the file and no model check is made.
        device: where the tensors go (default: the model's device, else CPU).
        dense: passed to :class:`~tqcache.TurboQuantCache` (default: decided by the model's attention
            implementation; dense without a model, which is correct with any attention implementation).

    ``meta`` is the file's metadata (after migration to the current format): ``scheme``, ``config``,
    ``token_ids`` (``[[int]]`` or None), ``model``, ``layers``, ``extra``, ... (docs/persistence.md).

    Raises:
        CacheFileError: for every problem with the file, with a message naming it (missing:
            :class:`CacheFileNotFoundError`, also a ``FileNotFoundError``).
    """
    path = Path(path)
    version, meta, tensors = _read_verified(path)
    meta, tensors = _migrate(path, version, meta, tensors)
    return _rebuild(path, meta, tensors, model, device, dense), meta


def _read_verified(path: Path) -> tuple[int, dict, dict[str, torch.Tensor]]:
    """Header checks, version check, tensors, checksum: ``(version, meta, tensors)`` of an intact file."""
    if not path.exists():
        raise CacheFileNotFoundError(f"cache file {path} does not exist")
    if path.is_dir():
        raise CacheFileError(f"{path} is a directory, not a tqcache cache file")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            raw = f.read(n) if 0 < n <= min(_MAX_HEADER, size - 8) else None
    except OSError as e:
        raise CacheFileError(f"cannot read cache file {path}: {e}") from e
    if raw is None or len(raw) != n:
        raise CacheFileError(
            f"{path} is not a tqcache cache file, or it is truncated: {size} bytes, "
            + (f"the header length field says {n}" if n >= 0 else "too short for a safetensors header")
        )
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CacheFileError(f"{path} is not a tqcache cache file, or its header is corrupted (not a JSON header)") from None
    md = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(md, dict) or md.get("format") != FORMAT:
        found = md.get("format") if isinstance(md, dict) else None
        raise CacheFileError(
            f"{path} is not a tqcache cache file (or its header is corrupted): expected format {FORMAT!r} in the "
            f"safetensors metadata, found {found!r}"
        )
    try:
        version = int(md.get("format_version"))
    except (TypeError, ValueError):
        raise CacheFileError(f"{path}: unreadable format version {md.get('format_version')!r} (corrupted header)") from None
    if version > FORMAT_VERSION:
        raise CacheFileError(
            f"{path} uses cache format version {version} (written by tqcache {_library_version(md)}); this tqcache "
            f"({_our_version()}) reads format versions up to {FORMAT_VERSION}: upgrade tqcache to load it"
        )
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            md = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # noqa: BLE001 -- the boundary with safetensors' parser, whose errors share no base
        # class beyond Exception (SafetensorError, and TypeError/KeyError/ValueError for odd dtypes or shapes).
        raise CacheFileError(f"{path} is truncated or corrupted: {type(e).__name__}: {e}") from e
    version_str, meta_json, stored = md.get("format_version"), md.get("meta"), md.get("sha256")
    if not all(isinstance(x, str) for x in (version_str, meta_json, stored)) or str(version) != version_str.strip():
        raise CacheFileError(f"{path} is corrupted: its tqcache metadata is incomplete")
    if _checksum(version_str, meta_json, tensors) != stored:
        raise CacheFileError(
            f"{path} is corrupted or truncated: its sha256 checksum does not match its content "
            "(the file changed after it was written; save the cache again)"
        )
    try:
        meta = json.loads(meta_json)
    except ValueError as e:
        raise CacheFileError(f"{path}: its metadata is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise CacheFileError(f"{path}: its metadata is not a JSON object")
    return version, meta, tensors


def _migrate(path: Path, version: int, meta: dict, tensors: dict) -> tuple[dict, dict]:
    """Upgrade a verified file of an older format version to the current one, one version at a time."""
    while version < FORMAT_VERSION:
        step = _MIGRATIONS.get(version)
        if step is None:
            raise CacheFileError(
                f"{path} uses cache format version {version}, which this tqcache ({_our_version()}) cannot migrate "
                f"(it reads versions {min([FORMAT_VERSION, *_MIGRATIONS])}..{FORMAT_VERSION})"
            )
        try:
            meta, tensors = step(meta, tensors)
        except CacheFileError:
            raise
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise CacheFileError(f"{path}: migrating format version {version} to {version + 1} failed: {e!r}") from e
        version += 1
        meta["format_version"] = version
    return meta, tensors


def _map_code_segments(meta: dict, tensors: dict, fn) -> tuple[dict, dict]:
    """Replace each compressed layer's TurboQuant key and value code bytes, segment by segment (the segments follow
    from the file's config and head_dim), by ``fn(bytes [..., w], channels, bits)``; everything else unchanged."""
    from .codec import packed_width, segments_for

    cfg = _config_from_dict(meta["config"])
    for lm in meta["layers"]:
        if not lm.get("initialized") or not lm.get("has_store"):
            continue
        for kind, ccfg in (("k", cfg.key), ("v", cfg.value)):
            name = f"layers.{lm['index']}.{kind}.codes"
            if ccfg.kind != "turbo" or name not in tensors:
                continue
            codes, parts, byte = tensors[name], [], 0
            for d_s, b_s in segments_for(int(lm["head_dim"]), ccfg.bits - 1 if ccfg.qjl else ccfg.bits):
                w = packed_width(d_s, b_s)
                parts.append(fn(codes[..., byte : byte + w], d_s, b_s))
                byte += w
            if byte != codes.shape[-1]:
                raise CacheFileError(f"layer {lm['index']}: {name} holds {codes.shape[-1]} bytes per token, its "
                                     f"codec {byte}")
            tensors[name] = torch.cat(parts, -1)
    return meta, tensors


def _codes_to_sign_magnitude(meta: dict, tensors: dict) -> tuple[dict, dict]:
    """Version 1 -> 2: TurboQuant codes were sorted level indices; version 2 stores them sign-magnitude
    (:func:`tqcache.codec.code_order`, its own inverse). Each segment's codes are mapped in place in the packed
    stream (:func:`tqcache.codec.code_order_packed`: ~20–80 ms per 32K-token layer); nothing else changes, so the
    loaded cache decodes exactly as the version-1 file did."""
    from .codec import code_order_packed

    return _map_code_segments(meta, tensors, lambda seg, d_s, b_s: code_order_packed(seg, b_s))


_MIGRATIONS[1] = _codes_to_sign_magnitude


def _codes_to_3bit_units(meta: dict, tensors: dict) -> tuple[dict, dict]:
    """Version 2 -> 3: TurboQuant codes of 3-bit segments were the dense LSB-first stream
    (:func:`tqcache.codec.pack_bits`); version 3 stores them in units of 32 codes (12 bytes: words W0, W1, H;
    :func:`tqcache.codec.packing.pack_codes`), any remaining codes after the units still dense. Each 3-bit
    segment is repacked (:func:`_dense3_to_units`, ~0.4–0.5 s per 32K-token layer of 8 KV heads at d = 128 on a
    CPU core, where unpacking and ``pack_codes`` took ~7 s); other segments, and everything else, are unchanged,
    so the loaded cache decodes exactly as the version-2 file did."""
    return _map_code_segments(meta, tensors, lambda seg, d_s, b_s: _dense3_to_units(seg, d_s) if b_s == 3 else seg)


def _dense3_to_units(seg: torch.Tensor, n: int) -> torch.Tensor:
    """``pack_codes(unpack_bits(seg, 3, n), 3)`` without unpacking: uint8 ``[..., 3n/8]`` rows of 3-bit codes in
    the dense stream -> the same codes in units of 32 (``codec/packing.py``). Each unit's 12 dense bytes are four
    24-bit groups of 8 codes; group q's codes are spread into the nibbles of one int32, whose low two bits per
    nibble go to ``W_{q div 2}`` (shifted by ``2(q mod 2)``) and whose top bits to ``H`` (at bit ``(2, 3, 0, 1)[q]``
    of each nibble). Codes after the last whole unit stay as they are (dense in both versions)."""
    u = n // 32
    if u == 0:
        return seg
    lead = seg.shape[:-1]
    g = seg[..., : 12 * u].to(torch.int32).reshape(*lead, u, 4, 3)
    group = g[..., 0] | (g[..., 1] << 8) | (g[..., 2] << 16)  # [..., u, 4]: 8 dense codes each
    nib = torch.zeros_like(group)
    for j in range(8):
        nib |= ((group >> (3 * j)) & 7) << (4 * j)  # code j -> nibble j (int32 bit patterns; bit 31 may be set)
    lo, hi = nib & 0x33333333, (nib >> 2) & 0x11111111
    words = torch.stack([lo[..., 0] | (lo[..., 1] << 2), lo[..., 2] | (lo[..., 3] << 2),
                         (hi[..., 0] << 2) | (hi[..., 1] << 3) | hi[..., 2] | (hi[..., 3] << 1)], -1)
    units = ((words[..., None] >> torch.tensor([0, 8, 16, 24], dtype=torch.int32, device=seg.device)) & 0xFF).to(torch.uint8)
    units = units.reshape(*lead, 12 * u)  # little-endian words, written out byte by byte
    return torch.cat([units, seg[..., 12 * u :]], -1) if n % 32 else units


_MIGRATIONS[2] = _codes_to_3bit_units


def _rebuild(path: Path, meta: dict, tensors: dict, model, device, dense) -> TurboQuantCache:
    try:
        cfg = _config_from_dict(meta["config"])
        layers_meta = meta["layers"]
        config = model.config if model is not None else _bare_config(meta["model"]["structure"])
        cache = TurboQuantCache(config, cfg, dense=dense)
        if model is not None:
            _check_model(path, meta, model, cache)
        if device is None:
            device = _model_device(model) if model is not None else torch.device("cpu")
        device = torch.device(device)
        if len(cache.layers) != len(layers_meta):
            raise CacheFileError(f"{path}: the file has {len(layers_meta)} layers, the model {len(cache.layers)}")
        for layer, lm in zip(cache.layers, layers_meta):
            _restore_layer(path, layer, lm, tensors, device)
        return cache
    except CacheFileError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
        # The checksum matched, so the file is as written; a writer other than save_cache made it inconsistent.
        raise CacheFileError(f"{path}: malformed cache metadata ({type(e).__name__}: {e})") from e


def _config_from_dict(d: dict) -> CacheConfig:
    d = dict(d)
    known = {f.name for f in dataclasses.fields(CacheConfig)}
    codec_known = {f.name for f in dataclasses.fields(CodecConfig)}
    unknown = set(d) - known
    for kind in ("key", "value"):
        unknown |= {f"{kind}.{k}" for k in set(d.get(kind) or {}) - codec_known}
    if unknown:
        raise CacheFileError(
            f"the file's cache config has fields this tqcache ({_our_version()}) does not know: "
            f"{', '.join(sorted(unknown))}; upgrade tqcache to load it"
        )
    d["key"], d["value"] = CodecConfig(**d["key"]), CodecConfig(**d["value"])
    d["fp_layers"] = tuple(d.get("fp_layers", ()))
    return CacheConfig(**d)


def _bare_config(structure: dict):
    from transformers import PretrainedConfig

    return PretrainedConfig(
        num_hidden_layers=structure["num_hidden_layers"],
        layer_types=list(structure["layer_types"]),
        sliding_window=structure.get("sliding_window"),
        num_key_value_heads=structure.get("num_key_value_heads"),
        head_dim=structure.get("head_dim"),
    )


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _model_dtype(model) -> torch.dtype | None:
    try:
        return next(model.parameters()).dtype
    except (StopIteration, AttributeError):
        return None


def _short(v: Any, n: int = 70) -> str:
    s = repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def _check_model(path: Path, meta: dict, model, cache: TurboQuantCache) -> None:
    """Refuse a file made for another model: structure first, then dtype and the fingerprint."""
    want = meta["model"]["structure"]
    have = _structure(cache.model_config, cache.layers)
    diffs = [k for k in want if want[k] != have.get(k)]
    if diffs:
        raise CacheFileError(
            f"{path} was saved for a model of another shape: "
            + "; ".join(f"{k}: file {_short(want[k])}, model {_short(have.get(k))}" for k in diffs)
        )
    file_dtype, model_dtype = meta.get("dtype"), _model_dtype(model)
    if file_dtype is not None and model_dtype is not None and file_dtype != _dtype_name(model_dtype):
        raise CacheFileError(
            f"{path} holds a cache computed in {file_dtype}, but the model runs in {_dtype_name(model_dtype)}; "
            f"load the model in {file_dtype} (CLI: --dtype {file_dtype}) or save the cache again"
        )
    stored = meta["model"].get("fingerprint")
    if stored:
        from .models import fingerprint as _fingerprint

        now = _fingerprint(model)
        diffs = [k for k in sorted(set(stored) | set(now)) if stored.get(k) != now.get(k)]
        if diffs:
            raise CacheFileError(
                f"{path} was saved for a different model (fingerprint mismatch): "
                + "; ".join(f"{k}: file {_short(stored.get(k))}, model {_short(now.get(k))}" for k in diffs)
            )


def _restore_layer(path: Path, layer: TurboQuantLayer, lm: dict, tensors: dict, device: torch.device) -> None:
    i, p = layer.layer_idx, f"layers.{layer.layer_idx}."
    kind = "sliding" if layer.is_sliding else "full"
    if lm["type"] != kind or lm["sliding_window"] != layer.sliding_window or bool(lm["compress"]) != layer.compress:
        raise CacheFileError(
            f"{path}: layer {i} is {lm['type']} (window {lm['sliding_window']}, compressed {lm['compress']}) in the "
            f"file but {kind} (window {layer.sliding_window}, compressed {layer.compress}) here"
        )
    if not lm["initialized"]:
        return

    def get(name: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        t = tensors.get(p + name)
        if t is None:
            raise CacheFileError(f"{path}: tensor {p + name} is missing")
        if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
            raise CacheFileError(
                f"{path}: tensor {p + name} is {list(t.shape)} {_dtype_name(t.dtype)}, expected {list(shape)} "
                f"{_dtype_name(dtype)}"
            )
        return t.to(device)

    dtype = _DTYPES[lm["dtype"]]
    B, H, d = int(lm["batch"]), int(lm["heads"]), int(lm["head_dim"])
    layer.dtype, layer.device = dtype, device
    layer.batch, layer.heads, layer.head_dim = B, H, d
    W, S = int(lm["window_tokens"]), int(lm["sinks"])
    layer.win_k, layer.win_v = get("win_k", (B, H, W, d), dtype), get("win_v", (B, H, W, d), dtype)
    if S:
        layer.sink_k, layer.sink_v = get("sink_k", (B, H, S, d), dtype), get("sink_v", (B, H, S, d), dtype)
    layer.cumulative_length, layer.win_start = int(lm["cumulative_length"]), int(lm["win_start"])
    layer.c_lo, layer.c_hi, layer.decoding = int(lm["c_lo"]), int(lm["c_hi"]), bool(lm["decoding"])
    if lm["ring_capacity"] != layer.ring_capacity:
        raise CacheFileError(f"{path}: layer {i} ring capacity {lm['ring_capacity']} in the file, {layer.ring_capacity} here")
    if layer.compress:
        layer.k_codec, layer.v_codec = layer.build_codecs(d, H)
        for kind_, codec, what in (("k", layer.k_codec, "key"), ("v", layer.v_codec, "value")):
            _restore_codec(path, f"layer {i} {what} codec", codec, lm["codecs"][kind_], tensors, f"{p}{kind_}_codec.")
        layer.k_codec, layer.v_codec = layer.k_codec.to(device), layer.v_codec.to(device)
    if lm["has_store"]:
        if not layer.compress:
            raise CacheFileError(f"{path}: layer {i} is full precision but the file holds compressed tokens for it")
        n = layer.c_hi - layer.c_lo
        cap = layer.ring_capacity if layer.is_sliding else max(_MIN_CAPACITY, n)
        if n < 0 or n > cap:
            raise CacheFileError(f"{path}: layer {i} claims {n} compressed tokens in {cap} slots")
        layer.k_store, layer.v_store = layer._alloc(layer.k_codec, cap), layer._alloc(layer.v_codec, cap)
        slots = _used_slots(layer, device)
        for kind_, store, codec in (("k", layer.k_store, layer.k_codec), ("v", layer.v_store, layer.v_codec)):
            for name, (w, dt) in codec.field_widths().items():
                store[name][:, :, slots] = get(f"{kind_}.{name}", (B, H, n, w), dt)
    layer.is_initialized = True


def _restore_codec(path: Path, where: str, codec, cm: dict, tensors: dict, prefix: str) -> None:
    """Check the regenerated codec is the one the file's codes were made with; load its data-dependent buffers."""
    widths = {n: [w, _dtype_name(dt)] for n, (w, dt) in codec.field_widths().items()}
    if widths != cm["fields"]:
        raise CacheFileError(f"{path}: {where} stores fields {cm['fields']}, this tqcache builds {widths}")
    state, saved = codec.state_dict(), _data_dependent(codec)
    have = {n: _identity(t) for n, t in state.items() if n not in saved}
    differ = sorted(n for n in set(have) | set(cm["identity"]) if have.get(n) != cm["identity"].get(n))
    if differ:
        raise CacheFileError(
            f"{path}: {where}: {', '.join(differ)} regenerated from seed {cm['seed']} differ from the file's "
            f"(rotations/codebooks changed between the tqcache that wrote the file and this one, {_our_version()}); "
            "the codes cannot be decoded here -- use the tqcache version that wrote the file, or save it again"
        )
    for n in saved:
        t, buf = tensors.get(prefix + n), getattr(codec, n)
        if t is None or t.shape != buf.shape or t.dtype != buf.dtype:
            raise CacheFileError(f"{path}: {where}: buffer {prefix + n} is missing or has the wrong shape/dtype")
        buf.copy_(t)


# ================================================================================================== dense import
def import_dense(
    in_path: "str | os.PathLike",
    out_path: "str | os.PathLike",
    config,
    scheme: "str | CacheConfig" = "turbo4",
    *,
    model: torch.nn.Module | None = None,
    token_ids=None,
    overwrite: bool = False,
) -> Path:
    """Compress a dense KV cache saved as safetensors into a tqcache file.

    ``in_path`` holds ``layers.{i}.keys`` and ``layers.{i}.values``, ``[B, H_kv, T_i, head_dim]`` float tensors for
    every layer ``i`` of the model (a sliding-window layer may hold only its last tokens), optionally
    ``token_ids`` ``[B, T]`` (int) and the string metadata ``seq_length`` (tokens seen; default: the longest
    layer). ``config`` is the model's config, or the model itself (its fingerprint is then stored too).
    Compression goes through :meth:`TurboQuantCache.from_dynamic`. Returns ``out_path``.
    """
    from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

    if isinstance(config, torch.nn.Module):
        model, config = config, config.config
    in_path = Path(in_path)
    _check_target(Path(out_path), overwrite)
    probe = TurboQuantCache(config, "none", dense=True)
    structure = _structure(probe.model_config, probe.layers)
    dense, md = _read_dense(in_path)
    n_layers = len(probe.layers)
    names = {f"layers.{i}.{kv}" for i in range(n_layers) for kv in ("keys", "values")}
    missing = sorted(names - set(dense), key=_natural)
    unknown = sorted(set(dense) - names - {"token_ids"}, key=_natural)
    if missing or unknown:
        raise ValueError(
            f"{in_path}: expected tensors layers.{{i}}.keys / layers.{{i}}.values for i = 0..{n_layers - 1}"
            + (f"; missing: {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}" if missing else "")
            + (f"; unexpected: {', '.join(unknown[:6])}{' ...' if len(unknown) > 6 else ''}" if unknown else "")
        )
    H, d = structure["num_key_value_heads"], structure["head_dim"]
    first = dense["layers.0.keys"]
    lengths = []
    for i in range(n_layers):
        k, v = dense[f"layers.{i}.keys"], dense[f"layers.{i}.values"]
        for name, t in ((f"layers.{i}.keys", k), (f"layers.{i}.values", v)):
            if t.dim() != 4 or t.shape[0] != first.shape[0] or t.shape[1] != H or t.shape[3] != d:
                raise ValueError(
                    f"{in_path}: {name} is {list(t.shape)}; expected [B, {H}, T, {d}] (B = {first.shape[0]}, "
                    f"num_key_value_heads = {H}, head_dim = {d})"
                )
            if not t.is_floating_point() or t.dtype != first.dtype:
                raise ValueError(f"{in_path}: {name} is {t.dtype}; every tensor must share one float dtype ({first.dtype})")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{in_path}: {name} holds NaN/inf values")
        if k.shape != v.shape:
            raise ValueError(f"{in_path}: layers.{i}.keys {list(k.shape)} and layers.{i}.values {list(v.shape)} differ")
        lengths.append(k.shape[2])
    full = [n for n, layer in zip(lengths, probe.layers) if not layer.is_sliding]
    if len(set(full)) > 1:
        raise ValueError(f"{in_path}: full-attention layers hold different token counts: {sorted(set(full))}")
    try:
        total = int(md["seq_length"]) if "seq_length" in md else max(lengths)
    except ValueError:
        raise ValueError(f"{in_path}: metadata seq_length={md['seq_length']!r} is not an integer") from None
    if total < max(lengths) or (full and full[0] != total):
        raise ValueError(f"{in_path}: seq_length {total} does not match the layers' token counts {sorted(set(lengths))}")
    dyn = DynamicCache()
    dyn.layers = []
    for i, layer in enumerate(probe.layers):
        k, v = dense[f"layers.{i}.keys"], dense[f"layers.{i}.values"]
        dl = DynamicSlidingWindowLayer(layer.sliding_window) if layer.is_sliding else DynamicLayer()
        dl.lazy_initialization(k, v)
        dl.keys, dl.values = k, v
        if layer.is_sliding:
            dl.cumulative_length = total
        dyn.layers.append(dl)
    cache = TurboQuantCache.from_dynamic(dyn, config, scheme, dense=True)
    if token_ids is None and "token_ids" in dense:
        token_ids = dense["token_ids"]
    return save_cache(cache, out_path, model=model, token_ids=token_ids, overwrite=overwrite,
                      extra={"imported_from": in_path.name})


def _read_dense(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"dense cache file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {name: f.get_tensor(name) for name in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError, RuntimeError, TypeError) as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e


def _natural(name: str):
    return [int(s) if s.isdigit() else s for s in name.replace(".", " ").split()]


# ================================================================================================== prompt cache
def prompt_cache_step(args, model, tokenizer, ids: torch.Tensor, cache: TurboQuantCache):
    """``tqcache generate --prompt-cache FILE [--save-prompt-cache] [--overwrite]``: returns ``(ids, cache, note)``.

    The prompt's last token is always left for ``generate`` (it yields the first new token), so the cached
    prefix is at most ``ids[:, :-1]``. If FILE exists and holds a prefix of the prompt for this model and scheme,
    its cache is loaded and used. The rest of the prompt up to its last token is then prefilled here (also when
    nothing is reused), and with ``--save-prompt-cache`` the result is written to FILE. ``ids`` comes back
    unchanged: ``generate`` sees a cache of ``P - 1`` tokens and prefills only the last one. So every run with
    ``--prompt-cache`` on a prompt computes exactly the same thing whether the file is reused, written or absent.
    ``note`` is the line the summary prints (tokens reused / saved, time saved, file size vs fp16).
    """
    path = Path(args.prompt_cache)
    save = bool(getattr(args, "save_prompt_cache", False))
    overwrite = bool(getattr(args, "overwrite", False))
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"--prompt-cache works with one prompt (batch 1), got ids of shape {tuple(ids.shape)}")
    target = ids.shape[1] - 1
    if target < 1:
        return ids, cache, f"the prompt ({ids.shape[1]} token) is too short to cache; {path} not used"
    notes: list[str] = []
    reused, saved_prefill, fp16_bytes = 0, None, None
    if path.exists():
        t0 = time.perf_counter()
        try:
            loaded, meta = load_cache(path, model, device=ids.device)
            if loaded.cfg.flush != cache.cfg.flush:  # it governs only the steps after the prompt: this run's applies
                cfg = dataclasses.replace(loaded.cfg, flush=cache.cfg.flush)
                loaded.cfg = cfg
                for layer in loaded.layers:
                    layer.cfg = cfg
            if loaded.cfg != cache.cfg:
                a, b = _flat(dataclasses.asdict(loaded.cfg)), _flat(dataclasses.asdict(cache.cfg))
                differ = ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in a if k != "name" and a[k] != b.get(k))
                raise CacheFileError(
                    f"{path} holds a {loaded.cfg.name!r} cache, this run uses {cache.cfg.name!r}"
                    f"{f' ({differ})' if differ else ''}: pass --scheme {loaded.cfg.name} to reuse it"
                )
        except CacheFileError as e:
            if not (save and overwrite):
                raise
            notes.append(f"{path} not reusable ({e}); replacing it")
            loaded = meta = None
        _sync(ids)
        load_s = time.perf_counter() - t0
        if loaded is not None:
            cached = (meta.get("token_ids") or [None])[0]
            if cached is None:
                notes.append(f"{path} holds no token ids; not reused")
            elif len(cached) > target or ids[0, : len(cached)].tolist() != cached:
                same = next((j for j, (a, b) in enumerate(zip(cached, ids[0].tolist())) if a != b), min(len(cached), target))
                notes.append(
                    f"{path} holds {len(cached)} tokens, not a prefix of this prompt's first {target} "
                    f"(they agree on {same}); not reused"
                )
            else:
                cache, reused = loaded, len(cached)
                fp16_bytes = cache.memory().fp16_bytes
                saved_prefill = (meta.get("extra") or {}).get("prefill_seconds")
                timing = f"loaded in {load_s:.3f} s"
                if isinstance(saved_prefill, (int, float)):
                    timing += f" vs {saved_prefill:.3f} s to prefill them when saved: {saved_prefill - load_s:.3f} s saved"
                notes.append(f"reused {reused} tokens from {path} ({timing})")
    elif not save:
        notes.append(f"{path} does not exist; nothing reused (add --save-prompt-cache to write it)")
    if save and reused == target:
        notes.append(f"{path} already holds this prefix; not rewritten")
    new_prefill = 0.0
    if reused < target:
        if save and path.exists() and not overwrite:
            raise FileExistsError(f"{path} already exists; pass --overwrite to replace it")
        t0 = time.perf_counter()
        with torch.no_grad():
            model(ids[:, reused:target], attention_mask=torch.ones_like(ids[:, :target]), past_key_values=cache,
                  use_cache=True)
        _sync(ids)
        new_prefill = time.perf_counter() - t0
        if reused:
            notes.append(f"prefilled {target - reused} more tokens in {new_prefill:.3f} s")
        if save:
            total_prefill = new_prefill + (saved_prefill if isinstance(saved_prefill, (int, float)) else 0.0)
            t0 = time.perf_counter()
            save_cache(cache, path, model=model, token_ids=ids[:, :target], overwrite=overwrite,
                       extra={"prefill_seconds": round(total_prefill, 6), "prefill_device": str(ids.device)})
            notes.append(f"saved {target} tokens to {path} in {time.perf_counter() - t0:.3f} s "
                         f"(their prefill took {total_prefill:.3f} s)")
            fp16_bytes = cache.memory().fp16_bytes
    if fp16_bytes is not None:  # the file's size against an fp16 DynamicCache of the same tokens
        size = path.stat().st_size
        ratio = f"{fp16_bytes / size:.1f}x smaller" if size <= fp16_bytes else f"{size / fp16_bytes:.1f}x larger"
        notes.append(f"file {size / 2**20:.2f} MiB vs {fp16_bytes / 2**20:.2f} MiB as an fp16 cache ({ratio})")
    return ids, cache, "; ".join(notes)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _sync(ids: torch.Tensor) -> None:
    if ids.is_cuda:
        torch.cuda.synchronize(ids.device)


# ================================================================================================== helpers
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _cpu(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy owning its storage (safetensors refuses tensors that share memory)."""
    return t.detach().to("cpu").clone(memory_format=torch.contiguous_format)


def _raw_bytes(t: torch.Tensor):
    """The tensor's bytes as a buffer (a uint8 numpy view of a contiguous CPU tensor, no extra copy on CPU)."""
    return t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()


def _identity(t: torch.Tensor) -> str:
    """First 16 hex digits of the SHA-256 of a buffer's dtype, shape and bytes: enough to tell two generated
    rotations/codebooks apart (an identity check, not a security one), at a quarter of the header space."""
    h = hashlib.sha256(f"{_dtype_name(t.dtype)}{list(t.shape)}".encode())
    h.update(_raw_bytes(t))
    return h.hexdigest()[:16]


def _our_version() -> str:
    from . import __version__

    return __version__


def _library_version(md: dict) -> str:
    try:
        return str(json.loads(md.get("meta", "{}")).get("library_version", "unknown"))
    except (ValueError, AttributeError):
        return "unknown"
