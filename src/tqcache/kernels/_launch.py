"""Kernel launches that skip Triton's per-call Python once a call site's specialization is settled.

Why: the eager decode step is bound by the host (docs/performance.md, "Decode steps in eager mode"). On the H100
machine one ``kernel[grid](...)`` costs ~45 µs of Python — the argument binder, the cache-key lookup, the launch
hooks, and a driver query per tensor argument — against ~12 µs for the compiled kernel's own launcher, and a
decode step launches six kernels per layer.

:class:`Replay` runs the first call of each *key* through Triton as usual (which compiles, or finds the kernel it
specialized for these arguments) and keeps the compiled kernel; later calls with the same key hand the same
argument list straight to that kernel's launcher. The contract is on the caller: a key must determine everything
Triton specializes a kernel on — the constexpr and launch options, the dtype and 16-byte alignment of every tensor
argument (its address modulo 16), and for every int argument whether it is 1, a multiple of 16, or beyond int32
(:func:`int_spec`). Call sites build their keys from the values that went into the arguments, so a changed buffer,
stride or alignment is a new key, and a new key is a normal Triton call. Launch hooks (profilers) and the CPU
interpreter always take the normal path.
"""

from __future__ import annotations

import os
import weakref

try:  # Triton ≥ 3.4 keeps the launch hooks in knobs
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover - depends on the Triton version (or no Triton: Plans still work)
    _knobs = None
try:
    from triton.runtime import driver as _driver
except ImportError:  # pragma: no cover - no Triton: nothing is launched
    _driver = None

__all__ = ["Plans", "Replay", "enabled", "int_spec", "int_width", "set_enabled"]

# Replays call Triton's compiled-kernel launcher as ``JITFunction.run`` does in the Triton versions checked here (the
# argument order of ``CompiledKernel.run`` is internal and has changed before); other versions keep Triton's path.
_CHECKED_TRITON = ("3.6.",)


def _triton_ok() -> bool:
    try:
        import triton
    except ImportError:  # pragma: no cover - no Triton: nothing is launched
        return False
    return triton.__version__.startswith(_CHECKED_TRITON)


_ENABLED = os.environ.get("TQCACHE_DIRECT_LAUNCH", "1") != "0" and _triton_ok()


def enabled() -> bool:
    """Whether launches are replayed (off with ``TQCACHE_DIRECT_LAUNCH=0``, or on a Triton version not checked)."""
    return _ENABLED


def set_enabled(on: bool) -> bool:
    """Turn replays on or off (A/B timing, debugging); returns the previous setting."""
    global _ENABLED
    prev, _ENABLED = _ENABLED, bool(on)
    return prev


def int_spec(x: int) -> int:
    """What Triton specializes an int argument on, as one small int: 1 when ``x == 1``; else bit 1 for a multiple of
    16 and bit 2 for a value outside int32."""
    if x == 1:
        return 1
    return (2 if x % 16 == 0 else 0) | (0 if -0x80000000 <= x < 0x80000000 else 4)


def int_width(*xs: int) -> int:
    """What Triton still keys on for int arguments it does not specialize on (``do_not_specialize``): whether any
    lies outside int32 (4) or not (0)."""
    return 4 if any(not -0x80000000 <= x < 0x80000000 for x in xs) else 0


def _device() -> int | None:
    """Triton's current device, or None where it has no GPU driver (the CPU interpreter: nothing is replayed)."""
    try:
        return _driver.active.get_current_device()
    except (AttributeError, RuntimeError):
        return None


def _hooks_set() -> bool:
    rt = _knobs.runtime if _knobs is not None else None
    return rt is not None and bool(getattr(rt.launch_enter_hook, "calls", None)
                                   or getattr(rt.launch_exit_hook, "calls", None))


class Replay:
    """Launches of one Triton (or Gluon) kernel from one call site; see the module docstring for the key contract.

    ``replay(key, grid, args, meta)`` launches ``fn[grid](*args, **meta)`` (``args``: every runtime argument in
    order, tensors as tensors; ``meta``: the constexpr arguments and launch options) and returns the compiled
    kernel. ``key=None`` always takes Triton's path. Like Triton, it launches on the current device and stream, and
    keeps one compiled kernel per device.
    """

    __slots__ = ("fn", "hits")

    def __init__(self, fn):
        self.fn = fn
        self.hits: dict = {}

    def ready(self, key) -> bool:
        """Whether a call with ``key`` will be a replay — the only launches that may pass int addresses for tensors
        (Triton's own path specializes on the tensors)."""
        return _ENABLED and (_device(), key) in self.hits and not _hooks_set()

    def __call__(self, key, grid, args: tuple, meta: dict):
        # As Triton does: the current device's kernel and stream (a compiled kernel is loaded per device).
        device = _device() if key is not None and _ENABLED else None
        hit = self.hits.get((device, key)) if device is not None else None
        if hit is not None and not _hooks_set():
            ck, tail = hit
            n = len(grid)
            ck.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, _driver.active.get_current_stream(device),
                   ck.function, ck.packed_metadata, None, None, None, *args, *tail)
            return ck
        ck = self.fn[grid](*args, **meta)
        if device is not None and hasattr(ck, "packed_metadata") and getattr(ck, "function", None) is not None:
            # The parameters after the runtime ones, in order: constexprs given in meta, else their defaults
            # (the compiled launcher takes every parameter and skips the constexprs).
            params = self.fn.params
            tail = tuple(meta[p.name] if p.name in meta else p.default for p in params[len(args):])
            if len(self.hits) > 4096:  # bounded: keys carry shapes and alignments, not pointers
                self.hits.clear()
            self.hits[(device, key)] = (ck, tail)
        return ck


class Plans:
    """Per-call-site plans, kept per codec for as long as the codec lives: a cache that is dropped takes its plans —
    and the GPU constants they hold — with it. At most ``per_codec`` plans per codec (a codec meets few call
    signatures: one per buffer layout). A plan must not reference its own codec, or it would keep it alive.

    A plain dict by ``id(codec)``, emptied by a ``weakref.finalize`` when the codec dies (so an id is never seen
    again by a stale entry): a lookup makes no weak reference, unlike a ``WeakKeyDictionary``."""

    __slots__ = ("_by", "per_codec")

    def __init__(self, per_codec: int = 64):
        self._by: dict = {}
        self.per_codec = per_codec

    def get(self, codec, key):
        plans = self._by.get(id(codec))
        return None if plans is None else plans.get(key)

    def put(self, codec, key, plan) -> None:
        plans = self._by.get(id(codec))
        if plans is None:
            plans = self._by[id(codec)] = {}
            weakref.finalize(codec, self._by.pop, id(codec), None)
        elif len(plans) >= self.per_codec:
            plans.clear()
        plans[key] = plan

    def __len__(self) -> int:
        """Codecs with plans (tests)."""
        return len(self._by)
