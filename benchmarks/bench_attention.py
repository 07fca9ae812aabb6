"""Decode attention over a TurboQuant cache vs torch SDPA over a bf16 cache (and encode throughput).

Providers (lines): ``sdpa-bf16`` (``scaled_dot_product_attention(..., enable_gqa=True)`` over bf16 K/V),
``triton-<scheme>`` (:func:`tqcache.kernels.attention.attend_packed_triton` as dispatched — the Gluon decode
kernel where it covers the scheme (``gluon_reason``), else the Triton split-K kernel — whole step included: query-map
kernel, attention kernel, merge + unrotation kernel), ``tl-<scheme>`` (the Triton kernel for a scheme Gluon
took, same process), ``torch-<scheme>`` (the
torch reference ``attend_packed``, small N only).

Sweep: B ∈ {1, 8}, 32 query / 8 KV heads, head_dim 128, N ∈ {4K, 16K, 64K, 128K}, one decode query.
Timing: ``triton.testing.do_bench`` (CUDA events), median with p20/p80, eager launches, and the same step
replayed from a CUDA graph (what a decode loop runs; removes CPU launch gaps for every provider alike).
Inputs are fresh random data (codes are random bytes — every byte is a valid code — norms random
positive), rotated among enough copies that their bytes exceed 3× L2, so nothing is timed out of cache.
GB/s counts the compressed bytes the kernel must read (codes + norms of K and V); SDPA's counts its bf16 K/V.

Usage: ``PYTHONPATH=src python benchmarks/bench_attention.py --commit $(git rev-parse HEAD) --out res.json``
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from tqcache.codec import TurboQuantizer
from tqcache.codec.attention import attend_packed
from tqcache.codec.base import Packed
from tqcache.config import parse_scheme
from tqcache.kernels.attention import attend_packed_triton, launch_config
from tqcache.kernels.encode import encode_into

HQ, HKV, D = 32, 8, 128


def _capture(fns):
    """A CUDA graph of ``fns`` called in order, warmed up once on a side stream as graph capture requires."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    return g


def _q(xs):
    if not isinstance(xs, (list, tuple)):
        xs = [xs]
    return [float(x) * 1000.0 for x in xs]  # ms -> µs


REP = [200]


def time_fn(fns, graph=True):
    """Median/p20/p80 µs per call of ``fns[i]`` cycled; plus CUDA-graph replay µs (median)."""
    it = [0]

    def step():
        fns[it[0] % len(fns)]()
        it[0] += 1

    for f in fns:
        f()
    torch.cuda.synchronize()
    med, p20, p80 = _q(do_bench(step, warmup=25, rep=REP[0], quantiles=[0.5, 0.2, 0.8]))
    g_us = None
    if graph:
        try:
            g = _capture(fns)
            g_us = _q(do_bench(g.replay, warmup=25, rep=REP[0], quantiles=[0.5]))[0] / len(fns)
        except Exception as e:  # noqa: BLE001
            print(f"  graph capture failed: {type(e).__name__}: {e}", file=sys.stderr)
    return med, p20, p80, g_us


def n_sets(nbytes: int) -> int:
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(1, min(16, math.ceil(3 * l2 / max(nbytes, 1))))


def random_packed(codec, B, H, N, dev):
    f = {}
    for name, (w, dt) in codec.field_widths().items():
        if dt == torch.uint8:
            f[name] = torch.randint(0, 256, (B, H, N, w), dtype=torch.uint8, device=dev)
        else:
            f[name] = (torch.rand(B, H, N, w, device=dev) * 4 + 0.5).to(dt)
    return Packed(fields=f, dim=codec.dim, dtype=torch.bfloat16)


def bytes_per_token(codec) -> int:
    return sum(w * dt.itemsize for w, dt in codec.field_widths().values())


