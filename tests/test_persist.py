"""Cache files (tqcache.persist): exact round trips, safe writes, safe reads (errors, migration, fuzz), dense
import, and prompt-prefix reuse for `tqcache generate --prompt-cache`."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from transformers import DynamicCache

from test_cache import gemma, llama, padded_batch, plain  # tiny random-weight models shared with the cache tests

from tqcache import CacheConfig, CodecConfig, TurboQuantCache, parse_scheme
from tqcache import persist
from tqcache.persist import CacheFileError, CacheFileNotFoundError, import_dense, load_cache, save_cache

# ------------------------------------------------------------------------------------------------ helpers
SCHEMES = {
    "none": parse_scheme("none"),
    "turbo4": parse_scheme("turbo4").replace(window=4),
    "turbo3.5": parse_scheme("turbo3.5").replace(window=4),
    "k4v3": parse_scheme("k4v3").replace(window=4, sinks=2),
    "affine4": parse_scheme("affine4").replace(window=4),
    "turbo4-sinks3-window6": parse_scheme("turbo4").replace(window=6, sinks=3),
    "turbo4-window0": parse_scheme("turbo4").replace(window=0),
    "turbo3-two_phase": parse_scheme("turbo3").replace(window=4, two_phase=True),
    "k3.5v2.5-rot": parse_scheme("k3.5v2.5-rot").replace(window=4, sinks=1),  # one shared norm per vector
    # data-dependent codec buffers (outlier split, channel scale), QJL sketch, a full-precision layer
    "calibrated-qjl-fp_layer": CacheConfig(
        CodecConfig(bits=3.5, split="outliers", channel_scale=True), CodecConfig(bits=3, qjl=True),
        window=2, sinks=1, fp_layers=(0,), seed=7, name="custom",
    ),
}
MODELS = {
    "llama": lambda: llama(head_dim=32),
    "gemma3-sliding": lambda: gemma(head_dim=32, window=16),  # ring of 16-1-window slots wraps at T=40
}


def forward_steps(model, cache, ids, mask, steps):
    """Feed ``ids`` then ``steps`` greedy tokens one at a time; returns (last-position logits of each forward
    ``[steps + 1, B, V]``, the attention mask so far, the next greedy token)."""
    logits = []
    with torch.no_grad():
        out = model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        logits.append(out.logits[:, -1])
        nxt = out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            out = model(nxt, attention_mask=mask, past_key_values=cache, use_cache=True)
            logits.append(out.logits[:, -1])
            nxt = out.logits[:, -1:].argmax(-1)
    return torch.stack(logits), mask, nxt


def continue_steps(model, cache, mask, nxt, steps):
    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    logits, _, _ = forward_steps(model, cache, nxt, mask, steps - 1)
    return logits


def state(cache: TurboQuantCache) -> dict:
    """Everything that determines a cache's future behaviour, as comparable values."""
    out = {}
    for layer in cache.layers:
        p = f"{layer.layer_idx}."
        out[p + "init"] = layer.is_initialized
        if not layer.is_initialized:
            continue
        for name in ("cumulative_length", "win_start", "c_lo", "c_hi", "decoding", "n_sinks", "compress", "dtype"):
            out[p + name] = getattr(layer, name)
        for name in ("win_k", "win_v", "sink_k", "sink_v"):
            t = getattr(layer, name)
            out[p + name] = None if t is None else t.clone()
        out[p + "slot_positions"] = layer.slot_positions()
        if layer.k_store is not None:
            slots = persist._used_slots(layer, layer.k_store["codes"].device)
            for kind, store in (("k", layer.k_store), ("v", layer.v_store)):
                for name, t in store.items():
                    out[f"{p}{kind}.{name}"] = t[:, :, slots].clone()
        for kind, codec in (("k", layer.k_codec), ("v", layer.v_codec)):
            if codec is not None:
                for name, t in codec.state_dict().items():
                    out[f"{p}{kind}_codec.{name}"] = t.clone()
    return out


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            assert isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor), k
            assert x.dtype == y.dtype and torch.equal(x, y), k
        else:
            assert x == y, k


