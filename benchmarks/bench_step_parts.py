"""Where one decode step's time goes: device µs per kernel of the compressed attention, and host µs per kernel entry.

Two tables, for the claims in docs/kernel-notes.md ("v13"):

* **device**: the torch profiler's time per kernel of ``attend_packed_triton`` (query map, decode, merge), averaged
  over 20 eager steps, beside the CUDA-graph time of the whole step — 32/8 heads, head_dim 128, per scheme, B and N.
* **host**: µs of Python per call of the three entry points a decode layer runs (``kernels.attend``,
  ``kernels.encode`` of one token, ``kernels.attend_window``) once their plans exist — best of 5 × 400 calls, turbo4,
  B = 1, 4K — with a torch ``add_`` beside them as a yardstick for the host's speed (it varies run to run).

    PYTHONPATH=src python benchmarks/bench_step_parts.py --out benchmarks/results/step_parts_h100.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_attention as BA  # noqa: E402

import tqcache.kernels as K  # noqa: E402
from tqcache.kernels import attention as att  # noqa: E402

D, HQ, HKV = 128, 32, 8


def device_parts(schemes, Bs, Ns, dev) -> list[dict]:
    rows = []
    for sch in schemes:
        kc, vc = BA.codecs_for(sch, dev)
        for B in Bs:
            for N in Ns:
                q = torch.randn(B, HQ, 1, D, device=dev, dtype=torch.bfloat16)
                kp, vp = BA.random_packed(kc, B, HKV, N, dev), BA.random_packed(vc, B, HKV, N, dev)

                def step():
                    return att.attend_packed_triton(q, kc, kp, vc, vp, scale=D**-0.5)

                for _ in range(3):
                    step()
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(20):
                        step()
                    torch.cuda.synchronize()
                kernels = {}
                for e in prof.key_averages():
                    t = getattr(e, "device_time_total", 0) or getattr(e, "cuda_time_total", 0)
                    if t:
                        kernels[e.key] = round(t / 20, 2)
                row = dict(scheme=sch, B=B, N=N, graph_us=round(BA.time_graph([step]), 2), kernels_us=kernels)
                rows.append(row)
                print(row, flush=True)
    return rows


def host_parts(dev) -> dict:
    def best(f, n=400):
        for _ in range(30):
            f()
        torch.cuda.synchronize()
        out = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(n):
                f()
            out = min(out, (time.perf_counter() - t) / n * 1e6)
            torch.cuda.synchronize()
        return round(out, 1)

    kc, vc = BA.codecs_for("turbo4", dev)
    B, N = 1, 4096
    q = torch.randn(B, HQ, 1, D, device=dev, dtype=torch.bfloat16)
    kp, vp = BA.random_packed(kc, B, HKV, N, dev), BA.random_packed(vc, B, HKV, N, dev)
    x = torch.randn(B, HKV, 1, D, device=dev, dtype=torch.bfloat16)
    fields = {n: torch.zeros(B, HKV, N, w, dtype=dt, device=dev) for n, (w, dt) in kc.field_widths().items()}
    win = torch.randn(B, HKV, 130, D, device=dev, dtype=torch.bfloat16)
    sinks = torch.randn(B, HKV, 4, D, device=dev, dtype=torch.bfloat16)
    oc, lc = torch.randn(B, HQ, 1, D, device=dev), torch.randn(B, HQ, 1, device=dev)
    e = torch.empty(8, device=dev)
    row = dict(attend=best(lambda: K.attend(q, kc, kp, vc, vp, scale=0.088)),
               encode_1_token=best(lambda: K.encode(kc, x, fields, 100)),
               attend_window=best(lambda: K.attend_window(q, [(sinks, sinks), (win, win)], oc, lc, 0.088)),
               torch_add=best(lambda: e.add_(1.0)), replayed_launches=K.info()["replayed_launches"])
    print(row, flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schemes", default="turbo4,turbo3")
    ap.add_argument("--B", default="1,8")
    ap.add_argument("--N", default="65536,131072")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--commit", default="unknown")
    a = ap.parse_args(argv)
    dev = torch.device("cuda")
    res = dict(device=device_parts(a.schemes.split(","), [int(b) for b in a.B.split(",")],
                                   [int(n) for n in a.N.split(",")], dev),
               host=host_parts(dev))
    if a.out:
        res["meta"] = dict(gpu=torch.cuda.get_device_name(0), commit=a.commit,
                           date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        a.out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
