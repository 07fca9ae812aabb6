"""Plot a ``bench_attention.py`` result: decode-attention speed-up over bf16 SDPA against context length.

One panel per batch size; a line per scheme as dispatched (``triton-<scheme>``: the Gluon kernel where it
covers the scheme), and dotted the Triton kernel on the same scheme (``tl-<scheme>``) where the run has it; the
dashed line is SDPA itself (1×). Speed-ups are CUDA-graph times, as in docs/performance.md.

    python benchmarks/plot_attention.py benchmarks/results/attention_h100_v10_fixedcost.json  # -> same name .png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def speedups(rows: list[dict]) -> dict:
    """``{(B, provider): [(N, × SDPA), ...]}`` from graph times (rows without a graph time are skipped)."""
    sdpa = {(r["B"], r["N"]): r["graph_us"] for r in rows if r["provider"] == "sdpa-bf16" and r.get("graph_us")}
    out: dict = {}
    for r in rows:
        p = r["provider"]
        if not (p.startswith("triton-") or p.startswith("tl-")) or not r.get("graph_us"):
            continue
        base = sdpa.get((r["B"], r["N"]))
        if base is None:
            raise ValueError(f"no sdpa-bf16 row for B={r['B']} N={r['N']} (needed for {p})")
        out.setdefault((r["B"], p), []).append((r["N"], base / r["graph_us"]))
    return {k: sorted(v) for k, v in out.items()}


def plot(result: dict, path: Path):
    """Write the figure to ``path`` (PNG) and return it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sp = speedups(result["attention"])
    if not sp:
        raise ValueError("the result has no triton-/tl- rows with graph times")
    batches = sorted({b for b, _ in sp})
    schemes = sorted({p.split("-", 1)[1] for _, p in sp})
    colors = {s: plt.cm.tab10(i % 10) for i, s in enumerate(schemes)}
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4.2), sharey=True, squeeze=False)
    for ax, b in zip(axes[0], batches):
        for (bb, p), pts in sorted(sp.items(), key=lambda kv: (kv[0][1].startswith("tl-"), kv[0][1])):
            if bb != b:
                continue
            kind, scheme = p.split("-", 1)
            xs, ys = zip(*pts)
            ax.plot(xs, ys, "o-" if kind == "triton" else "x:", color=colors[scheme],
                    label=scheme if kind == "triton" else f"{scheme} (Triton kernel)", alpha=1.0 if kind == "triton" else 0.6)
        ax.axhline(1.0, color="k", ls="--", lw=1, label="SDPA over bf16")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({n for (bb, _), pts in sp.items() if bb == b for n, _ in pts}))
        ax.set_xticklabels([f"{n // 1024}K" for n in ax.get_xticks()])
        ax.set_xlabel("context length (tokens)")
        ax.set_title(f"batch {b}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("decode attention speed-up over bf16 SDPA (×)")
    handles, labels = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    meta = result.get("meta", {})
    fig.suptitle(f"{meta.get('gpu', '?')}, {meta.get('heads', '?')} heads, head_dim {meta.get('head_dim', '?')}, "
                 f"commit {meta.get('commit', '?')} (CUDA-graph times)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return fig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("result", type=Path, help="a JSON written by bench_attention.py")
    ap.add_argument("--out", type=Path, default=None, help="PNG path (default: the result's name with .png)")
    a = ap.parse_args(argv)
    out = a.out or a.result.with_suffix(".png")
    plot(json.loads(a.result.read_text()), out)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
