"""Tests of tqcache.config: scheme parsing, presets, and validation messages that name the bad value."""

from __future__ import annotations

import dataclasses
import re

import pytest

from tqcache.codec import TurboQuantizer, make_codec
from tqcache.config import SCHEMES, CacheConfig, CodecConfig, parse_scheme, scheme_names


@pytest.mark.parametrize("name", list(SCHEMES))
def test_every_preset_parses_to_itself(name):
    cfg = parse_scheme(name)
    assert cfg is SCHEMES[name]
    assert cfg.name == name
    assert parse_scheme(f"  {name.upper()} ") is cfg  # case and surrounding space do not matter


@pytest.mark.parametrize("name", [n for n, c in SCHEMES.items() if c.compressed])
def test_every_compressed_preset_builds_codecs(name):
    cfg = parse_scheme(name)
    for codec_cfg in (cfg.key, cfg.value):
        codec = make_codec(codec_cfg, 128, seed=0)
        assert codec.bits == codec_cfg.bits


def test_preset_contents():
    assert not SCHEMES["none"].compressed and SCHEMES["none"].window == 0
    k4v3 = SCHEMES["k4v3"]
    assert (k4v3.key.kind, k4v3.key.bits, k4v3.value.bits) == ("turbo", 4.0, 3.0)
    t35 = SCHEMES["turbo3.5"]
    assert t35.key.bits == 3.5 and t35.key.split == "outliers"  # fractional route: channel split, extra bit to outliers
    assert SCHEMES["turbo4"].key.split == "halves"  # whole bits: one segment, nothing to split
    for name in ("turbo4", "k4v3", "turbo3.5"):  # measured defaults (docs/fidelity.md)
        cfg = SCHEMES[name]
        assert cfg.key.channel_scale and not cfg.value.channel_scale and cfg.window == 128 and cfg.sinks == 4
        assert not cfg.key.qjl and cfg.key.rotation == "hadamard" and cfg.key.norm_correction
    assert SCHEMES["affine4"].key == CodecConfig("affine", 4, group_size=32)
    for name, k_bits, v_bits in (("k3.25v3", 3.25, 3.0), ("k2.25v2", 2.25, 2.0)):  # issue 5's 3.6/2.6-bit targets
        cfg = SCHEMES[name]
        assert (cfg.key.bits, cfg.key.split, cfg.key.channel_scale, cfg.value.bits) == (k_bits, "outliers", True, v_bits)
        assert make_codec(cfg.key, 64).segments == [(16, int(k_bits) + 1), (48, int(k_bits))]


@pytest.mark.parametrize(
    "name, key, value",
    [
        ("turbo2.5", ("turbo", 2.5), ("turbo", 2.5)),
        ("turbo3.25", ("turbo", 3.25), ("turbo", 3.25)),
        ("turbo5", ("turbo", 5.0), ("turbo", 5.0)),
        ("k5v3", ("turbo", 5.0), ("turbo", 3.0)),
        ("k3.5v2.5", ("turbo", 3.5), ("turbo", 2.5)),
        ("affine3", ("affine", 3.0), ("affine", 3.0)),
    ],
)
def test_patterns_parse(name, key, value):
    cfg = parse_scheme(name)
    assert isinstance(cfg, CacheConfig) and cfg.name == name
    assert (cfg.key.kind, cfg.key.bits) == key
    assert (cfg.value.kind, cfg.value.bits) == value


def test_parse_passes_cacheconfig_through():
    cfg = CacheConfig(window=4)
    assert parse_scheme(cfg) is cfg


@pytest.mark.parametrize("bad", ["turbo", "fp8", "k4", "affine", "turbo3x", "kivi2"])
def test_unknown_scheme_lists_valid_names(bad):
    with pytest.raises(ValueError) as ei:
        parse_scheme(bad)
    msg = str(ei.value)
    assert repr(bad) in msg
    for name in SCHEMES:
        assert name in msg
    assert scheme_names() == list(SCHEMES)


def test_parse_rejects_non_string():
    with pytest.raises(TypeError, match="int"):
        parse_scheme(4)


@pytest.mark.parametrize("name, shown", [("turbo9", "9"), ("turbo0", "0"), ("affine9", "9"), ("k4v0", "0")])
def test_pattern_with_bad_bits_raises_naming_value(name, shown):
    with pytest.raises(ValueError, match=f"got {shown}"):
        parse_scheme(name)


