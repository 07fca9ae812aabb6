"""`tqcache demo`: quantize the real keys and values of a bundled model and print a fidelity table.

The job (README Quick start): load a bundled pretrained model (:func:`tqcache.models.load`, SmolLM2-135M by
default), prefill one real English paragraph (the opening of Jane Austen's *Persuasion*, 1818, public domain;
or ``--text FILE``), capture every layer's keys and values from the ``transformers.DynamicCache`` (keys after
RoPE, exactly what a KV cache stores: ``cache.layers[i].keys`` ``[B, H_kv, T, head_dim]``), and quantize
them with TurboQuant at several bit-widths and with the affine min/max group quantizer (the baseline of
KIVI-style and transformers' quantized caches). Each layer uses its own seed, derived as the cache derives
it (``derive_seed(seed, layer, 0)`` for keys, ``(seed, layer, 1)`` for values).

Table columns, separately for K and V and averaged over layers:

* ``bits/el`` — stored bits per element with all metadata (norms, scales, zero points), from
  :attr:`Packed.bits_per_element`; an fp16 cache is 16.
* ``rel-MSE`` — ``Σ‖x − x̂‖² / Σ‖x‖²`` over the layer's vectors.
* ``cos`` — mean cosine similarity between each vector and its reconstruction.

Example::

    tqcache demo                                  # SmolLM2-135M, TurboQuant 2/2.5/3/3.5/4 bits + affine4
    tqcache demo --model gemma3 --bits 2 3 4 --json out/demo.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from .codec import derive_seed, make_codec
from .config import CodecConfig

__all__ = ["DEFAULT_TEXT", "add_arguments", "run", "capture_kv", "measure", "format_table"]

# Jane Austen, *Persuasion* (1818), the opening of chapter 1 (public domain; ~350 words).
DEFAULT_TEXT = """\
Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who,
for his own amusement, never took up any book but the Baronetage; there
he found occupation for an idle hour, and consolation in a distressed
one; there his faculties were roused into admiration and respect, by
contemplating the limited remnant of the earliest patents; there any
unwelcome sensations, arising from domestic affairs changed naturally
into pity and contempt as he turned over the almost endless creations
of the last century; and there, if every other leaf were powerless, he
could read his own history with an interest which never failed.  This
was the page at which the favourite volume always opened:

           "ELLIOT OF KELLYNCH HALL.

"Walter Elliot, born March 1, 1760, married, July 15, 1784, Elizabeth,
daughter of James Stevenson, Esq. of South Park, in the county of
Gloucester, by which lady (who died 1800) he has issue Elizabeth, born
June 1, 1785; Anne, born August 9, 1787; a still-born son, November 5,
1789; Mary, born November 20, 1791."

Precisely such had the paragraph originally stood from the printer's
hands; but Sir Walter had improved it by adding, for the information of
himself and his family, these words, after the date of Mary's birth--
"Married, December 16, 1810, Charles, son and heir of Charles Musgrove,
Esq. of Uppercross, in the county of Somerset," and by inserting most
accurately the day of the month on which he had lost his wife.

Then followed the history and rise of the ancient and respectable
family, in the usual terms; how it had been first settled in Cheshire;
how mentioned in Dugdale, serving the office of high sheriff,
representing a borough in three successive parliaments, exertions of
loyalty, and dignity of baronet, in the first year of Charles II, with
all the Marys and Elizabeths they had married; forming altogether two
handsome duodecimo pages, and concluding with the arms and
motto:--"Principal seat, Kellynch Hall, in the county of Somerset," and
Sir Walter's handwriting again in this finale:--

