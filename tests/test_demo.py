"""`tqcache demo` end to end on a tiny random-weight Llama (no download): capture K/V, quantize, table, JSON."""

from __future__ import annotations

import importlib
import json
import sys
import types
import zlib

import pytest
import torch

transformers = pytest.importorskip("transformers")

import tqcache  # noqa: E402
from tqcache import demo  # noqa: E402
from tqcache.codec import expected_mse  # noqa: E402

VOCAB = 256
HEAD_DIM = 64
LAYERS = 3


class WordTokenizer:
    """Deterministic stand-in for a HF tokenizer: one id per whitespace-separated word (crc32 mod vocab)."""

    def __call__(self, text, return_tensors=None):
        ids = [zlib.crc32(w.encode()) % VOCAB for w in text.split()]
        return {"input_ids": torch.tensor([ids], dtype=torch.long)}


def tiny_llama():
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=HEAD_DIM,
        max_position_embeddings=1024,
    )
    torch.manual_seed(0)  # random init only; the codecs themselves never touch the global RNG
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture
def fake_load(monkeypatch):
    """Patch ``tqcache.models.load`` (creating a stand-in module if models.py is not there)."""
    calls = []

    def load(name, dtype=torch.float32, device="cpu", attn_implementation=None):
        calls.append(dict(name=name, dtype=dtype, device=device, attn_implementation=attn_implementation))
        return tiny_llama(), WordTokenizer()

    try:
        models = importlib.import_module("tqcache.models")
    except ImportError:
        models = types.ModuleType("tqcache.models")
        monkeypatch.setitem(sys.modules, "tqcache.models", models)
        monkeypatch.setattr(tqcache, "models", models, raising=False)
    monkeypatch.setattr(models, "load", load, raising=False)
    return calls


def parse(argv):
    import argparse

    p = argparse.ArgumentParser()
    demo.add_arguments(p)
    return p.parse_args(argv)


def test_demo_table_on_tiny_llama(fake_load, tmp_path, capsys):
    out = tmp_path / "demo.json"
    threads = torch.get_num_threads()
    rc = demo.run(parse(["--json", str(out), "--no-progress"]))
    assert rc == 0
    assert torch.is_grad_enabled() and torch.get_num_threads() == threads  # no global state changed
    assert fake_load == [dict(name="smollm2", dtype=torch.float32, device="cpu", attn_implementation="sdpa")]
    printed = capsys.readouterr().out
    assert "turbo2.5" in printed and "affine4-g32" in printed and "K rel-MSE" in printed

    res = json.loads(out.read_text())
    assert res["layers"] == LAYERS and res["head_dim"] == HEAD_DIM and res["kv_heads"] == 2
    assert res["tokens"] == len(demo.DEFAULT_TEXT.split())
    assert len(res["per_layer"]) == LAYERS
    rows = {r["scheme"]: r for r in res["rows"]}
    assert list(rows) == ["turbo2", "turbo2.5", "turbo3", "turbo3.5", "turbo4", "affine4-g32"]

    # Bits per element at head_dim 64, every stored byte counted:
    #   turbo2: 16 B codes + 2 B norm = 18 B / 64;  turbo2.5: 12 + 8 B codes + 2 norms = 24 B
    #   turbo3: 24 + 2;  turbo3.5: 16 + 12 + 4;  turbo4: 32 + 2;  affine4 g32: 32 B + 2 scales + 2 zeros (fp16).
    expected_bits = {"turbo2": 18, "turbo2.5": 24, "turbo3": 26, "turbo3.5": 32, "turbo4": 34, "affine4-g32": 40}
    for name, nbytes in expected_bits.items():
        for role in ("key", "value"):
            assert rows[name][role]["bits_per_element"] == pytest.approx(8 * nbytes / HEAD_DIM)
        assert rows[name]["bits_per_element"] == pytest.approx(8 * nbytes / HEAD_DIM)

    # More bits, lower error and higher cosine, for K and for V.
    turbo = ["turbo2", "turbo2.5", "turbo3", "turbo3.5", "turbo4"]
    for role in ("key", "value"):
        mse = [rows[n][role]["rel_mse"] for n in turbo]
        cos = [rows[n][role]["cosine"] for n in turbo]
        assert all(a > b for a, b in zip(mse, mse[1:])), (role, mse)
        assert all(a < b for a, b in zip(cos, cos[1:])), (role, cos)
        assert 0 < mse[-1] < mse[0] < 0.2
        assert 0.9 < cos[0] < cos[-1] < 1.0
        # TurboQuant's distortion does not depend on the data: near the unit-vector Lloyd–Max values.
        for b in (2, 3, 4):
            assert rows[f"turbo{b}"][role]["rel_mse"] == pytest.approx(expected_mse(HEAD_DIM, b), rel=0.35)
    # Per-layer numbers are there and consistent with the averages.
    k3 = [layer["turbo3"]["key"]["rel_mse"] for layer in res["per_layer"]]
    assert sum(k3) / LAYERS == pytest.approx(rows["turbo3"]["key"]["rel_mse"])


def test_demo_options_text_bits_and_cli(fake_load, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune " * 4)
    from tqcache import cli

    rc = cli.main(["demo", "--model", "gemma3", "--text", str(text), "--bits", "2", "4", "--affine-bits", "0", "--max-tokens", "40"])
    assert rc == 0
    assert fake_load[-1]["name"] == "gemma3"
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith(("turbo", "affine"))]
    assert [ln.split()[0] for ln in lines] == ["turbo2", "turbo4"]
    assert "40 prompt tokens" in out


@pytest.mark.parametrize(
    "argv, shown",
    [
        (["--bits", "3.3"], "3.3"),
        (["--bits", "0"], "got 0"),
        (["--affine-bits", "9"], "9"),
        (["--text", "/nonexistent/file.txt"], "/nonexistent/file.txt"),
        (["--max-tokens", "0"], "got 0"),
        (["--threads", "-1"], "got -1"),
    ],
)
def test_demo_bad_options_name_the_value(fake_load, argv, shown):
    with pytest.raises((ValueError, FileNotFoundError), match=shown.replace(".", r"\.")):
        demo.run(parse(argv + ["--no-progress"]))


def test_capture_kv_shapes():
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (1, 17), generator=torch.Generator().manual_seed(1))
    kv = demo.capture_kv(model, ids)
    assert len(kv) == LAYERS
    for k, v in kv:
        assert k.shape == v.shape == (1, 2, 17, HEAD_DIM)
        assert k.abs().sum() > 0 and v.abs().sum() > 0
