"""`tqcache generate`: stream text from a model whose KV cache is compressed, then summarise memory/speed.

Example::

    tqcache generate --model smollm2 --scheme turbo3.5 "The three laws of thermodynamics are"
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

__all__ = ["add_arguments", "run", "summarize"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="prompt text")
    p.add_argument("--model", default="smollm2", help="bundled model (smollm2, gemma3) or a local model folder")
    p.add_argument("--scheme", default="turbo4", help="cache scheme: turbo4, turbo3.5, k4v3, affine4, none, ...")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sample", action="store_true", help="sample (temperature/top-p) instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="model dtype (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--prompt-cache", default=None, metavar="FILE",
                   help="reuse a saved compressed prompt cache when the prompt starts with its tokens")
    p.add_argument("--save-prompt-cache", action="store_true",
                   help="with --prompt-cache: write the prompt's compressed cache to FILE")
    p.add_argument("--overwrite", action="store_true", help="allow --save-prompt-cache to replace FILE")


def _encode(tokenizer, prompt: str, chat: bool) -> torch.Tensor:
    if chat and getattr(tokenizer, "chat_template", None):
        msgs = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    return tokenizer(prompt, return_tensors="pt").input_ids


def summarize(cache, n_new: int, seconds: float, prefill_seconds: float | None = None) -> list[tuple[str, str]]:
    """Rows of the end-of-run summary: KV bytes vs fp16, ratio, bits, speed, attention path."""
    mem = cache.memory()
    paths: dict[str, int] = {}
    for layer in cache.layers:
        for k, v in getattr(layer, "paths", {}).items():
            paths[k] = paths.get(k, 0) + v
    path = ", ".join(f"{k} ({v} layer-steps)" for k, v in sorted(paths.items())) or "sdpa (nothing compressed)"
    rows = [
        ("scheme", cache.cfg.name),
        ("KV cache", f"{mem.total_bytes / 2**20:.2f} MiB (fp16 DynamicCache: {mem.fp16_bytes / 2**20:.2f} MiB)"),
        ("compression", f"{mem.compression_ratio:.2f}x"),
        ("bits/element", f"{mem.bits_per_element:.3f} compressed, {mem.bits_per_element_total:.2f} incl. window"
         if mem.compressed_tokens else f"nothing compressed yet: every token is inside the {cache.cfg.window}-token "
         "full-precision window (and sinks)"),
        ("tokens", f"{mem.compressed_tokens} compressed + {mem.fp_tokens} full precision (token-layers)"),
        ("speed", f"{n_new / seconds:.1f} tokens/s ({n_new} tokens in {seconds:.2f} s)"),
        ("attention", path),
    ]
    if prefill_seconds is not None:
        rows.insert(5, ("prefill", f"{prefill_seconds:.2f} s"))
    return rows


def run(args) -> int:
    from transformers import TextStreamer

    from . import models
    from .cache import TurboQuantCache

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    model, tokenizer = models.load(args.model, dtype=dtype, device=device, attn_implementation="tqcache")
    ids = _encode(tokenizer, args.prompt, args.chat).to(device)
    cache = TurboQuantCache(model.config, args.scheme)
    prefix_note = None
    if args.prompt_cache:
        from .persist import prompt_cache_step

        ids, cache, prefix_note = prompt_cache_step(args, model, tokenizer, ids, cache)
    prefill_seconds = None
    if cache.get_seq_length() == 0 and ids.shape[1] > 1:
        # Prefill all but the last prompt token ourselves (generate() feeds that one): the same split a
        # saved prompt cache uses, so runs with and without --prompt-cache are bit-identical.
        t0 = time.perf_counter()
        with torch.no_grad():
            model(ids[:, :-1], past_key_values=cache, use_cache=True)
        prefill_seconds = time.perf_counter() - t0
    streamer = TextStreamer(tokenizer, skip_prompt=True)
    gen_kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample, streamer=streamer)
    if args.sample:
        torch.manual_seed(args.seed)
        gen_kwargs.update(temperature=args.temperature, top_p=args.top_p)
    else:
        gen_kwargs.update(temperature=None, top_p=None, top_k=None)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, **gen_kwargs)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    n_new = out.shape[1] - ids.shape[1]
    print(file=sys.stderr)
    rows = summarize(cache, n_new, seconds, prefill_seconds)
    if prefix_note:
        rows.append(("prompt cache", prefix_note))
    width = max(len(k) for k, _ in rows)
    print("-" * 60, file=sys.stderr)
    for k, v in rows:
        print(f"{k:<{width}}  {v}", file=sys.stderr)
    return 0
