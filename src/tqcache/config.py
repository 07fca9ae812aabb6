"""Frozen configuration: one :class:`CodecConfig` per tensor kind (keys, values), one :class:`CacheConfig`.

Scheme strings parse here and nowhere else::

    >>> cfg = parse_scheme("k4v3")
    >>> cfg.key.bits, cfg.value.bits
    (4.0, 3.0)

Every validation error names the bad value and what would be accepted.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Literal

__all__ = ["CodecConfig", "CacheConfig", "MODIFIERS", "SCHEMES", "parse_scheme", "scheme_names"]

CodecKind = Literal["turbo", "affine", "none"]
_KINDS = ("turbo", "affine", "none")
_ROTATIONS = ("hadamard", "haar")
_SPLITS = ("halves", "outliers", "rotated")
_AXES = ("token", "channel")


@dataclasses.dataclass(frozen=True)
class CodecConfig:
    """How one tensor kind (keys or values) is stored.

    Attributes:
        kind: ``"turbo"`` (rotation + Lloyd–Max), ``"affine"`` (min/max groups) or ``"none"`` (kept as is).
        bits: bits per coordinate of the codes. TurboQuant accepts fractional values (2.5, 3.5, ...): the
            channels are split between two instances at ``floor(bits)`` and ``ceil(bits)`` bits. With
            ``qjl=True`` the total includes the 1-bit sign sketch (``bits - 1`` go to the MSE stage).
        qjl: add the QJL residual sign sketch (TurboQuant-prod); unbiased inner products.
        rotation: ``"hadamard"`` (randomized Walsh–Hadamard; power-of-two dims) or ``"haar"`` (dense QR).
            Non-power-of-two dims always use ``"haar"`` (documented in docs/design.md).
        norm_correction: store ``‖x‖/‖c[idx]‖`` instead of ``‖x‖`` so the reconstruction keeps the exact norm.
        split: for fractional bits, which coordinates get the extra bit: ``"halves"`` (fixed: the first
            channels) or ``"outliers"`` (the largest-RMS channels, chosen from the first data seen) -- both
            cut the channels into two independent instances, each with its own rotation and fp16 norm -- or
            ``"rotated"``: one full-width rotation and ONE norm, the first rotated coordinates get the extra
            bit (saves one fp16 norm per vector: 0.25 bit at head_dim 64).
        group_size: affine group size (elements per scale/zero pair).
        axis: affine grouping: ``"token"`` (groups run along channels of one token) or ``"channel"``
            (groups run along tokens of one channel; codec only, the cache uses ``"token"``).
        channel_scale: query-aware per-channel key scaling before the rotation: channel j is divided by
            ``(E[k_j²]/E[q_j²])^¼`` measured on the prompt, and the query side is multiplied by it, so inner
            products are unchanged.
    """

    kind: CodecKind = "turbo"
    bits: float = 4.0
    qjl: bool = False
    rotation: str = "hadamard"
    norm_correction: bool = True
    split: str = "halves"
    group_size: int = 32
    axis: str = "token"
    channel_scale: bool = False

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"codec kind must be one of {_KINDS}, got {self.kind!r}")
        try:
            bits = float(self.bits)
        except (TypeError, ValueError):
            raise ValueError(f"bits must be a number, got {self.bits!r}") from None
        object.__setattr__(self, "bits", bits)
        if self.kind == "none":
            return
        if self.rotation not in _ROTATIONS:
            raise ValueError(f"rotation must be one of {_ROTATIONS}, got {self.rotation!r}")
        if self.split not in _SPLITS:
            raise ValueError(f"split must be one of {_SPLITS}, got {self.split!r}")
        if self.axis not in _AXES:
            raise ValueError(f"axis must be one of {_AXES}, got {self.axis!r}")
        if self.kind == "affine":
            if bits != int(bits) or not 1 <= bits <= 8:
                raise ValueError(f"affine bits must be a whole number in 1..8, got {self.bits!r}")
            if self.qjl:
                raise ValueError("qjl=True applies to TurboQuant only, not to the affine codec")
            if self.group_size < 1:
                raise ValueError(f"group_size must be positive, got {self.group_size!r}")
            return
        mse_bits = bits - 1 if self.qjl else bits
        lo = 1.0
        if not (lo <= mse_bits <= 8) or math.isnan(bits):
            need = "2..9" if self.qjl else "1..8"
            raise ValueError(
                f"TurboQuant bits must be in {need}{' with qjl=True' if self.qjl else ''}, got {self.bits!r}"
            )

    @property
    def mse_bits(self) -> float:
        """Bits per coordinate spent by the MSE stage (``bits`` minus the QJL sign bit)."""
        return self.bits - 1 if (self.kind == "turbo" and self.qjl) else self.bits


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """A whole cache scheme: how keys and values are stored and which tokens/layers stay full precision.

    Attributes:
        key, value: codec of keys and of values.
        window: number of most recent tokens kept in full precision (a rolling window; older tokens are
            compressed as they leave it). 0 compresses every token.
        sinks: number of first tokens (attention sinks) kept in full precision forever.
        fp_layers: layer indices kept entirely in full precision (negative indices count from the end,
            e.g. ``(0, -1)`` for the first and last layer).
        two_phase: keep everything full precision during prefill and compress at the first decode step.
        flush: once decoding, tokens that leave the window are compressed ``flush`` (or more) at a time, so a
            full-attention layer's window holds ``window`` to ``window + flush − 1`` tokens; 1 compresses each
            token as it leaves. A decode step that compresses nothing launches no encode, which is most of
            what the cache update costs per step in eager mode (docs/performance.md). Prefill overflow is
            compressed at once; sliding-window layers always use 1 (their ring holds exactly what fits).
        seed: seed of every rotation, sketch and codebook-free random choice; layer ``i`` uses a seed
            derived from ``(seed, i)`` so layers are independent and reproducible.
        name: the scheme string this came from (informational).
    """

    key: CodecConfig = CodecConfig()
    value: CodecConfig = CodecConfig()
    window: int = 128
    sinks: int = 0
    fp_layers: tuple[int, ...] = ()
    two_phase: bool = False
    seed: int = 0
    name: str = "custom"
    flush: int = 1

    def __post_init__(self) -> None:
        for field in ("window", "sinks", "seed"):
            v = getattr(self, field)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{field} must be a non-negative integer, got {v!r}")
        if not isinstance(self.flush, int) or isinstance(self.flush, bool) or self.flush < 1:
            raise ValueError(f"flush must be a positive integer (tokens compressed at a time), got {self.flush!r}")
        object.__setattr__(self, "fp_layers", tuple(int(i) for i in self.fp_layers))
        if (self.key.kind == "none") != (self.value.kind == "none"):
            raise ValueError(
                "key and value must both be compressed or both be 'none' "
                f"(got key={self.key.kind!r}, value={self.value.kind!r})"
            )

    @property
    def compressed(self) -> bool:
        return self.key.kind != "none"

    def replace(self, **changes) -> "CacheConfig":
        """A copy with fields changed, e.g. ``cfg.replace(window=0)``; validated again."""
        return dataclasses.replace(self, **changes)

    def is_fp_layer(self, layer_idx: int, num_layers: int) -> bool:
        return any((i % num_layers) == layer_idx for i in self.fp_layers) if num_layers else False


def _split(bits: float) -> str:
    # Fractional bits: the extra bit goes to the channels of largest RMS (measured 4x lower KL than fixed
    # halves on Gemma-3's keys, docs/fidelity.md).
    return "halves" if float(bits).is_integer() else "outliers"


def _turbo(bits: float, **kw) -> CodecConfig:
    return CodecConfig(kind="turbo", bits=bits, split=_split(bits), **kw)


def _key(bits: float) -> CodecConfig:
    # Keys carry the damage: query-aware per-channel scaling, kept per layer where it measurably lowers the
    # prompt's attention KL (docs/fidelity.md has the measurements that chose this).
    return CodecConfig(kind="turbo", bits=bits, split=_split(bits), channel_scale=True)


def _preset(name: str, k_bits: float, v_bits: float) -> CacheConfig:
    return CacheConfig(_key(k_bits), _turbo(v_bits), window=128, sinks=4, flush=_FLUSH, name=name)


# Decode-time overflow is compressed 32 tokens at a time: 31 of 32 eager decode steps launch no encode (two fewer
# launches per layer; docs/performance.md, "Decode steps in eager mode"), for at most 31 more full-precision tokens.
_FLUSH = 32


# Named presets (defaults chosen by measurement, docs/fidelity.md): a 128-token full-precision window (flushed
# 32 tokens at a time while decoding), 4 attention-sink tokens, query-aware key scaling. Fractional routes:
# `turboX.5` splits channels (the highest-RMS half at ceil, the rest at floor bits; `-rot` instead splits after
# one rotation with one shared norm); `kXvY` gives keys and values different bit-widths.
SCHEMES: dict[str, CacheConfig] = {
    "none": CacheConfig(CodecConfig(kind="none"), CodecConfig(kind="none"), window=0, name="none"),
    "turbo4": _preset("turbo4", 4, 4),
    "turbo3.5": _preset("turbo3.5", 3.5, 3.5),
    "turbo3": _preset("turbo3", 3, 3),
    "turbo2.5": _preset("turbo2.5", 2.5, 2.5),
    "turbo2": _preset("turbo2", 2, 2),
    "k8v4": _preset("k8v4", 8, 4),
    "k5v3": _preset("k5v3", 5, 3),
    "k4v3": _preset("k4v3", 4, 3),
    "k4v2": _preset("k4v2", 4, 2),
    # Fractional keys by a quarter bit: the outlier quarter of the key channels gets the extra bit. The
    # 3.6- and 2.6-bit targets of issue 5 at head_dim 64 (SmolLM2: 3.5 / 2.5 bits; docs/fidelity.md).
    "k3.25v3": _preset("k3.25v3", 3.25, 3),
    "k2.25v2": _preset("k2.25v2", 2.25, 2),
    "affine4": CacheConfig(CodecConfig("affine", 4), CodecConfig("affine", 4), name="affine4"),
    "affine8": CacheConfig(CodecConfig("affine", 8), CodecConfig("affine", 8), name="affine8"),
    "affine2": CacheConfig(CodecConfig("affine", 2), CodecConfig("affine", 2), name="affine2"),
}

_PATTERNS = (
    (re.compile(r"^turbo(\d+(?:\.\d+)?)$"), lambda m: (_key(float(m[1])), _turbo(float(m[1])))),
    (re.compile(r"^k(\d+(?:\.\d+)?)v(\d+(?:\.\d+)?)$"), lambda m: (_key(float(m[1])), _turbo(float(m[2])))),
    (
        re.compile(r"^affine(\d)$"),
        lambda m: (CodecConfig("affine", int(m[1])), CodecConfig("affine", int(m[1]))),
    ),
)


# Modifiers appended to a TurboQuant scheme with "-" (e.g. "k3.5v3-rot-noks"), each one field changed.
MODIFIERS: dict[str, str] = {
    "rot": "fractional bit-widths split after one full-width rotation with one shared norm (split='rotated')",
    "noks": "keys without query-aware channel scaling",
    "qjl": "QJL residual sign sketch on the keys (one of their bits)",
}


def _modify(cfg: CacheConfig, mod: str, scheme: str) -> CacheConfig:
    if mod not in MODIFIERS:
        raise ValueError(
            f"unknown modifier {mod!r} in scheme {scheme!r}; valid modifiers: "
            + "; ".join(f"-{m} ({what})" for m, what in MODIFIERS.items())
        )
    if not cfg.compressed or cfg.key.kind != "turbo":
        raise ValueError(f"modifier -{mod} in scheme {scheme!r} applies to TurboQuant schemes only")
    if mod == "noks":
        return cfg.replace(key=dataclasses.replace(cfg.key, channel_scale=False))
    if mod == "qjl":
        return cfg.replace(key=dataclasses.replace(cfg.key, qjl=True))

    def rot(c: CodecConfig) -> CodecConfig:
        return c if float(c.mse_bits).is_integer() else dataclasses.replace(c, split="rotated")

    return cfg.replace(key=rot(cfg.key), value=rot(cfg.value))


def scheme_names() -> list[str]:
    return list(SCHEMES)


def parse_scheme(scheme: "str | CacheConfig") -> CacheConfig:
    """Turn a scheme string (``"turbo3.5"``, ``"k4v3"``, ``"affine4"``, ``"none"``, ...) into a config.

    Besides the named presets, ``turbo<bits>``, ``k<bits>v<bits>`` and ``affine<bits>`` parse for any valid
    bit-width, and TurboQuant schemes take ``-modifier`` suffixes (:data:`MODIFIERS`), e.g.
    ``"k3.5v3-rot-noks"``. A :class:`CacheConfig` passes through unchanged.
    """
    if isinstance(scheme, CacheConfig):
        return scheme
    if not isinstance(scheme, str):
        raise TypeError(f"scheme must be a string or CacheConfig, got {type(scheme).__name__}")
    name = scheme.strip().lower()
    if name in SCHEMES:
        return SCHEMES[name]
    base, *mods = name.split("-")
    if mods:
        try:
            cfg = parse_scheme(base)
        except ValueError:
            raise _unknown(scheme) from None
        for mod in mods:
            cfg = _modify(cfg, mod, scheme)
        return cfg.replace(name=name)
    for pattern, build in _PATTERNS:
        m = pattern.match(name)
        if m:
            key, value = build(m)
            if key.kind == "turbo":
                return CacheConfig(key, value, window=128, sinks=4, flush=_FLUSH, name=name)
            return CacheConfig(key, value, name=name)
    raise _unknown(scheme)


def _unknown(scheme: str) -> ValueError:
    return ValueError(
        f"unknown scheme {scheme!r}; valid names: {', '.join(SCHEMES)} "
        "(or turbo<bits>, k<bits>v<bits>, affine<bits>; TurboQuant schemes take -"
        + ", -".join(MODIFIERS)
        + " suffixes)"
    )
