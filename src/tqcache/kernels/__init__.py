"""Triton kernels for TurboQuant caches, with a self-test on first use and a torch fallback.

Public surface::

    available(device) -> bool                  can Triton kernels run on this device at all
    attend(q, k_codec, k_packed, v_codec, v_packed, **kw) -> (out, lse)
                                               attend_packed's contract; kernel when it passed its probe
                                               (prefill chunks of ≥ PREFILL_MIN_ROWS query rows per KV head:
                                               decode the prefix once + flash attention, prefill.py)
    encode(codec, x, fields, start)            write codec.quantize(x) into preallocated fields at `start`
    attend_window(q, parts, out_c, lse_c, scale) -> out | None
                                               one-token decode: sinks + fp window + the compressed partial,
                                               merged, as the layer output [B, 1, Hq, d] (None: use torch)
    info() -> dict                             GPU, Triton version, probe results, launch configurations
    self_test(device, scheme) -> dict          run the probes now (``tqcache info --probe``)

Dispatch rules: CUDA tensors use the kernels when Triton imports, the GPU is sm_80+, the configuration is
covered (see ``attention.unsupported_reason``) and a small self-test against the torch reference passed for
this (device, configuration) — run once, on first use, result and reason recorded; a configuration includes the
call's compile-time layout (KV heads, group, which optional arguments it passes), which the probe runs, so the
kernels it compiles are the ones the call launches. CPU tensors always use
the torch reference unless ``TRITON_INTERPRET=1`` is set in the environment (tests), then the kernels run
in Triton's interpreter. Everything else runs the torch reference, and ``info()`` says why.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import threading
import weakref

import torch

from . import _launch
from ._launch import Plans

try:  # Triton is optional: without it every call takes the torch path.
    import triton  # noqa: F401

    from . import attention as _attn
    from . import encode as _enc
    from . import prefill as _pre
    from . import window as _win

    _IMPORT_ERROR = None
except Exception as e:  # pragma: no cover - depends on the environment
    _attn = _enc = _pre = _win = None
    _IMPORT_ERROR = f"{type(e).__name__}: {e}"

__all__ = ["available", "attend", "attend_window", "encode", "info", "self_test"]

_LOCK = threading.Lock()
_PROBES: dict[tuple, dict] = {}
_FALLBACKS: dict[str, int] = {}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(device) -> bool:
    """True when Triton kernels can run on ``device`` (a CUDA GPU of compute capability ≥ 8.0, or the CPU
    under ``TRITON_INTERPRET=1``)."""
    if _IMPORT_ERROR is not None:
        return False
    device = torch.device(device)
    if device.type == "cpu":
        return _interpreting()
    if device.type != "cuda" or _interpreting():
        return False
    return _cuda_major(device.index) >= 8


@functools.lru_cache(maxsize=16)
def _cuda_major(index) -> int:
    """Compute capability major of CUDA device ``index`` (None: the current one at first use), 0 without CUDA
    (cached: this runs on every decode step)."""
    return torch.cuda.get_device_capability(index)[0] if torch.cuda.is_available() else 0


def _why_unavailable(device) -> str:
    if _IMPORT_ERROR is not None:
        return f"triton not importable ({_IMPORT_ERROR})"
    device = torch.device(device)
    if device.type == "cpu":
        return "CPU tensors use the torch reference (set TRITON_INTERPRET=1 to run the kernels interpreted)"
    if device.type != "cuda":
        return f"no Triton backend for device {device}"
    if _interpreting():
        return "TRITON_INTERPRET=1 is set: kernels are interpreted, CUDA tensors use the torch reference"
    return "GPU older than sm_80"


def _codec_sig(c) -> tuple:
    return (type(c).__name__, getattr(c, "dim", None), tuple(getattr(c, "segments", ())), bool(getattr(c, "qjl", False)),
            getattr(c, "rotation_kind", None), bool(getattr(c, "norm_correction", True)),
            bool(getattr(c, "shared_norm", False)))  # the norm layout changes what the kernel reads


def _fallback(reason: str) -> None:
    _FALLBACKS[reason] = _FALLBACKS.get(reason, 0) + 1


# ---------------------------------------------------------------------------------------------- probes
def _random_packed(codec, B, H, T, device, gen):
    """A valid random packed state (any code byte is valid; norms positive) without touching the codec."""
    fields = {}
    for name, (w, dt) in codec.field_widths().items():
        if dt == torch.uint8:
            fields[name] = torch.randint(0, 256, (B, H, T, w), generator=gen, dtype=torch.uint8).to(device)
        else:
            fields[name] = (torch.rand(B, H, T, w, generator=gen) * 2 + 0.1).to(dt).to(device)
    from ..codec.base import Packed

    return Packed(fields=fields, dim=codec.dim, dtype=torch.float32)


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _verdict(out, lse, ref, rlse, dtype) -> tuple[bool, str]:
    """An attention probe's pass/fail against the torch reference: relative output error and |Δlse| within the
    tolerance of the query dtype."""
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    e_out, e_lse = _rel(out, ref), float((lse - rlse).abs().max())
    ok = bool(torch.isfinite(out).all()) and e_out <= tol and e_lse <= 50 * tol
    return ok, f"rel err out {e_out:.2e}, max |Δlse| {e_lse:.2e} (tol {tol:g})"


_LAYOUT_ARGS = ("kv_start", "kv_end", "q_pos", "window")  # the optional arguments that are constexpr switches


def _attend_layout(q, k_packed, kw) -> tuple:
    """What of a call fixes the kernels' compile-time configuration: ``(KV heads, group size, decode (Lq = 1),
    kv_start, kv_end, q_pos, window given)``. The probe of a configuration runs this layout, so the kernels it
    compiles are the ones the call itself then launches (a probe of its own layout compiled every kernel twice,
    seconds of a first decode step)."""
    codes = k_packed.fields.get("codes")
    hkv = codes.shape[1] if codes is not None and codes.dim() == 4 else None
    g = q.shape[1] // hkv if hkv and q.dim() == 4 and q.shape[1] % hkv == 0 else None
    return (hkv, g, q.dim() == 4 and q.shape[2] == 1,
            *(kw.get(n) is not None for n in _LAYOUT_ARGS))


def _layout_name(layout: tuple) -> str:
    """A layout as the probe keys show it (``tqcache info``): ``"Hkv=8 G=4 decode"``, ``"... chunk q_pos window"``."""
    hkv, g, decode, *flags = layout
    names = [n for n, on in zip(_LAYOUT_ARGS, flags) if on]
    return " ".join([f"Hkv={hkv} G={g}", "decode" if decode else "chunk", *names])


def _probe_attend(q, k_codec, v_codec, layout: tuple) -> tuple[bool, str]:
    """The split-K / Gluon decode step against the torch reference at a small T, in the call's ``layout``
    (:func:`_attend_layout`): ragged starts and ends where the call passes them, a causal chunk of 3 (or one
    decode query) with ``q_pos``, a window of 40 where it has one."""
    from ..codec.attention import attend_packed

    hkv, g, decode, has_start, has_end, causal, has_window = layout
    dev = q.device
    gen = torch.Generator().manual_seed(1234)
    d = q.shape[-1]
    Hkv = hkv or (k_codec.channel_scale.shape[0] if k_codec.channel_scale.dim() == 3 else 2)
    B, G = 2, g or 4
    Lq = 1 if decode else 3
    T = 150
    kp = _random_packed(k_codec, B, Hkv, T, dev, gen)
    vp = _random_packed(v_codec, B, Hkv, T, dev, gen)
    qq = torch.randn(B, Hkv * G, Lq, d, generator=gen).to(dev, q.dtype)
    kw = dict(scale=1.0 / math.sqrt(d))
    if has_start:
        kw["kv_start"] = torch.tensor([0, 7], device=dev)
    if has_end:
        kw["kv_end"] = torch.tensor([T, 101], device=dev)
    if causal:
        kw["q_pos"] = torch.tensor([T - Lq, 90], device=dev)
    if has_window:
        kw["window"] = 40
    out, lse = _attn.attend_packed_triton(qq, k_codec, kp, v_codec, vp, splits=3, **kw)
    ref, rlse = attend_packed(qq.float(), k_codec, kp, v_codec, vp, **kw)
    return _verdict(out, lse, ref, rlse, q.dtype)


def _probe(key: tuple, fn) -> dict:
    with _LOCK:
        rec = _PROBES.get(key)
    if rec is not None:
        return rec
    try:
        ok, detail = fn()
        rec = {"passed": ok, "reason": detail if ok else f"self-test mismatch: {detail}"}
    except Exception as e:  # a compile or launch failure: record it, run the torch path
        rec = {"passed": False, "reason": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
    with _LOCK:
        _PROBES[key] = rec
    return rec


# ---------------------------------------------------------------------------------------------- attend
_CHECKS = Plans(per_codec=256)  # per first codec: (entry point, ...) -> (weakrefs to the other codecs, why)


def _checked(key: tuple, codecs: tuple, check) -> str | None:
    """``check()``'s answer for this call signature, computed once: the dispatch checks and the probe run on every
    decode step of every layer otherwise (the step is host-bound in eager mode). Kept per codec while it lives; the
    other codecs are compared by identity (ids recycle)."""
    hit = _CHECKS.get(codecs[0], key)
    if hit is not None and all(r() is c for r, c in zip(hit[0], codecs[1:])):
        return hit[1]
    why = check()
    _CHECKS.put(codecs[0], key, (tuple(weakref.ref(c) for c in codecs[1:]), why))
    return why


def _probe_prefill(q, k_codec, v_codec) -> tuple[bool, str]:
    from ..codec.attention import attend_packed

    dev = q.device
    gen = torch.Generator().manual_seed(4321)
    d = q.shape[-1]
    Hkv = k_codec.channel_scale.shape[0] if k_codec.channel_scale.dim() == 3 else 2
    B, G, Lq, T = 2, 4, 5, 150
    kp = _random_packed(k_codec, B, Hkv, T, dev, gen)
    vp = _random_packed(v_codec, B, Hkv, T, dev, gen)
    qq = torch.randn(B, Hkv * G, Lq, d, generator=gen).to(dev, q.dtype)
    kw = dict(scale=1.0 / math.sqrt(d), kv_start=torch.tensor([0, 7], device=dev, dtype=torch.int32))
    out, lse = _pre.attend_prefill(qq, k_codec, kp.fields, v_codec, vp.fields, chunk=64, **kw)  # 3 chunks
    ref, rlse = attend_packed(qq.float(), k_codec, kp, v_codec, vp, **kw)
    return _verdict(out, lse, ref, rlse, q.dtype)


_PREFILL_KW = frozenset({"scale", "kv_start", "chunk"})  # (chunk: the torch reference's key chunking, not used here)


def _prefill_ready(q, k_codec, v_codec, k_packed, kw) -> bool:
    """Whether :func:`attend` takes the dequantize + flash path: a prefill chunk (≥ ``PREFILL_MIN_ROWS`` query rows
    per KV head) that sees every packed token but left padding, covered (``prefill.prefill_reason``) and probed.
    When not, the split-K kernel (or the torch reference) takes the call as before."""
    # (Every decode step passes here: the cheap row count goes first, and a one-token step stops at it.)
    codes = k_packed.fields.get("codes")
    if _pre is None or q.dim() != 4 or codes is None or codes.dim() != 4:
        return False
    if q.shape[1] % codes.shape[1] or q.shape[1] // codes.shape[1] * q.shape[2] < _pre.PREFILL_MIN_ROWS:
        return False
    if not set(kw) <= _PREFILL_KW:
        return False

    def check():
        if not available(q.device):
            return _why_unavailable(q.device)
        why = _pre.prefill_reason(q, k_codec, v_codec)
        if why is None:
            key = ("prefill", str(q.device), q.dtype, _codec_sig(k_codec), _codec_sig(v_codec))
            rec = _probe(key, lambda: _probe_prefill(q, k_codec, v_codec))
            if not rec["passed"]:
                why = f"self-test failed: {rec['reason']}"
        return why

    return _checked(("prefill", q.device, _interpreting(), q.dtype, q.shape[-1], id(k_codec), id(v_codec)),
                    (k_codec, v_codec), check) is None


def dense_flash_ready(q) -> bool:
    """Whether :func:`dense_flash` (``prefill.dense_flash``: the full-precision parts of a plain prefill chunk on
    flash attention) takes queries like ``q`` here: a CUDA GPU, fp16/bf16, head_dim a multiple of 8 up to 256."""
    return _pre is not None and available(q.device) and _pre.dense_flash_reason(q) is None


def dense_flash(q, k, v, scale: float, causal: bool = False):
    """``prefill.dense_flash``: ``(out, lse)`` of ``q`` over every key of ``k/v``, or causally over a chunk's own."""
    return _pre.dense_flash(q, k, v, scale, causal)


