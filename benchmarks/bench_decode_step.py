"""Whole decode steps of a model in eager mode (what ``model.generate`` runs), dense bf16 cache vs TurboQuantCache.

The attention benchmarks time one kernel step from a CUDA graph; this times what a user's ``generate`` loop pays
per token: every layer's projections and MLP, the cache update (encode of the tokens leaving the fp16 window)
and attention — kernel launches *and* the Python and torch-op overhead around them, which a graph hides.
Random-weight Llama with the Llama-3-8B layer shapes (hidden 4096, 32 query / 8 KV heads, head_dim 128, MLP
14336) and ``--layers`` layers, batch 1, a prompt of N random tokens prefilled once, then ``--steps`` timed
one-token steps (teacher-forced). The dense baseline runs SDPA as torch picks it ("bf16": cuDNN on an H100, which builds a new
execution plan for every new key length — ~10 ms of host time per call in torch 2.11) and without cuDNN
("bf16-nocudnn": flash / memory-efficient / math). Reports ms per step, the host (CPU) time per step — the time Python takes to
issue it, measured with the GPU idle at the start of the step — and per-layer figures.

    PYTHONPATH=src python benchmarks/bench_decode_step.py --N 4096,32768,131072 --out results.json
    PYTHONPATH=src python benchmarks/bench_decode_step.py --N 4096,32768 --flush 1,32 --steps 64   # CacheConfig.flush
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import tqcache
from tqcache import TurboQuantCache

_ALL_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _model(layers: int) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=4096, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()


def _time_steps(model, cache, feed: torch.Tensor) -> tuple[float, float, float]:
    """(median wall ms per step, median host ms per step, mean wall ms per step) over the one-token steps of
    ``feed [1, S]``. The mean counts the steps that compress a block of tokens (``flush`` > 1), which the median
    skips."""
    wall, host = [], []
    for t in range(feed.shape[1]):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(feed[:, t : t + 1], past_key_values=cache)
        t1 = time.perf_counter()  # Python has issued the step (the GPU may still be running it)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        host.append(t1 - t0)
        wall.append(t2 - t0)
    mean = sum(wall) / len(wall)
    wall.sort(), host.sort()
    return 1e3 * wall[len(wall) // 2], 1e3 * host[len(host) // 2], 1e3 * mean


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--N", default="4096,32768,131072", help="prompt lengths")
    ap.add_argument("--schemes", default="turbo4,turbo3")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--flush", default=None, help="CacheConfig.flush values to run each scheme with, e.g. 1,32 "
                                                   "(default: the scheme's own)")
    ap.add_argument("--no-cudnn-baseline", action="store_true", help="skip the cuDNN dense baseline (~10 ms a step)")
    a = ap.parse_args(argv)
    model = _model(a.layers)
    rows = []
    runs = [] if a.no_cudnn_baseline else [("bf16", None)]
    runs.append(("bf16-nocudnn", None))
    for scheme in a.schemes.split(","):
        runs += [(scheme, None)] if a.flush is None else [(scheme, int(f)) for f in a.flush.split(",")]
    for N in (int(x) for x in a.N.split(",")):
        ids = torch.randint(0, 4096, (1, N), device="cuda")
        feed = torch.randint(0, 4096, (1, a.steps + 4), device="cuda")
        for scheme, flush in runs:
            backends = _ALL_BACKENDS[1:] if scheme == "bf16-nocudnn" else _ALL_BACKENDS
            with torch.no_grad(), sdpa_kernel(backends):
                if scheme.startswith("bf16"):
                    model.config._attn_implementation = "sdpa"
                    cache = DynamicCache(config=model.config)
                else:
                    model.config._attn_implementation = "tqcache"
                    cfg = tqcache.parse_scheme(scheme)
                    cache = TurboQuantCache(model.config, cfg if flush is None else cfg.replace(flush=flush))
                    flush = cache.cfg.flush
                model(ids, past_key_values=cache)
                model(feed[:, :4], past_key_values=cache)  # warm-up steps (compiles, first window spill)
                wall, host, mean = _time_steps(model, cache, feed[:, 4:])
            paths = {}
            for layer in getattr(cache, "layers", []):
                for k, v in getattr(layer, "paths", {}).items():
                    paths[k] = paths.get(k, 0) + v
            rows.append(dict(N=N, scheme=scheme, flush=flush, ms_per_step=wall, host_ms_per_step=host,
                             mean_ms_per_step=mean, us_per_layer=1e3 * wall / a.layers,
                             host_us_per_layer=1e3 * host / a.layers, mean_us_per_layer=1e3 * mean / a.layers,
                             paths=paths))
            label = scheme if flush is None else f"{scheme}/f{flush}"
            print(f"N={N:>6} {label:12s} {wall:7.2f} ms/step  host {host:6.2f} ms  mean {mean:7.2f} ms  "
                  f"({1e3 * wall / a.layers:6.0f} / {1e3 * host / a.layers:6.0f} / {1e3 * mean / a.layers:6.0f} µs "
                  f"per layer: median wall / host / mean wall) {paths}", flush=True)
            del cache
            torch.cuda.empty_cache()
    if a.out:
        meta = dict(gpu=torch.cuda.get_device_name(0), commit=a.commit, layers=a.layers, steps=a.steps,
                    model="random-weight Llama, Llama-3-8B layer shapes", batch=1, tqcache=tqcache.__version__,
                    date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        a.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