@pytest.mark.parametrize(
    "kwargs, shown",
    [
        (dict(bits=0), "got 0"),
        (dict(bits=9), "got 9"),
        (dict(bits=-1.5), "got -1.5"),
        (dict(bits="three"), "got 'three'"),
        (dict(bits=1, qjl=True), "got 1"),
        (dict(bits=10, qjl=True), "got 10"),
        (dict(kind="foo"), "got 'foo'"),
        (dict(rotation="x"), "got 'x'"),
        (dict(split="middle"), "got 'middle'"),
        (dict(axis="row"), "got 'row'"),
        (dict(kind="affine", bits=2.5), "got 2.5"),
        (dict(kind="affine", bits=9), "got 9"),
        (dict(kind="affine", bits=4, group_size=0), "got 0"),
        (dict(kind="affine", bits=4, qjl=True), "qjl=True"),
    ],
)
def test_codec_config_validation_names_value(kwargs, shown):
    with pytest.raises(ValueError, match=shown):
        CodecConfig(**kwargs)


def test_scheme_modifiers_change_one_field_each():
    base, rot = parse_scheme("k3.5v3"), parse_scheme("k3.5v3-rot")
    assert rot.key.split == "rotated" and rot.value.split == "halves"  # whole-bit values: nothing to split
    assert rot.name == "k3.5v3-rot" and rot.replace(name="k3.5v3", key=base.key) == base
    noks = parse_scheme("turbo2.5-rot-noks")
    assert noks.key.channel_scale is False and noks.key.split == noks.value.split == "rotated"
    assert parse_scheme("k4v3").key.channel_scale and parse_scheme("k4v3-qjl").key.qjl
    assert parse_scheme("k4v3-qjl").value.qjl is False and (noks.window, noks.sinks) == (128, 4)
    assert CodecConfig(bits=2.5, split="rotated").split == "rotated"


@pytest.mark.parametrize(
    "bad, shown",
    [("turbo4-foo", "unknown modifier 'foo' in scheme 'turbo4-foo'"), ("affine4-rot", "-rot in scheme 'affine4-rot'"),
     ("none-noks", "TurboQuant schemes only"), ("turbo3-", "unknown modifier ''"),
     ("turbo-fast", "unknown scheme 'turbo-fast'; valid names: none, turbo4")],
)  # fmt: skip
def test_bad_scheme_modifiers_name_the_value(bad, shown):
    with pytest.raises(ValueError, match=re.escape(shown)):
        parse_scheme(bad)


def test_codec_config_valid_values():
    c = CodecConfig("turbo", 4, qjl=True)
    assert c.bits == 4.0 and isinstance(c.bits, float) and c.mse_bits == 3.0
    assert CodecConfig("turbo", 2.5).mse_bits == 2.5
    assert CodecConfig("affine", 4).mse_bits == 4.0
    assert CodecConfig("turbo", 9, qjl=True).mse_bits == 8.0
    assert CodecConfig("none", bits=123).kind == "none"  # 'none' stores as is; bits are ignored


@pytest.mark.parametrize(
    "kwargs, shown",
    [
        (dict(window=-1), "window must be a non-negative integer, got -1"),
        (dict(sinks=-4), "sinks must be a non-negative integer, got -4"),
        (dict(seed=-1), "got -1"),
        (dict(window=2.5), "got 2.5"),
        (dict(window=True), "got True"),
    ],
)
def test_cache_config_validation_names_value(kwargs, shown):
    with pytest.raises(ValueError, match=shown):
        CacheConfig(**kwargs)


def test_cache_config_key_value_both_none_or_neither():
    with pytest.raises(ValueError, match="key='none', value='turbo'"):
        CacheConfig(CodecConfig("none"), CodecConfig("turbo", 3))


def test_configs_are_frozen_and_replace_revalidates():
    cfg = parse_scheme("turbo3")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.window = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.key.bits = 2.0
    assert cfg.replace(window=0).window == 0 and cfg.window == 128
    with pytest.raises(ValueError, match="got -2"):
        cfg.replace(window=-2)
    assert hash(cfg) == hash(parse_scheme("turbo3"))


def test_fp_layers_negative_indices():
    cfg = CacheConfig(fp_layers=[0, -1])
    assert cfg.fp_layers == (0, -1)
    assert [i for i in range(30) if cfg.is_fp_layer(i, 30)] == [0, 29]
    assert not CacheConfig().is_fp_layer(0, 30)


def test_fractional_representability_is_checked_at_codec_build():
    # The config does not know head_dim; the codec does, and names the bit-width it cannot represent.
    cfg = parse_scheme("turbo3.3")
    with pytest.raises(ValueError, match="3.3"):
        make_codec(cfg.key, 128)
    assert isinstance(make_codec(parse_scheme("turbo3.25").key, 128), TurboQuantizer)
