"""Passkey retrieval: can the model still find a number hidden deep in a compressed cache?

A random 5-digit pass key is hidden in filler text at a given depth of a context of a given length (in
tokens); the prompt ends by asking for it. Run for full precision and for each scheme:
``tqcache eval --passkey --schemes turbo4,turbo3 --models smollm2,gemma3``. Each case is answered twice by
greedy decoding through the cache, and passes when the first five digits of the answer equal the key:

* ``number_ok`` (the gate): the *first* answer token is restricted to tokens that can start a number
  (:func:`_digit_mask`), every later token is the plain argmax. A pass key is a number; this is the answer
  format constraint, and what is left is retrieval: the digits come from unconstrained greedy decoding.
* ``ok``: free greedy decoding. Small models (Gemma-3-270M) often answer "The pass key is" with
  " the key that you need to pass" instead of a number — a near tie between " the" and the number that any
  perturbation of the cache (8-bit keys too) flips either way, at full precision as well. Free greedy
  exact match measures that tie more than retrieval, so it is reported but does not gate.

``key_logp`` is the teacher-forced log-probability of the key's tokens after the question.

Filler: the classic one of the passkey test (Mohtashami & Jaggi, 2023, "Landmark Attention")::

    There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz
    you about the important information there.
    The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. (repeated)
    The pass key is 71432. Remember it. 71432 is the pass key.          (at the chosen depth)
    The grass is green. ... (repeated)
    What is the pass key? The pass key is

How the cache is exercised: the context (everything before the final ``What is the pass key? The pass key
is``) is prefilled in one forward pass with each scheme's cache, so the prompt is stored (and calibrated, and
compressed) as in real use; the question and the answer are then decoded *through the compressed cache*. (A
plain ``generate`` would compute the question's first token with the prefill's full-precision attention;
feeding the question as a second chunk makes retrieval go through the compressed cache.) ``fill="copy"``
instead prefills once in full precision and copies the keys/values into each cache through its ``update`` —
faster, and the same for caches that need no calibration, but a cache that calibrates on the prompt's
queries (query-aware key scaling) sees none that way.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import re
import sys
import time
from collections.abc import Callable, Sequence

import torch

from .evaluate import text_table

__all__ = ["PasskeyCase", "make_case", "run_passkey", "format_passkey_table", "run_cli"]

_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n"
)
_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
_QUESTION = "\nWhat is the pass key? The pass key is"


@dataclasses.dataclass
class PasskeyCase:
    length: int  # target context length in tokens (whole prompt)
    depth: float  # needle position as a fraction of the filler
    key: str
    context_ids: torch.Tensor  # [1, n] everything before the question
    question_ids: torch.Tensor  # [1, m]

    @property
    def n_tokens(self) -> int:
        return self.context_ids.shape[1] + self.question_ids.shape[1]


def _encode(tok, text: str, special: bool) -> list[int]:
    return tok(text, add_special_tokens=special).input_ids


def make_case(tok, length: int, depth: float, key: str) -> PasskeyCase:
    """Build the prompt of ``length`` tokens (±one filler sentence) with ``key`` at ``depth`` ∈ [0, 1]."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    intro = _encode(tok, _INTRO, True)
    needle = _encode(tok, _NEEDLE.format(key=key), False)
    question = _encode(tok, _QUESTION, False)
    unit = _encode(tok, _FILLER, False)
    budget = length - len(intro) - len(needle) - len(question)
    if budget < 0:
        raise ValueError(f"context length {length} is too short for the passkey prompt")
    n_units = max(1, round(budget / len(unit)))
    before = round(n_units * depth)
    filler_before = _FILLER * before
    filler_after = _FILLER * (n_units - before)
    context = _encode(tok, _INTRO + filler_before + _NEEDLE.format(key=key) + filler_after, True)
    return PasskeyCase(length, depth, key, torch.tensor([context]), torch.tensor([question]))


def _fill(cache, dense) -> None:
    """Store a prefilled full-precision ``DynamicCache``'s keys/values into ``cache`` as one prefill would."""
    for i, layer in enumerate(dense.layers):
        cache.update(layer.keys, layer.values, i)


