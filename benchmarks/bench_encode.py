"""Encode/append throughput on a GPU: the Triton encode kernel vs the torch codec, on the presets' real codecs.

A 32K-token prefill of one layer (8 KV heads, head_dim 128, bf16 in) is encoded into preallocated buffers,
for the key codec (per-KV-head channel scales, calibrated on the input, as the cache builds it) and the value
codec of each scheme. Reports CUDA-graph µs, GB/s of bf16 input and % of the device-to-device copy rate, plus
how many codes/norms differ from the torch codec (boundary ties). ``--sweep`` times tokens per tile × warps ×
persistent programs per SM; ``--old FILE`` also times an earlier encode module for an A/B in one process.

    PYTHONPATH=src python benchmarks/bench_encode.py --out benchmarks/results/encode_h100.json --sweep turbo4
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import bytes_per_token, copy_bandwidth, time_fn  # noqa: E402

from tqcache.codec import make_codec  # noqa: E402
from tqcache.config import parse_scheme  # noqa: E402
from tqcache.kernels.encode import encode_into, encode_unsupported_reason  # noqa: E402

HKV, D = 8, 128


def real_codecs(scheme: str, x: torch.Tensor):
    """``[(kind, codec)]`` for the scheme's keys and values, built and calibrated as the cache does."""
    cfg = parse_scheme(scheme)
    out = []
    for kind, ccfg, seed in (("key", cfg.key, 11), ("value", cfg.value, 12)):
        c = make_codec(ccfg, D, seed, heads=HKV).to(x.device)
        if c.needs_calibration:
            c.calibrate(x)
        out.append((kind, c))
    return out


def mismatches(codec, x, fields) -> dict:
    ref = codec.quantize(x, check=False)
    return {n: int((fields[n][:, :, : x.shape[2]] != ref[n]).sum()) for n in ref.fields}