def attend(q, k_codec, k_packed, v_codec, v_packed, **kw):
    """Attention over packed K/V: :func:`tqcache.codec.attention.attend_packed`'s arguments and returns.

    Runs the Triton split-K kernel when it can (see the module docstring), else the torch reference. A prefill
    chunk of at least ``prefill.PREFILL_MIN_ROWS`` query rows per KV head that sees every packed token (left
    padding aside) decodes the prefix once and runs flash attention instead (:mod:`.prefill`).
    """
    from ..codec.attention import attend_packed

    if _prefill_ready(q, k_codec, v_codec, k_packed, kw):
        return _pre.attend_prefill(q, k_codec, k_packed.fields, v_codec, v_packed.fields, scale=kw["scale"],
                                   kv_start=kw.get("kv_start"))

    layout = _attend_layout(q, k_packed, kw)

    def check():
        if kw.get("mask") is not None:
            return "explicit mask= (kernels take kv_start/kv_end/q_pos/window)"
        if not available(q.device):
            return _why_unavailable(q.device)
        reason = _attn.unsupported_reason(q, k_codec, v_codec, k_packed)
        if reason is None:
            key = ("attend", str(q.device), q.dtype, _codec_sig(k_codec), _codec_sig(v_codec), _layout_name(layout))
            rec = _probe(key, lambda: _probe_attend(q, k_codec, v_codec, layout))
            if not rec["passed"]:
                reason = f"self-test failed: {rec['reason']}"
        return reason

    reason = _checked(("attend", q.device, _interpreting(), q.dtype, q.shape[-1], id(k_codec), id(v_codec), layout,
                       kw.get("mask") is not None), (k_codec, v_codec), check)
    if reason is not None:
        _fallback(reason)
        return attend_packed(q, k_codec, k_packed, v_codec, v_packed, **kw)
    kw.pop("chunk", None)
    return _attn.attend_packed_triton(q, k_codec, k_packed, v_codec, v_packed, **kw)


