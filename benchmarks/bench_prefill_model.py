"""A prefill chunk after a long prompt in a model: what ``--prompt-cache`` reuse or a later chat turn runs.

A random-weight Llama with the Llama-3-8B layer shapes (``--layers`` layers, bf16, eager, batch 1) prefills N tokens,
runs one 1-token step (the presets' key-scaling calibration, which compresses the prompt), then two chunks of Lq
tokens, both timed: ``first`` (the cache's first chunk: what a reused prompt cache pays once — its codecs' launch
plans and constants are built, its storage grows) and ``next`` (the same cache's second chunk, N + Lq + 1 tokens
before it), then ``--turns`` more chunks, ``turn`` = their median. Repeat r prefills N + r tokens, so no chunk
meets a context length seen before, as in a conversation.

Providers: ``dense`` (DynamicCache + SDPA as transformers calls it: torch picks cuDNN on the H100, which builds an
execution plan for every new shape), ``dense-flash`` (the same with the cuDNN backend off: flash attention),
``now`` (TurboQuantCache: the compressed prefix decoded once and run through flash attention from
``PREFILL_MIN_ROWS`` rows, the full-precision parts on flash too) and ``split-K`` (the same cache with the compressed part on the split-K kernel and the full-precision parts in the
torch composition: ``PREFILL_MIN_ROWS`` and ``DENSE_FLASH`` switched off). ms of the whole chunk step, host
included, one fresh cache per repeat, after a warm-up repeat.

    PYTHONPATH=src python benchmarks/bench_prefill_model.py --out benchmarks/results/prefill_model_h100.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode_step import _model  # noqa: E402

from tqcache import TurboQuantCache  # noqa: E402
from tqcache.kernels import prefill as pre  # noqa: E402


PROVIDERS = ("dense", "dense-flash", "now", "split-K")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="8192:2048,8192:512,32768:2048,32768:512", help="N:Lq pairs")
    ap.add_argument("--scheme", default="turbo4")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--turns", type=int, default=6, help="chunks after the next one, each at a new context length")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--commit", default="unknown")
    a = ap.parse_args(argv)
    model = _model(a.layers)
    min_rows, dense_flash = pre.PREFILL_MIN_ROWS, pre.DENSE_FLASH
    rows = []
    torch.manual_seed(0)
    for shape in a.shapes.split(","):
        N, L = (int(x) for x in shape.split(":"))
        ids = torch.randint(0, 4096, (1, N + a.repeats), device="cuda")
        chunk = torch.randint(0, 4096, (1, L), device="cuda")
        for rep in range(a.repeats + 1):  # the first repeat warms up (compiles, probes)
            for name in PROVIDERS:
                pre.PREFILL_MIN_ROWS = min_rows if name == "now" else 1 << 30
                pre.DENSE_FLASH = dense_flash and name == "now"
                torch.backends.cuda.enable_cudnn_sdp(name != "dense-flash")
                with torch.no_grad():
                    if name.startswith("dense"):
                        model.config._attn_implementation = "sdpa"
                        cache = DynamicCache(config=model.config)
                    else:
                        model.config._attn_implementation = "tqcache"
                        cache = TurboQuantCache(model.config, a.scheme)
                    model(ids[:, : N + rep], past_key_values=cache)
                    model(chunk[:, :1], past_key_values=cache)
                    ms = []
                    for _ in range(2 + a.turns):
                        torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        model(chunk, past_key_values=cache)
                        torch.cuda.synchronize()
                        ms.append(1e3 * (time.perf_counter() - t0))
                if rep:
                    turns = sorted(ms[2:])
                    rows.append(dict(N=N, Lq=L, provider=name, rep=rep, ms=round(ms[0], 2), next_ms=round(ms[1], 2),
                                     turn_ms=round(turns[len(turns) // 2], 2) if turns else None))
                    print(rows[-1], flush=True)
                del cache  # (the allocator keeps its blocks, as in a serving process: no cudaMalloc in the timed steps)
    pre.PREFILL_MIN_ROWS, pre.DENSE_FLASH = min_rows, dense_flash
    torch.backends.cuda.enable_cudnn_sdp(True)
    meta = dict(gpu=torch.cuda.get_device_name(0), commit=a.commit, layers=a.layers, scheme=a.scheme, batch=1,
                model="random-weight Llama, Llama-3-8B layer shapes, bf16, eager",
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    if a.out:
        a.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print("\n     N    Lq   provider       first ms (min–max)   next ms (min–max)   turn ms (min–max)")
    for N, L in sorted({(r["N"], r["Lq"]) for r in rows}):
        for name in PROVIDERS:
            sel = [r for r in rows if (r["N"], r["Lq"], r["provider"]) == (N, L, name)]
            cols = []
            for k in ("ms", "next_ms", "turn_ms"):
                v = [r[k] for r in sel if r[k] is not None]
                cols.append(f"{min(v):7.1f}–{max(v):<7.1f}" if v else f"{'—':15s}")
            print(f"{N:6d} {L:5d}   {name:12s} " + "      ".join(cols))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
