"""Where one decode step's time goes: device µs per kernel of the compressed attention, and host µs per kernel entry.

Two tables, for the claims in docs/kernel-notes.md ("v13"), and two optional views ("v20"):

* **device**: the torch profiler's time per kernel of ``attend_packed_triton`` (query map, decode, merge), averaged
  over 20 eager steps, beside the CUDA-graph time of the whole step — 32/8 heads, head_dim 128, per scheme, B and N.
* **host**: µs of Python per call of the three entry points a decode layer runs (``kernels.attend``,
  ``kernels.encode`` of one token, ``kernels.attend_window``) once their plans exist — best of 5 × 400 calls, turbo4,
  B = 1, 4K — with a torch ``add_`` beside them as a yardstick for the host's speed (it varies run to run).
* **exposed** (``--exposed``): what each kernel adds to the step — CUDA-graph µs of the step as it runs, and with the
  query map, the merge or both left out (the other launches unchanged, buffers rotated past L2, graphs alternated
  in one process). Under programmatic dependent launch a kernel's profiler time and what it costs the step differ.
* **timeline** (``--timeline``): per program of the Gluon decode kernel, ``%globaltimer`` at its start, before the
  wait for the query map, at the loop's start and end and at its end, and its SM — from a copy of
  ``decode_gluon.py`` with those reads patched in (the kernel itself has none). Quantiles of each phase, and the
  number of programs running per 0.5 µs.

    PYTHONPATH=src python benchmarks/bench_step_parts.py --out benchmarks/results/step_parts_h100.json
    PYTHONPATH=src python benchmarks/bench_step_parts.py --exposed --timeline --no-device --no-host --out ...
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


class _Toggle:
    """Stands in for a kernel's launcher (``Replay``): launches through it, or — ``skip`` — launches nothing."""

    def __init__(self, real):
        self.real, self.skip = real, False

    def ready(self, key) -> bool:
        return self.real.ready(key)

    def __call__(self, *args):
        return None if self.skip else self.real(*args)