def small_file(tmp: Path, name="c.tqc", scheme="turbo4", T=16, head_dim=16, **kw):
    model = llama(head_dim=head_dim, layers=2)
    cfg = parse_scheme(scheme) if isinstance(scheme, str) else scheme
    cache = TurboQuantCache(model.config, cfg.replace(window=3, sinks=1))
    ids = torch.randint(0, 96, (1, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    path = save_cache(cache, tmp / name, model=model, token_ids=ids, **kw)
    return model, cache, ids, path


# ------------------------------------------------------------------------------------------------ round trip
@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("make", list(MODELS))
def test_round_trip_is_exact_and_generation_continues_identically(tmp_path, make, scheme):
    model = MODELS[make]()
    cfg = SCHEMES[scheme]
    ids, mask = padded_batch(T=40 if make.startswith("gemma") else 30)
    # two-phase: save right after the prefill (nothing compressed yet, decoding flag still off)
    before = 0 if cfg.two_phase else 3
    cache = TurboQuantCache(model.config, cfg)
    _, mask, nxt = forward_steps(model, cache, ids, mask, before)
    seq = torch.cat([ids, torch.zeros(2, before, dtype=ids.dtype)], 1)  # token ids only need the right shape
    path = save_cache(cache, tmp_path / "c.tqc", model=model, token_ids=seq)
    saved = state(cache)
    loaded, meta = load_cache(path, model)
    assert_same_state(saved, state(loaded))
    assert meta["token_ids"] == seq.tolist() and meta["seq_length"] == seq.shape[1]
    assert meta["scheme"] == cfg.name and meta["format_version"] == persist.FORMAT_VERSION
    # continuing from the loaded cache == never having saved, bit for bit
    ref = continue_steps(model, cache, mask, nxt, 4)
    got = continue_steps(model, loaded, mask, nxt, 4)
    assert torch.equal(ref, got)


def test_file_holds_only_used_slots_and_documented_metadata(tmp_path):
    model = llama(head_dim=32)
    cache = TurboQuantCache(model.config, plain("turbo4").replace(window=4, sinks=0))
    ids, mask = padded_batch(T=30)
    forward_steps(model, cache, ids, mask, 0)
    layer = cache.layers[0]
    assert layer.capacity >= 256 > layer.n_compressed == 26
    path = save_cache(cache, tmp_path / "c.tqc", model=model)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        md, names = f.metadata(), list(f.keys())
        assert f.get_slice("layers.0.k.codes").get_shape() == [2, 2, 26, 16]
        assert f.get_slice("layers.0.win_k").get_shape() == [2, 2, 4, 32]
    assert md["format"] == "tqcache.kvcache" and md["format_version"] == "3" and len(md["sha256"]) == 64
    meta = json.loads(md["meta"])
    import tqcache

    assert meta["library_version"] == tqcache.__version__
    assert meta["config"]["key"]["bits"] == 4.0 and meta["config"]["window"] == 4
    assert meta["model"]["fingerprint"]["num_key_value_heads"] == 2
    assert meta["model"]["structure"]["layer_types"] == ["full_attention", "full_attention"]
    lm = meta["layers"][0]
    assert lm["c_lo"] == 0 and lm["c_hi"] == 26 and lm["window_tokens"] == 4 and lm["type"] == "full"
    # nothing data-dependent in this codec: every buffer is regenerated and identity-checked, none stored
    assert set(lm["codecs"]["k"]["identity"]) == {"rot0", "levels0", "bounds0", "perm", "channel_scale", "calibrated"}
    assert not any("_codec." in name for name in names)
    assert meta["seeds"]["layers"][1] == [lm2["seed"] for lm2 in meta["layers"][1]["codecs"].values()]
    # the file is about the used bytes: far below the allocated capacity
    assert path.stat().st_size < cache.memory().compressed_used_bytes + cache.memory().window_bytes + 64 * 1024


def test_generate_from_a_loaded_cache_equals_never_saving(tmp_path):
    model = llama(head_dim=32)
    ids = torch.randint(0, 96, (1, 25), generator=torch.Generator().manual_seed(3))
    cache = TurboQuantCache(model.config, parse_scheme("k4v3").replace(window=4))
    with torch.no_grad():
        model(ids[:, :-1], past_key_values=cache, use_cache=True)
    save_cache(cache, tmp_path / "p.tqc", model=model, token_ids=ids[:, :-1])
    loaded, _ = load_cache(tmp_path / "p.tqc", model)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False, return_dict_in_generate=True,
              output_logits=True, pad_token_id=0)
    a = model.generate(ids, past_key_values=cache, **kw)
    b = model.generate(ids, past_key_values=loaded, **kw)
    assert torch.equal(a.sequences, b.sequences)
    assert all(torch.equal(x, y) for x, y in zip(a.logits, b.logits))


def test_load_without_model_rebuilds_the_same_state(tmp_path):
    model = gemma(head_dim=32, window=16)
    cache = TurboQuantCache(model.config, parse_scheme("turbo4").replace(window=4))
    ids, mask = padded_batch(T=40)
    forward_steps(model, cache, ids, mask, 2)
    save_cache(cache, tmp_path / "c.tqc")
    loaded, meta = load_cache(tmp_path / "c.tqc")
    assert_same_state(state(cache), state(loaded))
    assert meta["model"]["fingerprint"] is None and meta["token_ids"] is None
    assert all(not layer.return_handles for layer in loaded.layers)  # dense: right for any attention function
    assert [layer.sliding_window for layer in loaded.layers] == [16, 16, None]


# ------------------------------------------------------------------------------------------------ safe writes
def test_existing_file_is_never_overwritten_unless_asked(tmp_path):
    model, cache, ids, path = small_file(tmp_path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match=str(path)):
        save_cache(cache, path, model=model)
    assert path.read_bytes() == before
    cache2 = TurboQuantCache(model.config, parse_scheme("turbo3"))
    with torch.no_grad():
        model(ids, past_key_values=cache2)
    save_cache(cache2, path, model=model, overwrite=True)
    assert load_cache(path, model)[1]["scheme"] == "turbo3"
    assert sorted(os.listdir(tmp_path)) == [path.name]


@pytest.mark.parametrize("exc", [OSError("No space left on device"), KeyboardInterrupt()], ids=["oserror", "ctrl-c"])
def test_failed_save_leaves_previous_file_intact_and_no_temp_files(tmp_path, monkeypatch, exc):
    model, cache, ids, path = small_file(tmp_path)
    before = path.read_bytes()

    def broken(f, data):  # writes half the file, then fails
        f.write(data[: len(data) // 2])
        f.flush()
        raise exc

    monkeypatch.setattr(persist, "_write_all", broken)
    with pytest.raises(type(exc)):
        save_cache(cache, path, model=model, overwrite=True)
    assert path.read_bytes() == before
    with pytest.raises(type(exc)):
        save_cache(cache, tmp_path / "new.tqc", model=model)
    assert sorted(os.listdir(tmp_path)) == [path.name]  # no temp file, no half-written new file
    load_cache(path, model)


def test_save_argument_errors(tmp_path):
    model, cache, ids, _ = small_file(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_cache(cache, tmp_path / "missing_dir" / "c.tqc")
    with pytest.raises(IsADirectoryError):
        save_cache(cache, tmp_path)
    with pytest.raises(ValueError, match="holds 16 tokens"):
        save_cache(cache, tmp_path / "x.tqc", token_ids=ids[:, :5])
    with pytest.raises(TypeError, match="from_dynamic"):
        save_cache(DynamicCache(), tmp_path / "x.tqc")


# ------------------------------------------------------------------------------------------------ safe reads
def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CacheFileNotFoundError, match="nope.tqc") as e:
        load_cache(tmp_path / "nope.tqc")
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, CacheFileError)
    assert isinstance(e.value, ValueError)
    with pytest.raises(CacheFileError, match="directory"):
        load_cache(tmp_path)


def test_files_that_are_not_ours(tmp_path):
    cases = {
        "empty": b"",
        "short": b"abc",
        "text": b"hello world, this is not a cache file at all" * 3,
        "huge-header": (10**12).to_bytes(8, "little") + b"{}",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    save_file({"x": torch.zeros(3)}, str(tmp_path / "plain"))
    save_file({"x": torch.zeros(3)}, str(tmp_path / "other"), metadata={"format": "pt"})
    for name in [*cases, "plain", "other"]:
        with pytest.raises(CacheFileError, match="not a tqcache cache file"):
            load_cache(tmp_path / name)


def test_truncated_and_corrupted_files(tmp_path):
    model, cache, ids, path = small_file(tmp_path)
    data = path.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    bad = tmp_path / "bad.tqc"
    for cut in (4, 8, header_end - 10, header_end, header_end + 100, len(data) - 1):
        bad.write_bytes(data[:cut])
        with pytest.raises(CacheFileError, match="truncated|not a tqcache"):
            load_cache(bad, model)
    corrupt = bytearray(data)
    corrupt[len(data) - 200] ^= 0x10  # a bit in the packed codes
    bad.write_bytes(bytes(corrupt))
    with pytest.raises(CacheFileError, match="checksum"):
        load_cache(bad, model)


def _rewrite(src: Path, dst: Path, version: int, edit=None):
    """Re-serialize a verified file with edited metadata/tensors and a valid checksum (a 'well-formed' file)."""
    _, meta, tensors = persist._read_verified(src)
    if edit is not None:
        meta, tensors = edit(meta, tensors)
    dst.write_bytes(persist._serialize(meta, tensors, version))
    return dst


def test_newer_format_version_asks_to_upgrade(tmp_path):
    model, cache, ids, path = small_file(tmp_path)

    def future(meta, tensors):
        meta["library_version"] = "9.0.0"
        return meta, tensors

    newer = _rewrite(path, tmp_path / "newer.tqc", persist.FORMAT_VERSION + 1, future)
    with pytest.raises(CacheFileError,
                       match=rf"format version {persist.FORMAT_VERSION + 1} \(written by tqcache 9.0.0\).*upgrade tqcache"):
        load_cache(newer, model)

    def new_field(meta, tensors):
        meta["config"]["key"]["dither"] = True
        return meta, tensors

    with pytest.raises(CacheFileError, match="key.dither.*upgrade tqcache"):
        load_cache(_rewrite(path, tmp_path / "field.tqc", persist.FORMAT_VERSION, new_field), model)


def test_cache_for_another_model_names_the_difference(tmp_path):
    model, cache, ids, path = small_file(tmp_path)
    other_shape = llama(head_dim=16, layers=3)
    with pytest.raises(CacheFileError, match="num_hidden_layers: file 2, model 3"):
        load_cache(path, other_shape)
    other_rope = llama(head_dim=16, layers=2)
    other_rope.config.rope_parameters = {**other_rope.config.rope_parameters, "rope_theta": 1234.0}
    with pytest.raises(CacheFileError, match=r"\(fingerprint mismatch\): rope_parameters: file .*rope_theta.: 10000.0.*model .*1234.0"):
        load_cache(path, other_rope)
    with pytest.raises(CacheFileError, match="computed in float32, but the model runs in bfloat16"):
        load_cache(path, llama(head_dim=16, layers=2).to(torch.bfloat16))
    load_cache(path, llama(head_dim=16, layers=2, seed=5))  # same architecture, other random weights: accepted


def test_codec_identity_mismatch_is_refused(tmp_path):
    model, cache, ids, path = small_file(tmp_path)

    def tamper(meta, tensors):
        meta["layers"][1]["codecs"]["v"]["identity"]["rot0"] = "0" * 64
        return meta, tensors

    with pytest.raises(CacheFileError, match="layer 1 value codec: rot0 regenerated from seed"):
        load_cache(_rewrite(path, tmp_path / "t.tqc", persist.FORMAT_VERSION, tamper), model)


def test_older_version_migrates(tmp_path, monkeypatch):
    """A synthetic 'version 0' (windows stored as `window_keys/values`, meta `window_len`) migrates through
    _MIGRATIONS[0]; without a migration the loader says it cannot."""
    model, cache, ids, path = small_file(tmp_path)

    def to_v0(meta, tensors):
        meta, tensors = _sorted_codes(meta, tensors)  # version 1's codes
        for lm in meta["layers"]:
            lm["window_len"] = lm.pop("window_tokens")
        renamed = {k.replace(".win_k", ".window_keys").replace(".win_v", ".window_values"): v for k, v in tensors.items()}
        return meta, renamed

    v0 = _rewrite(path, tmp_path / "v0.tqc", 0, to_v0)
    with pytest.raises(CacheFileError, match="version 0, which this tqcache .* cannot migrate"):
        load_cache(v0, model)

    def migrate_0_to_1(meta, tensors):
        for lm in meta["layers"]:
            lm["window_tokens"] = lm.pop("window_len")
        return meta, {k.replace(".window_keys", ".win_k").replace(".window_values", ".win_v"): v for k, v in tensors.items()}

    monkeypatch.setitem(persist._MIGRATIONS, 0, migrate_0_to_1)
    loaded, meta = load_cache(v0, model)
    assert meta["format_version"] == persist.FORMAT_VERSION
    assert_same_state(state(cache), state(loaded))


def _code_fields(meta, tensors):
    """(tensor name, codec config, layer meta) of each stored key / value code tensor of a file."""
    cfg = persist._config_from_dict(meta["config"])
    for lm in meta["layers"]:
        for kind, ccfg in (("k", cfg.key), ("v", cfg.value)):
            name = f"layers.{lm['index']}.{kind}.codes"
            if name in tensors:
                yield name, ccfg, lm


def _sorted_codes(meta, tensors):
    """A current file's TurboQuant codes as version 1 stored them: the sorted index of each code's level
    (code L/2 + m -> L/2 + m, code m -> L/2 − 1 − m; written out here, not through the library's mapping), in
    the dense LSB-first stream (pack_bits) at every width, 3 bits included (version 3's 3-bit units came later)."""
    from tqcache.codec import pack_bits
    from tqcache.codec.packing import unpack_codes

    for name, ccfg, lm in list(_code_fields(meta, tensors)):
        b, d = int(ccfg.bits), lm["head_dim"]
        assert ccfg.kind == "turbo" and b == ccfg.bits and not ccfg.qjl  # one segment
        c = unpack_codes(tensors[name], b, d)
        half = 1 << (b - 1)
        tensors[name] = pack_bits(torch.where(c >= half, c, half - 1 - c), b)
    return meta, tensors


@pytest.mark.parametrize("head_dim", [16, 48])  # 48: one 3-bit unit of 32 codes and a dense tail of 16
@pytest.mark.parametrize("scheme", ["turbo4", "turbo3", "turbo2"])
def test_version_1_sorted_codes_migrate_to_sign_magnitude(tmp_path, scheme, head_dim):
    """Version 1 stored each TurboQuant code as its level's sorted index; version 2 stores sign-magnitude codes
    (the decode kernels' 4-bit lookup reads |level| from the low bits). A version-1 file (dense codes) loads
    through 1 -> 2 -> 3 into the same cache, and its codes were really different on disk (a migration that did
    nothing would fail the state check)."""
    model, cache, ids, path = small_file(tmp_path, scheme=scheme, head_dim=head_dim)
    v1 = _rewrite(path, tmp_path / "v1.tqc", 1, _sorted_codes)
    _, _, t2 = persist._read_verified(path)
    version, _, t1 = persist._read_verified(v1)
    assert version == 1
    names = [n for n in t2 if n.endswith(".codes")]
    assert names and all(t1[n].shape == t2[n].shape for n in names)
    assert any(not torch.equal(t1[n], t2[n]) for n in names)
    loaded, meta = load_cache(v1, model)
    assert meta["format_version"] == persist.FORMAT_VERSION
    assert_same_state(state(cache), state(loaded))


def _dense_codes(meta, tensors):
    """A current file's TurboQuant codes as version 2 stored them: 3-bit segments in the dense LSB-first stream
    (pack_bits) instead of version 3's units of 32 codes; other widths unchanged."""
    from tqcache.codec import pack_bits, packed_width, segments_for
    from tqcache.codec.packing import unpack_codes

    for name, ccfg, lm in list(_code_fields(meta, tensors)):
        assert ccfg.kind == "turbo"
        parts, byte, codes = [], 0, tensors[name]
        for d_s, b_s in segments_for(lm["head_dim"], ccfg.bits - 1 if ccfg.qjl else ccfg.bits):
            w = packed_width(d_s, b_s)
            seg = codes[..., byte : byte + w]
            parts.append(pack_bits(unpack_codes(seg, 3, d_s), 3) if b_s == 3 else seg)
            byte += w
        assert byte == codes.shape[-1]
        tensors[name] = torch.cat(parts, -1)
    return meta, tensors


@pytest.mark.parametrize("n", [8, 24, 32, 48, 64, 96, 128, 200, 256])
def test_dense3_to_units_is_unpack_then_pack_codes(n):
    """The version 2 -> 3 migration's repacking equals unpack_bits -> pack_codes, on random bytes (every bit
    pattern, the top bit of H included) and on no tokens."""
    from tqcache.codec import unpack_bits
    from tqcache.codec.packing import pack_codes

    x = torch.randint(0, 256, (2, 3, 17, 3 * n // 8), generator=torch.Generator().manual_seed(n), dtype=torch.uint8)
    for seg in (x, x[:, :, :0], torch.full_like(x, 255)):
        got = persist._dense3_to_units(seg, n)
        assert got.dtype == torch.uint8 and torch.equal(got, pack_codes(unpack_bits(seg, 3, n), 3))


_QJL4 = CacheConfig(CodecConfig(bits=3.5, split="outliers"), CodecConfig(bits=4, qjl=True), name="qjl4")  # v: 3 MSE bits


@pytest.mark.parametrize("scheme, head_dim", [
    ("turbo3", 48), ("turbo3", 64), ("turbo3.5", 64), ("k4v3", 64), ("turbo2.5", 64), (_QJL4, 64), ("turbo4", 64),
], ids=["turbo3-48", "turbo3-64", "turbo3.5-64", "k4v3-64", "turbo2.5-64", "qjl4-64", "turbo4-64"])
def test_version_2_dense_3bit_codes_migrate_to_units(tmp_path, scheme, head_dim):
    """Version 2 stored 3-bit TurboQuant codes in the dense stream; version 3 in units of 32 codes (W0, W1, H).
    A version-2 file loads into the same cache; its 3-bit segments really differ on disk and every other
    segment (4-bit, 2-bit) is byte-identical, so the migration has to repack exactly the 3-bit ones."""
    from tqcache.codec import segments_for

    model, cache, ids, path = small_file(tmp_path, scheme=scheme, head_dim=head_dim)
    v2 = _rewrite(path, tmp_path / "v2.tqc", 2, _dense_codes)
    _, meta3, t3 = persist._read_verified(path)
    version, _, t2 = persist._read_verified(v2)
    assert version == 2
    cfg = persist._config_from_dict(meta3["config"])
    names = [n for n in t3 if n.endswith(".codes")]
    assert names and all(t2[n].shape == t3[n].shape for n in names)
    has3 = {kind: any(b == 3 for _, b in segments_for(head_dim, c.mse_bits)) for kind, c in (("k", cfg.key), ("v", cfg.value))}
    for n in names:
        if has3[n.split(".")[-2]]:
            assert not torch.equal(t2[n], t3[n]), n
        else:
            assert torch.equal(t2[n], t3[n]), n
    loaded, meta = load_cache(v2, model)
    assert meta["format_version"] == persist.FORMAT_VERSION == 3
    assert_same_state(state(cache), state(loaded))


_FUZZ: dict = {}


def _fuzz_reference(tmp_root: Path):
    if not _FUZZ:
        model, cache, ids, path = small_file(tmp_root, T=12)
        data = path.read_bytes()
        loaded, meta = load_cache(path, model)
        _FUZZ.update(model=model, data=data, state=state(loaded), meta=meta,
                     header_end=8 + int.from_bytes(data[:8], "little"))
    return _FUZZ


@st.composite
def damage(draw, n: int, header_end: int):
    kind = draw(st.sampled_from(["truncate", "flip", "header-flip"]))
    if kind == "truncate":
        return ("truncate", draw(st.integers(0, n - 1)))
    hi = header_end - 1 if kind == "header-flip" else n - 1
    flips = draw(st.lists(st.tuples(st.integers(0, hi), st.integers(1, 255)), min_size=1, max_size=3))
    return ("flip", flips)


def test_fuzz_damaged_files_load_identically_or_raise_cache_file_error(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    ref = _fuzz_reference(root)
    target = root / "damaged.tqc"
    outcomes = {"error": 0, "identical": 0}

    @settings(max_examples=250, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(damage(len(ref["data"]), ref["header_end"]))
    def check(d):
        data = bytearray(ref["data"])
        if d[0] == "truncate":
            data = data[: d[1]]
        else:
            for pos, mask in d[1]:
                data[pos] ^= mask
        target.write_bytes(bytes(data))
        try:
            loaded, meta = load_cache(target, ref["model"])
        except CacheFileError:
            outcomes["error"] += 1
            return
        # only a change that leaves the content as it was may load (e.g. a space in the header's padding)
        assert meta == ref["meta"]
        assert_same_state(ref["state"], state(loaded))
        outcomes["identical"] += 1

    t0 = time.perf_counter()
    check()
    print(outcomes)
    assert outcomes["error"] > 100
    assert time.perf_counter() - t0 < 30


# ------------------------------------------------------------------------------------------------ dense import
def _dense_file(model, path: Path, T: int, with_ids=True):
    ids, mask = padded_batch(T=T)
    dyn = DynamicCache(config=model.config)
    old = model.config._attn_implementation
    model.config._attn_implementation = "sdpa"
    try:
        with torch.no_grad():
            model(ids, attention_mask=mask, past_key_values=dyn, use_cache=True)
    finally:
        model.config._attn_implementation = old
    tensors = {}
    for i, layer in enumerate(dyn.layers):
        tensors[f"layers.{i}.keys"], tensors[f"layers.{i}.values"] = layer.keys.contiguous(), layer.values.contiguous()
    if with_ids:
        tensors["token_ids"] = ids
    save_file(tensors, str(path), metadata={"seq_length": str(T)})
    return dyn, ids, tensors


@pytest.mark.parametrize("make", list(MODELS))
def test_import_dense_equals_from_dynamic(tmp_path, make):
    model = MODELS[make]()
    dyn, ids, _ = _dense_file(model, tmp_path / "dense.safetensors", T=40)
    cfg = parse_scheme("turbo3.5").replace(window=4)
    out = import_dense(tmp_path / "dense.safetensors", tmp_path / "c.tqc", model.config, cfg)
    loaded, meta = load_cache(out)
    assert meta["token_ids"] == ids.tolist() and meta["model"]["fingerprint"] is None
    assert_same_state(state(TurboQuantCache.from_dynamic(dyn, model.config, cfg)), state(loaded))
    # with the model: fingerprint stored, loads for it
    import_dense(tmp_path / "dense.safetensors", tmp_path / "c2.tqc", model, cfg)
    assert load_cache(tmp_path / "c2.tqc", model)[1]["model"]["fingerprint"]["num_hidden_layers"] == len(dyn.layers)


def test_import_dense_names_bad_inputs(tmp_path):
    model = llama(head_dim=16)
    _, _, tensors = _dense_file(model, tmp_path / "d.safetensors", T=10)
    partial = {k: v for k, v in tensors.items() if not k.startswith("layers.1.")}
    save_file({**partial, "junk": torch.zeros(1)}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match=r"missing: layers\.1\.keys, layers\.1\.values; unexpected: junk"):
        import_dense(tmp_path / "partial.safetensors", tmp_path / "o.tqc", model.config, "turbo4")
    wrong = {**tensors, "layers.0.keys": tensors["layers.0.keys"][:, :1].contiguous()}
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ValueError, match=r"layers\.0\.keys is \[2, 1, 10, 16\]; expected \[B, 2, T, 16\]"):
        import_dense(tmp_path / "wrong.safetensors", tmp_path / "o.tqc", model.config, "turbo4")
    with pytest.raises(FileNotFoundError):
        import_dense(tmp_path / "none.safetensors", tmp_path / "o.tqc", model.config, "turbo4")
    assert not (tmp_path / "o.tqc").exists()


def test_import_dense_cli(tmp_path, monkeypatch, capsys):
    from tqcache import cli, models

    model = llama(head_dim=16)
    _dense_file(model, tmp_path / "d.safetensors", T=20)
    monkeypatch.setattr(models, "load", lambda name, dtype, device, attn_implementation: (model, None))
    argv = ["import-dense", str(tmp_path / "d.safetensors"), str(tmp_path / "c.tqc"), "--model", "tiny",
            "--scheme", "k4v3", "--window", "2"]
    assert cli.main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    cache, meta = load_cache(tmp_path / "c.tqc", model)
    assert meta["scheme"] == "k4v3" and cache.cfg.window == 2 and cache.get_seq_length() == 20
    assert cli.main(argv) == 1  # exists: refused with a message, no traceback
    assert "already exists" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ prompt cache
def _args(path, save=False, overwrite=False):
    return argparse.Namespace(prompt_cache=str(path), save_prompt_cache=save, overwrite=overwrite)


def _generate(model, ids, cache, steps=6):
    """What `tqcache generate` does after prompt_cache_step (greedy)."""
    return model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=steps,
                          do_sample=False, return_dict_in_generate=True, output_logits=True, pad_token_id=0)


def _run(model, ids, args, scheme, steps=6):
    cache = TurboQuantCache(model.config, scheme)
    ids2, cache, note = persist.prompt_cache_step(args, model, None, ids, cache)
    assert torch.equal(ids2, ids)
    return _generate(model, ids, cache, steps), note


def _same(a, b) -> bool:
    return torch.equal(a.sequences, b.sequences) and all(torch.equal(x, y) for x, y in zip(a.logits, b.logits))


def test_prompt_cache_save_then_reuse_gives_identical_output(tmp_path):
    model = llama(head_dim=32)
    scheme = parse_scheme("turbo4").replace(window=4)
    ids = torch.randint(0, 96, (1, 24), generator=torch.Generator().manual_seed(11))
    path = tmp_path / "prompt.tqc"

    missing, note = _run(model, ids, _args(path), scheme)  # file absent, nothing saved
    assert "does not exist" in note and not path.exists()
    saved, note = _run(model, ids, _args(path, save=True), scheme)
    assert f"saved 23 tokens to {path}" in note and "as an fp16 cache" in note
    reused, note = _run(model, ids, _args(path), scheme)
    assert f"reused 23 tokens from {path}" in note and "s saved" in note and "fp16 cache" in note
    assert _same(saved, reused) and _same(missing, reused)
    # a run without --prompt-cache at all prefills the whole prompt in one chunk: same greedy tokens
    plain = _generate(model, ids, TurboQuantCache(model.config, scheme))
    assert torch.equal(plain.sequences, reused.sequences)

    # a longer prompt starting with the cached tokens reuses them and prefills only the rest: identical to
    # prefilling the same chunks without any file
    longer = torch.cat([ids, torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(12))], 1)
    got, note = _run(model, longer, _args(path), scheme)
    assert "reused 23 tokens" in note and "prefilled 8 more tokens" in note
    ref_cache = TurboQuantCache(model.config, scheme)
    with torch.no_grad():
        model(longer[:, :23], past_key_values=ref_cache)
        model(longer[:, 23:31], attention_mask=torch.ones(1, 31, dtype=torch.long), past_key_values=ref_cache)
    assert _same(_generate(model, longer, ref_cache), got)

    # another prompt: not reused, same output as with no file
    other = torch.randint(0, 96, (1, 24), generator=torch.Generator().manual_seed(13))
    got, note = _run(model, other, _args(path), scheme)
    assert "not a prefix" in note and "agree on 0" in note
    assert _same(got, _run(model, other, _args(tmp_path / "absent.tqc"), scheme)[0])


def test_prompt_cache_refuses_mismatches_and_respects_overwrite(tmp_path):
    model = llama(head_dim=32)
    ids = torch.randint(0, 96, (1, 20), generator=torch.Generator().manual_seed(5))
    path = tmp_path / "p.tqc"
    _run(model, ids, _args(path, save=True), "turbo4")
    with pytest.raises(CacheFileError, match=r"holds a 'turbo4' cache, this run uses 'k4v3' \(value.bits: 4.0 vs 3.0\): "
                                             "pass --scheme turbo4"):
        _run(model, ids, _args(path), "k4v3")
    with pytest.raises(CacheFileError, match="num_hidden_layers"):
        _run(llama(head_dim=32, layers=3), ids, _args(path), "turbo4")
    longer = torch.cat([ids, ids], 1)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite"):
        _run(model, longer, _args(path, save=True), "turbo4")
    assert path.read_bytes() == before
    _, note = _run(model, longer, _args(path, save=True, overwrite=True), "turbo4")
    assert "reused 19 tokens" in note and "saved 39 tokens" in note
    _, note = _run(model, ids, _args(path, save=True, overwrite=True), "k4v3")  # unusable file: replaced
    assert "not reusable" in note and "saved 19 tokens" in note
    assert load_cache(path, model)[1]["scheme"] == "k4v3"
    _, note = _run(model, ids[:, :1], _args(tmp_path / "short.tqc", save=True), "turbo4")
    assert "too short" in note


def test_prompt_cache_reuse_takes_this_runs_flush(tmp_path):
    """flush governs only the decode steps after the prompt, so a file saved under another flush (e.g. before the
    field existed: 1) is reused, and the run computes what it would without the file, under its own flush."""
    model = llama(head_dim=32)
    ids = torch.randint(0, 96, (1, 24), generator=torch.Generator().manual_seed(21))
    path = tmp_path / "f.tqc"
    _run(model, ids, _args(path, save=True), parse_scheme("turbo4").replace(window=4, flush=1))
    assert load_cache(path, model)[0].cfg.flush == 1
    scheme = parse_scheme("turbo4").replace(window=4, flush=3)
    reused, note = _run(model, ids, _args(path), scheme, steps=8)
    assert "reused 23 tokens" in note
    missing, _ = _run(model, ids, _args(tmp_path / "absent.tqc"), scheme, steps=8)
    assert _same(reused, missing)
    other, _ = _run(model, ids, _args(tmp_path / "absent.tqc"), parse_scheme("turbo4").replace(window=4, flush=1),
                    steps=8)
    assert not _same(other, missing), "flush had no effect on the decode steps"


# ------------------------------------------------------------------------------------------------ real models
@pytest.mark.slow
@pytest.mark.parametrize("name,scheme,n", [("smollm2", "turbo4", 160), ("gemma3", "turbo3.5", 96)])
def test_real_model_prompt_cache_round_trip(tmp_path, name, scheme, n):
    """A prompt of real text: the reused file gives bit-identical logits; the file holds the used bytes."""
    models = pytest.importorskip("tqcache.models")
    from tqcache.evaluate import load_text

    try:
        model, tok = models.load(name, dtype=torch.float32, device="cpu", attn_implementation="tqcache")
    except (RuntimeError, ValueError, OSError) as e:
        pytest.skip(f"{name} not available: {e}")
    cfg = parse_scheme(scheme).replace(window=32)
    ids = tok(load_text(), return_tensors="pt").input_ids[:, : n + 1]
    path = tmp_path / f"{name}.tqc"
    saved, note = _run(model, ids, _args(path, save=True), cfg, steps=3)
    reused, note = _run(model, ids, _args(path), cfg, steps=3)
    assert f"reused {n} tokens" in note and _same(saved, reused), note
    cache, meta = load_cache(path, model)
    assert meta["seq_length"] == n and meta["model"]["fingerprint"]["architecture"] == model.config.architectures
    # the file holds the used bytes (fp32 window of 32 tokens + the compressed rest), the calibrated codecs'
    # data-dependent buffers (channel order and scales) and a small header
    mem, size = cache.memory(), path.stat().st_size
    calib = sum(
        getattr(c, n).numel() * getattr(c, n).element_size()
        for layer in cache.layers if layer.compress
        for c in (layer.k_codec, layer.v_codec) if getattr(c, "needs_calibration", False)
        for n in ("perm", "channel_scale", "calibrated")
    )
    held = mem.compressed_used_bytes + mem.window_bytes + calib
    assert held < size < held + 4096 * len(cache.layers) + 2**14  # JSON header: ~2-3 KB of metadata per layer
    assert mem.compressed_used_bytes < mem.fp16_bytes * (n - 32) / n / 3.5


def test_calibrated_codec_buffers_are_stored_exactly(tmp_path):
    model = llama(head_dim=32)
    cache = TurboQuantCache(model.config, SCHEMES["calibrated-qjl-fp_layer"])
    ids, mask = padded_batch(T=20)
    forward_steps(model, cache, ids, mask, 1)
    codec = cache.layers[1].k_codec
    assert bool(codec.calibrated) and not torch.equal(codec.perm, torch.arange(32))
    path = save_cache(cache, tmp_path / "c.tqc")
    _, meta, tensors = persist._read_verified(path)
    assert torch.equal(tensors["layers.1.k_codec.perm"], codec.perm)
    assert torch.equal(tensors["layers.1.k_codec.channel_scale"], codec.channel_scale)
    assert "perm" not in meta["layers"][1]["codecs"]["k"]["identity"] and "sketch" in meta["layers"][1]["codecs"]["v"]["identity"]
    assert meta["layers"][0]["compress"] is False and "codecs" not in meta["layers"][0]  # fp layer 0
