"""Plot ``bench_decode_step.py`` results: milliseconds per layer of an eager decode step, per provider and context.

One group of bars per context length, one bar per provider; with several result files (separate runs) a bar is
the median and its whisker the min–max, since an eager step is host-bound and varies run to run. Files of different
commits (``meta.commit``, e.g. ``abc123-before`` / ``abc123-after`` of an A/B) keep the tqcache providers apart —
"turbo4 (abc123-after)" — while the dense ``bf16*`` baselines pool every run.

    python benchmarks/plot_decode_step.py benchmarks/results/decode_step_h100_v12_window.json \\
        benchmarks/results/decode_step_h100_v12_nosync.json --out benchmarks/results/decode_step_h100_v12.png
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def per_layer(results: list[dict]) -> dict:
    """``{provider: {N: [ms per layer of each run]}}``, providers in first-seen order (labelled by commit when the
    files are of several commits, and by ``flush`` when the rows hold several values of it; dense baselines never
    are). A row's mean over its steps (``mean_us_per_layer``) is used where recorded — with ``flush`` > 1 the
    median step skips the steps that compress — else its median step."""
    commits = {res.get("meta", {}).get("commit") for res in results}
    flushes = {r.get("flush") for res in results for r in res["rows"] if not str(r.get("scheme", "")).startswith("bf16")}
    out: dict = {}
    for res in results:
        for r in res["rows"]:
            if "us_per_layer" not in r:
                raise ValueError(f"row without us_per_layer (not a bench_decode_step result?): {r}")
            label = r["scheme"]
            if len(flushes) > 1 and not label.startswith("bf16"):
                label = f"{label} flush {r.get('flush')}"
            if len(commits) > 1 and not label.startswith("bf16"):
                label = f"{label} ({res.get('meta', {}).get('commit')})"
            out.setdefault(label, {}).setdefault(r["N"], []).append(r.get("mean_us_per_layer", r["us_per_layer"]) / 1e3)
    return out


def plot(results: list[dict], path: Path):
    """Write the figure to ``path`` (PNG) and return it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = per_layer(results)
    if not data:
        raise ValueError("no rows to plot")
    ns = sorted({n for per in data.values() for n in per})
    schemes = list(data)
    width = 0.8 / len(schemes)
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for i, s in enumerate(schemes):
        xs = [j + (i - (len(schemes) - 1) / 2) * width for j, n in enumerate(ns) if n in data[s]]
        runs = [data[s][n] for n in ns if n in data[s]]
        med = [statistics.median(r) for r in runs]
        err = [[m - min(r) for m, r in zip(med, runs)], [max(r) - m for m, r in zip(med, runs)]]
        ax.bar(xs, med, width, yerr=err, capsize=2, label=s, color=plt.cm.tab10(i % 10))
    ax.set_xticks(range(len(ns)))
    ax.set_xticklabels([f"{n // 1024}K" for n in ns])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("eager decode step, ms per layer")  # (the mean over steps where the rows record it)
    ax.set_yscale("log")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    meta = results[0].get("meta", {})
    ax.set_title(f"{meta.get('gpu', '?')}, {meta.get('model', '?')}, batch {meta.get('batch', '?')} "
                 f"({len(results)} run{'s' if len(results) > 1 else ''})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, nargs="+", help="JSON files written by bench_decode_step.py")
    ap.add_argument("--out", type=Path, default=None, help="PNG path (default: the first result's name with .png)")
    a = ap.parse_args(argv)
    out = a.out or a.results[0].with_suffix(".png")
    plot([json.loads(p.read_text()) for p in a.results], out)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