def exposed_parts(schemes, shapes, dev, rounds: int = 5) -> list[dict]:
    """Graph µs of the step with the query map and/or the merge left out (see the module docstring)."""
    toggles = {"qmap": _Toggle(att._QMAP), "merge": _Toggle(att._MERGE)}
    att._QMAP, att._MERGE = toggles["qmap"], toggles["merge"]
    variants = {"step": (), "no_qmap": ("qmap",), "no_merge": ("merge",), "decode_only": ("qmap", "merge")}
    rows = []
    try:
        for sch in schemes:
            kc, vc = BA.codecs_for(sch, dev)
            for B, N in shapes:
                nbytes = B * HKV * N * (BA.bytes_per_token(kc) + BA.bytes_per_token(vc))
                sets = [(torch.randn(B, HQ, 1, D, device=dev, dtype=torch.bfloat16),
                         BA.random_packed(kc, B, HKV, N, dev), BA.random_packed(vc, B, HKV, N, dev))
                        for _ in range(BA.n_sets(nbytes))]
                fns = [lambda s=s: att.attend_packed_triton(s[0], kc, s[1], vc, s[2], scale=D**-0.5) for s in sets]
                graphs = {}
                for name, off in variants.items():
                    for k, t in toggles.items():
                        t.skip = k in off
                    graphs[name] = (BA._capture(fns), len(fns))
                for t in toggles.values():
                    t.skip = False
                us = {k: [] for k in graphs}
                for _ in range(rounds):
                    for name, (g, n) in graphs.items():
                        us[name].append(BA._q(BA.do_bench(g.replay, warmup=10, rep=60, quantiles=[0.5]))[0] / n)
                med = {k: round(sorted(v)[len(v) // 2], 2) for k, v in us.items()}
                row = dict(scheme=sch, B=B, N=N, graph_us=med, qmap_exposed_us=round(med["step"] - med["no_qmap"], 2),
                           merge_exposed_us=round(med["step"] - med["no_merge"], 2),
                           config={k: v for k, v in att.gluon_config(B, HKV, N, dev).items() if k in ("SPLITS", "PDL")})
                rows.append(row)
                print(row, flush=True)
                del sets, graphs, fns
                torch.cuda.empty_cache()
    finally:
        att._QMAP, att._MERGE = toggles["qmap"].real, toggles["merge"].real
    return rows


def _timed_module():
    """A copy of decode_gluon.py whose kernel stores ``%globaltimer_lo`` at five points and ``%smid`` per program
    into the buffer ``TBUF[0]`` (8 int32 per program), passed where ``q_pos`` goes (decode steps have none)."""
    import importlib.util
    import tempfile

    import tqcache.kernels.decode_gluon as dg

    src = Path(dg.__file__).read_text()
    stamps = [("    pid_bh = gl.program_id(0)\n", "    t0 = _gtime()\n"),
              ("    if PDL:\n        _grid_wait()\n", "    t1 = _gtime()\n"),
              ("    for it in range(n_iter):\n", "    t2 = _gtime()\n"),
              ("    if PDL:  # the merge may", "    t3 = _gtime()\n")]
    for anchor, stamp in stamps:
        assert src.count(anchor) == 1, f"timeline: no unique anchor {anchor!r} in decode_gluon.py"
        src = src.replace(anchor, stamp + anchor)
    end = "        _store_acc(pa, mvalid[None, :], a4, a5, a6, a7, VD0, VP1, VW1, TOK)\n"
    store = "".join(f"    gl.store(tb + {i}, t{i})\n" for i in range(5))
    assert src.count(end) == 1 and src.count("            *tables, st, en, qp,") == 1, "timeline: anchors moved"
    src = src.replace(end, end + "    t4 = _gtime()\n    tb = QPOS + (pid_bh * SPLITS + split) * 8\n" + store +
                      "    gl.store(tb + 5, _smid())\n")
    src = src.replace("            *tables, st, en, qp,",
                      "            *tables, st, en, TBUF[0] if TBUF[0] is not None else qp,")
    src = src.replace("@gluon.jit\ndef _grid_wait():", '''TBUF = [None]


@gluon.jit
def _gtime():
    return gl.inline_asm_elementwise("mov.u32 $0, %globaltimer_lo;", "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _smid():
    return gl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _grid_wait():''')
    src = src.replace("from .attention import", "from tqcache.kernels.attention import")
    src = src.replace("from .encode import", "from tqcache.kernels.encode import")
    path = Path(tempfile.mkdtemp()) / "decode_gluon_timed.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("tqcache.kernels.decode_gluon_timed", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def decode_timeline(schemes, shapes, dev, out_dir: Path | None = None) -> list[dict]:
    """Per-program phases of the Gluon decode kernel in one step (see the module docstring), in µs."""
    import numpy as np

    from tqcache.kernels._launch import Plans

    timed, real = _timed_module(), att._gluon_module()

    def use(mod):
        att._GLUON = mod
        att._GLUON_DECODE.clear()
        att._PLANS = Plans()

    rows = []
    use(timed)
    try:
        for sch in schemes:
            kc, vc = BA.codecs_for(sch, dev)
            for B, N in shapes:
                q = torch.randn(B, HQ, 1, D, device=dev, dtype=torch.bfloat16)
                kp, vp = BA.random_packed(kc, B, HKV, N, dev), BA.random_packed(vc, B, HKV, N, dev)
                cfg = att.gluon_config(B, HKV, N, dev)
                n = B * HKV * cfg["SPLITS"]
                timed.TBUF[0] = torch.zeros(8 * n, dtype=torch.int32, device=dev)
                for _ in range(3):
                    att.attend_packed_triton(q, kc, kp, vc, vp, scale=D**-0.5)
                torch.cuda.synchronize()
                t = timed.TBUF[0].view(n, 8).cpu().numpy().astype(np.int64)
                tt = ((t[:, :5] - t[:, 0].min()) % (1 << 32)) / 1000.0  # µs from the first program's start

                def q_(x):
                    return [round(float(v), 2) for v in np.percentile(x, [0, 10, 50, 90, 100])]

                bins = np.arange(0, tt[:, 4].max() + 0.5, 0.5)
                row = dict(scheme=sch, B=B, N=N, splits=cfg["SPLITS"], pdl=cfg["PDL"], programs=n,
                           span_us=round(float(tt[:, 4].max()), 2), quantiles="min, p10, p50, p90, max",
                           start=q_(tt[:, 0]), prologue=q_(tt[:, 1] - tt[:, 0]), wait=q_(tt[:, 2] - tt[:, 1]),
                           loop=q_(tt[:, 3] - tt[:, 2]), epilogue=q_(tt[:, 4] - tt[:, 3]), end=q_(tt[:, 4]),
                           empty_programs=int((tt[:, 3] - tt[:, 2] < 0.05).sum()), sms=int(len(np.unique(t[:, 5]))),
                           running_per_half_us=[int(((tt[:, 0] <= b) & (tt[:, 4] > b)).sum()) for b in bins])
                rows.append(row)
                print({k: v for k, v in row.items() if k != "running_per_half_us"}, flush=True)
                if out_dir is not None:
                    np.save(out_dir / f"timeline_{sch}_B{B}_N{N}.npy", np.concatenate([tt, t[:, 5:6]], 1))
                del kp, vp
                torch.cuda.empty_cache()
    finally:
        use(real)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schemes", default="turbo4,turbo3")
    ap.add_argument("--B", default="1,8")
    ap.add_argument("--N", default="65536,131072")
    ap.add_argument("--exposed", action="store_true", help="graphs of the step with a kernel left out")
    ap.add_argument("--timeline", action="store_true", help="per-program phases of the Gluon decode kernel")
    ap.add_argument("--raw", type=Path, default=None, help="--timeline: save each shape's per-program array here")
    ap.add_argument("--no-device", action="store_true", help="skip the profiler table")
    ap.add_argument("--no-host", action="store_true", help="skip the host table")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--commit", default="unknown")
    a = ap.parse_args(argv)
    dev = torch.device("cuda")
    schemes, Bs, Ns = a.schemes.split(","), [int(b) for b in a.B.split(",")], [int(n) for n in a.N.split(",")]
    res = {}
    if not a.no_device:
        res["device"] = device_parts(schemes, Bs, Ns, dev)
    if not a.no_host:
        res["host"] = host_parts(dev)
    shapes = [(B, N) for B in Bs for N in Ns]
    if a.exposed:
        res["exposed"] = exposed_parts(schemes, shapes, dev)
    if a.timeline:
        res["timeline"] = decode_timeline(schemes, shapes, dev, a.raw)
    if a.out:
        res["meta"] = dict(gpu=torch.cuda.get_device_name(0), commit=a.commit,
                           date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        a.out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
