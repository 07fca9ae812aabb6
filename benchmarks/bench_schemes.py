"""A quick check of every named scheme's decode step against bf16 SDPA (CUDA-graph µs), with the kernel that ran.

``bench_attention.py`` is the full table (eager and graph times, bandwidth, encode); this is the short sweep used
to see which schemes the Gluon kernel takes and whether each beats SDPA: B ∈ {1, 8}, 32 query / 8 KV heads,
head_dim 128, bf16 queries, N ∈ {16K, 128K} by default. A scheme that fails is reported, not fatal.
``--triton`` also times the Triton kernel (forced) on each scheme; ``--head-dim 256 --heads 16/8`` is the
Gemma-like shape of ``attention_h100_v10_d256.json``.

    PYTHONPATH=src python benchmarks/bench_schemes.py --out benchmarks/results/schemes_h100.json
    PYTHONPATH=src python benchmarks/bench_schemes.py --head-dim 256 --heads 16/8 --N 16384,65536 --triton \
        --schemes turbo4,k4v2,turbo2,k8v4,turbo3,k4v3,turbo3.5,turbo2.5
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import bench_attention as BA  # noqa: E402

from tqcache.config import scheme_names  # noqa: E402
from tqcache.kernels import attention as att  # noqa: E402

def parse_heads(text: str) -> tuple[int, int]:
    """``"32/8"`` -> (32 query heads, 8 KV heads); a clear error for anything else."""
    try:
        hq, hkv = (int(x) for x in text.split("/"))
    except ValueError:
        raise SystemExit(f"--heads must look like 32/8 (query/KV heads), got {text!r}") from None
    if hq < 1 or hkv < 1 or hq % hkv:
        raise SystemExit(f"--heads {text!r}: query heads must be a positive multiple of KV heads")
    return hq, hkv


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schemes", default=",".join(s for s in scheme_names() if s.startswith(("turbo", "k"))))
    ap.add_argument("--B", default="1,8")
    ap.add_argument("--N", default="16384,131072")
    ap.add_argument("--head-dim", type=int, default=BA.D, choices=(64, 128, 256))
    ap.add_argument("--heads", default=f"{BA.HQ}/{BA.HKV}", help="query/KV heads, e.g. 32/8")
    ap.add_argument("--triton", action="store_true", help="also time the Triton kernel (forced) on each scheme")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--commit", default="unknown")
    a = ap.parse_args(argv)
    D = a.head_dim
    HQ, HKV = parse_heads(a.heads)
    dev, scale = torch.device("cuda"), D ** -0.5
    rows = []
    for B in (int(x) for x in a.B.split(",")):
        for N in (int(x) for x in a.N.split(",")):
            sets = [(torch.randn(B, HQ, 1, D, device=dev, dtype=torch.bfloat16),
                     torch.randn(B, HKV, N, D, device=dev, dtype=torch.bfloat16),
                     torch.randn(B, HKV, N, D, device=dev, dtype=torch.bfloat16))
                    for _ in range(BA.n_sets(2 * B * HKV * N * D * 2))]
            sd = BA.time_graph([lambda s=s: F.scaled_dot_product_attention(s[0], s[1], s[2], scale=scale,
                                                                           enable_gqa=True) for s in sets])
            del sets
            rows.append(dict(B=B, N=N, scheme="sdpa-bf16", kernel="sdpa", graph_us=sd))
            line = [f"B={B} N={N} sdpa {sd:.1f}"]
            for sch in a.schemes.split(","):
                try:
                    kc, vc = BA.codecs_for(sch, dev, D)
                    nbytes = B * HKV * N * (BA.bytes_per_token(kc) + BA.bytes_per_token(vc))
                    sets = [(torch.randn(B, HQ, 1, D, device=dev, dtype=torch.bfloat16),
                             BA.random_packed(kc, B, HKV, N, dev), BA.random_packed(vc, B, HKV, N, dev))
                            for _ in range(BA.n_sets(nbytes))]
                    cfg = att.choose_config(sets[0][0], kc, vc, HKV, N)
                    us = BA.time_graph([lambda s=s: att.attend_packed_triton(s[0], kc, s[1], vc, s[2], scale=scale,
                                                                             config=cfg) for s in sets])
                    kind = "gluon" if cfg.get("gluon") else "triton"
                    row = dict(B=B, N=N, scheme=sch, kernel=kind, graph_us=us, x_sdpa=sd / us)
                    line.append(f"{sch}({kind[0].upper()}) {us:.1f} x{sd / us:.2f}")
                    if a.triton:
                        tcfg = dict(att.launch_config(B, HKV, HQ // HKV, N, D, dev, k_codec=kc, v_codec=vc),
                                    gluon=False)
                        ut = BA.time_graph([lambda s=s: att.attend_packed_triton(s[0], kc, s[1], vc, s[2], scale=scale,
                                                                                 config=tcfg) for s in sets])
                        row.update(triton_graph_us=ut, triton_x_sdpa=sd / ut)
                        line[-1] += f" (T x{sd / ut:.2f})"
                    rows.append(row)
                    del sets
                except Exception as e:  # report the scheme and go on
                    rows.append(dict(B=B, N=N, scheme=sch, error=f"{type(e).__name__}: {e}"))
                    line.append(f"{sch} ERR {type(e).__name__}")
                torch.cuda.empty_cache()
            print(" | ".join(line), flush=True)
    if a.out:
        meta = dict(gpu=torch.cuda.get_device_name(0), commit=a.commit, heads=f"{HQ}/{HKV}", head_dim=D,
                    query_dtype="bfloat16", timing="CUDA-graph replay median (bench_attention.time_graph)",
                    date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        a.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
