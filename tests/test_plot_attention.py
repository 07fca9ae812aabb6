"""benchmarks/plot_attention.py: speed-ups from graph times, the PNG, and a clear error on a result without SDPA."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).parent.parent / "benchmarks" / "plot_attention.py"
_spec = importlib.util.spec_from_file_location("plot_attention", _PATH)
plot_attention = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plot_attention)


def _rows(gen):
    rows = []
    for B in (1, 8):
        for N in (4096, 16384, 65536):
            sd = 10.0 + gen.random() * N / 100
            rows.append(dict(B=B, N=N, provider="sdpa-bf16", graph_us=sd))
            rows.append(dict(B=B, N=N, provider="triton-turbo4", graph_us=sd / (1 + N / 32768)))
            rows.append(dict(B=B, N=N, provider="tl-turbo4", graph_us=sd * 1.1))
            rows.append(dict(B=B, N=N, provider="torch-turbo4", graph_us=None))  # no graph time: skipped
    return rows


def test_speedups_divide_sdpa_by_each_provider_at_the_same_shape():
    import random

    rows = _rows(random.Random(3))
    sp = plot_attention.speedups(rows)
    assert set(sp) == {(b, p) for b in (1, 8) for p in ("triton-turbo4", "tl-turbo4")}
    for (b, p), pts in sp.items():
        assert [n for n, _ in pts] == [4096, 16384, 65536]
        want = [1 + n / 32768 for n in (4096, 16384, 65536)] if p.startswith("triton") else [1 / 1.1] * 3
        assert [x for _, x in pts] == pytest.approx(want)


def test_plot_writes_a_png_with_one_panel_per_batch(tmp_path):
    import random

    out = tmp_path / "a.png"
    fig = plot_attention.plot({"attention": _rows(random.Random(4)), "meta": {"gpu": "test"}}, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [ax.get_title() for ax in fig.axes] == ["batch 1", "batch 8"]
    assert len(fig.axes[0].lines) == 3  # dispatched, Triton kernel, the 1× line


def test_a_result_without_sdpa_rows_names_what_is_missing(tmp_path):
    rows = [r for r in _rows(__import__("random").Random(5)) if not (r["provider"] == "sdpa-bf16" and r["N"] == 16384)]
    with pytest.raises(ValueError, match="N=16384"):
        plot_attention.plot({"attention": rows}, tmp_path / "b.png")