# ---------------------------------------------------------------------------------------------- window
def window_reference(q, parts, out_c, lse_c, scale):
    """The torch twin of :func:`attend_window`: ``codec.attention.dense_partial`` per dense part, merged with the
    compressed partial by ``merge_partials``; ``[B, 1, Hq, d]`` in q's dtype."""
    from ..codec.attention import dense_partial, merge_partials

    res = [dense_partial(q, k, v, None, scale) for k, v in parts]
    if out_c is not None:
        res.insert(len(res) - 1, (out_c, lse_c))
    out, _ = merge_partials(res)
    return out.to(q.dtype).transpose(1, 2).contiguous()


def _probe_window(q, n_parts: int, has_c: bool, hkv: int = 2) -> tuple[bool, str]:
    """The window kernel against its torch twin, with the call's KV heads and group (its compile-time constants, so
    the call reuses what the probe compiled)."""
    gen = torch.Generator().manual_seed(99)
    B, Hkv, d = 2, hkv, q.shape[-1]
    G = q.shape[1] // Hkv
    dev, dt = q.device, q.dtype
    qq = torch.randn(B, Hkv * G, 1, d, generator=gen).to(dev, dt)
    parts = [(torch.randn(B, Hkv, n, d, generator=gen).to(dev, dt), torch.randn(B, Hkv, n, d, generator=gen).to(dev, dt))
             for n in ((4, 45) if n_parts == 2 else (45,))]
    oc = lc = None
    if has_c:
        oc = torch.randn(B, Hkv * G, 1, d, generator=gen).to(dev)
        lc = (torch.randn(B, Hkv * G, 1, generator=gen) * 3).to(dev)
    got = _win.attend_window_triton(qq, parts, oc, lc, d**-0.5)
    ref = window_reference(qq, parts, oc, lc, d**-0.5)
    e = _rel(got.float(), ref.float())
    tol = 1e-5 if dt == torch.float32 else 1e-2
    return bool(torch.isfinite(got).all()) and e <= tol, f"rel err {e:.2e} (tol {tol:g})"