def copy_bandwidth(dev) -> float:
    n = 1 << 28  # 1 GiB of fp32
    a = torch.randn(n // 4, device=dev)
    b = torch.empty_like(a)
    ms = _q(do_bench(lambda: b.copy_(a), warmup=10, rep=100, quantiles=[0.5]))[0] / 1000.0
    return 2 * a.numel() * 4 / (ms * 1e-3) / 1e9  # read + write


def codecs_for(scheme: str, dev, d: int = D):
    cfg = parse_scheme(scheme)
    kc = TurboQuantizer(d, cfg.key.bits, qjl=cfg.key.qjl, seed=1).to(dev)
    vc = TurboQuantizer(d, cfg.value.bits, qjl=cfg.value.qjl, seed=2).to(dev)
    return kc, vc


def check_correctness(dev, schemes) -> dict:
    """Kernel vs torch reference at a bench shape (B=2, N=4K), bf16 queries: relative error of out."""
    res = {}
    for sch in schemes:
        kc, vc = codecs_for(sch, dev)
        k = torch.randn(2, HKV, 4096, D, device=dev)
        v = torch.randn(2, HKV, 4096, D, device=dev)
        kp, vp = kc.quantize(k), vc.quantize(v)
        q = torch.randn(2, HQ, 1, D, device=dev).to(torch.bfloat16)
        o, l = attend_packed_triton(q, kc, kp, vc, vp, scale=D**-0.5)
        r, rl = attend_packed(q.float(), kc, kp, vc, vp, scale=D**-0.5)
        res[sch] = {"rel_err_out": float((o - r).norm() / r.norm()), "max_abs_dlse": float((l - rl).abs().max())}
    return res


def bench_attention(dev, Bs, Ns, schemes, ref_max_n, graph=True):
    rows = []
    scale = D**-0.5
    for B in Bs:
        for N in Ns:
            # ---- SDPA over bf16
            kv_bytes = 2 * B * HKV * N * D * 2
            sets = []
            for _ in range(n_sets(kv_bytes)):
                q = torch.randn(B, HQ, 1, D, device=dev, dtype=torch.bfloat16)
                k = torch.randn(B, HKV, N, D, device=dev, dtype=torch.bfloat16)
                v = torch.randn(B, HKV, N, D, device=dev, dtype=torch.bfloat16)
                sets.append((q, k, v))
            fns = [lambda s=s: F.scaled_dot_product_attention(s[0], s[1], s[2], scale=scale, enable_gqa=True) for s in sets]
            med, p20, p80, g = time_fn(fns, graph)
            sdpa = dict(provider="sdpa-bf16", scheme="bf16", B=B, N=N, median_us=med, p20_us=p20, p80_us=p80,
                        graph_us=g, bytes=kv_bytes, gbps=kv_bytes / (med * 1e-6) / 1e9,
                        gbps_graph=kv_bytes / (g * 1e-6) / 1e9 if g else None, ratio_vs_sdpa=1.0, ratio_graph=1.0)
            rows.append(sdpa)
            print(f"B={B} N={N:6d} sdpa-bf16      {med:8.1f} us  graph {g or float('nan'):8.1f} us  {sdpa['gbps']:7.0f} GB/s", flush=True)
            del sets, fns
            torch.cuda.empty_cache()
            # ---- ours: as dispatched (the Gluon decode kernel where it covers the scheme), and beside it the
            # Triton kernel for the same scheme when Gluon took it (provider tl-<scheme>)
            for sch in schemes:
                kc, vc = codecs_for(sch, dev)
                nbytes = B * HKV * N * (bytes_per_token(kc) + bytes_per_token(vc))
                sets = []
                for _ in range(n_sets(nbytes)):
                    q = torch.randn(B, HQ, 1, D, device=dev, dtype=torch.bfloat16)
                    sets.append((q, random_packed(kc, B, HKV, N, dev), random_packed(vc, B, HKV, N, dev)))
                cfg, gl_why = dispatched_config(sets[0][0], kc, vc, B, N, dev)
                variants = [(f"triton-{sch}", cfg)]
                if gl_why is None:
                    variants.append((f"tl-{sch}", dict(launch_config(B, HKV, HQ // HKV, N, D, dev, k_codec=kc,
                                                                     v_codec=vc), gluon=False)))
                for prov, c in variants:
                    fns = [lambda s=s, c=c: attend_packed_triton(s[0], kc, s[1], vc, s[2], scale=scale, config=c)
                           for s in sets]
                    med, p20, p80, g = time_fn(fns, graph)
                    row = dict(provider=prov, scheme=sch, B=B, N=N, median_us=med, p20_us=p20, p80_us=p80,
                               graph_us=g, bytes=nbytes, gbps=nbytes / (med * 1e-6) / 1e9,
                               gbps_graph=nbytes / (g * 1e-6) / 1e9 if g else None,
                               ratio_vs_sdpa=sdpa["median_us"] / med,
                               ratio_graph=(sdpa["graph_us"] / g) if (g and sdpa["graph_us"]) else None,
                               config=c, kernel="gluon" if c.get("gluon") else "triton")
                    rows.append(row)
                    print(f"B={B} N={N:6d} {prov:15s} {med:8.1f} us  graph {g or float('nan'):8.1f} us  "
                          f"{row['gbps']:7.0f} GB/s  x{row['ratio_vs_sdpa']:.2f} (graph x{row['ratio_graph'] or float('nan'):.2f})  {c}", flush=True)
                if N <= ref_max_n:
                    s0 = sets[0]
                    med, p20, p80, _ = time_fn([lambda: attend_packed(s0[0], kc, s0[1], vc, s0[2], scale=scale)], graph=False)
                    rows.append(dict(provider=f"torch-{sch}", scheme=sch, B=B, N=N, median_us=med, p20_us=p20, p80_us=p80,
                                     graph_us=None, bytes=nbytes, gbps=nbytes / (med * 1e-6) / 1e9,
                                     ratio_vs_sdpa=sdpa["median_us"] / med))
                    print(f"B={B} N={N:6d} torch-{sch:9s} {med:8.1f} us", flush=True)
                del sets, fns
                torch.cuda.empty_cache()
    return rows


def dispatched_config(q, kc, vc, B, N, dev):
    """(config, why not Gluon): what ``attend_packed_triton`` runs by default for this shape."""
    from tqcache.kernels import attention as A

    cfg = A.choose_config(q, kc, vc, HKV, N)
    if cfg.get("gluon"):
        return cfg, None
    G = A._gluon_module()
    return dict(cfg, gluon=False), ("no Gluon" if G is None else G.gluon_reason(q, kc, vc, HQ // HKV, True) or "tables")


def sweep(dev, schemes, B, N):
    """Launch-configuration sweep (BLOCK_N, warps, stages, split multiplier) at one shape."""
    out = []
    scale = D**-0.5
    for sch in schemes:
        kc, vc = codecs_for(sch, dev)
        nbytes = B * HKV * N * (bytes_per_token(kc) + bytes_per_token(vc))
        sets = [(torch.randn(B, HQ, 1, D, device=dev, dtype=torch.bfloat16), random_packed(kc, B, HKV, N, dev),
                 random_packed(vc, B, HKV, N, dev)) for _ in range(n_sets(nbytes))]
        base = launch_config(B, HKV, HQ // HKV, N, D, dev)
        for bn in (64, 128):
            for nw in (4, 8):
                for ns in (2,):
                    for smul in (1, 2):
                        cfg = dict(base, BLOCK_N=bn, num_warps=nw, num_stages=ns,
                                   SPLITS=max(1, min(base["SPLITS"] * smul, triton.cdiv(N, 4 * bn))))
                        fns = [lambda s=s, cfg=cfg: attend_packed_triton(s[0], kc, s[1], vc, s[2], scale=scale, config=cfg)
                               for s in sets]
                        try:
                            _, _, _, g = time_fn(fns, graph=True)
                        except Exception as e:  # noqa: BLE001
                            print(f"  sweep {cfg} failed: {e}", flush=True)
                            continue
                        out.append(dict(scheme=sch, B=B, N=N, graph_us=g, gbps=nbytes / (g * 1e-6) / 1e9, **cfg))
                        print(f"sweep {sch} B={B} N={N} BN={bn} w={nw} st={ns} splits={cfg['SPLITS']}: {g:.1f} us "
                              f"{nbytes / (g * 1e-6) / 1e9:.0f} GB/s", flush=True)
        del sets
    return out


def time_graph(fns, rep=60):
    """CUDA-graph replay µs per call (median), short: for sweeps."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    g = _capture(fns)
    return _q(do_bench(g.replay, warmup=10, rep=rep, quantiles=[0.5]))[0] / len(fns)


def sweep_tiles(dev, schemes, Bs, N, smuls=(1, 2, 4), join_baseline=False):
    """Tile sweep: BLOCK_N {32, 64, 128} × warps {2, 4} × split multiplier ``smuls``, plane layout on (optionally
    the v1 configuration, tl.join layout, BLOCK_N 128, 4 warps, as an in-process baseline). Returns (rows, best):
    best[scheme] = (BLOCK_N, warps, split multiplier) minimising the geometric mean over B of time/best(B)."""
    from tqcache.kernels import attention as A

    rows, best = [], {}
    scale = D**-0.5
    for sch in schemes:
        kc, vc = codecs_for(sch, dev)
        times = {}
        for B in Bs:
            nbytes = B * HKV * N * (bytes_per_token(kc) + bytes_per_token(vc))
            sets = [(torch.randn(B, HQ, 1, D, device=dev, dtype=torch.bfloat16), random_packed(kc, B, HKV, N, dev),
                     random_packed(vc, B, HKV, N, dev)) for _ in range(n_sets(nbytes))]
            key = (D, A._seg_key(kc), A._seg_key(vc), B * HKV >= 32)
            saved = A._DECODE_TUNED.pop(key, None)
            cands = [("v1-join", 128, 4, 1, False)] if join_baseline else []
            cands += [("planes", bn, nw, sm, True) for bn in (32, 64, 128) for nw in (2, 4) for sm in smuls
                      if not (bn == 128 and nw == 2)]
            for name, bn, nw, sm, planes in cands:
                if planes:  # the split rule of launch_config with this tile choice
                    A._DECODE_TUNED[key] = (bn, nw, sm)
                cfg = dict(launch_config(B, HKV, HQ // HKV, N, D, dev, k_codec=kc, v_codec=vc), planes=planes)
                A._DECODE_TUNED.pop(key, None)
                fns = [lambda s=s, cfg=cfg: attend_packed_triton(s[0], kc, s[1], vc, s[2], scale=scale, config=cfg)
                       for s in sets]
                try:
                    g = time_graph(fns)
                except Exception as e:  # noqa: BLE001
                    print(f"  sweep {sch} {cfg} failed: {type(e).__name__}: {e}", flush=True)
                    continue
                rows.append(dict(scheme=sch, B=B, N=N, variant=name, graph_us=g, gbps=nbytes / (g * 1e-6) / 1e9,
                                 split_mul=sm, **cfg))
                if planes:
                    times.setdefault((bn, nw, sm), {})[B] = g
                print(f"sweep {sch:7s} B={B} N={N} {name:9s} BN={bn:3d} w={nw} splits={cfg['SPLITS']:3d}: "
                      f"{g:8.1f} us {nbytes / (g * 1e-6) / 1e9:6.0f} GB/s", flush=True)
            if saved is not None:
                A._DECODE_TUNED[key] = saved
            del sets
            torch.cuda.empty_cache()
        full = {k: v for k, v in times.items() if len(v) == len(Bs)}
        if full:
            bmin = {B: min(v[B] for v in full.values()) for B in Bs}
            score = lambda k: math.prod(full[k][B] / bmin[B] for B in Bs) ** (1 / len(Bs))  # noqa: E731
            best[sch] = min(full, key=score)
            print(f"sweep {sch}: best (BLOCK_N, warps, split mul) = {best[sch]} (score {score(best[sch]):.3f})", flush=True)
    return rows, best


def ab_planes(dev, schemes, Bs, N=131072, key="planes"):
    """Same launch configuration (the tuned one), one switch of the config off vs on, twice each: ``planes`` (bit-plane
    layout vs tl.join, the v3 change) or ``fast`` (register-table centroid lookup vs gather, v4)."""
    rows = []
    scale = D**-0.5
    for sch in schemes:
        kc, vc = codecs_for(sch, dev)
        for B in Bs:
            nbytes = B * HKV * N * (bytes_per_token(kc) + bytes_per_token(vc))
            sets = [(torch.randn(B, HQ, 1, D, device=dev, dtype=torch.bfloat16), random_packed(kc, B, HKV, N, dev),
                     random_packed(vc, B, HKV, N, dev)) for _ in range(n_sets(nbytes))]
            base = launch_config(B, HKV, HQ // HKV, N, D, dev, k_codec=kc, v_codec=vc)
            for on in (False, True, False, True):  # twice each: the spread says what is noise
                cfg = dict(base, **{key: on})
                g = time_graph([lambda s=s, cfg=cfg: attend_packed_triton(s[0], kc, s[1], vc, s[2], scale=scale, config=cfg)
                                for s in sets], rep=100)
                rows.append(dict(scheme=sch, B=B, N=N, graph_us=g, **cfg))
                print(f"ab {sch:7s} B={B} N={N} {key}={on!s:5s} BN={base['BLOCK_N']} w={base['num_warps']} "
                      f"splits={base['SPLITS']}: {g:8.1f} us", flush=True)
            del sets
            torch.cuda.empty_cache()
    return rows


def ab_pdl(dev, schemes, Bs, Ns, rounds=5):
    """The default decode step with programmatic dependent launch allowed (``attention.PDL``, gluon_config's rule)
    and not, same process: a CUDA graph of each over the same rotated buffers, replayed in alternation ``rounds``
    times (the spread of the rounds says what is noise)."""
    from tqcache.kernels import attention as A
    from tqcache.kernels._launch import Plans

    rows, scale, was = [], D**-0.5, A.PDL
    for sch in schemes:
        kc, vc = codecs_for(sch, dev)
        for B in Bs:
            for N in Ns:
                nbytes = B * HKV * N * (bytes_per_token(kc) + bytes_per_token(vc))
                sets = [(torch.randn(B, HQ, 1, D, device=dev, dtype=torch.bfloat16),
                         random_packed(kc, B, HKV, N, dev), random_packed(vc, B, HKV, N, dev))
                        for _ in range(n_sets(nbytes))]
                graphs, cfgs = {}, {}
                for on in (False, True):
                    A.PDL, A._PLANS = on, Plans()
                    fns = [lambda s=s: attend_packed_triton(s[0], kc, s[1], vc, s[2], scale=scale) for s in sets]
                    for f in fns:
                        f()
                    torch.cuda.synchronize()
                    graphs[on] = _capture(fns)
                    cfgs[on] = A.gluon_config(B, HKV, N, dev)
                runs = {False: [], True: []}
                for _ in range(rounds):
                    for on, g in graphs.items():
                        runs[on].append(_q(do_bench(g.replay, warmup=10, rep=100, quantiles=[0.5]))[0] / len(sets))
                off, on = statistics.median(runs[False]), statistics.median(runs[True])
                rows.append(dict(scheme=sch, B=B, N=N, off_us=off, on_us=on, gain=off / on - 1,
                                 splits_off=cfgs[False]["SPLITS"], splits_on=cfgs[True]["SPLITS"],
                                 pdl=cfgs[True]["PDL"], runs_off=runs[False], runs_on=runs[True]))
                print(f"pdl {sch:7s} B={B:2d} N={N:6d} off {off:7.1f} on {on:7.1f} ({off / on - 1:+.1%}) "
                      f"splits {cfgs[False]['SPLITS']} -> {cfgs[True]['SPLITS']} pdl={cfgs[True]['PDL']}", flush=True)
                del sets, graphs
                torch.cuda.empty_cache()
    A.PDL, A._PLANS = was, Plans()
    return rows


def sass_stats() -> dict:
    """Per compiled attention kernel: SASS instruction counts by opcode class (cuobjdump), registers, spills."""
    import collections
    import re
    import subprocess
    import tempfile

    from tqcache.kernels import attention as A

    out = {}
    for key, ck in A.KERNELS.items():
        try:
            cub = ck.asm["cubin"]
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(cub)
                f.flush()
                txt = subprocess.run(["cuobjdump", "-sass", f.name], capture_output=True, text=True, timeout=60).stdout
            ops = collections.Counter(m.group(1).split(".")[0] for m in re.finditer(r"/\*[0-9a-f]{4,6}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", txt))
            keep = ("LDG", "LDS", "STS", "HMMA", "IMAD", "MOV", "LEA", "LOP3", "SHF", "PRMT", "F2FP", "BAR", "FMUL", "FFMA")
            out[key] = dict(total=sum(ops.values()), **{k: ops.get(k, 0) for k in keep}, **A.COMPILED.get(key, {}))
        except Exception as e:  # noqa: BLE001
            out[key] = dict(error=f"{type(e).__name__}: {e}")
    for k, v in out.items():
        print(f"sass {k}: {v}", flush=True)
    return out


def bench_encode(dev, schemes, N=32768):
    rows = []
    for sch in schemes:
        kc, _ = codecs_for(sch, dev)
        x = torch.randn(1, HKV, N, D, device=dev, dtype=torch.bfloat16)
        fields = {n: torch.empty(1, HKV, N, w, dtype=t, device=dev) for n, (w, t) in kc.field_widths().items()}
        in_bytes = x.numel() * 2
        out_bytes = HKV * N * bytes_per_token(kc)
        med, p20, p80, g = time_fn([lambda: encode_into(kc, x, fields, 0)], graph=True)
        tmed, _, _, _ = time_fn([lambda: kc.quantize(x, check=False)], graph=False)
        ref = kc.quantize(x)
        mism = {n: int((fields[n] != ref[n]).sum()) for n in ref.fields}
        rows.append(dict(scheme=sch, tokens=N, kv_heads=HKV, median_us=med, p20_us=p20, p80_us=p80, graph_us=g,
                         gbps_input=in_bytes / (med * 1e-6) / 1e9, gbps_read_write=(in_bytes + out_bytes) / (med * 1e-6) / 1e9,
                         torch_quantize_us=tmed, mismatched_elements=mism))
        print(f"encode {sch:8s} 32K tok: {med:8.1f} us  {rows[-1]['gbps_input']:6.0f} GB/s of bf16 input "
              f"(torch codec {tmed:8.1f} us)  mismatches {mism}", flush=True)
    return rows


def diag(dev, out_dir):
    """Where the time goes: variants of the kernel that drop one stage, and the compiled IR for reading."""
    import os

    scale = D**-0.5
    for sch in ("turbo4", "turbo3"):
        kc, vc = codecs_for(sch, dev)
        for B, N in ((1, 131072), (8, 131072)):
            nbytes = B * HKV * N * (bytes_per_token(kc) + bytes_per_token(vc))
            s = (torch.randn(B, HQ, 1, D, device=dev, dtype=torch.bfloat16), random_packed(kc, B, HKV, N, dev),
                 random_packed(vc, B, HKV, N, dev))
            base = launch_config(B, HKV, HQ // HKV, N, D, dev)
            for name, extra in (("default", {}),):  # add stage-dropping variants here when profiling
                cfg = dict(base, **extra)
                _, _, _, g = time_fn([lambda cfg=cfg: attend_packed_triton(s[0], kc, s[1], vc, s[2], scale=scale, config=cfg)])
                print(f"diag {sch} B={B} N={N} {name:10s} {g:8.1f} us {nbytes / (g * 1e-6) / 1e9:6.0f} GB/s", flush=True)
    from tqcache.kernels import attention as A

    kern = A._attn_fwd_kernel
    for dev_cache in kern.device_caches.values():
        for i, ck in enumerate(dev_cache[0].values()):
            for k in ("ttgir", "ptx", "cubin"):
                if k in ck.asm and i < 2:
                    data = ck.asm[k]
                    with open(os.path.join(out_dir, f"attn_{i}.{k}"), "wb" if isinstance(data, bytes) else "w") as f:
                        f.write(data)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/attention_h100.json")
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--schemes", default="turbo4,turbo3,turbo3.5,k4v3")
    ap.add_argument("--B", default="1,8")
    ap.add_argument("--N", default="4096,16384,65536,131072")
    ap.add_argument("--ref-max-n", type=int, default=16384)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--no-encode", action="store_true")
    ap.add_argument("--tile-sweep", action="store_true", help="v3 BLOCK_N × warps × splits sweep at N = 128K")
    ap.add_argument("--apply-best", action="store_true", help="benchmark with the tile sweep's choice")
    ap.add_argument("--ab", action="store_true", help="plane layout on/off at the tuned config, 128K")
    ap.add_argument("--ab-fast", action="store_true", help="register-table lookup on/off at the tuned config, 128K")
    ap.add_argument("--ab-pdl", action="store_true", help="programmatic dependent launch off/on (--B, --N), then exit")
    ap.add_argument("--rep", type=int, default=200, help="do_bench rep (ms) for the main table")
    ap.add_argument("--diag", default=None, help="write IR here and time stage-dropping variants, then exit")
    a = ap.parse_args()
    REP[0] = a.rep
    dev = torch.device("cuda")
    torch.manual_seed(0)
    schemes = a.schemes.split(",")
    p = torch.cuda.get_device_properties(0)
    meta = dict(gpu=p.name, sm_count=p.multi_processor_count, l2_bytes=p.L2_cache_size, torch=torch.__version__,
                triton=triton.__version__, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                commit=a.commit, heads=f"{HQ}/{HKV}", head_dim=D, query_dtype="bfloat16",
                timing="do_bench median (p20/p80), eager; graph_us = CUDA-graph replay median")
    meta["copy_gbps"] = copy_bandwidth(dev)
    print(f"{p.name}: device-to-device copy {meta['copy_gbps']:.0f} GB/s (read + write)", flush=True)
    meta["correctness_bench_shape"] = check_correctness(dev, schemes)
    print("correctness at B=2 N=4K bf16:", meta["correctness_bench_shape"], flush=True)
    res = dict(meta=meta)
    if a.diag:
        diag(dev, a.diag)
        return
    if a.ab_pdl:
        res["ab_pdl"] = ab_pdl(dev, schemes, [int(x) for x in a.B.split(",")], [int(x) for x in a.N.split(",")])
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
        return
    if a.sweep:
        res["sweep"] = sweep(dev, schemes[:2], 1, 131072) + sweep(dev, schemes[:2], 8, 131072)
    if a.tile_sweep:
        from tqcache.kernels import attention as A

        rows, best = sweep_tiles(dev, schemes[:3], [int(x) for x in a.B.split(",")], 131072)
        res["tile_sweep"] = rows
        res["tile_sweep_best"] = {k: list(v) for k, v in best.items()}
        if a.apply_best:  # benchmark below with the sweep's choice (what goes into _DECODE_TUNED)
            for sch, v in best.items():
                kc, vc = codecs_for(sch, dev)
                for large in (False, True):
                    A._DECODE_TUNED[(D, A._seg_key(kc), A._seg_key(vc), large)] = tuple(v)
            print("applied:", A._DECODE_TUNED, flush=True)
    if a.ab:
        res["ab_planes"] = ab_planes(dev, ["turbo4", "k4v3"], [int(x) for x in a.B.split(",")])
        res["sass"] = sass_stats()
    if a.ab_fast:
        res["ab_fast"] = ab_planes(dev, schemes, [int(x) for x in a.B.split(",")], key="fast")
        res["sass"] = sass_stats()
    res["attention"] = bench_attention(dev, [int(x) for x in a.B.split(",")], [int(x) for x in a.N.split(",")],
                                       schemes, a.ref_max_n)
    if not a.no_encode:
        res["encode"] = bench_encode(dev, schemes[:3])
    from tqcache.kernels.attention import COMPILED

    res["compiled"] = COMPILED
    print("compiled attention kernels (registers/spills):", COMPILED)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    # ---- short table last
    print("\nB      N  provider          median_us  graph_us   GB/s(graph)  x_sdpa(eager)  x_sdpa(graph)")
    for r in res["attention"]:
        if r["provider"].startswith("torch"):
            continue
        print(f"{r['B']:1d} {r['N']:6d}  {r['provider']:16s} {r['median_us']:9.1f} {r['graph_us'] or float('nan'):9.1f} "
              f"{r.get('gbps_graph') or float('nan'):10.0f} {r['ratio_vs_sdpa']:10.2f} {r.get('ratio_graph') or float('nan'):12.2f}")
    bw = meta["copy_gbps"]
    print(f"copy {bw:.0f} GB/s; 70% = {0.7 * bw:.0f} GB/s")
    for r in res.get("encode", []):
        print(f"encode {r['scheme']}: {r['median_us']:.1f} us, {r['gbps_input']:.0f} GB/s bf16 input ({100 * r['gbps_input'] / bw:.0f}% of copy)")


if __name__ == "__main__":
    main()
