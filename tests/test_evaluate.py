"""Fidelity protocol (tqcache.evaluate), peers and passkey on a tiny random-weight Llama (no tokenizer files)."""

from __future__ import annotations

import io
import json
import math
import types

import pytest
import torch

import tqcache  # registers the "tqcache" attention implementation
from tqcache import evaluate, passkey, peers
from tqcache.config import parse_scheme

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402


class ByteTokenizer:
    """Tokenizer-free path: token id = byte value (vocab 256), no special tokens."""

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        ids = list(text.encode("utf-8"))
        return types.SimpleNamespace(input_ids=torch.tensor([ids]) if return_tensors == "pt" else ids)

    def decode(self, ids, skip_special_tokens=True):
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def tiny_model(seed: int = 0, attn: str = "tqcache"):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
    )  # fmt: skip
    cfg._attn_implementation = attn
    return LlamaForCausalLM(cfg).eval()


TEXT = "It was the best of times, it was the worst of times, it was the age of wisdom. " * 8


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def loader(model):
    return lambda name: (model, ByteTokenizer(), None)


class NoisyCache(DynamicCache):
    """A deliberately perturbed method: Gaussian noise on every stored key."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        g = torch.Generator().manual_seed(layer_idx)
        noisy = key_states + 0.5 * torch.randn(key_states.shape, generator=g).to(key_states)
        return super().update(noisy, value_states, layer_idx, *args, **kwargs)


def dyn_method(name="dynamic", cls=DynamicCache):
    return evaluate.Method(name, "test", lambda m: cls(), lambda c: (16.0, 0.0, 16.0))


# ------------------------------------------------------------------------------------------ metrics
def test_compare_logprobs_hand_checked():
    p = torch.tensor([[0.5, 0.5], [0.7, 0.3]]).log()
    q = torch.tensor([[0.25, 0.75], [0.6, 0.4]]).log()
    kl, agree, nll = evaluate.compare_logprobs(p, q, torch.tensor([0, 1]))
    assert kl[0].item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75), abs=1e-7)
    assert kl[1].item() == pytest.approx(0.7 * math.log(0.7 / 0.6) + 0.3 * math.log(0.3 / 0.4), abs=1e-7)
    assert agree.tolist() == [False, True]
    assert nll.tolist() == pytest.approx([math.log(4), -math.log(0.4)])


def test_kl_zero_probability_terms_are_zero():
    p = torch.log(torch.tensor([[1.0, 0.0]]))
    q = torch.log(torch.tensor([[0.5, 0.5]]))
    kl, _, _ = evaluate.compare_logprobs(p, q, torch.tensor([0]))
    assert kl.item() == pytest.approx(math.log(2))


def test_step_metrics_summary_perplexity():
    m = evaluate.StepMetrics()
    ref = torch.tensor([0.5, 0.5]).log()
    m.add(ref, torch.tensor([0.5, 0.5]).log(), 0)  # nll ln 2, agree, kl 0
    m.add(ref, torch.tensor([0.25, 0.75]).log(), 0)  # nll ln 4
    s = m.summary(ref_nll=[math.log(2), math.log(2)])
    assert s["ppl"] == pytest.approx(math.sqrt(8))
    assert s["ppl_ref"] == pytest.approx(2.0)
    assert s["dppl"] == pytest.approx(100 * (math.sqrt(8) / 2 - 1))
    assert s["kl_mean"] == pytest.approx(0.5 * (0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75)))
    assert s["top1"] == 50.0  # argmax of [0.25, 0.75] is 1, of the tied reference 0


# ------------------------------------------------------------------------------------------ protocol
def test_dynamic_cache_against_itself_is_exactly_zero(model):
    rows, meta = evaluate.run_fidelity(
        ["tiny"], [dyn_method(), "none"], text=TEXT, prefill=48, steps=12, loader=loader(model), progress=False
    )
    for r in rows:
        assert r["kl_mean"] == 0.0 and r["kl_max"] == 0.0
        assert r["top1"] == 100.0
        assert r["dppl"] == 0.0
    assert meta["models"]["tiny"]["ppl_ref"] == pytest.approx(rows[0]["ppl"])


def test_perturbed_method_has_positive_kl(model):
    rows, _ = evaluate.run_fidelity(
        ["tiny"], [dyn_method("noisy", NoisyCache)], text=TEXT, prefill=48, steps=12, loader=loader(model),
        progress=False,
    )  # fmt: skip
    assert rows[0]["kl_mean"] > 1e-6


def test_reference_nll_matches_teacher_forced_targets(model):
    ids = ByteTokenizer()(TEXT, return_tensors="pt").input_ids[:, :40]
    ref = evaluate.reference_run(model, ids, prefill=30, steps=9)
    # One full forward over the sequence gives the same next-token log-probs (causal LM).
    with torch.inference_mode():
        full = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    for i in range(9):
        target = int(ids[0, 30 + i + 1])
        assert ref.targets[i].item() == target
        assert ref.nll[i] == pytest.approx(-full[30 + i, target].item(), abs=1e-4)


def test_compressed_scheme_runs_and_counts_bits(model):
    cfg = parse_scheme("turbo2").replace(window=0, sinks=0, flush=1, name="turbo2 w0")
    rows, _ = evaluate.run_fidelity(["tiny"], [cfg], text=TEXT, prefill=48, steps=8, loader=loader(model), progress=False)
    r = rows[0]
    assert r["scheme"] == "turbo2 w0"
    assert r["kl_mean"] > 0
    assert 2.0 < r["bits_per_element"] < 4.0  # 2-bit codes + one 16-bit norm per 16-dim vector = 3
    assert r["window_tokens"] == 0 and r["total_bits"] == pytest.approx(r["bits_per_element"])


def test_text_too_short_is_an_error(model):
    with pytest.raises(ValueError, match="tokens"):
        evaluate.run_fidelity(["tiny"], ["none"], text="short", prefill=48, steps=8, loader=loader(model), progress=False)


def test_progress_bar_without_a_tty(model, monkeypatch):
    fake = io.StringIO()  # not a TTY
    monkeypatch.setattr("sys.stderr", fake)
    for progress in (None, True, False):
        rows, _ = evaluate.run_fidelity(
            ["tiny"], ["none"], text=TEXT, prefill=40, steps=4, loader=loader(model), progress=progress
        )
        assert rows[0]["kl_mean"] == 0.0
    assert "reference ppl" in fake.getvalue()


def test_json_and_png_written(model, tmp_path):
    cfg = parse_scheme("turbo3").replace(window=0, sinks=0, name="turbo3 w0")
    rows, meta = evaluate.run_fidelity(
        ["tiny"], ["none", cfg], text=TEXT, prefill=48, steps=6, loader=loader(model), progress=False
    )
    paths = evaluate.save_results(rows, meta, tmp_path / "out")
    data = json.loads((tmp_path / "out" / "fidelity.json").read_text())
    assert [r["scheme"] for r in data["results"]] == ["none", "turbo3 w0"]
    assert data["meta"]["steps"] == 6 and "torch" in data["environment"]
    png = (tmp_path / "out" / "fidelity.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert len(paths) == 2
    table = evaluate.format_table(rows)
    assert "turbo3 w0" in table and "mean KL" in table
    assert "| none |" in evaluate.format_table(rows, markdown=True)


def test_cli_eval_end_to_end(model, tmp_path, monkeypatch, capsys):
    from tqcache import cli

    monkeypatch.setattr(evaluate, "_load_model", lambda name, dtype, device: (model, ByteTokenizer(), None))
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    rc = cli.main(["eval", "--models", "tiny", "--schemes", "none,turbo4", "--prefill", "40", "--steps", "4",
                   "--text", str(text), "--out", str(tmp_path / "o"), "--no-progress"])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "turbo4" in out and (tmp_path / "o" / "fidelity.json").exists()
    assert cli.main(["eval", "--schemes", "turbo4,nonsense"]) == 1  # typo fails before any model loads


def test_default_text_is_bundled_real_prose():
    text = evaluate.default_text()
    assert text.startswith("Chapter 1") and "Sir Walter Elliot" in text
    assert len(text.split()) > 5000


# ------------------------------------------------------------------------------------------ ablations
def test_ablation_configs_are_valid_and_distinct():
    triples = evaluate.ablation_configs("turbo3")
    labels = [label for _, label, _ in triples]
    assert len(labels) == len(set(labels))
    groups = {g for g, _, _ in triples}
    for g in ("rotation", "norm correction", "qjl", "kv split", "fractional", "window", "sinks", "fp layers", "channel scale"):
        assert g in groups
    by = {label: cfg for _, label, cfg in triples}
    assert by["turbo3 haar"].key.rotation == "haar"
    assert by["turbo3 qjl"].key.qjl and by["turbo3 qjl"].key.bits == 3
    assert by["turbo3 w0"].window == 0 and by["turbo3 fp0,-1"].fp_layers == (0, -1)
    assert {cfg.flush for cfg in by.values()} == {1}  # w0 keeps no full-precision token while decoding either


# ------------------------------------------------------------------------------------------ peers
def test_peer_names_parse():
    s = peers.parse_peer("hqq3-r32-a1-g32")
    assert (s.backend, s.nbits, s.residual_length, s.axis, s.q_group_size) == ("hqq", 3, 32, 1, 32)
    assert peers.parse_peer("quanto4").residual_length == 128
    assert not peers.is_peer("turbo4")


def test_missing_peer_is_skipped_cleanly(model, monkeypatch):
    monkeypatch.setattr(peers, "peer_available", lambda backend: "not installed (pip install x)")
    rows, meta = evaluate.run_fidelity(
        ["tiny"], ["none", "hqq4"], text=TEXT, prefill=40, steps=2, loader=loader(model), progress=False
    )
    assert [r["scheme"] for r in rows] == ["none"]
    assert meta["skipped"][0]["scheme"] == "hqq4"


@pytest.mark.parametrize("name", ["quanto4", "hqq2"])
def test_peer_cache_runs_and_counts_bits(model, name):
    backend = peers.parse_peer(name).backend
    if peers.peer_available(backend):
        pytest.skip(peers.peer_available(backend))
    rows, _ = evaluate.run_fidelity(
        ["tiny"], [name + "-r0", name + "-r8"], text=TEXT, prefill=48, steps=10, loader=loader(model), progress=False
    )
    nbits = peers.parse_peer(name).nbits
    for r in rows:
        # codes + a 16-bit scale and zero per 64-element group
        assert r["bits_per_element"] == pytest.approx(nbits + 32 / 64)
        assert r["kl_mean"] >= 0
    assert rows[0]["window_tokens"] <= 1
    assert rows[1]["total_bits"] > rows[1]["bits_per_element"]


# ------------------------------------------------------------------------------------------ passkey
def test_passkey_case_layout():
    tok = ByteTokenizer()
    case = passkey.make_case(tok, 2000, 0.5, "12345")
    text = tok.decode(case.context_ids[0].tolist())
    pos = text.index("The pass key is 12345")
    assert 0.4 < pos / len(text) < 0.6
    assert abs(case.n_tokens - 2000) < 100
    assert tok.decode(case.question_ids[0].tolist()).endswith("The pass key is")
    assert passkey._answer_ok(" 12345. Remember", "12345") and not passkey._answer_ok(" 1234", "12345")


@pytest.mark.parametrize("fill", ["prefill", "copy"])
def test_passkey_runs_for_full_and_scheme(model, fill):
    rows = passkey.run_passkey(
        model, ByteTokenizer(), [evaluate.make_method("turbo4")], lengths=(300,), depths=(0.5,), max_new_tokens=3,
        fill=fill,
    )  # fmt: skip
    assert [r["scheme"] for r in rows] == ["full", "turbo4"]
    for r in rows:
        assert isinstance(r["ok"], bool) and isinstance(r["number_ok"], bool) and "digits_ok" not in r
        assert r["number_answer"][:1].isdigit() or r["number_answer"][:1].isspace()  # the first token a number's
        assert math.isfinite(r["key_logp"]) and r["key_logp"] < 0
        r["model"] = "tiny"
    table = passkey.format_passkey_table(rows)
    assert "turbo4" in table and "number" in table and "log p(key)" in table


class WordFirstModel(torch.nn.Module):
    """Stub LM over bytes: the first answer token's argmax is "t" (a word), its runner-up "4"; after that it
    spells the rest of "42345..." from the last token (the answer to "t" is "he ...")."""

    def forward(self, input_ids, past_key_values=None, use_cache=True, logits_to_keep=0):
        last = int(input_ids[0, -1])
        logits = torch.zeros(1, input_ids.shape[1], 256)
        nxt = {ord("s"): {ord("t"): 2.0, ord("4"): 1.0}, ord("t"): {ord("h"): 1.0}, ord("4"): {ord("2"): 1.0},
               ord("2"): {ord("3"): 1.0}, ord("3"): {ord("4"): 1.0}}.get(last, {ord("e"): 1.0})  # fmt: skip
        for tok, v in nxt.items():
            logits[0, -1, tok] = v
        return types.SimpleNamespace(logits=logits)


def test_passkey_number_constrained_greedy_starts_with_a_number():
    tok, stub = ByteTokenizer(), WordFirstModel()
    q = torch.tensor([list(b"The pass key is")])
    mask = passkey._digit_mask(tok, 256, "cpu")
    assert mask[ord("4")] and mask[ord(" ")] and not mask[ord("t")]
    free = tok.decode(passkey._greedy(stub, None, q, 3))
    number = tok.decode(passkey._greedy(stub, None, q, 3, first_mask=mask))
    assert free == "the" and number == "423"  # free greedy answers with words; constrained, with the digits
    assert not passkey._answer_ok(free, "42345") and passkey._answer_ok(number + "45", "42345")


def _row(scheme, length, ok, **kw):
    return {"model": "m", "scheme": scheme, "length": length, "ok": ok, "key_logp": -1.0, **kw}


def test_passkey_table_has_free_greedy_and_number_columns():
    rows = [_row("full", 1024, False, number_ok=True), _row("full", 2048, True, number_ok=True),
            _row("turbo4", 1024, False, number_ok=False), _row("turbo4", 2048, True, number_ok=True)]  # fmt: skip
    lines = passkey.format_passkey_table(rows).splitlines()
    assert lines[1].split() == ["scheme", "1K", "2K", "all", "number", "log", "p(key)"]
    assert lines[3].split() == ["full", "0/1", "1/1", "1/2", "2/2", "-1.00"]
    assert lines[4].split() == ["turbo4", "0/1", "1/1", "1/2", "1/2", "-1.00"]


def test_passkey_table_reads_old_rows():
    # Rows saved before number_ok: teacher-forced digits_ok stands in, labelled "digits"; older ones have neither.
    lines = passkey.format_passkey_table([_row("full", 1024, False, digits_ok=True)]).splitlines()
    assert lines[1].split() == ["scheme", "1K", "all", "digits", "log", "p(key)"]
    assert lines[3].split() == ["full", "0/1", "0/1", "1/1", "-1.00"]
    lines = passkey.format_passkey_table([{"scheme": "full", "length": 1024, "ok": True}]).splitlines()
    assert lines[1].split() == ["scheme", "1K", "all"] and lines[3].split() == ["full", "1/1", "1/1"]


def test_passkey_key_score_is_the_teacher_forced_log_probability(model):
    # Through an empty cache the score is log p(key | question) of a plain forward pass.
    tok = ByteTokenizer()
    q = torch.tensor([list(b"What is the pass key? The pass key is")])
    cache = evaluate.make_method("turbo4").make_cache(model)
    with torch.no_grad():
        logp = passkey._key_score(model, tok, cache, q, "12345")
        ids = torch.cat([q, torch.tensor([list(b" 12345")])], 1)
        lp = torch.log_softmax(model(ids).logits[0].float(), -1)
    want = sum(float(lp[q.shape[1] - 1 + i, ids[0, q.shape[1] + i]]) for i in range(6))
    assert logp == pytest.approx(want, abs=1e-4)


# ------------------------------------------------------------------------------------------ real model
@pytest.mark.slow
def test_real_model_short_protocol():
    models = pytest.importorskip("tqcache.models")
    try:
        model, tok = models.load("smollm2", dtype=torch.float32, device="cpu", attn_implementation="tqcache")
    except Exception as e:  # bundled model package not installed
        pytest.skip(f"smollm2 not loadable: {e}")
    rows, _ = evaluate.run_fidelity(
        ["smollm2"], ["none", "turbo4"], prefill=128, steps=16, loader=lambda n: (model, tok, None), progress=False
    )
    none, t4 = rows
    assert none["kl_mean"] == 0.0 and none["top1"] == 100.0
    assert 0 < t4["kl_mean"] < 0.1
    assert 4.0 < t4["bits_per_element"] < 4.5