def attend_window(q, parts, out_c, lse_c, scale):
    """One-token decode step's dense parts and merge in one launch (:mod:`.window`): the output ``[B, 1, Hq, d]``
    in q's dtype, or None when the kernel cannot take the call here (the caller then runs the torch twin,
    :func:`window_reference`; the reason is recorded in ``info()["fallbacks"]``)."""
    reason = None if available(q.device) else _why_unavailable(q.device)
    if reason is None:
        q, sig, reason = _win.check_window(q, parts, out_c, lse_c)
    if reason is None:
        hkv = parts[-1][0].shape[1]
        key = ("window", str(q.device), q.dtype, q.shape[-1], len(parts), out_c is not None,
               f"Hkv={hkv} G={q.shape[1] // hkv}")
        rec = _probe(key, lambda: _probe_window(q, len(parts), out_c is not None, hkv))
        if not rec["passed"]:
            reason = f"self-test failed: {rec['reason']}"
    if reason is not None:
        _fallback(f"window: {reason}")
        return None
    return _win.launch_window(q, parts, out_c, lse_c, scale, sig)


# ---------------------------------------------------------------------------------------------- encode
def _probe_encode(codec, x) -> tuple[bool, str]:
    c = copy.deepcopy(codec)
    gen = torch.Generator().manual_seed(4321)
    xs = torch.randn(1, x.shape[1], 37, codec.dim, generator=gen).to(x.device, x.dtype)  # per-head scales: same heads
    if c.needs_calibration and not c.is_calibrated():
        c.calibrate(xs)
    ref = c.quantize(xs)
    fields = {n: torch.zeros(1, x.shape[1], 40, w, dtype=dt, device=x.device) for n, (w, dt) in c.field_widths().items()}
    _enc.encode_into(c, xs, fields, start=2)
    bad = []
    for n, v in ref.fields.items():
        got = fields[n][:, :, 2:39]
        # Ties (a coordinate within a few ulps of a boundary) may flip a code; allow a tiny fraction.
        frac = float((got != v).float().mean())
        if frac > 0.01:
            bad.append(f"{n}: {frac:.1%} differ")
    return (not bad), ("; ".join(bad) or "fields match")


