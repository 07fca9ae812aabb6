"""The cache's attention through the Triton kernels (CPU interpreter, in a fresh process so the
interpreter is chosen before Triton is imported): equal to SDPA over the decoded cache, left padding
included, with the kernel path actually taken. On a CUDA GPU the same comparison runs at head_dim 128 in bf16,
where decode steps take the Gluon kernel (2-, 3- and 4-bit codes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    """
    import dataclasses, json, sys, torch
    sys.path.insert(0, {tests!r})
    import tqcache
    from tqcache import TurboQuantCache, parse_scheme
    from test_cache import llama, padded_batch

    dev, dtype = torch.device({device!r}), getattr(torch, {dtype!r})
    model = llama(head_dim={head_dim}, heads=8, kv_heads=2, layers=2).to(dev, dtype)
    ids, mask = (t.to(dev) for t in padded_batch(T=40))
    if not {padded}:  # no padding mask: the plain decode steps take the window kernel (kernels.attend_window)
        mask = None
    feed = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(7)).to(dev)

    def run(impl, dense, scheme):
        model.config._attn_implementation = impl
        cfg = parse_scheme(scheme)
        # No query-aware key scaling here: the dense path cannot observe queries, so it would calibrate differently.
        cfg = cfg.replace(key=dataclasses.replace(cfg.key, channel_scale=False), window=8, sinks=2)
        cache = TurboQuantCache(model.config, cfg, dense=dense)
        out, m = [], mask
        with torch.no_grad():
            out.append(model(ids, attention_mask=m, past_key_values=cache).logits[:, -1])
            for t in range(5):  # teacher-forced: both runs see the same tokens
                if m is not None:
                    m = torch.cat([m, torch.ones_like(m[:, :1])], 1)
                out.append(model(feed[:, t : t + 1], attention_mask=m, past_key_values=cache).logits[:, -1])
        return torch.stack(out), cache

    res = {{}}
    for scheme in {schemes!r}:
        a, ca = run("tqcache", False, scheme)
        b, _ = run("sdpa", True, scheme)
        res[scheme] = {{"max_diff": (a - b).abs().max().item(), "scale": b.abs().max().item(),
                       "paths": ca.layers[0].paths}}
    from tqcache.kernels.attention import COMPILED
    res["compiled"] = sorted(COMPILED)
    info = tqcache.kernels.info()
    res["window"] = [v["passed"] for k, v in info["probes"].items() if k.startswith("window")]
    res["window_fallbacks"] = [k for k in info["fallbacks"] if k.startswith("window")]
    print(json.dumps(res))
    """
)


def _run(tests: str, env: dict, **fmt) -> dict:
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(tests=tests, **fmt)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _src_env(tests: str, **extra) -> dict:
    return dict(os.environ, **extra,
                PYTHONPATH=os.pathsep.join([str(Path(tests).parent / "src"), os.environ.get("PYTHONPATH", "")]))


def test_cache_attention_through_interpreted_kernels_matches_decoded_cache():
    tests = str(Path(__file__).parent)
    res = _run(tests, _src_env(tests, TRITON_INTERPRET="1"), device="cpu", dtype="float32", head_dim=64,
               schemes=("turbo4", "k4v3"), padded=True)
    res.pop("compiled")
    assert res.pop("window") == [] and res.pop("window_fallbacks") == []  # padding mask: the torch dense parts
    for scheme, r in res.items():
        assert r["paths"].get("kernel", 0) == 5, (scheme, r)  # every decode step read the compressed part via the kernel
        assert r["max_diff"] < 1e-4, (scheme, r)


def test_plain_decode_steps_through_the_window_kernel_match_decoded_cache():
    # No padding mask: each one-token step's sinks, fp window and merge run in one launch (kernels.attend_window).
    tests = str(Path(__file__).parent)
    res = _run(tests, _src_env(tests, TRITON_INTERPRET="1"), device="cpu", dtype="float32", head_dim=64,
               schemes=("turbo4", "turbo3"), padded=False)
    res.pop("compiled")
    assert res.pop("window") == [True] and res.pop("window_fallbacks") == []  # probed once, taken, no fallback
    for scheme, r in res.items():
        assert r["paths"].get("kernel", 0) == 5, (scheme, r)
        assert r["max_diff"] < 1e-4, (scheme, r)


def test_cache_attention_through_gluon_kernel_matches_decoded_cache():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (the Gluon kernel has no interpreter)")
    tests = str(Path(__file__).parent)
    for padded in (True, False):
        _check_gluon(_run(tests, _src_env(tests), device="cuda", dtype="bfloat16", head_dim=128,
                          schemes=("turbo4", "turbo3", "k4v3", "turbo2"), padded=padded), padded)


def _check_gluon(res: dict, padded: bool) -> None:
    compiled = res.pop("compiled")
    assert res.pop("window") == ([] if padded else [True]) and res.pop("window_fallbacks") == []
    for bits in ("K(4)V(4)", "K(3)V(3)", "K(4)V(3)", "K(2)V(2)"):
        assert any(k.startswith("gluon" + bits) for k in compiled), (bits, compiled)  # decode steps ran Gluon
    for scheme, r in res.items():
        assert r["paths"].get("kernel", 0) == 5, (scheme, r)
        # bf16 model: both sides round activations to bf16 (~0.4 % per op); same cache contents
        assert r["max_diff"] < 2e-2 * max(r["scale"], 1.0), (scheme, r)


# ------------------------------------------------------------------------------------ plain prefill chunks (flash)
def test_dense_flash_equals_dense_partial_for_its_two_masks():
    """kernels/prefill.dense_flash (CPU: torch's CPU flash kernel, fp32) against the torch composition it replaces:
    every key visible, and a chunk causal over its own keys, with GQA."""
    import torch

    from tqcache.codec.attention import dense_partial
    from tqcache.kernels.prefill import dense_flash

    g = torch.Generator().manual_seed(11)
    q = torch.randn(2, 8, 9, 64, generator=g)
    k, v = torch.randn(2, 2, 13, 64, generator=g), torch.randn(2, 2, 13, 64, generator=g)
    for got, want in ((dense_flash(q, k, v, 0.125), dense_partial(q, k, v, None, 0.125)),
                      (dense_flash(q, k[:, :, :9], v[:, :, :9], 0.125, causal=True),
                       dense_partial(q, k[:, :, :9], v[:, :, :9], torch.ones(9, 9, dtype=torch.bool).tril()[None, None], 0.125))):
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="chunk's own 9 keys, got 13"):
        dense_flash(q, k, v, 0.125, causal=True)


def test_plain_chunk_recognises_only_causal_visibility():
    import torch

    from tqcache.attention import _plain_chunk

    Lq, F = 4, 7
    causal = torch.ones(Lq, F, dtype=torch.bool)
    causal[:, F - Lq :] = torch.ones(Lq, Lq, dtype=torch.bool).tril()
    sinks = torch.ones(2, 1, Lq, 3, dtype=torch.bool)
    assert _plain_chunk(sinks, causal[None, None].expand(2, 1, Lq, F), Lq)
    assert _plain_chunk(None, causal[None, None], Lq)
    padded = causal[None, None].repeat(2, 1, 1, 1)
    padded[1, 0, :, 0] = False  # left padding in the window of sequence 1
    assert not _plain_chunk(sinks, padded, Lq)
    masked_sink = sinks.clone()
    masked_sink[0, 0, :, 0] = False
    assert not _plain_chunk(masked_sink, causal[None, None], Lq)
    assert not _plain_chunk(None, causal[None, None, :, :3], Lq)  # fewer fp tokens than the chunk


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="flash attention needs a CUDA GPU")
def test_prefill_chunks_through_flash_match_the_torch_composition(monkeypatch):
    """A bf16 model prefilled in chunks after a compressed prefix: with the fp parts on flash (and the compressed
    part on decode + flash from 256 rows) the logits match the torch composition to bf16 precision, and the flash
    path was taken."""
    import torch

    import tqcache.kernels as K
    from tqcache import TurboQuantCache, parse_scheme
    from tqcache.kernels import prefill

    sys.path.insert(0, str(Path(__file__).parent))
    from test_cache import llama

    dev = torch.device("cuda")
    model = llama(head_dim=64, heads=8, kv_heads=2, layers=2).to(dev, torch.bfloat16)
    ids = torch.randint(0, 96, (1, 300), generator=torch.Generator().manual_seed(3)).to(dev)
    calls = []
    real = prefill.dense_flash
    monkeypatch.setattr(prefill, "dense_flash", lambda *a, **k: calls.append(1) or real(*a, **k))

    def run(flash: bool):
        monkeypatch.setattr(prefill, "DENSE_FLASH", flash)
        cfg = parse_scheme("turbo4").replace(window=16, sinks=2)
        cache = TurboQuantCache(model.config, cfg)
        model.config._attn_implementation = "tqcache"
        outs = []
        with torch.no_grad():
            model(ids[:, :100], past_key_values=cache)
            model(ids[:, 100:101], past_key_values=cache)  # the key-scaling calibration step
            for a, b in ((101, 229), (229, 300)):  # two chunks over the compressed prefix
                outs.append(model(ids[:, a:b], past_key_values=cache).logits.float())
        return torch.cat(outs, 1)

    base = run(False)
    assert not calls
    got = run(True)
    assert len(calls) >= 2 * 2 * 2  # sinks, window and chunk per layer and chunk (the window of the first may be empty)
    assert (got - base).abs().max() <= 0.05 * base.abs().max()
    assert K.dense_flash_ready(torch.zeros(1, 8, 2, 64, device=dev, dtype=torch.bfloat16))
