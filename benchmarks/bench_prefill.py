"""Prefill chunks over a compressed prefix: the split-K kernel vs decode-once + flash (``kernels/prefill.py``) vs
SDPA over the same prefix in bf16.

A chunk of ``Lq`` new tokens (a prompt continued from a reused prompt cache, a later chat turn, chunked prefill)
attends to all ``N`` compressed tokens of a full-attention layer; this times that part alone (the chunk's causal
attention to itself is the same dense work for every provider). B = 1, 32 query / 8 KV heads, head_dim 128, bf16
queries, CUDA-graph µs (median), buffers not rotated (the prefix is re-read per query tile either way).
Writes JSON (GPU, date, commit) and prints a short table.

    PYTHONPATH=src python benchmarks/bench_prefill.py --out benchmarks/results/prefill_h100.json
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

from tqcache.kernels import attention as att  # noqa: E402
from tqcache.kernels import prefill as pre  # noqa: E402

D, HQ, HKV = 128, 32, 8


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schemes", default="turbo4,turbo3")
    ap.add_argument("--N", default="4096,32768,131072", help="compressed prefix lengths")
    ap.add_argument("--Lq", default="16,64,128,512,2048", help="chunk lengths (query tokens)")
    ap.add_argument("--kernel-max", type=int, default=1 << 26, help="skip the split-K kernel above N·Lq (slow)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--commit", default="unknown")
    a = ap.parse_args(argv)
    dev, scale = torch.device("cuda"), D**-0.5
    rows = []
    for sch in a.schemes.split(","):
        kc, vc = BA.codecs_for(sch, dev)
        for N in (int(x) for x in a.N.split(",")):
            kp, vp = BA.random_packed(kc, 1, HKV, N, dev), BA.random_packed(vc, 1, HKV, N, dev)
            K = torch.randn(1, HKV, N, D, device=dev, dtype=torch.bfloat16)
            V = torch.randn_like(K)
            for Lq in (int(x) for x in a.Lq.split(",")):
                q = torch.randn(1, HQ, Lq, D, device=dev, dtype=torch.bfloat16)
                new, lse_new = pre.attend_prefill(q, kc, kp.fields, vc, vp.fields, scale=scale)
                t_new = BA.time_graph([lambda: pre.attend_prefill(q, kc, kp.fields, vc, vp.fields, scale=scale)])
                t_sdpa = BA.time_graph([lambda: F.scaled_dot_product_attention(q, K, V, scale=scale, enable_gqa=True)])
                row = dict(scheme=sch, N=N, Lq=Lq, rows_per_kv_head=Lq * HQ // HKV, prefill_us=round(t_new, 1),
                           sdpa_bf16_us=round(t_sdpa, 1))
                if N * Lq <= a.kernel_max:
                    ref, lse_ref = att.attend_packed_triton(q, kc, kp, vc, vp, scale=scale)
                    row["splitk_us"] = round(BA.time_graph(
                        [lambda: att.attend_packed_triton(q, kc, kp, vc, vp, scale=scale)]), 1)
                    row["rel_err_vs_splitk"] = float((new - ref).abs().max() / ref.abs().max())
                    row["lse_err_vs_splitk"] = float((lse_new - lse_ref).abs().max())
                rows.append(row)
                print(row, flush=True)
                torch.cuda.empty_cache()
    meta = dict(gpu=torch.cuda.get_device_name(0), commit=a.commit, heads=f"{HQ}/{HKV}", head_dim=D, batch=1,
                query_dtype="bfloat16", min_rows=pre.PREFILL_MIN_ROWS,
                timing="CUDA-graph replay median (bench_attention.time_graph); the compressed prefix part only",
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    if a.out:
        a.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print("\nscheme       N    Lq   split-K µs   decode+flash µs   SDPA bf16 µs   new × split-K   new × SDPA")
    for r in rows:
        sk = r.get("splitk_us")
        print(f"{r['scheme']:8s} {r['N']:6d} {r['Lq']:5d} {sk if sk else float('nan'):12.1f} {r['prefill_us']:17.1f} "
              f"{r['sdpa_bf16_us']:14.1f} {(sk / r['prefill_us']) if sk else float('nan'):15.2f} "
              f"{r['sdpa_bf16_us'] / r['prefill_us']:12.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