def encode(codec, x: torch.Tensor, fields: dict, start: int) -> None:
    """Write ``codec.quantize(x)`` (x ``[B, Hkv, N, d]``) into ``fields[name][:, :, start:start+N]``.

    Triton kernel when available and self-tested (see :func:`tqcache.kernels.encode.encode_into`), else the
    torch codec followed by a copy.
    """
    def check():
        if not available(x.device):
            return _why_unavailable(x.device)
        reason = _enc.encode_unsupported_reason(codec, x)
        if reason is None:
            key = ("encode", str(x.device), x.dtype, _codec_sig(codec))
            rec = _probe(key, lambda: _probe_encode(codec, x))
            if not rec["passed"]:
                reason = f"self-test failed: {rec['reason']}"
        return reason

    reason = _checked(("encode", x.device, _interpreting(), x.dtype, x.shape[1] if x.dim() > 1 else None, id(codec)),
                      (codec,), check)
    if reason is None:
        _enc.encode_into(codec, x, fields, start)
        return
    _fallback(reason)
    packed = codec.quantize(x)
    n = x.shape[2]
    for name, t in packed.fields.items():
        fields[name][:, :, start : start + n].copy_(t)


# ---------------------------------------------------------------------------------------------- info
def self_test(device, scheme: str = "turbo4", head_dim: int = 128, heads: int = 8) -> dict[str, dict]:
    """Run the first-use self-tests now, for one scheme's codecs (``tqcache info --probe``): decode and causal
    attention, encode of keys and values, the window kernel and the prefill path, with bf16 queries on a GPU (fp32
    in the interpreter). The probes are the ones the dispatchers run and are recorded under the same keys, so later
    calls of that configuration reuse them. Returns ``{probe: {"passed", "reason"}}`` (empty when no kernel can run
    on ``device``)."""
    from ..codec import make_codec
    from ..config import parse_scheme

    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # the dispatchers key on the tensors' device: "cuda:0"
        device = torch.device("cuda", torch.cuda.current_device())
    if not available(device):
        return {}
    cfg = parse_scheme(scheme)
    if not cfg.compressed:
        raise ValueError(f"scheme {scheme!r} compresses nothing: there is no kernel to test")
    kc = make_codec(cfg.key, head_dim, 1, heads=heads).to(device)
    vc = make_codec(cfg.value, head_dim, 2, heads=heads).to(device)
    dt = torch.float32 if device.type == "cpu" else torch.bfloat16
    q = torch.zeros(1, heads * 4, 1, head_dim, device=device, dtype=dt)  # (the probes draw their own data)
    x = torch.zeros(1, heads, 1, head_dim, device=device, dtype=dt)
    dev = str(device)
    out = {}
    kp = _random_packed(kc, 1, heads, 4, device, torch.Generator().manual_seed(0))  # (tells the check the heads)
    if _attn.unsupported_reason(q, kc, vc, kp) is None:
        # The layouts a decode step and a short causal chunk of a model without padding have.
        for name, layout in (("attend", (heads, 4, True, False, False, False, False)),
                             ("attend causal", (heads, 4, False, False, False, True, False))):
            key = ("attend", dev, dt, _codec_sig(kc), _codec_sig(vc), _layout_name(layout))
            out[name] = _probe(key, lambda lay=layout: _probe_attend(q, kc, vc, lay))
    for name, c in (("encode keys", kc), ("encode values", vc)):
        if _enc.encode_unsupported_reason(c, x) is None:
            out[name] = _probe(("encode", dev, dt, _codec_sig(c)), lambda c=c: _probe_encode(c, x))
    out["window"] = _probe(("window", dev, dt, head_dim, 2, True, f"Hkv={heads} G=4"),
                           lambda: _probe_window(q, 2, True, heads))
    if _pre.prefill_reason(q, kc, vc) is None:
        key = ("prefill", dev, dt, _codec_sig(kc), _codec_sig(vc))
        out["prefill"] = _probe(key, lambda: _probe_prefill(q, kc, vc))
    return {k: dict(v) for k, v in out.items()}