def run(dev, schemes, N, sweep, old_mod):
    """``sweep``: the schemes whose codecs also get the launch sweep."""
    g = torch.Generator(device=dev).manual_seed(0)
    # Keys with uneven channel scales (outlier channels), as real keys have; fresh random data, never zeros.
    x = torch.randn(1, HKV, N, D, device=dev, generator=g) * (0.5 + 3 * torch.rand(D, device=dev, generator=g))
    x = x.to(torch.bfloat16)
    in_bytes = x.numel() * 2
    rows, sweep_rows = [], []
    for sch in schemes:
        for kind, c in real_codecs(sch, x):
            why = encode_unsupported_reason(c, x)
            if why:  # the cache encodes these with the torch codec
                rows.append(dict(scheme=sch, kind=kind, segments=c.segments, unsupported=why))
                print(f"encode {sch:8s} {kind:5s}: not on the kernel ({why})", flush=True)
                continue
            fields = {n: torch.empty(1, HKV, N, w, dtype=t, device=dev) for n, (w, t) in c.field_widths().items()}
            out_bytes = HKV * N * bytes_per_token(c)

            def t_us(**kw):
                return time_fn([lambda: encode_into(c, x, fields, 0, **kw)], graph=True)

            if sch in sweep:
                for bt in (32, 64):
                    for w in (4, 8):
                        for ps in (2, 4, 8):
                            try:
                                med, _, _, gu = t_us(block_t=bt, num_warps=w, programs_per_sm=ps)
                            except Exception as e:  # noqa: BLE001
                                print(f"  sweep {sch} {kind} bt={bt} w={w} ps={ps}: {type(e).__name__}: {e}", flush=True)
                                continue
                            sweep_rows.append(dict(scheme=sch, kind=kind, block_t=bt, warps=w, programs_per_sm=ps,
                                                   median_us=med, graph_us=gu))
                            print(f"  sweep {sch:8s} {kind:5s} bt={bt:3d} w={w} ps={ps}: {gu:8.1f} us", flush=True)
            med, p20, p80, gu = t_us()
            gu = gu or med  # graph capture failed (printed): report the eager median
            mism = mismatches(c, x, fields)
            tq, _, _, _ = time_fn([lambda: c.quantize(x, check=False)], graph=False)
            row = dict(scheme=sch, kind=kind, segments=c.segments, per_head_scale=c.channel_scale.dim() > 1,
                       tokens=N, kv_heads=HKV, median_us=med, p20_us=p20, p80_us=p80, graph_us=gu,
                       gbps_input=in_bytes / (gu * 1e-6) / 1e9, gbps_read_write=(in_bytes + out_bytes) / (gu * 1e-6) / 1e9,
                       torch_quantize_us=tq, mismatched_elements=mism)
            if old_mod is not None:
                why = old_mod.encode_unsupported_reason(c, x)
                if why is None:
                    row["old_graph_us"] = time_fn([lambda: old_mod.encode_into(c, x, fields, 0)], graph=True)[3]
                else:
                    row["old_graph_us"] = None
                    row["old_unsupported"] = why  # the cache then ran the torch codec
            rows.append(row)
            print(f"encode {sch:8s} {kind:5s}: {gu:8.1f} us  {row['gbps_input']:6.0f} GB/s bf16 in  torch {tq:8.1f} us  "
                  f"old {row.get('old_graph_us')}  mismatches {mism}", flush=True)
    return rows, sweep_rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--schemes", default="turbo4,turbo3,turbo2,k4v3")
    ap.add_argument("--N", type=int, default=32768)
    ap.add_argument("--d", type=int, default=128, help="head_dim")
    ap.add_argument("--sweep", default="", help="comma-separated schemes to sweep the launch configuration for")
    ap.add_argument("--old", default=None, help="path of an earlier encode.py to A/B against")
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--out", default="benchmarks/results/encode_h100.json")
    a = ap.parse_args()
    global D
    D = a.d
    dev = torch.device("cuda")
    old_mod = None
    if a.old:
        # Named inside the package, so that an earlier encode.py copied next to the current one resolves its
        # relative imports.
        name = "tqcache.kernels." + os.path.splitext(os.path.basename(a.old))[0]
        spec = importlib.util.spec_from_file_location(name, a.old)
        old_mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old_mod)
    p = torch.cuda.get_device_properties(0)
    meta = dict(gpu=p.name, sm_count=p.multi_processor_count, torch=torch.__version__, triton=triton.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), commit=a.commit,
                shape=f"1 x {HKV} KV heads x {a.N} tokens x {D}, bf16 in",
                timing="CUDA-graph replay median (do_bench); torch codec eager")
    meta["copy_gbps"] = copy_bandwidth(dev)
    rows, sweep_rows = run(dev, a.schemes.split(","), a.N, [x for x in a.sweep.split(",") if x], old_mod)
    from tqcache.kernels.encode import _RESIDENT

    meta["resident_programs_per_sm"] = [
        dict({k: v for k, v in key[3] if k in ("D0", "B0", "D1", "B1", "PIECES", "BLOCK_T", "num_warps")}, per_sm=n)
        for key, n in _RESIDENT.items()
    ]
    with open(a.out, "w") as f:
        json.dump(dict(meta=meta, encode=rows, sweep=sweep_rows), f, indent=1)
    bw = meta["copy_gbps"]
    print(f"\n{p.name}: copy {bw:.0f} GB/s; encode of {a.N} tokens x {HKV} heads (bf16 in = {HKV * a.N * D * 2 / 2**20:.0f} MiB)")
    print("scheme   kind   segments            graph_us  GB/s in  % copy  torch_us  old_us")
    for r in rows:
        if "unsupported" in r:
            print(f"{r['scheme']:8s} {r['kind']:5s}  {str(r['segments']):18s} not on the kernel: {r['unsupported']}")
            continue
        old = r.get("old_graph_us")
        print(f"{r['scheme']:8s} {r['kind']:5s}  {str(r['segments']):18s} {r['graph_us']:8.1f} {r['gbps_input']:8.0f} "
              f"{100 * r['gbps_input'] / bw:6.0f}% {r['torch_quantize_us']:9.1f} {old if old is None else round(old, 1)}")


if __name__ == "__main__":
    main()