def _greedy(model, cache, question_ids: torch.Tensor, max_new_tokens: int, first_mask=None) -> list[int]:
    """Greedy answer to the question through ``cache``; ``first_mask`` (bool ``[vocab]``) restricts the first
    token to the allowed ones, later tokens are the plain argmax."""
    out = model(input_ids=question_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    generated = []
    for i in range(max_new_tokens):
        logits = out.logits[0, -1]
        if i == 0 and first_mask is not None:
            logits = logits.masked_fill(~first_mask, float("-inf"))
        generated.append(int(logits.argmax()))
        if i + 1 < max_new_tokens:
            nxt = torch.tensor([generated[-1:]], device=question_ids.device)
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
    return generated


_DIGIT_MASKS: dict = {}


def _digit_mask(tok, n_vocab: int, device) -> torch.Tensor:
    """Bool ``[n_vocab]``: tokens that can start a numeric answer — text that is (after spaces) a digit first,
    or only spaces (tokenizers that split " 60494" into " ", "6", ...). Cached per tokenizer."""
    tok_hit, hit = _DIGIT_MASKS.get(id(tok), (None, None))
    if tok_hit is not tok or hit.shape[0] != n_vocab:  # an id can be reused by another tokenizer
        conv = getattr(tok, "convert_ids_to_tokens", None)
        n = min(n_vocab, len(tok)) if hasattr(tok, "__len__") else n_vocab
        texts = conv(list(range(n))) if conv is not None else [tok.decode([i]) for i in range(n)]
        ok = [bool(re.match(r"^[\s▁Ġ]*(\d|$)", t or "-")) for t in texts] + [False] * (n_vocab - n)
        hit = torch.tensor(ok)
        _DIGIT_MASKS[id(tok)] = (tok, hit)
    return hit.to(device)


def _key_score(model, tok, cache, question_ids: torch.Tensor, key: str) -> float:
    """Teacher-forced log p(key tokens | question): the question and the key go through ``cache`` as one chunk,
    so the needle is read from the cache as in the greedy runs."""
    key_ids = torch.tensor([_encode(tok, " " + key, False)], device=question_ids.device)
    ids = torch.cat([question_ids, key_ids], 1)
    logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[0].float()
    n_q, n_k = question_ids.shape[1], key_ids.shape[1]
    logp = torch.log_softmax(logits[n_q - 1 : n_q - 1 + n_k], -1)  # the positions that predict each key token
    return float(logp.gather(1, key_ids[0][:, None]).sum())


def _answer_ok(text: str, key: str) -> bool:
    digits = re.sub(r"\D", "", text)
    return digits[:5] == key


def run_passkey(
    model,
    tok,
    methods: Sequence,
    *,
    lengths: Sequence[int] = (1024, 2048, 4096, 6144),
    depths: Sequence[float] = (0.1, 0.5, 0.9),
    trials: int = 1,
    seed: int = 0,
    max_new_tokens: int = 7,
    progress: Callable[[], None] | None = None,
    fill: str = "prefill",
) -> list[dict]:
    """Run every case for full precision (``"full"``) and each method; one row per (method, case).

    ``methods`` are :class:`tqcache.evaluate.Method` objects (their ``make_cache(model)`` gives a cache).
    ``fill``: ``"prefill"`` (each scheme prefills the context itself) or ``"copy"`` (see the module docstring).
    """
    if fill not in ("prefill", "copy"):
        raise ValueError(f"fill must be 'prefill' or 'copy', got {fill!r}")
    from transformers import DynamicCache

    rng = random.Random(seed)
    device = next(model.parameters()).device
    rows = []
    mask = _digit_mask(tok, model.get_output_embeddings().weight.shape[0], device)
    with torch.inference_mode():
        for length in lengths:
            for depth in depths:
                for trial in range(trials):
                    key = str(rng.randint(10000, 99999))
                    case = make_case(tok, length, depth, key)
                    ctx, q = case.context_ids.to(device), case.question_ids.to(device)
                    t0 = time.perf_counter()
                    # All-full layers so that every layer keeps every token (sliding layers are masked).
                    dense = DynamicCache()
                    model(input_ids=ctx, past_key_values=dense, use_cache=True, logits_to_keep=1)
                    prefill_s = time.perf_counter() - t0
                    for method in [None, *methods]:
                        t1 = time.perf_counter()
                        if method is None:
                            name, cache = "full", copy.deepcopy(dense)
                        else:
                            name, cache = method.name, method.make_cache(model)
                            if fill == "copy":
                                _fill(cache, dense)
                            else:
                                model(input_ids=ctx, past_key_values=cache, use_cache=True, logits_to_keep=1)
                        key_logp = _key_score(model, tok, copy.deepcopy(cache), q, key)
                        number = _greedy(model, copy.deepcopy(cache), q, max_new_tokens, first_mask=mask)
                        number_text = tok.decode(number, skip_special_tokens=True)
                        text = tok.decode(_greedy(model, cache, q, max_new_tokens), skip_special_tokens=True)
                        rows.append(
                            {
                                "scheme": name,
                                "length": length,
                                "tokens": case.n_tokens,
                                "depth": depth,
                                "trial": trial,
                                "key": key,
                                "answer": text,
                                "ok": _answer_ok(text, key),
                                "number_answer": number_text,
                                "number_ok": _answer_ok(number_text, key),
                                "key_logp": key_logp,
                                "wall_s": time.perf_counter() - t1 + (prefill_s if method is None else 0.0),
                            }
                        )
                        if progress is not None:
                            progress()
                    del dense
    return rows


def _frac(hits: Sequence[bool]) -> str:
    return f"{sum(hits)}/{len(hits)}"


def format_passkey_table(rows: Sequence[dict]) -> str:
    """Per model: free greedy correct / cases per scheme (rows) and context length (columns) and over all
    ("all"), then the gate (number-constrained greedy, "number") and the mean log p(key). Old rows without
    ``number_ok`` show their teacher-forced ``digits_ok`` in its place, in a column named "digits"."""
    out = []
    models = list(dict.fromkeys(r.get("model", "?") for r in rows))
    for model in models:
        rs = [r for r in rows if r.get("model", "?") == model]
        lengths = sorted({r["length"] for r in rs})
        schemes = list(dict.fromkeys(r["scheme"] for r in rs))
        gate = "number_ok" if any("number_ok" in r for r in rs) else "digits_ok"
        head = ["scheme"] + [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths] + ["all"]
        table = [head]
        for s in schemes:
            mine = [r for r in rs if r["scheme"] == s]
            cells = [s] + [_frac([r["ok"] for r in mine if r["length"] == n]) for n in lengths]
            cells.append(_frac([r["ok"] for r in mine]))
            hit = [r[gate] for r in mine if gate in r]
            lp = [r["key_logp"] for r in mine if "key_logp" in r]
            if hit:
                cells += [_frac(hit), f"{sum(lp) / len(lp):.2f}" if lp else "-"]
            table.append(cells)
        if any(gate in r for r in rs):
            head += ["number" if gate == "number_ok" else "digits", "log p(key)"]
        what = ("number = greedy with the first token a number's (the gate)" if gate == "number_ok"
                else "digits = the key's digits retrieved teacher-forced, first token among digit tokens")
        out.append(f"== {model} (passkey: free greedy answer correct / cases per context length; {what})")
        out.extend(text_table(table))
        out.append("")
    return "\n".join(out)


def run_cli(args, models: Sequence[str], dtype: torch.dtype) -> int:
    """``tqcache eval --passkey``: the schemes from ``--schemes`` (``none`` is implied as ``full``)."""
    from .evaluate import _expand_schemes, _load_model, _progress, make_method, save_results
    from . import peers

    schemes = [s for s in _expand_schemes(args.schemes) if s != "none"]
    methods = []
    for s in schemes:
        if peers.is_peer(s):
            why = peers.peer_available(peers.parse_peer(s).backend)
            if why:
                print(f"skipping peer {s}: {why}", file=sys.stderr)
                continue
        methods.append(make_method(s))
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    depths = [float(x) for x in args.depths.split(",") if x.strip()]
    total = len(models) * len(lengths) * len(depths) * args.trials * (len(methods) + 1)
    bar = _progress(total, args.progress)
    rows: list[dict] = []
    try:
        for name in models:
            model, tok, fp = _load_model(name, dtype, args.device)
            bar.set_description(f"passkey {name}")
            for r in run_passkey(model, tok, methods, lengths=lengths, depths=depths, trials=args.trials,
                                 seed=args.seed, progress=lambda: bar.update(1)):  # fmt: skip
                r["model"] = name
                rows.append(r)
            del model
    finally:
        bar.close()
    print(format_passkey_table(rows))
    if args.out:
        meta = {"lengths": lengths, "depths": depths, "trials": args.trials, "seed": args.seed}
        for p in save_results(rows, meta, args.out, stem=args.name or "fidelity_passkey", plot=False):
            print(f"wrote {p}")
    return 0