def info() -> dict:
    """What the kernels layer knows: GPU, versions, probe results, launch configurations, fallback reasons."""
    d: dict = {"torch": torch.__version__, "triton_import_error": _IMPORT_ERROR, "interpreter": _interpreting()}
    try:
        import triton

        d["triton"] = triton.__version__
    except Exception:
        d["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        d["gpu"] = p.name
        d["sm_count"] = p.multi_processor_count
        d["capability"] = f"{p.major}.{p.minor}"
        d["gpu_memory_gib"] = round(p.total_memory / 2**30, 1)
        d["kernels_available"] = available("cuda")
    else:
        d["gpu"] = None
        d["kernels_available"] = available("cpu")
    with _LOCK:
        d["probes"] = {" | ".join(str(x) for x in k): dict(v) for k, v in _PROBES.items()}
    d["launch_configs"] = dict(_attn.LAUNCH_CONFIGS) if _attn is not None else {}
    d["compiled"] = dict(_attn.COMPILED) if _attn is not None else {}
    # Decode steps the Gluon kernel covers (decode_gluon.gluon_reason) run it (compiled entries prefixed "gluon").
    d["gluon_decode"] = _attn is not None and _attn._gluon_module() is not None
    d["replayed_launches"] = _launch.enabled()  # kernels/_launch.py: launches skip Triton's per-call Python
    if _pre is not None:  # prefill chunks (kernels/prefill.py): the decode + flash path and where it starts
        d["prefill"] = {"min_rows_per_kv_head": _pre.PREFILL_MIN_ROWS, "dense_parts_on_flash": _pre.DENSE_FLASH}
    d["fallbacks"] = dict(_FALLBACKS)
    return d
