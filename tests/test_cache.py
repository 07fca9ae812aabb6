"""TurboQuantCache on tiny random-weight models: bookkeeping, exactness of "none", compressed attention
against exact attention over the decoded cache, sliding windows, generate() features, conversion, memory."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from transformers import DynamicCache, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

import tqcache
from tqcache import TurboQuantCache, parse_scheme
from tqcache.attention import dense_partial


def llama(head_dim=16, heads=4, kv_heads=2, layers=2, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=96, hidden_size=heads * head_dim, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, max_position_embeddings=1024,
    )
    cfg._attn_implementation = "tqcache"
    return LlamaForCausalLM(cfg).eval()


def gemma(head_dim=32, window=16, seed=0):
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, head_dim=head_dim, sliding_window=window, max_position_embeddings=1024,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
    )
    cfg._attn_implementation = "tqcache"
    return Gemma3ForCausalLM(cfg).eval()


def teacher_forced(model, cache, ids, mask, steps, impl="tqcache"):
    """Prefill ``ids`` then feed ``steps`` greedy tokens; returns the stacked last-position logits."""
    old = model.config._attn_implementation
    model.config._attn_implementation = impl
    try:
        with torch.no_grad():
            out = model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
            logits, nxt = [out.logits[:, -1]], out.logits[:, -1:].argmax(-1)
            for _ in range(steps):
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
                out = model(nxt, attention_mask=mask, past_key_values=cache, use_cache=True)
                logits.append(out.logits[:, -1])
                nxt = out.logits[:, -1:].argmax(-1)
    finally:
        model.config._attn_implementation = old
    return torch.stack(logits)


def plain(scheme: str):
    """A preset without query-aware key scaling: the dense path (other attention implementations) cannot
    observe queries, so equality with it is only defined for configurations that need none."""
    cfg = parse_scheme(scheme)
    return cfg.replace(key=dataclasses.replace(cfg.key, channel_scale=False))


def padded_batch(T=40, pad=5, vocab=96, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, T), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    return ids, mask


@pytest.mark.parametrize("make", [llama, gemma], ids=["llama", "gemma3-sliding"])
def test_none_scheme_is_bit_identical_to_dynamic_cache(make):
    model = make()
    ids, mask = padded_batch(T=40)
    ref = teacher_forced(model, DynamicCache(config=model.config), ids, mask, 24)
    got = teacher_forced(model, TurboQuantCache(model.config, "none"), ids, mask, 24)
    assert torch.equal(ref, got)


@pytest.mark.parametrize(
    "make,scheme",
    [
        (lambda: llama(head_dim=64, heads=6, kv_heads=2), "turbo4"),
        (lambda: llama(head_dim=64, heads=6, kv_heads=2), "turbo3.5"),
        (lambda: llama(head_dim=16), "k4v3"),
        (lambda: llama(head_dim=16), "affine4"),
        (lambda: gemma(head_dim=256), "turbo3"),
        (lambda: gemma(head_dim=32), "turbo2.5"),
        (lambda: llama(head_dim=64, heads=6, kv_heads=2), "k3.5v2.5-rot"),
    ],
    ids=["gqa-d64-turbo4", "gqa-d64-turbo3.5", "d16-k4v3", "d16-affine4", "gemma-d256-turbo3", "gemma-d32-turbo2.5",
         "gqa-d64-k3.5v2.5-rot"],  # fmt: skip
)
def test_compressed_attention_matches_exact_attention_over_decoded_cache(make, scheme):
    """Separates kernel/plumbing error from quantization error: the compressed path must equal SDPA over
    the dequantized cache (dense=True returns exactly that) to float tolerance, batch 2 with padding."""
    model = make()
    cfg = plain(scheme).replace(window=6, sinks=2)
    ids, mask = padded_batch(T=30)
    fast = teacher_forced(model, TurboQuantCache(model.config, cfg), ids, mask, 24)
    dense = teacher_forced(model, TurboQuantCache(model.config, cfg, dense=True), ids, mask, 24, impl="sdpa")
    assert torch.allclose(fast, dense, atol=2e-5, rtol=1e-5), (fast - dense).abs().max()
    ref = teacher_forced(model, DynamicCache(config=model.config), ids, mask, 24)
    assert not torch.allclose(fast, ref, atol=1e-6), "compression had no effect: the cache is not compressing"


def test_compression_changes_outputs_a_little_and_more_bits_help():
    model = llama(head_dim=64, heads=4, kv_heads=2, layers=2)
    ids, mask = padded_batch(T=48)
    ref = teacher_forced(model, DynamicCache(config=model.config), ids, mask, 16)

    def kl(scheme):
        got = teacher_forced(model, TurboQuantCache(model.config, parse_scheme(scheme).replace(window=0)), ids, mask, 16)
        return torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean")

    k2, k8 = kl("turbo2"), kl("turbo8")
    assert 0 < k8 < k2


def test_chunked_prefill_equals_dense_path_and_prefill_attends_itself_in_full_precision():
    model = llama(head_dim=32)
    cfg = plain("turbo3").replace(window=4, sinks=0)
    ids, mask = padded_batch(T=36)
    outs = []
    for dense, impl in ((False, "tqcache"), (True, "sdpa")):
        cache = TurboQuantCache(model.config, cfg, dense=dense)
        model.config._attn_implementation = impl
        with torch.no_grad():
            a = model(ids[:, :20], attention_mask=mask[:, :20], past_key_values=cache, use_cache=True).logits
            b = model(ids[:, 20:], attention_mask=mask, past_key_values=cache, use_cache=True).logits
        model.config._attn_implementation = "tqcache"
        outs.append(torch.cat([a, b], 1))
    assert torch.allclose(outs[0], outs[1], atol=2e-5)
    # The first chunk found an empty cache: identical to an uncompressed forward.
    with torch.no_grad():
        full = model(ids[:, :20], attention_mask=mask[:, :20]).logits
    assert torch.allclose(outs[0][:, :20], full, atol=1e-5)


def test_sliding_layer_never_stores_more_than_its_window():
    model = gemma(window=16)
    cache = TurboQuantCache(model.config, plain("turbo4").replace(window=4, sinks=0))
    ids, mask = padded_batch(T=50)
    teacher_forced(model, cache, ids, mask, 20)
    for layer in cache.layers[:2]:
        assert layer.is_sliding
        assert layer.capacity == 16 - 1 - 4
        # The last step's overflow waits in full precision until the next step writes it over the ring slot
        # of a token that has left the window: at most one token more than the window's 15 is held.
        assert layer.n_compressed + layer.win_k.shape[-2] <= 16
        held = set(range(layer.c_lo, layer.c_hi)) | set(range(layer.win_start, layer.win_start + layer.win_k.shape[-2]))
        assert len({p for p in held if p > layer.cumulative_length - 16}) <= 15
    full = cache.layers[2]
    assert full.n_compressed + full.win_k.shape[-2] == 70


def test_two_phase_keeps_prefill_full_precision_until_first_decode():
    model = llama()
    cache = TurboQuantCache(model.config, plain("turbo4").replace(window=8, sinks=0, two_phase=True))
    ids, mask = padded_batch(T=30)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        assert cache.layers[0].n_compressed == 0 and cache.layers[0].win_k.shape[-2] == 30
        model(out.logits[:, -1:].argmax(-1), attention_mask=torch.cat([mask, mask[:, :1]], 1), past_key_values=cache)
    assert cache.layers[0].n_compressed == 31 - 8


def test_flush_compresses_decode_overflow_in_blocks():
    """flush = F: the prompt's overflow is compressed at once; decode steps then compress nothing until F tokens
    overflow the window, then all of them; the window holds window .. window + F - 1 tokens. The step's output is
    the attention over exactly what the layer holds (sinks, compressed, window), checked against the dense path."""
    model = llama(layers=1)
    W, F, P = 4, 5, 21
    cache = TurboQuantCache(model.config, plain("turbo4").replace(window=W, sinks=2, flush=F))
    ref = TurboQuantCache(model.config, plain("turbo4").replace(window=W, sinks=2, flush=F), dense=True)
    ids, mask = padded_batch(T=P)
    layer = cache.layers[0]
    seen = []
    with torch.no_grad():
        out = model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        model.config._attn_implementation = "sdpa"
        rout = model(ids, attention_mask=mask, past_key_values=ref, use_cache=True)
        model.config._attn_implementation = "tqcache"
        assert (layer.n_compressed, layer.win_k.shape[-2]) == (P - 2 - W, W)
        nxt = out.logits[:, -1:].argmax(-1)
        for step in range(2 * F + 2):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            out = model(nxt, attention_mask=mask, past_key_values=cache, use_cache=True)
            model.config._attn_implementation = "sdpa"
            rout = model(nxt, attention_mask=mask, past_key_values=ref, use_cache=True)
            model.config._attn_implementation = "tqcache"
            torch.testing.assert_close(out.logits, rout.logits, rtol=1e-4, atol=1e-4)
            nxt = out.logits[:, -1:].argmax(-1)
            seen.append((layer.n_compressed, layer.win_k.shape[-2]))
            assert W <= layer.win_k.shape[-2] <= W + F - 1
            assert layer.n_sinks + layer.n_compressed + layer.win_k.shape[-2] == layer.cumulative_length
    c0 = P - 2 - W
    assert [c for c, _ in seen] == [c0] * (F - 1) + [c0 + F] * F + [c0 + 2 * F] * 3


def test_flush_must_be_a_positive_integer():
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match=f"flush must be a positive integer.*{bad!r}"):
            parse_scheme("turbo4").replace(flush=bad)


def test_chunk_after_cached_tokens_drops_a_plain_causal_mask(monkeypatch):
    """A multi-token chunk that follows cached tokens gets a materialized causal mask from transformers; the
    tqcache mask function returns None for it (positions give causality), and the result is unchanged: equal to
    SDPA over the decoded cache, and for scheme "none" bit-identical to a DynamicCache. Left padding keeps its mask."""
    from transformers import AttentionInterface

    import tqcache.attention as A

    seen = []
    real = AttentionInterface._global_mapping["tqcache"]

    def spy(module, query, key, value, attention_mask, **kw):
        seen.append(attention_mask is None)
        return real(module, query, key, value, attention_mask, **kw)

    monkeypatch.setitem(AttentionInterface._global_mapping, "tqcache", spy)
    model = llama(layers=2)
    ids = torch.randint(0, 96, (1, 40), generator=torch.Generator().manual_seed(4))

    def chunks(cache, impl):
        model.config._attn_implementation = impl
        try:
            with torch.no_grad():
                model(ids[:, :24], past_key_values=cache)
                return model(ids[:, 24:], past_key_values=cache).logits
        finally:
            model.config._attn_implementation = "tqcache"

    cfg = plain("turbo4").replace(window=6, sinks=2)
    fast = chunks(TurboQuantCache(model.config, cfg), "tqcache")
    assert seen and all(seen[-2:])  # the chunk's two layers saw no mask
    dense = chunks(TurboQuantCache(model.config, cfg, dense=True), "sdpa")
    torch.testing.assert_close(fast, dense, rtol=1e-5, atol=2e-5)
    none = chunks(TurboQuantCache(model.config, "none"), "tqcache")
    assert torch.equal(none, chunks(DynamicCache(config=model.config), "sdpa"))
    seen.clear()
    ids2, mask = padded_batch(T=30)
    with torch.no_grad():
        cache = TurboQuantCache(model.config, cfg)
        model(ids2[:, :20], attention_mask=mask[:, :20], past_key_values=cache)
        model(ids2[:, 20:], attention_mask=mask, past_key_values=cache)
    assert seen and not any(seen[-2:])  # padding: the mask stays
    causal = A._causal(3, 5, "cpu")[0, 0]
    assert causal.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]



    model = llama(layers=3)
    cfg = parse_scheme("turbo3").replace(window=4, sinks=3, fp_layers=(0, -1), flush=1)
    cache = TurboQuantCache(model.config, cfg)
    ids, mask = padded_batch(T=20)
    teacher_forced(model, cache, ids, mask, 3)
    first, mid, last = cache.layers
    assert not first.compress and not last.compress and mid.compress
    assert first.n_compressed == 0 and first.win_k.shape[-2] == 23
    assert mid.n_sinks == 3 and mid.n_compressed == 23 - 3 - 4
    with torch.no_grad():
        ref_cache = DynamicCache(config=model.config)
        model.config._attn_implementation = "sdpa"
        teacher_forced(model, ref_cache, ids, mask, 3, impl="sdpa")
    assert torch.equal(mid.sink_k, ref_cache.layers[1].keys[:, :, :3])


def test_generate_greedy_sampling_beam_and_memory_accounting():
    model = llama(head_dim=32, layers=2)
    ids, mask = padded_batch(T=24)
    cache = TurboQuantCache(model.config, parse_scheme("turbo4").replace(window=4, sinks=0, flush=1))
    out = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=12, do_sample=False)
    assert out.shape == (2, 36)
    mem = cache.memory()
    # 35 tokens were cached (the last generated token is never fed back), 4 of them in the window.
    assert mem.compressed_tokens == 2 * (35 - 4) and mem.fp_tokens == 2 * 4
    per_token = 2 * (16 + 2)  # K and V: 32 dims x 4 bits = 16 B codes + fp16 norm, per head
    assert mem.compressed_used_bytes == per_token * 2 * 2 * (35 - 4) * 2  # x batch x kv heads x layers
    assert mem.bits_per_element == pytest.approx(8 * 18 / 32)
    alloc = sum(t.numel() * t.element_size() for L in cache.layers for s in (L.k_store, L.v_store) for t in s.values())
    assert mem.compressed_bytes == alloc >= mem.compressed_used_bytes
    assert cache.nbytes() == mem.total_bytes == alloc + mem.window_bytes
    assert mem.fp16_bytes == 2 * 2 * 2 * 32 * 2 * 35 * 2  # K+V x batch x heads x dim x bytes x tokens x layers

    torch.manual_seed(0)
    sampled = model.generate(ids, attention_mask=mask, past_key_values=TurboQuantCache(model.config, "turbo3"),
                             max_new_tokens=8, do_sample=True, top_k=20)
    assert sampled.shape == (2, 32)
    beams = model.generate(ids, attention_mask=mask, past_key_values=TurboQuantCache(model.config, "turbo4"),
                           max_new_tokens=8, num_beams=3, do_sample=False)
    assert beams.shape == (2, 32)


def test_beam_reorder_select_and_repeat_touch_every_storage():
    model = llama()
    cache = TurboQuantCache(model.config, parse_scheme("turbo4").replace(window=3, sinks=2))
    ids, mask = padded_batch(T=20)
    teacher_forced(model, cache, ids, mask, 2)
    before = cache.to_dynamic()
    cache.reorder_cache(torch.tensor([1, 0]))
    after = cache.to_dynamic()
    for a, b in zip(before.layers, after.layers):
        assert torch.equal(a.keys[0], b.keys[1]) and torch.equal(a.values[1], b.values[0])
    cache.batch_repeat_interleave(2)
    assert cache.layers[0].k_store["codes"].shape[0] == 4 and cache.layers[0].sink_k.shape[0] == 4
    cache.batch_select_indices(torch.tensor([0, 3]))
    again = cache.to_dynamic()
    assert torch.equal(again.layers[1].keys, after.layers[1].keys)


def test_crop_rolls_back_to_an_earlier_state():
    model = llama()
    cfg = plain("turbo3").replace(window=4, sinks=1)
    ids, mask = padded_batch(T=20)
    cache = TurboQuantCache(model.config, cfg)
    with torch.no_grad():
        model(ids[:, :12], attention_mask=mask[:, :12], past_key_values=cache)
        snapshot = [t.clone() for t in cache.to_dynamic().layers[0].keys]
        model(ids[:, 12:], attention_mask=mask, past_key_values=cache)
    cache.crop(-8)
    assert cache.get_seq_length() == 12
    now = cache.to_dynamic().layers[0].keys
    # Tokens compressed after the snapshot stay compressed: equal where the snapshot was compressed too.
    assert torch.allclose(now[..., :8, :], torch.stack(snapshot)[..., :8, :], atol=1e-6)
    # And the cache keeps working after a crop (assisted decoding continues from here).
    with torch.no_grad():
        model(ids[:, 12:], attention_mask=mask, past_key_values=cache)
    assert cache.get_seq_length() == 20


def test_conversion_both_ways_and_nested():
    from transformers.cache_utils import EncoderDecoderCache

    model = gemma(window=16)
    ids, mask = padded_batch(T=40)
    dyn = DynamicCache(config=model.config)
    teacher_forced(model, dyn, ids, mask, 2, impl="sdpa")
    tq = TurboQuantCache.from_dynamic(dyn, model.config, parse_scheme("turbo4").replace(window=4))
    assert tq.get_seq_length() == dyn.get_seq_length() == 42
    back = tq.to_dynamic()
    for a, b in zip(dyn.layers, back.layers):
        assert a.keys.shape == b.keys.shape
        cos = torch.nn.functional.cosine_similarity(a.keys.flatten(0, 2), b.keys.flatten(0, 2), dim=-1)
        assert cos.min() > 0.97
    assert back.get_seq_length() == 42
    nested = TurboQuantCache.from_dynamic(EncoderDecoderCache(dyn, DynamicCache()), model.config, "turbo4")
    assert isinstance(nested, EncoderDecoderCache)
    assert isinstance(nested.self_attention_cache, TurboQuantCache)


def test_dense_partial_matches_softmax_attention():
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(2, 6, 5, 16, generator=g), torch.randn(2, 2, 9, 16, generator=g), torch.randn(2, 2, 9, 16, generator=g)
    mask = torch.rand(2, 1, 5, 9, generator=g) > 0.3
    out, lse = dense_partial(q, k, v, mask, 0.25)
    kk, vv = k.repeat_interleave(3, 1), v.repeat_interleave(3, 1)
    s = (q @ kk.transpose(-1, -2) * 0.25).masked_fill(~mask, -math.inf)
    assert torch.allclose(out, torch.softmax(s, -1) @ vv, atol=1e-5)
    assert torch.allclose(lse, torch.logsumexp(s, -1), atol=1e-5)


def test_bad_scheme_names_list_valid_ones():
    model = llama()
    with pytest.raises(ValueError, match="valid names: none, turbo4"):
        TurboQuantCache(model.config, "turbo-fast")


def test_attention_paths_are_recorded():
    model = llama()
    cache = TurboQuantCache(model.config, parse_scheme("turbo4").replace(window=2))
    ids, mask = padded_batch(T=10)
    teacher_forced(model, cache, ids, mask, 3)
    assert cache.layers[0].paths.get("reference", 0) == 3  # the 3 decode steps read the compressed prefix
    assert tqcache.attention.tqcache_attention is not None


def test_shared_norm_codecs_are_read_by_the_attention_kernel_and_declined_by_the_encode_kernel():
    # Each kernel says itself what it covers: the attention kernel reads one norm shared by both segments,
    # the encode kernel (one rotation per segment) declines split="rotated", so the torch codec writes it.
    from tqcache.codec import make_codec
    from tqcache.kernels.attention import unsupported_reason
    from tqcache.kernels.encode import encode_unsupported_reason

    cfg = parse_scheme("k3.5v3-rot").key
    rot, chan = make_codec(cfg, 64), make_codec(dataclasses.replace(cfg, split="outliers"), 64)
    assert rot.shared_norm and not chan.shared_norm
    q = torch.randn(1, 2, 1, 64)
    assert unsupported_reason(q, rot, rot) is None and unsupported_reason(q, chan, chan) is None
    assert "rotated" in encode_unsupported_reason(rot) and encode_unsupported_reason(chan) is None


def test_query_aware_key_scaling_calibrates_on_the_prompt_and_its_queries():
    """With channel_scale on keys, the prompt stays full precision for one step while the attention
    observes its queries; the next update calibrates per KV head and compresses the prompt."""
    model = llama(head_dim=32, heads=4, kv_heads=2)
    base = parse_scheme("turbo3").replace(window=4, sinks=0)
    cfg = base.replace(key=dataclasses.replace(base.key, channel_scale=True))
    cache = TurboQuantCache(model.config, cfg)
    ids, mask = padded_batch(T=24)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    layer = cache.layers[0]
    assert layer.calibrating and layer.n_compressed == 0 and layer._q_count == 2 * 2 * 24  # B x G x Lq
    assert not bool(layer.k_codec.calibrated)
    with torch.no_grad():
        model(out.logits[:, -1:].argmax(-1), attention_mask=torch.cat([mask, mask[:, :1]], 1), past_key_values=cache)
    assert not layer.calibrating and bool(layer.k_codec.calibrated)
    assert layer.k_codec.channel_scale.shape == (2, 1, 32)
    report = layer.calibration_report  # the scaling is kept only where it lowered the prompt's attention KL
    assert report["scaled"] == (report["kl_scaled"] < report["kl_plain"])
    assert torch.allclose(layer.k_codec.channel_scale, torch.ones(2, 1, 32)) != report["scaled"]
    assert layer.n_compressed == 24 - 4  # the prompt's overflow; the step's own token waits for the flush (32)
    # Still exactly attention over the decoded cache.
    fast = teacher_forced(model, TurboQuantCache(model.config, cfg), ids, mask, 12)
    dense = teacher_forced(model, TurboQuantCache(model.config, cfg, dense=True), ids, mask, 12, impl="sdpa")
    assert torch.isfinite(fast).all()
    # The dense path cannot observe queries, so it calibrates on keys alone: same for steps before that.
    assert torch.allclose(fast[:1], dense[:1], atol=2e-5)


@pytest.mark.parametrize("window", [0, 4])
@pytest.mark.parametrize("prompt", [12, 40])
def test_sliding_ring_never_overwrites_a_token_its_step_still_sees(window, prompt):
    """At 8 bits the cache is near-lossless, so logits must track DynamicCache closely on sliding layers too,
    also once the ring wraps. (A ring that wrote a step's overflow before that step's attention ran reused
    the slot of the oldest visible token: |Δlogit| ~0.3 here, against ~0.003 for full-attention layers.)"""
    model = gemma(head_dim=32, window=16)
    ids = torch.randint(0, 96, (1, prompt), generator=torch.Generator().manual_seed(prompt + window))
    mask = torch.ones_like(ids)
    ref = teacher_forced(model, DynamicCache(config=model.config), ids, mask, 24)
    got = teacher_forced(model, TurboQuantCache(model.config, parse_scheme("turbo8").replace(window=window, sinks=0)),
                         ids, mask, 24)
    assert (got - ref).abs().max() < 0.03
