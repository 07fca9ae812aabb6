"""CPU throughput of the pure-torch codecs (the spec, not the kernels): quantize / dequantize, vectors per second.

Providers (one row each): TurboQuant at 2, 2.5, 3, 3.5, 4, 8 bits (MSE, norm correction on), TurboQuant-prod
at 4 bits (3-bit MSE + 1-bit QJL sketch), and the affine min/max baseline at 4 bits with groups of 32. Each
runs on ``N`` random fp32 vectors of ``d`` channels; we report the median over ``--repeats`` timed runs
after one warm-up run, with p20/p80, and the MB/s of fp32 input consumed / output produced.

    python benchmarks/bench_codec.py                      # d = 128 and 64, N = 65536
    python benchmarks/bench_codec.py --dims 128 --n 16384 --repeats 3 --json /tmp/x.json

Results go to ``benchmarks/results/codec_cpu.json`` with the CPU model, torch version, thread count, date
and git commit. The table is printed last.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing

from tqcache.codec import AffineQuantizer, TurboQuantizer  # noqa: E402

# name -> builder(dim)
PROVIDERS = {
    "turbo2": lambda d: TurboQuantizer(d, 2, seed=0),
    "turbo2.5": lambda d: TurboQuantizer(d, 2.5, seed=0),
    "turbo3": lambda d: TurboQuantizer(d, 3, seed=0),
    "turbo3.5": lambda d: TurboQuantizer(d, 3.5, seed=0),
    "turbo4": lambda d: TurboQuantizer(d, 4, seed=0),
    "turbo8": lambda d: TurboQuantizer(d, 8, seed=0),
    "turbo4+qjl": lambda d: TurboQuantizer(d, 4, qjl=True, seed=0),
    "affine4-g32": lambda d: AffineQuantizer(d, 4, group_size=32),
}


def _quantiles(xs: list[float]) -> tuple[float, float, float]:
    s = sorted(xs)
    pick = lambda q: s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]
    return pick(0.2), statistics.median(s), pick(0.8)


def _time(fn, repeats: int) -> list[float]:
    fn()  # warm-up (allocator, codebook caches, lazy init)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", None
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
        "git_dirty": dirty,
    }


def bench_one(name: str, dim: int, n: int, repeats: int, seed: int = 0) -> dict:
    codec = PROVIDERS[name](dim)
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    packed = codec.quantize(x)
    tq = _time(lambda: codec.quantize(x), repeats)
    tdq = _time(lambda: codec.dequantize(packed), repeats)
    row = {"provider": name, "dim": dim, "n": n, "bits_per_element": packed.bits_per_element}
    for op, ts in (("quantize", tq), ("dequantize", tdq)):
        p20, med, p80 = _quantiles(ts)
        row[op] = {
            "seconds_median": med,
            "seconds_p20": p20,
            "seconds_p80": p80,
            "vectors_per_s_median": n / med,
            "vectors_per_s_p20": n / p80,  # the slower runs give the lower rate
            "vectors_per_s_p80": n / p20,
            "fp32_MB_per_s_median": n * dim * 4 / med / 1e6,
        }
    return row


def format_table(rows: list[dict]) -> str:
    head = f"{'provider':<13}{'thr':>4}{'d':>5}{'bits/el':>9}{'quantize vec/s':>17}{'(p20–p80)':>22}{'dequantize vec/s':>19}{'(p20–p80)':>22}"
    lines = [head, "-" * len(head)]
    fmt = lambda v: f"{v / 1e6:.2f}M" if v >= 1e6 else f"{v / 1e3:.0f}k"
    for r in rows:
        q, dq = r["quantize"], r["dequantize"]
        lines.append(
            f"{r['provider']:<13}{r['threads']:>4}{r['dim']:>5}{r['bits_per_element']:>9.3f}"
            f"{fmt(q['vectors_per_s_median']):>17}{fmt(q['vectors_per_s_p20']) + '–' + fmt(q['vectors_per_s_p80']):>22}"
            f"{fmt(dq['vectors_per_s_median']):>19}{fmt(dq['vectors_per_s_p20']) + '–' + fmt(dq['vectors_per_s_p80']):>22}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dims", type=int, nargs="+", default=[128, 64])
    ap.add_argument("--n", type=int, default=65536, help="vectors per call (default 65536)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs after one warm-up (default 5)")
    ap.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=list(PROVIDERS))
    ap.add_argument(
        "--threads", type=int, nargs="+", default=None,
        help="torch thread counts to sweep (default: 1 and torch's default, which is usually the core count)",
    )
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "codec_cpu.json"), help="output JSON ('' to skip)")
    args = ap.parse_args(argv)
    default_threads = torch.get_num_threads()
    threads = args.threads or sorted({1, default_threads})
    torch.set_grad_enabled(False)
    load_before = _loadavg()

    rows = []
    for nt in threads:
        torch.set_num_threads(nt)
        for dim in args.dims:
            for name in args.providers:
                row = {"threads": nt, **bench_one(name, dim, args.n, args.repeats)}
                rows.append(row)
                print(
                    f"  {name:<12} d={dim:<4} threads={nt} quantize {row['quantize']['vectors_per_s_median']:>12,.0f} vec/s   "
                    f"dequantize {row['dequantize']['vectors_per_s_median']:>12,.0f} vec/s",
                    file=sys.stderr,
                    flush=True,
                )
    torch.set_num_threads(default_threads)
    result = {
        "benchmark": "codec_cpu",
        "description": "pure-torch codec throughput on CPU, fp32 input vectors [N, d]; median of repeats after a warm-up",
        "machine": {**machine_info(), "torch_threads": default_threads, "loadavg_1min_before": load_before, "loadavg_1min_after": _loadavg()},
        "settings": {
            "n": args.n, "repeats": args.repeats, "dims": args.dims, "threads": threads,
            "input_dtype": "float32", "check_finite": True,
        },
        "results": rows,
    }
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}", file=sys.stderr)
    m = result["machine"]
    print(
        f"\ncodec CPU throughput — {m['cpu']} ({m['logical_cpus']} logical CPUs, load avg {load_before} -> {_loadavg()}), "
        f"torch {m['torch']}, N={args.n}, median of {args.repeats} after a warm-up"
    )
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