"Heir presumptive, William Walter Elliot, Esq., great grandson of the
second Sir Walter."
"""

DEFAULT_BITS = (2.0, 2.5, 3.0, 3.5, 4.0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2", help="bundled model: smollm2 (default) or gemma3")
    parser.add_argument("--text", metavar="FILE", help="prefill this UTF-8 text file instead of the built-in paragraph")
    parser.add_argument(
        "--bits", type=float, nargs="+", default=list(DEFAULT_BITS), metavar="B",
        help="TurboQuant bit-widths, fractional allowed (default: 2 2.5 3 3.5 4)",
    )
    parser.add_argument("--affine-bits", type=int, default=4, metavar="B", help="affine baseline bits (0: no baseline; default 4)")
    parser.add_argument("--group-size", type=int, default=32, metavar="G", help="affine baseline group size (default 32)")
    parser.add_argument("--max-tokens", type=int, default=4096, metavar="N", help="truncate the prefill to N tokens (default 4096)")
    parser.add_argument("--seed", type=int, default=0, help="base seed of the rotations (default 0)")
    parser.add_argument("--device", default="cpu", help="torch device for the model and codecs (default cpu)")
    parser.add_argument(
        "--threads", type=int, default=0, metavar="N",
        help="torch CPU threads (default 0: torch's default; 1 is faster on a busy machine)",
    )
    parser.add_argument("--json", metavar="OUT", help="also write the table (and per-layer numbers) as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _schemes(bits: list[float], affine_bits: int, group_size: int) -> list[tuple[str, CodecConfig]]:
    out = []
    for b in bits:
        out.append((f"turbo{b:g}", CodecConfig("turbo", b)))
    if affine_bits:
        out.append((f"affine{affine_bits}-g{group_size}", CodecConfig("affine", affine_bits, group_size=group_size)))
    return out


def _read_text(path: str | None) -> str:
    if path is None:
        return DEFAULT_TEXT
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--text: no such file: {path}")
    text = p.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"--text: {path} is empty")
    return text


@torch.no_grad()
def capture_kv(model, input_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Prefill ``input_ids [1, T]`` and return every layer's cached ``(keys, values)``, each ``[B, H_kv, T, d]``."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    model(input_ids=input_ids, past_key_values=cache, use_cache=True)
    if hasattr(cache, "layers"):  # transformers >= 4.56 / 5.x
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))  # older releases


def _metrics(x: torch.Tensor, xh: torch.Tensor) -> tuple[float, float]:
    x, xh = x.float().reshape(-1, x.shape[-1]), xh.float().reshape(-1, x.shape[-1])
    rel = ((x - xh).pow(2).sum() / x.pow(2).sum().clamp_min(1e-30)).item()
    cos = torch.nn.functional.cosine_similarity(x, xh, dim=-1, eps=1e-12).mean().item()
    return rel, cos


@torch.no_grad()
def measure(
    kv: list[tuple[torch.Tensor, torch.Tensor]],
    schemes: list[tuple[str, CodecConfig]],
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Quantize each layer's K and V with every scheme; per-layer and layer-averaged metrics.

    Returns ``{"rows": [...], "per_layer": [...]}``; a row is ``{"scheme", "bits", "bits_per_element",
    "key": {"rel_mse", "cosine", "bits_per_element"}, "value": {...}}``.
    """
    from tqdm.auto import tqdm

    per_layer = []
    for i, (k, v) in enumerate(tqdm(kv, desc="layers", unit="layer", disable=not progress, leave=False)):
        entry = {"layer": i, "tokens": int(k.shape[-2]), "head_dim": int(k.shape[-1]), "kv_heads": int(k.shape[1]),
                 "key_rms": k.float().pow(2).mean().sqrt().item(), "value_rms": v.float().pow(2).mean().sqrt().item()}
        for name, cfg in schemes:
            res = {}
            for role, x, tag in (("key", k, 0), ("value", v, 1)):
                codec = make_codec(cfg, x.shape[-1], derive_seed(seed, i, tag)).to(x.device)
                packed = codec.quantize(x)
                rel, cos = _metrics(x, codec.dequantize(packed))
                res[role] = {"rel_mse": rel, "cosine": cos, "bits_per_element": packed.bits_per_element}
            entry[name] = res
        per_layer.append(entry)

    rows = []
    for name, cfg in schemes:
        row = {"scheme": name, "bits": cfg.bits}
        for role in ("key", "value"):
            vals = [e[name][role] for e in per_layer]
            row[role] = {m: sum(v[m] for v in vals) / len(vals) for m in ("rel_mse", "cosine", "bits_per_element")}
        # Total bits over K and V together, weighted by element counts (equal head dims: the mean).
        row["bits_per_element"] = 0.5 * (row["key"]["bits_per_element"] + row["value"]["bits_per_element"])
        rows.append(row)
    return {"rows": rows, "per_layer": per_layer}


