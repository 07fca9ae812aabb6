"""benchmarks/plot_decode_step.py: per-layer times gathered across runs, the PNG, and a clear error on other JSON."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest

_PATH = Path(__file__).parent.parent / "benchmarks" / "plot_decode_step.py"
_spec = importlib.util.spec_from_file_location("plot_decode_step", _PATH)
plot_decode_step = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plot_decode_step)


def _run(gen):
    rows = [dict(N=n, scheme=s, us_per_layer=1000 + gen.random() * 3000) for n in (4096, 32768) for s in ("bf16", "turbo4")]
    return {"meta": {"gpu": "test GPU", "model": "tiny", "batch": 1}, "rows": rows}


def test_per_layer_gathers_each_run_in_milliseconds():
    gen = random.Random(5)
    runs = [_run(gen), _run(gen)]
    got = plot_decode_step.per_layer(runs)
    assert list(got) == ["bf16", "turbo4"]
    for s in got:
        for n in (4096, 32768):
            want = [r["us_per_layer"] / 1e3 for run in runs for r in run["rows"] if r["scheme"] == s and r["N"] == n]
            assert got[s][n] == pytest.approx(want) and len(want) == 2


def test_runs_of_two_commits_stay_apart_but_dense_pools():
    gen = random.Random(6)
    a, b = _run(gen), _run(gen)
    a["meta"]["commit"], b["meta"]["commit"] = "x-before", "x-after"
    got = plot_decode_step.per_layer([a, b])
    assert list(got) == ["bf16", "turbo4 (x-before)", "turbo4 (x-after)"]
    assert len(got["bf16"][4096]) == 2 and len(got["turbo4 (x-after)"][4096]) == 1
    assert got["turbo4 (x-after)"][4096] == [r["us_per_layer"] / 1e3 for r in b["rows"]
                                             if r["scheme"] == "turbo4" and r["N"] == 4096]


def test_flush_values_label_providers_and_the_mean_step_is_used():
    gen = random.Random(8)
    rows = []
    for n in (4096, 32768):
        rows.append(dict(N=n, scheme="bf16", flush=None, us_per_layer=900.0))
        for f in (1, 32):
            med = 1000 + gen.random() * 1000
            rows.append(dict(N=n, scheme="turbo4", flush=f, us_per_layer=med, mean_us_per_layer=med + 100 * f))
    got = plot_decode_step.per_layer([{"meta": {"commit": "c"}, "rows": rows}])
    assert list(got) == ["bf16", "turbo4 flush 1", "turbo4 flush 32"]
    want = [r["mean_us_per_layer"] / 1e3 for r in rows if r.get("flush") == 32 and r["N"] == 4096]
    assert got["turbo4 flush 32"][4096] == pytest.approx(want) and got["bf16"][4096] == [0.9]


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    gen = random.Random(7)
    out = tmp_path / "step.png"
    plot_decode_step.plot([_run(gen), _run(gen)], out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000


def test_other_json_is_refused_with_the_row():
    with pytest.raises(ValueError, match="us_per_layer"):
        plot_decode_step.per_layer([{"rows": [{"B": 1, "N": 4096, "provider": "sdpa-bf16"}]}])