def format_table(rows: list[dict]) -> str:
    head = f"{'scheme':<15}{'bits/el':>8}   {'K rel-MSE':>10}{'K cos':>9}   {'V rel-MSE':>10}{'V cos':>9}"
    lines = [head, "-" * len(head)]
    lines.append(f"{'fp16 (ref)':<15}{16.0:>8.3f}   {0.0:>10.4f}{1.0:>9.4f}   {0.0:>10.4f}{1.0:>9.4f}")
    for r in rows:
        k, v = r["key"], r["value"]
        lines.append(
            f"{r['scheme']:<15}{r['bits_per_element']:>8.3f}   {k['rel_mse']:>10.4f}{k['cosine']:>9.4f}"
            f"   {v['rel_mse']:>10.4f}{v['cosine']:>9.4f}"
        )
    return "\n".join(lines)


def _tokenize(tokenizer, text: str) -> torch.Tensor:
    enc = tokenizer(text, return_tensors="pt")
    ids = enc["input_ids"] if not isinstance(enc, torch.Tensor) else enc
    return ids if ids.dim() == 2 else ids[None]


def run(args: argparse.Namespace) -> int:
    from . import models

    if not args.bits:
        raise ValueError("--bits needs at least one bit-width")
    for b in args.bits:
        if not math.isfinite(b):
            raise ValueError(f"--bits: not a number: {b}")
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be positive, got {args.max_tokens}")
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0, got {args.threads}")
    schemes = _schemes(list(args.bits), args.affine_bits, args.group_size)  # validates early (names bad values)
    text = _read_text(args.text)

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = models.load(args.model, dtype=torch.float32, device=args.device, attn_implementation="sdpa")
    model.eval()
    ids = _tokenize(tokenizer, text)[:, : args.max_tokens].to(args.device)
    kv = capture_kv(model, ids)
    d = int(kv[0][0].shape[-1])
    for name, cfg in schemes:  # fail before the long loop if a bit-width cannot be represented at this head_dim
        make_codec(cfg, d, 0)
    result = measure(kv, schemes, seed=args.seed, progress=not args.no_progress)

    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    info = {
        "model": args.model,
        "model_type": getattr(cfg, "model_type", None),
        "layers": len(kv),
        "kv_heads": int(kv[0][0].shape[1]),
        "head_dim": d,
        "tokens": int(ids.shape[-1]),
        "text": args.text or "built-in: Austen, Persuasion (1818), chapter 1 opening",
        "seed": args.seed,
    }
    print(
        f"{args.model} ({info['model_type']}): {info['layers']} layers, {info['kv_heads']} KV heads, "
        f"head_dim {d}; {info['tokens']} prompt tokens; keys/values captured after prefill"
    )
    held = sorted({e["tokens"] for e in result["per_layer"]})
    if held[0] < info["tokens"]:
        n_short = sum(e["tokens"] < info["tokens"] for e in result["per_layer"])
        print(f"({n_short} sliding-window layers hold only their last {held[0]} tokens; measured on what they hold)")
    print("TurboQuant (rotation + Lloyd-Max, norm correction) vs affine min/max groups; averaged over layers;")
    print("bits/el counts every stored byte (codes, norms, scales, zero points)\n")
    print(format_table(result["rows"]))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**info, **result}, indent=2) + "\n")
        print(f"\nwrote {out}")
    return 0
